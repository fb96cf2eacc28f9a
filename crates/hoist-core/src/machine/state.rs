//! What a machine holds beside its FSM state, as types that admit only the combinations that can
//! happen: a job that takes a container down is a running job; a machine waiting for the runtime runs
//! none; what an UPDATE hands to its RESTART is one thing, not two flags; a rejected version says
//! where it failed in one place.

use crate::spec::ImageVersion;

/// The current state's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Job {
    /// None runs: the state waits for an input (a gate, a timer, an operator).
    #[default]
    Idle,
    /// A job of the current epoch runs; `taking_down` once it has begun to stop the container it
    /// replaces (a death from then on is its own doing).
    Running { taking_down: bool },
    /// The last job found the runtime unreachable; it is tried again on `Resync` or a timer.
    AwaitingRuntime,
}

impl Job {
    pub(super) fn running(self) -> bool {
        matches!(self, Job::Running { .. })
    }
}

/// What UPDATE (or a version refused before it ran) hands to the RESTART it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Handover {
    /// Nothing pulled: a RESTART out of UPDATE now brings back what ran (`revive`).
    #[default]
    Nothing,
    /// The new image is here: RESTART replaces the container with it.
    Pulled,
    /// RESTART keeps the running container: the pulled image is the one it runs, or the version
    /// was refused (the fleet's mark, a failed preflight) and the last good one runs.
    KeepRunning,
}

/// A version rolled back from: not tried again until the desired version changes or an operator
/// asks for `update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejected {
    pub(super) version: ImageVersion,
    pub(super) at: FailedAt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FailedAt {
    /// Here, in its health gate (or while being brought up).
    Gate,
    /// Here, in its preflight: it never ran, the running container was kept.
    Preflight,
    /// On another node, whose rollback the fleet's mark told of (`rollback_mark`).
    Node(String),
}

impl Rejected {
    /// What status says of it.
    pub(super) fn condition(&self) -> String {
        let bad = &self.version;
        let what = match &self.at {
            FailedAt::Node(node) => format!("{bad} was rolled back on {node}, so not tried here"),
            FailedAt::Preflight => format!("{bad} failed its preflight, so the running container was kept"),
            FailedAt::Gate => format!("{bad} failed its health gate and was rolled back"),
        };
        format!("{what}; not retried until the desired version changes or `update` is requested")
    }
}
