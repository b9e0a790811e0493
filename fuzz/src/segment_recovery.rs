//! Recovery of a channel's log from arbitrary segment files.
//!
//! Input: a [`SegmentCase`](super::SegmentCase) (its doc comment has the
//! byte table): one or two segments' `.log`, `.index` and `.timeindex`
//! files, written into a fresh temporary directory (`TMPDIR`; /dev/shm
//! keeps it off the disk). Then, as the broker would after a crash:
//! 1. `check::check_data_dir` (`weir check`) over the untouched files;
//! 2. `ChannelLog::open`, which verifies, cuts a torn tail, rebuilds indexes;
//! 3. reading every offset from the start to the end, stepping over damage
//!    the way a subscriber does, and `offset_for_time`;
//! 4. one append, read back;
//! 5. close and open again.
//!
//! Errors are fine (a log that refuses to open is a correct answer to bad
//! files). What fails: a panic; a read that returns records which do not
//! decode, or whose offsets are not the ones asked for; an append that a
//! read then does not return; a log that opened and took an append but
//! does not open again.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use weir::record::Message;
use weir::storage::check::{self, FsyncPolicies};
use weir::storage::fs::StdFileSystem;
use weir::storage::{CHANNELS_DIR, ChannelLog, ChannelName, LogConfig, RetentionPolicy, StorageError};

use super::SegmentCase;

/// Reads per run at most: a damaged log can hold many offsets that each
/// fail on their own.
const READS_MAX: usize = 4096;
/// Bytes one read asks for.
const READ_BYTES_MAX: usize = 4096;

/// Recovers a log from the segment files `data` describes and checks
/// what it reads and appends (the steps are in the module docs).
///
/// # Panics
/// When a property does not hold: that is the finding.
pub fn check(data: &[u8]) {
    let Some(case) = SegmentCase::from_bytes(data) else { return };
    let temporary = tempfile::tempdir().expect("a temporary directory");
    let data_dir = temporary.path();
    let channel_dir = data_dir.join(CHANNELS_DIR).join("fuzz");
    case.write(&channel_dir).expect("the segment files are written");

    let report = check::check_data_dir(data_dir, &FsyncPolicies::all(case.fsync)).expect("the data dir is listed");
    for problem in &report.problems {
        let _ = problem.to_string();
    }
    let _ = report.verdict();

    let config = LogConfig {
        index_interval_bytes: case.index_interval_bytes,
        fsync: case.fsync,
        format_version: case.version,
        retention: RetentionPolicy::default(),
        ..LogConfig::default()
    };
    let log = match open(&channel_dir, &config) {
        Ok(log) => log,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    read_everything(&log);
    for timestamp_us in [0, 1 << 40, u64::MAX] {
        let _ = log.offset_for_time(timestamp_us);
    }
    let Ok(appended) = log.append_batch_at(&[Message::from_payload(&b"after recovery"[..])], 1 << 50) else { return };
    let batch = log.read(appended.first_offset, READ_BYTES_MAX).expect("a record just appended is read back");
    let record = batch.iter().next().expect("a read at an appended offset returns a record");
    let record = record.expect("an appended record decodes");
    assert_eq!(record.offset, appended.first_offset);
    assert_eq!(record.payload, Bytes::from_static(b"after recovery"));
    let next_offset = log.next_offset();
    log.close().expect("a recovered log closes");
    drop(log);

    let reopened = open(&channel_dir, &config)
        .unwrap_or_else(|error| panic!("a log that recovered and took an append does not open again: {error}"));
    assert_eq!(reopened.next_offset(), next_offset, "the next offset changed across a clean close and open");
    read_everything(&reopened);
}

fn open(dir: &Path, config: &LogConfig) -> Result<ChannelLog, StorageError> {
    let name = ChannelName::new("fuzz").expect("a valid channel name");
    ChannelLog::open(Arc::new(StdFileSystem), dir, name, config.clone())
}

/// Reads from the start to the end, as a subscriber does: a damaged offset
/// is skipped to the next readable one.
fn read_everything(log: &ChannelLog) {
    let mut offset = log.start_offset();
    for _ in 0..READS_MAX {
        if offset >= log.next_offset() {
            return;
        }
        match log.read(offset, READ_BYTES_MAX) {
            Ok(batch) => {
                if batch.count == 0 {
                    return;
                }
                assert_eq!(batch.first_offset, offset, "a read started somewhere else than asked");
                let mut count = 0;
                for (i, record) in batch.iter().enumerate() {
                    let record = record.unwrap_or_else(|error| panic!("a read returned a bad record: {error}"));
                    assert_eq!(record.offset, offset + i as u64, "a read returned records out of sequence");
                    count += 1;
                }
                assert_eq!(count, batch.count, "a read's count does not match its records");
                assert_eq!(batch.next_offset, offset + batch.count);
                offset = batch.next_offset;
            }
            Err(StorageError::CorruptRecord { next_readable_offset: Some(next), .. }) if next > offset => {
                offset = next;
            }
            Err(error) => {
                let _ = error.to_string();
                offset += 1;
            }
        }
    }
}
