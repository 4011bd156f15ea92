//! What one run did: the counters of [`Stats`] and their snapshot, [`Summary`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::telemetry::LatencyHistogram;

/// Counters of one run: give each run its own, or its summary counts more than the run.
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
    /// Read-to-commit latency of every message of a committed batch (a redelivery of one
    /// already stored included). Shared so that `/metrics` exposes these very samples.
    pub(super) read_to_commit: Arc<LatencyHistogram>,
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

impl Summary {
    /// The summary as one JSON object, latencies in milliseconds.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "received": self.received,
            "stored": self.stored,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "acknowledged": self.acknowledged,
            "left_on_queue": self.left_on_queue,
            "write_retries": self.write_retries,
            "p50_ms": self.p50.as_secs_f64() * 1e3,
            "p99_ms": self.p99.as_secs_f64() * 1e3,
        })
    }
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
    /// The run's read-to-commit latencies, for a caller to expose (`ingest` serves them at
    /// `/metrics`).
    pub fn read_to_commit(&self) -> &Arc<LatencyHistogram> {
        &self.read_to_commit
    }

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
            p50: self.read_to_commit.quantile(0.5),
            p99: self.read_to_commit.quantile(0.99),
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
