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

use super::channel_name::ChannelName;
use super::error::{IoContext, StorageError};
use super::fs::FileSystem;
use super::log::{ChannelLog, FsyncPolicy, LogConfig, RetentionOutcome, now_us};

/// The directory under the data directory that holds one directory per
/// channel.
pub const CHANNELS_DIR: &str = "channels";
const LOCK_FILE: &str = "weir.lock";
/// Per-channel settings chosen at creation (CREATE_CHANNEL), kept in the
/// channel's directory so that they survive restarts.
pub const CHANNEL_SETTINGS_FILE: &str = "channel.toml";
/// Largest settings file read back.
const CHANNEL_SETTINGS_BYTES_MAX: u64 = 64 * 1024;

/// Retention chosen for one channel when it was created; unset fields fall
/// back to the broker's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub retention_max_bytes: Option<u64>,
    pub retention_max_age_secs: Option<u64>,
    pub retention_max_messages: Option<u64>,
}

impl ChannelSettings {
    /// `base` with these settings applied.
    pub fn apply(&self, base: &LogConfig) -> LogConfig {
        let mut config = base.clone();
        config.retention.max_bytes = self.retention_max_bytes.or(config.retention.max_bytes);
        config.retention.max_age = self.retention_max_age_secs.map(Duration::from_secs).or(config.retention.max_age);
        config.retention.max_messages = self.retention_max_messages.or(config.retention.max_messages);
        config
    }
}

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Settings of channels without an override.
    pub default_log: LogConfig,
    /// Per-channel settings, by channel name.
    pub channel_logs: BTreeMap<String, LogConfig>,
    pub max_channels: usize,
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
    channels: RwLock<BTreeMap<ChannelName, Arc<ChannelLog>>>,
    /// Channels whose recovery failed (damage recovery cannot repair), with
    /// the reason: the others are served, these answer every request with
    /// the reason until an operator has repaired them and restarted.
    unavailable: BTreeMap<ChannelName, String>,
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
        fs.create_dir_all(&channels_dir).at(&channels_dir)?;
        let lock_path = config.data_dir.join(LOCK_FILE);
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).at(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StorageError::DataDirLocked { path: config.data_dir.clone() });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(StorageError::Io { path: lock_path, source }),
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
            let opened = read_settings(&*fs, &dir).and_then(|settings| {
                ChannelLog::open(Arc::clone(&fs), &dir, name.clone(), settings.apply(&config.log_config(&name)))
            });
            match opened {
                Ok(log) => {
                    channels.insert(name, Arc::new(log));
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
        Ok(Store { config, fs, channels: RwLock::new(channels), unavailable, _lock: lock })
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
            .get(name)
            .map(|cause| StorageError::ChannelUnavailable { channel: name.to_string(), cause: cause.clone() })
    }

    /// How many channels could not be opened.
    pub fn unavailable_count(&self) -> usize {
        self.unavailable.len()
    }

    /// The channel `name`, if it exists and could be opened.
    pub fn channel(&self, name: &ChannelName) -> Option<Arc<ChannelLog>> {
        self.channels.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The channel `name`, created with its configured settings if missing.
    ///
    /// # Errors
    /// `TooManyChannels` at `max_channels`; `Io` when its directory cannot
    /// be created.
    pub fn get_or_create(&self, name: &ChannelName) -> Result<Arc<ChannelLog>, StorageError> {
        if let Some(log) = self.channel(name) {
            return Ok(log);
        }
        self.create(name, self.config.log_config(name)).or_else(|error| match error {
            StorageError::ChannelExists { .. } => self.channel(name).ok_or(error),
            other => Err(other),
        })
    }

    /// Creates the channel `name` with its configured settings overridden by
    /// `settings`, which are stored with the channel.
    ///
    /// # Errors
    /// `ChannelExists`, `TooManyChannels`, or `Io`.
    pub fn create_with_settings(
        &self,
        name: &ChannelName,
        settings: ChannelSettings,
    ) -> Result<Arc<ChannelLog>, StorageError> {
        let config = settings.apply(&self.config.log_config(name));
        self.create_inner(name, config, Some(settings))
    }

    /// Creates the channel `name` with `config`.
    ///
    /// # Errors
    /// `ChannelExists`, `TooManyChannels`, or `Io`.
    pub fn create(&self, name: &ChannelName, config: LogConfig) -> Result<Arc<ChannelLog>, StorageError> {
        self.create_inner(name, config, None)
    }

    fn create_inner(
        &self,
        name: &ChannelName,
        config: LogConfig,
        settings: Option<ChannelSettings>,
    ) -> Result<Arc<ChannelLog>, StorageError> {
        if let Some(error) = self.unavailable(name) {
            return Err(error);
        }
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if channels.contains_key(name) {
            return Err(StorageError::ChannelExists { channel: name.to_string() });
        }
        if channels.len() + self.unavailable.len() >= self.config.max_channels {
            return Err(StorageError::TooManyChannels {
                channel: name.to_string(),
                count_max: self.config.max_channels,
            });
        }
        let channels_dir = self.config.data_dir.join(CHANNELS_DIR);
        let dir = channels_dir.join(name.as_str());
        if let Some(settings) = settings {
            self.fs.create_dir_all(&dir).at(&dir)?;
            write_settings(&*self.fs, &dir, &settings)?;
        }
        let log = Arc::new(ChannelLog::open(Arc::clone(&self.fs), &dir, name.clone(), config)?);
        self.fs.sync_dir(&channels_dir).at(&channels_dir)?;
        channels.insert(name.clone(), Arc::clone(&log));
        tracing::info!(channel = %name, "channel created");
        Ok(log)
    }

    /// Every channel, by name.
    pub fn channels(&self) -> Vec<Arc<ChannelLog>> {
        self.channels.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Syncs every channel with unsynced appends.
    pub fn sync_all(&self) {
        for log in self.channels() {
            if let Err(error) = log.sync() {
                tracing::error!(channel = %log.name(), %error, "background fsync failed; the channel refuses appends");
            }
        }
    }

    /// Runs retention on every channel.
    pub fn apply_retention(&self, now_us: u64) -> RetentionOutcome {
        let mut total = RetentionOutcome::default();
        for log in self.channels() {
            match log.apply_retention(now_us) {
                Ok(outcome) => {
                    total.segments_deleted += outcome.segments_deleted;
                    total.bytes_deleted += outcome.bytes_deleted;
                    total.records_deleted += outcome.records_deleted;
                }
                Err(error) => tracing::error!(channel = %log.name(), %error, "retention failed"),
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
        for log in self.channels() {
            if let Err(error) = log.close() {
                tracing::error!(channel = %log.name(), %error, "sync at close failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn read_settings(fs: &dyn FileSystem, dir: &Path) -> Result<ChannelSettings, StorageError> {
    let path = dir.join(CHANNEL_SETTINGS_FILE);
    let file = match fs.open(&path, super::fs::OpenMode::Existing) {
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
    toml::from_str(text).map_err(|error| StorageError::InvalidFile { path, problem: error.to_string() })
}

fn write_settings(fs: &dyn FileSystem, dir: &Path, settings: &ChannelSettings) -> Result<(), StorageError> {
    let path = dir.join(CHANNEL_SETTINGS_FILE);
    let temporary = dir.join(format!("{CHANNEL_SETTINGS_FILE}.tmp"));
    let text = toml::to_string(settings)
        .map_err(|error| StorageError::InvalidFile { path: path.clone(), problem: error.to_string() })?;
    let _ = fs.remove(&temporary);
    let file = fs.open(&temporary, super::fs::OpenMode::CreateNew).at(&temporary)?;
    file.append(text.as_bytes()).at(&temporary)?;
    file.sync().at(&temporary)?;
    fs.rename(&temporary, &path).at(&path)?;
    fs.sync_dir(dir).at(dir)
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
