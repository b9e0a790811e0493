//! Ten thousand channels (the default `max_channels`) on the real binary,
//! on 127.0.0.1: every one created and published to, the one after the
//! limit refused with `TooManyChannels`, LIST_CHANNELS answering for all of
//! them, a well-behaved client served throughout, resident memory under
//! the bound docs/OPERATIONS.md states, and a restart that opens them all.
//!
//! Each channel of one segment keeps one file open (its log; its indexes
//! live in memory until the segment is sealed): the test raises its soft
//! limit on open files to what that needs, for itself and the broker it
//! starts, and fails saying so if the hard limit is lower. The data
//! directory is on /dev/shm when there is one: the test is about limits and
//! memory, and 60,000 directory and file syncs on a real disk would only
//! add a minute.

#[path = "common/child.rs"]
mod child;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use child::{connect_when_up, resident_bytes, serve};
use weir::client::Connection;
use weir::protocol::{ChannelRetention, ErrorCode, Request, Response};
use weir::record::Message;

/// The default `max_channels`.
const CHANNELS: usize = 10_000;
/// Connections creating and publishing at once.
const WORKERS: usize = 8;
/// Files the broker holds open per channel of one partition and one
/// segment.
const FILES_PER_CHANNEL: u64 = 1;
/// The broker's resident memory bound for this test (docs/OPERATIONS.md,
/// "Memory"): 64 MiB for the process, plus 16 KiB per channel.
const RESIDENT_BYTES_MAX: u64 = 64 * 1024 * 1024 + CHANNELS as u64 * 16 * 1024;
/// Generous bound on any single step on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(300);

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn channel(i: usize) -> String {
    format!("ch-{i:05}")
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future).await.unwrap_or_else(|_| panic!("timed out after {LIMIT:?}: {what}"))
}

async fn connect(addr: &str, name: &str) -> Connection {
    connect_when_up(addr, name, LIMIT).await
}

/// LIST_CHANNELS names every channel, and every `step`th one is fetched back.
async fn assert_every_channel_served(connection: &Connection, step: usize) {
    match within("LIST_CHANNELS", connection.request(Request::ListChannels)).await.unwrap() {
        Response::Channels { channels } => assert_eq!(channels.len(), CHANNELS),
        other => panic!("expected CHANNELS, got {other:?}"),
    }
    for i in (0..CHANNELS).step_by(step) {
        match fetch_one(connection, channel(i)).await {
            Response::FetchResult { count: 1, .. } => {}
            other => panic!("fetching {}: {other:?}", channel(i)),
        }
    }
}

async fn fetch_one(connection: &Connection, channel: String) -> Response {
    let fetch = Request::Fetch { channel, partition: 0, offset: 0, max_messages: 10, max_bytes: 1 << 20 };
    within("FETCH", connection.request(fetch)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_channels_are_served_within_their_limits() {
    let needed = CHANNELS as u64 * FILES_PER_CHANNEL + 1024;
    let raised = rlimit::increase_nofile_limit(needed).unwrap_or(0);
    assert!(
        raised >= needed,
        "this test needs {needed} open files for the broker it starts (one per channel) and the hard limit \
         allows {raised}: raise it (`ulimit -Hn`)"
    );
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm).unwrap() } else { tempfile::tempdir().unwrap() };
    let data_dir = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "fsync = \"never\"\nmetrics_addr = \"\"\n").unwrap();
    let broker = serve(&config, &data_dir, &addr);
    let pid = broker.0.id();
    let watcher = connect(&addr, "watcher").await;

    // Every channel created and published to, from several connections.
    let created = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let addr = addr.clone();
        workers.push(tokio::spawn(async move {
            let connection = connect(&addr, &format!("worker-{worker}")).await;
            for i in (worker..CHANNELS).step_by(WORKERS) {
                let create = Request::CreateChannel {
                    channel: channel(i),
                    retention: ChannelRetention::default(),
                    partitions: Some(1),
                };
                let answer = within("CREATE_CHANNEL", connection.request(create)).await;
                assert_eq!(answer.unwrap(), Response::ChannelCreated, "creating {}", channel(i));
                let message = Message::from_payload(Bytes::from(channel(i)));
                let publish = Request::Publish { channel: channel(i), partition: None, producer: None, message };
                match within("PUBLISH", connection.request(publish)).await.unwrap() {
                    Response::PublishAck { first_offset: 0, .. } => {}
                    other => panic!("publishing to {}: {other:?}", channel(i)),
                }
            }
        }));
    }
    // A well-behaved client is served while the channels are created (at
    // least once, however fast the workers are).
    loop {
        assert!(matches!(
            within("the watcher's LIST_CHANNELS", watcher.request(Request::ListChannels)).await.unwrap(),
            Response::Channels { .. }
        ));
        if workers.iter().all(tokio::task::JoinHandle::is_finished) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let creation = created.elapsed();

    // The limit holds, and says so.
    let create = Request::CreateChannel {
        channel: "one-too-many".into(),
        retention: ChannelRetention::default(),
        partitions: None,
    };
    let refused = within("CREATE_CHANNEL past the limit", watcher.request(create)).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManyChannels), "{refused}");

    assert_every_channel_served(&watcher, 97).await;
    let files = open_files(pid);
    assert!(files >= CHANNELS * FILES_PER_CHANNEL as usize, "the broker holds {files} files open");
    let resident = resident_bytes(pid);
    eprintln!(
        "{CHANNELS} channels created and published to in {creation:?}; the broker holds {files} files open and \
         {} MiB resident",
        resident / (1024 * 1024)
    );
    assert!(
        resident <= RESIDENT_BYTES_MAX,
        "resident memory {resident} bytes is over the bound {RESIDENT_BYTES_MAX} for {CHANNELS} channels"
    );

    // A restart opens every channel again.
    drop(watcher);
    let mut broker = broker;
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let stopped = broker.0.wait().unwrap();
    assert!(stopped.success(), "weir serve exited with {stopped} on SIGTERM");
    drop(broker);
    let restarted = Instant::now();
    let broker = serve(&config, &data_dir, &addr);
    let watcher = connect(&addr, "watcher").await;
    let reopened = restarted.elapsed();
    assert_every_channel_served(&watcher, 101).await;
    eprintln!(
        "restarted with {CHANNELS} channels in {reopened:?}; {} MiB resident",
        resident_bytes(broker.0.id()) / (1024 * 1024)
    );
}
