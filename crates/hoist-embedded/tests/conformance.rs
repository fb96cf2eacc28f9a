use hoist_core::backend::{BackendError, BucketConfig, Governor, Kv};
use hoist_core::conformance;
use hoist_embedded::EmbeddedStore;
use std::time::Duration;

fn open_temp() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("state/hoist.redb")).expect("open the store");
    (dir, store)
}

#[tokio::test]
async fn kv_conforms() {
    let (_dir, store) = open_temp();
    conformance::kv_suite(&store).await;
}

#[tokio::test]
async fn governor_conforms() {
    let (_dir, store) = open_temp();
    conformance::governor_suite(&store).await;
}

#[tokio::test]
async fn events_conform() {
    let (_dir, store) = open_temp();
    conformance::events_suite(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suites_share_one_store() {
    let (_dir, store) = open_temp();
    tokio::join!(conformance::kv_suite(&store), conformance::governor_suite(&store), conformance::events_suite(&store));
}

#[tokio::test]
async fn data_and_leases_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hoist.redb");
    let store = EmbeddedStore::open(&path).expect("open");
    store.create_bucket("HOIST", BucketConfig::default()).await.expect("create bucket");
    let revision = store.put("HOIST", "container/web/tag", b"v1").await.expect("put");
    store.add("restart", 2, Duration::from_secs(60), 1).await.expect("add governor");
    let lease = store.acquire("restart", "web @ node1", Duration::from_secs(1)).await.expect("acquire");
    drop(store);

    let store = EmbeddedStore::open(&path).expect("reopen");
    let entry = store.get("HOIST", "container/web/tag").await.expect("get").expect("value kept");
    assert_eq!((entry.value_str().as_str(), entry.revision), ("v1", revision));
    assert!(store.put("HOIST", "container/web/tag", b"v2").await.expect("put") > revision, "revisions continue");
    assert!(store.holds(&lease).await.expect("holds"), "the lease survived the restart");
    let next = store.acquire("restart", "db @ node1", Duration::from_secs(1)).await.expect("acquire");
    assert!(next.seq > lease.seq, "lease seqs continue after a restart");
    assert_eq!(store.view("restart").await.expect("view").expire, Duration::from_secs(60));
}

/// redb locks the whole file while a database is open, which also holds within one process.
#[tokio::test]
async fn a_second_open_fails_clearly() {
    let (dir, _store) = open_temp();
    match EmbeddedStore::open(&dir.path().join("state/hoist.redb")) {
        Err(BackendError::Unavailable(reason)) => {
            assert!(reason.contains("hoist.redb") && reason.contains("another hoist agent"), "unclear error: {reason}")
        }
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("a second open of a locked store succeeded"),
    }
}

#[tokio::test]
async fn open_reports_an_unusable_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").expect("write");
    assert!(matches!(EmbeddedStore::open(&file.join("hoist.redb")), Err(BackendError::Unavailable(_))));
}

/// A watch that falls further behind than the change channel holds reads the gap from the file, so
/// it still sees every change once, in order.
#[tokio::test]
async fn a_lagging_watch_misses_nothing() {
    use futures_util::StreamExt;
    let (_dir, store) = open_temp();
    store.create_bucket("LAG", BucketConfig::default()).await.expect("create bucket");
    let mut watch = store.watch("LAG", ">").await.expect("watch");
    const PUTS: u64 = 1100;
    for n in 0..PUTS {
        store.put("LAG", &format!("key.{n}"), n.to_string().as_bytes()).await.expect("put");
    }
    for n in 0..PUTS {
        let entry = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("in time").expect("an entry");
        assert_eq!((entry.revision, entry.value_str()), (n + 1, n.to_string()), "change {n}");
    }
}
