//! `weir bench run` (and `weir bench catchup`): an OMB workload against a
//! driver. Topics, partitions, producers, subscriptions and consumers map
//! onto the driver's topics, producers and consumer groups; producers send
//! at the workload's rate (each from its own schedule, latency from the
//! intended send time), an optional backlog is built and drained, then the
//! warm-up and the test run, with a report every period as OMB prints it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::BenchError;
use super::driver::{Ack, ConsumerOptions, Driver, Producer, StartAt};
use super::omb::{KEY_POOL_SIZE, KeyDistributor, Period, STAMP_BYTES, TestResult, Workload};
use super::recorder::Series;
use super::schedule::{Schedule, latency};

/// How a workload is run, besides the workload itself.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub test: Duration,
    pub warmup: Duration,
    /// How often a period is reported (OMB: 10 s).
    pub report_interval: Duration,
    /// The backlog to build and drain before the warm-up, in bytes.
    pub backlog_bytes: u64,
    /// Each consumer's window.
    pub consumer_window: u32,
    /// The payloads messages are made from, in turn (each is stamped with
    /// its intended and actual send times in its first 16 bytes).
    pub payloads: Vec<Bytes>,
}

/// Acknowledgements one producer may have outstanding in the load
/// generator (beyond the client's own queue) before its sender waits.
const ACKS_IN_FLIGHT_MAX: usize = 64 * 1024;
/// The queue from a producer's sending thread to its acknowledgement
/// collector.
const ACK_QUEUE: usize = 1024;
/// Below this interval between a producer's messages, its sender sleeps to
/// each intended time instead of spinning the last 200 µs: spinning takes
/// the cores the broker needs. The lateness this costs is reported as
/// publish delay (as OMB does) and counts in the latencies, which run from
/// the intended time.
const SPIN_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// The backlog at which a drain counts as done when the workload asks for
/// all of it (OMB's floor: with producers running, "zero" is never seen
/// by a poll).
const DRAINED_BACKLOG_MIN: u64 = 1000;
/// How often the backlog is checked while it is built and drained.
const BACKLOG_POLL: Duration = Duration::from_millis(100);
/// A backlog build or drain that moves no message for this long fails the
/// run.
const STALL_MAX: Duration = Duration::from_secs(60);
/// The longest wait, once the test is over, for each of: producers to
/// stop, outstanding acknowledgements, consumers to read what was
/// acknowledged, producers to close.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);
/// Periods shorter than this at a phase change are not reported.
const PERIOD_MIN: Duration = Duration::from_millis(100);

/// Where the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Backlog,
    Drain,
    Warmup,
    Test,
    /// After the test: nothing more is recorded.
    Done,
}

/// The latency series of a period or a phase. `publish` and `end_to_end`
/// run from each message's intended send time (coordinated omission
/// corrected); the `_from_send` ones from its actual send, as OMB's
/// result fields mean them; `publish_delay` is the difference.
#[derive(Clone)]
struct Series5 {
    publish: Series,
    publish_from_send: Series,
    publish_delay: Series,
    end_to_end: Series,
    end_to_end_from_send: Series,
}

impl Series5 {
    fn new(label: &str) -> Series5 {
        Series5 {
            publish: Series::new(format!("publish{label}")),
            publish_from_send: Series::new(format!("publish from send{label}")),
            publish_delay: Series::new(format!("publish delay{label}")),
            end_to_end: Series::new(format!("end-to-end{label}")),
            end_to_end_from_send: Series::new(format!("end-to-end from send{label}")),
        }
    }

    fn clear(&mut self) {
        for series in [
            &mut self.publish,
            &mut self.publish_from_send,
            &mut self.publish_delay,
            &mut self.end_to_end,
            &mut self.end_to_end_from_send,
        ] {
            series.clear();
        }
    }

    /// As OMB's fields mean them: from the actual send.
    fn omb(&self) -> Period<'_> {
        Period {
            publish: &self.publish_from_send,
            publish_delay: &self.publish_delay,
            end_to_end: &self.end_to_end_from_send,
        }
    }

    fn published(&mut self, times: Times, acked: Instant) {
        self.publish.record(latency(times.intended, acked));
        self.publish_from_send.record(latency(times.sent, acked));
        self.publish_delay.record(latency(times.intended, times.sent));
    }

    fn delivered(&mut self, times: Times, received: Instant) {
        self.end_to_end.record(latency(times.intended, received));
        self.end_to_end_from_send.record(latency(times.sent, received));
    }
}

/// When a message was due and when it was handed to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Times {
    intended: Instant,
    sent: Instant,
}

struct Latencies {
    /// Each phase so far and when it began, in order: a message belongs to
    /// the phase during which it was *due*, whenever its acknowledgement or
    /// delivery comes (a warm-up message acknowledged during the test is
    /// not the test's; a test message read after the test is).
    phases: Vec<(Phase, Instant)>,
    period: Series5,
    drain: Series5,
    test: Series5,
}

impl Latencies {
    fn phase(&self) -> Phase {
        self.phases.last().map_or(Phase::Done, |&(phase, _)| phase)
    }

    fn enter(&mut self, phase: Phase, at: Instant) {
        self.phases.push((phase, at));
    }

    fn phase_series(&mut self, intended: Instant) -> Option<&mut Series5> {
        let due_in = self.phases.iter().rev().find(|&&(_, start)| start <= intended).or(self.phases.first());
        match due_in.map(|&(phase, _)| phase) {
            Some(Phase::Drain) => Some(&mut self.drain),
            Some(Phase::Test) => Some(&mut self.test),
            _ => None,
        }
    }

    fn published(&mut self, times: Times, acked: Instant) {
        if self.phase() != Phase::Done {
            self.period.published(times, acked);
        }
        if let Some(phase) = self.phase_series(times.intended) {
            phase.published(times, acked);
        }
    }

    fn delivered(&mut self, times: Times, received: Instant) {
        if self.phase() != Phase::Done {
            self.period.delivered(times, received);
        }
        if let Some(phase) = self.phase_series(times.intended) {
            phase.delivered(times, received);
        }
    }
}

/// What every actor updates.
struct Shared {
    epoch: Instant,
    acked: AtomicU64,
    errors: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    redelivered: AtomicU64,
    /// Messages that were due by the time producing stopped but were never
    /// sent (a stalled client or broker).
    due_not_sent: AtomicU64,
    stop_producing: CancellationToken,
    latencies: Mutex<Latencies>,
    /// The first error of an actor that ends the run.
    failure: Mutex<Option<String>>,
    /// The first failed publish (they are counted, and the run goes on).
    first_publish_error: Mutex<Option<String>>,
}

impl Shared {
    fn new(phase: Phase) -> Shared {
        let now = Instant::now();
        Shared {
            epoch: now,
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            due_not_sent: AtomicU64::new(0),
            stop_producing: CancellationToken::new(),
            latencies: Mutex::new(Latencies {
                phases: vec![(phase, now)],
                period: Series5::new(""),
                drain: Series5::new(", drain"),
                test: Series5::new(""),
            }),
            failure: Mutex::new(None),
            first_publish_error: Mutex::new(None),
        }
    }

    fn latencies(&self) -> std::sync::MutexGuard<'_, Latencies> {
        self.latencies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, error: impl std::fmt::Display) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        failure.get_or_insert_with(|| error.to_string());
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn publish_failed(&self, error: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_publish_error.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert_with(|| error.to_string());
    }

    fn nanos(&self, instant: Instant) -> [u8; 8] {
        (instant.saturating_duration_since(self.epoch).as_nanos() as u64).to_be_bytes()
    }

    /// The stamp of a message: when it was due and when it was sent.
    fn stamp(&self, times: Times) -> [u8; STAMP_BYTES] {
        let mut stamp = [0u8; STAMP_BYTES];
        stamp[..8].copy_from_slice(&self.nanos(times.intended));
        stamp[8..].copy_from_slice(&self.nanos(times.sent));
        stamp
    }

    fn times_of(&self, payload: &[u8]) -> Option<Times> {
        let at = |bytes: &[u8]| -> Option<Instant> {
            self.epoch.checked_add(Duration::from_nanos(u64::from_be_bytes(bytes.try_into().ok()?)))
        };
        Some(Times { intended: at(payload.get(..8)?)?, sent: at(payload.get(8..STAMP_BYTES)?)? })
    }
}

/// Stops every actor when the run ends, however it ends.
struct StopOnDrop {
    producing: CancellationToken,
    consuming: CancellationToken,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.producing.cancel();
        self.consuming.cancel();
    }
}

/// A built and drained backlog.
#[derive(Clone, Debug, Serialize)]
pub struct Drain {
    pub backlog_bytes: u64,
    pub backlog_messages: u64,
    /// From the first publish until the backlog was built.
    pub build_seconds: f64,
    /// From the consumers' start until the backlog was drained (to
    /// `1 - backlogDrainRatio` of it, and at most 1,000 messages left).
    pub drain_seconds: f64,
    /// Messages read a second while draining, over every subscription.
    pub drain_messages_per_second: f64,
    pub drain_megabytes_per_second: f64,
    /// Publish and end-to-end latency, from the intended send time, of the
    /// messages sent while the backlog drained.
    pub publish: super::recorder::Summary,
    pub end_to_end: super::recorder::Summary,
}

/// Messages over the whole run, warm-up and backlog included.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub acknowledged: u64,
    /// Publishes the broker or the client failed (counted; the run goes
    /// on, as OMB's).
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Messages due by the time producing stopped that were never sent.
    pub due_not_sent: u64,
    /// Deliveries over every subscription, redeliveries not included (a
    /// message counts once per subscription).
    pub read: u64,
    /// Deliveries of a message the subscription had been sent before.
    pub redelivered: u64,
    /// Acknowledged deliveries not read when the consumers stopped (after
    /// up to 30 s of reading once producing stopped).
    pub unread: u64,
}

/// What a run gives back.
pub struct Outcome {
    /// OMB's result: latencies from the actual send, as OMB's fields mean.
    pub result: TestResult,
    pub drain: Option<Drain>,
    /// The test's series (warm-up excluded), from the intended send time.
    pub publish: Series,
    pub publish_delay: Series,
    pub end_to_end: Series,
    /// The same from the actual send (OMB's meaning).
    pub publish_from_send: Series,
    pub end_to_end_from_send: Series,
    /// Every period's line, as printed.
    pub lines: Vec<String>,
    pub totals: Totals,
}

/// Runs `workload` against `target`, printing each period's line to
/// standard output as it ends.
///
/// # Errors
/// The broker refused a request, a connection failed, or an actor failed.
pub async fn run(target: &dyn Driver, workload: &Workload, options: &RunOptions) -> Result<Outcome, BenchError> {
    if options.payloads.is_empty() {
        return Err(BenchError::Target("no payload to send".into()));
    }
    let run_id = rand::random::<u32>();
    let mut topics = Vec::new();
    let mut outcome = Ok(());
    for topic in (0..workload.topics).map(|topic| format!("bench-omb-{run_id:08x}-{topic}")) {
        outcome = target.create(&topic, workload.partitions_per_topic).await;
        if outcome.is_err() {
            break;
        }
        topics.push(topic);
    }
    let outcome = match outcome {
        Ok(()) => run_on(target, workload, options, &topics, run_id).await,
        Err(error) => Err(error),
    };
    for topic in &topics {
        if let Err(error) = target.delete(topic).await {
            tracing::warn!(%topic, %error, "could not delete a benchmark topic");
        }
    }
    outcome
}

async fn run_on(
    target: &dyn Driver,
    workload: &Workload,
    options: &RunOptions,
    topics: &[String],
    run_id: u32,
) -> Result<Outcome, BenchError> {
    let shared = Arc::new(Shared::new(if options.backlog_bytes > 0 { Phase::Backlog } else { Phase::Warmup }));
    let stop_consuming = CancellationToken::new();
    let _stop = StopOnDrop { producing: shared.stop_producing.clone(), consuming: stop_consuming.clone() };
    let start_consumers = || {
        let futures: Vec<_> = topics
            .iter()
            .flat_map(|topic| {
                (0..workload.subscriptions_per_topic).flat_map(move |subscription| {
                    (0..workload.consumer_per_subscription).map(move |_| (topic, subscription))
                })
            })
            .map(|(topic, subscription)| {
                let options = ConsumerOptions {
                    // Topics are new: from the start, nothing is missed while
                    // a group's members join.
                    from: StartAt::Start,
                    window: options.consumer_window,
                    group: Some(format!("bench-{run_id:08x}-sub-{subscription}")),
                };
                target.consumer(topic, options)
            })
            .collect();
        let shared = Arc::clone(&shared);
        let stop = stop_consuming.clone();
        async move {
            let mut started = Vec::new();
            for future in futures {
                let consumer = future.await?;
                started.push(tokio::spawn(consume(consumer, Arc::clone(&shared), stop.clone())));
            }
            Ok::<_, BenchError>(started)
        }
    };
    let mut consumers = Vec::new();
    if options.backlog_bytes == 0 {
        consumers = start_consumers().await?;
    }

    let producer_count = workload.producer_count();
    let mut producers = Vec::new();
    for topic in topics {
        for _ in 0..workload.producers_per_topic {
            producers.push(target.producer(topic).await?);
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let mut senders = Vec::new();
    let mut collectors = Vec::new();
    for (index, producer) in producers.iter().enumerate() {
        let rate = share_of(workload.producer_rate, producer_count, index as u64);
        let (acks, pending) = mpsc::channel(ACK_QUEUE);
        collectors.push(tokio::spawn(collect(pending, Arc::clone(&shared))));
        let sender = Sender {
            producer: Arc::clone(producer),
            schedule: (rate > 0).then(|| Schedule::new(start, rate)),
            payloads: options.payloads.clone(),
            keys: Keys::new(workload.key_distributor),
            shared: Arc::clone(&shared),
            acks,
            runtime: tokio::runtime::Handle::current(),
        };
        senders.push(
            std::thread::Builder::new()
                .name(format!("weir-bench-producer-{index}"))
                .spawn(move || sender.run())
                .map_err(BenchError::Io)?,
        );
    }

    let mut reporter = Reporter::new(workload, options, Arc::clone(&shared));
    let mut drain = None;
    let mut failed = None;
    if options.backlog_bytes > 0 {
        let backlog_messages = options.backlog_bytes.div_ceil(workload.message_size as u64);
        let built = reporter.wait(|backlog| backlog >= backlog_messages).await;
        let build_seconds = start.elapsed().as_secs_f64();
        match built {
            Err(error) => failed = Some(error),
            Ok(()) => {
                reporter.enter(Phase::Drain);
                let drain_started = Instant::now();
                let received_before = shared.received.load(Ordering::Relaxed);
                let bytes_before = shared.received_bytes.load(Ordering::Relaxed);
                match start_consumers().await {
                    Ok(started) => consumers = started,
                    Err(error) => failed = Some(error.to_string()),
                }
                let left = ((1.0 - workload.backlog_drain_ratio) * backlog_messages as f64) as u64;
                let drained = left.max(DRAINED_BACKLOG_MIN);
                if failed.is_none()
                    && let Err(error) = reporter.wait(|backlog| backlog <= drained).await
                {
                    failed = Some(error);
                }
                let seconds = drain_started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
                let read = shared.received.load(Ordering::Relaxed) - received_before;
                let bytes = shared.received_bytes.load(Ordering::Relaxed) - bytes_before;
                // Its latencies are summed up at the end: messages due
                // during the drain may be answered after it.
                drain = Some(Drain {
                    backlog_bytes: options.backlog_bytes,
                    backlog_messages,
                    build_seconds,
                    drain_seconds: seconds,
                    drain_messages_per_second: read as f64 / seconds,
                    drain_megabytes_per_second: bytes as f64 / seconds / 1e6,
                    publish: Series::new("").summary(),
                    end_to_end: Series::new("").summary(),
                });
            }
        }
    }
    if failed.is_none() {
        reporter.enter(Phase::Warmup);
        if let Err(error) = reporter.run_for(options.warmup).await {
            failed = Some(error);
        }
    }
    if failed.is_none() {
        reporter.enter(Phase::Test);
        if let Err(error) = reporter.run_for(options.test).await {
            failed = Some(error);
        }
    }
    reporter.enter(Phase::Done);

    // Producing stops; a sender blocked in a send is cancelled.
    shared.stop_producing.cancel();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
    for sender in senders {
        let joined = tokio::task::spawn_blocking(move || sender.join());
        if tokio::time::timeout_at(deadline, joined).await.is_err() {
            shared.fail(format!("a producer's thread did not stop within {SHUTDOWN_WAIT:?}"));
        }
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
    for collector in collectors {
        if tokio::time::timeout_at(deadline, collector).await.is_err() {
            shared.fail(format!("acknowledgements still outstanding {SHUTDOWN_WAIT:?} after the test"));
        }
    }
    // Consumers read what is still on its way before they stop, so that
    // the totals say whether every acknowledged message was read.
    if !consumers.is_empty() && failed.is_none() {
        let caught_up = async {
            while reporter.backlog() > 0 && shared.failure().is_none() {
                tokio::time::sleep(BACKLOG_POLL).await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, caught_up).await;
    }
    stop_consuming.cancel();
    for consumer in consumers {
        let _ = consumer.await;
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
    for producer in producers {
        if tokio::time::timeout_at(deadline, producer.close()).await.is_err() {
            shared.fail(format!("a producer did not close within {SHUTDOWN_WAIT:?}"));
            break;
        }
    }
    if let Some(error) = failed.or_else(|| shared.failure()) {
        return Err(BenchError::Target(error));
    }

    let totals = Totals {
        acknowledged: shared.acked.load(Ordering::Relaxed),
        failed: shared.errors.load(Ordering::Relaxed),
        first_failure: shared.first_publish_error.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        due_not_sent: shared.due_not_sent.load(Ordering::Relaxed),
        read: shared.received.load(Ordering::Relaxed),
        redelivered: shared.redelivered.load(Ordering::Relaxed),
        unread: reporter.backlog(),
    };
    let latencies = shared.latencies();
    if let Some(drain) = &mut drain {
        drain.publish = latencies.drain.publish.summary();
        drain.end_to_end = latencies.drain.end_to_end.summary();
    }
    let mut result = reporter.result;
    result.set_aggregated(&latencies.test.omb());
    let test = &latencies.test;
    Ok(Outcome {
        result,
        drain,
        publish: test.publish.clone(),
        publish_delay: test.publish_delay.clone(),
        end_to_end: test.end_to_end.clone(),
        publish_from_send: test.publish_from_send.clone(),
        end_to_end_from_send: test.end_to_end_from_send.clone(),
        lines: reporter.lines,
        totals,
    })
}

/// The payloads of `workload`'s messages and where they come from: its
/// `payloadFile` (relative to `workload_dir`, then to the working
/// directory), a pool of randomized payloads (`useRandomizedPayloads`), or
/// one payload of random bytes.
///
/// # Errors
/// The payload file is larger than the bench's bound.
pub fn payloads(workload: &Workload, workload_dir: &std::path::Path) -> Result<(Vec<Bytes>, String), BenchError> {
    let size = workload.message_size;
    if let Some(file) = &workload.payload_file {
        let candidates = [workload_dir.join(file), std::path::PathBuf::from(file)];
        if let Some(path) = candidates.iter().find(|path| path.is_file()) {
            // As OMB: the file is one payload of exactly messageSize bytes.
            let length = std::fs::metadata(path).map_err(BenchError::Io)?.len();
            if length != size as u64 {
                return Err(BenchError::Target(format!(
                    "{}: {length} bytes; the workload's messageSize is {size}",
                    path.display()
                )));
            }
            let bytes = std::fs::read(path).map_err(BenchError::Io)?;
            return Ok((vec![Bytes::from(bytes)], format!("{} ({length} bytes)", path.display())));
        }
    }
    let random = |count: usize| -> Vec<u8> {
        let mut bytes = vec![0u8; count];
        rand::fill(&mut bytes[..]);
        bytes
    };
    if workload.use_randomized_payloads {
        let random_bytes = ((size as f64) * workload.random_bytes_ratio) as usize;
        let pool = (0..workload.randomized_payload_pool_size)
            .map(|_| {
                let mut payload = random(random_bytes.min(size));
                payload.resize(size, 0);
                Bytes::from(payload)
            })
            .collect();
        let description = format!(
            "{} randomized payloads of {size} bytes, {:.0} % random",
            workload.randomized_payload_pool_size,
            workload.random_bytes_ratio * 100.0
        );
        return Ok((pool, description));
    }
    let missing =
        workload.payload_file.as_ref().map_or_else(String::new, |file| format!(" (payloadFile {file} not found)"));
    Ok((vec![Bytes::from(random(size))], format!("random bytes, {size} per message{missing}")))
}

/// Producer `index`'s share of `rate` messages a second over `producers`
/// (the remainder goes to the first ones); 0 stays 0 (as fast as it can).
fn share_of(rate: u64, producers: u64, index: u64) -> u64 {
    rate / producers + u64::from(index < rate % producers)
}

/// OMB's key pool: 10,000 random alphanumeric keys of 7 characters, one
/// pool for every producer.
fn key_pool() -> &'static [Bytes] {
    static POOL: OnceLock<Vec<Bytes>> = OnceLock::new();
    POOL.get_or_init(|| {
        const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..KEY_POOL_SIZE)
            .map(|_| {
                (0..7).map(|_| ALPHANUMERIC[rand::random_range(0..ALPHANUMERIC.len())]).collect::<Vec<u8>>().into()
            })
            .collect()
    })
}

/// Message keys as OMB's key distributors choose them.
struct Keys {
    distributor: KeyDistributor,
    next: usize,
}

impl Keys {
    fn new(distributor: KeyDistributor) -> Keys {
        Keys { distributor, next: 0 }
    }

    fn next(&mut self) -> Option<Bytes> {
        let pool = key_pool();
        match self.distributor {
            KeyDistributor::NoKey => None,
            KeyDistributor::KeyRoundRobin => {
                let key = pool[self.next % pool.len()].clone();
                self.next = self.next.wrapping_add(1);
                Some(key)
            }
            KeyDistributor::RandomNano => Some(pool[rand::random_range(0..pool.len())].clone()),
        }
    }
}

/// One producer's sending thread.
struct Sender {
    producer: Arc<dyn Producer>,
    /// `None`: as fast as the client's windows allow.
    schedule: Option<Schedule>,
    payloads: Vec<Bytes>,
    keys: Keys,
    shared: Arc<Shared>,
    acks: mpsc::Sender<(Times, Ack)>,
    runtime: tokio::runtime::Handle,
}

impl Sender {
    fn run(mut self) {
        let stop = self.shared.stop_producing.clone();
        let spin = self.schedule.is_some_and(|schedule| schedule.offset(1) >= SPIN_INTERVAL_MIN);
        let mut index = 0_u64;
        while !stop.is_cancelled() {
            let intended = match self.schedule {
                Some(schedule) => {
                    let due = schedule.intended(index);
                    if spin {
                        super::latency::wait_until(due);
                    } else if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    due
                }
                None => Instant::now(),
            };
            if stop.is_cancelled() {
                break;
            }
            let template = &self.payloads[(index % self.payloads.len() as u64) as usize];
            let mut payload = BytesMut::from(&template[..]);
            let times = Times { intended, sent: Instant::now() };
            payload[..STAMP_BYTES].copy_from_slice(&self.shared.stamp(times));
            let key = self.keys.next();
            let send = self.producer.send(key, payload.freeze());
            // A send waits while the client's queue is full; the end of the
            // run cancels it.
            let sent = self.runtime.block_on(async {
                tokio::select! {
                    sent = send => Some(sent),
                    () = stop.cancelled() => None,
                }
            });
            match sent {
                None => break,
                Some(Ok(ack)) => {
                    if self.acks.blocking_send((times, ack)).is_err() {
                        break;
                    }
                }
                Some(Err(error)) => {
                    self.shared.fail(format!("a producer failed: {error}"));
                    break;
                }
            }
            index += 1;
        }
        if let Some(schedule) = self.schedule {
            let due = schedule.due_by(Instant::now());
            self.shared.due_not_sent.fetch_add(due.saturating_sub(index), Ordering::Relaxed);
        }
    }
}

/// Awaits one producer's acknowledgements in whatever order they come, at
/// most [`ACKS_IN_FLIGHT_MAX`] at a time.
async fn collect(mut pending: mpsc::Receiver<(Times, Ack)>, shared: Arc<Shared>) {
    let mut acks = FuturesUnordered::new();
    let mut open = true;
    while open || !acks.is_empty() {
        tokio::select! {
            next = pending.recv(), if open && acks.len() < ACKS_IN_FLIGHT_MAX => match next {
                Some((times, ack)) => acks.push(async move { (times, ack.await) }),
                None => open = false,
            },
            Some((times, acked)) = acks.next(), if !acks.is_empty() => match acked {
                Ok(()) => {
                    let now = Instant::now();
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    shared.latencies().published(times, now);
                }
                Err(error) => shared.publish_failed(error),
            },
        }
    }
}

/// Reads one consumer until the run stops it.
async fn consume(mut consumer: Box<dyn super::driver::Consumer>, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return,
            next = consumer.next() => match next {
                Ok(delivery) => delivery,
                Err(error) => {
                    if !stop.is_cancelled() {
                        shared.fail(format!("a consumer failed: {error}"));
                    }
                    return;
                }
            },
        };
        if delivery.redelivered {
            shared.redelivered.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        shared.received.fetch_add(1, Ordering::Relaxed);
        shared.received_bytes.fetch_add(delivery.payload.len() as u64, Ordering::Relaxed);
        if let Some(times) = shared.times_of(&delivery.payload) {
            shared.latencies().delivered(times, delivery.received_at);
        }
    }
}

/// Prints a line every period and keeps OMB's per-period series.
struct Reporter {
    shared: Arc<Shared>,
    interval: Duration,
    subscriptions: u64,
    message_size: usize,
    started: Instant,
    last: Instant,
    last_acked: u64,
    last_errors: u64,
    last_received: u64,
    /// Periods are kept in the result only once the test runs.
    measuring: bool,
    result: TestResult,
    lines: Vec<String>,
}

impl Reporter {
    fn new(workload: &Workload, options: &RunOptions, shared: Arc<Shared>) -> Reporter {
        let now = Instant::now();
        Reporter {
            shared,
            interval: options.report_interval,
            subscriptions: u64::from(workload.subscriptions_per_topic),
            message_size: workload.message_size,
            started: now,
            last: now,
            last_acked: 0,
            last_errors: 0,
            last_received: 0,
            measuring: false,
            result: TestResult {
                workload: workload.name.clone(),
                message_size: workload.message_size as u64,
                topics: workload.topics,
                partitions: workload.partitions_per_topic,
                producers_per_topic: workload.producers_per_topic,
                // OMB's meaning: consumers per subscription.
                consumers_per_topic: workload.consumer_per_subscription,
                ..TestResult::default()
            },
            lines: Vec::new(),
        }
    }

    /// Messages acknowledged and not yet read, over every subscription
    /// (OMB's backlog).
    fn backlog(&self) -> u64 {
        let acked = self.shared.acked.load(Ordering::Relaxed);
        (acked * self.subscriptions).saturating_sub(self.shared.received.load(Ordering::Relaxed))
    }

    /// Moves the run to `phase`: the period so far is reported (when it
    /// is long enough to mean anything) under the phase it belonged to,
    /// and the next period starts with the new phase.
    fn enter(&mut self, phase: Phase) {
        if self.last.elapsed() >= PERIOD_MIN {
            self.report();
        } else {
            self.rebase();
        }
        self.shared.latencies().enter(phase, Instant::now());
        self.measuring = phase == Phase::Test;
    }

    /// Starts a new period without reporting the one that ends.
    fn rebase(&mut self) {
        self.last = Instant::now();
        self.last_acked = self.shared.acked.load(Ordering::Relaxed);
        self.last_errors = self.shared.errors.load(Ordering::Relaxed);
        self.last_received = self.shared.received.load(Ordering::Relaxed);
        self.shared.latencies().period.clear();
    }

    /// Reports periods for `duration`.
    async fn run_for(&mut self, duration: Duration) -> Result<(), String> {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            let next = (self.last + self.interval).min(end);
            tokio::time::sleep_until(next.into()).await;
            if let Some(failure) = self.shared.failure() {
                return Err(failure);
            }
            if Instant::now() >= self.last + self.interval || Instant::now() >= end {
                self.report();
            }
        }
        Ok(())
    }

    /// Reports periods until `done(backlog)`; fails when no message is
    /// acknowledged or read for [`STALL_MAX`].
    async fn wait(&mut self, done: impl Fn(u64) -> bool) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        let moved = || shared.acked.load(Ordering::Relaxed) + shared.received.load(Ordering::Relaxed);
        let (mut last_moved, mut last_progress) = (moved(), Instant::now());
        while !done(self.backlog()) {
            tokio::time::sleep(BACKLOG_POLL).await;
            if let Some(failure) = self.shared.failure() {
                return Err(failure);
            }
            let now_moved = moved();
            if now_moved != last_moved {
                (last_moved, last_progress) = (now_moved, Instant::now());
            } else if last_progress.elapsed() >= STALL_MAX {
                return Err(format!(
                    "no message acknowledged or read for {STALL_MAX:?} with a backlog of {}",
                    self.backlog()
                ));
            }
            if Instant::now() >= self.last + self.interval {
                self.report();
            }
        }
        Ok(())
    }

    fn report(&mut self) {
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64().max(f64::MIN_POSITIVE);
        self.last = now;
        let acked = self.shared.acked.load(Ordering::Relaxed);
        let errors = self.shared.errors.load(Ordering::Relaxed);
        let received = self.shared.received.load(Ordering::Relaxed);
        let publish_rate = (acked - self.last_acked) as f64 / seconds;
        let error_rate = (errors - self.last_errors) as f64 / seconds;
        let consume_rate = (received - self.last_received) as f64 / seconds;
        (self.last_acked, self.last_errors, self.last_received) = (acked, errors, received);
        let backlog = self.backlog();
        let mut latencies = self.shared.latencies();
        let phase = latencies.phase();
        let megabytes = |rate: f64| rate * self.message_size as f64 / 1e6;
        let period = &latencies.period;
        let line = format!(
            "[{:>6.0} s {:<7}] Pub rate {:>9.1} msg/s / {:>7.1} MB/s | Pub err {:>6.1} err/s | Cons rate {:>9.1} msg/s / {:>7.1} MB/s | Backlog {:>8.1} K | Pub Latency (ms) avg {:>7.3} - 50% {:>7.3} - 99% {:>7.3} - 99.9% {:>7.3} - Max {:>8.3} | Pub Delay (us) avg {:>6.0} - 50% {:>6} - 99% {:>6} - 99.9% {:>6} - Max {:>7} | E2E Latency (ms) avg {:>7.3} - 50% {:>7.3} - 99% {:>7.3} - 99.9% {:>7.3} - Max {:>8.3}",
            (now - self.started).as_secs_f64(),
            format!("{phase:?}").to_lowercase(),
            publish_rate,
            megabytes(publish_rate),
            error_rate,
            consume_rate,
            megabytes(consume_rate),
            backlog as f64 / 1e3,
            period.publish.mean().as_secs_f64() * 1e3,
            period.publish.at(50.0).as_secs_f64() * 1e3,
            period.publish.at(99.0).as_secs_f64() * 1e3,
            period.publish.at(99.9).as_secs_f64() * 1e3,
            period.publish.at(100.0).as_secs_f64() * 1e3,
            period.publish_delay.mean().as_secs_f64() * 1e6,
            period.publish_delay.at(50.0).as_micros(),
            period.publish_delay.at(99.0).as_micros(),
            period.publish_delay.at(99.9).as_micros(),
            period.publish_delay.at(100.0).as_micros(),
            period.end_to_end.mean().as_secs_f64() * 1e3,
            period.end_to_end.at(50.0).as_secs_f64() * 1e3,
            period.end_to_end.at(99.0).as_secs_f64() * 1e3,
            period.end_to_end.at(99.9).as_secs_f64() * 1e3,
            period.end_to_end.at(100.0).as_secs_f64() * 1e3,
        );
        if self.measuring {
            self.result.publish_rate.push(publish_rate);
            self.result.publish_error_rate.push(error_rate);
            self.result.consume_rate.push(consume_rate);
            self.result.backlog.push(i64::try_from(backlog).unwrap_or(i64::MAX));
            self.result.push_period(&period.omb());
        }
        latencies.period.clear();
        drop(latencies);
        // A closed stdout does not stop the run (its files are written).
        crate::outln!("{line}");
        self.lines.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_shared_over_producers_without_losing_the_remainder() {
        let shares: Vec<u64> = (0..4).map(|index| share_of(50_003, 4, index)).collect();
        assert_eq!(shares, [12_501, 12_501, 12_501, 12_500]);
        assert_eq!(shares.iter().sum::<u64>(), 50_003);
        assert_eq!(share_of(0, 4, 2), 0);
    }

    #[test]
    fn keys_come_from_a_pool_of_ten_thousand_in_turn_or_at_random() {
        let mut round_robin = Keys::new(KeyDistributor::KeyRoundRobin);
        let first = round_robin.next().unwrap();
        assert_eq!(first.len(), 7);
        for _ in 1..KEY_POOL_SIZE {
            round_robin.next();
        }
        assert_eq!(round_robin.next().unwrap(), first, "the pool repeats after 10,000 keys");
        let mut random = Keys::new(KeyDistributor::RandomNano);
        assert!(random.next().is_some());
        assert!(Keys::new(KeyDistributor::NoKey).next().is_none());
    }

    #[test]
    fn a_stamp_gives_back_the_intended_and_actual_send_times() {
        let shared = Shared::new(Phase::Test);
        let times = Times {
            intended: shared.epoch + Duration::from_micros(1234),
            sent: shared.epoch + Duration::from_micros(1300),
        };
        let mut payload = vec![0u8; 64];
        payload[..STAMP_BYTES].copy_from_slice(&shared.stamp(times));
        assert_eq!(shared.times_of(&payload), Some(times));
        assert_eq!(shared.times_of(&payload[..12]), None);
    }

    #[test]
    fn a_message_counts_in_the_phase_it_was_due_in_whenever_it_is_answered() {
        let shared = Shared::new(Phase::Warmup);
        let before = Instant::now();
        let at = |ms: u64| before + Duration::from_millis(ms);
        let mut latencies = shared.latencies();
        latencies.enter(Phase::Test, at(10));
        let warmup_message = Times { intended: at(5), sent: at(5) };
        let test_message = Times { intended: at(20), sent: at(21) };
        latencies.published(warmup_message, at(30));
        latencies.published(test_message, at(30));
        latencies.delivered(test_message, at(30));
        // Both are in the period; only the test's message is the test's.
        assert_eq!(latencies.period.publish.samples(), 2);
        assert_eq!(latencies.test.publish.samples(), 1);
        assert_eq!(latencies.test.end_to_end.samples(), 1);
        // From the intended time (10 ms) and from the send (9 ms), and the
        // delay between them (1 ms).
        let ms = |series: &Series| series.at(50.0).as_secs_f64() * 1e3;
        assert!((ms(&latencies.test.publish) - 10.0).abs() < 0.05);
        assert!((ms(&latencies.test.publish_from_send) - 9.0).abs() < 0.05);
        assert!((ms(&latencies.test.publish_delay) - 1.0).abs() < 0.01);
        // After the test: a test message read late still counts, one due
        // after the test does not, and no period is recorded.
        latencies.enter(Phase::Done, at(40));
        latencies.delivered(test_message, at(50));
        latencies.delivered(Times { intended: at(45), sent: at(45) }, at(50));
        assert_eq!(latencies.test.end_to_end.samples(), 2);
        assert_eq!(latencies.period.end_to_end.samples(), 1);
    }
}
