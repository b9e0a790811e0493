//! Frames: the header every frame starts with, and the typed requests
//! (client to server) and responses (server to client) carried in bodies.
//! docs/PROTOCOL.md is the byte-level specification of this module.
//!
//! | pos | size | field            |                                          |
//! |-----|------|------------------|------------------------------------------|
//! | 0   | 4    | `length`         | u32, bytes after this field (≥ 5)        |
//! | 4   | 1    | `frame_type`     | u8, see [`FrameType`]                    |
//! | 5   | 4    | `correlation_id` | u32, chosen by the client, echoed back   |
//! | 9   | ..   | body             | `length - 5` bytes                       |

use bytes::{BufMut, Bytes};

use super::wire::{self, DecodeError, NameField, Reader};
use crate::record::Message;

/// Bytes of the frame header.
pub const FRAME_HEADER_BYTES: usize = 9;
/// Header bytes counted by `length` (type and correlation id).
pub const FRAME_LENGTH_MIN: u32 = 5;
/// Longest client name in HELLO.
pub const CLIENT_NAME_BYTES_MAX: usize = 255;
/// Longest auth token in HELLO.
pub const AUTH_TOKEN_BYTES_MAX: usize = 1024;
/// Longest durable subscription name.
pub const DURABLE_NAME_BYTES_MAX: usize = 255;
/// Longest error message the server sends.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
/// The newest protocol version this build speaks (see docs/PROTOCOL.md:
/// version 2 adds partitions).
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this build still speaks. A version 1
/// connection sees partition 0 of every channel only.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Longest consumer group name.
pub const GROUP_NAME_BYTES_MAX: usize = 255;

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of the body (the `length` field minus 5).
    pub body_len: u32,
    pub frame_type: u8,
    pub correlation_id: u32,
}

impl FrameHeader {
    /// Parses a header. `Err` when `length` is below its minimum.
    ///
    /// # Errors
    /// `OutOfRange` for a `length` under 5.
    pub fn parse(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, DecodeError> {
        let length = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if length < FRAME_LENGTH_MIN {
            return Err(DecodeError::OutOfRange { field: "length", value: length as u64, allowed: ">= 5" });
        }
        Ok(FrameHeader {
            body_len: length - FRAME_LENGTH_MIN,
            frame_type: bytes[4],
            correlation_id: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]),
        })
    }
}

/// Frame type numbers. Never renumbered or reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameType {
    Hello = 0x01,
    Ping = 0x02,
    Publish = 0x03,
    PublishBatch = 0x04,
    Subscribe = 0x05,
    Ack = 0x06,
    Unsubscribe = 0x07,
    Fetch = 0x08,
    CreateChannel = 0x09,
    ListChannels = 0x0A,
    Stats = 0x0B,
    /// Version 2 on.
    AlterChannel = 0x0C,
    /// Version 2 on.
    ListGroups = 0x0D,
    /// Version 2 on.
    DeleteChannel = 0x0E,
    /// Version 2 on.
    Metadata = 0x0F,
    Welcome = 0x81,
    Pong = 0x82,
    PublishAck = 0x83,
    Backpressure = 0x84,
    Error = 0x85,
    Subscribed = 0x86,
    Deliver = 0x87,
    DeliverBatch = 0x88,
    Notice = 0x89,
    Unsubscribed = 0x8A,
    FetchResult = 0x8B,
    ChannelCreated = 0x8C,
    Channels = 0x8D,
    StatsResult = 0x8E,
    /// Version 2 on.
    ChannelAltered = 0x8F,
    /// Version 2 on.
    Groups = 0x90,
    /// Version 2 on.
    ChannelDeleted = 0x91,
    /// Version 2 on.
    MetadataResult = 0x92,
}

/// Wire error codes. Never renumbered or reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A malformed frame; the connection is closed.
    ProtocolError = 1,
    /// HELLO asked for versions this server does not speak; closed.
    UnsupportedVersion = 2,
    /// Wrong or missing auth token; closed.
    Unauthorized = 3,
    /// A message above `max_message_bytes`; the connection stays usable.
    MessageTooLarge = 4,
    /// A publish beyond `max_inflight_publishes` or
    /// `max_inflight_publish_bytes`; not queued.
    InflightLimitExceeded = 5,
    InvalidChannelName = 6,
    UnknownChannel = 7,
    TooManyChannels = 8,
    ChannelExists = 9,
    OffsetOutOfRange = 10,
    /// The broker could not store the message (disk error); nothing stored.
    StorageError = 11,
    TooManySubscriptions = 12,
    UnknownSubscription = 13,
    /// A batch above `max_batch_bytes` or `max_batch_records`.
    BatchTooLarge = 14,
    /// The broker is at `max_connections`; closed.
    TooManyConnections = 15,
    /// The broker is shutting down; the request was not carried out.
    ShuttingDown = 16,
    /// Nothing received for `idle_timeout_ms`; closed.
    IdleTimeout = 17,
    /// A frame other than HELLO before the handshake; closed.
    HandshakeRequired = 18,
    /// The subscription id is already in use on this connection.
    SubscriptionExists = 19,
    /// An idempotent publish whose sequence is older than the dedup window.
    SequenceTooOld = 20,
    /// A field value the server refuses (not malformed), e.g. max_inflight 0.
    InvalidRequest = 21,
    /// An idempotent publish whose sequence is ahead of the producer's next
    /// sequence: an earlier publish was rejected; resend from it.
    OutOfOrderSequence = 22,
    /// The disk is full: nothing was stored. Reads keep working; appends
    /// resume by themselves once space is freed.
    StorageFull = 23,
    /// The partition named does not exist (version 2 on).
    UnknownPartition = 24,
    /// A partition count above `max_partitions` (version 2 on).
    TooManyPartitions = 25,
    /// A consumer group member was silent for `group_session_timeout_ms`
    /// and lost its partitions (version 2 on).
    GroupSessionExpired = 26,
    /// DELETE_CHANNEL of a channel with live subscriptions, without
    /// `force` (version 2 on).
    ChannelInUse = 27,
    /// The partition is replicated (cluster mode) and this node does not
    /// lead it; nothing was stored. The message ends with the leader's
    /// client address when one is known (version 2 on).
    NotLeader = 28,
    /// A publish to a replicated partition was proposed, then the leader
    /// lost leadership (or its group stopped) before the publish was
    /// committed: it may or may not be stored (version 2 on).
    OutcomeUnknown = 29,
    /// An idempotent publish to a replicated partition from a producer the
    /// partition does not remember (none of its publishes in the window)
    /// at a sequence above 0: it may be a retry of something stored long
    /// ago, so nothing was stored; publish as a new producer (version 2 on).
    UnknownProducer = 30,
}

impl ErrorCode {
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        const ALL: [ErrorCode; 30] = [
            ProtocolError,
            UnsupportedVersion,
            Unauthorized,
            MessageTooLarge,
            InflightLimitExceeded,
            InvalidChannelName,
            UnknownChannel,
            TooManyChannels,
            ChannelExists,
            OffsetOutOfRange,
            StorageError,
            TooManySubscriptions,
            UnknownSubscription,
            BatchTooLarge,
            TooManyConnections,
            ShuttingDown,
            IdleTimeout,
            HandshakeRequired,
            SubscriptionExists,
            SequenceTooOld,
            InvalidRequest,
            OutOfOrderSequence,
            StorageFull,
            UnknownPartition,
            TooManyPartitions,
            GroupSessionExpired,
            ChannelInUse,
            NotLeader,
            OutcomeUnknown,
            UnknownProducer,
        ];
        ALL.into_iter().find(|code| *code as u16 == value)
    }
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPosition {
    Earliest,
    Latest,
    Offset(u64),
    /// The first record with a timestamp at or after this (µs since epoch).
    TimeUs(u64),
}

/// Producer identity for idempotent publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProducerSequence {
    pub producer_id: u64,
    /// Sequence of the (first) message; a batch uses `sequence..sequence+n`.
    pub sequence: u64,
}

/// Per-channel retention set by CREATE_CHANNEL; `None` means the broker's
/// default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelRetention {
    pub max_bytes: Option<u64>,
    pub max_age_secs: Option<u64>,
    pub max_messages: Option<u64>,
}

/// A frame a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello {
        version_min: u16,
        version_max: u16,
        client_name: String,
        auth_token: Bytes,
    },
    Ping,
    Publish {
        channel: String,
        /// The partition to store in; `None` lets the broker choose (by
        /// key, else round robin). Version 1 always stores in partition 0.
        partition: Option<u32>,
        producer: Option<ProducerSequence>,
        message: Message,
    },
    PublishBatch {
        channel: String,
        partition: Option<u32>,
        producer: Option<ProducerSequence>,
        messages: Vec<Message>,
    },
    Subscribe {
        subscription_id: u32,
        channel: String,
        /// One partition, or `None` for all of them (version 1: partition 0).
        partition: Option<u32>,
        start: StartPosition,
        durable_name: Option<String>,
        /// A consumer group to join (version 2 on).
        group: Option<String>,
        max_inflight: u32,
    },
    Ack {
        subscription_id: u32,
        partition: u32,
        offset: u64,
    },
    Unsubscribe {
        subscription_id: u32,
    },
    Fetch {
        channel: String,
        partition: u32,
        offset: u64,
        max_messages: u32,
        max_bytes: u32,
    },
    CreateChannel {
        channel: String,
        retention: ChannelRetention,
        /// `None`: the broker's default (version 1 always).
        partitions: Option<u32>,
    },
    ListChannels,
    Stats,
    /// Raises a channel's partition count (version 2 on).
    AlterChannel {
        channel: String,
        partitions: u32,
    },
    /// The consumer groups of one channel, or of all with an empty name
    /// (version 2 on).
    ListGroups {
        channel: String,
    },
    /// Deletes a channel, its files, durable positions and groups (version
    /// 2 on). Refused while it has live subscriptions unless `force`.
    DeleteChannel {
        channel: String,
        force: bool,
    },
    /// Where each partition of one channel (or of all with an empty name)
    /// is led, and the nodes' addresses (version 2 on).
    Metadata {
        channel: String,
    },
}

/// The limits a server advertises in WELCOME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_message_bytes: u32,
    pub max_frame_bytes: u32,
    pub max_batch_bytes: u32,
    pub max_batch_records: u32,
    pub max_inflight_publishes: u32,
    /// Most bytes of unanswered publish frame bodies per connection.
    pub max_inflight_publish_bytes: u32,
    pub max_inflight_deliveries: u32,
    pub max_subscriptions_per_connection: u32,
    pub heartbeat_interval_ms: u32,
    pub idle_timeout_ms: u32,
}

/// Why the server refused a publish without an error: it will likely
/// succeed if retried later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BackpressureReason {
    /// The channel's append queue (`channel_queue_depth`) is full.
    ChannelQueueFull = 1,
    /// The principal is over its publish quota (bytes or messages per
    /// second); `retry_after_ms` is when the publish would fit.
    Quota = 2,
}

/// A notice to a subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The subscription is `lag` messages behind the channel's end.
    Lag { lag: u64, next_offset: u64 },
    /// Retention deleted `skipped` messages it had not read; it resumes at
    /// `resume_offset`.
    Skipped { skipped: u64, resume_offset: u64 },
    /// Version 2, consumer groups: the partition is now this member's, from
    /// `first_offset` (the group's committed position), as of the group's
    /// assignment `generation`.
    Assigned { generation: u64, first_offset: u64 },
    /// Version 2, consumer groups: the partition is no longer this member's;
    /// nothing more of it is delivered. It moves to another member once this
    /// one has acknowledged what it was sent of it (or has gone).
    Revoked { generation: u64 },
}

/// One channel in a CHANNELS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    /// Every partition, in order (version 1: partition 0 only).
    pub partitions: Vec<PartitionInfo>,
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// One partition in a CHANNELS answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    pub start_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    pub segment_count: u64,
}

/// A node in a METADATA_RESULT answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: u64,
    /// Where clients reach it (`HOST:PORT`).
    pub client_addr: String,
}

/// One channel in a METADATA_RESULT answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelMetadata {
    pub name: String,
    /// 1 for a channel that is not replicated.
    pub replication_factor: u8,
    /// By partition number.
    pub partitions: Vec<PartitionMetadata>,
}

/// Where one partition is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionMetadata {
    /// The node that leads it, when known (none during an election).
    pub leader: Option<u64>,
    /// The nodes that hold it.
    pub replicas: Vec<u64>,
}

/// One consumer group in a GROUPS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    pub channel: String,
    pub name: String,
    /// The assignment's generation (0 for a group with no live member).
    pub generation: u64,
    pub member_count: u32,
    pub partitions: Vec<GroupPartitionInfo>,
}

/// One partition of a consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPartitionInfo {
    pub partition: u32,
    /// The member reading it (a number the broker gives each member).
    pub owner: Option<u64>,
    /// The group's committed position: where its next owner starts.
    pub committed: Option<u64>,
    /// The partition's next offset minus the committed position (or its
    /// start, with none).
    pub lag: u64,
}

/// One live subscription's position in one partition, in a CHANNELS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The durable name, or empty for an ephemeral subscription.
    pub durable_name: String,
    /// The consumer group, for a group member's cursor; empty otherwise
    /// (version 2 on).
    pub group: String,
    pub partition: u32,
    pub next_offset: u64,
    pub acked_offset: Option<u64>,
    pub lag: u64,
}

/// One channel in a STATS_RESULT answer: running totals, so that a client
/// can derive rates from two answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelStats {
    pub name: String,
    pub messages_appended: u64,
    pub bytes_appended: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    pub subscriptions: Vec<SubscriptionStats>,
}

/// One live subscription, in one partition, in a STATS_RESULT answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Durable name, or empty.
    pub durable_name: String,
    pub partition: u32,
    pub lag: u64,
    /// Delivered and not yet acknowledged.
    pub inflight: u64,
}

/// A frame the server sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Welcome {
        version: u16,
        server_version: String,
        limits: Limits,
    },
    Pong,
    PublishAck {
        partition: u32,
        first_offset: u64,
        count: u32,
        timestamp_us: u64,
        duplicate: bool,
    },
    Backpressure {
        channel: String,
        reason: BackpressureReason,
        retry_after_ms: u32,
    },
    Error {
        code: u16,
        message: String,
    },
    /// The partitions the subscription reads, each with the offset it
    /// starts at (version 1: exactly one, partition 0).
    Subscribed {
        subscription_id: u32,
        partitions: Vec<(u32, u64)>,
    },
    /// DELIVER (one record) or DELIVER_BATCH: records in the storage
    /// encoding, back to back, each with its own CRC.
    Deliver {
        subscription_id: u32,
        partition: u32,
        count: u32,
        records: Bytes,
    },
    Notice {
        subscription_id: u32,
        partition: u32,
        notice: Notice,
    },
    Unsubscribed {
        subscription_id: u32,
    },
    FetchResult {
        next_offset: u64,
        count: u32,
        records: Bytes,
    },
    ChannelCreated,
    Channels {
        channels: Vec<ChannelInfo>,
    },
    /// Broker-wide counters by name (the list may grow; clients print what
    /// they get), then per-channel figures.
    Stats {
        counters: Vec<(String, u64)>,
        channels: Vec<ChannelStats>,
    },
    ChannelAltered,
    Groups {
        groups: Vec<GroupInfo>,
    },
    ChannelDeleted,
    /// The answer to METADATA (version 2 on).
    Metadata {
        /// The answering node's id (0 outside cluster mode).
        node_id: u64,
        clustered: bool,
        nodes: Vec<NodeInfo>,
        channels: Vec<ChannelMetadata>,
    },
}

/// Appends a frame header for a body of `body_len` bytes.
pub fn put_header(out: &mut Vec<u8>, frame_type: FrameType, correlation_id: u32, body_len: usize) {
    out.put_u32(FRAME_LENGTH_MIN + body_len as u32);
    out.put_u8(frame_type as u8);
    out.put_u32(correlation_id);
}

/// Builds a whole frame from a body writer.
/// The head of a DELIVER or DELIVER_BATCH frame in protocol `version`:
/// everything before its `records_len` bytes of records, which a server
/// sends after it as they are (from memory maps, without copying).
pub fn deliver_head(
    version: u16,
    correlation_id: u32,
    subscription_id: u32,
    partition: u32,
    count: u32,
    records_len: usize,
) -> Vec<u8> {
    let v2 = version >= 2;
    let frame_type = if count == 1 { FrameType::Deliver } else { FrameType::DeliverBatch };
    let fixed = if v2 { 12 } else { 8 };
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + fixed);
    put_header(&mut out, frame_type, correlation_id, fixed + records_len);
    out.put_u32(subscription_id);
    if v2 {
        out.put_u32(partition);
    }
    out.put_u32(count);
    out
}

/// The head of a FETCH_RESULT frame: everything before its `records_len`
/// bytes of records (see [`deliver_head`]).
pub fn fetch_result_head(correlation_id: u32, next_offset: u64, count: u32, records_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + 12);
    put_header(&mut out, FrameType::FetchResult, correlation_id, 12 + records_len);
    out.put_u64(next_offset);
    out.put_u32(count);
    out
}

fn frame(frame_type: FrameType, correlation_id: u32, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_header(&mut out, frame_type, correlation_id, 0);
    body(&mut out);
    let length = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&length.to_be_bytes());
    out
}

fn put_optional(out: &mut Vec<u8>, value: Option<u64>) {
    out.put_u8(value.is_some() as u8);
    out.put_u64(value.unwrap_or(0));
}

fn get_optional(reader: &mut Reader, field: &'static str) -> Result<Option<u64>, DecodeError> {
    let present = reader.u8(field)?;
    let value = reader.u64(field)?;
    match present {
        0 => Ok(None),
        1 => Ok(Some(value)),
        other => Err(DecodeError::OutOfRange { field, value: other as u64, allowed: "0 or 1" }),
    }
}

/// `flags` of PUBLISH and PUBLISH_BATCH: producer fields follow.
const FLAG_PRODUCER: u8 = 1;
/// `flags`, version 2 on: a partition follows the producer fields.
const FLAG_PARTITION: u8 = 2;

fn put_publish_target(out: &mut Vec<u8>, version: u16, partition: Option<u32>, producer: Option<ProducerSequence>) {
    let partition = partition.filter(|_| version >= 2);
    let flags = producer.map_or(0, |_| FLAG_PRODUCER) | partition.map_or(0, |_| FLAG_PARTITION);
    out.put_u8(flags);
    if let Some(p) = producer {
        out.put_u64(p.producer_id);
        out.put_u64(p.sequence);
    }
    if let Some(partition) = partition {
        out.put_u32(partition);
    }
}

fn get_publish_target(
    reader: &mut Reader,
    version: u16,
) -> Result<(Option<u32>, Option<ProducerSequence>), DecodeError> {
    let flags = reader.u8("flags")?;
    let known = if version >= 2 { FLAG_PRODUCER | FLAG_PARTITION } else { FLAG_PRODUCER };
    if flags & !known != 0 {
        let allowed = if version >= 2 { "0..=3" } else { "0 or 1" };
        return Err(DecodeError::OutOfRange { field: "flags", value: flags as u64, allowed });
    }
    let producer = if flags & FLAG_PRODUCER != 0 {
        Some(ProducerSequence { producer_id: reader.u64("producer_id")?, sequence: reader.u64("sequence")? })
    } else {
        None
    };
    let partition = if flags & FLAG_PARTITION != 0 { Some(reader.u32("partition")?) } else { None };
    Ok((partition, producer))
}

fn put_optional_u32(out: &mut Vec<u8>, value: Option<u32>) {
    out.put_u8(value.is_some() as u8);
    out.put_u32(value.unwrap_or(0));
}

fn get_optional_u32(reader: &mut Reader, field: &'static str) -> Result<Option<u32>, DecodeError> {
    let present = reader.u8(field)?;
    let value = reader.u32(field)?;
    match present {
        0 => Ok(None),
        1 => Ok(Some(value)),
        other => Err(DecodeError::OutOfRange { field, value: other as u64, allowed: "0 or 1" }),
    }
}

/// The least bytes a message takes on the wire; bounds a batch's count.
const MESSAGE_WIRE_BYTES_MIN: usize = 8;

impl Request {
    /// Encodes the request as a whole frame in the newest version.
    pub fn encode(&self, correlation_id: u32) -> Vec<u8> {
        self.encode_for(PROTOCOL_VERSION, correlation_id)
    }

    /// Whether every name fits its field (an `sstr` holds at most 255
    /// bytes): checked before encoding, which assumes it.
    ///
    /// # Errors
    /// The field that does not fit and its length.
    pub fn check_lengths(&self) -> Result<(), String> {
        let names: [(&str, Option<&str>); 3] = match self {
            Request::Publish { channel, .. }
            | Request::PublishBatch { channel, .. }
            | Request::Fetch { channel, .. }
            | Request::CreateChannel { channel, .. }
            | Request::AlterChannel { channel, .. }
            | Request::ListGroups { channel }
            | Request::Metadata { channel }
            | Request::DeleteChannel { channel, .. } => [("channel", Some(channel)), ("", None), ("", None)],
            Request::Subscribe { channel, durable_name, group, .. } => {
                [("channel", Some(channel)), ("durable name", durable_name.as_deref()), ("group", group.as_deref())]
            }
            Request::Hello { auth_token, .. } if auth_token.len() > AUTH_TOKEN_BYTES_MAX => {
                return Err(format!("an auth token of {} bytes; at most {AUTH_TOKEN_BYTES_MAX}", auth_token.len()));
            }
            _ => return Ok(()),
        };
        for (field, value) in names {
            if let Some(value) = value
                && value.len() > u8::MAX as usize
            {
                return Err(format!("a {field} of {} bytes; at most 255", value.len()));
            }
        }
        Ok(())
    }

    /// Encodes the request as a whole frame in protocol `version`. Fields
    /// the version does not have are left out (a version 1 frame names no
    /// partition).
    pub fn encode_for(&self, version: u16, correlation_id: u32) -> Vec<u8> {
        match self {
            Request::Hello { version_min, version_max, client_name, auth_token } => {
                frame(FrameType::Hello, correlation_id, |out| {
                    out.put_u16(*version_min);
                    out.put_u16(*version_max);
                    wire::put_string(out, client_name);
                    out.put_u16(auth_token.len() as u16);
                    out.put_slice(auth_token);
                })
            }
            Request::Ping => frame(FrameType::Ping, correlation_id, |_| {}),
            Request::Publish { channel, partition, producer, message } => {
                frame(FrameType::Publish, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    put_publish_target(out, version, *partition, *producer);
                    wire::put_message(out, message);
                })
            }
            Request::PublishBatch { channel, partition, producer, messages } => {
                frame(FrameType::PublishBatch, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    put_publish_target(out, version, *partition, *producer);
                    out.put_u32(messages.len() as u32);
                    for message in messages {
                        wire::put_message(out, message);
                    }
                })
            }
            Request::Subscribe { subscription_id, channel, partition, start, durable_name, group, max_inflight } => {
                frame(FrameType::Subscribe, correlation_id, |out| {
                    out.put_u32(*subscription_id);
                    wire::put_short_string(out, channel);
                    if version >= 2 {
                        put_optional_u32(out, *partition);
                    }
                    let (kind, value) = match start {
                        StartPosition::Earliest => (0, 0),
                        StartPosition::Latest => (1, 0),
                        StartPosition::Offset(offset) => (2, *offset),
                        StartPosition::TimeUs(time) => (3, *time),
                    };
                    out.put_u8(kind);
                    out.put_u64(value);
                    wire::put_short_string(out, durable_name.as_deref().unwrap_or(""));
                    if version >= 2 {
                        wire::put_short_string(out, group.as_deref().unwrap_or(""));
                    }
                    out.put_u32(*max_inflight);
                })
            }
            Request::Ack { subscription_id, partition, offset } => frame(FrameType::Ack, correlation_id, |out| {
                out.put_u32(*subscription_id);
                if version >= 2 {
                    out.put_u32(*partition);
                }
                out.put_u64(*offset);
            }),
            Request::Unsubscribe { subscription_id } => {
                frame(FrameType::Unsubscribe, correlation_id, |out| out.put_u32(*subscription_id))
            }
            Request::Fetch { channel, partition, offset, max_messages, max_bytes } => {
                frame(FrameType::Fetch, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    if version >= 2 {
                        out.put_u32(*partition);
                    }
                    out.put_u64(*offset);
                    out.put_u32(*max_messages);
                    out.put_u32(*max_bytes);
                })
            }
            Request::CreateChannel { channel, retention, partitions } => {
                frame(FrameType::CreateChannel, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    put_optional(out, retention.max_bytes);
                    put_optional(out, retention.max_age_secs);
                    put_optional(out, retention.max_messages);
                    if version >= 2 {
                        out.put_u32(partitions.unwrap_or(0));
                    }
                })
            }
            Request::ListChannels => frame(FrameType::ListChannels, correlation_id, |_| {}),
            Request::Stats => frame(FrameType::Stats, correlation_id, |_| {}),
            Request::AlterChannel { channel, partitions } => frame(FrameType::AlterChannel, correlation_id, |out| {
                wire::put_short_string(out, channel);
                out.put_u32(*partitions);
            }),
            Request::ListGroups { channel } => {
                frame(FrameType::ListGroups, correlation_id, |out| wire::put_short_string(out, channel))
            }
            Request::Metadata { channel } => {
                frame(FrameType::Metadata, correlation_id, |out| wire::put_short_string(out, channel))
            }
            Request::DeleteChannel { channel, force } => frame(FrameType::DeleteChannel, correlation_id, |out| {
                wire::put_short_string(out, channel);
                out.put_u8(u8::from(*force));
            }),
        }
    }

    /// Decodes a request body of the given frame type, in the newest
    /// version.
    ///
    /// # Errors
    /// As [`Request::decode_for`].
    pub fn decode(frame_type: u8, body: Bytes) -> Result<Request, DecodeError> {
        Request::decode_for(PROTOCOL_VERSION, frame_type, body)
    }

    /// Decodes a request body of the given frame type in protocol
    /// `version`.
    ///
    /// # Errors
    /// Any malformed field, an unknown type (or one the version does not
    /// have), or bytes left over.
    pub fn decode_for(version: u16, frame_type: u8, body: Bytes) -> Result<Request, DecodeError> {
        let mut r = Reader::new(body);
        let request = match frame_type {
            0x01 => Request::Hello {
                version_min: r.u16("version_min")?,
                version_max: r.u16("version_max")?,
                client_name: r.string("client_name", CLIENT_NAME_BYTES_MAX, "0..=255")?,
                auth_token: {
                    let len = r.u16_at_most("auth_token_len", AUTH_TOKEN_BYTES_MAX, "0..=1024")?;
                    r.bytes(len, "auth_token")?
                },
            },
            0x02 => Request::Ping,
            0x03 => {
                let channel = r.name(NameField::Channel)?;
                let (partition, producer) = get_publish_target(&mut r, version)?;
                Request::Publish { channel, partition, producer, message: r.message()? }
            }
            0x04 => {
                let channel = r.name(NameField::Channel)?;
                let (partition, producer) = get_publish_target(&mut r, version)?;
                let count = r.u32("record_count")? as usize;
                if count == 0 || count > r.remaining() / MESSAGE_WIRE_BYTES_MIN {
                    return Err(DecodeError::OutOfRange {
                        field: "record_count",
                        value: count as u64,
                        allowed: "1..=(remaining body bytes / 8)",
                    });
                }
                let messages = r.list(count, MESSAGE_WIRE_BYTES_MIN, Reader::message)?;
                Request::PublishBatch { channel, partition, producer, messages }
            }
            0x05 => {
                let subscription_id = r.u32("subscription_id")?;
                let channel = r.name(NameField::Channel)?;
                let partition = if version >= 2 { get_optional_u32(&mut r, "partition")? } else { Some(0) };
                let kind = r.u8("start_kind")?;
                let value = r.u64("start_value")?;
                let start = match kind {
                    0 => StartPosition::Earliest,
                    1 => StartPosition::Latest,
                    2 => StartPosition::Offset(value),
                    3 => StartPosition::TimeUs(value),
                    other => {
                        return Err(DecodeError::OutOfRange {
                            field: "start_kind",
                            value: other as u64,
                            allowed: "0..=3",
                        });
                    }
                };
                let durable_name = Some(r.name(NameField::DurableName)?).filter(|name| !name.is_empty());
                let group =
                    if version >= 2 { Some(r.name(NameField::Group)?).filter(|name| !name.is_empty()) } else { None };
                Request::Subscribe {
                    subscription_id,
                    channel,
                    partition,
                    start,
                    durable_name,
                    group,
                    max_inflight: r.u32("max_inflight")?,
                }
            }
            0x06 => Request::Ack {
                subscription_id: r.u32("subscription_id")?,
                partition: if version >= 2 { r.u32("partition")? } else { 0 },
                offset: r.u64("offset")?,
            },
            0x07 => Request::Unsubscribe { subscription_id: r.u32("subscription_id")? },
            0x08 => Request::Fetch {
                channel: r.name(NameField::Channel)?,
                partition: if version >= 2 { r.u32("partition")? } else { 0 },
                offset: r.u64("offset")?,
                max_messages: r.u32("max_messages")?,
                max_bytes: r.u32("max_bytes")?,
            },
            0x09 => Request::CreateChannel {
                channel: r.name(NameField::Channel)?,
                retention: ChannelRetention {
                    max_bytes: get_optional(&mut r, "retention_max_bytes")?,
                    max_age_secs: get_optional(&mut r, "retention_max_age_secs")?,
                    max_messages: get_optional(&mut r, "retention_max_messages")?,
                },
                partitions: if version >= 2 { Some(r.u32("partitions")?).filter(|&count| count != 0) } else { None },
            },
            0x0A => Request::ListChannels,
            0x0B => Request::Stats,
            0x0C if version >= 2 => {
                Request::AlterChannel { channel: r.name(NameField::Channel)?, partitions: r.u32("partitions")? }
            }
            0x0D if version >= 2 => Request::ListGroups { channel: r.name(NameField::Channel)? },
            0x0F if version >= 2 => Request::Metadata { channel: r.name(NameField::Channel)? },
            0x0E if version >= 2 => Request::DeleteChannel {
                channel: r.name(NameField::Channel)?,
                force: match r.u8("force")? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(DecodeError::OutOfRange { field: "force", value: other as u64, allowed: "0 or 1" });
                    }
                },
            },
            other => return Err(DecodeError::UnknownFrameType { frame_type: other }),
        };
        r.finish()?;
        Ok(request)
    }
}

impl Response {
    /// Encodes the response as a whole frame in the newest version.
    pub fn encode(&self, correlation_id: u32) -> Vec<u8> {
        self.encode_for(PROTOCOL_VERSION, correlation_id)
    }

    /// Encodes the response as a whole frame in protocol `version`. DELIVER
    /// and FETCH_RESULT bodies end with record bytes that
    /// [`Response::encode_head`] leaves out, so a server can send them
    /// without copying.
    pub fn encode_for(&self, version: u16, correlation_id: u32) -> Vec<u8> {
        let mut out = self.encode_head(version, correlation_id);
        if let Response::Deliver { records, .. } | Response::FetchResult { records, .. } = self {
            out.extend_from_slice(records);
        }
        out
    }

    /// Encodes the frame in protocol `version`, except the record bytes at
    /// the end of DELIVER and FETCH_RESULT (whose length the header already
    /// counts). What version 1 has no field for is left out: a partition,
    /// and every partition but 0 of a channel listing.
    pub fn encode_head(&self, version: u16, correlation_id: u32) -> Vec<u8> {
        let v2 = version >= 2;
        match self {
            Response::Welcome { version, server_version, limits } => frame(FrameType::Welcome, correlation_id, |out| {
                out.put_u16(*version);
                wire::put_string(out, server_version);
                for value in [
                    limits.max_message_bytes,
                    limits.max_frame_bytes,
                    limits.max_batch_bytes,
                    limits.max_batch_records,
                    limits.max_inflight_publishes,
                    limits.max_inflight_publish_bytes,
                    limits.max_inflight_deliveries,
                    limits.max_subscriptions_per_connection,
                    limits.heartbeat_interval_ms,
                    limits.idle_timeout_ms,
                ] {
                    out.put_u32(value);
                }
            }),
            Response::Pong => frame(FrameType::Pong, correlation_id, |_| {}),
            Response::PublishAck { partition, first_offset, count, timestamp_us, duplicate } => {
                frame(FrameType::PublishAck, correlation_id, |out| {
                    if v2 {
                        out.put_u32(*partition);
                    }
                    out.put_u64(*first_offset);
                    out.put_u32(*count);
                    out.put_u64(*timestamp_us);
                    out.put_u8(*duplicate as u8);
                })
            }
            Response::Backpressure { channel, reason, retry_after_ms } => {
                frame(FrameType::Backpressure, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    out.put_u8(*reason as u8);
                    out.put_u32(*retry_after_ms);
                })
            }
            Response::Error { code, message } => frame(FrameType::Error, correlation_id, |out| {
                out.put_u16(*code);
                let mut end = message.len().min(ERROR_MESSAGE_BYTES_MAX);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                wire::put_string(out, &message[..end]);
            }),
            Response::Subscribed { subscription_id, partitions } => {
                frame(FrameType::Subscribed, correlation_id, |out| {
                    out.put_u32(*subscription_id);
                    if v2 {
                        out.put_u32(partitions.len() as u32);
                        for (partition, first_offset) in partitions {
                            out.put_u32(*partition);
                            out.put_u64(*first_offset);
                        }
                    } else {
                        // A version 1 subscription reads partition 0 alone.
                        out.put_u64(partitions.first().map_or(0, |&(_, first_offset)| first_offset));
                    }
                })
            }
            Response::Deliver { subscription_id, partition, count, records } => {
                deliver_head(version, correlation_id, *subscription_id, *partition, *count, records.len())
            }
            Response::Notice { subscription_id, partition, notice } => {
                frame(FrameType::Notice, correlation_id, |out| {
                    out.put_u32(*subscription_id);
                    if v2 {
                        out.put_u32(*partition);
                    }
                    let (kind, a, b) = match notice {
                        Notice::Lag { lag, next_offset } => (1, *lag, *next_offset),
                        Notice::Skipped { skipped, resume_offset } => (2, *skipped, *resume_offset),
                        Notice::Assigned { generation, first_offset } => (3, *generation, *first_offset),
                        Notice::Revoked { generation } => (4, *generation, 0),
                    };
                    out.put_u8(kind);
                    out.put_u64(a);
                    out.put_u64(b);
                })
            }
            Response::Unsubscribed { subscription_id } => {
                frame(FrameType::Unsubscribed, correlation_id, |out| out.put_u32(*subscription_id))
            }
            Response::FetchResult { next_offset, count, records } => {
                fetch_result_head(correlation_id, *next_offset, *count, records.len())
            }
            Response::ChannelCreated => frame(FrameType::ChannelCreated, correlation_id, |_| {}),
            Response::ChannelAltered => frame(FrameType::ChannelAltered, correlation_id, |_| {}),
            Response::ChannelDeleted => frame(FrameType::ChannelDeleted, correlation_id, |_| {}),
            Response::Metadata { node_id, clustered, nodes, channels } => {
                frame(FrameType::MetadataResult, correlation_id, |out| {
                    out.put_u64(*node_id);
                    out.put_u8(u8::from(*clustered));
                    out.put_u16(nodes.len() as u16);
                    for node in nodes {
                        out.put_u64(node.node_id);
                        wire::put_short_string(out, &node.client_addr);
                    }
                    out.put_u32(channels.len() as u32);
                    for channel in channels {
                        wire::put_short_string(out, &channel.name);
                        out.put_u8(channel.replication_factor);
                        out.put_u32(channel.partitions.len() as u32);
                        for partition in &channel.partitions {
                            put_optional(out, partition.leader);
                            out.put_u8(partition.replicas.len() as u8);
                            for replica in &partition.replicas {
                                out.put_u64(*replica);
                            }
                        }
                    }
                })
            }
            Response::Groups { groups } => frame(FrameType::Groups, correlation_id, |out| {
                out.put_u32(groups.len() as u32);
                for group in groups {
                    wire::put_short_string(out, &group.channel);
                    wire::put_short_string(out, &group.name);
                    out.put_u64(group.generation);
                    out.put_u32(group.member_count);
                    out.put_u32(group.partitions.len() as u32);
                    for partition in &group.partitions {
                        out.put_u32(partition.partition);
                        put_optional(out, partition.owner);
                        put_optional(out, partition.committed);
                        out.put_u64(partition.lag);
                    }
                }
            }),
            Response::Stats { counters, channels } => frame(FrameType::StatsResult, correlation_id, |out| {
                out.put_u16(counters.len() as u16);
                for (name, value) in counters {
                    wire::put_short_string(out, name);
                    out.put_u64(*value);
                }
                out.put_u32(channels.len() as u32);
                for channel in channels {
                    wire::put_short_string(out, &channel.name);
                    out.put_u64(channel.messages_appended);
                    out.put_u64(channel.bytes_appended);
                    out.put_u64(channel.next_offset);
                    out.put_u64(channel.size_bytes);
                    let subscriptions: Vec<&SubscriptionStats> =
                        channel.subscriptions.iter().filter(|s| v2 || s.partition == 0).collect();
                    out.put_u32(subscriptions.len() as u32);
                    for subscription in subscriptions {
                        wire::put_short_string(out, &subscription.durable_name);
                        if v2 {
                            out.put_u32(subscription.partition);
                        }
                        out.put_u64(subscription.lag);
                        out.put_u64(subscription.inflight);
                    }
                }
            }),
            Response::Channels { channels } => frame(FrameType::Channels, correlation_id, |out| {
                out.put_u32(channels.len() as u32);
                for channel in channels {
                    wire::put_short_string(out, &channel.name);
                    let partitions = if v2 {
                        &channel.partitions[..]
                    } else {
                        &channel.partitions[..1.min(channel.partitions.len())]
                    };
                    if v2 {
                        out.put_u32(partitions.len() as u32);
                    }
                    for partition in partitions {
                        out.put_u64(partition.start_offset);
                        out.put_u64(partition.next_offset);
                        out.put_u64(partition.size_bytes);
                        out.put_u64(partition.segment_count);
                    }
                    if !v2 && partitions.is_empty() {
                        out.put_slice(&[0; 32]);
                    }
                    let subscriptions: Vec<&SubscriptionInfo> =
                        channel.subscriptions.iter().filter(|s| v2 || s.partition == 0).collect();
                    out.put_u32(subscriptions.len() as u32);
                    for subscription in subscriptions {
                        wire::put_short_string(out, &subscription.durable_name);
                        if v2 {
                            wire::put_short_string(out, &subscription.group);
                            out.put_u32(subscription.partition);
                        }
                        out.put_u64(subscription.next_offset);
                        put_optional(out, subscription.acked_offset);
                        out.put_u64(subscription.lag);
                    }
                }
            }),
        }
    }

    /// Decodes a response body of the given frame type, in the newest
    /// version.
    ///
    /// # Errors
    /// As [`Response::decode_for`].
    pub fn decode(frame_type: u8, body: Bytes) -> Result<Response, DecodeError> {
        Response::decode_for(PROTOCOL_VERSION, frame_type, body)
    }

    /// Decodes a response body of the given frame type in protocol
    /// `version`.
    ///
    /// # Errors
    /// Any malformed field, an unknown type, or bytes left over.
    pub fn decode_for(version: u16, frame_type: u8, body: Bytes) -> Result<Response, DecodeError> {
        let v2 = version >= 2;
        let mut r = Reader::new(body);
        let response = match frame_type {
            0x81 => Response::Welcome {
                version: r.u16("version")?,
                server_version: r.string("server_version", 255, "0..=255")?,
                limits: Limits {
                    max_message_bytes: r.u32("max_message_bytes")?,
                    max_frame_bytes: r.u32("max_frame_bytes")?,
                    max_batch_bytes: r.u32("max_batch_bytes")?,
                    max_batch_records: r.u32("max_batch_records")?,
                    max_inflight_publishes: r.u32("max_inflight_publishes")?,
                    max_inflight_publish_bytes: r.u32("max_inflight_publish_bytes")?,
                    max_inflight_deliveries: r.u32("max_inflight_deliveries")?,
                    max_subscriptions_per_connection: r.u32("max_subscriptions_per_connection")?,
                    heartbeat_interval_ms: r.u32("heartbeat_interval_ms")?,
                    idle_timeout_ms: r.u32("idle_timeout_ms")?,
                },
            },
            0x82 => Response::Pong,
            0x83 => Response::PublishAck {
                partition: if v2 { r.u32("partition")? } else { 0 },
                first_offset: r.u64("first_offset")?,
                count: r.u32("count")?,
                timestamp_us: r.u64("timestamp_us")?,
                duplicate: r.u8("duplicate")? != 0,
            },
            0x84 => Response::Backpressure {
                channel: r.short_string("channel")?,
                reason: match r.u8("reason")? {
                    1 => BackpressureReason::ChannelQueueFull,
                    2 => BackpressureReason::Quota,
                    other => {
                        return Err(DecodeError::OutOfRange { field: "reason", value: other as u64, allowed: "1..=2" });
                    }
                },
                retry_after_ms: r.u32("retry_after_ms")?,
            },
            0x85 => Response::Error {
                code: r.u16("code")?,
                message: r.string("message", ERROR_MESSAGE_BYTES_MAX, "0..=1024")?,
            },
            0x86 => {
                let subscription_id = r.u32("subscription_id")?;
                let partitions = if v2 {
                    let count = r.u32("partition_count")? as usize;
                    r.list(count, 12, |r| Ok((r.u32("partition")?, r.u64("first_offset")?)))?
                } else {
                    vec![(0, r.u64("first_offset")?)]
                };
                Response::Subscribed { subscription_id, partitions }
            }
            0x87 | 0x88 => {
                let subscription_id = r.u32("subscription_id")?;
                let partition = if v2 { r.u32("partition")? } else { 0 };
                let count = r.u32("count")?;
                Response::Deliver { subscription_id, partition, count, records: r.rest() }
            }
            0x89 => {
                let subscription_id = r.u32("subscription_id")?;
                let partition = if v2 { r.u32("partition")? } else { 0 };
                let kind = r.u8("kind")?;
                let (a, b) = (r.u64("value_a")?, r.u64("value_b")?);
                let notice = match kind {
                    1 => Notice::Lag { lag: a, next_offset: b },
                    2 => Notice::Skipped { skipped: a, resume_offset: b },
                    3 if v2 => Notice::Assigned { generation: a, first_offset: b },
                    4 if v2 => Notice::Revoked { generation: a },
                    other => {
                        let allowed = if v2 { "1..=4" } else { "1..=2" };
                        return Err(DecodeError::OutOfRange { field: "kind", value: other as u64, allowed });
                    }
                };
                Response::Notice { subscription_id, partition, notice }
            }
            0x8A => Response::Unsubscribed { subscription_id: r.u32("subscription_id")? },
            0x8B => {
                let next_offset = r.u64("next_offset")?;
                let count = r.u32("count")?;
                Response::FetchResult { next_offset, count, records: r.rest() }
            }
            0x8C => Response::ChannelCreated,
            0x8F if v2 => Response::ChannelAltered,
            0x91 if v2 => Response::ChannelDeleted,
            0x92 if v2 => {
                let node_id = r.u64("node_id")?;
                let clustered = match r.u8("clustered")? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(DecodeError::OutOfRange {
                            field: "clustered",
                            value: other as u64,
                            allowed: "0 or 1",
                        });
                    }
                };
                let node_count = r.u16("node_count")? as usize;
                let nodes = r.list(node_count, 9, |r| {
                    Ok(NodeInfo { node_id: r.u64("node_id")?, client_addr: r.short_string("client_addr")? })
                })?;
                let channel_count = r.u32("channel_count")? as usize;
                let channels = r.list(channel_count, 6, |r| {
                    Ok(ChannelMetadata {
                        name: r.short_string("channel")?,
                        replication_factor: r.u8("replication_factor")?,
                        partitions: {
                            let count = r.u32("partition_count")? as usize;
                            r.list(count, 10, |r| {
                                let leader = get_optional(r, "leader")?;
                                let replica_count = r.u8("replica_count")? as usize;
                                let replicas = r.list(replica_count, 8, |r| r.u64("replica"))?;
                                Ok(PartitionMetadata { leader, replicas })
                            })?
                        },
                    })
                })?;
                Response::Metadata { node_id, clustered, nodes, channels }
            }
            0x90 if v2 => {
                let count = r.u32("group_count")? as usize;
                let groups = r.list(count, 22, |r| {
                    Ok(GroupInfo {
                        channel: r.short_string("channel")?,
                        name: r.short_string("name")?,
                        generation: r.u64("generation")?,
                        member_count: r.u32("member_count")?,
                        partitions: {
                            let count = r.u32("partition_count")? as usize;
                            r.list(count, 30, |r| {
                                Ok(GroupPartitionInfo {
                                    partition: r.u32("partition")?,
                                    owner: get_optional(r, "owner")?,
                                    committed: get_optional(r, "committed")?,
                                    lag: r.u64("lag")?,
                                })
                            })?
                        },
                    })
                })?;
                Response::Groups { groups }
            }
            0x8E => {
                let counter_count = r.u16("counter_count")? as usize;
                let counters =
                    r.list(counter_count, 9, |r| Ok((r.short_string("counter_name")?, r.u64("counter_value")?)))?;
                let channel_count = r.u32("channel_count")? as usize;
                let channels = r.list(channel_count, 37, |r| {
                    Ok(ChannelStats {
                        name: r.short_string("name")?,
                        messages_appended: r.u64("messages_appended")?,
                        bytes_appended: r.u64("bytes_appended")?,
                        next_offset: r.u64("next_offset")?,
                        size_bytes: r.u64("size_bytes")?,
                        subscriptions: {
                            let count = r.u32("subscription_count")? as usize;
                            r.list(count, 17, |r| {
                                Ok(SubscriptionStats {
                                    durable_name: r.short_string("durable_name")?,
                                    partition: if v2 { r.u32("partition")? } else { 0 },
                                    lag: r.u64("lag")?,
                                    inflight: r.u64("inflight")?,
                                })
                            })?
                        },
                    })
                })?;
                Response::Stats { counters, channels }
            }
            0x8D => {
                let count = r.u32("channel_count")? as usize;
                let channels = r.list(count, 37, |r| {
                    let get_partition = |r: &mut Reader| {
                        Ok(PartitionInfo {
                            start_offset: r.u64("start_offset")?,
                            next_offset: r.u64("next_offset")?,
                            size_bytes: r.u64("size_bytes")?,
                            segment_count: r.u64("segment_count")?,
                        })
                    };
                    Ok(ChannelInfo {
                        name: r.short_string("name")?,
                        partitions: if v2 {
                            let count = r.u32("partition_count")? as usize;
                            r.list(count, 32, get_partition)?
                        } else {
                            vec![get_partition(r)?]
                        },
                        subscriptions: {
                            let count = r.u32("subscription_count")? as usize;
                            r.list(count, 26, |r| {
                                Ok(SubscriptionInfo {
                                    durable_name: r.short_string("durable_name")?,
                                    group: if v2 { r.short_string("group")? } else { String::new() },
                                    partition: if v2 { r.u32("partition")? } else { 0 },
                                    next_offset: r.u64("next_offset")?,
                                    acked_offset: get_optional(r, "acked_offset")?,
                                    lag: r.u64("lag")?,
                                })
                            })?
                        },
                    })
                })?;
                Response::Channels { channels }
            }
            other => return Err(DecodeError::UnknownFrameType { frame_type: other }),
        };
        r.finish()?;
        Ok(response)
    }
}
