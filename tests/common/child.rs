//! A broker run as a child process (`weir serve`), killed when dropped, and
//! what `/proc` says of its memory.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::process::Child;

/// A running `weir serve`; dropping it kills the process and reaps it.
pub struct Broker(pub Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
