//! Offline verification of a data directory (`weir check`): every channel,
//! every segment, every record. It only reads; it never repairs.
//!
//! Checked: file headers; every record's length, CRC and fields; offsets
//! dense within and across segments; timestamps never decreasing; every
//! offset and time index entry pointing at the record it names; nothing
//! after the last whole record of a segment.

use std::fmt;
use std::path::{Path, PathBuf};

use super::channel_name::ChannelName;
use super::fs::{FileSystem, OpenMode, StdFileSystem};
use super::index::{self, FILE_HEADER_BYTES, FileKind, IndexEntry};
use super::segment::{self, LOG_EXTENSION, OFFSET_INDEX_EXTENSION, TIME_INDEX_EXTENSION};
use super::store::CHANNELS_DIR;
use crate::record;

/// One thing found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub channel: String,
    /// The file, when the problem is in one.
    pub file: Option<PathBuf>,
    /// The byte position in that file, when known.
    pub position: Option<u64>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "channel {}", self.channel)?;
        if let Some(file) = &self.file {
            let name =
                file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
            write!(f, ", {name}")?;
        }
        if let Some(position) = self.position {
            write!(f, ", byte {position}")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// The outcome of a check.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub channels: u64,
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks every channel under `data_dir`.
///
/// # Errors
/// Only when `data_dir` itself cannot be listed; everything else is a
/// [`Problem`] in the report.
pub fn check_data_dir(data_dir: &Path) -> std::io::Result<CheckReport> {
    let fs = StdFileSystem;
    let channels_dir = data_dir.join(CHANNELS_DIR);
    let mut names = fs.list(&channels_dir)?;
    names.sort();
    let mut report = CheckReport::default();
    for name in names {
        if ChannelName::new(&name).is_err() {
            report.problems.push(Problem {
                channel: name.clone(),
                file: Some(channels_dir.join(&name)),
                position: None,
                what: "not a valid channel name; the broker ignores this directory".into(),
            });
            continue;
        }
        report.channels += 1;
        check_channel(&fs, &name, &channels_dir.join(&name), &mut report);
    }
    // The broker's internal log of durable subscription offsets has the
    // same format.
    let offsets_dir = data_dir.join("system").join("offsets");
    if offsets_dir.is_dir() {
        check_channel(&fs, "system/offsets", &offsets_dir, &mut report);
    }
    Ok(report)
}

fn check_channel(fs: &dyn FileSystem, channel: &str, dir: &Path, report: &mut CheckReport) {
    let problem = |file: Option<PathBuf>, position: Option<u64>, what: String| Problem {
        channel: channel.to_owned(),
        file,
        position,
        what,
    };
    let names = match fs.list(dir) {
        Ok(names) => names,
        Err(error) => {
            report.problems.push(problem(Some(dir.to_path_buf()), None, format!("cannot list: {error}")));
            return;
        }
    };
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|name| segment::parse_file_name(name))
        .filter(|&(_, extension)| extension == LOG_EXTENSION)
        .map(|(base, _)| base)
        .collect();
    bases.sort_unstable();
    let mut expected_offset: Option<u64> = None;
    let mut last_timestamp_us: Option<u64> = None;
    for base in bases {
        report.segments += 1;
        let path = dir.join(segment::file_name(base, LOG_EXTENSION));
        if let Some(expected) = expected_offset
            && expected != base
        {
            report.problems.push(problem(
                Some(path.clone()),
                None,
                format!("segment starts at offset {base} but the previous one ends at {expected}"),
            ));
        }
        let mut segment_check = SegmentCheck { problems: Vec::new(), records: Vec::new() };
        let scanned = check_segment_log(fs, &path, base, last_timestamp_us, &mut segment_check);
        for (position, what) in segment_check.problems.drain(..) {
            report.problems.push(problem(Some(path.clone()), position, what));
        }
        report.records += segment_check.records.len() as u64;
        report.bytes += scanned.bytes;
        expected_offset = Some(scanned.next_offset);
        last_timestamp_us = scanned.last_timestamp_us.or(last_timestamp_us);
        for (extension, kind) in
            [(OFFSET_INDEX_EXTENSION, FileKind::OffsetIndex), (TIME_INDEX_EXTENSION, FileKind::TimeIndex)]
        {
            let index_path = dir.join(segment::file_name(base, extension));
            for (position, what) in check_index(fs, &index_path, kind, base, &segment_check.records) {
                report.problems.push(problem(Some(index_path.clone()), position, what));
            }
        }
    }
}

struct SegmentCheck {
    problems: Vec<(Option<u64>, String)>,
    /// (position, offset, timestamp) of every valid record, in order.
    records: Vec<(u64, u64, u64)>,
}

struct Scanned {
    bytes: u64,
    next_offset: u64,
    last_timestamp_us: Option<u64>,
}

fn check_segment_log(
    fs: &dyn FileSystem,
    path: &Path,
    base: u64,
    mut last_timestamp_us: Option<u64>,
    out: &mut SegmentCheck,
) -> Scanned {
    let mut scanned = Scanned { bytes: 0, next_offset: base, last_timestamp_us: None };
    let data = match fs.open(path, OpenMode::Existing).and_then(|file| file.read_range(0, file.len() as usize)) {
        Ok(data) => data,
        Err(error) => {
            out.problems.push((None, format!("cannot read: {error}")));
            return scanned;
        }
    };
    scanned.bytes = data.len() as u64;
    if let Err(what) = index::check_file_header(&data, FileKind::Log, base) {
        out.problems.push((Some(0), what));
        return scanned;
    }
    let mut position = FILE_HEADER_BYTES;
    while position < data.len() {
        let meta = match record::verify(&data[position..]) {
            Ok(meta) => meta,
            Err(record::RecordError::Incomplete { .. }) => {
                let cut = data.len() - position;
                out.problems
                    .push((Some(position as u64), format!("torn tail: {cut} bytes after the last whole record")));
                break;
            }
            Err(error) => {
                // When the length field is plausible, carry on after the bad
                // record so that one flipped bit is one problem, not a
                // cascade; otherwise the rest of the segment is unreadable.
                match record::peek_len(&data[position..]) {
                    Ok(Some(len)) if position + len <= data.len() => {
                        out.problems.push((Some(position as u64), error.to_string()));
                        scanned.next_offset += 1;
                        position += len;
                        continue;
                    }
                    _ => {
                        let rest = data.len() - position;
                        out.problems.push((
                            Some(position as u64),
                            format!("{error}; the remaining {rest} bytes of the segment cannot be checked"),
                        ));
                        break;
                    }
                }
            }
        };
        if meta.offset != scanned.next_offset {
            out.problems.push((
                Some(position as u64),
                format!("record has offset {}, expected {}", meta.offset, scanned.next_offset),
            ));
        }
        if let Some(last) = last_timestamp_us
            && meta.timestamp_us < last
        {
            out.problems
                .push((Some(position as u64), format!("timestamp {} goes back from {last}", meta.timestamp_us)));
        }
        out.records.push((position as u64, meta.offset, meta.timestamp_us));
        last_timestamp_us = Some(meta.timestamp_us);
        scanned.last_timestamp_us = Some(meta.timestamp_us);
        scanned.next_offset = meta.offset + 1;
        position += meta.len;
    }
    scanned
}

fn check_index(
    fs: &dyn FileSystem,
    path: &Path,
    kind: FileKind,
    base: u64,
    records: &[(u64, u64, u64)],
) -> Vec<(Option<u64>, String)> {
    let mut problems = Vec::new();
    let data = match fs.open(path, OpenMode::Existing).and_then(|file| file.read_range(0, file.len() as usize)) {
        Ok(data) => data,
        Err(error) => {
            problems.push((None, format!("cannot read (the broker rebuilds it on open): {error}")));
            return problems;
        }
    };
    if let Err(what) = index::check_file_header(&data, kind, base) {
        problems.push((Some(0), what));
        return problems;
    }
    let body = &data[FILE_HEADER_BYTES..];
    if body.len() % index::INDEX_ENTRY_BYTES != 0 {
        problems.push((Some(data.len() as u64), "torn entry at the end".into()));
    }
    let entries = match index::decode_entries(body) {
        Ok(entries) => entries,
        Err(what) => {
            problems.push((None, what));
            return problems;
        }
    };
    for (i, entry) in entries.iter().enumerate() {
        let position = (FILE_HEADER_BYTES + i * index::INDEX_ENTRY_BYTES) as u64;
        if let Some(what) = index_entry_problem(kind, *entry, records) {
            problems.push((Some(position), what));
        }
    }
    problems
}

fn index_entry_problem(kind: FileKind, entry: IndexEntry, records: &[(u64, u64, u64)]) -> Option<String> {
    match kind {
        FileKind::OffsetIndex => {
            let found = records.binary_search_by_key(&entry.value, |&(position, _, _)| position);
            match found {
                Ok(i) if records[i].1 == entry.key => None,
                Ok(i) => Some(format!(
                    "entry says offset {} is at byte {}, but the record there has offset {}",
                    entry.key, entry.value, records[i].1
                )),
                Err(_) => Some(format!(
                    "entry for offset {} points at byte {}, which is not the start of a valid record",
                    entry.key, entry.value
                )),
            }
        }
        FileKind::TimeIndex => {
            let record = records.binary_search_by_key(&entry.value, |&(_, offset, _)| offset).ok().map(|i| &records[i]);
            match record {
                Some(&(_, _, timestamp_us)) if timestamp_us == entry.key => None,
                Some(&(_, _, timestamp_us)) => Some(format!(
                    "entry says offset {} has timestamp {}, but it has {timestamp_us}",
                    entry.value, entry.key
                )),
                None => Some(format!("entry for offset {} names no valid record of this segment", entry.value)),
            }
        }
        FileKind::Log => None,
    }
}
