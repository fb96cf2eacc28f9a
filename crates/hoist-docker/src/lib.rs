//! hoist-core's `Runtime` on the Docker Engine API, through bollard.
//!
//! Hoist finds its containers by labels, restarts them itself (no Docker restart policy), and never
//! pulls implicitly: `run` of an image that is not present is `ImageNotFound`, and pulls are explicit.

mod image;
mod inspect;
mod preflight;
mod probe;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, EventMessage, HostConfig, HostConfigLogConfig, PortBinding, PortMap};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::runtime::{
    ContainerInfo, Probe, ProbeError, PullProgress, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth, RuntimeResult,
};
use hoist_core::spec::{ContainerSpec, LABEL_NAME, LABEL_NODE};
use std::collections::HashMap;
use std::future::ready;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Where bollard connects when neither the configuration nor `DOCKER_HOST` names a host.
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// How much exec-probe output is kept for the failure message.
const EXEC_OUTPUT_LIMIT: usize = 4096;
/// Headroom over a stop's grace period for bollard's request timeout, which otherwise (120 s) would
/// cut off long graceful stops.
const STOP_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

/// A connection to one Docker Engine.
pub struct DockerRuntime {
    target: String,
    /// Connected (API version negotiated) on first use rather than at construction, so an agent can
    /// start before its engine (a boot where Docker comes up later) and wait for it as for any outage.
    client: OnceCell<Docker>,
    /// `RepoDigests` per image content id: an image's content never changes, so it is asked once.
    digests: std::sync::Mutex<HashMap<String, Vec<String>>>,
}

impl DockerRuntime {
    /// Prepares a connection to `host` (`unix:///path`, `tcp://host:port` or `http://host:port`), or
    /// with None to `DOCKER_HOST` or the local socket. Does not need the engine up: fails only on an
    /// address bollard cannot use.
    pub fn new(host: Option<&str>) -> Result<DockerRuntime, RuntimeError> {
        let target = host.map(str::to_string).or_else(|| std::env::var("DOCKER_HOST").ok()).unwrap_or_else(|| DEFAULT_HOST.into());
        match Docker::connect_with_host(&target) {
            // dockerd creates its socket when it starts.
            Ok(_) | Err(DockerError::SocketNotFoundError(_)) => {
                Ok(DockerRuntime { target, client: OnceCell::new(), digests: Default::default() })
            }
            Err(e) => Err(RuntimeError::Other(format!("unusable Docker Engine address {target}: {e}"))),
        }
    }

    /// The registry digest `image_ref` names now (`sha256:…`), asked of the registry through the
    /// engine (its TLS, mirrors and insecure-registry settings) with the Docker config's credentials.
    /// For a multi-platform image, the digest of its index, which is what `repo@digest` pulls.
    pub async fn resolve_digest(&self, image_ref: &str) -> RuntimeResult<String> {
        let resolve_error = |message: String| RuntimeError::Pull { image: image_ref.to_string(), message };
        let found =
            self.client().await?.inspect_registry_image(image_ref, image::credentials(image_ref)).await.map_err(
                |e| match runtime_error(e) {
                    unavailable @ RuntimeError::Unavailable(_) => unavailable,
                    other => resolve_error(other.to_string()),
                },
            )?;
        found.descriptor.digest.filter(|d| d.starts_with("sha256:")).ok_or_else(|| resolve_error("the registry gave no digest".into()))
    }

    /// `new`, then reaches the engine now.
    pub async fn connect(host: Option<&str>) -> Result<DockerRuntime, RuntimeError> {
        let runtime = DockerRuntime::new(host)?;
        runtime.ping().await?;
        Ok(runtime)
    }

    /// Whether the engine answers, connecting first if this is the first use.
    pub async fn ping(&self) -> RuntimeResult<()> {
        let docker = self.client().await?;
        docker.ping().await.map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    async fn client(&self) -> RuntimeResult<&Docker> {
        self.client
            .get_or_try_init(|| async {
                let docker = Docker::connect_with_host(&self.target).map_err(|e| self.unreachable(e))?;
                docker.negotiate_version().await.map_err(|e| self.unreachable(e))
            })
            .await
    }

    fn unreachable(&self, e: DockerError) -> RuntimeError {
        RuntimeError::Unavailable(format!("cannot reach the Docker Engine at {}: {e}", self.target))
    }

    async fn inspect_raw(&self, id: &str) -> RuntimeResult<Option<bollard::models::ContainerInspectResponse>> {
        match self.client().await?.inspect_container(id, None).await {
            Ok(doc) => Ok(Some(doc)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(runtime_error(e)),
        }
    }

    /// The image's `RepoDigests`; empty for an image that is gone or was never pulled (only pulled
    /// images, whose digests are known, are cached: a later pull may give an imported image some).
    async fn repo_digests(&self, image_id: &str) -> RuntimeResult<Vec<String>> {
        if let Some(known) = self.digests.lock().expect("digest cache").get(image_id) {
            return Ok(known.clone());
        }
        let digests = match self.client().await?.inspect_image(image_id).await {
            Ok(image) => image.repo_digests.unwrap_or_default(),
            Err(e) if status(&e) == Some(404) => return Ok(Vec::new()),
            Err(e) => return Err(runtime_error(e)),
        };
        if !digests.is_empty() {
            self.digests.lock().expect("digest cache").insert(image_id.to_string(), digests.clone());
        }
        Ok(digests)
    }

    async fn create(docker: &Docker, spec: &ContainerSpec) -> Result<String, DockerError> {
        let options = CreateContainerOptionsBuilder::default().name(&spec.container_name).build();
        Ok(docker.create_container(Some(options), create_body(spec)).await?.id)
    }

    /// Frees the spec's container name after a 409: a leftover of the same hoist container (same node
    /// and name labels) is removed; anything else holding the name is left alone.
    async fn reclaim_name(&self, spec: &ContainerSpec) -> RuntimeResult<()> {
        let Some(holder) = self.inspect_raw(&spec.container_name).await? else {
            return Ok(()); // Gone meanwhile.
        };
        let labels = holder.config.and_then(|c| c.labels).unwrap_or_default();
        let ours = labels.get(LABEL_NODE) == Some(&spec.node) && labels.get(LABEL_NAME) == Some(&spec.name);
        if !ours {
            return Err(RuntimeError::Other(format!("name {} is taken by a container hoist does not manage", spec.container_name)));
        }
        tracing::info!(container = %spec.container_name, "removing the previous container holding the name");
        self.remove(holder.id.as_deref().unwrap_or(&spec.container_name)).await
    }

    /// Every container carrying all of `labels` (`key=value`), running or not.
    async fn list_labelled(&self, labels: Vec<String>) -> RuntimeResult<Vec<ContainerInfo>> {
        let filters = HashMap::from([("label", labels)]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let summaries = self.client().await?.list_containers(Some(options)).await.map_err(runtime_error)?;
        let mut containers = Vec::with_capacity(summaries.len());
        for id in summaries.into_iter().filter_map(|s| s.id) {
            // A container removed between the list and its inspection is simply not there any more.
            if let Some(info) = self.inspect(&id).await? {
                containers.push(info);
            }
        }
        Ok(containers)
    }

    async fn exec_probe(&self, container_id: &str, command: &[String]) -> Result<(), ProbeError> {
        let options =
            CreateExecOptions { cmd: Some(command.to_vec()), attach_stdout: Some(true), attach_stderr: Some(true), ..Default::default() };
        let docker = self.client().await.map_err(|e| ProbeError::RuntimeUnavailable(e.to_string()))?;
        let exec = docker.create_exec(container_id, options).await.map_err(exec_error)?;
        let mut output = Vec::new();
        if let StartExecResults::Attached { output: mut stream, .. } = docker.start_exec(&exec.id, None).await.map_err(exec_error)? {
            // Read to the end so the command has finished, keeping only the start of its output.
            while let Some(Ok(chunk)) = stream.next().await {
                let bytes = chunk.into_bytes();
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(output.len());
                output.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
        }
        // The exit code can lag the end of the output briefly; the caller's timeout bounds this loop.
        let exit_code = loop {
            let state = docker.inspect_exec(&exec.id).await.map_err(exec_error)?;
            match (state.running, state.exit_code) {
                (Some(false), Some(code)) => break code,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if exit_code == 0 {
            return Ok(());
        }
        let output = String::from_utf8_lossy(&output);
        Err(ProbeError::Failed(match output.trim() {
            "" => format!("exit code {exit_code}"),
            text => format!("exit code {exit_code}: {text}"),
        }))
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    async fn list(&self, node: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        self.list_labelled(vec![format!("{LABEL_NODE}={node}")]).await
    }

    async fn find(&self, node: &str, name: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        self.list_labelled(vec![format!("{LABEL_NODE}={node}"), format!("{LABEL_NAME}={name}")]).await
    }

    async fn inspect(&self, id: &str) -> RuntimeResult<Option<ContainerInfo>> {
        let Some(mut info) = self.inspect_raw(id).await?.map(inspect::container_info) else { return Ok(None) };
        info.image_digest = inspect::repo_digest(&info.image, &self.repo_digests(&info.image_id).await?);
        Ok(Some(info))
    }

    async fn run(&self, spec: &ContainerSpec) -> RuntimeResult<ContainerInfo> {
        let image = spec.image_ref();
        if self.image_id(&image).await?.is_none() {
            return Err(RuntimeError::ImageNotFound(image));
        }
        let docker = self.client().await?;
        let id = match Self::create(docker, spec).await {
            Err(e) if status(&e) == Some(409) => {
                self.reclaim_name(spec).await?;
                Self::create(docker, spec).await
            }
            other => other,
        }
        .map_err(|e| match status(&e) {
            // The image went away between the check and the create.
            Some(404) => RuntimeError::ImageNotFound(image.clone()),
            _ => runtime_error(e),
        })?;
        if let Err(e) = docker.start_container(&id, None).await {
            // Leave no half-made container behind: the next attempt starts from a clean name.
            if let Err(cleanup) = self.remove(&id).await {
                tracing::warn!(container = %spec.container_name, error = %cleanup, "removing the container that failed to start");
            }
            return Err(match runtime_error(e) {
                RuntimeError::Other(message) => RuntimeError::Other(format!("starting {}: {message}", spec.container_name)),
                other => other,
            });
        }
        self.inspect(&id).await?.ok_or(RuntimeError::NotFound(id))
    }

    async fn stop(&self, id: &str, grace: Duration) -> RuntimeResult<()> {
        let seconds = i32::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0)).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        let docker = self.client().await?.clone().with_timeout(grace + STOP_TIMEOUT_MARGIN);
        match docker.stop_container(id, Some(options)).await {
            Err(e) if !matches!(status(&e), Some(304 | 404)) => Err(runtime_error(e)),
            _ => Ok(()),
        }
    }

    async fn remove(&self, id: &str) -> RuntimeResult<()> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(false).build();
        match self.client().await?.remove_container(id, Some(options)).await {
            Err(e) if status(&e) != Some(404) => Err(runtime_error(e)),
            _ => Ok(()),
        }
    }

    async fn image_id(&self, image_ref: &str) -> RuntimeResult<Option<String>> {
        match self.client().await?.inspect_image(image_ref).await {
            Ok(image) => Ok(image.id),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(runtime_error(e)),
        }
    }

    async fn pull(&self, image_ref: &str, progress: &(dyn Fn(PullProgress) + Send + Sync)) -> RuntimeResult<String> {
        let pull_error = |message: String| RuntimeError::Pull { image: image_ref.to_string(), message };
        let (from_image, tag) = image::split_reference(image_ref);
        let mut options = CreateImageOptionsBuilder::default().from_image(from_image);
        if !tag.is_empty() {
            options = options.tag(tag);
        }
        let mut stream = self.client().await?.create_image(Some(options.build()), None, image::credentials(image_ref));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    let detail = info.progress_detail.unwrap_or_default();
                    progress(PullProgress {
                        layer: info.id,
                        status: info.status.unwrap_or_default(),
                        current: detail.current.and_then(|n| u64::try_from(n).ok()),
                        total: detail.total.and_then(|n| u64::try_from(n).ok()),
                    });
                }
                Err(DockerError::DockerStreamError { error }) => return Err(pull_error(error)),
                // bollard 0.21.1 misreads the end of the progress stream (bollard#560); whether the pull
                // worked is decided by the image being present below.
                Err(e) if e.to_string().contains("bytes remaining on stream") => break,
                Err(e) => {
                    return Err(match runtime_error(e) {
                        unavailable @ RuntimeError::Unavailable(_) => unavailable,
                        other => pull_error(other.to_string()),
                    });
                }
            }
        }
        self.image_id(image_ref).await?.ok_or_else(|| pull_error("the image is not present after the pull".into()))
    }

    async fn events(&self, node: &str) -> RuntimeResult<BoxStream<'static, RuntimeEvent>> {
        // bollard connects only when the stream is first polled: ask the engine first, so that a
        // caller told Ok knows the engine is there (and can re-read its containers).
        self.ping().await?;
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", vec![format!("{LABEL_NODE}={node}")]),
            // Without an event filter, every healthcheck run adds exec_create/exec_start/exec_die.
            ("event", ["start", "die", "health_status", "destroy"].map(String::from).to_vec()),
        ]);
        // `since` now makes the engine replay whatever happens before the stream is first polled, so a
        // caller that subscribes and then inspects misses nothing.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let since = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
        let options = EventsOptionsBuilder::default().since(&since).filters(&filters).build();
        let stream = self
            .client()
            .await?
            .events(Some(options))
            .take_while(|item| {
                if let Err(e) = item {
                    tracing::warn!(error = %e, "Docker event stream ended");
                }
                ready(item.is_ok())
            })
            .filter_map(|item| ready(item.ok().and_then(runtime_event)));
        Ok(stream.boxed())
    }

    async fn preflight(&self, spec: &ContainerSpec, timeout: Duration) -> RuntimeResult<hoist_core::preflight::Run> {
        self.run_preflight(spec, timeout).await
    }

    async fn probe(&self, container: &ContainerInfo, probe: &Probe, timeout: Duration) -> Result<(), ProbeError> {
        let ip = container.ip.ok_or_else(|| ProbeError::Failed("container has no IP address".into()))?;
        let attempt = async {
            match probe {
                Probe::Http { port, path } => probe::http(ip, *port, path).await,
                Probe::Tcp { port } => probe::tcp(ip, *port).await.map(drop),
                Probe::Exec { command } => self.exec_probe(&container.id, command).await,
            }
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| Err(ProbeError::Failed(format!("timed out after {timeout:?}"))))
    }
}

/// The create request for a spec. No restart policy: hoist's state machine does the restarting.
fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let non_empty = |args: &Vec<String>| (!args.is_empty()).then(|| args.clone());
    let mut port_bindings = PortMap::new();
    for port in &spec.ports {
        let key = format!("{}/{}", port.container_port, port.protocol.as_str());
        let binding = PortBinding { host_ip: port.host_ip.map(|ip| ip.to_string()), host_port: port.host_port.map(|p| p.to_string()) };
        port_bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_default().push(binding);
    }
    let mut exposed_ports: Vec<String> = port_bindings.keys().cloned().collect();
    exposed_ports.sort();
    let log_config = spec.syslog.then(|| {
        let mut options = HashMap::from([("tag".to_string(), spec.container_name.clone())]);
        if let Some(address) = &spec.syslog_address {
            options.insert("syslog-address".into(), address.clone());
        }
        HostConfigLogConfig { typ: Some("syslog".into()), config: Some(options) }
    });
    ContainerCreateBody {
        image: Some(spec.image_ref()),
        cmd: non_empty(&spec.command),
        entrypoint: non_empty(&spec.entrypoint),
        env: Some(spec.environment.iter().map(|e| format!("{}={}", e.key, e.value)).collect()),
        labels: Some(spec.labels().into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        exposed_ports: Some(exposed_ports),
        host_config: Some(HostConfig {
            port_bindings: Some(port_bindings),
            binds: Some(spec.volumes.iter().map(ToString::to_string).collect()),
            network_mode: (!spec.network.is_empty()).then(|| spec.network.clone()),
            log_config,
            ..Default::default()
        }),
        stop_signal: spec.stop_signal.clone(),
        ..Default::default()
    }
}

/// The hoist event for a Docker event, if it is one hoist follows.
fn runtime_event(event: EventMessage) -> Option<RuntimeEvent> {
    let actor = event.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let kind = match event.action?.as_str() {
        "start" => RuntimeEventKind::Started,
        "die" => RuntimeEventKind::Died { exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()) },
        "destroy" => RuntimeEventKind::Destroyed,
        // The status is part of the action: "health_status: healthy".
        "health_status: healthy" => RuntimeEventKind::Health(RuntimeHealth::Healthy),
        "health_status: unhealthy" => RuntimeEventKind::Health(RuntimeHealth::Unhealthy),
        "health_status: starting" => RuntimeEventKind::Health(RuntimeHealth::Starting),
        _ => return None,
    };
    Some(RuntimeEvent { container_id: actor.id?, name: attributes.get(LABEL_NAME).cloned().unwrap_or_default(), kind })
}

/// The HTTP status of an engine error response.
fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own message for a response error; bollard's text otherwise.
fn docker_message(e: DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    }
}

/// An exec probe's own failure, or the engine not answering (no verdict on the container).
fn exec_error(e: DockerError) -> ProbeError {
    match runtime_error(e) {
        RuntimeError::Unavailable(why) => ProbeError::RuntimeUnavailable(why),
        other => ProbeError::Failed(format!("exec: {other}")),
    }
}

/// Transport failures mean the engine is not reachable; everything else is the engine saying no.
fn runtime_error(e: DockerError) -> RuntimeError {
    match e {
        DockerError::HyperLegacyError { .. }
        | DockerError::HyperResponseError { .. }
        | DockerError::IOError { .. }
        | DockerError::SocketNotFoundError(_)
        | DockerError::RequestTimeoutError => RuntimeError::Unavailable(e.to_string()),
        other => RuntimeError::Other(docker_message(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;
    use hoist_core::spec::{EnvVar, ImageVersion, PortMapping, Protocol, VolumeMount};

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            container_name: "hoist_web".into(),
            node: "n1".into(),
            image: "127.0.0.1:5000/hoist/test".into(),
            version: ImageVersion::Tag("v1".into()),
            command: vec![],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            network: "bridge".into(),
            ports: vec![
                PortMapping {
                    host_ip: Some("127.0.0.1".parse().unwrap()),
                    host_port: Some(8080),
                    container_port: 80,
                    protocol: Protocol::Tcp,
                },
                PortMapping { host_ip: None, host_port: None, container_port: 80, protocol: Protocol::Tcp },
                PortMapping { host_ip: None, host_port: Some(5353), container_port: 53, protocol: Protocol::Udp },
            ],
            volumes: vec![VolumeMount { source: "/srv".into(), target: "/data".into(), read_only: true }],
            environment: vec![EnvVar { key: "A".into(), value: "b=c".into() }],
            syslog: true,
            syslog_address: Some("udp://10.0.0.9:514".into()),
            stop_signal: Some("SIGQUIT".into()),
        }
    }

    #[test]
    fn create_body_carries_the_spec() {
        let body = create_body(&spec());
        assert_eq!(body.image.as_deref(), Some("127.0.0.1:5000/hoist/test:v1"));
        assert_eq!(body.cmd, None);
        assert_eq!(body.entrypoint, Some(vec!["/bin/sh".to_string(), "-c".to_string()]));
        assert_eq!(body.env, Some(vec!["A=b=c".to_string()]));
        assert_eq!(body.exposed_ports, Some(vec!["53/udp".to_string(), "80/tcp".to_string()]));
        let labels = body.labels.unwrap();
        assert_eq!((labels[LABEL_NODE].as_str(), labels[LABEL_NAME].as_str()), ("n1", "web"));
        let host = body.host_config.unwrap();
        let web = host.port_bindings.as_ref().unwrap()["80/tcp"].as_ref().unwrap();
        assert_eq!(web.len(), 2);
        assert_eq!((web[0].host_ip.as_deref(), web[0].host_port.as_deref()), (Some("127.0.0.1"), Some("8080")));
        assert_eq!((web[1].host_ip.as_deref(), web[1].host_port.as_deref()), (None, None));
        assert_eq!(host.binds, Some(vec!["/srv:/data:ro".to_string()]));
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
        assert_eq!(host.restart_policy, None);
        let log = host.log_config.unwrap();
        let options = log.config.unwrap();
        assert_eq!((log.typ.as_deref(), options["tag"].as_str()), (Some("syslog"), "hoist_web"));
        assert_eq!(options["syslog-address"], "udp://10.0.0.9:514");
        assert_eq!(body.stop_signal.as_deref(), Some("SIGQUIT"));
    }

    fn event(action: &str, attributes: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some("c1".into()),
                attributes: Some(attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn maps_events() {
        let died = runtime_event(event("die", &[(LABEL_NAME, "web"), ("exitCode", "3")])).unwrap();
        assert_eq!(
            died,
            RuntimeEvent { container_id: "c1".into(), name: "web".into(), kind: RuntimeEventKind::Died { exit_code: Some(3) } }
        );
        let kind = |action| runtime_event(event(action, &[])).map(|e| e.kind);
        assert_eq!(kind("start"), Some(RuntimeEventKind::Started));
        assert_eq!(kind("destroy"), Some(RuntimeEventKind::Destroyed));
        assert_eq!(kind("health_status: healthy"), Some(RuntimeEventKind::Health(RuntimeHealth::Healthy)));
        assert_eq!(kind("health_status: unhealthy"), Some(RuntimeEventKind::Health(RuntimeHealth::Unhealthy)));
        assert_eq!(kind("exec_start: sh -c true"), None);
    }
}
