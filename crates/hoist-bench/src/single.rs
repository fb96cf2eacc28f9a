//! Scenarios on one node with the real `hoist` binary, the real Docker Engine and the local test
//! registry: KV put → update start, kill → replacement, and an idle agent's footprint.

use crate::real::{RealAgent, TEST_IMAGE, next_matching, request, watch};
use crate::report::{Row, percentile};
use anyhow::Context;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// KV put (over the control API, as `hoist kv put` does without the process spawn) → the RUN→UPDATE
/// event on the agent's event stream.
pub async fn kv_latency(rounds: usize) -> anyhow::Result<Vec<Row>> {
    let scenario = "kv-latency";
    let agent = RealAgent::start("kv", 1).await?;
    agent.wait_run("v1", Duration::from_secs(60)).await?;
    let mut events = watch(&agent.socket).await?;
    let (mut to_update, mut put_rtt) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let tag = if round % 2 == 0 { "v2" } else { "v1" };
        let t = Instant::now();
        request(&agent.socket, "PUT", "/v1/kv/HOIST/entry/container/web/tag", tag.as_bytes()).await?;
        put_rtt.push(ms(t.elapsed()));
        let update = next_matching(&mut events, Duration::from_secs(10), |e| e["from_state"] == "RUN" && e["to_state"] == "UPDATE").await?;
        to_update.push(ms(update.at.saturating_duration_since(t)));
        next_matching(&mut events, Duration::from_secs(60), |e| e["to_state"] == "RUN").await.with_context(|| format!("round {round}"))?;
    }
    let note = format!("{rounds} puts alternating v1/v2, embedded backend, timed from sending the PUT");
    Ok(vec![
        Row::below(scenario, "KV put → RUN→UPDATE event, p50", percentile(&to_update, 50.0), "ms", 50.0, note),
        Row::info(scenario, "KV put → RUN→UPDATE event, p99", percentile(&to_update, 99.0), "ms", ""),
        Row::info(scenario, "KV put round trip (control API), p50", percentile(&put_rtt, 50.0), "ms", ""),
    ])
}

/// `docker events` for one node's containers, each line stamped on arrival: (instant, action, id).
async fn docker_events(
    node: &str,
) -> anyhow::Result<(tokio::process::Child, tokio::sync::mpsc::UnboundedReceiver<(Instant, String, String)>)> {
    let mut child = Command::new("docker")
        .args(["events", "--filter", &format!("label=io.hoist.node={node}"), "--filter", "event=start", "--filter", "event=die"])
        .args(["--format", "{{.Action}} {{.ID}}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("docker events stdout")?).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let at = Instant::now();
            if let Some((action, id)) = line.split_once(' ')
                && tx.send((at, action.to_string(), id.to_string())).is_err()
            {
                return;
            }
        }
    });
    Ok((child, rx))
}

async fn next_docker(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, String, String)>,
    action: &str,
) -> anyhow::Result<(Instant, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((at, a, id))) if a == action => return Ok((at, id)),
            Ok(Some(_)) => {}
            _ => anyhow::bail!("no docker {action} event"),
        }
    }
}

/// How long Docker itself takes to create and start the test image (through its CLI): the
/// "container's own start time" the kill bar allows on top of 1 s.
async fn own_start_time(node: &str) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new("docker")
            .args(["run", "-d", "--label", &format!("io.hoist.node={node}-baseline"), &format!("{TEST_IMAGE}:v1")])
            .output()
            .await?;
        times.push(t.elapsed().as_secs_f64());
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        anyhow::ensure!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
        Command::new("docker").args(["rm", "-f", &id]).stdout(Stdio::null()).status().await?;
    }
    Ok(Duration::from_secs_f64(percentile(&times, 50.0)))
}

/// `docker kill` → replacement started (Docker's start event) and → machine back in RUN. The agent is
/// restarted between rounds so every kill is a first failure: later ones would measure the crash-loop
/// backoff, which is deliberate behaviour, not reaction time.
pub async fn kill_restart(rounds: usize) -> anyhow::Result<Vec<Row>> {
    let scenario = "kill-restart";
    let mut agent = RealAgent::start("kill", 1).await?;
    let own = own_start_time(&agent.node).await?;
    let (mut to_start, mut to_run) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round > 0 {
            agent.stop().await?;
            agent.spawn().await?;
        }
        let status = agent.wait_run("v1", Duration::from_secs(60)).await?;
        let id = status["machines"][0]["container_id"].as_str().context("no container id")?.to_string();
        let mut events = watch(&agent.socket).await?;
        let (_docker, mut docker) = docker_events(&agent.node).await?;
        // `docker events` subscribes asynchronously; give it a moment so the die event is not missed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kill = Command::new("docker").args(["kill", &id]).stdout(Stdio::null()).status().await?;
        anyhow::ensure!(kill.success(), "docker kill {id} failed");
        let (died, _) = next_docker(&mut docker, "die").await?;
        let (started, new_id) = next_docker(&mut docker, "start").await?;
        anyhow::ensure!(!id.starts_with(&new_id) && new_id != id, "the killed container was restarted in place");
        let run = next_matching(&mut events, Duration::from_secs(60), |e| e["to_state"] == "RUN").await?;
        to_start.push(ms(started.saturating_duration_since(died)));
        to_run.push(ms(run.at.saturating_duration_since(died)));
    }
    let bar = 1000.0 + ms(own);
    let note = format!("{rounds} kills; bar = 1 s + docker run of the image ({:.0} ms)", ms(own));
    Ok(vec![
        Row::below(scenario, "die → replacement started, p50", percentile(&to_start, 50.0), "ms", bar, note),
        Row::below(scenario, "die → replacement started, p99", percentile(&to_start, 99.0), "ms", bar, ""),
        Row::info(scenario, "die → machine RUN, p50", percentile(&to_run, 50.0), "ms", "includes the 1 s unverified_wait gate"),
        Row::info(scenario, "die → machine RUN, p99", percentile(&to_run, 99.0), "ms", ""),
    ])
}

/// An agent with `count` containers, all in RUN, left alone for `window`: RSS and CPU share.
pub async fn idle(count: usize, window: Duration) -> anyhow::Result<Vec<Row>> {
    let scenario = "idle";
    let agent = RealAgent::start("idle", count).await?;
    let pid = agent.pid().context("agent pid")?;
    agent.wait_run("v1", Duration::from_secs(300)).await?;
    // Let start-up work (first registrations, persistence writes, allocator growth) settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tick = clock_ticks().await?;
    let (before, t0) = (cpu_ticks(pid)?, Instant::now());
    tokio::time::sleep(window).await;
    let (after, elapsed) = (cpu_ticks(pid)?, t0.elapsed());
    let cpu = (after - before) as f64 / tick / elapsed.as_secs_f64() * 100.0;
    let rss = rss_kib(pid)? as f64 / 1024.0;
    let status = agent.status().await?;
    let running = status["machines"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "RUN").count());
    let note = format!("{running}/{count} containers in RUN, {:.0} s window", window.as_secs_f64());
    Ok(vec![Row::below(scenario, "agent RSS", rss, "MB", 20.0, note), Row::below(scenario, "agent idle CPU", cpu, "% of a core", 0.5, "")])
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of `/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')').context("bad /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("bad VmRSS")?.parse()?)
}

async fn clock_ticks() -> anyhow::Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output().await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
