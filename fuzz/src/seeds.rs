//! Seed inputs for every target: valid inputs made by weir's own
//! encoders, so that a fuzzer (or a property test that mutates them) starts
//! from inputs that get deep. One function per target, each in its
//! target's input format; `examples/seeds.rs` writes them as a corpus.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use weir::config::Config;
use weir::protocol::{
    ChannelInfo, ChannelRetention, ChannelStats, GroupInfo, GroupPartitionInfo, Limits, Notice, PartitionInfo,
    ProducerSequence, Request, Response, StartPosition, SubscriptionInfo, SubscriptionStats,
};
use weir::record::{Header, Message};
use weir::storage::fs::StdFileSystem;
use weir::storage::{ChannelLog, ChannelName, FsyncPolicy, LogConfig, RetentionPolicy};

use super::{flags, segment_case_bytes};

fn message(i: usize) -> Message {
    Message {
        key: Bytes::from(format!("key-{i}")),
        headers: vec![Header { name: Bytes::from_static(b"trace"), value: Bytes::from(i.to_string()) }],
        payload: Bytes::from(vec![b'a' + (i % 26) as u8; 10 + i]),
    }
}

fn records(count: usize, first_offset: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..count {
        weir::record::encode(&mut buf, first_offset + i as u64, 1_700_000_000_000_000 + i as u64, &message(i));
    }
    buf
}

fn requests() -> Vec<Request> {
    let channel = || "orders".to_owned();
    let producer = Some(ProducerSequence { producer_id: 7, sequence: 3 });
    vec![
        Request::Hello { version_min: 1, version_max: 2, client_name: "seed".into(), auth_token: Bytes::new() },
        Request::Ping,
        Request::Publish { channel: channel(), partition: Some(1), producer, message: message(1) },
        Request::PublishBatch {
            channel: channel(),
            partition: None,
            producer: None,
            messages: vec![message(2), message(3)],
        },
        Request::Subscribe {
            subscription_id: 1,
            channel: channel(),
            partition: None,
            start: StartPosition::Offset(5),
            durable_name: Some("billing".into()),
            group: Some("workers".into()),
            max_inflight: 100,
        },
        Request::Ack { subscription_id: 1, partition: 0, offset: 9 },
        Request::Unsubscribe { subscription_id: 1 },
        Request::Fetch { channel: channel(), partition: 0, offset: 0, max_messages: 10, max_bytes: 4096 },
        Request::CreateChannel {
            channel: channel(),
            retention: ChannelRetention { max_bytes: Some(1 << 20), max_age_secs: None, max_messages: Some(10) },
            partitions: Some(4),
        },
        Request::ListChannels,
        Request::Stats,
        Request::AlterChannel { channel: channel(), partitions: 8 },
        Request::ListGroups { channel: channel() },
        Request::DeleteChannel { channel: channel(), force: true },
    ]
}

fn responses() -> Vec<Response> {
    let limits = Limits {
        max_message_bytes: 1 << 20,
        max_frame_bytes: 8 << 20,
        max_batch_bytes: 8 << 20,
        max_batch_records: 10_000,
        max_inflight_publishes: 1024,
        max_inflight_publish_bytes: 64 << 20,
        max_inflight_deliveries: 4096,
        max_subscriptions_per_connection: 64,
        heartbeat_interval_ms: 10_000,
        idle_timeout_ms: 30_000,
    };
    let partition = PartitionInfo { start_offset: 0, next_offset: 10, size_bytes: 1000, segment_count: 1 };
    vec![
        Response::Welcome { version: 2, server_version: "0.1.0".into(), limits },
        Response::Pong,
        Response::PublishAck { partition: 1, first_offset: 4, count: 2, timestamp_us: 99, duplicate: false },
        Response::Error { code: 3, message: "no such channel".into() },
        Response::Subscribed { subscription_id: 1, partitions: vec![(0, 5), (1, 0)] },
        Response::Deliver { subscription_id: 1, partition: 0, count: 2, records: Bytes::from(records(2, 5)) },
        Response::Notice { subscription_id: 1, partition: 0, notice: Notice::Lag { lag: 10, next_offset: 20 } },
        Response::Notice {
            subscription_id: 1,
            partition: 2,
            notice: Notice::Assigned { generation: 3, first_offset: 8 },
        },
        Response::Unsubscribed { subscription_id: 1 },
        Response::FetchResult { next_offset: 7, count: 1, records: Bytes::from(records(1, 6)) },
        Response::ChannelCreated,
        Response::Channels {
            channels: vec![ChannelInfo {
                name: "orders".into(),
                partitions: vec![partition, partition],
                subscriptions: vec![SubscriptionInfo {
                    durable_name: "billing".into(),
                    group: String::new(),
                    partition: 0,
                    next_offset: 4,
                    acked_offset: Some(3),
                    lag: 6,
                }],
            }],
        },
        Response::Stats {
            counters: vec![("connections".into(), 2)],
            channels: vec![ChannelStats {
                name: "orders".into(),
                messages_appended: 10,
                bytes_appended: 1000,
                next_offset: 10,
                size_bytes: 1200,
                subscriptions: vec![SubscriptionStats {
                    durable_name: "billing".into(),
                    partition: 0,
                    lag: 1,
                    inflight: 2,
                }],
            }],
        },
        Response::ChannelAltered,
        Response::Groups {
            groups: vec![GroupInfo {
                channel: "orders".into(),
                name: "workers".into(),
                generation: 2,
                member_count: 1,
                partitions: vec![GroupPartitionInfo { partition: 0, owner: Some(1), committed: None, lag: 4 }],
            }],
        },
        Response::ChannelDeleted,
    ]
}

/// Each request and response alone, in both versions, then every request
/// of a version in one stream (a whole session).
pub fn frame() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (version, version_bit) in [(2u16, 0u8), (1, 1)] {
        let mut session = vec![version_bit];
        for (i, request) in requests().iter().enumerate() {
            let frame = request.encode_for(version, i as u32 + 1);
            seeds.push([&[version_bit][..], &frame].concat());
            session.extend_from_slice(&frame);
        }
        seeds.push(session);
        for (i, response) in responses().iter().enumerate() {
            seeds.push([&[version_bit | 2][..], &response.encode_for(version, i as u32 + 1)].concat());
        }
    }
    seeds
}

/// One record, three records, and an empty message with the CRC left to
/// the target.
pub fn record() -> Vec<Vec<u8>> {
    let empty = {
        let mut buf = Vec::new();
        weir::record::encode(&mut buf, 0, 0, &Message::default());
        buf
    };
    vec![[&[0u8][..], &records(1, 0)].concat(), [&[0u8][..], &records(3, 42)].concat(), [&[1u8][..], &empty].concat()]
}

/// Real segments written by `ChannelLog`, in the `SegmentCase` layout: one
/// segment whole, in format version 2 and in version 1; the same with a
/// torn tail; two segments with their indexes; records only, with the
/// header, CRCs and offsets left to the flags.
///
/// # Errors
/// The operating system's error, from writing the segments in a temporary
/// directory.
pub fn segment_recovery() -> std::io::Result<Vec<Vec<u8>>> {
    let temporary = tempfile::tempdir()?;
    let segments = temporary.path().join("v2");
    write_segments(&segments, weir::storage::index::FORMAT_VERSION_2)?;
    let v1_segments = temporary.path().join("v1");
    write_segments(&v1_segments, weir::storage::index::FORMAT_VERSION_1)?;
    let read = |path: &PathBuf| std::fs::read(path).unwrap_or_default();
    let v1_first: Vec<Vec<u8>> = ["log", "index", "timeindex"]
        .iter()
        .map(|extension| read(&v1_segments.join(format!("{:020}.{extension}", 0))))
        .collect();
    let files = |base: &str| -> Vec<Vec<u8>> {
        ["log", "index", "timeindex"]
            .iter()
            .map(|extension| read(&segments.join(format!("{base}.{extension}"))))
            .collect()
    };
    let mut bases: Vec<String> = std::fs::read_dir(&segments)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_suffix(".log").map(str::to_owned))
        .collect();
    bases.sort();
    let first = files(&bases[0]);
    let second = files(&bases[1]);
    let whole = segment_case_bytes(0, 4, 0, 0, &[&first[0], &first[1], &first[2]]);
    let whole_v1 = segment_case_bytes(0, 4, 0, 0, &[&v1_first[0], &v1_first[1], &v1_first[2]]);
    let torn_log = &first[0][..first[0].len() - 7];
    let torn = segment_case_bytes(0, 4, 0, 0, &[torn_log, &first[1], &first[2]]);
    let never = 2 << flags::FSYNC_SHIFT;
    let two = segment_case_bytes(
        flags::TWO_SEGMENTS | never,
        4,
        0,
        0,
        &[&first[0], &first[1], &first[2], &second[0], &second[1], &second[2]],
    );
    let body_only = records(5, 0);
    let from_flags = segment_case_bytes(
        flags::LOG_HEADER | flags::RENUMBER | flags::DERIVED_INDEXES | flags::TWO_SEGMENTS,
        0,
        0,
        0,
        &[&body_only, &[], &[], &body_only],
    );
    let batch_header_flags = flags::LOG_HEADER | flags::SEAL | flags::TWO_SEGMENTS;
    let batches = segment_case_bytes(batch_header_flags, 0x80, 0, 0, &[&batches(3, 0), &[], &[], &batches(2, 0)]);
    Ok(vec![whole, whole_v1, torn, two, from_flags, batches])
}

/// `count` batches of two records each from offset `first`, each after its
/// batch header (format version 2), without a file header.
fn batches(count: u64, first: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..count {
        let offset = first + 2 * i;
        let header = weir::record::BatchHeader {
            raft_index: i,
            term: 0,
            kind: weir::record::EntryKind::Data,
            count: 2,
            producer: (i % 2 == 1).then_some((7, 2 * i)),
        };
        weir::record::encode_batch_header(&mut buf, offset, i, &header);
        weir::record::encode(&mut buf, offset, i, &message(offset as usize));
        weir::record::encode(&mut buf, offset + 1, i, &message(offset as usize + 1));
    }
    buf
}

/// A log of at least two segments in format `version`, written by weir
/// into `dir`.
fn write_segments(dir: &Path, version: u16) -> std::io::Result<()> {
    let config = LogConfig {
        segment_bytes: 1024,
        format_version: version,
        index_interval_bytes: 64,
        fsync: FsyncPolicy::Never,
        retention: RetentionPolicy::default(),
        ..LogConfig::default()
    };
    let name = ChannelName::new("seed").map_err(std::io::Error::other)?;
    let log = ChannelLog::open(Arc::new(StdFileSystem), dir, name, config).map_err(std::io::Error::other)?;
    for i in 0..20 {
        log.append_batch(&[message(i)]).map_err(std::io::Error::other)?;
    }
    log.close().map_err(std::io::Error::other)
}

/// The repository's broker.toml, the default config as `to_toml` prints it,
/// and per-channel overrides.
pub fn config() -> Vec<Vec<u8>> {
    // Read at compile time, relative to this file, so that the path is the
    // same in the fuzz crate and in the root crate's tests.
    let broker_toml = include_bytes!("../../broker.toml").to_vec();
    let overrides = "fsync = \"interval\"\nretention_max_bytes = 1048576\n\n[channels.orders]\npartitions = 4\nfsync = \"never\"\nretention_max_age_secs = 3600\n";
    vec![broker_toml, Config::default().to_toml().into_bytes(), overrides.as_bytes().to_vec()]
}
