//! Black-box tests of the storage engine through its public API, on real
//! files in temporary directories.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use weir::record::{BATCH_HEADER_BYTES, Header, Message, Record};
#[path = "common/full_disk.rs"]
#[allow(dead_code)] // The read-only mode serves the server tests.
mod full_disk;

use weir::storage::check::Verdict;
use weir::storage::fs::StdFileSystem;
use weir::storage::{
    ChannelLog, ChannelName, ChannelSettings, FsyncPolicy, LogConfig, RetentionPolicy, StorageError, Store,
    StoreConfig, now_us,
};

fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Never,
        retention: RetentionPolicy::default(),
        ..LogConfig::default()
    }
}

fn open(dir: &Path, config: LogConfig) -> ChannelLog {
    ChannelLog::open(Arc::new(StdFileSystem), dir, ChannelName::new("test").unwrap(), config).unwrap()
}

fn message(i: u64, payload_bytes: usize) -> Message {
    Message {
        key: Bytes::from(format!("key-{i}")),
        headers: vec![Header { name: Bytes::from_static(b"n"), value: Bytes::from(i.to_string()) }],
        payload: Bytes::from(vec![(i % 251) as u8; payload_bytes]),
    }
}

fn read_all(log: &ChannelLog, from: u64) -> Vec<Record> {
    let mut records = Vec::new();
    let mut offset = from;
    loop {
        let batch = log.read(offset, 64 * 1024).unwrap();
        if batch.count == 0 {
            return records;
        }
        for record in batch.iter() {
            records.push(record.unwrap());
        }
        assert_eq!(records.last().unwrap().offset + 1, batch.next_offset);
        offset = batch.next_offset;
    }
}

fn segment_logs(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

fn arbitrary_message() -> impl Strategy<Value = Message> {
    let bytes = |max: usize| proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
    let header = (bytes(16), bytes(16)).prop_map(|(name, value)| Header { name, value });
    (bytes(16), proptest::collection::vec(header, 0..3), bytes(1500)).prop_map(|(key, headers, payload)| Message {
        key,
        headers,
        payload,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn appended_batches_read_back_identical_after_reopen(
        batches in proptest::collection::vec(proptest::collection::vec(arbitrary_message(), 1..20), 1..12)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let channel_dir = dir.path().join("channels").join("test");
        let mut expected = Vec::new();
        {
            let log = open(&channel_dir, small_config());
            for batch in &batches {
                let appended = log.append_batch(batch).unwrap();
                prop_assert_eq!(appended.first_offset, expected.len() as u64);
                prop_assert_eq!(appended.count, batch.len() as u64);
                expected.extend(batch.iter().cloned());
            }
            log.close().unwrap();
        }
        let log = open(&channel_dir, small_config());
        prop_assert_eq!(log.next_offset(), expected.len() as u64);
        let records = read_all(&log, 0);
        prop_assert_eq!(records.len(), expected.len());
        let mut last_timestamp = 0;
        for (i, (record, message)) in records.iter().zip(&expected).enumerate() {
            prop_assert_eq!(record.offset, i as u64);
            prop_assert!(record.timestamp_us >= last_timestamp);
            last_timestamp = record.timestamp_us;
            prop_assert_eq!(&record.key, &message.key);
            prop_assert_eq!(&record.headers, &message.headers);
            prop_assert_eq!(&record.payload, &message.payload);
        }
        let report = weir::storage::check::check_data_dir(dir.path(), &weir::storage::check::FsyncPolicies::all(FsyncPolicy::Always)).unwrap();
        prop_assert!(report.is_clean(), "{:?}", report.problems);
        prop_assert_eq!(report.records, expected.len() as u64);
    }
}

#[test]
fn segments_roll_at_segment_bytes_and_reads_cross_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), small_config());
    for i in 0..100 {
        log.append_batch(&[message(i, 200)]).unwrap();
    }
    let logs = segment_logs(dir.path());
    assert!(logs.len() > 4, "expected several segments, got {}", logs.len());
    // Each segment but the last is at least segment_bytes, and no bigger
    // than segment_bytes plus the one batch that crossed it.
    for path in &logs[..logs.len() - 1] {
        let len = std::fs::metadata(path).unwrap().len();
        assert!((4096..4096 + 300).contains(&len), "{} is {len} bytes", path.display());
    }
    let names: Vec<String> = logs.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names[0], "00000000000000000000.log");
    let records = read_all(&log, 0);
    assert_eq!(records.len(), 100);
    // A read from the middle of any segment starts exactly there.
    for from in [0, 17, 18, 19, 50, 99] {
        let batch = log.read(from, 1).unwrap();
        assert_eq!(batch.iter().next().unwrap().unwrap().offset, from);
        assert_eq!(batch.count, 1);
    }
    assert_eq!(log.read(100, 1024).unwrap().count, 0);
    assert!(matches!(log.read(101, 1024), Err(StorageError::OffsetOutOfRange { next: 100, .. })));
}

#[test]
fn large_and_small_payloads_in_one_batch_read_back_whole_by_offset_and_after_reopening() {
    // Payloads around and above 64 KiB mixed with small ones in batches
    // that cross a roll: the records, their index positions and their CRCs
    // come back whole, by offset and after reopening.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 1024 * 1024, ..small_config() };
    let sizes = [100, 64 * 1024 - 1, 64 * 1024, 0, 300 * 1024, 7, 70 * 1024, 70 * 1024];
    let messages: Vec<Message> = sizes.iter().enumerate().map(|(i, &size)| message(i as u64, size)).collect();
    {
        let log = open(dir.path(), config.clone());
        for round in 0..4 {
            let first = log.append_batch(&messages).unwrap().first_offset;
            assert_eq!(first, round * sizes.len() as u64);
        }
    }
    assert!(segment_logs(dir.path()).len() > 1, "the batches cross a roll");
    let log = open(dir.path(), config);
    let records = read_all(&log, 0);
    assert_eq!(records.len(), 4 * sizes.len());
    for record in &records {
        let expected = &messages[record.offset as usize % sizes.len()];
        assert_eq!(record.payload.len(), expected.payload.len(), "offset {}", record.offset);
        assert_eq!(record.payload, expected.payload, "offset {}", record.offset);
        assert_eq!(record.key, expected.key);
        // A read from this offset finds it through the index.
        let batch = log.read(record.offset, 1).unwrap();
        assert_eq!(batch.iter().next().unwrap().unwrap().offset, record.offset);
    }
}

#[test]
fn a_segment_older_than_segment_max_age_rolls_on_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_max_age: Duration::from_secs(60), ..small_config() };
    let log = open(dir.path(), config);
    let start = 1_000_000_000_000_000;
    log.append_batch_at(&[message(0, 10)], start).unwrap();
    log.append_batch_at(&[message(1, 10)], start + 59_000_000).unwrap();
    assert_eq!(segment_logs(dir.path()).len(), 1);
    log.append_batch_at(&[message(2, 10)], start + 60_000_000).unwrap();
    assert_eq!(segment_logs(dir.path()).len(), 2);
}

#[test]
fn retention_by_messages_deletes_whole_oldest_segments_and_moves_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention: RetentionPolicy { max_messages: Some(30), ..RetentionPolicy::default() },
        ..small_config()
    };
    let log = open(dir.path(), config);
    for i in 0..100 {
        log.append_batch(&[message(i, 200)]).unwrap();
    }
    let before = segment_logs(dir.path()).len();
    let outcome = log.apply_retention(weir::storage::now_us()).unwrap();
    assert!(outcome.segments_deleted > 0);
    assert_eq!(segment_logs(dir.path()).len(), before - outcome.segments_deleted as usize);
    let start = log.start_offset();
    // At least 30 messages are kept, and no whole segment more than needed.
    assert!(100 - start >= 30, "start {start}");
    assert_eq!(outcome.records_deleted, start);
    match log.read(start - 1, 1024) {
        Err(StorageError::OffsetOutOfRange { requested, start: reported, next, .. }) => {
            assert_eq!((requested, reported, next), (start - 1, start, 100));
        }
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
    assert_eq!(read_all(&log, start).len() as u64, 100 - start);
    // The same range survives a reopen.
    drop(log);
    let log = open(dir.path(), small_config());
    assert_eq!(log.start_offset(), start);
}

#[test]
fn retention_by_bytes_keeps_at_least_the_limit_and_never_deletes_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        LogConfig { retention: RetentionPolicy { max_bytes: Some(1), ..RetentionPolicy::default() }, ..small_config() };
    let log = open(dir.path(), config);
    for i in 0..100 {
        log.append_batch(&[message(i, 200)]).unwrap();
    }
    log.apply_retention(weir::storage::now_us()).unwrap();
    assert_eq!(segment_logs(dir.path()).len(), 1, "only the active segment is left");
    assert_eq!(log.stats().segment_count, 1);
    let start = log.start_offset();
    assert_eq!(read_all(&log, start).len() as u64, 100 - start);
    log.append_batch(&[message(100, 10)]).unwrap();
    assert_eq!(log.next_offset(), 101);
}

/// A replicated partition's log (batches with Raft positions of a term
/// above 0) keeps the batches of its last `REPLICATED_DEDUP_WINDOW_ENTRIES`
/// entries whatever its retention says (its idempotent producers are
/// rebuilt from them), and lets older segments go.
#[test]
fn retention_keeps_a_replicated_logs_dedup_window() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        retention: RetentionPolicy { max_messages: Some(1), ..RetentionPolicy::default() },
        ..small_config()
    };
    let log = open(dir.path(), config);
    let window = weir::storage::REPLICATED_DEDUP_WINDOW_ENTRIES;
    let entries = window + window / 2;
    for index in 1..=entries {
        let messages = [Message::from_payload(vec![b'x'; 16])];
        let raft = Some(weir::storage::RaftPosition { index, term: 1 });
        let batch = weir::storage::NewBatch { messages: &messages, producer: Some((3, index)), raft };
        log.append_batches_at(&[batch], now_us()).unwrap();
    }
    let segments_before = segment_logs(dir.path()).len();
    log.apply_retention(now_us()).unwrap();
    let segments_after = segment_logs(dir.path()).len();
    assert!(segments_after < segments_before, "retention deleted nothing: {segments_before} segments");
    assert!(segments_after > 1, "retention deleted the window");
    // Every entry of the window is still there, and the log starts at most
    // one segment before it.
    let mut first_kept = None;
    log.visit_batches_after(0, |_, _, header| {
        first_kept.get_or_insert(header.raft_index);
    })
    .unwrap();
    let first_kept = first_kept.unwrap();
    assert!(first_kept <= entries - window + 1, "entry {} is gone", entries - window + 1);
    assert!(first_kept > entries - window - 4096, "retention kept more than the window needs: from {first_kept}");
    // One entry further, the window moves on; it is still kept.
    let mut visited = 0;
    log.visit_batches_after(entries - window, |_, _, _| visited += 1).unwrap();
    assert_eq!(visited, window);
}

/// The batches a replicated partition rebuilds its producers from are read
/// with every CRC checked: a flipped byte in an old sealed segment (which
/// recovery does not scan) is an error, not a silently different window.
#[test]
fn a_replicated_logs_window_with_a_flipped_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), small_config());
        for index in 1..=200 {
            let messages = [Message::from_payload(vec![b'x'; 16])];
            let raft = Some(weir::storage::RaftPosition { index, term: 1 });
            let batch = weir::storage::NewBatch { messages: &messages, producer: Some((3, index)), raft };
            log.append_batches_at(&[batch], now_us()).unwrap();
        }
        let mut visited = 0;
        log.visit_batches_after(0, |_, _, _| visited += 1).unwrap();
        assert_eq!(visited, 200);
        log.close().unwrap();
    }
    let first = segment_logs(dir.path()).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&first).unwrap();
    assert!(segment_logs(dir.path()).len() > 2, "the first segment is sealed");
    bytes[200] ^= 0x40;
    std::fs::write(&first, bytes).unwrap();
    let log = open(dir.path(), small_config());
    let refused = log.visit_batches_after(0, |_, _, _| {});
    assert!(matches!(refused, Err(StorageError::Corrupt { .. })), "{refused:?}");
}

/// Damage followed by valid records in a log's last segment (pages of an
/// unsynced tail written back out of order, or a flipped byte): a single
/// node keeps it (nothing after it is lost, its offsets are never reused);
/// a replicated partition's log is cut there, the cut bytes set aside, so
/// that its Raft group applies those entries again instead of leaving a
/// hole.
#[test]
fn a_replicated_log_is_cut_at_damage_in_its_unsynced_end_and_a_single_nodes_keeps_it() {
    for replicated in [false, true] {
        let data_dir = tempfile::tempdir().unwrap();
        let dir = data_dir.path().join("channels").join("test");
        std::fs::create_dir_all(&dir).unwrap();
        if replicated {
            std::fs::write(dir.join("channel.toml"), "replicated = true\n").unwrap();
        }
        let config = LogConfig { segment_bytes: 64 * 1024, replicated, ..small_config() };
        {
            let log = open(&dir, config.clone());
            for index in 1..=40 {
                let messages = [message(index, 100), message(index, 100)];
                let raft = Some(weir::storage::RaftPosition { index, term: 1 });
                let batch = weir::storage::NewBatch { messages: &messages, producer: None, raft };
                log.append_batches_at(&[batch], now_us()).unwrap();
            }
            log.close().unwrap();
        }
        let logs = segment_logs(&dir);
        assert_eq!(logs.len(), 1, "one segment");
        let mut bytes = std::fs::read(&logs[0]).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&logs[0], bytes).unwrap();
        // weir check says what the broker will do.
        let policies = weir::storage::check::FsyncPolicies::all(FsyncPolicy::Never);
        let report = weir::storage::check::check_data_dir(data_dir.path(), &policies).unwrap();
        let (verdict, says) = if replicated {
            (Verdict::Repairable, "the broker cuts a replicated partition's log here")
        } else {
            (Verdict::Corrupt, "the broker keeps the rest of the log")
        };
        assert_eq!(report.verdict(), verdict, "{:?}", report.problems);
        assert!(report.problems.iter().any(|problem| problem.what.contains(says)), "{:?}", report.problems);

        let log = open(&dir, config.clone());
        let last = log.last_raft_entry().expect("batch headers").index;
        let set_aside = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().ends_with(".torn"))
            .count();
        if replicated {
            assert!(last < 40, "cut before the damage: last entry {last}");
            assert_eq!(log.next_offset(), last * 2, "whole batches kept, nothing after the cut");
            assert_eq!(read_all(&log, 0).len() as u64, last * 2, "every record before the cut reads");
            assert_eq!(set_aside, 1, "the cut bytes are set aside");
        } else {
            assert_eq!((last, log.next_offset()), (40, 80), "kept: nothing cut");
            assert_eq!(set_aside, 0);
        }
        drop(log);
        // What one open leaves, the next accepts unchanged.
        let again = open(&dir, config);
        assert_eq!(again.last_raft_entry().map(|entry| entry.index), Some(last));
    }
}

/// Damage in a replicated log's segment older than its last sealed one is
/// kept, as on a single node: the cut is only for what a crash can leave
/// unsynced, and a cut in the last sealed segment (which sets the last one
/// aside) does not walk back into the segment before it on the next round.
#[test]
fn a_replicated_logs_cut_never_walks_back_into_older_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 2048, replicated: true, ..small_config() };
    {
        let log = open(dir.path(), config.clone());
        for index in 1..=60 {
            let messages = [message(index, 100)];
            let raft = Some(weir::storage::RaftPosition { index, term: 1 });
            log.append_batches_at(&[weir::storage::NewBatch { messages: &messages, producer: None, raft }], now_us())
                .unwrap();
        }
        log.close().unwrap();
    }
    let logs = segment_logs(dir.path());
    assert!(logs.len() >= 4, "{} segments", logs.len());
    let base_of = |path: &Path| -> u64 { path.file_stem().unwrap().to_str().unwrap().parse().unwrap() };
    // A flipped bit in the last record of the last sealed segment and of
    // the one before it (after their last index entries: recovery reads
    // them).
    let (older, last_sealed) = (&logs[logs.len() - 3], &logs[logs.len() - 2]);
    for path in [older, last_sealed] {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }
    let log = open(dir.path(), config);
    let next = log.next_offset();
    assert!(next > base_of(last_sealed) && next < 60, "cut in the last sealed segment: next offset {next}");
    let set_aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".torn"))
        .collect();
    let older_stem = older.file_stem().unwrap().to_string_lossy().into_owned();
    assert!(!set_aside.iter().any(|name| name.starts_with(&older_stem)), "the older segment was cut: {set_aside:?}");
    assert!(older.exists(), "the older segment is still the log's");
}

#[test]
fn retention_by_age_deletes_segments_whose_newest_record_is_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention: RetentionPolicy { max_age: Some(Duration::from_secs(3600)), ..RetentionPolicy::default() },
        ..small_config()
    };
    let log = open(dir.path(), config);
    let hour_us = 3_600_000_000;
    let t0 = 1_700_000_000_000_000;
    for i in 0..40 {
        log.append_batch_at(&[message(i, 200)], t0 + i).unwrap();
    }
    let old_next = log.next_offset();
    for i in 0..40 {
        log.append_batch_at(&[message(i, 200)], t0 + 2 * hour_us + i).unwrap();
    }
    let outcome = log.apply_retention(t0 + 2 * hour_us + 100).unwrap();
    assert!(outcome.segments_deleted > 0);
    // Every deleted record was from the old hour, and only segments made
    // entirely of old records went.
    assert!(log.start_offset() <= old_next);
    assert!(outcome.records_deleted <= old_next);
    let remaining_old =
        read_all(&log, log.start_offset()).iter().filter(|r| r.timestamp_us < t0 + hour_us).count() as u64;
    assert!(remaining_old < old_next);
}

#[test]
fn reads_by_time_find_the_first_record_at_or_after_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), small_config());
    let t0 = 1_700_000_000_000_000u64;
    // Ten records per millisecond, over many segments.
    for i in 0..300u64 {
        log.append_batch_at(&[message(i, 100)], t0 + (i / 10) * 1000).unwrap();
    }
    assert_eq!(log.offset_for_time(0).unwrap(), 0);
    assert_eq!(log.offset_for_time(t0).unwrap(), 0);
    assert_eq!(log.offset_for_time(t0 + 1).unwrap(), 10);
    assert_eq!(log.offset_for_time(t0 + 1000).unwrap(), 10);
    assert_eq!(log.offset_for_time(t0 + 15_500).unwrap(), 160);
    assert_eq!(log.offset_for_time(t0 + 29_000).unwrap(), 290);
    assert_eq!(log.offset_for_time(t0 + 29_001).unwrap(), 300, "past the newest record: the next offset");
}

#[test]
fn timestamps_never_decrease_even_when_the_clock_steps_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), small_config());
    let first = log.append_batch_at(&[message(0, 1)], 2_000).unwrap();
    let second = log.append_batch_at(&[message(1, 1)], 1_000).unwrap();
    assert_eq!(first.timestamp_us, 2_000);
    assert_eq!(second.timestamp_us, 2_000);
}

#[test]
fn recovery_after_truncating_inside_the_last_record_yields_exactly_the_earlier_records() {
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("c");
    let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
    {
        let log = open(&channel_dir, config.clone());
        for i in 0..20 {
            log.append_batch(&[message(i, 100)]).unwrap();
        }
        log.close().unwrap();
    }
    let path = segment_logs(&channel_dir).pop().unwrap();
    let original = std::fs::read(&path).unwrap();
    let last_record_len = message(19, 100).encoded_len();
    // The last batch: its header, then its one record. A cut anywhere in it
    // takes the whole batch, header included.
    let last_record_start = original.len() - last_record_len - BATCH_HEADER_BYTES;
    let index_files: Vec<(PathBuf, Vec<u8>)> = ["index", "timeindex"]
        .iter()
        .map(|ext| {
            let p = path.with_extension(ext);
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    for cut in last_record_start..original.len() {
        std::fs::write(&path, &original[..cut]).unwrap();
        for (p, bytes) in &index_files {
            std::fs::write(p, bytes).unwrap();
        }
        let log = open(&channel_dir, config.clone());
        assert_eq!(log.next_offset(), 19, "cut at {cut}");
        let records = read_all(&log, 0);
        assert_eq!(records.len(), 19, "cut at {cut}");
        assert_eq!(records[18].payload, message(18, 100).payload);
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, last_record_start);
        // The log takes appends again at the right offset.
        assert_eq!(log.append_batch(&[message(19, 100)]).unwrap().first_offset, 19);
        drop(log);
    }
}

#[test]
fn a_flipped_byte_is_caught_by_the_reader_and_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("channels").join("orders");
    {
        let log = ChannelLog::open(
            Arc::new(StdFileSystem),
            &channel_dir,
            ChannelName::new("orders").unwrap(),
            small_config(),
        )
        .unwrap();
        for i in 0..10 {
            log.append_batch(&[message(i, 100)]).unwrap();
        }
        log.close().unwrap();
    }
    let path = segment_logs(&channel_dir).pop().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let record_len = message(0, 100).encoded_len();
    let record_5 = 16 + 6 * BATCH_HEADER_BYTES + 5 * record_len;
    let flipped_at = record_5 + record_len / 2;
    bytes[flipped_at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let report = weir::storage::check::check_data_dir(
        dir.path(),
        &weir::storage::check::FsyncPolicies::all(FsyncPolicy::Always),
    )
    .unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let problem = &report.problems[0];
    assert_eq!(problem.position, Some(record_5 as u64));
    assert!(problem.what.contains("CRC mismatch"), "{}", problem.what);
    assert!(problem.what.contains("followed by valid records"), "{}", problem.what);
    assert_eq!(report.verdict(), Verdict::Corrupt);
    assert!(problem.to_string().starts_with("corrupt: channel orders, 00000000000000000000.log, byte "), "{problem}");

    // A reader never sees corrupt data, and never loses the good records
    // around it: the damaged record is followed by valid ones, so recovery
    // keeps everything (no cut, no offset reused); reads serve the records
    // before it, fail on it naming file, byte and the offset to read on
    // from, and work past it.
    let log =
        ChannelLog::open(Arc::new(StdFileSystem), &channel_dir, ChannelName::new("orders").unwrap(), small_config())
            .unwrap();
    assert_eq!(log.next_offset(), 10);
    let before = log.read(0, 1 << 20).unwrap();
    assert_eq!((before.first_offset, before.count), (0, 5));
    for from in [5] {
        match log.read(from, 1 << 20) {
            Err(StorageError::CorruptRecord { position, offset, next_readable_offset, .. }) => {
                assert_eq!(position, record_5 as u64);
                assert_eq!((offset, next_readable_offset), (5, Some(6)));
            }
            other => panic!("expected CorruptRecord, got {other:?}"),
        }
    }
    assert_eq!(read_all(&log, 6).len(), 4);
}

#[test]
fn a_reader_of_a_sealed_segment_gets_an_error_naming_the_corrupt_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), small_config());
    for i in 0..50 {
        log.append_batch(&[message(i, 200)]).unwrap();
    }
    let first = &segment_logs(dir.path())[0];
    let mut bytes = std::fs::read(first).unwrap();
    bytes[16 + BATCH_HEADER_BYTES + 40] ^= 1; // Inside the first record's payload.
    std::fs::write(first, &bytes).unwrap();
    match log.read(0, 1024) {
        Err(StorageError::CorruptRecord { path, position, offset, next_readable_offset, .. }) => {
            assert_eq!(&path, first);
            assert_eq!(position, (16 + BATCH_HEADER_BYTES) as u64);
            assert_eq!((offset, next_readable_offset), (0, Some(1)));
        }
        other => panic!("expected CorruptRecord, got {other:?}"),
    }
    // Reading past the damage works: the records after it are intact.
    let after = log.read(1, 1 << 20).unwrap();
    assert_eq!(after.first_offset, 1);
    assert!(after.count > 0);
}

/// Opens a log whose sealed segment `damaged` ends in bad bytes and checks
/// that they are kept as damage: nothing removed, the offsets they held up
/// to the next segment unreadable (naming the file), everything else
/// readable, appends going on at the same next offset.
fn assert_bad_sealed_end_kept_as_damage(dir: &Path, config: LogConfig, damaged: &Path) {
    let segments = segment_logs(dir);
    let position = segments.iter().position(|path| path == damaged).expect("the damaged segment");
    let next_base: u64 = segments[position + 1].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let log = ChannelLog::open(Arc::new(StdFileSystem), dir, ChannelName::new("t").unwrap(), config).unwrap();
    assert_eq!(segment_logs(dir), segments, "nothing is removed for damage");
    match log.read(next_base - 1, 1 << 20) {
        Err(StorageError::CorruptRecord { path, offset, .. }) => {
            assert_eq!(&path, damaged);
            assert_eq!(offset, next_base - 1);
        }
        other => panic!("expected the last offset of the damaged segment to be unreadable, got {other:?}"),
    }
    let after = log.read(next_base, 1 << 20).unwrap();
    assert_eq!(after.first_offset, next_base, "the next segment is read from its base");
    let first = log.read(log.start_offset(), 1).unwrap();
    assert_eq!(first.count, 1, "the records before the damage are read");
    let next = log.next_offset();
    assert_eq!(log.append_batch(&[message(next, 10)]).unwrap().first_offset, next);
}

#[test]
fn bad_bytes_at_the_end_of_a_sealed_segment_are_kept_as_damage_and_the_channel_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), small_config());
        for i in 0..50 {
            log.append_batch(&[message(i, 200)]).unwrap();
        }
    }
    let first = segment_logs(dir.path())[0].clone();
    let mut bytes = std::fs::read(&first).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 1; // The last record of a sealed segment is verified on open.
    std::fs::write(&first, &bytes).unwrap();
    assert_bad_sealed_end_kept_as_damage(dir.path(), small_config(), &first);
}

#[test]
fn missing_or_corrupt_indexes_are_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("channels").join("c");
    let config = small_config();
    let log = ChannelLog::open(Arc::new(StdFileSystem), &channel_dir, ChannelName::new("c").unwrap(), config.clone())
        .unwrap();
    for i in 0..60 {
        log.append_batch_at(&[message(i, 200)], 1_000 + i * 10).unwrap();
    }
    log.close().unwrap();
    drop(log);
    let logs = segment_logs(&channel_dir);
    let pristine: Vec<Vec<u8>> = logs.iter().map(|p| std::fs::read(p.with_extension("index")).unwrap()).collect();
    std::fs::remove_file(logs[0].with_extension("index")).unwrap();
    std::fs::write(logs[1].with_extension("timeindex"), b"garbage").unwrap();
    let mut wrong = std::fs::read(logs[2].with_extension("index")).unwrap();
    let entry_position = wrong.len() - 1;
    wrong[entry_position] ^= 0xff; // The last entry points at the wrong byte.
    std::fs::write(logs[2].with_extension("index"), &wrong).unwrap();

    let log = ChannelLog::open(Arc::new(StdFileSystem), &channel_dir, ChannelName::new("c").unwrap(), config).unwrap();
    for (path, original) in logs.iter().zip(&pristine).take(3) {
        assert_eq!(&std::fs::read(path.with_extension("index")).unwrap(), original, "{}", path.display());
    }
    assert_eq!(read_all(&log, 0).len(), 60);
    assert_eq!(log.offset_for_time(1_000 + 335).unwrap(), 34);
    assert!(
        weir::storage::check::check_data_dir(
            dir.path(),
            &weir::storage::check::FsyncPolicies::all(FsyncPolicy::Always)
        )
        .unwrap()
        .is_clean()
    );
}

#[test]
fn a_reader_tailing_the_log_sees_every_record_once_in_order_while_the_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path(), small_config()));
    const TOTAL: u64 = 5_000;
    let writer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for i in 0..TOTAL / 5 {
                let batch: Vec<Message> = (0..5).map(|j| message(i * 5 + j, 50)).collect();
                log.append_batch(&batch).unwrap();
            }
        })
    };
    let mut next = 0;
    while next < TOTAL {
        let batch = log.read(next, 4096).unwrap();
        for record in batch.iter() {
            let record = record.unwrap();
            assert_eq!(record.offset, next);
            assert_eq!(record.payload, message(next, 50).payload);
            next += 1;
        }
        if batch.count == 0 {
            std::thread::yield_now();
        }
    }
    writer.join().unwrap();
    assert_eq!(log.read(TOTAL, 4096).unwrap().count, 0);
}

#[test]
fn messages_over_the_limit_are_rejected_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { max_message_bytes: 100, ..small_config() };
    let log = open(dir.path(), config);
    let at_limit = Message::from_payload(vec![0u8; 100]);
    let over = Message::from_payload(vec![0u8; 101]);
    let error = log.append_batch(&[at_limit.clone(), over]).unwrap_err();
    assert!(matches!(error, StorageError::InvalidMessage { index: 1, .. }), "{error}");
    assert_eq!(log.next_offset(), 0);
    assert_eq!(log.append_batch(&[at_limit]).unwrap().first_offset, 0);
}

#[test]
fn a_store_reopens_its_channels_and_locks_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::with_data_dir(dir.path());
    {
        let store = Store::open(config.clone(), Arc::new(StdFileSystem)).unwrap();
        let orders = store.get_or_create(&ChannelName::new("orders").unwrap()).unwrap();
        orders.partition(0).unwrap().append_batch(&[message(0, 10), message(1, 10)]).unwrap();
        assert!(matches!(
            Store::open(config.clone(), Arc::new(StdFileSystem)),
            Err(StorageError::DataDirLocked { .. })
        ));
        store.close().unwrap();
    }
    let store = Store::open(config, Arc::new(StdFileSystem)).unwrap();
    let orders = store.channel(&ChannelName::new("orders").unwrap()).unwrap();
    assert_eq!(orders.partition(0).unwrap().next_offset(), 2);
}

#[test]
fn weir_check_exits_zero_when_clean_and_reports_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("channels").join("events");
    {
        let log = ChannelLog::open(
            Arc::new(StdFileSystem),
            &channel_dir,
            ChannelName::new("events").unwrap(),
            small_config(),
        )
        .unwrap();
        for i in 0..10 {
            log.append_batch(&[message(i, 100)]).unwrap();
        }
        log.close().unwrap();
    }
    let run = || std::process::Command::new(env!("CARGO_BIN_EXE_weir")).arg("check").arg(dir.path()).output().unwrap();
    let clean = run();
    assert!(clean.status.success());
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert_eq!(stdout.trim(), "ok: 1 channels, 1 segments, 10 records, 2176 bytes", "{stdout}");

    // What a crash leaves is repairable: exit 0, one line per problem and a
    // summary of what the broker will repair.
    let path = segment_logs(&channel_dir).pop().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
    let torn = run();
    assert_eq!(torn.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&torn.stdout);
    assert!(
        stdout.contains(
            "repairable: channel events, 00000000000000000000.log, byte 1960: torn tail: 209 bytes after the last whole batch"
        ),
        "{stdout}"
    );
    assert!(stdout.lines().last().unwrap().starts_with("repairable: 1 channels"), "{stdout}");

    // Damage followed by valid records is corruption: exit 1.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[16 + 20] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let corrupt = run();
    assert_eq!(corrupt.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&corrupt.stdout);
    assert!(stdout.contains("corrupt: channel events, 00000000000000000000.log, byte 16: CRC mismatch"), "{stdout}");
    assert!(stdout.lines().last().unwrap().starts_with("corrupt: 1 channels"), "{stdout}");
}

/// Writes a closed log of three segments and returns the middle one's
/// `.log` file: the last sealed segment.
fn three_segments(dir: &Path, config: &LogConfig) -> PathBuf {
    let log = open(dir, config.clone());
    while segment_logs(dir).len() < 3 {
        log.append_batch(&[message(log.next_offset(), 200)]).unwrap();
    }
    log.close().unwrap();
    segment_logs(dir).swap_remove(1)
}

/// Builds a log of three segments and cuts the tail of the middle one, as a
/// crash during its background seal sync would; returns its base offset.
fn log_with_a_torn_middle_segment(dir: &Path, config: &LogConfig) -> u64 {
    let middle = three_segments(dir, config);
    let bytes = std::fs::read(&middle).unwrap();
    std::fs::write(&middle, &bytes[..bytes.len() - 50]).unwrap();
    middle.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

#[test]
fn a_torn_last_sealed_segment_is_cut_under_never_and_the_segment_after_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let middle_base = log_with_a_torn_middle_segment(dir.path(), &config);
    let log = open(dir.path(), config);
    assert_eq!(segment_logs(dir.path()).len(), 2, "the segment after the torn one is no longer part of the log");
    let set_aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().to_string_lossy().ends_with(".log.torn"))
        .count();
    assert_eq!(set_aside, 1, "its files are kept aside for inspection");
    let next = log.next_offset();
    assert!(next > middle_base);
    let records = read_all(&log, 0);
    assert_eq!(records.len() as u64, next);
    assert_eq!(log.append_batch(&[message(next, 10)]).unwrap().first_offset, next);
}

#[test]
fn a_torn_sealed_segment_is_not_cut_under_always_but_kept_as_damage() {
    // Under `always` every sealed segment was synced before the next one
    // existed: a torn end is damage to synced data, never cut.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { fsync: FsyncPolicy::Always, ..small_config() };
    let middle_base = log_with_a_torn_middle_segment(dir.path(), &config);
    let middle = segment_logs(dir.path()).into_iter().find(|path| path.ends_with(format!("{middle_base:020}.log")));
    assert_bad_sealed_end_kept_as_damage(dir.path(), config, &middle.unwrap());
}

#[test]
fn a_flipped_byte_at_the_end_of_the_last_sealed_segment_is_kept_as_damage_even_under_never() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let middle = three_segments(dir.path(), &config);
    let mut bytes = std::fs::read(&middle).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x10; // Corruption, not a torn end: the bytes after it are not zeros.
    std::fs::write(&middle, &bytes).unwrap();
    assert_bad_sealed_end_kept_as_damage(dir.path(), config, &middle);
}

#[test]
fn a_zero_filled_end_of_the_last_sealed_segment_is_a_torn_end_under_never() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let middle = &three_segments(dir.path(), &config);
    let mut bytes = std::fs::read(middle).unwrap();
    let len = bytes.len();
    bytes[len - 100..].fill(0); // Blocks that never reached the disk read as zeros.
    std::fs::write(middle, &bytes).unwrap();
    let log = open(dir.path(), config);
    assert_eq!(segment_logs(dir.path()).len(), 2);
    assert_eq!(read_all(&log, 0).len() as u64, log.next_offset());
}

fn check_verdict(dir: &Path) -> (Verdict, Vec<String>) {
    let report =
        weir::storage::check::check_data_dir(dir, &weir::storage::check::FsyncPolicies::all(FsyncPolicy::Always))
            .unwrap();
    (report.verdict(), report.problems.iter().map(ToString::to_string).collect())
}

fn open_channel(data_dir: &Path, config: LogConfig) -> ChannelLog {
    let channel_dir = data_dir.join("channels").join("orders");
    ChannelLog::open(Arc::new(StdFileSystem), &channel_dir, ChannelName::new("orders").unwrap(), config).unwrap()
}

#[test]
fn an_index_rebuilt_for_a_small_active_segment_gets_its_header_and_check_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { index_interval_bytes: 4096, ..small_config() };
    {
        let log = open_channel(dir.path(), config.clone());
        for i in 0..3 {
            log.append_batch(&[Message::from_payload(format!("line {i}"))]).unwrap();
        }
        log.close().unwrap();
    }
    let channel_dir = dir.path().join("channels").join("orders");
    std::fs::write(channel_dir.join("00000000000000000000.index"), b"").unwrap();
    std::fs::remove_file(channel_dir.join("00000000000000000000.timeindex")).unwrap();
    {
        let log = open_channel(dir.path(), config.clone());
        for i in 3..103 {
            log.append_batch(&[Message::from_payload(format!("line {i}"))]).unwrap();
        }
        log.close().unwrap();
    }
    for name in ["00000000000000000000.index", "00000000000000000000.timeindex"] {
        let bytes = std::fs::read(channel_dir.join(name)).unwrap();
        assert_eq!(&bytes[..4], b"WEIR", "{name} starts with its header");
        assert_eq!((bytes.len() - 16) % 16, 0, "{name} holds whole entries after its header");
    }
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
}

/// Where record `n` of a segment holding `message(0, 100)`, `message(1,
/// 100)`, ..., each appended alone (one batch: its header, then it),
/// starts.
fn record_start(n: u64) -> usize {
    16 + (n as usize + 1) * BATCH_HEADER_BYTES + (0..n).map(|i| message(i, 100).encoded_len()).sum::<usize>()
}

/// 200 records of the active segment, closed cleanly; returns the bytes of
/// one record and the path of the segment.
fn active_segment_of_200(data_dir: &Path) -> (usize, PathBuf) {
    let config = LogConfig { segment_bytes: 1 << 30, ..small_config() };
    let log = open_channel(data_dir, config);
    for i in 0..200 {
        log.append_batch(&[message(i, 100)]).unwrap();
    }
    log.close().unwrap();
    let record_len = message(0, 100).encoded_len();
    let channel_dir = data_dir.join("channels").join("orders");
    (record_len, segment_logs(&channel_dir).pop().unwrap())
}

fn flip_byte_of_record(path: &Path, record_len: usize, record: u64) -> u64 {
    let mut bytes = std::fs::read(path).unwrap();
    let record_start = record_start(record);
    bytes[record_start + record_len / 2] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
    record_start as u64
}

#[test]
fn a_damaged_record_in_the_middle_of_the_active_segment_is_never_cut_and_its_offsets_never_reused() {
    // 198 lies after the last index entry (one per 256 bytes, the records
    // are about 130 bytes), 120 before it: both must be noticed and kept.
    for damaged in [198u64, 120] {
        let dir = tempfile::tempdir().unwrap();
        let (record_len, path) = active_segment_of_200(dir.path());
        let length_before = std::fs::metadata(&path).unwrap().len();
        let position = flip_byte_of_record(&path, record_len, damaged);

        let config = LogConfig { segment_bytes: 1 << 30, ..small_config() };
        let log = open_channel(dir.path(), config);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), length_before, "recovery cut nothing");
        assert_eq!(log.next_offset(), 200, "the records after the damaged one are all there");
        assert_eq!(log.append_batch(&[message(200, 100)]).unwrap().first_offset, 200, "no offset is reused");

        // Every good record before the damage is served, then the error
        // names the record and where to read on; past it, all is readable.
        let before = read_all_until_error(&log, 0);
        assert_eq!(before, damaged);
        match log.read(damaged, 1 << 20) {
            Err(StorageError::CorruptRecord { position: at, offset, next_readable_offset, .. }) => {
                assert_eq!((at, offset, next_readable_offset), (position, damaged, Some(damaged + 1)));
            }
            other => panic!("expected CorruptRecord, got {other:?}"),
        }
        let after = read_all(&log, damaged + 1);
        assert_eq!(after.len() as u64, 201 - damaged - 1);
        assert!(after.iter().zip(damaged + 1..).all(|(record, offset)| record.offset == offset));
        drop(log);
        let (verdict, problems) = check_verdict(dir.path());
        assert_eq!(verdict, Verdict::Corrupt, "{problems:?}");
    }
}

/// Reads from `from` until a read fails; returns the offset it failed at.
fn read_all_until_error(log: &ChannelLog, from: u64) -> u64 {
    let mut offset = from;
    loop {
        match log.read(offset, 64 * 1024) {
            Ok(batch) if batch.count > 0 => offset = batch.next_offset,
            Ok(_) => panic!("read to the end at {offset} without meeting the damage"),
            Err(_) => return offset,
        }
    }
}

#[test]
fn a_zero_filled_tail_after_the_last_record_is_cut_as_torn() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = active_segment_of_200(dir.path());
    let length = std::fs::metadata(&path).unwrap().len();
    // Blocks allocated but never written read as zeros after a power loss.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, 8192));
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(check_verdict(dir.path()).0, Verdict::Repairable);

    let config = LogConfig { segment_bytes: 1 << 30, ..small_config() };
    let log = open_channel(dir.path(), config);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), length);
    assert_eq!(log.next_offset(), 200);
    drop(log);
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
}

#[test]
fn check_calls_a_crashed_log_with_stale_indexes_and_a_torn_tail_repairable() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = active_segment_of_200(dir.path());
    // A power loss: the log lost its last 50 records and the tail of the one
    // before, the indexes (written without their own sync) kept entries
    // for records that are gone.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..record_start(150) - BATCH_HEADER_BYTES - 9]).unwrap();
    let report = weir::storage::check::check_data_dir(
        dir.path(),
        &weir::storage::check::FsyncPolicies::all(FsyncPolicy::Always),
    )
    .unwrap();
    assert_eq!(report.verdict(), Verdict::Repairable, "{:?}", report.problems);
    // One line per index file, not one per stale entry.
    assert!(report.problems.len() <= 3, "{:?}", report.problems);

    let run = std::process::Command::new(env!("CARGO_BIN_EXE_weir")).arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(run.status.code(), Some(0));

    let log = open_channel(dir.path(), small_config());
    assert_eq!(log.next_offset(), 149);
    drop(log);
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
}

#[test]
fn a_full_disk_refuses_appends_keeps_reads_and_recovers_without_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let disk = full_disk::FullDisk::default();
    let log =
        ChannelLog::open(Arc::new(disk.clone()), dir.path(), ChannelName::new("t").unwrap(), small_config()).unwrap();
    for i in 0..40 {
        log.append_batch(&[message(i, 100)]).unwrap();
    }
    let next = log.next_offset();
    disk.set_full(true);
    // Every append is refused with StorageFull, whether it writes to the
    // active segment or has to roll a new one; nothing of it stays.
    for i in 0..40 {
        match log.append_batch(&[message(next + i, 100)]) {
            Err(error @ StorageError::StorageFull { .. }) => assert!(error.is_storage_full()),
            other => panic!("expected StorageFull, got {other:?}"),
        }
        assert!(log.is_storage_full());
        assert_eq!(log.next_offset(), next);
    }
    assert_eq!(read_all(&log, 0).len() as u64, next, "reads go on while the disk is full");
    assert_eq!(log.counters().storage_full_episodes, 1);

    disk.set_full(false);
    // The first append after the retry interval is the probe that ends the
    // episode; until then appends are refused without touching the disk.
    let appended = loop {
        match log.append_batch(&[message(next, 100)]) {
            Ok(appended) => break appended,
            Err(StorageError::StorageFull { .. }) => std::thread::sleep(Duration::from_millis(20)),
            Err(other) => panic!("expected StorageFull or success, got {other:?}"),
        }
    };
    assert_eq!(appended.first_offset, next, "no offset was used by the refused appends");
    assert!(!log.is_storage_full());
    for i in next + 1..next + 60 {
        assert_eq!(log.append_batch(&[message(i, 100)]).unwrap().first_offset, i);
    }
    let records = read_all(&log, 0);
    assert_eq!(records.len() as u64, next + 60);
    assert!(records.iter().zip(0..).all(|(record, offset)| record.offset == offset));
    log.close().unwrap();
    drop(log);
    let reopened = open(dir.path(), small_config());
    assert_eq!(reopened.next_offset(), next + 60);
    assert_eq!(read_all(&reopened, 0).len() as u64, next + 60);
}

// ---------------------------------------------------------------------------
// Partitions

fn store_with(data_dir: &Path, configure: impl FnOnce(&mut StoreConfig)) -> Store {
    let mut config = StoreConfig::with_data_dir(data_dir);
    config.default_log = small_config();
    configure(&mut config);
    Store::open(config, Arc::new(StdFileSystem)).unwrap()
}

fn partitions(count: u32) -> ChannelSettings {
    ChannelSettings { partitions: Some(count), ..ChannelSettings::default() }
}

#[test]
fn each_partition_is_its_own_log_and_a_channel_reopens_with_its_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let orders = ChannelName::new("orders").unwrap();
    {
        let store = store_with(dir.path(), |_| {});
        let channel = store.create(&orders, partitions(4)).unwrap();
        assert_eq!(channel.partition_count(), 4);
        for partition in 0..4u32 {
            let log = channel.partition(partition).unwrap();
            for i in 0..=u64::from(partition) {
                // Offsets are per partition: each starts at 0.
                assert_eq!(log.append_batch(&[message(i, 50)]).unwrap().first_offset, i);
            }
        }
        assert!(matches!(channel.partition(4), Err(StorageError::UnknownPartition { partition: 4, count: 4, .. })));
        store.close().unwrap();
    }
    let channel_dir = dir.path().join("channels").join("orders");
    for partition in 1..4 {
        assert!(channel_dir.join(format!("partition-{partition}")).is_dir());
    }
    let store = store_with(dir.path(), |_| {});
    let channel = store.channel(&orders).unwrap();
    assert_eq!(channel.partition_count(), 4);
    for partition in 0..4u32 {
        let records = read_all(&channel.partition(partition).unwrap(), 0);
        assert_eq!(records.len() as u64, u64::from(partition) + 1, "partition {partition}");
    }
    drop(store);
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
}

#[test]
fn partitions_can_be_added_up_to_max_partitions_and_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let orders = ChannelName::new("orders").unwrap();
    {
        let store = store_with(dir.path(), |config| config.max_partitions = 8);
        let channel = store.create(&orders, partitions(2)).unwrap();
        channel.partition(1).unwrap().append_batch(&[message(0, 50)]).unwrap();
        channel.increase_partitions(8, 8).unwrap();
        assert_eq!(channel.partition_count(), 8);
        assert!(matches!(
            channel.increase_partitions(9, 8),
            Err(StorageError::TooManyPartitions { count: 9, count_max: 8, .. })
        ));
        assert!(matches!(
            channel.increase_partitions(7, 8),
            Err(StorageError::PartitionCountDecrease { count: 7, current: 8, .. })
        ));
        // At creation too: 0 and max + 1 are refused, max is taken.
        for refused in [0, 9] {
            let error = store.create(&ChannelName::new("c").unwrap(), partitions(refused)).unwrap_err();
            assert!(matches!(error, StorageError::TooManyPartitions { .. }), "{error}");
        }
        assert_eq!(store.create(&ChannelName::new("c").unwrap(), partitions(8)).unwrap().partition_count(), 8);
        store.close().unwrap();
    }
    let store = store_with(dir.path(), |config| config.max_partitions = 8);
    let channel = store.channel(&orders).unwrap();
    assert_eq!(channel.partition_count(), 8);
    assert_eq!(read_all(&channel.partition(1).unwrap(), 0).len(), 1, "the existing partitions are untouched");
    assert_eq!(channel.partition(7).unwrap().next_offset(), 0);
}

#[test]
fn a_channel_gets_its_configured_or_default_partition_count_at_creation_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), |config| {
        config.default_partitions = 3;
        config.channel_partitions.insert("audit".into(), 5);
    });
    assert_eq!(store.get_or_create(&ChannelName::new("audit").unwrap()).unwrap().partition_count(), 5);
    assert_eq!(store.get_or_create(&ChannelName::new("other").unwrap()).unwrap().partition_count(), 3);
    store.close().unwrap();
    drop(store);
    // A later default does not change existing channels: their count is on disk.
    let store = store_with(dir.path(), |config| config.default_partitions = 1);
    assert_eq!(store.channel(&ChannelName::new("other").unwrap()).unwrap().partition_count(), 3);
}

#[test]
fn partitions_missing_after_a_crash_while_adding_them_are_created_empty() {
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("channels").join("orders");
    {
        let store = store_with(dir.path(), |_| {});
        let channel = store.create(&ChannelName::new("orders").unwrap(), ChannelSettings::default()).unwrap();
        channel.partition(0).unwrap().append_batch(&[message(0, 50)]).unwrap();
        store.close().unwrap();
    }
    // The settings file was replaced, the new directories never made it.
    std::fs::write(channel_dir.join("channel.toml"), "partitions = 3\n").unwrap();
    let (verdict, problems) = check_verdict(dir.path());
    assert_eq!(verdict, Verdict::Repairable, "{problems:?}");
    let store = store_with(dir.path(), |_| {});
    let channel = store.channel(&ChannelName::new("orders").unwrap()).unwrap();
    assert_eq!(channel.partition_count(), 3);
    assert_eq!(channel.partition(0).unwrap().next_offset(), 1);
    assert_eq!(channel.partition(2).unwrap().next_offset(), 0);
    drop(store);
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
}

#[test]
fn a_damaged_last_record_is_kept_and_its_offset_never_given_to_another_record() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = active_segment_of_200(dir.path());
    // A flipped bit in the last record: not a torn write (no zeros at the
    // end), so the acknowledged record at offset 199 is not cut.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (verdict, problems) = check_verdict(dir.path());
    assert_eq!(verdict, Verdict::Corrupt, "{problems:?}");

    let config = LogConfig { segment_bytes: 1 << 30, ..small_config() };
    let log = open_channel(dir.path(), config);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes.len() as u64, "nothing cut");
    assert_eq!(log.next_offset(), 200, "offset 199 stays taken");
    assert_eq!(log.append_batch(&[message(200, 100)]).unwrap().first_offset, 200);
    match log.read(199, 1 << 20) {
        Err(StorageError::CorruptRecord { offset: 199, next_readable_offset: Some(200), .. }) => {}
        other => panic!("expected CorruptRecord at 199, got {other:?}"),
    }
    assert_eq!(read_all(&log, 200).len(), 1);
}

#[test]
fn a_tail_zeroed_from_inside_a_record_past_its_end_is_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = active_segment_of_200(dir.path());
    // A power loss: the page holding the start of record 150 was written,
    // the following ones (to the end of the file, past that record's end)
    // read as zeros.
    let mut bytes = std::fs::read(&path).unwrap();
    let zeros_from = record_start(150) + 20;
    assert!(bytes.len() - zeros_from > message(150, 100).encoded_len(), "the zeros run past the record");
    bytes[zeros_from..].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(check_verdict(dir.path()).0, Verdict::Repairable);
    let log = open_channel(dir.path(), LogConfig { segment_bytes: 1 << 30, ..small_config() });
    assert_eq!(log.next_offset(), 150);
    // Cut from the start of its batch: a batch is kept whole or not at all.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), (record_start(150) - BATCH_HEADER_BYTES) as u64);
}

#[test]
fn a_read_by_time_steps_over_damage_before_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 1 << 30, ..small_config() };
    let log = open_channel(dir.path(), config.clone());
    for i in 0..20u64 {
        log.append_batch_at(&[message(i, 100)], 1_000_000 + i * 1000).unwrap();
    }
    log.close().unwrap();
    drop(log);
    let path = segment_logs(&dir.path().join("channels").join("orders")).pop().unwrap();
    flip_byte_of_record(&path, message(5, 100).encoded_len(), 5);
    let log = open_channel(dir.path(), config);
    assert_eq!(log.offset_for_time(1_000_000 + 15 * 1000).unwrap(), 15);
    assert_eq!(log.offset_for_time(1_000_000 + 2 * 1000).unwrap(), 2);
}

#[test]
fn a_roll_on_a_full_disk_leaves_nothing_behind_and_happens_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let disk = full_disk::FullDisk::default();
    let config = LogConfig { segment_bytes: 1024, ..small_config() };
    let log =
        ChannelLog::open(Arc::new(disk.clone()), dir.path(), ChannelName::new("t").unwrap(), config.clone()).unwrap();
    while segment_logs(dir.path()).len() < 2 {
        log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
    }
    // Fill the active segment up to its roll.
    while !log.roll_due(now_us()) {
        log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
    }
    let next = log.next_offset();
    let files_before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    disk.set_full(true);
    let refused = log.append_batch(&[message(next, 100)]).unwrap_err();
    assert!(matches!(refused, StorageError::StorageFull { .. }), "{refused}");
    let mut files_after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    let mut files_before = files_before;
    files_before.sort();
    files_after.sort();
    assert_eq!(files_after, files_before, "the refused roll created no file");
    disk.set_full(false);
    let appended = loop {
        match log.append_batch(&[message(next, 100)]) {
            Ok(appended) => break appended,
            Err(StorageError::StorageFull { .. }) => std::thread::sleep(Duration::from_millis(20)),
            Err(other) => panic!("expected StorageFull or success, got {other}"),
        }
    };
    assert_eq!(appended.first_offset, next);
    assert_eq!(segment_logs(dir.path()).len(), 3, "the roll happened");
    log.close().unwrap();
    drop(log);
    let reopened = open(dir.path(), config);
    assert_eq!(reopened.next_offset(), next + 1);
    assert_eq!(read_all(&reopened, 0).len() as u64, next + 1);
}

#[test]
fn check_judges_a_torn_last_sealed_segment_by_each_channels_fsync_policy() {
    use weir::storage::check::FsyncPolicies;
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("channels").join("clicks");
    log_with_a_torn_middle_segment(&channel_dir, &small_config());
    let verdict =
        |policies: &FsyncPolicies| weir::storage::check::check_data_dir(dir.path(), policies).unwrap().verdict();
    assert_eq!(verdict(&FsyncPolicies::all(FsyncPolicy::Always)), Verdict::Corrupt);
    // The channel runs with "never" while the broker default is "always":
    // the broker repairs this, and check says so.
    let mut per_channel = FsyncPolicies::all(FsyncPolicy::Always);
    per_channel.channels.insert("clicks".into(), FsyncPolicy::Never);
    assert_eq!(verdict(&per_channel), Verdict::Repairable);

    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "fsync = \"always\"\n[channels.clicks]\nfsync = \"never\"\n").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir")).arg("check").arg(dir.path()).args(args).output().unwrap()
    };
    assert_eq!(run(&["--config", config.to_str().unwrap()]).status.code(), Some(0));
    assert_eq!(run(&[]).status.code(), Some(1));
    assert_eq!(run(&["--fsync", "never"]).status.code(), Some(0));
}

#[test]
fn a_sync_that_fails_for_lack_of_space_stops_appends_until_restart_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let disk = full_disk::FullDisk::default();
    let config = LogConfig { fsync: FsyncPolicy::Always, ..small_config() };
    let log = ChannelLog::open(Arc::new(disk.clone()), dir.path(), ChannelName::new("t").unwrap(), config).unwrap();
    log.append_batch(&[message(0, 10)]).unwrap();
    disk.set_sync_full(true);
    // The state of the written records is unknown after a failed sync: not
    // "full, try again" but "failed, restart".
    let failed = log.append_batch(&[message(1, 10)]).unwrap_err();
    assert!(matches!(failed, StorageError::Failed { .. }), "{failed}");
    assert!(!failed.is_storage_full());
    assert!(!log.is_storage_full());
    disk.set_sync_full(false);
    assert!(matches!(log.append_batch(&[message(1, 10)]), Err(StorageError::Failed { .. })));
}

#[test]
fn under_never_a_roll_makes_the_next_segment_durable_before_the_sealed_segment_sync_starts() {
    // The sealed segment's sync writes back a whole segment; a small sync
    // issued while it runs waits for it. So the new segment's files and
    // the directory are synced first, and the sealed segment's sync (on
    // its own thread) comes after them.
    let dir = tempfile::tempdir().unwrap();
    let recorder = GatedSync::default();
    let config = LogConfig { segment_bytes: 2048, ..small_config() };
    let log = ChannelLog::open(Arc::new(recorder.clone()), dir.path(), ChannelName::new("t").unwrap(), config).unwrap();
    while !log.roll_due(now_us()) {
        log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
    }
    recorder.events.lock().unwrap().clear();
    let next = log.next_offset();
    log.append_batch(&[message(next, 100)]).unwrap();
    // Wait for the background seal through the log's own sync.
    log.sync().unwrap();
    let syncs = recorder.syncs();
    let logs = segment_logs(dir.path());
    assert_eq!(logs.len(), 2, "{logs:?}");
    let (first_segment_log, next_segment_log) = (logs[0].clone(), logs[1].clone());
    let position = |path: &Path| syncs.iter().position(|synced| synced == path);
    let sealed = position(&first_segment_log).unwrap_or_else(|| panic!("the sealed segment was synced: {syncs:?}"));
    let created = position(&next_segment_log).unwrap_or_else(|| panic!("the new segment was synced: {syncs:?}"));
    let directory = position(dir.path()).unwrap_or_else(|| panic!("the directory was synced: {syncs:?}"));
    assert!(created < sealed && directory < sealed, "{syncs:?}");
    log.close().unwrap();
}

/// The real file system, except that syncing one chosen file blocks until
/// the test opens a gate (when one is chosen); it records file creations
/// and completed syncs (of files and directories) in order.
#[derive(Debug, Default, Clone)]
struct GatedSync {
    gated: Arc<std::sync::Mutex<Option<PathBuf>>>,
    open: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    events: Arc<std::sync::Mutex<Vec<(&'static str, PathBuf)>>>,
}

impl GatedSync {
    fn open_gate(&self) {
        *self.open.0.lock().unwrap() = true;
        self.open.1.notify_all();
    }

    fn position(&self, what: &str, path: &Path) -> Option<usize> {
        self.events.lock().unwrap().iter().position(|(kind, at)| *kind == what && at == path)
    }

    /// Every completed sync so far, in order.
    fn syncs(&self) -> Vec<PathBuf> {
        self.events.lock().unwrap().iter().filter(|(kind, _)| *kind == "synced").map(|(_, path)| path.clone()).collect()
    }
}

#[derive(Debug)]
struct GatedFile {
    inner: Box<dyn weir::storage::fs::StorageFile>,
    path: PathBuf,
    fs: GatedSync,
}

impl weir::storage::fs::FileSystem for GatedSync {
    fn open(
        &self,
        path: &Path,
        mode: weir::storage::fs::OpenMode,
    ) -> std::io::Result<Box<dyn weir::storage::fs::StorageFile>> {
        let inner = StdFileSystem.open(path, mode)?;
        if mode == weir::storage::fs::OpenMode::CreateNew {
            self.events.lock().unwrap().push(("created", path.to_path_buf()));
        }
        Ok(Box::new(GatedFile { inner, path: path.to_path_buf(), fs: self.clone() }))
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        StdFileSystem.create_dir_all(path)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        StdFileSystem.list(dir)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        StdFileSystem.remove(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        StdFileSystem.remove_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        StdFileSystem.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        let synced = StdFileSystem.sync_dir(dir);
        self.events.lock().unwrap().push(("synced", dir.to_path_buf()));
        synced
    }

    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        StdFileSystem.exists(path)
    }
}

impl weir::storage::fs::StorageFile for GatedFile {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.append(buf)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.fs.gated.lock().unwrap().as_deref() == Some(self.path.as_path()) {
            let (open, opened) = &*self.fs.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = opened.wait(is_open).unwrap();
            }
        }
        let synced = self.inner.sync();
        self.fs.events.lock().unwrap().push(("synced", self.path.clone()));
        synced
    }
    fn read_range(&self, position: u64, len: usize) -> std::io::Result<Bytes> {
        self.inner.read_range(position, len)
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.inner.truncate(len)
    }
}

#[test]
fn a_roll_never_creates_a_segment_while_an_earlier_seal_that_sync_waits_for_is_unfinished() {
    // `sync` (the interval thread) takes a pending seal from the writer and
    // waits for it outside the writer lock. A roll meanwhile must not make
    // a newer segment durable: a crash would leave two sealed segments
    // after the torn one, which recovery does not repair.
    let dir = tempfile::tempdir().unwrap();
    let fs = GatedSync::default();
    let config = LogConfig { segment_bytes: 2048, fsync: FsyncPolicy::Interval, ..small_config() };
    let log = ChannelLog::open(Arc::new(fs.clone()), dir.path(), ChannelName::new("t").unwrap(), config).unwrap();
    let fill_and_roll = |log: &ChannelLog| {
        while !log.roll_due(now_us()) {
            log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
        }
        log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
    };
    // The first roll's seal blocks at the gate.
    let sealed = segment_logs(dir.path()).pop().unwrap();
    *fs.gated.lock().unwrap() = Some(sealed.clone());
    // Only what follows counts (the segment's creation synced it too).
    fs.events.lock().unwrap().clear();
    fill_and_roll(&log);
    std::thread::scope(|threads| {
        let syncing = threads.spawn(|| log.sync());
        // Give `sync` a head start to take the seal; if it does not, the
        // roll waits for the seal itself and the order holds either way:
        // this wait only decides whether the race is exercised.
        std::thread::sleep(Duration::from_millis(200));
        let rolling = threads.spawn(|| fill_and_roll(&log));
        // Without the ordering, the third segment is created at once.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline && segment_logs(dir.path()).len() < 3 {
            std::thread::sleep(Duration::from_millis(10));
        }
        fs.open_gate();
        syncing.join().unwrap().unwrap();
        rolling.join().unwrap();
    });
    let logs = segment_logs(dir.path());
    assert_eq!(logs.len(), 3, "{logs:?}");
    let seal_done = fs.position("synced", &sealed).expect("the first seal completed");
    let third_created = fs.position("created", &logs[2]).expect("the third segment was created");
    assert!(seal_done < third_created, "{:?}", fs.events.lock().unwrap());
    log.close().unwrap();
}

#[test]
fn a_log_dropped_or_deleted_waits_for_its_sealed_segments_background_sync() {
    // That sync rewrites the segment's index files by path: going on after
    // the log is gone, it would write them under a channel reopened or
    // recreated in the same directory (which reads them through a map: a
    // file cut under a map is a SIGBUS).
    for ending in ["dropped", "deleted"] {
        let dir = tempfile::tempdir().unwrap();
        let fs = GatedSync::default();
        let config = LogConfig { segment_bytes: 2048, ..small_config() };
        let log = ChannelLog::open(Arc::new(fs.clone()), dir.path(), ChannelName::new("t").unwrap(), config).unwrap();
        let sealed = segment_logs(dir.path()).pop().unwrap();
        *fs.gated.lock().unwrap() = Some(sealed.clone());
        // Only what follows counts (the segment's creation synced it too).
        fs.events.lock().unwrap().clear();
        while !log.roll_due(now_us()) {
            log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
        }
        log.append_batch(&[message(log.next_offset(), 100)]).unwrap();
        let ended = std::thread::spawn({
            let fs = fs.clone();
            move || {
                // Each way of ending is checked alone: after a deletion the
                // log is still held.
                if ending == "deleted" {
                    log.mark_deleted();
                    fs.events.lock().unwrap().push(("ended", PathBuf::new()));
                    drop(log);
                } else {
                    drop(log);
                    fs.events.lock().unwrap().push(("ended", PathBuf::new()));
                }
            }
        });
        // Without the wait the log ends at once, before the gate opens;
        // with it, this only bounds how long the test looks.
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < deadline && !ended.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        fs.open_gate();
        ended.join().unwrap();
        let seal_done = fs.position("synced", &sealed).unwrap_or_else(|| {
            panic!("{ending}: the seal had not completed when the log ended: {:?}", fs.events.lock().unwrap())
        });
        let ended_at = fs.position("ended", Path::new("")).unwrap();
        assert!(seal_done < ended_at, "{ending}: {:?}", fs.events.lock().unwrap());
    }
}

#[test]
fn the_interval_thread_syncs_interval_channels_and_leaves_never_channels_to_the_os() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = GatedSync::default();
    let mut config = StoreConfig::with_data_dir(dir.path());
    config.default_log = LogConfig { fsync: FsyncPolicy::Never, ..config.default_log };
    config
        .channel_logs
        .insert("timed".into(), LogConfig { fsync: FsyncPolicy::Interval, ..config.default_log.clone() });
    let store = Store::open(config, Arc::new(recorder.clone())).unwrap();
    for name in ["timed", "loose"] {
        let channel = store.get_or_create(&ChannelName::new(name).unwrap()).unwrap();
        channel.partition(0).unwrap().append_batch(&[message(0, 10)]).unwrap();
    }
    recorder.events.lock().unwrap().clear();
    store.sync_all();
    let syncs = recorder.syncs();
    let in_channel = |name: &str| syncs.iter().any(|path| path.components().any(|part| part.as_os_str() == name));
    assert!(in_channel("timed"), "{syncs:?}");
    assert!(!in_channel("loose"), "{syncs:?}");
    store.close().unwrap();
}

#[test]
fn a_write_that_fails_with_eio_after_a_short_write_is_cut_back_and_the_next_append_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let disk = full_disk::FullDisk::default();
    let config = LogConfig { fsync: FsyncPolicy::Always, ..small_config() };
    let log =
        ChannelLog::open(Arc::new(disk.clone()), dir.path(), ChannelName::new("t").unwrap(), config.clone()).unwrap();
    log.append_batch(&[message(0, 100), message(1, 100)]).unwrap();
    let log_file = segment_logs(dir.path()).pop().unwrap();
    let length = std::fs::metadata(&log_file).unwrap().len();
    disk.set_write_eio(true);
    let failed = log.append_batch(&[message(2, 100), message(3, 100)]).unwrap_err();
    assert!(matches!(failed, StorageError::Io { .. } | StorageError::Failed { .. }), "{failed}");
    assert!(!failed.is_storage_full(), "{failed}");
    assert_eq!(log.next_offset(), 2, "nothing of the failed append counts");
    assert_eq!(std::fs::metadata(&log_file).unwrap().len(), length, "the half written is cut back");
    disk.set_write_eio(false);
    assert_eq!(log.append_batch(&[message(2, 100)]).unwrap().first_offset, 2, "the next publish tries again");
    log.close().unwrap();
    drop(log);
    let reopened = open(dir.path(), config);
    let records = read_all(&reopened, 0);
    assert_eq!(records.iter().map(|record| record.offset).collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn a_sync_that_fails_with_eio_stops_appends_until_restart_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let disk = full_disk::FullDisk::default();
    let config = LogConfig { fsync: FsyncPolicy::Always, ..small_config() };
    let log =
        ChannelLog::open(Arc::new(disk.clone()), dir.path(), ChannelName::new("t").unwrap(), config.clone()).unwrap();
    for offset in 0..5 {
        log.append_batch(&[message(offset, 100)]).unwrap();
    }
    disk.set_sync_eio(true);
    let failed = log.append_batch(&[message(5, 100)]).unwrap_err();
    assert!(matches!(failed, StorageError::Failed { .. }), "{failed}");
    disk.set_sync_eio(false);
    // Retrying the sync would lie: the partition refuses until restarted.
    assert!(matches!(log.append_batch(&[message(5, 100)]), Err(StorageError::Failed { .. })));
    drop(log);
    // After recovery every acknowledged record is there; the one whose sync
    // failed may or may not be, and appends go on after whatever is.
    let reopened = open(dir.path(), config);
    let records = read_all(&reopened, 0);
    assert!(records.len() == 5 || records.len() == 6, "{}", records.len());
    for (offset, record) in records.iter().enumerate().take(5) {
        assert_eq!(record.offset, offset as u64);
        assert_eq!(record.payload, message(offset as u64, 100).payload);
    }
    let next = records.len() as u64;
    assert_eq!(reopened.append_batch(&[message(next, 100)]).unwrap().first_offset, next);
}

#[test]
fn a_record_appended_after_kept_damage_is_read_back_even_past_a_stale_record() {
    // Found by the segment_recovery fuzz target (fuzz/, regression input
    // tests/fixtures/fuzz/segment_recovery/appended-record-unreadable-after-stale-record):
    // bad bytes, then a record with a good CRC and a plausible offset whose
    // timestamp goes back (stale bytes, never written by this log). Recovery
    // counts it as damage; reads must step over the damage exactly as
    // recovery counted it, not accept the stale record.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
    {
        let log = open(dir.path(), config.clone());
        for i in 0..5 {
            log.append_batch(&[message(i, 20)]).unwrap();
        }
        log.close().unwrap();
    }
    let path = segment_logs(dir.path())[0].clone();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0xab; 40]);
    // Older than the records before it.
    weir::record::encode(&mut bytes, 6, 10, &message(6, 20));
    std::fs::write(&path, &bytes).unwrap();

    let log = open(dir.path(), config);
    let appended = log.append_batch(&[message(99, 10)]).unwrap();
    assert!(appended.first_offset > 5, "the damaged offsets are not given again");
    let batch = log.read(appended.first_offset, 1 << 20).unwrap();
    let record = batch.iter().next().unwrap().unwrap();
    assert_eq!(record.offset, appended.first_offset);
    assert_eq!(record.payload, message(99, 10).payload);
    match log.read(5, 1 << 20) {
        Err(StorageError::CorruptRecord { offset: 5, next_readable_offset, .. }) => {
            assert_eq!(next_readable_offset, Some(appended.first_offset));
        }
        other => panic!("expected offset 5 to be unreadable, got {other:?}"),
    }
    assert_eq!(log.read(0, 1 << 20).unwrap().count, 5, "the records before the damage are read");

    // The same after a roll seals the damaged segment and after restarts:
    // its index files must not let the next open trust past the damage.
    let check = |log: &ChannelLog| {
        let batch = log.read(appended.first_offset, 1 << 20).unwrap();
        assert_eq!(batch.iter().next().unwrap().unwrap().payload, message(99, 10).payload);
        match log.read(5, 1 << 20) {
            Err(StorageError::CorruptRecord { offset: 5, next_readable_offset, .. }) => {
                assert_eq!(next_readable_offset, Some(appended.first_offset));
            }
            other => panic!("expected offset 5 to be unreadable, got {other:?}"),
        }
        assert!(log.read(6, 1 << 20).is_err(), "the stale record is never served");
    };
    // Index entries past the damage (one every 256 bytes here).
    for i in 0..20 {
        log.append_batch(&[message(200 + i, 10)]).unwrap();
    }
    log.close().unwrap();
    drop(log);
    let rolling = LogConfig { segment_bytes: 256, ..small_config() };
    let log = open(dir.path(), rolling.clone());
    check(&log);
    log.append_batch(&[message(100, 10)]).unwrap();
    assert!(segment_logs(dir.path()).len() >= 2, "the damaged segment is sealed");
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), rolling);
    check(&log);
}

#[test]
fn a_read_across_batches_returns_their_records_back_to_back_without_batch_headers() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), LogConfig { segment_bytes: 1 << 20, ..small_config() });
    let mut offset = 0;
    for size in [1u64, 3, 2, 5] {
        let messages: Vec<Message> = (offset..offset + size).map(|i| message(i, 50)).collect();
        assert_eq!(log.append_batch(&messages).unwrap().first_offset, offset);
        offset += size;
    }
    let batch = log.read(0, 1 << 20).unwrap();
    assert_eq!((batch.first_offset, batch.next_offset, batch.count), (0, 11, 11));
    // One slice per batch (their headers fall between them), and the bytes
    // are exactly the records.
    assert_eq!(batch.records.slices().len(), 4);
    let record_bytes: usize = (0..11).map(|i| message(i, 50).encoded_len()).sum();
    assert_eq!(batch.records.len(), record_bytes);
    let records: Vec<Record> = batch.iter().map(Result::unwrap).collect();
    assert!(records.iter().zip(0..).all(|(record, i)| record.offset == i && record.payload == message(i, 50).payload));
    assert_eq!(weir::record::RecordIter::new(Bytes::from(batch.records.slices().concat())).count(), 11);
    // A read from inside a batch, and one bounded in bytes, start and stop
    // at records.
    let middle = log.read(2, message(2, 50).encoded_len() * 3).unwrap();
    assert_eq!((middle.first_offset, middle.count), (2, 3));
    assert_eq!(middle.iter().map(|r| r.unwrap().offset).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(middle.records.len(), 3 * message(2, 50).encoded_len());
}

#[test]
fn a_version_1_log_is_read_and_appended_to_after_an_upgrade_and_its_next_segments_are_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let channel_dir = dir.path().join("channels").join("orders");
    let v1 = LogConfig { format_version: weir::storage::index::FORMAT_VERSION_1, ..small_config() };
    {
        let log = open_channel(dir.path(), v1);
        for i in 0..40 {
            log.append_batch(&[message(i, 100)]).unwrap();
        }
        log.close().unwrap();
    }
    let versions = |dir: &Path| -> Vec<u16> {
        segment_logs(dir)
            .iter()
            .map(|path| u16::from_be_bytes(std::fs::read(path).unwrap()[4..6].try_into().unwrap()))
            .collect()
    };
    let before = versions(&channel_dir);
    assert!(before.len() >= 2 && before.iter().all(|&v| v == 1), "{before:?}");
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));

    let log = open_channel(dir.path(), small_config());
    assert_eq!(read_all(&log, 0).len(), 40);
    for i in 40..120 {
        assert_eq!(log.append_batch(&[message(i, 100)]).unwrap().first_offset, i);
    }
    let records = read_all(&log, 0);
    assert!(records.iter().zip(0..).all(|(record, i)| record.offset == i && record.payload == message(i, 100).payload));
    log.close().unwrap();
    drop(log);
    // The active version-1 segment went on in version 1; the segments
    // rolled after the upgrade are version 2.
    let after = versions(&channel_dir);
    assert_eq!(&after[..before.len()], &before[..]);
    assert!(after.len() > before.len() && after[before.len()..].iter().all(|&v| v == 2), "{after:?}");
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
    let log = open_channel(dir.path(), small_config());
    assert_eq!(read_all(&log, 0).len(), 120);
}

#[test]
fn an_append_that_reached_the_disk_in_part_is_cut_back_to_the_start_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
    {
        let log = open_channel(dir.path(), config.clone());
        for batch in 0..4u64 {
            let messages: Vec<Message> = (batch * 3..batch * 3 + 3).map(|i| message(i, 100)).collect();
            log.append_batch(&messages).unwrap();
        }
        log.close().unwrap();
    }
    let path = segment_logs(&dir.path().join("channels").join("orders")).pop().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let last_records: usize = (9..12).map(|i| message(i, 100).encoded_len()).sum();
    // A power loss that kept the header and the first record of the last
    // batch, ending exactly at a record boundary: nothing looks torn, but
    // the batch is short by two records.
    let last_batch = bytes.len() - last_records - BATCH_HEADER_BYTES;
    std::fs::write(&path, &bytes[..last_batch + BATCH_HEADER_BYTES + message(9, 100).encoded_len()]).unwrap();
    let (verdict, problems) = check_verdict(dir.path());
    assert_eq!(verdict, Verdict::Repairable, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("the last batch stops at offset 10")), "{problems:?}");

    let log = open_channel(dir.path(), config);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last_batch as u64, "the whole batch is cut");
    assert_eq!(log.next_offset(), 9);
    assert_eq!(read_all(&log, 0).len(), 9);
    assert_eq!(log.append_batch(&[message(9, 100)]).unwrap().first_offset, 9);
    drop(log);
    assert_eq!(check_verdict(dir.path()), (Verdict::Clean, vec![]));
}

#[test]
fn check_reports_a_batch_whose_header_disagrees_with_its_records_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
    {
        let log = open_channel(dir.path(), config);
        for batch in 0..3u64 {
            let messages: Vec<Message> = (batch * 2..batch * 2 + 2).map(|i| message(i, 100)).collect();
            log.append_batch(&messages).unwrap();
        }
        log.close().unwrap();
    }
    // The first batch's header says 3 records (its CRC made right again, as
    // a buggy writer would): its records and the next header disagree.
    let path = segment_logs(&dir.path().join("channels").join("orders")).pop().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let header = 16;
    let count_at = header + weir::record::RECORD_OVERHEAD_BYTES + 8 + 8 + 1;
    bytes[count_at..count_at + 4].copy_from_slice(&3u32.to_be_bytes());
    let crc = crc32fast::hash(&bytes[header + 8..header + BATCH_HEADER_BYTES]);
    bytes[header + 4..header + 8].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (verdict, problems) = check_verdict(dir.path());
    assert_eq!(verdict, Verdict::Corrupt, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("names records up to offset 3, but they end at 2")), "{problems:?}");
}

#[test]
fn the_producers_of_the_active_segment_are_found_also_past_damage_recovery_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 1 << 30, ..small_config() };
    {
        let log = open_channel(dir.path(), config.clone());
        for i in 0..10u64 {
            let messages = [message(i, 100)];
            let batch = weir::storage::NewBatch { messages: &messages, producer: Some((i % 2, 100 + i)), raft: None };
            log.append_batches_at(&[batch], now_us()).unwrap();
        }
        log.close().unwrap();
    }
    let path = segment_logs(&dir.path().join("channels").join("orders")).pop().unwrap();
    // Inside record 3: damage followed by valid batches, kept by recovery.
    flip_byte_of_record(&path, message(3, 100).encoded_len(), 3);
    let log = open_channel(dir.path(), config);
    assert_eq!(log.next_offset(), 10);
    let mut seen = Vec::new();
    log.visit_active_batches(|first_offset, _, header| seen.push((first_offset, header.producer))).unwrap();
    let expected: Vec<(u64, Option<(u64, u64)>)> = (0..10).map(|i| (i, Some((i % 2, 100 + i)))).collect();
    assert_eq!(seen, expected);
}

/// A replicated log of `entries` batches (one record each, Raft positions
/// 1..=entries) in small segments, retention having removed its first
/// segment: a source for segment transfer.
fn replicated_source(dir: &Path, entries: u64) -> ChannelLog {
    let log = replicated_source_from_0(dir, entries);
    // Retention would keep the deduplication window: the first segment
    // goes by hand, as retention past the window would take it.
    let first = segment_logs(dir)[0].clone();
    drop(log);
    for extension in ["log", "index", "timeindex"] {
        let _ = std::fs::remove_file(first.with_extension(extension));
    }
    open(dir, LogConfig { segment_bytes: 2048, replicated: true, ..small_config() })
}

/// As [`replicated_source`], starting at offset 0.
fn replicated_source_from_0(dir: &Path, entries: u64) -> ChannelLog {
    let log = open(dir, LogConfig { segment_bytes: 2048, replicated: true, ..small_config() });
    for index in 1..=entries {
        let messages = [message(index, 40)];
        let raft = Some(weir::storage::RaftPosition { index, term: 2 });
        let batch = weir::storage::NewBatch { messages: &messages, producer: Some((9, index - 1)), raft };
        log.append_batches_at(&[batch], now_us()).unwrap();
    }
    log
}

/// Copies `source`'s segments into `target` in pieces of `chunk` bytes;
/// `damage` flips a byte of the copy first.
fn copy_segments(source: &ChannelLog, target: &ChannelLog, chunk: usize, damage: bool) -> Result<(), StorageError> {
    let mut transfer = target.begin_transfer()?;
    let copies = source.segments_to_copy(source.next_offset()).unwrap();
    for &copy in &copies {
        let mut position = 0;
        while position < copy.bytes {
            let mut bytes = source.read_segment_bytes(copy.base_offset, position, chunk).unwrap().to_vec();
            assert!(!bytes.is_empty());
            if damage && position == 0 && copy.bytes > 200 {
                bytes[150] ^= 0x40;
            }
            position += bytes.len() as u64;
            transfer.append(copy.base_offset, &bytes)?;
        }
    }
    let end = target.check_transfer(&mut transfer, &copies)?;
    assert_eq!((end.next_offset, end.last_raft_entry), (source.next_offset(), source.last_raft_entry()));
    target.adopt_transfer(transfer)
}

/// Copies `source`'s segments up to `up_to` into `target` whole.
fn copy_up_to(source: &ChannelLog, target: &ChannelLog, up_to: u64) {
    let copies = source.segments_to_copy(up_to).unwrap();
    let mut transfer = target.begin_transfer().unwrap();
    for copy in &copies {
        transfer
            .append(copy.base_offset, &source.read_segment_bytes(copy.base_offset, 0, copy.bytes as usize).unwrap())
            .unwrap();
    }
    target.check_transfer(&mut transfer, &copies).unwrap();
    target.adopt_transfer(transfer).unwrap();
}

/// Segment transfer: a log that holds nothing takes a copy of another
/// replica's segments, and then holds the same records at the same offsets
/// (its start where the source's is, not 0), the same last Raft entry, and
/// goes on from there; reopened, it is the same. A copy that does not
/// reach past a log is refused, and so is a copy with a flipped byte (the
/// target still holds nothing).
#[test]
fn a_segment_copy_fills_a_log_that_holds_nothing_and_only_when_it_reaches_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicated_source(&dir.path().join("source"), 200);
    assert!(source.start_offset() > 0);
    let config = LogConfig { segment_bytes: 2048, replicated: true, ..small_config() };

    let damaged_target = open(&dir.path().join("damaged"), config.clone());
    assert!(copy_segments(&source, &damaged_target, 1000, true).is_err(), "a damaged copy was adopted");
    assert_eq!((damaged_target.start_offset(), damaged_target.next_offset()), (0, 0));

    let target_dir = dir.path().join("target");
    let target = open(&target_dir, config.clone());
    copy_segments(&source, &target, 1000, false).unwrap();
    assert_eq!(target.start_offset(), source.start_offset());
    assert_eq!(target.next_offset(), source.next_offset());
    assert_eq!(target.last_raft_entry(), source.last_raft_entry());
    assert_eq!(read_all(&target, target.start_offset()), read_all(&source, source.start_offset()));
    assert!(!target_dir.join("segment-transfer").exists(), "the staging directory is left behind");
    let next = target.next_offset();
    let messages = [message(201, 40)];
    let raft = Some(weir::storage::RaftPosition { index: 201, term: 2 });
    let appended = target
        .append_batches_at(&[weir::storage::NewBatch { messages: &messages, producer: None, raft }], now_us())
        .unwrap();
    assert_eq!(appended.first_offset, next);
    let records = read_all(&target, target.start_offset());
    drop(target);
    let reopened = open(&target_dir, config.clone());
    assert_eq!(read_all(&reopened, reopened.start_offset()), records);

    let refused = copy_segments(&source, &reopened, 1000, false).unwrap_err();
    assert!(refused.to_string().contains("does not reach past"), "{refused}");
    assert_eq!(read_all(&reopened, reopened.start_offset()), records);

    // A source that starts at 0: its first segment replaces the target's
    // empty one, index files included.
    let from_0 = replicated_source_from_0(&dir.path().join("source-0"), 100);
    let target_0_dir = dir.path().join("target-0");
    let target_0 = open(&target_0_dir, config.clone());
    copy_segments(&from_0, &target_0, 700, false).unwrap();
    let expected = read_all(&from_0, 0);
    assert_eq!(read_all(&target_0, 0), expected);
    drop(target_0);
    assert_eq!(read_all(&open(&target_0_dir, config), 0), expected);
}

/// Segment transfer to a replica that holds records but fell behind: the
/// copy replaces its log whole. A log holding a prefix of the source (the
/// same segments, the last one shorter) ends up with the source's
/// segments, indexes included (reads by offset and by time agree); a log
/// whose records all come before the source's start (retention on the
/// source removed what lay between) ends up starting where the source
/// does. Reopened, both are the same; nothing of the replaced segments is
/// left in the directory.
#[test]
fn a_segment_copy_replaces_a_log_that_fell_behind() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicated_source(&dir.path().join("source"), 300);
    let config = LogConfig { segment_bytes: 2048, replicated: true, ..small_config() };
    let expected = read_all(&source, source.start_offset());

    // A prefix: the first copy ends mid-segment, 40 offsets before the
    // source's end.
    let prefix_dir = dir.path().join("prefix");
    let prefix = open(&prefix_dir, config.clone());
    let up_to = source.next_offset() - 40;
    copy_up_to(&source, &prefix, up_to);
    assert_eq!(prefix.next_offset(), up_to);
    copy_segments(&source, &prefix, 900, false).unwrap();
    assert_eq!((prefix.start_offset(), prefix.next_offset()), (source.start_offset(), source.next_offset()));
    assert_eq!(prefix.last_raft_entry(), source.last_raft_entry());
    assert_eq!(read_all(&prefix, prefix.start_offset()), expected);
    let middle = source.start_offset() + (source.next_offset() - source.start_offset()) / 2;
    assert_eq!(read_all(&prefix, middle), read_all(&source, middle));
    let middle_time = read_all(&source, middle)[0].timestamp_us;
    assert_eq!(prefix.offset_for_time(middle_time).unwrap(), source.offset_for_time(middle_time).unwrap());
    drop(prefix);
    let reopened = open(&prefix_dir, config.clone());
    assert_eq!(read_all(&reopened, reopened.start_offset()), expected);
    assert_eq!(segment_logs(&prefix_dir).len(), source.stats().segment_count as usize);

    // Behind the source's start: none of its own records is kept.
    let behind_dir = dir.path().join("behind");
    let behind = replicated_source_from_0(&behind_dir, 5);
    assert!(behind.next_offset() < source.start_offset());
    copy_segments(&source, &behind, 4096, false).unwrap();
    assert_eq!((behind.start_offset(), behind.next_offset()), (source.start_offset(), source.next_offset()));
    assert_eq!(read_all(&behind, behind.start_offset()), expected);
    drop(behind);
    let reopened = open(&behind_dir, config);
    assert_eq!(read_all(&reopened, reopened.start_offset()), expected);
    let names: Vec<String> = std::fs::read_dir(&behind_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|name| name.starts_with(&format!("{:020}.", 0))),
        "a replaced segment is left: {names:?}"
    );
    assert!(!names.iter().any(|name| name.contains("torn")), "a replaced segment was set aside: {names:?}");
}

/// A copy up to an offset ends exactly there, at a batch inside a
/// segment, with the batch header of the entry before it; an offset no
/// batch starts at, or one outside the log, is refused.
#[test]
fn a_segment_copy_up_to_an_offset_ends_at_that_batch() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicated_source(&dir.path().join("source"), 150);
    let up_to = source.next_offset() - 7;
    let copies = source.segments_to_copy(up_to).unwrap();
    let target =
        open(&dir.path().join("target"), LogConfig { segment_bytes: 2048, replicated: true, ..small_config() });
    let mut transfer = target.begin_transfer().unwrap();
    for copy in &copies {
        let bytes = source.read_segment_bytes(copy.base_offset, 0, copy.bytes as usize).unwrap();
        transfer.append(copy.base_offset, &bytes).unwrap();
    }
    let end = target.check_transfer(&mut transfer, &copies).unwrap();
    assert_eq!(end.next_offset, up_to);
    assert_eq!(
        end.last_raft_entry.map(|entry| entry.index),
        Some(up_to - source.start_offset() + first_index(&source) - 1)
    );
    target.adopt_transfer(transfer).unwrap();
    let expected: Vec<Record> =
        read_all(&source, source.start_offset()).into_iter().filter(|record| record.offset < up_to).collect();
    assert_eq!(read_all(&target, target.start_offset()), expected);
    assert!(source.segments_to_copy(source.next_offset() + 1).is_err());
    assert!(source.segments_to_copy(source.start_offset()).is_err());
}

/// The Raft index of the first batch `log` holds.
fn first_index(log: &ChannelLog) -> u64 {
    let mut first = None;
    log.visit_batches_after(0, |_, _, header| {
        first.get_or_insert(header.raft_index);
    })
    .unwrap();
    first.unwrap()
}

/// A copy a crash interrupted: without the marker that says it is whole,
/// the next open removes it and the log holds nothing; with it, the next
/// open finishes moving it in (whatever was moved already), and the log
/// holds the copy.
#[test]
fn a_segment_copy_cut_short_is_removed_at_open_and_one_marked_whole_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicated_source(&dir.path().join("source"), 120);
    let expected = read_all(&source, source.start_offset());
    let config = LogConfig { segment_bytes: 2048, replicated: true, ..small_config() };
    let copies = source.segments_to_copy(source.next_offset()).unwrap();
    assert!(copies.len() >= 3, "{copies:?}");
    let stage = |target_dir: &Path| {
        drop(open(target_dir, config.clone()));
        let staging = target_dir.join("segment-transfer");
        std::fs::create_dir(&staging).unwrap();
        for copy in &copies {
            let bytes = source.read_segment_bytes(copy.base_offset, 0, copy.bytes as usize).unwrap();
            std::fs::write(staging.join(format!("{:020}.log", copy.base_offset)), bytes).unwrap();
        }
        staging
    };

    let data_dir = dir.path().join("data");
    let cut_short = data_dir.join("channels").join("test");
    // Cut short while its marker was written: only the temporary file.
    std::fs::write(stage(&cut_short).join("complete.tmp"), [0u8; 7]).unwrap();
    // weir check says what the broker will do.
    let policies = weir::storage::check::FsyncPolicies::all(FsyncPolicy::Always);
    let report = weir::storage::check::check_data_dir(&data_dir, &policies).unwrap();
    assert_eq!(report.verdict(), Verdict::Repairable, "{:?}", report.problems);
    assert!(report.problems.iter().any(|problem| problem.what.contains("segment copy")), "{:?}", report.problems);
    let log = open(&cut_short, config.clone());
    assert_eq!((log.start_offset(), log.next_offset()), (0, 0));
    assert!(!cut_short.join("segment-transfer").exists());

    let marked = dir.path().join("marked");
    let staging = stage(&marked);
    let list: String = copies.iter().map(|copy| format!("{}\n", copy.base_offset)).collect();
    std::fs::write(staging.join("complete"), list).unwrap();
    // The crash came after the target's empty segment was removed and the
    // copy's first segment was moved in.
    std::fs::remove_file(marked.join(format!("{:020}.log", 0))).unwrap();
    let first = format!("{:020}.log", copies[0].base_offset);
    std::fs::rename(staging.join(&first), marked.join(&first)).unwrap();
    let log = open(&marked, config);
    assert_eq!(log.start_offset(), source.start_offset());
    assert_eq!(read_all(&log, log.start_offset()), expected);
    assert!(!marked.join("segment-transfer").exists());
}

/// A copy replacing a log that fell behind, interrupted by a crash:
/// without its marker, the next open removes the copy and the log is as it
/// was; with it, whatever step the crash came after (replaced segments
/// removed, a segment's log moved in but not its indexes), the next open
/// finishes the move and the log is the copy, its indexes the copy's.
#[test]
fn a_copy_replacing_a_log_is_undone_or_finished_at_open_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicated_source(&dir.path().join("source"), 200);
    let expected = read_all(&source, source.start_offset());
    let config = LogConfig { segment_bytes: 2048, replicated: true, ..small_config() };
    let copies = source.segments_to_copy(source.next_offset()).unwrap();
    assert!(copies.len() >= 3, "{copies:?}");
    // A log holding the source's first two segments, then the copy staged.
    let behind = |target_dir: &Path| {
        let log = open(target_dir, config.clone());
        copy_up_to(&source, &log, copies[2].base_offset);
        let held = read_all(&log, log.start_offset());
        drop(log);
        let staging = target_dir.join("segment-transfer");
        std::fs::create_dir(&staging).unwrap();
        for copy in &copies {
            let bytes = source.read_segment_bytes(copy.base_offset, 0, copy.bytes as usize).unwrap();
            std::fs::write(staging.join(format!("{:020}.log", copy.base_offset)), bytes).unwrap();
            // Indexes as the copy's check leaves them: empty ones, which
            // the open rebuilds; an index of the replaced log would not be.
            for extension in ["index", "timeindex"] {
                std::fs::write(staging.join(format!("{:020}.{extension}", copy.base_offset)), []).unwrap();
            }
        }
        (held, staging)
    };

    let unmarked = dir.path().join("unmarked");
    let (held, _) = behind(&unmarked);
    assert_eq!(held.last().unwrap().offset + 1, copies[2].base_offset);
    let log = open(&unmarked, config.clone());
    assert_eq!(read_all(&log, log.start_offset()), held);
    assert!(!unmarked.join("segment-transfer").exists());
    drop(log);

    let marked = dir.path().join("marked");
    let (_, staging) = behind(&marked);
    let list: String = copies.iter().map(|copy| format!("{}\n", copy.base_offset)).collect();
    std::fs::write(staging.join("complete"), list).unwrap();
    // The crash came after the first segment's log was moved in over the
    // replaced one (whose indexes were removed), before its indexes.
    let first = |extension: &str| format!("{:020}.{extension}", copies[0].base_offset);
    for extension in ["index", "timeindex"] {
        std::fs::remove_file(marked.join(first(extension))).unwrap();
    }
    std::fs::rename(staging.join(first("log")), marked.join(first("log"))).unwrap();
    let log = open(&marked, config);
    assert_eq!((log.start_offset(), log.next_offset()), (source.start_offset(), source.next_offset()));
    assert_eq!(read_all(&log, log.start_offset()), expected);
    let middle = copies[1].base_offset + 3;
    assert_eq!(read_all(&log, middle), read_all(&source, middle));
    assert!(!marked.join("segment-transfer").exists());
}

/// The command line writing into a pipe whose reader has gone (`weir check
/// DIR | head -0`) ends quietly with success, not with a panic (Rust's
/// `println!` panics on a closed pipe).
#[test]
fn the_cli_ends_quietly_when_its_output_pipe_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("channels")).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("check")
        .arg(dir.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(run.status.code(), Some(0), "{stderr}");
}
