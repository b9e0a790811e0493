//! `weir bench latency`: messages of each size at a fixed rate through a
//! broker to a caught-up subscriber, latency from each message's intended
//! send time (coordinated omission corrected) to its acknowledgement
//! (publish) and to its delivery (end to end).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::BenchError;
use super::driver::{ConsumerOptions, Driver, StartAt};
use super::recorder::Series;
use super::schedule::{Schedule, latency};

/// What a latency run does.
#[derive(Clone, Debug)]
pub struct LatencyOptions {
    pub sizes: Vec<usize>,
    pub rate_per_second: u64,
    pub duration: Duration,
    /// Messages of this first stretch are sent but not recorded.
    pub warmup: Duration,
}

/// The series of one size.
pub struct SizeResult {
    pub size: usize,
    /// From the intended send time until the client library took the
    /// message (its send call returned; the acknowledgement is awaited
    /// apart): the client's own send path, and the hand-off to it.
    pub send: Series,
    pub publish: Series,
    pub end_to_end: Series,
}

impl SizeResult {
    /// Its series in report order.
    pub fn series(&self) -> [&Series; 3] {
        [&self.send, &self.publish, &self.end_to_end]
    }
}

/// The subscriber's window: far above what a caught-up subscriber at the
/// study's rates has outstanding.
const SUBSCRIBER_WINDOW: u32 = 1024;

/// Messages handed from the sender thread to the runtime and not yet sent:
/// at a fixed rate the runtime keeps up, so this is only a bound.
const SENDS_QUEUED_MAX: usize = 1024;

/// Bytes at the start of each payload that carry its index in the run.
const INDEX_BYTES: usize = 8;

/// Runs every size in turn against `target`.
///
/// # Errors
/// The broker refused a request or the connection failed.
pub async fn run(target: &dyn Driver, options: &LatencyOptions) -> Result<Vec<SizeResult>, BenchError> {
    let mut results = Vec::new();
    for &size in &options.sizes {
        results.push(run_size(target, options, size).await?);
    }
    Ok(results)
}

fn payload(index: u64, size: usize) -> Bytes {
    let mut bytes = Vec::with_capacity(size.max(INDEX_BYTES));
    bytes.extend_from_slice(&index.to_be_bytes());
    while bytes.len() < size {
        bytes.extend_from_slice(&rand::random::<u64>().to_be_bytes());
    }
    bytes.truncate(size.max(INDEX_BYTES));
    Bytes::from(bytes)
}

/// Waits until `deadline` within a few microseconds: a thread sleep most of
/// the way (precise to tens of µs), then a spin.
pub(crate) fn wait_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(200);
    if let Some(sleep) = deadline.checked_duration_since(Instant::now()).and_then(|d| d.checked_sub(SPIN)) {
        std::thread::sleep(sleep);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

fn index_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..INDEX_BYTES)?.try_into().ok()?))
}

async fn run_size(target: &dyn Driver, options: &LatencyOptions, size: usize) -> Result<SizeResult, BenchError> {
    let channel = format!("bench-latency-{size}-{}", rand::random::<u32>());
    target.create(&channel, 1).await?;
    let consumer_options = ConsumerOptions { from: StartAt::End, window: SUBSCRIBER_WINDOW, group: None };
    let mut consumer = target.consumer(&channel, consumer_options).await?;
    let publisher = target.producer(&channel).await?;
    let total = (options.rate_per_second as f64 * options.duration.as_secs_f64()).ceil().max(1.0) as u64;
    let warmup = (options.rate_per_second as f64 * options.warmup.as_secs_f64()).ceil() as u64;
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(50), options.rate_per_second);
    // The sender is a thread of its own: tokio's timer wakes up to a
    // millisecond late, which would be measured as the broker's latency.
    // This thread builds each payload ahead of time, sleeps most of the
    // way and spins the rest, then hands the message to one task on the
    // runtime, which sends it and awaits its acknowledgement beside the
    // others: one hand-off into the runtime per message, as any
    // application thread has (a spawned task per acknowledgement would add
    // a second wake-up to every send).
    let (due, mut due_rx) = mpsc::channel::<(u64, Bytes)>(SENDS_QUEUED_MAX);
    let sender = std::thread::Builder::new()
        .name("weir-bench-sender".into())
        .spawn(move || {
            for index in 0..total {
                let message = payload(index, size);
                wait_until(schedule.intended(index));
                if due.blocking_send((index, message)).is_err() {
                    return;
                }
            }
        })
        .map_err(BenchError::Io)?;
    // Acknowledgements are recorded as they come: nothing here grows with
    // the length of the run.
    let acknowledging = {
        let publisher = Arc::clone(&publisher);
        tokio::spawn(async move {
            let mut publish = Series::new(format!("publish, {size} B"));
            let mut send = Series::new(format!("send, {size} B"));
            let mut record = |(index, done): (u64, Result<Instant, BenchError>)| {
                if index >= warmup {
                    publish.record(latency(schedule.intended(index), done?));
                }
                Ok::<(), BenchError>(())
            };
            let mut waiting = FuturesUnordered::new();
            loop {
                tokio::select! {
                    next = due_rx.recv() => match next {
                        Some((index, message)) => {
                            let sent = publisher.send(None, message).await;
                            if index >= warmup && sent.is_ok() {
                                send.record(latency(schedule.intended(index), Instant::now()));
                            }
                            waiting.push(async move {
                                let done = match sent {
                                    Ok(ack) => ack.await.map(|()| Instant::now()),
                                    Err(error) => Err(error),
                                };
                                (index, done)
                            });
                        }
                        None => break,
                    },
                    Some(answer) = waiting.next(), if !waiting.is_empty() => record(answer)?,
                }
            }
            while let Some(answer) = waiting.next().await {
                record(answer)?;
            }
            Ok::<(Series, Series), BenchError>((send, publish))
        })
    };
    let mut end_to_end = Series::new(format!("end-to-end, {size} B"));
    let bar = super::progress(total, format!("latency, {size} B"));
    let mut received = 0;
    while received < total {
        let delivery = consumer.next().await?;
        let now = delivery.received_at;
        let Some(index) = index_of(&delivery.payload) else { continue };
        received += 1;
        bar.inc(1);
        if index >= warmup {
            end_to_end.record(latency(schedule.intended(index), now));
        }
    }
    let _ = tokio::task::spawn_blocking(move || sender.join()).await;
    let (send, publish) =
        acknowledging.await.map_err(|error| BenchError::Target(format!("the sending task failed: {error}")))??;
    bar.finish_and_clear();
    publisher.close().await;
    drop(consumer);
    target.delete(&channel).await?;
    Ok(SizeResult { size, send, publish, end_to_end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_carries_its_index_and_has_the_size_asked_for() {
        for size in [8, 9, 256, 1024, 5000] {
            let bytes = payload(42, size);
            assert_eq!(bytes.len(), size);
            assert_eq!(index_of(&bytes), Some(42));
        }
        // Sizes below the index still carry it.
        assert_eq!(payload(7, 1).len(), INDEX_BYTES);
    }
}
