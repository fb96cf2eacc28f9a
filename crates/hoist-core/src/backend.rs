//! The coordination backends: a key-value store with watches, a governor (a counting semaphore with
//! expiring leases) and an event bus. `hoist-embedded` implements them on one machine; `hoist-nats`
//! on NATS JetStream, laid out as Choria lays them out. Both pass the suite in `conformance`.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The bucket the agents watch for desired tags.
pub const HOIST_BUCKET: &str = "HOIST";

/// The key that carries a container's desired tag in `HOIST`.
pub fn tag_key(container: &str) -> String {
    format!("container/{container}/tag")
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no bucket named {0}")]
    NoBucket(String),
    #[error("no governor named {0} (create it with `hoist governor add {0} CAPACITY EXPIRE`)")]
    NoGovernor(String),
    #[error("no lease {seq} in governor {governor}")]
    NoLease { governor: String, seq: u64 },
    #[error("timed out after {0:?} waiting for a slot in governor {1}")]
    GovernorTimeout(Duration, String),
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: String },
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-set write (`Kv::update`) found the key changed since it was read.
    #[error("{bucket}/{key} was changed by another writer since it was read")]
    Conflict { bucket: String, key: String },
    #[error("{0}")]
    Other(String),
}

pub type BackendResult<T> = Result<T, BackendError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Values kept per key (1..=64).
    pub history: u8,
    /// Entries older than this vanish; None keeps them forever.
    #[serde(with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Copies kept in a cluster; the embedded backend has one and ignores it.
    pub replicas: u8,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig { history: 5, ttl: None, replicas: 1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvOperation {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub bucket: String,
    pub key: String,
    pub value: Vec<u8>,
    /// Bucket-wide, strictly increasing.
    pub revision: u64,
    pub operation: KvOperation,
    /// Unix milliseconds when written.
    pub created_ms: u64,
}

impl KvEntry {
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// Bucket name rules shared by both backends (Choria/nats.go: `^[a-zA-Z0-9_-]+$`).
pub fn validate_bucket(bucket: &str) -> BackendResult<()> {
    let ok = !bucket.is_empty() && bucket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(()).ok_or_else(|| BackendError::Invalid {
        what: "bucket",
        value: bucket.into(),
        reason: "use only letters, digits, _ and -".into(),
    })
}

/// Key rules shared by both backends (nats.go: `^[-/_=\.a-zA-Z0-9]+$`, not starting or ending with `.`).
/// A watch pattern may also use NATS wildcards: `*` for one token, `>` for the rest.
pub fn validate_key(key: &str, allow_wildcards: bool) -> BackendResult<()> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.') || (allow_wildcards && matches!(b, b'*' | b'>'))
        });
    ok.then_some(()).ok_or_else(|| BackendError::Invalid {
        what: "key",
        value: key.into(),
        reason: "use only letters, digits and - / _ = . (not first or last)".into(),
    })
}

/// Whether `key` matches a NATS-style pattern where tokens are separated by `.`.
pub fn key_matches(pattern: &str, key: &str) -> bool {
    let mut keys = key.split('.');
    for token in pattern.split('.') {
        match token {
            ">" => return keys.next().is_some(),
            "*" => {
                if keys.next().is_none() {
                    return false;
                }
            }
            literal => {
                if keys.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    keys.next().is_none()
}

#[async_trait]
pub trait Kv: Send + Sync + 'static {
    /// Creates the bucket, or updates its settings if it exists.
    async fn create_bucket(&self, bucket: &str, config: BucketConfig) -> BackendResult<()>;
    async fn bucket_config(&self, bucket: &str) -> BackendResult<BucketConfig>;
    async fn delete_bucket(&self, bucket: &str) -> BackendResult<()>;
    async fn list_buckets(&self) -> BackendResult<Vec<String>>;
    /// The latest value; None if never written or deleted.
    async fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<KvEntry>>;
    /// Returns the new revision.
    async fn put(&self, bucket: &str, key: &str, value: &[u8]) -> BackendResult<u64>;
    /// Compare-and-set: writes `value` only if the key's latest revision is still `last` (as `get`
    /// returned it), or, with None, only if the key holds no value (never written, deleted, expired).
    /// Otherwise `BackendError::Conflict`, and nothing is written. Returns the new revision.
    async fn update(&self, bucket: &str, key: &str, value: &[u8], last: Option<u64>) -> BackendResult<u64>;
    async fn delete(&self, bucket: &str, key: &str) -> BackendResult<()>;
    /// Keys that currently hold a value, sorted.
    async fn keys(&self, bucket: &str) -> BackendResult<Vec<String>>;
    /// First the current value of every matching key (deleted ones are skipped), then every change as
    /// it happens. The stream survives reconnects on its own; it ends only if the bucket is deleted.
    async fn watch(&self, bucket: &str, pattern: &str) -> BackendResult<BoxStream<'static, KvEntry>>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub governor: String,
    /// The slot's id (the stream sequence in Choria's layout).
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub seq: u64,
    /// Who holds it, e.g. `hoist web @ node1`.
    pub holder: String,
    /// Unix milliseconds when taken.
    pub taken_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernorInfo {
    pub name: String,
    pub capacity: u64,
    #[serde(with = "humantime_serde")]
    pub expire: Duration,
    pub replicas: u8,
    pub leases: Vec<LeaseInfo>,
}

#[async_trait]
pub trait Governor: Send + Sync + 'static {
    /// Creates the governor or changes its capacity/expiry live. Lowering the capacity below the
    /// number of held leases evicts the oldest ones (Choria relies on nats-server for this; 2.15 no
    /// longer does it for discard-new streams, so backends enforce it themselves).
    async fn add(&self, name: &str, capacity: u64, expire: Duration, replicas: u8) -> BackendResult<()>;
    /// Waits for a free slot up to `timeout`, retrying only while the governor is full.
    async fn acquire(&self, name: &str, holder: &str, timeout: Duration) -> BackendResult<Lease>;
    /// Frees the slot; a lease that already expired or was evicted is `NoLease`.
    async fn release(&self, lease: &Lease) -> BackendResult<()>;
    /// Whether the lease still holds its slot (it may have expired or been evicted).
    async fn holds(&self, lease: &Lease) -> BackendResult<bool>;
    async fn view(&self, name: &str) -> BackendResult<GovernorInfo>;
    async fn evict(&self, name: &str, seq: u64) -> BackendResult<LeaseInfo>;
    /// Frees every slot.
    async fn reset(&self, name: &str) -> BackendResult<()>;
    async fn remove(&self, name: &str) -> BackendResult<()>;
    async fn list(&self) -> BackendResult<Vec<String>>;
}

/// A machine's state change, in the shape of Choria's `io.choria.machine.v1.transition` data, with
/// hoist's extra context in `detail`. Choria consumers ignore the extra fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionEvent {
    pub protocol: String,
    /// The node.
    pub identity: String,
    /// The machine's instance id (new each time the agent loads it).
    pub id: String,
    pub version: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// `hoist_<name>`.
    pub machine: String,
    pub transition: String,
    pub from_state: String,
    pub to_state: String,
    /// Why it happened, e.g. "container died (exit 137)" or "KV tag v2".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The image the container runs (or is moving to) after the transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

pub const TRANSITION_PROTOCOL: &str = "io.choria.machine.v1.transition";

/// The machine version reported in events and status, as the original module's machines had.
pub const MACHINE_VERSION: &str = "1.0.0";

impl TransitionEvent {
    /// An event of `identity`'s `machine` (instance `id`) now, in Choria's transition shape, with
    /// no `detail` or `image` yet.
    pub fn now(identity: &str, id: &str, machine: &str, transition: &str, from_state: &str, to_state: &str) -> TransitionEvent {
        TransitionEvent {
            protocol: TRANSITION_PROTOCOL.into(),
            identity: identity.into(),
            id: id.into(),
            version: MACHINE_VERSION.into(),
            timestamp: crate::clock::unix_now(),
            machine: machine.into(),
            transition: transition.into(),
            from_state: from_state.into(),
            to_state: to_state.into(),
            detail: None,
            image: None,
        }
    }
}

/// What happened to a governor slot, in Choria's words (`timeouts` is its spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GovernorEventType {
    Enter,
    Exit,
    Timeouts,
    Eviction,
}

/// A governor lifecycle event, as Choria's autonomous agents and `choria governor evict` publish them
/// (`io.choria.lifecycle.v1.governor`), so `choria tool event` shows hoist's slots too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernorEvent {
    /// The node; for an eviction, the evicted lease's name.
    pub identity: String,
    /// The machine (`hoist_web`), or `CLI` for an operator's eviction.
    pub component: String,
    pub governor: String,
    /// The lease id; 0 when no slot was had (`timeouts`).
    pub sequence: u64,
    pub event_type: GovernorEventType,
}

pub const GOVERNOR_EVENT_PROTOCOL: &str = "io.choria.lifecycle.v1.governor";

/// Every current entry of `bucket`, in key order, read with up to 64 gets in flight: one at a time, a
/// fleet's thousand presence or service keys would take a thousand round trips.
pub async fn read_all(kv: &dyn Kv, bucket: &str) -> BackendResult<Vec<KvEntry>> {
    use futures_util::StreamExt;
    let keys = kv.keys(bucket).await?;
    let entries: Vec<BackendResult<Option<KvEntry>>> =
        futures_util::stream::iter(keys).map(|key| async move { kv.get(bucket, &key).await }).buffered(64).collect().await;
    // A key deleted between the listing and its read is simply gone.
    Ok(entries.into_iter().collect::<BackendResult<Vec<_>>>()?.into_iter().flatten().collect())
}

/// `read_all`, with a bucket nobody has created yet read as empty (the agents create theirs when
/// the backend first answers).
pub async fn read_all_if_any(kv: &dyn Kv, bucket: &str) -> BackendResult<Vec<KvEntry>> {
    match read_all(kv, bucket).await {
        Err(BackendError::NoBucket(_)) => Ok(Vec::new()),
        other => other,
    }
}

#[async_trait]
pub trait Events: Send + Sync + 'static {
    async fn publish(&self, event: &TransitionEvent) -> BackendResult<()>;
    async fn publish_governor(&self, event: &GovernorEvent) -> BackendResult<()>;
    /// A service registration on choria-io/ccm's subject (`registration::ServiceEntry::ccm_subject`).
    async fn publish_registration(&self, subject: &str, entry: &[u8]) -> BackendResult<()>;
    /// Events published from now on (by any node, for a fleet backend).
    async fn subscribe(&self) -> BackendResult<BoxStream<'static, TransitionEvent>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn governor_event_types_are_spelled_as_choria_spells_them() {
        let spelled: Vec<String> =
            [GovernorEventType::Enter, GovernorEventType::Exit, GovernorEventType::Timeouts, GovernorEventType::Eviction]
                .iter()
                .map(|t| serde_json::to_string(t).unwrap())
                .collect();
        assert_eq!(spelled, [r#""enter""#, r#""exit""#, r#""timeouts""#, r#""eviction""#]);
    }

    #[test]
    fn key_rules_and_patterns() {
        assert!(validate_key("container/weather/tag", false).is_ok());
        assert!(validate_key(".x", false).is_err());
        assert!(validate_key("a b", false).is_err());
        assert!(validate_key("lon.>", false).is_err());
        assert!(validate_key("lon.>", true).is_ok());
        assert!(key_matches(">", "container/web/tag"));
        assert!(key_matches("lon.*.web.*", "lon.http.web.abc"));
        assert!(!key_matches("lon.*", "lon.http.web"));
        assert!(key_matches("container/web/tag", "container/web/tag"));
        assert!(!key_matches("container/web/tag", "container/web/tag2"));
    }
}
