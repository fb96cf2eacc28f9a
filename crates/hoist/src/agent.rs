//! `hoist agent`: wires the adapters into the core agent, serves the control API, and turns SIGHUP
//! and data-file changes into config reloads.

use crate::control::server::{self, Control};
use crate::inotify::Inotify;
use anyhow::Context;
use futures_util::StreamExt;
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BackendError, BucketConfig, Events, Governor, HOIST_BUCKET, Kv};
use hoist_core::config::{AgentConfig, BackendKind, load_containers};
use hoist_core::files::FileWatch;
use hoist_core::fleet::{AgentResponder, Fleet, NODES_BUCKET, Presence, announce, nodes_bucket};
use hoist_core::health::Conditions;
use hoist_core::machine::MachineDeps;
use hoist_core::persist::StateStore;
use hoist_core::registration::{SERVICES_BUCKET, services_bucket};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
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
            // A store that cannot be opened (damaged, truncated) must neither stop the agent, which
            // would leave its containers unwatched, nor be replaced by an empty one, which would roll
            // them back to their configured versions: the agent runs on, the store answering every
            // call with what is wrong and `hoist status` showing it.
            let (path, conditions) = (cfg.state_dir.join("hoist.redb"), conditions.clone());
            // Opening reads and checks the whole file.
            let store = tokio::task::spawn_blocking(move || hoist_embedded::EmbeddedStore::open_or_unavailable(&path, conditions))
                .await
                .context("opening the embedded store")?;
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
    // Refuse to start on a bad config rather than start empty: an empty set would purge what runs.
    let set = load_containers(&cfg.data, &facts).map_err(|e| anyhow::anyhow!("refusing to start, the config has errors:\n{e}"))?;
    create_state_dir(&cfg.state_dir)?;
    // Held until the process exits.
    let _lock = lock_state_dir(&cfg.state_dir)?;
    // Before anything runs, so a refused socket path changes nothing.
    let control_listener = bind_control(&cfg.control.socket, &cfg.state_dir)?;
    let backends = open_backends(&cfg, &conditions).await?;
    // Operators may have created these with their own settings (`hoist kv add`); only fill gaps.
    for (bucket, config) in [(HOIST_BUCKET, BucketConfig::default()), (SERVICES_BUCKET, services_bucket(cfg.registration.interval))] {
        match backends.kv.bucket_config(bucket).await {
            Ok(_) => {}
            // An embedded store that could not be opened, already reported as the `store` condition:
            // the containers run on without it.
            Err(e @ BackendError::Unavailable(_)) if cfg.backend == BackendKind::Embedded => {
                tracing::warn!(error = %e, bucket, "cannot check the bucket")
            }
            Err(e) => {
                tracing::debug!(error = %e, bucket, "creating the bucket");
                backends.kv.create_bucket(bucket, config).await.with_context(|| format!("creating the {bucket} bucket"))?;
            }
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
    if let Some(fleet) = &backends.fleet {
        join_fleet(&**fleet, backends.kv.clone(), &handle, &cfg, facts.clone()).await?;
    }
    let control = Control { agent: handle.clone(), kv: backends.kv, governor: backends.governor, events: backends.events, conditions };
    tokio::spawn(server::serve(control_listener, server::router(control.clone())));
    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics.listen {addr}"))?;
        tokio::spawn(server::serve(listener, server::metrics_router(control)));
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

/// The agent's own directory: created if missing, readable only by its owner and group.
fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)))
        .with_context(|| format!("creating state_dir {}", dir.display()))
}

/// One agent per state_dir: two would fight over the same containers, machine state and store.
/// The lock is the kernel's, so it goes with the process however that ends; the file says who holds it.
fn lock_state_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("agent.lock");
    // The file is truncated below, so it must not be a link to someone else's.
    if let Ok(meta) = std::fs::symlink_metadata(&path)
        && !meta.file_type().is_file()
    {
        anyhow::bail!("{} is not a regular file; refusing to use it as the agent's lock: move it away", path.display());
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "whose pid is not written yet".to_string(),
                pid => format!("pid {pid}"),
            };
            anyhow::bail!(
                "another hoist agent ({holder}) is already running on state_dir {} (it holds {}); stop it first, or give this agent its own state_dir",
                dir.display(),
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

fn bind_control(socket: &Path, state_dir: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    clear_socket_path(socket, state_dir)?;
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding control socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of control socket {}", socket.display()))?;
    Ok(listener)
}

/// Makes way for the control socket, removing only what is certainly a socket left by an agent that
/// died: whatever else is at the path (a file, a directory, a link, a live socket) may be someone's,
/// and a directory other than state_dir is the operator's to create.
fn clear_socket_path(socket: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let dir = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "the directory {} of control.socket {} does not exist: create it, or put the socket in state_dir {} (the only directory hoist creates)",
            dir.display(),
            socket.display(),
            state_dir.display()
        );
    }
    let kind = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("looking at control.socket {}", socket.display())),
    };
    if !kind.is_socket() {
        let what = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        anyhow::bail!(
            "control.socket {} is {what}, not a socket left by a hoist agent; refusing to remove it: move it away, or set control.socket to a free path",
            socket.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => anyhow::bail!(
            "something is already answering on control.socket {} (another hoist agent?); stop it, or set control.socket to a free path",
            socket.display()
        ),
        // Nobody listens: the socket of an agent that died.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket).with_context(|| format!("removing the stale control socket {}", socket.display()))?;
            tracing::info!(socket = %socket.display(), "removed the control socket of an agent that is gone");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| {
            format!("cannot tell whether control.socket {} is still in use; remove it yourself if no agent serves it", socket.display())
        }),
    }
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
