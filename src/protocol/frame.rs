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
/// The protocol versions this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

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
}

impl ErrorCode {
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        const ALL: [ErrorCode; 23] = [
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
        producer: Option<ProducerSequence>,
        message: Message,
    },
    PublishBatch {
        channel: String,
        producer: Option<ProducerSequence>,
        messages: Vec<Message>,
    },
    Subscribe {
        subscription_id: u32,
        channel: String,
        start: StartPosition,
        durable_name: Option<String>,
        max_inflight: u32,
    },
    Ack {
        subscription_id: u32,
        offset: u64,
    },
    Unsubscribe {
        subscription_id: u32,
    },
    Fetch {
        channel: String,
        offset: u64,
        max_messages: u32,
        max_bytes: u32,
    },
    CreateChannel {
        channel: String,
        retention: ChannelRetention,
    },
    ListChannels,
    Stats,
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
}

/// A notice to a subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The subscription is `lag` messages behind the channel's end.
    Lag { lag: u64, next_offset: u64 },
    /// Retention deleted `skipped` messages it had not read; it resumes at
    /// `resume_offset`.
    Skipped { skipped: u64, resume_offset: u64 },
}

/// One channel in a CHANNELS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    pub start_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    pub segment_count: u64,
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// One live subscription in a CHANNELS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The durable name, or empty for an ephemeral subscription.
    pub durable_name: String,
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

/// One live subscription in a STATS_RESULT answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Durable name, or empty.
    pub durable_name: String,
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
    Subscribed {
        subscription_id: u32,
        first_offset: u64,
    },
    /// DELIVER (one record) or DELIVER_BATCH: records in the storage
    /// encoding, back to back, each with its own CRC.
    Deliver {
        subscription_id: u32,
        count: u32,
        records: Bytes,
    },
    Notice {
        subscription_id: u32,
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
}

/// Appends a frame header for a body of `body_len` bytes.
pub fn put_header(out: &mut Vec<u8>, frame_type: FrameType, correlation_id: u32, body_len: usize) {
    out.put_u32(FRAME_LENGTH_MIN + body_len as u32);
    out.put_u8(frame_type as u8);
    out.put_u32(correlation_id);
}

/// Builds a whole frame from a body writer.
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

fn put_producer(out: &mut Vec<u8>, producer: Option<ProducerSequence>) {
    match producer {
        Some(p) => {
            out.put_u8(1);
            out.put_u64(p.producer_id);
            out.put_u64(p.sequence);
        }
        None => out.put_u8(0),
    }
}

fn get_producer(reader: &mut Reader) -> Result<Option<ProducerSequence>, DecodeError> {
    match reader.u8("flags")? {
        0 => Ok(None),
        1 => Ok(Some(ProducerSequence { producer_id: reader.u64("producer_id")?, sequence: reader.u64("sequence")? })),
        other => Err(DecodeError::OutOfRange { field: "flags", value: other as u64, allowed: "0 or 1" }),
    }
}

/// The least bytes a message takes on the wire; bounds a batch's count.
const MESSAGE_WIRE_BYTES_MIN: usize = 8;

impl Request {
    /// Encodes the request as a whole frame.
    pub fn encode(&self, correlation_id: u32) -> Vec<u8> {
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
            Request::Publish { channel, producer, message } => frame(FrameType::Publish, correlation_id, |out| {
                wire::put_short_string(out, channel);
                put_producer(out, *producer);
                wire::put_message(out, message);
            }),
            Request::PublishBatch { channel, producer, messages } => {
                frame(FrameType::PublishBatch, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    put_producer(out, *producer);
                    out.put_u32(messages.len() as u32);
                    for message in messages {
                        wire::put_message(out, message);
                    }
                })
            }
            Request::Subscribe { subscription_id, channel, start, durable_name, max_inflight } => {
                frame(FrameType::Subscribe, correlation_id, |out| {
                    out.put_u32(*subscription_id);
                    wire::put_short_string(out, channel);
                    let (kind, value) = match start {
                        StartPosition::Earliest => (0, 0),
                        StartPosition::Latest => (1, 0),
                        StartPosition::Offset(offset) => (2, *offset),
                        StartPosition::TimeUs(time) => (3, *time),
                    };
                    out.put_u8(kind);
                    out.put_u64(value);
                    wire::put_short_string(out, durable_name.as_deref().unwrap_or(""));
                    out.put_u32(*max_inflight);
                })
            }
            Request::Ack { subscription_id, offset } => frame(FrameType::Ack, correlation_id, |out| {
                out.put_u32(*subscription_id);
                out.put_u64(*offset);
            }),
            Request::Unsubscribe { subscription_id } => {
                frame(FrameType::Unsubscribe, correlation_id, |out| out.put_u32(*subscription_id))
            }
            Request::Fetch { channel, offset, max_messages, max_bytes } => {
                frame(FrameType::Fetch, correlation_id, |out| {
                    wire::put_short_string(out, channel);
                    out.put_u64(*offset);
                    out.put_u32(*max_messages);
                    out.put_u32(*max_bytes);
                })
            }
            Request::CreateChannel { channel, retention } => frame(FrameType::CreateChannel, correlation_id, |out| {
                wire::put_short_string(out, channel);
                put_optional(out, retention.max_bytes);
                put_optional(out, retention.max_age_secs);
                put_optional(out, retention.max_messages);
            }),
            Request::ListChannels => frame(FrameType::ListChannels, correlation_id, |_| {}),
            Request::Stats => frame(FrameType::Stats, correlation_id, |_| {}),
        }
    }

    /// Decodes a request body of the given frame type.
    ///
    /// # Errors
    /// Any malformed field, an unknown type, or bytes left over.
    pub fn decode(frame_type: u8, body: Bytes) -> Result<Request, DecodeError> {
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
            0x03 => Request::Publish {
                channel: r.name(NameField::Channel)?,
                producer: get_producer(&mut r)?,
                message: r.message()?,
            },
            0x04 => {
                let channel = r.name(NameField::Channel)?;
                let producer = get_producer(&mut r)?;
                let count = r.u32("record_count")? as usize;
                if count == 0 || count > r.remaining() / MESSAGE_WIRE_BYTES_MIN {
                    return Err(DecodeError::OutOfRange {
                        field: "record_count",
                        value: count as u64,
                        allowed: "1..=(remaining body bytes / 8)",
                    });
                }
                let messages = r.list(count, MESSAGE_WIRE_BYTES_MIN, Reader::message)?;
                Request::PublishBatch { channel, producer, messages }
            }
            0x05 => Request::Subscribe {
                subscription_id: r.u32("subscription_id")?,
                channel: r.name(NameField::Channel)?,
                start: {
                    let kind = r.u8("start_kind")?;
                    let value = r.u64("start_value")?;
                    match kind {
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
                    }
                },
                durable_name: Some(r.name(NameField::DurableName)?).filter(|name| !name.is_empty()),
                max_inflight: r.u32("max_inflight")?,
            },
            0x06 => Request::Ack { subscription_id: r.u32("subscription_id")?, offset: r.u64("offset")? },
            0x07 => Request::Unsubscribe { subscription_id: r.u32("subscription_id")? },
            0x08 => Request::Fetch {
                channel: r.name(NameField::Channel)?,
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
            },
            0x0A => Request::ListChannels,
            0x0B => Request::Stats,
            other => return Err(DecodeError::UnknownFrameType { frame_type: other }),
        };
        r.finish()?;
        Ok(request)
    }
}

impl Response {
    /// Encodes the response as a whole frame. DELIVER and FETCH_RESULT
    /// bodies end with record bytes that [`Response::encode_head`] leaves
    /// out, so a server can send them without copying.
    pub fn encode(&self, correlation_id: u32) -> Vec<u8> {
        let mut out = self.encode_head(correlation_id);
        if let Response::Deliver { records, .. } | Response::FetchResult { records, .. } = self {
            out.extend_from_slice(records);
        }
        out
    }

    /// Encodes the frame, except the record bytes at the end of DELIVER and
    /// FETCH_RESULT (whose length the header already counts).
    pub fn encode_head(&self, correlation_id: u32) -> Vec<u8> {
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
            Response::PublishAck { first_offset, count, timestamp_us, duplicate } => {
                frame(FrameType::PublishAck, correlation_id, |out| {
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
            Response::Subscribed { subscription_id, first_offset } => {
                frame(FrameType::Subscribed, correlation_id, |out| {
                    out.put_u32(*subscription_id);
                    out.put_u64(*first_offset);
                })
            }
            Response::Deliver { subscription_id, count, records } => {
                let frame_type = if *count == 1 { FrameType::Deliver } else { FrameType::DeliverBatch };
                let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + 8);
                put_header(&mut out, frame_type, correlation_id, 8 + records.len());
                out.put_u32(*subscription_id);
                out.put_u32(*count);
                out
            }
            Response::Notice { subscription_id, notice } => frame(FrameType::Notice, correlation_id, |out| {
                out.put_u32(*subscription_id);
                let (kind, a, b) = match notice {
                    Notice::Lag { lag, next_offset } => (1, *lag, *next_offset),
                    Notice::Skipped { skipped, resume_offset } => (2, *skipped, *resume_offset),
                };
                out.put_u8(kind);
                out.put_u64(a);
                out.put_u64(b);
            }),
            Response::Unsubscribed { subscription_id } => {
                frame(FrameType::Unsubscribed, correlation_id, |out| out.put_u32(*subscription_id))
            }
            Response::FetchResult { next_offset, count, records } => {
                let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + 12);
                put_header(&mut out, FrameType::FetchResult, correlation_id, 12 + records.len());
                out.put_u64(*next_offset);
                out.put_u32(*count);
                out
            }
            Response::ChannelCreated => frame(FrameType::ChannelCreated, correlation_id, |_| {}),
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
                    out.put_u32(channel.subscriptions.len() as u32);
                    for subscription in &channel.subscriptions {
                        wire::put_short_string(out, &subscription.durable_name);
                        out.put_u64(subscription.lag);
                        out.put_u64(subscription.inflight);
                    }
                }
            }),
            Response::Channels { channels } => frame(FrameType::Channels, correlation_id, |out| {
                out.put_u32(channels.len() as u32);
                for channel in channels {
                    wire::put_short_string(out, &channel.name);
                    out.put_u64(channel.start_offset);
                    out.put_u64(channel.next_offset);
                    out.put_u64(channel.size_bytes);
                    out.put_u64(channel.segment_count);
                    out.put_u32(channel.subscriptions.len() as u32);
                    for subscription in &channel.subscriptions {
                        wire::put_short_string(out, &subscription.durable_name);
                        out.put_u64(subscription.next_offset);
                        put_optional(out, subscription.acked_offset);
                        out.put_u64(subscription.lag);
                    }
                }
            }),
        }
    }

    /// Decodes a response body of the given frame type.
    ///
    /// # Errors
    /// Any malformed field, an unknown type, or bytes left over.
    pub fn decode(frame_type: u8, body: Bytes) -> Result<Response, DecodeError> {
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
                first_offset: r.u64("first_offset")?,
                count: r.u32("count")?,
                timestamp_us: r.u64("timestamp_us")?,
                duplicate: r.u8("duplicate")? != 0,
            },
            0x84 => Response::Backpressure {
                channel: r.short_string("channel")?,
                reason: match r.u8("reason")? {
                    1 => BackpressureReason::ChannelQueueFull,
                    other => {
                        return Err(DecodeError::OutOfRange { field: "reason", value: other as u64, allowed: "1" });
                    }
                },
                retry_after_ms: r.u32("retry_after_ms")?,
            },
            0x85 => Response::Error {
                code: r.u16("code")?,
                message: r.string("message", ERROR_MESSAGE_BYTES_MAX, "0..=1024")?,
            },
            0x86 => Response::Subscribed {
                subscription_id: r.u32("subscription_id")?,
                first_offset: r.u64("first_offset")?,
            },
            0x87 | 0x88 => {
                let subscription_id = r.u32("subscription_id")?;
                let count = r.u32("count")?;
                Response::Deliver { subscription_id, count, records: r.rest() }
            }
            0x89 => {
                let subscription_id = r.u32("subscription_id")?;
                let kind = r.u8("kind")?;
                let (a, b) = (r.u64("value_a")?, r.u64("value_b")?);
                let notice = match kind {
                    1 => Notice::Lag { lag: a, next_offset: b },
                    2 => Notice::Skipped { skipped: a, resume_offset: b },
                    other => {
                        return Err(DecodeError::OutOfRange { field: "kind", value: other as u64, allowed: "1..=2" });
                    }
                };
                Response::Notice { subscription_id, notice }
            }
            0x8A => Response::Unsubscribed { subscription_id: r.u32("subscription_id")? },
            0x8B => {
                let next_offset = r.u64("next_offset")?;
                let count = r.u32("count")?;
                Response::FetchResult { next_offset, count, records: r.rest() }
            }
            0x8C => Response::ChannelCreated,
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
                    Ok(ChannelInfo {
                        name: r.short_string("name")?,
                        start_offset: r.u64("start_offset")?,
                        next_offset: r.u64("next_offset")?,
                        size_bytes: r.u64("size_bytes")?,
                        segment_count: r.u64("segment_count")?,
                        subscriptions: {
                            let count = r.u32("subscription_count")? as usize;
                            r.list(count, 26, |r| {
                                Ok(SubscriptionInfo {
                                    durable_name: r.short_string("durable_name")?,
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
