//! Input checks: host port conflicts, ranges of every setting, the last good set, the syslog warning,
//! numbers kept as written, and the agent file's fleet section.

use super::*;

#[test]
fn two_containers_on_one_host_port_are_refused_naming_both() {
    let dir = TempDir::new().unwrap();
    let first = write(dir.path(), "1.yaml", "containers:\n  api: {image: x, ports: ['127.0.0.1:8080:80']}\n");
    let second = write(dir.path(), "2.yaml", "containers:\n  web: {image: x, ports: ['9000:9000', '8080:80']}\n");
    let errors = load_containers(&[first.clone(), second.clone()], &facts()).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert_eq!((e.file.as_ref(), e.container.as_deref(), e.field.as_deref()), (Some(&second), Some("web"), Some("ports[1]")));
    let text = e.to_string();
    for part in
        ["host port *:8080/tcp collides with 127.0.0.1:8080/tcp, published by container api (ports[0] in", "1.yaml", "another host port"]
    {
        assert!(text.contains(part), "{part} missing from {text}");
    }
}

#[test]
fn host_ports_conflict_only_on_the_same_protocol_and_an_overlapping_address() {
    let conflicts = |a: &str, b: &str| {
        let (_dir, result) = load_one(&format!("containers:\n  a: {{image: x, ports: ['{a}']}}\n  b: {{image: x, ports: ['{b}']}}\n"));
        result.is_err()
    };
    for (a, b) in [
        ("8080:80", "8080:81"),
        ("0.0.0.0:8080:80", "127.0.0.1:8080:80"),
        ("127.0.0.1:8080:80", "127.0.0.1:8080:81"),
        ("[::]:8080:80", "10.0.0.1:8080:80"),
        ("[::1]:8080:80", "8080:80"),
        ("53:53/udp", "0.0.0.0:53:53/udp"),
    ] {
        assert!(conflicts(a, b), "{a} and {b} should conflict");
    }
    for (a, b) in [
        ("8080:80", "8080:80/udp"),
        ("127.0.0.1:8080:80", "127.0.0.2:8080:80"),
        ("0.0.0.0:8080:80", "[::1]:8080:80"),
        ("8080:80", "8081:80"),
        ("80", "80"),
        ("127.0.0.1::80", "127.0.0.1::80"),
    ] {
        assert!(!conflicts(a, b), "{a} and {b} should not conflict");
    }
    // One container publishing a port twice fails in Docker the same way.
    let e = only_error("containers:\n  a: {image: x, ports: ['8080:80', '8080:81']}\n");
    assert_eq!(e.field.as_deref(), Some("ports[1]"));
    assert!(e.message.contains("this container (ports[0]"), "{e}");
    // A container being removed holds no port.
    let (_dir, set) = load_one("containers:\n  a: {ensure: absent, ports: ['8080:80']}\n  b: {image: x, ports: ['8080:80']}\n");
    assert!(set.is_ok());
}

#[test]
fn agent_settings_outside_their_range_are_refused_all_at_once() {
    let dir = TempDir::new().unwrap();
    let file = write(
        dir.path(),
        "hoist.yaml",
        "node: 'web01..example.net'\ndocker: {name_prefix: _x, stop_grace: 2h, purge_grace: 400d, host: docker.sock}\nbackend: nats\nnats: {servers: ['nats://a:4222', 'http://b:4222', 'c:99999'], collective: a.b, token: '', nkey: /nope/nkey}\nregistration: {interval: 0}\nrollout: {healthy_deadline: 0, min_healthy_time: 2h, unverified_wait: 0, governor_timeout: 0}\nmetrics: {listen: '127.0.0.1:0'}\n",
    );
    let errors = AgentConfig::load(&file).unwrap_err();
    let text = errors.to_string();
    for (field, says) in [
        ("node", "part of NATS subjects"),
        ("docker.name_prefix", "starting with a letter or digit"),
        ("docker.stop_grace", "must be from 0s to 1h, found 2h"),
        ("docker.purge_grace", "must be from 0s to 1day"),
        ("docker.host", "unix:///"),
        ("nats.servers", "\"http://b:4222\" has the scheme http://"),
        ("nats.servers", "\"c:99999\" has no valid port"),
        ("nats.collective", "single NATS subject token"),
        ("nats", "give only one"),
        ("nats.token", "is empty"),
        ("nats.nkey", "/nope/nkey does not exist"),
        ("registration.interval", "must be from 1s to 1h, found 0s"),
        ("rollout.healthy_deadline", "must be from 1s to 1day, found 0s"),
        ("rollout.min_healthy_time", "must be from 0s to 1h, found 2h"),
        ("rollout.governor_timeout", "must be from 1s"),
        ("metrics.listen", "port 0"),
    ] {
        let found = errors.0.iter().any(|e| e.field.as_deref() == Some(field) && e.message.contains(says));
        assert!(found, "no error for {field} saying {says:?} in:\n{text}");
    }
    assert!(errors.0.iter().all(|e| e.file.as_deref() == Some(file.as_path())), "{text}");

    // A gate held longer than it is given could never pass.
    let file = write(dir.path(), "hoist.yaml", "rollout: {healthy_deadline: 30s, min_healthy_time: 30s}\n");
    let e = AgentConfig::load(&file).unwrap_err().0.remove(0);
    assert_eq!(e.field.as_deref(), Some("rollout.min_healthy_time"));
    assert!(e.message.contains("not shorter than rollout.healthy_deadline"), "{e}");
    // ccm listens on NATS: one node alone has nowhere to publish to.
    let file = write(dir.path(), "hoist.yaml", "registration: {ccm: true}\n");
    let e = AgentConfig::load(&file).unwrap_err().0.remove(0);
    assert_eq!(e.field.as_deref(), Some("registration.ccm"));
    assert!(e.message.contains("needs backend: nats"), "{e}");
    // The socket path is bounded by the kernel.
    let file = write(dir.path(), "hoist.yaml", &format!("control: {{socket: /{}/hoist.sock}}\n", "d".repeat(100)));
    assert_eq!(AgentConfig::load(&file).unwrap_err().0[0].field.as_deref(), Some("control.socket"));
    // The bounds themselves are accepted.
    let file = write(
        dir.path(),
        "hoist.yaml",
        "node: n_1-a\ndocker: {name_prefix: '', stop_grace: 0, purge_grace: 1day}\nregistration: {interval: 1h}\nrollout: {healthy_deadline: 1s, min_healthy_time: 0, unverified_wait: 0, governor_timeout: 1s}\nnats: {servers: ['tls://n1:4222', 'n2']}\n",
    );
    AgentConfig::load(&file).unwrap();
}

#[test]
fn container_timings_outside_their_range_are_refused() {
    let cases = [
        ("kv_interval: 0", "kv_interval", "must be from 1s to 1day, found 0s"),
        ("kv_interval: 2d", "kv_interval", "found 2days"),
        ("health_check: {type: tcp, port: 80, interval: 0}", "health_check.interval", "must be from 1s to 1h"),
        ("health_check: {type: tcp, port: 80, interval: 2h}", "health_check.interval", "found 2h"),
        ("health_check: {type: tcp, port: 80, timeout: 1ms}", "health_check.timeout", "must be from 100ms to 5m"),
        ("health_check: {type: tcp, port: 80, retries: 0}", "health_check.retries", "must be from 1 to 100"),
        ("health_check: {type: tcp, port: 80, retries: 5000000000}", "health_check.retries", "found 5000000000"),
        ("health_check: {type: tcp, port: 80, start_period: 100y}", "health_check.start_period", "must be from 0s to 1h"),
        // The dependency check is the same settings, named as its own field.
        ("dependency_check: {type: exec}", "dependency_check.command", "is required"),
        ("dependency_check: {type: tcp, port: 80, path: /db}", "dependency_check.path", "does not apply to a check of type tcp"),
        ("dependency_check: yes", "dependency_check", "expected a mapping with type"),
    ];
    for (setting, field, says) in cases {
        let e = only_error(&format!("containers:\n  web: {{image: x, {setting}}}\n"));
        assert_eq!((e.container.as_deref(), e.field.as_deref()), (Some("web"), Some(field)), "{setting}: {e}");
        assert!(e.message.contains(says), "{setting}: {e}");
    }
    let (_dir, set) = load_one(
        "containers:\n  web: {image: x, kv_interval: 1d, health_check: {type: tcp, port: 80, interval: 1s, timeout: 100ms, retries: 100, start_period: 1h}}\n",
    );
    set.unwrap();
}

#[test]
fn the_last_good_set_survives_a_round_trip_through_its_file() {
    let (_dir, set) = load_one(
        "containers:\n  web:\n    image: x\n    image_tag: '1.10'\n    ports: ['127.0.0.1:8080:80/udp']\n    volumes: ['/a:/b:ro']\n    environment: {A: '1'}\n    register_ports: [{cluster: c, service: s, ip: 10.0.0.1, port: 80, annotations: {k: v}}]\n    health_check: {type: http, port: 80, path: /h, timeout: 500ms}\n  old: {ensure: absent}\n",
    );
    let set = set.unwrap();
    let state = TempDir::new().unwrap();
    assert_eq!(LastGood::load(state.path()).unwrap(), None, "nothing saved yet");
    LastGood::save(state.path(), &set, 1234).unwrap();
    assert_eq!(LastGood::load(state.path()).unwrap(), Some(LastGood { saved: 1234, set }));
    std::fs::write(state.path().join(LAST_GOOD_FILE), "{\"saved\": 1").unwrap();
    assert!(LastGood::load(state.path()).unwrap_err().contains("last-good.json is unreadable"));
}

#[test]
fn syslog_without_a_local_socket_or_an_address_is_warned_about() {
    let (dir, set) = load_one("containers:\n  web: {image: x, syslog: true}\n  api: {image: x, syslog: true}\n  db: {image: x}\n");
    let set = set.unwrap();
    let missing = dir.path().join("no-log");
    let missing = missing.to_str().unwrap();
    let docker = AgentConfig::defaults().docker;
    let warning = syslog_warning(&set, &docker, None, &[missing]).expect("a warning");
    for part in ["api, web", "syslog: true", "docker.syslog_address", missing] {
        assert!(warning.contains(part), "{part} missing from {warning}");
    }
    assert!(warning.contains("api, web have"), "db does not log to syslog: {warning}");
    // A local socket, an address, or an engine elsewhere (whose host cannot be checked): no warning.
    let socket = dir.path().join("log");
    let _listener = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    assert_eq!(syslog_warning(&set, &docker, None, &[missing, socket.to_str().unwrap()]), None);
    let with_address = DockerConfig { syslog_address: Some("udp://10.0.0.9:514".into()), ..docker.clone() };
    assert_eq!(syslog_warning(&set, &with_address, None, &[missing]), None);
    assert_eq!(syslog_warning(&set, &docker, Some("tcp://10.0.0.2:2375"), &[missing]), None);
    assert!(syslog_warning(&set, &docker, Some("unix:///run/docker.sock"), &[missing]).is_some());
    // A directory of that name is not a socket.
    assert!(syslog_warning(&set, &docker, None, &[dir.path().to_str().unwrap()]).is_some());
}

#[test]
fn values_meant_as_text_keep_a_number_as_it_was_written() {
    // YAML reads 1.10 as 1.1 and 0x10 as 16; environment values, annotations and facts are text.
    let dir = TempDir::new().unwrap();
    let agent = write(dir.path(), "hoist.yaml", "facts: {app: {version: 2.10}, port: 8080}\n");
    let facts = AgentConfig::load(&agent).unwrap().facts();
    assert_eq!((&facts["app"]["version"], &facts["port"]), (&json!("2.10"), &json!("8080")));
    let data = write(
        dir.path(),
        "containers.yaml",
        "containers:\n  web:\n    image: x\n    image_tag: '%{facts.app.version}'\n    environment: {VERSION: 1.10, MASK: 0x10, PORT: 80, RATE: 1.5, ON: true, APP: '%{facts.app.version}'}\n    register_ports: [{cluster: c, service: s, ip: 10.0.0.1, port: 8080, annotations: {version: 1.20}}]\n    command: [app, --ratio, 0.50]\n    entrypoint: [run, 1.0]\n    health_check: {type: exec, command: [check, 2.0]}\n",
    );
    let base = write(dir.path(), "base.yaml", "containers:\n  web:\n    environment: {OLD: 1.0}\n");
    let set = load_containers(&[base, data], &facts).unwrap();
    let web = &set.containers["web"];
    let env: Vec<_> = web.environment.iter().map(|e| format!("{}={}", e.key, e.value)).collect();
    assert_eq!(env, ["APP=2.10", "MASK=0x10", "OLD=1.0", "ON=true", "PORT=80", "RATE=1.5", "VERSION=1.10"]);
    assert_eq!(web.image_tag, ImageVersion::Tag("2.10".into()));
    assert_eq!(web.register_ports[0].annotations["version"], "1.20");
    assert_eq!(
        (&web.command, &web.entrypoint),
        (&vec!["app".to_string(), "--ratio".into(), "0.50".into()], &vec!["run".to_string(), "1.0".into()])
    );
    assert_eq!(web.health_check.as_ref().unwrap().probe, Probe::Exec { command: vec!["check".into(), "2.0".into()] });
    assert_eq!(web.register_ports[0].port, 8080, "numbers meant as numbers are read as YAML types them");
}

#[test]
fn agent_file_fleet_section() {
    use crate::config::Permission;
    use crate::fsm::Transition;
    let dir = TempDir::new().unwrap();
    let alice = nkeys::KeyPair::new_user();
    let text = format!(
        "nats: {{ inbox_prefix: _INBOX_hoist. }}\nfleet:\n  key: keys/me.nk\n  max_clock_skew: 1m\n  operators:\n    - {{ name: alice, key: {}, allow: [status, restart], containers: [web] }}\n",
        alice.public_key()
    );
    let cfg = AgentConfig::load(&write(dir.path(), "hoist.yaml", &text)).unwrap();
    assert_eq!(cfg.nats.inbox_prefix, "_INBOX_hoist", "the trailing dot is optional");
    assert_eq!(cfg.fleet.key, Some(dir.path().join("keys/me.nk")));
    assert_eq!(cfg.fleet.max_clock_skew, Duration::from_secs(60));
    assert!(!cfg.fleet.allow_unsigned);
    let op = &cfg.fleet.operators[0];
    assert_eq!(
        (op.name.as_str(), op.allow.as_slice(), op.containers.as_slice()),
        ("alice", &[Permission::Status, Permission::Only(Transition::Restart)][..], &["web".to_string()][..])
    );
    let defaults = AgentConfig::load(&write(dir.path(), "empty.yaml", "")).unwrap();
    assert_eq!((defaults.nats.inbox_prefix.as_str(), defaults.fleet.operators.len()), ("_INBOX", 0));

    let errors = |text: &str| -> Vec<(String, String)> {
        let e = AgentConfig::load(&write(dir.path(), "bad.yaml", text)).unwrap_err();
        e.0.into_iter().map(|e| (e.field.unwrap_or_default(), e.message)).collect()
    };
    let seed = alice.seed().unwrap();
    let bad = errors(&format!(
        "fleet:\n  max_clock_skew: 0s\n  operators:\n    - {{ name: a, key: {seed}, allow: [status] }}\n    - {{ name: a, key: NOPE, allow: [reboot] }}\n    - {{ name: b, key: {}, allow: [] }}\n",
        alice.public_key()
    ));
    let has = |field: &str, text: &str| bad.iter().any(|(f, m)| f == field && m.contains(text));
    assert!(has("fleet.operators[0].key", "this is a seed"), "{bad:?}");
    assert!(has("fleet.operators[1].name", "a name of its own"), "{bad:?}");
    assert!(has("fleet.operators[1].key", "not an operator's public key"), "{bad:?}");
    assert!(has("fleet.operators[1].allow", "\"reboot\" is not a permission"), "{bad:?}");
    assert!(has("fleet.operators[2].allow", "list what this operator may do"), "{bad:?}");
    assert!(has("fleet.max_clock_skew", "more than zero"), "{bad:?}");
    assert_eq!(defaults.fleet.degraded, crate::degraded::DegradedPolicy::default());
    let degraded = AgentConfig::load(&write(
        dir.path(),
        "d.yaml",
        "fleet: { degraded: { share: 30, window: 5m, min_nodes: 5 } }
",
    ))
    .unwrap();
    assert_eq!(degraded.fleet.degraded, crate::degraded::DegradedPolicy { share: 30, window: Duration::from_secs(300), min_nodes: 5 });
    let bad = errors("fleet: { degraded: { share: 0, window: 1s, min_nodes: 0 } }\n");
    let has = |field: &str, text: &str| bad.iter().any(|(f, m)| f == field && m.contains(text));
    assert!(has("fleet.degraded.share", "a percentage from 1 to 100"), "{bad:?}");
    assert!(has("fleet.degraded.window", "at least 5s"), "{bad:?}");
    assert!(has("fleet.degraded.min_nodes", "at least 1"), "{bad:?}");
    assert_eq!(errors("nats: { inbox_prefix: '_INBOX.>' }\n")[0].0, "nats.inbox_prefix");
    assert_eq!(errors("fleet: { operators: [ { name: a, key: x } ] }\n")[0].0, "fleet.operators[0]");
}

#[test]
fn a_preflight_is_a_command_and_a_timeout_and_its_mistakes_are_named() {
    let (_dir, set) = load_one("containers:\n  web: {image: x, preflight: {command: 'app --check-config', timeout: 2m}}\n");
    let check = set.unwrap().containers["web"].preflight.clone().expect("a preflight");
    assert_eq!((check.command, check.timeout), (vec!["app".to_string(), "--check-config".into()], Duration::from_secs(120)));
    let (_dir, set) = load_one("containers:\n  web: {image: x, preflight: {command: [app, --version]}}\n");
    assert_eq!(set.unwrap().containers["web"].preflight.clone().map(|p| p.timeout), Some(Duration::from_secs(30)), "30 s by default");
    for (yaml, field, says) in [
        ("preflight: {timeout: 5s}", "preflight.command", "is required"),
        ("preflight: {command: ''}", "preflight.command", "must not be empty"),
        ("preflight: {command: x, timeout: 2h}", "preflight.timeout", "from 1s to 1h"),
        ("preflight: {command: x, tmeout: 5s}", "preflight.tmeout", ""),
        ("preflight: app --check", "preflight", "expected a mapping"),
    ] {
        let e = only_error(&format!("containers:\n  web: {{image: x, {yaml}}}\n"));
        assert_eq!((e.container.as_deref(), e.field.as_deref()), (Some("web"), Some(field)), "{yaml}: {e}");
        assert!(e.message.contains(says), "{yaml}: {e}");
    }
}
