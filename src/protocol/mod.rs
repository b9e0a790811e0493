//! weir's binary protocol: framing, the typed frames, and the limits that
//! bound what a peer may send. Pure and synchronous: the server and the
//! client drive it over tokio sockets. docs/PROTOCOL.md is its
//! specification.

pub mod frame;
pub mod wire;

pub use frame::{
    AUTH_TOKEN_BYTES_MAX, BackpressureReason, ChannelInfo, ChannelMetadata, ChannelRetention, ChannelStats, ErrorCode,
    FRAME_HEADER_BYTES, FrameHeader, FrameType, GROUP_NAME_BYTES_MAX, GroupInfo, GroupPartitionInfo, Limits, NodeInfo,
    Notice, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, PartitionInfo, PartitionMetadata, ProducerSequence, Request,
    Response, StartPosition, SubscriptionInfo, SubscriptionStats, deliver_head, fetch_result_head,
};
pub use wire::{DecodeError, NameField};

/// Largest body of a frame other than PUBLISH and PUBLISH_BATCH.
pub const CONTROL_FRAME_BODY_BYTES_MAX: u32 = 4096;
/// What a PUBLISH body may hold beyond the message itself: channel name,
/// producer fields and the message's length fields.
pub const PUBLISH_OVERHEAD_BYTES_MAX: u32 = 1024;
/// Above this body length a frame is not drained but refused with
/// `ProtocolError` and the connection closed: nobody legitimately sends it.
pub const FRAME_BODY_BYTES_HARD_MAX: u32 = 1 << 30;

/// The largest body the server accepts for a frame of `frame_type`.
pub fn body_bytes_max(frame_type: u8, limits: &Limits) -> u32 {
    match frame_type {
        t if t == FrameType::Publish as u8 => limits.max_message_bytes.saturating_add(PUBLISH_OVERHEAD_BYTES_MAX),
        t if t == FrameType::PublishBatch as u8 => limits.max_batch_bytes,
        _ => CONTROL_FRAME_BODY_BYTES_MAX,
    }
}

#[cfg(test)]
mod tests;
