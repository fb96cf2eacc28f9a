//! Scenarios on one node with the real `hoist` binary, the real Docker Engine and the local test
//! registry: KV put → update start, kill → replacement, and an idle agent's footprint.

use crate::real::{DRAINING_COMMAND, DockerEvent, RealAgent, TEST_IMAGE, docker_events, next_matching, request, watch};
use crate::report::{Row, percentile};
use anyhow::Context;
use hoist_core::backoff::BackoffConfig;
use std::process::Stdio;
use std::time::{Duration, Instant};
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

/// The next event of `rx` with this action (others are skipped), within a minute.
async fn next_docker(rx: &mut tokio::sync::mpsc::UnboundedReceiver<DockerEvent>, action: &str) -> anyhow::Result<DockerEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) if event.action == action => return Ok(event),
            Ok(Some(_)) => {}
            _ => anyhow::bail!("no docker {action} event"),
        }
    }
}

/// How long Docker itself takes to create and start the bench's container (the test image with
/// `DRAINING_COMMAND`, through its CLI): the "image's own `docker run`" of the first-failure bar.
async fn own_start_time(node: &str) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = Command::new("docker")
            .args(["run", "-d", "--label", &format!("io.hoist.node={node}-baseline"), &format!("{TEST_IMAGE}:v1")])
            .args(DRAINING_COMMAND)
            .output()
            .await?;
        times.push(t.elapsed().as_secs_f64());
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        anyhow::ensure!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
        Command::new("docker").args(["rm", "-f", &id]).stdout(Stdio::null()).status().await?;
    }
    Ok(Duration::from_secs_f64(percentile(&times, 50.0)))
}

/// One `docker kill` of the agent's container once it is in RUN, timed from Docker's die event.
struct Kill {
    /// The killed container removed (`destroy`): the agent noticed the death and cleared the name.
    to_removed: Duration,
    /// The replacement created: what is left of `to_start` is Docker starting it.
    to_created: Duration,
    to_start: Duration,
    to_run: Duration,
    /// What status showed once the machine had left RUN (read only when asked: polling the control
    /// socket while the replacement runs would load the agent being timed).
    activity: Option<String>,
}

async fn kill_once(agent: &RealAgent, read_activity: bool) -> anyhow::Result<Kill> {
    let status = agent.wait_run("v1", Duration::from_secs(60)).await?;
    let id = status["machines"][0]["container_id"].as_str().context("no container id")?.to_string();
    let mut events = watch(&agent.socket).await?;
    let (_docker, mut docker) = docker_events(&format!("io.hoist.node={}", agent.node), &["die", "destroy", "create", "start"]).await?;
    let kill = Command::new("docker").args(["kill", &id]).stdout(Stdio::null()).status().await?;
    anyhow::ensure!(kill.success(), "docker kill {id} failed");
    let died = next_docker(&mut docker, "die").await?;
    let activity = if read_activity { Some(activity_after_run(agent).await?) } else { None };
    // In this order: the replacement takes the name the dead container held.
    let removed = next_docker(&mut docker, "destroy").await?;
    let created = next_docker(&mut docker, "create").await?;
    let started = next_docker(&mut docker, "start").await?;
    anyhow::ensure!(!id.starts_with(&started.id) && started.id != id, "the killed container was restarted in place");
    let run = next_matching(&mut events, Duration::from_secs(120), |e| e["to_state"] == "RUN").await?;
    let since_death = |at: Instant| at.saturating_duration_since(died.at);
    Ok(Kill {
        to_removed: since_death(removed.at),
        to_created: since_death(created.at),
        to_start: since_death(started.at),
        to_run: since_death(run.at),
        activity,
    })
}

/// The first activity status shows for the machine once it is out of RUN.
async fn activity_after_run(agent: &RealAgent) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = agent.status().await?;
        let machine = &status["machines"][0];
        if machine["state"] != "RUN"
            && let Some(activity) = machine["activity"].as_str()
        {
            return Ok(activity.to_string());
        }
        anyhow::ensure!(Instant::now() < deadline, "status showed no activity after the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The delay before the k-th restart in a row as the crash backoff documents it (before its ±20 %
/// jitter): the first at once, then `initial` doubling up to `max`.
fn documented_delay(k: u32, backoff: &BackoffConfig) -> Duration {
    match k {
        0 | 1 => Duration::ZERO,
        _ => backoff.initial.saturating_mul(1 << (k - 2).min(16)).min(backoff.max),
    }
}

/// The wait status announced, in seconds: `restart in 2.1 s (backoff after 3 failures)`, or none for
/// an immediate restart (`starting <image>`).
fn announced_delay(activity: &str) -> Option<f64> {
    if activity.starts_with("starting ") {
        return Some(0.0);
    }
    activity.strip_prefix("restart in ")?.split_once(" s")?.0.parse().ok()
}

/// `docker kill` → replacement started (Docker's start event) and → machine back in RUN, two ways.
/// First failures: the agent is restarted between rounds, so every kill is a first failure, which
/// the DESIGN bar is about. Repeated failures: `repeats` kills of the same container by one agent,
/// each once it is back in RUN; a healthy run shorter than `reset_after` forgives nothing, so the k-th
/// kill waits out the k-th step of the crash backoff, printed next to the documented schedule.
pub async fn kill_restart(rounds: usize, repeats: u32) -> anyhow::Result<Vec<Row>> {
    let scenario = "kill-restart";
    let mut agent = RealAgent::start("kill", 1).await?;
    let own = own_start_time(&agent.node).await?;
    let (mut to_removed, mut removed_to_created, mut created_to_start) = (Vec::new(), Vec::new(), Vec::new());
    let (mut to_start, mut to_run) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round > 0 {
            agent.stop().await?;
            agent.spawn().await?;
        }
        let kill = kill_once(&agent, false).await?;
        to_removed.push(ms(kill.to_removed));
        removed_to_created.push(ms(kill.to_created - kill.to_removed));
        created_to_start.push(ms(kill.to_start - kill.to_created));
        to_start.push(ms(kill.to_start));
        to_run.push(ms(kill.to_run));
    }
    let bar = ms(own) + 50.0;
    let note = format!(
        "{rounds} first failures (agent restarted between kills); bar = docker run of the same container ({:.0} ms) + 50 ms",
        ms(own)
    );
    let mut rows = vec![
        Row::at_most(scenario, "first failure: die → replacement started, p50", percentile(&to_start, 50.0), "ms", bar, note),
        Row::at_most(scenario, "first failure: die → replacement started, p99", percentile(&to_start, 99.0), "ms", bar, ""),
        Row::info(
            scenario,
            "first failure: die → old container removed, p50",
            percentile(&to_removed, 50.0),
            "ms",
            "docker events die → destroy",
        ),
        Row::info(
            scenario,
            "first failure: removed → new one created, p50",
            percentile(&removed_to_created, 50.0),
            "ms",
            "destroy → create",
        ),
        Row::info(scenario, "first failure: created → started, p50", percentile(&created_to_start, 50.0), "ms", "create → start"),
        Row::info(
            scenario,
            "first failure: die → machine RUN, p50",
            percentile(&to_run, 50.0),
            "ms",
            "includes the 1 s unverified_wait gate",
        ),
        Row::info(scenario, "first failure: die → machine RUN, p99", percentile(&to_run, 99.0), "ms", ""),
    ];
    // A fresh agent forgets earlier failures, so the first of these kills is a first failure again.
    agent.stop().await?;
    agent.spawn().await?;
    let backoff = BackoffConfig::default();
    for k in 1..=repeats {
        let kill = kill_once(&agent, true).await?;
        let predicted = documented_delay(k, &backoff).as_secs_f64();
        let schedule = if predicted == 0.0 {
            "backoff predicts 0 s".to_string()
        } else {
            format!("backoff predicts {} s ({:.1}–{:.1} s with ±20 % jitter)", predicted, predicted * 0.8, predicted * 1.2)
        };
        let activity = kill.activity.unwrap_or_default();
        // What the replacement took beyond the wait the agent announced: its reaction time.
        let beyond = announced_delay(&activity).map_or(String::new(), |d| format!(", {:.2} s beyond it", kill.to_start.as_secs_f64() - d));
        let note = format!("{schedule}; status: \"{activity}\"{beyond}");
        rows.push(Row::info(scenario, &format!("repeated kill {k}: die → replacement started"), kill.to_start.as_secs_f64(), "s", note));
    }
    Ok(rows)
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
    let [rss, anon, file] = rss_kib(pid)?.map(|kib| kib as f64 / 1024.0);
    let status = agent.status().await?;
    let running = status["machines"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "RUN").count());
    let note =
        format!("{running}/{count} containers in RUN, {:.0} s window; RssAnon {anon:.1} MB, RssFile {file:.1} MB", window.as_secs_f64());
    Ok(vec![Row::below(scenario, "agent RSS", rss, "MB", 12.0, note), Row::below(scenario, "agent idle CPU", cpu, "% of a core", 0.5, "")])
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of `/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')').context("bad /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// VmRSS and its parts RssAnon (heap, stacks) and RssFile (pages of the mapped binary and
/// libraries), in KiB: a miss reads differently when it is the binary's code.
fn rss_kib(pid: u32) -> anyhow::Result<[u64; 3]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        Ok(line.split_whitespace().nth(1).with_context(|| format!("bad {name}"))?.parse()?)
    };
    Ok([field("VmRSS:")?, field("RssAnon:")?, field("RssFile:")?])
}

async fn clock_ticks() -> anyhow::Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output().await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
