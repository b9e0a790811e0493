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

    #[test]
    fn the_streaming_floor_moves_every_byte() {
        assert!(stream(1000, 500).unwrap() > Duration::ZERO);
    }
}
