//! The Rust client: an async [`Connection`], a [`Publisher`] that batches
//! and pipelines with idempotent retries into one partition, a
//! [`PartitionedPublisher`] that routes messages over every partition of a
//! channel by key, a [`Subscriber`] that yields messages (of one
//! partition, every partition, or a consumer group's share) as a stream,
//! and a [`FollowingSubscriber`] that subscribes again elsewhere when its
//! node sends it on or fails (a consumer group's coordinator in cluster
//! mode, a node lost).
//!
//! ```no_run
//! # async fn example() -> Result<(), weir::client::ClientError> {
//! use weir::client::{Connection, Publisher, PublisherOptions, SubscribeOptions, Subscriber, Event};
//! use weir::record::Message;
//!
//! let publisher = Publisher::connect("127.0.0.1:7450", "orders", PublisherOptions::default()).await?;
//! let receipt = publisher.publish(Message::from_payload("hello")).await?;
//! println!("stored at offset {}", receipt.offset);
//!
//! let connection = Connection::connect("127.0.0.1:7450", "example").await?;
//! let mut subscriber = Subscriber::subscribe(&connection, "orders", SubscribeOptions::default()).await?;
//! while let Some(event) = subscriber.next().await {
//!     if let Event::Message { partition, record } = event? {
//!         println!("{partition}/{}: {:?}", record.offset, record.payload);
//!         subscriber.ack_partition(partition, record.offset).await?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod connection;
mod following;
mod metadata;
mod publisher;
mod subscriber;

use std::sync::Arc;

pub use crate::security::tls::ClientTlsOptions;
pub use connection::{ConnectOptions, Connection, SILENCE_LIMIT_MIN, SILENT_HEARTBEATS_MAX};
pub use following::{FollowOptions, Followed, FollowingSubscriber};
pub use metadata::Metadata;
pub use publisher::{BackpressurePolicy, PartitionedPublisher, Publisher, PublisherOptions, Receipt};
pub use subscriber::{Event, SubscribeOptions, Subscriber};

use crate::protocol::ErrorCode;

/// What can go wrong on the client side.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("connection error: {0}")]
    Io(Arc<std::io::Error>),
    #[error("the connection to the broker was lost")]
    Disconnected,
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker closed the connection before answering HELLO, without an
    /// ERROR.
    #[error("the broker at {addr} closed the connection before answering HELLO; {hint}")]
    HandshakeClosed { addr: String, hint: &'static str },
    #[error("timed out waiting for the {0}")]
    Timeout(&'static str),
    #[error("broker error {code} ({}): {message}", error_name(*code))]
    Server { code: u16, message: String },
    #[error("the broker is applying backpressure on channel {channel}; retry after {retry_after_ms} ms")]
    Backpressure { channel: String, retry_after_ms: u32 },
    #[error("protocol violation by the broker: {0}")]
    Protocol(String),
    #[error("unexpected answer from the broker: {0}")]
    Unexpected(String),
    #[error("a delivered record is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the publisher is closed")]
    Closed,
    /// The client ended a subscription because its event queue was full:
    /// the application did not read it while deliveries and notices kept
    /// arriving. The connection's reader never waits for one subscriber,
    /// so that the others and every request keep being answered.
    #[error(
        "subscription {subscription_id} was ended by the client: its queue of {capacity} events was full because the application was not reading it"
    )]
    SubscriberOverflow { subscription_id: u32, capacity: usize },
}

impl ClientError {
    pub(crate) fn io(error: std::io::Error) -> ClientError {
        ClientError::Io(Arc::new(error))
    }

    /// The wire error code, for errors the broker sent.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }

    /// The client address a `NotLeader` error names (`...; leader:
    /// HOST:PORT`): the partition's leader, or a consumer group's
    /// coordinator. `None` for any other error, or when none is known.
    pub fn redirect(&self) -> Option<String> {
        let ClientError::Server { message, .. } = self else { return None };
        if self.code() != Some(ErrorCode::NotLeader) {
            return None;
        }
        let leader = message.rsplit_once("leader: ")?.1.trim();
        (!leader.is_empty() && leader != "unknown").then(|| leader.to_owned())
    }
}

fn error_name(code: u16) -> String {
    ErrorCode::from_u16(code).map_or_else(|| "unknown".to_owned(), |code| format!("{code:?}"))
}
