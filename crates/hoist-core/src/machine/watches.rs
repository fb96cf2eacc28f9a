//! The machine's watches: the KV keys it follows (its tag key and its release record) and the files
//! whose touch restarts it.

use super::*;

impl Machine {
    pub(super) fn start_watches(&mut self) {
        if self.cfg.kv_update {
            let kv = self.deps.kv.clone();
            let tx = self.tx.clone();
            let (node, container) = (self.deps.node.clone(), self.cfg.name.clone());
            let task = tokio::spawn(watch_desired(kv, node, container, self.cfg.kv_interval, tx));
            self.watch_tasks.push(task.abort_handle());
        }
        if !self.cfg.restart_files.is_empty() {
            let mut touched = self.deps.files.watch(&self.cfg.restart_files);
            let tx = self.tx.clone();
            let task = tokio::spawn(async move {
                while let Some(path) = touched.next().await {
                    if tx.send(Input::FileTouched(path)).await.is_err() {
                        return;
                    }
                }
            });
            self.watch_tasks.push(task.abort_handle());
        }
    }
}

/// Follows what the container should run: its tag key and its release record (`release::desired`
/// decides between them, for this node's wave). The watches deliver changes as they happen; a slow
/// jittered re-read catches anything a reconnect gap lost. A store that answers reads but refuses a
/// watch (a stream at its consumer limit) is read every `poll` (`kv_interval`, as the seed's machines
/// poll) until it gives one. Backs off when the backend is unreachable.
pub(super) async fn watch_desired(kv: Arc<dyn Kv>, node: String, container: String, poll: Duration, tx: mpsc::Sender<Input>) {
    let (tag, release) = (tag_key(&container), release::release_key(&container));
    let resync = poll.max(Duration::from_secs(60));
    let mut retry = Duration::from_millis(500);
    let mut view = Sources::default();
    let mut polling = false;
    loop {
        match (kv.watch(HOIST_BUCKET, &tag).await, kv.watch(HOIST_BUCKET, &release).await) {
            (Ok(mut tags), Ok(mut releases)) => {
                retry = Duration::from_millis(500);
                if std::mem::take(&mut polling) {
                    tracing::info!(%container, key = %tag, "watching the key again");
                }
                // The watches deliver current values only if there are some: read both first, so an
                // absent key counts too (absent means "use image_tag").
                if view.read(&*kv, &tag, &release).await && !view.send(&node, &tx).await {
                    return;
                }
                loop {
                    tokio::select! {
                        biased;
                        entry = tags.next() => match entry {
                            Some(entry) => view.tag = Some(entry),
                            None => break,
                        },
                        entry = releases.next() => match entry {
                            Some(entry) => view.set_release(&entry),
                            None => break,
                        },
                        _ = tokio::time::sleep(crate::clock::jitter(resync)) => {
                            if !view.read(&*kv, &tag, &release).await {
                                continue;
                            }
                        }
                    }
                    if !view.send(&node, &tx).await {
                        return;
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(key = %tag, error = %e, "KV watch unavailable, retrying");
                if view.read(&*kv, &tag, &release).await {
                    if !std::mem::replace(&mut polling, true) {
                        tracing::warn!(%container, key = %tag, error = %e, "cannot watch the key; reading it every {poll:?} until it can be watched");
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

/// The two keys a machine's desired version comes from, as last seen.
#[derive(Default)]
struct Sources {
    tag: Option<crate::backend::KvEntry>,
    release: Option<release::ReleaseRecord>,
}

impl Sources {
    /// Reads both keys; false if the store did not answer (the view is then left as it was).
    async fn read(&mut self, kv: &dyn Kv, tag: &str, release: &str) -> bool {
        match (kv.get(HOIST_BUCKET, tag).await, kv.get(HOIST_BUCKET, release).await) {
            (Ok(t), Ok(r)) => {
                self.tag = t;
                self.release = None;
                if let Some(entry) = r {
                    self.set_release(&entry);
                }
                true
            }
            _ => false,
        }
    }

    /// A record that does not parse is no release: the tag key rules, as without one.
    fn set_release(&mut self, entry: &crate::backend::KvEntry) {
        self.release = match entry.operation {
            crate::backend::KvOperation::Put => match release::parse(entry) {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "ignored a release record that does not parse");
                    None
                }
            },
            _ => None,
        };
    }

    /// Tells the machine; false once it is gone.
    async fn send(&self, node: &str, tx: &mpsc::Sender<Input>) -> bool {
        let (tag, record) = (self.tag.as_ref(), self.release.as_ref());
        tx.send(Input::DesiredVersion(release::desired(node, tag, record))).await.is_ok()
            && tx.send(Input::FetchAhead(release::fetch_ahead(node, tag, record))).await.is_ok()
    }
}
