//! Consumer groups: subscriptions that share a channel's partitions.
//!
//! A group lives in the broker, per (channel, group name). Every partition
//! is assigned to exactly one live member, balanced (each member owns
//! `⌊P/M⌋` or `⌈P/M⌉` partitions) and sticky (a join or a leave moves as
//! few partitions as it can). A partition that moves is first revoked from
//! its owner, which stops reading it; it is handed to the new owner only
//! once the old one has acknowledged everything it was sent of it, or has
//! gone, or `group_session_timeout_ms` has passed (cooperative handover,
//! as Kafka's KIP-429). The new owner starts at the group's committed
//! position. See docs/PARTITIONS.md.
//!
//! The coordinator state is small and behind a mutex; each member learns
//! its assignment from a `watch` (the newest assignment wins, nothing
//! queues up), and a task per member turns changes into cursors and
//! ASSIGNED/REVOKED notices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::storage::ChannelName;

/// The partitions a member reads, as of a generation of its group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Assignment {
    pub generation: u64,
    pub partitions: BTreeSet<u32>,
}

/// Why a member could not join.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinError {
    #[error("channel {channel} already has max_groups_per_channel = {count_max} consumer groups")]
    TooManyGroups { channel: String, count_max: usize },
    #[error("group {group} of channel {channel} already has max_members_per_group = {count_max} members")]
    TooManyMembers { channel: String, group: String, count_max: usize },
}

/// Every consumer group of the broker.
pub(crate) struct Groups {
    groups: Mutex<HashMap<(ChannelName, String), Arc<Group>>>,
    groups_per_channel_max: usize,
    members_per_group_max: usize,
}

impl Groups {
    pub fn new(groups_per_channel_max: usize, members_per_group_max: usize) -> Groups {
        Groups { groups: Mutex::new(HashMap::new()), groups_per_channel_max, members_per_group_max }
    }

    /// Adds a member to the group `group` of `channel` (created on its
    /// first member), which has `partitions` partitions.
    ///
    /// # Errors
    /// A limit on groups per channel or members per group.
    pub fn join(
        &self,
        channel: &ChannelName,
        partition_count: impl Fn() -> u32,
        group: &str,
    ) -> Result<Member, JoinError> {
        // Everything under the map's lock (then the group's): a group is
        // never dropped from the map between being found and being joined,
        // and a partition count read here is never older than the one
        // `partitions_changed` applies after it.
        let mut groups = self.lock();
        let key = (channel.clone(), group.to_owned());
        let group = match groups.get(&key) {
            Some(existing) => Arc::clone(existing),
            None => {
                // A group whose last member left is forgotten here (its
                // committed positions stay on disk).
                groups.retain(|_, group| !group.lock().members.is_empty());
                let of_channel = groups.keys().filter(|(c, _)| c == channel).count();
                if of_channel >= self.groups_per_channel_max {
                    return Err(JoinError::TooManyGroups {
                        channel: channel.to_string(),
                        count_max: self.groups_per_channel_max,
                    });
                }
                let created = Arc::new(Group::new(channel.clone(), group.to_owned(), 0));
                groups.insert(key, Arc::clone(&created));
                created
            }
        };
        let mut state = group.lock();
        if state.members.len() >= self.members_per_group_max {
            return Err(JoinError::TooManyMembers {
                channel: channel.to_string(),
                group: group.name.clone(),
                count_max: self.members_per_group_max,
            });
        }
        state.partition_count = state.partition_count.max(partition_count());
        let id = state.next_member_id;
        state.next_member_id += 1;
        let (sender, assignment) = watch::channel(Assignment::default());
        state.members.insert(id, sender);
        state.rebalance();
        drop(state);
        drop(groups);
        Ok(Member { id, assignment, group })
    }

    /// Tells the groups of `channel` that it now has `partitions`
    /// partitions: the new ones are assigned.
    pub fn partitions_changed(&self, channel: &ChannelName, partitions: u32) {
        let groups = self.lock();
        for group in groups.iter().filter(|((c, _), _)| c == channel).map(|(_, group)| group) {
            let mut state = group.lock();
            if partitions > state.partition_count {
                state.partition_count = partitions;
                state.rebalance();
            }
        }
    }

    /// How many members the groups of `channel` have.
    pub fn member_count(&self, channel: &ChannelName) -> usize {
        let groups = self.lock();
        groups.iter().filter(|((c, _), _)| c == channel).map(|(_, group)| group.lock().members.len()).sum()
    }

    /// Forgets the groups of a deleted channel (their members end with it).
    pub fn forget_channel(&self, channel: &ChannelName) {
        self.lock().retain(|(c, _), _| c != channel);
    }

    /// Every group of `channel` (or of every channel) with its members'
    /// assignments, for the admin view.
    pub fn describe(&self, channel: Option<&ChannelName>) -> Vec<GroupView> {
        let groups: Vec<Arc<Group>> = self
            .lock()
            .iter()
            .filter(|((c, _), _)| channel.is_none_or(|channel| c == channel))
            .map(|(_, group)| Arc::clone(group))
            .collect();
        let mut views: Vec<GroupView> = groups.iter().map(|group| group.view()).collect();
        views.sort_by(|a, b| (&a.channel, &a.name).cmp(&(&b.channel, &b.name)));
        views
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(ChannelName, String), Arc<Group>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the admin view shows of a group.
#[derive(Clone, Debug)]
pub(crate) struct GroupView {
    pub channel: ChannelName,
    pub name: String,
    pub generation: u64,
    /// Per partition, the member reading it (by member id), if any.
    pub owners: Vec<Option<u64>>,
    pub members: Vec<u64>,
}

/// One consumer group.
pub(crate) struct Group {
    channel: ChannelName,
    name: String,
    state: Mutex<GroupState>,
}

struct GroupState {
    generation: u64,
    partition_count: u32,
    next_member_id: u64,
    /// Live members in join order, each with the watch it reads its
    /// assignment from.
    members: BTreeMap<u64, watch::Sender<Assignment>>,
    /// Who should own each partition.
    target: Vec<Option<u64>>,
    /// Who reads each partition now (a revoked owner until it lets go).
    actual: Vec<Option<u64>>,
}

impl Group {
    fn new(channel: ChannelName, name: String, partition_count: u32) -> Group {
        Group {
            channel,
            name,
            state: Mutex::new(GroupState {
                generation: 0,
                partition_count,
                next_member_id: 1,
                members: BTreeMap::new(),
                target: Vec::new(),
                actual: Vec::new(),
            }),
        }
    }

    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn view(&self) -> GroupView {
        let state = self.lock();
        GroupView {
            channel: self.channel.clone(),
            name: self.name.clone(),
            generation: state.generation,
            owners: state.actual.clone(),
            members: state.members.keys().copied().collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl GroupState {
    /// Recomputes who should own what, and hands over what can be.
    fn rebalance(&mut self) {
        let count = self.partition_count as usize;
        self.target.resize(count, None);
        self.actual.resize(count, None);
        let members: Vec<u64> = self.members.keys().copied().collect();
        let target = sticky_assignment(count, &members, &self.target);
        if target != self.target {
            self.generation += 1;
            self.target = target;
        }
        self.hand_over();
    }

    /// Gives every partition nobody reads to its target owner, and tells
    /// each member what it should read now.
    fn hand_over(&mut self) {
        for (actual, target) in self.actual.iter_mut().zip(&self.target) {
            if actual.is_none() {
                *actual = *target;
            }
        }
        for (&id, sender) in &self.members {
            let partitions: BTreeSet<u32> = (0..self.target.len())
                .filter(|&p| self.actual[p] == Some(id) && self.target[p] == Some(id))
                .map(|p| p as u32)
                .collect();
            let assignment = Assignment { generation: self.generation, partitions };
            sender.send_if_modified(|current| {
                let changed = current.partitions != assignment.partitions;
                if changed {
                    *current = assignment;
                }
                changed
            });
        }
    }

    /// `member` has let go of `partition`.
    fn release(&mut self, member: u64, partition: u32) {
        let p = partition as usize;
        if self.actual.get(p) == Some(&Some(member)) && self.target.get(p) != Some(&Some(member)) {
            self.actual[p] = None;
            self.hand_over();
        }
    }

    fn leave(&mut self, member: u64) {
        self.members.remove(&member);
        for actual in &mut self.actual {
            if *actual == Some(member) {
                *actual = None;
            }
        }
        self.rebalance();
    }
}

/// The sticky, balanced assignment of `count` partitions to `members` (in
/// join order), given who should own what so far: each member keeps what
/// it has up to its quota (`⌊count/n⌋`, plus one for as many members as
/// the remainder, those holding the most first, then the oldest), and the
/// partitions left go, lowest first, to the members furthest below theirs.
fn sticky_assignment(count: usize, members: &[u64], previous: &[Option<u64>]) -> Vec<Option<u64>> {
    let mut target = vec![None; count];
    if members.is_empty() {
        return target;
    }
    let mut held: BTreeMap<u64, Vec<usize>> = members.iter().map(|&m| (m, Vec::new())).collect();
    for (p, owner) in previous.iter().enumerate().take(count) {
        if let Some(owner) = owner
            && let Some(partitions) = held.get_mut(owner)
        {
            partitions.push(p);
        }
    }
    let (base, extra) = (count / members.len(), count % members.len());
    let mut by_holding: Vec<(usize, u64)> = members.iter().enumerate().map(|(order, &m)| (order, m)).collect();
    by_holding.sort_by_key(|&(order, m)| (std::cmp::Reverse(held[&m].len()), order));
    let quota: HashMap<u64, usize> =
        by_holding.iter().enumerate().map(|(rank, &(_, m))| (m, base + usize::from(rank < extra))).collect();
    let mut owned: HashMap<u64, usize> = HashMap::new();
    for (&member, partitions) in &held {
        for &p in partitions.iter().take(quota[&member]) {
            target[p] = Some(member);
            *owned.entry(member).or_default() += 1;
        }
    }
    for slot in target.iter_mut().filter(|slot| slot.is_none()) {
        let neediest = members
            .iter()
            .enumerate()
            .filter(|&(_, m)| owned.get(m).copied().unwrap_or(0) < quota[m])
            .min_by_key(|&(order, m)| (owned.get(m).copied().unwrap_or(0), order))
            .map(|(_, &m)| m);
        if let Some(member) = neediest {
            *slot = Some(member);
            *owned.entry(member).or_default() += 1;
        }
    }
    target
}

/// A member's place in its group; leaving the group when dropped.
pub(crate) struct Member {
    pub id: u64,
    pub assignment: watch::Receiver<Assignment>,
    group: Arc<Group>,
}

impl Member {
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Lets go of a revoked partition: it goes to its new owner.
    pub fn release(&self, partition: u32) {
        self.group.lock().release(self.id, partition);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.group.lock().leave(self.id);
    }
}

/// How long a revoked partition may wait for its owner's acks before it
/// moves anyway, and how often a draining member looks.
pub(crate) struct Handover {
    pub ack_wait_max: Duration,
    pub poll_interval: Duration,
}

impl Handover {
    /// Whether a revoked partition may go: everything sent was acked, or
    /// the wait is over.
    pub fn may_release(&self, revoked_at: Instant, acked_to: u64, delivered_to: u64) -> bool {
        acked_to >= delivered_to || revoked_at.elapsed() >= self.ack_wait_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(target: &[Option<u64>]) -> BTreeMap<u64, usize> {
        let mut counts = BTreeMap::new();
        for owner in target.iter().flatten() {
            *counts.entry(*owner).or_default() += 1;
        }
        counts
    }

    #[test]
    fn partitions_are_shared_evenly_and_every_one_has_an_owner() {
        for count in 0..20 {
            for members in 1..8u64 {
                let ids: Vec<u64> = (1..=members).collect();
                let target = sticky_assignment(count, &ids, &[]);
                assert!(target.iter().all(Option::is_some), "{count} partitions, {members} members");
                let counts = counts(&target);
                let (min, max) =
                    (counts.values().min().copied().unwrap_or(0), counts.values().max().copied().unwrap_or(0));
                assert!(max - min <= 1 || count == 0, "{count}/{members}: {counts:?}");
            }
        }
    }

    #[test]
    fn a_join_moves_only_what_the_newcomer_needs_and_a_leave_only_the_leavers_partitions() {
        let three = sticky_assignment(6, &[1, 2, 3], &[]);
        let four = sticky_assignment(6, &[1, 2, 3, 4], &three);
        let moved = three.iter().zip(&four).filter(|(a, b)| a != b).count();
        assert_eq!(moved, 1, "{three:?} -> {four:?}");
        assert_eq!(counts(&four)[&4], 1);
        let without_two = sticky_assignment(6, &[1, 3, 4], &four);
        for (p, (before, after)) in four.iter().zip(&without_two).enumerate() {
            if *before != Some(2) {
                assert_eq!(before, after, "partition {p} did not belong to the leaver and stays");
            }
        }
        assert!(without_two.iter().all(|owner| owner.is_some_and(|m| m != 2)));
    }

    #[test]
    fn members_beyond_the_partition_count_own_nothing_until_one_leaves() {
        let target = sticky_assignment(2, &[1, 2, 3], &[]);
        assert_eq!(counts(&target).get(&3), None);
        let after = sticky_assignment(2, &[2, 3], &target);
        assert!(after.iter().all(Option::is_some));
        assert_eq!(after.iter().filter(|owner| **owner == Some(2)).count(), 1);
    }

    use crate::storage::Channel;

    /// A channel of `partitions` partitions on real files.
    fn channel(dir: &tempfile::TempDir, partitions: u32) -> Channel {
        let settings = crate::storage::ChannelSettings { partitions: Some(partitions), ..Default::default() };
        let fs: Arc<dyn crate::storage::fs::FileSystem> = Arc::new(crate::storage::fs::StdFileSystem);
        let config = crate::storage::LogConfig::default();
        Channel::create(fs, dir.path(), ChannelName::new("orders").unwrap(), &config, settings).unwrap()
    }

    #[test]
    fn a_revoked_partition_goes_to_its_new_owner_only_once_released() {
        let groups = Groups::new(4, 4);
        let dir = tempfile::tempdir().unwrap();
        let channel = channel(&dir, 2);
        let first = groups.join(channel.name(), || channel.partition_count(), "billing").unwrap();
        assert_eq!(first.assignment.borrow().partitions, BTreeSet::from([0, 1]));
        let second = groups.join(channel.name(), || channel.partition_count(), "billing").unwrap();
        // One partition is revoked from the first member, and the second
        // gets nothing until the first lets it go.
        let kept = first.assignment.borrow().partitions.clone();
        assert_eq!(kept.len(), 1);
        assert!(second.assignment.borrow().partitions.is_empty());
        let moving = (0..2).find(|p| !kept.contains(p)).unwrap();
        first.release(moving);
        assert_eq!(second.assignment.borrow().partitions, BTreeSet::from([moving]));
        // A leaver's partitions move at once.
        drop(first);
        assert_eq!(second.assignment.borrow().partitions, BTreeSet::from([0, 1]));
    }

    #[test]
    fn group_and_member_limits_are_answered() {
        let groups = Groups::new(1, 2);
        let dir = tempfile::tempdir().unwrap();
        let channel = channel(&dir, 1);
        let join = |group: &str| groups.join(channel.name(), || channel.partition_count(), group);
        let _a = join("g").unwrap();
        let _b = join("g").unwrap();
        assert!(matches!(join("g"), Err(JoinError::TooManyMembers { count_max: 2, .. })));
        assert!(matches!(join("other"), Err(JoinError::TooManyGroups { count_max: 1, .. })));
    }
}
