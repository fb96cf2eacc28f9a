//! What one seed simulates: the fleet (nodes, the restart governor's capacity and expiry), whether
//! the new version is broken, and the faults, each at a time of its own. Everything is drawn from the
//! seed, so a seed is a run.

use hoist_core::clock::SplitMix64;
use hoist_core::release::WaveSize;
use std::time::Duration;

/// When the KV asks for the new version.
pub const RELEASE_AT: Duration = Duration::from_secs(10);

/// The registry digest of v2, as a release pins it.
pub const V2_DIGEST: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// A release made through a release record (`hoist release`), in waves, instead of a tag put.
#[derive(Debug, Clone)]
pub struct Release {
    pub waves: Vec<WaveSize>,
    pub bake: Duration,
    pub budget: usize,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub nodes: usize,
    pub capacity: u64,
    /// The restart governor's lease expiry.
    pub expire: Duration,
    /// The new version's containers exit a second after starting.
    pub broken: bool,
    pub faults: Vec<Timed>,
    /// How v2 is asked for: a release record, or (None) the tag key.
    pub release: Option<Release>,
    pub shared_outage: Option<SharedOutage>,
}

/// Every node's dependency (a database) goes away at once, `after` the fleet has settled from the
/// rollout and the other faults: every container's `dependency_check` fails until it is back. What
/// fleet-degraded mode is for.
#[derive(Debug, Clone)]
pub struct SharedOutage {
    pub after: Duration,
    pub lasts: Duration,
}

#[derive(Debug, Clone)]
pub struct Timed {
    pub at: Duration,
    pub fault: Fault,
}

#[derive(Debug, Clone, Copy)]
pub enum Action {
    Restart,
    Update,
    Maintenance { lasts: Duration },
}

#[derive(Debug, Clone)]
pub enum Fault {
    /// The agent process dies; it is started again after `down`, with its state file or without.
    AgentCrash {
        node: usize,
        down: Duration,
        keeps_state: bool,
    },
    /// The node cannot reach the KV and governor for a while.
    CutOff {
        node: usize,
        lasts: Duration,
    },
    /// No node can: the backend is down.
    Outage {
        lasts: Duration,
    },
    /// The container engine restarts; without live-restore its containers stop.
    EngineRestart {
        node: usize,
        lasts: Duration,
        live_restore: bool,
    },
    /// The next calls of the node's machines to its engine panic (a bug in an adapter).
    AdapterPanics {
        node: usize,
        count: u32,
    },
    /// The KV's tag is put again mid-rollout: on to `v3` (good), or back to `v1`.
    Retag {
        to: &'static str,
    },
    /// An operator asks `node` for a transition; `Maintenance` is resumed after `lasts`.
    Operator {
        node: usize,
        action: Action,
    },
    ContainerCrash {
        node: usize,
    },
    FailingPulls {
        node: usize,
        count: u32,
    },
    SlowPulls {
        node: usize,
        latency: Duration,
    },
    /// An operator evicts the oldest lease of the restart governor.
    Evict,
    /// An operator changes the restart governor's capacity (lowering it evicts the oldest leases).
    Capacity {
        to: u64,
    },
}

impl Fault {
    /// How long after it begins the fault is over.
    pub fn lasts(&self) -> Duration {
        match self {
            Fault::AgentCrash { down, .. } => *down,
            Fault::Operator { action: Action::Maintenance { lasts }, .. } => *lasts,
            Fault::CutOff { lasts, .. } | Fault::Outage { lasts } | Fault::EngineRestart { lasts, .. } => *lasts,
            _ => Duration::ZERO,
        }
    }
}

impl Plan {
    pub fn of(seed: u64) -> Plan {
        let mut rng = SplitMix64::new(seed);
        let nodes = 2 + rng.below(4) as usize;
        let capacity = 1 + rng.below(2);
        let expire = Duration::from_secs(if rng.chance(0.3) { 15 } else { 120 });
        let broken = rng.chance(0.25);
        let count = 1 + rng.below(4);
        let secs = |rng: &mut SplitMix64, lo: u64, hi: u64| Duration::from_secs(lo + rng.below(hi - lo + 1));
        let faults = (0..count)
            .map(|_| {
                let node = rng.below(nodes as u64) as usize;
                // Mostly in the middle of the rollout, where a fault does the most harm.
                let at = secs(&mut rng, 5, 60);
                let fault = match rng.below(12) {
                    0 => Fault::AgentCrash { node, down: secs(&mut rng, 1, 40), keeps_state: rng.chance(0.7) },
                    1 => Fault::CutOff { node, lasts: secs(&mut rng, 2, 60) },
                    2 => Fault::EngineRestart { node, lasts: secs(&mut rng, 1, 20), live_restore: rng.chance(0.5) },
                    3 => Fault::ContainerCrash { node },
                    4 => Fault::FailingPulls { node, count: 1 + rng.below(3) as u32 },
                    5 => Fault::SlowPulls { node, latency: secs(&mut rng, 10, 60) },
                    6 => Fault::Evict,
                    7 => Fault::Outage { lasts: secs(&mut rng, 2, 60) },
                    8 => Fault::AdapterPanics { node, count: 1 + rng.below(3) as u32 },
                    9 => Fault::Retag { to: if rng.chance(0.5) { "v3" } else { "v1" } },
                    10 => {
                        let action = match rng.below(3) {
                            0 => Action::Restart,
                            1 => Action::Update,
                            _ => Action::Maintenance { lasts: secs(&mut rng, 1, 30) },
                        };
                        Fault::Operator { node, action }
                    }
                    _ => Fault::Capacity { to: 1 + rng.below(3) },
                };
                // A retag moves on from the release, so it comes after it.
                let at = if matches!(fault, Fault::Retag { .. }) { at.max(RELEASE_AT + Duration::from_secs(1)) } else { at };
                Timed { at, fault }
            })
            .collect();
        Plan { seed, nodes, capacity, expire, broken, faults, release: Self::release_of(seed), shared_outage: Self::shared_outage_of(seed) }
    }

    /// Drawn from a generator of its own, as `release_of`: the seeds drawn before keep their fleet,
    /// faults and release.
    fn shared_outage_of(seed: u64) -> Option<SharedOutage> {
        let mut rng = SplitMix64::new(seed ^ 0x6465_7065_6e64_7321);
        if !rng.chance(0.3) {
            return None;
        }
        Some(SharedOutage { after: Duration::from_secs(5 + rng.below(30)), lasts: Duration::from_secs(60 + rng.below(60)) })
    }

    /// Drawn from a generator of its own, so the seeds drawn before releases were simulated still
    /// plan the same fleet and faults.
    fn release_of(seed: u64) -> Option<Release> {
        let mut rng = SplitMix64::new(seed ^ 0x7265_6c65_6173_6573);
        if !rng.chance(0.4) {
            return None;
        }
        let waves = match rng.below(3) {
            0 => vec![WaveSize::Nodes(1), WaveSize::Percent(100)],
            1 => vec![WaveSize::Nodes(1), WaveSize::Percent(50), WaveSize::Percent(100)],
            _ => vec![WaveSize::Percent(100)],
        };
        Some(Release { waves, bake: Duration::from_secs(rng.below(60)), budget: rng.below(2) as usize })
    }

    /// The release record is what the fleet follows last: no tag was put after it.
    pub fn released_last(&self) -> bool {
        self.release.is_some() && !self.faults.iter().any(|t| matches!(t.fault, Fault::Retag { .. }))
    }

    /// The version the KV asks for once every fault is over: v2, or the last retag.
    pub fn final_tag(&self) -> &'static str {
        let mut retags: Vec<&Timed> = self.faults.iter().filter(|t| matches!(t.fault, Fault::Retag { .. })).collect();
        retags.sort_by_key(|t| t.at);
        match retags.last().map(|t| &t.fault) {
            Some(Fault::Retag { to }) => to,
            _ => "v2",
        }
    }

    /// When the last fault is over.
    pub fn calm_at(&self) -> Duration {
        self.faults.iter().map(|t| t.at + t.fault.lasts()).max().unwrap_or_default().max(RELEASE_AT)
    }
}
