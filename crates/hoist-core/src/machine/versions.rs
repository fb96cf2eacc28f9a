//! Which version a machine runs: what the KV or the config asks for, unless it was rolled back from
//! (then the fallback: the last version that passed its gate here, else the config's `image_tag`),
//! or a revival brings back what ran; and whether what it brings up is new here, the kind of version
//! a failure rolls back from and the fleet's mark is read for.

use super::*;

impl Machine {
    pub(super) fn spec(&self) -> ContainerSpec {
        self.cfg.spec(&self.settings.node, &self.settings.docker, &self.desired_version())
    }

    /// What the KV or the config asks for.
    pub(super) fn wanted_version(&self) -> ImageVersion {
        self.kv_asks().unwrap_or(&self.cfg.image_tag).clone()
    }

    /// The version the KV asks for, when it is what this container follows: asked of the whole fleet.
    pub(super) fn kv_asks(&self) -> Option<&ImageVersion> {
        self.kv_version.as_ref().filter(|_| self.cfg.kv_update)
    }

    /// What to run: the wanted version, unless it was rolled back from (then `fallback_version`), a
    /// revival brings back what ran before an update could pull, or the fleet is degraded
    /// (`held_back`).
    pub(super) fn desired_version(&self) -> ImageVersion {
        if let Some(revive) = &self.revive {
            return revive.clone();
        }
        if let Some(held) = self.held_back() {
            return held;
        }
        let wanted = self.wanted_version();
        if self.bad_version() == Some(&wanted)
            && let Some(fallback) = self.fallback_version()
        {
            return fallback;
        }
        wanted
    }

    /// What to run instead of the wanted version when it was rolled back: the last version that
    /// passed its gate here, else (a node with no such memory: new, or its state file lost) the
    /// config's `image_tag`. None when that is the wanted version itself: there is nothing else.
    pub(super) fn fallback_version(&self) -> Option<ImageVersion> {
        Some(self.last_good_version().unwrap_or_else(|| self.cfg.image_tag.clone())).filter(|v| *v != self.wanted_version())
    }

    /// The version of the last image that passed its gate here.
    fn last_good_version(&self) -> Option<ImageVersion> {
        self.last_good_image.as_deref().and_then(version_of).and_then(|v| ImageVersion::parse(&v).ok())
    }

    /// While the fleet is degraded a new version waits, whatever state the machine is in: a shared
    /// outage would fail it, and nothing would roll it back. The last good version is run (and
    /// brought back by a restart) meanwhile, unless an operator asked for `update` during it.
    pub(super) fn held_back(&self) -> Option<ImageVersion> {
        if !self.degraded() || self.fleet_health.pushed_through {
            return None;
        }
        self.last_good_version().filter(|good| *good != self.wanted_version())
    }

    /// Whether the fleet's rollback mark is to be read before bringing up the desired version: the
    /// KV asks for it and it is new here (`trying_new_version`), also on a node with no memory of a
    /// good version (new, or its state file lost).
    pub(super) fn check_fleet_mark(&self) -> bool {
        self.kv_asks() == Some(&self.desired_version()) && self.trying_new_version()
    }

    /// Whether the container being brought up is a new version, one a failure rolls back from: it has
    /// not passed its gate here, and there is another version to fall back to (the last good one, or
    /// for a node with no memory of one, the config's `image_tag`). The fallback itself is not: its
    /// failures are crashes, with backoff.
    pub(super) fn trying_new_version(&self) -> bool {
        self.last_good_image.as_ref() != Some(&self.spec().image_ref())
            && self.fallback_version().is_some_and(|f| f != self.desired_version())
    }
}
