//! `hoist-sim --seed N` replays one seed of the fault simulator and prints its trace;
//! `hoist-sim --seeds A..B` runs a range and prints the seeds that failed.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seeds = match args.as_slice() {
        [flag, seed] if flag == "--seed" => seed.parse::<u64>().ok().map(|s| s..s + 1),
        [flag, range] if flag == "--seeds" => range.split_once("..").and_then(|(a, b)| Some(a.parse().ok()?..b.parse().ok()?)),
        _ => None,
    };
    let Some(seeds) = seeds else {
        eprintln!("usage: hoist-sim --seed N | --seeds A..B");
        return ExitCode::from(2);
    };
    let single = seeds.end - seeds.start == 1;
    let mut failed = 0;
    for seed in seeds {
        let outcome = hoist_sim::run(seed);
        if single {
            for line in &outcome.trace {
                println!("{line}");
            }
        }
        if !outcome.violations.is_empty() {
            failed += 1;
            println!("seed {seed} FAILED ({:?} simulated): {}", outcome.simulated, outcome.violations.join(" | "));
        } else if single {
            println!("seed {seed} passed ({:?} simulated)", outcome.simulated);
        }
    }
    if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
