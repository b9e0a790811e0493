//! One client connection: a reader that parses frames under the limits and
//! carries out requests, and a writer task that sends answers and
//! deliveries from two bounded queues.
//!
//! Every frame is checked in two steps (after mini-redis): the 9-byte
//! header first, its length against the limit for its type, and only then
//! is the body read, into a buffer of exactly the checked length. Waiting
//! for the next frame is cancel-safe (the read buffer lives here); once a
//! frame has started, it must arrive within `frame_timeout_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::AsyncWrite;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, ChannelError, DeleteError, PartitionHandle, SubscriptionStatus};
use super::channel_writer::{AppendRequest, Reply};
use super::group::Handover;
use super::member::MemberTask;
use super::offsets::ChannelRef;
use super::outbox::Outbox;
use super::partition_follower::{PartitionFollower, PlacedElsewhere};
use super::stats::Stats;
use super::subscription::Subscription;
use super::{Delivery, Outbound};
use crate::cluster::ReplicatedPublishError;
use crate::protocol::{
    self, BackpressureReason, DecodeError, ErrorCode, FRAME_BODY_BYTES_HARD_MAX, FRAME_HEADER_BYTES, FrameHeader,
    FrameType, NameField, Notice, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, ProducerSequence, Request, Response,
    StartPosition,
};
use crate::record::Message;
use crate::security::tls::{self, ReadHalf};
use crate::security::{ConnectionSlot, Operation, Permissions, Principal, Usage};
use crate::storage::{ChannelLog, ChannelName, ChannelSettings, StorageError};

/// Room in the response queue beyond the publish window, for answers to
/// other requests.
const RESPONSE_QUEUE_SLACK: usize = 64;
/// Delivery frames queued for the socket per connection. Each holds a slice
/// of a memory map, not a copy, and at most `delivery_batch_bytes`.
const DELIVERY_QUEUE_FRAMES: usize = 16;
/// Socket buffers of the connection's reader and writer.
const SOCKET_BUFFER_BYTES: usize = 64 * 1024;
/// A frame body slower than this (after `frame_timeout_ms`) is cut off.
const FRAME_BYTES_PER_SECOND_MIN: u64 = 1024 * 1024;
/// Suggested wait after a BACKPRESSURE notice.
const BACKPRESSURE_RETRY_AFTER_MS: u32 = 10;

/// Whether to keep reading after a request.
enum Flow {
    Continue,
    Close,
}

/// A live subscription: one cursor per partition it reads, ended together.
/// A consumer group member's cursors come and go with its assignment, so
/// the map is shared with the member's task.
struct SubscriptionHandle {
    cancel: CancellationToken,
    partitions: Cursors,
}

/// The cursors of one subscription, by partition.
pub(crate) type Cursors = Arc<std::sync::Mutex<HashMap<u32, PartitionCursor>>>;

/// Locks a subscription's cursors (a poisoned lock still holds them).
pub(crate) fn lock_cursors(cursors: &Cursors) -> std::sync::MutexGuard<'_, HashMap<u32, PartitionCursor>> {
    cursors.lock().unwrap_or_else(|p| p.into_inner())
}

/// A subscription's cursor in one partition, as the connection sees it.
pub(crate) struct PartitionCursor {
    pub ack_floor: watch::Sender<u64>,
    pub status: Arc<SubscriptionStatus>,
    /// Ends this partition's delivery task (a child of the subscription's).
    pub cancel: CancellationToken,
    /// Stops reading new records while what was sent drains (a consumer
    /// group member whose partition was revoked).
    pub revoked: CancellationToken,
    /// Cancelled by the delivery task once it has seen `revoked`: nothing
    /// more of the partition will be queued.
    pub reading_stopped: CancellationToken,
    /// The channel's: cancelled when it is deleted.
    pub channel_deleted: CancellationToken,
}

/// What starting a partition cursor of one subscription takes; a consumer
/// group member's task keeps a copy to start cursors as it is assigned
/// partitions.
#[derive(Clone)]
pub(crate) struct CursorFactory {
    pub broker: Arc<Broker>,
    pub deliveries: mpsc::Sender<Delivery>,
    pub version: u16,
    pub subscription_id: u32,
    pub channel: ChannelName,
    pub durable_name: Option<String>,
    pub group: Option<String>,
    pub max_inflight: u32,
    /// The principal's, when it limits subscribe bytes.
    pub subscribe_quota: Option<Arc<Usage>>,
}

impl CursorFactory {
    /// Queues a notice of `partition` for the client, after the frames
    /// queued before it; gives up when `cancel` (the subscription's) fires.
    /// Whether it was queued.
    pub async fn notify(&self, partition: u32, notice: Notice, cancel: &CancellationToken) -> bool {
        let response = Response::Notice { subscription_id: self.subscription_id, partition, notice };
        let outbound = Outbound::Frame(response.encode_for(self.version, 0));
        let delivery = Delivery { ended: cancel.clone(), outbound, ends_subscription: false };
        tokio::select! {
            sent = self.deliveries.send(delivery) => sent.is_ok(),
            () = cancel.cancelled() => false,
        }
    }

    /// Ends the subscription from the server's side: queues ERROR and
    /// UNSUBSCRIBED (one item, so that nothing comes between them); the
    /// connection's writer marks the subscription ended when it writes
    /// them. `cancel` is the subscription's.
    pub async fn end(&self, cursors: &Cursors, cancel: &CancellationToken, code: ErrorCode, message: String) {
        // The cursors stop first: their queued deliveries are dropped, so the
        // last frames are not stuck behind a backlog.
        for cursor in lock_cursors(cursors).values() {
            cursor.cancel.cancel();
        }
        let mut frames = Response::Error { code: code as u16, message }.encode_for(self.version, 0);
        let unsubscribed = Response::Unsubscribed { subscription_id: self.subscription_id };
        frames.extend_from_slice(&unsubscribed.encode_for(self.version, 0));
        let last = Delivery { ended: cancel.clone(), outbound: Outbound::Frame(frames), ends_subscription: true };
        // A client that never reads is closed by the writer's timeout
        // (idle_timeout_ms), which ends this wait with the connection.
        tokio::select! {
            _ = self.deliveries.send(last) => {}
            () = cancel.cancelled() => {}
        }
    }

    /// Starts the delivery task of one partition, from `first_offset`,
    /// ended by (a child of) `subscription_cancel`.
    pub fn start(
        &self,
        partition: &PartitionHandle,
        first_offset: u64,
        subscription_cancel: &CancellationToken,
        channel_deleted: &CancellationToken,
    ) -> PartitionCursor {
        let status = Arc::new(SubscriptionStatus {
            channel: self.channel.clone(),
            partition: partition.log.partition(),
            durable_name: self.durable_name.clone(),
            group: self.group.clone(),
            next_offset: AtomicU64::new(first_offset),
            ack_floor: AtomicU64::new(first_offset),
        });
        let (ack_sender, ack_floor) = watch::channel(first_offset);
        let config = &self.broker.config;
        let cancel = subscription_cancel.child_token();
        let revoked = CancellationToken::new();
        let reading_stopped = CancellationToken::new();
        let subscription = Subscription {
            subscription_id: self.subscription_id,
            version: self.version,
            log: Arc::clone(&partition.log),
            tail: partition.tail.clone(),
            log_start: partition.log_start.clone(),
            log_start_open: true,
            ack_floor,
            next_offset: first_offset,
            window: (self.max_inflight as u64).min(config.max_inflight_deliveries),
            // Under a subscribe quota a batch is a fraction of a second of
            // it, so that it never waits for a full bucket.
            delivery_batch_bytes: self
                .subscribe_quota
                .as_ref()
                .and_then(|usage| usage.subscribe_batch_bytes_max())
                .map_or(config.delivery_batch_bytes, |max| max.min(config.delivery_batch_bytes))
                as usize,
            lag_notice_threshold: config.lag_notice_threshold,
            notice_interval: Duration::from_millis(config.notice_interval_ms),
            deliveries: self.deliveries.clone(),
            cancel: cancel.clone(),
            revoked: revoked.clone(),
            reading_stopped: reading_stopped.clone(),
            subscription_cancel: subscription_cancel.clone(),
            channel_deleted: channel_deleted.clone(),
            status: Arc::clone(&status),
            stats: Arc::clone(&self.broker.stats),
            _registration: self.broker.register_subscription(Arc::clone(&status)),
            skip_floor: 0,
            last_lag_notice: None,
            subscribe_quota: self.subscribe_quota.clone(),
        };
        tokio::spawn(subscription.run());
        PartitionCursor {
            ack_floor: ack_sender,
            status,
            cancel,
            revoked,
            reading_stopped,
            channel_deleted: channel_deleted.clone(),
        }
    }
}

/// The fields of a SUBSCRIBE that joins a consumer group.
struct GroupJoin {
    subscription_id: u32,
    name: ChannelName,
    partition: Option<u32>,
    start: StartPosition,
    durable_name: Option<String>,
    group: String,
    max_inflight: u32,
}

/// How often a group member whose partition was revoked looks whether its
/// acks have caught up, so that the partition can move.
const GROUP_HANDOVER_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The fields of a SUBSCRIBE.
struct SubscribeRequest {
    subscription_id: u32,
    channel: String,
    partition: Option<u32>,
    start: StartPosition,
    durable_name: Option<String>,
    group: Option<String>,
    max_inflight: u32,
}

struct Connection {
    broker: Arc<Broker>,
    reader: BufReader<ReadHalf>,
    responses: mpsc::Sender<Outbound>,
    /// The socket's sending side, shared with the writer task.
    outbox: Arc<Outbox>,
    deliveries: mpsc::Sender<Delivery>,
    subscriptions: HashMap<u32, SubscriptionHandle>,
    inflight_publishes: Arc<AtomicU32>,
    inflight_publish_bytes: Arc<AtomicU64>,
    handshaken: bool,
    /// The protocol version agreed in HELLO (the newest before it, which
    /// only HELLO's layout depends on, and it has one).
    version: u16,
    /// The partition the next publish that names none and has no key goes
    /// to, round robin per connection.
    next_keyless_partition: u32,
    /// When the last frame arrived, in ms since `epoch`: a consumer group
    /// member whose connection is silent too long loses its partitions.
    last_frame_ms: Arc<AtomicU64>,
    epoch: std::time::Instant,
    cancel: CancellationToken,
    peer: String,
    /// The address the client reached this broker at: a single node's
    /// METADATA answer names it.
    local_addr: String,
    /// The subject common name of the client's verified certificate
    /// (mutual TLS).
    certificate_name: Option<String>,
    /// Who the client is, from HELLO on.
    principal: Option<Arc<Principal>>,
    /// Changes with every reload of the credentials (None once the
    /// authenticator is gone).
    credential_reloads: Option<watch::Receiver<u64>>,
    /// Counts this connection against its principal's `max_connections`.
    _principal_slot: Option<ConnectionSlot>,
    /// Until when publishes are refused for the principal's quota, after
    /// one was.
    publish_throttled_until: Option<Instant>,
}

/// Serves one accepted connection until it closes or the broker shuts
/// down. Holds its connection permit until then.
pub(crate) async fn serve(
    broker: Arc<Broker>,
    socket: TcpStream,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let peer = socket.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local_addr = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (read_half, write_half, certificate_name) = match tls {
        None => {
            let (read_half, write_half) = tls::split_plain(socket);
            (read_half, write_half, None)
        }
        Some(acceptor) => {
            let handshake_timeout = Duration::from_millis(broker.config.frame_timeout_ms);
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = timeout(handshake_timeout, acceptor.accept(socket)) => match accepted {
                    Ok(Ok(stream)) => tokio_rustls::TlsStream::Server(stream),
                    Ok(Err(error)) => {
                        Stats::add(&broker.stats.tls_handshake_failures, 1);
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        Stats::add(&broker.stats.tls_handshake_failures, 1);
                        tracing::debug!(%peer, "TLS handshake not completed within frame_timeout_ms");
                        return;
                    }
                },
            };
            let certificate_name = tls::peer_common_name(&stream);
            let (read_half, write_half) = tls::split_tls(stream);
            (read_half, write_half, certificate_name)
        }
    };
    let response_capacity = broker.config.max_inflight_publishes as usize + RESPONSE_QUEUE_SLACK;
    let (responses, responses_rx) = mpsc::channel(response_capacity);
    let (deliveries, deliveries_rx) = mpsc::channel(DELIVERY_QUEUE_FRAMES);
    let cancel = shutdown.child_token();
    let write_timeout = Duration::from_millis(broker.config.idle_timeout_ms);
    let outbox = Arc::new(Outbox::new(SOCKET_BUFFER_BYTES, write_half));
    let writer =
        tokio::spawn(write_loop(Arc::clone(&outbox), responses_rx, deliveries_rx, write_timeout, cancel.clone()));
    Stats::add(&broker.stats.connections_open, 1);
    let mut connection = Connection {
        broker: Arc::clone(&broker),
        reader: BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half),
        responses,
        outbox,
        deliveries,
        subscriptions: HashMap::new(),
        inflight_publishes: Arc::new(AtomicU32::new(0)),
        inflight_publish_bytes: Arc::new(AtomicU64::new(0)),
        handshaken: false,
        version: PROTOCOL_VERSION,
        next_keyless_partition: 0,
        last_frame_ms: Arc::new(AtomicU64::new(0)),
        epoch: std::time::Instant::now(),
        cancel: cancel.clone(),
        peer,
        local_addr,
        certificate_name,
        principal: None,
        credential_reloads: Some(broker.auth.reloads()),
        _principal_slot: None,
        publish_throttled_until: None,
    };
    connection.read_loop().await;
    for (_, subscription) in connection.subscriptions.drain() {
        subscription.cancel.cancel();
    }
    drop(connection);
    // The writer finishes once every answer owed (including publishes still
    // in a channel writer) has been sent.
    let _ = writer.await;
    broker.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
}

/// Tells a connection over `max_connections` why it is closed (after the
/// TLS handshake on a TLS listener, so that the client can read it), all
/// within a second.
pub(crate) async fn refuse(socket: TcpStream, tls: Option<TlsAcceptor>, max_connections: u64) {
    async fn tell(mut socket: impl AsyncWrite + Unpin, frame: &[u8]) {
        let _ = socket.write_all(frame).await;
        let _ = socket.shutdown().await;
    }
    let message = format!("the broker is at max_connections = {max_connections}; try again later");
    let frame = Response::Error { code: ErrorCode::TooManyConnections as u16, message }.encode(0);
    let _ = timeout(Duration::from_secs(1), async {
        match tls {
            None => tell(socket, &frame).await,
            Some(acceptor) => {
                if let Ok(stream) = acceptor.accept(socket).await {
                    tell(stream, &frame).await;
                }
            }
        }
    })
    .await;
}

/// Where a subscription starts in one partition: its durable position
/// when it has one, else `start`. `Err` carries the answer to refuse
/// the subscription with.
pub(crate) fn first_offset(
    broker: &Broker,
    log: &ChannelLog,
    stored: Option<u64>,
    start: StartPosition,
    durable_name: Option<&str>,
) -> Result<u64, (ErrorCode, String)> {
    let (start_offset, next) = (log.start_offset(), log.next_offset());
    match (stored, start) {
        // Never past the end: recovery may have cut records it had seen.
        (Some(resume_at), _) if resume_at > next => {
            if let Some(durable) = durable_name {
                broker.offsets.rewind(log.name().as_str(), durable, log.partition(), next);
            }
            Ok(next)
        }
        (Some(resume_at), _) => Ok(resume_at),
        (None, StartPosition::Earliest) => Ok(start_offset),
        (None, StartPosition::Latest) => Ok(next),
        (None, StartPosition::Offset(offset)) if offset < start_offset || offset > next => Err((
            ErrorCode::OffsetOutOfRange,
            format!(
                "offset {offset} is out of range for channel {}: it holds offsets {start_offset}..{next}",
                log.label()
            ),
        )),
        (None, StartPosition::Offset(offset)) => Ok(offset),
        (None, StartPosition::TimeUs(time_us)) => {
            log.offset_for_time(time_us).map_err(|error| (super::storage_error_code(&error), error.to_string()))
        }
    }
}

/// Waits for the next reload of the credentials: false once none can come
/// (and forever after that).
async fn reloaded(reloads: &mut Option<watch::Receiver<u64>>) -> bool {
    match reloads {
        Some(reloads) => reloads.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

impl Connection {
    async fn read_loop(&mut self) {
        let idle_timeout = Duration::from_millis(self.broker.config.idle_timeout_ms);
        // Moved by frames only (a reload wakes the loop without one).
        let mut idle_deadline = Instant::now() + idle_timeout;
        loop {
            let waiting = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                reloaded = reloaded(&mut self.credential_reloads) => {
                    if !reloaded {
                        self.credential_reloads = None;
                    } else if let Some(principal) = self.principal.as_ref().filter(|p| !self.broker.auth.is_current(p)) {
                        // Its subscriptions end with the connection.
                        let message = format!(
                            "the credentials of principal {} were removed or changed by a reload: connect again",
                            principal.name
                        );
                        tracing::info!(peer = %self.peer, principal = %principal.name, "closing a connection whose credentials changed");
                        // Waits for room in the answer queue, so that the
                        // client is told (a client that never reads is cut
                        // off by the writer's own timeout).
                        let _ = self.error(0, ErrorCode::Unauthorized, message).await;
                        return;
                    }
                    continue;
                }
                waiting = timeout_at(idle_deadline, self.reader.fill_buf()) => waiting,
            };
            match waiting {
                Err(_) => {
                    Stats::add(&self.broker.stats.idle_timeouts, 1);
                    tracing::debug!(peer = %self.peer, "closing an idle connection");
                    let message = format!("nothing received for idle_timeout_ms = {}", idle_timeout.as_millis());
                    self.fail(0, ErrorCode::IdleTimeout, message);
                    return;
                }
                Ok(Err(_)) => return,
                Ok(Ok([])) => return,
                Ok(Ok(_)) => {}
            }
            let frame = self.read_frame().await;
            self.last_frame_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            let flow = match frame {
                Ok(Some((header, body))) if self.batch_has_too_many_records(header.frame_type, &body) => {
                    Stats::add(&self.broker.stats.publishes_rejected_too_large, 1);
                    let records_max = self.broker.limits.max_batch_records;
                    let count = crate::protocol::wire::publish_batch_record_count(&body).unwrap_or_default();
                    let message = format!("batch of {count} records exceeds max_batch_records = {records_max}");
                    self.error(header.correlation_id, ErrorCode::BatchTooLarge, message).await
                }
                Ok(Some((header, body))) => match Request::decode_for(self.version, header.frame_type, body) {
                    Ok(request) => self.handle(header.correlation_id, request).await,
                    Err(error @ DecodeError::NameNotUtf8 { field, .. }) => {
                        self.name_not_utf8(header, field, error.to_string()).await
                    }
                    Err(error) => self.protocol_error(header.correlation_id, format!("malformed frame: {error}")),
                },
                Ok(None) => Flow::Continue,
                Err(flow) => flow,
            };
            if let Flow::Close = flow {
                return;
            }
            // Counted from when the request was served, as before a reload
            // could wake the wait.
            idle_deadline = Instant::now() + idle_timeout;
        }
    }

    /// Checked before decoding, so that a batch claiming more records than
    /// allowed costs nothing beyond its (already bounded) body.
    fn batch_has_too_many_records(&self, frame_type: u8, body: &[u8]) -> bool {
        frame_type == FrameType::PublishBatch as u8
            && crate::protocol::wire::publish_batch_record_count(body)
                .is_some_and(|count| count > self.broker.limits.max_batch_records)
    }

    /// Reads one frame. `Ok(None)` when an oversized publish was drained
    /// and answered.
    async fn read_frame(&mut self) -> Result<Option<(FrameHeader, Bytes)>, Flow> {
        let frame_timeout = Duration::from_millis(self.broker.config.frame_timeout_ms);
        let deadline = Instant::now() + frame_timeout;
        let mut header_bytes = [0u8; FRAME_HEADER_BYTES];
        match timeout_at(deadline, self.reader.read_exact(&mut header_bytes)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(Flow::Close),
            Err(_) => return Err(self.frame_timed_out(0)),
        }
        let header = match FrameHeader::parse(&header_bytes) {
            Ok(header) => header,
            Err(error) => return Err(self.protocol_error(0, format!("bad frame header: {error}"))),
        };
        if !self.handshaken && header.frame_type != FrameType::Hello as u8 {
            self.fail(header.correlation_id, ErrorCode::HandshakeRequired, "the first frame must be HELLO".into());
            return Err(Flow::Close);
        }
        let body_len = header.body_len as u64;
        let deadline = deadline + Duration::from_secs(body_len / FRAME_BYTES_PER_SECOND_MIN);
        let body_bytes_max = protocol::body_bytes_max(header.frame_type, &self.broker.limits);
        if header.body_len > body_bytes_max {
            let is_publish =
                header.frame_type == FrameType::Publish as u8 || header.frame_type == FrameType::PublishBatch as u8;
            if !is_publish || header.body_len > FRAME_BODY_BYTES_HARD_MAX {
                let message = if is_publish {
                    format!("a {}-byte body exceeds the hard cap of {FRAME_BODY_BYTES_HARD_MAX} bytes", header.body_len)
                } else {
                    format!(
                        "frame type {:#04x} with a {}-byte body exceeds its limit of {} bytes",
                        header.frame_type, header.body_len, body_bytes_max
                    )
                };
                return Err(self.protocol_error(header.correlation_id, message));
            }
            // Drain without buffering, then answer: the connection stays usable.
            let mut body = (&mut self.reader).take(body_len);
            match timeout_at(deadline, tokio::io::copy(&mut body, &mut tokio::io::sink())).await {
                Ok(Ok(copied)) if copied == body_len => {}
                Ok(_) => return Err(Flow::Close),
                Err(_) => return Err(self.frame_timed_out(header.correlation_id)),
            }
            Stats::add(&self.broker.stats.publishes_rejected_too_large, 1);
            let (code, message) = if header.frame_type == FrameType::Publish as u8 {
                let limit = self.broker.limits.max_message_bytes;
                (
                    ErrorCode::MessageTooLarge,
                    format!(
                        "PUBLISH body of {body_len} bytes cannot hold a message within max_message_bytes = {limit}"
                    ),
                )
            } else {
                let limit = self.broker.limits.max_batch_bytes;
                (
                    ErrorCode::BatchTooLarge,
                    format!("PUBLISH_BATCH body of {body_len} bytes exceeds max_batch_bytes = {limit}"),
                )
            };
            return match self.respond(header.correlation_id, Response::Error { code: code as u16, message }).await {
                Flow::Continue => Ok(None),
                Flow::Close => Err(Flow::Close),
            };
        }
        // Sized by the checked length; filled straight from the socket
        // buffer, without zeroing it first.
        let body_len = header.body_len as usize;
        let mut body = BytesMut::with_capacity(body_len);
        let filled = timeout_at(deadline, async {
            while body.len() < body_len {
                let wanted = body_len - body.len();
                if (&mut self.reader).take(wanted as u64).read_buf(&mut body).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            std::io::Result::Ok(())
        })
        .await;
        match filled {
            Ok(Ok(())) => Ok(Some((header, body.freeze()))),
            Ok(Err(_)) => Err(Flow::Close),
            Err(_) => Err(self.frame_timed_out(header.correlation_id)),
        }
    }

    async fn handle(&mut self, correlation_id: u32, request: Request) -> Flow {
        match request {
            Request::Hello { version_min, version_max, client_name, auth_token } => {
                self.hello(correlation_id, version_min, version_max, &client_name, &auth_token).await
            }
            Request::Ping => self.respond(correlation_id, Response::Pong).await,
            Request::Publish { channel, partition, producer, message } => {
                self.publish(correlation_id, &channel, partition, producer, vec![message]).await
            }
            Request::PublishBatch { channel, partition, producer, messages } => {
                let records_max = self.broker.limits.max_batch_records as usize;
                if messages.len() > records_max {
                    Stats::add(&self.broker.stats.publishes_rejected_too_large, 1);
                    let message =
                        format!("batch of {} records exceeds max_batch_records = {records_max}", messages.len());
                    return self.error(correlation_id, ErrorCode::BatchTooLarge, message).await;
                }
                self.publish(correlation_id, &channel, partition, producer, messages).await
            }
            Request::Subscribe { subscription_id, channel, partition, start, durable_name, group, max_inflight } => {
                let request =
                    SubscribeRequest { subscription_id, channel, partition, start, durable_name, group, max_inflight };
                self.subscribe(correlation_id, request).await
            }
            Request::Ack { subscription_id, partition, offset } => {
                self.ack(correlation_id, subscription_id, partition, offset).await
            }
            Request::Unsubscribe { subscription_id } => match self.subscriptions.remove(&subscription_id) {
                // Ended by the server, which sent its UNSUBSCRIBED already:
                // the id is free, as PROTOCOL.md says.
                Some(subscription) if subscription.cancel.is_cancelled() => {
                    self.unknown_subscription(correlation_id, subscription_id).await
                }
                Some(subscription) => {
                    subscription.cancel.cancel();
                    self.respond(correlation_id, Response::Unsubscribed { subscription_id }).await
                }
                None => self.unknown_subscription(correlation_id, subscription_id).await,
            },
            Request::Fetch { channel, partition, offset, max_messages, max_bytes } => {
                if let Ok(name) = ChannelName::new(&channel)
                    && let Some(refused) = self.unhosted_replicated(&name, Some(partition))
                {
                    return self.error(correlation_id, ErrorCode::NotLeader, refused).await;
                }
                self.fetch(correlation_id, &channel, partition, offset, max_messages, max_bytes).await
            }
            Request::AlterChannel { channel, partitions } => {
                let Some(name) = self.channel_name(correlation_id, &channel).await else { return Flow::Continue };
                if !self.permitted(correlation_id, Operation::Admin, name.as_str(), "alter channel").await {
                    return Flow::Continue;
                }
                if self.is_replicated(&name)
                    && let Some(replicas) = self.broker.replicas()
                {
                    if partitions as usize > crate::cluster::REPLICATED_PARTITIONS_MAX {
                        let message = format!(
                            "channel {name} cannot have {partitions} partitions: a replicated channel has at most {} (REPLICATED_PARTITIONS_MAX)",
                            crate::cluster::REPLICATED_PARTITIONS_MAX
                        );
                        return self.error(correlation_id, ErrorCode::TooManyPartitions, message).await;
                    }
                    return match replicas.alter_channel(name.as_str(), partitions).await {
                        Ok(()) => self.respond(correlation_id, Response::ChannelAltered).await,
                        Err(error) => self.admin_error(correlation_id, error).await,
                    };
                }
                // A replicated channel's copy the metadata state does not
                // list (deleted, or not applied yet on this node) is the
                // cluster's to change, never this node's alone.
                if let Some(message) = self.unlisted_replicated_copy(&name) {
                    return self.error(correlation_id, ErrorCode::UnknownChannel, message).await;
                }
                match self.broker.increase_partitions(&name, partitions) {
                    Ok(()) => self.respond(correlation_id, Response::ChannelAltered).await,
                    Err(error) => self.channel_error(correlation_id, &name, error).await,
                }
            }
            Request::CreateChannel { channel, retention, partitions } => {
                let Some(name) = self.channel_name(correlation_id, &channel).await else { return Flow::Continue };
                if !self.permitted(correlation_id, Operation::Admin, name.as_str(), "create channel").await {
                    return Flow::Continue;
                }
                if self.is_replicated(&name) {
                    let message = format!("channel {name} already exists (a replicated channel)");
                    return self.error(correlation_id, ErrorCode::ChannelExists, message).await;
                }
                let settings = ChannelSettings {
                    partitions,
                    replicated: None,
                    retention_max_bytes: retention.max_bytes,
                    retention_max_age_secs: retention.max_age_secs,
                    retention_max_messages: retention.max_messages,
                };
                if [settings.retention_max_bytes, settings.retention_max_age_secs, settings.retention_max_messages]
                    .contains(&Some(0))
                {
                    return self
                        .error(correlation_id, ErrorCode::InvalidRequest, "retention limits must be at least 1".into())
                        .await;
                }
                match self.broker.create_channel(&name, settings) {
                    Ok(()) => self.respond(correlation_id, Response::ChannelCreated).await,
                    Err(error) => self.storage_error(correlation_id, error).await,
                }
            }
            Request::DeleteChannel { channel, force } => {
                let Some(name) = self.channel_name(correlation_id, &channel).await else { return Flow::Continue };
                if !self.permitted(correlation_id, Operation::Admin, name.as_str(), "delete channel").await {
                    return Flow::Continue;
                }
                if self.is_replicated(&name)
                    && let Some(replicas) = self.broker.replicas()
                {
                    if !force {
                        let message = format!(
                            "channel {name} is replicated: its subscriptions on other nodes cannot be counted here; delete it with force, which ends them on every node"
                        );
                        return self.error(correlation_id, ErrorCode::ChannelInUse, message).await;
                    }
                    return match replicas.delete_channel(name.as_str()).await {
                        Ok(()) => self.respond(correlation_id, Response::ChannelDeleted).await,
                        Err(error) => self.admin_error(correlation_id, error).await,
                    };
                }
                // A replicated channel's copy the metadata state does not
                // list: removed by the node itself as the state says, never
                // by a request (the state may only lag, on a node applying
                // its log again, with the copy still the cluster's).
                if let Some(message) = self.unlisted_replicated_copy(&name) {
                    return self.error(correlation_id, ErrorCode::UnknownChannel, message).await;
                }
                // File work (moving and removing the channel's directory)
                // runs on the blocking pool.
                let broker = Arc::clone(&self.broker);
                let deleting = name.clone();
                let deleted = tokio::task::spawn_blocking(move || broker.delete_channel(&deleting, force))
                    .await
                    .unwrap_or_else(|join_error| {
                        let error = std::io::Error::other(join_error.to_string());
                        Err(DeleteError::Channel(ChannelError::Storage(StorageError::Io {
                            path: "delete".into(),
                            source: error,
                        })))
                    });
                match deleted {
                    Ok(()) => self.respond(correlation_id, Response::ChannelDeleted).await,
                    Err(DeleteError::InUse { subscriptions }) => {
                        let message = format!(
                            "channel {name} has {subscriptions} live subscriptions (partition cursors and group members); delete it with force to end them"
                        );
                        self.error(correlation_id, ErrorCode::ChannelInUse, message).await
                    }
                    Err(DeleteError::Channel(error)) => self.channel_error(correlation_id, &name, error).await,
                }
            }
            Request::ListGroups { channel } => {
                let Some(channel) = self.channel_filter(correlation_id, &channel).await else { return Flow::Continue };
                if let Some(name) = &channel
                    && !self
                        .permitted(correlation_id, Operation::Admin, name.as_str(), "list the groups of channel")
                        .await
                {
                    return Flow::Continue;
                }
                // Every channel: only those the principal administers.
                let permissions = &self.principal().permissions;
                let groups = self
                    .broker
                    .group_infos(channel.as_ref())
                    .into_iter()
                    .filter(|group| permissions.allows(Operation::Admin, &group.channel))
                    .collect();
                self.respond(correlation_id, Response::Groups { groups }).await
            }
            Request::Metadata { channel } => {
                let Some(channel) = self.channel_filter(correlation_id, &channel).await else { return Flow::Continue };
                let mut metadata = self.broker.metadata(channel.as_ref(), &self.local_addr);
                // Only the channels the principal has a permission on, as
                // LIST_CHANNELS.
                if let Response::Metadata { channels, .. } = &mut metadata {
                    let permissions = &self.principal().permissions;
                    channels.retain(|channel| permissions.sees(&channel.name));
                }
                self.respond(correlation_id, metadata).await
            }
            Request::ListChannels => {
                // Only the channels the principal has a permission on: it
                // must not learn the others' names.
                let channels = visible_to(&self.principal().permissions, self.broker.channel_infos());
                self.respond(correlation_id, Response::Channels { channels }).await
            }
            Request::Stats => {
                let (counters, channels) = self.broker.stats_snapshot();
                let channels = visible_to(&self.principal().permissions, channels);
                self.respond(correlation_id, Response::Stats { counters, channels }).await
            }
        }
    }

    async fn hello(
        &mut self,
        correlation_id: u32,
        version_min: u16,
        version_max: u16,
        client_name: &str,
        auth_token: &[u8],
    ) -> Flow {
        if self.handshaken {
            return self.protocol_error(correlation_id, "HELLO sent twice".into());
        }
        // The newest version both sides speak.
        let version = version_max.min(PROTOCOL_VERSION);
        if version < version_min.max(PROTOCOL_VERSION_MIN) {
            let message = format!(
                "client asked for protocol versions {version_min}..={version_max}; this server speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}"
            );
            self.fail(correlation_id, ErrorCode::UnsupportedVersion, message);
            return Flow::Close;
        }
        let auth = Arc::clone(&self.broker.auth);
        let certificate_name = self.certificate_name.clone();
        let credential = auth_token.to_vec();
        let authenticated = if auth.verifies_hashes() {
            // An argon2 evaluation takes milliseconds of CPU and megabytes
            // of memory: on the blocking pool, a few at a time.
            let verifying = Arc::clone(&auth);
            match verifying.verifications.acquire().await {
                Ok(_permit) => {
                    tokio::task::spawn_blocking(move || auth.authenticate(&credential, certificate_name.as_deref()))
                        .await
                        .unwrap_or_else(|error| Err(format!("authentication failed: {error}")))
                }
                Err(_) => Err("the broker is stopping".into()),
            }
        } else {
            auth.authenticate(&credential, certificate_name.as_deref())
        };
        let principal = match authenticated {
            Ok(principal) => principal,
            Err(reason) => {
                Stats::add(&self.broker.stats.authentication_failures, 1);
                if let Some(held_back) = self.broker.stats.unauthorized_log.admit() {
                    tracing::warn!(peer = %self.peer, %reason, similar_refusals_not_logged = held_back, "refused a HELLO");
                }
                self.fail(correlation_id, ErrorCode::Unauthorized, "wrong or missing credential".into());
                return Flow::Close;
            }
        };
        match principal.usage.connect() {
            Ok(slot) => self._principal_slot = Some(slot),
            Err(limit) => {
                Stats::add(&self.broker.stats.connections_refused, 1);
                let message = format!("principal {} is at its max_connections = {limit}", principal.name);
                self.fail(correlation_id, ErrorCode::TooManyConnections, message);
                return Flow::Close;
            }
        }
        self.handshaken = true;
        self.version = version;
        tracing::debug!(
            peer = %self.peer, client = client_name, principal = principal.name, version, "handshake complete"
        );
        self.principal = Some(principal);
        let welcome = Response::Welcome {
            version,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            limits: self.broker.limits,
        };
        self.respond(correlation_id, welcome).await
    }

    async fn publish(
        &mut self,
        correlation_id: u32,
        channel: &str,
        partition: Option<u32>,
        producer: Option<ProducerSequence>,
        messages: Vec<Message>,
    ) -> Flow {
        let received_at = std::time::Instant::now();
        let stats = Arc::clone(&self.broker.stats);
        let Some(name) = self.channel_name(correlation_id, channel).await else {
            Stats::add(&stats.publishes_rejected_invalid_channel, 1);
            return Flow::Continue;
        };
        if !self.permitted(correlation_id, Operation::Publish, name.as_str(), "publish to channel").await
            || !self.may_create(correlation_id, &name).await
        {
            return Flow::Continue;
        }
        let message_bytes_max = self.broker.config.max_message_bytes as usize;
        for (index, message) in messages.iter().enumerate() {
            if let Err(error) = message.validate(message_bytes_max) {
                Stats::add(&stats.publishes_rejected_too_large, 1);
                return self
                    .error(correlation_id, ErrorCode::MessageTooLarge, format!("message {index}: {error}"))
                    .await;
            }
        }
        // Checked here although the channel's writer checks it too: a
        // refused publish must not create the channel it names.
        if let Some(producer) = producer
            && producer.sequence.checked_add(messages.len() as u64).is_none()
        {
            let message = format!("sequence {} + {} overflows u64", producer.sequence, messages.len());
            return self.error(correlation_id, ErrorCode::InvalidRequest, message).await;
        }
        // The partition, chosen before the channel is looked up (and so
        // auto-created): a publish refused for its partition creates
        // nothing.
        let replicated = self.broker.replicas().and_then(|replicas| {
            let count = replicas.partition_count(name.as_str())?;
            Some((replicas, count))
        });
        let count = match (&replicated, self.broker.store.channel(&name)) {
            (Some((_, count)), _) => *count,
            (None, Some(channel)) => channel.partition_count(),
            (None, None) => self.broker.store.partitions_for_new(&name),
        };
        let partition = match self.choose_partition(partition, producer.is_some(), &messages, count) {
            Ok(partition) => partition,
            Err((code, message)) => {
                return self.error(correlation_id, code, format!("channel {name}: {message}")).await;
            }
        };
        let window = self.broker.limits.max_inflight_publishes;
        if self.inflight_publishes.load(Ordering::Acquire) >= window {
            Stats::add(&stats.publishes_rejected_inflight, 1);
            let message =
                format!("{window} publishes are already unanswered on this connection (max_inflight_publishes)");
            return self.error(correlation_id, ErrorCode::InflightLimitExceeded, message).await;
        }
        let body_bytes: u64 = messages.iter().map(|m| crate::protocol::wire::message_inflight_bytes(m) as u64).sum();
        let bytes_max = self.broker.config.max_inflight_publish_bytes;
        let bytes_in_flight = self.inflight_publish_bytes.load(Ordering::Acquire);
        // One publish alone is always let through, so that a legal frame can
        // never be refused forever.
        if bytes_in_flight > 0 && bytes_in_flight + body_bytes > bytes_max {
            Stats::add(&stats.publishes_rejected_inflight, 1);
            let message = format!(
                "this publish of {body_bytes} bytes would exceed max_inflight_publish_bytes = {bytes_max} unanswered on this connection"
            );
            return self.error(correlation_id, ErrorCode::InflightLimitExceeded, message).await;
        }
        // Charged last of what needs no disk, and before the channel is
        // opened (a refused publish creates no channel); over quota it is
        // not queued, only refused with the time until it fits. Once one
        // publish is refused, the later ones of this connection are
        // refused too, uncharged, until it would fit: a pipelining client
        // resends in order, and a later publish let through meanwhile
        // would spend quota only to be refused as out of order.
        let usage = Arc::clone(&self.principal().usage);
        let now = Instant::now();
        let admitted = match self.publish_throttled_until {
            Some(until) if now < until => Err(until - now),
            _ if !usage.limits_publish() => Ok(()),
            _ => usage.admit_publish(messages.len() as u64, body_bytes),
        };
        if let Err(wait) = admitted {
            self.publish_throttled_until = Some(now + wait);
            Stats::add(&stats.publishes_rejected_quota, 1);
            let principal = crate::security::principal_label(self.principal()).to_owned();
            metrics::counter!("weir_quota_throttled_total", "principal" => principal, "quota" => "publish")
                .increment(1);
            // Rounded up: a client that waits exactly this long finds the
            // publish fits.
            let retry_after_ms = u32::try_from(wait.as_nanos().div_ceil(1_000_000).max(1)).unwrap_or(u32::MAX);
            let backpressure =
                Response::Backpressure { channel: name.to_string(), reason: BackpressureReason::Quota, retry_after_ms };
            return self.respond(correlation_id, backpressure).await;
        }
        if let Some((replicas, _)) = replicated {
            let Ok(permit) = self.responses.clone().reserve_owned().await else { return Flow::Close };
            let reply = self.publish_reply(permit, received_at, correlation_id, body_bytes, window);
            let publish = crate::cluster::Publish {
                messages,
                producer: producer.map(|producer| (producer.producer_id, producer.sequence)),
                timestamp_us: crate::storage::now_us(),
            };
            let group = crate::cluster::GroupId { channel: name.to_string(), partition };
            let answer = Box::new(move |outcome: Result<crate::cluster::PublishApplied, ReplicatedPublishError>| {
                reply.send(match outcome {
                    Ok(applied) => Response::PublishAck {
                        partition,
                        first_offset: applied.first_offset,
                        count: applied.count as u32,
                        timestamp_us: applied.timestamp_us,
                        duplicate: applied.duplicate,
                    },
                    Err(ReplicatedPublishError::Refused(refused)) => {
                        Response::Error { code: refused.code, message: refused.message }
                    }
                    Err(error @ ReplicatedPublishError::NotLeader { .. }) => {
                        Response::Error { code: ErrorCode::NotLeader as u16, message: error.to_string() }
                    }
                    Err(error @ ReplicatedPublishError::OutcomeUnknown(_)) => {
                        Response::Error { code: ErrorCode::OutcomeUnknown as u16, message: error.to_string() }
                    }
                });
            });
            replicas.submit(&group, publish, answer).await;
            return Flow::Continue;
        }
        // In cluster mode, a replicated channel's local copy that the
        // metadata group no longer lists: deleted, its files about to go.
        if self.is_unlisted_replicated_copy(&name) {
            let message = format!("channel {name} was a replicated channel and has been deleted");
            return self.error(correlation_id, ErrorCode::UnknownChannel, message).await;
        }
        let channel = match self.open_channel(&name) {
            Ok(channel) => channel,
            Err(error) => return self.channel_error(correlation_id, &name, error).await,
        };
        let handle = match channel.partition(partition) {
            Ok(handle) => handle,
            Err(error) => return self.storage_error(correlation_id, error).await,
        };
        let Ok(permit) = self.responses.clone().reserve_owned().await else { return Flow::Close };
        let reply = self.publish_reply(permit, received_at, correlation_id, body_bytes, window);
        let mut request = AppendRequest { messages, producer, reply };
        // Stored on this task when the partition's writer is idle; a
        // deleted channel's or a stopping writer's publish goes the queue's
        // way, which answers it as before.
        if !channel.deleted.is_cancelled() && !handle.appends.is_closed() {
            match handle.writer.append_inline(request).await {
                Ok(()) => return Flow::Continue,
                Err(queued) => request = queued,
            }
        }
        match handle.writer.enqueue(&handle.appends, request) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(request)) => {
                Stats::add(&stats.publishes_rejected_backpressure, 1);
                request.reply.send(Response::Backpressure {
                    channel: name.to_string(),
                    reason: BackpressureReason::ChannelQueueFull,
                    retry_after_ms: BACKPRESSURE_RETRY_AFTER_MS,
                });
            }
            Err(mpsc::error::TrySendError::Closed(request)) => {
                let message = "the broker is shutting down; nothing was stored".to_owned();
                request.reply.send(Response::Error { code: ErrorCode::ShuttingDown as u16, message });
            }
        }
        Flow::Continue
    }

    /// Takes a slot of the publish window for one publish, and the answer
    /// that gives it back.
    fn publish_reply(
        &self,
        permit: mpsc::OwnedPermit<Outbound>,
        received_at: std::time::Instant,
        correlation_id: u32,
        body_bytes: u64,
        window: u32,
    ) -> Reply {
        let stats = &self.broker.stats;
        self.inflight_publish_bytes.fetch_add(body_bytes, Ordering::AcqRel);
        let inflight = self.inflight_publishes.fetch_add(1, Ordering::AcqRel) + 1;
        assert!(inflight <= window, "the publish window is checked before a slot is taken");
        Stats::high_water(&stats.inflight_publishes_high_water, inflight as u64);
        stats.inflight_publishes.fetch_add(1, Ordering::Relaxed);
        Reply {
            permit: Some(permit),
            received_at,
            stats: Arc::clone(stats),
            correlation_id,
            inflight: Arc::clone(&self.inflight_publishes),
            inflight_bytes: Arc::clone(&self.inflight_publish_bytes),
            body_bytes,
            version: self.version,
            outbox: Arc::clone(&self.outbox),
            // Only when no further request is already read and waiting: an
            // idle connection's answer goes out at once, while a busy one's
            // are gathered by the writer task, several to a write. Never
            // once queued for the partition's writer task.
            write_at_once: self.reader.buffer().is_empty(),
        }
    }

    /// The partition a publish goes to: the one it names; else the one its
    /// keyed messages map to (Kafka's partitioner); else, without keys, the
    /// next one round robin, the whole frame together. A version 1
    /// connection always publishes to partition 0.
    fn choose_partition(
        &mut self,
        requested: Option<u32>,
        idempotent: bool,
        messages: &[Message],
        count: u32,
    ) -> Result<u32, (ErrorCode, String)> {
        if self.version < 2 {
            return Ok(0);
        }
        if let Some(partition) = requested {
            if partition >= count {
                return Err((ErrorCode::UnknownPartition, format!("no partition {partition}: partitions 0..{count}")));
            }
            return Ok(partition);
        }
        if count == 1 {
            return Ok(0);
        }
        // A producer's sequence numbers are counted per partition: publishes
        // the broker spread over partitions would break them, and a retry
        // could land where its original is not remembered.
        if idempotent {
            return Err((
                ErrorCode::InvalidRequest,
                format!(
                    "an idempotent publish (producer id and sequence) names its partition on a channel of {count} partitions: sequences are per partition"
                ),
            ));
        }
        let mut keyed = messages
            .iter()
            .filter(|message| !message.key.is_empty())
            .map(|message| crate::partitioner::partition_for_key(&message.key, count));
        match keyed.next() {
            Some(first) => match keyed.find(|&partition| partition != first) {
                None => Ok(first),
                Some(other) => Err((
                    ErrorCode::InvalidRequest,
                    format!(
                        "the keys of this batch map to partitions {first} and {other}; a batch is stored in one partition: batch per partition, or name the partition"
                    ),
                )),
            },
            None => {
                let partition = self.next_keyless_partition % count;
                self.next_keyless_partition = self.next_keyless_partition.wrapping_add(1);
                Ok(partition)
            }
        }
    }

    async fn subscribe(&mut self, correlation_id: u32, request: SubscribeRequest) -> Flow {
        let SubscribeRequest { subscription_id, channel, partition, start, durable_name, group, max_inflight } =
            request;
        // Subscriptions the server ended itself (after a storage error) no
        // longer count.
        self.subscriptions.retain(|_, subscription| !subscription.cancel.is_cancelled());
        let count_max = self.broker.limits.max_subscriptions_per_connection as usize;
        if self.subscriptions.len() >= count_max {
            let message =
                format!("this connection already has max_subscriptions_per_connection = {count_max} subscriptions");
            return self.error(correlation_id, ErrorCode::TooManySubscriptions, message).await;
        }
        if self.subscriptions.contains_key(&subscription_id) {
            let message = format!("subscription id {subscription_id} is already in use on this connection");
            return self.error(correlation_id, ErrorCode::SubscriptionExists, message).await;
        }
        if max_inflight == 0 {
            return self
                .error(correlation_id, ErrorCode::InvalidRequest, "max_inflight must be at least 1".into())
                .await;
        }
        let Some(name) = self.channel_name(correlation_id, &channel).await else { return Flow::Continue };
        if !self.permitted(correlation_id, Operation::Subscribe, name.as_str(), "subscribe to channel").await {
            return Flow::Continue;
        }
        if let Some(group) = &group {
            // Group names follow the channel names' rule: they are not
            // paths today, but never may they become a way out of the data
            // directory, nor a way to smuggle odd bytes into logs and labels.
            if let Err(error) = ChannelName::new(group) {
                let message = format!("group name: {error}");
                return self.error(correlation_id, ErrorCode::InvalidRequest, message).await;
            }
            if !self.permitted(correlation_id, Operation::Group, group, "join consumer group").await {
                return Flow::Continue;
            }
        }
        // A durable name holds a stored position, as a group does: whoever
        // may use it may move it, so it needs the same permission.
        if let Some(durable) = &durable_name
            && !self.permitted(correlation_id, Operation::Group, durable, "use durable subscription name").await
        {
            return Flow::Continue;
        }
        if !self.may_create(correlation_id, &name).await {
            return Flow::Continue;
        }
        if let Some(group) = group {
            let request = GroupJoin { subscription_id, name, partition, start, durable_name, group, max_inflight };
            return self.join_group(correlation_id, request).await;
        }
        // A refused request creates nothing: everything that would refuse
        // this one is checked before the channel is looked up (and so
        // auto-created), against the channel it would become if it does not
        // exist yet.
        if let Some(refused) = self.unhosted_replicated(&name, partition) {
            // Every partition, and no node holds them all: nowhere to send
            // it (one subscription per partition, where each is led).
            if partition.is_none()
                && self.broker.replicas().is_some_and(|replicas| !replicas.any_holds_every_partition(name.as_str()))
            {
                let message = format!(
                    "no node holds a replica of every partition of channel {name}: subscribe to each partition where it is led"
                );
                return self.error(correlation_id, ErrorCode::InvalidRequest, message).await;
            }
            return self.error(correlation_id, ErrorCode::NotLeader, refused).await;
        }
        let exists = self.broker.store.channel(&name).is_some() || self.broker.store.unavailable(&name).is_some();
        let count = match self.broker.store.channel(&name) {
            Some(channel) => channel.partition_count(),
            None => self.broker.store.partitions_for_new(&name),
        };
        let partitions: Vec<u32> = match partition {
            Some(partition) if partition >= count => {
                let message = format!("channel {name} has no partition {partition}: it has partitions 0..{count}");
                return self.error(correlation_id, ErrorCode::UnknownPartition, message).await;
            }
            Some(partition) => vec![partition],
            None if count > 1 && matches!(start, StartPosition::Offset(_)) => {
                let message = format!(
                    "an explicit start offset names one partition, and channel {name} has {count}: subscribe to one partition, or start at earliest, latest or a time"
                );
                return self.error(correlation_id, ErrorCode::InvalidRequest, message).await;
            }
            None => (0..count).collect(),
        };
        let stored: Vec<Option<u64>> = partitions
            .iter()
            .map(|&partition| {
                durable_name.as_deref().and_then(|durable| self.broker.offsets.get(name.as_str(), durable, partition))
            })
            .collect();
        if let StartPosition::Offset(offset @ 1..) = start
            && stored.iter().all(Option::is_none)
            && self.broker.auto_creates()
            && !exists
        {
            let message = format!(
                "offset {offset} is out of range for channel {name}: it does not exist, so it would hold offsets 0..0"
            );
            return self.error(correlation_id, ErrorCode::OffsetOutOfRange, message).await;
        }
        // A new durable name past the broker's limit (checked again when it
        // is recorded, should another connection take the last slot first).
        if durable_name.is_some()
            && stored.iter().any(Option::is_none)
            && let Err(error) = self.broker.offsets.has_room()
        {
            return self.error(correlation_id, ErrorCode::TooManySubscriptions, error.to_string()).await;
        }
        let handle = match self.open_channel(&name) {
            Ok(handle) => handle,
            Err(error) => return self.channel_error(correlation_id, &name, error).await,
        };
        let mut starts = Vec::with_capacity(partitions.len());
        for (&partition, &stored) in partitions.iter().zip(&stored) {
            let partition_handle = match handle.partition(partition) {
                Ok(partition_handle) => partition_handle,
                Err(error) => return self.storage_error(correlation_id, error).await,
            };
            let first_offset =
                match first_offset(&self.broker, &partition_handle.log, stored, start, durable_name.as_deref()) {
                    Ok(first_offset) => first_offset,
                    Err((code, message)) => return self.error(correlation_id, code, message).await,
                };
            starts.push((partition_handle, stored, first_offset));
        }
        if let Some(durable) = &durable_name {
            for (partition_handle, stored, first_offset) in &starts {
                let channel = ChannelRef { name: name.as_str(), deleted: &handle.deleted };
                if stored.is_none()
                    && let Err(error) =
                        self.broker.offsets.record(&channel, durable, partition_handle.log.partition(), *first_offset)
                {
                    return self.error(correlation_id, ErrorCode::TooManySubscriptions, error.to_string()).await;
                }
            }
        }
        let subscribed = Response::Subscribed {
            subscription_id,
            partitions: starts
                .iter()
                .map(|(handle, _, first_offset)| (handle.log.partition(), *first_offset))
                .collect(),
        };
        if let Flow::Close = self.respond(correlation_id, subscribed).await {
            return Flow::Close;
        }
        let cancel = self.cancel.child_token();
        let factory = self.cursor_factory(subscription_id, &name, durable_name, None, max_inflight);
        let mut cursors = HashMap::with_capacity(starts.len());
        for (partition_handle, _, first_offset) in starts {
            let cursor = factory.start(&partition_handle, first_offset, &cancel, &handle.deleted);
            cursors.insert(partition_handle.log.partition(), cursor);
        }
        let partitions = Arc::new(std::sync::Mutex::new(cursors));
        if partition.is_none() {
            let placed_elsewhere = self
                .broker
                .replicas()
                .filter(|replicas| replicas.is_replicated(name.as_str()))
                .map(|replicas| Box::pin(replicas.placed_elsewhere(name.as_str().to_string())) as PlacedElsewhere);
            let follower = PartitionFollower {
                factory,
                channel: handle,
                cursors: Arc::clone(&partitions),
                cancel: cancel.clone(),
            };
            tokio::spawn(follower.run(placed_elsewhere));
        }
        self.subscriptions.insert(subscription_id, SubscriptionHandle { cancel, partitions });
        Flow::Continue
    }

    /// Joins a consumer group: the broker assigns the member partitions
    /// over time (ASSIGNED and REVOKED notices); SUBSCRIBED names none.
    async fn join_group(&mut self, correlation_id: u32, request: GroupJoin) -> Flow {
        let GroupJoin { subscription_id, name, partition, start, durable_name, group, max_inflight } = request;
        let refusal = if partition.is_some() {
            Some("a consumer group member is assigned its partitions by the broker: name none".to_owned())
        } else if durable_name.is_some() {
            Some("a consumer group keeps its own positions: a group member takes no durable name".to_owned())
        } else if matches!(start, StartPosition::Offset(_)) {
            Some("an explicit start offset names one partition; a group starts at earliest, latest or a time where it has no position".to_owned())
        } else {
            None
        };
        if let Some(message) = refusal {
            return self.error(correlation_id, ErrorCode::InvalidRequest, message).await;
        }
        // One node coordinates a replicated channel's group: the others
        // send its members there (docs/REPLICATION.md, "Consumer groups
        // across nodes").
        let mut coordinator_moved = None;
        if let Some(replicas) = self.broker.replicas().filter(|replicas| replicas.is_replicated(name.as_str())) {
            match replicas.group_coordinator_elsewhere(name.as_str(), &group) {
                Ok(None) => {
                    let moved = replicas.coordinator_moved(name.as_str().to_string(), group.clone());
                    coordinator_moved = Some(Box::pin(moved) as super::member::CoordinatorMoved);
                }
                Ok(Some(elsewhere)) => {
                    return self.error(correlation_id, ErrorCode::NotLeader, elsewhere.to_string()).await;
                }
                Err(message) => return self.error(correlation_id, ErrorCode::InvalidRequest, message).await,
            }
        }
        // A member may be assigned any partition: its node must hold a
        // replica of each. The coordinator's placement does, but its
        // partitions' groups may still be starting: it names itself, for
        // the member to come back after a pause.
        if let Some(refused) = self.unhosted_replicated(&name, None) {
            let refused = match (&coordinator_moved, self.broker.replicas()) {
                (Some(_), Some(replicas)) => replicas.this_node_elsewhere().to_string(),
                _ => refused,
            };
            return self.error(correlation_id, ErrorCode::NotLeader, refused).await;
        }
        let handle = match self.open_channel(&name) {
            Ok(handle) => handle,
            Err(error) => return self.channel_error(correlation_id, &name, error).await,
        };
        let member = match self.broker.groups.join(&name, || handle.partition_count(), &group) {
            Ok(member) => member,
            Err(error) => return self.error(correlation_id, ErrorCode::TooManySubscriptions, error.to_string()).await,
        };
        let subscribed = Response::Subscribed { subscription_id, partitions: Vec::new() };
        if let Flow::Close = self.respond(correlation_id, subscribed).await {
            return Flow::Close;
        }
        let cancel = self.cancel.child_token();
        let factory = self.cursor_factory(subscription_id, &name, None, Some(group), max_inflight);
        let cursors: Cursors = Arc::default();
        let config = &self.broker.config;
        let session_timeout = Duration::from_millis(config.group_session_timeout_ms);
        let task = MemberTask {
            member,
            factory,
            channel: handle,
            cursors: Arc::clone(&cursors),
            start,
            handover: Handover { ack_wait_max: session_timeout, poll_interval: GROUP_HANDOVER_POLL_INTERVAL },
            session_timeout,
            last_frame_ms: Arc::clone(&self.last_frame_ms),
            epoch: self.epoch,
            cancel: cancel.clone(),
        };
        tokio::spawn(task.run(coordinator_moved));
        self.subscriptions.insert(subscription_id, SubscriptionHandle { cancel, partitions: cursors });
        Flow::Continue
    }

    fn cursor_factory(
        &self,
        subscription_id: u32,
        channel: &ChannelName,
        durable_name: Option<String>,
        group: Option<String>,
        max_inflight: u32,
    ) -> CursorFactory {
        CursorFactory {
            broker: Arc::clone(&self.broker),
            deliveries: self.deliveries.clone(),
            version: self.version,
            subscription_id,
            channel: channel.clone(),
            durable_name,
            group,
            max_inflight,
            subscribe_quota: Some(&self.principal().usage)
                .filter(|usage| usage.subscribe_batch_bytes_max().is_some())
                .map(Arc::clone),
        }
    }

    async fn ack(&mut self, correlation_id: u32, subscription_id: u32, partition: u32, offset: u64) -> Flow {
        if self.subscriptions.get(&subscription_id).is_some_and(|s| s.cancel.is_cancelled()) {
            self.subscriptions.remove(&subscription_id);
        }
        let Some(subscription) = self.subscriptions.get(&subscription_id) else {
            return self.unknown_subscription(correlation_id, subscription_id).await;
        };
        let acked = {
            let cursors = lock_cursors(&subscription.partitions);
            cursors.get(&partition).map(|cursor| self.record_ack(cursor, offset))
        };
        match acked {
            Some(Ok(())) => Flow::Continue,
            Some(Err(error)) => self.error(correlation_id, ErrorCode::TooManySubscriptions, error.to_string()).await,
            None => {
                let message = format!("subscription {subscription_id} does not read partition {partition}");
                self.error(correlation_id, ErrorCode::UnknownSubscription, message).await
            }
        }
    }

    /// Moves a cursor's acknowledged floor (cumulative, and only over what
    /// was delivered) and records it for a durable subscription or group.
    fn record_ack(&self, cursor: &PartitionCursor, offset: u64) -> Result<(), super::offsets::TooManyDurables> {
        let delivered_end = cursor.status.next_offset.load(Ordering::Relaxed);
        let floor = offset.saturating_add(1).min(delivered_end);
        if floor <= *cursor.ack_floor.borrow() {
            return Ok(());
        }
        // The position is stored before the floor moves: a group member's
        // task lets a revoked partition go when the floor reaches what was
        // sent, and its next owner starts from the stored position.
        let channel = ChannelRef { name: cursor.status.channel.as_str(), deleted: &cursor.channel_deleted };
        let partition = cursor.status.partition;
        match (&cursor.status.durable_name, &cursor.status.group) {
            (_, Some(group)) => self.broker.offsets.record_group(&channel, group, partition, floor)?,
            (Some(durable), None) => self.broker.offsets.record(&channel, durable, partition, floor)?,
            (None, None) => {}
        }
        cursor.status.ack_floor.store(floor, Ordering::Relaxed);
        cursor.ack_floor.send_modify(|current| *current = floor.max(*current));
        Ok(())
    }

    async fn fetch(
        &mut self,
        correlation_id: u32,
        channel: &str,
        partition: u32,
        offset: u64,
        max_messages: u32,
        max_bytes: u32,
    ) -> Flow {
        let Some(name) = self.channel_name(correlation_id, channel).await else { return Flow::Continue };
        if !self.permitted(correlation_id, Operation::Subscribe, name.as_str(), "fetch from channel").await {
            return Flow::Continue;
        }
        let Some(channel) = self.broker.store.channel(&name) else {
            if let Some(error) = self.broker.store.unavailable(&name) {
                return self.storage_error(correlation_id, error).await;
            }
            return self
                .error(correlation_id, ErrorCode::UnknownChannel, format!("channel {name} does not exist"))
                .await;
        };
        let log = match channel.partition(partition) {
            Ok(log) => log,
            Err(error) => return self.storage_error(correlation_id, error).await,
        };
        let config = &self.broker.config;
        let usage = Arc::clone(&self.principal().usage);
        let quota_bytes_max = usage.subscribe_batch_bytes_max().unwrap_or(u64::MAX);
        let max_bytes = (max_bytes as u64).min(config.delivery_batch_bytes).min(quota_bytes_max) as usize;
        let max_records = (max_messages as u64).clamp(1, config.max_inflight_deliveries);
        match log.read_bounded(offset, max_bytes.max(1), max_records) {
            Ok(batch) => {
                // The subscribe quota covers fetches too: the answer waits
                // (at most a fraction of a second of quota per fetch).
                usage.subscribe_bytes(batch.records.len() as u64).await;
                let head = crate::protocol::fetch_result_head(
                    correlation_id,
                    batch.next_offset,
                    batch.count as u32,
                    batch.records.len(),
                );
                self.send(Outbound::Records { head, records: batch.records }).await
            }
            Err(error) => self.storage_error(correlation_id, error).await,
        }
    }

    /// The connection's principal. Requests are handled only after HELLO,
    /// which sets it.
    fn principal(&self) -> &Arc<Principal> {
        self.principal.as_ref().expect("requests are handled only after HELLO, which sets the principal")
    }

    /// Whether the principal may do `operation` on `name` (a channel, or a
    /// group for [`Operation::Group`]); if not, refuses the request with
    /// `Unauthorized`, naming what was asked and never whether the channel
    /// exists, and counts and logs (rate-limited) the refusal.
    async fn permitted(&mut self, correlation_id: u32, operation: Operation, name: &str, what: &str) -> bool {
        let principal = Arc::clone(self.principal());
        if principal.permissions.allows(operation, name) {
            return true;
        }
        let stats = &self.broker.stats;
        Stats::add(&stats.unauthorized, 1);
        let label = crate::security::principal_label(&principal).to_owned();
        metrics::counter!("weir_unauthorized_total", "principal" => label, "operation" => operation.as_str())
            .increment(1);
        if let Some(held_back) = stats.unauthorized_log.admit() {
            tracing::warn!(
                peer = %self.peer, principal = principal.name, operation = operation.as_str(), name,
                similar_refusals_not_logged = held_back, "refused a request: no permission"
            );
        }
        let message = format!("principal {} may not {what} {name}", principal.name);
        let _ = self.error(correlation_id, ErrorCode::Unauthorized, message).await;
        false
    }

    /// A publish or subscribe that would create its channel (it does not
    /// exist, and `auto_create_channels` is on) also needs `admin` on it.
    /// Asked only after the principal's publish or subscribe permission on
    /// the name, so that it tells nothing to whom may not use the name.
    async fn may_create(&mut self, correlation_id: u32, name: &ChannelName) -> bool {
        // Most principals (and every one of a broker without credentials)
        // may: no store lookup on their publishes.
        if self.principal().permissions.allows(Operation::Admin, name.as_str()) {
            return true;
        }
        let would_create = self.broker.auto_creates()
            && self.broker.store.channel(name).is_none()
            && self.broker.store.unavailable(name).is_none();
        !would_create || self.permitted(correlation_id, Operation::Admin, name.as_str(), "create channel").await
    }

    /// A listing's channel: `Some(None)` for every channel (an empty
    /// name), `Some(Some(name))` for one, `None` when the name was refused
    /// (and answered so).
    async fn channel_filter(&mut self, correlation_id: u32, channel: &str) -> Option<Option<ChannelName>> {
        if channel.is_empty() {
            return Some(None);
        }
        self.channel_name(correlation_id, channel).await.map(Some)
    }

    /// A replicated channel's deletion or alteration that was not done.
    async fn admin_error(&mut self, correlation_id: u32, error: crate::cluster::AdminError) -> Flow {
        let code = match &error {
            crate::cluster::AdminError::UnknownChannel(_) => ErrorCode::UnknownChannel,
            crate::cluster::AdminError::Refused(_) => ErrorCode::InvalidRequest,
        };
        self.error(correlation_id, code, error.to_string()).await
    }

    /// For an admin request on a replicated channel's local copy that this
    /// node's metadata does not list (see `is_unlisted_replicated_copy`):
    /// the `UnknownChannel` message.
    fn unlisted_replicated_copy(&self, name: &ChannelName) -> Option<String> {
        self.is_unlisted_replicated_copy(name).then(|| {
            format!("channel {name} is not a replicated channel this node knows of (deleted, or not applied here yet)")
        })
    }

    /// Whether `name` is, in cluster mode, a replicated channel's local copy
    /// (call it once `is_replicated` said no: the metadata state does not
    /// list it, deleted or not applied yet on this node).
    fn is_unlisted_replicated_copy(&self, name: &ChannelName) -> bool {
        self.broker.replicas().is_some()
            && self.broker.store.channel(name).is_some_and(|channel| channel.settings().replicated == Some(true))
    }

    /// Whether `name` is a replicated channel (cluster mode).
    fn is_replicated(&self, name: &ChannelName) -> bool {
        self.broker.replicas().is_some_and(|replicas| replicas.is_replicated(name.as_str()))
    }

    /// For a read of partitions of a replicated channel (`None`: all of
    /// them) of which this node hosts no replica (so no log to read): the
    /// `NotLeader` message naming where the first of them is.
    fn unhosted_replicated(&self, name: &ChannelName, partition: Option<u32>) -> Option<String> {
        let replicas = self.broker.replicas()?;
        let count = replicas.partition_count(name.as_str())?;
        // A partition it does not have is refused as for any channel.
        let mut partitions = partition.map_or(0..count, |partition| partition..(partition + 1).min(count));
        let unhosted = partitions.find(|&partition| !replicas.hosts(name.as_str(), partition))?;
        // Every partition: a node that holds them all, if one does.
        let every = partition.is_none().then(|| replicas.holding_every_partition_elsewhere(name.as_str())).flatten();
        Some(every.unwrap_or_else(|| replicas.hosting_elsewhere(name.as_str(), unhosted)).to_string())
    }

    fn open_channel(&self, name: &ChannelName) -> Result<Arc<super::broker::ChannelHandle>, ChannelError> {
        let may_create = self.principal().permissions.allows(Operation::Admin, name.as_str());
        self.broker.channel_creating(name, may_create)
    }

    async fn channel_name(&mut self, correlation_id: u32, channel: &str) -> Option<ChannelName> {
        match ChannelName::new(channel) {
            Ok(name) => Some(name),
            Err(error) => {
                let _ = self.error(correlation_id, ErrorCode::InvalidChannelName, error.to_string()).await;
                None
            }
        }
    }

    /// Refuses a request whose channel or durable name is not UTF-8 the
    /// way a UTF-8 name outside the rules is refused: the rest of the frame
    /// decoded, so the connection is still in step and stays open.
    async fn name_not_utf8(&mut self, header: FrameHeader, field: NameField, message: String) -> Flow {
        let code = match field {
            NameField::Channel => {
                let is_publish =
                    header.frame_type == FrameType::Publish as u8 || header.frame_type == FrameType::PublishBatch as u8;
                if is_publish {
                    Stats::add(&self.broker.stats.publishes_rejected_invalid_channel, 1);
                }
                ErrorCode::InvalidChannelName
            }
            NameField::DurableName | NameField::Group => ErrorCode::InvalidRequest,
        };
        self.error(header.correlation_id, code, message).await
    }

    async fn channel_error(&mut self, correlation_id: u32, name: &ChannelName, error: ChannelError) -> Flow {
        match error {
            ChannelError::Unknown => {
                let message = if self.broker.auto_creates() {
                    format!("channel {name} does not exist (it was deleted meanwhile)")
                } else {
                    format!("channel {name} does not exist and auto_create_channels is off (always, in cluster mode)")
                };
                self.error(correlation_id, ErrorCode::UnknownChannel, message).await
            }
            ChannelError::Storage(error) => self.storage_error(correlation_id, error).await,
            ChannelError::ShuttingDown => {
                let message = "the broker is shutting down; nothing was done".to_owned();
                self.error(correlation_id, ErrorCode::ShuttingDown, message).await
            }
        }
    }

    async fn storage_error(&mut self, correlation_id: u32, error: StorageError) -> Flow {
        let code = super::storage_error_code(&error);
        // The disk failing is the operator's business too, not only the
        // client's (disk-full episodes are logged by the log itself).
        if code == ErrorCode::StorageError {
            super::log_storage_error(&self.broker.stats, &error, "request failed on a storage error");
        }
        self.error(correlation_id, code, error.to_string()).await
    }

    async fn unknown_subscription(&mut self, correlation_id: u32, subscription_id: u32) -> Flow {
        let message = format!("no subscription {subscription_id} on this connection");
        self.error(correlation_id, ErrorCode::UnknownSubscription, message).await
    }

    async fn error(&mut self, correlation_id: u32, code: ErrorCode, message: String) -> Flow {
        self.respond(correlation_id, Response::Error { code: code as u16, message }).await
    }

    async fn respond(&mut self, correlation_id: u32, response: Response) -> Flow {
        self.send(Outbound::Frame(response.encode_for(self.version, correlation_id))).await
    }

    async fn send(&mut self, outbound: Outbound) -> Flow {
        self.outbox.answer_queued();
        match self.responses.send(outbound).await {
            Ok(()) => Flow::Continue,
            Err(_) => {
                self.outbox.answer_taken();
                Flow::Close
            }
        }
    }

    /// Answers a violation that ends the connection.
    fn protocol_error(&mut self, correlation_id: u32, message: String) -> Flow {
        Stats::add(&self.broker.stats.protocol_errors, 1);
        tracing::debug!(peer = %self.peer, %message, "protocol error; closing the connection");
        self.fail(correlation_id, ErrorCode::ProtocolError, message);
        Flow::Close
    }

    fn frame_timed_out(&mut self, correlation_id: u32) -> Flow {
        let limit = self.broker.config.frame_timeout_ms;
        self.protocol_error(correlation_id, format!("frame not completed within frame_timeout_ms = {limit}"))
    }

    /// Queues a last error without waiting: the connection is closing, and
    /// a client that does not read must not hold it open.
    fn fail(&mut self, correlation_id: u32, code: ErrorCode, message: String) {
        let frame = Response::Error { code: code as u16, message }.encode_for(self.version, correlation_id);
        self.outbox.answer_queued();
        if self.responses.try_send(Outbound::Frame(frame)).is_err() {
            self.outbox.answer_taken();
        }
    }
}

/// A channel as a listing (LIST_CHANNELS, STATS) shows it.
trait ChannelListing {
    fn channel_name(&self) -> &str;
    /// Drops who reads it (durable and group names).
    fn hide_readers(&mut self);
}

impl ChannelListing for crate::protocol::ChannelInfo {
    fn channel_name(&self) -> &str {
        &self.name
    }

    fn hide_readers(&mut self) {
        self.subscriptions.clear();
    }
}

impl ChannelListing for crate::protocol::ChannelStats {
    fn channel_name(&self) -> &str {
        &self.name
    }

    fn hide_readers(&mut self) {
        self.subscriptions.clear();
    }
}

/// What a principal may see of a listing: only the channels it has a
/// permission on (it must not learn the others' names), and who reads a
/// channel only where it reads or administers it.
fn visible_to<T: ChannelListing>(permissions: &Permissions, channels: Vec<T>) -> Vec<T> {
    channels
        .into_iter()
        .filter(|channel| permissions.sees(channel.channel_name()))
        .map(|mut channel| {
            if !permissions.reads(channel.channel_name()) {
                channel.hide_readers();
            }
            channel
        })
        .collect()
}

/// Sends answers (first) and deliveries to the socket, flushing whenever
/// both queues are empty. Ends when every sender is gone, or when a write
/// stalls past `write_timeout` (a peer that does not read).
async fn write_loop(
    outbox: Arc<Outbox>,
    mut responses: mpsc::Receiver<Outbound>,
    mut deliveries: mpsc::Receiver<Delivery>,
    write_timeout: Duration,
    cancel: CancellationToken,
) {
    let (mut responses_open, mut deliveries_open) = (true, true);
    loop {
        // `None`: a delivery dropped unsent. It still goes through the flush
        // below: the frames written before it were not flushed while it was
        // queued, and may be the last ones for a long time.
        let (item, answer) = tokio::select! {
            biased;
            item = responses.recv(), if responses_open => match item {
                Some(item) => (Some(item), true),
                None => { responses_open = false; continue; }
            },
            item = deliveries.recv(), if deliveries_open => match item {
                // Checked here, right before the write, so that nothing of a
                // subscription is written after its end was queued.
                Some(delivery) if delivery.ended.is_cancelled() => (None, false),
                Some(delivery) => {
                    // Marked ended now, before its last frames can reach the
                    // client: a SUBSCRIBE reusing the id, sent on seeing its
                    // UNSUBSCRIBED, must find the id free. Nothing of it can
                    // follow them (it queues nothing after its last frames),
                    // and an answer to that SUBSCRIBE is written after them.
                    if delivery.ends_subscription {
                        delivery.ended.cancel();
                    }
                    (Some(delivery.outbound), false)
                }
                None => { deliveries_open = false; continue; }
            },
            else => break,
        };
        let mut writer = outbox.lock().await;
        let written = timeout(write_timeout, async {
            match item {
                Some(Outbound::Frame(frame)) => writer.write_all(&frame).await?,
                Some(Outbound::Records { head, records }) => {
                    writer.write_all(&head).await?;
                    write_all_slices(&mut *writer, records.slices()).await?;
                }
                None => {}
            }
            // In the buffer now, ahead of any answer written at once.
            if answer {
                outbox.answer_taken();
            }
            if responses.is_empty() && deliveries.is_empty() {
                writer.flush().await?;
            }
            std::io::Result::Ok(())
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            // The peer is gone or not reading: stop the whole connection.
            // A timed-out write may have stopped mid-frame: nothing may
            // follow it, and the socket's sending side is shut.
            outbox.close(&writer);
            let _ = writer.get_mut().shutdown().now_or_never();
            cancel.cancel();
            return;
        }
        drop(writer);
    }
    let _ = timeout(write_timeout, async {
        let mut writer = outbox.lock().await;
        outbox.close(&writer);
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    })
    .await;
}

/// Slices handed to one vectored write at most (Linux's `IOV_MAX` is 1024).
const WRITE_SLICES_MAX: usize = 64;

/// Writes `slices` back to back, vectored: a buffered writer copies what
/// fits its buffer and hands larger runs to the socket as they are, so the
/// records of many small batches are not copied one by one.
async fn write_all_slices<W: AsyncWrite + Unpin>(writer: &mut W, slices: &[Bytes]) -> std::io::Result<()> {
    let mut index = 0;
    let mut skip = 0;
    while index < slices.len() {
        let window: Vec<std::io::IoSlice<'_>> = slices[index..]
            .iter()
            .take(WRITE_SLICES_MAX)
            .enumerate()
            .map(|(i, slice)| std::io::IoSlice::new(if i == 0 { &slice[skip..] } else { slice }))
            .collect();
        let mut written = writer.write_vectored(&window).await?;
        if written == 0 && window.iter().any(|slice| !slice.is_empty()) {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Past the slices written whole, into the one written in part.
        while index < slices.len() && written >= slices[index].len() - skip {
            written -= slices[index].len() - skip;
            index += 1;
            skip = 0;
        }
        skip += written;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Takes at most `chunk` bytes per write, across slices when vectored.
    struct Trickle {
        written: Vec<u8>,
        chunk: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            slices: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for slice in slices {
                let take = slice.len().min(self.chunk - n);
                self.written.extend_from_slice(&slice[..take]);
                n += take;
                if n == self.chunk {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn slices_are_written_whole_and_in_order_through_partial_vectored_writes() {
        let slices: Vec<Bytes> =
            (0..200u32).map(|i| Bytes::from((0..(i % 13)).map(|j| (i + j) as u8).collect::<Vec<u8>>())).collect();
        let expected: Vec<u8> = slices.iter().flat_map(|slice| slice.iter().copied()).collect();
        for chunk in [1, 7, 64, 100_000] {
            let mut trickle = Trickle { written: Vec::new(), chunk };
            write_all_slices(&mut trickle, &slices).await.unwrap();
            assert_eq!(trickle.written, expected, "chunk {chunk}");
        }
    }
}
