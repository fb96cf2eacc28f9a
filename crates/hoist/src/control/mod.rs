//! The control API: HTTP/JSON on the agent's Unix socket. `server` answers it inside the agent;
//! `client` is the CLI's side, and implements the `Kv` and `Governor` traits so the CLI's commands are
//! written once against the traits, whichever backend the agent runs.

pub mod client;
pub mod server;

use hoist_core::fsm::Transition;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
pub struct TransitionRequest {
    pub container: String,
    pub transition: Transition,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TransitionReply {
    pub state: hoist_core::fsm::State,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GovernorSettings {
    pub capacity: u64,
    #[serde(with = "humantime_serde")]
    pub expire: Duration,
    pub replicas: u8,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// Percent-encodes a KV key or name for use as one URL path segment.
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'=' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
