//! The machine's floor: the same pattern as a run with no broker. For
//! latency, one thread sends messages of the given size at a fixed rate
//! over one loopback TCP connection; another, blocked in `read`, echoes
//! each back; the round trip from each message's intended send time is
//! what this machine costs for one hand-off each way, before any broker
//! work. For throughput, the same bytes streamed one way as fast as they go.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::recorder::Series;
use super::schedule::{Schedule, latency};

/// Round trips of `size` bytes at `rate` a second for `count` messages.
///
/// # Errors
/// Loopback TCP could not be set up or broke.
pub fn measure(size: usize, rate: u64, count: u64) -> std::io::Result<Series> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let size = size.max(1);
    let echo = std::thread::Builder::new().name("weir-bench-echo".into()).spawn(move || -> std::io::Result<()> {
        let (mut socket, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        let mut buffer = vec![0u8; size];
        for _ in 0..count {
            socket.read_exact(&mut buffer)?;
            socket.write_all(&buffer)?;
        }
        Ok(())
    })?;
    let mut socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    let message = vec![7u8; size];
    let mut reply = vec![0u8; size];
    let mut series = Series::new(format!("floor, {size} B"));
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(10), rate);
    for index in 0..count {
        let due = schedule.intended(index);
        super::latency::wait_until(due);
        socket.write_all(&message)?;
        socket.read_exact(&mut reply)?;
        series.record(latency(due, Instant::now()));
    }
    echo.join().map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(series)
}

/// How long the tokio floor's echo waits for its client to connect.
const ECHO_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The same round trips with tokio at both ends, as a broker and its
/// client have: a sender thread hands each message (at its intended time)
/// to a task on this runtime, which writes it and reads the echo; the echo
/// is a task on a runtime of its own (two workers, as a broker's on this
/// machine), in a thread of its own. What this adds to [`measure`] is the
/// cost of the async runtimes' wake-ups alone, before any broker work.
///
/// # Errors
/// Loopback TCP could not be set up or broke.
pub async fn measure_runtime(size: usize, rate: u64, count: u64) -> std::io::Result<Series> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let size = size.max(1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let echo =
        std::thread::Builder::new().name("weir-bench-echo-rt".into()).spawn(move || -> std::io::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                // Bounded, so that the thread ends even if the client side
                // failed before it connected.
                let (mut socket, _) =
                    tokio::time::timeout(ECHO_ACCEPT_TIMEOUT, listener.accept()).await.map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "the floor's client never connected")
                    })??;
                socket.set_nodelay(true)?;
                let mut buffer = vec![0u8; size];
                for _ in 0..count {
                    socket.read_exact(&mut buffer).await?;
                    socket.write_all(&buffer).await?;
                }
                Ok(())
            })
        })?;
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(10), rate);
    let (due, mut due_rx) = tokio::sync::mpsc::channel::<u64>(1024);
    let sender = std::thread::Builder::new().name("weir-bench-floor-sender".into()).spawn(move || {
        for index in 0..count {
            super::latency::wait_until(schedule.intended(index));
            if due.blocking_send(index).is_err() {
                return;
            }
        }
    })?;
    let message = vec![7u8; size];
    let mut reply = vec![0u8; size];
    let mut series = Series::new(format!("floor (tokio), {size} B"));
    while let Some(index) = due_rx.recv().await {
        socket.write_all(&message).await?;
        socket.read_exact(&mut reply).await?;
        series.record(latency(schedule.intended(index), Instant::now()));
    }
    let _ = tokio::task::spawn_blocking(move || sender.join()).await;
    tokio::task::spawn_blocking(move || echo.join())
        .await
        .map_err(std::io::Error::other)?
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(series)
}

/// The machine's floor for a throughput run: `count` messages of `size`
/// bytes streamed one way over one loopback TCP connection to a reader
/// thread, as fast as they go, no broker. Returns the time from the first
/// write to the last byte read.
///
/// # Errors
/// Loopback TCP could not be set up or broke.
pub fn stream(size: usize, count: u64) -> std::io::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let size = size.max(1);
    let total = size as u64 * count;
    let reader =
        std::thread::Builder::new().name("weir-bench-sink".into()).spawn(move || -> std::io::Result<Instant> {
            let (mut socket, _) = listener.accept()?;
            let mut buffer = vec![0u8; size.min(1 << 20)];
            let mut left = total;
            while left > 0 {
                let want = buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let read = socket.read(&mut buffer[..want])?;
                if read == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left -= read as u64;
            }
            Ok(Instant::now())
        })?;
    let mut socket = TcpStream::connect(addr)?;
    let message = vec![7u8; size];
    let started = Instant::now();
    for _ in 0..count {
        socket.write_all(&message)?;
    }
    let done = reader.join().map_err(|_| std::io::Error::other("the reader thread panicked"))??;
    Ok(done - started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_records_one_sample_per_round_trip() {
        let series = measure(1024, 1000, 20).unwrap();
        assert_eq!(series.samples(), 20);
        assert!(series.at(100.0) > Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_runtime_floor_records_one_sample_per_round_trip() {
        let series = measure_runtime(1024, 1000, 20).await.unwrap();
        assert_eq!(series.samples(), 20);
        assert!(series.at(100.0) > Duration::ZERO);
    }

    #[test]
    fn the_streaming_floor_moves_every_byte() {
        assert!(stream(1000, 500).unwrap() > Duration::ZERO);
    }
}
