//! Versions: following the KV's desired tag, config changes, and rolling back a version that fails
//! its gate (here, and through the fleet's rollback mark, everywhere it was asked for).

use super::*;

impl Machine {
    /// The version being brought up failed `at` (its gate, its preflight): marked bad here and, if the
    /// fleet asked for it, for the fleet; the last good version is brought back.
    pub(super) fn roll_back(&mut self, why: String, at: FailedAt) {
        let failed = self.spec().image_ref();
        if let Some(asked) = self.kv_asks().cloned() {
            // Asked of the whole fleet: tell the nodes still waiting. Until the fleet knows (or the
            // recording gives up), this node's slot is not freed (`Effect::Release`): freed before, it
            // would let the next node try the version while this one, cut off, still cannot say why not.
            self.effect(Effect::RecordRollback { version: asked, why: why.clone() });
        }
        self.rejected = Some(Rejected { version: self.wanted_version(), at });
        self.remember();
        let message = format!("rolled back from {failed} to {}: {why}", self.spec().image_ref());
        tracing::warn!(container = %self.cfg.name, "{message}");
        self.publish_event("rollback", &message);
        self.last_error = Some(message);
        self.next_delay = Duration::ZERO;
    }

    pub(super) fn on_desired_version(&mut self, raw: Option<String>) {
        let parsed = match raw.as_deref().map(str::trim) {
            None => None,
            Some(v) => match ImageVersion::parse(v) {
                Ok(v) => Some(v),
                Err(e) => {
                    let msg = format!("ignored KV value for {}: {e}", tag_key(&self.cfg.name));
                    tracing::warn!(container = %self.cfg.name, "{msg}");
                    self.last_error = Some(msg.clone());
                    self.notice(&msg);
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
        self.remember();
        let after = self.spec().image_ref();
        if before == after {
            return;
        }
        tracing::info!(container = %self.cfg.name, from = %before, to = %after, "desired image changed");
        match self.state {
            State::Run => self.reconcile_run(),
            State::Start | State::Restart => self.want(Transition::Update, format!("KV: {after}")),
            // A newer tag while pulling the previous one: pull the newer one instead.
            State::Update => self.enter(),
            State::Stop | State::Maintenance => {}
        }
    }

    pub(super) fn reconfigure(&mut self, cfg: ContainerConfig) {
        let before = self.spec().hash();
        let watches_changed = (cfg.kv_update, &cfg.restart_files) != (self.cfg.kv_update, &self.cfg.restart_files);
        let probe_changed = cfg.health_check != self.cfg.health_check;
        let dependency_changed = cfg.dependency_check != self.cfg.dependency_check;
        let registrations_changed = cfg.register_ports != self.cfg.register_ports;
        if (&cfg.image, &cfg.image_tag) != (&self.cfg.image, &self.cfg.image_tag) {
            self.clear_bad_version();
            self.forget_pull_failures();
        }
        self.crash.reconfigure(cfg.restart_backoff.unwrap_or(self.settings.rollout.restart_backoff));
        self.cfg = cfg;
        if watches_changed {
            self.start_watches();
        }
        if probe_changed && self.probing {
            self.start_probe();
        }
        if dependency_changed {
            self.start_dependency_check();
        }
        if registrations_changed && std::mem::take(&mut self.registered) {
            self.effect(Effect::Withdraw { wait: true });
            self.register();
        }
        if self.spec().hash() == before {
            return;
        }
        match self.state {
            State::Run => self.reconcile_run(),
            // Replace a container still being brought up with the new definition straight away: the
            // old definition may be the reason it cannot come up.
            State::Start | State::Restart => self.start_provision(true),
            State::Update | State::Stop | State::Maintenance => {}
        }
    }

    /// The version rolled back from, if any.
    pub(super) fn bad_version(&self) -> Option<&ImageVersion> {
        self.rejected.as_ref().map(|r| &r.version)
    }

    /// Whether there was a mark to clear.
    pub(super) fn clear_bad_version(&mut self) -> bool {
        self.rejected.take().is_some()
    }
}
