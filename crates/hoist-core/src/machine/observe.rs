//! What the machine sees of its container (runtime events, resyncs after an outage) and the
//! reconcile that turns a gap between what runs and what should into a transition.

use super::*;

impl Machine {
    pub(super) fn register(&mut self) {
        if !self.registered && !self.cfg.register_ports.is_empty() {
            self.registered = true;
            let (ports, instance) = (self.cfg.register_ports.clone(), self.instance_id.clone());
            self.effect(Effect::Register { ports, instance });
        }
    }

    /// In RUN: compare what runs with what should, and pick the transition that closes the gap.
    pub(super) fn reconcile_run(&mut self) {
        if self.state != State::Run {
            return;
        }
        match gap(self.container.as_ref(), &self.spec(), self.kv_pending) {
            Gap::None => {
                if self.held_back().is_some() {
                    let wanted = self.wanted_version();
                    self.activity = Some(format!("waiting while the fleet is degraded to update to {wanted}; `hoist update` goes ahead"));
                }
            }
            Gap::AwaitingKv(image) => {
                tracing::info!(container = %self.cfg.name, %image, "keeping the running version until the KV answers");
            }
            Gap::Close(t, why) => self.want(t, why),
        }
    }

    pub(super) fn on_runtime_event(&mut self, event: RuntimeEvent) {
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
                    self.failed("Docker reports the container unhealthy".into());
                }
            }
            RuntimeEventKind::Died { exit_code } => {
                // A death already seen (by an inspect that found the container exited) is no news.
                let was_running = c.state == RunState::Running;
                c.state = RunState::Exited;
                c.exit_code = exit_code;
                self.stop_probe();
                if matches!(self.state, State::Run | State::Start | State::Restart | State::Update)
                    && (!self.job.running() || self.state == State::Update)
                {
                    // An engine stopping without live-restore kills its containers and stops
                    // answering: no crash of the container, and no reason to roll a new version back.
                    // A look tells (`AfterInspect::Died`).
                    let why = format!("container died ({})", exit_text(exit_code));
                    self.effect(Effect::Inspect { id: event.container_id, then: Box::new(AfterInspect::Died { why }) });
                    return;
                } else if was_running
                    && matches!(self.state, State::Start | State::Restart)
                    && self.job == (Job::Running { taking_down: false })
                {
                    // The container a replacement is waiting to take down (for a slot, say) died on
                    // its own: it is down already, so the replacement goes ahead now, without a slot.
                    // A crash of the old container, not a failure of the version coming in.
                    let why = format!("container died ({}) while its replacement waited", exit_text(exit_code));
                    tracing::warn!(container = %self.cfg.name, reason = %why, "replacing it at once");
                    self.next_delay = self.crash.failed(self.now.at);
                    self.last_error = Some(why);
                    self.remediating = true;
                    self.start_provision(true);
                }
            }
            RuntimeEventKind::Destroyed => {
                self.container = None;
                self.stop_probe();
                if matches!(self.state, State::Run | State::Start | State::Restart) && !self.job.running() {
                    self.failed("container was removed".into());
                }
            }
        }
        self.after_observation();
    }

    /// Where a decision that looked at its container goes on.
    pub(super) fn on_inspected(&mut self, then: AfterInspect, result: Result<Option<ContainerInfo>, RuntimeError>) {
        match then {
            AfterInspect::Died { why } => {
                match result {
                    // It is replaced all the same, once the engine is back.
                    Err(RuntimeError::Unavailable(_)) => self.last_error = Some(format!("{why}: the container runtime went away")),
                    _ => {
                        self.failed(why.clone());
                        self.revive_during_update(&why);
                    }
                }
                self.after_observation();
            }
            AfterInspect::Started { info, adopted } => self.on_started(info, adopted, result),
            AfterInspect::Resync => {
                let found = match result {
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
                self.resynced();
            }
        }
    }

    /// The running container failed while its update waits for a pull (a registry that refuses, a
    /// tag not pushed yet): bring back the version it ran at once, and update once the pull works.
    pub(super) fn revive_during_update(&mut self, why: &str) {
        if self.state == State::Update && self.container.as_ref().is_some_and(|c| c.state != RunState::Running) {
            self.want(Transition::Restart, format!("{why} while its update waits for the pull; bringing it back"));
        }
    }

    /// Re-reads the container after the event stream was interrupted, and retries a job that found
    /// the runtime unreachable.
    pub(super) fn resync(&mut self) {
        match self.container.as_ref().map(|c| c.id.clone()) {
            Some(id) => self.effect(Effect::Inspect { id, then: Box::new(AfterInspect::Resync) }),
            None => self.resynced(),
        }
    }

    fn resynced(&mut self) {
        if self.job == Job::AwaitingRuntime {
            self.enter();
        } else {
            self.after_observation();
        }
    }

    /// After the container's observed state changed: in RUN reconcile, in a gate re-check or retry.
    pub(super) fn after_observation(&mut self) {
        match self.state {
            State::Run => self.reconcile_run(),
            State::Start | State::Restart if !self.job.running() => {
                let running = self.container.as_ref().is_some_and(|c| c.state == RunState::Running);
                let unhealthy = self.container.as_ref().is_some_and(|c| c.health == RuntimeHealth::Unhealthy);
                if !running || unhealthy {
                    if unhealthy {
                        self.failed("Docker reports the new container unhealthy".into());
                    }
                    self.start_provision(true);
                } else {
                    self.check_gate();
                }
            }
            _ => {}
        }
    }

    /// Records a failure of the container and arranges its replacement: with backoff, or, when a new
    /// version fails its health gate, by rolling back to the last version that passed it.
    pub(super) fn failed(&mut self, why: String) {
        tracing::warn!(container = %self.cfg.name, state = %self.state, reason = %why, "container failed");
        // Its replacement brings back a container that is down already.
        self.remediating = true;
        let trying = matches!(self.state, State::Start | State::Restart) && self.trying_new_version();
        if trying && !self.degraded() {
            // The version's failure, not the node's: it tells the fleet nothing of a shared outage
            // (counted, several nodes rolling a broken release back would look like one).
            self.roll_back(why, FailedAt::Gate);
            return;
        }
        self.failing(&why);
        if self.degraded() {
            // A shared outage fails every version alike: the one coming in is not marked bad (the
            // fix must not be blocked), and nothing is restarted sooner than its backoff.
            if trying {
                tracing::warn!(container = %self.cfg.name, "not rolled back: the fleet is degraded, so the failure is not the version's");
            }
            self.next_delay = self.crash.failed_patiently(self.now.at);
        } else {
            self.next_delay = self.crash.failed(self.now.at);
        }
        self.last_error = Some(why);
        if matches!(self.state, State::Start | State::Restart) {
            // A container that cannot come up must not hold the fleet's slot through its backoff;
            // the next attempt campaigns again.
            self.release_slot();
        }
    }
}

/// What stands between the container observed and the one wanted, for a machine in RUN.
#[derive(Debug, PartialEq)]
pub(super) enum Gap {
    None,
    /// Another version runs, but the KV has not been read yet: it may still ask for that one.
    AwaitingKv(String),
    /// This transition closes it, for this reason.
    Close(Transition, String),
}

/// The reconcile decision, without I/O: missing or dead → restart, another image → update (unless
/// the KV has not answered yet), another definition → restart, Docker-unhealthy → restart.
pub(super) fn gap(container: Option<&ContainerInfo>, spec: &ContainerSpec, kv_pending: bool) -> Gap {
    let Some(c) = container else { return Gap::Close(Transition::Restart, "no container".into()) };
    if c.state != RunState::Running {
        return Gap::Close(Transition::Restart, format!("container not running ({})", exit_text(c.exit_code)));
    }
    if c.image != spec.image_ref() {
        if kv_pending {
            return Gap::AwaitingKv(c.image.clone());
        }
        return Gap::Close(Transition::Update, format!("image {} → {}", c.image, spec.image_ref()));
    }
    if c.label(LABEL_SPEC) != Some(spec.hash().as_str()) {
        return Gap::Close(Transition::Restart, "definition changed".into());
    }
    if c.health == RuntimeHealth::Unhealthy {
        return Gap::Close(Transition::Restart, "Docker reports the container unhealthy".into());
    }
    Gap::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentConfig, ContainerSet, load_containers};
    use std::collections::BTreeMap;

    fn spec(tag: &str) -> ContainerSpec {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, format!("containers:\n  web:\n    image: registry.test/web\n    image_tag: {tag}\n")).unwrap();
        let set: ContainerSet = load_containers(&[file], &serde_json::json!({})).unwrap();
        let cfg = &set.containers["web"];
        cfg.spec("n1", &AgentConfig::defaults().docker, &cfg.image_tag)
    }

    fn running(spec: &ContainerSpec) -> ContainerInfo {
        ContainerInfo {
            id: "c1".into(),
            container_name: spec.container_name.clone(),
            labels: BTreeMap::from([(LABEL_SPEC.to_string(), spec.hash())]),
            image: spec.image_ref(),
            image_id: "sha256:1".into(),
            image_digest: None,
            state: RunState::Running,
            health: RuntimeHealth::Healthy,
            exit_code: None,
            created: 0,
            started_at: 0,
            ip: None,
        }
    }

    #[test]
    fn the_gap_in_run_picks_the_transition_that_closes_it() {
        let (v1, v2) = (spec("v1"), spec("v2"));
        let ok = running(&v1);
        let exited = ContainerInfo { state: RunState::Exited, exit_code: Some(137), ..ok.clone() };
        let unhealthy = ContainerInfo { health: RuntimeHealth::Unhealthy, ..ok.clone() };
        let redefined = ContainerInfo { labels: BTreeMap::from([(LABEL_SPEC.to_string(), "other".to_string())]), ..ok.clone() };
        let close = |t: Transition, why: &str| Gap::Close(t, why.to_string());
        let cases: [(Option<&ContainerInfo>, &ContainerSpec, bool, Gap); 8] = [
            (Some(&ok), &v1, false, Gap::None),
            (None, &v1, false, close(Transition::Restart, "no container")),
            (Some(&exited), &v1, false, close(Transition::Restart, "container not running (exit 137)")),
            // A dead container comes back even before the KV answers.
            (Some(&exited), &v2, true, close(Transition::Restart, "container not running (exit 137)")),
            (Some(&ok), &v2, false, close(Transition::Update, "image registry.test/web:v1 → registry.test/web:v2")),
            (Some(&ok), &v2, true, Gap::AwaitingKv("registry.test/web:v1".into())),
            (Some(&redefined), &v1, false, close(Transition::Restart, "definition changed")),
            (Some(&unhealthy), &v1, false, close(Transition::Restart, "Docker reports the container unhealthy")),
        ];
        for (container, want, kv_pending, expected) in cases {
            assert_eq!(gap(container, want, kv_pending), expected, "{container:?} wanting {}", want.image_ref());
        }
    }
}
