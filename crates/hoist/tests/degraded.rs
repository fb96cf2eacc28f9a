//! Fleet-degraded mode against real agents, Docker, the registry and NATS: four nodes whose
//! `dependency_check` reads a file of their own; the file going away on three of them at once puts
//! every node in `degraded` (one event for the fleet, the condition naming the share and the
//! window), nothing is restarted or rolled back, a new tag waits meanwhile; once the files are back
//! the mode clears (one event) and the held update goes ahead.

mod support;

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;

use hoist_core::fsm::State;
use hoist_core::status::MachineStatus;
use std::time::Duration;
use support::*;

fn web(port: u16, dep: &std::path::Path) -> String {
    format!(
        "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    volumes: ['{}:/dep:ro']\n    health_check: {{ type: http, port: 80, interval: 1s, timeout: 1s, retries: 2 }}\n    dependency_check: {{ type: exec, command: ['test', '-f', '/dep/ok'], interval: 1s, timeout: 2s, retries: 1 }}\n",
        image(),
        dep.display()
    )
}

fn on(m: &MachineStatus, version: &str) -> bool {
    m.state == State::Run && m.version == version && m.container_id.is_some()
}

#[test]
fn a_shared_dependency_going_away_degrades_the_fleet_once_without_a_restart_and_it_clears() {
    let server = nats::Server::start();
    let agent_yaml = format!("backend: nats\nnats:\n  servers: ['{}']\nfleet:\n  degraded: {{ window: 10s }}\n", server.url());
    let deps: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    for d in &deps {
        std::fs::write(d.path().join("ok"), "up").unwrap();
    }
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let agents: Vec<TestAgent> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, n)| TestAgent::start_with(&format!("degraded-{n}"), &web(ports[i], deps[i].path()), &agent_yaml))
        .collect();
    wait_until("the governor to be created", Duration::from_secs(30), || {
        agents[0].hoist(&["governor", "add", "RG", "1", "2m"]).status.success().then_some(())
    });
    let before: Vec<MachineStatus> = agents.iter().map(|a| a.wait_running("web")).collect();
    wait_until("four healthy status records", Duration::from_secs(30), || {
        let summary: serde_json::Value = serde_json::from_str(&agents[0].hoist_ok(&["rollout", "status", "web", "--json"])).unwrap();
        let records = summary["records"].as_array().cloned().unwrap_or_default();
        (records.len() == 4 && records.iter().all(|r| r["unhealthy"].is_null() && r["proven"] == true)).then_some(())
    });
    let watch = Watch::start(&agents[0], &["--fleet"]);

    // The database of three nodes goes away at once.
    for d in &deps[..3] {
        std::fs::remove_file(d.path().join("ok")).unwrap();
    }
    for a in &agents {
        let m = a.wait_machine("web", "the fleet's degraded condition", Duration::from_secs(60), |m| m.degraded.is_some());
        let condition = m.degraded.clone().unwrap();
        assert!(condition.contains("3 of 4 nodes (75%) running v1 turned unhealthy within 10s"), "{condition}");
    }
    for (a, was) in agents[..3].iter().zip(&before) {
        let m = a.machine("web").unwrap();
        assert!(m.report.unhealthy.as_deref().is_some_and(|u| u.starts_with("dependency check failed")), "{m:?}");
        assert_eq!((m.state, &m.container_id, m.restarts), (State::Run, &was.container_id, was.restarts), "report-only: {m:?}");
    }
    assert_eq!(agents[3].machine("web").unwrap().report.unhealthy, None);
    let text = agents[0].hoist_ok(&["rollout", "status", "web"]);
    assert!(text.contains("fleet degraded: 3 of 4 nodes") && text.contains("unhealthy, dependency check failed"), "{text}");

    // A new tag meanwhile waits: the outage would fail it for nothing, with no rollback to protect it.
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    for a in &agents {
        a.wait_machine("web", "the update held back", Duration::from_secs(30), |m| {
            m.activity.as_deref().is_some_and(|s| s.starts_with("waiting while the fleet is degraded to update"))
        });
    }
    for (i, (a, was)) in agents.iter().zip(&before).enumerate() {
        let m = a.machine("web").unwrap();
        assert!(on(&m, "v1") && m.container_id == was.container_id && m.bad_version.is_none(), "{m:?}");
        assert_eq!(http_get(ports[i]).as_deref(), Some("v1"));
    }

    // The database is back: the mode clears once the share has stayed under the threshold a window.
    for d in &deps[..3] {
        std::fs::write(d.path().join("ok"), "up").unwrap();
    }
    for a in &agents {
        a.wait_machine("web", "the condition cleared", Duration::from_secs(60), |m| m.degraded.is_none() && m.report.unhealthy.is_none());
    }
    for (i, a) in agents.iter().enumerate() {
        let m = a.wait_machine("web", "the held update done", Duration::from_secs(90), |m| on(m, "v2"));
        assert_eq!((m.bad_version, m.condition), (None, None));
        assert_eq!(http_get(ports[i]).as_deref(), Some("v2"));
    }
    let events = watch.finish();
    let fleet_events: Vec<&str> =
        events.iter().filter(|e| matches!(e.transition.as_str(), "degraded" | "recovered")).map(|e| e.transition.as_str()).collect();
    assert_eq!(fleet_events, ["degraded", "recovered"], "one event each for the whole fleet: {events:#?}");
    assert!(!events.iter().any(|e| e.transition == "rollback"), "{events:#?}");
    // Nothing was restarted for the outage: the one replacement per node is the update to v2.
    for (a, was) in agents.iter().zip(&before) {
        assert_eq!(a.machine("web").unwrap().restarts, was.restarts + 1);
    }
}
