//! One connection to a broker: the handshake, requests matched to answers
//! by correlation id, deliveries routed to their subscriptions, and
//! heartbeats. A writer task and a reader task share the socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::ClientError;
use crate::protocol::{
    FRAME_HEADER_BYTES, FrameHeader, Limits, Notice, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, Request, Response,
};
use crate::security::tls::{self, ClientTlsOptions, ReadHalf, WriteHalf};

/// Largest frame body the client accepts from a server.
pub const RESPONSE_BODY_BYTES_MAX: u32 = 256 * 1024 * 1024;
/// Requests queued for the writer task.
const COMMAND_QUEUE_DEPTH: usize = 1024;
/// How long to wait for the server's WELCOME.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The correlation id of HELLO. Requests use non-zero ids (0 marks what the
/// server sends unasked), and the writer task numbers the requests after
/// HELLO from here on.
const HELLO_CORRELATION_ID: u32 = 1;

/// What a subscription receives.
#[derive(Debug)]
pub(crate) enum SubscriptionEvent {
    Records {
        partition: u32,
        count: u32,
        records: Bytes,
    },
    Notice {
        partition: u32,
        notice: Notice,
    },
    /// The subscription ended: unsubscribed, a server error, or the
    /// connection was lost.
    Closed(ClientError),
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Response, ClientError>>>>>;
type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// Why a subscription ended, kept beside its event queue for when the
/// queue is too full to carry a `Closed` event: the subscriber reads it
/// once the queue has drained and ended.
pub(crate) type EndReason = Arc<OnceLock<ClientError>>;

/// Where a subscription's events go. The reader task never waits for a
/// subscription's queue: one subscriber that does not read must not stall
/// the answers and deliveries of everything else on the connection.
struct Route {
    events: mpsc::Sender<SubscriptionEvent>,
    ended: EndReason,
}

impl Route {
    /// Ends the subscription: the reason is kept, a `Closed` event is
    /// queued if there is room, and dropping the sender ends the queue.
    fn end(self, error: ClientError) {
        let _ = self.ended.set(error.clone());
        let _ = self.events.try_send(SubscriptionEvent::Closed(error));
    }
}

enum Command {
    Request { request: Request, reply: Option<oneshot::Sender<Result<Response, ClientError>>> },
}

/// How to connect: the name the broker logs, the credential HELLO carries,
/// and TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    pub client_name: String,
    /// The legacy shared token, or `name:token` for a user of the broker's
    /// credentials file. With mutual TLS and no token, the certificate's
    /// common name is the principal.
    pub auth_token: Option<String>,
    /// Connect over TLS (the broker's `tls_cert`), verifying the broker's
    /// certificate against the given CA or the system's roots.
    pub tls: Option<ClientTlsOptions>,
}

impl ConnectOptions {
    pub fn named(client_name: &str) -> ConnectOptions {
        ConnectOptions { client_name: client_name.to_owned(), ..ConnectOptions::default() }
    }
}

/// A handshaken connection. Cheap to clone; all clones share the socket.
#[derive(Clone)]
pub struct Connection {
    commands: mpsc::Sender<Command>,
    routes: Routes,
    limits: Limits,
    /// The protocol version agreed with the broker.
    version: u16,
    server_version: String,
    next_subscription_id: Arc<AtomicU32>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("server_version", &self.server_version).finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr` and performs the handshake.
    ///
    /// # Errors
    /// The connection or handshake failed, or the server refused it.
    pub async fn connect(addr: &str, client_name: &str) -> Result<Connection, ClientError> {
        Connection::connect_with_token(addr, client_name, None).await
    }

    /// As [`Connection::connect`], sending an auth token.
    ///
    /// # Errors
    /// As [`Connection::connect`].
    pub async fn connect_with_token(
        addr: &str,
        client_name: &str,
        auth_token: Option<&str>,
    ) -> Result<Connection, ClientError> {
        let options = ConnectOptions {
            client_name: client_name.to_owned(),
            auth_token: auth_token.map(str::to_owned),
            tls: None,
        };
        Connection::connect_with(addr, &options).await
    }

    /// Connects with every option: credential and TLS.
    ///
    /// # Errors
    /// As [`Connection::connect`]; also unusable TLS files, or a failed TLS
    /// handshake (`ClientError::Tls`). Under TLS 1.3 a client certificate
    /// the broker refuses shows only once the handshake is over, as the
    /// connection closing during HELLO (`Disconnected` or `Io`).
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Connection, ClientError> {
        // Bounded: a host that drops packets would otherwise hold a caller
        // (or a publisher trying its next node) for the system's timeout.
        let socket = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("TCP connect"))?
            .map_err(|source| ClientError::Connect { addr: addr.to_owned(), source: Arc::new(source) })?;
        let _ = socket.set_nodelay(true);
        let (read_half, write_half) = match &options.tls {
            None => tls::split_plain(socket),
            Some(tls_options) => {
                let tls_error = |error: String| ClientError::Tls(error);
                let connector = tls_options.connector().map_err(|error| tls_error(error.to_string()))?;
                let server_name = tls::server_name(addr).map_err(|error| tls_error(error.to_string()))?;
                let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, socket))
                    .await
                    .map_err(|_| ClientError::Timeout("TLS handshake"))?
                    .map_err(|error| tls_error(format!("TLS handshake with {addr} failed: {error}")))?;
                tls::split_tls(tokio_rustls::TlsStream::Client(stream))
            }
        };
        let mut reader = BufReader::with_capacity(64 * 1024, read_half);
        let mut writer = BufWriter::with_capacity(64 * 1024, write_half);
        let hello = Request::Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION,
            client_name: options.client_name.chars().take(255).collect(),
            auth_token: Bytes::from(options.auth_token.as_deref().unwrap_or("").as_bytes().to_vec()),
        };
        hello.check_lengths().map_err(ClientError::Invalid)?;
        writer.write_all(&hello.encode(HELLO_CORRELATION_ID)).await.map_err(ClientError::io)?;
        writer.flush().await.map_err(ClientError::io)?;
        // WELCOME has the same layout in every version.
        let (_, welcome) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_response(&mut reader, PROTOCOL_VERSION, None))
            .await
            .map_err(|_| ClientError::Timeout("handshake"))?
            .map_err(|error| match error {
                // Closed without a word: the likeliest causes are worth
                // naming, as the broker cannot.
                ClientError::Disconnected | ClientError::Io(_) => ClientError::HandshakeClosed {
                    addr: addr.to_owned(),
                    hint: if options.tls.is_some() {
                        "it may have refused the client certificate (mutual TLS)"
                    } else {
                        "a broker with TLS on closes plaintext connections: connect with TLS (--tls, --tls-ca)"
                    },
                },
                other => other,
            })?;
        let (version, server_version, limits) = match welcome {
            Response::Welcome { version, server_version, limits }
                if (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version) =>
            {
                (version, server_version, limits)
            }
            Response::Welcome { version, .. } => {
                return Err(ClientError::Protocol(format!(
                    "the broker chose protocol version {version}, which this client does not speak"
                )));
            }
            Response::Error { code, message } => return Err(ClientError::Server { code, message }),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let pending: Pending = Arc::default();
        let routes: Routes = Arc::default();
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_DEPTH);
        let heartbeat = Duration::from_millis(limits.heartbeat_interval_ms.max(10) as u64);
        let closed = CancellationToken::new();
        let unsubscribes = commands.downgrade();
        let liveness = Arc::new(Liveness::new());
        tokio::spawn(write_loop(
            writer,
            version,
            command_rx,
            Arc::clone(&pending),
            (heartbeat, Arc::clone(&liveness)),
            closed.clone(),
        ));
        let reading = Reading { version, pending, routes: Arc::clone(&routes), commands: unsubscribes, liveness };
        tokio::spawn(read_loop(reader, reading, heartbeat, closed));
        Ok(Connection {
            commands,
            routes,
            limits,
            version,
            server_version,
            next_subscription_id: Arc::new(AtomicU32::new(1)),
        })
    }

    /// The limits the server advertised.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The server's version string.
    /// The protocol version agreed with the broker (1: partition 0 only).
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// Sends a request and waits for its answer. An ERROR answer is
    /// returned as `ClientError::Server`.
    ///
    /// # Errors
    /// The server's error, or a lost connection.
    pub async fn request(&self, request: Request) -> Result<Response, ClientError> {
        let answer = self.send_request(request).await?;
        answer.await.map_err(|_| ClientError::Disconnected)?
    }

    /// Sends a request and returns a receiver for its answer, so that
    /// callers can pipeline.
    ///
    /// # Errors
    /// The connection is gone.
    pub(crate) async fn send_request(
        &self,
        request: Request,
    ) -> Result<oneshot::Receiver<Result<Response, ClientError>>, ClientError> {
        request.check_lengths().map_err(ClientError::Invalid)?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request { request, reply: Some(reply) })
            .await
            .map_err(|_| ClientError::Disconnected)?;
        Ok(answer)
    }

    /// Sends a request and returns a receiver for its answer without
    /// waiting for it: keep several requests in flight, then await each.
    /// The broker's limits (e.g. `max_inflight_publishes`) apply.
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn send_request_pipelined(
        &self,
        request: Request,
    ) -> Result<oneshot::Receiver<Result<Response, ClientError>>, ClientError> {
        self.send_request(request).await
    }

    /// Sends a request that has no answer (ACK).
    ///
    /// # Errors
    /// The connection is gone.
    pub(crate) async fn send_only(&self, request: Request) -> Result<(), ClientError> {
        request.check_lengths().map_err(ClientError::Invalid)?;
        self.commands.send(Command::Request { request, reply: None }).await.map_err(|_| ClientError::Disconnected)
    }

    /// Registers where deliveries for a new subscription go, and returns
    /// its id and where the reason it ended will be kept.
    pub(crate) fn route(&self, events: mpsc::Sender<SubscriptionEvent>) -> (u32, EndReason) {
        let id = self.next_subscription_id.fetch_add(1, Ordering::Relaxed);
        let ended = EndReason::default();
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Route { events, ended: Arc::clone(&ended) });
        (id, ended)
    }

    pub(crate) fn unroute(&self, subscription_id: u32) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&subscription_id);
    }
}

async fn read_response(
    reader: &mut BufReader<ReadHalf>,
    version: u16,
    liveness: Option<&Liveness>,
) -> Result<(u32, Response), ClientError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ClientError::Disconnected),
        Err(error) => return Err(ClientError::io(error)),
    }
    let header = FrameHeader::parse(&header).map_err(|error| ClientError::Protocol(error.to_string()))?;
    if header.body_len > RESPONSE_BODY_BYTES_MAX {
        return Err(ClientError::Protocol(format!(
            "server frame of {} bytes exceeds the client limit",
            header.body_len
        )));
    }
    let mut body = vec![0u8; header.body_len as usize];
    // In pieces, each counted as a sign of life: a large frame on a slow
    // link is not a silent broker.
    let mut filled = 0;
    while filled < body.len() {
        let end = (filled + PROGRESS_CHUNK_BYTES).min(body.len());
        reader.read_exact(&mut body[filled..end]).await.map_err(ClientError::io)?;
        filled = end;
        if let Some(liveness) = liveness {
            liveness.progressed();
        }
    }
    let response = Response::decode_for(version, header.frame_type, Bytes::from(body))
        .map_err(|error| ClientError::Protocol(error.to_string()))?;
    Ok((header.correlation_id, response))
}

/// Writes requests until the commands end or the reader finds the
/// connection closed (`closed`); then every request still queued or newly
/// sent fails with `Disconnected` instead of waiting for an answer that
/// cannot come.
async fn write_loop(
    mut writer: BufWriter<WriteHalf>,
    version: u16,
    mut commands: mpsc::Receiver<Command>,
    pending: Pending,
    (heartbeat, liveness): (Duration, Arc<Liveness>),
    closed: CancellationToken,
) {
    // HELLO took the first id.
    let mut correlation_id = HELLO_CORRELATION_ID;
    loop {
        let command = tokio::select! {
            () = closed.cancelled() => break,
            command = commands.recv() => command,
            () = tokio::time::sleep(heartbeat) => {
                liveness.expect_answer();
                Some(Command::Request { request: Request::Ping, reply: None })
            }
        };
        let Some(Command::Request { request, reply }) = command else { break };
        correlation_id = correlation_id.wrapping_add(1).max(1);
        if reply.is_some() {
            liveness.expect_answer();
        }
        if let Some(reply) = reply {
            pending.lock().unwrap_or_else(|p| p.into_inner()).insert(correlation_id, reply);
            // The reader cancels `closed` before it fails what is pending:
            // a request registered after that is failed here.
            if closed.is_cancelled() {
                fail_pending(&pending);
                break;
            }
        }
        let frame = request.encode_for(version, correlation_id);
        let written = async {
            // In pieces; each after the first is a sign of life (the
            // broker reads a large frame). A small frame is not: the
            // kernel takes it into its buffers from a stopped broker too.
            for (index, piece) in frame.chunks(PROGRESS_CHUNK_BYTES).enumerate() {
                writer.write_all(piece).await?;
                if index > 0 {
                    liveness.progressed();
                }
            }
            if commands.is_empty() {
                writer.flush().await?;
            }
            std::io::Result::Ok(())
        };
        // A broker that stopped reading is given up by the reader: the
        // write is not waited for past that.
        let written = tokio::select! {
            written = written => written.is_ok(),
            () = closed.cancelled() => false,
        };
        if !written {
            break;
        }
    }
    // Dropping the receiver makes later sends fail at once; requests still
    // queued are dropped, which their callers see as `Disconnected`.
    commands.close();
    while let Ok(Command::Request { reply, .. }) = commands.try_recv() {
        if let Some(reply) = reply {
            let _ = reply.send(Err(ClientError::Disconnected));
        }
    }
    let _ = writer.shutdown().await;
}

fn fail_pending(pending: &Pending) {
    let waiting: Vec<_> = pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (_, reply) in waiting {
        let _ = reply.send(Err(ClientError::Disconnected));
    }
}

/// How many heartbeat intervals the broker may stay silent while this
/// client waits for an answer (to a request, or to its PING) before the
/// connection is taken for dead: a broker that stopped (SIGSTOP, a frozen
/// machine, a network cut that loses packets silently) otherwise holds its
/// callers forever.
pub const SILENT_HEARTBEATS_MAX: u32 = 3;
/// The least silence taken for a dead broker, whatever its heartbeat: a
/// slow disk may hold an answer a few seconds.
pub const SILENCE_LIMIT_MIN: Duration = Duration::from_secs(10);

/// Bytes read or written between two signs of life.
const PROGRESS_CHUNK_BYTES: usize = 64 * 1024;

/// When the broker was last heard from (or took bytes), and since when an
/// answer is expected, in milliseconds since the connection started.
struct Liveness {
    started: tokio::time::Instant,
    last_received_ms: std::sync::atomic::AtomicU64,
    /// 0: no answer awaited since the last frame received.
    expecting_since_ms: std::sync::atomic::AtomicU64,
}

impl Liveness {
    fn new() -> Liveness {
        Liveness {
            started: tokio::time::Instant::now(),
            last_received_ms: std::sync::atomic::AtomicU64::new(0),
            expecting_since_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        // At least 1, so that 0 keeps meaning "none".
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    /// A request or PING was sent: its answer's clock starts now, unless
    /// one already runs.
    fn expect_answer(&self) {
        let now = self.now_ms();
        let _ = self.expecting_since_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Bytes of a frame moved either way.
    fn progressed(&self) {
        self.last_received_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A whole frame arrived.
    fn heard(&self) {
        self.progressed();
        self.expecting_since_ms.store(0, Ordering::Relaxed);
    }

    /// Whether an answer is overdue: one is expected (requests pending, or
    /// a PING) and nothing moved for `limit` since it was (or since the
    /// last sign of life, if later).
    fn overdue(&self, requests_pending: bool, limit: Duration) -> bool {
        let expecting_since = self.expecting_since_ms.load(Ordering::Relaxed);
        if !requests_pending && expecting_since == 0 {
            return false;
        }
        let since = self.last_received_ms.load(Ordering::Relaxed).max(expecting_since);
        self.now_ms().saturating_sub(since) > limit.as_millis() as u64
    }
}

/// What the read loop shares with the rest of the connection.
struct Reading {
    version: u16,
    pending: Pending,
    routes: Routes,
    commands: mpsc::WeakSender<Command>,
    liveness: Arc<Liveness>,
}

async fn read_loop(mut reader: BufReader<ReadHalf>, reading: Reading, heartbeat: Duration, closed: CancellationToken) {
    let Reading { version, pending, routes, commands, liveness } = reading;
    let silence_limit = (heartbeat * SILENT_HEARTBEATS_MAX).max(SILENCE_LIMIT_MIN);
    let check_every = silence_limit / 4;
    // One timer for the connection's life, not one per frame.
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + check_every, check_every);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<ClientError> = None;
    let failure = loop {
        // The read is kept across the checks (dropping it inside a frame
        // would lose the stream's place).
        let read = read_response(&mut reader, version, Some(&liveness));
        tokio::pin!(read);
        let frame = loop {
            tokio::select! {
                // A frame already here counts before the clock does (after
                // this process itself was held up).
                biased;
                frame = &mut read => break frame,
                _ = checks.tick() => {
                    let requests_pending = !pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                    if liveness.overdue(requests_pending, silence_limit) {
                        break Err(ClientError::Timeout(
                            "an answer from the broker (silent for 3 heartbeat intervals, at least 10 s)",
                        ));
                    }
                }
            }
        };
        let (correlation_id, response) = match frame {
            Ok(frame) => frame,
            Err(error) => break error,
        };
        liveness.heard();
        let overflowed = match response {
            Response::Deliver { subscription_id, partition, count, records } => {
                route(&routes, subscription_id, SubscriptionEvent::Records { partition, count, records })
            }
            Response::Notice { subscription_id, partition, notice } => {
                route(&routes, subscription_id, SubscriptionEvent::Notice { partition, notice })
            }
            Response::Error { code, message } if correlation_id == 0 => {
                // Not an answer: the reason for what follows (an
                // UNSUBSCRIBED, or the connection closing).
                last_error = Some(ClientError::Server { code, message });
                None
            }
            Response::Unsubscribed { subscription_id } if correlation_id == 0 => {
                let error = last_error.take().unwrap_or(ClientError::Disconnected);
                let route = routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&subscription_id);
                if let Some(route) = route {
                    route.end(error);
                }
                None
            }
            response => {
                let reply = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&correlation_id);
                if let Some(reply) = reply {
                    let result = match response {
                        Response::Error { code, message } => Err(ClientError::Server { code, message }),
                        other => Ok(other),
                    };
                    let _ = reply.send(result);
                }
                None
            }
        };
        if let Some(subscription_id) = overflowed
            && let Some(commands) = commands.upgrade()
        {
            // Its deliveries have nowhere to go any more: end it at the
            // broker too (the answer matches no request and is dropped).
            let unsubscribe = Request::Unsubscribe { subscription_id };
            let _ = commands.try_send(Command::Request { request: unsubscribe, reply: None });
        }
    };
    tracing::debug!(error = %failure, "connection closed");
    closed.cancel();
    fail_pending(&pending);
    end_routes(&routes, &last_error.unwrap_or(ClientError::Disconnected));
}

/// Queues an event for its subscription without waiting. A subscription
/// whose queue is full is ended with `SubscriberOverflow`, and its id is
/// returned.
fn route(routes: &Routes, subscription_id: u32, event: SubscriptionEvent) -> Option<u32> {
    let mut routes = routes.lock().unwrap_or_else(|p| p.into_inner());
    let sent = routes.get(&subscription_id)?.events.try_send(event);
    match sent {
        Ok(()) => None,
        Err(TrySendError::Closed(_)) => {
            // The subscriber is gone (it unroutes itself as well).
            routes.remove(&subscription_id);
            None
        }
        Err(TrySendError::Full(_)) => {
            let route = routes.remove(&subscription_id)?;
            drop(routes);
            let capacity = route.events.max_capacity();
            tracing::warn!(subscription_id, capacity, "a subscriber's event queue is full; ending the subscription");
            route.end(ClientError::SubscriberOverflow { subscription_id, capacity });
            Some(subscription_id)
        }
    }
}

/// Ends every subscription of a closed connection, without waiting for
/// any subscriber to make room in its queue.
fn end_routes(routes: &Routes, error: &ClientError) {
    let ended: Vec<Route> = routes.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, route)| route).collect();
    for route in ended {
        route.end(error.clone());
    }
}
