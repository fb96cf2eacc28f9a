//! Fleet commands as NATS request/reply with many responders: the caller publishes one request with
//! a private reply inbox, every agent that is addressed answers to it, and the caller gathers
//! answers until its deadline or until every expected node has answered.

use crate::{NatsBackend, unavailable};
use async_trait::async_trait;
use futures_util::StreamExt;
use hoist_core::backend::BackendResult;
use hoist_core::fleet::{Fleet, FleetReply, FleetRequest, Responder};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

const SUBJECT: &str = "hoist.fleet.request";

#[async_trait]
impl Fleet for NatsBackend {
    async fn serve(&self, responder: Arc<dyn Responder>) -> BackendResult<()> {
        let mut requests = self.client.subscribe(SUBJECT).await.map_err(|e| unavailable("subscribing to fleet requests", e))?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(message) = requests.next().await {
                let Some(reply_to) = message.reply else { continue };
                let request: FleetRequest = match serde_json::from_slice(&message.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(error = %e, "ignoring a malformed fleet request");
                        continue;
                    }
                };
                // Each request on its own task: a slow transition must not hold up a status query.
                let (client, responder) = (client.clone(), responder.clone());
                tokio::spawn(async move {
                    if let Some(reply) = responder.respond(request).await {
                        let body = serde_json::to_vec(&reply).expect("replies serialise");
                        if let Err(e) = client.publish(reply_to, body.into()).await {
                            debug!(error = %e, "could not answer a fleet request");
                        }
                    }
                });
            }
        });
        Ok(())
    }

    async fn gather(&self, request: &FleetRequest, expected: &BTreeSet<String>, deadline: Duration) -> BackendResult<Vec<FleetReply>> {
        let inbox = self.client.new_inbox();
        let mut answers = self.client.subscribe(inbox.clone()).await.map_err(|e| unavailable("subscribing to the reply inbox", e))?;
        let body = serde_json::to_vec(request).expect("requests serialise");
        self.client.publish_with_reply(SUBJECT, inbox, body.into()).await.map_err(|e| unavailable("sending the fleet request", e))?;
        self.client.flush().await.map_err(|e| unavailable("sending the fleet request", e))?;

        let until = tokio::time::Instant::now() + deadline;
        let mut replies: Vec<FleetReply> = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout_at(until, answers.next()).await {
            match serde_json::from_slice::<FleetReply>(&message.payload) {
                Ok(reply) => replies.push(reply),
                Err(e) => debug!(error = %e, "ignoring a malformed fleet reply"),
            }
            let answered: BTreeSet<&str> = replies.iter().map(|r| r.node.as_str()).collect();
            if !expected.is_empty() && expected.iter().all(|n| answered.contains(n.as_str())) {
                break;
            }
        }
        Ok(replies)
    }
}
