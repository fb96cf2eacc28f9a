//! A rolling update across real agents (the `hoist` binary, distinct node names, one nats-server, one
//! Docker Engine) through a restart governor, against ceil(N/c) × the time of one round.
//!
//! A round is c nodes updating at once with nobody waiting: on a real fleet that takes as long as one
//! node alone, but here all agents share one engine and two cores, so c containers starting together
//! are slower than one. The bar is therefore taken against a measured round of c; the ratio against
//! one node alone is printed as well.

use crate::real::{NatsServer, RealAgent};
use crate::report::Row;
use futures_util::StreamExt;
use hoist_core::backend::{Events, Governor, HOIST_BUCKET, Kv, TransitionEvent, tag_key};
use hoist_nats::{NatsBackend, NatsOptions};
use std::collections::HashSet;
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
    let total = roll(&observer, &agents, "v2").await?;
    let rounds = nodes.div_ceil(capacity as usize) as u32;
    let ratio = total.as_secs_f64() / (round * rounds).as_secs_f64();
    let solo_ratio = total.as_secs_f64() / (solo * rounds).as_secs_f64();
    Ok(vec![
        Row::info(
            &scenario,
            "one node alone: update time",
            solo.as_secs_f64(),
            "s",
            "mean of v1→v2→v1, incl. the 1 s unverified_wait gate",
        ),
        Row::info(&scenario, "one round (c nodes at once)", round.as_secs_f64(), "s", "mean of v1→v2→v1 of c nodes on the shared engine"),
        Row::info(&scenario, "rolling v1→v2: total", total.as_secs_f64(), "s", format!("{rounds} rounds")),
        Row::info(
            &scenario,
            "total / (rounds × one node alone)",
            solo_ratio,
            "×",
            "the engine's own slowdown with c starts at once included",
        ),
        Row::at_most(&scenario, "total / (rounds × one round)", ratio, "×", 1.1, ""),
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
