//! Latency series: an HdrHistogram per series (nanoseconds, 3 significant
//! digits, up to an hour), merged across actors, never averaged.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles every report gives, out to p99.9999.
pub const PERCENTILES: [f64; 10] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 99.999, 99.9999, 100.0];
/// The longest latency a histogram holds; longer ones are recorded as this.
const LATENCY_MAX: Duration = Duration::from_secs(3600);

/// One latency series (e.g. end-to-end, 1 KiB).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    histogram: Histogram<u64>,
}

/// A series' figures, in milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub name: String,
    pub samples: u64,
    /// (percentile, latency in ms), in the order of [`PERCENTILES`]; 100 is
    /// the maximum.
    pub percentiles_ms: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>) -> Series {
        let histogram = Histogram::new_with_bounds(1, LATENCY_MAX.as_nanos() as u64, 3)
            .unwrap_or_else(|error| unreachable!("constant histogram bounds are valid: {error}"));
        Series { name: name.into(), histogram }
    }

    pub fn record(&mut self, latency: Duration) {
        let nanos = (latency.as_nanos() as u64).clamp(1, LATENCY_MAX.as_nanos() as u64);
        self.histogram.saturating_record(nanos);
    }

    /// Adds another actor's samples of the same series.
    pub fn merge(&mut self, other: &Series) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn samples(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `percentile` (100: the maximum).
    pub fn at(&self, percentile: f64) -> Duration {
        if percentile >= 100.0 {
            return Duration::from_nanos(self.histogram.max());
        }
        Duration::from_nanos(self.histogram.value_at_quantile(percentile / 100.0))
    }

    pub fn summary(&self) -> Summary {
        Summary {
            name: self.name.clone(),
            samples: self.samples(),
            percentiles_ms: PERCENTILES.iter().map(|&p| (p, self.at(p).as_secs_f64() * 1e3)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_give_the_percentiles_of_all_samples_not_an_average() {
        let mut fast = Series::new("a");
        let mut slow = Series::new("a");
        for _ in 0..99 {
            fast.record(Duration::from_micros(100));
        }
        slow.record(Duration::from_millis(100));
        let mut merged = Series::new("a");
        merged.merge(&fast);
        merged.merge(&slow);
        assert_eq!(merged.samples(), 100);
        let within = |actual: Duration, expected: Duration| {
            let (a, e) = (actual.as_nanos() as f64, expected.as_nanos() as f64);
            (a - e).abs() <= e * 0.001
        };
        assert!(within(merged.at(50.0), Duration::from_micros(100)));
        assert!(within(merged.at(99.0), Duration::from_micros(100)));
        // The one slow sample is the maximum, and p99.9 of 100 samples.
        assert!(within(merged.at(99.9), Duration::from_millis(100)));
        assert!(within(merged.at(100.0), Duration::from_millis(100)));
    }

    #[test]
    fn a_summary_lists_every_percentile_in_milliseconds() {
        let mut series = Series::new("e2e");
        series.record(Duration::from_millis(2));
        let summary = series.summary();
        assert_eq!(summary.percentiles_ms.len(), PERCENTILES.len());
        assert!(summary.percentiles_ms.iter().all(|&(_, ms)| (ms - 2.0).abs() < 0.01), "{summary:?}");
    }
}
