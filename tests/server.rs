//! Black-box tests of the broker server: a real server on 127.0.0.1 with a
//! temporary data directory, driven through the Rust client or through raw
//! sockets speaking the protocol's codecs.
//!
//! Nothing here waits for time to pass: every await that could hang is
//! bounded by [`LIMIT`] so that a hang fails instead of blocking, and the
//! server's own timeouts (idle, frame) are set short where a test needs them
//! to fire.

use std::collections::{BTreeMap, HashSet};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::client::{
    ClientError, Connection, Event, Publisher, PublisherOptions, Receipt, SubscribeOptions, Subscriber,
};
use weir::config::Config;
use weir::protocol::{
    ChannelInfo, ErrorCode, FrameType, PROTOCOL_VERSION, ProducerSequence, Request, Response, StartPosition,
};
use weir::record::RecordIter;
use weir::record::{Header, Message, Record};
use weir::server::Stats;
use weir::storage::FsyncPolicy;

mod common;
use common::raw::*;
use common::{LIMIT, addr, start, stop, test_config, within};

// ---------------------------------------------------------------------------
// Messages

fn message(i: u64) -> Message {
    Message {
        key: Bytes::from(format!("key-{i}")),
        headers: vec![Header { name: Bytes::from_static(b"index"), value: Bytes::from(i.to_string()) }],
        payload: Bytes::from(format!("payload-{i}")),
    }
}

fn assert_record_is(record: &Record, offset: u64, expected: &Message) {
    assert_eq!(record.offset, offset, "offset");
    assert_eq!(record.key, expected.key, "key of offset {offset}");
    assert_eq!(record.headers, expected.headers, "headers of offset {offset}");
    assert_eq!(record.payload, expected.payload, "payload of offset {offset}");
}

fn publish_request(channel: &str, producer: Option<ProducerSequence>, payload: impl Into<Bytes>) -> Request {
    Request::Publish { channel: channel.into(), partition: None, producer, message: Message::from_payload(payload) }
}

// ---------------------------------------------------------------------------
// Client helpers

/// The next message of a subscription (notices are skipped). Every
/// channel here has the default single partition, 0.
async fn next_record(subscriber: &mut Subscriber) -> Record {
    loop {
        match within("a delivery", subscriber.next()).await {
            Some(Ok(Event::Message { partition, record })) => {
                assert_eq!(partition, 0, "a message of offset {} from partition {partition}", record.offset);
                return record;
            }
            Some(Ok(Event::Notice { .. })) => continue,
            Some(Err(error)) => panic!("the subscription failed: {error}"),
            None => panic!("the subscription ended"),
        }
    }
}

async fn channel_info(connection: &Connection, channel: &str) -> ChannelInfo {
    match within("CHANNELS", connection.request(Request::ListChannels)).await.expect("LIST_CHANNELS answered") {
        Response::Channels { channels } => {
            channels.into_iter().find(|c| c.name == channel).unwrap_or_else(|| panic!("no channel {channel}"))
        }
        other => panic!("expected CHANNELS, got {other:?}"),
    }
}

async fn ping(connection: &Connection) {
    let pong = within("PONG", connection.request(Request::Ping)).await.expect("PING answered");
    assert_eq!(pong, Response::Pong);
}

// ---------------------------------------------------------------------------
// Raw-socket helpers: tests/common/raw.rs

fn fetch_records(response: &Response) -> Vec<Record> {
    match response {
        Response::FetchResult { count, records, .. } => {
            let records: Vec<Record> = RecordIter::new(records.clone()).map(|r| r.expect("an intact record")).collect();
            assert_eq!(records.len(), *count as usize, "FETCH_RESULT count");
            records
        }
        other => panic!("expected FETCH_RESULT, got {other:?}"),
    }
}

fn channel_of(response: &Response, channel: &str) -> ChannelInfo {
    match response {
        Response::Channels { channels } => {
            channels.iter().find(|c| c.name == channel).cloned().unwrap_or_else(|| panic!("no channel {channel}"))
        }
        other => panic!("expected CHANNELS, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_round_trip() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let addr = addr(&server);

    let publisher =
        within("publisher", Publisher::connect(&addr, "orders", PublisherOptions::default())).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..100 {
        pending.push(within("enqueue", publisher.enqueue(message(i))).await.expect("queued"));
    }
    let mut receipts: Vec<Receipt> = Vec::new();
    for (i, receipt) in pending.into_iter().enumerate() {
        let receipt = within("a receipt", receipt).await.expect("answered").expect("stored");
        assert_eq!(receipt.offset, i as u64, "receipts are dense and in publish order");
        assert!(!receipt.duplicate);
        receipts.push(receipt);
    }

    let connection = within("connect", Connection::connect(&addr, "round-trip")).await.unwrap();
    let mut subscriber =
        within("subscribe", Subscriber::subscribe(&connection, "orders", SubscribeOptions::default())).await.unwrap();
    assert_eq!(subscriber.first_offset(), 0);
    for i in 0..100u64 {
        let record = next_record(&mut subscriber).await;
        assert_record_is(&record, i, &message(i));
        assert_eq!(record.timestamp_us, receipts[i as usize].timestamp_us, "timestamp of offset {i}");
    }
    assert_eq!(channel_info(&connection, "orders").await.partitions[0].next_offset, 100);

    within("publisher close", publisher.close()).await;
    drop(subscriber);
    drop(connection);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_offset_and_from_a_time() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let addr = addr(&server);
    let publisher =
        within("publisher", Publisher::connect(&addr, "replay", PublisherOptions::default())).await.unwrap();
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(within("publish", publisher.publish(message(i))).await.expect("stored"));
    }
    let connection = within("connect", Connection::connect(&addr, "replay")).await.unwrap();

    // From an offset.
    let options = SubscribeOptions { start: StartPosition::Offset(3), ..SubscribeOptions::default() };
    let mut from_offset = within("subscribe", Subscriber::subscribe(&connection, "replay", options)).await.unwrap();
    assert_eq!(from_offset.first_offset(), 3);
    for offset in 3..10 {
        assert_record_is(&next_record(&mut from_offset).await, offset, &message(offset));
    }

    // From a time: the first message whose timestamp is at or after it.
    // Timestamps never decrease, so it is the first receipt at or after T.
    let time_us = receipts[5].timestamp_us;
    let expected_first = receipts.iter().position(|r| r.timestamp_us >= time_us).unwrap() as u64;
    assert!(expected_first <= 5);
    let options = SubscribeOptions { start: StartPosition::TimeUs(time_us), ..SubscribeOptions::default() };
    let mut from_time = within("subscribe", Subscriber::subscribe(&connection, "replay", options)).await.unwrap();
    assert_eq!(from_time.first_offset(), expected_first);
    for offset in expected_first..10 {
        let record = next_record(&mut from_time).await;
        assert_record_is(&record, offset, &message(offset));
        assert!(record.timestamp_us >= time_us);
    }

    // A time after every message starts at the channel's end.
    let after_all = receipts[9].timestamp_us + 1;
    let options = SubscribeOptions { start: StartPosition::TimeUs(after_all), ..SubscribeOptions::default() };
    let at_end = within("subscribe", Subscriber::subscribe(&connection, "replay", options)).await.unwrap();
    assert_eq!(at_end.first_offset(), 10);

    // The next offset itself is a valid start; one beyond it is not.
    let options = SubscribeOptions { start: StartPosition::Offset(10), ..SubscribeOptions::default() };
    let at_next = within("subscribe", Subscriber::subscribe(&connection, "replay", options)).await.unwrap();
    assert_eq!(at_next.first_offset(), 10);
    let options = SubscribeOptions { start: StartPosition::Offset(11), ..SubscribeOptions::default() };
    let Err(error) = within("subscribe", Subscriber::subscribe(&connection, "replay", options)).await else {
        panic!("a subscription one past the next offset was accepted");
    };
    assert!(matches!(error, ClientError::Server { .. }), "{error:?}");
    assert_eq!(error.code(), Some(ErrorCode::OffsetOutOfRange), "{error}");
    // The refusal does not close the connection.
    ping(&connection).await;

    within("publisher close", publisher.close()).await;
    drop((from_offset, from_time, at_end, at_next, connection));
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_subscription_resumes_after_a_broker_restart() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let addr = addr(&server);
    let publisher =
        within("publisher", Publisher::connect(&addr, "billing", PublisherOptions::default())).await.unwrap();
    for i in 0..10 {
        within("publish", publisher.publish(message(i))).await.expect("stored");
    }
    within("publisher close", publisher.close()).await;

    let durable = || SubscribeOptions { durable_name: Some("invoicer".into()), ..SubscribeOptions::default() };
    let connection = within("connect", Connection::connect(&addr, "durable")).await.unwrap();
    let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, "billing", durable())).await.unwrap();
    assert_eq!(subscriber.first_offset(), 0);
    for offset in 0..=5 {
        assert_record_is(&next_record(&mut subscriber).await, offset, &message(offset));
        within("ack", subscriber.ack(offset)).await.expect("ack sent");
    }
    // ACK has no answer; requests on a connection are processed in order,
    // so once this PING is answered the acks have been processed.
    ping(&connection).await;
    let info = channel_info(&connection, "billing").await;
    assert_eq!(info.subscriptions.len(), 1);
    assert_eq!(info.subscriptions[0].durable_name, "invoicer");
    assert_eq!(info.subscriptions[0].acked_offset, Some(5), "the broker counted the acks: {info:?}");

    drop(subscriber);
    drop(connection);
    stop(server).await;

    let server = start(test_config(&dir)).await;
    let addr = self::addr(&server);
    let connection = within("connect", Connection::connect(&addr, "durable-again")).await.unwrap();
    let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, "billing", durable())).await.unwrap();
    assert_eq!(subscriber.first_offset(), 6, "an ack of offset 5 resumes at 6");
    for offset in 6..10 {
        assert_record_is(&next_record(&mut subscriber).await, offset, &message(offset));
    }
    drop(subscriber);
    drop(connection);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 4

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_publish_is_rejected_and_connection_stays_usable() {
    let dir = TempDir::new().unwrap();
    let config = Config { max_message_bytes: 1024, max_batch_bytes: 1024, ..test_config(&dir) };
    let server = start(config).await;
    let mut stream = handshake(&addr(&server)).await;

    // One byte over: the frame fits, the message does not.
    let response = request(&mut stream, 2, publish_request("big", None, vec![1u8; 1025])).await;
    let message = expect_error(&response, ErrorCode::MessageTooLarge);
    assert!(message.contains("max_message_bytes = 1024"), "the error names the limit: {message}");

    // Exactly at the limit: stored.
    let response = request(&mut stream, 3, publish_request("big", None, vec![2u8; 1024])).await;
    assert!(
        matches!(response, Response::PublishAck { first_offset: 0, count: 1, duplicate: false, .. }),
        "{response:?}"
    );

    // A body far above the frame limit: drained unread and refused.
    let response = request(&mut stream, 4, publish_request("big", None, vec![3u8; 100 * 1024])).await;
    let message = expect_error(&response, ErrorCode::MessageTooLarge);
    assert!(message.contains("max_message_bytes = 1024"), "the error names the limit: {message}");

    // A PUBLISH_BATCH above max_batch_bytes: drained unread and refused.
    let batch = Request::PublishBatch {
        channel: "big".into(),
        partition: None,
        producer: None,
        messages: vec![Message::from_payload(vec![4u8; 600]), Message::from_payload(vec![5u8; 600])],
    };
    let response = request(&mut stream, 7, batch).await;
    let message = expect_error(&response, ErrorCode::BatchTooLarge);
    assert!(message.contains("max_batch_bytes = 1024"), "the error names the limit: {message}");

    // The connection is still in step.
    assert_eq!(request(&mut stream, 5, Request::Ping).await, Response::Pong);
    let fetch = Request::Fetch { channel: "big".into(), partition: 0, offset: 0, max_messages: 10, max_bytes: 1 << 20 };
    let records = fetch_records(&request(&mut stream, 6, fetch).await);
    assert_eq!(records.len(), 1, "only the message at the limit was stored");
    assert_eq!(records[0].payload, vec![2u8; 1024]);
    assert_eq!(Stats::get(&server.stats().publishes_rejected_too_large), 3);

    drop(stream);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_above_the_hard_cap_or_unknown_type_gets_protocol_error_and_close() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let addr = addr(&server);

    // An unknown frame type with a small body.
    let mut stream = handshake(&addr).await;
    let mut frame = raw_header(3, 0x7f, 9);
    frame.extend_from_slice(&[1, 2, 3]);
    write(&mut stream, &frame).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 9);
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains("0x7f"), "{message}");
    expect_closed(&mut stream).await;

    // A PUBLISH header announcing a body above the 1 GiB hard cap: refused
    // from the header alone, not drained.
    let mut stream = handshake(&addr).await;
    let body_len = (1u32 << 30) + 1;
    write(&mut stream, &raw_header(body_len, FrameType::Publish as u8, 10)).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 10);
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains(&body_len.to_string()), "{message}");
    expect_closed(&mut stream).await;

    // A control frame above its 4096-byte limit.
    let mut stream = handshake(&addr).await;
    write(&mut stream, &raw_header(4097, FrameType::Ping as u8, 11)).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 11);
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains("4096"), "{message}");
    expect_closed(&mut stream).await;

    // Anything but HELLO first.
    let mut stream = connect_raw(&addr).await;
    write(&mut stream, &Request::Ping.encode(3)).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 3);
    expect_error(&response, ErrorCode::HandshakeRequired);
    expect_closed(&mut stream).await;

    // A HELLO for versions this server does not speak.
    let mut stream = connect_raw(&addr).await;
    write(&mut stream, &hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2).encode(4)).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 4);
    let message = expect_error(&response, ErrorCode::UnsupportedVersion);
    assert!(message.contains("1..=2"), "{message}");
    expect_closed(&mut stream).await;

    assert_eq!(Stats::get(&server.stats().protocol_errors), 3);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 6

/// Name of the fuzz test's runtime threads, so its panic hook counts only
/// panics of that server's tasks.
const FUZZ_THREAD_NAME: &str = "weir-fuzz-server";
static FUZZ_SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn valid_publish_frame() -> Vec<u8> {
    let message = Message {
        key: Bytes::from_static(b"fuzz-key"),
        headers: vec![Header { name: Bytes::from_static(b"h"), value: Bytes::from_static(b"value") }],
        payload: Bytes::from_static(b"a payload of some thirty bytes"),
    };
    let producer = Some(ProducerSequence { producer_id: 42, sequence: 0 });
    // Every optional field present (producer and, version 2, partition), so
    // that mutations reach each of them.
    Request::Publish { channel: "fuzz".into(), partition: Some(0), producer, message }.encode(2)
}

/// (skip the HELLO, bytes to send after it)
fn fuzz_input() -> impl Strategy<Value = (bool, Vec<u8>)> {
    let frame = valid_publish_frame();
    let len = frame.len();
    let mutated_from = frame.clone();
    let truncated_from = frame.clone();
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec((0..len, any::<u8>()), 1..8).prop_map(move |edits| {
            let mut frame = mutated_from.clone();
            for (index, byte) in edits {
                frame[index] = byte;
            }
            frame
        }),
        (1..len).prop_map(move |cut| truncated_from[..cut].to_vec()),
        // A valid frame followed by garbage.
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(move |tail| {
            let mut bytes = frame.clone();
            bytes.extend_from_slice(&tail);
            bytes
        }),
    ];
    (proptest::bool::weighted(0.1), bytes)
}

/// Sends HELLO (unless skipped) and `bytes`, half-closes, and reads until
/// the server closes: by then the server has dealt with every byte.
async fn send_garbage(addr: &str, skip_hello: bool, bytes: &[u8]) {
    let mut stream = connect_raw(addr).await;
    let mut out = if skip_hello { Vec::new() } else { hello(PROTOCOL_VERSION, PROTOCOL_VERSION).encode(1) };
    out.extend_from_slice(bytes);
    // The server may close early (a protocol error), failing these writes.
    let _ = within("a write", stream.write_all(&out)).await;
    let _ = within("a shutdown", stream.shutdown()).await;
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        match within("the server to close a fuzzed connection", stream.read(&mut sink)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
fn random_bytes_and_mutated_frames_never_crash_the_server() {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(FUZZ_THREAD_NAME) {
            FUZZ_SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous_hook(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(FUZZ_THREAD_NAME)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new().unwrap();
    let config = Config {
        frame_timeout_ms: 200,
        heartbeat_interval_ms: 100,
        idle_timeout_ms: 1000,
        segment_bytes: 64 * 1024,
        ..test_config(&dir)
    };
    let server = runtime.block_on(start(config));
    let addr = addr(&server);

    let mut runner =
        TestRunner::new(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() });
    runner
        .run(&fuzz_input(), |(skip_hello, bytes)| {
            // Counted per case, so that shrinking finds the input that panics.
            let panics_before = FUZZ_SERVER_PANICS.load(Ordering::SeqCst);
            runtime.block_on(send_garbage(&addr, skip_hello, &bytes));
            let panics = FUZZ_SERVER_PANICS.load(Ordering::SeqCst) - panics_before;
            prop_assert_eq!(panics, 0, "a server task panicked on this input");
            Ok(())
        })
        .unwrap();

    runtime.block_on(async {
        let publisher =
            within("publisher", Publisher::connect(&addr, "fuzz", PublisherOptions::default())).await.unwrap();
        let receipt = within("publish", publisher.publish(message(7))).await.expect("stored after the fuzzing");
        let connection = within("connect", Connection::connect(&addr, "after-fuzz")).await.unwrap();
        let options = SubscribeOptions { start: StartPosition::Offset(receipt.offset), ..SubscribeOptions::default() };
        let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, "fuzz", options)).await.unwrap();
        assert_record_is(&next_record(&mut subscriber).await, receipt.offset, &message(7));
        within("publisher close", publisher.close()).await;
        drop(subscriber);
        drop(connection);
        stop(server).await;
    });
    assert_eq!(FUZZ_SERVER_PANICS.load(Ordering::SeqCst), 0, "a server task panicked");
}

// ---------------------------------------------------------------------------
// 7

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_window_is_never_exceeded() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let addr = addr(&server);
    let connection = within("connect", Connection::connect(&addr, "window")).await.unwrap();
    let options = SubscribeOptions { max_inflight: 10, ..SubscribeOptions::default() };
    let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, "window", options)).await.unwrap();

    let publisher =
        within("publisher", Publisher::connect(&addr, "window", PublisherOptions::default())).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..100 {
        pending.push(within("enqueue", publisher.enqueue(message(i))).await.expect("queued"));
    }
    for receipt in pending {
        within("a receipt", receipt).await.expect("answered").expect("stored");
    }

    for offset in 0..10 {
        assert_record_is(&next_record(&mut subscriber).await, offset, &message(offset));
    }
    let stats = server.stats();
    assert!(Stats::get(&stats.inflight_deliveries_high_water) <= 10);
    // The broker's own view: 10 delivered, none acknowledged, all 100 stored.
    let info = channel_info(&connection, "window").await;
    assert_eq!(info.partitions[0].next_offset, 100);
    assert_eq!(info.subscriptions.len(), 1);
    assert_eq!(info.subscriptions[0].next_offset, 10, "delivered beyond the window: {info:?}");
    assert_eq!(info.subscriptions[0].acked_offset, None);
    assert_eq!(info.subscriptions[0].lag, 100);
    // Nothing beyond the window is waiting for us.
    assert!(tokio::time::timeout(Duration::ZERO, subscriber.next()).await.is_err(), "a delivery past the window");

    within("ack", subscriber.ack(9)).await.expect("ack sent");
    for offset in 10..20 {
        assert_record_is(&next_record(&mut subscriber).await, offset, &message(offset));
    }
    assert!(Stats::get(&stats.inflight_deliveries_high_water) <= 10);
    let info = channel_info(&connection, "window").await;
    assert_eq!(info.subscriptions[0].next_offset, 20, "delivered beyond the window: {info:?}");
    assert_eq!(info.subscriptions[0].acked_offset, Some(9));
    assert!(tokio::time::timeout(Duration::ZERO, subscriber.next()).await.is_err(), "a delivery past the window");

    within("publisher close", publisher.close()).await;
    drop(subscriber);
    drop(connection);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 8

/// Sends `frames` in one write (from a task, so that the answers can be read
/// meanwhile) and reads `count` answers, by correlation id.
async fn blast(stream: TcpStream, frames: Vec<u8>, count: usize) -> (TcpStream, BTreeMap<u32, Response>) {
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        writer.write_all(&frames).await.expect("write the frames");
        writer
    });
    let mut answers = BTreeMap::new();
    for _ in 0..count {
        let (correlation_id, response) = read_response(&mut reader).await;
        if let Some(earlier) = answers.insert(correlation_id, response) {
            panic!("correlation id {correlation_id} answered twice; first with {earlier:?}");
        }
    }
    let writer = within("the writer", writing).await.expect("the writer task");
    (reader.reunite(writer).expect("the same socket"), answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_window_is_enforced() {
    let dir = TempDir::new().unwrap();
    let config = Config { max_inflight_publishes: 4, ..test_config(&dir) };
    let server = start(config).await;
    let stream = handshake(&addr(&server)).await;

    let mut frames = Vec::new();
    for correlation_id in 1..=200u32 {
        frames.extend(publish_request("window", None, format!("m{correlation_id}")).encode(correlation_id));
    }
    let (mut stream, answers) = blast(stream, frames, 200).await;
    assert_eq!(answers.keys().copied().collect::<Vec<u32>>(), (1..=200).collect::<Vec<u32>>());

    let (mut offsets, mut inflight_errors, mut backpressure) = (Vec::new(), 0u64, 0u64);
    for (correlation_id, response) in &answers {
        match response {
            Response::PublishAck { first_offset, count: 1, duplicate: false, .. } => offsets.push(*first_offset),
            Response::Error { code, .. } if ErrorCode::from_u16(*code) == Some(ErrorCode::InflightLimitExceeded) => {
                inflight_errors += 1;
            }
            Response::Backpressure { .. } => backpressure += 1,
            other => panic!("unexpected answer to publish {correlation_id}: {other:?}"),
        }
    }
    assert!(!offsets.is_empty(), "the first publish fits the window");
    offsets.sort_unstable();
    assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<u64>>(), "acked offsets are distinct and dense");
    let stats = server.stats();
    let high_water = Stats::get(&stats.inflight_publishes_high_water);
    assert!((1..=4).contains(&high_water), "inflight publishes high water {high_water}");
    assert_eq!(Stats::get(&stats.publishes_rejected_inflight), inflight_errors);
    assert_eq!(Stats::get(&stats.publishes_rejected_backpressure), backpressure);
    let info = channel_of(&request(&mut stream, 1000, Request::ListChannels).await, "window");
    assert_eq!(info.partitions[0].next_offset, offsets.len() as u64, "exactly the acknowledged publishes were stored");

    drop(stream);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retry_is_not_duplicated() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let mut stream = handshake(&addr(&server)).await;
    let producer = |sequence| Some(ProducerSequence { producer_id: 7, sequence });

    let first = request(&mut stream, 2, publish_request("idem", producer(0), "once")).await;
    let Response::PublishAck { partition: 0, first_offset, count: 1, timestamp_us, duplicate: false } = first else {
        panic!("expected a fresh PUBLISH_ACK, got {first:?}");
    };
    let retry = request(&mut stream, 3, publish_request("idem", producer(0), "once")).await;
    assert_eq!(retry, Response::PublishAck { partition: 0, first_offset, count: 1, timestamp_us, duplicate: true });

    let info = channel_of(&request(&mut stream, 4, Request::ListChannels).await, "idem");
    assert_eq!(info.partitions[0].next_offset, 1, "the retry was not stored again");
    let fetch =
        Request::Fetch { channel: "idem".into(), partition: 0, offset: 0, max_messages: 10, max_bytes: 1 << 20 };
    let records = fetch_records(&request(&mut stream, 5, fetch).await);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload, Bytes::from_static(b"once"));

    // A gap in the sequence is refused and stores nothing.
    let gap = request(&mut stream, 6, publish_request("idem", producer(5), "gap")).await;
    expect_error(&gap, ErrorCode::OutOfOrderSequence);
    let info = channel_of(&request(&mut stream, 7, Request::ListChannels).await, "idem");
    assert_eq!(info.partitions[0].next_offset, 1);
    // The expected next sequence is still accepted.
    let next = request(&mut stream, 8, publish_request("idem", producer(1), "twice")).await;
    assert!(matches!(next, Response::PublishAck { first_offset: 1, count: 1, duplicate: false, .. }), "{next:?}");

    drop(stream);
    stop(server).await;
}

/// The batch headers of segment format 2 carry each publish's producer and
/// sequence, so a retry after a restart is still recognised. A gap after
/// the restart is refused under `always`; under `never` the log may have
/// lost acknowledged publishes, and the producer is anchored there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_after_a_restart_is_still_not_stored_twice() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
        let dir = TempDir::new().unwrap();
        let config = || Config { fsync, ..test_config(&dir) };
        // Producer id 0 is as valid as any other: it is not "no producer".
        let producer = |id, sequence| Some(ProducerSequence { producer_id: id, sequence });
        let server = start(config()).await;
        let mut stream = handshake(&addr(&server)).await;
        let mut acks = Vec::new();
        for (i, sequence) in [10u64, 11, 12].into_iter().enumerate() {
            let publish = publish_request("idem", producer(0, sequence), "once");
            let response = request(&mut stream, 2 + i as u32, publish).await;
            let Response::PublishAck { first_offset, timestamp_us, duplicate: false, .. } = response else {
                panic!("expected a fresh PUBLISH_ACK, got {response:?}");
            };
            acks.push((first_offset, timestamp_us));
        }
        let other = request(&mut stream, 5, publish_request("idem", producer(99, 0), "other")).await;
        assert!(matches!(other, Response::PublishAck { first_offset: 3, .. }), "{other:?}");
        drop(stream);
        stop(server).await;

        let server = start(config()).await;
        let mut stream = handshake(&addr(&server)).await;
        let retry = request(&mut stream, 10, publish_request("idem", producer(0, 11), "once")).await;
        let (first_offset, timestamp_us) = acks[1];
        let expected = Response::PublishAck { partition: 0, first_offset, count: 1, timestamp_us, duplicate: true };
        assert_eq!(retry, expected, "{fsync:?}");
        let info = channel_of(&request(&mut stream, 11, Request::ListChannels).await, "idem");
        assert_eq!(info.partitions[0].next_offset, 4, "{fsync:?}: the retry was not stored again");
        // Its next sequence is known too: the next one is taken.
        let next = request(&mut stream, 12, publish_request("idem", producer(0, 13), "next")).await;
        assert!(matches!(next, Response::PublishAck { first_offset: 4, duplicate: false, .. }), "{next:?}");
        // The other producer's first publish since the restart skips ahead.
        let ahead = request(&mut stream, 13, publish_request("idem", producer(99, 5), "ahead")).await;
        match fsync {
            FsyncPolicy::Always => {
                expect_error(&ahead, ErrorCode::OutOfOrderSequence);
            }
            _ => assert!(matches!(ahead, Response::PublishAck { first_offset: 5, .. }), "{ahead:?}"),
        }
        drop(stream);
        stop(server).await;
    }
}

// ---------------------------------------------------------------------------
// 10

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_enforced_with_an_error() {
    let dir = TempDir::new().unwrap();
    let config = Config { max_connections: 2, ..test_config(&dir) };
    let server = start(config).await;
    let addr = addr(&server);
    let mut first = handshake(&addr).await;
    let mut second = handshake(&addr).await;

    let mut third = connect_raw(&addr).await;
    write(&mut third, &hello(PROTOCOL_VERSION, PROTOCOL_VERSION).encode(1)).await;
    let (correlation_id, response) = read_response(&mut third).await;
    assert_eq!(correlation_id, 0, "sent on accept, not as an answer");
    let message = expect_error(&response, ErrorCode::TooManyConnections);
    assert!(message.contains("max_connections = 2"), "{message}");
    expect_closed(&mut third).await;
    assert_eq!(Stats::get(&server.stats().connections_refused), 1);

    // The connections within the limit are unaffected.
    assert_eq!(request(&mut first, 2, Request::Ping).await, Response::Pong);
    assert_eq!(request(&mut second, 2, Request::Ping).await, Response::Pong);

    drop((first, second));
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 11

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let dir = TempDir::new().unwrap();
    let config = Config { idle_timeout_ms: 300, heartbeat_interval_ms: 100, ..test_config(&dir) };
    let server = start(config).await;
    let mut stream = handshake(&addr(&server)).await;

    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 0);
    let message = expect_error(&response, ErrorCode::IdleTimeout);
    assert!(message.contains("idle_timeout_ms = 300"), "{message}");
    expect_closed(&mut stream).await;
    assert_eq!(Stats::get(&server.stats().idle_timeouts), 1);

    stop(server).await;
}

// ---------------------------------------------------------------------------
// 12

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_partial_frame_times_out() {
    let dir = TempDir::new().unwrap();
    let config = Config { frame_timeout_ms: 300, ..test_config(&dir) };
    let server = start(config).await;
    let mut stream = handshake(&addr(&server)).await;

    let ping = Request::Ping.encode(2);
    write(&mut stream, &ping[..5]).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 0);
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains("frame_timeout_ms"), "{message}");
    expect_closed(&mut stream).await;
    assert_eq!(Stats::get(&server.stats().protocol_errors), 1);

    stop(server).await;
}

// ---------------------------------------------------------------------------
// 13

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_acknowledged_publish() {
    let dir = TempDir::new().unwrap();
    // A short heartbeat so that the client notices a dead socket quickly.
    let config =
        Config { fsync: FsyncPolicy::Always, heartbeat_interval_ms: 100, idle_timeout_ms: 1000, ..test_config(&dir) };
    let server = start(config.clone()).await;
    let addr = addr(&server);
    let options = PublisherOptions { reconnect_attempts: 1, ..PublisherOptions::default() };
    let publisher = Arc::new(within("publisher", Publisher::connect(&addr, "ledger", options)).await.unwrap());

    let (acked, mut receipts) = tokio::sync::mpsc::unbounded_channel::<(Receipt, Bytes)>();
    let mut workers = Vec::new();
    for worker in 0..4 {
        let publisher = Arc::clone(&publisher);
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let payload = Bytes::from(format!("worker-{worker}-message-{i}"));
                match publisher.publish(Message::from_payload(payload.clone())).await {
                    Ok(receipt) => {
                        let _ = acked.send((receipt, payload));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(acked);

    let mut server = Some(server);
    let mut stopping = None;
    let mut stored: Vec<(Receipt, Bytes)> = Vec::new();
    while let Some(receipt) = within("publishes to end after the shutdown", receipts.recv()).await {
        stored.push(receipt);
        if stored.len() == 200
            && let Some(server) = server.take()
        {
            stopping = Some(tokio::spawn(server.stop()));
        }
    }
    let stopping = stopping.expect("200 publishes were acknowledged before the publishers failed");
    within("the server to stop", stopping).await.expect("the stop task").expect("a clean stop");
    for worker in workers {
        within("a publishing task", worker).await.expect("a publishing task");
    }
    drop(publisher);

    let server = start(config).await;
    let addr = self::addr(&server);
    let connection = within("connect", Connection::connect(&addr, "verify")).await.unwrap();
    let next_offset = channel_info(&connection, "ledger").await.partitions[0].next_offset;
    let mut subscriber =
        within("subscribe", Subscriber::subscribe(&connection, "ledger", SubscribeOptions::default())).await.unwrap();
    let mut on_disk = BTreeMap::new();
    for offset in 0..next_offset {
        let record = next_record(&mut subscriber).await;
        assert_eq!(record.offset, offset);
        on_disk.insert(record.offset, record.payload);
    }
    let mut offsets = HashSet::new();
    for (receipt, payload) in &stored {
        assert!(offsets.insert(receipt.offset), "offset {} acknowledged twice", receipt.offset);
        assert_eq!(on_disk.get(&receipt.offset), Some(payload), "acknowledged offset {} after restart", receipt.offset);
    }

    drop(subscriber);
    drop(connection);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// 14

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_is_sent_when_a_channel_queue_is_full() {
    let dir = TempDir::new().unwrap();
    // Under `always` every publish goes through the queue (under `never`
    // one connection's publishes to an idle writer are appended inline and
    // never fill it).
    let config = Config {
        channel_queue_depth: 1,
        max_inflight_publishes: 65_536,
        fsync: weir::storage::FsyncPolicy::Always,
        ..test_config(&dir)
    };
    let server = start(config).await;
    let stream = handshake(&addr(&server)).await;

    let mut frames = Vec::new();
    for correlation_id in 1..=2000u32 {
        frames.extend(publish_request("flood", None, format!("m{correlation_id}")).encode(correlation_id));
    }
    let (mut stream, answers) = blast(stream, frames, 2000).await;
    assert_eq!(answers.keys().copied().collect::<Vec<u32>>(), (1..=2000).collect::<Vec<u32>>());

    let (mut offsets, mut backpressure) = (Vec::new(), 0u64);
    for (correlation_id, response) in &answers {
        match response {
            Response::PublishAck { first_offset, count: 1, duplicate: false, .. } => offsets.push(*first_offset),
            Response::Backpressure { channel, retry_after_ms, .. } => {
                assert_eq!(channel, "flood");
                assert!(*retry_after_ms > 0);
                backpressure += 1;
            }
            other => panic!("unexpected answer to publish {correlation_id}: {other:?}"),
        }
    }
    assert_eq!(Stats::get(&server.stats().publishes_rejected_backpressure), backpressure);
    offsets.sort_unstable();
    assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<u64>>(), "acked offsets are distinct and dense");
    let info = channel_of(&request(&mut stream, 5000, Request::ListChannels).await, "flood");
    assert_eq!(info.partitions[0].next_offset, offsets.len() as u64, "exactly the acknowledged publishes were stored");

    drop(stream);
    stop(server).await;
}

/// Publishes appended inline have their answers written straight to the
/// socket when no further request is waiting; none may overtake an earlier
/// answer of the same connection. Each round sends a request answered
/// through the queue and a publish in one write, so that the publish is the
/// last request read and its answer goes out at once if anything lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_written_at_once_never_overtake_earlier_answers() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let mut stream = handshake(&addr(&server)).await;
    for round in 0..200u32 {
        let first = if round % 2 == 0 { Request::ListChannels } else { Request::Ping };
        let mut frames = first.encode(2 * round + 1);
        frames.extend(publish_request("in-order", None, format!("m{round}")).encode(2 * round + 2));
        stream.write_all(&frames).await.unwrap();
        let (first_id, first_answer) = within("an answer", read_response(&mut stream)).await;
        let (second_id, second_answer) = within("an answer", read_response(&mut stream)).await;
        assert_eq!((first_id, second_id), (2 * round + 1, 2 * round + 2), "round {round}: answers in request order");
        assert!(matches!(first_answer, Response::Channels { .. } | Response::Pong), "{first_answer:?}");
        assert!(matches!(second_answer, Response::PublishAck { .. }), "{second_answer:?}");
    }
    stop(server).await;
}

// ---------------------------------------------------------------------------
// Client behaviour the broker's limits depend on

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_never_sends_a_batch_above_the_broker_batch_limit() {
    let dir = TempDir::new().unwrap();
    let config = Config { max_message_bytes: 1024, max_batch_bytes: 1024, ..test_config(&dir) };
    let server = start(config).await;
    // A long linger makes the publisher gather both messages into one
    // batch if it is going to: no timing involved.
    let options = PublisherOptions { linger: LIMIT, ..PublisherOptions::default() };
    let publisher = within("publisher", Publisher::connect(&addr(&server), "batched", options)).await.unwrap();
    let first = within("enqueue", publisher.enqueue(Message::from_payload(vec![1u8; 600]))).await.expect("queued");
    let second = within("enqueue", publisher.enqueue(Message::from_payload(vec![2u8; 600]))).await.expect("queued");
    // Closing ends the linger: whatever is gathered is sent and answered.
    within("publisher close", publisher.close()).await;
    // Each message is within max_message_bytes, so each must be stored;
    // two together exceed max_batch_bytes, so they must not share a batch.
    let first = within("a receipt", first).await.expect("answered");
    let second = within("a receipt", second).await.expect("answered");
    assert!(first.is_ok(), "a valid message was refused: {first:?}");
    assert!(second.is_ok(), "a valid message was refused: {second:?}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_lost_connection_fails_instead_of_hanging() {
    let dir = TempDir::new().unwrap();
    // Heartbeats far apart, so that no heartbeat write notices the dead
    // socket during the test.
    let config = Config {
        heartbeat_interval_ms: 600_000,
        idle_timeout_ms: 1_200_000,
        group_session_timeout_ms: 900_000,
        ..test_config(&dir)
    };
    let server = start(config).await;
    let connection = within("connect", Connection::connect(&addr(&server), "lost")).await.unwrap();
    let mut subscriber =
        within("subscribe", Subscriber::subscribe(&connection, "lost", SubscribeOptions::default())).await.unwrap();
    stop(server).await;
    // The subscription ending proves the client has seen the connection close.
    match within("the subscription to end", subscriber.next()).await {
        Some(Err(_)) | None => {}
        Some(Ok(event)) => panic!("unexpected event {event:?}"),
    }
    // A correct client fails at once; 10 s is generous for that.
    let answer = tokio::time::timeout(Duration::from_secs(10), connection.request(Request::Ping)).await;
    match answer {
        Ok(Err(_)) => {}
        Ok(Ok(response)) => panic!("a stopped broker answered {response:?}"),
        Err(_) => panic!("a request on a closed connection hung instead of failing with Disconnected"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_more_records_than_allowed_is_refused_before_decoding_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { max_batch_records: 10, ..test_config(&dir) };
    let server = start(config).await;
    let mut stream = handshake(&addr(&server)).await;
    let batch = |count: usize| Request::PublishBatch {
        channel: "limited".into(),
        partition: None,
        producer: None,
        messages: (0..count).map(|i| Message::from_payload(vec![i as u8; 4])).collect(),
    };
    let at_limit = request(&mut stream, 2, batch(10)).await;
    assert!(matches!(at_limit, Response::PublishAck { first_offset: 0, count: 10, .. }), "{at_limit:?}");
    let over = request(&mut stream, 3, batch(11)).await;
    let message = expect_error(&over, ErrorCode::BatchTooLarge);
    assert!(message.contains("max_batch_records = 10"), "{message}");
    // A batch that claims far more records than its body holds is refused
    // the same way, without decoding.
    let mut lying = batch(1).encode(4);
    // Header, channel, flags (0: neither producer nor partition follows).
    let count_at = 9 + 1 + "limited".len() + 1;
    lying[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    write(&mut stream, &lying).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 4);
    expect_error(&response, ErrorCode::BatchTooLarge);
    assert!(matches!(request(&mut stream, 5, Request::Ping).await, Response::Pong));
    stop(server).await;
}

/// The next notice of a subscription, passing over messages.
async fn next_notice(subscriber: &mut Subscriber) -> weir::protocol::Notice {
    loop {
        match within("a notice", subscriber.next()).await {
            Some(Ok(Event::Notice { partition, notice })) => {
                assert_eq!(partition, 0, "a notice from partition {partition}: {notice:?}");
                return notice;
            }
            Some(Ok(Event::Message { .. })) => continue,
            Some(Err(error)) => panic!("the subscription failed: {error}"),
            None => panic!("the subscription ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_far_behind_gets_a_lag_notice() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { lag_notice_threshold: 50, ..test_config(&dir) };
    let server = start(config).await;
    let publisher = Publisher::connect(&addr(&server), "lagging", PublisherOptions::default()).await.unwrap();
    for i in 0..100 {
        within("a publish", publisher.publish(message(i))).await.unwrap();
    }
    let connection = Connection::connect(&addr(&server), "lagging-subscriber").await.unwrap();
    let options = SubscribeOptions { start: StartPosition::Earliest, max_inflight: 10, ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "lagging", options).await.unwrap();
    match next_notice(&mut subscriber).await {
        weir::protocol::Notice::Lag { lag, next_offset } => {
            assert_eq!(next_offset, 100);
            assert!(lag >= 50, "lag {lag} is at least the threshold");
        }
        other => panic!("expected LAG, got {other:?}"),
    }
    assert!(Stats::get(&server.stats().lag_notices) >= 1);
    publisher.close().await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_unread_messages_retention_deleted_gets_a_skipped_notice_and_resumes_at_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        segment_bytes: 1024,
        retention_max_messages: Some(20),
        retention_check_interval_ms: 100,
        ..test_config(&dir)
    };
    let server = start(config).await;
    let publisher = Publisher::connect(&addr(&server), "retained", PublisherOptions::default()).await.unwrap();
    within("a publish", publisher.publish(message(0))).await.unwrap();
    let connection = Connection::connect(&addr(&server), "slow-subscriber").await.unwrap();
    // A window of one, never acknowledged: the cursor stays at offset 1.
    let options = SubscribeOptions { start: StartPosition::Earliest, max_inflight: 1, ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "retained", options).await.unwrap();
    assert_eq!(next_record(&mut subscriber).await.offset, 0);
    for i in 1..200 {
        within("a publish", publisher.publish(message(i))).await.unwrap();
    }
    // Wait (on events, not time) until retention has moved the start.
    let start = within("retention to move the log start", async {
        loop {
            let start = channel_info(&connection, "retained").await.partitions[0].start_offset;
            if start > 1 {
                return start;
            }
            ping(&connection).await;
        }
    })
    .await;
    subscriber.ack(0).await.unwrap();
    // The window is full, so the notice comes at the first retention pass
    // that moved the start past the cursor: that start, not necessarily
    // the one seen above (retention may have run again since).
    let resumed = match next_notice(&mut subscriber).await {
        weir::protocol::Notice::Skipped { skipped, resume_offset } => {
            assert!((2..=start).contains(&resume_offset), "resumes at a log start, at most {start}: {resume_offset}");
            assert_eq!(skipped, resume_offset - 1, "everything from offset 1 to the resume point was lost");
            resume_offset
        }
        other => panic!("expected SKIPPED, got {other:?}"),
    };
    let record = next_record(&mut subscriber).await;
    assert!(record.offset >= resumed);
    publisher.close().await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_position_past_a_log_cut_by_recovery_is_rewound_so_new_messages_are_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(test_config(&dir)).await;
    let publisher = Publisher::connect(&addr(&server), "cut", PublisherOptions::default()).await.unwrap();
    for i in 0..10 {
        within("a publish", publisher.publish(message(i))).await.unwrap();
    }
    publisher.close().await;
    let connection = Connection::connect(&addr(&server), "durable").await.unwrap();
    let options = || SubscribeOptions {
        start: StartPosition::Earliest,
        durable_name: Some("reader".into()),
        ..SubscribeOptions::default()
    };
    let mut subscriber = Subscriber::subscribe(&connection, "cut", options()).await.unwrap();
    for i in 0..10 {
        assert_eq!(next_record(&mut subscriber).await.offset, i);
    }
    subscriber.ack(9).await.unwrap();
    ping(&connection).await;
    drop(subscriber);
    stop(server).await;

    // As a crash under fsync = "never" can: the last 5 records are gone.
    let log_path = dir.path().join("channels/cut/00000000000000000000.log");
    let bytes = std::fs::read(&log_path).unwrap();
    // Each publish is one batch: its header, then its record.
    let batch_len = message(0).encoded_len() + weir::record::BATCH_HEADER_BYTES;
    std::fs::write(&log_path, &bytes[..bytes.len() - 5 * batch_len]).unwrap();

    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "durable").await.unwrap();
    let subscriber = Subscriber::subscribe(&connection, "cut", options()).await.unwrap();
    assert_eq!(subscriber.first_offset(), 5, "resumes at the end of what survived");
    drop(subscriber);
    let publisher = Publisher::connect(&addr(&server), "cut", PublisherOptions::default()).await.unwrap();
    for i in 5..8 {
        assert_eq!(within("a publish", publisher.publish(message(i))).await.unwrap().offset, i);
    }
    let mut subscriber = Subscriber::subscribe(&connection, "cut", options()).await.unwrap();
    assert_eq!(next_record(&mut subscriber).await.offset, 5);
    subscriber.ack(5).await.unwrap();
    ping(&connection).await;
    drop(subscriber);
    let mut subscriber = Subscriber::subscribe(&connection, "cut", options()).await.unwrap();
    assert_eq!(subscriber.first_offset(), 6, "the ack of a new record at offset 5 counted");
    assert_eq!(next_record(&mut subscriber).await.offset, 6);
    publisher.close().await;
    stop(server).await;
}
