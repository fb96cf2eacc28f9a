//! Fleet commands as NATS request/reply with many responders: the caller publishes one sealed
//! request on `hoist.fleet.<kind>` (`status` or `transition`, so NATS permissions can tell them
//! apart) with a private reply inbox, every agent that is addressed answers to it, and the caller
//! gathers answers until its deadline or until every expected node has answered. Accepted
//! transitions are recorded on `hoist.audit.<node>`.

use crate::{NatsBackend, unavailable};
use async_trait::async_trait;
use futures_util::StreamExt;
use hoist_core::backend::BackendResult;
use hoist_core::fleet::{Fleet, Responder};
use hoist_core::fleet_auth::AuditEvent;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

const KINDS: [&str; 2] = ["status", "transition"];

fn subject(kind: &str) -> String {
    format!("hoist.fleet.{kind}")
}

/// Whether `reply` is a plain subject under `<prefix>.`: an agent publishes with its own
/// credentials, so answering anywhere a requester names would let it write into KV buckets or
/// governors through the agent.
fn is_inbox(reply: &str, prefix: &str) -> bool {
    reply.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('.')).is_some_and(|rest| {
        !rest.is_empty() && rest.split('.').all(|t| !t.is_empty() && !t.contains(['*', '>']) && !t.contains(char::is_whitespace))
    })
}

#[async_trait]
impl Fleet for NatsBackend {
    async fn serve(&self, responder: Arc<dyn Responder>) -> BackendResult<()> {
        for kind in KINDS {
            let mut requests = self.client.subscribe(subject(kind)).await.map_err(|e| unavailable("subscribing to fleet requests", e))?;
            let (client, responder, prefix) = (self.client.clone(), responder.clone(), self.inbox_prefix.clone());
            tokio::spawn(async move {
                while let Some(message) = requests.next().await {
                    let Some(reply_to) = message.reply else { continue };
                    if !is_inbox(&reply_to, &prefix) {
                        debug!(subject = %message.subject, reply = %reply_to, "dropping a fleet request whose reply subject is not a {prefix}. inbox");
                        continue;
                    }
                    // Each request on its own task: a slow transition must not hold up a status query.
                    let (client, responder) = (client.clone(), responder.clone());
                    tokio::spawn(async move {
                        if let Some(body) = responder.respond(kind, &message.payload, &reply_to).await
                            && let Err(e) = client.publish(reply_to, body.into()).await
                        {
                            debug!(error = %e, "could not answer a fleet request");
                        }
                    });
                }
            });
        }
        Ok(())
    }

    fn reply_subject(&self) -> String {
        self.client.new_inbox()
    }

    async fn gather(
        &self,
        kind: &str,
        reply_to: &str,
        request: Vec<u8>,
        deadline: Duration,
        collect: &mut (dyn for<'m> FnMut(&'m [u8]) -> bool + Send),
    ) -> BackendResult<()> {
        let mut answers =
            self.client.subscribe(reply_to.to_string()).await.map_err(|e| unavailable("subscribing to the reply inbox", e))?;
        self.client
            .publish_with_reply(subject(kind), reply_to.to_string(), request.into())
            .await
            .map_err(|e| unavailable("sending the fleet request", e))?;
        self.client.flush().await.map_err(|e| unavailable("sending the fleet request", e))?;
        let until = tokio::time::Instant::now() + deadline;
        while let Ok(Some(message)) = tokio::time::timeout_at(until, answers.next()).await {
            // The server's own notices (no responders: no agent listens at all) are no one's answer.
            if message.status.is_some() {
                continue;
            }
            if collect(&message.payload) {
                break;
            }
        }
        Ok(())
    }

    async fn audit(&self, event: &AuditEvent) -> BackendResult<()> {
        let body = serde_json::to_vec(event).expect("audit events serialise");
        self.client
            .publish(format!("hoist.audit.{}", event.node), body.into())
            .await
            .map_err(|e| unavailable("publishing an audit event", e))
    }
}

#[cfg(test)]
mod tests {
    use super::is_inbox;

    #[test]
    fn answers_only_plain_inbox_subjects() {
        assert!(is_inbox("_INBOX.abc.def", "_INBOX"));
        assert!(is_inbox("_INBOX_ops.x", "_INBOX_ops"));
        for crafted in [
            "$KV.HOIST.container/web/tag",
            "mcollective.governor.RG",
            "_INBOX",
            "_INBOX.",
            "_INBOX.>",
            "_INBOX.a.*",
            "_INBOX..a",
            "_INBOXX.a",
            "_INBOX.a b",
        ] {
            assert!(!is_inbox(crafted, "_INBOX"), "{crafted}");
        }
    }
}
