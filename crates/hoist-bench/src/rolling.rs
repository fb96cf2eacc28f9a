//! A rolling update across real agents (the `hoist` binary, distinct node names, one nats-server, one
//! Docker Engine) through a restart governor, against ceil(N/c) × the time of one round.
//!
//! A round is c nodes updating at once with nobody waiting: on a real fleet that takes as long as one
//! node alone, but here all agents share one engine and two cores, so c containers starting together
//! are slower than one. The bar is therefore taken against a measured round of c; the ratio against
//! one node alone is printed as well.
//!
//! Every replacement stops the old container gracefully (stop signal, then `stop_grace`). The bench's
//! containers exit on SIGTERM (`DRAINING_COMMAND`), so a round is pull + stop + start + gate, as in
//! DESIGN's ideal, with a stop as short as the app allows; what the stops took is read from Docker's
//! events.

use crate::real::{DockerEvent, NatsServer, RealAgent, docker_events};
use crate::report::Row;
use futures_util::StreamExt;
use hoist_core::backend::{Events, Governor, HOIST_BUCKET, Kv, TransitionEvent, tag_key};
use hoist_nats::{NatsBackend, NatsOptions};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

const GOVERNOR: &str = "RG";

pub async fn rolling(nodes: usize, capacity: u64) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(nodes >= 2, "a rolling update needs at least two nodes");
    let scenario = format!("rolling N={nodes} c={capacity}");
    let server = NatsServer::start().await?;
    let opts = NatsOptions { servers: vec![server.url.clone()], name: "hoist-bench rolling".into(), ..NatsOptions::default() };
    let observer = NatsBackend::connect(opts).await?;
    observer.add(GOVERNOR, capacity, Duration::from_secs(300), 1).await?;

    // Every agent watches the same key, so each baseline runs before the next agents join; each is
    // taken twice (v1→v2→v1), governor included.
    let mut agents = Vec::new();
    let solo = join_and_roll(&server.url, &observer, &mut agents, 1).await?;
    let round = if capacity == 1 { solo } else { join_and_roll(&server.url, &observer, &mut agents, capacity as usize).await? };
    join(&server.url, &mut agents, nodes).await?;
    // Other nodes on this engine (tests, other benches) carry the label too; `stops` keeps ours.
    let (_docker, mut docker) = docker_events("io.hoist.node", &["kill", "die", "start"]).await?;
    let total = roll(&observer, &agents, "v2").await?;
    let stops = stops(&mut docker, &agents);
    let rounds = nodes.div_ceil(capacity as usize) as u32;
    let ratio = total.as_secs_f64() / (round * rounds).as_secs_f64();
    let solo_ratio = total.as_secs_f64() / (solo * rounds).as_secs_f64();
    let stopped = stops.stopping.len();
    let signals = stops.signals.iter().cloned().collect::<Vec<_>>().join(", ");
    Ok(vec![
        Row::info(
            &scenario,
            "one node alone: update time",
            solo.as_secs_f64(),
            "s",
            "mean of v1→v2→v1, incl. the graceful stop and the 1 s unverified_wait gate",
        ),
        Row::info(&scenario, "one round (c nodes at once)", round.as_secs_f64(), "s", "mean of v1→v2→v1 of c nodes on the shared engine"),
        Row::info(&scenario, "rolling v1→v2: total", total.as_secs_f64(), "s", format!("{rounds} rounds, graceful stops")),
        Row::info(
            &scenario,
            "graceful stop (stop signal → exit), mean",
            mean_ms(&stops.stopping),
            "ms",
            format!(
                "max {:.0} ms; {stopped} of {nodes} replacements; signals sent: {signals}; docker events kill → die",
                stops.stopping.iter().max().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
            ),
        ),
        Row::info(
            &scenario,
            "time spent stopping, sum over the nodes",
            stops.stopping.iter().sum::<Duration>().as_secs_f64(),
            "s",
            format!("of the {:.2} s total; with c > 1 stops overlap", total.as_secs_f64()),
        ),
        Row::info(
            &scenario,
            "old container exited → replacement started, mean",
            mean_ms(&stops.exit_to_start),
            "ms",
            "remove, create and start; docker events die → start",
        ),
        Row::info(
            &scenario,
            "total / (rounds × one node alone)",
            solo_ratio,
            "×",
            "the engine's own slowdown with c starts at once included",
        ),
        Row::at_most(&scenario, "total / (rounds × one round)", ratio, "×", 1.05, ""),
    ])
}

/// Starts agents until there are `count`, all in RUN on v1.
async fn join(url: &str, agents: &mut Vec<RealAgent>, count: usize) -> anyhow::Result<()> {
    while agents.len() < count {
        agents.push(RealAgent::start_with(&format!("roll{}", agents.len()), 1, Some((url, GOVERNOR))).await?);
    }
    for a in agents.iter() {
        a.wait_run("v1", Duration::from_secs(60)).await?;
    }
    Ok(())
}

/// `join`s up to `count` agents, rolls them v1→v2→v1 and returns the mean time of one roll.
async fn join_and_roll(url: &str, observer: &NatsBackend, agents: &mut Vec<RealAgent>, count: usize) -> anyhow::Result<Duration> {
    join(url, agents, count).await?;
    let mut sum = Duration::ZERO;
    for tag in ["v2", "v1"] {
        sum += roll(observer, agents, tag).await?;
    }
    Ok(sum / 2)
}

/// Puts `tag` and waits until every agent's machine reached RUN on it; returns the elapsed time.
async fn roll(observer: &NatsBackend, agents: &[RealAgent], tag: &str) -> anyhow::Result<Duration> {
    let mut events = observer.subscribe().await?;
    let suffix = format!(":{tag}");
    let mut pending: HashSet<&str> = agents.iter().map(|a| a.node.as_str()).collect();
    let t0 = Instant::now();
    observer.put(HOIST_BUCKET, &tag_key("web"), tag.as_bytes()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 * agents.len() as u64);
    while !pending.is_empty() {
        let event: TransitionEvent = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| anyhow::anyhow!("{} nodes not on {tag} in time", pending.len()))?
            .ok_or_else(|| anyhow::anyhow!("the event stream ended"))?;
        if event.to_state == "RUN" && event.image.as_deref().is_some_and(|i| i.ends_with(&suffix)) {
            pending.remove(event.identity.as_str());
        }
    }
    Ok(t0.elapsed())
}

/// What the graceful stops of one rollout took, from Docker's events: per replaced container its stop
/// signal (the `kill` event `docker stop` emits) → its exit (`die`), and that exit → the start of the
/// node's new container.
struct Stops {
    stopping: Vec<Duration>,
    exit_to_start: Vec<Duration>,
    /// The signals sent: only the stop signal if no container outlived its grace.
    signals: BTreeSet<String>,
}

/// Reads the events that have arrived (all of the rollout: a start precedes its RUN by the gate).
fn stops(rx: &mut tokio::sync::mpsc::UnboundedReceiver<DockerEvent>, agents: &[RealAgent]) -> Stops {
    let ours: HashSet<&str> = agents.iter().map(|a| a.node.as_str()).collect();
    let mut stops = Stops { stopping: Vec::new(), exit_to_start: Vec::new(), signals: BTreeSet::new() };
    let (mut signalled, mut exited) = (HashMap::<String, Instant>::new(), HashMap::<String, Instant>::new());
    while let Ok(event) = rx.try_recv() {
        if !ours.contains(event.node.as_str()) {
            continue;
        }
        match event.action.as_str() {
            "kill" => {
                stops.signals.insert(event.signal);
                signalled.entry(event.id).or_insert(event.at);
            }
            "die" => {
                if let Some(sent) = signalled.get(&event.id) {
                    stops.stopping.push(event.at.saturating_duration_since(*sent));
                }
                exited.insert(event.node, event.at);
            }
            "start" => {
                if let Some(died) = exited.remove(&event.node) {
                    stops.exit_to_start.push(event.at.saturating_duration_since(died));
                }
            }
            _ => {}
        }
    }
    stops
}

fn mean_ms(sample: &[Duration]) -> f64 {
    if sample.is_empty() {
        return f64::NAN;
    }
    sample.iter().sum::<Duration>().as_secs_f64() * 1000.0 / sample.len() as f64
}
