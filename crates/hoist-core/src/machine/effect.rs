//! What a machine's decisions ask of the world, as values. The decision core (`Machine::step`) never
//! awaits, spawns or reads a clock: it returns these, and the runner (`runner.rs`) carries them out in
//! order before it takes the next input. Order is part of the decision (the state is persisted
//! before the job that acts on it starts; an operator's reply follows the mark it deleted).

use super::*;
use crate::config::{HealthCheck, Preflight, Registration};

/// The moment a decision is made: the runner reads it once per input and the core uses nothing else.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    /// For waits, backoffs and the health gate's streak (tokio's clock: paused in tests, simulated in
    /// the simulator).
    pub(super) at: Instant,
    /// Wall time in ms, for what is compared with Docker's timestamps or published to the fleet.
    pub(super) unix_ms: u64,
}

impl Now {
    pub(super) fn read() -> Now {
        Now { at: Instant::now(), unix_ms: crate::clock::unix_now_ms() }
    }

    /// Seconds since the epoch, as Docker reports container times.
    pub(super) fn unix(&self) -> i64 {
        i64::try_from(self.unix_ms / 1000).unwrap_or(i64::MAX)
    }
}

#[derive(Debug)]
pub(super) enum Effect {
    /// Save what the machine must remember across agent restarts.
    Persist(Remembered),
    /// Delete what was saved: the container is gone for good.
    Forget,
    /// A transition or event for the fleet's stream (the runner stamps and queues it in the outbox).
    Publish {
        kind: String,
        from: State,
        to: State,
        detail: String,
        image: String,
    },
    /// Start the slow work of the current state; its outcome comes back as `Input::JobDone`.
    Job {
        epoch: u64,
        work: Box<Work>,
    },
    /// The current job is superseded: it is to stop at its next await point.
    CancelJob,
    /// Wait, bounded, for the cancelled job to let go (shutdown).
    JoinJob,
    /// `Input::Timer { epoch, timer }` after `after`.
    Timer {
        epoch: u64,
        timer: TimerKind,
        after: Duration,
    },
    /// Probe `container` every `check.interval`, reporting `Input::Probe { epoch, .. }`.
    StartProbe {
        epoch: u64,
        check: HealthCheck,
        container: Box<ContainerInfo>,
    },
    StopProbe,
    /// Look at one container (bounded); the result comes back at once as `Input::Inspected`, before
    /// any other input, so the decision that asked goes on where it left off.
    Inspect {
        id: String,
        then: Box<AfterInspect>,
    },
    /// (Re)start the watches of the KV keys and the restart files, for this configuration.
    Watch {
        kv_update: bool,
        kv_interval: Duration,
        restart_files: Vec<PathBuf>,
    },
    StopWatches,
    /// Tick `Input::DependencyDue` every interval, or (None) stop ticking.
    DependencyTicker(Option<Duration>),
    /// One run of the dependency check, reported as `Input::DependencyProbe`.
    DependencyProbe {
        check: HealthCheck,
        container: Box<ContainerInfo>,
    },
    /// Fetch a release's image ahead of this node's wave (reported as `Input::FetchedAhead`), or
    /// (None) drop the fetch under way.
    FetchAhead(Option<FetchJob>),
    /// Publish the container's ports for service discovery, refreshed until withdrawn.
    Register {
        ports: Vec<Registration>,
        instance: String,
    },
    /// Withdraw the registrations; `wait` for the store to confirm, else in the background.
    Withdraw {
        wait: bool,
    },
    /// Let go of a governor slot (after this node's rollback verdict is recorded, if one is being).
    Release(Slot),
    /// Tell the fleet this node rolled `version` back, and why (the runner keeps trying for a while).
    RecordRollback {
        version: ImageVersion,
        why: String,
    },
    /// Tell the fleet this node passed its gate with `version`: the nodes waiting may fetch it.
    RecordVerified {
        version: ImageVersion,
    },
    /// Delete the fleet's rollback mark for `version` (an operator's `update`), bounded.
    ForgetMark {
        version: ImageVersion,
    },
    /// Set (or clear, None) a node condition of `hoist status`.
    Condition {
        key: &'static str,
        value: Option<String>,
    },
    /// Clear the node condition `key` if its text starts with `prefix`.
    ClearCondition {
        key: &'static str,
        prefix: String,
    },
    /// Stop and remove the container (`remove` at shutdown: a purge, `ensure: absent`).
    RemoveContainer {
        id: String,
        running: bool,
        grace: Duration,
    },
    /// The answer to an operator's request.
    Reply(oneshot::Sender<Result<State, TransitionError>>, Result<State, TransitionError>),
}

/// The slow work a state starts. Made once per state entered and moved once, so its variants' sizes
/// do not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum Work {
    /// START (`replace` false: adopt a matching running container) or RESTART (always a fresh one).
    Provision { spec: ContainerSpec, existing: Option<ContainerInfo>, replace: bool, delay: Duration, turn: Turn },
    /// UPDATE: pull (and preflight) the new image, leaving the running container alone.
    Pull(PullPlan),
    /// STOP: stop the running container, if one runs.
    Stop { id: Option<String>, grace: Duration },
}

/// How UPDATE fetches its image.
#[derive(Debug)]
pub(super) struct PullPlan {
    pub(super) spec: ContainerSpec,
    /// Limits concurrent pulls; its slot is held for the pull only.
    pub(super) governor: Option<String>,
    /// Read the fleet's rollback mark first: a version another node rolled back is not even fetched.
    pub(super) check_fleet_mark: bool,
    /// A version no node has passed yet is fetched only with a slot of this (restart) governor, kept
    /// for the RESTART that follows.
    pub(super) try_first: Option<String>,
    /// The backoff left from a failed pull.
    pub(super) wait: Duration,
    /// Run after the pull, before anything that serves is stopped.
    pub(super) preflight: Option<Preflight>,
}

/// A fetch ahead of this node's wave.
#[derive(Debug)]
pub(super) struct FetchJob {
    pub(super) version: ImageVersion,
    pub(super) image: String,
    pub(super) governor: Option<String>,
}

/// An inspect's answer, and the decision it is for.
#[derive(Debug)]
pub struct Inspection {
    pub then: AfterInspect,
    pub result: Result<Option<ContainerInfo>, RuntimeError>,
}

/// Where a decision that asked for an inspect goes on.
#[derive(Debug)]
pub enum AfterInspect {
    /// The container died: an engine that went away is no failure of the container (`why`).
    Died { why: String },
    /// A job brought up this container (its outcome): a fresh look catches one that already died.
    Started { info: ContainerInfo, adopted: bool },
    /// The runtime's event stream is back: what it missed.
    Resync,
}
