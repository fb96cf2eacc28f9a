//! One actor per container: it owns that container's state machine and is fed by one channel of
//! inputs (runtime events, probe results, KV tag changes, file touches, operator requests, timers and
//! the results of its own background jobs). Nothing is shared between machines; the agent talks to
//! each through its `MachineHandle`.
//!
//! The shape follows a reconcile loop: in RUN the machine compares the container it observes with
//! the one it wants (`reconcile_run`) and picks the transition that closes the gap. Slow work (governor
//! waits, pulls, create/start, stop) runs as a cancellable job whose outcome comes back as an input, so
//! the actor always answers status and operator requests at once.

use crate::backend::{BackendError, Events, Governor, GovernorEventType, HOIST_BUCKET, Kv, TRANSITION_PROTOCOL, TransitionEvent, tag_key};
use crate::backoff::{CrashLoop, Retry};
use crate::config::{ContainerConfig, DockerConfig, RolloutConfig};
use crate::files::FileWatch;
use crate::fsm::{self, State, Transition, TransitionError};
use crate::persist::{Remembered, StateStore};
use crate::registration;
use crate::rollback_mark::{self, RollbackMark};
use crate::runtime::{ContainerInfo, ProbeError, RunState, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth};
use crate::slot::{self, Slot, SlotKeeper};
use crate::spec::{ContainerSpec, ImageVersion, LABEL_SPEC};
use crate::status::{Health, MachineStatus};
use futures_util::StreamExt;
use rand::Rng;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

/// The machine version reported in events and status, as the original module's machines had.
pub const MACHINE_VERSION: &str = "1.0.0";

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
    /// How often `register_ports` entries are refreshed while a container is in RUN.
    pub registration_interval: Duration,
    /// Problems of the node's dependencies, shown in `hoist status` (`NodeStatus::warnings`).
    pub conditions: crate::health::Conditions,
    /// Releases every governor slot a machine lets go of.
    pub slots: SlotKeeper,
}

/// Everything a machine reacts to.
#[derive(Debug)]
pub enum Input {
    Runtime(RuntimeEvent),
    /// The runtime's event stream was lost and is back: re-inspect, events may have been missed.
    Resync,
    /// The raw `HOIST` value for this container's tag; None when the key is absent or deleted.
    DesiredVersion(Option<String>),
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
    TakingDown {
        epoch: u64,
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

#[derive(Debug)]
pub struct JobOutcome {
    /// A governor slot the job took and the machine now holds.
    lease: Option<Slot>,
    result: Result<JobDone, JobError>,
}

/// Why a job did not finish.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// The runtime could not be reached (a Docker daemon restarting, say). Nothing is wrong with the
    /// container, so this neither counts towards a crash loop nor rolls back a new version: the job is
    /// retried once the runtime is back.
    #[error(transparent)]
    RuntimeUnavailable(RuntimeError),
    /// The coordination backend (KV, governor) did not answer, or a governor wait timed out. Never a
    /// failure of the container or of its version: no crash-loop count, no rollback, no fleet mark;
    /// the job waits and is tried again.
    #[error("{0}")]
    Backend(String),
    /// The image could not be pulled (registry down, tag missing, login refused). Nothing ran, so this
    /// is no failure of the version either: the running container is left alone and the pull retried.
    #[error(transparent)]
    Pull(RuntimeError),
    #[error("{0}")]
    Failed(String),
}

impl From<RuntimeError> for JobError {
    fn from(e: RuntimeError) -> JobError {
        match e {
            RuntimeError::Unavailable(_) => JobError::RuntimeUnavailable(e),
            RuntimeError::Pull { .. } => JobError::Pull(e),
            other => JobError::Failed(other.to_string()),
        }
    }
}

impl From<BackendError> for JobError {
    fn from(e: BackendError) -> JobError {
        JobError::Backend(e.to_string())
    }
}

#[derive(Debug)]
enum JobDone {
    /// A container is running: a new one, or (`adopted`) one found running as it should.
    Running {
        info: ContainerInfo,
        adopted: bool,
    },
    /// The image is local; its content id.
    Pulled(String),
    /// Not replaced: another node rolled the version back (the slot, if taken, comes back with it).
    RolledBackElsewhere(RollbackMark),
    /// Not replaced: the image is not here, and a running container must not wait on a pull; the
    /// machine pulls in UPDATE first, where that container is left alone.
    NeedsPull,
    Stopped,
}

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

/// Progress of the health gate a new (or adopted) container must pass before RUN.
#[derive(Debug, Default)]
struct Gate {
    /// A probe success has been seen since this container started.
    probe_passed: bool,
    /// Consecutive probe failures outside the start period.
    probe_failures: u32,
    /// The container has run long enough without any check (`unverified_wait`).
    waited: bool,
    /// Since when every check has passed without a break (for `min_healthy_time`).
    healthy_since: Option<Instant>,
    /// The container was adopted as it ran, so its time up counts toward `min_healthy_time`.
    adopted: bool,
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
    /// Bumped whenever a job, probe or timer is superseded, so their late results are ignored.
    epoch: u64,
    cancel_job: Option<watch::Sender<bool>>,
    /// The running (or last) job's task, so shutdown can wait for a cancelled job to let go.
    job: Option<tokio::task::JoinHandle<()>>,
    gate: Gate,
    probe_task: Option<AbortHandle>,
    watch_tasks: Vec<AbortHandle>,
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

/// Spawns a machine for `cfg`, adopting one of `candidates` (the runtime's containers of this name) if
/// the runtime already has its container.
pub async fn spawn(cfg: ContainerConfig, deps: Arc<MachineDeps>, candidates: Vec<ContainerInfo>) -> MachineHandle {
    let (tx, rx) = mpsc::channel(256);
    let remembered = deps.store.load(&cfg.name).await;
    let kv_version = remembered.as_ref().and_then(|r| r.desired_version.as_deref()).and_then(|v| ImageVersion::parse(v).ok());
    let wanted = kv_version.clone().filter(|_| cfg.kv_update).unwrap_or_else(|| cfg.image_tag.clone());
    let preferred =
        Preferred { id: remembered.as_ref().and_then(|r| r.container_id.clone()), spec: cfg.spec(&deps.node, &deps.docker, &wanted) };
    let existing = pick_adoptable(&*deps.runtime, candidates, &preferred).await;
    let machine = Machine {
        instance_id: uuid_v4(),
        state: State::Start,
        container: existing,
        kv_version,
        last_good_image: remembered.as_ref().and_then(|r| r.last_good_image.clone()),
        lease: None,
        epoch: 0,
        cancel_job: None,
        job: None,
        gate: Gate::default(),
        probe_task: None,
        watch_tasks: Vec::new(),
        registration: None,
        crash: CrashLoop::new(cfg.restart_backoff.unwrap_or(deps.rollout.restart_backoff)),
        next_delay: Duration::ZERO,
        pull_retry: Retry::default(),
        pull_due: None,
        backend_retry: Retry::default(),
        remediating: false,
        revive: None,
        update_pulled: false,
        // Without its state file a machine does not know what the KV last asked for: it keeps what runs
        // until the KV answers, rather than move it back to the configured tag meanwhile.
        kv_pending: cfg.kv_update && remembered.is_none(),
        taking_down: false,
        restarts: remembered.as_ref().map_or(0, |r| r.restarts),
        replacing: None,
        waiting_for_runtime: false,
        bad_version: remembered.as_ref().and_then(|r| r.bad_version.as_deref()).and_then(|v| ImageVersion::parse(v).ok()),
        bad_version_node: remembered.as_ref().and_then(|r| r.bad_version_node.clone()),
        keep_unchanged: false,
        last_error: None,
        activity: None,
        governor_wait: Duration::ZERO,
        update_started: None,
        last_update: None,
        pending: Vec::new(),
        tx: tx.clone(),
        deps,
        cfg,
    };
    let handle = MachineHandle { name: machine.cfg.name.clone(), tx };
    let initial = match remembered.map(|r| r.state) {
        // An operator's maintenance outlives an agent restart; an unfinished stop is finished.
        Some(State::Maintenance) => State::Maintenance,
        Some(State::Stop) => State::Stop,
        _ => State::Start,
    };
    tokio::spawn(machine.run(rx, initial));
    handle
}

impl Machine {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, initial: State) {
        self.start_watches();
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

    fn spec(&self) -> ContainerSpec {
        self.cfg.spec(&self.deps.node, &self.deps.docker, &self.desired_version())
    }

    /// What the KV or the config asks for.
    fn wanted_version(&self) -> ImageVersion {
        self.kv_asks().unwrap_or(&self.cfg.image_tag).clone()
    }

    /// The version the KV asks for, when it is what this container follows: asked of the whole fleet.
    fn kv_asks(&self) -> Option<&ImageVersion> {
        self.kv_version.as_ref().filter(|_| self.cfg.kv_update)
    }

    /// What to run: the wanted version, unless it was rolled back from (then the last good one) or a
    /// revival brings back what ran before an update could pull.
    fn desired_version(&self) -> ImageVersion {
        if let Some(revive) = &self.revive {
            return revive.clone();
        }
        let wanted = self.wanted_version();
        if self.bad_version.as_ref() == Some(&wanted)
            && let Some(good) = self.last_good_image.as_deref().and_then(version_of).and_then(|v| ImageVersion::parse(&v).ok())
        {
            return good;
        }
        wanted
    }

    /// Whether the container being brought up is a new version, i.e. one a failure rolls back from.
    fn trying_new_version(&self) -> bool {
        self.last_good_image.as_ref().is_some_and(|good| *good != self.spec().image_ref())
    }

    fn machine_name(&self) -> String {
        format!("hoist_{}", self.cfg.name)
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Runtime(event) => self.on_runtime_event(event).await,
            Input::Resync => self.resync().await,
            Input::DesiredVersion(raw) => self.on_desired_version(raw).await,
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
            Input::TakingDown { epoch } => self.taking_down |= epoch == self.epoch,
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
            // The update has not pulled its image: bring back what ran, and update once it can.
            self.revive = self.container.as_ref().and_then(|c| version_of(&c.image)).and_then(|v| ImageVersion::parse(&v).ok());
        }
        self.state = to;
        tracing::info!(container = %self.cfg.name, %transition, %from, %to, reason = %why, "transition");
        self.publish(transition, from, &why).await;
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
                self.lease = None;
                self.start_stop();
            }
            State::Maintenance => {
                self.update_started = None;
                self.lease = None;
                self.revive = None;
                self.activity = None;
            }
            State::Run => {
                self.lease = None;
                self.revive = None;
                self.remediating = false;
                self.backend_retry.reset();
                self.activity = None;
                self.crash.healthy(Instant::now());
                if let Some(started) = self.update_started.take() {
                    self.last_update = Some(started.elapsed());
                }
                if let Some(c) = &self.container {
                    self.last_good_image = Some(c.image.clone());
                    self.remember().await;
                }
                self.start_probe();
                self.register();
                self.reconcile_run();
            }
        }
    }

    fn register(&mut self) {
        if self.registration.is_none() {
            let (kv, interval) = (self.deps.kv.clone(), self.deps.registration_interval);
            self.registration = registration::Publisher::start(kv, &self.cfg.register_ports, &self.instance_id, interval);
        }
    }

    /// In RUN: compare what runs with what should, and pick the transition that closes the gap.
    fn reconcile_run(&mut self) {
        if self.state != State::Run {
            return;
        }
        let spec = self.spec();
        let why = match &self.container {
            None => Some((Transition::Restart, "no container".to_string())),
            Some(c) if c.state != RunState::Running => {
                Some((Transition::Restart, format!("container not running ({})", exit_text(c.exit_code))))
            }
            Some(c) if c.image != spec.image_ref() && self.kv_pending => {
                tracing::info!(container = %self.cfg.name, image = %c.image, "keeping the running version until the KV answers");
                None
            }
            Some(c) if c.image != spec.image_ref() => Some((Transition::Update, format!("image {} → {}", c.image, spec.image_ref()))),
            Some(c) if c.label(LABEL_SPEC) != Some(spec.hash().as_str()) => Some((Transition::Restart, "definition changed".to_string())),
            Some(c) if c.health == RuntimeHealth::Unhealthy => {
                Some((Transition::Restart, "Docker reports the container unhealthy".to_string()))
            }
            Some(_) => None,
        };
        if let Some((t, why)) = why {
            self.want(t, why);
        }
    }

    async fn on_runtime_event(&mut self, event: RuntimeEvent) {
        let ours = self.container.as_ref().is_some_and(|c| c.id == event.container_id);
        if !ours {
            return;
        }
        let c = self.container.as_mut().expect("checked above");
        match event.kind {
            RuntimeEventKind::Started => {
                c.state = RunState::Running;
                return;
            }
            RuntimeEventKind::Health(h) => {
                c.health = h;
                if h == RuntimeHealth::Unhealthy && self.state == State::Run {
                    self.failed("Docker reports the container unhealthy".into()).await;
                }
            }
            RuntimeEventKind::Died { exit_code } => {
                // A death already seen (by an inspect that found the container exited) is no news.
                let was_running = c.state == RunState::Running;
                c.state = RunState::Exited;
                c.exit_code = exit_code;
                self.stop_probe();
                if matches!(self.state, State::Run | State::Start | State::Restart | State::Update)
                    && (self.cancel_job.is_none() || self.state == State::Update)
                {
                    let why = format!("container died ({})", exit_text(exit_code));
                    // An engine stopping without live-restore kills its containers and stops
                    // answering: no crash of the container, and no reason to roll a new version back.
                    // It is replaced all the same, once the engine is back.
                    match self.inspect(&event.container_id).await {
                        Err(RuntimeError::Unavailable(_)) => self.last_error = Some(format!("{why}: the container runtime went away")),
                        _ => {
                            self.failed(why.clone()).await;
                            self.revive_during_update(&why);
                        }
                    }
                } else if was_running
                    && matches!(self.state, State::Start | State::Restart)
                    && self.cancel_job.is_some()
                    && !self.taking_down
                {
                    // The container a replacement is waiting to take down (for a slot, say) died on
                    // its own: it is down already, so the replacement goes ahead now, without a slot.
                    // A crash of the old container, not a failure of the version coming in.
                    let why = format!("container died ({}) while its replacement waited", exit_text(exit_code));
                    tracing::warn!(container = %self.cfg.name, reason = %why, "replacing it at once");
                    self.next_delay = self.crash.failed(Instant::now());
                    self.last_error = Some(why);
                    self.remediating = true;
                    self.start_provision(true).await;
                }
            }
            RuntimeEventKind::Destroyed => {
                self.container = None;
                self.stop_probe();
                if matches!(self.state, State::Run | State::Start | State::Restart) && self.cancel_job.is_none() {
                    self.failed("container was removed".into()).await;
                }
            }
        }
        self.after_observation().await;
    }

    /// A look at one container, bounded: the machine answers status and operators while it waits, so
    /// an engine that hangs must not hold it (an engine that does not answer in time is unavailable).
    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        tokio::time::timeout(INSPECT_LIMIT, self.deps.runtime.inspect(id))
            .await
            .unwrap_or_else(|_| Err(RuntimeError::Unavailable(format!("inspecting {id} took longer than {INSPECT_LIMIT:?}"))))
    }

    /// The running container failed while its update waits for a pull (a registry that refuses, a
    /// tag not pushed yet): bring back the version it ran at once, and update once the pull works.
    fn revive_during_update(&mut self, why: &str) {
        if self.state == State::Update && self.container.as_ref().is_some_and(|c| c.state != RunState::Running) {
            self.want(Transition::Restart, format!("{why} while its update waits for the pull; bringing it back"));
        }
    }

    /// Re-reads the container after the event stream was interrupted, and retries a job that found
    /// the runtime unreachable.
    async fn resync(&mut self) {
        if let Some(id) = self.container.as_ref().map(|c| c.id.clone()) {
            let found = match self.inspect(&id).await {
                Ok(found) => found,
                Err(e) => return tracing::warn!(container = %self.cfg.name, error = %e, "resync failed"),
            };
            let was_running = self.container.as_ref().is_some_and(|c| c.state == RunState::Running);
            self.container = found;
            let running = self.container.as_ref().is_some_and(|c| c.state == RunState::Running);
            if was_running && !running {
                // Most likely stopped by the engine itself going down (no live-restore): replaced
                // below, but neither a crash of the container nor a reason to roll a new version back.
                self.last_error = Some("container stopped while the runtime was unreachable".into());
            }
        }
        if self.waiting_for_runtime {
            self.enter().await;
        } else {
            self.after_observation().await;
        }
    }

    /// Records a failure of the container and arranges its replacement: with backoff, or, when a new
    /// version fails its health gate, by rolling back to the last version that passed it.
    async fn failed(&mut self, why: String) {
        tracing::warn!(container = %self.cfg.name, state = %self.state, reason = %why, "container failed");
        // Its replacement brings back a container that is down already.
        self.remediating = true;
        if matches!(self.state, State::Start | State::Restart) && self.trying_new_version() {
            self.roll_back(why).await;
            return;
        }
        self.next_delay = self.crash.failed(Instant::now());
        self.last_error = Some(why);
        if matches!(self.state, State::Start | State::Restart) {
            // A container that cannot come up must not hold the fleet's slot through its backoff;
            // the next attempt campaigns again.
            self.lease = None;
        }
    }

    async fn roll_back(&mut self, why: String) {
        let failed = self.spec().image_ref();
        if let Some(asked) = self.kv_asks() {
            // Asked of the whole fleet: tell the nodes still waiting.
            let (kv, name, version, node, why) =
                (self.deps.kv.clone(), self.cfg.name.clone(), asked.clone(), self.deps.node.clone(), why.clone());
            tokio::spawn(async move { rollback_mark::record(&*kv, &name, &version, &node, &why).await });
        }
        self.bad_version = Some(self.wanted_version());
        self.bad_version_node = None;
        self.remember().await;
        let message = format!("rolled back from {failed} to {}: {why}", self.spec().image_ref());
        tracing::warn!(container = %self.cfg.name, "{message}");
        self.publish_event("rollback", &message).await;
        self.last_error = Some(message);
        self.next_delay = Duration::ZERO;
    }

    /// After the container's observed state changed: in RUN reconcile, in a gate re-check or retry.
    async fn after_observation(&mut self) {
        match self.state {
            State::Run => self.reconcile_run(),
            State::Start | State::Restart if self.cancel_job.is_none() => {
                let running = self.container.as_ref().is_some_and(|c| c.state == RunState::Running);
                let unhealthy = self.container.as_ref().is_some_and(|c| c.health == RuntimeHealth::Unhealthy);
                if !running || unhealthy {
                    if unhealthy {
                        self.failed("Docker reports the new container unhealthy".into()).await;
                    }
                    self.start_provision(true).await;
                } else {
                    self.check_gate();
                }
            }
            _ => {}
        }
    }

    async fn on_desired_version(&mut self, raw: Option<String>) {
        let parsed = match raw.as_deref().map(str::trim) {
            None => None,
            Some(v) => match ImageVersion::parse(v) {
                Ok(v) => Some(v),
                Err(e) => {
                    let msg = format!("ignored KV value for {}: {e}", tag_key(&self.cfg.name));
                    tracing::warn!(container = %self.cfg.name, "{msg}");
                    self.last_error = Some(msg.clone());
                    self.notice(&msg).await;
                    return;
                }
            },
        };
        if std::mem::take(&mut self.kv_pending) && self.state == State::Run {
            // Now it is known whether the version that runs is the one asked for.
            self.reconcile_run();
        }
        if parsed == self.kv_version {
            return;
        }
        let before = self.spec().image_ref();
        self.kv_version = parsed;
        self.clear_bad_version();
        self.forget_pull_failures();
        self.remember().await;
        let after = self.spec().image_ref();
        if before == after {
            return;
        }
        tracing::info!(container = %self.cfg.name, from = %before, to = %after, "desired image changed");
        match self.state {
            State::Run => self.reconcile_run(),
            State::Start | State::Restart => self.want(Transition::Update, format!("KV: {after}")),
            // A newer tag while pulling the previous one: pull the newer one instead.
            State::Update => self.enter().await,
            State::Stop | State::Maintenance => {}
        }
    }

    async fn reconfigure(&mut self, cfg: ContainerConfig) {
        let before = self.spec().hash();
        let watches_changed = (cfg.kv_update, &cfg.restart_files) != (self.cfg.kv_update, &self.cfg.restart_files);
        let probe_changed = cfg.health_check != self.cfg.health_check;
        let registrations_changed = cfg.register_ports != self.cfg.register_ports;
        if (&cfg.image, &cfg.image_tag) != (&self.cfg.image, &self.cfg.image_tag) {
            self.clear_bad_version();
            self.forget_pull_failures();
        }
        self.crash.reconfigure(cfg.restart_backoff.unwrap_or(self.deps.rollout.restart_backoff));
        self.cfg = cfg;
        if watches_changed {
            for task in self.watch_tasks.drain(..) {
                task.abort();
            }
            self.start_watches();
        }
        if probe_changed && self.probe_task.is_some() {
            self.start_probe();
        }
        if registrations_changed && let Some(publisher) = self.registration.take() {
            publisher.withdraw().await;
            self.register();
        }
        if self.spec().hash() == before {
            return;
        }
        match self.state {
            State::Run => self.reconcile_run(),
            // Replace a container still being brought up with the new definition straight away: the
            // old definition may be the reason it cannot come up.
            State::Start | State::Restart => self.start_provision(true).await,
            State::Update | State::Stop | State::Maintenance => {}
        }
    }

    // ---- jobs ----------------------------------------------------------------------------------

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

    fn spawn_job<F>(&mut self, activity: String, job: impl FnOnce(JobCtx) -> F)
    where
        F: Future<Output = JobOutcome> + Send + 'static,
    {
        let (cancel, cancelled) = watch::channel(false);
        self.cancel_job = Some(cancel);
        self.activity = Some(activity);
        let ctx = JobCtx {
            deps: self.deps.clone(),
            epoch: self.epoch,
            cancelled: cancelled.clone(),
            holder: format!("hoist {} @ {}", self.cfg.name, self.deps.node),
            component: self.machine_name(),
            tx: self.tx.clone(),
        };
        let fut = job(ctx);
        let (tx, epoch) = (self.tx.clone(), self.epoch);
        let task = tokio::spawn(async move {
            let outcome = fut.await;
            // A superseded job's slot is nobody's: dropped here, it is released, rather than handed
            // to a machine that may already have shut down.
            if *cancelled.borrow() {
                return;
            }
            let _ = tx.send(Input::JobDone { epoch, outcome: Box::new(outcome) }).await;
        });
        self.job = Some(task);
    }

    /// START (`replace` false: adopt a matching running container) or RESTART (always a fresh one).
    async fn start_provision(&mut self, replace: bool) {
        self.supersede();
        let spec = self.spec();
        let existing = self.container.clone();
        self.replacing = existing.as_ref().map(|c| c.id.clone());
        let backoff = std::mem::take(&mut self.next_delay);
        let pull_wait = self.pull_wait();
        let delay = backoff.max(pull_wait);
        let turn = Turn {
            restart: self.cfg.restart_governor.clone(),
            held: self.lease.as_ref().map(|slot| slot.lease().clone()),
            update: self.cfg.update_governor.clone(),
            check_fleet_mark: self.kv_asks().is_some() && self.trying_new_version(),
            remediation: std::mem::take(&mut self.remediating),
            stop_grace: self.cfg.stop_grace(&self.deps.docker),
        };
        let activity = if delay.is_zero() {
            format!("starting {}", spec.image_ref())
        } else if pull_wait >= backoff {
            format!("retrying the pull in {:.0} s", delay.as_secs_f64().ceil())
        } else {
            format!("restart in {:.1} s (backoff after {} failures)", delay.as_secs_f64(), self.crash.consecutive())
        };
        self.spawn_job(activity, move |ctx| async move {
            let mut lease = None;
            let result = ctx.provision(&spec, existing, replace, delay, turn, &mut lease).await;
            JobOutcome { lease, result }
        });
    }

    /// How long until a pull may be tried again after a failed one.
    fn pull_wait(&self) -> Duration {
        self.pull_due.map_or(Duration::ZERO, |due| due.saturating_duration_since(Instant::now()))
    }

    /// A new version to pull: earlier pull failures were about another one.
    fn forget_pull_failures(&mut self) {
        self.pull_retry.reset();
        self.pull_due = None;
    }

    fn start_pull(&mut self) {
        let spec = self.spec();
        let image = spec.image_ref();
        let governor = self.cfg.update_governor.clone();
        // Read before the pull, so a version the fleet already rejected is not even fetched here.
        let check_fleet_mark = self.kv_asks().is_some() && self.trying_new_version();
        // A version no node has passed yet is fetched only by a node about to try it: one that has its
        // restart slot (taken here, and kept for the RESTART that follows). Once a node has passed its
        // gate with it, the others fetch it ahead of their turn, so the slot covers no pull.
        let try_first =
            self.cfg.restart_governor.clone().filter(|_| {
                check_fleet_mark && self.lease.is_none() && self.container.as_ref().is_some_and(|c| c.state == RunState::Running)
            });
        let wait = self.pull_wait();
        let activity =
            if wait.is_zero() { format!("pulling {image}") } else { format!("retrying the pull in {:.0} s", wait.as_secs_f64().ceil()) };
        self.spawn_job(activity, move |ctx| async move {
            let result = async {
                if !wait.is_zero()
                    && let Err(e) = ctx.or_cancelled(tokio::time::sleep(wait)).await
                {
                    return (None, Err(e));
                }
                let rejected = || async { rollback_mark::find(&*ctx.deps.kv, &spec.name, &spec.version).await };
                if check_fleet_mark && let Some(mark) = rejected().await {
                    return (None, Ok(JobDone::RolledBackElsewhere(mark)));
                }
                let mut restart_slot = None;
                if let Some(restart) = try_first
                    && !rollback_mark::verified(&*ctx.deps.kv, &spec.name, &spec.version).await
                {
                    // The wait for the slot, in short turns, ends early once another node has passed
                    // with the version (then it is fetched at once, ahead of this node's turn) or
                    // rolled it back. Short turns, not a cancelled wait: a campaign cut off before its
                    // reply could leave a lease nobody holds.
                    ctx.progress(format!("waiting for a slot of governor {restart}, to try a version no node has passed yet")).await;
                    loop {
                        match ctx.acquire_within(&restart, VERIFIED_POLL).await {
                            Ok(Some(slot)) => {
                                restart_slot = Some(slot);
                                break;
                            }
                            Ok(None) => {}
                            Err(e) => return (None, Err(e)),
                        }
                        if rollback_mark::verified(&*ctx.deps.kv, &spec.name, &spec.version).await || rejected().await.is_some() {
                            break;
                        }
                    }
                    // The verdict of whoever had the slot before.
                    if let Some(mark) = rejected().await {
                        return (None, Ok(JobDone::RolledBackElsewhere(mark)));
                    }
                }
                // The update governor limits concurrent pulls only; its slot is dropped (released)
                // with the pull. The restart that follows is governed by the restart governor.
                let mut slot = None;
                ctx.progress(format!("pulling {image}")).await;
                let pulled = ctx.pull(&image, governor, &mut slot).await.map(JobDone::Pulled);
                // A pull that failed keeps no restart slot: nothing is being taken down.
                (restart_slot.filter(|_| pulled.is_ok()), pulled)
            }
            .await;
            JobOutcome { lease: result.0, result: result.1 }
        });
    }

    fn start_stop(&mut self) {
        let id = self.container.as_ref().filter(|c| c.state == RunState::Running).map(|c| c.id.clone());
        let grace = self.cfg.stop_grace(&self.deps.docker);
        self.spawn_job(format!("stopping, {} grace", humantime::format_duration(grace)), move |ctx| async move {
            let result = match id {
                Some(id) => ctx.deps.runtime.stop(&id, grace).await.map_err(JobError::from),
                None => Ok(()),
            };
            JobOutcome { lease: None, result: result.map(|()| JobDone::Stopped) }
        });
    }

    async fn on_job_done(&mut self, epoch: u64, outcome: JobOutcome) {
        if epoch != self.epoch {
            // Stale: its slot, if any, is released as the outcome is dropped.
            return;
        }
        self.cancel_job = None;
        self.activity = None;
        if let Some(lease) = outcome.lease {
            self.lease = Some(lease);
        }
        match outcome.result {
            Ok(JobDone::Running { info, adopted }) => {
                if self.replacing.take().is_some() && !adopted {
                    self.restarts += 1;
                    self.remember().await;
                }
                // Events of the new container that arrived before this outcome were not yet ours and
                // were dropped; a fresh look catches one that already died or turned unhealthy.
                let info = match self.inspect(&info.id).await {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) => ContainerInfo { state: RunState::Dead, ..info },
                    Err(_) => info,
                };
                let exited = (info.state != RunState::Running).then_some(info.exit_code);
                self.container = Some(info);
                match exited {
                    Some(exit_code) => {
                        self.failed(format!("container died ({})", exit_text(exit_code))).await;
                        self.start_provision(true).await;
                    }
                    None => self.begin_gate(adopted),
                }
            }
            Ok(JobDone::Pulled(image_id)) => {
                self.forget_pull_failures();
                self.update_pulled = true;
                // `update` of a moving tag (latest) that still names the image already running: go
                // through RESTART without replacing anything.
                let spec = self.spec();
                self.keep_unchanged = self.container.as_ref().is_some_and(|c| {
                    c.state == RunState::Running && c.image_id == image_id && c.label(LABEL_SPEC) == Some(spec.hash().as_str())
                });
                let why = if self.keep_unchanged { "unchanged" } else { "pulled" };
                self.want(Transition::Restart, format!("{why} {}", spec.image_ref()));
            }
            Ok(JobDone::RolledBackElsewhere(mark)) => {
                let message = format!("{} was rolled back on {}: {}; not tried here", mark.version, mark.node, mark.reason);
                tracing::warn!(container = %self.cfg.name, "{message}");
                self.bad_version = Some(self.wanted_version());
                self.bad_version_node = Some(mark.node);
                self.remember().await;
                self.notice(&message).await;
                self.last_error = Some(message);
                self.lease = None;
                // Towards the last good version, keeping the container if it runs it: from UPDATE
                // (the mark was read before pulling) through RESTART, in START/RESTART again.
                self.keep_unchanged = true;
                self.update_pulled = true;
                if self.state == State::Update {
                    self.want(Transition::Restart, "the fleet rolled this version back".into());
                } else {
                    self.enter().await;
                }
            }
            Ok(JobDone::NeedsPull) => {
                let image = self.spec().image_ref();
                self.want(Transition::Update, format!("{image} is pulled first; the running container is left alone meanwhile"));
            }
            Ok(JobDone::Stopped) => {
                if let Some(c) = self.container.as_mut() {
                    c.state = RunState::Exited;
                }
                self.want(Transition::Maintenance, "stopped by operator".into());
            }
            Err(JobError::RuntimeUnavailable(e)) => self.wait_for_runtime(e.to_string()).await,
            Err(JobError::Backend(e)) => self.wait_for_backend(e).await,
            Err(JobError::Pull(e)) => {
                let e = e.to_string();
                tracing::warn!(container = %self.cfg.name, state = %self.state, error = %e, "pull failed");
                if self.pull_due.is_none() {
                    self.notice(&e).await;
                }
                self.last_error = Some(e);
                let delay = self.pull_retry.next_wait();
                self.pull_due = Some(Instant::now() + delay);
                match self.state {
                    // Nothing runs that this could replace (a first start, or a container that is
                    // gone): try again after the pull backoff.
                    State::Start | State::Restart => self.start_provision(true).await,
                    State::Update => {
                        self.activity = Some(format!("retrying the pull in {:.0} s", delay.as_secs_f64().ceil()));
                        self.timer(self.epoch, TimerKind::RetryPull, delay);
                    }
                    State::Run | State::Stop | State::Maintenance => {}
                }
            }
            Err(JobError::Failed(e)) => {
                tracing::warn!(container = %self.cfg.name, state = %self.state, error = %e, "job failed");
                self.notice(&e).await;
                match self.state {
                    State::Start | State::Restart => {
                        // The same path as a container failing its gate: a new version that cannot
                        // even be started is rolled back, anything else frees its slot and backs off
                        // (at least 1 s: a job error, unlike a death, is rarely cured at once).
                        let rolls_back = self.trying_new_version();
                        self.failed(e).await;
                        if !rolls_back {
                            self.next_delay = self.next_delay.max(Duration::from_secs(1));
                        }
                        self.start_provision(true).await
                    }
                    State::Update => {
                        // Retry after a backoff, which is no crash: the running container is untouched.
                        self.last_error = Some(e);
                        let delay = self.pull_retry.next_wait();
                        self.pull_due = Some(Instant::now() + delay);
                        self.activity = Some(format!("retrying the pull in {:.0} s", delay.as_secs_f64().ceil()));
                        self.timer(self.epoch, TimerKind::RetryPull, delay);
                    }
                    State::Stop => {
                        self.want(Transition::Maintenance, format!("stop failed: {e}"));
                        self.last_error = Some(e);
                    }
                    State::Run | State::Maintenance => self.last_error = Some(e),
                }
            }
        }
    }

    /// A job could not reach the runtime. Retried when the agent reports the runtime back (`Resync`),
    /// or after `RUNTIME_RETRY` in case the outage was too short for the event stream to notice; no
    /// governor slot is held meanwhile, since the fleet should not wait on a node without an engine.
    async fn wait_for_runtime(&mut self, why: String) {
        tracing::warn!(container = %self.cfg.name, state = %self.state, error = %why, "waiting for the container runtime");
        if !self.waiting_for_runtime {
            self.notice(&why).await;
        }
        self.last_error = Some(why);
        self.waiting_for_runtime = true;
        self.activity = Some("waiting for the container runtime".into());
        if matches!(self.state, State::Start | State::Restart) {
            self.lease = None;
        }
        self.timer(self.epoch, TimerKind::RuntimeRetry, RUNTIME_RETRY);
    }

    /// A job could not reach the coordination backend, or waited out `governor_timeout`. That says
    /// nothing about the container or its version: no crash count, no rollback, no fleet mark. A slot
    /// the machine holds is kept (its container may be down, so letting go would let another node
    /// take one down too); the job is tried again with a growing wait.
    async fn wait_for_backend(&mut self, why: String) {
        tracing::warn!(container = %self.cfg.name, state = %self.state, error = %why, "waiting for the coordination backend");
        let delay = self.backend_retry.next_wait();
        self.last_error = Some(why.clone());
        self.activity = Some(format!("waiting for the coordination backend ({why}); trying again in {:.0} s", delay.as_secs_f64().ceil()));
        self.timer(self.epoch, TimerKind::BackendRetry, delay);
    }

    // ---- health gate ---------------------------------------------------------------------------

    fn begin_gate(&mut self, adopted: bool) {
        self.gate = Gate { adopted, ..Gate::default() };
        self.start_probe();
        let epoch = self.epoch;
        self.timer(epoch, TimerKind::GateDeadline, self.deps.rollout.healthy_deadline);
        if self.cfg.health_check.is_none() {
            let remaining = self.deps.rollout.unverified_wait.saturating_sub(self.uptime_credit());
            self.timer(epoch, TimerKind::Unverified, remaining);
        }
        self.activity = Some("waiting for the container to become healthy".into());
        self.check_gate();
    }

    fn uptime_credit(&self) -> Duration {
        self.container.as_ref().map_or(Duration::ZERO, |c| gate_credit(self.gate.adopted, c.started_at, unix_now()))
    }

    fn check_gate(&mut self) {
        if !matches!(self.state, State::Start | State::Restart) || self.cancel_job.is_some() {
            return;
        }
        let Some(c) = &self.container else { return };
        let docker_ok = matches!(c.health, RuntimeHealth::None | RuntimeHealth::Healthy);
        let checked = self.cfg.health_check.is_some() || c.health != RuntimeHealth::None;
        let hoist_ok =
            if self.cfg.health_check.is_some() { self.gate.probe_passed } else { self.gate.waited || c.health == RuntimeHealth::Healthy };
        if !(c.state == RunState::Running && docker_ok && hoist_ok) {
            self.gate.healthy_since = None;
            return;
        }
        if checked {
            // Healthy once is not enough: it must stay healthy for `min_healthy_time` (an adopted
            // container's time up counts) before the gate passes and the governor slot is freed.
            let needed = self.deps.rollout.min_healthy_time.saturating_sub(self.uptime_credit());
            let streak_starts = self.gate.healthy_since.is_none();
            let since = *self.gate.healthy_since.get_or_insert_with(Instant::now);
            let remaining = needed.saturating_sub(since.elapsed());
            if remaining > Duration::ZERO {
                if streak_starts {
                    self.activity = Some(format!("healthy; confirming for {}s", remaining.as_secs_f64().ceil()));
                    self.timer(self.epoch, TimerKind::MinHealthy, remaining);
                }
                return;
            }
        }
        let how = match (c.health, &self.cfg.health_check) {
            (_, Some(_)) | (RuntimeHealth::Healthy, None) => "healthy",
            _ => "running, unverified (no health check)",
        };
        if let Some(asked) = self.kv_asks().filter(|_| self.trying_new_version()) {
            // The fleet's first pass of this version: the nodes waiting may fetch it now.
            let (kv, name, version, node) = (self.deps.kv.clone(), self.cfg.name.clone(), asked.clone(), self.deps.node.clone());
            tokio::spawn(async move { rollback_mark::record_verified(&*kv, &name, &version, &node).await });
        }
        self.want(Transition::HealthCheck, how.into());
    }

    async fn on_timer(&mut self, timer: TimerKind) {
        match timer {
            TimerKind::Unverified => {
                self.gate.waited = true;
                self.check_gate();
            }
            TimerKind::GateDeadline if matches!(self.state, State::Start | State::Restart) && self.cancel_job.is_none() => {
                self.failed(format!("not healthy within {}", humantime::format_duration(self.deps.rollout.healthy_deadline))).await;
                self.start_provision(true).await;
            }
            TimerKind::RetryPull if self.state == State::Update => self.enter().await,
            TimerKind::MinHealthy => self.check_gate(),
            TimerKind::RuntimeRetry if self.waiting_for_runtime => self.enter().await,
            TimerKind::BackendRetry => self.enter().await,
            TimerKind::GateDeadline | TimerKind::RetryPull | TimerKind::RuntimeRetry => {}
        }
    }

    fn timer(&self, epoch: u64, timer: TimerKind, after: Duration) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Input::Timer { epoch, timer }).await;
        });
    }

    // ---- probes --------------------------------------------------------------------------------

    fn start_probe(&mut self) {
        self.stop_probe();
        let (Some(check), Some(container)) = (self.cfg.health_check.clone(), self.container.clone()) else { return };
        if container.state != RunState::Running {
            return;
        }
        let runtime = self.deps.runtime.clone();
        let tx = self.tx.clone();
        let epoch = self.epoch;
        let task = tokio::spawn(async move {
            loop {
                let result = runtime.probe(&container, &check.probe, check.timeout).await;
                if tx.send(Input::Probe { epoch, result }).await.is_err() {
                    return;
                }
                tokio::time::sleep(check.interval).await;
            }
        });
        self.probe_task = Some(task.abort_handle());
    }

    fn stop_probe(&mut self) {
        if let Some(task) = self.probe_task.take() {
            task.abort();
        }
    }

    async fn on_probe(&mut self, result: Result<(), ProbeError>) {
        let Some(check) = &self.cfg.health_check else { return };
        match result {
            Ok(()) => {
                let name = self.cfg.name.clone();
                self.deps.conditions.clear_if("probes", |p| p.starts_with(&format!("{name}:")));
                self.gate.probe_failures = 0;
                self.gate.probe_passed = true;
                self.check_gate();
            }
            // An engine restarting with live-restore keeps the container serving; an exec probe just
            // cannot ask it meanwhile. That is no failure of the container.
            Err(ProbeError::RuntimeUnavailable(why)) => {
                tracing::debug!(container = %self.cfg.name, %why, "probe could not run");
            }
            // Out of descriptors or memory here says nothing about the container: no verdict, and a
            // warning for the operator, since the host needs attention.
            Err(ProbeError::Local(why)) => {
                self.deps
                    .conditions
                    .set("probes", Some(format!("{}: health check could not run on this host ({why}); no verdict", self.cfg.name)));
            }
            Err(ProbeError::Failed(why)) => {
                let started = self.container.as_ref().map_or(0, |c| c.started_at);
                if (unix_now() - started) < check.start_period.as_secs() as i64 {
                    return;
                }
                self.gate.probe_failures += 1;
                self.gate.healthy_since = None;
                tracing::debug!(container = %self.cfg.name, failures = self.gate.probe_failures, reason = %why, "probe failed");
                if self.gate.probe_failures >= check.retries.max(1) {
                    let why = format!("health check failed {} times: {why}", self.gate.probe_failures);
                    self.gate.probe_failures = 0;
                    match self.state {
                        State::Run => {
                            self.failed(why.clone()).await;
                            self.want(Transition::Restart, why);
                        }
                        State::Start | State::Restart if self.cancel_job.is_none() => {
                            self.failed(why).await;
                            self.start_provision(true).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    // ---- watches -------------------------------------------------------------------------------

    fn start_watches(&mut self) {
        if self.cfg.kv_update {
            let kv = self.deps.kv.clone();
            let tx = self.tx.clone();
            let key = tag_key(&self.cfg.name);
            let resync = self.cfg.kv_interval.max(Duration::from_secs(60));
            let task = tokio::spawn(watch_desired_tag(kv, key, resync, tx));
            self.watch_tasks.push(task.abort_handle());
        }
        if !self.cfg.restart_files.is_empty() {
            let mut touched = self.deps.files.watch(&self.cfg.restart_files);
            let tx = self.tx.clone();
            let task = tokio::spawn(async move {
                while let Some(path) = touched.next().await {
                    if tx.send(Input::FileTouched(path)).await.is_err() {
                        return;
                    }
                }
            });
            self.watch_tasks.push(task.abort_handle());
        }
    }

    // ---- leases, events, status ----------------------------------------------------------------

    async fn shutdown(&mut self, remove: bool) {
        self.supersede();
        if let Some(job) = self.job.take() {
            // Cancelled jobs end at their next await point; bound the wait in case the runtime hangs.
            let _ = tokio::time::timeout(Duration::from_secs(10), job).await;
        }
        for task in self.watch_tasks.drain(..) {
            task.abort();
        }
        self.lease = None;
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

    async fn remember(&self) {
        let remembered = Remembered {
            state: self.state,
            desired_version: self.kv_version.as_ref().map(|v| v.to_string()),
            last_good_image: self.last_good_image.clone(),
            restarts: self.restarts,
            bad_version: self.bad_version.as_ref().map(|v| v.to_string()),
            bad_version_node: self.bad_version_node.clone(),
            container_id: self.container.as_ref().map(|c| c.id.clone()),
        };
        if let Err(e) = self.deps.store.save(&self.cfg.name, &remembered).await {
            tracing::warn!(container = %self.cfg.name, error = %e, "could not save machine state");
        }
    }

    /// The transition just made (from `from` to the current state).
    async fn publish(&self, transition: Transition, from: State, why: &str) {
        self.emit(transition.as_str(), from, why).await;
    }

    /// A problem worth an event but no state change (a refused KV value, a failed pull).
    async fn notice(&self, message: &str) {
        self.publish_event("error", message).await;
    }

    /// An event that is not a state change (an error, a rollback), in the transition shape with
    /// from = to = the current state, so Choria tools show it in the same stream.
    async fn publish_event(&self, kind: &str, message: &str) {
        self.emit(kind, self.state, message).await;
    }

    async fn emit(&self, kind: &str, from: State, detail: &str) {
        let event = TransitionEvent {
            protocol: TRANSITION_PROTOCOL.into(),
            identity: self.deps.node.clone(),
            id: self.instance_id.clone(),
            version: MACHINE_VERSION.into(),
            timestamp: unix_now(),
            machine: self.machine_name(),
            transition: kind.into(),
            from_state: from.to_string(),
            to_state: self.state.to_string(),
            detail: Some(detail.to_string()),
            image: Some(self.spec().image_ref()),
        };
        if let Err(e) = self.deps.events.publish(&event).await {
            tracing::debug!(error = %e, kind, "could not publish an event");
        }
    }

    fn rollback_condition(&self) -> Option<String> {
        let bad = self.bad_version.as_ref()?;
        let what = match &self.bad_version_node {
            Some(node) => format!("{bad} was rolled back on {node}, so not tried here"),
            None => format!("{bad} failed its health gate and was rolled back"),
        };
        Some(format!("{what}; not retried until the desired version changes or `update` is requested"))
    }

    /// Whether there was a mark to clear.
    fn clear_bad_version(&mut self) -> bool {
        self.bad_version_node = None;
        self.bad_version.take().is_some()
    }

    fn status(&self) -> MachineStatus {
        let spec = self.spec();
        let running = self.container.as_ref().filter(|c| c.state == RunState::Running);
        let health = match running {
            None => Health::Down,
            Some(c) => match (c.health, self.state, self.cfg.health_check.is_some()) {
                (RuntimeHealth::Unhealthy, ..) => Health::Unhealthy,
                (_, State::Start | State::Restart, _) => Health::Starting,
                (RuntimeHealth::Healthy, ..) | (_, _, true) => Health::Healthy,
                (RuntimeHealth::Starting, ..) => Health::Starting,
                _ => Health::Unverified,
            },
        };
        let image = self.container.as_ref().map(|c| c.image.clone());
        let version = image.as_deref().and_then(version_of).unwrap_or_else(|| spec.version.to_string());
        MachineStatus {
            name: self.machine_name(),
            container: self.cfg.name.clone(),
            node: self.deps.node.clone(),
            id: self.instance_id.clone(),
            state: self.state,
            version,
            image,
            desired_image: spec.image_ref(),
            container_id: self.container.as_ref().map(|c| c.id.chars().take(12).collect()),
            started: running.map(|c| c.started_at),
            available_transitions: self.state.available_transitions(),
            health,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            condition: self.rollback_condition().or_else(|| self.crash.condition()),
            activity: self.activity.clone(),
            governor_wait_seconds: self.governor_wait.as_secs_f64(),
            last_update_seconds: self.last_update.map(|d| d.as_secs_f64()),
        }
    }
}

/// Follows the container's tag key: the watch delivers changes as they happen; a slow jittered
/// re-read catches anything a reconnect gap lost. Backs off when the backend is unreachable.
async fn watch_desired_tag(kv: Arc<dyn Kv>, key: String, resync: Duration, tx: mpsc::Sender<Input>) {
    let mut retry = Duration::from_millis(500);
    loop {
        match kv.watch(HOIST_BUCKET, &key).await {
            Ok(mut updates) => {
                retry = Duration::from_millis(500);
                // The watch delivers the current value first, if there is one; absent means "use image_tag".
                if let Ok(None) = kv.get(HOIST_BUCKET, &key).await
                    && tx.send(Input::DesiredVersion(None)).await.is_err()
                {
                    return;
                }
                loop {
                    let jitter = rand::rng().random_range(0.8..1.2);
                    tokio::select! {
                        entry = updates.next() => match entry {
                            Some(entry) => {
                                let value = (entry.operation == crate::backend::KvOperation::Put).then(|| entry.value_str());
                                if tx.send(Input::DesiredVersion(value)).await.is_err() {
                                    return;
                                }
                            }
                            None => break,
                        },
                        _ = tokio::time::sleep(resync.mul_f64(jitter)) => {
                            if let Ok(entry) = kv.get(HOIST_BUCKET, &key).await
                                && tx.send(Input::DesiredVersion(entry.map(|e| e.value_str()))).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(key = %key, error = %e, "KV watch unavailable, retrying"),
        }
        tokio::time::sleep(retry).await;
        // Capped low: after a NATS outage this is how soon the tag is followed again.
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

/// How a provision job takes its turn: the governor slots it works under, and whether a version new
/// to this node must first be checked against the fleet's rollback mark.
struct Turn {
    /// Taken before a running container is replaced.
    restart: Option<String>,
    /// A restart slot the machine holds from the update it is now reverting: the revert replaces the
    /// container within it, but only while the governor still counts it.
    held: Option<crate::backend::Lease>,
    /// Taken for the pull of an image that is not present.
    update: Option<String>,
    /// The version comes from the KV and has not run here: another node may have rolled it back.
    check_fleet_mark: bool,
    /// The container being replaced has failed: it is down already, so a governor that cannot be
    /// reached does not hold its replacement back (one that answers "full" still does).
    remediation: bool,
    /// How long the replaced container gets to stop before it is killed.
    stop_grace: Duration,
}

/// What a job may use: the adapters, and a signal that it has been superseded.
struct JobCtx {
    deps: Arc<MachineDeps>,
    epoch: u64,
    cancelled: watch::Receiver<bool>,
    holder: String,
    /// The machine's name, for governor lifecycle events.
    component: String,
    tx: mpsc::Sender<Input>,
}

impl JobCtx {
    async fn or_cancelled<T>(&self, fut: impl Future<Output = T>) -> Result<T, JobError> {
        let mut cancelled = self.cancelled.clone();
        tokio::select! {
            out = fut => Ok(out),
            _ = cancelled.wait_for(|c| *c) => Err(JobError::Failed("superseded".into())),
        }
    }

    /// A slot of `governor` if one is free within `limit`, else None (no lifecycle event: this is a turn
    /// of a longer wait). Errors as `acquire`.
    async fn acquire_within(&self, governor: &str, limit: Duration) -> Result<Option<Slot>, JobError> {
        let began = Instant::now();
        let lease = self.or_cancelled(self.deps.governor.acquire(governor, &self.holder, limit)).await;
        let _ = self.tx.send(Input::GovernorWaited(began.elapsed())).await;
        match lease? {
            Ok(lease) => Ok(Some(self.deps.slots.hold(lease, &self.component, &self.deps.node, &*self.deps.events).await)),
            Err(BackendError::GovernorTimeout(..)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A slot of `governor`. Every error is a backend one (unreachable, missing governor, a wait that
    /// timed out): never a failure of the container.
    async fn acquire(&self, governor: &str) -> Result<Slot, JobError> {
        let timeout = self.deps.rollout.governor_timeout;
        let began = Instant::now();
        self.progress(format!("waiting for a slot of governor {governor}")).await;
        let lease = self.or_cancelled(self.deps.governor.acquire(governor, &self.holder, timeout)).await;
        let _ = self.tx.send(Input::GovernorWaited(began.elapsed())).await;
        match lease? {
            Ok(lease) => Ok(self.deps.slots.hold(lease, &self.component, &self.deps.node, &*self.deps.events).await),
            Err(e) => {
                if matches!(e, BackendError::GovernorTimeout(..)) {
                    slot::lifecycle(&*self.deps.events, &self.deps.node, &self.component, governor, 0, GovernorEventType::Timeouts).await;
                }
                Err(e.into())
            }
        }
    }

    /// Replaces the job's activity line in status.
    async fn progress(&self, activity: String) {
        let _ = self.tx.send(Input::JobProgress { epoch: self.epoch, activity }).await;
    }

    /// Pulls under the update governor, if one is set.
    async fn pull(&self, image: &str, governor: Option<String>, lease: &mut Option<Slot>) -> Result<String, JobError> {
        if let Some(g) = governor {
            *lease = Some(self.acquire(&g).await?);
        }
        let (tx, epoch, image_owned) = (self.tx.clone(), self.epoch, image.to_string());
        let tally = std::sync::Mutex::new(PullTally::default());
        let progress = move |p: crate::runtime::PullProgress| {
            tracing::debug!(image = %image_owned, status = %p.status, current = ?p.current, total = ?p.total, "pull");
            // The lock is this job's own (the runtime calls back from one task); it never contends.
            if let Some(activity) = tally.lock().expect("not poisoned").record(&image_owned, &p) {
                // Progress is advisory: a full channel drops an update rather than stall the pull.
                let _ = tx.try_send(Input::JobProgress { epoch, activity });
            }
        };
        let pulled = self.or_cancelled(self.deps.runtime.pull(image, &progress)).await?;
        Ok(pulled?)
    }

    async fn provision(
        &self,
        spec: &ContainerSpec,
        existing: Option<ContainerInfo>,
        replace: bool,
        delay: Duration,
        turn: Turn,
        lease: &mut Option<Slot>,
    ) -> Result<JobDone, JobError> {
        if delay > Duration::ZERO {
            self.or_cancelled(tokio::time::sleep(delay)).await?;
        }
        let runtime = &self.deps.runtime;
        // A machine that knows of no container looks before it starts one: its agent may have started
        // while the runtime was down, unable to list what runs.
        let existing = match existing {
            Some(c) => Some(c),
            None => {
                let preferred = Preferred { id: None, spec: spec.clone() };
                pick_adoptable(&**runtime, runtime.find(&spec.node, &spec.name).await?, &preferred).await
            }
        };
        if let Some(c) = existing.as_ref().filter(|c| !replace && c.state == RunState::Running)
            && (c.label(LABEL_SPEC) == Some(spec.hash().as_str()) || same_definition_other_version(c, spec))
        {
            tracing::info!(container = %spec.name, id = %c.id, "adopted the running container");
            return Ok(JobDone::Running { info: c.clone(), adopted: true });
        }
        let image = spec.image_ref();
        let running = existing.as_ref().filter(|c| c.state == RunState::Running);
        if runtime.image_id(&image).await?.is_none() {
            if running.is_some() {
                return Ok(JobDone::NeedsPull);
            }
            // Nothing runs that a pull could keep waiting: pull here, under the update governor,
            // whose slot is dropped (released) with the pull.
            let mut pull_slot = None;
            self.pull(&image, turn.update, &mut pull_slot).await?;
        }
        // The restart governor counts the instances hoist takes down. One that is down already
        // (exited, killed, removed, or a first start) takes nothing down and waits for no slot.
        if let Some(g) = turn.restart.filter(|_| running.is_some()) {
            let still_held = match &turn.held {
                // Unknown (the store is unreachable) counts as lost: never replace on a slot not known to be ours.
                Some(held) => self.deps.governor.holds(held).await.unwrap_or(false),
                None => false,
            };
            if !still_held {
                if turn.held.is_some() {
                    tracing::warn!(
                        container = %spec.name,
                        governor = %g,
                        "the governor slot taken for this update was lost (expired, evicted, or the capacity lowered); waiting for a slot again"
                    );
                }
                match self.acquire(&g).await {
                    Ok(slot) => *lease = Some(slot),
                    // A failed container must come back even while the fleet's store is out of reach.
                    Err(JobError::Backend(e)) if turn.remediation => {
                        tracing::warn!(container = %spec.name, governor = %g, error = %e, "replacing a failed container without a slot: the governor cannot be reached");
                    }
                    Err(e) => return Err(e),
                }
                self.progress(format!("starting {image}")).await;
            }
        }
        // Checked after the wait for a slot: that is when an earlier node's verdict is known.
        if turn.check_fleet_mark
            && let Some(mark) = rollback_mark::find(&*self.deps.kv, &spec.name, &spec.version).await
        {
            return Ok(JobDone::RolledBackElsewhere(mark));
        }
        if let Some(old) = &existing {
            if old.state == RunState::Running {
                // Gracefully, as `docker stop` does: the container's stop signal (the image's
                // STOPSIGNAL or `stop_signal`, else SIGTERM), then the grace, then a kill.
                let short: String = old.id.chars().take(12).collect();
                let grace = humantime::format_duration(turn.stop_grace);
                let _ = self.tx.send(Input::TakingDown { epoch: self.epoch }).await;
                tracing::info!(container = %spec.name, id = %short, %grace, "stopping the replaced container");
                self.progress(format!("stopping {short}, {grace} grace")).await;
                self.or_cancelled(runtime.stop(&old.id, turn.stop_grace)).await??;
            }
            self.or_cancelled(runtime.remove(&old.id)).await??;
        }
        let info = self.or_cancelled(runtime.run(spec)).await??;
        Ok(JobDone::Running { info, adopted: false })
    }
}

/// Whether `c` runs the definition `spec` describes, only at another version (its own tag): adopted at
/// start, it keeps serving while the machine updates it, instead of being replaced before the new
/// image is even here (and it is kept if the KV, not read yet, still asks for what it runs).
fn same_definition_other_version(c: &ContainerInfo, spec: &ContainerSpec) -> bool {
    let Some(version) = version_of(&c.image).and_then(|v| ImageVersion::parse(&v).ok()) else { return false };
    let other = ContainerSpec { version, ..spec.clone() };
    c.label(LABEL_SPEC) == Some(other.hash().as_str()) && c.image == other.image_ref()
}

/// What a machine knows of the container it should adopt.
pub(crate) struct Preferred {
    /// The container it managed before (from its state file).
    pub id: Option<String>,
    /// What it wants to run.
    pub spec: ContainerSpec,
}

/// The container to adopt among several of one name (left by a crash mid-replacement, or a look-alike
/// someone made with copied labels): the one the machine managed before, else one under hoist's own
/// name for it that matches the definition, else one under its name, each preferring a running one,
/// then the newest. Never a stopped or foreign container over a running one of its own. Duplicates
/// under hoist's name are removed; a container that only copies the labels is left alone.
pub(crate) async fn pick_adoptable(runtime: &dyn Runtime, candidates: Vec<ContainerInfo>, preferred: &Preferred) -> Option<ContainerInfo> {
    let hash = preferred.spec.hash();
    let rank = |c: &ContainerInfo| {
        let named = c.container_name == preferred.spec.container_name;
        let matching = named && c.label(LABEL_SPEC) == Some(hash.as_str()) && c.image == preferred.spec.image_ref();
        let running = c.state == RunState::Running;
        (preferred.id.as_deref() == Some(c.id.as_str()) && running, running && matching, running && named, running, named, c.created)
    };
    let mut candidates = candidates;
    candidates.sort_by_key(|c| std::cmp::Reverse(rank(c)));
    let mut candidates = candidates.into_iter();
    let keep = candidates.next();
    for extra in candidates {
        // A leftover of a replacement hoist was in the middle of holds hoist's name for it (or held
        // it: a stopped one renamed by nobody); anything else is someone's copy.
        if extra.container_name == preferred.spec.container_name || extra.state != RunState::Running {
            tracing::warn!(container = %extra.container_name, id = %extra.id, "removing a duplicate container");
            let _ = runtime.remove(&extra.id).await;
        } else {
            tracing::warn!(container = %extra.container_name, id = %extra.id, "a container carries this machine's labels under another name; left alone");
        }
    }
    keep
}

/// Bytes pulled so far across layers, turned into an activity line at most twice a second.
#[derive(Default)]
struct PullTally {
    layers: std::collections::HashMap<String, (u64, u64)>,
    last_report: Option<Instant>,
}

impl PullTally {
    fn record(&mut self, image: &str, p: &crate::runtime::PullProgress) -> Option<String> {
        if let (Some(layer), Some(current), Some(total)) = (&p.layer, p.current, p.total) {
            self.layers.insert(layer.clone(), (current, total));
        }
        if self.last_report.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return None;
        }
        self.last_report = Some(Instant::now());
        let (done, total) = self.layers.values().fold((0, 0), |(d, t), (c, n)| (d + c, t + n));
        let mb = |b: u64| b as f64 / 1_000_000.0;
        Some(format!("pulling {image}: {:.1}/{:.1} MB, {} layer(s)", mb(done), mb(total), self.layers.len()))
    }
}

fn exit_text(code: Option<i64>) -> String {
    code.map_or_else(|| "no exit code".into(), |c| format!("exit {c}"))
}

/// The tag or digest of an image reference.
fn version_of(image: &str) -> Option<String> {
    if let Some((_, digest)) = image.split_once('@') {
        return Some(digest.to_string());
    }
    let last = image.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag.to_string())
}

/// The part of a health gate's wait a container has already served: for an adopted one, whole seconds
/// since it started less one for the precision of `started_at` (seconds); for one this machine just
/// started, none, since its `started_at` may already lie in the previous second.
fn gate_credit(adopted: bool, started_at: i64, now: i64) -> Duration {
    if adopted { Duration::from_secs((now - started_at - 1).max(0) as u64) } else { Duration::ZERO }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A random UUIDv4 string, the form Choria uses for machine instance ids.
/// A random (version 4) UUID: machine instance ids and event ids, as Choria makes them.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PullProgress;

    fn progress(layer: &str, current: u64, total: u64) -> PullProgress {
        PullProgress { layer: Some(layer.into()), status: "Downloading".into(), current: Some(current), total: Some(total) }
    }

    #[test]
    fn pull_progress_sums_layers_and_is_throttled() {
        let mut tally = PullTally::default();
        let first = tally.record("img:v2", &progress("a", 1_000_000, 4_000_000));
        assert_eq!(first.as_deref(), Some("pulling img:v2: 1.0/4.0 MB, 1 layer(s)"));
        assert_eq!(tally.record("img:v2", &progress("b", 500_000, 1_000_000)), None, "within 500 ms");
        tally.last_report = Some(Instant::now() - Duration::from_secs(1));
        let later = tally.record("img:v2", &progress("a", 4_000_000, 4_000_000));
        assert_eq!(later.as_deref(), Some("pulling img:v2: 4.5/5.0 MB, 2 layer(s)"));
    }

    #[test]
    fn only_an_adopted_container_gets_credit_for_its_time_up() {
        // Just started by us, with the second boundary in between: no credit.
        assert_eq!(gate_credit(false, 100, 101), Duration::ZERO);
        assert_eq!(gate_credit(false, 100, 200), Duration::ZERO);
        // Adopted: what it has surely been up, whatever the fraction of the start second.
        assert_eq!(gate_credit(true, 100, 101), Duration::ZERO);
        assert_eq!(gate_credit(true, 100, 112), Duration::from_secs(11));
        assert_eq!(gate_credit(true, 100, 90), Duration::ZERO, "clock skew");
    }
}
