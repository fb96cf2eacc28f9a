//! Governor slots that free themselves. Whoever takes a slot holds a [`Slot`]; dropping it — when the
//! machine no longer needs it, when a job is superseded or fails, when a machine's task ends for any
//! reason — hands the lease to the agent's [`SlotKeeper`], which publishes Choria's `exit` lifecycle
//! event and releases the lease, retrying while the governor cannot be reached, until it is released
//! or known to be gone (expired, evicted). So no slot outlives the work it was taken for, and there is
//! one release path instead of one per way a job can end. Modelled on tokio's `OwnedSemaphorePermit`.

use crate::backend::{BackendError, Events, Governor, GovernorEvent, GovernorEventType, Lease};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// First wait before a failed release is tried again; doubled up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// One held governor slot. Released when dropped.
#[must_use = "dropping a Slot releases it at once"]
#[derive(Debug)]
pub struct Slot {
    lease: Lease,
    /// The machine that holds it (`hoist_web`), for the lifecycle event.
    component: String,
    keeper: SlotKeeper,
}

impl Slot {
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.keeper.pending.fetch_add(1, Ordering::SeqCst);
        let released = Released { lease: self.lease.clone(), component: std::mem::take(&mut self.component) };
        if self.keeper.tx.send(released).is_err() {
            // The keeper is gone (the runtime is shutting down); the governor's expiry frees it.
            self.keeper.done();
        }
    }
}

#[derive(Debug)]
struct Released {
    lease: Lease,
    component: String,
}

/// The agent's owner of every release: one task, cheap to clone into every machine.
#[derive(Clone, Debug)]
pub struct SlotKeeper {
    tx: mpsc::UnboundedSender<Released>,
    /// Releases handed over and not yet finished, so shutdown can wait for them.
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
}

impl SlotKeeper {
    /// Starts the keeper's task on the current tokio runtime.
    pub fn start(governor: Arc<dyn Governor>, events: Arc<dyn Events>, node: String) -> SlotKeeper {
        let (tx, mut rx) = mpsc::unbounded_channel::<Released>();
        let keeper = SlotKeeper { tx, pending: Arc::default(), settled: Arc::default() };
        let owner = keeper.clone();
        tokio::spawn(async move {
            while let Some(released) = rx.recv().await {
                // Each on its own task: one governor that does not answer must not hold up another's.
                let (governor, events, node, owner) = (governor.clone(), events.clone(), node.clone(), owner.clone());
                tokio::spawn(async move {
                    release(&*governor, &*events, &node, released).await;
                    owner.done();
                });
            }
        });
        keeper
    }

    /// Wraps a lease just taken. Publishes Choria's `enter` event.
    pub async fn hold(&self, lease: Lease, component: &str, node: &str, events: &dyn Events) -> Slot {
        lifecycle(events, node, component, &lease.governor, lease.seq, GovernorEventType::Enter).await;
        Slot { lease, component: component.to_string(), keeper: self.clone() }
    }

    /// Waits up to `limit` for every handed-over release to finish (at shutdown).
    pub async fn settle(&self, limit: Duration) {
        let wait = async {
            loop {
                let settled = self.settled.notified();
                if self.pending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                settled.await;
            }
        };
        if tokio::time::timeout(limit, wait).await.is_err() {
            tracing::warn!(
                pending = self.pending.load(Ordering::SeqCst),
                "governor slots still being released at shutdown; their expiry frees them"
            );
        }
    }

    fn done(&self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        self.settled.notify_waiters();
    }
}

/// Releases until released or known gone. A governor that does not answer is asked again with
/// backoff; one that says the lease is no longer there (expired, evicted, removed) is done.
async fn release(governor: &dyn Governor, events: &dyn Events, node: &str, released: Released) {
    let Released { lease, component } = released;
    lifecycle(events, node, &component, &lease.governor, lease.seq, GovernorEventType::Exit).await;
    let mut wait = RETRY_FIRST;
    loop {
        match governor.release(&lease).await {
            Ok(()) => return,
            Err(BackendError::NoLease { .. } | BackendError::NoGovernor(_)) => {
                tracing::debug!(governor = %lease.governor, seq = lease.seq, "lease already gone");
                return;
            }
            Err(e) => {
                // Gone meanwhile (expired while we could not reach the governor) is as good as released.
                if let Ok(false) = governor.holds(&lease).await {
                    return;
                }
                tracing::warn!(governor = %lease.governor, seq = lease.seq, error = %e, retry_in = ?wait, "could not release a governor slot; retrying");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Publishes a governor lifecycle event, as Choria's autonomous agents do; best effort.
pub async fn lifecycle(events: &dyn Events, node: &str, component: &str, governor: &str, sequence: u64, event_type: GovernorEventType) {
    let event = GovernorEvent { identity: node.into(), component: component.into(), governor: governor.into(), sequence, event_type };
    if let Err(e) = events.publish_governor(&event).await {
        tracing::debug!(governor, error = %e, "could not publish a governor event");
    }
}
