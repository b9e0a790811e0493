//! weir: a commit-log message broker with explicit limits and backpressure.
//!
//! Publishers append events to named channels; the broker stores them in
//! checksummed, segmented log files; subscribers replay from any offset or
//! time and follow the tail. Every queue and buffer has a named limit, and
//! reaching one is answered with a notice, never with a hidden queue.
//!
//! # Layout
//! - [`record`]: the record format, the same bytes on disk and on the wire;
//!   the bottom layer, imported by storage, protocol and client alike.
//! - [`storage`]: the segmented log per channel, recovery, retention and
//!   the offline checker. Synchronous; no tokio.
//! - [`protocol`]: the binary wire protocol (pure codecs, no I/O).
//! - [`server`]: the tokio TCP server: connections, group commit,
//!   subscriptions, durable offsets, shutdown.
//! - [`client`]: the async Rust client: publisher, subscriber.
//! - [`cluster`]: cluster mode: the metadata Raft group (openraft), its
//!   storage and the node-to-node listener.
//! - [`bench`]: `weir bench`, latency percentiles with coordinated omission
//!   corrected, beside the machine's floor.
//! - [`security`]: TLS, principals with per-channel permissions, quotas.
//! - [`config`]: `broker.toml`, its defaults and its validation.
//! - [`metrics`]: Prometheus metrics (names, bounded labels, exporter).
//! - [`partitioner`]: Kafka's key-to-partition function, for broker and client.
//!
//! # Untrusted input
//! Bytes from files and from the network are untrusted: every length is
//! checked against a named limit before anything is allocated for it, and
//! malformed input is a typed error, never a panic.
#![deny(unsafe_code)]

pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod partitioner;
pub mod protocol;
pub mod record;
pub mod security;
pub mod server;
pub mod stdout;
pub mod storage;
