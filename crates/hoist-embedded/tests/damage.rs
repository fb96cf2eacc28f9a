//! The store never loses data silently: a damaged or truncated file is an error that names it and
//! says what to do, a first start cannot leave a half-made file behind, and a full disk stops writes
//! only until space is freed. The disk-full tests mount small tmpfs file systems, so they need root.

use hoist_core::backend::{BackendError, BucketConfig, Governor, Kv};
use hoist_core::health::Conditions;
use hoist_embedded::EmbeddedStore;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ADVICE: &str = "restore it from a backup, or move it away to start with an empty store";

/// A store holding one HOIST value and a governor, closed again.
async fn written_store(path: &Path) {
    let store = EmbeddedStore::open(path).expect("open");
    store.create_bucket("HOIST", BucketConfig::default()).await.expect("bucket");
    store.put("HOIST", "container/web/tag", b"v2").await.expect("put");
    store.add("restart", 1, Duration::from_secs(60), 1).await.expect("governor");
}

fn refusal(path: &Path) -> String {
    match EmbeddedStore::open(path) {
        Err(BackendError::Unavailable(reason)) => reason,
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("{} opened although it is damaged", path.display()),
    }
}

#[tokio::test]
async fn an_empty_or_truncated_store_is_an_error_naming_the_file_never_a_fresh_store() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.redb");
    written_store(&good).await;
    let size = std::fs::metadata(&good).unwrap().len();
    for keep in [0, 512, 4096, size / 2, size - 1] {
        let path = dir.path().join(format!("hoist-{keep}.redb"));
        std::fs::copy(&good, &path).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(keep).unwrap();
        let reason = refusal(&path);
        assert!(reason.contains(&path.display().to_string()) && reason.contains(ADVICE), "truncated to {keep}: {reason}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), keep, "the damaged file is left as it was");
    }
}

/// Bytes overwritten across the file, as a bad disk or a stray write would: opening must not panic,
/// and a store that does open must still hold the value or fail to read it, not answer "no value".
#[tokio::test]
async fn corruption_is_an_error_never_a_panic_or_a_missing_value() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.redb");
    written_store(&good).await;
    let image = std::fs::read(&good).unwrap();
    let len = image.len();
    let mut damages: Vec<(String, Vec<u8>)> = Vec::new();
    for at in [0, 8, 64, 200, 512, 1024, 2048, 4096, 4100, 8192, 12288, len / 3, len / 2, (len * 3) / 4, len - 4096, len - 16] {
        let mut bytes = image.clone();
        bytes[at..(at + 16).min(len)].iter_mut().for_each(|b| *b ^= 0xa5);
        damages.push((format!("16 bytes flipped at {at}"), bytes));
    }
    for page in [0, 1, 2, 3, len / 4096 - 1] {
        let mut bytes = image.clone();
        bytes[page * 4096..((page + 1) * 4096).min(len)].fill(0);
        damages.push((format!("page {page} zeroed"), bytes));
    }
    let mut refused = 0;
    for (n, (what, bytes)) in damages.iter().enumerate() {
        let path = dir.path().join(format!("damaged-{n}.redb"));
        std::fs::write(&path, bytes).unwrap();
        match EmbeddedStore::open(&path) {
            Err(BackendError::Unavailable(reason)) => {
                assert!(reason.contains(&path.display().to_string()) && reason.contains(ADVICE), "{what}: {reason}");
                refused += 1;
            }
            Err(other) => panic!("{what}: expected Unavailable, got {other}"),
            Ok(store) => match store.get("HOIST", "container/web/tag").await {
                Ok(Some(entry)) => assert_eq!(entry.value_str(), "v2", "{what}"),
                Ok(None) => panic!("{what}: the store opened and silently lost the value"),
                Err(_) => {}
            },
        }
    }
    assert!(refused > damages.len() / 2, "most damage is caught when opening ({refused} of {})", damages.len());
}

#[tokio::test]
async fn an_unopenable_store_answers_every_call_with_why_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoist.redb");
    std::fs::write(&path, b"").unwrap();
    let conditions = Conditions::default();
    let store = EmbeddedStore::open_or_unavailable(&path, conditions.clone());
    let [condition] = conditions.list().try_into().expect("one condition");
    assert!(condition.starts_with("store: ") && condition.contains("hoist.redb") && condition.contains(ADVICE), "{condition}");
    for err in [
        store.get("HOIST", "container/web/tag").await.map(drop).unwrap_err(),
        store.put("HOIST", "container/web/tag", b"v1").await.map(drop).unwrap_err(),
        store.create_bucket("HOIST", BucketConfig::default()).await.unwrap_err(),
        store.view("restart").await.map(drop).unwrap_err(),
        store.acquire("restart", "web", Duration::from_secs(1)).await.map(drop).unwrap_err(),
    ] {
        assert!(matches!(&err, BackendError::Unavailable(r) if r.contains(ADVICE)), "{err}");
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "nothing was written over the file");
}

#[tokio::test]
async fn the_store_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoist.redb");
    written_store(&path).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    // A file an older agent left readable by everyone is tightened.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(EmbeddedStore::open(&path).unwrap());
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test]
async fn an_unfinished_store_left_by_a_crashed_first_start_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoist.redb");
    let unfinished = dir.path().join("hoist.redb.creating");
    std::fs::write(&unfinished, b"half a store").unwrap();
    let store = EmbeddedStore::open(&path).expect("a new store");
    assert!(!unfinished.exists());
    store.create_bucket("HOIST", BucketConfig::default()).await.unwrap();
    store.put("HOIST", "k", b"v").await.unwrap();
}

/// A tmpfs of `kib` KiB, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(kib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"]).arg(dir.path()).status().unwrap();
        assert!(ok.success(), "mounting a tmpfs needs root");
        SmallDisk(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Fills what space is left with one file.
    fn fill(&self) -> PathBuf {
        let filler = self.path("filler");
        let _ = Command::new("dd").args(["if=/dev/zero", "bs=4k"]).arg(format!("of={}", filler.display())).output().unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test]
async fn a_first_start_on_a_full_disk_leaves_nothing_that_blocks_the_next() {
    let disk = SmallDisk::mount(1024);
    let path = disk.path("hoist.redb");
    let filler = disk.fill();
    let reason = refusal(&path);
    assert!(reason.contains("hoist.redb") && reason.contains("No space left"), "{reason}");
    assert!(!path.exists() && !disk.path("hoist.redb.creating").exists(), "no half-made store is left");

    std::fs::remove_file(filler).unwrap();
    let store = EmbeddedStore::open(&path).expect("opens once there is space");
    store.create_bucket("HOIST", BucketConfig::default()).await.unwrap();
    store.put("HOIST", "k", b"v").await.unwrap();
}

#[tokio::test]
async fn writes_fail_visibly_on_a_full_disk_and_recover_once_space_is_freed() {
    let disk = SmallDisk::mount(16 * 1024);
    let path = disk.path("hoist.redb");
    let conditions = Conditions::default();
    let store = EmbeddedStore::open_reporting(&path, conditions.clone()).unwrap();
    store.create_bucket("HOIST", BucketConfig::default()).await.unwrap();
    store.put("HOIST", "container/web/tag", b"v2").await.unwrap();

    let filler = disk.fill();
    let big = vec![b'x'; 1024 * 1024];
    let err = store.put("HOIST", "big", &big).await.expect_err("no space for a write");
    assert!(err.to_string().contains("No space left"), "{err}");
    let [condition] = conditions.list().try_into().expect("the store reports itself failing");
    assert!(condition.starts_with("store: ") && condition.contains("hoist.redb") && condition.contains("free space"), "{condition}");
    assert!(store.put("HOIST", "small", b"1").await.is_err(), "still failing while the disk is full");

    std::fs::remove_file(filler).unwrap();
    store.put("HOIST", "big", &big).await.expect("writes resume once space is freed");
    assert_eq!(conditions.list(), Vec::<String>::new(), "the condition clears");
    assert_eq!(store.get("HOIST", "container/web/tag").await.unwrap().unwrap().value_str(), "v2", "nothing was lost");
}
