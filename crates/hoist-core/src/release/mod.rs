//! Release records: an operator's `hoist release NAME TAG` moves a container's fleet to one image
//! digest, wave by wave, with no control plane.
//!
//! A tag is a name that can move: `v2` pushed again, `latest` after every build. So a release resolves
//! the tag to its registry digest once and records it under `HOIST` key `container/<name>/release`,
//! with what the tag key said before, its policy (canary waves, a bake time, a failure budget), who and
//! when. Every node follows the record (`desired`): the nodes of the waves started so far run exactly
//! that digest, whatever the tag does meanwhile; the others keep what they run. A tag key written
//! after the record (`choria kv put HOIST container/NAME/tag v3`, the seed's way) supersedes it.
//!
//! Nothing leads. Each node records its own outcome (`OUTCOMES_BUCKET`), and every node evaluates the
//! same rule over the record and the outcomes (`waves::next_step`): the first to see that a wave has
//! baked advances it, the first to see the budget exceeded aborts, each by compare-and-set on the
//! record, so the others' attempts are refused and they read the result (`conductor`).

pub mod conductor;
pub mod waves;

use crate::backend::{BackendError, HOIST_BUCKET, Kv, KvEntry, KvOperation};
use crate::spec::ImageVersion;
use serde::{Deserialize, Serialize};
pub use waves::{Budget, Policy, Step, WaveSize};

/// The key of a container's release record in `HOIST`.
pub fn release_key(container: &str) -> String {
    format!("container/{container}/release")
}

/// Where nodes record their outcome of a release: key `<container>.<node>`.
pub const OUTCOMES_BUCKET: &str = "HOIST_OUTCOMES";

pub fn outcome_key(container: &str, node: &str) -> String {
    format!("{container}.{node}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// The fleet is being moved to `digest`, wave by wave.
    Rolling,
    /// Every wave is through and healthy.
    Complete,
    /// Given up (by an operator, or the failure budget): the nodes that ran it go back to `previous`.
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// New for every release (and every resume), so outcomes of an earlier one do not count.
    pub id: String,
    pub container: String,
    /// The repository, e.g. `registry.example.net/team/web`.
    pub image: String,
    /// What the operator asked for.
    pub tag: String,
    /// What `tag` resolved to when the release was made: what every node of a started wave runs.
    pub digest: String,
    /// What the tag key said before the release (None: nothing, the data files' `image_tag`): what the
    /// nodes not in a started wave keep, and what an abort brings the others back to.
    pub previous: Option<String>,
    /// The digest `previous` resolved to when the release was made, when it could be.
    pub previous_digest: Option<String>,
    /// The tag key's revision when the release was made or resumed (None: there was no tag key): a
    /// tag written after it supersedes the release. Not the record's own revision, which moves with
    /// every wave.
    #[serde(default)]
    pub tag_revision: Option<u64>,
    #[serde(default)]
    pub policy: Policy,
    /// The order the nodes get it in, frozen by the first node to act (`waves::plan_for`).
    #[serde(default)]
    pub plan: Option<Vec<String>>,
    /// The index of the latest wave started.
    #[serde(default)]
    pub wave: usize,
    /// The latest wave found through (every node of it has its outcome, within the budget): its bake
    /// has begun, and the next wave's nodes fetch the image ahead of their turn (`fetch_ahead`).
    #[serde(default)]
    pub through: Option<usize>,
    pub state: ReleaseState,
    /// Why it was aborted or how it ended.
    #[serde(default)]
    pub reason: Option<String>,
    /// `user@host` of whoever made (or last changed) the release, `hoist@NODE` for a node's decision.
    pub by: String,
    /// Unix milliseconds, by the writer's clock.
    pub at_ms: u64,
}

impl ReleaseRecord {
    /// Whether `node` should run the release now: it is rolling and `node`'s wave has started.
    pub fn includes(&self, node: &str) -> bool {
        self.state == ReleaseState::Rolling
            && self.plan.as_deref().is_some_and(|plan| waves::wave_of(&self.policy, plan, node) <= self.wave)
    }

    /// How many waves the plan has (1 before it is frozen).
    pub fn waves(&self) -> usize {
        self.plan.as_ref().map_or(1, |plan| self.policy.wave_ends(plan.len()).len())
    }
}

/// A node's outcome of one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub release: String,
    pub node: String,
    pub ok: bool,
    /// Why it failed.
    pub reason: Option<String>,
}

/// The raw tag value `node`'s machine should follow, from the tag key and the release record as the
/// store holds them: the release, unless the tag key was written after it was made (revisions are
/// bucket-wide). None: the data files' tag.
pub fn desired(node: &str, tag: Option<&KvEntry>, record: Option<&ReleaseRecord>) -> Option<String> {
    let tag = tag.filter(|e| e.operation == KvOperation::Put);
    match governing(tag, record) {
        Some(r) => {
            if r.includes(node) || (r.state == ReleaseState::Complete) {
                Some(r.digest.clone())
            } else {
                r.previous.clone()
            }
        }
        None => tag.map(KvEntry::value_str),
    }
}

/// The digest `node` should fetch ahead of its wave: the release's, once the wave before its own is
/// through and baking. Not sooner: a release that fails its canaries is then fetched by no node
/// beyond them. Only the next wave, so the registry serves one wave at a time.
pub fn fetch_ahead(node: &str, tag: Option<&KvEntry>, record: Option<&ReleaseRecord>) -> Option<String> {
    let r = governing(tag.filter(|e| e.operation == KvOperation::Put), record)?;
    let plan = r.plan.as_deref()?;
    let next = (r.state == ReleaseState::Rolling && r.through == Some(r.wave)).then_some(r.wave + 1)?;
    (waves::wave_of(&r.policy, plan, node) == next).then(|| r.digest.clone())
}

/// The release record, unless a tag key written after it supersedes it.
pub fn governing<'r>(tag: Option<&KvEntry>, record: Option<&'r ReleaseRecord>) -> Option<&'r ReleaseRecord> {
    record.filter(|r| tag.is_none_or(|t| t.revision <= r.tag_revision.unwrap_or(0)))
}

/// Why a release could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0} is not a sha256 digest")]
    NotADigest(String),
    #[error("no release of {0} is recorded")]
    NoRelease(String),
    #[error("the release of {container} is {state:?}, so it cannot be {asked}")]
    WrongState { container: String, state: ReleaseState, asked: &'static str },
    #[error("another change to the release of {0} was written meanwhile; look at it (hoist release show {0}) and try again")]
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
    Ok(Some((parse(&entry)?, entry.revision)))
}

pub fn parse(entry: &KvEntry) -> Result<ReleaseRecord, BackendError> {
    serde_json::from_slice(&entry.value).map_err(|e| BackendError::Invalid {
        what: "release record",
        value: entry.key.clone(),
        reason: e.to_string(),
    })
}

/// Records a new release over the one read at `last` (None when there was none).
pub async fn publish(kv: &dyn Kv, record: &ReleaseRecord, last: Option<u64>) -> Result<u64, ReleaseError> {
    if !matches!(ImageVersion::parse(&record.digest), Ok(ImageVersion::Digest(_))) {
        return Err(ReleaseError::NotADigest(record.digest.clone()));
    }
    write(kv, record, last).await
}

/// Aborts the release of `container`: the nodes that run it go back under their governors to what
/// the tag key said before; the nodes it had not reached keep what they run, neither pulling nor
/// restarting.
pub async fn abort(kv: &dyn Kv, container: &str, by: &str, at_ms: u64) -> Result<ReleaseRecord, ReleaseError> {
    change(kv, container, "aborted", |r| {
        (r.state == ReleaseState::Rolling).then(|| ReleaseRecord {
            state: ReleaseState::Aborted,
            reason: Some(format!("aborted by {by}")),
            by: by.into(),
            at_ms,
            ..r
        })
    })
    .await
}

/// Resumes an aborted release where it stopped: the same plan and wave, its failures forgotten (a new
/// id), so the nodes of the started waves try it again; over a tag put since, too.
pub async fn resume(kv: &dyn Kv, container: &str, by: &str, at_ms: u64) -> Result<ReleaseRecord, ReleaseError> {
    let tag_revision = kv.get(HOIST_BUCKET, &crate::backend::tag_key(container)).await?.map(|e| e.revision);
    change(kv, container, "resumed", |r| {
        (r.state == ReleaseState::Aborted).then(|| ReleaseRecord {
            id: crate::machine::uuid_v4(),
            tag_revision,
            state: ReleaseState::Rolling,
            reason: None,
            by: by.into(),
            at_ms,
            ..r
        })
    })
    .await
}

/// Reads the record, applies `to` (None: not allowed from its state) and writes it back by CAS.
async fn change(
    kv: &dyn Kv,
    container: &str,
    asked: &'static str,
    to: impl FnOnce(ReleaseRecord) -> Option<ReleaseRecord>,
) -> Result<ReleaseRecord, ReleaseError> {
    let (record, revision) = current(kv, container).await?.ok_or_else(|| ReleaseError::NoRelease(container.into()))?;
    let state = record.state;
    let changed = to(record).ok_or(ReleaseError::WrongState { container: container.into(), state, asked })?;
    write(kv, &changed, Some(revision)).await?;
    Ok(changed)
}

/// The nodes that report running `container` (their rollout status records): whom a plan orders. A
/// status bucket not created yet holds none.
pub async fn running(kv: &dyn Kv, container: &str) -> Result<Vec<String>, BackendError> {
    let prefix = format!("{container}.");
    let entries = crate::backend::read_all_if_any(kv, crate::rollout_status::STATUS_BUCKET).await?;
    Ok(entries.into_iter().filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_string)).collect())
}

pub(crate) async fn write(kv: &dyn Kv, record: &ReleaseRecord, last: Option<u64>) -> Result<u64, ReleaseError> {
    let value = serde_json::to_vec(record).expect("records serialise");
    kv.update(HOIST_BUCKET, &release_key(&record.container), &value, last).await.map_err(|e| match e {
        BackendError::Conflict { .. } => ReleaseError::Raced(record.container.clone()),
        other => ReleaseError::Backend(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    pub(crate) fn record(state: ReleaseState, plan: Option<&[&str]>, wave: usize) -> ReleaseRecord {
        ReleaseRecord {
            id: "r1".into(),
            container: "web".into(),
            image: "r/web".into(),
            tag: "v2".into(),
            digest: D2.into(),
            previous: Some("v1".into()),
            previous_digest: None,
            tag_revision: Some(5),
            policy: Policy { waves: vec![WaveSize::Nodes(1), WaveSize::Percent(100)], ..Policy::default() },
            plan: plan.map(|p| p.iter().map(|s| s.to_string()).collect()),
            wave,
            through: None,
            state,
            reason: None,
            by: "alice@ops".into(),
            at_ms: 1,
        }
    }

    fn tag(value: &str, revision: u64) -> KvEntry {
        KvEntry {
            bucket: HOIST_BUCKET.into(),
            key: "container/web/tag".into(),
            value: value.into(),
            revision,
            operation: KvOperation::Put,
            created_ms: 0,
        }
    }

    #[test]
    fn each_node_follows_its_wave_and_a_later_tag_supersedes_the_release() {
        let plan = ["a", "b", "c"];
        let wave1 = record(ReleaseState::Rolling, Some(&plan), 0);
        let v1 = tag("v1", 5);
        assert_eq!(desired("a", Some(&v1), Some(&wave1)).as_deref(), Some(D2), "a is the first wave");
        assert_eq!(desired("b", Some(&v1), Some(&wave1)).as_deref(), Some("v1"), "b waits, keeping what it runs");
        assert_eq!(desired("z", Some(&v1), Some(&wave1)).as_deref(), Some("v1"), "a late joiner goes last");
        let unplanned = record(ReleaseState::Rolling, None, 0);
        assert_eq!(desired("a", Some(&v1), Some(&unplanned)).as_deref(), Some("v1"), "nobody before the plan");
        let wave2 = record(ReleaseState::Rolling, Some(&plan), 1);
        assert_eq!(desired("c", Some(&v1), Some(&wave2)).as_deref(), Some(D2));
        let aborted = record(ReleaseState::Aborted, Some(&plan), 0);
        assert_eq!(desired("a", Some(&v1), Some(&aborted)).as_deref(), Some("v1"), "back to what the tag said");
        let complete = record(ReleaseState::Complete, Some(&plan), 1);
        assert_eq!(desired("z", None, Some(&complete)).as_deref(), Some(D2), "once complete, newcomers too");
        // The seed's way: a tag written after the release wins.
        assert_eq!(desired("a", Some(&tag("v3", 10)), Some(&wave1)).as_deref(), Some("v3"));
        assert_eq!(desired("a", None, None), None, "nothing at all: the data files' tag");
        let without_previous = ReleaseRecord { previous: None, ..aborted };
        assert_eq!(desired("a", None, Some(&without_previous)), None);
    }

    #[test]
    fn only_the_next_wave_fetches_ahead_and_only_once_the_current_one_is_through() {
        let plan = ["a", "b", "c", "d"];
        let policy = Policy { waves: vec![WaveSize::Nodes(1), WaveSize::Nodes(2), WaveSize::Percent(100)], ..Policy::default() };
        let rolling = ReleaseRecord { policy, ..record(ReleaseState::Rolling, Some(&plan), 0) };
        let v1 = tag("v1", 5);
        let ahead = |node: &str, r: &ReleaseRecord| fetch_ahead(node, Some(&v1), Some(r));
        assert_eq!(ahead("b", &rolling), None, "the canary is not through: nobody beyond it fetches");
        let baking = ReleaseRecord { through: Some(0), ..rolling.clone() };
        assert_eq!(ahead("b", &baking).as_deref(), Some(D2), "b is the next wave");
        assert_eq!(
            (ahead("a", &baking), ahead("c", &baking), ahead("z", &baking)),
            (None, None, None),
            "not the wave running it, nor later ones"
        );
        let second = ReleaseRecord { wave: 1, ..baking.clone() };
        assert_eq!(ahead("c", &second), None, "the mark is of an earlier wave");
        let second_through = ReleaseRecord { through: Some(1), ..second };
        assert_eq!(
            (ahead("c", &second_through).as_deref(), ahead("z", &second_through).as_deref()),
            (Some(D2), Some(D2)),
            "the last wave, newcomers too"
        );
        assert_eq!(
            ahead("b", &ReleaseRecord { state: ReleaseState::Aborted, ..baking.clone() }),
            None,
            "an aborted release is fetched by nobody"
        );
        assert_eq!(fetch_ahead("b", Some(&tag("v3", 10)), Some(&baking)), None, "a later tag supersedes the release");
    }

    #[test]
    fn the_record_reads_as_an_operator_would_write_it() {
        let json = serde_json::to_value(record(ReleaseState::Rolling, Some(&["a"]), 0)).unwrap();
        assert_eq!(json["state"], "rolling");
        assert_eq!(json["policy"]["waves"], serde_json::json!([{"nodes": 1}, {"percent": 100}]));
        assert_eq!(json["policy"]["bake"], "0s");
        assert_eq!(release_key("web"), "container/web/release");
    }
}
