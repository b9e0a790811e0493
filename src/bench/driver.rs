//! The broker a benchmark drives: weir, embedded on a temporary directory
//! or at an address. (A peer driver, NATS JetStream, comes with a trait
//! that both implement; see docs/BENCH.md.)

use tempfile::TempDir;

use super::BenchError;
use crate::client::{Connection, Publisher, PublisherOptions, SubscribeOptions, Subscriber};
use crate::config::Config;
use crate::protocol::{ChannelRetention, Limits, Request, StartPosition};
use crate::storage::FsyncPolicy;

/// A weir broker to benchmark.
pub struct WeirTarget {
    addr: String,
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
        Ok(WeirTarget { addr, description, embedded: Some(Embedded { stop, thread, _data: dir }) })
    }

    /// A broker already running at `addr`.
    pub fn at(addr: &str) -> WeirTarget {
        WeirTarget { addr: addr.to_owned(), description: format!("weir at {addr}"), embedded: None }
    }

    /// The limits the broker advertises in its handshake.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn limits(&self) -> Result<Limits, BenchError> {
        let connection = Connection::connect(&self.addr, "weir-bench").await?;
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
        self.subscriber_from(channel, window, StartPosition::Latest).await
    }

    /// A subscriber to every partition of `channel`, from `start`, with a
    /// window of `window` deliveries (capped by the broker's
    /// `max_inflight_deliveries`).
    ///
    /// # Errors
    /// The connection or the subscription failed.
    pub async fn subscriber_from(
        &self,
        channel: &str,
        window: u32,
        start: StartPosition,
    ) -> Result<(Connection, Subscriber), BenchError> {
        let connection = Connection::connect(&self.addr, "weir-bench-subscriber").await?;
        let window = window.clamp(1, connection.limits().max_inflight_deliveries.max(1));
        let options = SubscribeOptions { start, max_inflight: window, ..SubscribeOptions::default() };
        let subscriber = Subscriber::subscribe(&connection, channel, options).await?;
        Ok((connection, subscriber))
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
