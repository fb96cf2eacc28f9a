//! DockerRuntime against the real engine and the fixture registry (scripts/test-fixtures.sh), which
//! serves `hoist/test:{v1,v2,broken,hc}`. Each test labels its containers with its own node name and
//! removes them when it ends, even on failure, so tests run in parallel without seeing each other.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::runtime::{Probe, RunState, Runtime, RuntimeError, RuntimeEvent, RuntimeEventKind, RuntimeHealth};
use hoist_core::spec::{ContainerSpec, EnvVar, ImageVersion, LABEL_NAME, LABEL_NODE, PortMapping, Protocol, VolumeMount};
use hoist_docker::DockerRuntime;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn registry() -> String {
    std::env::var("HOIST_TEST_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
}

fn repo() -> String {
    format!("{}/hoist/test", registry())
}

/// A connected runtime with the fixture image `tag` present locally (pulled if needed).
async fn runtime_with(tag: &str) -> DockerRuntime {
    let runtime = DockerRuntime::connect(None).await.expect("these tests need a running Docker Engine");
    let image = format!("{}:{tag}", repo());
    if runtime.image_id(&image).await.unwrap().is_none() {
        runtime
            .pull(&image, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("fixture image {image} is unavailable ({e}); run scripts/test-fixtures.sh"));
    }
    runtime
}

/// Removes every container of a test's node, and any extra names, when the test ends.
struct Cleanup {
    node: String,
    names: Vec<String>,
}

impl Cleanup {
    fn new(test: &str) -> Cleanup {
        Cleanup { node: format!("dt{}-{test}", std::process::id()), names: Vec::new() }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ours = Command::new("docker").args(["ps", "-aq", "--filter", &format!("label={LABEL_NODE}={}", self.node)]).output();
        let mut doomed: Vec<String> =
            ours.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect()).unwrap_or_default();
        doomed.extend(self.names.iter().cloned());
        if !doomed.is_empty() {
            let _ = Command::new("docker").arg("rm").arg("-f").args(&doomed).output();
        }
    }
}

fn spec(node: &str, name: &str, tag: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        container_name: format!("{node}_{name}"),
        node: node.into(),
        image: repo(),
        version: ImageVersion::Tag(tag.into()),
        command: vec![],
        entrypoint: vec![],
        network: "bridge".into(),
        ports: vec![],
        volumes: vec![],
        environment: vec![],
        syslog: false,
        syslog_address: None,
        stop_signal: None,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn http_body(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..50 {
        if let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
            let mut response = String::new();
            if conn.read_to_string(&mut response).await.is_ok() && response.starts_with("HTTP/") {
                return response;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answered HTTP on 127.0.0.1:{port}");
}

/// Waits (bounded) for the event `wanted` of container `id`, skipping others.
async fn expect_event(events: &mut BoxStream<'static, RuntimeEvent>, id: &str, wanted: RuntimeEventKind) {
    let deadline = Duration::from_secs(20);
    let found = tokio::time::timeout(deadline, async {
        while let Some(event) = events.next().await {
            if event.container_id == id && event.kind == wanted {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no {wanted:?} event for {id} within {deadline:?}");
}

#[tokio::test]
async fn runs_lists_serves_and_probes() {
    let runtime = runtime_with("v1").await;
    let cleanup = Cleanup::new("serve");
    let dir = std::env::temp_dir().join(format!("{}-data", cleanup.node));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("marker"), "x").unwrap();
    let port = free_port();
    let mut web = spec(&cleanup.node, "web", "v1");
    web.ports = vec![PortMapping {
        host_ip: Some("127.0.0.1".parse().unwrap()),
        host_port: Some(port),
        container_port: 80,
        protocol: Protocol::Tcp,
    }];
    web.volumes = vec![VolumeMount { source: dir.display().to_string(), target: "/data".into(), read_only: true }];
    web.environment = vec![EnvVar { key: "GREETING".into(), value: "hello there".into() }];

    let info = runtime.run(&web).await.unwrap();
    assert_eq!(info.state, RunState::Running);
    assert_eq!(info.container_name, web.container_name);
    assert_eq!(info.image, format!("{}:v1", repo()));
    assert_eq!(Some(info.image_id.clone()), runtime.image_id(&info.image).await.unwrap());
    assert!(info.started_at > 0 && info.created > 0, "{info:?}");
    assert!(info.ip.is_some());

    let listed = runtime.list(&cleanup.node).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, info.id);
    assert_eq!(listed[0].label(LABEL_NAME), Some("web"));
    assert_eq!(listed[0].label(LABEL_NODE), Some(cleanup.node.as_str()));
    assert_eq!(listed[0].label(hoist_core::spec::LABEL_SPEC), Some(web.hash().as_str()));
    let found: Vec<String> = runtime.find(&cleanup.node, "web").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(found, vec![info.id.clone()]);
    assert!(runtime.find(&cleanup.node, "db").await.unwrap().is_empty(), "find matches the name label");

    assert!(http_body(port).await.contains("v1"));

    let probe = async |p: Probe| runtime.probe(&info, &p, Duration::from_secs(5)).await.map_err(|e| e.to_string());
    assert_eq!(probe(Probe::Http { port: 80, path: "/".into() }).await, Ok(()));
    assert_eq!(probe(Probe::Http { port: 80, path: "/missing".into() }).await, Err("HTTP 404".into()));
    assert!(probe(Probe::Tcp { port: 80 }).await.is_ok());
    assert!(probe(Probe::Tcp { port: 81 }).await.is_err());
    let exec = |args: &[&str]| Probe::Exec { command: args.iter().map(|a| a.to_string()).collect() };
    assert_eq!(probe(exec(&["test", "-f", "/www/index.html"])).await, Ok(()));
    assert_eq!(probe(exec(&["test", "-f", "/data/marker"])).await, Ok(()), "the volume is mounted");
    assert_eq!(probe(exec(&["false"])).await, Err("exit code 1".into()));
    assert_eq!(probe(exec(&["sh", "-c", "echo $GREETING; exit 4"])).await, Err("exit code 4: hello there".into()));

    runtime.stop(&info.id, Duration::from_secs(1)).await.unwrap();
    let stopped = runtime.inspect(&info.id).await.unwrap().unwrap();
    assert_eq!(stopped.state, RunState::Exited);
    assert!(stopped.exit_code.is_some());
    runtime.stop(&info.id, Duration::from_secs(1)).await.expect("stopping a stopped container is fine");
    runtime.remove(&info.id).await.unwrap();
    assert_eq!(runtime.inspect(&info.id).await.unwrap(), None);
    runtime.remove(&info.id).await.expect("removing a missing container is fine");
    runtime.stop(&info.id, Duration::from_secs(1)).await.expect("stopping a missing container is fine");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn syslog_containers_log_to_the_configured_address_under_their_name() {
    let runtime = runtime_with("v1").await;
    let cleanup = Cleanup::new("syslog");
    let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = format!("udp://{}", receiver.local_addr().unwrap());
    let logged = ContainerSpec {
        command: vec!["sh".into(), "-c".into(), "echo hello from the container; sleep 30".into()],
        syslog: true,
        syslog_address: Some(address),
        ..spec(&cleanup.node, "logged", "v1")
    };
    runtime.run(&logged).await.expect("run with the syslog driver");
    let mut buf = vec![0; 2048];
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = receiver.recv(&mut buf).await.unwrap();
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            if line.contains("hello from the container") {
                return line;
            }
        }
    })
    .await
    .expect("a syslog message from the container");
    assert!(line.contains(&format!("{}[", logged.container_name)), "tagged with the container name: {line}");
}

#[tokio::test]
async fn run_never_pulls_a_missing_image() {
    let runtime = runtime_with("v1").await;
    let cleanup = Cleanup::new("missing");
    let ghost = spec(&cleanup.node, "ghost", &format!("absent-{}", std::process::id()));
    match runtime.run(&ghost).await {
        Err(RuntimeError::ImageNotFound(image)) => assert_eq!(image, ghost.image_ref()),
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    assert!(runtime.list(&cleanup.node).await.unwrap().is_empty());
}

#[tokio::test]
async fn pulls_by_tag_and_digest_with_progress() {
    let runtime = runtime_with("v1").await;
    let image = format!("{}:v2", repo());
    let messages = AtomicUsize::new(0);
    let count = |_| {
        messages.fetch_add(1, Ordering::Relaxed);
    };
    let id = runtime.pull(&image, &count).await.unwrap();
    assert!(messages.load(Ordering::Relaxed) > 0, "the progress callback was called");
    assert_eq!(runtime.image_id(&image).await.unwrap(), Some(id.clone()));

    let digests =
        Command::new("docker").args(["image", "inspect", "-f", "{{range .RepoDigests}}{{println .}}{{end}}", &image]).output().unwrap();
    let digests = String::from_utf8(digests.stdout).unwrap();
    let pinned = digests.lines().find(|d| d.starts_with(&repo())).expect("the pulled image has a repo digest");
    assert_eq!(runtime.pull(pinned, &count).await.unwrap(), id);

    match runtime.pull(&format!("{}:absent-{}", repo(), std::process::id()), &count).await {
        Err(RuntimeError::Pull { message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected a pull error, got {other:?}"),
    }
}

#[tokio::test]
async fn events_report_start_and_death() {
    let runtime = runtime_with("broken").await;
    let cleanup = Cleanup::new("events");
    let mut events = runtime.events(&cleanup.node).await.unwrap();
    let info = runtime.run(&spec(&cleanup.node, "broken", "broken")).await.unwrap();
    expect_event(&mut events, &info.id, RuntimeEventKind::Started).await;
    expect_event(&mut events, &info.id, RuntimeEventKind::Died { exit_code: Some(3) }).await;
    let dead = runtime.inspect(&info.id).await.unwrap().unwrap();
    assert_eq!((dead.state, dead.exit_code), (RunState::Exited, Some(3)));
    runtime.remove(&info.id).await.unwrap();
    expect_event(&mut events, &info.id, RuntimeEventKind::Destroyed).await;
}

#[tokio::test]
async fn events_report_health_changes() {
    let runtime = runtime_with("hc").await;
    let cleanup = Cleanup::new("health");
    let mut events = runtime.events(&cleanup.node).await.unwrap();
    let info = runtime.run(&spec(&cleanup.node, "hc", "hc")).await.unwrap();
    expect_event(&mut events, &info.id, RuntimeEventKind::Health(RuntimeHealth::Healthy)).await;
    assert_eq!(runtime.inspect(&info.id).await.unwrap().unwrap().health, RuntimeHealth::Healthy);
    let touched = Command::new("docker").args(["exec", &info.id, "touch", "/tmp/unhealthy"]).status().unwrap();
    assert!(touched.success());
    expect_event(&mut events, &info.id, RuntimeEventKind::Health(RuntimeHealth::Unhealthy)).await;
    assert_eq!(runtime.inspect(&info.id).await.unwrap().unwrap().health, RuntimeHealth::Unhealthy);
}

#[tokio::test]
async fn name_conflicts() {
    let runtime = runtime_with("v1").await;
    let mut cleanup = Cleanup::new("conflict");

    // A container hoist does not manage keeps its name.
    let foreign = spec(&cleanup.node, "foreign", "v1");
    cleanup.names.push(foreign.container_name.clone());
    let made = Command::new("docker").args(["run", "-d", "--name", &foreign.container_name, &foreign.image_ref()]).output().unwrap();
    assert!(made.status.success(), "docker run: {}", String::from_utf8_lossy(&made.stderr));
    match runtime.run(&foreign).await {
        Err(RuntimeError::Other(message)) => assert!(message.contains("does not manage"), "{message}"),
        other => panic!("expected a name conflict error, got {other:?}"),
    }
    let holder = Command::new("docker").args(["inspect", "-f", "{{.State.Running}}", &foreign.container_name]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&holder.stdout).trim(), "true", "the foreign container was left alone");

    // A stopped container of the same hoist container is replaced.
    let own = spec(&cleanup.node, "own", "v1");
    let first = runtime.run(&own).await.unwrap();
    runtime.stop(&first.id, Duration::from_secs(1)).await.unwrap();
    let second = runtime.run(&own).await.unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(second.state, RunState::Running);
    let listed: Vec<String> = runtime.list(&cleanup.node).await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(listed, vec![second.id]);
}

#[tokio::test]
async fn unreachable_engines_are_unavailable() {
    for host in ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"] {
        match DockerRuntime::connect(Some(host)).await {
            Err(RuntimeError::Unavailable(message)) => assert!(message.contains(host), "{message}"),
            other => panic!("{host}: expected Unavailable, got {:?}", other.map(|_| "a connection")),
        }
        // Not up yet is no reason to refuse the address: the engine may start later.
        let later = DockerRuntime::new(Some(host)).expect("a well-formed address");
        assert!(matches!(later.list("any").await, Err(RuntimeError::Unavailable(_))));
    }
    match DockerRuntime::new(Some("ftp://example.net")) {
        Err(RuntimeError::Other(message)) => assert!(message.contains("ftp://example.net"), "{message}"),
        other => panic!("expected an unusable address, got {:?}", other.map(|_| "a runtime")),
    }
    DockerRuntime::connect(Some("unix:///var/run/docker.sock")).await.expect("an explicit unix socket connects");
}
