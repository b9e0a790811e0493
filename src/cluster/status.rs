//! `weir cluster status`: one node's view of the metadata group (its role,
//! term, leader, log positions, the members and, on the leader, how far
//! behind each follower is), taken from openraft's metrics.

use std::fmt;

use openraft::{RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};

use super::types::{NodeAddrs, NodeId, TypeConfig};

/// What `weir cluster status` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub members: Vec<MemberStatus>,
}

/// One member of the metadata group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addrs: NodeAddrs,
    pub voter: bool,
    /// On the leader: the last entry this member is known to hold.
    pub matched_index: Option<u64>,
    /// On the leader: entries this member lacks (the leader's own is 0).
    pub lag_entries: Option<u64>,
}

pub(crate) fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl ClusterStatus {
    pub(crate) fn from_metrics(metrics: &RaftMetrics<TypeConfig>) -> ClusterStatus {
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(&id, addrs)| {
                let matched_index = metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(&id))
                    .map(|matched| matched.map_or(0, |log_id| log_id.index));
                let lag_entries = match (matched_index, metrics.last_log_index) {
                    (Some(matched), Some(last)) => Some(last.saturating_sub(matched)),
                    _ => None,
                };
                MemberStatus { id, addrs: addrs.clone(), voter: voters.contains(&id), matched_index, lag_entries }
            })
            .collect();
        ClusterStatus {
            node_id: metrics.id,
            role: role_name(metrics.state).to_string(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            committed_index: metrics.local_committed.map(|log_id| log_id.index),
            applied_index: metrics.last_applied.map(|log_id| log_id.index),
            members,
        }
    }
}

fn or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "node {} is {} in term {}; leader: {}",
            self.node_id,
            self.role,
            self.term,
            self.leader.map_or_else(|| "none known".to_string(), |leader| format!("node {leader}")),
        )?;
        if !self.members.iter().any(|member| member.id == self.node_id) {
            writeln!(f, "node {} is not a member of the cluster (never added, or removed)", self.node_id)?;
        }
        writeln!(
            f,
            "metadata log: last index {}, committed {}, applied {}",
            or_dash(self.last_log_index),
            or_dash(self.committed_index),
            or_dash(self.applied_index)
        )?;
        writeln!(f, "{:<6} {:<8} {:<22} {:<22} {:>8} {:>8}", "node", "member", "cluster", "client", "matched", "lag")?;
        for member in &self.members {
            writeln!(
                f,
                "{:<6} {:<8} {:<22} {:<22} {:>8} {:>8}",
                member.id,
                if member.voter { "voter" } else { "learner" },
                member.addrs.cluster_addr,
                member.addrs.client_addr,
                or_dash(member.matched_index),
                or_dash(member.lag_entries),
            )?;
        }
        Ok(())
    }
}
