//! The fault simulator in CI: a thousand seeds and more, each a small fleet rolling out a version
//! while faults hit it, every invariant checked; and the seeds that once found a bug, kept as
//! regressions. A failure prints the command that replays the seed, and the end of its trace.

use hoist_sim::plan::{Fault, Plan, Timed};
use hoist_sim::{Outcome, run, run_plan};
use std::time::Duration;

fn assert_holds(outcome: &Outcome) {
    if outcome.violations.is_empty() {
        return;
    }
    let tail: Vec<&String> = outcome.trace.iter().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
    panic!(
        "seed {} broke an invariant:\n  {}\nreplay it with: {}\nplan: {:?}\nlast of the trace:\n{}",
        outcome.plan.seed,
        outcome.violations.join("\n  "),
        outcome.replay(),
        outcome.plan,
        tail.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
    );
}

fn seeds(range: std::ops::Range<u64>) {
    for seed in range {
        assert_holds(&run(seed));
    }
}

#[test]
fn a_seed_replays_exactly() {
    let (first, again) = (run(4242), run(4242));
    assert_eq!(first.trace, again.trace, "the same seed gave two different runs");
    assert_ne!(first.trace, run(4243).trace, "another seed, another run");
    assert!(first.trace.len() > 20, "a run does something: {:?}", first.trace);
}

/// Each found a bug once (see ARCHITECTURE.md, "Tests"):
/// 3: `resume` made a version that never passed its gate (it had died meanwhile) the last good one;
/// 19: a machine whose adapter call panicked was gone from the agent for good;
/// 176, 1977: a version that died in its gate while the KV moved on was brought back as if it had
/// run well, and crash-looped (1977: rolled back onto itself with no delay, hundreds of times);
/// 4308: a replacement superseded after it had taken its container down freed its slot, so the
/// node came back up (and took a leftover down) outside the governor;
/// 380: a node whose state file was lost ran, and crash-looped on, a version the fleet had rolled back;
/// 14266: nodes that had no version pass its gate yet (crashes before the release) crash-looped on a
/// broken KV version instead of going back to the config's image_tag;
/// 18603, 19097: a start superseded mid-create left a container holding the name, and the next start
/// failing on the name rolled a good version back fleet-wide;
/// releases in waves — 427: a tag put after a release lost to it again, since every wave's write made
/// the record newer than the tag; 3 (its release): a failure within the budget held its wave back for
/// good; 76: a node whose machine had once been restarted by the supervisor never reported its release
/// healthy, so its wave never finished; fleet-degraded mode (found before it landed) — 177: nodes split
/// across two proven versions by a rollback were not counted together; 483: a release record that a
/// later tag put superseded was taken for a release still rolling; 190: a node in RUN after `resume`
/// was taken for one trying its version; 6807 (and 7936, 9821, 11098): nodes rolling a broken
/// release back counted as unhealthy, so the fleet entered degraded mode once the release was aborted;
/// 9212: a node waiting a long time for an update-governor slot (a dead agent's, until it expired)
/// fetched a version another node had rolled back meanwhile.
#[test]
fn seeds_that_found_bugs() {
    for seed in [3, 19, 76, 176, 177, 190, 380, 427, 483, 1977, 4308, 6807, 9212, 14266, 18603, 19097] {
        assert_holds(&run(seed));
    }
}

#[test]
fn seeds_0_to_499() {
    seeds(0..500);
}

#[test]
fn seeds_500_to_999() {
    seeds(500..1000);
}

#[test]
fn seeds_1000_to_1499() {
    seeds(1000..1500);
}

#[test]
fn seeds_1500_to_1999() {
    seeds(1500..2000);
}

/// The node that tries a broken version first is cut off from the store just as its container dies:
/// its rollback must still reach the fleet once it is back, so the next node never tries it.
#[test]
fn a_rollback_made_while_cut_off_reaches_the_fleet() {
    // n0 takes the only slot at 10 s, runs v2 from 12.3 s; it dies at 13.3 s.
    let cut_off = Timed { at: Duration::from_millis(12_500), fault: Fault::CutOff { node: 0, lasts: Duration::from_secs(40) } };
    let plan = Plan {
        seed: 1,
        nodes: 2,
        capacity: 1,
        expire: Duration::from_secs(120),
        broken: true,
        faults: vec![cut_off],
        release: None,
        shared_outage: None,
    };
    let outcome = run_plan(plan);
    assert_holds(&outcome);
    assert_eq!(outcome.tried_broken, ["n0"], "only the first node tried it:\n{}", outcome.trace.join("\n"));
}
