//! A file system that can run out of space: the real one, except that while
//! it is full every append writes half of its bytes and then fails with
//! ENOSPC, and every file creation fails with ENOSPC, as a full disk does.
//! It can also turn read-only: creating files and directories then fails
//! with EACCES, while files already open keep taking appends; it can fail
//! `fdatasync` with ENOSPC or EIO, and writes with EIO (after writing half
//! of the bytes, as a short write does).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use weir::storage::fs::{FileSystem, OpenMode, StdFileSystem, StorageFile};

#[derive(Debug, Default, Clone)]
pub struct FullDisk {
    full: Arc<AtomicBool>,
    read_only: Arc<AtomicBool>,
    /// `fdatasync` fails with ENOSPC (as on btrfs, NFS, thin volumes).
    sync_full: Arc<AtomicBool>,
    /// `fdatasync` fails with EIO.
    sync_eio: Arc<AtomicBool>,
    /// Appends write half of their bytes, then fail with EIO.
    write_eio: Arc<AtomicBool>,
    /// Appends and creations refused since the start.
    pub refusals: Arc<AtomicU64>,
}

/// EIO, as the kernel reports a device error.
fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

impl FullDisk {
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    pub fn set_sync_full(&self, sync_full: bool) {
        self.sync_full.store(sync_full, Ordering::SeqCst);
    }

    pub fn set_sync_eio(&self, failing: bool) {
        self.sync_eio.store(failing, Ordering::SeqCst);
    }

    pub fn set_write_eio(&self, failing: bool) {
        self.write_eio.store(failing, Ordering::SeqCst);
    }

    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::SeqCst);
    }

    fn refuse_creation(&self) -> io::Result<()> {
        if self.read_only.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.refuse()
    }

    fn refuse(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            self.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

impl FileSystem for FullDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        if mode == OpenMode::CreateNew {
            self.refuse_creation()?;
        }
        let inner = StdFileSystem.open(path, mode)?;
        Ok(Box::new(FullDiskFile { inner, disk: self.clone() }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        if !path.exists() {
            self.refuse_creation()?;
        }
        StdFileSystem.create_dir_all(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFileSystem.list(dir)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFileSystem.remove(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFileSystem.remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFileSystem.rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFileSystem.sync_dir(dir)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        StdFileSystem.exists(path)
    }
}

#[derive(Debug)]
struct FullDiskFile {
    inner: Box<dyn StorageFile>,
    disk: FullDisk,
}

impl StorageFile for FullDiskFile {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn append(&self, buf: &[u8]) -> io::Result<()> {
        if self.disk.write_eio.load(Ordering::SeqCst) {
            self.inner.append(&buf[..buf.len() / 2])?;
            return Err(eio());
        }
        if self.disk.full.load(Ordering::SeqCst) {
            // A full disk takes what fits of a write, then refuses the rest.
            self.inner.append(&buf[..buf.len() / 2])?;
            return self.disk.refuse();
        }
        self.inner.append(buf)
    }

    fn sync(&self) -> io::Result<()> {
        if self.disk.sync_eio.load(Ordering::SeqCst) {
            return Err(eio());
        }
        if self.disk.sync_full.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        self.inner.sync()
    }

    fn read_range(&self, position: u64, len: usize) -> io::Result<Bytes> {
        self.inner.read_range(position, len)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}
