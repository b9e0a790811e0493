//! Segment transfer: a replicated partition's log copied to a replica that
//! lacks what the source's Raft log no longer holds (a replica added by a
//! move, or one that was down past the source's purged entries), as the
//! source's segment files (docs/REPLICATION.md, "Replica moves and segment
//! transfer").
//!
//! The source offers its segments up to what readers may see, and serves
//! their `.log` bytes as they are on disk: records and batch headers carry
//! their own CRCs, and the copy's indexes are rebuilt from them. The
//! receiver writes them into a staging directory inside the partition's
//! own, opens the copy there (recovery checks every record), and only then
//! moves it into place, replacing the receiving log whole, behind a marker
//! that lists the copied segments: a crash before the marker leaves a
//! staging directory the next open removes (and the receiving log as it
//! was); one after it is finished by the next open. A copy is taken only
//! when it reaches past the receiving log: what it replaces is a prefix of
//! it, or records the source's retention already removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ChannelLog, LogConfig, list_segments};
use crate::storage::error::{IoContext, StorageError};
use crate::storage::fs::{FileSystem, OpenMode, StorageFile};
use crate::storage::segment::{self, LOG_EXTENSION, Segment};

/// The staging directory of a transfer, inside the partition's directory.
pub(crate) const TRANSFER_DIR: &str = "segment-transfer";
/// Written into the staging directory once the copy is whole and checked:
/// the base offsets of its segments, one per line.
const TRANSFER_COMPLETE: &str = "complete";
/// Most segments one transfer copies (a bound on the list a source sends,
/// and on the marker read back at open).
pub const TRANSFER_SEGMENTS_MAX: usize = 100_000;

/// A segment a replica offers to one that copies its log: its base offset
/// and how many bytes of its `.log` file to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentCopy {
    pub base_offset: u64,
    pub bytes: u64,
}

/// A copy being received into a log's staging directory.
pub struct SegmentTransfer {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    /// The segment being written, and the bytes it holds.
    current: Option<(u64, Box<dyn StorageFile>)>,
    bases: Vec<u64>,
    /// Set by [`ChannelLog::check_transfer`]: where the checked copy ends.
    checked: Option<CopyEnd>,
}

/// Where a checked copy ends: its next offset and last batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyEnd {
    pub next_offset: u64,
    pub last_raft_entry: Option<super::RaftPosition>,
}

impl ChannelLog {
    /// The segments a replica copies from this log to hold offsets up to
    /// `up_to` (exclusive), the last one cut where the
    /// batch at `up_to` starts (or whole, when it ends there).
    ///
    /// # Errors
    /// The log holds damage that recovery kept (a copy would spread it),
    /// does not reach `up_to`, starts after it (retention), or no batch
    /// starts at `up_to`.
    pub fn segments_to_copy(&self, up_to: u64) -> Result<Vec<SegmentCopy>, StorageError> {
        let invalid = |problem: String| StorageError::InvalidFile { path: self.dir.clone(), problem };
        if up_to == 0 || up_to > self.next_offset() || up_to <= self.start_offset() {
            return Err(invalid(format!(
                "a copy up to offset {up_to} was asked for, and this log holds offsets {}..{}",
                self.start_offset(),
                self.next_offset()
            )));
        }
        let segments: Vec<Arc<Segment>> =
            self.segments().range(..up_to).map(|(_, segment)| Arc::clone(segment)).collect();
        let mut copies = Vec::with_capacity(segments.len());
        for segment in segments {
            if let Some(position) = segment.first_damage_position() {
                return Err(StorageError::InvalidFile {
                    path: segment.log_path.clone(),
                    problem: format!("holds damage at byte {position}; it is not copied to another replica"),
                });
            }
            let (visible_len, next_offset) = {
                let state = segment.state();
                (state.visible_len, state.next_offset)
            };
            let bytes = if next_offset <= up_to {
                visible_len
            } else {
                let mut cut = None;
                segment.visit_batches_at(|offset, position| {
                    if offset == up_to {
                        cut.get_or_insert(position);
                    }
                })?;
                cut.ok_or_else(|| invalid(format!("no batch starts at offset {up_to}")))?
            };
            copies.push(SegmentCopy { base_offset: segment.base_offset, bytes });
        }
        Ok(copies)
    }

    /// Up to `len` bytes of the `.log` file of the segment at
    /// `base_offset`, from `position`, as they are on disk.
    ///
    /// # Errors
    /// No such segment (retention removed it), or the read failed.
    pub fn read_segment_bytes(&self, base_offset: u64, position: u64, len: usize) -> Result<Bytes, StorageError> {
        let segment = self.segments().get(&base_offset).cloned().ok_or_else(|| StorageError::InvalidFile {
            path: self.dir.join(segment::file_name(base_offset, LOG_EXTENSION)),
            problem: "no such segment (retention may have removed it)".into(),
        })?;
        segment.read_log_bytes(position, len)
    }

    /// Whether a copy is being moved into this log: its marker is written
    /// and the move has not finished (the next open finishes it).
    ///
    /// # Errors
    /// The staging directory cannot be looked at.
    pub fn segment_copy_pending(&self) -> Result<bool, StorageError> {
        if self.copy_interrupted.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(true);
        }
        let marker = self.dir.join(TRANSFER_DIR).join(TRANSFER_COMPLETE);
        self.fs.exists(&marker).at(&marker)
    }

    /// Starts receiving a copy of another replica's segments, into a fresh
    /// staging directory.
    ///
    /// # Errors
    /// A copy that failed while it was moved in waits for the next open, or
    /// the staging directory cannot be made.
    pub fn begin_transfer(&self) -> Result<SegmentTransfer, StorageError> {
        let dir = self.dir.join(TRANSFER_DIR);
        if self.fs.exists(&dir.join(TRANSFER_COMPLETE)).at(&dir)? {
            return Err(StorageError::InvalidFile {
                path: dir,
                problem: "a segment copy failed while it was moved in; restart the broker to finish it".into(),
            });
        }
        if self.fs.exists(&dir).at(&dir)? {
            self.fs.remove_dir_all(&dir).at(&dir)?;
        }
        super::super::fs::create_dir_all_durable(&*self.fs, &dir).at(&dir)?;
        Ok(SegmentTransfer { fs: Arc::clone(&self.fs), dir, current: None, bases: Vec::new(), checked: None })
    }

    /// Syncs the copy and checks it, without holding up this log: the
    /// segments announced (`copies`), each of its announced length, and
    /// opening them runs recovery over every record (CRCs checked, indexes
    /// built) and finds no damage and nothing to cut.
    ///
    /// # Errors
    /// The copy is not that whole, valid log.
    pub fn check_transfer(
        &self,
        transfer: &mut SegmentTransfer,
        copies: &[SegmentCopy],
    ) -> Result<CopyEnd, StorageError> {
        let staged = transfer.finish()?;
        let invalid = |problem: String| StorageError::InvalidFile { path: transfer.dir.clone(), problem };
        if staged != copies.iter().map(|copy| copy.base_offset).collect::<Vec<_>>() {
            return Err(invalid(format!("the copy holds segments {staged:?}, not those announced")));
        }
        for copy in copies {
            let path = transfer.dir.join(segment::file_name(copy.base_offset, LOG_EXTENSION));
            let len = self.fs.open(&path, OpenMode::Existing).at(&path)?.len();
            if len != copy.bytes {
                return Err(invalid(format!("{} holds {len} bytes, {} were announced", path.display(), copy.bytes)));
            }
        }
        // Checked strictly: damage anywhere in a copy refuses it.
        let strict = LogConfig { replicated: false, fsync: super::FsyncPolicy::Always, ..self.config.clone() };
        let checked =
            ChannelLog::open_partition(Arc::clone(&self.fs), &transfer.dir, self.name.clone(), self.partition, strict)?;
        if checked.segments().values().any(|segment| segment.first_damage_position().is_some()) {
            return Err(invalid("the copied segments hold damage".into()));
        }
        let copied: u64 = copies.iter().map(|copy| copy.bytes).sum();
        let opened: u64 = checked.segments().values().map(|segment| segment.written_len()).sum();
        if opened != copied {
            return Err(invalid(format!("recovery cut the copy from {copied} to {opened} bytes: it is not whole")));
        }
        let end = CopyEnd { next_offset: checked.next_offset(), last_raft_entry: checked.last_raft_entry() };
        checked.close()?;
        drop(checked);
        transfer.checked = Some(end);
        Ok(end)
    }

    /// Moves a checked copy into place, replacing this log's segments, and
    /// serves it from now on. After its marker is written, a failure leaves
    /// this log refusing appends until a restart, whose open finishes the
    /// move.
    ///
    /// # Errors
    /// The copy was not checked, does not reach past this log (its next
    /// offset, its last Raft entry), or a file operation failed.
    pub fn adopt_transfer(&self, transfer: SegmentTransfer) -> Result<(), StorageError> {
        let Some(end) = transfer.checked else {
            return Err(StorageError::InvalidFile {
                path: transfer.dir.clone(),
                problem: "a segment copy is adopted only once checked".into(),
            });
        };
        // Appends wait until the copy is in place.
        let mut writer = self.lock_writer();
        let index = |entry: Option<super::RaftPosition>| entry.map(|entry| entry.index);
        if writer.next_offset >= end.next_offset || index(writer.last_raft_entry) > index(end.last_raft_entry) {
            return Err(StorageError::InvalidFile {
                path: self.dir.clone(),
                problem: format!(
                    "a segment copy up to offset {} does not reach past this log (up to offset {}): the copy is dropped",
                    end.next_offset, writer.next_offset
                ),
            });
        }
        // Nothing else touches the segment files while they are replaced:
        // the background sync of the last sealed segment is waited for, and
        // retention waits.
        let seal_order = self.seal_order.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = self.finish_seal(&mut writer) {
            tracing::warn!(partition = %self.label(), %error, "the sync of a segment the copy replaces failed; it is replaced anyway");
        }
        drop(seal_order);
        let _files = self.lock_segment_files();
        if let Err(error) = write_marker(&*self.fs, &transfer.dir, &transfer.bases) {
            // Before the marker's rename nothing was moved, and the log goes
            // on as it was; after it (its directory's sync failed), the
            // next open would move the copy in.
            let marker = transfer.dir.join(TRANSFER_COMPLETE);
            if !self.fs.exists(&marker).unwrap_or(true) {
                return Err(error);
            }
            writer.failure = Some(format!("a segment copy failed while it was moved in: {error}"));
            self.copy_interrupted.store(true, std::sync::atomic::Ordering::Release);
            return Err(error);
        }
        let moved = finish_pending_transfer(&*self.fs, &self.dir).and_then(|()| {
            ChannelLog::open_recovering(
                Arc::clone(&self.fs),
                &self.dir,
                self.name.clone(),
                self.partition,
                self.config.clone(),
                None,
            )
        });
        let adopted = match moved {
            Ok(adopted) => adopted,
            Err(error) => {
                // The files may be half moved: nothing more is written here
                // until the next open finishes the move.
                writer.failure = Some(format!("a segment copy failed while it was moved in: {error}"));
                self.copy_interrupted.store(true, std::sync::atomic::Ordering::Release);
                return Err(error);
            }
        };
        let mut adopted_writer = adopted.lock_writer();
        std::mem::swap(&mut *writer, &mut *adopted_writer);
        drop(adopted_writer);
        std::mem::swap(&mut *self.segments_mut(), &mut *adopted.segments_mut());
        self.visible_next_offset.store(writer.next_offset, std::sync::atomic::Ordering::Release);
        drop(writer);
        // `adopted` now holds the segments the copy replaced (their files
        // are gone; readers holding one keep reading it).
        drop(adopted);
        tracing::info!(partition = %self.label(), start = self.start_offset(), next = self.next_offset(), "segment copy adopted");
        if let Some(listener) = &*self.start_offset_listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            listener(self.start_offset());
        }
        Ok(())
    }
}

impl SegmentTransfer {
    /// Appends `bytes` to the copy of the segment at `base_offset`: a
    /// segment's bytes in order, segments in increasing order.
    ///
    /// # Errors
    /// A segment out of order, too many segments, or the failed write.
    pub fn append(&mut self, base_offset: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.dir.join(segment::file_name(base_offset, LOG_EXTENSION));
        if self.current.as_ref().is_none_or(|(current, _)| *current != base_offset) {
            if self.bases.last().is_some_and(|&last| last >= base_offset) || self.bases.len() >= TRANSFER_SEGMENTS_MAX {
                return Err(StorageError::InvalidFile {
                    path,
                    problem: "segments of a copy must come in increasing order, at most TRANSFER_SEGMENTS_MAX".into(),
                });
            }
            self.sync_current()?;
            let file = self.fs.open(&path, OpenMode::CreateNew).at(&path)?;
            self.current = Some((base_offset, file));
            self.bases.push(base_offset);
        }
        if let Some((_, file)) = &self.current {
            file.append(bytes).at(&path)?;
        }
        Ok(())
    }

    fn sync_current(&mut self) -> Result<(), StorageError> {
        if let Some((base_offset, file)) = self.current.take() {
            file.sync().at(self.dir.join(segment::file_name(base_offset, LOG_EXTENSION)))?;
        }
        Ok(())
    }

    /// Syncs the copy; returns its segments' base offsets.
    fn finish(&mut self) -> Result<Vec<u64>, StorageError> {
        if self.checked.is_some() {
            return Ok(self.bases.clone());
        }
        self.sync_current()?;
        self.fs.sync_dir(&self.dir).at(&self.dir)?;
        if self.bases.is_empty() {
            return Err(StorageError::InvalidFile {
                path: self.dir.clone(),
                problem: "the copy holds no segment".into(),
            });
        }
        Ok(self.bases.clone())
    }
}

/// Writes the marker whole or not at all: into a temporary file, synced,
/// then renamed (a power loss mid-write leaves no marker, and the copy is
/// removed at the next open).
fn write_marker(fs: &dyn FileSystem, dir: &Path, bases: &[u64]) -> Result<(), StorageError> {
    let path = dir.join(TRANSFER_COMPLETE);
    let temporary = dir.join(format!("{TRANSFER_COMPLETE}.tmp"));
    let text: String = bases.iter().map(|base| format!("{base}\n")).collect();
    let file = fs.open(&temporary, OpenMode::CreateNew).at(&temporary)?;
    file.append(text.as_bytes()).at(&temporary)?;
    file.sync().at(&temporary)?;
    drop(file);
    fs.rename(&temporary, &path).at(&path)?;
    fs.sync_dir(dir).at(dir)
}

/// Finishes a transfer a crash interrupted, or removes one that was not
/// whole (no marker): run before a log's segments are listed at open.
/// With the marker, every segment of `dir` that the copy does not list is
/// removed (the segments it replaces), the copy's files are moved in (for
/// each segment, a replaced segment of the same base removed first, then
/// the `.log`, then its indexes, so that no index is ever left beside
/// another segment's log), and the staging directory is removed: each step
/// may be done again.
pub(super) fn finish_pending_transfer(fs: &dyn FileSystem, dir: &Path) -> Result<(), StorageError> {
    let staging = dir.join(TRANSFER_DIR);
    if !fs.exists(&staging).at(&staging)? {
        return Ok(());
    }
    let marker = staging.join(TRANSFER_COMPLETE);
    if !fs.exists(&marker).at(&marker)? {
        tracing::warn!(path = %staging.display(), "removing a segment copy that was cut short");
        fs.remove_dir_all(&staging).at(&staging)?;
        return fs.sync_dir(dir).at(dir);
    }
    let file = fs.open(&marker, OpenMode::Existing).at(&marker)?;
    let bytes_max = TRANSFER_SEGMENTS_MAX as u64 * 21;
    if file.len() > bytes_max {
        return Err(StorageError::InvalidFile {
            path: marker,
            problem: "longer than TRANSFER_SEGMENTS_MAX lines".into(),
        });
    }
    let text = file.read_range(0, file.len() as usize).at(&marker)?;
    let bases: Vec<u64> = std::str::from_utf8(&text)
        .ok()
        .and_then(|text| text.lines().map(|line| line.parse().ok()).collect())
        .ok_or_else(|| StorageError::InvalidFile {
            path: marker.clone(),
            problem: "not a list of base offsets".into(),
        })?;
    for base in list_segments(fs, dir)? {
        if !bases.contains(&base) {
            delete_segment_files(fs, dir, base)?;
        }
    }
    // In order: a crash midway leaves the oldest segments moved in.
    for &base in &bases {
        let staged_log = staging.join(segment::file_name(base, LOG_EXTENSION));
        if fs.exists(&staged_log).at(&staged_log)? {
            delete_segment_files(fs, dir, base)?;
            fs.rename(&staged_log, &dir.join(segment::file_name(base, LOG_EXTENSION))).at(&staged_log)?;
        }
        for extension in [segment::OFFSET_INDEX_EXTENSION, segment::TIME_INDEX_EXTENSION] {
            let staged_index = staging.join(segment::file_name(base, extension));
            if fs.exists(&staged_index).at(&staged_index)? {
                fs.rename(&staged_index, &dir.join(segment::file_name(base, extension))).at(&staged_index)?;
            }
        }
    }
    fs.sync_dir(dir).at(dir)?;
    fs.remove_dir_all(&staging).at(&staging)?;
    fs.sync_dir(dir).at(dir)?;
    tracing::info!(path = %dir.display(), segments = bases.len(), "segment copy moved into place");
    Ok(())
}

/// Deletes a segment the copy replaces: the copy holds its records, or
/// the source's retention removed them (unlike recovery's cuts, nothing is
/// set aside).
fn delete_segment_files(fs: &dyn FileSystem, dir: &Path, base_offset: u64) -> Result<(), StorageError> {
    for extension in [LOG_EXTENSION, segment::OFFSET_INDEX_EXTENSION, segment::TIME_INDEX_EXTENSION] {
        let path = dir.join(segment::file_name(base_offset, extension));
        match fs.remove(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::Io { path, source }),
        }
    }
    Ok(())
}
