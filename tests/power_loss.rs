//! Seeded power-loss and disk-fault simulation (docs/RELIABILITY.md): the
//! storage engine runs on a simulated disk (`common/power_loss.rs`) that
//! loses what a real one may lose at a crash point chosen by the seed, and
//! a model of what was acknowledged checks every recovery.
//!
//! Every failure names its seed; `WEIR_SEED=N cargo test --test power_loss`
//! replays exactly that seed. `WEIR_SIM_SEEDS=N` runs N seeds per test
//! instead of the default.

#[path = "common/power_loss.rs"]
mod power_loss;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use power_loss::{Fault, SimDisk};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;
use weir::record::{Header, Message};
use weir::server::offsets::{ChannelRef, DurableOffsets};
use weir::storage::fs::FileSystem;
use weir::storage::{
    ChannelLog, ChannelName, ChannelSettings, FsyncPolicy, LogConfig, RetentionPolicy, STORAGE_FULL_RETRY_INTERVAL,
    StorageError, Store, StoreConfig, now_us,
};

/// Seeds per test in `cargo test` (a few seconds each: everything is in
/// memory).
const SEEDS_DEFAULT: u64 = 300;
/// Crash-and-recover cycles per seed.
const LIVES: u32 = 5;
/// Actions per life, at most (the crash usually comes first).
const ACTIONS_MAX: u32 = 120;
const POLICIES: [FsyncPolicy; 3] = [FsyncPolicy::Always, FsyncPolicy::Interval, FsyncPolicy::Never];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| value.parse().unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

/// Runs `run` for every seed (or `WEIR_SEED` alone), naming the seed of a
/// failure and how to replay it.
fn for_each_seed(test: &str, seeds_default: u64, run: impl Fn(u64)) {
    let seeds: Vec<u64> = match env_u64("WEIR_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("WEIR_SIM_SEEDS").unwrap_or(seeds_default)).collect(),
    };
    for seed in seeds {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(seed))) {
            eprintln!("{test}: seed {seed} failed; replay with WEIR_SEED={seed} cargo test --test power_loss {test}");
            resume_unwind(panic);
        }
    }
}

fn message(rng: &mut StdRng, serial: u64) -> Message {
    // Mostly small, some spanning several pages.
    let len = if rng.random_range(0..10) == 0 { rng.random_range(1000..4000) } else { rng.random_range(0..300) };
    let mut payload = serial.to_be_bytes().to_vec();
    payload.extend((0..len).map(|_| rng.random::<u8>()));
    let mut message = Message::from_payload(payload);
    if rng.random_bool(0.3) {
        message.key = Bytes::from(format!("key-{}", rng.random_range(0..20)));
    }
    if rng.random_bool(0.1) {
        message.headers.push(Header { name: Bytes::from_static(b"h"), value: Bytes::from(vec![7; 5]) });
    }
    message
}

fn same(message: &Message, record: &weir::record::Record) -> bool {
    message.key == record.key && message.headers == record.headers && message.payload == record.payload
}

/// What the log was asked to hold, and what it promised.
#[derive(Default)]
struct LogModel {
    /// Every message appended at each offset since the offset was last
    /// settled by a recovery (a failed append's offset is tried again).
    candidates: BTreeMap<u64, Vec<Message>>,
    /// Offsets acknowledged, and whether each is durable (synced).
    acknowledged: BTreeMap<u64, bool>,
    /// Every record from here on must survive (retention deleted only
    /// below it).
    retained_from: u64,
    /// The next offset the log must give.
    next: u64,
    /// Offsets recovery reported damaged (never given again).
    damaged: BTreeSet<u64>,
}

impl LogModel {
    fn attempted(&mut self, first_offset: u64, messages: &[Message]) {
        for (i, message) in messages.iter().enumerate() {
            self.candidates.entry(first_offset + i as u64).or_default().push(message.clone());
        }
    }

    /// A refused append: its records must never appear.
    fn refused(&mut self, first_offset: u64, messages: &[Message]) {
        for (i, message) in messages.iter().enumerate() {
            if let Some(candidates) = self.candidates.get_mut(&(first_offset + i as u64)) {
                candidates.retain(|candidate| candidate != message);
            }
        }
    }

    fn acknowledged(&mut self, first_offset: u64, count: u64, durable: bool) {
        for offset in first_offset..first_offset + count {
            self.acknowledged.insert(offset, durable);
        }
        self.next = first_offset + count;
    }

    fn all_durable(&mut self) {
        self.acknowledged.values_mut().for_each(|durable| *durable = true);
    }

    /// Checks a freshly recovered log against the model, then settles the
    /// model on what the log holds.
    /// `settled`: what the log holds after recovery must survive from now
    /// on: after a reboot (the disk lost its unsynced bytes, what is left is
    /// durable), and under `always` after a process restart too (a record
    /// readers can see must never be taken back). After a restart under
    /// the other policies, what was not synced is still not.
    fn check_recovered(&mut self, log: &ChannelLog, settled: bool, context: &str) {
        let (start, next) = (log.start_offset(), log.next_offset());
        assert!(
            start <= self.retained_from,
            "{context}: recovery lost records retention kept: start {start}, kept from {}",
            self.retained_from
        );
        for (&offset, &durable) in self.acknowledged.range(self.retained_from..) {
            assert!(!durable || offset < next, "{context}: synced record {offset} lost: the log ends at {next}");
        }
        let mut offset = start;
        let mut readable = BTreeSet::new();
        while offset < next {
            match log.read(offset, 64 * 1024) {
                Ok(batch) => {
                    assert!(batch.count > 0, "{context}: read at {offset} returned nothing before the end {next}");
                    for record in batch.iter() {
                        let record =
                            record.unwrap_or_else(|error| panic!("{context}: a returned record fails: {error}"));
                        assert_eq!(record.offset, offset, "{context}: records out of order");
                        let candidates = self.candidates.get(&offset).map(Vec::as_slice).unwrap_or_default();
                        let known = candidates.iter().find(|message| same(message, &record)).cloned();
                        let Some(known) = known else {
                            panic!(
                                "{context}: offset {offset} holds a record never appended there ({} candidates)",
                                candidates.len()
                            );
                        };
                        self.candidates.insert(offset, vec![known]);
                        readable.insert(offset);
                        offset += 1;
                    }
                    assert_eq!(offset, batch.next_offset, "{context}: batch end");
                }
                Err(StorageError::CorruptRecord { offset: damaged, next_readable_offset, .. }) => {
                    assert!(damaged >= offset, "{context}: damage reported at {damaged} reading from {offset}");
                    let resume = next_readable_offset.unwrap_or(next).max(damaged + 1);
                    for hole in damaged..resume {
                        assert!(
                            !self.acknowledged.get(&hole).copied().unwrap_or(false),
                            "{context}: synced record {hole} is unreadable after recovery"
                        );
                        self.damaged.insert(hole);
                    }
                    offset = resume;
                }
                Err(error) => panic!("{context}: reading offset {offset} of {start}..{next}: {error}"),
            }
        }
        for (&offset, &durable) in self.acknowledged.range(self.retained_from..) {
            assert!(!durable || readable.contains(&offset), "{context}: synced record {offset} is not readable");
        }
        // Offsets at and past the end are free again: what was appended
        // there (never synced, or it would be here) is gone.
        self.candidates.split_off(&next);
        self.acknowledged.retain(|offset, _| readable.contains(offset));
        if settled {
            self.all_durable();
        }
        self.next = next;
    }
}

fn log_config(rng: &mut StdRng, fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: rng.random_range(2048..=16_384),
        index_interval_bytes: rng.random_range(64..=1024),
        fsync,
        max_message_bytes: 8192,
        retention: RetentionPolicy {
            max_messages: rng.random_bool(0.5).then(|| rng.random_range(20..200)),
            ..RetentionPolicy::default()
        },
        ..LogConfig::default()
    }
}

fn open_log(disk: &SimDisk, dir: &Path, config: &LogConfig) -> Result<ChannelLog, StorageError> {
    let fs: Arc<dyn FileSystem> = Arc::new(disk.clone());
    ChannelLog::open(fs, dir, ChannelName::new("sim").unwrap(), config.clone())
}

/// One seed: a log under one policy, crashed and recovered `LIVES` times.
fn power_loss_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let policy = POLICIES[(seed % 3) as usize];
    let root = PathBuf::from("/sim");
    let disk = SimDisk::new(&root, seed);
    let dir = root.join("channels").join("sim");
    // The directory above the log is the store's, made durable when the
    // store opens (the store test covers that).
    disk.create_dir_all(&root.join("channels")).unwrap();
    disk.sync_dir(&root).unwrap();
    let config = log_config(&mut rng, policy);
    let mut model = LogModel::default();
    let mut serial = 0;
    // Whether the last life ended in a power cut (else the process died,
    // and the page cache kept what it wrote).
    let mut rebooted = true;
    for life in 0..LIVES {
        let context = format!("seed {seed} ({policy:?}, life {life})");
        // Most lives end in a power cut; some in the process dying in the
        // middle of an operation (between an append's write and its sync).
        let power_cut = rng.random_bool(0.7);
        let crash_point = disk.counts().operations + rng.random_range(1..=300);
        if power_cut {
            disk.crash_at(crash_point)
        } else {
            disk.kill_process_at(crash_point)
        }
        let end_life = |rebooted: &mut bool| {
            if power_cut {
                disk.cut_power();
                disk.reboot();
            } else {
                disk.restart_process();
            }
            *rebooted = power_cut;
        };
        let mut log = match open_log(&disk, &dir, &config) {
            Ok(log) => log,
            // The power went out (or the process died) during recovery: it
            // runs again.
            Err(_) if disk.crashed() => {
                end_life(&mut rebooted);
                continue;
            }
            Err(error) => panic!("{context}: recovery failed: {error}\n{}", disk.listing()),
        };
        let settled = rebooted || policy == FsyncPolicy::Always;
        model.check_recovered(&log, settled, &format!("{context}; the disk after recovery:\n{}", disk.listing()));
        if rng.random_bool(0.3) {
            // A write refused (and cut back) before the power goes: its
            // records must never appear.
            disk.arm(Some(disk.counts().operations + rng.random_range(1..=100)), Fault::WriteEio);
        }
        let mut closed = false;
        for _ in 0..ACTIONS_MAX {
            if disk.crashed() {
                break;
            }
            match rng.random_range(0..100) {
                0..70 => {
                    let count = rng.random_range(1..=4);
                    let messages: Vec<Message> = (0..count)
                        .map(|_| {
                            serial += 1;
                            message(&mut rng, serial)
                        })
                        .collect();
                    model.attempted(model.next, &messages);
                    let injected_before = disk.counts().faults_injected;
                    match log.append_batch(&messages) {
                        Ok(appended) => {
                            assert_eq!(appended.first_offset, model.next, "{context}: offsets continue");
                            model.acknowledged(appended.first_offset, appended.count, policy == FsyncPolicy::Always);
                        }
                        Err(_) if disk.crashed() => {}
                        Err(StorageError::Io { .. }) if disk.counts().faults_injected > injected_before => {
                            model.refused(model.next, &messages);
                        }
                        Err(error) => panic!("{context}: append failed without a fault: {error}"),
                    }
                }
                70..80 if policy == FsyncPolicy::Interval => match log.sync() {
                    Ok(()) => model.all_durable(),
                    Err(_) if disk.crashed() => {}
                    Err(error) => panic!("{context}: sync failed without a fault: {error}"),
                },
                80..90 => {
                    // A read of what is acknowledged returns exactly it.
                    let Some((&offset, _)) = model.acknowledged.range(log.start_offset()..).next() else { continue };
                    if let Ok(batch) = log.read(offset, 4096)
                        && let Some(Ok(record)) = batch.iter().next()
                    {
                        let message = &model.candidates[&offset];
                        assert!(message.iter().any(|m| same(m, &record)), "{context}: read of {offset}");
                    }
                }
                90..95 => {
                    let result = log.apply_retention(now_us());
                    model.retained_from = model.retained_from.max(log.start_offset());
                    assert!(result.is_ok() || disk.crashed(), "{context}: retention failed: {result:?}");
                }
                95..97 => match log.close() {
                    Ok(()) => {
                        model.all_durable();
                        closed = true;
                        break;
                    }
                    Err(_) if disk.crashed() => {}
                    Err(error) => panic!("{context}: close failed without a fault: {error}"),
                },
                97..99 => {
                    // The process dies (a background seal with it) and
                    // starts again; the page cache keeps what it wrote.
                    // (The dead process's log does nothing more; dropping
                    // it drops its unfinished background seal.)
                    match open_log(&disk, &dir, &config) {
                        Ok(reopened) => drop(std::mem::replace(&mut log, reopened)),
                        Err(_) if disk.crashed() => break,
                        Err(error) => panic!("{context}: recovery after a process crash failed: {error}"),
                    }
                    let settled = policy == FsyncPolicy::Always;
                    model.check_recovered(&log, settled, &format!("{context}, after a process crash"));
                }
                _ => {}
            }
        }
        drop(log);
        if closed {
            // A clean stop, then the power goes: everything was synced.
            disk.cut_power();
            disk.reboot();
            rebooted = true;
        } else {
            end_life(&mut rebooted);
        }
    }
}

#[test]
fn every_synced_record_survives_seeded_power_losses() {
    for_each_seed("every_synced_record_survives_seeded_power_losses", SEEDS_DEFAULT, power_loss_seed);
}

/// One seed of durable positions (the internal offsets log, its compaction
/// included) crashed and recovered: a position never moves backwards from
/// what a commit made durable, and never shows a value never recorded.
fn durable_positions_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let root = PathBuf::from("/sim");
    let disk = SimDisk::new(&root, seed);
    let config = LogConfig { fsync: FsyncPolicy::Always, ..LogConfig::default() };
    let deleted = CancellationToken::new();
    let channel = ChannelRef { name: "orders", deleted: &deleted };
    let mut committed: BTreeMap<String, u64> = BTreeMap::new();
    let mut recorded: BTreeMap<String, u64> = BTreeMap::new();
    for life in 0..16 {
        let context = format!("seed {seed} (life {life})");
        disk.crash_at(disk.counts().operations + rng.random_range(1..=200));
        let fs: Arc<dyn FileSystem> = Arc::new(disk.clone());
        let offsets = match DurableOffsets::open(fs, &root, &config) {
            Ok(offsets) => offsets,
            Err(_) if disk.crashed() => {
                disk.reboot();
                continue;
            }
            Err(error) => panic!("{context}: the durable offsets cannot be opened: {error}\n{}", disk.listing()),
        };
        for (name, &floor) in &committed {
            let position = offsets.get("orders", name, 0);
            assert!(
                position >= Some(floor),
                "{context}: {name} moved backwards: {position:?} after committing {floor}\n{}",
                disk.listing()
            );
            assert!(position <= recorded.get(name).copied(), "{context}: {name} at {position:?}, never recorded");
        }
        // What was recorded and not committed is gone with the process.
        recorded = recorded
            .keys()
            .filter_map(|name| offsets.get("orders", name, 0).map(|position| (name.clone(), position)))
            .collect();
        committed.clone_from(&recorded);
        for _ in 0..100 {
            if disk.crashed() {
                break;
            }
            for _ in 0..rng.random_range(1..=8) {
                let name = format!("durable-{}", rng.random_range(0..40));
                let position = recorded.get(&name).copied().unwrap_or(0) + rng.random_range(1..50);
                offsets.record(&channel, &name, 0, position).unwrap();
                recorded.insert(name, position);
            }
            match offsets.commit() {
                Ok(()) => committed.clone_from(&recorded),
                Err(_) if disk.crashed() => {}
                Err(error) => panic!("{context}: commit failed without a fault: {error}"),
            }
        }
        disk.cut_power();
        drop(offsets);
        disk.reboot();
    }
}

#[test]
fn durable_positions_never_move_backwards_through_seeded_power_losses() {
    for_each_seed("durable_positions_never_move_backwards_through_seeded_power_losses", 100, durable_positions_seed);
}

/// One seed of a whole store: channels created (with partitions), grown,
/// deleted and appended to under `always`, crashed and recovered. Every
/// channel whose creation returned stays, with its partitions; every
/// acknowledged record stays; a deleted channel does not come back; no
/// channel is unavailable after a power loss.
fn store_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    // A real directory for the lock file; everything else is simulated.
    let data_dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new(data_dir.path(), seed);
    let mut config = StoreConfig::with_data_dir(data_dir.path());
    config.default_log =
        LogConfig { retention: RetentionPolicy::default(), ..log_config(&mut rng, FsyncPolicy::Always) };
    // Per channel: its partition count and its acknowledged records.
    type Acknowledged = BTreeMap<(u32, u64), Message>;
    let mut channels: BTreeMap<String, (u32, Acknowledged)> = BTreeMap::new();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut serial = 0;
    for life in 0..LIVES {
        let context = format!("seed {seed} (life {life})");
        disk.crash_at(disk.counts().operations + rng.random_range(1..=300));
        let fs: Arc<dyn FileSystem> = Arc::new(disk.clone());
        let store = match Store::open(config.clone(), fs) {
            Ok(store) => store,
            Err(_) if disk.crashed() => {
                disk.reboot();
                continue;
            }
            Err(error) => panic!("{context}: the store cannot be opened: {error}\n{}", disk.listing()),
        };
        if disk.crashed() {
            // The power went out while a channel was being recovered.
            drop(store);
            disk.reboot();
            continue;
        }
        for name in (0..5).map(|i| ChannelName::new(&format!("c{i}")).unwrap()) {
            if let Some(error) = store.unavailable(&name) {
                panic!("{context}: channel {name} is unavailable: {error}\n{}", disk.listing());
            }
        }
        for name in &deleted {
            assert!(
                store.channel(&ChannelName::new(name).unwrap()).is_none(),
                "{context}: deleted {name} came back\n{}",
                disk.listing()
            );
        }
        for (name, (partitions, acknowledged)) in &channels {
            let channel = store
                .channel(&ChannelName::new(name).unwrap())
                .unwrap_or_else(|| panic!("{context}: channel {name} is gone\n{}", disk.listing()));
            assert!(channel.partition_count() >= *partitions, "{context}: {name} lost partitions");
            for (&(partition, offset), message) in acknowledged {
                let log = channel.partition(partition).unwrap();
                let batch = log
                    .read(offset, 1)
                    .unwrap_or_else(|error| panic!("{context}: {name}/{partition}@{offset}: {error}"));
                let record = batch.iter().next().and_then(Result::ok);
                assert!(
                    record.is_some_and(|record| record.offset == offset && same(message, &record)),
                    "{context}: acknowledged record {name}/{partition}@{offset} lost\n{}",
                    disk.listing()
                );
            }
        }
        // Creations and growth the power cut happened to keep count from now.
        for channel in store.channels() {
            let entry = channels.entry(channel.name().to_string()).or_default();
            entry.0 = channel.partition_count();
        }
        for _ in 0..ACTIONS_MAX {
            if disk.crashed() {
                break;
            }
            let name = format!("c{}", rng.random_range(0..5));
            let channel_name = ChannelName::new(&name).unwrap();
            match (rng.random_range(0..100), store.channel(&channel_name)) {
                (0..15, None) => {
                    let settings = ChannelSettings { partitions: Some(rng.random_range(1..=3)), ..Default::default() };
                    match store.create(&channel_name, settings) {
                        Ok(channel) => {
                            channels.insert(name.clone(), (channel.partition_count(), BTreeMap::new()));
                            deleted.remove(&name);
                        }
                        // A creation the power cut may or may not survive.
                        Err(_) if disk.crashed() => {
                            deleted.remove(&name);
                        }
                        Err(error) => panic!("{context}: creating {name}: {error}"),
                    }
                }
                (15..20, Some(channel)) if channel.partition_count() < 8 => {
                    let count = channel.partition_count() + 1;
                    match channel.increase_partitions(count, 8) {
                        Ok(()) => channels.get_mut(&name).unwrap().0 = count,
                        Err(_) if disk.crashed() => {}
                        Err(error) => panic!("{context}: growing {name}: {error}"),
                    }
                }
                (20..23, Some(_)) => match store.delete(&channel_name) {
                    Ok(()) => {
                        channels.remove(&name);
                        deleted.insert(name);
                    }
                    // A deletion the power cut may or may not survive.
                    Err(_) if disk.crashed() => {
                        channels.remove(&name);
                    }
                    Err(error) => panic!("{context}: deleting {name}: {error}"),
                },
                (_, Some(channel)) => {
                    let partition = rng.random_range(0..channel.partition_count());
                    serial += 1;
                    let messages = vec![message(&mut rng, serial)];
                    match channel.partition(partition).unwrap().append_batch(&messages) {
                        Ok(appended) => {
                            let acknowledged = &mut channels.get_mut(&name).unwrap().1;
                            acknowledged.insert((partition, appended.first_offset), messages[0].clone());
                        }
                        Err(_) if disk.crashed() => {}
                        Err(error) => panic!("{context}: append to {name}/{partition}: {error}"),
                    }
                }
                _ => {}
            }
        }
        disk.cut_power();
        drop(store);
        disk.reboot();
    }
}

#[test]
fn a_store_keeps_its_channels_partitions_and_records_through_seeded_power_losses() {
    for_each_seed("a_store_keeps_its_channels_partitions_and_records_through_seeded_power_losses", 100, store_seed);
}

/// One seed of disk faults: ENOSPC, EIO on a write, EIO on `fdatasync`,
/// each at a seeded operation, answered as docs/GUARANTEES.md says, with
/// nothing acknowledged lost across the restart that follows.
fn disk_fault_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let policy = POLICIES[(seed % 3) as usize];
    let root = PathBuf::from("/sim");
    let disk = SimDisk::new(&root, seed);
    let dir = root.join("channels").join("sim");
    let config = log_config(&mut rng, policy);
    let mut model = LogModel::default();
    let mut serial = 0;
    let mut log = open_log(&disk, &dir, &config).unwrap();
    for round in 0..4 {
        let fault = [Fault::NoSpace, Fault::WriteEio, Fault::SyncEio][rng.random_range(0..3)];
        let context = format!("seed {seed} ({policy:?}, round {round}, {fault:?})");
        let injected_before = disk.counts().faults_injected;
        disk.arm(Some(disk.counts().operations + rng.random_range(1..=40)), fault);
        for _ in 0..200 {
            let messages: Vec<Message> = (0..rng.random_range(1..=3))
                .map(|_| {
                    serial += 1;
                    message(&mut rng, serial)
                })
                .collect();
            model.attempted(model.next, &messages);
            // The interval policy's background sync, now and then.
            if policy == FsyncPolicy::Interval && rng.random_bool(0.2) {
                match log.sync() {
                    Ok(()) => model.all_durable(),
                    Err(error) => {
                        assert!(
                            fault == Fault::SyncEio && disk.counts().faults_injected > injected_before,
                            "{context}: {error}"
                        );
                        // The state of unsynced data is unknown: every
                        // later append is refused until a restart.
                        let again = log.append_batch(&messages).unwrap_err();
                        assert!(matches!(again, StorageError::Failed { .. }), "{context}: {again}");
                        break;
                    }
                }
            }
            let result = log.append_batch(&messages);
            let fired = disk.counts().faults_injected > injected_before;
            match result {
                Ok(appended) => {
                    assert_eq!(appended.first_offset, model.next, "{context}: offsets continue");
                    model.acknowledged(appended.first_offset, appended.count, policy == FsyncPolicy::Always);
                    if fired {
                        break;
                    }
                }
                Err(error) => {
                    assert!(fired, "{context}: an append failed with no fault: {error}");
                    match fault {
                        Fault::NoSpace => {
                            assert!(matches!(error, StorageError::StorageFull { .. }), "{context}: {error}");
                            // Refused while full, without harm; taken again
                            // once space is back.
                            let again = log.append_batch(&messages).unwrap_err();
                            assert!(matches!(again, StorageError::StorageFull { .. }), "{context}: {again}");
                            disk.free_space();
                            std::thread::sleep(STORAGE_FULL_RETRY_INTERVAL + Duration::from_millis(10));
                        }
                        Fault::WriteEio => {
                            assert!(matches!(error, StorageError::Io { .. }), "{context}: {error}");
                        }
                        Fault::SyncEio if matches!(error, StorageError::Failed { .. }) => {
                            // The state of unsynced data is unknown: every
                            // later append is refused until a restart.
                            let again = log.append_batch(&messages).unwrap_err();
                            assert!(matches!(again, StorageError::Failed { .. }), "{context}: {again}");
                            break;
                        }
                        // A new segment whose sync failed is removed whole:
                        // nothing of unknown state is left to refuse for.
                        Fault::SyncEio => {
                            assert!(matches!(error, StorageError::Io { .. }), "{context}: {error}");
                        }
                    }
                    if fault != Fault::SyncEio {
                        let messages = vec![message(&mut rng, serial)];
                        model.attempted(model.next, &messages);
                        let appended = log.append_batch(&messages).unwrap_or_else(|error| {
                            panic!("{context}: the append after the fault was refused: {error}")
                        });
                        assert_eq!(appended.first_offset, model.next, "{context}: offsets continue after the fault");
                        model.acknowledged(appended.first_offset, 1, policy == FsyncPolicy::Always);
                    }
                    break;
                }
            }
        }
        disk.disarm();
        // A restart (the page cache kept): recovery keeps everything synced.
        drop(log);
        log = open_log(&disk, &dir, &config).unwrap_or_else(|error| panic!("{context}: recovery: {error}"));
        let settled = policy == FsyncPolicy::Always;
        model.check_recovered(&log, settled, &format!("{context}; the disk after recovery:\n{}", disk.listing()));
    }
}

#[test]
fn disk_faults_are_answered_as_promised_and_lose_nothing_synced() {
    for_each_seed("disk_faults_are_answered_as_promised_and_lose_nothing_synced", 60, disk_fault_seed);
}

// ---------------------------------------------------------------------------
// A replicated partition's state machine on the simulated disk

mod partition_group {
    //! The two-copy design of replicated partitions (docs/REPLICATION.md):
    //! the Raft log (redb, synced per append) is the durable copy, and the
    //! partition log is the state machine its committed entries are
    //! applied to, synced under the node's policy and always before the
    //! database records what was applied or a snapshot is taken. Here the
    //! Raft log is a list of entries that never loses one (its durability
    //! is redb's), the database sits on the real disk, and the partition
    //! log on the simulated one, which loses what a power cut may lose.
    //!
    //! After every crash, recovery must name an applied point at or after
    //! the last snapshot (openraft purges the Raft entries a snapshot
    //! covers, so they can never be applied again), and the partition log
    //! must be exactly what applying the entries up to that point gives:
    //! no hole, no record applied twice, no record differing. Applying the
    //! rest then must give, record for record, the log of a run that never
    //! crashed (deduplication decisions included: a window rebuilt from a
    //! damaged log would decide otherwise).

    use super::*;

    use openraft::EntryPayload;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::vote::leader_id_std::CommittedLeaderId;
    use weir::cluster::partition::{self, PartitionEntry, PartitionLogId, PartitionStateMachine, Publish};
    use weir::storage::fs::StdFileSystem;

    /// Entries of the simulated Raft log per seed.
    const ENTRIES: u64 = 160;
    /// Seeds in `cargo test` (each runs its entries once without a crash,
    /// then through crashes).
    const SEEDS_DEFAULT: u64 = 40;
    /// Lives per seed at most: the last ones run without a crash point so
    /// that every seed ends with all entries applied.
    const LIVES_MAX: u32 = 12;
    const CRASHING_LIVES: u32 = 8;

    /// The simulated Raft log: blanks, plain publishes and idempotent ones
    /// from a few producers (next sequences mostly; retries, gaps and
    /// producers unknown to the partition sometimes).
    fn raft_log(rng: &mut StdRng) -> Vec<PartitionEntry> {
        let mut entries = Vec::new();
        let mut term = 1;
        let mut serial = 0;
        // Per producer: its id, next sequence, and publishes so far as
        // (sequence, count).
        type Producer = (u64, u64, Vec<(u64, usize)>);
        let mut producers: Vec<Producer> = (0..3).map(|id| (id, 0, Vec::new())).collect();
        for index in 1..=ENTRIES {
            if rng.random_bool(0.03) {
                term += 1;
            }
            let log_id = PartitionLogId::new(CommittedLeaderId::new(term), index);
            let kind = rng.random_range(0..100);
            if kind < 6 {
                entries.push(PartitionEntry { log_id, payload: EntryPayload::Blank });
                continue;
            }
            let count = rng.random_range(1..=4);
            let messages: Vec<Message> = (0..count)
                .map(|_| {
                    serial += 1;
                    message(rng, serial)
                })
                .collect();
            let producer = if kind < 40 {
                None
            } else {
                let (id, next, sent) = &mut producers[rng.random_range(0..3)];
                let sequence = match rng.random_range(0..100) {
                    // A retry of an earlier publish: same sequence, same count.
                    0..15 if !sent.is_empty() => {
                        let (sequence, retried) = sent[rng.random_range(0..sent.len())];
                        let messages = messages.iter().cycle().take(retried).cloned().collect();
                        let publish = Publish { messages, producer: Some((*id, sequence)), timestamp_us: index * 10 };
                        entries.push(PartitionEntry { log_id, payload: EntryPayload::Normal(publish) });
                        continue;
                    }
                    // Ahead of its next sequence: refused.
                    15..20 => *next + 3,
                    _ => *next,
                };
                if sequence == *next {
                    sent.push((sequence, messages.len()));
                    *next += messages.len() as u64;
                }
                Some((*id, sequence))
            };
            // Leader timestamps, sometimes going back (a new leader's clock).
            let timestamp_us = (index * 10).saturating_sub(if rng.random_bool(0.1) { 15 } else { 0 });
            entries.push(PartitionEntry {
                log_id,
                payload: EntryPayload::Normal(Publish { messages, producer, timestamp_us }),
            });
        }
        entries
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    async fn apply(machine: &mut PartitionStateMachine, entries: &[PartitionEntry]) -> std::io::Result<()> {
        let stream = futures_util::stream::iter(entries.iter().cloned().map(|entry| Ok((entry, None))));
        machine.apply(stream).await
    }

    /// Every record of `log`, as (offset, timestamp, key, headers, payload).
    fn records(log: &ChannelLog) -> Vec<weir::record::Record> {
        let mut records = Vec::new();
        let mut from = log.start_offset();
        while from < log.next_offset() {
            let batch = log.read(from, 1 << 20).expect("a read of the partition log");
            let before = records.len();
            for record in batch.iter() {
                let record = record.expect("a record that verifies");
                from = record.offset + 1;
                records.push(record);
            }
            assert!(records.len() > before, "a read from offset {from} returned nothing");
        }
        records
    }

    /// The run without a crash: the partition log every replica must end
    /// with, and the log's next offset after each entry.
    fn reference(entries: &[PartitionEntry], config: &LogConfig) -> (Vec<weir::record::Record>, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let name = ChannelName::new("replicated").unwrap();
        let log =
            Arc::new(ChannelLog::open(Arc::new(StdFileSystem), &dir.path().join("log"), name, config.clone()).unwrap());
        let (_store, mut machine) = partition::open(&dir.path().join("raft.redb"), Arc::clone(&log)).unwrap();
        let mut next_after = vec![0];
        runtime().block_on(async {
            for entry in entries {
                apply(&mut machine, std::slice::from_ref(entry)).await.unwrap();
                next_after.push(log.next_offset());
            }
        });
        (records(&log), next_after)
    }

    fn seed_run(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let policy = POLICIES[(seed % 3) as usize];
        let config = LogConfig {
            segment_bytes: rng.random_range(2048..=16_384),
            index_interval_bytes: rng.random_range(64..=1024),
            fsync: policy,
            max_message_bytes: 8192,
            replicated: true,
            ..LogConfig::default()
        };
        let entries = raft_log(&mut rng);
        let (expected, next_after) = reference(&entries, &config);

        let root = PathBuf::from("/sim");
        let disk = SimDisk::new(&root, seed);
        let dir = root.join("channels").join("replicated");
        disk.create_dir_all(&root.join("channels")).unwrap();
        disk.sync_dir(&root).unwrap();
        let database_dir = tempfile::tempdir().unwrap();
        let database = database_dir.path().join("raft.redb");
        let runtime = runtime();
        // The last snapshot taken: its entries are purged from the Raft log.
        let mut snapshot_index = 0u64;
        let mut done = false;
        for life in 0..LIVES_MAX {
            let context = format!("seed {seed} ({policy:?}, life {life})");
            let crashing = life < CRASHING_LIVES;
            let power_cut = rng.random_bool(0.7);
            if crashing {
                let crash_point = disk.counts().operations + rng.random_range(1..=200);
                if power_cut {
                    disk.crash_at(crash_point)
                } else {
                    disk.kill_process_at(crash_point)
                }
                if rng.random_bool(0.3) {
                    let fault = if rng.random_bool(0.5) { Fault::WriteEio } else { Fault::SyncEio };
                    disk.arm(Some(disk.counts().operations + rng.random_range(1..=100)), fault);
                }
            }
            let faults_before = disk.counts().faults_injected;
            let failed = |disk: &SimDisk| disk.crashed() || disk.counts().faults_injected > faults_before;
            let outcome = runtime.block_on(async {
                let fs: Arc<dyn FileSystem> = Arc::new(disk.clone());
                let log = match ChannelLog::open(fs, &dir, ChannelName::new("replicated").unwrap(), config.clone()) {
                    Ok(log) => Arc::new(log),
                    Err(_) if failed(&disk) => return Ok(false),
                    Err(error) => return Err(format!("recovery failed: {error}")),
                };
                let (store, mut machine) = match partition::open(&database, Arc::clone(&log)) {
                    Ok(opened) => opened,
                    Err(_) if failed(&disk) => return Ok(false),
                    Err(error) => return Err(format!("the state machine refused to open: {error}")),
                };
                let (applied, _) = machine.applied_state().await.map_err(|error| error.to_string())?;
                let applied = applied.map_or(0, |id| id.index);
                if applied < snapshot_index {
                    return Err(format!("recovered at entry {applied}, before the snapshot at {snapshot_index}"));
                }
                if log.next_offset() != next_after[applied as usize] {
                    return Err(format!(
                        "recovered at entry {applied} with the log ending at offset {}, not {}",
                        log.next_offset(),
                        next_after[applied as usize]
                    ));
                }
                let held = records(&log);
                if let Some(at) = held.iter().zip(&expected).position(|(held, expected)| held != expected) {
                    return Err(format!("record {at} differs: {:?} where {:?}", held[at], expected[at]));
                }
                let mut next = applied as usize;
                while next < entries.len() {
                    let chunk = rng.random_range(1..=8).min(entries.len() - next);
                    if apply(&mut machine, &entries[next..next + chunk]).await.is_err() {
                        if failed(&disk) {
                            return Ok(false);
                        }
                        return Err(format!("applying entries {}.. failed without a fault", next + 1));
                    }
                    next += chunk;
                    if rng.random_bool(0.1) {
                        let mut builder = machine.get_snapshot_builder().await;
                        match builder.build_snapshot().await {
                            Ok(snapshot) => {
                                snapshot_index = snapshot.meta.last_log_id.map_or(0, |id| id.index);
                            }
                            Err(_) if failed(&disk) => return Ok(false),
                            Err(error) => return Err(format!("a snapshot failed without a fault: {error}")),
                        }
                    }
                }
                if !crashing {
                    let held = records(&log);
                    if held != expected {
                        return Err(format!(
                            "after every entry: {} records where the run without a crash has {}",
                            held.len(),
                            expected.len()
                        ));
                    }
                }
                drop((store, machine));
                Ok(!crashing)
            });
            match outcome {
                Ok(finished) => done = finished,
                Err(problem) => panic!("{context}: {problem}\n{}", disk.listing()),
            }
            if done {
                break;
            }
            disk.disarm();
            if power_cut {
                disk.cut_power();
                disk.reboot();
            } else {
                disk.restart_process();
            }
        }
        assert!(done, "seed {seed}: every entry applied within {LIVES_MAX} lives");
    }

    /// A replicated partition's state machine through seeded power cuts,
    /// process deaths and disk faults: nothing a snapshot covers is lost,
    /// no hole, nothing applied twice, and the end result is the log of a
    /// run without a crash.
    #[test]
    fn a_replicated_partition_recovers_to_the_run_without_a_crash() {
        for_each_seed("a_replicated_partition_recovers_to_the_run_without_a_crash", SEEDS_DEFAULT, seed_run);
    }
}
