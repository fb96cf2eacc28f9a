//! A node that cannot be tricked into harm: the agent removes nothing at its socket path but a stale
//! socket of its own, runs once per state_dir, keeps its containers running when its store is damaged
//! or its disk full, bounds what clients of its control socket can hold, and the CLI never passes
//! forged control characters to the terminal. Real agents, real Docker; the disk tests mount tmpfs.

mod support;

use hoist_core::fsm::State;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const NO_CONTAINERS: &str = "containers: {}\n";

/// Runs `hoist agent` on the agent's files and expects it to give up: returns what it said.
fn refused_start(agent: &TestAgent) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(["agent", "--config"])
        .arg(agent.path("hoist.yaml"))
        .env("HOIST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "the agent should have refused to start:\n{stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn only_a_stale_socket_is_removed_from_the_control_socket_path() {
    let agent = TestAgent::prepare("sockpath", NO_CONTAINERS, "", FAST_ROLLOUT);
    let state = agent.path("state");
    let socket = state.join("hoist.sock");
    std::fs::create_dir_all(&state).unwrap();

    // A regular file: the agent once deleted a system file this way.
    std::fs::write(&socket, "precious").unwrap();
    let said = refused_start(&agent);
    assert!(said.contains(&socket.display().to_string()) && said.contains("is a regular file") && said.contains("move it away"), "{said}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    std::fs::remove_file(&socket).unwrap();

    // A link to someone else's file.
    let target = agent.path("target");
    std::fs::write(&target, "theirs").unwrap();
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    assert!(refused_start(&agent).contains("is a symbolic link"));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "theirs");
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_symlink());
    std::fs::remove_file(&socket).unwrap();

    std::fs::create_dir(&socket).unwrap();
    assert!(refused_start(&agent).contains("is a directory"));
    std::fs::remove_dir(&socket).unwrap();

    // A socket someone answers on.
    let live = UnixListener::bind(&socket).unwrap();
    let said = refused_start(&agent);
    assert!(said.contains("already answering") && said.contains(&socket.display().to_string()), "{said}");
    drop(live);

    // Now nobody answers on it: the socket of an agent that died, replaced.
    let mut agent = agent;
    agent.spawn();
    assert_eq!(mode(&socket), 0o660);
    agent.status();
}

#[test]
fn the_agent_creates_only_its_state_dir() {
    let missing = "control: { socket: SOCKET }\n";
    let agent = TestAgent::prepare("sockdir", NO_CONTAINERS, "", FAST_ROLLOUT);
    let socket = agent.path("elsewhere/hoist.sock");
    let yaml = std::fs::read_to_string(agent.path("hoist.yaml")).unwrap() + &missing.replace("SOCKET", &socket.display().to_string());
    std::fs::write(agent.path("hoist.yaml"), yaml).unwrap();
    let said = refused_start(&agent);
    assert!(said.contains(&agent.path("elsewhere").display().to_string()) && said.contains("does not exist"), "{said}");
    assert!(!agent.path("elsewhere").exists(), "the socket's directory is the operator's to create");

    // The state_dir is the agent's own: created, for its owner and group only.
    std::fs::create_dir(agent.path("elsewhere")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .args(["agent", "--config"])
        .arg(agent.path("hoist.yaml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_until("the control socket", Duration::from_secs(30), || UnixStream::connect(&socket).ok());
    assert_eq!(mode(&agent.path("state")), 0o750);
    assert_eq!(mode(&socket), 0o660);
    assert!(child.0.try_wait().unwrap().is_none());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_agent_on_the_same_state_dir_refuses_naming_the_first() {
    let agent = TestAgent::start("twice", NO_CONTAINERS);
    let said = refused_start(&agent);
    assert!(said.contains(&format!("pid {}", agent.pid())) && said.contains(&agent.path("state").display().to_string()), "{said}");
    assert_eq!(std::fs::read_to_string(agent.path("state/agent.lock")).unwrap().trim(), agent.pid().to_string());
    agent.status();
    assert!(UnixStream::connect(agent.path("state/hoist.sock")).is_ok(), "the first agent's socket is untouched");
}

#[test]
fn a_lock_file_that_links_elsewhere_is_not_truncated() {
    let agent = TestAgent::prepare("locklink", NO_CONTAINERS, "", FAST_ROLLOUT);
    std::fs::create_dir_all(agent.path("state")).unwrap();
    let target = agent.path("precious");
    std::fs::write(&target, "keep me").unwrap();
    std::os::unix::fs::symlink(&target, agent.path("state/agent.lock")).unwrap();
    let said = refused_start(&agent);
    assert!(said.contains("agent.lock is not a regular file"), "{said}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
}

fn web(port: u16) -> String {
    format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    ports: ['127.0.0.1:{port}:80']\n", image())
}

fn metrics(agent: &TestAgent) -> String {
    agent.hoist_ok(&["metrics"])
}

const STORE_METRIC: &str = "hoist_node_condition{source=\"store\"} 1";

#[test]
fn a_truncated_store_leaves_the_containers_running_and_says_what_to_do() {
    let port = free_port();
    let mut agent = TestAgent::start("truncated", &web(port));
    agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let before = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    agent.stop_agent();

    let store = agent.path("state/hoist.redb");
    assert_eq!(mode(&store), 0o600);
    std::fs::OpenOptions::new().write(true).open(&store).unwrap().set_len(0).unwrap();
    agent.spawn();
    let status = agent.status();
    let warning = status.warnings.iter().find(|w| w.starts_with("store: ")).expect("the store problem is shown");
    assert!(warning.contains(&store.display().to_string()) && warning.contains("restore it from a backup"), "{warning}");
    assert!(metrics(&agent).contains(STORE_METRIC));

    // Still on v2, the same container: an empty store would have rolled it back to v1.
    std::thread::sleep(Duration::from_secs(5));
    let m = agent.wait_running("web");
    assert_eq!((m.version.as_str(), &m.container_id), ("v2", &before.container_id));
    assert_eq!(http_get(port).as_deref(), Some("v2"));
    let out = agent.hoist(&["kv", "get", "HOIST", "container/web/tag"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("hoist.redb") && err.contains("move it away"), "{err}");
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 0, "nothing was written over the damaged file");
    // A container the KV cannot reach is still kept running.
    docker_ok(&["kill", &agent.container_name("web")]);
    agent.wait_machine("web", "replaced", Duration::from_secs(30), |m| {
        m.state == State::Run && m.container_id.is_some() && m.container_id != before.container_id && m.version == "v2"
    });
}

/// A tmpfs mounted over `path`, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: PathBuf, kib: u64) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={kib}k,mode=0750"), "tmpfs"]).arg(&path).status().unwrap();
        assert!(ok.success(), "mounting a tmpfs needs root");
        SmallDisk(path)
    }

    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("dd").args(["if=/dev/zero", "bs=4k"]).arg(format!("of={}", filler.display())).output().unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_shows_in_status_and_metrics_and_writes_resume_once_space_is_freed() {
    let mut agent = TestAgent::prepare("diskfull", NO_CONTAINERS, "", FAST_ROLLOUT);
    let disk = SmallDisk::mount(agent.path("state"), 16 * 1024);
    agent.spawn();
    agent.hoist_ok(&["kv", "put", "HOIST", "kept", "before"]);
    assert!(!metrics(&agent).contains("hoist_node_condition"));

    let filler = disk.fill();
    let big = "x".repeat(100_000);
    let failed = (0..30).find_map(|n| {
        let out = agent.hoist(&["kv", "put", "HOIST", &format!("big{n}"), &big]);
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    let failed = failed.expect("a write fails once the disk is full");
    assert!(failed.contains("No space left"), "{failed}");
    let status = agent.status();
    let warning = status.warnings.iter().find(|w| w.starts_with("store: ")).expect("the failing store is shown");
    assert!(warning.contains("hoist.redb") && warning.contains("free space"), "{warning}");
    assert!(metrics(&agent).contains(STORE_METRIC));

    std::fs::remove_file(filler).unwrap();
    agent.hoist_ok(&["kv", "put", "HOIST", "after", "freed"]);
    assert!(agent.status().warnings.iter().all(|w| !w.starts_with("store: ")), "the warning clears");
    assert!(!metrics(&agent).contains("hoist_node_condition"));
    assert_eq!(agent.hoist_ok(&["kv", "get", "HOIST", "kept"]).trim(), "before");
    agent.kill_agent();
    drop(disk);
}

/// A request sent over the agent's socket by hand; returns the raw answer.
fn raw_request(agent: &TestAgent, request: &str) -> String {
    let mut stream = UnixStream::connect(agent.path("state/hoist.sock")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn buckets_cannot_be_deleted_through_the_agent() {
    let agent = TestAgent::start("nobucketdelete", NO_CONTAINERS);
    let answer = raw_request(&agent, "DELETE /v1/kv/HOIST HTTP/1.1\r\nHost: hoist\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    assert_eq!(agent.hoist_ok(&["kv", "get", "HOIST", "container/web/tag"]).trim(), "v2");
}

/// `hoist kv watch HOIST` in human form.
struct KvWatch(KillOnDrop);

impl KvWatch {
    fn start(agent: &TestAgent) -> KvWatch {
        let child = Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--config")
            .arg(agent.path("hoist.yaml"))
            .args(["kv", "watch", "HOIST"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Let it subscribe before the caller acts.
        std::thread::sleep(Duration::from_millis(500));
        KvWatch(KillOnDrop(child))
    }

    fn finish(mut self) -> String {
        let child = &mut self.0.0;
        child.kill().unwrap();
        let mut printed = String::new();
        child.stdout.take().unwrap().read_to_string(&mut printed).unwrap();
        printed
    }
}

/// Whether the peer closed the connection within `within` (reads end or fail).
fn closed_within(stream: &mut UnixStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Whether the peer has not closed the connection, without waiting.
fn still_open(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let open = matches!((&*stream).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

#[test]
fn idle_and_unfinished_requests_are_cut_off_and_watches_keep_streaming() {
    let agent = TestAgent::start("flood", &format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n", image()));
    agent.wait_running("web");
    let socket = agent.path("state/hoist.sock");
    let watch = Watch::start(&agent, &[]);
    let kv_watch = KvWatch::start(&agent);
    // A body that never finishes arriving.
    let mut slow_body = UnixStream::connect(&socket).unwrap();
    slow_body.write_all(b"PUT /v1/kv/HOIST/entry/slow HTTP/1.1\r\nHost: hoist\r\nContent-Length: 100\r\n\r\n0123456789").unwrap();
    let started = Instant::now();

    // Half of them send nothing, half stop in the middle of the headers.
    let mut flood: Vec<UnixStream> = (0..300)
        .map(|n| {
            let mut s = UnixStream::connect(&socket).unwrap();
            // One beyond the limit may be closed before the write: that is the limit at work.
            if n % 2 == 1 {
                let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: ho");
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (mut open, closed): (Vec<&mut UnixStream>, Vec<_>) = flood.iter_mut().partition(|s| still_open(s));
    assert!(closed.len() >= 300 - 128, "connections beyond the limit are closed at once ({} were)", closed.len());
    assert!(!open.is_empty());
    for s in open.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(15)), "an idle connection is closed after the header timeout");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    agent.status();

    // The unfinished body is answered with a timeout once its time is up.
    slow_body.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut answer = [0u8; 64];
    let n = slow_body.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer[..n]));
    assert!(started.elapsed() >= Duration::from_secs(25), "non-streaming requests get their time");

    // Both watches outlived every timeout and still stream.
    agent.hoist_ok(&["kv", "put", "HOIST", "after", "timeouts"]);
    agent.hoist_ok(&["transition", "web", "restart"]);
    agent.wait_running("web");
    std::thread::sleep(Duration::from_secs(1));
    let events = watch.finish();
    assert!(events.iter().any(|e| e.transition == "restart"), "{events:?}");
    let printed = kv_watch.finish();
    assert!(printed.contains("after = timeouts"), "{printed}");
}

const FORGED: &str = "\x1b]0;pwned\x07\x1b[2J";
const ESCAPED: &str = "\\x1b]0;pwned\\x07\\x1b[2J";

fn assert_inert(what: &str, printed: &str) {
    assert!(!printed.contains(['\x1b', '\x07']), "{what} printed control characters: {printed:?}");
    assert!(printed.contains(ESCAPED), "{what} shows the forged text escaped: {printed:?}");
}

#[test]
fn forged_text_from_the_store_cannot_reach_the_terminal() {
    let agent = TestAgent::start("forged", NO_CONTAINERS);
    let watch = KvWatch::start(&agent);
    agent.hoist_ok(&["kv", "put", "HOIST", "note", &format!("hello{FORGED}")]);
    assert_inert("kv get", &agent.hoist_ok(&["kv", "get", "HOIST", "note"]));

    let service = serde_json::json!({
        "cluster": format!("prod{FORGED}"), "service": "web", "protocol": "http", "address": "10.0.0.1", "port": 80, "priority": 1,
    });
    agent.hoist_ok(&["kv", "put", "CHORIA_SERVICES", "prod.http.web.abc", &service.to_string()]);
    assert_inert("services", &agent.hoist_ok(&["services"]));

    std::thread::sleep(Duration::from_millis(500));
    let printed = watch.finish();
    assert_inert("kv watch", &printed);
}
