//! Quotas per principal: rate limiters (governor's GCRA, one second of
//! burst) for publish bytes and messages and for subscribe bytes, and a
//! connection count, all shared by the principal's connections.
//!
//! Over a publish quota nothing waits and nothing is queued: the publish is
//! refused with how long until it would fit, and the client retries then.
//! Over the subscribe quota a subscription's next delivery waits, which
//! costs nothing: a subscription is a cursor into the log.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

/// A user's quotas, as written in the credentials file; absent means no
/// limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    pub publish_bytes_per_sec: Option<u64>,
    pub publish_messages_per_sec: Option<u64>,
    pub subscribe_bytes_per_sec: Option<u64>,
    pub max_connections: Option<u64>,
}

impl Quotas {
    /// # Errors
    /// The key and why, for a rate of 0 or above `u32::MAX` per second, or
    /// no connections.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("publish_bytes_per_sec", self.publish_bytes_per_sec),
            ("publish_messages_per_sec", self.publish_messages_per_sec),
            ("subscribe_bytes_per_sec", self.subscribe_bytes_per_sec),
            ("max_connections", self.max_connections),
        ] {
            if let Some(value) = value
                && !(1..=u32::MAX as u64).contains(&value)
            {
                return Err(format!("{key} = {value}: must be 1 to {}", u32::MAX));
            }
        }
        Ok(())
    }
}

/// A principal's quotas and what its connections use of them.
#[derive(Debug)]
pub struct Usage {
    pub quotas: Quotas,
    publish_bytes: Option<DefaultDirectRateLimiter>,
    publish_messages: Option<DefaultDirectRateLimiter>,
    subscribe_bytes: Option<DefaultDirectRateLimiter>,
    connections: AtomicU64,
}

fn limiter(per_second: Option<u64>) -> Option<DefaultDirectRateLimiter> {
    let per_second = NonZeroU32::new(u32::try_from(per_second?).ok()?)?;
    Some(RateLimiter::direct(Quota::per_second(per_second)))
}

/// Takes `amount` cells, at most a whole burst (one second's worth): a
/// single request larger than that is charged one second, so that it can
/// pass at all.
fn take(limiter: &DefaultDirectRateLimiter, per_second: u64, amount: u64) -> Result<(), Duration> {
    let Some(cells) = NonZeroU32::new(amount.min(per_second).min(u32::MAX as u64) as u32) else { return Ok(()) };
    match limiter.check_n(cells) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
        // Cannot happen: `cells` is at most the burst.
        Err(_) => Ok(()),
    }
}

impl Usage {
    pub fn new(quotas: Quotas) -> Usage {
        Usage {
            quotas,
            publish_bytes: limiter(quotas.publish_bytes_per_sec),
            publish_messages: limiter(quotas.publish_messages_per_sec),
            subscribe_bytes: limiter(quotas.subscribe_bytes_per_sec),
            connections: AtomicU64::new(0),
        }
    }

    /// No quotas at all.
    pub fn unlimited() -> Usage {
        Usage::new(Quotas::default())
    }

    /// Charges a publish of `messages` messages and `bytes` bytes, or says
    /// how long until it would fit. A publish refused for its bytes is not
    /// charged for its messages.
    pub fn admit_publish(&self, messages: u64, bytes: u64) -> Result<(), Duration> {
        if let (Some(limiter), Some(rate)) = (&self.publish_bytes, self.quotas.publish_bytes_per_sec) {
            take(limiter, rate, bytes)?;
        }
        if let (Some(limiter), Some(rate)) = (&self.publish_messages, self.quotas.publish_messages_per_sec) {
            take(limiter, rate, messages)?;
        }
        Ok(())
    }

    /// Waits until `bytes` more may be delivered to the principal's
    /// subscriptions, and charges them.
    pub async fn subscribe_bytes(&self, bytes: u64) {
        let (Some(limiter), Some(rate)) = (&self.subscribe_bytes, self.quotas.subscribe_bytes_per_sec) else {
            return;
        };
        let Some(cells) = NonZeroU32::new(bytes.min(rate).min(u32::MAX as u64) as u32) else { return };
        let _ = limiter.until_n_ready(cells).await;
    }

    /// Whether subscriptions must call [`Self::subscribe_bytes`].
    pub fn limits_subscribe(&self) -> bool {
        self.subscribe_bytes.is_some()
    }

    /// Counts a new connection of the principal, or refuses it at its
    /// `max_connections`; the guard uncounts it when dropped.
    pub fn connect(self: &std::sync::Arc<Self>) -> Result<ConnectionSlot, u64> {
        let limit = self.quotas.max_connections.unwrap_or(u64::MAX);
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < limit).then_some(open + 1))
            .map_err(|_| limit)?;
        Ok(ConnectionSlot { usage: std::sync::Arc::clone(self) })
    }
}

/// One connection counted against its principal's `max_connections`.
#[derive(Debug)]
pub struct ConnectionSlot {
    usage: std::sync::Arc<Usage>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.usage.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_publish_over_quota_is_refused_with_a_wait() {
        let usage = Usage::new(Quotas { publish_messages_per_sec: Some(10), ..Quotas::default() });
        // One second of burst, then refusals that say how long to wait.
        for _ in 0..10 {
            usage.admit_publish(1, 100).unwrap();
        }
        let wait = usage.admit_publish(1, 100).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
    }

    #[test]
    fn a_publish_larger_than_a_second_of_quota_passes_when_the_bucket_is_full() {
        let usage = Usage::new(Quotas { publish_bytes_per_sec: Some(1000), ..Quotas::default() });
        usage.admit_publish(1, 5000).unwrap();
        assert!(usage.admit_publish(1, 1).is_err());
    }

    #[test]
    fn connections_are_counted_up_to_the_limit_and_released() {
        let usage = Arc::new(Usage::new(Quotas { max_connections: Some(2), ..Quotas::default() }));
        let first = usage.connect().unwrap();
        let _second = usage.connect().unwrap();
        assert_eq!(usage.connect().unwrap_err(), 2);
        drop(first);
        assert!(usage.connect().is_ok());
    }
}
