//! The fleet simulator (benchmarks only, DESIGN.md §6): N agents in one process, each the real core
//! agent and state machines talking to a real nats-server over its own connection, with only the
//! container runtime simulated in memory (`SimRuntime`). It measures a fleet-wide rollout through a
//! restart governor against the ideal ceil(N/c) rounds, and `fleet status` across all N nodes.

use crate::real::NatsServer;
use crate::report::{Row, Series, write_plot};
use anyhow::Context;
use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BucketConfig, Events, Governor, HOIST_BUCKET, Kv, tag_key};
use hoist_core::config::{
    AgentConfig, ContainerSet, DockerConfig, FleetConfig, OperatorConfig, Permission, RolloutConfig, load_containers,
};
use hoist_core::files::FileWatch;
use hoist_core::fleet::{self, AgentResponder, FleetRequest, Operation};
use hoist_core::fleet_auth::{Authority, KeyPair};
use hoist_core::fsm::State;
use hoist_core::machine::MachineDeps;
use hoist_core::persist::StateStore;
use hoist_core::presence::{self, NODES_BUCKET, Presence, announce, nodes_bucket};
use hoist_core::runtime::{
    ContainerInfo, Probe, ProbeError, PullProgress, RunState, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth,
    RuntimeResult,
};
use hoist_core::slot::SlotKeeper;
use hoist_core::spec::{ContainerSpec, LABEL_NAME, LABEL_NODE, LABEL_SPEC};
use hoist_nats::{NatsBackend, NatsOptions};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// The simulated runtime's latencies: what a real engine and registry would take.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    pub pull: Duration,
    /// From `run` to the container running.
    pub start: Duration,
    /// From running to the (simulated Docker HEALTHCHECK) reporting healthy: this is what the
    /// machine's health gate waits for before RUN releases the restart slot.
    pub health: Duration,
}

/// One node's container runtime, in memory. Each simulated agent has its own, so `list`/`events` need
/// no node filtering beyond the label check that keeps the contract honest.
pub struct SimRuntime {
    latencies: Latencies,
    /// Shared with the tasks that turn containers healthy later.
    containers: Arc<Mutex<HashMap<String, ContainerInfo>>>,
    pulled: Mutex<HashSet<String>>,
    events: broadcast::Sender<RuntimeEvent>,
    next_id: AtomicU64,
}

impl SimRuntime {
    pub fn new(latencies: Latencies) -> Arc<SimRuntime> {
        let (events, _) = broadcast::channel(64);
        Arc::new(SimRuntime { latencies, containers: Arc::default(), pulled: Mutex::default(), events, next_id: AtomicU64::new(1) })
    }

    fn emit(&self, info: &ContainerInfo, kind: RuntimeEventKind) {
        let name = info.label(LABEL_NAME).unwrap_or_default().to_string();
        // No subscriber yet (agent starting) is fine: the agent lists and inspects on start.
        let _ = self.events.send(RuntimeEvent { container_id: info.id.clone(), name, kind });
    }

    fn image_id_of(image_ref: &str) -> String {
        format!("sha256:sim-{image_ref}")
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[async_trait]
impl Runtime for SimRuntime {
    async fn list(&self, node: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        let containers = self.containers.lock().expect("not poisoned");
        Ok(containers.values().filter(|c| c.label(LABEL_NODE) == Some(node)).cloned().collect())
    }

    async fn find(&self, node: &str, name: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        Ok(self.list(node).await?.into_iter().filter(|c| c.label(LABEL_NAME) == Some(name)).collect())
    }

    async fn inspect(&self, id: &str) -> RuntimeResult<Option<ContainerInfo>> {
        Ok(self.containers.lock().expect("not poisoned").get(id).cloned())
    }

    async fn run(&self, spec: &ContainerSpec) -> RuntimeResult<ContainerInfo> {
        let image = spec.image_ref();
        if !self.pulled.lock().expect("not poisoned").contains(&image) {
            return Err(RuntimeError::ImageNotFound(image));
        }
        // Docker's name-conflict rule: a stopped holder of the name with our labels goes first.
        let holder = {
            let containers = self.containers.lock().expect("not poisoned");
            containers.values().find(|c| c.container_name == spec.container_name).cloned()
        };
        if let Some(old) = holder {
            if old.state == RunState::Running || old.label(LABEL_NAME) != Some(spec.name.as_str()) {
                return Err(RuntimeError::Other(format!("the name {} is in use", spec.container_name)));
            }
            self.remove(&old.id).await?;
        }
        tokio::time::sleep(self.latencies.start).await;
        let id = format!("sim{:012}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let labels = BTreeMap::from([
            (LABEL_NODE.to_string(), spec.node.clone()),
            (LABEL_NAME.to_string(), spec.name.clone()),
            (LABEL_SPEC.to_string(), spec.hash()),
        ]);
        let now = unix_now();
        let info = ContainerInfo {
            id: id.clone(),
            container_name: spec.container_name.clone(),
            labels,
            image_id: Self::image_id_of(&image),
            image_digest: None,
            image,
            state: RunState::Running,
            health: RuntimeHealth::Starting,
            exit_code: None,
            created: now,
            started_at: now,
            ip: None,
        };
        self.containers.lock().expect("not poisoned").insert(id.clone(), info.clone());
        self.emit(&info, RuntimeEventKind::Started);
        // The simulated HEALTHCHECK turns healthy after the health latency, as Docker would report.
        let (containers, events, health) = (self.containers.clone(), self.events.clone(), self.latencies.health);
        tokio::spawn(async move {
            tokio::time::sleep(health).await;
            let updated = {
                let mut containers = containers.lock().expect("not poisoned");
                containers.get_mut(&id).filter(|c| c.state == RunState::Running).map(|c| {
                    c.health = RuntimeHealth::Healthy;
                    c.clone()
                })
            };
            if let Some(c) = updated {
                let name = c.label(LABEL_NAME).unwrap_or_default().to_string();
                let _ = events.send(RuntimeEvent { container_id: c.id, name, kind: RuntimeEventKind::Health(RuntimeHealth::Healthy) });
            }
        });
        Ok(info)
    }

    async fn stop(&self, id: &str, _grace: Duration) -> RuntimeResult<()> {
        let stopped = {
            let mut containers = self.containers.lock().expect("not poisoned");
            let c = containers.get_mut(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            let was_running = c.state == RunState::Running;
            c.state = RunState::Exited;
            c.exit_code = Some(0);
            was_running.then(|| c.clone())
        };
        if let Some(c) = stopped {
            self.emit(&c, RuntimeEventKind::Died { exit_code: Some(0) });
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> RuntimeResult<()> {
        let removed = self.containers.lock().expect("not poisoned").remove(id);
        if let Some(c) = removed {
            if c.state == RunState::Running {
                self.emit(&c, RuntimeEventKind::Died { exit_code: Some(137) });
            }
            self.emit(&c, RuntimeEventKind::Destroyed);
        }
        Ok(())
    }

    async fn image_id(&self, image_ref: &str) -> RuntimeResult<Option<String>> {
        Ok(self.pulled.lock().expect("not poisoned").contains(image_ref).then(|| Self::image_id_of(image_ref)))
    }

    async fn pull(&self, image_ref: &str, progress: &(dyn Fn(PullProgress) + Send + Sync)) -> RuntimeResult<String> {
        tokio::time::sleep(self.latencies.pull).await;
        progress(PullProgress { layer: None, status: "Downloaded (simulated)".into(), current: None, total: None });
        self.pulled.lock().expect("not poisoned").insert(image_ref.to_string());
        Ok(Self::image_id_of(image_ref))
    }

    async fn events(&self, _node: &str) -> RuntimeResult<BoxStream<'static, RuntimeEvent>> {
        let rx = self.events.subscribe();
        Ok(stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    // A real engine drops events too; the machines re-inspect on their own schedule.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }

    async fn probe(&self, _container: &ContainerInfo, _probe: &Probe, _timeout: Duration) -> Result<(), ProbeError> {
        Ok(())
    }
}

/// `restart_files` are not part of the simulation: a file watch that never yields.
struct NoFiles;

impl FileWatch for NoFiles {
    fn watch(&self, _paths: &[PathBuf]) -> BoxStream<'static, PathBuf> {
        stream::pending().boxed()
    }
}

pub struct FleetOpts {
    pub agents: Vec<usize>,
    pub capacities: Vec<u64>,
    pub latencies: Latencies,
    /// How many agents connect and start at once.
    pub start_concurrency: usize,
}

/// One simulated agent: its handle and the presence heartbeat to stop with it.
struct SimAgent {
    handle: AgentHandle,
    announcer: tokio::task::JoinHandle<presence::Announced>,
}

const GOVERNOR: &str = "RG";
const CONTAINER: &str = "web";

pub async fn fleet(opts: &FleetOpts) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &n in &opts.agents {
        rows.extend(fleet_of(n, opts).await.with_context(|| format!("simulator with {n} agents"))?);
    }
    Ok(rows)
}

fn nats_options(url: &str, name: String) -> NatsOptions {
    NatsOptions { servers: vec![url.to_string()], name, ..NatsOptions::default() }
}

async fn fleet_of(n: usize, opts: &FleetOpts) -> anyhow::Result<Vec<Row>> {
    let scenario = format!("sim-fleet N={n}");
    let server = NatsServer::start().await?;
    let observer = Arc::new(NatsBackend::connect(nats_options(&server.url, "hoist-bench simulator observer".into())).await?);
    // Created once here; each real agent would only fill these gaps.
    observer.create_bucket(HOIST_BUCKET, BucketConfig::default()).await?;
    observer.create_bucket(NODES_BUCKET, nodes_bucket(presence::DEFAULT_NODE_RETENTION, 1)).await?;

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("containers.yaml");
    std::fs::write(
        &data,
        format!(
            "containers:\n  {CONTAINER}:\n    image: registry.sim/hoist/web\n    image_tag: v1\n    kv_update: true\n    restart_governor: {GOVERNOR}\n"
        ),
    )?;
    let set = load_containers(&[data], &serde_json::json!({})).map_err(|e| anyhow::anyhow!("{e}"))?;

    eprintln!("simulator: starting {n} agents on {}", server.url);
    let started = Instant::now();
    let agents: Vec<SimAgent> = stream::iter(0..n)
        .map(|i| start_agent(i, &server.url, dir.path(), set.clone(), opts.latencies))
        .buffer_unordered(opts.start_concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let handles: Vec<AgentHandle> = agents.iter().map(|a| a.handle.clone()).collect();
    wait_all_run(&handles, "v1", Duration::from_secs(120 + n as u64 / 5)).await?;

    let mut rows = Vec::new();
    rows.push(Row::info(
        &scenario,
        "all agents connected and RUN on v1",
        started.elapsed().as_secs_f64(),
        "s",
        format!("{n} NATS connections"),
    ));
    rows.extend(fleet_status(&scenario, &observer, n).await?);

    let mut version = 1;
    for &capacity in &opts.capacities {
        version += 1;
        rows.extend(rollout(&scenario, &observer, &handles, capacity, version, opts.latencies).await?);
    }

    // Stop the machines before the server goes, so they do not spend the next run reconnecting.
    futures_util::future::join_all(agents.iter().map(|a| {
        a.announcer.abort();
        a.handle.shutdown()
    }))
    .await;
    Ok(rows)
}

/// The operator every simulated agent takes status requests from.
static OPERATOR: std::sync::LazyLock<KeyPair> = std::sync::LazyLock::new(KeyPair::new_user);

/// Wires one agent exactly as `hoist agent` does on the NATS backend, but on a `SimRuntime`.
async fn start_agent(i: usize, url: &str, dir: &Path, set: ContainerSet, latencies: Latencies) -> anyhow::Result<SimAgent> {
    let node = format!("sim{i:05}");
    let backend = Arc::new(NatsBackend::connect(nats_options(url, format!("hoist {node}"))).await?);
    let deps = Arc::new(MachineDeps {
        runtime: SimRuntime::new(latencies),
        kv: backend.clone(),
        governor: backend.clone(),
        events: backend.clone(),
        files: Arc::new(NoFiles),
        // Each node persists its machines in its own directory, as separate machines would.
        store: StateStore::new(dir.join(&node)),
        node: node.clone(),
        docker: DockerConfig { stop_grace: Duration::from_secs(1), ..AgentConfig::defaults().docker },
        rollout: RolloutConfig {
            healthy_deadline: Duration::from_secs(300),
            // The simulated health latency is the whole gate; a hold after healthy would only add a
            // constant to every slot.
            min_healthy_time: Duration::ZERO,
            // The simulated HEALTHCHECK gates RUN; this wait applies only to containers without one.
            unverified_wait: Duration::ZERO,
            // Long enough that no waiter gives up during the largest rollout.
            governor_timeout: Duration::from_secs(3600),
            restart_backoff: Default::default(),
        },
        registration: hoist_core::config::RegistrationConfig { interval: Duration::from_secs(15), ccm: false },
        conditions: Default::default(),
        slots: SlotKeeper::start(backend.clone(), backend.clone(), node.clone()),
        outbox: hoist_core::outbox::Outbox::start(backend.clone()),
    });
    let handle = agent::start(deps, set).await;
    let kv: Arc<dyn Kv> = backend.clone();
    // Signed both ways, as a real fleet is: the status measured includes checking every signature.
    let key = KeyPair::new_server();
    let public = key.public_key();
    let fleet_config = FleetConfig {
        operators: vec![OperatorConfig {
            name: "bench".into(),
            key: OPERATOR.public_key(),
            allow: vec![Permission::Status],
            containers: vec![],
        }],
        ..FleetConfig::default()
    };
    let responder = AgentResponder {
        agent: handle.clone(),
        facts: serde_json::json!({}),
        authority: Authority::new(&fleet_config),
        key,
        audit: backend.clone(),
    };
    fleet::Fleet::serve(&*backend, Arc::new(responder)).await?;
    let announcer =
        tokio::spawn(announce(kv, Presence { node, facts: serde_json::json!({}), key: Some(public), instance: None, since_ms: None }));
    Ok(SimAgent { handle, announcer })
}

/// Polls every agent's status until all are RUN on `version`.
async fn wait_all_run(handles: &[AgentHandle], version: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let statuses = futures_util::future::join_all(handles.iter().map(|h| h.status(None))).await;
        let done = statuses.iter().filter(|s| s.machines.iter().all(|m| m.state == State::Run && m.version == version)).count();
        if done == handles.len() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {done} of {} agents reached RUN on {version} within {limit:?}", handles.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `hoist status --fleet` as the CLI does it: presence from HOIST_NODES, then scatter-gather.
async fn fleet_status(scenario: &str, observer: &NatsBackend, n: usize) -> anyhow::Result<Vec<Row>> {
    // Presence is refreshed every few seconds; wait until every node has announced itself once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while observer.keys(NODES_BUCKET).await?.len() < n {
        anyhow::ensure!(Instant::now() < deadline, "not every simulated agent announced itself");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let request = FleetRequest { filter: Default::default(), operation: Operation::Status };
    let mut times = Vec::new();
    let mut answered = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let answer = fleet::ask(observer, observer, &request, Some(&OPERATOR), Duration::from_secs(10)).await?;
        times.push(t.elapsed().as_secs_f64());
        answered = answered.max(answer.replies.len());
        anyhow::ensure!(answer.missing.is_empty(), "fleet status: {} nodes did not answer", answer.missing.len());
        anyhow::ensure!(answer.untrusted.is_empty(), "fleet status: answers not proven: {:?}", answer.untrusted);
    }
    let median = crate::report::percentile(&times, 50.0);
    let worst = times.iter().copied().fold(0.0, f64::max);
    Ok(vec![
        Row::below(scenario, "fleet status, all nodes (median of 5)", median, "s", 2.0, format!("{answered}/{n} answered")),
        Row::below(scenario, "fleet status, all nodes (worst of 5)", worst, "s", 2.0, ""),
    ])
}

/// Where each node stands during a rollout, from its transition events.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// Running the old version (in RUN, or in UPDATE pulling while the old container still runs).
    Old,
    /// Replacing: waiting for a slot, starting, or in the health gate.
    Replacing,
    New,
}

async fn rollout(
    scenario: &str,
    observer: &NatsBackend,
    handles: &[AgentHandle],
    capacity: u64,
    version: u32,
    lat: Latencies,
) -> anyhow::Result<Vec<Row>> {
    let n = handles.len();
    let tag = format!("v{version}");
    // A fresh governor per run so no lease of the previous run counts against this capacity.
    if observer.list().await?.iter().any(|g| g == GOVERNOR) {
        observer.remove(GOVERNOR).await?;
    }
    observer.add(GOVERNOR, capacity, Duration::from_secs(600), 1).await?;
    let mut events = observer.subscribe().await?;

    let slot = lat.start + lat.health;
    let rounds = n.div_ceil(capacity as usize) as u32;
    // Pulls are not governed (no update_governor), so every node pulls at once; only the slot
    // (remove, start, health gate) is serialised through the governor.
    let ideal = lat.pull + slot * rounds;
    let limit = ideal * 5 + Duration::from_secs(60);

    eprintln!("simulator: N={n} capacity {capacity}: rolling to {tag}, ideal {ideal:?}");
    let t0 = Instant::now();
    observer.put(HOIST_BUCKET, &tag_key(CONTAINER), tag.as_bytes()).await?;

    let mut phases: HashMap<String, Phase> = HashMap::new();
    let (mut old, mut replacing, mut new) = (n, 0usize, 0usize);
    let mut series: [Vec<(f64, f64)>; 3] = [vec![(0.0, n as f64)], vec![(0.0, 0.0)], vec![(0.0, 0.0)]];
    let suffix = format!(":{tag}");
    while new < n {
        let remaining = limit.saturating_sub(t0.elapsed());
        let Ok(Some(event)) = tokio::time::timeout(remaining, events.next()).await else {
            anyhow::bail!("rollout to {tag} at capacity {capacity}: {new}/{n} nodes on {tag} after {limit:?}");
        };
        if !event.image.as_deref().is_some_and(|i| i.ends_with(&suffix)) {
            continue;
        }
        let phase = match event.to_state.as_str() {
            "RUN" => Phase::New,
            "RESTART" | "START" => Phase::Replacing,
            _ => Phase::Old,
        };
        let before = phases.insert(event.identity.clone(), phase).unwrap_or(Phase::Old);
        if before == phase {
            continue;
        }
        for (p, delta) in [(before, -1isize), (phase, 1)] {
            let count = match p {
                Phase::Old => &mut old,
                Phase::Replacing => &mut replacing,
                Phase::New => &mut new,
            };
            *count = count.checked_add_signed(delta).expect("counts stay consistent");
        }
        let t = t0.elapsed().as_secs_f64();
        for (s, v) in series.iter_mut().zip([old, replacing, new]) {
            s.push((t, v as f64));
        }
    }
    let total = t0.elapsed();
    let overhead = (total.as_secs_f64() / ideal.as_secs_f64() - 1.0) * 100.0;

    let name = format!("rollout-n{n}-c{capacity}");
    let dir = PathBuf::from("target/hoist-bench");
    let [old_s, replacing_s, new_s] = series;
    write_plot(
        &dir.join(format!("{name}.csv")),
        &dir.join(format!("{name}.svg")),
        &format!("simulator: {n} agents, v{} → {tag}, restart governor capacity {capacity}", version - 1),
        &[
            Series { name: format!("on v{}", version - 1), colour: "#1f77b4", points: old_s },
            Series { name: "replacing".into(), colour: "#ff7f0e", points: replacing_s },
            Series { name: format!("on {tag}"), colour: "#2ca02c", points: new_s },
        ],
    )?;
    let note = format!(
        "ideal {:.1}s = pull {:?} + ceil({n}/{capacity})={rounds} × slot {:?}; plot target/hoist-bench/{name}.svg",
        ideal.as_secs_f64(),
        lat.pull,
        slot
    );
    Ok(vec![
        Row::info(scenario, &format!("rollout c={capacity}: total"), total.as_secs_f64(), "s", note),
        Row::at_most(scenario, &format!("rollout c={capacity}: overhead over ideal"), overhead, "%", 20.0, ""),
    ])
}
