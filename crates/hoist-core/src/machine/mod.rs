//! One actor per container: it owns that container's state machine and is fed by one channel of
//! inputs (runtime events, probe results, KV tag changes, file touches, operator requests, timers and
//! the results of its own background jobs). Nothing is shared between machines; the agent talks to
//! each through its `MachineHandle`.
//!
//! The shape follows a reconcile loop: in RUN the machine compares the container it observes with
//! the one it wants (`reconcile_run`) and picks the transition that closes the gap. Slow work (governor
//! waits, pulls, create/start, stop) runs as a cancellable job whose outcome comes back as an input, so
//! the actor always answers status and operator requests at once.

mod adopt;
mod fetch_ahead;
mod fleet_health;
mod gate;
mod job;
mod jobs;
mod load;
mod observe;
mod report;
mod rollout;
mod supervise;
mod versions;
mod watches;

use adopt::{Preferred, pick_adoptable};
use gate::Gate;
use job::{JobCtx, Turn};
pub use jobs::JobOutcome;
use jobs::{JobDone, JobError};
pub use load::spawn;

use crate::backend::{BackendError, Events, Governor, GovernorEventType, HOIST_BUCKET, Kv, TransitionEvent, tag_key};
use crate::backoff::{CrashLoop, Retry};
use crate::clock::unix_now;
use crate::config::{ContainerConfig, DockerConfig, RegistrationConfig, RolloutConfig};
use crate::files::FileWatch;
use crate::fsm::{self, State, Transition, TransitionError};
use crate::persist::{Remembered, StateStore};
use crate::registration;
use crate::release;
use crate::rollback_mark::{self, RollbackMark};
use crate::runtime::{ContainerInfo, ProbeError, RunState, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth};
use crate::slot::{self, Slot, SlotKeeper};
use crate::spec::{ContainerSpec, ImageVersion, LABEL_SPEC, version_of};
use crate::status::{Health, HealthReport, MachineStatus};
use futures_util::StreamExt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use crate::backend::MACHINE_VERSION;

/// What every machine of an agent shares: the adapters and the agent-wide settings.
pub struct MachineDeps {
    pub runtime: Arc<dyn Runtime>,
    pub kv: Arc<dyn Kv>,
    pub governor: Arc<dyn Governor>,
    pub events: Arc<dyn Events>,
    pub files: Arc<dyn FileWatch>,
    pub store: StateStore,
    pub node: String,
    /// Container naming, stop grace, purge grace, syslog address.
    pub docker: DockerConfig,
    pub rollout: RolloutConfig,
    /// How often `register_ports` entries are refreshed while a container is in RUN, and where.
    pub registration: RegistrationConfig,
    /// Problems of the node's dependencies, shown in `hoist status` (`NodeStatus::warnings`).
    pub conditions: crate::health::Conditions,
    /// Releases every governor slot a machine lets go of.
    pub slots: SlotKeeper,
    /// Where the machines' events go, in order, without waiting (`Outbox::start(events)`).
    pub outbox: crate::outbox::Outbox,
}

/// Everything a machine reacts to.
#[derive(Debug)]
pub enum Input {
    Runtime(RuntimeEvent),
    /// The runtime's event stream was lost and is back: re-inspect, events may have been missed.
    Resync,
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

/// How long an operator's `update` waits to delete the fleet's rollback mark.
const MARK_FORGET_LIMIT: Duration = Duration::from_secs(2);
/// How often a node waiting for its turn to try an unproven version looks whether another passed.
const VERIFIED_POLL: Duration = Duration::from_secs(1);
/// The longest a machine waits for one inspect before it takes the engine for unavailable.
const INSPECT_LIMIT: Duration = Duration::from_secs(10);
/// How often a machine waiting for an unreachable runtime tries again without being told it is back.
const RUNTIME_RETRY: Duration = Duration::from_secs(10);

/// The agent's way to reach a machine.
#[derive(Clone, Debug)]
pub struct MachineHandle {
    pub name: String,
    tx: mpsc::Sender<Input>,
}

impl MachineHandle {
    pub async fn send(&self, input: Input) {
        // A machine that has shut down no longer cares.
        let _ = self.tx.send(input).await;
    }

    pub async fn status(&self) -> Option<MachineStatus> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::Status(tx)).await;
        rx.await.ok()
    }

    pub async fn request(&self, transition: Transition) -> Result<State, TransitionError> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::Request(transition, tx)).await;
        rx.await.unwrap_or_else(|_| Err(TransitionError::ShuttingDown(self.name.clone())))
    }

    pub async fn shutdown(&self, remove: bool) {
        let (done, rx) = oneshot::channel();
        self.send(Input::Shutdown { remove, done }).await;
        let _ = rx.await;
    }
}

pub struct Machine {
    cfg: ContainerConfig,
    deps: Arc<MachineDeps>,
    tx: mpsc::Sender<Input>,
    instance_id: String,
    state: State,
    container: Option<ContainerInfo>,
    kv_version: Option<ImageVersion>,
    last_good_image: Option<String>,
    lease: Option<Slot>,
    /// Set while this node's rollback verdict is being recorded for the fleet; true once it is.
    verdict: Option<watch::Receiver<bool>>,
    /// Bumped whenever a job, probe or timer is superseded, so their late results are ignored.
    epoch: u64,
    /// Why an earlier machine of this container was restarted by the supervisor, for status.
    incident: Option<String>,
    cancel_job: Option<watch::Sender<bool>>,
    /// The running (or last) job's task, so shutdown can wait for a cancelled job to let go.
    job: Option<tokio::task::JoinHandle<()>>,
    gate: Gate,
    probe_task: Option<AbortHandle>,
    watch_tasks: Vec<AbortHandle>,
    fetch_ahead: Option<fetch_ahead::FetchAhead>,
    fleet_health: fleet_health::FleetHealth,
    /// Present while in RUN for a container with `register_ports`.
    registration: Option<registration::Publisher>,
    crash: CrashLoop,
    next_delay: Duration,
    /// Pull retries, apart from crashes: a registry that refuses is no fault of the container.
    pull_retry: Retry,
    /// No pull before this (the backoff after a failed one), even across a revival.
    pull_due: Option<Instant>,
    /// Waits for a coordination backend that did not answer.
    backend_retry: Retry,
    /// The next provision replaces a container that has failed (died, unhealthy, failed its gate):
    /// it is down already, so an unreachable governor does not hold it back.
    remediating: bool,
    /// The version to bring back instead of the desired one: the running container died (or an
    /// operator asked for `restart`) while an update was still waiting for its pull.
    revive: Option<ImageVersion>,
    /// The current UPDATE has pulled its image (its RESTART is the update itself, not a revival).
    update_pulled: bool,
    /// The KV's value for this container has not been read yet and nothing was remembered of it.
    kv_pending: bool,
    /// The running provision job has begun to stop the container it replaces.
    taking_down: bool,
    restarts: u64,
    /// A version that failed its health gate and was rolled back from; not tried again until the
    /// desired version changes or an operator asks for `update`.
    bad_version: Option<ImageVersion>,
    /// Where `bad_version` failed when it was not here: another node's rollback (`rollback_mark`).
    bad_version_node: Option<String>,
    /// `bad_version` failed its preflight here (it never ran), rather than its gate.
    bad_in_preflight: bool,
    /// The next RESTART keeps the running container (an update found the same image).
    keep_unchanged: bool,
    /// The container the running provision job replaces, if any: when it produces a different one,
    /// that is a restart (adopting the same container is not).
    replacing: Option<String>,
    /// The last job found the runtime unreachable; the next `Resync` retries it.
    waiting_for_runtime: bool,
    last_error: Option<String>,
    activity: Option<String>,
    governor_wait: Duration,
    /// When the current update began (UPDATE entered), until the container is back in RUN.
    update_started: Option<Instant>,
    last_update: Option<Duration>,
    /// Transitions decided while handling an input, applied in order once it is handled.
    pending: Vec<(Transition, String)>,
}

impl Machine {
    /// Handles inputs until shut down. `rx` is the supervisor's, so a restarted machine goes on with
    /// the inputs queued for the one that panicked.
    async fn run(mut self, rx: &mut mpsc::Receiver<Input>, initial: State) {
        self.start_watches();
        self.start_dependency_check();
        self.state = initial;
        tracing::info!(container = %self.cfg.name, state = %initial, "machine loaded");
        self.enter().await;
        self.apply_pending().await;
        while let Some(input) = rx.recv().await {
            if let Input::Shutdown { remove, done } = input {
                self.shutdown(remove).await;
                // A job that finished just before the shutdown may have queued its outcome, and the
                // governor slot with it: dropping it releases the slot.
                rx.close();
                while rx.try_recv().is_ok() {}
                let _ = done.send(());
                return;
            }
            self.handle(input).await;
            self.apply_pending().await;
        }
    }

    /// Lets go of the governor slot, if one is held. While a rollback verdict of this node is still
    /// being recorded, the slot is freed only once it is (or the recording gave up), so that the node
    /// taking it next reads the verdict.
    fn release_slot(&mut self) {
        let Some(slot) = self.lease.take() else { return };
        match self.verdict.clone() {
            Some(mut recorded) if !*recorded.borrow() => {
                tokio::spawn(async move {
                    let _ = recorded.wait_for(|done| *done).await;
                    drop(slot);
                });
            }
            _ => drop(slot),
        }
    }

    fn machine_name(&self) -> String {
        format!("hoist_{}", self.cfg.name)
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Runtime(event) => self.on_runtime_event(event).await,
            Input::Resync => self.resync().await,
            Input::DesiredVersion(raw) => self.on_desired_version(raw).await,
            Input::FetchAhead(raw) => self.on_fetch_ahead(raw),
            Input::FetchedAhead { version, result } => self.on_fetched_ahead(version, result),
            Input::Degraded(verdict) => self.on_degraded(verdict),
            Input::DependencyDue => self.on_dependency_due(),
            Input::DependencyProbe { container_id, result } => self.on_dependency_probe(&container_id, result),
            Input::FileTouched(path) => {
                if self.state == State::Run {
                    self.want(Transition::Restart, format!("{} changed", path.display()));
                } else {
                    tracing::debug!(container = %self.cfg.name, path = %path.display(), state = %self.state, "file touched outside RUN, ignored");
                }
            }
            Input::Reconfigure(cfg) => self.reconfigure(*cfg).await,
            Input::Request(transition, reply) => {
                let result = self.request(transition).await;
                let _ = reply.send(result);
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Probe { epoch, result } if epoch == self.epoch => self.on_probe(result).await,
            Input::GovernorWaited(waited) => self.governor_wait += waited,
            Input::TakingDown { epoch, slot } => {
                self.taking_down |= epoch == self.epoch;
                // Kept even from a superseded job, whose stop may be under way: the next provision
                // brings the node back within it. A job hands one over only when the slot the
                // machine held was lost, so it replaces that one. STOP and MAINTENANCE hold none.
                if let Some(slot) = slot
                    && matches!(self.state, State::Start | State::Restart | State::Update)
                {
                    self.lease = Some(slot);
                }
            }
            Input::JobProgress { epoch, activity } => {
                if epoch == self.epoch && self.cancel_job.is_some() {
                    self.activity = Some(activity);
                }
            }
            Input::JobDone { epoch, outcome } => self.on_job_done(epoch, *outcome).await,
            Input::Timer { epoch, timer } if epoch == self.epoch => self.on_timer(timer).await,
            Input::Probe { .. } | Input::Timer { .. } => {}
            Input::Shutdown { .. } => unreachable!("handled by the run loop"),
        }
    }

    /// An operator's request: checked against the table and applied now.
    async fn request(&mut self, transition: Transition) -> Result<State, TransitionError> {
        if !transition.operator_may_request() {
            return Err(TransitionError::NotRequestable(transition));
        }
        fsm::check(self.state, transition)?;
        if transition == Transition::Update {
            // Also through a degraded fleet's hold on new versions, for this machine.
            self.fleet_health.pushed_through = self.degraded();
            // The operator says the version is worth another try (e.g. the tag was re-pushed), here
            // and, through the fleet's mark, on the nodes that skipped it.
            if self.clear_bad_version() {
                self.remember().await;
            }
            // Done before replying, not in the background: a late delete could remove the verdict of
            // the retry that another node has meanwhile made. Capped, as the store may be unreachable.
            if let Some(asked) = self.kv_asks() {
                let forget = rollback_mark::forget(&*self.deps.kv, &self.cfg.name, asked);
                if tokio::time::timeout(MARK_FORGET_LIMIT, forget).await.is_err() {
                    tracing::warn!(container = %self.cfg.name, "could not delete the fleet's rollback mark in time");
                }
            }
        }
        self.apply(transition, "requested by operator".into()).await;
        Ok(self.state)
    }

    fn want(&mut self, transition: Transition, why: String) {
        self.pending.push((transition, why));
    }

    async fn apply_pending(&mut self) {
        while !self.pending.is_empty() {
            let (transition, why) = self.pending.remove(0);
            if fsm::check(self.state, transition).is_ok() {
                self.apply(transition, why).await;
            } else {
                tracing::debug!(container = %self.cfg.name, %transition, state = %self.state, "transition no longer applies");
            }
        }
    }

    async fn apply(&mut self, transition: Transition, why: String) {
        let Ok(to) = fsm::check(self.state, transition) else { return };
        let from = self.state;
        if from == State::Update && to == State::Restart && !self.update_pulled {
            // The update has not pulled its image: bring back what ran, and update once it can. Only
            // a version that passed its gate here is brought back: one that died in its gate (the
            // KV moved on meanwhile) is no better than what the KV asks for now.
            let last_good = self.last_good_image.as_deref();
            self.revive = self
                .container
                .as_ref()
                .filter(|c| Some(c.image.as_str()) == last_good)
                .and_then(|c| version_of(&c.image))
                .and_then(|v| ImageVersion::parse(&v).ok());
        }
        self.state = to;
        if transition == Transition::HealthCheck
            && let Some(c) = &self.container
        {
            // Only a container that passed its gate makes its version the last good one: RUN entered
            // by `resume` has passed nothing, and what it finds (reconciled next) may have failed.
            self.last_good_image = Some(c.image.clone());
            self.well_again();
        }
        tracing::info!(container = %self.cfg.name, %transition, %from, %to, reason = %why, "transition");
        self.publish(transition, from, &why);
        self.enter().await;
    }

    /// Starts what the current state is for.
    async fn enter(&mut self) {
        self.supersede();
        self.remember().await;
        // Registered only while in RUN, i.e. having passed the health gate; RUN → RUN is no change.
        if self.state != State::Run
            && let Some(publisher) = self.registration.take()
        {
            publisher.withdraw_in_background();
        }
        match self.state {
            State::Start => self.start_provision(false).await,
            State::Restart => {
                let replace = !std::mem::take(&mut self.keep_unchanged);
                self.start_provision(replace).await
            }
            State::Update => {
                self.update_pulled = false;
                self.update_started.get_or_insert_with(Instant::now);
                self.start_pull();
            }
            State::Stop => {
                self.release_slot();
                self.start_stop();
            }
            State::Maintenance => {
                // Taken out by an operator: not failing, whatever it did before.
                self.well_again();
                self.update_started = None;
                self.release_slot();
                self.revive = None;
                self.activity = None;
            }
            State::Run => {
                self.release_slot();
                self.revive = None;
                self.remediating = false;
                self.backend_retry.reset();
                self.activity = None;
                self.crash.healthy(Instant::now());
                if let Some(started) = self.update_started.take() {
                    self.last_update = Some(started.elapsed());
                }
                self.start_probe();
                self.register();
                self.reconcile_run();
            }
        }
    }

    /// Cancels the running job, probe and timers: whatever they report from now on is stale.
    fn supersede(&mut self) {
        self.epoch += 1;
        self.taking_down = false;
        self.waiting_for_runtime = false;
        if let Some(cancel) = self.cancel_job.take() {
            let _ = cancel.send(true);
        }
        self.stop_probe();
        self.gate = Gate::default();
    }

    async fn shutdown(&mut self, remove: bool) {
        self.supersede();
        if let Some(job) = self.job.take() {
            // Cancelled jobs end at their next await point; bound the wait in case the runtime hangs.
            let _ = tokio::time::timeout(Duration::from_secs(10), job).await;
        }
        for task in self.watch_tasks.drain(..) {
            task.abort();
        }
        self.stop_dependency_check();
        self.fetch_ahead = None;
        self.release_slot();
        if let Some(publisher) = self.registration.take() {
            publisher.withdraw().await;
        }
        if remove {
            if let Some(c) = self.container.take() {
                if c.state == RunState::Running {
                    let _ = self.deps.runtime.stop(&c.id, self.cfg.stop_grace(&self.deps.docker)).await;
                }
                if let Err(e) = self.deps.runtime.remove(&c.id).await {
                    tracing::warn!(container = %self.cfg.name, error = %e, "could not remove the container");
                }
            }
            let _ = self.deps.store.forget(&self.cfg.name).await;
            tracing::info!(container = %self.cfg.name, "removed");
        } else {
            self.remember().await;
        }
    }
}

pub(super) fn exit_text(code: Option<i64>) -> String {
    code.map_or_else(|| "no exit code".into(), |c| format!("exit {c}"))
}

/// A random (version 4) UUID: machine instance ids and event ids, as Choria makes them.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = crate::clock::random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
