//! Safe rollouts against the real engine and registry: rollback of a failing version, a tag that
//! cannot be pulled, the registry going away mid-rollout, and `update` of an unchanged tag.

mod support;

use hoist_core::fsm::State;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

fn web(image: &str, port: u16, extra: &str) -> String {
    format!("containers:\n  web:\n    image: {image}\n    image_tag: v1\n    kv_update: true\n    ports: ['127.0.0.1:{port}:80']\n{extra}")
}

#[test]
fn a_version_that_fails_its_gate_is_rolled_back_and_not_retried() {
    let port = free_port();
    let agent = TestAgent::start("rollback", &web(&image(), port, ""));
    let before = agent.wait_running("web");
    let watch = Watch::start(&agent, &[]);
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "broken"]);
    let m = agent.wait_machine("web", "rolled back to v1", Duration::from_secs(60), |m| {
        m.state == State::Run && m.version == "v1" && m.condition.is_some()
    });
    assert_ne!(m.container_id, before.container_id, "v1 runs again in a fresh container");
    assert!(m.condition.as_deref().unwrap().contains("broken failed its health gate"), "{m:?}");
    let err = m.last_error.unwrap_or_default();
    assert!(err.contains(":broken to ") && err.contains(":v1") && err.contains("exit 3"), "{err}");
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");

    // Not retried while the KV still says broken.
    std::thread::sleep(Duration::from_secs(3));
    let later = agent.machine("web").unwrap();
    assert_eq!((later.state, later.container_id.clone()), (State::Run, m.container_id.clone()), "no retry of broken");

    // The rollback was announced as an event with its reason.
    let events = watch.finish();
    let rollback = events.iter().find(|e| e.transition == "rollback");
    assert!(rollback.is_some_and(|e| e.detail.as_deref().unwrap_or_default().contains("exit 3")), "{events:#?}");

    // A new value is tried again.
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    let m = agent.wait_machine("web", "on v2", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(m.condition, None);
}

#[test]
fn a_tag_that_cannot_be_pulled_leaves_the_running_container_alone() {
    let port = free_port();
    let agent = TestAgent::start("missingtag", &web(&image(), port, ""));
    let before = agent.wait_running("web");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "nosuchtag"]);
    let m = agent.wait_machine("web", "reporting the failed pull", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("pull of") && e.contains("nosuchtag"))
    });
    assert_eq!(m.state, State::Update);
    assert_eq!(m.container_id, before.container_id);
    assert_eq!(http_get(port).as_deref(), Some("v1"));
    // The table says what is going on and why: the retry, and the registry's answer.
    let table = agent.hoist_ok(&["status"]);
    let row = table.lines().find(|l| l.contains("hoist_web")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("retrying the pull") && row.contains("nosuchtag") && row.contains("not found"), "{table}");

    // Back to v1 in the KV: the image is already there and unchanged, so the container is kept.
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v1"]);
    let m = agent.wait_machine("web", "back in RUN", Duration::from_secs(30), |m| m.state == State::Run);
    assert_eq!(m.container_id, before.container_id, "an unchanged image does not restart the container");
    assert_eq!(m.restarts, before.restarts);
}

#[test]
fn update_of_an_unchanged_tag_keeps_the_container() {
    let agent = TestAgent::start("samedigest", &web(&image(), free_port(), ""));
    let before = agent.wait_running("web");
    let watch = Watch::start(&agent, &[]);
    agent.hoist_ok(&["transition", "web", "update"]);
    let m = agent.wait_machine("web", "back in RUN", Duration::from_secs(30), |m| m.state == State::Run);
    assert_eq!((m.state, m.container_id, m.restarts), (State::Run, before.container_id, before.restarts), "same digest: no restart");
    // It did go through the update: pulled, found the image unchanged, kept the container.
    let events = watch.finish();
    let path: Vec<&str> = events.iter().filter(|e| e.transition != "error").map(|e| e.to_state.as_str()).collect();
    assert_eq!(path, ["UPDATE", "RESTART", "RUN"], "{events:#?}");
    assert!(events[1].detail.as_deref().unwrap_or_default().starts_with("unchanged"), "{events:#?}");
}

/// A registry of the test images on its own port, which a test may stop and start, optionally
/// requiring a login (htpasswd).
struct OwnRegistry {
    port: u16,
    config: std::path::PathBuf,
    child: Option<Child>,
}

impl OwnRegistry {
    fn start(dir: &std::path::Path) -> OwnRegistry {
        Self::start_with(dir, "")
    }

    /// With a user `hoist` / `s3cret` required for every request.
    fn start_with_login(dir: &std::path::Path) -> OwnRegistry {
        let htpasswd = dir.join("htpasswd");
        let made =
            Command::new("htpasswd").args(["-Bbc"]).arg(&htpasswd).args(["hoist", "s3cret"]).output().expect("htpasswd (apache2-utils)");
        assert!(made.status.success(), "{made:?}");
        Self::start_with(dir, &format!("auth:\n  htpasswd:\n    realm: hoist\n    path: {}\n", htpasswd.display()))
    }

    fn start_with(dir: &std::path::Path, extra: &str) -> OwnRegistry {
        let fixtures = std::env::var("HOIST_FIXTURES_DIR").unwrap_or_else(|_| "/tmp/hoist-fixtures".into());
        let port = free_port();
        let config = dir.join("registry.yml");
        let yml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {fixtures}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}"
        );
        std::fs::write(&config, yml).unwrap();
        let mut r = OwnRegistry { port, config, child: None };
        r.resume();
        r
    }

    fn resume(&mut self) {
        let child =
            Command::new("docker-registry").arg("serve").arg(&self.config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.child = Some(child);
        wait_until("the registry to answer", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", self.port)).ok());
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_registry_outage_mid_rollout_causes_no_outage_and_the_rollout_resumes() {
    let scratch = tempfile::tempdir().unwrap();
    let mut registry = OwnRegistry::start(scratch.path());
    let repo = format!("127.0.0.1:{}/hoist/test", registry.port);
    let port = free_port();
    let agent = TestAgent::start("registrydown", &web(&repo, port, ""));
    let before = agent.wait_running("web");

    registry.stop();
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "failing to pull", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("pull of"))
    });
    assert_eq!(http_get(port).as_deref(), Some("v1"), "still serving while the registry is down");
    assert_eq!(agent.machine("web").unwrap().container_id, before.container_id);

    registry.resume();
    agent.wait_machine("web", "on v2 once the registry is back", Duration::from_secs(60), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");
    // The images pulled through this registry's address are the test's own.
    let _ = docker(&["rmi", &format!("{repo}:v1"), &format!("{repo}:v2")]);
}

#[test]
fn a_moving_tag_shows_the_digest_it_resolved_to() {
    // A tag of this test's own, moved as a CI pipeline moves `latest`.
    let tag = "moving-digest-test";
    move_tag(tag, "v1");
    let config =
        format!("containers:\n  web:\n    image: {}\n    image_tag: {tag}\n    ports: ['127.0.0.1:{}:80']\n", image(), free_port());
    let agent = TestAgent::start("movingtag", &config);
    let first = agent.wait_running("web");
    let v1 = registry_digest("v1");
    assert_eq!(first.digest.as_deref(), Some(v1.as_str()), "{first:?}");
    let shown = |agent: &TestAgent| {
        let table = agent.hoist_ok(&["status"]);
        table.lines().find(|l| l.contains("hoist_web")).map(str::to_string).unwrap_or_else(|| panic!("{table}"))
    };
    let short = |digest: &str| format!("{tag}@{}", &digest[7..19]);
    assert!(shown(&agent).contains(&short(&v1)), "{}", shown(&agent));

    // The tag moves to v2's content; an update pulls it, and the table tells the two apart.
    move_tag(tag, "v2");
    agent.hoist_ok(&["transition", "web", "update"]);
    let v2 = registry_digest("v2");
    let moved = agent.wait_machine("web", "on the moved tag", Duration::from_secs(60), |m| {
        m.state == State::Run && m.digest.as_deref() == Some(v2.as_str())
    });
    assert_eq!(moved.version, tag, "the version is still the tag");
    assert!(shown(&agent).contains(&short(&v2)), "{}", shown(&agent));
    let _ = docker(&["rmi", &format!("{}:{tag}", image())]);
}

/// PUT through the control socket, bypassing the CLI's own check of tag values (as another KV
/// writer, e.g. `choria kv put`, would).
fn raw_kv_put(agent: &TestAgent, key: &str, value: &str) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(agent.path("state/hoist.sock")).unwrap();
    let req = format!("PUT /v1/kv/HOIST/entry/{key} HTTP/1.0\r\nHost: hoist\r\nContent-Length: {}\r\n\r\n{value}", value.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"), "{response}");
}

#[test]
fn the_kv_may_pin_a_digest_and_an_invalid_value_changes_nothing() {
    let port = free_port();
    let agent = TestAgent::start("digest", &web(&image(), port, ""));
    agent.wait_running("web");
    let digest = registry_digest("v2");
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", &digest]);
    let pinned =
        agent.wait_machine("web", "pinned to the digest", Duration::from_secs(60), |m| m.state == State::Run && m.version == digest);
    assert_eq!(pinned.image.as_deref(), Some(format!("{}@{digest}", image()).as_str()));
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");

    let watch = Watch::start(&agent, &[]);
    raw_kv_put(&agent, "container/web/tag", "no such:tag!");
    let m = agent.wait_machine("web", "reporting the bad value", Duration::from_secs(10), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("ignored KV value"))
    });
    assert_eq!((m.state, m.container_id), (State::Run, pinned.container_id), "nothing changes");
    let events = watch.finish();
    assert!(
        events.iter().any(|e| e.transition == "error" && e.detail.as_deref().unwrap_or_default().contains("no such:tag!")),
        "{events:#?}"
    );
}

#[test]
fn a_held_governor_slot_is_freed_by_shutdown_and_by_expiry_when_the_agent_dies() {
    let files = tempfile::tempdir().unwrap();
    let trigger = files.path().join("restart");
    write(&trigger, "0");
    let extra = format!(
        "    restart_governor: RG\n    restart_files: ['{}']\n    health_check: {{ type: http, port: 80, interval: 1s }}\n",
        trigger.display()
    );
    // The new container must stay healthy 6 s before the slot is freed: a window to stop the agent in.
    let rollout = "{ min_healthy_time: 6s, healthy_deadline: 60s, governor_timeout: 60s }";
    let mut agent = TestAgent::start_with_rollout("leases", &web(&image(), free_port(), &extra), "", rollout);
    agent.hoist_ok(&["governor", "add", "RG", "1", "20s"]);
    agent.wait_running("web");
    let leases = |agent: &TestAgent| -> Vec<u64> {
        let view: serde_json::Value = serde_json::from_str(&agent.hoist_ok(&["governor", "view", "RG", "--json"])).unwrap();
        view["leases"].as_array().unwrap().iter().map(|l| l["seq"].as_u64().unwrap()).collect()
    };
    let held = |agent: &TestAgent| !leases(agent).is_empty();

    // SIGTERM while the restart holds the slot: released on the way out. (The next agent may take a
    // new slot at once to finish the interrupted restart; the old one must be gone.)
    write(&trigger, "1");
    let taken = wait_until("the restart to take the slot", Duration::from_secs(20), || leases(&agent).first().copied());
    agent.stop_agent();
    agent.spawn();
    assert!(!leases(&agent).contains(&taken), "lease {taken} released on shutdown\n{}", agent.log());
    agent.wait_running("web");

    // SIGKILL while holding it: nobody releases it, the governor's expiry (20 s) frees it.
    write(&trigger, "2");
    wait_until("the slot to be free", Duration::from_secs(30), || (!held(&agent)).then_some(()));
    write(&trigger, "2");
    let taken = wait_until("the restart to take the slot again", Duration::from_secs(20), || leases(&agent).first().copied());
    agent.kill_agent();
    agent.spawn();
    assert!(leases(&agent).contains(&taken), "a killed agent cannot release its slot");
    wait_until("the slot to expire", Duration::from_secs(30), || (!leases(&agent).contains(&taken)).then_some(()));
    agent.wait_running("web");
}

#[test]
fn pulls_from_a_registry_that_needs_a_login_use_the_docker_config_file() {
    let scratch = tempfile::tempdir().unwrap();
    let registry = OwnRegistry::start_with_login(scratch.path());
    let repo = format!("127.0.0.1:{}/hoist/test", registry.port);
    let port = free_port();

    // Without credentials the pull is refused, and the agent says so.
    let mut agent = TestAgent::prepare("regauth", &web(&repo, port, ""), "", FAST_ROLLOUT);
    let no_login = scratch.path().join("no-login");
    std::fs::create_dir_all(&no_login).unwrap();
    agent.env.push(("DOCKER_CONFIG".into(), no_login.display().to_string()));
    agent.spawn();
    agent.wait_machine("web", "refused by the registry", Duration::from_secs(30), |m| {
        m.last_error.as_deref().is_some_and(|e| e.contains("pull of") && e.contains(&repo))
    });

    // With `docker login`'s config file (base64 user:password under auths), it pulls and runs.
    agent.stop_agent();
    let login = scratch.path().join("login");
    std::fs::create_dir_all(&login).unwrap();
    let auth = base64(b"hoist:s3cret");
    write(&login.join("config.json"), &format!("{{\"auths\": {{\"127.0.0.1:{}\": {{\"auth\": \"{auth}\"}}}}}}", registry.port));
    agent.env = vec![("DOCKER_CONFIG".into(), login.display().to_string())];
    agent.spawn();
    agent.wait_running("web");
    assert_eq!(wait_until("v1 serving", Duration::from_secs(10), || http_get(port)), "v1");
    let _ = docker(&["rmi", &format!("{repo}:v1")]);
}

/// Standard base64 with padding, as Docker's config file stores `user:password`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn an_agent_killed_mid_update_converges_without_duplicates_or_a_leaked_slot() {
    let port = free_port();
    let extra = "    restart_governor: RG\n    health_check: { type: http, port: 80, interval: 1s }\n";
    let rollout = "{ min_healthy_time: 4s, healthy_deadline: 60s, governor_timeout: 60s }";
    let mut agent = TestAgent::start_with_rollout("killupdate", &web(&image(), port, extra), "", rollout);
    agent.hoist_ok(&["governor", "add", "RG", "1", "10s"]);
    agent.wait_running("web");

    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    agent.wait_machine("web", "replacing the container", Duration::from_secs(60), |m| m.state == State::Restart);
    agent.kill_agent();
    agent.spawn();
    agent.wait_machine("web", "on v2 after the crash", Duration::from_secs(90), |m| m.state == State::Run && m.version == "v2");
    assert_eq!(agent.labelled_containers(), vec![agent.container_name("web")], "exactly one container");
    assert_eq!(wait_until("v2 serving", Duration::from_secs(10), || http_get(port).filter(|b| b == "v2")), "v2");
    wait_until("no slot left held", Duration::from_secs(30), || {
        agent.hoist_ok(&["governor", "view", "RG"]).contains("0 active").then_some(())
    });
}
