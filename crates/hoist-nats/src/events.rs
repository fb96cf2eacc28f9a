//! Transition events as Choria's machine notifier sends them: a CloudEvent 1.0 on
//! `choria.machine.transition` whose `data` is the transition, so `choria machine watch` and
//! `choria scout watch` show hoist's machines too. Governor lifecycle events are Choria's plain
//! lifecycle JSON on `choria.lifecycle.event.governor.<component>`, as `choria tool event` reads them.

use crate::{NatsBackend, unavailable};
use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::backend::{BackendResult, Events, GOVERNOR_EVENT_PROTOCOL, GovernorEvent, TRANSITION_PROTOCOL, TransitionEvent};
use hoist_core::machine::uuid_v4;
use serde::{Deserialize, Serialize};
use tracing::debug;

const SUBJECT: &str = "choria.machine.transition";

#[derive(Serialize, Deserialize)]
struct CloudEvent {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    kind: String,
    subject: String,
    datacontenttype: String,
    time: String,
    data: TransitionEvent,
}

/// Choria's lifecycle envelope for governor events (`lifecycle/governor.go`): the event's own fields
/// at the top level, next to these.
#[derive(Serialize)]
struct GovernorLifecycle<'a> {
    protocol: &'static str,
    id: String,
    timestamp: i64,
    #[serde(flatten)]
    event: &'a GovernorEvent,
}

/// RFC 3339 UTC with seconds precision, like Choria's `time` field.
pub(crate) fn rfc3339(unix_s: i64) -> String {
    let (days, secs) = (unix_s.div_euclid(86_400), unix_s.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[async_trait]
impl Events for NatsBackend {
    async fn publish(&self, event: &TransitionEvent) -> BackendResult<()> {
        let envelope = CloudEvent {
            specversion: "1.0".into(),
            id: uuid_v4(),
            source: "io.choria.machine".into(),
            kind: TRANSITION_PROTOCOL.into(),
            subject: event.identity.clone(),
            datacontenttype: "application/json".into(),
            time: rfc3339(event.timestamp),
            data: event.clone(),
        };
        let body = serde_json::to_vec(&envelope).map_err(|e| unavailable("encoding a transition event", e))?;
        self.client.publish(SUBJECT, body.into()).await.map_err(|e| unavailable("publishing a transition event", e))
    }

    async fn publish_registration(&self, subject: &str, entry: &[u8]) -> BackendResult<()> {
        self.client
            .publish(subject.to_string(), entry.to_vec().into())
            .await
            .map_err(|e| unavailable("publishing a service registration", e))
    }

    async fn publish_governor(&self, event: &GovernorEvent) -> BackendResult<()> {
        let body = GovernorLifecycle { protocol: GOVERNOR_EVENT_PROTOCOL, id: uuid_v4(), timestamp: hoist_core::clock::unix_now(), event };
        let body = serde_json::to_vec(&body).map_err(|e| unavailable("encoding a governor event", e))?;
        let subject = format!("choria.lifecycle.event.governor.{}", event.component);
        self.client.publish(subject, body.into()).await.map_err(|e| unavailable("publishing a governor event", e))
    }

    async fn subscribe(&self) -> BackendResult<BoxStream<'static, TransitionEvent>> {
        let subscriber = self.client.subscribe(SUBJECT).await.map_err(|e| unavailable("subscribing to transition events", e))?;
        Ok(subscriber
            .filter_map(|msg| async move {
                match serde_json::from_slice::<CloudEvent>(&msg.payload) {
                    Ok(event) => Some(event.data),
                    Err(err) => {
                        debug!(%err, "ignoring an unparsable transition event");
                        None
                    }
                }
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_and_ids() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        let id = uuid_v4();
        assert_eq!((id.len(), &id[14..15]), (36, "4"));
    }
}
