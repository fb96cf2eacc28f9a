//! What the fleet hears of this container's health and what it says back: since when the container
//! has been unhealthy (its liveness failing, or its `dependency_check`), the dependency check itself
//! (report-only: it never restarts anything), and the fleet's degraded verdict, which makes a failure
//! here no reason to roll back, every restart wait its crash backoff, and a new version wait
//! (`versions.rs`, `held_back`) until the fleet recovers.

use super::*;
use crate::degraded::FleetDegraded;

#[derive(Debug, Default)]
pub(super) struct FleetHealth {
    /// Unix ms and why: the container failed (died, failed its health check, missed its gate) and
    /// has not passed a gate since.
    failing: Option<(u64, String)>,
    /// Unix ms and why: the dependency check has failed `retries` times in a row.
    dependency: Option<(u64, String)>,
    dependency_failures: u32,
    /// A dependency probe is running (one at a time, however slow).
    probing: bool,
    /// The dependency check's ticker runs.
    ticking: bool,
    /// The fleet's verdict while it is degraded for this container.
    pub(super) degraded: Option<FleetDegraded>,
    /// An operator asked for `update` while degraded: the wanted version is not held back.
    pub(super) pushed_through: bool,
}

impl FleetHealth {
    /// Since when the container has been unhealthy, and why; None while it is well.
    pub(super) fn unhealthy(&self) -> Option<(u64, String)> {
        match (&self.failing, &self.dependency) {
            (Some((a, why)), Some((b, dep))) => Some(((*a).min(*b), format!("{why}; {dep}"))),
            (Some(one), None) | (None, Some(one)) => Some(one.clone()),
            (None, None) => None,
        }
    }
}

impl Machine {
    /// The container failed: unhealthy from now, unless it already was.
    pub(super) fn failing(&mut self, why: &str) {
        let now = self.now.unix_ms;
        self.fleet_health.failing.get_or_insert_with(|| (now, why.to_string()));
    }

    /// It passed its gate (or an operator took it out): no longer failing.
    pub(super) fn well_again(&mut self) {
        self.fleet_health.failing = None;
    }

    pub(super) fn degraded(&self) -> bool {
        self.fleet_health.degraded.is_some()
    }

    pub(super) fn on_degraded(&mut self, verdict: Option<FleetDegraded>) {
        match (&self.fleet_health.degraded, &verdict) {
            (None, Some(v)) => {
                tracing::warn!(container = %self.cfg.name, condition = %v.describe(), "the fleet is degraded: no rollbacks, restarts at the crash backoff")
            }
            (Some(_), None) => tracing::info!(container = %self.cfg.name, "the fleet is no longer degraded"),
            _ => {}
        }
        let recovered = self.fleet_health.degraded.is_some() && verdict.is_none();
        self.fleet_health.degraded = verdict;
        if recovered {
            self.fleet_health.pushed_through = false;
            if self.state == State::Run {
                // An update held back while degraded goes ahead now.
                self.activity = None;
                self.reconcile_run();
            }
        } else if self.state == State::Run {
            // Entered: a new version not yet started here waits from now on.
            self.reconcile_run();
        }
    }

    /// Starts (or, after a reconfigure, restarts) the dependency check's ticker, if one is set.
    pub(super) fn start_dependency_check(&mut self) {
        self.stop_dependency_check();
        (self.fleet_health.dependency, self.fleet_health.dependency_failures) = (None, 0);
        let Some(check) = &self.cfg.dependency_check else { return };
        self.fleet_health.ticking = true;
        self.effect(Effect::DependencyTicker(Some(check.interval)));
    }

    pub(super) fn stop_dependency_check(&mut self) {
        if std::mem::take(&mut self.fleet_health.ticking) {
            self.effect(Effect::DependencyTicker(None));
        }
    }

    /// Time for the dependency check: probes the running container, off the loop.
    pub(super) fn on_dependency_due(&mut self) {
        let (Some(check), Some(container)) = (self.cfg.dependency_check.clone(), self.container.clone()) else { return };
        if container.state != RunState::Running || self.fleet_health.probing {
            return;
        }
        self.fleet_health.probing = true;
        self.effect(Effect::DependencyProbe { check, container: Box::new(container) });
    }

    pub(super) fn on_dependency_probe(&mut self, container_id: &str, result: Result<(), ProbeError>) {
        self.fleet_health.probing = false;
        let Some(check) = &self.cfg.dependency_check else { return };
        let Some(c) = self.container.as_ref().filter(|c| c.id == container_id) else { return };
        let health = &mut self.fleet_health;
        match result {
            Ok(()) => {
                health.dependency_failures = 0;
                if health.dependency.take().is_some() {
                    tracing::info!(container = %self.cfg.name, "dependency check passes again");
                }
            }
            Err(ProbeError::Failed(why)) => {
                if (self.now.unix() - c.started_at) < check.start_period.as_secs() as i64 {
                    return;
                }
                health.dependency_failures += 1;
                if health.dependency_failures >= check.retries.max(1) && health.dependency.is_none() {
                    let why = format!("dependency check failed {} times: {why}", health.dependency_failures);
                    tracing::warn!(container = %self.cfg.name, reason = %why, "a dependency is failing; the container is left running");
                    health.dependency = Some((self.now.unix_ms, why));
                }
            }
            // Nothing said of the dependency: the engine or this host could not run the check.
            Err(ProbeError::RuntimeUnavailable(_) | ProbeError::Local(_)) => {}
        }
    }
}
