//! One actor per container, in two parts. The machine (`Machine`, this file and the decision files
//! beside it) holds the container's state and decides: `step(input, now)` gives the new state and
//! the effects to carry out, as values (`effect.rs`), with no I/O, task or clock of its own. The
//! runner (`runner.rs`) feeds it one channel of inputs (runtime events, probe results, KV changes,
//! file touches, operator requests, timers, the outcomes of its jobs) and carries out its effects,
//! owning every task they start. Nothing is shared between machines; the agent talks to each
//! through its `MachineHandle`.
//!
//! The shape follows a reconcile loop: in RUN the machine compares the container it observes with
//! the one it wants (`reconcile_run`) and picks the transition that closes the gap. Slow work (governor
//! waits, pulls, create/start, stop) runs as a cancellable job whose outcome comes back as an input, so
//! the actor always answers status and operator requests at once.

mod adopt;
#[cfg(test)]
mod decisions;
mod effect;
mod fetch_ahead;
mod fleet_health;
mod gate;
mod input;
mod job;
mod jobs;
mod load;
mod observe;
mod report;
mod rollout;
mod runner;
mod state;
mod supervise;
mod versions;
mod watches;

use adopt::{Preferred, pick_adoptable};
pub use effect::AfterInspect;
pub use effect::Inspection;
use effect::{Effect, FetchJob, Now, PullPlan, Work};
use gate::Gate;
pub use input::{Input, TimerKind};
use job::{JobCtx, Turn};
pub use jobs::JobOutcome;
use jobs::{JobDone, JobError};
pub use load::spawn;
use state::{FailedAt, Handover, Job, Rejected};

use crate::backend::{BackendError, Events, Governor, GovernorEventType, HOIST_BUCKET, Kv, TransitionEvent, tag_key};
use crate::backoff::{CrashLoop, Retry};
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
    /// The agent's owner of the work a machine hands off that must outlive it: the fleet's record of
    /// a rollback (and the slot freed once it is recorded), a withdrawal in the background. The agent
    /// closes it and waits for it, bounded, at shutdown.
    pub background: tokio_util::task::TaskTracker,
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

/// What a machine's decisions read of the agent's settings.
pub(super) struct Settings {
    pub(super) node: String,
    /// Container naming, stop grace.
    pub(super) docker: DockerConfig,
    pub(super) rollout: RolloutConfig,
}

/// A container's state machine: every decision, and nothing else. It holds no adapter, task or
/// channel; `step` turns an input into a new state and the effects to carry out (`effect.rs`), which
/// the runner (`runner.rs`) does.
pub struct Machine {
    cfg: ContainerConfig,
    settings: Settings,
    instance_id: String,
    state: State,
    container: Option<ContainerInfo>,
    kv_version: Option<ImageVersion>,
    last_good_image: Option<String>,
    lease: Option<Slot>,
    /// Bumped whenever a job, probe or timer is superseded, so their late results are ignored.
    epoch: u64,
    /// Why an earlier machine of this container was restarted by the supervisor, for status.
    incident: Option<String>,
    job: Job,
    gate: Gate,
    /// A health-check probe runs for the current container.
    probing: bool,
    fetch_ahead: Option<fetch_ahead::FetchAhead>,
    fleet_health: fleet_health::FleetHealth,
    /// The container's ports are registered (in RUN, with `register_ports`).
    registered: bool,
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
    /// What UPDATE hands to the RESTART it leads to.
    handover: Handover,
    /// The KV's value for this container has not been read yet and nothing was remembered of it.
    kv_pending: bool,
    restarts: u64,
    /// A version rolled back from, here or on another node.
    rejected: Option<Rejected>,
    /// The container the running provision job replaces, if any: when it produces a different one,
    /// that is a restart (adopting the same container is not).
    replacing: Option<String>,
    last_error: Option<String>,
    activity: Option<String>,
    governor_wait: Duration,
    /// When the current update began (UPDATE entered), until the container is back in RUN.
    update_started: Option<Instant>,
    last_update: Option<Duration>,
    /// Transitions decided while handling an input, applied in order once it is handled.
    pending: Vec<(Transition, String)>,
    /// When the input being handled arrived.
    now: Now,
    /// What handling it asks of the world, in order.
    effects: Vec<Effect>,
}

impl Machine {
    /// The first step of a machine just loaded: its watches, and what `initial` is for.
    fn begin(&mut self, initial: State, now: Now) -> Vec<Effect> {
        self.now = now;
        self.start_watches();
        self.start_dependency_check();
        self.state = initial;
        tracing::info!(container = %self.cfg.name, state = %initial, "machine loaded");
        self.enter();
        self.apply_pending();
        std::mem::take(&mut self.effects)
    }

    /// One input: the new state, and what to do about it.
    fn step(&mut self, input: Input, now: Now) -> Vec<Effect> {
        self.now = now;
        self.handle(input);
        self.apply_pending();
        std::mem::take(&mut self.effects)
    }

    fn effect(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    /// Lets go of the governor slot, if one is held. While a rollback verdict of this node is still
    /// being recorded, the runner frees it only once it is, so that the node taking it next reads it.
    fn release_slot(&mut self) {
        if let Some(slot) = self.lease.take() {
            self.effect(Effect::Release(slot));
        }
    }

    fn machine_name(&self) -> String {
        format!("hoist_{}", self.cfg.name)
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Runtime(event) => self.on_runtime_event(event),
            Input::Resync => self.resync(),
            Input::Inspected(inspection) => {
                let Inspection { then, result } = *inspection;
                self.on_inspected(then, result)
            }
            Input::DesiredVersion(raw) => self.on_desired_version(raw),
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
            Input::Reconfigure(cfg) => self.reconfigure(*cfg),
            Input::Request(transition, reply) => {
                let result = self.request(transition);
                self.effect(Effect::Reply(reply, result));
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Probe { epoch, result } if epoch == self.epoch => self.on_probe(result),
            Input::GovernorWaited(waited) => self.governor_wait += waited,
            Input::TakingDown { epoch, slot } => {
                if epoch == self.epoch
                    && let Job::Running { taking_down } = &mut self.job
                {
                    *taking_down = true;
                }
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
                if epoch == self.epoch && self.job.running() {
                    self.activity = Some(activity);
                }
            }
            Input::JobDone { epoch, outcome } => self.on_job_done(epoch, *outcome),
            Input::Timer { epoch, timer } if epoch == self.epoch => self.on_timer(timer),
            Input::Probe { .. } | Input::Timer { .. } => {}
            // The runner's to handle (it also waits for the job): `shutdown`.
            Input::Shutdown { .. } => unreachable!("handled by the runner"),
        }
    }

    /// An operator's request: checked against the table and applied now.
    fn request(&mut self, transition: Transition) -> Result<State, TransitionError> {
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
                self.remember();
            }
            // Before the reply and the retry, not in the background: a late delete could remove the
            // verdict of the retry that another node has meanwhile made.
            if let Some(asked) = self.kv_asks().cloned() {
                self.effect(Effect::ForgetMark { version: asked });
            }
        }
        self.apply(transition, "requested by operator".into());
        Ok(self.state)
    }

    fn want(&mut self, transition: Transition, why: String) {
        self.pending.push((transition, why));
    }

    fn apply_pending(&mut self) {
        while !self.pending.is_empty() {
            let (transition, why) = self.pending.remove(0);
            if fsm::check(self.state, transition).is_ok() {
                self.apply(transition, why);
            } else {
                tracing::debug!(container = %self.cfg.name, %transition, state = %self.state, "transition no longer applies");
            }
        }
    }

    fn apply(&mut self, transition: Transition, why: String) {
        let Ok(to) = fsm::check(self.state, transition) else { return };
        let from = self.state;
        if from == State::Update && to == State::Restart && self.handover == Handover::Nothing {
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
        self.enter();
    }

    /// Starts what the current state is for.
    fn enter(&mut self) {
        self.supersede();
        self.remember();
        // Registered only while in RUN, i.e. having passed the health gate; RUN → RUN is no change.
        if self.state != State::Run && std::mem::take(&mut self.registered) {
            self.effect(Effect::Withdraw { wait: false });
        }
        match self.state {
            State::Start => {
                // Nothing to keep: START adopts a matching running container anyway.
                self.handover = Handover::Nothing;
                self.start_provision(false)
            }
            State::Restart => {
                let replace = std::mem::take(&mut self.handover) != Handover::KeepRunning;
                self.start_provision(replace)
            }
            State::Update => {
                self.handover = Handover::Nothing;
                self.update_started.get_or_insert(self.now.at);
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
                self.crash.healthy(self.now.at);
                if let Some(started) = self.update_started.take() {
                    self.last_update = Some(self.now.at.saturating_duration_since(started));
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
        if std::mem::take(&mut self.job).running() {
            self.effect(Effect::CancelJob);
        }
        self.stop_probe();
        self.gate = Gate::default();
    }

    /// Stop managing; with `remove`, the container is removed too.
    fn shutdown(&mut self, remove: bool, now: Now) -> Vec<Effect> {
        self.now = now;
        self.supersede();
        // Cancelled jobs end at their next await point; the runner bounds the wait.
        self.effect(Effect::JoinJob);
        self.effect(Effect::StopWatches);
        self.stop_dependency_check();
        if self.fetch_ahead.take().is_some() {
            self.effect(Effect::FetchAhead(None));
        }
        self.release_slot();
        if std::mem::take(&mut self.registered) {
            self.effect(Effect::Withdraw { wait: true });
        }
        if remove {
            if let Some(c) = self.container.take() {
                let grace = self.cfg.stop_grace(&self.settings.docker);
                self.effect(Effect::RemoveContainer { id: c.id, running: c.state == RunState::Running, grace });
            }
            self.effect(Effect::Forget);
            tracing::info!(container = %self.cfg.name, "removed");
        } else {
            self.remember();
        }
        std::mem::take(&mut self.effects)
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
