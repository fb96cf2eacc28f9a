//! The deterministic fault simulator — a simulator, for tests, beside the real-parts end-to-end
//! tests and never instead of them. One seed is one run: a small fleet of real core agents (the
//! `hoist_core::agent` and its machines, unchanged) on tokio's paused clock, over simulated engines
//! (`engine.rs`) and a simulated KV and governor with Choria's semantics (`world.rs`), rolling out a
//! new version (good or broken) while the faults the seed draws (`plan.rs`) hit it. The invariants
//! are checked while it runs and once the faults are over (`check.rs`); a violation fails the seed,
//! and `cargo run -p hoist-sim -- --seed N` replays it exactly, with its trace.
//!
//! Determinism: one thread, the paused clock, `hoist_core::clock` pointed at a virtual epoch and a
//! seeded generator, ordered maps, and biased selects. `same_seed_same_trace` holds it to that.

mod check;
mod engine;
mod fleet;
pub mod plan;
mod view;
mod world;

use std::time::{Duration, UNIX_EPOCH};

/// The virtual wall clock's start: what `hoist_core::clock` reads at time zero of a run.
const EPOCH_SECS: u64 = 1_800_000_000;

/// Virtual time since the run began.
fn elapsed() -> Duration {
    Duration::from_millis(hoist_core::clock::unix_now_ms().saturating_sub(EPOCH_SECS * 1000))
}

/// What a run found.
#[derive(Debug)]
pub struct Outcome {
    pub plan: plan::Plan,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// The nodes that started a container of the broken version.
    pub tried_broken: Vec<String>,
    /// Virtual time the run took.
    pub simulated: Duration,
}

impl Outcome {
    /// The command that replays this run, trace and all.
    pub fn replay(&self) -> String {
        format!("cargo run -p hoist-sim --release -- --seed {}", self.plan.seed)
    }
}

/// Runs one seed to the end, on a runtime of its own on this thread.
pub fn run(seed: u64) -> Outcome {
    run_plan(plan::Plan::of(seed))
}

/// Runs a plan made by hand (a scenario a test wants exactly), chance drawn from its seed.
pub fn run_plan(plan: plan::Plan) -> Outcome {
    quiet_simulated_panics();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("a runtime");
    runtime.block_on(async {
        hoist_core::clock::simulate(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS), plan.seed.rotate_left(17) ^ 0x5eed);
        fleet::simulate(plan).await
    })
}

/// The panics the simulator injects (`Fault::AdapterPanics`) are expected: they are not printed.
/// Any other panic is, as usual.
fn quiet_simulated_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let simulated = info.payload().downcast_ref::<String>().is_some_and(|m| m.starts_with(engine::SIMULATED_PANIC));
            if !simulated {
                default(info);
            }
        }));
    });
}
