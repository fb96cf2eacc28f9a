//! What one container should look like: the fully resolved definition handed to a runtime, the parsers
//! for the compact string forms operators write (`8080:80/tcp`, `/src:/dst:ro`, `KEY=VALUE`), and the
//! spec hash that tells a matching container from a stale one.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// Labels that mark a container as hoist's; containers are found by these, never by name alone.
pub const LABEL_NODE: &str = "io.hoist.node";
pub const LABEL_NAME: &str = "io.hoist.name";
pub const LABEL_SPEC: &str = "io.hoist.spec";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// `[ip:][host:]container[/proto]`; no host port means Docker picks one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_ip: Option<IpAddr>,
    pub host_port: Option<u16>,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// `src:dst[:ro|rw]`; `src` is an absolute host path or a named volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeMount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

/// 64-bit FNV-1a: a hash that every node and every Rust release computes alike.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The tag or digest of an image reference (`repo:tag`, `repo@sha256:…`); None without either.
pub fn version_of(image: &str) -> Option<String> {
    if let Some((_, digest)) = image.split_once('@') {
        return Some(digest.to_string());
    }
    let last = image.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag.to_string())
}

/// The version part of an image reference: a tag or a pinned digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageVersion {
    Tag(String),
    Digest(String),
}

impl ImageVersion {
    /// Parses a tag (`v2`, `1.4.0-rc1`) or a digest (`sha256:<64 hex>`), as an operator or the KV gives it.
    pub fn parse(value: &str) -> Result<ImageVersion, String> {
        if let Some(hex) = value.strip_prefix("sha256:") {
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Ok(ImageVersion::Digest(value.to_string()));
            }
            return Err(format!("{value:?} is not a valid digest: expected sha256: and 64 lowercase hex digits"));
        }
        let valid_tag = !value.is_empty()
            && value.len() <= 128
            && value.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if valid_tag {
            Ok(ImageVersion::Tag(value.to_string()))
        } else {
            Err(format!(
                "{value:?} is not a valid image tag: use up to 128 of [A-Za-z0-9_.-], not starting with . or -, or a digest sha256:<hex>"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ImageVersion::Tag(t) | ImageVersion::Digest(t) => t,
        }
    }
}

impl fmt::Display for ImageVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container as the runtime should run it: every value resolved (facts interpolated, KV tag applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Hoist's name for it (the key under `containers:`).
    pub name: String,
    /// The Docker container name (`hoist_<name>` by default).
    pub container_name: String,
    pub node: String,
    /// Repository without tag, e.g. `registry.example.net/team/web`.
    pub image: String,
    pub version: ImageVersion,
    /// Arguments after the image; empty means the image's CMD.
    pub command: Vec<String>,
    /// Empty means the image's ENTRYPOINT.
    pub entrypoint: Vec<String>,
    pub network: String,
    pub ports: Vec<PortMapping>,
    pub volumes: Vec<VolumeMount>,
    pub environment: Vec<EnvVar>,
    pub syslog: bool,
    /// Left out of the serialised form (and so of the hash) when unset, so specs made before the
    /// setting existed hash as they did and their containers are not replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_address: Option<String>,
    /// The signal `docker stop` sends first; None leaves the image's `STOPSIGNAL` (else SIGTERM).
    /// Out of the hash when unset, like `syslog_address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

impl ContainerSpec {
    /// `repo:tag` or `repo@sha256:…`, as handed to a pull or create.
    pub fn image_ref(&self) -> String {
        image_ref(&self.image, &self.version)
    }

    /// A stable hash of everything that shapes the running container. A container whose `io.hoist.spec`
    /// label differs from this was made from another definition and is replaced.
    pub fn hash(&self) -> String {
        // FNV-1a over the canonical JSON form: stable across Rust releases, unlike std's hasher.
        let canonical = serde_json::to_vec(self).expect("a spec always serialises");
        format!("{:016x}", fnv1a(&canonical))
    }

    /// The equivalent `docker run` command line, for `hoist validate` and for operators who want to
    /// reproduce a container by hand.
    pub fn docker_run(&self) -> String {
        let mut args: Vec<String> = vec!["docker".into(), "run".into(), "-d".into()];
        args.push(format!("--name {}", shell_quote(&self.container_name)));
        args.push(format!("--network {}", shell_quote(&self.network)));
        for (key, value) in self.labels() {
            args.push(format!("--label {}", shell_quote(&format!("{key}={value}"))));
        }
        if self.syslog {
            args.push("--log-driver syslog".into());
            args.push(format!("--log-opt tag={}", shell_quote(&self.container_name)));
            if let Some(address) = &self.syslog_address {
                args.push(format!("--log-opt syslog-address={}", shell_quote(address)));
            }
        }
        if let Some(signal) = &self.stop_signal {
            args.push(format!("--stop-signal {}", shell_quote(signal)));
        }
        for p in &self.ports {
            args.push(format!("-p {p}"));
        }
        for v in &self.volumes {
            args.push(format!("-v {}", shell_quote(&v.to_string())));
        }
        for e in &self.environment {
            args.push(format!("-e {}", shell_quote(&format!("{}={}", e.key, e.value))));
        }
        if let Some((first, _)) = self.entrypoint.split_first() {
            args.push(format!("--entrypoint {}", shell_quote(first)));
        }
        args.push(shell_quote(&self.image_ref()));
        args.extend(self.entrypoint.iter().skip(1).map(|a| shell_quote(a)));
        args.extend(self.command.iter().map(|a| shell_quote(a)));
        args.join(" ")
    }

    pub fn labels(&self) -> Vec<(&'static str, String)> {
        vec![(LABEL_NODE, self.node.clone()), (LABEL_NAME, self.name.clone()), (LABEL_SPEC, self.hash())]
    }
}

pub fn image_ref(image: &str, version: &ImageVersion) -> String {
    match version {
        ImageVersion::Tag(t) => format!("{image}:{t}"),
        ImageVersion::Digest(d) => format!("{image}@{d}"),
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        match self.host_port {
            Some(port) => write!(f, "{port}:")?,
            None if self.host_ip.is_some() => f.write_str(":")?,
            None => {}
        }
        write!(f, "{}/{}", self.container_port, self.protocol.as_str())
    }
}

impl fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}{}", self.source, self.target, if self.read_only { ":ro" } else { "" })
    }
}

fn parse_port_number(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{what} {s:?} is not a port number from 1 to 65535")),
        Ok(p) => Ok(p),
    }
}

/// Parses Docker's `-p` forms: `80`, `8080:80`, `127.0.0.1:8080:80`, `127.0.0.1::80`,
/// `[::1]:8080:80`, each with an optional `/tcp`, `/udp` or `/sctp`.
pub fn parse_port(input: &str) -> Result<PortMapping, String> {
    let (rest, protocol) = match input.rsplit_once('/') {
        Some((rest, "tcp")) => (rest, Protocol::Tcp),
        Some((rest, "udp")) => (rest, Protocol::Udp),
        Some((rest, "sctp")) => (rest, Protocol::Sctp),
        Some((_, other)) => return Err(format!("protocol {other:?} must be tcp, udp or sctp")),
        None => (input, Protocol::Tcp),
    };
    let (host_ip, rest) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (ip, after) = bracketed.split_once("]:").ok_or("an IPv6 address needs the form [addr]:host:container")?;
        let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
        (Some(ip), after)
    } else {
        let parts: Vec<&str> = rest.split(':').collect();
        if parts.len() == 3 {
            let ip: IpAddr = parts[0].parse().map_err(|_| format!("{:?} is not an IP address", parts[0]))?;
            (Some(ip), &rest[parts[0].len() + 1..])
        } else {
            (None, rest)
        }
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_port, container_port) = match parts.as_slice() {
        [container] if host_ip.is_none() => (None, *container),
        ["", container] if host_ip.is_some() => (None, *container),
        [host, container] => (Some(parse_port_number(host, "host port")?), *container),
        _ => return Err("expected [ip:]host:container[/proto]".into()),
    };
    let container_port = parse_port_number(container_port, "container port")?;
    Ok(PortMapping { host_ip, host_port, container_port, protocol })
}

/// Parses `src:dst[:ro|rw]`.
pub fn parse_volume(input: &str) -> Result<VolumeMount, String> {
    let parts: Vec<&str> = input.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        [_, _, mode] => return Err(format!("mode {mode:?} must be ro or rw")),
        _ => return Err("expected src:dst[:ro|rw]".into()),
    };
    if source.is_empty() {
        return Err("the source is empty".into());
    }
    let named_volume = source.bytes().enumerate().all(|(i, b)| b.is_ascii_alphanumeric() || (i > 0 && matches!(b, b'_' | b'.' | b'-')));
    if !source.starts_with('/') && !named_volume {
        return Err(format!("source {source:?} must be an absolute path or a volume name"));
    }
    if !target.starts_with('/') {
        return Err(format!("target {target:?} must be an absolute path inside the container"));
    }
    Ok(VolumeMount { source: source.into(), target: target.into(), read_only })
}

/// Parses `KEY=VALUE`; the key must be a portable environment variable name.
pub fn parse_env(input: &str) -> Result<EnvVar, String> {
    let (key, value) = input.split_once('=').ok_or("expected KEY=VALUE")?;
    let valid_key = key.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_key {
        return Err(format!("{key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"));
    }
    if value.contains('\0') {
        return Err("the value contains a NUL byte".into());
    }
    Ok(EnvVar { key: key.into(), value: value.into() })
}

/// Checks an image repository: no tag or digest (those come from `image_tag` or the KV), no spaces,
/// lowercase path components.
pub fn validate_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("is empty".into());
    }
    if image.contains('@') {
        return Err(format!("{image:?} carries a digest; put it in image_tag instead"));
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') {
        return Err(format!("{image:?} carries a tag; put it in image_tag instead"));
    }
    let path_start = match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first.len() + 1,
        _ => 0,
    };
    let path = &image[path_start..];
    let valid = !path.is_empty()
        && path
            .split('/')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')));
    if valid { Ok(()) } else { Err(format!("{image:?} is not a valid image repository (lowercase path components)")) }
}

/// Splits a command string the way a POSIX shell would split words: whitespace, single and double
/// quotes, backslash escapes. No expansion happens; the original passed `command` to `docker run` as words.
pub fn split_words(input: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => current.push(ch),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => current.push(ch),
                            Some(ch) => {
                                current.push('\\');
                                current.push(ch);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(ch) => current.push(ch),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(ch) => current.push(ch),
                    None => return Err("trailing backslash".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                current.push(c);
            }
        }
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':' | b'=' | b'@' | b',' | b'+'));
    if plain { s.to_string() } else { format!("'{}'", s.replace('\'', r"'\''")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_all_docker_forms() {
        let p = parse_port("8080:80").unwrap();
        assert_eq!((p.host_ip, p.host_port, p.container_port, p.protocol), (None, Some(8080), 80, Protocol::Tcp));
        let p = parse_port("127.0.0.1:7777:7777/tcp").unwrap();
        assert_eq!(p.host_ip, Some("127.0.0.1".parse().unwrap()));
        let p = parse_port("[::1]:53:53/udp").unwrap();
        assert_eq!((p.host_port, p.protocol), (Some(53), Protocol::Udp));
        assert_eq!(p.to_string(), "[::1]:53:53/udp");
        assert_eq!(parse_port("127.0.0.1::80").unwrap().host_port, None);
        assert_eq!(parse_port("80").unwrap().to_string(), "80/tcp");
        for bad in ["", "x:80", "8080:0", "70000:80", "1.2.3:80:80", "80/icmp", "a:b:c:d"] {
            assert!(parse_port(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn volumes_and_env() {
        assert_eq!(parse_volume("/srv/logs:/logs:ro").unwrap().to_string(), "/srv/logs:/logs:ro");
        assert!(!parse_volume("data:/var/lib/data").unwrap().read_only);
        for bad in ["/a", "rel/path:/b", "/a:rel", "/a:/b:rx", "/a:/b:ro:x", ":/b"] {
            assert!(parse_volume(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(parse_env("A_1=x=y").unwrap().value, "x=y");
        assert_eq!(parse_env("EMPTY=").unwrap().value, "");
        for bad in ["NOEQUALS", "1A=x", "A-B=x", "=x"] {
            assert!(parse_env(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn tags_digests_and_images() {
        assert!(ImageVersion::parse("v1.2-rc_3").is_ok());
        assert!(matches!(ImageVersion::parse(&format!("sha256:{}", "a".repeat(64))), Ok(ImageVersion::Digest(_))));
        for bad in ["", "-x", ".x", "v 2", "a/b", "sha256:xyz", "v2\n"] {
            assert!(ImageVersion::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(validate_image("127.0.0.1:5000/hoist/test").is_ok());
        assert!(validate_image("example/weather").is_ok());
        for bad in ["example/weather:v1", "Example/Weather", "a@sha256:x", "", "a//b"] {
            assert!(validate_image(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"-s nats://n1:4222 --name "a b" 'c d' e\ f"#).unwrap(),
            ["-s", "nats://n1:4222", "--name", "a b", "c d", "e f"]
        );
        assert!(split_words("'open").is_err());
        assert!(split_words("").unwrap().is_empty());
    }

    #[test]
    fn hash_changes_with_the_definition() {
        let spec = ContainerSpec {
            name: "web".into(),
            container_name: "hoist_web".into(),
            node: "n1".into(),
            image: "example/web".into(),
            version: ImageVersion::Tag("v1".into()),
            command: vec!["httpd".into(), "-f".into()],
            entrypoint: vec![],
            network: "bridge".into(),
            ports: vec![parse_port("8080:80").unwrap()],
            volumes: vec![],
            environment: vec![parse_env("A=1").unwrap()],
            syslog: false,
            syslog_address: None,
            stop_signal: None,
        };
        // Pinned: a change to the serialised form would replace every container on an agent upgrade.
        assert_eq!(spec.hash(), "fcf9919eea97cd45");
        let mut other = spec.clone();
        assert_eq!(spec.hash(), other.hash());
        other.version = ImageVersion::Tag("v2".into());
        assert_ne!(spec.hash(), other.hash());
        assert_eq!(
            spec.docker_run(),
            format!(
                "docker run -d --name hoist_web --network bridge --label io.hoist.node=n1 --label io.hoist.name=web --label io.hoist.spec={} -p 8080:80/tcp -e A=1 example/web:v1 httpd -f",
                spec.hash()
            )
        );
        let logged = ContainerSpec { syslog: true, syslog_address: Some("udp://10.0.0.9:514".into()), ..spec.clone() };
        assert_ne!(logged.hash(), spec.hash());
        assert!(logged.docker_run().contains("--log-driver syslog --log-opt tag=hoist_web --log-opt syslog-address=udp://10.0.0.9:514"));
    }
}
