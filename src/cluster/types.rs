//! The metadata group's Raft type configuration: node ids and addresses,
//! term-only leader ids, and what its entries and snapshots hold (the
//! membership and the replicated channels with their placement).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's addresses, as the metadata group's membership holds them: the
/// cluster address for Raft traffic and the client address that clients
/// are sent to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddrs {
    pub cluster_addr: String,
    pub client_addr: String,
}

impl fmt::Display for NodeAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster {} client {}", self.cluster_addr, self.client_addr)
    }
}

/// A command of the metadata group's state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Creates a replicated channel with its placement, chosen by the
    /// leader that proposed it (docs/REPLICATION.md, "What is replicated").
    CreateChannel { name: String, channel: ReplicatedChannel },
    /// A partition's group elected `leader` in `term`: reported by that
    /// leader, so that every node can answer METADATA for partitions it
    /// does not host.
    PartitionLeader { channel: String, partition: u32, leader: NodeId, term: u64 },
}

impl fmt::Display for MetadataCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetadataCommand::CreateChannel { name, channel } => write!(
                f,
                "create channel {name} ({} partitions, replication factor {})",
                channel.replicas.len(),
                channel.replication_factor
            ),
            MetadataCommand::PartitionLeader { channel, partition, leader, term } => {
                write!(f, "partition {partition} of {channel} led by node {leader} in term {term}")
            }
        }
    }
}

/// A replicated channel as the metadata group holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedChannel {
    pub replication_factor: u8,
    /// Per partition, its replicas: the first is the preferred leader, the
    /// node that initialises the partition's group.
    pub replicas: Vec<Vec<NodeId>>,
}

/// A partition's leader as its group last reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedLeader {
    pub node: NodeId,
    pub term: u64,
}

/// What the metadata state machine holds beyond its membership (which
/// openraft keeps in the snapshot's metadata): the replicated channels and
/// their partitions' reported leaders.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataState {
    pub channels: std::collections::BTreeMap<String, ReplicatedChannel>,
    /// By channel, then partition: the leader of the highest term reported.
    pub leaders: std::collections::BTreeMap<String, std::collections::BTreeMap<u32, ReportedLeader>>,
}

impl MetadataState {
    /// Applies one committed command. A channel created twice keeps its
    /// first placement (the leader refuses a second creation; two racing
    /// proposals both commit, and the first wins everywhere alike).
    pub fn apply(&mut self, command: &MetadataCommand) {
        match command {
            MetadataCommand::CreateChannel { name, channel } => {
                self.channels.entry(name.clone()).or_insert_with(|| channel.clone());
            }
            MetadataCommand::PartitionLeader { channel, partition, leader, term } => {
                let placed = self.channels.get(channel).and_then(|placed| placed.replicas.get(*partition as usize));
                // Only a replica of a partition that exists; a report of an
                // older term than the one recorded arrived late.
                if !placed.is_some_and(|replicas| replicas.contains(leader)) {
                    return;
                }
                let leaders = self.leaders.entry(channel.clone()).or_default();
                if leaders.get(partition).is_none_or(|recorded| recorded.term < *term) {
                    leaders.insert(*partition, ReportedLeader { node: *leader, term: *term });
                }
            }
        }
    }

    /// The leader last reported for `partition` of `channel`.
    pub fn reported_leader(&self, channel: &str, partition: u32) -> Option<ReportedLeader> {
        self.leaders.get(channel)?.get(&partition).copied()
    }
}

openraft::declare_raft_types!(
    /// The metadata group's types.
    pub TypeConfig:
        D = MetadataCommand,
        R = (),
        NodeId = u64,
        Node = NodeAddrs,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, super::store::MetadataStateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
#[cfg(test)]
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, MetadataState>;
