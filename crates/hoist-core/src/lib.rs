//! Hoist's core: configuration, container specs, the per-container state machine, and the traits its
//! adapters implement (container runtime; KV, governor and event backends). Nothing in here knows
//! about Docker, NATS or HTTP; the arrows point inward.

pub mod agent;
pub mod backend;
pub mod backoff;
pub mod clock;
pub mod config;
#[cfg(feature = "testkit")]
pub mod conformance;
pub mod degraded;
pub mod files;
pub mod fleet;
pub mod fleet_auth;
pub mod fsm;
pub mod health;
pub mod machine;
pub mod outbox;
pub mod persist;
pub mod preflight;
pub mod presence;
pub mod registration;
pub mod release;
pub mod rollback_mark;
pub mod rollout_status;
pub mod runtime;
pub mod slot;
pub mod spec;
pub mod status;
