//! The broker over real TCP when its storage fails: a full disk, a damaged
//! record, a directory that can no longer be written. Each test checks what
//! the client is told, what it can still do, and what the operator sees.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use weir::client::{ClientError, Connection, Event, SubscribeOptions, Subscriber};
use weir::protocol::{ErrorCode, Request, Response, StartPosition};
use weir::record::{Message, Record};
use weir::server;
use weir::server::Stats;
use weir::storage::fs::StdFileSystem;
use weir::storage::{ChannelLog, ChannelName, LogConfig, RetentionPolicy};

mod common;
use common::full_disk::FullDisk;
use common::{addr, stop, test_config, within};

/// Everything the brokers of this test binary log, for the tests that
/// check what an operator sees.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || LogSink(Arc::clone(&sink))).finish();
        tracing::subscriber::set_global_default(subscriber).expect("one log subscriber per test binary");
        logs
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn message(i: u64) -> Message {
    Message::from_payload(format!("message {i}"))
}

async fn publish(connection: &Connection, channel: &str, i: u64) -> Result<Response, ClientError> {
    within(
        "a publish answer",
        connection.request(Request::Publish {
            channel: channel.into(),
            partition: None,
            producer: None,
            message: message(i),
        }),
    )
    .await
}

fn server_code(result: &Result<Response, ClientError>) -> Option<ErrorCode> {
    match result {
        Err(error) => error.code(),
        Ok(_) => None,
    }
}

async fn next_record(subscriber: &mut Subscriber) -> Result<Record, ClientError> {
    loop {
        match within("a delivery", subscriber.next()).await {
            Some(Ok(Event::Message { partition, record })) => {
                assert_eq!(partition, 0, "every channel here has one partition");
                return Ok(record);
            }
            Some(Ok(Event::Notice { .. })) => continue,
            Some(Err(error)) => return Err(error),
            None => panic!("the subscription ended without an error"),
        }
    }
}

#[tokio::test]
async fn a_full_disk_is_answered_with_storage_full_reads_go_on_and_appends_resume_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FullDisk::default();
    let server = within("start", server::start_with_fs(test_config(&dir), Arc::new(disk.clone()))).await.unwrap();
    let connection = Connection::connect(&addr(&server), "full-disk").await.unwrap();
    for i in 0..10 {
        publish(&connection, "orders", i).await.expect("stored while there is space");
    }

    disk.set_full(true);
    for i in 10..20 {
        let refused = publish(&connection, "orders", i).await;
        assert_eq!(server_code(&refused), Some(ErrorCode::StorageFull), "{refused:?}");
    }
    assert!(Stats::get(&server.stats().publishes_rejected_storage_full) >= 10);
    // Reads are served while the disk is full.
    let mut subscriber = Subscriber::subscribe(&connection, "orders", SubscribeOptions::default()).await.unwrap();
    for offset in 0..10 {
        assert_eq!(next_record(&mut subscriber).await.unwrap().offset, offset);
    }

    disk.set_full(false);
    // Appends resume by themselves: the first publish after the retry
    // interval probes the disk; no restart, nothing to reset.
    let stored = within("appends to resume", async {
        loop {
            match publish(&connection, "orders", 10).await {
                Ok(Response::PublishAck { first_offset, .. }) => break first_offset,
                refused if server_code(&refused) == Some(ErrorCode::StorageFull) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("expected an ack or StorageFull, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(stored, 10, "the refused publishes used no offsets");
    let record = next_record(&mut subscriber).await.unwrap();
    assert_eq!((record.offset, record.payload.as_ref()), (10, b"message 10".as_ref()));
    stop(server).await;
}

/// A channel of 20 records whose record 12 has a flipped byte.
fn channel_with_a_damaged_record(data_dir: &Path) {
    let config = LogConfig { retention: RetentionPolicy::default(), ..LogConfig::default() };
    let channel_dir = data_dir.join("channels").join("orders");
    let log =
        ChannelLog::open(Arc::new(StdFileSystem), &channel_dir, ChannelName::new("orders").unwrap(), config).unwrap();
    let mut positions = Vec::new();
    for i in 0..20 {
        // Each append is one batch: its header, then its record.
        let batch_headers = (i as usize + 1) * weir::record::BATCH_HEADER_BYTES;
        positions.push(16 + batch_headers + (0..i).map(|j| message(j).encoded_len()).sum::<usize>());
        log.append_batch(&[message(i)]).unwrap();
    }
    log.close().unwrap();
    let path = channel_dir.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[positions[12] + 30] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
}

#[tokio::test]
async fn a_damaged_record_is_delivered_around_never_through() {
    let dir = tempfile::tempdir().unwrap();
    channel_with_a_damaged_record(dir.path());
    let server = common::start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "damage").await.unwrap();

    // A subscriber gets every good record before the damage, then an error
    // that names the record and where reading can go on.
    let mut subscriber = Subscriber::subscribe(&connection, "orders", SubscribeOptions::default()).await.unwrap();
    for offset in 0..12 {
        assert_eq!(next_record(&mut subscriber).await.unwrap().offset, offset);
    }
    let error = next_record(&mut subscriber).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::StorageError), "{error}");
    let text = error.to_string();
    assert!(text.contains("offset 12 is unreadable") && text.contains("from offset 13 on are readable"), "{text}");

    // The broker ended that subscription: its id is free, and an
    // UNSUBSCRIBE of it is answered UnknownSubscription, not a second
    // UNSUBSCRIBED.
    let again = within("UNSUBSCRIBE", connection.request(Request::Unsubscribe { subscription_id: 1 })).await;
    assert_eq!(again.unwrap_err().code(), Some(ErrorCode::UnknownSubscription));

    // The documented way past it: start after it.
    let options = SubscribeOptions { start: StartPosition::Offset(13), ..SubscribeOptions::default() };
    let mut past = Subscriber::subscribe(&connection, "orders", options).await.unwrap();
    for offset in 13..20 {
        assert_eq!(next_record(&mut past).await.unwrap().offset, offset);
    }

    // FETCH likewise: the good records first, then the error.
    let fetch = |offset| Request::Fetch {
        channel: "orders".into(),
        partition: 0,
        offset,
        max_messages: 100,
        max_bytes: 1 << 20,
    };
    match within("FETCH", connection.request(fetch(0))).await.unwrap() {
        Response::FetchResult { next_offset, count, .. } => assert_eq!((next_offset, count), (12, 12)),
        other => panic!("expected FETCH_RESULT, got {other:?}"),
    }
    let refused = within("FETCH", connection.request(fetch(12))).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::StorageError));

    // Nothing was cut: new messages get new offsets.
    match publish(&connection, "orders", 20).await.unwrap() {
        Response::PublishAck { first_offset, .. } => assert_eq!(first_offset, 20),
        other => panic!("expected PUBLISH_ACK, got {other:?}"),
    }
    stop(server).await;
}

#[tokio::test]
async fn a_storage_error_answered_to_a_client_is_logged_for_the_operator() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let disk = FullDisk::default();
    let server = within("start", server::start_with_fs(test_config(&dir), Arc::new(disk.clone()))).await.unwrap();
    let connection = Connection::connect(&addr(&server), "read-only").await.unwrap();
    disk.set_read_only(true);
    let refused = publish(&connection, "fresh", 0).await;
    assert_eq!(server_code(&refused), Some(ErrorCode::StorageError), "{refused:?}");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.lines().any(|line| line.contains("ERROR") && line.contains("storage error") && line.contains("fresh")),
        "{logged}"
    );
    stop(server).await;
}

#[tokio::test]
async fn a_channel_that_cannot_be_opened_is_refused_while_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 4096, retention: RetentionPolicy::default(), ..LogConfig::default() };
    for name in ["good", "bad"] {
        let channel_dir = dir.path().join("channels").join(name);
        let log =
            ChannelLog::open(Arc::new(StdFileSystem), &channel_dir, ChannelName::new(name).unwrap(), config.clone())
                .unwrap();
        for i in 0..200 {
            log.append_batch(&[message(i)]).unwrap();
        }
        log.close().unwrap();
    }
    // The header of the oldest sealed segment of "bad" is damaged: recovery
    // cannot trust anything in it (bad bytes at its end would be kept as
    // damage instead, the channel served).
    let first = dir.path().join("channels").join("bad").join("00000000000000000000.log");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&first, &bytes).unwrap();

    let server = common::start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "unavailable").await.unwrap();
    let fetch = common::fetch_from_start;
    match within("FETCH good", connection.request(fetch("good"))).await.unwrap() {
        Response::FetchResult { count, .. } => assert_eq!(count, 10),
        other => panic!("expected FETCH_RESULT, got {other:?}"),
    }
    let refused = within("FETCH bad", connection.request(fetch("bad"))).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::StorageError));
    assert!(refused.to_string().contains("channel bad is unavailable"), "{refused}");
    let refused = publish(&connection, "bad", 200).await;
    assert_eq!(server_code(&refused), Some(ErrorCode::StorageError), "{refused:?}");
    match publish(&connection, "good", 200).await.unwrap() {
        Response::PublishAck { first_offset, .. } => assert_eq!(first_offset, 200),
        other => panic!("expected PUBLISH_ACK, got {other:?}"),
    }
    stop(server).await;
}
