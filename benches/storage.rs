//! Storage engine throughput: appends of 256 B, 1 KiB and 5 KiB records in
//! batches of 1, 64 and 1024 under `fsync = "never"` and `"always"`, and
//! sequential reads of sealed segments written in batches of 1024 records
//! and one record per append.
//!
//! Run with `cargo bench --bench storage`; figures and the machine's own
//! limits are in docs/BENCHMARKS.md. Files go to a temporary directory on
//! the same file system as `target/` (set `WEIR_BENCH_DIR` to change it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use weir::record::Message;
use weir::storage::fs::StdFileSystem;
use weir::storage::{ChannelLog, ChannelName, FsyncPolicy, LogConfig, RetentionPolicy, now_us};

const RECORD_SIZES: [usize; 3] = [256, 1024, 5 * 1024];
const BATCH_SIZES: [usize; 3] = [1, 64, 1024];
/// Retention keeps the benchmark's disk use bounded.
const RETAINED_BYTES: u64 = 1 << 30;

fn bench_dir() -> tempfile::TempDir {
    let parent = std::env::var_os("WEIR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&parent).expect("create bench dir");
    tempfile::tempdir_in(parent).expect("temp dir")
}

fn open_log(dir: &std::path::Path, fsync: FsyncPolicy) -> ChannelLog {
    let config = LogConfig {
        fsync,
        retention: RetentionPolicy { max_bytes: Some(RETAINED_BYTES), ..RetentionPolicy::default() },
        ..LogConfig::default()
    };
    ChannelLog::open(Arc::new(StdFileSystem), dir, ChannelName::new("bench").expect("name"), config).expect("open log")
}

fn batch(record_bytes: usize, count: usize) -> Vec<Message> {
    let payload = Bytes::from(vec![0x5a; record_bytes]);
    (0..count).map(|_| Message::from_payload(payload.clone())).collect()
}

fn appends(c: &mut Criterion) {
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Always] {
        let mut group = c.benchmark_group(format!("append/fsync={fsync:?}").to_lowercase());
        group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
        for record_bytes in RECORD_SIZES {
            for batch_size in BATCH_SIZES {
                let dir = bench_dir();
                let log = open_log(dir.path(), fsync);
                let messages = batch(record_bytes, batch_size);
                group.throughput(Throughput::Bytes((record_bytes * batch_size) as u64));
                let id = BenchmarkId::new(format!("{record_bytes}B"), format!("batch{batch_size}"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iterations| {
                        let mut elapsed = Duration::ZERO;
                        for _ in 0..iterations {
                            let start = Instant::now();
                            log.append_batch(&messages).expect("append");
                            elapsed += start.elapsed();
                            if log.stats().size_bytes > 2 * RETAINED_BYTES {
                                log.apply_retention(now_us()).expect("retention");
                            }
                        }
                        elapsed
                    });
                });
            }
        }
        group.finish();
    }
}

fn sequential_reads(c: &mut Criterion) {
    read_gigabyte(c, "sequential_1GiB_1KiB_records", 1024);
}

/// The same gigabyte of 1 KiB records, appended one per append (one batch
/// header each, in segment format 2): the read path's worst case, where a
/// read of 1 MiB returns about a thousand slices.
fn sequential_reads_one_record_per_append(c: &mut Criterion) {
    read_gigabyte(c, "sequential_1GiB_1KiB_records_one_per_append", 1);
}

/// Reads 1 GiB of 1 KiB records, appended `per_append` at a time (eight
/// sealed 128 MiB segments), 1 MiB per read.
fn read_gigabyte(c: &mut Criterion, name: &str, per_append: usize) {
    let dir = bench_dir();
    let log = open_log(dir.path(), FsyncPolicy::Never);
    let messages = batch(1024, per_append);
    while log.stats().size_bytes < (1 << 30) {
        log.append_batch(&messages).expect("append");
    }
    let next = log.next_offset();
    let total_bytes = log.stats().size_bytes;
    let mut group = c.benchmark_group("read");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(total_bytes));
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut offset = 0;
            let mut bytes = 0usize;
            while offset < next {
                let read = log.read(offset, 1 << 20).expect("read");
                bytes += read.records.len();
                offset = read.next_offset;
            }
            bytes
        });
    });
    group.finish();
}

criterion_group!(benches, appends, sequential_reads, sequential_reads_one_record_per_append);
criterion_main!(benches);
