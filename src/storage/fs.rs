//! The narrow file interface every storage path goes through: open, append,
//! sync, read a range as `Bytes`, truncate, list, remove, rename, and the
//! background sync of a sealed segment.
//!
//! [`StdFileSystem`] is the real implementation over `std::fs` and memory
//! maps. Keeping the engine behind these two traits lets a fault-injecting
//! implementation (power loss, torn writes, flipped bits) stand in for it in
//! tests without touching the engine.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::error::StorageError;
use super::mmap;

/// How [`FileSystem::open`] treats an existing or missing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file; fail if it exists.
    CreateNew,
    /// Open an existing file; fail if it is missing.
    Existing,
}

/// Directory-level operations.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Opens a file for reading and appending.
    ///
    /// # Errors
    /// The operating system's error.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    /// Creates a directory and its parents.
    ///
    /// # Errors
    /// The operating system's error.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory, in no particular order.
    ///
    /// # Errors
    /// The operating system's error.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Removes a file.
    ///
    /// # Errors
    /// The operating system's error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    ///
    /// # Errors
    /// The operating system's error.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` if it exists.
    ///
    /// # Errors
    /// The operating system's error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    ///
    /// # Errors
    /// The operating system's error.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Whether a file or directory exists at `path`.
    ///
    /// # Errors
    /// The operating system's error, other than "not found".
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Starts `sync` (a sealed segment's sync) off the caller's thread, so
    /// that appends do not wait for a whole segment to reach the disk.
    ///
    /// The real file system runs it on its own thread (inline if no thread
    /// can be started). A simulated one may run it later, as long as it has
    /// run when [`BackgroundSync::wait`] returns: that keeps a seeded
    /// simulation deterministic.
    fn sync_in_background(&self, sync: SyncJob) -> BackgroundSync {
        match std::thread::Builder::new().name("weir-seal".into()).spawn(sync) {
            Ok(handle) => BackgroundSync::Thread(handle),
            // The closure is gone with the failed spawn; the caller syncs
            // inline instead.
            Err(_) => BackgroundSync::NotStarted,
        }
    }
}

/// Creates `path` and its missing parents, and makes their entries durable
/// (each new directory's parent synced), so that a power loss cannot take
/// back a directory that records were then written and synced into.
///
/// # Errors
/// The operating system's error.
pub fn create_dir_all_durable(fs: &dyn FileSystem, path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut ancestor = Some(path);
    while let Some(dir) = ancestor {
        if fs.exists(dir)? {
            break;
        }
        missing.push(dir);
        ancestor = dir.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs.create_dir_all(path)?;
    // Outermost first: a directory's entry is durable before the entries
    // inside it are.
    for dir in missing.iter().rev() {
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            fs.sync_dir(parent)?;
        }
    }
    Ok(())
}

/// A sync to run in the background (see [`FileSystem::sync_in_background`]).
pub type SyncJob = Box<dyn FnOnce() -> Result<(), StorageError> + Send>;

/// A sync started by [`FileSystem::sync_in_background`].
#[derive(Debug)]
pub enum BackgroundSync {
    /// Running on its own thread.
    Thread(std::thread::JoinHandle<Result<(), StorageError>>),
    /// Deferred: it runs when waited for.
    Deferred(DeferredSync),
    /// No thread could be started: the caller must sync inline.
    NotStarted,
}

/// A sync that runs when waited for.
pub struct DeferredSync(pub SyncJob);

impl fmt::Debug for DeferredSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeferredSync")
    }
}

impl BackgroundSync {
    /// Waits for the sync and returns its result; `Err` if its thread
    /// panicked.
    ///
    /// # Errors
    /// The panic of the sync's thread.
    pub fn wait(self) -> std::thread::Result<Result<(), StorageError>> {
        match self {
            BackgroundSync::Thread(handle) => handle.join(),
            BackgroundSync::Deferred(DeferredSync(sync)) => Ok(sync()),
            BackgroundSync::NotStarted => Ok(Ok(())),
        }
    }
}

/// One open file. Shared between the single writer and many readers, so
/// every method takes `&self`.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// The length of the file, including bytes not yet synced.
    fn len(&self) -> u64;
    /// Whether the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes `buf` at the end of the file with one write call (repeated only
    /// if the kernel writes it partially).
    ///
    /// # Errors
    /// The operating system's error; the file may then hold part of `buf`.
    fn append(&self, buf: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable (`fdatasync`).
    ///
    /// # Errors
    /// The operating system's error. After a failed sync the state of the
    /// unsynced bytes is unknown: callers must not retry and hope.
    fn sync(&self) -> io::Result<()>;
    /// Reads `len` bytes at `position` without copying.
    ///
    /// # Errors
    /// `UnexpectedEof` if the range is not inside the file.
    fn read_range(&self, position: u64, len: usize) -> io::Result<Bytes>;
    /// Cuts the file to `len` bytes.
    ///
    /// # Errors
    /// The operating system's error.
    fn truncate(&self, len: u64) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFileSystem;

impl FileSystem for StdFileSystem {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if mode == OpenMode::CreateNew {
            options.create_new(true);
        }
        let file = options.open(path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(StdFile {
            path: path.to_path_buf(),
            file,
            len: AtomicU64::new(len),
            map: RwLock::new(Bytes::new()),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            // Names that are not UTF-8 cannot be ours; keep them visible to
            // callers (who report unknown files) in a lossy form.
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
}

/// Reads are served from a memory map of the file, remapped (with room to
/// grow) when a read reaches past the mapped length.
struct StdFile {
    path: PathBuf,
    file: File,
    len: AtomicU64,
    map: RwLock<Bytes>,
}

/// How far past the end of the file a new mapping reaches, so that a growing
/// segment is not remapped after every append.
const MAP_HEADROOM_BYTES: u64 = 64 * 1024 * 1024;

impl fmt::Debug for StdFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StdFile").field("path", &self.path).field("len", &self.len()).finish()
    }
}

impl StorageFile for StdFile {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn append(&self, buf: &[u8]) -> io::Result<()> {
        let position = self.len.load(Ordering::Acquire);
        self.file.write_all_at(buf, position)?;
        self.len.store(position + buf.len() as u64, Ordering::Release);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_range(&self, position: u64, len: usize) -> io::Result<Bytes> {
        let end = position.checked_add(len as u64).filter(|&end| end <= self.len());
        let Some(end) = end else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: range {position}+{len} is past the end of the file ({})", self.path.display(), self.len()),
            ));
        };
        if len == 0 {
            return Ok(Bytes::new());
        }
        {
            let map = self.map.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            if end <= map.len() as u64 {
                return Ok(map.slice(position as usize..end as usize));
            }
        }
        let mut map = self.map.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if end > map.len() as u64 {
            let map_len = usize::try_from(self.len() + MAP_HEADROOM_BYTES)
                .map_err(|_| io::Error::other("file too large to map on this platform"))?;
            *map = mmap::map_read_only(&self.file, map_len)?;
        }
        Ok(map.slice(position as usize..end as usize))
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut map = self.map.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Drop our mapping so that no new read is served from pages past the
        // new end; Bytes already handed out keep their own reference.
        *map = Bytes::new();
        self.file.set_len(len)?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }
}
