//! One fleet-wide rollout in the fleet simulator, measured against its ideal and plotted by phase. The
//! phases come from what the simulated engines did (`EngineStep`), not from what the agents report:
//! a node waits (still serving the old version, for its wave or a slot), is down (its old container
//! stopped), is in its gate (the new one started, not yet healthy), or serves the new version.

use super::runtime::{EngineDid, EngineStep, Latencies};
use super::{CONTAINER, GOVERNOR, IMAGE, patiently};
use crate::report::{Row, Series, write_plot};
use hoist_core::agent::AgentHandle;
use hoist_core::backend::{Governor, HOIST_BUCKET, Kv, tag_key};
use hoist_core::fsm::State;
use hoist_core::release::{self, Policy, ReleaseRecord, ReleaseState, WaveSize};
use hoist_nats::NatsBackend;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How the fleet is moved to the new version.
#[derive(Debug, Clone)]
pub enum Kind {
    /// `choria kv put HOIST container/web/tag vN`, the seed's way.
    Tag,
    /// `hoist release web vN --waves … --bake …`: a release record, pinned to a digest.
    Release { waves: Vec<WaveSize>, bake: Duration },
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Waiting,
    Down,
    Gate,
    Serving,
}

const PHASES: [Phase; 4] = [Phase::Waiting, Phase::Down, Phase::Gate, Phase::Serving];

pub struct Fleet<'a> {
    pub observer: &'a NatsBackend,
    pub handles: &'a [AgentHandle],
    pub engine: &'a mut mpsc::UnboundedReceiver<EngineStep>,
    pub latencies: Latencies,
}

pub async fn rollout(scenario: &str, fleet: &mut Fleet<'_>, kind: &Kind, capacity: u64, version: u32) -> anyhow::Result<Vec<Row>> {
    let n = fleet.handles.len();
    let lat = fleet.latencies;
    let tag = format!("v{version}");
    // A fresh governor per run so no lease of the previous run counts against this capacity.
    if patiently("listing governors", || fleet.observer.list()).await?.iter().any(|g| g == GOVERNOR) {
        patiently("removing the governor", || fleet.observer.remove(GOVERNOR)).await?;
    }
    patiently("adding the governor", || fleet.observer.add(GOVERNOR, capacity, Duration::from_secs(600), 1)).await?;
    while fleet.engine.try_recv().is_ok() {}

    let slot = lat.start + lat.health;
    // Each wave adds nodes; its rounds are ceil(added / c). A tag put is one wave of everyone.
    let (policy, ideal) = match kind {
        Kind::Tag => (None, lat.pull + slot * n.div_ceil(capacity as usize) as u32),
        Kind::Release { waves, bake } => {
            let policy = Policy { waves: waves.clone(), bake: *bake, ..Policy::default() };
            let ends = policy.wave_ends(n);
            let rounds: usize =
                ends.iter().scan(0, |before, &end| Some((end - std::mem::replace(before, end)).div_ceil(capacity as usize))).sum();
            let bakes = ends.len().saturating_sub(1) as u32;
            // Only the first wave pulls in the ideal: the others fetch ahead while the one before bakes.
            (Some(policy), lat.pull + slot * rounds as u32 + *bake * bakes)
        }
    };
    let limit = ideal * 5 + Duration::from_secs(60);
    let what = match kind {
        Kind::Tag => format!("tag {tag}"),
        Kind::Release { waves, bake } => format!("release of {tag} in waves {waves:?}, bake {bake:?}"),
    };
    eprintln!("simulator: N={n} capacity {capacity}: {what}, ideal {ideal:?}");
    let t0 = Instant::now();
    let target = match &policy {
        None => {
            let key = tag_key(CONTAINER);
            patiently("putting the tag", || fleet.observer.put(HOIST_BUCKET, &key, tag.as_bytes())).await?;
            format!("{IMAGE}:{tag}")
        }
        Some(policy) => {
            let record = patiently("writing the release", || release_of(fleet.observer, &tag, version, policy.clone())).await?;
            format!("{IMAGE}@{}", record.digest)
        }
    };

    let mut phase: HashMap<String, Phase> = HashMap::new();
    let mut count: BTreeMap<Phase, usize> = PHASES.iter().map(|&p| (p, 0)).collect();
    count.insert(Phase::Waiting, n);
    let mut series: Vec<Vec<(f64, f64)>> = PHASES.iter().map(|p| vec![(0.0, count[p] as f64)]).collect();
    let mut most_replacing = 0;
    while count[&Phase::Serving] < n {
        let remaining = limit.saturating_sub(t0.elapsed());
        let Ok(Some(step)) = tokio::time::timeout(remaining, fleet.engine.recv()).await else {
            anyhow::bail!(
                "{what} at capacity {capacity}: {}/{n} nodes on it after {limit:?}; {}",
                count[&Phase::Serving],
                stuck(fleet.handles, &target).await
            );
        };
        let before = *phase.get(&step.node).unwrap_or(&Phase::Waiting);
        let after = match (step.did, step.image == target) {
            (EngineDid::Stopped, false) => Phase::Down,
            (EngineDid::Started, true) => Phase::Gate,
            (EngineDid::Healthy, true) => Phase::Serving,
            _ => before,
        };
        if after == before {
            continue;
        }
        phase.insert(step.node, after);
        *count.get_mut(&before).expect("every phase counted") -= 1;
        *count.get_mut(&after).expect("every phase counted") += 1;
        most_replacing = most_replacing.max(count[&Phase::Down] + count[&Phase::Gate]);
        let t = t0.elapsed().as_secs_f64();
        for (s, p) in series.iter_mut().zip(PHASES) {
            s.push((t, count[&p] as f64));
        }
    }
    let total = t0.elapsed();
    let overhead = (total.as_secs_f64() / ideal.as_secs_f64() - 1.0) * 100.0;

    let name = match kind {
        Kind::Tag => format!("rollout-n{n}-c{capacity}"),
        Kind::Release { .. } => format!("release-n{n}-c{capacity}"),
    };
    let dir = PathBuf::from("target/hoist-bench");
    let colours = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c"];
    let labels = [format!("waiting (serving v{})", version - 1), "down".into(), "in the gate".into(), format!("serving {tag}")];
    write_plot(
        &dir.join(format!("{name}.csv")),
        &dir.join(format!("{name}.svg")),
        &format!("simulator: {n} agents, {what}, restart governor capacity {capacity}"),
        &series.into_iter().zip(labels).zip(colours).map(|((points, name), colour)| Series { name, colour, points }).collect::<Vec<_>>(),
    )?;
    let label = match kind {
        Kind::Tag => format!("rollout c={capacity}"),
        Kind::Release { .. } => format!("release c={capacity}"),
    };
    // DESIGN.md §7 asks ≤ 5 % at capacity 50; smaller capacities keep the older, looser bar.
    let bar = if capacity >= 50 { 5.0 } else { 20.0 };
    Ok(vec![
        Row::info(
            scenario,
            &format!("{label}: total"),
            total.as_secs_f64(),
            "s",
            format!("ideal {:.1}s; plot target/hoist-bench/{name}.svg", ideal.as_secs_f64()),
        ),
        Row::at_most(scenario, &format!("{label}: overhead over ideal"), overhead, "%", bar, ""),
        Row::at_most(
            scenario,
            &format!("{label}: most nodes down or in their gate at once"),
            most_replacing as f64,
            "nodes",
            capacity as f64,
            "the governor's capacity",
        ),
    ])
}

/// Writes a release record as `hoist release` does: the digest of `tag`, the plan over the nodes that
/// report running the container.
async fn release_of(observer: &NatsBackend, tag: &str, version: u32, policy: Policy) -> anyhow::Result<ReleaseRecord> {
    let previous = observer.get(HOIST_BUCKET, &tag_key(CONTAINER)).await?;
    let last = observer.get(HOIST_BUCKET, &release::release_key(CONTAINER)).await?.map(|e| e.revision);
    let id = hoist_core::machine::uuid_v4();
    let nodes = release::running(observer, CONTAINER).await?;
    let record = ReleaseRecord {
        id: id.clone(),
        container: CONTAINER.into(),
        image: IMAGE.into(),
        tag: tag.into(),
        // The simulated registry's digest of vN.
        digest: format!("sha256:{version:064x}"),
        previous: previous.as_ref().map(|e| e.value_str()),
        previous_digest: None,
        tag_revision: previous.map(|e| e.revision),
        policy,
        plan: Some(release::waves::plan_for(&nodes, &id)),
        wave: 0,
        through: None,
        state: ReleaseState::Rolling,
        reason: None,
        by: "hoist-bench@simulator".into(),
        at_ms: hoist_core::clock::unix_now_ms(),
    };
    release::publish(observer, &record, last).await?;
    Ok(record)
}

/// What the nodes not yet on `target` are doing, by how many: why a rollout did not finish.
async fn stuck(handles: &[AgentHandle], target: &str) -> String {
    let mut why: BTreeMap<String, usize> = BTreeMap::new();
    for status in futures_util::future::join_all(handles.iter().map(|h| h.status(None))).await {
        for m in status.machines.iter().filter(|m| m.image.as_deref() != Some(target) || m.state != State::Run) {
            *why.entry(format!("{} on {} (desired {}): {}", m.state, m.version, m.desired_image, m.note())).or_default() += 1;
        }
    }
    why.iter().map(|(what, count)| format!("{count} × {what}")).collect::<Vec<_>>().join("; ")
}
