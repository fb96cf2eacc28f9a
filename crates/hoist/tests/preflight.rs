//! Preflight runs against the real engine and registry: a new version's image runs once, with the
//! container's environment and volumes read-only and no ports, before the running container is
//! stopped; a passing one lets the update go on, and its container is gone whatever happens, an
//! agent killed mid-run included; a failing one keeps the running container and says why (and, in a
//! release on NATS, counts against its budget: `release.rs`).

mod support;

use hoist_core::fsm::State;
use std::time::Duration;
use support::*;

fn web(port: u16, preflight: &str) -> String {
    format!(
        "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    ports: ['127.0.0.1:{port}:80']\n    environment: ['CHECKED=yes']\n    preflight: {preflight}\n",
        image()
    )
}

/// The agent's preflight containers, by name, running or not.
fn preflight_containers(agent: &TestAgent) -> Vec<String> {
    agent.labelled_containers().into_iter().filter(|n| n.ends_with("-preflight")).collect()
}

#[test]
fn a_passing_preflight_runs_in_the_new_image_before_the_old_container_stops() {
    let port = free_port();
    // It sees the container's environment, and its volume only read-only.
    let data = tempfile::tempdir().unwrap();
    let check = "{ command: ['/bin/sh', '-c', 'test \"$CHECKED\" = yes && ! touch /data/x && sleep 1'], timeout: 20s }";
    let yaml = web(port, check).replace("    environment:", &format!("    volumes: ['{}:/data']\n    environment:", data.path().display()));
    let agent = TestAgent::start("preflight-pass", &yaml);
    agent.wait_running("web");
    let shown = agent.hoist_ok(&["validate"]);
    assert!(shown.contains(&format!("docker run --rm --name {}-preflight", agent.container_name("web"))), "{shown}");
    let name = agent.container_name("web");
    let record = DockerRecord::start(&[format!("label=io.hoist.node={}", agent.node)]);
    std::thread::sleep(Duration::from_millis(500));
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(http_get(port).as_deref(), Some("v2"));
    let (record, _) = record.finish();
    let order: Vec<&str> = record.lines().collect();
    let preflight = format!("{name}-preflight");
    assert_eq!(
        order,
        [format!("start {preflight}"), format!("die {preflight}"), format!("die {name}"), format!("start {name}")],
        "the preflight ran and ended before the old container was stopped"
    );
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_none(), "the volume was read-only");
    assert_eq!(preflight_containers(&agent), Vec::<String>::new(), "the preflight container was removed");
}

#[test]
fn a_preflight_left_by_a_killed_agent_is_removed_when_it_starts_again() {
    let port = free_port();
    let mut agent = TestAgent::start("preflight-killed", &web(port, "{ command: ['sleep', '300'], timeout: 10m }"));
    let before = agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let m = agent.wait_machine("web", "in its preflight", Duration::from_secs(60), |m| {
        m.activity.as_deref().is_some_and(|a| a.starts_with("preflight of ") && a.contains("sleep 300"))
    });
    assert_eq!((m.state, m.container_id.clone()), (State::Update, before.container_id.clone()), "{m:?}");
    let leftover = wait_until("the preflight container", Duration::from_secs(30), || preflight_containers(&agent).pop());
    let leftover_id = docker_ok(&["inspect", "-f", "{{.Id}}", &leftover]);
    assert_eq!(http_get(port).as_deref(), Some("v1"), "the old container serves during the preflight");
    agent.kill_agent();
    assert!(docker(&["inspect", &leftover_id]).status.success(), "a killed agent leaves its preflight behind");
    agent.spawn();
    wait_until("the leftover removed", Duration::from_secs(30), || (!docker(&["inspect", &leftover_id]).status.success()).then_some(()));
    assert_eq!(agent.container_id("web"), before.container_id.map(|short| docker_ok(&["inspect", "-f", "{{.Id}}", &short])));
    assert!(agent.log().contains("left over from a preflight"), "{}", agent.log());
}

#[test]
fn a_failing_preflight_keeps_the_running_container_and_says_why() {
    let port = free_port();
    let check = "{ command: ['/bin/sh', '-c', 'echo line one; echo cannot reach the database >&2; exit 4'], timeout: 20s }";
    let agent = TestAgent::start("preflight-fail", &web(port, check));
    let before = agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let m = agent.wait_machine("web", "v2 refused by its preflight", Duration::from_secs(60), |m| m.bad_version.as_deref() == Some("v2"));
    let m = agent.wait_machine("web", "back in RUN on v1", Duration::from_secs(30), |now| {
        now.state == State::Run && now.version == "v1" && now.restarts == m.restarts
    });
    assert_eq!((m.container_id.clone(), m.restarts), (before.container_id.clone(), before.restarts), "never stopped: {m:?}");
    assert_eq!(
        m.condition.as_deref(),
        Some(
            "v2 failed its preflight, so the running container was kept; not retried until the desired version changes or `update` is requested"
        )
    );
    let why = m.last_error.clone().unwrap_or_default();
    // stdout and stderr reach the engine through two pipes, so their order in the tail is not fixed.
    assert!(why.contains("preflight failed (exit 4): "), "{why}");
    assert!(why.contains("line one") && why.contains("cannot reach the database"), "{why}");
    assert_eq!(http_get(port).as_deref(), Some("v1"));
    assert_eq!(preflight_containers(&agent), Vec::<String>::new());
}
