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
use hoist_core::fleet_auth::{Authority, node_key};
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

async fn open_backends(cfg: &AgentConfig) -> anyhow::Result<Backends> {
    match cfg.backend {
        BackendKind::Embedded => {
            let path = cfg.state_dir.join("hoist.redb");
            let store =
                hoist_embedded::EmbeddedStore::open(&path).with_context(|| format!("opening the embedded store {}", path.display()))?;
            Ok(Backends { kv: Arc::new(store.clone()), governor: Arc::new(store.clone()), events: Arc::new(store), fleet: None })
        }
        BackendKind::Nats => {
            let backend = hoist_nats::NatsBackend::connect(nats_options(cfg)).await.context("connecting to NATS")?;
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
        inbox_prefix: n.inbox_prefix.clone(),
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let facts = cfg.facts();
    // What the adapters report about themselves (store failing, NATS unreachable), shown in status.
    let conditions = hoist_core::health::Conditions::default();
    // Refuse to start on a bad config rather than start empty: an empty set would purge what runs.
    let set = load_containers(&cfg.data, &facts).map_err(|e| anyhow::anyhow!("refusing to start, the config has errors:\n{e}"))?;
    tokio::fs::create_dir_all(&cfg.state_dir).await.with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let backends = open_backends(&cfg).await?;
    // Operators may have created these with their own settings (`hoist kv add`); only fill gaps.
    for (bucket, config) in [(HOIST_BUCKET, BucketConfig::default()), (SERVICES_BUCKET, services_bucket(cfg.registration.interval))] {
        if let Err(e) = backends.kv.bucket_config(bucket).await {
            tracing::debug!(error = %e, bucket, "creating the bucket");
            backends.kv.create_bucket(bucket, config).await.with_context(|| format!("creating the {bucket} bucket"))?;
        }
    }
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
    });
    tracing::info!(node = %cfg.node, containers = set.containers.len(), "starting agent");
    if backends.fleet.is_some() && cfg.fleet.allow_unsigned {
        // Shown in `hoist status` for as long as it is so, not only logged once.
        conditions.set("fleet", Some("unsigned fleet requests are accepted (fleet.allow_unsigned)".into()));
    }
    let handle = agent::start(deps, set).await;
    if let Some(fleet) = backends.fleet.clone() {
        join_fleet(fleet, backends.kv.clone(), &handle, &cfg, facts.clone()).await?;
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

/// Answers fleet commands and announces this node with its node key, so callers know who should
/// answer and can check that it was this node that did.
async fn join_fleet(
    fleet: Arc<dyn Fleet>,
    kv: Arc<dyn Kv>,
    handle: &AgentHandle,
    cfg: &AgentConfig,
    facts: serde_json::Value,
) -> anyhow::Result<()> {
    if kv.bucket_config(NODES_BUCKET).await.is_err() {
        kv.create_bucket(NODES_BUCKET, nodes_bucket()).await.with_context(|| format!("creating the {NODES_BUCKET} bucket"))?;
    }
    let key = node_key(&cfg.state_dir).map_err(|e| anyhow::anyhow!("the node key: {e}"))?;
    let public = key.public_key();
    tracing::info!(node_key = %public, "fleet replies are signed with this node key");
    let operators: Vec<&str> = cfg.fleet.operators.iter().map(|o| o.name.as_str()).collect();
    // With fleet.allow_unsigned, the node condition set at start has said so.
    if !cfg.fleet.allow_unsigned && operators.is_empty() {
        tracing::warn!("no fleet.operators are configured: fleet requests are refused (see `hoist key new`)");
    } else if !operators.is_empty() {
        tracing::info!(operators = %operators.join(", "), "taking signed fleet requests");
    }
    let responder =
        AgentResponder { agent: handle.clone(), facts: facts.clone(), authority: Authority::new(&cfg.fleet), key, audit: fleet.clone() };
    fleet.serve(Arc::new(responder)).await.context("answering fleet requests")?;
    tokio::spawn(announce(kv, Presence { node: cfg.node.clone(), facts, key: Some(public) }));
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
