//! The one place weir uses `unsafe`: mapping a segment file into memory so
//! that reads hand out `Bytes` that point into the page cache instead of
//! copies.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

/// Keeps a mapping alive for as long as any `Bytes` sliced from it lives.
struct MappedFile(Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Maps the first `map_len` bytes of `file` read-only and returns them as
/// `Bytes`. `map_len` may exceed the current file length: the pages past
/// the end become readable as the file grows.
///
/// The caller must only ever read the returned bytes below the length the
/// file had when those bytes were written (see the safety comment).
///
/// # Errors
/// The `mmap` system call's error.
pub(crate) fn map_read_only(file: &File, map_len: usize) -> io::Result<Bytes> {
    if map_len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: memmap2 requires that the mapped file is not modified in a way
    // that changes bytes Rust code is reading, and that mapped pages are not
    // read past the end of the file (SIGBUS). Both hold by construction:
    // - segment files are append-only; bytes below a segment's published
    //   length are never rewritten while the broker runs;
    // - readers only slice below the published length, which is set after
    //   the write that produced those bytes completed (so the file is at
    //   least that long);
    // - the only truncations are recovery at open (before any reader
    //   exists) and the rollback of a failed append, which cuts only bytes
    //   above the published length, which no reader may touch;
    // - the data directory is locked against a second broker; another
    //   program truncating the files underneath us is outside what any
    //   mmap-based log (Kafka included) can defend against, and is
    //   documented in docs/OPERATIONS.md.
    let map = unsafe { MmapOptions::new().len(map_len).map(file)? };
    Ok(Bytes::from_owner(MappedFile(map)))
}
