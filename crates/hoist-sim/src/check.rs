//! The end of a run: once the faults are over, every node must settle within a bound — its machine
//! in RUN on the new version (or, for a broken one, back on the old version with the rollback
//! recorded), exactly one container of it running, and no governor slot left held by anyone. The
//! invariants that can break at any moment are checked where they happen (`engine.rs`).

use crate::fleet::{CONTAINER, DEGRADED, GOVERNOR, HEALTHY_DEADLINE, IMAGE, Node};
use crate::plan::{Fault, Plan, V2_DIGEST};
use crate::world::World;
use hoist_core::backend::HOIST_BUCKET;
use hoist_core::fsm::State;
use hoist_core::release::{self, ReleaseState, WaveSize};
use hoist_core::rollback_mark::{RollbackMark, rollback_key};
use hoist_core::runtime::RunState;
use std::sync::Arc;
use std::time::Duration;

const LOOK_EVERY: Duration = Duration::from_secs(5);

/// Waits until every node has settled, or records why not once `within` has passed.
/// `may_roll_back`: a fault could have killed a container of the new version in its gate; otherwise
/// a good version must reach every node, whatever else went wrong (an outage is no bad release).
pub async fn settles(world: &World, nodes: &[Arc<Node>], plan: &Plan, may_roll_back: bool, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let problems = unsettled(world, nodes, plan, may_roll_back).await;
        if problems.is_empty() {
            world.note("every node settled");
            release_ended_as_it_should(world, plan, may_roll_back);
            return rollbacks_were_the_containers(world);
        }
        if tokio::time::Instant::now() >= deadline {
            world.violation(format!("not settled {within:?} after the last fault: {}", problems.join("; ")));
            return;
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// The release record's state, when the fleet follows one last.
fn release_state(world: &World, plan: &Plan) -> Option<ReleaseState> {
    if !plan.released_last() {
        return None;
    }
    let entry = world.get(HOIST_BUCKET, &release::release_key(CONTAINER)).ok()??;
    release::parse(&entry).ok().map(|r| r.state)
}

/// What keeps each node from having settled; empty when all have.
async fn unsettled(world: &World, nodes: &[Arc<Node>], plan: &Plan, may_roll_back: bool) -> Vec<String> {
    let (broken, final_tag) = (plan.broken, plan.final_tag());
    let tagged = |tag: &str| format!("{IMAGE}:{tag}");
    // v2 is the one version that may be broken.
    let final_broken = broken && final_tag == "v2";
    let mut problems = Vec::new();
    // What the fleet must end on: the last tag, or what became of the release.
    let (expected, aborted) = match release_state(world, plan) {
        None if plan.released_last() => return vec!["no readable release record".into()],
        None => (tagged(final_tag), false),
        Some(ReleaseState::Rolling) => return vec!["the release is still rolling".into()],
        Some(ReleaseState::Complete) => (format!("{IMAGE}@{V2_DIGEST}"), false),
        Some(ReleaseState::Aborted) => (tagged("v1"), true),
    };
    for node in nodes {
        let name = &node.name;
        let Some(agent) = node.agent() else {
            problems.push(format!("{name}: no agent runs"));
            continue;
        };
        let status = agent.status(None).await;
        let Some(m) = status.machines.iter().find(|m| m.container == CONTAINER) else {
            problems.push(format!("{name}: no machine for {CONTAINER}"));
            continue;
        };
        let containers = node.engine.containers_of(CONTAINER);
        let running: Vec<_> = containers.iter().filter(|c| c.state == RunState::Running).collect();
        let describe = || {
            format!(
                "{name}: {} {:?} activity {:?} error {:?}, containers {:?}",
                m.state,
                m.image,
                m.activity,
                m.last_error,
                containers.iter().map(|c| (&c.id, &c.image, c.state)).collect::<Vec<_>>()
            )
        };
        // A node settles on the version the KV asks for last, or back on a good one with the
        // rollback recorded (its own, or the fleet's mark): a broken version must end there, and a
        // good one may, when a fault killed its container in the gate on some node (the rollout then
        // stops where it is).
        let on = |image: &str| m.state == State::Run && containers.len() == 1 && running.len() == 1 && running[0].image == image;
        let on_a_good_one = ["v1", "v2", "v3"].into_iter().any(|tag| !(broken && tag == "v2") && on(&tagged(tag)))
            || (!broken && on(&format!("{IMAGE}@{V2_DIGEST}")));
        let back = (final_broken || may_roll_back) && on_a_good_one && m.condition.is_some();
        // An aborted release brings every node back to what it ran before, condition or not.
        let settled = (!final_broken && on(&expected)) || (aborted && on(&expected)) || back;
        if !settled {
            problems.push(describe());
        }
    }
    match world.view_governor(GOVERNOR) {
        Ok(g) if !g.leases.is_empty() => problems.push(format!("governor {GOVERNOR} still holds {:?}", g.leases)),
        _ => {}
    }
    problems
}

/// A rollback, here or fleet-wide, is for what the container did (it died, Docker found it unhealthy,
/// it was not healthy in time), never for what happened around it: a backend or engine outage, a
/// name a superseded start left taken.
fn rollbacks_were_the_containers(world: &World) {
    let Ok(Some(entry)) = world.get(HOIST_BUCKET, &rollback_key(CONTAINER)) else { return };
    let Ok(mark) = serde_json::from_slice::<RollbackMark>(&entry.value) else {
        return world.violation(format!("unreadable rollback mark {:?}", entry.value_str()));
    };
    let the_containers = ["container died", "not healthy within", "Docker reports"].iter().any(|cause| mark.reason.starts_with(cause));
    if !the_containers {
        world.violation(format!("{} rolled {} back for a reason that is not the container's: {}", mark.node, mark.version, mark.reason));
    }
}

/// A release ends as its version deserves: a broken one aborted by its budget, a good one complete
/// unless a fault killed its containers (then the budget may have stopped it, as it should).
fn release_ended_as_it_should(world: &World, plan: &Plan, may_roll_back: bool) {
    match release_state(world, plan) {
        Some(ReleaseState::Complete) if plan.broken => world.violation("a broken release completed".into()),
        Some(ReleaseState::Aborted) if !plan.broken && !may_roll_back => {
            world.violation("a good release was aborted though no fault touched its containers".into())
        }
        _ => {}
    }
}

/// Pulls of a new version go through the update governor (capacity 1): the fetches ahead of a wave
/// too. Each fault may let one more through (a slot expired or evicted, a node cut off).
pub fn pulls_kept_to_the_update_governor(world: &World, plan: &Plan) {
    let allowed = 1 + plan.faults.len() as u32;
    let most = world.most_pulls_at_once();
    if most > allowed {
        world.violation(format!(
            "{most} pulls of a new version at once, more than the update governor's 1 and {} fault(s) allow",
            plan.faults.len()
        ));
    }
}

/// A broken version is tried by no more nodes than the restart governor lets through at once, plus
/// one for each fault that can let another through (a slot expired, evicted or added, a node cut off
/// remediating without one, an agent that lost its state): the first rollback stops the rest. A
/// release in waves is tried only by its first wave (within its budget). Nor is it fetched by more:
/// not ahead of a wave, while the wave before has not come through.
pub fn few_tried_the_broken_version(world: &World, plan: &Plan) {
    // Slots that expire before an update is through limit nothing (Choria's semantics; the agent
    // warns of such a governor): then any number may try.
    if plan.expire < HEALTHY_DEADLINE {
        return;
    }
    let capacity =
        plan.faults.iter().filter_map(|t| if let Fault::Capacity { to } = t.fault { Some(to) } else { None }).fold(plan.capacity, u64::max);
    let through = match plan.release.as_ref().filter(|_| plan.released_last()) {
        // With no budget the first failure stops the release in its first wave; a budget lets that
        // many failures through to later waves.
        Some(r) if r.budget == 0 => {
            let first_wave = match r.waves.first() {
                Some(WaveSize::Nodes(n)) => *n,
                _ => plan.nodes,
            };
            first_wave.min(capacity as usize)
        }
        Some(r) => r.budget + capacity as usize,
        None => capacity as usize,
    };
    let allowed = through + plan.faults.len();
    let tried = world.nodes_that_tried_broken();
    if tried.len() > allowed {
        world.violation(format!(
            "{} nodes tried the broken version ({tried:?}), more than the {allowed} the governor and the faults allow",
            tried.len()
        ));
    }
    // A budget lets failures through to later waves, and those fetch ahead once a wave is through.
    let fetched = world.nodes_that_fetched_broken();
    if plan.release.as_ref().is_none_or(|r| r.budget == 0) && fetched.len() > allowed {
        world.violation(format!(
            "{} nodes fetched the broken version ({fetched:?}), more than the {allowed} that may try it",
            fetched.len()
        ));
    }
}

/// Fleet-degraded mode is for a shared outage: never entered without one (the rollout of a broken
/// version and the faults of single nodes are none), always entered during one of at least
/// `min_nodes` nodes (`outage`: when it began and how long it lasted, once the fleet had settled),
/// and cleared within a window and a minute of its end.
pub async fn degraded_only_for_a_shared_outage(world: &World, plan: &Plan, outage: Option<(Duration, Duration)>, window: Duration) {
    let entered = |from: Duration, to: Duration| world.degraded_changes().iter().any(|(t, active)| *active && (from..=to).contains(t));
    let began = outage.map_or(crate::elapsed(), |(began, _)| began);
    if let Some((t, _)) = world.degraded_changes().iter().find(|(t, active)| *active && *t < began) {
        world.violation(format!("the fleet entered degraded mode at {t:?} with no shared outage"));
    }
    if let Some((began, lasts)) = outage
        && plan.nodes >= DEGRADED.min_nodes
        && !entered(began, began + lasts)
    {
        world.violation(format!("a shared outage of all {} nodes from {began:?} for {lasts:?} was not taken for one", plan.nodes));
    }
    let deadline = tokio::time::Instant::now() + window + Duration::from_secs(60);
    while world.degraded_changes().last().is_some_and(|(_, active)| *active) {
        if tokio::time::Instant::now() >= deadline {
            return world.violation(format!("the fleet was still degraded {:?} after the outage ended", window + Duration::from_secs(60)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
