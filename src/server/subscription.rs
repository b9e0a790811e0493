//! A subscription's delivery task: a cursor into the channel's log and a
//! window of unacknowledged deliveries. It reads from the log (memory
//! mapped, no copies) only when the window has room, so a slow subscriber
//! costs a cursor, never a queue that grows with its lag.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::broker::{SubscriptionGuard, SubscriptionStatus};
use super::stats::Stats;
use super::{Delivery, Outbound};
use crate::protocol::{Notice, Response};
use crate::storage::{ChannelLog, ReadBatch, StorageError};

/// Everything a delivery task needs.
pub(crate) struct Subscription {
    pub subscription_id: u32,
    /// The connection's protocol version, which frames are encoded in.
    pub version: u16,
    pub log: Arc<ChannelLog>,
    /// The channel's next offset, advanced by its writer after each append.
    pub tail: watch::Receiver<u64>,
    /// The channel's first offset, advanced when retention deletes segments.
    pub log_start: watch::Receiver<u64>,
    /// False once the start watch's sender is gone: nothing more will move
    /// it, and waiting on it would return at once, forever.
    pub log_start_open: bool,
    /// The first offset not yet acknowledged by the subscriber.
    pub ack_floor: watch::Receiver<u64>,
    pub next_offset: u64,
    /// At most this many deliveries unacknowledged.
    pub window: u64,
    pub delivery_batch_bytes: usize,
    pub lag_notice_threshold: u64,
    pub notice_interval: Duration,
    pub deliveries: mpsc::Sender<Delivery>,
    pub cancel: CancellationToken,
    /// Cancelled when a consumer group revokes this partition: nothing new
    /// is read; what was queued still goes out, and the task ends with
    /// `cancel` once the member lets the partition go.
    pub revoked: CancellationToken,
    /// Cancelled here once `revoked` is seen: nothing more is read.
    pub reading_stopped: CancellationToken,
    /// The whole subscription's token (`cancel` is this partition's, a
    /// child of it): a stopped subscription ends in every partition.
    pub subscription_cancel: CancellationToken,
    /// Cancelled when the channel is deleted.
    pub channel_deleted: CancellationToken,
    pub status: Arc<SubscriptionStatus>,
    pub stats: Arc<Stats>,
    pub _registration: SubscriptionGuard,
    /// Raised when retention skips the cursor forward: records below it
    /// can no longer be delivered, so they no longer count as in flight.
    pub skip_floor: u64,
    /// When the last LAG notice was sent.
    pub last_lag_notice: Option<Instant>,
    /// The principal's subscribe quota, when it has one: each batch waits
    /// until it fits.
    pub subscribe_quota: Option<Arc<crate::security::Usage>>,
}

/// What a delivery task waits for when it cannot deliver now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The window is full: only an ack opens it.
    ForAck,
    /// Caught up: an append (or an ack) gives it something to do.
    ForAppend,
}

impl Subscription {
    /// Delivers until cancelled, the connection goes away, or the log fails.
    pub async fn run(mut self) {
        loop {
            if self.channel_deleted.is_cancelled() {
                let channel = format!("{} (it was deleted)", self.log.name());
                self.stop_on_error(StorageError::UnknownChannel { channel }).await;
                return;
            }
            if self.revoked.is_cancelled() {
                self.reading_stopped.cancel();
                tokio::select! {
                    () = self.cancel.cancelled() => return,
                    () = self.channel_deleted.cancelled() => continue,
                }
            }
            let ack_floor = (*self.ack_floor.borrow_and_update()).max(self.skip_floor);
            // Records below the floor may have been skipped by retention:
            // the window counts only what was sent and not acknowledged.
            let inflight = self.next_offset.saturating_sub(ack_floor);
            assert!(inflight <= self.window, "a subscription never has more than its window unacknowledged");
            Stats::high_water(&self.stats.inflight_deliveries_high_water, inflight);
            if inflight == self.window {
                if !self.wait(Waiting::ForAck).await {
                    return;
                }
                continue;
            }
            self.tail.borrow_and_update();
            let room = self.window - inflight;
            match self.log.read_bounded(self.next_offset, self.delivery_batch_bytes, room) {
                Ok(batch) if batch.count > 0 => {
                    if !self.deliver(batch).await {
                        return;
                    }
                }
                Ok(_) => {
                    if !self.wait(Waiting::ForAppend).await {
                        return;
                    }
                }
                Err(StorageError::OffsetOutOfRange { start, .. }) if self.next_offset < start => {
                    if !self.skip_to(start).await {
                        return;
                    }
                }
                Err(error) => {
                    self.stop_on_error(error).await;
                    return;
                }
            }
        }
    }

    /// Sends one batch of records (good records before a corrupt one
    /// included: the log returns them first, and the error on the next
    /// read).
    async fn deliver(&mut self, batch: ReadBatch) -> bool {
        if let Some(quota) = &self.subscribe_quota {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return false,
                // Not delivered: the loop sees the revocation or the
                // deletion and stops reading.
                () = self.revoked.cancelled() => return true,
                () = self.channel_deleted.cancelled() => return true,
                () = quota.subscribe_bytes(batch.records.len() as u64) => {}
            }
        }
        let head = crate::protocol::deliver_head(
            self.version,
            0,
            self.subscription_id,
            self.log.partition(),
            batch.count as u32,
            batch.records.len(),
        );
        // Published before the frame is queued: a client may ack a record
        // the moment it arrives, and an ack counts only up to what this
        // says was delivered.
        self.next_offset = batch.next_offset;
        self.status.next_offset.store(self.next_offset, Ordering::Relaxed);
        self.send(Outbound::Records { head, records: batch.records }).await && self.notify_lag().await.is_some()
    }

    /// Moves the cursor to the log start after retention deleted records
    /// this subscriber had not read, and tells it.
    async fn skip_to(&mut self, start: u64) -> bool {
        let skipped = start - self.next_offset;
        self.next_offset = start;
        self.skip_floor = start;
        self.status.next_offset.store(start, Ordering::Relaxed);
        Stats::add(&self.stats.skipped_notices, 1);
        let notice = Notice::Skipped { skipped, resume_offset: start };
        self.send_notice(notice).await
    }

    async fn stop_on_error(&mut self, error: StorageError) {
        tracing::error!(channel = %self.log.name(), partition = self.log.partition(), subscription = self.subscription_id, %error, "delivery stopped");
        let message = format!("subscription {} stopped: {error}", self.subscription_id);
        let error = Response::Error { code: super::storage_error_code(&error) as u16, message };
        let mut frames = error.encode_for(self.version, 0);
        let unsubscribed = Response::Unsubscribed { subscription_id: self.subscription_id };
        frames.extend_from_slice(&unsubscribed.encode_for(self.version, 0));
        // One item, so that nothing comes between the ERROR and the
        // UNSUBSCRIBED it explains, queued behind the deliveries already
        // sent (the good records before a damaged one reach the client
        // first). The connection's writer marks the subscription ended when
        // it takes them for writing: a SUBSCRIBE reusing the id before that
        // gets SubscriptionExists, one after it is answered after them.
        // The whole subscription ends, in every partition it reads: the
        // token the writer cancels is the subscription's, not this
        // partition's; a second partition stopping too finds it cancelled
        // and its frames are dropped.
        let subscription = self.subscription_cancel.clone();
        let last = Delivery { ended: subscription.clone(), outbound: Outbound::Frame(frames), ends_subscription: true };
        let queued = tokio::select! {
            sent = self.deliveries.send(last) => sent.is_ok(),
            () = subscription.cancelled() => true,
        };
        if !queued {
            subscription.cancel();
        }
    }

    async fn send_notice(&self, notice: Notice) -> bool {
        let notice =
            Response::Notice { subscription_id: self.subscription_id, partition: self.log.partition(), notice };
        self.send(Outbound::Frame(notice.encode_for(self.version, 0))).await
    }

    async fn send(&self, outbound: Outbound) -> bool {
        let delivery = Delivery { ended: self.cancel.clone(), outbound, ends_subscription: false };
        // Ended first: an ended subscription (whose task may run late) queues
        // nothing more, rather than frames the writer would only drop.
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => false,
            sent = self.deliveries.send(delivery) => sent.is_ok(),
        }
    }

    /// Waits until something may let the subscription deliver: an ack, an
    /// append (when caught up), retention moving the log start (sent as
    /// SKIPPED at once, even with a full window), or the next LAG check,
    /// which runs on its own timer so that a subscriber whose window is
    /// full still hears how far behind it is. False when the subscription
    /// ends.
    async fn wait(&mut self, waiting: Waiting) -> bool {
        let Some(next_lag_check) = self.notify_lag().await else { return false };
        // Caught up with a window below the threshold, the lag cannot reach
        // it until an append wakes the task anyway: no timer.
        let lag_possible = waiting == Waiting::ForAck || self.window >= self.lag_notice_threshold;
        let lag_timer = tokio::time::sleep_until(next_lag_check.into());
        tokio::select! {
            changed = self.ack_floor.changed() => changed.is_ok(),
            changed = self.tail.changed(), if waiting == Waiting::ForAppend => changed.is_ok(),
            changed = self.log_start.changed(), if self.log_start_open => {
                let start = *self.log_start.borrow_and_update();
                match changed {
                    Ok(()) if start > self.next_offset => self.skip_to(start).await,
                    Ok(()) => true,
                    Err(_) => {
                        self.log_start_open = false;
                        true
                    }
                }
            }
            () = lag_timer, if lag_possible => true,
            () = self.revoked.cancelled() => true,
            () = self.channel_deleted.cancelled() => true,
            () = self.cancel.cancelled() => false,
        }
    }

    /// Sends LAG when the subscriber is at least `lag_notice_threshold`
    /// behind and none was sent in the last `notice_interval`. Returns
    /// when the next check is due, or `None` when the subscription ended.
    async fn notify_lag(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let ack_floor = (*self.ack_floor.borrow()).max(self.skip_floor);
        let next_offset = self.log.next_offset();
        let lag = next_offset.saturating_sub(ack_floor);
        if lag < self.lag_notice_threshold {
            return Some(now + self.notice_interval);
        }
        if let Some(last) = self.last_lag_notice
            && now < last + self.notice_interval
        {
            return Some(last + self.notice_interval);
        }
        self.last_lag_notice = Some(now);
        Stats::add(&self.stats.lag_notices, 1);
        let notice = Notice::Lag { lag, next_offset };
        self.send_notice(notice).await.then_some(now + self.notice_interval)
    }
}
