//! Helpers for driving real parts: a nats-server of our own, the `hoist` binary as an agent, its
//! control socket, and Docker cleanup. Everything started here is stopped on drop, also on error.

use anyhow::Context;
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
