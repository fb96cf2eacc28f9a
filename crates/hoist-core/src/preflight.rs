//! Preflight runs: before a new version replaces the running container, its image runs once with the
//! container's environment and its volumes read-only, no published ports, a name and labels of its
//! own, and the `preflight.command` (a config check, a migration dry-run, `--version`). Exit 0 lets
//! the replacement go on; anything else fails the version on this node, with the output's tail as
//! the reason, while the old container never stopped.
//!
//! The preflight container is labelled as a hoist container named `<name>.preflight`, which no data
//! file declares: if the agent dies mid-run, the next start purges it as an orphan.

use crate::spec::{ContainerSpec, VolumeMount};
use std::time::Duration;

/// What the preflight container is called, after its container's.
pub const SUFFIX: &str = "preflight";

/// How much of a failed run's output becomes the reason.
pub const OUTPUT_TAIL_LINES: usize = 10;

/// The container a preflight of `spec` runs as.
pub fn spec(spec: &ContainerSpec, command: &[String]) -> ContainerSpec {
    ContainerSpec {
        name: format!("{}.{SUFFIX}", spec.name),
        container_name: format!("{}-{SUFFIX}", spec.container_name),
        command: command.to_vec(),
        ports: Vec::new(),
        volumes: spec.volumes.iter().map(|v| VolumeMount { read_only: true, ..v.clone() }).collect(),
        // Its output is read back from the engine, so it goes to the engine's own log.
        syslog: false,
        syslog_address: None,
        ..spec.clone()
    }
}

/// The container whose preflight a container named `label` (its `io.hoist.name`) is, if it is one.
pub fn of(label: &str) -> Option<&str> {
    label.strip_suffix(SUFFIX)?.strip_suffix('.')
}

/// How a preflight run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// None: it was still running at its timeout, and was killed.
    pub exit_code: Option<i64>,
    /// The last lines of its output (stdout and stderr).
    pub output: String,
}

/// Whether the version may replace the running container; why not, for status and the release's
/// outcome.
pub fn verdict(run: &Run, timeout: Duration) -> Result<(), String> {
    let tail = |output: &str| {
        let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join(" | ");
        if tail.is_empty() { String::new() } else { format!(": {tail}") }
    };
    match run.exit_code {
        Some(0) => Ok(()),
        Some(code) => Err(format!("preflight failed (exit {code}){}", tail(&run.output))),
        None => Err(format!("preflight timed out after {}{}", humantime::format_duration(timeout), tail(&run.output))),
    }
}

/// `hoist validate`'s rendering of the preflight: `docker run --rm` of its container.
pub fn docker_run(spec: &ContainerSpec, command: &[String]) -> String {
    self::spec(spec, command).docker_run().replacen("docker run -d", "docker run --rm", 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{EnvVar, ImageVersion, PortMapping};

    fn web() -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            container_name: "hoist_web".into(),
            node: "n1".into(),
            image: "r/web".into(),
            version: ImageVersion::Tag("v2".into()),
            command: vec!["httpd".into()],
            entrypoint: vec![],
            network: "bridge".into(),
            ports: vec![crate::spec::parse_port("8080:80").unwrap()],
            volumes: vec![VolumeMount { source: "/srv/web".into(), target: "/data".into(), read_only: false }],
            environment: vec![EnvVar { key: "DB".into(), value: "db1".into() }],
            syslog: true,
            syslog_address: None,
            stop_signal: None,
        }
    }

    #[test]
    fn the_preflight_runs_the_new_image_with_the_environment_and_volumes_read_only_and_no_ports() {
        let run = spec(&web(), &["app".into(), "--check-config".into()]);
        assert_eq!((run.name.as_str(), run.container_name.as_str()), ("web.preflight", "hoist_web-preflight"));
        assert_eq!(run.image_ref(), "r/web:v2");
        assert_eq!(run.command, ["app", "--check-config"]);
        assert_eq!(run.ports, Vec::<PortMapping>::new());
        assert!(run.volumes.iter().all(|v| v.read_only), "{:?}", run.volumes);
        assert_eq!(run.environment, web().environment);
        assert!(!run.syslog);
        assert_ne!(run.hash(), web().hash(), "never taken for the container itself");
        assert_eq!((of(&run.name), of("web"), of("webpreflight")), (Some("web"), None, None));
        let shown = docker_run(&web(), &["app".into(), "--check-config".into()]);
        assert!(shown.starts_with("docker run --rm --name hoist_web-preflight"), "{shown}");
        assert!(shown.contains("-v /srv/web:/data:ro") && !shown.contains("-p "), "{shown}");
        assert!(shown.ends_with("r/web:v2 app --check-config"), "{shown}");
    }

    #[test]
    fn only_exit_0_passes_and_a_failure_says_why_in_the_outputs_last_lines() {
        let run = |exit_code, output: &str| Run { exit_code, output: output.into() };
        let timeout = Duration::from_secs(30);
        assert_eq!(verdict(&run(Some(0), "ok"), timeout), Ok(()));
        let output: String = (1..=15).map(|i| format!("line {i}\n")).collect();
        let failed = verdict(&run(Some(3), &output), timeout).unwrap_err();
        assert!(failed.starts_with("preflight failed (exit 3): line 6 | "), "{failed}");
        assert!(failed.ends_with("line 15"), "{failed}");
        assert_eq!(verdict(&run(None, ""), timeout).unwrap_err(), "preflight timed out after 30s");
        assert_eq!(verdict(&run(Some(1), "\n\n"), timeout).unwrap_err(), "preflight failed (exit 1)");
    }
}
