//! Primitive field codecs shared by every frame: big-endian integers and
//! length-prefixed byte strings, read from a `Bytes` without copying.
//!
//! A reader never allocates more than the bytes it has been given: every
//! length is checked against what remains in the body before it is used.

use bytes::{Buf, BufMut, Bytes};

use crate::record::{HEADER_NAME_BYTES_MAX, HEADERS_COUNT_MAX, KEY_BYTES_MAX};
use crate::record::{Header, Message};

/// Why a frame body does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame body ends inside field {field}")]
    Truncated { field: &'static str },
    #[error("field {field} is {value}, outside {allowed}")]
    OutOfRange { field: &'static str, value: u64, allowed: &'static str },
    #[error("field {field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
    /// A channel or durable name that is not UTF-8, in a body that is
    /// otherwise well formed. Unlike the other variants this is not a
    /// malformed frame: the server refuses the request (as it refuses a
    /// UTF-8 name outside the naming rule) and keeps the connection.
    #[error("{field} is not valid UTF-8 (its byte {valid_up_to} is the first that is not)")]
    NameNotUtf8 { field: NameField, valid_up_to: usize },
    #[error("{extra_bytes} bytes left over after the last field")]
    TrailingBytes { extra_bytes: usize },
    #[error("unknown frame type {frame_type:#04x}")]
    UnknownFrameType { frame_type: u8 },
}

/// A name field of a request, read by [`Reader::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameField {
    /// `channel` of PUBLISH, PUBLISH_BATCH, SUBSCRIBE, FETCH, CREATE_CHANNEL.
    Channel,
    /// `durable_name` of SUBSCRIBE.
    DurableName,
    /// `group` of SUBSCRIBE (version 2 on).
    Group,
}

impl NameField {
    /// The field's name in docs/PROTOCOL.md.
    pub fn as_str(self) -> &'static str {
        match self {
            NameField::Channel => "channel",
            NameField::DurableName => "durable_name",
            NameField::Group => "group",
        }
    }
}

impl std::fmt::Display for NameField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cursor over a frame body.
pub struct Reader {
    body: Bytes,
    /// The first name that was not UTF-8, reported by [`Reader::finish`]
    /// only once the rest of the body has decoded.
    name_not_utf8: Option<(NameField, usize)>,
}

impl Reader {
    pub fn new(body: Bytes) -> Reader {
        Reader { body, name_not_utf8: None }
    }

    fn need(&self, len: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.body.remaining() < len { Err(DecodeError::Truncated { field }) } else { Ok(()) }
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        Ok(self.body.get_u8())
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.need(2, field)?;
        Ok(self.body.get_u16())
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(4, field)?;
        Ok(self.body.get_u32())
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.need(8, field)?;
        Ok(self.body.get_u64())
    }

    /// A u16 length or count, refused above `max` before anything is read
    /// or allocated for it.
    pub fn u16_at_most(
        &mut self,
        field: &'static str,
        max: usize,
        allowed: &'static str,
    ) -> Result<usize, DecodeError> {
        let value = self.u16(field)? as usize;
        if value > max {
            return Err(DecodeError::OutOfRange { field, value: value as u64, allowed });
        }
        Ok(value)
    }

    /// `count` items read by `item`, each at least `item_bytes_min` bytes on
    /// the wire: the vector is sized by what the body can hold, never by
    /// the claimed count alone.
    pub fn list<T>(
        &mut self,
        count: usize,
        item_bytes_min: usize,
        mut item: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let mut items = Vec::with_capacity(count.min(self.remaining() / item_bytes_min.max(1)));
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }

    /// `len` raw bytes, sharing the body's memory.
    pub fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(len, field)?;
        Ok(self.body.split_to(len))
    }

    /// A string with a u8 length.
    pub fn short_string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u8(field)? as usize;
        self.utf8(len, field)
    }

    /// A string with a u16 length, at most `len_max` bytes.
    pub fn string(
        &mut self,
        field: &'static str,
        len_max: usize,
        allowed: &'static str,
    ) -> Result<String, DecodeError> {
        let len = self.u16_at_most(field, len_max, allowed)?;
        self.utf8(len, field)
    }

    /// A channel or durable name: a string with a u8 length. A name that
    /// is not UTF-8 does not stop the decoding: it reads as empty here and
    /// [`Reader::finish`] reports it as [`DecodeError::NameNotUtf8`] once
    /// every other field has decoded, so that the server can tell a
    /// refused name (answered, connection kept) from a malformed frame
    /// (connection closed).
    pub fn name(&mut self, field: NameField) -> Result<String, DecodeError> {
        let len = self.u8(field.as_str())? as usize;
        let bytes = self.bytes(len, field.as_str())?;
        match String::from_utf8(bytes.to_vec()) {
            Ok(name) => Ok(name),
            Err(error) => {
                self.name_not_utf8.get_or_insert((field, error.utf8_error().valid_up_to()));
                Ok(String::new())
            }
        }
    }

    fn utf8(&mut self, len: usize, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8 { field })
    }

    /// A message: key, headers, payload (the record layout after `flags`).
    pub fn message(&mut self) -> Result<Message, DecodeError> {
        let key_len = self.u16_at_most("key_len", KEY_BYTES_MAX, "0..=4096")?;
        let key = self.bytes(key_len, "key")?;
        let header_count = self.u16_at_most("header_count", HEADERS_COUNT_MAX, "0..=64")?;
        let headers = self.list(header_count, 6, |r| {
            let name_len = r.u16_at_most("header_name_len", HEADER_NAME_BYTES_MAX, "0..=255")?;
            let name = r.bytes(name_len, "header_name")?;
            let value_len = r.u32("header_value_len")? as usize;
            let value = r.bytes(value_len, "header_value")?;
            Ok(Header { name, value })
        })?;
        let payload_len = self.u32("payload_len")? as usize;
        let payload = self.bytes(payload_len, "payload")?;
        Ok(Message { key, headers, payload })
    }

    /// Everything left.
    pub fn rest(&mut self) -> Bytes {
        self.body.split_to(self.body.len())
    }

    pub fn remaining(&self) -> usize {
        self.body.remaining()
    }

    /// Fails unless the body was consumed exactly; then, with
    /// [`DecodeError::NameNotUtf8`], when a name read by [`Reader::name`]
    /// was not UTF-8.
    pub fn finish(self) -> Result<(), DecodeError> {
        match (self.body.remaining(), self.name_not_utf8) {
            (0, None) => Ok(()),
            (0, Some((field, valid_up_to))) => Err(DecodeError::NameNotUtf8 { field, valid_up_to }),
            (extra_bytes, _) => Err(DecodeError::TrailingBytes { extra_bytes }),
        }
    }
}

/// Appends a string with a u8 length; the caller guarantees it fits.
pub fn put_short_string(out: &mut Vec<u8>, value: &str) {
    assert!(value.len() <= u8::MAX as usize, "short string too long");
    out.put_u8(value.len() as u8);
    out.put_slice(value.as_bytes());
}

/// Appends a string with a u16 length, cut to fit if it is longer.
pub fn put_string(out: &mut Vec<u8>, value: &str) {
    let mut end = value.len().min(u16::MAX as usize);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.put_slice(&value.as_bytes()[..end]);
}

/// Appends a message: key, headers, payload (the record layout after
/// `flags`, so the codec is shared with the storage engine).
pub fn put_message(out: &mut Vec<u8>, message: &Message) {
    crate::record::put_message_fields(out, message);
}

/// Bytes a message takes on the wire.
pub fn message_wire_len(message: &Message) -> usize {
    2 + message.key.len()
        + 2
        + message.headers.iter().map(|h| 6 + h.name.len() + h.value.len()).sum::<usize>()
        + 4
        + message.payload.len()
}

/// What one message counts against `max_inflight_publish_bytes`: its bytes
/// on the wire plus the memory the broker holds for it while it waits
/// (the decoded message and its headers).
pub fn message_inflight_bytes(message: &Message) -> usize {
    message_wire_len(message) + std::mem::size_of::<Message>() + message.headers.len() * std::mem::size_of::<Header>()
}

/// The `record_count` of a PUBLISH_BATCH body, read without decoding the
/// messages, so that it can be checked against `max_batch_records` before
/// anything is allocated for them. `None` when the body is too short.
pub fn publish_batch_record_count(body: &[u8]) -> Option<u32> {
    let channel_len = *body.first()? as usize;
    let flags_at = 1 + channel_len;
    // Bit 0 of flags: producer fields (16 bytes); bit 1 (version 2): a
    // partition (4 bytes). Other bits are refused when the body is decoded.
    let flags = *body.get(flags_at)?;
    let count_at = flags_at + 1 + if flags & 1 != 0 { 16 } else { 0 } + if flags & 2 != 0 { 4 } else { 0 };
    let count = body.get(count_at..count_at + 4)?;
    Some(u32::from_be_bytes([count[0], count[1], count[2], count[3]]))
}
