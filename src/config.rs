//! Broker configuration: `broker.toml` parsed with serde, every key with a
//! default (so no file is needed at all), unknown keys refused, and every
//! value validated at load with an error naming the key, the value and the
//! allowed range.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::record::MESSAGE_BYTES_LIMIT;
use crate::storage::{ChannelName, FsyncPolicy, LogConfig, RetentionPolicy, StoreConfig};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Largest configuration file read.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Allowed range of `segment_bytes`.
pub const SEGMENT_BYTES_RANGE: RangeInclusive<u64> = KIB..=GIB;
/// Allowed range of `segment_max_age_secs` (one second to ten years).
pub const SEGMENT_MAX_AGE_SECS_RANGE: RangeInclusive<u64> = 1..=10 * 365 * 24 * 3600;
/// Allowed range of `index_interval_bytes`.
pub const INDEX_INTERVAL_BYTES_RANGE: RangeInclusive<u64> = 1..=16 * MIB;
/// Allowed range of `fsync_interval_ms`.
pub const FSYNC_INTERVAL_MS_RANGE: RangeInclusive<u64> = 1..=60_000;
/// Allowed range of `max_message_bytes`.
pub const MAX_MESSAGE_BYTES_RANGE: RangeInclusive<u64> = 1..=MESSAGE_BYTES_LIMIT as u64;
/// Allowed range of every retention limit, when set.
pub const RETENTION_LIMIT_RANGE: RangeInclusive<u64> = 1..=u64::MAX / 2;
/// Allowed range of `retention_check_interval_ms`.
pub const RETENTION_CHECK_INTERVAL_MS_RANGE: RangeInclusive<u64> = 100..=3_600_000;
/// Allowed range of the per-connection and per-subscription windows.
pub const INFLIGHT_RANGE: RangeInclusive<u64> = 1..=65_536;
/// Allowed range of `max_inflight_publish_bytes` (and at least
/// `max_batch_bytes`).
pub const MAX_INFLIGHT_PUBLISH_BYTES_RANGE: RangeInclusive<u64> = KIB..=GIB;
/// Allowed range of `max_connections`.
pub const MAX_CONNECTIONS_RANGE: RangeInclusive<u64> = 1..=100_000;
/// Allowed range of `max_subscriptions_per_connection`.
pub const MAX_SUBSCRIPTIONS_RANGE: RangeInclusive<u64> = 1..=4096;
/// Allowed range of `max_batch_bytes` (the advertised frame limit is derived
/// from it and must fit in a u32 with room to spare).
pub const MAX_BATCH_BYTES_RANGE: RangeInclusive<u64> = KIB..=64 * MIB;
// A whole batch, encoded as records (at most 25 bytes more per message than
// on the wire), must fit in one storage append.
const _: () = assert!((64 * MIB + 1_000_000 * 25) as usize <= crate::storage::APPEND_BATCH_BYTES_MAX);
/// Allowed range of `max_batch_records`.
pub const MAX_BATCH_RECORDS_RANGE: RangeInclusive<u64> = 1..=1_000_000;
/// Allowed range of `channel_queue_depth`.
pub const CHANNEL_QUEUE_DEPTH_RANGE: RangeInclusive<u64> = 1..=1_000_000;
/// Allowed range of the heartbeat, idle and frame timeouts.
pub const TIMEOUT_MS_RANGE: RangeInclusive<u64> = 10..=3_600_000;
/// Allowed range of `delivery_batch_bytes`.
pub const DELIVERY_BATCH_BYTES_RANGE: RangeInclusive<u64> = KIB..=64 * MIB;
/// Allowed range of `lag_notice_threshold`.
pub const LAG_NOTICE_THRESHOLD_RANGE: RangeInclusive<u64> = 1..=u64::MAX / 2;
/// Allowed range of `dedup_window`.
pub const DEDUP_WINDOW_RANGE: RangeInclusive<u64> = 1..=65_536;
/// Allowed range of `max_producers`.
pub const MAX_PRODUCERS_RANGE: RangeInclusive<u64> = 1..=1_000_000;
/// Allowed range of `metrics_channel_labels_max`.
pub const METRICS_CHANNEL_LABELS_RANGE: RangeInclusive<u64> = 0..=10_000;
/// Allowed range of `max_channels`.
pub const MAX_CHANNELS_RANGE: RangeInclusive<u64> = 1..=100_000;
/// Allowed range of `max_groups_per_channel` and `max_members_per_group`.
pub const GROUP_LIMIT_RANGE: RangeInclusive<u64> = 1..=65_536;
/// Allowed range of `max_partitions` (and of every partition count, which
/// must also be at most `max_partitions`).
pub const MAX_PARTITIONS_RANGE: RangeInclusive<u64> = 1..=crate::storage::PARTITIONS_LIMIT as u64;

/// Allowed range of `[cluster] node_id`.
pub const NODE_ID_RANGE: RangeInclusive<u64> = 1..=u64::MAX / 2;
/// Allowed range of `[cluster] heartbeat_interval_ms` and the election
/// timeouts.
pub const CLUSTER_TIMEOUT_MS_RANGE: RangeInclusive<u64> = 10..=600_000;
/// Allowed range of `[cluster] max_segment_transfer_bytes_per_sec`.
pub const SEGMENT_TRANSFER_BYTES_PER_SEC_RANGE: RangeInclusive<u64> = MIB..=64 * GIB;
/// Allowed range of `[cluster] raft_log_entries_max`: at least one
/// snapshot's worth of entries (`PARTITION_SNAPSHOT_ENTRIES`).
pub const RAFT_LOG_ENTRIES_MAX_RANGE: RangeInclusive<u64> = 4096..=1 << 24;
const _: () = assert!(*RAFT_LOG_ENTRIES_MAX_RANGE.start() >= crate::cluster::PARTITION_SNAPSHOT_ENTRIES);
/// Most nodes `[cluster] nodes` may list.
pub const CLUSTER_NODES_MAX: usize = 64;

/// The whole broker configuration. See `broker.toml` for every key, its
/// default and its range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen_addr: String,
    pub auth_token: Option<String>,
    /// Users, token hashes, permissions and quotas (docs/SECURITY.md).
    pub credentials_file: Option<PathBuf>,
    /// TLS on the client listener: certificate chain and key (PEM).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// With it, clients must present a certificate this CA signed.
    pub tls_client_ca: Option<PathBuf>,
    pub max_connections: u64,
    pub max_inflight_publishes: u64,
    pub max_inflight_publish_bytes: u64,
    pub max_inflight_deliveries: u64,
    pub max_subscriptions_per_connection: u64,
    pub max_batch_bytes: u64,
    pub max_batch_records: u64,
    pub channel_queue_depth: u64,
    pub heartbeat_interval_ms: u64,
    pub idle_timeout_ms: u64,
    pub frame_timeout_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub delivery_batch_bytes: u64,
    pub lag_notice_threshold: u64,
    pub notice_interval_ms: u64,
    pub dedup_window: u64,
    pub max_producers: u64,
    pub auto_create_channels: bool,
    pub metrics_addr: String,
    pub metrics_channel_labels_max: u64,
    pub data_dir: PathBuf,
    pub segment_bytes: u64,
    pub segment_max_age_secs: u64,
    pub index_interval_bytes: u64,
    pub fsync: FsyncPolicy,
    pub fsync_interval_ms: u64,
    pub max_message_bytes: u64,
    pub retention_max_bytes: Option<u64>,
    pub retention_max_age_secs: Option<u64>,
    pub retention_max_messages: Option<u64>,
    pub retention_check_interval_ms: u64,
    pub max_channels: u64,
    pub default_partitions: u64,
    pub max_partitions: u64,
    pub max_groups_per_channel: u64,
    pub max_members_per_group: u64,
    pub group_session_timeout_ms: u64,
    /// Per-channel overrides, keyed by channel name.
    pub channels: BTreeMap<String, ChannelOverrides>,
    /// Cluster mode (docs/REPLICATION.md); a single node without it.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's id, its node-to-node listener, the Raft timing
/// of the metadata group, and the nodes a new cluster starts with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster and never reused.
    pub node_id: u64,
    /// The node-to-node listener (Raft traffic and `weir cluster`).
    pub listen_addr: String,
    #[serde(default = "default_cluster_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a time drawn between these two
    /// starts an election.
    #[serde(default = "default_election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// A partition's Raft log snapshots itself (and purges its older
    /// entries) past this many entries, even while a follower is down; a
    /// follower further behind catches up by segment transfer.
    #[serde(default = "default_raft_log_entries_max")]
    pub raft_log_entries_max: u64,
    /// The most bytes a second this node receives by segment transfer, all
    /// partitions together; absent: no limit.
    #[serde(default)]
    pub max_segment_transfer_bytes_per_sec: Option<u64>,
    /// Mutual TLS on the cluster listener and to the other nodes: this
    /// node's certificate chain and key (PEM), used as server and as
    /// client, and the CA that signs every node's certificate (and the
    /// operators' certificates for `weir cluster`). All three or none.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The voters a brand-new cluster starts with (the node of lowest id
    /// initialises it); ignored once the cluster exists, whose membership
    /// is in its metadata log and changes with `weir cluster add-node`.
    #[serde(default)]
    pub nodes: Vec<ClusterNodeConfig>,
}

/// One node of `[cluster] nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNodeConfig {
    pub id: u64,
    /// Where the other nodes reach its cluster listener.
    pub cluster_addr: String,
    /// Where clients reach it (its `listen_addr`).
    pub client_addr: String,
}

fn default_cluster_heartbeat_ms() -> u64 {
    250
}

fn default_election_timeout_min_ms() -> u64 {
    1000
}

fn default_election_timeout_max_ms() -> u64 {
    2000
}

fn default_raft_log_entries_max() -> u64 {
    1 << 20
}

impl ClusterConfig {
    /// The cluster listener's TLS files, when set: certificate, key, CA.
    pub fn tls_files(&self) -> Option<(PathBuf, PathBuf, PathBuf)> {
        Some((self.tls_cert.clone()?, self.tls_key.clone()?, self.tls_ca.clone()?))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_range("cluster.node_id", self.node_id, NODE_ID_RANGE)?;
        check_socket_addr("cluster.listen_addr", &self.listen_addr)?;
        check_range("cluster.heartbeat_interval_ms", self.heartbeat_interval_ms, CLUSTER_TIMEOUT_MS_RANGE)?;
        check_range("cluster.election_timeout_min_ms", self.election_timeout_min_ms, CLUSTER_TIMEOUT_MS_RANGE)?;
        check_range("cluster.election_timeout_max_ms", self.election_timeout_max_ms, CLUSTER_TIMEOUT_MS_RANGE)?;
        check_range("cluster.raft_log_entries_max", self.raft_log_entries_max, RAFT_LOG_ENTRIES_MAX_RANGE)?;
        if let Some(rate) = self.max_segment_transfer_bytes_per_sec {
            check_range("cluster.max_segment_transfer_bytes_per_sec", rate, SEGMENT_TRANSFER_BYTES_PER_SEC_RANGE)?;
        }
        if self.heartbeat_interval_ms >= self.election_timeout_min_ms
            || self.election_timeout_min_ms >= self.election_timeout_max_ms
        {
            return Err(ConfigError::Invalid {
                key: "cluster.election_timeout_min_ms".into(),
                problem: format!(
                    "need heartbeat_interval_ms ({}) < election_timeout_min_ms ({}) < election_timeout_max_ms ({})",
                    self.heartbeat_interval_ms, self.election_timeout_min_ms, self.election_timeout_max_ms
                ),
            });
        }
        let tls_set = [self.tls_cert.is_some(), self.tls_key.is_some(), self.tls_ca.is_some()];
        if tls_set.contains(&true) && tls_set.contains(&false) {
            return Err(ConfigError::Invalid {
                key: "cluster.tls_cert".into(),
                problem:
                    "cluster.tls_cert, cluster.tls_key and cluster.tls_ca are set together (mutual TLS between nodes)"
                        .into(),
            });
        }
        if self.nodes.len() > CLUSTER_NODES_MAX {
            return Err(ConfigError::Invalid {
                key: "cluster.nodes".into(),
                problem: format!("{} nodes; at most {CLUSTER_NODES_MAX}", self.nodes.len()),
            });
        }
        let mut ids = std::collections::BTreeSet::new();
        for node in &self.nodes {
            check_range("cluster.nodes.id", node.id, NODE_ID_RANGE)?;
            if !ids.insert(node.id) {
                return Err(ConfigError::Invalid {
                    key: "cluster.nodes".into(),
                    problem: format!("node id {} is listed twice", node.id),
                });
            }
            check_socket_addr("cluster.nodes.cluster_addr", &node.cluster_addr)?;
            check_socket_addr("cluster.nodes.client_addr", &node.client_addr)?;
        }
        Ok(())
    }
}

fn check_socket_addr(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.parse::<std::net::SocketAddr>().is_err() {
        return Err(ConfigError::Invalid {
            key: key.into(),
            problem: format!("{value:?} is not an IP address and port such as 127.0.0.1:7451"),
        });
    }
    Ok(())
}

/// Settings one channel may set differently from the broker-wide defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelOverrides {
    /// Partitions the channel gets when it is created.
    pub partitions: Option<u64>,
    pub segment_bytes: Option<u64>,
    pub segment_max_age_secs: Option<u64>,
    pub fsync: Option<FsyncPolicy>,
    pub retention_max_bytes: Option<u64>,
    pub retention_max_age_secs: Option<u64>,
    pub retention_max_messages: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen_addr: "127.0.0.1:7450".into(),
            auth_token: None,
            credentials_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_connections: 1024,
            max_inflight_publishes: 1024,
            max_inflight_publish_bytes: 64 * MIB,
            max_inflight_deliveries: 4096,
            max_subscriptions_per_connection: 64,
            max_batch_bytes: 8 * MIB,
            max_batch_records: 10_000,
            channel_queue_depth: 4096,
            heartbeat_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
            frame_timeout_ms: 10_000,
            shutdown_timeout_ms: 10_000,
            delivery_batch_bytes: MIB,
            lag_notice_threshold: 10_000,
            notice_interval_ms: 1_000,
            dedup_window: 1024,
            max_producers: 1000,
            auto_create_channels: true,
            metrics_addr: "127.0.0.1:9464".into(),
            metrics_channel_labels_max: 100,
            data_dir: PathBuf::from("weir-data"),
            segment_bytes: 128 * MIB,
            segment_max_age_secs: 7 * 24 * 3600,
            index_interval_bytes: 4 * KIB,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            max_message_bytes: MIB,
            retention_max_bytes: None,
            retention_max_age_secs: None,
            retention_max_messages: None,
            retention_check_interval_ms: 30_000,
            max_channels: 10_000,
            default_partitions: 1,
            max_partitions: 1024,
            max_groups_per_channel: 64,
            max_members_per_group: 256,
            group_session_timeout_ms: 20_000,
            channels: BTreeMap::new(),
            cluster: None,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is {size_bytes} bytes; a configuration file is at most {size_bytes_max}")]
    FileTooLarge { path: PathBuf, size_bytes: u64, size_bytes_max: u64 },
    /// The file is not valid TOML, or a value has the wrong type. One line:
    /// the parser's message without its source snippet.
    #[error("config file {}: {message}", at_line(path, *line))]
    Parse { path: PathBuf, line: Option<usize>, message: String },
    /// A key weir does not know (a typo, or a key of another version).
    #[error("config file {}: unknown key `{key}`; broker.toml in the weir repository lists every key", at_line(path, *line))]
    UnknownKey { path: PathBuf, line: Option<usize>, key: String },
    #[error("config key {key} = {value} is out of range: allowed {allowed}")]
    OutOfRange { key: String, value: String, allowed: String },
    #[error("config key {key}: {problem}")]
    Invalid { key: String, problem: String },
}

impl Config {
    /// Reads and validates `path`, or returns the validated defaults when
    /// `path` is `None`.
    ///
    /// # Errors
    /// The file cannot be read, does not parse, has an unknown key, or has a
    /// value out of range.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        };
        let read_error = |source| ConfigError::Read { path: path.to_path_buf(), source };
        let size_bytes = std::fs::metadata(path).map_err(read_error)?.len();
        if size_bytes > CONFIG_FILE_BYTES_MAX {
            return Err(ConfigError::FileTooLarge {
                path: path.to_path_buf(),
                size_bytes,
                size_bytes_max: CONFIG_FILE_BYTES_MAX,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Config::parse_file(&text, path)
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_file(text, Path::new("<text>"))
    }

    /// Parses and validates the text of the file at `path` (named in errors).
    fn parse_file(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| parse_error(text, path, &error))?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML (`weir serve --print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| format!("# cannot print the configuration: {error}\n"))
    }

    /// Checks every value against its range.
    ///
    /// # Errors
    /// The first key out of range, naming key, value and range.
    /// The largest publish frame a client may send: a batch of
    /// `max_batch_bytes`, or one message of `max_message_bytes` with its
    /// frame (the advertised `max_frame_bytes`).
    pub fn max_publish_bytes(&self) -> u64 {
        self.max_batch_bytes.max(self.max_message_bytes + u64::from(crate::protocol::PUBLISH_OVERHEAD_BYTES_MAX))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "listen_addr".into(),
                problem: format!("{:?} is not an IP address and port such as 127.0.0.1:7450", self.listen_addr),
            });
        }
        if let Some(token) = &self.auth_token
            && (token.is_empty() || token.len() > crate::protocol::AUTH_TOKEN_BYTES_MAX)
        {
            return Err(ConfigError::Invalid { key: "auth_token".into(), problem: "must be 1 to 1024 bytes".into() });
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: if self.tls_cert.is_some() { "tls_key" } else { "tls_cert" }.into(),
                    problem: "tls_cert and tls_key are set together".into(),
                });
            }
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(ConfigError::Invalid {
                    key: "tls_client_ca".into(),
                    problem: "mutual TLS needs TLS: set tls_cert and tls_key too".into(),
                });
            }
            _ => {}
        }
        if !self.metrics_addr.is_empty() && self.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "metrics_addr".into(),
                problem: format!(
                    "{:?} is not an IP address and port such as 127.0.0.1:9464, nor \"\" (disabled)",
                    self.metrics_addr
                ),
            });
        }
        check_range("metrics_channel_labels_max", self.metrics_channel_labels_max, METRICS_CHANNEL_LABELS_RANGE)?;
        check_range("max_connections", self.max_connections, MAX_CONNECTIONS_RANGE)?;
        check_range("max_inflight_publishes", self.max_inflight_publishes, INFLIGHT_RANGE)?;
        check_range("max_inflight_deliveries", self.max_inflight_deliveries, INFLIGHT_RANGE)?;
        check_range("max_inflight_publish_bytes", self.max_inflight_publish_bytes, MAX_INFLIGHT_PUBLISH_BYTES_RANGE)?;
        check_range(
            "max_subscriptions_per_connection",
            self.max_subscriptions_per_connection,
            MAX_SUBSCRIPTIONS_RANGE,
        )?;
        check_range("max_batch_bytes", self.max_batch_bytes, MAX_BATCH_BYTES_RANGE)?;
        check_range("max_batch_records", self.max_batch_records, MAX_BATCH_RECORDS_RANGE)?;
        check_range("channel_queue_depth", self.channel_queue_depth, CHANNEL_QUEUE_DEPTH_RANGE)?;
        check_range("heartbeat_interval_ms", self.heartbeat_interval_ms, TIMEOUT_MS_RANGE)?;
        check_range("idle_timeout_ms", self.idle_timeout_ms, TIMEOUT_MS_RANGE)?;
        check_range("frame_timeout_ms", self.frame_timeout_ms, TIMEOUT_MS_RANGE)?;
        check_range("shutdown_timeout_ms", self.shutdown_timeout_ms, TIMEOUT_MS_RANGE)?;
        check_range("delivery_batch_bytes", self.delivery_batch_bytes, DELIVERY_BATCH_BYTES_RANGE)?;
        check_range("lag_notice_threshold", self.lag_notice_threshold, LAG_NOTICE_THRESHOLD_RANGE)?;
        check_range("notice_interval_ms", self.notice_interval_ms, TIMEOUT_MS_RANGE)?;
        check_range("dedup_window", self.dedup_window, DEDUP_WINDOW_RANGE)?;
        check_range("max_producers", self.max_producers, MAX_PRODUCERS_RANGE)?;
        if self.idle_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Invalid {
                key: "idle_timeout_ms".into(),
                problem: format!(
                    "{} must be greater than heartbeat_interval_ms = {}, or idle clients that heartbeat on time are cut off",
                    self.idle_timeout_ms, self.heartbeat_interval_ms
                ),
            });
        }
        let publish_frame_bytes_max = self.max_batch_bytes.max(self.max_message_bytes + 1024);
        if self.max_inflight_publish_bytes < publish_frame_bytes_max {
            return Err(ConfigError::Invalid {
                key: "max_inflight_publish_bytes".into(),
                problem: format!(
                    "{} is smaller than the largest publish frame ({publish_frame_bytes_max} bytes, from max_batch_bytes and max_message_bytes)",
                    self.max_inflight_publish_bytes
                ),
            });
        }
        if self.max_batch_bytes < self.max_message_bytes {
            return Err(ConfigError::Invalid {
                key: "max_batch_bytes".into(),
                problem: format!(
                    "{} is smaller than max_message_bytes = {}: a batch must be able to carry one message",
                    self.max_batch_bytes, self.max_message_bytes
                ),
            });
        }
        check_range("segment_bytes", self.segment_bytes, SEGMENT_BYTES_RANGE)?;
        check_range("segment_max_age_secs", self.segment_max_age_secs, SEGMENT_MAX_AGE_SECS_RANGE)?;
        check_range("index_interval_bytes", self.index_interval_bytes, INDEX_INTERVAL_BYTES_RANGE)?;
        check_range("fsync_interval_ms", self.fsync_interval_ms, FSYNC_INTERVAL_MS_RANGE)?;
        check_range("max_message_bytes", self.max_message_bytes, MAX_MESSAGE_BYTES_RANGE)?;
        check_optional("retention_max_bytes", self.retention_max_bytes)?;
        check_optional("retention_max_age_secs", self.retention_max_age_secs)?;
        check_optional("retention_max_messages", self.retention_max_messages)?;
        check_range(
            "retention_check_interval_ms",
            self.retention_check_interval_ms,
            RETENTION_CHECK_INTERVAL_MS_RANGE,
        )?;
        check_range("max_channels", self.max_channels, MAX_CHANNELS_RANGE)?;
        check_range("max_partitions", self.max_partitions, MAX_PARTITIONS_RANGE)?;
        check_range("default_partitions", self.default_partitions, 1..=self.max_partitions)?;
        check_range("max_groups_per_channel", self.max_groups_per_channel, GROUP_LIMIT_RANGE)?;
        check_range("max_members_per_group", self.max_members_per_group, GROUP_LIMIT_RANGE)?;
        check_range("group_session_timeout_ms", self.group_session_timeout_ms, TIMEOUT_MS_RANGE)?;
        if self.group_session_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Invalid {
                key: "group_session_timeout_ms".into(),
                problem: format!(
                    "{} must be above heartbeat_interval_ms = {}, or members that heartbeat on time leave their groups",
                    self.group_session_timeout_ms, self.heartbeat_interval_ms
                ),
            });
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            let frame_room =
                (crate::cluster::CLUSTER_FRAME_BYTES_MAX - crate::cluster::CLUSTER_FRAME_ROOM_BYTES) as u64;
            if self.max_publish_bytes() > frame_room {
                return Err(ConfigError::Invalid {
                    key: "max_batch_bytes".into(),
                    problem: format!(
                        "a publish of up to {} bytes (max_batch_bytes, or max_message_bytes with its frame) must fit one node-to-node frame in cluster mode: at most {frame_room}",
                        self.max_publish_bytes()
                    ),
                });
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid { key: "data_dir".into(), problem: "must not be empty".into() });
        }
        for (name, overrides) in &self.channels {
            let key = |field: &str| format!("channels.{name}.{field}");
            ChannelName::new(name).map_err(|error| ConfigError::Invalid {
                key: format!("channels.{name}"),
                problem: error.to_string(),
            })?;
            if let Some(value) = overrides.partitions {
                check_range(&key("partitions"), value, 1..=self.max_partitions)?;
            }
            if let Some(value) = overrides.segment_bytes {
                check_range(&key("segment_bytes"), value, SEGMENT_BYTES_RANGE)?;
            }
            if let Some(value) = overrides.segment_max_age_secs {
                check_range(&key("segment_max_age_secs"), value, SEGMENT_MAX_AGE_SECS_RANGE)?;
            }
            check_optional(&key("retention_max_bytes"), overrides.retention_max_bytes)?;
            check_optional(&key("retention_max_age_secs"), overrides.retention_max_age_secs)?;
            check_optional(&key("retention_max_messages"), overrides.retention_max_messages)?;
        }
        Ok(())
    }

    /// The log settings of channels without overrides.
    pub fn default_log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_max_age: Duration::from_secs(self.segment_max_age_secs),
            index_interval_bytes: self.index_interval_bytes,
            fsync: self.fsync,
            max_message_bytes: self.max_message_bytes as usize,
            retention: RetentionPolicy {
                max_bytes: self.retention_max_bytes,
                max_age: self.retention_max_age_secs.map(Duration::from_secs),
                max_messages: self.retention_max_messages,
            },
            ..LogConfig::default()
        }
    }

    /// The listener's TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::security::tls::ServerTlsFiles> {
        Some(crate::security::tls::ServerTlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// Where principals come from.
    pub fn auth_settings(&self) -> crate::security::AuthSettings {
        crate::security::AuthSettings {
            auth_token: self.auth_token.clone(),
            credentials_file: self.credentials_file.clone(),
            mutual_tls: self.tls_client_ca.is_some() && self.tls_cert.is_some(),
        }
    }

    /// The storage engine's settings.
    pub fn store_config(&self) -> StoreConfig {
        let default_log = self.default_log_config();
        let channel_logs = self
            .channels
            .iter()
            .map(|(name, overrides)| {
                let mut log = default_log.clone();
                log.segment_bytes = overrides.segment_bytes.unwrap_or(log.segment_bytes);
                if let Some(secs) = overrides.segment_max_age_secs {
                    log.segment_max_age = Duration::from_secs(secs);
                }
                log.fsync = overrides.fsync.unwrap_or(log.fsync);
                log.retention.max_bytes = overrides.retention_max_bytes.or(log.retention.max_bytes);
                log.retention.max_age =
                    overrides.retention_max_age_secs.map(Duration::from_secs).or(log.retention.max_age);
                log.retention.max_messages = overrides.retention_max_messages.or(log.retention.max_messages);
                (name.clone(), log)
            })
            .collect();
        StoreConfig {
            data_dir: self.data_dir.clone(),
            default_log,
            channel_logs,
            max_channels: self.max_channels as usize,
            default_partitions: self.default_partitions as u32,
            max_partitions: self.max_partitions as u32,
            channel_partitions: self
                .channels
                .iter()
                .filter_map(|(name, overrides)| Some((name.clone(), overrides.partitions? as u32)))
                .collect(),
            fsync_interval: Duration::from_millis(self.fsync_interval_ms),
            retention_check_interval: Duration::from_millis(self.retention_check_interval_ms),
        }
    }
}

/// A parse error as one line. The parser's own `Display` quotes the line
/// with a caret under it over several lines; an operator reading a log or
/// a terminal needs the file, the line and what is wrong.
fn parse_error(text: &str, path: &Path, error: &toml::de::Error) -> ConfigError {
    let line = error.span().and_then(|span| text.get(..span.start)).map(|before| before.matches('\n').count() + 1);
    let message = error.message().trim().replace('\n', "; ");
    // serde words every unknown field "unknown field `NAME`, expected ...",
    // followed by the whole list of keys: name the key alone instead.
    let key = message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`')).map(|(key, _)| key);
    match key {
        Some(key) => ConfigError::UnknownKey { path: path.to_path_buf(), line, key: key.to_owned() },
        None => ConfigError::Parse { path: path.to_path_buf(), line, message },
    }
}

/// `path` or `path, line N`, for errors about a place in a file.
fn at_line(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}, line {line}", path.display()),
        None => path.display().to_string(),
    }
}

fn check_range(key: &str, value: u64, range: RangeInclusive<u64>) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        key: key.to_owned(),
        value: value.to_string(),
        allowed: format!("{}..={}", range.start(), range.end()),
    })
}

fn check_optional(key: &str, value: Option<u64>) -> Result<(), ConfigError> {
    value.map_or(Ok(()), |value| check_range(key, value, RETENTION_LIMIT_RANGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_repository_broker_toml_is_the_defaults() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/broker.toml")).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let error = Config::parse("segment_byte = 5").unwrap_err().to_string();
        assert!(error.contains("segment_byte"), "{error}");
    }

    #[test]
    fn an_unknown_key_is_one_line_naming_the_key_its_line_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "max_connections = 10\n\nfoo = 1\n").unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        let expected = format!(
            "config file {}, line 3: unknown key `foo`; broker.toml in the weir repository lists every key",
            path.display()
        );
        assert_eq!(error, expected);
        // In a channel's table too.
        let error = Config::parse("[channels.orders]\nretention_max_byte = 5").unwrap_err().to_string();
        assert!(!error.contains('\n'), "one line: {error:?}");
        assert!(error.contains("unknown key `retention_max_byte`") && error.contains("line 2"), "{error}");
    }

    #[test]
    fn a_file_that_does_not_parse_is_one_line_with_its_line() {
        for (text, line) in
            [("segment_bytes = \"big\"", 1), ("a = 1\nsegment_bytes = [", 2), ("fsync = \"sometimes\"", 1)]
        {
            let error = Config::parse(text).unwrap_err().to_string();
            assert!(!error.contains('\n'), "one line: {error:?}");
            assert!(error.contains(&format!("line {line}")), "{text:?}: {error}");
        }
    }

    #[test]
    fn out_of_range_values_name_key_value_and_range() {
        let error = Config::parse("segment_bytes = 10").unwrap_err().to_string();
        assert_eq!(error, "config key segment_bytes = 10 is out of range: allowed 1024..=1073741824");
        let error = Config::parse("[channels.orders]\nretention_max_bytes = 0").unwrap_err().to_string();
        assert!(error.contains("channels.orders.retention_max_bytes = 0"), "{error}");
        let error = Config::parse("[channels.\"a/b\"]").unwrap_err().to_string();
        assert!(error.contains("invalid channel name"), "{error}");
        let error = Config::parse("fsync = \"sometimes\"").unwrap_err().to_string();
        assert!(error.contains("sometimes"), "{error}");
    }

    #[test]
    fn cluster_settings_are_checked_and_defaulted() {
        let base = "[cluster]\nnode_id = 1\nlisten_addr = \"127.0.0.1:7451\"\n";
        let node = |id: u64| {
            format!(
                "[[cluster.nodes]]\nid = {id}\ncluster_addr = \"127.0.0.1:7451\"\nclient_addr = \"127.0.0.1:7450\"\n"
            )
        };
        let config = Config::parse(&format!("{base}{}{}", node(1), node(2))).unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!((cluster.heartbeat_interval_ms, cluster.election_timeout_min_ms), (250, 1000));
        assert_eq!((cluster.raft_log_entries_max, cluster.max_segment_transfer_bytes_per_sec), (1 << 20, None));
        assert_eq!(cluster.nodes.len(), 2);
        let limited = Config::parse(&format!(
            "{base}raft_log_entries_max = 4096\nmax_segment_transfer_bytes_per_sec = 1048576\n{}",
            node(1)
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!((limited.raft_log_entries_max, limited.max_segment_transfer_bytes_per_sec), (4096, Some(1 << 20)));
        for (text, key) in [
            (format!("{base}{}{}", node(2), node(2)), "listed twice"),
            ("[cluster]\nnode_id = 0\nlisten_addr = \"127.0.0.1:7451\"".to_string(), "cluster.node_id"),
            ("[cluster]\nnode_id = 1\nlisten_addr = \"localhost\"".to_string(), "cluster.listen_addr"),
            (format!("{base}election_timeout_min_ms = 3000"), "election_timeout_min_ms"),
            (format!("{base}heartbeat_interval_ms = 1000"), "election_timeout_min_ms"),
            (format!("{base}{}", node(1).replace("7450", "x")), "cluster.nodes.client_addr"),
            (format!("{base}peers = 3"), "unknown key `peers`"),
            (format!("{base}tls_cert = \"node.pem\""), "set together"),
            (format!("{base}raft_log_entries_max = 4095"), "cluster.raft_log_entries_max"),
            (
                format!("{base}max_segment_transfer_bytes_per_sec = 1048575"),
                "cluster.max_segment_transfer_bytes_per_sec",
            ),
        ] {
            let error = Config::parse(&text).unwrap_err().to_string();
            assert!(error.contains(key), "{text:?}: {error}");
        }
    }

    #[test]
    fn limits_are_accepted_at_the_bound_and_refused_past_it() {
        let batch = "max_batch_bytes = 67108864\nmax_inflight_publish_bytes = 134217728\n";
        assert!(Config::parse(&format!("{batch}max_message_bytes = {MESSAGE_BYTES_LIMIT}")).is_ok());
        assert!(Config::parse(&format!("{batch}max_message_bytes = {}", MESSAGE_BYTES_LIMIT + 1)).is_err());
        let error = Config::parse("max_batch_bytes = 1024\nmax_message_bytes = 1025").unwrap_err().to_string();
        assert!(error.contains("max_batch_bytes"), "{error}");
        let error = Config::parse("idle_timeout_ms = 1000\nheartbeat_interval_ms = 1000").unwrap_err().to_string();
        assert!(error.contains("idle_timeout_ms"), "{error}");
        assert!(Config::parse("segment_bytes = 1024").is_ok());
        assert!(Config::parse("segment_bytes = 1023").is_err());
    }

    #[test]
    fn channel_overrides_apply_to_that_channel_only() {
        let config = Config::parse(
            "retention_max_messages = 100\n[channels.audit]\nretention_max_age_secs = 60\nfsync = \"never\"",
        )
        .unwrap();
        let store = config.store_config();
        let audit = store.log_config(&ChannelName::new("audit").unwrap());
        assert_eq!(audit.retention.max_age, Some(Duration::from_secs(60)));
        assert_eq!(audit.retention.max_messages, Some(100));
        assert_eq!(audit.fsync, FsyncPolicy::Never);
        let other = store.log_config(&ChannelName::new("other").unwrap());
        assert_eq!(other.retention.max_age, None);
        assert_eq!(other.fsync, FsyncPolicy::Always);
    }
}
