//! The command line's standard output. Rust's `println!` panics when the
//! reader has gone (`weir subscribe orders | head -3`); here a closed pipe
//! ends the process quietly with success, as a pipeline expects, and any
//! other failure to write ends it with a message and status 1.

use std::io::Write as _;

/// Writes `args` to standard output and flushes it; see the module for a
/// failure. Used through [`out!`](crate::out) and [`outln!`](crate::outln).
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("weir: cannot write to standard output: {error}");
        std::process::exit(1);
    }
}

/// `print!` that ends the process quietly when standard output's reader
/// has gone (see [`crate::stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

/// `println!` that ends the process quietly when standard output's reader
/// has gone (see [`crate::stdout`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
