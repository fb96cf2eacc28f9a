//! The machine's side of its slow work: which job a state starts (provision, pull, stop), and what
//! its outcome means (next state, crash, rollback, a wait for the runtime or the backend).

use super::*;

#[derive(Debug)]
pub struct JobOutcome {
    /// A governor slot the job took and the machine now holds.
    pub(super) lease: Option<Slot>,
    pub(super) result: Result<JobDone, JobError>,
}

/// Why a job did not finish.
#[derive(Debug, thiserror::Error)]
pub(super) enum JobError {
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
    /// The job panicked: a fault of hoist's own, not of the container. Retried as a backend error
    /// is, with no crash counted and no rollback.
    #[error("a job of hoist's panicked: {0}")]
    Panicked(String),
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
pub(super) enum JobDone {
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
    /// Not replaced: the new version's preflight failed (why), with the running container untouched.
    PreflightFailed(String),
    Stopped,
}

impl Machine {
    /// Starts `work` as the current state's job (the runner runs it, off the loop).
    pub(super) fn spawn_job(&mut self, activity: String, work: Work) {
        self.job = Job::Running { taking_down: false };
        self.activity = Some(activity);
        self.effect(Effect::Job { epoch: self.epoch, work: Box::new(work) });
    }

    /// START (`replace` false: adopt a matching running container) or RESTART (always a fresh one).
    pub(super) fn start_provision(&mut self, replace: bool) {
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
            check_fleet_mark: self.check_fleet_mark(),
            remediation: std::mem::take(&mut self.remediating),
            stop_grace: self.cfg.stop_grace(&self.settings.docker),
        };
        let activity = if delay.is_zero() {
            format!("starting {}", spec.image_ref())
        } else if pull_wait >= backoff {
            format!("retrying the pull in {:.0} s", delay.as_secs_f64().ceil())
        } else {
            format!("restart in {:.1} s (backoff after {} failures)", delay.as_secs_f64(), self.crash.consecutive())
        };
        self.spawn_job(activity, Work::Provision { spec, existing, replace, delay, turn });
    }

    /// How long until a pull may be tried again after a failed one.
    pub(super) fn pull_wait(&self) -> Duration {
        self.pull_due.map_or(Duration::ZERO, |due| due.saturating_duration_since(self.now.at))
    }

    /// A new version to pull: earlier pull failures were about another one.
    pub(super) fn forget_pull_failures(&mut self) {
        self.pull_retry.reset();
        self.pull_due = None;
    }

    pub(super) fn start_pull(&mut self) {
        let spec = self.spec();
        let image = spec.image_ref();
        let governor = self.cfg.update_governor.clone();
        // Read before the pull, so a version the fleet already rejected is not even fetched here.
        let check_fleet_mark = self.check_fleet_mark();
        // A version no node has passed yet is fetched only by a node about to try it: one that has its
        // restart slot (taken here, and kept for the RESTART that follows). Once a node has passed its
        // gate with it, the others fetch it ahead of their turn, so the slot covers no pull.
        let try_first =
            self.cfg.restart_governor.clone().filter(|_| {
                check_fleet_mark && self.lease.is_none() && self.container.as_ref().is_some_and(|c| c.state == RunState::Running)
            });
        let wait = self.pull_wait();
        // Only a new version replacing a running container is checked first: nothing else stops a
        // container that serves.
        let preflight = self.cfg.preflight.clone().filter(|_| {
            self.trying_new_version() && self.container.as_ref().is_some_and(|c| c.state == RunState::Running && c.image != image)
        });
        let activity =
            if wait.is_zero() { format!("pulling {image}") } else { format!("retrying the pull in {:.0} s", wait.as_secs_f64().ceil()) };
        let plan = PullPlan { spec, governor, check_fleet_mark, try_first, wait, preflight };
        self.spawn_job(activity, Work::Pull(plan));
    }

    pub(super) fn start_stop(&mut self) {
        let id = self.container.as_ref().filter(|c| c.state == RunState::Running).map(|c| c.id.clone());
        let grace = self.cfg.stop_grace(&self.settings.docker);
        self.spawn_job(format!("stopping, {} grace", humantime::format_duration(grace)), Work::Stop { id, grace });
    }

    pub(super) fn on_job_done(&mut self, epoch: u64, outcome: JobOutcome) {
        if epoch != self.epoch {
            // Stale: its slot, if any, is released as the outcome is dropped.
            return;
        }
        self.job = Job::Idle;
        self.activity = None;
        if let Some(lease) = outcome.lease {
            self.lease = Some(lease);
        }
        match outcome.result {
            Ok(JobDone::Running { info, adopted }) => {
                if self.replacing.take().is_some() && !adopted {
                    self.restarts += 1;
                    self.remember();
                }
                // Events of the new container that arrived before this outcome were not yet ours and
                // were dropped; a fresh look (`on_started`) catches one that already died or turned
                // unhealthy.
                self.effect(Effect::Inspect { id: info.id.clone(), then: Box::new(AfterInspect::Started { info, adopted }) });
            }
            Ok(JobDone::Pulled(image_id)) => {
                self.forget_pull_failures();
                // `update` of a moving tag (latest) that still names the image already running: go
                // through RESTART without replacing anything.
                let spec = self.spec();
                let unchanged = self.container.as_ref().is_some_and(|c| {
                    c.state == RunState::Running && c.image_id == image_id && c.label(LABEL_SPEC) == Some(spec.hash().as_str())
                });
                self.handover = if unchanged { Handover::KeepRunning } else { Handover::Pulled };
                let why = if unchanged { "unchanged" } else { "pulled" };
                self.want(Transition::Restart, format!("{why} {}", spec.image_ref()));
            }
            Ok(JobDone::RolledBackElsewhere(mark)) => {
                let message = format!("{} was rolled back on {}: {}; not tried here", mark.version, mark.node, mark.reason);
                tracing::warn!(container = %self.cfg.name, "{message}");
                self.rejected = Some(Rejected { version: self.wanted_version(), at: FailedAt::Node(mark.node) });
                self.remember();
                self.notice(&message);
                self.last_error = Some(message);
                self.release_slot();
                // Towards the last good version, keeping the container if it runs it: from UPDATE
                // (the mark was read before pulling) through RESTART, in START/RESTART again.
                self.handover = Handover::KeepRunning;
                if self.state == State::Update {
                    self.want(Transition::Restart, "the fleet rolled this version back".into());
                } else {
                    self.enter();
                }
            }
            Ok(JobDone::PreflightFailed(why)) if self.degraded() => {
                // While the fleet is degraded a preflight failing (a migration dry-run that cannot
                // reach the database) says nothing of the version: not marked bad, tried again at
                // a growing wait, the running container kept meanwhile (and no crash counted: it
                // never stopped).
                tracing::warn!(container = %self.cfg.name, reason = %why, "preflight failed while the fleet is degraded; trying again later");
                self.last_error = Some(why);
                self.release_slot();
                self.pull_due = Some(self.now.at + self.pull_retry.next_wait());
                self.handover = Handover::KeepRunning;
                self.want(Transition::Restart, "the preflight failed while the fleet is degraded; the running container is kept".into());
            }
            Ok(JobDone::PreflightFailed(why)) => {
                // The version fails here as if its gate had: marked bad for this node and the fleet
                // (and the release's outcome), while the container that serves is kept.
                self.roll_back(why, FailedAt::Preflight);
                self.handover = Handover::KeepRunning;
                self.want(Transition::Restart, "the preflight failed; the running container is kept".into());
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
            Err(JobError::RuntimeUnavailable(e)) => self.wait_for_runtime(e.to_string()),
            Err(JobError::Backend(e)) => self.retry_later(e, "waiting for the coordination backend"),
            Err(e @ JobError::Panicked(_)) => {
                tracing::error!(container = %self.cfg.name, state = %self.state, error = %e, "a job panicked; trying again");
                self.retry_later(e.to_string(), "trying again after a fault of hoist's own")
            }
            Err(JobError::Pull(e)) => {
                let e = e.to_string();
                tracing::warn!(container = %self.cfg.name, state = %self.state, error = %e, "pull failed");
                if self.pull_due.is_none() {
                    self.notice(&e);
                }
                self.last_error = Some(e);
                let delay = self.pull_retry.next_wait();
                self.pull_due = Some(self.now.at + delay);
                match self.state {
                    // Nothing runs that this could replace (a first start, or a container that is
                    // gone): try again after the pull backoff.
                    State::Start | State::Restart => self.start_provision(true),
                    State::Update => {
                        self.activity = Some(format!("retrying the pull in {:.0} s", delay.as_secs_f64().ceil()));
                        self.timer(self.epoch, TimerKind::RetryPull, delay);
                    }
                    State::Run | State::Stop | State::Maintenance => {}
                }
            }
            Err(JobError::Failed(e)) => {
                tracing::warn!(container = %self.cfg.name, state = %self.state, error = %e, "job failed");
                self.notice(&e);
                match self.state {
                    State::Start | State::Restart => {
                        // The same path as a container failing its gate: a new version that cannot
                        // even be started is rolled back, anything else frees its slot and backs off
                        // (at least 1 s: a job error, unlike a death, is rarely cured at once).
                        let rolls_back = self.trying_new_version();
                        self.failed(e);
                        if !rolls_back {
                            self.next_delay = self.next_delay.max(Duration::from_secs(1));
                        }
                        self.start_provision(true)
                    }
                    State::Update => {
                        // Retry after a backoff, which is no crash: the running container is untouched.
                        self.last_error = Some(e);
                        let delay = self.pull_retry.next_wait();
                        self.pull_due = Some(self.now.at + delay);
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

    /// The fresh look at a container a job brought up (`AfterInspect::Started`).
    pub(super) fn on_started(&mut self, info: ContainerInfo, adopted: bool, looked: Result<Option<ContainerInfo>, RuntimeError>) {
        let info = match looked {
            Ok(Some(fresh)) => fresh,
            Ok(None) => ContainerInfo { state: RunState::Dead, ..info },
            Err(_) => info,
        };
        let exited = (info.state != RunState::Running).then_some(info.exit_code);
        self.container = Some(info);
        match exited {
            Some(exit_code) => {
                self.failed(format!("container died ({})", exit_text(exit_code)));
                self.start_provision(true);
            }
            None => self.begin_gate(adopted),
        }
    }

    /// A job could not reach the runtime. Retried when the agent reports the runtime back (`Resync`),
    /// or after `RUNTIME_RETRY` in case the outage was too short for the event stream to notice; no
    /// governor slot is held meanwhile, since the fleet should not wait on a node without an engine.
    pub(super) fn wait_for_runtime(&mut self, why: String) {
        tracing::warn!(container = %self.cfg.name, state = %self.state, error = %why, "waiting for the container runtime");
        // A job runs only in a state just entered, so this is news each time.
        self.notice(&why);
        self.last_error = Some(why);
        self.job = Job::AwaitingRuntime;
        self.activity = Some("waiting for the container runtime".into());
        if matches!(self.state, State::Start | State::Restart) {
            self.release_slot();
        }
        self.timer(self.epoch, TimerKind::RuntimeRetry, RUNTIME_RETRY);
    }

    /// A job could not reach the coordination backend, or waited out `governor_timeout`. That says
    /// nothing about the container or its version: no crash count, no rollback, no fleet mark. A slot
    /// the machine holds is kept (its container may be down, so letting go would let another node
    /// take one down too); the job is tried again with a growing wait.
    /// What failed is nobody's fault (an unreachable backend, a panic of hoist's own): the state is
    /// entered again after a growing wait, with no crash counted.
    pub(super) fn retry_later(&mut self, why: String, waiting: &str) {
        tracing::warn!(container = %self.cfg.name, state = %self.state, error = %why, "{waiting}");
        let delay = self.backend_retry.next_wait();
        self.last_error = Some(why.clone());
        self.activity = Some(format!("{waiting} ({why}); trying again in {:.0} s", delay.as_secs_f64().ceil()));
        self.timer(self.epoch, TimerKind::BackendRetry, delay);
    }
}
