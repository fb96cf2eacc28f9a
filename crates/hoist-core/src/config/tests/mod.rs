//! End-to-end tests of the config module through its public functions, on real files.

use super::*;
use crate::spec::Protocol;
use serde_json::json;
use std::path::Path;
use tempfile::TempDir;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn facts() -> serde_json::Value {
    json!({"hostname": "node1", "networking": {"ip": "10.1.2.3"}, "role": {"port": 8080}})
}

/// Loads one data file named `containers.yaml`.
fn load_one(text: &str) -> (TempDir, Result<ContainerSet, ConfigErrors>) {
    let dir = TempDir::new().unwrap();
    let file = write(dir.path(), "containers.yaml", text);
    let result = load_containers(&[file], &facts());
    (dir, result)
}

fn errors_of(text: &str) -> Vec<ConfigError> {
    load_one(text).1.expect_err("the config should be refused").0
}

fn only_error(text: &str) -> ConfigError {
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap()
}

#[test]
fn hiera_form_with_other_classes_and_lookup_options() {
    let (_dir, set) = load_one(
        "lookup_options:\n  hoist::containers: {merge: deep}\nntp::servers: [a]\nhoist::purge: false\nhoist::containers:\n  web:\n    image: example/web\n    image_tag: v1\n",
    );
    let set = set.unwrap();
    assert!(!set.purge);
    assert_eq!(set.containers["web"].image, "example/web");
    assert_eq!(set.containers["web"].image_tag, ImageVersion::Tag("v1".into()));
}

#[test]
fn plain_form_and_mixed_forms() {
    let (_dir, set) = load_one("containers:\n  web: {image: example/web}\nhoist::containers:\n  db: {image: example/db}\n");
    let set = set.unwrap();
    assert!(set.purge, "purge defaults to true");
    assert_eq!(set.containers.keys().collect::<Vec<_>>(), ["db", "web"]);
}

#[test]
fn a_minimal_definition_gets_every_default() {
    let (dir, set) = load_one("containers:\n  web:\n    image: example/web\n");
    let web = &set.unwrap().containers["web"];
    let expected = ContainerConfig {
        name: "web".into(),
        ensure: Ensure::Present,
        image: "example/web".into(),
        image_tag: ImageVersion::Tag("latest".into()),
        command: vec![],
        entrypoint: vec![],
        network: "bridge".into(),
        syslog: false,
        kv_update: false,
        kv_interval: Duration::from_secs(10),
        restart_governor: None,
        update_governor: None,
        restart_files: vec![],
        ports: vec![],
        volumes: vec![],
        environment: vec![],
        register_ports: vec![],
        health_check: None,
        dependency_check: None,
        stop_signal: None,
        stop_grace: None,
        restart_backoff: None,
        preflight: None,
        sources: vec![dir.path().join("containers.yaml")],
    };
    assert_eq!(web, &expected);
}

#[test]
fn every_field_parsed() {
    let (_dir, set) = load_one(
        r#"containers:
  web:
    image: registry.example.net:5000/team/web
    image_tag: "1.5"
    command: "httpd -f -p '8080'"
    entrypoint: /bin/sh
    network: host
    syslog: true
    kv_update: true
    kv_interval: 30
    restart_governor: web_restart
    update_governor: ""
    restart_files: [/etc/web.conf]
    ports: ["127.0.0.1:8080:80", "53:53/udp", 80]
    volumes: ["/srv:/data:ro", "named:/cache"]
    environment: {PORT: 80, DEBUG: true, NAME: web}
"#,
    );
    let web = &set.unwrap().containers["web"];
    assert_eq!(web.image_tag, ImageVersion::Tag("1.5".into()));
    assert_eq!(web.command, ["httpd", "-f", "-p", "8080"]);
    assert_eq!(web.entrypoint, ["/bin/sh"]);
    assert_eq!((web.network.as_str(), web.syslog, web.kv_update), ("host", true, true));
    assert_eq!(web.kv_interval, Duration::from_secs(30));
    assert_eq!((web.restart_governor.as_deref(), web.update_governor.as_deref()), (Some("web_restart"), None));
    assert_eq!(web.restart_files, [PathBuf::from("/etc/web.conf")]);
    assert_eq!(web.ports.iter().map(ToString::to_string).collect::<Vec<_>>(), ["127.0.0.1:8080:80/tcp", "53:53/udp", "80/tcp"]);
    assert_eq!(web.ports[1].protocol, Protocol::Udp);
    assert!(web.volumes[0].read_only && !web.volumes[1].read_only);
    let env: Vec<_> = web.environment.iter().map(|e| format!("{}={}", e.key, e.value)).collect();
    assert_eq!(env, ["DEBUG=true", "NAME=web", "PORT=80"]);
}

#[test]
fn a_quoted_tag_and_a_digest() {
    let (_dir, set) = load_one(&format!(
        "containers:\n  a: {{image: x, image_tag: '1.10'}}\n  b: {{image: x, image_tag: 'sha256:{}'}}\n",
        "b".repeat(64)
    ));
    let set = set.unwrap();
    assert_eq!(set.containers["a"].image_tag, ImageVersion::Tag("1.10".into()));
    assert!(matches!(set.containers["b"].image_tag, ImageVersion::Digest(_)));
}

#[test]
fn an_unquoted_number_as_image_tag_is_refused_with_a_hint_to_quote_it() {
    // YAML reads 1.10 as 1.1 and 0x10 as 16: taken as text they would deploy tags nobody wrote.
    for (tag, read_as) in [("1.10", "1.1"), ("0x10", "16"), ("2", "2"), ("1e3", "1000")] {
        let e = only_error(&format!("containers:\n  web: {{image: x, image_tag: {tag}}}\n"));
        assert_eq!((e.container.as_deref(), e.field.as_deref()), (Some("web"), Some("image_tag")), "{tag}: {e}");
        assert!(e.file.as_ref().is_some_and(|f| f.ends_with("containers.yaml")), "{e}");
        assert!(e.message.contains(&format!("the number {read_as}")), "{tag}: {e}");
        assert!(e.message.contains(r#"image_tag: "1.10""#), "{tag}: {e}");
    }
}

#[test]
fn command_and_entrypoint_as_string_or_list() {
    let (_dir, set) = load_one(
        "containers:\n  a: {image: x, command: 'sh -c \"echo hi\"', entrypoint: ''}\n  b: {image: x, command: [sh, -c, echo hi], entrypoint: [/bin/sh, -e]}\n  c: {image: x, command: ''}\n",
    );
    let set = set.unwrap();
    assert_eq!(set.containers["a"].command, ["sh", "-c", "echo hi"]);
    assert!(set.containers["a"].entrypoint.is_empty());
    assert_eq!(set.containers["b"].command, ["sh", "-c", "echo hi"]);
    assert_eq!(set.containers["b"].entrypoint, ["/bin/sh", "-e"]);
    assert!(set.containers["c"].command.is_empty());
}

#[test]
fn environment_as_list_or_mapping() {
    let (_dir, set) =
        load_one("containers:\n  a: {image: x, environment: ['A=1', 'B=x=y']}\n  b: {image: x, environment: {A: 1, B: 'x=y'}}\n");
    let set = set.unwrap();
    assert_eq!(set.containers["a"].environment, set.containers["b"].environment);
    let e = only_error("containers:\n  a: {image: x, environment: {'1BAD': x}}\n");
    assert_eq!(e.field.as_deref(), Some("environment.1BAD"));
    let e = only_error("containers:\n  a: {image: x, environment: [A=1, NOEQ]}\n");
    assert_eq!(e.field.as_deref(), Some("environment[1]"));
    let e = only_error("containers:\n  a: {image: x, environment: {A: [1]}}\n");
    assert_eq!(e.field.as_deref(), Some("environment.A"));
}

#[test]
fn deep_merge_across_files() {
    let dir = TempDir::new().unwrap();
    let first = write(
        dir.path(),
        "a/common.yaml",
        "hoist::purge: false\nhoist::containers:\n  web:\n    image: example/web\n    ports: ['80:80', '443:443']\n    environment: {A: '1', B: '2'}\n    health_check: {type: http, port: 80, path: /health}\n  db:\n    image: example/db\n",
    );
    let second = write(
        dir.path(),
        "b/node.yaml",
        "containers:\n  web:\n    image_tag: v2\n    ports: ['8080:80']\n    environment: {B: '3', A: null}\n    health_check: {interval: 2s}\n",
    );
    let set = load_containers(&[first.clone(), second.clone()], &facts()).unwrap();
    assert!(!set.purge, "a file that does not set purge leaves it");
    let web = &set.containers["web"];
    assert_eq!(web.image, "example/web");
    assert_eq!(web.image_tag, ImageVersion::Tag("v2".into()));
    assert_eq!(web.ports.len(), 1, "lists are replaced, not appended");
    assert_eq!(web.environment, [EnvVar { key: "B".into(), value: "3".into() }], "null drops a variable");
    let hc = web.health_check.as_ref().unwrap();
    assert_eq!(hc.probe, Probe::Http { port: 80, path: "/health".into() });
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(web.sources, [first.clone(), second.clone()]);
    assert_eq!(set.containers["db"].sources, std::slice::from_ref(&first));

    let third = write(dir.path(), "c/purge.yml", "purge: true\n");
    assert!(load_containers(&[first, second, third], &facts()).unwrap().purge, "the last file setting purge wins");
}

#[test]
fn directories_are_read_in_name_order_and_missing_ones_are_empty() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("containers.d");
    write(&data, "20-late.yml", "containers:\n  web: {image: x, image_tag: late}\n");
    write(&data, "10-early.yaml", "containers:\n  web: {image: x, image_tag: early}\n");
    write(&data, "30-ignored.txt", "not: yaml data");
    write(&data, ".#lock.yaml", "garbage: [");
    std::fs::create_dir(data.join("sub.yaml")).unwrap();
    let set = load_containers(&[data.clone(), dir.path().join("missing.d")], &facts()).unwrap();
    let web = &set.containers["web"];
    assert_eq!(web.image_tag, ImageVersion::Tag("late".into()));
    assert_eq!(web.sources, [data.join("10-early.yaml"), data.join("20-late.yml")]);

    let empty = write(dir.path(), "empty.yaml", "");
    let comments = write(dir.path(), "comments.yaml", "# nothing yet\n");
    let set = load_containers(&[empty, comments], &facts()).unwrap();
    assert!(set.containers.is_empty() && set.purge);

    let errors = load_containers(&[dir.path().join("typo.yaml")], &facts()).unwrap_err().0;
    assert!(errors[0].to_string().contains("typo.yaml"), "{}", errors[0]);
}

#[test]
fn facts_are_interpolated_after_merging() {
    let (_dir, set) = load_one(
        "containers:\n  web:\n    image: x\n    environment: ['HOST=%{facts.hostname}', 'PORT=%{facts.role.port}']\n    register_ports:\n      - {cluster: prod, service: web, ip: '%{facts.networking.ip}', port: '%{facts.role.port}', annotations: {node: '%{facts.hostname}'}}\n",
    );
    let web = &set.unwrap().containers["web"];
    assert_eq!(web.environment[0].value, "node1");
    assert_eq!(web.environment[1].value, "8080");
    let r = &web.register_ports[0];
    assert_eq!(
        r,
        &Registration {
            cluster: "prod".into(),
            service: "web".into(),
            protocol: "tcp".into(),
            ip: "10.1.2.3".into(),
            port: 8080,
            priority: 1,
            annotations: [("node".to_string(), "node1".to_string())].into(),
        }
    );

    let e =
        only_error("containers:\n  web:\n    image: x\n    register_ports: [{cluster: c, service: s, ip: '%{facts.nope.ip}', port: 80}]\n");
    assert_eq!((e.container.as_deref(), e.field.as_deref()), (Some("web"), Some("register_ports[0].ip")));
    assert!(e.message.contains("facts.nope.ip"), "{e}");
    assert!(e.file.unwrap().ends_with("containers.yaml"));
    let e = only_error("containers:\n  web: {image: x, network: '%{hostname}'}\n");
    assert_eq!(e.field.as_deref(), Some("network"));
}

#[test]
fn register_ports_errors_are_located() {
    let errors = errors_of(
        "containers:\n  web:\n    image: x\n    register_ports:\n      - {cluster: c, service: s, ip: 1.2.3.4, port: 0, weight: 2}\n      - {cluster: a.b, ip: 1.2.3.4, port: 80}\n      - 80\n",
    );
    let fields: Vec<_> = errors.iter().map(|e| e.field.clone().unwrap()).collect();
    for expected in [
        "register_ports[0].weight",
        "register_ports[0].port",
        "register_ports[1].cluster",
        "register_ports[1].service",
        "register_ports[2]",
    ] {
        assert!(fields.iter().any(|f| f == expected), "{expected} missing from {fields:?}");
    }
}

#[test]
fn health_check_variants() {
    let (_dir, set) = load_one(
        "containers:\n  h: {image: x, health_check: {type: http, port: 80}}\n  t: {image: x, health_check: {type: tcp, port: '8080', interval: 1m, timeout: 2, retries: 5, start_period: 30s}}\n  e: {image: x, health_check: {type: exec, command: 'test -f /ready'}}\n",
    );
    let set = set.unwrap();
    let h = set.containers["h"].health_check.clone().unwrap();
    assert_eq!(
        h,
        HealthCheck {
            probe: Probe::Http { port: 80, path: "/".into() },
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_period: Duration::ZERO
        }
    );
    let t = set.containers["t"].health_check.clone().unwrap();
    assert_eq!(t.probe, Probe::Tcp { port: 8080 });
    assert_eq!(
        (t.interval, t.timeout, t.retries, t.start_period),
        (Duration::from_secs(60), Duration::from_secs(2), 5, Duration::from_secs(30))
    );
    assert_eq!(
        set.containers["e"].health_check.as_ref().unwrap().probe,
        Probe::Exec { command: vec!["test".into(), "-f".into(), "/ready".into()] }
    );
}

#[test]
fn health_check_errors() {
    let cases = [
        ("{port: 80}", "health_check.type"),
        ("{type: grpc}", "health_check.type"),
        ("{type: http}", "health_check.port"),
        ("{type: tcp, port: 70000}", "health_check.port"),
        ("{type: tcp, port: 80, path: /x}", "health_check.path"),
        ("{type: exec}", "health_check.command"),
        ("{type: exec, command: ''}", "health_check.command"),
        ("{type: exec, command: [true], port: 1}", "health_check.port"),
        ("{type: tcp, port: 80, retries: 0}", "health_check.retries"),
        ("{type: tcp, port: 80, interval: soon}", "health_check.interval"),
        ("{type: tcp, port: 80, timeout: 0}", "health_check.timeout"),
        ("{type: tcp, port: 80, every: 1s}", "health_check.every"),
        ("http", "health_check"),
    ];
    for (check, field) in cases {
        let e = only_error(&format!("containers:\n  web: {{image: x, health_check: {check}}}\n"));
        assert_eq!(e.field.as_deref(), Some(field), "{check}: {e}");
        assert_eq!(e.container.as_deref(), Some("web"));
    }
}

#[test]
fn each_kind_of_field_error_is_located() {
    let cases = [
        ("{image: x, ensure: gone}", "ensure"),
        ("{image: 'Bad/Image'}", "image"),
        ("{image: 'x:v1'}", "image"),
        ("{ensure: present}", "image"),
        ("{image: x, image_tag: 'v 1'}", "image_tag"),
        ("{image: x, command: 'unterminated \"'}", "command"),
        ("{image: x, entrypoint: {a: 1}}", "entrypoint"),
        ("{image: x, network: ''}", "network"),
        ("{image: x, syslog: yes}", "syslog"),
        ("{image: x, kv_update: 1}", "kv_update"),
        ("{image: x, kv_interval: 0}", "kv_interval"),
        ("{image: x, restart_governor: 'a.b'}", "restart_governor"),
        ("{image: x, update_governor: [a]}", "update_governor"),
        ("{image: x, restart_files: [relative/file]}", "restart_files[0]"),
        ("{image: x, restart_files: /abs}", "restart_files"),
        ("{image: x, ports: ['80', '99999:80']}", "ports[1]"),
        ("{image: x, volumes: ['/a:/b:rx']}", "volumes[0]"),
        ("{image: x, environment: 'A=1'}", "environment"),
        ("{image: x, colour: red}", "colour"),
    ];
    for (definition, field) in cases {
        let e = only_error(&format!("containers:\n  web: {definition}\n"));
        assert_eq!(e.field.as_deref(), Some(field), "{definition}: {e}");
        assert_eq!(e.container.as_deref(), Some("web"), "{definition}");
        assert!(e.file.as_ref().is_some_and(|f| f.ends_with("containers.yaml")), "{definition}: {e}");
    }
    let e = only_error("containers:\n  -bad: {image: x}\n");
    assert_eq!(e.field.as_deref(), Some("name"));
}

#[test]
fn absent_containers_need_no_image() {
    let (_dir, set) = load_one("containers:\n  old: {ensure: absent}\n");
    assert_eq!(set.unwrap().containers["old"].ensure, Ensure::Absent);
}

#[test]
fn all_errors_are_collected_with_the_file_to_blame() {
    let dir = TempDir::new().unwrap();
    let first = write(dir.path(), "1.yaml", "containers:\n  web: {image: x, ports: ['bad']}\n  db: {image: x}\n");
    let second = write(dir.path(), "2.yaml", "containers:\n  web: {volumes: ['rel:x']}\n  db: {colour: red, kv_interval: -1}\n");
    let errors = load_containers(&[first.clone(), second.clone()], &facts()).unwrap_err().0;
    let located: Vec<_> =
        errors.iter().map(|e| (e.file.clone().unwrap(), e.container.clone().unwrap(), e.field.clone().unwrap())).collect();
    for expected in [
        (first.clone(), "web".to_string(), "ports[0]".to_string()),
        (second.clone(), "web".into(), "volumes[0]".into()),
        (second.clone(), "db".into(), "colour".into()),
        (second.clone(), "db".into(), "kv_interval".into()),
    ] {
        assert!(located.contains(&expected), "{expected:?} missing from {located:?}");
    }
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn the_message_the_end_to_end_suite_expects() {
    let (_dir, result) = load_one("hoist::containers:\n  web: {image: x, ports: ['notaport'], colour: red}\n");
    let text = result.unwrap_err().to_string();
    for part in ["containers.yaml", "container web", "ports[0]", "colour"] {
        assert!(text.contains(part), "{part} missing from {text}");
    }
    assert!(text.contains("did you mean") || text.contains("accepted fields"), "{text}");
}

#[test]
fn top_level_and_file_errors() {
    let e = only_error("hoist::containerz: {}\n");
    assert_eq!(e.field.as_deref(), Some("hoist::containerz"));
    let e = only_error("containerz: {}\n");
    assert_eq!(e.field.as_deref(), Some("containerz"));
    let e = only_error("purge: maybe\n");
    assert_eq!(e.field.as_deref(), Some("purge"));
    let e = only_error("- a\n- b\n");
    assert!(e.message.contains("mapping"), "{e}");
    let e = only_error("containers:\n  web: [x]\n");
    assert_eq!(e.container.as_deref(), Some("web"));
    let e = only_error("containers:\n  web: {image: x\n");
    assert!(e.to_string().contains("containers.yaml") && e.message.contains("line"), "{e}");
    let e = only_error(&format!("containers:\n  web: {{image: x, command: '{}'}}\n", "a".repeat(70 * 1024)));
    assert!(e.message.contains("64 KiB"), "{e}");
}

#[test]
fn oversized_files_are_refused() {
    let dir = TempDir::new().unwrap();
    let big = write(dir.path(), "big.yaml", &format!("# {}\n", "x".repeat(4 * 1024 * 1024)));
    let e = load_containers(&[big], &facts()).unwrap_err();
    assert!(e.to_string().contains("big.yaml") && e.to_string().contains("4 MiB"), "{e}");
}

#[test]
fn agent_defaults() {
    let cfg = AgentConfig::defaults();
    assert_eq!(cfg.path, None);
    assert!(!cfg.node.is_empty());
    assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/hoist"));
    assert_eq!(cfg.data, [PathBuf::from("/etc/hoist/containers.d")]);
    assert_eq!(
        cfg.docker,
        DockerConfig {
            host: None,
            name_prefix: "hoist_".into(),
            stop_grace: Duration::from_secs(10),
            purge_grace: Duration::from_secs(60),
            syslog_address: None,
        }
    );
    assert_eq!(cfg.backend, BackendKind::Embedded);
    assert_eq!(cfg.nats.collective, "mcollective");
    assert_eq!(cfg.facts, json!({}));
    assert_eq!(cfg.registration.interval, Duration::from_secs(15));
    assert_eq!(cfg.control.socket, PathBuf::from("/var/lib/hoist/hoist.sock"));
    assert_eq!(cfg.metrics.listen, None);
    assert_eq!(cfg.nats.replicas, None, "as many as the cluster has, decided once connected");
    assert_eq!(cfg.fleet.node_retention, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(
        cfg.rollout,
        RolloutConfig {
            healthy_deadline: Duration::from_secs(300),
            min_healthy_time: Duration::from_secs(10),
            unverified_wait: Duration::from_secs(10),
            governor_timeout: Duration::from_secs(300),
            restart_backoff: crate::backoff::BackoffConfig::default(),
        }
    );
}

#[test]
fn agent_file_defaults_are_relative_to_the_file() {
    let dir = TempDir::new().unwrap();
    let file = write(dir.path(), "hoist.yaml", "");
    let cfg = AgentConfig::load(&file).unwrap();
    assert_eq!(cfg.path.as_deref(), Some(file.as_path()));
    let sections = write(dir.path(), "hoist.yaml", "docker:\nnats:\n  servers:\nrollout: ~\n");
    assert_eq!(AgentConfig::load(&sections).unwrap().docker.name_prefix, "hoist_", "empty sections are defaults");
    assert_eq!(cfg.data, [dir.path().join("containers.d")]);
    assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/hoist"));
}

#[test]
fn agent_file_every_key() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "n.creds", "");
    let ca = write(dir.path(), "ca.pem", "");
    let file = write(
        dir.path(),
        "hoist.yaml",
        &format!(
            "node: n1\nstate_dir: state\ndata: [d1, /abs/d2]\ndocker: {{host: 'unix:///run/docker.sock', name_prefix: x_, stop_grace: 3, purge_grace: 5m, syslog_address: 'udp://10.0.0.9:514'}}\nbackend: nats\nnats:\n  servers: ['nats://a:4222']\n  creds: n.creds\n  tls: {{ca: {}}}\n  collective: c\n  replicas: 2\nfleet: {{node_retention: 2d}}\nfacts: {{dc: ams, networking: {{zone: a}}}}\nregistration: {{interval: 1m}}\ncontrol: {{socket: ctl.sock}}\nmetrics: {{listen: '127.0.0.1:9464'}}\nrollout: {{healthy_deadline: 1m, unverified_wait: 5s, governor_timeout: 30}}\n",
            ca.display()
        ),
    );
    let cfg = AgentConfig::load(&file).unwrap();
    let base = dir.path();
    assert_eq!(cfg.node, "n1");
    assert_eq!(cfg.state_dir, base.join("state"));
    assert_eq!(cfg.data, [base.join("d1"), PathBuf::from("/abs/d2")]);
    assert_eq!(cfg.docker.stop_grace, Duration::from_secs(3));
    assert_eq!(cfg.docker.purge_grace, Duration::from_secs(300));
    assert_eq!(cfg.docker.name_prefix, "x_");
    assert_eq!(cfg.docker.syslog_address.as_deref(), Some("udp://10.0.0.9:514"));
    assert_eq!(cfg.backend, BackendKind::Nats);
    assert_eq!(cfg.nats.creds, Some(base.join("n.creds")));
    assert_eq!(cfg.nats.tls.as_ref().unwrap().ca, Some(ca));
    assert_eq!(cfg.nats.collective, "c");
    assert_eq!(cfg.nats.replicas, Some(2));
    assert_eq!(cfg.fleet.node_retention, Duration::from_secs(2 * 24 * 3600));
    assert_eq!(cfg.registration.interval, Duration::from_secs(60));
    assert_eq!(cfg.control.socket, base.join("ctl.sock"));
    assert_eq!(cfg.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(cfg.rollout.governor_timeout, Duration::from_secs(30));

    let facts = cfg.facts();
    assert_eq!(facts["dc"], "ams");
    assert_eq!(facts["networking"]["zone"], "a");
    assert!(facts["networking"]["ip"].as_str().is_some_and(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok()), "{facts}");
    assert!(facts["hostname"].as_str().is_some_and(|h| !h.is_empty()));
}

#[test]
fn user_facts_win_over_built_in_ones() {
    let mut cfg = AgentConfig::defaults();
    cfg.facts = json!({"networking": {"ip": "192.168.9.9"}});
    assert_eq!(cfg.facts()["networking"]["ip"], "192.168.9.9");
}

#[test]
fn agent_file_errors() {
    let dir = TempDir::new().unwrap();
    let load = |text: &str| {
        let file = write(dir.path(), "hoist.yaml", text);
        let errors = AgentConfig::load(&file).unwrap_err();
        assert!(errors.to_string().contains("hoist.yaml"), "{errors}");
        errors.0.into_iter().next().unwrap()
    };
    assert_eq!(load("docker:\n  nmae_prefix: x\n").field.as_deref(), Some("docker.nmae_prefix"));
    assert_eq!(load("nodee: x\n").field.as_deref(), Some("nodee"));
    assert_eq!(load("backend: nats\n").field.as_deref(), Some("nats.servers"));
    let e = load("registration: {interval: soon}\n");
    assert_eq!(e.field.as_deref(), Some("registration.interval"));
    assert!(e.message.starts_with("expected a duration") && e.message.contains("line 1"), "{e}");
    assert_eq!(load("rollout:\n  governor_timeout: -5\n").field.as_deref(), Some("rollout.governor_timeout"));
    assert_eq!(load("backend: kafka\n").field.as_deref(), Some("backend"));
    assert_eq!(load("metrics: {listen: nowhere}\n").field.as_deref(), Some("metrics.listen"));
    assert_eq!(load("facts: [a]\n").field.as_deref(), Some("facts"));
    let e = load("docker: {syslog_address: '10.0.0.9:514'}\n");
    assert_eq!(e.field.as_deref(), Some("docker.syslog_address"));
    assert!(e.message.contains("udp://"), "{e}");
    assert!(load("node: [\n").message.contains("line"));
    let e = load("nats: {servers: ['nats://a:4222'], replicas: 7}\n");
    assert_eq!(e.field.as_deref(), Some("nats.replicas"));
    assert!(e.message.contains("1 to 5"), "{e}");
    let e = load("fleet: {node_retention: 10s}\n");
    assert_eq!(e.field.as_deref(), Some("fleet.node_retention"));
    assert!(e.message.contains("use days"), "{e}");
    let missing = AgentConfig::load(&dir.path().join("nope.yaml")).unwrap_err();
    assert!(missing.to_string().contains("nope.yaml"), "{missing}");
}

#[test]
fn the_shipped_examples_load() {
    let agent_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hoist.yaml");
    if !agent_file.exists() {
        return;
    }
    let cfg = AgentConfig::load(&agent_file).unwrap();
    let set = load_containers(&cfg.data, &cfg.facts()).unwrap();
    assert!(set.containers.contains_key("web"), "{set:?}");
}

/// The checks that keep settings inside what Docker, NATS and the probes can take, the last good set,
/// and values meant as text.
mod inputs;
