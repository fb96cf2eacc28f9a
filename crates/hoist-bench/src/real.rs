//! Helpers for driving real parts: a nats-server of our own, the `hoist` binary as an agent, its
//! control socket, and Docker cleanup. Everything started here is stopped on drop, also on error.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A free loopback port: bound, read and released (a race with other processes is possible but rare).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A JetStream-enabled nats-server on a loopback port with its own store, killed on drop.
pub struct NatsServer {
    pub url: String,
    _child: Child,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<NatsServer> {
        let store = tempfile::tempdir()?;
        let port = free_port()?;
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nats-server (is it on PATH?)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NatsServer { url: format!("nats://127.0.0.1:{port}"), _child: child, _store: store })
    }
}

/// The `hoist` binary next to this one (both built into target/release by cargo).
pub fn hoist_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("hoist");
    anyhow::ensure!(path.exists(), "{} not found: run `cargo build --release -p hoist` first", path.display());
    Ok(path)
}

/// The local test image (scripts/test-fixtures.sh); v1/v2 serve HTTP on port 80.
pub const TEST_IMAGE: &str = "127.0.0.1:5000/hoist/test";

/// The command every bench container runs: the image's busybox `httpd`, behind a shell that exits on
/// SIGTERM. `httpd` as PID 1 ignores SIGTERM, so each graceful stop would wait out the whole
/// `stop_grace` and the benchmarks would measure the grace instead of hoist; an app that drains on
/// SIGTERM is also what a rollout should be measured with.
pub const DRAINING_COMMAND: [&str; 3] = ["/bin/sh", "-c", "trap \"exit 0\" TERM; httpd -f -p 80 -h /www & wait"];

/// A real `hoist agent` on the embedded backend in a temporary state dir. Dropping it kills the
/// agent and removes every container labelled with its node.
pub struct RealAgent {
    pub node: String,
    pub socket: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl RealAgent {
    /// Writes the agent file and `count` containers (`c00`, `c01`, ... or `web` for one) and starts it
    /// on the embedded backend.
    pub async fn start(label: &str, count: usize) -> anyhow::Result<RealAgent> {
        RealAgent::start_with(label, count, None).await
    }

    /// As `start`; with `nats` = (server URL, restart governor) the agent joins that fleet instead.
    pub async fn start_with(label: &str, count: usize, nats: Option<(&str, &str)>) -> anyhow::Result<RealAgent> {
        let dir = tempfile::tempdir()?;
        let node = format!("hbench-{label}-{}", std::process::id());
        let state = dir.path().join("state");
        let data = dir.path().join("containers.yaml");
        let mut containers = String::from("containers:\n");
        let command = DRAINING_COMMAND.map(|word| format!("'{word}'")).join(", ");
        for i in 0..count {
            let name = if count == 1 { "web".to_string() } else { format!("c{i:02}") };
            containers.push_str(&format!(
                "  {name}:\n    image: {TEST_IMAGE}\n    image_tag: v1\n    kv_update: true\n    command: [{command}]\n"
            ));
            if let Some((_, governor)) = nats {
                containers.push_str(&format!("    restart_governor: {governor}\n"));
            }
        }
        std::fs::write(&data, containers)?;
        let config = dir.path().join("hoist.yaml");
        // Containers without a health check pass their gate after unverified_wait: 1 s keeps rounds short.
        std::fs::write(
            &config,
            format!(
                "node: {node}\nstate_dir: {}\ndata: [{}]\ndocker:\n  name_prefix: {node}_\nrollout:\n  unverified_wait: 1s\n",
                state.display(),
                data.display()
            ) + &nats.map(|(url, _)| format!("backend: nats\nnats:\n  servers: [\"{url}\"]\n")).unwrap_or_default(),
        )?;
        let mut agent = RealAgent { socket: state.join("hoist.sock"), node, config, child: None, _dir: dir };
        agent.spawn().await?;
        Ok(agent)
    }

    /// (Re)starts the agent process; it adopts the containers a previous one left running.
    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(hoist_binary()?)
            .arg("--config")
            .arg(&self.config)
            .arg("agent")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::UnixStream::connect(&self.socket).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the agent did not open {}", self.socket.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the agent gracefully (SIGTERM) and waits for it; its containers keep running.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                Command::new("kill").arg(pid.to_string()).status().await?;
            }
            child.wait().await?;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Polls the control API until every machine is RUN on `version`.
    pub async fn wait_run(&self, version: &str, limit: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status().await?;
            let machines = status["machines"].as_array().cloned().unwrap_or_default();
            if !machines.is_empty() && machines.iter().all(|m| m["state"] == "RUN" && m["version"] == version) {
                return Ok(status);
            }
            anyhow::ensure!(Instant::now() < deadline, "not every container reached RUN on {version} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let body = request(&self.socket, "GET", "/v1/status", b"").await?;
        Ok(serde_json::from_slice(&body)?)
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        // Synchronous on purpose: drop may run while the runtime is shutting down.
        if let Ok(out) =
            std::process::Command::new("docker").args(["ps", "-aq", "--filter", &format!("label=io.hoist.node={}", self.node)]).output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker").args(["rm", "-f"]).args(&ids).stdout(Stdio::null()).status();
            }
        }
    }
}

/// One HTTP/1.1 request on the control socket; returns the body of a 2xx answer. A hand-written
/// client keeps the benchmark's own overhead small and visible.
pub async fn request(socket: &Path, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    let head = format!("{method} {path} HTTP/1.1\r\nHost: hoist\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = raw[split + 4..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(&body)? } else { body };
    anyhow::ensure!(head.starts_with("http/1.1 2"), "{method} {path}: {}", String::from_utf8_lossy(&body));
    Ok(body)
}

fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol])?.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 4 + size..];
    }
}

/// One line of `docker events`, stamped on arrival.
pub struct DockerEvent {
    pub at: Instant,
    /// `start`, `die`, `kill` ...
    pub action: String,
    pub id: String,
    /// The container's `io.hoist.node` label.
    pub node: String,
    /// The signal of a `kill` event (also sent by `docker stop`); empty for other actions.
    pub signal: String,
}

/// Follows `docker events` for the containers whose labels match `label` (`key` or `key=value`) and
/// the given actions, until the returned child is dropped.
pub async fn docker_events(label: &str, actions: &[&str]) -> anyhow::Result<(Child, tokio::sync::mpsc::UnboundedReceiver<DockerEvent>)> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut command = Command::new("docker");
    command.args(["events", "--filter", &format!("label={label}")]);
    for action in actions {
        command.args(["--filter", &format!("event={action}")]);
    }
    let mut child = command
        .args(["--format", "{{.Action}} {{.ID}} {{index .Actor.Attributes \"io.hoist.node\"}} {{index .Actor.Attributes \"signal\"}}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("docker events stdout")?).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let at = Instant::now();
            let mut words = line.split_whitespace().map(String::from);
            let (Some(action), Some(id)) = (words.next(), words.next()) else { continue };
            let event = DockerEvent { at, action, id, node: words.next().unwrap_or_default(), signal: words.next().unwrap_or_default() };
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    // `docker events` subscribes asynchronously; give it a moment so the first event is not missed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((child, rx))
}

/// A transition event from `GET /v1/watch`, stamped on arrival.
pub struct Arrived {
    pub at: Instant,
    pub event: serde_json::Value,
}

/// Follows the agent's event stream (NDJSON in chunked encoding); every event is sent with the
/// instant its line was read. The task ends with the agent.
pub async fn watch(socket: &Path) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<Arrived>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(b"GET /v1/watch HTTP/1.1\r\nHost: hoist\r\n\r\n").await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // Status line and headers.
    loop {
        line.clear();
        anyhow::ensure!(reader.read_line(&mut line).await? > 0, "the watch closed before its headers ended");
        if line == "\r\n" {
            break;
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut size_line = String::new();
        loop {
            size_line.clear();
            let Ok(n) = reader.read_line(&mut size_line).await else { return };
            let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else { return };
            if n == 0 || size == 0 {
                return;
            }
            let mut chunk = vec![0; size + 2];
            if reader.read_exact(&mut chunk).await.is_err() {
                return;
            }
            let at = Instant::now();
            pending.extend_from_slice(&chunk[..size]);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(event) = serde_json::from_slice(&line)
                    && tx.send(Arrived { at, event }).is_err()
                {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// Waits for an event matching `pred`, skipping others.
pub async fn next_matching(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Arrived>,
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<Arrived> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(a)) if pred(&a.event) => return Ok(a),
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("the agent's event stream ended"),
            Err(_) => anyhow::bail!("no matching event within {limit:?}"),
        }
    }
}
