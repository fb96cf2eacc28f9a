//! Crash-loop accounting: exponential backoff with jitter between restarts, reset after a long healthy
//! run, and an explicit "crash-looping" condition after too many failures in a window, so a machine is
//! never silently stuck.

use rand::Rng;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(300);
/// Healthy this long and past failures are forgiven.
const RESET_AFTER: Duration = Duration::from_secs(600);
/// This many failures inside `RESET_AFTER` is a crash loop.
const LOOP_THRESHOLD: usize = 5;

#[derive(Debug, Default)]
pub struct CrashLoop {
    consecutive: u32,
    recent: VecDeque<Instant>,
    healthy_since: Option<Instant>,
}

impl CrashLoop {
    /// Records a failure and returns how long to wait before the next attempt. The first failure
    /// restarts at once: most crashes are one-offs, and a killed service should come back in well
    /// under a second.
    pub fn failed(&mut self, now: Instant) -> Duration {
        if self.healthy_since.take().is_some_and(|since| now.duration_since(since) >= RESET_AFTER) {
            self.consecutive = 0;
        }
        self.recent.push_back(now);
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > RESET_AFTER) {
            self.recent.pop_front();
        }
        self.consecutive += 1;
        if self.consecutive == 1 {
            return Duration::ZERO;
        }
        let exp = FIRST_DELAY.saturating_mul(1 << (self.consecutive - 2).min(16)).min(MAX_DELAY);
        // ±20 % jitter keeps a fleet that failed together from retrying together.
        let jitter = rand::rng().random_range(0.8..1.2);
        exp.mul_f64(jitter).min(MAX_DELAY)
    }

    pub fn healthy(&mut self, now: Instant) {
        self.healthy_since.get_or_insert(now);
    }

    /// The explicit failed condition, if the machine is crash-looping.
    pub fn condition(&self) -> Option<String> {
        (self.recent.len() >= LOOP_THRESHOLD && self.healthy_since.is_none())
            .then(|| format!("crash-looping: {} failures in the last {} min", self.recent.len(), RESET_AFTER.as_secs() / 60))
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
            assert!(c.failed(t0) <= MAX_DELAY);
        }
        assert!(c.condition().unwrap().starts_with("crash-looping"));
        c.healthy(t0);
        assert!(c.condition().is_none());
        assert_eq!(c.failed(t0 + RESET_AFTER + Duration::from_secs(1)), Duration::ZERO);
    }
}
