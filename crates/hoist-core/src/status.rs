//! What `hoist status` reports about each machine, and the summaries the original `machine_state`
//! showed (counts by state, version and image).

use crate::fsm::{State, Transition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Passed its health check (Docker HEALTHCHECK and/or hoist's probe).
    Healthy,
    /// Running without any health check for long enough to be trusted; nothing verified it.
    Unverified,
    /// Still inside its start window.
    Starting,
    Unhealthy,
    /// Not running (stopped, missing, or in maintenance with nothing checking).
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// `hoist_<name>`, as Choria names the machine.
    pub name: String,
    /// The key under `containers:`.
    pub container: String,
    pub node: String,
    /// The machine's instance id, new each time the agent loads it.
    pub id: String,
    pub state: State,
    /// The tag or digest the container runs (or will run, while none runs).
    pub version: String,
    /// The image reference the container runs.
    pub image: Option<String>,
    /// The registry digest of what it runs, when known: shows what a moving tag (`latest`) is now.
    #[serde(default)]
    pub digest: Option<String>,
    /// The image reference it should run.
    pub desired_image: String,
    pub container_id: Option<String>,
    /// Unix seconds when the current container started.
    pub started: Option<i64>,
    pub available_transitions: Vec<Transition>,
    pub health: Health,
    /// Containers replaced since the agent first managed this one (survives agent restarts).
    pub restarts: u64,
    pub last_error: Option<String>,
    /// An explicit failed condition, e.g. a crash loop; None when all is well.
    pub condition: Option<String>,
    /// A version this machine rolled back from (or skipped, rolled back elsewhere) and will not try
    /// again until the desired version changes: what a release's outcome reads.
    #[serde(default)]
    pub bad_version: Option<String>,
    /// What the machine is doing or waiting for right now, e.g. "waiting for governor web (capacity 1)".
    pub activity: Option<String>,
    /// Time spent waiting for governor slots since the agent loaded this machine.
    pub governor_wait_seconds: f64,
    /// How long the last update took, from UPDATE until the new container was back in RUN.
    pub last_update_seconds: Option<f64>,
    /// A release's version already fetched ahead of this node's wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_ahead: Option<String>,
    #[serde(flatten)]
    pub report: HealthReport,
    /// The fleet's degraded condition for this container, while it holds: the share and the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// What a node tells the fleet of its container's health: what fleet-degraded mode counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The version it runs has passed its health gate here (it is the last good one), or serves in
    /// RUN: not a version being tried.
    #[serde(default)]
    pub proven: bool,
    /// Unix ms (the agent's clock) since when the container has been unhealthy (its health check or
    /// dependency check failing, dying, missing its gate), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
}

/// A status answer from one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub machines: Vec<MachineStatus>,
    /// The last config reload that was refused, with its errors; the running set was left untouched.
    pub config_error: Option<String>,
    /// Problems with how the node is set up that do not stop it, such as a governor whose slots
    /// expire before an update can finish; rechecked at every load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summaries {
    /// Machines per name (`hoist_web`): across a fleet, how many nodes run each container.
    pub name: BTreeMap<String, usize>,
    pub state: BTreeMap<String, usize>,
    pub version: BTreeMap<String, usize>,
    pub image: BTreeMap<String, usize>,
}

impl Summaries {
    pub fn of<'a>(machines: impl IntoIterator<Item = &'a MachineStatus>) -> Summaries {
        let mut s = Summaries::default();
        for m in machines {
            *s.name.entry(m.name.clone()).or_default() += 1;
            *s.state.entry(m.state.to_string()).or_default() += 1;
            *s.version.entry(m.version.clone()).or_default() += 1;
            let image = m.image.clone().unwrap_or_else(|| "(none)".into());
            *s.image.entry(image).or_default() += 1;
        }
        s
    }
}

impl MachineStatus {
    /// The version as the table shows it: a tag with the digest it resolved to, which tells two
    /// nodes on `latest` apart.
    pub fn version_shown(&self) -> String {
        match &self.digest {
            Some(digest) if !self.version.starts_with("sha256:") => {
                let short: String = digest.strip_prefix("sha256:").unwrap_or(digest).chars().take(12).collect();
                format!("{}@{short}", self.version)
            }
            _ => self.version.clone(),
        }
    }

    /// What the table's NOTE says: the fleet's degraded condition, the machine's (a crash loop, a
    /// rollback), a failing check, and what the machine is doing, each with the last error when that is what explains it ("crash-looping" alone does
    /// not say that the port is taken).
    pub fn note(&self) -> String {
        let mut parts: Vec<String> = [&self.degraded, &self.condition, &self.activity].into_iter().flatten().cloned().collect();
        // A failing dependency check says so here, as nothing else does (it restarts nothing).
        if let Some(why) = &self.report.unhealthy
            && self.last_error.as_ref().is_none_or(|e| !why.contains(e.as_str()))
        {
            parts.push(format!("unhealthy: {why}"));
        }
        if let Some(error) = &self.last_error
            && !parts.iter().any(|p| p.contains(error.as_str()))
        {
            parts.push(if parts.is_empty() { error.clone() } else { format!("last error: {error}") });
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineStatus {
        MachineStatus {
            name: "hoist_web".into(),
            container: "web".into(),
            node: "n1".into(),
            id: "1".into(),
            state: State::Restart,
            version: "latest".into(),
            image: Some("r/app:latest".into()),
            digest: Some("sha256:0123456789abcdef".into()),
            desired_image: "r/app:latest".into(),
            container_id: None,
            started: None,
            available_transitions: vec![],
            health: Health::Down,
            restarts: 5,
            last_error: Some("starting web: port is already allocated".into()),
            condition: Some("crash-looping: 5 failures in the last 5m".into()),
            bad_version: None,
            activity: None,
            governor_wait_seconds: 0.0,
            last_update_seconds: None,
            fetched_ahead: None,
            report: HealthReport { proven: true, ..Default::default() },
            degraded: None,
        }
    }

    #[test]
    fn the_note_gives_the_cause_with_the_condition() {
        let m = machine();
        assert_eq!(m.note(), "crash-looping: 5 failures in the last 5m; last error: starting web: port is already allocated");
        let pulling = MachineStatus {
            condition: None,
            activity: Some("retrying the pull in 4 s".into()),
            last_error: Some("pull of r/app:v9 failed: not found".into()),
            ..m.clone()
        };
        assert_eq!(pulling.note(), "retrying the pull in 4 s; last error: pull of r/app:v9 failed: not found");
        let said = MachineStatus {
            activity: Some("waiting (backend down); trying again".into()),
            condition: None,
            last_error: Some("backend down".into()),
            ..m.clone()
        };
        assert_eq!(said.note(), "waiting (backend down); trying again", "an error already told is not repeated");
        let only_error = MachineStatus { condition: None, activity: None, ..m.clone() };
        assert_eq!(only_error.note(), "starting web: port is already allocated");
        let fine = MachineStatus { condition: None, activity: None, last_error: None, ..m };
        assert_eq!(fine.note(), "");
    }

    #[test]
    fn a_tag_shows_the_digest_it_resolved_to() {
        let m = machine();
        assert_eq!(m.version_shown(), "latest@0123456789ab");
        let pinned = MachineStatus { version: "sha256:0123456789abcdef".into(), ..m.clone() };
        assert_eq!(pinned.version_shown(), "sha256:0123456789abcdef", "a digest is not repeated");
        let imported = MachineStatus { digest: None, ..m };
        assert_eq!(imported.version_shown(), "latest");
    }
}
