//! Tests of the Rust client: publishers against a real in-process broker
//! whose channel queue is as small as it can be (so that BACKPRESSURE and
//! the publisher's recovery are exercised), and the connection's routing of
//! deliveries against a scripted fake broker (so that a subscriber's queue
//! can be filled exactly).
//!
//! Nothing here waits for time to pass as a means of synchronisation: every
//! await that could hang is bounded by [`LIMIT`].

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use weir::client::{
    BackpressurePolicy, ClientError, Connection, Event, Publisher, PublisherOptions, Receipt, SubscribeOptions,
    Subscriber,
};
use weir::config::Config;
use weir::protocol::{
    ChannelInfo, ErrorCode, FRAME_HEADER_BYTES, FrameHeader, Limits, Notice, PROTOCOL_VERSION, PartitionInfo, Request,
    Response, StartPosition,
};
use weir::record::{Message, Record};
use weir::server::{ServerHandle, Stats};
use weir::storage::FsyncPolicy;

mod common;
use common::{start, test_config, within};

// ---------------------------------------------------------------------------
// A real broker

/// A broker whose channel queue holds one publish: every publish that
/// arrives while another waits for the channel writer is refused with
/// BACKPRESSURE. Under `always`, so that every publish goes through the
/// queue (under `never` an idle writer's publish is appended on its
/// connection's task, and one publisher alone would never fill the queue).
fn tight_config(dir: &TempDir) -> Config {
    Config { channel_queue_depth: 1, fsync: FsyncPolicy::Always, ..test_config(dir) }
}

/// The same under `never`: publishes are appended inline while the queue
/// is idle, and queue (and are refused) while it is not; several
/// publishers at once mix both paths.
fn tight_config_inline(dir: &TempDir) -> Config {
    Config { channel_queue_depth: 1, ..test_config(dir) }
}

async fn stop(server: ServerHandle) {
    within("the server to stop", server.stop()).await.expect("the server stops cleanly");
}

fn payload(publisher: usize, i: usize) -> Bytes {
    Bytes::from(format!("p{publisher}-m{i}"))
}

/// Small batches, so that hundreds of publishes are in flight at once.
fn small_batches(backpressure: BackpressurePolicy) -> PublisherOptions {
    PublisherOptions { batch_max_messages: 8, backpressure, ..PublisherOptions::default() }
}

/// Queues `count` messages on a new publisher, as fast as it takes them,
/// then collects every receipt.
async fn publish_all(
    addr: String,
    channel: &'static str,
    publisher_index: usize,
    count: usize,
    options: PublisherOptions,
) -> Vec<Result<Receipt, ClientError>> {
    let publisher = within("publisher", Publisher::connect(&addr, channel, options)).await.expect("connects");
    let results = publish_range(&publisher, publisher_index, 0..count).await;
    within("publisher close", publisher.close()).await;
    results
}

/// Queues messages `range` of publisher `publisher_index` as fast as
/// `publisher` takes them, then collects every receipt.
async fn publish_range(
    publisher: &Publisher,
    publisher_index: usize,
    range: std::ops::Range<usize>,
) -> Vec<Result<Receipt, ClientError>> {
    let mut receipts = Vec::with_capacity(range.len());
    for i in range {
        let message = Message::from_payload(payload(publisher_index, i));
        receipts.push(within("enqueue", publisher.enqueue(message)).await.expect("queued"));
    }
    let mut results = Vec::with_capacity(receipts.len());
    for receipt in receipts {
        results.push(within("a receipt", receipt).await.expect("every publish is answered"));
    }
    results
}

/// Every record of `channel` from the start, checking that exactly
/// `expected` exist.
async fn read_all(addr: &str, channel: &str, expected: usize) -> Vec<Record> {
    let connection = within("connect", Connection::connect(addr, "reader")).await.expect("connects");
    let next_offset = match within("CHANNELS", connection.request(Request::ListChannels)).await.expect("answered") {
        Response::Channels { channels } => {
            channels.iter().find(|c| c.name == channel).map_or(0, |c| c.partitions[0].next_offset)
        }
        other => panic!("expected CHANNELS, got {other:?}"),
    };
    assert_eq!(next_offset, expected as u64, "messages stored in {channel}");
    let options = SubscribeOptions { start: StartPosition::Earliest, ..SubscribeOptions::default() };
    let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, channel, options)).await.unwrap();
    let mut records = Vec::with_capacity(expected);
    while records.len() < expected {
        match within("a delivery", subscriber.next()).await {
            Some(Ok(Event::Message { partition, record })) => {
                assert_eq!(partition, 0, "{channel} has one partition");
                within("ack", subscriber.ack(record.offset)).await.expect("acked");
                records.push(record);
            }
            Some(Ok(Event::Notice { .. })) => {}
            Some(Err(error)) => panic!("the subscription failed: {error}"),
            None => panic!("the subscription ended"),
        }
    }
    records
}

fn backpressured(server: &ServerHandle) -> u64 {
    Stats::get(&server.stats().publishes_rejected_backpressure)
}

/// Checks one publisher's results against what was read back: the stored
/// messages are exactly those with an `Ok` receipt, each once, in publish
/// order, at the receipt's offset. Returns how many were stored.
fn check_publisher(publisher_index: usize, results: &[Result<Receipt, ClientError>], records: &[Record]) -> usize {
    let mine: Vec<&Record> =
        records.iter().filter(|r| r.payload.starts_with(format!("p{publisher_index}-").as_bytes())).collect();
    let ok: Vec<(usize, &Receipt)> =
        results.iter().enumerate().filter_map(|(i, result)| result.as_ref().ok().map(|r| (i, r))).collect();
    assert_eq!(
        mine.len(),
        ok.len(),
        "publisher {publisher_index}: stored messages vs Ok receipts ({} errors)",
        results.len() - ok.len()
    );
    for (record, (i, receipt)) in mine.iter().zip(&ok) {
        assert_eq!(
            record.payload,
            payload(publisher_index, *i),
            "publisher {publisher_index}: order of what is stored"
        );
        assert_eq!(record.offset, receipt.offset, "publisher {publisher_index}: offset of message {i}");
        assert_eq!(record.timestamp_us, receipt.timestamp_us, "publisher {publisher_index}: timestamp of message {i}");
        assert!(!receipt.duplicate, "publisher {publisher_index}: message {i} was never sent twice");
        assert_eq!(receipt.partition, 0, "publisher {publisher_index}: partition of message {i}");
    }
    ok.len()
}

fn check_offsets_dense(records: &[Record]) {
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.offset, index as u64, "records are read back at dense offsets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_backpressure_loses_and_reorders_nothing() {
    const COUNT: usize = 5000;
    let dir = TempDir::new().unwrap();
    let server = start(tight_config(&dir)).await;
    let addr = server.local_addr().to_string();

    let options = small_batches(BackpressurePolicy::Retry { max_attempts: 1000 });
    let results = publish_all(addr.clone(), "retried", 0, COUNT, options).await;
    let mut offsets = HashSet::new();
    for (i, result) in results.iter().enumerate() {
        let receipt = result.as_ref().unwrap_or_else(|error| panic!("message {i} failed: {error}"));
        assert!(offsets.insert(receipt.offset), "offset {} was given to two messages", receipt.offset);
    }
    assert_eq!(offsets, (0..COUNT as u64).collect::<HashSet<_>>(), "offsets are exactly 0..{COUNT}");

    let records = read_all(&addr, "retried", COUNT).await;
    check_offsets_dense(&records);
    assert_eq!(check_publisher(0, &results, &records), COUNT);
    eprintln!("publishes refused with BACKPRESSURE: {}", backpressured(&server));
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surfaced_backpressure_stores_exactly_the_acknowledged() {
    const COUNT: usize = 5000;
    let dir = TempDir::new().unwrap();
    let server = start(tight_config(&dir)).await;
    let addr = server.local_addr().to_string();

    let results = publish_all(addr.clone(), "surfaced", 0, COUNT, small_batches(BackpressurePolicy::Surface)).await;
    for (i, result) in results.iter().enumerate() {
        if let Err(error) = result {
            // The broker's own BACKPRESSURE, with its suggested wait.
            assert!(
                matches!(error, ClientError::Backpressure { retry_after_ms, .. } if *retry_after_ms > 0),
                "message {i} failed otherwise: {error:?}"
            );
        }
    }
    let stored = results.iter().filter(|r| r.is_ok()).count();
    let records = read_all(&addr, "surfaced", stored).await;
    check_offsets_dense(&records);
    check_publisher(0, &results, &records);
    eprintln!("{stored} of {COUNT} stored; publishes refused with BACKPRESSURE: {}", backpressured(&server));
    stop(server).await;
}

/// Several publishers start while the others keep the channel queue full,
/// so that a new publisher's first batch is often refused: it must not
/// let a later batch be stored first (the broker anchors a new producer at
/// the first publish that reaches the channel writer).
async fn concurrent_publishers(policy: BackpressurePolicy, channel: &'static str, config: fn(&TempDir) -> Config) {
    const PUBLISHERS: usize = 10;
    const COUNT: usize = 600;
    let dir = TempDir::new().unwrap();
    let server = start(config(&dir)).await;
    let addr = server.local_addr().to_string();

    let mut tasks = Vec::new();
    for index in 0..PUBLISHERS {
        tasks.push(tokio::spawn(publish_all(addr.clone(), channel, index, COUNT, small_batches(policy))));
    }
    let mut all_results = Vec::new();
    for task in tasks {
        all_results.push(within("a publisher", task).await.expect("the publisher task completes"));
    }
    let mut offsets = HashSet::new();
    for (index, results) in all_results.iter().enumerate() {
        for (i, result) in results.iter().enumerate() {
            match (result, policy) {
                (Ok(receipt), _) => {
                    assert!(offsets.insert(receipt.offset), "offset {} was given to two messages", receipt.offset)
                }
                (Err(ClientError::Backpressure { retry_after_ms, .. }), BackpressurePolicy::Surface)
                    if *retry_after_ms > 0 => {}
                (Err(error), _) => panic!("publisher {index}: message {i} failed: {error}"),
            }
        }
    }
    let stored = offsets.len();
    assert_eq!(offsets, (0..stored as u64).collect::<HashSet<_>>(), "offsets are dense");
    let records = read_all(&addr, channel, stored).await;
    check_offsets_dense(&records);
    for (index, results) in all_results.iter().enumerate() {
        check_publisher(index, results, &records);
    }
    eprintln!(
        "{stored} of {} stored; publishes refused with BACKPRESSURE: {}",
        PUBLISHERS * COUNT,
        backpressured(&server)
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_retrying_backpressure_lose_nothing() {
    let retry = BackpressurePolicy::Retry { max_attempts: 1000 };
    concurrent_publishers(retry, "shared-retried", tight_config).await;
    concurrent_publishers(retry, "shared-retried-inline", tight_config_inline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_surfacing_backpressure_store_exactly_the_acknowledged() {
    concurrent_publishers(BackpressurePolicy::Surface, "shared-surfaced", tight_config).await;
    concurrent_publishers(BackpressurePolicy::Surface, "shared-surfaced-inline", tight_config_inline).await;
}

// ---------------------------------------------------------------------------
// A scripted fake broker

/// What the test makes the fake broker do.
enum Script {
    /// Send these frames (correlation id 0), then say so.
    Push(Vec<Response>, oneshot::Sender<()>),
    /// Close the connection.
    Close,
}

struct FakeBroker {
    addr: String,
    script: mpsc::UnboundedSender<Script>,
    /// Every request received, with its correlation id.
    requests: mpsc::UnboundedReceiver<(u32, Request)>,
}

fn limits() -> Limits {
    Limits {
        max_message_bytes: 1024 * 1024,
        max_frame_bytes: 2 * 1024 * 1024,
        max_batch_bytes: 1024 * 1024,
        max_batch_records: 1000,
        max_inflight_publishes: 16,
        max_inflight_publish_bytes: 16 * 1024 * 1024,
        max_inflight_deliveries: 1024,
        max_subscriptions_per_connection: 64,
        // No PING from the client's heartbeat during a test.
        heartbeat_interval_ms: 3_600_000,
        idle_timeout_ms: 3_600_000,
    }
}

async fn read_request(stream: &mut tokio::net::tcp::OwnedReadHalf) -> Option<(u32, Request)> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut header).await.ok()?;
    let header = FrameHeader::parse(&header).expect("a well-formed frame header");
    let mut body = vec![0u8; header.body_len as usize];
    stream.read_exact(&mut body).await.ok()?;
    let request = Request::decode(header.frame_type, Bytes::from(body)).expect("a well-formed request");
    Some((header.correlation_id, request))
}

/// Accepts one connection; answers HELLO, SUBSCRIBE, UNSUBSCRIBE and PING,
/// and sends whatever the test scripts.
async fn fake_broker() -> FakeBroker {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().unwrap().to_string();
    let (script, mut scripted) = mpsc::unbounded_channel();
    let (seen, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accepts");
        let (mut read_half, mut write_half) = socket.into_split();
        let (received, mut incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(request) = read_request(&mut read_half).await {
                if received.send(request).is_err() {
                    break;
                }
            }
        });
        loop {
            tokio::select! {
                request = incoming.recv() => {
                    let Some((correlation_id, request)) = request else { break };
                    let answer = match &request {
                        Request::Hello { .. } => Some(Response::Welcome {
                            version: PROTOCOL_VERSION,
                            server_version: "fake".into(),
                            limits: limits(),
                        }),
                        Request::Subscribe { subscription_id, .. } => {
                            Some(Response::Subscribed { subscription_id: *subscription_id, partitions: vec![(0, 0)] })
                        }
                        Request::Unsubscribe { subscription_id } => {
                            Some(Response::Unsubscribed { subscription_id: *subscription_id })
                        }
                        Request::Ping => Some(Response::Pong),
                        // The client sizes a subscription to every partition
                        // by the channel's partition count: one here.
                        Request::ListChannels => Some(Response::Channels {
                            channels: vec![ChannelInfo {
                                name: "events".into(),
                                partitions: vec![PartitionInfo {
                                    start_offset: 0,
                                    next_offset: 0,
                                    size_bytes: 0,
                                    segment_count: 1,
                                }],
                                subscriptions: Vec::new(),
                            }],
                        }),
                        _ => None,
                    };
                    let _ = seen.send((correlation_id, request));
                    if let Some(answer) = answer
                        && write_half.write_all(&answer.encode(correlation_id)).await.is_err()
                    {
                        break;
                    }
                }
                step = scripted.recv() => match step {
                    Some(Script::Push(frames, done)) => {
                        let bytes: Vec<u8> = frames.iter().flat_map(|frame| frame.encode(0)).collect();
                        if write_half.write_all(&bytes).await.is_err() {
                            break;
                        }
                        let _ = done.send(());
                    }
                    Some(Script::Close) | None => break,
                },
            }
        }
    });
    FakeBroker { addr, script, requests }
}

impl FakeBroker {
    async fn push(&self, frames: Vec<Response>) {
        let (done, written) = oneshot::channel();
        assert!(self.script.send(Script::Push(frames, done)).is_ok(), "the fake broker runs");
        within("the fake broker to send", written).await.expect("sent");
    }
}

fn lag_notices(subscription_id: u32, count: usize) -> Vec<Response> {
    (0..count)
        .map(|i| Response::Notice {
            subscription_id,
            partition: 0,
            notice: Notice::Lag { lag: i as u64 + 1, next_offset: 7 },
        })
        .collect()
}

/// Subscribes with a window of one delivery: an event queue of 9.
async fn subscribe(connection: &Connection) -> Subscriber {
    let options = SubscribeOptions { max_inflight: 1, ..SubscribeOptions::default() };
    within("subscribe", Subscriber::subscribe(connection, "events", options)).await.expect("subscribed")
}

/// The event queue of a subscription with `max_inflight` = 1.
const QUEUE: usize = 9;

async fn ping(connection: &Connection) {
    let pong = within("PONG", connection.request(Request::Ping)).await.expect("PING answered");
    assert_eq!(pong, Response::Pong);
}

async fn expect_notices(subscriber: &mut Subscriber, count: usize) {
    for i in 0..count {
        match within("a notice", subscriber.next()).await {
            Some(Ok(Event::Notice { partition: 0, notice: Notice::Lag { lag, .. } })) => {
                assert_eq!(lag, i as u64 + 1, "notices in order")
            }
            other => panic!("expected notice {i}, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_stalls_nothing_else() {
    let mut broker = fake_broker().await;
    let connection = within("connect", Connection::connect(&broker.addr, "overflow")).await.expect("connects");
    let mut idle = subscribe(&connection).await;
    let mut reading = subscribe(&connection).await;

    // The idle subscriber gets more notices than its queue holds; the
    // other's come after them.
    broker.push(lag_notices(1, QUEUE * 4)).await;
    broker.push(lag_notices(2, 3)).await;
    ping(&connection).await;
    expect_notices(&mut reading, 3).await;

    // The idle one keeps what fitted, then learns why it ended.
    expect_notices(&mut idle, QUEUE).await;
    match within("the overflow", idle.next()).await {
        Some(Err(ClientError::SubscriberOverflow { subscription_id: 1, capacity: QUEUE })) => {}
        other => panic!("expected SubscriberOverflow, got {other:?}"),
    }
    assert!(within("the end", idle.next()).await.is_none(), "the subscription has ended");

    // The client ended it at the broker too.
    let mut correlation_ids = HashSet::new();
    loop {
        let (correlation_id, request) = within("UNSUBSCRIBE", broker.requests.recv()).await.expect("a request");
        assert!(correlation_ids.insert(correlation_id), "correlation id {correlation_id} used twice");
        match request {
            Request::Hello { .. } => assert_eq!(correlation_id, 1, "HELLO carries correlation id 1"),
            Request::Unsubscribe { subscription_id } => {
                assert_eq!(subscription_id, 1);
                assert_ne!(correlation_id, 0, "requests carry non-zero correlation ids");
                break;
            }
            _ => assert_ne!(correlation_id, 0, "requests carry non-zero correlation ids"),
        }
    }
    within("unsubscribe", idle.unsubscribe()).await.expect("unsubscribing after an overflow is fine");

    // The other subscription still works, and learns of the disconnect.
    broker.push(lag_notices(2, 2)).await;
    expect_notices(&mut reading, 2).await;
    assert!(broker.script.send(Script::Close).is_ok(), "the fake broker runs");
    match within("the disconnect", reading.next()).await {
        Some(Err(ClientError::Disconnected)) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(within("the end", reading.next()).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_subscriber_queues_do_not_hold_back_the_disconnect() {
    const FULL: u32 = 6;
    let broker = fake_broker().await;
    let connection = within("connect", Connection::connect(&broker.addr, "full")).await.expect("connects");
    let mut full = Vec::new();
    for _ in 0..FULL {
        full.push(subscribe(&connection).await);
    }
    let mut empty = subscribe(&connection).await;

    // Exactly full: nothing overflows, and no room is left for Closed.
    for subscription_id in 1..=FULL {
        broker.push(lag_notices(subscription_id, QUEUE)).await;
    }
    // Answered after every notice was routed.
    ping(&connection).await;
    assert!(broker.script.send(Script::Close).is_ok(), "the fake broker runs");
    match within("the disconnect", empty.next()).await {
        Some(Err(ClientError::Disconnected)) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    for subscriber in &mut full {
        expect_notices(subscriber, QUEUE).await;
        match within("the disconnect", subscriber.next()).await {
            Some(Err(ClientError::Disconnected)) => {}
            other => panic!("expected Disconnected after the queued notices, got {other:?}"),
        }
        assert!(within("the end", subscriber.next()).await.is_none());
    }
}

/// With room for fewer producers than there are publishers, the broker
/// keeps forgetting publishers, and anchors one again wherever its next
/// publish that reaches the channel writer says, possibly past a batch that
/// was refused with BACKPRESSURE. Order can then not be kept, but nothing
/// may be lost or stored twice, and no batch may be renumbered into the
/// sequences of one already stored (and answered as its duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_producers_lose_nothing() {
    const PUBLISHERS: usize = 6;
    const COUNT: usize = 600;
    let dir = TempDir::new().unwrap();
    let server = start(Config { max_producers: 4, ..tight_config(&dir) }).await;
    let addr = server.local_addr().to_string();

    let policy = BackpressurePolicy::Retry { max_attempts: 1000 };
    let mut tasks = Vec::new();
    for index in 0..PUBLISHERS {
        tasks.push(tokio::spawn(publish_all(addr.clone(), "forgetful", index, COUNT, small_batches(policy))));
    }
    let mut all_results = Vec::new();
    for task in tasks {
        all_results.push(within("a publisher", task).await.expect("the publisher task completes"));
    }
    let records = read_all(&addr, "forgetful", PUBLISHERS * COUNT).await;
    check_offsets_dense(&records);
    let stored: HashMap<Bytes, u64> = records.iter().map(|r| (r.payload.clone(), r.offset)).collect();
    assert_eq!(stored.len(), records.len(), "every message is stored once");
    for (index, results) in all_results.iter().enumerate() {
        for (i, result) in results.iter().enumerate() {
            let receipt = result.as_ref().unwrap_or_else(|error| panic!("publisher {index}: message {i}: {error}"));
            assert_eq!(stored.get(&payload(index, i)), Some(&receipt.offset), "publisher {index}: message {i}");
        }
    }
    eprintln!("publishes refused with BACKPRESSURE: {}", backpressured(&server));
    stop(server).await;
}

/// A broker restart forgets every producer. A publisher reconnecting then
/// must not pipeline before the broker anchors it again, even while other
/// publishers keep the channel queue full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_reconnecting_after_a_broker_restart_loses_nothing() {
    const BEFORE: usize = 100;
    const AFTER: usize = 1000;
    const OTHERS: usize = 8;
    const OTHER_COUNT: usize = 300;
    let dir = TempDir::new().unwrap();
    let config = tight_config(&dir);
    let server = start(config.clone()).await;
    let addr = server.local_addr().to_string();
    let options = small_batches(BackpressurePolicy::Retry { max_attempts: 1000 });
    let publisher = within("publisher", Publisher::connect(&addr, "restarted", options)).await.expect("connects");
    let mut results = publish_range(&publisher, 0, 0..BEFORE).await;
    assert!(results.iter().all(Result::is_ok), "published before the restart");

    stop(server).await;
    let server = start(Config { listen_addr: addr.clone(), ..config }).await;
    let mut others = Vec::new();
    for index in 1..=OTHERS {
        let options = small_batches(BackpressurePolicy::Retry { max_attempts: 1000 });
        others.push(tokio::spawn(publish_all(addr.clone(), "restarted", index, OTHER_COUNT, options)));
    }
    // Its first publish finds the connection gone, and it reconnects.
    results.extend(publish_range(&publisher, 0, BEFORE..BEFORE + AFTER).await);
    within("publisher close", publisher.close()).await;
    let mut all_results = vec![results];
    for task in others {
        all_results.push(within("a publisher", task).await.expect("the publisher task completes"));
    }
    let mut offsets = HashSet::new();
    for (index, results) in all_results.iter().enumerate() {
        for (i, result) in results.iter().enumerate() {
            let receipt = result.as_ref().unwrap_or_else(|error| panic!("publisher {index}: message {i}: {error}"));
            assert!(offsets.insert(receipt.offset), "offset {} was given to two messages", receipt.offset);
        }
    }
    let total = BEFORE + AFTER + OTHERS * OTHER_COUNT;
    assert_eq!(offsets, (0..total as u64).collect::<HashSet<_>>(), "offsets are dense");
    let records = read_all(&addr, "restarted", total).await;
    check_offsets_dense(&records);
    for (index, results) in all_results.iter().enumerate() {
        check_publisher(index, results, &records);
    }
    eprintln!("publishes refused with BACKPRESSURE after the restart: {}", backpressured(&server));
    stop(server).await;
}

/// A broker that answers HELLO and then falls silent (a stopped process,
/// a network that drops packets): a request fails with `Disconnected` once
/// nothing came for `SILENT_HEARTBEATS_MAX` heartbeats (at least
/// `SILENCE_LIMIT_MIN`), instead of waiting forever; a broker that answers
/// PING keeps an idle connection open past that.
#[tokio::test]
async fn a_silent_broker_is_taken_for_dead_and_an_idle_one_is_not() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heartbeat_ms = 1000;
    tokio::spawn(async move {
        for answers_pings in [false, true] {
            let (socket, _) = listener.accept().await.unwrap();
            let (mut read_half, mut write_half) = socket.into_split();
            tokio::spawn(async move {
                while let Some((correlation_id, request)) = read_request(&mut read_half).await {
                    let answer = match request {
                        Request::Hello { .. } => Response::Welcome {
                            version: PROTOCOL_VERSION,
                            server_version: "fake".into(),
                            limits: Limits { heartbeat_interval_ms: heartbeat_ms, ..limits() },
                        },
                        Request::Ping if answers_pings => Response::Pong,
                        _ => continue,
                    };
                    if write_half.write_all(&answer.encode(correlation_id)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let silent = Connection::connect(&addr, "silent").await.unwrap();
    let started = std::time::Instant::now();
    let answer = within("the silent broker to be given up", silent.request(Request::Stats)).await;
    assert!(matches!(answer, Err(ClientError::Disconnected)), "{answer:?}");
    assert!(started.elapsed() >= weir::client::SILENCE_LIMIT_MIN);

    let idle = Connection::connect(&addr, "idle").await.unwrap();
    tokio::time::sleep(weir::client::SILENCE_LIMIT_MIN + std::time::Duration::from_secs(3)).await;
    assert!(idle.send_request_pipelined(Request::Ping).await.is_ok(), "an idle connection to a live broker stays open");
}

/// A broker that answers HELLO, METADATA and PING itself on any number of
/// connections, and hands every publish to the test to answer.
struct PublishFake {
    addr: String,
    /// Each publish's producer sequence and message count, with the way to
    /// answer it.
    publishes: mpsc::UnboundedReceiver<(u64, usize, oneshot::Sender<Response>)>,
}

async fn publish_fake() -> PublishFake {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().unwrap().to_string();
    let (handed, publishes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (mut read_half, write_half) = socket.into_split();
            let write_half = std::sync::Arc::new(tokio::sync::Mutex::new(write_half));
            let handed = handed.clone();
            tokio::spawn(async move {
                while let Some((correlation_id, request)) = read_request(&mut read_half).await {
                    let (answer, answered) = oneshot::channel();
                    match request {
                        Request::Hello { .. } => {
                            let _ = answer.send(Response::Welcome {
                                version: PROTOCOL_VERSION,
                                server_version: "fake".into(),
                                limits: limits(),
                            });
                        }
                        Request::Metadata { .. } => {
                            let _ = answer.send(Response::Metadata {
                                node_id: 0,
                                clustered: false,
                                nodes: Vec::new(),
                                channels: Vec::new(),
                            });
                        }
                        Request::Ping => {
                            let _ = answer.send(Response::Pong);
                        }
                        Request::Publish { producer: Some(producer), .. } => {
                            let _ = handed.send((producer.sequence, 1, answer));
                        }
                        Request::PublishBatch { producer: Some(producer), messages, .. } => {
                            let _ = handed.send((producer.sequence, messages.len(), answer));
                        }
                        other => panic!("the fake broker did not expect {other:?}"),
                    }
                    let write_half = std::sync::Arc::clone(&write_half);
                    tokio::spawn(async move {
                        if let Ok(response) = answered.await {
                            let _ = write_half.lock().await.write_all(&response.encode(correlation_id)).await;
                        }
                    });
                }
            });
        }
    });
    PublishFake { addr, publishes }
}

impl PublishFake {
    async fn next_publish(&mut self) -> (u64, usize, oneshot::Sender<Response>) {
        within("a publish", self.publishes.recv()).await.expect("the fake broker runs")
    }
}

fn acked(first_offset: u64, duplicate: bool) -> Response {
    Response::PublishAck { partition: 0, first_offset, count: 1, timestamp_us: 1, duplicate }
}

/// A batch answered `OutcomeUnknown` while the one after it was
/// acknowledged: that acknowledgement proves the first was stored (its
/// sequences came first), so the first is resent with its own sequence
/// and answered as a duplicate, never renumbered past the acknowledged one
/// (which would store it a second time).
#[tokio::test]
async fn a_batch_of_unknown_outcome_before_an_acknowledged_one_is_resent_as_itself() {
    let mut broker = publish_fake().await;
    let publisher = within("publisher", Publisher::connect(&broker.addr, "events", PublisherOptions::default()))
        .await
        .expect("connects");

    let first = publisher.enqueue(Message::from_payload(b"0".to_vec())).await.unwrap();
    let (sequence, count, answer) = broker.next_publish().await;
    assert_eq!((sequence, count), (0, 1));
    answer.send(acked(0, false)).unwrap();
    assert_eq!(within("receipt 0", first).await.unwrap().unwrap().offset, 0);

    // Anchored: the next two are pipelined, one batch each.
    let uncertain = publisher.enqueue(Message::from_payload(b"1".to_vec())).await.unwrap();
    let (sequence, _, answer_uncertain) = broker.next_publish().await;
    assert_eq!(sequence, 1);
    let later = publisher.enqueue(Message::from_payload(b"2".to_vec())).await.unwrap();
    let (sequence, _, answer_later) = broker.next_publish().await;
    assert_eq!(sequence, 2);
    answer_uncertain
        .send(Response::Error { code: ErrorCode::OutcomeUnknown as u16, message: "deposed".into() })
        .unwrap();
    answer_later.send(acked(2, false)).unwrap();
    assert_eq!(within("receipt 2", later).await.unwrap().unwrap().offset, 2);

    let (sequence, count, answer) = broker.next_publish().await;
    assert_eq!((sequence, count), (1, 1), "resent as itself, not renumbered past the acknowledged batch");
    answer.send(acked(1, true)).unwrap();
    let receipt = within("receipt 1", uncertain).await.unwrap().unwrap();
    assert_eq!((receipt.offset, receipt.duplicate), (1, true));

    // And the sequence goes on past everything acknowledged.
    let last = publisher.enqueue(Message::from_payload(b"3".to_vec())).await.unwrap();
    let (sequence, _, answer) = broker.next_publish().await;
    assert_eq!(sequence, 3);
    answer.send(acked(3, false)).unwrap();
    assert_eq!(within("receipt 3", last).await.unwrap().unwrap().offset, 3);
    within("close", publisher.close()).await;
}
