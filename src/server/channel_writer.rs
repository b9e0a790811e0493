//! One writer per partition: the group commit, and where idempotent
//! producers are deduplicated. Publishes from every connection queue for
//! the partition's writer task (a bounded queue, `channel_queue_depth`);
//! the task takes everything queued, appends it with one write and one
//! sync, and answers each publish. When nothing is queued and no sync or
//! roll is due (`fsync = "never"` or `"interval"`), a connection appends
//! its publish itself instead, on its own task: an idle broker's publish
//! then wakes no other task to be stored. Both hold the writer's state
//! while they append, so appends stay one at a time and in order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{mpsc, watch};

use super::Outbound;
use super::outbox::{Outbox, Written};
use super::stats::Stats;
use crate::protocol::{ErrorCode, ProducerSequence, Response};
use crate::record::Message;
use crate::storage::{Appended, ChannelLog, FsyncPolicy, NewBatch, StorageError, now_us};

/// A publish waiting for the channel writer.
pub(crate) struct AppendRequest {
    pub messages: Vec<Message>,
    pub producer: Option<ProducerSequence>,
    pub reply: Reply,
}

/// Where and how to answer one publish. Holding a reserved slot in the
/// connection's response queue means the writer never waits for a slow
/// client: the answer always fits.
pub(crate) struct Reply {
    /// Taken when the answer is sent; a reply dropped unsent (a panicking
    /// channel writer) still releases its share of the windows.
    pub permit: Option<mpsc::OwnedPermit<Outbound>>,
    /// When the publish frame was read, for the end-to-end histogram.
    pub received_at: std::time::Instant,
    pub stats: Arc<Stats>,
    pub correlation_id: u32,
    /// The connection's count of unanswered publishes, decremented when
    /// the answer is queued.
    pub inflight: Arc<AtomicU32>,
    /// The connection's bytes of unanswered publish bodies, and this
    /// publish's share of them.
    pub inflight_bytes: Arc<AtomicU64>,
    pub body_bytes: u64,
    /// The protocol version of the connection to answer.
    pub version: u16,
    /// The connection's sending side.
    pub outbox: Arc<Outbox>,
    /// The answer may be written straight to the socket: it is produced on
    /// the connection's own task (an inline append), in order.
    pub write_at_once: bool,
}

impl Reply {
    pub fn send(mut self, response: Response) {
        if let Some(permit) = self.permit.take() {
            let frame = response.encode_for(self.version, self.correlation_id);
            let written = if self.write_at_once { self.outbox.try_write_now(&frame) } else { Written::NotNow };
            match written {
                // Its reserved slot is released unused.
                Written::Sent => drop(permit),
                // An empty frame wakes the writer task to flush the rest.
                Written::Buffered => {
                    self.outbox.answer_queued();
                    permit.send(Outbound::Frame(Vec::new()));
                }
                Written::NotNow => {
                    self.outbox.answer_queued();
                    permit.send(Outbound::Frame(frame));
                }
            }
        }
        metrics::histogram!("weir_publish_duration_seconds").record(self.received_at.elapsed());
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        self.inflight_bytes.fetch_sub(self.body_bytes, Ordering::AcqRel);
        self.stats.inflight_publishes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Settings of a channel writer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriterLimits {
    /// Most encoded bytes one group commit gathers.
    pub group_bytes_max: usize,
    pub dedup_window: usize,
    pub max_producers: usize,
}

/// What a producer has recently published, to answer retries.
#[derive(Default)]
struct ProducerState {
    /// One past the highest sequence appended.
    next_sequence: u64,
    /// (first sequence, count, first offset, timestamp), oldest first.
    recent: VecDeque<(u64, u64, u64, u64)>,
    last_used: u64,
    /// Rebuilt from the log at open under `fsync` `interval` or `never`,
    /// and not published to since: its next sequence may be behind what the
    /// producer was told (those policies can lose acknowledged publishes in
    /// a power loss), so a first publish ahead of it anchors it there
    /// instead of being refused. Under `always` a gap is the producer's.
    restored: bool,
}

/// The messages of one publish to append, and its producer's id and first
/// sequence.
struct OwnedBatch {
    messages: Vec<Message>,
    producer: Option<(u64, u64)>,
}

/// How one request of a group is resolved.
enum Plan {
    Append {
        first_offset: u64,
        count: u64,
    },
    /// A retry of something already stored (or stored in this group).
    Duplicate {
        first_offset: u64,
        count: u64,
        timestamp_us: Option<u64>,
    },
    Reject(ErrorCode, String),
}

/// A partition's appender, shared by its writer task and the connections
/// that append inline.
pub(crate) struct PartitionWriter {
    log: Arc<ChannelLog>,
    /// The log's next offset, sent after each append: it wakes the
    /// partition's caught-up subscriptions. Dropped when the writer task
    /// ends, however it ends, which ends those subscriptions too.
    tail: std::sync::Mutex<Option<watch::Sender<u64>>>,
    limits: WriterLimits,
    stats: Arc<Stats>,
    /// Held by whoever appends, for the whole append.
    state: tokio::sync::Mutex<WriterState>,
    /// Publishes handed to the writer task and not yet appended by it.
    /// While any is, a new publish queues behind them: appending it inline
    /// could store it before an earlier publish of the same connection.
    queued: AtomicUsize,
}

/// What the appender remembers between appends.
#[derive(Default)]
struct WriterState {
    producers: HashMap<u64, ProducerState>,
    /// Counts appends, to tell which producer was idle the longest.
    clock: u64,
    /// Set once the writer task has rebuilt `producers` from the log:
    /// nothing is appended before.
    producers_loaded: bool,
}

impl PartitionWriter {
    /// A writer for `log`. Its task first rebuilds the idempotent
    /// producers of the log's active segment (see [`recovered_producers`]);
    /// until then every publish queues for it.
    pub fn new(log: Arc<ChannelLog>, tail: watch::Sender<u64>, limits: WriterLimits, stats: Arc<Stats>) -> Self {
        PartitionWriter {
            log,
            tail: std::sync::Mutex::new(Some(tail)),
            limits,
            stats,
            state: tokio::sync::Mutex::default(),
            queued: AtomicUsize::new(0),
        }
    }

    pub(crate) fn publish_tail(&self) {
        if let Some(tail) = &*self.tail.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tail.send(self.log.next_offset());
        }
    }

    /// Hands `request` to the writer task's queue, without waiting.
    ///
    /// # Errors
    /// The queue is full, or the writer task has ended; the request comes
    /// back inside the error, to be answered.
    // The error is the request itself, as `try_send` returns it: boxing it
    // would allocate on every publish to save a move on refusals.
    #[allow(clippy::result_large_err)]
    pub fn enqueue(
        &self,
        queue: &mpsc::Sender<AppendRequest>,
        mut request: AppendRequest,
    ) -> Result<(), mpsc::error::TrySendError<AppendRequest>> {
        // Counted before it can be taken, so that no inline append passes it.
        self.queued.fetch_add(1, Ordering::AcqRel);
        // Answered from the writer task, through the connection's queue.
        request.reply.write_at_once = false;
        queue.try_send(request).inspect_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Appends and answers `request` on the caller's task, when that stores
    /// it exactly where the writer task would: nothing is queued for the
    /// task, nobody else is appending, and the append writes to the page
    /// cache only (no `fdatasync` under `always`, no roll due). Otherwise
    /// hands `request` back, to be queued.
    ///
    /// Not cancellation-safe: dropped while it awaits (a roll that fell due
    /// after the check goes to the blocking pool), it would release the
    /// writer state while the append goes on. The connection awaits it
    /// outside any `select!`, and connection tasks are never aborted.
    pub async fn append_inline(&self, request: AppendRequest) -> Result<(), AppendRequest> {
        if self.log.config().fsync == FsyncPolicy::Always {
            return Err(request);
        }
        let Ok(mut state) = self.state.try_lock() else { return Err(request) };
        if !state.producers_loaded || self.queued.load(Ordering::Acquire) != 0 || self.log.roll_due(now_us()) {
            return Err(request);
        }
        state.clock += 1;
        let WriterState { producers, clock, .. } = &mut *state;
        commit_group(&self.log, &mut vec![request], producers, *clock, self.limits, &self.stats).await;
        self.publish_tail();
        Ok(())
    }
}

/// The idempotent producers' windows as the batch headers of the log's
/// active segment record them (format version 2), within the writer's
/// limits, and the clock after them. A producer whose publishes all lie in
/// sealed segments is not remembered: its next publish anchors it, as
/// after an eviction.
fn recovered_producers(log: &ChannelLog, limits: WriterLimits) -> (HashMap<u64, ProducerState>, u64) {
    let mut producers: HashMap<u64, ProducerState> = HashMap::new();
    let mut clock = 0u64;
    let may_have_lost_acknowledged = log.config().fsync != FsyncPolicy::Always;
    let visited = log.visit_active_batches(|first_offset, timestamp_us, header| {
        let Some((producer_id, sequence)) = header.producer else { return };
        let count = u64::from(header.count);
        let Some(sequence_end) = sequence.checked_add(count) else { return };
        clock += 1;
        let state = producers.entry(producer_id).or_default();
        state.next_sequence = sequence_end;
        state.last_used = clock;
        state.restored = may_have_lost_acknowledged;
        state.recent.push_back((sequence, count, first_offset, timestamp_us));
        if state.recent.len() > limits.dedup_window {
            state.recent.pop_front();
        }
        // Amortised: trimmed to the limit each time it doubles.
        if producers.len() > limits.max_producers.saturating_mul(2) {
            keep_most_recent(&mut producers, limits.max_producers);
        }
    });
    keep_most_recent(&mut producers, limits.max_producers);
    match visited {
        Ok(()) if !producers.is_empty() => {
            tracing::info!(channel = %log.label(), producers = producers.len(), "idempotent producers rebuilt from the log");
        }
        Ok(()) => {}
        Err(error) => {
            // Not fatal: the producers anchor again on their next publish,
            // as before there were batch headers.
            tracing::warn!(channel = %log.label(), %error, "idempotent producers could not be rebuilt from the log");
            producers.clear();
        }
    }
    (producers, clock)
}

/// Forgets all but the `max` producers used last.
fn keep_most_recent(producers: &mut HashMap<u64, ProducerState>, max: usize) {
    if producers.len() <= max {
        return;
    }
    if max == 0 {
        producers.clear();
        return;
    }
    let mut last_used: Vec<u64> = producers.values().map(|state| state.last_used).collect();
    last_used.sort_unstable_by(|a, b| b.cmp(a));
    let oldest_kept = last_used[max - 1];
    producers.retain(|_, state| state.last_used >= oldest_kept);
}

/// The writer task: runs until every sender of `requests` is gone,
/// answering every request it received.
pub(crate) async fn run(writer: Arc<PartitionWriter>, mut requests: mpsc::Receiver<AppendRequest>) {
    /// Drops the tail watch's sender when the task ends, also by a panic.
    struct EndsTail(Arc<PartitionWriter>);
    impl Drop for EndsTail {
        fn drop(&mut self) {
            self.0.tail.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
    let _ends_tail = EndsTail(Arc::clone(&writer));
    {
        // Off the runtime's threads: it reads the whole active segment.
        let mut state = writer.state.lock().await;
        let (log, limits) = (Arc::clone(&writer.log), writer.limits);
        if let Ok((producers, clock)) = tokio::task::spawn_blocking(move || recovered_producers(&log, limits)).await {
            state.producers = producers;
            state.clock = clock;
        }
        state.producers_loaded = true;
    }
    let log = &writer.log;
    let limits = writer.limits;
    let mut group = Vec::new();
    let mut held: Option<AppendRequest> = None;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => match requests.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        let mut state = writer.state.lock().await;
        // A group never exceeds group_bytes_max (in encoded bytes) unless a
        // single request does; a request that does not fit waits for the
        // next group.
        let mut group_bytes = encoded_len(&first);
        group.push(first);
        while let Ok(next) = requests.try_recv() {
            let next_bytes = encoded_len(&next);
            if group_bytes + next_bytes > limits.group_bytes_max {
                held = Some(next);
                break;
            }
            group_bytes += next_bytes;
            group.push(next);
        }
        let taken = group.len();
        state.clock += 1;
        let WriterState { producers, clock, .. } = &mut *state;
        commit_group(log, &mut group, producers, *clock, limits, &writer.stats).await;
        writer.publish_tail();
        writer.queued.fetch_sub(taken, Ordering::AcqRel);
    }
}

fn encoded_len(request: &AppendRequest) -> usize {
    request.messages.iter().map(Message::encoded_len).sum()
}

async fn commit_group(
    log: &Arc<ChannelLog>,
    group: &mut Vec<AppendRequest>,
    producers: &mut HashMap<u64, ProducerState>,
    clock: u64,
    limits: WriterLimits,
    stats: &Stats,
) {
    let base_offset = log.next_offset();
    let mut next_offset = base_offset;
    let mut plans = Vec::with_capacity(group.len());
    // One batch (one header, one Raft entry) per publish, so that the
    // producer of each is in the log.
    let mut batches = Vec::new();
    for request in group.iter_mut() {
        let count = request.messages.len() as u64;
        let plan = match request.producer {
            None => Plan::Append { first_offset: next_offset, count },
            Some(producer) => plan_idempotent(producers, producer, count, next_offset, clock, limits),
        };
        if let Plan::Append { .. } = plan {
            // Only the answer is needed from here on.
            let messages = std::mem::take(&mut request.messages);
            batches.push(OwnedBatch { messages, producer: request.producer.map(|p| (p.producer_id, p.sequence)) });
            next_offset += count;
        }
        plans.push(plan);
    }
    let started = std::time::Instant::now();
    let result = if batches.is_empty() { Ok(None) } else { append(log, batches).await.map(Some) };
    if let Ok(Some(appended)) = &result {
        metrics::histogram!("weir_append_duration_seconds").record(started.elapsed());
        if log.config().fsync == FsyncPolicy::Always {
            metrics::histogram!("weir_fsync_duration_seconds").record(appended.sync_duration);
        }
    }
    let timestamp_us = match &result {
        Ok(Some(appended)) => {
            assert_eq!(
                appended.first_offset, base_offset,
                "appends to a log are one at a time, under the writer state"
            );
            stats.record_append(appended.count);
            Some(appended.timestamp_us)
        }
        Ok(None) => None,
        Err(error) => {
            let failed = plans.iter().filter(|plan| matches!(plan, Plan::Append { .. })).count();
            if error.is_storage_full() {
                // The log reports each disk-full episode once, at its start.
                Stats::add(&stats.publishes_rejected_storage_full, failed as u64);
            } else {
                super::log_storage_error(stats, error, "append failed; nothing of the group was stored");
                Stats::add(&stats.publishes_rejected_storage, failed as u64);
            }
            // Nothing of this group is stored: forget what it promised.
            for (request, plan) in group.iter().zip(&plans) {
                if let (Some(producer), Plan::Append { .. }) = (request.producer, plan)
                    && let Some(state) = producers.get_mut(&producer.producer_id)
                {
                    state.recent.retain(|entry| entry.0 != producer.sequence);
                    match state.recent.back() {
                        Some(&(sequence, count, _, _)) => state.next_sequence = sequence + count,
                        // Nothing of it stored: it anchors again on its next publish.
                        None => {
                            producers.remove(&producer.producer_id);
                        }
                    }
                }
            }
            None
        }
    };
    if let Some(timestamp_us) = timestamp_us {
        for (request, plan) in group.iter().zip(&plans) {
            if let (Some(producer), Plan::Append { .. }) = (request.producer, plan)
                && let Some(state) = producers.get_mut(&producer.producer_id)
                && let Some(entry) = state.recent.iter_mut().find(|entry| entry.0 == producer.sequence)
            {
                entry.3 = timestamp_us;
            }
        }
    }
    for (request, plan) in group.drain(..).zip(plans) {
        let response = match (plan, &result) {
            (Plan::Reject(code, message), _) => Response::Error { code: code as u16, message },
            (Plan::Append { .. }, Err(error)) => storage_error(error),
            (Plan::Append { first_offset, count }, Ok(_)) => Response::PublishAck {
                partition: log.partition(),
                first_offset,
                count: count as u32,
                timestamp_us: timestamp_us.unwrap_or_default(),
                duplicate: false,
            },
            // The original was part of this group, which was not stored.
            (Plan::Duplicate { first_offset, .. }, Err(error)) if first_offset >= base_offset => storage_error(error),
            (Plan::Duplicate { first_offset, count, timestamp_us: known }, _) => Response::PublishAck {
                partition: log.partition(),
                first_offset,
                count: count as u32,
                timestamp_us: known.or(timestamp_us).unwrap_or_default(),
                duplicate: true,
            },
        };
        request.reply.send(response);
    }
}

/// Appends on the runtime thread when no sync is needed (a write to the
/// page cache costs about as much as a socket write), and on the blocking
/// pool when an `fdatasync` will follow or the segment is due to roll.
async fn append(log: &Arc<ChannelLog>, batches: Vec<OwnedBatch>) -> Result<Appended, StorageError> {
    fn append_now(log: &ChannelLog, batches: &[OwnedBatch]) -> Result<Appended, StorageError> {
        let batches: Vec<NewBatch<'_>> = batches
            .iter()
            .map(|batch| NewBatch { messages: &batch.messages, producer: batch.producer, raft: None })
            .collect();
        log.append_batches_at(&batches, now_us())
    }
    // A roll syncs and creates files: also for the blocking pool.
    if log.config().fsync != FsyncPolicy::Always && !log.roll_due(now_us()) {
        return append_now(log, &batches);
    }
    let log = Arc::clone(log);
    match tokio::task::spawn_blocking(move || append_now(&log, &batches)).await {
        Ok(result) => result,
        Err(join_error) => {
            Err(StorageError::Io { path: "append task".into(), source: std::io::Error::other(join_error) })
        }
    }
}

fn storage_error(error: &StorageError) -> Response {
    let code = match error {
        StorageError::InvalidMessage { .. } => ErrorCode::MessageTooLarge,
        error => super::storage_error_code(error),
    };
    Response::Error { code: code as u16, message: format!("not stored: {error}") }
}

fn plan_idempotent(
    producers: &mut HashMap<u64, ProducerState>,
    producer: ProducerSequence,
    count: u64,
    first_offset: u64,
    clock: u64,
    limits: WriterLimits,
) -> Plan {
    if !producers.contains_key(&producer.producer_id) && producers.len() >= limits.max_producers {
        // Forget the producer idle the longest; its retries after this can
        // no longer be recognised (documented in docs/GUARANTEES.md).
        if let Some((&oldest, _)) = producers.iter().min_by_key(|(_, state)| state.last_used) {
            producers.remove(&oldest);
        }
    }
    let known = producers.contains_key(&producer.producer_id);
    let state = producers.entry(producer.producer_id).or_default();
    state.last_used = clock;
    if !known {
        // A producer seen for the first time (or again after an eviction,
        // or a restart that found none of its publishes in the active
        // segment) starts wherever it is.
        state.next_sequence = producer.sequence;
    }
    if std::mem::take(&mut state.restored) && producer.sequence > state.next_sequence {
        tracing::warn!(
            producer = producer.producer_id,
            sequence = producer.sequence,
            next_sequence = state.next_sequence,
            "the first publish of a producer since the restart is ahead of what the log holds of it; anchoring it there"
        );
        state.next_sequence = producer.sequence;
    }
    if producer.sequence > state.next_sequence {
        return Plan::Reject(
            ErrorCode::OutOfOrderSequence,
            format!(
                "sequence {} of producer {} is ahead of its next sequence {}: an earlier publish was not stored",
                producer.sequence, producer.producer_id, state.next_sequence
            ),
        );
    }
    let Some(sequence_end) = producer.sequence.checked_add(count) else {
        return Plan::Reject(
            ErrorCode::InvalidRequest,
            format!("sequence {} + {count} overflows u64", producer.sequence),
        );
    };
    if producer.sequence < state.next_sequence {
        // A retry is the same publish: same first sequence and count.
        let remembered = state.recent.iter().find(|entry| entry.0 == producer.sequence && entry.1 == count);
        return match remembered {
            Some(&(_, stored_count, stored_offset, timestamp_us)) => Plan::Duplicate {
                first_offset: stored_offset,
                count: stored_count,
                timestamp_us: (timestamp_us != 0).then_some(timestamp_us),
            },
            None => Plan::Reject(
                ErrorCode::SequenceTooOld,
                format!(
                    "sequence {} (count {count}) of producer {} is below its next sequence {} and matches no publish in the dedup window of {} publishes",
                    producer.sequence, producer.producer_id, state.next_sequence, limits.dedup_window
                ),
            ),
        };
    }
    state.next_sequence = sequence_end;
    state.recent.push_back((producer.sequence, count, first_offset, 0));
    while state.recent.len() > limits.dedup_window {
        state.recent.pop_front();
    }
    Plan::Append { first_offset, count }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::StdFileSystem;
    use crate::storage::{ChannelName, LogConfig};

    struct Fixture {
        writer: PartitionWriter,
        queue: mpsc::Sender<AppendRequest>,
        _queued: mpsc::Receiver<AppendRequest>,
        answers: mpsc::Sender<Outbound>,
        _answered: mpsc::Receiver<Outbound>,
        outbox: Arc<Outbox>,
        _peer: tokio::net::TcpStream,
        _dir: tempfile::TempDir,
    }

    async fn fixture(fsync: FsyncPolicy) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig { fsync, ..LogConfig::default() };
        let log =
            ChannelLog::open(Arc::new(StdFileSystem), dir.path(), ChannelName::new("c").unwrap(), config).unwrap();
        let (tail, _) = watch::channel(0);
        let limits = WriterLimits { group_bytes_max: 1 << 20, dedup_window: 8, max_producers: 8 };
        let writer = PartitionWriter::new(Arc::new(log), tail, limits, Arc::new(Stats::default()));
        // What the writer task does first (these tests run no task).
        writer.state.lock().await.producers_loaded = true;
        let (queue, queued) = mpsc::channel(8);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let outbox = Arc::new(Outbox::new(1024, crate::security::tls::split_plain(socket).1));
        let (answers, answered) = mpsc::channel(8);
        Fixture { writer, queue, _queued: queued, answers, _answered: answered, outbox, _peer: peer, _dir: dir }
    }

    fn request(fixture: &Fixture, payload: &'static str) -> AppendRequest {
        let reply = Reply {
            permit: Some(fixture.answers.clone().try_reserve_owned().unwrap()),
            received_at: std::time::Instant::now(),
            stats: Arc::new(Stats::default()),
            correlation_id: 1,
            inflight: Arc::new(AtomicU32::new(1)),
            inflight_bytes: Arc::new(AtomicU64::new(0)),
            body_bytes: 0,
            version: crate::protocol::PROTOCOL_VERSION,
            outbox: Arc::clone(&fixture.outbox),
            write_at_once: true,
        };
        AppendRequest { messages: vec![Message::from_payload(payload)], producer: None, reply }
    }

    #[tokio::test]
    async fn an_idle_writer_is_appended_to_inline() {
        let fixture = fixture(FsyncPolicy::Never).await;
        assert!(fixture.writer.append_inline(request(&fixture, "first")).await.is_ok());
        assert_eq!(fixture.writer.log.next_offset(), 1);
    }

    #[tokio::test]
    async fn a_publish_never_passes_one_queued_for_the_writer_task() {
        let fixture = fixture(FsyncPolicy::Never).await;
        fixture.writer.enqueue(&fixture.queue, request(&fixture, "queued")).map_err(|_| "queue").unwrap();
        assert!(fixture.writer.append_inline(request(&fixture, "later")).await.is_err(), "it must queue behind");
        assert_eq!(fixture.writer.log.next_offset(), 0, "nothing stored ahead of the queued publish");
    }

    #[tokio::test]
    async fn nothing_is_appended_inline_before_the_producers_are_rebuilt() {
        let fixture = fixture(FsyncPolicy::Never).await;
        fixture.writer.state.lock().await.producers_loaded = false;
        assert!(fixture.writer.append_inline(request(&fixture, "early")).await.is_err(), "it must queue");
        assert_eq!(fixture.writer.log.next_offset(), 0);
    }

    #[tokio::test]
    async fn under_always_every_publish_goes_to_the_writer_task() {
        let fixture = fixture(FsyncPolicy::Always).await;
        assert!(fixture.writer.append_inline(request(&fixture, "synced")).await.is_err());
    }
}
