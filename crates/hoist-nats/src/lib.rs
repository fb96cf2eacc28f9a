//! hoist-core's `Kv`, `Governor` and `Events` on NATS JetStream, laid out exactly as Choria lays them
//! out (see choria-wire.md), so `choria kv` and `choria governor` can read and change what hoist writes.
//!
//! - KV bucket `B` is stream `KV_B` on subjects `$KV.B.>`; the revision is the stream sequence.
//! - Governor `N` is stream `GOVERNOR_N` on `<collective>.governor.N`; a lease is one message, its id the
//!   stream sequence.
//! - Transition events are CloudEvents on `choria.machine.transition`.
//! - Fleet commands are requests on `hoist.fleet.status` / `hoist.fleet.transition`, answered by every
//!   addressed agent on the caller's inbox; accepted transitions are recorded on `hoist.audit.<node>`.

mod events;
mod fleet;
mod governor;
mod kv;

use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind, response::Response, stream::Stream};
use async_nats::{ConnectOptions, Event, ServerAddr, ServerError};
use hoist_core::backend::BackendError;
use hoist_core::health::Conditions;
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The source name of the connection's condition in `hoist status`.
const CONDITION: &str = "nats";

fn now_rfc3339() -> String {
    events::rfc3339(hoist_core::clock::unix_now())
}

/// How to reach the NATS servers. Independent of hoist's config so this crate stands alone.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub servers: Vec<String>,
    /// A `.creds` file (JWT + nkey seed), as Choria's brokers issue.
    pub creds: Option<PathBuf>,
    /// A file holding an nkey seed.
    pub nkey: Option<PathBuf>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Choria's main collective; governor subjects are `<collective>.governor.<name>`.
    pub collective: String,
    /// The connection name the servers show, e.g. `hoist node1`.
    pub name: String,
    /// Return at once and connect in the background, retrying, instead of failing when no server
    /// answers: an agent must start (and keep its containers) while NATS is down; a CLI command
    /// should fail fast.
    pub connect_in_background: bool,
    /// Where the connection's trouble is reported (`nats: not reachable since …`), for `hoist status`.
    pub conditions: Option<Conditions>,
    /// Reply subjects are `<inbox_prefix>.…`, and agents answer fleet requests only there; the same
    /// on agents and CLIs. NATS's own `_INBOX` by default.
    pub inbox_prefix: String,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            servers: vec!["nats://127.0.0.1:4222".into()],
            creds: None,
            nkey: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            collective: "mcollective".into(),
            name: "hoist".into(),
            connect_in_background: false,
            conditions: None,
            inbox_prefix: "_INBOX".into(),
        }
    }
}

/// One connection shared by the three traits; cheap to clone.
#[derive(Clone)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    collective: String,
    /// The leases this connection took, to tell its own from ones a lost reply left behind.
    leases: Arc<governor::LeaseBook>,
    inbox_prefix: String,
    /// The last permissions violation the server reported: a publish it refused is otherwise only a
    /// timeout or a silence.
    refused: Arc<Mutex<Option<String>>>,
    /// The buckets' handles, looked up at most every `kv::STORE_TTL` (`kv.rs`).
    stores: Arc<Mutex<std::collections::HashMap<String, (async_nats::jetstream::kv::Store, tokio::time::Instant)>>>,
}

impl NatsBackend {
    /// The last permissions violation the server reported on this connection, e.g. `Permissions
    /// Violation for Publish to "$KV.HOIST.container/web/tag"`.
    pub fn last_refusal(&self) -> Option<String> {
        self.refused.lock().expect("not poisoned").clone()
    }

    /// Connects once, failing fast if no server answers; after that the client reconnects on its own.
    pub async fn connect(opts: NatsOptions) -> Result<NatsBackend, BackendError> {
        let servers = opts.servers.join(", ");
        let unavailable = |reason: String| BackendError::Unavailable(format!("cannot connect to NATS at {servers}: {reason}"));
        if opts.servers.is_empty() {
            return Err(unavailable("no servers configured".into()));
        }
        let addrs = opts
            .servers
            .iter()
            .map(|s| s.parse::<ServerAddr>().map_err(|e| unavailable(format!("bad server address {s:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;

        let mut options = ConnectOptions::new().name(&opts.name).custom_inbox_prefix(&opts.inbox_prefix);
        if let Some(creds) = &opts.creds {
            options = options.credentials_file(creds).await.map_err(|e| unavailable(format!("credentials {}: {e}", creds.display())))?;
        }
        if let Some(nkey) = &opts.nkey {
            let seed = std::fs::read_to_string(nkey).map_err(|e| unavailable(format!("nkey {}: {e}", nkey.display())))?;
            options = options.nkey(seed.trim().to_string());
        }
        if let Some(token) = &opts.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &opts.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&opts.tls_cert, &opts.tls_key) {
            (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true),
            (None, None) => {}
            _ => return Err(unavailable("tls_cert and tls_key must be given together".into())),
        }

        let conditions = opts.conditions.clone().unwrap_or_default();
        let (connected_tx, connected) = watch::channel(0u64);
        let reporter = conditions.clone();
        let refused: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = refused.clone();
        options = options.event_callback(move |event| {
            // A publish the server refused is otherwise only a timeout or a silence.
            if let Event::ServerError(ServerError::Other(message)) = &event
                && message.to_lowercase().contains("permissions violation")
            {
                *sink.lock().expect("not poisoned") = Some(message.clone());
            }
            let (conditions, connected_tx) = (reporter.clone(), connected_tx.clone());
            async move {
                match event {
                    Event::Connected => {
                        conditions.set(CONDITION, None);
                        connected_tx.send_modify(|generation| *generation += 1);
                    }
                    Event::Disconnected => {
                        conditions.set(CONDITION, Some(format!("not reachable since {}; running on the last desired state", now_rfc3339())))
                    }
                    Event::ServerError(e) => conditions.set(CONDITION, Some(format!("server error: {e}"))),
                    _ => {}
                }
            }
        });
        if opts.connect_in_background {
            options = options.retry_on_initial_connect();
            conditions.set(CONDITION, Some(format!("not reachable yet at {servers}; running on the last desired state")));
        }
        let client = options.connect(addrs).await.map_err(|e| unavailable(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let backend = NatsBackend {
            client,
            js,
            collective: opts.collective,
            leases: Arc::default(),
            inbox_prefix: opts.inbox_prefix,
            refused,
            stores: Arc::default(),
        };
        tokio::spawn(backend.clone().sweep_on_reconnect(connected));
        Ok(backend)
    }

    /// Whether the connection is up right now. A request made while it is not would be queued and
    /// sent once it is back, long after its caller gave up on it.
    fn require_connected(&self, what: &str) -> Result<(), BackendError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(BackendError::Unavailable(format!("{what}: not connected to NATS"))),
        }
    }

    /// How many servers the cluster has, as the connected server tells its clients: a clustered
    /// server lists every member's client address (its own too) in `connect_urls`, and sends the
    /// list again whenever a member joins or leaves. A standalone server lists none.
    pub fn cluster_size(&self) -> usize {
        self.client.server_info().connect_urls.len().max(1)
    }

    /// The stream, or None if the server says it does not exist.
    async fn find_stream(&self, name: &str) -> Result<Option<Stream>, BackendError> {
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(Some(stream)),
            Err(err) => match err.kind() {
                GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
                _ => Err(unavailable(format!("looking up stream {name}"), err)),
            },
        }
    }

    /// Stream names starting with `prefix`, without it, sorted; with `subject`, only streams that take
    /// a subject it matches (the server filters, as `$JS.API.STREAM.NAMES` allows).
    async fn stream_names(&self, prefix: &str, subject: Option<&str>) -> Result<Vec<String>, BackendError> {
        #[derive(serde::Deserialize)]
        struct Page {
            total: usize,
            // null on an empty page
            streams: Option<Vec<String>>,
        }
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let mut request = serde_json::json!({ "offset": offset });
            if let Some(subject) = subject {
                request["subject"] = subject.into();
            }
            let page: Response<Page> = self.js.request("STREAM.NAMES", &request).await.map_err(|e| unavailable("listing streams", e))?;
            let page = match page {
                Response::Ok(page) => page,
                Response::Err { error } => return Err(BackendError::Other(format!("listing streams: {error}"))),
            };
            let streams = page.streams.unwrap_or_default();
            offset += streams.len();
            names.extend(streams.into_iter().filter_map(|n| n.strip_prefix(prefix).map(str::to_string)));
            if offset >= page.total || offset == 0 {
                break;
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Network trouble, timeouts and anything else that a retry later may cure.
fn unavailable(what: impl Display, err: impl Display) -> BackendError {
    BackendError::Unavailable(format!("{what}: {err}"))
}

/// Replica counts nats-server accepts.
fn validate_replicas(replicas: u8) -> Result<(), BackendError> {
    if (1..=5).contains(&replicas) {
        Ok(())
    } else {
        Err(BackendError::Invalid { what: "replicas", value: replicas.to_string(), reason: "use 1 to 5".into() })
    }
}

/// Unix milliseconds of a JetStream timestamp.
fn unix_ms(time: async_nats::datetime::DateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}
