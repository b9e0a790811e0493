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
//! | 24  | 1    | `flags`        | u8, 0 for a record (batch headers: see below)         |
//! | 25  | 2    | `key_len`      | u16, then `key_len` bytes of key                      |
//! | ..  | 2    | `header_count` | u16, then per header: u16 name length, name,          |
//! |     |      |                | u32 value length, value                               |
//! | ..  | 4    | `payload_len`  | u32, then `payload_len` bytes of payload              |
//!
//! The fields after `crc` must fill `length - 4` bytes exactly.
//!
//! Segments of format version 2 put a **batch header** before the records
//! of each append: a frame in this same layout (so recovery, torn-tail
//! detection and the search past damage treat both alike), told apart by
//! bit 0 of `flags` (bit 1: it names an idempotent producer), with no key
//! or headers and a 37-byte payload (see
//! [`BatchHeader`]). Its `offset` is the offset of the batch's first record
//! and its `timestamp_us` the batch's; it takes no offset of its own. Batch
//! headers never leave the broker: readers skip them, and [`verify`] and
//! [`decode`] (what clients use) refuse them.

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

/// Bit 0 of `flags`: the frame is a [`BatchHeader`], not a message.
pub const FLAG_BATCH_HEADER: u8 = 0x01;
/// Bit 1 of a batch header's `flags`: its `producer_id` and `sequence` are
/// an idempotent producer's (any value, 0 included, is a valid id).
pub const FLAG_BATCH_PRODUCER: u8 = 0x02;
/// Bytes of a batch header's payload.
pub const BATCH_HEADER_PAYLOAD_BYTES: usize = 8 + 8 + 1 + 4 + 8 + 8;
/// Bytes of a whole batch-header frame.
pub const BATCH_HEADER_BYTES: usize = RECORD_OVERHEAD_BYTES + BATCH_HEADER_PAYLOAD_BYTES;

/// What a Raft entry holds (format version 2). Single-node logs write only
/// data entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    /// Records of one publish.
    Data = 0,
    /// A new leader's first entry: no records.
    Blank = 1,
    /// A membership change: no records.
    Membership = 2,
}

/// The header before each batch of records in a version-2 segment: one
/// Raft entry. Its payload, big-endian:
///
/// | size | field | meaning |
/// |---|---|---|
/// | 8 | `raft_index` | consecutive within the log |
/// | 8 | `term` | of the leader that appended it (0 on a single node) |
/// | 1 | `kind` | [`EntryKind`] |
/// | 4 | `count` | records that follow (0 unless data) |
/// | 8 | `producer_id` | the idempotent producer's (flag bit 1), or 0 |
/// | 8 | `sequence` | its first sequence (flag bit 1), or 0 |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub raft_index: u64,
    pub term: u64,
    pub kind: EntryKind,
    pub count: u32,
    /// The idempotent producer's id and first sequence, if any.
    pub producer: Option<(u64, u64)>,
}

/// One header: a name and a value, both arbitrary bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub name: Bytes,
    pub value: Bytes,
}

/// A message as a publisher hands it to the log: no offset or timestamp yet.
/// Serde (postcard) carries it in a replicated partition's Raft entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Appends a batch header frame to `buf`: `first_offset` is the offset of
/// the first record that follows, `timestamp_us` the batch's.
pub fn encode_batch_header(buf: &mut Vec<u8>, first_offset: u64, timestamp_us: u64, header: &BatchHeader) {
    let start = buf.len();
    buf.reserve(BATCH_HEADER_BYTES);
    buf.put_u32((BATCH_HEADER_BYTES - 4) as u32);
    buf.put_u32(0); // CRC, filled in below.
    buf.put_u64(first_offset);
    buf.put_u64(timestamp_us);
    buf.put_u8(if header.producer.is_some() { FLAG_BATCH_HEADER | FLAG_BATCH_PRODUCER } else { FLAG_BATCH_HEADER });
    buf.put_u16(0); // no key
    buf.put_u16(0); // no headers
    buf.put_u32(BATCH_HEADER_PAYLOAD_BYTES as u32);
    buf.put_u64(header.raft_index);
    buf.put_u64(header.term);
    buf.put_u8(header.kind as u8);
    buf.put_u32(header.count);
    let (producer_id, sequence) = header.producer.unwrap_or_default();
    buf.put_u64(producer_id);
    buf.put_u64(sequence);
    let crc = crc32fast::hash(&buf[start + RECORD_PREFIX_BYTES..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    debug_assert_eq!(buf.len() - start, BATCH_HEADER_BYTES);
}

/// The fixed fields of a verified frame, without its variable parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// Total bytes of the frame, `length` field included.
    pub len: usize,
    /// A record's offset; a batch header's first record's.
    pub offset: u64,
    pub timestamp_us: u64,
    /// `Some` when the frame is a batch header (format version 2), which
    /// takes no offset.
    pub batch: Option<BatchHeader>,
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
    Ok(RecordMeta { len, offset: fields.offset, timestamp_us: fields.timestamp_us, batch: None })
}

/// As [`verify`], also accepting a batch header (a segment of format
/// version 2), whose fields it returns in [`RecordMeta::batch`].
///
/// # Errors
/// As [`verify`]; a batch header that is not exactly one is `Malformed`.
pub fn verify_frame(buf: &[u8]) -> Result<RecordMeta, RecordError> {
    match verify(buf) {
        Err(RecordError::Malformed { reason: FLAGS_UNKNOWN }) => {}
        other => return other,
    }
    // Length and CRC passed; only the flags were refused.
    let len = peek_len(buf)?.unwrap_or_default();
    let frame = &buf[..len];
    let malformed = |reason| Err(RecordError::Malformed { reason });
    let flags = frame[24];
    if flags & FLAG_BATCH_HEADER == 0 || flags & !(FLAG_BATCH_HEADER | FLAG_BATCH_PRODUCER) != 0 {
        return malformed(FLAGS_UNKNOWN);
    }
    if len != BATCH_HEADER_BYTES {
        return malformed("a batch header is not 70 bytes");
    }
    let mut cursor = Cursor { buf: frame, pos: RECORD_PREFIX_BYTES };
    let offset = cursor.u64()?;
    let timestamp_us = cursor.u64()?;
    let _flags = cursor.u8()?;
    if cursor.u16()? != 0 || cursor.u16()? != 0 || cursor.u32()? != BATCH_HEADER_PAYLOAD_BYTES as u32 {
        return malformed("a batch header has a key, headers or a payload of the wrong size");
    }
    let batch = batch_payload(frame, flags)?;
    Ok(RecordMeta { len, offset, timestamp_us, batch: Some(batch) })
}

const FLAGS_UNKNOWN: &str = "unknown flags";

/// The fields of a batch header's payload (`frame` is the whole 70-byte
/// frame, `flags` its flags), checked against the rules of each kind.
fn batch_payload(frame: &[u8], flags: u8) -> Result<BatchHeader, RecordError> {
    let malformed = |reason| Err(RecordError::Malformed { reason });
    let mut cursor = Cursor { buf: frame, pos: RECORD_OVERHEAD_BYTES };
    let raft_index = cursor.u64()?;
    let term = cursor.u64()?;
    let kind = match cursor.u8()? {
        0 => EntryKind::Data,
        1 => EntryKind::Blank,
        2 => EntryKind::Membership,
        _ => return malformed("unknown batch kind"),
    };
    let count = cursor.u32()?;
    let producer_id = cursor.u64()?;
    let sequence = cursor.u64()?;
    if (kind == EntryKind::Data) != (count > 0) {
        return malformed("a data batch holds no record, or another kind holds records");
    }
    let producer = match flags & FLAG_BATCH_PRODUCER {
        0 if producer_id != 0 || sequence != 0 => return malformed("a batch without a producer names one"),
        0 => None,
        _ if kind != EntryKind::Data => return malformed("a batch of another kind than data names a producer"),
        _ => Some((producer_id, sequence)),
    };
    Ok(BatchHeader { raft_index, term, kind, count, producer })
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
    Some(RecordMeta { len, offset, timestamp_us, batch: None })
}

/// As [`verified_meta`], for a frame of a version-2 segment that has
/// already been verified (by [`verify_frame`]): a batch header's fields are
/// returned in [`RecordMeta::batch`]. `None` when `buf` does not start with
/// a whole frame.
pub fn verified_frame_meta(buf: &[u8]) -> Option<RecordMeta> {
    let mut meta = verified_meta(buf)?;
    let flags = *buf.get(24)?;
    if flags & FLAG_BATCH_HEADER != 0 && meta.len == BATCH_HEADER_BYTES {
        meta.batch = batch_payload(&buf[..meta.len], flags).ok();
    }
    Some(meta)
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
        return Err(RecordError::Malformed { reason: FLAGS_UNKNOWN });
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

    fn arbitrary_batch_header() -> impl Strategy<Value = BatchHeader> {
        let data = (1u32.., proptest::option::of(any::<(u64, u64)>()))
            .prop_map(|(count, producer)| (EntryKind::Data, count, producer));
        let other = prop_oneof![Just(EntryKind::Blank), Just(EntryKind::Membership)].prop_map(|kind| (kind, 0, None));
        (any::<u64>(), any::<u64>(), prop_oneof![data, other]).prop_map(
            |(raft_index, term, (kind, count, producer))| BatchHeader { raft_index, term, kind, count, producer },
        )
    }

    proptest! {
        #[test]
        fn batch_headers_verify_to_the_same_fields_and_are_never_taken_for_records(
            header in arbitrary_batch_header(), first_offset: u64, timestamp_us: u64,
        ) {
            let mut buf = Vec::new();
            encode_batch_header(&mut buf, first_offset, timestamp_us, &header);
            prop_assert_eq!(buf.len(), BATCH_HEADER_BYTES);
            let meta = verify_frame(&buf).unwrap();
            prop_assert_eq!((meta.len, meta.offset, meta.timestamp_us, meta.batch), (BATCH_HEADER_BYTES, first_offset, timestamp_us, Some(header)));
            prop_assert_eq!(verified_frame_meta(&buf), Some(meta));
            // What clients use refuses them: they never leave the broker.
            prop_assert!(verify(&buf).is_err());
            prop_assert!(decode(&Bytes::from(buf)).is_err());
        }

        #[test]
        fn any_flipped_byte_of_a_batch_header_is_detected(
            header in arbitrary_batch_header(), position: prop::sample::Index, bit in 0u8..8,
        ) {
            let mut buf = Vec::new();
            encode_batch_header(&mut buf, 3, 4, &header);
            let position = position.index(buf.len());
            buf[position] ^= 1 << bit;
            prop_assert!(verify_frame(&buf).is_err());
        }

        #[test]
        fn records_verify_as_frames_without_a_batch(message in arbitrary_message(), offset: u64) {
            let mut buf = Vec::new();
            encode(&mut buf, offset, 1, &message);
            prop_assert_eq!(verify_frame(&buf).unwrap(), verify(&buf).unwrap());
            prop_assert_eq!(verify_frame(&buf).unwrap().batch, None);
        }

        #[test]
        fn arbitrary_bytes_never_panic_as_frames(buf in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = verify_frame(&buf);
            let _ = verified_frame_meta(&buf);
        }
    }

    #[test]
    fn a_batch_header_that_breaks_its_rules_is_malformed() {
        let sealed = |mut buf: Vec<u8>| {
            let crc = crc32fast::hash(&buf[RECORD_PREFIX_BYTES..]);
            buf[4..8].copy_from_slice(&crc.to_be_bytes());
            buf
        };
        let header = BatchHeader { raft_index: 1, term: 1, kind: EntryKind::Data, count: 2, producer: None };
        let mut good = Vec::new();
        encode_batch_header(&mut good, 0, 0, &header);
        let count_at = RECORD_OVERHEAD_BYTES + 8 + 8 + 1;
        let mut cases = Vec::new();
        // A data batch of no record.
        let mut empty = good.clone();
        empty[count_at..count_at + 4].copy_from_slice(&0u32.to_be_bytes());
        cases.push(sealed(empty));
        // A producer without the flag that says so.
        let mut producer = good.clone();
        producer[count_at + 4] = 1;
        cases.push(sealed(producer));
        // An unknown kind, and unknown flags.
        let mut kind = good.clone();
        kind[count_at - 1] = 3;
        cases.push(sealed(kind));
        let mut flags = good.clone();
        flags[24] |= 0x04;
        cases.push(sealed(flags));
        for case in cases {
            assert!(matches!(verify_frame(&case), Err(RecordError::Malformed { .. })), "{case:?}");
        }
        assert!(verify_frame(&sealed(good)).is_ok());
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
