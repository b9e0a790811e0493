//! A subscription's delivery task: a cursor into the channel's log and a
//! window of unacknowledged deliveries. It reads from the log (memory
//! mapped, no copies) only when the window has room, so a slow subscriber
//! costs a cursor, never a queue that grows with its lag.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Outbound;
use super::broker::{SubscriptionGuard, SubscriptionStatus};
use super::stats::Stats;
use crate::protocol::{ErrorCode, Notice, Response};
use crate::storage::{ChannelLog, StorageError};

/// Everything a delivery task needs.
pub(crate) struct Subscription {
    pub subscription_id: u32,
    pub log: Arc<ChannelLog>,
    /// The channel's next offset, advanced by its writer after each append.
    pub tail: watch::Receiver<u64>,
    /// The first offset not yet acknowledged by the subscriber.
    pub ack_floor: watch::Receiver<u64>,
    pub next_offset: u64,
    /// At most this many deliveries unacknowledged.
    pub window: u64,
    pub delivery_batch_bytes: usize,
    pub lag_notice_threshold: u64,
    pub notice_interval: Duration,
    pub deliveries: mpsc::Sender<Outbound>,
    pub cancel: CancellationToken,
    pub status: Arc<SubscriptionStatus>,
    pub stats: Arc<Stats>,
    pub _registration: SubscriptionGuard,
    /// Raised when retention skips the cursor forward: records below it
    /// can no longer be delivered, so they no longer count as in flight.
    pub skip_floor: u64,
}

impl Subscription {
    /// Delivers until cancelled, the connection goes away, or the log fails.
    pub async fn run(mut self) {
        let mut last_notice: Option<Instant> = None;
        loop {
            let ack_floor = (*self.ack_floor.borrow_and_update()).max(self.skip_floor);
            // Records below the floor may have been skipped by retention:
            // the window counts only what was sent and not acknowledged.
            let inflight = self.next_offset.saturating_sub(ack_floor);
            assert!(inflight <= self.window, "a subscription never has more than its window unacknowledged");
            Stats::high_water(&self.stats.inflight_deliveries_high_water, inflight);
            if inflight == self.window {
                if !self.wait_for_ack().await {
                    return;
                }
                continue;
            }
            self.tail.borrow_and_update();
            let room = self.window - inflight;
            match self.log.read_bounded(self.next_offset, self.delivery_batch_bytes, room) {
                Ok(batch) if batch.count > 0 => {
                    let response = Response::Deliver {
                        subscription_id: self.subscription_id,
                        count: batch.count as u32,
                        records: batch.records.clone(),
                    };
                    let head = response.encode_head(0);
                    // Published before the frame is queued: a client may ack
                    // a record the moment it arrives, and an ack counts only
                    // up to what this says was delivered.
                    self.next_offset = batch.next_offset;
                    self.status.next_offset.store(self.next_offset, Ordering::Relaxed);
                    if !self.send(Outbound::Records { head, records: batch.records }).await {
                        return;
                    }
                    if !self.maybe_notify_lag(&mut last_notice).await {
                        return;
                    }
                }
                Ok(_) => {
                    if !self.wait_for_append().await {
                        return;
                    }
                }
                Err(StorageError::OffsetOutOfRange { start, .. }) if self.next_offset < start => {
                    // Retention deleted records this subscriber had not read.
                    let skipped = start - self.next_offset;
                    self.next_offset = start;
                    self.skip_floor = start;
                    self.status.next_offset.store(start, Ordering::Relaxed);
                    Stats::add(&self.stats.skipped_notices, 1);
                    let notice = Notice::Skipped { skipped, resume_offset: start };
                    let frame = Response::Notice { subscription_id: self.subscription_id, notice }.encode(0);
                    if !self.send(Outbound::Frame(frame)).await {
                        return;
                    }
                }
                Err(error) => {
                    tracing::error!(channel = %self.log.name(), subscription = self.subscription_id, %error, "delivery stopped");
                    let message = format!("subscription {} stopped: {error}", self.subscription_id);
                    let error = Response::Error { code: ErrorCode::StorageError as u16, message }.encode(0);
                    let unsubscribed = Response::Unsubscribed { subscription_id: self.subscription_id }.encode(0);
                    let _ = self.send(Outbound::Frame(error)).await && self.send(Outbound::Frame(unsubscribed)).await;
                    // Marks the subscription ended for the connection, which
                    // then frees its id and its slot.
                    self.cancel.cancel();
                    return;
                }
            }
        }
    }

    async fn send(&self, outbound: Outbound) -> bool {
        tokio::select! {
            sent = self.deliveries.send(outbound) => sent.is_ok(),
            () = self.cancel.cancelled() => false,
        }
    }

    async fn wait_for_ack(&mut self) -> bool {
        tokio::select! {
            changed = self.ack_floor.changed() => changed.is_ok(),
            () = self.cancel.cancelled() => false,
        }
    }

    /// Waits for the next append (or an ack, which may open the window,
    /// or retention moving the log start past us).
    async fn wait_for_append(&mut self) -> bool {
        tokio::select! {
            changed = self.tail.changed() => changed.is_ok(),
            changed = self.ack_floor.changed() => changed.is_ok(),
            () = self.cancel.cancelled() => false,
        }
    }

    async fn maybe_notify_lag(&self, last_notice: &mut Option<Instant>) -> bool {
        let ack_floor = *self.ack_floor.borrow();
        let lag = self.log.next_offset().saturating_sub(ack_floor);
        if lag < self.lag_notice_threshold || last_notice.is_some_and(|at| at.elapsed() < self.notice_interval) {
            return true;
        }
        *last_notice = Some(Instant::now());
        Stats::add(&self.stats.lag_notices, 1);
        let notice = Notice::Lag { lag, next_offset: self.log.next_offset() };
        self.send(Outbound::Frame(Response::Notice { subscription_id: self.subscription_id, notice }.encode(0))).await
    }
}
