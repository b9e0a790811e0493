//! `weir cluster status`: one node's view of the metadata group (its role,
//! term, leader, log positions, the members and, on the leader, how far
//! behind each follower is) and of the replicated partitions it hosts,
//! taken from openraft's metrics.

use std::fmt;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::types::{LogId, NodeAddrs, NodeId, TypeConfig};

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
    /// The last entry the node's snapshot holds (built or installed).
    pub snapshot_index: Option<u64>,
    /// The last entry removed from its log (held by the snapshot).
    pub purged_index: Option<u64>,
    pub members: Vec<MemberStatus>,
    /// The replicated partitions this node hosts.
    #[serde(default)]
    pub partitions: Vec<PartitionStatus>,
}

/// One replicated partition's group as a node hosting it sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub channel: String,
    pub partition: u32,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The voters (the partition's replicas).
    pub replicas: Vec<NodeId>,
    /// On the leader: entries each follower lacks.
    pub lag_entries: Vec<(NodeId, u64)>,
    /// The last entry its last snapshot holds.
    pub snapshot_index: Option<u64>,
    /// The last entry purged from its Raft log.
    pub purged_index: Option<u64>,
}

impl PartitionStatus {
    pub(crate) fn from_metrics(
        group: &super::transport::GroupId,
        metrics: &RaftMetrics<super::partition::PartitionTypes>,
    ) -> PartitionStatus {
        let lag_entries = match (&metrics.replication, metrics.last_log_index) {
            (Some(replication), Some(last)) => replication
                .iter()
                .map(|(&follower, matched)| (follower, lag_behind(last, matched.map(|log_id| log_id.index))))
                .collect(),
            _ => Vec::new(),
        };
        PartitionStatus {
            channel: group.channel.clone(),
            partition: group.partition,
            role: role_name(metrics.state).to_string(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            committed_index: metrics.local_committed.map(|log_id| log_id.index),
            applied_index: metrics.last_applied.map(|log_id| log_id.index),
            replicas: metrics.membership_config.membership().voter_ids().collect(),
            lag_entries,
            snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
            purged_index: metrics.purged.map(|log_id| log_id.index),
        }
    }
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

/// How long a node waits, at start, for a group's first real metrics.
const METRICS_LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until openraft reported a group's metrics once: until then they
/// are a placeholder (term 0, no log), not what the group stored, and a
/// restarted node's `weir cluster status` or gauges would show its term
/// going back to 0 (seen by the metadata failover test). Gives up after
/// [`METRICS_LOAD_TIMEOUT`].
pub(crate) async fn metrics_loaded<C: openraft::RaftTypeConfig>(
    mut metrics: openraft::alias::WatchReceiverOf<C, RaftMetrics<C>>,
) {
    use openraft::async_runtime::watch::WatchReceiver;
    let _ = tokio::time::timeout(METRICS_LOAD_TIMEOUT, metrics.changed()).await;
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
                let matched = metrics.replication.as_ref().and_then(|replication| replication.get(&id)).copied();
                let matched_index = matched.flatten().map(|log_id| log_id.index);
                let lag_entries = match (matched, metrics.last_log_index) {
                    (Some(matched), Some(last)) => Some(lag_entries(last, matched)),
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
            snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
            purged_index: metrics.purged.map(|log_id| log_id.index),
            members,
            partitions: Vec::new(),
        }
    }
}

/// Entries a member lacks when the leader's last is `last` (indexes start
/// at 0, so a member holding nothing lacks `last + 1`).
fn lag_entries(last: u64, matched: Option<LogId>) -> u64 {
    lag_behind(last, matched.map(|log_id| log_id.index))
}

/// As [`lag_entries`], from the index of the member's last entry.
fn lag_behind(last: u64, matched: Option<u64>) -> u64 {
    matched.map_or(last + 1, |index| last.saturating_sub(index))
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
            "metadata log: last index {}, committed {}, applied {}; snapshot at {}, purged to {}",
            or_dash(self.last_log_index),
            or_dash(self.committed_index),
            or_dash(self.applied_index),
            or_dash(self.snapshot_index),
            or_dash(self.purged_index),
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
        if !self.partitions.is_empty() {
            writeln!(
                f,
                "{:<24} {:>9} {:<9} {:>6} {:>6} {:>9} {:>9} {:<10}",
                "channel", "partition", "role", "term", "leader", "committed", "applied", "replicas"
            )?;
        }
        for partition in &self.partitions {
            let replicas: Vec<String> = partition.replicas.iter().map(u64::to_string).collect();
            writeln!(
                f,
                "{:<24} {:>9} {:<9} {:>6} {:>6} {:>9} {:>9} {:<10}",
                partition.channel,
                partition.partition,
                partition.role,
                partition.term,
                or_dash(partition.leader),
                or_dash(partition.committed_index),
                or_dash(partition.applied_index),
                replicas.join(","),
            )?;
        }
        Ok(())
    }
}

/// Publishes a Raft group's state as metrics (labelled `labels`: the
/// metadata group's `group="metadata"`, a partition's `group="partition"`
/// with its channel and partition) and logs every change of leader or term.
pub(crate) async fn watch_metrics<C>(
    mut metrics: openraft::type_config::alias::WatchReceiverOf<C, RaftMetrics<C>>,
    labels: Vec<metrics::Label>,
    stop: CancellationToken,
) where
    C: openraft::RaftTypeConfig<NodeId = NodeId, Term = u64>,
{
    let group: String = labels.iter().map(|label| label.value().to_string()).collect::<Vec<_>>().join(" ");
    let mut known: Option<(u64, Option<NodeId>, ServerState)> = None;
    let mut last_leader: Option<NodeId> = None;
    let mut reported = std::collections::BTreeSet::new();
    loop {
        let current = metrics.borrow_watched().clone();
        let seen = (current.current_term, current.current_leader, current.state);
        if known != Some(seen) {
            // A change to another leader; "no leader" in between is not one.
            if let Some(leader) = current.current_leader
                && last_leader != Some(leader)
            {
                if last_leader.is_some() {
                    metrics::counter!("weir_raft_leader_changes_total", labels.clone()).increment(1);
                }
                last_leader = Some(leader);
            }
            tracing::info!(
                group = %group,
                term = current.current_term,
                leader = ?current.current_leader,
                role = role_name(current.state),
                "Raft group: leader or term changed"
            );
            known = Some(seen);
        }
        metrics::gauge!("weir_raft_term", labels.clone()).set(current.current_term as f64);
        let leading = current.state == ServerState::Leader;
        metrics::gauge!("weir_raft_leader", labels.clone()).set(if leading { 1.0 } else { 0.0 });
        if let Some(committed) = &current.local_committed {
            metrics::gauge!("weir_raft_commit_index", labels.clone()).set(committed.index() as f64);
        }
        let lag_gauge = |follower: NodeId| {
            let mut labels = labels.clone();
            labels.push(metrics::Label::new("follower", follower.to_string()));
            metrics::gauge!("weir_raft_replica_lag_entries", labels)
        };
        let mut now_reported = std::collections::BTreeSet::new();
        if let (Some(replication), Some(last)) = (&current.replication, current.last_log_index) {
            for (&follower, matched) in replication {
                let matched = matched.as_ref().map(|log_id| log_id.index());
                lag_gauge(follower).set(lag_behind(last, matched) as f64);
                now_reported.insert(follower);
            }
        }
        // A series cannot be withdrawn: one no longer measured (this node
        // stopped leading, or the member left) reads 0 from then on.
        for &gone in reported.difference(&now_reported) {
            lag_gauge(gone).set(0.0);
        }
        reported = now_reported;
        tokio::select! {
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}
