//! `hoist transition NAME T --wait`: follows one machine until it settles, printing what it does as it
//! changes (pull progress, governor waits, health confirmation), like `kubectl rollout status`. The exit
//! code says whether it settled cleanly, so scripts can chain on it.

use crate::control::client::ControlClient;
use crate::output;
use hoist_core::fsm::{State, Transition};
use hoist_core::status::MachineStatus;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Often enough to show pull progress (reported at most twice a second) as it moves.
const POLL: Duration = Duration::from_millis(250);

/// Waits up to `limit` for the machine to rest in the state `transition` leads to with nothing in
/// progress. Success when it does without a reported condition (such as a rollback).
pub async fn until_settled(
    client: &ControlClient,
    container: &str,
    transition: Transition,
    limit: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let target = match transition {
        Transition::Stop | Transition::Maintenance => State::Maintenance,
        _ => State::Run,
    };
    let deadline = Instant::now() + limit;
    let mut shown = String::new();
    loop {
        let status = client.status(Some(container)).await?;
        let Some(m) = status.machines.into_iter().next() else {
            anyhow::bail!("no container named {container:?} is managed on {}", status.node);
        };
        let settled = m.state == target && m.activity.is_none();
        if settled || Instant::now() >= deadline {
            return Ok(report(container, &m, settled, limit, json));
        }
        let line = match &m.activity {
            Some(activity) => format!("{}: {activity}", m.state),
            None => m.state.to_string(),
        };
        if !json && line != shown {
            println!("{container}: {}", output::clean(&line));
            shown = line;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn report(container: &str, m: &MachineStatus, settled: bool, limit: Duration, json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string_pretty(m).expect("serialises"));
    }
    let clean = settled && m.condition.is_none();
    if !json {
        let mut text = if settled {
            format!("{container}: {} on {}", m.state, output::clean(&m.version))
        } else {
            format!("{container}: still {} after {}", m.state, humantime::format_duration(limit))
        };
        if let Some(why) = m.condition.as_ref().or(m.last_error.as_ref().filter(|_| !settled)) {
            text.push_str(&format!("; {}", output::clean(why)));
        }
        if clean { println!("{text}") } else { eprintln!("{text}") }
    }
    if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
