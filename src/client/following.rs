//! A subscription that outlives the node serving it: a
//! [`FollowingSubscriber`] subscribes again, elsewhere when it must,
//! whenever its subscription ends for a reason another node can mend.
//!
//! In cluster mode a consumer group is served by one node, its coordinator,
//! which sends a member elsewhere (`NotLeader` naming the coordinator) and
//! ends its members when the coordinator moves; and any node can fail. A
//! [`Subscriber`] lives on one connection and ends with the error; this
//! type follows: to the node an error names, or else to the cluster's
//! nodes in turn (from METADATA), pausing between attempts, until a
//! subscription is taken or [`FollowOptions::follow_limit`] passes
//! without a record. Durable subscriptions and groups resume from their
//! committed positions; a plain subscription of one partition resumes
//! after the last record it delivered. So delivery stays at least once:
//! records acknowledged in the last second or so before a failure may be
//! delivered again (GUARANTEES.md, "Positions").

use std::time::{Duration, Instant};

use super::{ClientError, ConnectOptions, Connection, Event, Metadata, SubscribeOptions, Subscriber};
use crate::protocol::{ErrorCode, StartPosition};

/// How a [`FollowingSubscriber`] follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowOptions {
    /// How long it goes on subscribing again without delivering a record
    /// before it gives up with the last error.
    pub follow_limit: Duration,
    /// The pause before each new attempt but the first after a record.
    pub retry_pause: Duration,
}

impl Default for FollowOptions {
    fn default() -> FollowOptions {
        FollowOptions { follow_limit: Duration::from_secs(60), retry_pause: Duration::from_millis(200) }
    }
}

/// What a [`FollowingSubscriber`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Followed {
    /// A message or notice of the current subscription.
    Event(Event),
    /// The subscription was taken at `to` after `reason`: the node asked
    /// first sent it there, or the previous subscription ended. A group's
    /// partitions start over with [`crate::protocol::Notice::Assigned`],
    /// and records acknowledged on the previous subscription may be
    /// delivered again.
    Moved { to: String, reason: String },
}

/// A subscription that subscribes again, where its errors say or at the
/// cluster's other nodes, when it ends (see the module documentation).
pub struct FollowingSubscriber {
    channel: String,
    options: SubscribeOptions,
    connect: ConnectOptions,
    follow: FollowOptions,
    /// Where it subscribes next, or is subscribed now.
    addr: String,
    /// Every node's client address, as METADATA last listed them.
    nodes: Vec<String>,
    subscription: Option<(Connection, Subscriber)>,
    /// Attempts since the last record delivered.
    attempts: u32,
    /// When the last record was delivered, or following began.
    progress: Instant,
    /// A plain one-partition subscription: the offset after the last
    /// record delivered.
    resume_at: Option<u64>,
    moved: Option<Followed>,
}

impl FollowingSubscriber {
    /// Subscribes to `channel` at `addr`, or where `addr` sends it.
    ///
    /// # Errors
    /// `Invalid` for a plain (neither durable nor group) subscription of
    /// several partitions, which could not resume where it was; the
    /// broker's refusal (unknown channel, no permission), or the last
    /// connection error once [`FollowOptions::follow_limit`] has passed.
    pub async fn subscribe(
        addr: &str,
        connect: ConnectOptions,
        channel: &str,
        options: SubscribeOptions,
        follow: FollowOptions,
    ) -> Result<FollowingSubscriber, ClientError> {
        if options.partition.is_none() && options.durable_name.is_none() && options.group.is_none() {
            return Err(ClientError::Invalid(
                "a plain subscription of every partition cannot resume where it was: subscribe to one partition, or give a durable name or a group".into(),
            ));
        }
        let mut subscriber = FollowingSubscriber {
            channel: channel.to_owned(),
            options,
            connect,
            follow,
            addr: addr.to_owned(),
            nodes: vec![addr.to_owned()],
            subscription: None,
            attempts: 0,
            progress: Instant::now(),
            resume_at: None,
            moved: None,
        };
        subscriber.establish(None).await?;
        Ok(subscriber)
    }

    /// The node serving the subscription now.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The partitions the current subscription reads, each with the offset
    /// it started at there.
    pub fn partitions(&self) -> &[(u32, u64)] {
        self.subscription.as_ref().map_or(&[], |(_, subscriber)| subscriber.partitions())
    }

    /// The next message, notice or move; `None` once it has ended. An
    /// `Err` is why it ended (one it could not follow), returned once.
    pub async fn next(&mut self) -> Option<Result<Followed, ClientError>> {
        loop {
            if let Some(moved) = self.moved.take() {
                return Some(Ok(moved));
            }
            let (_, subscriber) = self.subscription.as_mut()?;
            let error = match subscriber.next().await {
                Some(Ok(event)) => {
                    if let Event::Message { record, .. } = &event {
                        self.attempts = 0;
                        self.progress = Instant::now();
                        if self.options.durable_name.is_none() && self.options.group.is_none() {
                            self.resume_at = Some(record.offset + 1);
                        }
                    }
                    return Some(Ok(Followed::Event(event)));
                }
                Some(Err(error)) => error,
                // Ended without an error (the broker unsubscribed it with
                // nothing to mend): ended here too.
                None => {
                    self.subscription = None;
                    return None;
                }
            };
            self.subscription = None;
            let Some(next) = self.next_addr(&error) else { return Some(Err(error)) };
            self.addr = next;
            if let Err(error) = self.establish(Some(error.to_string())).await {
                return Some(Err(error));
            }
        }
    }

    /// Acknowledges every message of `partition` up to and including
    /// `offset`, on the current subscription.
    ///
    /// # Errors
    /// It has ended, or its connection is gone (the next [`Self::next`]
    /// follows).
    pub async fn ack_partition(&self, partition: u32, offset: u64) -> Result<(), ClientError> {
        let (_, subscriber) = self.subscription.as_ref().ok_or(ClientError::Closed)?;
        subscriber.ack_partition(partition, offset).await
    }

    /// Waits until the broker has read every acknowledgement sent so far
    /// on the current subscription (a PING answered on its connection).
    ///
    /// # Errors
    /// It has ended, or its connection is gone.
    pub async fn sync(&self) -> Result<(), ClientError> {
        let (connection, _) = self.subscription.as_ref().ok_or(ClientError::Closed)?;
        connection.request(crate::protocol::Request::Ping).await.map(|_| ())
    }

    /// Ends the subscription.
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        match self.subscription.take() {
            Some((_, subscriber)) => subscriber.unsubscribe().await,
            None => Ok(()),
        }
    }

    /// Subscribes at `self.addr`, following errors, until one subscription
    /// is taken or the follow limit passes. A subscription taken after
    /// following (`reason`, or an error on the way) is announced by the
    /// next [`Self::next`] as [`Followed::Moved`].
    async fn establish(&mut self, mut reason: Option<String>) -> Result<(), ClientError> {
        loop {
            if self.attempts > 0 {
                tokio::time::sleep(self.follow.retry_pause).await;
            }
            self.attempts = self.attempts.saturating_add(1);
            match self.subscribe_at(&self.addr.clone()).await {
                Ok(subscription) => {
                    self.subscription = Some(subscription);
                    if let Some(reason) = reason {
                        self.moved = Some(Followed::Moved { to: self.addr.clone(), reason });
                    }
                    return Ok(());
                }
                Err(error) => match self.next_addr(&error) {
                    Some(next) => {
                        // The move's cause: the first error, not the last
                        // one on the way.
                        reason.get_or_insert_with(|| error.to_string());
                        self.addr = next;
                    }
                    None => return Err(error),
                },
            }
        }
    }

    async fn subscribe_at(&mut self, addr: &str) -> Result<(Connection, Subscriber), ClientError> {
        let connection = Connection::connect_with(addr, &self.connect).await?;
        if let Ok(metadata) = Metadata::fetch(&connection, &self.channel).await
            && metadata.clustered
        {
            let nodes: Vec<String> =
                metadata.nodes.iter().map(|node| node.client_addr.clone()).filter(|addr| !addr.is_empty()).collect();
            if !nodes.is_empty() {
                self.nodes = nodes;
            }
        }
        let mut options = self.options.clone();
        if let Some(next) = self.resume_at {
            options.start = StartPosition::Offset(next);
        }
        let subscriber = Subscriber::subscribe(&connection, &self.channel, options).await?;
        Ok((connection, subscriber))
    }

    /// Where to subscribe after `error`, or `None` when it cannot be
    /// mended elsewhere or the follow limit has passed: the node a
    /// `NotLeader` names; after a lost node, an unknown leader or a
    /// stopping node, the cluster's nodes in turn.
    fn next_addr(&self, error: &ClientError) -> Option<String> {
        if self.progress.elapsed() > self.follow.follow_limit {
            return None;
        }
        if let Some(redirect) = error.redirect() {
            return Some(redirect);
        }
        let elsewhere = match error {
            ClientError::Connect { .. }
            | ClientError::Io(_)
            | ClientError::Disconnected
            | ClientError::HandshakeClosed { .. }
            | ClientError::Timeout(_) => true,
            ClientError::Server { .. } => matches!(
                error.code(),
                Some(ErrorCode::NotLeader | ErrorCode::GroupSessionExpired | ErrorCode::ShuttingDown)
            ),
            _ => false,
        };
        elsewhere.then(|| self.nodes[self.attempts as usize % self.nodes.len()].clone())
    }
}

impl std::fmt::Debug for FollowingSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowingSubscriber")
            .field("channel", &self.channel)
            .field("addr", &self.addr)
            .field("partitions", &self.partitions())
            .finish_non_exhaustive()
    }
}
