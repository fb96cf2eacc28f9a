//! The Debian package for tests that install it: build it with `scripts/build-deb.sh` from the binary
//! under test, install it with dpkg, run the installed agent the way its unit does. Installing is
//! machine-global (the dpkg database, /etc/hoist, /var/lib/hoist, the unit), so these tests hold
//! `PackageLock` (and nextest runs them in the one-at-a-time test group `package`).

use super::wait_until;
use hoist_core::status::NodeStatus;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const AGENT_FILE: &str = "/etc/hoist/hoist.yaml";
pub const DATA_DIR: &str = "/etc/hoist/containers.d";
pub const STATE_DIR: &str = "/var/lib/hoist";
pub const UNIT: &str = "/lib/systemd/system/hoist.service";
pub const BIN: &str = "/usr/bin/hoist";

/// The workspace root (scripts/, packaging/).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} could not be run: {e}"))
}

/// Runs the command and returns its stdout, failing with its output if it fails.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg's abbreviated status of the hoist package (`ii `, `rc `), or None when dpkg knows nothing of it.
pub fn package_status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${db:Status-Abbrev}", "hoist"]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()).filter(|s| !s.starts_with("un"))
}

/// One package test at a time on this machine, whatever runs them (nextest's test group covers
/// nextest; this covers `cargo test` and two checkouts on one machine).
pub struct PackageLock(#[allow(dead_code)] std::fs::File);

impl PackageLock {
    pub fn take() -> PackageLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/hoist-package-tests.lock")
            .expect("open the package test lock");
        file.lock().expect("lock the package test lock");
        assert!(
            package_status().is_none(),
            "the hoist package is installed on this machine ({:?}); these tests install and purge it, so purge it first (dpkg -P hoist)",
            package_status()
        );
        for dir in ["/etc/hoist", STATE_DIR] {
            assert!(
                !Path::new(dir).exists(),
                "{dir} exists without the package; these tests install, check and remove it, so move it away first"
            );
        }
        PackageLock(file)
    }
}

/// Builds the package from the binary under test into `dir`, as an operator would with the script.
pub fn build_deb(dir: &Path) -> PathBuf {
    let out = Command::new(workspace().join("scripts/build-deb.sh"))
        .env("HOIST_BIN", env!("CARGO_BIN_EXE_hoist"))
        .env("HOIST_DEB_DIR", dir)
        .output()
        .expect("run scripts/build-deb.sh");
    assert!(out.status.success(), "scripts/build-deb.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let deb = PathBuf::from(printed.lines().last().expect("the script prints the .deb's path").trim());
    let arch = run_ok("dpkg", &["--print-architecture"]);
    let expected = format!("hoist_{}-1_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim());
    assert_eq!(deb.file_name().unwrap().to_string_lossy(), expected);
    assert!(deb.is_file(), "{} was not written", deb.display());
    deb
}

/// The package installed; purged when dropped (a failed test leaves nothing installed).
pub struct Installed;

impl Installed {
    pub fn install(deb: &Path) -> Installed {
        run_ok("dpkg", &["-i", deb.to_str().unwrap()]);
        assert_eq!(package_status().as_deref(), Some("ii "), "dpkg -i left the package not installed");
        Installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if package_status().is_some() {
            let _ = run("dpkg", &["-P", "hoist"]);
        }
        // Neither existed before (`PackageLock::take`): what is left is what the test wrote there.
        for dir in ["/etc/hoist", STATE_DIR] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The unit's `Key=value` settings, in order (a key may repeat).
pub fn unit_settings() -> Vec<(String, String)> {
    std::fs::read_to_string(UNIT)
        .expect("the unit is installed")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

pub fn unit_setting(key: &str) -> String {
    unit_settings().into_iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("the unit has no {key}=")).1
}

/// The installed agent started by the unit's own ExecStart line, logging to `log`.
pub struct InstalledAgent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl InstalledAgent {
    pub fn start(log: &Path) -> InstalledAgent {
        let exec_start = unit_setting("ExecStart");
        let mut words = exec_start.split_whitespace();
        let program = words.next().unwrap();
        assert_eq!(program, BIN, "the unit starts the packaged binary");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(program)
            .args(words)
            .env_remove("HOIST_CONFIG")
            .env_remove("HOIST_SOCKET")
            .env("HOIST_LOG", "debug,bollard=info,hyper=info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the installed agent");
        let mut agent = InstalledAgent { child: Some(child), log: log.to_path_buf() };
        let socket = Path::new(STATE_DIR).join("hoist.sock");
        wait_until("the installed agent's control socket", Duration::from_secs(30), || {
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the installed agent exited with {status}:\n{}", agent.log());
            }
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to the agent alone, as systemd stops it (KillMode=mixed); returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let mut child = self.child.take().expect("agent running");
        run_ok("kill", &["-TERM", &child.id().to_string()]);
        child.wait().unwrap().success()
    }

    /// `hoist status --json` with the installed binary and its default agent file.
    pub fn status(&self) -> NodeStatus {
        let out = Command::new(BIN).args(["status", "--json"]).env_remove("HOIST_CONFIG").env_remove("HOIST_SOCKET").output().unwrap();
        assert!(out.status.success(), "hoist status failed: {}\n--- agent log ---\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

impl Drop for InstalledAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Removes a container by name when dropped, whatever the test did.
pub struct ContainerGuard(pub String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = run("docker", &["rm", "-f", &self.0]);
    }
}
