//! Reports: the header that says what was measured where, a terminal
//! table, and JSON.

use serde::Serialize;

use super::recorder::{PERCENTILES, Summary};

/// What was measured, on what, how.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    pub tool: String,
    pub target: String,
    pub workload: String,
    pub warmup_seconds: f64,
    pub machine: Machine,
}

/// The machine the run was on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| std::env::consts::OS.to_owned(), |release| release.trim().to_owned()),
        }
    }
}

/// A whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub header: Header,
    /// The machine's floor for the same pattern (no broker).
    pub floor: Vec<Summary>,
    pub series: Vec<Summary>,
}

fn label(percentile: f64) -> String {
    if percentile >= 100.0 { "max".to_owned() } else { format!("p{percentile}") }
}

/// The report as a table: one row per series, milliseconds with 4 decimals.
pub fn table(report: &Report) -> String {
    let header = &report.header;
    let mut out = String::new();
    out.push_str(&format!("{} against {}\n", header.tool, header.target));
    out.push_str(&format!(
        "workload: {}; warm-up {:.0} s excluded; machine: {} cores, kernel {}\n",
        header.workload, header.warmup_seconds, header.machine.cores, header.machine.kernel
    ));
    out.push_str(&format!("{:<26} {:>8}", "latency (ms)", "samples"));
    for &percentile in &PERCENTILES {
        out.push_str(&format!(" {:>10}", label(percentile)));
    }
    out.push('\n');
    for summary in report.floor.iter().chain(&report.series) {
        out.push_str(&format!("{:<26} {:>8}", summary.name, summary.samples));
        for &(_, ms) in &summary.percentiles_ms {
            out.push_str(&format!(" {ms:>10.4}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::recorder::Series;

    #[test]
    fn the_table_names_target_workload_and_every_percentile() {
        let mut series = Series::new("end-to-end, 1024 B");
        series.record(std::time::Duration::from_micros(1234));
        let report = Report {
            header: Header {
                tool: "weir bench latency".into(),
                target: "weir 0.1.0 (embedded)".into(),
                workload: "50 msg/s for 30 s".into(),
                warmup_seconds: 5.0,
                machine: Machine { cores: 2, kernel: "6.1".into() },
            },
            floor: Vec::new(),
            series: vec![series.summary()],
        };
        let table = table(&report);
        assert!(table.contains("against weir 0.1.0 (embedded)"), "{table}");
        assert!(table.contains("p99.9999") && table.contains("max"), "{table}");
        // HdrHistogram reports the highest value equivalent to 1.234 ms at 3
        // significant digits.
        assert!(table.contains(" 1.23"), "{table}");
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"percentiles_ms\":[[50.0,"), "{json}");
    }
}
