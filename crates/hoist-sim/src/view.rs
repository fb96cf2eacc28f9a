//! One agent run's view of the shared store: calls fail as unavailable while its node is cut off,
//! and never return once the run has crashed (a dead process does nothing more), so leases it held
//! are freed only by their expiry, as on a real fleet.

use crate::world::{Attempt, World};
use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use hoist_core::backend::{
    BackendError, BackendResult, BucketConfig, Events, Governor, GovernorEvent, GovernorInfo, Kv, KvEntry, KvOperation, Lease, LeaseInfo,
    TransitionEvent,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a waiting call looks again at a governor or at its node's reachability.
const POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct NodeView {
    pub world: Arc<World>,
    pub node: String,
    /// False once this agent run has crashed.
    pub alive: Arc<AtomicBool>,
}

impl NodeView {
    /// Ok while the node reaches the store; pends for ever after a crash.
    async fn reach(&self) -> BackendResult<()> {
        if !self.alive.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.world.reachable(&self.node) {
            Ok(())
        } else {
            Err(BackendError::Unavailable(format!("{} is cut off (simulated)", self.node)))
        }
    }
}

#[async_trait]
impl Kv for NodeView {
    async fn create_bucket(&self, bucket: &str, config: BucketConfig) -> BackendResult<()> {
        self.reach().await?;
        self.world.create_bucket(bucket, config);
        Ok(())
    }

    async fn bucket_config(&self, bucket: &str) -> BackendResult<BucketConfig> {
        self.reach().await?;
        self.world.bucket_config(bucket)
    }

    async fn delete_bucket(&self, bucket: &str) -> BackendResult<()> {
        self.reach().await?;
        self.world.delete_bucket(bucket)
    }

    async fn list_buckets(&self) -> BackendResult<Vec<String>> {
        self.reach().await?;
        Ok(self.world.list_buckets())
    }

    async fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<KvEntry>> {
        self.reach().await?;
        self.world.get(bucket, key)
    }

    async fn put(&self, bucket: &str, key: &str, value: &[u8]) -> BackendResult<u64> {
        self.reach().await?;
        self.world.note(format!("{} kv put {bucket} {key} = {}", self.node, String::from_utf8_lossy(value)));
        self.world.write(bucket, key, value, KvOperation::Put)
    }

    async fn update(&self, bucket: &str, key: &str, value: &[u8], last: Option<u64>) -> BackendResult<u64> {
        self.reach().await?;
        self.world.note(format!("{} kv update {bucket} {key} (if at {last:?}) = {}", self.node, String::from_utf8_lossy(value)));
        self.world.write_if(bucket, key, value, KvOperation::Put, Some(last))
    }

    async fn delete(&self, bucket: &str, key: &str) -> BackendResult<()> {
        self.reach().await?;
        self.world.note(format!("{} kv delete {bucket} {key}", self.node));
        self.world.write(bucket, key, &[], KvOperation::Delete).map(|_| ())
    }

    async fn keys(&self, bucket: &str) -> BackendResult<Vec<String>> {
        self.reach().await?;
        self.world.keys(bucket)
    }

    /// Changes made while the node is cut off arrive once it is back, as an ordered consumer
    /// catches up after a reconnect.
    async fn watch(&self, bucket: &str, pattern: &str) -> BackendResult<BoxStream<'static, KvEntry>> {
        self.reach().await?;
        let (current, changes) = self.world.watch(bucket, pattern)?;
        let view = self.clone();
        let later = stream::unfold((view, changes), |(view, mut changes)| async move {
            let entry = changes.recv().await?;
            while view.reach().await.is_err() {
                tokio::time::sleep(POLL).await;
            }
            Some((entry, (view, changes)))
        });
        Ok(stream::iter(current).chain(later).boxed())
    }
}

#[async_trait]
impl Governor for NodeView {
    async fn add(&self, name: &str, capacity: u64, expire: Duration, _replicas: u8) -> BackendResult<()> {
        self.reach().await?;
        self.world.add_governor(name, capacity, expire);
        Ok(())
    }

    async fn acquire(&self, name: &str, holder: &str, timeout: Duration) -> BackendResult<Lease> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.reach().await?;
            let freed = self.world.slot_freed.notified();
            if let Attempt::Taken(lease) = self.world.try_acquire(name, holder)? {
                self.world.note(format!("{} took slot {} of {name} ({holder})", self.node, lease.seq));
                return Ok(lease);
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => return Err(BackendError::GovernorTimeout(timeout, name.into())),
                _ = freed => {}
                // Expiry frees slots without a notification.
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    async fn release(&self, lease: &Lease) -> BackendResult<()> {
        self.reach().await?;
        let released = self.world.release(lease);
        self.world.note(format!(
            "{} released slot {} of {}: {}",
            self.node,
            lease.seq,
            lease.governor,
            if released.is_ok() { "ok" } else { "already gone" }
        ));
        released
    }

    async fn holds(&self, lease: &Lease) -> BackendResult<bool> {
        self.reach().await?;
        Ok(self.world.holds(lease))
    }

    async fn view(&self, name: &str) -> BackendResult<GovernorInfo> {
        self.reach().await?;
        self.world.view_governor(name)
    }

    async fn evict(&self, name: &str, seq: u64) -> BackendResult<LeaseInfo> {
        self.reach().await?;
        self.world.evict(name, seq)
    }

    async fn reset(&self, name: &str) -> BackendResult<()> {
        self.reach().await?;
        self.world.reset_governor(name)
    }

    async fn remove(&self, name: &str) -> BackendResult<()> {
        self.reach().await?;
        self.world.remove_governor(name)
    }

    async fn list(&self) -> BackendResult<Vec<String>> {
        self.reach().await?;
        Ok(self.world.governors())
    }
}

#[async_trait]
impl Events for NodeView {
    async fn publish(&self, event: &TransitionEvent) -> BackendResult<()> {
        self.reach().await?;
        let detail = event.detail.as_deref().unwrap_or("");
        self.world.note(format!("{} {}: {} → {} ({detail})", self.node, event.transition, event.from_state, event.to_state));
        Ok(())
    }

    async fn publish_governor(&self, _event: &GovernorEvent) -> BackendResult<()> {
        self.reach().await?;
        Ok(())
    }

    async fn publish_registration(&self, _subject: &str, _entry: &[u8]) -> BackendResult<()> {
        self.reach().await?;
        Ok(())
    }

    async fn subscribe(&self) -> BackendResult<BoxStream<'static, TransitionEvent>> {
        Ok(stream::pending().boxed())
    }
}
