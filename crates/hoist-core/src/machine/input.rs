//! Everything a machine reacts to: the inputs its runner feeds it, one at a time.

use super::*;

/// Everything a machine reacts to.
#[derive(Debug)]
pub enum Input {
    Runtime(RuntimeEvent),
    /// The runtime's event stream was lost and is back: re-inspect, events may have been missed.
    Resync,
    /// The inspect a decision asked for (`Effect::Inspect`), and where that decision goes on.
    /// Boxed, as every input is moved through the channel at the size of the largest.
    Inspected(Box<Inspection>),
    /// The raw `HOIST` value for this container's tag; None when the key is absent or deleted.
    DesiredVersion(Option<String>),
    /// The release's digest to fetch ahead of this node's wave (`release::fetch_ahead`), or None.
    FetchAhead(Option<String>),
    /// The fleet's degraded verdict for this container while it holds, else None.
    Degraded(Option<crate::degraded::FleetDegraded>),
    /// Time for the dependency check.
    DependencyDue,
    DependencyProbe {
        container_id: String,
        result: Result<(), ProbeError>,
    },
    FetchedAhead {
        version: ImageVersion,
        result: Result<(), String>,
    },
    FileTouched(PathBuf),
    Reconfigure(Box<ContainerConfig>),
    Request(Transition, oneshot::Sender<Result<State, TransitionError>>),
    Status(oneshot::Sender<MachineStatus>),
    /// Stop managing. With `remove`, the container is removed too (purge, `ensure: absent`).
    Shutdown {
        remove: bool,
        done: oneshot::Sender<()>,
    },
    Probe {
        epoch: u64,
        result: Result<(), ProbeError>,
    },
    /// A job waited this long for a governor slot (for metrics).
    GovernorWaited(Duration),
    /// The job is about to stop the container it replaces: a death from now on is its own doing.
    /// It hands over the restart slot it took: from here the node is down, and the slot is held
    /// until it is back (RUN) whatever supersedes the job.
    TakingDown {
        epoch: u64,
        slot: Option<Slot>,
    },
    /// What a job is doing right now (pull progress), shown in status while the job is current.
    JobProgress {
        epoch: u64,
        activity: String,
    },
    JobDone {
        epoch: u64,
        outcome: Box<JobOutcome>,
    },
    Timer {
        epoch: u64,
        timer: TimerKind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// The new container has had `healthy_deadline` to pass its gate.
    GateDeadline,
    /// A container without any health check has now run long enough to be trusted.
    Unverified,
    /// A failed pull is tried again (UPDATE leaves the running container alone meanwhile).
    RetryPull,
    /// The container may now have been healthy for `min_healthy_time`.
    MinHealthy,
    /// A job that found the runtime unreachable is tried again.
    RuntimeRetry,
    /// A job that found the coordination backend unreachable (or a governor wait timed out) is tried again.
    BackendRetry,
}
