//! Checks of a valid configuration against the host it runs on: things that are not wrong in the
//! files but will fail here. They are warnings, not refusals (see the README's Configuration section).

use super::{ContainerSet, DockerConfig, Ensure};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Where Docker's syslog log driver looks for the local syslog socket when no `syslog-address` is set
/// (the engine's own list, tried in this order).
pub const LOCAL_SYSLOG_SOCKETS: [&str; 3] = ["/dev/log", "/var/run/syslog", "/var/run/log"];

/// A warning when containers log to the local syslog and there is no local syslog socket: Docker then
/// fails to create them ("failed to initialize logging driver") and they never start. Only an engine on
/// this host (a local socket) can be checked; `docker_host_env` is `DOCKER_HOST`, used when
/// `docker.host` is not set.
pub fn syslog_warning(set: &ContainerSet, docker: &DockerConfig, docker_host_env: Option<&str>, sockets: &[&str]) -> Option<String> {
    if docker.syslog_address.is_some() {
        return None;
    }
    let engine = docker.host.as_deref().or(docker_host_env);
    if engine.is_some_and(|host| !host.starts_with("unix://")) {
        return None;
    }
    let logging: Vec<&str> = set.containers.values().filter(|c| c.syslog && c.ensure == Ensure::Present).map(|c| c.name.as_str()).collect();
    let socket_found = sockets.iter().any(|s| std::fs::metadata(Path::new(s)).is_ok_and(|m| m.file_type().is_socket()));
    if logging.is_empty() || socket_found {
        return None;
    }
    Some(format!(
        "container(s) {} have syslog: true, but this host has no local syslog socket ({}), so Docker cannot create them and they will not start; set docker.syslog_address in the agent file (e.g. udp://10.0.0.9:514) or run a syslog daemon that provides /dev/log",
        logging.join(", "),
        sockets.join(", ")
    ))
}
