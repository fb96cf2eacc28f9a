//! Human output: tables and summaries. Every command also has `--json`.
//!
//! Much of what is shown came from the network or the store (KV values, node names, errors other
//! nodes report), so every value passes through `clean` before it reaches a terminal: forged text must
//! not be able to move the cursor, clear the screen or set the window title. JSON output is escaped
//! by serde already.

use comfy_table::{Table, presets::NOTHING};
use hoist_core::backend::{GovernorInfo, KvEntry, KvOperation, TransitionEvent};
use hoist_core::clock::unix_now;
use hoist_core::registration::ServiceEntry;
use hoist_core::status::{NodeStatus, Summaries};
use std::collections::BTreeMap;

/// `text` with every control character (ESC, CR, BEL, newlines, C1 codes, …) written out as an escape
/// such as `\x1b`, so it prints as one inert line.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `clean` for text of several lines: the line breaks are kept.
pub fn clean_lines(text: &str) -> String {
    text.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

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
            t.add_row(vec![
                clean(&n.node),
                clean(&m.name),
                m.state.to_string(),
                clean(&m.version_shown()),
                format!("{:?}", m.health).to_lowercase(),
                m.restarts.to_string(),
                m.container_id.as_deref().map_or_else(|| "-".into(), clean),
                m.started.map(age).unwrap_or_else(|| "-".into()),
                clean(&m.note()),
            ]);
        }
    }
    let managed = nodes.iter().map(|n| n.machines.len()).sum::<usize>();
    let mut out = if managed == 0 {
        let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
        format!("no containers are managed on {}\n", clean(&names.join(", ")))
    } else {
        format!("{t}\n")
    };
    let summaries = Summaries::of(nodes.iter().flat_map(|n| &n.machines));
    let titles = [("Name", &summaries.name), ("State", &summaries.state), ("Version", &summaries.version), ("Image", &summaries.image)];
    for (title, counts) in titles.into_iter().filter(|_| managed > 0) {
        out.push_str(&summary(title, counts));
    }
    for n in nodes {
        for warning in &n.warnings {
            out.push_str(&format!("\n{}: warning: {}\n", clean(&n.node), clean(warning)));
        }
    }
    for n in nodes.iter().filter(|n| n.config_error.is_some()) {
        out.push_str(&format!(
            "\n{}: the last config reload was refused, still running the previous config:\n{}\n",
            clean(&n.node),
            clean_lines(n.config_error.as_deref().unwrap_or_default())
        ));
    }
    out
}

/// A status answer (one node's, or a fleet's) with the summaries its table shows, for `--json`.
#[derive(serde::Serialize)]
pub struct WithSummaries<'a, T> {
    #[serde(flatten)]
    pub status: &'a T,
    pub summaries: Summaries,
}

impl<'a, T> WithSummaries<'a, T> {
    pub fn new(status: &'a T, nodes: &[&NodeStatus]) -> Self {
        WithSummaries { status, summaries: Summaries::of(nodes.iter().flat_map(|n| &n.machines)) }
    }
}

/// A KV entry as an operator reads it: the value as text, the time it was written as RFC 3339.
#[derive(serde::Serialize)]
pub struct KvEntryView<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    /// Lossy where the bytes are not UTF-8; every value hoist writes is text.
    pub value: String,
    pub revision: u64,
    pub operation: &'a KvOperation,
    pub created: String,
}

impl<'a> From<&'a KvEntry> for KvEntryView<'a> {
    fn from(e: &'a KvEntry) -> Self {
        let created = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.created_ms);
        KvEntryView {
            bucket: &e.bucket,
            key: &e.key,
            value: e.value_str(),
            revision: e.revision,
            operation: &e.operation,
            created: humantime::format_rfc3339_millis(created).to_string(),
        }
    }
}

fn summary(title: &str, counts: &BTreeMap<String, usize>) -> String {
    let mut out = format!("\nSummary of {title}:\n");
    for (k, v) in counts {
        out.push_str(&format!("   {}: {v}\n", clean(k)));
    }
    out
}

pub fn event(e: &TransitionEvent) -> String {
    let detail = e.detail.as_deref().unwrap_or("");
    let fields = [&e.identity, &e.machine, &e.from_state, &e.to_state, &e.transition].map(|f| clean(f));
    let [identity, machine, from, to, transition] = fields;
    format!("{} {identity} {machine} {from} → {to} ({transition}) {}", rfc3339(e.timestamp), clean(detail))
}

/// Unix seconds as `2026-12-01T10:31:02Z`.
pub fn rfc3339(unix_secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One name per line, or `empty` when there is none (a blank output reads as a failure).
pub fn names(names: &[String], empty: &str) -> String {
    if names.is_empty() {
        return format!("{empty}\n");
    }
    names.iter().map(|n| format!("{}\n", clean(n))).collect()
}

/// `(key, entry)` pairs; the key's last token is the registering machine's instance id.
pub fn services(entries: &[(String, ServiceEntry)]) -> String {
    let mut t = table(&["CLUSTER", "PROTOCOL", "SERVICE", "ADDRESS", "PORT", "PRIORITY", "INSTANCE"]);
    for (key, s) in entries {
        let instance = key.rsplit('.').next().unwrap_or_default();
        t.add_row(vec![
            clean(&s.cluster),
            clean(&s.protocol),
            clean(&s.service),
            clean(&s.address),
            s.port.to_string(),
            s.priority.to_string(),
            clean(instance),
        ]);
    }
    if entries.is_empty() {
        return "no endpoints are registered\n".into();
    }
    format!("{t}\n{} endpoint(s)\n", entries.len())
}

pub fn governor(g: &GovernorInfo) -> String {
    let mut out = format!(
        "Governor {}: capacity {}, expire {}, replicas {}, {} active lease(s)\n",
        clean(&g.name),
        g.capacity,
        humantime::format_duration(g.expire),
        g.replicas,
        g.leases.len()
    );
    if !g.leases.is_empty() {
        let mut t = table(&["ID", "HOLDER", "AGE"]);
        for l in &g.leases {
            t.add_row(vec![l.seq.to_string(), clean(&l.holder), age((l.taken_ms / 1000) as i64)]);
        }
        out.push_str(&format!("{t}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORGED: &str = "\x1b]0;pwned\x07\x1b[2J";

    fn machine() -> hoist_core::status::MachineStatus {
        serde_json::from_value(serde_json::json!({
            "name": "hoist_web", "container": "web", "node": "n1", "id": "1", "state": "RUN", "version": format!("v2{FORGED}"),
            "image": null, "desired_image": "x", "container_id": null, "started": null, "available_transitions": [],
            "health": "healthy", "restarts": 0, "last_error": format!("died{FORGED}"), "condition": null, "activity": null,
            "governor_wait_seconds": 0.0, "last_update_seconds": null,
        }))
        .expect("a machine status")
    }

    /// What another node or the agent reports is shown, but cannot drive the terminal.
    #[test]
    fn status_and_events_from_elsewhere_print_inert() {
        let node = NodeStatus {
            node: format!("n1{FORGED}"),
            machines: vec![machine()],
            config_error: Some(format!("line 1\nline 2{FORGED}")),
            warnings: vec![format!("store: {FORGED}")],
        };
        let transition = TransitionEvent {
            protocol: String::new(),
            identity: format!("n1{FORGED}"),
            id: String::new(),
            version: String::new(),
            timestamp: 0,
            machine: "hoist_web".into(),
            transition: "restart".into(),
            from_state: "run".into(),
            to_state: "restart".into(),
            detail: Some(FORGED.into()),
            image: None,
        };
        for printed in [status(&[node]), event(&transition)] {
            assert!(!printed.contains(['\x1b', '\x07']), "{printed:?}");
            assert!(printed.contains("\\x1b]0;pwned\\x07\\x1b[2J"), "{printed:?}");
        }
    }

    #[test]
    fn events_show_their_time_as_rfc3339() {
        let e: TransitionEvent = serde_json::from_value(serde_json::json!({
            "protocol": "io.choria.machine.v1.transition", "identity": "n1", "id": "1", "version": "1.0.0",
            "timestamp": 1_796_119_862, "machine": "hoist_web", "transition": "restart", "from_state": "RUN",
            "to_state": "RESTART",
        }))
        .expect("an event");
        assert!(event(&e).starts_with("2026-12-01T10:11:02Z n1 hoist_web RUN → RESTART (restart)"), "{}", event(&e));
    }

    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(clean("v2\x1b]0;pwned\x07\x1b[2J\r\n\u{9b}é"), "v2\\x1b]0;pwned\\x07\\x1b[2J\\r\\n\\u{9b}é");
        assert_eq!(clean_lines("a\x1b\nb"), "a\\x1b\nb");
    }
}
