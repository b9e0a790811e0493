//! The publisher: callers publish one message at a time; a background task
//! gathers what is queued into batches (so a caller still gets group
//! commit), pipelines them up to the broker's window, and keeps them in
//! order through retries.
//!
//! Every batch carries this publisher's producer id and a sequence number,
//! so a batch resent after a lost connection is recognised by the broker
//! and answered with its original offsets instead of being stored twice.
//! After any rejection the task stops sending, waits for every answer
//! still due, renumbers what is left (rejected batches were not stored),
//! and resends it in order: per-publisher order holds across retries. A
//! batch one of whose attempts may have been stored (no answer came) is
//! only ever resent as the same producer with the same sequence; if it
//! must be given up, it fails with `OutcomeUnknown` and the publisher goes
//! on as a new producer, so that its sequences are never given to other
//! messages.
//!
//! A single node anchors a producer it does not know (a new one, or any
//! after a broker restart) at the sequence of its first publish that
//! reaches the channel writer; a replicated partition takes one it does
//! not remember only at sequence 0, and answers `UnknownProducer` (nothing
//! stored) otherwise, on which the publisher goes on as a new producer. If two batches were pipelined then and the first was
//! turned away before the writer (BACKPRESSURE), the second would anchor
//! the producer past the first, which could then never be stored. So after
//! connecting and after every reconnect the publisher is *unanchored*: it
//! keeps one batch in flight until a PUBLISH_ACK says the broker knows
//! where this producer stands, and only then pipelines.
//!
//! A replicated partition (cluster mode) takes publishes on its leader
//! only: a `NotLeader` answer (nothing stored) sends the publisher to the
//! leader it names, or, while none is known (an election), back to the same
//! node a moment later, and the batches are resent there. An
//! `OutcomeUnknown` answer (proposed, then the leader was deposed) is
//! handled as a lost connection: the batch is resent with the same
//! sequences (at most 100 times), and the partition's deduplication
//! answers it with its original offsets if the new leader committed it
//! after all.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::ClientError;
use super::connection::{ConnectOptions, Connection};
use crate::protocol::{ErrorCode, ProducerSequence, Request, Response, wire};
use crate::record::KEY_BYTES_MAX;
use crate::record::Message;
use crate::security::tls::ClientTlsOptions;

/// What to do when the broker answers BACKPRESSURE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackpressurePolicy {
    /// Wait the suggested time and resend, up to `max_attempts` times per
    /// batch; then fail the batch's publishes with `Backpressure`.
    Retry { max_attempts: u32 },
    /// Fail the batch's publishes with `ClientError::Backpressure` at once.
    Surface,
}

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// How long to wait for more messages before sending a batch. Zero (the
    /// default) sends at once; batches still form from whatever queues up
    /// while earlier batches are on the wire, like Kafka's `linger.ms = 0`.
    pub linger: Duration,
    /// Most messages per batch (capped by the broker's max_batch_records).
    pub batch_max_messages: usize,
    /// Most bytes per batch (capped by the broker's max_batch_bytes).
    pub batch_max_bytes: usize,
    /// Messages queued in the client before `publish` waits.
    pub queue_depth: usize,
    pub backpressure: BackpressurePolicy,
    /// Reconnection attempts after a lost connection before publishes fail.
    pub reconnect_attempts: u32,
    pub client_name: String,
    pub auth_token: Option<String>,
    /// Connect over TLS.
    pub tls: Option<ClientTlsOptions>,
    /// The partition this publisher writes to. A publisher is one ordered,
    /// exactly-once stream, and idempotence is per partition, so it writes
    /// to one partition; [`PartitionedPublisher`] routes over all of them.
    pub partition: u32,
}

impl PublisherOptions {
    /// How its connections are made.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            client_name: self.client_name.clone(),
            auth_token: self.auth_token.clone(),
            tls: self.tls.clone(),
        }
    }
}

impl Default for PublisherOptions {
    fn default() -> PublisherOptions {
        PublisherOptions {
            linger: Duration::ZERO,
            batch_max_messages: 1024,
            batch_max_bytes: 1024 * 1024,
            queue_depth: 16 * 1024,
            backpressure: BackpressurePolicy::Retry { max_attempts: 1000 },
            reconnect_attempts: 10,
            client_name: "weir-publisher".into(),
            auth_token: None,
            tls: None,
            partition: 0,
        }
    }
}

/// Where a published message was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_us: u64,
    /// The broker had already stored it (a retry after a lost answer).
    pub duplicate: bool,
}

/// Resends after `OutOfOrderSequence` before a batch is failed: a bound on
/// a loop that only a broker bug could cause.
const RESEQUENCE_ATTEMPTS_MAX: u32 = 100;
/// Times one batch follows `NotLeader` before the publisher gives up on it.
const REDIRECTS_MAX: u32 = 100;
/// Times one batch is resent after a lost answer or `OutcomeUnknown`
/// before it is failed as `OutcomeUnknown`.
const UNCERTAIN_RESENDS_MAX: u32 = 100;
/// Most node addresses a publisher remembers to fall back on.
const KNOWN_NODES_MAX: usize = 16;
/// The wait before asking the same node again when it knows no leader (an
/// election is under way).
const LEADER_UNKNOWN_WAIT: Duration = Duration::from_millis(100);

type ReceiptSender = oneshot::Sender<Result<Receipt, ClientError>>;

struct Queued {
    message: Message,
    reply: ReceiptSender,
}

/// Publishes to one channel.
pub struct Publisher {
    queue: mpsc::Sender<Queued>,
    task: JoinHandle<()>,
    message_bytes_max: usize,
}

impl Publisher {
    /// Connects to `addr` and starts publishing to `channel`.
    ///
    /// # Errors
    /// The connection or handshake failed.
    pub async fn connect(addr: &str, channel: &str, options: PublisherOptions) -> Result<Publisher, ClientError> {
        let mut connection = Connection::connect_with(addr, &options.connect_options()).await?;
        let mut addr = addr.to_owned();
        let mut known_addrs = vec![addr.clone()];
        // In a cluster: every node's address to fall back on, and straight
        // to the partition's leader (a redirect saved). Anything amiss here
        // leaves it where it is, to be redirected on its first publish.
        let metadata = match super::Metadata::fetch(&connection, channel).await {
            Ok(metadata) => Some(metadata),
            // A broker that speaks version 2 but predates METADATA closes
            // the connection on it.
            Err(_) if connection.protocol_version() >= 2 => {
                connection = Connection::connect_with(&addr, &options.connect_options()).await?;
                None
            }
            Err(_) => None,
        };
        if let Some(metadata) = metadata
            && metadata.clustered
        {
            for node in &metadata.nodes {
                if known_addrs.len() < KNOWN_NODES_MAX && !known_addrs.contains(&node.client_addr) {
                    known_addrs.push(node.client_addr.clone());
                }
            }
            if let Some(leader) = metadata.leader_addr(channel, options.partition)
                && leader != addr
                && let Ok(at_leader) = Connection::connect_with(leader, &options.connect_options()).await
            {
                connection = at_leader;
                leader.clone_into(&mut addr);
            }
        }
        let limits = *connection.limits();
        let (queue, queued) = mpsc::channel(options.queue_depth.max(1));
        let batching = Batching {
            max_messages: options.batch_max_messages.clamp(1, limits.max_batch_records.max(1) as usize),
            max_bytes: options
                .batch_max_bytes
                .clamp(1, (limits.max_batch_bytes as usize).min(limits.max_inflight_publish_bytes as usize)),
            window: limits.max_inflight_publishes.max(1) as usize,
            window_bytes: limits.max_inflight_publish_bytes as usize,
        };
        let state = PublishTask {
            addr,
            known_addrs,
            channel: channel.to_owned(),
            options,
            connection,
            producer_id: rand::random(),
            next_sequence: 0,
            acked_end: 0,
            anchored: false,
            pending: BTreeMap::new(),
            requests: FuturesUnordered::new(),
            next_batch_id: 0,
            batching,
            held: None,
        };
        let task = tokio::spawn(state.run(queued));
        Ok(Publisher { queue, task, message_bytes_max: limits.max_message_bytes as usize })
    }

    /// Publishes one message and waits until the broker has stored it.
    ///
    /// # Errors
    /// The message breaks a limit, the broker refused it, or it could not
    /// be delivered after the configured retries.
    pub async fn publish(&self, message: Message) -> Result<Receipt, ClientError> {
        self.enqueue(message).await?.await.map_err(|_| ClientError::Closed)?
    }

    /// Queues a message and returns at once with a receiver for its
    /// receipt, so that a caller can keep many publishes in flight.
    ///
    /// # Errors
    /// The message breaks a limit, or the publisher is closed.
    pub async fn enqueue(
        &self,
        message: Message,
    ) -> Result<oneshot::Receiver<Result<Receipt, ClientError>>, ClientError> {
        if message.key.len() > KEY_BYTES_MAX {
            return Err(ClientError::Invalid(format!("key of {} bytes exceeds {KEY_BYTES_MAX}", message.key.len())));
        }
        message.validate(self.message_bytes_max).map_err(|error| ClientError::Invalid(error.to_string()))?;
        let (reply, receipt) = oneshot::channel();
        self.queue.send(Queued { message, reply }).await.map_err(|_| ClientError::Closed)?;
        Ok(receipt)
    }

    /// Waits until every queued message is answered, then closes.
    pub async fn close(self) {
        drop(self.queue);
        let _ = self.task.await;
    }
}

#[derive(Clone, Copy)]
struct Batching {
    max_messages: usize,
    max_bytes: usize,
    /// The broker's max_inflight_publishes.
    window: usize,
    /// The broker's max_inflight_publish_bytes.
    window_bytes: usize,
}

struct Batch {
    sequence: u64,
    messages: Vec<Message>,
    /// What the batch counts against the broker's byte window.
    inflight_bytes: usize,
    replies: Vec<ReceiptSender>,
    /// Times the broker answered this batch BACKPRESSURE.
    backpressured: u32,
    /// Times this batch had to be resent for a sequence or window
    /// rejection (`OutOfOrderSequence`, `InflightLimitExceeded`) that no
    /// earlier rejected batch explains.
    resequenced: u32,
    /// Times the broker answered this batch `NotLeader`.
    redirected: u32,
    /// Times this batch was resent because its answer was lost (the
    /// connection died) or `OutcomeUnknown`.
    uncertain: u32,
    /// An attempt's outcome is unknown: the broker may have stored it, as
    /// `sent_as` with this batch's sequence. It is then only ever resent
    /// as that producer with that sequence (deduplicated if stored), or
    /// failed as `OutcomeUnknown`.
    maybe_stored: bool,
    /// The producer id it was last sent as.
    sent_as: Option<u64>,
    /// Sent on the current connection and not answered yet. A batch that
    /// is neither in flight nor settled waits to be sent (behind a batch
    /// resent alone while the publisher is unanchored).
    in_flight: bool,
    outcome: Option<Outcome>,
}

enum Outcome {
    Acked {
        first_offset: u64,
        count: u32,
        timestamp_us: u64,
        duplicate: bool,
    },
    Retry {
        after: Duration,
    },
    Reconnect,
    /// `NotLeader` (nothing stored): go to the leader named, if any.
    Redirect {
        leader: Option<String>,
        error: ClientError,
    },
    /// `UnknownProducer` (nothing stored): the partition forgot this
    /// producer; go on as a new one.
    NewProducer,
    Fail(ClientError),
}

struct PublishTask {
    addr: String,
    /// The addresses it knows a node at: the one it connected to first,
    /// every node the cluster's METADATA named, then every leader it was
    /// sent to (at most [`KNOWN_NODES_MAX`]). When
    /// the node it was on cannot be reached (it may have died), it tries
    /// them in turn; any of them redirects it to the leader.
    known_addrs: Vec<String>,
    channel: String,
    options: PublisherOptions,
    connection: Connection,
    producer_id: u64,
    next_sequence: u64,
    /// One past the last sequence of the highest batch the broker
    /// acknowledged: the broker's next sequence for this producer is at
    /// least this, so no batch is ever (re)numbered below it.
    acked_end: u64,
    /// A PUBLISH_ACK arrived on the current connection for the current
    /// producer id: the broker has anchored this producer, and batches may
    /// be pipelined. Until then one batch at a time is in flight.
    anchored: bool,
    /// Batches not yet settled, by id (ids grow in send order): in flight,
    /// answered with a rejection, or waiting to be resent.
    pending: BTreeMap<u64, Batch>,
    /// The answers awaited, polled by this task itself: a spawned task per
    /// batch would cost a wake-up of another worker thread per publish.
    requests: FuturesUnordered<BoxFuture<'static, (u64, Outcome)>>,
    next_batch_id: u64,
    batching: Batching,
    /// A message taken from the queue that did not fit in the last batch.
    held: Option<Queued>,
}

impl PublishTask {
    async fn run(mut self, mut queued: mpsc::Receiver<Queued>) {
        let mut open = true;
        loop {
            let recovering = self
                .pending
                .values()
                .any(|batch| matches!(batch.outcome, Some(ref o) if !matches!(o, Outcome::Acked { .. })));
            if recovering && self.requests.is_empty() {
                self.recover().await;
                continue;
            }
            if !open && self.pending.is_empty() && self.held.is_none() {
                return;
            }
            // A batch is sent only when its largest possible size, counted
            // as the broker counts it (wire bytes plus the memory it holds
            // per message), fits in the byte window next to everything in
            // flight; with nothing in flight the broker takes any one batch.
            let bytes_in_flight: usize = self.pending.values().filter(|b| b.in_flight).map(|b| b.inflight_bytes).sum();
            let batch_bytes_max = self.batching.max_bytes + self.batching.max_messages * std::mem::size_of::<Message>();
            // Unanchored, one batch at a time (see the module comment).
            let window = if self.anchored { self.batching.window } else { 1 };
            let can_send = !recovering
                && self.requests.len() < window
                && (bytes_in_flight == 0 || bytes_in_flight + batch_bytes_max <= self.batching.window_bytes);
            // Batches left waiting by `recover` go first, in order, before
            // anything new.
            let waiting = self.pending.iter().find(|(_, b)| !b.in_flight && b.outcome.is_none()).map(|(&id, _)| id);
            if let Some(id) = waiting {
                if can_send && let Some(mut batch) = self.pending.remove(&id) {
                    self.transmit(id, &mut batch).await;
                    self.pending.insert(id, batch);
                    continue;
                }
            } else if can_send && let Some(first) = self.held.take() {
                let batch = self.gather(first, &mut queued).await;
                self.send(batch).await;
                continue;
            }
            let can_send = can_send && open && waiting.is_none();
            tokio::select! {
                Some((id, outcome)) = self.requests.next(), if !self.requests.is_empty() => {
                    self.settle(id, outcome);
                }
                first = queued.recv(), if can_send => match first {
                    Some(first) => {
                        let batch = self.gather(first, &mut queued).await;
                        self.send(batch).await;
                    }
                    None => open = false,
                },
            }
        }
    }

    /// A batch starting with `first`: as many queued messages as fit in
    /// the broker's `max_batch_bytes` (counted as the PUBLISH_BATCH body) and
    /// `max_batch_records`. A message that does not fit is held for the next
    /// batch.
    async fn gather(&mut self, first: Queued, queued: &mut mpsc::Receiver<Queued>) -> Vec<Queued> {
        let mut bytes = batch_overhead_bytes(&self.channel) + wire::message_wire_len(&first.message);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.options.linger;
        while batch.len() < self.batching.max_messages {
            let next = match self.held.take().map(Ok).unwrap_or_else(|| queued.try_recv()) {
                Ok(next) => next,
                Err(_) if self.options.linger.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(deadline, queued.recv()).await {
                    Ok(Some(next)) => next,
                    _ => break,
                },
            };
            let next_bytes = wire::message_wire_len(&next.message);
            if bytes + next_bytes > self.batching.max_bytes {
                self.held = Some(next);
                break;
            }
            bytes += next_bytes;
            batch.push(next);
        }
        batch
    }

    async fn send(&mut self, queued: Vec<Queued>) {
        let (messages, replies): (Vec<Message>, Vec<ReceiptSender>) =
            queued.into_iter().map(|q| (q.message, q.reply)).unzip();
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let sequence = self.next_sequence;
        self.next_sequence += messages.len() as u64;
        let mut batch = Batch {
            sequence,
            inflight_bytes: messages.iter().map(wire::message_inflight_bytes).sum(),
            messages,
            replies,
            backpressured: 0,
            resequenced: 0,
            redirected: 0,
            uncertain: 0,
            maybe_stored: false,
            sent_as: None,
            in_flight: false,
            outcome: None,
        };
        self.transmit(id, &mut batch).await;
        self.pending.insert(id, batch);
    }

    async fn transmit(&mut self, id: u64, batch: &mut Batch) {
        batch.in_flight = true;
        batch.sent_as = Some(self.producer_id);
        let producer = Some(ProducerSequence { producer_id: self.producer_id, sequence: batch.sequence });
        let channel = self.channel.clone();
        let partition = Some(self.options.partition);
        let request = if batch.messages.len() == 1 {
            Request::Publish { channel, partition, producer, message: batch.messages[0].clone() }
        } else {
            Request::PublishBatch { channel, partition, producer, messages: batch.messages.clone() }
        };
        let answer = self.connection.send_request(request).await;
        let policy = self.options.backpressure;
        self.requests.push(Box::pin(async move {
            let result = match answer {
                Ok(answer) => answer.await.unwrap_or(Err(ClientError::Disconnected)),
                Err(error) => Err(error),
            };
            (id, classify(result, policy))
        }));
    }

    fn settle(&mut self, id: u64, outcome: Outcome) {
        let Some(batch) = self.pending.get_mut(&id) else { return };
        batch.in_flight = false;
        // An acknowledgement of another number of messages (or past the
        // last offset) is not this batch's: failed, never taken for it.
        let outcome = match outcome {
            Outcome::Acked { first_offset, count, .. }
                if count as usize != batch.messages.len() || first_offset.checked_add(u64::from(count)).is_none() =>
            {
                Outcome::Fail(ClientError::Unexpected(format!(
                    "PUBLISH_ACK of {count} messages from offset {first_offset} for a batch of {}",
                    batch.messages.len()
                )))
            }
            outcome => outcome,
        };
        if let Outcome::Acked { first_offset, timestamp_us, duplicate, .. } = outcome
            && batch.outcome.is_none()
        {
            // The broker knows this producer now, and its next sequence is
            // at least the end of this batch.
            if batch.sent_as == Some(self.producer_id) {
                self.anchored = true;
                self.acked_end = self.acked_end.max(batch.sequence + batch.messages.len() as u64);
            }
            let Some(batch) = self.pending.remove(&id) else { return };
            for (i, reply) in batch.replies.into_iter().enumerate() {
                let receipt = Receipt {
                    partition: self.options.partition,
                    offset: first_offset + i as u64,
                    timestamp_us,
                    duplicate,
                };
                let _ = reply.send(Ok(receipt));
            }
            return;
        }
        // No answer (the connection died) or `OutcomeUnknown`: it may be
        // stored.
        batch.maybe_stored |= matches!(outcome, Outcome::Reconnect);
        batch.outcome = Some(outcome);
    }

    /// Runs with nothing in flight after a rejection or a lost connection:
    /// fail what cannot be retried, renumber the rest, resend in order.
    /// Unanchored (after a reconnect, or before the first acknowledgement),
    /// only the first batch is resent; the others wait, renumbered, until
    /// it is acknowledged.
    async fn recover(&mut self) {
        let mut reconnect = self.pending.values().any(|b| matches!(b.outcome, Some(Outcome::Reconnect)));
        let redirect = self.pending.values().find_map(|b| match &b.outcome {
            Some(Outcome::Redirect { leader, .. }) => Some(leader.clone()),
            _ => None,
        });
        // Followed at once the first time; after that, nodes may be sending
        // it round in a circle on stale views while an election runs (a
        // follower naming the deposed leader, which names the follower):
        // each further redirect waits as for no leader.
        let redirected_before = self.pending.values().any(|b| b.redirected > 0);
        match redirect {
            Some(Some(leader)) => {
                if redirected_before || leader == self.addr {
                    tokio::time::sleep(LEADER_UNKNOWN_WAIT).await;
                }
                if !self.known_addrs.contains(&leader) && self.known_addrs.len() < KNOWN_NODES_MAX {
                    self.known_addrs.push(leader.clone());
                }
                self.addr = leader;
                reconnect = true;
            }
            Some(None) => {
                tokio::time::sleep(LEADER_UNKNOWN_WAIT).await;
                reconnect = true;
            }
            None => {}
        }
        if reconnect && let Err(error) = self.reconnect().await {
            for (_, batch) in std::mem::take(&mut self.pending) {
                let error = if batch.maybe_stored { outcome_unknown(&error) } else { error.clone() };
                fail(batch, &error);
            }
            // Those batches may or may not have been stored: their
            // sequences must not be reused for other messages, or a later
            // batch could be taken for one of them and answered as a
            // duplicate. Publish as a new producer from here on.
            self.new_producer();
            return;
        }
        let wait = self
            .pending
            .values()
            .filter_map(|b| match b.outcome {
                Some(Outcome::Retry { after }) => Some(after),
                _ => None,
            })
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let max_attempts = match self.options.backpressure {
            BackpressurePolicy::Retry { max_attempts } => max_attempts,
            BackpressurePolicy::Surface => 0,
        };
        // First pass: what becomes of each batch, and whether this round
        // must go on as a new producer. It must when the partition forgot
        // this producer (`UnknownProducer`), or when a batch that may be
        // stored can no longer be resent as itself: given up, sent as an
        // earlier producer, or about to move to other sequence numbers
        // (because a batch before it is given up). Such a batch's
        // sequences must never carry other messages; it fails as
        // `OutcomeUnknown`. Deciding before anything is sent keeps one
        // producer per round.
        let mut switch = self.pending.values().any(|b| matches!(b.outcome, Some(Outcome::NewProducer)));
        // A batch rejected earlier in this round explains an
        // OutOfOrderSequence of the batches after it.
        let mut rejected_before = false;
        let mut shifted = false;
        let mut verdicts: Vec<(u64, Option<ClientError>)> = Vec::with_capacity(self.pending.len());
        for (&id, batch) in &mut self.pending {
            let give_up = match &batch.outcome {
                Some(Outcome::Fail(error)) => Some(error.clone()),
                Some(Outcome::Retry { after }) => {
                    let after = *after;
                    if !after.is_zero() {
                        batch.backpressured += 1;
                    } else if !rejected_before {
                        batch.resequenced += 1;
                    }
                    (batch.resequenced > max_attempts.max(RESEQUENCE_ATTEMPTS_MAX)
                        || (!after.is_zero() && batch.backpressured > max_attempts))
                        .then(|| ClientError::Backpressure {
                            channel: self.channel.clone(),
                            retry_after_ms: after.as_millis() as u32,
                        })
                }
                Some(Outcome::Redirect { error, .. }) => {
                    batch.redirected += 1;
                    (batch.redirected > REDIRECTS_MAX).then(|| error.clone())
                }
                Some(Outcome::Reconnect) => {
                    batch.uncertain += 1;
                    (batch.uncertain > UNCERTAIN_RESENDS_MAX).then_some(ClientError::Disconnected)
                }
                _ => None,
            };
            rejected_before |= batch.outcome.is_some();
            if batch.maybe_stored && (give_up.is_some() || shifted || batch.sent_as != Some(self.producer_id)) {
                switch = true;
            }
            shifted |= give_up.is_some();
            verdicts.push((id, give_up));
        }
        // Never below what the broker acknowledged: a sequence there is
        // either stored already or remembered as another batch's.
        let mut cursor = self.pending.values().next().map_or(self.next_sequence, |b| b.sequence).max(self.acked_end);
        if switch {
            self.new_producer();
            cursor = 0;
        }
        // Second pass: fail, renumber, resend in order (unanchored, only
        // the first).
        let mut resend = true;
        for (id, give_up) in verdicts {
            let Some(mut batch) = self.pending.remove(&id) else { continue };
            if batch.maybe_stored && batch.sent_as != Some(self.producer_id) {
                let error = give_up.unwrap_or(ClientError::Disconnected);
                fail(batch, &outcome_unknown(&error));
                continue;
            }
            if let Some(error) = give_up {
                // Not stored (one that may be was failed above): the
                // batches after it move down into its sequence numbers.
                fail(batch, &error);
                continue;
            }
            if batch.maybe_stored && batch.sequence < self.acked_end {
                // A later batch of this producer was acknowledged, so this
                // one's sequences were taken before it: stored. Resent as
                // itself, it is answered as a duplicate with its offsets;
                // renumbered past them, it would be stored twice.
                batch.outcome = None;
                if resend {
                    self.transmit(id, &mut batch).await;
                    resend = self.anchored;
                }
                self.pending.insert(id, batch);
                continue;
            }
            batch.sequence = cursor;
            cursor += batch.messages.len() as u64;
            batch.outcome = None;
            if resend {
                self.transmit(id, &mut batch).await;
                resend = self.anchored;
            }
            self.pending.insert(id, batch);
        }
        self.next_sequence = cursor.max(self.acked_end);
    }

    /// Starts over as a producer the broker has never seen.
    fn new_producer(&mut self) {
        self.producer_id = rand::random();
        self.next_sequence = 0;
        self.acked_end = 0;
        self.anchored = false;
    }

    async fn reconnect(&mut self) -> Result<(), ClientError> {
        let mut delay = Duration::from_millis(50);
        let mut last_error = ClientError::Disconnected;
        for _ in 0..self.options.reconnect_attempts.max(1) {
            match Connection::connect_with(&self.addr, &self.options.connect_options()).await {
                Ok(connection) => {
                    self.connection = connection;
                    // The broker may have restarted and forgotten this
                    // producer: it is anchored anew by the first publish.
                    self.anchored = false;
                    return Ok(());
                }
                Err(error) => {
                    last_error = error;
                    // The node may be gone: another one redirects it.
                    let next = self.known_addrs.iter().position(|known| *known == self.addr).map_or(0, |at| at + 1);
                    self.addr.clone_from(&self.known_addrs[next % self.known_addrs.len()]);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(last_error)
    }
}

/// PUBLISH_BATCH body bytes besides the messages: channel, producer fields
/// and record count.
fn batch_overhead_bytes(channel: &str) -> usize {
    1 + channel.len() + 1 + 16 + 4
}

/// The error of a batch given up after an attempt whose outcome is unknown.
fn outcome_unknown(last: &ClientError) -> ClientError {
    ClientError::Server {
        code: ErrorCode::OutcomeUnknown as u16,
        message: format!("not confirmed, and an earlier attempt may have been stored; last: {last}"),
    }
}

fn fail(batch: Batch, error: &ClientError) {
    for reply in batch.replies {
        let _ = reply.send(Err(error.clone()));
    }
}

fn classify(result: Result<Response, ClientError>, policy: BackpressurePolicy) -> Outcome {
    match result {
        Ok(Response::PublishAck { first_offset, count, timestamp_us, duplicate, .. }) => {
            Outcome::Acked { first_offset, count, timestamp_us, duplicate }
        }
        Ok(Response::Backpressure { channel, retry_after_ms, .. }) => match policy {
            BackpressurePolicy::Retry { .. } => {
                Outcome::Retry { after: Duration::from_millis(retry_after_ms.max(1) as u64) }
            }
            BackpressurePolicy::Surface => Outcome::Fail(ClientError::Backpressure { channel, retry_after_ms }),
        },
        Ok(other) => Outcome::Fail(ClientError::Unexpected(format!("{other:?}"))),
        Err(error) => match error.code() {
            Some(ErrorCode::OutOfOrderSequence | ErrorCode::InflightLimitExceeded) => {
                Outcome::Retry { after: Duration::ZERO }
            }
            // Resent with the same sequences: deduplicated if it was stored.
            Some(ErrorCode::ShuttingDown | ErrorCode::OutcomeUnknown) => Outcome::Reconnect,
            Some(ErrorCode::NotLeader) => Outcome::Redirect { leader: error.redirect(), error },
            Some(ErrorCode::UnknownProducer) => Outcome::NewProducer,
            _ if matches!(error, ClientError::Disconnected | ClientError::Io(_)) => Outcome::Reconnect,
            _ => Outcome::Fail(error),
        },
    }
}

/// Publishes to every partition of a channel, routing each message as the
/// broker would: a message with a key goes to its key's partition (Kafka's
/// partitioner, [`crate::partitioner::partition_for_key`], over the
/// channel's partition count when this publisher connected); messages
/// without a key stick to one partition for `batch_max_messages` of them,
/// then move to the next (Kafka's sticky partitioner), so that they still
/// form batches.
///
/// It holds one [`Publisher`] per partition, each its own connection and
/// producer id: publishing stays ordered and exactly-once per partition.
/// Partitions added after it connected are not used until it reconnects.
pub struct PartitionedPublisher {
    publishers: Vec<Publisher>,
    sticky_messages: u32,
    keyless: std::sync::atomic::AtomicU64,
}

impl PartitionedPublisher {
    /// Connects to `addr` and starts a publisher for every partition of
    /// `channel`, creating the channel (with the broker's default partition
    /// count) if it does not exist.
    ///
    /// # Errors
    /// The connection failed, the broker refused to create the channel, or
    /// it speaks protocol version 1 (no partitions).
    pub async fn connect(
        addr: &str,
        channel: &str,
        options: PublisherOptions,
    ) -> Result<PartitionedPublisher, ClientError> {
        let connection = Connection::connect_with(addr, &options.connect_options()).await?;
        if connection.protocol_version() < 2 {
            return Err(ClientError::Invalid("the broker speaks protocol version 1, which has no partitions".into()));
        }
        let mut count = partition_count(&connection, channel).await?;
        if count.is_none() {
            let create = Request::CreateChannel {
                channel: channel.to_owned(),
                retention: crate::protocol::ChannelRetention::default(),
                partitions: None,
            };
            match connection.request(create).await {
                Ok(_) => {}
                Err(error) if error.code() == Some(ErrorCode::ChannelExists) => {}
                Err(error) => return Err(error),
            }
            count = partition_count(&connection, channel).await?;
        }
        let count = count.ok_or_else(|| ClientError::Unexpected(format!("channel {channel} is not listed")))?;
        let mut publishers = Vec::with_capacity(count as usize);
        for partition in 0..count {
            let options = PublisherOptions { partition, ..options.clone() };
            publishers.push(Publisher::connect(addr, channel, options).await?);
        }
        Ok(PartitionedPublisher {
            publishers,
            sticky_messages: options.batch_max_messages.clamp(1, u32::MAX as usize) as u32,
            keyless: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The partition count this publisher routes over.
    pub fn partition_count(&self) -> u32 {
        self.publishers.len() as u32
    }

    /// The partition `message` goes to.
    pub fn partition_for(&self, message: &Message) -> u32 {
        let count = self.partition_count();
        if !message.key.is_empty() {
            return crate::partitioner::partition_for_key(&message.key, count);
        }
        let sent = self.keyless.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ((sent / u64::from(self.sticky_messages)) % u64::from(count)) as u32
    }

    /// Publishes one message to its partition and waits until it is stored.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn publish(&self, message: Message) -> Result<Receipt, ClientError> {
        self.publishers[self.partition_for(&message) as usize].publish(message).await
    }

    /// Queues one message for its partition; see [`Publisher::enqueue`].
    ///
    /// # Errors
    /// As [`Publisher::enqueue`].
    pub async fn enqueue(
        &self,
        message: Message,
    ) -> Result<oneshot::Receiver<Result<Receipt, ClientError>>, ClientError> {
        self.publishers[self.partition_for(&message) as usize].enqueue(message).await
    }

    /// Waits until every queued message is answered, then closes.
    pub async fn close(self) {
        for publisher in self.publishers {
            publisher.close().await;
        }
    }
}

/// The partition count of `channel`, if it exists.
pub(super) async fn partition_count(connection: &Connection, channel: &str) -> Result<Option<u32>, ClientError> {
    match connection.request(Request::ListChannels).await? {
        Response::Channels { channels } => {
            Ok(channels.iter().find(|info| info.name == channel).map(|info| info.partitions.len() as u32))
        }
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}
