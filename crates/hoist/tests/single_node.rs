//! End-to-end behaviour of one agent on the embedded backend, against the real Docker Engine.

mod support;

use hoist_core::fsm::State;
use hoist_core::status::Health;
use std::time::Duration;
use support::*;

fn web(port: u16, tag: &str, extra: &str) -> String {
    format!(
        "containers:\n  web:\n    image: {image}\n    image_tag: {tag}\n    ports:\n      - 127.0.0.1:{port}:80\n{extra}",
        image = image()
    )
}

#[test]
fn runs_a_container_with_ports_volumes_env_and_command() {
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    write(&data.path().join("greeting"), "hello from the host");
    let yaml = format!(
        "hoist::containers:\n  web:\n    image: {image}\n    image_tag: v1\n    ports: ['127.0.0.1:{port}:8080']\n    volumes: ['{vol}:/data:ro']\n    environment: ['GREETING=hi there']\n    command: \"/bin/httpd -f -p 8080 -h /www\"\n",
        image = image(),
        vol = data.path().display()
    );
    let agent = TestAgent::start("ports", &yaml);
    let m = agent.wait_running("web");
    assert_eq!(m.version, "v1");
    assert_eq!(m.name, "hoist_web");
    assert_eq!(wait_until("HTTP on the published port", Duration::from_secs(10), || http_get(port)), "v1");
    let name = agent.container_name("web");
    assert!(docker_ok(&["exec", &name, "env"]).lines().any(|l| l == "GREETING=hi there"));
    assert_eq!(docker_ok(&["exec", &name, "cat", "/data/greeting"]), "hello from the host");
    let ro = docker(&["exec", &name, "touch", "/data/x"]);
    assert!(!ro.status.success(), "the volume must be read-only");
    assert_eq!(docker_ok(&["inspect", "-f", "{{index .Config.Labels \"io.hoist.name\"}}", &name]), "web");
}

#[test]
fn a_killed_container_is_replaced() {
    let port = free_port();
    let agent = TestAgent::start("killed", &web(port, "v1", ""));
    let before = agent.wait_running("web");
    docker_ok(&["kill", &agent.container_name("web")]);
    let after = agent.wait_machine("web", "replaced and running", Duration::from_secs(30), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id
    });
    assert_eq!(after.restarts, before.restarts + 1);
    assert!(after.last_error.unwrap_or_default().contains("died"), "the reason is reported");
    assert_eq!(wait_until("HTTP after the restart", Duration::from_secs(10), || http_get(port)), "v1");
}

#[test]
fn touching_a_restart_file_restarts_the_container() {
    let files = tempfile::tempdir().unwrap();
    let trigger = files.path().join("reload-me");
    write(&trigger, "1");
    let extra = format!("    restart_files: ['{}']\n", trigger.display());
    let agent = TestAgent::start("restartfile", &web(free_port(), "v1", &extra));
    let before = agent.wait_running("web");
    write(&trigger, "2");
    let after = agent.wait_machine("web", "restarted", Duration::from_secs(30), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id
    });
    assert_eq!(after.restarts, 1);
}

#[test]
fn a_kv_put_rolls_the_container_to_the_new_tag() {
    let port = free_port();
    let agent = TestAgent::start("kvput", &web(port, "v1", "    kv_update: true\n"));
    agent.wait_running("web");
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let m = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(m.image.as_deref(), Some(format!("{}:v2", image()).as_str()));
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");

    // A value that is not a tag is refused and changes nothing.
    let refused = agent.hoist(&["kv", "put", "HOIST", "container/web/tag", "not a tag!"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a valid image tag"));

    // Deleting the key goes back to image_tag.
    agent.hoist_ok(&["kv", "del", "HOIST", "container/web/tag"]);
    agent.wait_machine("web", "back on v1", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v1");
}

#[test]
fn maintenance_leaves_a_dead_container_alone_until_resume() {
    let agent = TestAgent::start("maint", &web(free_port(), "v1", ""));
    agent.wait_running("web");
    let out = agent.hoist_ok(&["transition", "web", "maintenance"]);
    assert!(out.contains("MAINTENANCE"), "{out}");
    docker_ok(&["kill", &agent.container_name("web")]);
    std::thread::sleep(Duration::from_secs(3));
    let m = agent.machine("web").unwrap();
    assert_eq!(m.state, State::Maintenance);
    assert!(!agent.container_running("web"), "maintenance must not remediate");
    assert_eq!(m.health, Health::Down);

    // A transition not allowed from here is refused with the allowed ones listed.
    let refused = agent.hoist(&["transition", "web", "restart"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("not valid while in MAINTENANCE state; allowed: resume"), "{err}");

    agent.hoist_ok(&["transition", "web", "resume"]);
    agent.wait_running("web");
    assert!(agent.container_running("web"));
}

#[test]
fn stop_stops_the_container_and_parks_it_in_maintenance() {
    let agent = TestAgent::start("stop", &web(free_port(), "v1", ""));
    agent.wait_running("web");
    agent.hoist_ok(&["transition", "web", "stop"]);
    agent.wait_machine("web", "in MAINTENANCE", Duration::from_secs(20), |m| m.state == State::Maintenance);
    assert!(!agent.container_running("web"));
    assert!(agent.container_id("web").is_some(), "stop keeps the container for inspection");
    agent.hoist_ok(&["transition", "web", "resume"]);
    agent.wait_running("web");
}

#[test]
fn a_container_removed_from_the_config_is_purged() {
    let port = free_port();
    let two = format!("{}  db:\n    image: {}\n    image_tag: v1\n", web(port, "v1", ""), image());
    let agent = TestAgent::start("purge", &two);
    let web_before = agent.wait_running("web");
    agent.wait_running("db");
    agent.write_containers(&web(port, "v1", ""));
    wait_until("db purged", Duration::from_secs(30), || agent.container_id("db").is_none().then_some(()));
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")]);
    assert_eq!(agent.machine("web").unwrap().container_id, web_before.container_id, "web, unchanged, is left alone");
    assert!(agent.machine("db").is_none());
}

#[test]
fn purge_spares_a_container_someone_is_just_creating_until_its_grace_is_over() {
    let port = free_port();
    let agent = TestAgent::start("purge-grace", &web(port, "v1", ""));
    agent.wait_running("web");
    // Labelled for this node but declared nowhere, and seconds old: as if the previous agent of a
    // handover were making it right now.
    let stray = agent.container_name("stray");
    let node_label = format!("io.hoist.node={}", agent.node);
    let image = format!("{}:v1", image());
    docker_ok(&["run", "-d", "--name", &stray, "--label", &node_label, "--label", "io.hoist.name=stray", &image]);
    agent.signal("HUP");
    wait_until("the reload's purge pass", Duration::from_secs(20), || agent.log().contains("too new to purge yet").then_some(()));
    assert!(docker(&["inspect", &stray]).status.success(), "a container seconds old is left alone");

    wait_until("the stray container purged after the grace", Duration::from_secs(30), || {
        (!docker(&["inspect", &stray]).status.success()).then_some(())
    });
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")]);
    assert_eq!(agent.machine("web").unwrap().state, State::Run, "what is declared keeps running");
}

#[test]
fn a_bad_config_is_refused_and_nothing_running_changes() {
    let port = free_port();
    let agent = TestAgent::start("badcfg", &web(port, "v1", ""));
    let before = agent.wait_running("web");
    agent.write_containers(&format!("containers:\n  web:\n    image: {}\n    ports: ['99999:80']\n    colour: blue\n", image()));
    let status = wait_until("the reload to be refused", Duration::from_secs(20), || {
        let s = agent.status();
        s.config_error.is_some().then_some(s)
    });
    let err = status.config_error.unwrap();
    assert!(err.contains("containers.yaml"), "names the file: {err}");
    assert!(err.contains("container web") && err.contains("ports[0]"), "names container and field: {err}");
    assert!(err.contains("colour"), "names the unknown key: {err}");
    let after = agent.machine("web").unwrap();
    assert_eq!(after.container_id, before.container_id);
    assert_eq!(after.state, State::Run);
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // `hoist validate` says the same, and exits non-zero.
    let out = agent.hoist(&["validate", agent.path("containers.d").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ports[0]"));
}

#[test]
fn validate_prints_the_equivalent_docker_run() {
    // No agent runs: validate only reads the files (and port 8080 is never bound).
    let agent = TestAgent::prepare("validate", &web(8080, "v1", "    environment: ['A=1']\n"), "", FAST_ROLLOUT);
    let out = agent.hoist_ok(&["validate"]);
    assert!(agent.labelled_containers().is_empty(), "validate changes nothing");
    assert!(out.contains(&format!("docker run -d --name {}_web", agent.node)), "{out}");
    assert!(out.contains("-p 127.0.0.1:8080:80/tcp") && out.contains("-e A=1") && out.contains(&format!("{}:v1", image())), "{out}");
}

#[test]
fn a_restarted_agent_adopts_its_running_containers() {
    let port = free_port();
    let mut agent = TestAgent::start("adopt", &web(port, "v1", ""));
    let before = agent.wait_running("web");
    let id = agent.container_id("web").unwrap();
    agent.stop_agent();
    assert!(agent.container_running("web"), "stopping the agent leaves containers running");
    agent.spawn();
    let after = agent.wait_running("web");
    assert_eq!(agent.container_id("web").unwrap(), id, "same container, not recreated");
    assert_eq!(after.restarts, before.restarts);
    assert_ne!(after.id, before.id, "a new machine instance");
}

#[test]
fn maintenance_survives_an_agent_restart() {
    let mut agent = TestAgent::start("maintpersist", &web(free_port(), "v1", ""));
    agent.wait_running("web");
    agent.hoist_ok(&["transition", "web", "maintenance"]);
    agent.stop_agent();
    agent.spawn();
    let m = agent.wait_machine("web", "loaded", Duration::from_secs(20), |_| true);
    assert_eq!(m.state, State::Maintenance);
}

#[test]
fn a_changed_definition_is_reloaded_on_file_change_and_sighup() {
    let port = free_port();
    let agent = TestAgent::start("reload", &web(port, "v1", ""));
    let before = agent.wait_running("web");
    // Config management replaces files by rename; the watch on the directory sees it.
    let staged = agent.path("staged.yaml");
    write(&staged, &web(port, "v2", ""));
    std::fs::rename(&staged, agent.path("containers.d/containers.yaml")).unwrap();
    let after = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_ne!(after.container_id, before.container_id, "a changed definition replaces the container");
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");

    // SIGHUP re-reads the same files: nothing changed, so nothing restarts.
    agent.signal("HUP");
    wait_until("the SIGHUP reload", Duration::from_secs(10), || agent.log().contains("SIGHUP").then_some(()));
    std::thread::sleep(Duration::from_secs(1));
    let again = agent.machine("web").unwrap();
    assert_eq!(again.container_id, after.container_id);
    assert_eq!(again.restarts, after.restarts);
}

#[test]
fn an_http_health_check_gates_run_and_failures_restart() {
    let extra = "    health_check: { type: http, port: 80, path: /, interval: 1s, timeout: 1s, retries: 2 }\n";
    let agent = TestAgent::start("httpcheck", &web(free_port(), "v1", extra));
    let before = agent.wait_running("web");
    assert_eq!(before.health, Health::Healthy);
    // Break what the probe fetches: httpd answers 404, the probe fails twice, the container is replaced.
    docker_ok(&["exec", &agent.container_name("web"), "rm", "/www/index.html"]);
    let after = agent.wait_machine("web", "replaced after failing its check", Duration::from_secs(30), |m| {
        m.state == State::Run && m.container_id != before.container_id
    });
    assert_eq!(after.health, Health::Healthy);
}

#[test]
fn an_unhealthy_docker_healthcheck_restarts_the_container() {
    let agent = TestAgent::start("dockerhc", &format!("containers:\n  web:\n    image: {}\n    image_tag: hc\n", image()));
    let before = agent.wait_running("web");
    assert_eq!(before.health, Health::Healthy, "waits for Docker's HEALTHCHECK");
    docker_ok(&["exec", &agent.container_name("web"), "touch", "/tmp/unhealthy"]);
    agent.wait_machine("web", "replaced after turning unhealthy", Duration::from_secs(30), |m| {
        m.state == State::Run && m.container_id != before.container_id
    });
}

#[test]
fn a_crash_looping_container_backs_off_and_says_so() {
    let agent = TestAgent::start("crashloop", &format!("containers:\n  bad:\n    image: {}\n    image_tag: broken\n", image()));
    let m = agent.wait_machine("bad", "restarted a few times", Duration::from_secs(40), |m| m.restarts >= 3);
    assert_ne!(m.state, State::Run);
    assert!(m.last_error.unwrap_or_default().contains("exit 3"));
    // The table's NOTE gives the cause, not only that it loops.
    let looping = agent.wait_machine("bad", "crash-looping", Duration::from_secs(40), |m| m.condition.is_some());
    let table = agent.hoist_ok(&["status"]);
    let row = table.lines().find(|l| l.contains("hoist_bad")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("crash-looping") && row.contains("exit 3"), "{looping:?}\n{table}");
    // Backoff: the restarts slow down rather than spin.
    std::thread::sleep(Duration::from_secs(2));
    let later = agent.machine("bad").unwrap();
    assert!(later.restarts <= m.restarts + 2, "backoff should slow restarts: {} then {}", m.restarts, later.restarts);
}

#[test]
fn the_restart_governor_keeps_one_container_down_at_a_time() {
    let files = tempfile::tempdir().unwrap();
    let trigger = files.path().join("restart-all");
    write(&trigger, "0");
    let mut yaml = String::from("containers:\n");
    for name in ["a", "b", "c"] {
        yaml.push_str(&format!(
            "  {name}:\n    image: {}\n    image_tag: v1\n    restart_governor: RG\n    restart_files: ['{}']\n",
            image(),
            trigger.display()
        ));
    }
    let agent = TestAgent::start("governor", &yaml);
    agent.hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    for name in ["a", "b", "c"] {
        agent.wait_running(name);
    }
    let watch = Watch::start(&agent, &[]);
    let docker_record = DockerRecord::start(&[format!("label=io.hoist.node={}", agent.node)]);
    write(&trigger, "1");
    wait_until("all three restarted", Duration::from_secs(60), || {
        agent.status().machines.iter().all(|m| m.restarts == 1 && m.state == State::Run).then_some(())
    });
    let view = agent.hoist_ok(&["governor", "view", "RG"]);
    assert!(view.contains("capacity 1") && view.contains("0 active"), "leases released: {view}");

    let (record, max_down) = docker_record.finish();
    assert_eq!(max_down, 1, "capacity 1 means one container down at a time; docker events:\n{record}");

    // Each machine reported its way back: RUN -> RESTART (the file) -> RUN.
    let events = watch.finish();
    for name in ["a", "b", "c"] {
        let path: Vec<&str> = events.iter().filter(|e| e.machine == format!("hoist_{name}")).map(|e| e.to_state.as_str()).collect();
        assert_eq!(path, ["RESTART", "RUN"], "{name}: {events:#?}");
        let why = events.iter().find(|e| e.machine == format!("hoist_{name}") && e.to_state == "RESTART").unwrap();
        assert!(why.detail.as_deref().unwrap_or_default().ends_with("restart-all changed"), "{why:?}");
    }
}

#[test]
fn metrics_report_states_and_restarts() {
    let port = free_port();
    let agent = TestAgent::start_with("metrics", &web(free_port(), "v1", ""), &format!("metrics:\n  listen: 127.0.0.1:{port}\n"));
    agent.wait_running("web");
    let scrape = |accept: &str| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        use std::io::{Read, Write};
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: x\r\n{accept}\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    // A Prometheus that asks for OpenMetrics gets it; one that asks only for the classic text
    // format (as Prometheus before 2.5 and many other scrapers do) gets that, not a format it cannot read.
    let body = scrape("Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n");
    assert!(body.to_lowercase().contains("content-type: application/openmetrics-text"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    let classic = scrape("Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n");
    assert!(classic.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{classic}");
    assert!(!classic.contains("# EOF") && classic.contains("# TYPE hoist_container_restarts_total counter"), "{classic}");
    assert!(classic.contains("hoist_container_restarts_total{"), "{classic}");
    assert!(body.contains(&format!("hoist_machine_state{{node=\"{}\",container=\"web\",state=\"RUN\"}} 1", agent.node)), "{body}");
    assert!(body.contains(&format!("hoist_machine_state{{node=\"{}\",container=\"web\",state=\"MAINTENANCE\"}} 0", agent.node)), "{body}");
    assert!(body.contains("hoist_container_restarts_total{"), "{body}");
    // The same text through the control socket, for hosts without a metrics listener.
    let via_cli = agent.hoist_ok(&["metrics"]);
    assert!(via_cli.contains(&format!("hoist_machine_state{{node=\"{}\",container=\"web\",state=\"RUN\"}} 1", agent.node)), "{via_cli}");
}

#[test]
fn status_shows_summaries_and_json() {
    let two = format!("{}  db:\n    image: {}\n    image_tag: v2\n", web(free_port(), "v1", ""), image());
    let agent = TestAgent::start("summary", &two);
    agent.wait_running("web");
    agent.wait_running("db");
    let table = agent.hoist_ok(&["status"]);
    assert!(table.contains("Summary of Name:\n   hoist_db: 1\n   hoist_web: 1"), "{table}");
    assert!(table.contains("Summary of State:\n   RUN: 2"), "{table}");
    assert!(table.contains("Summary of Version:\n   v1: 1\n   v2: 1"), "{table}");
    // The JSON carries the same summaries, so a script need not count them itself.
    let all: serde_json::Value = serde_json::from_str(&agent.hoist_ok(&["status", "--json"])).unwrap();
    assert_eq!(all["summaries"]["state"], serde_json::json!({"RUN": 2}), "{all:#}");
    assert_eq!(all["summaries"]["version"], serde_json::json!({"v1": 1, "v2": 1}), "{all:#}");
    assert_eq!(all["summaries"]["name"], serde_json::json!({"hoist_db": 1, "hoist_web": 1}), "{all:#}");
    let one = agent.hoist_ok(&["status", "db", "--json"]);
    let s: hoist_core::status::NodeStatus = serde_json::from_str(&one).unwrap();
    assert_eq!(s.machines.len(), 1);
    assert_eq!(s.machines[0].available_transitions.len(), 4);
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["summaries"]["version"], serde_json::json!({"v2": 1}), "the summaries of what was asked for: {one:#}");
}

#[test]
fn an_update_waits_for_its_update_governor() {
    let port = free_port();
    let extra = "    kv_update: true\n    update_governor: UG\n";
    let agent = TestAgent::start("updategov", &web(port, "v1", extra));
    agent.wait_running("web");
    // The missing governor is warned about in status (and the log) from the start.
    let warned = wait_until("the missing governor in status", Duration::from_secs(10), || {
        agent.status().warnings.into_iter().find(|w| w.contains("governor UG is not usable: no governor named UG"))
    });
    assert!(agent.hoist_ok(&["status"]).contains(&format!("warning: {warned}")));
    assert!(agent.log().contains("no governor named UG"));
    // The image to roll to must be pulled (v3 is used by this test only, so nothing else holds it);
    // the pull waits for a slot of UG, which does not exist yet.
    docker(&["rmi", &format!("{}:v3", image())]);
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v3"]);
    let blocked = agent.wait_machine("web", "refused a slot", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("no governor named UG"))
    });
    assert_eq!(blocked.version, "v1", "still on the old version: {blocked:?}");
    assert_eq!(http_get(port).as_deref(), Some("v1"), "the running container is untouched");

    agent.hoist_ok(&["governor", "add", "UG", "1", "1m"]);
    agent.wait_machine("web", "on v3", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v3");
    assert_eq!(wait_until("v3 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v3")), "v3");
    let view = agent.hoist_ok(&["governor", "view", "UG"]);
    assert!(view.contains("0 active"), "the pull's lease is released: {view}");

    // Rechecked at every load (and every 30 s): the governor exists now, so no warning.
    agent.signal("HUP");
    wait_until("the warning gone", Duration::from_secs(20), || agent.status().warnings.is_empty().then_some(()));
    // Slots that expire before rollout.healthy_deadline (30 s here) could be lost mid-update.
    agent.hoist_ok(&["governor", "add", "UG", "1", "10s"]);
    agent.signal("HUP");
    wait_until("the short expiry warned about", Duration::from_secs(20), || {
        agent
            .status()
            .warnings
            .iter()
            .any(|w| w.contains("governor UG's slots expire after 10s, before an update may finish"))
            .then_some(())
    });
}

#[test]
fn kv_and_governor_commands_work_through_the_agent() {
    let agent = TestAgent::start("cli", "containers: {}\n");
    // Empty lists say so rather than print nothing.
    assert!(agent.hoist_ok(&["status"]).contains("no containers are managed on"), "empty status");
    assert_eq!(agent.hoist_ok(&["governor", "ls"]).trim(), "no governors");
    assert_eq!(agent.hoist_ok(&["services"]).trim(), "no endpoints are registered");
    let made: serde_json::Value =
        serde_json::from_str(&agent.hoist_ok(&["kv", "add", "CONFIG", "--history", "3", "--ttl", "45s", "--json"])).unwrap();
    assert_eq!((made["history"].as_u64(), made["ttl"].as_str()), (Some(3), Some("45s")), "{made}");
    let buckets = agent.hoist_ok(&["kv", "ls"]);
    assert!(buckets.lines().any(|b| b == "CONFIG") && buckets.lines().any(|b| b == "HOIST"), "{buckets}");
    assert!(agent.hoist_ok(&["kv", "put", "CONFIG", "app/colour", "blue"]).contains("revision 1"));
    assert_eq!(agent.hoist_ok(&["kv", "get", "CONFIG", "app/colour"]).trim(), "blue");
    assert_eq!(agent.hoist_ok(&["kv", "ls", "CONFIG"]).trim(), "app/colour");
    let entry: serde_json::Value = serde_json::from_str(&agent.hoist_ok(&["kv", "get", "CONFIG", "app/colour", "--json"])).unwrap();
    assert_eq!(entry["revision"], 1);
    assert_eq!(entry["value"], "blue", "the value as text, not bytes: {entry}");
    assert!(entry["created"].as_str().is_some_and(|t| t.starts_with("20") && t.ends_with('Z')), "RFC 3339: {entry}");
    agent.hoist_ok(&["kv", "del", "CONFIG", "app/colour"]);
    assert_eq!(agent.hoist_ok(&["kv", "ls", "CONFIG"]).trim(), "no keys in bucket CONFIG");
    let missing = agent.hoist(&["kv", "get", "CONFIG", "app/colour"]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no key app/colour"));
    let bad = agent.hoist(&["kv", "put", "NOPE", "k", "v"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no bucket named NOPE"), "{bad:?}");

    agent.hoist_ok(&["governor", "add", "G", "2", "1m"]);
    let view = agent.hoist_ok(&["governor", "view", "G"]);
    assert!(view.contains("capacity 2") && view.contains("expire 1m") && view.contains("0 active"), "{view}");
    agent.hoist_ok(&["governor", "add", "G", "3", "2m"]);
    let info: serde_json::Value = serde_json::from_str(&agent.hoist_ok(&["governor", "view", "G", "--json"])).unwrap();
    assert_eq!(info["capacity"], 3, "capacity changes live: {info}");
    assert_eq!(agent.hoist_ok(&["governor", "ls"]).trim(), "G");
    let evict = agent.hoist(&["governor", "evict", "G", "99"]);
    assert!(String::from_utf8_lossy(&evict.stderr).contains("no lease 99"), "{evict:?}");
    agent.hoist_ok(&["governor", "reset", "G"]);
    agent.hoist_ok(&["governor", "rm", "G"]);
    let gone = agent.hoist(&["governor", "view", "G"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no governor named G"), "{gone:?}");
}

#[test]
fn register_ports_are_published_while_running_and_expire_when_the_agent_dies() {
    let extra = "    register_ports:\n      - { cluster: lon, service: web, protocol: http, ip: '%{facts.networking.ip}', port: 8080, annotations: { team: ops } }\n";
    let mut agent = TestAgent::start_with(
        "services",
        &web(free_port(), "v1", extra),
        "registration:\n  interval: 1s\nfacts:\n  networking:\n    ip: 10.9.8.7\n",
    );
    let first = agent.wait_running("web");
    let services =
        |agent: &TestAgent| -> Vec<serde_json::Value> { serde_json::from_str(&agent.hoist_ok(&["services", "--json"])).unwrap() };
    let listed = wait_until("the registration", Duration::from_secs(10), || Some(services(&agent)).filter(|s| !s.is_empty()));
    assert_eq!(
        listed,
        vec![
            serde_json::json!({"cluster": "lon", "service": "web", "protocol": "http", "address": "10.9.8.7", "port": 8080, "priority": 1, "annotations": {"team": "ops"}})
        ]
    );
    let keys = agent.hoist_ok(&["kv", "ls", "CHORIA_SERVICES"]);
    assert_eq!(keys.trim(), format!("lon.http.web.{}", first.id), "keyed <cluster>.<protocol>.<service>.<instance>");
    assert!(agent.hoist_ok(&["services"]).contains("10.9.8.7"));

    // Not serving in maintenance: withdrawn at once; back on resume.
    agent.hoist_ok(&["transition", "web", "maintenance"]);
    wait_until("the registration withdrawn", Duration::from_secs(5), || services(&agent).is_empty().then_some(()));
    agent.hoist_ok(&["transition", "web", "resume"]);
    wait_until("the registration back", Duration::from_secs(10), || (!services(&agent).is_empty()).then_some(()));

    // An agent that dies cannot withdraw; the bucket's TTL (3 intervals) removes its entries.
    agent.kill_agent();
    std::thread::sleep(Duration::from_secs(4));
    agent.spawn();
    let second = agent.wait_running("web");
    let keys = wait_until("only the new instance registered", Duration::from_secs(10), || {
        let keys = agent.hoist_ok(&["kv", "ls", "CHORIA_SERVICES"]);
        (keys.trim() == format!("lon.http.web.{}", second.id)).then_some(keys)
    });
    assert!(!keys.contains(&first.id));
}

#[test]
fn transition_wait_follows_the_container_until_it_settles() {
    let port = free_port();
    let check = "    health_check: { type: http, port: 80, interval: 1s }\n";
    let rollout = "{ unverified_wait: 1s, min_healthy_time: 3s, healthy_deadline: 30s, governor_timeout: 60s }";
    let agent = TestAgent::start_with_rollout("wait", &web(port, "v1", check), "", rollout);
    agent.wait_running("web");

    let out = agent.hoist_ok(&["transition", "web", "restart", "--wait"]);
    assert!(out.contains("web: RESTART: healthy; confirming for"), "the gate's progress is shown: {out}");
    assert!(out.trim_end().ends_with("web: RUN on v1"), "{out}");
    assert_eq!(agent.machine("web").unwrap().restarts, 1, "settled means the restart is done");

    // The gate needs 3 s of health, so a 1 s limit cannot see the restart settle.
    let out = agent.hoist(&["transition", "web", "restart", "--wait", "1s"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("web: still RESTART after 1s"), "{out:?}");
    // A stop settles in MAINTENANCE.
    agent.wait_running("web");
    let out = agent.hoist_ok(&["transition", "web", "stop", "--wait"]);
    assert!(out.trim_end().ends_with("web: MAINTENANCE on v1"), "{out}");
    assert!(!agent.container_running("web"));
}

#[test]
fn refused_transitions_exit_with_a_code_that_says_why() {
    let agent = TestAgent::start("exitcodes", &web(free_port(), "v1", ""));
    agent.wait_running("web");
    let code = |args: &[&str]| {
        let out = agent.hoist(args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (not_allowed, why) = code(&["transition", "web", "resume"]);
    assert_eq!(not_allowed, Some(3), "{why}");
    assert!(why.contains("allowed: maintenance, restart, update, stop"), "{why}");
    let (unknown, why) = code(&["transition", "nosuch", "restart"]);
    assert_eq!(unknown, Some(4), "{why}");
    assert!(why.contains("no container named \"nosuch\""), "{why}");
    let (not_requestable, why) = code(&["transition", "web", "health_check"]);
    assert_eq!(not_requestable, Some(2), "{why}");
    assert!(why.contains("decided by the agent's health checks"), "{why}");
}
