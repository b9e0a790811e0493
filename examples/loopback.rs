//! Loopback measurements of the broker's hot paths, in one process: a
//! server on its own runtime, clients on another, over 127.0.0.1.
//!
//! ```sh
//! cargo run --release --example loopback -- latency --rate 50 --seconds 60
//! cargo run --release --example loopback -- publish --messages 500000
//! cargo run --release --example loopback -- batch --megabytes 2048 --fsync always
//! cargo run --release --example loopback -- catchup --megabytes 1024
//! cargo run --release --example loopback -- partitions --partitions 4 --messages 500000
//! cargo run --release --example loopback -- rebalance --session-ms 3000 --heartbeat-ms 100
//! ```
//!
//! The full benchmark tool (`weir bench`) comes later; this exists to hold
//! the server's hot paths to the targets in docs/BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use weir::client::{Connection, Event, Publisher, PublisherOptions, SubscribeOptions, Subscriber};
use weir::config::Config;
use weir::protocol::{Request, Response, StartPosition};
use weir::record::Message;
use weir::storage::FsyncPolicy;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "latency".into());
    let fsync = match arg(&args, "--fsync", "never".to_string()).as_str() {
        "always" => FsyncPolicy::Always,
        "interval" => FsyncPolicy::Interval,
        _ => FsyncPolicy::Never,
    };
    let dir = tempfile::tempdir_in(std::env::var("WEIR_BENCH_DIR").unwrap_or_else(|_| "target".into()))?;
    let server_threads = arg(&args, "--server-threads", 2usize);
    let client_threads = arg(&args, "--client-threads", 2usize);
    let server_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(server_threads).enable_all().build()?;
    let config = Config {
        listen_addr: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        fsync,
        max_inflight_deliveries: 65_536,
        metrics_addr: String::new(),
        heartbeat_interval_ms: arg(&args, "--heartbeat-ms", 10_000u64),
        group_session_timeout_ms: arg(&args, "--session-ms", 20_000u64),
        ..Config::default()
    };
    let server = server_runtime.block_on(weir::server::start(config))?;
    let addr = server.local_addr().to_string();
    let client_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(client_threads).enable_all().build()?;
    println!("mode {mode}, fsync {fsync:?}");
    client_runtime.block_on(async {
        match mode.as_str() {
            "latency" => {
                latency(
                    &addr,
                    arg(&args, "--rate", 50u64),
                    arg(&args, "--seconds", 20u64),
                    arg(&args, "--size", 1024usize),
                )
                .await
            }
            "publish" => {
                publish_one_at_a_time(&addr, arg(&args, "--messages", 500_000u64), arg(&args, "--size", 1024usize))
                    .await
            }
            "batch" => {
                publish_batches(
                    &addr,
                    arg(&args, "--megabytes", 1024u64),
                    arg(&args, "--batch", 1000usize),
                    arg(&args, "--size", 1024usize),
                )
                .await
            }
            "catchup" => catch_up(&addr, arg(&args, "--megabytes", 1024u64), arg(&args, "--size", 1024usize)).await,
            "partitions" => {
                publish_to_partitions(
                    &addr,
                    arg(&args, "--partitions", 4u32),
                    arg(&args, "--messages", 500_000u64),
                    arg(&args, "--size", 1024usize),
                )
                .await
            }
            "rebalance" => rebalance(&addr, arg(&args, "--session-ms", 20_000u64)).await,
            other => anyhow::bail!("unknown mode {other}: latency, publish, batch, catchup, partitions or rebalance"),
        }
    })?;
    server_runtime.block_on(server.stop())?;
    Ok(())
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// Publish at a fixed rate; a caught-up subscriber measures the time from
/// each message's *intended* send time to its delivery (so a stall delays
/// every message scheduled during it: coordinated omission corrected).
async fn latency(addr: &str, rate: u64, seconds: u64, size: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(addr, "latency-subscriber").await?;
    let options = SubscribeOptions { start: StartPosition::Latest, ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "latency", options).await?;
    let publisher = Publisher::connect(addr, "latency", PublisherOptions::default()).await?;
    let total = rate * seconds;
    let origin = Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let body = payload(size);
    let receiver = tokio::spawn(async move {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let mut received = 0;
        while received < total {
            let Some(event) = subscriber.next().await else { anyhow::bail!("subscription ended") };
            if let Event::Message { partition, record } = event? {
                let now = origin.elapsed().as_nanos() as u64;
                let intended = u64::from_be_bytes(record.payload[..8].try_into()?);
                histogram.record(now.saturating_sub(intended).max(1))?;
                subscriber.ack_partition(partition, record.offset).await?;
                received += 1;
            }
        }
        Ok(histogram)
    });
    for i in 0..total {
        let intended = interval * i as u32;
        wait_until(origin + intended).await;
        let mut message = body.clone();
        message[..8].copy_from_slice(&(intended.as_nanos() as u64).to_be_bytes());
        let receipt = publisher.enqueue(Message::from_payload(message)).await?;
        tokio::spawn(receipt);
    }
    let histogram = receiver.await??;
    publisher.close().await;
    println!("publish -> delivery latency, {total} messages of {size} B at {rate}/s (µs):");
    for quantile in [0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999, 1.0] {
        println!("  p{:<9} {:>10.1}", quantile * 100.0, histogram.value_at_quantile(quantile) as f64 / 1000.0);
    }
    Ok(())
}

/// Waits until `deadline` precisely: tokio's timer has millisecond
/// granularity, which would add up to a millisecond of the benchmark's own
/// lateness to every measurement. Sleep most of the way, then spin.
async fn wait_until(deadline: Instant) {
    let spin = Duration::from_micros(200);
    if let Some(sleep) = deadline.checked_duration_since(Instant::now()).and_then(|d| d.checked_sub(spin)) {
        // This runs on the thread driving `block_on`, not on a runtime
        // worker, so a blocking sleep (precise to tens of µs) is fine.
        std::thread::sleep(sleep);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// One message per call, every ack awaited (pipelined through the
/// publisher's batching).
async fn publish_one_at_a_time(addr: &str, messages: u64, size: usize) -> anyhow::Result<()> {
    let publisher = Arc::new(Publisher::connect(addr, "publish", PublisherOptions::default()).await?);
    let body = Bytes::from(payload(size));
    let (receipts, mut awaiting) = tokio::sync::mpsc::channel(65_536);
    let waiter = tokio::spawn(async move {
        let mut acked = 0u64;
        while let Some(receipt) = awaiting.recv().await {
            let receipt: tokio::sync::oneshot::Receiver<_> = receipt;
            receipt.await??;
            acked += 1;
        }
        anyhow::Ok(acked)
    });
    let start = Instant::now();
    for _ in 0..messages {
        let receipt = publisher.enqueue(Message::from_payload(body.clone())).await?;
        receipts.send(receipt).await?;
    }
    drop(receipts);
    let acked = waiter.await??;
    let elapsed = start.elapsed();
    println!(
        "{acked} messages of {size} B in {:.2} s: {:.0} msg/s, {:.1} MB/s",
        elapsed.as_secs_f64(),
        acked as f64 / elapsed.as_secs_f64(),
        acked as f64 * size as f64 / elapsed.as_secs_f64() / 1e6
    );
    Ok(())
}

/// `messages` in all, one per call, from one publisher per partition of a
/// channel of `partitions` partitions, every ack awaited: the aggregate
/// rate, to compare with one partition and one publisher.
async fn publish_to_partitions(addr: &str, partitions: u32, messages: u64, size: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(addr, "admin").await?;
    let create = Request::CreateChannel {
        channel: "partitioned".into(),
        retention: weir::protocol::ChannelRetention::default(),
        partitions: Some(partitions),
    };
    connection.request(create).await?;
    let body = Bytes::from(payload(size));
    let per_publisher = messages / u64::from(partitions);
    let mut publishers = Vec::new();
    for partition in 0..partitions {
        let options = PublisherOptions { partition, ..PublisherOptions::default() };
        publishers.push(Arc::new(Publisher::connect(addr, "partitioned", options).await?));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for publisher in publishers {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let (receipts, mut awaiting) = tokio::sync::mpsc::channel(65_536);
            let waiter = tokio::spawn(async move {
                let mut acked = 0u64;
                while let Some(receipt) = awaiting.recv().await {
                    let receipt: tokio::sync::oneshot::Receiver<_> = receipt;
                    receipt.await??;
                    acked += 1;
                }
                anyhow::Ok(acked)
            });
            for _ in 0..per_publisher {
                let receipt = publisher.enqueue(Message::from_payload(body.clone())).await?;
                receipts.send(receipt).await?;
            }
            drop(receipts);
            waiter.await?
        }));
    }
    let mut acked = 0;
    for task in tasks {
        acked += task.await??;
    }
    let elapsed = start.elapsed();
    println!(
        "{partitions} partitions, {partitions} publishers: {acked} messages of {size} B in {:.2} s: {:.0} msg/s, {:.1} MB/s",
        elapsed.as_secs_f64(),
        acked as f64 / elapsed.as_secs_f64(),
        acked as f64 * size as f64 / elapsed.as_secs_f64() / 1e6
    );
    Ok(())
}

/// Reads a group member's events until it is assigned `count` partitions;
/// returns when that happened.
async fn until_assigned(subscriber: &mut Subscriber, assigned: &mut usize, count: usize) -> anyhow::Result<Instant> {
    while *assigned != count {
        match subscriber.next().await {
            Some(Ok(Event::Notice { notice: weir::protocol::Notice::Assigned { .. }, .. })) => *assigned += 1,
            Some(Ok(Event::Notice { notice: weir::protocol::Notice::Revoked { .. }, .. })) => *assigned -= 1,
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error.into()),
            None => anyhow::bail!("the subscription ended"),
        }
    }
    Ok(Instant::now())
}

/// How long a consumer group takes to hand a leaving member's partitions
/// to the one left: a member that disconnects, and one that goes silent
/// (no frame at all) until `group_session_timeout_ms` ends its membership.
async fn rebalance(addr: &str, session_ms: u64) -> anyhow::Result<()> {
    let admin = Connection::connect(addr, "admin").await?;
    let create = Request::CreateChannel {
        channel: "grouped".into(),
        retention: weir::protocol::ChannelRetention::default(),
        partitions: Some(4),
    };
    admin.request(create).await?;
    let join = |connection: Connection| async move {
        let options = SubscribeOptions { group: Some("g".into()), ..SubscribeOptions::default() };
        let subscriber = Subscriber::subscribe(&connection, "grouped", options).await?;
        anyhow::Ok((connection, subscriber))
    };
    let (_stays, mut staying) = join(Connection::connect(addr, "staying").await?).await?;
    let mut assigned = 0;
    until_assigned(&mut staying, &mut assigned, 4).await?;

    // A member that disconnects.
    let (leaving_connection, leaving) = join(Connection::connect(addr, "leaving").await?).await?;
    until_assigned(&mut staying, &mut assigned, 2).await?;
    let left = Instant::now();
    drop(leaving);
    drop(leaving_connection);
    let done = until_assigned(&mut staying, &mut assigned, 4).await?;
    println!("disconnect: the partitions were back {:.1} ms after the member left", (done - left).as_secs_f64() * 1e3);

    // A member that goes silent: a raw connection that sends HELLO and
    // SUBSCRIBE and then nothing.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut silent = tokio::net::TcpStream::connect(addr).await?;
    let hello =
        Request::Hello { version_min: 2, version_max: 2, client_name: "silent".into(), auth_token: Bytes::new() };
    let subscribe = Request::Subscribe {
        subscription_id: 1,
        channel: "grouped".into(),
        partition: None,
        start: StartPosition::Earliest,
        durable_name: None,
        group: Some("g".into()),
        max_inflight: 16,
    };
    let mut frames = hello.encode(1);
    frames.extend(subscribe.encode(2));
    silent.write_all(&frames).await?;
    let last_frame = Instant::now();
    // Keep reading what the broker sends it, so that only its silence
    // counts.
    let drain = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while matches!(silent.read(&mut buffer).await, Ok(1..)) {}
    });
    until_assigned(&mut staying, &mut assigned, 2).await?;
    let done = until_assigned(&mut staying, &mut assigned, 4).await?;
    println!(
        "silence: the partitions were back {:.1} ms after the member's last frame (group_session_timeout_ms = {session_ms}, bound {} ms)",
        (done - last_frame).as_secs_f64() * 1e3,
        session_ms + 1000
    );
    drain.abort();
    Ok(())
}

/// PUBLISH_BATCH frames straight from the connection, a few in flight,
/// every ack awaited.
async fn publish_batches(addr: &str, megabytes: u64, batch: usize, size: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(addr, "batch-publisher").await?;
    let body = Bytes::from(payload(size));
    let messages: Vec<Message> = (0..batch).map(|_| Message::from_payload(body.clone())).collect();
    let batches = megabytes * 1_000_000 / (batch * size) as u64;
    const IN_FLIGHT: usize = 8;
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..batches {
        if pending.len() == IN_FLIGHT {
            let answer: tokio::sync::oneshot::Receiver<_> = pending.pop_front().expect("pending");
            expect_ack(answer.await?)?;
        }
        let request = Request::PublishBatch {
            channel: "batch".into(),
            partition: None,
            producer: None,
            messages: messages.clone(),
        };
        pending.push_back(connection_send(&connection, request).await?);
    }
    for answer in pending {
        expect_ack(answer.await?)?;
    }
    let elapsed = start.elapsed();
    let bytes = batches as f64 * (batch * size) as f64;
    println!(
        "{batches} batches of {batch} x {size} B in {:.2} s: {:.1} MB/s, {:.0} msg/s",
        elapsed.as_secs_f64(),
        bytes / elapsed.as_secs_f64() / 1e6,
        batches as f64 * batch as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

async fn connection_send(
    connection: &Connection,
    request: Request,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<Result<Response, weir::client::ClientError>>> {
    Ok(connection.send_request_pipelined(request).await?)
}

fn expect_ack(answer: Result<Response, weir::client::ClientError>) -> anyhow::Result<()> {
    match answer? {
        Response::PublishAck { .. } => Ok(()),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// Fill a backlog, then time a subscriber reading all of it from the start.
async fn catch_up(addr: &str, megabytes: u64, size: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(addr, "backlog").await?;
    let body = Bytes::from(payload(size));
    let messages: Vec<Message> = (0..1000).map(|_| Message::from_payload(body.clone())).collect();
    let batches = megabytes * 1024 * 1024 / (1000 * size) as u64;
    for _ in 0..batches {
        let request = Request::PublishBatch {
            channel: "backlog".into(),
            partition: None,
            producer: None,
            messages: messages.clone(),
        };
        expect_ack(connection.request(request).await)?;
    }
    let total = batches * 1000;
    let options =
        SubscribeOptions { start: StartPosition::Earliest, max_inflight: 65_536, ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&connection, "backlog", options).await?;
    let start = Instant::now();
    let mut received = 0u64;
    let mut bytes = 0u64;
    while received < total {
        let Some(event) = subscriber.next().await else { anyhow::bail!("subscription ended") };
        if let Event::Message { partition, record } = event? {
            received += 1;
            bytes += record.payload.len() as u64;
            if received.is_multiple_of(4096) || received == total {
                subscriber.ack_partition(partition, record.offset).await?;
            }
        }
    }
    let elapsed = start.elapsed();
    println!(
        "caught up on {received} messages ({:.0} MB of payload) in {:.2} s: {:.2} GB/s, {:.0} msg/s",
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        bytes as f64 / elapsed.as_secs_f64() / 1e9,
        received as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
