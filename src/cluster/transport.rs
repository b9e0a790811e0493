//! Node-to-node traffic on the cluster listener: its frames, the requests
//! and replies they carry, and the client side openraft sends through.
//!
//! A frame is `length: u32` (bytes after it, at most
//! [`CLUSTER_FRAME_BYTES_MAX`]), `correlation: u64`, then one
//! [`NodeRequest`] or [`NodeReply`] encoded with postcard. A connection
//! carries one request at a time; each side checks the length before it
//! allocates, and a frame that does not decode ends that connection only.
//! The CLI's `weir cluster` commands use the same listener.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, OptionalSend, RaftNetworkFactory, RaftNetworkV2, RaftTypeConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use super::partition::{PartitionSnapshot, PartitionSnapshotMeta, PartitionTypes, PartitionVote, SnapshotPromise};
use super::status::ClusterStatus;
use super::types::{MetadataCommand, MetadataState, NodeAddrs, NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::record::Message;

/// Largest node-to-node frame. The metadata group's appends carry at most
/// `METADATA_APPEND_ENTRIES_MAX` small entries (at most 1,024 positions
/// each) and its snapshot is at most a few MB; a partition group's append carries as many publishes as
/// fit (at least one: the broker refuses to start in cluster mode with a
/// publish limit above this less `CLUSTER_FRAME_ROOM_BYTES`). Frames are
/// read as they arrive, so the limit is not an allocation.
pub const CLUSTER_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// A client connection idle for this long is opened anew before its next
/// request, so that it never meets the listener's idle timeout
/// (`CLUSTER_IDLE_TIMEOUT`, twice as long) mid-request.
const CLIENT_CONNECTION_REUSE_MAX: Duration = Duration::from_secs(60);
/// Bytes of a frame before its body: length and correlation id.
const FRAME_HEADER_BYTES: usize = 4 + 8;
/// How long a `weir cluster` command waits for its answer: a membership
/// change waits for a new node to catch up and for two commits.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What one node (or the CLI) asks another.
#[derive(Debug, Serialize, Deserialize)]
pub enum NodeRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    /// A whole snapshot in one frame (the metadata state is small).
    FullSnapshot {
        vote: Vote,
        meta: SnapshotMeta,
        state: MetadataState,
    },
    /// `weir cluster status`: this node's view of the metadata group.
    Status,
    /// `weir cluster add-node`: a learner that catches up, then a voter.
    AddNode {
        id: NodeId,
        addrs: NodeAddrs,
    },
    /// `weir cluster remove-node`: out of the voters, then out of the group.
    RemoveNode {
        id: NodeId,
    },
    /// A replicated partition's Raft message.
    Partition {
        group: GroupId,
        request: PartitionRequest,
    },
    /// `weir cluster create-channel`: a replicated channel, placed by the
    /// metadata leader.
    CreateChannel {
        name: String,
        partitions: u32,
        replication_factor: u8,
    },
    /// A node's proposal to the metadata group, sent to its leader (node
    /// certificates only): a partition leader reporting itself, or its
    /// subscribers' positions; never a channel's creation, which the
    /// leader places itself.
    Propose {
        command: MetadataCommand,
    },
    /// `weir cluster move-replica`: moves a partition's replica from one
    /// node to another, on the partition's leader.
    MoveReplica {
        channel: String,
        partition: u32,
        from: NodeId,
        to: NodeId,
    },
    /// The metadata group's leader hands its leadership to this node's
    /// replica (a graceful shutdown: docs/REPLICATION.md, "Leadership
    /// hand-over"). New variants go last: postcard numbers them in order.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// `weir cluster delete-channel`, and a node's DELETE_CHANNEL with
    /// `force`: deletes a replicated channel, on the metadata leader.
    DeleteChannel {
        name: String,
    },
    /// A replicated partition's Raft message (or segment transfer
    /// request) from the group of one incarnation of its channel: a node
    /// hosting another incarnation answers `UnknownGroup`, so that a
    /// deleted channel's group, still running on a node that has not
    /// applied the deletion yet, never talks to the new channel's.
    PartitionOf {
        group: GroupId,
        incarnation: u64,
        request: PartitionRequest,
    },
    /// `weir cluster alter-channel`, and a node's ALTER_CHANNEL: grows a
    /// replicated channel to `partitions`, on the metadata leader.
    AlterChannel {
        name: String,
        partitions: u32,
    },
}

/// Names a replicated partition's Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId {
    pub channel: String,
    pub partition: u32,
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} partition {}", self.channel, self.partition)
    }
}

/// A Raft message of a replicated partition's group.
#[derive(Debug, Serialize, Deserialize)]
pub enum PartitionRequest {
    AppendEntries(AppendEntriesRequest<PartitionTypes>),
    Vote(VoteRequest<PartitionTypes>),
    /// A whole snapshot (a promise of how far the log reaches: see
    /// `super::partition`).
    FullSnapshot {
        vote: PartitionVote,
        meta: PartitionSnapshotMeta,
        promise: SnapshotPromise,
    },
    /// Segment transfer: the segments a replica copies to hold the offsets
    /// before `up_to` (where the snapshot ends).
    SegmentsToCopy {
        up_to: u64,
    },
    /// Segment transfer: bytes of one segment's `.log` file (at most
    /// `TRANSFER_CHUNK_BYTES`).
    ReadSegment {
        base_offset: u64,
        position: u64,
        len: u32,
    },
    /// The group's leader hands its leadership over (a graceful shutdown).
    TransferLeader(TransferLeaderRequest<PartitionTypes>),
}

/// The answer to a [`PartitionRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PartitionReply {
    AppendEntries(AppendEntriesResponse<PartitionTypes>),
    Vote(VoteResponse<PartitionTypes>),
    Snapshot(SnapshotResponse<PartitionTypes>),
    SegmentsToCopy(Vec<crate::storage::SegmentCopy>),
    SegmentBytes(#[serde(with = "serde_bytes")] Vec<u8>),
    TransferLeader(TransferLeaderResponse<PartitionTypes>),
}

/// The answer to a [`NodeRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum NodeReply {
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    Status(Box<ClusterStatus>),
    Partition(PartitionReply),
    /// This node runs no group for the partition (not one of its replicas,
    /// or it has not applied the channel's creation yet).
    UnknownGroup,
    /// A replicated channel was created: each partition's replicas, the
    /// preferred leader first.
    ChannelCreated {
        replicas: Vec<Vec<NodeId>>,
    },
    /// A membership change committed: the new voters.
    MembershipChanged {
        voters: Vec<NodeId>,
    },
    /// Only the metadata group's leader changes membership; this is the
    /// leader when one is known.
    NotLeader {
        leader: Option<(NodeId, NodeAddrs)>,
    },
    Error(String),
    /// A proposal was committed. (New variants go last: postcard numbers
    /// them in order.)
    Recorded,
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// A replicated channel's deletion was committed (each node removes
    /// its files as it applies it).
    ChannelDeleted,
    /// A replicated channel's new partition count was committed: each
    /// partition's replicas, the preferred leader first (each node starts
    /// its new groups as it applies it).
    ChannelAltered {
        replicas: Vec<Vec<NodeId>>,
    },
    /// A deletion or alteration named a channel the metadata state does
    /// not list (never created, or deleted meanwhile).
    UnknownChannel(String),
}

/// Why a request to another node got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} sent a frame that does not decode: {problem}")]
    Malformed { addr: String, problem: String },
}

/// The halves of a node-to-node connection, plain or TLS.
pub(crate) type FrameReader = BufReader<Box<dyn AsyncRead + Send + Sync + Unpin>>;
pub(crate) type FrameWriter = BufWriter<Box<dyn AsyncWrite + Send + Sync + Unpin>>;

/// Splits a connection into buffered frame halves.
pub(crate) fn frame_halves<S>(stream: S) -> (FrameReader, FrameWriter)
where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
{
    let (read, write) = tokio::io::split(stream);
    (BufReader::new(Box::new(read)), BufWriter::new(Box::new(write)))
}

/// Writes one frame.
pub(crate) async fn write_frame<T: Serialize>(writer: &mut FrameWriter, correlation: u64, body: &T) -> io::Result<()> {
    let body = postcard::to_stdvec(body).map_err(io::Error::other)?;
    if body.len() + 8 > CLUSTER_FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a frame of {} bytes is above CLUSTER_FRAME_BYTES_MAX ({CLUSTER_FRAME_BYTES_MAX})", body.len()),
        ));
    }
    writer.write_u32((body.len() + 8) as u32).await?;
    writer.write_u64(correlation).await?;
    writer.write_all(&body).await?;
    writer.flush().await
}

/// Reads one frame: `None` at a clean end of stream. The frame must start
/// within `idle` and, once started, arrive whole within `frame_timeout`.
pub(crate) async fn read_frame(
    reader: &mut FrameReader,
    idle: Duration,
    frame_timeout: Duration,
) -> io::Result<Option<(u64, Vec<u8>)>> {
    Ok(read_frame_within(reader, idle, frame_timeout, None).await?.map(|(correlation, body, _)| (correlation, body)))
}

/// Frames up to this size are read without taking from a listener's budget.
pub const FRAME_BUDGET_FREE_BYTES: usize = 64 * 1024;

/// As [`read_frame`], holding a share of `budget` (one permit per KiB of
/// the frame) while the body is read, and returning it with the frame: the
/// listener bounds the bytes its connections hold at once.
pub(crate) async fn read_frame_within(
    reader: &mut FrameReader,
    idle: Duration,
    frame_timeout: Duration,
    budget: Option<&Arc<Semaphore>>,
) -> io::Result<Option<(u64, Vec<u8>, Option<OwnedSemaphorePermit>)>> {
    let timed_out = |what: &str| io::Error::new(io::ErrorKind::TimedOut, what.to_string());
    let length = match tokio::time::timeout(idle, reader.read_u32()).await {
        Err(_) => return Err(timed_out("idle past the timeout")),
        Ok(Ok(length)) => length as usize,
        Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(error)) => return Err(error),
    };
    // Checked before any wait for the budget: a frame above the limit never
    // waits for room it cannot have.
    if length > CLUSTER_FRAME_BYTES_MAX {
        return read_frame_rest(reader, length).await.map(|(correlation, body)| Some((correlation, body, None)));
    }
    // Small frames (votes, heartbeats, commands) never wait behind large
    // ones: only frames above FRAME_BUDGET_FREE_BYTES count.
    let permit = match budget {
        Some(budget) if length > FRAME_BUDGET_FREE_BYTES => {
            let permits = length.div_ceil(1024) as u32;
            match tokio::time::timeout(frame_timeout, Arc::clone(budget).acquire_many_owned(permits)).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) => return Err(io::Error::other("the listener is stopping")),
                Err(_) => return Err(timed_out("no room for the frame within the frame timeout")),
            }
        }
        _ => None,
    };
    match tokio::time::timeout(frame_timeout, read_frame_rest(reader, length)).await {
        Ok(result) => result.map(|(correlation, body)| Some((correlation, body, permit))),
        Err(_) => Err(timed_out("a frame arrived too slowly")),
    }
}

async fn read_frame_rest(reader: &mut FrameReader, length: usize) -> io::Result<(u64, Vec<u8>)> {
    if !(FRAME_HEADER_BYTES - 4..=CLUSTER_FRAME_BYTES_MAX).contains(&length) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {length} is outside 8..={CLUSTER_FRAME_BYTES_MAX}"),
        ));
    }
    let correlation = reader.read_u64().await?;
    // Read as it arrives: a peer claiming a large frame and sending little
    // holds no more memory than it sent.
    let mut body = Vec::new();
    (&mut *reader).take((length - 8) as u64).read_to_end(&mut body).await?;
    if body.len() != length - 8 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed inside a frame"));
    }
    Ok((correlation, body))
}

/// One connection to another node: opened when first used, dropped after
/// any failure and opened again by the next request.
pub struct PeerClient {
    addr: String,
    tls: Option<TlsConnector>,
    /// The local address connections leave from, when set.
    source_ip: Option<std::net::IpAddr>,
    /// The connection and when it was last used.
    connection: Option<(FrameReader, FrameWriter, std::time::Instant)>,
    next_correlation: u64,
}

impl PeerClient {
    /// A client of the node at `addr`, over TLS when `tls` is given (the
    /// node's certificate is verified against the address's host).
    pub fn new(addr: impl Into<String>, tls: Option<TlsConnector>) -> PeerClient {
        PeerClient { addr: addr.into(), tls, source_ip: None, connection: None, next_correlation: 1 }
    }

    /// Connections leave from `ip` (the node's cluster interface), so that
    /// the other nodes, and firewalls between them, see which node calls.
    pub fn with_source_ip(mut self, ip: Option<std::net::IpAddr>) -> PeerClient {
        self.source_ip = ip;
        self
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let Some(source_ip) = self.source_ip else { return TcpStream::connect(&self.addr).await };
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", self.addr));
        for target in tokio::net::lookup_host(&self.addr).await? {
            let socket =
                if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            // Of another family than the listener's address: left unbound.
            if source_ip.is_ipv4() == target.is_ipv4()
                && let Err(error) = socket.bind(std::net::SocketAddr::new(source_ip, 0))
            {
                last_error = error;
                continue;
            }
            match socket.connect(target).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// Sends `request` and waits at most `timeout` for its reply.
    ///
    /// # Errors
    /// The node cannot be reached, does not answer in time, or answers
    /// with a frame that does not decode.
    pub async fn call(&mut self, request: &NodeRequest, timeout: Duration) -> Result<NodeReply, TransportError> {
        match tokio::time::timeout(timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout { addr: self.addr.clone(), timeout }),
        }
    }

    /// Takes the connection for the request and puts it back only after a
    /// whole answer: a failed, timed out or cancelled request leaves none
    /// (whatever is left on it belongs to that request).
    async fn exchange(&mut self, request: &NodeRequest) -> Result<NodeReply, TransportError> {
        let addr = self.addr.clone();
        let io_error = |source| TransportError::Io { addr: addr.clone(), source };
        let (mut reader, mut writer) = match self.connection.take() {
            Some((reader, writer, used)) if used.elapsed() < CLIENT_CONNECTION_REUSE_MAX => (reader, writer),
            _ => {
                let stream = self.connect().await.map_err(io_error)?;
                let _ = stream.set_nodelay(true);
                match &self.tls {
                    Some(connector) => {
                        let name = crate::security::tls::server_name(&self.addr).map_err(|error| {
                            io_error(io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))
                        })?;
                        frame_halves(connector.connect(name, stream).await.map_err(io_error)?)
                    }
                    None => frame_halves(stream),
                }
            }
        };
        let correlation = self.next_correlation;
        self.next_correlation += 1;
        write_frame(&mut writer, correlation, request).await.map_err(io_error)?;
        // The caller's timeout bounds the wait for the answer.
        let answer = read_frame(&mut reader, Duration::MAX, Duration::MAX).await.map_err(io_error)?;
        let Some((answered, body)) = answer else {
            return Err(io_error(io::Error::new(io::ErrorKind::UnexpectedEof, "the node closed the connection")));
        };
        if answered != correlation {
            return Err(TransportError::Malformed {
                addr: self.addr.clone(),
                problem: format!("answer to request {answered}, expected {correlation}"),
            });
        }
        let reply = postcard::from_bytes(&body)
            .map_err(|error| TransportError::Malformed { addr: self.addr.clone(), problem: error.to_string() })?;
        self.connection = Some((reader, writer, std::time::Instant::now()));
        Ok(reply)
    }
}

fn rpc_error<C: RaftTypeConfig>(error: TransportError) -> RPCError<C> {
    match error {
        TransportError::Timeout { .. } => RPCError::Unreachable(Unreachable::new(&error)),
        TransportError::Io { .. } => RPCError::Unreachable(Unreachable::new(&error)),
        TransportError::Malformed { .. } => RPCError::Network(NetworkError::new(&error)),
    }
}

fn unexpected<C: RaftTypeConfig>(reply: NodeReply) -> NetworkError<C> {
    let message = match reply {
        NodeReply::Error(message) => message,
        other => format!("unexpected reply {other:?}"),
    };
    NetworkError::new(&AnyError::error(message))
}

/// Opens a [`PeerClient`] per replication target, as openraft asks.
pub struct PeerNetwork {
    pub tls: Option<TlsConnector>,
    /// The cluster listener's IP, when it names one (not 0.0.0.0 or ::).
    pub source_ip: Option<std::net::IpAddr>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, _target: NodeId, node: &NodeAddrs) -> PeerClient {
        PeerClient::new(node.cluster_addr.clone(), self.tls.clone()).with_source_ip(self.source_ip)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = MetadataState;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&NodeRequest::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(NodeReply::AppendEntries(response)) => Ok(response),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(error) => Err(rpc_error(error)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&NodeRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(NodeReply::Vote(response)) => Ok(response),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(error) => Err(rpc_error(error)),
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&NodeRequest::TransferLeader(request), option.hard_ttl()).await {
            Ok(NodeReply::TransferLeader(response)) => Ok(response),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(error) => Err(rpc_error(error)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = NodeRequest::FullSnapshot { vote, meta: snapshot.meta, state: snapshot.snapshot };
        let timeout = option.hard_ttl();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = self.call(&request, timeout) => match reply {
                Ok(NodeReply::Snapshot(response)) => Ok(response),
                Ok(other) => Err(StreamingError::Network(unexpected(other))),
                Err(error) => Err(StreamingError::Unreachable(Unreachable::new(&error))),
            },
        }
    }
}

/// The bandwidth a partition group's append is given time for, beyond the
/// heartbeat interval: 10 MiB/s (a maximal append of 63 MiB: 6.3 s more).
pub const APPEND_BYTES_PER_SEC_MIN: f64 = 10.0 * 1024.0 * 1024.0;

/// Opens a [`PartitionPeer`] per replication target of one partition's
/// group. Each group has its own connections (sharing them across groups
/// is not built: `REPLICATED_PARTITIONS_MAX` bounds their number).
pub struct PartitionNetwork {
    pub group: GroupId,
    /// The incarnation of the channel this node's group belongs to.
    pub incarnation: u64,
    pub tls: Option<TlsConnector>,
    pub source_ip: Option<std::net::IpAddr>,
}

/// One partition group's connection to another node.
pub struct PartitionPeer {
    client: PeerClient,
    group: GroupId,
    incarnation: u64,
}

impl RaftNetworkFactory<PartitionTypes> for PartitionNetwork {
    type Network = PartitionPeer;

    async fn new_client(&mut self, _target: NodeId, node: &NodeAddrs) -> PartitionPeer {
        let client = PeerClient::new(node.cluster_addr.clone(), self.tls.clone()).with_source_ip(self.source_ip);
        PartitionPeer { client, group: self.group.clone(), incarnation: self.incarnation }
    }
}

impl PartitionPeer {
    async fn call(
        &mut self,
        request: PartitionRequest,
        timeout: Duration,
    ) -> Result<PartitionReply, RPCError<PartitionTypes>> {
        let request = NodeRequest::PartitionOf { group: self.group.clone(), incarnation: self.incarnation, request };
        match self.client.call(&request, timeout).await {
            Ok(NodeReply::Partition(reply)) => Ok(reply),
            // Not (yet) running the group: as good as down.
            Ok(NodeReply::UnknownGroup) => Err(RPCError::Unreachable(Unreachable::new(&AnyError::error(format!(
                "{} runs no group for {}",
                self.client.addr, self.group
            ))))),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(error) => Err(rpc_error(error)),
        }
    }
}

impl RaftNetworkV2<PartitionTypes> for PartitionPeer {
    type SnapshotData = SnapshotPromise;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionTypes>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        // openraft gives every append the heartbeat interval; a large one
        // gets the time to carry its bytes at a modest bandwidth too, or it
        // would time out and be sent again forever.
        let bytes: usize = rpc
            .entries
            .iter()
            .map(|entry| match &entry.payload {
                openraft::EntryPayload::Normal(publish) => publish.messages.iter().map(Message::size_bytes).sum(),
                _ => 0,
            })
            .sum();
        let timeout = option.hard_ttl() + Duration::from_secs_f64(bytes as f64 / APPEND_BYTES_PER_SEC_MIN);
        match self.call(PartitionRequest::AppendEntries(rpc), timeout).await? {
            PartitionReply::AppendEntries(response) => Ok(response),
            other => Err(RPCError::Network(NetworkError::new(&AnyError::error(format!("unexpected reply {other:?}"))))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<PartitionTypes>,
        option: RPCOption,
    ) -> Result<VoteResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        match self.call(PartitionRequest::Vote(rpc), option.hard_ttl()).await? {
            PartitionReply::Vote(response) => Ok(response),
            other => Err(RPCError::Network(NetworkError::new(&AnyError::error(format!("unexpected reply {other:?}"))))),
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<PartitionTypes>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        match self.call(PartitionRequest::TransferLeader(request), option.hard_ttl()).await? {
            PartitionReply::TransferLeader(response) => Ok(response),
            other => Err(RPCError::Network(NetworkError::new(&AnyError::error(format!("unexpected reply {other:?}"))))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: PartitionVote,
        snapshot: PartitionSnapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<PartitionTypes>, StreamingError<PartitionTypes>> {
        let request = PartitionRequest::FullSnapshot { vote, meta: snapshot.meta, promise: snapshot.snapshot };
        let timeout = option.hard_ttl();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = self.call(request, timeout) => match reply {
                Ok(PartitionReply::Snapshot(response)) => Ok(response),
                Ok(other) => Err(StreamingError::Network(NetworkError::new(&AnyError::error(format!("unexpected reply {other:?}"))))),
                Err(RPCError::Unreachable(error)) => Err(StreamingError::Unreachable(error)),
                Err(error) => Err(StreamingError::Network(NetworkError::new(&error))),
            },
        }
    }
}
