//! The machine's floor: the same pattern as a latency run with no broker.
//! One thread sends messages of the given size at a fixed rate over one
//! loopback TCP connection; another, blocked in `read`, echoes each back.
//! The round trip from each message's intended send time is what this
//! machine costs for one hand-off each way, before any broker work.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_records_one_sample_per_round_trip() {
        let series = measure(1024, 1000, 20).unwrap();
        assert_eq!(series.samples(), 20);
        assert!(series.at(100.0) > Duration::ZERO);
    }
}
