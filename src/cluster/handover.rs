//! Leadership hand-over at a graceful shutdown: each Raft group this node
//! leads (the metadata group's and every replicated partition's) hands its
//! leadership to its most caught-up voter before the node stops, so that
//! clients wait for one vote instead of a failover (docs/REPLICATION.md,
//! "Leadership hand-over").
//!
//! openraft does the protocol part (Raft's TimeoutNow, §3.10 of Ongaro's
//! thesis): the leader stops taking proposals and tells the voters; the
//! target, once it holds the leader's last entry, campaigns at once, and
//! the others grant its vote although their leader lease has not run out.
//! This module picks the target, asks again while the target is still
//! catching up, and waits until another node leads.

use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftStateMachine;
use openraft::{LogIdOptionExt, Raft, RaftTypeConfig, ServerState};

/// How a group's hand-over ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOver {
    /// This node did not lead the group.
    NotLeading,
    /// The group has no other voter (replication factor 1).
    NoOtherVoter,
    /// Another node leads the group now.
    Moved { to: u64 },
    /// No other node led it within the limit; a normal election follows
    /// once this node stops.
    TimedOut,
}

/// Hands the leadership of `raft`'s group to its most caught-up voter,
/// asking again every `round` (a target still catching up refuses; the
/// leader takes no proposal meanwhile, so it catches up), and gives up
/// after `limit`. Returns when another node leads: this node has heard
/// from the new leader, so the group has one when this node stops.
pub async fn hand_over<C, SM>(raft: &Raft<C, SM>, me: u64, round: Duration, limit: Duration) -> HandOver
where
    C: RaftTypeConfig<NodeId = u64>,
    SM: RaftStateMachine<C>,
{
    let deadline = Instant::now() + limit;
    let mut metrics = raft.metrics();
    let mut asked = false;
    loop {
        let target = {
            let current = metrics.borrow_watched();
            if !asked && current.state != ServerState::Leader {
                return HandOver::NotLeading;
            }
            if let Some(leader) = current.current_leader.filter(|&leader| leader != me) {
                return HandOver::Moved { to: leader };
            }
            if current.state != ServerState::Leader {
                // Asked, and no longer leading, but no other leader heard
                // of yet: the target's election is under way.
                None
            } else {
                let voters: Vec<u64> =
                    current.membership_config.membership().voter_ids().filter(|&voter| voter != me).collect();
                if voters.is_empty() {
                    return HandOver::NoOtherVoter;
                }
                // The voter holding the most of the log: it is the first to
                // hold the leader's last entry. Ties go to the lowest id.
                let matched = |voter: &u64| {
                    current.replication.as_ref().and_then(|replication| replication.get(voter)).and_then(|m| m.index())
                };
                voters.iter().copied().max_by_key(|voter| (matched(voter), std::cmp::Reverse(*voter)))
            }
        };
        if let Some(target) = target {
            if raft.trigger().transfer_leader(target).await.is_err() {
                // The group stopped.
                return HandOver::TimedOut;
            }
            asked = true;
        }
        let now = Instant::now();
        if now >= deadline {
            return HandOver::TimedOut;
        }
        let wait = round.min(deadline - now);
        let until = Instant::now() + wait;
        // Every change of the metrics is looked at; the round ends the wait
        // when none names another leader.
        while Instant::now() < until {
            match tokio::time::timeout_at(until.into(), metrics.changed()).await {
                Ok(Ok(())) => {
                    if metrics.borrow_watched().current_leader.is_some_and(|leader| leader != me) {
                        break;
                    }
                }
                Ok(Err(_)) => return HandOver::TimedOut,
                Err(_) => break,
            }
        }
    }
}

/// Logs how a group's hand-over ended (`group` names it).
pub fn log_outcome(group: &str, outcome: HandOver) {
    match outcome {
        HandOver::NotLeading | HandOver::NoOtherVoter => {}
        HandOver::Moved { to } => tracing::info!(%group, to, "handed the group's leadership over"),
        HandOver::TimedOut => {
            tracing::warn!(%group, "no other node took the group's leadership in time; an election follows the stop")
        }
    }
}
