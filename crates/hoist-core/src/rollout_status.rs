//! Rollout status in one read: every agent keeps a small record per container in the `HOIST_STATUS`
//! bucket (key `<container>.<node>`): what it runs, what it should, its phase and what blocks it,
//! since when. The bucket's TTL removes a dead agent's records. `hoist rollout status NAME` reads the
//! bucket once and `summarize`s it: counts per phase, the blocking reasons with the nodes they hold,
//! an estimate of when the rollout ends.
//!
//! The phases keep apart what an operator checks against the governor's capacity: a node waiting for
//! its turn still serves the old version; only a node being replaced is down.

use crate::agent::AgentHandle;
use crate::backend::{BucketConfig, Kv, KvEntry};
use crate::clock::unix_now_ms;
use crate::fsm::State;
use crate::release::{Outcome, ReleaseRecord, ReleaseState, waves};
use crate::spec::version_of;
use crate::status::{Health, HealthReport, MachineStatus};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub const STATUS_BUCKET: &str = "HOIST_STATUS";

/// How often every record is written again, changed or not; changes are written within `LOOK_EVERY`.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Records outlive three missed refreshes, no more: a dead agent's drop out of the rollout's view.
pub fn status_bucket(replicas: u8) -> BucketConfig {
    BucketConfig { history: 1, ttl: Some(STATUS_REFRESH * 3), replicas }
}

pub fn status_key(container: &str, node: &str) -> String {
    format!("{container}.{node}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not on the desired version yet and still serving the one it runs: waiting for its turn (a
    /// governor slot, a pull).
    Waiting,
    /// Its container is being replaced: down.
    Down,
    /// The new container runs and is passing its health gate.
    Gate,
    /// Serving the desired version.
    Serving,
    /// Rolled back, crash-looping or otherwise failed: see `blocking`.
    Failing,
    /// Taken out by an operator (maintenance, stop).
    Maintenance,
}

impl Phase {
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting (still serving the old version)",
            Phase::Down => "down, being replaced",
            Phase::Gate => "in their health gate",
            Phase::Serving => "serving the desired version",
            Phase::Failing => "failing",
            Phase::Maintenance => "in maintenance",
        }
    }
}

/// One node's record for one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRollout {
    pub node: String,
    pub container: String,
    pub state: State,
    /// The version it runs (tag or digest).
    pub version: String,
    /// The version it should run.
    pub desired: String,
    pub phase: Phase,
    /// What keeps it from serving the desired version, when something does.
    pub blocking: Option<String>,
    /// Unix ms (the agent's clock) since when it has been in this phase.
    pub since_ms: u64,
    /// A release's version it has fetched ahead of its wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_ahead: Option<String>,
    /// Whether `version` is proven here and since when the container is unhealthy: only proven
    /// nodes' failures tell a shared outage (`degraded`) from a bad release.
    #[serde(flatten)]
    pub report: HealthReport,
}

/// The phase of a machine, and what blocks it. Decided from its status alone, the same on every node.
pub fn phase(m: &MachineStatus) -> (Phase, Option<String>) {
    let desired = desired_version(m);
    let on_desired = m.version == desired;
    let doing = || m.activity.clone();
    match m.state {
        State::Maintenance | State::Stop => (Phase::Maintenance, Some("in maintenance (an operator's stop or maintenance)".into())),
        _ if m.condition.is_some() => (Phase::Failing, m.condition.clone()),
        State::Run if on_desired => (Phase::Serving, None),
        State::Run => (Phase::Waiting, doing().or_else(|| Some("not updated yet".into()))),
        State::Update => (Phase::Waiting, doing()),
        State::Start | State::Restart if m.health == Health::Down => (Phase::Down, doing()),
        // The old container still serves while the replacement waits for its slot.
        State::Start | State::Restart if !on_desired => (Phase::Waiting, doing()),
        State::Start | State::Restart => (Phase::Gate, doing()),
    }
}

/// The tag or digest of the image the machine should run (a reference without either means `latest`).
fn desired_version(m: &MachineStatus) -> String {
    version_of(&m.desired_image).unwrap_or_else(|| "latest".into())
}

/// Keeps this agent's records in `HOIST_STATUS` current: a changed record within a second, every
/// record every `STATUS_REFRESH`. Write failures are retried at the next look; nothing waits on them.
pub async fn keep_published(kv: Arc<dyn Kv>, agent: AgentHandle) {
    // Per key: the record as last written (its `since_ms` is when the phase began) and when.
    let mut written: HashMap<String, (NodeRollout, tokio::time::Instant)> = HashMap::new();
    loop {
        let status = agent.status(None).await;
        for m in &status.machines {
            let key = status_key(&m.container, &status.node);
            let (phase, blocking) = phase(m);
            let previous = written.get(&key);
            let since_ms = match previous {
                Some((r, _)) if r.phase == phase => r.since_ms,
                _ => unix_now_ms(),
            };
            let record = NodeRollout {
                node: status.node.clone(),
                container: m.container.clone(),
                state: m.state,
                version: m.version.clone(),
                desired: desired_version(m),
                phase,
                blocking,
                since_ms,
                fetched_ahead: m.fetched_ahead.clone(),
                report: m.report.clone(),
            };
            let due = previous.is_none_or(|(r, at)| *r != record || at.elapsed() >= STATUS_REFRESH);
            if !due {
                continue;
            }
            let value = serde_json::to_vec(&record).expect("records serialise");
            match kv.put(STATUS_BUCKET, &key, &value).await {
                Ok(_) => {
                    written.insert(key, (record, tokio::time::Instant::now()));
                }
                Err(e) => tracing::debug!(%key, error = %e, "could not write the rollout status record"),
            }
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// A container's rollout across the fleet, from one read of `HOIST_STATUS`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutSummary {
    pub container: String,
    pub release: Option<ReleaseRecord>,
    pub nodes: usize,
    pub phases: BTreeMap<Phase, usize>,
    /// Each reason, with the nodes it holds back, the most common first.
    pub blocking: Vec<Blocking>,
    /// Seconds until every node serves the desired version, at the pace so far; None before the
    /// first node has finished or once all have.
    pub eta_seconds: Option<u64>,
    /// The release's outcomes so far: nodes healthy on it, and the nodes it failed on (what the
    /// failure budget counts).
    pub succeeded: usize,
    pub failed: Vec<String>,
    pub records: Vec<NodeRollout>,
    /// The fleet's degraded verdict while it holds (the caller reads it: `degraded::lookout::active`).
    pub degraded: Option<crate::degraded::FleetDegraded>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocking {
    pub reason: String,
    pub nodes: Vec<String>,
}

impl RolloutSummary {
    /// Whether the rollout has been given up: the release aborted.
    pub fn aborted(&self) -> bool {
        self.release.as_ref().is_some_and(|r| r.state == ReleaseState::Aborted)
    }
}

/// `entries` (the status bucket's) summarized for `container`, with its release and the outcomes
/// bucket's entries. `now_ms` by the caller's clock.
pub fn summarize(
    container: &str,
    entries: &[KvEntry],
    release: Option<ReleaseRecord>,
    outcomes: &[KvEntry],
    now_ms: u64,
) -> RolloutSummary {
    let records: Vec<NodeRollout> = records_of(container, entries).into_iter().map(|r| waiting_for_wave(r, release.as_ref())).collect();
    let prefix = format!("{container}.");
    let outcomes: Vec<Outcome> = outcomes
        .iter()
        .filter(|e| e.key.starts_with(&prefix))
        .filter_map(|e| serde_json::from_slice::<Outcome>(&e.value).ok())
        .filter(|o| release.as_ref().is_some_and(|r| r.id == o.release))
        .collect();
    let succeeded = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.iter().filter(|o| !o.ok).map(|o| o.node.clone()).collect();
    let mut phases = BTreeMap::new();
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &records {
        *phases.entry(r.phase).or_default() += 1;
        if let Some(reason) = &r.blocking {
            reasons.entry(reason.clone()).or_default().push(r.node.clone());
        }
    }
    let mut blocking: Vec<Blocking> = reasons.into_iter().map(|(reason, nodes)| Blocking { reason, nodes }).collect();
    blocking.sort_by(|a, b| b.nodes.len().cmp(&a.nodes.len()).then_with(|| a.reason.cmp(&b.reason)));
    let eta_seconds = eta(&records, release.as_ref(), now_ms);
    RolloutSummary {
        container: container.into(),
        release,
        nodes: records.len(),
        phases,
        blocking,
        eta_seconds,
        succeeded,
        failed,
        records,
        degraded: None,
    }
}

/// `container`'s records among the status bucket's `entries`, by node. Entries that are not records
/// (the `=clock.` keys, a record that does not parse) are left out.
pub fn records_of(container: &str, entries: &[KvEntry]) -> Vec<NodeRollout> {
    records_by_container(entries).remove(container).unwrap_or_default()
}

/// Every container's records among `entries`, each parsed once, by node.
pub fn records_by_container(entries: &[KvEntry]) -> HashMap<String, Vec<NodeRollout>> {
    let mut by: HashMap<String, Vec<NodeRollout>> = HashMap::new();
    for r in entries.iter().filter_map(|e| serde_json::from_slice::<NodeRollout>(&e.value).ok()) {
        by.entry(r.container.clone()).or_default().push(r);
    }
    for records in by.values_mut() {
        records.sort_by(|a, b| a.node.cmp(&b.node));
    }
    by
}

/// The store's clock now: the server's timestamp of a write of this node's own (key `=clock.<node>`
/// in the status bucket, which no container's records can be named like; gone with the bucket's
/// TTL). Bake times and the degraded window are measured on it, never on a node's clock. None if
/// the write could not be read back.
pub async fn store_now(kv: &dyn Kv, node: &str) -> Result<Option<u64>, crate::backend::BackendError> {
    let key = format!("=clock.{node}");
    kv.put(STATUS_BUCKET, &key, unix_now_ms().to_string().as_bytes()).await?;
    Ok(kv.get(STATUS_BUCKET, &key).await?.map(|e| e.created_ms))
}

/// A node that serves what it should only because its wave has not started yet is waiting for it.
fn waiting_for_wave(r: NodeRollout, release: Option<&ReleaseRecord>) -> NodeRollout {
    let Some(release) = release.filter(|rel| rel.state == ReleaseState::Rolling) else { return r };
    if r.phase != Phase::Serving || r.version == release.digest {
        return r;
    }
    let wave = match &release.plan {
        Some(plan) => {
            let ahead = if r.fetched_ahead.as_ref() == Some(&release.digest) { ", image fetched ahead" } else { "" };
            format!("waiting for wave {} of {}{ahead}", waves::wave_of(&release.policy, plan, &r.node) + 1, release.waves())
        }
        None => "waiting for the release's plan".into(),
    };
    NodeRollout { phase: Phase::Waiting, blocking: Some(wave), ..r }
}

/// The nodes left, at the pace the finished ones have set since the release was made.
fn eta(records: &[NodeRollout], release: Option<&ReleaseRecord>, now_ms: u64) -> Option<u64> {
    let release = release.filter(|r| r.state == ReleaseState::Rolling)?;
    let done = records.iter().filter(|r| r.phase == Phase::Serving && r.version == release.digest).count();
    let left = records.len().saturating_sub(done);
    if done == 0 || left == 0 {
        return None;
    }
    let per_node = now_ms.saturating_sub(release.at_ms) / done as u64;
    Some(per_node * left as u64 / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(state: State, version: &str, health: Health, activity: Option<&str>, condition: Option<&str>) -> MachineStatus {
        MachineStatus {
            name: "hoist_web".into(),
            container: "web".into(),
            node: "n1".into(),
            id: "1".into(),
            state,
            version: version.into(),
            image: None,
            digest: None,
            desired_image: "r/web:v2".into(),
            container_id: None,
            started: None,
            available_transitions: vec![],
            health,
            restarts: 0,
            last_error: None,
            condition: condition.map(str::to_string),
            bad_version: None,
            activity: activity.map(str::to_string),
            governor_wait_seconds: 0.0,
            last_update_seconds: None,
            fetched_ahead: None,
            report: HealthReport { proven: true, ..Default::default() },
            degraded: None,
        }
    }

    #[test]
    fn the_phase_keeps_apart_waiting_down_and_gate() {
        let slot = Some("waiting for a slot of governor RG (capacity 1)");
        let cases = [
            (machine(State::Run, "v2", Health::Healthy, None, None), Phase::Serving),
            (machine(State::Run, "v1", Health::Healthy, None, None), Phase::Waiting),
            (machine(State::Update, "v1", Health::Healthy, Some("pulling r/web:v2"), None), Phase::Waiting),
            // The replacement waits for its slot; the old container still serves.
            (machine(State::Restart, "v1", Health::Healthy, slot, None), Phase::Waiting),
            (machine(State::Restart, "v2", Health::Down, Some("starting r/web:v2"), None), Phase::Down),
            (machine(State::Restart, "v2", Health::Starting, Some("healthy; confirming for 4s"), None), Phase::Gate),
            (machine(State::Run, "v1", Health::Healthy, None, Some("v2 failed its health gate and was rolled back")), Phase::Failing),
            (machine(State::Maintenance, "v1", Health::Down, None, None), Phase::Maintenance),
        ];
        for (m, want) in cases {
            assert_eq!(phase(&m).0, want, "{m:?}");
        }
        assert_eq!(phase(&machine(State::Restart, "v1", Health::Healthy, slot, None)).1.as_deref(), slot);
    }

    fn entry(key: &str, value: &impl Serialize) -> KvEntry {
        KvEntry {
            bucket: STATUS_BUCKET.into(),
            key: key.into(),
            value: serde_json::to_vec(value).unwrap(),
            revision: 1,
            operation: crate::backend::KvOperation::Put,
            created_ms: 0,
        }
    }

    #[test]
    fn the_summary_counts_phases_groups_reasons_and_estimates_the_end() {
        let record = |node: &str, container: &str, phase: Phase, version: &str, blocking: Option<&str>| NodeRollout {
            node: node.into(),
            container: container.into(),
            state: State::Run,
            version: version.into(),
            desired: "sha256:d2".into(),
            phase,
            blocking: blocking.map(str::to_string),
            since_ms: 0,
            fetched_ahead: None,
            report: HealthReport { proven: true, ..Default::default() },
        };
        let slot = "waiting for a slot of governor RG (capacity 1)";
        let entries: Vec<KvEntry> = [
            record("n1", "web", Phase::Serving, "sha256:d2", None),
            record("n2", "web", Phase::Gate, "sha256:d2", Some("healthy; confirming for 4s")),
            record("n3", "web", Phase::Waiting, "v1", Some(slot)),
            record("n4", "web", Phase::Waiting, "v1", Some(slot)),
            // Serving what it should, v1, because its wave has not started.
            record("n5", "web", Phase::Serving, "v1", None),
            record("n1", "db", Phase::Down, "v1", None),
        ]
        .iter()
        .map(|r| entry(&status_key(&r.container, &r.node), r))
        .collect();
        let release = ReleaseRecord {
            id: "r1".into(),
            container: "web".into(),
            image: "r/web".into(),
            tag: "v2".into(),
            digest: "sha256:d2".into(),
            previous: None,
            previous_digest: None,
            tag_revision: None,
            policy: crate::release::Policy {
                waves: vec![crate::release::WaveSize::Percent(80), crate::release::WaveSize::Percent(100)],
                ..Default::default()
            },
            plan: Some(["n1", "n2", "n3", "n4", "n5"].iter().map(|s| s.to_string()).collect()),
            wave: 0,
            through: None,
            state: ReleaseState::Rolling,
            reason: None,
            by: "alice@ops".into(),
            at_ms: 10_000,
        };
        let outcome = |node: &str, release: &str, ok: bool| Outcome { release: release.into(), node: node.into(), ok, reason: None };
        let outcomes: Vec<KvEntry> = [outcome("n1", "r1", true), outcome("n3", "r0", false), outcome("n2", "r1", false)]
            .iter()
            .map(|o| entry(&format!("web.{}", o.node), o))
            .collect();
        let s = summarize("web", &entries, Some(release.clone()), &outcomes, 70_000);
        assert_eq!(s.nodes, 5, "only web's records");
        assert_eq!(s.phases, BTreeMap::from([(Phase::Waiting, 3), (Phase::Gate, 1), (Phase::Serving, 1)]));
        assert_eq!(s.blocking[0], Blocking { reason: slot.into(), nodes: vec!["n3".into(), "n4".into()] });
        assert!(s.blocking.contains(&Blocking { reason: "waiting for wave 2 of 2".into(), nodes: vec!["n5".into()] }), "{:?}", s.blocking);
        assert_eq!(s.eta_seconds, Some(240), "one node in 60 s, four to go");
        assert_eq!((s.succeeded, s.failed.clone()), (1, vec!["n2".to_string()]), "an earlier release's outcome does not count");
        assert!(!s.aborted());
        let aborted = summarize("web", &entries, Some(ReleaseRecord { state: ReleaseState::Aborted, ..release }), &[], 70_000);
        assert!(aborted.aborted() && aborted.eta_seconds.is_none());
    }
}
