//! Segment file headers and the two sparse indexes.
//!
//! Every file of a segment starts with the same 16-byte header:
//!
//! | pos | size | field         | value                                   |
//! |-----|------|---------------|-----------------------------------------|
//! | 0   | 4    | magic         | `WEIR`                                  |
//! | 4   | 2    | version       | u16, 1 or 2 (the same in all three)     |
//! | 6   | 2    | kind          | u16: 1 log, 2 offset index, 3 time index |
//! | 8   | 8    | base offset   | u64, the segment's first offset         |
//!
//! After it, an index is a sequence of 16-byte entries of two u64s:
//! `(offset, byte position in the .log)` for the offset index and
//! `(timestamp_us, offset)` for the time index. Both are written at the same
//! records, so entry *i* of one names the same record as entry *i* of the
//! other. Indexes are derived data: validated on open and rebuilt from the
//! log when they disagree with it.

/// Bytes of every segment file's header.
pub const FILE_HEADER_BYTES: usize = 16;
/// Bytes of one index entry.
pub const INDEX_ENTRY_BYTES: usize = 16;
const FILE_MAGIC: [u8; 4] = *b"WEIR";
/// The segment format version 0.1 wrote: records only.
pub const FORMAT_VERSION_1: u16 = 1;
/// The segment format version this build writes: a batch header (one Raft
/// entry) before the records of each append. It reads both.
pub const FORMAT_VERSION_2: u16 = 2;

/// Which file of a segment a header belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FileKind {
    Log = 1,
    OffsetIndex = 2,
    TimeIndex = 3,
}

/// Encodes the header of a segment file.
pub fn encode_file_header(kind: FileKind, version: u16, base_offset: u64) -> [u8; FILE_HEADER_BYTES] {
    let mut header = [0u8; FILE_HEADER_BYTES];
    header[..4].copy_from_slice(&FILE_MAGIC);
    header[4..6].copy_from_slice(&version.to_be_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_be_bytes());
    header[8..].copy_from_slice(&base_offset.to_be_bytes());
    header
}

/// Checks a segment file header and returns its format version; the error
/// says what is wrong.
pub fn check_file_header(bytes: &[u8], kind: FileKind, base_offset: u64) -> Result<u16, String> {
    let Some(header) = bytes.get(..FILE_HEADER_BYTES) else {
        return Err(format!("file is {} bytes, shorter than its {FILE_HEADER_BYTES}-byte header", bytes.len()));
    };
    if header[..4] != FILE_MAGIC {
        return Err(format!("bad magic {:02x?}, expected \"WEIR\"", &header[..4]));
    }
    let version = u16::from_be_bytes([header[4], header[5]]);
    if !(FORMAT_VERSION_1..=FORMAT_VERSION_2).contains(&version) {
        return Err(format!(
            "format version {version} is not supported (this build reads versions {FORMAT_VERSION_1} and {FORMAT_VERSION_2})"
        ));
    }
    let found_kind = u16::from_be_bytes([header[6], header[7]]);
    if found_kind != kind as u16 {
        return Err(format!("file kind {found_kind}, expected {} ({kind:?})", kind as u16));
    }
    let found_base = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    if found_base != base_offset {
        return Err(format!("header base offset {found_base} does not match the file name ({base_offset})"));
    }
    Ok(version)
}

/// One index entry. For the offset index `key` is an offset and `value` a
/// byte position; for the time index `key` is a timestamp and `value` an
/// offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub key: u64,
    pub value: u64,
}

/// Encodes entries for appending to an index file.
pub fn encode_entries(entries: &[IndexEntry], out: &mut Vec<u8>) {
    for entry in entries {
        out.extend_from_slice(&entry.key.to_be_bytes());
        out.extend_from_slice(&entry.value.to_be_bytes());
    }
}

/// Decodes the entries after an index file's header. A trailing partial
/// entry (a torn write) is ignored; keys must not decrease.
pub fn decode_entries(body: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let mut entries = Vec::with_capacity(body.len() / INDEX_ENTRY_BYTES);
    for chunk in body.chunks_exact(INDEX_ENTRY_BYTES) {
        let key = u64::from_be_bytes(chunk[..8].try_into().unwrap_or_default());
        let value = u64::from_be_bytes(chunk[8..].try_into().unwrap_or_default());
        if let Some(last) = entries.last().copied() {
            let last: IndexEntry = last;
            if key < last.key {
                return Err(format!("entry {} goes backwards ({key} after {})", entries.len(), last.key));
            }
        }
        entries.push(IndexEntry { key, value });
    }
    Ok(entries)
}

/// The last entry whose key is at most `key`.
pub fn floor(entries: &[IndexEntry], key: u64) -> Option<IndexEntry> {
    let count = entries.partition_point(|entry| entry.key <= key);
    count.checked_sub(1).map(|i| entries[i])
}

/// The last entry whose key is strictly below `key`.
pub fn last_below(entries: &[IndexEntry], key: u64) -> Option<IndexEntry> {
    let count = entries.partition_point(|entry| entry.key < key);
    count.checked_sub(1).map(|i| entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_mismatches_are_named() {
        let header = encode_file_header(FileKind::TimeIndex, FORMAT_VERSION_2, 42);
        assert_eq!(check_file_header(&header, FileKind::TimeIndex, 42), Ok(FORMAT_VERSION_2));
        let v1 = encode_file_header(FileKind::TimeIndex, FORMAT_VERSION_1, 42);
        assert_eq!(check_file_header(&v1, FileKind::TimeIndex, 42), Ok(FORMAT_VERSION_1));
        let v3 = encode_file_header(FileKind::TimeIndex, 3, 42);
        assert!(check_file_header(&v3, FileKind::TimeIndex, 42).unwrap_err().contains("version 3"));
        assert!(check_file_header(&header, FileKind::Log, 42).unwrap_err().contains("kind"));
        assert!(check_file_header(&header, FileKind::TimeIndex, 41).unwrap_err().contains("base offset"));
        assert!(check_file_header(&header[..10], FileKind::TimeIndex, 42).unwrap_err().contains("shorter"));
    }

    #[test]
    fn floor_and_last_below_pick_the_right_entry() {
        let entries: Vec<_> = [10, 20, 20, 30].iter().map(|&key| IndexEntry { key, value: key * 2 }).collect();
        assert_eq!(floor(&entries, 5), None);
        assert_eq!(floor(&entries, 20).map(|e| e.key), Some(20));
        assert_eq!(floor(&entries, 29).map(|e| e.key), Some(20));
        assert_eq!(last_below(&entries, 20).map(|e| e.key), Some(10));
        assert_eq!(last_below(&entries, 10), None);
        let mut bytes = Vec::new();
        encode_entries(&entries, &mut bytes);
        bytes.push(7); // A torn trailing entry is ignored.
        assert_eq!(decode_entries(&bytes).unwrap(), entries);
    }
}
