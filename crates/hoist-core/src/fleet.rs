//! Fleet-wide commands: one request scattered to every agent, answers gathered until a deadline or
//! until every node expected has answered. Agents announce themselves in the `HOIST_NODES` bucket (a
//! heartbeat every `PRESENCE_INTERVAL`), which is how the caller knows who *should* answer and can name
//! who did not. A node that stops refreshing is not forgotten: its entry stays for the bucket's TTL
//! (`fleet.node_retention`, days) or until an operator removes it, so a dead node is reported missing,
//! with when it was last seen, instead of silently dropping out of the fleet.
//! The transport is a `Fleet` implementation (NATS request/reply in `hoist-nats`).

use crate::agent::AgentHandle;
use crate::backend::{BackendResult, BucketConfig, Kv, KvEntry, read_all};
use crate::fsm::{State, Transition};
use crate::status::NodeStatus;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
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

/// The live announcement of `node` by an install other than `instance`, if there is one: then another
/// machine runs an agent under this node name, and two agents would fight over the same containers.
/// An announcement without an instance (an older agent) counts as another's: standing by for
/// `LIVENESS` is cheap, two agents fighting is not.
pub async fn held_elsewhere(kv: &dyn Kv, node: &str, instance: &str) -> BackendResult<Option<Announced>> {
    let now = SystemTime::now();
    Ok(announcement(kv, node).await?.filter(|a| a.presence.instance.as_deref() != Some(instance) && a.alive(now)))
}

/// Which nodes and containers a request is for; every given criterion must match. Empty = all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub containers: Vec<String>,
    /// `path=value` pairs, the path dotted as in `%{facts.networking.ip}` (without `facts.`).
    #[serde(default)]
    pub facts: Vec<(String, String)>,
}

impl Filter {
    /// Whether a node with these facts is addressed (containers are matched by the node itself).
    pub fn matches_node(&self, node: &str, facts: &serde_json::Value) -> bool {
        (self.nodes.is_empty() || self.nodes.iter().any(|n| n == node))
            && self.facts.iter().all(|(path, want)| fact(facts, path).is_some_and(|have| have == *want))
    }

    pub fn matches_container(&self, container: &str) -> bool {
        self.containers.is_empty() || self.containers.iter().any(|c| c == container)
    }
}

/// A fact as a string (`a.b.c` walks mappings); None if absent or not a scalar.
fn fact(facts: &serde_json::Value, path: &str) -> Option<String> {
    let value = path.split('.').try_fold(facts, |v, key| v.get(key))?;
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    Status,
    Transition { transition: Transition },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRequest {
    pub filter: Filter,
    #[serde(flatten)]
    pub operation: Operation,
}

/// One container's answer to a transition request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionOutcome {
    pub container: String,
    pub state: Option<State>,
    pub error: Option<String>,
}

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReply {
    pub node: String,
    /// The addressed containers' status, after the operation.
    pub status: NodeStatus,
    #[serde(default)]
    pub transitions: Vec<TransitionOutcome>,
}

/// Everything gathered for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetAnswer {
    pub replies: Vec<FleetReply>,
    /// Nodes that announced themselves and match the filter but did not answer in time: dead ones
    /// (not `alive`) until they are forgotten or their retention ends, and live ones too slow to answer.
    pub missing: Vec<NodeSeen>,
}

/// What answers a request on one node.
#[async_trait]
pub trait Responder: Send + Sync + 'static {
    /// None when the request does not address this node.
    async fn respond(&self, request: FleetRequest) -> Option<FleetReply>;
}

/// The transport.
#[async_trait]
pub trait Fleet: Send + Sync + 'static {
    /// Answers requests with `responder` until the process ends.
    async fn serve(&self, responder: Arc<dyn Responder>) -> BackendResult<()>;
    /// Sends the request to every agent and gathers replies until `deadline`, or until all of
    /// `expected` have answered.
    async fn gather(&self, request: &FleetRequest, expected: &BTreeSet<String>, deadline: Duration) -> BackendResult<Vec<FleetReply>>;
}

/// Sends `request` to the fleet and reports who answered and who, of the nodes that announced
/// themselves and match the filter, did not. Only live nodes are waited for: a dead one cannot answer.
pub async fn ask(fleet: &dyn Fleet, kv: &dyn Kv, request: &FleetRequest, deadline: Duration) -> BackendResult<FleetAnswer> {
    let now = SystemTime::now();
    let known: Vec<Announced> = announced(kv)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|a| request.filter.matches_node(&a.presence.node, &a.presence.facts))
        .collect();
    let expected: BTreeSet<String> = known.iter().filter(|a| a.alive(now)).map(|a| a.presence.node.clone()).collect();
    let mut replies = fleet.gather(request, &expected, deadline).await?;
    replies.sort_by(|a, b| a.node.cmp(&b.node));
    let answered: BTreeSet<&str> = replies.iter().map(|r| r.node.as_str()).collect();
    let missing = known.iter().filter(|a| !answered.contains(a.presence.node.as_str())).map(|a| a.seen(now)).collect();
    Ok(FleetAnswer { replies, missing })
}

/// Keeps this node's presence fresh until the task is dropped.
pub async fn announce(kv: Arc<dyn Kv>, presence: Presence) {
    let value = serde_json::to_vec(&presence).expect("presence serialises");
    loop {
        if let Err(e) = kv.put(NODES_BUCKET, &presence.node, &value).await {
            tracing::warn!(error = %e, "could not announce this node in {NODES_BUCKET}");
        }
        tokio::time::sleep(PRESENCE_INTERVAL).await;
    }
}

/// The agent's side: applies a request to the local machines.
pub struct AgentResponder {
    pub agent: AgentHandle,
    pub facts: serde_json::Value,
}

#[async_trait]
impl Responder for AgentResponder {
    async fn respond(&self, request: FleetRequest) -> Option<FleetReply> {
        let node = self.agent.node().to_string();
        if !request.filter.matches_node(&node, &self.facts) {
            return None;
        }
        let mut transitions = Vec::new();
        if let Operation::Transition { transition } = request.operation {
            let all = self.agent.status(None).await;
            for m in all.machines.iter().filter(|m| request.filter.matches_container(&m.container)) {
                let result = self.agent.transition(&m.container, transition).await;
                let (state, error) = match result {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(e)),
                };
                transitions.push(TransitionOutcome { container: m.container.clone(), state, error });
            }
        }
        let mut status = self.agent.status(None).await;
        status.machines.retain(|m| request.filter.matches_container(&m.container));
        Some(FleetReply { node, status, transitions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_nodes_by_name_and_facts() {
        let facts = serde_json::json!({"role": "web", "networking": {"ip": "10.0.0.1"}, "rack": 4});
        assert!(Filter::default().matches_node("n1", &facts));
        let by_fact = Filter { facts: vec![("role".into(), "web".into()), ("rack".into(), "4".into())], ..Filter::default() };
        assert!(by_fact.matches_node("n1", &facts));
        let nested = Filter { facts: vec![("networking.ip".into(), "10.0.0.2".into())], ..Filter::default() };
        assert!(!nested.matches_node("n1", &facts));
        let by_node = Filter { nodes: vec!["n2".into()], ..Filter::default() };
        assert!(!by_node.matches_node("n1", &facts));
        let by_container = Filter { containers: vec!["web".into()], ..Filter::default() };
        assert!(by_container.matches_container("web") && !by_container.matches_container("db"));
    }

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

    #[test]
    fn requests_have_a_stable_wire_shape() {
        let r = FleetRequest { filter: Filter::default(), operation: Operation::Transition { transition: Transition::Restart } };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"filter": {"nodes": [], "containers": [], "facts": []}, "op": "transition", "transition": "restart"})
        );
    }
}
