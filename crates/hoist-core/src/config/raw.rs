//! The raw layer shared by the agent file and the container data: reading a YAML file within limits,
//! turning it into a JSON value (one value model for facts, merging and interpolation), deep merging
//! and `%{facts.…}` interpolation. Nothing here knows what a field means.

use super::ConfigError;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::path::Path;

/// Files larger than this are refused: config is small, and a huge file is a mistake or an attack.
pub(crate) const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Strings longer than this are refused for the same reason.
pub(crate) const MAX_STRING_BYTES: usize = 64 * 1024;

/// An error about a whole file (no container, no field).
pub(crate) fn file_error(file: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError { file: Some(file.to_path_buf()), container: None, field: None, message: message.into() }
}

/// Reads a config file as text, refusing oversized and unreadable files with a message naming it.
pub(crate) fn read_text(file: &Path) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(file).map_err(|e| file_error(file, format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(file_error(file, format!("is {} bytes; config files may be at most {MAX_FILE_BYTES} bytes (4 MiB)", meta.len())));
    }
    std::fs::read_to_string(file).map_err(|e| file_error(file, format!("cannot read: {e}")))
}

/// A YAML document read twice over: as YAML types it, and with every number kept as the text it was
/// written as. The same shape, so both merge alike.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Document {
    pub(crate) value: Value,
    /// `value` with each number replaced by its source text: YAML reads `1.10` as 1.1 and `0x10` as 16,
    /// which a value meant as text (an environment variable, a fact) must not become.
    pub(crate) texts: Value,
}

/// Parses YAML text into JSON values; an empty document is `Null`. YAML merge keys (`<<`) are applied.
/// Syntax errors carry the line and column serde_yaml reports.
pub(crate) fn parse_yaml(file: &Path, text: &str) -> Result<Document, ConfigError> {
    let invalid = |e: serde_yaml::Error| file_error(file, format!("invalid YAML: {e}"));
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(invalid)?;
    let mut texts = Guide(&yaml).deserialize(serde_yaml::Deserializer::from_str(text)).map_err(invalid)?;
    for tree in [&mut yaml, &mut texts] {
        tree.apply_merge().map_err(|e| file_error(file, format!("invalid YAML merge key: {e}")))?;
    }
    let located =
        |(path, message): (String, String)| ConfigError { field: (!path.is_empty()).then_some(path), ..file_error(file, message) };
    Ok(Document { value: yaml_to_json(&yaml, "").map_err(located)?, texts: yaml_to_json(&texts, "").map_err(located)? })
}

/// Reads a document a second time, led by its typed reading: where that found a number, the scalar is
/// read as a string, which serde_yaml gives as written. Keys stay as typed, so both trees have the
/// same keys.
struct Guide<'a>(&'a serde_yaml::Value);

impl<'de> DeserializeSeed<'de> for Guide<'_> {
    type Value = serde_yaml::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        use serde_yaml::Value as Y;
        match self.0 {
            Y::Number(_) => String::deserialize(deserializer).map(Y::String),
            Y::Sequence(items) => deserializer.deserialize_seq(SeqGuide(items)),
            Y::Mapping(mapping) => deserializer.deserialize_map(MapGuide(mapping)),
            _ => Y::deserialize(deserializer),
        }
    }
}

struct SeqGuide<'a>(&'a [serde_yaml::Value]);

impl<'de> Visitor<'de> for SeqGuide<'_> {
    type Value = serde_yaml::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(self.0.len());
        for typed in self.0 {
            match access.next_element_seed(Guide(typed))? {
                Some(item) => out.push(item),
                None => break,
            }
        }
        Ok(serde_yaml::Value::Sequence(out))
    }
}

struct MapGuide<'a>(&'a serde_yaml::Mapping);

impl<'de> Visitor<'de> for MapGuide<'_> {
    type Value = serde_yaml::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_yaml::Mapping::new();
        while let Some(key) = access.next_key::<serde_yaml::Value>()? {
            let value = match self.0.get(&key) {
                Some(typed) => access.next_value_seed(Guide(typed))?,
                None => access.next_value()?,
            };
            out.insert(key, value);
        }
        Ok(serde_yaml::Value::Mapping(out))
    }
}

/// Converts YAML to JSON. Mapping keys that are numbers or booleans become strings (`80: x`); other
/// keys and YAML tags are refused rather than guessed at. Errors carry the path of the offending value.
fn yaml_to_json(yaml: &serde_yaml::Value, path: &str) -> Result<Value, (String, String)> {
    use serde_yaml::Value as Y;
    Ok(match yaml {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                // NaN and infinities have no JSON form; no field needs them.
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| (path.to_string(), format!("number {n} is not supported")))?
            }
        }
        Y::String(s) => {
            check_string_length(s, path)?;
            Value::String(s.clone())
        }
        Y::Sequence(items) => {
            Value::Array(items.iter().enumerate().map(|(i, item)| yaml_to_json(item, &format!("{path}[{i}]"))).collect::<Result<_, _>>()?)
        }
        Y::Mapping(mapping) => {
            let mut out = Map::new();
            for (key, value) in mapping {
                let key = match key {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err((path.to_string(), "mapping keys must be strings".into())),
                };
                check_string_length(&key, path)?;
                let child = join_path(path, &key);
                out.insert(key, yaml_to_json(value, &child)?);
            }
            Value::Object(out)
        }
        Y::Tagged(tagged) => return Err((path.to_string(), format!("YAML tag {} is not supported", tagged.tag))),
    })
}

fn check_string_length(s: &str, path: &str) -> Result<(), (String, String)> {
    if s.len() > MAX_STRING_BYTES {
        return Err((
            path.to_string(),
            format!("a string of {} bytes is longer than the limit of {MAX_STRING_BYTES} bytes (64 KiB)", s.len()),
        ));
    }
    Ok(())
}

/// `a` + `b` → `a.b` (or `b` at the top).
pub(crate) fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Hiera-style deep merge: mappings merge key by key (recursively); everything else, lists included,
/// is replaced by the later value.
pub(crate) fn deep_merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// Replaces `%{facts.a.b}` in every string inside `value`. Each failure is reported with the path of the
/// string (`register_ports[0].ip`); the string is left as it was.
pub(crate) fn interpolate(value: &mut Value, facts: &Value, path: &str, errors: &mut Vec<(String, String)>) {
    match value {
        Value::String(s) => match interpolate_str(s, facts) {
            Ok(Some(new)) => *s = new,
            Ok(None) => {}
            Err(message) => errors.push((path.to_string(), message)),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, facts, &format!("{path}[{i}]"), errors);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                interpolate(item, facts, &join_path(path, key), errors);
            }
        }
        _ => {}
    }
}

/// One string: `Ok(None)` when it holds no `%{`, so untouched strings are not reallocated.
fn interpolate_str(s: &str, facts: &Value) -> Result<Option<String>, String> {
    if !s.contains("%{") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("%{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("{s:?} has an unterminated %{{"))?;
        out.push_str(&lookup_fact(after[..end].trim(), facts)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if out.len() > MAX_STRING_BYTES {
        return Err(format!("after interpolation the value is longer than the limit of {MAX_STRING_BYTES} bytes"));
    }
    Ok(Some(out))
}

/// Resolves `facts.a.b` to a scalar fact as text.
fn lookup_fact(expr: &str, facts: &Value) -> Result<String, String> {
    let Some(fact_path) = expr.strip_prefix("facts.") else {
        return Err(format!("%{{{expr}}} is not supported: only %{{facts.NAME}} (e.g. %{{facts.networking.ip}}) can be interpolated"));
    };
    let mut current = facts;
    for segment in fact_path.split('.') {
        current = current
            .get(segment)
            .filter(|_| !segment.is_empty())
            .ok_or_else(|| format!("unknown fact facts.{fact_path} in %{{{expr}}}; known top-level facts: {}", fact_names(facts)))?;
    }
    match current {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        Value::Array(_) | Value::Object(_) => {
            Err(format!("fact facts.{fact_path} is a list or mapping; only a single value can be interpolated"))
        }
    }
}

fn fact_names(facts: &Value) -> String {
    match facts.as_object() {
        Some(map) if !map.is_empty() => map.keys().cloned().collect::<Vec<_>>().join(", "),
        _ => "(none)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_also_kept_as_written() {
        let text = "a: 1.10\nb: [0x10, '1.10', true, ~, 7]\n0x10: {c: 1e3}\nbase: &v 1.50\nd: *v\nm: &m {e: 2.50}\nn:\n  <<: *m\n";
        let doc = parse_yaml(Path::new("f.yaml"), text).unwrap();
        assert_eq!(doc.value["a"], json!(1.1));
        assert_eq!(doc.value["b"], json!([16, "1.10", true, null, 7]));
        assert_eq!(
            doc.texts,
            json!({"a": "1.10", "b": ["0x10", "1.10", true, null, "7"], "16": {"c": "1e3"}, "base": "1.50", "d": "1.50", "m": {"e": "2.50"}, "n": {"e": "2.50"}})
        );
    }

    #[test]
    fn merge_is_deep_for_mappings_and_replaces_lists() {
        let mut base = json!({"a": {"x": 1, "y": [1, 2]}, "b": 1});
        deep_merge(&mut base, json!({"a": {"y": [3], "z": true}, "b": "s"}));
        assert_eq!(base, json!({"a": {"x": 1, "y": [3], "z": true}, "b": "s"}));
    }

    #[test]
    fn interpolation_of_facts() {
        let facts = json!({"hostname": "n1", "networking": {"ip": "10.0.0.5"}, "port": 80, "list": [1]});
        assert_eq!(interpolate_str("%{facts.networking.ip}:%{ facts.port }", &facts).unwrap().unwrap(), "10.0.0.5:80");
        assert_eq!(interpolate_str("plain", &facts).unwrap(), None);
        for bad in ["%{facts.nope}", "%{hostname}", "%{facts.networking.ip", "%{facts.list}", "%{facts.}", "%{::hostname}"] {
            assert!(interpolate_str(bad, &facts).is_err(), "{bad} should be refused");
        }
        let mut value = json!({"a": ["%{facts.nope}"], "b": "%{facts.hostname}"});
        let mut errors = Vec::new();
        interpolate(&mut value, &facts, "", &mut errors);
        assert_eq!(value["b"], "n1");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "a[0]");
        assert!(errors[0].1.contains("facts.nope"), "{}", errors[0].1);
    }

    #[test]
    fn yaml_conversion_limits_and_keys() {
        let file = Path::new("f.yaml");
        assert_eq!(parse_yaml(file, "").unwrap().value, Value::Null);
        assert_eq!(parse_yaml(file, "80: x\ntrue: 1.5\n").unwrap().value, serde_json::json!({"80": "x", "true": 1.5}));
        let long = format!("a:\n  b: {}\n", "x".repeat(MAX_STRING_BYTES + 1));
        let err = parse_yaml(file, &long).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("a.b"));
        let err = parse_yaml(file, "a: [1\nb: 2\n").unwrap_err();
        assert!(err.to_string().starts_with("f.yaml: invalid YAML") && err.to_string().contains("line"), "{err}");
        assert!(parse_yaml(file, "a: !custom x\n").is_err());
        assert_eq!(parse_yaml(file, "base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n").unwrap().value["c"], serde_json::json!({"x": 1, "y": 2}));
    }
}
