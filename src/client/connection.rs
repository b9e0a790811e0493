//! One connection to a broker: the handshake, requests matched to answers
//! by correlation id, deliveries routed to their subscriptions, and
//! heartbeats. A writer task and a reader task share the socket. A request
//! is written straight to the socket by its caller when nothing is queued
//! or buffered ahead of it and the socket takes it at once (plain TCP
//! only): on an idle connection it then wakes no task before it is sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
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
/// The write buffer (and the largest request written at once).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
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

type Reply = Option<oneshot::Sender<Result<Response, ClientError>>>;

enum Command {
    Request { request: Request, reply: Reply },
}

/// The socket's sending side, shared by the writer task and the callers
/// that write a request at once.
struct Outbox {
    state: tokio::sync::Mutex<WriteState>,
    /// Requests queued for the writer task and not yet in its buffer: a
    /// request written at once must not overtake any of them (a
    /// publisher's batches carry sequence numbers in order).
    queued: AtomicUsize,
    /// Wakes the writer task to flush what a caller left in the buffer.
    flush: tokio::sync::Notify,
}

struct WriteState {
    writer: BufWriter<WriteHalf>,
    /// The last correlation id given out; ids are given under the lock, in
    /// the order the requests are written.
    correlation_id: u32,
    /// Set once the writer task stopped writing (a failed write may have
    /// stopped mid-frame): nothing more may be written at once.
    closed: bool,
}

impl WriteState {
    fn next_correlation_id(&mut self) -> u32 {
        self.correlation_id = self.correlation_id.wrapping_add(1).max(1);
        self.correlation_id
    }
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
    outbox: Arc<Outbox>,
    pending: Pending,
    /// Cancelled by the reader when the connection is lost.
    closed: CancellationToken,
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
        let socket = TcpStream::connect(addr)
            .await
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
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write_half);
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
        let (_, welcome) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_response(&mut reader, PROTOCOL_VERSION))
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
                        "a broker with TLS on closes plaintext connections: connect with TLS (--tls, --ca)"
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
        let outbox = Arc::new(Outbox {
            // HELLO took the first id.
            state: tokio::sync::Mutex::new(WriteState { writer, correlation_id: HELLO_CORRELATION_ID, closed: false }),
            queued: AtomicUsize::new(0),
            flush: tokio::sync::Notify::new(),
        });
        let writing = WriteLoop { outbox: Arc::clone(&outbox), version, pending: Arc::clone(&pending), heartbeat };
        tokio::spawn(writing.run(command_rx, closed.clone()));
        tokio::spawn(read_loop(
            reader,
            version,
            Arc::clone(&pending),
            Arc::clone(&routes),
            unsubscribes,
            closed.clone(),
        ));
        Ok(Connection {
            commands,
            outbox,
            pending,
            closed,
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
        self.send(request, Some(reply)).await?;
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
        self.send(request, None).await
    }

    /// Writes `request` at once when it can, else queues it for the writer
    /// task.
    async fn send(&self, request: Request, reply: Reply) -> Result<(), ClientError> {
        let reply = match self.try_write_now(&request, reply) {
            Ok(()) => return Ok(()),
            Err(reply) => reply,
        };
        self.outbox.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.commands.send(Command::Request { request, reply }).await;
        if sent.is_err() {
            self.outbox.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ClientError::Disconnected);
        }
        Ok(())
    }

    /// Writes `request` to the socket now, without waiting, if the
    /// connection is plain TCP, nothing queued or buffered comes before it,
    /// the writer task is not writing, and the frame fits the buffer. Gives
    /// `reply` back when it did not write.
    fn try_write_now(&self, request: &Request, reply: Reply) -> Result<(), Reply> {
        let Ok(mut state) = self.outbox.state.try_lock() else { return Err(reply) };
        // Checked under the lock: the writer task uncounts a request only
        // once it is in the buffer, under the same lock.
        if state.closed
            || !tls::is_plain(state.writer.get_ref())
            || self.outbox.queued.load(Ordering::Acquire) != 0
            || !state.writer.buffer().is_empty()
        {
            return Err(reply);
        }
        let correlation_id = state.next_correlation_id();
        let frame = request.encode_for(self.version, correlation_id);
        if frame.len() >= WRITE_BUFFER_BYTES {
            // The writer task gives it another id; ids only need to be
            // unique among the pending ones.
            return Err(reply);
        }
        if let Some(reply) = reply {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(correlation_id, reply);
            // The reader cancels `closed` before it fails what is pending:
            // a request registered after that is failed here.
            if self.closed.is_cancelled() {
                fail_pending(&self.pending);
                return Ok(());
            }
        }
        let sent = tls::try_write(state.writer.get_ref(), &frame).unwrap_or(0);
        if sent < frame.len() {
            // The rest (or all of it, the socket being full or failing, which
            // the writer task will meet) goes to the empty buffer, which takes
            // a frame smaller than itself without any I/O, and the writer
            // task flushes it.
            let copied = state.writer.write_all(&frame[sent..]).now_or_never();
            debug_assert!(matches!(copied, Some(Ok(()))), "a small write into an empty buffer completes at once");
            self.outbox.flush.notify_one();
        }
        Ok(())
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

async fn read_response(reader: &mut BufReader<ReadHalf>, version: u16) -> Result<(u32, Response), ClientError> {
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
    reader.read_exact(&mut body).await.map_err(ClientError::io)?;
    let response = Response::decode_for(version, header.frame_type, Bytes::from(body))
        .map_err(|error| ClientError::Protocol(error.to_string()))?;
    Ok((header.correlation_id, response))
}

/// What wakes the writer task.
enum Work {
    Queued(Command),
    Heartbeat,
    /// A caller left part of a request in the buffer.
    Flush,
}

/// The writer task: writes queued requests (and heartbeats), and flushes
/// what callers left in the buffer.
struct WriteLoop {
    outbox: Arc<Outbox>,
    version: u16,
    pending: Pending,
    heartbeat: Duration,
}

impl WriteLoop {
    /// Writes until the commands end or the reader finds the connection
    /// closed (`closed`); then every request still queued or newly sent
    /// fails with `Disconnected` instead of waiting for an answer that
    /// cannot come.
    async fn run(self, mut commands: mpsc::Receiver<Command>, closed: CancellationToken) {
        loop {
            let work = tokio::select! {
                () = closed.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => Work::Queued(command),
                    None => break,
                },
                () = self.outbox.flush.notified() => Work::Flush,
                () = tokio::time::sleep(self.heartbeat) => Work::Heartbeat,
            };
            let mut state = self.outbox.state.lock().await;
            let written = match work {
                Work::Queued(Command::Request { request, reply }) => {
                    let result = self.write(&mut state, request, reply, &closed).await;
                    // In the buffer now (or failed), ahead of any request
                    // written at once.
                    self.outbox.queued.fetch_sub(1, Ordering::AcqRel);
                    result
                }
                // Not queued, so not counted: it may be overtaken.
                Work::Heartbeat => self.write(&mut state, Request::Ping, None, &closed).await,
                Work::Flush => Ok(true),
            };
            let written = match written {
                Ok(true) => Ok(()),
                Ok(false) => break,
                Err(error) => Err(error),
            };
            let flushed = match written {
                Ok(()) if commands.is_empty() => state.writer.flush().await,
                other => other,
            };
            if flushed.is_err() {
                state.closed = true;
                break;
            }
        }
        // Dropping the receiver makes later sends fail at once; requests
        // still queued are dropped, which their callers see as
        // `Disconnected`.
        commands.close();
        while let Ok(Command::Request { reply, .. }) = commands.try_recv() {
            self.outbox.queued.fetch_sub(1, Ordering::AcqRel);
            if let Some(reply) = reply {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
        }
        let mut state = self.outbox.state.lock().await;
        state.closed = true;
        let _ = state.writer.shutdown().await;
    }

    /// Writes one request into the buffer. `Ok(false)`: the connection was
    /// found closed.
    async fn write(
        &self,
        state: &mut WriteState,
        request: Request,
        reply: Reply,
        closed: &CancellationToken,
    ) -> std::io::Result<bool> {
        let correlation_id = state.next_correlation_id();
        if let Some(reply) = reply {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(correlation_id, reply);
            // The reader cancels `closed` before it fails what is pending:
            // a request registered after that is failed here.
            if closed.is_cancelled() {
                fail_pending(&self.pending);
                return Ok(false);
            }
        }
        let frame = request.encode_for(self.version, correlation_id);
        state.writer.write_all(&frame).await?;
        Ok(true)
    }
}

fn fail_pending(pending: &Pending) {
    let waiting: Vec<_> = pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (_, reply) in waiting {
        let _ = reply.send(Err(ClientError::Disconnected));
    }
}

async fn read_loop(
    mut reader: BufReader<ReadHalf>,
    version: u16,
    pending: Pending,
    routes: Routes,
    commands: mpsc::WeakSender<Command>,
    closed: CancellationToken,
) {
    let mut last_error: Option<ClientError> = None;
    let failure = loop {
        let (correlation_id, response) = match read_response(&mut reader, version).await {
            Ok(frame) => frame,
            Err(error) => break error,
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrameType;
    use crate::record::Message;

    /// A broker stand-in: answers HELLO, then, after a pause that lets the
    /// client's socket fill, reads every frame and returns the payloads of
    /// the publishes in the order they arrived.
    async fn record_publish_order(listener: tokio::net::TcpListener, count: usize) -> Vec<Bytes> {
        let (mut socket, _) = listener.accept().await.unwrap();
        let (hello_id, _) = read_request(&mut socket).await;
        let limits = Limits {
            max_message_bytes: 1 << 20,
            max_frame_bytes: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_batch_records: 1000,
            max_inflight_publishes: 1 << 16,
            max_inflight_publish_bytes: 1 << 30,
            max_inflight_deliveries: 1000,
            max_subscriptions_per_connection: 10,
            heartbeat_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
        };
        let welcome = Response::Welcome { version: PROTOCOL_VERSION, server_version: "test".into(), limits };
        socket.write_all(&welcome.encode_for(PROTOCOL_VERSION, hello_id)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut payloads = Vec::new();
        while payloads.len() < count {
            if let (_, Request::Publish { message, .. }) = read_request(&mut socket).await {
                payloads.push(message.payload);
            }
        }
        payloads
    }

    async fn read_request(socket: &mut TcpStream) -> (u32, Request) {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        socket.read_exact(&mut header).await.unwrap();
        let header = FrameHeader::parse(&header).unwrap();
        let mut body = vec![0u8; header.body_len as usize];
        socket.read_exact(&mut body).await.unwrap();
        let version = if header.frame_type == FrameType::Hello as u8 { PROTOCOL_VERSION_MIN } else { PROTOCOL_VERSION };
        (header.correlation_id, Request::decode_for(version, header.frame_type, Bytes::from(body)).unwrap())
    }

    #[tokio::test]
    async fn a_request_is_written_at_once_only_with_nothing_ahead_of_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _server = tokio::spawn(record_publish_order(listener, usize::MAX));
        let connection = Connection::connect(&addr, "rules-test").await.unwrap();
        let written = |connection: &Connection| connection.try_write_now(&Request::Ping, None).is_ok();
        assert!(written(&connection), "an idle connection writes at once");
        // Not past a request queued for the writer task...
        connection.outbox.queued.fetch_add(1, Ordering::AcqRel);
        assert!(!written(&connection));
        connection.outbox.queued.fetch_sub(1, Ordering::AcqRel);
        // ...nor past bytes left in the buffer, nor while the writer task
        // holds the socket.
        let mut state = connection.outbox.state.lock().await;
        assert!(!written(&connection));
        state.writer.write_all(b"").await.unwrap();
        drop(state);
        assert!(written(&connection));
        let mut state = connection.outbox.state.lock().await;
        // A partial frame only: the buffer is not flushed here.
        let _ = state.writer.write(&[0u8; 1]).await.unwrap();
        drop(state);
        assert!(!written(&connection), "bytes in the buffer come first");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_reach_the_socket_in_the_order_they_were_sent() {
        // 4,000 publishes of 4 KiB, far more than the socket buffers hold
        // while the stand-in pauses: some are written at once, some only
        // partly (the rest buffered), some queued for the writer task.
        const COUNT: usize = 4000;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(record_publish_order(listener, COUNT));
        let connection = Connection::connect(&addr, "order-test").await.unwrap();
        let mut answers = Vec::with_capacity(COUNT);
        for index in 0..COUNT {
            let mut payload = format!("{index:08}").into_bytes();
            payload.resize(4096, b'.');
            let message = Message::from_payload(payload);
            let publish = Request::Publish { channel: "order".into(), partition: Some(0), producer: None, message };
            answers.push(connection.send_request_pipelined(publish).await.unwrap());
        }
        let payloads = tokio::time::timeout(Duration::from_secs(60), server).await.unwrap().unwrap();
        for (index, payload) in payloads.iter().enumerate() {
            assert_eq!(&payload[..8], format!("{index:08}").as_bytes(), "publish {index} arrived out of order");
        }
        drop(answers);
    }
}
