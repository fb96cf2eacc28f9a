//! hoist-nats against real nats-server processes: the shared conformance suites on one server and on a
//! three-node cluster, surviving a node loss and a restart, and Choria's wire layout.

mod harness;

use async_nats::jetstream::stream::DiscardPolicy;
use futures_util::StreamExt;
use harness::{Cluster, Server, connect, eventually, free_port};
use hoist_core::backend::{BackendError, BucketConfig, Events, Governor, Kv, KvEntry, KvOperation, TRANSITION_PROTOCOL, TransitionEvent};
use hoist_core::conformance;
use hoist_nats::{NatsBackend, NatsOptions};
use std::time::Duration;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_on_one_server() {
    let server = Server::start();
    let backend = connect(vec![server.url()]).await;
    tokio::join!(conformance::kv_suite(&backend), conformance::governor_suite(&backend), conformance::events_suite(&backend));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_on_a_cluster() {
    let cluster = Cluster::start();
    let backend = cluster.ready_backend().await;
    tokio::join!(conformance::kv_suite(&backend), conformance::governor_suite(&backend), conformance::events_suite(&backend));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serves_on_after_losing_a_node() {
    let mut cluster = Cluster::start();
    let backend = cluster.ready_backend().await;
    let replicated = BucketConfig { replicas: 3, ..BucketConfig::default() };
    backend.create_bucket("HOIST", replicated).await.expect("create a replicated bucket");
    backend.put("HOIST", "container/web/tag", b"v1").await.expect("put");
    backend.add("restart", 2, Duration::from_secs(60), 3).await.expect("add a replicated governor");
    let before = backend.acquire("restart", "web @ node1", Duration::from_secs(1)).await.expect("acquire");

    cluster.nodes[0].kill();

    let within = Duration::from_secs(20);
    let revision = eventually("put after losing a node", within, || backend.put("HOIST", "container/web/tag", b"v2")).await;
    let entry = eventually("get after losing a node", within, || backend.get("HOIST", "container/web/tag")).await.expect("a value");
    assert_eq!((entry.value_str().as_str(), entry.revision), ("v2", revision));
    let after =
        eventually("acquire after losing a node", within, || backend.acquire("restart", "db @ node2", Duration::from_secs(1))).await;
    assert!(after.seq > before.seq, "lease seqs continue: {before:?} then {after:?}");
    assert!(backend.holds(&before).await.expect("holds"), "a lease taken before the loss is kept");
    assert_err_full(backend.acquire("restart", "third", Duration::from_millis(300)).await);
    backend.release(&before).await.expect("release after losing a node");
}

fn assert_err_full<T: std::fmt::Debug>(result: Result<T, BackendError>) {
    assert!(matches!(result, Err(BackendError::GovernorTimeout(..))), "a full governor: {result:?}");
}

async fn next_entry(watch: &mut futures_util::stream::BoxStream<'static, KvEntry>, what: &str) -> KvEntry {
    timeout(Duration::from_secs(15), watch.next()).await.unwrap_or_else(|_| panic!("{what}: nothing arrived")).expect(what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_a_server_restart_and_catches_up() {
    let mut server = Server::start();
    let home = server.port;
    let watcher = connect(vec![server.url()]).await;
    watcher.create_bucket("HOIST", BucketConfig::default()).await.expect("create bucket");
    watcher.put("HOIST", "container/web/tag", b"v1").await.expect("put");
    let mut watch = watcher.watch("HOIST", ">").await.expect("watch");
    assert_eq!(next_entry(&mut watch, "initial value").await.value_str(), "v1");

    // While the watcher cannot reach it, the same server (same store) takes a write on another port.
    server.restart_on(free_port());
    let writer = connect(vec![server.url()]).await;
    eventually("put while the watcher is away", Duration::from_secs(10), || writer.put("HOIST", "container/web/tag", b"v2")).await;
    drop(writer);
    server.restart_on(home);

    let missed = next_entry(&mut watch, "the put made while disconnected").await;
    assert_eq!((missed.key.as_str(), missed.value_str().as_str(), missed.operation), ("container/web/tag", "v2", KvOperation::Put));
    let revision = eventually("put after the restart", Duration::from_secs(10), || watcher.put("HOIST", "container/db/tag", b"d1")).await;
    let later = next_entry(&mut watch, "a put after reconnecting").await;
    assert_eq!((later.key.as_str(), later.value_str().as_str(), later.revision), ("container/db/tag", "d1", revision));
    assert!(later.revision > missed.revision);
}

#[tokio::test]
async fn lays_streams_out_as_choria_does() {
    let server = Server::start();
    let backend = connect(vec![server.url()]).await;
    let client = async_nats::connect(server.url()).await.expect("plain connect");
    let js = async_nats::jetstream::new(client);

    backend.add("restart", 2, Duration::from_secs(60), 1).await.expect("add");
    let lease = backend.acquire("restart", "web @ node1", Duration::from_secs(1)).await.expect("acquire");
    let stream = js.get_stream("GOVERNOR_restart").await.expect("the governor's stream");
    let config = &stream.cached_info().config;
    assert_eq!(config.subjects, ["mcollective.governor.restart"]);
    assert_eq!((config.max_messages, config.max_age, config.discard), (2, Duration::from_secs(60), DiscardPolicy::New));
    assert_eq!(config.description.as_deref(), Some("Concurrency Governor restart"));
    let message = stream.get_raw_message(lease.seq).await.expect("the lease message");
    assert_eq!((message.subject.as_str(), &message.payload[..]), ("mcollective.governor.restart", &b"web @ node1"[..]));

    // A lease taken the way `choria governor run` takes one shows up in view.
    let reply = js.client().request("mcollective.governor.restart", "node2.example.net".into()).await.expect("campaign");
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).expect("a pub ack");
    let holders: Vec<_> = backend.view("restart").await.expect("view").leases.into_iter().map(|l| (l.seq, l.holder)).collect();
    assert_eq!(holders, [(lease.seq, "web @ node1".to_string()), (ack["seq"].as_u64().expect("seq"), "node2.example.net".to_string())]);

    // `governor ls` lists the collective's own governors, as `choria governor list` does.
    let other = NatsBackend::connect(NatsOptions { servers: vec![server.url()], collective: "other".into(), ..NatsOptions::default() })
        .await
        .expect("connect under another collective");
    other.add("deploy", 1, Duration::from_secs(60), 1).await.expect("add under another collective");
    assert_eq!(backend.list().await.expect("list"), ["restart"]);
    assert_eq!(other.list().await.expect("list"), ["deploy"]);

    backend.create_bucket("HOIST", BucketConfig::default()).await.expect("create bucket");
    let revision = backend.put("HOIST", "container/web/tag", b"v1").await.expect("put");
    let stream = js.get_stream("KV_HOIST").await.expect("the bucket's stream");
    let config = &stream.cached_info().config;
    assert_eq!(config.subjects, ["$KV.HOIST.>"]);
    assert_eq!((config.max_messages_per_subject, config.discard), (5, DiscardPolicy::New));
    assert!(config.allow_direct && config.allow_rollup && config.deny_delete, "KV flags: {config:?}");
    let message = stream.get_raw_message(revision).await.expect("the KV message");
    assert_eq!((message.subject.as_str(), &message.payload[..]), ("$KV.HOIST.container/web/tag", &b"v1"[..]));
    // And async-nats's own KV client, as nats.go's would, reads the bucket.
    let store = js.get_key_value("HOIST").await.expect("a standard KV handle");
    assert_eq!(store.get("container/web/tag").await.expect("get").as_deref(), Some(&b"v1"[..]));
}

#[tokio::test]
async fn transitions_are_choria_cloudevents_on_the_wire() {
    let server = Server::start();
    let backend = connect(vec![server.url()]).await;
    let client = async_nats::connect(server.url()).await.expect("plain connect");
    let mut raw = client.subscribe("choria.machine.transition").await.expect("subscribe");
    // Our own message coming back proves the server has the subscription (a flush only empties the
    // client's buffer): without this, an event from the other connection could overtake it.
    client.publish("choria.machine.transition", "sync".into()).await.expect("publish");
    let echo = timeout(Duration::from_secs(5), raw.next()).await.expect("our own message back").expect("a message");
    assert_eq!(&echo.payload[..], b"sync");
    let event = TransitionEvent {
        protocol: TRANSITION_PROTOCOL.into(),
        identity: "node1".into(),
        id: "5c0dd0a2-9d5e-4bd5-9c3a-0d0a6f7e1c11".into(),
        version: "1.0.0".into(),
        timestamp: 1_795_597_246,
        machine: "hoist_web".into(),
        transition: "restart".into(),
        from_state: "RUN".into(),
        to_state: "RESTART".into(),
        detail: None,
        image: None,
    };
    backend.publish(&event).await.expect("publish");
    let message = timeout(Duration::from_secs(5), raw.next()).await.expect("an event in time").expect("an event");
    let envelope: serde_json::Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["source"], "io.choria.machine");
    assert_eq!(envelope["type"], TRANSITION_PROTOCOL);
    assert_eq!(envelope["subject"], "node1");
    assert_eq!(envelope["datacontenttype"], "application/json");
    assert_eq!(envelope["time"], "2026-11-25T09:00:46Z");
    assert_eq!(envelope["data"], serde_json::to_value(&event).unwrap(), "data is the transition as Choria's");
    assert!(envelope["id"].as_str().is_some_and(|id| id.len() == 36), "{envelope}");
}

#[tokio::test]
async fn connect_failure_names_the_servers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url = format!("nats://127.0.0.1:{port}");
    match NatsBackend::connect(NatsOptions { servers: vec![url.clone()], ..NatsOptions::default() }).await {
        Err(BackendError::Unavailable(reason)) => assert!(reason.contains(&url), "unclear error: {reason}"),
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// A server that requires credentials refuses a client without any, with a clear reason, and serves
/// one with `credentials` (servers filled in) through JetStream.
async fn refused_without_and_served_with(server: &Server, credentials: NatsOptions) -> NatsBackend {
    match NatsBackend::connect(NatsOptions { servers: vec![server.url()], ..NatsOptions::default() }).await {
        Err(BackendError::Unavailable(reason)) => assert!(reason.to_lowercase().contains("auth"), "unclear error: {reason}"),
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected without credentials"),
    }
    let backend =
        NatsBackend::connect(NatsOptions { servers: vec![server.url()], ..credentials }).await.expect("connect with the credentials");
    backend.create_bucket("AUTHED", BucketConfig::default()).await.expect("JetStream through the connection");
    backend
}

#[tokio::test]
async fn a_token_is_sent_and_a_refusal_is_clear() {
    let server = Server::start_with(&["--auth", "s3cret-token"]);
    refused_without_and_served_with(&server, NatsOptions { token: Some("s3cret-token".into()), ..NatsOptions::default() }).await;
}

#[tokio::test]
async fn an_nkey_seed_file_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let conf = dir.path().join("auth.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key())).unwrap();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let server = Server::start_with(&["-c", conf.to_str().unwrap()]);
    refused_without_and_served_with(&server, NatsOptions { nkey: Some(seed), ..NatsOptions::default() }).await;
}

/// A NATS JWT: `claims` (without iss/sub/iat/jti) issued by `issuer` about `subject`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "jti": format!("{}{now}", name.to_uppercase()),
        "iat": now,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!("{}.{}", b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#), b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&signature))
}

#[tokio::test]
async fn a_creds_file_authenticates_against_an_operator_mode_server() {
    let dir = tempfile::tempdir().unwrap();
    let (operator, account, user) = (nkeys::KeyPair::new_operator(), nkeys::KeyPair::new_account(), nkeys::KeyPair::new_user());
    let operator_jwt = jwt(&operator, &operator.public_key(), "hoist-tests", serde_json::json!({ "type": "operator", "version": 2 }));
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
    });
    let account_jwt =
        jwt(&operator, &account.public_key(), "HOIST", serde_json::json!({ "limits": unlimited, "type": "account", "version": 2 }));
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "hoist",
        serde_json::json!({ "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }),
    );
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({ "type": "account", "version": 2 }));
    let conf = dir.path().join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
            account.public_key(),
            sys = system.public_key(),
        ),
    )
    .unwrap();
    // The layout `nsc generate creds` writes and Choria's tooling hands out.
    let creds = dir.path().join("hoist.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let server = Server::start_with(&["-c", conf.to_str().unwrap()]);
    let backend = refused_without_and_served_with(&server, NatsOptions { creds: Some(creds), ..NatsOptions::default() }).await;
    backend.add("restart", 1, Duration::from_secs(60), 1).await.expect("a governor through the account");
}

/// Runs openssl, failing the test with its output if it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn tls_with_a_private_ca_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=hoist test CA",
        ],
    );
    openssl(d, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();
    let server = Server::start_with(&["--tls", "--tlscert", &path("server.pem"), "--tlskey", &path("server.key")]);

    let options = |ca: Option<std::path::PathBuf>| NatsOptions { servers: vec![server.url()], tls_ca: ca, ..NatsOptions::default() };
    let untrusted = NatsBackend::connect(options(None)).await;
    assert!(matches!(untrusted, Err(BackendError::Unavailable(_))), "connected without trusting the CA");
    let backend = NatsBackend::connect(options(Some(d.join("ca.pem")))).await.expect("connect over TLS with the CA");
    backend.create_bucket("TLS", BucketConfig::default()).await.expect("use the connection");
}

/// nats-server 2.15 gives a stream that sets no consumer limit a limit of 1000, which two watches per
/// agent reach at 500 nodes; the buckets hoist makes take a fleet's worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_serves_more_watches_than_the_servers_default_limit() {
    let server = Server::start();
    let backend = connect(vec![server.url()]).await;
    backend.create_bucket("HOIST", BucketConfig::default()).await.expect("create");
    let mut watches = Vec::new();
    for i in 0..1_100 {
        let key = format!("container/c{}/tag", i % 10);
        watches.push(backend.watch("HOIST", &key).await.unwrap_or_else(|e| panic!("watch {i}: {e}")));
    }
    backend.put("HOIST", "container/c0/tag", b"v2").await.expect("put");
    for (i, watch) in watches.iter_mut().enumerate().filter(|(i, _)| i % 10 == 0) {
        let entry = timeout(Duration::from_secs(10), watch.next()).await.unwrap_or_else(|_| panic!("watch {i} delivered nothing"));
        assert_eq!(entry.map(|e| e.value), Some(b"v2".to_vec()), "watch {i}");
    }
}
