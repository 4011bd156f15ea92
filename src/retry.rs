//! Exponential back-off with jitter, for faults that pass (database restarts, KMS throttling,
//! network blips).

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Delays of 100 ms doubling up to 10 s, each drawn from its upper half so that replicas that
/// failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter needs no cryptographic randomness; the std hasher's per-instance keys do.
        let unit = (RandomState::new().hash_one(()) % 1_000) as u32;
        ceiling / 2 + ceiling / 2 * unit / 1_000
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_stays_within_bounds() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for delay in &delays[4..] {
            assert!(*delay >= Duration::from_millis(500) && *delay <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
