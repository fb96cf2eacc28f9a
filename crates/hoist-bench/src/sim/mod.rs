//! The fleet simulator (benchmarks only, DESIGN.md §6): N agents in one process, each the real core
//! agent and state machines talking to a real nats-server, with only the container runtime simulated
//! in memory (`runtime::SimRuntime`). It measures fleet-wide rollouts through a restart governor (a tag
//! put, and a release in canary waves) against their ideal (`rollout`), `fleet status` across all N
//! nodes, and `rollout status` over all their status records.

mod rollout;
mod runtime;

use crate::real::NatsServer;
use crate::report::Row;
use anyhow::Context;
use futures_util::stream::{self, BoxStream, StreamExt};
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BucketConfig, HOIST_BUCKET, Kv, read_all_if_any};
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
use hoist_core::release::{OUTCOMES_BUCKET, conductor};
use hoist_core::rollout_status::{self, STATUS_BUCKET, status_bucket};
use hoist_core::slot::SlotKeeper;
use hoist_nats::{NatsBackend, NatsOptions};
pub use rollout::Kind;
pub use runtime::Latencies;
use runtime::{EngineStep, SimRuntime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Runs the observer's `call` until it works, up to ten times a second apart: at ten thousand agents
/// the server's JetStream API queue can time a request out, which is load to report, not a reason
/// to stop measuring.
async fn patiently<T, E: std::fmt::Display, Fut: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut call: impl FnMut() -> Fut,
) -> anyhow::Result<T> {
    let mut tries = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) if tries < 9 => {
                tries += 1;
                eprintln!("simulator: {what} failed ({e}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => anyhow::bail!("{what}: {e}"),
        }
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
    /// How the fleet is moved, each at every capacity.
    pub kinds: Vec<Kind>,
    pub latencies: Latencies,
    /// How many agents connect and start at once.
    pub start_concurrency: usize,
    /// How many agents share one NATS connection (1: each its own, as real nodes).
    pub per_connection: usize,
}

/// One simulated agent: its handle and the tasks `hoist agent` runs beside it, to stop with it.
struct SimAgent {
    handle: AgentHandle,
    beside: Vec<tokio::task::AbortHandle>,
}

const GOVERNOR: &str = "RG";
const CONTAINER: &str = "web";
const IMAGE: &str = "registry.sim/hoist/web";

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
    observer.create_bucket(STATUS_BUCKET, status_bucket(1)).await?;
    observer.create_bucket(OUTCOMES_BUCKET, BucketConfig::default()).await?;

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("containers.yaml");
    std::fs::write(
        &data,
        format!(
            "containers:\n  {CONTAINER}:\n    image: {IMAGE}\n    image_tag: v1\n    kv_update: true\n    restart_governor: {GOVERNOR}\n"
        ),
    )?;
    let set = load_containers(&[data], &serde_json::json!({})).map_err(|e| anyhow::anyhow!("{e}"))?;

    let per_connection = opts.per_connection.max(1);
    eprintln!("simulator: starting {n} agents on {}, {per_connection} per connection", server.url);
    let started = Instant::now();
    let connections: Vec<Arc<NatsBackend>> = stream::iter(0..n.div_ceil(per_connection))
        .map(|i| {
            let url = server.url.clone();
            async move { NatsBackend::connect(nats_options(&url, format!("hoist simulator connection {i}"))).await.map(Arc::new) }
        })
        .buffered(opts.start_concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let (engine_log, mut engine) = mpsc::unbounded_channel();
    let agents: Vec<SimAgent> = stream::iter(0..n)
        .map(|i| start_agent(i, connections[i / per_connection].clone(), dir.path(), set.clone(), opts.latencies, engine_log.clone()))
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
        format!("{} NATS connections", connections.len()),
    ));
    rows.extend(fleet_status(&scenario, &observer, n).await?);
    // As they are measured too: a run of ten thousand agents may not live to print its table.
    let say = |rows: &[Row]| rows.iter().for_each(|r| eprintln!("simulator: {}: {} {} ({})", r.metric, r.value, r.unit, r.note));
    say(&rows);

    let mut version = 1;
    let mut fleet = rollout::Fleet { observer: &observer, handles: &handles, engine: &mut engine, latencies: opts.latencies };
    for kind in &opts.kinds {
        for &capacity in &opts.capacities {
            version += 1;
            let measured = rows.len();
            rows.extend(rollout::rollout(&scenario, &mut fleet, kind, capacity, version).await?);
            rows.push(rollout_status(&scenario, &observer, n).await?);
            say(&rows[measured..]);
        }
    }

    // Stop the machines before the server goes, so they do not spend the next run reconnecting.
    futures_util::future::join_all(agents.iter().map(|a| {
        a.beside.iter().for_each(tokio::task::AbortHandle::abort);
        a.handle.shutdown()
    }))
    .await;
    Ok(rows)
}

/// The operator every simulated agent takes status requests from.
static OPERATOR: std::sync::LazyLock<KeyPair> = std::sync::LazyLock::new(KeyPair::new_user);

/// Wires one agent exactly as `hoist agent` does on the NATS backend, but on a `SimRuntime`.
async fn start_agent(
    i: usize,
    backend: Arc<NatsBackend>,
    dir: &Path,
    set: ContainerSet,
    latencies: Latencies,
    engine_log: mpsc::UnboundedSender<EngineStep>,
) -> anyhow::Result<SimAgent> {
    let node = format!("sim{i:05}");
    let deps = Arc::new(MachineDeps {
        runtime: SimRuntime::new(node.clone(), latencies, engine_log),
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
        background: Default::default(),
    });
    let outbox = deps.outbox.clone();
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
    let presence = Presence { node, facts: serde_json::json!({}), key: Some(public), instance: None, since_ms: None };
    let beside = vec![
        tokio::spawn(announce(kv.clone(), presence)).abort_handle(),
        tokio::spawn(rollout_status::keep_published(kv.clone(), handle.clone())).abort_handle(),
        tokio::spawn(conductor::conduct(kv.clone(), handle.clone())).abort_handle(),
        tokio::spawn(hoist_core::degraded::lookout::keep_watch(kv, handle.clone(), outbox, Default::default())).abort_handle(),
    ];
    Ok(SimAgent { handle, beside })
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
    while patiently("listing the presence keys", || observer.keys(NODES_BUCKET)).await?.len() < n {
        anyhow::ensure!(Instant::now() < deadline, "not every simulated agent announced itself");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let request = FleetRequest { filter: Default::default(), operation: Operation::Status };
    let mut times = Vec::new();
    let (mut answered, mut unproven) = (0, 0);
    for _ in 0..5 {
        let t = Instant::now();
        let answer = fleet::ask(observer, observer, &request, Some(&OPERATOR), Duration::from_secs(10)).await?;
        times.push(t.elapsed().as_secs_f64());
        answered = answered.max(answer.replies.len());
        // Counted, not fatal: at ten thousand nodes a presence read under load can miss a node, whose
        // answer then cannot be proven; how many is part of the measurement.
        unproven = unproven.max(answer.untrusted.len() + answer.missing.len());
    }
    let median = crate::report::percentile(&times, 50.0);
    let worst = times.iter().copied().fold(0.0, f64::max);
    Ok(vec![
        Row::below(
            scenario,
            "fleet status, all nodes (median of 5)",
            median,
            "s",
            2.0,
            format!("{answered}/{n} answered; at most {unproven} missing or not proven"),
        ),
        Row::below(scenario, "fleet status, all nodes (worst of 5)", worst, "s", 2.0, ""),
    ])
}

/// `hoist rollout status web` as the CLI does it: the status and outcome buckets read once each, and
/// summarized. Its bar (issue #13) is 1 s.
async fn rollout_status(scenario: &str, observer: &NatsBackend, n: usize) -> anyhow::Result<Row> {
    let t = Instant::now();
    let entries = patiently("reading the status records", || read_all_if_any(observer, STATUS_BUCKET)).await?;
    let outcomes = patiently("reading the outcomes", || read_all_if_any(observer, OUTCOMES_BUCKET)).await?;
    let record = patiently("reading the release", || hoist_core::release::current(observer, CONTAINER)).await?.map(|(r, _)| r);
    let summary = rollout_status::summarize(CONTAINER, &entries, record, &outcomes, hoist_core::clock::unix_now_ms());
    let took = t.elapsed().as_secs_f64();
    Ok(Row::below(scenario, "rollout status, all nodes", took, "s", 1.0, format!("{}/{n} status records", summary.nodes)))
}
