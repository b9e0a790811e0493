//! Helpers shared by the fuzz targets and the seed writer: they turn the
//! fuzzer's flat bytes into inputs that get past weir's checksums and file
//! headers, so that the fuzzer spends its time in the parsers and in
//! recovery rather than guessing CRC-32s.
//!
//! Nothing here may panic on any input: a panic is what the targets report
//! as a finding.
//!
//! # Layout
//! - [`frame`], [`record`], [`segment_recovery`], [`config`]: one module per
//!   target, with its input format and properties in its docs and its body
//!   as `check(data)`; `fuzz_targets/<target>.rs` only hands libFuzzer's
//!   bytes to it.
//! - [`seeds`]: valid inputs for each target, for the corpus
//!   (`examples/seeds.rs`) and for the property tests.
//! - This file: the helpers that turn flat bytes into inputs that pass
//!   weir's checksums and file headers ([`seal_records`], [`SegmentCase`]).
//!
//! # Also built by the root crate's tests
//! `tests/fuzz_properties.rs` includes this file as a module
//! (`#[path = "../fuzz/src/lib.rs"] mod weir_fuzz;`), so that `cargo test`
//! runs the same `check` functions as proptests. Hence: modules are
//! declared with explicit `#[path]`s, they reach these helpers through
//! `super::` (never `crate::` or `weir_fuzz::`), and this code uses only
//! crates the root crate also depends on (weir, bytes, crc32fast,
//! tempfile), never libfuzzer-sys.

#[path = "config.rs"]
pub mod config;
#[path = "frame.rs"]
pub mod frame;
#[path = "record.rs"]
pub mod record;
#[path = "seeds.rs"]
pub mod seeds;
#[path = "segment_recovery.rs"]
pub mod segment_recovery;

use std::io;
use std::path::Path;

use weir::record::{RECORD_PREFIX_BYTES, peek_len};
use weir::storage::FsyncPolicy;
use weir::storage::index::{self, FILE_HEADER_BYTES, FileKind, IndexEntry};

/// Walks the whole records of `buf` from `start` and gives each a correct
/// CRC; with `renumber_from`, first rewrites their offsets to run on from
/// it. Stops at the first length that is out of range or runs past the end.
/// Returns the whole records walked and, for each, its position in `buf`,
/// offset and timestamp.
pub fn seal_records(buf: &mut [u8], start: usize, renumber_from: Option<u64>) -> Vec<(u64, u64, u64)> {
    let mut walked = Vec::new();
    let mut position = start;
    while let Some(rest) = buf.get(position..) {
        let Ok(Some(len)) = peek_len(rest) else { break };
        let Some(end) = position.checked_add(len).filter(|&end| end <= buf.len()) else { break };
        if let Some(first) = renumber_from {
            let offset = first.wrapping_add(walked.len() as u64);
            buf[position + 8..position + 16].copy_from_slice(&offset.to_be_bytes());
        }
        let crc = crc32fast::hash(&buf[position + RECORD_PREFIX_BYTES..end]);
        buf[position + 4..position + 8].copy_from_slice(&crc.to_be_bytes());
        let offset = u64::from_be_bytes(buf[position + 8..position + 16].try_into().unwrap_or_default());
        let timestamp_us = u64::from_be_bytes(buf[position + 16..position + 24].try_into().unwrap_or_default());
        walked.push((position as u64, offset, timestamp_us));
        position = end;
    }
    walked
}

/// `flags` of a [`SegmentCase`], bit by bit.
pub mod flags {
    /// Each `.log` gets a valid 16-byte file header before its section.
    pub const LOG_HEADER: u8 = 1 << 0;
    /// The whole records of each `.log` get correct CRCs.
    pub const SEAL: u8 = 1 << 1;
    /// The whole records of each `.log` are renumbered from the segment's
    /// base offset (then sealed).
    pub const RENUMBER: u8 = 1 << 2;
    /// Each index file gets a valid file header before its section.
    pub const INDEX_HEADER: u8 = 1 << 3;
    /// Bits 4 and 5: the fsync policy; 0 `always`, 1 `interval`, else `never`.
    pub const FSYNC_SHIFT: u8 = 4;
    /// Two segments instead of one.
    pub const TWO_SEGMENTS: u8 = 1 << 6;
    /// The index files are derived from the log (an entry for every whole
    /// record), then their sections are XORed over the entries.
    pub const DERIVED_INDEXES: u8 = 1 << 7;
}

/// The files of one segment.
#[derive(Clone, Debug, Default)]
pub struct SegmentFiles {
    pub base_offset: u64,
    pub log: Vec<u8>,
    /// `None`: the file is missing.
    pub offset_index: Option<Vec<u8>>,
    pub time_index: Option<Vec<u8>>,
}

/// The input of the `segment_recovery` target, decoded from the fuzzer's
/// bytes by [`SegmentCase::from_bytes`]:
///
/// | pos | size | field                                                    |
/// |-----|------|----------------------------------------------------------|
/// | 0   | 1    | `flags`, see [`flags`]                                   |
/// | 1   | 1    | bits 0-6: `index_interval_bytes` = 1 + 16 × value; bit 7: headers the flags add (and new segments) are format version 2, else 1 |
/// | 2   | 1    | base offset of the first segment                         |
/// | 3   | 1    | gap: base of the second segment = base of the first + its whole records + gap |
/// | 4   | ..   | sections, each a u16 big-endian length then that many bytes (cut short at the end of the input): `.log`, `.index`, `.timeindex` of the first segment, then of the second |
///
/// A section the input ends before is a missing file (for an index) or an
/// empty one (for a `.log`).
#[derive(Clone, Debug)]
pub struct SegmentCase {
    pub fsync: FsyncPolicy,
    /// The format version of the file headers the flags add, and of the
    /// segments the log creates.
    pub version: u16,
    pub index_interval_bytes: u64,
    pub segments: Vec<SegmentFiles>,
}

impl SegmentCase {
    /// Decodes the fuzzer's bytes; `None` when they are shorter than the
    /// four fixed bytes.
    pub fn from_bytes(data: &[u8]) -> Option<SegmentCase> {
        let (&[flag_bits, interval_and_version, base, gap], mut rest) = data.split_first_chunk::<4>()?;
        let interval = interval_and_version & 0x7f;
        let version = if interval_and_version & 0x80 != 0 { index::FORMAT_VERSION_2 } else { index::FORMAT_VERSION_1 };
        let mut section = || -> Option<Vec<u8>> {
            let (len, after) = rest.split_first_chunk::<2>()?;
            let len = (u16::from_be_bytes(*len) as usize).min(after.len());
            let (bytes, after) = after.split_at(len);
            rest = after;
            Some(bytes.to_vec())
        };
        let segment_count = if flag_bits & flags::TWO_SEGMENTS != 0 { 2 } else { 1 };
        let mut segments = Vec::with_capacity(segment_count);
        let mut next_base = base as u64;
        for _ in 0..segment_count {
            let mut files = SegmentFiles {
                base_offset: next_base,
                log: section().unwrap_or_default(),
                offset_index: section(),
                time_index: section(),
            };
            if flag_bits & flags::LOG_HEADER != 0 {
                files.log.splice(0..0, index::encode_file_header(FileKind::Log, version, files.base_offset));
            }
            let renumber = (flag_bits & flags::RENUMBER != 0).then_some(files.base_offset);
            let walked = if flag_bits & (flags::SEAL | flags::RENUMBER) != 0 {
                seal_records(&mut files.log, FILE_HEADER_BYTES, renumber)
            } else {
                seal_records(&mut files.log.clone(), FILE_HEADER_BYTES, None)
            };
            if flag_bits & flags::DERIVED_INDEXES != 0 {
                let offsets: Vec<_> =
                    walked.iter().map(|&(position, offset, _)| IndexEntry { key: offset, value: position }).collect();
                let times: Vec<_> =
                    walked.iter().map(|&(_, offset, time)| IndexEntry { key: time, value: offset }).collect();
                files.offset_index = Some(derived_index(
                    FileKind::OffsetIndex,
                    version,
                    files.base_offset,
                    &offsets,
                    files.offset_index.as_deref(),
                ));
                files.time_index = Some(derived_index(
                    FileKind::TimeIndex,
                    version,
                    files.base_offset,
                    &times,
                    files.time_index.as_deref(),
                ));
            } else if flag_bits & flags::INDEX_HEADER != 0 {
                for (kind, file) in
                    [(FileKind::OffsetIndex, &mut files.offset_index), (FileKind::TimeIndex, &mut files.time_index)]
                {
                    if let Some(bytes) = file {
                        bytes.splice(0..0, index::encode_file_header(kind, version, files.base_offset));
                    }
                }
            }
            next_base = files.base_offset.saturating_add(walked.len() as u64).saturating_add(gap as u64);
            segments.push(files);
        }
        let fsync = match (flag_bits >> flags::FSYNC_SHIFT) & 3 {
            0 => FsyncPolicy::Always,
            1 => FsyncPolicy::Interval,
            _ => FsyncPolicy::Never,
        };
        Some(SegmentCase { fsync, version, index_interval_bytes: 1 + 16 * interval as u64, segments })
    }

    /// Writes the segment files into `dir`, named as weir names them.
    ///
    /// # Errors
    /// The operating system's error.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for files in &self.segments {
            let name = |extension: &str| dir.join(format!("{:020}.{extension}", files.base_offset));
            std::fs::write(name("log"), &files.log)?;
            if let Some(bytes) = &files.offset_index {
                std::fs::write(name("index"), bytes)?;
            }
            if let Some(bytes) = &files.time_index {
                std::fs::write(name("timeindex"), bytes)?;
            }
        }
        Ok(())
    }
}

/// An index file holding `entries`, with `noise` XORed over the entries
/// (not the header).
fn derived_index(
    kind: FileKind,
    version: u16,
    base_offset: u64,
    entries: &[IndexEntry],
    noise: Option<&[u8]>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.len() * index::INDEX_ENTRY_BYTES);
    index::encode_entries(entries, &mut body);
    for (byte, noise) in body.iter_mut().zip(noise.unwrap_or_default()) {
        *byte ^= noise;
    }
    let mut file = index::encode_file_header(kind, version, base_offset).to_vec();
    file.extend_from_slice(&body);
    file
}

/// Encodes the fixed bytes and sections of a [`SegmentCase`] input, for
/// seeds: the inverse of the layout [`SegmentCase::from_bytes`] reads.
pub fn segment_case_bytes(flag_bits: u8, interval: u8, base: u8, gap: u8, sections: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![flag_bits, interval, base, gap];
    for section in sections {
        let len = section.len().min(u16::MAX as usize);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&section[..len]);
    }
    out
}
