//! A subscription as a stream of messages and notices.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::ClientError;
use super::connection::{Connection, EndReason, SubscriptionEvent};
use crate::protocol::{ErrorCode, Notice, Request, Response, StartPosition};
use crate::record::Record;
use crate::record::RecordIter;

/// Notices a subscriber's queue holds room for per partition, beyond its
/// window of deliveries.
const NOTICES_PER_PARTITION: usize = 8;

/// Where and how to subscribe.
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    /// One partition, or `None` for every partition of the channel.
    pub partition: Option<u32>,
    /// Where to start in each partition it reads (an explicit offset needs
    /// one partition).
    pub start: StartPosition,
    /// Name of a durable subscription: the broker stores its acks and a
    /// later subscription with the same name resumes after the last one.
    pub durable_name: Option<String>,
    /// A consumer group to join: the broker assigns this subscription its
    /// share of the channel's partitions, announced by
    /// [`Notice::Assigned`] and [`Notice::Revoked`] (acknowledge what you
    /// were sent of a revoked partition, so that it moves on).
    pub group: Option<String>,
    /// Most unacknowledged deliveries per partition (the broker caps it at
    /// its `max_inflight_deliveries`). The client's queue for the
    /// subscription holds a window of every partition it may read: for a
    /// subscription to every partition (or a group member), it asks the
    /// broker for the channel's partition count first (one LIST_CHANNELS).
    /// Partitions added later (announced by [`Notice::Assigned`]) are read
    /// too, but the queue is not resized: an application that leaves full
    /// windows of them unread can overflow it (`SubscriberOverflow`).
    pub max_inflight: u32,
}

impl Default for SubscribeOptions {
    fn default() -> SubscribeOptions {
        SubscribeOptions {
            partition: None,
            start: StartPosition::Earliest,
            durable_name: None,
            group: None,
            max_inflight: 1024,
        }
    }
}

/// What a subscriber receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A record of `partition`, in offset order within it.
    Message {
        partition: u32,
        record: Record,
    },
    Notice {
        partition: u32,
        notice: Notice,
    },
}

/// A live subscription. Implements `futures_core::Stream`.
pub struct Subscriber {
    connection: Connection,
    subscription_id: u32,
    /// The partitions read, each with its first offset.
    partitions: Vec<(u32, u64)>,
    events: mpsc::Receiver<SubscriptionEvent>,
    /// Why the subscription ended, when its queue had no room left for a
    /// `Closed` event.
    ended: EndReason,
    ready: VecDeque<Event>,
    closed: bool,
}

impl Subscriber {
    /// Subscribes to `channel`.
    ///
    /// # Errors
    /// The broker refused the subscription (unknown channel, offset out of
    /// range, too many subscriptions), or the connection is gone.
    pub async fn subscribe(
        connection: &Connection,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<Subscriber, ClientError> {
        if options.max_inflight == 0 {
            return Err(ClientError::Invalid("max_inflight must be at least 1".into()));
        }
        // One slot per possible delivery frame: the broker never has more
        // than the window of deliveries outstanding per partition (windows
        // are per partition), plus room for each partition's notices. Only
        // notices piling up while the application does not read can fill
        // it; the subscription then ends with `SubscriberOverflow`. A
        // subscription to every partition (or a group member, which may be
        // given any of them) is sized for the channel's partition count
        // when it subscribes.
        let window = options.max_inflight.min(connection.limits().max_inflight_deliveries.max(1)) as usize;
        let partitions = match options.partition {
            Some(_) => 1,
            None if connection.protocol_version() >= 2 => {
                super::publisher::partition_count(connection, channel).await?.unwrap_or(1).max(1) as usize
            }
            None => 1,
        };
        let capacity = window.saturating_add(NOTICES_PER_PARTITION).saturating_mul(partitions);
        let (events_sender, events) = mpsc::channel(capacity);
        let (subscription_id, ended) = connection.route(events_sender);
        let request = Request::Subscribe {
            subscription_id,
            channel: channel.to_owned(),
            partition: options.partition,
            start: options.start,
            durable_name: options.durable_name,
            group: options.group,
            max_inflight: options.max_inflight,
        };
        let partitions = match connection.request(request).await {
            Ok(Response::Subscribed { partitions, .. }) => partitions,
            Ok(other) => {
                connection.unroute(subscription_id);
                return Err(ClientError::Unexpected(format!("{other:?}")));
            }
            Err(error) => {
                connection.unroute(subscription_id);
                return Err(error);
            }
        };
        Ok(Subscriber {
            connection: connection.clone(),
            subscription_id,
            partitions,
            events,
            ended,
            ready: VecDeque::new(),
            closed: false,
        })
    }

    /// The offset of the first message this subscription delivers in the
    /// first partition it reads (its only one, for a one-partition
    /// subscription).
    pub fn first_offset(&self) -> u64 {
        self.partitions.first().map_or(0, |&(_, first_offset)| first_offset)
    }

    /// Every partition this subscription reads, with the offset it started
    /// at there.
    pub fn partitions(&self) -> &[(u32, u64)] {
        &self.partitions
    }

    /// The next message or notice; `None` once the subscription has ended.
    /// An `Err` is the reason it ended and is returned once.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Acknowledges every message up to and including `offset` of the
    /// partition this subscription reads, when it reads one.
    ///
    /// # Errors
    /// `Invalid` when it reads several partitions (use
    /// [`Subscriber::ack_partition`]); the connection is gone.
    pub async fn ack(&self, offset: u64) -> Result<(), ClientError> {
        match self.partitions[..] {
            [(partition, _)] => self.ack_partition(partition, offset).await,
            _ => Err(ClientError::Invalid(format!(
                "this subscription reads {} partitions: acknowledge with ack_partition",
                self.partitions.len()
            ))),
        }
    }

    /// Acknowledges every message of `partition` up to and including
    /// `offset`.
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn ack_partition(&self, partition: u32, offset: u64) -> Result<(), ClientError> {
        let ack = Request::Ack { subscription_id: self.subscription_id, partition, offset };
        self.connection.send_only(ack).await
    }

    /// Ends the subscription.
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        // Ended already (by the broker, or by an overflow): nothing to end.
        if self.ended.get().is_some() {
            self.connection.unroute(self.subscription_id);
            return Ok(());
        }
        let result = self.connection.request(Request::Unsubscribe { subscription_id: self.subscription_id }).await;
        self.connection.unroute(self.subscription_id);
        match result {
            // After an overflow the client has unsubscribed already.
            Err(error)
                if error.code() == Some(ErrorCode::UnknownSubscription)
                    && matches!(self.ended.get(), Some(ClientError::SubscriberOverflow { .. })) =>
            {
                Ok(())
            }
            result => result.map(|_| ()),
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, ClientError>>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if self.closed {
                return Poll::Ready(None);
            }
            match self.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.closed = true;
                    if let Some(error) = self.ended.get() {
                        return Poll::Ready(Some(Err(error.clone())));
                    }
                }
                Poll::Ready(Some(SubscriptionEvent::Notice { partition, notice })) => {
                    match notice {
                        Notice::Assigned { first_offset, .. } => {
                            self.partitions.retain(|&(p, _)| p != partition);
                            self.partitions.push((partition, first_offset));
                            self.partitions.sort_unstable();
                        }
                        Notice::Revoked { .. } => self.partitions.retain(|&(p, _)| p != partition),
                        Notice::Lag { .. } | Notice::Skipped { .. } => {}
                    }
                    self.ready.push_back(Event::Notice { partition, notice });
                }
                Poll::Ready(Some(SubscriptionEvent::Closed(error))) => {
                    self.closed = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Some(SubscriptionEvent::Records { partition, count, records })) => {
                    let before = self.ready.len();
                    for record in RecordIter::new(records) {
                        match record {
                            Ok(record) => self.ready.push_back(Event::Message { partition, record }),
                            Err(error) => {
                                self.closed = true;
                                return Poll::Ready(Some(Err(ClientError::Corrupt(error.to_string()))));
                            }
                        }
                    }
                    if self.ready.len() - before != count as usize {
                        self.closed = true;
                        let problem =
                            format!("a delivery announced {count} records and held {}", self.ready.len() - before);
                        return Poll::Ready(Some(Err(ClientError::Corrupt(problem))));
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("subscription_id", &self.subscription_id)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl futures_core::Stream for Subscriber {
    type Item = Result<Event, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.connection.unroute(self.subscription_id);
    }
}
