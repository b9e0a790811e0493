//! The state every connection shares: the store, a writer per channel,
//! durable offsets, the live subscriptions (for the admin view), the
//! advertised limits and the counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::channel_writer::{self, AppendRequest, PartitionWriter, WriterLimits};
use super::group::Groups;
use super::offsets::DurableOffsets;
use super::stats::Stats;
use crate::config::Config;
use crate::protocol::{ChannelInfo, GroupInfo, GroupPartitionInfo, Limits, PartitionInfo, SubscriptionInfo};
use crate::security::Authenticator;
use crate::storage::{Channel, ChannelLog, ChannelName, ChannelSettings, LogCounters, StorageError, Store};

/// The least a group commit may gather, whatever `max_batch_bytes` is.
const GROUP_COMMIT_BYTES_MIN: usize = 8 * 1024 * 1024;
const _: () = assert!(GROUP_COMMIT_BYTES_MIN <= crate::storage::APPEND_BATCH_BYTES_MAX);

/// A channel as the server sees it: its partitions' handles, which grow
/// when partitions are added.
pub(crate) struct ChannelHandle {
    pub channel: Arc<Channel>,
    partitions: RwLock<Vec<Arc<PartitionHandle>>>,
    /// Cancelled when the channel is deleted: its subscriptions and group
    /// members end.
    pub deleted: CancellationToken,
    /// The partition count, for subscriptions to every partition to start
    /// reading the ones added later.
    pub partitions_added: watch::Sender<u32>,
}

/// One partition as the server sees it: its log, the queue into its writer,
/// and the watches that wake its subscribers (appends, retention).
pub(crate) struct PartitionHandle {
    pub log: Arc<ChannelLog>,
    /// The writer task's queue. Only handles hold it: the task ends once
    /// every handle is gone.
    pub appends: mpsc::Sender<AppendRequest>,
    pub writer: Arc<PartitionWriter>,
    pub tail: watch::Receiver<u64>,
    /// The log's first offset, moved by retention.
    pub log_start: watch::Receiver<u64>,
}

impl ChannelHandle {
    /// The partitions that have a writer (a consumer group assigns these).
    pub fn partition_count(&self) -> u32 {
        self.partitions.read().unwrap_or_else(|p| p.into_inner()).len() as u32
    }

    /// The handle of `partition`.
    ///
    /// # Errors
    /// `UnknownPartition` naming the partition count.
    pub fn partition(&self, partition: u32) -> Result<Arc<PartitionHandle>, StorageError> {
        let partitions = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        partitions.get(partition as usize).cloned().ok_or_else(|| StorageError::UnknownPartition {
            channel: self.channel.name().to_string(),
            partition,
            count: partitions.len() as u32,
        })
    }
}

/// What the admin view shows of a live subscription, in one partition.
pub(crate) struct SubscriptionStatus {
    pub channel: ChannelName,
    pub partition: u32,
    pub durable_name: Option<String>,
    /// The consumer group, for a group member's cursor.
    pub group: Option<String>,
    pub next_offset: AtomicU64,
    /// First offset not yet acknowledged.
    pub ack_floor: AtomicU64,
}

pub(crate) struct Broker {
    pub config: Config,
    pub limits: Limits,
    pub store: Arc<Store>,
    pub offsets: DurableOffsets,
    pub stats: Arc<Stats>,
    /// Turns HELLO credentials into principals.
    pub auth: Arc<Authenticator>,
    pub channel_labels: crate::metrics::ChannelLabels,
    pub groups: Groups,
    channels: Mutex<HashMap<ChannelName, Arc<ChannelHandle>>>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    subscriptions: Mutex<HashMap<u64, Arc<SubscriptionStatus>>>,
    next_subscription_key: AtomicU64,
    started: std::time::Instant,
    stopping: std::sync::atomic::AtomicBool,
    /// The replicated partitions this node hosts, in cluster mode.
    replicas: std::sync::OnceLock<Arc<crate::cluster::Replicas>>,
}

/// Why a channel cannot be deleted.
pub(crate) enum DeleteError {
    /// It has live subscriptions (and `force` was not given).
    InUse {
        subscriptions: usize,
    },
    Channel(ChannelError),
}

/// Why a channel cannot be used.
pub(crate) enum ChannelError {
    Unknown,
    /// The broker is shutting down: no channel writer may start.
    ShuttingDown,
    Storage(StorageError),
}

impl Broker {
    pub fn new(config: Config, store: Arc<Store>, offsets: DurableOffsets, auth: Arc<Authenticator>) -> Broker {
        let max_frame_bytes = config.max_publish_bytes();
        let limits = Limits {
            max_message_bytes: config.max_message_bytes as u32,
            max_frame_bytes: max_frame_bytes as u32,
            max_batch_bytes: config.max_batch_bytes as u32,
            max_batch_records: config.max_batch_records as u32,
            max_inflight_publishes: config.max_inflight_publishes as u32,
            max_inflight_publish_bytes: config.max_inflight_publish_bytes as u32,
            max_inflight_deliveries: config.max_inflight_deliveries as u32,
            max_subscriptions_per_connection: config.max_subscriptions_per_connection as u32,
            heartbeat_interval_ms: config.heartbeat_interval_ms as u32,
            idle_timeout_ms: config.idle_timeout_ms as u32,
        };
        Broker {
            auth,
            channel_labels: crate::metrics::ChannelLabels::new(config.metrics_channel_labels_max as usize),
            groups: Groups::new(config.max_groups_per_channel as usize, config.max_members_per_group as usize),
            config,
            limits,
            store,
            offsets,
            stats: Arc::new(Stats::default()),
            channels: Mutex::new(HashMap::new()),
            writers: Mutex::new(Vec::new()),
            subscriptions: Mutex::new(HashMap::new()),
            next_subscription_key: AtomicU64::new(1),
            started: std::time::Instant::now(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            replicas: std::sync::OnceLock::new(),
        }
    }

    /// Whether channels are created on first use: `auto_create_channels`,
    /// never in cluster mode (a node that has not yet applied the creation
    /// of a replicated channel would create a local one of the same name).
    pub fn auto_creates(&self) -> bool {
        self.config.auto_create_channels && self.config.cluster.is_none()
    }

    /// The replicated partitions this node hosts, in cluster mode.
    pub fn replicas(&self) -> Option<Arc<crate::cluster::Replicas>> {
        self.replicas.get().cloned()
    }

    /// Set once, when cluster mode starts.
    pub fn set_replicas(&self, replicas: Arc<crate::cluster::Replicas>) {
        let _ = self.replicas.set(replicas);
    }

    /// The channel `name`, creating it when `auto_create_channels` allows.
    pub fn channel(&self, name: &ChannelName) -> Result<Arc<ChannelHandle>, ChannelError> {
        self.channel_creating(name, true)
    }

    /// The channel `name`, creating it only when `may_create` (the
    /// asker's permission) and `auto_create_channels` both allow: decided
    /// here, where it is created, so that a channel deleted since the
    /// asker's permissions were checked is not re-created for it.
    pub fn channel_creating(&self, name: &ChannelName, may_create: bool) -> Result<Arc<ChannelHandle>, ChannelError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(ChannelError::ShuttingDown);
        }
        if let Some(handle) = self.lock_channels().get(name) {
            return Ok(Arc::clone(handle));
        }
        if let Some(error) = self.store.unavailable(name) {
            return Err(ChannelError::Storage(error));
        }
        let channel = match self.store.channel(name) {
            Some(channel) => channel,
            None if self.auto_creates() && may_create => {
                self.store.get_or_create(name).map_err(ChannelError::Storage)?
            }
            None => return Err(ChannelError::Unknown),
        };
        self.handle_for(channel)
    }

    /// Creates a channel with explicit settings.
    pub fn create_channel(&self, name: &ChannelName, settings: ChannelSettings) -> Result<(), StorageError> {
        let channel = self.store.create(name, settings)?;
        // Stopping: the channel exists on disk; its writers start next time.
        let _ = self.handle_for(channel);
        Ok(())
    }

    /// Raises the partition count of `name` (at most `max_partitions`) and
    /// starts the new partitions' writers.
    pub fn increase_partitions(&self, name: &ChannelName, count: u32) -> Result<(), ChannelError> {
        self.increase_partitions_up_to(name, count, self.config.max_partitions as u32)
    }

    /// [`Broker::increase_partitions`] bounded by `count_max` (a
    /// replicated channel's copy: the cluster's bound, not this node's
    /// `max_partitions`, since the metadata leader placed the partitions).
    fn increase_partitions_up_to(&self, name: &ChannelName, count: u32, count_max: u32) -> Result<(), ChannelError> {
        let handle = self.channel(name)?;
        // Under the channels lock, which a delete holds too: a channel
        // deleted meanwhile gets no partitions (nor files) back.
        let channels = self.lock_channels();
        if self.stopping.load(Ordering::Acquire) {
            return Err(ChannelError::ShuttingDown);
        }
        if handle.deleted.is_cancelled() || !channels.get(name).is_some_and(|current| Arc::ptr_eq(current, &handle)) {
            return Err(ChannelError::Storage(StorageError::UnknownChannel { channel: name.to_string() }));
        }
        handle.channel.increase_partitions(count, count_max).map_err(ChannelError::Storage)?;
        self.add_partition_handles(&handle);
        self.groups.partitions_changed(name, handle.partition_count());
        drop(channels);
        Ok(())
    }

    /// Deletes the channel `name`: refused (`InUse`) while it has live
    /// subscriptions, unless `force`, which ends them (ERROR UnknownChannel
    /// and UNSUBSCRIBED); then its writers stop taking appends, its files
    /// are removed, and its durable positions and groups are forgotten.
    pub fn delete_channel(&self, name: &ChannelName, force: bool) -> Result<(), DeleteError> {
        // Live subscriptions: cursors outside groups, and group members
        // (whose cursors come and go).
        let cursors = self.subscription_statuses().iter().filter(|s| &s.channel == name && s.group.is_none()).count();
        let live = cursors + self.groups.member_count(name);
        if live > 0 && !force {
            return Err(DeleteError::InUse { subscriptions: live });
        }
        if self.stopping.load(Ordering::Acquire) {
            return Err(DeleteError::Channel(ChannelError::ShuttingDown));
        }
        // The waits for the partitions' last seals happen before the
        // channels lock, which every publish takes.
        self.store.stop_appends(name);
        // Under the channels lock, so that no handle of the old channel is
        // made while it goes (see `handle_for`).
        let mut channels = self.lock_channels();
        if self.stopping.load(Ordering::Acquire) {
            return Err(DeleteError::Channel(ChannelError::ShuttingDown));
        }
        let handle = channels.remove(name);
        if let Some(handle) = &handle {
            handle.deleted.cancel();
        }
        self.groups.forget_channel(name);
        let set_aside = self.store.set_aside(name);
        self.offsets.forget_channel(name.as_str());
        drop(channels);
        // The files are no longer any channel's: removed without the lock.
        match set_aside {
            Ok(trash) => self
                .store
                .remove_set_aside(name, &trash)
                .map_err(|error| DeleteError::Channel(ChannelError::Storage(error))),
            Err(StorageError::UnknownChannel { .. }) if handle.is_none() => {
                Err(DeleteError::Channel(ChannelError::Unknown))
            }
            Err(error) => Err(DeleteError::Channel(ChannelError::Storage(error))),
        }
    }

    /// The handle of `channel`, starting its partitions' writers on first
    /// use.
    fn handle_for(&self, channel: Arc<Channel>) -> Result<Arc<ChannelHandle>, ChannelError> {
        let mut channels = self.lock_channels();
        if self.stopping.load(Ordering::Acquire) {
            return Err(ChannelError::ShuttingDown);
        }
        if let Some(handle) = channels.get(channel.name()) {
            return Ok(Arc::clone(handle));
        }
        // A channel deleted since it was looked up gets no handle: the
        // request goes on as for a channel that does not exist.
        if !self.store.channel(channel.name()).is_some_and(|current| Arc::ptr_eq(&current, &channel)) {
            return Err(ChannelError::Storage(StorageError::UnknownChannel { channel: channel.name().to_string() }));
        }
        let handle = Arc::new(ChannelHandle {
            channel: Arc::clone(&channel),
            partitions: RwLock::new(Vec::new()),
            deleted: CancellationToken::new(),
            partitions_added: watch::Sender::new(0),
        });
        self.add_partition_handles(&handle);
        channels.insert(channel.name().clone(), Arc::clone(&handle));
        Ok(handle)
    }

    /// Starts a writer for every partition of the channel that has none
    /// yet. Called with the channels lock held, so that no writer starts
    /// after `stop_writers` emptied the map.
    fn add_partition_handles(&self, handle: &ChannelHandle) {
        let mut partitions = handle.partitions.write().unwrap_or_else(|p| p.into_inner());
        for log in handle.channel.partitions().into_iter().skip(partitions.len()) {
            partitions.push(Arc::new(self.start_partition(log)));
        }
        handle.partitions_added.send_replace(partitions.len() as u32);
    }

    fn start_partition(&self, log: Arc<ChannelLog>) -> PartitionHandle {
        let (appends, requests) = mpsc::channel(self.config.channel_queue_depth as usize);
        let (tail_sender, tail) = watch::channel(log.next_offset());
        let limits = WriterLimits {
            // One group commit gathers about one maximal batch: enough to
            // share a sync widely, small enough to keep its latency short.
            group_bytes_max: (self.config.max_batch_bytes as usize).max(GROUP_COMMIT_BYTES_MIN),
            dedup_window: self.config.dedup_window as usize,
            max_producers: self.config.max_producers as usize,
        };
        let writer = Arc::new(PartitionWriter::new(Arc::clone(&log), tail_sender, limits, Arc::clone(&self.stats)));
        let task = tokio::spawn(channel_writer::run(Arc::clone(&writer), requests));
        self.writers.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        let (start_sender, log_start) = watch::channel(log.start_offset());
        log.set_start_offset_listener(Box::new(move |start| {
            start_sender.send_replace(start);
        }));
        PartitionHandle { log, appends, writer, tail, log_start }
    }

    /// Closes every channel's queue and waits until each writer has
    /// answered everything it had queued.
    pub async fn stop_writers(&self) {
        {
            // Under the channels lock, so that no `handle_for` can add a
            // writer after the map is emptied.
            let mut channels = self.lock_channels();
            self.stopping.store(true, Ordering::Release);
            channels.clear();
        }
        let writers: Vec<JoinHandle<()>> = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        for writer in writers {
            let _ = writer.await;
        }
    }

    /// Registers a live subscription for the admin view; removed when the
    /// returned guard drops.
    pub fn register_subscription(self: &Arc<Self>, status: Arc<SubscriptionStatus>) -> SubscriptionGuard {
        let key = self.next_subscription_key.fetch_add(1, Ordering::Relaxed);
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner()).insert(key, status);
        SubscriptionGuard { broker: Arc::clone(self), key }
    }

    /// Counters and per-channel figures for STATS.
    pub fn stats_snapshot(&self) -> (Vec<(String, u64)>, Vec<crate::protocol::ChannelStats>) {
        let stats = &self.stats;
        let get = Stats::get;
        let subscriptions = self.subscription_statuses();
        let inflight_deliveries: u64 = subscriptions
            .iter()
            .map(|s| s.next_offset.load(Ordering::Relaxed).saturating_sub(s.ack_floor.load(Ordering::Relaxed)))
            .sum();
        let counters = vec![
            ("uptime_seconds".to_owned(), self.started.elapsed().as_secs()),
            ("connections_open".to_owned(), get(&stats.connections_open)),
            ("connections_accepted_total".to_owned(), get(&stats.connections_accepted)),
            ("connections_refused_total".to_owned(), get(&stats.connections_refused)),
            ("messages_appended_total".to_owned(), get(&stats.messages_appended)),
            ("publishes_rejected_too_large_total".to_owned(), get(&stats.publishes_rejected_too_large)),
            ("publishes_rejected_inflight_total".to_owned(), get(&stats.publishes_rejected_inflight)),
            ("publishes_rejected_backpressure_total".to_owned(), get(&stats.publishes_rejected_backpressure)),
            ("publishes_rejected_invalid_channel_total".to_owned(), get(&stats.publishes_rejected_invalid_channel)),
            ("publishes_rejected_storage_total".to_owned(), get(&stats.publishes_rejected_storage)),
            ("publishes_rejected_storage_full_total".to_owned(), get(&stats.publishes_rejected_storage_full)),
            ("publishes_rejected_quota_total".to_owned(), get(&stats.publishes_rejected_quota)),
            ("authentication_failures_total".to_owned(), get(&stats.authentication_failures)),
            ("unauthorized_total".to_owned(), get(&stats.unauthorized)),
            ("tls_handshake_failures_total".to_owned(), get(&stats.tls_handshake_failures)),
            ("protocol_errors_total".to_owned(), get(&stats.protocol_errors)),
            ("idle_timeouts_total".to_owned(), get(&stats.idle_timeouts)),
            ("lag_notices_total".to_owned(), get(&stats.lag_notices)),
            ("skipped_notices_total".to_owned(), get(&stats.skipped_notices)),
            ("inflight_publishes".to_owned(), get(&stats.inflight_publishes)),
            ("inflight_deliveries".to_owned(), inflight_deliveries),
        ];
        let channels = self
            .store
            .channels()
            .iter()
            .map(|channel| {
                let logs = channel.partitions();
                let next_offsets: Vec<u64> = logs.iter().map(|log| log.next_offset()).collect();
                let subscriptions = subscriptions
                    .iter()
                    .filter(|s| &s.channel == channel.name())
                    .map(|s| {
                        let next = s.next_offset.load(Ordering::Relaxed);
                        let ack_floor = s.ack_floor.load(Ordering::Relaxed);
                        let partition_next = next_offsets.get(s.partition as usize).copied().unwrap_or(next);
                        crate::protocol::SubscriptionStats {
                            durable_name: s.durable_name.clone().unwrap_or_default(),
                            partition: s.partition,
                            lag: partition_next.saturating_sub(ack_floor),
                            inflight: next.saturating_sub(ack_floor),
                        }
                    })
                    .collect();
                let counters =
                    logs.iter().map(|log| log.counters()).fold(LogCounters::default(), |total, c| LogCounters {
                        messages_appended: total.messages_appended + c.messages_appended,
                        bytes_appended: total.bytes_appended + c.bytes_appended,
                        ..total
                    });
                crate::protocol::ChannelStats {
                    name: channel.name().to_string(),
                    messages_appended: counters.messages_appended,
                    bytes_appended: counters.bytes_appended,
                    // Summed over partitions: the messages the channel has
                    // ever stored.
                    next_offset: next_offsets.iter().sum(),
                    size_bytes: logs.iter().map(|log| log.stats().size_bytes).sum(),
                    subscriptions,
                }
            })
            .collect();
        (counters, channels)
    }

    /// Snapshots of the live subscriptions.
    pub fn subscription_statuses(&self) -> Vec<Arc<SubscriptionStatus>> {
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The answer to METADATA: where each partition of `channel` (or of
    /// every channel) is led and held, and the nodes' client addresses. A
    /// single node names itself node 0 at `local_addr` (the address the
    /// client reached it at) and leads everything; in cluster mode the
    /// replicated channels come from the metadata group and this node's
    /// own channels are listed as led by it alone.
    pub fn metadata(&self, channel: Option<&ChannelName>, local_addr: &str) -> crate::protocol::Response {
        use crate::protocol::{ChannelMetadata, NodeInfo, PartitionMetadata};
        let own = |node_id: u64, partitions: usize| {
            (0..partitions).map(|_| PartitionMetadata { leader: Some(node_id), replicas: vec![node_id] }).collect()
        };
        let wanted = |name: &str| channel.is_none_or(|wanted| wanted.as_str() == name);
        let (node_id, clustered, mut nodes, mut channels) = match self.replicas() {
            None => (0, false, vec![NodeInfo { node_id: 0, client_addr: local_addr.to_string() }], Vec::new()),
            Some(replicas) => {
                let cluster = replicas.metadata(channel.map(ChannelName::as_str));
                (cluster.node_id, true, cluster.nodes, cluster.channels)
            }
        };
        for local in self.store.channels() {
            let name = local.name().as_str();
            // A replicated channel's copy is listed from the metadata group
            // only (one it no longer lists was deleted).
            if local.settings().replicated == Some(true) {
                continue;
            }
            if wanted(name) && !channels.iter().any(|listed: &ChannelMetadata| listed.name == name) {
                let partitions = own(node_id, local.partitions().len());
                channels.push(ChannelMetadata { name: name.to_string(), replication_factor: 1, partitions });
            }
        }
        channels.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.sort_by_key(|node| node.node_id);
        crate::protocol::Response::Metadata { node_id, clustered, nodes, channels }
    }

    /// Every channel, each partition's range, and every subscription's
    /// position per partition (live ones, and durable ones with nobody
    /// connected).
    pub fn channel_infos(&self) -> Vec<ChannelInfo> {
        let subscriptions = self.subscription_statuses();
        self.store
            .channels()
            .iter()
            .map(|channel| {
                let partitions: Vec<PartitionInfo> = channel
                    .partitions()
                    .iter()
                    .map(|log| {
                        let stats = log.stats();
                        PartitionInfo {
                            start_offset: stats.start_offset,
                            next_offset: stats.next_offset,
                            size_bytes: stats.size_bytes,
                            segment_count: stats.segment_count,
                        }
                    })
                    .collect();
                let next_of = |partition: u32| partitions.get(partition as usize).map_or(0, |p| p.next_offset);
                let mut live: Vec<SubscriptionInfo> = subscriptions
                    .iter()
                    .filter(|s| &s.channel == channel.name())
                    .map(|s| {
                        let ack_floor = s.ack_floor.load(Ordering::Relaxed);
                        SubscriptionInfo {
                            durable_name: s.durable_name.clone().unwrap_or_default(),
                            group: s.group.clone().unwrap_or_default(),
                            partition: s.partition,
                            next_offset: s.next_offset.load(Ordering::Relaxed),
                            acked_offset: ack_floor.checked_sub(1),
                            lag: next_of(s.partition).saturating_sub(ack_floor),
                        }
                    })
                    .collect();
                // Durable subscriptions with nobody connected still have a
                // position, and their lag is what an operator looks for.
                for ((durable_name, partition), resume_at) in self.offsets.for_channel(channel.name().as_str()) {
                    if live.iter().any(|s| s.durable_name == durable_name && s.partition == partition) {
                        continue;
                    }
                    live.push(SubscriptionInfo {
                        durable_name,
                        group: String::new(),
                        partition,
                        next_offset: resume_at,
                        acked_offset: resume_at.checked_sub(1),
                        lag: next_of(partition).saturating_sub(resume_at),
                    });
                }
                ChannelInfo { name: channel.name().to_string(), partitions, subscriptions: live }
            })
            .collect()
    }

    /// The consumer groups of `channel` (or of every channel): live ones
    /// with their members' partitions, and groups with committed positions
    /// and nobody connected.
    pub fn group_infos(&self, channel: Option<&ChannelName>) -> Vec<GroupInfo> {
        let channels: Vec<Arc<Channel>> = match channel {
            Some(name) => self.store.channel(name).into_iter().collect(),
            None => self.store.channels(),
        };
        let mut infos: std::collections::BTreeMap<(String, String), GroupInfo> = Default::default();
        for channel in &channels {
            let logs = channel.partitions();
            let name = channel.name().as_str();
            let live = self.groups.describe(Some(channel.name()));
            let mut group_names: Vec<String> = live.iter().map(|view| view.name.clone()).collect();
            group_names.extend(self.offsets.groups_for_channel(name).into_keys().map(|(group, _)| group));
            group_names.sort();
            group_names.dedup();
            for group in group_names {
                let view = live.iter().find(|view| view.name == group);
                let partitions = logs
                    .iter()
                    .map(|log| {
                        let partition = log.partition();
                        let committed = self.offsets.group_position(name, &group, partition);
                        let from = committed.unwrap_or_else(|| log.start_offset());
                        GroupPartitionInfo {
                            partition,
                            owner: view.and_then(|view| view.owners.get(partition as usize).copied().flatten()),
                            committed,
                            lag: log.next_offset().saturating_sub(from),
                        }
                    })
                    .collect();
                let info = GroupInfo {
                    channel: name.to_owned(),
                    name: group.clone(),
                    generation: view.map_or(0, |view| view.generation),
                    member_count: view.map_or(0, |view| view.members.len() as u32),
                    partitions,
                };
                infos.insert((name.to_owned(), group), info);
            }
        }
        infos.into_values().collect()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Arc<ChannelHandle>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a subscription from the admin view when dropped.
pub(crate) struct SubscriptionGuard {
    broker: Arc<Broker>,
    key: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.broker.subscriptions.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl ChannelError {
    fn describe(&self, name: &ChannelName) -> String {
        match self {
            ChannelError::Unknown => format!("channel {name} does not exist"),
            ChannelError::ShuttingDown => "the broker is shutting down".to_string(),
            ChannelError::Storage(error) => error.to_string(),
        }
    }
}

/// The settings of a replicated channel's local copy.
fn replicated_settings(partitions: u32) -> ChannelSettings {
    ChannelSettings { partitions: Some(partitions), replicated: Some(true), ..ChannelSettings::default() }
}

/// The server's side of hosting replicated partitions (cluster mode): a
/// replicated channel is a local channel whose partitions' logs the Raft
/// groups' state machines append to, and which subscriptions read as any
/// other.
/// The positions of replicated channels as the metadata group holds them,
/// for [`super::offsets::DurableOffsets`].
pub(crate) struct ClusterPositions(pub Arc<crate::cluster::Replicas>);

impl super::offsets::ReplicatedPositions for ClusterPositions {
    fn is_replicated(&self, channel: &str) -> bool {
        self.0.is_replicated(channel)
    }

    fn position(&self, owner: super::offsets::Owner, channel: &str, name: &str, partition: u32) -> Option<u64> {
        self.0.position(channel, name, partition, owner == super::offsets::Owner::Group)
    }

    fn positions(&self, owner: super::offsets::Owner, channel: &str) -> std::collections::BTreeMap<(String, u32), u64> {
        self.0.positions(channel, owner == super::offsets::Owner::Group)
    }
}

pub(crate) struct BrokerHost(pub Arc<Broker>);

impl crate::cluster::PartitionHost for BrokerHost {
    fn open_partition(
        &self,
        channel: &str,
        partitions: u32,
        partition: u32,
    ) -> Result<crate::cluster::HostedPartition, String> {
        let broker = &self.0;
        let name = ChannelName::new(channel).map_err(|error| error.to_string())?;
        match broker.store.channel(&name) {
            // Any partition count: partitions are added to a replicated
            // channel (and the state may lag its copy while a restarted
            // node applies its log again).
            Some(existing) if existing.settings() != replicated_settings(existing.settings().partition_count()) => {
                return Err(format!(
                    "a local channel {name} exists ({:?}) that is not this replicated channel's copy: delete it first",
                    existing.settings()
                ));
            }
            // A partition added to the channel (docs/REPLICATION.md,
            // "Adding partitions to a replicated channel"): the copy grows
            // as a single node's channel does, which rebalances the
            // groups this node coordinates and announces the partition to
            // its subscriptions of every partition.
            Some(existing) if existing.partition_count() <= partition => {
                let count_max = crate::cluster::REPLICATED_PARTITIONS_MAX as u32;
                broker
                    .increase_partitions_up_to(&name, partitions, count_max)
                    .map_err(|error| error.describe(&name))?;
            }
            Some(_) => {}
            None => {
                let settings = replicated_settings(partitions);
                match broker.create_channel(&name, settings) {
                    // Created meanwhile by another partition's start.
                    Ok(()) | Err(StorageError::ChannelExists { .. }) => {}
                    Err(error) => return Err(error.to_string()),
                }
            }
        }
        let handle = broker.channel_creating(&name, false).map_err(|error| error.describe(&name))?;
        let hosted = handle.partition(partition).map_err(|error| error.to_string())?;
        // Records a single node stored (term 0, or no batch header) are not
        // the group's: refused rather than mixed with replicated ones.
        let log = &hosted.log;
        if log.next_offset() > 0 && log.last_raft_entry().is_none_or(|last| last.term == 0) {
            return Err(format!(
                "the local channel {name} holds records of its own (it was not created replicated); delete it first"
            ));
        }
        let writer = Arc::clone(&hosted.writer);
        Ok(crate::cluster::HostedPartition {
            log: Arc::clone(&hosted.log),
            appended: Arc::new(move || writer.publish_tail()),
        })
    }

    fn remove_channel(&self, channel: &str) -> Result<(), String> {
        let name = ChannelName::new(channel).map_err(|error| error.to_string())?;
        // Only a replicated channel's copy: a channel of this node's own
        // that took the name after the deletion is the user's.
        if let Some(existing) = self.0.store.channel(&name)
            && existing.settings().replicated != Some(true)
        {
            tracing::warn!(channel = %name, "a channel of this node's own has a deleted replicated channel's name: left alone");
            return Ok(());
        }
        match self.0.delete_channel(&name, true) {
            Ok(()) | Err(DeleteError::Channel(ChannelError::Unknown)) => Ok(()),
            Err(DeleteError::InUse { subscriptions }) => {
                Err(format!("{subscriptions} live subscriptions on channel {name} (not expected with force)"))
            }
            Err(DeleteError::Channel(error)) => Err(error.describe(&name)),
        }
    }
}
