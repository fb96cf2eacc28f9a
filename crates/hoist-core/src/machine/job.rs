//! The jobs themselves, run off the machine's loop: taking governor turns, pulling, creating and
//! starting a container, stopping the one it replaces. Each reports back through `Input`s and stops
//! when superseded.

use super::*;

/// How a provision job takes its turn: the governor slots it works under, and whether a version new
/// to this node must first be checked against the fleet's rollback mark.
#[derive(Debug)]
pub(super) struct Turn {
    /// Taken before a running container is replaced.
    pub(super) restart: Option<String>,
    /// A restart slot the machine holds from the update it is now reverting: the revert replaces the
    /// container within it, but only while the governor still counts it.
    pub(super) held: Option<crate::backend::Lease>,
    /// Taken for the pull of an image that is not present.
    pub(super) update: Option<String>,
    /// The version comes from the KV and has not run here: another node may have rolled it back.
    pub(super) check_fleet_mark: bool,
    /// The container being replaced has failed: it is down already, so a governor that cannot be
    /// reached does not hold its replacement back (one that answers "full" still does).
    pub(super) remediation: bool,
    /// How long the replaced container gets to stop before it is killed.
    pub(super) stop_grace: Duration,
}

/// What a job may use: the adapters, and a signal that it has been superseded.
pub(super) struct JobCtx {
    pub(super) deps: Arc<MachineDeps>,
    pub(super) epoch: u64,
    pub(super) cancelled: watch::Receiver<bool>,
    pub(super) holder: String,
    /// The machine's name, for governor lifecycle events.
    pub(super) component: String,
    pub(super) tx: mpsc::Sender<Input>,
}

impl JobCtx {
    pub(super) async fn or_cancelled<T>(&self, fut: impl Future<Output = T>) -> Result<T, JobError> {
        let mut cancelled = self.cancelled.clone();
        tokio::select! {
            biased;
            _ = cancelled.wait_for(|c| *c) => Err(JobError::Failed("superseded".into())),
            out = fut => Ok(out),
        }
    }

    /// A slot of `governor` if one is free within `limit`, else None (no lifecycle event: this is a turn
    /// of a longer wait). Errors as `acquire`.
    pub(super) async fn acquire_within(&self, governor: &str, limit: Duration) -> Result<Option<Slot>, JobError> {
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
    pub(super) async fn acquire(&self, governor: &str) -> Result<Slot, JobError> {
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
    pub(super) async fn progress(&self, activity: String) {
        let _ = self.tx.send(Input::JobProgress { epoch: self.epoch, activity }).await;
    }

    /// Pulls under the update governor, if one is set.
    pub(super) async fn pull(&self, image: &str, governor: Option<String>, lease: &mut Option<Slot>) -> Result<String, JobError> {
        if let Some(id) = pinned_and_local(&*self.deps.runtime, image).await {
            return Ok(id);
        }
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

    /// Runs the container's preflight in the new image: None if it passed, else why the version fails.
    /// The run is a task of the agent's `background`, so a superseded job still sees its container
    /// removed.
    pub(super) async fn preflight(&self, spec: &ContainerSpec, check: &crate::config::Preflight) -> Result<Option<String>, JobError> {
        let (runtime, run, timeout) = (self.deps.runtime.clone(), crate::preflight::spec(spec, &check.command), check.timeout);
        let task = self.deps.background.spawn(async move { runtime.preflight(&run, timeout).await });
        let ran = self.or_cancelled(task).await?.map_err(|e| JobError::Panicked(e.to_string()))??;
        Ok(crate::preflight::verdict(&ran, timeout).err())
    }

    /// Does `work` to its outcome (or until superseded).
    pub(super) async fn run(&self, work: Work) -> JobOutcome {
        match work {
            Work::Provision { spec, existing, replace, delay, turn } => {
                let mut lease = None;
                let result = self.provision(&spec, existing, replace, delay, turn, &mut lease).await;
                JobOutcome { lease, result }
            }
            Work::Pull(plan) => {
                let (lease, result) = self.update(plan).await;
                JobOutcome { lease, result }
            }
            Work::Stop { id, grace } => {
                let result = match id {
                    Some(id) => self.deps.runtime.stop(&id, grace).await.map_err(JobError::from),
                    None => Ok(()),
                };
                JobOutcome { lease: None, result: result.map(|()| JobDone::Stopped) }
            }
        }
    }

    /// UPDATE's pull (and preflight), with the restart slot it took to try a version first, if any.
    async fn update(&self, plan: PullPlan) -> (Option<Slot>, Result<JobDone, JobError>) {
        let PullPlan { spec, governor, check_fleet_mark, try_first, wait, preflight } = plan;
        let image = spec.image_ref();
        if !wait.is_zero()
            && let Err(e) = self.or_cancelled(tokio::time::sleep(wait)).await
        {
            return (None, Err(e));
        }
        let rejected = || async { rollback_mark::find(&*self.deps.kv, &spec.name, &spec.version).await };
        if check_fleet_mark && let Some(mark) = rejected().await {
            return (None, Ok(JobDone::RolledBackElsewhere(mark)));
        }
        let mut restart_slot = None;
        if let Some(restart) = try_first
            && !rollback_mark::verified(&*self.deps.kv, &spec.name, &spec.version).await
        {
            // The wait for the slot, in short turns, ends early once another node has passed with the
            // version (then it is fetched at once, ahead of this node's turn) or rolled it back. Short
            // turns, not a cancelled wait: a campaign cut off before its reply could leave a lease
            // nobody holds.
            self.progress(format!("waiting for a slot of governor {restart}, to try a version no node has passed yet")).await;
            loop {
                match self.acquire_within(&restart, VERIFIED_POLL).await {
                    Ok(Some(slot)) => {
                        restart_slot = Some(slot);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => return (None, Err(e)),
                }
                if rollback_mark::verified(&*self.deps.kv, &spec.name, &spec.version).await || rejected().await.is_some() {
                    break;
                }
            }
            // The verdict of whoever had the slot before.
            if let Some(mark) = rejected().await {
                return (None, Ok(JobDone::RolledBackElsewhere(mark)));
            }
        }
        // The update governor limits concurrent pulls only; its slot is dropped (released) with the
        // pull. The restart that follows is governed by the restart governor. The wait for it can be
        // long (a slot a dead agent held until it expired): a verdict another node reached meanwhile
        // is read once it is held, so that a version the fleet rolled back is not fetched after all.
        let mut slot = None;
        if let Some(g) = governor.as_deref().filter(|_| check_fleet_mark)
            && pinned_and_local(&*self.deps.runtime, &image).await.is_none()
        {
            match self.acquire(g).await {
                Ok(held) => slot = Some(held),
                Err(e) => return (None, Err(e)),
            }
            if let Some(mark) = rejected().await {
                return (None, Ok(JobDone::RolledBackElsewhere(mark)));
            }
        }
        let governor = governor.filter(|_| slot.is_none());
        self.progress(format!("pulling {image}")).await;
        let mut pulled = self.pull(&image, governor, &mut slot).await.map(JobDone::Pulled);
        drop(slot);
        if let (Ok(_), Some(check)) = (&pulled, &preflight) {
            let timeout = humantime::format_duration(check.timeout);
            self.progress(format!("preflight of {image}: {} (timeout {timeout})", check.command.join(" "))).await;
            match self.preflight(&spec, check).await {
                Ok(None) => {}
                Ok(Some(why)) => pulled = Ok(JobDone::PreflightFailed(why)),
                Err(e) => pulled = Err(e),
            }
        }
        // A pull that failed keeps no restart slot: nothing is being taken down. A failed preflight
        // keeps it, for the machine to free once its verdict is recorded.
        (restart_slot.filter(|_| pulled.is_ok()), pulled)
    }

    pub(super) async fn provision(
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
                let _ = self.tx.send(Input::TakingDown { epoch: self.epoch, slot: lease.take() }).await;
                tracing::info!(container = %spec.name, id = %short, %grace, "stopping the replaced container");
                self.progress(format!("stopping {short}, {grace} grace")).await;
                self.or_cancelled(runtime.stop(&old.id, turn.stop_grace)).await??;
            }
            self.or_cancelled(runtime.remove(&old.id)).await??;
        }
        if let Some(info) = self.clear_leftovers(spec, existing.as_ref()).await? {
            return Ok(JobDone::Running { info, adopted: false });
        }
        let info = self.or_cancelled(runtime.run(spec)).await??;
        Ok(JobDone::Running { info, adopted: false })
    }

    /// Containers of this name the machine does not know of are its own leftovers: a superseded job
    /// whose create went through after it was cancelled, so that the name is taken. One that runs
    /// exactly what is wanted is taken as the new container; any other is removed. Without this the
    /// next create fails on the name, and that would count against the version.
    async fn clear_leftovers(&self, spec: &ContainerSpec, known: Option<&ContainerInfo>) -> Result<Option<ContainerInfo>, JobError> {
        let runtime = &self.deps.runtime;
        let leftovers = runtime.find(&spec.node, &spec.name).await?.into_iter().filter(|c| known.is_none_or(|k| k.id != c.id));
        let mut wanted = None;
        for c in leftovers {
            let current = c.state == RunState::Running && c.image == spec.image_ref() && c.label(LABEL_SPEC) == Some(spec.hash().as_str());
            if current && wanted.is_none() && c.container_name == spec.container_name {
                tracing::info!(container = %spec.name, id = %c.id, "taking the container a superseded start left running");
                wanted = Some(c);
                continue;
            }
            tracing::info!(container = %spec.name, id = %c.id, "removing a container a superseded start left");
            if c.state == RunState::Running {
                self.or_cancelled(runtime.stop(&c.id, Duration::ZERO)).await??;
            }
            self.or_cancelled(runtime.remove(&c.id)).await??;
        }
        Ok(wanted)
    }
}

/// Bytes pulled so far across layers, turned into an activity line at most twice a second.
#[derive(Default)]
pub(super) struct PullTally {
    pub(super) layers: std::collections::HashMap<String, (u64, u64)>,
    pub(super) last_report: Option<Instant>,
}

impl PullTally {
    pub(super) fn record(&mut self, image: &str, p: &crate::runtime::PullProgress) -> Option<String> {
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

/// Whether `c` runs the definition `spec` describes, only at another version (its own tag): adopted at
/// start, it keeps serving while the machine updates it, instead of being replaced before the new
/// image is even here (and it is kept if the KV, not read yet, still asks for what it runs).
pub(super) fn same_definition_other_version(c: &ContainerInfo, spec: &ContainerSpec) -> bool {
    let Some(version) = version_of(&c.image).and_then(|v| ImageVersion::parse(&v).ok()) else { return false };
    let other = ContainerSpec { version, ..spec.clone() };
    c.label(LABEL_SPEC) == Some(other.hash().as_str()) && c.image == other.image_ref()
}

/// The image's id when `image` names a digest that the engine has already (fetched ahead of a wave,
/// say): a digest's content never changes, so there is nothing to pull. A tag may have moved, so it
/// is always pulled.
pub(super) async fn pinned_and_local(runtime: &dyn Runtime, image: &str) -> Option<String> {
    if !image.contains("@sha256:") {
        return None;
    }
    runtime.image_id(image).await.ok().flatten()
}

/// Pulls `image`, under a slot of `governor` when there is one (held until the pull ends).
pub(super) async fn fetch(deps: &MachineDeps, image: &str, governor: Option<&str>, holder: &str, component: &str) -> Result<(), String> {
    if pinned_and_local(&*deps.runtime, image).await.is_some() {
        return Ok(());
    }
    let _slot = match governor {
        Some(g) => {
            let lease = deps.governor.acquire(g, holder, deps.rollout.governor_timeout).await.map_err(|e| e.to_string())?;
            Some(deps.slots.hold(lease, component, &deps.node, &*deps.events).await)
        }
        None => None,
    };
    deps.runtime.pull(image, &|_| {}).await.map(drop).map_err(|e| e.to_string())
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
}
