//! Fleet-wide commands: one request scattered to every agent, answers gathered until a deadline or
//! until every node expected has answered. Who *should* answer is what agents announce of themselves
//! (`presence`), so the caller can name who did not.
//! The transport is a `Fleet` implementation (NATS request/reply in `hoist-nats`).

use crate::agent::AgentHandle;
use crate::backend::{BackendResult, Kv};
use crate::fleet_auth::{AuditEvent, Authority, KeyPair, ReplyClaims, RequestClaims, Sealed, Untrusted};
use crate::fsm::{State, Transition};
use crate::presence::{Announced, NodeSeen, announced};
use crate::status::NodeStatus;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

impl Operation {
    /// Each kind has its own subject, so NATS permissions can let a reader ask for status only.
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::Status => "status",
            Operation::Transition { .. } => "transition",
        }
    }

    /// For messages (`operator bob may not …`): `ask for status`, `restart`…
    pub fn describe(&self) -> String {
        match self {
            Operation::Status => "ask for status".into(),
            Operation::Transition { transition } => transition.to_string(),
        }
    }
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
    /// Why the node did not act on the request (unsigned, key not listed, not allowed, stale, replayed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Everything gathered for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetAnswer {
    pub replies: Vec<FleetReply>,
    /// Nodes that announced themselves and match the filter but did not answer in time: dead ones
    /// (not `alive`) until they are forgotten or their retention ends, and live ones too slow to answer.
    pub missing: Vec<NodeSeen>,
    /// Answers not proven to come from the node they name (impostors, conflicting answers).
    #[serde(default)]
    pub untrusted: Vec<Untrusted>,
}

/// What answers a request on one node.
#[async_trait]
pub trait Responder: Send + Sync + 'static {
    /// The (signed) reply to `request`, a sealed request as it arrived on the subject for `kind`
    /// with replies to `reply_to`; None when the request does not address this node.
    async fn respond(&self, kind: &str, request: &[u8], reply_to: &str) -> Option<Vec<u8>>;
}

/// The transport.
#[async_trait]
pub trait Fleet: Send + Sync + 'static {
    /// Answers requests with `responder` until the process ends.
    async fn serve(&self, responder: Arc<dyn Responder>) -> BackendResult<()>;
    /// A fresh subject for the replies to one request (the request is signed for it).
    fn reply_subject(&self) -> String;
    /// Sends `request` on the subject for `kind` to every agent and hands each reply to `collect`
    /// until it returns true or `deadline` passes.
    async fn gather(
        &self,
        kind: &str,
        reply_to: &str,
        request: Vec<u8>,
        deadline: Duration,
        collect: &mut (dyn for<'m> FnMut(&'m [u8]) -> bool + Send),
    ) -> BackendResult<()>;
    /// Publishes the record of an accepted transition request.
    async fn audit(&self, event: &AuditEvent) -> BackendResult<()>;
}

/// Sends `request` to the fleet and reports who answered and who, of the nodes that announced
/// themselves and match the filter, did not. Only live nodes are waited for: a dead one cannot answer.
/// The request is signed with `key` when one is given.
pub async fn ask(
    fleet: &dyn Fleet,
    kv: &dyn Kv,
    request: &FleetRequest,
    key: Option<&KeyPair>,
    deadline: Duration,
) -> BackendResult<FleetAnswer> {
    let now = SystemTime::now();
    let all = announced(kv).await.unwrap_or_default();
    // Every announced node's key, to check its answer by.
    let node_keys: BTreeMap<String, Option<String>> = all.iter().map(|a| (a.presence.node.clone(), a.presence.key.clone())).collect();
    let known: Vec<&Announced> = all.iter().filter(|a| request.filter.matches_node(&a.presence.node, &a.presence.facts)).collect();
    let expected: BTreeSet<String> = known.iter().filter(|a| a.alive(now)).map(|a| a.presence.node.clone()).collect();
    let (mut replies, untrusted) = crate::fleet_auth::gather_signed(fleet, request, key, &node_keys, &expected, deadline).await?;
    replies.sort_by(|a, b| a.node.cmp(&b.node));
    let answered: BTreeSet<&str> = replies.iter().map(|r| r.node.as_str()).collect();
    let missing = known.iter().filter(|a| !answered.contains(a.presence.node.as_str())).map(|a| a.seen(now)).collect();
    Ok(FleetAnswer { replies, missing, untrusted: untrusted.into_iter().collect() })
}

/// The agent's side: checks a request, applies it to the local machines and signs the answer.
pub struct AgentResponder {
    pub agent: AgentHandle,
    pub facts: serde_json::Value,
    pub authority: Authority,
    /// The node key replies are signed with.
    pub key: KeyPair,
    /// Where accepted transitions are recorded.
    pub audit: Arc<dyn Fleet>,
}

#[async_trait]
impl Responder for AgentResponder {
    async fn respond(&self, kind: &str, request: &[u8], reply_to: &str) -> Option<Vec<u8>> {
        // Untrusted claims until `admit` has checked the signature; only the filter is looked at
        // before, so that nodes a request does not address stay silent.
        let parsed = serde_json::from_slice::<Sealed>(request)
            .and_then(|sealed| Ok((serde_json::from_str::<RequestClaims>(&sealed.claims)?, sealed)));
        let (claims, sealed) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed fleet request");
                return None;
            }
        };
        if !claims.request.filter.matches_node(self.agent.node(), &self.facts) {
            return None;
        }
        let nonce = claims.nonce.clone();
        let reply = self.act(claims, &sealed, kind, reply_to).await;
        let claims = ReplyClaims { reply, nonce, key: self.key.public_key() };
        Some(serde_json::to_vec(&Sealed::seal(&claims, Some(&self.key))).expect("replies serialise"))
    }
}

impl AgentResponder {
    async fn act(&self, claims: RequestClaims, sealed: &Sealed, kind: &str, reply_to: &str) -> FleetReply {
        let node = self.agent.node().to_string();
        let admitted = match self.authority.admit(sealed, &claims, kind, reply_to, crate::fleet_auth::now_ms()) {
            Ok(a) => a,
            Err(reason) => {
                tracing::warn!(signer = claims.signer.as_deref().unwrap_or("none"), operation = %claims.request.operation.describe(), %reason, "refused a fleet request");
                let status = NodeStatus { node: node.clone(), machines: vec![], config_error: None, warnings: vec![] };
                return FleetReply { node, status, transitions: vec![], refused: Some(reason) };
            }
        };
        let filter = &admitted.filter;
        let mut transitions = Vec::new();
        if let Operation::Transition { transition } = claims.request.operation {
            let all = self.agent.status(None).await;
            for m in all.machines.iter().filter(|m| filter.matches_container(&m.container)) {
                let result = self.agent.transition(&m.container, transition).await;
                let (state, error) = match result {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                transitions.push(TransitionOutcome { container: m.container.clone(), state, error });
            }
            let event = AuditEvent {
                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                node: node.clone(),
                caller: admitted.caller.clone(),
                operation: claims.request.operation.clone(),
                filter: filter.clone(),
                result: transitions.clone(),
            };
            tracing::info!(
                operator = %event.caller.name,
                key = event.caller.key.as_deref().unwrap_or("none"),
                operation = %event.operation.describe(),
                filter = %serde_json::to_string(&event.filter).unwrap_or_default(),
                result = %serde_json::to_string(&event.result).unwrap_or_default(),
                "audit: fleet transition accepted"
            );
            if let Err(e) = self.audit.audit(&event).await {
                tracing::warn!(error = %e, "could not publish the audit event of a fleet transition");
            }
        } else {
            tracing::debug!(operator = %admitted.caller.name, "answering a fleet status request");
        }
        let mut status = self.agent.status(None).await;
        status.machines.retain(|m| filter.matches_container(&m.container));
        FleetReply { node, status, transitions, refused: None }
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
