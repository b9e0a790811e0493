//! A replicated partition's Raft group storage (docs/REPLICATION.md, "The
//! Raft log and the partition log"): its entries are publishes, its Raft
//! log is a redb database ([`super::raft_log`]), and its state machine is
//! the partition's segmented log, to which each committed publish is
//! appended as one batch whose header names the entry (index and term).
//!
//! What the state machine has applied is recovered without a write per
//! entry: the partition log's last batch header names the last publish
//! applied; blank and membership entries, which take no offset, are
//! recorded in the database (after the partition log is synced, so that
//! nothing applied before them can be missing after a crash). Offsets are
//! given when an entry is applied, in Raft log order, so every replica
//! gives a publish the same offsets, and the publish's timestamp comes
//! from the leader, so every replica stores the same records.
//!
//! A snapshot is a promise, not data: it records how far the partition
//! log reached. A replica whose own partition log does not reach that far
//! installs it from a copy of the sender's segments, received before the
//! install (segment transfer, `super::replicas`), which replaces its log.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::vote::leader_id_std::CommittedLeaderId;
use openraft::{EntryPayload, OptionalSend};
use redb::Database;
use serde::{Deserialize, Serialize};

use super::dedup::{Decision, ProducerWindow};
use super::raft_log::{
    RaftLogStore, SNAPSHOT, open_database, read_raw_state, read_state, write_snapshot, write_state, write_txn,
};
use super::types::NodeAddrs;
use crate::record::Message;
use crate::storage::{ChannelLog, NewBatch, RaftPosition};

/// One publish to a replicated partition: a Raft entry's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub messages: Vec<Message>,
    /// The idempotent producer's id and first sequence, if any.
    pub producer: Option<(u64, u64)>,
    /// Given by the leader, so that every replica stores the same records
    /// (each record's timestamp is the later of this and the partition's
    /// last one, as on a single node).
    pub timestamp_us: u64,
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "publish of {} messages", self.messages.len())
    }
}

/// Where an applied publish was stored: what its `PUBLISH_ACK` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishApplied {
    pub first_offset: u64,
    pub count: u64,
    pub timestamp_us: u64,
    /// A retry of an idempotent publish stored earlier (by another entry),
    /// answered with that publish's offsets; nothing was stored again.
    pub duplicate: bool,
}

/// An idempotent publish its producer's sequence rules refused when it was
/// applied: nothing was stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRefused {
    /// The protocol's error code ([`crate::protocol::ErrorCode`]).
    pub code: u16,
    pub message: String,
}

/// What applying a publish did.
pub type PublishResult = Result<PublishApplied, PublishRefused>;

openraft::declare_raft_types!(
    /// A replicated partition's group types.
    pub PartitionTypes:
        D = Publish,
        R = PublishResult,
        NodeId = u64,
        Node = NodeAddrs,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type PartitionLogId = openraft::alias::LogIdOf<PartitionTypes>;
pub type PartitionEntry = openraft::alias::EntryOf<PartitionTypes>;
pub type PartitionMembership = openraft::alias::StoredMembershipOf<PartitionTypes>;
pub type PartitionSnapshotMeta = openraft::alias::SnapshotMetaOf<PartitionTypes>;
pub type PartitionSnapshot = openraft::alias::SnapshotOf<PartitionTypes, SnapshotPromise>;
pub type PartitionLogStore = RaftLogStore<PartitionTypes>;
pub type PartitionVote = openraft::alias::VoteOf<PartitionTypes>;
pub type PartitionRaft = openraft::Raft<PartitionTypes, PartitionStateMachine>;

/// What a partition snapshot holds: where the partition log reached when
/// it was taken (the records themselves are sent by segment transfer).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPromise {
    pub next_offset: u64,
}

/// How long applying a publish waits for disk space before the group
/// stops with the error (a committed entry cannot be skipped).
pub const APPLY_STORAGE_FULL_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Key of the state table: the last entry applied and the membership,
/// written when a blank or membership entry is applied.
const APPLIED: &str = "applied";
/// Key of the state table, present while a segment copy is moved in: what
/// was recorded with it (applied point, snapshot) holds only if the copy
/// is in place at the next open (see [`PartitionStateMachine::open`]);
/// its value is a [`PendingTransfer`].
const TRANSFER: &str = "transfer";

/// What the state table held before a segment copy was recorded, restored
/// at open if the copy never got in place (the log is then as it was).
#[derive(Debug, Default, Serialize, Deserialize)]
struct PendingTransfer {
    applied: Option<Vec<u8>>,
    snapshot: Option<Vec<u8>>,
}

/// A copy of another replica's segments, received and checked, waiting
/// for the snapshot it was received for to be installed (segment
/// transfer; `super::replicas` receives it).
pub struct StagedCopy {
    pub end: crate::storage::CopyEnd,
    pub transfer: crate::storage::SegmentTransfer,
}

/// Where a group's received copy waits for its snapshot's install.
pub type StagedCopySlot = Arc<Mutex<Option<StagedCopy>>>;

/// What the state machine has applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<PartitionLogId>,
    membership: PartitionMembership,
    /// The partition log's next offset after `last_applied`.
    next_offset: u64,
}

fn log_id(position: RaftPosition) -> PartitionLogId {
    PartitionLogId::new(CommittedLeaderId::new(position.term), position.index)
}

/// Opens (or creates) a partition's Raft database at `path`, and its state
/// machine over `log`.
///
/// # Errors
/// The database cannot be opened, or its state does not decode.
pub fn open(path: &Path, log: Arc<ChannelLog>) -> io::Result<(PartitionLogStore, PartitionStateMachine)> {
    let db = open_database(path)?;
    let store = RaftLogStore::new(Arc::clone(&db), &log.label());
    let machine = PartitionStateMachine::open(db, log)?;
    Ok((store, machine))
}

/// Settles a segment copy whose move into `log` did not finish (a crash,
/// or a failure before its marker): the log's open finished the move (the
/// copy was whole and marked so), and what was recorded with it holds; or
/// the copy never got there, and the log is as it was before the copy, and
/// so must be the record of what it applied, kept in the [`TRANSFER`] mark.
/// A copy always reaches past the log it replaces, so the log's end tells
/// which.
///
/// # Errors
/// The copy is still being moved in (the next open finishes it), or the
/// database cannot be read or written.
fn resolve_pending_copy(db: &Database, log: &ChannelLog) -> io::Result<()> {
    let Some(pending) = read_raw_state(db, TRANSFER)? else { return Ok(()) };
    if log.segment_copy_pending().map_err(io::Error::other)? {
        return Err(io::Error::other(format!(
            "{}: a segment copy is being moved in; the next start of the node finishes it",
            log.label()
        )));
    }
    let recorded = read_state::<(PartitionSnapshotMeta, SnapshotPromise)>(db, SNAPSHOT)?
        .map_or(0, |(_, promise)| promise.next_offset);
    let in_place = recorded > 0 && log.next_offset() >= recorded;
    // Written by an earlier build as `true`: the log then held nothing
    // before the copy, and nothing was recorded.
    let previous = if pending == super::raft_log::encode(&true)? {
        PendingTransfer::default()
    } else {
        super::raft_log::decode::<PendingTransfer>(&pending)?
    };
    tracing::warn!(partition = %log.label(), kept = in_place, "a segment copy was cut short");
    let txn = db.begin_write().map_err(io::Error::other)?;
    {
        let mut table = txn.open_table(super::raft_log::STATE).map_err(io::Error::other)?;
        table.remove(TRANSFER).map_err(io::Error::other)?;
        if !in_place {
            for (key, value) in [(APPLIED, &previous.applied), (SNAPSHOT, &previous.snapshot)] {
                match value {
                    Some(value) => table.insert(key, value.as_slice()).map_err(io::Error::other)?,
                    None => table.remove(key).map_err(io::Error::other)?,
                };
            }
        }
    }
    txn.commit().map_err(io::Error::other)
}

/// A replicated partition's state machine: its segmented log.
#[derive(Clone)]
pub struct PartitionStateMachine {
    db: Arc<Database>,
    log: Arc<ChannelLog>,
    applied: Arc<Mutex<Applied>>,
    /// The idempotent producers, deduplicated when publishes are applied.
    producers: Arc<Mutex<ProducerWindow>>,
    /// Called after each publish is appended: wakes the partition's readers.
    on_applied: Option<Arc<dyn Fn() + Send + Sync>>,
    /// A segment copy received for the snapshot being installed.
    staged: Option<StagedCopySlot>,
}

impl PartitionStateMachine {
    fn open(db: Arc<Database>, log: Arc<ChannelLog>) -> io::Result<PartitionStateMachine> {
        resolve_pending_copy(&db, &log)?;
        let mut applied = read_state::<Applied>(&db, APPLIED)?.unwrap_or_default();
        // What the database recorded as applied was synced first: a shorter
        // log lost records it must hold (files removed or restored from an
        // older copy), and would give the next entries other offsets than
        // the other replicas'.
        let recorded = read_state::<(PartitionSnapshotMeta, SnapshotPromise)>(&db, SNAPSHOT)?
            .map_or(0, |(_, promise)| promise.next_offset)
            .max(applied.next_offset);
        // A log with records and no batch header (retention removed every
        // segment that had one) no longer says which entries it applied:
        // applying them again would store them twice.
        if log.next_offset() > 0 && log.last_raft_entry().is_none() {
            return Err(io::Error::other(format!(
                "{}: the partition log holds records up to offset {} but no batch header naming the Raft entry they applied; refusing to serve this replica",
                log.label(),
                log.next_offset()
            )));
        }
        if log.next_offset() < recorded {
            return Err(io::Error::other(format!(
                "{}: the partition log ends at offset {} but offset {recorded} was recorded as applied and synced: records are missing; refusing to serve this replica (if recovery set files aside as *.torn in the partition's directory, it cut damage there: see docs/OPERATIONS.md, \"A replica that refuses to start\")",
                log.label(),
                log.next_offset()
            )));
        }
        if let Some((meta, _)) = read_state::<(PartitionSnapshotMeta, SnapshotPromise)>(&db, SNAPSHOT)?
            && meta.last_log_id > applied.last_applied
        {
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership;
        }
        // Publishes applied after the last blank or membership entry are in
        // the partition log only.
        if let Some(last) = log.last_raft_entry().map(log_id)
            && Some(last) > applied.last_applied
        {
            applied.last_applied = Some(last);
        }
        applied.next_offset = log.next_offset();
        let producers = ProducerWindow::rebuild(&log, log.last_raft_entry().map_or(0, |last| last.index))
            .map_err(io::Error::other)?;
        if producers.producer_count() > 0 {
            tracing::info!(partition = %log.label(), producers = producers.producer_count(), "idempotent producers rebuilt from the log");
        }
        Ok(PartitionStateMachine {
            db,
            log,
            applied: Arc::new(Mutex::new(applied)),
            producers: Arc::new(Mutex::new(producers)),
            on_applied: None,
            staged: None,
        })
    }

    /// Installs a snapshot past the log from the segment copy received for
    /// it in `staged`.
    #[must_use]
    pub fn with_staged_copies(mut self, staged: StagedCopySlot) -> PartitionStateMachine {
        self.staged = Some(staged);
        self
    }

    /// Moves a copy that ends exactly where the snapshot does into the
    /// log, replacing it; the snapshot and the applied point are recorded
    /// first, with [`TRANSFER`] saying they hold only once the copy is in
    /// place (and what they replaced, restored otherwise: at once when the
    /// move fails before the copy's marker, else at the next open).
    async fn adopt_copy(
        &self,
        meta: &PartitionSnapshotMeta,
        promise: &SnapshotPromise,
        transfer: crate::storage::SegmentTransfer,
    ) -> io::Result<()> {
        self.record_pending_copy(meta, promise).await?;
        let log = Arc::clone(&self.log);
        let adopted =
            tokio::task::spawn_blocking(move || log.adopt_transfer(transfer)).await.map_err(io::Error::other)?;
        if let Err(error) = adopted {
            let (db, log) = (Arc::clone(&self.db), Arc::clone(&self.log));
            if let Err(pending) =
                tokio::task::spawn_blocking(move || resolve_pending_copy(&db, &log)).await.map_err(io::Error::other)?
            {
                tracing::error!(partition = %self.log.label(), error = %pending, "a failed segment copy is settled at the next start");
            }
            return Err(io::Error::other(error));
        }
        write_txn(&self.db, |txn| {
            let mut table = txn.open_table(super::raft_log::STATE).map_err(io::Error::other)?;
            table.remove(TRANSFER).map_err(io::Error::other)?;
            Ok(())
        })
        .await
    }

    /// Records the snapshot and the applied point a copy brings, with the
    /// [`TRANSFER`] mark keeping what they replace (read in the same
    /// transaction, so that a snapshot built meanwhile is not lost).
    async fn record_pending_copy(&self, meta: &PartitionSnapshotMeta, promise: &SnapshotPromise) -> io::Result<()> {
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            next_offset: promise.next_offset,
        };
        let (applied, snapshot) = (super::raft_log::encode(&applied)?, super::raft_log::encode(&(meta, promise))?);
        write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(super::raft_log::STATE).map_err(io::Error::other)?;
            let raw = |key: &str| -> io::Result<Option<Vec<u8>>> {
                use redb::ReadableTable;
                Ok(table.get(key).map_err(io::Error::other)?.map(|value| value.value().to_vec()))
            };
            let previous = PendingTransfer { applied: raw(APPLIED)?, snapshot: raw(SNAPSHOT)? };
            let pending = super::raft_log::encode(&previous)?;
            table.insert(TRANSFER, pending.as_slice()).map_err(io::Error::other)?;
            table.insert(APPLIED, applied.as_slice()).map_err(io::Error::other)?;
            table.insert(SNAPSHOT, snapshot.as_slice()).map_err(io::Error::other)?;
            Ok(())
        })
        .await
    }

    /// Calls `on_applied` after each publish the state machine appends.
    #[must_use]
    pub fn on_applied(mut self, on_applied: Arc<dyn Fn() + Send + Sync>) -> PartitionStateMachine {
        self.on_applied = Some(on_applied);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Applied> {
        // A panic while holding it leaves plain data, still consistent.
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one publish to the partition log, unless the log holds it
    /// already (applied before a restart that found the database's record
    /// of what was applied older than the log), or its producer's window
    /// says it is a retry or out of order.
    async fn apply_publish(&self, id: PartitionLogId, publish: Publish) -> io::Result<Option<PublishResult>> {
        let log = Arc::clone(&self.log);
        let producers = Arc::clone(&self.producers);
        tokio::task::spawn_blocking(move || {
            let position = RaftPosition { index: id.index, term: id.leader_id.term };
            if let Some(last) = log.last_raft_entry()
                && last.index >= position.index
            {
                if last.index == position.index && last.term != position.term {
                    return Err(io::Error::other(format!(
                        "{}: the partition log's entry {} has term {}, the Raft log's {}: the replicas diverged",
                        log.label(),
                        last.index,
                        last.term,
                        position.term
                    )));
                }
                return Ok(None);
            }
            // Entries are applied one at a time: nothing else holds it.
            let mut producers = producers.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((producer_id, sequence)) = publish.producer {
                let count = publish.messages.len() as u64;
                match producers.decide(position.index, producer_id, sequence, count) {
                    Decision::Append => {}
                    Decision::Duplicate { first_offset, count, timestamp_us } => {
                        return Ok(Some(Ok(PublishApplied { first_offset, count, timestamp_us, duplicate: true })));
                    }
                    Decision::Refuse { code, message } => {
                        return Ok(Some(Err(PublishRefused { code: code as u16, message })));
                    }
                }
            }
            let batch = NewBatch { messages: &publish.messages, producer: publish.producer, raft: Some(position) };
            // A committed entry cannot be skipped: on a full disk the apply
            // waits for space (reads go on), for a bounded time.
            let waiting_since = std::time::Instant::now();
            let appended = loop {
                match log.append_batches_at(&[batch], publish.timestamp_us) {
                    Err(error) if error.is_storage_full() && waiting_since.elapsed() < APPLY_STORAGE_FULL_WAIT => {
                        std::thread::sleep(crate::storage::STORAGE_FULL_RETRY_INTERVAL);
                    }
                    other => break other.map_err(io::Error::other)?,
                }
            };
            // A publish of no message writes no batch header: remembering
            // it would make this window differ from one rebuilt from the log.
            if let Some((producer_id, sequence)) = publish.producer.filter(|_| appended.count > 0) {
                producers.remember(
                    position.index,
                    producer_id,
                    sequence,
                    appended.count,
                    appended.first_offset,
                    appended.timestamp_us,
                );
            }
            Ok(Some(Ok(PublishApplied {
                first_offset: appended.first_offset,
                count: appended.count,
                timestamp_us: appended.timestamp_us,
                duplicate: false,
            })))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Makes everything appended to the partition log durable (on the
    /// blocking pool), confirmed (see [`ChannelLog::sync_appended`]).
    async fn sync_log(&self) -> io::Result<()> {
        let log = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || log.sync_appended())
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)
    }

    /// Syncs the partition log, then records what is applied, so that the
    /// record never claims a publish the log could lose in a crash.
    async fn save_applied(&self) -> io::Result<()> {
        let applied = self.lock().clone();
        self.sync_log().await?;
        write_state(&self.db, APPLIED, &applied).await
    }
}

impl RaftSnapshotBuilder<PartitionTypes> for PartitionStateMachine {
    type SnapshotData = SnapshotPromise;

    async fn build_snapshot(&mut self) -> Result<PartitionSnapshot, io::Error> {
        // What is applied is read before the sync, so that everything it
        // names was appended before the sync began: openraft purges the Raft
        // entries a snapshot covers, and the partition log must then hold
        // them durably.
        let applied = self.lock().clone();
        self.sync_log().await?;
        let meta = PartitionSnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership };
        let promise = SnapshotPromise { next_offset: applied.next_offset };
        write_snapshot(&self.db, &meta, &promise, |meta: &PartitionSnapshotMeta| meta.last_log_id).await?;
        Ok(PartitionSnapshot { meta, snapshot: promise })
    }
}

impl RaftStateMachine<PartitionTypes> for PartitionStateMachine {
    type SnapshotData = SnapshotPromise;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<PartitionLogId>, PartitionMembership), io::Error> {
        let applied = self.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<PartitionTypes>, io::Error>> + Unpin + OptionalSend,
    {
        let mut save = false;
        // A membership change (`add_learner`, `change_membership`) waits
        // for its entry's answer: one of no records, at the next offset.
        let no_records =
            |next_offset| Ok(PublishApplied { first_offset: next_offset, count: 0, timestamp_us: 0, duplicate: false });
        let mut blank_answers = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let id = entry.log_id();
            match entry.payload {
                EntryPayload::Normal(publish) => {
                    let stored = self.apply_publish(id, publish).await?;
                    {
                        let mut applied = self.lock();
                        applied.last_applied = Some(id);
                        applied.next_offset = self.log.next_offset();
                    }
                    if let Some(on_applied) = &self.on_applied {
                        on_applied();
                    }
                    if let (Some(responder), Some(stored)) = (responder, stored) {
                        responder.send(stored);
                    }
                }
                EntryPayload::Blank => {
                    self.lock().last_applied = Some(id);
                    save = true;
                    blank_answers.extend(responder);
                }
                EntryPayload::Membership(membership) => {
                    {
                        let mut applied = self.lock();
                        applied.last_applied = Some(id);
                        applied.membership = PartitionMembership::new(Some(id), membership);
                    }
                    // At once: publishes applied after it move the applied
                    // point recovered from the log past it, and openraft
                    // looks for the membership only after that point.
                    self.save_applied().await?;
                    if let Some(responder) = responder {
                        responder.send(no_records(self.log.next_offset()));
                    }
                }
            }
        }
        if save {
            self.save_applied().await?;
        }
        for responder in blank_answers {
            responder.send(no_records(self.log.next_offset()));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &PartitionSnapshotMeta,
        promise: SnapshotPromise,
    ) -> Result<(), io::Error> {
        let mut held = self.log.next_offset();
        // Taken only when needed: one left in its slot is counted as dropped.
        let staged = self
            .staged
            .as_ref()
            .filter(|_| held < promise.next_offset)
            .and_then(|slot| slot.lock().unwrap_or_else(PoisonError::into_inner).take());
        // The copy holds the snapshot's records, exactly: its last batch is
        // the snapshot's last publish, which may come before the snapshot's
        // last entry (a blank or membership entry takes no offset).
        let fits = |staged: &StagedCopy| {
            staged.end.next_offset == promise.next_offset && staged.end.last_raft_entry.map(log_id) <= meta.last_log_id
        };
        // Only past the log's end (this worker is the log's only writer, so
        // the log stays as it is until the copy is in).
        if held < promise.next_offset
            && let Some(staged) = staged.filter(fits)
        {
            self.adopt_copy(meta, &promise, staged.transfer).await?;
            held = self.log.next_offset();
        }
        if held < promise.next_offset {
            return Err(io::Error::other(format!(
                "{}: the leader sent a snapshot up to offset {} and this replica holds up to {held}, with no segment copy received for it (docs/REPLICATION.md, \"Replica moves and segment transfer\"): this replica's group stops until the node restarts",
                self.log.label(),
                promise.next_offset
            )));
        }
        {
            let mut applied = self.lock();
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            applied.next_offset = held;
        }
        // The entries the snapshot covers were not applied here one by one:
        // their producers are read from the log they are in.
        let log = Arc::clone(&self.log);
        let window = tokio::task::spawn_blocking(move || {
            ProducerWindow::rebuild(&log, log.last_raft_entry().map_or(0, |last| last.index))
        })
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::other)?;
        *self.producers.lock().unwrap_or_else(PoisonError::into_inner) = window;
        // The log synced before the snapshot is recorded as held.
        self.save_applied().await?;
        write_snapshot(&self.db, meta, &promise, |meta: &PartitionSnapshotMeta| meta.last_log_id).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<PartitionSnapshot>, io::Error> {
        Ok(read_state::<(PartitionSnapshotMeta, SnapshotPromise)>(&self.db, SNAPSHOT)?
            .map(|(meta, snapshot)| PartitionSnapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use openraft::async_runtime::Oneshot;
    use openraft::errors::ErrorSource;
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

    use crate::storage::fs::StdFileSystem;
    use crate::storage::{ChannelName, LogConfig};

    fn open_in(dir: &Path) -> io::Result<(PartitionLogStore, PartitionStateMachine, Arc<ChannelLog>)> {
        let name = ChannelName::new("replicated").map_err(io::Error::other)?;
        let log = ChannelLog::open(
            Arc::new(StdFileSystem),
            &dir.join("log"),
            name,
            LogConfig { replicated: true, ..LogConfig::default() },
        )
        .map_err(io::Error::other)?;
        let log = Arc::new(log);
        let (store, machine) = open(&dir.join("raft.redb"), Arc::clone(&log))?;
        Ok((store, machine, log))
    }

    struct Builder(tempfile::TempDir);

    fn storage_error(error: io::Error) -> openraft::StorageError<PartitionTypes> {
        openraft::StorageError::read(ErrorSource::from_error(&error))
    }

    impl
        openraft::testing::log::StoreBuilder<
            PartitionTypes,
            PartitionLogStore,
            PartitionStateMachine,
            tempfile::TempDir,
        > for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, PartitionLogStore, PartitionStateMachine), openraft::StorageError<PartitionTypes>>
        {
            let dir = tempfile::tempdir_in(self.0.path()).map_err(storage_error)?;
            let (store, machine, _) = open_in(dir.path()).map_err(storage_error)?;
            Ok((dir, store, machine))
        }
    }

    /// openraft's conformance suite for log stores and state machines.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_partition_store_passes_openrafts_storage_suite() -> Result<(), openraft::StorageError<PartitionTypes>>
    {
        let root = tempfile::tempdir().expect("a temporary directory");
        openraft::testing::log::Suite::test_all(Builder(root)).await
    }

    fn id(term: u64, index: u64) -> PartitionLogId {
        log_id(RaftPosition { index, term })
    }

    fn publish_entry(term: u64, index: u64, payloads: &[&str], timestamp_us: u64) -> PartitionEntry {
        let messages = payloads.iter().map(|payload| Message::from_payload(payload.as_bytes().to_vec())).collect();
        PartitionEntry {
            log_id: id(term, index),
            payload: EntryPayload::Normal(Publish { messages, producer: None, timestamp_us }),
        }
    }

    fn idempotent(payloads: &[&str], producer: u64, sequence: u64) -> Publish {
        let messages = payloads.iter().map(|payload| Message::from_payload(payload.as_bytes().to_vec())).collect();
        Publish { messages, producer: Some((producer, sequence)), timestamp_us: 1_000 }
    }

    fn applied(first_offset: u64, count: u64, duplicate: bool) -> Option<PublishResult> {
        Some(Ok(PublishApplied { first_offset, count, timestamp_us: 1_000, duplicate }))
    }

    /// A retry of an idempotent publish is answered with the offsets it was
    /// stored at and not stored again, also after reopening (the window is
    /// rebuilt from the log's batch headers); an out-of-order sequence is
    /// refused; other producers are not disturbed.
    #[tokio::test]
    async fn idempotent_retries_are_deduplicated_when_applied_and_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, machine, log) = open_in(dir.path()).unwrap();
            assert_eq!(
                machine.apply_publish(id(1, 1), idempotent(&["a", "b"], 9, 0)).await.unwrap(),
                applied(0, 2, false)
            );
            assert_eq!(machine.apply_publish(id(1, 2), idempotent(&["c"], 9, 2)).await.unwrap(), applied(2, 1, false));
            assert_eq!(machine.apply_publish(id(1, 3), idempotent(&["x"], 4, 0)).await.unwrap(), applied(3, 1, false));
            assert_eq!(
                machine.apply_publish(id(2, 4), idempotent(&["a", "b"], 9, 0)).await.unwrap(),
                applied(0, 2, true)
            );
            let refused = machine.apply_publish(id(2, 5), idempotent(&["e"], 9, 5)).await.unwrap();
            assert!(
                matches!(&refused, Some(Err(refused)) if refused.code == crate::protocol::ErrorCode::OutOfOrderSequence as u16),
                "{refused:?}"
            );
            // A producer not remembered, past sequence 0: perhaps an old
            // retry, refused.
            let unknown = machine.apply_publish(id(2, 6), idempotent(&["u"], 5, 3)).await.unwrap();
            assert!(
                matches!(&unknown, Some(Err(refused)) if refused.code == crate::protocol::ErrorCode::UnknownProducer as u16),
                "{unknown:?}"
            );
            assert_eq!(log.next_offset(), 4);
        }
        let (_, machine, log) = open_in(dir.path()).unwrap();
        assert_eq!(machine.apply_publish(id(2, 7), idempotent(&["c"], 9, 2)).await.unwrap(), applied(2, 1, true));
        assert_eq!(machine.apply_publish(id(2, 8), idempotent(&["x"], 4, 0)).await.unwrap(), applied(3, 1, true));
        assert_eq!(machine.apply_publish(id(2, 9), idempotent(&["d"], 9, 3)).await.unwrap(), applied(4, 1, false));
        assert_eq!(log.next_offset(), 5);
    }

    async fn apply(machine: &mut PartitionStateMachine, entries: Vec<PartitionEntry>) -> io::Result<()> {
        let stream = futures_util::stream::iter(entries.into_iter().map(|entry| Ok((entry, None))));
        machine.apply(stream).await
    }

    /// Publishes applied become batches of the partition log whose headers
    /// name their entries, with dense offsets and the leader's timestamps;
    /// blank entries take no offset; what was applied is found again on
    /// reopening, from the log for publishes and from the database for
    /// the blank entry after them; an entry applied again is not stored
    /// twice.
    #[tokio::test]
    async fn applied_publishes_are_batches_of_the_partition_log_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, mut machine, log) = open_in(dir.path()).unwrap();
            let blank = PartitionEntry { log_id: id(1, 1), payload: EntryPayload::Blank };
            let entries = vec![blank, publish_entry(1, 2, &["a", "b"], 1_000), publish_entry(1, 3, &["c"], 900)];
            apply(&mut machine, entries).await.unwrap();
            assert_eq!(log.next_offset(), 3);
            assert_eq!(log.last_raft_entry(), Some(RaftPosition { index: 3, term: 1 }));
            let read = log.read(0, 1 << 20).unwrap();
            let records: Vec<_> = read.iter().map(Result::unwrap).collect();
            let payloads: Vec<_> = records.iter().map(|record| record.payload.clone()).collect();
            assert_eq!(payloads, ["a", "b", "c"].map(|p| bytes::Bytes::from(p.as_bytes().to_vec())));
            // The leader's timestamp, never going back.
            let stamps: Vec<_> = records.iter().map(|record| record.timestamp_us).collect();
            assert_eq!(stamps, [1_000, 1_000, 1_000]);
            let mut headers = Vec::new();
            log.visit_active_batches(|first, _, header| headers.push((first, header.raft_index, header.term))).unwrap();
            assert_eq!(headers, [(0, 2, 1), (2, 3, 1)]);
            apply(&mut machine, vec![PartitionEntry { log_id: id(2, 4), payload: EntryPayload::Blank }]).await.unwrap();
        }
        {
            let (_, mut machine, log) = open_in(dir.path()).unwrap();
            assert_eq!(machine.applied_state().await.unwrap().0, Some(id(2, 4)));
            apply(&mut machine, vec![publish_entry(2, 5, &["d"], 2_000)]).await.unwrap();
            assert_eq!(log.next_offset(), 4);
        }
        let (_, mut machine, log) = open_in(dir.path()).unwrap();
        // The last publish is later than the last blank entry recorded.
        assert_eq!(machine.applied_state().await.unwrap().0, Some(id(2, 5)));
        // Applied again (as after a restart that lost the record of it).
        apply(&mut machine, vec![publish_entry(2, 5, &["d"], 2_000)]).await.unwrap();
        assert_eq!(log.next_offset(), 4);
        // The same index from another term: the replicas diverged.
        let diverged = apply(&mut machine, vec![publish_entry(3, 5, &["x"], 2_000)]).await;
        assert!(diverged.unwrap_err().to_string().contains("diverged"));
    }

    /// A membership applied before publishes in one batch is found again on
    /// reopening (openraft looks for it only after the applied point, which
    /// the publishes moved past it); an append outside Raft is refused; a
    /// log shorter than what was recorded as applied stops the replica.
    #[tokio::test]
    async fn memberships_survive_reopening_and_the_log_is_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let voters = std::collections::BTreeSet::from([1u64, 2, 3]);
        let membership = openraft::Membership::<u64, NodeAddrs>::new_with_defaults(vec![voters], []);
        {
            let (_, mut machine, log) = open_in(dir.path()).unwrap();
            let entries = vec![
                PartitionEntry { log_id: id(1, 0), payload: EntryPayload::Membership(membership.clone()) },
                publish_entry(1, 1, &["a"], 10),
                publish_entry(1, 2, &["b"], 20),
            ];
            // The batch ends in an error, as when the process dies in it:
            // nothing after the publishes runs.
            let items = entries.into_iter().map(|entry| Ok((entry, None))).chain([Err(io::Error::other("cut"))]);
            assert!(machine.apply(futures_util::stream::iter(items)).await.is_err());
            let outside = log.append_batch(&[Message::from_payload("stray")]);
            assert!(matches!(outside, Err(crate::storage::StorageError::ReplicatedLog { .. })), "{outside:?}");
            assert_eq!(log.next_offset(), 2);
        }
        {
            let (_, mut machine, _) = open_in(dir.path()).unwrap();
            let (last, stored) = machine.applied_state().await.unwrap();
            assert_eq!(last, Some(id(1, 2)));
            assert_eq!(stored.membership(), &membership);
            assert_eq!(stored.log_id(), &Some(id(1, 0)));
            // Recorded as applied (with the log synced): offset 2 and on.
            apply(&mut machine, vec![PartitionEntry { log_id: id(1, 3), payload: EntryPayload::Blank }]).await.unwrap();
        }
        std::fs::remove_dir_all(dir.path().join("log")).unwrap();
        let refused = open_in(dir.path()).err().expect("a log missing applied records is refused");
        assert!(refused.to_string().contains("records are missing"), "{refused}");
    }

    /// A log with records and no batch header (here: format 1, as when
    /// retention removed every segment that had one) cannot say which
    /// entries it applied: the replica refuses to start.
    #[tokio::test]
    async fn a_log_without_batch_headers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig { format_version: crate::storage::index::FORMAT_VERSION_1, ..LogConfig::default() };
        let name = ChannelName::new("replicated").unwrap();
        let log = ChannelLog::open(Arc::new(StdFileSystem), &dir.path().join("log"), name, config).unwrap();
        log.append_batch(&[Message::from_payload("single node")]).unwrap();
        let refused = open(&dir.path().join("raft.redb"), Arc::new(log)).err().expect("refused");
        assert!(refused.to_string().contains("no batch header"), "{refused}");
    }

    /// The Raft log keeps publishes whole (messages, producer, timestamp)
    /// across reopening.
    #[tokio::test]
    async fn the_raft_log_keeps_publishes_whole() {
        let dir = tempfile::tempdir().unwrap();
        let entry = publish_entry(4, 0, &["x", "yz"], 42);
        {
            let (mut store, _, _) = open_in(dir.path()).unwrap();
            let (done, flushed) = openraft::alias::OneshotOf::<PartitionTypes>::channel();
            store.append([entry.clone()], IOFlushed::signal(done)).await.unwrap();
            flushed.await.unwrap().unwrap();
        }
        let (mut store, _, _) = open_in(dir.path()).unwrap();
        assert_eq!(store.try_get_log_entries(0..1).await.unwrap(), vec![entry]);
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(id(4, 0)));
    }

    /// A snapshot reaching past this replica's partition log, with no
    /// segment copy received for it, is refused instead of being taken for
    /// data.
    #[tokio::test]
    async fn a_snapshot_past_the_partition_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut machine, _) = open_in(dir.path()).unwrap();
        let meta =
            PartitionSnapshotMeta { last_log_id: Some(id(1, 9)), last_membership: PartitionMembership::default() };
        let refused = machine.install_snapshot(&meta, SnapshotPromise { next_offset: 5 }).await;
        assert!(refused.unwrap_err().to_string().contains("no segment copy"));
        assert_eq!(machine.applied_state().await.unwrap().0, None);
        machine.install_snapshot(&meta, SnapshotPromise { next_offset: 0 }).await.unwrap();
        assert_eq!(machine.applied_state().await.unwrap().0, Some(id(1, 9)));
    }

    /// `source`'s segments up to `up_to`, copied into `log`'s staging
    /// directory and checked.
    fn stage_copy(source: &ChannelLog, log: &ChannelLog, up_to: u64) -> StagedCopy {
        let copies = source.segments_to_copy(up_to).unwrap();
        let mut transfer = log.begin_transfer().unwrap();
        for copy in &copies {
            let bytes = source.read_segment_bytes(copy.base_offset, 0, copy.bytes as usize).unwrap();
            transfer.append(copy.base_offset, &bytes).unwrap();
        }
        let end = log.check_transfer(&mut transfer, &copies).unwrap();
        StagedCopy { end, transfer }
    }

    /// Segment transfer: a snapshot past a log that holds nothing is
    /// installed from the copy received for it (the same records, applied
    /// up to the snapshot, the same after reopening); a copy that does not
    /// end where the snapshot does is not used. A crash after the snapshot
    /// was recorded with a copy and before the copy was moved in leaves,
    /// at the next open, a replica that holds nothing (not one refusing to
    /// start for records it never had).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_past_an_empty_log_is_installed_from_its_copy_and_a_crash_midway_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut source, source_log) = open_in(&dir.path().join("source")).unwrap();
        let mut entries: Vec<PartitionEntry> =
            (1..=9).map(|index| publish_entry(1, index, &["a", "b"], 1_000 + index)).collect();
        // The snapshot ends on an entry that takes no offset: the copy's
        // last batch is the entry before it.
        entries.push(PartitionEntry { log_id: id(1, 10), payload: EntryPayload::Blank });
        apply(&mut source, entries).await.unwrap();
        let up_to = source_log.next_offset();
        let stage = |log: &Arc<ChannelLog>, up_to: u64| stage_copy(&source_log, log, up_to);
        let meta =
            PartitionSnapshotMeta { last_log_id: Some(id(1, 10)), last_membership: PartitionMembership::default() };
        let promise = SnapshotPromise { next_offset: up_to };

        let target_dir = dir.path().join("target");
        let (_, machine, log) = open_in(&target_dir).unwrap();
        let slot = StagedCopySlot::default();
        let mut machine = machine.with_staged_copies(Arc::clone(&slot));
        // A copy that ends before the snapshot is not used.
        *slot.lock().unwrap() = Some(stage(&log, up_to - 2));
        assert!(machine.install_snapshot(&meta, promise.clone()).await.is_err());
        assert_eq!(log.next_offset(), 0);
        *slot.lock().unwrap() = Some(stage(&log, up_to));
        machine.install_snapshot(&meta, promise.clone()).await.unwrap();
        assert_eq!(log.next_offset(), up_to);
        assert_eq!(log.last_raft_entry(), source_log.last_raft_entry());
        assert_eq!(machine.applied_state().await.unwrap().0, Some(id(1, 10)));
        drop((machine, log));
        let (_, mut reopened, log) = open_in(&target_dir).unwrap();
        assert_eq!(reopened.applied_state().await.unwrap().0, Some(id(1, 10)));
        assert_eq!(log.next_offset(), up_to);

        let crashed_dir = dir.path().join("crashed");
        let (_, machine, _) = open_in(&crashed_dir).unwrap();
        let applied =
            Applied { last_applied: Some(id(1, 10)), membership: PartitionMembership::default(), next_offset: up_to };
        let (applied, snapshot) = (
            super::super::raft_log::encode(&applied).unwrap(),
            super::super::raft_log::encode(&(&meta, &promise)).unwrap(),
        );
        write_txn(&machine.db, move |txn| {
            let mut table = txn.open_table(super::super::raft_log::STATE).map_err(io::Error::other)?;
            // The mark as an earlier build wrote it (it kept nothing).
            table.insert(TRANSFER, super::super::raft_log::encode(&true)?.as_slice()).map_err(io::Error::other)?;
            table.insert(APPLIED, applied.as_slice()).map_err(io::Error::other)?;
            table.insert(SNAPSHOT, snapshot.as_slice()).map_err(io::Error::other)?;
            Ok(())
        })
        .await
        .unwrap();
        drop(machine);
        let (_, mut reopened, log) = open_in(&crashed_dir).expect("a replica whose copy never got there starts");
        assert_eq!(reopened.applied_state().await.unwrap().0, None);
        assert_eq!(log.next_offset(), 0);
    }

    /// Segment transfer to a replica that fell behind: a snapshot past a
    /// log holding the first entries is installed from the copy, which
    /// replaces the log (the source's records, applied up to the snapshot,
    /// the same after reopening). A crash after the snapshot was recorded
    /// with a copy and before the copy was moved in leaves, at the next
    /// open, the log as it was and the record of what it applied as it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_past_a_log_behind_is_installed_from_its_copy_and_a_crash_midway_keeps_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<PartitionEntry> =
            (1..=12).map(|index| publish_entry(1, index, &["a", "b", "c"], 1_000 + index)).collect();
        let (_, mut source, source_log) = open_in(&dir.path().join("source")).unwrap();
        apply(&mut source, entries.clone()).await.unwrap();
        let expected = source_log.read(0, 1 << 20).unwrap().iter().collect::<Result<Vec<_>, _>>().unwrap();
        let meta =
            PartitionSnapshotMeta { last_log_id: Some(id(1, 12)), last_membership: PartitionMembership::default() };
        let promise = SnapshotPromise { next_offset: source_log.next_offset() };
        let stage = |log: &Arc<ChannelLog>| stage_copy(&source_log, log, source_log.next_offset());
        // The first four publishes, and a blank entry recorded as applied.
        let behind = |dir: &Path| {
            let dir = dir.to_path_buf();
            let mut first: Vec<PartitionEntry> = entries[..4].to_vec();
            first.push(PartitionEntry { log_id: id(1, 5), payload: EntryPayload::Blank });
            async move {
                let (_, mut machine, log) = open_in(&dir).unwrap();
                apply(&mut machine, first).await.unwrap();
                assert_eq!(machine.applied_state().await.unwrap().0, Some(id(1, 5)));
                (machine, log)
            }
        };

        let target_dir = dir.path().join("target");
        let (machine, log) = behind(&target_dir).await;
        let slot = StagedCopySlot::default();
        let mut machine = machine.with_staged_copies(Arc::clone(&slot));
        *slot.lock().unwrap() = Some(stage(&log));
        machine.install_snapshot(&meta, promise.clone()).await.unwrap();
        let read = |log: &ChannelLog| log.read(0, 1 << 20).unwrap().iter().collect::<Result<Vec<_>, _>>().unwrap();
        assert_eq!(read(&log), expected);
        assert_eq!(machine.applied_state().await.unwrap().0, Some(id(1, 12)));
        drop((machine, log));
        let (_, mut reopened, log) = open_in(&target_dir).unwrap();
        assert_eq!(reopened.applied_state().await.unwrap().0, Some(id(1, 12)));
        assert_eq!(read(&log), expected);

        // A crash after the record, before the move.
        let crashed_dir = dir.path().join("crashed");
        let (machine, log) = behind(&crashed_dir).await;
        let held = read(&log);
        machine.record_pending_copy(&meta, &promise).await.unwrap();
        drop((machine, log));
        let (_, mut reopened, log) = open_in(&crashed_dir).expect("a replica whose copy never got there starts");
        assert_eq!(reopened.applied_state().await.unwrap().0, Some(id(1, 5)));
        assert!(reopened.get_current_snapshot().await.unwrap().is_none());
        assert_eq!(read(&log), held);
        drop((reopened, log));

        // A crash after the copy was moved in, before the mark was cleared:
        // what was recorded holds.
        let (_, machine, log) = open_in(&crashed_dir).unwrap();
        machine.record_pending_copy(&meta, &promise).await.unwrap();
        log.adopt_transfer(stage(&log).transfer).unwrap();
        drop((machine, log));
        let (_, mut reopened, log) = open_in(&crashed_dir).unwrap();
        assert_eq!(reopened.applied_state().await.unwrap().0, Some(id(1, 12)));
        assert!(reopened.get_current_snapshot().await.unwrap().is_some());
        assert_eq!(read(&log), expected);
        assert!(read_raw_state(&reopened.db, TRANSFER).unwrap().is_none());

        // A move refused before its marker (the copy does not reach past
        // the log) restores the record at once.
        let refused_dir = dir.path().join("refused");
        let (machine, log) = behind(&refused_dir).await;
        let short = stage_copy(&source_log, &log, 6);
        let refused = machine.adopt_copy(&meta, &promise, short.transfer).await;
        assert!(refused.unwrap_err().to_string().contains("does not reach past"));
        assert!(read_raw_state(&machine.db, TRANSFER).unwrap().is_none());
        assert_eq!(read_state::<Applied>(&machine.db, APPLIED).unwrap().unwrap().last_applied, Some(id(1, 5)));
        assert!(read_state::<(PartitionSnapshotMeta, SnapshotPromise)>(&machine.db, SNAPSHOT).unwrap().is_none());
        assert_eq!(log.next_offset(), 12, "the log is as it was: four publishes of three messages");
    }
}
