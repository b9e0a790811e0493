//! `weir bench`: latency percentiles at a fixed rate, coordinated omission
//! corrected, with the machine's own floor beside them; throughput; OMB
//! workloads and catch-up; charts. docs/BENCH.md is the design,
//! docs/BENCHMARKS.md holds the figures.
//!
//! - `schedule`: fixed-rate intended send times.
//! - `recorder`: HdrHistogram series, merged, never averaged.
//! - `floor`: the same pattern over loopback TCP with no broker.
//! - `driver`: the broker under test behind one trait: weir, embedded or
//!   at an address.
//! - `nats`: the peer, NATS JetStream.
//! - `null`: no broker, the load generator's own ceiling.
//! - `omb`: OMB's workload files and result format.
//! - `workload`: `bench run` and `bench catchup`.
//! - `chart`: percentile charts.
//! - `latency`: the latency run.
//! - `throughput`: N acknowledged messages per size, then read back.
//! - `report`: header, table, JSON.

pub mod chart;
pub mod driver;
pub mod floor;
pub mod latency;
pub mod nats;
pub mod null;
pub mod omb;
pub mod recorder;
pub mod report;
pub mod schedule;
pub mod throughput;
pub mod workload;

/// The highest send rate a run accepts: far above what one sender thread
/// reaches, low enough that rate × seconds cannot overflow.
pub const RATE_PER_SECOND_MAX: u64 = 10_000_000;
/// The longest run, and the longest warm-up or floor, accepted.
pub const SECONDS_MAX: u64 = 24 * 3600;
/// The largest message size accepted (each size's payload is built in
/// memory before any broker sees it).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("the broker under test: {0}")]
    Target(String),
}

/// A progress bar of `length` steps on standard error when it is a
/// terminal, and nothing otherwise (a pipe, a file, CI).
pub(crate) fn progress(length: u64, message: String) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(length).with_message(message);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:24} {wide_bar} {pos}/{len} {elapsed}") {
        bar.set_style(style);
    }
    bar
}
