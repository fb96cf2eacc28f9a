//! `health_check` (liveness: a container failing it is restarted, and a new version failing it in
//! its gate is rolled back) and `dependency_check` (report-only: what the app says of what it
//! needs, a database, DNS; it feeds status and fleet-degraded mode and never restarts anything).
//! Both are the same probe settings.

use super::HealthCheck;
use super::definition::{optional, port, required};
use super::limits;
use super::value::{self, Fields, describe};
use crate::runtime::Probe;
use serde_json::Value;
use std::time::Duration;

const CHECK_FIELDS: &[&str] = &["type", "port", "path", "command", "interval", "timeout", "retries", "start_period"];

/// The check under `path` (`health_check` or `dependency_check`), if set and valid.
pub(super) fn check(fields: &mut Fields<'_>, path: &str) -> Option<HealthCheck> {
    let map = match fields.get(path)? {
        Value::Object(map) => map,
        other => {
            fields.error(path, format!("expected a mapping with type (http, tcp or exec) and its settings, found {}", describe(other)));
            return None;
        }
    };
    let before = fields.error_count();
    fields.reject_unknown(path, map, CHECK_FIELDS);
    let kind = required(fields, path, map, "type", |v| match v.as_str() {
        Some(t @ ("http" | "tcp" | "exec")) => Ok(t.to_string()),
        _ => Err(format!("expected http, tcp or exec, found {}", describe(v))),
    });
    // Settings of another probe type are refused rather than ignored: they show a misunderstanding.
    let applies = |key: &str| match key {
        "port" => matches!(kind.as_deref(), Some("http" | "tcp")),
        "path" => kind.as_deref() == Some("http"),
        "command" => kind.as_deref() == Some("exec"),
        _ => true,
    };
    if let Some(kind) = kind.as_deref() {
        for key in ["port", "path", "command"].into_iter().filter(|k| !applies(k) && map.get(*k).is_some_and(|v| !v.is_null())) {
            fields.error(&format!("{path}.{key}"), format!("does not apply to a check of type {kind}"));
        }
    }
    let probe = match kind.as_deref() {
        Some("http") => {
            let port = required(fields, path, map, "port", port);
            let check_path = optional(fields, path, map, "path", "/".to_string(), |v| {
                let p = value::string(v)?;
                if p.starts_with('/') { Ok(p) } else { Err(format!("{p:?} must start with /")) }
            });
            port.map(|port| Probe::Http { port, path: check_path })
        }
        Some("tcp") => required(fields, path, map, "port", port).map(|port| Probe::Tcp { port }),
        Some(_) => {
            let written = map.get("command").map(|v| fields.words_as_written(&[path, "command"], v));
            required(fields, path, map, "command", |v| {
                let command = value::words(written.as_ref().unwrap_or(v))?;
                if command.is_empty() { Err("must not be empty".to_string()) } else { Ok(command) }
            })
            .map(|command| Probe::Exec { command })
        }
        None => None,
    };
    // Timings are read even when the probe is broken, so all problems are reported together.
    let timing = |bounds| move |v: &Value| limits::within(value::duration(v)?, bounds);
    let interval = optional(fields, path, map, "interval", Duration::from_secs(10), timing(limits::PROBE_INTERVAL));
    let timeout = optional(fields, path, map, "timeout", Duration::from_secs(5), timing(limits::PROBE_TIMEOUT));
    let retries = optional(fields, path, map, "retries", 3, |v| {
        let (min, max) = limits::PROBE_RETRIES;
        match value::integer(v)? {
            n if (min..=max).contains(&n) => Ok(n as u32),
            n => Err(format!("must be from {min} to {max} consecutive failures, found {n}")),
        }
    });
    let start_period = optional(fields, path, map, "start_period", Duration::ZERO, timing(limits::PROBE_START_PERIOD));
    let check = HealthCheck { probe: probe?, interval, timeout, retries, start_period };
    (fields.error_count() == before).then_some(check)
}
