//! The storage engine's error type. Variants carry the values involved (the
//! path, the byte position, the offset asked for and the range that exists)
//! so that a message can be acted on without reading the source.

use std::io;
use std::path::PathBuf;

use super::channel_name::ChannelNameError;
use crate::record::{MessageError, RecordError};

/// An operating condition the storage engine reports instead of panicking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "offset {requested} is out of range for channel {channel}: it holds offsets {start}..{next} (start inclusive, next exclusive)"
    )]
    OffsetOutOfRange { channel: String, requested: u64, start: u64, next: u64 },
    #[error("corrupt record in {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        #[source]
        reason: RecordError,
    },
    /// A read reached damaged bytes: the record at `offset` cannot be read.
    /// Reads from `next_readable_offset` on work.
    #[error(
        "the record at offset {offset} is unreadable: {path} is damaged at byte {position} ({reason}); {}",
        read_past_hint(*next_readable_offset)
    )]
    CorruptRecord {
        path: PathBuf,
        position: u64,
        offset: u64,
        next_readable_offset: Option<u64>,
        #[source]
        reason: RecordError,
    },
    #[error("{path}: {problem}")]
    InvalidFile { path: PathBuf, problem: String },
    /// A sealed segment's last offset does not meet the next segment's
    /// base offset.
    #[error("{path}: segment ends at offset {end_offset} but the next segment starts at {next_base_offset}")]
    SegmentEndMismatch { path: PathBuf, end_offset: u64, next_base_offset: u64 },
    #[error("message {index} of the batch is rejected: {source}")]
    InvalidMessage {
        index: usize,
        #[source]
        source: MessageError,
    },
    #[error("a batch of {size_bytes} encoded bytes exceeds the append limit of {size_bytes_max} bytes")]
    BatchTooLarge { size_bytes: usize, size_bytes_max: usize },
    #[error(
        "channel {channel} refuses appends after an earlier failure ({cause}); restart the broker to recover the log"
    )]
    Failed { channel: String, cause: String },
    #[error(transparent)]
    InvalidChannelName(#[from] ChannelNameError),
    #[error("channel {channel} does not exist")]
    UnknownChannel { channel: String },
    #[error("channel {channel} has no partition {partition}: it has partitions 0..{count}")]
    UnknownPartition { channel: String, partition: u32, count: u32 },
    #[error("channel {channel} cannot have {count} partitions: allowed 1..={count_max} (max_partitions)")]
    TooManyPartitions { channel: String, count: u32, count_max: u32 },
    #[error(
        "channel {channel} has {current} partitions and cannot go down to {count}: partitions are never removed (their offsets and the placement of their keys would be lost)"
    )]
    PartitionCountDecrease { channel: String, count: u32, current: u32 },
    #[error("channel {channel} already exists")]
    ChannelExists { channel: String },
    #[error("cannot create channel {channel}: the broker already has max_channels = {count_max} channels")]
    TooManyChannels { channel: String, count_max: usize },
    #[error("data directory {path} is in use by another weir process (lock file held)")]
    DataDirLocked { path: PathBuf },
    /// The channel's files could not be opened at start-up (damage that
    /// recovery does not repair); it refuses every request until repaired.
    #[error(
        "channel {channel} is unavailable: it could not be opened at start-up ({cause}); run weir check on the data directory"
    )]
    ChannelUnavailable { channel: String, cause: String },
    /// The device holding the channel is full. Nothing of the append was
    /// stored (a partial write is cut back); the log keeps serving reads and
    /// takes appends again once space is freed, without a restart.
    #[error(
        "channel {channel}: no space left on the device holding {path}; nothing was stored; appends resume by themselves once space is freed"
    )]
    StorageFull { channel: String, path: PathBuf },
    /// A replicated partition's state machine applied Raft entries out of
    /// order: nothing was stored.
    #[error("channel {channel}: Raft entry {index} does not follow the last one applied ({last})")]
    RaftIndexNotAfter { channel: String, index: u64, last: u64 },
    /// An append outside Raft to a replicated partition's log (one whose
    /// batches carry a term): nothing was stored.
    #[error("channel {channel} is replicated: its records are appended by its Raft group only")]
    ReplicatedLog { channel: String },
}

impl StorageError {
    /// Whether the error means "the disk is full" (or the quota is used
    /// up): a condition that ends when space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StorageError::StorageFull { .. } => true,
            StorageError::Io { source, .. } => is_storage_full(source),
            _ => false,
        }
    }
}

fn read_past_hint(next_readable_offset: Option<u64>) -> String {
    match next_readable_offset {
        Some(offset) => format!(
            "records from offset {offset} on are readable: subscribe or fetch from there to read past the damage"
        ),
        None => "no readable record follows it in its segment".to_owned(),
    }
}

/// Whether an operating-system error means the device or quota is full.
pub(crate) fn is_storage_full(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// Attaches the path an `io::Error` happened on.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StorageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::Io { path: path.into(), source })
    }
}
