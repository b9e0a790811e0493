//! The peer: NATS JetStream through async-nats, with file storage and
//! explicit acknowledgements, driven by the same load generator as weir.
//! A topic is a stream of one subject, a producer publishes and awaits
//! JetStream's PubAck, a consumer is a pull consumer acknowledging each
//! message, with `max_ack_pending` as its window.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::StorageType;
use bytes::Bytes;
use futures_util::StreamExt;

use super::BenchError;
use super::driver::{Ack, BoxFuture, Consumer, ConsumerOptions, Delivery, Driver, Producer, StartAt};

/// A NATS server with JetStream on.
pub struct NatsTarget {
    url: String,
    context: jetstream::Context,
    version: String,
    max_payload: usize,
}

fn target_error(error: impl std::fmt::Display) -> BenchError {
    BenchError::Target(format!("NATS: {error}"))
}

impl NatsTarget {
    /// Connects to the server at `url` (e.g. `nats://127.0.0.1:4222`).
    ///
    /// # Errors
    /// The server cannot be reached.
    pub async fn connect(url: &str) -> Result<NatsTarget, BenchError> {
        let client = async_nats::connect(url).await.map_err(target_error)?;
        let version = client.server_info().version;
        let max_payload = client.max_payload();
        Ok(NatsTarget { url: url.to_owned(), context: jetstream::new(client), version, max_payload })
    }
}

impl Driver for NatsTarget {
    fn describe(&self) -> String {
        format!(
            "NATS JetStream {} at {} (file storage, explicit acks; a topic is one stream: no partitions, keys not sent)",
            self.version, self.url
        )
    }

    fn windows(&self) -> BoxFuture<'_, Result<String, BenchError>> {
        Box::pin(async move {
            Ok(format!(
                "at most 5,000 unacknowledged publishes (async-nats's default, client), max_payload {} bytes (server)",
                self.max_payload
            ))
        })
    }

    /// JetStream streams have no partitions: `partitions` is not used (the
    /// report says so).
    fn create<'a>(&'a self, topic: &'a str, _partitions: u32) -> BoxFuture<'a, Result<(), BenchError>> {
        Box::pin(async move {
            let config = jetstream::stream::Config {
                name: topic.to_owned(),
                subjects: vec![topic.to_owned()],
                storage: StorageType::File,
                ..Default::default()
            };
            self.context.create_stream(config).await.map_err(target_error)?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BenchError>> {
        Box::pin(async move {
            self.context.delete_stream(topic).await.map_err(target_error)?;
            Ok(())
        })
    }

    /// Each producer has a connection of its own, as each weir producer
    /// has its own connections: async-nats's 5,000 unacknowledged
    /// publishes are per producer.
    fn producer<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Arc<dyn Producer>, BenchError>> {
        Box::pin(async move {
            let client = async_nats::connect(&self.url).await.map_err(target_error)?;
            let producer = NatsProducer { context: jetstream::new(client), subject: topic.to_owned() };
            Ok(Arc::new(producer) as Arc<dyn Producer>)
        })
    }

    /// A consumer on a connection of its own. A group is one durable pull
    /// consumer pulled by every member: its `max_ack_pending` (the window)
    /// is shared by the members, where weir's window is per partition and
    /// member.
    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        options: ConsumerOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BenchError>> {
        Box::pin(async move {
            let client = async_nats::connect(&self.url).await.map_err(target_error)?;
            let stream = jetstream::new(client.clone()).get_stream(topic).await.map_err(target_error)?;
            let config = pull::Config {
                durable_name: options.group.clone(),
                deliver_policy: match options.from {
                    StartAt::Start => DeliverPolicy::All,
                    StartAt::End => DeliverPolicy::New,
                },
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: i64::from(options.window.max(1)),
                ..Default::default()
            };
            // The first member creates the durable consumer, the others
            // bind to it.
            let consumer: jetstream::consumer::Consumer<pull::Config> = match &options.group {
                Some(group) => stream.get_or_create_consumer(group, config).await.map_err(target_error)?,
                None => stream.create_consumer(config).await.map_err(target_error)?,
            };
            let messages = consumer.messages().await.map_err(target_error)?;
            Ok(Box::new(NatsConsumer { _client: client, messages }) as Box<dyn Consumer>)
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), BenchError>> {
        Box::pin(async { Ok(()) })
    }
}

struct NatsProducer {
    context: jetstream::Context,
    subject: String,
}

impl Producer for NatsProducer {
    /// JetStream has no partitions and no message keys: the key is not
    /// sent.
    fn send(&self, _key: Option<Bytes>, payload: Bytes) -> BoxFuture<'_, Result<Ack, BenchError>> {
        Box::pin(async move {
            let pending = self.context.publish(self.subject.clone(), payload).await.map_err(target_error)?;
            let ack: Ack = Box::pin(async move {
                pending.await.map_err(target_error)?;
                Ok(())
            });
            Ok(ack)
        })
    }

    fn close(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

struct NatsConsumer {
    /// The consumer's own connection, kept open while it reads.
    _client: async_nats::Client,
    messages: pull::Stream,
}

impl Consumer for NatsConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BenchError>> {
        Box::pin(async move {
            loop {
                let message = match self.messages.next().await {
                    Some(Ok(message)) => message,
                    // Reported by the stream, which goes on: a loaded server
                    // missed an idle heartbeat.
                    Some(Err(error)) if error.kind() == MessagesErrorKind::MissingHeartbeat => {
                        tracing::warn!(%error, "NATS consumer");
                        continue;
                    }
                    Some(Err(error)) => return Err(target_error(error)),
                    None => return Err(BenchError::Target("NATS: the consumer's stream ended".into())),
                };
                let received_at = std::time::Instant::now();
                let redelivered = message.info().is_ok_and(|info| info.delivered > 1);
                message.ack().await.map_err(|error| target_error(error.to_string()))?;
                return Ok(Delivery { payload: message.message.payload.clone(), received_at, redelivered });
            }
        })
    }
}
