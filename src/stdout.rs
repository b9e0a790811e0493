//! The command line's standard output. Rust's `println!` panics when the
//! reader has gone (`weir subscribe orders | head -3`); here a write that
//! fails marks standard output closed and returns `false`, and the
//! commands decide: a subscription stops (acknowledging nothing it could
//! not print), a publish from standard input publishes every line, a
//! benchmark still writes its files. A closed pipe ends the command with
//! success, as a pipeline expects; any other failure to write is reported
//! once on standard error and ends it with status 1.

use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

const OPEN: u8 = 0;
const READER_GONE: u8 = 1;
const FAILED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(OPEN);

/// Writes `args` to standard output and flushes it. Whether it was
/// written: once a write failed, nothing more is written. Used through
/// [`out!`](crate::out) and [`outln!`](crate::outln).
pub fn write(args: std::fmt::Arguments<'_>) -> bool {
    if STATE.load(Ordering::Acquire) != OPEN {
        return false;
    }
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            STATE.store(READER_GONE, Ordering::Release);
            false
        }
        Err(error) => {
            if STATE.swap(FAILED, Ordering::AcqRel) == OPEN {
                eprintln!("weir: cannot write to standard output: {error}");
            }
            false
        }
    }
}

/// Whether standard output takes no more writes (its reader has gone, or
/// a write failed).
pub fn is_closed() -> bool {
    STATE.load(Ordering::Acquire) != OPEN
}

/// Whether a write to standard output failed otherwise than by its reader
/// going away: the command then ends with status 1.
pub fn has_failed() -> bool {
    STATE.load(Ordering::Acquire) == FAILED
}

/// `print!` that returns whether it was written (see [`crate::stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

/// `println!` that returns whether it was written (see [`crate::stdout`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
