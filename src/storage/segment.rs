//! One segment: a `.log` file of records plus its sparse `.index` (offset to
//! byte position) and `.timeindex` (timestamp to offset), all named by the
//! segment's zero-padded base offset.
//!
//! A segment owns recovery of its own files (verify, truncate a torn tail,
//! rebuild indexes) and serves reads of whole, CRC-checked records. Appends
//! are driven by the channel log, which is the segment's only writer.

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::error::{IoContext, StorageError};
use super::fs::{FileSystem, OpenMode, StorageFile};
use super::index::{
    self, FILE_HEADER_BYTES, FORMAT_VERSION_1, FORMAT_VERSION_2, FileKind, INDEX_ENTRY_BYTES, IndexEntry,
};
use super::log::RaftPosition;
use crate::record::{self, BatchHeader, EntryKind, RECORD_OVERHEAD_BYTES, RecordError, RecordMeta};

pub(crate) const LOG_EXTENSION: &str = "log";
pub(crate) const OFFSET_INDEX_EXTENSION: &str = "index";
pub(crate) const TIME_INDEX_EXTENSION: &str = "timeindex";

/// The file name of a segment file: base offset in 20 digits, then the
/// extension, so that names sort in offset order.
pub(crate) fn file_name(base_offset: u64, extension: &str) -> String {
    format!("{base_offset:020}.{extension}")
}

/// The base offset a segment file name encodes, if it is one of ours.
pub(crate) fn parse_file_name(name: &str) -> Option<(u64, &str)> {
    let (stem, extension) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, extension))
}

/// What readers may see of a segment. Changed only by the writer, after the
/// bytes it describes are written (and synced, under `fsync = "always"`).
#[derive(Debug)]
pub(crate) struct SegmentState {
    /// Bytes of whole records readers may read, header included.
    pub visible_len: u64,
    /// One past the last visible offset.
    pub next_offset: u64,
    pub first_timestamp_us: Option<u64>,
    pub last_timestamp_us: Option<u64>,
    pub offset_index: Vec<IndexEntry>,
    pub time_index: Vec<IndexEntry>,
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub base_offset: u64,
    /// The format version of its files: 1 (records only) or 2 (a batch
    /// header before the records of each append).
    pub version: u16,
    pub log_path: PathBuf,
    /// The only file a segment keeps open: its indexes live in memory
    /// (`SegmentState`) and are written to their files when the segment is
    /// sealed or closed ([`Segment::sync_all`]), so that a channel holds one
    /// open file per segment, not three.
    log: Box<dyn StorageFile>,
    /// The damage recovery found and kept, by position: reads step over it
    /// exactly as recovery counted it (the offsets it holds, where the next
    /// record starts), rather than searching again by other rules. Set at
    /// open and never changed, so reads use it without a lock or a copy.
    damage: Vec<Damage>,
    /// The Raft position (index and term) of the last batch recovery saw
    /// (format version 2), from which the log's next index follows.
    recovered_last_raft_entry: Option<RaftPosition>,
    state: RwLock<SegmentState>,
}

/// What recovery did to a segment on open.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RecoveryReport {
    pub truncated_bytes: u64,
    pub index_rebuilt: bool,
}

/// Whether a segment being opened is the last of its log (and so may have a
/// torn tail to cut) or a sealed one (which must be whole).
#[derive(Clone, Copy, Debug)]
pub(crate) enum SegmentRole {
    Last,
    Sealed {
        next_base_offset: u64,
    },
    /// A sealed segment opened again after it failed to open as `Sealed`
    /// because its end is bad (and not a torn end recovery may cut).
    /// Verified whole; the bad bytes at its end are kept as damage holding
    /// the offsets up to `next_base_offset` (known exactly: the segment
    /// was sealed there), never cut.
    SealedDamagedEnd {
        next_base_offset: u64,
    },
}

/// A write to a segment that failed.
#[derive(Debug)]
pub(crate) struct WriteFailure {
    pub error: StorageError,
    /// The files were cut back to their lengths before the write: nothing
    /// of it remains, and appending may be tried again.
    pub rolled_back: bool,
}

/// A batch of whole records read from one segment.
#[derive(Clone, Debug)]
pub(crate) struct SegmentRead {
    /// Back-to-back records: one slice, or (a version-2 segment) one per
    /// stretch between batch headers.
    pub records: Vec<Bytes>,
    pub first_offset: u64,
    pub next_offset: u64,
    pub count: u64,
}

impl Segment {
    /// Creates the three files of a new, empty segment in format `version`.
    pub fn create(fs: &dyn FileSystem, dir: &Path, base_offset: u64, version: u16) -> Result<Segment, StorageError> {
        let created = Segment::create_files(fs, dir, base_offset, version);
        if created.is_err() {
            // Leave nothing half made: a later roll creates the same names.
            for extension in [LOG_EXTENSION, OFFSET_INDEX_EXTENSION, TIME_INDEX_EXTENSION] {
                let _ = fs.remove(&dir.join(file_name(base_offset, extension)));
            }
        }
        created
    }

    fn create_files(fs: &dyn FileSystem, dir: &Path, base_offset: u64, version: u16) -> Result<Segment, StorageError> {
        let open_new = |extension: &str, kind: FileKind| -> Result<Box<dyn StorageFile>, StorageError> {
            let path = dir.join(file_name(base_offset, extension));
            let file = fs.open(&path, OpenMode::CreateNew).at(&path)?;
            file.append(&index::encode_file_header(kind, version, base_offset)).at(&path)?;
            file.sync().at(&path)?;
            Ok(file)
        };
        let log = open_new(LOG_EXTENSION, FileKind::Log)?;
        // Empty indexes with their headers: their entries are written when
        // the segment is sealed or closed.
        open_new(OFFSET_INDEX_EXTENSION, FileKind::OffsetIndex)?;
        open_new(TIME_INDEX_EXTENSION, FileKind::TimeIndex)?;
        let segment = Segment {
            base_offset,
            version,
            log_path: dir.join(file_name(base_offset, LOG_EXTENSION)),
            log,
            state: RwLock::new(SegmentState {
                visible_len: FILE_HEADER_BYTES as u64,
                next_offset: base_offset,
                first_timestamp_us: None,
                last_timestamp_us: None,
                offset_index: Vec::new(),
                time_index: Vec::new(),
            }),
            damage: Vec::new(),
            recovered_last_raft_entry: None,
        };
        fs.sync_dir(dir).at(dir)?;
        Ok(segment)
    }

    /// Opens an existing segment, verifying it from its last valid index
    /// entry to its end and repairing what is derived or torn.
    ///
    /// # Errors
    /// `InvalidFile` or `Corrupt` naming the file and position when the
    /// segment cannot be trusted; `Io` for operating-system failures.
    pub fn open(
        fs: &dyn FileSystem,
        dir: &Path,
        base_offset: u64,
        role: SegmentRole,
        index_interval_bytes: u64,
    ) -> Result<(Segment, RecoveryReport), StorageError> {
        let log_path = dir.join(file_name(base_offset, LOG_EXTENSION));
        let log = fs.open(&log_path, OpenMode::Existing).at(&log_path)?;
        let mut report = RecoveryReport::default();
        let header_whole = || {
            log.len() >= FILE_HEADER_BYTES as u64
                && log
                    .read_range(0, FILE_HEADER_BYTES)
                    .is_ok_and(|header| index::check_file_header(&header, FileKind::Log, base_offset).is_ok())
        };
        if log.len() <= FILE_HEADER_BYTES as u64 && matches!(role, SegmentRole::Last) && !header_whole() {
            // A crash while the segment was created (its header short, or
            // its size on disk but not its bytes): it holds no record, and
            // none was ever acknowledged in it, so writing the header again
            // (in the format this build writes) loses nothing.
            report.truncated_bytes = log.len();
            log.truncate(0).at(&log_path)?;
            log.append(&index::encode_file_header(FileKind::Log, FORMAT_VERSION_2, base_offset)).at(&log_path)?;
            log.sync().at(&log_path)?;
        }
        let header = log.read_range(0, FILE_HEADER_BYTES.min(log.len() as usize)).at(&log_path)?;
        let version = index::check_file_header(&header, FileKind::Log, base_offset)
            .map_err(|problem| StorageError::InvalidFile { path: log_path.clone(), problem })?;

        let (offset_index_file, offset_entries) = open_index(fs, dir, base_offset, FileKind::OffsetIndex, log.len())?;
        let (time_index_file, time_entries) = open_index(fs, dir, base_offset, FileKind::TimeIndex, log.len())?;
        // Whole: both files decoded, nothing after their last entry.
        let loaded_whole = |file: &dyn StorageFile, entries: &Option<Vec<IndexEntry>>| {
            entries
                .as_ref()
                .is_some_and(|entries| file.len() == (FILE_HEADER_BYTES + entries.len() * INDEX_ENTRY_BYTES) as u64)
        };
        let indexes_loaded_whole =
            loaded_whole(&*offset_index_file, &offset_entries) && loaded_whole(&*time_index_file, &time_entries);
        let loaded = (offset_entries.clone().unwrap_or_default(), time_entries.clone().unwrap_or_default());
        let (trusted_offsets, trusted_times) = match role {
            // The last segment is verified whole: it is the one a crash can
            // tear, and a bad record anywhere in it must be told apart from
            // a torn tail (a bad record followed by good ones is damage,
            // never cut). It is at most one segment per channel.
            SegmentRole::Last | SegmentRole::SealedDamagedEnd { .. } => (Vec::new(), Vec::new()),
            // Sealed segments are verified from their last trusted index
            // entry on, so that start-up time does not grow with the data.
            SegmentRole::Sealed { .. } => {
                trusted_index_prefix(&*log, version, base_offset, offset_entries, time_entries)
            }
        };
        let scan_start = match (trusted_offsets.last(), trusted_times.last()) {
            (Some(entry), Some(time)) => {
                ScanStart { position: entry.value, offset: entry.key, timestamp_us: Some(time.key) }
            }
            _ => ScanStart { position: FILE_HEADER_BYTES as u64, offset: base_offset, timestamp_us: None },
        };
        let mut scan = scan_records(&*log, &log_path, version, scan_start, index_interval_bytes)?;
        // Entries found by the scan after the last trusted one.
        let (mut offset_index, mut time_index) = (trusted_offsets, trusted_times);
        offset_index.extend(scan.offset_entries.iter().filter(|e| e.value > scan_start.position));
        time_index.extend(scan.time_entries.iter().filter(|e| e.value > scan_start.offset));
        if let Some((position, reason)) = scan.stopped.take() {
            let rest = log.read_range(position, (log.len() - position) as usize).at(&log_path)?;
            match role {
                SegmentRole::Last if is_torn_end(&rest, &reason) => {
                    // Nothing valid follows the bad bytes, and they look
                    // like a write that never finished: a torn tail, the
                    // unsynced end of the last append(s).
                    report.truncated_bytes += log.len() - position;
                    log.truncate(position).at(&log_path)?;
                    log.sync().at(&log_path)?;
                }
                SegmentRole::Last => {
                    // A damaged last record (a flipped bit, not a torn
                    // write): kept, and the offsets it may hold are never
                    // given to another record.
                    let held = offsets_held_at_most(&rest);
                    scan.damaged.push(Damage {
                        position,
                        end_position: log.len(),
                        first_offset: scan.next_offset,
                        next_offset: scan.next_offset + held,
                        reason,
                    });
                    scan.next_offset += held;
                }
                SegmentRole::SealedDamagedEnd { next_base_offset } if scan.next_offset < next_base_offset => {
                    scan.damaged.push(Damage {
                        position,
                        end_position: log.len(),
                        first_offset: scan.next_offset,
                        next_offset: next_base_offset,
                        reason,
                    });
                    scan.next_offset = next_base_offset;
                }
                SegmentRole::Sealed { .. } | SegmentRole::SealedDamagedEnd { .. } => {
                    return Err(StorageError::Corrupt { path: log_path, position, reason });
                }
            }
        }
        if let SegmentRole::Last = role
            && let Some(cut) = scan.incomplete_last_batch()
        {
            // The end of the last append never reached the disk whole: a
            // batch is one Raft entry, kept whole or not at all. Its records
            // were never acknowledged (an append is answered after its whole
            // write, and under `always` its sync).
            tracing::warn!(
                path = %log_path.display(),
                position = cut.position,
                records = scan.next_offset - cut.first_offset,
                "recovery: the last batch holds fewer records than its header says; cutting it"
            );
            report.truncated_bytes += log.len() - cut.position;
            log.truncate(cut.position).at(&log_path)?;
            log.sync().at(&log_path)?;
            // The bytes before the cut are now the end of the segment, and
            // the rules for an end apply to them as a later open would
            // apply them (damage that ran up to the cut batch may now be a
            // torn tail): recovery is done again on what is left, so that
            // what one open leaves the next one accepts unchanged. Each
            // round cuts, so this ends.
            drop((log, offset_index_file, time_index_file));
            let (segment, again) = Segment::open(fs, dir, base_offset, role, index_interval_bytes)?;
            let truncated_bytes = report.truncated_bytes + again.truncated_bytes;
            return Ok((segment, RecoveryReport { truncated_bytes, index_rebuilt: true }));
        }
        for damage in &scan.damaged {
            tracing::error!(
                path = %log_path.display(),
                position = damage.position,
                damaged_bytes = damage.end_position - damage.position,
                held = %describe_offsets(damage.first_offset, damage.next_offset),
                reason = %damage.reason,
                "recovery found damaged records followed by valid ones: this is corruption, not a torn write; nothing is cut, reads of these offsets fail, reads from offset {} on work; run weir check",
                damage.next_offset
            );
        }

        if let SegmentRole::Sealed { next_base_offset } | SegmentRole::SealedDamagedEnd { next_base_offset } = role
            && scan.next_offset != next_base_offset
        {
            return Err(StorageError::SegmentEndMismatch {
                path: log_path,
                end_offset: scan.next_offset,
                next_base_offset,
            });
        }

        let written = entries_before_damage(&offset_index, &scan.damaged);
        let (offset_written, time_written) = (&offset_index[..written], &time_index[..written.min(time_index.len())]);
        let index_changed = !indexes_loaded_whole || offset_written != loaded.0 || time_written != loaded.1;
        if index_changed {
            report.index_rebuilt = true;
            for (file, extension, kind, entries) in [
                (&offset_index_file, OFFSET_INDEX_EXTENSION, FileKind::OffsetIndex, offset_written),
                (&time_index_file, TIME_INDEX_EXTENSION, FileKind::TimeIndex, time_written),
            ] {
                // Derived data, as in `sync_all`: the index in memory is
                // right, and the file is written again at the seal.
                let path = dir.join(file_name(base_offset, extension));
                if let Err(error) = rewrite_index(&**file, &path, kind, version, base_offset, entries) {
                    tracing::warn!(%error, "a rebuilt index could not be written; reads use the index in memory, and the file is written again at the next seal or shutdown, or rebuilt at the next start");
                }
            }
        }

        // Only the last segment's is used (to roll it by age); the scan of
        // the last segment starts at its first record.
        let first_timestamp_us = match role {
            SegmentRole::Last => scan.first_timestamp_us,
            SegmentRole::Sealed { .. } | SegmentRole::SealedDamagedEnd { .. } => {
                record_at(&*log, version, FILE_HEADER_BYTES as u64, log.len()).ok().map(|meta| meta.timestamp_us)
            }
        };
        let segment = Segment {
            base_offset,
            version,
            log_path,
            recovered_last_raft_entry: scan.last_batch.map(|batch| RaftPosition::of(&batch.header)),
            state: RwLock::new(SegmentState {
                visible_len: log.len(),
                next_offset: scan.next_offset,
                first_timestamp_us,
                last_timestamp_us: scan.last_timestamp_us,
                offset_index,
                time_index,
            }),
            damage: scan.damaged,
            log,
        };
        // The index files are closed here; they are written again when the
        // segment is sealed or closed.
        drop((offset_index_file, time_index_file));
        Ok((segment, report))
    }

    pub fn state(&self) -> RwLockReadGuard<'_, SegmentState> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, SegmentState> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads up to `len` bytes of the log file from `position`, as they are
    /// on disk: a copy for another replica (see
    /// `ChannelLog::read_segment_bytes`).
    pub fn read_log_bytes(&self, position: u64, len: usize) -> Result<Bytes, StorageError> {
        let len = self.log.len().saturating_sub(position).min(len as u64) as usize;
        self.log.read_range(position, len).at(&self.log_path)
    }

    /// Bytes written to the log file, visible or not.
    pub fn written_len(&self) -> u64 {
        self.log.len()
    }

    /// Writes encoded records to the log (their index entries join the
    /// in-memory indexes at [`Segment::publish`]). Nothing becomes visible
    /// to readers until then.
    ///
    /// # Errors
    /// The failed write. The log is then cut back to its previous length
    /// (and the cut synced); [`WriteFailure::rolled_back`] says whether that
    /// worked, so that nothing of the failed write remains.
    pub fn write(&self, records: &[u8]) -> Result<(), WriteFailure> {
        let len = self.log.len();
        let Err(error) = self.log.append(records).at(&self.log_path) else { return Ok(()) };
        // A partial write above the visible length is invisible to readers;
        // if a cut fails, recovery cuts the records again on open. The cut
        // of the log is synced: otherwise a power loss could keep the
        // refused records (written back before the cut) and drop the cut,
        // and a publish answered "not stored" would be stored after all.
        let rolled_back = self.log.truncate(len).is_ok() && self.log.sync().is_ok();
        Err(WriteFailure { error, rolled_back })
    }

    /// Makes written records visible to readers.
    pub fn publish(
        &self,
        visible_len: u64,
        next_offset: u64,
        timestamp_us: u64,
        offset_entries: &[IndexEntry],
        time_entries: &[IndexEntry],
    ) {
        let mut state = self.state_mut();
        assert!(
            visible_len >= state.visible_len && next_offset >= state.next_offset,
            "publish: a segment never shrinks"
        );
        assert!(visible_len <= self.log.len(), "publish: only written bytes become visible");
        if state.next_offset == next_offset {
            return;
        }
        state.visible_len = visible_len;
        state.next_offset = next_offset;
        state.first_timestamp_us.get_or_insert(timestamp_us);
        state.last_timestamp_us = Some(timestamp_us);
        state.offset_index.extend_from_slice(offset_entries);
        state.time_index.extend_from_slice(time_entries);
    }

    /// Syncs the log file.
    pub fn sync_log(&self) -> Result<(), StorageError> {
        self.log.sync().at(&self.log_path)
    }

    /// Syncs the log, and writes both indexes from memory and syncs them
    /// (when a segment is sealed or closed). An index file that already
    /// holds every entry is only synced.
    ///
    /// # Errors
    /// The log's failed sync. An index that cannot be written is derived
    /// data: recovery verifies indexes and rebuilds what is missing, so a
    /// failure there (a full disk at a roll) is logged, not returned.
    pub fn sync_all(&self, fs: &dyn FileSystem) -> Result<(), StorageError> {
        self.sync_log()?;
        let state = self.state();
        let written = entries_before_damage(&state.offset_index, &self.damage);
        for (extension, kind, entries) in [
            (OFFSET_INDEX_EXTENSION, FileKind::OffsetIndex, &state.offset_index[..written]),
            (TIME_INDEX_EXTENSION, FileKind::TimeIndex, &state.time_index[..written.min(state.time_index.len())]),
        ] {
            let path = self.log_path.with_extension(extension);
            let written = fs.open(&path, OpenMode::Existing).at(&path).and_then(|file| {
                // Entries are only ever appended: a file of the right length
                // holds them all.
                if file.len() == (FILE_HEADER_BYTES + entries.len() * INDEX_ENTRY_BYTES) as u64 {
                    file.sync().at(&path)
                } else {
                    rewrite_index(&*file, &path, kind, self.version, self.base_offset, entries)
                }
            });
            if let Err(error) = written {
                tracing::warn!(%error, "an index could not be written; recovery will rebuild it from the log");
            }
        }
        Ok(())
    }

    /// Paths of the segment's three files.
    pub fn paths(&self) -> [PathBuf; 3] {
        [
            self.log_path.clone(),
            self.log_path.with_extension(OFFSET_INDEX_EXTENSION),
            self.log_path.with_extension(TIME_INDEX_EXTENSION),
        ]
    }

    /// Reads whole records starting at `from`: at most `max_bytes` of them,
    /// or one record when that one alone is larger. Empty when `from` is at or past the
    /// segment's visible end.
    ///
    /// # Errors
    /// `Corrupt` with the position of a record that fails its checks.
    pub fn read(&self, from: u64, max_bytes: usize, max_records: u64) -> Result<SegmentRead, StorageError> {
        let (visible_len, next_offset, start) = {
            let state = self.state();
            let start = index::floor(&state.offset_index, from)
                .map(|entry| (entry.value, entry.key))
                .unwrap_or((FILE_HEADER_BYTES as u64, self.base_offset));
            (state.visible_len, state.next_offset, start)
        };
        let empty = SegmentRead { records: Vec::new(), first_offset: from, next_offset: from, count: 0 };
        if from >= next_offset || from < self.base_offset || max_records == 0 {
            return Ok(empty);
        }
        let (start_position, start_offset) = start;
        let data = self.log.read_range(start_position, (visible_len - start_position) as usize).at(&self.log_path)?;
        let mut position = 0usize;
        // The records read, one slice per stretch between batch headers
        // (version 2): the stretch being read starts at `run_start` and
        // ends at `run_end`.
        let mut slices = Vec::new();
        let (mut run_start, mut run_end) = (None, 0usize);
        let mut bytes_read = 0usize;
        let mut expected_offset = start_offset;
        let mut count = 0u64;
        while position < data.len() {
            let absolute = start_position + position as u64;
            // Damage recovery kept is damage even where a record in it
            // would pass `verify` (a stale record recovery refused for its
            // timestamp): reads and recovery agree on every offset.
            let known = self.damage.iter().find(|d| d.position <= absolute && absolute < d.end_position);
            let checked = match known {
                Some(known) => Err(known.reason.clone()),
                None => verify_frame(self.version, &data[position..]).and_then(|meta| {
                    if meta.offset == expected_offset {
                        Ok(meta)
                    } else {
                        Err(RecordError::Malformed { reason: "offset out of sequence" })
                    }
                }),
            };
            let meta = match checked {
                Ok(meta) => meta,
                // The good records before a bad one are served; the bad one
                // is the error of the next read, which starts at it.
                Err(_) if count > 0 => break,
                Err(reason) => {
                    let next = match known {
                        // Damage recovery kept: its end and offsets are known.
                        Some(known) => (known.end_position < visible_len).then(|| {
                            let next_position = (known.end_position - start_position) as usize;
                            (next_position, known.next_offset)
                        }),
                        // Damage since (bit rot under a running broker).
                        None => find_next_record(self.version, &data, position, expected_offset, None)
                            .map(|(next_position, meta)| (next_position, meta.offset)),
                    };
                    match next {
                        // Damage before `from`: step over it.
                        Some((next_position, next_offset)) if next_offset <= from => {
                            position = next_position;
                            expected_offset = next_offset;
                            continue;
                        }
                        _ => {
                            return Err(StorageError::CorruptRecord {
                                path: self.log_path.clone(),
                                position: absolute,
                                offset: from,
                                next_readable_offset: next.map(|(_, next_offset)| next_offset),
                                reason,
                            });
                        }
                    }
                }
            };
            if meta.batch.is_some() {
                // Batch headers never leave the broker; they take no offset.
                if let Some(start) = run_start.take() {
                    slices.push(data.slice(start..run_end));
                }
                position += meta.len;
                continue;
            }
            expected_offset = meta.offset + 1;
            if meta.offset >= from {
                // Never more than max_bytes, except one record that is
                // larger on its own.
                if count > 0 && bytes_read + meta.len > max_bytes {
                    break;
                }
                run_start.get_or_insert(position);
                run_end = position + meta.len;
                bytes_read += meta.len;
                count += 1;
                if count >= max_records {
                    break;
                }
            }
            position += meta.len;
        }
        if count == 0 {
            return Ok(empty);
        }
        if let Some(start) = run_start {
            slices.push(data.slice(start..run_end));
        }
        Ok(SegmentRead { records: slices, first_offset: from, next_offset: from + count, count })
    }

    /// Where the first damage recovery kept starts, if any.
    pub(crate) fn first_damage_position(&self) -> Option<u64> {
        self.damage.first().map(|damage| damage.position)
    }

    /// Whether damage recovery kept runs to the end of the segment.
    pub fn ends_in_damage(&self) -> bool {
        let visible_len = self.state().visible_len;
        self.damage.last().is_some_and(|damage| damage.end_position >= visible_len)
    }

    /// The Raft position of the last batch header of this segment (format
    /// version 2; `None` when it holds none). Recovery found it when it
    /// scanned that far (the last segment is scanned whole, a sealed one
    /// from its last index entry); otherwise the segment is read for it.
    ///
    /// # Errors
    /// The segment could not be read.
    pub fn last_raft_entry(&self) -> Result<Option<RaftPosition>, StorageError> {
        if self.recovered_last_raft_entry.is_some() {
            return Ok(self.recovered_last_raft_entry);
        }
        let mut last = None;
        self.visit_batches(|_, _, header| last = Some(RaftPosition::of(header)))?;
        Ok(last)
    }

    /// The Raft position of this segment's first frame when it is a batch
    /// header (`None` otherwise: version 1, empty, or damaged there). One
    /// frame is read.
    pub fn first_raft_entry(&self) -> Option<RaftPosition> {
        if self.version == FORMAT_VERSION_1 {
            return None;
        }
        let visible_len = self.state().visible_len;
        let meta = record_at(&*self.log, self.version, FILE_HEADER_BYTES as u64, visible_len).ok()?;
        meta.batch.map(|header| RaftPosition::of(&header))
    }

    /// Calls `visit` with the first offset, timestamp and header of every
    /// batch (format version 2), in order. Reads only what recovery or an
    /// append has verified, stepping over the damage recovery kept.
    ///
    /// # Errors
    /// The segment could not be read.
    pub fn visit_batches(&self, mut visit: impl FnMut(u64, u64, &BatchHeader)) -> Result<(), StorageError> {
        if self.version == FORMAT_VERSION_1 {
            return Ok(());
        }
        let visible_len = self.state().visible_len;
        let start = FILE_HEADER_BYTES as u64;
        if visible_len <= start {
            return Ok(());
        }
        let data = self.log.read_range(start, (visible_len - start) as usize).at(&self.log_path)?;
        // The stretches between kept damage, as positions in `data`.
        let mut stretches = Vec::with_capacity(self.damage.len() + 1);
        let mut from = start;
        for damage in &self.damage {
            stretches.push((from, damage.position.min(visible_len)));
            from = damage.end_position;
        }
        stretches.push((from, visible_len));
        for (stretch_start, stretch_end) in stretches {
            let (Some(begin), Some(end)) = (stretch_start.checked_sub(start), stretch_end.checked_sub(start)) else {
                continue;
            };
            let Some(stretch) = data.get(begin as usize..end as usize) else { continue };
            let mut position = 0usize;
            while let Some(meta) = stretch.get(position..).and_then(record::verified_frame_meta) {
                if let Some(header) = &meta.batch {
                    visit(meta.offset, meta.timestamp_us, header);
                }
                position += meta.len;
            }
        }
        Ok(())
    }

    /// Calls `visit` with the first offset and the byte position of every
    /// batch header (format version 2), in order, from what recovery or an
    /// append verified: where a segment copy may be cut (segment transfer).
    /// A segment holding kept damage visits nothing.
    ///
    /// # Errors
    /// The segment could not be read.
    pub fn visit_batches_at(&self, mut visit: impl FnMut(u64, u64)) -> Result<(), StorageError> {
        let visible_len = self.state().visible_len;
        let start = FILE_HEADER_BYTES as u64;
        if self.version == FORMAT_VERSION_1 || visible_len <= start || !self.damage.is_empty() {
            return Ok(());
        }
        let data = self.log.read_range(start, (visible_len - start) as usize).at(&self.log_path)?;
        let mut position = 0usize;
        while let Some(meta) = data.get(position..).and_then(record::verified_frame_meta) {
            if meta.batch.is_some() {
                visit(meta.offset, start + position as u64);
            }
            position += meta.len;
        }
        Ok(())
    }

    /// As [`Segment::visit_batches`], but every frame's CRC is checked, and
    /// a segment that holds damage recovery kept, or a frame that does not
    /// verify, is an error: for state every replica must rebuild alike
    /// from its own copy (a replicated partition's producers).
    ///
    /// # Errors
    /// The segment could not be read, or holds damage.
    pub fn visit_batches_checked(&self, mut visit: impl FnMut(u64, u64, &BatchHeader)) -> Result<(), StorageError> {
        if self.version == FORMAT_VERSION_1 {
            return Ok(());
        }
        let start = FILE_HEADER_BYTES as u64;
        let corrupt = |position: u64, reason: RecordError| StorageError::Corrupt {
            path: self.log_path.clone(),
            position,
            reason,
        };
        if let Some(damage) = self.damage.first() {
            let reason = RecordError::Malformed { reason: "damage kept by recovery" };
            return Err(corrupt(damage.position, reason));
        }
        let visible_len = self.state().visible_len;
        if visible_len <= start {
            return Ok(());
        }
        let data = self.log.read_range(start, (visible_len - start) as usize).at(&self.log_path)?;
        let mut position = 0usize;
        while let Some(rest) = data.get(position..).filter(|rest| !rest.is_empty()) {
            let meta = record::verify_frame(rest).map_err(|reason| corrupt(start + position as u64, reason))?;
            if let Some(header) = &meta.batch {
                visit(meta.offset, meta.timestamp_us, header);
            }
            position += meta.len;
        }
        Ok(())
    }

    /// The first offset whose timestamp is at least `timestamp_us`, if this
    /// segment has one.
    ///
    /// # Errors
    /// `Corrupt` as for [`Segment::read`].
    pub fn offset_for_time(&self, timestamp_us: u64) -> Result<Option<u64>, StorageError> {
        let mut from = {
            let state = self.state();
            match state.last_timestamp_us {
                Some(last) if last >= timestamp_us => {}
                _ => return Ok(None),
            }
            index::last_below(&state.time_index, timestamp_us).map_or(self.base_offset, |entry| entry.value)
        };
        loop {
            // `read` has verified every record it returns; damage on the
            // way is stepped over, as a read starting after it would.
            let batch = match self.read(from, 64 * 1024, u64::MAX) {
                Err(StorageError::CorruptRecord { next_readable_offset: Some(next), .. }) if next > from => {
                    from = next;
                    continue;
                }
                other => other?,
            };
            if batch.count == 0 {
                return Ok(None);
            }
            for slice in &batch.records {
                let mut records = &slice[..];
                while let Some(meta) = record::verified_meta(records) {
                    if meta.timestamp_us >= timestamp_us {
                        return Ok(Some(meta.offset));
                    }
                    records = &records[meta.len..];
                }
            }
            from = batch.next_offset;
        }
    }
}

/// An index file and its entries (`None`: unreadable, rebuild it).
type OpenedIndex = (Box<dyn StorageFile>, Option<Vec<IndexEntry>>);

/// Opens (creating if missing) an index file and decodes its entries;
/// `None` when the file is missing or unreadable, meaning: rebuild.
fn open_index(
    fs: &dyn FileSystem,
    dir: &Path,
    base_offset: u64,
    kind: FileKind,
    log_len: u64,
) -> Result<OpenedIndex, StorageError> {
    let extension = if kind == FileKind::OffsetIndex { OFFSET_INDEX_EXTENSION } else { TIME_INDEX_EXTENSION };
    let path = dir.join(file_name(base_offset, extension));
    let file = match fs.open(&path, OpenMode::Existing) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // A segment copy from another replica comes without indexes.
            if dir.file_name().is_some_and(|name| name == super::log::TRANSFER_DIR) {
                tracing::debug!(path = %path.display(), "building the index of a copied segment");
            } else {
                tracing::warn!(path = %path.display(), "index file missing; rebuilding it from the log");
            }
            return Ok((fs.open(&path, OpenMode::CreateNew).at(&path)?, None));
        }
        Err(error) => return Err(StorageError::Io { path, source: error }),
    };
    // An index has at most one entry per record; a larger file is garbage,
    // and is rebuilt rather than decoded into memory.
    let entries_max = log_len / RECORD_OVERHEAD_BYTES as u64 + 1;
    if file.len() > FILE_HEADER_BYTES as u64 + entries_max * INDEX_ENTRY_BYTES as u64 {
        tracing::warn!(path = %path.display(), "index file larger than its log allows; rebuilding it from the log");
        return Ok((file, None));
    }
    let bytes = file.read_range(0, file.len() as usize).at(&path)?;
    let entries = index::check_file_header(&bytes, kind, base_offset)
        .and_then(|_version| index::decode_entries(&bytes[FILE_HEADER_BYTES..]));
    match entries {
        Ok(entries) => Ok((file, Some(entries))),
        Err(problem) => {
            tracing::warn!(path = %path.display(), problem, "index file invalid; rebuilding it from the log");
            Ok((file, None))
        }
    }
}

/// The longest prefix of the two indexes that agrees with itself and whose
/// last entry points at a valid record with the offset it claims.
fn trusted_index_prefix(
    log: &dyn StorageFile,
    version: u16,
    base_offset: u64,
    offset_entries: Option<Vec<IndexEntry>>,
    time_entries: Option<Vec<IndexEntry>>,
) -> (Vec<IndexEntry>, Vec<IndexEntry>) {
    let (Some(mut offsets), Some(mut times)) = (offset_entries, time_entries) else {
        return (Vec::new(), Vec::new());
    };
    let log_len = log.len();
    let mut keep = offsets.len().min(times.len());
    let mut previous: Option<IndexEntry> = None;
    for i in 0..keep {
        let entry = offsets[i];
        let in_order = previous.is_none_or(|p| entry.key > p.key && entry.value > p.value);
        let consistent = entry.key >= base_offset
            && entry.value >= FILE_HEADER_BYTES as u64
            && entry.value < log_len
            && times[i].value == entry.key
            && previous.is_none_or(|_| times[i].key >= times[i - 1].key);
        if !(in_order && consistent) {
            // Indexes disagreeing in their middle cannot be trusted at all.
            return (Vec::new(), Vec::new());
        }
        previous = Some(entry);
    }
    // Index entries may reach past records that never made it to disk; drop
    // entries from the end until one points at a whole record.
    while keep > 0 {
        let entry = offsets[keep - 1];
        match record_at(log, version, entry.value, log_len) {
            Ok(meta) if meta.offset == entry.key && meta.timestamp_us == times[keep - 1].key => break,
            _ => keep -= 1,
        }
    }
    offsets.truncate(keep);
    times.truncate(keep);
    (offsets, times)
}

/// Verifies the record at `position`.
fn record_at(log: &dyn StorageFile, version: u16, position: u64, log_len: u64) -> Result<RecordMeta, RecordError> {
    let available = log_len.saturating_sub(position) as usize;
    let incomplete = |needed| RecordError::Incomplete { available_bytes: available, needed_bytes: needed };
    let prefix = log.read_range(position, 4.min(available)).map_err(|_| incomplete(4))?;
    let len = record::peek_len(&prefix)?.ok_or_else(|| incomplete(4))?;
    let bytes = log.read_range(position, len.min(available)).map_err(|_| incomplete(len))?;
    verify_frame(version, &bytes)
}

#[derive(Clone, Copy, Debug)]
struct ScanStart {
    position: u64,
    offset: u64,
    timestamp_us: Option<u64>,
}

struct Scan {
    next_offset: u64,
    first_timestamp_us: Option<u64>,
    last_timestamp_us: Option<u64>,
    offset_entries: Vec<IndexEntry>,
    time_entries: Vec<IndexEntry>,
    /// Bad bytes followed by valid records: corruption, kept in place.
    damaged: Vec<Damage>,
    /// Where and why the scan stopped before the end of the file: bad
    /// bytes with no valid record after them (a torn tail, in the last
    /// segment).
    stopped: Option<(u64, RecordError)>,
    /// The last batch header seen (format version 2).
    last_batch: Option<BatchSeen>,
}

/// A batch header found by a scan.
#[derive(Clone, Copy, Debug)]
struct BatchSeen {
    position: u64,
    first_offset: u64,
    header: BatchHeader,
}

impl Scan {
    /// The last batch, when it holds fewer records than its header says
    /// and nothing damaged follows it: the end of an append that never
    /// reached the disk whole.
    fn incomplete_last_batch(&self) -> Option<BatchSeen> {
        let batch = self.last_batch?;
        let expected_end = batch.first_offset.saturating_add(u64::from(batch.header.count));
        let damaged_after = self.damaged.iter().any(|damage| damage.position > batch.position);
        (batch.header.kind == EntryKind::Data && self.next_offset < expected_end && !damaged_after).then_some(batch)
    }
}

/// How many index entries go to the index files: those before the first
/// damage recovery kept. The files are then trusted only up to it, so the
/// next open scans from before the damage and finds it again by recovery's
/// rules (the damage map lives in memory only).
fn entries_before_damage(offset_index: &[IndexEntry], damage: &[Damage]) -> usize {
    damage
        .first()
        .map_or(offset_index.len(), |first| offset_index.partition_point(|entry| entry.value < first.position))
}

/// Bad bytes between two valid records of a segment.
#[derive(Debug)]
pub(crate) struct Damage {
    /// Where the bad bytes start and where the next valid record starts.
    pub position: u64,
    pub end_position: u64,
    /// The offsets the bad bytes held: `first_offset..next_offset`.
    pub first_offset: u64,
    pub next_offset: u64,
    pub reason: RecordError,
}

/// Zero bytes at the very end of a bad last record that mark it as torn
/// rather than corrupt (a block that was never written reads as zeros).
const TORN_TAIL_ZEROS_BYTES: usize = 64;

/// Whether `rest`, the bytes of a segment from a bad record (failing with
/// `reason`) to the end of the file, with no valid record among them, look
/// like an end that never reached the disk: the file ends inside the
/// record, or is zero-filled from it on (unwritten blocks read as zeros),
/// or the bad record is the last thing in the file and ends in zeros (its
/// beginning reached the disk, its end did not). Anything else is
/// corruption.
pub(crate) fn is_torn_end(rest: &[u8], reason: &RecordError) -> bool {
    // Too short to hold a record: nothing acknowledged can be in it.
    if rest.len() < RECORD_OVERHEAD_BYTES
        || matches!(reason, RecordError::Incomplete { .. })
        || rest.iter().all(|&byte| byte == 0)
    {
        return true;
    }
    let Ok(Some(claimed)) = record::peek_len(rest) else { return false };
    // Zeros from inside the bad record to the end of the file: its start
    // reached the disk, the rest (a page or more, which may run past the
    // record's own end) did not.
    let zeros_from = rest.iter().rposition(|&byte| byte != 0).map_or(0, |last| last + 1);
    zeros_from < claimed && rest.len() - zeros_from >= TORN_TAIL_ZEROS_BYTES
}

/// How many offsets bad bytes at the end of a segment may hold, none of
/// which may ever be given to another record: one when the bad record's
/// length reaches exactly to the end, else as many as the bytes could hold.
pub(crate) fn offsets_held_at_most(rest: &[u8]) -> u64 {
    match record::peek_len(rest) {
        Ok(Some(claimed)) if claimed == rest.len() => 1,
        _ => (rest.len() / RECORD_OVERHEAD_BYTES).max(1) as u64,
    }
}

/// Names the offsets `first..next` that damaged bytes held, inclusively,
/// for people.
pub(crate) fn describe_offsets(first: u64, next: u64) -> String {
    match next - first {
        0 => "no whole record (bytes between records)".to_owned(),
        1 => format!("offset {first}"),
        n => format!("offsets {first} to {} ({n} records)", next - 1),
    }
}

/// Finds where reading can go on after a bad record at `bad_position` of
/// `data`: the first later position holding a valid record that can follow
/// the last good one. Its offset is at least `expected_offset` and skips no
/// more offsets than the bad bytes could hold (a record takes at least
/// [`RECORD_OVERHEAD_BYTES`]); its timestamp does not go back. The offset
/// test rejects almost every position before a CRC is computed, so random
/// bytes are scanned at memory speed and a false match needs both a
/// plausible offset and a matching CRC-32.
pub(crate) fn find_next_record(
    version: u16,
    data: &[u8],
    bad_position: usize,
    expected_offset: u64,
    last_timestamp_us: Option<u64>,
) -> Option<(usize, RecordMeta)> {
    let last_start = data.len().checked_sub(RECORD_OVERHEAD_BYTES)?;
    for position in bad_position + 1..=last_start {
        let Ok(offset_bytes) = <[u8; 8]>::try_from(&data[position + 8..position + 16]) else { continue };
        let offset = u64::from_be_bytes(offset_bytes);
        let offsets_skipped_max = ((position - bad_position) / RECORD_OVERHEAD_BYTES) as u64;
        if offset < expected_offset || offset - expected_offset > offsets_skipped_max {
            continue;
        }
        match verify_frame(version, &data[position..]) {
            Ok(meta) if last_timestamp_us.is_none_or(|last| meta.timestamp_us >= last) => {
                return Some((position, meta));
            }
            _ => {}
        }
    }
    None
}

/// Verifies records from `start` to the end of the log, collecting index
/// entries every `index_interval_bytes`. Bad bytes followed by a valid
/// record are noted as damage and stepped over; bad bytes with nothing
/// valid after them stop the scan.
fn scan_records(
    log: &dyn StorageFile,
    path: &Path,
    version: u16,
    start: ScanStart,
    index_interval_bytes: u64,
) -> Result<Scan, StorageError> {
    let data = log.read_range(start.position, (log.len() - start.position) as usize).at(path)?;
    let mut scan = Scan {
        next_offset: start.offset,
        first_timestamp_us: None,
        last_timestamp_us: start.timestamp_us,
        offset_entries: Vec::new(),
        time_entries: Vec::new(),
        damaged: Vec::new(),
        stopped: None,
        last_batch: None,
    };
    let mut position = 0usize;
    let mut last_indexed = start.position;
    while position < data.len() {
        let absolute = start.position + position as u64;
        let checked = verify_frame(version, &data[position..]).and_then(|meta| {
            if meta.offset != scan.next_offset {
                return Err(RecordError::Malformed { reason: "offset out of sequence" });
            }
            if scan.last_timestamp_us.is_some_and(|last| meta.timestamp_us < last) {
                return Err(RecordError::Malformed { reason: "timestamp goes backwards" });
            }
            Ok(meta)
        });
        let meta = match checked {
            Ok(meta) => meta,
            Err(reason) => match find_next_record(version, &data, position, scan.next_offset, scan.last_timestamp_us) {
                Some((next_position, next)) => {
                    scan.damaged.push(Damage {
                        position: absolute,
                        end_position: start.position + next_position as u64,
                        first_offset: scan.next_offset,
                        next_offset: next.offset,
                        reason,
                    });
                    scan.next_offset = next.offset;
                    position = next_position;
                    continue;
                }
                None => {
                    scan.stopped = Some((absolute, reason));
                    break;
                }
            },
        };
        // Any frame may be indexed, a record or a batch header: a read into
        // the middle of a large batch starts near its offset.
        if absolute - last_indexed >= index_interval_bytes {
            scan.offset_entries.push(IndexEntry { key: meta.offset, value: absolute });
            scan.time_entries.push(IndexEntry { key: meta.timestamp_us, value: meta.offset });
            last_indexed = absolute;
        }
        scan.first_timestamp_us.get_or_insert(meta.timestamp_us);
        scan.last_timestamp_us = Some(meta.timestamp_us);
        match meta.batch {
            // A batch header takes no offset.
            Some(header) => {
                scan.last_batch = Some(BatchSeen { position: absolute, first_offset: meta.offset, header });
            }
            None => scan.next_offset = meta.offset + 1,
        }
        position += meta.len;
    }
    Ok(scan)
}

/// Verifies the frame at the start of `buf` as a segment of format
/// `version` holds them: records only (1), or records and batch headers (2).
fn verify_frame(version: u16, buf: &[u8]) -> Result<RecordMeta, RecordError> {
    if version == FORMAT_VERSION_1 { record::verify(buf) } else { record::verify_frame(buf) }
}

/// Replaces an index file's contents with `entries`, then syncs it.
fn rewrite_index(
    file: &dyn StorageFile,
    path: &Path,
    kind: FileKind,
    version: u16,
    base_offset: u64,
    entries: &[IndexEntry],
) -> Result<(), StorageError> {
    let mut buf = Vec::with_capacity(FILE_HEADER_BYTES + entries.len() * INDEX_ENTRY_BYTES);
    buf.extend_from_slice(&index::encode_file_header(kind, version, base_offset));
    index::encode_entries(entries, &mut buf);
    file.truncate(0).at(path)?;
    file.append(&buf).at(path)?;
    file.sync().at(path)
}
