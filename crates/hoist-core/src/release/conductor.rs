//! Every agent's part in its containers' releases, each look (every `LOOK_EVERY`): record its own
//! outcome once it has one, then take the release's next step (`waves::next_step`) if it is due. All
//! nodes run the same rule; the record's compare-and-set lets exactly one of them take each step, and
//! a node that dies mid-release leaves the steps to the others.

use super::waves::{self, Seen, Step};
use super::{OUTCOMES_BUCKET, Outcome, ReleaseError, ReleaseRecord, ReleaseState, current, outcome_key, write};
use crate::agent::AgentHandle;
use crate::backend::{Kv, read_all};
use crate::clock::unix_now_ms;
use crate::fsm::State;
use crate::rollout_status::store_now;
use crate::status::MachineStatus;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const LOOK_EVERY: Duration = Duration::from_secs(2);

/// How many nodes, on average, evaluate a release's next step at each look: enough that one dying is
/// made up for within a look or two, few enough that a fleet of thousands does not read every outcome
/// thousands of times every look. Each node draws for itself; the step, once due, is taken within a
/// few looks by whoever drew.
const EVALUATORS: f64 = 3.0;

/// How often the agent's own machines are looked at (in process, no store read): a machine that
/// has just passed its gate or rolled back has its outcome recorded within this, not a whole look
/// later, and the wave it finishes bakes from then.
const WATCH_LOCALLY: Duration = Duration::from_millis(250);

/// Runs until the agent ends. Errors (an unreachable store) wait for the next look.
pub async fn conduct(kv: Arc<dyn Kv>, agent: AgentHandle) {
    let node = agent.node().to_string();
    // What this node last recorded per container, so an outcome is written once.
    let mut reported: HashMap<String, Outcome> = HashMap::new();
    // Per container: what its machine looked like at the last look, and when that look was.
    let mut looked: HashMap<String, (MachineShape, tokio::time::Instant)> = HashMap::new();
    loop {
        for m in agent.status(None).await.machines {
            let now = (m.state, m.version.clone(), m.bad_version.clone());
            let due = looked.get(&m.container).is_none_or(|(before, at)| *before != now || at.elapsed() >= LOOK_EVERY);
            if !due {
                continue;
            }
            looked.insert(m.container.clone(), (now, tokio::time::Instant::now()));
            if let Err(e) = look(&*kv, &node, &m, &mut reported).await {
                tracing::debug!(container = %m.container, error = %e, "release step not taken; next look");
            }
        }
        tokio::time::sleep(WATCH_LOCALLY).await;
    }
}

/// What of a machine can change its outcome: its state, the version it runs, a version rolled back.
type MachineShape = (State, String, Option<String>);

async fn look(kv: &dyn Kv, node: &str, m: &MachineStatus, reported: &mut HashMap<String, Outcome>) -> Result<(), ReleaseError> {
    let Some((record, revision)) = current(kv, &m.container).await? else { return Ok(()) };
    if record.state != ReleaseState::Rolling {
        return Ok(());
    }
    if record.includes(node)
        && let Some(outcome) = outcome_of(&record, node, m)
        && reported.get(&m.container) != Some(&outcome)
    {
        let value = serde_json::to_vec(&outcome).expect("outcomes serialise");
        kv.put(OUTCOMES_BUCKET, &outcome_key(&m.container, node), &value).await?;
        tracing::info!(container = %m.container, release = %record.id, ok = outcome.ok, "recorded this node's outcome of the release");
        reported.insert(m.container.clone(), outcome);
    }
    let planned = record.plan.as_ref().map_or(1, Vec::len).max(1);
    if !crate::clock::chance(EVALUATORS / planned as f64) {
        return Ok(());
    }
    let seen = outcomes(kv, &record).await?;
    let Some(now_ms) = store_now(kv, node).await? else { return Ok(()) };
    let step = waves::next_step(&record.policy, record.plan.as_deref(), record.wave, &seen, now_ms);
    if matches!(step, Step::Plan | Step::Advance) && crate::degraded::lookout::active(kv, &m.container).await?.is_some() {
        // A shared outage would fail the next wave for no fault of the release.
        tracing::debug!(container = %m.container, release = %record.id, "no new wave while the fleet is degraded");
        return Ok(());
    }
    let next = match step {
        Step::Wait(_) => return Ok(()),
        // Marked once per wave, so the next wave's nodes fetch the image while it bakes.
        Step::Baking(_) if record.through == Some(record.wave) => return Ok(()),
        Step::Baking(_) => ReleaseRecord { through: Some(record.wave), ..record },
        Step::Plan => ReleaseRecord { plan: Some(waves::plan_for(&running(kv, &m.container, node).await?, &record.id)), ..record },
        Step::Advance => ReleaseRecord { wave: record.wave + 1, ..record },
        Step::Abort(reason) => ReleaseRecord { state: ReleaseState::Aborted, reason: Some(reason), ..record },
        Step::Complete => ReleaseRecord { state: ReleaseState::Complete, reason: Some("every wave healthy".into()), ..record },
    };
    let next = ReleaseRecord { by: format!("hoist@{node}"), at_ms: unix_now_ms(), ..next };
    match write(kv, &next, Some(revision)).await {
        Ok(_) => {
            tracing::info!(container = %m.container, release = %next.id, wave = next.wave + 1, state = ?next.state, reason = ?next.reason, "took the release's next step");
            Ok(())
        }
        // Another node took this step first; the next look reads what it wrote.
        Err(ReleaseError::Raced(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// This node's outcome of `record`, once it has one: failed (its gate rolled the digest back) or ok
/// (serving it in RUN: it passed its gate). A condition from before (a crash of the old version, a
/// machine the supervisor restarted) says nothing about the release.
fn outcome_of(record: &ReleaseRecord, node: &str, m: &MachineStatus) -> Option<Outcome> {
    let outcome = |ok: bool, reason: Option<String>| Outcome { release: record.id.clone(), node: node.into(), ok, reason };
    if m.bad_version.as_deref() == Some(record.digest.as_str()) {
        return Some(outcome(false, m.last_error.clone()));
    }
    (m.state == State::Run && m.version == record.digest).then(|| outcome(true, None))
}

/// The outcomes recorded for this release (an earlier release's do not count), by the store's clock.
async fn outcomes(kv: &dyn Kv, record: &ReleaseRecord) -> Result<Vec<Seen>, ReleaseError> {
    let prefix = format!("{}.", record.container);
    Ok(read_all(kv, OUTCOMES_BUCKET)
        .await?
        .into_iter()
        .filter(|e| e.key.starts_with(&prefix))
        .filter_map(|e| {
            let o: Outcome = serde_json::from_slice(&e.value).ok()?;
            (o.release == record.id).then_some(Seen { node: o.node, ok: o.ok, at_ms: e.created_ms })
        })
        .collect())
}

/// The nodes running `container` now (their status records), this one included: whom the plan orders.
async fn running(kv: &dyn Kv, container: &str, node: &str) -> Result<Vec<String>, ReleaseError> {
    let mut nodes = super::running(kv, container).await?;
    nodes.push(node.to_string());
    Ok(nodes)
}
