//! `hoist-bench`: measures hoist against the bars of DESIGN.md §7 and prints measured value vs bar.
//! `sim-fleet` is the fleet simulator (real agents and NATS, simulated container runtime); the other
//! scenarios drive the real `hoist` binary, Docker and nats-server.

mod governor;
mod real;
mod report;
mod rolling;
mod sim;
mod single;

use clap::{Parser, Subcommand};
use hoist_core::release::WaveSize;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "hoist-bench", about = "Benchmarks hoist against the bars of DESIGN.md §7")]
struct Cli {
    /// Print the results as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// The fleet simulator: N real agents and NATS clients in one process with a simulated container
    /// runtime; a rollout through a restart governor per capacity, and fleet status over all nodes.
    SimFleet {
        /// Fleet sizes to simulate, one after the other.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        agents: Vec<usize>,
        /// Restart governor capacities; one rollout (v1→v2, v2→v3, ...) per capacity.
        #[arg(long, value_delimiter = ',', default_value = "10,50")]
        capacity: Vec<u64>,
        /// Simulated pull time, milliseconds.
        #[arg(long, default_value_t = 1000)]
        pull_ms: u64,
        /// Simulated time from create to running, milliseconds.
        #[arg(long, default_value_t = 300)]
        start_ms: u64,
        /// Simulated time from running to the HEALTHCHECK reporting healthy, milliseconds.
        #[arg(long, default_value_t = 700)]
        health_ms: u64,
        /// Agents connecting and starting at once.
        #[arg(long, default_value_t = 50)]
        start_concurrency: usize,
        /// Agents sharing one NATS connection (1: each its own, as real nodes; more, for fleets
        /// larger than this machine's file descriptors allow).
        #[arg(long, default_value_t = 1)]
        agents_per_connection: usize,
        /// After the tag puts, a release in these canary waves at every capacity (`hoist release
        /// --waves`); none when empty.
        #[arg(long, value_delimiter = ',', default_value = "1%,10%,100%")]
        release_waves: Vec<String>,
        /// The release's bake time between waves.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        release_bake: Duration,
    },
    /// Real agent (embedded backend, test image): KV put → the machine leaves RUN for UPDATE.
    KvLatency {
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Real agent: `docker kill` → replacement started and machine back in RUN, as a first failure and
    /// repeated (the crash backoff).
    KillRestart {
        /// First failures (the agent is restarted between them).
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Kills of the same container by one agent, each once it is back in RUN.
        #[arg(long, default_value_t = 6)]
        repeats: u32,
    },
    /// Real agent with many containers in RUN: RSS and idle CPU.
    Idle {
        #[arg(long, default_value_t = 50)]
        containers: usize,
        /// Length of the idle window, seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Real agents on one nats-server rolling v1→v2 through a restart governor.
    Rolling {
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        capacity: u64,
    },
    /// Governor acquire/release throughput on the embedded store and on NATS.
    Governor {
        /// Length of each measurement, seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HOIST_BENCH_LOG").unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rows = rt.block_on(async {
        match cli.scenario {
            Scenario::SimFleet {
                agents,
                capacity,
                pull_ms,
                start_ms,
                health_ms,
                start_concurrency,
                agents_per_connection,
                release_waves,
                release_bake,
            } => {
                let latencies = sim::Latencies {
                    pull: Duration::from_millis(pull_ms),
                    start: Duration::from_millis(start_ms),
                    health: Duration::from_millis(health_ms),
                };
                let mut kinds = vec![sim::Kind::Tag];
                let waves: Vec<WaveSize> = release_waves
                    .iter()
                    .filter(|w| !w.is_empty())
                    .map(|w| WaveSize::parse(w))
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?;
                if !waves.is_empty() {
                    kinds.push(sim::Kind::Release { waves, bake: release_bake });
                }
                let opts = sim::FleetOpts {
                    agents,
                    capacities: capacity,
                    kinds,
                    latencies,
                    start_concurrency,
                    per_connection: agents_per_connection,
                };
                sim::fleet(&opts).await
            }
            Scenario::KvLatency { rounds } => single::kv_latency(rounds).await,
            Scenario::KillRestart { rounds, repeats } => single::kill_restart(rounds, repeats).await,
            Scenario::Idle { containers, seconds } => single::idle(containers, Duration::from_secs(seconds)).await,
            Scenario::Rolling { nodes, capacity } => rolling::rolling(nodes, capacity).await,
            Scenario::Governor { seconds } => governor::throughput(Duration::from_secs(seconds)).await,
        }
    })?;
    report::print(&rows, cli.json);
    Ok(())
}
