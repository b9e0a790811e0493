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
//! catching up, and waits until another node leads; then the node stops
//! campaigning in its groups, so that it is not elected again while it
//! drains its connections.

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
    /// No other node led it within the limit; an election follows once
    /// this node stops.
    TimedOut,
    /// The group stopped meanwhile (its replica moved away).
    Stopped,
}

/// Hands the leadership of `raft`'s group to its most caught-up voter and
/// waits until another node leads: this node has then heard from the new
/// leader, so the group has one when this node stops. Gives up after
/// `limit`.
///
/// The target is chosen once (another target campaigning too could split
/// the vote), among the voters of the newest configuration (in a joint
/// one, not a voter being removed), and asked again every `round`: a
/// target lacking the leader's last entry waits for it at most
/// `election_timeout_min` before it refuses, and the leader takes no
/// proposal meanwhile, so it catches up. `round` should be that long, so
/// that the asks do not pile up.
pub async fn hand_over<C, SM>(raft: &Raft<C, SM>, me: u64, round: Duration, limit: Duration) -> HandOver
where
    C: RaftTypeConfig<NodeId = u64>,
    SM: RaftStateMachine<C>,
{
    let deadline = Instant::now() + limit;
    let mut metrics = raft.metrics();
    let mut target: Option<u64> = None;
    loop {
        let ask = {
            let current = metrics.borrow_watched();
            if current.state == ServerState::Shutdown {
                return HandOver::Stopped;
            }
            if target.is_none() && current.state != ServerState::Leader {
                return HandOver::NotLeading;
            }
            if let Some(leader) = current.current_leader.filter(|&leader| leader != me) {
                return HandOver::Moved { to: leader };
            }
            if current.state == ServerState::Leader {
                let membership = current.membership_config.membership();
                let newest: Vec<u64> = membership
                    .get_joint_config()
                    .last()
                    .map(|voters| voters.iter().copied().filter(|&voter| voter != me).collect())
                    .unwrap_or_default();
                if target.is_none_or(|chosen| !newest.contains(&chosen)) {
                    // The voter holding the most of the log: the first to
                    // hold the leader's last entry. Ties to the lowest id.
                    let matched = |voter: &u64| {
                        current
                            .replication
                            .as_ref()
                            .and_then(|replication| replication.get(voter))
                            .and_then(|m| m.index())
                    };
                    target = newest.iter().copied().max_by_key(|voter| (matched(voter), std::cmp::Reverse(*voter)));
                }
                if target.is_none() {
                    return HandOver::NoOtherVoter;
                }
                target
            } else {
                // No longer leading and no other leader heard of yet: the
                // target's election is under way.
                None
            }
        };
        if let Some(target) = ask
            && raft.trigger().transfer_leader(target).await.is_err()
        {
            return HandOver::Stopped;
        }
        let now = Instant::now();
        if now >= deadline {
            return HandOver::TimedOut;
        }
        let until = now + round.min(deadline - now);
        // Every change of the metrics is looked at; the round ends the wait
        // when none names another leader.
        loop {
            match tokio::time::timeout_at(until.into(), metrics.changed()).await {
                Ok(Ok(())) => {
                    let current = metrics.borrow_watched();
                    if current.state == ServerState::Shutdown
                        || current.current_leader.is_some_and(|leader| leader != me)
                    {
                        break;
                    }
                }
                Ok(Err(_)) => return HandOver::Stopped,
                Err(_) => break,
            }
        }
    }
}

/// Logs how a group's hand-over ended (`group` names it).
pub fn log_outcome(group: &str, outcome: HandOver) {
    match outcome {
        HandOver::NotLeading | HandOver::NoOtherVoter | HandOver::Stopped => {}
        HandOver::Moved { to } => tracing::info!(%group, to, "handed the group's leadership over"),
        HandOver::TimedOut => {
            tracing::warn!(%group, "no other node took the group's leadership in time; an election follows the stop")
        }
    }
}
