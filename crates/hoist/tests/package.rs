//! The Debian package as an operator meets it: `scripts/build-deb.sh` builds it (from the binary under
//! test), `dpkg -i` puts every file where it belongs, `systemd-analyze verify` accepts the installed
//! unit, the installed binary run as the unit's ExecStart runs a container from the installed default
//! agent file, stopping it leaves the container running, `dpkg -r` keeps the configuration and `dpkg -P`
//! leaves nothing behind. Root only (dpkg); one package test at a time (`support::package`).
//! The last test installs the package in a container booting systemd, where the unit really runs:
//! sandboxed, reloaded, restarted by an upgrade, stopped and purged, never stopping a container.

mod support;

use hoist_core::fsm::State;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use support::package::*;
use support::{docker_ok, free_port, http_get, image, wait_until};

const PACKAGED: &[&str] = &[
    BIN,
    UNIT,
    AGENT_FILE,
    "/usr/share/bash-completion/completions/hoist",
    "/usr/share/zsh/vendor-completions/_hoist",
    "/usr/share/fish/vendor_completions.d/hoist.fish",
    "/usr/share/man/man1/hoist.1.gz",
    "/usr/share/man/man1/hoist-agent.1.gz",
    "/usr/share/man/man1/hoist-kv-put.1.gz",
    "/usr/share/doc/hoist/copyright",
    "/usr/share/doc/hoist/changelog.Debian.gz",
];

#[test]
fn the_debian_package_installs_runs_the_agent_and_removes_cleanly() {
    let _lock = PackageLock::take();
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path());
    let deb_str = deb.to_str().unwrap();
    assert_eq!(run_ok("dpkg-deb", &["-f", deb_str, "Package"]).trim(), "hoist");
    assert!(run_ok("dpkg-deb", &["-f", deb_str, "Depends"]).contains("libc6"), "the shared-library dependencies are declared");

    let installed = Installed::install(&deb);

    // Every file in place, as dpkg recorded it, unmodified.
    let listed = run_ok("dpkg", &["-L", "hoist"]);
    for file in PACKAGED {
        assert!(Path::new(file).is_file(), "{file} was not installed");
        assert!(listed.lines().any(|l| l == *file), "dpkg -L does not list {file}");
    }
    assert_eq!(run_ok("dpkg", &["--verify", "hoist"]), "", "dpkg --verify: the files match the package's md5sums");
    assert_eq!(run_ok(BIN, &["--version"]).trim(), format!("hoist {}", env!("CARGO_PKG_VERSION")));
    let conffiles = run_ok("dpkg-query", &["-W", "-f=${Conffiles}", "hoist"]);
    assert!(conffiles.lines().any(|l| l.trim().starts_with(&format!("{AGENT_FILE} "))), "{AGENT_FILE} is a conffile: {conffiles}");
    assert_eq!(std::fs::read_dir(DATA_DIR).expect("the data directory is installed").count(), 0, "{DATA_DIR} ships empty");
    let state_mode = std::fs::metadata(STATE_DIR).expect("postinst creates the state_dir").permissions().mode() & 0o777;
    assert_eq!(state_mode, 0o750, "{STATE_DIR} is not world-readable");
    assert!(
        Path::new("/var/lib/systemd/deb-systemd-helper-enabled/hoist.service.dsh-also").exists(),
        "postinst records the unit with deb-systemd-helper"
    );
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/hoist.service").exists(),
        "a first install does not enable the service before it is configured"
    );

    // The default agent file is one the installed binary accepts, with the paths the unit allows.
    let validated = run_ok(BIN, &["validate"]);
    assert!(validated.contains("# purge:"), "hoist validate on the default file: {validated}");
    let default_file = std::fs::read_to_string(AGENT_FILE).unwrap();
    for setting in ["backend: embedded", &format!("state_dir: {STATE_DIR}"), &format!("data: [{DATA_DIR}]")] {
        assert!(default_file.lines().any(|l| l.starts_with(setting)), "the default agent file sets {setting}:\n{default_file}");
    }

    // Completions load in the shells that read them; the man pages are found by name and render.
    let bash = run_ok("bash", &["-c", "source /usr/share/bash-completion/completions/hoist && complete -p hoist"]);
    assert!(bash.contains("_hoist") && bash.trim_end().ends_with(" hoist"), "bash registers a completion for hoist: {bash}");
    assert!(std::fs::read_to_string("/usr/share/zsh/vendor-completions/_hoist").unwrap().starts_with("#compdef hoist"));
    assert!(std::fs::read_to_string("/usr/share/fish/vendor_completions.d/hoist.fish").unwrap().contains("complete -c hoist"));
    assert_eq!(run_ok("man", &["-w", "hoist"]).trim(), "/usr/share/man/man1/hoist.1.gz", "man finds hoist(1)");
    let page = std::process::Command::new("man")
        .args(["-l", "/usr/share/man/man1/hoist.1.gz"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    assert!(page.status.success(), "man -l hoist.1.gz: {}", String::from_utf8_lossy(&page.stderr));
    let page = String::from_utf8_lossy(&page.stdout);
    for part in ["NAME", "SYNOPSIS", "--config", "/etc/hoist/hoist.yaml", "hoist-status(1)", "hoist-transition(1)"] {
        assert!(page.contains(part), "{part} missing from hoist(1):\n{page}");
    }
    let changelog = run_ok("zcat", &["/usr/share/doc/hoist/changelog.Debian.gz"]);
    assert!(changelog.starts_with(&format!("hoist ({}-1) ", env!("CARGO_PKG_VERSION"))), "{changelog}");

    // The unit: what systemd itself says of it, and the settings the README promises.
    let verify = run("systemd-analyze", &["verify", UNIT]);
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned() + &String::from_utf8_lossy(&verify.stdout);
    let ours: Vec<&str> = complaints.lines().filter(|l| l.contains("hoist")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify complains about hoist.service:\n{complaints}");
    assert!(verify.status.success() || !complaints.trim().is_empty(), "systemd-analyze verify failed without saying why");
    for (key, value) in [
        ("ExecStart", "/usr/bin/hoist agent --config /etc/hoist/hoist.yaml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("KillMode", "mixed"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(unit_setting(key), value, "{key}= in the unit");
    }
    assert!(unit_setting("ReadWritePaths").split_whitespace().any(|p| p == STATE_DIR), "the state_dir is writable");
    for dep in ["After", "Wants"] {
        let units = unit_setting(dep);
        assert!(units.contains("docker.service") && units.contains("network-online.target"), "{dep}={units}");
    }

    // The installed agent, started as the unit starts it, runs a container declared the way an
    // operator declares one: a file in the data directory.
    let container = format!("pkgweb{}", std::process::id());
    let port = free_port();
    let data_file = Path::new(DATA_DIR).join(format!("{container}.yaml"));
    std::fs::write(
        &data_file,
        format!(
            "hoist::containers:\n  {container}:\n    image: {image}\n    image_tag: v1\n    ports: ['127.0.0.1:{port}:80']\n    health_check: {{ type: http, port: 80, path: /, interval: 1s }}\n",
            image = image()
        ),
    )
    .unwrap();
    let docker_name = format!("hoist_{container}");
    let _container_guard = ContainerGuard(docker_name.clone());
    let mut agent = InstalledAgent::start(&work.path().join("agent.log"));
    let running = wait_running(&agent, &container);
    assert_eq!(wait_until("the container to serve", Duration::from_secs(10), || http_get(port)), "v1");
    assert_eq!(docker_ok(&["inspect", "-f", "{{.Name}}", &docker_name]), format!("/{docker_name}"));
    assert!(Path::new(STATE_DIR).join("hoist.redb").is_file(), "the agent keeps its embedded store in the state_dir");

    // ExecReload: SIGHUP reloads the data and leaves the agent running.
    let reload = unit_setting("ExecReload").replace("$MAINPID", &agent.pid().to_string());
    let mut words = reload.split_whitespace();
    run_ok(words.next().unwrap(), &words.collect::<Vec<_>>());
    wait_until("the SIGHUP reload in the log", Duration::from_secs(10), || agent.log().contains("SIGHUP").then_some(()));
    assert!(agent.running(), "SIGHUP does not end the agent:\n{}", agent.log());

    // Stopping the service stops the agent, never the container; the next start adopts it.
    assert!(agent.stop(), "the agent exits cleanly on SIGTERM:\n{}", agent.log());
    assert_eq!(docker_ok(&["inspect", "-f", "{{.State.Running}}", &docker_name]), "true", "the container outlives the agent");
    assert_eq!(http_get(port).as_deref(), Some("v1"));
    let mut agent = InstalledAgent::start(&work.path().join("agent.log"));
    let adopted = wait_running(&agent, &container);
    assert_eq!(adopted.container_id, running.container_id, "the restarted agent adopts the running container");

    // An operator's stop, through the installed CLI and its default agent file.
    run_ok(BIN, &["transition", &container, "stop"]);
    wait_until("the container stopped", Duration::from_secs(30), || {
        let m = agent.status().machines.into_iter().find(|m| m.container == container)?;
        (m.state == State::Maintenance && docker_ok(&["inspect", "-f", "{{.State.Running}}", &docker_name]) == "false").then_some(())
    });
    assert!(agent.stop(), "the agent exits cleanly on SIGTERM:\n{}", agent.log());
    std::fs::remove_file(&data_file).unwrap();
    docker_ok(&["rm", "-f", &docker_name]);

    // An operator's change to the agent file survives a reinstall (an upgrade's path through postinst).
    let edited = format!("{default_file}# edited by the operator\n");
    std::fs::write(AGENT_FILE, &edited).unwrap();
    run_ok("dpkg", &["-i", deb_str]);
    assert_eq!(std::fs::read_to_string(AGENT_FILE).unwrap(), edited, "a changed conffile is kept on upgrade");

    // Remove: the program goes, the configuration and the state stay, the unit is masked.
    run_ok("dpkg", &["-r", "hoist"]);
    assert_eq!(package_status().as_deref(), Some("rc "), "removed, configuration files kept");
    for file in PACKAGED.iter().filter(|f| **f != AGENT_FILE) {
        assert!(!Path::new(file).exists(), "{file} is left after dpkg -r");
    }
    assert_eq!(std::fs::read_to_string(AGENT_FILE).unwrap(), edited, "dpkg -r keeps the conffile");
    assert!(Path::new(STATE_DIR).join("hoist.redb").is_file(), "dpkg -r keeps the agent's state");
    assert_eq!(
        std::fs::read_link("/etc/systemd/system/hoist.service").ok().as_deref(),
        Some(Path::new("/dev/null")),
        "postrm masks the unit while its configuration remains"
    );

    // Purge: nothing of hoist is left.
    run_ok("dpkg", &["-P", "hoist"]);
    assert_eq!(package_status(), None, "dpkg has forgotten the package");
    for gone in
        ["/etc/hoist", STATE_DIR, "/etc/systemd/system/hoist.service", "/var/lib/systemd/deb-systemd-helper-enabled/hoist.service.dsh-also"]
    {
        assert!(std::fs::symlink_metadata(gone).is_err(), "{gone} is left after dpkg -P");
    }
    drop(installed);
}

fn wait_running(agent: &InstalledAgent, container: &str) -> hoist_core::status::MachineStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let status = agent.status();
        let m = status.machines.into_iter().find(|m| m.container == container);
        if let Some(m) = m.as_ref().filter(|m| m.state == State::Run && m.container_id.is_some()) {
            return m.clone();
        }
        assert!(std::time::Instant::now() < deadline, "{container} not in RUN after 90 s: {m:#?}\n--- agent log ---\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The image `scripts/test-fixtures.sh` builds: Debian 12, minimal, booting systemd as PID 1.
const SYSTEMD_IMAGE: &str = "hoist/systemd-test:bookworm";

/// A Debian 12 with systemd as PID 1 in a container, sharing this machine's network and Docker socket,
/// for what no test machine has: the unit run by a real systemd with its sandboxing in force. It needs
/// CAP_SYS_ADMIN for the unit's mount namespace (ProtectSystem and friends), nothing else.
struct SystemdHost {
    name: String,
}

impl SystemdHost {
    fn boot(debs: &Path) -> SystemdHost {
        let name = format!("hoist-systemd-{}", std::process::id());
        let _ = run("docker", &["rm", "-f", &name]);
        let mount = format!("{}:/debs:ro", debs.display());
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--cap-add",
            "SYS_ADMIN",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            &mount,
            SYSTEMD_IMAGE,
        ]);
        let host = SystemdHost { name };
        wait_until("systemd to finish booting", Duration::from_secs(60), || {
            let state = host.sh("systemctl is-system-running 2>/dev/null || true");
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        host
    }

    /// Runs a shell command inside; returns its output, whatever its exit status.
    fn sh(&self, script: &str) -> String {
        let out = run("docker", &["exec", &self.name, "sh", "-c", script]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Runs a shell command inside, failing with its output and the unit's journal if it fails.
    fn sh_ok(&self, script: &str) -> String {
        let out = run("docker", &["exec", &self.name, "sh", "-c", script]);
        assert!(
            out.status.success(),
            "{script:?} failed: {}{}\n--- journal of hoist.service ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.sh("journalctl -u hoist --no-pager | tail -40")
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn main_pid(&self) -> String {
        self.sh_ok("systemctl show -p MainPID --value hoist")
    }

    fn status(&self) -> hoist_core::status::NodeStatus {
        serde_json::from_str(&self.sh_ok("hoist status --json")).expect("status JSON")
    }

    fn wait_running(&self, container: &str) -> hoist_core::status::MachineStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            if self.sh("systemctl is-active hoist").trim() == "active" {
                let m = self.status().machines.into_iter().find(|m| m.container == container);
                if let Some(m) = m.filter(|m| m.state == State::Run && m.container_id.is_some()) {
                    return m;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{container} not in RUN under systemd after 90 s:\n{}",
                self.sh("systemctl status hoist --no-pager; journalctl -u hoist --no-pager | tail -40")
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for SystemdHost {
    fn drop(&mut self) {
        let _ = run("docker", &["rm", "-f", &self.name]);
    }
}

#[test]
fn the_packaged_unit_runs_the_agent_under_systemd_sandboxed_and_never_stops_a_container() {
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path());
    let deb_inside = format!("/debs/{}", deb.file_name().unwrap().to_string_lossy());
    let node = format!("sd{}", std::process::id());
    let container = format!("sdweb{}", std::process::id());
    let port = free_port();
    // Another node name than the machine's (the network, and so the hostname, is shared), so this
    // agent's purge can only see its own container.
    std::fs::write(work.path().join("node.yaml"), format!("node: {node}\n")).unwrap();
    std::fs::write(
        work.path().join("web.yaml"),
        format!(
            "hoist::containers:\n  {container}:\n    image: {image}\n    image_tag: v1\n    ports: ['127.0.0.1:{port}:80']\n",
            image = image()
        ),
    )
    .unwrap();
    let _container_guard = ContainerGuard(format!("hoist_{container}"));
    let host = SystemdHost::boot(work.path());

    // A first install leaves the service disabled and stopped, for the operator to configure.
    host.sh_ok(&format!("dpkg -i {deb_inside}"));
    assert_eq!(host.sh("systemctl is-enabled hoist").trim(), "disabled", "a first install does not enable the service");
    assert_eq!(host.sh("systemctl is-active hoist").trim(), "inactive", "a first install does not start the service");

    // The operator's steps from the README.
    host.sh_ok(&format!("cat /debs/node.yaml >> {AGENT_FILE} && cp /debs/web.yaml {DATA_DIR}/ && systemctl enable --now hoist"));
    let first = host.wait_running(&container);
    assert_eq!(wait_until("the container to serve", Duration::from_secs(10), || http_get(port)), "v1");

    // The sandbox is in force on the running agent, and it still reaches Docker and its state_dir.
    let pid = host.main_pid();
    let proc_status = host.sh_ok(&format!("cat /proc/{pid}/status"));
    for line in ["NoNewPrivs:\t1", "Seccomp:\t2"] {
        assert!(proc_status.lines().any(|l| l == line), "{line:?} missing from the agent's /proc status:\n{proc_status}");
    }
    let writes = host.sh(&format!(
        "for d in /etc/hoist /usr/bin /root /var/lib/hoist; do nsenter -t {pid} -m touch $d/.hoist-probe 2>/dev/null && echo \"$d writable\" && rm $d/.hoist-probe || echo \"$d read-only\"; done"
    ));
    for expected in ["/etc/hoist read-only", "/usr/bin read-only", "/root read-only", "/var/lib/hoist writable"] {
        assert!(writes.lines().any(|l| l == expected), "{expected} expected for the agent's view of the file system:\n{writes}");
    }

    // systemctl reload: SIGHUP to the same process, which reloads.
    host.sh_ok("systemctl reload hoist");
    wait_until("the SIGHUP reload in the journal", Duration::from_secs(10), || {
        host.sh("journalctl -u hoist --no-pager").contains("reason=\"SIGHUP\"").then_some(())
    });
    assert_eq!(host.main_pid(), pid, "a reload keeps the agent running");

    // An upgrade (here a reinstall) restarts the running agent, which adopts the container.
    host.sh_ok(&format!("dpkg -i {deb_inside}"));
    let after_upgrade = host.wait_running(&container);
    assert_ne!(host.main_pid(), pid, "postinst restarted the agent");
    assert_eq!(after_upgrade.container_id, first.container_id, "the restarted agent adopts the running container");
    assert_eq!(host.sh("systemctl is-enabled hoist").trim(), "enabled", "an upgrade keeps the service enabled");

    // systemctl stop ends the agent, never the container.
    host.sh_ok("systemctl stop hoist");
    assert_eq!(host.sh("systemctl is-active hoist").trim(), "inactive");
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.State.Running}}", &format!("hoist_{container}")]),
        "true",
        "stopping the service leaves the container running"
    );
    assert_eq!(http_get(port).as_deref(), Some("v1"));

    // Purging a running service stops it first (prerm), then removes the unit and the state.
    host.sh_ok("systemctl start hoist");
    host.wait_running(&container);
    host.sh_ok("dpkg -P hoist");
    assert_eq!(host.sh("systemctl is-active hoist").trim(), "inactive", "prerm stopped the agent");
    assert_eq!(host.sh("test -e /lib/systemd/system/hoist.service || test -e /var/lib/hoist || echo gone").trim(), "gone");
    assert_eq!(
        host.sh("systemctl is-enabled hoist 2>&1; true").trim(),
        "Failed to get unit file state for hoist.service: No such file or directory"
    );
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.State.Running}}", &format!("hoist_{container}")]),
        "true",
        "removing the package leaves the container running"
    );
}
