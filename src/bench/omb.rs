//! The OpenMessaging Benchmark's formats: its YAML workload files, read as
//! they are, and its result JSON (`TestResult`), written with its field
//! names so that OMB's own `bin/create_charts.py` reads weir's results.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::recorder::Series;
use super::{MESSAGE_BYTES_MAX, RATE_PER_SECOND_MAX, SECONDS_MAX};

/// The largest workload file read (OMB's are under 2 KiB).
pub const WORKLOAD_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// The most topics a workload may create.
pub const TOPICS_MAX: u32 = 10_000;
/// The most producers, and the most consumers, a workload may run in all
/// (each is at least one connection; weir's producers one per partition).
pub const ACTORS_MAX: u64 = 1_000;
/// The most partitions per topic a workload may ask for (the broker's own
/// `max_partitions` may refuse fewer).
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;
/// OMB's key pool: 10,000 distinct keys (`KeyDistributor.UNIQUE_COUNT`).
pub const KEY_POOL_SIZE: usize = 10_000;
/// The most distinct payloads a randomized workload may ask for.
pub const PAYLOAD_POOL_MAX: u32 = 100_000;
/// Bytes at the start of each payload that carry its intended and actual
/// send times (so the smallest message a workload may ask for).
pub const STAMP_BYTES: usize = 16;
/// The most bytes of distinct payloads a workload may ask the generator to
/// hold (`randomizedPayloadPoolSize` × `messageSize`).
pub const PAYLOAD_POOL_BYTES_MAX: u64 = 1 << 30;
/// The most producer connections a workload may open on weir, where a
/// producer has one per partition (topics × producers per topic ×
/// partitions per topic).
pub const PRODUCER_CONNECTIONS_MAX: u64 = 10_000;
/// The largest backlog a workload may ask for, in GiB.
pub const BACKLOG_GB_MAX: f64 = 1024.0;

/// How OMB chooses each message's key.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KeyDistributor {
    /// No key: messages are spread over the partitions.
    #[default]
    NoKey,
    /// The pool's keys in turn.
    KeyRoundRobin,
    /// A key of the pool at random for each message.
    RandomNano,
}

/// An OMB workload file. Field names and defaults are OMB's
/// (`io.openmessaging.benchmark.Workload`); fields weir does not use are
/// kept by name so that the report can list them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub topics: u32,
    pub partitions_per_topic: u32,
    #[serde(default)]
    pub key_distributor: KeyDistributor,
    pub message_size: usize,
    #[serde(default)]
    pub use_randomized_payloads: bool,
    /// The share of each randomized payload that is random (the rest zeros).
    #[serde(default)]
    pub random_bytes_ratio: f64,
    #[serde(default)]
    pub randomized_payload_pool_size: u32,
    /// A file whose bytes are every message's payload (OMB ships them under
    /// `payload/`); relative to the workload file's directory, then to the
    /// working directory. Without it, or when it is not there, payloads are
    /// random bytes of `messageSize` (the report says which).
    #[serde(default)]
    pub payload_file: Option<String>,
    pub subscriptions_per_topic: u32,
    pub producers_per_topic: u32,
    pub consumer_per_subscription: u32,
    /// Messages a second over all producers; 0: as fast as the windows
    /// allow (see docs/BENCH.md: OMB instead probes for the highest
    /// sustainable rate).
    pub producer_rate: u64,
    #[serde(default, rename = "consumerBacklogSizeGB")]
    pub consumer_backlog_size_gb: f64,
    /// The share of the backlog to drain before the test resumes (OMB: 1.0).
    #[serde(default = "one")]
    pub backlog_drain_ratio: f64,
    pub test_duration_minutes: f64,
    #[serde(default = "one")]
    pub warmup_duration_minutes: f64,
    /// Every other field of the file, by name: OMB fields weir does not
    /// implement (e.g. `producerStartRate`, `producerIncrementRate`).
    #[serde(flatten, skip_serializing)]
    pub unused: BTreeMap<String, serde::de::IgnoredAny>,
}

fn one() -> f64 {
    1.0
}

/// A workload file that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {WORKLOAD_FILE_BYTES_MAX} bytes; not an OMB workload file")]
    TooLarge { path: String },
    #[error("{path}: not an OMB workload: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Workload {
    /// Reads and checks a workload file.
    ///
    /// # Errors
    /// The file cannot be read, is not an OMB workload, or asks for more
    /// than the bench's bounds.
    pub fn load(path: &Path) -> Result<Workload, WorkloadError> {
        let shown = path.display().to_string();
        let read = |source| WorkloadError::Read { path: shown.clone(), source };
        let length = std::fs::metadata(path).map_err(read)?.len();
        if length > WORKLOAD_FILE_BYTES_MAX {
            return Err(WorkloadError::TooLarge { path: shown });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Workload::parse(&text).map_err(|error| match error {
            WorkloadError::Parse { message, .. } => WorkloadError::Parse { path: shown.clone(), message },
            WorkloadError::Invalid { message, .. } => WorkloadError::Invalid { path: shown.clone(), message },
            other => other,
        })
    }

    /// Parses and checks a workload's text.
    ///
    /// # Errors
    /// Not an OMB workload, or outside the bench's bounds.
    pub fn parse(text: &str) -> Result<Workload, WorkloadError> {
        let workload: Workload = serde_saphyr::from_str(text)
            .map_err(|error| WorkloadError::Parse { path: String::new(), message: error.to_string() })?;
        workload.check_bounds().map_err(|message| WorkloadError::Invalid { path: String::new(), message })?;
        Ok(workload)
    }

    /// Checks every field against OMB's rules and the bench's bounds.
    ///
    /// # Errors
    /// The first field out of bounds, by name.
    pub fn check_bounds(&self) -> Result<(), String> {
        let within = |name: &str, value: u64, low: u64, high: u64| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                Err(format!("{name} is {value}; it must be between {low} and {high}"))
            }
        };
        within("topics", self.topics.into(), 1, TOPICS_MAX.into())?;
        within("partitionsPerTopic", self.partitions_per_topic.into(), 1, PARTITIONS_PER_TOPIC_MAX.into())?;
        within("messageSize", self.message_size as u64, STAMP_BYTES as u64, MESSAGE_BYTES_MAX as u64)?;
        within("producersPerTopic", self.producers_per_topic.into(), 1, ACTORS_MAX)?;
        within("subscriptionsPerTopic", self.subscriptions_per_topic.into(), 0, ACTORS_MAX)?;
        within("consumerPerSubscription", self.consumer_per_subscription.into(), 1, ACTORS_MAX)?;
        within("producers in all", self.producer_count(), 1, ACTORS_MAX)?;
        within("consumers in all", self.consumer_count(), 0, ACTORS_MAX)?;
        within("producerRate", self.producer_rate, 0, RATE_PER_SECOND_MAX)?;
        if self.producer_rate > 0 && self.producer_rate < self.producer_count() {
            return Err(format!(
                "producerRate is {}; at least one message a second per producer ({}) is needed",
                self.producer_rate,
                self.producer_count()
            ));
        }
        within(
            "producer connections (topics x producersPerTopic x partitionsPerTopic)",
            self.producer_count() * u64::from(self.partitions_per_topic),
            1,
            PRODUCER_CONNECTIONS_MAX,
        )?;
        if self.use_randomized_payloads {
            within("randomizedPayloadPoolSize", self.randomized_payload_pool_size.into(), 1, PAYLOAD_POOL_MAX.into())?;
            within(
                "randomizedPayloadPoolSize x messageSize",
                u64::from(self.randomized_payload_pool_size) * self.message_size as u64,
                1,
                PAYLOAD_POOL_BYTES_MAX,
            )?;
            if !(0.0..=1.0).contains(&self.random_bytes_ratio) {
                return Err(format!("randomBytesRatio is {}; it must be between 0 and 1", self.random_bytes_ratio));
            }
        }
        let minutes_max = SECONDS_MAX as f64 / 60.0;
        for (name, minutes) in [
            ("testDurationMinutes", self.test_duration_minutes),
            ("warmupDurationMinutes", self.warmup_duration_minutes),
        ] {
            if !(0.0..=minutes_max).contains(&minutes) {
                return Err(format!("{name} is {minutes}; it must be between 0 and {minutes_max}"));
            }
        }
        if !(0.0..=BACKLOG_GB_MAX).contains(&self.consumer_backlog_size_gb) {
            return Err(format!(
                "consumerBacklogSizeGB is {}; it must be between 0 and {BACKLOG_GB_MAX}",
                self.consumer_backlog_size_gb
            ));
        }
        if !(self.backlog_drain_ratio > 0.0 && self.backlog_drain_ratio <= 1.0) {
            return Err(format!("backlogDrainRatio is {}; it must be above 0 and at most 1", self.backlog_drain_ratio));
        }
        if self.consumer_backlog_size_gb > 0.0 {
            if self.producer_rate == 0 {
                // As OMB: a backlog is built at a stated rate.
                return Err("a backlog (consumerBacklogSizeGB) needs a producerRate above 0".into());
            }
            if self.consumer_count() == 0 {
                return Err("a backlog (consumerBacklogSizeGB) needs consumers to drain it".into());
            }
        }
        Ok(())
    }

    pub fn producer_count(&self) -> u64 {
        u64::from(self.topics) * u64::from(self.producers_per_topic)
    }

    pub fn consumer_count(&self) -> u64 {
        u64::from(self.topics) * u64::from(self.subscriptions_per_topic) * u64::from(self.consumer_per_subscription)
    }

    /// OMB fields in the file that weir does not implement, by name.
    pub fn unused_fields(&self) -> BTreeSet<String> {
        self.unused.keys().cloned().collect()
    }

    pub fn test_duration(&self) -> Duration {
        minutes(self.test_duration_minutes)
    }

    pub fn warmup_duration(&self) -> Duration {
        minutes(self.warmup_duration_minutes)
    }

    /// The backlog to build before consumers start, in bytes (OMB's GB are
    /// GiB: `consumerBacklogSizeGB * 1024 * 1024 * 1024`).
    pub fn backlog_bytes(&self) -> u64 {
        (self.consumer_backlog_size_gb * (1u64 << 30) as f64) as u64
    }
}

fn minutes(minutes: f64) -> Duration {
    Duration::from_secs_f64((minutes * 60.0).clamp(0.0, SECONDS_MAX as f64))
}

/// OMB's result (`io.openmessaging.benchmark.TestResult`), field for field:
/// rates and backlog per reporting period (10 s), latencies per period and
/// aggregated over the test (milliseconds; publish delay in microseconds),
/// and the aggregated quantiles. `weir` holds what OMB has no field for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    pub workload: String,
    pub driver: String,
    pub message_size: u64,
    pub topics: u32,
    pub partitions: u32,
    pub producers_per_topic: u32,
    pub consumers_per_topic: u32,

    pub publish_rate: Vec<f64>,
    pub publish_error_rate: Vec<f64>,
    pub consume_rate: Vec<f64>,
    pub backlog: Vec<i64>,

    pub publish_latency_avg: Vec<f64>,
    #[serde(rename = "publishLatency50pct")]
    pub publish_latency_50pct: Vec<f64>,
    #[serde(rename = "publishLatency75pct")]
    pub publish_latency_75pct: Vec<f64>,
    #[serde(rename = "publishLatency95pct")]
    pub publish_latency_95pct: Vec<f64>,
    #[serde(rename = "publishLatency99pct")]
    pub publish_latency_99pct: Vec<f64>,
    #[serde(rename = "publishLatency999pct")]
    pub publish_latency_999pct: Vec<f64>,
    #[serde(rename = "publishLatency9999pct")]
    pub publish_latency_9999pct: Vec<f64>,
    pub publish_latency_max: Vec<f64>,

    pub publish_delay_latency_avg: Vec<f64>,
    #[serde(rename = "publishDelayLatency50pct")]
    pub publish_delay_latency_50pct: Vec<u64>,
    #[serde(rename = "publishDelayLatency75pct")]
    pub publish_delay_latency_75pct: Vec<u64>,
    #[serde(rename = "publishDelayLatency95pct")]
    pub publish_delay_latency_95pct: Vec<u64>,
    #[serde(rename = "publishDelayLatency99pct")]
    pub publish_delay_latency_99pct: Vec<u64>,
    #[serde(rename = "publishDelayLatency999pct")]
    pub publish_delay_latency_999pct: Vec<u64>,
    #[serde(rename = "publishDelayLatency9999pct")]
    pub publish_delay_latency_9999pct: Vec<u64>,
    pub publish_delay_latency_max: Vec<u64>,

    pub aggregated_publish_latency_avg: f64,
    #[serde(rename = "aggregatedPublishLatency50pct")]
    pub aggregated_publish_latency_50pct: f64,
    #[serde(rename = "aggregatedPublishLatency75pct")]
    pub aggregated_publish_latency_75pct: f64,
    #[serde(rename = "aggregatedPublishLatency95pct")]
    pub aggregated_publish_latency_95pct: f64,
    #[serde(rename = "aggregatedPublishLatency99pct")]
    pub aggregated_publish_latency_99pct: f64,
    #[serde(rename = "aggregatedPublishLatency999pct")]
    pub aggregated_publish_latency_999pct: f64,
    #[serde(rename = "aggregatedPublishLatency9999pct")]
    pub aggregated_publish_latency_9999pct: f64,
    pub aggregated_publish_latency_max: f64,

    pub aggregated_publish_delay_latency_avg: f64,
    #[serde(rename = "aggregatedPublishDelayLatency50pct")]
    pub aggregated_publish_delay_latency_50pct: u64,
    #[serde(rename = "aggregatedPublishDelayLatency75pct")]
    pub aggregated_publish_delay_latency_75pct: u64,
    #[serde(rename = "aggregatedPublishDelayLatency95pct")]
    pub aggregated_publish_delay_latency_95pct: u64,
    #[serde(rename = "aggregatedPublishDelayLatency99pct")]
    pub aggregated_publish_delay_latency_99pct: u64,
    #[serde(rename = "aggregatedPublishDelayLatency999pct")]
    pub aggregated_publish_delay_latency_999pct: u64,
    #[serde(rename = "aggregatedPublishDelayLatency9999pct")]
    pub aggregated_publish_delay_latency_9999pct: u64,
    pub aggregated_publish_delay_latency_max: u64,

    /// Percentile (as text, e.g. "99.9") → milliseconds.
    pub aggregated_publish_latency_quantiles: BTreeMap<String, f64>,
    /// Percentile → microseconds.
    pub aggregated_publish_delay_latency_quantiles: BTreeMap<String, u64>,

    pub end_to_end_latency_avg: Vec<f64>,
    #[serde(rename = "endToEndLatency50pct")]
    pub end_to_end_latency_50pct: Vec<f64>,
    #[serde(rename = "endToEndLatency75pct")]
    pub end_to_end_latency_75pct: Vec<f64>,
    #[serde(rename = "endToEndLatency95pct")]
    pub end_to_end_latency_95pct: Vec<f64>,
    #[serde(rename = "endToEndLatency99pct")]
    pub end_to_end_latency_99pct: Vec<f64>,
    #[serde(rename = "endToEndLatency999pct")]
    pub end_to_end_latency_999pct: Vec<f64>,
    #[serde(rename = "endToEndLatency9999pct")]
    pub end_to_end_latency_9999pct: Vec<f64>,
    pub end_to_end_latency_max: Vec<f64>,

    /// Percentile → milliseconds.
    pub aggregated_end_to_end_latency_quantiles: BTreeMap<String, f64>,

    pub aggregated_end_to_end_latency_avg: f64,
    #[serde(rename = "aggregatedEndToEndLatency50pct")]
    pub aggregated_end_to_end_latency_50pct: f64,
    #[serde(rename = "aggregatedEndToEndLatency75pct")]
    pub aggregated_end_to_end_latency_75pct: f64,
    #[serde(rename = "aggregatedEndToEndLatency95pct")]
    pub aggregated_end_to_end_latency_95pct: f64,
    #[serde(rename = "aggregatedEndToEndLatency99pct")]
    pub aggregated_end_to_end_latency_99pct: f64,
    #[serde(rename = "aggregatedEndToEndLatency999pct")]
    pub aggregated_end_to_end_latency_999pct: f64,
    #[serde(rename = "aggregatedEndToEndLatency9999pct")]
    pub aggregated_end_to_end_latency_9999pct: f64,
    pub aggregated_end_to_end_latency_max: f64,

    /// What OMB's result has no field for: the header (target, windows,
    /// machine, floor) and the backlog drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weir: Option<serde_json::Value>,
}

/// Milliseconds, as OMB reports publish and end-to-end latencies.
fn ms(series: &Series, percentile: f64) -> f64 {
    series.at(percentile).as_secs_f64() * 1e3
}

/// Microseconds, as OMB reports publish delay.
fn us(series: &Series, percentile: f64) -> u64 {
    series.at(percentile).as_micros() as u64
}

/// One reporting period's latency series.
pub struct Period<'a> {
    pub publish: &'a Series,
    pub publish_delay: &'a Series,
    pub end_to_end: &'a Series,
}

impl TestResult {
    /// Appends one period's latencies (rates are pushed by the caller).
    pub fn push_period(&mut self, period: &Period<'_>) {
        let publish = period.publish;
        self.publish_latency_avg.push(publish.mean().as_secs_f64() * 1e3);
        self.publish_latency_50pct.push(ms(publish, 50.0));
        self.publish_latency_75pct.push(ms(publish, 75.0));
        self.publish_latency_95pct.push(ms(publish, 95.0));
        self.publish_latency_99pct.push(ms(publish, 99.0));
        self.publish_latency_999pct.push(ms(publish, 99.9));
        self.publish_latency_9999pct.push(ms(publish, 99.99));
        self.publish_latency_max.push(ms(publish, 100.0));
        let delay = period.publish_delay;
        self.publish_delay_latency_avg.push(delay.mean().as_secs_f64() * 1e6);
        self.publish_delay_latency_50pct.push(us(delay, 50.0));
        self.publish_delay_latency_75pct.push(us(delay, 75.0));
        self.publish_delay_latency_95pct.push(us(delay, 95.0));
        self.publish_delay_latency_99pct.push(us(delay, 99.0));
        self.publish_delay_latency_999pct.push(us(delay, 99.9));
        self.publish_delay_latency_9999pct.push(us(delay, 99.99));
        self.publish_delay_latency_max.push(us(delay, 100.0));
        let e2e = period.end_to_end;
        self.end_to_end_latency_avg.push(e2e.mean().as_secs_f64() * 1e3);
        self.end_to_end_latency_50pct.push(ms(e2e, 50.0));
        self.end_to_end_latency_75pct.push(ms(e2e, 75.0));
        self.end_to_end_latency_95pct.push(ms(e2e, 95.0));
        self.end_to_end_latency_99pct.push(ms(e2e, 99.0));
        self.end_to_end_latency_999pct.push(ms(e2e, 99.9));
        self.end_to_end_latency_9999pct.push(ms(e2e, 99.99));
        self.end_to_end_latency_max.push(ms(e2e, 100.0));
    }

    /// Sets the aggregated latencies of the whole test (warm-up excluded).
    pub fn set_aggregated(&mut self, total: &Period<'_>) {
        let publish = total.publish;
        self.aggregated_publish_latency_avg = publish.mean().as_secs_f64() * 1e3;
        self.aggregated_publish_latency_50pct = ms(publish, 50.0);
        self.aggregated_publish_latency_75pct = ms(publish, 75.0);
        self.aggregated_publish_latency_95pct = ms(publish, 95.0);
        self.aggregated_publish_latency_99pct = ms(publish, 99.0);
        self.aggregated_publish_latency_999pct = ms(publish, 99.9);
        self.aggregated_publish_latency_9999pct = ms(publish, 99.99);
        self.aggregated_publish_latency_max = ms(publish, 100.0);
        let delay = total.publish_delay;
        self.aggregated_publish_delay_latency_avg = delay.mean().as_secs_f64() * 1e6;
        self.aggregated_publish_delay_latency_50pct = us(delay, 50.0);
        self.aggregated_publish_delay_latency_75pct = us(delay, 75.0);
        self.aggregated_publish_delay_latency_95pct = us(delay, 95.0);
        self.aggregated_publish_delay_latency_99pct = us(delay, 99.0);
        self.aggregated_publish_delay_latency_999pct = us(delay, 99.9);
        self.aggregated_publish_delay_latency_9999pct = us(delay, 99.99);
        self.aggregated_publish_delay_latency_max = us(delay, 100.0);
        let e2e = total.end_to_end;
        self.aggregated_end_to_end_latency_avg = e2e.mean().as_secs_f64() * 1e3;
        self.aggregated_end_to_end_latency_50pct = ms(e2e, 50.0);
        self.aggregated_end_to_end_latency_75pct = ms(e2e, 75.0);
        self.aggregated_end_to_end_latency_95pct = ms(e2e, 95.0);
        self.aggregated_end_to_end_latency_99pct = ms(e2e, 99.0);
        self.aggregated_end_to_end_latency_999pct = ms(e2e, 99.9);
        self.aggregated_end_to_end_latency_9999pct = ms(e2e, 99.99);
        self.aggregated_end_to_end_latency_max = ms(e2e, 100.0);
        self.aggregated_publish_latency_quantiles = quantiles(publish, |d| d.as_secs_f64() * 1e3);
        self.aggregated_publish_delay_latency_quantiles = quantiles(delay, |d| d.as_micros() as u64);
        self.aggregated_end_to_end_latency_quantiles = quantiles(e2e, |d| d.as_secs_f64() * 1e3);
    }
}

/// The distribution as OMB writes it: percentile → value, out to the
/// last sample.
fn quantiles<T>(series: &Series, unit: impl Fn(Duration) -> T) -> BTreeMap<String, T> {
    series.distribution().into_iter().map(|(percentile, latency)| (format!("{percentile}"), unit(latency))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OMB_1KB: &str = "
# OMB's own file, as it is
name: 1 topic / 1 partition / 1Kb

topics: 1
partitionsPerTopic: 1
keyDistributor: \"NO_KEY\"
messageSize: 1024
payloadFile: \"payload/payload-1Kb.data\"
subscriptionsPerTopic: 1
consumerPerSubscription: 1
producersPerTopic: 1
producerRate: 50000
consumerBacklogSizeGB: 0
testDurationMinutes: 15
";

    #[test]
    fn an_omb_workload_file_reads_as_it_is_with_omb_defaults() {
        let workload = Workload::parse(OMB_1KB).unwrap();
        assert_eq!(workload.name, "1 topic / 1 partition / 1Kb");
        assert_eq!(workload.partitions_per_topic, 1);
        assert_eq!(workload.key_distributor, KeyDistributor::NoKey);
        assert_eq!(workload.payload_file.as_deref(), Some("payload/payload-1Kb.data"));
        assert_eq!(workload.producer_rate, 50_000);
        assert_eq!(workload.test_duration(), Duration::from_secs(900));
        // OMB's default warm-up: one minute.
        assert_eq!(workload.warmup_duration(), Duration::from_secs(60));
        assert_eq!(workload.backlog_drain_ratio, 1.0);
        assert!(workload.unused_fields().is_empty());
    }

    #[test]
    fn fields_weir_does_not_implement_are_named_not_fatal() {
        let text = format!("{OMB_1KB}producerStartRate: 1000\nproducerIncrementRate: 10\n");
        let workload = Workload::parse(&text).unwrap();
        assert_eq!(
            workload.unused_fields().into_iter().collect::<Vec<_>>(),
            ["producerIncrementRate", "producerStartRate"]
        );
    }

    #[test]
    fn key_distributors_and_backlogs_read_as_omb_writes_them() {
        let text = OMB_1KB
            .replace("\"NO_KEY\"", "KEY_ROUND_ROBIN")
            .replace("consumerBacklogSizeGB: 0", "consumerBacklogSizeGB: 2\nbacklogDrainRatio: 0.5");
        let workload = Workload::parse(&text).unwrap();
        assert_eq!(workload.key_distributor, KeyDistributor::KeyRoundRobin);
        assert_eq!(workload.backlog_bytes(), 2 << 30);
        assert_eq!(workload.backlog_drain_ratio, 0.5);
        let random = Workload::parse(&OMB_1KB.replace("\"NO_KEY\"", "RANDOM_NANO")).unwrap();
        assert_eq!(random.key_distributor, KeyDistributor::RandomNano);
    }

    #[test]
    fn a_workload_outside_the_bounds_or_malformed_is_refused_with_the_field_named() {
        let cases = [
            (OMB_1KB.replace("partitionsPerTopic: 1", "partitionsPerTopic: 0"), "partitionsPerTopic"),
            (OMB_1KB.replace("messageSize: 1024", "messageSize: 999999999999"), "messageSize"),
            (OMB_1KB.replace("messageSize: 1024", "messageSize: 4"), "messageSize"),
            (OMB_1KB.replace("producersPerTopic: 1", "producersPerTopic: 4").replace("50000", "3"), "producerRate"),
            (OMB_1KB.replace("producersPerTopic: 1", "producersPerTopic: 5000"), "producersPerTopic"),
            (
                OMB_1KB
                    .replace("producersPerTopic: 1", "producersPerTopic: 100")
                    .replace("partitionsPerTopic: 1", "partitionsPerTopic: 1000"),
                "producer connections",
            ),
            (OMB_1KB.replace("consumerBacklogSizeGB: 0", "consumerBacklogSizeGB: 1e30"), "consumerBacklogSizeGB"),
            (OMB_1KB.replace("testDurationMinutes: 15", "testDurationMinutes: -1"), "testDurationMinutes"),
            (
                OMB_1KB
                    .replace("producerRate: 50000", "producerRate: 0")
                    .replace("BacklogSizeGB: 0", "BacklogSizeGB: 1"),
                "producerRate",
            ),
            (OMB_1KB.replace("\"NO_KEY\"", "SOME_KEY"), "SOME_KEY"),
            (OMB_1KB.replace("topics: 1\n", ""), "topics"),
            ("[1, 2".to_owned(), ""),
        ];
        for (text, named) in cases {
            let error = Workload::parse(&text).unwrap_err().to_string();
            assert!(error.contains(named), "{named}: {error}");
        }
    }

    #[test]
    fn every_shipped_workload_file_parses_and_stays_within_the_bounds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/workloads");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|extension| extension == "yaml") {
                let workload = Workload::load(&path).unwrap_or_else(|error| panic!("{error}"));
                assert!(workload.unused_fields().is_empty(), "{}: {:?}", path.display(), workload.unused_fields());
                names.push(workload.name);
            }
        }
        assert!(names.len() >= 8, "{names:?}");
    }

    #[test]
    fn a_result_uses_omb_field_names() {
        let mut series = Series::new("x");
        series.record(Duration::from_micros(1500));
        let period = Period { publish: &series, publish_delay: &series, end_to_end: &series };
        let mut result = TestResult::default();
        result.push_period(&period);
        result.set_aggregated(&period);
        let json = serde_json::to_value(&result).unwrap();
        for field in [
            "publishRate",
            "consumeRate",
            "backlog",
            "publishLatency99pct",
            "publishLatency9999pct",
            "publishDelayLatency99pct",
            "endToEndLatency95pct",
            "endToEndLatencyAvg",
            "aggregatedPublishLatency999pct",
            "aggregatedEndToEndLatencyMax",
            "aggregatedPublishLatencyQuantiles",
            "aggregatedPublishDelayLatencyQuantiles",
            "aggregatedEndToEndLatencyQuantiles",
            "messageSize",
            "producersPerTopic",
            "consumersPerTopic",
        ] {
            assert!(json.get(field).is_some(), "{field} missing: {json}");
        }
        assert!((json["aggregatedEndToEndLatency50pct"].as_f64().unwrap() - 1.5).abs() < 0.01);
        assert_eq!(json["aggregatedPublishDelayLatency50pct"].as_u64().unwrap(), 1500);
        let quantiles = json["aggregatedEndToEndLatencyQuantiles"].as_object().unwrap();
        assert!(quantiles.keys().all(|key| key.parse::<f64>().is_ok()), "{quantiles:?}");
    }
}
