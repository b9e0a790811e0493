//! The metadata group's Raft type configuration: node ids and addresses,
//! term-only leader ids, and what its entries and snapshots hold.

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

/// A command of the metadata group's state machine. None exists yet: the
/// group replicates only its membership (the nodes); channels and their
/// placement become commands with replicated partitions
/// (docs/REPLICATION.md, "Order of work").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {}

impl fmt::Display for MetadataCommand {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

/// What the metadata state machine holds beyond its membership (which
/// openraft keeps in the snapshot's metadata). Empty until the group has
/// commands; a snapshot still records where it was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataState {}

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
