//! Partitioned channels over real TCP and real files: keyed routing that
//! matches Kafka's partitioner and survives restarts, per-partition
//! offsets, subscriptions over one or every partition, durable positions
//! per partition, version 1 clients on partition 0, partition counts that
//! grow and never shrink, and a data directory written by weir 0.1.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use weir::client::{ClientError, Connection, Event, SubscribeOptions, Subscriber};
use weir::config::Config;
use weir::protocol::{
    ChannelInfo, ChannelRetention, ErrorCode, Notice, PROTOCOL_VERSION, Request, Response, StartPosition,
};
use weir::record::{Message, RecordIter};

mod common;
use common::raw::{hello, read_response};
use common::{addr, start, stop, test_config, within};

fn keyed(key: &str, payload: &str) -> Message {
    Message { key: Bytes::from(key.to_owned()), headers: Vec::new(), payload: Bytes::from(payload.to_owned()) }
}

async fn create(connection: &Connection, channel: &str, partitions: u32) {
    let request = Request::CreateChannel {
        channel: channel.into(),
        retention: ChannelRetention::default(),
        partitions: Some(partitions),
    };
    let answer = within("CREATE_CHANNEL", connection.request(request)).await.expect("channel created");
    assert_eq!(answer, Response::ChannelCreated);
}

/// Publishes and returns (partition, first offset), or the broker's error.
async fn publish(
    connection: &Connection,
    channel: &str,
    partition: Option<u32>,
    messages: Vec<Message>,
) -> Result<(u32, u64), ClientError> {
    let request = if messages.len() == 1 {
        let message = messages.into_iter().next().expect("one message");
        Request::Publish { channel: channel.into(), partition, producer: None, message }
    } else {
        Request::PublishBatch { channel: channel.into(), partition, producer: None, messages }
    };
    match within("a publish answer", connection.request(request)).await? {
        Response::PublishAck { partition, first_offset, .. } => Ok((partition, first_offset)),
        other => panic!("expected PUBLISH_ACK, got {other:?}"),
    }
}

async fn channel_info(connection: &Connection, channel: &str) -> Option<ChannelInfo> {
    match within("CHANNELS", connection.request(Request::ListChannels)).await.expect("channels listed") {
        Response::Channels { channels } => channels.into_iter().find(|info| info.name == channel),
        other => panic!("expected CHANNELS, got {other:?}"),
    }
}

/// Kafka's partition for each key of its own murmur2 test vectors
/// (`UtilsTest.testMurmur2`), with 6 partitions: `(hash & 0x7fffffff) % 6`,
/// computed here from the published hashes, not with weir's code.
fn kafka_partitions_of_known_keys() -> Vec<(&'static str, u32)> {
    [
        ("21", -973_932_308i32),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
        ("abc", 479_470_107),
    ]
    .into_iter()
    .map(|(key, hash)| (key, (hash as u32 & 0x7fff_ffff) % 6))
    .collect()
}

#[tokio::test]
async fn keys_land_on_the_partition_kafkas_partitioner_gives_them_and_stay_there_after_a_restart() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "keyed").await.unwrap();
    assert_eq!(connection.protocol_version(), PROTOCOL_VERSION);
    create(&connection, "orders", 6).await;
    let mut expected_offsets: BTreeMap<u32, u64> = BTreeMap::new();
    for (key, partition) in kafka_partitions_of_known_keys() {
        let (stored_in, offset) = publish(&connection, "orders", None, vec![keyed(key, "first")]).await.unwrap();
        assert_eq!(stored_in, partition, "key {key:?}");
        let next = expected_offsets.entry(partition).or_default();
        assert_eq!(offset, *next, "offsets count per partition");
        *next += 1;
    }
    drop(connection);
    stop(server).await;

    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "keyed").await.unwrap();
    for (key, partition) in kafka_partitions_of_known_keys() {
        let (stored_in, _) = publish(&connection, "orders", None, vec![keyed(key, "again")]).await.unwrap();
        assert_eq!(stored_in, partition, "key {key:?} after a restart");
    }
    let info = channel_info(&connection, "orders").await.expect("listed");
    assert_eq!(info.partitions.len(), 6);
    stop(server).await;
}

/// A single node answers METADATA as node 0, at the address the client
/// reached it at, leading every partition of every channel (or of the one
/// named); a version 1 connection has no METADATA.
#[tokio::test]
async fn a_single_node_answers_metadata_leading_every_partition() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "metadata").await.unwrap();
    create(&connection, "orders", 3).await;
    create(&connection, "audit", 1).await;
    let metadata = weir::client::Metadata::fetch(&connection, "").await.unwrap();
    assert!(!metadata.clustered);
    assert_eq!(metadata.node_id, 0);
    assert_eq!(metadata.nodes, [weir::protocol::NodeInfo { node_id: 0, client_addr: addr(&server) }]);
    let names: Vec<&str> = metadata.channels.iter().map(|channel| channel.name.as_str()).collect();
    assert_eq!(names, ["audit", "orders"]);
    assert_eq!(metadata.channels[1].partitions.len(), 3);
    for partition in metadata.channels.iter().flat_map(|channel| &channel.partitions) {
        assert_eq!((partition.leader, &partition.replicas[..]), (Some(0), &[0][..]));
    }
    assert_eq!(metadata.leader_addr("orders", 2), Some(addr(&server).as_str()));
    assert_eq!(metadata.leader_addr("orders", 3), None);
    let named = weir::client::Metadata::fetch(&connection, "orders").await.unwrap();
    assert_eq!(named.channels.len(), 1);
    let missing = weir::client::Metadata::fetch(&connection, "nowhere").await.unwrap();
    assert!(missing.channels.is_empty());

    let mut v1 = within("connect", tokio::net::TcpStream::connect(addr(&server))).await.unwrap();
    v1.write_all(&hello(1, 1).encode(1)).await.unwrap();
    let (_, welcome) = read_response(&mut v1).await;
    assert!(matches!(welcome, Response::Welcome { version: 1, .. }), "{welcome:?}");
    v1.write_all(&Request::Metadata { channel: String::new() }.encode_for(2, 7)).await.unwrap();
    let (_, answer) = read_response(&mut v1).await;
    assert!(
        matches!(answer, Response::Error { code, .. } if code == ErrorCode::ProtocolError as u16),
        "version 1: {answer:?}"
    );
    stop(server).await;
}

#[tokio::test]
async fn keyless_publishes_take_the_partitions_in_turn_and_a_batch_stays_together() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "keyless").await.unwrap();
    create(&connection, "events", 3).await;
    let mut partitions = Vec::new();
    for i in 0..6 {
        let batch = vec![Message::from_payload(format!("a{i}")), Message::from_payload(format!("b{i}"))];
        partitions.push(publish(&connection, "events", None, batch).await.unwrap().0);
    }
    assert_eq!(partitions, [0, 1, 2, 0, 1, 2]);
    let info = channel_info(&connection, "events").await.expect("listed");
    // Each partition got two batches of two messages.
    assert!(info.partitions.iter().all(|partition| partition.next_offset == 4), "{info:?}");
    stop(server).await;
}

#[tokio::test]
async fn refused_partitions_and_mixed_batches_store_and_create_nothing() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "refused").await.unwrap();
    // A partition the new channel would not have: nothing is created.
    let refused = publish(&connection, "fresh", Some(1), vec![Message::from_payload("x")]).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::UnknownPartition), "{refused}");
    assert!(channel_info(&connection, "fresh").await.is_none());

    create(&connection, "orders", 4).await;
    let refused = publish(&connection, "orders", Some(4), vec![Message::from_payload("x")]).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::UnknownPartition), "{refused}");
    assert!(refused.to_string().contains("0..4"), "{refused}");
    // Two keys of different partitions in one batch: refused, nothing
    // stored. With 4 partitions Kafka puts "21" in 0 and "foobar" in 2.
    let batch = vec![keyed("21", "v"), keyed("foobar", "v")];
    let refused = publish(&connection, "orders", None, batch).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidRequest), "{refused}");
    assert!(refused.to_string().contains("partitions 0 and 2"), "{refused}");
    // An idempotent publish names its partition on a channel of several:
    // sequences are counted per partition.
    let idempotent = Request::Publish {
        channel: "orders".into(),
        partition: None,
        producer: Some(weir::protocol::ProducerSequence { producer_id: 7, sequence: 0 }),
        message: Message::from_payload("x"),
    };
    let refused = within("publish", connection.request(idempotent)).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidRequest), "{refused}");
    let info = channel_info(&connection, "orders").await.expect("listed");
    assert!(info.partitions.iter().all(|partition| partition.next_offset == 0), "{info:?}");
    stop(server).await;
}

/// Every record a subscription delivers until it has `count`, by partition.
async fn receive(subscriber: &mut Subscriber, count: usize) -> BTreeMap<u32, Vec<(u64, Bytes)>> {
    let mut received: BTreeMap<u32, Vec<(u64, Bytes)>> = BTreeMap::new();
    let mut total = 0;
    while total < count {
        match within("a delivery", subscriber.next()).await {
            Some(Ok(Event::Message { partition, record })) => {
                subscriber.ack_partition(partition, record.offset).await.unwrap();
                received.entry(partition).or_default().push((record.offset, record.payload));
                total += 1;
            }
            Some(Ok(Event::Notice { .. })) => {}
            Some(Err(error)) => panic!("the subscription failed: {error}"),
            None => panic!("the subscription ended"),
        }
    }
    received
}

#[tokio::test]
async fn a_subscription_reads_every_partition_in_order_and_a_durable_one_resumes_in_each() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "reader").await.unwrap();
    create(&connection, "orders", 4).await;
    for partition in 0..4u32 {
        for i in 0..5 {
            publish(&connection, "orders", Some(partition), vec![Message::from_payload(format!("p{partition}-{i}"))])
                .await
                .unwrap();
        }
    }
    let options = SubscribeOptions { durable_name: Some("billing".into()), ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "orders", options.clone()).await.unwrap();
    assert_eq!(subscriber.partitions(), [(0, 0), (1, 0), (2, 0), (3, 0)]);
    let received = receive(&mut subscriber, 20).await;
    for (partition, records) in &received {
        let expected: Vec<(u64, Bytes)> = (0..5).map(|i| (i, Bytes::from(format!("p{partition}-{i}")))).collect();
        assert_eq!(records, &expected, "partition {partition}: every record, in offset order");
    }
    // One partition alone: the others are not delivered.
    let one = SubscribeOptions { partition: Some(2), ..SubscribeOptions::default() };
    let mut single = Subscriber::subscribe(&connection, "orders", one).await.unwrap();
    assert_eq!(single.partitions(), [(2, 0)]);
    let only = receive(&mut single, 5).await;
    assert_eq!(only.keys().copied().collect::<Vec<_>>(), [2]);
    // Acks are per partition and cover what was delivered.
    within("unsubscribe", subscriber.unsubscribe()).await.unwrap();
    let _ = within("PING", connection.request(Request::Ping)).await;
    drop(single);
    drop(connection);
    stop(server).await;

    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "reader").await.unwrap();
    publish(&connection, "orders", Some(1), vec![Message::from_payload("p1-5")]).await.unwrap();
    let mut resumed = Subscriber::subscribe(&connection, "orders", options).await.unwrap();
    assert_eq!(resumed.partitions(), [(0, 5), (1, 5), (2, 5), (3, 5)], "each partition resumes after its last ack");
    let next = receive(&mut resumed, 1).await;
    assert_eq!(next, BTreeMap::from([(1, vec![(5, Bytes::from("p1-5"))])]));
    stop(server).await;
}

#[tokio::test]
async fn an_explicit_start_offset_names_its_partition() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "offsets").await.unwrap();
    create(&connection, "orders", 2).await;
    for i in 0..3 {
        publish(&connection, "orders", Some(1), vec![Message::from_payload(format!("m{i}"))]).await.unwrap();
    }
    let all = SubscribeOptions { start: StartPosition::Offset(1), ..SubscribeOptions::default() };
    let refused = Subscriber::subscribe(&connection, "orders", all).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidRequest), "{refused}");
    let one = SubscribeOptions { partition: Some(1), start: StartPosition::Offset(1), ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "orders", one).await.unwrap();
    let received = receive(&mut subscriber, 2).await;
    assert_eq!(received[&1].iter().map(|(offset, _)| *offset).collect::<Vec<_>>(), [1, 2]);
    let missing = SubscribeOptions { partition: Some(2), ..SubscribeOptions::default() };
    let refused = Subscriber::subscribe(&connection, "orders", missing).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::UnknownPartition), "{refused}");
    stop(server).await;
}

#[tokio::test]
async fn partitions_grow_up_to_max_partitions_and_never_shrink() {
    let dir = TempDir::new().unwrap();
    let config = Config { max_partitions: 8, ..test_config(&dir) };
    let server = start(config).await;
    let connection = Connection::connect(&addr(&server), "alter").await.unwrap();
    create(&connection, "orders", 2).await;
    let alter = |partitions| Request::AlterChannel { channel: "orders".into(), partitions };
    // N = max_partitions is taken, N + 1 is refused.
    assert_eq!(within("ALTER", connection.request(alter(8))).await.unwrap(), Response::ChannelAltered);
    let refused = within("ALTER", connection.request(alter(9))).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManyPartitions), "{refused}");
    let refused = within("ALTER", connection.request(alter(3))).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidRequest), "{refused}");
    assert!(refused.to_string().contains("never removed"), "{refused}");
    // The new partitions take publishes at once.
    assert_eq!(publish(&connection, "orders", Some(7), vec![Message::from_payload("x")]).await.unwrap(), (7, 0));
    let create_too_many =
        Request::CreateChannel { channel: "wide".into(), retention: ChannelRetention::default(), partitions: Some(9) };
    let refused = within("CREATE", connection.request(create_too_many)).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManyPartitions), "{refused}");
    assert!(channel_info(&connection, "wide").await.is_none());
    drop(connection);
    stop(server).await;

    let server = start(Config { max_partitions: 8, ..test_config(&dir) }).await;
    let connection = Connection::connect(&addr(&server), "alter").await.unwrap();
    assert_eq!(channel_info(&connection, "orders").await.expect("listed").partitions.len(), 8);
    stop(server).await;
}

#[tokio::test]
async fn a_subscription_to_every_partition_reads_partitions_added_later_from_their_start() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "reader").await.unwrap();
    create(&connection, "orders", 2).await;
    publish(&connection, "orders", Some(0), vec![Message::from_payload("before")]).await.unwrap();
    // Starting at the end: a partition added later is read from its start
    // all the same (everything in it came after the subscription began).
    let options = SubscribeOptions {
        durable_name: Some("billing".into()),
        start: StartPosition::Latest,
        ..SubscribeOptions::default()
    };
    let mut subscriber = Subscriber::subscribe(&connection, "orders", options.clone()).await.unwrap();
    assert_eq!(subscriber.partitions(), [(0, 1), (1, 0)]);
    let alter = Request::AlterChannel { channel: "orders".into(), partitions: 4 };
    assert_eq!(within("ALTER", connection.request(alter)).await.unwrap(), Response::ChannelAltered);
    // Published at once, possibly before the subscription notices the new
    // partitions.
    for partition in [2u32, 3, 0] {
        publish(&connection, "orders", Some(partition), vec![Message::from_payload(format!("p{partition}"))])
            .await
            .unwrap();
    }
    let mut assigned = BTreeMap::new();
    let mut received = BTreeMap::new();
    while received.len() < 3 {
        match within("an event", subscriber.next()).await {
            Some(Ok(Event::Notice { partition, notice: Notice::Assigned { generation, first_offset } })) => {
                assert_eq!(generation, 0);
                assert!(!received.contains_key(&partition), "ASSIGNED of partition {partition} came after its records");
                assigned.insert(partition, first_offset);
            }
            Some(Ok(Event::Notice { .. })) => {}
            Some(Ok(Event::Message { partition, record })) => {
                subscriber.ack_partition(partition, record.offset).await.unwrap();
                received.insert(partition, (record.offset, record.payload));
            }
            Some(Err(error)) => panic!("the subscription failed: {error}"),
            None => panic!("the subscription ended"),
        }
    }
    assert_eq!(assigned, BTreeMap::from([(2, 0), (3, 0)]));
    assert_eq!(
        received,
        BTreeMap::from([(0, (1, Bytes::from("p0"))), (2, (0, Bytes::from("p2"))), (3, (0, Bytes::from("p3"))),])
    );
    assert_eq!(subscriber.partitions(), [(0, 1), (1, 0), (2, 0), (3, 0)]);
    // The durable name keeps a position in the new partitions too.
    within("unsubscribe", subscriber.unsubscribe()).await.unwrap();
    let _ = within("PING", connection.request(Request::Ping)).await;
    let resumed = Subscriber::subscribe(&connection, "orders", options).await.unwrap();
    assert_eq!(resumed.partitions(), [(0, 2), (1, 0), (2, 1), (3, 1)]);
    // One partition alone follows no others.
    let single = Subscriber::subscribe(
        &connection,
        "orders",
        SubscribeOptions { partition: Some(1), ..SubscribeOptions::default() },
    );
    let mut single = single.await.unwrap();
    let alter = Request::AlterChannel { channel: "orders".into(), partitions: 5 };
    assert_eq!(within("ALTER", connection.request(alter)).await.unwrap(), Response::ChannelAltered);
    publish(&connection, "orders", Some(1), vec![Message::from_payload("p1")]).await.unwrap();
    match within("an event", single.next()).await {
        Some(Ok(Event::Message { partition, record })) => assert_eq!((partition, record.offset), (1, 0)),
        other => panic!("expected partition 1's record and nothing before it, got {other:?}"),
    }
    assert_eq!(single.partitions(), [(1, 0)]);
    drop(connection);
    stop(server).await;
}

#[tokio::test]
async fn a_version_1_client_sees_partition_0_of_a_partitioned_channel() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "v2").await.unwrap();
    create(&connection, "orders", 3).await;
    publish(&connection, "orders", Some(2), vec![Message::from_payload("in partition 2")]).await.unwrap();

    let mut v1 = within("connect", tokio::net::TcpStream::connect(addr(&server))).await.unwrap();
    let frame = |request: Request, id| request.encode_for(1, id);
    v1.write_all(&hello(1, 1).encode(1)).await.unwrap();
    let (_, welcome) = read_response(&mut v1).await;
    assert!(matches!(welcome, Response::Welcome { version: 1, .. }), "{welcome:?}");
    // A version 1 publish goes to partition 0, whatever its key.
    let publish =
        Request::Publish { channel: "orders".into(), partition: None, producer: None, message: keyed("k", "v1") };
    v1.write_all(&frame(publish, 2)).await.unwrap();
    let (_, body) = common::raw::read_frame(&mut v1).await.unwrap().expect("an answer");
    let ack = Response::decode_for(1, 0x83, body).expect("a version 1 PUBLISH_ACK");
    assert!(matches!(ack, Response::PublishAck { partition: 0, first_offset: 0, .. }), "{ack:?}");
    // A version 1 fetch reads partition 0.
    let fetch =
        Request::Fetch { channel: "orders".into(), partition: 0, offset: 0, max_messages: 10, max_bytes: 1 << 20 };
    v1.write_all(&frame(fetch, 3)).await.unwrap();
    let (header, body) = common::raw::read_frame(&mut v1).await.unwrap().expect("an answer");
    match Response::decode_for(1, header.frame_type, body).unwrap() {
        Response::FetchResult { count, records, .. } => {
            assert_eq!(count, 1);
            let record = RecordIter::new(records).next().unwrap().unwrap();
            assert_eq!(record.payload, Bytes::from("v1"));
        }
        other => panic!("expected FETCH_RESULT, got {other:?}"),
    }
    stop(server).await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_data_directory_written_by_weir_0_1_opens_as_one_partition_channels_with_everything_readable() {
    let dir = TempDir::new().unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v0.1-data"), dir.path());
    let report = weir::storage::check::check_data_dir(
        dir.path(),
        &weir::storage::check::FsyncPolicies::all(weir::storage::FsyncPolicy::Always),
    )
    .unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "upgrade").await.unwrap();
    let orders = channel_info(&connection, "orders").await.expect("orders");
    assert_eq!(orders.partitions.len(), 1);
    assert_eq!((orders.partitions[0].start_offset, orders.partitions[0].next_offset), (0, 20));
    // The durable position written by 0.1 is partition 0's.
    let billing = orders.subscriptions.iter().find(|s| s.durable_name == "billing").expect("billing");
    assert_eq!((billing.partition, billing.next_offset), (0, 5));
    let options = SubscribeOptions { durable_name: Some("billing".into()), ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "orders", options).await.unwrap();
    let received = receive(&mut subscriber, 15).await;
    let payloads: Vec<Bytes> = received[&0].iter().map(|(_, payload)| payload.clone()).collect();
    let expected: Vec<Bytes> = (5..20).map(|i| Bytes::from(format!("order {i}"))).collect();
    assert_eq!(payloads, expected);
    let audit = SubscribeOptions { start: StartPosition::Earliest, ..SubscribeOptions::default() };
    let mut audit = Subscriber::subscribe(&connection, "audit", audit).await.unwrap();
    let received = receive(&mut audit, 3).await;
    assert_eq!(received[&0].iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), ["a", "b", "c"].map(Bytes::from));
    // And it keeps taking appends where 0.1 left off.
    assert_eq!(publish(&connection, "orders", None, vec![keyed("customer-7", "order 20")]).await.unwrap(), (0, 20));
    stop(server).await;
}

#[tokio::test]
async fn a_channel_is_deleted_with_its_files_and_positions_only_when_nobody_reads_it_or_by_force() {
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "delete").await.unwrap();
    create(&connection, "orders", 2).await;
    for partition in 0..2 {
        publish(&connection, "orders", Some(partition), vec![Message::from_payload("x")]).await.unwrap();
    }
    let durable = SubscribeOptions { durable_name: Some("billing".into()), ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "orders", durable.clone()).await.unwrap();
    receive(&mut subscriber, 2).await;
    let delete = |force| Request::DeleteChannel { channel: "orders".into(), force };
    let refused = within("DELETE", connection.request(delete(false))).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ChannelInUse), "{refused}");
    assert!(channel_info(&connection, "orders").await.is_some());

    // By force: the subscription ends with an error naming the deletion.
    assert_eq!(within("DELETE", connection.request(delete(true))).await.unwrap(), Response::ChannelDeleted);
    let ended = loop {
        match within("the end of the subscription", subscriber.next()).await {
            Some(Err(error)) => break error,
            Some(Ok(_)) => continue,
            None => panic!("ended without an error"),
        }
    };
    assert_eq!(ended.code(), Some(ErrorCode::UnknownChannel), "{ended}");
    assert!(ended.to_string().contains("deleted"), "{ended}");
    assert!(channel_info(&connection, "orders").await.is_none());
    assert!(!dir.path().join("channels").join("orders").exists(), "its files are gone");
    let refused = within("DELETE", connection.request(delete(false))).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::UnknownChannel), "{refused}");

    // A channel of the same name starts afresh: no partitions, offsets or
    // durable positions of the old one, also after a restart.
    publish(&connection, "orders", None, vec![Message::from_payload("new")]).await.unwrap();
    drop(subscriber);
    drop(connection);
    stop(server).await;
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "delete").await.unwrap();
    let info = channel_info(&connection, "orders").await.expect("recreated");
    assert_eq!(info.partitions.len(), 1);
    assert_eq!(info.partitions[0].next_offset, 1);
    assert!(info.subscriptions.is_empty(), "{info:?}");
    let resumed = Subscriber::subscribe(&connection, "orders", durable).await.unwrap();
    assert_eq!(resumed.partitions(), [(0, 0)], "the old durable position is gone");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitioned_publisher_routes_keys_as_kafka_does_and_stores_each_message_once() {
    use weir::client::{PartitionedPublisher, PublisherOptions};
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "admin").await.unwrap();
    create(&connection, "orders", 6).await;
    let publisher = PartitionedPublisher::connect(&addr(&server), "orders", PublisherOptions::default()).await.unwrap();
    assert_eq!(publisher.partition_count(), 6);
    for (key, partition) in kafka_partitions_of_known_keys() {
        let receipt = within("publish", publisher.publish(keyed(key, "v"))).await.unwrap();
        assert_eq!(receipt.partition, partition, "key {key:?}");
    }
    // Many keyed messages, pipelined: each stored once, in its key's partition.
    let mut receipts = Vec::new();
    for i in 0..300u32 {
        let key = format!("customer-{}", i % 17);
        receipts.push((key.clone(), publisher.enqueue(keyed(&key, &i.to_string())).await.unwrap()));
    }
    let mut per_partition: BTreeMap<u32, u64> = BTreeMap::new();
    for (key, receipt) in receipts {
        let receipt = within("receipt", receipt).await.unwrap().unwrap();
        assert_eq!(receipt.partition, weir::partitioner::partition_for_key(key.as_bytes(), 6));
        *per_partition.entry(receipt.partition).or_default() += 1;
    }
    within("close", publisher.close()).await;
    let info = channel_info(&connection, "orders").await.expect("listed");
    let known = kafka_partitions_of_known_keys();
    for (partition, stored) in info.partitions.iter().enumerate() {
        let partition = partition as u32;
        let expected = per_partition.get(&partition).copied().unwrap_or(0)
            + known.iter().filter(|(_, p)| *p == partition).count() as u64;
        assert_eq!(stored.next_offset, expected, "partition {partition}: every message once");
    }
    stop(server).await;
}

#[tokio::test]
async fn a_subscriber_to_every_partition_holds_a_full_window_of_each_without_overflowing() {
    // Windows are per partition: a subscriber that does not read for a
    // while may be sent a window of every partition, one frame each.
    const PARTITIONS: u32 = 4;
    const WINDOW: u32 = 50;
    let dir = TempDir::new().unwrap();
    let server = start(test_config(&dir)).await;
    let connection = Connection::connect(&addr(&server), "test").await.unwrap();
    create(&connection, "wide", PARTITIONS).await;
    let reader = Connection::connect(&addr(&server), "reader").await.unwrap();
    let options =
        SubscribeOptions { max_inflight: WINDOW, start: StartPosition::Earliest, ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&reader, "wide", options).await.unwrap();
    // One publish, so one delivery frame, per message.
    for partition in 0..PARTITIONS {
        for index in 0..WINDOW * 2 {
            publish(&connection, "wide", Some(partition), vec![keyed("", &format!("{partition}-{index}"))])
                .await
                .unwrap();
        }
    }
    // Wait until the broker has sent a whole window of every partition.
    within("a window of every partition delivered", async {
        loop {
            let info = channel_info(&connection, "wide").await.unwrap();
            if info.subscriptions.iter().filter(|sub| sub.next_offset == u64::from(WINDOW)).count()
                == PARTITIONS as usize
            {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut read = BTreeMap::<u32, u64>::new();
    while read.values().sum::<u64>() < u64::from(PARTITIONS * WINDOW * 2) {
        match within("the next message", subscriber.next()).await {
            Some(Ok(Event::Message { partition, record })) => {
                assert_eq!(record.offset, *read.get(&partition).unwrap_or(&0));
                *read.entry(partition).or_default() += 1;
                subscriber.ack_partition(partition, record.offset).await.unwrap();
            }
            Some(Ok(Event::Notice { .. })) => {}
            other => panic!("the subscription ended: {other:?}"),
        }
    }
    stop(server).await;
}
