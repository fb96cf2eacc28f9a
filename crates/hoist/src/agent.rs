//! `hoist agent`: wires the adapters into the core agent, serves the control API, and turns SIGHUP
//! and data-file changes into config reloads.

use crate::control::server::{self, Control};
use crate::inotify::Inotify;
use anyhow::Context;
use futures_util::StreamExt;
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BucketConfig, Events, Governor, HOIST_BUCKET, Kv};
use hoist_core::config::{AgentConfig, BackendKind, ContainerSet, LOCAL_SYSLOG_SOCKETS, LastGood, load_containers, syslog_warning};
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
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let facts = cfg.facts();
    // What the adapters report about themselves (store failing, NATS unreachable), shown in status.
    let conditions = Conditions::default();
    tokio::fs::create_dir_all(&cfg.state_dir).await.with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let (set, refused) = initial_set(&cfg, &facts, &conditions)?;
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
    let handle = agent::start(deps, set).await;
    if let Some(refusal) = refused {
        handle.reload(Err(refusal)).await;
    }
    if let Some(fleet) = &backends.fleet {
        join_fleet(&**fleet, backends.kv.clone(), &handle, &cfg, facts.clone()).await?;
    }
    let control = Control { agent: handle.clone(), kv: backends.kv, governor: backends.governor, events: backends.events };
    serve_control(&cfg, control.clone()).await?;
    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics.listen {addr}"))?;
        tokio::spawn(async move { axum::serve(listener, server::metrics_router(control)).await });
    }
    tokio::spawn(reload_on_change(cfg.clone(), facts, handle.clone(), conditions));

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

/// Answers fleet commands and announces this node, so callers know who should answer.
async fn join_fleet(
    fleet: &dyn Fleet,
    kv: Arc<dyn Kv>,
    handle: &AgentHandle,
    cfg: &AgentConfig,
    facts: serde_json::Value,
) -> anyhow::Result<()> {
    if kv.bucket_config(NODES_BUCKET).await.is_err() {
        kv.create_bucket(NODES_BUCKET, nodes_bucket()).await.with_context(|| format!("creating the {NODES_BUCKET} bucket"))?;
    }
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

/// The set to start with: the data files' if they load (saved as the last good set), else the last
/// good set with the refusal to report. With neither there is nothing safe to run: starting empty
/// would purge what runs, so the agent refuses to start.
fn initial_set(cfg: &AgentConfig, facts: &serde_json::Value, conditions: &Conditions) -> anyhow::Result<(ContainerSet, Option<String>)> {
    let errors = match load_containers(&cfg.data, facts) {
        Ok(set) => {
            save_last_good(cfg, &set, conditions);
            check_host(cfg, &set, conditions);
            return Ok((set, None));
        }
        Err(errors) => errors,
    };
    let path = LastGood::path(&cfg.state_dir);
    match LastGood::load(&cfg.state_dir) {
        Ok(Some(last)) => {
            let saved = std::time::UNIX_EPOCH + Duration::from_secs(last.saved.max(0) as u64);
            let refusal = format!(
                "{errors}\nrefused at start; running the last good configuration instead, loaded {} and kept in {}",
                humantime::format_rfc3339_seconds(saved),
                path.display()
            );
            check_host(cfg, &last.set, conditions);
            Ok((last.set, Some(refusal)))
        }
        Ok(None) => anyhow::bail!(
            "refusing to start, the config has errors and no earlier good configuration was kept in {}:\n{errors}",
            path.display()
        ),
        Err(unusable) => {
            anyhow::bail!("refusing to start, the config has errors and the last good configuration is unusable ({unusable}):\n{errors}")
        }
    }
}

/// Keeps `set` as the last good configuration. Failing to is no reason to stop managing containers,
/// but it is reported among the node's warnings: the next start on a broken file would refuse.
fn save_last_good(cfg: &AgentConfig, set: &ContainerSet, conditions: &Conditions) {
    let problem = LastGood::save(&cfg.state_dir, set, hoist_core::machine::unix_now())
        .err()
        .map(|e| format!("cannot keep the last good configuration in {}: {e}", LastGood::path(&cfg.state_dir).display()));
    conditions.set("last_good", problem);
}

/// What the set in use will hit on this host, among the node's warnings (`hoist status`, the log).
fn check_host(cfg: &AgentConfig, set: &ContainerSet, conditions: &Conditions) {
    let docker_host = std::env::var("DOCKER_HOST").ok();
    conditions.set("syslog", syslog_warning(set, &cfg.docker, docker_host.as_deref(), &LOCAL_SYSLOG_SOCKETS));
}

/// Reloads the container data on SIGHUP or when a data file changes. A refused config leaves the
/// running set untouched and is reported in `hoist status` and the logs; an accepted one becomes the
/// last good configuration.
async fn reload_on_change(cfg: AgentConfig, facts: serde_json::Value, handle: AgentHandle, conditions: Conditions) {
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
        if let Ok(set) = &loaded {
            save_last_good(&cfg, set, &conditions);
            check_host(&cfg, set, &conditions);
        }
        handle.reload(loaded).await;
    }
}
