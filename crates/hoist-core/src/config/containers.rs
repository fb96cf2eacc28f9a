//! Container data: files and directories read in order, each in Hiera form (`hoist::containers`,
//! `hoist::purge`) or plain form (`containers`, `purge`), deep-merged per container, interpolated with
//! facts, then validated field by field into [`ContainerConfig`]. Every problem is collected, not just
//! the first, and each names the file, the container and the field.

use super::raw::{self, file_error};
use super::value::Fields;
use super::{ConfigError, ConfigErrors, ContainerConfig, ContainerSet, Ensure};
use crate::spec::PortMapping;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One container's definition while files are merged: the merged mapping, the files that contributed,
/// and which file last set each top-level field (so an error points at the file to edit).
#[derive(Debug, Default)]
pub(crate) struct RawContainer {
    pub(crate) definition: Map<String, Value>,
    /// `definition` with numbers as written (see [`raw::Document`]), merged alike; not interpolated,
    /// since only numbers are read from it.
    pub(crate) texts: Map<String, Value>,
    pub(crate) sources: Vec<PathBuf>,
    pub(crate) origins: BTreeMap<String, PathBuf>,
}

impl RawContainer {
    /// The file to blame for `field` (`ports[0]` → the file that last set `ports`).
    pub(crate) fn origin(&self, field: &str) -> Option<PathBuf> {
        let top = field.split(['.', '[']).next().unwrap_or(field);
        self.origins.get(top).or(self.sources.last()).cloned()
    }

    fn merge(&mut self, file: &Path, definition: Map<String, Value>, texts: Map<String, Value>) {
        for key in definition.keys() {
            self.origins.insert(key.clone(), file.to_path_buf());
        }
        if self.sources.last().map(PathBuf::as_path) != Some(file) {
            self.sources.push(file.to_path_buf());
        }
        for (tree, over) in [(&mut self.definition, definition), (&mut self.texts, texts)] {
            let mut merged = Value::Object(std::mem::take(tree));
            raw::deep_merge(&mut merged, Value::Object(over));
            if let Value::Object(map) = merged {
                *tree = map;
            }
        }
    }
}

/// Everything read from the data files before validation.
#[derive(Debug, Default)]
struct Merged {
    purge: Option<bool>,
    containers: BTreeMap<String, RawContainer>,
}

/// Reads container data from files and directories (a directory contributes its `*.yaml`/`*.yml`
/// files, sorted), deep-merges them in order, interpolates `%{facts.…}`, and validates every field.
/// All problems are returned together; any problem refuses the whole set.
pub fn load_containers(paths: &[PathBuf], facts: &Value) -> Result<ContainerSet, ConfigErrors> {
    let mut errors = Vec::new();
    let mut merged = Merged::default();
    for file in data_files(paths, &mut errors) {
        match raw::read_text(&file).and_then(|text| raw::parse_yaml(&file, &text)) {
            Ok(document) => merge_document(&mut merged, &file, document, &mut errors),
            Err(e) => errors.push(e),
        }
    }
    let mut containers = BTreeMap::new();
    let mut ports_origins = BTreeMap::new();
    for (name, mut container) in merged.containers {
        interpolate_container(&name, &mut container, facts, &mut errors);
        if let Some(config) = validate_container(&name, &container, &mut errors) {
            ports_origins.insert(name.clone(), container.origin("ports"));
            containers.insert(name, config);
        }
    }
    port_conflicts(&containers, &ports_origins, &mut errors);
    if errors.is_empty() { Ok(ContainerSet { purge: merged.purge.unwrap_or(true), containers }) } else { Err(ConfigErrors(errors)) }
}

/// Expands the configured paths into the files to read, in merge order. A directory contributes its
/// `*.yaml`/`*.yml` files sorted by name (not recursively; dotfiles such as editor lock files are
/// skipped). A missing path that names a YAML file is an error (a typo would otherwise silently declare
/// nothing and, with purge, remove everything); a missing directory is simply empty.
fn data_files(paths: &[PathBuf], errors: &mut Vec<ConfigError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => match directory_files(path) {
                Ok(found) => files.extend(found),
                Err(e) => errors.push(file_error(path, format!("cannot read directory: {e}"))),
            },
            Ok(_) => files.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !is_yaml_name(path) => {
                tracing::debug!(path = %path.display(), "container data directory does not exist; it declares nothing");
            }
            Err(e) => errors.push(file_error(path, format!("cannot read: {e}"))),
        }
    }
    files
}

fn directory_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        // metadata() follows symlinks, so a symlinked data file counts as a file.
        if is_yaml_name(&path) && !hidden && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn is_yaml_name(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml")
}

/// Folds one file's top level into the merge. Hiera files carry other classes' data (`ntp::servers`)
/// and `lookup_options`; those are ignored. Unknown `hoist::` keys and unknown plain keys are errors.
fn merge_document(merged: &mut Merged, file: &Path, document: raw::Document, errors: &mut Vec<ConfigError>) {
    let mut texts = match document.texts {
        Value::Object(texts) => texts,
        _ => Map::new(),
    };
    let top = match document.value {
        Value::Null => return,
        Value::Object(top) => top,
        _ => {
            return errors.push(file_error(
                file,
                "the file must be a mapping with `containers:` / `purge:` (or `hoist::containers` / `hoist::purge`)",
            ));
        }
    };
    for (key, value) in top {
        match key.as_str() {
            "containers" | "hoist::containers" => {
                let texts = texts.remove(&key).unwrap_or_default();
                merge_containers(merged, file, &key, value, texts, errors)
            }
            "purge" | "hoist::purge" => match value {
                Value::Bool(purge) => merged.purge = Some(purge),
                Value::Null => {}
                other => errors.push(field_error(file, &key, format!("must be true or false, not {}", super::value::describe(&other)))),
            },
            "lookup_options" => {}
            k if k.starts_with("hoist::") => errors.push(field_error(
                file,
                k,
                format!("unknown key `{k}`; hoist reads only hoist::containers and hoist::purge"),
            )),
            k if k.contains("::") => {}
            k => errors.push(field_error(
                file,
                k,
                format!("unknown top-level key `{k}`; accepted: containers, purge, hoist::containers, hoist::purge (keys of other classes, with ::, are ignored)"),
            )),
        }
    }
}

fn merge_containers(merged: &mut Merged, file: &Path, key: &str, value: Value, mut texts: Value, errors: &mut Vec<ConfigError>) {
    let definitions = match value {
        Value::Null => return,
        Value::Object(definitions) => definitions,
        other => {
            return errors.push(field_error(
                file,
                key,
                format!("must be a mapping of container name to definition, not {}", super::value::describe(&other)),
            ));
        }
    };
    for (name, definition) in definitions {
        let definition = match definition {
            // `web:` with nothing under it still declares the container (and fails on `image`).
            Value::Null => Map::new(),
            Value::Object(map) => map,
            other => {
                errors.push(ConfigError {
                    container: Some(name.clone()),
                    ..file_error(file, format!("the definition must be a mapping of fields, not {}", super::value::describe(&other)))
                });
                continue;
            }
        };
        let texts = match texts.get_mut(&name).map(Value::take) {
            Some(Value::Object(texts)) => texts,
            _ => Map::new(),
        };
        merged.containers.entry(name).or_default().merge(file, definition, texts);
    }
}

fn field_error(file: &Path, field: &str, message: String) -> ConfigError {
    ConfigError { field: Some(field.to_string()), ..file_error(file, message) }
}

/// Interpolation runs after merging so a fact reference may come from any file.
fn interpolate_container(name: &str, container: &mut RawContainer, facts: &Value, errors: &mut Vec<ConfigError>) {
    let mut failures = Vec::new();
    let mut definition = Value::Object(std::mem::take(&mut container.definition));
    raw::interpolate(&mut definition, facts, "", &mut failures);
    if let Value::Object(map) = definition {
        container.definition = map;
    }
    for (field, message) in failures {
        errors.push(ConfigError { file: container.origin(&field), container: Some(name.to_string()), field: Some(field), message });
    }
}

fn validate_container(name: &str, container: &RawContainer, errors: &mut Vec<ConfigError>) -> Option<ContainerConfig> {
    let before = errors.len();
    let mut fields = Fields::new(name, container, errors);
    let config = super::definition::container(&mut fields);
    (errors.len() == before).then_some(config)
}

/// Two mappings of the same host address, port and protocol would let the first container start and
/// the second fail to bind and crash-loop, so such a set is refused. A mapping without a host port
/// (Docker picks one) never conflicts. Each conflict is reported on the later mapping, naming both.
fn port_conflicts(
    containers: &BTreeMap<String, ContainerConfig>,
    origins: &BTreeMap<String, Option<PathBuf>>,
    errors: &mut Vec<ConfigError>,
) {
    let published: Vec<(&str, usize, &PortMapping)> = containers
        .values()
        .filter(|c| c.ensure == Ensure::Present)
        .flat_map(|c| c.ports.iter().enumerate().filter(|(_, p)| p.host_port.is_some()).map(|(i, p)| (c.name.as_str(), i, p)))
        .collect();
    for (later, &(name, index, port)) in published.iter().enumerate() {
        let Some(&(first_name, first_index, first)) = published[..later].iter().find(|(_, _, other)| overlaps(other, port)) else {
            continue;
        };
        let first_file = origins.get(first_name).cloned().flatten().map(|f| format!(" in {}", f.display())).unwrap_or_default();
        let whose = if first_name == name { "this container".to_string() } else { format!("container {first_name}") };
        errors.push(ConfigError {
            file: origins.get(name).cloned().flatten(),
            container: Some(name.to_string()),
            field: Some(format!("ports[{index}]")),
            message: format!(
                "host port {} collides with {}, published by {whose} (ports[{first_index}]{first_file}); only one container can listen on a host address and port: give one of them another host port, or leave the host port out to let Docker pick one",
                host_side(port),
                host_side(first)
            ),
        });
    }
}

/// Same protocol and host port, and addresses that can collide: no address (Docker binds all of them)
/// or `::` (dual-stack on Linux) collides with every address, 0.0.0.0 with every IPv4 address.
fn overlaps(a: &PortMapping, b: &PortMapping) -> bool {
    let covers_all = |p: &PortMapping| p.host_ip.is_none_or(|ip| ip.is_ipv6() && ip.is_unspecified());
    let ips_collide = match (a.host_ip, b.host_ip) {
        _ if covers_all(a) || covers_all(b) => true,
        (Some(x), Some(y)) => x == y || (x.is_ipv4() && y.is_ipv4() && (x.is_unspecified() || y.is_unspecified())),
        _ => true,
    };
    a.protocol == b.protocol && a.host_port == b.host_port && ips_collide
}

/// `127.0.0.1:8080/tcp`, `*:8080/udp` (no address: all of them).
fn host_side(port: &PortMapping) -> String {
    let address = match port.host_ip {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        Some(ip) => ip.to_string(),
        None => "*".into(),
    };
    format!("{address}:{}/{}", port.host_port.unwrap_or_default(), port.protocol.as_str())
}
