//! The machine's watches: the KV tag key it follows and the files whose touch restarts it.

use super::*;

impl Machine {
    pub(super) fn start_watches(&mut self) {
        if self.cfg.kv_update {
            let kv = self.deps.kv.clone();
            let tx = self.tx.clone();
            let key = tag_key(&self.cfg.name);
            let resync = self.cfg.kv_interval.max(Duration::from_secs(60));
            let task = tokio::spawn(watch_desired_tag(kv, key, resync, tx));
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

/// Follows the container's tag key: the watch delivers changes as they happen; a slow jittered
/// re-read catches anything a reconnect gap lost. Backs off when the backend is unreachable.
pub(super) async fn watch_desired_tag(kv: Arc<dyn Kv>, key: String, resync: Duration, tx: mpsc::Sender<Input>) {
    let mut retry = Duration::from_millis(500);
    loop {
        match kv.watch(HOIST_BUCKET, &key).await {
            Ok(mut updates) => {
                retry = Duration::from_millis(500);
                // The watch delivers the current value first, if there is one; absent means "use image_tag".
                if let Ok(None) = kv.get(HOIST_BUCKET, &key).await
                    && tx.send(Input::DesiredVersion(None)).await.is_err()
                {
                    return;
                }
                loop {
                    tokio::select! {
                        biased;
                        entry = updates.next() => match entry {
                            Some(entry) => {
                                let value = (entry.operation == crate::backend::KvOperation::Put).then(|| entry.value_str());
                                if tx.send(Input::DesiredVersion(value)).await.is_err() {
                                    return;
                                }
                            }
                            None => break,
                        },
                        _ = tokio::time::sleep(crate::clock::jitter(resync)) => {
                            if let Ok(entry) = kv.get(HOIST_BUCKET, &key).await
                                && tx.send(Input::DesiredVersion(entry.map(|e| e.value_str()))).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(key = %key, error = %e, "KV watch unavailable, retrying"),
        }
        tokio::time::sleep(retry).await;
        // Capped low: after a NATS outage this is how soon the tag is followed again.
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}
