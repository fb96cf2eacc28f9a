//! Harness for end-to-end tests: a real `hoist agent` process per test, with its own node name, state
//! directory and control socket, against the real Docker Engine and the local test registry
//! (`scripts/test-fixtures.sh` must have run). Containers are told apart by the node label, so tests
//! run in parallel on one engine.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod package;

use hoist_core::status::{MachineStatus, NodeStatus};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn registry() -> String {
    std::env::var("HOIST_TEST_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
}

/// The test image repository (tags v1, v2, v3, broken, hc; v3 is for the update-governor test alone).
pub fn image() -> String {
    format!("{}/hoist/test", registry())
}

/// The registry's content digest of a tag (what `docker pull repo@sha256:…` pins).
pub fn registry_digest(tag: &str) -> String {
    let mut s = std::net::TcpStream::connect(registry()).unwrap();
    let req = format!(
        "HEAD /v2/hoist/test/manifests/{tag} HTTP/1.0\r\nHost: {}\r\nAccept: application/vnd.docker.distribution.manifest.v2+json\r\n\r\n",
        registry()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    let line = head.lines().find(|l| l.to_ascii_lowercase().starts_with("docker-content-digest:")).expect("digest header");
    line.split_once(':').unwrap().1.trim().to_string()
}

/// Points `tag` of the test repository at what `to` is, in the registry.
pub fn move_tag(tag: &str, to: &str) {
    let (from, moved) = (format!("{}:{to}", image()), format!("{}:{tag}", image()));
    // From the registry, in case this engine's copy was removed (or is being rebuilt) meanwhile.
    docker_ok(&["pull", "-q", &from]);
    docker_ok(&["tag", &from, &moved]);
    docker_ok(&["push", &moved]);
}

/// What the node's web answers on its published port (found through Docker).
pub fn http_get_container(agent: &TestAgent) -> Option<String> {
    let port = docker_ok(&["port", &agent.container_name("web"), "80/tcp"]);
    http_get(port.rsplit(':').next()?.parse().ok()?)
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("docker CLI must be installed")
}

pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET http://127.0.0.1:port/ and return the body, or None if nothing answers.
pub fn http_get(port: u16) -> Option<String> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// GET http://address/ and return the body, or None if nothing answers.
pub fn http_get_at(address: std::net::SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_string())
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Rollout timings short enough for tests.
pub const FAST_ROLLOUT: &str = "{ unverified_wait: 1s, min_healthy_time: 1s, healthy_deadline: 30s, governor_timeout: 60s }";

pub struct TestAgent {
    pub node: String,
    pub dir: tempfile::TempDir,
    agent: Option<Child>,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
}

impl TestAgent {
    /// An agent for a unique node whose container data is `containers_yaml` (plain or Hiera form).
    pub fn start(test: &str, containers_yaml: &str) -> TestAgent {
        Self::start_with(test, containers_yaml, "")
    }

    /// Like `start`, with extra agent-file YAML appended.
    pub fn start_with(test: &str, containers_yaml: &str, extra_agent_yaml: &str) -> TestAgent {
        Self::start_with_rollout(test, containers_yaml, extra_agent_yaml, FAST_ROLLOUT)
    }

    /// Like `start_with`, with the agent file's `rollout` settings given (a YAML flow mapping).
    pub fn start_with_rollout(test: &str, containers_yaml: &str, extra_agent_yaml: &str, rollout: &str) -> TestAgent {
        let mut agent = Self::prepare(test, containers_yaml, extra_agent_yaml, rollout);
        agent.spawn();
        agent
    }

    /// Writes the agent's files without starting it (set `env`, then `spawn`).
    pub fn prepare(test: &str, containers_yaml: &str, extra_agent_yaml: &str, rollout: &str) -> TestAgent {
        let node = format!("t{}-{}", std::process::id(), test.replace('_', "-"));
        let dir = tempfile::tempdir().unwrap();
        let agent = TestAgent { node, dir, agent: None, env: Vec::new() };
        std::fs::create_dir_all(agent.path("containers.d")).unwrap();
        agent.write_containers(containers_yaml);
        let agent_yaml = format!(
            "node: {node}\nstate_dir: {state}\ndocker:\n  name_prefix: {node}_\n  stop_grace: 2s\n  purge_grace: 4s\nrollout: {rollout}\n{extra_agent_yaml}",
            node = agent.node,
            state = agent.path("state").display(),
        );
        std::fs::write(agent.path("hoist.yaml"), agent_yaml).unwrap();
        agent
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write_containers(&self, yaml: &str) {
        std::fs::write(self.path("containers.d/containers.yaml"), yaml).unwrap();
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hoist"))
            .args(["agent", "--config"])
            .arg(self.path("hoist.yaml"))
            .env("HOIST_LOG", "debug,bollard=info,hyper=info")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start hoist agent");
        self.agent = Some(child);
        let socket = self.path("state/hoist.sock");
        wait_until("the control socket", Duration::from_secs(30), || {
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
    }

    /// The running agent's process id.
    pub fn pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").id()
    }

    /// SIGTERM and wait, like systemd stopping the service.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.agent.as_ref().expect("agent running").id();
        assert!(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Runs the hoist CLI against this agent.
    pub fn hoist(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hoist")).arg("--config").arg(self.path("hoist.yaml")).args(args).output().expect("run hoist")
    }

    pub fn hoist_ok(&self, args: &[&str]) -> String {
        let out = self.hoist(args);
        assert!(out.status.success(), "hoist {args:?} failed: {}\n--- agent log ---\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> NodeStatus {
        serde_json::from_str(&self.hoist_ok(&["status", "--json"])).expect("status JSON")
    }

    pub fn machine(&self, container: &str) -> Option<MachineStatus> {
        self.status().machines.into_iter().find(|m| m.container == container)
    }

    /// Waits until `container`'s machine satisfies `check`, failing with the agent log on timeout.
    pub fn wait_machine(&self, container: &str, what: &str, timeout: Duration, check: impl Fn(&MachineStatus) -> bool) -> MachineStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.machine(container);
            if let Some(m) = m.as_ref().filter(|m| check(m)) {
                return m.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {container} to be {what}; last status: {m:#?}\n--- agent log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_running(&self, container: &str) -> MachineStatus {
        self.wait_machine(container, "RUN", Duration::from_secs(60), |m| m.state == hoist_core::fsm::State::Run && m.container_id.is_some())
    }

    /// The Docker name of a container of this node.
    pub fn container_name(&self, container: &str) -> String {
        format!("{}_{container}", self.node)
    }

    /// The docker CLI against the engine this agent uses (its `DOCKER_HOST`, if the test set one).
    pub fn docker(&self, args: &[&str]) -> Output {
        let host = self.env.iter().filter(|(k, _)| k == "DOCKER_HOST");
        Command::new("docker").envs(host.cloned()).args(args).output().expect("docker CLI must be installed")
    }

    /// Full id of the named container, or None if Docker has none.
    pub fn container_id(&self, container: &str) -> Option<String> {
        let out = self.docker(&["inspect", "-f", "{{.Id}}", &self.container_name(container)]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn container_running(&self, container: &str) -> bool {
        let out = self.docker(&["inspect", "-f", "{{.State.Running}}", &self.container_name(container)]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// All containers labelled for this node.
    pub fn labelled_containers(&self) -> Vec<String> {
        let out = self.docker(&["ps", "-a", "--filter", &format!("label=io.hoist.node={}", self.node), "--format", "{{.Names}}"]);
        assert!(out.status.success(), "docker ps failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let spawned = self.agent.is_some();
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A create the killed agent had in flight can still land after the first sweep.
        let sweeps = if spawned { 2 } else { 1 };
        for sweep in 0..sweeps {
            if sweep > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            let ids = self.docker(&["ps", "-aq", "--filter", &format!("label=io.hoist.node={}", self.node)]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
    }
}

pub fn write(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
}

/// Docker's own record of container stops (`die`) and starts, in the engine's order, for the
/// containers the filters select (`--filter` values such as `label=…` or `container=…`).
pub struct DockerRecord(Child);

impl DockerRecord {
    pub fn start(filters: &[String]) -> DockerRecord {
        let child = Command::new("docker")
            .args(["events", "--filter", "type=container", "--filter", "event=die", "--filter", "event=start"])
            .args(filters.iter().flat_map(|f| ["--filter", f.as_str()]))
            .args(["--format", "{{.Action}} {{.Actor.Attributes.name}}"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker events");
        DockerRecord(child)
    }

    /// Stops recording; returns the record and the most containers that were down at once.
    pub fn finish(mut self) -> (String, usize) {
        self.0.kill().unwrap();
        let record = String::from_utf8_lossy(&self.0.wait_with_output().unwrap().stdout).into_owned();
        let (mut down, mut max_down) = (std::collections::BTreeSet::new(), 0);
        for line in record.lines() {
            match line.split_once(' ') {
                Some(("die", name)) => {
                    down.insert(name.to_string());
                }
                Some(("start", name)) => {
                    down.remove(name);
                }
                _ => panic!("unexpected docker event line {line:?}"),
            }
            max_down = max_down.max(down.len());
        }
        (record, max_down)
    }
}

/// `hoist watch --json` against an agent, collected when finished.
pub struct Watch(Child);

impl Watch {
    pub fn start(agent: &TestAgent, extra: &[&str]) -> Watch {
        let child = Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--config")
            .arg(agent.path("hoist.yaml"))
            .args(["watch", "--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("hoist watch");
        // Let the subscription be in place before the caller acts.
        std::thread::sleep(Duration::from_millis(500));
        Watch(child)
    }

    pub fn finish(mut self) -> Vec<hoist_core::backend::TransitionEvent> {
        self.0.kill().unwrap();
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect()
    }
}

/// An operator key for fleet commands, made with `hoist key new` as an operator would; the seed
/// file lives as long as this value.
pub struct OperatorKey {
    pub seed: PathBuf,
    pub public: String,
    _dir: tempfile::TempDir,
}

impl OperatorKey {
    pub fn new() -> OperatorKey {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("operator.nk");
        let out = Command::new(env!("CARGO_BIN_EXE_hoist")).args(["key", "new", "--json"]).arg(&seed).output().expect("run hoist");
        assert!(out.status.success(), "hoist key new: {out:?}");
        let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("key new JSON");
        let public = printed["public_key"].as_str().expect("public_key").to_string();
        OperatorKey { seed, public, _dir: dir }
    }

    /// Agent-file YAML: the agent takes fleet requests from this key as operator `name` with
    /// `allow` (a YAML list), and the CLI run with the same file signs with it.
    pub fn fleet_yaml(&self, name: &str, allow: &str) -> String {
        format!("fleet:\n  key: {}\n  operators:\n    - {{ name: {name}, key: {}, allow: {allow} }}\n", self.seed.display(), self.public)
    }
}
