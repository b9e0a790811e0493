//! The broker a benchmark drives, behind one small trait ([`Driver`]):
//! create a topic, a producer (send, then await the acknowledgement), a
//! consumer (the next payload). [`WeirTarget`] is weir, embedded on a
//! temporary directory or at an address; `nats` is the JetStream peer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tempfile::TempDir;

use super::BenchError;
use crate::client::{
    ConnectOptions, Connection, Event, PartitionedPublisher, PublisherOptions, SubscribeOptions, Subscriber,
};
use crate::config::Config;
use crate::protocol::{ChannelRetention, Limits, Notice, Request, StartPosition};
use crate::record::Message;
use crate::storage::FsyncPolicy;

/// A boxed future, so that the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A sent message's acknowledgement, awaited separately so that a producer
/// can keep many in flight.
pub type Ack = BoxFuture<'static, Result<(), BenchError>>;

/// Where a consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The first message still stored.
    Start,
    /// Messages sent after it subscribed.
    End,
}

/// How a consumer reads a topic.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    pub from: StartAt,
    /// At most this many messages unacknowledged (weir: per partition,
    /// capped by the broker's `max_inflight_deliveries`).
    pub window: u32,
    /// A shared subscription: consumers of the same group share the
    /// topic's messages (weir: a consumer group, members share partitions;
    /// JetStream: one durable consumer pulled by every member). `None`:
    /// this consumer reads every message.
    pub group: Option<String>,
}

/// A broker under test.
pub trait Driver: Send + Sync {
    /// Name, version and settings, for the report header.
    fn describe(&self) -> String;
    /// The windows the broker and the driver's client use, for the report.
    fn windows(&self) -> BoxFuture<'_, Result<String, BenchError>>;
    /// Creates a topic (a weir channel, a JetStream stream) that must not
    /// exist yet, with `partitions` partitions where the broker has them.
    fn create<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<(), BenchError>>;
    /// Deletes a topic the run created, with its data: a benchmark leaves
    /// nothing behind on a broker it did not start.
    fn delete<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BenchError>>;
    /// A producer to every partition of `topic`.
    fn producer<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Arc<dyn Producer>, BenchError>>;
    /// A consumer acknowledging what it reads.
    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        options: ConsumerOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BenchError>>;
    /// Stops what the driver started (an embedded broker).
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), BenchError>>;
}

/// Sends messages to one topic.
pub trait Producer: Send + Sync {
    /// Hands one message to the client and returns its acknowledgement. A
    /// message with a key goes to its key's partition (weir: Kafka's
    /// murmur2 partitioner); one without is spread over the partitions.
    fn send(&self, key: Option<Bytes>, payload: Bytes) -> BoxFuture<'_, Result<Ack, BenchError>>;
    /// Waits for what is in flight, then closes (when this is the last
    /// handle to the producer).
    fn close(self: Arc<Self>) -> BoxFuture<'static, ()>;
}

/// Reads one topic.
pub trait Consumer: Send {
    /// The next message; the consumer acknowledges it.
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BenchError>>;
}

/// A message as a consumer received it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub payload: Bytes,
    /// When the client handed it over, before the consumer acknowledged
    /// it: end-to-end latency ends here.
    pub received_at: std::time::Instant,
    /// The broker had delivered it before (weir: an offset at or below one
    /// already read of its partition, after a group rebalance; JetStream: a
    /// delivery count above 1).
    pub redelivered: bool,
}

/// A weir broker to benchmark.
pub struct WeirTarget {
    addr: String,
    /// Replicated channels instead: created through this cluster listener
    /// with this replication factor, and driven on their partition 0's
    /// leader (each topic's client address, once known, in `leaders`).
    replicated: Option<(String, u8)>,
    leaders: std::sync::Mutex<HashMap<String, String>>,
    /// Credential and TLS of every connection the benchmark opens.
    connect: ConnectOptions,
    description: String,
    /// The embedded broker, its data, and how to stop it.
    embedded: Option<Embedded>,
}

/// A broker on its own thread and tokio runtime (so that its workers are
/// not the load generator's), on a temporary directory.
struct Embedded {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), String>>,
    _data: TempDir,
}

impl WeirTarget {
    /// Starts a broker in this process on a temporary directory.
    ///
    /// # Errors
    /// The directory or the broker could not be set up.
    pub async fn embedded(fsync: FsyncPolicy) -> Result<WeirTarget, BenchError> {
        let dir = tempfile::tempdir().map_err(BenchError::Io)?;
        let config = Config {
            listen_addr: "127.0.0.1:0".into(),
            data_dir: dir.path().to_path_buf(),
            fsync,
            metrics_addr: String::new(),
            max_message_bytes: 8 * 1024 * 1024,
            max_batch_bytes: 64 * 1024 * 1024,
            max_inflight_publish_bytes: 256 * 1024 * 1024,
            ..Config::default()
        };
        let (ready, started) = tokio::sync::oneshot::channel::<Result<String, String>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("weir-bench-broker".into())
            .spawn(move || -> Result<(), String> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|error| error.to_string())?;
                runtime.block_on(async move {
                    match crate::server::start(config).await {
                        Ok(server) => {
                            let _ = ready.send(Ok(server.local_addr().to_string()));
                            let _ = stopped.await;
                            server.stop().await.map_err(|error| error.to_string())
                        }
                        Err(error) => {
                            let _ = ready.send(Err(error.to_string()));
                            Ok(())
                        }
                    }
                })
            })
            .map_err(BenchError::Io)?;
        let addr = started
            .await
            .map_err(|_| BenchError::Target("the embedded broker's thread ended".into()))?
            .map_err(BenchError::Target)?;
        let description = format!("weir {} (embedded, fsync = {fsync:?})", env!("CARGO_PKG_VERSION"));
        Ok(WeirTarget {
            addr,
            replicated: None,
            leaders: std::sync::Mutex::new(HashMap::new()),
            connect: ConnectOptions::default(),
            description,
            embedded: Some(Embedded { stop, thread, _data: dir }),
        })
    }

    /// A broker already running at `addr`.
    pub fn at(addr: &str) -> WeirTarget {
        WeirTarget {
            addr: addr.to_owned(),
            replicated: None,
            leaders: std::sync::Mutex::new(HashMap::new()),
            connect: ConnectOptions::default(),
            description: format!("weir at {addr}"),
            embedded: None,
        }
    }

    /// Drives replicated channels of a cluster instead: each topic is
    /// created with `weir cluster create-channel` semantics through the
    /// cluster listener at `cluster_addr`, with `replication_factor`, and
    /// the benchmark connects to its partition 0's leader (so use one
    /// partition); it is deleted the same way after the run.
    pub fn replicated(mut self, cluster_addr: &str, replication_factor: u8) -> WeirTarget {
        self.description.push_str(&format!(", replicated channels (replication factor {replication_factor})"));
        self.replicated = Some((cluster_addr.to_owned(), replication_factor));
        self
    }

    /// Where a topic's connections go: a replicated topic's leader once
    /// known, else the broker's address.
    fn topic_addr(&self, topic: &str) -> String {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner()).get(topic).cloned().unwrap_or_else(|| self.addr.clone())
    }

    /// Creates a replicated channel and waits until its partition 0 has a
    /// leader every replica agrees on; returns the leader's client address.
    async fn create_replicated(
        cluster_addr: &str,
        replication_factor: u8,
        channel: &str,
        partitions: u32,
    ) -> Result<String, BenchError> {
        use crate::cluster::{NodeReply, NodeRequest};
        let create = NodeRequest::CreateChannel { name: channel.to_owned(), partitions, replication_factor };
        let replicas = match crate::cluster::admin(cluster_addr, create, None).await {
            Ok(NodeReply::ChannelCreated { replicas }) => replicas,
            Ok(other) => return Err(BenchError::Target(format!("create-channel {channel}: {other:?}"))),
            Err(error) => return Err(BenchError::Target(format!("create-channel {channel}: {error}"))),
        };
        let Some(first_replicas) = replicas.first().cloned() else {
            return Err(BenchError::Target(format!("create-channel {channel}: the answer placed no partition")));
        };
        let started = std::time::Instant::now();
        loop {
            let status = crate::cluster::admin(cluster_addr, NodeRequest::Status, None).await;
            if let Ok(NodeReply::Status(status)) = status {
                let members = status.members.clone();
                for member in members.iter().filter(|member| first_replicas.contains(&member.id)) {
                    let asked = crate::cluster::admin(&member.addrs.cluster_addr, NodeRequest::Status, None).await;
                    let Ok(NodeReply::Status(view)) = asked else { continue };
                    let leads = view.partitions.iter().any(|partition| {
                        partition.channel == channel && partition.partition == 0 && partition.role == "leader"
                    });
                    if leads {
                        return Ok(member.addrs.client_addr.clone());
                    }
                }
            }
            if started.elapsed() > std::time::Duration::from_secs(60) {
                return Err(BenchError::Target(format!("replicated channel {channel} got no leader within 60 s")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Connects with this credential and TLS (their client name is the
    /// benchmark's own).
    pub fn with_connect_options(mut self, connect: ConnectOptions) -> WeirTarget {
        if connect.tls.is_some() {
            self.description.push_str(" over TLS");
        }
        self.connect = connect;
        self
    }

    async fn connection(&self, client_name: &str) -> Result<Connection, BenchError> {
        self.connection_to(&self.addr, client_name).await
    }

    async fn connection_to(&self, addr: &str, client_name: &str) -> Result<Connection, BenchError> {
        let options = ConnectOptions { client_name: client_name.to_owned(), ..self.connect.clone() };
        Ok(Connection::connect_with(addr, &options).await?)
    }

    /// The limits the broker advertises in its handshake.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn limits(&self) -> Result<Limits, BenchError> {
        let connection = self.connection("weir-bench").await?;
        Ok(*connection.limits())
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Creates `channel` with `partitions` partitions (it must not exist).
    ///
    /// # Errors
    /// The broker refused.
    pub async fn create(&self, channel: &str, partitions: u32) -> Result<(), BenchError> {
        if let Some((cluster_addr, replication_factor)) = &self.replicated {
            let leader = WeirTarget::create_replicated(cluster_addr, *replication_factor, channel, partitions).await?;
            self.leaders.lock().unwrap_or_else(|p| p.into_inner()).insert(channel.to_owned(), leader);
            return Ok(());
        }
        let connection = self.connection("weir-bench").await?;
        let create = Request::CreateChannel {
            channel: channel.to_owned(),
            retention: ChannelRetention::default(),
            partitions: Some(partitions),
        };
        connection.request(create).await?;
        Ok(())
    }

    /// Stops an embedded broker (a running one is left alone).
    ///
    /// # Errors
    /// The embedded broker did not stop cleanly.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(embedded) = self.embedded.take() {
            let _ = embedded.stop.send(());
            let joined = tokio::task::spawn_blocking(move || embedded.thread.join())
                .await
                .map_err(|error| BenchError::Target(error.to_string()))?;
            joined
                .map_err(|_| BenchError::Target("the embedded broker panicked".into()))?
                .map_err(BenchError::Target)?;
        }
        Ok(())
    }
}

impl Driver for WeirTarget {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn windows(&self) -> BoxFuture<'_, Result<String, BenchError>> {
        Box::pin(async move {
            let limits = self.limits().await?;
            let client = PublisherOptions::default();
            Ok(format!(
                "{} publish frames / {} bytes in flight (broker), batches of at most {} messages / {} bytes (client)",
                limits.max_inflight_publishes,
                limits.max_inflight_publish_bytes,
                client.batch_max_messages.min(limits.max_batch_records as usize),
                client
                    .batch_max_bytes
                    .min((limits.max_batch_bytes as usize).min(limits.max_inflight_publish_bytes as usize)),
            ))
        })
    }

    fn create<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<(), BenchError>> {
        Box::pin(WeirTarget::create(self, topic, partitions))
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BenchError>> {
        Box::pin(async move {
            if let Some((cluster_addr, _)) = &self.replicated {
                use crate::cluster::{NodeReply, NodeRequest};
                let delete = NodeRequest::DeleteChannel { name: topic.to_owned() };
                return match crate::cluster::admin(cluster_addr, delete, None).await {
                    Ok(NodeReply::ChannelDeleted) => Ok(()),
                    Ok(other) => Err(BenchError::Target(format!("delete-channel {topic}: {other:?}"))),
                    Err(error) => Err(BenchError::Target(format!("delete-channel {topic}: {error}"))),
                };
            }
            let connection = self.connection("weir-bench").await?;
            // Forced: the run's own consumers may still be ending.
            connection.request(Request::DeleteChannel { channel: topic.to_owned(), force: true }).await?;
            Ok(())
        })
    }

    fn producer<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Arc<dyn Producer>, BenchError>> {
        Box::pin(async move {
            let options = PublisherOptions {
                client_name: "weir-bench-publisher".into(),
                auth_token: self.connect.auth_token.clone(),
                tls: self.connect.tls.clone(),
                ..PublisherOptions::default()
            };
            let publisher = PartitionedPublisher::connect(&self.topic_addr(topic), topic, options).await?;
            Ok(Arc::new(publisher) as Arc<dyn Producer>)
        })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        options: ConsumerOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BenchError>> {
        Box::pin(async move {
            let start = match options.from {
                StartAt::Start => StartPosition::Earliest,
                StartAt::End => StartPosition::Latest,
            };
            // A replicated topic's consumer group is served by its
            // coordinator: a node that is not it names it (`NotLeader`).
            let mut addr = self.topic_addr(topic);
            let mut redirects = 0;
            let (connection, subscriber, window) = loop {
                let connection = self.connection_to(&addr, "weir-bench-subscriber").await?;
                let window = options.window.clamp(1, connection.limits().max_inflight_deliveries.max(1));
                let subscribe = SubscribeOptions {
                    start,
                    max_inflight: window,
                    group: options.group.clone(),
                    ..SubscribeOptions::default()
                };
                match Subscriber::subscribe(&connection, topic, subscribe).await {
                    Ok(subscriber) => break (connection, subscriber, window),
                    Err(error) if redirects < COORDINATOR_REDIRECTS_MAX && error.redirect().is_some() => {
                        redirects += 1;
                        addr = error.redirect().unwrap_or(addr);
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(error) => return Err(error.into()),
                }
            };
            // Half the window the broker granted: acknowledging later than
            // the window would stall the partition.
            let ack_every = u64::from(window / 2).max(1);
            let consumer = WeirConsumer {
                _connection: connection,
                subscriber,
                ack_every,
                unacked: HashMap::new(),
                highest: HashMap::new(),
            };
            Ok(Box::new(consumer) as Box<dyn Consumer>)
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), BenchError>> {
        Box::pin(WeirTarget::stop(*self))
    }
}

/// Redirects to a consumer group's coordinator a bench consumer follows
/// before it gives up.
const COORDINATOR_REDIRECTS_MAX: u32 = 5;

impl Producer for PartitionedPublisher {
    fn send(&self, key: Option<Bytes>, payload: Bytes) -> BoxFuture<'_, Result<Ack, BenchError>> {
        Box::pin(async move {
            let message = Message { key: key.unwrap_or_default(), payload, ..Message::default() };
            let receipt = self.enqueue(message).await?;
            let ack: Ack = Box::pin(async move {
                match receipt.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) => Err(BenchError::Client(error)),
                    Err(_) => Err(BenchError::Target("the publisher stopped".into())),
                }
            });
            Ok(ack)
        })
    }

    fn close(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Ok(publisher) = Arc::try_unwrap(self) {
                publisher.close().await;
            }
        })
    }
}

/// A weir subscription that acknowledges each partition every half window,
/// and at once what it was sent of a partition the group revoked (so that
/// the partition moves on to its next owner).
struct WeirConsumer {
    _connection: Connection,
    subscriber: Subscriber,
    ack_every: u64,
    /// Per partition: messages read and not acknowledged, and the last
    /// offset read.
    unacked: HashMap<u32, (u64, u64)>,
    /// Per partition: the highest offset read, to tell redeliveries.
    highest: HashMap<u32, u64>,
}

impl Consumer for WeirConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BenchError>> {
        Box::pin(async move {
            loop {
                match self.subscriber.next().await {
                    Some(Ok(Event::Message { partition, record })) => {
                        let received_at = std::time::Instant::now();
                        let highest = self.highest.entry(partition).or_insert(record.offset);
                        let redelivered = record.offset < *highest;
                        *highest = (*highest).max(record.offset);
                        let (count, last) = self.unacked.entry(partition).or_insert((0, 0));
                        *count += 1;
                        *last = record.offset;
                        if *count >= self.ack_every {
                            *count = 0;
                            self.subscriber.ack_partition(partition, record.offset).await?;
                        }
                        return Ok(Delivery { payload: record.payload, received_at, redelivered });
                    }
                    Some(Ok(Event::Notice { partition, notice: Notice::Revoked { .. } })) => {
                        if let Some((count, last)) = self.unacked.remove(&partition)
                            && count > 0
                        {
                            self.subscriber.ack_partition(partition, last).await?;
                        }
                    }
                    Some(Ok(Event::Notice { .. })) => {}
                    Some(Err(error)) => return Err(BenchError::Client(error)),
                    None => return Err(BenchError::Target("the subscription ended".into())),
                }
            }
        })
    }
}
