//! Turning Docker's inspect document into hoist's `ContainerInfo`.

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use hoist_core::runtime::{ContainerInfo, RunState, RuntimeHealth};
use std::net::{IpAddr, Ipv4Addr};

pub(crate) fn container_info(c: ContainerInspectResponse) -> ContainerInfo {
    let state = c.state.unwrap_or_default();
    let config = c.config.unwrap_or_default();
    let run_state = run_state(state.status);
    // Docker reports 0 for a container that has not exited yet; that is no exit code.
    let exit_code = match run_state {
        RunState::Exited | RunState::Dead => state.exit_code,
        _ => None,
    };
    let host_network = c.host_config.and_then(|h| h.network_mode).is_some_and(|m| m == "host");
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        container_name: c.name.unwrap_or_default().trim_start_matches('/').to_string(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        image: config.image.unwrap_or_default(),
        image_id: c.image.unwrap_or_default(),
        // Filled in from the image (`DockerRuntime::digests`): the container's document lacks it.
        image_digest: None,
        state: run_state,
        health: health(state.health.and_then(|h| h.status)),
        exit_code,
        created: c.created.as_deref().map_or(0, unix_seconds),
        started_at: state.started_at.as_deref().map_or(0, unix_seconds),
        ip: if host_network { Some(IpAddr::V4(Ipv4Addr::LOCALHOST)) } else { network_ip(c.network_settings) },
    }
}

/// The address on the container's network; with several networks the one sorting first by name, so
/// the answer does not change between inspections.
fn network_ip(settings: Option<bollard::models::NetworkSettings>) -> Option<IpAddr> {
    let mut networks: Vec<_> = settings?.networks?.into_iter().collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    networks.into_iter().find_map(|(_, endpoint)| endpoint.ip_address.filter(|ip| !ip.is_empty())?.parse().ok())
}

fn run_state(status: Option<ContainerStateStatusEnum>) -> RunState {
    match status {
        Some(ContainerStateStatusEnum::RUNNING) => RunState::Running,
        // Newer engines report "stopping" while the stop signal is pending: the process still runs.
        Some(ContainerStateStatusEnum::STOPPING) => RunState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => RunState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => RunState::Restarting,
        Some(ContainerStateStatusEnum::REMOVING) => RunState::Removing,
        Some(ContainerStateStatusEnum::EXITED) => RunState::Exited,
        Some(ContainerStateStatusEnum::DEAD) => RunState::Dead,
        Some(ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::EMPTY) | None => RunState::Created,
    }
}

fn health(status: Option<HealthStatusEnum>) -> RuntimeHealth {
    match status {
        Some(HealthStatusEnum::STARTING) => RuntimeHealth::Starting,
        Some(HealthStatusEnum::HEALTHY) => RuntimeHealth::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => RuntimeHealth::Unhealthy,
        Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => RuntimeHealth::None,
    }
}

/// Unix seconds of an RFC 3339 timestamp as Docker writes them (`2024-05-01T12:00:00.123456789Z`,
/// or with a `+02:00` offset). Docker's zero time (`0001-01-01T00:00:00Z`, "never") and anything
/// unparsable give 0, which `ContainerInfo` defines as "not started".
pub(crate) fn unix_seconds(text: &str) -> i64 {
    parse_rfc3339(text).filter(|&secs| secs > 0).unwrap_or(0)
}

fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Skip the fraction; seconds are all hoist keeps.
    let rest = text[19..].strip_prefix('.').map_or(&text[19..], |f| f.trim_start_matches(|c: char| c.is_ascii_digit()));
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = rest[1..].split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)
        }
    };
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's civil-calendar algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_timestamps() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), 0);
        assert_eq!(unix_seconds("1970-01-02T00:00:01Z"), 86_401);
        assert_eq!(unix_seconds("2024-02-29T12:34:56.123456789Z"), 1_709_210_096);
        assert_eq!(unix_seconds("2024-02-29T14:34:56+02:00"), 1_709_210_096);
        assert_eq!(unix_seconds("2024-02-29T07:04:56.5-05:30"), 1_709_210_096);
        assert_eq!(unix_seconds("2000-03-01T00:00:00Z"), 951_868_800);
    }

    #[test]
    fn zero_time_and_garbage_are_zero() {
        assert_eq!(unix_seconds("0001-01-01T00:00:00Z"), 0);
        for bad in ["", "yesterday", "2024-13-01T00:00:00Z", "2024-01-01T00:00:00", "2024-01-01T00:00:00+0200"] {
            assert_eq!(unix_seconds(bad), 0, "{bad}");
        }
    }

    #[test]
    fn maps_an_inspected_container() {
        let doc: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "Id": "abc",
            "Name": "/hoist_web",
            "Created": "2024-02-29T12:34:56.1Z",
            "Image": "sha256:feed",
            "State": {"Status": "exited", "ExitCode": 3, "StartedAt": "0001-01-01T00:00:00Z",
                      "Health": {"Status": "unhealthy"}},
            "Config": {"Image": "reg/web:v1", "Labels": {"io.hoist.node": "n1"}},
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {"Networks": {"zeta": {"IPAddress": "10.0.0.9"}, "bridge": {"IPAddress": "172.17.0.2"}}}
        }))
        .unwrap();
        let info = container_info(doc);
        assert_eq!(info.id, "abc");
        assert_eq!(info.container_name, "hoist_web");
        assert_eq!(info.label("io.hoist.node"), Some("n1"));
        assert_eq!(info.image, "reg/web:v1");
        assert_eq!(info.image_id, "sha256:feed");
        assert_eq!(info.state, RunState::Exited);
        assert_eq!(info.health, RuntimeHealth::Unhealthy);
        assert_eq!(info.exit_code, Some(3));
        assert_eq!((info.created, info.started_at), (1_709_210_096, 0));
        assert_eq!(info.ip, Some("172.17.0.2".parse().unwrap()));
    }

    #[test]
    fn host_network_is_loopback_and_running_has_no_exit_code() {
        let doc: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "State": {"Status": "running", "ExitCode": 0},
            "HostConfig": {"NetworkMode": "host"},
            "NetworkSettings": {"Networks": {"host": {"IPAddress": ""}}}
        }))
        .unwrap();
        let info = container_info(doc);
        assert_eq!(info.state, RunState::Running);
        assert_eq!(info.health, RuntimeHealth::None);
        assert_eq!(info.exit_code, None);
        assert_eq!(info.ip, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}

/// The digest in `repo_digests` (Docker's `RepoDigests`, `repo@sha256:…`) for the repository of
/// `image_ref` (`repo:tag` or `repo@digest`). An image pulled from two repositories has one per repository.
pub(crate) fn repo_digest(image_ref: &str, repo_digests: &[String]) -> Option<String> {
    let repo = match image_ref.split_once('@') {
        Some((repo, _)) => repo,
        None => match image_ref.rsplit_once(':') {
            // A colon after the last slash separates the tag; one before it is a registry's port.
            Some((repo, tag)) if !tag.contains('/') => repo,
            _ => image_ref,
        },
    };
    repo_digests.iter().find_map(|d| d.strip_prefix(repo)?.strip_prefix('@')).map(str::to_string)
}

#[cfg(test)]
mod digest_tests {
    use super::repo_digest;

    #[test]
    fn the_digest_of_the_containers_own_repository() {
        let digests = vec!["mirror.example/app@sha256:bbb".to_string(), "127.0.0.1:5000/hoist/test@sha256:aaa".to_string()];
        assert_eq!(repo_digest("127.0.0.1:5000/hoist/test:latest", &digests).as_deref(), Some("sha256:aaa"));
        assert_eq!(repo_digest("127.0.0.1:5000/hoist/test@sha256:aaa", &digests).as_deref(), Some("sha256:aaa"));
        assert_eq!(repo_digest("127.0.0.1:5000/hoist/test", &digests).as_deref(), Some("sha256:aaa"), "no tag, a port");
        assert_eq!(repo_digest("mirror.example/app:v2", &digests).as_deref(), Some("sha256:bbb"));
        assert_eq!(repo_digest("127.0.0.1:5000/hoist/testing:v1", &digests), None, "a longer name is another repository");
        assert_eq!(repo_digest("local/imported:v1", &[]), None, "an imported image has none");
    }
}
