//! [`LatencyHistogram`]: the one read-to-commit histogram, for a run's quantiles and `/metrics`.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `le` bounds `/metrics` exposes, in seconds. Dashboards and alerts query these exact
/// values: change them and every saved query on the old ones silently reads zero.
pub const EXPORTED_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Quarter-power-of-two bounds from 2^(1/4) µs to 2^32 µs (about 71 minutes): 128 of them.
const QUARTER_POWERS: u32 = 128;

/// The fine buckets' upper bounds in nanoseconds, ascending: every quarter power of two (so
/// neighbours are at most 19% apart) and every exported bound (so each exported bucket is a
/// union of whole fine buckets and its count is exact, not interpolated).
static FINE_BOUNDS: LazyLock<Vec<u64>> = LazyLock::new(|| {
    let quarter_powers =
        (1..=QUARTER_POWERS).map(|k| (2f64.powf(f64::from(k) / 4.0) * 1e3).round() as u64);
    let exported = EXPORTED_BOUNDS
        .iter()
        .map(|&seconds| seconds_to_nanos(seconds));
    let mut bounds: Vec<u64> = quarter_powers.chain(exported).collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds
});

fn seconds_to_nanos(seconds: f64) -> u64 {
    (seconds * 1e9).round() as u64
}

/// Read-to-commit latencies, counted in fine buckets.
///
/// One histogram serves both readers, so a run's p50/p99 and the Prometheus series cannot
/// disagree: a run's [`quantile`](Self::quantile)s need their own histogram (the `metrics`
/// recorder is process-wide, absent in library use, and its exported buckets are far too
/// coarse for a benchmark's p50), so the exporter renders this one rather than keeping a
/// second copy of every sample.
///
/// A latency falls in the first bucket whose bound is at or above it (Prometheus's `le`);
/// beyond the last bound it is counted in an overflow bucket that only `+Inf` shows.
#[derive(Debug)]
pub struct LatencyHistogram {
    /// One per fine bound, then the overflow bucket.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: (0..=FINE_BOUNDS.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = FINE_BOUNDS.partition_point(|&bound| bound < nanos);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q` (0 to 1), so at most 19% above the
    /// true value; zero with no samples. A quantile in the overflow bucket is the last bound.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        let bucket = counts
            .iter()
            .position(|count| {
                seen += count;
                seen >= rank
            })
            .unwrap_or(counts.len() - 1);
        let last_bound = FINE_BOUNDS.len() - 1;
        Duration::from_nanos(FINE_BOUNDS[bucket.min(last_bound)])
    }

    /// Appends the histogram in the Prometheus text format as `name`: `# HELP`, `# TYPE`,
    /// a cumulative `_bucket` per [`EXPORTED_BOUNDS`] and `+Inf`, `_sum` (seconds), `_count`.
    pub fn write_prometheus(&self, out: &mut String, name: &str, help: &str) {
        // One snapshot for every line, so the buckets, `+Inf` and `_count` agree even while
        // messages are being recorded.
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        let sum_seconds = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let (mut cumulative, mut counted) = (0, 0);
        for le in EXPORTED_BOUNDS {
            // `le` is itself a fine bound, so the fine buckets up to it are exactly the
            // latencies at or below it.
            let up_to_le = FINE_BOUNDS.partition_point(|&bound| bound <= seconds_to_nanos(le));
            cumulative += counts[counted..up_to_le].iter().sum::<u64>();
            counted = up_to_le;
            // `le` printed as f64 prints it (0.005, 1, 300), as the `metrics` exporter did.
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {sum_seconds}");
        let _ = writeln!(out, "{name}_count {total}");
        out.push('\n');
    }

    fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "test_latency_seconds";

    fn exposition(histogram: &LatencyHistogram) -> String {
        let mut out = String::new();
        histogram.write_prometheus(&mut out, NAME, "Test latencies.");
        out
    }

    /// The value of the one sample line for `series` (name and labels, as printed).
    fn sample(exposition: &str, series: &str) -> f64 {
        let values: Vec<f64> = exposition
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.parse().unwrap())
            .collect();
        assert_eq!(values.len(), 1, "{series} in\n{exposition}");
        values[0]
    }

    fn bucket(exposition: &str, le: &str) -> f64 {
        sample(exposition, &format!("{NAME}_bucket{{le=\"{le}\"}}"))
    }

    #[test]
    fn fine_bounds_ascend_within_a_fifth_and_hold_every_exported_bound() {
        assert!(FINE_BOUNDS.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(
            FINE_BOUNDS
                .windows(2)
                .all(|pair| pair[1] as f64 / pair[0] as f64 <= 2f64.powf(0.25) + 1e-3)
        );
        for le in EXPORTED_BOUNDS {
            assert!(FINE_BOUNDS.binary_search(&seconds_to_nanos(le)).is_ok());
        }
    }

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
    fn a_quantile_past_the_last_bound_is_the_last_bound() {
        let histogram = LatencyHistogram::default();
        histogram.record(Duration::from_secs(100_000));
        assert_eq!(
            histogram.quantile(0.5),
            Duration::from_nanos(*FINE_BOUNDS.last().unwrap())
        );
    }

    #[test]
    fn exported_buckets_count_exactly_at_and_around_each_bound() {
        let histogram = LatencyHistogram::default();
        let mut latencies = vec![Duration::ZERO, Duration::from_micros(1)];
        for le in EXPORTED_BOUNDS {
            let at = Duration::from_nanos(seconds_to_nanos(le));
            // Exactly on a bound counts in it (`le` is "less or equal"); a nanosecond either
            // side is the neighbour's.
            latencies.extend([
                at - Duration::from_nanos(1),
                at,
                at + Duration::from_nanos(1),
            ]);
        }
        latencies.push(Duration::from_secs(100_000));
        for latency in &latencies {
            histogram.record(*latency);
        }

        let text = exposition(&histogram);
        for le in EXPORTED_BOUNDS {
            let expected = latencies
                .iter()
                .filter(|latency| latency.as_nanos() <= u128::from(seconds_to_nanos(le)))
                .count();
            assert_eq!(bucket(&text, &le.to_string()), expected as f64, "le={le}");
        }
        let count = sample(&text, &format!("{NAME}_count"));
        assert_eq!(count, latencies.len() as f64);
        assert_eq!(bucket(&text, "+Inf"), count);
        let sum: Duration = latencies.iter().sum();
        let exposed_sum = sample(&text, &format!("{NAME}_sum"));
        assert!(
            (exposed_sum - sum.as_secs_f64()).abs() < 1e-6,
            "{exposed_sum} vs {sum:?}"
        );
    }

    #[test]
    fn exposition_is_prometheus_text_with_the_dashboards_bounds() {
        let histogram = LatencyHistogram::default();
        histogram.record(Duration::from_millis(7));
        histogram.record(Duration::from_millis(700));
        let text = exposition(&histogram);

        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("# HELP test_latency_seconds Test latencies.")
        );
        assert_eq!(lines.next(), Some("# TYPE test_latency_seconds histogram"));
        let samples: Vec<(&str, &str)> = lines
            .take_while(|line| !line.is_empty())
            .map(|line| line.rsplit_once(' ').expect("`series value`"))
            .collect();
        for (_, value) in &samples {
            value.parse::<f64>().expect("a number");
        }
        let series: Vec<&str> = samples.iter().map(|(series, _)| *series).collect();
        let bounds = [
            "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30",
            "60", "300", "+Inf",
        ];
        let mut expected: Vec<String> = bounds
            .iter()
            .map(|le| format!("{NAME}_bucket{{le=\"{le}\"}}"))
            .collect();
        expected.extend([format!("{NAME}_sum"), format!("{NAME}_count")]);
        assert_eq!(series, expected);
        assert!(text.ends_with("\n\n"), "a blank line ends the family");

        assert_eq!(bucket(&text, "0.005"), 0.0);
        assert_eq!(bucket(&text, "0.01"), 1.0);
        assert_eq!(bucket(&text, "0.5"), 1.0);
        assert_eq!(bucket(&text, "1"), 2.0);
        assert_eq!(sample(&text, &format!("{NAME}_sum")), 0.707);
    }

    #[test]
    fn an_empty_histogram_exposes_zeros() {
        let text = exposition(&LatencyHistogram::default());
        assert_eq!(bucket(&text, "300"), 0.0);
        assert_eq!(bucket(&text, "+Inf"), 0.0);
        assert_eq!(sample(&text, &format!("{NAME}_sum")), 0.0);
        assert_eq!(sample(&text, &format!("{NAME}_count")), 0.0);
    }
}
