//! The agent file: private raw structs that mirror the YAML exactly (every key optional, unknown keys
//! refused by serde), then defaults and path resolution into the public [`AgentConfig`].

use super::raw::{self, file_error};
use super::{
    AgentConfig, BackendKind, ConfigError, ConfigErrors, ControlConfig, DockerConfig, FleetConfig, MetricsConfig, NatsConfig,
    OperatorConfig, RegistrationConfig, RolloutConfig, TlsConfig,
};
use crate::backoff::BackoffConfig;
use crate::degraded::DegradedPolicy;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_STATE_DIR: &str = "/var/lib/hoist";
const DEFAULT_DATA_DIR: &str = "/etc/hoist/containers.d";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    node: Option<String>,
    state_dir: Option<PathBuf>,
    data: Option<Vec<PathBuf>>,
    docker: Option<RawDocker>,
    backend: Option<BackendKind>,
    nats: Option<RawNats>,
    facts: Option<Value>,
    registration: Option<RawRegistration>,
    control: Option<RawControl>,
    metrics: Option<RawMetrics>,
    rollout: Option<RawRollout>,
    fleet: Option<RawFleet>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    host: Option<String>,
    name_prefix: Option<String>,
    stop_grace: Option<Secs>,
    purge_grace: Option<Secs>,
    syslog_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    servers: Option<Vec<String>>,
    creds: Option<PathBuf>,
    nkey: Option<PathBuf>,
    token: Option<String>,
    tls: Option<RawTls>,
    collective: Option<String>,
    replicas: Option<u8>,
    inbox_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistration {
    interval: Option<Secs>,
    ccm: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    healthy_deadline: Option<Secs>,
    min_healthy_time: Option<Secs>,
    unverified_wait: Option<Secs>,
    governor_timeout: Option<Secs>,
    restart_backoff: Option<RawBackoff>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Option<Secs>,
    max: Option<Secs>,
    reset_after: Option<Secs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    node_retention: Option<Secs>,
    key: Option<PathBuf>,
    operators: Option<Vec<RawOperator>>,
    allow_unsigned: Option<bool>,
    max_clock_skew: Option<Secs>,
    degraded: Option<RawDegraded>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDegraded {
    share: Option<u64>,
    window: Option<Secs>,
    min_nodes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: String,
    key: String,
    allow: Vec<String>,
    #[serde(default)]
    containers: Vec<String>,
}

/// A duration as a humantime string (`10s`) or whole seconds, like the container data. A visitor (not
/// a `deserialize_with` over a whole value) so serde_yaml reports errors at the key's own path.
#[derive(Debug, Clone, Copy)]
struct Secs(Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecsVisitor;
        impl serde::de::Visitor<'_> for SecsVisitor {
            type Value = Secs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as \"10s\" or \"5m\", or a whole number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, secs: u64) -> Result<Secs, E> {
                Ok(Secs(Duration::from_secs(secs)))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secs, E> {
                super::value::duration(&Value::String(text.into())).map(Secs).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SecsVisitor)
    }
}

/// `rollout.restart_backoff`, unset keys from the built-in defaults.
fn backoff(raw: RawBackoff, error: &mut impl FnMut(&str, String)) -> BackoffConfig {
    let defaults = BackoffConfig::default();
    let config = BackoffConfig {
        initial: raw.initial.map_or(defaults.initial, |s| s.0),
        max: raw.max.map_or(defaults.max, |s| s.0),
        reset_after: raw.reset_after.map_or(defaults.reset_after, |s| s.0),
    };
    if config.initial.is_zero() || config.initial > config.max {
        error("rollout.restart_backoff.initial", "must be longer than zero and not longer than max".into());
    }
    if config.reset_after < Duration::from_secs(1) {
        error("rollout.restart_backoff.reset_after", "must be at least 1 second".into());
    }
    config
}

fn secs(value: Option<Secs>, default: u64) -> Duration {
    value.map_or(Duration::from_secs(default), |s| s.0)
}

impl AgentConfig {
    /// Reads and validates an agent file. Unknown keys are errors.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
        let text = raw::read_text(path).map_err(|e| ConfigErrors(vec![e]))?;
        // An empty file is valid: every key is optional.
        let mut parsed: Option<RawAgent> = serde_yaml::from_str(&text).map_err(|e| ConfigErrors(vec![serde_error(path, &e)]))?;
        // Facts are text to interpolate and filter on: a fact written 1.10 stays "1.10", not YAML's 1.1.
        if let Some(agent) = parsed.as_mut().filter(|agent| agent.facts.is_some()) {
            let mut document = raw::parse_yaml(path, &text).map_err(|e| ConfigErrors(vec![e]))?;
            agent.facts = document.texts.get_mut("facts").map(Value::take);
        }
        let base = path.parent().unwrap_or(Path::new(""));
        build(parsed.unwrap_or_default(), Some(path), base, vec![base.join("containers.d")])
    }

    /// The built-in defaults (no file), for `node` on this host.
    pub fn defaults() -> AgentConfig {
        build(RawAgent::default(), None, Path::new("/"), vec![PathBuf::from(DEFAULT_DATA_DIR)]).expect("the built-in defaults are valid")
    }

    /// Built-in facts (`hostname`, `networking.ip`) with the user's facts deep-merged over them.
    pub fn facts(&self) -> Value {
        let mut facts = serde_json::json!({
            "hostname": hostname(),
            "networking": { "ip": primary_ipv4() },
        });
        if self.facts.is_object() {
            raw::deep_merge(&mut facts, self.facts.clone());
        }
        facts
    }
}

/// The transports of Docker's syslog log driver.
const SYSLOG_SCHEMES: [&str; 5] = ["udp", "tcp", "tcp+tls", "unix", "unixgram"];

/// Applies defaults and resolves relative paths against `base` (the agent file's directory), so the
/// agent behaves the same whatever its working directory.
fn build(raw: RawAgent, path: Option<&Path>, base: &Path, default_data: Vec<PathBuf>) -> Result<AgentConfig, ConfigErrors> {
    // A section written with nothing under it (`docker:`) is the same as leaving it out.
    let (docker, nats) = (raw.docker.unwrap_or_default(), raw.nats.unwrap_or_default());
    let (registration, control) = (raw.registration.unwrap_or_default(), raw.control.unwrap_or_default());
    let (metrics, rollout) = (raw.metrics.unwrap_or_default(), raw.rollout.unwrap_or_default());
    let mut raw_fleet = raw.fleet.unwrap_or_default();
    let servers = nats.servers.unwrap_or_default();
    let mut errors = Vec::new();
    let mut error = |field: &str, message: String| {
        errors.push(ConfigError { file: path.map(Path::to_path_buf), container: None, field: Some(field.into()), message })
    };
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    if let Some(address) = &docker.syslog_address
        && !SYSLOG_SCHEMES.iter().any(|scheme| address.strip_prefix(scheme).is_some_and(|rest| rest.starts_with("://") && rest.len() > 3))
    {
        error(
            "docker.syslog_address",
            format!("{address:?} is not a syslog address Docker takes: use udp://, tcp://, tcp+tls://, unix:// or unixgram://"),
        );
    }
    let node = raw.node.unwrap_or_else(default_node);
    let backend = raw.backend.unwrap_or(BackendKind::Embedded);
    let ccm = registration.ccm.unwrap_or(false);
    if ccm && backend != BackendKind::Nats {
        error("registration.ccm", "publishing on ccm's registration subject needs backend: nats".into());
    }
    if backend == BackendKind::Nats && servers.is_empty() {
        error("nats.servers", "backend nats needs at least one server, e.g. [\"nats://n1:4222\"]".into());
    }
    if let Some(replicas) = nats.replicas
        && !(1..=5).contains(&replicas)
    {
        error("nats.replicas", format!("{replicas} is not a replica count NATS keeps: use 1 to 5"));
    }
    let node_retention = raw_fleet.node_retention.take().map_or(crate::presence::DEFAULT_NODE_RETENTION, |s| s.0);
    if node_retention < crate::presence::LIVENESS {
        error(
            "fleet.node_retention",
            format!(
                "{} is shorter than a node takes to count as dead ({}): use days, e.g. 7d",
                humantime::format_duration(node_retention),
                humantime::format_duration(crate::presence::LIVENESS)
            ),
        );
    }
    let facts = raw.facts.unwrap_or_else(|| Value::Object(Default::default()));
    if !facts.is_object() {
        error("facts", "expected a mapping of fact names to values".into());
    }
    let state_dir = resolve(raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)));
    let config = AgentConfig {
        path: path.map(Path::to_path_buf),
        node,
        data: raw.data.map(|data| data.into_iter().map(resolve).collect()).unwrap_or(default_data),
        docker: DockerConfig {
            host: docker.host,
            name_prefix: docker.name_prefix.unwrap_or_else(|| "hoist_".into()),
            stop_grace: secs(docker.stop_grace, 10),
            purge_grace: secs(docker.purge_grace, 60),
            syslog_address: docker.syslog_address,
        },
        backend,
        nats: NatsConfig {
            servers,
            creds: nats.creds.map(resolve),
            nkey: nats.nkey.map(resolve),
            token: nats.token,
            tls: nats.tls.map(|tls| TlsConfig { ca: tls.ca.map(resolve), cert: tls.cert.map(resolve), key: tls.key.map(resolve) }),
            collective: nats.collective.unwrap_or_else(|| "mcollective".into()),
            replicas: nats.replicas,
            inbox_prefix: inbox_prefix(nats.inbox_prefix, &mut error),
        },
        facts,
        registration: RegistrationConfig { interval: secs(registration.interval, 15), ccm },
        control: ControlConfig { socket: control.socket.map(resolve).unwrap_or_else(|| state_dir.join("hoist.sock")) },
        metrics: MetricsConfig { listen: metrics.listen },
        rollout: RolloutConfig {
            healthy_deadline: secs(rollout.healthy_deadline, 300),
            min_healthy_time: secs(rollout.min_healthy_time, 10),
            unverified_wait: secs(rollout.unverified_wait, 10),
            governor_timeout: secs(rollout.governor_timeout, 300),
            restart_backoff: backoff(rollout.restart_backoff.unwrap_or_default(), &mut error),
        },
        fleet: FleetConfig { node_retention, ..fleet_access(raw_fleet, &mut error, &resolve) },
        state_dir,
    };
    for (field, message) in super::limits::agent(&config) {
        error(field, message);
    }
    if errors.is_empty() { Ok(config) } else { Err(ConfigErrors(errors)) }
}

/// `nats.inbox_prefix`, without a trailing dot; it must be a plain subject for replies to be safe
/// to answer to.
fn inbox_prefix(raw: Option<String>, error: &mut impl FnMut(&str, String)) -> String {
    let Some(raw) = raw else { return "_INBOX".into() };
    let prefix = raw.strip_suffix('.').unwrap_or(&raw).to_string();
    if prefix.is_empty() || prefix.split('.').any(|t| t.is_empty() || t.contains(['*', '>']) || t.contains(char::is_whitespace)) {
        error("nats.inbox_prefix", format!("{raw:?} is not a plain subject prefix: use tokens without wildcards or spaces, e.g. _INBOX"));
    }
    prefix
}

/// The `fleet` section's access part: who may command this node, and the CLI's signing key.
fn fleet_access(raw: RawFleet, error: &mut impl FnMut(&str, String), resolve: &impl Fn(PathBuf) -> PathBuf) -> FleetConfig {
    let defaults = FleetConfig::default();
    let mut operators: Vec<OperatorConfig> = Vec::new();
    for (i, o) in raw.operators.unwrap_or_default().into_iter().enumerate() {
        let field = |name: &str| format!("fleet.operators[{i}].{name}");
        if o.name.is_empty() || operators.iter().any(|seen| seen.name == o.name) {
            error(&field("name"), format!("{:?}: each operator needs a name of its own", o.name));
        }
        if o.key.starts_with('S') {
            error(&field("key"), "this is a seed (the secret half): keep it on the operator's machine and list the public key (U…) that `hoist key new` printed".into());
        } else if !o.key.starts_with('U') || nkeys::KeyPair::from_public_key(&o.key).is_err() {
            error(&field("key"), format!("{:?} is not an operator's public key: use the U… key that `hoist key new` printed", o.key));
        }
        if o.allow.is_empty() {
            error(&field("allow"), "list what this operator may do: status, transition, or single transitions such as restart".into());
        }
        let mut allow = Vec::new();
        for p in &o.allow {
            match p.parse() {
                Ok(p) => allow.push(p),
                Err(e) => error(&field("allow"), e),
            }
        }
        operators.push(OperatorConfig { name: o.name, key: o.key, allow, containers: o.containers });
    }
    let max_clock_skew = raw.max_clock_skew.map_or(defaults.max_clock_skew, |s| s.0);
    if max_clock_skew.is_zero() {
        error("fleet.max_clock_skew", "must be more than zero, e.g. 30s: requests take time to arrive and clocks differ".into());
    }
    FleetConfig {
        key: raw.key.map(resolve),
        operators,
        allow_unsigned: raw.allow_unsigned.unwrap_or(false),
        max_clock_skew,
        degraded: degraded(raw.degraded.unwrap_or_default(), error),
        ..defaults
    }
}

/// `fleet.degraded`, unset keys from the defaults.
fn degraded(raw: RawDegraded, error: &mut impl FnMut(&str, String)) -> DegradedPolicy {
    let defaults = DegradedPolicy::default();
    let share = match raw.share {
        None => defaults.share,
        Some(p @ 1..=100) => p as u8,
        Some(p) => {
            error("fleet.degraded.share", format!("{p} is not a share: use a percentage from 1 to 100, e.g. 50"));
            defaults.share
        }
    };
    let window = raw.window.map_or(defaults.window, |s| s.0);
    if window < Duration::from_secs(5) {
        error("fleet.degraded.window", "must be at least 5s: nodes report their health every few seconds".into());
    }
    let min_nodes = match raw.min_nodes {
        None => defaults.min_nodes,
        Some(0) => {
            error("fleet.degraded.min_nodes", "must be at least 1".into());
            defaults.min_nodes
        }
        Some(n) => n as usize,
    };
    DegradedPolicy { share, window, min_nodes }
}

/// serde_yaml's message already carries the key path and the line; the field is recovered from it so
/// the error is located like every other config error.
fn serde_error(file: &Path, error: &serde_yaml::Error) -> ConfigError {
    let message = error.to_string();
    let (field, message) = match serde_field(&message) {
        // The path is now in `field`; drop it from the message so Display does not repeat it.
        Some((field, rest)) => (Some(field), rest.to_string()),
        None => (None, message.clone()),
    };
    ConfigError { field, ..file_error(file, message) }
}

/// `docker: unknown field `nmae_prefix`, …` → `docker.nmae_prefix`; `registration.interval: …` →
/// `registration.interval`; each with the rest of the message. A message without a path → None.
fn serde_field(message: &str) -> Option<(String, &str)> {
    let (prefix, rest) = match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(char::is_whitespace) => (Some(prefix), rest),
        _ => (None, message),
    };
    let unknown = rest.strip_prefix("unknown field `").and_then(|r| r.split_once('`')).map(|(name, _)| name);
    match (prefix, unknown) {
        (Some(prefix), Some(name)) => Some((format!("{prefix}.{name}"), rest)),
        (None, Some(name)) => Some((name.to_string(), rest)),
        (Some(prefix), None) => Some((prefix.to_string(), rest)),
        (None, None) => None,
    }
}

/// The kernel's hostname, the `hostname` fact.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    if name.is_empty() { "localhost".into() } else { name }
}

/// The hostname, as Choria names its identities.
fn default_node() -> String {
    hostname()
}

/// The source address the kernel would use for the default route. Connecting a UDP socket only
/// selects a route and sends nothing; 192.0.2.1 is TEST-NET-1, never a real peer.
fn primary_ipv4() -> String {
    let probe = || -> std::io::Result<std::net::IpAddr> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect("192.0.2.1:9")?;
        Ok(socket.local_addr()?.ip())
    };
    match probe() {
        Ok(ip) if !ip.is_unspecified() => ip.to_string(),
        _ => "127.0.0.1".into(),
    }
}
