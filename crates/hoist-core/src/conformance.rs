//! The behaviour every backend must show, from the caller's side. Each suite panics with a message
//! naming the broken expectation. Names carry a random suffix so several suites, or several test
//! processes, can share one server.

use crate::backend::{
    BackendError, BucketConfig, Events, Governor, Kv, KvEntry, KvOperation, Lease, TRANSITION_PROTOCOL, TransitionEvent, read_all,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

/// Longest wait for something that should arrive at once.
const PROMPTLY: Duration = Duration::from_secs(5);

macro_rules! assert_err {
    ($result:expr, $pattern:pat, $what:expr) => {
        match $result {
            Err($pattern) => {}
            Err(other) => panic!("{}: expected {}, got the error {other}", $what, stringify!($pattern)),
            Ok(_) => panic!("{}: expected {}, but it succeeded", $what, stringify!($pattern)),
        }
    };
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), rand::random::<u32>())
}

async fn next<T>(stream: &mut BoxStream<'static, T>, what: &str) -> T {
    match timeout(PROMPTLY, stream.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing arrived within {PROMPTLY:?}"),
    }
}

fn assert_entry(entry: &KvEntry, key: &str, value: &str, operation: KvOperation, what: &str) {
    assert_eq!(
        (entry.key.as_str(), entry.value_str().as_str(), entry.operation),
        (key, value, operation),
        "{what}: unexpected entry {entry:?}"
    );
}

/// Buckets, values, deletes, name rules, watches and TTLs.
pub async fn kv_suite(kv: &dyn Kv) {
    let bucket = unique("conformance_kv");
    let config = BucketConfig { history: 3, ttl: None, replicas: 1 };

    assert_err!(kv.get(&bucket, "a").await, BackendError::NoBucket(_), "get from a missing bucket");
    assert_err!(kv.put(&bucket, "a", b"1").await, BackendError::NoBucket(_), "put into a missing bucket");
    assert_err!(kv.delete(&bucket, "a").await, BackendError::NoBucket(_), "delete in a missing bucket");
    assert_err!(kv.keys(&bucket).await, BackendError::NoBucket(_), "keys of a missing bucket");
    assert_err!(kv.watch(&bucket, ">").await, BackendError::NoBucket(_), "watch a missing bucket");
    assert_err!(kv.bucket_config(&bucket).await, BackendError::NoBucket(_), "config of a missing bucket");
    assert_err!(kv.delete_bucket(&bucket).await, BackendError::NoBucket(_), "delete a missing bucket");

    kv.create_bucket(&bucket, config.clone()).await.expect("create a bucket");
    assert_eq!(kv.bucket_config(&bucket).await.expect("bucket config"), config, "config as created");
    let updated = BucketConfig { history: 5, ..config };
    kv.create_bucket(&bucket, updated.clone()).await.expect("update a bucket");
    assert_eq!(kv.bucket_config(&bucket).await.expect("bucket config"), updated, "config after an update");
    assert!(kv.list_buckets().await.expect("list buckets").contains(&bucket), "list_buckets misses {bucket}");

    for history in [0, 65] {
        let bad = BucketConfig { history, ..BucketConfig::default() };
        assert_err!(kv.create_bucket(&bucket, bad).await, BackendError::Invalid { .. }, format!("history {history}"));
    }
    assert_err!(kv.create_bucket("bad name", BucketConfig::default()).await, BackendError::Invalid { .. }, "bucket with a space");
    assert_err!(kv.get("bad.name", "a").await, BackendError::Invalid { .. }, "bucket with a dot");
    assert_err!(kv.put(&bucket, "a b", b"1").await, BackendError::Invalid { .. }, "key with a space");
    assert_err!(kv.put(&bucket, ".a", b"1").await, BackendError::Invalid { .. }, "key starting with a dot");
    assert_err!(kv.get(&bucket, "a.*").await, BackendError::Invalid { .. }, "wildcard key in get");
    assert_err!(kv.watch(&bucket, "a b").await, BackendError::Invalid { .. }, "watch pattern with a space");

    let key = "container/web/tag";
    let first = kv.put(&bucket, key, b"v1").await.expect("put");
    let second = kv.put(&bucket, key, b"v2").await.expect("put again");
    assert!(second > first, "revisions must increase: {first} then {second}");
    let latest = kv.get(&bucket, key).await.expect("get").expect("a value after put");
    assert_entry(&latest, key, "v2", KvOperation::Put, "get after two puts");
    assert_eq!((latest.bucket.as_str(), latest.revision), (bucket.as_str(), second), "get after two puts: {latest:?}");
    assert_eq!(kv.get(&bucket, "never.written").await.expect("get unknown key"), None, "a key never written");

    let other = kv.put(&bucket, "a.first", b"x").await.expect("put another key");
    assert!(other > second, "revisions are bucket-wide: {second} then {other}");
    assert_eq!(kv.keys(&bucket).await.expect("keys"), ["a.first", key], "keys, sorted");

    kv.delete(&bucket, key).await.expect("delete");
    assert_eq!(kv.get(&bucket, key).await.expect("get after delete"), None, "a deleted key");
    assert_eq!(kv.keys(&bucket).await.expect("keys"), ["a.first"], "keys after a delete");
    let all: Vec<(String, Vec<u8>)> = read_all(kv, &bucket).await.expect("read all").into_iter().map(|e| (e.key, e.value)).collect();
    assert_eq!(all, [("a.first".to_string(), b"x".to_vec())], "read_all: current values only");
    let again = kv.put(&bucket, key, b"v3").await.expect("put after delete");
    assert!(again > other, "a put after a delete gets a new revision");

    // Compare-and-set: a write that raced another one is refused, never lost.
    let cas = "cas/claim";
    assert_err!(kv.update(&bucket, cas, b"x", Some(again)).await, BackendError::Conflict { .. }, "update of a key never written");
    let made = kv.update(&bucket, cas, b"1", None).await.expect("create a key without a value");
    assert_err!(kv.update(&bucket, cas, b"x", None).await, BackendError::Conflict { .. }, "create of a key that holds a value");
    let changed = kv.update(&bucket, cas, b"2", Some(made)).await.expect("update at the revision read");
    assert!(changed > made, "a new revision: {made} then {changed}");
    assert_err!(kv.update(&bucket, cas, b"x", Some(made)).await, BackendError::Conflict { .. }, "update at a stale revision");
    let raced = kv.put(&bucket, cas, b"3").await.expect("another writer's put");
    assert_err!(kv.update(&bucket, cas, b"x", Some(changed)).await, BackendError::Conflict { .. }, "update after another's put");
    assert_entry(&kv.get(&bucket, cas).await.expect("get").expect("a value"), cas, "3", KvOperation::Put, "refused updates wrote nothing");
    kv.delete(&bucket, cas).await.expect("delete");
    assert_err!(kv.update(&bucket, cas, b"x", Some(raced)).await, BackendError::Conflict { .. }, "update of a deleted key");
    kv.update(&bucket, cas, b"4", None).await.expect("create over a deleted key");
    assert_err!(kv.update("NoSuchBucketHere", cas, b"x", None).await, BackendError::NoBucket(_), "update in a missing bucket");

    kv.delete_bucket(&bucket).await.expect("delete the bucket");
    assert!(!kv.list_buckets().await.expect("list buckets").contains(&bucket), "a deleted bucket is still listed");
    assert_err!(kv.get(&bucket, key).await, BackendError::NoBucket(_), "get from a deleted bucket");

    watch_suite(kv).await;
    ttl_suite(kv).await;
}

async fn watch_suite(kv: &dyn Kv) {
    let bucket = unique("conformance_watch");
    kv.create_bucket(&bucket, BucketConfig::default()).await.expect("create the watch bucket");
    for (key, value) in
        [("lon.web.tag", "w1"), ("par.web.tag", "p1"), ("lon.db.tag", "d1"), ("lon.gone.tag", "g1"), ("container/web/tag", "c1")]
    {
        kv.put(&bucket, key, value.as_bytes()).await.expect("put before watching");
    }
    kv.delete(&bucket, "lon.gone.tag").await.expect("delete before watching");

    let mut lon = kv.watch(&bucket, "lon.*.tag").await.expect("watch a pattern");
    let mut exact = kv.watch(&bucket, "container/web/tag").await.expect("watch one key");

    let web = next(&mut lon, "first initial value").await;
    assert_entry(&web, "lon.web.tag", "w1", KvOperation::Put, "first initial value, in revision order");
    let db = next(&mut lon, "second initial value").await;
    assert_entry(&db, "lon.db.tag", "d1", KvOperation::Put, "second initial value (deleted and unmatched keys skipped)");
    let container = next(&mut exact, "initial value of an exact key").await;
    assert_entry(&container, "container/web/tag", "c1", KvOperation::Put, "initial value of an exact key");

    kv.put(&bucket, "par.web.tag", b"p2").await.expect("put an unmatched key");
    kv.put(&bucket, "lon.web.tag", b"w2").await.expect("put a matched key");
    kv.delete(&bucket, "lon.db.tag").await.expect("delete a matched key");
    kv.put(&bucket, "container/web/tag", b"c2").await.expect("put the exact key");

    let put = next(&mut lon, "live put").await;
    assert_entry(&put, "lon.web.tag", "w2", KvOperation::Put, "live put after the initial values");
    let deleted = next(&mut lon, "live delete").await;
    assert_entry(&deleted, "lon.db.tag", "", KvOperation::Delete, "live delete");
    assert!(db.revision < put.revision && put.revision < deleted.revision, "watch revisions out of order");
    let container = next(&mut exact, "live put of an exact key").await;
    assert_entry(&container, "container/web/tag", "c2", KvOperation::Put, "live put of an exact key");

    kv.delete_bucket(&bucket).await.expect("delete the watch bucket");
    match timeout(PROMPTLY, lon.next()).await {
        Ok(None) => {}
        Ok(Some(entry)) => panic!("watch after its bucket was deleted: got {entry:?}, expected the end"),
        Err(_) => panic!("watch did not end within {PROMPTLY:?} of its bucket being deleted"),
    }
}

async fn ttl_suite(kv: &dyn Kv) {
    let bucket = unique("conformance_ttl");
    let config = BucketConfig { history: 1, ttl: Some(Duration::from_secs(1)), replicas: 1 };
    kv.create_bucket(&bucket, config).await.expect("create a bucket with a TTL");
    kv.put(&bucket, "short.lived", b"x").await.expect("put into a TTL bucket");
    assert!(kv.get(&bucket, "short.lived").await.expect("get").is_some(), "a fresh value vanished");
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(kv.get(&bucket, "short.lived").await.expect("get after the TTL"), None, "a value outlived its TTL");
    assert!(kv.keys(&bucket).await.expect("keys after the TTL").is_empty(), "keys lists an expired value");
    kv.delete_bucket(&bucket).await.expect("delete the TTL bucket");
}

/// Slots, waiting, release, expiry, eviction, capacity changes, reset and removal.
pub async fn governor_suite(g: &dyn Governor) {
    let name = unique("conformance_gov");
    let short = Duration::from_millis(300);

    assert_err!(g.acquire(&name, "a", PROMPTLY).await, BackendError::NoGovernor(_), "acquire from a missing governor");
    assert_err!(g.view(&name).await, BackendError::NoGovernor(_), "view a missing governor");

    g.add(&name, 2, Duration::ZERO, 1).await.expect("add a governor");
    let a = g.acquire(&name, "holder a", short).await.expect("first slot");
    let b = g.acquire(&name, "holder b", short).await.expect("second slot");
    assert!(b.seq > a.seq, "lease seqs must increase: {a:?} then {b:?}");
    let started = Instant::now();
    assert_err!(g.acquire(&name, "holder c", short).await, BackendError::GovernorTimeout(..), "acquire from a full governor");
    assert!(started.elapsed() >= short - Duration::from_millis(50), "a full governor gave up before the timeout");

    let info = g.view(&name).await.expect("view");
    assert_eq!((info.capacity, info.expire, info.replicas), (2, Duration::ZERO, 1), "governor settings: {info:?}");
    let holders: Vec<_> = info.leases.iter().map(|l| (l.seq, l.holder.as_str())).collect();
    assert_eq!(holders, [(a.seq, "holder a"), (b.seq, "holder b")], "leases in view");
    assert!(g.holds(&a).await.expect("holds"), "a held lease is not held");

    // A waiter gets the slot a release frees, long before its own timeout.
    let started = Instant::now();
    let release_later = async {
        sleep(Duration::from_millis(200)).await;
        g.release(&a).await.expect("release");
    };
    let (c, ()) = tokio::join!(g.acquire(&name, "holder c", PROMPTLY * 2), release_later);
    let c = c.expect("acquire once a slot is released");
    assert!(started.elapsed() < PROMPTLY, "a waiter took {:?} to get a released slot", started.elapsed());
    assert!(!g.holds(&a).await.expect("holds"), "a released lease is still held");
    assert_err!(g.release(&a).await, BackendError::NoLease { .. }, "release twice");

    let evicted = g.evict(&name, b.seq).await.expect("evict");
    assert_eq!((evicted.seq, evicted.holder.as_str()), (b.seq, "holder b"), "the evicted lease");
    assert!(!g.holds(&b).await.expect("holds"), "an evicted lease is still held");
    assert_err!(g.evict(&name, b.seq).await, BackendError::NoLease { .. }, "evict twice");
    assert_err!(g.release(&b).await, BackendError::NoLease { .. }, "release an evicted lease");

    // Lowering the capacity evicts the oldest leases.
    let d = g.acquire(&name, "holder d", short).await.expect("acquire after an eviction");
    g.add(&name, 1, Duration::ZERO, 1).await.expect("lower the capacity");
    assert!(!g.holds(&c).await.expect("holds"), "lowering the capacity kept the oldest lease");
    assert!(g.holds(&d).await.expect("holds"), "lowering the capacity evicted the newest lease");
    assert_eq!(g.view(&name).await.expect("view").leases.len(), 1, "leases after lowering the capacity");

    g.reset(&name).await.expect("reset");
    assert!(g.view(&name).await.expect("view").leases.is_empty(), "reset left leases");
    assert!(!g.holds(&d).await.expect("holds"), "a lease survived a reset");

    // Leases expire, and a waiter gets the slot an expiry frees.
    g.add(&name, 1, Duration::from_secs(1), 1).await.expect("set an expiry");
    let e = g.acquire(&name, "holder e", short).await.expect("acquire with an expiry");
    let f = g.acquire(&name, "holder f", Duration::from_secs(3)).await.expect("acquire once a lease expires");
    assert!(!g.holds(&e).await.expect("holds"), "an expired lease is still held");
    assert!(g.holds(&f).await.expect("holds"), "the lease taken after an expiry");
    let holders: Vec<_> = g.view(&name).await.expect("view").leases.into_iter().map(|l| l.holder).collect();
    assert_eq!(holders, ["holder f"], "view after an expiry");
    assert_err!(g.release(&e).await, BackendError::NoLease { .. }, "release an expired lease");

    assert!(g.list().await.expect("list").contains(&name), "list misses {name}");
    g.remove(&name).await.expect("remove");
    assert!(!g.list().await.expect("list").contains(&name), "a removed governor is still listed");
    assert_err!(g.view(&name).await, BackendError::NoGovernor(_), "view a removed governor");
    assert_err!(g.remove(&name).await, BackendError::NoGovernor(_), "remove twice");
    let gone = Lease { governor: name.clone(), seq: f.seq };
    assert!(!g.holds(&gone).await.expect("holds in a removed governor"), "a lease outlived its governor");
}

/// Events published after subscribing arrive whole and in order.
pub async fn events_suite(e: &dyn Events) {
    let id = unique("conformance");
    let event = |n: u32| TransitionEvent {
        protocol: TRANSITION_PROTOCOL.into(),
        identity: "conformance.example.net".into(),
        id: id.clone(),
        version: "1.0.0".into(),
        timestamp: 1_700_000_000 + i64::from(n),
        machine: "hoist_conformance".into(),
        transition: format!("step{n}"),
        from_state: "RUN".into(),
        to_state: "START".into(),
        detail: (n == 2).then(|| "with detail".into()),
        image: None,
    };
    e.publish(&event(0)).await.expect("publish with no subscriber");

    let mut events = e.subscribe().await.expect("subscribe");
    let sent: Vec<_> = (1..=3).map(event).collect();
    for sent in &sent {
        e.publish(sent).await.expect("publish");
    }
    let mut received = Vec::new();
    while received.len() < sent.len() {
        // A shared server may carry other publishers' events.
        let got = next(&mut events, "published event").await;
        if got.id == id {
            received.push(got);
        }
    }
    assert_eq!(received, sent, "events as received");
}
