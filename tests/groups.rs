//! Consumer groups over real TCP: members that share a channel's
//! partitions, balanced and sticky; failover when a member disconnects or
//! goes silent; records processed at least once, duplicates only for what
//! was unacknowledged at a move; committed positions that survive a
//! restart; partitions added later assigned; limits at N and N + 1.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use weir::client::{Connection, Event, SubscribeOptions, Subscriber};
use weir::config::Config;
use weir::protocol::{ChannelRetention, ErrorCode, Notice, Request, Response, StartPosition};
use weir::record::Message;

mod common;
use common::raw::{hello, read_response};
use common::{addr, start, stop, test_config, within};

const PARTITIONS: u32 = 6;

/// Members heartbeat every 100 ms and leave after 3 s of silence: generous
/// for a loaded machine, short enough for a test.
fn group_config(dir: &TempDir) -> Config {
    Config { heartbeat_interval_ms: 100, group_session_timeout_ms: 3000, ..test_config(dir) }
}

async fn create(connection: &Connection, channel: &str, partitions: u32) {
    let request = Request::CreateChannel {
        channel: channel.into(),
        retention: ChannelRetention::default(),
        partitions: Some(partitions),
    };
    assert_eq!(within("CREATE", connection.request(request)).await.unwrap(), Response::ChannelCreated);
}

async fn publish(connection: &Connection, channel: &str, partition: u32, payload: String) {
    let request = Request::Publish {
        channel: channel.into(),
        partition: Some(partition),
        producer: None,
        message: Message::from_payload(payload),
    };
    match within("a publish", connection.request(request)).await.unwrap() {
        Response::PublishAck { partition: stored, .. } => assert_eq!(stored, partition),
        other => panic!("expected PUBLISH_ACK, got {other:?}"),
    }
}

async fn member(server_addr: &str, group: &str) -> (Connection, Subscriber) {
    let connection = Connection::connect(server_addr, "member").await.unwrap();
    let options = SubscribeOptions {
        group: Some(group.into()),
        start: StartPosition::Earliest,
        max_inflight: 64,
        ..SubscribeOptions::default()
    };
    let subscriber = Subscriber::subscribe(&connection, "orders", options).await.unwrap();
    (connection, subscriber)
}

/// What one member saw: its current partitions and the records it
/// processed (acknowledged), per partition.
#[derive(Default, Debug)]
struct Seen {
    assigned: BTreeSet<u32>,
    records: BTreeMap<u32, Vec<(u64, Bytes)>>,
}

/// Reads events until `until` says the member has seen enough; acks every
/// record (when `ack` is set) and every revoked partition's deliveries.
async fn run_until(subscriber: &mut Subscriber, seen: &mut Seen, ack: bool, until: impl Fn(&Seen) -> bool) {
    while !until(seen) {
        match within("a group event", subscriber.next()).await {
            Some(Ok(Event::Notice { partition, notice: Notice::Assigned { .. } })) => {
                seen.assigned.insert(partition);
            }
            Some(Ok(Event::Notice { partition, notice: Notice::Revoked { .. } })) => {
                seen.assigned.remove(&partition);
            }
            Some(Ok(Event::Notice { .. })) => {}
            Some(Ok(Event::Message { partition, record })) => {
                assert!(seen.assigned.contains(&partition), "a record of partition {partition}, not assigned");
                if ack {
                    subscriber.ack_partition(partition, record.offset).await.unwrap();
                }
                seen.records.entry(partition).or_default().push((record.offset, record.payload));
            }
            Some(Err(error)) => panic!("the member's subscription failed: {error}"),
            None => panic!("the member's subscription ended"),
        }
    }
}

fn total(seen: &[&Seen]) -> usize {
    seen.iter().map(|s| s.records.values().map(Vec::len).sum::<usize>()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_six_partitions_and_a_dropped_members_partitions_move_with_nothing_lost() {
    let dir = TempDir::new().unwrap();
    let server = start(group_config(&dir)).await;
    let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
    create(&admin, "orders", PARTITIONS).await;
    // Members join one at a time, each waited for, so that every count
    // below only grows (the newcomer) or only shrinks (the others) on its
    // way to what is awaited.
    let has = |count: usize| move |seen: &Seen| seen.assigned.len() == count;
    let (_c1, mut m1) = member(&addr(&server), "billing").await;
    let mut s1 = Seen::default();
    run_until(&mut m1, &mut s1, true, has(6)).await;
    let (_c2, mut m2) = member(&addr(&server), "billing").await;
    let mut s2 = Seen::default();
    run_until(&mut m2, &mut s2, true, has(3)).await;
    run_until(&mut m1, &mut s1, true, has(3)).await;
    let (c3, mut m3) = member(&addr(&server), "billing").await;
    let mut s3 = Seen::default();
    // Balanced: two partitions each, once the handovers settle.
    run_until(&mut m3, &mut s3, true, has(2)).await;
    run_until(&mut m1, &mut s1, true, has(2)).await;
    run_until(&mut m2, &mut s2, true, has(2)).await;
    let union: BTreeSet<u32> = s1.assigned.iter().chain(&s2.assigned).chain(&s3.assigned).copied().collect();
    assert_eq!(union, (0..PARTITIONS).collect(), "every partition has exactly one owner");

    for partition in 0..PARTITIONS {
        for i in 0..10 {
            publish(&admin, "orders", partition, format!("p{partition}-{i}")).await;
        }
    }
    let all = |seen: &Seen| seen.records.values().map(Vec::len).sum::<usize>() == 20;
    run_until(&mut m1, &mut s1, true, all).await;
    run_until(&mut m2, &mut s2, true, all).await;
    run_until(&mut m3, &mut s3, true, all).await;
    // Let the acks reach the broker, then drop the third member.
    let _ = within("PING", c3.request(Request::Ping)).await;
    let moved: BTreeSet<u32> = s3.assigned.clone();
    drop(m3);
    drop(c3);
    for partition in 0..PARTITIONS {
        for i in 10..15 {
            publish(&admin, "orders", partition, format!("p{partition}-{i}")).await;
        }
    }
    // The survivors take its two partitions and read everything after what
    // it acknowledged: nothing twice, nothing lost.
    let three = |seen: &Seen| seen.assigned.len() == 3 && seen.records.values().map(Vec::len).sum::<usize>() == 35;
    run_until(&mut m1, &mut s1, true, three).await;
    run_until(&mut m2, &mut s2, true, three).await;
    assert!(moved.iter().all(|p| s1.assigned.contains(p) || s2.assigned.contains(p)), "{moved:?}");
    let mut by_partition: BTreeMap<u32, Vec<(u64, Bytes)>> = BTreeMap::new();
    for seen in [&s1, &s2, &s3] {
        for (partition, records) in &seen.records {
            by_partition.entry(*partition).or_default().extend(records.iter().cloned());
        }
    }
    for partition in 0..PARTITIONS {
        let mut records = by_partition.remove(&partition).unwrap_or_default();
        records.sort();
        let expected: Vec<(u64, Bytes)> = (0..15).map(|i| (i, Bytes::from(format!("p{partition}-{i}")))).collect();
        assert_eq!(records, expected, "partition {partition}: every record exactly once");
    }
    assert_eq!(total(&[&s1, &s2, &s3]), 90);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_leaves_its_group_and_its_unacknowledged_records_go_to_the_others() {
    let dir = TempDir::new().unwrap();
    let server = start(group_config(&dir)).await;
    let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
    create(&admin, "orders", 2).await;
    let (_c1, mut m1) = member(&addr(&server), "billing").await;
    let mut s1 = Seen::default();
    run_until(&mut m1, &mut s1, true, |seen| seen.assigned.len() == 2).await;

    // A raw member that never sends another frame (no heartbeat).
    let mut silent = within("connect", tokio::net::TcpStream::connect(addr(&server))).await.unwrap();
    silent.write_all(&hello(2, 2).encode(1)).await.unwrap();
    let _ = read_response(&mut silent).await;
    let subscribe = Request::Subscribe {
        subscription_id: 7,
        channel: "orders".into(),
        partition: None,
        start: StartPosition::Earliest,
        durable_name: None,
        group: Some("billing".into()),
        max_inflight: 64,
    };
    silent.write_all(&subscribe.encode(2)).await.unwrap();
    // It is assigned a partition (after the first member lets one go), gets
    // its records and acknowledges nothing.
    run_until(&mut m1, &mut s1, true, |seen| seen.assigned.len() == 1).await;
    let taken = (0..2).find(|p| !s1.assigned.contains(p)).unwrap();
    publish(&admin, "orders", taken, "unacknowledged".into()).await;
    let mut got_record = false;
    let mut expired = false;
    while !expired {
        let (_, response) = read_response(&mut silent).await;
        match response {
            Response::Deliver { partition, .. } => {
                assert_eq!(partition, taken);
                got_record = true;
            }
            Response::Error { code, .. } => {
                assert_eq!(ErrorCode::from_u16(code), Some(ErrorCode::GroupSessionExpired));
                expired = true;
            }
            _ => {}
        }
    }
    assert!(got_record, "the silent member was sent the record before it expired");
    // The record it never acknowledged reaches the remaining member.
    run_until(&mut m1, &mut s1, true, |seen| {
        seen.assigned.len() == 2
            && seen.records.get(&taken).is_some_and(|records| records.iter().any(|(_, p)| p == "unacknowledged"))
    })
    .await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_positions_survive_a_restart_and_new_partitions_are_assigned() {
    let dir = TempDir::new().unwrap();
    {
        let server = start(group_config(&dir)).await;
        let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
        create(&admin, "orders", 2).await;
        for partition in 0..2 {
            for i in 0..5 {
                publish(&admin, "orders", partition, format!("p{partition}-{i}")).await;
            }
        }
        let (connection, mut m1) = member(&addr(&server), "billing").await;
        let mut s1 = Seen::default();
        run_until(&mut m1, &mut s1, true, |seen| seen.records.values().map(Vec::len).sum::<usize>() == 10).await;
        let _ = within("PING", connection.request(Request::Ping)).await;
        drop(m1);
        drop(connection);
        stop(server).await;
    }
    let server = start(group_config(&dir)).await;
    let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
    publish(&admin, "orders", 1, "p1-5".into()).await;
    // Nobody is connected: the group is listed with its committed
    // positions and its lag.
    let listed = within("LIST_GROUPS", admin.request(Request::ListGroups { channel: "orders".into() })).await.unwrap();
    let Response::Groups { groups } = listed else { panic!("expected GROUPS, got {listed:?}") };
    assert_eq!(groups.len(), 1);
    let group = &groups[0];
    assert_eq!((group.name.as_str(), group.member_count), ("billing", 0));
    let positions: Vec<(Option<u64>, u64)> = group.partitions.iter().map(|p| (p.committed, p.lag)).collect();
    assert_eq!(positions, [(Some(5), 0), (Some(5), 1)]);
    let (_connection, mut m1) = member(&addr(&server), "billing").await;
    let mut s1 = Seen::default();
    run_until(&mut m1, &mut s1, true, |seen| seen.records.values().map(Vec::len).sum::<usize>() == 1).await;
    assert_eq!(s1.records, BTreeMap::from([(1, vec![(5, Bytes::from("p1-5"))])]), "it resumes after the commit");

    // A partition added later goes to a member at once.
    let alter = Request::AlterChannel { channel: "orders".into(), partitions: 3 };
    assert_eq!(within("ALTER", admin.request(alter)).await.unwrap(), Response::ChannelAltered);
    run_until(&mut m1, &mut s1, true, |seen| seen.assigned.contains(&2)).await;
    publish(&admin, "orders", 2, "p2-0".into()).await;
    run_until(&mut m1, &mut s1, true, |seen| seen.records.contains_key(&2)).await;
    stop(server).await;
}

#[tokio::test]
async fn group_and_member_limits_hold_at_n_and_n_plus_1() {
    let dir = TempDir::new().unwrap();
    let config = Config { max_groups_per_channel: 2, max_members_per_group: 2, ..group_config(&dir) };
    let server = start(config).await;
    let connection = Connection::connect(&addr(&server), "limits").await.unwrap();
    create(&connection, "orders", 2).await;
    let join = |group: &str| {
        let options = SubscribeOptions { group: Some(group.into()), ..SubscribeOptions::default() };
        Subscriber::subscribe(&connection, "orders", options)
    };
    let _a1 = join("a").await.unwrap();
    let _a2 = join("a").await.unwrap();
    let refused = join("a").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManySubscriptions), "{refused}");
    assert!(refused.to_string().contains("max_members_per_group = 2"), "{refused}");
    let _b = join("b").await.unwrap();
    let refused = join("c").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManySubscriptions), "{refused}");
    assert!(refused.to_string().contains("max_groups_per_channel = 2"), "{refused}");
    // A group member names no partition and no durable name.
    let options = SubscribeOptions { group: Some("a".into()), partition: Some(0), ..SubscribeOptions::default() };
    let refused = Subscriber::subscribe(&connection, "orders", options).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidRequest), "{refused}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_order_holds_through_a_rebalance() {
    let dir = TempDir::new().unwrap();
    let server = start(group_config(&dir)).await;
    let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
    create(&admin, "orders", 4).await;
    let key_partition = weir::partitioner::partition_for_key(b"customer-7", 4);
    let publish_keyed = |i: u32| {
        let request = Request::Publish {
            channel: "orders".into(),
            partition: None,
            producer: None,
            message: Message {
                key: Bytes::from_static(b"customer-7"),
                headers: Vec::new(),
                payload: Bytes::from(i.to_string()),
            },
        };
        admin.request(request)
    };
    for i in 0..20 {
        within("publish", publish_keyed(i)).await.unwrap();
    }
    let (_c1, mut m1) = member(&addr(&server), "billing").await;
    let mut s1 = Seen::default();
    // The first member processes part of the key's records, then a second
    // member joins and the partitions are shared again.
    run_until(&mut m1, &mut s1, true, |seen| seen.records.get(&key_partition).is_some_and(|r| r.len() >= 5)).await;
    let (_c2, mut m2) = member(&addr(&server), "billing").await;
    let mut s2 = Seen::default();
    for i in 20..40 {
        within("publish", publish_keyed(i)).await.unwrap();
    }
    let done = |seen: &Seen| seen.assigned.len() == 2;
    run_until(&mut m2, &mut s2, true, done).await;
    let key_done =
        |seen: &Seen| seen.records.get(&key_partition).is_some_and(|r| r.last().is_some_and(|(o, _)| *o == 39));
    // Whichever member ends up with the key's partition reads it to the end.
    if s2.assigned.contains(&key_partition) {
        run_until(&mut m2, &mut s2, true, key_done).await;
    } else {
        run_until(&mut m1, &mut s1, true, key_done).await;
    }
    // Together, in offset order per member, the key's messages come in the
    // order they were published, each once.
    let mut payloads: Vec<(u64, Bytes)> = Vec::new();
    for seen in [&s1, &s2] {
        let records = seen.records.get(&key_partition).cloned().unwrap_or_default();
        assert!(records.windows(2).all(|w| w[0].0 < w[1].0), "in order within a member");
        payloads.extend(records);
    }
    payloads.sort();
    payloads.dedup();
    let expected: Vec<(u64, Bytes)> = (0..40u64).map(|i| (i, Bytes::from(i.to_string()))).collect();
    assert_eq!(payloads, expected);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_dies_before_acknowledging_hands_on_its_starting_position() {
    let dir = TempDir::new().unwrap();
    let server = start(group_config(&dir)).await;
    let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
    create(&admin, "orders", 1).await;
    let join = |start| {
        let addr = addr(&server);
        async move {
            let connection = Connection::connect(&addr, "member").await.unwrap();
            let options = SubscribeOptions { group: Some("billing".into()), start, ..SubscribeOptions::default() };
            let subscriber = Subscriber::subscribe(&connection, "orders", options).await.unwrap();
            (connection, subscriber)
        }
    };
    let (first_connection, mut first) = join(StartPosition::Latest).await;
    let mut seen = Seen::default();
    run_until(&mut first, &mut seen, false, |seen| seen.assigned.len() == 1).await;
    for i in 0..5 {
        publish(&admin, "orders", 0, format!("m{i}")).await;
    }
    run_until(&mut first, &mut seen, false, |seen| seen.records.get(&0).is_some_and(|r| r.len() == 5)).await;
    // It dies without acknowledging anything; the next member starts where
    // the first one started, not at a later "latest".
    drop(first);
    drop(first_connection);
    let (_second_connection, mut second) = join(StartPosition::Latest).await;
    let mut seen = Seen::default();
    run_until(&mut second, &mut seen, true, |seen| seen.records.get(&0).is_some_and(|r| r.len() == 5)).await;
    assert_eq!(seen.records[&0].iter().map(|(offset, _)| *offset).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_given_back_before_it_was_let_go_is_read_again() {
    let dir = TempDir::new().unwrap();
    let server = start(group_config(&dir)).await;
    let admin = Connection::connect(&addr(&server), "admin").await.unwrap();
    create(&admin, "orders", 2).await;
    for partition in 0..2 {
        for i in 0..3 {
            publish(&admin, "orders", partition, format!("p{partition}-{i}")).await;
        }
    }
    let (_c1, mut m1) = member(&addr(&server), "billing").await;
    let mut s1 = Seen::default();
    // It reads everything and acknowledges nothing, so a revoked partition
    // cannot be let go.
    run_until(&mut m1, &mut s1, false, |seen| seen.records.values().map(Vec::len).sum::<usize>() == 6).await;
    let (c2, m2) = member(&addr(&server), "billing").await;
    run_until(&mut m1, &mut s1, false, |seen| seen.assigned.len() == 1).await;
    let revoked = (0..2).find(|p| !s1.assigned.contains(p)).unwrap();
    // The newcomer leaves before it got the partition: it comes back to the
    // first member, which reads it again from the committed position.
    drop(m2);
    drop(c2);
    s1.records.clear();
    run_until(&mut m1, &mut s1, true, |seen| {
        seen.assigned.len() == 2 && seen.records.get(&revoked).is_some_and(|records| records.len() == 3)
    })
    .await;
    assert_eq!(s1.records[&revoked].iter().map(|(offset, _)| *offset).collect::<Vec<_>>(), [0, 1, 2]);
    stop(server).await;
}
