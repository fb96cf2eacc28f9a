//! KV buckets as Choria creates them: stream `KV_<bucket>`, subjects `$KV.<bucket>.>`, one message per
//! write, the stream sequence as revision. Reads and writes go through async-nats's KV `Store`.

use crate::{NatsBackend, unavailable, unix_ms, validate_replicas};
use async_nats::connection::State;
use async_nats::jetstream::kv::{self, Operation, Store};
use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use hoist_core::backend::{BackendError, BackendResult, BucketConfig, Kv, KvEntry, KvOperation, validate_bucket, validate_key};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How often a watch checks that its bucket still exists, for deletions it missed while disconnected.
const BUCKET_CHECK: Duration = Duration::from_secs(15);
/// How often a watch looks at the connection, to notice a reconnect.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);
/// Longest pause between attempts to re-create a broken watch.
const MAX_REWATCH_DELAY: Duration = Duration::from_secs(5);

/// How many watches a bucket serves at once. Every agent holds two per container that follows the KV
/// (its tag key and its release record), each an ordered consumer of the bucket's stream; nats-server
/// 2.15 limits a stream that sets no limit to 1000 of them, so an unset limit would cut a fleet off
/// at 500 nodes. Streams cannot say "unlimited" any more (the server takes any value under 1 for its
/// default), so this is a fleet's worth: 20,000 nodes with 5 such containers each.
const MAX_WATCHES: i32 = 200_000;

fn stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The stream config `choria kv add` makes (go-choria `providers/kv`).
fn stream_config(bucket: &str, config: &BucketConfig) -> Config {
    Config {
        name: stream_name(bucket),
        description: Some("Choria Streams Key-Value Bucket".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: i64::from(config.history),
        max_age: config.ttl.unwrap_or(Duration::ZERO),
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        max_consumers: MAX_WATCHES,
        num_replicas: usize::from(config.replicas),
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        allow_direct: true,
        allow_rollup: true,
        deny_delete: true,
        // Zero lets the server pick its 2 minute default, capped to max_age as nats.go does.
        duplicate_window: Duration::ZERO,
        ..Default::default()
    }
}

fn entry_from(bucket: &str, entry: kv::Entry) -> KvEntry {
    KvEntry {
        bucket: bucket.to_string(),
        key: entry.key,
        value: entry.value.to_vec(),
        revision: entry.revision,
        operation: match entry.operation {
            Operation::Put => KvOperation::Put,
            Operation::Delete | Operation::Purge => KvOperation::Delete,
        },
        created_ms: unix_ms(entry.created),
    }
}

/// How long a bucket's handle is used before its stream is looked up again. Looked up for every read
/// and write, as async-nats does, a fleet of thousands would spend the server's JetStream API queue
/// (one stream info request each) on asking again what it knows; any failed operation forgets the
/// handle, so a bucket deleted elsewhere is noticed at the next one.
pub(crate) const STORE_TTL: Duration = Duration::from_secs(10);

impl NatsBackend {
    /// A handle on an existing bucket, as looked up within `STORE_TTL`; `NoBucket` if its stream is
    /// missing.
    async fn store(&self, bucket: &str) -> BackendResult<Store> {
        if let Some((store, at)) = self.stores.lock().expect("not poisoned").get(bucket)
            && at.elapsed() < STORE_TTL
        {
            return Ok(store.clone());
        }
        let store = self.fresh_store(bucket).await?;
        self.stores.lock().expect("not poisoned").insert(bucket.to_string(), (store.clone(), tokio::time::Instant::now()));
        Ok(store)
    }

    /// The next operation on `bucket` looks its stream up again.
    fn forget_store(&self, bucket: &str) {
        self.stores.lock().expect("not poisoned").remove(bucket);
    }

    /// `error`, after forgetting the bucket's handle: the stream may be gone or moved.
    fn failed(&self, bucket: &str, error: BackendError) -> BackendError {
        self.forget_store(bucket);
        error
    }

    /// A handle on an existing bucket, with its stream's state as of now; `NoBucket` if it is missing.
    async fn fresh_store(&self, bucket: &str) -> BackendResult<Store> {
        validate_bucket(bucket)?;
        let stream = self.find_stream(&stream_name(bucket)).await?.ok_or_else(|| BackendError::NoBucket(bucket.into()))?;
        Ok(Store {
            name: bucket.to_string(),
            stream_name: stream_name(bucket),
            prefix: format!("$KV.{bucket}."),
            put_prefix: None,
            use_jetstream_prefix: false,
            stream,
        })
    }
}

#[async_trait]
impl Kv for NatsBackend {
    async fn create_bucket(&self, bucket: &str, config: BucketConfig) -> BackendResult<()> {
        validate_bucket(bucket)?;
        if !(1..=64).contains(&config.history) {
            return Err(BackendError::Invalid { what: "history", value: config.history.to_string(), reason: "use 1 to 64".into() });
        }
        validate_replicas(config.replicas)?;
        self.js
            .create_or_update_stream(stream_config(bucket, &config))
            .await
            .map_err(|e| unavailable(format!("creating bucket {bucket}"), e))?;
        self.forget_store(bucket);
        Ok(())
    }

    async fn bucket_config(&self, bucket: &str) -> BackendResult<BucketConfig> {
        let store = self.fresh_store(bucket).await?;
        let config = &store.stream.cached_info().config;
        Ok(BucketConfig {
            history: u8::try_from(config.max_messages_per_subject).unwrap_or(u8::MAX),
            ttl: (!config.max_age.is_zero()).then_some(config.max_age),
            replicas: u8::try_from(config.num_replicas).unwrap_or(u8::MAX),
        })
    }

    async fn delete_bucket(&self, bucket: &str) -> BackendResult<()> {
        self.fresh_store(bucket).await?;
        self.forget_store(bucket);
        self.js.delete_stream(stream_name(bucket)).await.map_err(|e| unavailable(format!("deleting bucket {bucket}"), e))?;
        Ok(())
    }

    async fn list_buckets(&self) -> BackendResult<Vec<String>> {
        self.stream_names("KV_", None).await
    }

    async fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<KvEntry>> {
        validate_key(key, false)?;
        let store = self.store(bucket).await?;
        let entry = store.entry(key).await.map_err(|e| self.failed(bucket, unavailable(format!("reading {bucket}/{key}"), e)))?;
        Ok(entry.filter(|e| e.operation == Operation::Put).map(|e| entry_from(bucket, e)))
    }

    async fn put(&self, bucket: &str, key: &str, value: &[u8]) -> BackendResult<u64> {
        validate_key(key, false)?;
        let store = self.store(bucket).await?;
        store.put(key, value.to_vec().into()).await.map_err(|e| self.failed(bucket, unavailable(format!("writing {bucket}/{key}"), e)))
    }

    async fn update(&self, bucket: &str, key: &str, value: &[u8], last: Option<u64>) -> BackendResult<u64> {
        use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
        validate_key(key, false)?;
        let store = self.store(bucket).await?;
        let conflict = || BackendError::Conflict { bucket: bucket.into(), key: key.into() };
        let what = || format!("writing {bucket}/{key}");
        match last {
            // `create` also writes over a delete marker or a purged key: those hold no value.
            None => store.create(key, value.to_vec().into()).await.map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => conflict(),
                _ => self.failed(bucket, unavailable(what(), e)),
            }),
            Some(revision) => store.update(key, value.to_vec().into(), revision).await.map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => conflict(),
                _ => self.failed(bucket, unavailable(what(), e)),
            }),
        }
    }

    async fn delete(&self, bucket: &str, key: &str) -> BackendResult<()> {
        validate_key(key, false)?;
        let store = self.store(bucket).await?;
        store.delete(key).await.map_err(|e| self.failed(bucket, unavailable(format!("deleting {bucket}/{key}"), e)))
    }

    async fn keys(&self, bucket: &str) -> BackendResult<Vec<String>> {
        let store = self.store(bucket).await?;
        let what = || format!("listing keys of {bucket}");
        let keys = store.keys().await.map_err(|e| self.failed(bucket, unavailable(what(), e)))?;
        let mut keys: Vec<String> = keys.try_collect().await.map_err(|e| self.failed(bucket, unavailable(what(), e)))?;
        keys.sort();
        Ok(keys)
    }

    async fn watch(&self, bucket: &str, pattern: &str) -> BackendResult<BoxStream<'static, KvEntry>> {
        validate_key(pattern, true)?;
        // Fresh: the stream's last sequence now tells initial values from changes.
        let store = self.fresh_store(bucket).await?;
        // Subscribed before the watch starts so a deletion right after cannot slip by.
        let deleted = self
            .client
            .subscribe(format!("$JS.EVENT.ADVISORY.STREAM.DELETED.{}", stream_name(bucket)))
            .await
            .map_err(|e| unavailable(format!("watching {bucket}"), e))?;
        let watch = store.watch_with_history(pattern).await.map_err(|e| unavailable(format!("watching {bucket}/{pattern}"), e))?;
        // Everything up to here is an initial value, where deletes are skipped; later ones are changes.
        let initial_until = store.stream.cached_info().state.last_sequence;
        let (tx, rx) = mpsc::channel(64);
        let watcher = Watcher { backend: self.clone(), store, pattern: pattern.to_string(), initial_until, last_seen: 0, tx };
        tokio::spawn(watcher.run(watch, deleted));
        Ok(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|entry| (entry, rx)) }).boxed())
    }
}

/// Feeds one watch's channel. async-nats's ordered consumer re-creates itself after reconnects and
/// missed heartbeats, but while a restarted server's JetStream recovers its retries back off to 10 s;
/// so after a reconnect, or if the consumer fails, this starts a new one itself after the last
/// revision seen, retrying sooner, and nothing is missed or repeated.
struct Watcher {
    backend: NatsBackend,
    store: Store,
    pattern: String,
    initial_until: u64,
    last_seen: u64,
    tx: mpsc::Sender<KvEntry>,
}

impl Watcher {
    async fn run(mut self, mut watch: kv::Watch, mut deleted: async_nats::Subscriber) {
        let mut check = tokio::time::interval(BUCKET_CHECK);
        check.tick().await;
        let mut connection = tokio::time::interval(CONNECTION_CHECK);
        let mut was_connected = true;
        loop {
            tokio::select! {
                () = self.tx.closed() => return,
                _ = deleted.next() => return,
                _ = check.tick() => {
                    if self.bucket_gone().await {
                        return;
                    }
                }
                _ = connection.tick() => {
                    let connected = self.backend.client.connection_state() == State::Connected;
                    let reconnected = connected && !was_connected;
                    was_connected = connected;
                    if reconnected {
                        debug!(bucket = %self.store.name, pattern = %self.pattern, "reconnected, re-creating the KV watch");
                        match self.rewatch().await {
                            Some(fresh) => watch = fresh,
                            None => return,
                        }
                    }
                }
                item = watch.next() => match item {
                    Some(Ok(entry)) => {
                        self.last_seen = entry.revision;
                        if entry.revision <= self.initial_until && entry.operation != Operation::Put {
                            continue;
                        }
                        if self.tx.send(entry_from(&self.store.name, entry)).await.is_err() {
                            return;
                        }
                    }
                    failure => {
                        debug!(bucket = %self.store.name, pattern = %self.pattern, ?failure, "KV watch broke, re-creating it");
                        match self.rewatch().await {
                            Some(fresh) => watch = fresh,
                            None => return,
                        }
                    }
                },
            }
        }
    }

    /// True only if the server says twice, a second apart, that the bucket is gone: ending a watch is
    /// final, and a server still recovering its streams after a restart may briefly not know them.
    /// Unreachable servers are not a deletion.
    async fn bucket_gone(&self) -> bool {
        // The agent's handle first, looked up at most every `STORE_TTL` for all its watches: a stream
        // info request from every watch every check would load the server's JetStream API.
        if !matches!(self.backend.store(&self.store.name).await, Err(BackendError::NoBucket(_))) {
            return false;
        }
        let missing = || async { matches!(self.backend.find_stream(&self.store.stream_name).await, Ok(None)) };
        if !missing().await {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        missing().await
    }

    /// A new watch starting after the last revision seen, retried with backoff; None once the bucket
    /// is deleted or the caller dropped the stream.
    async fn rewatch(&self) -> Option<kv::Watch> {
        let mut delay = Duration::from_millis(250);
        loop {
            if self.tx.is_closed() || self.bucket_gone().await {
                return None;
            }
            let attempt = if self.last_seen == 0 {
                self.store.watch_with_history(&self.pattern).await
            } else {
                self.store.watch_from_revision(&self.pattern, self.last_seen + 1).await
            };
            match attempt {
                Ok(watch) => return Some(watch),
                Err(err) => {
                    warn!(bucket = %self.store.name, pattern = %self.pattern, %err, "cannot re-create a KV watch, retrying in {delay:?}")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_REWATCH_DELAY);
        }
    }
}
