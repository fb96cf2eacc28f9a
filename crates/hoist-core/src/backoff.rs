//! Waiting between attempts. `CrashLoop` is the crash-loop accounting of a container: the first
//! failure restarts at once, later ones wait an exponentially growing delay with jitter, past failures
//! are forgiven after a long healthy run, and too many failures in a window are an explicit
//! "crash-looping" condition, so a machine is never silently stuck. `Retry` is the plain growing wait
//! for things that are nobody's fault (a pull the registry refuses, a coordination backend that does
//! not answer): it never counts as a crash.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// This many failures inside `reset_after` is a crash loop.
const LOOP_THRESHOLD: usize = 5;

/// The crash backoff's settings (`rollout.restart_backoff` in the agent file, `restart_backoff` per
/// container). Defaults as Kubernetes' CrashLoopBackOff caps and forgives (5 min, 10 min), but with
/// an immediate first restart and a 1 s first delay, since most crashes are one-offs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffConfig {
    /// The delay before the second restart in a row; each further failure doubles it.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Healthy this long and past failures are forgiven.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { initial: Duration::from_secs(1), max: Duration::from_secs(300), reset_after: Duration::from_secs(600) }
    }
}

#[derive(Debug, Default)]
pub struct CrashLoop {
    config: BackoffConfig,
    consecutive: u32,
    recent: VecDeque<Instant>,
    healthy_since: Option<Instant>,
}

impl CrashLoop {
    pub fn new(config: BackoffConfig) -> CrashLoop {
        CrashLoop { config, ..CrashLoop::default() }
    }

    pub fn reconfigure(&mut self, config: BackoffConfig) {
        self.config = config;
    }

    /// Records a failure and returns how long to wait before the next attempt. The first failure
    /// restarts at once: most crashes are one-offs, and a killed service should come back in well
    /// under a second.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let window = self.config.reset_after;
        if self.healthy_since.take().is_some_and(|since| now.duration_since(since) >= window) {
            self.consecutive = 0;
        }
        self.recent.push_back(now);
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.recent.pop_front();
        }
        self.consecutive += 1;
        if self.consecutive == 1 {
            return Duration::ZERO;
        }
        let exp = self.config.initial.saturating_mul(1 << (self.consecutive - 2).min(16)).min(self.config.max);
        crate::clock::jitter(exp).min(self.config.max)
    }

    /// `failed`, without the immediate first restart: while the fleet is degraded every restart
    /// waits at least the first delay, so a shared outage is not met by a restart storm.
    pub fn failed_patiently(&mut self, now: Instant) -> Duration {
        let wait = self.failed(now);
        if wait.is_zero() { crate::clock::jitter(self.config.initial).min(self.config.max) } else { wait }
    }

    pub fn healthy(&mut self, now: Instant) {
        self.healthy_since.get_or_insert(now);
    }

    /// Failures in a row, not yet forgiven by a long enough healthy run.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// The explicit failed condition, if the machine is crash-looping.
    pub fn condition(&self) -> Option<String> {
        (self.recent.len() >= LOOP_THRESHOLD && self.healthy_since.is_none()).then(|| {
            format!("crash-looping: {} failures in the last {}", self.recent.len(), humantime::format_duration(self.config.reset_after))
        })
    }
}

/// A growing wait between retries of something that is not the container's fault: 1 s, 2 s, 4 s …
/// up to 30 s, with jitter; `reset` once it worked.
#[derive(Debug, Default)]
pub struct Retry {
    attempts: u32,
}

impl Retry {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    pub fn next_wait(&mut self) -> Duration {
        let exp = Self::FIRST.saturating_mul(1 << self.attempts.min(8)).min(Self::MAX);
        self.attempts += 1;
        crate::clock::jitter(exp).min(Self::MAX)
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_reports_a_loop_then_forgives() {
        let mut c = CrashLoop::default();
        let t0 = Instant::now();
        assert_eq!(c.failed(t0), Duration::ZERO);
        let d2 = c.failed(t0);
        assert!(d2 >= Duration::from_millis(800) && d2 <= Duration::from_millis(1200), "{d2:?}");
        let d3 = c.failed(t0);
        assert!(d3 >= Duration::from_millis(1600), "{d3:?}");
        assert!(c.condition().is_none());
        for _ in 0..10 {
            assert!(c.failed(t0) <= Duration::from_secs(300));
        }
        assert!(c.condition().unwrap().starts_with("crash-looping"));
        c.healthy(t0);
        assert!(c.condition().is_none());
        assert_eq!(c.failed(t0 + Duration::from_secs(601)), Duration::ZERO);
    }

    #[test]
    fn the_settings_shape_the_delays() {
        let config = BackoffConfig { initial: Duration::from_secs(10), max: Duration::from_secs(15), reset_after: Duration::from_secs(20) };
        let mut c = CrashLoop::new(config);
        let t0 = Instant::now();
        assert_eq!(c.failed(t0), Duration::ZERO);
        let d2 = c.failed(t0);
        assert!(d2 >= Duration::from_secs(8) && d2 <= Duration::from_secs(12), "{d2:?}");
        assert!(c.failed(t0) <= Duration::from_secs(15), "capped");
        c.healthy(t0);
        assert_eq!(c.failed(t0 + Duration::from_secs(21)), Duration::ZERO, "forgiven after reset_after");
        assert_eq!(c.consecutive(), 1);
    }

    #[test]
    fn while_the_fleet_is_degraded_not_even_the_first_restart_is_immediate() {
        let config =
            BackoffConfig { initial: Duration::from_secs(10), max: Duration::from_secs(60), reset_after: Duration::from_secs(600) };
        let mut c = CrashLoop::new(config);
        let t0 = Instant::now();
        let first = c.failed_patiently(t0);
        assert!((Duration::from_secs(8)..=Duration::from_secs(12)).contains(&first), "{first:?}");
        // Later ones grow as always, and count toward the loop.
        let second = c.failed_patiently(t0 + Duration::from_secs(1));
        assert!(second >= Duration::from_secs(8), "{second:?}");
        assert_eq!(c.consecutive(), 2);
    }

    #[test]
    fn retries_grow_to_a_cap_and_reset() {
        let mut r = Retry::default();
        let first = r.next_wait();
        assert!(first <= Duration::from_millis(1200), "{first:?}");
        for _ in 0..20 {
            assert!(r.next_wait() <= Duration::from_secs(30));
        }
        r.reset();
        assert!(r.next_wait() <= Duration::from_millis(1200));
    }
}
