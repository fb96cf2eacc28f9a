//! `/api/events`: Server-Sent Events for one open page — every transition event as it happens, and a
//! fresh snapshot every `REFRESH` (and soon after each event), so counts and the chart stay live.

use super::source::Source;
use axum::body::{Body, Bytes};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::backend::TransitionEvent;
use serde::Serialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

/// How often a page gets a new snapshot when nothing happens.
const REFRESH: Duration = Duration::from_secs(2);
/// How soon after an event: a rollout's events come in bursts, one snapshot covers a burst.
const AFTER_EVENT: Duration = Duration::from_millis(300);

/// The response for one page; its feed ends when the page goes away (the next send fails).
pub fn events(source: Arc<Source>) -> Response {
    // A small buffer: a page that stops reading holds up only its own feed.
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(feed(source, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-store")
        .body(Body::from_stream(body))
        .expect("static response parts")
}

async fn feed(source: Arc<Source>, tx: mpsc::Sender<Bytes>) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut events: Option<BoxStream<'static, TransitionEvent>> = None;
    loop {
        let frame = tokio::select! {
            _ = tick.tick() => {
                // (Re)subscribed at each refresh while there is no stream: the agent may have restarted.
                if events.is_none() {
                    events = source.events().await.ok();
                }
                match source.snapshot().await {
                    Ok(snapshot) => frame("snapshot", &snapshot),
                    Err(error) => frame("unavailable", &serde_json::json!({ "error": error })),
                }
            }
            event = next(&mut events) => match event {
                Some(event) => {
                    tick.reset_after(AFTER_EVENT);
                    frame("transition", &event)
                }
                None => {
                    events = None;
                    continue;
                }
            },
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

/// The next event, or never while there is no stream (the refresh resubscribes).
async fn next(events: &mut Option<BoxStream<'static, TransitionEvent>>) -> Option<TransitionEvent> {
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// One SSE message. JSON never holds a raw line break, so `data:` is one line.
fn frame(name: &str, value: &impl Serialize) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {}\n\n", serde_json::to_string(value).expect("serialises")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_frame_is_one_named_message() {
        let text = serde_json::json!({ "error": "line 1\nline 2" });
        assert_eq!(super::frame("unavailable", &text), "event: unavailable\ndata: {\"error\":\"line 1\\nline 2\"}\n\n");
    }
}
