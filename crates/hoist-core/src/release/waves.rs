//! Canary waves and the failure budget, as pure functions every node evaluates alike: which nodes a
//! wave holds, where a node falls, and what the release's next step is given the outcomes so far.

use crate::spec::fnv1a;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How many nodes have the release once a wave has started: a count, or a share of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    Nodes(usize),
    Percent(u8),
}

impl WaveSize {
    /// `3` or `10%`.
    pub fn parse(text: &str) -> Result<WaveSize, String> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
                _ => Err(format!("{text:?}: a share is 1% to 100%")),
            },
            None => match text.parse::<usize>() {
                Ok(n) if n > 0 => Ok(WaveSize::Nodes(n)),
                _ => Err(format!("{text:?}: a wave is a number of nodes (1 or more) or a share such as 10%")),
            },
        }
    }
}

/// How many failures a release may have before the first node to see it aborts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Failures allowed; one more aborts.
    pub failures: usize,
    /// Or a share of the nodes that finished (ok or failed), once at least `min_sample` have.
    pub percent: Option<u8>,
    pub min_sample: usize,
}

impl Budget {
    pub fn exceeded(&self, failed: usize, finished: usize) -> bool {
        let share = self.percent.is_some_and(|p| finished >= self.min_sample.max(1) && failed * 100 > usize::from(p) * finished);
        failed > self.failures || share
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Cumulative: the nodes that have the release once each wave has started. The last wave is
    /// always the whole plan.
    pub waves: Vec<WaveSize>,
    /// How long a wave must have been healthy, with no failure, before the next one starts.
    #[serde(with = "humantime_serde")]
    pub bake: Duration,
    pub budget: Budget,
}

impl Default for Policy {
    /// One wave, no bake, and the first failure aborts: what a tag change does, with the fleet's
    /// rollback mark stopping it after the first node.
    fn default() -> Policy {
        Policy { waves: vec![WaveSize::Percent(100)], bake: Duration::ZERO, budget: Budget { failures: 0, percent: None, min_sample: 1 } }
    }
}

impl Policy {
    /// For `nodes` planned nodes, how many of them have the release once each wave has started.
    /// There are as many waves as the policy lists, plus a last one for everyone when it does not
    /// end at 100%: a small fleet keeps every wave (some then add no planned node), so that nodes
    /// the plan does not know, which go with the last wave, never skip a bake.
    pub fn wave_ends(&self, nodes: usize) -> Vec<usize> {
        let mut ends = Vec::with_capacity(self.waves.len() + 1);
        let mut last = 0;
        for size in &self.waves {
            let n = match *size {
                WaveSize::Nodes(n) => n,
                WaveSize::Percent(p) => (usize::from(p) * nodes).div_ceil(100),
            };
            last = n.clamp(last, nodes);
            ends.push(last);
        }
        if self.waves.last() != Some(&WaveSize::Percent(100)) {
            ends.push(nodes);
        }
        ends
    }
}

/// The order in which the nodes get the release: rendezvous hashing of (node, release), so each node
/// can place itself and a new release reshuffles who goes first.
pub fn plan_for(nodes: &[String], release_id: &str) -> Vec<String> {
    let mut scored: Vec<(u64, &String)> = nodes.iter().map(|n| (score(n, release_id), n)).collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, n)| n.clone()).collect()
}

/// FNV-1a of (node, release), finished with SplitMix64's mixer: FNV alone barely moves when only the
/// release's last characters differ, and every release would then pick the same first nodes.
fn score(node: &str, release_id: &str) -> u64 {
    let mut z = fnv1a(format!("{node}\u{0}{release_id}").as_bytes());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The wave `node` is in: by its place in the plan; a node the plan does not know (it joined after
/// the plan was frozen) goes with the last wave.
pub fn wave_of(policy: &Policy, plan: &[String], node: &str) -> usize {
    let ends = policy.wave_ends(plan.len());
    match plan.iter().position(|n| n == node) {
        Some(place) => ends.iter().position(|&end| place < end).unwrap_or(ends.len() - 1),
        None => ends.len() - 1,
    }
}

/// One node's outcome for a release, as the decision reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub node: String,
    pub ok: bool,
    /// When it was recorded, by the store's clock.
    pub at_ms: u64,
}

/// What the release should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Freeze the plan over these nodes.
    Plan,
    /// Nothing yet; why, for status.
    Wait(String),
    /// The wave is through and bakes; how long is left. Its next wave may fetch ahead meanwhile.
    Baking(String),
    /// Start the next wave.
    Advance,
    /// Too many failures: give the release up.
    Abort(String),
    /// Every wave is through, healthy.
    Complete,
}

/// The next step of a rolling release at wave `wave` (index), from the outcomes recorded for it and
/// the store's clock now. The same on every node for the same inputs.
pub fn next_step(policy: &Policy, plan: Option<&[String]>, wave: usize, outcomes: &[Seen], now_ms: u64) -> Step {
    let Some(plan) = plan else { return Step::Plan };
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    if policy.budget.exceeded(failed, outcomes.len()) {
        let names: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.node.as_str()).collect();
        return Step::Abort(format!("failure budget exhausted: {failed} of {} failed ({})", outcomes.len(), names.join(", ")));
    }
    let ends = policy.wave_ends(plan.len());
    let wave = wave.min(ends.len() - 1);
    let members = &plan[..ends[wave]];
    // Every member of the waves so far has its outcome: healthy, or failed within the budget (a
    // budget is failures the operator tolerates, so they do not hold the release back).
    let done: Vec<&Seen> = outcomes.iter().filter(|o| members.contains(&o.node)).collect();
    if done.len() < members.len() {
        let ok = done.iter().filter(|o| o.ok).count();
        return Step::Wait(format!("wave {} of {}: {ok} of {} node(s) healthy on it", wave + 1, ends.len(), members.len()));
    }
    let settled_since = done.iter().map(|o| o.at_ms).max().unwrap_or(0);
    let baked = now_ms.saturating_sub(settled_since);
    let bake = policy.bake.as_millis() as u64;
    if wave + 1 == ends.len() {
        return Step::Complete;
    }
    if baked < bake {
        return Step::Baking(format!("wave {} of {} baking, {} s left", wave + 1, ends.len(), (bake - baked).div_ceil(1000)));
    }
    Step::Advance
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(waves: &[&str], bake_s: u64, failures: usize) -> Policy {
        Policy {
            waves: waves.iter().map(|w| WaveSize::parse(w).unwrap()).collect(),
            bake: Duration::from_secs(bake_s),
            budget: Budget { failures, percent: None, min_sample: 1 },
        }
    }

    #[test]
    fn waves_grow_to_the_whole_plan() {
        assert_eq!(policy(&["1", "10%", "50%", "100%"], 0, 0).wave_ends(100), [1, 10, 50, 100]);
        assert_eq!(policy(&["1", "10%", "50%", "100%"], 0, 0).wave_ends(3), [1, 1, 2, 3], "a share rounds up; every wave is kept");
        assert_eq!(policy(&["1", "50%"], 0, 0).wave_ends(10), [1, 5, 10], "a last wave for everyone");
        assert_eq!(policy(&["5"], 0, 0).wave_ends(2), [2, 2]);
        assert_eq!(policy(&["1", "100%"], 0, 0).wave_ends(1), [1, 1], "a one-node plan still bakes before newcomers");
        assert_eq!(policy(&["100%"], 0, 0).wave_ends(0), [0]);
        for bad in ["0", "0%", "101%", "x", "-1"] {
            assert!(WaveSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_node_places_itself_alike_and_late_joiners_go_last() {
        let nodes: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        let plan = plan_for(&nodes, "r1");
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(plan_for(&shuffled, "r1"), plan, "the order does not depend on who lists the nodes");
        assert_ne!(plan_for(&nodes, "r2"), plan, "another release, another first node");
        let p = policy(&["1", "50%"], 0, 0);
        assert_eq!(wave_of(&p, &plan, &plan[0]), 0);
        assert_eq!(wave_of(&p, &plan, &plan[5]), 1);
        assert_eq!(wave_of(&p, &plan, &plan[19]), 2);
        assert_eq!(wave_of(&p, &plan, "newcomer"), 2);
    }

    fn seen(node: &str, ok: bool, at_ms: u64) -> Seen {
        Seen { node: node.into(), ok, at_ms }
    }

    #[test]
    fn a_wave_starts_once_the_last_one_has_baked_and_the_budget_stops_a_bad_release() {
        let plan: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p = policy(&["1", "50%", "100%"], 60, 0);
        assert_eq!(next_step(&p, None, 0, &[], 0), Step::Plan);
        assert!(matches!(next_step(&p, Some(&plan), 0, &[], 0), Step::Wait(w) if w.contains("0 of 1")));
        let first = [seen("a", true, 1_000)];
        assert!(matches!(next_step(&p, Some(&plan), 0, &first, 30_000), Step::Baking(w) if w.contains("baking, 31 s left")));
        assert_eq!(next_step(&p, Some(&plan), 0, &first, 61_000), Step::Advance, "baked on the store's clock");
        // Wave 2 (two nodes): one done; the bake counts from the last to finish.
        let two = [seen("a", true, 1_000), seen("b", true, 70_000)];
        assert!(matches!(next_step(&p, Some(&plan), 1, &two, 80_000), Step::Baking(w) if w.contains("baking")));
        let all = [seen("a", true, 1), seen("b", true, 2), seen("c", true, 3), seen("d", true, 4)];
        assert_eq!(next_step(&p, Some(&plan), 2, &all, 5), Step::Complete, "the last wave needs no bake");
        // One failure over a budget of none aborts, wherever it is.
        let failed = [seen("a", false, 1_000)];
        assert!(matches!(next_step(&p, Some(&plan), 0, &failed, 2_000), Step::Abort(r) if r.contains("1 of 1 failed (a)")));
        // Within a budget of one, a failure is tolerated: the wave is through once all have an outcome.
        let lenient = policy(&["1", "100%"], 0, 1);
        assert_eq!(next_step(&lenient, Some(&plan), 0, &failed, 2_000), Step::Advance);
        assert!(matches!(next_step(&lenient, Some(&plan), 1, &failed, 2_000), Step::Wait(w) if w.contains("0 of 4")));
    }

    #[test]
    fn a_share_budget_waits_for_its_sample() {
        let b = Budget { failures: usize::MAX, percent: Some(20), min_sample: 5 };
        assert!(!b.exceeded(1, 1), "one of one is under the sample");
        assert!(!b.exceeded(1, 5));
        assert!(b.exceeded(2, 5));
    }
}
