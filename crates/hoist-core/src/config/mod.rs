//! Configuration: the agent file and the container data files (Hiera form `hoist::containers` /
//! `hoist::purge`, or plain `containers:` / `purge:`), merged, interpolated and validated into typed
//! values. Every error names the file, the container and the field.

use crate::backoff::BackoffConfig;
use crate::runtime::Probe;
use crate::spec::{ContainerSpec, EnvVar, ImageVersion, PortMapping, VolumeMount};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the agent looks when no `--config` is given.
pub const DEFAULT_AGENT_FILE: &str = "/etc/hoist/hoist.yaml";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    /// The file this was read from (None for built-in defaults).
    pub path: Option<PathBuf>,
    /// This node's identity; default: the hostname.
    pub node: String,
    /// Machine state and the embedded store live here; default `/var/lib/hoist`.
    pub state_dir: PathBuf,
    /// Container data files and directories (`*.yaml`/`*.yml` inside, sorted), merged in order so later
    /// files win. Default: `containers.d` beside the agent file. Relative paths are relative to the agent file.
    pub data: Vec<PathBuf>,
    pub docker: DockerConfig,
    pub backend: BackendKind,
    /// Used when `backend: nats`.
    pub nats: NatsConfig,
    /// User facts, merged over the built-in `hostname` and `networking.ip`.
    pub facts: serde_json::Value,
    pub registration: RegistrationConfig,
    pub control: ControlConfig,
    pub metrics: MetricsConfig,
    pub rollout: RolloutConfig,
    pub fleet: FleetConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DockerConfig {
    /// `unix:///var/run/docker.sock`, `tcp://host:2375`; default: `DOCKER_HOST` or the local socket.
    pub host: Option<String>,
    /// Docker container names are `<name_prefix><name>`; default `hoist_` as in the original module.
    pub name_prefix: String,
    /// How long `docker stop` waits before it kills; default 10 s.
    pub stop_grace: Duration,
    /// How old a labelled container that is declared nowhere must be before purge removes it; default
    /// 60 s, so a container someone is creating right now is not taken from under them.
    pub purge_grace: Duration,
    /// Where containers with `syslog: true` send their output (`udp://host:514`, `unix:///dev/log`…);
    /// default: Docker's own default, the local syslog socket.
    pub syslog_address: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Embedded,
    Nats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct NatsConfig {
    pub servers: Vec<String>,
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
    pub token: Option<String>,
    pub tls: Option<TlsConfig>,
    /// Governor subjects are `<collective>.governor.<name>`; default `mcollective` as Choria's.
    pub collective: String,
    /// Copies of each bucket and governor hoist creates; default: as many servers as the cluster has,
    /// up to 3.
    pub replicas: Option<u8>,
    /// Reply subjects start with `<inbox_prefix>.`; agents answer fleet requests only there. Default
    /// `_INBOX`, NATS's own.
    pub inbox_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsConfig {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistrationConfig {
    /// Default 15 s.
    pub interval: Duration,
    /// Also publish each entry on choria-io/ccm's registration subject (NATS backend only).
    pub ccm: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlConfig {
    /// Default `<state_dir>/hoist.sock`.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsConfig {
    /// e.g. `127.0.0.1:9464`; None serves metrics only on the control socket.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutConfig {
    /// A new container must pass its health gate within this; default 5 min.
    pub healthy_deadline: Duration,
    /// A container with a health check must stay healthy this long before its gate passes (and its
    /// governor slot is released); default 10 s.
    pub min_healthy_time: Duration,
    /// How long to wait (and call it "unverified") when a container has no health check at all; default 10 s.
    pub unverified_wait: Duration,
    /// How long `acquire` waits for a governor slot before the attempt fails and is retried; default 5 min.
    pub governor_timeout: Duration,
    /// The crash backoff of every container that sets none of its own.
    pub restart_backoff: BackoffConfig,
}

/// The `fleet:` section: how the fleet remembers its nodes, who may command this node, and (for the
/// CLI) which key signs its requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetConfig {
    /// How long a node that stopped announcing itself stays listed (as missing) before it is
    /// forgotten: the TTL of `HOIST_NODES`. Default 7 days.
    pub node_retention: Duration,
    /// The operator's seed file (`hoist key new`) the CLI signs fleet requests with.
    pub key: Option<PathBuf>,
    /// The keys this agent takes fleet requests from.
    pub operators: Vec<OperatorConfig>,
    /// Take requests from anyone who can publish on the fleet subjects, signed or not (labs only);
    /// default false.
    pub allow_unsigned: bool,
    /// How far a request's time may be from this node's; default 30 s.
    pub max_clock_skew: Duration,
    /// When many nodes failing together is a shared outage (`degraded`).
    pub degraded: crate::degraded::DegradedPolicy,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            node_retention: crate::presence::DEFAULT_NODE_RETENTION,
            key: None,
            operators: Vec::new(),
            allow_unsigned: false,
            max_clock_skew: Duration::from_secs(30),
            degraded: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperatorConfig {
    /// Who this is, in logs and audit events.
    pub name: String,
    /// The public key (`U…`) as `hoist key new` prints it.
    pub key: String,
    pub allow: Vec<Permission>,
    /// Only these containers; empty = all.
    pub containers: Vec<String>,
}

/// What an operator may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Status,
    /// Every transition.
    Transition,
    /// One transition, e.g. `restart`.
    Only(crate::fsm::Transition),
}

impl Permission {
    pub fn allows(&self, operation: &crate::fleet::Operation) -> bool {
        use crate::fleet::Operation;
        match (self, operation) {
            (Permission::Status, Operation::Status) => true,
            (Permission::Transition, Operation::Transition { .. }) => true,
            (Permission::Only(only), Operation::Transition { transition }) => only == transition,
            _ => false,
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permission::Status => f.write_str("status"),
            Permission::Transition => f.write_str("transition"),
            Permission::Only(t) => write!(f, "{t}"),
        }
    }
}

impl std::str::FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "status" => Ok(Permission::Status),
            "transition" => Ok(Permission::Transition),
            other => other
                .parse()
                .map(Permission::Only)
                .map_err(|_| format!("{other:?} is not a permission: use status, transition, or one transition such as restart")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ensure {
    Present,
    Absent,
}

/// One container definition after merging, interpolation and validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerConfig {
    pub name: String,
    pub ensure: Ensure,
    pub image: String,
    /// `image_tag`, default `latest`; the KV may override it when `kv_update` is on.
    pub image_tag: ImageVersion,
    /// `command` (a string split into words like a shell would, or a list).
    pub command: Vec<String>,
    /// `entrypoint` (a string is the single executable, as `docker run --entrypoint`; or a list).
    pub entrypoint: Vec<String>,
    pub network: String,
    pub syslog: bool,
    pub kv_update: bool,
    /// `kv_interval` in seconds (default 10): how often the agent re-reads the tag besides its watch.
    pub kv_interval: Duration,
    pub restart_governor: Option<String>,
    pub update_governor: Option<String>,
    pub restart_files: Vec<PathBuf>,
    pub ports: Vec<PortMapping>,
    pub volumes: Vec<VolumeMount>,
    pub environment: Vec<EnvVar>,
    pub register_ports: Vec<Registration>,
    /// Liveness: failing it restarts the container (and fails a new version's gate).
    pub health_check: Option<HealthCheck>,
    /// Report-only: what the container says of its dependencies; shown in status, counted by
    /// fleet-degraded mode, never a restart.
    pub dependency_check: Option<HealthCheck>,
    /// The signal that asks the container to stop (`SIGTERM`, `SIGQUIT`…); None: the image's
    /// `STOPSIGNAL`, else SIGTERM.
    pub stop_signal: Option<String>,
    /// How long a stop waits for the container to exit before it is killed; None: `docker.stop_grace`.
    pub stop_grace: Option<Duration>,
    /// None: `rollout.restart_backoff`.
    pub restart_backoff: Option<BackoffConfig>,
    /// Run once in a new version's image before it replaces the running container.
    pub preflight: Option<Preflight>,
    /// The files that contributed to this definition, in merge order (for messages).
    pub sources: Vec<PathBuf>,
}

/// A `register_ports` entry; published as `{"cluster","service","protocol","address","port","priority","annotations"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub cluster: String,
    pub service: String,
    pub protocol: String,
    /// The config field is `ip`; it is published as `address`.
    pub ip: String,
    pub port: u16,
    pub priority: u32,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    /// Default 10 s.
    pub interval: Duration,
    /// Default 5 s.
    pub timeout: Duration,
    /// Consecutive failures that make it unhealthy; default 3.
    pub retries: u32,
    /// Failures in this window after start do not count; default 0.
    pub start_period: Duration,
}

/// Everything the container data files declare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ContainerSet {
    /// Default true: containers hoist made for this node but no longer declared are removed.
    pub purge: bool,
    pub containers: BTreeMap<String, ContainerConfig>,
}

/// One problem in the configuration, located as precisely as it can be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub container: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(container) = &self.container {
            write!(f, "container {container}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field {field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found; a config with any of them is refused whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ContainerConfig {
    /// How long a stop of this container waits before it kills.
    pub fn stop_grace(&self, docker: &DockerConfig) -> Duration {
        self.stop_grace.unwrap_or(docker.stop_grace)
    }

    /// The runtime spec for this definition running `version` on `node` under the agent's `docker`
    /// settings.
    pub fn spec(&self, node: &str, docker: &DockerConfig, version: &ImageVersion) -> ContainerSpec {
        let name_prefix = &docker.name_prefix;
        ContainerSpec {
            name: self.name.clone(),
            container_name: format!("{name_prefix}{}", self.name),
            node: node.to_string(),
            image: self.image.clone(),
            version: version.clone(),
            command: self.command.clone(),
            entrypoint: self.entrypoint.clone(),
            network: self.network.clone(),
            ports: self.ports.clone(),
            volumes: self.volumes.clone(),
            environment: self.environment.clone(),
            syslog: self.syslog,
            syslog_address: docker.syslog_address.clone().filter(|_| self.syslog),
            stop_signal: self.stop_signal.clone(),
        }
    }
}

mod agent;
mod containers;
mod definition;
mod health_check;
mod host;
mod last_good;
mod limits;
mod preflight;
mod raw;
mod value;

pub use containers::load_containers;
pub use host::{LOCAL_SYSLOG_SOCKETS, syslog_warning};
pub use last_good::{LAST_GOOD_FILE, LastGood};
pub use preflight::Preflight;

#[cfg(test)]
mod tests;
