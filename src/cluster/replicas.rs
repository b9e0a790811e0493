//! The replicated partitions this node hosts: one openraft group per
//! partition it is a replica of, started when the metadata group says so,
//! and the publish path through a group's leader.
//!
//! The node follows the metadata state machine: whenever a replicated
//! channel appears whose placement names this node, it opens the channel's
//! local log (through the server's [`PartitionHost`]) and starts the
//! partition's group; the partition's first replica initialises it. A
//! publish to a hosted partition is proposed to its group on the leader
//! and answered once the entry is committed and applied, with the offsets
//! the state machine gave it; anywhere else it is answered `NotLeader`
//! with the leader's client address when one is known.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::incarnation::{Marker, Verdict};
use super::partition::{self, PartitionRaft};
pub use super::partition::{Publish, PublishApplied, PublishRefused, PublishResult};
use super::transport::{
    GroupId, NodeReply, NodeRequest, PartitionNetwork, PartitionReply, PartitionRequest, PeerClient,
};
use super::types::{
    ChannelCommand, Deletion, LeaderReport, MetadataCommand, MetadataState, NodeAddrs, NodeId, Raft, ReplicatedChannel,
    ReplicatedPosition,
};
use crate::protocol::{ChannelMetadata, NodeInfo, PartitionMetadata};
use crate::storage::{ChannelLog, SegmentCopy, TRANSFER_SEGMENTS_MAX};

/// Most replicated partitions one node hosts (a Raft group each, with its
/// own connections to the other replicas and its own heartbeats).
pub const REPLICATED_PARTITIONS_MAX: usize = 64;

/// A partition group snapshots itself (syncing the partition log first)
/// once it applied this many entries since its last snapshot, and then
/// only when every follower holds all but `PARTITION_RAFT_LOG_KEPT` of them
/// (on the leader; a follower, not knowing the others, waits for
/// `[cluster] raft_log_entries_max`); openraft then purges the Raft log up
/// to `PARTITION_RAFT_LOG_KEPT` entries before the snapshot. So a follower
/// catches up from the Raft log unless it fell `raft_log_entries_max`
/// entries behind; further behind, it is sent a snapshot and copies the
/// leader's segments (segment transfer).
pub const PARTITION_SNAPSHOT_ENTRIES: u64 = 4096;
/// Entries a partition's Raft log keeps before its last snapshot.
pub const PARTITION_RAFT_LOG_KEPT: u64 = 4096;
/// The most bytes of a segment one segment-transfer request carries.
pub const TRANSFER_CHUNK_BYTES: usize = 4 << 20;
/// The most bytes one segment of a copy may announce (a bound on what a
/// peer makes this node write; segments are far smaller).
pub const TRANSFER_SEGMENT_BYTES_MAX: u64 = 16 << 30;
/// How long one segment-transfer request may take.
const TRANSFER_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a leader waits for a follower to install a snapshot, a
/// segment transfer included (openraft's `install_snapshot_timeout`).
pub const SNAPSHOT_INSTALL_TIMEOUT_MS: u64 = 600_000;
/// How long `move-replica` waits for the new replica to catch up (within
/// the CLI's own wait for an answer); it goes on catching up after that,
/// and the move, run again, resumes.
pub const MOVE_CATCH_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);
/// A new replica counts as caught up once it holds the entry that added
/// it and lags the leader by at most this many entries: under load, the
/// new voters then include it nearly up to date.
pub const MOVE_CATCH_UP_LAG_ENTRIES: u64 = 1000;
/// How often a partition group considers a snapshot.
const SNAPSHOT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// What a [`ChannelCommand`] is, for a log line.
fn command_kind(command: &ChannelCommand) -> &'static str {
    match command {
        ChannelCommand::PartitionLeaders { .. } => "leader report",
        ChannelCommand::CommitPositions { .. } => "positions",
        ChannelCommand::PlaceReplicas { .. } => "placement",
    }
}

/// Why a replicated channel's deletion or alteration was not done.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The metadata state lists no such replicated channel.
    #[error("{0}")]
    UnknownChannel(String),
    /// Refused, or not known to be done (the message says which).
    #[error("{0}")]
    Refused(String),
}

/// How many `NotLeader` answers a channel's deletion or alteration
/// follows to the metadata group's leader.
const ADMIN_REDIRECTS_MAX: usize = 3;
/// Beyond the leader's own bounds, how long a node waits for a deletion's
/// or an alteration's answer (the round trip, a loaded machine).
const ADMIN_CALL_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a node looks for partitions it leads whose leadership the
/// metadata group has not recorded yet (after an election), and reports
/// them: how stale another node's METADATA answer can be, besides the
/// report's commit.
const LEADERSHIP_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// How long one proposal to the metadata group (a report, positions) may
/// take.
pub(super) const LEADERSHIP_REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the server gives a replicated partition: its local log, and a call
/// that wakes the partition's readers after the state machine appended.
pub struct HostedPartition {
    pub log: Arc<ChannelLog>,
    pub appended: Arc<dyn Fn() + Send + Sync>,
}

/// The server's side of hosting replicated partitions.
pub trait PartitionHost: Send + Sync + 'static {
    /// Opens the local channel `channel` (creating it with `partitions`
    /// partitions when it does not exist) and returns `partition`'s log.
    ///
    /// # Errors
    /// The channel cannot be opened or created, or exists with other
    /// settings or with records of its own.
    fn open_partition(&self, channel: &str, partitions: u32, partition: u32) -> Result<HostedPartition, String>;

    /// Removes the local channel `channel` if it is a replicated channel's
    /// copy (a deleted one's): its subscriptions end, its files go. Nothing
    /// to remove, or a channel of the node's own by that name (left alone),
    /// is no error.
    ///
    /// # Errors
    /// Its files could not be removed, or the broker is stopping.
    fn remove_channel(&self, channel: &str) -> Result<(), String>;
}

/// Why a publish to a replicated partition was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatedPublishError {
    /// This node does not lead the partition; the leader's client address
    /// when one is known. Nothing was stored.
    #[error("not the leader; leader: {}", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    /// The publish was proposed, then leadership moved or the group stopped
    /// before it was answered: it may or may not be stored (the next leader
    /// may commit it).
    #[error("the outcome is unknown: {0}; the publish may or may not be stored")]
    OutcomeUnknown(String),
    /// Its producer's sequence rules refused it when it was applied
    /// (out of order, or an old sequence that is no retry): nothing stored.
    #[error("{}", .0.message)]
    Refused(PublishRefused),
}

/// Called with the outcome of one publish to a replicated partition.
pub type PublishAnswer = Box<dyn FnOnce(Result<PublishApplied, ReplicatedPublishError>) + Send>;

/// What a proposal's answer is waited on with.
type Outcome = openraft::alias::OneshotReceiverOf<
    super::partition::PartitionTypes,
    Result<
        openraft::raft::ClientWriteResponse<super::partition::PartitionTypes>,
        ClientWriteError<super::partition::PartitionTypes>,
    >,
>;

/// A started partition group.
struct PartitionGroup {
    raft: PartitionRaft,
    /// Its partition log (the state machine's), for segment transfer.
    log: Arc<ChannelLog>,
    /// Held while a snapshot is received (a segment copy with it), so that
    /// one sent again meanwhile waits instead of copying twice.
    transfer: tokio::sync::Mutex<()>,
    /// The received copy, for the state machine's install.
    staged: partition::StagedCopySlot,
    /// Proposals in order, for the answering task.
    answers: mpsc::UnboundedSender<(Outcome, PublishAnswer)>,
    /// Cancelled when the group stops here: a segment copy it is
    /// receiving ends at its next request.
    stopping: CancellationToken,
}

/// Snapshots the group (which lets openraft purge its Raft log) when it is
/// due by [`PARTITION_SNAPSHOT_ENTRIES`] and no follower would need the
/// purged entries, or when the log reached `entries_max` entries
/// (`[cluster] raft_log_entries_max`) whatever its followers hold.
async fn snapshot_when_followers_hold(raft: PartitionRaft, entries_max: u64, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(SNAPSHOT_CHECK_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.state == ServerState::Shutdown {
            return;
        }
        let Some(applied) = metrics.last_applied.map(|log_id| log_id.index) else { continue };
        let since = applied.saturating_sub(metrics.snapshot.map_or(0, |log_id| log_id.index));
        if since < PARTITION_SNAPSHOT_ENTRIES {
            continue;
        }
        let followers_hold = match (&metrics.replication, metrics.state) {
            (Some(replication), ServerState::Leader) => replication
                .values()
                // Half: a margin for what is applied between this look and the
                // snapshot.
                .all(|matched| matched.is_some_and(|log_id| log_id.index + PARTITION_RAFT_LOG_KEPT / 2 >= applied)),
            _ => false,
        };
        if (followers_hold || since >= entries_max) && raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}

/// A rate limiter of `bytes_per_sec` in KiB, whose bucket holds one
/// second of it and at least one segment-transfer request.
fn transfer_limiter(bytes_per_sec: u64) -> Option<governor::DefaultDirectRateLimiter> {
    let per_second = NonZeroU32::new(u32::try_from(bytes_per_sec / 1024).ok()?)?;
    let burst = per_second.max(NonZeroU32::new((TRANSFER_CHUNK_BYTES / 1024) as u32)?);
    Some(governor::RateLimiter::direct(governor::Quota::per_second(per_second).allow_burst(burst)))
}

/// The labels of a partition's segment-transfer metrics.
fn transfer_labels(id: &GroupId) -> Vec<metrics::Label> {
    vec![metrics::Label::new("channel", id.channel.clone()), metrics::Label::new("partition", id.partition.to_string())]
}

/// Counts a segment copy this node received: `installed` (moved into the
/// log with its snapshot), `dropped` (the install did not take it), or
/// `failed` (the copy or its check failed).
fn count_transfer(id: &GroupId, outcome: &'static str) {
    let mut labels = transfer_labels(id);
    labels.push(metrics::Label::new("outcome", outcome));
    metrics::counter!("weir_segment_transfers_total", labels).increment(1);
}

/// Answers the group's proposals in the order they were made.
async fn answer_in_order(mut answers: mpsc::UnboundedReceiver<(Outcome, PublishAnswer)>) {
    while let Some((outcome, answer)) = answers.recv().await {
        answer(match outcome.await {
            Ok(Ok(response)) => response.data.map_err(ReplicatedPublishError::Refused),
            // Refused before it was appended (not leading, or handing the
            // leadership over): nothing is stored.
            Ok(Err(ClientWriteError::ForwardToLeader(forward))) => {
                Err(ReplicatedPublishError::NotLeader { leader: forward.leader_node.map(|node| node.client_addr) })
            }
            // Proposed, then deposed: the entry may be in the log that the
            // next leader commits.
            Ok(Err(ClientWriteError::LogEntryDiscarded(forward))) => {
                Err(ReplicatedPublishError::OutcomeUnknown(format!(
                    "leadership moved before the publish was committed (leader now: {})",
                    forward.leader_node.map_or_else(|| "unknown".to_string(), |node: NodeAddrs| node.client_addr)
                )))
            }
            Ok(Err(error)) => Err(ReplicatedPublishError::OutcomeUnknown(error.to_string())),
            Err(_) => {
                Err(ReplicatedPublishError::OutcomeUnknown("the partition's group stopped before answering".into()))
            }
        });
    }
}

/// The cluster as one node sees it, for METADATA: the wire's own types, so
/// the broker only adds the channels that are not replicated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMetadata {
    pub node_id: NodeId,
    /// Every member's id and client address.
    pub nodes: Vec<NodeInfo>,
    /// The replicated channels, with each partition's leader and replicas.
    pub channels: Vec<ChannelMetadata>,
}

/// The partitions this node hosts.
pub struct Replicas {
    node_id: NodeId,
    data_dir: PathBuf,
    raft_config: Arc<openraft::Config>,
    /// `[cluster] raft_log_entries_max`.
    raft_log_entries_max: u64,
    /// `[cluster] max_segment_transfer_bytes_per_sec`, in KiB, shared by
    /// every copy this node receives.
    transfer_limiter: Option<governor::DefaultDirectRateLimiter>,
    tls: Option<TlsConnector>,
    source_ip: Option<std::net::IpAddr>,
    metadata: Raft,
    groups: RwLock<HashMap<GroupId, Arc<PartitionGroup>>>,
    /// The replicated channels as the metadata group last applied them.
    channels: watch::Receiver<MetadataState>,
    /// Cancelled when the node stops.
    stop: CancellationToken,
    /// Held by a replica move.
    moves: tokio::sync::Mutex<()>,
    /// The incarnation whose files this process hosts, per channel (its
    /// marker, once read or written).
    hosted_incarnations: std::sync::Mutex<HashMap<String, u64>>,
    /// The deletions whose files this process has removed (or found none
    /// of), with the incarnation deleted: not looked at again.
    handled_deletions: std::sync::Mutex<HashMap<String, u64>>,
}

impl Replicas {
    pub(super) fn new(
        data_dir: PathBuf,
        settings: &crate::config::ClusterConfig,
        network: (Option<TlsConnector>, Option<std::net::IpAddr>),
        metadata: Raft,
        channels: watch::Receiver<MetadataState>,
        append_entries_max: u64,
        stop: CancellationToken,
    ) -> Result<Replicas, super::ClusterError> {
        let raft_config = openraft::Config {
            cluster_name: "weir-partition".into(),
            heartbeat_interval: settings.heartbeat_interval_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            max_payload_entries: append_entries_max,
            // Triggered by `snapshot_when_followers_hold`.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: PARTITION_RAFT_LOG_KEPT,
            install_snapshot_timeout: SNAPSHOT_INSTALL_TIMEOUT_MS,
            ..Default::default()
        }
        .validate()
        .map_err(|error| super::ClusterError::Settings(error.to_string()))?;
        let (tls, source_ip) = network;
        Ok(Replicas {
            node_id: settings.node_id,
            data_dir,
            raft_config: Arc::new(raft_config),
            raft_log_entries_max: settings.raft_log_entries_max,
            transfer_limiter: settings.max_segment_transfer_bytes_per_sec.and_then(transfer_limiter),
            tls,
            source_ip,
            metadata,
            groups: RwLock::new(HashMap::new()),
            channels,
            stop,
            moves: tokio::sync::Mutex::new(()),
            hosted_incarnations: std::sync::Mutex::new(HashMap::new()),
            handled_deletions: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn group(&self, id: &GroupId) -> Option<Arc<PartitionGroup>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// The Raft instance of a hosted partition, for the listener.
    pub(super) fn raft(&self, id: &GroupId) -> Option<PartitionRaft> {
        self.group(id).map(|group| group.raft.clone())
    }

    /// The segments a replica of `id` copies from this one (segment
    /// transfer, the source's side).
    pub(super) async fn segments_to_copy(&self, id: &GroupId, up_to: u64) -> Result<Vec<SegmentCopy>, String> {
        let log = self.group(id).map(|group| Arc::clone(&group.log)).ok_or("not hosted here")?;
        tokio::task::spawn_blocking(move || log.segments_to_copy(up_to))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())
    }

    /// Bytes of one of `id`'s segments for a replica copying them (at most
    /// [`TRANSFER_CHUNK_BYTES`]).
    pub(super) async fn read_segment(
        &self,
        id: &GroupId,
        base_offset: u64,
        position: u64,
        len: u32,
    ) -> Result<Vec<u8>, String> {
        let log = self.group(id).map(|group| Arc::clone(&group.log)).ok_or("not hosted here")?;
        let len = (len as usize).min(TRANSFER_CHUNK_BYTES);
        tokio::task::spawn_blocking(move || log.read_segment_bytes(base_offset, position, len))
            .await
            .map_err(|error| error.to_string())?
            .map(|bytes| bytes.to_vec())
            .map_err(|error| error.to_string())
    }

    /// Receives a snapshot for `id` (`install`): when it reaches past this
    /// replica's partition log (a replica added by a move, or one that fell
    /// behind the entries the leader's Raft log still holds), first copies
    /// the snapshot sender's segments up to where the snapshot ends,
    /// checked, for the state machine's install to move in, replacing the
    /// log (segment transfer, the receiver's side).
    pub(super) async fn receive_snapshot(
        &self,
        id: &GroupId,
        vote: &super::partition::PartitionVote,
        meta: &super::partition::PartitionSnapshotMeta,
        promise: &super::partition::SnapshotPromise,
        install: impl Future<Output = NodeReply>,
    ) -> NodeReply {
        let Some(group) = self.group(id) else { return NodeReply::UnknownGroup };
        let _receiving = group.transfer.lock().await;
        let held = group.log.next_offset();
        // openraft refuses a snapshot whose vote is older than the group's
        // own: a deposed leader's is not copied.
        let current_vote = group.raft.metrics().borrow_watched().vote;
        if promise.next_offset > held && *vote >= current_vote {
            use openraft::vote::RaftLeaderId;
            let source = *vote.leader_id().node_id();
            let addr = self
                .metadata
                .metrics()
                .borrow_watched()
                .membership_config
                .membership()
                .get_node(&source)
                .or_else(|| meta.last_membership.membership().get_node(&source))
                .map(|addrs| addrs.cluster_addr.clone());
            let Some(addr) = addr else {
                return NodeReply::Error(format!("the snapshot's sender, node {source}, is not a member"));
            };
            tracing::info!(group = %id, source, held, up_to = promise.next_offset, "copying the partition's segments from the leader (segment transfer)");
            match self.copy_segments(id, &group.log, addr, promise.next_offset, &group.stopping).await {
                Ok(staged) => *group.staged.lock().unwrap_or_else(|p| p.into_inner()) = Some(staged),
                Err(error) => {
                    tracing::warn!(group = %id, %error, "segment transfer failed; the leader sends the snapshot again");
                    count_transfer(id, "failed");
                    return NodeReply::Error(format!("segment transfer from node {source}: {error}"));
                }
            }
        }
        let copied = group.staged.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let reply = install.await;
        // A copy the install did not take (its vote was refused after all)
        // is dropped; its staging directory goes with the next copy or open.
        let left = group.staged.lock().unwrap_or_else(|p| p.into_inner()).take();
        if copied {
            let installed = left.is_none() && matches!(reply, NodeReply::Partition(PartitionReply::Snapshot(_)));
            count_transfer(id, if installed { "installed" } else { "dropped" });
        }
        reply
    }

    async fn copy_segments(
        &self,
        id: &GroupId,
        log: &Arc<ChannelLog>,
        addr: String,
        up_to: u64,
        stopping: &CancellationToken,
    ) -> Result<partition::StagedCopy, String> {
        let incarnation = self.hosted_incarnation(&id.channel).unwrap_or(0);
        let mut client = PeerClient::new(addr, self.tls.clone()).with_source_ip(self.source_ip);
        let mut call = async |request: PartitionRequest| {
            let request = NodeRequest::PartitionOf { group: id.clone(), incarnation, request };
            match client.call(&request, TRANSFER_CALL_TIMEOUT).await.map_err(|error| error.to_string())? {
                NodeReply::Partition(reply) => Ok(reply),
                NodeReply::Error(error) => Err(error),
                other => Err(format!("unexpected answer {other:?}")),
            }
        };
        let copies = match call(PartitionRequest::SegmentsToCopy { up_to }).await? {
            PartitionReply::SegmentsToCopy(copies)
                if copies.len() <= TRANSFER_SEGMENTS_MAX
                    && copies.iter().all(|copy| copy.bytes <= TRANSFER_SEGMENT_BYTES_MAX) =>
            {
                copies
            }
            PartitionReply::SegmentsToCopy(_) => {
                return Err(format!(
                    "more than TRANSFER_SEGMENTS_MAX ({TRANSFER_SEGMENTS_MAX}) segments, or one above TRANSFER_SEGMENT_BYTES_MAX ({TRANSFER_SEGMENT_BYTES_MAX} bytes)"
                ));
            }
            other => return Err(format!("unexpected answer {other:?}")),
        };
        let begin = Arc::clone(log);
        let mut transfer = tokio::task::spawn_blocking(move || begin.begin_transfer())
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())?;
        let mut copied = 0u64;
        for copy in &copies {
            let mut position = 0;
            while position < copy.bytes {
                if stopping.is_cancelled() {
                    return Err("the partition's group stopped on this node".into());
                }
                let len = (copy.bytes - position).min(TRANSFER_CHUNK_BYTES as u64) as u32;
                if let Some(limiter) = &self.transfer_limiter {
                    let kib = NonZeroU32::new(len.div_ceil(1024)).unwrap_or(NonZeroU32::MIN);
                    // The bucket holds at least one request's worth.
                    if limiter.until_n_ready(kib).await.is_err() {
                        return Err("a segment-transfer request larger than the rate limiter's bucket".into());
                    }
                }
                let bytes = match call(PartitionRequest::ReadSegment { base_offset: copy.base_offset, position, len })
                    .await?
                {
                    PartitionReply::SegmentBytes(bytes) if !bytes.is_empty() && bytes.len() <= len as usize => bytes,
                    PartitionReply::SegmentBytes(bytes) => {
                        return Err(format!(
                            "segment {} answered {} bytes at {position} where 1 to {len} were asked for",
                            copy.base_offset,
                            bytes.len()
                        ));
                    }
                    other => return Err(format!("unexpected answer {other:?}")),
                };
                position += bytes.len() as u64;
                copied += bytes.len() as u64;
                metrics::counter!("weir_segment_transfer_bytes_total", transfer_labels(id))
                    .increment(bytes.len() as u64);
                let base_offset = copy.base_offset;
                transfer = tokio::task::spawn_blocking(move || transfer.append(base_offset, &bytes).map(|()| transfer))
                    .await
                    .map_err(|error| error.to_string())?
                    .map_err(|error| error.to_string())?;
            }
        }
        let check = Arc::clone(log);
        let (transfer, end) = tokio::task::spawn_blocking(move || {
            check.check_transfer(&mut transfer, &copies).map(|end| (transfer, end))
        })
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?;
        tracing::info!(group = %id, bytes = copied, next_offset = end.next_offset, "segments copied and checked");
        Ok(partition::StagedCopy { end, transfer })
    }

    /// `weir cluster move-replica`: moves `from`'s replica of a partition to
    /// `to`, on the partition's leader, in steps that each may be done
    /// again (so a move cut short resumes when run again): `to` is added to
    /// the placement (it starts the group, empty), added to the group as a
    /// learner, which catches up (from the Raft log, or by segment
    /// transfer), then the voters change from the old set to the new one
    /// (openraft's joint consensus), then `from` is taken out of the
    /// placement (it stops the group; its files stay).
    pub(super) async fn move_replica(&self, channel: &str, partition: u32, from: NodeId, to: NodeId) -> NodeReply {
        // One move at a time on this node: each reads the placement it
        // changes (the metadata group also refuses a step made from an
        // older view).
        let _moving = self.moves.lock().await;
        let id = GroupId { channel: channel.to_string(), partition };
        let Some(placed) = self.placed(&id) else {
            return NodeReply::Error(format!("{id} is not a partition of a replicated channel"));
        };
        let Some(group) = self.group(&id) else {
            return NodeReply::NotLeader { leader: self.partition_leader_addrs(&id, None) };
        };
        let metrics = group.raft.metrics().borrow_watched().clone();
        if metrics.state != ServerState::Leader {
            return NodeReply::NotLeader { leader: self.partition_leader_addrs(&id, metrics.current_leader) };
        }
        // The newest configuration: a change cut short by a change of leader
        // leaves the group in a joint one (old and new voters), which only
        // another change ends.
        let configs = metrics.membership_config.membership().get_joint_config().clone();
        let joint = configs.len() > 1;
        let voters: BTreeSet<NodeId> = configs.last().cloned().unwrap_or_default();
        let target: BTreeSet<NodeId> = voters.iter().copied().filter(|&voter| voter != from).chain([to]).collect();
        let voters_moved = from != to && !voters.contains(&from) && voters.contains(&to);
        if from == to || (!voters_moved && !voters.contains(&from)) {
            return NodeReply::Error(format!("node {from} is not a voter of {id} (voters: {voters:?})"));
        }
        if !voters_moved && voters.contains(&to) {
            return NodeReply::Error(format!("node {to} holds a replica of {id} already"));
        }
        let Some(to_addrs) =
            self.metadata.metrics().borrow_watched().membership_config.membership().get_node(&to).cloned()
        else {
            return NodeReply::Error(format!("node {to} is not a member of the cluster (weir cluster add-node)"));
        };
        if !placed.contains(&to) && Replicas::placed_on(&self.channels.borrow(), to) >= REPLICATED_PARTITIONS_MAX {
            return NodeReply::Error(format!(
                "node {to} hosts REPLICATED_PARTITIONS_MAX ({REPLICATED_PARTITIONS_MAX}) replicated partitions already"
            ));
        }
        tracing::info!(group = %id, from, to, "moving a replica");
        // 1. `to` in the placement: it starts the group (empty, not
        // initialising it: it is not the first replica).
        if !placed.contains(&to) {
            let replicas: Vec<NodeId> = placed.iter().copied().chain([to]).collect();
            if let Err(error) = self.place(&id, placed.clone(), replicas).await {
                return NodeReply::Error(format!("adding node {to} to the placement: {error}"));
            }
        }
        // 2. A learner, caught up.
        if !voters_moved {
            let added = match metrics.membership_config.membership().get_node(&to) {
                Some(_) => metrics.membership_config.log_id().map_or(0, |log_id| log_id.index),
                None => match group.raft.add_learner(to, to_addrs, false).await {
                    Ok(response) => response.log_id.index,
                    Err(error) => return NodeReply::Error(format!("adding node {to} as a learner: {error}")),
                },
            };
            let caught_up = group
                .raft
                .wait(Some(MOVE_CATCH_UP_TIMEOUT))
                .metrics(
                    |metrics| {
                        let matched = metrics.replication.as_ref().and_then(|replication| replication.get(&to));
                        let last = metrics.last_log_index.unwrap_or(0);
                        metrics.state != ServerState::Leader
                            || matched.is_some_and(|matched| {
                                matched.is_some_and(|log_id| {
                                    log_id.index >= added && log_id.index + MOVE_CATCH_UP_LAG_ENTRIES >= last
                                })
                            })
                    },
                    "the new replica caught up, or this node no longer leads",
                )
                .await;
            if group.raft.metrics().borrow_watched().state != ServerState::Leader {
                return NodeReply::Error(format!(
                    "leadership of {id} moved while node {to} was catching up: run the move again to resume it"
                ));
            }
            if caught_up.is_err() {
                return NodeReply::Error(format!(
                    "node {to} did not catch up within {MOVE_CATCH_UP_TIMEOUT:?}; it goes on catching up as a learner: run the move again to finish it"
                ));
            }
        }
        // 3. The voters: the old set and the new one through joint consensus
        // (or the end of a joint configuration a cut-short move left).
        if !voters_moved || joint {
            tracing::info!(group = %id, from, to, ?target, "changing the partition's voters");
            let change = group.raft.change_membership(ChangeMembers::ReplaceAllVoters(target.clone()), false);
            match tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, change).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return NodeReply::Error(format!("changing the voters of {id}: {error}")),
                Err(_) => {
                    return NodeReply::Error(format!(
                        "the voters of {id} did not change within {LEADERSHIP_REPORT_TIMEOUT:?}: run the move again to finish it"
                    ));
                }
            }
        }
        // 4. `from` out of the placement: it stops the group.
        let placed = self.placed(&id).unwrap_or_default();
        let replicas: Vec<NodeId> =
            placed.iter().copied().filter(|&node| node != from).chain([to]).fold(Vec::new(), |mut replicas, node| {
                if !replicas.contains(&node) {
                    replicas.push(node);
                }
                replicas
            });
        if replicas != placed
            && let Err(error) = self.place(&id, placed.clone(), replicas).await
        {
            return NodeReply::Error(format!(
                "the voters of {id} changed, but taking node {from} out of the placement failed ({error}): run the move again to finish it"
            ));
        }
        tracing::info!(group = %id, from, to, "replica moved");
        NodeReply::MembershipChanged { voters: target.into_iter().collect() }
    }

    /// Commits a partition's new replicas to the metadata group, and waits
    /// until this node applied it.
    async fn place(&self, id: &GroupId, expected: Vec<NodeId>, replicas: Vec<NodeId>) -> Result<(), String> {
        let command = ChannelCommand::PlaceReplicas {
            channel: id.channel.clone(),
            partition: id.partition,
            expected: expected.clone(),
            replicas: replicas.clone(),
        };
        self.propose(self.of_incarnations([id.channel.as_str()], command)).await?;
        let placed = |state: &MetadataState| {
            state.channels.get(&id.channel).and_then(|channel| channel.replicas.get(id.partition as usize)).cloned()
        };
        let mut channels = self.channels.clone();
        let applied = channels.wait_for(|state| placed(state).is_none_or(|now| now != expected));
        match tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, applied).await {
            Ok(Ok(state)) if placed(&state).as_ref() == Some(&replicas) => Ok(()),
            Ok(Ok(state)) => Err(format!(
                "the placement changed meanwhile (another move?): now {:?}",
                placed(&state).unwrap_or_default()
            )),
            _ => Err("committed, but not applied on this node in time".into()),
        }
    }

    /// The replicas the metadata group places `id` on, as this node last
    /// applied it.
    fn placed(&self, id: &GroupId) -> Option<Vec<NodeId>> {
        self.channels
            .borrow()
            .channels
            .get(&id.channel)
            .and_then(|channel| channel.replicas.get(id.partition as usize).cloned())
    }

    /// A partition's leader and its addresses, for `NotLeader`: the one this
    /// node's group knows, else the one reported to the metadata group.
    fn partition_leader_addrs(&self, id: &GroupId, known: Option<NodeId>) -> Option<(NodeId, NodeAddrs)> {
        let leader =
            known.or_else(|| self.channels.borrow().reported_leader(&id.channel, id.partition).map(|l| l.node))?;
        let addrs =
            self.metadata.metrics().borrow_watched().membership_config.membership().get_node(&leader).cloned()?;
        Some((leader, addrs))
    }

    /// Whether `channel` is a replicated channel (whether or not this node
    /// hosts any of its partitions).
    pub fn is_replicated(&self, channel: &str) -> bool {
        self.channels.borrow().channels.contains_key(channel)
    }

    /// A node's client address, from the metadata group's membership.
    fn client_addr(&self, node: NodeId) -> Option<String> {
        let metrics = self.metadata.metrics().borrow_watched().clone();
        metrics.membership_config.membership().get_node(&node).map(|addrs| addrs.client_addr.clone())
    }

    /// Proposes `publish` to the partition's group, in the order of the
    /// calls, and calls `answer` once it is committed and applied (with its
    /// offsets) or refused. Answers come in the order of the proposals, one
    /// partition at a time, from the group's answering task; until then
    /// each waits there (their number is bounded by the connections'
    /// publish windows, whose slots the answers hold).
    pub async fn submit(&self, id: &GroupId, publish: Publish, answer: PublishAnswer) {
        let Some(group) = self.group(id) else {
            return answer(Err(ReplicatedPublishError::NotLeader { leader: self.leader_elsewhere(id) }));
        };
        // Read in place: every publish looks, and the metrics are large.
        let (state, current_leader) = {
            let metrics = group.raft.metrics();
            let metrics = metrics.borrow_watched();
            (metrics.state, metrics.current_leader)
        };
        if state != ServerState::Leader {
            // A group that names this node while it does not lead knows of no
            // leader (it stepped down, or moved its replica away and hears
            // from no one): the metadata group's report then, never itself,
            // or a client would be sent back here at once, again and again.
            let leader = match current_leader.filter(|&leader| leader != self.node_id) {
                Some(leader) => self.client_addr(leader),
                None => self.reported_leader_elsewhere(id),
            };
            return answer(Err(ReplicatedPublishError::NotLeader { leader }));
        }
        let (responder, outcome) = ProgressResponder::complete_only();
        if let Err(error) = group.raft.client_write_ff(publish, Some(responder)).await {
            return answer(Err(ReplicatedPublishError::OutcomeUnknown(error.to_string())));
        }
        if let Err(unsent) = group.answers.send((outcome, answer)) {
            let (_, answer) = unsent.0;
            answer(Err(ReplicatedPublishError::OutcomeUnknown("the partition's group is stopping".into())));
        }
    }

    /// Whether this node runs the group of `partition` of `channel`.
    pub fn hosts(&self, channel: &str, partition: u32) -> bool {
        self.group(&GroupId { channel: channel.to_string(), partition }).is_some()
    }

    /// Replicated partitions placed on `node` by the metadata group.
    pub(super) fn placed_on(state: &MetadataState, node: NodeId) -> usize {
        state
            .channels
            .values()
            .flat_map(|channel| &channel.replicas)
            .filter(|replicas| replicas.contains(&node))
            .count()
    }

    /// The replicated channels as this node last applied them.
    pub(super) fn channels(&self) -> MetadataState {
        self.channels.borrow().clone()
    }

    /// The partition count of a replicated channel.
    pub fn partition_count(&self, channel: &str) -> Option<u32> {
        self.channels.borrow().channels.get(channel).map(|channel| channel.replicas.len() as u32)
    }

    /// The node that coordinates consumer group `group` of replicated
    /// channel `channel` (docs/REPLICATION.md, "Consumer groups across
    /// nodes"): the leader last reported for partition `murmur2(group) mod
    /// P`, if it holds a replica of every partition, else the first replica
    /// of that partition that does.
    ///
    /// # Errors
    /// No such channel, or no node holds a replica of every partition.
    pub(super) fn coordinator_of(state: &MetadataState, channel: &str, group: &str) -> Result<NodeId, String> {
        let placed = state.channels.get(channel).ok_or_else(|| format!("{channel} is not a replicated channel"))?;
        let holds_every = |node: &NodeId| placed.replicas.iter().all(|replicas| replicas.contains(node));
        let partitions = placed.replicas.len() as u32;
        if partitions == 0 {
            return Err(format!("channel {channel} has no partition"));
        }
        let partition = crate::partitioner::partition_for_key(group.as_bytes(), partitions);
        let reported = state.reported_leader(channel, partition).map(|leader| leader.node).filter(holds_every);
        let first = placed.replicas[partition as usize].iter().copied().find(holds_every);
        reported.or(first).ok_or_else(|| {
            format!(
                "no node holds a replica of every partition of channel {channel}, so no node can serve a consumer group of it (reading partitions from other nodes is not built)"
            )
        })
    }

    /// For a member of consumer group `group` of replicated channel
    /// `channel`: `None` when this node coordinates the group, else
    /// `NotLeader` naming the coordinator's client address.
    ///
    /// # Errors
    /// No node can coordinate the group.
    pub fn group_coordinator_elsewhere(
        &self,
        channel: &str,
        group: &str,
    ) -> Result<Option<ReplicatedPublishError>, String> {
        let coordinator = Replicas::coordinator_of(&self.channels.borrow(), channel, group)?;
        Ok((coordinator != self.node_id)
            .then(|| ReplicatedPublishError::NotLeader { leader: self.client_addr(coordinator) }))
    }

    /// `NotLeader` naming this node: the answer of a group's coordinator
    /// whose partitions' groups are still starting (come back later).
    pub fn this_node_elsewhere(&self) -> ReplicatedPublishError {
        ReplicatedPublishError::NotLeader { leader: self.client_addr(self.node_id) }
    }

    /// Resolves once this node no longer coordinates group `group` of
    /// `channel` (by the metadata it applied): `Ok` with the `NotLeader`
    /// message naming the new coordinator, `Err` with why no node can
    /// coordinate it now. Never while this node coordinates it, nor once
    /// the node stops.
    pub fn coordinator_moved(
        self: &Arc<Self>,
        channel: String,
        group: String,
    ) -> impl Future<Output = Result<String, String>> + Send + 'static {
        let replicas = Arc::clone(self);
        let mut changes = self.channels.clone();
        async move {
            loop {
                // Checked before each wait: a change applied since the
                // member joined counts too.
                match replicas.group_coordinator_elsewhere(&channel, &group) {
                    Ok(None) => {}
                    Ok(Some(elsewhere)) => return Ok(elsewhere.to_string()),
                    Err(message) => return Err(message),
                }
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Whether the metadata state places a replica of `partition` of
    /// `channel` on this node.
    pub fn placed_here(&self, channel: &str, partition: u32) -> bool {
        let state = self.channels.borrow();
        let placed = state.channels.get(channel).and_then(|channel| channel.replicas.get(partition as usize));
        placed.is_some_and(|replicas| replicas.contains(&self.node_id))
    }

    /// For a subscription of every partition of `channel` at this node:
    /// resolves once the metadata state lists a partition of the channel
    /// with no replica on this node (added later, or moved away): `Ok`
    /// with the `NotLeader` message naming a node that holds a replica of
    /// every partition, `Err` with why none does. Never while every
    /// partition has one here, nor once the node stops.
    pub fn placed_elsewhere(
        self: &Arc<Self>,
        channel: String,
    ) -> impl Future<Output = Result<String, String>> + Send + 'static {
        let this = Arc::clone(self);
        let mut changes = self.channels.clone();
        async move {
            loop {
                // Checked before each wait: a change applied since the
                // subscription started counts too.
                let holders = {
                    let state = changes.borrow_and_update();
                    state.channels.get(&channel).map(Self::holding_every_partition)
                };
                if let Some(holders) = holders
                    && !holders.contains(&this.node_id)
                {
                    return match holders.first() {
                        Some(&holder) => {
                            let leader = this.client_addr(holder);
                            Ok(ReplicatedPublishError::NotLeader { leader }.to_string())
                        }
                        None => Err(format!(
                            "no node holds a replica of every partition of channel {channel} any more: subscribe to each partition where it is led"
                        )),
                    };
                }
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// The nodes that hold a replica of every partition of `channel`.
    pub(super) fn holding_every_partition(channel: &ReplicatedChannel) -> Vec<NodeId> {
        let Some(first) = channel.replicas.first() else { return Vec::new() };
        first.iter().copied().filter(|node| channel.replicas.iter().all(|replicas| replicas.contains(node))).collect()
    }

    /// Whether some node holds a replica of every partition of `channel`.
    pub fn any_holds_every_partition(&self, channel: &str) -> bool {
        let state = self.channels.borrow();
        state.channels.get(channel).is_some_and(|channel| !Self::holding_every_partition(channel).is_empty())
    }

    /// For a read of every partition of `channel`: `NotLeader` naming
    /// another node that holds a replica of every partition, if one does.
    pub fn holding_every_partition_elsewhere(&self, channel: &str) -> Option<ReplicatedPublishError> {
        let holders = self.channels.borrow().channels.get(channel).map(Self::holding_every_partition)?;
        let holder = holders.into_iter().find(|node| *node != self.node_id)?;
        Some(ReplicatedPublishError::NotLeader { leader: self.client_addr(holder) })
    }

    /// Where to read a partition of a replicated channel this node hosts no
    /// replica of: `NotLeader` naming the partition's first replica.
    pub fn hosting_elsewhere(&self, channel: &str, partition: u32) -> ReplicatedPublishError {
        ReplicatedPublishError::NotLeader {
            leader: self.leader_elsewhere(&GroupId { channel: channel.to_string(), partition }),
        }
    }

    /// For a partition this node does not host: the client address of its
    /// leader as last reported to the metadata group, else of its
    /// preferred leader (the node most likely to lead it).
    fn leader_elsewhere(&self, id: &GroupId) -> Option<String> {
        let leader = {
            let state = self.channels.borrow();
            let preferred = state.channels.get(&id.channel)?.replicas.get(id.partition as usize)?.first().copied()?;
            state.reported_leader(&id.channel, id.partition).map_or(preferred, |reported| reported.node)
        };
        self.client_addr(leader)
    }

    /// The client address of the leader last reported to the metadata
    /// group for `id`, unless that is this node.
    fn reported_leader_elsewhere(&self, id: &GroupId) -> Option<String> {
        let reported = self.channels.borrow().reported_leader(&id.channel, id.partition)?.node;
        (reported != self.node_id).then(|| self.client_addr(reported)).flatten()
    }

    /// The groups this node runs now.
    fn hosted_groups(&self) -> Vec<(GroupId, Arc<PartitionGroup>)> {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        groups.iter().map(|(id, group)| (id.clone(), Arc::clone(group))).collect()
    }

    /// Each hosted partition's group as this node sees it, for `weir
    /// cluster status`.
    pub fn statuses(&self) -> Vec<super::status::PartitionStatus> {
        let groups = self.hosted_groups();
        let mut statuses: Vec<_> = groups
            .into_iter()
            .map(|(id, group)| {
                super::status::PartitionStatus::from_metrics(&id, &group.raft.metrics().borrow_watched())
            })
            .collect();
        statuses.sort_by(|a, b| (&a.channel, a.partition).cmp(&(&b.channel, b.partition)));
        statuses
    }

    /// Where every partition of the replicated channels is: its leader
    /// (this node's own view for a partition it hosts, otherwise the
    /// leader last reported to the metadata group) and its replicas; and
    /// every node's id and client address. `channel` limits it to one.
    pub fn metadata(&self, channel: Option<&str>) -> ClusterMetadata {
        let state = self.channels.borrow();
        let members = self.metadata.metrics().borrow_watched().membership_config.clone();
        let nodes = members
            .membership()
            .nodes()
            .map(|(id, addrs)| NodeInfo { node_id: *id, client_addr: addrs.client_addr.clone() })
            .collect();
        let channels = state
            .channels
            .iter()
            .filter(|(name, _)| channel.is_none_or(|wanted| wanted == name.as_str()))
            .map(|(name, placed)| {
                let partitions = placed
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(partition, replicas)| {
                        let id = GroupId { channel: name.clone(), partition: partition as u32 };
                        let hosted = self.group(&id).map(|group| {
                            let metrics = group.raft.metrics();
                            let metrics = metrics.borrow_watched();
                            (metrics.current_leader, metrics.current_term)
                        });
                        let reported = state.reported_leader(name, partition as u32);
                        // The later term's view: a hosted group knows its own
                        // elections first (no leader, while one is held).
                        let leader = match (hosted, reported) {
                            (Some((_, term)), Some(other)) if term < other.term => Some(other.node),
                            (Some((own, _)), _) => own,
                            (None, other) => other.map(|led| led.node),
                        };
                        PartitionMetadata { leader, replicas: replicas.clone() }
                    })
                    .collect();
                ChannelMetadata { name: name.clone(), replication_factor: placed.replication_factor, partitions }
            })
            .collect();
        ClusterMetadata { node_id: self.node_id, nodes, channels }
    }

    /// Reports every partition this node leads whose leadership the
    /// metadata group has not recorded, every
    /// [`LEADERSHIP_REPORT_INTERVAL`], until `stop`.
    pub(super) async fn report_leadership(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(LEADERSHIP_REPORT_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let led: Vec<LeaderReport> = {
                let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
                let state = self.channels.borrow();
                groups
                    .iter()
                    .filter_map(|(id, group)| {
                        let metrics = group.raft.metrics();
                        let metrics = metrics.borrow_watched();
                        let term = metrics.current_term;
                        let recorded = state.reported_leader(&id.channel, id.partition);
                        (metrics.state == ServerState::Leader && recorded.is_none_or(|recorded| recorded.term < term))
                            .then(|| LeaderReport {
                                channel: id.channel.clone(),
                                partition: id.partition,
                                leader: self.node_id,
                                term,
                            })
                    })
                    .collect()
            };
            // One proposal for all (a node hosts at most
            // REPLICATED_PARTITIONS_MAX groups).
            let channels: Vec<String> = led.iter().map(|report| report.channel.clone()).collect();
            let command = self.of_incarnations(
                channels.iter().map(String::as_str),
                ChannelCommand::PartitionLeaders { reports: led },
            );
            if !channels.is_empty()
                && let Err(error) = self.propose(command).await
            {
                tracing::debug!(%error, "partition leadership not recorded yet; reporting again");
            }
        }
    }

    /// Records subscribers' positions in replicated partitions in the
    /// metadata group (at most [`super::types::POSITIONS_PER_COMMAND_MAX`]), so that they
    /// resume there on any node.
    ///
    /// # Errors
    /// The metadata group could not be reached or did not commit it.
    pub async fn commit_positions(&self, positions: Vec<ReplicatedPosition>) -> Result<(), String> {
        let channels: Vec<String> = positions.iter().map(|position| position.channel.clone()).collect();
        let command =
            self.of_incarnations(channels.iter().map(String::as_str), ChannelCommand::CommitPositions { positions });
        self.propose(command).await
    }

    /// `command` about `channels`, for the incarnations of them whose
    /// files this node hosts: applied only to those incarnations (a
    /// channel it does not host is left out, so its part is dropped).
    fn of_incarnations<'a>(
        &self,
        channels: impl IntoIterator<Item = &'a str>,
        command: ChannelCommand,
    ) -> MetadataCommand {
        let hosted = self.hosted_incarnations.lock().unwrap_or_else(|p| p.into_inner());
        let mut incarnations = BTreeMap::new();
        for channel in channels {
            match hosted.get(channel) {
                Some(&incarnation) => {
                    incarnations.insert(channel.to_string(), incarnation);
                }
                None => {
                    tracing::warn!(
                        channel,
                        kind = command_kind(&command),
                        "not hosting this replicated channel's files: its part of a proposal is dropped"
                    );
                }
            }
        }
        MetadataCommand::OfIncarnations { incarnations, command }
    }

    /// Where a durable subscription (`group` false) or a consumer group of
    /// a replicated channel resumes in `partition`, as the metadata group
    /// holds it.
    pub fn position(&self, channel: &str, name: &str, partition: u32, group: bool) -> Option<u64> {
        let key = (channel.to_string(), name.to_string(), partition, group);
        self.channels.borrow().positions.get(&key).copied()
    }

    /// Every durable (`group` false) or group position of `channel` the
    /// metadata group holds, by name and partition.
    pub fn positions(&self, channel: &str, group: bool) -> BTreeMap<(String, u32), u64> {
        self.channels
            .borrow()
            .positions
            .iter()
            .filter(|((c, _, _, g), _)| c == channel && *g == group)
            .map(|((_, name, partition, _), &offset)| ((name.clone(), *partition), offset))
            .collect()
    }

    /// Deletes the replicated channel `name` (DELETE_CHANNEL with `force`),
    /// through the metadata group's leader (see `ask_admin`). Returns once
    /// the deletion is committed; each node removes its files as it
    /// applies it.
    ///
    /// # Errors
    /// The channel is not replicated, or no leader committed the deletion
    /// (it may or may not have been, after a timeout).
    pub async fn delete_channel(&self, name: &str) -> Result<(), AdminError> {
        let request = || NodeRequest::DeleteChannel { name: name.to_string() };
        match self.ask_admin(request, "the channel may or may not have been deleted; list the channels").await? {
            NodeReply::ChannelDeleted => Ok(()),
            other => Err(AdminError::Refused(format!("unexpected reply {other:?}"))),
        }
    }

    /// Grows the replicated channel `name` to `partitions` (ALTER_CHANNEL),
    /// through the metadata group's leader (see `ask_admin`). Returns
    /// once the new partitions are committed; each node starts its new
    /// groups as it applies them.
    ///
    /// # Errors
    /// The channel is not replicated, the count is refused, or no leader
    /// committed it (it may or may not have been, after a timeout).
    pub async fn alter_channel(&self, name: &str, partitions: u32) -> Result<(), AdminError> {
        let request = || NodeRequest::AlterChannel { name: name.to_string(), partitions };
        match self.ask_admin(request, "the partitions may or may not have been added; ask METADATA").await? {
            NodeReply::ChannelAltered { .. } => Ok(()),
            other => Err(AdminError::Refused(format!("unexpected reply {other:?}"))),
        }
    }

    /// Asks the metadata group's leader, which checks and proposes an
    /// admin request (this node's own cluster listener when it leads),
    /// following `NotLeader` a few times while leadership moves. `unsure`
    /// says what a lost answer leaves undecided.
    async fn ask_admin(&self, request: impl Fn() -> NodeRequest, unsure: &str) -> Result<NodeReply, AdminError> {
        let mut leader = None;
        for _ in 0..ADMIN_REDIRECTS_MAX {
            let addr = match leader.take() {
                Some(addr) => addr,
                None => Self::metadata_leader_addr(&self.metadata.metrics().borrow_watched())
                    .map_err(AdminError::Refused)?,
            };
            let mut client = PeerClient::new(addr, self.tls.clone()).with_source_ip(self.source_ip);
            // The leader waits for the admin lock, then for the commit,
            // each at most LEADERSHIP_REPORT_TIMEOUT.
            match client.call(&request(), 2 * LEADERSHIP_REPORT_TIMEOUT + ADMIN_CALL_MARGIN).await {
                Ok(NodeReply::NotLeader { leader: Some((_, addrs)) }) => leader = Some(addrs.cluster_addr),
                Ok(NodeReply::NotLeader { leader: None }) => {
                    return Err(AdminError::Refused("the metadata group has no leader; try again".into()));
                }
                Ok(NodeReply::Error(message)) => return Err(AdminError::Refused(message)),
                Ok(NodeReply::UnknownChannel(message)) => return Err(AdminError::UnknownChannel(message)),
                Ok(reply) => return Ok(reply),
                Err(error) => return Err(AdminError::Refused(format!("{error}: {unsure}"))),
            }
        }
        Err(AdminError::Refused("the metadata group's leadership kept moving; try again".into()))
    }

    /// The cluster address of the metadata group's leader, as `metrics`
    /// name it.
    fn metadata_leader_addr(metrics: &openraft::RaftMetrics<super::types::TypeConfig>) -> Result<String, String> {
        let leader = metrics.current_leader.ok_or("the metadata group has no leader; try again")?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|addrs| addrs.cluster_addr.clone())
            .ok_or_else(|| "the metadata leader is not a member".to_string())
    }

    /// Proposes `command` to the metadata group: on this node when it
    /// leads it, else through its leader.
    async fn propose(&self, command: MetadataCommand) -> Result<(), String> {
        let metrics = self.metadata.metrics().borrow_watched().clone();
        if metrics.state == ServerState::Leader {
            return tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, self.metadata.client_write(command))
                .await
                .map_err(|_| "timed out".to_string())?
                .map(|_| ())
                .map_err(|error| error.to_string());
        }
        let addr = Self::metadata_leader_addr(&metrics)?;
        let request = NodeRequest::Propose { command };
        let mut client = PeerClient::new(addr, self.tls.clone()).with_source_ip(self.source_ip);
        match client.call(&request, LEADERSHIP_REPORT_TIMEOUT).await.map_err(|error| error.to_string())? {
            NodeReply::Recorded => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }

    /// Starts the groups of every replicated partition placed on this node,
    /// now and whenever the metadata group creates more, and removes the
    /// files of deleted channels, until `stop`.
    pub(super) async fn follow(self: Arc<Self>, host: Arc<dyn PartitionHost>) {
        let stop = self.stop.clone();
        let mut channels = self.channels.clone();
        loop {
            // The placements, incarnations and deletions only: positions
            // and leaders change often and are not needed here.
            let (placed, incarnations, deleted) = {
                let state = channels.borrow_and_update();
                (state.channels.clone(), state.incarnations.clone(), state.deleted.clone())
            };
            let waiting = self.reconcile_files(&placed, &incarnations, &deleted, &host).await;
            self.start_placed(&placed, &incarnations, &waiting, &host).await;
            tokio::select! {
                () = stop.cancelled() => return,
                changed = channels.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Removes this node's files of deleted incarnations of replicated
    /// channels (stopping their groups first), by the marker each channel's
    /// files carry against the state (`super::incarnation::verdict`).
    /// Returns the channels whose files are a later incarnation's than the
    /// state has reached, or whose marker cannot be read: not hosted yet.
    async fn reconcile_files(
        &self,
        placed: &BTreeMap<String, ReplicatedChannel>,
        incarnations: &BTreeMap<String, u64>,
        deleted: &BTreeMap<String, Deletion>,
        host: &Arc<dyn PartitionHost>,
    ) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.hosted_groups().into_iter().map(|(id, _)| id.channel).collect();
        names.extend(
            placed
                .iter()
                .filter(|(_, channel)| channel.replicas.iter().any(|replicas| replicas.contains(&self.node_id)))
                .map(|(name, _)| name.clone()),
        );
        {
            let mut handled = self.handled_deletions.lock().unwrap_or_else(|p| p.into_inner());
            handled.retain(|name, _| deleted.contains_key(name));
            names.extend(
                deleted
                    .iter()
                    .filter(|(name, deletion)| handled.get(*name) != Some(&deletion.at))
                    .map(|(name, _)| name.clone()),
            );
        }
        let mut waiting = BTreeSet::new();
        for name in names {
            let marker = match self.marker_of(&name) {
                Ok(marker) => marker,
                Err(error) => {
                    tracing::error!(channel = %name, %error, "cannot read a replicated channel's incarnation marker; not hosting it");
                    waiting.insert(name);
                    continue;
                }
            };
            let incarnation = placed.contains_key(&name).then(|| incarnations.get(&name).copied().unwrap_or(0));
            let deletion = deleted.get(&name).copied();
            let verdict = super::incarnation::verdict(marker, incarnation, deletion.map(|d| d.incarnation));
            match verdict {
                Verdict::Host | Verdict::Leave => {}
                Verdict::Wait => {
                    tracing::debug!(channel = %name, ?marker, ?incarnation, ?deletion, "this node's files of the channel are a later incarnation's than the metadata applied so far, or being removed; waiting");
                    waiting.insert(name);
                    continue;
                }
                Verdict::Remove | Verdict::RemoveThenHost => {
                    if let Err(error) = self.remove_replica_files(&name, marker, host).await {
                        tracing::error!(channel = %name, %error, "cannot remove a deleted replicated channel's files; trying again at the next change");
                        waiting.insert(name);
                        continue;
                    }
                    if marker.is_some() {
                        tracing::info!(channel = %name, ?marker, ?incarnation, ?deletion, "removed this node's files of a deleted incarnation of the channel");
                    }
                }
            }
            // Looked at again only when the name is deleted again (or is
            // hosted or placed here).
            if let Some(deletion) = deletion {
                self.handled_deletions.lock().unwrap_or_else(|p| p.into_inner()).insert(name, deletion.at);
            }
        }
        waiting
    }

    /// The incarnation of `channel` whose files this process hosts.
    fn hosted_incarnation(&self, channel: &str) -> Option<u64> {
        self.hosted_incarnations.lock().unwrap_or_else(|p| p.into_inner()).get(channel).copied()
    }

    /// Whether a partition message from the group of `incarnation` of
    /// `channel` is for this node's group: the incarnation it hosts; or,
    /// either being unknown (0), a name never deleted as far as this node
    /// knows, and an incarnation this node has applied the creation of
    /// (one above its last applied metadata entry is a creation it has not
    /// seen, after a deletion it has not seen either).
    pub(super) fn hosts_incarnation(&self, channel: &str, incarnation: u64) -> bool {
        let Some(hosted) = self.hosted_incarnation(channel) else { return false };
        if hosted == incarnation {
            return true;
        }
        let applied = self.metadata.metrics().borrow_watched().last_applied.map_or(0, |log_id| log_id.index);
        (hosted == 0 || incarnation == 0)
            && incarnation <= applied
            && !self.channels.borrow().deleted.contains_key(channel)
    }

    /// The incarnation marker of this node's files of `channel`: the one
    /// this process hosts, or the one on disk.
    fn marker_of(&self, channel: &str) -> std::io::Result<Option<Marker>> {
        if let Some(&hosted) = self.hosted_incarnations.lock().unwrap_or_else(|p| p.into_inner()).get(channel) {
            return Ok(Some(Marker::of(hosted)));
        }
        super::incarnation::read_marker(&super::incarnation::channel_dir(&self.data_dir, channel))
    }

    /// Stops the groups of `channel` on this node, then removes its local
    /// copy (ending its subscriptions) and its Raft stores, the marker
    /// last.
    async fn remove_replica_files(
        &self,
        channel: &str,
        marker: Option<Marker>,
        host: &Arc<dyn PartitionHost>,
    ) -> Result<(), String> {
        let stopped: Vec<(GroupId, Arc<PartitionGroup>)> = {
            let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<GroupId> = groups.keys().filter(|id| id.channel == channel).cloned().collect();
            ids.into_iter().filter_map(|id| groups.remove(&id).map(|group| (id, group))).collect()
        };
        for (id, group) in stopped {
            group.stopping.cancel();
            if let Err(error) = group.raft.shutdown().await {
                tracing::warn!(group = %id, %error, "a partition group did not stop cleanly");
            }
            // A segment copy being received writes into the local copy:
            // it ends (at its next request) first.
            let _copy_done = group.transfer.lock().await;
        }
        self.hosted_incarnations.lock().unwrap_or_else(|p| p.into_inner()).remove(channel);
        let (host, name) = (Arc::clone(host), channel.to_string());
        let dir = super::incarnation::channel_dir(&self.data_dir, channel);
        let exists = dir.exists();
        tokio::task::spawn_blocking(move || {
            // Marked first: a crash midway leaves files that are never
            // hosted again, only removed.
            let incarnation = marker.map_or(0, |marker| marker.incarnation);
            if exists || marker.is_some() {
                super::incarnation::write_marker(&dir, Marker { incarnation, deleting: true })
                    .map_err(|error| format!("{}: {error}", dir.display()))?;
            }
            host.remove_channel(&name)?;
            super::incarnation::remove_channel_dir(&dir).map_err(|error| format!("{}: {error}", dir.display()))
        })
        .await
        .map_err(|error| error.to_string())?
    }

    /// Writes the marker of `channel`'s files before its first group here
    /// starts, unless it already says `incarnation` (or the state's is
    /// unknown, 0, and a marker exists).
    async fn mark_incarnation(&self, channel: &str, incarnation: u64) -> Result<(), String> {
        let marker = self.marker_of(channel).map_err(|error| error.to_string())?;
        let hosted = match marker {
            Some(marker) if marker.deleting => {
                return Err(format!("its files of incarnation {} are being removed", marker.incarnation));
            }
            Some(marker) if marker.incarnation == incarnation || incarnation == 0 => marker.incarnation,
            _ => {
                let dir = super::incarnation::channel_dir(&self.data_dir, channel);
                tokio::task::spawn_blocking(move || super::incarnation::write_marker(&dir, Marker::of(incarnation)))
                    .await
                    .map_err(|error| error.to_string())?
                    .map_err(|error| error.to_string())?;
                incarnation
            }
        };
        self.hosted_incarnations.lock().unwrap_or_else(|p| p.into_inner()).insert(channel.to_string(), hosted);
        Ok(())
    }

    async fn start_placed(
        &self,
        placed: &BTreeMap<String, ReplicatedChannel>,
        incarnations: &BTreeMap<String, u64>,
        waiting: &BTreeSet<String>,
        host: &Arc<dyn PartitionHost>,
    ) {
        // A replica moved away, or a channel the state does not list (any
        // more, or yet, while entries are applied again): its group stops
        // here (its files stay).
        let moved_away: Vec<(GroupId, Arc<PartitionGroup>)> = {
            let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<GroupId> = groups
                .keys()
                .filter(|id| {
                    let replicas =
                        placed.get(&id.channel).and_then(|channel| channel.replicas.get(id.partition as usize));
                    replicas.is_none_or(|replicas| !replicas.contains(&self.node_id))
                })
                .cloned()
                .collect();
            gone.into_iter().filter_map(|id| groups.remove(&id).map(|group| (id, group))).collect()
        };
        for (id, group) in moved_away {
            tracing::info!(group = %id, "this replica is no longer placed on this node (moved away, or its channel not listed); its group stops here (its files stay)");
            group.stopping.cancel();
            if let Err(error) = group.raft.shutdown().await {
                tracing::warn!(group = %id, %error, "a partition group did not stop cleanly");
            }
        }
        for (name, channel) in placed {
            if waiting.contains(name) {
                continue;
            }
            let partitions = channel.replicas.len() as u32;
            for (partition, replicas) in channel.replicas.iter().enumerate() {
                let id = GroupId { channel: name.clone(), partition: partition as u32 };
                if !replicas.contains(&self.node_id) || self.group(&id).is_some() {
                    continue;
                }
                let incarnation = incarnations.get(name).copied().unwrap_or(0);
                if let Err(error) = self.mark_incarnation(name, incarnation).await {
                    tracing::error!(group = %id, %error, "cannot write a replicated channel's incarnation marker; not hosting it");
                    break;
                }
                if self.groups.read().unwrap_or_else(|p| p.into_inner()).len() >= REPLICATED_PARTITIONS_MAX {
                    tracing::error!(group = %id, "not hosting a replicated partition: this node hosts REPLICATED_PARTITIONS_MAX ({REPLICATED_PARTITIONS_MAX}) already");
                    continue;
                }
                match self.start_group(&id, partitions, replicas, host).await {
                    Ok(group) => {
                        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
                        // Stopping: `shutdown` has taken the groups already.
                        if self.stop.is_cancelled() {
                            drop(groups);
                            let _ = group.raft.shutdown().await;
                            return;
                        }
                        tracing::info!(group = %id, replicas = ?replicas, "replicated partition started");
                        groups.insert(id, Arc::new(group));
                    }
                    Err(error) => tracing::error!(group = %id, %error, "cannot host a replicated partition"),
                }
            }
        }
    }

    async fn start_group(
        &self,
        id: &GroupId,
        partitions: u32,
        replicas: &[NodeId],
        host: &Arc<dyn PartitionHost>,
    ) -> Result<PartitionGroup, String> {
        let dir = self.data_dir.join("cluster").join("partitions").join(&id.channel);
        let path = dir.join(format!("{}.redb", id.partition));
        let (host, channel, partition) = (Arc::clone(host), id.channel.clone(), id.partition);
        let staged = partition::StagedCopySlot::default();
        let machine_staged = Arc::clone(&staged);
        let (store, machine, log) = tokio::task::spawn_blocking(move || {
            let hosted = host.open_partition(&channel, partitions, partition)?;
            std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
            let (store, machine) = partition::open(&path, Arc::clone(&hosted.log))
                .map_err(|error| format!("{}: {error}", path.display()))?;
            let machine = machine.on_applied(hosted.appended).with_staged_copies(machine_staged);
            Ok::<_, String>((store, machine, hosted.log))
        })
        .await
        .map_err(|error| error.to_string())??;
        let incarnation = self.hosted_incarnation(&id.channel).unwrap_or(0);
        let network =
            PartitionNetwork { group: id.clone(), incarnation, tls: self.tls.clone(), source_ip: self.source_ip };
        let raft = PartitionRaft::new(self.node_id, Arc::clone(&self.raft_config), network, store, machine)
            .await
            .map_err(|error| error.to_string())?;
        super::status::metrics_loaded::<partition::PartitionTypes>(raft.metrics()).await;
        // The first replica initialises the group, once: later starts find
        // its log not empty and are refused harmlessly.
        if replicas.first() == Some(&self.node_id) && !raft.is_initialized().await.map_err(|error| error.to_string())? {
            let membership = self.metadata.metrics().borrow_watched().membership_config.clone();
            let mut members = BTreeMap::new();
            for replica in replicas {
                let addrs = membership
                    .membership()
                    .get_node(replica)
                    .cloned()
                    .ok_or_else(|| format!("replica {replica} is not a member of the cluster"))?;
                members.insert(*replica, addrs);
            }
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        let labels = vec![
            metrics::Label::new("group", "partition"),
            metrics::Label::new("channel", id.channel.clone()),
            metrics::Label::new("partition", id.partition.to_string()),
        ];
        tokio::spawn(super::status::watch_metrics::<super::partition::PartitionTypes>(
            raft.metrics(),
            labels,
            self.stop.clone(),
        ));
        tokio::spawn(snapshot_when_followers_hold(raft.clone(), self.raft_log_entries_max, self.stop.clone()));
        let (answers, queue) = mpsc::unbounded_channel();
        tokio::spawn(answer_in_order(queue));
        Ok(PartitionGroup {
            raft,
            log,
            transfer: tokio::sync::Mutex::new(()),
            staged,
            answers,
            stopping: self.stop.child_token(),
        })
    }

    /// Hands the leadership of every group this node leads to another of
    /// its voters, all groups at once (see `super::handover`), logs each
    /// outcome, and stops every group campaigning.
    pub(super) async fn hand_over_leadership(&self, round: std::time::Duration, limit: std::time::Duration) {
        let groups = self.hosted_groups();
        let handovers = groups.iter().map(|(id, group)| async move {
            let outcome = super::handover::hand_over(&group.raft, self.node_id, round, limit).await;
            super::handover::log_outcome(&id.to_string(), outcome);
            // Not elected again while the node drains its connections.
            group.raft.runtime_config().elect(false);
        });
        futures_util::future::join_all(handovers).await;
    }

    /// Stops every hosted group.
    pub(super) async fn shutdown(&self) {
        let groups: Vec<(GroupId, Arc<PartitionGroup>)> =
            self.groups.write().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (id, group) in groups {
            group.stopping.cancel();
            if let Err(error) = group.raft.shutdown().await {
                tracing::warn!(group = %id, %error, "a partition group did not stop cleanly");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(replicas: Vec<Vec<NodeId>>) -> MetadataState {
        let mut state = MetadataState::default();
        state.channels.insert("orders".into(), ReplicatedChannel { replication_factor: 3, replicas });
        state
    }

    /// A group's coordinator: the first replica of partition
    /// `murmur2(group) mod P` until a leader is reported for it, then that
    /// leader; groups spread over several nodes; a node lacking a replica
    /// of some partition never coordinates; with no node holding every
    /// partition, no group can be served.
    #[test]
    fn a_group_is_coordinated_by_its_partitions_leader_if_it_holds_every_partition() {
        let placement = vec![vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2], vec![1, 2, 3]];
        let mut state = orders(placement.clone());
        let partition = crate::partitioner::partition_for_key(b"billing", 4);
        let first = placement[partition as usize][0];
        assert_eq!(Replicas::coordinator_of(&state, "orders", "billing"), Ok(first));
        let other = placement[partition as usize][1];
        let report = LeaderReport { channel: "orders".into(), partition, leader: other, term: 5 };
        state.apply(&MetadataCommand::PartitionLeaders { reports: vec![report] }, 2);
        assert_eq!(Replicas::coordinator_of(&state, "orders", "billing"), Ok(other));
        let coordinators: BTreeSet<NodeId> = (0..40)
            .map(|group| Replicas::coordinator_of(&state, "orders", &format!("group-{group}")).unwrap())
            .collect();
        assert!(coordinators.len() > 1, "every group on one node: {coordinators:?}");

        // Node 3 lacks partition 1; node 2 lacks partition 3.
        let mut uneven = orders(vec![vec![3, 1, 2], vec![1, 2, 4], vec![2, 3, 1], vec![3, 1, 4]]);
        for group in 0..40 {
            let group = format!("group-{group}");
            assert_eq!(Replicas::coordinator_of(&uneven, "orders", &group), Ok(1), "{group}");
        }
        let report = LeaderReport { channel: "orders".into(), partition: 0, leader: 3, term: 2 };
        uneven.apply(&MetadataCommand::PartitionLeaders { reports: vec![report] }, 2);
        assert!((0..40).all(|group| Replicas::coordinator_of(&uneven, "orders", &format!("g{group}")) == Ok(1)));
        let none = orders(vec![vec![1, 2, 3], vec![4, 5, 6]]);
        assert!(Replicas::coordinator_of(&none, "orders", "billing").unwrap_err().contains("no node holds"));
        assert!(Replicas::coordinator_of(&none, "payments", "billing").is_err());
    }

    /// Every request of a copy fits the rate limiter's bucket (a request
    /// larger than the bucket would never be let through), at the lowest,
    /// a middle and the highest rate allowed.
    #[test]
    fn a_segment_transfer_request_always_fits_the_rate_limiters_bucket() {
        let range = crate::config::SEGMENT_TRANSFER_BYTES_PER_SEC_RANGE;
        let request = NonZeroU32::new((TRANSFER_CHUNK_BYTES / 1024) as u32).unwrap();
        for rate in [*range.start(), 100 << 20, *range.end()] {
            let limiter = transfer_limiter(rate).expect("a limiter for every rate allowed");
            assert!(limiter.check_n(request).is_ok(), "a request does not fit the bucket at {rate} bytes a second");
        }
    }
}
