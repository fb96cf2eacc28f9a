//! Fleet-wide commands: one request scattered to every agent, answers gathered until a deadline or
//! until every node expected has answered. Agents announce themselves in the `HOIST_NODES` bucket (a
//! heartbeat with a TTL), which is how the caller knows who *should* answer and can name who did not.
//! The transport is a `Fleet` implementation (NATS request/reply in `hoist-nats`).

use crate::agent::AgentHandle;
use crate::backend::{BackendResult, BucketConfig, Kv, read_all};
use crate::fsm::{State, Transition};
use crate::status::NodeStatus;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Where agents announce themselves: key = node, value = `Presence`.
pub const NODES_BUCKET: &str = "HOIST_NODES";

/// How often an agent refreshes its presence; it vanishes after three missed refreshes.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(10);

pub fn nodes_bucket() -> BucketConfig {
    BucketConfig { history: 1, ttl: Some(PRESENCE_INTERVAL * 3), replicas: 1 }
}

/// An agent's announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub node: String,
    pub facts: serde_json::Value,
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
    /// Nodes that announced themselves and match the filter but did not answer in time.
    pub missing: Vec<String>,
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
/// themselves and match the filter, did not.
pub async fn ask(fleet: &dyn Fleet, kv: &dyn Kv, request: &FleetRequest, deadline: Duration) -> BackendResult<FleetAnswer> {
    let mut expected = BTreeSet::new();
    for entry in read_all(kv, NODES_BUCKET).await.unwrap_or_default() {
        if let Ok(p) = serde_json::from_slice::<Presence>(&entry.value)
            && request.filter.matches_node(&p.node, &p.facts)
        {
            expected.insert(p.node);
        }
    }
    let mut replies = fleet.gather(request, &expected, deadline).await?;
    replies.sort_by(|a, b| a.node.cmp(&b.node));
    let answered: BTreeSet<&str> = replies.iter().map(|r| r.node.as_str()).collect();
    let missing = expected.iter().filter(|n| !answered.contains(n.as_str())).cloned().collect();
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
    fn requests_have_a_stable_wire_shape() {
        let r = FleetRequest { filter: Filter::default(), operation: Operation::Transition { transition: Transition::Restart } };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"filter": {"nodes": [], "containers": [], "facts": []}, "op": "transition", "transition": "restart"})
        );
    }
}
