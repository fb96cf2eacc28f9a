//! Choria's concurrency governor: stream `GOVERNOR_<name>` on `<collective>.governor.<name>` with
//! MaxMsgs = capacity, MaxAge = expiry and discard-new, so the server itself refuses a lease when the
//! governor is full and ages leases out. A lease is one message whose body is the holder's name; its
//! id is the stream sequence.

use crate::{NatsBackend, unavailable, unix_ms, validate_replicas};
use async_nats::jetstream::stream::{Config, DeleteStatus, DiscardPolicy, Info, RawMessageErrorKind, RetentionPolicy, StorageType, Stream};
use async_nats::jetstream::{ErrorCode, message::StreamMessage, response::Response};
use async_nats::{Request, RequestErrorKind};
use async_trait::async_trait;
use futures_util::StreamExt;
use hoist_core::backend::{BackendError, BackendResult, Governor, GovernorInfo, Lease, LeaseInfo};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep};
use tracing::debug;

/// Choria waits this long for each campaign reply.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(1);
/// nats-server's "maximum messages exceeded": the governor is full, the only error worth retrying.
const FULL: ErrorCode = ErrorCode::STREAM_STORE_FAILED;
/// nats-server's "no message found" when deleting a sequence that is already gone.
const DELETE_FAILED: ErrorCode = ErrorCode(10057);
/// Waits between campaigns while full, in ms, each jittered to ms/2 + rand(ms) as Choria does. Shorter
/// than Choria's five-second ladder so a freed slot is noticed within a couple of seconds.
const BACKOFF_MS: [u64; 7] = [250, 500, 750, 1000, 1250, 1500, 2000];

/// Hoist's own hint that a slot of governor `name` was freed, so a waiting campaign retries at once
/// instead of at its next backoff step. Outside Choria's layout and only an optimisation: Choria's
/// clients do not send it, and waiters still retry on their backoff ladder, so nothing depends on it
/// arriving.
fn freed_subject(name: &str) -> String {
    format!("hoist.governor.{name}.freed")
}

/// The waiters of a governor take its freed hints as one queue group: each hint wakes one of them,
/// the one the server picks, for the one slot it announces. Woken all at once, a thousand waiters
/// would each campaign for every freed slot, and the server's time would go on refusing them.
fn waiters_group(name: &str) -> String {
    format!("hoist-governor-{name}-waiters")
}

fn stream_name(name: &str) -> String {
    format!("GOVERNOR_{name}")
}

/// Governor names become a subject token and a stream name, so they follow the bucket rules.
fn validate_name(name: &str) -> BackendResult<()> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(()).ok_or_else(|| BackendError::Invalid {
        what: "governor",
        value: name.into(),
        reason: "use only letters, digits, _ and -".into(),
    })
}

/// A JetStream publish ack, or its error.
#[derive(Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// What this connection knows of its own leases. A campaign whose reply was lost may still have been
/// stored (Choria's own caveat), and one queued while disconnected may reach the server after its
/// caller gave up: such a lease carries this connection's holder name but no job holds it, and the
/// whole fleet would wait for its expiry. So leases under a holder name this connection campaigned
/// with, that it did not hand out, are released — after a campaign fails and after every reconnect.
/// Each (governor, holder) has a lock a campaign and a sweep both take, so a sweep never deletes the
/// lease of a campaign still waiting for its reply.
#[derive(Default)]
pub(crate) struct LeaseBook {
    /// (governor, seq) handed out by `acquire` and not released.
    held: Mutex<HashSet<(String, u64)>>,
    /// Every (governor, holder) campaigned with, and its lock.
    holders: Mutex<HashMap<(String, String), Turn>>,
}

/// Armed while a campaign waits for its reply; dropped armed (the acquire was cancelled), it sweeps.
struct Abandoned<'a> {
    backend: &'a NatsBackend,
    governor: &'a str,
    holder: &'a str,
    armed: bool,
}

impl Abandoned<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            tokio::spawn(self.backend.clone().sweep_later(self.governor.to_string(), self.holder.to_string()));
        }
    }
}

/// Taken by a campaign and by a sweep of the same (governor, holder).
type Turn = Arc<tokio::sync::Mutex<()>>;

impl LeaseBook {
    fn lock(&self, governor: &str, holder: &str) -> Turn {
        self.holders.lock().expect("not poisoned").entry((governor.to_string(), holder.to_string())).or_default().clone()
    }

    fn holds(&self, governor: &str, seq: u64) -> bool {
        self.held.lock().expect("not poisoned").contains(&(governor.to_string(), seq))
    }

    fn hand_out(&self, governor: &str, seq: u64) {
        self.held.lock().expect("not poisoned").insert((governor.to_string(), seq));
    }

    fn forget(&self, governor: &str, seq: u64) {
        self.held.lock().expect("not poisoned").remove(&(governor.to_string(), seq));
    }

    fn campaigned(&self) -> Vec<(String, String)> {
        self.holders.lock().expect("not poisoned").keys().cloned().collect()
    }
}

/// A lease message's body is the holder's name; its time is when the lease was taken.
fn lease_from(msg: &StreamMessage) -> LeaseInfo {
    LeaseInfo { seq: msg.sequence, holder: String::from_utf8_lossy(&msg.payload).into_owned(), taken_ms: unix_ms(msg.time) }
}

impl NatsBackend {
    fn governor_subject(&self, name: &str) -> String {
        format!("{}.governor.{name}", self.collective)
    }

    async fn governor(&self, name: &str) -> BackendResult<Stream> {
        validate_name(name)?;
        self.find_stream(&stream_name(name)).await?.ok_or_else(|| BackendError::NoGovernor(name.into()))
    }

    /// One campaign: Some(lease) if taken, None if full. Fails at once while disconnected: queued, the
    /// request would be sent on reconnect and could take a slot nobody waits for any more.
    async fn campaign(&self, name: &str, holder: &str) -> BackendResult<Option<u64>> {
        self.require_connected(&format!("taking a lease in governor {name}"))?;
        let request = Request::new().payload(holder.to_string().into()).timeout(Some(CAMPAIGN_TIMEOUT));
        let reply = match self.client.send_request(self.governor_subject(name), request).await {
            Ok(reply) => reply,
            // No stream listens on the subject: the governor does not exist, lives under another
            // collective, or (in a cluster, just after it was created or while a leader is elected)
            // its interest has not reached this server yet. Nothing was stored, so the last case is
            // safe to retry like a full governor.
            Err(err) if err.kind() == RequestErrorKind::NoResponders => {
                let stream = self.governor(name).await?;
                let subject = self.governor_subject(name);
                if stream.cached_info().config.subjects.contains(&subject) {
                    debug!(governor = name, "no responders yet for an existing governor; retrying");
                    return Ok(None);
                }
                return Err(unavailable(
                    format!("governor {name}"),
                    format!("its stream does not take {subject}; is the collective right?"),
                ));
            }
            // Not retried: the lease may have been stored with its ack lost (Choria PR #1970).
            Err(err) => return Err(unavailable(format!("taking a lease in governor {name}"), err)),
        };
        let ack: PubAck =
            serde_json::from_slice(&reply.payload).map_err(|e| BackendError::Other(format!("governor {name}: unexpected reply: {e}")))?;
        match ack.error {
            None => Ok(Some(ack.seq)),
            Some(error) if error.err_code == FULL.0 => Ok(None),
            Some(error) => Err(BackendError::Other(format!("governor {name}: {}", error.description))),
        }
    }

    /// Deletes lease `seq`; `NoLease` if it is already gone. `erase` overwrites it as `choria governor
    /// evict` does; a holder's own release does not, like Choria's.
    async fn delete_lease(&self, name: &str, seq: u64, erase: bool) -> BackendResult<()> {
        self.governor(name).await?;
        let body = serde_json::json!({ "seq": seq, "no_erase": !erase });
        let response: Response<DeleteStatus> = self
            .js
            .request(format!("STREAM.MSG.DELETE.{}", stream_name(name)), &body)
            .await
            .map_err(|e| unavailable(format!("deleting lease {seq} of governor {name}"), e))?;
        match response {
            Response::Ok(status) if status.success => {
                self.announce_freed(name, 1).await;
                Ok(())
            }
            Response::Ok(_) => Err(BackendError::NoLease { governor: name.into(), seq }),
            Response::Err { error } if [DELETE_FAILED, ErrorCode::NO_MESSAGE_FOUND].contains(&error.error_code()) => {
                Err(BackendError::NoLease { governor: name.into(), seq })
            }
            Response::Err { error } => Err(BackendError::Other(format!("deleting lease {seq} of governor {name}: {error}"))),
        }
    }

    /// A waiter that won its slot on its own (a retry on its ladder) may have been handed hints meanwhile,
    /// each meant for one other waiter: passed on, they wake others instead of leaving slots idle
    /// until someone's next retry.
    async fn pass_on_hints(&self, name: &str, mut freed: async_nats::Subscriber) {
        let _ = freed.unsubscribe().await;
        let mut unused = 0;
        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(freed.next()) {
            unused += 1;
        }
        self.announce_freed(name, unused).await;
    }

    /// One hint per free slot, each for one waiter.
    async fn announce_freed(&self, name: &str, slots: u64) {
        for _ in 0..slots {
            if let Err(e) = self.client.publish(freed_subject(name), Default::default()).await {
                debug!(governor = name, error = %e, "could not announce a freed slot");
                return;
            }
        }
    }

    /// The lease message, or None if it expired, was released or evicted.
    async fn lease_info(&self, stream: &Stream, seq: u64) -> BackendResult<Option<LeaseInfo>> {
        match stream.get_raw_message(seq).await {
            Ok(msg) => Ok(Some(lease_from(&msg))),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(unavailable(format!("reading lease {seq}"), err)),
        }
    }

    /// The held leases, oldest first, walking only the messages present: one request per lease however
    /// many releases left gaps.
    async fn leases(&self, name: &str, info: &Info) -> BackendResult<Vec<LeaseInfo>> {
        let stream = self.js.get_stream_no_info(stream_name(name)).await.map_err(|e| unavailable(format!("reading governor {name}"), e))?;
        // The stream's own subject, so governors made under another collective still list their leases.
        let subject = info.config.subjects.first().cloned().unwrap_or_else(|| self.governor_subject(name));
        let mut leases = Vec::new();
        let mut from = info.state.first_sequence;
        while info.state.messages > 0 && from <= info.state.last_sequence {
            match stream.get_first_raw_message_by_subject(&subject, from).await {
                Ok(msg) => {
                    leases.push(lease_from(&msg));
                    from = msg.sequence + 1;
                }
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(err) => return Err(unavailable(format!("reading governor {name}"), err)),
            }
        }
        Ok(leases)
    }
}

impl NatsBackend {
    /// Releases `holder`'s leases in `governor` that this connection did not hand out. Err when the
    /// governor could not be read or a lease not deleted; the caller tries again later.
    async fn sweep(&self, governor: &str, holder: &str) -> BackendResult<usize> {
        let lock = self.leases.lock(governor, holder);
        let _turn = lock.lock().await;
        let info = match self.governor(governor).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(BackendError::NoGovernor(_)) => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut released = 0;
        for lease in self.leases(governor, &info).await? {
            if lease.holder == holder && !self.leases.holds(governor, lease.seq) {
                tracing::warn!(governor, seq = lease.seq, holder, "releasing a lease no job of this agent holds (a lost campaign reply)");
                match self.delete_lease(governor, lease.seq, false).await {
                    Ok(()) | Err(BackendError::NoLease { .. }) => released += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(released)
    }

    /// Sweeps `holder`'s leftovers once the governor answers, giving up when a lease would have
    /// expired anyway (no governor keeps a lease longer than a day in practice).
    async fn sweep_later(self, governor: String, holder: String) {
        let mut wait = Duration::from_millis(500);
        let give_up = Instant::now() + Duration::from_secs(86_400);
        while Instant::now() < give_up {
            match self.sweep(&governor, &holder).await {
                Ok(_) => return,
                Err(e) => debug!(governor, holder, error = %e, "sweep for leftover leases failed; retrying"),
            }
            sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// After every reconnect, sweep every holder this connection campaigned with: campaigns queued
    /// during the outage may have landed as the connection came back.
    pub(crate) async fn sweep_on_reconnect(self, mut connected: tokio::sync::watch::Receiver<u64>) {
        // The first connection has nothing to sweep.
        let _ = connected.borrow_and_update();
        while connected.changed().await.is_ok() {
            for (governor, holder) in self.leases.campaigned() {
                tokio::spawn(self.clone().sweep_later(governor, holder));
            }
        }
    }
}

#[async_trait]
impl Governor for NatsBackend {
    async fn add(&self, name: &str, capacity: u64, expire: Duration, replicas: u8) -> BackendResult<()> {
        validate_name(name)?;
        validate_replicas(replicas)?;
        let max_messages = i64::try_from(capacity).ok().filter(|c| *c > 0).ok_or_else(|| BackendError::Invalid {
            what: "capacity",
            value: capacity.to_string(),
            reason: "use 1 or more".into(),
        })?;
        // As Choria's streamOpts(); an update re-applies all of it.
        let config = Config {
            name: stream_name(name),
            description: Some(format!("Concurrency Governor {name}")),
            subjects: vec![self.governor_subject(name)],
            max_messages,
            max_age: expire,
            num_replicas: usize::from(replicas),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            ..Default::default()
        };
        let info = self.js.create_or_update_stream(config).await.map_err(|e| unavailable(format!("adding governor {name}"), e))?;
        // nats-server 2.15 keeps every message of a discard-new stream whose MaxMsgs is lowered below
        // its count (verified), so a lowered capacity would stay overbooked: evict the oldest leases,
        // which is what older servers did on their own.
        let excess = usize::try_from(info.state.messages.saturating_sub(capacity)).unwrap_or(usize::MAX);
        for lease in self.leases(name, &info).await?.into_iter().take(excess) {
            match self.delete_lease(name, lease.seq, true).await {
                Ok(()) | Err(BackendError::NoLease { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        // A raised capacity admits waiters at once.
        self.announce_freed(name, capacity.saturating_sub(info.state.messages)).await;
        Ok(())
    }

    async fn acquire(&self, name: &str, holder: &str, timeout: Duration) -> BackendResult<Lease> {
        validate_name(name)?;
        let deadline = Instant::now() + timeout;
        let mut tries = 0;
        // Subscribed before the first campaign, so a slot freed in between is not missed.
        let mut freed = self
            .client
            .queue_subscribe(freed_subject(name), waiters_group(name))
            .await
            .map_err(|e| unavailable("subscribing to freed slots", e))?;
        let lock = self.leases.lock(name, holder);
        loop {
            let attempt = {
                let _turn = lock.lock().await;
                // A caller that gives up (drops this future) while the campaign waits for its reply
                // may leave a stored lease nobody holds: the guard looks for it then.
                let abandoned = Abandoned { backend: self, governor: name, holder, armed: true };
                let attempt = self.campaign(name, holder).await;
                if let Ok(Some(seq)) = attempt {
                    self.leases.hand_out(name, seq);
                }
                abandoned.disarm();
                attempt
            };
            match attempt {
                Ok(Some(seq)) => {
                    self.pass_on_hints(name, freed).await;
                    return Ok(Lease { governor: name.into(), seq });
                }
                Ok(None) => {}
                Err(e) => {
                    // The request may have been stored with its reply lost: look for it.
                    tokio::spawn(self.clone().sweep_later(name.to_string(), holder.to_string()));
                    return Err(e);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BackendError::GovernorTimeout(timeout, name.into()));
            }
            let ms = BACKOFF_MS[tries.min(BACKOFF_MS.len() - 1)];
            let wait = Duration::from_millis(ms / 2 + rand::random_range(0..ms));
            tries += 1;
            debug!(governor = name, ?wait, "governor full, retrying");
            tokio::select! {
                _ = sleep(wait.min(deadline - now)) => {}
                Some(_) = freed.next() => {}
            }
        }
    }

    async fn release(&self, lease: &Lease) -> BackendResult<()> {
        let result = self.delete_lease(&lease.governor, lease.seq, false).await;
        if matches!(result, Ok(()) | Err(BackendError::NoLease { .. } | BackendError::NoGovernor(_))) {
            self.leases.forget(&lease.governor, lease.seq);
        }
        result
    }

    async fn holds(&self, lease: &Lease) -> BackendResult<bool> {
        match self.governor(&lease.governor).await {
            Ok(stream) => Ok(self.lease_info(&stream, lease.seq).await?.is_some()),
            Err(BackendError::NoGovernor(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    async fn view(&self, name: &str) -> BackendResult<GovernorInfo> {
        let stream = self.governor(name).await?;
        let info = stream.cached_info();
        Ok(GovernorInfo {
            name: name.into(),
            capacity: u64::try_from(info.config.max_messages).unwrap_or(0),
            expire: info.config.max_age,
            replicas: u8::try_from(info.config.num_replicas).unwrap_or(u8::MAX),
            leases: self.leases(name, info).await?,
        })
    }

    async fn evict(&self, name: &str, seq: u64) -> BackendResult<LeaseInfo> {
        let stream = self.governor(name).await?;
        let info = self.lease_info(&stream, seq).await?.ok_or_else(|| BackendError::NoLease { governor: name.into(), seq })?;
        self.delete_lease(name, seq, true).await?;
        Ok(info)
    }

    async fn reset(&self, name: &str) -> BackendResult<()> {
        let stream = self.governor(name).await?;
        stream.purge().await.map_err(|e| unavailable(format!("resetting governor {name}"), e))?;
        self.announce_freed(name, u64::try_from(stream.cached_info().config.max_messages).unwrap_or(1)).await;
        Ok(())
    }

    async fn remove(&self, name: &str) -> BackendResult<()> {
        self.governor(name).await?;
        self.js.delete_stream(stream_name(name)).await.map_err(|e| unavailable(format!("removing governor {name}"), e))?;
        Ok(())
    }

    /// Like `choria governor list`: this collective's governors only.
    async fn list(&self) -> BackendResult<Vec<String>> {
        self.stream_names("GOVERNOR_", Some(&format!("{}.governor.*", self.collective))).await
    }
}
