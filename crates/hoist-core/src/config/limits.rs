//! The ranges an operator can set, in one place: values outside them are accepted by YAML and serde
//! but then spin (`registration.interval: 0` writes the KV in a loop), overflow a timer, or fail later
//! in Docker, a probe or NATS, far from the line that caused it. The README's Configuration section
//! lists the same ranges.

use super::AgentConfig;
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Container data: how often the KV tag is re-read besides the watch.
pub(crate) const KV_INTERVAL: (Duration, Duration) = (SECOND, DAY);
/// Container data: `health_check` timings.
pub(crate) const PROBE_INTERVAL: (Duration, Duration) = (SECOND, HOUR);
pub(crate) const PROBE_TIMEOUT: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(300));
pub(crate) const PROBE_START_PERIOD: (Duration, Duration) = (Duration::ZERO, HOUR);
pub(crate) const PROBE_RETRIES: (u64, u64) = (1, 100);

/// Node names, collectives and prefixes end up in NATS subjects, KV keys and Docker names; longer
/// than this is a mistake, not a name.
const MAX_NAME: usize = 64;
/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// `d` if it lies within `range` (inclusive), else a message that says the range and what was found.
pub(crate) fn within(d: Duration, (min, max): (Duration, Duration)) -> Result<Duration, String> {
    if d < min || d > max {
        return Err(format!("must be from {} to {}, found {}", show(min), show(max), show(d)));
    }
    Ok(d)
}

pub(crate) fn show(d: Duration) -> String {
    if d.is_zero() { "0s".into() } else { humantime::format_duration(d).to_string() }
}

/// Every agent-file setting outside its range, as (field, message).
pub(crate) fn agent(cfg: &AgentConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    let mut range = |field: &'static str, d: Duration, bounds: (Duration, Duration)| {
        if let Err(e) = within(d, bounds) {
            errors.push((field, e));
        }
    };
    range("docker.stop_grace", cfg.docker.stop_grace, (Duration::ZERO, HOUR));
    range("docker.purge_grace", cfg.docker.purge_grace, (Duration::ZERO, DAY));
    range("registration.interval", cfg.registration.interval, (SECOND, HOUR));
    let rollout = &cfg.rollout;
    range("rollout.healthy_deadline", rollout.healthy_deadline, (SECOND, DAY));
    range("rollout.min_healthy_time", rollout.min_healthy_time, (Duration::ZERO, HOUR));
    range("rollout.unverified_wait", rollout.unverified_wait, (Duration::ZERO, HOUR));
    range("rollout.governor_timeout", rollout.governor_timeout, (SECOND, DAY));
    // A gate that must be held longer than it is given can never pass: every update would roll back.
    for (field, wait) in [("rollout.min_healthy_time", rollout.min_healthy_time), ("rollout.unverified_wait", rollout.unverified_wait)] {
        // Only between values each in range, so one mistake is reported once.
        if wait >= rollout.healthy_deadline && wait <= HOUR && rollout.healthy_deadline >= SECOND {
            errors.push((
                field,
                format!(
                    "{} is not shorter than rollout.healthy_deadline ({}), so no container could ever pass its health gate",
                    show(wait),
                    show(rollout.healthy_deadline)
                ),
            ));
        }
    }

    // Choria identities are FQDNs: dots are allowed, as in a KV key, but not as empty tokens.
    let node_ok = is_token(&cfg.node, |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && cfg.node.split('.').all(|token| !token.is_empty());
    if !node_ok {
        errors.push((
            "node",
            format!(
                "{:?} is not a valid node name: it is a KV key and part of NATS subjects, so use 1 to {MAX_NAME} letters, digits, _, - and dots between them (e.g. web01 or web01.example.net)",
                cfg.node
            ),
        ));
    }
    let prefix = &cfg.docker.name_prefix;
    let prefix_ok = prefix.is_empty()
        || (prefix.len() <= MAX_NAME
            && prefix.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
    if !prefix_ok {
        errors.push((
            "docker.name_prefix",
            format!(
                "{prefix:?} cannot begin a Docker container name: use up to {MAX_NAME} of letters, digits, _ . -, starting with a letter or digit (or \"\" for none)"
            ),
        ));
    }
    if let Some(host) = &cfg.docker.host
        && !docker_host_ok(host)
    {
        errors.push(("docker.host", format!("{host:?} is not a Docker Engine address: use unix:///path/to/docker.sock, tcp://host:port, http://host:port or https://host:port")));
    }

    let nats = &cfg.nats;
    if !is_token(&nats.collective, |b| !b.is_ascii_whitespace() && !b.is_ascii_control() && !matches!(b, b'.' | b'*' | b'>')) {
        errors.push((
            "nats.collective",
            format!(
                "{:?} is not a single NATS subject token: use 1 to {MAX_NAME} characters without dots, spaces, * or > (e.g. mcollective)",
                nats.collective
            ),
        ));
    }
    for server in &nats.servers {
        if let Err(e) = nats_server(server) {
            errors.push(("nats.servers", format!("{server:?} {e}; use nats://host:4222, tls://host:4222 or host:4222")));
        }
    }
    let ways = [nats.creds.is_some(), nats.nkey.is_some(), nats.token.is_some()].iter().filter(|&&w| w).count();
    if ways > 1 {
        errors.push(("nats", "creds, nkey and token are different ways to authenticate: give only one".into()));
    }
    if nats.token.as_deref() == Some("") {
        errors.push(("nats.token", "is empty; leave it out to connect without a token".into()));
    }
    let tls = nats.tls.as_ref();
    if tls.is_some_and(|t| t.cert.is_some() != t.key.is_some()) {
        errors.push(("nats.tls", "a client certificate needs both cert and key".into()));
    }
    let files = [
        ("nats.creds", nats.creds.as_ref()),
        ("nats.nkey", nats.nkey.as_ref()),
        ("nats.tls.ca", tls.and_then(|t| t.ca.as_ref())),
        ("nats.tls.cert", tls.and_then(|t| t.cert.as_ref())),
        ("nats.tls.key", tls.and_then(|t| t.key.as_ref())),
    ];
    for (field, path) in files.into_iter().filter_map(|(f, p)| p.map(|p| (f, p))) {
        // Only a missing file is certain: one the CLI's user may not read is still the agent's to read.
        if std::fs::metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            errors.push((field, format!("{} does not exist", path.display())));
        }
    }

    let socket = cfg.control.socket.as_os_str().len();
    if socket > MAX_SOCKET_PATH {
        errors.push((
            "control.socket",
            format!("{} is {socket} bytes long; a Unix socket path may be at most {MAX_SOCKET_PATH} bytes (set a shorter control.socket or state_dir)", cfg.control.socket.display()),
        ));
    }
    if cfg.metrics.listen.is_some_and(|a| a.port() == 0) {
        errors.push(("metrics.listen", "port 0 would listen on a random port nobody scrapes: give the port, e.g. 127.0.0.1:9464".into()));
    }
    errors
}

fn is_token(s: &str, allowed: impl Fn(u8) -> bool) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(allowed)
}

/// The schemes the Docker client connects with; the rest must at least name something.
fn docker_host_ok(host: &str) -> bool {
    ["unix://", "tcp://", "http://", "https://"]
        .iter()
        .any(|scheme| host.strip_prefix(scheme).is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace)))
}

/// `[nats://|tls://|ws://|wss://][user[:pass]@]host[:port]`, the forms the NATS client takes.
fn nats_server(server: &str) -> Result<(), String> {
    let rest = match server.split_once("://") {
        Some((scheme, rest)) if ["nats", "tls", "ws", "wss"].contains(&scheme) => rest,
        Some((scheme, _)) => return Err(format!("has the scheme {scheme}://, which the NATS client does not take")),
        None => server,
    };
    let authority = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6.split_once(']').ok_or("has an unclosed [")?;
        (ip, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':')) {
        return Err("does not name a host".into());
    }
    match port.map(str::parse::<u16>) {
        None | Some(Ok(1..)) => Ok(()),
        Some(_) => Err("has no valid port (1 to 65535)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_server_forms() {
        for ok in ["nats://n1:4222", "tls://n1.example.net:4222", "n1:4222", "n1", "nats://u:p@n1:4222", "[::1]:4222", "ws://n1:8080/"] {
            assert!(nats_server(ok).is_ok(), "{ok}");
        }
        for bad in ["http://n1:4222", "nats://", "n1:0", "n1:port", "nats://n 1:4222", "[::1:4222", ""] {
            assert!(nats_server(bad).is_err(), "{bad}");
        }
    }
}
