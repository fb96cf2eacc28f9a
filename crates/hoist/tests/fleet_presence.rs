//! Who is in the fleet: dead nodes stay listed until forgotten, the agents' own buckets are
//! replicated across a NATS cluster, and one node name is run by one machine at a time. Real agents,
//! real nats-server processes.

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;
mod support;

use hoist_core::backend::{BucketConfig, Governor, Kv};
use hoist_core::fleet::FleetAnswer;
use hoist_core::fsm::State;
use hoist_core::presence::NodeSeen;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::{Duration, SystemTime};
use support::*;

/// The agents' file: these servers, and fleet requests signed by one operator key for the whole test
/// binary (the CLI run with the same file signs with it); `fleet` adds settings to the `fleet:` section.
fn nats_yaml(servers: &[String], fleet: &str) -> String {
    static OPERATOR: std::sync::OnceLock<OperatorKey> = std::sync::OnceLock::new();
    let operator = OPERATOR.get_or_init(OperatorKey::new);
    let servers = servers.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
    format!("backend: nats\nnats:\n  servers: [{servers}]\n{}{fleet}", operator.fleet_yaml("tester", "[status, transition]"))
}

fn fleet_status(agent: &TestAgent) -> (FleetAnswer, Output) {
    let out = agent.hoist(&["status", "--fleet", "--json", "--timeout", "1s"]);
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("fleet status JSON ({e}): {out:?}"));
    (answer, out)
}

fn node_ls(agent: &TestAgent) -> Vec<NodeSeen> {
    serde_json::from_str(&agent.hoist_ok(&["node", "ls", "--json"])).expect("node ls JSON")
}

/// `node ls`, or None while the CLI gets no answer (a cluster electing new leaders).
fn try_node_ls(agent: &TestAgent) -> Option<Vec<NodeSeen>> {
    let out = agent.hoist(&["node", "ls", "--json"]);
    if !out.status.success() {
        eprintln!("node ls: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("node ls JSON"))
}

fn web(port: u16, extra: &str) -> String {
    format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    ports: ['127.0.0.1:{port}:80']\n{extra}", image())
}

/// Stream info of a bucket or governor, straight from JetStream.
async fn stream_info(url: &str, stream: &str) -> async_nats::jetstream::stream::Info {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    js.get_stream(stream).await.expect("stream exists").info().await.expect("stream info").clone()
}

#[test]
fn a_dead_node_stays_listed_as_missing_until_an_operator_forgets_it() {
    let server = nats::Server::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // HOIST_NODES as earlier agents made it, entries expiring 30 s after the last refresh.
    runtime.block_on(async {
        let old = BucketConfig { history: 1, ttl: Some(Duration::from_secs(30)), replicas: 1 };
        nats::connect(vec![server.url()]).await.create_bucket("HOIST_NODES", old).await.expect("create the old bucket");
    });
    let agent_yaml = nats_yaml(&[server.url()], "  node_retention: 2d\n");
    let a = TestAgent::start_with("dead-a", "containers: {}\n", &agent_yaml);
    let mut b = TestAgent::start_with("dead-b", "containers: {}\n", &agent_yaml);
    wait_until("both nodes to answer", Duration::from_secs(20), || (fleet_status(&a).0.replies.len() == 2).then_some(()));

    // The retention is the bucket's TTL, and the agent updated the bucket it found.
    let info = runtime.block_on(stream_info(&server.url(), "KV_HOIST_NODES"));
    assert_eq!(info.config.max_age, Duration::from_secs(2 * 24 * 3600));

    let killed = SystemTime::now();
    b.kill_agent();
    // Past the old 30 s TTL and past the liveness window.
    std::thread::sleep(Duration::from_secs(35));
    let (answer, out) = fleet_status(&a);
    assert!(!out.status.success(), "a missing node fails the check: {out:?}");
    assert_eq!(answer.replies.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(), [a.node.as_str()]);
    assert_eq!(answer.missing.len(), 1, "{answer:?}");
    let missing = &answer.missing[0];
    assert_eq!(missing.node, b.node);
    assert!(!missing.alive);
    assert!(missing.last_seen <= killed && killed.duration_since(missing.last_seen).unwrap() <= Duration::from_secs(11), "{missing:?}");

    let human = a.hoist(&["status", "--fleet", "--timeout", "1s"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(!human.status.success(), "{human:?}");
    assert!(text.contains("1 node(s) answered, 1 did not") && text.contains(&format!("{} missing since 20", b.node)), "{text}");
    assert!(text.contains("s ago)"), "{text}");

    let nodes = node_ls(&a);
    let alive: Vec<(&str, bool)> = nodes.iter().map(|n| (n.node.as_str(), n.alive)).collect();
    let mut expected = vec![(a.node.as_str(), true), (b.node.as_str(), false)];
    expected.sort();
    assert_eq!(alive, expected);
    let table = a.hoist_ok(&["node", "ls"]);
    assert!(
        table.contains("LAST SEEN") && table.lines().any(|l| l.trim_start().starts_with(&b.node) && l.trim_end().ends_with("no")),
        "{table}"
    );

    // A live node cannot be forgotten (it would be back at its next refresh); a dead one can.
    let refused = a.hoist(&["node", "forget", &a.node]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("is alive"), "{refused:?}");
    let forgot = a.hoist_ok(&["node", "forget", &b.node]);
    assert!(forgot.contains(&format!("forgot node {}", b.node)), "{forgot}");
    let (answer, out) = fleet_status(&a);
    assert!(out.status.success() && answer.missing.is_empty(), "{out:?}");
    let unknown = a.hoist(&["node", "forget", &b.node]);
    assert!(!unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("no node named"), "{unknown:?}");
}

#[test]
fn the_agents_buckets_are_replicated_and_presence_survives_losing_their_leader() {
    let mut cluster = nats::Cluster::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let urls = cluster.urls();
    // A governor an operator made before replicas were the default: one copy.
    runtime.block_on(async {
        let backend = cluster.ready_backend().await;
        backend.add("RG1", 1, Duration::from_secs(60), 1).await.expect("add a one-replica governor");
    });
    let agent_yaml = nats_yaml(&urls, "");
    let a = TestAgent::start_with("repl-a", &web(free_port(), "    kv_update: true\n    restart_governor: RG1\n"), &agent_yaml);
    let b = TestAgent::start_with("repl-b", "containers: {}\n", &agent_yaml);
    a.wait_running("web");

    for stream in ["KV_HOIST", "KV_HOIST_NODES", "KV_CHORIA_SERVICES"] {
        let info = runtime.block_on(stream_info(&urls[0], stream));
        assert_eq!(info.config.num_replicas, 3, "{stream}");
    }
    // What an operator creates without --replicas gets the same.
    let bucket: BucketConfig = serde_json::from_str(&a.hoist_ok(&["kv", "add", "CONFIG", "--json"])).unwrap();
    assert_eq!(bucket.replicas, 3);
    let governor: serde_json::Value = serde_json::from_str(&a.hoist_ok(&["governor", "add", "RG3", "1", "1m", "--json"])).unwrap();
    assert_eq!(governor["replicas"], 3);
    // The one-replica governor the container uses is warned about, with the command that fixes it.
    let warned = wait_until("a replicas warning", Duration::from_secs(10), || {
        a.status().warnings.into_iter().find(|w| w.starts_with("replicas: governor RG1 has 1 replica(s) where the cluster could keep 3"))
    });
    assert!(warned.contains("`hoist governor add RG1 1 1m --replicas 3`"), "{warned}");

    // Lose the server that leads HOIST_NODES.
    let leader = runtime.block_on(stream_info(&urls[0], "KV_HOIST_NODES")).cluster.and_then(|c| c.leader).expect("a leader");
    let index: usize = leader.trim_start_matches('n').parse().expect("servers are named n0..n2");
    cluster.nodes[index].kill();
    let killed = SystemTime::now();

    // Both nodes keep refreshing their presence (seen after the loss) and keep answering.
    wait_until("both nodes refreshed after the loss", Duration::from_secs(40), || {
        let nodes = try_node_ls(&b)?;
        (nodes.len() == 2 && nodes.iter().all(|n| n.alive && n.last_seen > killed)).then_some(())
    });
    let (answer, out) = wait_until("every node answering", Duration::from_secs(20), || {
        let (answer, out) = fleet_status(&b);
        (answer.replies.len() == 2).then_some((answer, out))
    });
    assert!(out.status.success() && answer.missing.is_empty(), "{out:?}");
    assert_eq!(a.machine("web").unwrap().state, State::Run);
}

#[test]
fn a_second_machine_with_the_same_node_name_stands_by_until_the_first_is_gone() {
    let server = nats::Server::start();
    let agent_yaml = nats_yaml(&[server.url()], "");
    let containers = web(free_port(), "");
    let mut first = TestAgent::start_with("twin", &containers, &agent_yaml);
    first.wait_running("web");
    let original = first.container_id("web").expect("a container");
    let id = std::fs::metadata(first.path("state/instance-id")).expect("the install's id is kept in state_dir");
    assert_eq!(id.permissions().mode() & 0o777, 0o600);

    // Same node name (same test name), its own state_dir: another machine.
    let second = TestAgent::start_with("twin", &containers, &agent_yaml);
    assert_eq!(second.node, first.node);
    let reason = wait_until("the second agent to say it stands by", Duration::from_secs(30), || {
        second.status().warnings.into_iter().find(|w| w.starts_with("standby: "))
    });
    assert!(reason.contains(&format!("node {} is run by the agent of another machine", first.node)), "{reason}");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        assert!(second.status().machines.is_empty(), "the standby agent manages nothing");
        assert_eq!(first.container_id("web").as_deref(), Some(original.as_str()), "the container was left alone");
    }
    let table = second.hoist_ok(&["status"]);
    assert!(table.contains("warning: standby: standing by, managing no container"), "{table}");
    assert!(second.log().contains("standing by"), "the log says so too");
    assert_eq!(first.machine("web").unwrap().state, State::Run);

    // The first machine dies; the second takes over its containers (adopting, not replacing them).
    first.kill_agent();
    let adopted = second.wait_machine("web", "adopted in RUN", Duration::from_secs(45), |m| m.state == State::Run);
    let short = adopted.container_id.expect("a container id");
    assert!(original.starts_with(&short), "adopted {short}, the original was {original}");
    assert!(second.status().warnings.iter().all(|w| !w.starts_with("standby")), "{:?}", second.status().warnings);
    // And it is the node the fleet now hears from.
    wait_until("the second agent to answer for the node", Duration::from_secs(15), || {
        let (answer, _) = fleet_status(&second);
        (answer.replies.len() == 1 && answer.missing.is_empty()).then_some(())
    });
}

#[test]
fn twins_that_could_not_see_each_other_at_start_settle_on_one_once_nats_answers() {
    let mut server = nats::Server::start();
    server.kill();
    let agent_yaml = nats_yaml(&[server.url()], "");
    let containers = web(free_port(), "");
    // NATS is down: neither can know of the other, and both manage the node meanwhile.
    let first = TestAgent::start_with("twins", &containers, &agent_yaml);
    first.wait_running("web");
    let original = first.container_id("web").expect("a container");
    let second = TestAgent::start_with("twins", &containers, &agent_yaml);
    second.wait_running("web");
    assert!(second.status().warnings.iter().all(|w| !w.starts_with("standby")));

    // Once NATS answers, the one that took the name later stands by; the first keeps the node.
    server.restart();
    // A few refreshes after both reconnect; generous, since a loaded CI machine reconnects slowly.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let reason = loop {
        if let Some(reason) = second.status().warnings.into_iter().find(|w| w.starts_with("standby: ")) {
            break reason;
        }
        // The logs say which of the two failed to see the other.
        assert!(std::time::Instant::now() < deadline, "the later twin never stood by\nfirst:\n{}\nsecond:\n{}", first.log(), second.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reason.contains(&format!("node {} is run by the agent of another machine", first.node)), "{reason}");
    assert!(second.log().contains("another machine took this node name first"), "the log says why");
    wait_until("the standby agent to let go of its machines", Duration::from_secs(10), || {
        second.status().machines.is_empty().then_some(())
    });
    let (answer, _) = wait_until("one answer for the node", Duration::from_secs(20), || {
        let (answer, out) = fleet_status(&first);
        (answer.replies.len() == 1 && answer.missing.is_empty()).then_some((answer, out))
    });
    assert_eq!(answer.replies[0].status.machines.len(), 1, "the answer is the managing agent's: {:?}", answer.replies[0]);
    for _ in 0..12 {
        std::thread::sleep(Duration::from_secs(1));
        assert!(second.status().machines.is_empty(), "it stays standing by while the first refreshes its claim");
        assert!(first.status().warnings.iter().all(|w| !w.starts_with("standby")), "the first never stands by");
        assert_eq!(first.machine("web").unwrap().state, State::Run);
    }
    assert_eq!(first.container_id("web").as_deref(), Some(original.as_str()), "no container was replaced in all this");
}
