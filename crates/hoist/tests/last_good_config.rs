//! An agent that starts while a data file is broken runs the last configuration that loaded, and says
//! so; only an agent that never had a good configuration refuses to start.

mod support;

use hoist_core::fsm::State;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn a_restart_on_a_broken_file_keeps_managing_the_last_good_set_and_reports_the_refusal() {
    let port = free_port();
    let good = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    ports: ['127.0.0.1:{port}:80']\n", image());
    let mut agent = TestAgent::start("lastgood", &good);
    let before = agent.wait_running("web");
    assert!(agent.path("state/last-good.json").exists(), "the good set is kept");

    agent.stop_agent();
    let broken = format!(
        "containers:\n  web:\n    image: {0}\n    image_tag: v1\n    colour: red\n  db:\n    image: {0}\n    flavour: 1\n",
        image()
    );
    agent.write_containers(&broken);
    agent.spawn();

    let status = agent.status();
    let refusal = status.config_error.expect("the refusal is reported");
    for part in ["containers.yaml", "container web", "field colour", "container db", "field flavour", "refused at start", "last-good.json"]
    {
        assert!(refusal.contains(part), "{part} missing from the refusal: {refusal}");
    }
    // The refusal names two problems, on lines of their own, yet the log has it as one record: a log
    // reader or shipper would otherwise split it and lose the second problem's time and level.
    let log = agent.log();
    let record = log.lines().find(|l| l.contains("field colour")).unwrap_or_else(|| panic!("the refusal is logged:\n{log}"));
    assert!(record.contains("field flavour") && record.contains("ERROR"), "one record holds both problems: {record}");
    assert!(!log.contains('\x1b'), "no colour escapes in a log that is not a terminal:\n{log}");
    let human = String::from_utf8_lossy(&agent.hoist(&["status"]).stdout).into_owned();
    assert!(human.contains("field colour"), "hoist status shows it: {human}");
    assert!(agent.hoist_ok(&["metrics"]).contains("hoist_config_refused 1"));
    let adopted = agent.wait_running("web");
    assert_eq!(adopted.container_id, before.container_id, "the running container is adopted, not replaced");
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // Still managed: a killed container is replaced.
    docker_ok(&["kill", &agent.container_name("web")]);
    let replaced = agent.wait_machine("web", "replaced and RUN", Duration::from_secs(60), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id
    });
    assert!(replaced.restarts > before.restarts);
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // A fixed file is taken up and clears the refusal.
    agent.write_containers(&good);
    wait_until("the refusal to clear", Duration::from_secs(20), || agent.status().config_error.is_none().then_some(()));
    assert!(agent.hoist_ok(&["metrics"]).contains("hoist_config_refused 0"));
}

#[test]
fn an_agent_that_never_had_a_good_config_refuses_to_start() {
    let agent = TestAgent::prepare("nolastgood", "containers:\n  web:\n    image: x\n    colour: red\n", "", FAST_ROLLOUT);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(["agent", "--config"])
        .arg(agent.path("hoist.yaml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent should have refused to start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in ["refusing to start", "no earlier good configuration", "containers.yaml", "container web", "field colour"] {
        assert!(stderr.contains(part), "{part} missing from: {stderr}");
    }
    assert!(!agent.path("state/last-good.json").exists());
}
