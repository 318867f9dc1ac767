//! Waits between attempts to reach a server: doubling from a first wait up to a cap, each
//! drawn at random from the upper half of its range, so that the thousands of clients a
//! server restart cuts off together come back spread out instead of in lockstep.

use std::time::Duration;

/// The waits of one client; [`Backoff::reset`] after an attempt that worked.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
    /// This process's random source (std's hasher keys come from the OS).
    random: std::collections::hash_map::RandomState,
}

impl Backoff {
    /// Waits from `first` (the first one in [first / 2, first]) doubling up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            failures: 0,
            random: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The last attempt worked: the waits start short again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// How long to wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        use std::hash::BuildHasher;
        let draw = self.random.hash_one(self.failures);
        let wait = wait(
            self.first,
            self.cap,
            self.failures,
            draw as f64 / u64::MAX as f64,
        );
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// The longest wait.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

/// The wait after `failures` failed attempts, `draw` in [0, 1] placing it in the upper half
/// of `first × 2^failures` (capped at `cap`).
fn wait(first: Duration, cap: Duration, failures: u32, draw: f64) -> Duration {
    let ceiling = first.saturating_mul(1u32 << failures.min(16)).min(cap);
    ceiling / 2 + ceiling.mul_f64(draw.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(2);
    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn waits_double_up_to_the_cap_within_the_upper_half_of_each_range() {
        for (failures, low, high) in [(0, 1.0, 2.0), (1, 2.0, 4.0), (2, 4.0, 8.0), (3, 8.0, 16.0)] {
            assert_eq!(wait(FIRST, CAP, failures, 0.0).as_secs_f64(), low);
            assert_eq!(wait(FIRST, CAP, failures, 1.0).as_secs_f64(), high);
        }
        for failures in [4, 5, 30, u32::MAX] {
            assert_eq!(wait(FIRST, CAP, failures, 0.0), CAP / 2);
            assert_eq!(wait(FIRST, CAP, failures, 1.0), CAP);
        }
    }

    #[test]
    fn clients_cut_off_together_come_back_spread_out() {
        // A thousand clients (each its own random source) lose the server at once: their
        // first attempts spread over the whole first range, not onto one instant.
        let mut first: Vec<Duration> = (0..1000)
            .map(|_| Backoff::new(FIRST, CAP).next_wait())
            .collect();
        first.sort();
        assert!(first[0] >= FIRST / 2 && first[999] <= FIRST, "{first:?}");
        let spread = first[999] - first[0];
        assert!(spread > FIRST / 3, "spread over {spread:?} only");
        let tenth = first[100] - first[0];
        assert!(tenth < spread / 3, "bunched: {tenth:?} of {spread:?}");
    }

    #[test]
    fn a_reset_starts_short_again() {
        let mut backoff = Backoff::new(FIRST, CAP);
        for _ in 0..10 {
            backoff.next_wait();
        }
        assert!(backoff.next_wait() >= CAP / 2);
        backoff.reset();
        assert!(backoff.next_wait() <= FIRST);
    }
}
