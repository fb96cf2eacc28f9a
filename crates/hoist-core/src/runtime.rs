//! The container runtime as the state machines see it. `hoist-docker` implements it on the Docker
//! Engine API; the fleet simulator (benchmarks only) implements it in memory.

use crate::spec::ContainerSpec;
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
}

/// Health as the runtime itself reports it (Docker's HEALTHCHECK). `None` means the image has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeHealth {
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// One container as inspected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    /// Docker's name, without the leading slash.
    pub container_name: String,
    /// All labels; hoist's are `spec::LABEL_*`.
    pub labels: BTreeMap<String, String>,
    /// The image reference the container was created from (`repo:tag` / `repo@digest`).
    pub image: String,
    /// The content id of that image (`sha256:…`).
    pub image_id: String,
    /// The registry's digest of that image for the container's repository (`sha256:…`), when the
    /// runtime knows it: what a tag such as `latest` resolved to. None for an image never pulled.
    #[serde(default)]
    pub image_digest: Option<String>,
    pub state: RunState,
    pub health: RuntimeHealth,
    pub exit_code: Option<i64>,
    /// Unix seconds of creation and of the last start (0 if never started).
    pub created: i64,
    pub started_at: i64,
    /// The container's address on its network, for http/tcp probes; None when it has none (host
    /// network uses 127.0.0.1).
    pub ip: Option<IpAddr>,
}

impl ContainerInfo {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// A change reported by the runtime's event stream, already narrowed to hoist's containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    pub container_id: String,
    /// The `io.hoist.name` label.
    pub name: String,
    pub kind: RuntimeEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeEventKind {
    Started,
    /// The main process ended (exit, kill, OOM); `exit_code` as Docker reports it.
    Died {
        exit_code: Option<i64>,
    },
    Health(RuntimeHealth),
    Destroyed,
}

/// Progress of a pull, for progress bars and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    pub layer: Option<String>,
    pub status: String,
    pub current: Option<u64>,
    pub total: Option<u64>,
}

/// A probe the agent runs against a container (the optional `health_check` of a definition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Probe {
    /// GET `path` on the container's `port`; any 2xx or 3xx passes.
    Http { port: u16, path: String },
    /// A TCP connect to the container's `port`.
    Tcp { port: u16 },
    /// `command` run inside the container; exit 0 passes.
    Exec { command: Vec<String> },
}

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The container failed the check.
    #[error("{0}")]
    Failed(String),
    /// The runtime could not be asked (exec probes run through it): no verdict on the container.
    #[error("container runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    /// The probe could not run for a reason of this host (out of file descriptors or memory): no
    /// verdict on the container, which may be serving fine.
    #[error("probe could not run on this host: {0}")]
    Local(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("container {0} not found")]
    NotFound(String),
    #[error("pull of {image} failed: {message}")]
    Pull { image: String, message: String },
    #[error("container runtime unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

pub type RuntimeResult<T> = Result<T, RuntimeError>;

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Every container labelled `io.hoist.node=<node>`, running or not.
    async fn list(&self, node: &str) -> RuntimeResult<Vec<ContainerInfo>>;
    /// The containers of one hoist container: labelled `io.hoist.node=<node>` and `io.hoist.name=<name>`.
    async fn find(&self, node: &str, name: &str) -> RuntimeResult<Vec<ContainerInfo>>;
    /// None if it does not exist.
    async fn inspect(&self, id: &str) -> RuntimeResult<Option<ContainerInfo>>;
    /// Creates and starts a container from the spec, with hoist's labels. A stopped container holding
    /// the same name is removed first when it carries the same `io.hoist.node`/`io.hoist.name`; any
    /// other holder of the name is an error (hoist never removes what is not its own).
    async fn run(&self, spec: &ContainerSpec) -> RuntimeResult<ContainerInfo>;
    /// Stops gracefully within `grace`, then kills.
    async fn stop(&self, id: &str, grace: Duration) -> RuntimeResult<()>;
    /// Force-removes; a missing container is not an error.
    async fn remove(&self, id: &str) -> RuntimeResult<()>;
    /// The local image's content id, if the image is present.
    async fn image_id(&self, image_ref: &str) -> RuntimeResult<Option<String>>;
    /// Pulls an image, reporting progress; returns the pulled image's content id.
    async fn pull(&self, image_ref: &str, progress: &(dyn Fn(PullProgress) + Send + Sync)) -> RuntimeResult<String>;

    /// Events for containers labelled `io.hoist.node=<node>`: Err if the runtime cannot be reached
    /// now; the stream ends when it goes away, and the caller reconnects and re-inspects.
    async fn events(&self, node: &str) -> RuntimeResult<BoxStream<'static, RuntimeEvent>>;
    /// Runs a probe against a running container; Err carries the reason it failed.
    async fn probe(&self, container: &ContainerInfo, probe: &Probe, timeout: Duration) -> Result<(), ProbeError>;
    /// Runs `spec` (a `preflight::spec`) to its end or its `timeout`, then removes it whatever
    /// happened; how it ended. Err: it could not be run at all (the engine unreachable, say).
    async fn preflight(&self, spec: &ContainerSpec, timeout: Duration) -> RuntimeResult<crate::preflight::Run>;
}
