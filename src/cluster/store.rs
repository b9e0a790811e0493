//! The metadata group's storage: its Raft log, vote, commit point and last
//! snapshot in one redb database (`DATA_DIR/cluster/metadata.redb`), and
//! its state machine, rebuilt at start from that snapshot and the log.
//!
//! Every write is a redb transaction committed with `Durability::Immediate`
//! (an fsync) before openraft is told it is done: a vote is never answered
//! and an entry never counted towards a commit before it is on disk,
//! whatever the broker's `fsync` policy for channels. The metadata group
//! writes rarely (membership changes, elections), so this costs nothing on
//! the publish path. Partition groups (docs/REPLICATION.md) will use the
//! segmented log instead.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, TryStreamExt};
use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::types::{Entry, LogId, MetadataState, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";

/// Opens (or creates) the metadata database at `path`.
///
/// # Errors
/// The file cannot be created or is not a redb database.
pub fn open(path: &Path) -> io::Result<(MetadataLogStore, MetadataStateMachine)> {
    let db = Arc::new(Database::create(path).map_err(io::Error::other)?);
    // Both tables exist from the first start on, so reads never meet a
    // missing table.
    let txn = db.begin_write().map_err(io::Error::other)?;
    txn.open_table(LOG).map_err(io::Error::other)?;
    txn.open_table(STATE).map_err(io::Error::other)?;
    txn.commit().map_err(io::Error::other)?;
    let log = MetadataLogStore { db: Arc::clone(&db) };
    let machine = MetadataStateMachine::open(db)?;
    Ok((log, machine))
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(io::Error::other)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

fn read_state<T: DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    let txn = db.begin_read().map_err(io::Error::other)?;
    let table = txn.open_table(STATE).map_err(io::Error::other)?;
    match table.get(key).map_err(io::Error::other)? {
        Some(value) => decode(value.value()).map(Some),
        None => Ok(None),
    }
}

/// Runs `write` in one write transaction and commits it (an fsync), on the
/// blocking pool.
async fn write_txn<F>(db: &Arc<Database>, write: F) -> io::Result<()>
where
    F: FnOnce(&redb::WriteTransaction) -> io::Result<()> + Send + 'static,
{
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || {
        let txn = db.begin_write().map_err(io::Error::other)?;
        write(&txn)?;
        txn.commit().map_err(io::Error::other)
    })
    .await
    .map_err(io::Error::other)?
}

/// Stores `snapshot` as the last one unless a newer one is stored: a build
/// that started before an install must not overwrite it.
async fn write_snapshot(db: &Arc<Database>, meta: &SnapshotMeta, state: &MetadataState) -> io::Result<()> {
    let bytes = encode(&(meta, state))?;
    let last_log_id = meta.last_log_id;
    write_txn(db, move |txn| {
        let mut table = txn.open_table(STATE).map_err(io::Error::other)?;
        let stored = match table.get(SNAPSHOT).map_err(io::Error::other)? {
            Some(value) => decode::<(SnapshotMeta, MetadataState)>(value.value())?.0.last_log_id,
            None => None,
        };
        if stored <= last_log_id {
            table.insert(SNAPSHOT, bytes.as_slice()).map_err(io::Error::other)?;
        }
        Ok(())
    })
    .await
}

async fn write_state<T: Serialize>(db: &Arc<Database>, key: &'static str, value: &T) -> io::Result<()> {
    let bytes = encode(value)?;
    write_txn(db, move |txn| {
        let mut table = txn.open_table(STATE).map_err(io::Error::other)?;
        table.insert(key, bytes.as_slice()).map_err(io::Error::other)?;
        Ok(())
    })
    .await
}

/// The metadata group's Raft log and vote.
#[derive(Clone)]
pub struct MetadataLogStore {
    db: Arc<Database>,
}

impl RaftLogReader<TypeConfig> for MetadataLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let table = txn.open_table(LOG).map_err(io::Error::other)?;
        let mut entries = Vec::new();
        // The whole range: openraft's contract forbids stopping early (its
        // apply path reads every newly committed entry in one call; the
        // metadata log is small).
        for item in table.range(range).map_err(io::Error::other)? {
            let (_, value) = item.map_err(io::Error::other)?;
            entries.push(decode(value.value())?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        read_state(&self.db, VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for MetadataLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = read_state(&self.db, LAST_PURGED)?;
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let table = txn.open_table(LOG).map_err(io::Error::other)?;
        let last = match table.last().map_err(io::Error::other)? {
            Some((_, value)) => Some(decode::<Entry>(value.value())?.log_id()),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        write_state(&self.db, VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        write_state(&self.db, COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(read_state::<Option<LogId>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded =
            entries.into_iter().map(|entry| Ok((entry.index(), encode(&entry)?))).collect::<io::Result<Vec<_>>>()?;
        let written = write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io::Error::other)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice()).map_err(io::Error::other)?;
            }
            Ok(())
        })
        .await;
        // Committed with an fsync: durable when the transaction returns.
        match written {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.io_completed(Err(io::Error::new(error.kind(), error.to_string())));
                Err(error)
            }
        }
    }

    async fn truncate_after(&mut self, last_kept: Option<LogId>) -> Result<(), io::Error> {
        let from = last_kept.map_or(0, |log_id| log_id.index + 1);
        // Only entries never committed are cut (openraft asks for nothing
        // at or below the commit point): a deposed leader's suffix.
        tracing::info!(
            group = "metadata",
            from,
            "truncating the Raft log: entries from this index were never committed"
        );
        write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io::Error::other)?;
            table.retain_in(from.., |_, _| false).map_err(io::Error::other)
        })
        .await
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), io::Error> {
        let last_purged = encode(&upto)?;
        write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io::Error::other)?;
            table.retain_in(..=upto.index, |_, _| false).map_err(io::Error::other)?;
            let mut state = txn.open_table(STATE).map_err(io::Error::other)?;
            state.insert(LAST_PURGED, last_purged.as_slice()).map_err(io::Error::other)?;
            Ok(())
        })
        .await
    }
}

#[derive(Default)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: MetadataState,
}

/// The metadata group's state machine: its membership (the nodes) and
/// last applied entry, in memory; restored at start from the last
/// snapshot, after which openraft applies the committed log again.
#[derive(Clone)]
pub struct MetadataStateMachine {
    db: Arc<Database>,
    applied: Arc<Mutex<Applied>>,
}

impl MetadataStateMachine {
    fn open(db: Arc<Database>) -> io::Result<MetadataStateMachine> {
        let mut applied = Applied::default();
        if let Some((meta, state)) = read_state::<(SnapshotMeta, MetadataState)>(&db, SNAPSHOT)? {
            applied = Applied { last_applied: meta.last_log_id, membership: meta.last_membership, state };
        }
        Ok(MetadataStateMachine { db, applied: Arc::new(Mutex::new(applied)) })
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
        write_snapshot(&self.db, &meta, &state).await?;
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
                if let Some(membership) = entry.get_membership() {
                    applied.membership = StoredMembership::new(Some(entry.log_id()), membership);
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
        write_snapshot(&self.db, meta, &snapshot).await?;
        *self.lock() =
            Applied { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), state: snapshot };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(read_state::<(SnapshotMeta, MetadataState)>(&self.db, SNAPSHOT)?
            .map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
