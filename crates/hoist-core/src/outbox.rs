//! Best-effort events leave the machines through one ordered outbox per agent. A machine hands an
//! event over without waiting — a backend that is slow or down must never hold up a machine, which
//! answers status and operators and remediates meanwhile — and one task publishes the events in the
//! order they were given, each attempt bounded. If the backend falls a whole queue behind, further
//! events are dropped and counted (logged once per burst): they are reports, never decisions.

use crate::backend::{Events, TransitionEvent};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events waiting to be published at most; past this they are dropped.
const QUEUE: usize = 1024;
/// How long one publish may take before it is given up.
const PUBLISH_LIMIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<TransitionEvent>,
}

impl Outbox {
    /// Starts the task that publishes to `events`; it ends when every `Outbox` is dropped.
    pub fn start(events: Arc<dyn Events>) -> Outbox {
        let (tx, mut rx) = mpsc::channel::<TransitionEvent>(QUEUE);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                match tokio::time::timeout(PUBLISH_LIMIT, events.publish(&event)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, kind = %event.transition, "could not publish an event"),
                    Err(_) => tracing::debug!(kind = %event.transition, "publishing an event took too long; skipped"),
                }
            }
        });
        Outbox { tx }
    }

    /// Queues `event` without waiting; dropped (and logged) if the queue is full.
    pub fn send(&self, event: TransitionEvent) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.tx.try_send(event) {
            tracing::warn!(machine = %event.machine, kind = %event.transition, "the event queue is full (the backend is slow or down); event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendResult, GovernorEvent};
    use async_trait::async_trait;
    use futures_util::StreamExt;
    use futures_util::stream::BoxStream;
    use std::sync::Mutex;

    /// Events that take their time to publish, keeping what was published in order.
    #[derive(Default)]
    struct Slow(Mutex<Vec<String>>);

    #[async_trait]
    impl Events for Slow {
        async fn publish(&self, event: &TransitionEvent) -> BackendResult<()> {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.0.lock().unwrap().push(event.transition.clone());
            Ok(())
        }
        async fn publish_governor(&self, _event: &GovernorEvent) -> BackendResult<()> {
            Ok(())
        }
        async fn publish_registration(&self, _subject: &str, _entry: &[u8]) -> BackendResult<()> {
            Ok(())
        }
        async fn subscribe(&self) -> BackendResult<BoxStream<'static, TransitionEvent>> {
            Ok(futures_util::stream::pending().boxed())
        }
    }

    fn event(kind: &str) -> TransitionEvent {
        TransitionEvent {
            protocol: String::new(),
            identity: "n1".into(),
            id: String::new(),
            version: String::new(),
            timestamp: 0,
            machine: "hoist_web".into(),
            transition: kind.into(),
            from_state: "RUN".into(),
            to_state: "RUN".into(),
            detail: None,
            image: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_backend_holds_up_no_sender_and_events_keep_their_order() {
        let slow = Arc::new(Slow::default());
        let outbox = Outbox::start(slow.clone());
        let began = tokio::time::Instant::now();
        for kind in ["update", "restart", "health_check"] {
            outbox.send(event(kind));
        }
        assert_eq!(began.elapsed(), Duration::ZERO, "sending waited for the backend");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(*slow.0.lock().unwrap(), ["update", "restart", "health_check"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_the_overflow_and_publishes_the_rest() {
        let slow = Arc::new(Slow::default());
        let outbox = Outbox::start(slow.clone());
        for i in 0..QUEUE + 10 {
            outbox.send(event(&i.to_string()));
        }
        // One publish a second: long enough for every queued event, in virtual time.
        tokio::time::sleep(Duration::from_secs(QUEUE as u64 + 60)).await;
        let published = slow.0.lock().unwrap().clone();
        let queued: Vec<String> = (0..QUEUE).map(|i| i.to_string()).collect();
        assert_eq!(published, queued, "the first QUEUE in order, the overflow dropped");
    }
}
