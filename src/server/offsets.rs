//! Durable subscription offsets: per (channel, durable name, partition), the offset
//! its next subscription resumes at (one past its last acknowledged
//! message; where it started, before its first ack), kept in an internal log in the same format as channels
//! (`<data_dir>/system/offsets`) and compacted when the broker opens it.
//!
//! Acks update memory at once; a background task appends the changed
//! entries as one batch every [`OFFSET_COMMIT_INTERVAL`], and shutdown
//! appends the rest. A crash can therefore lose up to that interval of
//! acks, which only means redelivery (at-least-once), never loss.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::record::{Header, Message, Record};
use crate::storage::fs::FileSystem;
use crate::storage::{ChannelLog, ChannelName, LogConfig, RetentionPolicy, StorageError};

/// How often acknowledged offsets are written to the internal log.
pub const OFFSET_COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Most durable positions the broker remembers (one per durable name and
/// partition).
pub const DURABLE_SUBSCRIPTIONS_MAX: usize = 100_000;
/// The header naming the partition of a stored position; a record without
/// it is partition 0's (every record written before partitions existed).
const PARTITION_HEADER: &[u8] = b"partition";
/// The internal log is rewritten on open when it holds more than this many
/// records per live entry.
const COMPACTION_RATIO: u64 = 4;

/// (channel, durable name or group name, partition, whose). Durable
/// subscriptions and consumer groups have separate name spaces.
pub type Key = (String, String, u32, Owner);

/// Whose position an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Durable,
    Group,
}

/// The header that marks a consumer group's position; entries without it
/// are durable subscriptions' (all those written before groups existed).
const GROUP_HEADER: &[u8] = b"group";
/// The header of a record that forgets an entry (its channel was deleted).
const FORGET_HEADER: &[u8] = b"forget";

/// The durable offsets of every channel.
pub struct DurableOffsets {
    log: Mutex<Arc<ChannelLog>>,
    state: Mutex<State>,
    /// In cluster mode, the positions of replicated channels the metadata
    /// group holds (written there from every node): a subscription resumes
    /// from the later of its node's own position and that one.
    replicated: OnceLock<Arc<dyn ReplicatedPositions>>,
}

/// The positions of replicated channels, as the cluster holds them.
pub trait ReplicatedPositions: Send + Sync {
    fn is_replicated(&self, channel: &str) -> bool;
    fn position(&self, owner: Owner, channel: &str, name: &str, partition: u32) -> Option<u64>;
    /// By name and partition.
    fn positions(&self, owner: Owner, channel: &str) -> BTreeMap<(String, u32), u64>;
}

#[derive(Default)]
struct State {
    offsets: HashMap<Key, u64>,
    dirty: HashSet<Key>,
    /// Entries to forget at the next commit.
    forgotten: HashSet<Key>,
    /// Positions of replicated channels changed since they were last
    /// written to the metadata group, in the order they first changed (so
    /// that none waits behind others for ever), each once.
    to_replicate: VecDeque<Key>,
    queued_to_replicate: HashSet<Key>,
}

impl State {
    fn queue_to_replicate(&mut self, key: &Key) {
        // Checked first: on most acks the key is queued already.
        if !self.queued_to_replicate.contains(key) {
            self.queued_to_replicate.insert(key.clone());
            self.to_replicate.push_back(key.clone());
        }
    }
}

/// A channel as a position is recorded for it: its name, and the token
/// cancelled when it is deleted.
pub struct ChannelRef<'a> {
    pub name: &'a str,
    pub deleted: &'a tokio_util::sync::CancellationToken,
}

/// Why a durable subscription cannot be registered.
#[derive(Debug, thiserror::Error)]
#[error("the broker already tracks {count_max} durable subscriptions (DURABLE_SUBSCRIPTIONS_MAX)")]
pub struct TooManyDurables {
    pub count_max: usize,
}

fn encode_entry((channel, name, partition, owner): &Key, offset: u64) -> Message {
    let mut headers = Vec::new();
    if *partition != 0 {
        headers.push(Header {
            name: Bytes::from_static(PARTITION_HEADER),
            value: Bytes::copy_from_slice(&partition.to_be_bytes()),
        });
    }
    if *owner == Owner::Group {
        headers.push(Header { name: Bytes::from_static(GROUP_HEADER), value: Bytes::new() });
    }
    Message {
        key: Bytes::from(format!("{channel}\n{name}")),
        headers,
        payload: Bytes::copy_from_slice(&offset.to_be_bytes()),
    }
}

fn decode_entry(record: &Record) -> Option<(Key, u64)> {
    let text = std::str::from_utf8(&record.key).ok()?;
    let (channel, name) = text.split_once('\n')?;
    let offset = u64::from_be_bytes(record.payload.as_ref().try_into().ok()?);
    let partition = match record.headers.iter().find(|header| header.name == PARTITION_HEADER) {
        Some(header) => u32::from_be_bytes(header.value.as_ref().try_into().ok()?),
        None => 0,
    };
    let owner =
        if record.headers.iter().any(|header| header.name == GROUP_HEADER) { Owner::Group } else { Owner::Durable };
    Some(((channel.to_owned(), name.to_owned(), partition, owner), offset))
}

impl DurableOffsets {
    /// Opens (and compacts) the internal log under `data_dir`.
    ///
    /// # Errors
    /// The internal log cannot be opened or read.
    pub fn open(
        fs: Arc<dyn FileSystem>,
        data_dir: &Path,
        base_config: &LogConfig,
    ) -> Result<DurableOffsets, StorageError> {
        let system_dir = data_dir.join("system");
        let dir = system_dir.join("offsets");
        let old_dir = dir.with_extension("old");
        let exists =
            |path: &Path| fs.exists(path).map_err(|source| StorageError::Io { path: path.to_path_buf(), source });
        if !exists(&dir)? && exists(&old_dir)? {
            // A crash between the two renames of a compaction: the old log
            // is whole, the new one may not be.
            fs.rename(&old_dir, &dir).map_err(|source| StorageError::Io { path: old_dir.clone(), source })?;
            fs.sync_dir(&system_dir).map_err(|source| StorageError::Io { path: system_dir.clone(), source })?;
        }
        // What a crash left of an earlier compaction.
        remove_leftovers(&*fs, &dir)?;
        let config = LogConfig {
            segment_bytes: 16 * 1024 * 1024,
            retention: RetentionPolicy::default(),
            max_message_bytes: 1024,
            ..base_config.clone()
        };
        let name = ChannelName::new("offsets").map_err(StorageError::from)?;
        let log = ChannelLog::open(Arc::clone(&fs), &dir, name.clone(), config.clone())?;
        let offsets = read_all(&log)?;
        let records = log.next_offset() - log.start_offset();
        let log = if records > COMPACTION_RATIO * (offsets.len() as u64) + 1024 {
            compact(&fs, &dir, log, name, config, &offsets)?
        } else {
            log
        };
        tracing::info!(durable_subscriptions = offsets.len(), "durable offsets loaded");
        Ok(DurableOffsets {
            log: Mutex::new(Arc::new(log)),
            state: Mutex::new(State { offsets, ..State::default() }),
            replicated: OnceLock::new(),
        })
    }

    /// Where a durable subscription resumes: one past its last
    /// acknowledged offset.
    pub fn get(&self, channel: &str, name: &str, partition: u32) -> Option<u64> {
        self.position(Owner::Durable, channel, name, partition)
    }

    /// `TooManyDurables` when no new name can be recorded: checked before
    /// anything is created for a subscription that [`DurableOffsets::record`]
    /// would then refuse.
    pub fn has_room(&self) -> Result<(), TooManyDurables> {
        if self.lock().offsets.len() >= DURABLE_SUBSCRIPTIONS_MAX {
            return Err(TooManyDurables { count_max: DURABLE_SUBSCRIPTIONS_MAX });
        }
        Ok(())
    }

    /// Records where a durable subscription resumes (kept in memory until
    /// the next commit). Positions only move forward.
    ///
    /// # Errors
    /// `TooManyDurables` when this is a new name past the limit.
    pub fn record(
        &self,
        channel: &ChannelRef<'_>,
        name: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), TooManyDurables> {
        self.record_position(Owner::Durable, channel, name, partition, offset)
    }

    /// A consumer group's committed position in a partition: where its
    /// next owner starts.
    pub fn group_position(&self, channel: &str, group: &str, partition: u32) -> Option<u64> {
        self.position(Owner::Group, channel, group, partition)
    }

    /// Records a consumer group's committed position (forward only).
    ///
    /// # Errors
    /// `TooManyDurables` when this is a new entry past the limit.
    pub fn record_group(
        &self,
        channel: &ChannelRef<'_>,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), TooManyDurables> {
        self.record_position(Owner::Group, channel, group, partition, offset)
    }

    /// Makes the positions of replicated channels count (cluster mode).
    pub fn set_replicated(&self, replicated: Arc<dyn ReplicatedPositions>) {
        let _ = self.replicated.set(replicated);
    }

    fn position(&self, owner: Owner, channel: &str, name: &str, partition: u32) -> Option<u64> {
        let local = self.lock().offsets.get(&(channel.to_owned(), name.to_owned(), partition, owner)).copied();
        let replicated =
            self.replicated.get().and_then(|replicated| replicated.position(owner, channel, name, partition));
        local.max(replicated)
    }

    /// Up to `max` positions of replicated channels changed since they were
    /// last taken, to write to the metadata group.
    pub fn take_to_replicate(&self, max: usize) -> Vec<(Key, u64)> {
        let mut state = self.lock();
        let mut taken = Vec::new();
        while taken.len() < max
            && let Some(key) = state.to_replicate.pop_front()
        {
            state.queued_to_replicate.remove(&key);
            if let Some(&offset) = state.offsets.get(&key) {
                taken.push((key, offset));
            }
        }
        taken
    }

    /// Whether positions of replicated channels changed since they were
    /// last taken.
    pub fn has_to_replicate(&self) -> bool {
        !self.lock().to_replicate.is_empty()
    }

    /// Positions taken that could not be written: taken again next time.
    pub fn return_to_replicate(&self, keys: impl IntoIterator<Item = Key>) {
        let mut state = self.lock();
        for key in keys {
            state.queue_to_replicate(&key);
        }
    }

    fn record_position(
        &self,
        owner: Owner,
        channel: &ChannelRef<'_>,
        name: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), TooManyDurables> {
        let mut state = self.lock();
        // Checked under the lock, which `forget_channel` takes after the
        // channel is marked deleted: a position of a deleted channel (an ack
        // still on its way) is dropped, never written after its forgetting.
        if channel.deleted.is_cancelled() {
            return Ok(());
        }
        let key = (channel.name.to_owned(), name.to_owned(), partition, owner);
        if !state.offsets.contains_key(&key) && state.offsets.len() >= DURABLE_SUBSCRIPTIONS_MAX {
            return Err(TooManyDurables { count_max: DURABLE_SUBSCRIPTIONS_MAX });
        }
        state.forgotten.remove(&key);
        let entry = state.offsets.entry(key.clone()).or_insert(offset);
        if offset >= *entry {
            *entry = offset;
            if self.replicated.get().is_some_and(|replicated| replicated.is_replicated(channel.name)) {
                state.queue_to_replicate(&key);
            }
            state.dirty.insert(key);
        }
        Ok(())
    }

    /// Moves a durable position back to `offset` (recovery cut the channel
    /// below where it was): unlike [`DurableOffsets::record`], this may go
    /// backwards, so that acks of the records appended since count again.
    pub fn rewind(&self, channel: &str, name: &str, partition: u32, offset: u64) {
        self.rewind_position(Owner::Durable, channel, name, partition, offset);
    }

    /// As [`DurableOffsets::rewind`], for a consumer group's position.
    pub fn rewind_group(&self, channel: &str, group: &str, partition: u32, offset: u64) {
        self.rewind_position(Owner::Group, channel, group, partition, offset);
    }

    fn rewind_position(&self, owner: Owner, channel: &str, name: &str, partition: u32, offset: u64) {
        let mut state = self.lock();
        let key = (channel.to_owned(), name.to_owned(), partition, owner);
        if let Some(entry) = state.offsets.get_mut(&key)
            && *entry > offset
        {
            *entry = offset;
            state.dirty.insert(key);
        }
    }

    /// Forgets every position (durable subscriptions' and groups') of
    /// `channel`, which was deleted; written at the next commit.
    pub fn forget_channel(&self, channel: &str) {
        let mut state = self.lock();
        let keys: Vec<Key> = state.offsets.keys().filter(|(c, _, _, _)| c == channel).cloned().collect();
        for key in keys {
            state.offsets.remove(&key);
            state.dirty.remove(&key);
            state.forgotten.insert(key);
        }
    }

    /// All durable positions of `channel`, by name and partition.
    pub fn for_channel(&self, channel: &str) -> BTreeMap<(String, u32), u64> {
        self.positions_of(Owner::Durable, channel)
    }

    /// Every consumer group's committed positions on `channel`, by group
    /// and partition.
    pub fn groups_for_channel(&self, channel: &str) -> BTreeMap<(String, u32), u64> {
        self.positions_of(Owner::Group, channel)
    }

    /// This node's positions of `channel`, and the cluster's when it is
    /// replicated: the later of the two for each.
    fn positions_of(&self, owner: Owner, channel: &str) -> BTreeMap<(String, u32), u64> {
        let mut positions: BTreeMap<(String, u32), u64> = self
            .lock()
            .offsets
            .iter()
            .filter(|((c, _, _, o), _)| c == channel && *o == owner)
            .map(|((_, name, partition, _), &offset)| ((name.clone(), *partition), offset))
            .collect();
        if let Some(replicated) = self.replicated.get().filter(|replicated| replicated.is_replicated(channel)) {
            for (key, offset) in replicated.positions(owner, channel) {
                let position = positions.entry(key).or_insert(offset);
                *position = (*position).max(offset);
            }
        }
        positions
    }

    /// Appends every changed entry as one batch (and syncs it under the
    /// broker's fsync policy). Blocking: call from a blocking context.
    ///
    /// # Errors
    /// The append failed; the entries stay dirty for the next attempt.
    pub fn commit(&self) -> Result<(), StorageError> {
        let (entries, forgotten): (Vec<(Key, u64)>, Vec<Key>) = {
            let mut state = self.lock();
            let dirty: Vec<Key> = state.dirty.drain().collect();
            let entries =
                dirty.into_iter().filter_map(|key| state.offsets.get(&key).map(|&offset| (key, offset))).collect();
            (entries, state.forgotten.drain().collect())
        };
        if entries.is_empty() && forgotten.is_empty() {
            return Ok(());
        }
        // Forgetting first: an entry recorded again after its channel was
        // deleted (a new channel of the same name) is read back after it.
        let mut messages: Vec<Message> = forgotten
            .iter()
            .map(|key| {
                let mut message = encode_entry(key, 0);
                message.headers.push(Header { name: Bytes::from_static(FORGET_HEADER), value: Bytes::new() });
                message
            })
            .collect();
        messages.extend(entries.iter().map(|(key, offset)| encode_entry(key, *offset)));
        let log = Arc::clone(&self.log.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(error) = log.append_batch(&messages) {
            let mut state = self.lock();
            state.dirty.extend(entries.into_iter().map(|(key, _)| key));
            state.forgotten.extend(forgotten);
            return Err(error);
        }
        Ok(())
    }

    /// Commits what is left and syncs the internal log.
    ///
    /// # Errors
    /// The final append or sync failed.
    pub fn close(&self) -> Result<(), StorageError> {
        self.commit()?;
        self.log.lock().unwrap_or_else(|p| p.into_inner()).close()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_all(log: &ChannelLog) -> Result<HashMap<Key, u64>, StorageError> {
    let mut offsets = HashMap::new();
    let mut next = log.start_offset();
    loop {
        let batch = match log.read(next, 1 << 20) {
            Ok(batch) => batch,
            // Damage kept by recovery (a power loss during an append that
            // was never synced, or a bad sector): the positions it held are
            // skipped, as if they had not been committed yet: a position
            // may resume at what an earlier record said (redelivery), and
            // a forget or rewind in them is lost as when a crash comes
            // before the commit that would have written it.
            Err(StorageError::CorruptRecord { offset, next_readable_offset, .. }) => {
                tracing::warn!(offset, "skipping a damaged durable offset record");
                match next_readable_offset {
                    Some(readable) if readable > next => {
                        next = readable;
                        continue;
                    }
                    _ => return Ok(offsets),
                }
            }
            Err(error) => return Err(error),
        };
        if batch.count == 0 {
            return Ok(offsets);
        }
        for record in batch.iter() {
            let record = record.map_err(|reason| StorageError::Corrupt {
                path: PathBuf::from("system/offsets"),
                position: 0,
                reason,
            })?;
            match decode_entry(&record) {
                Some((key, _)) if record.headers.iter().any(|header| header.name == FORGET_HEADER) => {
                    offsets.remove(&key);
                }
                Some((key, offset)) => {
                    offsets.insert(key, offset);
                }
                None => tracing::warn!(offset = record.offset, "ignoring a malformed durable offset record"),
            }
        }
        next = batch.next_offset;
    }
}

/// Removes the directories an interrupted compaction left beside `dir`
/// (once `dir` exists, neither is needed).
fn remove_leftovers(fs: &dyn FileSystem, dir: &Path) -> Result<(), StorageError> {
    for leftover in [dir.with_extension("compacting"), dir.with_extension("old")] {
        match fs.remove_dir_all(&leftover) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::Io { path: leftover, source }),
        }
    }
    Ok(())
}

/// Rewrites the internal log with one record per live entry: write a new
/// log beside it, then swap directories.
fn compact(
    fs: &Arc<dyn FileSystem>,
    dir: &Path,
    log: ChannelLog,
    name: ChannelName,
    config: LogConfig,
    offsets: &HashMap<Key, u64>,
) -> Result<ChannelLog, StorageError> {
    let fresh_dir = dir.with_extension("compacting");
    let old_dir = dir.with_extension("old");
    {
        let fresh = ChannelLog::open(Arc::clone(fs), &fresh_dir, name.clone(), config.clone())?;
        let messages: Vec<Message> = offsets.iter().map(|(key, offset)| encode_entry(key, *offset)).collect();
        for chunk in messages.chunks(10_000) {
            fresh.append_batch(chunk)?;
        }
        fresh.close()?;
    }
    drop(log);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::Io { path, source }
    };
    fs.rename(dir, &old_dir).map_err(io(dir))?;
    fs.rename(&fresh_dir, dir).map_err(io(&fresh_dir))?;
    // Durable before anything is appended to the new log: otherwise a power
    // loss could bring the old log back without those appends, and
    // positions would move backwards.
    let parent = dir.parent().unwrap_or(dir);
    fs.sync_dir(parent).map_err(io(parent))?;
    fs.remove_dir_all(&old_dir).map_err(io(&old_dir))?;
    tracing::info!(entries = offsets.len(), "compacted the durable offsets log");
    ChannelLog::open(Arc::clone(fs), dir, name, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn open(dir: &Path) -> DurableOffsets {
        let fs: Arc<dyn FileSystem> = Arc::new(crate::storage::fs::StdFileSystem);
        DurableOffsets::open(fs, dir, &LogConfig::default()).unwrap()
    }

    #[test]
    fn positions_of_a_deleted_channel_are_forgotten_and_late_acks_do_not_bring_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let old = CancellationToken::new();
        {
            let offsets = open(dir.path());
            let channel = ChannelRef { name: "orders", deleted: &old };
            offsets.record(&channel, "billing", 0, 5).unwrap();
            offsets.record_group(&channel, "g", 1, 7).unwrap();
            offsets.commit().unwrap();
            // The channel is deleted: marked first, then forgotten.
            old.cancel();
            offsets.forget_channel("orders");
            // An ack of the old channel still on its way is dropped.
            offsets.record(&channel, "billing", 0, 9).unwrap();
            assert_eq!(offsets.get("orders", "billing", 0), None);
            // The channel is created again: its positions are its own.
            let new = CancellationToken::new();
            let channel = ChannelRef { name: "orders", deleted: &new };
            offsets.record_group(&channel, "g", 1, 2).unwrap();
            offsets.close().unwrap();
        }
        let offsets = open(dir.path());
        assert_eq!(offsets.get("orders", "billing", 0), None, "forgotten across a restart");
        assert_eq!(offsets.group_position("orders", "g", 1), Some(2), "the new channel's position survives");
        assert!(offsets.for_channel("orders").is_empty());
    }
}
