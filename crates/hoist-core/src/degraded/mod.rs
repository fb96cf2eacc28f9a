//! Fleet-degraded mode: telling a shared outage (a database, DNS) from a bad release. When at least
//! `share` % of the nodes running a container on a version they have proven (passed its gate on) —
//! and at least `min_nodes` of them — turned unhealthy within `window` of each other, with no
//! rollout of it under way, the cause is shared, not the version: every node enters `degraded` for that container (no rollbacks, no fleet
//! marks, restarts only at the crash backoff, no release waves started) until the unhealthy share has
//! stayed under the threshold for a window.
//!
//! The fleet's verdict is one record, `container/<name>/degraded` in `HOIST`, written by
//! compare-and-set (`lookout.rs`): whichever node sees the breach first enters it and publishes the
//! fleet's one `degraded` event; every machine follows the record through its KV watch. A node cut off
//! from the store decides nothing alone: it keeps the last verdict it read and its own remediation.
//!
//! This file is the decision, pure: `next_step` from the status records and the record as it stands.

pub mod lookout;

use crate::rollout_status::{NodeRollout, Phase};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `fleet.degraded` in the agent file; every node of a fleet should set the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DegradedPolicy {
    /// The share of nodes, in percent, whose failing together means a shared cause. Default 50.
    pub share: u8,
    /// How close together their failures must be, and how long the share must stay under the
    /// threshold before the mode clears. Default 2 min.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fewer unhealthy nodes than this are never a fleet outage (two nodes failing is no pattern).
    /// Default 3.
    pub min_nodes: usize,
}

impl Default for DegradedPolicy {
    fn default() -> DegradedPolicy {
        DegradedPolicy { share: 50, window: Duration::from_secs(120), min_nodes: 3 }
    }
}

pub fn degraded_key(container: &str) -> String {
    format!("container/{container}/degraded")
}

/// The fleet's verdict on one container, as the record holds it. A cleared record stays (so the
/// next episode is a compare-and-set over it, like the first), `active: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetDegraded {
    pub container: String,
    pub active: bool,
    /// The version the nodes failed on together.
    pub version: String,
    /// Unhealthy nodes, of all the nodes counted, at the last write.
    pub unhealthy: usize,
    pub of: usize,
    pub window_secs: u64,
    /// Store-clock ms: entered.
    pub since_ms: u64,
    /// Store-clock ms since when the share has been under the threshold, while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below_since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_ms: Option<u64>,
    /// `hoist@<node>` that wrote it.
    pub by: String,
}

impl FleetDegraded {
    /// The condition status and metrics show while it holds: the share and the window.
    pub fn describe(&self) -> String {
        format!(
            "fleet degraded: {} of {} nodes ({}%) running {} turned unhealthy within {}; a shared outage, not the version: no rollbacks, restarts at the crash backoff, no new release waves",
            self.unhealthy,
            self.of,
            self.unhealthy * 100 / self.of.max(1),
            self.version,
            humantime::format_duration(Duration::from_secs(self.window_secs)),
        )
    }

    /// What the fleet's event says when it clears.
    pub fn describe_cleared(&self) -> String {
        format!(
            "fleet no longer degraded: {} of {} nodes unhealthy, under the threshold for {}",
            self.unhealthy,
            self.of,
            humantime::format_duration(Duration::from_secs(self.window_secs))
        )
    }
}

/// Nodes counted: how many, how many of them unhealthy, and the version(s) they fail on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Count {
    version: String,
    unhealthy: usize,
    of: usize,
}

impl Count {
    fn breaches(&self, policy: &DegradedPolicy) -> bool {
        self.unhealthy >= policy.min_nodes.max(1) && self.unhealthy * 100 >= usize::from(policy.share) * self.of
    }
}

/// What the record should become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to write.
    Stay,
    /// The fleet enters degraded mode: the writer publishes the fleet's event.
    Enter(FleetDegraded),
    /// Still degraded; the record changes (the share fell under the threshold, or rose again).
    Update(FleetDegraded),
    /// Under the threshold for a whole window: cleared; the writer publishes that.
    Clear(FleetDegraded),
}

/// The decision, from `records` (one container's status records, fresh ones only: the bucket's TTL
/// drops a dead agent's), the record as it stands, whether a release of the container is rolling,
/// and the store's clock. Entering needs a settled fleet — no release rolling, no node moving to
/// another version — and counts only nodes on a version they have proven (passed its gate on): a node
/// trying a new version that fails is a bad release's sign, never an outage's, so a bad release
/// cannot enter it. Holding counts the nodes on the degraded version and those on any version they
/// have proven; a node stuck on an unproven one (an operator's `update` pushed through the outage)
/// cannot hold the fleet in the mode, so once the others recover its failure is rolled back as usual.
pub fn next_step(
    container: &str,
    current: Option<&FleetDegraded>,
    records: &[NodeRollout],
    release_rolling: bool,
    policy: &DegradedPolicy,
    now_ms: u64,
    by: &str,
) -> Step {
    let window_ms = policy.window.as_millis() as u64;
    match current.filter(|r| r.active) {
        None => {
            if release_rolling || records.iter().any(moving) {
                return Step::Stay;
            }
            let Some(count) = entering(records, window_ms).filter(|c| c.breaches(policy)) else {
                return Step::Stay;
            };
            Step::Enter(FleetDegraded {
                container: container.into(),
                active: true,
                version: count.version,
                unhealthy: count.unhealthy,
                of: count.of,
                window_secs: policy.window.as_secs(),
                since_ms: now_ms,
                below_since_ms: None,
                cleared_ms: None,
                by: by.into(),
            })
        }
        Some(record) => {
            let count = holding(records, &record.version);
            let counted = FleetDegraded { unhealthy: count.unhealthy, of: count.of, by: by.into(), ..record.clone() };
            match (count.breaches(policy), record.below_since_ms) {
                (true, None) => Step::Stay,
                (true, Some(_)) => Step::Update(FleetDegraded { below_since_ms: None, ..counted }),
                (false, None) => Step::Update(FleetDegraded { below_since_ms: Some(now_ms), ..counted }),
                (false, Some(below)) if now_ms.saturating_sub(below) >= window_ms => {
                    Step::Clear(FleetDegraded { active: false, cleared_ms: Some(now_ms), ..counted })
                }
                (false, Some(_)) => Step::Stay,
            }
        }
    }
}

/// Whether `next_step` could do anything but stay: the record is active (it may need holding or
/// clearing), or enough nodes report unhealthy to enter it. Lets a look skip the rest of its reads
/// and its clock write in the usual case, a healthy fleet (or one node alone, with the embedded
/// store).
pub fn may_change(current: Option<&FleetDegraded>, records: &[NodeRollout], policy: &DegradedPolicy) -> bool {
    current.is_some_and(|r| r.active) || records.iter().filter(|r| r.report.unhealthy_since_ms.is_some()).count() >= policy.min_nodes.max(1)
}

/// The nodes on a version they have proven, and the most of them that turned unhealthy within one
/// `window_ms` of each other (failures together, however long ago: an outage that began during a
/// rollout is entered once the rollout has settled). Any proven version counts alike: nodes on two
/// versions failing together is more a shared cause than one version's, not less. The version named
/// is those nodes' (or their versions', joined).
fn entering(records: &[NodeRollout], window_ms: u64) -> Option<Count> {
    let proven: Vec<&NodeRollout> = records.iter().filter(|r| r.report.proven).collect();
    let mut failed: Vec<(u64, &str)> = proven.iter().filter_map(|r| Some((r.report.unhealthy_since_ms?, r.version.as_str()))).collect();
    failed.sort_unstable();
    let together = (0..failed.len()).map(|i| &failed[i..][..failed[i..].iter().take_while(|(t, _)| *t - failed[i].0 <= window_ms).count()]);
    let most = together.max_by_key(|group| group.len())?;
    let versions: std::collections::BTreeSet<&str> = most.iter().map(|(_, v)| *v).collect();
    Some(Count { version: versions.into_iter().collect::<Vec<_>>().join(", "), unhealthy: most.len(), of: proven.len() })
}

/// The nodes on a version they have proven or on (one of) the degraded version(s), and those of
/// them unhealthy now.
fn holding(records: &[NodeRollout], version: &str) -> Count {
    let counted: Vec<&NodeRollout> = records.iter().filter(|r| r.report.proven || version.split(", ").any(|v| v == r.version)).collect();
    Count {
        version: version.into(),
        unhealthy: counted.iter().filter(|r| r.report.unhealthy_since_ms.is_some()).count(),
        of: counted.len(),
    }
}

/// A node on its way to another version (waiting for its turn, down for it, in its gate): a rollout
/// is under way. One that settled elsewhere (rolled back, in maintenance) is not moving.
fn moving(r: &NodeRollout) -> bool {
    r.version != r.desired && matches!(r.phase, Phase::Waiting | Phase::Down | Phase::Gate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::State;
    use crate::status::HealthReport;

    const NOW: u64 = 10_000_000;
    const MINUTE: u64 = 60_000;

    fn node(n: usize, version: &str, proven: bool, unhealthy_for: Option<u64>) -> NodeRollout {
        NodeRollout {
            node: format!("n{n}"),
            container: "web".into(),
            state: State::Run,
            version: version.into(),
            desired: version.into(),
            phase: Phase::Serving,
            blocking: None,
            since_ms: 0,
            fetched_ahead: None,
            report: HealthReport {
                proven,
                unhealthy_since_ms: unhealthy_for.map(|ms| NOW - ms),
                unhealthy: unhealthy_for.map(|_| "dependency check failed".into()),
            },
        }
    }

    /// `unhealthy` of `of` nodes on proven v1, each unhealthy for `for_ms`.
    fn fleet(unhealthy: usize, of: usize, for_ms: u64) -> Vec<NodeRollout> {
        (0..of).map(|n| node(n, "v1", true, (n < unhealthy).then_some(for_ms))).collect()
    }

    fn step(current: Option<&FleetDegraded>, records: &[NodeRollout], rolling: bool) -> Step {
        next_step("web", current, records, rolling, &DegradedPolicy::default(), NOW, "hoist@n0")
    }

    fn entered(records: &[NodeRollout]) -> FleetDegraded {
        match step(None, records, false) {
            Step::Enter(record) => record,
            other => panic!("expected to enter, got {other:?}"),
        }
    }

    #[test]
    fn a_shared_outage_on_a_proven_version_enters_and_names_the_share_and_window() {
        let record = entered(&fleet(3, 4, MINUTE));
        assert_eq!((record.version.as_str(), record.unhealthy, record.of, record.active), ("v1", 3, 4, true));
        assert!(record.describe().contains("3 of 4 nodes (75%) running v1 turned unhealthy within 2m"), "{}", record.describe());
    }

    #[test]
    fn entering_needs_the_share_the_minimum_and_failures_close_together() {
        // Under half.
        assert_eq!(step(None, &fleet(4, 10, MINUTE), false), Step::Stay);
        // Half, but two nodes are no pattern.
        assert_eq!(step(None, &fleet(2, 4, MINUTE), false), Step::Stay);
        // Failures minutes apart: each failed on its own.
        let apart: Vec<NodeRollout> = (0..4).map(|n| node(n, "v1", true, (n < 3).then_some(n as u64 * 3 * MINUTE))).collect();
        assert_eq!(step(None, &apart, false), Step::Stay);
        // Failing together long ago, and still: an outage that began while a rollout went on.
        assert!(matches!(step(None, &fleet(3, 4, 30 * MINUTE), false), Step::Enter(_)));
        // Exactly half, three nodes.
        assert!(matches!(step(None, &fleet(3, 6, MINUTE), false), Step::Enter(_)));
    }

    #[test]
    fn a_bad_release_never_enters() {
        // Every node trying v2, unproven, fails: that is the version.
        let trying: Vec<NodeRollout> = (0..5).map(|n| node(n, "v2", false, Some(MINUTE))).collect();
        assert_eq!(step(None, &trying, false), Step::Stay);
        // A release rolling: its failures are its budget's to count.
        assert_eq!(step(None, &fleet(4, 4, MINUTE), true), Step::Stay);
        // Nodes failing on v2 while the rest serve v1 healthily.
        let mut mixed = fleet(0, 3, 0);
        mixed.extend((3..6).map(|n| node(n, "v2", false, Some(MINUTE))));
        assert_eq!(step(None, &mixed, false), Step::Stay);
        // A tag rollout under way: v1's nodes dying now may be the rollout's doing (or a coincidence
        // it must not be frozen by).
        let mut rolling = fleet(3, 4, MINUTE);
        rolling[3] = NodeRollout { desired: "v2".into(), phase: Phase::Gate, ..rolling[3].clone() };
        assert_eq!(step(None, &rolling, false), Step::Stay);
        // A node that settled on v1 after rolling v2 back does not count as moving.
        rolling[3].phase = Phase::Failing;
        assert!(matches!(step(None, &rolling, false), Step::Enter(_)));
    }

    #[test]
    fn proven_nodes_failing_together_count_whatever_version_each_runs() {
        // Three of seven, on v0: under the share.
        let mut records = fleet(0, 4, 0);
        records.extend((4..7).map(|n| node(n, "v0", true, Some(MINUTE))));
        assert_eq!(step(None, &records, false), Step::Stay);
        // One more, on v1: four of seven, on two versions.
        records[0] = node(0, "v1", true, Some(MINUTE));
        let record = entered(&records);
        assert_eq!((record.version.as_str(), record.unhealthy, record.of), ("v0, v1", 4, 7));
    }

    #[test]
    fn it_clears_only_after_a_whole_window_under_the_threshold() {
        let record = entered(&fleet(3, 4, MINUTE));
        // Still breaching: nothing to write.
        assert_eq!(step(Some(&record), &fleet(4, 4, MINUTE), false), Step::Stay);
        // Recovered: the window starts.
        let Step::Update(below) = step(Some(&record), &fleet(1, 4, MINUTE), false) else { panic!("expected the window to start") };
        assert_eq!((below.below_since_ms, below.active, below.unhealthy), (Some(NOW), true, 1));
        // Half a window later, still under: stays.
        let later = |ms| next_step("web", Some(&below), &fleet(1, 4, MINUTE), false, &DegradedPolicy::default(), NOW + ms, "hoist@n1");
        assert_eq!(later(MINUTE), Step::Stay);
        // A whole window: cleared.
        let Step::Clear(cleared) = later(2 * MINUTE) else { panic!("expected to clear") };
        assert_eq!((cleared.active, cleared.cleared_ms), (false, Some(NOW + 2 * MINUTE)));
        // Breaching again within the window: the window starts over.
        let Step::Update(again) = step(Some(&below), &fleet(3, 4, MINUTE), false) else { panic!("expected the window to reset") };
        assert_eq!(again.below_since_ms, None);
    }

    #[test]
    fn nodes_stuck_on_an_unproven_version_cannot_hold_it_and_a_cleared_record_can_enter_again() {
        let record = entered(&fleet(3, 4, MINUTE));
        // v1's nodes recovered; one node pushed to v2 by an operator fails on it: not held for it.
        let mut records = fleet(0, 4, 0);
        records[0] = node(0, "v2", false, Some(MINUTE));
        let Step::Update(below) = step(Some(&record), &records, false) else { panic!("expected the window to start") };
        assert_eq!((below.unhealthy, below.of), (0, 3));
        // A node on the degraded version counts even if its record says it is not proven there
        // (it has not passed a gate since the outage began).
        let mut still = fleet(3, 4, MINUTE);
        still[0].report.proven = false;
        assert_eq!(step(Some(&record), &still, false), Step::Stay);
        let cleared = FleetDegraded { active: false, ..record };
        assert!(matches!(step(Some(&cleared), &fleet(3, 4, MINUTE), false), Step::Enter(_)));
    }

    #[test]
    fn a_look_goes_on_only_when_the_step_could_be_other_than_stay() {
        let policy = DegradedPolicy::default();
        // Whenever the pre-check says no, the full decision stays, whatever the clock.
        for (unhealthy, of) in [(0, 1), (0, 5), (2, 2), (2, 10), (3, 3), (3, 4), (5, 5)] {
            let records = fleet(unhealthy, of, MINUTE / 2);
            let may = may_change(None, &records, &policy);
            assert_eq!(may, unhealthy >= policy.min_nodes, "{unhealthy} of {of}");
            if !may {
                assert_eq!(step(None, &records, false), Step::Stay, "{unhealthy} of {of}");
            }
        }
        // An active record is always looked at: it may need holding or clearing.
        let active = entered(&fleet(3, 4, MINUTE / 2));
        assert!(may_change(Some(&active), &fleet(0, 4, 0), &policy));
        assert!(!may_change(Some(&FleetDegraded { active: false, ..active }), &fleet(0, 4, 0), &policy));
    }
}
