//! `hoist rollout status NAME`: a container's rollout across the fleet in one read of the nodes'
//! status records (`hoist_core::rollout_status`), with its release when one is recorded.

use crate::kv_access::KvAccess;
use crate::output::{clean, rfc3339};
use clap::Subcommand;
use hoist_core::backend::{BackendError, read_all_if_any};
use hoist_core::clock::unix_now_ms;
use hoist_core::release::{self, OUTCOMES_BUCKET};
use hoist_core::rollout_status::{RolloutSummary, STATUS_BUCKET, summarize};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Where a container's rollout stands: nodes per phase, what blocks them and who, when it ends.
    /// Exits 1 when the release was aborted.
    Status {
        /// The container, by its name in the data files.
        container: String,
        /// Print it again every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

/// How many nodes a blocking reason lists by name before it counts the rest.
const NAMED: usize = 5;

pub async fn run(access: &KvAccess, cmd: RolloutCommand, json: bool) -> anyhow::Result<ExitCode> {
    let RolloutCommand::Status { container, watch } = cmd;
    loop {
        // A bucket the agents have not created yet holds nothing yet.
        let entries = read_all_if_any(access.kv(), STATUS_BUCKET).await?;
        let release = match release::current(access.kv(), &container).await {
            Err(release::ReleaseError::Backend(BackendError::NoBucket(_))) => None,
            other => other?.map(|(record, _)| record),
        };
        let outcomes = read_all_if_any(access.kv(), OUTCOMES_BUCKET).await?;
        let mut summary = summarize(&container, &entries, release, &outcomes, unix_now_ms());
        summary.degraded = match hoist_core::degraded::lookout::active(access.kv(), &container).await {
            Err(BackendError::NoBucket(_)) => None,
            other => other?,
        };
        if json {
            println!("{}", serde_json::to_string(&summary).expect("serialises"));
        } else {
            print!("{}", crate::output::clean_lines(&describe(&summary)));
        }
        if !watch {
            return Ok(if summary.aborted() { ExitCode::FAILURE } else { ExitCode::SUCCESS });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !json {
            println!();
        }
    }
}

fn describe(s: &RolloutSummary) -> String {
    let mut out = match &s.release {
        Some(r) => {
            format!(
                "{}: release {}:{} = {}\n  {}, last changed {} by {}; {} healthy on it, {} failed{}\n",
                clean(&s.container),
                clean(&r.image),
                clean(&r.tag),
                clean(&r.digest),
                crate::release::progress(r),
                rfc3339((r.at_ms / 1000) as i64),
                clean(&r.by),
                s.succeeded,
                s.failed.len(),
                if s.failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.failed.iter().map(|n| clean(n)).collect::<Vec<_>>().join(", "))
                },
            )
        }
        None => format!("{}: no release recorded; the nodes follow the tag key or their data files\n", clean(&s.container)),
    };
    if s.nodes == 0 {
        out.push_str("no node reports this container (none runs it, or their agents are not up)\n");
        return out;
    }
    let phases: Vec<String> = s.phases.iter().map(|(phase, n)| format!("{n} {}", phase.describe())).collect();
    out.push_str(&format!("{} node(s): {}\n", s.nodes, phases.join(", ")));
    for b in &s.blocking {
        out.push_str(&format!("  {}: {}\n", clean(&b.reason), named(b.nodes.clone())));
    }
    let mut unhealthy: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for r in &s.records {
        if let Some(why) = &r.report.unhealthy {
            unhealthy.entry(why).or_default().push(&r.node);
        }
    }
    for (why, nodes) in unhealthy {
        out.push_str(&format!("  unhealthy, {}: {}\n", clean(why), named(nodes.into_iter().map(String::from).collect())));
    }
    if let Some(d) = &s.degraded {
        out.push_str(&format!("{}\n", clean(&d.describe())));
    }
    if let Some(eta) = s.eta_seconds {
        out.push_str(&format!("about {} to go at the pace so far\n", humantime::format_duration(Duration::from_secs(eta))));
    }
    if s.aborted() {
        out.push_str("the release was aborted: the nodes that ran it go back\n");
    }
    out
}

/// The first `NAMED` nodes by name, then how many more.
fn named(nodes: Vec<String>) -> String {
    let mut names: Vec<String> = nodes.iter().take(NAMED).map(|n| clean(n)).collect();
    if nodes.len() > NAMED {
        names.push(format!("and {} more", nodes.len() - NAMED));
    }
    names.join(", ")
}
