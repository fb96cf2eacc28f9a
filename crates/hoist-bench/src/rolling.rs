//! A rolling update across real agents (the `hoist` binary, distinct node names, one nats-server, one
//! Docker Engine) through a restart governor, against ceil(N/c) × the update time of one node alone.

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

    // One node alone, twice (v1→v2→v1): the per-node update time of the bar, governor included.
    let mut agents = vec![RealAgent::start_with("roll0", 1, Some((&server.url, GOVERNOR))).await?];
    agents[0].wait_run("v1", Duration::from_secs(60)).await?;
    let mut solo = Duration::ZERO;
    for tag in ["v2", "v1"] {
        solo += roll(&observer, &agents[..1], tag).await?;
    }
    let per_node = solo / 2;

    for i in 1..nodes {
        agents.push(RealAgent::start_with(&format!("roll{i}"), 1, Some((&server.url, GOVERNOR))).await?);
    }
    for a in &agents {
        a.wait_run("v1", Duration::from_secs(60)).await?;
    }
    let total = roll(&observer, &agents, "v2").await?;
    let rounds = nodes.div_ceil(capacity as usize) as u32;
    let ideal = per_node * rounds;
    let ratio = total.as_secs_f64() / ideal.as_secs_f64();
    Ok(vec![
        Row::info(
            &scenario,
            "one node alone: update time",
            per_node.as_secs_f64(),
            "s",
            "mean of v1→v2→v1, incl. the 1 s unverified_wait gate",
        ),
        Row::info(
            &scenario,
            "rolling v1→v2: total",
            total.as_secs_f64(),
            "s",
            format!("ideal {:.2} s = {rounds} rounds × one node", ideal.as_secs_f64()),
        ),
        Row::at_most(&scenario, "rolling v1→v2: total / ideal", ratio, "×", 1.1, ""),
    ])
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
