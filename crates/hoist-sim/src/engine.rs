//! A node's simulated container engine: containers outlive the agent runs that made them, as with
//! Docker. Faults: the engine going down (with or without live-restore), a container crashing, pulls
//! that fail or crawl, and broken versions (their containers exit a second after starting). Two
//! invariants are checked where they can be broken: a running, healthy container is taken down only
//! by a node holding a slot of its restart governor, and a node never runs two of one container.

use crate::world::World;
use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use hoist_core::clock::unix_now;
use hoist_core::runtime::{
    ContainerInfo, Probe, ProbeError, PullProgress, RunState, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth,
    RuntimeResult,
};
use hoist_core::spec::{ContainerSpec, LABEL_NAME, LABEL_NODE, LABEL_SPEC};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// From running to Docker's HEALTHCHECK reporting healthy.
pub const HEALTH_LATENCY: Duration = Duration::from_secs(2);
/// How long a broken version's container runs before it exits.
const BROKEN_RUNS: Duration = Duration::from_secs(1);
const START_LATENCY: Duration = Duration::from_millis(300);
/// More containers than this made on one node in one run is a loop without backoff; the engine
/// refuses further ones, so that the run ends and says so.
const RUNAWAY: u64 = 300;
/// How the panics the simulator injects begin.
pub const SIMULATED_PANIC: &str = "simulated adapter bug";

pub struct Engine {
    pub node: String,
    world: Arc<World>,
    /// The rolled-out container and its restart governor, whose slots must cover each of its
    /// containers taken down.
    governed: (String, String),
    state: Mutex<EngineState>,
    events: broadcast::Sender<RuntimeEvent>,
}

#[derive(Default)]
pub struct EngineState {
    pub containers: BTreeMap<String, ContainerInfo>,
    pulled: BTreeSet<String>,
    up: bool,
    /// Bumped when the engine goes down, ending the event streams of before.
    generation: u64,
    next_id: u64,
    /// The next pulls that fail.
    pub failing_pulls: u32,
    pub pull_latency: Duration,
    /// Image references whose containers exit soon after starting.
    pub broken: BTreeSet<String>,
    /// The next calls to the engine that panic in the caller (a bug in an adapter).
    pub panics: u32,
}

impl Engine {
    pub fn new(node: &str, world: Arc<World>, container: &str, governor: &str) -> Arc<Engine> {
        let (events, _) = broadcast::channel(256);
        let state = EngineState { up: true, pull_latency: Duration::from_secs(2), ..EngineState::default() };
        let governed = (container.to_string(), governor.to_string());
        Arc::new(Engine { node: node.into(), world, governed, state: Mutex::new(state), events })
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut EngineState) -> T) -> T {
        f(&mut self.state.lock().expect("not poisoned"))
    }

    fn emit(&self, info: &ContainerInfo, kind: RuntimeEventKind) {
        let name = info.label(LABEL_NAME).unwrap_or_default().to_string();
        let _ = self.events.send(RuntimeEvent { container_id: info.id.clone(), name, kind });
    }

    fn up(&self) -> RuntimeResult<()> {
        if self.with(|s| s.up) {
            Ok(())
        } else {
            Err(RuntimeError::Unavailable(format!("the engine of {} is down (simulated)", self.node)))
        }
    }

    fn image_id_of(image_ref: &str) -> String {
        format!("sha256:sim-{image_ref}")
    }

    /// The engine stops; without live-restore its containers stop with it.
    pub fn go_down(&self, live_restore: bool) {
        self.with(|s| {
            s.up = false;
            s.generation += 1;
            if !live_restore {
                for c in s.containers.values_mut().filter(|c| c.state == RunState::Running) {
                    c.state = RunState::Exited;
                    c.exit_code = Some(143);
                }
            }
        });
        self.world.note(format!("{} engine down (live-restore {live_restore})", self.node));
    }

    pub fn come_up(&self) {
        self.with(|s| s.up = true);
        self.world.note(format!("{} engine up", self.node));
    }

    /// The container of `name` that runs, if any, dies as a crash would.
    pub fn crash(&self, name: &str) {
        let crashed = self.with(|s| {
            let c = s.containers.values_mut().find(|c| c.label(LABEL_NAME) == Some(name) && c.state == RunState::Running)?;
            c.state = RunState::Exited;
            c.exit_code = Some(137);
            Some(c.clone())
        });
        if let Some(c) = crashed {
            self.world.note(format!("{} container {} crashed", self.node, c.id));
            self.emit(&c, RuntimeEventKind::Died { exit_code: Some(137) });
        }
    }

    /// Every container of `name`, for the checks.
    pub fn containers_of(&self, name: &str) -> Vec<ContainerInfo> {
        self.with(|s| s.containers.values().filter(|c| c.label(LABEL_NAME) == Some(name)).cloned().collect())
    }

    /// Taking down a container in service (running and healthy): only under a live slot of the
    /// restart governor held by this node. One already down, not yet healthy (hoist's own start
    /// that was superseded) or reported unhealthy may be replaced without one.
    fn check_taking_down(&self, c: &ContainerInfo) {
        let (container, governor) = &self.governed;
        let governed = c.label(LABEL_NODE) == Some(self.node.as_str()) && c.label(LABEL_NAME) == Some(container.as_str());
        if !governed || c.state != RunState::Running || c.health != RuntimeHealth::Healthy {
            return;
        }
        let holder = format!("@ {}", self.node);
        let held = self.world.view_governor(governor).is_ok_and(|g| g.leases.iter().any(|l| l.holder.ends_with(&holder)));
        if !held {
            self.world.violation(format!("{} took down running container {} ({}) without a slot of {governor}", self.node, c.id, c.image));
        }
    }

    fn remove_now(&self, id: &str) {
        let removed = self.with(|s| s.containers.remove(id));
        if let Some(c) = removed {
            if c.state == RunState::Running {
                self.emit(&c, RuntimeEventKind::Died { exit_code: Some(137) });
            }
            self.emit(&c, RuntimeEventKind::Destroyed);
        }
    }
}

/// One agent run's handle on the engine: nothing returns once that run has crashed.
pub struct EngineView {
    pub engine: Arc<Engine>,
    pub alive: Arc<AtomicBool>,
}

impl EngineView {
    async fn reach(&self) -> RuntimeResult<()> {
        if !self.alive.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.engine.up()
    }

    /// Like `reach`, for the calls a machine and its jobs make: these may panic, as an adapter's bug
    /// would, in the machine's task or a job's.
    async fn reach_or_panic(&self, call: &str) -> RuntimeResult<()> {
        self.reach().await?;
        let panics = self.engine.with(|s| {
            let panics = s.panics > 0;
            s.panics = s.panics.saturating_sub(1);
            panics
        });
        if panics {
            self.engine.world.note(format!("{} engine call {call} panics", self.engine.node));
            panic!("{SIMULATED_PANIC} in {call}");
        }
        Ok(())
    }
}

#[async_trait]
impl Runtime for EngineView {
    async fn list(&self, node: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        self.reach().await?;
        Ok(self.engine.with(|s| s.containers.values().filter(|c| c.label(LABEL_NODE) == Some(node)).cloned().collect()))
    }

    async fn find(&self, node: &str, name: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        Ok(self.list(node).await?.into_iter().filter(|c| c.label(LABEL_NAME) == Some(name)).collect())
    }

    async fn inspect(&self, id: &str) -> RuntimeResult<Option<ContainerInfo>> {
        self.reach_or_panic("inspect").await?;
        Ok(self.engine.with(|s| s.containers.get(id).cloned()))
    }

    async fn run(&self, spec: &ContainerSpec) -> RuntimeResult<ContainerInfo> {
        self.reach_or_panic("run").await?;
        let engine = &self.engine;
        let image = spec.image_ref();
        if !engine.with(|s| s.pulled.contains(&image)) {
            return Err(RuntimeError::ImageNotFound(image));
        }
        // Docker's name rule, checked as the container is created: a stopped holder of the name with
        // our labels goes first, any other holder is an error.
        let holder = engine.with(|s| s.containers.values().find(|c| c.container_name == spec.container_name).cloned());
        if let Some(old) = holder {
            if old.state == RunState::Running || old.label(LABEL_NAME) != Some(spec.name.as_str()) {
                return Err(RuntimeError::Other(format!("the name {} is in use", spec.container_name)));
            }
            engine.remove_now(&old.id);
        }
        let now = unix_now();
        let info = engine.with(|s| {
            if s.containers.values().any(|c| c.container_name == spec.container_name) {
                return Err(RuntimeError::Other(format!("the name {} is in use", spec.container_name)));
            }
            if s.next_id >= RUNAWAY {
                return Err(RuntimeError::Other(format!("{RUNAWAY} containers created: a loop without backoff")));
            }
            s.next_id += 1;
            let id = format!("{}-c{}", engine.node, s.next_id);
            let labels = BTreeMap::from([
                (LABEL_NODE.to_string(), spec.node.clone()),
                (LABEL_NAME.to_string(), spec.name.clone()),
                (LABEL_SPEC.to_string(), spec.hash()),
            ]);
            let info = ContainerInfo {
                id: id.clone(),
                container_name: spec.container_name.clone(),
                labels,
                image_id: Engine::image_id_of(&image),
                image_digest: None,
                image: image.clone(),
                state: RunState::Running,
                health: RuntimeHealth::Starting,
                exit_code: None,
                created: now,
                started_at: now,
                ip: None,
            };
            s.containers.insert(id, info.clone());
            Ok(info)
        })?;
        // The engine runs the container's health check whatever becomes of the caller.
        let broken = engine.with(|s| s.broken.contains(&image));
        if broken {
            engine.world.tried_broken(&engine.node);
        }
        let (checker, id) = (engine.clone(), info.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(if broken { BROKEN_RUNS } else { HEALTH_LATENCY }).await;
            let changed = checker.with(|s| {
                let c = s.containers.get_mut(&id).filter(|c| c.state == RunState::Running)?;
                if broken {
                    c.state = RunState::Exited;
                    c.exit_code = Some(1);
                } else {
                    c.health = RuntimeHealth::Healthy;
                }
                Some(c.clone())
            });
            if let Some(c) = changed.filter(|_| checker.up().is_ok()) {
                let kind =
                    if broken { RuntimeEventKind::Died { exit_code: Some(1) } } else { RuntimeEventKind::Health(RuntimeHealth::Healthy) };
                checker.emit(&c, kind);
            }
        });
        // Starting takes a while; the container exists (by its name) meanwhile, as with Docker.
        tokio::time::sleep(START_LATENCY).await;
        self.reach().await?;
        if info.id.ends_with(&format!("-c{RUNAWAY}")) {
            engine.world.violation(format!("{} created {RUNAWAY} containers: a restart loop without backoff", engine.node));
        }
        let running = engine.containers_of(&spec.name).iter().filter(|c| c.state == RunState::Running).count();
        if running > 1 {
            engine.world.violation(format!("{} runs {running} containers of {}", engine.node, spec.name));
        }
        engine.world.note(format!("{} started {} ({image})", engine.node, info.id));
        engine.emit(&info, RuntimeEventKind::Started);
        Ok(info)
    }

    async fn stop(&self, id: &str, _grace: Duration) -> RuntimeResult<()> {
        self.reach_or_panic("stop").await?;
        let engine = &self.engine;
        let c = engine.with(|s| s.containers.get(id).cloned()).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        engine.check_taking_down(&c);
        let stopped = engine.with(|s| {
            let c = s.containers.get_mut(id)?;
            let was_running = c.state == RunState::Running;
            c.state = RunState::Exited;
            c.exit_code = Some(0);
            was_running.then(|| c.clone())
        });
        if let Some(c) = stopped {
            engine.world.note(format!("{} stopped {}", engine.node, c.id));
            engine.emit(&c, RuntimeEventKind::Died { exit_code: Some(0) });
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> RuntimeResult<()> {
        self.reach_or_panic("remove").await?;
        if let Some(c) = self.engine.with(|s| s.containers.get(id).cloned()) {
            self.engine.check_taking_down(&c);
            self.engine.world.note(format!("{} removed {}", self.engine.node, c.id));
        }
        self.engine.remove_now(id);
        Ok(())
    }

    async fn image_id(&self, image_ref: &str) -> RuntimeResult<Option<String>> {
        self.reach_or_panic("image_id").await?;
        Ok(self.engine.with(|s| s.pulled.contains(image_ref)).then(|| Engine::image_id_of(image_ref)))
    }

    async fn pull(&self, image_ref: &str, progress: &(dyn Fn(PullProgress) + Send + Sync)) -> RuntimeResult<String> {
        self.reach_or_panic("pull").await?;
        let latency = self.engine.with(|s| s.pull_latency);
        // The first version every container runs is outside the rollout and its update governor.
        let _counted = (!image_ref.ends_with(":v1")).then(|| Pulling::begin(&self.engine.world));
        tokio::time::sleep(latency).await;
        self.reach().await?;
        let fails = self.engine.with(|s| {
            let fails = s.failing_pulls > 0;
            s.failing_pulls = s.failing_pulls.saturating_sub(1);
            fails
        });
        if fails {
            self.engine.world.note(format!("{} pull of {image_ref} failed", self.engine.node));
            return Err(RuntimeError::Pull { image: image_ref.into(), message: "the registry refused (simulated)".into() });
        }
        progress(PullProgress { layer: None, status: "Downloaded (simulated)".into(), current: None, total: None });
        if self.engine.with(|s| s.pulled.insert(image_ref.to_string()) && s.broken.contains(image_ref)) {
            self.engine.world.fetched_broken(&self.engine.node);
        }
        self.engine.world.note(format!("{} pulled {image_ref}", self.engine.node));
        Ok(Engine::image_id_of(image_ref))
    }

    async fn events(&self, _node: &str) -> RuntimeResult<BoxStream<'static, RuntimeEvent>> {
        self.reach().await?;
        let (rx, generation) = (self.engine.events.subscribe(), self.engine.with(|s| s.generation));
        let (engine, alive) = (self.engine.clone(), self.alive.clone());
        Ok(stream::unfold((rx, engine, alive), move |(mut rx, engine, alive)| async move {
            loop {
                if !alive.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                tokio::select! {
                    biased;
                    event = rx.recv() => match event {
                        Ok(event) if engine.with(|s| s.generation) == generation => return Some((event, (rx, engine, alive))),
                        Ok(_) | Err(broadcast::error::RecvError::Closed) => return None,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    },
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        if engine.with(|s| s.generation) != generation {
                            return None;
                        }
                    }
                }
            }
        })
        .boxed())
    }

    /// `check-db`, the dependency check, fails while the shared dependency is away; any other passes.
    async fn probe(&self, _container: &ContainerInfo, probe: &Probe, _timeout: Duration) -> Result<(), ProbeError> {
        match probe {
            Probe::Exec { command } if command.first().is_some_and(|c| c == "check-db") && self.engine.world.dependency_away() => {
                Err(ProbeError::Failed("the database does not answer".into()))
            }
            _ => Ok(()),
        }
    }

    /// A broken version's image fails it, as its container fails to stay up; any other passes.
    async fn preflight(&self, spec: &ContainerSpec, _timeout: Duration) -> RuntimeResult<hoist_core::preflight::Run> {
        self.reach_or_panic("preflight").await?;
        tokio::time::sleep(START_LATENCY).await;
        self.reach().await?;
        let broken = self.engine.with(|s| s.broken.contains(&spec.image_ref()));
        self.engine.world.note(format!(
            "{} preflight of {}: {}",
            self.engine.node,
            spec.image_ref(),
            if broken { "exit 1" } else { "exit 0" }
        ));
        Ok(hoist_core::preflight::Run { exit_code: Some(if broken { 1 } else { 0 }), output: String::new() })
    }
}

/// A pull of a new version, counted while under way (also when the job pulling is dropped).
struct Pulling<'w>(&'w World);

impl<'w> Pulling<'w> {
    fn begin(world: &'w World) -> Pulling<'w> {
        world.pulling(true);
        Pulling(world)
    }
}

impl Drop for Pulling<'_> {
    fn drop(&mut self) {
        self.0.pulling(false);
    }
}
