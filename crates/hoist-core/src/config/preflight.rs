//! `preflight: { command: [...], timeout: 30s }`: a run of the new image, once, before a new version
//! replaces the running container (a config check, a migration dry-run, `--version`). The field's
//! parsing; what runs is `runtime::Runtime::preflight`, when is the machine's.

use super::definition::{optional, required};
use super::value::{self, Fields, describe};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

const PREFLIGHT_FIELDS: &[&str] = &["command", "timeout"];
/// Long enough for a migration's dry run, short enough that a hung one is noticed.
const TIMEOUT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preflight {
    /// Run in the new image, in place of its command (the entrypoint is kept).
    pub command: Vec<String>,
    /// Default 30 s; a run that takes longer fails.
    pub timeout: Duration,
}

pub(super) fn preflight(fields: &mut Fields<'_>) -> Option<Preflight> {
    let map = match fields.get("preflight")? {
        Value::Object(map) => map,
        other => {
            fields.error("preflight", format!("expected a mapping with command and timeout, found {}", describe(other)));
            return None;
        }
    };
    let path = "preflight";
    let before = fields.error_count();
    fields.reject_unknown(path, map, PREFLIGHT_FIELDS);
    let written = map.get("command").map(|v| fields.words_as_written(&["preflight", "command"], v));
    let command = required(fields, path, map, "command", |v| {
        let command = value::words(written.as_ref().unwrap_or(v))?;
        if command.is_empty() { Err("must not be empty".to_string()) } else { Ok(command) }
    });
    let timeout = optional(fields, path, map, "timeout", Duration::from_secs(30), |v| {
        let d = value::duration(v)?;
        if (TIMEOUT.0..=TIMEOUT.1).contains(&d) {
            Ok(d)
        } else {
            Err(format!("must be from 1s to 1h, found {}", humantime::format_duration(d)))
        }
    });
    let preflight = Preflight { command: command?, timeout };
    (fields.error_count() == before).then_some(preflight)
}
