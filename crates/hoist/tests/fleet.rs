//! Fleet mode: several agents (distinct node names, one Docker Engine) sharing a real nats-server.

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;
mod support;

use hoist_core::fleet::FleetAnswer;
use hoist_core::fsm::State;
use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

fn fleet_status(agent: &TestAgent, extra: &[&str]) -> FleetAnswer {
    let mut args = vec!["status", "--fleet", "--json"];
    args.extend_from_slice(extra);
    let out = agent.hoist(&args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("fleet status JSON ({e}): {out:?}"))
}

#[test]
fn a_fleet_rolls_one_instance_at_a_time_and_answers_fleet_commands() {
    let server = nats::Server::start();
    let agent_yaml = format!("backend: nats\nnats:\n  servers: ['{}']\nregistration:\n  interval: 1s\n", server.url());
    let container = |port: u16| {
        format!(
            "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    register_ports:\n      - {{ cluster: t, service: web, protocol: http, ip: 127.0.0.1, port: {port} }}\n",
            image()
        )
    };
    let mut agents: Vec<TestAgent> =
        ["fleet-a", "fleet-b", "fleet-c"].iter().map(|name| TestAgent::start_with(name, &container(free_port()), &agent_yaml)).collect();
    agents[0].hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    for a in &agents {
        a.wait_running("web");
    }
    let nodes: BTreeSet<String> = agents.iter().map(|a| a.node.clone()).collect();

    // Every node answers a fleet status, with the summaries across the fleet.
    let answer = wait_until("all nodes to answer", Duration::from_secs(20), || {
        let a = fleet_status(&agents[0], &[]);
        (a.replies.len() == 3).then_some(a)
    });
    assert_eq!(answer.replies.iter().map(|r| r.node.clone()).collect::<BTreeSet<_>>(), nodes);
    assert!(answer.missing.is_empty());
    let table = agents[1].hoist_ok(&["status", "--fleet"]);
    assert!(table.contains("Summary of State:\n   RUN: 3") && table.contains("3 node(s) answered"), "{table}");

    // One KV put rolls every node to v2; Docker's record shows at most one container down at a time.
    let names: Vec<String> = agents.iter().map(|a| a.container_name("web")).collect();
    let docker_events = std::process::Command::new("docker")
        .args(["events", "--filter", "type=container", "--filter", "event=die", "--filter", "event=start"])
        .args(names.iter().flat_map(|n| ["--filter".to_string(), format!("container={n}")]))
        .args(["--format", "{{.Action}} {{.Actor.Attributes.name}}"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let watch = std::process::Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--config")
        .arg(agents[2].path("hoist.yaml"))
        .args(["watch", "--fleet", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    wait_until("every node on v2", Duration::from_secs(90), || {
        let a = fleet_status(&agents[0], &[]);
        (a.replies.len() == 3 && a.replies.iter().all(|r| r.status.machines.iter().all(|m| m.state == State::Run && m.version == "v2")))
            .then_some(())
    });
    let mut docker_events = docker_events;
    docker_events.kill().unwrap();
    let record = String::from_utf8_lossy(&docker_events.wait_with_output().unwrap().stdout).into_owned();
    let (mut down, mut max_down) = (BTreeSet::new(), 0);
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
    assert_eq!(max_down, 1, "restart governor capacity 1 across the fleet; docker events:\n{record}");
    assert_eq!(record.lines().filter(|l| l.starts_with("die")).count(), 3, "{record}");

    // `hoist watch --fleet` on one node saw every node's machine go through the update.
    let mut watch = watch;
    watch.kill().unwrap();
    let out = watch.wait_with_output().unwrap();
    let events: Vec<hoist_core::backend::TransitionEvent> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect();
    for node in &nodes {
        let path: Vec<&str> = events.iter().filter(|e| &e.identity == node).map(|e| e.to_state.as_str()).collect();
        assert_eq!(path, ["UPDATE", "RESTART", "RUN"], "{node}: {events:#?}");
    }

    // A transition addressed to one node changes only that node.
    let target = agents[1].node.clone();
    let out = agents[0].hoist_ok(&["transition", "--node", &target, "web", "maintenance", "--json"]);
    let answer: FleetAnswer = serde_json::from_str(&out).unwrap();
    assert_eq!(answer.replies.len(), 1, "{out}");
    assert_eq!(answer.replies[0].transitions[0].state, Some(State::Maintenance));
    assert_eq!(agents[1].machine("web").unwrap().state, State::Maintenance);
    assert_eq!(agents[0].machine("web").unwrap().state, State::Run);
    let refused = agents[0].hoist(&["transition", "--node", &target, "web", "restart"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stdout).contains("allowed: resume"), "{refused:?}");

    // A dead node: named as not answering, and its service registration expires.
    let services = |a: &TestAgent| -> Vec<serde_json::Value> { serde_json::from_str(&a.hoist_ok(&["services", "--json"])).unwrap() };
    wait_until("two registrations (one node is in maintenance)", Duration::from_secs(10), || {
        (services(&agents[0]).len() == 2).then_some(())
    });
    let dead = agents[2].node.clone();
    agents[2].kill_agent();
    let answer = fleet_status(&agents[0], &["--timeout", "1s"]);
    assert_eq!(answer.replies.len(), 2);
    assert_eq!(answer.missing, vec![dead]);
    wait_until("the dead node's registration to expire", Duration::from_secs(10), || (services(&agents[0]).len() == 1).then_some(()));
}
