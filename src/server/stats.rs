//! Counters the server keeps about itself, readable in-process (tests, the
//! admin view) without a metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering};

/// Server-wide counters. All relaxed: they are reports, not
/// synchronisation.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub messages_appended: AtomicU64,
    pub publishes_rejected_too_large: AtomicU64,
    pub publishes_rejected_inflight: AtomicU64,
    pub publishes_rejected_backpressure: AtomicU64,
    pub publishes_rejected_invalid_channel: AtomicU64,
    pub publishes_rejected_storage: AtomicU64,
    /// Publishes refused with StorageFull (the disk was full).
    pub publishes_rejected_storage_full: AtomicU64,
    /// Publishes read and not yet answered, all connections together.
    pub inflight_publishes: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub lag_notices: AtomicU64,
    pub skipped_notices: AtomicU64,
    /// The most unanswered publishes any connection has had at once.
    pub inflight_publishes_high_water: AtomicU64,
    /// The most unacknowledged deliveries any subscription has had at once.
    pub inflight_deliveries_high_water: AtomicU64,
    /// Publishes refused over their principal's quota (BACKPRESSURE).
    pub publishes_rejected_quota: AtomicU64,
    /// HELLOs refused for a wrong or missing credential.
    pub authentication_failures: AtomicU64,
    /// Requests refused for a missing permission.
    pub unauthorized: AtomicU64,
    /// TLS handshakes that failed or timed out (a plaintext client on a
    /// TLS port among them).
    pub tls_handshake_failures: AtomicU64,
    /// Permission refusals, logged at a bounded rate.
    pub(crate) unauthorized_log: RateLimitedLog,
    /// Storage errors met while serving requests, logged at a bounded rate.
    pub(crate) storage_error_log: RateLimitedLog,
}

/// Lets a repeated log line through at most once per
/// [`RateLimitedLog::INTERVAL`], counting the ones held back, so that a
/// failing disk under a stream of requests logs a line per second, not one
/// per request.
#[derive(Debug, Default)]
pub(crate) struct RateLimitedLog {
    /// When the next line may go out, in ms since `epoch`.
    next_at_ms: AtomicU64,
    held_back: AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

impl RateLimitedLog {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    /// `Some(n)` when a line may be logged now, `n` being how many were
    /// held back since the last one; `None` when this one is held back.
    pub(crate) fn admit(&self) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(std::time::Instant::now);
        let now_ms = epoch.elapsed().as_millis() as u64;
        let next_at_ms = self.next_at_ms.load(Ordering::Relaxed);
        let due = now_ms >= next_at_ms
            && self
                .next_at_ms
                .compare_exchange(
                    next_at_ms,
                    now_ms + Self::INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if due {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub(crate) fn record_append(&self, count: u64) {
        Stats::add(&self.messages_appended, count);
    }

    pub(crate) fn high_water(counter: &AtomicU64, value: u64) {
        counter.fetch_max(value, Ordering::Relaxed);
    }
}
