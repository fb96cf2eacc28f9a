//! What the simulated nodes share: one KV and governor store with Choria's semantics (revisions,
//! watches; capacity, expiry, the oldest evicted when capacity is lowered), the reachability of each
//! node (a partition cuts one node off), and the trace of everything that happened, by virtual time.
//! Each agent run sees the store through a `NodeView` (`view.rs`).

use hoist_core::backend::{BackendError, BackendResult, BucketConfig, GovernorInfo, KvEntry, KvOperation, Lease, LeaseInfo, key_matches};
use hoist_core::clock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

#[derive(Default)]
pub struct World {
    inner: Mutex<Inner>,
    /// Woken whenever a governor slot may have come free.
    pub slot_freed: Notify,
}

#[derive(Default)]
struct Inner {
    buckets: BTreeMap<String, Bucket>,
    governors: BTreeMap<String, GovernorState>,
    /// How many faults cut each node off right now (a node's own and a fleet-wide outage overlap).
    cut_off: BTreeMap<String, u32>,
    trace: Vec<String>,
    violations: Vec<String>,
    /// Nodes that started a container of a broken version.
    tried_broken: BTreeSet<String>,
    /// Nodes that pulled a broken version (to try it, or ahead of a wave).
    fetched_broken: BTreeSet<String>,
    /// Pulls of a new version under way now, and the most there were at once.
    pulls: (u32, u32),
    /// The shared dependency every container's `dependency_check` asks is away.
    dependency_away: bool,
    /// When the fleet's degraded record turned active (true) or inactive, as observed.
    degraded: Vec<(Duration, bool)>,
    revision: u64,
}

struct Bucket {
    config: BucketConfig,
    entries: BTreeMap<String, KvEntry>,
    watchers: Vec<(String, mpsc::UnboundedSender<KvEntry>)>,
}

pub struct GovernorState {
    pub capacity: u64,
    pub expire: Duration,
    next_seq: u64,
    pub leases: Vec<LeaseInfo>,
}

impl GovernorState {
    fn live(&self, lease: &LeaseInfo, now_ms: u64) -> bool {
        self.expire.is_zero() || lease.taken_ms + self.expire.as_millis() as u64 > now_ms
    }

    fn drop_expired(&mut self, now_ms: u64) {
        let expire = self.expire;
        self.leases.retain(|l| expire.is_zero() || l.taken_ms + expire.as_millis() as u64 > now_ms);
    }
}

pub enum Attempt {
    Taken(Lease),
    Full,
}

impl World {
    pub fn new() -> Arc<World> {
        Arc::new(World::default())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("not poisoned"))
    }

    /// Appends a line to the trace, stamped with the virtual time.
    pub fn note(&self, line: impl AsRef<str>) {
        let line = format!("{:>9.3}s {}", crate::elapsed().as_secs_f64(), line.as_ref());
        self.with(|w| w.trace.push(line));
    }

    /// Records a broken invariant (in the trace too, where it happened).
    pub fn violation(&self, what: String) {
        self.note(format!("VIOLATION: {what}"));
        self.with(|w| w.violations.push(what));
    }

    pub fn tried_broken(&self, node: &str) {
        self.with(|w| w.tried_broken.insert(node.to_string()));
    }

    pub fn nodes_that_tried_broken(&self) -> BTreeSet<String> {
        self.with(|w| w.tried_broken.clone())
    }

    /// A pull of a new version begins (true) or ends.
    pub fn pulling(&self, begins: bool) {
        self.with(|w| {
            w.pulls.0 = if begins { w.pulls.0 + 1 } else { w.pulls.0.saturating_sub(1) };
            w.pulls.1 = w.pulls.1.max(w.pulls.0);
        });
    }

    pub fn most_pulls_at_once(&self) -> u32 {
        self.with(|w| w.pulls.1)
    }

    pub fn fetched_broken(&self, node: &str) {
        self.with(|w| w.fetched_broken.insert(node.to_string()));
    }

    pub fn nodes_that_fetched_broken(&self) -> BTreeSet<String> {
        self.with(|w| w.fetched_broken.clone())
    }

    pub fn set_dependency_away(&self, away: bool) {
        self.note(if away { "the shared dependency goes away" } else { "the shared dependency is back" });
        self.with(|w| w.dependency_away = away);
    }

    pub fn dependency_away(&self) -> bool {
        self.with(|w| w.dependency_away)
    }

    /// The fleet's degraded record as looked at now: noted when it changed.
    pub fn saw_degraded(&self, active: bool) {
        let changed = self.with(|w| w.degraded.last().map(|(_, a)| *a).unwrap_or(false) != active);
        if changed {
            self.note(format!("the fleet's degraded record is {}", if active { "active" } else { "cleared" }));
            self.with(|w| w.degraded.push((crate::elapsed(), active)));
        }
    }

    pub fn degraded_changes(&self) -> Vec<(Duration, bool)> {
        self.with(|w| w.degraded.clone())
    }

    pub fn violations(&self) -> Vec<String> {
        self.with(|w| w.violations.clone())
    }

    pub fn trace(&self) -> Vec<String> {
        self.with(|w| w.trace.clone())
    }

    pub fn set_cut_off(&self, node: &str, cut: bool) {
        self.with(|w| {
            let count = w.cut_off.entry(node.to_string()).or_default();
            *count = if cut { *count + 1 } else { count.saturating_sub(1) };
        });
    }

    pub fn reachable(&self, node: &str) -> bool {
        self.with(|w| w.cut_off.get(node).is_none_or(|&n| n == 0))
    }

    // ---- KV ------------------------------------------------------------------------------------

    pub fn create_bucket(&self, bucket: &str, config: BucketConfig) {
        self.with(|w| match w.buckets.get_mut(bucket) {
            Some(b) => b.config = config,
            None => {
                w.buckets.insert(bucket.to_string(), Bucket { config, entries: BTreeMap::new(), watchers: Vec::new() });
            }
        });
    }

    pub fn bucket_config(&self, bucket: &str) -> BackendResult<BucketConfig> {
        self.with(|w| w.buckets.get(bucket).map(|b| b.config.clone()).ok_or_else(|| BackendError::NoBucket(bucket.into())))
    }

    pub fn delete_bucket(&self, bucket: &str) -> BackendResult<()> {
        self.with(|w| w.buckets.remove(bucket).map(|_| ()).ok_or_else(|| BackendError::NoBucket(bucket.into())))
    }

    pub fn list_buckets(&self) -> Vec<String> {
        self.with(|w| w.buckets.keys().cloned().collect())
    }

    pub fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<KvEntry>> {
        self.with(|w| {
            let b = w.buckets.get(bucket).ok_or_else(|| BackendError::NoBucket(bucket.into()))?;
            Ok(b.entries.get(key).filter(|e| e.operation == KvOperation::Put).cloned())
        })
    }

    pub fn write(&self, bucket: &str, key: &str, value: &[u8], operation: KvOperation) -> BackendResult<u64> {
        self.write_if(bucket, key, value, operation, None)
    }

    /// `write`, with `expect` only if the key's live revision (None: no value) is the one expected.
    pub fn write_if(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        operation: KvOperation,
        expect: Option<Option<u64>>,
    ) -> BackendResult<u64> {
        self.with(|w| {
            let b = w.buckets.get_mut(bucket).ok_or_else(|| BackendError::NoBucket(bucket.into()))?;
            let live = b.entries.get(key).filter(|e| e.operation == KvOperation::Put).map(|e| e.revision);
            if expect.is_some_and(|expected| expected != live) {
                return Err(BackendError::Conflict { bucket: bucket.into(), key: key.into() });
            }
            w.revision += 1;
            let revision = w.revision;
            let b = w.buckets.get_mut(bucket).expect("looked up above");
            let entry = KvEntry {
                bucket: bucket.into(),
                key: key.into(),
                value: value.to_vec(),
                revision,
                operation,
                created_ms: clock::unix_now_ms(),
            };
            b.watchers.retain(|(pattern, tx)| !key_matches(pattern, key) || tx.send(entry.clone()).is_ok());
            b.entries.insert(key.to_string(), entry);
            Ok(revision)
        })
    }

    pub fn keys(&self, bucket: &str) -> BackendResult<Vec<String>> {
        self.with(|w| {
            let b = w.buckets.get(bucket).ok_or_else(|| BackendError::NoBucket(bucket.into()))?;
            Ok(b.entries.values().filter(|e| e.operation == KvOperation::Put).map(|e| e.key.clone()).collect())
        })
    }

    /// The current values of the matching keys, and a channel of every later change.
    pub fn watch(&self, bucket: &str, pattern: &str) -> BackendResult<(Vec<KvEntry>, mpsc::UnboundedReceiver<KvEntry>)> {
        self.with(|w| {
            let b = w.buckets.get_mut(bucket).ok_or_else(|| BackendError::NoBucket(bucket.into()))?;
            let current = b.entries.values().filter(|e| e.operation == KvOperation::Put && key_matches(pattern, &e.key)).cloned().collect();
            let (tx, rx) = mpsc::unbounded_channel();
            b.watchers.push((pattern.to_string(), tx));
            Ok((current, rx))
        })
    }

    // ---- governor ------------------------------------------------------------------------------

    /// Creates the governor or changes it; lowering the capacity evicts the oldest leases.
    pub fn add_governor(&self, name: &str, capacity: u64, expire: Duration) -> Vec<LeaseInfo> {
        let evicted = self.with(|w| {
            let g = w.governors.entry(name.to_string()).or_insert(GovernorState { capacity, expire, next_seq: 1, leases: Vec::new() });
            g.capacity = capacity;
            g.expire = expire;
            g.drop_expired(clock::unix_now_ms());
            let excess = g.leases.len().saturating_sub(capacity as usize);
            g.leases.drain(..excess).collect()
        });
        self.slot_freed.notify_waiters();
        evicted
    }

    pub fn try_acquire(&self, name: &str, holder: &str) -> BackendResult<Attempt> {
        self.with(|w| {
            let g = w.governors.get_mut(name).ok_or_else(|| BackendError::NoGovernor(name.into()))?;
            let now = clock::unix_now_ms();
            g.drop_expired(now);
            if (g.leases.len() as u64) < g.capacity {
                let seq = g.next_seq;
                g.next_seq += 1;
                g.leases.push(LeaseInfo { seq, holder: holder.into(), taken_ms: now });
                Ok(Attempt::Taken(Lease { governor: name.into(), seq }))
            } else {
                Ok(Attempt::Full)
            }
        })
    }

    pub fn release(&self, lease: &Lease) -> BackendResult<()> {
        let released = self.with(|w| {
            let g = w.governors.get_mut(&lease.governor)?;
            let now = clock::unix_now_ms();
            let at = g.leases.iter().position(|l| l.seq == lease.seq && g.live(l, now))?;
            Some(g.leases.remove(at))
        });
        self.slot_freed.notify_waiters();
        released.map(|_| ()).ok_or_else(|| BackendError::NoLease { governor: lease.governor.clone(), seq: lease.seq })
    }

    pub fn holds(&self, lease: &Lease) -> bool {
        self.with(|w| {
            let now = clock::unix_now_ms();
            w.governors.get(&lease.governor).is_some_and(|g| g.leases.iter().any(|l| l.seq == lease.seq && g.live(l, now)))
        })
    }

    pub fn view_governor(&self, name: &str) -> BackendResult<GovernorInfo> {
        self.with(|w| {
            let g = w.governors.get_mut(name).ok_or_else(|| BackendError::NoGovernor(name.into()))?;
            g.drop_expired(clock::unix_now_ms());
            Ok(GovernorInfo { name: name.into(), capacity: g.capacity, expire: g.expire, replicas: 1, leases: g.leases.clone() })
        })
    }

    pub fn evict(&self, name: &str, seq: u64) -> BackendResult<LeaseInfo> {
        let evicted = self.with(|w| {
            let g = w.governors.get_mut(name).ok_or_else(|| BackendError::NoGovernor(name.into()))?;
            let at = g.leases.iter().position(|l| l.seq == seq).ok_or_else(|| BackendError::NoLease { governor: name.into(), seq })?;
            Ok(g.leases.remove(at))
        });
        self.slot_freed.notify_waiters();
        evicted
    }

    pub fn reset_governor(&self, name: &str) -> BackendResult<()> {
        self.with(|w| w.governors.get_mut(name).map(|g| g.leases.clear()).ok_or_else(|| BackendError::NoGovernor(name.into())))?;
        self.slot_freed.notify_waiters();
        Ok(())
    }

    pub fn remove_governor(&self, name: &str) -> BackendResult<()> {
        self.with(|w| w.governors.remove(name).map(|_| ()).ok_or_else(|| BackendError::NoGovernor(name.into())))
    }

    pub fn governors(&self) -> Vec<String> {
        self.with(|w| w.governors.keys().cloned().collect())
    }
}
