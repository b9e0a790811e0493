//! Offline verification of a data directory (`weir check`): every channel,
//! every segment, every record. It only reads; it never repairs.
//!
//! Checked: file headers; every record's length, CRC and fields; offsets
//! dense within and across segments; timestamps never decreasing; every
//! offset and time index entry pointing at the record it names; nothing
//! after the last whole record of a segment.
//!
//! Each problem has a verdict. *Repairable* problems are what a crash or a
//! file-system snapshot leaves and what the broker repairs on start without
//! losing anything it promised to keep: a torn tail (bad bytes with no valid
//! record after them) in the last segment, stale or missing indexes.
//! *Corrupt* problems are damage to data that was complete: bad bytes
//! followed by valid records, a bad record in a sealed segment, missing
//! offsets, broken headers.

use std::fmt;
use std::path::{Path, PathBuf};

use super::channel::{CHANNEL_SETTINGS_FILE, PARTITIONS_LIMIT, parse_partition_dir, partition_dir, read_settings};
use super::channel_name::ChannelName;
use super::fs::{FileSystem, OpenMode, StdFileSystem};
use super::index::{self, FILE_HEADER_BYTES, FORMAT_VERSION_1, FileKind, IndexEntry};
use super::log::FsyncPolicy;
use super::segment::{self, LOG_EXTENSION, OFFSET_INDEX_EXTENSION, TIME_INDEX_EXTENSION};
use super::store::CHANNELS_DIR;
use crate::record::{self, RecordError};

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Severity {
    /// The broker repairs it on start, losing nothing acknowledged (a torn
    /// tail of unsynced records, an index to rebuild).
    Repairable,
    /// Damage to complete data: the broker reports it and serves what is
    /// intact, but the damaged records are gone.
    Corrupt,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Repairable => "repairable",
            Severity::Corrupt => "corrupt",
        })
    }
}

/// One thing found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub channel: String,
    /// The file, when the problem is in one.
    pub file: Option<PathBuf>,
    /// The byte position in that file, when known.
    pub position: Option<u64>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: channel {}", self.severity, self.channel)?;
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

/// The verdict on a whole data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// Only repairable problems: the broker repairs them on start.
    Repairable,
    /// At least one corrupt problem.
    Corrupt,
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

    pub fn verdict(&self) -> Verdict {
        match self.problems.iter().map(|problem| problem.severity).max() {
            None => Verdict::Clean,
            Some(Severity::Repairable) => Verdict::Repairable,
            Some(Severity::Corrupt) => Verdict::Corrupt,
        }
    }

    /// The problems of one severity.
    pub fn count(&self, severity: Severity) -> usize {
        self.problems.iter().filter(|problem| problem.severity == severity).count()
    }
}

/// The fsync policy each channel runs with, which decides what a torn end
/// of its last sealed segment means (under `interval` and `never` a crash
/// may tear it and the broker repairs it; under `always` it may not).
#[derive(Clone, Debug, Default)]
pub struct FsyncPolicies {
    pub default: FsyncPolicy,
    /// Channels configured with another policy (`[channels.NAME] fsync`).
    pub channels: std::collections::BTreeMap<String, FsyncPolicy>,
}

impl FsyncPolicies {
    /// Every channel with `policy`.
    pub fn all(policy: FsyncPolicy) -> FsyncPolicies {
        FsyncPolicies { default: policy, channels: Default::default() }
    }

    fn of(&self, channel: &str) -> FsyncPolicy {
        self.channels.get(channel).copied().unwrap_or(self.default)
    }
}

/// Checks every channel under `data_dir`, judging torn ends as the broker
/// running with those fsync policies would.
///
/// # Errors
/// Only when `data_dir` itself cannot be listed; everything else is a
/// [`Problem`] in the report.
pub fn check_data_dir(data_dir: &Path, fsync: &FsyncPolicies) -> std::io::Result<CheckReport> {
    let fs = StdFileSystem;
    let channels_dir = data_dir.join(CHANNELS_DIR);
    let mut names = fs.list(&channels_dir)?;
    names.sort();
    let mut report = CheckReport::default();
    for name in names {
        if ChannelName::new(&name).is_err() {
            report.problems.push(Problem {
                severity: Severity::Repairable,
                channel: name.clone(),
                file: Some(channels_dir.join(&name)),
                position: None,
                what: "not a valid channel name; the broker ignores this directory".into(),
            });
            continue;
        }
        report.channels += 1;
        check_partitions(&fs, &name, &channels_dir.join(&name), fsync.of(&name), &mut report);
    }
    // The broker's internal log of durable subscription offsets has the
    // same format.
    let offsets_dir = data_dir.join("system").join("offsets");
    if offsets_dir.is_dir() {
        check_channel(&fs, "system/offsets", &offsets_dir, fsync.default, false, &mut report);
    }
    Ok(report)
}

/// Checks every partition of the channel in `dir`: partition 0 in the
/// directory itself, the others in their `partition-N` directories.
fn check_partitions(fs: &dyn FileSystem, name: &str, dir: &Path, fsync: FsyncPolicy, report: &mut CheckReport) {
    let problem = |severity, file: &Path, what: String| Problem {
        severity,
        channel: name.to_owned(),
        file: Some(file.to_path_buf()),
        position: None,
        what,
    };
    let (count, replicated) = match read_settings(fs, dir) {
        Ok(settings) => (settings.partition_count(), settings.replicated == Some(true)),
        Err(error) => {
            report.problems.push(problem(Severity::Corrupt, &dir.join(CHANNEL_SETTINGS_FILE), error.to_string()));
            return;
        }
    };
    if count == 0 || count > PARTITIONS_LIMIT {
        let what =
            format!("partitions = {count} is outside 1..={PARTITIONS_LIMIT}; the broker refuses to open this channel");
        report.problems.push(problem(Severity::Corrupt, &dir.join(CHANNEL_SETTINGS_FILE), what));
        return;
    }
    check_channel(fs, name, dir, fsync, replicated, report);
    for partition in 1..count {
        let partition_dir = partition_dir(dir, partition);
        let label = format!("{name} partition {partition}");
        if partition_dir.is_dir() {
            check_channel(fs, &label, &partition_dir, fsync, replicated, report);
        } else {
            report.problems.push(problem(
                Severity::Repairable,
                &partition_dir,
                format!("partition {partition} of {count} has no directory (a crash while partitions were added); the broker creates it, empty, on start"),
            ));
        }
    }
    for entry in fs.list(dir).unwrap_or_default() {
        if let Some(partition) = parse_partition_dir(&entry)
            && partition >= count
        {
            report.problems.push(problem(
                Severity::Repairable,
                &dir.join(&entry),
                format!("beyond the channel's {count} partitions (channel.toml); the broker ignores it"),
            ));
        }
    }
}

/// Where a segment stands in its log, which decides what a torn end means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Last,
    /// The segment before the last: under `interval` and `never` its sync
    /// runs in the background after the roll, so a crash can tear its end.
    LastSealed,
    Earlier,
}

/// `replicated`: the local copy of a replicated channel, whose damage in
/// the part a crash can leave unsynced the broker cuts (STORAGE.md).
fn check_channel(
    fs: &dyn FileSystem,
    channel: &str,
    dir: &Path,
    fsync: FsyncPolicy,
    replicated: bool,
    report: &mut CheckReport,
) {
    let problem = |severity: Severity, file: Option<PathBuf>, position: Option<u64>, what: String| Problem {
        severity,
        channel: channel.to_owned(),
        file,
        position,
        what,
    };
    let names = match fs.list(dir) {
        Ok(names) => names,
        Err(error) => {
            report.problems.push(problem(
                Severity::Corrupt,
                Some(dir.to_path_buf()),
                None,
                format!("cannot list: {error}"),
            ));
            return;
        }
    };
    if names.iter().any(|name| name == super::log::TRANSFER_DIR) {
        report.problems.push(problem(
            Severity::Repairable,
            Some(dir.join(super::log::TRANSFER_DIR)),
            None,
            "a segment copy from another replica that a crash interrupted; the broker finishes it (or, not whole, removes it) on start".into(),
        ));
    }
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|name| segment::parse_file_name(name))
        .filter(|&(_, extension)| extension == LOG_EXTENSION)
        .map(|(base, _)| base)
        .collect();
    bases.sort_unstable();
    let mut expected_offset: Option<u64> = None;
    let mut last_timestamp_us: Option<u64> = None;
    let mut set_aside_next = false;
    for (i, &base) in bases.iter().enumerate() {
        report.segments += 1;
        let path = dir.join(segment::file_name(base, LOG_EXTENSION));
        let place = match bases.len() - i {
            1 => Place::Last,
            2 => Place::LastSealed,
            _ => Place::Earlier,
        };
        if set_aside_next {
            report.problems.push(problem(
                Severity::Repairable,
                Some(path.clone()),
                None,
                "follows a torn last sealed segment: it holds only records that were never synced; the broker sets it aside as *.torn".into(),
            ));
            continue;
        }
        if let Some(expected) = expected_offset
            && expected != base
            && place == Place::Last
            && fsync != FsyncPolicy::Always
            && expected < base
        {
            // The last sealed segment ends early at a record boundary: its
            // background sync was cut by a crash.
            report.problems.push(problem(
                Severity::Repairable,
                Some(path.clone()),
                None,
                format!("segment starts at offset {base} but the last sealed one ends at {expected} (its background sync was cut by a crash): this segment holds only records that were never synced; the broker sets it aside as *.torn"),
            ));
            continue;
        }
        if let Some(expected) = expected_offset
            && expected != base
        {
            report.problems.push(problem(
                Severity::Corrupt,
                Some(path.clone()),
                None,
                format!("segment starts at offset {base} but the previous one ends at {expected}"),
            ));
        }
        let mut segment_check = SegmentCheck { problems: Vec::new(), index_targets: Vec::new(), records: 0 };
        let scanned = check_segment_log(
            fs,
            &path,
            base,
            last_timestamp_us,
            place,
            Judged { fsync, replicated },
            &mut segment_check,
        );
        set_aside_next = scanned.torn_end_sets_aside_next;
        for (severity, position, what) in segment_check.problems.drain(..) {
            report.problems.push(problem(severity, Some(path.clone()), position, what));
        }
        report.records += segment_check.records;
        report.bytes += scanned.bytes;
        expected_offset = Some(scanned.next_offset);
        last_timestamp_us = scanned.last_timestamp_us.or(last_timestamp_us);
        for (extension, kind) in
            [(OFFSET_INDEX_EXTENSION, FileKind::OffsetIndex), (TIME_INDEX_EXTENSION, FileKind::TimeIndex)]
        {
            let index_path = dir.join(segment::file_name(base, extension));
            let index_problems = check_index(fs, &index_path, kind, base, &segment_check.index_targets);
            // Indexes are derived data, rebuilt by the broker on open: one
            // line per file, however many entries are stale.
            if let Some((position, what)) = index_problems.first() {
                let more = match index_problems.len() {
                    1 => String::new(),
                    n => format!(" (and {} more problems in this file)", n - 1),
                };
                report.problems.push(problem(
                    Severity::Repairable,
                    Some(index_path.clone()),
                    *position,
                    format!("{what}{more}; the broker rebuilds this index from the log on start"),
                ));
            }
        }
    }
}

struct SegmentCheck {
    problems: Vec<(Severity, Option<u64>, String)>,
    /// (position, offset, timestamp) of every valid frame (record or batch
    /// header), in order: what index entries may name.
    index_targets: Vec<(u64, u64, u64)>,
    records: u64,
}

/// A batch header of a version-2 segment whose records are being counted.
struct OpenBatch {
    position: usize,
    end_offset: u64,
    /// Damage was found inside it: its records cannot be counted.
    damaged: bool,
}

/// The problem with a batch whose records ended at `next_offset`, if any.
fn batch_problem(batch: &OpenBatch, next_offset: u64, last: bool) -> Option<(Severity, Option<u64>, String)> {
    if batch.damaged || batch.end_offset == next_offset {
        return None;
    }
    let position = Some(batch.position as u64);
    if last && next_offset < batch.end_offset {
        return Some((
            Severity::Repairable,
            position,
            format!(
                "the last batch stops at offset {next_offset}, before the end its header names ({}): an append that never reached the disk whole; the broker cuts it on start",
                batch.end_offset
            ),
        ));
    }
    Some((
        Severity::Corrupt,
        position,
        format!("the batch header names records up to offset {}, but they end at {next_offset}", batch.end_offset),
    ))
}

struct Scanned {
    bytes: u64,
    next_offset: u64,
    last_timestamp_us: Option<u64>,
    /// The segment's end is torn in the way the broker repairs by setting
    /// the segment after it aside.
    torn_end_sets_aside_next: bool,
}

/// What the broker does with damage in the last two segments of a
/// replicated partition's copy (STORAGE.md, "Recovery").
const REPLICATED_CUT: &str = "the broker cuts a replicated partition's log here, sets what follows aside (*.torn) and applies those Raft entries again; a replica whose cut reaches below what it recorded as applied and synced refuses to start (OPERATIONS.md, \"A replica that refuses to start\")";

/// How the broker would judge a log's bad bytes: by its fsync policy, and
/// whether it is a replicated partition's copy.
#[derive(Clone, Copy)]
struct Judged {
    fsync: FsyncPolicy,
    replicated: bool,
}

fn check_segment_log(
    fs: &dyn FileSystem,
    path: &Path,
    base: u64,
    mut last_timestamp_us: Option<u64>,
    place: Place,
    judged: Judged,
    out: &mut SegmentCheck,
) -> Scanned {
    let Judged { fsync, replicated } = judged;
    let mut scanned = Scanned { bytes: 0, next_offset: base, last_timestamp_us: None, torn_end_sets_aside_next: false };
    let data = match fs.open(path, OpenMode::Existing).and_then(|file| file.read_range(0, file.len() as usize)) {
        Ok(data) => data,
        Err(error) => {
            out.problems.push((Severity::Corrupt, None, format!("cannot read: {error}")));
            return scanned;
        }
    };
    scanned.bytes = data.len() as u64;
    if data.len() <= FILE_HEADER_BYTES
        && place == Place::Last
        && index::check_file_header(&data, FileKind::Log, base).is_err()
    {
        out.problems.push((
            Severity::Repairable,
            Some(0),
            "no whole header and no record (a crash while it was created); the broker writes the header again".into(),
        ));
        return scanned;
    }
    let version = match index::check_file_header(&data, FileKind::Log, base) {
        Ok(version) => version,
        Err(what) => {
            out.problems.push((Severity::Corrupt, Some(0), what));
            return scanned;
        }
    };
    let mut position = FILE_HEADER_BYTES;
    let mut batch: Option<OpenBatch> = None;
    let mut bad_end = None;
    while position < data.len() {
        let verified = if version == FORMAT_VERSION_1 {
            record::verify(&data[position..])
        } else {
            record::verify_frame(&data[position..])
        };
        let checked = verified.and_then(|meta| {
            if meta.offset != scanned.next_offset {
                return Err(RecordError::Malformed { reason: "offset out of sequence" });
            }
            if last_timestamp_us.is_some_and(|last| meta.timestamp_us < last) {
                return Err(RecordError::Malformed { reason: "timestamp goes backwards" });
            }
            Ok(meta)
        });
        let meta = match checked {
            Ok(meta) => meta,
            Err(reason) => {
                match segment::find_next_record(version, &data, position, scanned.next_offset, last_timestamp_us) {
                    Some((next_position, _)) if replicated && matches!(place, Place::Last | Place::LastSealed) => {
                        out.problems.push((
                            Severity::Repairable,
                            Some(position as u64),
                            format!(
                                "{reason}: {} damaged bytes followed by valid records (pages written back out of order by a power loss, or damage); {REPLICATED_CUT}",
                                next_position - position
                            ),
                        ));
                        scanned.torn_end_sets_aside_next = place == Place::LastSealed;
                        bad_end = Some(Severity::Repairable);
                        break;
                    }
                    Some((next_position, next)) => {
                        if let Some(batch) = &mut batch {
                            batch.damaged = true;
                        }
                        out.problems.push((
                            Severity::Corrupt,
                            Some(position as u64),
                            format!(
                                "{reason}: {} damaged bytes holding {}, followed by valid records; the broker keeps the rest of the log, reads of the damaged offsets fail, reads from offset {} on work",
                                next_position - position,
                                segment::describe_offsets(scanned.next_offset, next.offset),
                                next.offset
                            ),
                        ));
                        scanned.next_offset = next.offset;
                        position = next_position;
                        continue;
                    }
                    None => {
                        let torn = segment::is_torn_end(&data[position..], &reason);
                        let unit = if version == FORMAT_VERSION_1 { "record" } else { "batch" };
                        let mut verdict = torn_end_verdict(place, judged, torn, data.len() - position, unit, &reason);
                        let mut cut_from = position;
                        // The broker cuts a torn end from the start of the batch
                        // it leaves short: a batch is kept whole or not at all.
                        if let Some(short) = batch.as_ref().filter(|b| !b.damaged && b.end_offset > scanned.next_offset)
                            && verdict.0 == Severity::Repairable
                        {
                            cut_from = short.position;
                            verdict = torn_end_verdict(place, judged, torn, data.len() - cut_from, unit, &reason);
                            batch = None;
                        }
                        let (severity, what) = verdict;
                        scanned.torn_end_sets_aside_next =
                            place == Place::LastSealed && severity == Severity::Repairable;
                        bad_end = Some(severity);
                        out.problems.push((severity, Some(cut_from as u64), what));
                        break;
                    }
                }
            }
        };
        out.index_targets.push((position as u64, meta.offset, meta.timestamp_us));
        last_timestamp_us = Some(meta.timestamp_us);
        scanned.last_timestamp_us = Some(meta.timestamp_us);
        match meta.batch {
            Some(header) => {
                if let Some(problem) = batch.as_ref().and_then(|batch| batch_problem(batch, meta.offset, false)) {
                    out.problems.push(problem);
                }
                batch = Some(OpenBatch {
                    position,
                    end_offset: meta.offset.saturating_add(u64::from(header.count)),
                    damaged: false,
                });
            }
            None => {
                let outside = batch.as_ref().is_none_or(|batch| !batch.damaged && meta.offset >= batch.end_offset);
                if version != FORMAT_VERSION_1 && outside {
                    out.problems.push((
                        Severity::Corrupt,
                        Some(position as u64),
                        format!("record at offset {} belongs to no batch header", meta.offset),
                    ));
                }
                out.records += 1;
                scanned.next_offset = meta.offset + 1;
            }
        }
        position += meta.len;
    }
    // A torn end the broker cuts takes the batch it cut short with it (see
    // above); after a bad end it keeps, that batch is damaged.
    // The broker cuts a short last batch of the last segment, and of the
    // last sealed one when its background sync may have been cut.
    let cut_by_the_broker = place == Place::Last || (place == Place::LastSealed && fsync != FsyncPolicy::Always);
    if let Some(batch) = &batch
        && bad_end.is_none()
        && let Some(problem) = batch_problem(batch, scanned.next_offset, cut_by_the_broker)
    {
        out.problems.push(problem);
    }
    scanned
}

/// What bad bytes with no valid record after them mean, by where the
/// segment stands, the fsync policy and whether the log is a replicated
/// partition's copy.
fn torn_end_verdict(
    place: Place,
    Judged { fsync, replicated }: Judged,
    torn: bool,
    bytes: usize,
    unit: &str,
    reason: &RecordError,
) -> (Severity, String) {
    match (place, fsync) {
        (Place::Last | Place::LastSealed, _)
            if replicated && !(torn && (place == Place::Last || fsync != FsyncPolicy::Always)) =>
        {
            (
                Severity::Repairable,
                format!("{reason}: the last {bytes} bytes are damaged, not a torn write; {REPLICATED_CUT}"),
            )
        }
        (Place::Last, _) if !torn => (
            Severity::Corrupt,
            format!(
                "{reason}: the last {bytes} bytes are a damaged record, not a torn write (they do not end in unwritten zeros); the broker keeps them and never gives their offsets to another record"
            ),
        ),
        (Place::Last, _) => (
            Severity::Repairable,
            format!(
                "torn tail: {bytes} bytes after the last whole {unit} ({reason}); records never acknowledged under fsync = \"always\" (under \"interval\"/\"never\": never synced); the broker cuts them on start"
            ),
        ),
        (Place::LastSealed, FsyncPolicy::Interval | FsyncPolicy::Never) if torn => (
            Severity::Repairable,
            format!(
                "torn end of the last sealed segment: {bytes} bytes ({reason}); its background sync was cut by a crash; the broker cuts them and sets the segment after it aside"
            ),
        ),
        _ => (
            Severity::Corrupt,
            format!(
                "{reason}: the last {bytes} bytes of a sealed segment cannot be read; the broker keeps them as damage (the offsets they held up to the next segment are unreadable) and serves the rest"
            ),
        ),
    }
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
