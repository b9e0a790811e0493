//! A consumer group member's task: it follows the member's assignment,
//! starting a cursor (and sending ASSIGNED) for each partition it gains,
//! revoking (and sending REVOKED) each one it loses, and letting a revoked
//! partition go once what it was sent is acknowledged, or the wait is
//! over, so that the partition's next owner starts after it. It also ends
//! the membership of a connection silent for `group_session_timeout_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::broker::ChannelHandle;
use super::connection::{CursorFactory, Cursors, lock_cursors};
use super::group::{Handover, Member};
use crate::protocol::{ErrorCode, Notice, StartPosition};
use crate::storage::ChannelLog;

/// Everything a member's task needs.
pub(crate) struct MemberTask {
    pub member: Member,
    pub factory: CursorFactory,
    pub channel: Arc<ChannelHandle>,
    pub cursors: Cursors,
    /// Where a partition starts when the group has no committed position.
    pub start: StartPosition,
    pub handover: Handover,
    pub session_timeout: Duration,
    /// When the member's connection last sent a frame (ms since `epoch`).
    pub last_frame_ms: Arc<AtomicU64>,
    pub epoch: Instant,
    /// The subscription's token: cancelled by UNSUBSCRIBE or the connection
    /// ending.
    pub cancel: CancellationToken,
}

/// For a replicated channel's group: resolves when this node no longer
/// coordinates the group (`Ok`: the `NotLeader` message naming the new
/// coordinator; `Err`: why no node can), which ends the member.
pub(crate) type CoordinatorMoved = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

impl MemberTask {
    /// Runs the member until it leaves; `coordinator_moved` (see
    /// [`CoordinatorMoved`]) ends it when its node stops coordinating.
    pub async fn run(mut self, mut coordinator_moved: Option<CoordinatorMoved>) {
        // Partitions revoked and not yet let go, with when.
        let mut draining: HashMap<u32, Instant> = HashMap::new();
        let session_check = (self.session_timeout / 4).max(Duration::from_millis(10));
        loop {
            self.follow_assignment(&mut draining).await;
            self.release_drained(&mut draining);
            if self.session_expired() {
                self.expire().await;
                break;
            }
            let poll = if draining.is_empty() { session_check } else { self.handover.poll_interval.min(session_check) };
            tokio::select! {
                changed = self.member.assignment.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep(poll) => {}
                () = self.cancel.cancelled() => break,
                moved = async {
                    match coordinator_moved.as_mut() {
                        Some(moved) => moved.await,
                        None => std::future::pending().await,
                    }
                } => {
                    // The members subscribe again at the new coordinator, which
                    // starts from the group's positions in the metadata group.
                    let group = self.member.group();
                    tracing::info!(channel = %group.channel(), group = group.name(), member = self.member.id, "this node no longer coordinates the group: its member is sent on");
                    match moved {
                        Ok(message) => self.end_subscription(ErrorCode::NotLeader, message).await,
                        Err(message) => self.end_subscription(ErrorCode::InvalidRequest, message).await,
                    }
                    break;
                }
                () = self.channel.deleted.cancelled() => {
                    let message = format!(
                        "subscription {} stopped: channel {} was deleted",
                        self.factory.subscription_id,
                        self.member.group().channel()
                    );
                    self.end_subscription(ErrorCode::UnknownChannel, message).await;
                    break;
                }
            }
        }
        // Leaving: every cursor stops; dropping the member hands its
        // partitions to the others at once.
        let cursors: Vec<_> = lock_cursors(&self.cursors).drain().collect();
        for (_, cursor) in cursors {
            cursor.cancel.cancel();
        }
    }

    /// Starts what was gained and revokes what was lost.
    async fn follow_assignment(&mut self, draining: &mut HashMap<u32, Instant>) {
        let assignment = self.member.assignment.borrow_and_update().clone();
        let running: Vec<u32> = lock_cursors(&self.cursors).keys().copied().collect();
        for &partition in running.iter().filter(|p| !assignment.partitions.contains(p)) {
            if draining.contains_key(&partition) {
                continue;
            }
            let stopped = lock_cursors(&self.cursors).get(&partition).map(|cursor| {
                cursor.revoked.cancel();
                cursor.reading_stopped.clone()
            });
            draining.insert(partition, Instant::now());
            // REVOKED goes out only once the cursor has stopped reading:
            // no delivery of the partition follows it.
            if let Some(stopped) = stopped {
                tokio::select! {
                    () = stopped.cancelled() => {}
                    () = self.cancel.cancelled() => return,
                }
            }
            self.notify(partition, Notice::Revoked { generation: assignment.generation }).await;
        }
        for &partition in &assignment.partitions {
            let revoked_and_back = draining.remove(&partition).is_some();
            if running.contains(&partition) && !revoked_and_back {
                continue;
            }
            // Given back while it was being let go: its revoked cursor
            // cannot read again, so a new one starts from the committed
            // position (what was sent and not acknowledged comes again).
            if revoked_and_back && let Some(cursor) = lock_cursors(&self.cursors).remove(&partition) {
                cursor.cancel.cancel();
            }
            let Ok(handle) = self.channel.partition(partition) else { continue };
            let first_offset = self.first_offset(&handle.log);
            // ASSIGNED is queued before the cursor can queue a delivery.
            let notice = Notice::Assigned { generation: assignment.generation, first_offset };
            self.notify(partition, notice).await;
            let cursor = self.factory.start(&handle, first_offset, &self.cancel, &self.channel.deleted);
            lock_cursors(&self.cursors).insert(partition, cursor);
        }
    }

    /// Lets go of revoked partitions whose deliveries are all acknowledged
    /// (or whose wait is over).
    fn release_drained(&self, draining: &mut HashMap<u32, Instant>) {
        let released: Vec<u32> = {
            let cursors = lock_cursors(&self.cursors);
            draining
                .iter()
                .filter(|&(partition, &revoked_at)| {
                    cursors.get(partition).is_none_or(|cursor| {
                        let acked_to = *cursor.ack_floor.borrow();
                        let delivered_to = cursor.status.next_offset.load(Ordering::Relaxed);
                        self.handover.may_release(revoked_at, acked_to, delivered_to)
                    })
                })
                .map(|(&partition, _)| partition)
                .collect()
        };
        for partition in released {
            draining.remove(&partition);
            if let Some(cursor) = lock_cursors(&self.cursors).remove(&partition) {
                cursor.cancel.cancel();
            }
            self.member.release(partition);
        }
    }

    /// The group's committed position in a partition (never past its end),
    /// or where the member's SUBSCRIBE said to start.
    fn first_offset(&self, log: &ChannelLog) -> u64 {
        let (start, next) = (log.start_offset(), log.next_offset());
        let group = self.member.group();
        match self.factory.broker.offsets.group_position(group.channel().as_str(), group.name(), log.partition()) {
            Some(committed) if committed > next => {
                self.factory.broker.offsets.rewind_group(group.channel().as_str(), group.name(), log.partition(), next);
                next
            }
            Some(committed) => committed,
            None => {
                let first = match self.start {
                    StartPosition::Earliest => start,
                    StartPosition::Latest => next,
                    StartPosition::Offset(offset) => offset.clamp(start, next),
                    StartPosition::TimeUs(time_us) => log.offset_for_time(time_us).unwrap_or(start),
                };
                // Stored at once, as for a durable subscription: a member
                // that dies before acknowledging anything must not make
                // the next one start at a later "latest".
                let channel =
                    super::offsets::ChannelRef { name: group.channel().as_str(), deleted: &self.channel.deleted };
                if let Err(error) =
                    self.factory.broker.offsets.record_group(&channel, group.name(), log.partition(), first)
                {
                    tracing::warn!(channel = channel.name, group = group.name(), %error, "could not store a group's starting position");
                }
                first
            }
        }
    }

    fn session_expired(&self) -> bool {
        let last = self.last_frame_ms.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(last) > self.session_timeout.as_millis() as u64
    }

    /// Ends the membership of a silent member: its subscription ends with
    /// an ERROR and UNSUBSCRIBED, its partitions go to the others.
    async fn expire(&self) {
        let group = self.member.group();
        tracing::info!(channel = %group.channel(), group = group.name(), member = self.member.id, "a silent member left its group");
        let message = format!(
            "subscription {} left group {} of channel {}: nothing received for group_session_timeout_ms = {}",
            self.factory.subscription_id,
            group.name(),
            group.channel(),
            self.session_timeout.as_millis()
        );
        self.end_subscription(ErrorCode::GroupSessionExpired, message).await;
    }

    async fn end_subscription(&self, code: ErrorCode, message: String) {
        self.factory.end(&self.cursors, &self.cancel, code, message).await;
    }

    async fn notify(&self, partition: u32, notice: Notice) {
        self.factory.notify(partition, notice, &self.cancel).await;
    }
}
