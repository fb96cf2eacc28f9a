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
    /// What the machine is doing or waiting for right now, e.g. "waiting for governor web (capacity 1)".
    pub activity: Option<String>,
    /// Time spent waiting for governor slots since the agent loaded this machine.
    pub governor_wait_seconds: f64,
    /// How long the last update took, from UPDATE until the new container was back in RUN.
    pub last_update_seconds: Option<f64>,
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
    pub state: BTreeMap<String, usize>,
    pub version: BTreeMap<String, usize>,
    pub image: BTreeMap<String, usize>,
}

impl Summaries {
    pub fn of<'a>(machines: impl IntoIterator<Item = &'a MachineStatus>) -> Summaries {
        let mut s = Summaries::default();
        for m in machines {
            *s.state.entry(m.state.to_string()).or_default() += 1;
            *s.version.entry(m.version.clone()).or_default() += 1;
            let image = m.image.clone().unwrap_or_else(|| "(none)".into());
            *s.image.entry(image).or_default() += 1;
        }
        s
    }
}
