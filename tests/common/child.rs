//! A broker run as a child process (`weir serve`), killed when dropped, and
//! what `/proc` says of its memory.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir::client::Connection;

/// A running `weir serve`; dropping it kills the process and reaps it.
pub struct Broker(pub Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `weir serve` with `config`, listening on `addr`, its data in
/// `data_dir`, its output discarded.
pub fn serve(config: &Path, data_dir: &Path, addr: &str) -> Broker {
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", addr])
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Broker(child)
}

/// Connects to `addr` as `name` once the broker listens; fails the test if
/// it does not within `limit`.
pub async fn connect_when_up(addr: &str, name: &str, limit: Duration) -> Connection {
    let started = Instant::now();
    loop {
        if let Ok(connection) = Connection::connect(addr, name).await {
            return connection;
        }
        assert!(started.elapsed() < limit, "the broker did not start within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `/proc/<pid>/status` field in bytes (the file reports kB).
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The resident memory of `pid`, in bytes.
pub fn resident_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}
