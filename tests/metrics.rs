//! The Prometheus endpoint, scraped over HTTP after real traffic. Its own
//! test binary, because the metrics recorder is global to a process.

mod common;

use std::time::Duration;

use bytes::Bytes;
use weir::client::{Publisher, PublisherOptions};
use weir::config::Config;
use weir::record::Message;
use weir::storage::FsyncPolicy;

use common::prometheus::{sample, scrape};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let config = Config {
        listen_addr: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        fsync: FsyncPolicy::Always,
        metrics_addr: metrics_addr.clone(),
        max_message_bytes: 1000,
        ..Config::default()
    };
    let server = weir::server::start(config).await.unwrap();
    let addr = server.local_addr().to_string();
    let publisher = Publisher::connect(&addr, "metered", PublisherOptions::default()).await.unwrap();
    for _ in 0..25 {
        publisher
            .publish(Message {
                key: Bytes::from_static(b"k"),
                payload: Bytes::from(vec![7u8; 99]),
                ..Message::default()
            })
            .await
            .unwrap();
    }
    // A rejected publish: one byte over max_message_bytes, sent raw so the
    // client does not refuse it first.
    let connection = weir::client::Connection::connect(&addr, "raw").await.unwrap();
    let too_large = weir::protocol::Request::Publish {
        channel: "metered".into(),
        partition: None,
        producer: None,
        message: Message::from_payload(vec![0u8; 1001]),
    };
    assert!(connection.request(too_large).await.is_err());
    // A consumer group that acknowledges 10 of the 25 messages: lag 15.
    let options = weir::client::SubscribeOptions {
        group: Some("billing".into()),
        start: weir::protocol::StartPosition::Earliest,
        max_inflight: 10,
        ..weir::client::SubscribeOptions::default()
    };
    let mut member = weir::client::Subscriber::subscribe(&connection, "metered", options).await.unwrap();
    let mut acked = 0;
    while acked < 10 {
        if let Some(Ok(weir::client::Event::Message { partition, record })) = member.next().await {
            member.ack_partition(partition, record.offset).await.unwrap();
            acked += 1;
        }
    }

    // Derived metrics refresh every second: poll, with a generous bound.
    let expected = [
        ("weir_messages_appended_total{channel=\"metered\"}", 25.0),
        ("weir_bytes_appended_total{channel=\"metered\"}", 2500.0),
        ("weir_publishes_rejected_total{reason=\"too_large\"}", 1.0),
        ("weir_connections_open", 2.0),
        ("weir_log_next_offset{channel=\"metered\"}", 25.0),
        ("weir_log_segments{channel=\"metered\"}", 1.0),
        ("weir_group_members{channel=\"metered\",group=\"billing\"}", 1.0),
        ("weir_group_lag_messages{channel=\"metered\",group=\"billing\"}", 15.0),
        ("weir_group_partition_lag_messages{channel=\"metered\",group=\"billing\",partition=\"0\"}", 15.0),
    ];
    let mut page = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        page = scrape(&metrics_addr).await;
        if expected.iter().all(|(series, value)| sample(&page, series) == Some(*value)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (series, value) in expected {
        assert_eq!(sample(&page, series), Some(value), "{series} in:\n{page}");
    }
    // Every publish went through one group commit and one fsync each.
    let fsyncs = sample(&page, "weir_fsync_duration_seconds_count").unwrap();
    assert!((1.0..=25.0).contains(&fsyncs), "{fsyncs} fsyncs recorded");
    assert_eq!(sample(&page, "weir_publish_duration_seconds_count"), Some(25.0), "every stored publish is timed");
    assert!(page.contains("# HELP weir_messages_appended_total"), "metrics are described");
    publisher.close().await;
    server.stop().await.unwrap();
}
