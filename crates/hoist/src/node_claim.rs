//! One agent per node name. Two machines configured with the same node name would manage the same
//! containers (same labels) and replace each other's forever, so one stands by — manages nothing and
//! answers no fleet request — until the other has been silent for `LIVENESS`, then takes over,
//! adopting what runs. Which one stands by is `presence::keeps_node`; the claim is checked at start
//! and at every presence refresh, so twins that could not see each other at start settle once they can.

use crate::agent::Workload;
use anyhow::Context;
use async_trait::async_trait;
use hoist_core::agent::AgentHandle;
use hoist_core::backend::Kv;
use hoist_core::config::AgentConfig;
use hoist_core::fleet::{AgentResponder, Fleet, Responder};
use hoist_core::fleet_auth::{Authority, KeyPair};
use hoist_core::presence::{Announced, LIVENESS, NODES_BUCKET, PRESENCE_INTERVAL, Presence, announce, claimed_elsewhere, keeps_node};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// This agent's part in a fleet.
pub(crate) struct Member {
    pub fleet: Arc<dyn Fleet>,
    /// This install's id in its presence, from `instance_id`.
    pub instance: String,
}

impl Member {
    /// This install's claim on the node name, taken now.
    pub fn claim(&self, cfg: &AgentConfig, facts: &serde_json::Value, key: String) -> Presence {
        let since_ms = Some(hoist_core::clock::unix_now_ms());
        Presence { node: cfg.node.clone(), facts: facts.clone(), instance: Some(self.instance.clone()), key: Some(key), since_ms }
    }
}

/// This install's identity in `HOIST_NODES`: random, written once to `<state_dir>/instance-id` (mode
/// 0600), so the agent knows its own previous run's presence from another machine's with the same
/// node name. A state_dir copied to another machine carries the id with it.
pub(crate) fn instance_id(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        // Empty: the agent died between creating and writing it.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        file.write_all(id.as_bytes())?;
        file.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// The live claim of another install that wins over `claim`, if there is one: this agent must stand
/// by. A backend that does not answer yet says nothing; the refreshes check again.
pub(crate) async fn rival(kv: &dyn Kv, claim: &Presence) -> Option<Announced> {
    match claimed_elsewhere(kv, claim).await {
        Ok(other) => other.filter(|o| !keeps_node(claim, &o.presence)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell yet whether another machine runs node {}; managing its containers meanwhile", claim.node);
            None
        }
    }
}

/// Answers fleet requests while this agent holds its node name, and signs the answers with the node
/// key. Subscribed once at start, standing by or not: a standing-by agent stays silent.
pub(crate) async fn serve_fleet(
    member: &Member,
    handle: &AgentHandle,
    cfg: &AgentConfig,
    facts: &serde_json::Value,
    answering: Arc<AtomicBool>,
    key: KeyPair,
) -> anyhow::Result<()> {
    tracing::info!(node_key = %key.public_key(), "fleet replies are signed with this node key");
    let operators: Vec<&str> = cfg.fleet.operators.iter().map(|o| o.name.as_str()).collect();
    // With fleet.allow_unsigned, the node condition set at start has said so.
    if !cfg.fleet.allow_unsigned && operators.is_empty() {
        tracing::warn!("no fleet.operators are configured: fleet requests are refused (see `hoist key new`)");
    } else if !operators.is_empty() {
        tracing::info!(operators = %operators.join(", "), "taking signed fleet requests");
    }
    let fleet = member.fleet.clone();
    let responder =
        AgentResponder { agent: handle.clone(), facts: facts.clone(), authority: Authority::new(&cfg.fleet), key, audit: fleet.clone() };
    fleet.serve(Arc::new(WhileHeld { responder, answering })).await.context("answering fleet requests")
}

/// An `AgentResponder` that is silent while the agent stands by: the node's answers come from the
/// machine that runs it.
struct WhileHeld {
    responder: AgentResponder,
    answering: Arc<AtomicBool>,
}

#[async_trait]
impl Responder for WhileHeld {
    async fn respond(&self, kind: &str, request: &[u8], reply_to: &str) -> Option<Vec<u8>> {
        if !self.answering.load(Ordering::SeqCst) {
            return None;
        }
        self.responder.respond(kind, request, reply_to).await
    }
}

/// Holds the node name for as long as the agent runs: announces it, stands by when another machine's
/// claim wins (`holder`, from the start-up check, or one seen at a refresh), and takes over once that
/// machine has been silent for `LIVENESS`.
pub(crate) async fn hold_node(
    member: Member,
    kv: Arc<dyn Kv>,
    cfg: AgentConfig,
    facts: serde_json::Value,
    key: String,
    workload: Arc<Workload>,
    mut holder: Option<Announced>,
) {
    loop {
        if let Some(other) = holder.take() {
            wait_until_silent(&member.claim(&cfg, &facts, key.clone()), other, &*kv, &workload).await;
            tracing::info!(node = %cfg.node, "the other machine running this node has been silent for {}; taking over", humantime::format_duration(LIVENESS));
            workload.take_over().await;
        }
        let other = announce(kv.clone(), member.claim(&cfg, &facts, key.clone())).await;
        let reason = standby_reason(&cfg.node, &member.instance, &other);
        tracing::warn!(node = %cfg.node, "another machine took this node name first; {reason}");
        workload.stand_by(reason).await;
        holder = Some(other);
    }
}

/// Waits until `holder`, the other machine announcing this node, has been silent for `LIVENESS`,
/// keeping the standby reason in status up to date meanwhile.
async fn wait_until_silent(claim: &Presence, mut holder: Announced, kv: &dyn Kv, workload: &Workload) {
    let instance = claim.instance.as_deref().unwrap_or_default();
    loop {
        workload.standing_by_because(standby_reason(&claim.node, instance, &holder));
        // Look again when the holder would turn stale, or after a presence interval if sooner.
        let stale_in = (holder.last_seen + LIVENESS).duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(stale_in.min(PRESENCE_INTERVAL) + Duration::from_millis(100)).await;
        match claimed_elsewhere(kv, claim).await {
            Ok(Some(still)) => holder = still,
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "cannot read {NODES_BUCKET}; still standing by"),
        }
    }
}

/// Why this agent manages nothing, for `hoist status` and the log.
pub(crate) fn standby_reason(node: &str, instance: &str, holder: &Announced) -> String {
    let facts = &holder.presence.facts;
    let host = facts["hostname"].as_str().unwrap_or("?");
    let ip = facts["networking"]["ip"].as_str().unwrap_or("?");
    let other = holder.presence.instance.as_deref().unwrap_or("unknown (an older hoist)");
    format!(
        "standing by, managing no container: node {node} is run by the agent of another machine (hostname {host}, ip {ip}, instance {other}; this is instance {instance}); taking over once it has been silent for {}",
        humantime::format_duration(LIVENESS)
    )
}
