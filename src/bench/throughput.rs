//! `weir bench throughput`: the study's throughput run. For each size, one
//! publisher sends N messages as fast as its window allows and is done only
//! when every acknowledgement is back; then one subscriber reads them all
//! from the start of the channel. Rates each way, in messages and bytes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::BenchError;
use super::driver::{ConsumerOptions, Driver, StartAt};

/// What a throughput run does.
#[derive(Clone, Debug)]
pub struct ThroughputOptions {
    pub sizes: Vec<usize>,
    pub messages: u64,
    /// At most this many payload bytes per size: fewer messages for large
    /// sizes (100,000 of 1 MiB would be 100 GiB of disk).
    pub bytes_max: u64,
    /// The subscriber's window (`max_inflight`), capped by the broker's.
    pub subscriber_window: u32,
}

impl ThroughputOptions {
    /// The messages a size gets: `messages`, or fewer to stay within
    /// `bytes_max`, and at least one.
    pub fn messages_for(&self, size: usize) -> u64 {
        self.messages.min(self.bytes_max / (size.max(1) as u64)).max(1)
    }
}

/// One direction's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rate {
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
    /// Payload bytes per second, in MB (10^6 bytes).
    pub megabytes_per_second: f64,
}

impl Rate {
    fn new(messages: u64, size: usize, elapsed: Duration) -> Rate {
        let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let bytes = messages * size as u64;
        Rate {
            messages,
            bytes,
            seconds,
            messages_per_second: messages as f64 / seconds,
            megabytes_per_second: bytes as f64 / seconds / 1e6,
        }
    }
}

/// One size's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SizeThroughput {
    pub size: usize,
    /// The same messages streamed one way over loopback TCP, no broker.
    pub floor: Rate,
    /// From the first publish to the last acknowledgement.
    pub publish: Rate,
    /// From subscribing at the start of the channel to the last message.
    pub consume: Rate,
}

/// Runs every size in turn against `target`.
///
/// # Errors
/// The broker refused a request or the connection failed.
pub async fn run(target: &dyn Driver, options: &ThroughputOptions) -> Result<Vec<SizeThroughput>, BenchError> {
    let mut results = Vec::new();
    for &size in &options.sizes {
        results.push(run_size(target, options, size).await?);
    }
    Ok(results)
}

async fn run_size(target: &dyn Driver, options: &ThroughputOptions, size: usize) -> Result<SizeThroughput, BenchError> {
    let messages = options.messages_for(size);
    let floor = tokio::task::spawn_blocking(move || super::floor::stream(size, messages))
        .await
        .map_err(|error| BenchError::Target(format!("the floor measurement failed: {error}")))?
        .map_err(BenchError::Io)?;
    let floor = Rate::new(messages, size, floor);
    let channel = format!("bench-throughput-{size}-{}", rand::random::<u32>());
    target.create(&channel, 1).await?;
    // One payload for every message: the run measures the broker, not the
    // generator's random numbers (the broker neither compresses nor
    // deduplicates payloads).
    let payload: Bytes = (0..size).map(|_| rand::random::<u8>()).collect::<Vec<u8>>().into();

    let publisher = target.producer(&channel).await?;
    let started = Instant::now();
    // Receipts are awaited in order on a task of their own while the loop
    // keeps the publisher's queue full; the queue (`queue_depth`) bounds
    // what is outstanding.
    let (receipts, mut pending) = tokio::sync::mpsc::channel(PENDING_RECEIPTS_MAX);
    let collector = tokio::spawn(async move {
        let mut acked = 0_u64;
        while let Some(receipt) = pending.recv().await {
            let ack: super::driver::Ack = receipt;
            ack.await?;
            acked += 1;
        }
        Ok::<_, BenchError>((acked, Instant::now()))
    });
    let bar = super::progress(messages * 2, format!("throughput, {size} B"));
    for _ in 0..messages {
        bar.inc(1);
        let receipt = publisher.send(None, payload.clone()).await?;
        if receipts.send(receipt).await.is_err() {
            break;
        }
    }
    drop(receipts);
    let (acked, last_ack) =
        collector.await.map_err(|error| BenchError::Target(format!("the receipt collector failed: {error}")))??;
    publisher.close().await;
    let publish = Rate::new(acked, size, last_ack - started);

    let mut consumer = target
        .consumer(&channel, ConsumerOptions { from: StartAt::Start, window: options.subscriber_window, group: None })
        .await?;
    let started = Instant::now();
    let mut received = 0_u64;
    while received < acked {
        consumer.next().await?;
        received += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let consume = Rate::new(received, size, started.elapsed());
    drop(consumer);
    target.delete(&channel).await?;
    Ok(SizeThroughput { size, floor, publish, consume })
}

/// Receipts handed from the sending loop to the collector before the loop
/// waits; the publisher's own queue is the real bound.
const PENDING_RECEIPTS_MAX: usize = 64 * 1024;

/// A whole throughput report.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputReport {
    pub header: super::report::Header,
    /// The windows the broker and the client used, as the driver states
    /// them, and the consumer's.
    pub windows: String,
    pub results: Vec<SizeThroughput>,
}

/// The report as a table.
pub fn report_table(report: &ThroughputReport) -> String {
    let header = &report.header;
    format!(
        "{} against {}\nworkload: {}; machine: {} cores, kernel {}\nwindows: {}\n{}",
        header.tool,
        header.target,
        header.workload,
        header.machine.cores,
        header.machine.kernel,
        report.windows,
        table(&report.results)
    )
}

/// The results as a table.
pub fn table(results: &[SizeThroughput]) -> String {
    let mut out = format!(
        "{:<12} {:>10} {:>14} {:>10} {:>14} {:>10} {:>14} {:>10}\n",
        "size (B)", "messages", "publish msg/s", "MB/s", "consume msg/s", "MB/s", "floor msg/s", "MB/s"
    );
    for result in results {
        out.push_str(&format!(
            "{:<12} {:>10} {:>14.0} {:>10.1} {:>14.0} {:>10.1} {:>14.0} {:>10.1}\n",
            result.size,
            result.publish.messages,
            result.publish.messages_per_second,
            result.publish.megabytes_per_second,
            result.consume.messages_per_second,
            result.consume.megabytes_per_second,
            result.floor.messages_per_second,
            result.floor.megabytes_per_second,
        ));
    }
    out.push_str("floor: the same bytes streamed one way over loopback TCP, no broker\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_messages_and_megabytes_per_second() {
        let rate = Rate::new(100_000, 1000, Duration::from_millis(500));
        assert_eq!(rate.bytes, 100_000_000);
        assert!((rate.messages_per_second - 200_000.0).abs() < 1e-6);
        assert!((rate.megabytes_per_second - 200.0).abs() < 1e-9);
    }

    #[test]
    fn large_sizes_get_fewer_messages_to_stay_within_the_byte_budget() {
        let options = ThroughputOptions { sizes: vec![], messages: 100_000, bytes_max: 1 << 30, subscriber_window: 1 };
        assert_eq!(options.messages_for(1024), 100_000);
        assert_eq!(options.messages_for(1 << 20), 1024);
        assert_eq!(options.messages_for(1 << 31), 1);
    }

    #[test]
    fn the_table_has_a_row_per_size() {
        let rate = Rate::new(10, 256, Duration::from_secs(1));
        let results = vec![
            SizeThroughput { size: 256, floor: rate.clone(), publish: rate.clone(), consume: rate.clone() },
            SizeThroughput { size: 1024, floor: rate.clone(), publish: rate.clone(), consume: rate },
        ];
        let table = table(&results);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.lines().nth(2).unwrap().starts_with("1024"), "{table}");
    }
}
