//! Fleet-degraded mode against real agents, Docker, the registry and NATS: four nodes whose
//! `dependency_check` reads a file of their own; the file going away on three of them at once puts
//! every node in `degraded` (one event for the fleet, the condition naming the share and the
//! window), nothing is restarted or rolled back, a new tag waits meanwhile; once the files are back
//! the mode clears (one event) and the held update goes ahead. And five nodes whose liveness check
//! reads the file (an app that dies without its database): the restarts bring back the version that
//! ran, a new version an operator pushes through fails without being rolled back or marked bad, and
//! once the file is back every node ends on it.

mod support;

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;

use hoist_core::fsm::State;
use hoist_core::status::MachineStatus;
use std::time::Duration;
use support::*;

/// The check that reads the node's dependency: the file `ok` in its directory, mounted at /dep.
const DEPENDENCY: &str = "{ type: exec, command: ['test', '-f', '/dep/ok'], interval: 1s, timeout: 2s, retries: 1 }";

/// web v1 on `port` with its dependency directory `dep`: `checks` are its health and dependency checks.
fn web(port: u16, dep: &std::path::Path, checks: &str) -> String {
    format!(
        "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    volumes: ['{}:/dep:ro']\n{checks}",
        image(),
        dep.display()
    )
}

/// `n` agents on one nats-server (degraded window 10 s), each running web with a dependency of its
/// own (present), all in RUN and each with a healthy status record.
struct Fleet {
    agents: Vec<TestAgent>,
    deps: Vec<tempfile::TempDir>,
    ports: Vec<u16>,
    before: Vec<MachineStatus>,
    _server: nats::Server,
}

impl Fleet {
    fn start(test: &str, n: usize, checks: &str) -> Fleet {
        let server = nats::Server::start();
        let agent_yaml = format!("backend: nats\nnats:\n  servers: ['{}']\nfleet:\n  degraded: {{ window: 10s }}\n", server.url());
        let deps: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        for d in &deps {
            std::fs::write(d.path().join("ok"), "up").unwrap();
        }
        let agents: Vec<TestAgent> =
            (0..n).map(|i| TestAgent::start_with(&format!("{test}-{i}"), &web(ports[i], deps[i].path(), checks), &agent_yaml)).collect();
        wait_until("the governor to be created", Duration::from_secs(30), || {
            agents[0].hoist(&["governor", "add", "RG", "1", "2m"]).status.success().then_some(())
        });
        let before: Vec<MachineStatus> = agents.iter().map(|a| a.wait_running("web")).collect();
        wait_until("a healthy status record per node", Duration::from_secs(30), || {
            let summary: serde_json::Value = serde_json::from_str(&agents[0].hoist_ok(&["rollout", "status", "web", "--json"])).unwrap();
            let records = summary["records"].as_array().cloned().unwrap_or_default();
            (records.len() == n && records.iter().all(|r| r["unhealthy"].is_null() && r["proven"] == true)).then_some(())
        });
        Fleet { agents, deps, ports, before, _server: server }
    }

    /// The dependency of the first `n` nodes goes away (false) or comes back.
    fn dependency(&self, n: usize, up: bool) {
        for d in &self.deps[..n] {
            match up {
                true => std::fs::write(d.path().join("ok"), "up").unwrap(),
                false => std::fs::remove_file(d.path().join("ok")).unwrap(),
            }
        }
    }
}

fn on(m: &MachineStatus, version: &str) -> bool {
    m.state == State::Run && m.version == version && m.container_id.is_some()
}

#[test]
fn a_shared_dependency_going_away_degrades_the_fleet_once_without_a_restart_and_it_clears() {
    let checks = format!(
        "    health_check: {{ type: http, port: 80, interval: 1s, timeout: 1s, retries: 2 }}\n    dependency_check: {DEPENDENCY}\n"
    );
    let fleet = Fleet::start("degraded", 4, &checks);
    let (agents, ports, before) = (&fleet.agents, &fleet.ports, &fleet.before);
    let watch = Watch::start(&agents[0], &["--fleet"]);

    // The database of three nodes goes away at once.
    fleet.dependency(3, false);
    for a in agents {
        let m = a.wait_machine("web", "the fleet's degraded condition", Duration::from_secs(60), |m| m.degraded.is_some());
        let condition = m.degraded.clone().unwrap();
        assert!(condition.contains("3 of 4 nodes (75%) running v1 turned unhealthy within 10s"), "{condition}");
    }
    for (a, was) in agents[..3].iter().zip(before) {
        let m = a.machine("web").unwrap();
        assert!(m.report.unhealthy.as_deref().is_some_and(|u| u.starts_with("dependency check failed")), "{m:?}");
        assert_eq!((m.state, &m.container_id, m.restarts), (State::Run, &was.container_id, was.restarts), "report-only: {m:?}");
    }
    assert_eq!(agents[3].machine("web").unwrap().report.unhealthy, None);
    let text = agents[0].hoist_ok(&["rollout", "status", "web"]);
    assert!(text.contains("fleet degraded: 3 of 4 nodes") && text.contains("unhealthy, dependency check failed"), "{text}");

    // A new tag meanwhile waits: the outage would fail it for nothing, with no rollback to protect it.
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    for a in agents {
        a.wait_machine("web", "the update held back", Duration::from_secs(30), |m| {
            m.activity.as_deref().is_some_and(|s| s.starts_with("waiting while the fleet is degraded to update to v2"))
        });
    }
    for (i, (a, was)) in agents.iter().zip(before).enumerate() {
        let m = a.machine("web").unwrap();
        assert!(on(&m, "v1") && m.container_id == was.container_id && m.bad_version.is_none(), "{m:?}");
        assert_eq!(http_get(ports[i]).as_deref(), Some("v1"));
    }
    // `hoist rollout status` says so: every node waits for v2, held by the degraded fleet.
    wait_until("every node's record waiting for v2", Duration::from_secs(30), || {
        let summary: serde_json::Value = serde_json::from_str(&agents[0].hoist_ok(&["rollout", "status", "web", "--json"])).unwrap();
        let records = summary["records"].as_array().cloned().unwrap_or_default();
        let held = |r: &serde_json::Value| {
            r["phase"] == "waiting"
                && r["version"] == "v1"
                && r["desired"] == "v2"
                && r["blocking"].as_str().is_some_and(|b| b.starts_with("waiting while the fleet is degraded"))
        };
        (records.len() == 4 && records.iter().all(held)).then_some(())
    });

    // The database is back: the mode clears once the share has stayed under the threshold a window.
    fleet.dependency(3, true);
    for a in agents {
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
    for (a, was) in agents.iter().zip(before) {
        assert_eq!(a.machine("web").unwrap().restarts, was.restarts + 1);
    }
}

#[test]
fn while_degraded_failing_nodes_bring_back_what_ran_and_a_version_pushed_through_is_not_rolled_back() {
    // Liveness reads the dependency: without it the app is down, and restarted, on every node.
    let checks = format!("    health_check: {DEPENDENCY}\n    restart_backoff: {{ initial: 2s, max: 4s }}\n");
    let fleet = Fleet::start("degraded-live", 5, &checks);
    let agents = &fleet.agents;
    let watch = Watch::start(&agents[0], &["--fleet"]);
    fleet.dependency(4, false);
    for a in agents {
        let m = a.wait_machine("web", "the fleet's degraded condition", Duration::from_secs(90), |m| m.degraded.is_some());
        assert!(m.degraded.as_deref().is_some_and(|d| d.contains("running v1 turned unhealthy within 10s")), "{m:?}");
    }
    // A new tag: no node takes it, not even those being restarted (each brings back v1).
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let restarted = agents[1].machine("web").unwrap().restarts;
    agents[1].wait_machine("web", "restarted again since the tag", Duration::from_secs(30), |m| m.restarts > restarted);
    for a in agents {
        let m = a.machine("web").unwrap();
        assert!(m.image.as_deref().is_some_and(|i| i.ends_with(":v1")) && m.bad_version.is_none(), "{m:?}");
    }
    // An operator pushes v2 through on one failing node: it fails with the outage, is tried again at
    // its backoff, and is neither rolled back nor marked bad here or for the fleet.
    agents[0].hoist_ok(&["transition", "web", "update"]);
    let tried = agents[0].wait_machine("web", "v2 failing in its gate", Duration::from_secs(60), |m| {
        m.image.as_deref().is_some_and(|i| i.ends_with(":v2")) && m.last_error.as_deref().is_some_and(|e| e.contains("health check failed"))
    });
    agents[0].wait_machine("web", "v2 tried again", Duration::from_secs(30), |m| m.restarts > tried.restarts && m.image == tried.image);
    let m = agents[0].machine("web").unwrap();
    assert!(m.bad_version.is_none() && m.degraded.is_some(), "{m:?}");
    assert!(!agents[0].hoist(&["kv", "get", "HOIST", "container/web/rollback"]).status.success(), "no fleet rollback mark");

    fleet.dependency(4, true);
    for a in agents {
        let m = a.wait_machine("web", "on v2 once recovered", Duration::from_secs(120), |m| {
            m.state == State::Run && m.version == "v2" && m.degraded.is_none()
        });
        assert_eq!(m.bad_version, None, "{m:?}");
    }
    let events = watch.finish();
    assert!(!events.iter().any(|e| e.transition == "rollback"), "{events:#?}");
    let fleet_events = events.iter().filter(|e| matches!(e.transition.as_str(), "degraded" | "recovered")).count();
    assert_eq!(fleet_events, 2, "{events:#?}");
}
