//! A simulated disk for seeded power-loss tests: an in-memory file system
//! that keeps what was written apart from what was made durable, and at a
//! crash point chosen by the test throws away what a real disk may lose.
//!
//! Files keep their durable bytes and, apart, the changes (writes,
//! truncations) made since their last `sync`. Directories keep their
//! durable entries and, apart, the creations, renames and removals since
//! their last `sync_dir`. At the crash, every file keeps, chosen by the
//! seed: none of its unsynced changes; an ordered prefix of them, the last
//! one torn (cut short, or with its end zeroed: the size reached the disk
//! but not the data); or its pages written back out of order (each page of
//! the unsynced range kept or left as it was). Each directory keeps an
//! ordered prefix of its unsynced changes; a rename across directories is
//! kept in both or in neither. Everything after the crash point fails with
//! EIO and changes nothing, until [`SimDisk::reboot`] makes the survivors
//! the disk's contents.
//!
//! The same disk injects faults at chosen operations: ENOSPC on a write
//! (half written first) or a creation, EIO on a write (after a short
//! write), EIO on `fdatasync` (after which the file's unsynced changes may
//! be lost, as Linux drops dirty pages whose writeback failed).
//!
//! Everything is deterministic for a seed: the sealed segment's background
//! sync runs when the log waits for it (see
//! `FileSystem::sync_in_background`), so no thread timing enters.

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use weir::storage::fs::{BackgroundSync, DeferredSync, FileSystem, OpenMode, StorageFile, SyncJob};

/// The page size of out-of-order writeback.
const PAGE_BYTES: usize = 4096;

/// A fault to inject at one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next write (or file creation) finds the disk full: a write puts
    /// down half of its bytes, then fails with ENOSPC. The disk stays full
    /// until [`SimDisk::free_space`].
    NoSpace,
    /// The next write puts down half of its bytes, then fails with EIO.
    WriteEio,
    /// The next `fdatasync` fails with EIO; the file's unsynced changes
    /// may be lost.
    SyncEio,
}

/// What the simulated disk has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounts {
    /// Operations that change the disk (writes, syncs, creations,
    /// renames, removals, truncations).
    pub operations: u64,
    pub faults_injected: u64,
}

#[derive(Clone, Debug)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
}

#[derive(Debug)]
struct Disk {
    /// Paths above the root exist and are never simulated.
    root: PathBuf,
    nodes: Vec<Node>,
    root_node: usize,
    rng: StdRng,
    operations: u64,
    /// The operation that cuts the power (counted from the start).
    crash_at: Option<u64>,
    /// Whether that crash is the process dying (the page cache, the live
    /// state, survives) rather than the power going.
    process_only: bool,
    crashed: bool,
    /// Faults armed for an operation number, or for the next operation of
    /// their kind (`None`).
    armed: Vec<(Option<u64>, Fault)>,
    full: bool,
    faults_injected: u64,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug, Default)]
struct FileNode {
    live: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<FileChange>,
}

#[derive(Debug, Clone)]
enum FileChange {
    Write { position: usize, bytes: Vec<u8> },
    Truncate(usize),
}

#[derive(Debug, Default)]
struct DirNode {
    live: BTreeMap<String, usize>,
    durable: BTreeMap<String, usize>,
    /// Changes since the last `sync_dir`, each with its sequence number in
    /// the disk's journal (so a rename across directories is one change).
    unsynced: Vec<(u64, DirChange)>,
}

#[derive(Debug, Clone)]
enum DirChange {
    Insert(String, usize),
    Remove(String),
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated EIO: {what}"))
}

fn enospc() -> io::Error {
    io::Error::from(io::ErrorKind::StorageFull)
}

impl SimDisk {
    /// An empty disk under `root` (which must be absolute), its choices at
    /// crashes drawn from `seed`.
    pub fn new(root: &Path, seed: u64) -> SimDisk {
        let root_dir = Node::Dir(DirNode::default());
        SimDisk {
            disk: Arc::new(Mutex::new(Disk {
                root: root.to_path_buf(),
                nodes: vec![root_dir],
                root_node: 0,
                rng: StdRng::seed_from_u64(seed ^ 0x5eed_d15c),
                operations: 0,
                crash_at: None,
                process_only: false,
                crashed: false,
                armed: Vec::new(),
                full: false,
                faults_injected: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn counts(&self) -> SimCounts {
        let disk = self.lock();
        SimCounts { operations: disk.operations, faults_injected: disk.faults_injected }
    }

    /// Cuts the power at operation number `operation` (counted from the
    /// disk's start): that operation may or may not take effect, and fails.
    pub fn crash_at(&self, operation: u64) {
        let mut disk = self.lock();
        disk.crash_at = Some(operation);
        disk.process_only = false;
    }

    /// Kills the process at operation number `operation`: that operation
    /// does not take effect and fails, and so does every later one, until
    /// [`SimDisk::restart_process`]; what was written stays in the page
    /// cache (nothing is lost, nothing more is synced).
    pub fn kill_process_at(&self, operation: u64) {
        let mut disk = self.lock();
        disk.crash_at = Some(operation);
        disk.process_only = true;
    }

    /// The process starts again after [`SimDisk::kill_process_at`] (or a
    /// crash that has not come yet is called off): the disk works again,
    /// its contents as the dead process left them.
    pub fn restart_process(&self) {
        let mut disk = self.lock();
        disk.crashed = false;
        disk.crash_at = None;
        disk.armed.clear();
        disk.full = false;
    }

    /// Cuts the power now.
    pub fn cut_power(&self) {
        let mut disk = self.lock();
        disk.crashed = true;
        disk.crash_at = None;
    }

    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Arms `fault` for operation number `operation`, or for the next
    /// operation it applies to.
    pub fn arm(&self, operation: Option<u64>, fault: Fault) {
        self.lock().armed.push((operation, fault));
    }

    pub fn disarm(&self) {
        self.lock().armed.clear();
    }

    pub fn free_space(&self) {
        self.lock().full = false;
    }

    /// Power comes back: what survived the crash is the disk's content,
    /// and the disk works again. Everything is durable after a reboot.
    pub fn reboot(&self) {
        let mut disk = self.lock();
        disk.reboot();
    }

    /// The disk's files and directories, live, for failure messages.
    pub fn listing(&self) -> String {
        let disk = self.lock();
        let mut out = String::new();
        disk.list_into(disk.root_node, &disk.root.display().to_string(), &mut out);
        out
    }
}

impl Disk {
    fn node(&self, id: usize) -> &Node {
        &self.nodes[id]
    }

    fn dir(&self, id: usize) -> io::Result<&DirNode> {
        match &self.nodes[id] {
            Node::Dir(dir) => Ok(dir),
            Node::File(_) => Err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory")),
        }
    }

    fn dir_mut(&mut self, id: usize) -> io::Result<&mut DirNode> {
        match &mut self.nodes[id] {
            Node::Dir(dir) => Ok(dir),
            Node::File(_) => Err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory")),
        }
    }

    fn file_mut(&mut self, id: usize) -> &mut FileNode {
        match &mut self.nodes[id] {
            Node::File(file) => file,
            Node::Dir(_) => unreachable!("file handles only refer to files"),
        }
    }

    /// The names from the root to `path`; `None` if `path` is the root or
    /// above it (always present, never simulated).
    fn components(&self, path: &Path) -> io::Result<Option<Vec<String>>> {
        if self.root.starts_with(path) {
            return Ok(None);
        }
        let rest = path
            .strip_prefix(&self.root)
            .map_err(|_| io::Error::other(format!("{} is outside the simulated disk", path.display())))?;
        let mut names = Vec::new();
        for component in rest.components() {
            match component {
                Component::Normal(name) => names.push(name.to_string_lossy().into_owned()),
                other => return Err(io::Error::other(format!("unsupported path component {other:?}"))),
            }
        }
        Ok(Some(names))
    }

    /// The node at `path`.
    fn resolve(&self, path: &Path) -> io::Result<usize> {
        let Some(names) = self.components(path)? else { return Ok(self.root_node) };
        let mut node = self.root_node;
        for name in &names {
            node = *self.dir(node)?.live.get(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        }
        Ok(node)
    }

    /// The directory holding `path`, and the name of `path` in it.
    fn parent_of(&self, path: &Path) -> io::Result<(usize, String)> {
        let names = self
            .components(path)?
            .ok_or_else(|| io::Error::other(format!("{} is the simulated root", path.display())))?;
        let (name, parents) = names.split_last().ok_or_else(|| io::Error::other("empty path"))?;
        let mut node = self.root_node;
        for parent in parents {
            node = *self.dir(node)?.live.get(parent).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        }
        self.dir(node)?;
        Ok((node, name.clone()))
    }

    /// Counts an operation that changes the disk; fails it if the power
    /// is cut. `Ok(true)` when this operation is the crash point: it then
    /// takes effect or not as the seed says, and fails.
    fn begin(&mut self) -> io::Result<bool> {
        if self.crashed {
            return Err(eio("the power is cut"));
        }
        self.operations += 1;
        if self.crash_at == Some(self.operations) {
            self.crashed = true;
            self.crash_at = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Runs a change under [`Disk::begin`]'s rules.
    fn change<T>(&mut self, apply: impl FnOnce(&mut Disk) -> io::Result<T>) -> io::Result<T> {
        if self.begin()? {
            if !self.process_only && self.rng.random_bool(0.5) {
                let _ = apply(self);
            }
            return Err(eio("the power was cut during this operation"));
        }
        apply(self)
    }

    /// Takes the fault armed for this operation (already counted) that
    /// applies to it.
    fn take_fault(&mut self, applies: impl Fn(Fault) -> bool) -> Option<Fault> {
        let operation = self.operations;
        let index = self.armed.iter().position(|&(at, fault)| applies(fault) && at.is_none_or(|at| at <= operation))?;
        let (_, fault) = self.armed.remove(index);
        self.faults_injected += 1;
        Some(fault)
    }

    fn journal_sequence(&mut self) -> u64 {
        // The operation count orders changes across directories.
        self.operations
    }

    fn dir_change(&mut self, dir: usize, change: DirChange) -> io::Result<()> {
        let sequence = self.journal_sequence();
        let node = self.dir_mut(dir)?;
        match &change {
            DirChange::Insert(name, id) => {
                node.live.insert(name.clone(), *id);
            }
            DirChange::Remove(name) => {
                node.live.remove(name);
            }
        }
        node.unsynced.push((sequence, change));
        Ok(())
    }

    fn new_node(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn write(&mut self, id: usize, buf: &[u8]) -> io::Result<()> {
        if self.begin()? {
            // Torn: a prefix of the write reached the page cache (a process
            // dies before its write call, or after it).
            let kept = if self.process_only { 0 } else { self.rng.random_range(0..=buf.len()) };
            append_to(self.file_mut(id), &buf[..kept]);
            return Err(eio("the power was cut during this write"));
        }
        let fault = self.take_fault(|fault| matches!(fault, Fault::NoSpace | Fault::WriteEio));
        if fault == Some(Fault::NoSpace) {
            self.full = true;
        }
        if self.full {
            append_to(self.file_mut(id), &buf[..buf.len() / 2]);
            return Err(enospc());
        }
        if fault == Some(Fault::WriteEio) {
            append_to(self.file_mut(id), &buf[..buf.len() / 2]);
            return Err(eio("injected write error"));
        }
        append_to(self.file_mut(id), buf);
        Ok(())
    }

    fn sync(&mut self, id: usize) -> io::Result<()> {
        let crashing = self.begin()?;
        if !crashing && self.take_fault(|fault| fault == Fault::SyncEio).is_some() {
            // The kernel may have dropped the pages it could not write
            // back: the file keeps a seeded part of its unsynced changes.
            let mut rng = StdRng::seed_from_u64(self.rng.random());
            let file = self.file_mut(id);
            let survivor = survivor(file, &mut rng);
            file.live = survivor.clone();
            file.durable = survivor;
            file.unsynced.clear();
            return Err(eio("injected fdatasync error"));
        }
        if crashing && (self.process_only || self.rng.random_bool(0.5)) {
            return Err(eio("the power was cut before this sync"));
        }
        let file = self.file_mut(id);
        file.durable = file.live.clone();
        file.unsynced.clear();
        if crashing {
            return Err(eio("the power was cut after this sync"));
        }
        Ok(())
    }

    fn reboot(&mut self) {
        let mut rng = StdRng::seed_from_u64(self.rng.random());
        // Directories: a prefix of each one's unsynced changes; a change
        // that several directories share (a rename) survives in all or none.
        let mut cut: BTreeMap<usize, u64> = BTreeMap::new();
        for (id, node) in self.nodes.iter().enumerate() {
            if let Node::Dir(dir) = node {
                let kept = rng.random_range(0..=dir.unsynced.len());
                let first_lost = dir.unsynced.get(kept).map_or(u64::MAX, |&(sequence, _)| sequence);
                cut.insert(id, first_lost);
            }
        }
        // A shared change is lost if any of its directories lost it; what
        // follows it in each directory is then lost too.
        loop {
            let mut changed = false;
            let mut lost_sequences: Vec<u64> = Vec::new();
            for (id, node) in self.nodes.iter().enumerate() {
                if let Node::Dir(dir) = node {
                    lost_sequences.extend(dir.unsynced.iter().map(|&(s, _)| s).filter(|&s| s >= cut[&id]));
                }
            }
            for (id, node) in self.nodes.iter().enumerate() {
                if let Node::Dir(dir) = node {
                    for &(sequence, _) in &dir.unsynced {
                        if sequence < cut[&id] && lost_sequences.contains(&sequence) {
                            cut.insert(id, sequence);
                            changed = true;
                            break;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        for (id, node) in self.nodes.iter_mut().enumerate() {
            match node {
                Node::Dir(dir) => {
                    let mut entries = dir.durable.clone();
                    for (sequence, change) in &dir.unsynced {
                        if *sequence >= cut[&id] {
                            break;
                        }
                        match change {
                            DirChange::Insert(name, child) => {
                                entries.insert(name.clone(), *child);
                            }
                            DirChange::Remove(name) => {
                                entries.remove(name);
                            }
                        }
                    }
                    dir.live = entries.clone();
                    dir.durable = entries;
                    dir.unsynced.clear();
                }
                Node::File(file) => {
                    let survivor = survivor(file, &mut rng);
                    file.live = survivor.clone();
                    file.durable = survivor;
                    file.unsynced.clear();
                }
            }
        }
        self.crashed = false;
        self.crash_at = None;
        self.full = false;
        self.armed.clear();
    }

    fn list_into(&self, id: usize, path: &str, out: &mut String) {
        match self.node(id) {
            Node::Dir(dir) => {
                for (name, &child) in &dir.live {
                    self.list_into(child, &format!("{path}/{name}"), out);
                }
            }
            Node::File(file) => {
                out.push_str(&format!("{path}: {} bytes ({} durable)\n", file.live.len(), file.durable.len()));
            }
        }
    }
}

fn append_to(file: &mut FileNode, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let position = file.live.len();
    file.live.extend_from_slice(bytes);
    file.unsynced.push(FileChange::Write { position, bytes: bytes.to_vec() });
}

fn apply(content: &mut Vec<u8>, change: &FileChange) {
    match change {
        FileChange::Write { position, bytes } => {
            let end = position + bytes.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[*position..end].copy_from_slice(bytes);
        }
        FileChange::Truncate(len) => content.resize(*len, 0),
    }
}

/// What a crash leaves of a file: its durable bytes and, chosen by `rng`,
/// some of its unsynced changes.
fn survivor(file: &FileNode, rng: &mut StdRng) -> Vec<u8> {
    if file.unsynced.is_empty() {
        return file.live.clone();
    }
    let mut content = file.durable.clone();
    match rng.random_range(0..4) {
        // Nothing written back.
        0 => {}
        // An ordered prefix, the last change torn: cut short, or its end
        // zeroed (the size reached the disk, the data did not).
        1 | 2 => {
            let kept = rng.random_range(0..=file.unsynced.len());
            for change in &file.unsynced[..kept] {
                apply(&mut content, change);
            }
            if let Some(FileChange::Write { position, bytes }) = file.unsynced.get(kept) {
                let cut = rng.random_range(0..=bytes.len());
                let mut torn = bytes[..cut].to_vec();
                if rng.random_bool(0.5) {
                    torn.resize(bytes.len(), 0);
                }
                apply(&mut content, &FileChange::Write { position: *position, bytes: torn });
            }
        }
        // Pages written back out of order: the size reached the disk, each
        // page of the unsynced range holds its new bytes or its old ones.
        _ => {
            let old = content.clone();
            content = file.live.clone();
            let start = common_prefix(&old, &content) / PAGE_BYTES * PAGE_BYTES;
            let mut page = start;
            while page < content.len() {
                let end = (page + PAGE_BYTES).min(content.len());
                if rng.random_bool(0.5) {
                    for (i, byte) in content[page..end].iter_mut().enumerate() {
                        *byte = old.get(page + i).copied().unwrap_or(0);
                    }
                }
                page = end;
            }
        }
    }
    content
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl FileSystem for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut disk = self.lock();
        let id = match mode {
            OpenMode::Existing => {
                let id = disk.resolve(path)?;
                if matches!(disk.node(id), Node::Dir(_)) {
                    return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"));
                }
                id
            }
            OpenMode::CreateNew => {
                let (parent, name) = disk.parent_of(path)?;
                if disk.dir(parent)?.live.contains_key(&name) {
                    return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                }
                disk.change(|disk| {
                    if disk.take_fault(|fault| fault == Fault::NoSpace).is_some() {
                        disk.full = true;
                    }
                    if disk.full {
                        return Err(enospc());
                    }
                    let id = disk.new_node(Node::File(FileNode::default()));
                    disk.dir_change(parent, DirChange::Insert(name, id))?;
                    Ok(id)
                })?
            }
        };
        Ok(Box::new(SimFile { disk: Arc::clone(&self.disk), id, path: path.to_path_buf() }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let Some(names) = disk.components(path)? else { return Ok(()) };
        let mut node = disk.root_node;
        for name in names {
            let existing = disk.dir(node)?.live.get(&name).copied();
            node = match existing {
                Some(child) => {
                    disk.dir(child)?;
                    child
                }
                None => disk.change(|disk| {
                    let child = disk.new_node(Node::Dir(DirNode::default()));
                    disk.dir_change(node, DirChange::Insert(name, child))?;
                    Ok(child)
                })?,
            };
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let disk = self.lock();
        let id = disk.resolve(dir)?;
        Ok(disk.dir(id)?.live.keys().cloned().collect())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let (parent, name) = disk.parent_of(path)?;
        let id = *disk.dir(parent)?.live.get(&name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if matches!(disk.node(id), Node::Dir(_)) {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"));
        }
        disk.change(|disk| disk.dir_change(parent, DirChange::Remove(name)))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let (parent, name) = disk.parent_of(path)?;
        let id = *disk.dir(parent)?.live.get(&name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        // Children first, each removal its own change, as the real
        // `remove_dir_all` unlinks them one by one.
        fn empty(disk: &mut Disk, id: usize) -> io::Result<()> {
            let Node::Dir(dir) = disk.node(id) else { return Ok(()) };
            let children: Vec<(String, usize)> = dir.live.iter().map(|(n, &c)| (n.clone(), c)).collect();
            for (name, child) in children {
                empty(disk, child)?;
                disk.change(|disk| disk.dir_change(id, DirChange::Remove(name)))?;
            }
            Ok(())
        }
        empty(&mut disk, id)?;
        disk.change(|disk| disk.dir_change(parent, DirChange::Remove(name)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let (from_parent, from_name) = disk.parent_of(from)?;
        let (to_parent, to_name) = disk.parent_of(to)?;
        let id =
            *disk.dir(from_parent)?.live.get(&from_name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if let Some(&existing) = disk.dir(to_parent)?.live.get(&to_name)
            && let Node::Dir(dir) = disk.node(existing)
            && !dir.live.is_empty()
        {
            return Err(io::Error::new(io::ErrorKind::DirectoryNotEmpty, "directory not empty"));
        }
        disk.change(|disk| {
            // One journal change: both entries carry the same sequence.
            disk.dir_change(from_parent, DirChange::Remove(from_name))?;
            disk.dir_change(to_parent, DirChange::Insert(to_name, id))
        })
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let id = disk.resolve(dir)?;
        disk.dir(id)?;
        disk.change(|disk| {
            let dir = disk.dir_mut(id)?;
            dir.durable = dir.live.clone();
            dir.unsynced.clear();
            Ok(())
        })
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let disk = self.lock();
        match disk.resolve(path) {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn sync_in_background(&self, sync: SyncJob) -> BackgroundSync {
        // As late as the log allows: when it waits for it. That is the
        // slowest a real background sync can be, and it keeps every run of
        // a seed identical.
        BackgroundSync::Deferred(DeferredSync(sync))
    }
}

#[derive(Debug)]
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    id: usize,
    path: PathBuf,
}

impl SimFile {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StorageFile for SimFile {
    fn len(&self) -> u64 {
        let mut disk = self.lock();
        disk.file_mut(self.id).live.len() as u64
    }

    fn append(&self, buf: &[u8]) -> io::Result<()> {
        self.lock().write(self.id, buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.lock().sync(self.id)
    }

    fn read_range(&self, position: u64, len: usize) -> io::Result<Bytes> {
        let mut disk = self.lock();
        let live = &disk.file_mut(self.id).live;
        let end = position.checked_add(len as u64).filter(|&end| end <= live.len() as u64);
        let Some(end) = end else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: range {position}+{len} is past the end ({})", self.path.display(), live.len()),
            ));
        };
        Ok(Bytes::copy_from_slice(&live[position as usize..end as usize]))
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let id = self.id;
        self.lock().change(|disk| {
            let file = disk.file_mut(id);
            let len = len as usize;
            file.live.resize(len, 0);
            file.unsynced.push(FileChange::Truncate(len));
            Ok(())
        })
    }
}
