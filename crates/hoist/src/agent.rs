//! `hoist agent`: wires the adapters into the core agent, serves the control API, and turns SIGHUP
//! and data-file changes into config reloads.

use crate::control::server::{self, Control};
use crate::inotify::Inotify;
use crate::node_claim::{self, Member, instance_id};
use crate::state_dir;
use anyhow::Context;
use futures_util::StreamExt;
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BucketConfig, Events, Governor, HOIST_BUCKET, Kv};
use hoist_core::config::{
    AgentConfig, BackendKind, ConfigErrors, ContainerSet, Ensure, LOCAL_SYSLOG_SOCKETS, LastGood, load_containers, syslog_warning,
};
use hoist_core::degraded;
use hoist_core::files::FileWatch;
use hoist_core::fleet::Fleet;
use hoist_core::fleet_auth::{KeyPair, node_key};
use hoist_core::health::Conditions;
use hoist_core::machine::MachineDeps;
use hoist_core::persist::StateStore;
use hoist_core::presence::{NODES_BUCKET, nodes_bucket};
use hoist_core::registration::{SERVICES_BUCKET, services_bucket};
use hoist_core::release::{OUTCOMES_BUCKET, conductor};
use hoist_core::rollout_status::{self, STATUS_BUCKET, status_bucket};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

struct Backends {
    kv: Arc<dyn Kv>,
    governor: Arc<dyn Governor>,
    events: Arc<dyn Events>,
    /// Only a shared backend has a fleet to answer.
    fleet: Option<Arc<dyn Fleet>>,
    /// Copies of each bucket the agent creates (the embedded store keeps one whatever is asked), known
    /// once the backend answers: a NATS cluster's size is learnt on connecting.
    replicas: Replicas,
}

/// How many copies the agent asks for, read when it creates or checks something.
type Replicas = Arc<dyn Fn() -> u8 + Send + Sync>;

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
            Ok(Backends {
                kv: Arc::new(store.clone()),
                governor: Arc::new(store.clone()),
                events: Arc::new(store),
                fleet: None,
                replicas: Arc::new(|| 1),
            })
        }
        BackendKind::Nats => {
            // In the background: an agent starts, adopts and keeps its containers while NATS is down,
            // and catches up once it answers.
            let options =
                hoist_nats::NatsOptions { connect_in_background: true, conditions: Some(conditions.clone()), ..nats_options(cfg) };
            let backend = Arc::new(hoist_nats::NatsBackend::connect(options).await.context("connecting to NATS")?);
            let (nats, cfg) = (backend.clone(), cfg.clone());
            let replicas: Replicas = Arc::new(move || replicas(&cfg, &nats));
            Ok(Backends { kv: backend.clone(), governor: backend.clone(), events: backend.clone(), fleet: Some(backend), replicas })
        }
    }
}

/// `nats.replicas`, or one copy per server of the cluster up to 3: a bucket or governor kept on one
/// server stops working with that server, and three copies already survive the loss of any one.
pub fn replicas(cfg: &AgentConfig, nats: &hoist_nats::NatsBackend) -> u8 {
    cfg.nats.replicas.unwrap_or_else(|| u8::try_from(nats.cluster_size().min(3)).expect("at most 3"))
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
        inbox_prefix: n.inbox_prefix.clone(),
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let facts = cfg.facts();
    // What the adapters report about themselves (store failing, NATS unreachable), shown in status.
    let conditions = Conditions::default();
    state_dir::create_state_dir(&cfg.state_dir)?;
    // Held until the process exits.
    let _lock = state_dir::lock_state_dir(&cfg.state_dir)?;
    // Before anything runs, so a refused socket path changes nothing.
    let control_listener = state_dir::bind_control(&cfg.control.socket, &cfg.state_dir)?;
    let (set, refused) = initial_set(&cfg, &facts, &conditions)?;
    // Registered before anything can stand by, so a SIGHUP meanwhile does not end the agent.
    let hup = signal(SignalKind::hangup())?;
    let backends = open_backends(&cfg, &conditions).await?;
    // Every loop the agent runs beside its machines, ended with it.
    let mut loops = JoinSet::new();
    loops.spawn(ensure_buckets(backends.kv.clone(), backends.replicas.clone(), cfg.clone(), backends.fleet.is_some()));
    let member = match &backends.fleet {
        Some(fleet) => Some(Member { fleet: fleet.clone(), instance: instance_id(&cfg.state_dir)? }),
        None => None,
    };
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
        registration: cfg.registration.clone(),
        conditions: conditions.clone(),
        slots: hoist_core::slot::SlotKeeper::start(backends.governor.clone(), backends.events.clone(), cfg.node.clone()),
        outbox: hoist_core::outbox::Outbox::start(backends.events.clone()),
        background: Default::default(),
    });
    if backends.fleet.is_some() && cfg.fleet.allow_unsigned {
        // Shown in `hoist status` for as long as it is so, not only logged once.
        conditions.set("fleet", Some("unsigned fleet requests are accepted (fleet.allow_unsigned)".into()));
    }
    let (sets, _) = watch::channel(set.clone());
    if member.is_some() {
        let (kv, governor, replicas) = (backends.kv.clone(), backends.governor.clone(), backends.replicas.clone());
        loops.spawn(warn_short_replicas(kv, governor, replicas, conditions.clone(), sets.subscribe()));
    }
    // Before anything is managed: another machine may already run this node name (`node_claim`).
    let key = match &member {
        Some(_) => Some(node_key(&cfg.state_dir).map_err(|e| anyhow::anyhow!("the node key: {e}"))?),
        None => None,
    };
    let public = key.as_ref().map(KeyPair::public_key);
    let holder = match (&member, &public) {
        (Some(m), Some(public)) => node_claim::rival(&*backends.kv, &m.claim(&cfg, &facts, public.clone())).await,
        _ => None,
    };
    // Standing by, the agent starts with nothing to manage and purge off, so it touches no container;
    // it still serves `hoist status`, which says why.
    let initial = if holder.is_some() { ContainerSet::default() } else { set };
    tracing::info!(node = %cfg.node, containers = initial.containers.len(), "starting agent");
    let outbox = deps.outbox.clone();
    let handle = agent::start(deps, initial).await;
    if let Some(refusal) = refused {
        handle.reload(Err(refusal)).await;
    }
    let workload = Arc::new(Workload::new(handle.clone(), sets, cfg.clone(), facts.clone(), conditions.clone()));
    if let (Some(m), Some(holder)) = (&member, &holder) {
        workload.stand_by(node_claim::standby_reason(&cfg.node, &m.instance, holder)).await;
    }
    if let (Some(m), Some(key)) = (&member, key) {
        node_claim::serve_fleet(m, &handle, &cfg, &facts, workload.answering(), key).await?;
    }
    let control = Control {
        agent: handle.clone(),
        kv: backends.kv.clone(),
        governor: backends.governor,
        events: backends.events,
        conditions: conditions.clone(),
    };
    loops.spawn(server::serve(control_listener, server::router(control.clone())));
    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics.listen {addr}"))?;
        loops.spawn(server::serve(listener, server::metrics_router(control)));
    }
    loops.spawn(rollout_status::keep_published(backends.kv.clone(), handle.clone()));
    loops.spawn(conductor::conduct(backends.kv.clone(), handle.clone()));
    loops.spawn(degraded::lookout::keep_watch(backends.kv.clone(), handle.clone(), outbox, cfg.fleet.degraded));
    if let (Some(member), Some(public)) = (member, public) {
        loops.spawn(node_claim::hold_node(member, backends.kv, cfg.clone(), facts.clone(), public, workload.clone(), holder));
    }
    loops.spawn(reload_on_change(workload, hup));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down; containers keep running and are adopted on the next start");
    handle.shutdown().await;
    loops.shutdown().await;
    let _ = std::fs::remove_file(&cfg.control.socket);
    Ok(())
}

/// Creates the buckets the agent needs, trying again while the backend does not answer: the agent
/// does not wait for it, its machines run on their persisted state meanwhile. Operators may have
/// created HOIST and CHORIA_SERVICES with their own settings (`hoist kv add`); only gaps are filled.
async fn ensure_buckets(kv: Arc<dyn Kv>, replicas: Replicas, cfg: AgentConfig, fleet: bool) {
    let mut wait = Duration::from_millis(500);
    loop {
        let created = async {
            // Asked only once the backend has answered: a NATS cluster's size is known from then on.
            let answered = kv.bucket_config(HOIST_BUCKET).await;
            let replicas = replicas();
            let hoist = BucketConfig { replicas, ..BucketConfig::default() };
            let services = services_bucket(cfg.registration.interval, replicas);
            if answered.is_err() {
                kv.create_bucket(HOIST_BUCKET, hoist).await.map_err(|e| (HOIST_BUCKET, e))?;
            }
            if kv.bucket_config(SERVICES_BUCKET).await.is_err() {
                kv.create_bucket(SERVICES_BUCKET, services).await.map_err(|e| (SERVICES_BUCKET, e))?;
            }
            if fleet {
                ensure_nodes_bucket(&*kv, &cfg, replicas).await.map_err(|e| (NODES_BUCKET, e))?;
            }
            // Last: the rollout view and releases are what the agent can best do without.
            if kv.bucket_config(STATUS_BUCKET).await.is_err() {
                kv.create_bucket(STATUS_BUCKET, status_bucket(replicas)).await.map_err(|e| (STATUS_BUCKET, e))?;
            }
            if kv.bucket_config(OUTCOMES_BUCKET).await.is_err() {
                let outcomes = BucketConfig { history: 1, ttl: None, replicas };
                kv.create_bucket(OUTCOMES_BUCKET, outcomes).await.map_err(|e| (OUTCOMES_BUCKET, e))?;
            }
            Ok::<(), (&str, hoist_core::backend::BackendError)>(())
        };
        match created.await {
            Ok(()) => return,
            Err((bucket, e)) => tracing::debug!(error = %e, bucket, "could not create the bucket yet; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// `HOIST_NODES` belongs to the agents: its TTL is how long a silent node stays listed, so an existing
/// bucket is brought to this agent's `fleet.node_retention` and replica count.
async fn ensure_nodes_bucket(kv: &dyn Kv, cfg: &AgentConfig, replicas: u8) -> Result<(), hoist_core::backend::BackendError> {
    let wanted = nodes_bucket(cfg.fleet.node_retention, replicas);
    match kv.bucket_config(NODES_BUCKET).await {
        Ok(have) if have == wanted => {}
        Ok(have) => {
            tracing::info!(bucket = NODES_BUCKET, ?have, ?wanted, "updating the bucket's settings");
            // The bucket works as it is; a cluster that cannot move replicas right now is no reason to stop.
            if let Err(e) = kv.create_bucket(NODES_BUCKET, wanted).await {
                tracing::warn!(bucket = NODES_BUCKET, error = %e, "could not update the bucket's settings");
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, bucket = NODES_BUCKET, "creating the bucket");
            kv.create_bucket(NODES_BUCKET, wanted).await?;
        }
    }
    Ok(())
}

/// Warns, in status and the log, while a bucket or governor the containers use keeps fewer copies
/// than the agent creates its own with: it stops working with the one server that holds it. Checked
/// at every config change and every 30 s, since operators change them under a running agent.
async fn warn_short_replicas(
    kv: Arc<dyn Kv>,
    governor: Arc<dyn Governor>,
    replicas: Replicas,
    conditions: Conditions,
    mut sets: watch::Receiver<ContainerSet>,
) {
    loop {
        let want = replicas();
        let set = sets.borrow_and_update().clone();
        let used = set.containers.values().filter(|c| c.ensure == Ensure::Present);
        let mut buckets = BTreeSet::new();
        let mut governors = BTreeSet::new();
        for c in used {
            if c.kv_update {
                buckets.insert(HOIST_BUCKET);
            }
            if !c.register_ports.is_empty() {
                buckets.insert(SERVICES_BUCKET);
            }
            governors.extend(c.restart_governor.iter().chain(&c.update_governor).cloned());
        }
        let mut short = Vec::new();
        for bucket in buckets {
            if let Ok(c) = kv.bucket_config(bucket).await
                && c.replicas < want
            {
                let ttl = c.ttl.map(|t| format!(" --ttl {}", compact(t))).unwrap_or_default();
                short.push(format!(
                    "bucket {bucket} has {} replica(s) where the cluster could keep {want} (`hoist kv add {bucket} --history {}{ttl} --replicas {want}`)",
                    c.replicas, c.history
                ));
            }
        }
        for name in governors {
            if let Ok(g) = governor.view(&name).await
                && g.replicas < want
            {
                short.push(format!(
                    "governor {name} has {} replica(s) where the cluster could keep {want} (`hoist governor add {name} {} {} --replicas {want}`)",
                    g.replicas,
                    g.capacity,
                    compact(g.expire)
                ));
            }
        }
        let problem = (!short.is_empty()).then(|| format!("{}; each stops working if the server holding it is lost", short.join("; ")));
        conditions.set("replicas", problem);
        tokio::select! {
            changed = sets.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// `1m30s`: a duration as the CLI takes it back, without the spaces humantime puts in.
fn compact(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
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
    let problem = LastGood::save(&cfg.state_dir, set, hoist_core::clock::unix_now())
        .err()
        .map(|e| format!("cannot keep the last good configuration in {}: {e}", LastGood::path(&cfg.state_dir).display()));
    conditions.set("last_good", problem);
}

/// What the set in use will hit on this host, among the node's warnings (`hoist status`, the log).
fn check_host(cfg: &AgentConfig, set: &ContainerSet, conditions: &Conditions) {
    let docker_host = std::env::var("DOCKER_HOST").ok();
    conditions.set("syslog", syslog_warning(set, &cfg.docker, docker_host.as_deref(), &LOCAL_SYSLOG_SOCKETS));
}

/// What the agent manages: the data files' container set, or nothing while another machine runs this
/// node name (`node_claim`). Every reload and every change of standing goes through here, one at a
/// time, so a reload cannot hand a standing-by agent its containers.
pub(crate) struct Workload {
    handle: AgentHandle,
    /// The set in use, for the checks that follow the config.
    sets: watch::Sender<ContainerSet>,
    cfg: AgentConfig,
    facts: serde_json::Value,
    conditions: Conditions,
    standing_by: tokio::sync::Mutex<bool>,
    /// Whether fleet requests are answered: not while standing by.
    answering: Arc<AtomicBool>,
}

impl Workload {
    fn new(
        handle: AgentHandle,
        sets: watch::Sender<ContainerSet>,
        cfg: AgentConfig,
        facts: serde_json::Value,
        conditions: Conditions,
    ) -> Self {
        let answering = Arc::new(AtomicBool::new(true));
        Workload { handle, sets, cfg, facts, conditions, standing_by: tokio::sync::Mutex::new(false), answering }
    }

    fn answering(&self) -> Arc<AtomicBool> {
        self.answering.clone()
    }

    /// Hands a freshly loaded set (or why it was refused) to the agent, unless standing by, and an
    /// accepted one to the checks that follow the config; an accepted one becomes the last good one.
    async fn reload(&self, loaded: Result<ContainerSet, ConfigErrors>) {
        let standing_by = self.standing_by.lock().await;
        self.hand_over(loaded, *standing_by).await;
    }

    async fn hand_over(&self, loaded: Result<ContainerSet, ConfigErrors>, standing_by: bool) {
        if let Ok(set) = &loaded {
            save_last_good(&self.cfg, set, &self.conditions);
            check_host(&self.cfg, set, &self.conditions);
            self.sets.send_replace(set.clone());
        }
        if !standing_by {
            self.handle.reload(loaded.map_err(|e| e.to_string())).await;
        }
    }

    /// Stops managing (containers are left as they run, purge off) and answering, saying why.
    pub(crate) async fn stand_by(&self, reason: String) {
        let mut standing_by = self.standing_by.lock().await;
        *standing_by = true;
        self.answering.store(false, Ordering::SeqCst);
        self.standing_by_because(reason);
        self.handle.reload(Ok(ContainerSet::default())).await;
    }

    /// Why the agent stands by, in `hoist status`.
    pub(crate) fn standing_by_because(&self, reason: String) {
        self.conditions.set("standby", Some(reason));
    }

    /// Manages the node's containers again (adopting what runs) and answers for it.
    pub(crate) async fn take_over(&self) {
        let mut standing_by = self.standing_by.lock().await;
        *standing_by = false;
        self.conditions.set("standby", None);
        self.hand_over(load_containers(&self.cfg.data, &self.facts), false).await;
        self.answering.store(true, Ordering::SeqCst);
    }
}

/// Reloads the container data on SIGHUP or when a data file changes. A refused config leaves the
/// running set untouched and is reported in `hoist status` and the logs.
async fn reload_on_change(workload: Arc<Workload>, mut hup: tokio::signal::unix::Signal) {
    let mut changes = Inotify.watch(&workload.cfg.data);
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            Some(_) = changes.next() => "data file changed",
        };
        // Let an editor or config management finish writing every file before reading them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tracing::info!(reason = why, "reloading container config");
        workload.reload(load_containers(&workload.cfg.data, &workload.facts)).await;
    }
}
