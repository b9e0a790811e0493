//! A subscriber that never acknowledges costs the broker a cursor, not
//! memory: the broker process is run as a child (`weir serve`) so that its
//! own resident memory can be read from /proc while a publisher sends
//! 1 GiB through it.

#[path = "common/child.rs"]
mod child;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use child::{Broker, status_bytes};
use weir::client::{Connection, Event, SubscribeOptions, Subscriber};
use weir::protocol::{Notice, Request, Response};
use weir::record::Message;

const TOTAL_BYTES: u64 = 1 << 30;
const MESSAGE_BYTES: usize = 64 * 1024;
const BATCH_MESSAGES: usize = 64;
const RESIDENT_BYTES_MAX: u64 = 256 * 1024 * 1024;
const WINDOW: u32 = 100;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn connect_with_retries(addr: &str) -> Connection {
    for _ in 0..600 {
        if let Ok(connection) = Connection::connect(addr, "memory-test").await {
            return connection;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the broker did not start listening on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_acks_costs_no_memory_while_a_gigabyte_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("broker.toml");
    // Retention keeps the disk use of this test near 200 MiB (CI machines
    // may have little disk): the gigabyte flows through, it is not kept.
    let settings = "fsync = \"never\"\nmax_batch_bytes = 16777216\nmetrics_addr = \"\"\n\
                    segment_bytes = 33554432\nretention_max_bytes = 134217728\nretention_check_interval_ms = 100\n";
    std::fs::write(&config, settings).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let broker = Broker(child);
    let pid = broker.0.id();

    let subscriber_connection = connect_with_retries(&addr).await;
    let options = SubscribeOptions { max_inflight: WINDOW, ..SubscribeOptions::default() };
    let mut subscriber = Subscriber::subscribe(&subscriber_connection, "flood", options).await.unwrap();

    let publisher = connect_with_retries(&addr).await;
    let payload = Bytes::from(vec![0x42u8; MESSAGE_BYTES]);
    let batch: Vec<Message> = (0..BATCH_MESSAGES).map(|_| Message::from_payload(payload.clone())).collect();
    let batches = TOTAL_BYTES / (MESSAGE_BYTES * BATCH_MESSAGES) as u64;
    let mut resident_max = 0;
    let mut next_offset = 0;
    for i in 0..batches {
        let request =
            Request::PublishBatch { channel: "flood".into(), partition: None, producer: None, messages: batch.clone() };
        let answer = tokio::time::timeout(Duration::from_secs(60), publisher.request(request)).await.unwrap();
        match answer.unwrap() {
            Response::PublishAck { first_offset, count, .. } => {
                assert_eq!(first_offset, next_offset, "every batch is stored, in order, none rejected");
                next_offset += count as u64;
            }
            other => panic!("publish {i} was not acknowledged: {other:?}"),
        }
        if i % 16 == 0 {
            resident_max = resident_max.max(status_bytes(pid, "VmRSS:"));
        }
    }
    assert_eq!(next_offset, batches * BATCH_MESSAGES as u64);

    // The subscriber got exactly its window and nothing more.
    let mut received = 0;
    while received < WINDOW {
        let event = tokio::time::timeout(Duration::from_secs(30), subscriber.next()).await.unwrap();
        if let Some(Ok(Event::Message { partition, record })) = event {
            assert_eq!((partition, record.offset), (0, received as u64));
            received += 1;
        }
    }
    let peak = status_bytes(pid, "VmHWM:");
    resident_max = resident_max.max(status_bytes(pid, "VmRSS:"));
    assert!(
        peak < RESIDENT_BYTES_MAX && resident_max < RESIDENT_BYTES_MAX,
        "broker peak resident memory {peak} B (sampled max {resident_max} B) exceeds {RESIDENT_BYTES_MAX} B"
    );
    eprintln!("broker peak resident memory: {:.1} MiB", peak as f64 / (1024.0 * 1024.0));

    // Acknowledging opens the window again: the cursor was only waiting.
    // Retention has meanwhile deleted what it had not read, which it is
    // told, and it goes on from the log start.
    subscriber.ack(WINDOW as u64 - 1).await.unwrap();
    let mut skipped_to = None;
    let next = loop {
        let event = tokio::time::timeout(Duration::from_secs(30), subscriber.next()).await.unwrap();
        match event {
            Some(Ok(Event::Notice { notice: Notice::Skipped { resume_offset, .. }, .. })) => {
                skipped_to = Some(resume_offset)
            }
            Some(Ok(Event::Notice { .. })) => {}
            Some(Ok(Event::Message { record, .. })) => break record.offset,
            other => panic!("expected the next message after the ack, got {other:?}"),
        }
    };
    match skipped_to {
        Some(resume_offset) => assert_eq!(next, resume_offset, "delivery resumes where the SKIPPED notice says"),
        None => assert_eq!(next, WINDOW as u64, "without retention in between, delivery resumes right after the ack"),
    }
    // Retention runs every 100 ms on its own thread, behind the publisher
    // on a loaded machine: the bound is asserted once it has caught up
    // (it never does if retention keeps the gigabyte).
    let channel_dir = dir.path().join("data/channels/flood");
    let channel_bytes = || -> u64 {
        std::fs::read_dir(&channel_dir)
            .unwrap()
            .filter_map(|entry| entry.ok()?.metadata().ok())
            .map(|metadata| metadata.len())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut data_bytes = channel_bytes();
    while data_bytes >= 256 * 1024 * 1024 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        data_bytes = channel_bytes();
    }
    assert!(data_bytes < 256 * 1024 * 1024, "retention kept the channel at {data_bytes} bytes");
}
