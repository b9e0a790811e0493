//! A subscription to every partition of a channel (outside consumer
//! groups): its task that starts reading each partition added to the
//! channel later (ALTER_CHANNEL), announced to the client by ASSIGNED, so
//! that messages routed to a new partition are not left unread.
//!
//! A partition added after the subscription started holds only messages
//! published after it started, so it is read from its beginning, whatever
//! the subscription's start position (where a durable subscription has a
//! stored position there, from that position, as any subscription resumes).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::broker::ChannelHandle;
use super::connection::{CursorFactory, Cursors, first_offset, lock_cursors};
use super::offsets::ChannelRef;
use crate::protocol::{ErrorCode, Notice, StartPosition};

/// Everything the task needs.
pub(crate) struct PartitionFollower {
    pub factory: CursorFactory,
    pub channel: Arc<ChannelHandle>,
    pub cursors: Cursors,
    /// The subscription's token: cancelled by UNSUBSCRIBE or the connection
    /// ending.
    pub cancel: CancellationToken,
}

/// For a replicated channel (cluster mode): resolves once the channel has
/// a partition none of whose replicas is on this node (added later, or
/// moved away), which ends the subscription, since this node never
/// receives that partition's records (docs/REPLICATION.md, "Adding
/// partitions to a replicated channel"): `Ok` with the `NotLeader` message
/// naming a node that holds every partition, `Err` with why none does.
pub(crate) type PlacedElsewhere = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

impl PartitionFollower {
    /// Runs until the subscription ends; `placed_elsewhere` (see
    /// [`PlacedElsewhere`]) ends it when its node stops hosting a
    /// partition.
    pub async fn run(self, mut placed_elsewhere: Option<PlacedElsewhere>) {
        let mut partition_count = self.channel.partitions_added.subscribe();
        // A partition added between the subscription's start and this
        // task's is caught by the first pass.
        loop {
            let count = *partition_count.borrow_and_update();
            for partition in 0..count {
                if self.cancel.is_cancelled() || self.channel.deleted.is_cancelled() {
                    return;
                }
                self.start_if_new(partition).await;
            }
            tokio::select! {
                changed = partition_count.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = self.cancel.cancelled() => return,
                () = self.channel.deleted.cancelled() => return,
                placed = async {
                    match placed_elsewhere.as_mut() {
                        Some(placed) => placed.await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!(channel = %self.factory.channel, subscription = self.factory.subscription_id, "a partition of the channel is not hosted here: a subscription of every partition ends");
                    let (code, message) = match placed {
                        Ok(message) => (ErrorCode::NotLeader, message),
                        Err(message) => (ErrorCode::InvalidRequest, message),
                    };
                    self.factory.end(&self.cursors, &self.cancel, code, message).await;
                    return;
                }
            }
        }
    }

    /// Starts reading `partition` unless the subscription already does.
    async fn start_if_new(&self, partition: u32) {
        if lock_cursors(&self.cursors).contains_key(&partition) {
            return;
        }
        let broker = &self.factory.broker;
        // A replicated channel's partition with no replica here has an
        // empty local log that never fills: not read (`placed_elsewhere`
        // ends the subscription).
        if let Some(replicas) = broker.replicas()
            && replicas.is_replicated(self.factory.channel.as_str())
            && !replicas.placed_here(self.factory.channel.as_str(), partition)
        {
            return;
        }
        let Ok(handle) = self.channel.partition(partition) else { return };
        let channel_name = self.factory.channel.as_str();
        let durable_name = self.factory.durable_name.as_deref();
        let stored = durable_name.and_then(|durable| broker.offsets.get(channel_name, durable, partition));
        // From the start never fails.
        let Ok(first_offset) = first_offset(broker, &handle.log, stored, StartPosition::Earliest, durable_name) else {
            return;
        };
        if let Some(durable) = &self.factory.durable_name
            && stored.is_none()
        {
            let channel = ChannelRef { name: channel_name, deleted: &self.channel.deleted };
            if let Err(error) = broker.offsets.record(&channel, durable, partition, first_offset) {
                // The partition is still read; its position is not kept
                // (the limit is logged where it is set).
                tracing::warn!(channel = channel_name, partition, durable, %error, "a partition added later is read without a stored position");
            }
        }
        // ASSIGNED is queued before the cursor can queue a delivery.
        if !self.factory.notify(partition, Notice::Assigned { generation: 0, first_offset }, &self.cancel).await {
            return;
        }
        let cursor = self.factory.start(&handle, first_offset, &self.cancel, &self.channel.deleted);
        lock_cursors(&self.cursors).insert(partition, cursor);
    }
}
