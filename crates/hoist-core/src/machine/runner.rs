//! The runner: it feeds a machine its inputs and carries out the effects its decisions return, in
//! order, before it takes the next input. It owns every task those effects start (jobs, timers,
//! probes, watches, the dependency ticker, the fetch ahead) in one `JoinSet`, so that when the runner
//! ends — shut down, or unwound by a panic its supervisor catches — none of them outlives it. What
//! must outlive a machine (the fleet's record of a rollback, the slot freed once it is recorded, a
//! withdrawal in the background) goes to the agent's `background` tracker instead.

use super::*;
use futures_util::FutureExt;
use tokio::task::JoinSet;

/// The longest a shutdown waits for a cancelled job to let go.
const JOB_LET_GO: Duration = Duration::from_secs(10);

pub(super) struct Runner {
    machine: Machine,
    deps: Arc<MachineDeps>,
    tx: mpsc::Sender<Input>,
    tasks: JoinSet<()>,
    /// The current job's cancel signal, and word of its end (the sender is dropped with the task).
    job: Option<(watch::Sender<bool>, oneshot::Receiver<()>)>,
    probe: Option<AbortHandle>,
    watches: Vec<AbortHandle>,
    ticker: Option<AbortHandle>,
    fetch_ahead: Option<AbortHandle>,
    registration: Option<registration::Publisher>,
    /// Set while this node's rollback verdict is being recorded for the fleet; true once it is.
    verdict: Option<watch::Receiver<bool>>,
}

impl Runner {
    pub(super) fn new(machine: Machine, deps: Arc<MachineDeps>, tx: mpsc::Sender<Input>) -> Runner {
        Runner {
            machine,
            deps,
            tx,
            tasks: JoinSet::new(),
            job: None,
            probe: None,
            watches: Vec::new(),
            ticker: None,
            fetch_ahead: None,
            registration: None,
            verdict: None,
        }
    }

    /// Handles inputs until shut down. `rx` is the supervisor's, so a restarted machine goes on with
    /// the inputs queued for the one that panicked.
    pub(super) async fn run(mut self, rx: &mut mpsc::Receiver<Input>, initial: State) {
        let effects = self.machine.begin(initial, Now::read());
        self.carry_out(effects).await;
        while let Some(input) = rx.recv().await {
            if let Input::Shutdown { remove, done } = input {
                let effects = self.machine.shutdown(remove, Now::read());
                self.carry_out(effects).await;
                // A job that finished just before the shutdown may have queued its outcome, and the
                // governor slot with it: dropping it releases the slot.
                rx.close();
                while rx.try_recv().is_ok() {}
                let _ = done.send(());
                return;
            }
            let effects = self.machine.step(input, Now::read());
            self.carry_out(effects).await;
            // Finished tasks are reaped, so the set holds only what still runs.
            while self.tasks.try_join_next().is_some() {}
        }
    }

    /// Carries out `effects` in order; an inspect's answer is handed back to the machine at once,
    /// before any other input, with the effects that follows from it.
    async fn carry_out(&mut self, effects: Vec<Effect>) {
        let mut queue = std::collections::VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            if let Some(answer) = self.execute(effect).await {
                let next = self.machine.step(answer, Now::read());
                // Ahead of what the same decision still had queued: it asked for the look first.
                for effect in next.into_iter().rev() {
                    queue.push_front(effect);
                }
            }
        }
    }

    async fn execute(&mut self, effect: Effect) -> Option<Input> {
        let name = self.machine.cfg.name.clone();
        match effect {
            Effect::Persist(remembered) => {
                if let Err(e) = self.deps.store.save(&name, &remembered).await {
                    tracing::warn!(container = %name, error = %e, "could not save machine state");
                }
            }
            Effect::Forget => {
                let _ = self.deps.store.forget(&name).await;
            }
            Effect::Publish { kind, from, to, detail, image } => {
                let (node, machine) = (&self.deps.node, self.machine.machine_name());
                let event = TransitionEvent {
                    detail: Some(detail),
                    image: Some(image),
                    ..TransitionEvent::now(node, &self.machine.instance_id, &machine, &kind, from.as_str(), to.as_str())
                };
                self.deps.outbox.send(event);
            }
            Effect::Job { epoch, work } => self.start_job(epoch, *work),
            Effect::CancelJob => {
                if let Some((cancel, _)) = &self.job {
                    let _ = cancel.send(true);
                }
            }
            Effect::JoinJob => {
                if let Some((_, ended)) = self.job.take() {
                    let _ = tokio::time::timeout(JOB_LET_GO, ended).await;
                }
            }
            Effect::Timer { epoch, timer, after } => {
                let tx = self.tx.clone();
                self.tasks.spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(Input::Timer { epoch, timer }).await;
                });
            }
            Effect::StartProbe { epoch, check, container } => {
                let (runtime, tx) = (self.deps.runtime.clone(), self.tx.clone());
                let probe = self.tasks.spawn(async move {
                    loop {
                        let result = runtime.probe(&container, &check.probe, check.timeout).await;
                        if tx.send(Input::Probe { epoch, result }).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(check.interval).await;
                    }
                });
                replace(&mut self.probe, Some(probe));
            }
            Effect::StopProbe => replace(&mut self.probe, None),
            Effect::Inspect { id, then } => {
                let inspect = tokio::time::timeout(INSPECT_LIMIT, self.deps.runtime.inspect(&id));
                let result = inspect
                    .await
                    .unwrap_or_else(|_| Err(RuntimeError::Unavailable(format!("inspecting {id} took longer than {INSPECT_LIMIT:?}"))));
                return Some(Input::Inspected(Box::new(Inspection { then: *then, result })));
            }
            Effect::Watch { kv_update, kv_interval, restart_files } => {
                self.stop_watches();
                self.watches = watches::start(&mut self.tasks, &self.deps, &name, (kv_update, kv_interval, restart_files), &self.tx);
            }
            Effect::StopWatches => self.stop_watches(),
            Effect::DependencyTicker(interval) => {
                let ticker = interval.map(|interval| {
                    let tx = self.tx.clone();
                    self.tasks.spawn(async move {
                        loop {
                            tokio::time::sleep(interval).await;
                            if tx.send(Input::DependencyDue).await.is_err() {
                                return;
                            }
                        }
                    })
                });
                replace(&mut self.ticker, ticker);
            }
            Effect::DependencyProbe { check, container } => {
                let (runtime, tx) = (self.deps.runtime.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let result = runtime.probe(&container, &check.probe, check.timeout).await;
                    let _ = tx.send(Input::DependencyProbe { container_id: container.id, result }).await;
                });
            }
            Effect::FetchAhead(fetch) => {
                let task = fetch.map(|FetchJob { version, image, governor }| {
                    let (deps, tx, holder, component) = (self.deps.clone(), self.tx.clone(), self.holder(), self.machine.machine_name());
                    self.tasks.spawn(async move {
                        let result = job::fetch(&deps, &image, governor.as_deref(), &holder, &component).await;
                        let _ = tx.send(Input::FetchedAhead { version, result }).await;
                    })
                });
                replace(&mut self.fetch_ahead, task);
            }
            Effect::Register { ports, instance } => {
                let (kv, events) = (self.deps.kv.clone(), self.deps.events.clone());
                self.registration = registration::Publisher::start(kv, events, &ports, &instance, &self.deps.registration);
            }
            Effect::Withdraw { wait } => {
                if let Some(publisher) = self.registration.take() {
                    if wait {
                        publisher.withdraw().await;
                    } else {
                        // A container leaving RUN is replaced at once, whether or not the store answers.
                        self.deps.background.spawn(publisher.withdraw());
                    }
                }
            }
            Effect::Release(slot) => match self.verdict.clone() {
                Some(mut recorded) if !*recorded.borrow() => {
                    self.deps.background.spawn(async move {
                        let _ = recorded.wait_for(|done| *done).await;
                        drop(slot);
                    });
                }
                _ => drop(slot),
            },
            Effect::RecordRollback { version, why } => {
                let (kv, node) = (self.deps.kv.clone(), self.deps.node.clone());
                let (recorded, verdict) = watch::channel(false);
                self.verdict = Some(verdict);
                self.deps.background.spawn(async move {
                    rollback_mark::record(&*kv, &name, &version, &node, &why).await;
                    let _ = recorded.send(true);
                });
            }
            Effect::RecordVerified { version } => {
                let (kv, node) = (self.deps.kv.clone(), self.deps.node.clone());
                self.deps.background.spawn(async move { rollback_mark::record_verified(&*kv, &name, &version, &node).await });
            }
            Effect::ForgetMark { version } => {
                let forget = rollback_mark::forget(&*self.deps.kv, &name, &version);
                if tokio::time::timeout(MARK_FORGET_LIMIT, forget).await.is_err() {
                    tracing::warn!(container = %name, "could not delete the fleet's rollback mark in time");
                }
            }
            Effect::Condition { key, value } => self.deps.conditions.set(key, value),
            Effect::ClearCondition { key, prefix } => self.deps.conditions.clear_if(key, |p| p.starts_with(&prefix)),
            Effect::RemoveContainer { id, running, grace } => {
                if running {
                    let _ = self.deps.runtime.stop(&id, grace).await;
                }
                if let Err(e) = self.deps.runtime.remove(&id).await {
                    tracing::warn!(container = %name, error = %e, "could not remove the container");
                }
            }
            Effect::Reply(to, result) => {
                let _ = to.send(result);
            }
        }
        None
    }

    /// Runs `work` as a task of the runner; its outcome comes back as `Input::JobDone`.
    fn start_job(&mut self, epoch: u64, work: Work) {
        let (cancel, cancelled) = watch::channel(false);
        let (ended, ended_rx) = oneshot::channel::<()>();
        let ctx = JobCtx {
            deps: self.deps.clone(),
            epoch,
            cancelled: cancelled.clone(),
            holder: self.holder(),
            component: self.machine.machine_name(),
            tx: self.tx.clone(),
        };
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            let _ended = ended;
            let outcome = match std::panic::AssertUnwindSafe(ctx.run(work)).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(panic) => JobOutcome { lease: None, result: Err(JobError::Panicked(super::supervise::panic_message(&*panic))) },
            };
            // A superseded job's slot is nobody's: dropped here, it is released, rather than handed
            // to a machine that may already have shut down.
            if *cancelled.borrow() {
                return;
            }
            let _ = tx.send(Input::JobDone { epoch, outcome: Box::new(outcome) }).await;
        });
        self.job = Some((cancel, ended_rx));
    }

    fn holder(&self) -> String {
        format!("hoist {} @ {}", self.machine.cfg.name, self.deps.node)
    }

    fn stop_watches(&mut self) {
        for task in self.watches.drain(..) {
            task.abort();
        }
    }
}

/// Puts `new` in `slot`, aborting the task it held.
fn replace(slot: &mut Option<AbortHandle>, new: Option<AbortHandle>) {
    if let Some(old) = std::mem::replace(slot, new) {
        old.abort();
    }
}
