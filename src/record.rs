//! The record format, the layer below storage, protocol and client: how one
//! message is laid out inside a segment file and inside DELIVER frames, and
//! how it is checked when it is read back.
//!
//! This module is pure (no I/O). The same bytes travel to subscribers inside
//! `DELIVER_BATCH` frames, so a client verifies the CRC the broker wrote.
//!
//! All integers are big-endian.
//!
//! | pos | size | field          | meaning                                               |
//! |-----|------|----------------|-------------------------------------------------------|
//! | 0   | 4    | `length`       | u32, bytes that follow this field                     |
//! | 4   | 4    | `crc`          | u32, CRC-32 (IEEE) of the `length - 4` bytes after it |
//! | 8   | 8    | `offset`       | u64, the record's offset in its channel               |
//! | 16  | 8    | `timestamp_us` | u64, µs since the Unix epoch, assigned by the broker  |
//! | 24  | 1    | `flags`        | u8, 0 in format version 1                             |
//! | 25  | 2    | `key_len`      | u16, then `key_len` bytes of key                      |
//! | ..  | 2    | `header_count` | u16, then per header: u16 name length, name,          |
//! |     |      |                | u32 value length, value                               |
//! | ..  | 4    | `payload_len`  | u32, then `payload_len` bytes of payload              |
//!
//! The fields after `crc` must fill `length - 4` bytes exactly.

use bytes::{BufMut, Bytes};

/// Bytes before the CRC-covered part: `length` and `crc`.
pub const RECORD_PREFIX_BYTES: usize = 8;
/// Bytes of a record with an empty key, no headers and an empty payload.
pub const RECORD_OVERHEAD_BYTES: usize = 4 + 4 + 8 + 8 + 1 + 2 + 2 + 4;
/// Bytes each header adds beyond its name and value.
pub const HEADER_OVERHEAD_BYTES: usize = 2 + 4;
/// Most headers one message may carry.
pub const HEADERS_COUNT_MAX: usize = 64;
/// Longest header name.
pub const HEADER_NAME_BYTES_MAX: usize = 255;
/// Longest key. Keys are routing hints, not payloads.
pub const KEY_BYTES_MAX: usize = 4096;
/// Ceiling for the configurable `max_message_bytes`: no message, in any
/// configuration, may be larger than this.
pub const MESSAGE_BYTES_LIMIT: usize = 64 * 1024 * 1024;
/// The largest record that can exist on disk. A `length` field that claims
/// more is corruption, and is rejected before anything is allocated for it.
pub const RECORD_BYTES_MAX: usize =
    MESSAGE_BYTES_LIMIT + RECORD_OVERHEAD_BYTES + HEADERS_COUNT_MAX * HEADER_OVERHEAD_BYTES;

const _: () = assert!(RECORD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(KEY_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(HEADER_NAME_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(HEADERS_COUNT_MAX <= u16::MAX as usize);

/// One header: a name and a value, both arbitrary bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: Bytes,
    pub value: Bytes,
}

/// A message as a publisher hands it to the log: no offset or timestamp yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub key: Bytes,
    pub headers: Vec<Header>,
    pub payload: Bytes,
}

impl Message {
    /// A message with only a payload.
    pub fn from_payload(payload: impl Into<Bytes>) -> Message {
        Message { payload: payload.into(), ..Message::default() }
    }

    /// The size that `max_message_bytes` limits: key, header names and
    /// values, and payload.
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self.headers.iter().map(|h| h.name.len() + h.value.len()).sum();
        self.key.len() + headers + self.payload.len()
    }

    /// The number of bytes this message takes once encoded as a record.
    pub fn encoded_len(&self) -> usize {
        RECORD_OVERHEAD_BYTES + self.headers.len() * HEADER_OVERHEAD_BYTES + self.size_bytes()
    }

    /// Checks the message against the record limits.
    ///
    /// # Errors
    /// The first limit the message breaks, with the value and the limit.
    pub fn validate(&self, message_bytes_max: usize) -> Result<(), MessageError> {
        let message_bytes_max = message_bytes_max.min(MESSAGE_BYTES_LIMIT);
        if self.key.len() > KEY_BYTES_MAX {
            return Err(MessageError::KeyTooLarge { size_bytes: self.key.len(), size_bytes_max: KEY_BYTES_MAX });
        }
        if self.headers.len() > HEADERS_COUNT_MAX {
            return Err(MessageError::TooManyHeaders { count: self.headers.len(), count_max: HEADERS_COUNT_MAX });
        }
        if let Some(header) = self.headers.iter().find(|h| h.name.len() > HEADER_NAME_BYTES_MAX) {
            return Err(MessageError::HeaderNameTooLarge {
                size_bytes: header.name.len(),
                size_bytes_max: HEADER_NAME_BYTES_MAX,
            });
        }
        let size_bytes = self.size_bytes();
        if size_bytes > message_bytes_max {
            return Err(MessageError::MessageTooLarge { size_bytes, size_bytes_max: message_bytes_max });
        }
        Ok(())
    }
}

/// A message that breaks one of the record limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    #[error(
        "message is {size_bytes} bytes (key + headers + payload); the limit is max_message_bytes = {size_bytes_max}"
    )]
    MessageTooLarge { size_bytes: usize, size_bytes_max: usize },
    #[error("key is {size_bytes} bytes; keys are limited to {size_bytes_max} bytes")]
    KeyTooLarge { size_bytes: usize, size_bytes_max: usize },
    #[error("message has {count} headers; at most {count_max} are allowed")]
    TooManyHeaders { count: usize, count_max: usize },
    #[error("a header name is {size_bytes} bytes; header names are limited to {size_bytes_max} bytes")]
    HeaderNameTooLarge { size_bytes: usize, size_bytes_max: usize },
}

/// A record read back from a log: a message with its offset and timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_us: u64,
    pub key: Bytes,
    pub headers: Vec<Header>,
    pub payload: Bytes,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Fewer bytes than the record needs: a torn write, or the end of what
    /// has been written so far.
    #[error("incomplete record: {available_bytes} bytes available, {needed_bytes} needed")]
    Incomplete { available_bytes: usize, needed_bytes: usize },
    #[error("record length {length} is outside 0..={length_max}")]
    LengthOutOfRange { length: u64, length_max: u64 },
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("malformed record: {reason}")]
    Malformed { reason: &'static str },
}

/// Appends the encoding of `message` as a record to `buf`.
///
/// The caller has validated the message; an invalid one is an invariant
/// violation here.
pub fn encode(buf: &mut Vec<u8>, offset: u64, timestamp_us: u64, message: &Message) {
    assert!(message.validate(MESSAGE_BYTES_LIMIT).is_ok(), "encode: message must be validated first");
    let start = buf.len();
    let length = message.encoded_len() - 4;
    buf.reserve(message.encoded_len());
    buf.put_u32(length as u32);
    buf.put_u32(0); // CRC, filled in below once the body is written.
    buf.put_u64(offset);
    buf.put_u64(timestamp_us);
    buf.put_u8(0);
    put_message_fields(buf, message);
    let crc = crc32fast::hash(&buf[start + RECORD_PREFIX_BYTES..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    debug_assert_eq!(buf.len() - start, message.encoded_len());
}

/// Appends key, headers and payload in the layout records and publish
/// frames share (the part of a record after `flags`).
pub fn put_message_fields(buf: &mut Vec<u8>, message: &Message) {
    buf.put_u16(message.key.len() as u16);
    buf.put_slice(&message.key);
    buf.put_u16(message.headers.len() as u16);
    for header in &message.headers {
        buf.put_u16(header.name.len() as u16);
        buf.put_slice(&header.name);
        buf.put_u32(header.value.len() as u32);
        buf.put_slice(&header.value);
    }
    buf.put_u32(message.payload.len() as u32);
    buf.put_slice(&message.payload);
}

/// The fixed fields of a verified record, without its variable parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// Total bytes of the record, `length` field included.
    pub len: usize,
    pub offset: u64,
    pub timestamp_us: u64,
}

/// Reads the total length of the record at the start of `buf` without
/// checking anything else. `Ok(None)` when fewer than 4 bytes are there.
///
/// # Errors
/// `LengthOutOfRange` when the length cannot be a record.
pub fn peek_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(prefix) = buf.get(..4) else { return Ok(None) };
    let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let length_min = RECORD_OVERHEAD_BYTES - 4;
    let length_max = RECORD_BYTES_MAX - 4;
    if !(length_min..=length_max).contains(&length) {
        return Err(RecordError::LengthOutOfRange { length: length as u64, length_max: length_max as u64 });
    }
    Ok(Some(length + 4))
}

/// Verifies the record at the start of `buf`: length in range, all bytes
/// present, CRC matching, fields filling the record exactly.
///
/// # Errors
/// What is wrong with the bytes; `Incomplete` when they stop short.
pub fn verify(buf: &[u8]) -> Result<RecordMeta, RecordError> {
    let (len, fields) = check(buf)?;
    Ok(RecordMeta { len, offset: fields.offset, timestamp_us: fields.timestamp_us })
}

/// The checks of [`verify`], returning the parsed fields so that decoding
/// does not parse twice.
fn check(buf: &[u8]) -> Result<(usize, Fields), RecordError> {
    let len = match peek_len(buf)? {
        Some(len) => len,
        None => return Err(RecordError::Incomplete { available_bytes: buf.len(), needed_bytes: 4 }),
    };
    let Some(record) = buf.get(..len) else {
        return Err(RecordError::Incomplete { available_bytes: buf.len(), needed_bytes: len });
    };
    let stored = u32::from_be_bytes([record[4], record[5], record[6], record[7]]);
    let computed = crc32fast::hash(&record[RECORD_PREFIX_BYTES..]);
    if stored != computed {
        return Err(RecordError::ChecksumMismatch { stored, computed });
    }
    Ok((len, parse_fields(record)?))
}

/// The fixed fields of the record at the start of `buf`, which has already
/// been verified (by [`verify`] or a read of the log): no CRC is computed
/// again. `None` when `buf` does not start with a whole record.
pub fn verified_meta(buf: &[u8]) -> Option<RecordMeta> {
    let len = peek_len(buf).ok()??;
    let record = buf.get(..len)?;
    let offset = u64::from_be_bytes(record.get(8..16)?.try_into().ok()?);
    let timestamp_us = u64::from_be_bytes(record.get(16..24)?.try_into().ok()?);
    Some(RecordMeta { len, offset, timestamp_us })
}

/// Decodes the verified record at the start of `buf` (a slice of a larger
/// buffer is fine); key, header and payload share `buf`'s memory.
///
/// # Errors
/// As [`verify`].
pub fn decode(buf: &Bytes) -> Result<Record, RecordError> {
    let (_, fields) = check(buf)?;
    let headers = fields
        .headers
        .iter()
        .map(|(name, value)| Header { name: buf.slice(name.clone()), value: buf.slice(value.clone()) })
        .collect();
    Ok(Record {
        offset: fields.offset,
        timestamp_us: fields.timestamp_us,
        key: buf.slice(fields.key),
        headers,
        payload: buf.slice(fields.payload),
    })
}

type Span = std::ops::Range<usize>;

struct Fields {
    offset: u64,
    timestamp_us: u64,
    key: Span,
    headers: Vec<(Span, Span)>,
    payload: Span,
}

/// Parses the fields of a record whose length and CRC are already checked.
fn parse_fields(record: &[u8]) -> Result<Fields, RecordError> {
    let mut cursor = Cursor { buf: record, pos: RECORD_PREFIX_BYTES };
    let offset = cursor.u64()?;
    let timestamp_us = cursor.u64()?;
    let flags = cursor.u8()?;
    if flags != 0 {
        return Err(RecordError::Malformed { reason: "unknown flags" });
    }
    let key_len = cursor.u16()? as usize;
    if key_len > KEY_BYTES_MAX {
        return Err(RecordError::Malformed { reason: "key longer than KEY_BYTES_MAX" });
    }
    let key = cursor.span(key_len)?;
    let header_count = cursor.u16()? as usize;
    if header_count > HEADERS_COUNT_MAX {
        return Err(RecordError::Malformed { reason: "more headers than HEADERS_COUNT_MAX" });
    }
    let mut headers = Vec::with_capacity(header_count);
    for _ in 0..header_count {
        let name_len = cursor.u16()? as usize;
        if name_len > HEADER_NAME_BYTES_MAX {
            return Err(RecordError::Malformed { reason: "header name longer than HEADER_NAME_BYTES_MAX" });
        }
        let name = cursor.span(name_len)?;
        let value_len = cursor.u32()? as usize;
        let value = cursor.span(value_len)?;
        headers.push((name, value));
    }
    let payload_len = cursor.u32()? as usize;
    let payload = cursor.span(payload_len)?;
    if cursor.pos != record.len() {
        return Err(RecordError::Malformed { reason: "fields do not fill the record length" });
    }
    Ok(Fields { offset, timestamp_us, key, headers, payload })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn span(&mut self, len: usize) -> Result<Span, RecordError> {
        let end = self.pos.checked_add(len).filter(|&end| end <= self.buf.len());
        let Some(end) = end else {
            return Err(RecordError::Malformed { reason: "field runs past the record length" });
        };
        let span = self.pos..end;
        self.pos = end;
        Ok(span)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let span = self.span(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[span]);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

/// Iterates over the records of a buffer of whole, back-to-back records.
pub struct RecordIter {
    buf: Bytes,
}

impl RecordIter {
    pub fn new(buf: Bytes) -> RecordIter {
        RecordIter { buf }
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let result = match peek_len(&self.buf) {
            Ok(Some(len)) if len <= self.buf.len() => decode(&self.buf.split_to(len)),
            Ok(needed) => {
                Err(RecordError::Incomplete { available_bytes: self.buf.len(), needed_bytes: needed.unwrap_or(4) })
            }
            Err(error) => Err(error),
        };
        if result.is_err() {
            self.buf.clear();
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arbitrary_message() -> impl Strategy<Value = Message> {
        let bytes = |max: usize| proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
        let header = (bytes(HEADER_NAME_BYTES_MAX), bytes(64)).prop_map(|(name, value)| Header { name, value });
        (bytes(64), proptest::collection::vec(header, 0..4), bytes(2048)).prop_map(|(key, headers, payload)| Message {
            key,
            headers,
            payload,
        })
    }

    proptest! {
        #[test]
        fn encoded_records_decode_to_the_same_message(message in arbitrary_message(), offset: u64, timestamp_us: u64) {
            let mut buf = Vec::new();
            encode(&mut buf, offset, timestamp_us, &message);
            prop_assert_eq!(buf.len(), message.encoded_len());
            let record = decode(&Bytes::from(buf)).unwrap();
            prop_assert_eq!(record.offset, offset);
            prop_assert_eq!(record.timestamp_us, timestamp_us);
            prop_assert_eq!(record.key, message.key);
            prop_assert_eq!(record.headers, message.headers);
            prop_assert_eq!(record.payload, message.payload);
        }

        #[test]
        fn any_flipped_byte_is_detected(message in arbitrary_message(), position: prop::sample::Index, bit in 0u8..8) {
            let mut buf = Vec::new();
            encode(&mut buf, 7, 9, &message);
            let position = position.index(buf.len());
            buf[position] ^= 1 << bit;
            prop_assert!(verify(&buf).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = verify(&buf);
            let _ = decode(&Bytes::from(buf));
        }

        #[test]
        fn every_truncation_is_incomplete(message in arbitrary_message(), cut: prop::sample::Index) {
            let mut buf = Vec::new();
            encode(&mut buf, 1, 2, &message);
            let cut = cut.index(buf.len());
            let is_incomplete = matches!(verify(&buf[..cut]), Err(RecordError::Incomplete { .. }));
            prop_assert!(is_incomplete);
        }
    }

    #[test]
    fn a_length_beyond_the_record_maximum_is_rejected_before_reading_further() {
        let mut buf = vec![0u8; 16];
        buf[..4].copy_from_slice(&(RECORD_BYTES_MAX as u32).to_be_bytes());
        assert!(matches!(verify(&buf), Err(RecordError::LengthOutOfRange { .. })));
    }

    #[test]
    fn message_limits_are_enforced_at_n_and_n_plus_one() {
        let at_limit = Message::from_payload(vec![0u8; 100]);
        assert!(at_limit.validate(100).is_ok());
        let over = Message::from_payload(vec![0u8; 101]);
        assert_eq!(over.validate(100), Err(MessageError::MessageTooLarge { size_bytes: 101, size_bytes_max: 100 }));
        let key = Message { key: Bytes::from(vec![0u8; KEY_BYTES_MAX + 1]), ..Message::default() };
        assert!(matches!(key.validate(MESSAGE_BYTES_LIMIT), Err(MessageError::KeyTooLarge { .. })));
    }
}
