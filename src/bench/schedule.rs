//! A fixed-rate send schedule. Message `i` is due at `start + i / rate`,
//! computed from the start and never from when the previous send finished:
//! latency measured from these intended times counts a stall against every
//! message scheduled during it (coordinated omission corrected).

use std::time::{Duration, Instant};

/// When each message of a fixed-rate run is due.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    rate_per_second: u64,
}

impl Schedule {
    /// A schedule of `rate_per_second` messages a second from `start`.
    ///
    /// # Panics
    /// A rate of 0: the callers check their options first.
    pub fn new(start: Instant, rate_per_second: u64) -> Schedule {
        assert!(rate_per_second > 0, "a schedule has a positive rate");
        Schedule { start, rate_per_second }
    }

    /// When message `index` is due.
    pub fn intended(&self, index: u64) -> Instant {
        self.start + self.offset(index)
    }

    /// How long after the start message `index` is due.
    pub fn offset(&self, index: u64) -> Duration {
        let nanos = u128::from(index) * 1_000_000_000 / u128::from(self.rate_per_second);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How many messages are due by `now` (those with an intended time at
    /// or before it).
    pub fn due_by(&self, now: Instant) -> u64 {
        match now.checked_duration_since(self.start) {
            None => 0,
            Some(elapsed) => {
                let due = elapsed.as_nanos() * u128::from(self.rate_per_second) / 1_000_000_000 + 1;
                u64::try_from(due).unwrap_or(u64::MAX)
            }
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }
}

/// The latency of a message due at `intended` and done at `done`: zero
/// when it was done early (it cannot be negative).
pub fn latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_due_at_even_intervals_from_the_start() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 50);
        assert_eq!(schedule.intended(0), start);
        assert_eq!(schedule.offset(1), Duration::from_millis(20));
        assert_eq!(schedule.offset(50), Duration::from_secs(1));
        // No drift over a long run: computed from the start each time.
        assert_eq!(schedule.offset(50 * 3600), Duration::from_secs(3600));
        assert_eq!(schedule.due_by(start), 1);
        assert_eq!(schedule.due_by(start + Duration::from_millis(39)), 2);
        assert_eq!(schedule.due_by(start + Duration::from_secs(1)), 51);
        assert_eq!(Schedule::new(start + Duration::from_secs(1), 50).due_by(start), 0);
        let odd = Schedule::new(start, 3);
        assert_eq!(odd.offset(3), Duration::from_secs(1));
    }

    #[test]
    fn a_stall_shows_in_every_message_scheduled_during_it() {
        // 100 messages at 1000/s; the sender stalls 50 ms at message 10,
        // then sends everything that fell due at once, each taking 0.1 ms.
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000);
        let stall_end = schedule.intended(10) + Duration::from_millis(50);
        let mut latencies = Vec::new();
        let mut now = start;
        for index in 0..100 {
            let due = schedule.intended(index);
            now = now.max(due);
            if index == 10 {
                now = stall_end;
            }
            now += Duration::from_micros(100);
            latencies.push(latency(due, now));
        }
        // Before the stall: the service time alone.
        assert!(latencies[..10].iter().all(|&l| l == Duration::from_micros(100)));
        // Every message due during the stall waited for it: 50 ms for the
        // first, then less and less, but more than the service time.
        assert!(latencies[10] >= Duration::from_millis(50));
        let hit = latencies[10..].iter().filter(|&&l| l > Duration::from_millis(1)).count();
        assert!(hit >= 45, "{hit} messages show the stall");
        // Measured from the actual send instead, only one would.
    }
}
