//! Release records against real agents, Docker, the registry and NATS (a 3-node cluster): a release
//! pins the fleet to the digest its tag named when it was made, even when the tag moves mid-rollout;
//! canary waves wait for their bake time, the next wave fetching the image meanwhile; a broken release
//! stops at its failure budget with only its first wave having run it (and no other fetching it); an
//! abort leaves the nodes it had not reached alone; a failing preflight keeps the canary serving; a tag that cannot be resolved writes nothing;
//! `hoist rollout status` tells, in one read, who waits, who is down and who serves.

mod support;

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;

use hoist_core::fsm::State;
use hoist_core::release::{ReleaseRecord, ReleaseState};
use hoist_core::status::MachineStatus;
use std::time::Duration;
use support::*;

/// A confirmation long enough that a rollout at capacity 1 is still going when the test acts on it.
const SLOW_GATE: &str = "{ unverified_wait: 1s, min_healthy_time: 4s, healthy_deadline: 60s, governor_timeout: 120s }";

fn web(port: u16, extra: &str) -> String {
    format!(
        "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    health_check: {{ type: http, port: 80, interval: 1s, timeout: 1s, retries: 2 }}\n{extra}",
        image()
    )
}

/// Three agents on `urls`, running web v1 behind restart governor RG (capacity 1), all in RUN.
fn three_agents(test: &str, urls: &[String]) -> Vec<TestAgent> {
    three_agents_with(test, urls, "", &[free_port(), free_port(), free_port()])
}

/// `three_agents`, with `extra` in web's definition and web published on `ports`.
fn three_agents_with(test: &str, urls: &[String], extra: &str, ports: &[u16; 3]) -> Vec<TestAgent> {
    let list = urls.iter().map(|u| format!("'{u}'")).collect::<Vec<_>>().join(", ");
    let agent_yaml = format!("backend: nats\nnats:\n  servers: [{list}]\n");
    let agents: Vec<TestAgent> = ["a", "b", "c"]
        .iter()
        .zip(ports)
        .map(|(n, port)| TestAgent::start_with_rollout(&format!("{test}-{n}"), &web(*port, extra), &agent_yaml, SLOW_GATE))
        .collect();
    wait_until("the governor to be created", Duration::from_secs(30), || {
        agents[0].hoist(&["governor", "add", "RG", "1", "2m"]).status.success().then_some(())
    });
    for a in &agents {
        a.wait_running("web");
    }
    // Each in the rollout view, so a release's plan orders all three.
    wait_until("three status records", Duration::from_secs(30), || (rollout_status(&agents[0])["nodes"] == 3).then_some(()));
    agents
}

fn on(m: &MachineStatus, version: &str) -> bool {
    m.state == State::Run && m.version == version && m.container_id.is_some()
}

/// `hoist rollout status web --json`, which exits 0 unless the release was aborted.
fn rollout_status(agent: &TestAgent) -> serde_json::Value {
    serde_json::from_str(&agent.hoist_ok(&["rollout", "status", "web", "--json"])).expect("a rollout summary")
}

fn release(agent: &TestAgent, args: &[&str]) -> ReleaseRecord {
    let mut all = vec!["release", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&agent.hoist_ok(&all)).expect("a release record")
}

#[test]
fn a_release_pins_the_fleet_to_its_digest_even_when_the_tag_moves_mid_rollout() {
    let cluster = nats::Cluster::start();
    let agents = three_agents("pinned", &cluster.urls());
    let tag = format!("release-pinned-{}", std::process::id());
    move_tag(&tag, "v2");
    let (v1, v2, v3) = (registry_digest("v1"), registry_digest("v2"), registry_digest("v3"));

    let record = release(&agents[0], &["web", &tag]);
    assert_eq!((record.tag.as_str(), record.digest.as_str(), record.state), (tag.as_str(), v2.as_str(), ReleaseState::Rolling));
    assert_eq!((record.previous.as_deref(), record.previous_digest.as_deref()), (None, Some(v1.as_str())), "{record:?}");
    assert!(record.by.contains('@'), "who released it: {record:?}");
    assert!(
        !agents[1].hoist(&["kv", "get", "HOIST", "container/web/tag"]).status.success(),
        "the record, not the tag key, moves the fleet"
    );

    // The tag moves while the first node is being replaced: the nodes not updated yet still get
    // what the release resolved, not the tag's new content.
    wait_until("a node to be replaced", Duration::from_secs(60), || {
        agents.iter().any(|a| a.machine("web").is_some_and(|m| m.state == State::Restart)).then_some(())
    });
    move_tag(&tag, "v3");
    // One read shows the rollout: one node being replaced or in its gate, the others waiting for
    // the governor's slot while they serve the old version, and who they are.
    let during = wait_until("the rollout's status", Duration::from_secs(30), || {
        let s = rollout_status(&agents[2]);
        let replacing = s["phases"]["down"].as_u64().unwrap_or(0) + s["phases"]["gate"].as_u64().unwrap_or(0);
        let waiting_for_rg = s["blocking"].as_array()?.iter().any(|b| b["reason"].as_str().is_some_and(|r| r.contains("governor RG")));
        (s["nodes"] == 3 && replacing == 1 && s["phases"]["waiting"] == 2 && waiting_for_rg).then_some(s)
    });
    assert_eq!(during["release"]["digest"], v2.as_str(), "{during:#}");
    for a in &agents {
        let m = a.wait_machine("web", "on the released digest", Duration::from_secs(180), |m| on(m, &v2));
        assert_eq!(m.image, Some(format!("{}@{v2}", image())), "{}: {m:?}", a.node);
        assert_ne!(m.digest.as_deref(), Some(v3.as_str()), "{}: the moved tag's content never ran", a.node);
        assert_eq!(http_get_container(a).as_deref(), Some("v2"), "{} serves the released build", a.node);
    }
    let done = wait_until("every node serving", Duration::from_secs(30), || {
        let s = rollout_status(&agents[1]);
        (s["phases"]["serving"] == 3).then_some(s)
    });
    assert!(done["blocking"].as_array().is_some_and(|b| b.is_empty()), "{done:#}");
    let table = agents[0].hoist_ok(&["rollout", "status", "web"]);
    assert!(table.contains("3 node(s): 3 serving the desired version"), "{table}");
    let shown = wait_until("the release to be complete", Duration::from_secs(30), || {
        let shown = agents[2].hoist_ok(&["release", "show", "web"]);
        shown.contains("complete").then_some(shown)
    });
    assert!(shown.contains(&format!("{tag} = {v2}")), "{shown}");
    let _ = docker(&["rmi", &format!("{}:{tag}", image())]);
}

#[test]
fn an_abort_mid_rollout_brings_back_the_nodes_that_ran_it_and_leaves_the_rest_alone() {
    let server = nats::Server::start();
    let agents = three_agents("abort", &[server.url()]);
    let before: Vec<MachineStatus> = agents.iter().map(|a| a.machine("web").unwrap()).collect();
    let v2 = registry_digest("v2");
    release(&agents[0], &["web", "v2"]);

    // The first node takes its slot; abort while it confirms the new version.
    let first = wait_until("a node to be replaced", Duration::from_secs(60), || {
        agents.iter().position(|a| a.machine("web").is_some_and(|m| m.state == State::Restart || on(&m, &v2)))
    });
    let aborted = release(&agents[1], &["abort", "web"]);
    assert_eq!(aborted.state, ReleaseState::Aborted);
    let refused = agents[1].hoist(&["release", "abort", "web"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("cannot be aborted"), "{refused:?}");

    for (i, a) in agents.iter().enumerate() {
        let m = a.wait_machine("web", "back on v1", Duration::from_secs(120), |m| on(m, "v1"));
        assert_eq!(http_get_container(a).as_deref(), Some("v1"));
        if i != first {
            // Still the container it ran before the release: never pulled, stopped or replaced.
            assert_eq!((m.container_id.clone(), m.restarts), (before[i].container_id.clone(), before[i].restarts), "{}: {m:?}", a.node);
        }
    }
    let tag = agents[0].hoist(&["kv", "get", "HOIST", "container/web/tag"]);
    assert!(!tag.status.success(), "the tag key was never written: {tag:?}");
    let status = agents[2].hoist(&["rollout", "status", "web"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!status.status.success() && text.contains("aborted"), "an aborted release exits non-zero: {text}");
}

/// An image that cannot even start its app (here: a setting it needs is missing) is caught by its
/// preflight on the canary, which goes on serving the old version without a single failed request,
/// and the release stops at its budget.
#[test]
fn a_failing_preflight_keeps_the_canary_serving_and_stops_the_release_at_its_budget() {
    let cluster = nats::Cluster::start();
    let ports = [free_port(), free_port(), free_port()];
    let check = "    preflight: { command: ['/bin/sh', '-c', 'echo DB_URL is not set >&2; exit 3'], timeout: 20s }\n";
    let agents = three_agents_with("preflight", &cluster.urls(), check, &ports);
    let before: Vec<MachineStatus> = agents.iter().map(|a| a.machine("web").unwrap()).collect();
    // Every node's web, asked every 50 ms from here to the end: each answer must be v1.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = ports
        .iter()
        .map(|&port| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut answers, mut wrong) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match http_get(port) {
                        Some(body) if body == "v1" => answers += 1,
                        other => wrong.push(other),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (answers, wrong)
            })
        })
        .collect();
    let v2 = registry_digest("v2");
    release(&agents[0], &["web", "v2", "--waves", "1,100%", "--budget", "0"]);

    let aborted = wait_until("the budget to abort the release", Duration::from_secs(120), || {
        let r = record_of(&agents[1]);
        (r.state == ReleaseState::Aborted).then_some(r)
    });
    assert!(aborted.reason.as_deref().is_some_and(|r| r.contains("failure budget exhausted")), "{aborted:?}");
    let canary = agents.iter().find(|a| a.node == aborted.plan.as_ref().unwrap()[0]).unwrap();
    let m = canary.wait_machine("web", "the canary back in RUN", Duration::from_secs(60), |m| on(m, "v1"));
    let why = m.last_error.clone().unwrap_or_default();
    assert!(
        why.contains(&format!("rolled back from {}@{v2}", image())) && why.contains("preflight failed (exit 3): DB_URL is not set"),
        "{why}"
    );
    // The canary's failure is what the budget counted (the abort exits 1, with the summary).
    let out = agents[2].hoist(&["rollout", "status", "web", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a rollout summary");
    assert_eq!(status["failed"], serde_json::json!([canary.node]), "{status:#}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for ((a, poller), was) in agents.iter().zip(pollers).zip(&before) {
        let (answers, wrong) = poller.join().unwrap();
        assert!(answers > 20 && wrong.is_empty(), "{}: {answers} answers of v1, and these others: {wrong:?}", a.node);
        let now = a.machine("web").unwrap();
        assert_eq!((now.container_id, now.restarts), (was.container_id.clone(), was.restarts), "{}: never stopped or replaced", a.node);
        assert!(!a.labelled_containers().iter().any(|n| n.ends_with("-preflight")), "{}: the preflight container was removed", a.node);
    }
}

#[test]
fn a_tag_that_cannot_be_resolved_releases_nothing() {
    let agent = TestAgent::start("unresolved", &web(free_port(), ""));
    let before = agent.wait_running("web");
    let out = agent.hoist(&["release", "web", "no-such-tag"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot resolve no-such-tag") && err.contains("nothing was released"), "{err}");
    for key in ["container/web/release", "container/web/tag"] {
        assert!(!agent.hoist(&["kv", "get", "HOIST", key]).status.success(), "{key} was written");
    }
    let unknown = agent.hoist(&["release", "db", "v2"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("give its repository with --image"), "{unknown:?}");
    let none = agent.hoist(&["release", "show", "web"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("no release of web is recorded"), "{none:?}");
    // One node alone reports through its own store (its record follows the machine within a second).
    let alone = wait_until("the node's status record to say it serves", Duration::from_secs(10), || {
        let s = rollout_status(&agent);
        (s["phases"]["serving"] == 1).then_some(s)
    });
    assert_eq!((&alone["nodes"], &alone["release"]), (&serde_json::json!(1), &serde_json::Value::Null), "{alone:#}");
    let after = agent.machine("web").unwrap();
    assert_eq!((after.state, after.container_id, after.restarts), (State::Run, before.container_id, before.restarts));
}

/// The release record as the CLI shows it.
fn record_of(agent: &TestAgent) -> ReleaseRecord {
    release(agent, &["show", "web"])
}

#[test]
fn a_good_release_goes_wave_by_wave_and_waits_out_its_bake_time_fetching_ahead_meanwhile() {
    let cluster = nats::Cluster::start();
    let agents = three_agents("waves", &cluster.urls());
    let v2 = registry_digest("v2");
    let bake = Duration::from_secs(12);
    let watch = Watch::start(&agents[0], &["--fleet"]);
    release(&agents[0], &["web", "v2", "--waves", "1,100%", "--bake", "12s"]);

    // The plan is frozen with the release; its first node alone gets it.
    let plan = wait_until("the plan", Duration::from_secs(20), || record_of(&agents[0]).plan);
    assert_eq!(plan.len(), 3, "every node running web is in it: {plan:?}");
    let first = agents.iter().find(|a| a.node == plan[0]).expect("a planned node is one of ours");
    first.wait_machine("web", "the canary on the release", Duration::from_secs(60), |m| on(m, &v2));
    let canary_healthy = std::time::Instant::now();
    // Through the bake, the second wave keeps serving v1, untouched, and fetches v2 ahead of its turn.
    let mut fetched_ahead = std::collections::BTreeSet::new();
    while canary_healthy.elapsed() < bake - Duration::from_secs(2) {
        for a in agents.iter().filter(|a| a.node != plan[0]) {
            let m = a.machine("web").unwrap();
            assert!(
                on(&m, "v1"),
                "{} started before the canary baked ({:?} after it was healthy): {m:?}",
                a.node,
                canary_healthy.elapsed()
            );
            if m.fetched_ahead.as_deref() == Some(v2.as_str()) {
                fetched_ahead.insert(a.node.clone());
            }
        }
        let status = rollout_status(&agents[1]);
        assert_eq!(status["release"]["wave"], 0, "{status:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let second_wave: std::collections::BTreeSet<String> = plan[1..].iter().cloned().collect();
    assert_eq!(fetched_ahead, second_wave, "the second wave fetched the release while the canary baked");
    let status = rollout_status(&agents[0]);
    assert!(
        status["blocking"].as_array().unwrap().iter().any(|b| b["reason"].as_str().unwrap().ends_with("image fetched ahead")),
        "{status:#}"
    );
    for a in &agents {
        a.wait_machine("web", "on the release", Duration::from_secs(120), |m| on(m, &v2));
    }
    let done = wait_until("the release to complete", Duration::from_secs(30), || {
        let r = record_of(&agents[2]);
        (r.state == ReleaseState::Complete).then_some(r)
    });
    assert_eq!(done.wave, 1, "{done:?}");
    let status = rollout_status(&agents[0]);
    assert_eq!((status["succeeded"].as_u64(), status["failed"].as_array().map(Vec::len)), (Some(3), Some(0)), "{status:#}");
    let fetch_events: std::collections::BTreeSet<String> =
        watch.finish().into_iter().filter(|e| e.transition == "fetch_ahead").map(|e| e.identity).collect();
    assert_eq!(fetch_events, second_wave, "one fetch_ahead event per node of the second wave");
}

#[test]
fn a_broken_release_stops_at_its_budget_with_only_the_first_wave_having_run_it() {
    let cluster = nats::Cluster::start();
    let agents = three_agents("budget", &cluster.urls());
    let before: Vec<MachineStatus> = agents.iter().map(|a| a.machine("web").unwrap()).collect();
    let watch = Watch::start(&agents[0], &["--fleet"]);
    release(&agents[0], &["web", "broken", "--waves", "1,100%", "--budget", "0"]);

    let aborted = wait_until("the budget to abort the release", Duration::from_secs(120), || {
        let r = record_of(&agents[1]);
        (r.state == ReleaseState::Aborted).then_some(r)
    });
    assert!(aborted.reason.as_deref().is_some_and(|r| r.contains("failure budget exhausted")), "{aborted:?}");
    let plan = aborted.plan.clone().expect("a plan");
    for (i, a) in agents.iter().enumerate() {
        let m = a.wait_machine("web", "back on v1", Duration::from_secs(120), |m| on(m, "v1"));
        assert_eq!(http_get_container(a).as_deref(), Some("v1"));
        if a.node != plan[0] {
            assert_eq!((m.container_id.clone(), m.restarts), (before[i].container_id.clone(), before[i].restarts), "{}: {m:?}", a.node);
        }
    }
    // Only the canary ever left RUN: the others neither pulled (UPDATE) nor replaced anything.
    let events = watch.finish();
    let moved: std::collections::BTreeSet<&str> =
        events.iter().filter(|e| e.to_state != "RUN" && e.transition != "error").map(|e| e.identity.as_str()).collect();
    assert_eq!(moved, std::collections::BTreeSet::from([plan[0].as_str()]), "{events:#?}");
    assert!(!events.iter().any(|e| e.transition == "fetch_ahead"), "nobody fetched the failed release ahead: {events:#?}");
    assert!(agents.iter().all(|a| a.machine("web").unwrap().fetched_ahead.is_none()));
    let status = agents[2].hoist(&["rollout", "status", "web"]);
    assert!(!status.status.success() && String::from_utf8_lossy(&status.stdout).contains("failure budget exhausted"), "{status:?}");
}

#[test]
fn the_rollout_goes_on_when_the_node_that_would_advance_it_dies_and_a_leader_is_lost() {
    let mut cluster = nats::Cluster::start();
    let mut agents = three_agents("advance", &cluster.urls());
    wait_until("HOIST to be replicated", Duration::from_secs(30), || {
        agents[0].hoist(&["kv", "add", "HOIST", "--replicas", "3"]).status.success().then_some(())
    });
    let v2 = registry_digest("v2");
    release(&agents[0], &["web", "v2", "--waves", "1,100%", "--bake", "5s"]);
    let plan = wait_until("the plan", Duration::from_secs(20), || record_of(&agents[0]).plan);
    let canary = agents.iter().position(|a| a.node == plan[0]).expect("a planned node is one of ours");
    agents[canary].wait_machine("web", "the canary on the release", Duration::from_secs(60), |m| on(m, &v2));
    wait_until("the canary's outcome", Duration::from_secs(20), || (rollout_status(&agents[canary])["succeeded"] == 1).then_some(()));

    // While the canary bakes: its agent dies (the node that might have advanced the wave), and the
    // server leading the records' stream goes away. Neither is a failure of the release.
    agents[canary].kill_agent();
    let leader = cluster.stream_leader("KV_HOIST");
    cluster.nodes[leader].kill();

    for (i, a) in agents.iter().enumerate().filter(|(i, _)| *i != canary) {
        a.wait_machine("web", "on the release", Duration::from_secs(180), |m| on(m, &v2));
        assert_eq!(http_get_container(a).as_deref(), Some("v2"), "agent {i}");
    }
    let other = agents.iter().position(|a| a.node != plan[0]).unwrap();
    let done = wait_until("the release to complete", Duration::from_secs(60), || {
        let r = record_of(&agents[other]);
        (r.state == ReleaseState::Complete).then_some(r)
    });
    assert!(done.by.starts_with("hoist@") && !done.by.ends_with(&plan[0]), "a surviving node took the steps: {done:?}");
    assert_eq!(done.reason.as_deref(), Some("every wave healthy"), "{done:?}");
}

#[test]
fn one_node_alone_releases_through_its_own_store() {
    let agent = TestAgent::start("alone", &web(free_port(), ""));
    agent.hoist_ok(&["governor", "add", "RG", "1", "2m"]);
    agent.wait_running("web");
    let v2 = registry_digest("v2");
    let record = release(&agent, &["web", "v2", "--waves", "1,100%", "--bake", "1s"]);
    assert_eq!(record.plan.as_deref().map(<[String]>::len), Some(1), "the node itself: {record:?}");
    let m = agent.wait_machine("web", "on the release", Duration::from_secs(60), |m| on(m, &v2));
    assert_eq!(http_get_container(&agent).as_deref(), Some("v2"), "{m:?}");
    let done = wait_until("the release to complete", Duration::from_secs(30), || {
        let r = record_of(&agent);
        (r.state == ReleaseState::Complete).then_some(r)
    });
    assert_eq!(done.by, format!("hoist@{}", agent.node), "the node itself completed it: {done:?}");
    let status = rollout_status(&agent);
    assert_eq!((status["succeeded"].as_u64(), status["phases"]["serving"].as_u64()), (Some(1), Some(1)), "{status:#}");
}
