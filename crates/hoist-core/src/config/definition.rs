//! The typed layer: one merged, interpolated container definition checked field by field against the
//! parameters of the original `hoist::container` define (same names, same defaults) plus `health_check`,
//! `dependency_check` and `preflight`.

use super::limits;
use super::value::{self, Fields, describe};
use super::{ContainerConfig, Ensure, Registration};
use crate::backoff::BackoffConfig;
use crate::spec::{self, EnvVar, ImageVersion};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const FIELDS: &[&str] = &[
    "ensure",
    "image",
    "image_tag",
    "command",
    "entrypoint",
    "network",
    "syslog",
    "kv_update",
    "kv_interval",
    "restart_governor",
    "update_governor",
    "restart_files",
    "ports",
    "volumes",
    "environment",
    "register_ports",
    "health_check",
    "dependency_check",
    "stop_signal",
    "stop_grace",
    "restart_backoff",
    "preflight",
];
const BACKOFF_FIELDS: &[&str] = &["initial", "max", "reset_after"];
const REGISTRATION_FIELDS: &[&str] = &["cluster", "service", "protocol", "ip", "port", "priority", "annotations"];

/// Builds the typed definition; problems are recorded in `fields` and the returned value is then
/// discarded by the caller, so fallbacks here only need to be harmless.
pub(crate) fn container(fields: &mut Fields<'_>) -> ContainerConfig {
    let name = fields.name.to_string();
    if !valid_name(&name) {
        fields
            .error("name", format!("{name:?} is not a valid container name: use letters, digits, _ . - and start with a letter or digit"));
    }
    fields.reject_unknown("", fields.definition(), FIELDS);
    let ensure = fields.parse("ensure", Ensure::Present, ensure);
    ContainerConfig {
        name,
        image: image(fields, ensure),
        ensure,
        image_tag: fields.parse("image_tag", ImageVersion::Tag("latest".into()), image_tag),
        command: command_line(fields, "command", value::words),
        entrypoint: command_line(fields, "entrypoint", entrypoint),
        // The original module ran containers on `bridge`, which is also Docker's own default.
        network: fields.parse("network", "bridge".to_string(), network),
        syslog: fields.parse("syslog", false, value::boolean),
        kv_update: fields.parse("kv_update", false, value::boolean),
        kv_interval: fields.parse("kv_interval", Duration::from_secs(10), kv_interval),
        restart_governor: fields.parse("restart_governor", None, governor),
        update_governor: fields.parse("update_governor", None, governor),
        restart_files: restart_files(fields),
        ports: each_string(fields, "ports", spec::parse_port),
        volumes: each_string(fields, "volumes", spec::parse_volume),
        environment: environment(fields),
        register_ports: register_ports(fields),
        health_check: super::health_check::check(fields, "health_check"),
        dependency_check: super::health_check::check(fields, "dependency_check"),
        stop_signal: fields.parse("stop_signal", None, |v| stop_signal(v).map(Some)),
        stop_grace: fields.parse("stop_grace", None, |v| bounded_duration(v, Duration::ZERO, MAX_STOP_GRACE).map(Some)),
        restart_backoff: restart_backoff(fields),
        preflight: super::preflight::preflight(fields),
        sources: fields.sources().to_vec(),
    }
}

/// `command` or `entrypoint`; the words of a list are text, so `[app, --ratio, 1.10]` passes "1.10".
fn command_line(fields: &mut Fields<'_>, key: &str, convert: fn(&Value) -> Result<Vec<String>, String>) -> Vec<String> {
    let written = fields.get(key).map(|v| fields.words_as_written(&[key], v));
    fields.parse_at(key, written.as_ref(), Vec::new(), convert)
}

fn valid_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn ensure(value: &Value) -> Result<Ensure, String> {
    match value.as_str() {
        Some("present") => Ok(Ensure::Present),
        Some("absent") => Ok(Ensure::Absent),
        _ => Err(format!("expected present or absent, found {}", describe(value))),
    }
}

/// Required, except that a container being removed (`ensure: absent`) needs only its name.
fn image(fields: &mut Fields<'_>, ensure: Ensure) -> String {
    match fields.get("image") {
        None if ensure == Ensure::Absent => String::new(),
        None => {
            fields.error("image", "is required: the image repository without tag, e.g. registry.example.net/team/web");
            String::new()
        }
        Some(v) => fields.parse_at("image", Some(v), String::new(), |v| {
            let image = value::string(v)?;
            spec::validate_image(&image).map_err(|e| format!("image {e}"))?;
            Ok(image)
        }),
    }
}

/// A tag must be written as text. YAML reads an unquoted `1.10` as the number 1.1 and `0x10` as 16, so
/// taking a number as its text would deploy a tag nobody wrote; the operator is asked to quote it.
fn image_tag(value: &Value) -> Result<ImageVersion, String> {
    if value.is_number() {
        return Err(format!(
            "YAML reads this unquoted value as {}, which is not reliably the tag written (1.10 reads as 1.1, 0x10 as 16); quote the tag, e.g. image_tag: \"1.10\"",
            describe(value)
        ));
    }
    ImageVersion::parse(&value::string(value)?)
}

/// A string is the single executable (as `docker run --entrypoint`); a list is taken as is.
fn entrypoint(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(_) => value::scalar_list(value),
        other => Err(format!("expected a string or a list of strings, found {}", describe(other))),
    }
}

fn network(value: &Value) -> Result<String, String> {
    let network = value::string(value)?;
    if network.is_empty() || network.chars().any(char::is_whitespace) {
        return Err(format!("{network:?} is not a network name (e.g. bridge, host, or a user-defined network)"));
    }
    Ok(network)
}

fn kv_interval(value: &Value) -> Result<Duration, String> {
    limits::within(value::duration(value)?, limits::KV_INTERVAL)
}

/// Governor names become NATS subjects and stream names (`GOVERNOR_<name>`); "" means none.
fn governor(value: &Value) -> Result<Option<String>, String> {
    let name = value::string(value)?;
    if name.is_empty() {
        return Ok(None);
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')) {
        return Err(format!("{name:?} is not a valid governor name: use letters, digits, _ and -"));
    }
    Ok(Some(name))
}

fn restart_files(fields: &mut Fields<'_>) -> Vec<PathBuf> {
    each_string(fields, "restart_files", |s| {
        if s.starts_with('/') { Ok(PathBuf::from(s)) } else { Err(format!("{s:?} must be an absolute path")) }
    })
}

/// A list field whose items are strings parsed by `parse`; errors are reported as `key[i]`.
fn each_string<T>(fields: &mut Fields<'_>, key: &str, parse: impl Fn(&str) -> Result<T, String>) -> Vec<T> {
    let mut out = Vec::new();
    for (i, item) in fields.list(key).iter().enumerate() {
        let path = format!("{key}[{i}]");
        match value::scalar(item).and_then(|s| parse(&s)) {
            Ok(v) => out.push(v),
            Err(message) => fields.error(&path, message),
        }
    }
    out
}

/// Either a list of `KEY=VALUE` strings or a mapping of KEY to a single value. In the mapping form a
/// null value drops the variable, so a later file can remove one set by an earlier file.
fn environment(fields: &mut Fields<'_>) -> Vec<EnvVar> {
    match fields.get("environment") {
        Some(Value::Object(map)) => {
            let mut out = Vec::new();
            for (key, v) in map.iter().filter(|(_, v)| !v.is_null()) {
                let path = format!("environment.{key}");
                // Values are text: `VERSION: 1.10` is "1.10", not YAML's number 1.1.
                let v = fields.as_written(&["environment", key], v);
                let parsed = value::scalar(v).and_then(|v| {
                    let var = spec::parse_env(&format!("{key}={v}"))?;
                    // parse_env splits at the first '='; a key containing '=' would shift into the value.
                    if var.key != *key { Err(format!("{key:?} is not a valid variable name")) } else { Ok(var) }
                });
                match parsed {
                    Ok(var) => out.push(var),
                    Err(message) => fields.error(&path, message),
                }
            }
            out
        }
        Some(Value::Array(_)) => each_string(fields, "environment", spec::parse_env),
        None => Vec::new(),
        Some(other) => {
            fields.error(
                "environment",
                format!("expected a list of KEY=VALUE strings or a mapping of KEY: value, found {}", describe(other)),
            );
            Vec::new()
        }
    }
}

fn register_ports(fields: &mut Fields<'_>) -> Vec<Registration> {
    let mut out = Vec::new();
    for (i, item) in fields.list("register_ports").iter().enumerate() {
        let path = format!("register_ports[{i}]");
        match item {
            Value::Object(map) => {
                if let Some(registration) = registration(fields, i, map) {
                    out.push(registration);
                }
            }
            other => fields.error(&path, format!("expected a mapping with cluster, service, ip and port, found {}", describe(other))),
        }
    }
    out
}

fn registration(fields: &mut Fields<'_>, index: usize, map: &Map<String, Value>) -> Option<Registration> {
    let path = &format!("register_ports[{index}]");
    let index = index.to_string();
    let before = fields.error_count();
    fields.reject_unknown(path, map, REGISTRATION_FIELDS);
    let cluster = required(fields, path, map, "cluster", key_token);
    let service = required(fields, path, map, "service", key_token);
    let protocol = optional(fields, path, map, "protocol", "tcp".to_string(), key_token);
    let ip = required(fields, path, map, "ip", |v| {
        let ip = value::string(v)?;
        if ip.is_empty() || ip.chars().any(char::is_whitespace) {
            return Err(format!("{ip:?} is not an address"));
        }
        Ok(ip)
    });
    let port = required(fields, path, map, "port", port);
    let priority = optional(fields, path, map, "priority", 1, |v| {
        u32::try_from(value::integer(v)?).map_err(|_| "expected a whole number that fits 32 bits".to_string())
    });
    // Annotations are text: a version written 1.10 stays "1.10".
    let written: BTreeMap<&String, &Value> = match map.get("annotations") {
        Some(Value::Object(annotations)) => {
            annotations.iter().map(|(k, v)| (k, fields.as_written(&["register_ports", &index, "annotations", k], v))).collect()
        }
        _ => BTreeMap::new(),
    };
    let annotations = optional(fields, path, map, "annotations", BTreeMap::new(), |v| match v {
        Value::Object(_) => written.iter().map(|(k, v)| Ok((k.to_string(), value::scalar(v).map_err(|e| format!("{k}: {e}"))?))).collect(),
        other => Err(format!("expected a mapping of names to values, found {}", describe(other))),
    });
    if fields.error_count() != before {
        return None;
    }
    Some(Registration { cluster: cluster?, service: service?, protocol, ip: ip?, port: port?, priority, annotations })
}

/// Cluster, service and protocol are parts of the dot-separated registration key
/// `<cluster>.<protocol>.<service>.<instance>`, so they cannot contain dots or spaces.
fn key_token(value: &Value) -> Result<String, String> {
    let token = value::scalar(value)?;
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')) {
        return Err(format!("{token:?} is not valid here: use letters, digits, _ and - (it is part of a dotted key)"));
    }
    Ok(token)
}

pub(super) fn port(value: &Value) -> Result<u16, String> {
    match value::integer(value) {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(format!("expected a port number from 1 to 65535, found {}", describe(value))),
    }
}

/// A required key of a nested mapping; reports `path.key` when missing or invalid.
pub(super) fn required<T>(
    fields: &mut Fields<'_>,
    path: &str,
    map: &Map<String, Value>,
    key: &str,
    convert: impl FnOnce(&Value) -> Result<T, String>,
) -> Option<T> {
    let field = format!("{path}.{key}");
    match map.get(key).filter(|v| !v.is_null()) {
        None => {
            fields.error(&field, "is required");
            None
        }
        Some(v) => fields.parse_at(&field, Some(v), None, |v| convert(v).map(Some)),
    }
}

pub(super) fn optional<T>(
    fields: &mut Fields<'_>,
    path: &str,
    map: &Map<String, Value>,
    key: &str,
    default: T,
    convert: impl FnOnce(&Value) -> Result<T, String>,
) -> T {
    fields.parse_at(&format!("{path}.{key}"), map.get(key).filter(|v| !v.is_null()), default, convert)
}

/// Longer than any sane drain, short enough that a stuck stop is noticed.
const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);

/// `SIGTERM`, `TERM`, `SIGRTMIN+3` or a number, as `docker run --stop-signal` takes it.
fn stop_signal(value: &Value) -> Result<String, String> {
    let signal = value::scalar(value)?;
    let name = signal.strip_prefix("SIG").unwrap_or(&signal);
    let numeric = name.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n));
    let named = !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'+' || b == b'-');
    if numeric || named {
        Ok(signal)
    } else {
        Err(format!("{signal:?} is not a signal: use a name such as SIGTERM or SIGQUIT, or a number 1-64"))
    }
}

fn bounded_duration(value: &Value, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = value::duration(value)?;
    if d < min || d > max {
        return Err(format!(
            "must be from {} to {}, found {}",
            humantime::format_duration(min),
            humantime::format_duration(max),
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

/// `restart_backoff: { initial, max, reset_after }`; unset keys take the built-in defaults.
fn restart_backoff(fields: &mut Fields<'_>) -> Option<BackoffConfig> {
    let map = match fields.get("restart_backoff")? {
        Value::Object(map) => map,
        other => {
            fields.error("restart_backoff", format!("expected a mapping with initial, max and reset_after, found {}", describe(other)));
            return None;
        }
    };
    let path = "restart_backoff";
    let before = fields.error_count();
    fields.reject_unknown(path, map, BACKOFF_FIELDS);
    let defaults = BackoffConfig::default();
    let (hour, day) = (Duration::from_secs(3600), Duration::from_secs(86_400));
    let initial = optional(fields, path, map, "initial", defaults.initial, |v| bounded_duration(v, Duration::from_millis(100), hour));
    let max = optional(fields, path, map, "max", defaults.max, |v| bounded_duration(v, Duration::from_millis(100), day));
    let reset_after =
        optional(fields, path, map, "reset_after", defaults.reset_after, |v| bounded_duration(v, Duration::from_secs(1), day));
    if initial > max {
        fields.error(
            &format!("{path}.initial"),
            format!("{} is longer than max {}", humantime::format_duration(initial), humantime::format_duration(max)),
        );
    }
    (fields.error_count() == before).then_some(BackoffConfig { initial, max, reset_after })
}
