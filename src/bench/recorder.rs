//! Latency series: an HdrHistogram per series (nanoseconds, 3 significant
//! digits, up to an hour), merged across actors, never averaged.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub name: String,
    pub samples: u64,
    /// (percentile, latency in ms), in the order of [`PERCENTILES`]; 100 is
    /// the maximum.
    pub percentiles_ms: Vec<(f64, f64)>,
    /// The whole distribution, (percentile, latency in ms) out to the last
    /// sample, as charts draw it.
    #[serde(default)]
    pub distribution_ms: Vec<(f64, f64)>,
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

    pub fn mean(&self) -> Duration {
        Duration::from_nanos(self.histogram.mean() as u64)
    }

    /// Forgets every sample (a new reporting period).
    pub fn clear(&mut self) {
        self.histogram.reset();
    }

    /// The distribution as (percentile, latency) steps out to the last
    /// sample: five ticks per halving of the distance to 100 %, as
    /// HdrHistogram's percentile output.
    pub fn distribution(&self) -> Vec<(f64, Duration)> {
        if self.histogram.is_empty() {
            return Vec::new();
        }
        self.histogram
            .iter_quantiles(5)
            .map(|step| (step.quantile_iterated_to() * 100.0, Duration::from_nanos(step.value_iterated_to())))
            .collect()
    }

    /// The latency at `percentile` (100: the maximum).
    pub fn at(&self, percentile: f64) -> Duration {
        if percentile >= 100.0 {
            return Duration::from_nanos(self.histogram.max());
        }
        Duration::from_nanos(self.histogram.value_at_quantile(percentile / 100.0))
    }

    /// The series in HdrHistogram's percentile-distribution text format
    /// (`.hgrm`, as Java's `outputPercentileDistribution` writes it, five
    /// ticks per half distance, values in milliseconds), which HdrHistogram's
    /// plotter and most latency tooling read.
    pub fn hgrm(&self) -> String {
        const NANOS_PER_MS: f64 = 1e6;
        let digits = usize::from(self.histogram.sigfig());
        let mut out =
            format!("{:>12} {:>14} {:>10} {:>14}\n\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
        let mut total = 0_u64;
        for step in self.histogram.iter_quantiles(5) {
            total += step.count_since_last_iteration();
            let value = step.value_iterated_to() as f64 / NANOS_PER_MS;
            let quantile = step.quantile_iterated_to();
            if quantile < 1.0 {
                let inverse = 1.0 / (1.0 - quantile);
                out.push_str(&format!("{value:>12.digits$} {quantile:>2.12} {total:>10} {inverse:>14.2}\n"));
            } else {
                out.push_str(&format!("{value:>12.digits$} {quantile:>2.12} {total:>10}\n"));
            }
        }
        let sub_buckets = (2 * 10_u64.pow(u32::from(self.histogram.sigfig()))).next_power_of_two();
        out.push_str(&format!(
            "#[Mean    = {:>12.digits$}, StdDeviation   = {:>12.digits$}]\n",
            self.histogram.mean() / NANOS_PER_MS,
            self.histogram.stdev() / NANOS_PER_MS
        ));
        out.push_str(&format!(
            "#[Max     = {:>12.digits$}, Total count    = {:>12}]\n",
            self.histogram.max() as f64 / NANOS_PER_MS,
            self.histogram.len()
        ));
        out.push_str(&format!("#[Buckets = {:>12}, SubBuckets     = {:>12}]\n", self.histogram.buckets(), sub_buckets));
        out
    }

    /// A file name for the series' `.hgrm`: its name with every character
    /// that is not alphanumeric as `-`.
    pub fn file_stem(&self) -> String {
        let mut stem = String::new();
        for character in self.name.chars() {
            if character.is_ascii_alphanumeric() {
                stem.push(character);
            } else if !stem.ends_with('-') {
                stem.push('-');
            }
        }
        stem.trim_matches('-').to_owned()
    }

    pub fn summary(&self) -> Summary {
        Summary {
            name: self.name.clone(),
            samples: self.samples(),
            percentiles_ms: PERCENTILES.iter().map(|&p| (p, self.at(p).as_secs_f64() * 1e3)).collect(),
            distribution_ms: self
                .distribution()
                .into_iter()
                .map(|(percentile, latency)| (percentile, latency.as_secs_f64() * 1e3))
                .collect(),
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
    fn an_hgrm_lists_the_distribution_up_to_the_last_sample_in_milliseconds() {
        let mut series = Series::new("end-to-end, 1024 B");
        for micros in 1..=1000 {
            series.record(Duration::from_micros(micros));
        }
        let hgrm = series.hgrm();
        let mut lines = hgrm.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        let rows: Vec<Vec<f64>> = hgrm
            .lines()
            .skip(2)
            .take_while(|line| !line.starts_with('#'))
            .map(|line| line.split_whitespace().map(|field| field.parse().unwrap()).collect())
            .collect();
        // Cumulative counts rise to every sample; the last row is the
        // maximum (1 ms) at percentile 1 with no inverse column.
        assert!(rows.windows(2).all(|pair| pair[0][2] <= pair[1][2] && pair[0][1] <= pair[1][1]));
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3, "{hgrm}");
        assert!((last[0] - 1.0).abs() < 0.001 && last[1] == 1.0 && last[2] == 1000.0, "{hgrm}");
        assert!(hgrm.contains("Total count    =         1000]"), "{hgrm}");
        assert_eq!(series.file_stem(), "end-to-end-1024-B");
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
