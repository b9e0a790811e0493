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
