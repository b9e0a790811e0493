//! The storage engine: one append-only, segmented, checksummed log per
//! channel, with sparse offset and time indexes, group commit, zero-copy
//! reads from memory maps, retention and crash recovery.
//!
//! Layout, from the bottom up:
//! - [`fs`]: the narrow file interface every path goes through.
//!
//! Records are encoded by [`crate::record`], the layer below storage and
//! protocol alike.
//! - `mmap`: the only `unsafe` code, mapping files for zero-copy reads.
//! - [`index`]: segment file headers and index entries.
//! - `segment`: one segment's files, its recovery and reads.
//! - [`ChannelLog`]: one partition's segments, appends, rolls and retention.
//! - [`Channel`]: a channel's partitions and stored settings.
//! - [`Store`]: every channel of a data directory, plus maintenance.
//! - [`check`]: offline verification (`weir check`).
//!
//! Nothing here depends on tokio: the engine is synchronous, and the server
//! calls it from blocking tasks.

mod channel;
pub mod channel_name;
pub mod check;
mod error;
pub mod fs;
pub mod index;
mod log;
mod mmap;
mod segment;
mod store;

pub use channel::{CHANNEL_SETTINGS_FILE, Channel, ChannelSettings, PARTITIONS_LIMIT, partition_dir};
pub use channel_name::{ChannelName, ChannelNameError};
pub use error::StorageError;
pub use log::{
    APPEND_BATCH_BYTES_MAX, Appended, ChannelLog, CopyEnd, FsyncPolicy, LogConfig, LogCounters, LogStats, NewBatch,
    REPLICATED_DEDUP_WINDOW_ENTRIES, RaftPosition, ReadBatch, RecordSlices, RetentionOutcome, RetentionPolicy,
    STORAGE_FULL_RETRY_INTERVAL, SegmentCopy, SegmentTransfer, StartOffsetListener, TRANSFER_SEGMENTS_MAX, now_us,
};
pub use store::{CHANNELS_DIR, Maintenance, Store, StoreConfig};
