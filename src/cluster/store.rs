//! The metadata group's storage: its Raft log, vote, commit point and last
//! snapshot in one redb database (`DATA_DIR/cluster/metadata.redb`, see
//! [`super::raft_log`]), and its state machine, rebuilt at start from that
//! snapshot and the log.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use redb::Database;
use tokio::sync::watch;

use super::raft_log::{RaftLogStore, SNAPSHOT, open_database, read_state, write_snapshot};
use super::types::{LogId, MetadataState, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// The metadata group's Raft log and vote.
pub type MetadataLogStore = RaftLogStore<TypeConfig>;

/// Opens (or creates) the metadata database at `path`.
///
/// # Errors
/// The file cannot be created or is not a redb database.
pub fn open(path: &Path) -> io::Result<(MetadataLogStore, MetadataStateMachine)> {
    let db = open_database(path)?;
    let log = RaftLogStore::new(Arc::clone(&db), "metadata");
    let machine = MetadataStateMachine::open(db)?;
    Ok((log, machine))
}

/// The metadata state as snapshots of the first replicated channels
/// (before partition leaders and positions) hold it.
#[derive(serde::Deserialize)]
struct MetadataStateChannelsOnly {
    channels: std::collections::BTreeMap<String, super::types::ReplicatedChannel>,
}

/// The metadata state as snapshots before incarnations and deleted
/// channels hold it.
#[derive(serde::Deserialize)]
struct MetadataStateBeforeIncarnations {
    channels: std::collections::BTreeMap<String, super::types::ReplicatedChannel>,
    leaders: std::collections::BTreeMap<String, std::collections::BTreeMap<u32, super::types::ReportedLeader>>,
    positions: std::collections::BTreeMap<super::types::PositionKey, u64>,
}

/// The last snapshot. One written in an earlier layout (before the state
/// held leaders and positions, or incarnations) is read in its layout
/// (postcard is not self-describing); its channels' incarnations are 0,
/// unknown.
fn read_snapshot(db: &Database) -> io::Result<Option<(SnapshotMeta, MetadataState)>> {
    read_state::<(SnapshotMeta, MetadataState)>(db, SNAPSHOT).or_else(|error| {
        let before = read_state::<(SnapshotMeta, MetadataStateBeforeIncarnations)>(db, SNAPSHOT).map(|old| {
            old.map(|(meta, old)| {
                let incarnations = old.channels.keys().map(|name| (name.clone(), 0)).collect();
                let state = MetadataState {
                    channels: old.channels,
                    leaders: old.leaders,
                    positions: old.positions,
                    incarnations,
                    ..MetadataState::default()
                };
                (meta, state)
            })
        });
        before
            .or_else(|_| {
                read_state::<(SnapshotMeta, MetadataStateChannelsOnly)>(db, SNAPSHOT).map(|old| {
                    old.map(|(meta, old)| {
                        let incarnations = old.channels.keys().map(|name| (name.clone(), 0)).collect();
                        (meta, MetadataState { channels: old.channels, incarnations, ..MetadataState::default() })
                    })
                })
            })
            .map_err(|_| error)
    })
}

#[derive(Default)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: MetadataState,
}

/// The metadata group's state machine: its membership (the nodes), the
/// replicated channels and the last applied entry, in memory; restored at start from the last
/// snapshot, after which openraft applies the committed log again.
#[derive(Clone)]
pub struct MetadataStateMachine {
    db: Arc<Database>,
    applied: Arc<Mutex<Applied>>,
    /// The replicated channels, sent after every change: the node's
    /// replicas follow it (`super::replicas`).
    changes: Arc<watch::Sender<MetadataState>>,
}

impl MetadataStateMachine {
    fn open(db: Arc<Database>) -> io::Result<MetadataStateMachine> {
        let mut applied = Applied::default();
        if let Some((meta, state)) = read_snapshot(&db)? {
            applied = Applied { last_applied: meta.last_log_id, membership: meta.last_membership, state };
        }
        let changes = Arc::new(watch::Sender::new(applied.state.clone()));
        Ok(MetadataStateMachine { db, applied: Arc::new(Mutex::new(applied)), changes })
    }

    /// Sees every change of the replicated channels (the current state
    /// first).
    pub fn subscribe(&self) -> watch::Receiver<MetadataState> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Applied> {
        // A panic while holding it leaves plain data, still consistent.
        self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MetadataStateMachine {
    type SnapshotData = MetadataState;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, state) = {
            let applied = self.lock();
            let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone() };
            (meta, applied.state.clone())
        };
        write_snapshot(&self.db, &meta, &state, |meta: &SnapshotMeta| meta.last_log_id).await?;
        Ok(Snapshot { meta, snapshot: state })
    }
}

impl RaftStateMachine<TypeConfig> for MetadataStateMachine {
    type SnapshotData = MetadataState;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            {
                let mut applied = self.lock();
                applied.last_applied = Some(entry.log_id());
                match entry.payload {
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    }
                    EntryPayload::Normal(command) => {
                        applied.state.apply(&command, entry.log_id.index);
                        self.changes.send_replace(applied.state.clone());
                    }
                    EntryPayload::Blank => {}
                }
            }
            if let Some(responder) = responder {
                responder.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: MetadataState) -> Result<(), io::Error> {
        write_snapshot(&self.db, meta, &snapshot, |meta: &SnapshotMeta| meta.last_log_id).await?;
        let mut applied = self.lock();
        *applied =
            Applied { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), state: snapshot };
        self.changes.send_replace(applied.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(read_snapshot(&self.db)?.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

    use crate::cluster::types::{Entry, Vote};

    use openraft::async_runtime::Oneshot;
    use openraft::errors::ErrorSource;
    use openraft::vote::RaftLeaderId;

    struct Builder(tempfile::TempDir);

    fn storage_error(error: std::io::Error) -> openraft::StorageError<TypeConfig> {
        openraft::StorageError::read(ErrorSource::from_error(&error))
    }

    impl openraft::testing::log::StoreBuilder<TypeConfig, MetadataLogStore, MetadataStateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, MetadataLogStore, MetadataStateMachine), openraft::StorageError<TypeConfig>>
        {
            let dir = tempfile::tempdir_in(self.0.path()).map_err(storage_error)?;
            let (log, machine) = open(&dir.path().join("metadata.redb")).map_err(storage_error)?;
            Ok((dir, log, machine))
        }
    }

    /// openraft's conformance suite for log stores and state machines.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_metadata_store_passes_openrafts_storage_suite() -> Result<(), openraft::StorageError<TypeConfig>> {
        let root = tempfile::tempdir().expect("a temporary directory");
        openraft::testing::log::Suite::test_all(Builder(root)).await
    }

    /// What was written is read back after the database is opened again:
    /// the vote, the entries, the commit point, the snapshot.
    #[tokio::test]
    async fn votes_entries_and_snapshots_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        let vote = Vote::new(3, 1);
        let leader = openraft::impls::leader_id_std::LeaderId::<u64, u64>::new(3, 1).to_committed();
        let log_id = |index| LogId::new(leader, index);
        {
            let (mut log, mut machine) = open(&path).unwrap();
            log.save_vote(&vote).await.unwrap();
            let entries = (0..3).map(|index| Entry::new_blank(log_id(index)));
            let (done, flushed) = openraft::alias::OneshotOf::<TypeConfig>::channel();
            log.append(entries, IOFlushed::signal(done)).await.unwrap();
            flushed.await.unwrap().unwrap();
            log.save_committed(Some(log_id(1))).await.unwrap();
            machine.lock().last_applied = Some(log_id(1));
            machine.build_snapshot().await.unwrap();
        }
        let (mut log, mut machine) = open(&path).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2)));
        assert_eq!(log.try_get_log_entries(0..10).await.unwrap().len(), 3);
        assert_eq!(machine.applied_state().await.unwrap().0, Some(log_id(1)));
        log.truncate_after(Some(log_id(0))).await.unwrap();
        log.purge(log_id(0)).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(0)), Some(log_id(0))));
    }

    /// A snapshot of the first layout of the state (channels only) is still
    /// read, its channels kept.
    #[tokio::test]
    async fn a_snapshot_of_the_first_layout_is_read() {
        #[derive(serde::Serialize)]
        struct FirstLayout {
            channels: std::collections::BTreeMap<String, super::super::types::ReplicatedChannel>,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        let channel = super::super::types::ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3]] };
        {
            let db = open_database(&path).unwrap();
            let old = FirstLayout { channels: [("orders".to_string(), channel.clone())].into() };
            super::super::raft_log::write_state(&db, SNAPSHOT, &(SnapshotMeta::default(), old)).await.unwrap();
        }
        let (_, mut machine) = open(&path).unwrap();
        assert_eq!(machine.subscribe().borrow().channels.get("orders"), Some(&channel));
        // openraft reads it too.
        let snapshot = machine.get_current_snapshot().await.unwrap().expect("the snapshot");
        assert_eq!(snapshot.snapshot.channels.get("orders"), Some(&channel));
    }

    /// A snapshot of the layout before incarnations is still read, with
    /// everything it held; its channels' incarnations are unknown (0).
    #[tokio::test]
    async fn a_snapshot_from_before_incarnations_is_read_with_unknown_incarnations() {
        use super::super::types::{LeaderReport, MetadataCommand, ReplicatedChannel};
        #[derive(serde::Serialize)]
        struct BeforeIncarnations {
            channels: std::collections::BTreeMap<String, ReplicatedChannel>,
            leaders: std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<u32, super::super::types::ReportedLeader>,
            >,
            positions: std::collections::BTreeMap<super::super::types::PositionKey, u64>,
        }
        let mut state = MetadataState::default();
        let channel = ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 1);
        let reports = vec![LeaderReport { channel: "orders".into(), partition: 0, leader: 2, term: 7 }];
        state.apply(&MetadataCommand::PartitionLeaders { reports }, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let db = open_database(&path).unwrap();
            let old = BeforeIncarnations {
                channels: state.channels.clone(),
                leaders: state.leaders.clone(),
                positions: state.positions.clone(),
            };
            super::super::raft_log::write_state(&db, SNAPSHOT, &(SnapshotMeta::default(), old)).await.unwrap();
        }
        let (_, machine) = open(&path).unwrap();
        let read = machine.subscribe().borrow().clone();
        assert_eq!((&read.channels, &read.leaders), (&state.channels, &state.leaders));
        assert_eq!(read.incarnations.get("orders"), Some(&0));
        assert!(read.deleted.is_empty());
    }

    /// A snapshot of today's layout cut short must not be taken for one
    /// of the first layout (which would read its channels and drop its
    /// leaders and positions without a word): refused.
    #[tokio::test]
    async fn a_damaged_snapshot_is_refused_not_read_as_the_first_layout() {
        use super::super::types::{LeaderReport, MetadataCommand, ReplicatedChannel};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        let mut state = MetadataState::default();
        let channel = ReplicatedChannel { replication_factor: 3, replicas: vec![vec![1, 2, 3]] };
        state.apply(&MetadataCommand::CreateChannel { name: "orders".into(), channel }, 1);
        let reports = vec![LeaderReport { channel: "orders".into(), partition: 0, leader: 2, term: 7 }];
        state.apply(&MetadataCommand::PartitionLeaders { reports }, 2);
        assert!(!state.leaders.is_empty(), "the state holds more than the first layout");
        let mut bytes = super::super::raft_log::encode(&(SnapshotMeta::default(), state)).unwrap();
        bytes.pop();
        {
            let db = open_database(&path).unwrap();
            super::super::raft_log::write_txn(&db, move |txn| {
                let mut table = txn.open_table(super::super::raft_log::STATE).map_err(io::Error::other)?;
                table.insert(SNAPSHOT, bytes.as_slice()).map_err(io::Error::other)?;
                Ok(())
            })
            .await
            .unwrap();
        }
        let opened = open(&path);
        assert!(opened.is_err(), "a snapshot cut short was read");
    }
}
