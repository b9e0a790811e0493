//! The frame decoder, fed a byte stream as it comes off a socket.
//!
//! Input: one selector byte, then frames back to back. Selector bit 0 picks
//! protocol version 1 (else 2); bit 1 decodes responses as the client does
//! (else requests as the server does); bit 2 uses small limits, so that the
//! size checks trip on short inputs. Each frame goes through the steps
//! `server::connection::read_frame` and `client::connection::read_response`
//! take: `FrameHeader::parse`, the body limit, `publish_batch_record_count`,
//! then `Request::decode_for` or `Response::decode_for`; the records of a
//! DELIVER or FETCH_RESULT go through `RecordIter`, as the client reads them.
//!
//! Errors are fine. What fails: a panic, and a frame that decodes but whose
//! re-encoding decodes to something else (`encode_for` and `decode_for`
//! must agree, or a peer would see other values than were sent).

use bytes::Bytes;
use weir::protocol::wire::publish_batch_record_count;
use weir::protocol::{
    FRAME_BODY_BYTES_HARD_MAX, FRAME_HEADER_BYTES, FrameHeader, FrameType, Limits, PROTOCOL_VERSION,
    PROTOCOL_VERSION_MIN, Request, Response, body_bytes_max,
};
use weir::record::RecordIter;

/// The limits of a broker run with the default broker.toml.
const DEFAULT_LIMITS: Limits = Limits {
    max_message_bytes: 1024 * 1024,
    max_frame_bytes: 8 * 1024 * 1024,
    max_batch_bytes: 8 * 1024 * 1024,
    max_batch_records: 10_000,
    max_inflight_publishes: 1024,
    max_inflight_publish_bytes: 64 * 1024 * 1024,
    max_inflight_deliveries: 4096,
    max_subscriptions_per_connection: 64,
    heartbeat_interval_ms: 10_000,
    idle_timeout_ms: 30_000,
};

/// Limits small enough for a fuzz input to cross them.
const SMALL_LIMITS: Limits = Limits {
    max_message_bytes: 64,
    max_frame_bytes: 1088,
    max_batch_bytes: 256,
    max_batch_records: 4,
    ..DEFAULT_LIMITS
};

/// Runs the frame decoder over `data` (the layout is in the module docs).
///
/// # Panics
/// When a property does not hold: that is the finding.
pub fn check(data: &[u8]) {
    let Some((&selector, mut stream)) = data.split_first() else { return };
    let version = if selector & 1 != 0 { PROTOCOL_VERSION_MIN } else { PROTOCOL_VERSION };
    let from_server = selector & 2 != 0;
    let limits = if selector & 4 != 0 { SMALL_LIMITS } else { DEFAULT_LIMITS };
    while let Some((header_bytes, rest)) = stream.split_first_chunk::<FRAME_HEADER_BYTES>() {
        let Ok(header) = FrameHeader::parse(header_bytes) else { return };
        let body_len = header.body_len as usize;
        // The client's own body limit (256 MiB, private to the client) is far
        // above any fuzz input, so only the server's limits are applied.
        if !from_server && header.body_len > body_bytes_max(header.frame_type, &limits) {
            // The server drains an oversized publish and goes on; anything
            // else closes the connection.
            let is_publish =
                header.frame_type == FrameType::Publish as u8 || header.frame_type == FrameType::PublishBatch as u8;
            if !is_publish || header.body_len > FRAME_BODY_BYTES_HARD_MAX || body_len > rest.len() {
                return;
            }
            stream = &rest[body_len..];
            continue;
        }
        // The stream ends inside the body: the peer went away.
        let Some((body, rest)) = rest.split_at_checked(body_len) else { return };
        stream = rest;
        let body = Bytes::copy_from_slice(body);
        if from_server {
            check_response(version, header, body);
        } else {
            check_request(version, header, body, &limits);
        }
    }
}

fn check_request(version: u16, header: FrameHeader, body: Bytes, limits: &Limits) {
    if header.frame_type == FrameType::PublishBatch as u8
        && publish_batch_record_count(&body).is_some_and(|count| count > limits.max_batch_records)
    {
        return;
    }
    let request = match Request::decode_for(version, header.frame_type, body) {
        Ok(request) => request,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    let encoded = request.encode_for(version, header.correlation_id);
    let (again_header, again_body) = split_frame(&encoded);
    assert_eq!(again_header.correlation_id, header.correlation_id);
    let again = Request::decode_for(version, again_header.frame_type, again_body)
        .unwrap_or_else(|error| panic!("re-encoded {request:?} does not decode: {error}"));
    assert_eq!(again, request, "re-encoding changed the request");
}

fn check_response(version: u16, header: FrameHeader, body: Bytes) {
    let response = match Response::decode_for(version, header.frame_type, body) {
        Ok(response) => response,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    if let Response::Deliver { records, .. } | Response::FetchResult { records, .. } = &response {
        for record in RecordIter::new(records.clone()) {
            let _ = record.map_err(|error| error.to_string());
        }
    }
    let encoded = response.encode_for(version, header.correlation_id);
    let (again_header, again_body) = split_frame(&encoded);
    assert_eq!(again_header.correlation_id, header.correlation_id);
    let again = Response::decode_for(version, again_header.frame_type, again_body)
        .unwrap_or_else(|error| panic!("re-encoded {response:?} does not decode: {error}"));
    assert_eq!(again, response, "re-encoding changed the response");
}

/// Splits a frame weir encoded itself into its header and body; its
/// `length` must cover exactly the bytes that follow.
fn split_frame(frame: &[u8]) -> (FrameHeader, Bytes) {
    let (header_bytes, body) = frame.split_first_chunk::<FRAME_HEADER_BYTES>().expect("an encoded frame has a header");
    let header = FrameHeader::parse(header_bytes).expect("an encoded frame header parses");
    assert_eq!(header.body_len as usize, body.len(), "an encoded frame's length field does not match its body");
    (header, Bytes::copy_from_slice(body))
}
