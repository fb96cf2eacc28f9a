//! The machine's watches: the KV keys it follows (its tag key, its release record, the fleet's
//! degraded record) and the files whose touch restarts it.

use super::*;

impl Machine {
    pub(super) fn start_watches(&mut self) {
        let (kv_update, kv_interval, restart_files) = (self.cfg.kv_update, self.cfg.kv_interval, self.cfg.restart_files.clone());
        self.effect(Effect::Watch { kv_update, kv_interval, restart_files });
    }
}

/// Starts, as tasks of `owner`, the watches `Effect::Watch` asks for: the KV keys (`watch_desired`)
/// and the restart files.
pub(super) fn start(
    owner: &mut tokio::task::JoinSet<()>,
    deps: &MachineDeps,
    container: &str,
    (kv_update, kv_interval, restart_files): (bool, Duration, Vec<PathBuf>),
    tx: &mpsc::Sender<Input>,
) -> Vec<AbortHandle> {
    let (kv, node) = (deps.kv.clone(), deps.node.clone());
    let mut tasks = vec![owner.spawn(watch_desired(kv, node, container.to_string(), kv_update, kv_interval, tx.clone()))];
    if !restart_files.is_empty() {
        let mut touched = deps.files.watch(&restart_files);
        let tx = tx.clone();
        tasks.push(owner.spawn(async move {
            while let Some(path) = touched.next().await {
                if tx.send(Input::FileTouched(path)).await.is_err() {
                    return;
                }
            }
        }));
    }
    tasks
}

/// Follows what the fleet says of the container: with `kv_update`, what it should run — its tag key
/// and its release record (`release::desired` decides between them, for this node's wave) —; always,
/// the fleet's degraded record. The watches deliver changes as they happen; a slow jittered re-read
/// catches anything a reconnect gap lost. A store that answers reads but refuses a watch (a stream
/// at its consumer limit) is read every `poll` (`kv_interval`, as the seed's machines poll) until it
/// gives one. Backs off when the backend is unreachable.
pub(super) async fn watch_desired(
    kv: Arc<dyn Kv>,
    node: String,
    container: String,
    kv_update: bool,
    poll: Duration,
    tx: mpsc::Sender<Input>,
) {
    let mut view = Sources::new(&container, kv_update);
    let resync = poll.max(Duration::from_secs(60));
    let mut retry = Duration::from_millis(500);
    let mut polling = false;
    loop {
        match view.watch(&*kv).await {
            Ok(mut changes) => {
                retry = Duration::from_millis(500);
                if std::mem::take(&mut polling) {
                    tracing::info!(%container, "watching the keys again");
                }
                // The watches deliver current values only if there are some: read the keys first, so
                // an absent key counts too (an absent tag key means "use image_tag").
                if view.read(&*kv).await && !view.send(&node, &tx).await {
                    return;
                }
                loop {
                    tokio::select! {
                        biased;
                        entry = changes.next() => match entry {
                            Some(entry) => view.seen(entry),
                            None => break,
                        },
                        _ = tokio::time::sleep(crate::clock::jitter(resync)) => {
                            if !view.read(&*kv).await {
                                continue;
                            }
                        }
                    }
                    if !view.send(&node, &tx).await {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%container, error = %e, "KV watch unavailable, retrying");
                if view.read(&*kv).await {
                    if !std::mem::replace(&mut polling, true) {
                        tracing::warn!(%container, error = %e, "cannot watch the keys; reading them every {poll:?} until they can be watched");
                    }
                    if !view.send(&node, &tx).await {
                        return;
                    }
                    tokio::time::sleep(crate::clock::jitter(poll)).await;
                    continue;
                }
            }
        }
        tokio::time::sleep(retry).await;
        // Capped low: after a NATS outage this is how soon the tag is followed again.
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

/// The keys a machine follows, as last seen (absent: no entry).
struct Sources {
    tag: String,
    release: String,
    degraded: String,
    kv_update: bool,
    seen: std::collections::HashMap<String, crate::backend::KvEntry>,
}

impl Sources {
    fn new(container: &str, kv_update: bool) -> Sources {
        Sources {
            tag: tag_key(container),
            release: release::release_key(container),
            degraded: crate::degraded::degraded_key(container),
            kv_update,
            seen: Default::default(),
        }
    }

    fn keys(&self) -> Vec<&str> {
        let versions = [self.tag.as_str(), self.release.as_str()].into_iter().filter(|_| self.kv_update);
        versions.chain([self.degraded.as_str()]).collect()
    }

    /// One stream of the changes of every key; an error if any cannot be watched.
    async fn watch(&self, kv: &dyn Kv) -> Result<futures_util::stream::BoxStream<'static, crate::backend::KvEntry>, BackendError> {
        let mut watches = Vec::new();
        for key in self.keys() {
            watches.push(kv.watch(HOIST_BUCKET, key).await?);
        }
        Ok(futures_util::stream::select_all(watches).boxed())
    }

    /// Reads every key; false if the store did not answer (the view is then left as it was).
    async fn read(&mut self, kv: &dyn Kv) -> bool {
        let mut read = std::collections::HashMap::new();
        for key in self.keys() {
            match kv.get(HOIST_BUCKET, key).await {
                Ok(Some(entry)) => {
                    read.insert(key.to_string(), entry);
                }
                Ok(None) => {}
                Err(_) => return false,
            }
        }
        self.seen = read;
        true
    }

    fn seen(&mut self, entry: crate::backend::KvEntry) {
        self.seen.insert(entry.key.clone(), entry);
    }

    /// A value that was put (not deleted) under `key`.
    fn put(&self, key: &str) -> Option<&crate::backend::KvEntry> {
        self.seen.get(key).filter(|e| e.operation == crate::backend::KvOperation::Put)
    }

    /// Tells the machine; false once it is gone.
    async fn send(&self, node: &str, tx: &mpsc::Sender<Input>) -> bool {
        let degraded = self.put(&self.degraded).and_then(|e| crate::degraded::lookout::parse(&e.value)).filter(|r| r.active);
        if !self.kv_update {
            return tx.send(Input::Degraded(degraded)).await.is_ok();
        }
        // A record that does not parse is no release: the tag key rules, as without one.
        let record = self.put(&self.release).and_then(|e| {
            release::parse(e)
                .map_err(|e| tracing::warn!(key = %self.release, error = %e, "ignored a release record that does not parse"))
                .ok()
        });
        let tag = self.seen.get(&self.tag);
        tx.send(Input::DesiredVersion(release::desired(node, tag, record.as_ref()))).await.is_ok()
            && tx.send(Input::FetchAhead(release::fetch_ahead(node, tag, record.as_ref()))).await.is_ok()
            && tx.send(Input::Degraded(degraded)).await.is_ok()
    }
}
