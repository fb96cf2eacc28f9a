//! Fetching a release's image ahead of this node's wave (`release::fetch_ahead` says when), so the
//! restart slot of its turn covers only stop, start and the gate. The fetch runs beside the machine's
//! jobs, under the container's update governor when it has one (so a wave does not stampede the
//! registry), and never touches the running container.

use super::*;

/// A fetch ahead, under way or done (the runner owns its task, dropped with it).
#[derive(Debug)]
pub(super) struct FetchAhead {
    version: ImageVersion,
    /// The image is local.
    fetched: bool,
}

impl Machine {
    /// The release's digest to fetch ahead, or None (no release, or not this node's turn yet).
    pub(super) fn on_fetch_ahead(&mut self, raw: Option<String>) {
        let version = raw.as_deref().and_then(|v| ImageVersion::parse(v.trim()).ok());
        if version.as_ref() == self.fetch_ahead.as_ref().map(|f| &f.version) {
            return;
        }
        if self.fetch_ahead.take().is_some() {
            self.effect(Effect::FetchAhead(None));
        }
        let Some(version) = version else { return };
        let image = crate::spec::image_ref(&self.cfg.image, &version);
        let runs_it = self.container.as_ref().is_some_and(|c| c.image == image);
        // Only a serving node fetches ahead: any other is busy with its own container already.
        if self.state != State::Run || runs_it || self.bad_version() == Some(&version) {
            return;
        }
        tracing::info!(container = %self.cfg.name, version = %version, "fetching the release's image ahead of this node's wave");
        let governor = self.cfg.update_governor.clone();
        self.effect(Effect::FetchAhead(Some(FetchJob { version: version.clone(), image, governor })));
        self.fetch_ahead = Some(FetchAhead { version, fetched: false });
    }

    pub(super) fn on_fetched_ahead(&mut self, version: ImageVersion, result: Result<(), String>) {
        let Some(ahead) = self.fetch_ahead.as_mut().filter(|f| f.version == version) else { return };
        let image = crate::spec::image_ref(&self.cfg.image, &version);
        match result {
            Ok(()) => {
                ahead.fetched = true;
                self.publish_event("fetch_ahead", &format!("fetched {image} ahead of this node's wave"));
            }
            // Its turn pulls it again, with the pull's own retries; nothing else is lost.
            Err(e) => tracing::warn!(container = %self.cfg.name, %image, error = %e, "could not fetch ahead of this node's wave"),
        }
    }

    /// The version fetched ahead of this node's wave, once it is local.
    pub(super) fn fetched_ahead(&self) -> Option<String> {
        self.fetch_ahead.as_ref().filter(|f| f.fetched).map(|f| f.version.to_string())
    }
}
