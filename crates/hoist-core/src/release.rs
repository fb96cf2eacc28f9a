//! Release records: an operator's `hoist release NAME TAG` pins the fleet to one image digest.
//!
//! A tag is a name that can move: `v2` pushed again, `latest` after every build. A rollout that takes
//! an hour on `v2` could otherwise run two different builds on one fleet, the nodes updated after the
//! push getting the new one. So a release resolves the tag to its registry digest once, records it
//! under `HOIST` key `container/<name>/release` with what ran before and who asked, and then points
//! the container's tag key at that digest: every node runs exactly that digest, whatever the tag does
//! meanwhile, through the machinery a tag change uses (governors, health gates, the fleet's rollback
//! mark). A tag written the seed's way (`choria kv put HOIST container/NAME/tag v3`) still works and
//! simply supersedes the release.
//!
//! The record is written with compare-and-set, so two operators releasing at once cannot both
//! believe they won: the second is refused and told to look again.

use crate::backend::{BackendError, HOIST_BUCKET, Kv, tag_key};
use crate::spec::ImageVersion;
use serde::{Deserialize, Serialize};

/// The key of a container's release record in `HOIST`.
pub fn release_key(container: &str) -> String {
    format!("container/{container}/release")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// The fleet is being moved to `digest`.
    Rolling,
    /// An operator aborted it: the fleet is moved back to `previous`.
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub container: String,
    /// The repository, e.g. `registry.example.net/team/web`.
    pub image: String,
    /// What the operator asked for.
    pub tag: String,
    /// What `tag` resolved to when the release was made: what every node runs.
    pub digest: String,
    /// What the tag key said before the release (None: nothing, the data files' `image_tag`): what an
    /// abort puts back, so nodes the release had not reached yet are asked for what they run already.
    pub previous: Option<String>,
    /// The digest that `previous` (or, without it, the data files' tag) resolved to when the release
    /// was made, when it could be: what the fleet ran before.
    pub previous_digest: Option<String>,
    pub state: ReleaseState,
    /// `user@host` of whoever made (or last changed) the release.
    pub by: String,
    /// Unix milliseconds, by the releasing machine's clock.
    pub at_ms: u64,
}

/// Why a release could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0} is not a sha256 digest")]
    NotADigest(String),
    #[error("no release of {0} is recorded")]
    NoRelease(String),
    #[error("the release of {container} is already {state:?}")]
    AlreadyDone { container: String, state: ReleaseState },
    #[error("another release of {0} was written meanwhile; look at it (hoist release show {0}) and try again")]
    Raced(String),
    #[error(transparent)]
    Backend(BackendError),
}

impl From<BackendError> for ReleaseError {
    fn from(e: BackendError) -> Self {
        ReleaseError::Backend(e)
    }
}

/// The recorded release of `container` and the record's revision, if there is one.
pub async fn current(kv: &dyn Kv, container: &str) -> Result<Option<(ReleaseRecord, u64)>, ReleaseError> {
    let Some(entry) = kv.get(HOIST_BUCKET, &release_key(container)).await? else { return Ok(None) };
    let record = serde_json::from_slice(&entry.value).map_err(|e| BackendError::Invalid {
        what: "release record",
        value: release_key(container),
        reason: e.to_string(),
    })?;
    Ok(Some((record, entry.revision)))
}

/// Records `record` (over the release read at `last`, None when there was none) and points the tag
/// key at its digest. Returns the tag key's new revision.
pub async fn publish(kv: &dyn Kv, record: &ReleaseRecord, last: Option<u64>) -> Result<u64, ReleaseError> {
    if !matches!(ImageVersion::parse(&record.digest), Ok(ImageVersion::Digest(_))) {
        return Err(ReleaseError::NotADigest(record.digest.clone()));
    }
    write(kv, record, last).await?;
    Ok(kv.put(HOIST_BUCKET, &tag_key(&record.container), record.digest.as_bytes()).await?)
}

/// Aborts the release of `container`: recorded as aborted, and the tag key given back what it said
/// before. Nodes that already run the release go back under their governors; nodes that had not got
/// to it are asked for what they run, so they neither pull nor restart.
pub async fn abort(kv: &dyn Kv, container: &str, by: &str, at_ms: u64) -> Result<ReleaseRecord, ReleaseError> {
    let (record, revision) = current(kv, container).await?.ok_or_else(|| ReleaseError::NoRelease(container.into()))?;
    let aborted = aborted(record, by, at_ms)?;
    write(kv, &aborted, Some(revision)).await?;
    match &aborted.previous {
        Some(value) => kv.put(HOIST_BUCKET, &tag_key(container), value.as_bytes()).await.map(drop)?,
        None => kv.delete(HOIST_BUCKET, &tag_key(container)).await?,
    }
    Ok(aborted)
}

/// `record`, aborted by `by`: only a rolling release can be.
fn aborted(record: ReleaseRecord, by: &str, at_ms: u64) -> Result<ReleaseRecord, ReleaseError> {
    if record.state != ReleaseState::Rolling {
        return Err(ReleaseError::AlreadyDone { container: record.container, state: record.state });
    }
    Ok(ReleaseRecord { state: ReleaseState::Aborted, by: by.into(), at_ms, ..record })
}

async fn write(kv: &dyn Kv, record: &ReleaseRecord, last: Option<u64>) -> Result<u64, ReleaseError> {
    let value = serde_json::to_vec(record).expect("records serialise");
    kv.update(HOIST_BUCKET, &release_key(&record.container), &value, last).await.map_err(|e| match e {
        BackendError::Conflict { .. } => ReleaseError::Raced(record.container.clone()),
        other => ReleaseError::Backend(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn record(previous: Option<&str>, state: ReleaseState) -> ReleaseRecord {
        ReleaseRecord {
            container: "web".into(),
            image: "r/web".into(),
            tag: "v2".into(),
            digest: D2.into(),
            previous: previous.map(str::to_string),
            previous_digest: Some(D1.into()),
            state,
            by: "alice@ops".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn only_a_rolling_release_can_be_aborted() {
        let done = aborted(record(Some("v1"), ReleaseState::Rolling), "bob@ops", 2).expect("aborted");
        assert_eq!((done.state, done.by.as_str(), done.at_ms, done.digest.as_str()), (ReleaseState::Aborted, "bob@ops", 2, D2));
        assert_eq!(done.previous.as_deref(), Some("v1"), "what the tag key goes back to");
        assert!(matches!(aborted(record(Some("v1"), ReleaseState::Aborted), "bob", 2), Err(ReleaseError::AlreadyDone { .. })));
        assert!(aborted(record(None, ReleaseState::Rolling), "bob", 2).is_ok(), "back to the data files' tag");
    }

    #[test]
    fn the_record_reads_as_an_operator_would_write_it() {
        let json = serde_json::to_value(record(Some("v1"), ReleaseState::Rolling)).unwrap();
        assert_eq!(json["state"], "rolling");
        assert_eq!((json["previous"].as_str(), json["previous_digest"].as_str()), (Some("v1"), Some(D1)));
        assert_eq!(release_key("web"), "container/web/release");
    }
}
