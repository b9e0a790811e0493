//! The record decoder: `record::peek_len`, `verify`, `verified_meta`,
//! `decode` and `RecordIter`, over the bytes of a segment or of a DELIVER
//! frame.
//!
//! Input: one mode byte, then records back to back. Mode bit 0 first gives
//! every whole record a correct CRC ([`seal_records`](super::seal_records)), so that the
//! fuzzer reaches the field parser behind the checksum instead of failing
//! at the CRC every time.
//!
//! Errors are fine. What fails: a panic; `verify` and `decode` disagreeing
//! about the same bytes; a record that decodes but does not re-encode
//! (`record::encode`) to exactly the bytes it was decoded from.

use bytes::Bytes;
use weir::record::{self, MESSAGE_BYTES_LIMIT, Message, RecordIter};

/// Runs the record decoder over `data` (the layout is in the module docs).
///
/// # Panics
/// When a property does not hold: that is the finding.
pub fn check(data: &[u8]) {
    let Some((&mode, records)) = data.split_first() else { return };
    let mut buf = records.to_vec();
    if mode & 1 != 0 {
        super::seal_records(&mut buf, 0, None);
    }
    let buf = Bytes::from(buf);
    check_first_record(&buf);
    for record in RecordIter::new(buf.clone()) {
        let _ = record.map_err(|error| error.to_string());
    }
}

/// The functions that look at the record at the start of a buffer must
/// agree with each other.
fn check_first_record(buf: &Bytes) {
    let peeked = record::peek_len(buf);
    let verified = record::verify(buf);
    let decoded = record::decode(buf);
    match (verified, decoded) {
        (Ok(meta), Ok(decoded)) => {
            assert_eq!((meta.offset, meta.timestamp_us), (decoded.offset, decoded.timestamp_us));
            assert_eq!(peeked, Ok(Some(meta.len)));
            assert_eq!(record::verified_meta(buf), Some(meta));
            let message = Message { key: decoded.key, headers: decoded.headers, payload: decoded.payload };
            assert!(message.encoded_len() == meta.len, "encoded_len disagrees with the record's length");
            if message.validate(MESSAGE_BYTES_LIMIT).is_ok() {
                let mut encoded = Vec::new();
                record::encode(&mut encoded, meta.offset, meta.timestamp_us, &message);
                assert!(encoded[..] == buf[..meta.len], "a decoded record does not re-encode to its own bytes");
            }
        }
        (Err(verify_error), Err(decode_error)) => {
            assert_eq!(verify_error, decode_error);
            let _ = verify_error.to_string();
        }
        (verified, decoded) => panic!("verify says {verified:?} but decode says {decoded:?}"),
    }
}
