//! Real nats-server processes on loopback for the tests: one server or a three-node cluster, each
//! with JetStream in its own temporary store, killed when dropped.

use hoist_core::backend::{BucketConfig, Kv};
use hoist_nats::{NatsBackend, NatsOptions};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local addr").port()
}

pub struct Server {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A standalone server.
    pub fn start() -> Server {
        Server::spawn(free_port(), Vec::new())
    }

    /// A standalone server with extra command-line options (e.g. `--auth TOKEN`).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::spawn(free_port(), extra.iter().map(|a| a.to_string()).collect())
    }

    fn spawn(port: u16, extra: Vec<String>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("js");
        let log = dir.path().join("server.log");
        let mut args: Vec<String> =
            ["-js", "-a", "127.0.0.1", "-sd", path(&store), "-l", path(&log)].into_iter().map(str::to_string).collect();
        args.extend(extra);
        let mut server = Server { port, args, child: None, _dir: dir };
        // A port found free may be taken by another test before the server binds it: then the server
        // exits at once, and a first start simply moves to another port.
        for _ in 0..5 {
            if server.launch() {
                return server;
            }
            server.port = free_port();
        }
        panic!("nats-server did not start on any of five free ports");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again with the same port and store, and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.launch(), "nats-server on port {} did not start", self.port);
    }

    /// Starts the server and waits until it accepts connections; false if it exits first (its port
    /// is taken) or does not answer within 10 s.
    fn launch(&mut self) -> bool {
        self.kill();
        let child = Command::new("nats-server")
            .args(&self.args)
            .args(["-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (is it on PATH?)");
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() >= deadline || child.try_wait().is_ok_and(|exited| exited.is_some()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Restarts the server on another port with the same store, out of reach of clients of the old one.
    pub fn restart_on(&mut self, port: u16) {
        self.port = port;
        self.restart();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Three routed servers forming one JetStream cluster.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let all_routes = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let nodes = routes
            .iter()
            .enumerate()
            .map(|(n, route)| {
                let extra = vec![
                    "--server_name".into(),
                    format!("n{n}"),
                    "--cluster_name".into(),
                    "hoist".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    all_routes.clone(),
                ];
                Server::spawn(free_port(), extra)
            })
            .collect();
        Cluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Server::url).collect()
    }

    /// The index in `nodes` of the server leading `stream`, asked of any live server.
    #[allow(dead_code)] // for hoist's fault and release tests, which share this harness
    pub fn stream_leader(&self, stream: &str) -> usize {
        let urls = self.urls();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let leader = runtime.block_on(async {
            let servers: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().expect("a server address")).collect();
            let client = async_nats::connect(servers).await.expect("connect to the cluster");
            let js = async_nats::jetstream::new(client);
            let mut s = js.get_stream(stream).await.expect("the stream");
            let info = s.info().await.expect("stream info");
            info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("a leader")
        });
        // The servers are named n0, n1, n2 in the order of `nodes`.
        leader.trim_start_matches('n').parse().expect("a harness server name")
    }

    /// A client of all three nodes, once the cluster has elected a JetStream meta leader and can place
    /// a three-replica stream.
    pub async fn ready_backend(&self) -> NatsBackend {
        let backend = connect(self.urls()).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = format!("probe_{}", std::process::id());
        loop {
            match backend.create_bucket(&probe, BucketConfig { replicas: 3, ..BucketConfig::default() }).await {
                Ok(()) => break,
                Err(err) => {
                    assert!(Instant::now() < deadline, "the cluster never became ready: {err}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        backend.delete_bucket(&probe).await.expect("delete the probe bucket");
        backend
    }
}

pub async fn connect(servers: Vec<String>) -> NatsBackend {
    NatsBackend::connect(NatsOptions { servers, name: "hoist tests".into(), ..NatsOptions::default() }).await.expect("connect")
}

/// Retries `op` until it succeeds or `within` passes, for the seconds a cluster takes to elect new
/// leaders after losing a node.
pub async fn eventually<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    within: Duration,
    mut op: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(value) => return value,
            Err(err) if Instant::now() < deadline => {
                eprintln!("{what}: {err}, retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => panic!("{what}: still failing after {within:?}: {err}"),
        }
    }
}
