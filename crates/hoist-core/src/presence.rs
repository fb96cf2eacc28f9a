//! Presence: agents announce themselves in the `HOIST_NODES` bucket (a heartbeat every
//! `PRESENCE_INTERVAL`), which is how a fleet caller knows who *should* answer and can name who did
//! not. A node that stops refreshing is not forgotten: its entry stays for the bucket's TTL
//! (`fleet.node_retention`, days) or until an operator removes it, so a dead node is reported
//! missing, with when it was last seen, instead of silently dropping out of the fleet.
//!
//! The entry is also the node name's claim: two machines configured with the same node name would
//! replace each other's containers forever, so one of them stands by (`keeps_node` says which) until
//! the other has been silent for `LIVENESS`. The claim is checked at every refresh, not only at start:
//! twins that could not see each other (NATS down when both started, a partition) settle once they can.

use crate::backend::{BackendError, BackendResult, BucketConfig, Kv, KvEntry, read_all};
use crate::backoff::Retry;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where agents announce themselves: key = node, value = `Presence`.
pub const NODES_BUCKET: &str = "HOIST_NODES";

/// How often an agent refreshes its presence.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(10);

/// A node is alive while its presence was refreshed this recently: three missed refreshes in a row
/// are a dead agent (or a node cut off from NATS), not a slow one.
pub const LIVENESS: Duration = Duration::from_secs(PRESENCE_INTERVAL.as_secs() * 3);

/// How long a node that stopped announcing itself is remembered (`fleet.node_retention`): long
/// enough for an operator to notice a dead node and act, after a weekend too.
pub const DEFAULT_NODE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// `HOIST_NODES`: one entry per node, kept `retention` after its last refresh.
pub fn nodes_bucket(retention: Duration, replicas: u8) -> BucketConfig {
    BucketConfig { history: 1, ttl: Some(retention), replicas }
}

/// An agent's announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub node: String,
    pub facts: serde_json::Value,
    /// The announcing install (a random id kept in its `state_dir`), so that an agent can tell its own
    /// previous run from another machine configured with the same node name. None from agents that
    /// predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The node key (`N…`) its replies are signed with; None from agents older than signed replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When this install took the node name (unix ms, its own clock): this agent's start, or when it
    /// took over from a silent twin. Of two installs claiming one name, the earlier keeps it. None from
    /// agents older than the check, which never stand by, so they keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

/// Whether `own` keeps the node name that `other`, another install, claims too: the one that took it
/// first keeps it (an agent that cannot stand by, older than the check, counts as first), and of two
/// that took it in the same millisecond the smaller instance id. Both sides decide alike from the two
/// presences, so exactly one stands by.
pub fn keeps_node(own: &Presence, other: &Presence) -> bool {
    let first = |p: &Presence| (p.since_ms.unwrap_or(0), p.instance.clone().unwrap_or_default());
    first(own) < first(other)
}

/// A node as `HOIST_NODES` remembers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Announced {
    pub presence: Presence,
    /// When its presence was last refreshed, by the NATS server's clock.
    pub last_seen: SystemTime,
}

impl Announced {
    fn of(entry: &KvEntry) -> Option<Announced> {
        let presence = serde_json::from_slice::<Presence>(&entry.value).ok()?;
        Some(Announced { presence, last_seen: UNIX_EPOCH + Duration::from_millis(entry.created_ms) })
    }

    /// Refreshed within `LIVENESS` of `now` (a clock ahead of the server's counts as just seen).
    pub fn alive(&self, now: SystemTime) -> bool {
        now.duration_since(self.last_seen).unwrap_or_default() < LIVENESS
    }

    pub fn seen(&self, now: SystemTime) -> NodeSeen {
        NodeSeen { node: self.presence.node.clone(), last_seen: self.last_seen, alive: self.alive(now) }
    }
}

/// A node and when it last announced itself: `hoist node ls`, and the nodes a fleet command missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSeen {
    pub node: String,
    /// RFC 3339 in JSON.
    #[serde(with = "humantime_serde")]
    pub last_seen: SystemTime,
    /// Refreshed within the last three presence intervals.
    pub alive: bool,
}

/// Every node remembered in `HOIST_NODES`, sorted by name; entries that are not a presence are skipped.
pub async fn announced(kv: &dyn Kv) -> BackendResult<Vec<Announced>> {
    let mut nodes: Vec<Announced> = read_all(kv, NODES_BUCKET).await?.iter().filter_map(Announced::of).collect();
    nodes.sort_by(|a, b| a.presence.node.cmp(&b.presence.node));
    Ok(nodes)
}

/// What `HOIST_NODES` remembers of `node`.
pub async fn announcement(kv: &dyn Kv, node: &str) -> BackendResult<Option<Announced>> {
    Ok(kv.get(NODES_BUCKET, node).await?.as_ref().and_then(Announced::of))
}

/// Keeps this node's presence fresh, retrying soon after a failed write (the bucket may not exist
/// yet on a first start), until another install's live claim on the node name wins over this one's
/// (`keeps_node`): then returns that claim, and the caller stands by. A live claim that loses to this
/// one is overwritten; its agent sees this one's at its next refresh and stands by.
///
/// Every write is a compare-and-set against the entry just read, so a rival's claim landing between
/// the read and the write is never overwritten unseen: the write is refused and the entry read again.
pub async fn announce(kv: Arc<dyn Kv>, presence: Presence) -> Announced {
    let value = serde_json::to_vec(&presence).expect("presence serialises");
    let mut retry = Retry::default();
    let mut warned_unchecked = false;
    loop {
        let wait = match claim(&*kv, &presence, &value).await {
            Ok(Claim::Lost(other)) => return other,
            Ok(Claim::Unchecked(why)) => {
                if !std::mem::replace(&mut warned_unchecked, true) {
                    tracing::warn!(error = %why, "cannot read {NODES_BUCKET} (missing permission $JS.API.DIRECT.GET.KV_{NODES_BUCKET}.>?): this node's presence is written, but whether another machine uses its name is not checked");
                }
                retry.reset();
                crate::clock::jitter(PRESENCE_INTERVAL)
            }
            Ok(Claim::Held) => {
                retry.reset();
                // Jittered, so that the agents of a fleet started together do not refresh in lockstep.
                crate::clock::jitter(PRESENCE_INTERVAL)
            }
            Ok(Claim::Raced) => RACED_RETRY,
            Err(e) => {
                tracing::warn!(error = %e, "could not announce this node in {NODES_BUCKET}");
                retry.next_wait().min(PRESENCE_INTERVAL)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// How soon a presence write refused by a concurrent one is tried again (after reading the other).
const RACED_RETRY: Duration = Duration::from_millis(50);

/// What one presence refresh found.
#[derive(Debug)]
enum Claim {
    /// This install's presence is written.
    Held,
    /// Another writer changed the entry between the read and the write: read it again.
    Raced,
    /// Another install's live claim keeps the name.
    Lost(Announced),
    /// Written without the claim check: the entry could not be read (why), though it could be written.
    Unchecked(BackendError),
}

async fn claim(kv: &dyn Kv, presence: &Presence, value: &[u8]) -> BackendResult<Claim> {
    let entry = match kv.get(NODES_BUCKET, &presence.node).await {
        Ok(entry) => entry,
        Err(e) => {
            // A NATS user allowed to write presence but not to read it (an older permission profile):
            // announcing matters more to the fleet than the check, which needs the read.
            kv.put(NODES_BUCKET, &presence.node, value).await?;
            return Ok(Claim::Unchecked(e));
        }
    };
    let now = SystemTime::now();
    let rival = entry.as_ref().and_then(Announced::of).filter(|a| a.presence.instance != presence.instance && a.alive(now));
    if let Some(other) = rival {
        if !keeps_node(presence, &other.presence) {
            return Ok(Claim::Lost(other));
        }
        tracing::warn!(
            node = %presence.node,
            other = other.presence.instance.as_deref().unwrap_or("?"),
            "another machine announces this node name too; this agent took it first and keeps it, the other stands by"
        );
    }
    match kv.update(NODES_BUCKET, &presence.node, value, entry.map(|e| e.revision)).await {
        Ok(_) => Ok(Claim::Held),
        Err(BackendError::Conflict { .. }) => Ok(Claim::Raced),
        Err(e) => Err(e),
    }
}

/// The live presence of `presence.node` written by another install than `presence`'s.
pub async fn claimed_elsewhere(kv: &dyn Kv, presence: &Presence) -> BackendResult<Option<Announced>> {
    let now = SystemTime::now();
    Ok(announcement(kv, &presence.node).await?.filter(|a| a.presence.instance != presence.instance && a.alive(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_of_older_agents_still_read_and_missing_nodes_carry_a_readable_time() {
        let old: Presence = serde_json::from_str(r#"{"node":"n1","facts":{}}"#).unwrap();
        assert_eq!(old.instance, None);
        let entry = KvEntry {
            bucket: NODES_BUCKET.into(),
            key: "n1".into(),
            value: serde_json::to_vec(&old).unwrap(),
            revision: 1,
            operation: crate::backend::KvOperation::Put,
            created_ms: 1_780_000_000_000,
        };
        let announced = Announced::of(&entry).unwrap();
        let now = announced.last_seen + LIVENESS;
        assert!(announced.alive(now - Duration::from_secs(1)) && !announced.alive(now));
        assert_eq!(
            serde_json::to_value(announced.seen(now)).unwrap(),
            serde_json::json!({"node": "n1", "last_seen": "2026-05-28T20:26:40Z", "alive": false})
        );
    }

    fn claim(instance: Option<&str>, since_ms: Option<u64>) -> Presence {
        let instance = instance.map(str::to_string);
        Presence { node: "n1".into(), facts: serde_json::json!({}), instance, key: None, since_ms }
    }

    #[test]
    fn of_two_claims_on_one_name_exactly_one_keeps_it() {
        let cases = [
            // (a, b, a keeps)
            (claim(Some("a"), Some(100)), claim(Some("b"), Some(200)), true),
            (claim(Some("b"), Some(100)), claim(Some("a"), Some(200)), true),
            (claim(Some("a"), Some(300)), claim(Some("b"), Some(200)), false),
            // Same millisecond: the smaller instance id.
            (claim(Some("a"), Some(100)), claim(Some("b"), Some(100)), true),
            // An agent that predates the check never stands by, so it keeps the name.
            (claim(Some("a"), Some(100)), claim(None, None), false),
            (claim(Some("a"), Some(100)), claim(Some("b"), None), false),
        ];
        for (a, b, a_keeps) in cases {
            assert_eq!(keeps_node(&a, &b), a_keeps, "{a:?} against {b:?}");
            assert_eq!(keeps_node(&b, &a), !a_keeps, "both sides decide alike: {b:?} against {a:?}");
        }
    }
}
