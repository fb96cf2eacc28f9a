//! The health gate a new (or adopted) container must pass before RUN: probes, `unverified_wait`,
//! `min_healthy_time`, and the timers that drive them.

use super::*;

/// Progress of the health gate a new (or adopted) container must pass before RUN.
#[derive(Debug, Default, Clone)]
pub(super) struct Gate {
    /// A probe success has been seen since this container started.
    pub(super) probe_passed: bool,
    /// Consecutive probe failures outside the start period.
    pub(super) probe_failures: u32,
    /// The container has run long enough without any check (`unverified_wait`).
    pub(super) waited: bool,
    /// Since when every check has passed without a break (for `min_healthy_time`).
    pub(super) healthy_since: Option<Instant>,
    /// The container was adopted as it ran, so its time up counts toward `min_healthy_time`.
    pub(super) adopted: bool,
}

impl Machine {
    pub(super) fn begin_gate(&mut self, adopted: bool) {
        self.gate = Gate { adopted, ..Gate::default() };
        self.start_probe();
        let epoch = self.epoch;
        self.timer(epoch, TimerKind::GateDeadline, self.settings.rollout.healthy_deadline);
        if self.cfg.health_check.is_none() {
            let remaining = self.settings.rollout.unverified_wait.saturating_sub(self.uptime_credit());
            self.timer(epoch, TimerKind::Unverified, remaining);
        }
        self.activity = Some("waiting for the container to become healthy".into());
        self.check_gate();
    }

    pub(super) fn uptime_credit(&self) -> Duration {
        self.container.as_ref().map_or(Duration::ZERO, |c| gate_credit(self.gate.adopted, c.started_at, self.now.unix()))
    }

    pub(super) fn check_gate(&mut self) {
        if !matches!(self.state, State::Start | State::Restart) || self.job.running() {
            return;
        }
        let Some(c) = &self.container else { return };
        // An adopted container's time up counts toward `min_healthy_time`.
        let needed = self.settings.rollout.min_healthy_time.saturating_sub(self.uptime_credit());
        let (healthy_since, verdict) = verdict(c, self.cfg.health_check.is_some(), &self.gate, needed, self.now.at);
        self.gate.healthy_since = healthy_since;
        let how = match verdict {
            Verdict::NotYet => return,
            Verdict::Confirming { remaining, streak_starts } => {
                if streak_starts {
                    self.activity = Some(format!("healthy; confirming for {}s", remaining.as_secs_f64().ceil()));
                    self.timer(self.epoch, TimerKind::MinHealthy, remaining);
                }
                return;
            }
            Verdict::Passed(how) => how,
        };
        if let Some(asked) = self.kv_asks().filter(|_| self.trying_new_version()).cloned() {
            // The fleet's first pass of this version: the nodes waiting may fetch it now.
            self.effect(Effect::RecordVerified { version: asked });
        }
        self.want(Transition::HealthCheck, how.into());
    }

    pub(super) fn on_timer(&mut self, timer: TimerKind) {
        match timer {
            TimerKind::Unverified => {
                self.gate.waited = true;
                self.check_gate();
            }
            TimerKind::GateDeadline if matches!(self.state, State::Start | State::Restart) && !self.job.running() => {
                self.failed(format!("not healthy within {}", humantime::format_duration(self.settings.rollout.healthy_deadline)));
                self.start_provision(true);
            }
            TimerKind::RetryPull if self.state == State::Update => self.enter(),
            TimerKind::MinHealthy => self.check_gate(),
            TimerKind::RuntimeRetry if self.job == Job::AwaitingRuntime => self.enter(),
            TimerKind::BackendRetry => self.enter(),
            TimerKind::GateDeadline | TimerKind::RetryPull | TimerKind::RuntimeRetry => {}
        }
    }

    pub(super) fn timer(&mut self, epoch: u64, timer: TimerKind, after: Duration) {
        self.effect(Effect::Timer { epoch, timer, after });
    }

    // ---- probes --------------------------------------------------------------------------------

    pub(super) fn start_probe(&mut self) {
        self.stop_probe();
        let (Some(check), Some(container)) = (self.cfg.health_check.clone(), self.container.clone()) else { return };
        if container.state != RunState::Running {
            return;
        }
        self.probing = true;
        self.effect(Effect::StartProbe { epoch: self.epoch, check, container: Box::new(container) });
    }

    pub(super) fn stop_probe(&mut self) {
        if std::mem::take(&mut self.probing) {
            self.effect(Effect::StopProbe);
        }
    }

    pub(super) fn on_probe(&mut self, result: Result<(), ProbeError>) {
        let Some(check) = &self.cfg.health_check else { return };
        match result {
            Ok(()) => {
                let prefix = format!("{}:", self.cfg.name);
                self.effect(Effect::ClearCondition { key: "probes", prefix });
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
                let value = Some(format!("{}: health check could not run on this host ({why}); no verdict", self.cfg.name));
                self.effect(Effect::Condition { key: "probes", value });
            }
            Err(ProbeError::Failed(why)) => {
                let started = self.container.as_ref().map_or(0, |c| c.started_at);
                if (self.now.unix() - started) < check.start_period.as_secs() as i64 {
                    return;
                }
                let retries = check.retries.max(1);
                self.gate.probe_failures += 1;
                self.gate.healthy_since = None;
                tracing::debug!(container = %self.cfg.name, failures = self.gate.probe_failures, reason = %why, "probe failed");
                if self.gate.probe_failures >= retries {
                    let why = format!("health check failed {} times: {why}", self.gate.probe_failures);
                    self.gate.probe_failures = 0;
                    match self.state {
                        State::Run => {
                            self.failed(why.clone());
                            self.want(Transition::Restart, why);
                        }
                        State::Start | State::Restart if !self.job.running() => {
                            self.failed(why);
                            self.start_provision(true);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// What the gate says of a container now.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Not running, not healthy, or not checked yet.
    NotYet,
    /// Healthy, and to stay so `remaining` longer (`min_healthy_time`); `streak_starts` on the first
    /// look of a healthy streak, when the timer for its end is to be set.
    Confirming { remaining: Duration, streak_starts: bool },
    /// Passed, and how it was judged.
    Passed(&'static str),
}

/// The gate's decision, without I/O: a container passes when it runs, Docker does not report it
/// unhealthy, and hoist's own check passed (or, without one, Docker says healthy or `unverified_wait`
/// is over); a checked container must then stay healthy for `needed`, counted from the first healthy
/// look (`gate.healthy_since`, returned updated).
pub(super) fn verdict(c: &ContainerInfo, has_check: bool, gate: &Gate, needed: Duration, now: Instant) -> (Option<Instant>, Verdict) {
    let docker_ok = matches!(c.health, RuntimeHealth::None | RuntimeHealth::Healthy);
    let checked = has_check || c.health != RuntimeHealth::None;
    let hoist_ok = if has_check { gate.probe_passed } else { gate.waited || c.health == RuntimeHealth::Healthy };
    if !(c.state == RunState::Running && docker_ok && hoist_ok) {
        return (None, Verdict::NotYet);
    }
    if !checked {
        return (gate.healthy_since, Verdict::Passed("running, unverified (no health check)"));
    }
    let since = gate.healthy_since.unwrap_or(now);
    let remaining = needed.saturating_sub(now.duration_since(since));
    if remaining > Duration::ZERO {
        return (Some(since), Verdict::Confirming { remaining, streak_starts: gate.healthy_since.is_none() });
    }
    (Some(since), Verdict::Passed("healthy"))
}

/// The part of a health gate's wait a container has already served: for an adopted one, whole seconds
/// since it started less one for the precision of `started_at` (seconds); for one this machine just
/// started, none, since its `started_at` may already lie in the previous second.
pub(super) fn gate_credit(adopted: bool, started_at: i64, now: i64) -> Duration {
    if adopted { Duration::from_secs((now - started_at - 1).max(0) as u64) } else { Duration::ZERO }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(state: RunState, health: RuntimeHealth) -> ContainerInfo {
        ContainerInfo {
            id: "c1".into(),
            container_name: "hoist_web".into(),
            labels: Default::default(),
            image: "registry.test/web:v2".into(),
            image_id: "sha256:1".into(),
            image_digest: None,
            state,
            health,
            exit_code: None,
            created: 0,
            started_at: 0,
            ip: None,
        }
    }

    #[test]
    fn the_gate_passes_a_container_that_runs_healthy_long_enough() {
        use RuntimeHealth::{Healthy, None as NoCheck, Starting, Unhealthy};
        let now = Instant::now();
        let min = Duration::from_secs(10);
        let fresh = Gate::default();
        let probed = Gate { probe_passed: true, ..Gate::default() };
        let waited = Gate { waited: true, ..Gate::default() };
        let streak = |ago: u64| Gate { probe_passed: true, healthy_since: Some(now - Duration::from_secs(ago)), ..Gate::default() };
        let confirming = |secs: u64, starts: bool| Verdict::Confirming { remaining: Duration::from_secs(secs), streak_starts: starts };
        // (container, has a hoist check, gate, verdict)
        let cases = [
            (container(RunState::Exited, Healthy), true, probed.clone(), Verdict::NotYet),
            (container(RunState::Running, Unhealthy), true, probed.clone(), Verdict::NotYet),
            (container(RunState::Running, NoCheck), true, fresh.clone(), Verdict::NotYet),
            (container(RunState::Running, NoCheck), true, probed.clone(), confirming(10, true)),
            (container(RunState::Running, NoCheck), true, streak(4), confirming(6, false)),
            (container(RunState::Running, NoCheck), true, streak(10), Verdict::Passed("healthy")),
            // No hoist check: Docker's HEALTHCHECK decides, and is confirmed like one.
            (container(RunState::Running, Starting), false, fresh.clone(), Verdict::NotYet),
            (container(RunState::Running, Healthy), false, fresh.clone(), confirming(10, true)),
            // No check at all: the unverified wait, then no confirmation to wait for.
            (container(RunState::Running, NoCheck), false, fresh.clone(), Verdict::NotYet),
            (container(RunState::Running, NoCheck), false, waited.clone(), Verdict::Passed("running, unverified (no health check)")),
        ];
        for (c, has_check, gate, expected) in cases {
            let (_, got) = verdict(&c, has_check, &gate, min, now);
            assert_eq!(got, expected, "{:?}/{:?}, hoist check {has_check}, {gate:?}", c.state, c.health);
        }
        // A healthy streak is remembered from its first look, and forgotten when it breaks.
        let (since, _) = verdict(&container(RunState::Running, NoCheck), true, &probed, min, now);
        assert_eq!(since, Some(now));
        let (since, _) = verdict(&container(RunState::Running, Unhealthy), true, &streak(4), min, now);
        assert_eq!(since, None);
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
