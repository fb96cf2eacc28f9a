//! Every agent's part in fleet-degraded mode: every `LOOK_EVERY` a few nodes (drawn, about
//! `EVALUATORS` per look across the fleet) read a container's status records and its degraded record
//! and take `next_step` by compare-and-set. Exactly one node wins each change, and only the winner
//! publishes the fleet's event, so a fleet of thousands says `degraded` once. No leader: a node that
//! dies leaves the looking to the others, and a node that cannot reach the store decides nothing.

use super::{DegradedPolicy, FleetDegraded, Step, degraded_key, may_change, next_step};
use crate::agent::AgentHandle;
use crate::backend::{BackendError, HOIST_BUCKET, Kv, KvOperation, TransitionEvent, tag_key};
use crate::clock::{chance, jitter};
use crate::machine::uuid_v4;
use crate::outbox::Outbox;
use crate::release::{self, ReleaseState};
use crate::rollout_status::{self, STATUS_BUCKET, store_now};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const LOOK_EVERY: Duration = Duration::from_secs(3);

/// How many nodes, on average, look at a container each time: enough that one dying is made up
/// for at once, few enough that a large fleet does not read every record thousands of times.
const EVALUATORS: f64 = 3.0;

/// Runs until the agent ends. Errors (an unreachable store) wait for the next look.
pub async fn keep_watch(kv: Arc<dyn Kv>, agent: AgentHandle, outbox: Outbox, policy: DegradedPolicy) {
    let node = agent.node().to_string();
    // Per container: how many records the last look read, for the draw.
    let mut fleet: HashMap<String, usize> = HashMap::new();
    loop {
        let drawn: Vec<String> = agent
            .status(None)
            .await
            .machines
            .into_iter()
            .map(|m| m.container)
            .filter(|c| chance(EVALUATORS / fleet.get(c).copied().unwrap_or(1).max(1) as f64))
            .collect();
        // One read of the status bucket serves every container drawn.
        let statuses = match drawn.is_empty() {
            true => Ok(Vec::new()),
            false => crate::backend::read_all_if_any(&*kv, STATUS_BUCKET).await,
        };
        match statuses {
            Ok(statuses) => {
                let mut records = rollout_status::records_by_container(&statuses);
                for container in drawn {
                    let records = records.remove(&container).unwrap_or_default();
                    match look(&*kv, &node, &container, records, &policy, &outbox).await {
                        Ok(counted) => {
                            fleet.insert(container, counted);
                        }
                        Err(e) => tracing::debug!(%container, error = %e, "fleet health not looked at; next look"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "fleet health not looked at; next look"),
        }
        tokio::time::sleep(jitter(LOOK_EVERY)).await;
    }
}

/// One look at `container`, given its status records; the number of records it counted.
async fn look(
    kv: &dyn Kv,
    node: &str,
    container: &str,
    records: Vec<crate::rollout_status::NodeRollout>,
    policy: &DegradedPolicy,
    outbox: &Outbox,
) -> Result<usize, BackendError> {
    let (current, revision) = match kv.get(HOIST_BUCKET, &degraded_key(container)).await? {
        Some(entry) => (parse(&entry.value), Some(entry.revision)),
        None => (None, None),
    };
    if !may_change(current.as_ref(), &records, policy) {
        return Ok(records.len());
    }
    // A release rolling that the fleet follows (a tag put after it supersedes it). A record that
    // does not parse is no release, as the machines read it.
    let record = kv.get(HOIST_BUCKET, &release::release_key(container)).await?.and_then(|e| release::parse(&e).ok());
    let tag = kv.get(HOIST_BUCKET, &tag_key(container)).await?.filter(|e| e.operation == KvOperation::Put);
    let rolling = release::governing(tag.as_ref(), record.as_ref()).is_some_and(|r| r.state == ReleaseState::Rolling);
    let Some(now_ms) = store_now(kv, node).await? else { return Ok(records.len()) };
    let by = format!("hoist@{node}");
    let (record, event) = match next_step(container, current.as_ref(), &records, rolling, policy, now_ms, &by) {
        Step::Stay => return Ok(records.len()),
        Step::Enter(r) => {
            let event = ("degraded", "HEALTHY", "DEGRADED", r.describe());
            (r, Some(event))
        }
        Step::Update(r) => (r, None),
        Step::Clear(r) => {
            let event = ("recovered", "DEGRADED", "HEALTHY", r.describe_cleared());
            (r, Some(event))
        }
    };
    let value = serde_json::to_vec(&record).expect("records serialise");
    match kv.update(HOIST_BUCKET, &degraded_key(container), &value, revision).await {
        Ok(_) => {}
        // Another node wrote first; the next look reads what it wrote.
        Err(BackendError::Conflict { .. }) => return Ok(records.len()),
        Err(e) => return Err(e),
    }
    if let Some((transition, from, to, detail)) = event {
        tracing::warn!(%container, %detail, "fleet health changed");
        let event = TransitionEvent::now(node, &uuid_v4(), &format!("hoist_{container}"), transition, from, to);
        outbox.send(TransitionEvent { detail: Some(detail), ..event });
    }
    Ok(records.len())
}

/// The fleet's verdict on `container` while it is degraded.
pub async fn active(kv: &dyn Kv, container: &str) -> Result<Option<FleetDegraded>, BackendError> {
    Ok(kv.get(HOIST_BUCKET, &degraded_key(container)).await?.and_then(|e| parse(&e.value)).filter(|r| r.active))
}

/// A record that does not parse is treated as none (and written over by the next verdict).
pub fn parse(value: &[u8]) -> Option<FleetDegraded> {
    serde_json::from_slice(value).map_err(|e| tracing::warn!(error = %e, "ignored a degraded record that does not parse")).ok()
}
