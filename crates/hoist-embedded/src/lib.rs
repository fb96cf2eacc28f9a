//! Hoist's single-machine backend: the KV store, governors and event bus of `hoist-core`, kept in
//! one redb file that the agent owns. Other processes reach them through the agent's control API,
//! so watches and governor waits are woken in-process rather than by polling the file.

mod governor;
mod kv;

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream};
use hoist_core::backend::{BackendError, BackendResult, Events, GovernorEvent, KvEntry, TransitionEvent};
use hoist_core::health::Conditions;
use redb::backends::FileBackend;
use redb::{
    Builder, Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable, StorageError, TableDefinition, WriteTransaction,
};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
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
    path: PathBuf,
    db: RwLock<Db>,
    /// Where the store says it is failing (source `store`), for `hoist status` and `/metrics`.
    conditions: Conditions,
    /// Held from a KV write's start until its change is broadcast, so watchers receive changes in
    /// revision order.
    kv_order: Mutex<()>,
    changes: broadcast::Sender<Change>,
    /// Woken whenever a governor slot may have come free.
    slot_freed: Notify,
    events: broadcast::Sender<TransitionEvent>,
}

enum Db {
    Open(Database),
    /// An I/O error (a full disk) poisons a redb database until it is reopened: closed, to be
    /// reopened by the next call, with why it was lost.
    Lost(String),
    /// The file could not be opened (damaged, truncated) or created at start: every call fails with
    /// why, and nothing is ever written over the file.
    Unusable(String),
}

/// A committed KV change, as broadcast to watchers.
#[derive(Clone)]
enum Change {
    Entry(KvEntry),
    BucketDeleted(String),
}

/// What to do about a file redb cannot read, said wherever that is reported.
const DAMAGED_ADVICE: &str = "restore it from a backup, or move it away to start with an empty store, then restart the agent";

impl EmbeddedStore {
    /// Opens the store at `path`, or creates it (and its parent directories) if there is no file.
    pub fn open(path: &Path) -> Result<EmbeddedStore, BackendError> {
        Self::open_reporting(path, Conditions::default())
    }

    /// Like `open`, reporting write failures (a full disk) as the `store` condition until a write
    /// succeeds again.
    pub fn open_reporting(path: &Path, conditions: Conditions) -> Result<EmbeddedStore, BackendError> {
        let db = open_or_create(path)?;
        let store = EmbeddedStore::with(path, Db::Open(db), conditions);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&store.inner)));
        }
        Ok(store)
    }

    /// For the agent: a store that cannot be opened becomes one that answers every KV and governor
    /// call with the reason, reported as the `store` condition, so the agent keeps its containers
    /// running unmanaged by the KV instead of stopping, or starting over on an empty store. Events
    /// are in-process and keep working.
    pub fn open_or_unavailable(path: &Path, conditions: Conditions) -> EmbeddedStore {
        match Self::open_reporting(path, conditions.clone()) {
            Ok(store) => store,
            Err(e) => {
                let reason = match e {
                    BackendError::Unavailable(reason) => reason,
                    other => other.to_string(),
                };
                conditions.set(STORE, Some(reason.clone()));
                EmbeddedStore::with(path, Db::Unusable(reason), conditions)
            }
        }
    }

    fn with(path: &Path, db: Db, conditions: Conditions) -> EmbeddedStore {
        let inner = Inner {
            path: path.to_owned(),
            db: RwLock::new(db),
            conditions,
            kv_order: Mutex::new(()),
            changes: broadcast::channel(CHANNEL_CAPACITY).0,
            slot_freed: Notify::new(),
            events: broadcast::channel(CHANNEL_CAPACITY).0,
        };
        EmbeddedStore { inner: Arc::new(inner) }
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

/// The condition source the store reports under.
const STORE: &str = "store";

/// Opens the file, creating it first if there is none. A new store is built under a temporary
/// name and renamed into place only once it is complete and on disk, so a `hoist.redb` that exists
/// is always one that was fully created: an empty or short one is damage, never a fresh store.
fn open_or_create(path: &Path) -> Result<Database, BackendError> {
    let unavailable = |reason: String| BackendError::Unavailable(format!("cannot open the embedded store {}: {reason}", path.display()));
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| unavailable(e.to_string()))?;
    let creating = creating_path(path);
    // Left by a first start that crashed or ran out of space: it never became the store.
    match std::fs::remove_file(&creating) {
        Ok(()) => tracing::info!(file = %creating.display(), "removed an unfinished store left by an earlier start"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(unavailable(format!("cannot remove the unfinished {}: {e}", creating.display()))),
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Err(e) = create(&creating) {
                let _ = std::fs::remove_file(&creating);
                return Err(unavailable(format!("cannot create it ({e}); fix that (free space on its disk, say) and restart the agent")));
            }
            std::fs::rename(&creating, path).map_err(|e| unavailable(format!("cannot rename {} into place: {e}", creating.display())))?;
            sync_dir(parent).map_err(|e| unavailable(e.to_string()))?;
        }
        Err(e) => return Err(unavailable(e.to_string())),
    }
    let db = open_existing(path)?;
    // Older agents left the file readable by everyone; it holds the fleet's desired versions. Only
    // now that it proved to be a store, so a link to some other file never has its mode changed.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| unavailable(e.to_string()))?;
    Ok(db)
}

fn creating_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".creating");
    path.with_file_name(name)
}

/// A complete new store at `path`: every table created, committed (redb syncs each commit) and closed.
fn create(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
    let db = Builder::new().create_with_backend(FileBackend::new(file)?)?;
    let txn = db.begin_write()?;
    // Read transactions fail on tables that were never created, so create them all up front.
    kv::create_tables(&txn).and_then(|()| governor::create_tables(&txn)).map_err(|e| BackendError::from(e).to_string())?;
    txn.commit()?;
    db.close()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Opens a store that exists. Every page is checked, so damage is an error here rather than a panic
/// (or wrong data) later; any panic redb raises on a damaged file is caught and reported the same way.
fn open_existing(path: &Path) -> Result<Database, BackendError> {
    let opened = std::panic::catch_unwind(|| Builder::new().set_check_integrity_on_open(true).open(path));
    let reason = match opened {
        Ok(Ok(db)) => return Ok(db),
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => {
            return Err(BackendError::Unavailable(format!(
                "the embedded store {} is locked by another process (is another hoist agent running?)",
                path.display()
            )));
        }
        // The OS refusing (permissions, I/O): not damage. redb's own reading errors carry no OS code.
        Ok(Err(DatabaseError::Storage(StorageError::Io(e)))) if e.raw_os_error().is_some() => {
            return Err(BackendError::Unavailable(format!("cannot open the embedded store {}: {e}", path.display())));
        }
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_message(&*panic),
    };
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or_default();
    Err(BackendError::Unavailable(format!(
        "the embedded store {} ({size} bytes) is damaged or truncated ({reason}); hoist will not replace it with an empty one: {DAMAGED_ADVICE}",
        path.display()
    )))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
    format!("redb failed: {}", text.unwrap_or_else(|| "panicked".into()))
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
    /// Runs `work` on the open database, reopening it first if an I/O error closed it. A panic in
    /// redb is caught here and closes the database too, so the next call reopens (and checks) it.
    fn with_db<T>(&self, work: impl FnOnce(&Database) -> Result<T, Fail>) -> Result<T, Fail> {
        if matches!(&*self.db.read().unwrap_or_else(PoisonError::into_inner), Db::Lost(_)) {
            self.reopen();
        }
        let outcome = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            match &*db {
                Db::Open(db) => std::panic::catch_unwind(AssertUnwindSafe(|| work(db))),
                Db::Lost(why) | Db::Unusable(why) => return Err(Fail::Backend(BackendError::Unavailable(why.clone()))),
            }
        };
        outcome.unwrap_or_else(|panic| {
            let why = format!(
                "the embedded store {} failed ({}); it may be damaged: {DAMAGED_ADVICE}",
                self.path.display(),
                panic_message(&*panic)
            );
            self.lose(why.clone());
            Err(Fail::Backend(BackendError::Other(why)))
        })
    }

    fn reopen(&self) {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Another caller may have reopened it while this one waited for the lock.
        if let Db::Lost(why) = &*db {
            match open_existing(&self.path) {
                Ok(reopened) => {
                    tracing::info!(file = %self.path.display(), "reopened the embedded store");
                    *db = Db::Open(reopened);
                }
                Err(e) => {
                    tracing::debug!(error = %e, previously = %why, "the embedded store cannot be reopened yet");
                    *db = Db::Lost(e.to_string());
                }
            }
        }
    }

    /// Closes the database after an error that poisons it; the next call reopens it.
    fn lose(&self, why: String) {
        self.conditions.set(STORE, Some(why.clone()));
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = Db::Lost(why);
    }

    fn begin_read(&self) -> Result<ReadTransaction, Fail> {
        self.with_db(|db| Ok(db.begin_read()?))
    }

    fn write<T>(&self, work: impl FnOnce(&WriteTransaction) -> Result<T, Fail>) -> Result<T, Fail> {
        let result = self.with_db(|db| {
            let txn = db.begin_write()?;
            let out = work(&txn)?;
            txn.commit()?;
            Ok(out)
        });
        match &result {
            Ok(_) => self.conditions.set(STORE, None),
            Err(Fail::Db(e)) if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
                self.lose(format!(
                    "cannot write the embedded store {}: {e}; free space on its disk (or fix the I/O error), hoist retries at the next write",
                    self.path.display()
                ));
            }
            Err(_) => {}
        }
        result
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
    let txn = inner.begin_read()?;
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

    /// Refused at load (`registration.ccm` needs NATS): one node has no bus for ccm to read.
    async fn publish_registration(&self, subject: &str, _entry: &[u8]) -> BackendResult<()> {
        Err(BackendError::Invalid { what: "subject", value: subject.into(), reason: "the embedded store has no message bus".into() })
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
