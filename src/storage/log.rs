//! A channel's log: an ordered set of segments, one writer appending batches
//! to the last (active) one, any number of readers, rolling and retention.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::channel_name::ChannelName;
use super::error::{IoContext, StorageError};
use super::fs::{BackgroundSync, FileSystem, OpenMode};
use super::index::{FILE_HEADER_BYTES, FORMAT_VERSION_1, FORMAT_VERSION_2, IndexEntry};
use super::segment::{self, LOG_EXTENSION, RecoveryReport, Segment, SegmentRole, WriteFailure};
mod transfer;

pub(crate) use transfer::TRANSFER_DIR;
pub use transfer::{CopyEnd, SegmentCopy, SegmentTransfer, TRANSFER_SEGMENTS_MAX};

use crate::record::{self, BATCH_HEADER_BYTES, BatchHeader, EntryKind, Message, Record, RecordError, RecordIter};

/// The most encoded bytes one append may write: the writer's buffer never
/// grows past this.
pub const APPEND_BATCH_BYTES_MAX: usize = 256 * 1024 * 1024;
// A batch header counts its records in a u32.
const _: () = assert!(APPEND_BATCH_BYTES_MAX / record::RECORD_OVERHEAD_BYTES <= u32::MAX as usize);
/// The writer keeps its encode buffer between appends up to this capacity,
/// and releases anything larger.
const ENCODE_BUFFER_RETAINED_BYTES: usize = 4 * 1024 * 1024;

/// When an append is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// `fdatasync` before an append returns: one sync per batch.
    #[default]
    Always,
    /// A background task syncs every `fsync_interval_ms`.
    Interval,
    /// The operating system writes back when it chooses.
    Never,
}

/// Retention limits of one channel; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
    pub max_messages: Option<u64>,
}

/// The settings of one channel's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub segment_bytes: u64,
    pub segment_max_age: Duration,
    pub index_interval_bytes: u64,
    pub fsync: FsyncPolicy,
    pub max_message_bytes: usize,
    pub retention: RetentionPolicy,
    /// The segment format new segments are written in:
    /// [`FORMAT_VERSION_2`] (the default), or [`FORMAT_VERSION_1`] to
    /// produce the files of weir 0.1 (tests of upgrades).
    pub format_version: u16,
    /// The local copy of a replicated partition (its Raft log holds every
    /// entry after its last snapshot): damage in the part of the log a
    /// crash can leave unsynced is cut, not kept, so that its entries are
    /// applied again instead of leaving a hole (see `cut_replicated_damage`).
    pub replicated: bool,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: 128 * 1024 * 1024,
            segment_max_age: Duration::from_secs(7 * 24 * 3600),
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            max_message_bytes: 1024 * 1024,
            retention: RetentionPolicy {
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
                ..RetentionPolicy::default()
            },
            format_version: FORMAT_VERSION_2,
            replicated: false,
        }
    }
}

/// The Raft entries of a replicated partition whose batches are kept
/// whatever its retention: its idempotent producers are deduplicated over
/// this window of entries, and rebuilt from these batches at start, so
/// that every replica decides alike (docs/REPLICATION.md). A constant, not
/// a setting: replicas with different windows would diverge.
pub const REPLICATED_DEDUP_WINDOW_ENTRIES: u64 = 16_384;

/// The offsets and timestamp an append assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub first_offset: u64,
    /// Number of records appended; their offsets are
    /// `first_offset..first_offset + count`.
    pub count: u64,
    /// The timestamp every record of the batch carries.
    pub timestamp_us: u64,
    /// Time spent in `fdatasync` (zero unless `fsync = "always"`).
    pub sync_duration: Duration,
}

/// Running totals of one log since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogCounters {
    pub messages_appended: u64,
    /// Message bytes: key + header names and values + payload.
    pub bytes_appended: u64,
    pub retention_segments_deleted: u64,
    pub retention_bytes_deleted: u64,
    /// Times the disk became full under this log (see
    /// [`STORAGE_FULL_RETRY_INTERVAL`]).
    pub storage_full_episodes: u64,
}

/// The records of one append: its messages, and the idempotent producer's
/// id and first sequence when there is one (kept in the batch header, so
/// that deduplication can be rebuilt from the log).
#[derive(Clone, Copy, Debug)]
pub struct NewBatch<'a> {
    pub messages: &'a [Message],
    pub producer: Option<(u64, u64)>,
    /// The Raft entry this batch applies (a replicated partition's state
    /// machine): its header then carries that entry's index and term
    /// instead of the log's own next index and term 0. Indexes must rise.
    pub raft: Option<RaftPosition>,
}

/// Where a batch stands in a Raft log: its entry's index and the term of
/// the leader that appended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RaftPosition {
    pub index: u64,
    pub term: u64,
}

impl RaftPosition {
    pub(crate) fn of(header: &BatchHeader) -> RaftPosition {
        RaftPosition { index: header.raft_index, term: header.term }
    }
}

/// Whole, CRC-checked records in their on-disk encoding (see [`record`]),
/// as one or more slices of the memory map they were read from: the batch
/// headers of a version-2 segment, which never leave the broker, fall
/// between slices. Sent as they are, back to back, the slices are exactly
/// the records.
#[derive(Clone, Debug, Default)]
pub struct RecordSlices {
    slices: Vec<Bytes>,
    len: usize,
}

impl RecordSlices {
    fn new(slices: Vec<Bytes>) -> RecordSlices {
        let len = slices.iter().map(Bytes::len).sum();
        RecordSlices { slices, len }
    }

    /// Bytes of all the records.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slices, in order.
    pub fn slices(&self) -> &[Bytes] {
        &self.slices
    }
}

/// Whole, CRC-checked records read from a log (see [`RecordSlices`]).
#[derive(Clone, Debug)]
pub struct ReadBatch {
    pub records: RecordSlices,
    pub first_offset: u64,
    /// One past the last offset in the batch.
    pub next_offset: u64,
    pub count: u64,
}

impl ReadBatch {
    /// Decodes the records; payloads are not copied.
    pub fn iter(&self) -> impl Iterator<Item = Result<Record, RecordError>> + '_ {
        self.records.slices.iter().flat_map(|slice| RecordIter::new(slice.clone()))
    }
}

/// What one retention pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub segments_deleted: u64,
    pub bytes_deleted: u64,
    pub records_deleted: u64,
}

/// Summary figures of a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStats {
    pub start_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    pub segment_count: u64,
}

/// The background sync of a just-sealed segment.
type SealSync = BackgroundSync;

struct Writer {
    active: Arc<Segment>,
    next_offset: u64,
    last_timestamp_us: u64,
    /// Position in the active segment of its last index entry.
    last_indexed_position: u64,
    /// Bytes written since the last sync of the active segment.
    unsynced: bool,
    encode_buffer: Vec<u8>,
    /// The Raft position of the last batch written (format version 2); the
    /// next batch of a single node takes the index after it.
    last_raft_entry: Option<RaftPosition>,
    /// The background sync of the last sealed segment, under `interval` and
    /// `never`.
    pending_seal: Option<SealSync>,
    /// Set after a sync failure (or a failed write that could not be cut
    /// back): the file's state is unknown, so no further append is
    /// accepted until recovery (a restart) has run.
    failure: Option<String>,
    /// Set while the disk is full; cleared by the first append that
    /// succeeds again.
    full: Option<FullEpisode>,
}

/// A stretch of time during which appends fail for lack of space.
struct FullEpisode {
    since: Instant,
    /// When an append last tried the disk.
    last_attempt: Instant,
    refused_appends: u64,
}

/// How an append failed.
enum AppendFailure {
    /// Nothing of the append remains on disk; the next append may try again.
    RolledBack(StorageError),
    /// The state of unsynced data is unknown.
    Unknown(StorageError),
}

/// While a log's disk is full, one append per this interval tries the disk
/// (the probe that ends the episode once space is back); the others are
/// refused at once, so that a stream of publishes does not hammer a full
/// disk with writes that are cut back.
pub const STORAGE_FULL_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// One channel's log. Appends are serialized by an internal writer lock;
/// reads proceed concurrently with them and with each other.
pub struct ChannelLog {
    name: ChannelName,
    partition: u32,
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    config: LogConfig,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    writer: Mutex<Writer>,
    /// One past the last offset readers may see.
    visible_next_offset: AtomicU64,
    counters: Mutex<LogCounters>,
    /// Held by `sync` while it waits for a seal outside the writer lock, so
    /// that a roll can neither create the next segment nor start the next
    /// seal before that one is durable.
    seal_order: Mutex<()>,
    /// Held by retention while it removes segments, and by a segment copy
    /// while it replaces them (taken after the writer lock, before the
    /// segment map's), so that neither removes a file the other put there.
    segment_files: Mutex<()>,
    /// Set when a segment copy failed after its marker was written: the
    /// files may be half moved until the next open finishes the move.
    copy_interrupted: AtomicBool,
    /// Told the new start offset whenever retention moves it, so that the
    /// server can notify subscribers that fell behind without polling.
    start_offset_listener: Mutex<Option<StartOffsetListener>>,
    /// Mirrors `Writer::full`, readable without waiting for an append.
    storage_full: AtomicBool,
    /// Set (under the writer lock) when the channel is deleted: no append
    /// is taken after that.
    deleted: AtomicBool,
}

/// A callback told the log's new start offset after retention moved it.
pub type StartOffsetListener = Box<dyn Fn(u64) + Send + Sync>;

impl std::fmt::Debug for ChannelLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelLog")
            .field("name", &self.name)
            .field("partition", &self.partition)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Microseconds since the Unix epoch by the system clock.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A log dropped while a sealed segment's sync runs in the background
/// waits for it: that sync writes index files by path, and would otherwise
/// go on writing them under whatever opens the channel next (a reopened or
/// recreated channel, reading those files through a map).
impl Drop for ChannelLog {
    fn drop(&mut self) {
        let pending_seal = self.writer.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).pending_seal.take();
        self.wait_for_seals(pending_seal);
    }
}

impl ChannelLog {
    /// Opens the log of partition 0 of a channel in `dir` (see
    /// [`ChannelLog::open_partition`]).
    ///
    /// # Errors
    /// As [`ChannelLog::open_partition`].
    pub fn open(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        name: ChannelName,
        config: LogConfig,
    ) -> Result<ChannelLog, StorageError> {
        ChannelLog::open_partition(fs, dir, name, 0, config)
    }

    /// Opens the log of one partition of a channel in `dir`, creating it if
    /// it does not exist, and runs recovery on its segments.
    ///
    /// # Errors
    /// Anything that makes the log untrustworthy, naming file and position.
    pub fn open_partition(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        name: ChannelName,
        partition: u32,
        config: LogConfig,
    ) -> Result<ChannelLog, StorageError> {
        ChannelLog::open_recovering(fs, dir, name, partition, config, None)
    }

    /// [`ChannelLog::open_partition`], with the floor of a replicated log's
    /// cut fixed by an earlier round of the same open (see
    /// `replicated_cut_floor`).
    fn open_recovering(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        name: ChannelName,
        partition: u32,
        config: LogConfig,
        cut_floor: Option<u64>,
    ) -> Result<ChannelLog, StorageError> {
        // Durable before any record is: a power loss must not take the
        // directory back with the records synced into it.
        super::fs::create_dir_all_durable(&*fs, dir).at(dir)?;
        // A process that died may have created files here (a segment at a
        // roll) or this directory itself without syncing their entries: what
        // recovery adopts is made durable before anything is written to it.
        fs.sync_dir(dir).at(dir)?;
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            fs.sync_dir(parent).at(parent)?;
        }
        transfer::finish_pending_transfer(&*fs, dir)?;
        let base_offsets = list_segments(&*fs, dir)?;
        let cut_floor = cut_floor.unwrap_or_else(|| replicated_cut_floor(&base_offsets));
        let mut segments = BTreeMap::new();
        let mut base_offsets = base_offsets;
        let mut i = 0;
        while i < base_offsets.len() {
            let base_offset = base_offsets[i];
            let role = match base_offsets.get(i + 1) {
                Some(&next_base_offset) => SegmentRole::Sealed { next_base_offset },
                None => SegmentRole::Last,
            };
            let opened = Segment::open(&*fs, dir, base_offset, role, config.index_interval_bytes);
            let (segment, report) = match opened {
                Err(error)
                    if i + 2 == base_offsets.len()
                        && config.fsync != FsyncPolicy::Always
                        && is_torn_tail(&*fs, dir, base_offset, &error) =>
                {
                    // Under `interval` and `never` the last sealed segment is
                    // synced in the background after the roll, and nothing
                    // after it is synced before it: a crash can tear its tail
                    // and leave the segment after it holding only unsynced
                    // records. Both are what those policies allow to lose.
                    let removed = base_offsets.pop().unwrap_or_default();
                    tracing::error!(
                        channel = %name, %error, removed_segment = removed,
                        "recovery: the last sealed segment lost its tail in a crash; cutting it and setting the segment after it aside as *.torn"
                    );
                    remove_segment_files(&*fs, dir, removed)?;
                    Segment::open(&*fs, dir, base_offset, SegmentRole::Last, config.index_interval_bytes)?
                }
                Err(error @ StorageError::Corrupt { .. }) if i + 1 < base_offsets.len() => {
                    // A sealed segment whose end is bad and not a torn end
                    // that may be cut: damage (a flipped bit), or, for the
                    // last sealed segment under `interval` and `never`,
                    // pages of an interrupted background sync written back
                    // out of order. Nothing is cut: the bad bytes are kept
                    // as damage holding the offsets up to the next
                    // segment's base (see `SegmentRole::SealedDamagedEnd`).
                    // (A replicated log cuts its last sealed one, below.)
                    tracing::error!(
                        channel = %name, %error,
                        "recovery: a sealed segment ends in bad bytes; keeping them as damage, reads of the offsets they held fail; run weir check"
                    );
                    let role = SegmentRole::SealedDamagedEnd { next_base_offset: base_offsets[i + 1] };
                    Segment::open(&*fs, dir, base_offset, role, config.index_interval_bytes)?
                }
                other => other?,
            };
            log_recovery(&name, &segment, report);
            if i + 2 == base_offsets.len() {
                // A process crash may have ended the background sync of the
                // last sealed segment, and the page cache still holds what
                // it wrote: it is synced now, before anything after it can
                // be (the last segment's repair below syncs it), so that
                // only the last sealed segment may ever be torn (see
                // `roll`). About 50 us when nothing is dirty.
                segment.sync_all(&*fs)?;
            }
            segments.insert(base_offset, Arc::new(segment));
            i += 1;
        }
        if config.replicated
            && let Some((base_offset, position)) = crash_damage(&segments, cut_floor)
        {
            drop(segments);
            cut_replicated_damage(&*fs, dir, &name, &base_offsets, base_offset, position)?;
            // Recovery again on what is left: its end is now where the
            // damage was, and the rules for an end apply (a last batch cut
            // short is cut whole). Each round removes bytes, so this ends.
            return ChannelLog::open_recovering(fs, dir, name, partition, config, Some(cut_floor));
        }
        let active = match segments.last_key_value() {
            Some((_, segment)) => {
                // Appends a process crash cut between their write and their
                // `fdatasync` are still in the page cache, and readable from
                // now on: they are synced before anyone can read them, so
                // that under `always` nothing delivered can be taken back by
                // a power loss.
                segment.sync_log()?;
                Arc::clone(segment)
            }
            None => {
                let segment = Arc::new(Segment::create(&*fs, dir, 0, config.format_version)?);
                segments.insert(0, Arc::clone(&segment));
                segment
            }
        };
        let (next_offset, last_timestamp_us, last_indexed_position) = {
            let state = active.state();
            let last_indexed = state.offset_index.last().map_or(FILE_HEADER_BYTES as u64, |entry| entry.value);
            let last_timestamp =
                segments.values().rev().find_map(|segment| segment.state().last_timestamp_us).unwrap_or(0);
            (state.next_offset, last_timestamp, last_indexed)
        };
        // The newest batch header is in the newest segment that has one: a
        // segment without one (version 1, or created just before a crash)
        // defers to the one before it.
        let mut last_raft_entry = None;
        for segment in segments.values().rev() {
            if let Some(last) = segment.last_raft_entry()? {
                last_raft_entry = Some(last);
                break;
            }
        }
        Ok(ChannelLog {
            name,
            partition,
            dir: dir.to_path_buf(),
            fs,
            config,
            segments: RwLock::new(segments),
            writer: Mutex::new(Writer {
                active,
                next_offset,
                last_timestamp_us,
                last_indexed_position,
                // Synced above.
                unsynced: false,
                encode_buffer: Vec::new(),
                last_raft_entry,
                pending_seal: None,
                failure: None,
                full: None,
            }),
            visible_next_offset: AtomicU64::new(next_offset),
            counters: Mutex::new(LogCounters::default()),
            seal_order: Mutex::new(()),
            segment_files: Mutex::new(()),
            copy_interrupted: AtomicBool::new(false),
            start_offset_listener: Mutex::new(None),
            storage_full: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &ChannelName {
        &self.name
    }

    /// The partition of its channel this log holds.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The channel, and the partition when it is not 0, for messages.
    pub fn label(&self) -> String {
        match self.partition {
            0 => self.name.to_string(),
            partition => format!("{} partition {partition}", self.name),
        }
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Appends a batch with the current time as its timestamp.
    ///
    /// # Errors
    /// See [`ChannelLog::append_batch_at`].
    pub fn append_batch(&self, messages: &[Message]) -> Result<Appended, StorageError> {
        self.append_batch_at(messages, now_us())
    }

    /// Appends one batch with no producer (see
    /// [`ChannelLog::append_batches_at`]).
    ///
    /// # Errors
    /// See [`ChannelLog::append_batches_at`].
    pub fn append_batch_at(&self, messages: &[Message], now_us: u64) -> Result<Appended, StorageError> {
        self.append_batches_at(&[NewBatch { messages, producer: None, raft: None }], now_us)
    }

    /// Appends batches (the publishes of one group commit) as one write
    /// (and, under `fsync = "always"`, one sync), and returns only when they
    /// are as durable as the policy promises. In a version-2 segment each
    /// non-empty batch gets its header (one Raft entry). Every record
    /// carries `max(now_us, last timestamp)`, so timestamps never decrease
    /// within a channel even if the clock steps back.
    ///
    /// # Errors
    /// - `InvalidMessage` or `BatchTooLarge` (nothing written) when the
    ///   batch breaks a limit.
    /// - `StorageFull` when the device is full: nothing was stored, reads
    ///   go on, and appends are taken again once space is freed (while
    ///   full, one append per [`STORAGE_FULL_RETRY_INTERVAL`] tries the
    ///   disk; the others are refused without touching it).
    /// - `Io` when a write fails for another reason and was cut back:
    ///   nothing was stored, and the next append tries again.
    /// - `Io` when a sync fails, or a failed write could not be cut back:
    ///   the state of unsynced data is unknown, and the log refuses every
    ///   later append (`Failed`) until it is reopened and recovered.
    pub fn append_batches_at(&self, batches: &[NewBatch<'_>], now_us: u64) -> Result<Appended, StorageError> {
        let messages = || batches.iter().flat_map(|batch| batch.messages);
        for (index, message) in messages().enumerate() {
            message
                .validate(self.config.max_message_bytes)
                .map_err(|source| StorageError::InvalidMessage { index, source })?;
        }
        let size_bytes: usize =
            messages().map(Message::encoded_len).sum::<usize>() + batches.len() * BATCH_HEADER_BYTES;
        if size_bytes > APPEND_BATCH_BYTES_MAX {
            return Err(StorageError::BatchTooLarge { size_bytes, size_bytes_max: APPEND_BATCH_BYTES_MAX });
        }
        let mut writer = self.lock_writer();
        if self.deleted.load(Ordering::Acquire) {
            return Err(StorageError::UnknownChannel { channel: self.name.to_string() });
        }
        if let Some(cause) = &writer.failure {
            return Err(StorageError::Failed { channel: self.label(), cause: cause.clone() });
        }
        if let Some(episode) = &mut writer.full
            && episode.last_attempt.elapsed() < STORAGE_FULL_RETRY_INTERVAL
        {
            episode.refused_appends += 1;
            return Err(self.storage_full());
        }
        let mut last_raft_entry = writer.last_raft_entry;
        let replicated = last_raft_entry.is_some_and(|last| last.term > 0);
        if replicated && batches.iter().any(|batch| batch.raft.is_none() && !batch.messages.is_empty()) {
            return Err(StorageError::ReplicatedLog { channel: self.label() });
        }
        for raft in batches.iter().filter(|batch| !batch.messages.is_empty()).filter_map(|batch| batch.raft) {
            if let Some(last) = last_raft_entry.filter(|last| last.index >= raft.index) {
                return Err(StorageError::RaftIndexNotAfter {
                    channel: self.label(),
                    index: raft.index,
                    last: last.index,
                });
            }
            last_raft_entry = Some(raft);
        }
        let timestamp_us = now_us.max(writer.last_timestamp_us);
        if messages().next().is_none() {
            return Ok(Appended {
                first_offset: writer.next_offset,
                count: 0,
                timestamp_us,
                sync_duration: Duration::ZERO,
            });
        }
        let result = self.roll_and_write(&mut writer, batches, timestamp_us);
        if writer.encode_buffer.capacity() > ENCODE_BUFFER_RETAINED_BYTES {
            writer.encode_buffer = Vec::new();
        }
        match result {
            Ok(appended) => {
                self.end_full_episode(&mut writer);
                Ok(appended)
            }
            Err(AppendFailure::Unknown(error)) => {
                let cause = error.to_string();
                writer.failure = Some(cause.clone());
                tracing::error!(channel = %self.name, partition = self.partition, %error, "append failed and the state of unsynced data is unknown; the channel refuses appends until restart");
                // Whatever the cause (a sync may fail with ENOSPC too), the
                // answer is that the channel refuses appends until restart.
                Err(StorageError::Failed { channel: self.label(), cause })
            }
            Err(AppendFailure::RolledBack(error)) if error.is_storage_full() => {
                self.note_full(&mut writer, &error);
                Err(self.storage_full())
            }
            Err(AppendFailure::RolledBack(error)) => Err(error),
        }
    }

    /// Rolls the active segment when due, then writes the batch.
    fn roll_and_write(
        &self,
        writer: &mut Writer,
        batches: &[NewBatch<'_>],
        timestamp_us: u64,
    ) -> Result<Appended, AppendFailure> {
        if self.should_roll(writer, timestamp_us) {
            self.roll(writer)?;
        }
        self.write_batches(writer, batches, timestamp_us)
    }

    fn storage_full(&self) -> StorageError {
        StorageError::StorageFull { channel: self.label(), path: self.dir.clone() }
    }

    /// Starts (or continues) a disk-full episode: logged once, at its start.
    fn note_full(&self, writer: &mut Writer, error: &StorageError) {
        let now = Instant::now();
        match &mut writer.full {
            Some(episode) => {
                episode.last_attempt = now;
                episode.refused_appends += 1;
            }
            None => {
                tracing::warn!(channel = %self.name, partition = self.partition, %error, "disk full: refusing appends with StorageFull until space is freed; reads go on");
                writer.full = Some(FullEpisode { since: now, last_attempt: now, refused_appends: 1 });
                self.storage_full.store(true, Ordering::Release);
                self.lock_counters().storage_full_episodes += 1;
            }
        }
    }

    fn end_full_episode(&self, writer: &mut Writer) {
        if let Some(episode) = writer.full.take() {
            self.storage_full.store(false, Ordering::Release);
            tracing::info!(
                channel = %self.name, partition = self.partition,
                refused_appends = episode.refused_appends,
                full_for_ms = episode.since.elapsed().as_millis() as u64,
                "disk space is back: appends resumed"
            );
        }
    }

    /// Refuses every later append (the channel is being deleted). Taken
    /// under the writer lock, so that no append is in progress once it
    /// returns.
    ///
    /// It also waits for the background sync of the last sealed segment:
    /// that sync writes the segment's index files by path, and must not
    /// write into a directory that a channel of the same name may be
    /// using next.
    ///
    /// Only the first call waits (no segment can roll after it), so that a
    /// second one, made under a lock others wait for, returns at once.
    pub fn mark_deleted(&self) {
        let (already_deleted, pending_seal) = {
            let mut writer = self.lock_writer();
            (self.deleted.swap(true, Ordering::AcqRel), writer.pending_seal.take())
        };
        if already_deleted && pending_seal.is_none() {
            return;
        }
        self.wait_for_seals(pending_seal);
    }

    /// Waits for `pending_seal` and for one a concurrent `sync` took from
    /// the writer (it holds `seal_order` while it waits). The outcome does
    /// not matter to callers: the log is going away.
    fn wait_for_seals(&self, pending_seal: Option<SealSync>) {
        let _order = self.seal_order.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(pending) = pending_seal
            && let Err(error) = self.join_seal(pending)
        {
            tracing::warn!(channel = %self.name, partition = self.partition, %error, "the sync of the last sealed segment failed as the log closed; recovery checks it at the next open");
        }
    }

    /// Whether the channel was deleted (see [`ChannelLog::mark_deleted`]).
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Whether the log is refusing appends because its disk is full.
    pub fn is_storage_full(&self) -> bool {
        self.storage_full.load(Ordering::Acquire)
    }

    fn write_batches(
        &self,
        writer: &mut Writer,
        batches: &[NewBatch<'_>],
        timestamp_us: u64,
    ) -> Result<Appended, AppendFailure> {
        let first_offset = writer.next_offset;
        let base_position = writer.active.written_len();
        let version = writer.active.version;
        let mut buffer = std::mem::take(&mut writer.encode_buffer);
        buffer.clear();
        let mut offset_entries = Vec::new();
        let mut time_entries = Vec::new();
        let mut last_indexed_position = writer.last_indexed_position;
        let mut offset = first_offset;
        let mut last_raft_entry = writer.last_raft_entry;
        // Any frame may be indexed, a record or a batch header.
        let mut index_at = |position: u64, offset: u64| {
            if position - last_indexed_position >= self.config.index_interval_bytes {
                offset_entries.push(IndexEntry { key: offset, value: position });
                time_entries.push(IndexEntry { key: timestamp_us, value: offset });
                last_indexed_position = position;
            }
        };
        for batch in batches.iter().filter(|batch| !batch.messages.is_empty()) {
            if version != FORMAT_VERSION_1 {
                index_at(base_position + buffer.len() as u64, offset);
                let position = batch.raft.unwrap_or(RaftPosition {
                    index: last_raft_entry.map_or(0, |last| last.index.saturating_add(1)),
                    term: 0,
                });
                let header = BatchHeader {
                    raft_index: position.index,
                    term: position.term,
                    kind: EntryKind::Data,
                    // At most APPEND_BATCH_BYTES_MAX / RECORD_OVERHEAD_BYTES.
                    count: batch.messages.len() as u32,
                    producer: batch.producer,
                };
                record::encode_batch_header(&mut buffer, offset, timestamp_us, &header);
                last_raft_entry = Some(position);
            }
            for message in batch.messages {
                index_at(base_position + buffer.len() as u64, offset);
                record::encode(&mut buffer, offset, timestamp_us, message);
                offset += 1;
            }
        }
        let written = writer.active.write(&buffer);
        writer.encode_buffer = buffer;
        match written {
            Ok(()) => {}
            Err(WriteFailure { error, rolled_back: true }) => return Err(AppendFailure::RolledBack(error)),
            Err(WriteFailure { error, rolled_back: false }) => return Err(AppendFailure::Unknown(error)),
        }
        writer.last_indexed_position = last_indexed_position;
        writer.last_raft_entry = last_raft_entry;
        let count = offset - first_offset;
        let mut sync_duration = Duration::ZERO;
        if self.config.fsync == FsyncPolicy::Always {
            let started = Instant::now();
            writer.active.sync_log().map_err(AppendFailure::Unknown)?;
            sync_duration = started.elapsed();
        } else {
            writer.unsynced = true;
        }
        let next_offset = first_offset + count;
        // The log-wide next offset moves first: a reader that has seen the
        // new records in the segment must never be told they are out of
        // range. (The reverse order only makes a reader briefly think it is
        // caught up.)
        self.visible_next_offset.store(next_offset, Ordering::Release);
        writer.active.publish(writer.active.written_len(), next_offset, timestamp_us, &offset_entries, &time_entries);
        writer.next_offset = next_offset;
        writer.last_timestamp_us = timestamp_us;
        {
            let mut counters = self.lock_counters();
            counters.messages_appended += count;
            counters.bytes_appended +=
                batches.iter().flat_map(|batch| batch.messages).map(|m| m.size_bytes() as u64).sum::<u64>();
        }
        Ok(Appended { first_offset, count, timestamp_us, sync_duration })
    }

    /// Calls `visit` with the first offset, timestamp and header of every
    /// batch of the active segment, in order (none in a version-1 segment).
    /// The server rebuilds its idempotent producers' windows from them when
    /// it opens a partition.
    ///
    /// # Errors
    /// The segment could not be read.
    pub fn visit_active_batches(&self, visit: impl FnMut(u64, u64, &BatchHeader)) -> Result<(), StorageError> {
        let active = Arc::clone(&self.lock_writer().active);
        active.visit_batches(visit)
    }

    /// Calls `visit` with the first offset, timestamp and header of every
    /// batch whose Raft index is above `after`, in order, across segments
    /// (a replicated partition rebuilds its idempotent producers from
    /// them). Reads the segments from the newest one whose first batch is
    /// at or before `after + 1`, checking every frame's CRC.
    ///
    /// # Errors
    /// A segment could not be read, or holds damage (kept by recovery, or
    /// a frame that does not verify).
    pub fn visit_batches_after(
        &self,
        after: u64,
        mut visit: impl FnMut(u64, u64, &BatchHeader),
    ) -> Result<(), StorageError> {
        let segments: Vec<Arc<Segment>> = self.segments().values().cloned().collect();
        let start = segments
            .iter()
            .rposition(|segment| segment.first_raft_entry().is_some_and(|first| first.index <= after.saturating_add(1)))
            .unwrap_or(0);
        for segment in &segments[start..] {
            segment.visit_batches_checked(|first_offset, timestamp_us, header| {
                if header.raft_index > after {
                    visit(first_offset, timestamp_us, header);
                }
            })?;
        }
        Ok(())
    }

    /// Whether the next append will seal the active segment first (and so
    /// sync and create files): callers on an async runtime move that append
    /// to a blocking thread.
    pub fn roll_due(&self, now_us: u64) -> bool {
        let writer = self.lock_writer();
        self.should_roll(&writer, now_us.max(writer.last_timestamp_us))
    }

    fn should_roll(&self, writer: &Writer, timestamp_us: u64) -> bool {
        // Damage recovery kept at the very end (a damaged last record) is
        // never appended after: the bytes of an append could complete a
        // frame cut short inside it, which the next recovery would then
        // take for a record. Sealed there, it holds exactly the offsets up
        // to the next segment's base (`SegmentRole::SealedDamagedEnd`).
        if writer.active.ends_in_damage() {
            return true;
        }
        let state = writer.active.state();
        if state.next_offset == writer.active.base_offset {
            return false;
        }
        let too_big = writer.active.written_len() >= self.config.segment_bytes;
        let age_us = self.config.segment_max_age.as_micros() as u64;
        let too_old = state.first_timestamp_us.is_some_and(|first| timestamp_us.saturating_sub(first) >= age_us);
        too_big || too_old
    }

    /// Seals the active segment (synced whatever the policy, so that only
    /// the last segment can ever have a torn tail) and starts a new one.
    ///
    /// Under `always` the seal is synced inline (its records are already
    /// synced; only indexes remain). Under `interval` and `never` the sync of
    /// the sealed segment runs on its own thread, so that appends do not
    /// wait for a whole segment to reach the disk; at most one such sync is
    /// outstanding, the next segment's empty files are synced before it
    /// starts, and no record after it is synced before it completes, so
    /// only the last sealed segment can have a torn end.
    fn roll(&self, writer: &mut Writer) -> Result<(), AppendFailure> {
        // A failed sync leaves the state of unsynced data unknown: the
        // channel refuses appends from then on (see `Writer::failure`).
        let sealed = match self.finish_seal(writer) {
            Ok(()) if self.config.fsync == FsyncPolicy::Always => writer.active.sync_all(&*self.fs),
            other => other,
        };
        sealed.map_err(AppendFailure::Unknown)?;
        // The next segment is created, its empty files and the directory
        // synced, *before* the sealed segment's own sync starts. That sync
        // writes back up to a whole segment under `interval` and `never`,
        // and a small sync issued while it runs waits for it (ext4 commits
        // its journal only after the data it orders): created afterwards,
        // each roll stalled the writer 30-100 ms at 50 MiB/s (measured with
        // strace, docs/BENCHMARKS.md).
        // A segment that cannot be created leaves nothing behind (see
        // `Segment::create`): the next append tries the roll again.
        // A seal that `sync` is waiting for (it took it from the writer) must
        // be durable before the next segment exists: lock order is writer,
        // then seal_order, everywhere.
        let _order = (self.config.fsync != FsyncPolicy::Always)
            .then(|| self.seal_order.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let segment = Arc::new(
            Segment::create(&*self.fs, &self.dir, writer.next_offset, self.config.format_version)
                .map_err(AppendFailure::RolledBack)?,
        );
        if self.config.fsync != FsyncPolicy::Always {
            let sealed = Arc::clone(&writer.active);
            let fs = Arc::clone(&self.fs);
            match self.fs.sync_in_background(Box::new(move || sealed.sync_all(&*fs))) {
                BackgroundSync::NotStarted => writer.active.sync_all(&*self.fs).map_err(AppendFailure::Unknown)?,
                started => writer.pending_seal = Some(started),
            }
        }
        writer.unsynced = false;
        self.segments_mut().insert(segment.base_offset, Arc::clone(&segment));
        tracing::debug!(channel = %self.name, partition = self.partition, base_offset = segment.base_offset, "rolled to a new segment");
        writer.active = segment;
        writer.last_indexed_position = FILE_HEADER_BYTES as u64;
        Ok(())
    }

    /// Waits for the background sync of the last sealed segment.
    fn finish_seal(&self, writer: &mut Writer) -> Result<(), StorageError> {
        writer.pending_seal.take().map_or(Ok(()), |pending| self.join_seal(pending))
    }

    fn join_seal(&self, pending: SealSync) -> Result<(), StorageError> {
        pending.wait().unwrap_or_else(|_| {
            Err(StorageError::Failed { channel: self.label(), cause: "the seal sync thread panicked".into() })
        })
    }

    /// Syncs appends not yet synced (the `interval` policy's background
    /// task, and shutdown).
    ///
    /// # Errors
    /// The failed sync; the log then refuses appends.
    pub fn sync(&self) -> Result<(), StorageError> {
        // The waits happen outside the writer lock, so appends (which may
        // run on the server's async threads) never wait for a disk sync
        // they did not ask for.
        // Lock order everywhere: writer, then seal_order.
        let (order, pending_seal, active) = {
            let mut writer = self.lock_writer();
            if writer.failure.is_some() {
                return Ok(());
            }
            let pending_seal = writer.pending_seal.take();
            if pending_seal.is_none() && !writer.unsynced {
                return Ok(());
            }
            writer.unsynced = false;
            let order = self.seal_order.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            (order, pending_seal, Arc::clone(&writer.active))
        };
        // The sealed segment first: a segment is never more durable than
        // the one before it (recovery relies on it).
        let result = pending_seal.map_or(Ok(()), |pending| self.join_seal(pending)).and_then(|()| active.sync_log());
        drop(order);
        if let Err(error) = &result {
            self.lock_writer().failure = Some(error.to_string());
        }
        result
    }

    /// Makes everything appended before the call durable, and says so only
    /// when it is: unlike [`ChannelLog::sync`], it waits for a sync another
    /// thread has under way (which took the appends it covers), and fails
    /// when the log has failed. A replicated partition's state machine
    /// calls it before it records what it applied.
    ///
    /// # Errors
    /// The failed sync, or the earlier failure that stopped the log.
    pub fn sync_appended(&self) -> Result<(), StorageError> {
        self.sync()?;
        // A sync that another thread started before ours found nothing to
        // do holds `seal_order` until it is done.
        drop(self.seal_order.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        match &self.lock_writer().failure {
            Some(cause) => Err(StorageError::Failed { channel: self.label(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Syncs everything, indexes included (clean shutdown).
    ///
    /// # Errors
    /// The failed sync.
    pub fn close(&self) -> Result<(), StorageError> {
        let mut writer = self.lock_writer();
        // A seal a concurrent `sync` is waiting for comes first.
        let _order = self.seal_order.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.finish_seal(&mut writer)?;
        writer.active.sync_all(&*self.fs)?;
        writer.unsynced = false;
        Ok(())
    }

    /// Sets the callback told the new start offset each time retention
    /// moves it (replacing any earlier one). It runs on the thread that
    /// applied retention, so it must be quick and must not block.
    pub fn set_start_offset_listener(&self, listener: StartOffsetListener) {
        *self.start_offset_listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(listener);
    }

    /// The first offset still in the log.
    pub fn start_offset(&self) -> u64 {
        self.segments().first_key_value().map_or(0, |(&base, _)| base)
    }

    /// One past the last offset readers can see: where a subscriber that
    /// starts at "latest" begins.
    pub fn next_offset(&self) -> u64 {
        self.visible_next_offset.load(Ordering::Acquire)
    }

    /// The Raft position of the last batch written (format version 2):
    /// for a replicated partition, the last data entry its state machine
    /// applied.
    pub fn last_raft_entry(&self) -> Option<RaftPosition> {
        self.lock_writer().last_raft_entry
    }

    /// Reads whole records from `from`: at most `max_bytes` of them, or one
    /// record when that one alone is larger. An empty batch means `from` is the next
    /// offset to be written: the reader is caught up.
    ///
    /// # Errors
    /// `OffsetOutOfRange` (with the current range) below the log start or
    /// past its end; `Corrupt` when a record fails its CRC or checks.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<ReadBatch, StorageError> {
        self.read_bounded(from, max_bytes, u64::MAX)
    }

    /// As [`ChannelLog::read`], returning at most `max_records` records.
    ///
    /// # Errors
    /// As [`ChannelLog::read`].
    pub fn read_bounded(&self, from: u64, max_bytes: usize, max_records: u64) -> Result<ReadBatch, StorageError> {
        let next = self.next_offset();
        let segment = {
            let segments = self.segments();
            let start = segments.first_key_value().map_or(0, |(&base, _)| base);
            if from < start || from > next {
                return Err(StorageError::OffsetOutOfRange { channel: self.label(), requested: from, start, next });
            }
            segments.range(..=from).next_back().map(|(_, segment)| Arc::clone(segment))
        };
        let Some(segment) = segment else {
            return Ok(ReadBatch { records: RecordSlices::default(), first_offset: from, next_offset: from, count: 0 });
        };
        let read = match segment.read(from, max_bytes, max_records) {
            // Nothing readable after the damage in its segment: the next
            // segment, if any, is where reading can go on.
            Err(StorageError::CorruptRecord { path, position, offset, next_readable_offset: None, reason }) => {
                let next_segment = self.segments().range(from + 1..).next().map(|(&base, _)| base);
                return Err(StorageError::CorruptRecord {
                    path,
                    position,
                    offset,
                    next_readable_offset: next_segment,
                    reason,
                });
            }
            other => other?,
        };
        Ok(ReadBatch {
            records: RecordSlices::new(read.records),
            first_offset: read.first_offset,
            next_offset: read.next_offset,
            count: read.count,
        })
    }

    /// The first offset whose timestamp is at least `timestamp_us`; the next
    /// offset when every record is older.
    ///
    /// # Errors
    /// `Corrupt` as for [`ChannelLog::read`].
    pub fn offset_for_time(&self, timestamp_us: u64) -> Result<u64, StorageError> {
        let next = self.next_offset();
        let candidates: Vec<Arc<Segment>> = self.segments().values().cloned().collect();
        for segment in candidates {
            if let Some(offset) = segment.offset_for_time(timestamp_us)? {
                return Ok(offset.min(next));
            }
        }
        Ok(next)
    }

    /// Deletes whole oldest segments beyond the retention limits, never the
    /// active one.
    ///
    /// # Errors
    /// `Io` when a file cannot be removed (the segment is already gone from
    /// the log; the file is left for the operator).
    pub fn apply_retention(&self, now_us: u64) -> Result<RetentionOutcome, StorageError> {
        let retention = self.config.retention;
        let mut outcome = RetentionOutcome::default();
        // The first Raft index of the window (see below), when replicated.
        let replicated_window_start = self
            .last_raft_entry()
            .filter(|last| last.term > 0)
            .map(|last| last.index.saturating_sub(REPLICATED_DEDUP_WINDOW_ENTRIES) + 1);
        let _files = self.lock_segment_files();
        let removed = {
            let mut segments = self.segments_mut();
            let mut size_bytes: u64 = segments.values().map(|s| s.state().visible_len).sum();
            let mut message_count = self.next_offset() - segments.first_key_value().map_or(0, |(&base, _)| base);
            let mut removed = Vec::new();
            while segments.len() > 1 {
                let Some((_, oldest)) = segments.first_key_value() else { break };
                let (oldest_bytes, oldest_count, oldest_last_us) = {
                    let state = oldest.state();
                    (state.visible_len, state.next_offset - oldest.base_offset, state.last_timestamp_us.unwrap_or(0))
                };
                let over_bytes = retention.max_bytes.is_some_and(|max| size_bytes - oldest_bytes >= max);
                let over_messages = retention.max_messages.is_some_and(|max| message_count - oldest_count >= max);
                let too_old =
                    retention.max_age.is_some_and(|age| now_us.saturating_sub(oldest_last_us) > age.as_micros() as u64);
                if !(over_bytes || over_messages || too_old) {
                    break;
                }
                // A replicated partition keeps the batches of its last
                // `REPLICATED_DEDUP_WINDOW_ENTRIES` Raft entries whatever its
                // retention: its idempotent producers are rebuilt from them,
                // identically on every replica. The oldest segment goes only
                // when the next one starts at or before the window.
                if let Some(window_start) = replicated_window_start {
                    let next_first = segments.values().nth(1).and_then(|next| next.first_raft_entry());
                    if next_first.is_none_or(|first| first.index > window_start) {
                        break;
                    }
                }
                let Some((_, segment)) = segments.pop_first() else { break };
                size_bytes -= oldest_bytes;
                message_count -= oldest_count;
                outcome.segments_deleted += 1;
                outcome.bytes_deleted += oldest_bytes;
                outcome.records_deleted += oldest_count;
                removed.push(segment);
            }
            removed
        };
        // The start moved the moment the segments left the map, whatever
        // happens to their files.
        if !removed.is_empty()
            && let Some(listener) = &*self.start_offset_listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            listener(self.start_offset());
        }
        // Readers holding a removed segment keep reading it: its files stay
        // open and mapped until the last reference goes.
        for segment in removed {
            for path in segment.paths() {
                self.fs.remove(&path).at(&path)?;
            }
        }
        if outcome.segments_deleted > 0 {
            {
                let mut counters = self.lock_counters();
                counters.retention_segments_deleted += outcome.segments_deleted;
                counters.retention_bytes_deleted += outcome.bytes_deleted;
            }
            self.fs.sync_dir(&self.dir).at(&self.dir)?;
            tracing::info!(
                channel = %self.name, partition = self.partition,
                segments = outcome.segments_deleted,
                bytes = outcome.bytes_deleted,
                records = outcome.records_deleted,
                start_offset = self.start_offset(),
                "retention deleted segments"
            );
        }
        Ok(outcome)
    }

    /// Summary figures.
    pub fn stats(&self) -> LogStats {
        let segments = self.segments();
        LogStats {
            start_offset: segments.first_key_value().map_or(0, |(&base, _)| base),
            next_offset: self.next_offset(),
            size_bytes: segments.values().map(|s| s.state().visible_len).sum(),
            segment_count: segments.len() as u64,
        }
    }

    /// Running totals since the log was opened.
    pub fn counters(&self) -> LogCounters {
        *self.lock_counters()
    }

    fn lock_counters(&self) -> MutexGuard<'_, LogCounters> {
        self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_segment_files(&self) -> MutexGuard<'_, ()> {
        self.segment_files.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn segments(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.segments.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn segments_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.segments.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Base offsets of the segments in `dir`, sorted; removes files left over
/// from a crash (an index whose log is gone).
fn list_segments(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<u64>, StorageError> {
    let names = fs.list(dir).at(dir)?;
    let mut logs: Vec<u64> = names
        .iter()
        .filter_map(|name| segment::parse_file_name(name))
        .filter(|&(_, extension)| extension == LOG_EXTENSION)
        .map(|(base, _)| base)
        .collect();
    logs.sort_unstable();
    for name in &names {
        let ours = |extension: &str| {
            [LOG_EXTENSION, segment::OFFSET_INDEX_EXTENSION, segment::TIME_INDEX_EXTENSION].contains(&extension)
        };
        match segment::parse_file_name(name) {
            Some((base, extension)) if ours(extension) && logs.binary_search(&base).is_ok() => {}
            Some((_, extension)) if extension.ends_with(TORN_SUFFIX) => {
                tracing::warn!(path = %dir.join(name).display(), "a segment set aside by recovery is still here; remove it once inspected");
            }
            Some(_) => {
                // An index without its log: retention removed the log and
                // crashed before the index. Derived data, safe to delete.
                let path = dir.join(name);
                tracing::warn!(path = %path.display(), "removing an index file whose log is gone");
                fs.remove(&path).at(&path)?;
            }
            None if name.starts_with(super::channel::CHANNEL_SETTINGS_FILE) => {}
            None if super::channel::parse_partition_dir(name).is_some() || name == transfer::TRANSFER_DIR => {}
            None => tracing::warn!(path = %dir.join(name).display(), "ignoring a file that is not a segment file"),
        }
    }
    Ok(logs)
}

/// Whether a sealed segment failed to open because its end never reached
/// the disk, as a crash during its background seal sync leaves it (see
/// [`segment::is_torn_end`]), or ends early at a record boundary.
fn is_torn_tail(fs: &dyn FileSystem, dir: &Path, base_offset: u64, error: &StorageError) -> bool {
    match error {
        StorageError::Corrupt { position, reason, .. } => {
            let path = dir.join(segment::file_name(base_offset, LOG_EXTENSION));
            let Ok(file) = fs.open(&path, super::fs::OpenMode::Existing) else { return false };
            let len = file.len().saturating_sub(*position) as usize;
            file.read_range(*position, len).is_ok_and(|rest| segment::is_torn_end(&rest, reason))
        }
        // Ending early is what an interrupted sync leaves; overlapping the
        // next segment is not.
        StorageError::SegmentEndMismatch { end_offset, next_base_offset, .. } => end_offset < next_base_offset,
        _ => false,
    }
}

/// Suffix of segment files recovery set aside instead of deleting.
const TORN_SUFFIX: &str = "torn";

/// The lowest segment base a replicated log's recovery may cut from: its
/// last sealed segment's, as the directory listed them before recovery
/// (a crash can leave unsynced bytes there under `interval` and `never`,
/// and the policy may have changed since they were written; under
/// `always` cutting it too is safe, the state machine refusing a cut below
/// what it synced). Fixed for the whole of one open, so that a cut never
/// walks back into older, synced segments.
fn replicated_cut_floor(base_offsets: &[u64]) -> u64 {
    base_offsets.len().checked_sub(2).map_or(0, |at| base_offsets[at])
}

/// The first damage recovery kept in a segment at or after `floor`: its
/// segment's base offset and the damage's byte position.
fn crash_damage(segments: &BTreeMap<u64, Arc<Segment>>, floor: u64) -> Option<(u64, u64)> {
    segments
        .range(floor..)
        .find_map(|(&base, segment)| segment.first_damage_position().map(|position| (base, position)))
}

/// Cuts a replicated partition's log at the damage at `position` in the
/// segment at `base_offset`: the segments after it are set aside
/// (`*.torn`), the bytes from the damage on are copied apart
/// (`BASE.log.tail.torn`), and the segment is truncated at the damage.
///
/// A single node keeps damage (its offsets are never reused, nothing after
/// it is lost). A replica must not: under `interval` and `never` a power
/// loss can write an unsynced tail's pages back out of order, and the
/// batches after the hole would make the state machine take the entries
/// in it for applied. Cut, they are applied again from the Raft log,
/// which holds every entry after the last snapshot; a cut below what the
/// state machine recorded as synced is refused when it opens
/// (`cluster::partition`), naming the files set aside.
///
/// Crash-safe at every step: until the truncation lands the segment still
/// ends in the damage, and the next open cuts again. The truncation needs
/// no free space beyond the tail's copy.
fn cut_replicated_damage(
    fs: &dyn FileSystem,
    dir: &Path,
    name: &ChannelName,
    base_offsets: &[u64],
    base_offset: u64,
    position: u64,
) -> Result<(), StorageError> {
    let log_path = dir.join(segment::file_name(base_offset, LOG_EXTENSION));
    let later: Vec<u64> = base_offsets.iter().copied().filter(|&base| base > base_offset).collect();
    tracing::error!(
        channel = %name, segment = %log_path.display(), position, segments_after = later.len(),
        "recovery: damage in the unsynced end of a replicated partition's log; cutting the log there (what is cut is set aside as *.torn) so that its Raft entries are applied again"
    );
    // The last first: a crash in between leaves a log that still ends in
    // the damage.
    for &base in later.iter().rev() {
        remove_segment_files(fs, dir, base)?;
    }
    let file = fs.open(&log_path, OpenMode::Existing).at(&log_path)?;
    let position = position.min(file.len());
    {
        let tail = file.read_range(position, (file.len() - position) as usize).at(&log_path)?;
        let aside = aside_path(fs, dir, base_offset, &format!("{LOG_EXTENSION}.tail"))?;
        // Only the last of `ASIDE_COPIES_MAX` copies can be there already.
        if fs.exists(&aside).at(&aside)? {
            fs.remove(&aside).at(&aside)?;
        }
        let copy = fs.open(&aside, OpenMode::CreateNew).at(&aside)?;
        copy.append(&tail).at(&aside)?;
        copy.sync().at(&aside)?;
        fs.sync_dir(dir).at(dir)?;
        // `tail` (which may borrow the file's map) goes before the cut.
    }
    file.truncate(position).at(&log_path)?;
    file.sync().at(&log_path)
}

/// Most copies of one segment file recovery keeps set aside; past it the
/// last is overwritten.
const ASIDE_COPIES_MAX: u32 = 1000;

/// Where to set the segment file `BASE.EXTENSION` aside: `BASE.EXTENSION.torn`,
/// or with a number before `.torn` when that is taken (an earlier repair's,
/// kept for inspection: never overwritten, up to [`ASIDE_COPIES_MAX`]).
fn aside_path(fs: &dyn FileSystem, dir: &Path, base_offset: u64, extension: &str) -> Result<PathBuf, StorageError> {
    let mut path = dir.join(segment::file_name(base_offset, &format!("{extension}.{TORN_SUFFIX}")));
    for copy in 2..=ASIDE_COPIES_MAX {
        if !fs.exists(&path).at(&path)? {
            break;
        }
        path = dir.join(segment::file_name(base_offset, &format!("{extension}.{copy}.{TORN_SUFFIX}")));
    }
    Ok(path)
}

/// Sets a segment's files aside (renamed with a `.torn` suffix, no longer
/// part of the log) rather than deleting them: if the repair was wrong, the
/// operator still has the bytes.
fn remove_segment_files(fs: &dyn FileSystem, dir: &Path, base_offset: u64) -> Result<(), StorageError> {
    for extension in [LOG_EXTENSION, segment::OFFSET_INDEX_EXTENSION, segment::TIME_INDEX_EXTENSION] {
        let path = dir.join(segment::file_name(base_offset, extension));
        if !fs.exists(&path).at(&path)? {
            continue;
        }
        let aside = aside_path(fs, dir, base_offset, extension)?;
        match fs.rename(&path, &aside) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::Io { path, source }),
        }
    }
    fs.sync_dir(dir).at(dir)
}

fn log_recovery(name: &ChannelName, segment: &Segment, report: RecoveryReport) {
    if report.truncated_bytes > 0 {
        tracing::warn!(
            channel = %name,
            segment = %segment.log_path.display(),
            truncated_bytes = report.truncated_bytes,
            next_offset = segment.state().next_offset,
            "recovery cut a torn or corrupt tail at the last valid record"
        );
    }
    if report.index_rebuilt {
        tracing::info!(channel = %name, segment = %segment.log_path.display(), "recovery rebuilt the segment's indexes");
    }
}
