//! The KV as the CLI's commands reach it: on a NATS fleet with the agent file's own NATS user (so
//! what an operator or reader may change is what NATS permits them, and no agent is needed), else
//! through the local agent's control socket.

use crate::control::client::ControlClient;
use crate::fleet;
use hoist_core::backend::Kv;
use hoist_core::config::{AgentConfig, BackendKind};
use hoist_nats::NatsBackend;
use std::path::PathBuf;

pub enum KvAccess {
    /// The connection, and the agent file that says whose user it is.
    Nats(Box<(NatsBackend, AgentConfig)>),
    Agent(ControlClient),
}

impl KvAccess {
    /// NATS unless `socket` was given or the agent file uses the embedded store.
    pub async fn open(cfg: &AgentConfig, socket: Option<PathBuf>) -> anyhow::Result<KvAccess> {
        Ok(match socket {
            None if cfg.backend == BackendKind::Nats => KvAccess::Nats(Box::new((fleet::connect(cfg).await?, cfg.clone()))),
            socket => KvAccess::Agent(ControlClient::new(socket.unwrap_or_else(|| cfg.control.socket.clone()))),
        })
    }

    pub fn kv(&self) -> &dyn Kv {
        match self {
            KvAccess::Nats(nats) => &nats.0,
            KvAccess::Agent(client) => client,
        }
    }

    /// `e`, with why NATS refused, when it did: a permission error reads as a timeout otherwise.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        match self {
            KvAccess::Nats(nats) => match nats.0.last_refusal() {
                Some(refusal) => e.context(fleet::refused_by_nats(&nats.1, &refusal)),
                None => e,
            },
            KvAccess::Agent(_) => e,
        }
    }
}
