//! The bad-input corpus: each file is refused by a running agent with an error naming the file, the
//! container and the field, and nothing that runs changes.

mod support;

use hoist_core::fsm::State;
use std::time::Duration;
use support::*;

#[test]
fn every_bad_input_is_refused_with_a_located_error_and_nothing_running_changes() {
    let port = free_port();
    let good = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    ports: ['127.0.0.1:{port}:80']\n", image());
    let agent = TestAgent::start("corpus", &good);
    let before = agent.wait_running("web");
    let web = |body: &str| format!("containers:\n  web:\n    image: {}\n{body}", image());
    let conflict = format!("host port 127.0.0.1:{port}/tcp collides with *:{port}/tcp, published by container api");
    let events = Watch::start(&agent, &[]);

    // (file content, fragments the error must contain)
    let corpus: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (b"containers:\n  web: [unclosed\n".to_vec(), vec!["invalid YAML", "line 3"]),
        (web("    ports: '80'\n").into_bytes(), vec!["container web", "field ports", "expected a list"]),
        (web("    colour: red\n").into_bytes(), vec!["container web", "field colour", "unknown field"]),
        (web("    ports: ['99999:80']\n").into_bytes(), vec!["container web", "ports[0]"]),
        (web("    volumes: ['/a:/b:rw:x']\n").into_bytes(), vec!["container web", "volumes[0]"]),
        (web("    environment: ['=x']\n").into_bytes(), vec!["container web", "environment[0]"]),
        (web("    image_tag: 'not a tag!'\n").into_bytes(), vec!["container web", "field image_tag", "not a valid image tag"]),
        (web("    syslog: maybe\n    kv_interval: -3\n").into_bytes(), vec!["field syslog", "field kv_interval"]),
        (format!("containers:\n  web:\n    image: {}\n", "a".repeat(70_000)).into_bytes(), vec!["containers.web.image", "64 KiB"]),
        ([web("    command: ").into_bytes(), vec![0xff, 0xfe, b'\n']].concat(), vec!["UTF-8"]),
        (web("    health_check: { type: grpc, port: 80 }\n").into_bytes(), vec!["container web", "health_check"]),
        (b"containers:\n  'bad name!':\n    image: x\n".to_vec(), vec!["bad name!", "name"]),
        // YAML numbers: 1.10 would deploy 1.1, 0x10 would deploy 16.
        (web("    image_tag: 1.10\n").into_bytes(), vec!["container web", "field image_tag", "the number 1.1", r#"image_tag: "1.10""#]),
        (web("    image_tag: 0x10\n").into_bytes(), vec!["container web", "field image_tag", "the number 16", "quote"]),
        // A second container on the same host port would crash-loop.
        (
            format!("containers:\n  api:\n    image: {0}\n    ports: ['{port}:80']\n  web:\n    image: {0}\n    ports: ['127.0.0.1:{port}:80']\n", image())
                .into_bytes(),
            vec!["container web", "field ports[0]", &conflict, "container api"],
        ),
        // Timings and counts outside their range.
        (web("    kv_interval: 0\n").into_bytes(), vec!["container web", "field kv_interval", "from 1s to 1day, found 0s"]),
        (
            web("    health_check: { type: tcp, port: 80, interval: 0, timeout: 1h, retries: 0, start_period: 30d }\n").into_bytes(),
            vec![
                "field health_check.interval: must be from 1s to 1h",
                "field health_check.timeout: must be from 100ms to 5m",
                "field health_check.retries: must be from 1 to 100",
                "field health_check.start_period: must be from 0s to 1h",
            ],
        ),
    ];
    for (content, expected) in &corpus {
        std::fs::write(agent.path("containers.d/containers.yaml"), content).unwrap();
        let err = wait_until(&format!("a refusal mentioning {expected:?}"), Duration::from_secs(20), || {
            agent.status().config_error.filter(|e| expected.iter().all(|f| e.contains(f)))
        });
        assert!(err.contains("containers.yaml"), "names the file: {err}");
    }
    let refusals: Vec<_> = events.finish().into_iter().filter(|e| e.transition == "config_refused").collect();
    assert!(refusals.len() >= corpus.len(), "an event for each refusal, got {refusals:#?}");
    assert!(refusals.iter().all(|e| e.machine == "hoist" && e.identity == agent.node), "{refusals:#?}");
    assert!(refusals.iter().any(|e| e.detail.as_deref().is_some_and(|d| d.contains("field colour"))), "{refusals:#?}");
    let after = agent.machine("web").unwrap();
    assert_eq!((after.state, after.container_id), (State::Run, before.container_id), "nothing running changed");
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // A good file again clears the error.
    agent.write_containers(&good);
    wait_until("the error to clear", Duration::from_secs(20), || agent.status().config_error.is_none().then_some(()));
}

/// `hoist validate` and `hoist agent` on an agent file with settings outside their range: both refuse,
/// naming the file and every field, and the agent starts nothing.
#[test]
fn agent_file_settings_outside_their_range_are_refused_by_validate_and_agent() {
    let agent =
        TestAgent::prepare("agentfile", &format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n", image()), "", FAST_ROLLOUT);
    let file = agent.path("hoist.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    // The harness writes its own docker and rollout sections; the bad values replace its values.
    let text = text
        .replace("stop_grace: 2s", "stop_grace: 2h")
        .replace("name_prefix: ", "name_prefix: -")
        .replace("purge_grace: 4s", "purge_grace: 400d\n  host: docker.sock")
        .replace(&format!("node: {}", agent.node), "node: web01..example.net");
    let text = text.replace("rollout: {", "rollout: { healthy_deadline: 0, ").replace(", healthy_deadline: 30s", "");
    std::fs::write(
        &file,
        format!(
            "{text}registration: {{interval: 0}}\nmetrics: {{listen: '127.0.0.1:0'}}\nbackend: nats\nnats: {{servers: ['nats//n1'], collective: 'a.b', token: ''}}\n"
        ),
    )
    .unwrap();
    let expected = [
        "field registration.interval: must be from 1s to 1h, found 0s",
        "field rollout.healthy_deadline: must be from 1s to 1day, found 0s",
        "field docker.stop_grace: must be from 0s to 1h, found 2h",
        "field docker.name_prefix:",
        "field docker.purge_grace: must be from 0s to 1day",
        "field docker.host: \"docker.sock\" is not a Docker Engine address",
        "field node: \"web01..example.net\" is not a valid node name",
        "field metrics.listen: port 0",
        "field nats.token: is empty",
        "field nats.collective:",
        "field nats.servers: \"nats//n1\"",
    ];
    for command in [&["validate"][..], &["agent"][..]] {
        let out = agent.hoist(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "hoist {command:?} should refuse: {stderr}");
        for part in expected {
            assert!(stderr.contains(&format!("{}: {part}", file.display())), "hoist {command:?}: {part} missing from:\n{stderr}");
        }
    }
    assert!(agent.labelled_containers().is_empty(), "nothing was started");
}

/// `syslog: true` with the default address needs a local syslog socket; without one the container
/// could never start, which validate and `hoist status` say, with the fix.
#[test]
fn syslog_without_a_local_syslog_socket_is_a_warning_in_validate_and_status() {
    use std::os::unix::fs::FileTypeExt;
    let has_socket = hoist_core::config::LOCAL_SYSLOG_SOCKETS.iter().any(|s| std::fs::metadata(s).is_ok_and(|m| m.file_type().is_socket()));
    if has_socket {
        eprintln!("skipped: this host has a local syslog socket");
        return;
    }
    let containers = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    syslog: true\n", image());
    let agent = TestAgent::start("syslog", &containers);
    let out = agent.hoist(&["validate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not a refusal: {stderr}");
    for part in ["warning: container(s) web have syslog: true", "/dev/log", "docker.syslog_address"] {
        assert!(stderr.contains(part), "{part} missing from validate's output: {stderr}");
    }
    let warnings = agent.status().warnings;
    assert!(warnings.iter().any(|w| w.starts_with("syslog: container(s) web") && w.contains("docker.syslog_address")), "{warnings:?}");
    let human = String::from_utf8_lossy(&agent.hoist(&["status"]).stdout).into_owned();
    assert!(human.contains("warning: syslog: container(s) web"), "{human}");

    // Without syslog the warning goes away on reload.
    agent.write_containers(&containers.replace("syslog: true", "syslog: false"));
    wait_until("the syslog warning to clear", Duration::from_secs(20), || {
        (!agent.status().warnings.iter().any(|w| w.starts_with("syslog:"))).then_some(())
    });
}
