//! `hoist ui`, the live web view: a real `hoist ui` process against real agents, looked at in real
//! headless Chromium (through chromedriver) as an operator would, and its access rule over plain HTTP.

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;
mod support;
#[path = "support/webdriver.rs"]
mod webdriver;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;
use webdriver::{Browser, http};

/// A `hoist ui` process with the agent's file, killed when dropped.
struct Ui {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Ui {
    fn start(agent: &TestAgent, listen: &str, env: &[(&str, &str)]) -> Ui {
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        let log = agent.path(&format!("ui-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_hoist"))
            .arg("--config")
            .arg(agent.path("hoist.yaml"))
            .args(["ui", "--listen", listen])
            .env_remove("HOIST_UI_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start hoist ui");
        let ui = Ui { child, port, log };
        wait_until("hoist ui to listen", Duration::from_secs(20), || ui.get("/", &[]));
        ui
    }

    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
        http(self.address(), "GET", path, headers, "")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hoist ARGS` that must end by itself (one that serves instead fails the test rather than hanging it).
fn exits(agent: &TestAgent, args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--config")
        .arg(agent.path("hoist.yaml"))
        .args(args)
        .env_remove("HOIST_UI_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hoist");
    let ended = wait_until_or_none(Duration::from_secs(20), || child.try_wait().unwrap());
    if ended.is_none() {
        let _ = child.kill();
        panic!("hoist {args:?} did not end: it serves instead of refusing");
    }
    child.wait_with_output().unwrap()
}

fn wait_until_or_none<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = check() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Where CI picks the screenshot up: `$CARGO_TARGET_DIR/ci-artifacts/ui.png`, else `target/ci-artifacts/ui.png`
/// of the workspace.
fn artifact(name: &str) -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), |t| workspace.join(t));
    let dir = target.join("ci-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The containers table as the page shows it: one `[node, container, state, version, health, note]` per row.
fn rows(browser: &Browser) -> Vec<Vec<String>> {
    let cells = browser
        .script("return [...document.querySelectorAll('#containers tbody tr')].map(tr => [...tr.cells].map(td => td.innerText.trim()))");
    serde_json::from_value(cells).expect("rows of text")
}

/// The versions the chart draws a line for, and the count its legend shows for each now.
fn chart(browser: &Browser) -> Vec<(String, String)> {
    let series = browser.script(
        "return [...document.querySelectorAll('#chart path[data-version]')].map(p => [p.dataset.version, \
         document.querySelector('#chart text.legend[data-version=\"' + p.dataset.version + '\"]').textContent])",
    );
    serde_json::from_value(series).expect("chart series")
}

fn page_wait<T>(browser: &Browser, ui: &Ui, what: &str, timeout: Duration, mut check: impl FnMut(&Browser) -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check(browser) {
            return v;
        }
        if Instant::now() > deadline {
            let text = browser.script("return document.body.innerText");
            panic!(
                "timed out after {timeout:?} waiting for the page to show {what}; it shows:\n{}\n--- hoist ui ---\n{}",
                text.as_str().unwrap_or_default(),
                ui.log()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_page_follows_a_fleet_rollout_live() {
    let server = nats::Server::start();
    let operator = OperatorKey::new();
    let agent_yaml = format!("backend: nats\nnats:\n  servers: ['{}']\n{}", server.url(), operator.fleet_yaml("viewer", "[status]"));
    let web = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n", image());
    let agents: Vec<TestAgent> = ["a", "b"].iter().map(|n| TestAgent::start_with(&format!("ui-{n}"), &web, &agent_yaml)).collect();
    agents[0].hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    for a in &agents {
        a.wait_running("web");
        // Its warning that RG did not exist yet is rechecked at a reload.
        a.signal("HUP");
    }

    let port = free_port();
    let ui = Ui::start(&agents[0], &format!("127.0.0.1:{port}"), &[]);
    let browser = Browser::start();
    browser.goto(&format!("http://127.0.0.1:{port}/"));
    // Gone if the page reloads: what follows must arrive through the live stream.
    browser.script("window.hoistTestMark = 'the page opened once'; return null");

    let on = |version: &'static str| {
        let nodes: Vec<String> = agents.iter().map(|a| a.node.clone()).collect();
        move |b: &Browser| {
            let rows = rows(b);
            let expected: Vec<Vec<String>> = nodes.iter().map(|n| vec![n.clone(), "web".into(), "RUN".into(), version.into()]).collect();
            let shown: Vec<Vec<String>> = rows.iter().map(|r| r[..4].to_vec()).collect();
            (shown == expected).then_some(rows)
        }
    };
    let before = page_wait(&browser, &ui, "both nodes' web in RUN on v1", Duration::from_secs(30), on("v1"));
    assert!(before.iter().all(|r| r[4] == "unverified" || r[4] == "healthy"), "health shown: {before:?}");
    assert_eq!(
        page_wait(&browser, &ui, "a v1 line", Duration::from_secs(10), |b| Some(chart(b)).filter(|c| !c.is_empty())),
        [("v1".to_string(), "v1 (2)".to_string())]
    );
    let governors = browser.script("return document.querySelector('#governors tbody').innerText");
    assert!(governors.as_str().is_some_and(|g| g.contains("RG") && g.contains("0 / 1")), "governors shown: {governors}");
    assert_eq!(browser.script("return document.getElementById('error').innerText"), "", "no error shown");

    agents[0].hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v2"]);
    page_wait(&browser, &ui, "both nodes' web in RUN on v2", Duration::from_secs(120), on("v2"));
    let series = page_wait(&browser, &ui, "a v2 line at 2", Duration::from_secs(10), |b| {
        Some(chart(b)).filter(|c| c.iter().any(|(v, legend)| v == "v2" && legend == "v2 (2)"))
    });
    assert!(series.iter().any(|(v, legend)| v == "v1" && legend == "v1 (0)"), "v1's line is kept, at 0 now: {series:?}");
    let events = browser.script("return document.getElementById('events').innerText");
    let events = events.as_str().unwrap_or_default();
    for a in &agents {
        assert!(events.contains(&format!("{} web RUN → UPDATE (update)", a.node)), "each node's update is listed:\n{events}");
    }
    assert_eq!(browser.script("return window.hoistTestMark || null"), "the page opened once", "the page was reloaded");

    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = artifact("ui.png");
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

#[test]
fn a_node_view_answers_plain_http_and_keeps_its_access_rule() {
    let agent = TestAgent::start("ui-node", &format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n", image()));
    agent.wait_running("web");

    // Loopback: no token, but a Host naming loopback (a rebound DNS name is refused).
    let ui = Ui::start(&agent, &format!("127.0.0.1:{}", free_port()), &[]);
    let (status, body) = ui.get("/api/snapshot", &[]).expect("an answer");
    assert_eq!(status, 200, "{body}");
    let snapshot: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snapshot["scope"], "node");
    let row = &snapshot["rows"][0];
    assert_eq!((row["node"].as_str(), row["container"].as_str()), (Some(agent.node.as_str()), Some("web")), "{snapshot}");
    assert_eq!((row["state"].as_str(), row["version"].as_str()), (Some("RUN"), Some("v1")), "{snapshot}");
    assert_eq!(snapshot["in_service"]["v1"], 1);
    let (status, page) = ui.get("/", &[]).unwrap();
    assert!(status == 200 && page.contains("<title>hoist</title>"), "{status} {page}");
    assert_eq!(ui.get("/api/snapshot", &[("Host", "evil.example:8089")]).unwrap().0, 403);
    // Read-only: nothing takes a POST.
    assert_eq!(http(ui.address(), "POST", "/api/snapshot", &[], "{}").unwrap().0, 405);

    // Not loopback without a token: refused at start, naming the flag.
    let refused = exits(&agent, &["ui", "--listen", &format!("0.0.0.0:{}", free_port())]);
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--token-file") && stderr.contains("HOIST_UI_TOKEN"), "{stderr}");

    // With a token, every request carries it.
    let open = Ui::start(&agent, &format!("0.0.0.0:{}", free_port()), &[("HOIST_UI_TOKEN", "s3cret")]);
    assert_eq!(open.get("/api/snapshot", &[]).unwrap().0, 401);
    assert_eq!(open.get("/", &[]).unwrap().0, 401);
    assert_eq!(open.get("/api/events", &[]).unwrap().0, 401);
    assert_eq!(open.get("/api/snapshot", &[("Authorization", "Bearer s3cre")]).unwrap().0, 401);
    assert_eq!(open.get("/api/snapshot?token=wrong", &[]).unwrap().0, 401);
    assert_eq!(open.get("/api/snapshot", &[("Authorization", "Bearer s3cret")]).unwrap().0, 200);
    assert_eq!(open.get("/api/snapshot?token=s3cret", &[("Host", "elsewhere.example")]).unwrap().0, 200);

    // The agent gone: the snapshot says so instead of failing the server.
    let mut agent = agent;
    agent.stop_agent();
    let (status, body) = ui.get("/api/snapshot", &[]).unwrap();
    assert_eq!(status, 503, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(error["error"].as_str().is_some_and(|e| e.contains("cannot reach the hoist agent")), "{body}");
}
