//! A rollback on one node stops the rollout on the rest of the fleet. The node that rolled back
//! records the version under `HOIST` key `container/<name>/rollback`; a node about to replace its
//! container with that version (having waited its turn at the restart governor) reads the mark and
//! stays on its last good version instead. Without it, capacity 1 on N nodes would try a broken version
//! N times, one after another.
//!
//! A mark applies only to the request that produced it: it carries the revision of the tag key that
//! asked for the version, so putting the key again (even with the same value) is a new request, and an
//! operator's `update` deletes the mark.

use crate::backend::{HOIST_BUCKET, Kv, tag_key};
use crate::backoff::Retry;
use crate::spec::ImageVersion;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The key that carries a container's fleet-wide rollback mark in `HOIST`.
pub fn rollback_key(container: &str) -> String {
    format!("container/{container}/rollback")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackMark {
    /// The version that was rolled back from.
    pub version: String,
    /// Where it failed.
    pub node: String,
    /// Why, as that node reported it.
    pub reason: String,
    /// The revision of the tag key whose value asked for the version.
    pub tag_revision: u64,
}

/// Records that `version`, asked for by the tag key, was rolled back on `node`. Nothing is recorded if
/// the tag key no longer asks for it (the operator has moved on).
pub async fn record(kv: &dyn Kv, container: &str, version: &ImageVersion, node: &str, reason: &str) {
    let mark = |tag_revision| RollbackMark { version: version.to_string(), node: node.into(), reason: reason.into(), tag_revision };
    put_for_request(kv, container, version, &rollback_key(container), "the rollback", mark).await;
}

/// How long a node keeps trying to record a verdict while the store does not answer: a node cut off
/// when it rolled back must still tell the fleet once it is back, or every other node tries the
/// version in turn.
const KEEP_TRYING: Duration = Duration::from_secs(600);

/// Puts the verdict `mark(tag revision)` under `key` while the tag key asks for `version`, retrying
/// while the store does not answer.
async fn put_for_request(kv: &dyn Kv, container: &str, version: &ImageVersion, key: &str, what: &str, mark: impl Fn(u64) -> RollbackMark) {
    let give_up = tokio::time::Instant::now() + KEEP_TRYING;
    let mut retry = Retry::default();
    loop {
        let attempt = async {
            match kv.get(HOIST_BUCKET, &tag_key(container)).await? {
                Some(tag) if asks_for(&tag.value_str(), version) => {
                    kv.put(HOIST_BUCKET, key, &serde_json::to_vec(&mark(tag.revision)).expect("serialises")).await.map(|_| ())
                }
                _ => Ok(()),
            }
        };
        match attempt.await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < give_up => {
                tracing::debug!(container, error = %e, "could not record {what} for the fleet yet; retrying");
                tokio::time::sleep(retry.next_wait()).await;
            }
            Err(e) => return tracing::warn!(container, error = %e, "could not record {what} for the fleet"),
        }
    }
}

/// The mark against `version`, if one applies to the tag key's current request. An unreachable store
/// or an unreadable mark counts as none: the node's own health gate still guards it.
pub async fn find(kv: &dyn Kv, container: &str, version: &ImageVersion) -> Option<RollbackMark> {
    let entry = kv.get(HOIST_BUCKET, &rollback_key(container)).await.ok()??;
    let mark: RollbackMark = serde_json::from_slice(&entry.value).ok()?;
    if !asks_for(&mark.version, version) {
        return None;
    }
    let tag = kv.get(HOIST_BUCKET, &tag_key(container)).await.ok()??;
    (tag.revision == mark.tag_revision).then_some(mark)
}

/// Deletes the mark against `version`, if there is one: an operator wants it tried again.
pub async fn forget(kv: &dyn Kv, container: &str, version: &ImageVersion) {
    let key = rollback_key(container);
    let Ok(Some(entry)) = kv.get(HOIST_BUCKET, &key).await else { return };
    let marked = serde_json::from_slice::<RollbackMark>(&entry.value).is_ok_and(|m| asks_for(&m.version, version));
    if marked && let Err(e) = kv.delete(HOIST_BUCKET, &key).await {
        tracing::warn!(container, error = %e, "could not delete the fleet's rollback mark");
    }
}

/// The key under which the first node to pass its gate with a version records that it did.
pub fn verified_key(container: &str) -> String {
    format!("container/{container}/verified")
}

/// Records that `version`, asked for by the tag key, passed its health gate on `node`: nodes waiting
/// for their turn may fetch it ahead of it. Like a rollback mark, it applies to the tag key's revision.
pub async fn record_verified(kv: &dyn Kv, container: &str, version: &ImageVersion, node: &str) {
    let mark = |tag_revision| RollbackMark {
        version: version.to_string(),
        node: node.into(),
        reason: "passed its health gate".into(),
        tag_revision,
    };
    put_for_request(kv, container, version, &verified_key(container), "the verified version", mark).await;
}

/// Whether a node has passed its gate with `version` for the tag key's current request. Unknown (an
/// unreachable store) counts as not verified: the version is then fetched only by a node trying it.
pub async fn verified(kv: &dyn Kv, container: &str, version: &ImageVersion) -> bool {
    let Ok(Some(entry)) = kv.get(HOIST_BUCKET, &verified_key(container)).await else { return false };
    let Ok(mark) = serde_json::from_slice::<RollbackMark>(&entry.value) else { return false };
    let Ok(Some(tag)) = kv.get(HOIST_BUCKET, &tag_key(container)).await else { return false };
    asks_for(&mark.version, version) && tag.revision == mark.tag_revision
}

fn asks_for(value: &str, version: &ImageVersion) -> bool {
    ImageVersion::parse(value.trim()).is_ok_and(|v| v == *version)
}
