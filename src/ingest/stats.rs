//! What one run did: the counters of [`Stats`] and their snapshot, [`Summary`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of one run.
#[derive(Debug, Default)]
pub struct Stats {
    pub(super) received: AtomicU64,
    pub(super) stored: AtomicU64,
    pub(super) quarantined: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) acknowledged: AtomicU64,
    /// Messages whose batch could not be written: left on the queue to be redelivered.
    pub(super) left_on_queue: AtomicU64,
    pub(super) write_retries: AtomicU64,
    /// Read-to-commit latency of every stored or quarantined message.
    pub(super) latency: LatencyHistogram,
}

/// Latencies in buckets a quarter of a power of two wide (about 19% apart), from 1 µs up.
///
/// The one latency histogram of the crate. The Prometheus one, [`telemetry::READ_TO_COMMIT`]
/// (recorded beside it), cannot give a run its quantiles: it exists only when a recorder is
/// installed (not in library use: tests and benchmarks), it is process-wide (several runs in one
/// process would share it) and its buckets (5 ms to 5 min) are too coarse for a benchmark's p50.
///
/// [`telemetry::READ_TO_COMMIT`]: crate::telemetry::READ_TO_COMMIT
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; 128],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let micros = latency.as_micros().max(1) as f64;
        let bucket = ((micros.log2() * 4.0) as usize).min(self.buckets.len() - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q` (0 to 1), or zero with no samples.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos((2f64.powf((bucket + 1) as f64 / 4.0) * 1e3) as u64);
            }
        }
        Duration::MAX
    }
}

/// A snapshot of [`Stats`]. Once a run has ended,
/// `received == stored + quarantined + duplicates + left_on_queue`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Deliveries read from the source (a redelivered message counts each time).
    pub received: u64,
    /// New rows in `user_logins`.
    pub stored: u64,
    /// New rows in `quarantine`.
    pub quarantined: u64,
    /// Deliveries of messages already stored or quarantined.
    pub duplicates: u64,
    /// Deliveries deleted from the source after their batch committed.
    pub acknowledged: u64,
    /// Messages whose batch could not be written: left to be redelivered.
    pub left_on_queue: u64,
    /// Database writes retried after a transient fault.
    pub write_retries: u64,
    /// Read-to-commit latency quantiles (to about 19%).
    pub p50: Duration,
    pub p99: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received={} stored={} quarantined={} duplicates={} acknowledged={} left_on_queue={} write_retries={} p50_ms={:.1} p99_ms={:.1}",
            self.received,
            self.stored,
            self.quarantined,
            self.duplicates,
            self.acknowledged,
            self.left_on_queue,
            self.write_retries,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
        )
    }
}

impl Stats {
    pub fn summary(&self) -> Summary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Summary {
            received: get(&self.received),
            stored: get(&self.stored),
            quarantined: get(&self.quarantined),
            duplicates: get(&self.duplicates),
            acknowledged: get(&self.acknowledged),
            left_on_queue: get(&self.left_on_queue),
            write_retries: get(&self.write_retries),
            p50: self.latency.quantile(0.5),
            p99: self.latency.quantile(0.99),
        }
    }
}

/// Counts `n` in this run's [`Stats`] and in the process's metrics.
pub(super) fn add(counter: &AtomicU64, metric: &'static str, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
    metrics::counter!(metric).increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds_within_a_fifth() {
        let histogram = LatencyHistogram::default();
        assert_eq!(histogram.quantile(0.5), Duration::ZERO);
        for _ in 0..50 {
            histogram.record(Duration::from_millis(1));
            histogram.record(Duration::from_millis(10));
        }
        let (p50, p99) = (histogram.quantile(0.5), histogram.quantile(0.99));
        assert!(p50 >= Duration::from_millis(1) && p50 <= Duration::from_micros(1_190));
        assert!(p99 >= Duration::from_millis(10) && p99 <= Duration::from_micros(11_900));
    }

    #[test]
    fn summary_display_keeps_its_format() {
        let summary = Summary {
            received: 7,
            stored: 3,
            quarantined: 1,
            duplicates: 2,
            acknowledged: 6,
            left_on_queue: 1,
            write_retries: 4,
            p50: Duration::from_micros(1_500),
            p99: Duration::from_millis(20),
        };
        assert_eq!(
            summary.to_string(),
            "received=7 stored=3 quarantined=1 duplicates=2 acknowledged=6 left_on_queue=1 write_retries=4 p50_ms=1.5 p99_ms=20.0"
        );
    }
}
