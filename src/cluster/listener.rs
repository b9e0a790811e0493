//! The cluster listener's side: accepting node-to-node connections (with
//! mutual TLS when configured), serving their requests one at a time, and
//! the checks done before anything reaches openraft: who may send Raft
//! messages, that appended entries are consecutive, and that membership
//! changes name valid nodes and happen on the leader.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::Instant as _;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::entry::RaftEntry;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::ReadPolicy;
use openraft::{ChangeMembers, RaftTypeConfig, ServerState};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::partition::{PartitionRaft, PartitionSnapshot};
use super::replicas::{LEADERSHIP_REPORT_TIMEOUT, REPLICATED_PARTITIONS_MAX, Replicas};
use super::transport::{self, GroupId, NodeReply, NodeRequest, PartitionReply, PartitionRequest};
use super::types::{
    ChannelCommand, MetadataCommand, MetadataState, NodeAddrs, NodeId, POSITIONS_PER_COMMAND_MAX, Raft,
    ReplicatedChannel, Snapshot, TypeConfig,
};
use super::{CLUSTER_CONNECTIONS_MAX, CLUSTER_HANDSHAKE_TIMEOUT};

/// The replication factors a replicated channel may have.
pub const REPLICATION_FACTORS: [u8; 3] = [1, 3, 5];

/// A connection that sends no frame for this long is closed (peers open a
/// new one when they next need it).
pub const CLUSTER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Once a frame has started, the rest of it must arrive within this.
pub const CLUSTER_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `add-node` waits for the new node to catch up as a learner
/// before it gives up and takes the learner out again.
/// The metadata log is small: a running node catches up in milliseconds.
pub const ADD_NODE_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    /// No TLS: anyone.
    Unauthenticated,
    /// A certificate the cluster's CA signed, allowed to serve
    /// (`serverAuth`): a node.
    Node,
    /// A certificate the cluster's CA signed for clients only: an operator
    /// of `weir cluster`, who may not send Raft messages.
    Operator,
}

/// What the listener serves: the metadata group and the hosted partitions.
#[derive(Clone)]
pub(super) struct Served {
    pub raft: Raft,
    pub replicas: Arc<Replicas>,
    /// KiB of frames the connections may hold at once, being read or
    /// handled: [`CLUSTER_FRAME_BUDGET_BYTES`].
    pub frame_budget: Arc<tokio::sync::Semaphore>,
    /// Held while a channel's creation or deletion is checked and
    /// proposed, so that each is checked against the state the previous
    /// one left (a deletion never takes a channel created after it was
    /// asked for, on one leader).
    pub admin: Arc<tokio::sync::Mutex<()>>,
}

/// Bytes of node-to-node frames above `FRAME_BUDGET_FREE_BYTES` that the
/// listener's connections hold at once, read or being handled (a frame
/// waits for room, at most `CLUSTER_FRAME_TIMEOUT`, before its body is
/// read): four maximal frames. Decoding holds a second copy while it runs.
pub const CLUSTER_FRAME_BUDGET_BYTES: usize = 4 * transport::CLUSTER_FRAME_BYTES_MAX;

pub(super) async fn accept(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    served: Served,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CLUSTER_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, _)) => {
                let (served, stop, acceptor) = (served.clone(), stop.clone(), acceptor.clone());
                connections.spawn(async move {
                    serve(socket, acceptor, served, stop).await;
                    drop(permit);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cluster listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether a verified client certificate may serve too (`serverAuth`):
/// node certificates do, operators' do not.
fn peer_kind(stream: &TlsStream<TcpStream>) -> Peer {
    let (_, connection) = stream.get_ref();
    let serves = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|certificate| {
            let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
            let usage = parsed.extended_key_usage().ok()??;
            Some(usage.value.server_auth)
        })
        .unwrap_or(false);
    if serves { Peer::Node } else { Peer::Operator }
}

/// Serves one connection's requests in order until it closes, idles past
/// [`CLUSTER_IDLE_TIMEOUT`], sends a frame that does not decode or arrives
/// too slowly, or the node stops.
async fn serve(socket: TcpStream, acceptor: Option<TlsAcceptor>, served: Served, stop: CancellationToken) {
    let address = socket.peer_addr().map(|addr| addr.to_string()).unwrap_or_default();
    let _ = socket.set_nodelay(true);
    let (peer, (mut reader, mut writer)) = match acceptor {
        Some(acceptor) => match tokio::time::timeout(CLUSTER_HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
            Ok(Ok(stream)) => (peer_kind(&stream), transport::frame_halves(stream)),
            Ok(Err(error)) => {
                tracing::warn!(peer = %address, %error, "cluster listener: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = %address, "cluster listener: TLS handshake timed out");
                return;
            }
        },
        None => (Peer::Unauthenticated, transport::frame_halves(socket)),
    };
    loop {
        let frame = tokio::select! {
            () = stop.cancelled() => return,
            frame = transport::read_frame_within(
                &mut reader,
                CLUSTER_IDLE_TIMEOUT,
                CLUSTER_FRAME_TIMEOUT,
                Some(&served.frame_budget),
            ) => frame,
        };
        let (correlation, body, held) = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(peer = %address, %error, "cluster listener: closing a connection");
                return;
            }
        };
        let decoded = postcard::from_bytes::<NodeRequest>(&body);
        drop(body);
        let reply = match decoded {
            // The frame's share of the budget is held while its request is
            // handled (the decoded request holds its bytes), and given back
            // before the answer is written, which a peer can stall.
            Ok(request) => {
                let reply = handle(&served, peer, request).await;
                drop(held);
                reply
            }
            Err(error) => {
                drop(held);
                tracing::warn!(peer = %address, %error, "cluster listener: a request that does not decode");
                let reply = NodeReply::Error(format!("the request does not decode: {error}"));
                let _ = tokio::time::timeout(
                    CLUSTER_FRAME_TIMEOUT,
                    transport::write_frame(&mut writer, correlation, &reply),
                )
                .await;
                return;
            }
        };
        match tokio::time::timeout(CLUSTER_FRAME_TIMEOUT, transport::write_frame(&mut writer, correlation, &reply))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(peer = %address, %error, "cluster listener: cannot answer");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %address, "cluster listener: the peer did not take its answer in time");
                return;
            }
        }
    }
}

/// openraft trusts its peers to send consecutive entries after
/// `prev_log_id`; a request that does not is refused here.
fn check_append<C: RaftTypeConfig>(rpc: &AppendEntriesRequest<C>) -> Result<(), String> {
    let beyond = || "an entry index beyond u64::MAX".to_string();
    let mut expected = match &rpc.prev_log_id {
        Some(log_id) => Some(log_id.index().checked_add(1).ok_or_else(beyond)?),
        None => Some(0),
    };
    for entry in &rpc.entries {
        match expected {
            Some(index) if entry.index() == index => expected = index.checked_add(1),
            Some(index) => {
                return Err(format!("entry index {} where {index} was expected: not consecutive", entry.index()));
            }
            None => return Err(beyond()),
        }
    }
    Ok(())
}

async fn handle(served: &Served, peer: Peer, request: NodeRequest) -> NodeReply {
    let raft = &served.raft;
    let raft_message = matches!(
        request,
        NodeRequest::AppendEntries(_)
            | NodeRequest::Vote(_)
            | NodeRequest::FullSnapshot { .. }
            | NodeRequest::Partition { .. }
            | NodeRequest::Propose { .. }
            | NodeRequest::TransferLeader(_)
            | NodeRequest::PartitionOf { .. }
    );
    if raft_message && peer == Peer::Operator {
        return NodeReply::Error(
            "only nodes (certificates with the serverAuth usage) may send Raft messages; this certificate may only run weir cluster commands"
                .into(),
        );
    }
    match request {
        NodeRequest::AppendEntries(rpc) => {
            if let Err(problem) = check_append(&rpc) {
                return NodeReply::Error(problem);
            }
            match raft.append_entries(rpc).await {
                Ok(response) => NodeReply::AppendEntries(response),
                Err(error) => NodeReply::Error(error.to_string()),
            }
        }
        NodeRequest::Vote(rpc) => match raft.vote(rpc).await {
            Ok(response) => NodeReply::Vote(response),
            Err(error) => NodeReply::Error(error.to_string()),
        },
        NodeRequest::TransferLeader(request) => match raft.handle_transfer_leader(request).await {
            Ok(response) => NodeReply::TransferLeader(response),
            Err(error) => NodeReply::Error(error.to_string()),
        },
        NodeRequest::FullSnapshot { vote, meta, state } => {
            match raft.install_full_snapshot(vote, Snapshot { meta, snapshot: state }).await {
                Ok(response) => NodeReply::Snapshot(response),
                Err(error) => NodeReply::Error(error.to_string()),
            }
        }
        NodeRequest::Status => {
            let mut status = super::ClusterStatus::from_metrics(&raft.metrics().borrow_watched());
            status.partitions = served.replicas.statuses();
            NodeReply::Status(Box::new(status))
        }
        NodeRequest::AddNode { id, addrs } => add_node(raft, id, addrs).await,
        NodeRequest::RemoveNode { id } => remove_node(raft, id).await,
        NodeRequest::PartitionOf { group, incarnation, request } => {
            if !served.replicas.hosts_incarnation(&group.channel, incarnation) {
                return NodeReply::UnknownGroup;
            }
            partition_request(served, group, request).await
        }
        // Without an incarnation (an earlier build's): as of an unknown one.
        NodeRequest::Partition { group, request } => {
            if !served.replicas.hosts_incarnation(&group.channel, 0) {
                return NodeReply::UnknownGroup;
            }
            partition_request(served, group, request).await
        }
        NodeRequest::CreateChannel { name, partitions, replication_factor } => {
            let _admin = served.admin.lock().await;
            if served.replicas.is_replicated(&name) {
                return NodeReply::Error(format!("channel {name} already exists"));
            }
            create_channel(raft, &served.replicas.channels(), &name, partitions, replication_factor).await
        }
        NodeRequest::DeleteChannel { name } => {
            let Ok(_admin) = tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, served.admin.lock()).await else {
                return NodeReply::Error(
                    "another channel's creation, alteration or deletion is under way; try again".into(),
                );
            };
            if let Some(not_leader) = unless_leader(raft) {
                return not_leader;
            }
            if let Some(unsure) = applied_what_is_committed(raft).await {
                return unsure;
            }
            if !served.replicas.is_replicated(&name) {
                return NodeReply::UnknownChannel(format!("channel {name} is not a replicated channel"));
            }
            tracing::info!(channel = %name, "deleting a replicated channel");
            // Bounded: a leader without a quorum would hold the admin lock.
            match tokio::time::timeout(
                LEADERSHIP_REPORT_TIMEOUT,
                raft.client_write(MetadataCommand::DeleteChannel { name }),
            )
            .await
            {
                Ok(Ok(_)) => NodeReply::ChannelDeleted,
                Ok(Err(error)) => membership_error(&error),
                Err(_) => NodeReply::Error(format!(
                    "the deletion was not committed within {LEADERSHIP_REPORT_TIMEOUT:?}: it may or may not be"
                )),
            }
        }
        NodeRequest::AlterChannel { name, partitions } => {
            let Ok(_admin) = tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, served.admin.lock()).await else {
                return NodeReply::Error(
                    "another channel's creation, alteration or deletion is under way; try again".into(),
                );
            };
            alter_channel(raft, &served.replicas, &name, partitions).await
        }
        NodeRequest::MoveReplica { channel, partition, from, to } => {
            served.replicas.move_replica(&channel, partition, from, to).await
        }
        NodeRequest::Propose { command } => {
            match &command {
                MetadataCommand::CreateChannel { .. } => {
                    return NodeReply::Error("a channel is created with CreateChannel, which places it".into());
                }
                MetadataCommand::DeleteChannel { .. } => {
                    return NodeReply::Error("a channel is deleted with DeleteChannel, which checks it".into());
                }
                MetadataCommand::AddPartitions { .. } => {
                    return NodeReply::Error("partitions are added with AlterChannel, which places them".into());
                }
                // Nodes propose these with the incarnations they were made
                // for (OfIncarnations).
                MetadataCommand::PartitionLeaders { .. }
                | MetadataCommand::CommitPositions { .. }
                | MetadataCommand::PlaceReplicas { .. } => {
                    return NodeReply::Error(
                        "propose it with the incarnations it was made for (OfIncarnations)".into(),
                    );
                }
                MetadataCommand::OfIncarnations { incarnations, .. }
                    if incarnations.len() > POSITIONS_PER_COMMAND_MAX =>
                {
                    return NodeReply::Error(format!(
                        "{} incarnations in one proposal; at most {POSITIONS_PER_COMMAND_MAX}",
                        incarnations.len()
                    ));
                }
                MetadataCommand::OfIncarnations { command: ChannelCommand::PartitionLeaders { reports }, .. }
                    if reports.len() > REPLICATED_PARTITIONS_MAX =>
                {
                    return NodeReply::Error(format!(
                        "{} leader reports in one proposal; at most {REPLICATED_PARTITIONS_MAX}",
                        reports.len()
                    ));
                }
                MetadataCommand::OfIncarnations { command: ChannelCommand::CommitPositions { positions }, .. }
                    if positions.len() > POSITIONS_PER_COMMAND_MAX =>
                {
                    return NodeReply::Error(format!(
                        "{} positions in one proposal; at most {POSITIONS_PER_COMMAND_MAX}",
                        positions.len()
                    ));
                }
                _ => {}
            }
            if let Some(not_leader) = unless_leader(raft) {
                return not_leader;
            }
            // The proposer gives up after this long: a handler left waiting
            // on a leader that cannot commit would hold a connection.
            match tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, raft.client_write(command)).await {
                Ok(Ok(_)) => NodeReply::Recorded,
                Ok(Err(error)) => membership_error(&error),
                Err(_) => NodeReply::Error(format!("not committed within {LEADERSHIP_REPORT_TIMEOUT:?}")),
            }
        }
    }
}

/// A partition group's request, for the group this node runs.
async fn partition_request(served: &Served, group: GroupId, request: PartitionRequest) -> NodeReply {
    let Some(raft) = served.replicas.raft(&group) else { return NodeReply::UnknownGroup };
    match request {
        PartitionRequest::FullSnapshot { vote, meta, promise } => {
            let install = partition_message(
                &raft,
                PartitionRequest::FullSnapshot { vote, meta: meta.clone(), promise: promise.clone() },
            );
            served.replicas.receive_snapshot(&group, &vote, &meta, &promise, install).await
        }
        PartitionRequest::SegmentsToCopy { up_to } => match served.replicas.segments_to_copy(&group, up_to).await {
            Ok(copies) => NodeReply::Partition(PartitionReply::SegmentsToCopy(copies)),
            Err(error) => NodeReply::Error(error),
        },
        PartitionRequest::ReadSegment { base_offset, position, len } => {
            match served.replicas.read_segment(&group, base_offset, position, len).await {
                Ok(bytes) => NodeReply::Partition(PartitionReply::SegmentBytes(bytes)),
                Err(error) => NodeReply::Error(error),
            }
        }
        request => partition_message(&raft, request).await,
    }
}

/// Hands a partition group's Raft message to its openraft instance.
async fn partition_message(raft: &PartitionRaft, request: PartitionRequest) -> NodeReply {
    let reply = match request {
        PartitionRequest::AppendEntries(rpc) => {
            if let Err(problem) = check_append(&rpc) {
                return NodeReply::Error(problem);
            }
            raft.append_entries(rpc).await.map(PartitionReply::AppendEntries).map_err(|error| error.to_string())
        }
        PartitionRequest::Vote(rpc) => {
            raft.vote(rpc).await.map(PartitionReply::Vote).map_err(|error| error.to_string())
        }
        PartitionRequest::TransferLeader(request) => raft
            .handle_transfer_leader(request)
            .await
            .map(PartitionReply::TransferLeader)
            .map_err(|error| error.to_string()),
        PartitionRequest::FullSnapshot { vote, meta, promise } => raft
            .install_full_snapshot(vote, PartitionSnapshot { meta, snapshot: promise })
            .await
            .map(PartitionReply::Snapshot)
            .map_err(|error| error.to_string()),
        PartitionRequest::SegmentsToCopy { .. } | PartitionRequest::ReadSegment { .. } => {
            Err("segment transfer requests are answered by the replicas, not openraft".to_string())
        }
    };
    reply.map_or_else(NodeReply::Error, NodeReply::Partition)
}

/// `weir cluster create-channel`: checks the request, places each
/// partition's replicas over the voters (consecutive voters from a
/// starting point that moves with each partition, so that preferred
/// leaders spread over the nodes), and commits the creation.
async fn create_channel(
    raft: &Raft,
    channels: &MetadataState,
    name: &str,
    partitions: u32,
    replication_factor: u8,
) -> NodeReply {
    if let Err(error) = crate::storage::ChannelName::new(name) {
        return NodeReply::Error(error.to_string());
    }
    if !REPLICATION_FACTORS.contains(&replication_factor) {
        return NodeReply::Error(format!("replication factor {replication_factor}: allowed {REPLICATION_FACTORS:?}"));
    }
    if partitions == 0 || partitions as usize > REPLICATED_PARTITIONS_MAX {
        return NodeReply::Error(format!(
            "{partitions} partitions: a replicated channel has 1..={REPLICATED_PARTITIONS_MAX} (REPLICATED_PARTITIONS_MAX)"
        ));
    }
    if let Some(not_leader) = unless_leader(raft) {
        return not_leader;
    }
    let metrics = raft.metrics().borrow_watched().clone();
    let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
    if usize::from(replication_factor) > voters.len() {
        return NodeReply::Error(format!(
            "replication factor {replication_factor} is above the {} voters of the cluster",
            voters.len()
        ));
    }
    let replicas = place_partitions(name, 0..partitions, replication_factor, &voters, &live_voters(raft));
    if let Err(refused) = check_hosted_counts(channels, &voters, &replicas) {
        return refused;
    }
    let command = MetadataCommand::CreateChannel {
        name: name.to_string(),
        channel: ReplicatedChannel { replication_factor, replicas: replicas.clone() },
    };
    tracing::info!(channel = name, ?replicas, "creating a replicated channel");
    // Bounded: a leader without a quorum would hold the admin lock.
    match tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, raft.client_write(command)).await {
        Ok(Ok(_)) => NodeReply::ChannelCreated { replicas },
        Ok(Err(error)) => membership_error(&error),
        Err(_) => NodeReply::Error(format!(
            "the creation was not committed within {LEADERSHIP_REPORT_TIMEOUT:?}: it may or may not be"
        )),
    }
}

/// Each partition's replicas, for `partitions` of channel `name`:
/// consecutive voters from a starting point moved along by the name (so
/// that channels of one partition do not all prefer the same leader) and
/// by the partition's index (so that a channel's preferred leaders spread
/// over the nodes). Partitions added later are placed by the same rule.
/// The first replica, which initialises the partition's group, is the
/// first of those nodes in `live` (the list rotated): a group whose first
/// replica is down would have no leader until that node came back.
fn place_partitions(
    name: &str,
    partitions: std::ops::Range<u32>,
    replication_factor: u8,
    voters: &[NodeId],
    live: &BTreeSet<NodeId>,
) -> Vec<Vec<NodeId>> {
    let start = name.bytes().fold(0usize, |sum, byte| sum.wrapping_add(usize::from(byte)));
    partitions
        .map(|partition| {
            let mut replicas: Vec<NodeId> = (0..usize::from(replication_factor))
                .map(|k| voters[(start + partition as usize + k) % voters.len()])
                .collect();
            if let Some(first_live) = replicas.iter().position(|node| live.contains(node)) {
                replicas.rotate_left(first_live);
            }
            replicas
        })
        .collect()
}

/// The voters this node, the metadata group's leader, heard from within
/// the greatest election timeout (itself included): the nodes up, as far
/// as it can tell.
fn live_voters(raft: &Raft) -> BTreeSet<NodeId> {
    let recent = Duration::from_millis(raft.config().election_timeout_max);
    let metrics = raft.metrics().borrow_watched().clone();
    let mut live: BTreeSet<NodeId> = metrics
        .heartbeat
        .iter()
        .flatten()
        .filter(|(_, acked)| acked.as_ref().is_some_and(|acked| acked.elapsed() <= recent))
        .map(|(node, _)| *node)
        .collect();
    live.insert(metrics.id);
    live
}

/// Refuses a placement that would put a node above
/// `REPLICATED_PARTITIONS_MAX` hosted partitions.
fn check_hosted_counts(channels: &MetadataState, voters: &[NodeId], added: &[Vec<NodeId>]) -> Result<(), NodeReply> {
    for node in voters {
        let placed =
            Replicas::placed_on(channels, *node) + added.iter().filter(|partition| partition.contains(node)).count();
        if placed > REPLICATED_PARTITIONS_MAX {
            return Err(NodeReply::Error(format!(
                "node {node} would host {placed} replicated partitions, above REPLICATED_PARTITIONS_MAX ({REPLICATED_PARTITIONS_MAX})"
            )));
        }
    }
    Ok(())
}

/// `weir cluster alter-channel` (and a node's ALTER_CHANNEL): grows a
/// replicated channel to `partitions`, placing the new partitions by the
/// rule creations use, and commits it (docs/REPLICATION.md, "Adding
/// partitions to a replicated channel"). The same count is answered as
/// done; fewer is refused.
async fn alter_channel(raft: &Raft, replicas: &Replicas, name: &str, partitions: u32) -> NodeReply {
    if let Some(not_leader) = unless_leader(raft) {
        return not_leader;
    }
    if let Some(unsure) = applied_what_is_committed(raft).await {
        return unsure;
    }
    let channels = replicas.channels();
    let Some(channel) = channels.channels.get(name) else {
        return NodeReply::UnknownChannel(format!("channel {name} is not a replicated channel"));
    };
    let from = channel.replicas.len() as u32;
    if partitions < from {
        return NodeReply::Error(format!(
            "channel {name} has {from} partitions: a channel's partitions can be added, never removed"
        ));
    }
    if partitions == from {
        return NodeReply::ChannelAltered { replicas: channel.replicas.clone() };
    }
    if partitions as usize > REPLICATED_PARTITIONS_MAX {
        return NodeReply::Error(format!(
            "{partitions} partitions: a replicated channel has 1..={REPLICATED_PARTITIONS_MAX} (REPLICATED_PARTITIONS_MAX)"
        ));
    }
    let metrics = raft.metrics().borrow_watched().clone();
    let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
    if usize::from(channel.replication_factor) > voters.len() {
        return NodeReply::Error(format!(
            "replication factor {} is above the {} voters of the cluster",
            channel.replication_factor,
            voters.len()
        ));
    }
    // A channel read by consumer groups keeps a node holding every
    // partition (its groups' coordinator): its new partitions go on such
    // nodes when there are enough of them.
    let holders: Vec<NodeId> =
        voters.iter().copied().filter(|node| channel.replicas.iter().all(|replicas| replicas.contains(node))).collect();
    let among = if is_read_by_groups(&channels, name) && holders.len() >= usize::from(channel.replication_factor) {
        &holders
    } else {
        &voters
    };
    let added = place_partitions(name, from..partitions, channel.replication_factor, among, &live_voters(raft));
    if let Err(refused) = check_hosted_counts(&channels, &voters, &added) {
        return refused;
    }
    if let Some(refused) = groups_left_without_a_coordinator(&channels, name, &added) {
        return NodeReply::Error(refused);
    }
    let incarnation = channels.incarnations.get(name).copied().unwrap_or(0);
    tracing::info!(channel = name, from, to = partitions, ?added, "adding partitions to a replicated channel");
    let command = MetadataCommand::AddPartitions { name: name.to_string(), incarnation, from, added };
    // Bounded: a leader without a quorum would hold the admin lock.
    match tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, raft.client_write(command)).await {
        // Applied only if the channel was still as read above (an earlier
        // alteration, say, not committed in time, may have applied
        // first): the state now says whether the channel, the same
        // incarnation, has the partitions asked for (a replica move may
        // have changed a placement meanwhile, which does not matter).
        Ok(Ok(_)) => {
            let state = replicas.channels();
            let now = state.channels.get(name).map(|channel| channel.replicas.clone());
            let same = state.incarnations.get(name).copied().unwrap_or(0) == incarnation;
            match now {
                Some(now) if same && now.len() == partitions as usize => NodeReply::ChannelAltered { replicas: now },
                Some(now) => NodeReply::Error(format!(
                    "channel {name} changed meanwhile (it has {} partitions now): nothing was added; ask again",
                    now.len()
                )),
                None => NodeReply::UnknownChannel(format!("channel {name} was deleted meanwhile")),
            }
        }
        Ok(Err(error)) => membership_error(&error),
        Err(_) => NodeReply::Error(format!(
            "the new partitions were not committed within {LEADERSHIP_REPORT_TIMEOUT:?}: they may or may not be"
        )),
    }
}

/// Whether consumer groups read channel `name`: they have positions in
/// the state.
fn is_read_by_groups(state: &MetadataState, name: &str) -> bool {
    state.positions.keys().any(|(channel, _, _, group)| channel == name && *group)
}

/// Why adding partitions placed as `added` to channel `name` is refused
/// when its consumer groups would be left without a coordinator: a node
/// held a replica of every partition before (a group's coordinator must,
/// REPLICATION.md "Consumer groups across nodes"), none would after, and
/// groups read the channel. A channel no group reads may spread over any
/// nodes.
fn groups_left_without_a_coordinator(state: &MetadataState, name: &str, added: &[Vec<NodeId>]) -> Option<String> {
    let channel = state.channels.get(name)?;
    let holds_every = |node: &NodeId, partitions: &[Vec<NodeId>]| partitions.iter().all(|r| r.contains(node));
    let nodes: BTreeSet<NodeId> = channel.replicas.iter().flatten().copied().collect();
    let before = nodes.iter().any(|node| holds_every(node, &channel.replicas));
    let after = nodes.iter().any(|node| holds_every(node, &channel.replicas) && holds_every(node, added));
    (before && !after && is_read_by_groups(state, name)).then(|| {
        format!(
            "channel {name} is read by consumer groups, and fewer nodes than its replication factor hold a replica of every partition: after adding partitions none would, and a group's coordinator must (REPLICATION.md, \"Consumer groups across nodes\"); refused"
        )
    })
}

/// For a leader about to read its state to check an admin request: waits
/// (at most `LEADERSHIP_REPORT_TIMEOUT`) until it has applied everything
/// committed (a leader just elected may not have applied its
/// predecessor's last entries, say a channel's creation); the answer to
/// give otherwise.
async fn applied_what_is_committed(raft: &Raft) -> Option<NodeReply> {
    match tokio::time::timeout(LEADERSHIP_REPORT_TIMEOUT, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
        Ok(Ok(_)) => None,
        Ok(Err(error)) => {
            Some(NodeReply::Error(format!("this node cannot confirm it leads the metadata group: {error}; try again")))
        }
        Err(_) => Some(NodeReply::Error(format!(
            "this node could not confirm within {LEADERSHIP_REPORT_TIMEOUT:?} that it leads the metadata group; try again"
        ))),
    }
}

/// `NotLeader` unless this node leads the metadata group, which alone
/// changes membership.
fn unless_leader(raft: &Raft) -> Option<NodeReply> {
    let metrics = raft.metrics().borrow_watched().clone();
    if metrics.state == ServerState::Leader {
        return None;
    }
    let leader = metrics.current_leader.and_then(|leader| {
        let addrs = metrics.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, addrs))
    });
    Some(NodeReply::NotLeader { leader })
}

async fn add_node(raft: &Raft, id: NodeId, addrs: NodeAddrs) -> NodeReply {
    if !crate::config::NODE_ID_RANGE.contains(&id) {
        return NodeReply::Error(format!("node id {id} is outside {:?}", crate::config::NODE_ID_RANGE));
    }
    for addr in [&addrs.cluster_addr, &addrs.client_addr] {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            return NodeReply::Error(format!("{addr:?} is not an IP address and port"));
        }
    }
    if let Some(not_leader) = unless_leader(raft) {
        return not_leader;
    }
    let membership = raft.metrics().borrow_watched().membership_config.clone();
    let is_voter = membership.voter_ids().any(|voter| voter == id);
    let added = match membership.get_node(&id) {
        // A learner left by an add-node that was cut short (leadership
        // moved, or the answer was lost): this one resumes it.
        Some(known) if *known == addrs && !is_voter => {
            tracing::info!(id, %addrs, "resuming the addition of a node that is a learner already");
            membership.log_id().map_or(0, |log_id| log_id.index)
        }
        Some(known) => {
            let kind = if is_voter { "a voter" } else { "a learner with other addresses" };
            return NodeReply::Error(format!(
                "node {id} is already a member ({kind}, {known}); remove it first to change it"
            ));
        }
        None if membership.nodes().count() >= crate::config::CLUSTER_NODES_MAX => {
            return NodeReply::Error(format!(
                "the cluster has {} nodes already, the most it may have (CLUSTER_NODES_MAX)",
                crate::config::CLUSTER_NODES_MAX
            ));
        }
        None => {
            tracing::info!(id, %addrs, "adding a node: as a learner until it has caught up, then as a voter");
            match raft.add_learner(id, addrs, false).await {
                Ok(response) => response.log_id.index,
                Err(error) => return membership_error(&error),
            }
        }
    };
    // Caught up: it holds the entry that made it a learner. Also stop
    // waiting when this node no longer leads or the node left the group.
    let settled = raft
        .wait(Some(ADD_NODE_CATCH_UP_TIMEOUT))
        .metrics(
            |metrics| {
                let matched = metrics.replication.as_ref().and_then(|replication| replication.get(&id));
                metrics.state != ServerState::Leader
                    || metrics.membership_config.get_node(&id).is_none()
                    || matched.is_some_and(|matched| matched.is_some_and(|log_id| log_id.index >= added))
            },
            "the new node caught up, or the wait is moot",
        )
        .await;
    if let Some(not_leader) = unless_leader(raft) {
        tracing::warn!(id, "leadership moved while the new node was catching up; it stays a learner");
        return match not_leader {
            NodeReply::NotLeader { .. } => NodeReply::Error(format!(
                "leadership moved while node {id} was catching up: it is a learner now; run add-node again to finish (it resumes)"
            )),
            other => other,
        };
    }
    if settled.is_err() {
        tracing::warn!(id, "the new node did not catch up; taking it out of the group again");
        let removed = raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false).await;
        return NodeReply::Error(match removed {
            Ok(_) => format!(
                "node {id} did not catch up within {ADD_NODE_CATCH_UP_TIMEOUT:?} (is it running, with [cluster] set, at that cluster address?); it was not added"
            ),
            Err(error) => format!(
                "node {id} did not catch up within {ADD_NODE_CATCH_UP_TIMEOUT:?}, and taking it out again failed ({error}): it is a learner; remove-node {id} removes it"
            ),
        });
    }
    if raft.metrics().borrow_watched().membership_config.get_node(&id).is_none() {
        return NodeReply::Error(format!("node {id} was removed while it was catching up"));
    }
    change_membership(raft, ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
}

async fn remove_node(raft: &Raft, id: NodeId) -> NodeReply {
    if let Some(not_leader) = unless_leader(raft) {
        return not_leader;
    }
    let membership = raft.metrics().borrow_watched().membership_config.clone();
    let change = if membership.voter_ids().any(|voter| voter == id) {
        // Not retained as a learner: a removed voter leaves the group.
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else if membership.get_node(&id).is_some() {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    } else {
        return NodeReply::Error(format!("node {id} is not a member of the cluster"));
    };
    tracing::info!(id, "removing a node from the group");
    change_membership(raft, change).await
}

type ClientWriteError = openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>;

/// `NotLeader` when the error says another node leads (or none does yet),
/// else the error.
fn membership_error(error: &ClientWriteError) -> NodeReply {
    match error.forward_to_leader() {
        Some(forward) => NodeReply::NotLeader { leader: forward.leader_id.zip(forward.leader_node.clone()) },
        None => NodeReply::Error(error.to_string()),
    }
}

async fn change_membership(raft: &Raft, change: ChangeMembers<NodeId, NodeAddrs>) -> NodeReply {
    match raft.change_membership(change, false).await {
        Ok(response) => {
            let voters =
                response.membership.as_ref().map(|membership| membership.voter_ids().collect()).unwrap_or_default();
            NodeReply::MembershipChanged { voters }
        }
        Err(error) => membership_error(&error),
    }
}

#[cfg(test)]
mod tests {
    use openraft::vote::RaftLeaderId;

    use super::*;
    use crate::cluster::types::{Entry, LogId, Vote};

    /// Partitions are placed on consecutive voters, moving along with the
    /// partition index; a node that is down is never first (it would
    /// initialise the group), and each partition keeps its set of nodes.
    #[test]
    fn placement_spreads_partitions_and_puts_a_live_node_first() {
        let voters = [1, 2, 3];
        let all: BTreeSet<NodeId> = voters.into_iter().collect();
        let placed = place_partitions("a", 0..3, 2, &voters, &all);
        let firsts: BTreeSet<NodeId> = placed.iter().map(|replicas| replicas[0]).collect();
        assert_eq!(firsts, all, "preferred leaders spread over the nodes: {placed:?}");
        let without_3: BTreeSet<NodeId> = [1, 2].into_iter().collect();
        let live_first = place_partitions("a", 0..3, 2, &voters, &without_3);
        for (partition, replicas) in live_first.iter().enumerate() {
            assert_ne!(replicas[0], 3, "{live_first:?}");
            let mut set = replicas.clone();
            set.sort_unstable();
            let mut expected = placed[partition].clone();
            expected.sort_unstable();
            assert_eq!(set, expected);
        }
        // Partitions added later continue the rotation.
        assert_eq!(place_partitions("a", 2..3, 2, &voters, &all), placed[2..].to_vec());
    }

    /// Adding partitions that would leave no node holding every partition
    /// is refused only for a channel consumer groups read.
    #[test]
    fn groups_keep_a_node_holding_every_partition() {
        let mut state = MetadataState::default();
        let channel = ReplicatedChannel { replication_factor: 1, replicas: vec![vec![1]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 1);
        assert_eq!(groups_left_without_a_coordinator(&state, "orders", &[vec![2]]), None, "no group reads it");
        state.positions.insert(("orders".into(), "billing".into(), 0, false), 3);
        assert_eq!(groups_left_without_a_coordinator(&state, "orders", &[vec![2]]), None, "a durable reader");
        state.positions.insert(("orders".into(), "billing".into(), 0, true), 3);
        assert!(is_read_by_groups(&state, "orders"));
        assert!(groups_left_without_a_coordinator(&state, "orders", &[vec![2]]).is_some());
        assert_eq!(groups_left_without_a_coordinator(&state, "orders", &[vec![1]]), None, "node 1 holds both");
    }

    #[test]
    fn appended_entries_must_follow_the_previous_one_without_gaps() {
        let leader = openraft::impls::leader_id_std::LeaderId::<u64, u64>::new(2, 1).to_committed();
        let log_id = |index| LogId::new(leader, index);
        let request = |prev: Option<u64>, indexes: &[u64]| AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            prev_log_id: prev.map(log_id),
            entries: indexes.iter().map(|&index| Entry::new_blank(log_id(index))).collect(),
            leader_commit: None,
        };
        assert!(check_append(&request(None, &[0, 1, 2])).is_ok());
        assert!(check_append(&request(Some(4), &[5, 6])).is_ok());
        assert!(check_append(&request(Some(4), &[])).is_ok());
        assert!(check_append(&request(Some(4), &[6])).is_err());
        assert!(check_append(&request(None, &[1])).is_err());
        assert!(check_append(&request(Some(4), &[5, 7])).is_err());
        assert!(check_append(&request(Some(4), &[5, 5])).is_err());
        assert!(check_append(&request(Some(u64::MAX), &[])).is_err());
        assert!(check_append(&request(Some(u64::MAX - 1), &[u64::MAX, u64::MAX])).is_err());
    }
}
