//! Human output: tables and summaries. Every command also has `--json`.

use comfy_table::{Table, presets::NOTHING};
use hoist_core::backend::{GovernorInfo, TransitionEvent};
use hoist_core::machine::unix_now;
use hoist_core::registration::ServiceEntry;
use hoist_core::status::{NodeStatus, Summaries};
use std::collections::BTreeMap;

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(header.to_vec());
    t
}

/// `3m12s` style ages.
pub fn age(since_unix: i64) -> String {
    let secs = (unix_now() - since_unix).max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string().replace(' ', "")
}

pub fn status(nodes: &[NodeStatus]) -> String {
    let mut t = table(&["NODE", "NAME", "STATE", "VERSION", "HEALTH", "RESTARTS", "CONTAINER", "UP", "NOTE"]);
    for n in nodes {
        for m in &n.machines {
            let note = m.condition.clone().or_else(|| m.activity.clone()).or_else(|| m.last_error.clone()).unwrap_or_default();
            t.add_row(vec![
                n.node.clone(),
                m.name.clone(),
                m.state.to_string(),
                m.version.clone(),
                format!("{:?}", m.health).to_lowercase(),
                m.restarts.to_string(),
                m.container_id.clone().unwrap_or_else(|| "-".into()),
                m.started.map(age).unwrap_or_else(|| "-".into()),
                note,
            ]);
        }
    }
    let mut out = format!("{t}\n");
    let summaries = Summaries::of(nodes.iter().flat_map(|n| &n.machines));
    for (title, counts) in [("State", &summaries.state), ("Version", &summaries.version), ("Image", &summaries.image)] {
        out.push_str(&summary(title, counts));
    }
    for n in nodes {
        for warning in &n.warnings {
            out.push_str(&format!("\n{}: warning: {warning}\n", n.node));
        }
    }
    for n in nodes.iter().filter(|n| n.config_error.is_some()) {
        out.push_str(&format!(
            "\n{}: the last config reload was refused, still running the previous config:\n{}\n",
            n.node,
            n.config_error.as_deref().unwrap_or_default()
        ));
    }
    out
}

fn summary(title: &str, counts: &BTreeMap<String, usize>) -> String {
    let mut out = format!("\nSummary of {title}:\n");
    for (k, v) in counts {
        out.push_str(&format!("   {k}: {v}\n"));
    }
    out
}

pub fn event(e: &TransitionEvent) -> String {
    let detail = e.detail.as_deref().unwrap_or("");
    format!("{} {} {} {} → {} ({}) {}", e.timestamp, e.identity, e.machine, e.from_state, e.to_state, e.transition, detail)
}

/// `(key, entry)` pairs; the key's last token is the registering machine's instance id.
pub fn services(entries: &[(String, ServiceEntry)]) -> String {
    let mut t = table(&["CLUSTER", "PROTOCOL", "SERVICE", "ADDRESS", "PORT", "PRIORITY", "INSTANCE"]);
    for (key, s) in entries {
        let instance = key.rsplit('.').next().unwrap_or_default();
        t.add_row(vec![
            s.cluster.clone(),
            s.protocol.clone(),
            s.service.clone(),
            s.address.clone(),
            s.port.to_string(),
            s.priority.to_string(),
            instance.to_string(),
        ]);
    }
    format!("{t}\n{} endpoint(s)\n", entries.len())
}

pub fn governor(g: &GovernorInfo) -> String {
    let mut out = format!(
        "Governor {}: capacity {}, expire {}, replicas {}, {} active lease(s)\n",
        g.name,
        g.capacity,
        humantime::format_duration(g.expire),
        g.replicas,
        g.leases.len()
    );
    if !g.leases.is_empty() {
        let mut t = table(&["ID", "HOLDER", "AGE"]);
        for l in &g.leases {
            t.add_row(vec![l.seq.to_string(), l.holder.clone(), age((l.taken_ms / 1000) as i64)]);
        }
        out.push_str(&format!("{t}\n"));
    }
    out
}
