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
    ];
    for (content, expected) in &corpus {
        std::fs::write(agent.path("containers.d/containers.yaml"), content).unwrap();
        let err = wait_until(&format!("a refusal mentioning {expected:?}"), Duration::from_secs(20), || {
            agent.status().config_error.filter(|e| expected.iter().all(|f| e.contains(f)))
        });
        assert!(err.contains("containers.yaml"), "names the file: {err}");
    }
    let after = agent.machine("web").unwrap();
    assert_eq!((after.state, after.container_id), (State::Run, before.container_id), "nothing running changed");
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // A good file again clears the error.
    agent.write_containers(&good);
    wait_until("the error to clear", Duration::from_secs(20), || agent.status().config_error.is_none().then_some(()));
}
