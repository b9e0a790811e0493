//! The broker server: a tokio TCP listener speaking weir's protocol over
//! the storage engine.
//!
//! - `broker`: state shared by connections (channels, limits, counters).
//! - `connection`: one client: framing under limits, requests, answers.
//! - `channel_writer`: one writer per partition, the group commit; an idle
//!   writer's publish is appended on its connection's task.
//! - `outbox`: a connection's socket, shared by its writer task and the
//!   answers written at once.
//! - `subscription`: one task per subscription, a cursor and a window.
//! - `partition_follower`: a subscription to every partition starts reading
//!   the partitions added later.
//! - `offsets`: durable subscription offsets in an internal log.
//!
//! Shutdown (after mini-redis): a cancellation token stops the accept loop
//! and every connection's reader at a frame boundary; each connection then
//! sends every answer it owes; the channel writers drain their queues; the
//! store syncs and closes.

mod broker;
mod channel_writer;
mod connection;
mod group;
mod member;
pub mod offsets;
mod outbox;
mod partition_follower;
mod stats;
mod subscription;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use stats::Stats;

use crate::cluster::ClusterNode;
use crate::config::Config;
use crate::security::Authenticator;
use crate::security::tls::ServerTls;
use crate::storage::fs::{FileSystem, StdFileSystem};
use crate::storage::{Maintenance, RecordSlices, StorageError, Store};
use broker::Broker;
use offsets::{DurableOffsets, OFFSET_COMMIT_INTERVAL};

/// How often a node writes the positions its subscribers acknowledged in
/// replicated channels to the metadata group: each write is a metadata
/// entry, so at most one a second per node; a failover can cost the
/// subscribers up to this much redelivery.
pub const POSITION_REPLICATION_INTERVAL: Duration = Duration::from_secs(1);

/// How long a graceful stop spends writing the last positions to the
/// metadata group (a commit there takes milliseconds; a cluster without a
/// metadata leader would never commit them).
const POSITIONS_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before writing them again after a refusal.
const POSITIONS_FLUSH_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Connections over `max_connections` told so at once; more are closed
/// without a word.
const REFUSALS_CONCURRENT_MAX: usize = 16;

/// Something queued for a connection's socket.
pub(crate) enum Outbound {
    Frame(Vec<u8>),
    /// A frame head followed by record bytes shared with a memory map.
    Records {
        head: Vec<u8>,
        records: RecordSlices,
    },
}

/// A frame of one subscription, queued for the connection's socket. The
/// connection's writer drops it unsent once the subscription has ended
/// (`ended` cancelled): after UNSUBSCRIBED, or the SUBSCRIBED of a new
/// subscription reusing the id, nothing of the old one reaches the client.
pub(crate) struct Delivery {
    pub ended: CancellationToken,
    pub outbound: Outbound,
    /// The subscription's last frames (ERROR and UNSUBSCRIBED after the
    /// server stopped it): the writer cancels `ended` as it takes them, so
    /// that the id is free before the client can see UNSUBSCRIBED.
    pub ends_subscription: bool,
}

/// The wire error code for a storage error.
pub(crate) fn storage_error_code(error: &StorageError) -> crate::protocol::ErrorCode {
    use crate::protocol::ErrorCode;
    match error {
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::InvalidChannelName(_) => ErrorCode::InvalidChannelName,
        StorageError::UnknownChannel { .. } => ErrorCode::UnknownChannel,
        StorageError::ChannelExists { .. } => ErrorCode::ChannelExists,
        StorageError::TooManyChannels { .. } => ErrorCode::TooManyChannels,
        StorageError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        StorageError::TooManyPartitions { .. } => ErrorCode::TooManyPartitions,
        StorageError::PartitionCountDecrease { .. } => ErrorCode::InvalidRequest,
        error if error.is_storage_full() => ErrorCode::StorageFull,
        _ => ErrorCode::StorageError,
    }
}

/// Logs a storage error met while serving, at most once a second (see
/// [`stats::RateLimitedLog`]).
pub(crate) fn log_storage_error(stats: &Stats, error: &StorageError, what: &str) {
    if let Some(held_back) = stats.storage_error_log.admit() {
        tracing::error!(%error, similar_errors_not_logged = held_back, "{what}");
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Tls(#[from] crate::security::tls::TlsError),
    #[error(transparent)]
    Credentials(#[from] crate::security::CredentialsError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("a server task failed: {0}")]
    Task(String),
}

/// A running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    auth: Arc<Authenticator>,
    tls: Option<Arc<ServerTls>>,
    cluster_addr: Option<SocketAddr>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl ServerHandle {
    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The cluster listener's address, in cluster mode.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_addr
    }

    /// The server's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Starts a graceful shutdown; [`ServerHandle::wait`] returns when done.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token that shuts the server down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Reads the TLS files and the credentials file again (SIGHUP); see
    /// [`Reloader::reload`].
    ///
    /// # Errors
    /// As [`Reloader::reload`].
    pub fn reload(&self) -> Result<(), ServerError> {
        self.reloader().reload()
    }

    /// What reloads the server's TLS files and credentials, apart from the
    /// handle (which [`ServerHandle::wait`] consumes).
    pub fn reloader(&self) -> Reloader {
        Reloader { auth: Arc::clone(&self.auth), tls: self.tls.clone() }
    }

    /// Waits for the server to stop.
    ///
    /// # Errors
    /// The final sync failed, or a server task panicked.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(result) => result,
            Err(error) => Err(ServerError::Task(error.to_string())),
        }
    }

    /// Shuts down and waits.
    ///
    /// # Errors
    /// As [`ServerHandle::wait`].
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown();
        self.wait().await
    }
}

/// Reloads a running server's TLS files and credentials file.
#[derive(Clone)]
pub struct Reloader {
    auth: Arc<Authenticator>,
    tls: Option<Arc<ServerTls>>,
}

impl Reloader {
    /// Reads the TLS files and the credentials file again. New connections
    /// use them; established ones keep their TLS session, and their
    /// principal unless the reload removed or changed that user (then they
    /// are closed). Whatever fails to load keeps its old version.
    ///
    /// # Errors
    /// The first part that failed to load (the other part is still
    /// reloaded).
    pub fn reload(&self) -> Result<(), ServerError> {
        let tls = match &self.tls {
            Some(tls) => tls.reload().map_err(ServerError::from),
            None => Ok(()),
        };
        let credentials = self.auth.reload().map(|users| {
            tracing::info!(users, "credentials reloaded");
        });
        tls?;
        credentials?;
        Ok(())
    }
}

/// Validates `config`, opens (recovers) the data directory, binds
/// `listen_addr` and starts serving.
///
/// # Errors
/// Invalid configuration, a data directory that cannot be opened, or an
/// address that cannot be bound.
pub async fn start(config: Config) -> Result<ServerHandle, ServerError> {
    start_with_fs(config, Arc::new(StdFileSystem)).await
}

/// As [`start`], over a given file system implementation.
///
/// # Errors
/// As [`start`].
pub async fn start_with_fs(config: Config, fs: Arc<dyn FileSystem>) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    // Checked before the data directory is opened: a broker whose TLS or
    // credentials are unusable must not start at all.
    let tls = config.tls_files().map(ServerTls::new).transpose()?.map(Arc::new);
    let auth = Arc::new(Authenticator::new(config.auth_settings())?);
    let store_config = config.store_config();
    let default_log = store_config.default_log.clone();
    let (store, offsets) = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
        let store = Store::open(store_config, Arc::clone(&fs))?;
        let offsets = DurableOffsets::open(fs, store.data_dir(), &default_log)?;
        Ok((store, offsets))
    })
    .await
    .map_err(|error| ServerError::Task(error.to_string()))??;
    let listener = TcpListener::bind(&config.listen_addr)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen_addr.clone(), source })?;
    let local_addr =
        listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen_addr.clone(), source })?;
    let store = Arc::new(store);
    if !config.metrics_addr.is_empty() {
        let metrics_addr = crate::metrics::install(&config.metrics_addr)?;
        tracing::info!(%metrics_addr, "Prometheus metrics at http://{metrics_addr}/metrics");
    }
    // Last of what can fail, and after the metrics recorder, which its
    // first gauges go to.
    let cluster = match &config.cluster {
        Some(settings) => Some(ClusterNode::start(settings, &config.data_dir, config.max_publish_bytes()).await?),
        None => None,
    };
    let cluster_addr = cluster.as_ref().map(ClusterNode::listen_addr);
    let broker = Arc::new(Broker::new(config, Arc::clone(&store), offsets, Arc::clone(&auth)));
    if let Some(cluster) = &cluster {
        broker.set_replicas(cluster.replicas());
        broker.offsets.set_replicated(Arc::new(broker::ClusterPositions(cluster.replicas())));
        cluster.host_partitions(Arc::new(broker::BrokerHost(Arc::clone(&broker))));
    }
    let shutdown = CancellationToken::new();
    let stats = Arc::clone(&broker.stats);
    tracing::info!(
        %local_addr, tls = tls.is_some(), limits = ?broker.limits, fsync = ?broker.config.fsync, "weir is listening"
    );
    let task = tokio::spawn(run(broker, listener, tls.clone(), cluster, shutdown.clone()));
    Ok(ServerHandle { local_addr, shutdown, stats, auth, tls, cluster_addr, task })
}

async fn run(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    cluster: Option<ClusterNode>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let mut maintenance = Maintenance::start(Arc::clone(&broker.store));
    let committer = tokio::spawn(commit_offsets(Arc::clone(&broker), shutdown.clone()));
    if let Some(replicas) = broker.replicas() {
        tokio::spawn(replicate_positions(Arc::clone(&broker), replicas, shutdown.clone()));
    }
    if !broker.config.metrics_addr.is_empty() {
        tokio::spawn(refresh_metrics(Arc::clone(&broker), shutdown.clone()));
    }
    let connections = TaskTracker::new();
    let max_connections = broker.config.max_connections;
    let permits = Arc::new(Semaphore::new(max_connections as usize));
    // Refusals are answered a few at a time (a TLS handshake each on a
    // TLS port); beyond that a refused connection is closed unanswered.
    let refusals = Arc::new(Semaphore::new(REFUSALS_CONCURRENT_MAX));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                Stats::add(&broker.stats.connections_accepted, 1);
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
                        connections.spawn(connection::serve(
                            Arc::clone(&broker),
                            socket,
                            acceptor,
                            shutdown.clone(),
                            permit,
                        ));
                    }
                    Err(_) => {
                        Stats::add(&broker.stats.connections_refused, 1);
                        tracing::warn!(%peer, max_connections, "refused a connection: at max_connections");
                        if let Ok(refusal) = Arc::clone(&refusals).try_acquire_owned() {
                            let acceptor = tls.as_ref().map(|tls| tls.acceptor());
                            connections.spawn(async move {
                                connection::refuse(socket, acceptor, max_connections).await;
                                drop(refusal);
                            });
                        }
                    }
                }
            }
            Err(error) => {
                // Out of file descriptors, typically: back off, do not spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let mut metadata_writable = true;
    if let Some(cluster) = &cluster {
        // Before the in-flight requests are answered: publishes appended
        // before the hand-over are committed by the next leader and
        // answered here; later ones are answered NotLeader.
        tracing::info!("shutting down: handing over the leadership of the groups this node leads");
        metadata_writable = cluster.hand_over_leadership().await;
    }
    tracing::info!("shutting down: no new connections; answering in-flight requests");
    connections.close();
    let grace = Duration::from_millis(broker.config.shutdown_timeout_ms);
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "connections still open after shutdown_timeout_ms; closing anyway"
        );
    }
    if let Some(replicas) = broker.replicas()
        && metadata_writable
    {
        flush_positions(&broker, &replicas).await;
    }
    broker.stop_writers().await;
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    let _ = committer.await;
    maintenance.stop();
    let closing = Arc::clone(&broker);
    let closed = tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
        // The store is closed (its last seals waited for) even when the
        // positions fail to close.
        let offsets = closing.offsets.close();
        closing.store.close()?;
        offsets
    })
    .await
    .map_err(|error| ServerError::Task(error.to_string()))?;
    closed?;
    tracing::info!("shutdown complete: every segment synced");
    Ok(())
}

/// Writes acknowledged durable offsets every [`OFFSET_COMMIT_INTERVAL`].
async fn commit_offsets(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(OFFSET_COMMIT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let committing = Arc::clone(&broker);
        let committed = tokio::task::spawn_blocking(move || committing.offsets.commit()).await;
        if let Ok(Err(error)) = committed {
            tracing::error!(%error, "could not store durable offsets; retrying");
        }
    }
}

/// Writes the positions of replicated channels that this node's
/// subscribers acknowledged to the metadata group every
/// [`POSITION_REPLICATION_INTERVAL`], so that they resume there on any node
/// (docs/REPLICATION.md).
async fn replicate_positions(
    broker: Arc<Broker>,
    replicas: Arc<crate::cluster::Replicas>,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(POSITION_REPLICATION_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if let Err(error) = replicate_positions_once(&broker, &replicas).await {
            tracing::debug!(%error, "positions not written to the metadata group; retrying");
        }
    }
}

/// Writes the positions acknowledged since the last write (at most
/// `POSITIONS_PER_COMMAND_MAX` of them) to the metadata group; on failure
/// they are kept for the next.
async fn replicate_positions_once(broker: &Broker, replicas: &crate::cluster::Replicas) -> Result<(), String> {
    let taken = broker.offsets.take_to_replicate(crate::cluster::POSITIONS_PER_COMMAND_MAX);
    if taken.is_empty() {
        return Ok(());
    }
    let positions = taken
        .iter()
        .map(|((channel, name, partition, owner), offset)| crate::cluster::ReplicatedPosition {
            channel: channel.clone(),
            name: name.clone(),
            partition: *partition,
            group: *owner == offsets::Owner::Group,
            offset: *offset,
        })
        .collect();
    replicas.commit_positions(positions).await.inspect_err(|_| {
        broker.offsets.return_to_replicate(taken.into_iter().map(|(key, _)| key));
    })
}

/// At a graceful stop, writes every position acknowledged since the last
/// write to the metadata group (commands of `POSITIONS_PER_COMMAND_MAX`),
/// retrying for at most [`POSITIONS_FLUSH_TIMEOUT`], so that subscribers resume
/// elsewhere where they stopped instead of up to a second earlier.
async fn flush_positions(broker: &Broker, replicas: &crate::cluster::Replicas) {
    let mut last_error = String::new();
    let flushed = tokio::time::timeout(POSITIONS_FLUSH_TIMEOUT, async {
        while broker.offsets.has_to_replicate() {
            // A new metadata leader may refuse writes for a moment.
            if let Err(error) = replicate_positions_once(broker, replicas).await {
                last_error = error;
                tokio::time::sleep(POSITIONS_FLUSH_RETRY_PAUSE).await;
            }
        }
    })
    .await;
    if flushed.is_err() {
        tracing::warn!(
            error = %last_error,
            "positions acknowledged in the last second not written to the metadata group within {POSITIONS_FLUSH_TIMEOUT:?}"
        );
    }
}

/// Publishes derived metrics every [`crate::metrics::METRICS_REFRESH_INTERVAL`].
async fn refresh_metrics(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(crate::metrics::METRICS_REFRESH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        publish_metrics(&broker);
    }
}

fn publish_metrics(broker: &Broker) {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use metrics::{counter, gauge};

    crate::metrics::refresh_counters(&broker.stats);
    // Sum per label first: channels past the label cap share one.
    #[derive(Default)]
    struct ChannelTotals {
        counters: crate::storage::LogCounters,
        size_bytes: u64,
        segments: u64,
        start_offset: u64,
        next_offset: u64,
        subscriptions: u64,
        ephemeral_lag_max: u64,
        storage_full: bool,
    }
    let mut totals: BTreeMap<String, ChannelTotals> = BTreeMap::new();
    let mut next_offsets = std::collections::HashMap::new();
    for log in broker.store.logs() {
        let label = broker.channel_labels.label(log.name().as_str()).to_string();
        let stats = log.stats();
        let counters = log.counters();
        let entry = totals.entry(label).or_default();
        entry.counters.messages_appended += counters.messages_appended;
        entry.counters.bytes_appended += counters.bytes_appended;
        entry.counters.retention_segments_deleted += counters.retention_segments_deleted;
        entry.counters.retention_bytes_deleted += counters.retention_bytes_deleted;
        entry.counters.storage_full_episodes += counters.storage_full_episodes;
        entry.storage_full |= log.is_storage_full();
        entry.size_bytes += stats.size_bytes;
        entry.segments += stats.segment_count;
        // Offsets are per partition: the channel's gauges show partition 0
        // until the metrics carry a partition label.
        next_offsets.insert((log.name().clone(), log.partition()), stats.next_offset);
        if log.partition() != 0 {
            continue;
        }
        entry.start_offset = stats.start_offset;
        entry.next_offset = stats.next_offset;
    }
    let mut inflight_deliveries = 0;
    // Per (channel label, durable name): per partition, the furthest-behind
    // live subscription of that name, summed over partitions below.
    let mut durable_lags: BTreeMap<(String, String), BTreeMap<u32, u64>> = BTreeMap::new();
    let durable_labels_max = broker.config.metrics_channel_labels_max as usize;
    for subscription in broker.subscription_statuses() {
        let next = subscription.next_offset.load(Ordering::Relaxed);
        let ack_floor = subscription.ack_floor.load(Ordering::Relaxed);
        inflight_deliveries += next.saturating_sub(ack_floor);
        let partition_next =
            next_offsets.get(&(subscription.channel.clone(), subscription.partition)).copied().unwrap_or(next);
        let lag = partition_next.saturating_sub(ack_floor);
        let label = broker.channel_labels.label(subscription.channel.as_str()).to_string();
        let entry = totals.entry(label.clone()).or_default();
        entry.subscriptions += 1;
        let key = (label, subscription.durable_name.clone().unwrap_or_default());
        match &subscription.durable_name {
            Some(_) if durable_lags.contains_key(&key) || durable_lags.len() < durable_labels_max => {
                let lag_entry = durable_lags.entry(key).or_default().entry(subscription.partition).or_default();
                *lag_entry = (*lag_entry).max(lag);
            }
            _ => entry.ephemeral_lag_max = entry.ephemeral_lag_max.max(lag),
        }
    }
    for channel in broker.store.channels() {
        let label = broker.channel_labels.label(channel.name().as_str()).to_string();
        for ((name, partition), resume_at) in broker.offsets.for_channel(channel.name().as_str()) {
            let key = (label.clone(), name);
            if !durable_lags.contains_key(&key) && durable_lags.len() >= durable_labels_max {
                continue;
            }
            let next = next_offsets.get(&(channel.name().clone(), partition)).copied().unwrap_or(resume_at);
            durable_lags.entry(key).or_default().entry(partition).or_insert(next.saturating_sub(resume_at));
        }
    }
    for (label, total) in totals {
        counter!("weir_messages_appended_total", "channel" => label.clone()).absolute(total.counters.messages_appended);
        counter!("weir_bytes_appended_total", "channel" => label.clone()).absolute(total.counters.bytes_appended);
        counter!("weir_retention_deleted_segments_total", "channel" => label.clone())
            .absolute(total.counters.retention_segments_deleted);
        counter!("weir_retention_deleted_bytes_total", "channel" => label.clone())
            .absolute(total.counters.retention_bytes_deleted);
        counter!("weir_storage_full_episodes_total", "channel" => label.clone())
            .absolute(total.counters.storage_full_episodes);
        gauge!("weir_storage_full", "channel" => label.clone()).set(if total.storage_full { 1.0 } else { 0.0 });
        gauge!("weir_log_bytes", "channel" => label.clone()).set(total.size_bytes as f64);
        gauge!("weir_log_segments", "channel" => label.clone()).set(total.segments as f64);
        gauge!("weir_subscriptions", "channel" => label.clone()).set(total.subscriptions as f64);
        if label != crate::metrics::OTHER_CHANNELS_LABEL {
            gauge!("weir_log_start_offset", "channel" => label.clone()).set(total.start_offset as f64);
            gauge!("weir_log_next_offset", "channel" => label.clone()).set(total.next_offset as f64);
        }
        gauge!("weir_subscription_lag_messages", "channel" => label, "subscription" => "_ephemeral")
            .set(total.ephemeral_lag_max as f64);
    }
    for ((channel, name), lags) in durable_lags {
        let lag: u64 = lags.values().sum();
        gauge!("weir_subscription_lag_messages", "channel" => channel, "subscription" => name).set(lag as f64);
    }
    gauge!("weir_inflight_deliveries").set(inflight_deliveries as f64);
    gauge!("weir_channels_unavailable").set(broker.store.unavailable_count() as f64);
    // Consumer groups, capped like the other labels: the first groups (by
    // channel and name) get their own series, the rest none.
    // Per partition too, up to the same cap counted in (group, partition)
    // series.
    let labels_max = broker.config.metrics_channel_labels_max as usize;
    let mut partition_series = 0;
    for group in broker.group_infos(None).into_iter().take(labels_max) {
        let channel = broker.channel_labels.label(&group.channel).to_string();
        let lag: u64 = group.partitions.iter().map(|partition| partition.lag).sum();
        gauge!("weir_group_lag_messages", "channel" => channel.clone(), "group" => group.name.clone()).set(lag as f64);
        gauge!("weir_group_members", "channel" => channel.clone(), "group" => group.name.clone())
            .set(group.member_count as f64);
        for partition in &group.partitions {
            if partition_series >= labels_max {
                break;
            }
            partition_series += 1;
            gauge!(
                "weir_group_partition_lag_messages",
                "channel" => channel.clone(),
                "group" => group.name.clone(),
                "partition" => partition.partition.to_string()
            )
            .set(partition.lag as f64);
        }
    }
}
