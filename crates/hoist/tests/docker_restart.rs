//! Fault: the Docker daemon restarts under a running agent, or is not up yet when the agent starts
//! (DESIGN.md §8). The agent must stay up, say that the engine is unreachable, reconnect when it is
//! back and leave exactly one running container per definition.
//!
//! Each test runs a Docker daemon of its own (own socket, data and exec roots, vfs storage, its own
//! bridge, no iptables rules): stopping the machine's engine would stop every container of every test
//! running in parallel. Like any dockerd it needs root. (Not `--bridge=none`: that makes dockerd delete
//! the machine's `docker0`.)

mod support;

use hoist_core::fsm::State;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::*;

struct PrivateDockerd {
    dir: tempfile::TempDir,
    bridge: String,
    process: Option<Child>,
}

impl PrivateDockerd {
    /// `subnet` picks 10.213.<subnet>.0/24 for the bridge; tests running at once need different ones.
    fn start(subnet: u8, live_restore: bool) -> PrivateDockerd {
        let dir = tempfile::Builder::new().prefix("hoist-dockerd-").tempdir_in("/tmp").unwrap();
        // An explicit config file, so the machine's /etc/docker/daemon.json (storage driver, data
        // root) does not apply.
        write(&dir.path().join("daemon.json"), &format!("{{\"live-restore\": {live_restore}}}"));
        let bridge = format!("hoistbr{}", std::process::id());
        let _ = ip(&["link", "del", &bridge]);
        let address = format!("10.213.{subnet}.1/24");
        for args in [
            &["link", "add", "name", &bridge, "type", "bridge"][..],
            &["addr", "add", &address, "dev", &bridge],
            &["link", "set", &bridge, "up"],
        ] {
            let out = ip(args);
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut daemon = PrivateDockerd { dir, bridge, process: None };
        daemon.launch();
        daemon
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path("docker.sock").display())
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path("dockerd.log")).unwrap();
        let arg = |flag: &str, rel: &str| format!("--{flag}={}", self.path(rel).display());
        let child = Command::new("dockerd")
            .args([arg("config-file", "daemon.json"), arg("data-root", "data"), arg("exec-root", "exec"), arg("pidfile", "dockerd.pid")])
            .args(["-H", &self.host(), "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge", &self.bridge])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dockerd must be installed (Debian's docker.io) and the tests run as root");
        self.process = Some(child);
        wait_until("the private dockerd to answer", Duration::from_secs(60), || {
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited with {status}:\n{}", std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default());
            }
            self.docker(&["version"]).status.success().then_some(())
        });
    }

    /// SIGTERM and wait, as `systemctl restart docker` does first.
    fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            assert!(Command::new("kill").arg(child.id().to_string()).status().unwrap().success());
            let status = child.wait().unwrap();
            assert!(status.success(), "dockerd stopped with {status}");
        }
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker").args(["-H", &self.host()]).args(args).output().expect("docker CLI must be installed")
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // With live-restore, containers outlive a stopped daemon: bring it back to remove them.
        if self.process.is_none() && !std::thread::panicking() {
            self.launch();
        }
        if self.process.is_some() {
            let ids = self.docker(&["ps", "-aq"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
            self.stop();
        }
        // dockerd leaves its namespace mounts behind; the temporary directory cannot go otherwise.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.dir.path().to_string_lossy().into_owned();
        for target in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|t| t.starts_with(&root)) {
            let _ = Command::new("umount").args(["-l", target]).status();
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("ip (iproute2) must be installed")
}

/// An agent on the private daemon running `web`: busybox httpd published on `port`, http-checked.
/// Under a shell that exits on SIGTERM, so the engine's shutdown does not wait out the stop timeout
/// (a PID 1 without a handler ignores SIGTERM).
fn agent_on(daemon: &PrivateDockerd, test: &str, port: u16) -> TestAgent {
    agent_with(daemon, test, port, FAST_ROLLOUT, "type: http, port: 80")
}

/// `check`: the `health_check` fields besides its timing.
fn agent_with(daemon: &PrivateDockerd, test: &str, port: u16, rollout: &str, check: &str) -> TestAgent {
    let yaml = format!(
        "containers:\n  web:\n    image: {image}\n    image_tag: v1\n    kv_update: true\n    command: ['sh', '-c', 'trap \"exit 0\" TERM; httpd -f -p 80 -h /www & wait']\n    ports: ['127.0.0.1:{port}:80']\n    health_check: {{ {check}, interval: 1s, timeout: 1s, retries: 2 }}\n",
        image = image()
    );
    let mut agent = TestAgent::prepare(test, &yaml, "", rollout);
    agent.env.push(("DOCKER_HOST".into(), daemon.host()));
    agent.spawn();
    agent
}

fn running(m: &hoist_core::status::MachineStatus) -> bool {
    m.state == State::Run && m.container_id.is_some()
}

#[test]
fn containers_come_back_after_the_docker_daemon_restarts() {
    let mut daemon = PrivateDockerd::start(1, false);
    let port = free_port();
    let agent = agent_on(&daemon, "dockerd-restart", port);
    let before = agent.wait_running("web");
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");

    // Without live-restore the daemon stops the container on its way down.
    daemon.stop();
    assert_eq!(http_get(port), None, "the container stopped with the daemon");
    agent.wait_machine("web", "reporting the engine unreachable", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("container runtime unavailable"))
    });
    // An outage of a while: long enough for a crash-loop backoff to have piled up, had the agent
    // counted its failed attempts as crashes.
    std::thread::sleep(Duration::from_secs(12));
    let down = agent.machine("web").unwrap();
    assert_eq!(down.condition, None, "an unreachable engine is not a crash loop of the container: {down:#?}");
    assert_eq!(down.activity.as_deref(), Some("waiting for the container runtime"));

    daemon.launch();
    let after = agent.wait_machine("web", "running again", Duration::from_secs(60), running);
    assert_eq!(wait_until("v1 serving again", Duration::from_secs(10), || http_get(port)), "v1");
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")], "exactly one container, no duplicate");
    assert!(agent.container_running("web"));
    let running_id = agent.container_id("web").expect("a container");
    assert!(running_id.starts_with(after.container_id.as_deref().unwrap()), "status names the container that runs");
    assert_ne!(after.container_id, before.container_id, "the stopped container was replaced");
    assert_eq!(after.restarts, before.restarts + 1, "replaced once, not once per attempt");
}

#[test]
fn with_live_restore_a_daemon_restart_leaves_containers_alone() {
    let mut daemon = PrivateDockerd::start(2, true);
    let port = free_port();
    // An exec check runs through the engine, so it cannot run while the engine is down: that must not
    // count against the container.
    let check = "type: exec, command: ['wget', '-q', '-O-', 'http://127.0.0.1/']";
    let agent = agent_with(&daemon, "dockerd-live-restore", port, FAST_ROLLOUT, check);
    let before = agent.wait_running("web");

    // The published port goes with the daemon (its userland proxy exits); the container's own
    // address shows whether the container itself still serves.
    let ip = agent.docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &agent.container_name("web")]);
    let address = std::net::SocketAddr::new(String::from_utf8_lossy(&ip.stdout).trim().parse().expect("container IP"), 80);
    daemon.stop();
    assert_eq!(http_get_at(address).as_deref(), Some("v1"), "live-restore keeps the container running");
    // Several probe intervals (1 s, 2 retries) without an engine.
    std::thread::sleep(Duration::from_secs(4));
    daemon.launch();
    // The agent must have re-read the container after reconnecting: wait for the resync in its log.
    wait_until("the agent to reconnect to the engine", Duration::from_secs(30), || {
        agent.log().contains("reconnected to the container runtime").then_some(())
    });
    let after = agent.machine("web").unwrap();
    assert!(running(&after), "still in RUN: {after:#?}");
    assert_eq!(after.container_id, before.container_id, "the same container, not a replacement");
    assert_eq!(after.started, before.started, "not restarted");
    assert_eq!(after.restarts, 0);
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")]);
}

#[test]
fn an_agent_started_while_docker_is_down_adopts_its_container_when_docker_is_back() {
    let mut daemon = PrivateDockerd::start(4, true);
    let port = free_port();
    let mut agent = agent_on(&daemon, "dockerd-down-at-start", port);
    let before = agent.wait_running("web");

    // The node reboots its services: the agent is gone, and Docker (live-restore keeps the container)
    // comes back only after the agent has started.
    agent.kill_agent();
    daemon.stop();
    agent.spawn();
    let waiting = agent.wait_machine("web", "waiting for the engine", Duration::from_secs(30), |m| {
        m.activity.as_deref() == Some("waiting for the container runtime")
    });
    assert!(waiting.last_error.unwrap_or_default().contains("container runtime unavailable"));
    assert!(agent.log().contains("Docker is not reachable yet"), "the agent says why nothing starts");

    daemon.launch();
    let after = agent.wait_machine("web", "running", Duration::from_secs(60), running);
    assert_eq!(after.container_id, before.container_id, "the running container was adopted, not replaced");
    assert_eq!(after.started, before.started, "not restarted");
    assert_eq!(after.restarts, 0);
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")]);
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");
}

#[test]
fn a_daemon_restart_in_the_middle_of_a_rollout_does_not_roll_it_back() {
    let mut daemon = PrivateDockerd::start(3, false);
    let port = free_port();
    // A long confirmation window, so the engine can be restarted while v2 is still on probation.
    let rollout = "{ unverified_wait: 1s, min_healthy_time: 8s, healthy_deadline: 60s, governor_timeout: 60s }";
    let agent = agent_with(&daemon, "dockerd-rollout", port, rollout, "type: http, port: 80");
    agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "confirming v2", Duration::from_secs(60), |m| {
        m.state == State::Restart && m.activity.as_deref().is_some_and(|a| a.starts_with("healthy; confirming"))
    });

    daemon.stop();
    agent.wait_machine("web", "waiting for the engine", Duration::from_secs(30), |m| {
        m.activity.as_deref() == Some("waiting for the container runtime")
    });
    daemon.launch();
    let after = agent.wait_machine("web", "running", Duration::from_secs(60), running);
    assert_eq!(after.version, "v2", "the rollout went on: {after:#?}");
    assert_eq!(after.condition, None);
    assert!(!after.last_error.unwrap_or_default().contains("rolled back"));
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port)), "v2");
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")]);
}
