//! The simulated container runtime of each simulated agent (`SimRuntime`): containers in memory with
//! a real engine's latencies, and a log of what it did (`EngineStep`), the ground truth a rollout's
//! phases are plotted from.

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use hoist_core::runtime::{
    ContainerInfo, Probe, ProbeError, PullProgress, RunState, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth,
    RuntimeResult,
};
use hoist_core::spec::{ContainerSpec, LABEL_NAME, LABEL_NODE, LABEL_SPEC};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc};

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
    node: String,
    latencies: Latencies,
    log: mpsc::UnboundedSender<EngineStep>,
    /// Shared with the tasks that turn containers healthy later.
    containers: Arc<Mutex<HashMap<String, ContainerInfo>>>,
    pulled: Mutex<HashSet<String>>,
    events: broadcast::Sender<RuntimeEvent>,
    next_id: AtomicU64,
}

/// What a simulated engine did to a node's container: what an operator would see on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineDid {
    /// A running container stopped: the node serves nothing until the next one is healthy.
    Stopped,
    Started,
    Healthy,
}

#[derive(Debug, Clone)]
pub struct EngineStep {
    pub node: String,
    pub image: String,
    pub did: EngineDid,
}

impl SimRuntime {
    pub fn new(node: String, latencies: Latencies, log: mpsc::UnboundedSender<EngineStep>) -> Arc<SimRuntime> {
        let (events, _) = broadcast::channel(64);
        Arc::new(SimRuntime {
            node,
            latencies,
            log,
            containers: Arc::default(),
            pulled: Mutex::default(),
            events,
            next_id: AtomicU64::new(1),
        })
    }

    fn record(&self, image: &str, did: EngineDid) {
        let _ = self.log.send(EngineStep { node: self.node.clone(), image: image.to_string(), did });
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
        self.record(&info.image, EngineDid::Started);
        // The simulated HEALTHCHECK turns healthy after the health latency, as Docker would report.
        let (containers, events, health) = (self.containers.clone(), self.events.clone(), self.latencies.health);
        let (log, node) = (self.log.clone(), self.node.clone());
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
                let _ = log.send(EngineStep { node, image: c.image.clone(), did: EngineDid::Healthy });
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
            self.record(&c.image, EngineDid::Stopped);
            self.emit(&c, RuntimeEventKind::Died { exit_code: Some(0) });
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> RuntimeResult<()> {
        let removed = self.containers.lock().expect("not poisoned").remove(id);
        if let Some(c) = removed {
            if c.state == RunState::Running {
                self.record(&c.image, EngineDid::Stopped);
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

    /// Every simulated image passes, in the time a container takes to start.
    async fn preflight(&self, _spec: &ContainerSpec, _timeout: Duration) -> RuntimeResult<hoist_core::preflight::Run> {
        tokio::time::sleep(self.latencies.start).await;
        Ok(hoist_core::preflight::Run { exit_code: Some(0), output: String::new() })
    }
}
