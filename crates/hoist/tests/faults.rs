//! Faults as they happen in production, against the real engine, registry and nats-server: graceful
//! replacement, a container dying during a NATS outage or a pull retry, an agent starting without
//! NATS, leases after an outage, a rejected version not pulled again, a stream leader lost in the
//! middle of a rollout on a 3-node cluster, and a bucket with no room for another watch.

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;
mod support;

use hoist_core::fsm::State;
use hoist_core::status::MachineStatus;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn nats_agent_yaml(urls: &[String]) -> String {
    let list = urls.iter().map(|u| format!("'{u}'")).collect::<Vec<_>>().join(", ");
    format!("backend: nats\nnats:\n  servers: [{list}]\n")
}

fn web(port: u16, extra: &str) -> String {
    format!(
        "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    ports: ['127.0.0.1:{port}:80']\n{extra}",
        image()
    )
}

fn running_on(m: &MachineStatus, version: &str) -> bool {
    m.state == State::Run && m.version == version && m.container_id.is_some()
}

/// `docker events` for one container's deaths, with their exit codes.
struct Deaths(std::process::Child);

impl Deaths {
    fn start(container: &str) -> Deaths {
        let child = Command::new("docker")
            .args(["events", "--filter", &format!("container={container}"), "--filter", "event=die"])
            .args(["--format", "{{.Actor.Attributes.exitCode}}"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker events");
        Deaths(child)
    }

    fn exit_codes(mut self) -> Vec<String> {
        self.0.kill().unwrap();
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }
}

#[test]
fn an_update_stops_the_old_container_gracefully() {
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    // An app that drains on SIGTERM: it writes a marker and exits 0 (busybox httpd alone ignores it).
    let app = format!(
        "    volumes: ['{}:/data']\n    stop_grace: 20s\n    command: ['/bin/sh', '-c', 'trap \"echo drained > /data/marker; exit 0\" TERM; httpd -f -p 80 -h /www & wait']\n",
        data.path().display()
    );
    let agent = TestAgent::start("graceful", &web(port, &app));
    agent.wait_running("web");
    let deaths = Deaths::start(&agent.container_name("web"));
    std::thread::sleep(Duration::from_millis(500));
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| running_on(m, "v2"));
    let exits = deaths.exit_codes();
    assert_eq!(std::fs::read_to_string(data.path().join("marker")).unwrap_or_default().trim(), "drained", "SIGTERM reached the app");
    assert_eq!(exits, ["0"], "stopped by its signal, not killed (137)");
    assert!(agent.log().contains("stopping"), "the stop shows as the activity");
}

#[test]
fn a_stop_signal_and_grace_of_the_container_are_used() {
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    // Traps only SIGUSR1: a SIGTERM would kill it (143) and leave no marker.
    let app = format!(
        "    volumes: ['{}:/data']\n    stop_signal: SIGUSR1\n    command: ['/bin/sh', '-c', 'trap \"echo usr1 > /data/marker; exit 0\" USR1; httpd -f -p 80 -h /www & wait']\n",
        data.path().display()
    );
    let agent = TestAgent::start("stopsignal", &web(port, &app));
    let before = agent.wait_running("web");
    let deaths = Deaths::start(&agent.container_name("web"));
    std::thread::sleep(Duration::from_millis(500));
    agent.hoist_ok(&["transition", "web", "restart"]);
    agent.wait_machine("web", "restarted", Duration::from_secs(60), |m| running_on(m, "v1") && m.container_id != before.container_id);
    assert_eq!(std::fs::read_to_string(data.path().join("marker")).unwrap_or_default().trim(), "usr1");
    assert_eq!(deaths.exit_codes(), ["0"]);
}

#[test]
fn a_governed_container_killed_while_nats_is_down_comes_back_at_once() {
    let mut server = nats::Server::start();
    let port = free_port();
    let agent = TestAgent::start_with("natsdownkill", &web(port, "    restart_governor: RG\n"), &nats_agent_yaml(&[server.url()]));
    agent.hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    let before = agent.wait_running("web");
    server.kill();
    agent.wait_machine("web", "reporting NATS unreachable", Duration::from_secs(30), |_| {
        agent.status().warnings.iter().any(|w| w.starts_with("nats:") && w.contains("not reachable"))
    });

    docker_ok(&["kill", &agent.container_name("web")]);
    let killed = Instant::now();
    let back = agent.wait_machine("web", "back without NATS", Duration::from_secs(15), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id
    });
    assert!(killed.elapsed() < Duration::from_secs(10), "came back in {:?}", killed.elapsed());
    assert_eq!(back.condition, None, "no crash loop: {back:?}");
    assert_eq!(http_get(port).as_deref(), Some("v1"));
}

#[test]
fn a_container_that_dies_while_its_pull_is_retried_is_replaced_at_once() {
    let port = free_port();
    let agent = TestAgent::start("pullretrykill", &web(port, ""));
    let before = agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "nosuchtag"]);
    agent.wait_machine("web", "retrying the pull", Duration::from_secs(30), |m| {
        m.state == State::Update && m.last_error.as_deref().is_some_and(|e| e.contains("nosuchtag"))
    });

    docker_ok(&["kill", &agent.container_name("web")]);
    let back = agent.wait_machine("web", "v1 back", Duration::from_secs(15), |m| {
        m.container_id.is_some() && m.container_id != before.container_id && m.version == "v1"
    });
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");
    assert_eq!(back.condition, None, "a pull failure is neither a crash loop nor a rollback: {back:?}");

    // An operator's restart while the update still cannot pull restarts what runs, and reports no
    // rollback of a version that never ran.
    agent.wait_machine("web", "updating again", Duration::from_secs(30), |m| m.state == State::Update);
    agent.hoist_ok(&["transition", "web", "restart"]);
    let restarted = agent.wait_machine("web", "restarted on v1", Duration::from_secs(30), |m| {
        m.version == "v1" && m.container_id.is_some() && m.container_id != back.container_id
    });
    assert!(restarted.condition.as_deref().is_none_or(|c| !c.contains("rolled back")), "{restarted:?}");
    assert_eq!(http_get(port).as_deref(), Some("v1"));
}

#[test]
fn an_agent_starts_without_nats_keeps_its_desired_state_and_catches_up() {
    let mut server = nats::Server::start();
    let port = free_port();
    let mut agent = TestAgent::start_with("natsatstart", &web(port, ""), &nats_agent_yaml(&[server.url()]));
    agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let on_v2 = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| running_on(m, "v2"));

    // The agent restarts while NATS is down: it starts, keeps v2 (its last desired state) and says why.
    agent.stop_agent();
    server.kill();
    agent.spawn();
    let m = agent.wait_machine("web", "adopted on v2", Duration::from_secs(30), |m| running_on(m, "v2"));
    assert_eq!(m.container_id, on_v2.container_id, "adopted, not replaced");
    let warnings = agent.status().warnings;
    assert!(warnings.iter().any(|w| w.starts_with("nats:") && w.contains("not reachable")), "{warnings:?}");

    // NATS comes back: the warning clears and a KV change is followed again.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let warnings = agent.status().warnings;
        if !warnings.iter().any(|w| w.starts_with("nats:")) {
            break;
        }
        // Said in full when it does not clear: the warning itself, and what the agent logged.
        assert!(Instant::now() < deadline, "the NATS warning did not clear within 30 s: {warnings:?}\nagent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_until("a put to be accepted", Duration::from_secs(30), || {
        agent.hoist(&["kv", "put", "HOIST", "container/web/tag", "v3"]).status.success().then_some(())
    });
    agent.wait_machine("web", "on v3", Duration::from_secs(60), |m| running_on(m, "v3"));
}

#[test]
fn a_restart_asked_during_an_outage_leaves_no_phantom_lease() {
    let mut server = nats::Server::start();
    let agent = TestAgent::start_with("phantom", &web(free_port(), "    restart_governor: RG\n"), &nats_agent_yaml(&[server.url()]));
    agent.hoist_ok(&["governor", "add", "RG", "1", "5m"]);
    let before = agent.wait_running("web");

    // While NATS is away, the machine wants a slot for a planned restart: it must wait, and must not
    // leave campaigns behind that land when the connection comes back.
    server.kill();
    agent.wait_machine("web", "seeing NATS gone", Duration::from_secs(30), |_| {
        agent.status().warnings.iter().any(|w| w.starts_with("nats:"))
    });
    agent.hoist_ok(&["transition", "web", "restart"]);
    std::thread::sleep(Duration::from_secs(8));
    let waiting = agent.machine("web").unwrap();
    assert_eq!(waiting.container_id, before.container_id, "no replacement without a slot: {waiting:?}");
    assert!(waiting.condition.is_none(), "waiting on the backend is no failure: {waiting:?}");

    server.restart();
    let back = Instant::now();
    agent.wait_machine("web", "restarted once NATS is back", Duration::from_secs(60), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id
    });
    assert!(back.elapsed() < Duration::from_secs(60), "no wait for a lease to expire");
    let view = wait_until("the governor to be empty", Duration::from_secs(20), || {
        let out = agent.hoist(&["governor", "view", "RG", "--json"]);
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        view["leases"].as_array().is_some_and(|l| l.is_empty()).then_some(view)
    });
    assert_eq!(view["capacity"], 1);
}

#[test]
fn a_version_the_fleet_rejected_is_not_pulled_by_a_node_that_comes_to_it_later() {
    let server = nats::Server::start();
    let agent_yaml = nats_agent_yaml(&[server.url()]);
    let container = |port| web(port, "    restart_governor: RG\n");
    let a = TestAgent::start_with("markpull-a", &container(free_port()), &agent_yaml);
    let b = TestAgent::start_with("markpull-b", &container(free_port()), &agent_yaml);
    a.hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    a.wait_running("web");
    let b_before = b.wait_running("web");
    b.hoist_ok(&["transition", "web", "maintenance"]);

    a.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "broken"]);
    a.wait_machine("web", "rolled back", Duration::from_secs(60), |m| running_on(m, "v1") && m.condition.is_some());

    // b resumes after the fleet's verdict: it reads the mark before pulling, and stays on v1.
    b.hoist_ok(&["transition", "web", "resume"]);
    let m = b.wait_machine("web", "told of the rollback", Duration::from_secs(30), |m| {
        m.state == State::Run && m.condition.as_deref().is_some_and(|c| c.contains("rolled back on"))
    });
    assert_eq!(m.container_id, b_before.container_id, "b kept its container");
    let pulled_broken = b.log().lines().any(|l| l.contains("pull") && l.contains(":broken") && l.contains("status="));
    assert!(!pulled_broken, "b pulled a version the fleet had rejected:\n{}", b.log());
}

#[test]
fn losing_the_stream_leader_mid_rollout_is_not_taken_for_a_bad_release() {
    let mut cluster = nats::Cluster::start();
    let agent_yaml = nats_agent_yaml(&cluster.urls());
    // A long confirmation keeps the rollout going while the leader goes away.
    let rollout = "{ unverified_wait: 1s, min_healthy_time: 4s, healthy_deadline: 60s, governor_timeout: 120s }";
    let check = "    restart_governor: RG\n    health_check: { type: http, port: 80, interval: 1s, timeout: 1s, retries: 2 }\n";
    let agents: Vec<TestAgent> = ["a", "b", "c"]
        .iter()
        .map(|n| TestAgent::start_with_rollout(&format!("leader-{n}"), &web(free_port(), check), &agent_yaml, rollout))
        .collect();
    wait_until("the governor to be created", Duration::from_secs(30), || {
        agents[0].hoist(&["governor", "add", "RG", "1", "2m", "--replicas", "3"]).status.success().then_some(())
    });
    wait_until("HOIST to be replicated", Duration::from_secs(30), || {
        agents[0].hoist(&["kv", "add", "HOIST", "--replicas", "3"]).status.success().then_some(())
    });
    for a in &agents {
        a.wait_running("web");
    }
    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    // Mid-rollout: once the first node is on its way, kill the server leading the governor's stream.
    wait_until("a node to take the slot", Duration::from_secs(60), || {
        agents.iter().any(|a| a.machine("web").is_some_and(|m| m.state == State::Restart)).then_some(())
    });
    let leader = cluster.stream_leader("GOVERNOR_RG");
    cluster.nodes[leader].kill();

    for a in &agents {
        let m = a.wait_machine("web", "on v2", Duration::from_secs(180), |m| running_on(m, "v2"));
        assert_eq!(m.condition, None, "{}: {m:?}", a.node);
    }
    let mark = agents[0].hoist(&["kv", "get", "HOIST", "container/web/rollback"]);
    assert!(!mark.status.success(), "no fleet-wide rollback mark: {}", String::from_utf8_lossy(&mark.stdout));
    wait_until("the governor to be empty", Duration::from_secs(60), || {
        let out = agents[0].hoist(&["governor", "view", "RG", "--json"]);
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        view["leases"].as_array().is_some_and(|l| l.is_empty()).then_some(())
    });
}

#[test]
fn the_crash_backoff_is_set_per_container_and_shown() {
    let agent = TestAgent::start(
        "backoffshown",
        &format!("containers:\n  bad:\n    image: {}\n    image_tag: broken\n    restart_backoff: {{ initial: 20s, max: 40s }}\n", image()),
    );
    let m = agent.wait_machine("bad", "backing off", Duration::from_secs(30), |m| {
        m.activity.as_deref().is_some_and(|a| a.starts_with("restart in") && a.contains("backoff after"))
    });
    let activity = m.activity.unwrap();
    let secs: f64 = activity.trim_start_matches("restart in ").split(' ').next().unwrap().parse().unwrap();
    assert!((14.0..=48.0).contains(&secs), "the container's own backoff: {activity}");
}

#[test]
fn a_restarted_agent_without_its_state_file_adopts_what_runs() {
    let port = free_port();
    let mut agent = TestAgent::start("loststate", &web(port, ""));
    agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let on_v2 = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| running_on(m, "v2"));
    for round in 0..3 {
        agent.stop_agent();
        std::fs::remove_dir_all(agent.path("state/machines")).unwrap();
        agent.spawn();
        let m = agent.wait_machine("web", "adopted", Duration::from_secs(30), |m| running_on(m, "v2"));
        std::thread::sleep(Duration::from_secs(2));
        let later = agent.machine("web").unwrap();
        assert_eq!((m.container_id.clone(), later.container_id), (on_v2.container_id.clone(), on_v2.container_id.clone()), "round {round}");
        assert_eq!(later.version, "v2", "round {round}: not moved back to the configured v1");
    }
}

#[test]
fn a_look_alike_with_copied_labels_does_not_win_adoption() {
    let port = free_port();
    let mut agent = TestAgent::start("lookalike", &web(port, ""));
    let real = agent.wait_running("web");
    agent.stop_agent();
    let name = agent.container_name("web");
    let labels = agent.docker(&["inspect", "-f", "{{range $k, $v := .Config.Labels}}{{$k}}={{$v}}\n{{end}}", &name]);
    let mut run = vec!["run".to_string(), "-d".into(), "--name".into(), format!("{name}-copy")];
    for label in String::from_utf8_lossy(&labels.stdout).lines().filter(|l| l.starts_with("io.hoist.")) {
        run.extend(["--label".to_string(), label.to_string()]);
    }
    run.push(format!("{}:v1", image()));
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    docker_ok(&run);

    agent.spawn();
    let m = agent.wait_running("web");
    std::thread::sleep(Duration::from_secs(2));
    let real_id = agent.container_id("web").expect("the real container is still there");
    assert_eq!(m.container_id.as_deref(), Some(&real_id[..12]), "the real one was adopted: {m:?}");
    assert!(real.container_id.as_deref().is_some_and(|id| real_id.starts_with(id)), "and it is the one that ran before");
    assert!(agent.container_running("web"));
    assert_eq!(http_get(port).as_deref(), Some("v1"));
}

#[test]
fn a_probe_that_cannot_run_for_lack_of_descriptors_is_no_verdict_on_the_container() {
    let port = free_port();
    let check = "    health_check: { type: http, port: 80, interval: 1s, timeout: 1s, retries: 2 }\n";
    let agent = TestAgent::start("emfile", &web(port, check));
    let before = agent.wait_running("web");
    // The agent runs out of descriptors: a low limit, and connections to its socket held open.
    let limited = Command::new("prlimit").args(["--pid", &agent.pid().to_string(), "--nofile=40:40"]).status().unwrap();
    assert!(limited.success());
    let socket = agent.path("state/hoist.sock");
    let held: Vec<_> = (0..60).filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok()).collect();
    std::thread::sleep(Duration::from_secs(6));
    let local = agent.log().lines().any(|l| l.contains("health check could not run on this host") && l.contains("Too many open files"));
    drop(held);
    assert!(local, "the probe ran out of descriptors and said so:\n{}", agent.log());
    let after = agent.wait_running("web");
    assert_eq!((after.container_id, after.restarts), (before.container_id, before.restarts), "a healthy container was not replaced");
}

#[test]
fn a_container_that_dies_while_its_replacement_waits_for_a_slot_is_replaced_at_once() {
    // Two containers share a restart governor of capacity 1; a long unverified wait keeps the first
    // one's slot held while the second waits for it.
    let rollout = "{ unverified_wait: 20s, min_healthy_time: 1s, healthy_deadline: 60s, governor_timeout: 120s }";
    let one = |name: &str, port: u16| {
        format!(
            "  {name}:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n",
            image()
        )
    };
    let (p1, p2) = (free_port(), free_port());
    let agent = TestAgent::start_with_rollout("slotwaitdie", &format!("containers:\n{}{}", one("a", p1), one("b", p2)), "", rollout);
    agent.hoist_ok(&["governor", "add", "RG", "1", "5m"]);
    agent.wait_machine("a", "RUN", Duration::from_secs(60), |m| running_on(m, "v1"));
    let b_before = agent.wait_machine("b", "RUN", Duration::from_secs(60), |m| running_on(m, "v1"));
    agent.hoist_ok(&["kv", "put", "HOIST", "container/a/tag", "v2"]);
    agent.wait_machine("a", "holding the slot", Duration::from_secs(30), |m| m.state == State::Restart && m.version == "v2");
    // A planned restart of b waits for the slot a holds.
    agent.hoist_ok(&["transition", "b", "restart"]);
    agent.wait_machine("b", "waiting for the slot", Duration::from_secs(30), |m| {
        m.state == State::Restart && m.activity.as_deref().is_some_and(|a| a.contains("waiting for a slot"))
    });

    docker_ok(&["kill", &agent.container_name("b")]);
    let b = agent.wait_machine("b", "replaced without the slot", Duration::from_secs(10), |m| {
        m.container_id.is_some() && m.container_id != b_before.container_id && m.version == "v1"
    });
    assert!(b.condition.is_none(), "{b:?}");
    assert!(agent.container_running("b"));
    let a = agent.machine("a").unwrap();
    assert_eq!(a.state, State::Restart, "a still holds the slot: {a:?}");
}

/// A bucket made elsewhere (`choria kv add`, an older hoist) under nats-server 2.15's default limit
/// can be out of room for another watch. The machine then reads its keys every `kv_interval`, as
/// the seed's machines poll, and still follows the tag.
#[test]
fn a_bucket_that_refuses_another_watch_is_followed_by_reading_it() {
    let server = nats::Server::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("connect"));
        // Choria's KV stream for HOIST, with room for one watch: the machine needs three.
        let config = async_nats::jetstream::stream::Config {
            name: "KV_HOIST".into(),
            subjects: vec!["$KV.HOIST.>".into()],
            max_messages_per_subject: 10,
            max_consumers: 1,
            allow_direct: true,
            allow_rollup: true,
            deny_delete: true,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        };
        js.create_stream(config).await.expect("create KV_HOIST");
    });
    let port = free_port();
    let agent = TestAgent::start_with("refused-watch", &web(port, "    kv_interval: 2\n"), &nats_agent_yaml(&[server.url()]));
    agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "on v2, read from the bucket", Duration::from_secs(30), |m| running_on(m, "v2"));
    assert_eq!(http_get(port).as_deref(), Some("v2"));
    assert!(agent.log().contains("cannot watch the key"), "the agent says why it polls: {}", agent.log());
}
