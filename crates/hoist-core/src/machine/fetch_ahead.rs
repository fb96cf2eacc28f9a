//! Fetching a release's image ahead of this node's wave (`release::fetch_ahead` says when), so the
//! restart slot of its turn covers only stop, start and the gate. The fetch runs beside the machine's
//! jobs, under the container's update governor when it has one (so a wave does not stampede the
//! registry), and never touches the running container.

use super::*;

/// A fetch ahead, under way or done.
pub(super) struct FetchAhead {
    version: ImageVersion,
    /// Dropped (aborted) with the fetch: a new target, the machine's shutdown. Its governor slot
    /// is let go with the task.
    task: Option<tokio::task::JoinHandle<()>>,
    /// The image is local.
    fetched: bool,
}

impl Drop for FetchAhead {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Machine {
    /// The release's digest to fetch ahead, or None (no release, or not this node's turn yet).
    pub(super) fn on_fetch_ahead(&mut self, raw: Option<String>) {
        let version = raw.as_deref().and_then(|v| ImageVersion::parse(v.trim()).ok());
        if version.as_ref() == self.fetch_ahead.as_ref().map(|f| &f.version) {
            return;
        }
        self.fetch_ahead = None;
        let Some(version) = version else { return };
        let image = crate::spec::image_ref(&self.cfg.image, &version);
        let runs_it = self.container.as_ref().is_some_and(|c| c.image == image);
        // Only a serving node fetches ahead: any other is busy with its own container already.
        if self.state != State::Run || runs_it || self.bad_version.as_ref() == Some(&version) {
            return;
        }
        let (deps, tx, governor) = (self.deps.clone(), self.tx.clone(), self.cfg.update_governor.clone());
        let (holder, component) = (format!("hoist {} @ {}", self.cfg.name, self.deps.node), self.machine_name());
        let fetched = version.clone();
        let task = tokio::spawn(async move {
            let result = fetch(&deps, &image, governor.as_deref(), &holder, &component).await;
            let _ = tx.send(Input::FetchedAhead { version: fetched, result }).await;
        });
        tracing::info!(container = %self.cfg.name, version = %version, "fetching the release's image ahead of this node's wave");
        self.fetch_ahead = Some(FetchAhead { version, task: Some(task), fetched: false });
    }

    pub(super) fn on_fetched_ahead(&mut self, version: ImageVersion, result: Result<(), String>) {
        let Some(ahead) = self.fetch_ahead.as_mut().filter(|f| f.version == version) else { return };
        ahead.task = None;
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

/// Pulls `image`, under a slot of `governor` when there is one (held until the pull ends).
async fn fetch(deps: &MachineDeps, image: &str, governor: Option<&str>, holder: &str, component: &str) -> Result<(), String> {
    if super::job::pinned_and_local(&*deps.runtime, image).await.is_some() {
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
