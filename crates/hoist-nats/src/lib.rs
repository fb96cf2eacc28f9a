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
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    inbox_prefix: String,
    /// The last permissions violation the server reported: a publish it refused is otherwise only a
    /// timeout or a silence.
    refused: Arc<Mutex<Option<String>>>,
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

        let refused: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = refused.clone();
        options = options.event_callback(move |event| {
            if let Event::ServerError(ServerError::Other(message)) = &event
                && message.to_lowercase().contains("permissions violation")
            {
                *sink.lock().expect("not poisoned") = Some(message.clone());
            }
            async {}
        });
        let client = options.connect(addrs).await.map_err(|e| unavailable(e.to_string()))?;
        let js = jetstream::new(client.clone());
        Ok(NatsBackend { client, js, collective: opts.collective, inbox_prefix: opts.inbox_prefix, refused })
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
