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

/// Three agents on `server`, each running `web` (v1, following the KV, restart governor RG at
/// capacity 1, registering its port, in the bucket and on ccm's subject), all in RUN, taking fleet requests signed by the operator key
/// returned (which their agent files also give the CLI to sign with).
fn three_agents(test: &str, server: &nats::Server) -> (Vec<TestAgent>, OperatorKey) {
    let operator = OperatorKey::new();
    let agent_yaml = format!(
        "backend: nats\nnats:\n  servers: ['{}']\nregistration:\n  interval: 1s\n  ccm: true\n{}",
        server.url(),
        operator.fleet_yaml("tester", "[status, transition]")
    );
    let container = |port: u16| {
        format!(
            "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    register_ports:\n      - {{ cluster: t, service: web, protocol: http, ip: 127.0.0.1, port: {port} }}\n",
            image()
        )
    };
    let agents: Vec<TestAgent> =
        ["a", "b", "c"].iter().map(|n| TestAgent::start_with(&format!("{test}-{n}"), &container(free_port()), &agent_yaml)).collect();
    agents[0].hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    for a in &agents {
        a.wait_running("web");
    }
    (agents, operator)
}

fn record_webs(agents: &[TestAgent]) -> DockerRecord {
    DockerRecord::start(&agents.iter().map(|a| format!("container={}", a.container_name("web"))).collect::<Vec<_>>())
}

fn all_on(agents: &[TestAgent], version: &str, what: &str) {
    wait_until(what, Duration::from_secs(120), || {
        let a = fleet_status(&agents[0], &[]);
        (a.replies.len() == agents.len()
            && a.replies.iter().all(|r| r.status.machines.iter().all(|m| m.state == State::Run && m.version == version)))
        .then_some(())
    });
}

#[test]
fn a_fleet_rolls_one_instance_at_a_time_and_answers_fleet_commands() {
    let server = nats::Server::start();
    let ccm = SubjectRecord::start(&server, "choria.ccm.registration.v1");
    let (mut agents, _operator) = three_agents("fleet", &server);
    let nodes: BTreeSet<String> = agents.iter().map(|a| a.node.clone()).collect();

    // Each node's registration is also published on ccm's subject, with the bucket's JSON.
    let bucket = wait_until("three registrations in the bucket", Duration::from_secs(10), || {
        let entries: Vec<serde_json::Value> = serde_json::from_str(&agents[0].hoist_ok(&["services", "--json"])).unwrap();
        (entries.len() == 3).then_some(entries)
    });
    let published = wait_until("three ccm registrations", Duration::from_secs(10), || {
        let subjects: BTreeSet<String> = ccm.events().into_iter().map(|(subject, _)| subject).collect();
        (subjects.len() == 3).then_some(subjects)
    });
    for subject in &published {
        assert!(subject.starts_with("choria.ccm.registration.v1.t.http.web.127_0_0_1."), "{subject}");
    }
    for (_, body) in ccm.events() {
        assert!(bucket.contains(&body), "the same entry as in the bucket: {body} vs {bucket:?}");
    }

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
    let record = record_webs(&agents);
    let watch = Watch::start(&agents[2], &["--fleet"]);
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    all_on(&agents, "v2", "every node on v2");
    let (record, max_down) = record.finish();
    assert_eq!(max_down, 1, "restart governor capacity 1 across the fleet; docker events:\n{record}");
    assert_eq!(record.lines().filter(|l| l.starts_with("die")).count(), 3, "{record}");

    // `hoist watch --fleet` on one node saw every node's machine go through the update.
    let events = watch.finish();
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
    assert_eq!(answer.missing.iter().map(|m| m.node.clone()).collect::<Vec<_>>(), vec![dead]);
    wait_until("the dead node's registration to expire", Duration::from_secs(10), || (services(&agents[0]).len() == 1).then_some(()));
}

#[test]
fn a_failing_version_is_tried_on_one_node_and_stopped_fleet_wide() {
    let server = nats::Server::start();
    let (agents, _operator) = three_agents("fleetrb", &server);
    let record = record_webs(&agents);
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "broken"]);
    let answer = wait_until("every node on v1 with the version marked bad", Duration::from_secs(120), || {
        let a = fleet_status(&agents[0], &[]);
        (a.replies.len() == 3
            && a.replies
                .iter()
                .all(|r| r.status.machines.iter().all(|m| m.state == State::Run && m.version == "v1" && m.condition.is_some())))
        .then_some(a)
    });
    let (record, max_down) = record.finish();
    // One node tried it: its v1 died (replaced by broken), broken died, v1 came back, in one slot.
    let tried: BTreeSet<&str> = record.lines().filter_map(|l| l.strip_prefix("die ")).collect();
    assert_eq!(tried.len(), 1, "only one node tried the broken version; docker events:\n{record}");
    assert_eq!(max_down, 1, "docker events:\n{record}");
    let tried_node = agents.iter().find(|a| tried.contains(a.container_name("web").as_str())).expect("a node of the test").node.clone();

    // The others say why they stayed, and the mark names where it failed.
    for reply in answer.replies.iter().filter(|r| r.node != tried_node) {
        let condition = reply.status.machines[0].condition.clone().unwrap_or_default();
        assert!(condition.contains(&format!("broken was rolled back on {tried_node}")), "{}: {condition}", reply.node);
    }
    // Only the node that tried it pulled it: the others waited for their turn before fetching a
    // version no node had passed yet, and then read the verdict.
    for a in agents.iter().filter(|a| a.node != tried_node) {
        let pulled = a.log().lines().any(|l| l.contains("pull") && l.contains(":broken") && l.contains("status="));
        assert!(!pulled, "{} pulled a version it never tried:\n{}", a.node, a.log());
    }
    let mark: serde_json::Value = serde_json::from_str(&agents[1].hoist_ok(&["kv", "get", "HOIST", "container/web/rollback"])).unwrap();
    assert_eq!((mark["version"].as_str(), mark["node"].as_str()), (Some("broken"), Some(tried_node.as_str())), "{mark}");
    for a in &agents {
        assert_eq!(http_get_container(a), Some("v1".to_string()), "{} serves v1", a.node);
    }

    // An operator's `update` across the fleet asks for another try: again one node tries it and the
    // rest stop at its verdict.
    let mark_revision = || -> Option<u64> {
        let out = agents[1].hoist(&["kv", "get", "HOIST", "container/web/rollback", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["revision"].as_u64()
    };
    let first_verdict = mark_revision().expect("the mark's revision");
    let record = record_webs(&agents);
    let out = agents[0].hoist_ok(&["transition", "--fleet", "web", "update", "--json"]);
    let answer: FleetAnswer = serde_json::from_str(&out).unwrap();
    assert_eq!(answer.replies.len(), 3, "{out}");
    // `update` deletes the old verdict, or every node would stop at it and none would try.
    wait_until("the retry's verdict recorded", Duration::from_secs(120), || mark_revision().filter(|r| *r > first_verdict));
    all_on(&agents, "v1", "every node back on v1");
    let (record, max_down) = record.finish();
    let tried_again: BTreeSet<&str> = record.lines().filter_map(|l| l.strip_prefix("die ")).collect();
    assert_eq!(tried_again.len(), 1, "one node tried it again; docker events:\n{record}");
    assert_eq!(max_down, 1, "docker events:\n{record}");
}

/// Messages under a subject prefix as a Choria tool would see them: (subject, body).
struct SubjectRecord {
    _runtime: tokio::runtime::Runtime,
    events: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
}

impl SubjectRecord {
    /// Records what is published under `prefix.>` from now on.
    fn start(server: &nats::Server, prefix: &'static str) -> SubjectRecord {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (url, sink) = (server.url(), events.clone());
        runtime.spawn(async move {
            use futures_util::StreamExt;
            let client = async_nats::connect(url).await.expect("connect");
            let mut messages = client.subscribe(format!("{prefix}.>")).await.expect("subscribe");
            // Live once our own message comes back.
            let sync = format!("{prefix}.sync");
            client.publish(sync.clone(), "{}".into()).await.unwrap();
            while let Some(msg) = messages.next().await {
                if msg.subject.as_str() == sync {
                    let _ = ready_tx.send(());
                    continue;
                }
                let body = serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null);
                sink.lock().unwrap().push((msg.subject.to_string(), body));
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("the subscription");
        SubjectRecord { _runtime: runtime, events }
    }

    fn events(&self) -> Vec<(String, serde_json::Value)> {
        self.events.lock().unwrap().clone()
    }
}

#[test]
fn a_nats_outage_keeps_containers_remediated_locally_and_catches_up_on_kv_changes() {
    let mut server = nats::Server::start();
    let port = free_port();
    let agent_yaml = format!("backend: nats\nnats:\n  servers: ['{}']\n", server.url());
    let agent = TestAgent::start_with(
        "natsdown",
        &format!(
            "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    ports: ['127.0.0.1:{port}:80']\n",
            image()
        ),
        &agent_yaml,
    );
    let before = agent.wait_running("web");

    // The server goes away from the agent's address (it comes back elsewhere, where only this test
    // reaches it): the agent still remediates on its own.
    let home = server.port;
    server.restart_on(free_port());
    docker_ok(&["kill", &agent.container_name("web")]);
    let replaced = agent.wait_machine("web", "replaced without NATS", Duration::from_secs(30), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id
    });
    assert_eq!(replaced.restarts, before.restarts + 1);

    // A tag written while the agent cannot see NATS is applied once it can.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use hoist_core::backend::Kv;
        let elsewhere = nats::connect(vec![server.url()]).await;
        elsewhere.put("HOIST", "container/web/tag", b"v2").await.expect("put during the outage");
    });
    server.restart_on(home);
    agent.wait_machine("web", "on v2 after the outage", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");
}

#[test]
fn a_revert_after_its_slot_was_lost_waits_for_a_slot_again() {
    let server = nats::Server::start();
    let agent_yaml = format!("backend: nats\nnats:\n  servers: ['{}']\n", server.url());
    // Ten seconds of confirmation leave time to take a node's slot away and then fail its new version
    // (the check fails once the test creates /tmp/fail in the container).
    let rollout = "{ unverified_wait: 1s, min_healthy_time: 10s, healthy_deadline: 60s, governor_timeout: 120s }";
    let container = |port: u16| {
        format!(
            "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    health_check: {{ type: exec, command: ['sh', '-c', 'test ! -f /tmp/fail'], interval: 1s, timeout: 1s, retries: 2 }}\n",
            image()
        )
    };
    let agents: Vec<TestAgent> = ["a", "b"]
        .iter()
        .map(|n| TestAgent::start_with_rollout(&format!("lostslot-{n}"), &container(free_port()), &agent_yaml, rollout))
        .collect();
    agents[0].hoist_ok(&["governor", "add", "RG", "1", "5m"]);
    for a in &agents {
        a.wait_running("web");
    }
    let record = record_webs(&agents);
    let lifecycle = SubjectRecord::start(&server, "choria.lifecycle.event.governor");
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let confirming = |a: &TestAgent| {
        a.machine("web").is_some_and(|m| m.state == State::Restart && m.activity.is_some_and(|x| x.starts_with("healthy; confirming")))
    };
    let first = wait_until("a node confirming v2", Duration::from_secs(60), || agents.iter().position(confirming));
    let (first, second) = (&agents[first], &agents[1 - first]);

    // The first node's slot goes (as an expiry or a lowered capacity would take it): the second takes
    // it and updates too.
    let view: hoist_core::backend::GovernorInfo = serde_json::from_str(&first.hoist_ok(&["governor", "view", "RG", "--json"])).unwrap();
    assert_eq!(view.leases.len(), 1, "{view:?}");
    first.hoist_ok(&["governor", "evict", "RG", &view.leases[0].seq.to_string()]);
    wait_until("the second node confirming v2 in the freed slot", Duration::from_secs(30), || confirming(second).then_some(()));

    // Now the first node's v2 fails: its revert to v1 must wait for a slot, not go on the lost one.
    let out = first.docker(&["exec", &first.container_name("web"), "touch", "/tmp/fail"]);
    assert!(out.status.success(), "{out:?}");
    let waiting = first.wait_machine("web", "the revert waiting for a slot", Duration::from_secs(30), |m| {
        m.activity.as_deref() == Some("waiting for a slot of governor RG")
    });
    assert_eq!(waiting.version, "v2", "v2 runs on meanwhile: {waiting:#?}");
    assert!(waiting.desired_image.ends_with(":v1"), "reverting to v1: {waiting:#?}");
    assert!(confirming(second), "the second node still holds the only slot");
    assert!(first.log().contains("the governor slot taken for this update was lost"), "and says why it waits");

    wait_until("the first node back on v1, the second on v2", Duration::from_secs(90), || {
        let (a, b) = (first.machine("web")?, second.machine("web")?);
        (a.state == State::Run && a.version == "v1" && b.state == State::Run && b.version == "v2").then_some(())
    });
    let (record, max_down) = record.finish();
    assert_eq!(max_down, 1, "capacity 1 held even after a lost slot; docker events:\n{record}");

    // Choria's tools saw it all: the first node entering, the operator's eviction, and the slots the
    // nodes took and left afterwards.
    let events = lifecycle.events();
    let seq = view.leases[0].seq;
    let find = |subject: &str, kind: &str| {
        events.iter().find(|(s, e)| s == subject && e["event_type"] == kind && e["sequence"] == seq).map(|(_, e)| e.clone())
    };
    let enter = find("choria.lifecycle.event.governor.hoist_web", "enter").unwrap_or_else(|| panic!("no enter event: {events:#?}"));
    assert_eq!(enter["protocol"], "io.choria.lifecycle.v1.governor");
    assert_eq!(
        (enter["identity"].as_str(), enter["component"].as_str(), enter["governor"].as_str()),
        (Some(first.node.as_str()), Some("hoist_web"), Some("RG"))
    );
    let eviction = find("choria.lifecycle.event.governor.CLI", "eviction").unwrap_or_else(|| panic!("no eviction event: {events:#?}"));
    assert_eq!(eviction["identity"].as_str(), Some(view.leases[0].holder.as_str()));
    let exits = events.iter().filter(|(_, e)| e["event_type"] == "exit").count();
    assert!(exits >= 2, "the second node's update and the first node's revert left their slots: {events:#?}");
}
