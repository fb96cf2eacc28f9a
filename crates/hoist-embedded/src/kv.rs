//! The KV store. Every bucket numbers its writes with one revision counter; an entry is stored
//! under (bucket, revision), and a per-key index lists the revisions kept for that key (at most the
//! bucket's history), the last one being the key's current value or tombstone.

use crate::{Change, EmbeddedStore, Fail, Inner, names, now_ms};
use async_trait::async_trait;
use futures_util::stream::{self, BoxStream};
use hoist_core::backend::{
    BackendError, BackendResult, BucketConfig, Kv, KvEntry, KvOperation, key_matches, validate_bucket, validate_key,
};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Weak;
use tokio::sync::broadcast;

/// Bucket name → JSON `BucketMeta`.
const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("kv_buckets");
/// (bucket, revision) → `Stored`.
const ENTRIES: TableDefinition<(&str, u64), Stored> = TableDefinition::new("kv_entries");
/// (bucket, key) → the revisions kept for the key, oldest first.
const LATEST: TableDefinition<(&str, &str), Vec<u64>> = TableDefinition::new("kv_latest");

/// An entry as stored: (key, value, created_ms, deleted).
type Stored = (&'static str, &'static [u8], u64, bool);

#[derive(Serialize, Deserialize)]
struct BucketMeta {
    config: BucketConfig,
    last_revision: u64,
}

pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), Fail> {
    txn.open_table(BUCKETS)?;
    txn.open_table(ENTRIES)?;
    txn.open_table(LATEST)?;
    Ok(())
}

fn load_meta(buckets: &impl ReadableTable<&'static str, &'static [u8]>, bucket: &str) -> Result<BucketMeta, Fail> {
    let raw = buckets.get(bucket)?.ok_or_else(|| BackendError::NoBucket(bucket.into()))?;
    Ok(serde_json::from_slice(raw.value())?)
}

/// The entry at `revision`, unless its bucket's TTL has passed.
fn read_entry(
    entries: &impl ReadableTable<(&'static str, u64), Stored>,
    bucket: &str,
    revision: u64,
    config: &BucketConfig,
    now: u64,
) -> Result<Option<KvEntry>, Fail> {
    Ok(entries.get((bucket, revision))?.and_then(|raw| decode(bucket, revision, raw.value(), config, now)))
}

fn decode(
    bucket: &str,
    revision: u64,
    (key, value, created_ms, deleted): (&str, &[u8], u64, bool),
    config: &BucketConfig,
    now: u64,
) -> Option<KvEntry> {
    fresh(config, created_ms, now).then(|| KvEntry {
        bucket: bucket.into(),
        key: key.into(),
        value: value.to_vec(),
        revision,
        operation: if deleted { KvOperation::Delete } else { KvOperation::Put },
        created_ms,
    })
}

fn fresh(config: &BucketConfig, created_ms: u64, now: u64) -> bool {
    // A zero TTL keeps entries forever, as a zero MaxAge does in JetStream.
    config.ttl.filter(|ttl| !ttl.is_zero()).is_none_or(|ttl| created_ms.saturating_add(ttl.as_millis() as u64) > now)
}

/// Removes entries older than their bucket's TTL. Reads already hide them; this only stops keys that
/// are written once and left to expire from piling up in the file.
pub(crate) fn sweep_expired(inner: &Inner) -> Result<(), Fail> {
    inner.write(|txn| {
        let now = now_ms();
        let mut buckets = Vec::new();
        for row in txn.open_table(BUCKETS)?.iter()? {
            let (name, meta) = row?;
            let meta: BucketMeta = serde_json::from_slice(meta.value())?;
            buckets.push((name.value().to_owned(), meta.config));
        }
        let mut entries = txn.open_table(ENTRIES)?;
        let mut latest = txn.open_table(LATEST)?;
        for (bucket, config) in buckets.iter().filter(|(_, config)| config.ttl.is_some()) {
            let mut expired = Vec::new();
            for row in entries.range((bucket.as_str(), 0)..=(bucket.as_str(), u64::MAX))? {
                let (index, raw) = row?;
                let (key, _, created_ms, _) = raw.value();
                if !fresh(config, created_ms, now) {
                    expired.push((index.value().1, key.to_owned()));
                }
            }
            for (revision, key) in expired {
                entries.remove((bucket.as_str(), revision))?;
                let mut kept = latest.get((bucket.as_str(), key.as_str()))?.map(|g| g.value()).unwrap_or_default();
                kept.retain(|&r| r != revision);
                if kept.is_empty() {
                    latest.remove((bucket.as_str(), key.as_str()))?;
                } else {
                    latest.insert((bucket.as_str(), key.as_str()), kept)?;
                }
            }
        }
        Ok(())
    })
}

/// The current value of every key matching `pattern` (tombstones and expired entries left out), in
/// revision order, and the bucket's last revision.
fn snapshot(inner: &Inner, bucket: &str, pattern: Option<&str>) -> Result<(Vec<KvEntry>, u64), Fail> {
    let txn = inner.begin_read()?;
    let meta = load_meta(&txn.open_table(BUCKETS)?, bucket)?;
    let entries = txn.open_table(ENTRIES)?;
    let now = now_ms();
    let mut current = Vec::new();
    for row in txn.open_table(LATEST)?.range((bucket, "")..)? {
        let (index, revisions) = row?;
        let (row_bucket, key) = index.value();
        if row_bucket != bucket {
            break;
        }
        if pattern.is_some_and(|p| !key_matches(p, key)) {
            continue;
        }
        let Some(&revision) = revisions.value().last() else { continue };
        current.extend(read_entry(&entries, bucket, revision, &meta.config, now)?.filter(|e| e.operation == KvOperation::Put));
    }
    current.sort_by_key(|e| e.revision);
    Ok((current, meta.last_revision))
}

/// Writes a value or tombstone for `key` and trims the key's history. With `expect`, only if the
/// key's live revision (None: no value) is the one expected, checked in the same transaction.
fn write_entry(
    inner: &Inner,
    bucket: &str,
    key: &str,
    value: &[u8],
    operation: KvOperation,
    expect: Option<Option<u64>>,
) -> Result<u64, Fail> {
    inner.kv_write(|txn| {
        let mut buckets = txn.open_table(BUCKETS)?;
        let mut meta = load_meta(&buckets, bucket)?;
        if let Some(expected) = expect {
            let latest = txn.open_table(LATEST)?.get((bucket, key))?.and_then(|g| g.value().last().copied());
            let live = match latest {
                Some(revision) => read_entry(&txn.open_table(ENTRIES)?, bucket, revision, &meta.config, now_ms())?
                    .filter(|e| e.operation == KvOperation::Put)
                    .map(|e| e.revision),
                None => None,
            };
            if live != expected {
                return Err(BackendError::Conflict { bucket: bucket.into(), key: key.into() }.into());
            }
        }
        meta.last_revision += 1;
        let revision = meta.last_revision;
        let created_ms = now_ms();
        let deleted = operation == KvOperation::Delete;

        let mut entries = txn.open_table(ENTRIES)?;
        entries.insert((bucket, revision), (key, value, created_ms, deleted))?;
        let mut latest = txn.open_table(LATEST)?;
        let mut kept = latest.get((bucket, key))?.map(|g| g.value()).unwrap_or_default();
        kept.push(revision);
        let excess = kept.len().saturating_sub(usize::from(meta.config.history.max(1)));
        for old in kept.drain(..excess) {
            entries.remove((bucket, old))?;
        }
        latest.insert((bucket, key), kept)?;
        buckets.insert(bucket, serde_json::to_vec(&meta)?.as_slice())?;

        let entry = KvEntry { bucket: bucket.into(), key: key.into(), value: value.to_vec(), revision, operation, created_ms };
        Ok((revision, Change::Entry(entry)))
    })
}

#[async_trait]
impl Kv for EmbeddedStore {
    async fn create_bucket(&self, bucket: &str, config: BucketConfig) -> BackendResult<()> {
        validate_bucket(bucket)?;
        if !(1..=64).contains(&config.history) {
            return Err(BackendError::Invalid {
                what: "history",
                value: config.history.to_string(),
                reason: "keep 1 to 64 values per key".into(),
            });
        }
        let bucket = bucket.to_owned();
        self.run(move |inner| {
            inner.write(|txn| {
                let mut buckets = txn.open_table(BUCKETS)?;
                let last_revision = match load_meta(&buckets, &bucket) {
                    Ok(meta) => meta.last_revision,
                    Err(Fail::Backend(BackendError::NoBucket(_))) => 0,
                    Err(e) => return Err(e),
                };
                buckets.insert(bucket.as_str(), serde_json::to_vec(&BucketMeta { config, last_revision })?.as_slice())?;
                Ok(())
            })
        })
        .await
    }

    async fn bucket_config(&self, bucket: &str) -> BackendResult<BucketConfig> {
        validate_bucket(bucket)?;
        let bucket = bucket.to_owned();
        self.run(move |inner| Ok(load_meta(&inner.begin_read()?.open_table(BUCKETS)?, &bucket)?.config)).await
    }

    async fn delete_bucket(&self, bucket: &str) -> BackendResult<()> {
        validate_bucket(bucket)?;
        let bucket = bucket.to_owned();
        self.run(move |inner| {
            inner.kv_write(|txn| {
                if txn.open_table(BUCKETS)?.remove(bucket.as_str())?.is_none() {
                    return Err(BackendError::NoBucket(bucket.clone()).into());
                }
                txn.open_table(ENTRIES)?.retain_in((bucket.as_str(), 0)..=(bucket.as_str(), u64::MAX), |_, _| false)?;
                txn.open_table(LATEST)?.retain_in((bucket.as_str(), "").., |(b, _), _| b != bucket)?;
                Ok(((), Change::BucketDeleted(bucket.clone())))
            })
        })
        .await
    }

    async fn list_buckets(&self) -> BackendResult<Vec<String>> {
        self.run(|inner| names(inner, BUCKETS)).await
    }

    async fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<KvEntry>> {
        validate_bucket(bucket)?;
        validate_key(key, false)?;
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        self.run(move |inner| {
            let txn = inner.begin_read()?;
            let meta = load_meta(&txn.open_table(BUCKETS)?, &bucket)?;
            let Some(kept) = txn.open_table(LATEST)?.get((bucket.as_str(), key.as_str()))?.map(|g| g.value()) else {
                return Ok(None);
            };
            let Some(&revision) = kept.last() else { return Ok(None) };
            let entry = read_entry(&txn.open_table(ENTRIES)?, &bucket, revision, &meta.config, now_ms())?;
            Ok(entry.filter(|e| e.operation == KvOperation::Put))
        })
        .await
    }

    async fn put(&self, bucket: &str, key: &str, value: &[u8]) -> BackendResult<u64> {
        validate_bucket(bucket)?;
        validate_key(key, false)?;
        let (bucket, key, value) = (bucket.to_owned(), key.to_owned(), value.to_vec());
        self.run(move |inner| write_entry(inner, &bucket, &key, &value, KvOperation::Put, None)).await
    }

    async fn update(&self, bucket: &str, key: &str, value: &[u8], last: Option<u64>) -> BackendResult<u64> {
        validate_bucket(bucket)?;
        validate_key(key, false)?;
        let (bucket, key, value) = (bucket.to_owned(), key.to_owned(), value.to_vec());
        self.run(move |inner| write_entry(inner, &bucket, &key, &value, KvOperation::Put, Some(last))).await
    }

    async fn delete(&self, bucket: &str, key: &str) -> BackendResult<()> {
        validate_bucket(bucket)?;
        validate_key(key, false)?;
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        self.run(move |inner| write_entry(inner, &bucket, &key, &[], KvOperation::Delete, None).map(drop)).await
    }

    async fn keys(&self, bucket: &str) -> BackendResult<Vec<String>> {
        validate_bucket(bucket)?;
        let bucket = bucket.to_owned();
        let (current, _) = self.run(move |inner| snapshot(inner, &bucket, None)).await?;
        let mut keys: Vec<String> = current.into_iter().map(|e| e.key).collect();
        keys.sort();
        Ok(keys)
    }

    async fn watch(&self, bucket: &str, pattern: &str) -> BackendResult<BoxStream<'static, KvEntry>> {
        validate_bucket(bucket)?;
        validate_key(pattern, true)?;
        // Subscribe before the snapshot so no change committed after it is missed; changes the
        // snapshot already holds are dropped by revision.
        let changes = self.inner.changes.subscribe();
        let (bucket, pattern) = (bucket.to_owned(), pattern.to_owned());
        let (current, last_revision) = {
            let (bucket, pattern) = (bucket.clone(), pattern.clone());
            self.run(move |inner| snapshot(inner, &bucket, Some(&pattern))).await?
        };
        let watch =
            Watch { store: std::sync::Arc::downgrade(&self.inner), bucket, pattern, changes, pending: current.into(), last_revision };
        Ok(Box::pin(stream::unfold(watch, |mut watch| async move {
            let entry = watch.next().await?;
            Some((entry, watch))
        })))
    }
}

struct Watch {
    /// Weak so a forgotten watch does not keep the file open.
    store: Weak<Inner>,
    bucket: String,
    pattern: String,
    changes: broadcast::Receiver<Change>,
    pending: VecDeque<KvEntry>,
    /// The bucket's revision this watch has caught up to.
    last_revision: u64,
}

impl Watch {
    /// The next matching entry, or None once the bucket or the store is gone.
    async fn next(&mut self) -> Option<KvEntry> {
        loop {
            if let Some(entry) = self.pending.pop_front() {
                return Some(entry);
            }
            match self.changes.recv().await {
                Ok(Change::Entry(entry)) if entry.bucket == self.bucket && entry.revision > self.last_revision => {
                    self.last_revision = entry.revision;
                    if key_matches(&self.pattern, &entry.key) {
                        return Some(entry);
                    }
                }
                Ok(Change::BucketDeleted(bucket)) if bucket == self.bucket => return None,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(bucket = %self.bucket, missed, "KV watch fell behind; reading the gap from the store");
                    self.catch_up().await?;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Queues every matching change after `last_revision` from storage. History trimming may have
    /// dropped some older values of a key; its latest value is always still there.
    async fn catch_up(&mut self) -> Option<()> {
        let inner = self.store.upgrade()?;
        let (bucket, after) = (self.bucket.clone(), self.last_revision);
        let read = tokio::task::spawn_blocking(move || -> Result<(Vec<KvEntry>, u64), Fail> {
            let txn = inner.begin_read()?;
            let meta = load_meta(&txn.open_table(BUCKETS)?, &bucket)?;
            let now = now_ms();
            let mut gap = Vec::new();
            for row in txn.open_table(ENTRIES)?.range((bucket.as_str(), after + 1)..=(bucket.as_str(), u64::MAX))? {
                let (index, raw) = row?;
                gap.extend(decode(&bucket, index.value().1, raw.value(), &meta.config, now));
            }
            Ok((gap, meta.last_revision))
        });
        match read.await {
            Ok(Ok((gap, last_revision))) => {
                self.last_revision = last_revision;
                self.pending.extend(gap.into_iter().filter(|e| key_matches(&self.pattern, &e.key)));
                Some(())
            }
            Ok(Err(Fail::Backend(BackendError::NoBucket(_)))) => None,
            Ok(Err(fail)) => {
                tracing::warn!(bucket = %self.bucket, error = %BackendError::from(fail), "KV watch could not read its gap; ending it");
                None
            }
            Err(e) => {
                tracing::warn!(bucket = %self.bucket, error = %e, "KV watch could not read its gap; ending it");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sweeping_removes_expired_entries_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hoist.redb")).unwrap();
        let short = BucketConfig { ttl: Some(Duration::from_millis(200)), ..BucketConfig::default() };
        store.create_bucket("SHORT", short).await.unwrap();
        store.create_bucket("LONG", BucketConfig::default()).await.unwrap();
        for bucket in ["SHORT", "LONG"] {
            store.put(bucket, "a", b"1").await.unwrap();
            store.put(bucket, "a", b"2").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.put("SHORT", "b", b"fresh").await.unwrap();

        sweep_expired(&store.inner).map_err(BackendError::from).unwrap();
        let txn = store.inner.begin_read().map_err(BackendError::from).unwrap();
        let count = |table, bucket: &str| -> usize {
            let entries = txn.open_table(table).unwrap();
            entries.range((bucket, 0)..=(bucket, u64::MAX)).unwrap().count()
        };
        assert_eq!((count(ENTRIES, "SHORT"), count(ENTRIES, "LONG")), (1, 2));
        let latest = txn.open_table(LATEST).unwrap();
        assert!(latest.get(("SHORT", "a")).unwrap().is_none());
        assert_eq!(latest.get(("SHORT", "b")).unwrap().map(|g| g.value()), Some(vec![3]));
        drop(txn);
        assert_eq!(store.keys("SHORT").await.unwrap(), ["b"]);
    }
}
