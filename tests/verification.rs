//! Regression tests for the findings of the outside verification (issue 7):
//! notices that reach a subscriber whose window is full, subscription ids
//! reused within one write (and the unflushed frame that test uncovered),
//! names that are not UTF-8, refused requests that must create nothing, and
//! the correlation id of a frame-timeout ERROR.
//!
//! Every test drives a real broker on 127.0.0.1 over raw sockets (the
//! publisher side uses the Rust client where only its results matter).
//! Nothing waits for time to pass: each test waits for the frame it
//! expects, bounded by [`common::LIMIT`], so a loaded machine makes a test
//! slower, never wrong. The server's own timers (notice interval, retention
//! check, frame timeout) are set short where a test needs them to fire.

use std::io::ErrorKind;

use bytes::Bytes;
use tempfile::TempDir;
use tokio::net::TcpStream;
use weir::client::{Publisher, PublisherOptions};
use weir::config::Config;
use weir::protocol::{
    ChannelInfo, ChannelRetention, ErrorCode, FrameType, Notice, ProducerSequence, Request, Response, StartPosition,
};
use weir::record::{Message, RecordIter};
use weir::server::Stats;

mod common;
use common::raw::*;
use common::{addr, start, stop, test_config, within};

// ---------------------------------------------------------------------------
// Helpers (raw-socket ones in tests/common/raw.rs)

async fn ping(stream: &mut TcpStream, correlation_id: u32) {
    assert_eq!(request(stream, correlation_id, Request::Ping).await, Response::Pong, "PING answered by PONG");
}

async fn channels(stream: &mut TcpStream, correlation_id: u32) -> Vec<ChannelInfo> {
    match request(stream, correlation_id, Request::ListChannels).await {
        Response::Channels { channels } => channels,
        other => panic!("expected CHANNELS, got {other:?}"),
    }
}

/// A SUBSCRIBE to every partition of `channel`. Every channel here has the
/// default single partition, 0: the subscription reads that one.
fn subscribe(subscription_id: u32, channel: &str, start: StartPosition, max_inflight: u32) -> Request {
    Request::Subscribe {
        subscription_id,
        channel: channel.into(),
        partition: None,
        start,
        durable_name: None,
        group: None,
        max_inflight,
    }
}

/// The offsets a DELIVER / DELIVER_BATCH carries, each record CRC-checked.
fn delivered_offsets(records: &Bytes) -> Vec<u64> {
    RecordIter::new(records.clone()).map(|record| record.expect("an intact record").offset).collect()
}

fn message(i: u64) -> Message {
    Message::from_payload(format!("payload-{i}"))
}

async fn publish_all(publisher: &Publisher, offsets: std::ops::Range<u64>) {
    for i in offsets {
        let receipt = within("a publish", publisher.publish(message(i))).await.expect("stored");
        assert_eq!(receipt.offset, i, "offsets are dense");
    }
}

// ---------------------------------------------------------------------------
// Issue 7, item 1: LAG reaches a subscriber whose window is full.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_with_a_full_window_gets_lag_notices_without_acknowledging_anything() {
    let dir = TempDir::new().unwrap();
    let config = Config { lag_notice_threshold: 5, notice_interval_ms: 100, ..test_config(&dir) };
    let server = start(config).await;
    let publisher = within("publisher", Publisher::connect(&addr(&server), "lagging", PublisherOptions::default()))
        .await
        .expect("publisher connects");
    publish_all(&publisher, 0..1).await;

    let mut stream = handshake(&addr(&server)).await;
    let subscribed = request(&mut stream, 2, subscribe(7, "lagging", StartPosition::Earliest, 1)).await;
    assert_eq!(subscribed, Response::Subscribed { subscription_id: 7, partitions: vec![(0, 0)] });
    // Lag 1 is below the threshold: the only frame is the delivery, which
    // fills the window of one.
    match read_response(&mut stream).await {
        (0, Response::Deliver { subscription_id: 7, partition: 0, records, .. }) => {
            assert_eq!(delivered_offsets(&records), [0])
        }
        other => panic!("expected the delivery of offset 0, got {other:?}"),
    }
    // Only now does the lag grow past the threshold: nothing is delivered
    // any more (the window is full and nothing is ever acknowledged), so
    // LAG must come from its own timer.
    publish_all(&publisher, 1..31).await;
    loop {
        match read_response(&mut stream).await {
            (0, Response::Notice { subscription_id: 7, partition: 0, notice: Notice::Lag { lag, next_offset } }) => {
                assert_eq!(lag, next_offset, "nothing is acknowledged, so the lag is the whole channel");
                assert!(lag >= 5, "LAG only at or above lag_notice_threshold: {lag}");
                if next_offset == 31 {
                    break;
                }
            }
            other => panic!("expected only LAG notices while the window is full, got {other:?}"),
        }
    }
    assert!(Stats::get(&server.stats().lag_notices) >= 1);

    // The subscription is intact: an ack opens the window for offset 1.
    write(&mut stream, &Request::Ack { subscription_id: 7, partition: 0, offset: 0 }.encode(3)).await;
    loop {
        match read_response(&mut stream).await {
            (0, Response::Notice { subscription_id: 7, partition: 0, notice: Notice::Lag { .. } }) => continue,
            (0, Response::Deliver { subscription_id: 7, partition: 0, records, .. }) => {
                assert_eq!(delivered_offsets(&records), [1], "a window of one after the ack of offset 0");
                break;
            }
            other => panic!("expected the delivery of offset 1, got {other:?}"),
        }
    }

    within("publisher close", publisher.close()).await;
    drop(stream);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// Issue 7, item 2: SKIPPED reaches a subscriber whose window is full.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_past_a_full_window_sends_skipped_without_any_ack() {
    let dir = TempDir::new().unwrap();
    let config = Config {
        segment_bytes: 1024,
        retention_max_messages: Some(20),
        retention_check_interval_ms: 100,
        ..test_config(&dir)
    };
    let server = start(config).await;
    let publisher = within("publisher", Publisher::connect(&addr(&server), "retained", PublisherOptions::default()))
        .await
        .expect("publisher connects");
    publish_all(&publisher, 0..1).await;

    let mut stream = handshake(&addr(&server)).await;
    let subscribed = request(&mut stream, 2, subscribe(3, "retained", StartPosition::Earliest, 1)).await;
    assert_eq!(subscribed, Response::Subscribed { subscription_id: 3, partitions: vec![(0, 0)] });
    match read_response(&mut stream).await {
        (0, Response::Deliver { subscription_id: 3, partition: 0, records, .. }) => {
            assert_eq!(delivered_offsets(&records), [0])
        }
        other => panic!("expected the delivery of offset 0, got {other:?}"),
    }
    // Offset 0 is never acknowledged: the window stays full and the cursor
    // at offset 1 while retention deletes the segments holding it (about
    // 25 records per 1 KiB segment, 20 kept).
    publish_all(&publisher, 1..200).await;

    let first_resume = match read_response(&mut stream).await {
        (
            0,
            Response::Notice { subscription_id: 3, partition: 0, notice: Notice::Skipped { skipped, resume_offset } },
        ) => {
            assert!(resume_offset > 1, "retention deleted offset 1: resumes at {resume_offset}");
            assert_eq!(skipped, resume_offset - 1, "offsets 1 up to the resume point were never delivered");
            resume_offset
        }
        other => panic!("expected SKIPPED while the window is full, got {other:?}"),
    };
    // Skipped records no longer count as in flight: delivery resumes at the
    // log start, still without an ack. Retention may move the start again
    // meanwhile; every notice and delivery must then continue exactly where
    // the previous one left off.
    let mut expected = first_resume;
    loop {
        match read_response(&mut stream).await {
            (
                0,
                Response::Notice {
                    subscription_id: 3,
                    partition: 0,
                    notice: Notice::Skipped { skipped, resume_offset },
                },
            ) => {
                assert_eq!(skipped, resume_offset - expected, "SKIPPED counts from the cursor");
                expected = resume_offset;
            }
            (0, Response::Deliver { subscription_id: 3, partition: 0, records, .. }) => {
                assert_eq!(delivered_offsets(&records), [expected], "delivery resumes at the log start");
                break;
            }
            other => panic!("expected SKIPPED or the delivery at the log start, got {other:?}"),
        }
    }
    let channel = channels(&mut stream, 4).await.into_iter().find(|c| c.name == "retained").expect("the channel");
    let log_start = channel.partitions[0].start_offset;
    assert!(log_start >= first_resume, "the log start {log_start} moved past the cursor");
    assert!(Stats::get(&server.stats().skipped_notices) >= 1);

    within("publisher close", publisher.close()).await;
    drop(stream);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// Issue 7, item 3: a subscription id reused within one write.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_id_reused_in_one_write_never_receives_the_old_subscriptions_deliveries() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let publisher = within("publisher", Publisher::connect(&addr(&server), "reused", PublisherOptions::default()))
        .await
        .expect("publisher connects");
    publish_all(&publisher, 0..23).await;

    // Whether the old subscription queued its batch before UNSUBSCRIBE was
    // read is up to the scheduler; several rounds make the race likely to
    // be exercised, and every round must hold.
    for round in 0..10u64 {
        let next = 23 + round;
        let mut stream = handshake(&addr(&server)).await;
        let mut frames = subscribe(1, "reused", StartPosition::Earliest, 1000).encode(2);
        frames.extend(Request::Unsubscribe { subscription_id: 1 }.encode(3));
        frames.extend(subscribe(1, "reused", StartPosition::Latest, 1000).encode(4));
        write(&mut stream, &frames).await;

        // Until UNSUBSCRIBED: the old subscription may deliver from 0.
        let mut old_offsets = Vec::new();
        let mut subscribed = false;
        loop {
            match read_response(&mut stream).await {
                (2, Response::Subscribed { subscription_id: 1, partitions }) if partitions == [(0, 0)] => {
                    subscribed = true
                }
                (0, Response::Deliver { subscription_id: 1, partition: 0, records, .. }) => {
                    assert!(subscribed, "round {round}: a delivery before its SUBSCRIBED");
                    old_offsets.extend(delivered_offsets(&records));
                }
                (3, Response::Unsubscribed { subscription_id: 1 }) => break,
                other => panic!("round {round}: unexpected frame before UNSUBSCRIBED: {other:?}"),
            }
        }
        assert!(old_offsets.iter().copied().eq(0..old_offsets.len() as u64), "round {round}: {old_offsets:?}");
        // Between UNSUBSCRIBED and the new SUBSCRIBED: nothing at all.
        match read_response(&mut stream).await {
            (4, Response::Subscribed { subscription_id: 1, partitions }) => assert_eq!(partitions, [(0, next)]),
            other => panic!("round {round}: expected the new SUBSCRIBED right after UNSUBSCRIBED, got {other:?}"),
        }
        // After it, the one new message is the first and only delivery:
        // anything the old subscription had queued would arrive before it.
        publish_all(&publisher, next..next + 1).await;
        match read_response(&mut stream).await {
            (0, Response::Deliver { subscription_id: 1, partition: 0, records, .. }) => {
                assert_eq!(delivered_offsets(&records), [next], "round {round}: the new subscription starts at {next}");
            }
            other => panic!("round {round}: expected the delivery of offset {next}, got {other:?}"),
        }
        ping(&mut stream, 5).await;
    }

    within("publisher close", publisher.close()).await;
    stop(server).await;
}

/// Found by the test above: the connection's writer flushed only after a
/// write that left both of its queues empty, so a frame written while
/// deliveries of an ended subscription were still queued behind it stayed
/// in its buffer once those were dropped unsent: here, the UNSUBSCRIBED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribed_reaches_a_client_whose_socket_was_full_of_that_subscriptions_deliveries() {
    const COUNT: u64 = 400;
    let dir = TempDir::new().unwrap();
    let config = Config { delivery_batch_bytes: 64 * 1024, ..test_config(&dir) };
    let server = start(config).await;
    // About 24 MiB: more than the socket buffers of a loopback connection
    // hold, so the subscription's frames back up into the writer's queue.
    let publisher = within("publisher", Publisher::connect(&addr(&server), "full", PublisherOptions::default()))
        .await
        .expect("publisher connects");
    let mut receipts = Vec::new();
    for _ in 0..COUNT {
        let payload = Bytes::from(vec![b'x'; 60 * 1024]);
        receipts.push(within("enqueue", publisher.enqueue(Message::from_payload(payload))).await.expect("queued"));
    }
    for receipt in receipts {
        within("a receipt", receipt).await.expect("answered").expect("stored");
    }

    let mut stream = handshake(&addr(&server)).await;
    let subscribed = request(&mut stream, 2, subscribe(1, "full", StartPosition::Earliest, 4096)).await;
    assert_eq!(subscribed, Response::Subscribed { subscription_id: 1, partitions: vec![(0, 0)] });
    // Read nothing until the subscription has stopped moving: its socket is
    // full and its frames wait in the queue. (Should everything fit, the
    // test checks the same order, just without the backlog.)
    let mut admin = handshake(&addr(&server)).await;
    let (mut delivered, mut unchanged) = (None, 0);
    for correlation_id in 2.. {
        let channel = channels(&mut admin, correlation_id).await.into_iter().find(|c| c.name == "full");
        let next = channel.and_then(|c| c.subscriptions.first().map(|s| s.next_offset));
        if next == delivered {
            unchanged += 1;
        } else {
            (delivered, unchanged) = (next, 0);
        }
        if unchanged == 5 || next == Some(COUNT) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    write(&mut stream, &Request::Unsubscribe { subscription_id: 1 }.encode(3)).await;
    let mut expected = 0;
    loop {
        match read_response(&mut stream).await {
            (0, Response::Deliver { subscription_id: 1, partition: 0, records, .. }) => {
                for offset in delivered_offsets(&records) {
                    assert_eq!(offset, expected, "deliveries are in order, without gaps");
                    expected += 1;
                }
            }
            (3, Response::Unsubscribed { subscription_id: 1 }) => break,
            other => panic!("expected deliveries then UNSUBSCRIBED, got {other:?}"),
        }
    }
    assert!(expected <= COUNT);
    ping(&mut stream, 4).await;

    within("publisher close", publisher.close()).await;
    drop((stream, admin));
    stop(server).await;
}

// ---------------------------------------------------------------------------
// Issue 7, item 11: names that are not UTF-8.

/// `frame` with the last byte of its only occurrence of `name` replaced by
/// 0xff, which is never valid UTF-8.
fn not_utf8(mut frame: Vec<u8>, name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let at = frame.windows(name.len()).position(|window| window == name).expect("the name is in the frame");
    assert!(frame[at + 1..].windows(name.len()).all(|window| window != name), "the name occurs once");
    frame[at + name.len() - 1] = 0xff;
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_utf8_are_refused_by_field_and_the_connection_stays_open() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let mut stream = handshake(&addr(&server)).await;

    let publish = |channel: &str, producer| Request::Publish {
        channel: channel.into(),
        partition: None,
        producer,
        message: message(0),
    };
    let producer = Some(ProducerSequence { producer_id: 9, sequence: 0 });
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("PUBLISH", not_utf8(publish("chan-a", None).encode(10), "chan-a"), ErrorCode::InvalidChannelName),
        (
            "idempotent PUBLISH",
            not_utf8(publish("chan-b", producer).encode(11), "chan-b"),
            ErrorCode::InvalidChannelName,
        ),
        (
            "PUBLISH_BATCH",
            not_utf8(
                Request::PublishBatch {
                    channel: "chan-c".into(),
                    partition: None,
                    producer: None,
                    messages: vec![message(0), message(1)],
                }
                .encode(12),
                "chan-c",
            ),
            ErrorCode::InvalidChannelName,
        ),
        (
            "SUBSCRIBE",
            not_utf8(subscribe(1, "chan-d", StartPosition::Earliest, 10).encode(13), "chan-d"),
            ErrorCode::InvalidChannelName,
        ),
        (
            "FETCH",
            not_utf8(
                Request::Fetch { channel: "chan-e".into(), partition: 0, offset: 0, max_messages: 1, max_bytes: 1024 }
                    .encode(14),
                "chan-e",
            ),
            ErrorCode::InvalidChannelName,
        ),
        (
            "CREATE_CHANNEL",
            not_utf8(
                Request::CreateChannel {
                    channel: "chan-f".into(),
                    retention: ChannelRetention::default(),
                    partitions: None,
                }
                .encode(15),
                "chan-f",
            ),
            ErrorCode::InvalidChannelName,
        ),
        (
            "SUBSCRIBE with a durable name",
            not_utf8(
                Request::Subscribe {
                    subscription_id: 2,
                    channel: "chan-g".into(),
                    partition: None,
                    start: StartPosition::Earliest,
                    durable_name: Some("reader-g".into()),
                    group: None,
                    max_inflight: 10,
                }
                .encode(16),
                "reader-g",
            ),
            ErrorCode::InvalidRequest,
        ),
        (
            "SUBSCRIBE with a group",
            not_utf8(
                Request::Subscribe {
                    subscription_id: 3,
                    channel: "chan-i".into(),
                    partition: None,
                    start: StartPosition::Earliest,
                    durable_name: None,
                    group: Some("workers-i".into()),
                    max_inflight: 10,
                }
                .encode(17),
                "workers-i",
            ),
            ErrorCode::InvalidRequest,
        ),
        (
            "ALTER_CHANNEL",
            not_utf8(Request::AlterChannel { channel: "chan-j".into(), partitions: 2 }.encode(18), "chan-j"),
            ErrorCode::InvalidChannelName,
        ),
    ];
    for (what, frame, code) in cases {
        let correlation_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
        write(&mut stream, &frame).await;
        let (answered, response) = read_response(&mut stream).await;
        assert_eq!(answered, correlation_id, "{what}: the ERROR answers the frame");
        let message = expect_error(&response, code);
        assert!(message.contains("UTF-8"), "{what}: {message}");
        ping(&mut stream, correlation_id + 100).await;
    }
    // Exactly like a UTF-8 name outside the naming rule.
    let response = request(&mut stream, 20, publish("a/b", None)).await;
    expect_error(&response, ErrorCode::InvalidChannelName);
    ping(&mut stream, 21).await;
    assert!(channels(&mut stream, 22).await.is_empty(), "no refused request created a channel");
    assert_eq!(Stats::get(&server.stats().publishes_rejected_invalid_channel), 4);
    assert_eq!(Stats::get(&server.stats().protocol_errors), 0);

    // A frame that is malformed besides its name is still a protocol error.
    let mut frame = not_utf8(publish("chan-h", None).encode(30), "chan-h");
    frame.push(0);
    let length = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&length.to_be_bytes());
    write(&mut stream, &frame).await;
    let (answered, response) = read_response(&mut stream).await;
    assert_eq!(answered, 30);
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains("left over"), "{message}");
    expect_closed(&mut stream).await;

    stop(server).await;
}

// ---------------------------------------------------------------------------
// Issue 7, item 12: a refused request creates nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscribes_and_publishes_create_no_channel_and_take_no_slot() {
    let dir = TempDir::new().unwrap();
    let server = start(Config { max_channels: 1, ..test_config(&dir) }).await;
    let mut stream = handshake(&addr(&server)).await;

    // A channel that does not exist would be empty: only offset 0 is valid.
    let response = request(&mut stream, 2, subscribe(1, "ghost", StartPosition::Offset(5), 10)).await;
    let refusal = expect_error(&response, ErrorCode::OffsetOutOfRange);
    assert!(refusal.contains("ghost"), "{refusal}");
    // Publishes whose sequence + count overflows u64, one past the bound.
    let overflowing = [
        Request::Publish {
            channel: "ghost".into(),
            partition: None,
            producer: Some(ProducerSequence { producer_id: 1, sequence: u64::MAX }),
            message: message(0),
        },
        Request::PublishBatch {
            channel: "ghost".into(),
            partition: None,
            producer: Some(ProducerSequence { producer_id: 1, sequence: u64::MAX - 1 }),
            messages: vec![message(0), message(1)],
        },
    ];
    for (correlation_id, publish) in (3..).zip(overflowing) {
        let response = request(&mut stream, correlation_id, publish).await;
        let refusal = expect_error(&response, ErrorCode::InvalidRequest);
        assert!(refusal.contains("overflows"), "{refusal}");
    }

    assert!(channels(&mut stream, 5).await.is_empty(), "LIST_CHANNELS shows no channel");
    let channels_dir = dir.path().join("channels");
    let on_disk: Vec<_> = match std::fs::read_dir(&channels_dir) {
        Ok(entries) => entries.map(|entry| entry.expect("a directory entry").file_name()).collect(),
        Err(error) if error.kind() == ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("cannot list {}: {error}", channels_dir.display()),
    };
    assert!(on_disk.is_empty(), "nothing on disk: {on_disk:?}");

    // The one slot of max_channels is still free, and the requests accepted
    // at the bounds take it: a publish whose sequence + count is exactly
    // u64::MAX, then a subscription at offset 1 of the channel it created.
    let publish = Request::Publish {
        channel: "real".into(),
        partition: None,
        producer: Some(ProducerSequence { producer_id: 1, sequence: u64::MAX - 1 }),
        message: message(0),
    };
    match request(&mut stream, 6, publish).await {
        Response::PublishAck { partition: 0, first_offset: 0, count: 1, duplicate: false, .. } => {}
        other => panic!("expected PUBLISH_ACK, got {other:?}"),
    }
    let subscribed = request(&mut stream, 7, subscribe(1, "real", StartPosition::Offset(1), 10)).await;
    assert_eq!(subscribed, Response::Subscribed { subscription_id: 1, partitions: vec![(0, 1)] });
    let names: Vec<String> = channels(&mut stream, 8).await.into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["real"]);
    let response = request(&mut stream, 9, subscribe(2, "other", StartPosition::Earliest, 10)).await;
    expect_error(&response, ErrorCode::TooManyChannels);

    drop(stream);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_offset_on_a_missing_channel_accepts_zero_and_creates_it() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let mut stream = handshake(&addr(&server)).await;
    let subscribed = request(&mut stream, 2, subscribe(1, "fresh", StartPosition::Offset(0), 10)).await;
    assert_eq!(subscribed, Response::Subscribed { subscription_id: 1, partitions: vec![(0, 0)] });
    let names: Vec<String> = channels(&mut stream, 3).await.into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["fresh"]);
    drop(stream);
    stop(server).await;
}

// ---------------------------------------------------------------------------
// Issue 7, item 13: the correlation id of a frame-timeout ERROR.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_timeout_after_the_header_carries_the_frames_correlation_id() {
    let dir = TempDir::new().unwrap();
    let server = start(Config { frame_timeout_ms: 200, ..test_config(&dir) }).await;

    // The header was read: the ERROR is about that frame.
    let mut stream = handshake(&addr(&server)).await;
    let mut partial = raw_header(100, FrameType::Publish as u8, 77);
    partial.extend_from_slice(&[6, b'o', b'r', b'd', b'e', b'r']);
    write(&mut stream, &partial).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains("frame_timeout_ms = 200"), "{message}");
    assert_eq!(correlation_id, 77, "the frame's correlation id");
    expect_closed(&mut stream).await;

    // The header was not complete: no correlation id was read, so 0.
    let mut stream = handshake(&addr(&server)).await;
    write(&mut stream, &raw_header(0, FrameType::Ping as u8, 78)[..7]).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    let message = expect_error(&response, ErrorCode::ProtocolError);
    assert!(message.contains("frame_timeout_ms = 200"), "{message}");
    assert_eq!(correlation_id, 0, "no header, no correlation id");
    expect_closed(&mut stream).await;

    stop(server).await;
}
