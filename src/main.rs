//! The `weir` command line: a thin layer of clap over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weir", version, about = "A commit-log message broker with explicit limits and backpressure")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify every channel and segment of a data directory offline.
    Check {
        /// The broker's data directory.
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { data_dir } => check(&data_dir),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("weir: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let report = weir::storage::check::check_data_dir(data_dir)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", data_dir.display()))?;
    for problem in &report.problems {
        println!("{problem}");
    }
    let summary = format!(
        "{} channels, {} segments, {} records, {} bytes",
        report.channels, report.segments, report.records, report.bytes
    );
    if report.is_clean() {
        println!("ok: {summary}");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problems in {summary}", report.problems.len());
        Ok(ExitCode::from(1))
    }
}
