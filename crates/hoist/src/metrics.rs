//! Prometheus metrics, rendered at scrape time from the machines' status: the actors stay the only
//! owners of their state, and a scrape costs one status round-trip.

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
    registry.register("machine_state", "1 for the state each container's machine is in", state.clone());
    registry.register("container_healthy", "1 when the container passes its health gate (or runs unverified)", healthy.clone());
    registry.register("container_restarts", "Containers replaced since hoist first managed this one", restarts.clone());
    registry.register("governor_wait_seconds", "Time spent waiting for governor slots", governor_wait.clone());
    registry.register("last_update_seconds", "Duration of the last update, from UPDATE until RUN", update_seconds.clone());
    registry.register("config_refused", "1 when the last config reload was refused", config_refused.clone());
    registry.register("node_condition", "1 while a dependency of the node (the store, NATS) reports a problem", condition.clone());
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
