//! Load and abuse against the real binary, on 127.0.0.1: a thousand
//! connections publishing at once, a flood of connections beyond
//! `max_connections`, half-open connections, a subscriber that never reads
//! its socket and a hundred subscribers on one hot channel. Through all of
//! it a well-behaved client is served, every publish gets exactly one
//! answer, and the broker's resident memory stays under a stated bound.

#[path = "common/child.rs"]
mod child;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use child::{connect_when_up, resident_bytes, serve};
use weir::client::{Connection, Event, SubscribeOptions, Subscriber};
use weir::protocol::{ErrorCode, PROTOCOL_VERSION, Request, Response, StartPosition};
use weir::record::Message;

/// Connections publishing at once.
const PUBLISHERS: usize = 1000;
const PUBLISHES_EACH: u64 = 5;
const CHANNELS: usize = 10;
/// Connections beyond `max_connections`, all refused.
const FLOOD: usize = 200;
const HALF_OPEN: usize = 50;
const HOT_SUBSCRIBERS: usize = 100;
/// 64 KiB messages published to the hot channel: 8 MiB.
const HOT_LARGE_MESSAGES: u64 = 128;
const MAX_CONNECTIONS: usize = PUBLISHERS + HALF_OPEN + HOT_SUBSCRIBERS + 20;
/// The broker's resident memory bound for this test: two 64 KiB socket
/// buffers per connection (docs/OPERATIONS.md, "Memory") for every
/// connection allowed, plus 128 MiB for the process itself and the
/// channels' indexes and maps.
const RESIDENT_BYTES_MAX: u64 = (MAX_CONNECTIONS as u64) * 128 * 1024 + 128 * 1024 * 1024;
/// Generous bound on any single step on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(120);

/// The soft limit on open files of this process (from /proc, no FFI).
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap_or(u64::MAX)
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future).await.unwrap_or_else(|_| panic!("timed out after {LIMIT:?}: {what}"))
}

async fn publish(
    connection: &Connection,
    channel: &str,
    payload: &[u8],
) -> Result<Response, weir::client::ClientError> {
    let message = Message::from_payload(Bytes::copy_from_slice(payload));
    connection.request(Request::Publish { channel: channel.into(), partition: None, producer: None, message }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_serves_well_behaved_clients_through_load_and_abuse() {
    // Sockets of both ends live on this machine: the soft limit on open
    // files (often 1,024) is raised to the hard limit for this process and
    // the broker it starts, which inherits it.
    let needed = (MAX_CONNECTIONS + FLOOD) as u64 * 2 + 256;
    let _ = rlimit::increase_nofile_limit(needed);
    assert!(
        open_files_limit() >= needed,
        "this test opens about {needed} sockets on both ends and the hard limit on open files is lower: \
         raise it (`ulimit -Hn`)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("broker.toml");
    // Timeouts far beyond the test's length: the half-open connections and
    // the stuck subscriber hold their slots however slow the machine is,
    // so the slots left for the flood are known.
    let settings = format!(
        "fsync = \"never\"\nmetrics_addr = \"\"\nmax_connections = {MAX_CONNECTIONS}\n\
         idle_timeout_ms = 3600000\nframe_timeout_ms = 3600000\n"
    );
    std::fs::write(&config, settings).unwrap();
    let broker = serve(&config, &dir.path().join("data"), &addr);
    let pid = broker.0.id();
    let admin = connect_when_up(&addr, "admin", LIMIT).await;
    // The hot channel exists before anyone subscribes to it.
    let create = Request::CreateChannel {
        channel: "hot".into(),
        retention: weir::protocol::ChannelRetention::default(),
        partitions: Some(1),
    };
    assert_eq!(admin.request(create).await.unwrap(), Response::ChannelCreated);

    // Half-open connections: a TCP connection that sends nothing, and one
    // that stops inside a frame. They hold slots until the broker's
    // timeouts, and must not hold anyone else up.
    let mut half_open = Vec::new();
    for index in 0..HALF_OPEN {
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        if index % 2 == 0 {
            socket.write_all(&[0, 0, 0, 200, 1]).unwrap();
        }
        half_open.push(socket);
    }

    // A subscriber that never reads its socket, on the hot channel: HELLO
    // and SUBSCRIBE written, nothing ever read back.
    let mut stuck = std::net::TcpStream::connect(&addr).unwrap();
    let hello = Request::Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        client_name: "never-reads".into(),
        auth_token: Bytes::new(),
    };
    let subscribe = Request::Subscribe {
        subscription_id: 1,
        channel: "hot".into(),
        partition: None,
        start: StartPosition::Earliest,
        durable_name: None,
        group: None,
        max_inflight: 4096,
    };
    stuck.write_all(&hello.encode(1)).unwrap();
    stuck.write_all(&subscribe.encode(2)).unwrap();
    let options =
        SubscribeOptions { start: StartPosition::Earliest, max_inflight: 1024, ..SubscribeOptions::default() };

    // A hundred subscribers on the hot channel.
    let mut readers = Vec::new();
    for index in 0..HOT_SUBSCRIBERS {
        let connection = Connection::connect(&addr, &format!("reader-{index}")).await.unwrap();
        let subscriber = Subscriber::subscribe(&connection, "hot", options.clone()).await.unwrap();
        readers.push((connection, subscriber));
    }

    // Enough on the hot channel to fill the stuck subscriber's socket
    // buffers (a few MiB on loopback) many times over its window's worth.
    for _ in 0..HOT_LARGE_MESSAGES {
        let answer = within("a large publish", publish(&admin, "hot", &[7u8; 64 * 1024])).await.unwrap();
        assert!(matches!(answer, Response::PublishAck { .. }), "{answer:?}");
    }

    // A thousand connections publishing at once; every publish answered
    // exactly once (a request gets its answer or an error, never two).
    let mut publishers = Vec::new();
    for index in 0..PUBLISHERS {
        let addr = addr.clone();
        publishers.push(tokio::spawn(async move {
            let connection = Connection::connect(&addr, &format!("publisher-{index}")).await.unwrap();
            let mut offsets = Vec::new();
            for sequence in 0..PUBLISHES_EACH {
                let channel = if index % 10 == 0 { "hot".to_owned() } else { format!("load-{}", index % CHANNELS) };
                let payload = format!("{index}-{sequence}");
                match publish(&connection, &channel, payload.as_bytes()).await.unwrap() {
                    Response::PublishAck { first_offset, count: 1, .. } => offsets.push((channel, first_offset)),
                    other => panic!("publisher {index}: expected one PUBLISH_ACK, got {other:?}"),
                }
            }
            (connection, offsets)
        }));
    }

    // A flood beyond max_connections while the thousand are connected:
    // each refused with an error, none hanging.
    let mut connected = Vec::new();
    for publisher in publishers {
        connected.push(within("a publisher", publisher).await.unwrap());
    }
    let mut refused = 0;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        match within("a flood connection", Connection::connect(&addr, "flood")).await {
            Err(error) if error.code() == Some(ErrorCode::TooManyConnections) => refused += 1,
            Err(other) => panic!("a connection beyond the limit: {other}"),
            Ok(connection) => flood.push(connection),
        }
    }
    // The slots left take a few: MAX_CONNECTIONS minus the publishers,
    // the half-open ones, the readers, the admin and the stuck subscriber;
    // every other one is refused.
    let free = MAX_CONNECTIONS - (PUBLISHERS + HALF_OPEN + HOT_SUBSCRIBERS + 2);
    assert!(refused >= FLOOD - free, "only {refused} of {FLOOD} refused; {} admitted", flood.len());

    // The well-behaved client is served throughout.
    let answer = within("the admin's publish", publish(&admin, "hot", b"admin")).await.unwrap();
    assert!(matches!(answer, Response::PublishAck { .. }), "{answer:?}");

    // Every publish stored once: 5,000 distinct offsets.
    let offsets: HashSet<(String, u64)> = connected.iter().flat_map(|(_, offsets)| offsets.iter().cloned()).collect();
    assert_eq!(offsets.len(), PUBLISHERS * PUBLISHES_EACH as usize);

    // Each of the hundred reads every message of the hot channel: the
    // thousand's (one in ten of them) and the admin's.
    let hot_messages = (PUBLISHERS / 10) as u64 * PUBLISHES_EACH + 1 + HOT_LARGE_MESSAGES;
    for (index, (_, subscriber)) in readers.iter_mut().enumerate() {
        let mut read = 0;
        while read < hot_messages {
            match within("a hot message", subscriber.next()).await {
                Some(Ok(Event::Message { record, .. })) => {
                    read += 1;
                    subscriber.ack(record.offset).await.unwrap();
                }
                Some(Ok(Event::Notice { .. })) => {}
                other => panic!("reader {index}: {other:?}"),
            }
        }
    }

    let resident = resident_bytes(pid);
    assert!(resident < RESIDENT_BYTES_MAX, "resident {resident} bytes, bound {RESIDENT_BYTES_MAX}");
    eprintln!("broker resident memory under load and abuse: {} MiB", resident >> 20);
    drop((stuck, half_open, flood));
}
