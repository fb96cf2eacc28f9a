//! The Puppet module (`puppet/hoist`) with Debian's puppet: `include hoist` on a node whose Hiera data
//! is the original module's (`hoist::containers` split over common.yaml and the node's level,
//! `hoist::purge`) writes an agent file and container data the installed agent runs as declared, and
//! a second run changes nothing. Installs the Debian package (root; one package test at a time).

mod support;

use hoist_core::fsm::State;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::package::*;
use support::{docker_ok, free_port, http_get, image, wait_until};

/// `puppet apply -e 'include hoist'` with the repository's module, Debian's stdlib and this Hiera
/// config, in a confdir/vardir of its own; returns the exit code (`--detailed-exitcodes`: 0 nothing
/// changed, 2 changes applied, 4/6 failures) and the output.
fn puppet_apply(dir: &Path, certname: &str) -> (i32, String) {
    let modulepath = format!("{}:/usr/share/puppet/modules", workspace().join("puppet").display());
    let mut cmd = Command::new("puppet");
    cmd.args(["apply", "--color=false", "--detailed-exitcodes", "--certname", certname, "--modulepath", &modulepath, "--hiera_config"])
        .arg(dir.join("hiera.yaml"));
    for (flag, sub) in [("--confdir", "conf"), ("--vardir", "var"), ("--codedir", "code"), ("--logdir", "log"), ("--rundir", "run")] {
        cmd.arg(flag).arg(dir.join(sub));
    }
    let out =
        cmd.args(["-e", "include hoist"]).env("FACTER_region", "eu-west").output().expect("puppet must be installed (scripts/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn include_hoist_with_the_original_hiera_data_runs_the_declared_container() {
    let _lock = PackageLock::take();
    let work = tempfile::tempdir().unwrap();
    let _installed = Installed::install(&build_deb(work.path()));

    let node = format!("pup{}", std::process::id());
    let port = free_port();
    let hiera = work.path().join("hiera");
    std::fs::create_dir_all(hiera.join("nodes")).unwrap();
    std::fs::write(
        work.path().join("hiera.yaml"),
        format!(
            "---\nversion: 5\ndefaults:\n  datadir: {}\n  data_hash: yaml_data\nhierarchy:\n  - name: node\n    path: \"nodes/%{{trusted.certname}}.yaml\"\n  - name: common\n    path: common.yaml\n",
            hiera.display()
        ),
    )
    .unwrap();
    // The Hiera data of the original module, as a fleet has it: the container in common.yaml...
    std::fs::write(
        hiera.join("common.yaml"),
        format!(
            "hoist::purge: true\nhoist::containers:\n  weather:\n    image: {image}\n    image_tag: v1\n    environment:\n      - \"REGION=%{{facts.region}}\"\n    health_check:\n      type: http\n      port: 80\n      path: /\n      interval: 1s\n",
            image = image()
        ),
    )
    .unwrap();
    // ...and this node's level changing its tag and publishing its port, plus the class's own settings
    // (no service to manage where systemd is not PID 1: the test starts the agent itself).
    std::fs::write(
        hiera.join(format!("nodes/{node}.yaml")),
        format!(
            "hoist::containers:\n  weather:\n    image_tag: v2\n    ports: ['127.0.0.1:{port}:80']\nhoist::manage_service: false\nhoist::node: {node}\nhoist::agent_facts:\n  role: weather\nhoist::settings:\n  docker:\n    name_prefix: {node}_\n    stop_grace: 2s\n"
        ),
    )
    .unwrap();

    let (code, output) = puppet_apply(work.path(), &node);
    assert_eq!(code, 2, "the first run applies changes and fails nothing:\n{output}");
    assert!(!output.contains("Package[hoist]"), "the installed package is left as it is:\n{output}");

    // What Puppet wrote is what the installed hoist accepts: the node's tag and port over common's image.
    let agent_file = std::fs::read_to_string(AGENT_FILE).unwrap();
    assert!(agent_file.starts_with("# Managed by Puppet"), "{agent_file}");
    for line in [format!("node: {node}"), "backend: embedded".into(), format!("  name_prefix: {node}_"), "  role: weather".into()] {
        assert!(agent_file.lines().any(|l| l == line), "{line:?} missing from the agent file:\n{agent_file}");
    }
    let validated = run_ok(BIN, &["validate"]);
    let run_line = validated.lines().find(|l| l.starts_with("docker run")).unwrap_or_else(|| panic!("hoist validate: {validated}"));
    for part in
        [format!("--name {node}_weather"), format!("-p 127.0.0.1:{port}:80/tcp"), "-e REGION=eu-west".into(), format!("{}:v2", image())]
    {
        assert!(run_line.contains(&part), "{part} missing from what would run: {run_line}");
    }
    assert!(validated.contains("# purge: on"), "{validated}");

    let (code, output) = puppet_apply(work.path(), &node);
    assert_eq!(code, 0, "a second run changes nothing:\n{output}");

    // The installed agent, started as the unit starts it, runs the container as declared.
    let docker_name = format!("{node}_weather");
    let _container = ContainerGuard(docker_name.clone());
    let mut agent = InstalledAgent::start(&work.path().join("agent.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let weather = loop {
        let m = agent.status().machines.into_iter().find(|m| m.container == "weather");
        if let Some(m) = m.as_ref().filter(|m| m.state == State::Run && m.container_id.is_some()) {
            break m.clone();
        }
        assert!(std::time::Instant::now() < deadline, "weather not in RUN after 90 s: {m:#?}\n--- agent log ---\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(weather.version, "v2", "the node's level wins over common.yaml");
    assert_eq!(wait_until("weather to serve", Duration::from_secs(10), || http_get(port)), "v2");
    assert!(docker_ok(&["exec", &docker_name, "env"]).lines().any(|l| l == "REGION=eu-west"), "Hiera interpolated the fact");
    assert!(agent.stop(), "the agent exits cleanly on SIGTERM:\n{}", agent.log());
    docker_ok(&["rm", "-f", &docker_name]);
    std::fs::remove_file(Path::new(DATA_DIR).join("puppet.yaml")).unwrap();
}
