//! A channel: its partitions, each its own [`ChannelLog`], and the settings
//! it was created with (`channel.toml`).
//!
//! Partition 0 lives in the channel's directory itself (the v0.1 layout, so
//! a v0.1 channel is a one-partition channel as it stands); partition `n` ≥ 1
//! in its subdirectory `partition-n`. The partition count is `partitions` in
//! `channel.toml` (absent: 1). It only grows: the file is replaced first,
//! then the new partitions are created, so that a crash in between leaves a
//! count whose missing partitions are created, empty, on the next open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::channel_name::ChannelName;
use super::error::{IoContext, StorageError};
use super::fs::{FileSystem, OpenMode};
use super::log::{ChannelLog, LogConfig};

/// Per-channel settings chosen at creation (CREATE_CHANNEL), kept in the
/// channel's directory so that they survive restarts.
pub const CHANNEL_SETTINGS_FILE: &str = "channel.toml";
/// Largest settings file read back.
const CHANNEL_SETTINGS_BYTES_MAX: u64 = 64 * 1024;
/// The prefix of a partition's directory (partitions 1 and up).
pub(crate) const PARTITION_DIR_PREFIX: &str = "partition-";
/// The most partitions any channel can have, whatever `max_partitions` says.
pub const PARTITIONS_LIMIT: u32 = 65_536;

/// Settings chosen for one channel when it was created; unset retention
/// fields fall back to the broker's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub retention_max_bytes: Option<u64>,
    pub retention_max_age_secs: Option<u64>,
    pub retention_max_messages: Option<u64>,
    /// The partition count; absent means 1 (every v0.1 channel).
    pub partitions: Option<u32>,
    /// Set for the local copy of a replicated channel (cluster mode), whose
    /// partitions' logs only their Raft groups append to, and whose
    /// recovery cuts damage in the part a crash can leave unsynced instead
    /// of keeping it ([`LogConfig::replicated`]): kept, it would leave a
    /// hole where the other replicas hold acknowledged records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated: Option<bool>,
}

impl ChannelSettings {
    /// `base` with these settings applied.
    pub fn apply(&self, base: &LogConfig) -> LogConfig {
        let mut config = base.clone();
        config.retention.max_bytes = self.retention_max_bytes.or(config.retention.max_bytes);
        config.retention.max_age = self.retention_max_age_secs.map(Duration::from_secs).or(config.retention.max_age);
        config.retention.max_messages = self.retention_max_messages.or(config.retention.max_messages);
        config.replicated = self.replicated == Some(true);
        config
    }

    /// The partition count these settings give.
    pub fn partition_count(&self) -> u32 {
        self.partitions.unwrap_or(1)
    }

    /// Whether a channel with these settings needs a settings file (a v0.1
    /// channel with only defaults has none).
    fn needs_file(&self) -> bool {
        self.partition_count() != 1
            || self.retention_max_bytes.is_some()
            || self.retention_max_age_secs.is_some()
            || self.retention_max_messages.is_some()
            || self.replicated.is_some()
    }
}

/// The directory of partition `partition` of the channel in `channel_dir`.
pub fn partition_dir(channel_dir: &Path, partition: u32) -> PathBuf {
    match partition {
        0 => channel_dir.to_path_buf(),
        partition => channel_dir.join(format!("{PARTITION_DIR_PREFIX}{partition}")),
    }
}

/// The partition number a directory name inside a channel's directory
/// encodes, if it is one.
pub(crate) fn parse_partition_dir(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(PARTITION_DIR_PREFIX)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&partition| partition > 0)
}

/// One channel: a fixed-and-growing list of partition logs.
pub struct Channel {
    name: ChannelName,
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    config: LogConfig,
    settings: Mutex<ChannelSettings>,
    partitions: RwLock<Vec<Arc<ChannelLog>>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Channel {
    /// Opens (recovering) every partition of the channel in `dir`, with the
    /// settings stored there. `config` is the channel's log configuration
    /// before its stored settings are applied.
    ///
    /// # Errors
    /// An unreadable settings file; any partition's recovery error.
    pub fn open(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        name: ChannelName,
        config: &LogConfig,
    ) -> Result<Channel, StorageError> {
        let settings = read_settings(&*fs, dir)?;
        let count = settings.partition_count();
        if count == 0 || count > PARTITIONS_LIMIT {
            return Err(StorageError::InvalidFile {
                path: dir.join(CHANNEL_SETTINGS_FILE),
                problem: format!("partitions = {count} is outside 1..={PARTITIONS_LIMIT}"),
            });
        }
        warn_about_extra_partitions(&*fs, dir, count);
        Channel::open_with(fs, dir, name, config, settings)
    }

    /// Creates the channel in `dir` with `settings` (written to its settings
    /// file when they differ from the defaults) and opens it.
    ///
    /// # Errors
    /// `Io` when a file cannot be written; as [`Channel::open`].
    pub fn create(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        name: ChannelName,
        config: &LogConfig,
        settings: ChannelSettings,
    ) -> Result<Channel, StorageError> {
        if settings.needs_file() {
            fs.create_dir_all(dir).at(dir)?;
            write_settings(&*fs, dir, &settings)?;
        }
        Channel::open_with(fs, dir, name, config, settings)
    }

    fn open_with(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        name: ChannelName,
        config: &LogConfig,
        settings: ChannelSettings,
    ) -> Result<Channel, StorageError> {
        let config = settings.apply(config);
        let mut partitions = Vec::with_capacity(settings.partition_count() as usize);
        for partition in 0..settings.partition_count() {
            let log = ChannelLog::open_partition(
                Arc::clone(&fs),
                &partition_dir(dir, partition),
                name.clone(),
                partition,
                config.clone(),
            )?;
            partitions.push(Arc::new(log));
        }
        Ok(Channel {
            name,
            dir: dir.to_path_buf(),
            fs,
            config,
            settings: Mutex::new(settings),
            partitions: RwLock::new(partitions),
        })
    }

    pub fn name(&self) -> &ChannelName {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings the channel was created with (and its partition count).
    pub fn settings(&self) -> ChannelSettings {
        *self.settings.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn partition_count(&self) -> u32 {
        self.read_partitions().len() as u32
    }

    /// The log of `partition`.
    ///
    /// # Errors
    /// `UnknownPartition` naming the channel's partition count.
    pub fn partition(&self, partition: u32) -> Result<Arc<ChannelLog>, StorageError> {
        let partitions = self.read_partitions();
        partitions.get(partition as usize).cloned().ok_or_else(|| StorageError::UnknownPartition {
            channel: self.name.to_string(),
            partition,
            count: partitions.len() as u32,
        })
    }

    /// Every partition's log, in partition order.
    pub fn partitions(&self) -> Vec<Arc<ChannelLog>> {
        self.read_partitions().clone()
    }

    /// Raises the partition count to `count` (at most `count_max`). The new
    /// partitions start empty; the existing ones are untouched.
    ///
    /// # Errors
    /// `PartitionCountDecrease` below the current count (partitions are
    /// never removed: their offsets and their keys' placement would be
    /// lost), `TooManyPartitions` above `count_max`, `Io` when the settings
    /// file or a partition cannot be written.
    pub fn increase_partitions(&self, count: u32, count_max: u32) -> Result<(), StorageError> {
        let count_max = count_max.min(PARTITIONS_LIMIT);
        let mut partitions = self.partitions.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if partitions.iter().any(|log| log.is_deleted()) {
            return Err(StorageError::UnknownChannel { channel: self.name.to_string() });
        }
        let current = partitions.len() as u32;
        if count < current {
            return Err(StorageError::PartitionCountDecrease { channel: self.name.to_string(), count, current });
        }
        if count > count_max {
            return Err(StorageError::TooManyPartitions { channel: self.name.to_string(), count, count_max });
        }
        if count == current {
            return Ok(());
        }
        let settings = ChannelSettings { partitions: Some(count), ..self.settings() };
        self.fs.create_dir_all(&self.dir).at(&self.dir)?;
        write_settings(&*self.fs, &self.dir, &settings)?;
        *self.settings.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = settings;
        for partition in current..count {
            let dir = partition_dir(&self.dir, partition);
            let log = ChannelLog::open_partition(
                Arc::clone(&self.fs),
                &dir,
                self.name.clone(),
                partition,
                self.config.clone(),
            )?;
            partitions.push(Arc::new(log));
        }
        self.fs.sync_dir(&self.dir).at(&self.dir)?;
        tracing::info!(channel = %self.name, from = current, to = count, "partitions added");
        Ok(())
    }

    fn read_partitions(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ChannelLog>>> {
        self.partitions.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Partition directories beyond the stored count (a count lowered by hand,
/// or a copy) are left alone: reported, never deleted.
fn warn_about_extra_partitions(fs: &dyn FileSystem, dir: &Path, count: u32) {
    let Ok(names) = fs.list(dir) else { return };
    for name in names {
        if let Some(partition) = parse_partition_dir(&name)
            && partition >= count
        {
            tracing::warn!(
                path = %dir.join(&name).display(),
                partitions = count,
                "a partition directory beyond the channel's partition count is ignored"
            );
        }
    }
}

/// The settings stored in the channel directory `dir` (defaults when it
/// has none).
pub(crate) fn read_settings(fs: &dyn FileSystem, dir: &Path) -> Result<ChannelSettings, StorageError> {
    let path = dir.join(CHANNEL_SETTINGS_FILE);
    let file = match fs.open(&path, OpenMode::Existing) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(ChannelSettings::default()),
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    if file.len() > CHANNEL_SETTINGS_BYTES_MAX {
        return Err(StorageError::InvalidFile {
            path,
            problem: format!("larger than {CHANNEL_SETTINGS_BYTES_MAX} bytes"),
        });
    }
    let bytes = file.read_range(0, file.len() as usize).at(&path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| StorageError::InvalidFile { path: path.clone(), problem: "not UTF-8".into() })?;
    toml::from_str(text).map_err(|error| StorageError::InvalidFile { path, problem: error.message().to_owned() })
}

/// Replaces the settings file atomically: a temporary file, synced, renamed
/// over the old one, and the directory synced.
fn write_settings(fs: &dyn FileSystem, dir: &Path, settings: &ChannelSettings) -> Result<(), StorageError> {
    let path = dir.join(CHANNEL_SETTINGS_FILE);
    let temporary = dir.join(format!("{CHANNEL_SETTINGS_FILE}.tmp"));
    let text = toml::to_string(settings)
        .map_err(|error| StorageError::InvalidFile { path: path.clone(), problem: error.to_string() })?;
    let _ = fs.remove(&temporary);
    let file = fs.open(&temporary, OpenMode::CreateNew).at(&temporary)?;
    file.append(text.as_bytes()).at(&temporary)?;
    file.sync().at(&temporary)?;
    fs.rename(&temporary, &path).at(&path)?;
    fs.sync_dir(dir).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_directories_are_named_and_parsed_one_way() {
        let dir = Path::new("/data/channels/orders");
        assert_eq!(partition_dir(dir, 0), dir);
        assert_eq!(partition_dir(dir, 7), dir.join("partition-7"));
        assert_eq!(parse_partition_dir("partition-7"), Some(7));
        for not_one in ["partition-0", "partition-07", "partition-", "partition-x", "partition-99999999999"] {
            assert_eq!(parse_partition_dir(not_one), None, "{not_one}");
        }
    }

    #[test]
    fn only_settings_that_differ_from_the_defaults_need_a_file() {
        assert!(!ChannelSettings::default().needs_file());
        assert!(!ChannelSettings { partitions: Some(1), ..ChannelSettings::default() }.needs_file());
        assert!(ChannelSettings { partitions: Some(2), ..ChannelSettings::default() }.needs_file());
        assert!(ChannelSettings { retention_max_messages: Some(5), ..ChannelSettings::default() }.needs_file());
    }
}
