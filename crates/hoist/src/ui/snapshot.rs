//! What the page shows at one moment, built from what the agents answered: one row per node and
//! container, the governors' slots, the nodes that did not answer, and the counts the chart plots.

use hoist_core::backend::GovernorInfo;
use hoist_core::fsm::State;
use hoist_core::presence::NodeSeen;
use hoist_core::status::NodeStatus;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// `node` (one agent, through its control socket) or `fleet` (every agent, through NATS).
    pub scope: &'static str,
    /// Unix milliseconds when it was gathered.
    pub taken_ms: u64,
    pub rows: Vec<Row>,
    pub governors: Vec<Slots>,
    /// Nodes that announced themselves but did not answer (fleet only).
    pub missing: Vec<NodeSeen>,
    /// `node: warning` lines: refused config reloads and the nodes' own warnings.
    pub warnings: Vec<String>,
    /// Containers in service per version, and those being replaced: what the rollout chart plots
    /// over time, as the benchmark's rollout plot does (`in_service`).
    pub in_service: BTreeMap<String, usize>,
    pub replacing: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub node: String,
    pub container: String,
    pub state: State,
    pub version: String,
    pub health: String,
    /// What keeps it from RUN on its version, if anything: its condition (a crash loop, a rollback)
    /// or what it is waiting for (a governor slot, the runtime).
    pub blocking: Option<String>,
    /// The last error, kept after it has passed.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Slots {
    pub name: String,
    pub used: usize,
    pub capacity: u64,
    pub holders: Vec<String>,
}

impl Snapshot {
    pub fn build(
        scope: &'static str,
        taken_ms: u64,
        nodes: &[NodeStatus],
        governors: &[GovernorInfo],
        missing: Vec<NodeSeen>,
        mut warnings: Vec<String>,
    ) -> Snapshot {
        let mut rows = Vec::new();
        let (mut in_service, mut replacing) = (BTreeMap::new(), 0);
        for n in nodes {
            for m in &n.machines {
                match m.state {
                    // In UPDATE the old container serves on while the new version is pulled.
                    State::Run | State::Update => *in_service.entry(m.version.clone()).or_default() += 1,
                    State::Start | State::Restart => replacing += 1,
                    // Taken out of service by an operator: in neither line.
                    State::Stop | State::Maintenance => {}
                }
                rows.push(Row {
                    node: n.node.clone(),
                    container: m.container.clone(),
                    state: m.state,
                    version: m.version.clone(),
                    health: serde_json::to_value(m.health).ok().and_then(|h| h.as_str().map(str::to_string)).unwrap_or_default(),
                    blocking: m.condition.clone().or_else(|| m.activity.clone()),
                    note: m.last_error.clone(),
                });
            }
            warnings.extend(n.warnings.iter().map(|w| format!("{}: {w}", n.node)));
            if let Some(e) = &n.config_error {
                warnings.push(format!("{}: the last config reload was refused: {e}", n.node));
            }
        }
        rows.sort_by(|a, b| (&a.node, &a.container).cmp(&(&b.node, &b.container)));
        let governors = governors
            .iter()
            .map(|g| Slots {
                name: g.name.clone(),
                used: g.leases.len(),
                capacity: g.capacity,
                holders: g.leases.iter().map(|l| l.holder.clone()).collect(),
            })
            .collect();
        Snapshot { scope, taken_ms, rows, governors, missing, warnings, in_service, replacing }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoist_core::backend::LeaseInfo;
    use std::time::Duration;

    fn machine(container: &str, state: &str, version: &str, condition: Option<&str>, activity: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "name": format!("hoist_{container}"), "container": container, "node": "n", "id": "1", "state": state,
            "version": version, "image": null, "desired_image": "x", "container_id": null, "started": null,
            "available_transitions": [], "health": "healthy", "restarts": 0, "last_error": "died (exit 1)",
            "condition": condition, "activity": activity, "governor_wait_seconds": 0.0, "last_update_seconds": null,
        })
    }

    fn node(name: &str, machines: Vec<serde_json::Value>, warnings: &[&str]) -> NodeStatus {
        serde_json::from_value(serde_json::json!({"node": name, "machines": machines, "config_error": null, "warnings": warnings}))
            .expect("a node status")
    }

    #[test]
    fn rows_are_per_node_and_container_and_the_chart_counts_what_serves() {
        let nodes = [
            node(
                "b",
                vec![
                    machine("web", "UPDATE", "v1", None, Some("waiting for governor RG (capacity 1)")),
                    machine("cache", "MAINTENANCE", "v1", None, None),
                ],
                &[],
            ),
            node(
                "a",
                vec![machine("web", "RUN", "v2", None, None), machine("db", "RESTART", "v2", Some("crash-looping"), Some("backing off"))],
                &["store: slow"],
            ),
        ];
        let governors = [GovernorInfo {
            name: "RG".into(),
            capacity: 1,
            expire: Duration::from_secs(60),
            replicas: 1,
            leases: vec![LeaseInfo { seq: 3, holder: "hoist web @ a".into(), taken_ms: 0 }],
        }];
        let s = Snapshot::build("fleet", 7, &nodes, &governors, Vec::new(), vec!["governors: denied".into()]);
        let keys: Vec<_> = s.rows.iter().map(|r| (r.node.as_str(), r.container.as_str())).collect();
        assert_eq!(keys, [("a", "db"), ("a", "web"), ("b", "cache"), ("b", "web")]);
        assert_eq!(s.rows[0].blocking.as_deref(), Some("crash-looping"), "the condition comes before the activity");
        assert_eq!(s.rows[3].blocking.as_deref(), Some("waiting for governor RG (capacity 1)"));
        assert_eq!(s.rows[1].blocking, None);
        assert_eq!(s.rows[1].health, "healthy");
        assert_eq!(s.rows[1].note.as_deref(), Some("died (exit 1)"));
        assert_eq!(
            s.in_service,
            BTreeMap::from([("v1".to_string(), 1), ("v2".to_string(), 1)]),
            "RUN and UPDATE serve, MAINTENANCE does not"
        );
        assert_eq!(s.replacing, 1);
        assert_eq!(s.governors, [Slots { name: "RG".into(), used: 1, capacity: 1, holders: vec!["hoist web @ a".into()] }]);
        assert_eq!(s.warnings, ["governors: denied", "a: store: slow"]);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["rows"][1]["state"], "RUN", "states in the operator's spelling");
    }
}
