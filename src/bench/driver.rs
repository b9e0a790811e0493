//! The broker a benchmark drives: weir, embedded on a temporary directory
//! or at an address. (A peer driver, NATS JetStream, comes with a trait
//! that both implement; see docs/BENCH.md.)

use tempfile::TempDir;

use super::BenchError;
use crate::client::{Connection, Publisher, PublisherOptions, SubscribeOptions, Subscriber};
use crate::config::Config;
use crate::protocol::{ChannelRetention, Request, StartPosition};
use crate::server::ServerHandle;
use crate::storage::FsyncPolicy;

/// A weir broker to benchmark.
pub struct WeirTarget {
    addr: String,
    description: String,
    /// The embedded broker and its data, stopped and removed on drop.
    embedded: Option<(ServerHandle, TempDir)>,
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
        let server = crate::server::start(config).await.map_err(|error| BenchError::Target(error.to_string()))?;
        let addr = server.local_addr().to_string();
        let description = format!("weir {} (embedded, fsync = {fsync:?})", env!("CARGO_PKG_VERSION"));
        Ok(WeirTarget { addr, description, embedded: Some((server, dir)) })
    }

    /// A broker already running at `addr`.
    pub fn at(addr: &str) -> WeirTarget {
        WeirTarget { addr: addr.to_owned(), description: format!("weir at {addr}"), embedded: None }
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Creates `channel` with `partitions` partitions (it must not exist).
    ///
    /// # Errors
    /// The broker refused.
    pub async fn create(&self, channel: &str, partitions: u32) -> Result<(), BenchError> {
        let connection = Connection::connect(&self.addr, "weir-bench").await?;
        let create = Request::CreateChannel {
            channel: channel.to_owned(),
            retention: ChannelRetention::default(),
            partitions: Some(partitions),
        };
        connection.request(create).await?;
        Ok(())
    }

    /// A publisher to `channel` (partition 0).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn publisher(&self, channel: &str) -> Result<Publisher, BenchError> {
        let options = PublisherOptions { client_name: "weir-bench-publisher".into(), ..PublisherOptions::default() };
        Ok(Publisher::connect(&self.addr, channel, options).await?)
    }

    /// A subscriber to every partition of `channel`, from its end.
    ///
    /// # Errors
    /// The connection or the subscription failed.
    pub async fn subscriber(&self, channel: &str, window: u32) -> Result<(Connection, Subscriber), BenchError> {
        let connection = Connection::connect(&self.addr, "weir-bench-subscriber").await?;
        let options =
            SubscribeOptions { start: StartPosition::Latest, max_inflight: window, ..SubscribeOptions::default() };
        let subscriber = Subscriber::subscribe(&connection, channel, options).await?;
        Ok((connection, subscriber))
    }

    /// Stops an embedded broker (a running one is left alone).
    ///
    /// # Errors
    /// The embedded broker did not stop cleanly.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some((server, _dir)) = self.embedded.take() {
            server.stop().await.map_err(|error| BenchError::Target(error.to_string()))?;
        }
        Ok(())
    }
}
