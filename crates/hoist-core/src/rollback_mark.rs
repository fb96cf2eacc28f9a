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
use crate::spec::ImageVersion;
use serde::{Deserialize, Serialize};

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
    let tag = match kv.get(HOIST_BUCKET, &tag_key(container)).await {
        Ok(Some(entry)) if asks_for(&entry.value_str(), version) => entry,
        Ok(_) => return,
        Err(e) => return tracing::warn!(container, error = %e, "could not record the rollback for the fleet"),
    };
    let mark = RollbackMark { version: version.to_string(), node: node.into(), reason: reason.into(), tag_revision: tag.revision };
    let value = serde_json::to_vec(&mark).expect("serialises");
    if let Err(e) = kv.put(HOIST_BUCKET, &rollback_key(container), &value).await {
        tracing::warn!(container, error = %e, "could not record the rollback for the fleet");
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
    let tag = match kv.get(HOIST_BUCKET, &tag_key(container)).await {
        Ok(Some(entry)) if asks_for(&entry.value_str(), version) => entry,
        Ok(_) => return,
        Err(e) => return tracing::debug!(container, error = %e, "could not record the version as verified"),
    };
    let mark = RollbackMark {
        version: version.to_string(),
        node: node.into(),
        reason: "passed its health gate".into(),
        tag_revision: tag.revision,
    };
    if let Err(e) = kv.put(HOIST_BUCKET, &verified_key(container), &serde_json::to_vec(&mark).expect("serialises")).await {
        tracing::debug!(container, error = %e, "could not record the version as verified");
    }
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
