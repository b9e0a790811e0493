//! The set of channel logs under one data directory: opening them all at
//! start-up, creating channels, and the background maintenance thread that
//! runs the `interval` fsync policy and retention.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::channel::{Channel, ChannelSettings};
use super::channel_name::ChannelName;
use super::error::{IoContext, StorageError};
use super::fs::FileSystem;
use super::log::{ChannelLog, FsyncPolicy, LogConfig, RetentionOutcome, now_us};

/// The directory under the data directory that holds one directory per
/// channel.
pub const CHANNELS_DIR: &str = "channels";
const LOCK_FILE: &str = "weir.lock";
/// Where deleted channels' directories go before they are removed (outside
/// `channels/`, so that nothing there is ever taken for a channel); emptied
/// at start-up.
const DELETED_DIR: &str = "deleted";
/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Settings of channels without an override.
    pub default_log: LogConfig,
    /// Per-channel settings, by channel name.
    pub channel_logs: BTreeMap<String, LogConfig>,
    pub max_channels: usize,
    /// Partitions of a channel created without a count.
    pub default_partitions: u32,
    /// Most partitions one channel may have.
    pub max_partitions: u32,
    /// Partition counts of channels named in the configuration, used when
    /// they are created.
    pub channel_partitions: BTreeMap<String, u32>,
    pub fsync_interval: Duration,
    pub retention_check_interval: Duration,
}

impl StoreConfig {
    /// A store with default settings in `data_dir` (used by tests and tools).
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            default_log: LogConfig::default(),
            channel_logs: BTreeMap::new(),
            max_channels: 10_000,
            default_partitions: 1,
            max_partitions: 1024,
            channel_partitions: BTreeMap::new(),
            fsync_interval: Duration::from_millis(100),
            retention_check_interval: Duration::from_secs(30),
        }
    }

    /// The settings of the channel `name`.
    pub fn log_config(&self, name: &ChannelName) -> LogConfig {
        self.channel_logs.get(name.as_str()).cloned().unwrap_or_else(|| self.default_log.clone())
    }
}

/// All channel logs of a data directory.
pub struct Store {
    config: StoreConfig,
    fs: Arc<dyn FileSystem>,
    channels: RwLock<BTreeMap<ChannelName, Arc<Channel>>>,
    /// Channels whose recovery failed (damage recovery cannot repair), with
    /// the reason: the others are served, these answer every request with
    /// the reason until an operator has repaired them and restarted.
    unavailable: RwLock<BTreeMap<ChannelName, String>>,
    /// Held for the store's lifetime so that a second broker cannot open
    /// the same data directory.
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("data_dir", &self.config.data_dir).finish_non_exhaustive()
    }
}

impl Store {
    /// Locks the data directory and opens (recovering) every channel in it.
    /// A channel that cannot be opened does not stop the others: it is
    /// logged and kept as unavailable (see [`Store::unavailable`]).
    ///
    /// # Errors
    /// `DataDirLocked` when another process holds it; `Io` when the data
    /// directory cannot be read.
    pub fn open(config: StoreConfig, fs: Arc<dyn FileSystem>) -> Result<Store, StorageError> {
        let channels_dir = config.data_dir.join(CHANNELS_DIR);
        super::fs::create_dir_all_durable(&*fs, &channels_dir).at(&channels_dir)?;
        // A broker that died before it synced them may have left `channels`
        // (or the data directory itself) with entries that are not durable.
        for dir in [Some(config.data_dir.as_path()), config.data_dir.parent()].into_iter().flatten() {
            if !dir.as_os_str().is_empty() {
                fs.sync_dir(dir).at(dir)?;
            }
        }
        let lock_path = config.data_dir.join(LOCK_FILE);
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).at(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StorageError::DataDirLocked { path: config.data_dir.clone() });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(StorageError::Io { path: lock_path, source }),
        }
        // What a crash left of channels being deleted.
        let deleted = config.data_dir.join(DELETED_DIR);
        match fs.remove_dir_all(&deleted) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %deleted.display(), %error, "could not empty the directory of deleted channels")
            }
        }
        let mut channels = BTreeMap::new();
        let mut unavailable = BTreeMap::new();
        let mut names = fs.list(&channels_dir).at(&channels_dir)?;
        names.sort();
        for entry in names {
            let name = match ChannelName::new(&entry) {
                Ok(name) => name,
                Err(error) => {
                    tracing::warn!(path = %channels_dir.join(&entry).display(), %error, "ignoring a directory that is not a channel");
                    continue;
                }
            };
            let dir = channels_dir.join(&entry);
            match Channel::open(Arc::clone(&fs), &dir, name.clone(), &config.log_config(&name)) {
                Ok(channel) => {
                    channels.insert(name, Arc::new(channel));
                }
                Err(error) => {
                    tracing::error!(channel = %name, %error, "the channel cannot be opened and is unavailable: every request to it is refused with this error; run weir check on the data directory");
                    unavailable.insert(name, error.to_string());
                }
            }
        }
        tracing::info!(
            data_dir = %config.data_dir.display(),
            channels = channels.len(),
            unavailable_channels = unavailable.len(),
            "storage opened"
        );
        Ok(Store { config, fs, channels: RwLock::new(channels), unavailable: RwLock::new(unavailable), _lock: lock })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Why the channel `name` could not be opened, if it could not.
    pub fn unavailable(&self, name: &ChannelName) -> Option<StorageError> {
        self.unavailable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|cause| StorageError::ChannelUnavailable { channel: name.to_string(), cause: cause.clone() })
    }

    /// How many channels could not be opened.
    pub fn unavailable_count(&self) -> usize {
        self.unavailable.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The channel `name`, if it exists and could be opened.
    pub fn channel(&self, name: &ChannelName) -> Option<Arc<Channel>> {
        self.channels.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The partitions the channel `name` gets if it is created now without
    /// a count.
    pub fn partitions_for_new(&self, name: &ChannelName) -> u32 {
        self.config.channel_partitions.get(name.as_str()).copied().unwrap_or(self.config.default_partitions)
    }

    /// The channel `name`, created with its configured settings if missing.
    ///
    /// # Errors
    /// As [`Store::create`].
    pub fn get_or_create(&self, name: &ChannelName) -> Result<Arc<Channel>, StorageError> {
        if let Some(channel) = self.channel(name) {
            return Ok(channel);
        }
        self.create(name, ChannelSettings::default()).or_else(|error| match error {
            StorageError::ChannelExists { .. } => self.channel(name).ok_or(error),
            other => Err(other),
        })
    }

    /// Creates the channel `name`: its configured log settings overridden
    /// by `settings`, which are stored with the channel. Without a
    /// partition count in `settings`, the channel gets the one configured
    /// for it (`[channels.NAME]`), else `default_partitions`.
    ///
    /// # Errors
    /// `ChannelExists`, `TooManyChannels`, `TooManyPartitions` (above
    /// `max_partitions`; 0 is refused too), `ChannelUnavailable`, or `Io`.
    pub fn create(&self, name: &ChannelName, settings: ChannelSettings) -> Result<Arc<Channel>, StorageError> {
        if let Some(error) = self.unavailable(name) {
            return Err(error);
        }
        let count = settings
            .partitions
            .or_else(|| self.config.channel_partitions.get(name.as_str()).copied())
            .unwrap_or(self.config.default_partitions);
        let count_max = self.config.max_partitions.min(super::channel::PARTITIONS_LIMIT);
        if count == 0 || count > count_max {
            return Err(StorageError::TooManyPartitions { channel: name.to_string(), count, count_max });
        }
        let settings = ChannelSettings { partitions: Some(count), ..settings };
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if channels.contains_key(name) {
            return Err(StorageError::ChannelExists { channel: name.to_string() });
        }
        if channels.len() + self.unavailable_count() >= self.config.max_channels {
            return Err(StorageError::TooManyChannels {
                channel: name.to_string(),
                count_max: self.config.max_channels,
            });
        }
        let channels_dir = self.config.data_dir.join(CHANNELS_DIR);
        let dir = channels_dir.join(name.as_str());
        let created =
            Channel::create(Arc::clone(&self.fs), &dir, name.clone(), &self.config.log_config(name), settings)
                .and_then(|channel| self.fs.sync_dir(&channels_dir).at(&channels_dir).map(|()| channel));
        let channel = match created {
            Ok(channel) => channel,
            Err(error) => {
                // Nothing of a channel that could not be created stays
                // behind: its directory would make it a channel at the next
                // start, taking a place under max_channels. No channel of
                // this name was open, so the directory is this attempt's.
                if let Err(cleanup) = self.fs.remove_dir_all(&dir)
                    && cleanup.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %dir.display(), error = %cleanup, "could not remove the directory of a channel that failed to be created");
                }
                return Err(error);
            }
        };
        let channel = Arc::new(channel);
        channels.insert(name.clone(), Arc::clone(&channel));
        tracing::info!(channel = %name, partitions = count, "channel created");
        Ok(channel)
    }

    /// Deletes the channel `name` (also one that could not be opened):
    /// [`Store::set_aside`], then [`Store::remove_set_aside`].
    ///
    /// # Errors
    /// As those two.
    pub fn delete(&self, name: &ChannelName) -> Result<(), StorageError> {
        let trash = self.set_aside(name)?;
        self.remove_set_aside(name, &trash)
    }

    /// Makes the partitions of the channel `name` refuse appends from now
    /// on, as a deletion that is about to happen, and waits for their last
    /// sealed segments' background syncs (see [`ChannelLog::mark_deleted`]).
    /// Callers do it before taking a lock others wait for: such a sync can
    /// take a while.
    pub fn stop_appends(&self, name: &ChannelName) {
        if let Some(channel) = self.channel(name) {
            for log in channel.partitions() {
                log.mark_deleted();
            }
        }
    }

    /// The first half of deleting the channel `name`: its partitions refuse
    /// appends from now on (in-flight ones finish first), and its directory
    /// moves out of `channels/` into `deleted/`. Under the channels lock, so
    /// that a channel of the same name created right after (a publish that
    /// auto-creates it) finds no directory and starts empty. Returns where
    /// the files went.
    ///
    /// # Errors
    /// `UnknownChannel`; `Io` when the directory cannot be moved (the
    /// channel is gone from the store all the same, and refuses appends).
    pub fn set_aside(&self, name: &ChannelName) -> Result<PathBuf, StorageError> {
        let channels_dir = self.config.data_dir.join(CHANNELS_DIR);
        let dir = channels_dir.join(name.as_str());
        let trash = self.config.data_dir.join(DELETED_DIR).join(format!("{name}-{}", super::log::now_us()));
        // Before the channels lock, which every channel lookup takes (a
        // channel of the same name created in between is marked again
        // under it).
        self.stop_appends(name);
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let removed = channels.remove(name);
        let was_unavailable = self.unavailable.write().unwrap_or_else(|p| p.into_inner()).remove(name).is_some();
        if removed.is_none() && !was_unavailable {
            return Err(StorageError::UnknownChannel { channel: name.to_string() });
        }
        if let Some(channel) = removed {
            for log in channel.partitions() {
                log.mark_deleted();
            }
        }
        let trash_dir = self.config.data_dir.join(DELETED_DIR);
        self.fs.create_dir_all(&trash_dir).at(&trash_dir)?;
        match self.fs.rename(&dir, &trash) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::Io { path: dir, source }),
        }
        self.fs.sync_dir(&channels_dir).at(&channels_dir)?;
        drop(channels);
        Ok(trash)
    }

    /// The second half of deleting a channel: removes the files
    /// [`Store::set_aside`] moved (what is left is removed at the next
    /// start).
    ///
    /// # Errors
    /// `Io` when they cannot be removed.
    pub fn remove_set_aside(&self, name: &ChannelName, trash: &Path) -> Result<(), StorageError> {
        match self.fs.remove_dir_all(trash) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::Io { path: trash.to_path_buf(), source }),
        }
        tracing::info!(channel = %name, "channel deleted");
        Ok(())
    }

    /// Every channel, by name.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.channels.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Every partition's log of every channel.
    pub fn logs(&self) -> Vec<Arc<ChannelLog>> {
        self.channels().iter().flat_map(|channel| channel.partitions()).collect()
    }

    /// Syncs every partition whose policy is `interval` and has unsynced
    /// appends (the interval thread). Partitions under `never` are left to
    /// the operating system, as that policy says, and those under `always`
    /// are synced by each append.
    pub fn sync_all(&self) {
        for log in self.logs().into_iter().filter(|log| log.config().fsync == FsyncPolicy::Interval) {
            if let Err(error) = log.sync() {
                tracing::error!(channel = %log.name(), partition = log.partition(), %error, "background fsync failed; the partition refuses appends");
            }
        }
    }

    /// Runs retention on every partition.
    pub fn apply_retention(&self, now_us: u64) -> RetentionOutcome {
        let mut total = RetentionOutcome::default();
        for log in self.logs() {
            match log.apply_retention(now_us) {
                Ok(outcome) => {
                    total.segments_deleted += outcome.segments_deleted;
                    total.bytes_deleted += outcome.bytes_deleted;
                    total.records_deleted += outcome.records_deleted;
                }
                Err(error) => {
                    tracing::error!(channel = %log.name(), partition = log.partition(), %error, "retention failed")
                }
            }
        }
        total
    }

    /// Syncs and closes every channel (clean shutdown).
    ///
    /// # Errors
    /// The first failed sync; every channel is still attempted.
    pub fn close(&self) -> Result<(), StorageError> {
        let mut first_error = None;
        for log in self.logs() {
            if let Err(error) = log.close() {
                tracing::error!(channel = %log.name(), %error, "sync at close failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The background thread running interval fsync and retention. Dropping it
/// (or calling [`Maintenance::stop`]) stops the thread and waits for it.
pub struct Maintenance {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Maintenance {
    /// Starts the thread for `store`.
    pub fn start(store: Arc<Store>) -> Maintenance {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("weir-maintenance".into())
            .spawn(move || run_maintenance(&store, &stopped))
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the maintenance thread: no interval fsync or retention will run");
        }
        Maintenance { stop: Some(stop), thread }
    }

    /// Stops the thread and waits for it to finish its current pass.
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_maintenance(store: &Store, stopped: &mpsc::Receiver<()>) {
    let config = store.config();
    let interval_sync = config.default_log.fsync == FsyncPolicy::Interval
        || config.channel_logs.values().any(|log| log.fsync == FsyncPolicy::Interval);
    let tick = if interval_sync {
        config.fsync_interval.min(config.retention_check_interval)
    } else {
        config.retention_check_interval
    };
    let mut last_retention = Instant::now();
    loop {
        match stopped.recv_timeout(tick) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if interval_sync {
            store.sync_all();
        }
        if last_retention.elapsed() >= config.retention_check_interval {
            store.apply_retention(now_us());
            last_retention = Instant::now();
        }
    }
}
