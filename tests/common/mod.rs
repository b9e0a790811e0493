//! Helpers shared by the integration tests: a bound on every await, and a
//! real broker on 127.0.0.1 with a temporary data directory.
#![allow(dead_code)] // Each test binary uses a different subset.

pub mod authority;
pub mod cluster;
pub mod full_disk;
pub mod prometheus;
pub mod proxy;
pub mod raw;

use std::future::Future;
use std::time::Duration;

use tempfile::TempDir;
use weir::config::Config;
use weir::server::{self, ServerHandle};
use weir::storage::FsyncPolicy;

/// How long any single await may take before the test fails as hung:
/// generous, so that a loaded 2-core machine never fails a correct test.
pub const LIMIT: Duration = Duration::from_secs(60);

pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(LIMIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {LIMIT:?} waiting for {what}"),
    }
}

/// A broker on an ephemeral port, fsync off for speed, no metrics exporter
/// (one per process: the metrics test has its own binary).
pub fn test_config(dir: &TempDir) -> Config {
    Config {
        listen_addr: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        fsync: FsyncPolicy::Never,
        metrics_addr: String::new(),
        ..Config::default()
    }
}

pub async fn start(config: Config) -> ServerHandle {
    within("the server to start", server::start(config)).await.expect("the server starts")
}

pub async fn stop(server: ServerHandle) {
    within("the server to stop", server.stop()).await.expect("the server stops cleanly");
}

/// A FETCH of up to 10 messages from the start of partition 0.
pub fn fetch_from_start(channel: &str) -> weir::protocol::Request {
    weir::protocol::Request::Fetch {
        channel: channel.into(),
        partition: 0,
        offset: 0,
        max_messages: 10,
        max_bytes: 1 << 20,
    }
}

pub fn addr(server: &ServerHandle) -> String {
    server.local_addr().to_string()
}
