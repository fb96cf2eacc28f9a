//! What the machine tells the world: its persisted state, transition and lifecycle events, status.

use super::*;

impl Machine {
    pub(super) fn remember(&mut self) {
        let remembered = Remembered {
            state: self.state,
            desired_version: self.kv_version.as_ref().map(|v| v.to_string()),
            last_good_image: self.last_good_image.clone(),
            restarts: self.restarts,
            bad_version: self.bad_version().map(|v| v.to_string()),
            bad_version_node: self.rejected.as_ref().and_then(|r| match &r.at {
                FailedAt::Node(node) => Some(node.clone()),
                FailedAt::Gate | FailedAt::Preflight => None,
            }),
            bad_in_preflight: self.rejected.as_ref().is_some_and(|r| r.at == FailedAt::Preflight),
            container_id: self.container.as_ref().map(|c| c.id.clone()),
        };
        self.effect(Effect::Persist(remembered));
    }

    /// The transition just made (from `from` to the current state). Like every event, it is queued
    /// in the outbox by the runner: a machine never waits on the backend for a report.
    pub(super) fn publish(&mut self, transition: Transition, from: State, why: &str) {
        self.emit(transition.as_str(), from, why);
    }

    /// A problem worth an event but no state change (a refused KV value, a failed pull).
    pub(super) fn notice(&mut self, message: &str) {
        self.publish_event("error", message);
    }

    /// An event that is not a state change (an error, a rollback), in the transition shape with
    /// from = to = the current state, so Choria tools show it in the same stream.
    pub(super) fn publish_event(&mut self, kind: &str, message: &str) {
        self.emit(kind, self.state, message);
    }

    pub(super) fn emit(&mut self, kind: &str, from: State, detail: &str) {
        let (to, image) = (self.state, self.spec().image_ref());
        self.effect(Effect::Publish { kind: kind.to_string(), from, to, detail: detail.to_string(), image });
    }

    pub(super) fn status(&self) -> MachineStatus {
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
        // Passed its gate here, or serves in RUN (where `resume` brings a container without a gate).
        let proven = image.is_some() && (image == self.last_good_image || self.state == State::Run);
        let version = image.as_deref().and_then(version_of).unwrap_or_else(|| spec.version.to_string());
        // An operator's maintenance or stop is no sickness of the container.
        let unhealthy = self.fleet_health.unhealthy().filter(|_| !matches!(self.state, State::Maintenance | State::Stop));
        MachineStatus {
            name: self.machine_name(),
            container: self.cfg.name.clone(),
            node: self.settings.node.clone(),
            id: self.instance_id.clone(),
            state: self.state,
            version,
            image,
            digest: self.container.as_ref().and_then(|c| c.image_digest.clone()),
            // An update held back by a degraded fleet is still what is wanted: shown as waiting, not as done.
            desired_image: match self.held_back() {
                Some(_) if self.state == State::Run => crate::spec::image_ref(&self.cfg.image, &self.wanted_version()),
                _ => spec.image_ref(),
            },
            container_id: self.container.as_ref().map(|c| c.id.chars().take(12).collect()),
            started: running.map(|c| c.started_at),
            available_transitions: self.state.available_transitions(),
            health,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            bad_version: self.bad_version().map(|v| v.to_string()),
            condition: self.rejected.as_ref().map(Rejected::condition).or_else(|| self.crash.condition()).or_else(|| self.incident.clone()),
            activity: self.activity.clone(),
            governor_wait_seconds: self.governor_wait.as_secs_f64(),
            last_update_seconds: self.last_update.map(|d| d.as_secs_f64()),
            fetched_ahead: self.fetched_ahead(),
            report: HealthReport {
                proven,
                unhealthy_since_ms: unhealthy.as_ref().map(|(since, _)| *since),
                unhealthy: unhealthy.map(|(_, why)| why),
            },
            degraded: self.fleet_health.degraded.as_ref().map(|d| d.describe()),
        }
    }
}
