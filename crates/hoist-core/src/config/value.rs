//! Typed reading of raw values: small converters from a JSON value to what a field needs, each with a
//! message that says what was found and what is accepted, and [`Fields`], which reads one container's
//! merged definition and records every problem against the right file, container and field.

use super::ConfigError;
use super::containers::RawContainer;
use serde_json::{Map, Value};
use std::time::Duration;

/// What a value is, for messages ("found a list").
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

pub(crate) fn string(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("expected a string, found {}", describe(other))),
    }
}

/// A string, or a number or boolean taken as its text: an environment value `PORT: 80` is meant as the
/// text "80". (Not for `image_tag`, where a number's text is not reliably what was written.)
pub(crate) fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("expected a single value (string, number or boolean), found {}", describe(other))),
    }
}

/// `true`/`false`; the strings "true"/"false" are accepted too because interpolated facts are strings.
pub(crate) fn boolean(value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        other => Err(format!("expected true or false, found {}", describe(other))),
    }
}

/// A non-negative whole number; digit strings are accepted because interpolated facts are strings.
pub(crate) fn integer(value: &Value) -> Result<u64, String> {
    let parsed = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("expected a whole number of 0 or more, found {}", describe(value)))
}

/// A duration: a humantime string (`10s`, `5m`, `1h 30m`) or a whole number of seconds.
pub(crate) fn duration(value: &Value) -> Result<Duration, String> {
    let accepted = "expected a duration such as \"10s\", \"5m\" or \"1h 30m\", or a whole number of seconds";
    match value {
        Value::Number(n) => n.as_u64().map(Duration::from_secs).ok_or_else(|| format!("{accepted}, found {}", describe(value))),
        Value::String(s) if s.trim().bytes().all(|b| b.is_ascii_digit()) && !s.trim().is_empty() => {
            s.trim().parse().map(Duration::from_secs).map_err(|_| format!("{accepted}, found {}", describe(value)))
        }
        Value::String(s) => humantime::parse_duration(s.trim()).map_err(|e| format!("{accepted}, found {s:?} ({e})")),
        other => Err(format!("{accepted}, found {}", describe(other))),
    }
}

/// A command line: a string split into words like a shell would (no expansion), or a list of words.
/// An empty string or list means none.
pub(crate) fn words(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => crate::spec::split_words(s).map_err(|e| format!("cannot split {s:?} into words: {e}")),
        Value::Array(_) => scalar_list(value),
        other => Err(format!("expected a string or a list of strings, found {}", describe(other))),
    }
}

/// A list of single values.
pub(crate) fn scalar_list(value: &Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected a list, found {}", describe(value)));
    };
    items.iter().enumerate().map(|(i, item)| scalar(item).map_err(|e| format!("item {i}: {e}"))).collect()
}

/// Reads one container's merged definition. Every problem goes into the shared error list with the
/// file that last set the field, so validation always continues and reports everything at once.
pub(crate) struct Fields<'a> {
    pub(crate) name: &'a str,
    container: &'a RawContainer,
    errors: &'a mut Vec<ConfigError>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(name: &'a str, container: &'a RawContainer, errors: &'a mut Vec<ConfigError>) -> Self {
        Fields { name, container, errors }
    }

    pub(crate) fn definition(&self) -> &'a Map<String, Value> {
        &self.container.definition
    }

    pub(crate) fn sources(&self) -> &'a [std::path::PathBuf] {
        &self.container.sources
    }

    pub(crate) fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub(crate) fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.container.origin(field),
            container: Some(self.name.to_string()),
            field: Some(field.to_string()),
            message: message.into(),
        });
    }

    /// A field's value; `null` counts as absent so a later file can reset a field to its default.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.container.definition.get(key).filter(|v| !v.is_null())
    }

    /// The value at `path` (keys and list indexes below the definition) with a number as it was
    /// written, for values meant as text: YAML reads `VERSION: 1.10` as 1.1.
    pub(crate) fn as_written(&self, path: &[&str], value: &'a Value) -> &'a Value {
        let Some((first, rest)) = path.split_first().filter(|_| value.is_number()) else { return value };
        let mut current = self.container.texts.get(*first);
        for segment in rest {
            current = current.and_then(|v| match v {
                Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                other => other.get(segment),
            });
        }
        current.unwrap_or(value)
    }

    /// `value` (found at `path`) with each item of a list as written: the words of a command are text.
    pub(crate) fn words_as_written(&self, path: &[&str], value: &'a Value) -> Value {
        let Value::Array(items) = value else { return value.clone() };
        let written = items.iter().enumerate().map(|(i, item)| {
            let index = i.to_string();
            let item_path: Vec<&str> = path.iter().copied().chain([index.as_str()]).collect();
            self.as_written(&item_path, item).clone()
        });
        Value::Array(written.collect())
    }

    /// Converts an optional field, recording a failure and falling back to `default`.
    pub(crate) fn parse<T>(&mut self, key: &str, default: T, convert: impl FnOnce(&Value) -> Result<T, String>) -> T {
        self.parse_at(key, self.get(key), default, convert)
    }

    /// Converts a value found at `path` (which may be nested, `health_check.port`).
    pub(crate) fn parse_at<T>(
        &mut self,
        path: &str,
        value: Option<&Value>,
        default: T,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> T {
        match value.map(convert) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(message)) => {
                self.error(path, message);
                default
            }
        }
    }

    /// The items of an optional list field, each with its index; a non-list is recorded as an error.
    pub(crate) fn list(&mut self, key: &str) -> &'a [Value] {
        match self.get(key) {
            None => &[],
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.error(key, format!("expected a list, found {}", describe(other)));
                &[]
            }
        }
    }

    /// Reports keys of `map` (at `path`, "" for the definition itself) that are not in `known`.
    pub(crate) fn reject_unknown(&mut self, path: &str, map: &Map<String, Value>, known: &[&str]) {
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            let hint = suggestion(key, known).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
            let field = super::raw::join_path(path, key);
            self.error(&field, format!("unknown field `{key}`{hint}; accepted fields: {}", known.join(", ")));
        }
    }
}

/// The closest known name within two edits, for "did you mean".
fn suggestion<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known.iter().map(|k| (edit_distance(key, k), *k)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d).map(|(_, k)| k)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converters() {
        assert_eq!(scalar(&json!(1.5)).unwrap(), "1.5");
        assert_eq!(scalar(&json!(2)).unwrap(), "2");
        assert!(scalar(&json!([1])).is_err());
        assert_eq!(duration(&json!(7)).unwrap(), Duration::from_secs(7));
        assert_eq!(duration(&json!("5m")).unwrap(), Duration::from_secs(300));
        assert_eq!(duration(&json!("12")).unwrap(), Duration::from_secs(12));
        assert!(duration(&json!("soon")).unwrap_err().contains("\"10s\""));
        assert!(duration(&json!(-1)).is_err());
        assert!(boolean(&json!("false")).is_ok_and(|b| !b));
        assert!(boolean(&json!(1)).is_err());
        assert_eq!(integer(&json!("80")).unwrap(), 80);
        assert!(integer(&json!(-3)).is_err());
        assert_eq!(words(&json!("a 'b c'")).unwrap(), ["a", "b c"]);
        assert_eq!(words(&json!(["a b", 1])).unwrap(), ["a b", "1"]);
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggestion("colour", &["color", "image"]), Some("color"));
        assert_eq!(suggestion("imgae_tag", &["image", "image_tag"]), Some("image_tag"));
        assert_eq!(suggestion("zzzzzz", &["image"]), None);
    }
}
