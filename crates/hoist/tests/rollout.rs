//! Safe rollouts against the real engine and registry: rollback of a failing version, a tag that
//! cannot be pulled, the registry going away mid-rollout, and `update` of an unchanged tag.

mod support;

use hoist_core::fsm::State;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

fn web(image: &str, port: u16, extra: &str) -> String {
    format!("containers:\n  web:\n    image: {image}\n    image_tag: v1\n    kv_update: true\n    ports: ['127.0.0.1:{port}:80']\n{extra}")
}

#[test]
fn a_version_that_fails_its_gate_is_rolled_back_and_not_retried() {
    let port = free_port();
    let agent = TestAgent::start("rollback", &web(&image(), port, ""));
    let before = agent.wait_running("web");
    let watch = Watch::start(&agent, &[]);
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "broken"]);
    let m = agent.wait_machine("web", "rolled back to v1", Duration::from_secs(60), |m| {
        m.state == State::Run && m.version == "v1" && m.condition.is_some()
    });
    assert_ne!(m.container_id, before.container_id, "v1 runs again in a fresh container");
    assert!(m.condition.as_deref().unwrap().contains("broken failed its health gate"), "{m:?}");
    let err = m.last_error.unwrap_or_default();
    assert!(err.contains(":broken to ") && err.contains(":v1") && err.contains("exit 3"), "{err}");
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");

    // Not retried while the KV still says broken.
    std::thread::sleep(Duration::from_secs(3));
    let later = agent.machine("web").unwrap();
    assert_eq!((later.state, later.container_id.clone()), (State::Run, m.container_id.clone()), "no retry of broken");

    // The rollback was announced as an event with its reason.
    let events = watch.finish();
    let rollback = events.iter().find(|e| e.transition == "rollback");
    assert!(rollback.is_some_and(|e| e.detail.as_deref().unwrap_or_default().contains("exit 3")), "{events:#?}");

    // A new value is tried again.
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let m = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(m.condition, None);
}

#[test]
fn a_tag_that_cannot_be_pulled_leaves_the_running_container_alone() {
    let port = free_port();
    let agent = TestAgent::start("missingtag", &web(&image(), port, ""));
    let before = agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "nosuchtag"]);
    let m = agent.wait_machine("web", "reporting the failed pull", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("pull of") && e.contains("nosuchtag"))
    });
    assert_eq!(m.state, State::Update);
    assert_eq!(m.container_id, before.container_id);
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // Back to v1 in the KV: the image is already there and unchanged, so the container is kept.
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v1"]);
    let m = agent.wait_machine("web", "back in RUN", Duration::from_secs(30), |m| m.state == State::Run);
    assert_eq!(m.container_id, before.container_id, "an unchanged image does not restart the container");
    assert_eq!(m.restarts, before.restarts);
}

#[test]
fn update_of_an_unchanged_tag_keeps_the_container() {
    let agent = TestAgent::start("samedigest", &web(&image(), free_port(), ""));
    let before = agent.wait_running("web");
    agent.hoist_ok(&["transition", "web", "update"]);
    let m = agent.wait_machine("web", "back in RUN", Duration::from_secs(30), |m| m.state == State::Run && m.activity.is_none());
    assert_eq!(m.container_id, before.container_id, "same digest: no restart");
}

/// A registry of the test images on its own port, which this test may stop and start.
struct OwnRegistry {
    port: u16,
    config: std::path::PathBuf,
    child: Option<Child>,
}

impl OwnRegistry {
    fn start(dir: &std::path::Path) -> OwnRegistry {
        let fixtures = std::env::var("HOIST_FIXTURES_DIR").unwrap_or_else(|_| "/tmp/hoist-fixtures".into());
        let port = free_port();
        let config = dir.join("registry.yml");
        let yml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {fixtures}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n"
        );
        std::fs::write(&config, yml).unwrap();
        let mut r = OwnRegistry { port, config, child: None };
        r.resume();
        r
    }

    fn resume(&mut self) {
        let child =
            Command::new("docker-registry").arg("serve").arg(&self.config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.child = Some(child);
        wait_until("the registry to answer", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", self.port)).ok());
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_registry_outage_mid_rollout_causes_no_outage_and_the_rollout_resumes() {
    let scratch = tempfile::tempdir().unwrap();
    let mut registry = OwnRegistry::start(scratch.path());
    let repo = format!("127.0.0.1:{}/hoist/test", registry.port);
    let port = free_port();
    let agent = TestAgent::start("registrydown", &web(&repo, port, ""));
    let before = agent.wait_running("web");

    registry.stop();
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "failing to pull", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("pull of"))
    });
    assert_eq!(http_get(port).as_deref(), Some("v1"), "still serving while the registry is down");
    assert_eq!(agent.machine("web").unwrap().container_id, before.container_id);

    registry.resume();
    agent.wait_machine("web", "on v2 once the registry is back", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");
    // The images pulled through this registry's address are the test's own.
    let _ = docker(&["rmi", &format!("{repo}:v1"), &format!("{repo}:v2")]);
}
