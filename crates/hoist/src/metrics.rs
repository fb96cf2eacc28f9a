//! Prometheus metrics, rendered at scrape time from the machines' status: the actors stay the only
//! owners of their state, and a scrape costs one status round-trip.
//!
//! Rendered as OpenMetrics, and as the classic text format (0.0.4) for a scraper that asks only for
//! that one: older Prometheus, Telegraf, many agents.

use hoist_core::fsm::State;
use hoist_core::status::{Health, NodeStatus};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

/// `conditions` are the sources (store, NATS) reporting a problem now.
pub fn render(status: &NodeStatus, conditions: &[&'static str]) -> String {
    let mut registry = Registry::with_prefix("hoist");
    let state = Family::<Labels, Gauge>::default();
    let healthy = Family::<Labels, Gauge>::default();
    let restarts = Family::<Labels, Counter>::default();
    let governor_wait = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let update_seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let config_refused = Gauge::<i64>::default();
    let condition = Family::<Labels, Gauge>::default();
    let unhealthy = Family::<Labels, Gauge>::default();
    let degraded = Family::<Labels, Gauge>::default();
    registry.register("machine_state", "1 for the state each container's machine is in", state.clone());
    registry.register("container_healthy", "1 when the container passes its health gate (or runs unverified)", healthy.clone());
    registry.register("container_restarts", "Containers replaced since hoist first managed this one", restarts.clone());
    registry.register("governor_wait_seconds", "Time spent waiting for governor slots", governor_wait.clone());
    registry.register("last_update_seconds", "Duration of the last update, from UPDATE until RUN", update_seconds.clone());
    registry.register("config_refused", "1 when the last config reload was refused", config_refused.clone());
    registry.register("node_condition", "1 while a dependency of the node (the store, NATS) reports a problem", condition.clone());
    registry.register(
        "container_unhealthy",
        "1 while the container fails its health check or its dependency check (what fleet-degraded mode counts)",
        unhealthy.clone(),
    );
    registry.register(
        "fleet_degraded",
        "1 while the fleet is degraded for the container: a shared outage, so no rollbacks and restarts at the crash backoff",
        degraded.clone(),
    );
    for source in conditions {
        condition.get_or_create(&vec![("source", source.to_string())]).set(1);
    }
    for m in &status.machines {
        let base = || vec![("node", status.node.clone()), ("container", m.container.clone())];
        // Every state is reported, 0 or 1, so a query for one state also sees containers not in it.
        for s in State::ALL {
            let mut with_state = base();
            with_state.push(("state", s.to_string()));
            state.get_or_create(&with_state).set(i64::from(s == m.state));
        }
        healthy.get_or_create(&base()).set(i64::from(matches!(m.health, Health::Healthy | Health::Unverified)));
        restarts.get_or_create(&base()).inc_by(m.restarts);
        unhealthy.get_or_create(&base()).set(i64::from(m.report.unhealthy.is_some()));
        degraded.get_or_create(&base()).set(i64::from(m.degraded.is_some()));
        governor_wait.get_or_create(&base()).inc_by(m.governor_wait_seconds);
        if let Some(s) = m.last_update_seconds {
            update_seconds.get_or_create(&base()).set(s);
        }
    }
    config_refused.set(i64::from(status.config_error.is_some()));
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// The two exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Classic,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format a scraper's `Accept` header prefers: the one of the two with the higher `q`,
    /// OpenMetrics on a tie or when it names neither.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let weight = |wanted: &str| -> f32 {
            accept
                .unwrap_or_default()
                .split(',')
                .filter_map(|range| {
                    let mut parts = range.split(';').map(str::trim);
                    let media = parts.next()?;
                    let q = parts.find_map(|p| p.strip_prefix("q=")).map_or(1.0, |q| q.parse().unwrap_or(0.0));
                    media.eq_ignore_ascii_case(wanted).then_some(q)
                })
                .fold(0.0, f32::max)
        };
        let (open, classic) = (weight("application/openmetrics-text"), weight("text/plain"));
        if classic > open { Format::Classic } else { Format::OpenMetrics }
    }

    /// `openmetrics` (as `render` makes it) in this format.
    pub fn write(self, openmetrics: String) -> String {
        match self {
            Format::OpenMetrics => openmetrics,
            Format::Classic => classic(&openmetrics),
        }
    }
}

/// The classic format names a counter's family by its `_total` sample and has no `# UNIT` or `# EOF`.
fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn the_scrapers_preference_picks_the_format() {
        assert_eq!(Format::negotiate(Some(PROMETHEUS)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")), Format::Classic);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Classic);
        assert_eq!(Format::negotiate(Some("application/openmetrics-text;q=0.2, text/plain;q=0.9")), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::OpenMetrics);
    }

    #[test]
    fn the_classic_format_names_counters_by_their_total() {
        let machine = serde_json::from_value(serde_json::json!({
            "name": "hoist_web", "container": "web", "node": "n1", "id": "1", "state": "RUN", "version": "v1",
            "image": null, "desired_image": "x", "container_id": null, "started": null, "available_transitions": [],
            "health": "healthy", "restarts": 2, "last_error": null, "condition": null, "activity": null,
            "governor_wait_seconds": 0.0, "last_update_seconds": null,
        }))
        .expect("a machine status");
        let status = NodeStatus { node: "n1".into(), machines: vec![machine], config_error: None, warnings: vec![] };
        let open = render(&status, &["nats"]);
        assert!(open.contains("# TYPE hoist_container_restarts counter") && open.ends_with("# EOF\n"), "{open}");
        let text = Format::Classic.write(open);
        assert!(text.contains("# TYPE hoist_container_restarts_total counter"), "{text}");
        assert!(text.contains("# HELP hoist_container_restarts_total Containers replaced"), "{text}");
        assert!(text.contains("# TYPE hoist_machine_state gauge"), "gauges keep their name: {text}");
        assert!(text.contains("hoist_container_restarts_total{node=\"n1\",container=\"web\"} 2"), "{text}");
        assert!(text.contains("hoist_node_condition{source=\"nats\"} 1"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
