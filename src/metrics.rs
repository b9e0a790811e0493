//! Prometheus metrics: the `metrics` facade, exported by
//! `metrics-exporter-prometheus` over HTTP on `metrics_addr`.
//!
//! Latency histograms are recorded where they happen. Everything else is
//! derived from the broker's own counters and state and published by a
//! refresh task every [`METRICS_REFRESH_INTERVAL`], so the hot paths keep
//! one atomic increment each, and a scrape sees values at most that old.
//!
//! Channel labels are bounded: the first `metrics_channel_labels_max`
//! channels the broker sees get their own `channel` label, later ones are
//! aggregated under `channel="_other"`. Subscriptions are labelled by
//! durable name under the same bound; ephemeral ones are aggregated.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{SharedString, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::server::Stats;

/// How often derived metrics are refreshed.
pub const METRICS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// The label that channels beyond the label cap share.
pub const OTHER_CHANNELS_LABEL: &str = "_other";
/// Histogram buckets for latencies, in seconds: 10 µs to 10 s.
const LATENCY_BUCKETS_SECONDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    #[error("metrics_addr {addr:?} is not an IP address and port")]
    BadAddress { addr: String },
    #[error("cannot start the metrics exporter on {addr}: {message}")]
    Exporter { addr: String, message: String },
}

/// Starts the exporter on `addr` and describes every metric. Must run
/// inside a tokio runtime.
///
/// # Errors
/// A bad address, a port that cannot be bound, or a second exporter in the
/// same process.
pub fn install(addr: &str) -> Result<SocketAddr, MetricsError> {
    let socket: SocketAddr = addr.parse().map_err(|_| MetricsError::BadAddress { addr: addr.to_owned() })?;
    let exporter = |message: String| MetricsError::Exporter { addr: addr.to_owned(), message };
    PrometheusBuilder::new()
        .with_http_listener(socket)
        .set_buckets(&LATENCY_BUCKETS_SECONDS)
        .map_err(|error| exporter(error.to_string()))?
        .install()
        .map_err(|error| exporter(error.to_string()))?;
    describe();
    Ok(socket)
}

fn describe() {
    // Cluster mode (src/cluster): per Raft group, `group="metadata"` so far.
    describe_gauge!("weir_raft_term", "The Raft group's current term on this node, by group.");
    describe_gauge!("weir_raft_leader", "1 while this node leads the Raft group, else 0, by group.");
    describe_gauge!("weir_raft_commit_index", "The Raft group's commit index on this node, by group.");
    describe_gauge!("weir_raft_replica_lag_entries", "On the leader: entries a member lacks, by group and follower.");
    describe_counter!("weir_raft_leader_changes_total", "Leader changes this node saw, by group.");
    describe_counter!(
        "weir_segment_transfers_total",
        "Segment copies this replica received, by channel, partition and outcome (installed, dropped, failed)."
    );
    describe_counter!(
        "weir_segment_transfer_bytes_total",
        "Segment bytes this replica received by segment transfer, by channel and partition."
    );
    describe_counter!("weir_messages_appended_total", "Messages stored, by channel.");
    describe_counter!("weir_bytes_appended_total", "Message bytes (key + headers + payload) stored, by channel.");
    describe_counter!("weir_publishes_rejected_total", "Publish frames refused, by reason.");
    describe_counter!("weir_backpressure_notices_total", "BACKPRESSURE notices sent (channel append queue full).");
    describe_counter!("weir_lag_notices_total", "LAG notices sent to subscribers.");
    describe_counter!("weir_skipped_notices_total", "SKIPPED notices sent (retention deleted unread messages).");
    describe_counter!("weir_connections_accepted_total", "TCP connections accepted.");
    describe_counter!("weir_connections_refused_total", "Connections refused at max_connections.");
    describe_counter!("weir_protocol_errors_total", "Connections closed for a protocol violation.");
    describe_counter!("weir_idle_timeouts_total", "Connections closed after idle_timeout_ms of silence.");
    describe_counter!(
        "weir_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out (plaintext clients on a TLS port among them)."
    );
    describe_counter!("weir_authentication_failures_total", "HELLOs refused for a wrong or missing credential.");
    describe_counter!(
        "weir_unauthorized_total",
        "Requests refused for a missing permission, by principal (users of the credentials file; others as \"other\") and operation."
    );
    describe_counter!(
        "weir_quota_throttled_total",
        "Publishes refused with BACKPRESSURE over their principal's publish quota, by principal and quota."
    );
    describe_counter!("weir_retention_deleted_segments_total", "Segments deleted by retention, by channel.");
    describe_counter!("weir_retention_deleted_bytes_total", "Bytes deleted by retention, by channel.");
    describe_counter!(
        "weir_storage_full_episodes_total",
        "Times a channel's disk became full (appends refused with StorageFull until space was freed), by channel."
    );
    describe_gauge!(
        "weir_storage_full",
        "1 while a channel refuses appends because its disk is full (until an append succeeds again), by channel."
    );
    describe_gauge!(
        "weir_channels_unavailable",
        "Channels that could not be opened at start-up (damage recovery does not repair); they refuse every request."
    );
    describe_gauge!("weir_connections_open", "Open client connections.");
    describe_gauge!("weir_inflight_publishes", "Publishes read and not yet answered, all connections.");
    describe_gauge!("weir_inflight_deliveries", "Delivered, unacknowledged messages, all subscriptions.");
    describe_gauge!(
        "weir_subscription_lag_messages",
        "Channel next offset minus first unacknowledged offset; durable subscriptions by name, ephemeral ones as their maximum."
    );
    describe_gauge!("weir_subscriptions", "Live subscriptions, by channel.");
    describe_gauge!(
        "weir_group_lag_messages",
        "A consumer group's lag summed over the channel's partitions: next offsets minus committed positions."
    );
    describe_gauge!("weir_group_members", "Live members of a consumer group.");
    describe_gauge!(
        "weir_group_partition_lag_messages",
        "A consumer group's lag in one partition: its next offset minus the committed position."
    );
    describe_gauge!("weir_log_bytes", "Bytes on disk in a channel's segments.");
    describe_gauge!("weir_log_segments", "Segments of a channel.");
    describe_gauge!("weir_log_start_offset", "First offset still stored in a channel.");
    describe_gauge!("weir_log_next_offset", "Offset the next message of a channel gets.");
    describe_histogram!(
        "weir_append_duration_seconds",
        metrics::Unit::Seconds,
        "One group commit: encode, write, and fsync when the policy says so."
    );
    describe_histogram!(
        "weir_fsync_duration_seconds",
        metrics::Unit::Seconds,
        "One fdatasync of a group commit (fsync = \"always\")."
    );
    describe_histogram!(
        "weir_publish_duration_seconds",
        metrics::Unit::Seconds,
        "From a publish frame read to its answer queued for the socket."
    );
}

/// Bounded channel labels.
pub struct ChannelLabels {
    labelled: Mutex<HashSet<String>>,
    labels_max: usize,
}

impl ChannelLabels {
    pub fn new(labels_max: usize) -> ChannelLabels {
        ChannelLabels { labelled: Mutex::new(HashSet::new()), labels_max }
    }

    /// The label for `channel`: its name while under the cap, else
    /// [`OTHER_CHANNELS_LABEL`].
    pub fn label(&self, channel: &str) -> SharedString {
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        if labelled.contains(channel) {
            return SharedString::from(channel.to_owned());
        }
        if labelled.len() < self.labels_max {
            labelled.insert(channel.to_owned());
            return SharedString::from(channel.to_owned());
        }
        SharedString::const_str(OTHER_CHANNELS_LABEL)
    }
}

/// Publishes the server-wide counters.
pub fn refresh_counters(stats: &Stats) {
    let get = Stats::get;
    counter!("weir_connections_accepted_total").absolute(get(&stats.connections_accepted));
    counter!("weir_connections_refused_total").absolute(get(&stats.connections_refused));
    counter!("weir_protocol_errors_total").absolute(get(&stats.protocol_errors));
    counter!("weir_idle_timeouts_total").absolute(get(&stats.idle_timeouts));
    counter!("weir_tls_handshake_failures_total").absolute(get(&stats.tls_handshake_failures));
    counter!("weir_authentication_failures_total").absolute(get(&stats.authentication_failures));
    counter!("weir_backpressure_notices_total").absolute(get(&stats.publishes_rejected_backpressure));
    counter!("weir_lag_notices_total").absolute(get(&stats.lag_notices));
    counter!("weir_skipped_notices_total").absolute(get(&stats.skipped_notices));
    for (reason, value) in [
        ("too_large", get(&stats.publishes_rejected_too_large)),
        ("inflight_limit", get(&stats.publishes_rejected_inflight)),
        ("backpressure", get(&stats.publishes_rejected_backpressure)),
        ("invalid_channel", get(&stats.publishes_rejected_invalid_channel)),
        ("storage_error", get(&stats.publishes_rejected_storage)),
        ("storage_full", get(&stats.publishes_rejected_storage_full)),
        ("quota", get(&stats.publishes_rejected_quota)),
    ] {
        counter!("weir_publishes_rejected_total", "reason" => reason).absolute(value);
    }
    gauge!("weir_connections_open").set(get(&stats.connections_open) as f64);
    gauge!("weir_inflight_publishes").set(get(&stats.inflight_publishes) as f64);
}
