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
    publish_bytes: Option<Bucket>,
    publish_messages: Option<Bucket>,
    subscribe_bytes: Option<Bucket>,
    /// Shared with the principal's `Usage` after a reload changed its
    /// quotas: its open connections still count.
    connections: std::sync::Arc<AtomicU64>,
}

/// One rate: a GCRA bucket holding one second of it, and what was charged
/// beyond what it could take at once.
#[derive(Debug)]
struct Bucket {
    limiter: DefaultDirectRateLimiter,
    /// Half the bucket: the most one charge takes from it, so that a
    /// charge never waits for a full bucket (which other requests of the
    /// principal could keep from filling).
    take_max: u64,
    /// Charged and not yet taken: the part of a large request beyond
    /// `take_max`, taken by the principal's next charges. The long-run
    /// rate stays the quota, whatever the request sizes.
    carried: AtomicU64,
}

impl Bucket {
    fn new(per_second: Option<u64>) -> Option<Bucket> {
        let per_second = NonZeroU32::new(u32::try_from(per_second?).ok()?)?;
        Some(Bucket {
            limiter: RateLimiter::direct(Quota::per_second(per_second)),
            take_max: u64::from(per_second.get()).div_ceil(2),
            carried: AtomicU64::new(0),
        })
    }

    /// Charges `amount` plus what was carried: takes up to `take_max` of
    /// it now and carries the rest, or, when even that does not fit, takes
    /// nothing and says how long until it would.
    fn take(&self, amount: u64) -> Result<(), Duration> {
        let carried = self.carried.swap(0, Ordering::AcqRel);
        let total = amount.saturating_add(carried);
        let now = total.min(self.take_max);
        let Some(cells) = NonZeroU32::new(now as u32) else { return Ok(()) };
        match self.limiter.check_n(cells) {
            Ok(Ok(())) => {
                self.carried.fetch_add(total - now, Ordering::AcqRel);
                Ok(())
            }
            Ok(Err(not_until)) => {
                self.carried.fetch_add(carried, Ordering::AcqRel);
                Err(not_until.wait_time_from(DefaultClock::default().now()))
            }
            // Cannot happen: `cells` is at most half the burst.
            Err(_) => Ok(()),
        }
    }

    /// As [`Bucket::take`], waiting until it fits.
    async fn take_waiting(&self, amount: u64) {
        // A refused `take` took nothing, so the same amount is asked again.
        while let Err(wait) = self.take(amount) {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Usage {
    pub fn new(quotas: Quotas) -> Usage {
        Usage {
            quotas,
            publish_bytes: Bucket::new(quotas.publish_bytes_per_sec),
            publish_messages: Bucket::new(quotas.publish_messages_per_sec),
            subscribe_bytes: Bucket::new(quotas.subscribe_bytes_per_sec),
            connections: std::sync::Arc::default(),
        }
    }

    /// New quotas for the same principal: fresh buckets, the same count of
    /// open connections.
    pub fn with_quotas(&self, quotas: Quotas) -> Usage {
        Usage { connections: std::sync::Arc::clone(&self.connections), ..Usage::new(quotas) }
    }

    /// No quotas at all.
    pub fn unlimited() -> Usage {
        Usage::new(Quotas::default())
    }

    /// Charges a publish of `messages` messages and `bytes` bytes, or says
    /// how long until it would fit. Messages are checked first: a publish
    /// refused for its messages costs nothing; one refused for its bytes
    /// has been charged its messages.
    pub fn admit_publish(&self, messages: u64, bytes: u64) -> Result<(), Duration> {
        if let Some(bucket) = &self.publish_messages {
            bucket.take(messages)?;
        }
        if let Some(bucket) = &self.publish_bytes {
            bucket.take(bytes)?;
        }
        Ok(())
    }

    /// Whether the principal has a publish quota at all.
    pub fn limits_publish(&self) -> bool {
        self.publish_messages.is_some() || self.publish_bytes.is_some()
    }

    /// Waits until `bytes` more may be delivered to the principal's
    /// subscriptions and fetches, and charges them.
    pub async fn subscribe_bytes(&self, bytes: u64) {
        if let Some(bucket) = &self.subscribe_bytes {
            bucket.take_waiting(bytes).await;
        }
    }

    /// The most bytes one delivery batch or fetch of the principal
    /// carries: a quarter of a second of its subscribe quota; `None`
    /// without a subscribe quota.
    pub fn subscribe_batch_bytes_max(&self) -> Option<u64> {
        self.quotas.subscribe_bytes_per_sec.map(|per_second| (per_second / 4).max(1))
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
    fn a_publish_larger_than_the_bucket_is_charged_whole_over_the_next_ones() {
        // 1,000 B/s: a 5,000 B publish takes half the bucket now and
        // carries 4,500 B, which the next publishes pay before their own.
        let usage = Usage::new(Quotas { publish_bytes_per_sec: Some(1000), ..Quotas::default() });
        usage.admit_publish(1, 5000).unwrap();
        usage.admit_publish(1, 1).unwrap();
        let wait = usage.admit_publish(1, 1).unwrap_err();
        assert!(wait > Duration::from_millis(400), "{wait:?}");
    }

    #[test]
    fn a_reload_with_new_quotas_keeps_counting_open_connections() {
        let usage = Arc::new(Usage::new(Quotas { max_connections: Some(1), ..Quotas::default() }));
        let _open = usage.connect().unwrap();
        let reloaded = Arc::new(usage.with_quotas(Quotas { max_connections: Some(1), ..Quotas::default() }));
        assert_eq!(reloaded.connect().unwrap_err(), 1);
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
