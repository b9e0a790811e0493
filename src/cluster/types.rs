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
    /// Partitions' groups elected these leaders: reported by each leader
    /// (a node's reports of one moment in one command), so that every node
    /// can answer METADATA for partitions it does not host.
    PartitionLeaders { reports: Vec<LeaderReport> },
    /// Durable subscriptions' and consumer groups' positions in replicated
    /// partitions, as a node's subscribers acknowledged them (at most
    /// [`POSITIONS_PER_COMMAND_MAX`]).
    CommitPositions { positions: Vec<ReplicatedPosition> },
    /// A partition's replicas changed from `expected` (a replica move,
    /// proposed by the partition's leader at each of its steps: first the
    /// new replica added, then the old one taken out); applied only if the
    /// partition's replicas are still `expected`, so that two moves never
    /// overwrite each other's steps.
    PlaceReplicas { channel: String, partition: u32, expected: Vec<NodeId>, replicas: Vec<NodeId> },
    /// Deletes a replicated channel: its placement, reported leaders and
    /// positions; each node then removes its replicas' files (see
    /// `MetadataState::deleted`). New variants go last: postcard numbers
    /// them in order.
    DeleteChannel { name: String },
    /// A command about channels as the proposing node hosts them: each
    /// channel it names with the incarnation it was made for
    /// (`incarnations`). The parts about a channel that is not at that
    /// incarnation are dropped, so that a leader report, positions or a
    /// placement made for a deleted channel never apply to one created
    /// again under its name. Nodes propose their commands this way; the
    /// bare commands above are still applied as before (from older logs).
    OfIncarnations { incarnations: std::collections::BTreeMap<String, u64>, command: ChannelCommand },
    /// Adds partitions to a replicated channel (proposed by the metadata
    /// leader only): `added` are the new partitions' replicas, in order
    /// after the `from` partitions it had. Applied only if the channel is
    /// still at `incarnation` (the rule of `OfIncarnations`) with `from`
    /// partitions, and only if every replica list is valid
    /// (docs/REPLICATION.md, "Adding partitions to a replicated channel").
    AddPartitions { name: String, incarnation: u64, from: u32, added: Vec<Vec<NodeId>> },
}

/// A command about existing channels, proposed with the incarnations it
/// was made for ([`MetadataCommand::OfIncarnations`]): the same as the
/// commands of the same names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelCommand {
    PartitionLeaders { reports: Vec<LeaderReport> },
    CommitPositions { positions: Vec<ReplicatedPosition> },
    PlaceReplicas { channel: String, partition: u32, expected: Vec<NodeId>, replicas: Vec<NodeId> },
}

/// A deleted channel as the metadata state remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    /// The incarnation deleted (the highest, if the name was deleted more
    /// than once).
    pub incarnation: u64,
    /// The log index of the entry that deleted it last: the oldest
    /// deletion is forgotten first.
    pub at: u64,
}

/// Most deleted channels' names the metadata state remembers (with the
/// incarnation deleted); past it the oldest deletion is forgotten, and a
/// node that was away since then keeps that channel's files (OPERATIONS.md
/// says how to remove them).
pub const DELETED_CHANNELS_MAX: usize = 1024;

/// Most replicas one partition lists: a replication factor of 5, plus the
/// replica a move adds before it takes one out.
pub const PARTITION_REPLICAS_MAX: usize = 6;

/// A partition's group elected `leader` in `term`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderReport {
    pub channel: String,
    pub partition: u32,
    pub leader: NodeId,
    pub term: u64,
}

/// Most positions the metadata group holds: a commit of a new one past it
/// is dropped (its subscriber resumes from its node's own position).
pub const REPLICATED_POSITIONS_MAX: usize = 10_000;
/// Most positions one [`MetadataCommand::CommitPositions`] carries.
pub const POSITIONS_PER_COMMAND_MAX: usize = 1024;

/// Where a durable subscription (or a consumer group) of a replicated
/// channel resumes in one partition: one past its last acknowledged offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedPosition {
    pub channel: String,
    /// The durable name, or the group's name when `group`.
    pub name: String,
    pub partition: u32,
    pub group: bool,
    pub offset: u64,
}

/// A position's key: channel, name, partition, whether a group's.
pub type PositionKey = (String, String, u32, bool);

impl fmt::Display for MetadataCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetadataCommand::CreateChannel { name, channel } => write!(
                f,
                "create channel {name} ({} partitions, replication factor {})",
                channel.replicas.len(),
                channel.replication_factor
            ),
            MetadataCommand::PartitionLeaders { reports } => write!(f, "{} partition leaders", reports.len()),
            MetadataCommand::CommitPositions { positions } => write!(f, "{} positions", positions.len()),
            MetadataCommand::PlaceReplicas { channel, partition, replicas, .. } => {
                write!(f, "{channel} partition {partition} placed on nodes {replicas:?}")
            }
            MetadataCommand::DeleteChannel { name } => write!(f, "delete channel {name}"),
            MetadataCommand::AddPartitions { name, from, added, .. } => {
                write!(f, "add partitions {from}..{} to channel {name}", *from as usize + added.len())
            }
            MetadataCommand::OfIncarnations { command, .. } => match command {
                ChannelCommand::PartitionLeaders { reports } => write!(f, "{} partition leaders", reports.len()),
                ChannelCommand::CommitPositions { positions } => write!(f, "{} positions", positions.len()),
                ChannelCommand::PlaceReplicas { channel, partition, replicas, .. } => {
                    write!(f, "{channel} partition {partition} placed on nodes {replicas:?}")
                }
            },
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
    /// Durable and group positions in replicated partitions (forward only).
    pub positions: std::collections::BTreeMap<PositionKey, u64>,
    /// Each channel's incarnation: the log index of the entry that created
    /// it, which names its replicas' files (0: unknown, a channel from a
    /// snapshot of the layout before incarnations).
    pub incarnations: std::collections::BTreeMap<String, u64>,
    /// Deleted channels' names (at most [`DELETED_CHANNELS_MAX`], the
    /// oldest deletion forgotten first): a node removes its files of the
    /// name up to the incarnation deleted, never a later one's
    /// (docs/REPLICATION.md, "Deleting a replicated channel").
    pub deleted: std::collections::BTreeMap<String, Deletion>,
}

impl MetadataState {
    /// Applies one committed command, the entry at `index` of the log. A
    /// channel created twice keeps its first placement (the leader refuses
    /// a second creation; two racing proposals both commit, and the first
    /// wins everywhere alike).
    pub fn apply(&mut self, command: &MetadataCommand, index: u64) {
        match command {
            MetadataCommand::CreateChannel { name, channel } => {
                if !self.channels.contains_key(name) {
                    self.channels.insert(name.clone(), channel.clone());
                    self.incarnations.insert(name.clone(), index);
                }
            }
            MetadataCommand::DeleteChannel { name } => {
                if self.channels.remove(name).is_none() {
                    return;
                }
                let incarnation = self.incarnations.remove(name).unwrap_or(0);
                self.leaders.remove(name);
                self.positions.retain(|(channel, ..), _| channel != name);
                let deletion = self.deleted.entry(name.clone()).or_insert(Deletion { incarnation, at: index });
                deletion.incarnation = deletion.incarnation.max(incarnation);
                deletion.at = index;
                while self.deleted.len() > DELETED_CHANNELS_MAX {
                    // The oldest deletion (never this one: it is the latest).
                    let oldest =
                        self.deleted.iter().min_by_key(|(_, deletion)| deletion.at).map(|(name, _)| name.clone());
                    if let Some(oldest) = oldest {
                        self.deleted.remove(&oldest);
                    }
                }
            }
            MetadataCommand::OfIncarnations { incarnations, command } => {
                let current = |channel: &str| {
                    incarnations.get(channel).is_some_and(|&made_for| self.is_at_incarnation(channel, made_for))
                };
                let command = match command {
                    ChannelCommand::PartitionLeaders { reports } => MetadataCommand::PartitionLeaders {
                        reports: reports.iter().filter(|report| current(&report.channel)).cloned().collect(),
                    },
                    ChannelCommand::CommitPositions { positions } => MetadataCommand::CommitPositions {
                        positions: positions.iter().filter(|position| current(&position.channel)).cloned().collect(),
                    },
                    ChannelCommand::PlaceReplicas { channel, partition, expected, replicas } => {
                        if !current(channel) {
                            return;
                        }
                        MetadataCommand::PlaceReplicas {
                            channel: channel.clone(),
                            partition: *partition,
                            expected: expected.clone(),
                            replicas: replicas.clone(),
                        }
                    }
                };
                self.apply(&command, index);
            }
            MetadataCommand::PartitionLeaders { reports } => {
                for LeaderReport { channel, partition, leader, term } in reports {
                    let placed = self.channels.get(channel).and_then(|placed| placed.replicas.get(*partition as usize));
                    // Only a replica of a partition that exists; a report of
                    // an older term than the one recorded arrived late.
                    if !placed.is_some_and(|replicas| replicas.contains(leader)) {
                        continue;
                    }
                    let leaders = self.leaders.entry(channel.clone()).or_default();
                    if leaders.get(partition).is_none_or(|recorded| recorded.term < *term) {
                        leaders.insert(*partition, ReportedLeader { node: *leader, term: *term });
                    }
                }
            }
            MetadataCommand::CommitPositions { positions } => {
                for position in positions.iter().take(POSITIONS_PER_COMMAND_MAX) {
                    let exists = self
                        .channels
                        .get(&position.channel)
                        .is_some_and(|channel| (position.partition as usize) < channel.replicas.len());
                    let key = (position.channel.clone(), position.name.clone(), position.partition, position.group);
                    let known = self.positions.contains_key(&key);
                    if !exists || (!known && self.positions.len() >= REPLICATED_POSITIONS_MAX) {
                        continue;
                    }
                    let offset = self.positions.entry(key).or_insert(position.offset);
                    *offset = (*offset).max(position.offset);
                }
            }
            MetadataCommand::AddPartitions { name, incarnation, from, added } => {
                if !self.is_at_incarnation(name, *incarnation) {
                    return;
                }
                let Some(channel) = self.channels.get_mut(name) else { return };
                let replication_factor = usize::from(channel.replication_factor);
                let valid = channel.replicas.len() == *from as usize
                    && !added.is_empty()
                    && channel.replicas.len() + added.len() <= super::REPLICATED_PARTITIONS_MAX
                    && added.iter().all(|replicas| {
                        replicas.len() == replication_factor
                            && replicas.iter().collect::<std::collections::BTreeSet<_>>().len() == replicas.len()
                    });
                if !valid {
                    return;
                }
                channel.replicas.extend(added.iter().cloned());
                // The consumer groups reading the channel read the new
                // partitions from their start (0, empty as they are
                // created): a member assigned one later, perhaps at another
                // coordinator, would otherwise start at "latest" and skip
                // what was published there meanwhile. (A durable
                // subscription reads a partition added later from its start
                // already.) Within REPLICATED_POSITIONS_MAX.
                let groups: std::collections::BTreeSet<String> = self
                    .positions
                    .keys()
                    .filter(|(channel, _, _, group)| channel == name && *group)
                    .map(|(_, group, ..)| group.clone())
                    .collect();
                for group in groups {
                    for partition in *from..*from + added.len() as u32 {
                        if self.positions.len() >= REPLICATED_POSITIONS_MAX {
                            return;
                        }
                        self.positions.entry((name.clone(), group.clone(), partition, true)).or_insert(0);
                    }
                }
            }
            MetadataCommand::PlaceReplicas { channel, partition, expected, replicas } => {
                let distinct = replicas.iter().collect::<std::collections::BTreeSet<_>>().len() == replicas.len();
                if replicas.is_empty() || replicas.len() > PARTITION_REPLICAS_MAX || !distinct {
                    return;
                }
                let Some(placed) =
                    self.channels.get_mut(channel).and_then(|placed| placed.replicas.get_mut(*partition as usize))
                else {
                    return;
                };
                if placed != expected {
                    return;
                }
                placed.clone_from(replicas);
                // A reported leader that is no replica any more is stale.
                if let Some(leaders) = self.leaders.get_mut(channel)
                    && leaders.get(partition).is_some_and(|leader| !replicas.contains(&leader.node))
                {
                    leaders.remove(partition);
                }
            }
        }
    }

    /// Whether `channel` exists at the incarnation a command was made for:
    /// at any, for a name never deleted (nodes may hold a channel from
    /// before incarnations as 0 or as its creating entry's index; the rule
    /// must not depend on which); once the name was deleted, at exactly
    /// the channel's incarnation (the creating entry's index, which every
    /// node holds).
    fn is_at_incarnation(&self, channel: &str, made_for: u64) -> bool {
        let Some(&now) = self.incarnations.get(channel) else { return false };
        !self.deleted.contains_key(channel) || made_for == now
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MetadataState {
        let mut state = MetadataState::default();
        let channel = ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3], vec![2, 3, 1]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 1);
        state
    }

    /// A report of a newer term replaces the leader; a late one of an
    /// older term, one from a node that is no replica, and one for a
    /// partition that does not exist change nothing.
    #[test]
    fn reported_leaders_keep_the_highest_term_of_a_replica() {
        let mut state = state();
        let report = |partition, leader, term| MetadataCommand::PartitionLeaders {
            reports: vec![LeaderReport { channel: "orders".into(), partition, leader, term }],
        };
        state.apply(&report(0, 2, 5), 2);
        state.apply(&report(0, 1, 4), 2);
        state.apply(&report(0, 9, 6), 2);
        state.apply(&report(7, 1, 9), 2);
        assert_eq!(state.reported_leader("orders", 0), Some(ReportedLeader { node: 2, term: 5 }));
        state.apply(&report(0, 3, 6), 2);
        assert_eq!(state.reported_leader("orders", 0), Some(ReportedLeader { node: 3, term: 6 }));
        assert_eq!(state.reported_leader("orders", 7), None);
    }

    /// A placement change replaces a partition's replicas and forgets a
    /// reported leader that is no replica any more; one for a partition
    /// that does not exist, an empty list, duplicates, too long a list, and
    /// one that expected other replicas than the partition has change
    /// nothing.
    #[test]
    fn placements_change_with_valid_replica_lists_only() {
        let mut state = state();
        let place = |partition, expected: &[NodeId], replicas: &[NodeId]| MetadataCommand::PlaceReplicas {
            channel: "orders".into(),
            partition,
            expected: expected.to_vec(),
            replicas: replicas.to_vec(),
        };
        state.apply(
            &MetadataCommand::PartitionLeaders {
                reports: vec![LeaderReport { channel: "orders".into(), partition: 0, leader: 1, term: 3 }],
            },
            2,
        );
        state.apply(&place(0, &[1, 2, 3], &[1, 2, 3, 4]), 2);
        assert_eq!(state.channels["orders"].replicas[0], vec![1, 2, 3, 4]);
        assert_eq!(state.reported_leader("orders", 0).map(|leader| leader.node), Some(1));
        state.apply(&place(0, &[1, 2, 3, 4], &[2, 3, 4]), 2);
        assert_eq!(state.channels["orders"].replicas[0], vec![2, 3, 4]);
        assert_eq!(state.reported_leader("orders", 0), None);
        let before = state.clone();
        state.apply(&place(5, &[1], &[1]), 2);
        state.apply(&place(1, &[2, 3, 1], &[]), 2);
        state.apply(&place(1, &[2, 3, 1], &[2, 2, 3]), 2);
        state.apply(&place(1, &[2, 3, 1], &[1, 2, 3, 4, 5, 6, 7]), 2);
        // Another move's step, made from an older view: not applied.
        state.apply(&place(0, &[1, 2, 3], &[1, 2, 3, 5]), 2);
        assert_eq!(state, before);
    }

    /// Positions only move forward, only for partitions of replicated
    /// channels, and no new one is taken past `REPLICATED_POSITIONS_MAX`.
    #[test]
    fn positions_move_forward_within_their_bound() {
        let mut state = state();
        let commit = |channel: &str, name: String, partition, offset| MetadataCommand::CommitPositions {
            positions: vec![ReplicatedPosition { channel: channel.into(), name, partition, group: false, offset }],
        };
        state.apply(&commit("orders", "billing".into(), 1, 10), 2);
        state.apply(&commit("orders", "billing".into(), 1, 7), 2);
        state.apply(&commit("elsewhere", "billing".into(), 0, 3), 2);
        state.apply(&commit("orders", "billing".into(), 2, 3), 2);
        assert_eq!(state.positions.len(), 1);
        assert_eq!(state.positions.get(&("orders".into(), "billing".into(), 1, false)), Some(&10));
        for i in 0..REPLICATED_POSITIONS_MAX {
            state.apply(&commit("orders", format!("n{i}"), 0, 1), 2);
        }
        assert_eq!(state.positions.len(), REPLICATED_POSITIONS_MAX);
        state.apply(&commit("orders", "billing".into(), 1, 11), 2);
        assert_eq!(state.positions.get(&("orders".into(), "billing".into(), 1, false)), Some(&11));
    }

    /// A deletion removes the channel with its leaders and positions and
    /// remembers the incarnation deleted; one of a channel that is not
    /// there changes nothing; created again, the channel has the new
    /// entry's incarnation and the deletion stays on record; past
    /// `DELETED_CHANNELS_MAX` deletions the oldest is forgotten.
    #[test]
    fn a_deletion_removes_the_channel_and_remembers_its_incarnation() {
        let mut state = state();
        assert_eq!(state.incarnations.get("orders"), Some(&1));
        let reports = vec![LeaderReport { channel: "orders".into(), partition: 0, leader: 1, term: 2 }];
        state.apply(&MetadataCommand::PartitionLeaders { reports }, 2);
        let position = ReplicatedPosition {
            channel: "orders".into(),
            name: "billing".into(),
            partition: 0,
            group: false,
            offset: 4,
        };
        state.apply(&MetadataCommand::CommitPositions { positions: vec![position] }, 3);
        state.apply(&MetadataCommand::DeleteChannel { name: "orders".into() }, 4);
        assert!(state.channels.is_empty() && state.leaders.is_empty() && state.positions.is_empty());
        assert!(state.incarnations.is_empty());
        assert_eq!(state.deleted.get("orders"), Some(&Deletion { incarnation: 1, at: 4 }));
        state.apply(&MetadataCommand::DeleteChannel { name: "orders".into() }, 5);
        assert_eq!(state.deleted.get("orders"), Some(&Deletion { incarnation: 1, at: 4 }));
        let channel = ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 9);
        assert_eq!(state.incarnations.get("orders"), Some(&9));
        assert_eq!(state.deleted.get("orders").map(|deletion| deletion.incarnation), Some(1));

        for i in 0..DELETED_CHANNELS_MAX as u64 {
            let name = format!("c{i}");
            let channel = ReplicatedChannel { replication_factor: 1, replicas: vec![vec![1]] };
            state.apply(&MetadataCommand::CreateChannel { name: name.clone(), channel }, 10 + 2 * i);
            state.apply(&MetadataCommand::DeleteChannel { name }, 11 + 2 * i);
        }
        assert_eq!(state.deleted.len(), DELETED_CHANNELS_MAX);
        assert!(!state.deleted.contains_key("orders"), "the oldest deletion is forgotten");
        assert_eq!(state.deleted.get("c0"), Some(&Deletion { incarnation: 10, at: 11 }));
        // A long-lived channel deleted last keeps its deletion on record.
        let channel = ReplicatedChannel { replication_factor: 1, replicas: vec![vec![1]] };
        state.apply(&MetadataCommand::CreateChannel { name: "early".into(), channel }, 5);
        let late = 10 + 2 * DELETED_CHANNELS_MAX as u64;
        state.apply(&MetadataCommand::DeleteChannel { name: "early".into() }, late);
        assert_eq!(state.deleted.get("early"), Some(&Deletion { incarnation: 5, at: late }));
        assert!(!state.deleted.contains_key("c0"));
    }
}

#[cfg(test)]
mod incarnation_tests {
    use super::*;

    /// Commands a node made for a channel's incarnation apply to that
    /// incarnation only: after a deletion and a creation under the same
    /// name, a late leader report, positions and a placement made for the
    /// deleted channel are dropped, while those for the new one apply.
    #[test]
    fn commands_for_a_deleted_incarnation_do_not_apply_to_a_new_one() {
        let mut state = MetadataState::default();
        let channel = ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel: channel.clone() }, 3);
        state.apply(&MetadataCommand::DeleteChannel { name: "orders".into() }, 8);
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 12);
        let of = |incarnation: u64, command: ChannelCommand| MetadataCommand::OfIncarnations {
            incarnations: [("orders".to_string(), incarnation)].into(),
            command,
        };
        let report = |term| ChannelCommand::PartitionLeaders {
            reports: vec![LeaderReport { channel: "orders".into(), partition: 0, leader: 2, term }],
        };
        let position = |offset| ChannelCommand::CommitPositions {
            positions: vec![ReplicatedPosition {
                channel: "orders".into(),
                name: "billing".into(),
                partition: 0,
                group: false,
                offset,
            }],
        };
        let place = ChannelCommand::PlaceReplicas {
            channel: "orders".into(),
            partition: 0,
            expected: vec![1, 2, 3],
            replicas: vec![1, 2, 3, 4],
        };
        for stale in [of(3, report(7)), of(3, position(900)), of(3, place.clone()), of(0, position(900))] {
            state.apply(&stale, 13);
        }
        assert_eq!(state.reported_leader("orders", 0), None);
        assert!(state.positions.is_empty());
        assert_eq!(state.channels["orders"].replicas[0], vec![1, 2, 3]);
        state.apply(&of(12, report(1)), 14);
        state.apply(&of(12, position(4)), 15);
        state.apply(&of(12, place), 16);
        assert_eq!(state.reported_leader("orders", 0), Some(ReportedLeader { node: 2, term: 1 }));
        assert_eq!(state.positions.values().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(state.channels["orders"].replicas[0], vec![1, 2, 3, 4]);
        // A channel of unknown incarnation, never deleted: any matches.
        state.incarnations.insert("legacy".into(), 0);
        let legacy = ReplicatedChannel { replication_factor: 1, replicas: vec![vec![1]] };
        state.channels.insert("legacy".into(), legacy);
        let report = MetadataCommand::OfIncarnations {
            incarnations: [("legacy".to_string(), 7)].into(),
            command: ChannelCommand::PartitionLeaders {
                reports: vec![LeaderReport { channel: "legacy".into(), partition: 0, leader: 1, term: 2 }],
            },
        };
        state.apply(&report, 17);
        assert_eq!(state.reported_leader("legacy", 0), Some(ReportedLeader { node: 1, term: 2 }));
    }
}

#[cfg(test)]
mod add_partitions_tests {
    use super::*;

    fn add(incarnation: u64, from: u32, added: Vec<Vec<NodeId>>) -> MetadataCommand {
        MetadataCommand::AddPartitions { name: "orders".into(), incarnation, from, added }
    }

    /// Partitions are added once, to the incarnation and partition count
    /// the leader placed them for, with valid replica lists only: a second
    /// alteration placed for the old count (racing across a change of
    /// leader), one for a deleted incarnation, and invalid lists leave the
    /// channel as it was.
    #[test]
    fn partitions_are_added_to_the_incarnation_and_count_they_were_placed_for() {
        let mut state = MetadataState::default();
        let channel = ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel: channel.clone() }, 3);
        state.apply(&MetadataCommand::DeleteChannel { name: "orders".into() }, 8);
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 12);
        let invalid = [
            add(3, 1, vec![vec![2, 3, 1]]),
            add(12, 2, vec![vec![2, 3, 1]]),
            add(12, 1, vec![]),
            add(12, 1, vec![vec![2, 3]]),
            add(12, 1, vec![vec![2, 2, 3]]),
            add(12, 1, vec![vec![1, 2, 3]; super::super::REPLICATED_PARTITIONS_MAX]),
        ];
        for (index, command) in invalid.iter().enumerate() {
            state.apply(command, 13 + index as u64);
            assert_eq!(state.channels["orders"].replicas, vec![vec![1, 2, 3]], "{command:?}");
        }
        state.apply(&add(12, 1, vec![vec![2, 3, 1], vec![3, 1, 2]]), 20);
        assert_eq!(state.channels["orders"].replicas, vec![vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2]]);
        // The same alteration again (another leader's, placed for one
        // partition) does not apply twice.
        state.apply(&add(12, 1, vec![vec![2, 3, 1]]), 21);
        assert_eq!(state.channels["orders"].replicas.len(), 3);
        // Positions in a new partition are kept once it exists.
        let position = MetadataCommand::OfIncarnations {
            incarnations: [("orders".to_string(), 12)].into(),
            command: ChannelCommand::CommitPositions {
                positions: vec![ReplicatedPosition {
                    channel: "orders".into(),
                    name: "billing".into(),
                    partition: 2,
                    group: true,
                    offset: 5,
                }],
            },
        };
        state.apply(&position, 22);
        assert_eq!(state.positions.values().copied().collect::<Vec<_>>(), vec![5]);
        // The group reading the channel reads the next new partition from
        // its start.
        state.apply(&add(12, 3, vec![vec![1, 2, 3]]), 23);
        let group_positions: Vec<(u32, u64)> =
            state.positions.iter().map(|((_, _, partition, _), offset)| (*partition, *offset)).collect();
        assert_eq!(group_positions, vec![(2, 5), (3, 0)]);
    }
}
