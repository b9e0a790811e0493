//! Which incarnation of a replicated channel a node's files belong to, and
//! what to do with them against the metadata group's state
//! (docs/REPLICATION.md, "Deleting a replicated channel").
//!
//! A channel's incarnation is the log index of the metadata entry that
//! created it. Each node writes it to `cluster/partitions/NAME/incarnation`
//! before it starts the channel's first group, and removes that marker
//! last when it removes the channel's files; so a node replaying "delete
//! X" after it created a later X knows the files are the later X's.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The marker's file name, in the channel's directory under
/// `cluster/partitions/`.
pub const MARKER: &str = "incarnation";

/// What a node does with its files of a replicated channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Host the channel's partitions placed here on these files.
    Host,
    /// The files are a deleted incarnation's: remove them.
    Remove,
    /// The files are an older incarnation's, and a newer one exists:
    /// remove them, then host the newer one.
    RemoveThenHost,
    /// The files are a later incarnation's than the state has reached
    /// (entries being applied again after a restart): touch nothing yet.
    Wait,
    /// The state knows nothing of the name: touch nothing.
    Leave,
}

/// A channel's files' marker: the incarnation they belong to, and whether
/// their removal began (a crash midway leaves them marked so: never hosted
/// again, only removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    pub incarnation: u64,
    pub deleting: bool,
}

impl Marker {
    pub fn of(incarnation: u64) -> Marker {
        Marker { incarnation, deleting: false }
    }
}

/// The verdict for files marked `marker` (`None`: no marker, so no files
/// of any incarnation created since markers exist) when the state holds
/// the channel at `incarnation` (or not at all) and remembers `deleted` as
/// the incarnation it deleted under that name. Incarnation 0 is unknown (a
/// channel from a snapshot of the layout before incarnations): such a
/// channel was never deleted and created again, so with no deletion of the
/// name on record it matches any incarnation, and with one its files are
/// the deleted channel's.
///
/// The files of the state's own incarnation are always marked with it
/// (the marker is written before them), so `RemoveThenHost` never takes
/// them.
pub fn verdict(marker: Option<Marker>, incarnation: Option<u64>, deleted: Option<u64>) -> Verdict {
    if let Some(Marker { incarnation: files, deleting: true }) = marker {
        // Being removed: finished once the state has passed the deletion.
        return match (incarnation, deleted) {
            (Some(current), _) if current > files => Verdict::RemoveThenHost,
            (None, Some(deleted)) if files <= deleted => Verdict::Remove,
            _ => Verdict::Wait,
        };
    }
    let older_or_host = if deleted.is_some() { Verdict::RemoveThenHost } else { Verdict::Host };
    match (incarnation, marker.map(|marker| marker.incarnation)) {
        (Some(_), None) => older_or_host,
        (Some(current), Some(files)) if files == current => Verdict::Host,
        // Not expected (a channel created again has a known incarnation);
        // kept so that such files are never taken for the channel's.
        (Some(0), Some(_)) if deleted.is_some() => Verdict::Wait,
        (Some(0), Some(_)) => Verdict::Host,
        (Some(_), Some(0)) => older_or_host,
        (Some(current), Some(files)) if files < current => Verdict::RemoveThenHost,
        (Some(_), Some(_)) => Verdict::Wait,
        (None, files) => match (deleted, files) {
            (None, _) => Verdict::Leave,
            (Some(_), None | Some(0)) => Verdict::Remove,
            (Some(deleted), Some(files)) if files <= deleted => Verdict::Remove,
            (Some(_), Some(_)) => Verdict::Wait,
        },
    }
}

/// The directory of a replicated channel's Raft stores and marker.
pub fn channel_dir(data_dir: &Path, channel: &str) -> PathBuf {
    data_dir.join("cluster").join("partitions").join(channel)
}

/// Most bytes a marker file holds ("deleting " and a u64, with room).
const MARKER_BYTES_MAX: u64 = 64;

/// The marker in `dir`, if any.
///
/// # Errors
/// It cannot be read, or does not hold a marker.
pub fn read_marker(dir: &Path) -> io::Result<Option<Marker>> {
    use std::io::Read;
    let path = dir.join(MARKER);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut text = String::new();
    file.take(MARKER_BYTES_MAX).read_to_string(&mut text)?;
    let (deleting, number) = match text.trim().strip_prefix("deleting ") {
        Some(number) => (true, number),
        None => (false, text.trim()),
    };
    let incarnation = number.parse().map_err(|error| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {error}: {text:?}", path.display()))
    })?;
    Ok(Some(Marker { incarnation, deleting }))
}

/// Writes `marker` in `dir` (created if needed): a synced temporary file
/// renamed over the old one, the directory synced, so that a crash leaves
/// the old marker or the new one whole.
///
/// # Errors
/// A write, sync or rename failed.
pub fn write_marker(dir: &Path, marker: Marker) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!("{MARKER}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    if marker.deleting {
        writeln!(file, "deleting {}", marker.incarnation)?;
    } else {
        writeln!(file, "{}", marker.incarnation)?;
    }
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(MARKER))?;
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Removes `dir`: every file but the marker first, then the marker, then
/// the directory, so that a crash midway leaves the marker to say whose
/// the rest was.
///
/// # Errors
/// A removal failed.
pub fn remove_channel_dir(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name() == MARKER {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    // The rest is gone before the marker goes.
    std::fs::File::open(dir)?.sync_all()?;
    match std::fs::remove_file(dir.join(MARKER)) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    std::fs::remove_dir(dir)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of docs/REPLICATION.md's table: a later incarnation's
    /// files are never removed, whatever entry is being applied again.
    #[test]
    fn files_of_a_later_incarnation_are_never_removed() {
        let of = |incarnation| Some(Marker::of(incarnation));
        let deleting = |incarnation| Some(Marker { incarnation, deleting: true });
        // The channel exists.
        assert_eq!(verdict(None, Some(12), None), Verdict::Host);
        assert_eq!(verdict(of(12), Some(12), Some(5)), Verdict::Host);
        assert_eq!(verdict(of(0), Some(12), None), Verdict::Host);
        assert_eq!(verdict(of(12), Some(0), None), Verdict::Host);
        assert_eq!(verdict(of(5), Some(12), Some(5)), Verdict::RemoveThenHost);
        assert_eq!(verdict(of(5), Some(12), None), Verdict::RemoveThenHost);
        // Unmarked or unknown files, with a deletion of the name on record:
        // the deleted channel's (the current one's would be marked).
        assert_eq!(verdict(None, Some(12), Some(5)), Verdict::RemoveThenHost);
        assert_eq!(verdict(of(0), Some(12), Some(0)), Verdict::RemoveThenHost);
        // Replaying "create X (5)" with the files of X (12) on disk.
        assert_eq!(verdict(of(12), Some(5), None), Verdict::Wait);
        assert_eq!(verdict(of(12), Some(0), Some(5)), Verdict::Wait);
        // The channel is gone.
        assert_eq!(verdict(of(5), None, Some(5)), Verdict::Remove);
        assert_eq!(verdict(of(3), None, Some(5)), Verdict::Remove);
        assert_eq!(verdict(None, None, Some(5)), Verdict::Remove);
        assert_eq!(verdict(of(0), None, Some(5)), Verdict::Remove);
        // Replaying "delete X (5)" with the files of X (12) on disk.
        assert_eq!(verdict(of(12), None, Some(5)), Verdict::Wait);
        // A channel of unknown incarnation deleted: only unmarked or
        // unknown files go.
        assert_eq!(verdict(of(0), None, Some(0)), Verdict::Remove);
        assert_eq!(verdict(of(7), None, Some(0)), Verdict::Wait);
        // Never created, as far as the state knows.
        assert_eq!(verdict(of(12), None, None), Verdict::Leave);
        assert_eq!(verdict(None, None, None), Verdict::Leave);
        // A removal cut short: never hosted again, finished once the state
        // has passed the deletion.
        assert_eq!(verdict(deleting(5), Some(5), None), Verdict::Wait);
        assert_eq!(verdict(deleting(5), Some(12), Some(5)), Verdict::RemoveThenHost);
        assert_eq!(verdict(deleting(5), None, Some(5)), Verdict::Remove);
        assert_eq!(verdict(deleting(12), None, Some(5)), Verdict::Wait);
        assert_eq!(verdict(deleting(5), None, None), Verdict::Wait);
    }

    /// A marker is written whole and read back; removal takes every file
    /// and the directory; a missing directory is nothing to remove.
    #[test]
    fn markers_are_written_read_and_removed_last() {
        let dir = tempfile::tempdir().unwrap();
        let channel = channel_dir(dir.path(), "orders");
        assert_eq!(read_marker(&channel).unwrap(), None);
        write_marker(&channel, Marker::of(42)).unwrap();
        assert_eq!(read_marker(&channel).unwrap(), Some(Marker::of(42)));
        let deleting = Marker { incarnation: 42, deleting: true };
        write_marker(&channel, deleting).unwrap();
        assert_eq!(read_marker(&channel).unwrap(), Some(deleting));
        std::fs::write(channel.join("0.redb"), b"raft").unwrap();
        remove_channel_dir(&channel).unwrap();
        assert!(!channel.exists());
        remove_channel_dir(&channel).unwrap();
        std::fs::create_dir_all(&channel).unwrap();
        std::fs::write(channel.join(MARKER), b"not a number").unwrap();
        assert!(read_marker(&channel).is_err());
        std::fs::write(channel.join(MARKER), vec![b'7'; 1 << 20]).unwrap();
        assert!(read_marker(&channel).is_err(), "a long marker is read only so far, and refused");
    }
}
