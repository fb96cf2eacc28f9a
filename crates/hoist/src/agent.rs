//! `hoist agent`: wires the adapters into the core agent, serves the control API, and turns SIGHUP
//! and data-file changes into config reloads.

use crate::control::server::{self, Control};
use crate::inotify::Inotify;
use anyhow::Context;
use futures_util::StreamExt;
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BucketConfig, Events, Governor, HOIST_BUCKET, Kv};
use hoist_core::config::{AgentConfig, BackendKind, load_containers};
use hoist_core::files::FileWatch;
use hoist_core::fleet::{AgentResponder, Fleet, NODES_BUCKET, Presence, announce, nodes_bucket};
use hoist_core::health::Conditions;
use hoist_core::machine::MachineDeps;
use hoist_core::persist::StateStore;
use hoist_core::registration::{SERVICES_BUCKET, services_bucket};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

struct Backends {
    kv: Arc<dyn Kv>,
    governor: Arc<dyn Governor>,
    events: Arc<dyn Events>,
    /// Only a shared backend has a fleet to answer.
    fleet: Option<Arc<dyn Fleet>>,
}

async fn open_backends(cfg: &AgentConfig, conditions: &Conditions) -> anyhow::Result<Backends> {
    match cfg.backend {
        BackendKind::Embedded => {
            let path = cfg.state_dir.join("hoist.redb");
            let store =
                hoist_embedded::EmbeddedStore::open(&path).with_context(|| format!("opening the embedded store {}", path.display()))?;
            Ok(Backends { kv: Arc::new(store.clone()), governor: Arc::new(store.clone()), events: Arc::new(store), fleet: None })
        }
        BackendKind::Nats => {
            // In the background: an agent starts, adopts and keeps its containers while NATS is down,
            // and catches up once it answers.
            let options =
                hoist_nats::NatsOptions { connect_in_background: true, conditions: Some(conditions.clone()), ..nats_options(cfg) };
            let backend = hoist_nats::NatsBackend::connect(options).await.context("connecting to NATS")?;
            let backend = Arc::new(backend);
            Ok(Backends { kv: backend.clone(), governor: backend.clone(), events: backend.clone(), fleet: Some(backend) })
        }
    }
}

pub fn nats_options(cfg: &AgentConfig) -> hoist_nats::NatsOptions {
    let n = &cfg.nats;
    let tls = n.tls.as_ref();
    hoist_nats::NatsOptions {
        servers: n.servers.clone(),
        creds: n.creds.clone(),
        nkey: n.nkey.clone(),
        token: n.token.clone(),
        tls_ca: tls.and_then(|t| t.ca.clone()),
        tls_cert: tls.and_then(|t| t.cert.clone()),
        tls_key: tls.and_then(|t| t.key.clone()),
        collective: n.collective.clone(),
        name: format!("hoist {}", cfg.node),
        connect_in_background: false,
        conditions: None,
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let facts = cfg.facts();
    // What the adapters report about themselves (store failing, NATS unreachable), shown in status.
    let conditions = Conditions::default();
    // Refuse to start on a bad config rather than start empty: an empty set would purge what runs.
    let set = load_containers(&cfg.data, &facts).map_err(|e| anyhow::anyhow!("refusing to start, the config has errors:\n{e}"))?;
    tokio::fs::create_dir_all(&cfg.state_dir).await.with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let backends = open_backends(&cfg, &conditions).await?;
    let mut buckets = vec![(HOIST_BUCKET, BucketConfig::default()), (SERVICES_BUCKET, services_bucket(cfg.registration.interval))];
    if backends.fleet.is_some() {
        buckets.push((NODES_BUCKET, nodes_bucket()));
    }
    tokio::spawn(ensure_buckets(backends.kv.clone(), buckets));
    let runtime = hoist_docker::DockerRuntime::new(cfg.docker.host.as_deref()).context("docker.host")?;
    // Docker may come up after the agent (boot order): containers start once it answers, and
    // `hoist status` says what they wait for meanwhile.
    if let Err(e) = runtime.ping().await {
        tracing::warn!(error = %e, "Docker is not reachable yet; containers are started when it is");
    }
    let deps = Arc::new(MachineDeps {
        runtime: Arc::new(runtime),
        kv: backends.kv.clone(),
        governor: backends.governor.clone(),
        events: backends.events.clone(),
        files: Arc::new(Inotify),
        store: StateStore::new(&cfg.state_dir),
        node: cfg.node.clone(),
        docker: cfg.docker.clone(),
        rollout: cfg.rollout.clone(),
        registration_interval: cfg.registration.interval,
        conditions: conditions.clone(),
        slots: hoist_core::slot::SlotKeeper::start(backends.governor.clone(), backends.events.clone(), cfg.node.clone()),
    });
    tracing::info!(node = %cfg.node, containers = set.containers.len(), "starting agent");
    let handle = agent::start(deps, set).await;
    if let Some(fleet) = &backends.fleet {
        join_fleet(&**fleet, backends.kv.clone(), &handle, &cfg, facts.clone()).await?;
    }
    let control = Control { agent: handle.clone(), kv: backends.kv, governor: backends.governor, events: backends.events };
    serve_control(&cfg, control.clone()).await?;
    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics.listen {addr}"))?;
        tokio::spawn(async move { axum::serve(listener, server::metrics_router(control)).await });
    }
    tokio::spawn(reload_on_change(cfg.clone(), facts, handle.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down; containers keep running and are adopted on the next start");
    handle.shutdown().await;
    let _ = std::fs::remove_file(&cfg.control.socket);
    Ok(())
}

/// Creates the buckets the agent needs that do not exist yet, trying again while the backend does not
/// answer (the agent does not wait for it: its machines run on their persisted state meanwhile).
/// Operators may have created them with their own settings (`hoist kv add`); only gaps are filled.
async fn ensure_buckets(kv: Arc<dyn Kv>, mut missing: Vec<(&'static str, BucketConfig)>) {
    let mut wait = Duration::from_millis(500);
    while !missing.is_empty() {
        let mut still = Vec::new();
        for (bucket, config) in missing {
            if kv.bucket_config(bucket).await.is_ok() {
                continue;
            }
            if let Err(e) = kv.create_bucket(bucket, config.clone()).await {
                tracing::debug!(error = %e, bucket, "could not create the bucket yet");
                still.push((bucket, config));
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }
}

/// Answers fleet commands and announces this node, so callers know who should answer.
async fn join_fleet(
    fleet: &dyn Fleet,
    kv: Arc<dyn Kv>,
    handle: &AgentHandle,
    cfg: &AgentConfig,
    facts: serde_json::Value,
) -> anyhow::Result<()> {
    fleet.serve(Arc::new(AgentResponder { agent: handle.clone(), facts: facts.clone() })).await.context("answering fleet requests")?;
    tokio::spawn(announce(kv, Presence { node: cfg.node.clone(), facts }));
    Ok(())
}

async fn serve_control(cfg: &AgentConfig, control: Control) -> anyhow::Result<()> {
    let socket = &cfg.control.socket;
    if let Some(dir) = socket.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    // A socket left by an agent that died; a live agent would still answer on it.
    if tokio::net::UnixStream::connect(socket).await.is_ok() {
        anyhow::bail!("another hoist agent is already serving {}", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding control socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    tokio::spawn(async move { axum::serve(listener, server::router(control)).await });
    Ok(())
}

/// Reloads the container data on SIGHUP or when a data file changes. A refused config leaves the
/// running set untouched and is reported in `hoist status` and the logs.
async fn reload_on_change(cfg: AgentConfig, facts: serde_json::Value, handle: AgentHandle) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    let mut changes = Inotify.watch(&cfg.data);
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            Some(_) = changes.next() => "data file changed",
        };
        // Let an editor or config management finish writing every file before reading them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tracing::info!(reason = why, "reloading container config");
        let loaded = load_containers(&cfg.data, &facts).map_err(|e| e.to_string());
        handle.reload(loaded).await;
    }
}
