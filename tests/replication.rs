//! Replicated partitions (docs/REPLICATION.md), run as three real `weir
//! serve` processes on 127.0.0.1: a channel of replication factor 3 is
//! created with `weir cluster create-channel`, a publisher publishes to it
//! without pause, following `NotLeader` answers, while the partition's
//! leader is killed with SIGKILL (one round in three paused with SIGSTOP,
//! one in six stopped gracefully with SIGTERM, which hands its leadership
//! over first) at seeded moments and brought back; then every node is killed at once
//! (a majority crash) and started again.
//!
//! Checker, after the faults: every replica holds the same records (payload
//! and timestamp) at the same offsets, offsets dense from 0; every acknowledged publish is there
//! exactly once at its acknowledged offset; a publish whose outcome the
//! publisher could not know (its connection died, or `OutcomeUnknown`) is
//! there at most once; nothing is there that was never published; and
//! publishes were acknowledged again after every fault. Alongside, the Rust
//! `Publisher` (idempotent, resending through the faults with the same
//! sequences) has every publish acknowledged, and each is stored exactly
//! once, at the offset it was acknowledged at: the partition deduplicates
//! the retries whose originals were committed.
//!
//! A second test cuts the partition's leader off from the other nodes
//! (fault-injecting proxies in front of every node's cluster listener):
//! a publish to it is never acknowledged, the majority elects a new leader
//! that takes publishes, and after healing the old leader's uncommitted
//! entry is gone from every replica; the Rust publisher, connected to a
//! follower, follows `NotLeader` to the leader.
//!
//! Others: METADATA on every node; durable and group positions resuming
//! on another node; a follower down while retention deleted, on the
//! leader, the records it lacks catching up from the Raft log.
//!
//! `WEIR_REPLICATION_FAULTS` (default 10) sets the number of faults and
//! `WEIR_CLUSTER_SEED` (default 1) the seed; a failure prints the seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::cluster::{
    CONVERGE_LIMIT, ELECTION_MAX_MS, Node, cut_off, env_or, heal, start_another, status, three_nodes,
    three_nodes_timed, three_proxied_nodes, weir_cluster,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use weir::client::{
    ClientError, Connection, FollowOptions, Followed, FollowingSubscriber, SubscribeOptions, Subscriber,
};
use weir::cluster::PartitionStatus;
use weir::protocol::{ErrorCode, Request, Response};
use weir::record::{Message, RecordIter};

const CHANNEL: &str = "events";

/// How long filling a partition's deduplication window may take before
/// the test fails (generous: a loaded machine, a debug build).
const FILL_LIMIT: Duration = Duration::from_secs(300);

/// The partition's group as `node` sees it, if it hosts it.
async fn partition_status(node: &Node) -> Option<PartitionStatus> {
    let status = status(node).await?;
    status.partitions.into_iter().find(|partition| partition.channel == CHANNEL && partition.partition == 0)
}

/// Polls the running nodes until they all host the partition and follow
/// one leader among them; returns it and its term.
async fn partition_leader(nodes: &[&Node], seed: u64) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for node in nodes {
            if let Some(status) = partition_status(node).await {
                seen.push((status.leader, status.term));
            }
        }
        if seen.len() == nodes.len()
            && let Some(&(Some(leader), term)) = seen.first()
            && seen.iter().all(|&other| other == (Some(leader), term))
            && nodes.iter().any(|node| node.spec.id == leader)
        {
            return (leader, term);
        }
        assert!(
            started.elapsed() < CONVERGE_LIMIT,
            "the replicas did not agree on a leader within {CONVERGE_LIMIT:?}: {seen:?}; seed {seed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the publisher knows.
#[derive(Clone, Default)]
struct Ledger {
    /// Acknowledged: offset -> payload.
    acked: BTreeMap<u64, String>,
    /// Published, outcome unknown.
    uncertain: BTreeSet<String>,
    /// Every payload ever sent.
    sent: BTreeSet<String>,
    /// When each acknowledgement arrived, and from which node.
    acked_at: Vec<(Instant, String)>,
}

/// Publishes `m0`, `m1`, ... one at a time until `stop`, to whichever node
/// the last `NotLeader` named (or the next one, when a node is down).
async fn publish_until(ledger: Arc<Mutex<Ledger>>, addrs: Vec<String>, stop: Arc<tokio::sync::Notify>) {
    let mut target = 0usize;
    let mut connection: Option<Connection> = None;
    let mut sequence = 0u64;
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let connected = match connection.take() {
            Some(connection) => Some(connection),
            None => tokio::time::timeout(Duration::from_secs(5), Connection::connect(&addrs[target], "replication"))
                .await
                .ok()
                .and_then(Result::ok),
        };
        let Some(conn) = connected else {
            target = (target + 1) % addrs.len();
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(Duration::from_millis(50)) => continue,
            }
        };
        let payload = format!("m{sequence}");
        sequence += 1;
        ledger.lock().unwrap().sent.insert(payload.clone());
        let request = Request::Publish {
            channel: CHANNEL.into(),
            partition: Some(0),
            producer: None,
            message: Message::from_payload(payload.clone().into_bytes()),
        };
        let answer = tokio::select! {
            () = &mut stopped => {
                ledger.lock().unwrap().uncertain.insert(payload);
                return;
            }
            answer = tokio::time::timeout(Duration::from_secs(10), conn.request(request)) => answer,
        };
        match answer {
            Ok(Ok(Response::PublishAck { first_offset, count: 1, .. })) => {
                let mut ledger = ledger.lock().unwrap();
                if let Some(earlier) = ledger.acked.insert(first_offset, payload.clone()) {
                    panic!("offset {first_offset} acknowledged twice: {earlier} and {payload}");
                }
                ledger.acked_at.push((Instant::now(), addrs[target].clone()));
                connection = Some(conn);
            }
            Ok(Err(error)) if error.code() == Some(ErrorCode::NotLeader) => {
                // Nothing was stored: go where it says.
                let leader = match &error {
                    ClientError::Server { message, .. } => message.rsplit("leader: ").next().unwrap_or("").to_string(),
                    _ => String::new(),
                };
                match addrs.iter().position(|addr| *addr == leader) {
                    Some(index) => target = index,
                    None => {
                        connection = Some(conn);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            other => {
                // Lost connection, timeout, OutcomeUnknown: it may be stored.
                if let Ok(Err(error)) = &other {
                    assert!(
                        matches!(error.code(), Some(ErrorCode::OutcomeUnknown) | None),
                        "unexpected answer to a publish: {error}"
                    );
                } else if let Ok(Ok(response)) = &other {
                    panic!("unexpected answer to a publish: {response:?}");
                }
                ledger.lock().unwrap().uncertain.insert(payload);
                target = (target + 1) % addrs.len();
            }
        }
    }
}

/// Publishes `p0`, `p1`, ... through the Rust `Publisher` (idempotent,
/// following `NotLeader`, resending after a lost connection or
/// `OutcomeUnknown` with the same sequences), up to 16 in flight, until
/// `stop`; returns every payload with the offset it was acknowledged at.
/// Every publish must be acknowledged: the publisher retries through the
/// faults.
async fn publish_idempotently(addr: String, stop: Arc<tokio::sync::Notify>, seed: u64) -> (Vec<(String, u64)>, usize) {
    let options = weir::client::PublisherOptions {
        reconnect_attempts: 100,
        batch_max_messages: 4,
        ..weir::client::PublisherOptions::default()
    };
    let publisher = weir::client::Publisher::connect(&addr, CHANNEL, options).await.expect("the publisher connects");
    type Answer = tokio::sync::oneshot::Receiver<Result<weir::client::Receipt, ClientError>>;
    let mut in_flight: std::collections::VecDeque<(String, Answer)> = std::collections::VecDeque::new();
    let mut acknowledged = Vec::new();
    let mut duplicates = 0;
    let mut settle = |payload: String, receipt: Result<weir::client::Receipt, ClientError>| {
        let receipt = receipt.unwrap_or_else(|error| panic!("publish of {payload} failed: {error}; seed {seed}"));
        duplicates += usize::from(receipt.duplicate);
        acknowledged.push((payload, receipt.offset));
    };
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let mut next = 0u64;
    loop {
        if in_flight.len() >= 16 {
            let (payload, receipt) = in_flight.pop_front().unwrap();
            settle(payload, receipt.await.expect("an answer"));
            continue;
        }
        let payload = format!("p{next}");
        next += 1;
        let receipt = tokio::select! {
            () = &mut stopped => break,
            receipt = publisher.enqueue(Message::from_payload(payload.clone().into_bytes())) => receipt.expect("queued"),
        };
        in_flight.push_back((payload, receipt));
        tokio::task::yield_now().await;
    }
    for (payload, receipt) in in_flight {
        settle(payload, receipt.await.expect("an answer"));
    }
    publisher.close().await;
    (acknowledged, duplicates)
}

/// What the durable consumer saw.
#[derive(Default)]
struct Consumed {
    /// Every delivery, in order: (node address, offset, payload).
    deliveries: Vec<(String, u64, String)>,
    /// Subscriptions it made (one per node it moved to).
    sessions: usize,
}

/// Reads partition 0 as the durable subscription `checker` from any node,
/// acknowledging every message at once, moving to the next node whenever
/// its node fails, until it has been delivered offset `until - 1` (sent
/// once publishing is over). Checks as it goes that it never skips: within
/// a subscription offsets follow one another, and a new subscription
/// starts at or before one past the last offset acknowledged.
async fn consume_durably(addrs: Vec<String>, until: tokio::sync::oneshot::Receiver<u64>, seed: u64) -> Consumed {
    let mut consumed = Consumed::default();
    let mut until = until;
    let mut end: Option<u64> = None;
    let mut last_acked: Option<u64> = None;
    let mut target = 0usize;
    loop {
        let addr = addrs[target].clone();
        target = (target + 1) % addrs.len();
        let Ok(Ok(connection)) =
            tokio::time::timeout(Duration::from_secs(5), Connection::connect(&addr, "durable-consumer")).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let options = weir::client::SubscribeOptions {
            partition: Some(0),
            start: weir::protocol::StartPosition::Earliest,
            durable_name: Some("checker".into()),
            max_inflight: 64,
            ..weir::client::SubscribeOptions::default()
        };
        let subscribed = tokio::time::timeout(
            Duration::from_secs(5),
            weir::client::Subscriber::subscribe(&connection, CHANNEL, options),
        )
        .await;
        let Ok(Ok(mut subscriber)) = subscribed else { continue };
        consumed.sessions += 1;
        let mut previous: Option<u64> = None;
        loop {
            if end.is_none()
                && let Ok(last) = until.try_recv()
            {
                end = Some(last);
            }
            if let (Some(end), Some(acked)) = (end, last_acked)
                && acked + 1 >= end
            {
                return consumed;
            }
            // A paused node sends nothing: after a while, try another.
            let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_secs(5), subscriber.next()).await else {
                break;
            };
            let weir::client::Event::Message { record, .. } = event else { continue };
            let offset = record.offset;
            match previous {
                Some(previous) => assert_eq!(
                    offset,
                    previous + 1,
                    "the consumer skipped within a subscription on {addr}; seed {seed}"
                ),
                None => assert!(
                    offset <= last_acked.map_or(0, |acked| acked + 1),
                    "the consumer resumed on {addr} at {offset}, past its last ack {last_acked:?}: skipped; seed {seed}"
                ),
            }
            previous = Some(offset);
            consumed.deliveries.push((addr.clone(), offset, String::from_utf8(record.payload.to_vec()).unwrap()));
            if subscriber.ack_partition(0, offset).await.is_err() {
                break;
            }
            last_acked = Some(last_acked.map_or(offset, |acked| acked.max(offset)));
        }
    }
}

/// Every record of the partition as `addr` holds it, in order: offset,
/// timestamp, payload.
async fn read_all(addr: &str) -> Vec<(u64, u64, String)> {
    read_from(addr, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_leader_kills_on_every_replica() {
    let seed = env_or("WEIR_CLUSTER_SEED", 1);
    let faults = env_or("WEIR_REPLICATION_FAULTS", 10);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), true);
    for node in &mut nodes {
        node.start();
    }
    // Any node takes the command: a follower answers NotLeader, which the
    // CLI follows.
    let created = create_channel(&nodes[1], seed).await;
    assert!(created.contains("partition 0: nodes"), "{created}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["cluster", "create-channel", CHANNEL, "--node", &nodes[0].spec.cluster_addr])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a replicated channel was created twice");
    let (mut leader, _) = partition_leader(&nodes.iter().collect::<Vec<_>>(), seed).await;
    let printed = weir_cluster(&["status", "--node", &nodes[0].spec.cluster_addr]);
    assert!(printed.contains(CHANNEL), "status lists the hosted partition: {printed}");

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let addrs: Vec<String> = nodes.iter().map(|node| node.spec.client_addr.clone()).collect();
    let publisher = tokio::spawn(publish_until(Arc::clone(&ledger), addrs.clone(), Arc::clone(&stop)));
    let idempotent_stop = Arc::new(tokio::sync::Notify::new());
    let idempotent = tokio::spawn(publish_idempotently(addrs[2].clone(), Arc::clone(&idempotent_stop), seed));
    let (consume_until, until) = tokio::sync::oneshot::channel();
    let consumer = tokio::spawn(consume_durably(addrs.clone(), until, seed));
    let acked_count = |ledger: &Mutex<Ledger>| ledger.lock().unwrap().acked.len();
    let wait_for_acks = |at_least: usize, what: String| {
        let ledger = Arc::clone(&ledger);
        async move {
            let started = Instant::now();
            while acked_count(&ledger) < at_least {
                assert!(started.elapsed() < CONVERGE_LIMIT, "no publish acknowledged {what}; seed {seed}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for_acks(20, "before the faults".into()).await;

    // From the fault to the first acknowledged publish after it, for kills
    // and pauses apart: a publish in flight to a paused leader waits for
    // the publisher's own timeout (10 s) before it tries elsewhere.
    // A graceful stop (SIGTERM) hands the leadership over first.
    let mut failovers: [Vec<Duration>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..ELECTION_MAX_MS))).await;
        let index = nodes.iter().position(|node| node.spec.id == leader).unwrap();
        // 0: SIGKILL, 1: SIGSTOP, 2: SIGTERM.
        let fault = match rng.random_range(0..6) {
            0 | 1 => 1,
            2 => 2,
            _ => 0,
        };
        let faulted_at = Instant::now();
        match fault {
            1 => nodes[index].signal("STOP"),
            2 => assert!(nodes[index].stop_gracefully().await, "a graceful stop failed; seed {seed}"),
            _ => nodes[index].kill(),
        }
        let others: Vec<&Node> = nodes.iter().enumerate().filter(|&(i, _)| i != index).map(|(_, node)| node).collect();
        let (new_leader, _) = partition_leader(&others, seed).await;
        assert_ne!(new_leader, leader, "round {round}; seed {seed}");
        // Publishes acknowledged again, by another node (an answer the
        // faulted leader sent just before the fault may arrive after it).
        let faulted_addr = nodes[index].spec.client_addr.clone();
        let first_ack = loop {
            let found = ledger
                .lock()
                .unwrap()
                .acked_at
                .iter()
                .find(|(at, by)| *at > faulted_at && *by != faulted_addr)
                .map(|(at, _)| *at);
            if let Some(at) = found {
                break at;
            }
            assert!(faulted_at.elapsed() < CONVERGE_LIMIT, "no publish acknowledged after fault {round}; seed {seed}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        failovers[fault].push(first_ack - faulted_at);
        if fault == 1 {
            nodes[index].signal("CONT");
        } else {
            nodes[index].start();
        }
        (leader, _) = partition_leader(&nodes.iter().collect::<Vec<_>>(), seed).await;
    }
    // The changes of leader were counted (before every node restarts and
    // its counters start again).
    let series = |name: &str| format!("{name}{{group=\"partition\",channel=\"{CHANNEL}\",partition=\"0\"}}");
    let mut leader_changes = 0.0;
    for node in &nodes {
        let page = common::prometheus::scrape(&node.spec.metrics_addr).await;
        leader_changes += common::prometheus::sample(&page, &series("weir_raft_leader_changes_total")).unwrap_or(0.0);
    }
    assert!(leader_changes >= 1.0, "no change of leader counted; seed {seed}");

    // A majority crash: every node SIGKILLed at once, then started again.
    // Every replica recovers at once (a process crash keeps the page cache:
    // a power loss is the simulator's, tests/power_loss.rs).
    let crashed_at = Instant::now();
    for node in &mut nodes {
        node.kill();
    }
    for node in &mut nodes {
        node.start();
    }
    partition_leader(&nodes.iter().collect::<Vec<_>>(), seed).await;
    loop {
        if ledger.lock().unwrap().acked_at.iter().any(|(at, _)| *at > crashed_at) {
            break;
        }
        assert!(
            crashed_at.elapsed() < CONVERGE_LIMIT,
            "no publish acknowledged after every node was killed; seed {seed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_acks(acked_count(&ledger) + 20, "after the last fault".into()).await;
    stop.notify_one();
    idempotent_stop.notify_one();
    publisher.await.unwrap();
    let idempotent = idempotent.await.unwrap();

    // Healed: every replica applies what was committed, and its metrics
    // say so (an entry still in flight when the publisher stopped may
    // commit meanwhile: polled until all agree).
    let started = Instant::now();
    loop {
        let mut applied = Vec::new();
        for node in &nodes {
            applied.push(partition_status(node).await.map(|status| (status.committed_index, status.applied_index)));
        }
        let first = applied[0];
        let mut metrics_agree = true;
        if let Some((Some(committed), applied_index)) = first
            && Some(committed) == applied_index
            && applied.iter().all(|other| *other == first)
        {
            for node in &nodes {
                let page = common::prometheus::scrape(&node.spec.metrics_addr).await;
                let commit_index = common::prometheus::sample(&page, &series("weir_raft_commit_index"));
                metrics_agree &= commit_index == Some(committed as f64);
            }
            if metrics_agree {
                break;
            }
        }
        assert!(
            started.elapsed() < CONVERGE_LIMIT,
            "the replicas (or their weir_raft_commit_index) did not converge: {applied:?}; seed {seed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut replicas = Vec::new();
    for addr in &addrs {
        replicas.push(read_all(addr).await);
    }
    // The durable consumer reads to the end, then every record it was
    // delivered is the record at that offset, and it saw every offset.
    consume_until.send(replicas[0].len() as u64).unwrap();
    let consumed = tokio::time::timeout(CONVERGE_LIMIT, consumer)
        .await
        .unwrap_or_else(|_| panic!("the durable consumer did not reach the end; seed {seed}"))
        .unwrap();
    let mut delivered = BTreeSet::new();
    for (addr, offset, payload) in &consumed.deliveries {
        let stored = &replicas[0][*offset as usize];
        assert_eq!(&stored.2, payload, "{addr} delivered offset {offset} with another payload; seed {seed}");
        delivered.insert(*offset);
    }
    assert_eq!(delivered.len(), replicas[0].len(), "the consumer missed records; seed {seed}");
    let ledger = ledger.lock().unwrap();
    for (index, records) in replicas.iter().enumerate() {
        assert_eq!(records, &replicas[0], "replica {} differs from replica 1; seed {seed}", index + 1);
    }
    let records = &replicas[0];
    for (position, (offset, _, _)) in records.iter().enumerate() {
        assert_eq!(*offset, position as u64, "offsets are not dense; seed {seed}");
    }
    // The idempotent publisher's: every publish acknowledged, and stored
    // exactly once, at the offset it was acknowledged at.
    let (idempotent, duplicates) = idempotent;
    let idempotent: BTreeMap<String, u64> = idempotent.into_iter().collect();
    for (payload, offset) in &idempotent {
        assert!(
            records.get(*offset as usize).is_some_and(|(_, _, stored)| stored == payload),
            "idempotent {payload} acknowledged at offset {offset} is not there; seed {seed}"
        );
    }
    let mut seen = BTreeSet::new();
    for (offset, _, payload) in records {
        if payload.starts_with('p') {
            assert!(seen.insert(payload.clone()), "idempotent {payload} stored twice; seed {seed}");
            assert_eq!(
                idempotent.get(payload),
                Some(offset),
                "{payload} stored but not acknowledged there; seed {seed}"
            );
            continue;
        }
        assert!(seen.insert(payload.clone()), "{payload} stored twice; seed {seed}");
        assert!(ledger.sent.contains(payload), "{payload} stored but never published; seed {seed}");
        if let Some(acked) = ledger.acked.get(offset) {
            assert_eq!(acked, payload, "offset {offset} holds another publish than was acknowledged; seed {seed}");
        } else {
            assert!(ledger.uncertain.contains(payload), "{payload} stored though refused; seed {seed}");
        }
    }
    for (offset, payload) in &ledger.acked {
        assert!(
            records.get(*offset as usize).is_some_and(|(_, _, stored)| stored == payload),
            "acknowledged {payload} at offset {offset} is missing; seed {seed}"
        );
    }
    println!(
        "{} records, {} acknowledged, {} uncertain; idempotent publisher: {} acknowledged, each stored once, {duplicates} answered as retries; durable consumer: {} deliveries ({} redelivered) over {} subscriptions, never skipping",
        records.len(),
        ledger.acked.len(),
        ledger.uncertain.len(),
        idempotent.len(),
        consumed.deliveries.len(),
        consumed.deliveries.len() - delivered.len(),
        consumed.sessions
    );
    for (fault, times) in ["SIGKILL", "SIGSTOP", "SIGTERM"].iter().zip(&mut failovers) {
        times.sort();
        println!(
            "{fault} of the leader to the first acknowledged publish, {} faults: {:?}",
            times.len(),
            times.iter().map(|time| format!("{:.2}", time.as_secs_f64())).collect::<Vec<_>>()
        );
    }
}

/// Creates the replicated channel through `node`, retrying while the
/// metadata group elects its first leader.
async fn create_channel(node: &Node, seed: u64) -> String {
    create_channel_with(node, CHANNEL, 1, 3, seed).await
}

async fn create_channel_with(node: &Node, name: &str, partitions: u32, replication_factor: u8, seed: u64) -> String {
    let started = Instant::now();
    loop {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["cluster", "create-channel", name, "--partitions", &partitions.to_string()])
            .args(["--replication-factor", &replication_factor.to_string()])
            .args(["--node", &node.spec.cluster_addr])
            .output()
            .unwrap();
        if output.status.success() {
            return String::from_utf8_lossy(&output.stdout).into_owned();
        }
        assert!(
            started.elapsed() < CONVERGE_LIMIT,
            "create-channel kept failing: {}; seed {seed}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One publish of `payload` to `addr`: its answer, or `None` when none
/// came within `wait`.
async fn publish_once(addr: &str, payload: &str, wait: Duration) -> Option<Result<Response, ClientError>> {
    let conn = Connection::connect(addr, "cut-off").await.ok()?;
    let request = Request::Publish {
        channel: CHANNEL.into(),
        partition: Some(0),
        producer: None,
        message: Message::from_payload(payload.as_bytes().to_vec()),
    };
    tokio::time::timeout(wait, conn.request(request)).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_cut_off_acknowledges_nothing_and_the_majority_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.21, .22, .23: every node calls from its own address.
    let (mut nodes, proxies) = three_proxied_nodes(dir.path(), 20, false).await;
    for node in &mut nodes {
        node.start();
    }
    create_channel(&nodes[0], 0).await;
    let (leader, term) = partition_leader(&nodes.iter().collect::<Vec<_>>(), 0).await;
    let old = nodes.iter().find(|node| node.spec.id == leader).unwrap();
    let acked = publish_once(&old.spec.client_addr, "before", CONVERGE_LIMIT).await;
    assert!(matches!(acked, Some(Ok(Response::PublishAck { first_offset: 0, .. }))), "{acked:?}");

    // Cut off both ways; the test itself calls from 127.0.0.1.
    cut_off(&proxies, 20, leader);
    // At once, while it may still think it leads: never acknowledged.
    let cut_off = publish_once(&old.spec.client_addr, "cut-off", Duration::from_millis(4 * ELECTION_MAX_MS)).await;
    assert!(!matches!(cut_off, Some(Ok(Response::PublishAck { .. }))), "a cut-off leader acknowledged: {cut_off:?}");

    let majority: Vec<&Node> = nodes.iter().filter(|node| node.spec.id != leader).collect();
    let (new_leader, new_term) = partition_leader(&majority, 0).await;
    assert!(new_term > term && new_leader != leader);
    let new = nodes.iter().find(|node| node.spec.id == new_leader).unwrap();
    let taken = publish_once(&new.spec.client_addr, "after", CONVERGE_LIMIT).await;
    assert!(matches!(taken, Some(Ok(Response::PublishAck { first_offset: 1, .. }))), "{taken:?}");

    heal(&proxies);
    let (leader, _) = partition_leader(&nodes.iter().collect::<Vec<_>>(), 0).await;
    // The Rust publisher, connected to a follower, follows its NotLeader
    // answer to the leader.
    let follower = nodes.iter().find(|node| node.spec.id != leader).unwrap();
    let publisher = weir::client::Publisher::connect(
        &follower.spec.client_addr,
        CHANNEL,
        weir::client::PublisherOptions::default(),
    )
    .await
    .unwrap();
    let receipt = publisher.publish(Message::from_payload("followed")).await.unwrap();
    assert_eq!(receipt.offset, 2);
    publisher.close().await;
    // Every replica, the old leader included once it caught up, holds
    // exactly what was acknowledged.
    let started = Instant::now();
    for node in &nodes {
        loop {
            let records: Vec<String> =
                read_all(&node.spec.client_addr).await.into_iter().map(|(_, _, payload)| payload).collect();
            if records == ["before", "after", "followed"] {
                break;
            }
            assert!(
                started.elapsed() < CONVERGE_LIMIT,
                "node {} holds {records:?}, not the acknowledged [before, after, followed]",
                node.spec.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every node's METADATA, once every node names a leader for every
/// partition (4 in all) and all name the same ones.
async fn agreed_metadata(nodes: &[Node]) -> Vec<weir::client::Metadata> {
    let leaders = |metadata: &weir::client::Metadata| -> Vec<Option<u64>> {
        metadata.channels.iter().flat_map(|channel| channel.partitions.iter().map(|p| p.leader)).collect()
    };
    let started = Instant::now();
    loop {
        let mut answers = Vec::new();
        for node in nodes {
            let Ok(connection) = Connection::connect(&node.spec.client_addr, "metadata").await else { continue };
            answers.push(weir::client::Metadata::fetch(&connection, "").await.expect("METADATA"));
        }
        if answers.len() == nodes.len()
            && answers.iter().all(|answer| leaders(answer).len() == 4 && leaders(answer).iter().all(Option::is_some))
            && answers.iter().all(|answer| leaders(answer) == leaders(&answers[0]))
        {
            return answers;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the nodes' METADATA did not agree: {answers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// METADATA, asked of any node, names the leader of every partition of the
/// replicated channels, including partitions that node does not host
/// (their leaders report themselves to the metadata group), with the
/// replicas and every node's client address; a leader killed is replaced
/// in every node's answer; a Publisher connected to a node that hosts
/// nothing of its partition publishes there, and once another publisher
/// has filled the partition's deduplication window it is answered
/// `UnknownProducer` and goes on as a new producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_names_every_partitions_leader_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), false);
    for node in &mut nodes {
        node.start();
    }
    // Three partitions of one replica each: every node hosts one and
    // answers for the two it does not host from the reports.
    create_channel_with(&nodes[0], "spread", 3, 1, 0).await;
    create_channel(&nodes[1], 0).await;
    let node_ids: BTreeSet<u64> = nodes.iter().map(|node| node.spec.id).collect();

    let answers = agreed_metadata(&nodes).await;
    for (answer, node) in answers.iter().zip(&nodes) {
        assert!(answer.clustered);
        assert_eq!(answer.node_id, node.spec.id);
        let listed: BTreeMap<u64, &str> =
            answer.nodes.iter().map(|listed| (listed.node_id, listed.client_addr.as_str())).collect();
        for other in &nodes {
            assert_eq!(listed.get(&other.spec.id), Some(&other.spec.client_addr.as_str()), "{answer:?}");
        }
        let names: Vec<&str> = answer.channels.iter().map(|channel| channel.name.as_str()).collect();
        assert_eq!(names, [CHANNEL, "spread"]);
        let events = &answer.channels[0];
        assert_eq!(events.replication_factor, 3);
        assert_eq!(events.partitions[0].replicas.iter().copied().collect::<BTreeSet<_>>(), node_ids);
        let spread = &answer.channels[1];
        assert_eq!(spread.replication_factor, 1);
        for partition in &spread.partitions {
            assert_eq!(partition.replicas.len(), 1);
            assert_eq!(partition.leader, Some(partition.replicas[0]), "a single replica leads itself: {answer:?}");
        }
    }
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["metadata", "spread", "--addr", &nodes[2].spec.client_addr])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("of a cluster of 3") && printed.contains("spread"), "{printed}");
    assert!(!printed.contains(CHANNEL), "only the channel asked for: {printed}");

    // A Publisher on a node that hosts nothing of partition 1 of spread.
    let hosting = answers[0].channels[1].partitions[1].replicas[0];
    let elsewhere = nodes.iter().find(|node| node.spec.id != hosting).unwrap();
    let options = weir::client::PublisherOptions { partition: 1, ..weir::client::PublisherOptions::default() };
    let publisher = weir::client::Publisher::connect(&elsewhere.spec.client_addr, "spread", options).await.unwrap();
    let receipt = publisher.publish(Message::from_payload("routed")).await.unwrap();
    assert_eq!((receipt.partition, receipt.offset), (1, 0));
    // Another publisher fills the partition's deduplication window: the
    // first one, forgotten, is answered UnknownProducer for its next
    // sequence and goes on as a new producer, stored once.
    let leader_addr = answers[0].leader_addr("spread", 1).unwrap().to_string();
    let filler = Connection::connect(&leader_addr, "filler").await.unwrap();
    let window = weir::storage::REPLICATED_DEDUP_WINDOW_ENTRIES;
    let fillers = (0..window).map(|i| format!("filler {i}"));
    publish_pipelined(&filler, "spread", 1, fillers).await;
    let receipt = publisher.publish(Message::from_payload("after the window")).await.unwrap();
    assert_eq!((receipt.offset, receipt.duplicate), (window + 1, false));
    publisher.close().await;

    // The leader of events killed: every survivor names the new one.
    let leader = answers[0].channels[0].partitions[0].leader.unwrap();
    let index = nodes.iter().position(|node| node.spec.id == leader).unwrap();
    nodes[index].kill();
    let survivors: Vec<&Node> = nodes.iter().filter(|node| node.spec.id != leader).collect();
    let (new_leader, _) = partition_leader(&survivors, 0).await;
    let started = Instant::now();
    'converged: loop {
        let mut named = Vec::new();
        for node in &survivors {
            let connection = Connection::connect(&node.spec.client_addr, "metadata").await.unwrap();
            let answer = weir::client::Metadata::fetch(&connection, CHANNEL).await.unwrap();
            named.push(answer.channels[0].partitions[0].leader);
        }
        if named.iter().all(|named| *named == Some(new_leader)) {
            break 'converged;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "METADATA still names {named:?}, not {new_leader}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next message `subscriber` is sent (notices skipped): its offset and
/// payload.
async fn next_message(subscriber: &mut weir::client::Subscriber) -> (u64, String) {
    loop {
        let event = tokio::time::timeout(CONVERGE_LIMIT, subscriber.next())
            .await
            .expect("a delivery within the limit")
            .expect("the subscription goes on")
            .expect("no error");
        if let weir::client::Event::Message { record, .. } = event {
            return (record.offset, String::from_utf8(record.payload.to_vec()).unwrap());
        }
    }
}

/// A durable subscription and a consumer group of a replicated channel
/// acknowledge on one node; their positions reach the metadata group, and
/// once that node is killed, both resume on another node right after
/// what they acknowledged (not from the start, not past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_and_group_positions_resume_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), false);
    for node in &mut nodes {
        node.start();
    }
    create_channel(&nodes[0], 0).await;
    let (leader, _) = partition_leader(&nodes.iter().collect::<Vec<_>>(), 0).await;
    let publisher = weir::client::Publisher::connect(
        &nodes[0].spec.client_addr,
        CHANNEL,
        weir::client::PublisherOptions::default(),
    )
    .await
    .unwrap();
    for i in 0..10 {
        publisher.publish(Message::from_payload(format!("r{i}"))).await.unwrap();
    }
    publisher.close().await;

    // The first node leads the partition, and so coordinates the group
    // (the only partition's leader); it is killed below.
    let first_index = nodes.iter().position(|node| node.spec.id == leader).unwrap();
    let (first, second) = (&nodes[first_index], &nodes[(first_index + 1) % 3]);
    let durable = weir::client::SubscribeOptions {
        partition: Some(0),
        start: weir::protocol::StartPosition::Earliest,
        durable_name: Some("billing".into()),
        ..weir::client::SubscribeOptions::default()
    };
    {
        let connection = Connection::connect(&first.spec.client_addr, "subscriber").await.unwrap();
        let subscribed = weir::client::Subscriber::subscribe(&connection, CHANNEL, durable.clone()).await.unwrap();
        // A group member is sent to the group's coordinator, should the
        // metadata group not know the leader yet.
        let (_group_connection, member, _) =
            join_following(std::slice::from_ref(&first.spec.client_addr), CHANNEL, "audit").await;
        for mut subscriber in [subscribed, member] {
            for expected in 0..5 {
                let (offset, payload) = next_message(&mut subscriber).await;
                assert_eq!((offset, payload), (expected, format!("r{expected}")));
                subscriber.ack_partition(0, offset).await.unwrap();
            }
        }
        // Both positions reach the metadata group, as the second node sees
        // them (LIST_CHANNELS lists a durable position with nobody
        // connected; LIST_GROUPS a group's committed one).
        let watcher = Connection::connect(&second.spec.client_addr, "watcher").await.unwrap();
        let started = Instant::now();
        loop {
            let Response::Channels { channels } = watcher.request(Request::ListChannels).await.unwrap() else {
                panic!("expected CHANNELS");
            };
            let durable_at = channels
                .iter()
                .filter(|channel| channel.name == CHANNEL)
                .flat_map(|channel| &channel.subscriptions)
                .find(|subscription| subscription.durable_name == "billing")
                .map(|subscription| subscription.next_offset);
            let Response::Groups { groups } =
                watcher.request(Request::ListGroups { channel: CHANNEL.into() }).await.unwrap()
            else {
                panic!("expected GROUPS");
            };
            let group_at = groups
                .iter()
                .find(|group| group.name == "audit")
                .and_then(|group| group.partitions.first())
                .and_then(|partition| partition.committed);
            if durable_at == Some(5) && group_at == Some(5) {
                break;
            }
            assert!(
                started.elapsed() < CONVERGE_LIMIT,
                "positions not seen on another node: durable {durable_at:?}, group {group_at:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let second_addr = second.spec.client_addr.clone();
    let others: Vec<String> =
        nodes.iter().filter(|node| node.spec.id != leader).map(|node| node.spec.client_addr.clone()).collect();
    nodes[first_index].kill();
    let connection = Connection::connect(&second_addr, "subscriber").await.unwrap();
    let mut subscriber = weir::client::Subscriber::subscribe(&connection, CHANNEL, durable).await.unwrap();
    assert_eq!(next_message(&mut subscriber).await, (5, "r5".to_string()), "resumes after its last ack");
    // The group, at its new coordinator (the partition's new leader).
    let (_connection, mut member, _) = join_following(&others, CHANNEL, "audit").await;
    assert_eq!(next_message(&mut member).await, (5, "r5".to_string()), "the group resumes after its last ack");
}

/// The partition's start and next offsets on the node at `addr`.
async fn partition_range(addr: &str) -> (u64, u64) {
    let conn = Connection::connect(addr, "range").await.expect("connect for the range");
    match conn.request(Request::ListChannels).await.expect("LIST_CHANNELS") {
        Response::Channels { channels } => {
            let channel = channels.iter().find(|channel| channel.name == CHANNEL).expect("the channel is listed");
            (channel.partitions[0].start_offset, channel.partitions[0].next_offset)
        }
        other => panic!("expected CHANNELS, got {other:?}"),
    }
}

/// Publishes `payloads` to `channel`'s `partition` over `connection`, 64
/// in flight, each answered `PUBLISH_ACK`; bounded by [`FILL_LIMIT`] so
/// that a stall fails the test instead of hanging it.
async fn publish_pipelined(
    connection: &Connection,
    channel: &str,
    partition: u32,
    payloads: impl Iterator<Item = String>,
) {
    let publish = async {
        let mut answers_due = std::collections::VecDeque::new();
        for payload in payloads {
            let request = Request::Publish {
                channel: channel.into(),
                partition: Some(partition),
                producer: None,
                message: Message::from_payload(payload),
            };
            answers_due.push_back(connection.send_request_pipelined(request).await.unwrap());
            if answers_due.len() >= 64 {
                let answer = answers_due.pop_front().unwrap().await.unwrap();
                assert!(matches!(answer, Ok(Response::PublishAck { .. })), "{answer:?}");
            }
        }
        for answer in answers_due {
            let answer = answer.await.unwrap();
            assert!(matches!(answer, Ok(Response::PublishAck { .. })), "{answer:?}");
        }
    };
    tokio::time::timeout(FILL_LIMIT, publish).await.expect("the publishes were answered within FILL_LIMIT");
}

/// Every record of partition 0 on the node at `addr` from `from` on.
async fn read_from(addr: &str, from: u64) -> Vec<(u64, u64, String)> {
    let conn = Connection::connect(addr, "checker").await.expect("connect to read");
    let mut records = Vec::new();
    let mut offset = from;
    loop {
        let fetch =
            Request::Fetch { channel: CHANNEL.into(), partition: 0, offset, max_messages: 1000, max_bytes: 1 << 20 };
        let Response::FetchResult { next_offset, records: bytes, .. } = conn.request(fetch).await.expect("fetch")
        else {
            panic!("expected FETCH_RESULT");
        };
        let before = records.len();
        for record in RecordIter::new(bytes) {
            let record = record.expect("an intact record");
            records.push((record.offset, record.timestamp_us, String::from_utf8(record.payload.to_vec()).unwrap()));
        }
        if records.len() == before {
            return records;
        }
        offset = next_offset;
    }
}

/// A follower down while the leader's retention deleted the records it
/// lacks catches up from the Raft log, which the leader keeps for a
/// follower that does not hold its entries yet (up to `[cluster]
/// raft_log_entries_max` entries): afterwards it holds every record the
/// leader holds, the same at the same offsets, and the same end; it never
/// needed a segment copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_past_retention_catches_up_from_the_raft_log() {
    let transfers = follower_down_past_retention(None).await;
    assert_eq!(transfers, 0.0, "the follower caught up by segment transfer, not from the Raft log");
}

/// A follower down past retention and past what the leader's Raft log
/// keeps (`raft_log_entries_max` lowered to 4096: the leader snapshots and
/// purges its Raft log while the follower is down) catches up by segment
/// transfer: it is sent a snapshot, copies the leader's segments, which
/// replace its log, then goes on from the Raft log. Afterwards, and again
/// after it is killed and restarted, it holds every record the leader
/// holds, the same at the same offsets, and the same end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_past_the_leaders_raft_log_catches_up_by_segment_transfer() {
    let transfers = follower_down_past_retention(Some(4096)).await;
    assert!(transfers >= 1.0, "the follower installed no segment copy");
}

/// Kills a follower of a three-node cluster after 100 publishes, publishes
/// `REPLICATED_DEDUP_WINDOW_ENTRIES + 4000` more (retention, 1,000
/// messages in 16 KiB segments, moves the leader's start past 100), starts
/// the follower again and checks that it catches up; with
/// `raft_log_entries_max`, then kills and starts it once more and checks
/// again. Returns the segment copies the follower installed.
async fn follower_down_past_retention(raft_log_entries_max: Option<u64>) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), true);
    // Small segments and a short retention for the channel, checked often.
    for node in &nodes {
        let mut text = std::fs::read_to_string(&node.config).unwrap();
        if let Some(entries_max) = raft_log_entries_max {
            text = text.replace("[cluster]\n", &format!("[cluster]\nraft_log_entries_max = {entries_max}\n"));
        }
        let text = format!(
            "retention_check_interval_ms = 100\n{text}[channels.{CHANNEL}]\nsegment_bytes = 16384\nretention_max_messages = 1000\n"
        );
        std::fs::write(&node.config, text).unwrap();
    }
    for node in &mut nodes {
        node.start();
    }
    create_channel(&nodes[0], 0).await;
    let (leader, _) = partition_leader(&nodes.iter().collect::<Vec<_>>(), 0).await;
    let leader_index = nodes.iter().position(|node| node.spec.id == leader).unwrap();
    let leader_addr = nodes[leader_index].spec.client_addr.clone();
    let follower_index = (leader_index + 1) % nodes.len();

    let connection = Connection::connect(&leader_addr, "filler").await.unwrap();
    let payloads = |range: std::ops::Range<u64>| range.map(|i| format!("r{i:06}"));
    publish_pipelined(&connection, CHANNEL, 0, payloads(0..100)).await;
    nodes[follower_index].kill();
    // More than the deduplication window (which retention keeps) and the
    // retention limit: the leader's log no longer starts at 0.
    let total = weir::storage::REPLICATED_DEDUP_WINDOW_ENTRIES + 4_000;
    publish_pipelined(&connection, CHANNEL, 0, payloads(100..total)).await;
    let started = Instant::now();
    let (leader_start, leader_end) = loop {
        let (start, end) = partition_range(&leader_addr).await;
        if start > 100 {
            break (start, end);
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "retention did not move the leader's start past 100: {start}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(leader_end, total);
    if raft_log_entries_max.is_some() {
        // The leader's Raft log no longer holds what the follower lacks.
        let started = Instant::now();
        while partition_status(&nodes[leader_index])
            .await
            .and_then(|status| status.purged_index)
            .is_none_or(|purged| purged < 1000)
        {
            assert!(started.elapsed() < CONVERGE_LIMIT, "the leader did not purge its Raft log past the follower");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let restarts = if raft_log_entries_max.is_some() { 2 } else { 1 };
    let mut transfers = 0.0;
    for restart in 0..restarts {
        if restart > 0 {
            nodes[follower_index].kill();
        }
        nodes[follower_index].start();
        let follower = &nodes[follower_index];
        let started = Instant::now();
        loop {
            let leader_status = partition_status(&nodes[leader_index]).await;
            let follower_status = partition_status(follower).await;
            if let (Some(leader_status), Some(follower_status)) = (leader_status, follower_status)
                && leader_status.committed_index.is_some()
                && follower_status.applied_index == leader_status.committed_index
            {
                break;
            }
            assert!(started.elapsed() < CONVERGE_LIMIT, "the follower did not catch up within {CONVERGE_LIMIT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let follower_addr = follower.spec.client_addr.clone();
        let (_, follower_end) = partition_range(&follower_addr).await;
        assert_eq!(follower_end, total, "the follower's log ends where the leader's does");
        // Compared over the part retention keeps on both (it keeps the last
        // REPLICATED_DEDUP_WINDOW_ENTRIES Raft entries, and may still be
        // moving the starts up to there).
        let from = total - 16_000;
        assert!(leader_start < from, "{leader_start}");
        let on_leader = read_from(&leader_addr, from).await;
        let on_follower = read_from(&follower_addr, from).await;
        assert_eq!(on_follower.len() as u64, total - from, "the follower holds every record from {from} on");
        assert_eq!(on_leader, on_follower, "the same records (payload and timestamp) at the same offsets");
        for (offset, _, payload) in &on_follower {
            assert_eq!(*payload, format!("r{offset:06}"), "record {offset}");
        }
        if restart == 0 {
            // Counted since the follower's start.
            let page = common::prometheus::scrape(&follower.spec.metrics_addr).await;
            transfers = page
                .lines()
                .filter(|line| {
                    line.starts_with("weir_segment_transfers_total{") && line.contains("outcome=\"installed\"")
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
        }
    }
    transfers
}

/// Adding a fourth node and moving the partition leader's replica to it
/// under load loses nothing: first the leader's Raft log is made to purge
/// its early entries (so the new replica can only catch up by segment
/// transfer: the leader's segments copied to it whole), then a publisher
/// publishes without pause while `weir cluster move-replica` (sent to a
/// follower, which forwards to the partition's leader) moves the leader's
/// replica to node 4. Checked: the command reports the new replicas, which
/// every node's METADATA names; the old leader no longer hosts the
/// partition; publishes are acknowledged after the move; node 4 installed
/// a snapshot; and node 4 and the two replicas left hold the same records
/// at the same offsets, dense from 0, every acknowledged publish exactly
/// once at its offset, nothing that was never published; the same after
/// node 4 is killed and started again. Then the replica is moved back to
/// the old leader's node, which still holds its old copy: the three
/// replicas end with the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_to_a_fourth_node_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), true);
    for node in &mut nodes {
        node.start();
    }
    create_channel(&nodes[0], 0).await;
    let (leader, _) = partition_leader(&nodes.iter().collect::<Vec<_>>(), 0).await;
    let leader_index = nodes.iter().position(|node| node.spec.id == leader).unwrap();
    let follower_index = (leader_index + 1) % nodes.len();

    // Past two snapshots' worth of entries, so that the leader purges the
    // start of its Raft log.
    let fill = 3 * weir::cluster::PARTITION_SNAPSHOT_ENTRIES;
    let connection = Connection::connect(&nodes[leader_index].spec.client_addr, "filler").await.unwrap();
    publish_pipelined(&connection, CHANNEL, 0, (0..fill).map(|i| format!("f{i}"))).await;
    drop(connection);
    let started = Instant::now();
    while partition_status(&nodes[leader_index]).await.and_then(|status| status.purged_index).is_none() {
        assert!(started.elapsed() < CONVERGE_LIMIT, "the leader did not purge its Raft log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let initial: Vec<&common::cluster::NodeSpec> = nodes.iter().map(|node| &node.spec).collect();
    let mut fourth = start_another(dir.path(), 4, &initial).await;
    let (cluster_addr, client_addr) = (fourth.spec.cluster_addr.clone(), fourth.spec.client_addr.clone());
    let follower_cluster_addr = nodes[follower_index].spec.cluster_addr.clone();
    let added = tokio::task::spawn_blocking(move || {
        weir_cluster(&[
            "add-node",
            "4",
            "--cluster-addr",
            &cluster_addr,
            "--client-addr",
            &client_addr,
            "--node",
            &follower_cluster_addr,
        ])
    })
    .await
    .unwrap();
    assert!(added.contains("voters now: 1, 2, 3, 4"), "{added}");

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let addrs: Vec<String> = nodes.iter().chain([&fourth]).map(|node| node.spec.client_addr.clone()).collect();
    let publisher = tokio::spawn(publish_until(Arc::clone(&ledger), addrs.clone(), Arc::clone(&stop)));
    // And the Rust `Publisher`, idempotent, following the leader through
    // the move (its retries deduplicated by node 4 too, from the window it
    // rebuilt from its copy).
    let idempotent_stop = Arc::new(tokio::sync::Notify::new());
    let idempotent = tokio::spawn(publish_idempotently(
        nodes[follower_index].spec.client_addr.clone(),
        Arc::clone(&idempotent_stop),
        0,
    ));
    let acked_at_least = |count: usize| {
        let ledger = Arc::clone(&ledger);
        async move {
            let started = Instant::now();
            while ledger.lock().unwrap().acked.len() < count {
                assert!(started.elapsed() < CONVERGE_LIMIT, "fewer than {count} publishes acknowledged");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    acked_at_least(20).await;

    let follower_cluster_addr = nodes[follower_index].spec.cluster_addr.clone();
    let moved = tokio::task::spawn_blocking(move || {
        weir_cluster(&[
            "move-replica",
            CHANNEL,
            "0",
            "--from",
            &leader.to_string(),
            "--to",
            "4",
            "--node",
            &follower_cluster_addr,
        ])
    })
    .await
    .unwrap();
    let mut expected: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != leader).chain([4]).collect();
    expected.sort_unstable();
    let expected_text: Vec<String> = expected.iter().map(u64::to_string).collect();
    assert!(moved.contains(&format!("replicas now: {}", expected_text.join(", "))), "{moved}");
    let after_move = ledger.lock().unwrap().acked.len();
    acked_at_least(after_move + 50).await;
    stop.notify_one();
    publisher.await.unwrap();
    idempotent_stop.notify_one();
    let (idempotent, duplicates) = idempotent.await.unwrap();
    let idempotent: BTreeMap<String, u64> = idempotent.into_iter().collect();
    // Node 4 comes back from what it stored: the copy, the snapshot and
    // the membership recorded with it, the entries after it.
    fourth.kill();
    fourth.start();

    // Every node names the new replicas; the old leader stops hosting.
    let started = Instant::now();
    loop {
        let mut agreed = true;
        for addr in &addrs {
            // Node 4 may still be starting.
            let Ok(conn) = Connection::connect(addr, "metadata").await else {
                agreed = false;
                continue;
            };
            let Ok(metadata) = weir::client::Metadata::fetch(&conn, CHANNEL).await else {
                agreed = false;
                continue;
            };
            let mut replicas = metadata
                .channels
                .first()
                .and_then(|channel| channel.partitions.first())
                .map(|partition| partition.replicas.clone())
                .unwrap_or_default();
            replicas.sort_unstable();
            agreed &= replicas == expected;
        }
        if agreed && partition_status(&nodes[leader_index]).await.is_none() {
            break;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the placement did not settle on {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holders: Vec<&Node> = nodes.iter().chain([&fourth]).filter(|node| expected.contains(&node.spec.id)).collect();
    let (new_leader, _) = partition_leader(&holders, 0).await;
    assert_ne!(new_leader, leader, "the moved replica no longer leads");
    // The old leader's node hosts no replica now: reads there, a consumer
    // group's included, are sent elsewhere.
    let old_leader = Connection::connect(&nodes[leader_index].spec.client_addr, "reader").await.unwrap();
    for group in [None, Some("readers".to_string())] {
        let options =
            SubscribeOptions { start: weir::protocol::StartPosition::Earliest, group, ..SubscribeOptions::default() };
        let Err(refused) = Subscriber::subscribe(&old_leader, CHANNEL, options).await else {
            panic!("a node that hosts no replica took a subscription");
        };
        assert_eq!(refused.code(), Some(ErrorCode::NotLeader), "{refused}");
    }
    drop(old_leader);
    let moved_in = partition_status(&fourth).await.expect("node 4 hosts the partition");
    assert!(moved_in.snapshot_index.is_some(), "node 4 caught up without a snapshot: {moved_in:?}");
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for node in &holders {
            seen.push(partition_status(node).await.map(|status| (status.committed_index, status.applied_index)));
        }
        if seen.iter().all(|other| *other == seen[0] && other.is_some_and(|(c, a)| c.is_some() && c == a)) {
            break;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the replicas did not converge: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut replicas = Vec::new();
    for node in &holders {
        replicas.push(read_all(&node.spec.client_addr).await);
    }
    for (index, records) in replicas.iter().enumerate() {
        assert_eq!(records, &replicas[0], "replica on node {} differs", holders[index].spec.id);
    }
    let records = &replicas[0];
    let ledger = ledger.lock().unwrap().clone();
    let mut seen = BTreeSet::new();
    for (position, (offset, _, payload)) in records.iter().enumerate() {
        assert_eq!(*offset, position as u64, "offsets are not dense");
        assert!(seen.insert(payload.clone()), "{payload} stored twice");
        if payload.starts_with('f') {
            assert_eq!(*payload, format!("f{offset}"), "the filler's record {offset}");
            continue;
        }
        if payload.starts_with('p') {
            assert_eq!(idempotent.get(payload), Some(offset), "idempotent {payload} stored but not acknowledged there");
            continue;
        }
        assert!(ledger.sent.contains(payload), "{payload} stored but never published");
        match ledger.acked.get(offset) {
            Some(acked) => assert_eq!(acked, payload, "offset {offset} holds another publish than was acknowledged"),
            None => assert!(ledger.uncertain.contains(payload), "{payload} stored though refused"),
        }
    }
    for (offset, payload) in &ledger.acked {
        assert!(
            records.get(*offset as usize).is_some_and(|(_, _, stored)| stored == payload),
            "acknowledged {payload} at offset {offset} is missing"
        );
    }
    for (payload, offset) in &idempotent {
        assert!(
            records.get(*offset as usize).is_some_and(|(_, _, stored)| stored == payload),
            "idempotent {payload} acknowledged at offset {offset} is missing"
        );
    }
    println!(
        "moved node {leader}'s replica to node 4 under load: {} records, {} acknowledged during the test, {} uncertain, {after_move} acknowledged before the move answered; idempotent publisher: {} acknowledged, each stored once, {duplicates} answered as retries",
        records.len(),
        ledger.acked.len(),
        ledger.uncertain.len(),
        idempotent.len()
    );

    // And back: the old leader's node still holds its old copy (its log,
    // and the Raft state of the group's earlier membership). Past two
    // snapshots' worth of entries first, so that the leader's Raft log no
    // longer holds what that copy lacks: it catches up by a segment copy
    // that replaces its log.
    let leader_addr = holders.iter().find(|node| node.spec.id == new_leader).unwrap().spec.client_addr.clone();
    let connection = Connection::connect(&leader_addr, "filler").await.unwrap();
    let filled = records.len() as u64;
    publish_pipelined(&connection, CHANNEL, 0, (filled..filled + fill).map(|i| format!("f{i}"))).await;
    drop(connection);
    let mut expected_records: Vec<String> = records.iter().map(|(_, _, payload)| payload.clone()).collect();
    expected_records.extend((filled..filled + fill).map(|i| format!("f{i}")));
    let old_leader_addr = nodes[leader_index].spec.cluster_addr.clone();
    move_replica_retrying(4, leader, old_leader_addr).await;
    converge_on(&nodes, &fourth, &expected_records).await;
    let page = common::prometheus::scrape(&nodes[leader_index].spec.metrics_addr).await;
    let installed: f64 = page
        .lines()
        .filter(|line| line.starts_with("weir_segment_transfers_total{") && line.contains("outcome=\"installed\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(installed >= 1.0, "the replica moved back caught up without a segment copy");

    // A follower's replica moved away and back: removed from the group, it
    // kept the joint configuration in which it was a voter (it may
    // campaign from it when it comes back, which costs an election).
    let follower_id = nodes[follower_index].spec.id;
    let follower_addr = nodes[follower_index].spec.cluster_addr.clone();
    move_replica_retrying(follower_id, 4, follower_addr.clone()).await;
    move_replica_retrying(4, follower_id, follower_addr).await;
    converge_on(&nodes, &fourth, &expected_records).await;
}

/// `weir cluster move-replica CHANNEL 0 --from FROM --to TO` sent to
/// `node`, run again (as OPERATIONS.md says) while it answers that a
/// change of leader cut it short, at most five times.
async fn move_replica_retrying(from: u64, to: u64, node: String) -> String {
    tokio::task::spawn_blocking(move || {
        let (from, to) = (from.to_string(), to.to_string());
        let args = ["cluster", "move-replica", CHANNEL, "0", "--from", &from, "--to", &to, "--node", &node];
        for attempt in 1..=5 {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().unwrap();
            if output.status.success() {
                return String::from_utf8_lossy(&output.stdout).into_owned();
            }
            eprintln!("move {from} -> {to}, attempt {attempt}: {}", String::from_utf8_lossy(&output.stderr));
            std::thread::sleep(Duration::from_secs(1));
        }
        panic!("moving the replica from node {from} to node {to} failed five times");
    })
    .await
    .unwrap()
}

/// Waits until `nodes` (the original three) host the partition, committed
/// and applied alike, and `fourth` hosts it no more; then checks that each
/// holds `expected` payloads, at dense offsets from 0.
async fn converge_on(nodes: &[Node], fourth: &Node, expected: &[String]) {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for node in nodes {
            seen.push(partition_status(node).await.map(|status| (status.committed_index, status.applied_index)));
        }
        if seen.iter().all(|other| *other == seen[0] && other.is_some_and(|(c, a)| c.is_some() && c == a))
            && partition_status(fourth).await.is_none()
        {
            break;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the replicas did not converge after a move back: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in nodes {
        let records = read_all(&node.spec.client_addr).await;
        let payloads: Vec<&String> = records.iter().map(|(_, _, payload)| payload).collect();
        assert_eq!(payloads.len(), expected.len(), "node {} after a move back", node.spec.id);
        assert!(payloads.iter().zip(expected).all(|(stored, expected)| *stored == expected), "node {}", node.spec.id);
        assert!(records.iter().enumerate().all(|(position, (offset, _, _))| *offset == position as u64));
    }
}

/// The channel of the consumer group test.
const GROUPED: &str = "grouped";

/// Publishes each payload to `partition` of [`GROUPED`] at its leader as
/// METADATA from `addrs` names it, one at a time, asking again (and
/// resending) after a refusal or a silent node: a payload may be stored
/// twice, never lost.
async fn publish_at_leader(addrs: &[String], partition: u32, payloads: impl Iterator<Item = String>) {
    let started = Instant::now();
    let mut leader: Option<Connection> = None;
    for payload in payloads {
        loop {
            assert!(started.elapsed() < CONVERGE_LIMIT, "partition {partition} took no publish");
            if leader.is_none() {
                for addr in addrs {
                    let found = async {
                        let connection = Connection::connect(addr, "metadata").await.ok()?;
                        let metadata = weir::client::Metadata::fetch(&connection, GROUPED).await.ok()?;
                        let leader = metadata.leader_addr(GROUPED, partition)?.to_string();
                        Connection::connect(&leader, "publisher").await.ok()
                    };
                    if let Ok(Some(connection)) = tokio::time::timeout(Duration::from_secs(2), found).await {
                        leader = Some(connection);
                        break;
                    }
                }
            }
            let Some(connection) = &leader else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let request = Request::Publish {
                channel: GROUPED.into(),
                partition: Some(partition),
                producer: None,
                message: Message::from_payload(payload.clone()),
            };
            match tokio::time::timeout(Duration::from_secs(2), connection.request(request)).await {
                Ok(Ok(Response::PublishAck { .. })) => break,
                _ => {
                    leader = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A member of `group` of `channel`: subscribes at the first of `addrs`
/// that answers, following `NotLeader` to the group's coordinator (each
/// attempt bounded: a paused node takes a connection and never answers).
/// Returns the subscription and the address that took it.
async fn join_following(addrs: &[String], channel: &str, group: &str) -> (Connection, Subscriber, String) {
    let started = Instant::now();
    let mut next: Vec<String> = Vec::new();
    loop {
        assert!(started.elapsed() < CONVERGE_LIMIT, "no node took a member of group {group}");
        let Some(addr) = next.pop() else {
            next = addrs.iter().rev().cloned().collect();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let attempt = async {
            let connection = Connection::connect(&addr, "member").await?;
            let options = SubscribeOptions {
                group: Some(group.into()),
                start: weir::protocol::StartPosition::Earliest,
                max_inflight: 64,
                ..SubscribeOptions::default()
            };
            let subscriber = Subscriber::subscribe(&connection, channel, options).await?;
            Ok::<_, ClientError>((connection, subscriber))
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok((connection, subscriber))) => return (connection, subscriber, addr),
            Ok(Err(error)) => {
                if let Some(coordinator) = error.redirect() {
                    next.push(coordinator);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => {}
        }
    }
}

/// Waits until every node of `addrs` names a leader for each of the
/// `partitions` of [`GROUPED`], the same ones.
async fn leaders_agreed(addrs: &[String], partitions: u32) {
    let started = Instant::now();
    loop {
        let mut views: Vec<Option<Vec<String>>> = Vec::new();
        for addr in addrs {
            let view = async {
                let connection = Connection::connect(addr, "metadata").await.ok()?;
                let metadata = weir::client::Metadata::fetch(&connection, GROUPED).await.ok()?;
                (0..partitions).map(|partition| metadata.leader_addr(GROUPED, partition).map(str::to_owned)).collect()
            };
            views.push(view.await);
        }
        if views.iter().all(|view| view.is_some() && *view == views[0]) {
            return;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the nodes do not name the same leaders: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the members of the group test saw.
#[derive(Default)]
struct GroupSeen {
    /// Every delivery: (member, partition, payload).
    deliveries: Vec<(usize, u32, String)>,
    /// Each member's partitions now.
    assigned: BTreeMap<usize, BTreeSet<u32>>,
}

/// Reads `member`'s events, acknowledging every record, until its
/// subscription ends; returns why.
async fn consume_member(member: usize, mut subscriber: Subscriber, seen: Arc<Mutex<GroupSeen>>) -> Option<ClientError> {
    while let Some(event) = subscriber.next().await {
        match event {
            Ok(weir::client::Event::Message { partition, record }) => {
                let payload = String::from_utf8_lossy(&record.payload).into_owned();
                seen.lock().unwrap().deliveries.push((member, partition, payload));
                if subscriber.ack_partition(partition, record.offset).await.is_err() {
                    return None;
                }
            }
            Ok(weir::client::Event::Notice { partition, notice: weir::protocol::Notice::Assigned { .. } }) => {
                seen.lock().unwrap().assigned.entry(member).or_default().insert(partition);
            }
            Ok(weir::client::Event::Notice { partition, notice: weir::protocol::Notice::Revoked { .. } }) => {
                seen.lock().unwrap().assigned.entry(member).or_default().remove(&partition);
            }
            Ok(_) => {}
            Err(error) => return Some(error),
        }
    }
    None
}

/// Waits until the members saw every payload of `expected`.
async fn delivered_all(seen: &Arc<Mutex<GroupSeen>>, expected: &BTreeSet<String>) {
    let started = Instant::now();
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            let delivered: BTreeSet<&String> = seen.deliveries.iter().map(|(_, _, payload)| payload).collect();
            expected.iter().filter(|payload| !delivered.contains(payload)).count()
        };
        if missing == 0 {
            return;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "{missing} records never delivered to the group");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Consumer groups across nodes (docs/REPLICATION.md, "Consumer groups
/// across nodes"): two members of one group, connecting to different
/// nodes, are sent to the group's coordinator and share the channel's
/// four partitions there (disjoint, together all four), and read every
/// record. Then the coordinator is paused: a member that subscribes again
/// is sent to the new coordinator (the leader of the group's partition
/// moved), and when the old one resumes it ends its remaining member with
/// `NotLeader` naming the new coordinator, which that member follows.
/// Every record published afterwards is delivered, and none of those
/// acknowledged before the move is delivered again (the new coordinator
/// starts from the group's positions in the metadata group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_members_on_different_nodes_share_its_partitions_at_one_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), false);
    for node in &mut nodes {
        // Generous: the member on the paused node must outlive the pause.
        let text = std::fs::read_to_string(&node.config).unwrap();
        std::fs::write(&node.config, format!("group_session_timeout_ms = 120000\n{text}")).unwrap();
        node.start();
    }
    create_channel_with(&nodes[0], GROUPED, 4, 3, 0).await;
    let addrs: Vec<String> = nodes.iter().map(|node| node.spec.client_addr.clone()).collect();
    // Every node names the same leaders, so the same coordinator.
    leaders_agreed(&addrs, 4).await;
    let mut expected = BTreeSet::new();
    for partition in 0..4 {
        let payloads: Vec<String> = (0..25).map(|i| format!("a-{partition}-{i}")).collect();
        expected.extend(payloads.iter().cloned());
        publish_at_leader(&addrs, partition, payloads.into_iter()).await;
    }

    let seen = Arc::new(Mutex::new(GroupSeen::default()));
    let (first_connection, first, first_addr) = join_following(&addrs, GROUPED, "billing").await;
    let (second_connection, second, second_addr) =
        join_following(&[addrs[1].clone(), addrs[2].clone(), addrs[0].clone()], GROUPED, "billing").await;
    assert_eq!(first_addr, second_addr, "the members are at two nodes");
    let coordinator = addrs.iter().position(|addr| *addr == first_addr).unwrap();
    let first_task = tokio::spawn(consume_member(0, first, Arc::clone(&seen)));
    let second_task = tokio::spawn(consume_member(1, second, Arc::clone(&seen)));
    delivered_all(&seen, &expected).await;
    let started = Instant::now();
    loop {
        let (first, second) = {
            let seen = seen.lock().unwrap();
            (seen.assigned.get(&0).cloned().unwrap_or_default(), seen.assigned.get(&1).cloned().unwrap_or_default())
        };
        if first.len() == 2 && second.len() == 2 {
            assert!(first.is_disjoint(&second), "a partition read by both members: {first:?} {second:?}");
            break;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the partitions were not shared: {first:?} {second:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The group's positions reached the metadata group: another node
    // lists them.
    let other = &addrs[(coordinator + 1) % 3];
    let started = Instant::now();
    loop {
        let connection = Connection::connect(other, "lister").await.unwrap();
        let listed = connection.request(Request::ListGroups { channel: GROUPED.into() }).await.unwrap();
        let Response::Groups { groups } = listed else { panic!("expected GROUPS: {listed:?}") };
        let committed: u64 = groups
            .iter()
            .filter(|group| group.name == "billing")
            .flat_map(|group| &group.partitions)
            .filter_map(|partition| partition.committed)
            .sum();
        if committed == 100 {
            break;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "the group's positions did not reach the others: {committed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_move = seen.lock().unwrap().deliveries.len();

    // The coordinator paused: its partitions' leadership moves, and with
    // it the coordinator.
    nodes[coordinator].signal("STOP");
    let others: Vec<String> =
        addrs.iter().enumerate().filter(|(i, _)| *i != coordinator).map(|(_, a)| a.clone()).collect();
    second_task.abort();
    drop(second_connection);
    let (_second_connection, second, second_addr) = join_following(&others, GROUPED, "billing").await;
    assert_ne!(second_addr, first_addr, "the coordinator did not move");
    let second_task = tokio::spawn(consume_member(1, second, Arc::clone(&seen)));
    nodes[coordinator].signal("CONT");
    let mut later = BTreeSet::new();
    for partition in 0..4 {
        let payloads: Vec<String> = (0..10).map(|i| format!("b-{partition}-{i}")).collect();
        later.extend(payloads.iter().cloned());
        publish_at_leader(&addrs, partition, payloads.into_iter()).await;
    }
    let ended = tokio::time::timeout(CONVERGE_LIMIT, first_task).await.expect("the first member was not sent on");
    let ended = ended.unwrap().expect("the first member's subscription ended without a reason");
    assert_eq!(ended.code(), Some(ErrorCode::NotLeader), "{ended}");
    assert_eq!(ended.redirect().as_deref(), Some(second_addr.as_str()), "{ended}");
    drop(first_connection);
    let (_first_connection, first, first_again) =
        join_following(&[ended.redirect().unwrap()], GROUPED, "billing").await;
    assert_eq!(first_again, second_addr);
    let first_task = tokio::spawn(consume_member(0, first, Arc::clone(&seen)));
    delivered_all(&seen, &later).await;
    let again: Vec<String> = seen.lock().unwrap().deliveries[before_move..]
        .iter()
        .map(|(_, _, payload)| payload.clone())
        .filter(|payload| expected.contains(payload))
        .collect();
    assert!(again.is_empty(), "records acknowledged before the move were delivered again: {again:?}");
    first_task.abort();
    second_task.abort();
}

/// A node stopped with SIGTERM first hands the leadership of every group
/// it leads (here the metadata group's and a partition's) to another node:
/// the others name new leaders the moment it has exited, although their
/// leader lease (`election_timeout_max_ms`, 4 s here) keeps them from
/// electing any for seconds after they last heard from it. A durable
/// subscriber's acknowledgements, made just before the stop, are written
/// to the metadata group as the node stops: it resumes on another node
/// right after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_gracefully_hands_its_groups_over_before_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    // A failover takes at least election_timeout_max + min (7 s) after the
    // last heartbeat; the stop takes milliseconds.
    let mut nodes = three_nodes_timed(dir.path(), (200, 3000, 4000));
    for node in &mut nodes {
        node.start();
    }
    create_channel_with(&nodes[0], GROUPED, 3, 3, 0).await;
    let addrs: Vec<String> = nodes.iter().map(|node| node.spec.client_addr.clone()).collect();
    leaders_agreed(&addrs, 3).await;
    // The node leading the metadata group, and a partition it leads (each
    // node leads one: the first replica starts the group).
    let (victim, metadata_term) = {
        let status = status(&nodes[0]).await.expect("node 1 answers");
        (status.leader.expect("a metadata leader"), status.term)
    };
    let victim_index = nodes.iter().position(|node| node.spec.id == victim).unwrap();
    let led = status(&nodes[victim_index])
        .await
        .unwrap()
        .partitions
        .into_iter()
        .find(|partition| partition.channel == GROUPED && partition.role == "leader")
        .expect("the metadata leader leads a partition");
    publish_at_leader(&addrs, led.partition, (0..10).map(|i| format!("r{i}"))).await;

    let durable = SubscribeOptions {
        partition: Some(led.partition),
        start: weir::protocol::StartPosition::Earliest,
        durable_name: Some("billing".into()),
        ..SubscribeOptions::default()
    };
    {
        let connection = Connection::connect(&addrs[victim_index], "subscriber").await.unwrap();
        let mut subscriber = Subscriber::subscribe(&connection, GROUPED, durable.clone()).await.unwrap();
        for expected in 0..5 {
            let (offset, payload) = next_message(&mut subscriber).await;
            assert_eq!((offset, payload), (expected, format!("r{expected}")));
            subscriber.ack_partition(led.partition, offset).await.unwrap();
        }
        // Answered after the acknowledgements, which the node reads first
        // on the same connection.
        connection.request(Request::ListGroups { channel: GROUPED.into() }).await.unwrap();
    }
    assert!(nodes[victim_index].stop_gracefully().await, "node {victim} stopped with an error");

    // Once it has exited: new leaders, already.
    let survivors: Vec<&Node> = nodes.iter().filter(|node| node.spec.id != victim).collect();
    let mut views = Vec::new();
    for node in &survivors {
        views.push(status(node).await.expect("a survivor answers"));
    }
    assert!(
        views.iter().any(|view| view.role == "leader" && view.term > metadata_term),
        "no survivor leads the metadata group as node {victim} exits: {views:#?}"
    );
    let partition_views: Vec<&PartitionStatus> = views
        .iter()
        .flat_map(|view| &view.partitions)
        .filter(|partition| partition.channel == GROUPED && partition.partition == led.partition)
        .collect();
    assert!(
        partition_views.iter().any(|partition| partition.role == "leader" && partition.term > led.term),
        "no survivor leads partition {} as node {victim} exits: {partition_views:#?}",
        led.partition
    );

    let survivor_addrs: Vec<String> = survivors.iter().map(|node| node.spec.client_addr.clone()).collect();
    publish_at_leader(&survivor_addrs, led.partition, std::iter::once("after".to_string())).await;
    // At the metadata group's new leader, which applied the positions the
    // stopping node wrote before it answered them.
    let metadata_leader = views.iter().position(|view| view.role == "leader").unwrap();
    let connection = Connection::connect(&survivor_addrs[metadata_leader], "subscriber").await.unwrap();
    let mut subscriber = Subscriber::subscribe(&connection, GROUPED, durable).await.unwrap();
    assert_eq!(next_message(&mut subscriber).await, (5, "r5".to_string()), "resumes after its last ack");
}

/// Three nodes started in `dir`, with [`GROUPED`] created of `partitions`
/// partitions of replication factor 3 and their leaders agreed; and the
/// nodes' client addresses.
async fn three_nodes_with_grouped(dir: &std::path::Path, partitions: u32) -> (Vec<Node>, Vec<String>) {
    let mut nodes = three_nodes(dir, false);
    for node in &mut nodes {
        node.start();
    }
    create_channel_with(&nodes[0], GROUPED, partitions, 3, 0).await;
    let addrs: Vec<String> = nodes.iter().map(|node| node.spec.client_addr.clone()).collect();
    leaders_agreed(&addrs, partitions).await;
    (nodes, addrs)
}

/// The library's `FollowingSubscriber`, a consumer group member: sent on
/// to the group's coordinator when it subscribes elsewhere, and once the
/// coordinator's node is killed, it subscribes again by itself at the
/// coordinator that takes over (announcing the move) and delivers every
/// record published after the kill, resuming from the group's positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_subscriber_moves_on_by_itself_when_its_node_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = three_nodes_with_grouped(dir.path(), 2).await;
    let mut before = BTreeSet::new();
    for partition in 0..2 {
        let payloads: Vec<String> = (0..10).map(|i| format!("before-{partition}-{i}")).collect();
        before.extend(payloads.iter().cloned());
        publish_at_leader(&addrs, partition, payloads.into_iter()).await;
    }

    let options = SubscribeOptions {
        group: Some("billing".into()),
        start: weir::protocol::StartPosition::Earliest,
        ..SubscribeOptions::default()
    };
    let connect = weir::client::ConnectOptions { client_name: "member".into(), ..Default::default() };
    // Asked at every node in turn, it ends at the coordinator each time.
    let mut coordinator = None;
    for addr in &addrs {
        let member = tokio::time::timeout(
            CONVERGE_LIMIT,
            FollowingSubscriber::subscribe(addr, connect.clone(), GROUPED, options.clone(), FollowOptions::default()),
        )
        .await
        .expect("subscribed within the limit")
        .unwrap();
        assert!(coordinator.is_none_or(|at: String| at == member.addr()), "two coordinators");
        coordinator = Some(member.addr().to_string());
        member.unsubscribe().await.unwrap();
    }
    let coordinator = coordinator.unwrap();
    let mut member = FollowingSubscriber::subscribe(&coordinator, connect, GROUPED, options, FollowOptions::default())
        .await
        .unwrap();

    let mut seen = BTreeSet::new();
    let mut moves = Vec::new();
    while !before.is_subset(&seen) {
        seen.insert(next_followed(&mut member, &mut moves).await);
    }
    member.sync().await.unwrap();

    let killed = nodes.iter().position(|node| node.spec.client_addr == coordinator).unwrap();
    nodes[killed].kill();
    let survivors: Vec<String> = addrs.iter().filter(|addr| **addr != coordinator).cloned().collect();
    let mut after = BTreeSet::new();
    for partition in 0..2 {
        let payloads: Vec<String> = (0..10).map(|i| format!("after-{partition}-{i}")).collect();
        after.extend(payloads.iter().cloned());
        publish_at_leader(&survivors, partition, payloads.into_iter()).await;
    }
    let mut seen_after = BTreeSet::new();
    while !after.is_subset(&seen_after) {
        let payload = next_followed(&mut member, &mut moves).await;
        assert!(before.contains(&payload) || after.contains(&payload), "never published: {payload}");
        seen_after.insert(payload);
    }
    assert_ne!(member.addr(), coordinator, "still at the killed node");
    assert!(!moves.is_empty(), "the move was not announced");
    // Each move names its cause (the lost subscription), not the last
    // error on the way (a node it could not reach).
    assert!(moves.iter().all(|moved| !moved.starts_with("cannot connect")), "{moves:?}");
}

/// The next record's payload a `FollowingSubscriber` delivers, acknowledged;
/// moves on the way are noted in `moves`.
async fn next_followed(member: &mut FollowingSubscriber, moves: &mut Vec<String>) -> String {
    loop {
        let followed = tokio::time::timeout(CONVERGE_LIMIT, member.next())
            .await
            .expect("an event within the limit")
            .expect("the subscription goes on")
            .expect("no error it could not follow");
        match followed {
            Followed::Moved { to, reason } => moves.push(format!("{reason} -> {to}")),
            Followed::Event(weir::client::Event::Message { partition, record }) => {
                member.ack_partition(partition, record.offset).await.unwrap();
                return String::from_utf8(record.payload.to_vec()).unwrap();
            }
            Followed::Event(_) => {}
        }
    }
}

/// Every record of `partition` of `channel` on the node at `addr`, as
/// (offset, payload); an unknown channel holds none.
async fn fetch_all(addr: &str, channel: &str, partition: u32) -> Vec<(u64, String)> {
    let Ok(conn) = Connection::connect(addr, "checker").await else { return Vec::new() };
    let mut records = Vec::new();
    let mut offset = 0;
    loop {
        let fetch =
            Request::Fetch { channel: channel.into(), partition, offset, max_messages: 1000, max_bytes: 1 << 20 };
        let Ok(Response::FetchResult { next_offset, records: bytes, .. }) = conn.request(fetch).await else {
            return records;
        };
        let before = records.len();
        for record in RecordIter::new(bytes) {
            let record = record.expect("an intact record");
            records.push((record.offset, String::from_utf8(record.payload.to_vec()).unwrap()));
        }
        if records.len() == before {
            return records;
        }
        offset = next_offset;
    }
}

/// A replicated channel deleted through one node (DELETE_CHANNEL, which
/// without `force` is refused) is gone from every node: METADATA no longer
/// lists it, a live subscription to it ends, and each node's files of it
/// (the local copy and the Raft stores) are removed. Created again under
/// the same name (with another partition count), it starts empty. A node
/// that was down through the deletion and the new creation removes the
/// old channel's files when it comes back and holds the new one's
/// records only. After every node restarts (applying again the metadata
/// entries after its last snapshot), each still holds the new channel's
/// records: a deletion applied again never removes a later incarnation's
/// files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_replicated_channel_is_gone_everywhere_and_its_name_can_be_used_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = three_nodes_with_grouped(dir.path(), 2).await;
    for partition in 0..2 {
        publish_at_leader(&addrs, partition, (0..5).map(|i| format!("old-{partition}-{i}"))).await;
    }
    let files = |id: u64| {
        let node = dir.path().join(format!("node{id}"));
        [node.join("channels").join(GROUPED), node.join("cluster").join("partitions").join(GROUPED)]
    };
    for node in &nodes {
        assert!(files(node.spec.id).iter().all(|path| path.exists()), "node {} holds the channel", node.spec.id);
    }
    let reader = Connection::connect(&addrs[1], "reader").await.unwrap();
    let options = SubscribeOptions { partition: Some(0), ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&reader, GROUPED, options).await.unwrap();
    assert_eq!(next_message(&mut subscriber).await, (0, "old-0-0".to_string()));

    // Node 3 is down through the deletion and the new creation.
    nodes[2].kill();
    let admin = Connection::connect(&addrs[0], "admin").await.unwrap();
    let refused = admin.request(Request::DeleteChannel { channel: GROUPED.into(), force: false }).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ChannelInUse), "{refused}");
    // Asked again while the metadata group elects (node 3 may have led
    // it), until it answers, or the channel is gone already.
    let started = Instant::now();
    loop {
        let delete = Request::DeleteChannel { channel: GROUPED.into(), force: true };
        match admin.request(delete).await {
            Ok(response) => {
                assert_eq!(response, Response::ChannelDeleted);
                break;
            }
            Err(error) if error.code() == Some(ErrorCode::UnknownChannel) => break,
            Err(error) => assert!(started.elapsed() < CONVERGE_LIMIT, "the deletion kept failing: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The subscription ends (after the records it had been sent).
    tokio::time::timeout(CONVERGE_LIMIT, async { while let Some(Ok(_)) = subscriber.next().await {} })
        .await
        .expect("the subscription to the deleted channel ended");
    let started = Instant::now();
    for node in &nodes[..2] {
        loop {
            let listed = async {
                let connection = Connection::connect(&node.spec.client_addr, "metadata").await.ok()?;
                let metadata = weir::client::Metadata::fetch(&connection, GROUPED).await.ok()?;
                Some(metadata.channels.iter().any(|channel| channel.name == GROUPED))
            };
            let gone = files(node.spec.id).iter().all(|path| !path.exists());
            if listed.await == Some(false) && gone {
                break;
            }
            assert!(started.elapsed() < CONVERGE_LIMIT, "node {} still has the deleted channel", node.spec.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Deleted again: there is no such channel any more.
    let again = admin.request(Request::DeleteChannel { channel: GROUPED.into(), force: true }).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::UnknownChannel), "{again}");
    assert!(files(3).iter().all(|path| path.exists()), "node 3, down, still holds the old channel");
    // Created again while node 3 is down.
    create_channel_with(&nodes[1], GROUPED, 1, 3, 0).await;
    nodes[2].start();
    leaders_agreed(&addrs, 1).await;
    publish_at_leader(&addrs, 0, (0..3).map(|i| format!("new-{i}"))).await;
    let expected: Vec<(u64, String)> = (0..3).map(|i| (i, format!("new-{i}"))).collect();
    let converged = async |nodes: &[Node]| {
        let started = Instant::now();
        for node in nodes {
            loop {
                let held = fetch_all(&node.spec.client_addr, GROUPED, 0).await;
                if held == expected {
                    break;
                }
                assert!(started.elapsed() < CONVERGE_LIMIT, "node {} holds {held:?}", node.spec.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    converged(&nodes).await;
    let node3 = dir.path().join("node3").join("cluster").join("partitions").join(GROUPED);
    assert!(!node3.join("1.redb").exists(), "node 3 kept the old channel's partition 1");
    for node in &mut nodes {
        node.kill();
    }
    for node in &mut nodes {
        node.start();
    }
    leaders_agreed(&addrs, 1).await;
    converged(&nodes).await;
}

/// Partitions added to a replicated channel through any node
/// (ALTER_CHANNEL) are replicated groups like the first ones: METADATA
/// lists them with leaders on every node; a subscription of every
/// partition is told of each (ASSIGNED) and reads what is published there;
/// a consumer group (following its coordinator, which may move with the
/// partition count) reads every record, old partitions and new; every
/// replica holds the new partitions' records, also after every node is
/// killed and started again. Fewer partitions are refused. With a
/// replication factor below the node count, a subscription of every
/// partition at a node that hosts none of a new partition's replicas is
/// ended (no node holds every partition: `InvalidRequest`) rather than left
/// waiting on a partition that node never receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_to_a_replicated_channel_are_replicated_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = three_nodes_with_grouped(dir.path(), 2).await;
    let mut expected = BTreeSet::new();
    for partition in 0..2 {
        let payloads: Vec<String> = (0..3).map(|i| format!("before-{partition}-{i}")).collect();
        expected.extend(payloads.iter().cloned());
        publish_at_leader(&addrs, partition, payloads.into_iter()).await;
    }
    // Every node hosts every partition (replication factor 3 on three).
    let reader = Connection::connect(&addrs[1], "reader").await.unwrap();
    let mut every = Subscriber::subscribe(&reader, GROUPED, SubscribeOptions::default()).await.unwrap();
    let options = SubscribeOptions {
        group: Some("billing".into()),
        start: weir::protocol::StartPosition::Earliest,
        ..SubscribeOptions::default()
    };
    let connect = weir::client::ConnectOptions { client_name: "member".into(), ..Default::default() };
    let mut member =
        FollowingSubscriber::subscribe(&addrs[0], connect, GROUPED, options, FollowOptions::default()).await.unwrap();
    let mut moves = Vec::new();
    let mut seen_by_member = BTreeSet::new();
    while !expected.is_subset(&seen_by_member) {
        seen_by_member.insert(next_followed(&mut member, &mut moves).await);
    }

    let admin = Connection::connect(&addrs[2], "admin").await.unwrap();
    let altered = admin.request(Request::AlterChannel { channel: GROUPED.into(), partitions: 4 }).await.unwrap();
    assert_eq!(altered, Response::ChannelAltered);
    let fewer = admin.request(Request::AlterChannel { channel: GROUPED.into(), partitions: 3 }).await.unwrap_err();
    assert_eq!(fewer.code(), Some(ErrorCode::InvalidRequest), "{fewer}");
    leaders_agreed(&addrs, 4).await;
    for addr in &addrs {
        let connection = Connection::connect(addr, "metadata").await.unwrap();
        let metadata = weir::client::Metadata::fetch(&connection, GROUPED).await.unwrap();
        let channel = metadata.channels.iter().find(|channel| channel.name == GROUPED).unwrap();
        assert_eq!(channel.partitions.len(), 4, "METADATA at {addr}: {metadata:?}");
    }
    let printed = weir_cluster(&["alter-channel", GROUPED, "--partitions", "4", "--node", &nodes[0].spec.cluster_addr]);
    assert!(printed.contains("of 4 partitions") && printed.contains("partition 3: nodes"), "{printed}");

    let mut added = BTreeSet::new();
    for partition in 0..4 {
        let payloads: Vec<String> = (0..3).map(|i| format!("after-{partition}-{i}")).collect();
        added.extend(payloads.iter().cloned());
        publish_at_leader(&addrs, partition, payloads.into_iter()).await;
    }
    expected.extend(added.iter().cloned());

    // The subscription of every partition: ASSIGNED for each new one, then
    // every record, old and new.
    let mut assigned = BTreeSet::new();
    let mut seen_by_every = BTreeSet::new();
    while !expected.is_subset(&seen_by_every) || assigned.len() < 2 {
        let event = tokio::time::timeout(CONVERGE_LIMIT, every.next())
            .await
            .unwrap_or_else(|_| panic!("stalled: assigned {assigned:?}, seen {seen_by_every:?}"))
            .expect("the subscription goes on")
            .expect("no error");
        match event {
            weir::client::Event::Notice { partition, notice: weir::protocol::Notice::Assigned { .. } } => {
                assigned.insert(partition);
            }
            weir::client::Event::Message { record, .. } => {
                seen_by_every.insert(String::from_utf8(record.payload.to_vec()).unwrap());
            }
            weir::client::Event::Notice { .. } => {}
        }
    }
    assert_eq!(assigned, BTreeSet::from([2, 3]));
    while !expected.is_subset(&seen_by_member) {
        let payload = next_followed(&mut member, &mut moves).await;
        assert!(expected.contains(&payload), "never published: {payload}");
        seen_by_member.insert(payload);
    }

    // Every replica of the new partitions holds their records, in order.
    let new_partitions =
        |partition: u32| -> Vec<(u64, String)> { (0..3).map(|i| (i, format!("after-{partition}-{i}"))).collect() };
    let converged = async |nodes: &[Node]| {
        let started = Instant::now();
        for node in nodes {
            for partition in 2..4 {
                loop {
                    let held = fetch_all(&node.spec.client_addr, GROUPED, partition).await;
                    if held == new_partitions(partition) {
                        break;
                    }
                    assert!(
                        started.elapsed() < CONVERGE_LIMIT,
                        "node {} partition {partition}: {held:?}",
                        node.spec.id
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    converged(&nodes).await;
    drop(every);
    drop(member);
    for node in &mut nodes {
        node.kill();
    }
    for node in &mut nodes {
        node.start();
    }
    leaders_agreed(&addrs, 4).await;
    converged(&nodes).await;

    // Replication factor 1: the new partition is placed on another node
    // than the first (placement moves along with the partition index).
    let single = "single";
    create_channel_with(&nodes[0], single, 1, 1, 0).await;
    let host = loop {
        let connection = Connection::connect(&addrs[0], "metadata").await.unwrap();
        let metadata = weir::client::Metadata::fetch(&connection, single).await.unwrap();
        if let Some(leader) = metadata.leader_addr(single, 0) {
            break leader.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reader = Connection::connect(&host, "reader").await.unwrap();
    let mut every = Subscriber::subscribe(&reader, single, SubscribeOptions::default()).await.unwrap();
    let admin = Connection::connect(&addrs[2], "admin").await.unwrap();
    let altered = admin.request(Request::AlterChannel { channel: single.into(), partitions: 2 }).await.unwrap();
    assert_eq!(altered, Response::ChannelAltered);
    let ended = tokio::time::timeout(CONVERGE_LIMIT, async {
        loop {
            match every.next().await {
                Some(Ok(_)) => {}
                Some(Err(error)) => return error,
                None => panic!("the subscription ended without a reason"),
            }
        }
    })
    .await
    .expect("the subscription of every partition at a node hosting only some ended");
    // No node holds both partitions: nowhere to send it.
    assert_eq!(ended.code(), Some(ErrorCode::InvalidRequest), "{ended}");
    assert!(ended.to_string().contains("every partition"), "{ended}");
}

/// A channel created, and grown, while a node is down has a leader for
/// every partition at once: the metadata leader puts a node it hears from
/// first among each partition's replicas, and the first replica is the
/// one that initialises the partition's group (were it the node that is
/// down, the partition would have no leader until that node came back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_created_while_a_node_is_down_has_a_leader_for_every_partition() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), false);
    for node in &mut nodes {
        node.start();
    }
    let addrs: Vec<String> = nodes.iter().map(|node| node.spec.client_addr.clone()).collect();
    nodes[2].kill();
    // Past the greatest election timeout since node 3 last answered, the
    // metadata leader counts it as down (the age only grows: no race).
    tokio::time::sleep(Duration::from_millis(2 * ELECTION_MAX_MS)).await;
    // Three partitions of three replicas on three nodes: node 3 would
    // come first in one of them.
    let created = create_channel_with(&nodes[0], GROUPED, 3, 3, 0).await;
    assert!(!created.contains("nodes 3,"), "node 3, down, initialises a partition: {created}");
    leaders_agreed(&addrs[..2], 3).await;
    let printed = weir_cluster(&["alter-channel", GROUPED, "--partitions", "6", "--node", &nodes[1].spec.cluster_addr]);
    assert!(!printed.contains("nodes 3,"), "node 3, down, initialises a partition: {printed}");
    leaders_agreed(&addrs[..2], 6).await;
    publish_at_leader(&addrs[..2], 5, (0..3).map(|i| format!("r{i}"))).await;
    nodes[2].start();
    leaders_agreed(&addrs, 6).await;
}
