//! Hoist's single-machine backend: the KV store, governors and event bus of `hoist-core`, kept in
//! one redb file that the agent owns. Other processes reach them through the agent's control API,
//! so watches and governor waits are woken in-process rather than by polling the file.

mod governor;
mod kv;

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream};
use hoist_core::backend::{BackendError, BackendResult, Events, GovernorEvent, KvEntry, TransitionEvent};
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, broadcast};

/// How many KV changes or events a slow subscriber may fall behind before it lags.
const CHANNEL_CAPACITY: usize = 1024;

/// How often entries past their bucket's TTL are removed from the file.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The store; clones share the same file and channels.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Held from a KV write's start until its change is broadcast, so watchers receive changes in
    /// revision order.
    kv_order: Mutex<()>,
    changes: broadcast::Sender<Change>,
    /// Woken whenever a governor slot may have come free.
    slot_freed: Notify,
    events: broadcast::Sender<TransitionEvent>,
}

/// A committed KV change, as broadcast to watchers.
#[derive(Clone)]
enum Change {
    Entry(KvEntry),
    BucketDeleted(String),
}

impl EmbeddedStore {
    /// Opens or creates the store at `path`, creating its parent directories.
    pub fn open(path: &Path) -> Result<EmbeddedStore, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable(format!("cannot open {}: {reason}", path.display()));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| unavailable(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => unavailable("the file is locked (is another hoist agent running?)".into()),
            other => unavailable(other.to_string()),
        })?;
        let inner = Inner {
            db,
            kv_order: Mutex::new(()),
            changes: broadcast::channel(CHANNEL_CAPACITY).0,
            slot_freed: Notify::new(),
            events: broadcast::channel(CHANNEL_CAPACITY).0,
        };
        // Read transactions fail on tables that were never created, so create them all up front.
        inner
            .write(|txn| {
                kv::create_tables(txn)?;
                governor::create_tables(txn)
            })
            .map_err(|e| unavailable(BackendError::from(e).to_string()))?;
        let inner = Arc::new(inner);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&inner)));
        }
        Ok(EmbeddedStore { inner })
    }

    /// Runs blocking store work off the async runtime.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce(&Inner) -> Result<T, Fail> + Send + 'static) -> BackendResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| BackendError::Other(format!("store task failed: {e}")))?
            .map_err(BackendError::from)
    }
}

/// Sweeps expired KV entries now and then, until the store is dropped.
async fn sweep(store: Weak<Inner>) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = store.upgrade() else { return };
        match tokio::task::spawn_blocking(move || kv::sweep_expired(&inner)).await {
            Ok(Ok(())) => {}
            Ok(Err(fail)) => tracing::warn!(error = %BackendError::from(fail), "could not sweep expired KV entries"),
            Err(e) => tracing::warn!(error = %e, "could not sweep expired KV entries"),
        }
    }
}

impl Inner {
    fn write<T>(&self, work: impl FnOnce(&WriteTransaction) -> Result<T, Fail>) -> Result<T, Fail> {
        let txn = self.db.begin_write()?;
        let out = work(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// A write whose change is broadcast to watchers once committed.
    fn kv_write<T>(&self, work: impl FnOnce(&WriteTransaction) -> Result<(T, Change), Fail>) -> Result<T, Fail> {
        let _order = self.kv_order.lock().unwrap_or_else(PoisonError::into_inner);
        let (out, change) = self.write(work)?;
        // Nobody listening is fine.
        let _ = self.changes.send(change);
        Ok(out)
    }
}

/// Why store work failed: a caller-facing error, or the database itself.
enum Fail {
    Backend(BackendError),
    Db(redb::Error),
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Self {
        Fail::Backend(e)
    }
}

impl From<serde_json::Error> for Fail {
    fn from(e: serde_json::Error) -> Self {
        Fail::Backend(BackendError::Other(format!("corrupt record in the store: {e}")))
    }
}

macro_rules! db_errors {
    ($($error:ty),*) => {
        $(impl From<$error> for Fail {
            fn from(e: $error) -> Self {
                Fail::Db(e.into())
            }
        })*
    };
}
db_errors!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<Fail> for BackendError {
    fn from(fail: Fail) -> Self {
        match fail {
            Fail::Backend(e) => e,
            Fail::Db(e) => BackendError::Other(format!("store: {e}")),
        }
    }
}

/// The names in a table keyed by name, sorted.
fn names(inner: &Inner, definition: TableDefinition<&str, &[u8]>) -> Result<Vec<String>, Fail> {
    let txn = inner.db.begin_read()?;
    let table = txn.open_table(definition)?;
    table.iter()?.map(|row| Ok(row?.0.value().to_owned())).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl Events for EmbeddedStore {
    async fn publish(&self, event: &TransitionEvent) -> BackendResult<()> {
        // An error only means nobody is subscribed.
        let _ = self.inner.events.send(event.clone());
        Ok(())
    }

    /// One node has no lifecycle bus for Choria's tools to read: the agent's log carries these.
    async fn publish_governor(&self, event: &GovernorEvent) -> BackendResult<()> {
        tracing::debug!(governor = %event.governor, seq = event.sequence, component = %event.component, kind = ?event.event_type, "governor event");
        Ok(())
    }

    async fn subscribe(&self) -> BackendResult<BoxStream<'static, TransitionEvent>> {
        let rx = self.inner.events.subscribe();
        Ok(Box::pin(stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "event subscriber fell behind; skipped events")
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })))
    }
}
