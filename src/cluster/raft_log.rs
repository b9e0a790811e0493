//! A Raft group's log, vote and commit point in one redb database, for any
//! of weir's groups (the metadata group and each replicated partition's):
//! entries keyed by index, each encoded with postcard.
//!
//! Every write is a redb transaction committed with an fsync
//! (`Durability::Immediate`, redb's default) before openraft is told it is
//! done: a vote is never answered, and an entry never counted towards a
//! commit, before it is on disk, whatever the broker's `fsync` policy for
//! channels (docs/REPLICATION.md, "What an acknowledgement means").
//!
//! The database's `state` table also holds what a group's state machine
//! keeps beside its log (its last snapshot, for example), under keys of
//! its own.

use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftTypeConfig};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(super) const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Opens (or creates) a group's database at `path`, with both tables.
///
/// # Errors
/// The file cannot be created or is not a redb database.
pub(super) fn open_database(path: &Path) -> io::Result<Arc<Database>> {
    let db = Arc::new(Database::create(path).map_err(io::Error::other)?);
    // Both tables exist from the first start on, so reads never meet a
    // missing table.
    let txn = db.begin_write().map_err(io::Error::other)?;
    txn.open_table(LOG).map_err(io::Error::other)?;
    txn.open_table(STATE).map_err(io::Error::other)?;
    txn.commit().map_err(io::Error::other)?;
    Ok(db)
}

pub(super) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(io::Error::other)
}

/// Decodes a whole stored value. Bytes left over mean damage or another
/// layout (postcard is not self-describing): refused, never ignored, so
/// that a reader of an older layout cannot take a prefix of a newer one.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    if !rest.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes left over after a value of {} bytes", rest.len(), bytes.len() - rest.len()),
        ));
    }
    Ok(value)
}

/// Reads one value of the `state` table as stored.
pub(super) fn read_raw_state(db: &Database, key: &str) -> io::Result<Option<Vec<u8>>> {
    let txn = db.begin_read().map_err(io::Error::other)?;
    let table = txn.open_table(STATE).map_err(io::Error::other)?;
    Ok(table.get(key).map_err(io::Error::other)?.map(|value| value.value().to_vec()))
}

/// Reads one value of the `state` table.
pub(super) fn read_state<T: DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    let txn = db.begin_read().map_err(io::Error::other)?;
    let table = txn.open_table(STATE).map_err(io::Error::other)?;
    match table.get(key).map_err(io::Error::other)? {
        Some(value) => decode(value.value()).map(Some),
        None => Ok(None),
    }
}

/// Runs `write` in one write transaction and commits it (an fsync), on the
/// blocking pool.
pub(super) async fn write_txn<F>(db: &Arc<Database>, write: F) -> io::Result<()>
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

/// Writes one value of the `state` table, durably.
pub(super) async fn write_state<T: Serialize>(db: &Arc<Database>, key: &'static str, value: &T) -> io::Result<()> {
    let bytes = encode(value)?;
    write_txn(db, move |txn| {
        let mut table = txn.open_table(STATE).map_err(io::Error::other)?;
        table.insert(key, bytes.as_slice()).map_err(io::Error::other)?;
        Ok(())
    })
    .await
}

/// Key of the state table under which a group keeps its last snapshot
/// (its metadata and data, encoded together).
pub(super) const SNAPSHOT: &str = "snapshot";

/// Stores a snapshot (`meta` and `data`) as the group's last one, unless a
/// newer one is stored (by `last_log_id` of the metadata): a build that
/// started before an install must not overwrite it.
pub(super) async fn write_snapshot<M, D, L>(
    db: &Arc<Database>,
    meta: &M,
    data: &D,
    last_log_id: fn(&M) -> L,
) -> io::Result<()>
where
    M: Serialize + DeserializeOwned + Send + 'static,
    D: Serialize,
    L: PartialOrd + Send + 'static,
{
    let bytes = encode(&(meta, data))?;
    let newest = last_log_id(meta);
    write_txn(db, move |txn| {
        let mut table = txn.open_table(STATE).map_err(io::Error::other)?;
        let stored = match table.get(SNAPSHOT).map_err(io::Error::other)? {
            // Only the metadata is decoded: it comes first.
            Some(value) => {
                Some(last_log_id(&postcard::take_from_bytes::<M>(value.value()).map_err(io::Error::other)?.0))
            }
            None => None,
        };
        if stored.is_none_or(|stored| stored <= newest) {
            table.insert(SNAPSHOT, bytes.as_slice()).map_err(io::Error::other)?;
        }
        Ok(())
    })
    .await
}

/// A Raft group's log and vote, in its redb database. `group` names the
/// group in logs ("metadata", or a channel and partition).
pub struct RaftLogStore<C> {
    db: Arc<Database>,
    group: Arc<str>,
    types: PhantomData<fn() -> C>,
}

impl<C> Clone for RaftLogStore<C> {
    fn clone(&self) -> Self {
        RaftLogStore { db: Arc::clone(&self.db), group: Arc::clone(&self.group), types: PhantomData }
    }
}

impl<C> RaftLogStore<C> {
    pub(super) fn new(db: Arc<Database>, group: &str) -> RaftLogStore<C> {
        RaftLogStore { db, group: group.into(), types: PhantomData }
    }
}

impl<C> RaftLogReader<C> for RaftLogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let table = txn.open_table(LOG).map_err(io::Error::other)?;
        let mut entries = Vec::new();
        // The whole range: openraft's contract forbids stopping early (its
        // apply path reads every newly committed entry in one call); it
        // bounds the ranges it asks for replication by
        // `max_payload_entries`.
        for item in table.range(range).map_err(io::Error::other)? {
            let (_, value) = item.map_err(io::Error::other)?;
            entries.push(decode(value.value())?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        read_state(&self.db, VOTE)
    }
}

impl<C> RaftLogStorage<C> for RaftLogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged: Option<LogIdOf<C>> = read_state(&self.db, LAST_PURGED)?;
        let txn = self.db.begin_read().map_err(io::Error::other)?;
        let table = txn.open_table(LOG).map_err(io::Error::other)?;
        let last = match table.last().map_err(io::Error::other)? {
            Some((_, value)) => Some(decode::<C::Entry>(value.value())?.log_id()),
            None => last_purged.clone(),
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        write_state(&self.db, VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        write_state(&self.db, COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(read_state::<Option<LogIdOf<C>>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
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

    async fn truncate_after(&mut self, last_kept: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_kept.map_or(0, |log_id| log_id.index() + 1);
        // Only entries never committed are cut (openraft asks for nothing
        // at or below the commit point): a deposed leader's suffix.
        tracing::info!(
            group = %self.group,
            from,
            "truncating the Raft log: entries from this index were never committed"
        );
        write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io::Error::other)?;
            table.retain_in(from.., |_, _| false).map_err(io::Error::other)
        })
        .await
    }

    async fn purge(&mut self, upto: LogIdOf<C>) -> Result<(), io::Error> {
        let last_purged = encode(&upto)?;
        let upto = upto.index();
        write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io::Error::other)?;
            table.retain_in(..=upto, |_, _| false).map_err(io::Error::other)?;
            let mut state = txn.open_table(STATE).map_err(io::Error::other)?;
            state.insert(LAST_PURGED, last_purged.as_slice()).map_err(io::Error::other)?;
            Ok(())
        })
        .await
    }
}
