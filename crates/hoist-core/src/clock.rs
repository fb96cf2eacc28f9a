//! Time and chance as the core reads them. In production: the system's wall clock, tokio's monotonic
//! clock and the thread RNG. The fault simulator (`hoist-sim`) runs agents on tokio's paused clock and
//! calls `simulate` on its thread first: the wall clock then follows the virtual one from a fixed
//! epoch and the RNG is seeded, so that a seed replays exactly. Intervals are measured with
//! `tokio::time::Instant`, which the paused clock governs, never `std::time::Instant`.

use rand::Rng;
use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

thread_local! {
    static SIMULATED: RefCell<Option<Simulated>> = const { RefCell::new(None) };
}

struct Simulated {
    epoch: SystemTime,
    start: tokio::time::Instant,
    rng: SplitMix64,
}

/// From now on, on this thread: the wall clock reads `epoch` plus the virtual time elapsed, and
/// chance is drawn from `seed`. For the simulator only.
pub fn simulate(epoch: SystemTime, seed: u64) {
    SIMULATED.with(|s| *s.borrow_mut() = Some(Simulated { epoch, start: tokio::time::Instant::now(), rng: SplitMix64::new(seed) }));
}

pub fn system_now() -> SystemTime {
    SIMULATED.with(|s| s.borrow().as_ref().map(|s| s.epoch + s.start.elapsed())).unwrap_or_else(SystemTime::now)
}

/// Seconds since the epoch, as Docker reports container times.
pub fn unix_now() -> i64 {
    system_now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub fn unix_now_ms() -> u64 {
    system_now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `d` spread by ±20 %, so that nodes that failed together do not retry together.
pub fn jitter(d: Duration) -> Duration {
    let factor =
        SIMULATED.with(|s| s.borrow_mut().as_mut().map(|s| 0.8 + 0.4 * s.rng.unit())).unwrap_or_else(|| rand::rng().random_range(0.8..1.2));
    d.mul_f64(factor)
}

/// True with probability `p` (0 to 1).
pub fn chance(p: f64) -> bool {
    let draw = SIMULATED.with(|s| s.borrow_mut().as_mut().map(|s| s.rng.unit())).unwrap_or_else(|| rand::rng().random_range(0.0..1.0));
    draw < p
}

/// Random bytes (ids).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    SIMULATED
        .with(|s| {
            s.borrow_mut().as_mut().map(|s| {
                let mut out = [0u8; N];
                for chunk in out.chunks_mut(8) {
                    chunk.copy_from_slice(&s.rng.next_u64().to_le_bytes()[..chunk.len()]);
                }
                out
            })
        })
        .unwrap_or_else(|| rand::rng().random())
}

/// A small, fast generator whose sequence depends only on its seed (SplitMix64), for the simulator's
/// fault schedules and the simulated chance above.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// In [0, n); 0 when n is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_sequence() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..5).map(|_| SplitMix64::new(8).next_u64()).collect::<Vec<_>>());
        assert!((0..1000).map(|_| a.unit()).all(|u| (0.0..1.0).contains(&u)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_simulated_thread_reads_virtual_time_and_seeded_chance() {
        let epoch = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        simulate(epoch, 1);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(unix_now(), 1_800_000_090);
        let first = (jitter(Duration::from_secs(10)), random_bytes::<16>());
        simulate(epoch, 1);
        assert_eq!((jitter(Duration::from_secs(10)), random_bytes::<16>()), first, "the same seed, the same draws");
        assert!((8.0..12.0).contains(&first.0.as_secs_f64()));
    }
}
