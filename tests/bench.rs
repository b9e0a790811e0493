//! Smoke runs of `weir bench` against the embedded broker: each command
//! runs end to end on a fresh machine and reports every series.

use std::process::Command;

fn weir(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bench_latency_reports_floor_publish_and_end_to_end_for_every_size() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let path = json.path().to_str().unwrap().to_owned();
    let hgrms = tempfile::tempdir().unwrap();
    let hgrm_dir = hgrms.path().join("hgrm").to_str().unwrap().to_owned();
    let chart = hgrms.path().join("latency").to_str().unwrap().to_owned();
    let args = [
        "bench",
        "latency",
        "--sizes",
        "256,2048",
        "--rate",
        "100",
        "--seconds",
        "2",
        "--warmup-seconds",
        "1",
        "--floor-seconds",
        "1",
        "--json",
        &path,
        "--hgrm-dir",
        &hgrm_dir,
        "--chart",
        &chart,
    ];
    let (ok, stdout, stderr) = weir(&args);
    assert!(ok, "{stdout}\n{stderr}");
    let rows = [
        "floor, 256 B",
        "floor (tokio), 256 B",
        "send, 256 B",
        "publish, 256 B",
        "end-to-end, 256 B",
        "floor, 2048 B",
        "end-to-end, 2048 B",
    ];
    for series in rows {
        let row = stdout.lines().find(|line| line.starts_with(series)).unwrap_or_else(|| panic!("{series}:\n{stdout}"));
        // Two seconds at 100/s with one second of warm-up: 100 samples
        // recorded of 200 sent (the floor: 100 round trips).
        assert!(row.split_whitespace().any(|field| field == "100"), "{row}");
    }
    assert!(stdout.contains("warm-up 1 s excluded"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Per size: send, publish, end-to-end.
    assert_eq!(report["series"].as_array().unwrap().len(), 6);
    // Per size, the blocking-thread floor and the same pattern through tokio.
    assert_eq!(report["floor"].as_array().unwrap().len(), 4);
    // One .hgrm per series, each ending with the count of its samples.
    let mut files: Vec<String> =
        std::fs::read_dir(&hgrm_dir).unwrap().map(|entry| entry.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(
        files,
        [
            "end-to-end-2048-B.hgrm",
            "end-to-end-256-B.hgrm",
            "floor-2048-B.hgrm",
            "floor-256-B.hgrm",
            "floor-tokio-2048-B.hgrm",
            "floor-tokio-256-B.hgrm",
            "publish-2048-B.hgrm",
            "publish-256-B.hgrm",
            "send-2048-B.hgrm",
            "send-256-B.hgrm"
        ]
    );
    let hgrm = std::fs::read_to_string(std::path::Path::new(&hgrm_dir).join("end-to-end-256-B.hgrm")).unwrap();
    assert!(hgrm.contains("Total count    =          100]"), "{hgrm}");
    // The chart: floor, publish and end-to-end of both sizes.
    let svg = std::fs::read_to_string(hgrms.path().join("latency.svg")).unwrap();
    assert!(svg.contains("floor, 2048 B") && svg.contains("end-to-end, 256 B"), "{svg}");
    assert!(std::fs::read(hgrms.path().join("latency.png")).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn bench_floor_runs_without_a_broker() {
    let (ok, stdout, stderr) = weir(&["bench", "floor", "--size", "512", "--rate", "200", "--seconds", "1"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|line| line.starts_with("floor, 512 B") && line.contains(" 200 ")), "{stdout}");
}

#[test]
fn bench_latency_refuses_a_warmup_longer_than_the_run() {
    let (ok, _, stderr) = weir(&["bench", "latency", "--seconds", "2", "--warmup-seconds", "2"]);
    assert!(!ok);
    assert!(stderr.contains("--warmup-seconds"), "{stderr}");
    // Sizes and rates beyond the bench's bounds are refused before anything
    // is allocated or started.
    let (ok, _, stderr) = weir(&["bench", "throughput", "--sizes", "67108865"]);
    assert!(!ok && stderr.contains("--sizes must be between 1 and 67108864"), "{stderr}");
    let (ok, _, stderr) = weir(&["bench", "floor", "--rate", "10000001"]);
    assert!(!ok && stderr.contains("--rate must be between 1 and 10000000"), "{stderr}");
}

#[test]
fn bench_throughput_publishes_and_reads_back_every_message_of_every_size() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let path = json.path().to_str().unwrap().to_owned();
    let args =
        ["bench", "throughput", "--sizes", "100,4096", "--messages", "2000", "--bytes-max", "4096000", "--json", &path];
    let (ok, stdout, stderr) = weir(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("windows: "), "{stdout}");
    // Standard error is a pipe here: no progress bar.
    assert!(!stderr.contains("throughput, 100 B"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    // 2,000 messages of 100 B; 4096 B is held to the byte budget: 1,000.
    for (result, size, messages) in [(&results[0], 100, 2000), (&results[1], 4096, 1000)] {
        assert_eq!(result["size"], size);
        assert_eq!(result["publish"]["messages"], messages, "{result}");
        assert_eq!(result["consume"]["messages"], messages, "{result}");
        assert!(result["publish"]["messages_per_second"].as_f64().unwrap() > 0.0);
    }
}

/// A small OMB workload: 4 partitions, keyed, 2 producers, one
/// subscription of 2 consumers (a consumer group).
const SMALL_WORKLOAD: &str = "
name: smoke / 4 partitions / keyed / 2p-2c
topics: 1
partitionsPerTopic: 4
keyDistributor: \"KEY_ROUND_ROBIN\"
messageSize: 300
subscriptionsPerTopic: 1
consumerPerSubscription: 2
producersPerTopic: 2
producerRate: 1000
consumerBacklogSizeGB: 0
testDurationMinutes: 15
";

fn run_args<'a>(workload: &'a str, json: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "bench",
        "run",
        workload,
        "--test-seconds",
        "2",
        "--warmup-seconds",
        "1",
        "--report-seconds",
        "1",
        "--floor-seconds",
        "1",
        "--json",
        json,
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn the_load_generator_alone_against_the_null_target() {
    let (ok, stdout, stderr) =
        weir(&["bench", "throughput", "--driver", "null", "--sizes", "256", "--messages", "20000"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("against null (no broker"), "{stdout}");
    let row = stdout.lines().find(|line| line.starts_with("256 ")).unwrap_or_else(|| panic!("{stdout}"));
    // Messages, then publish, consume and floor rates, each msg/s and MB/s.
    assert_eq!(row.split_whitespace().count(), 8, "{row}");
    assert_eq!(row.split_whitespace().nth(1), Some("20000"), "{row}");

    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("smoke.yaml");
    std::fs::write(&workload, SMALL_WORKLOAD).unwrap();
    let json = dir.path().join("result.json");
    let (workload, json_path) = (workload.to_str().unwrap(), json.to_str().unwrap());
    let (ok, stdout, stderr) = weir(&run_args(workload, json_path, &["--driver", "null"]));
    assert!(ok, "{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_every_message_read(&stdout, &result);
}

/// The totals line: every acknowledged message was read, none failed.
fn assert_every_message_read(stdout: &str, result: &serde_json::Value) {
    let totals = &result["weir"]["totals"];
    let acknowledged = totals["acknowledged"].as_u64().unwrap();
    // 1,000 msg/s for 3 s (warm-up included).
    assert!(acknowledged >= 1000, "{totals}\n{stdout}");
    assert_eq!(totals["failed"], 0, "{totals}");
    assert_eq!(totals["redelivered"], 0, "{totals}");
    assert_eq!(totals["unread"], 0, "{totals}");
    assert!(totals["read"].as_u64().unwrap() >= acknowledged, "{totals}");
}

#[test]
fn bench_run_reads_an_omb_workload_and_writes_omb_results_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("smoke.yaml");
    std::fs::write(&workload, SMALL_WORKLOAD).unwrap();
    let json = dir.path().join("result.json");
    let chart = dir.path().join("chart");
    let (workload, json_path, chart_stem) =
        (workload.to_str().unwrap(), json.to_str().unwrap(), chart.to_str().unwrap());
    let (ok, stdout, stderr) = weir(&run_args(workload, json_path, &["--chart", chart_stem]));
    assert!(ok, "{stdout}\n{stderr}");
    // A line per period: one of warm-up, two of test.
    let periods: Vec<&str> = stdout.lines().filter(|line| line.contains("Pub rate")).collect();
    assert!(periods.iter().filter(|line| line.contains(" test")).count() >= 2, "{stdout}");
    assert!(periods.iter().any(|line| line.contains(" warmup")), "{stdout}");
    for series in
        ["floor, 300 B", "publish ", "publish delay", "end-to-end ", "publish from send", "end-to-end from send"]
    {
        assert!(stdout.lines().any(|line| line.starts_with(series)), "{series}:\n{stdout}");
    }
    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(result["workload"], "smoke / 4 partitions / keyed / 2p-2c");
    assert_eq!(result["partitions"], 4);
    // OMB's meaning: consumers per subscription.
    assert_eq!(result["consumersPerTopic"], 2);
    assert!(result["publishRate"].as_array().unwrap().len() >= 2, "{result}");
    assert!(result["aggregatedEndToEndLatency99pct"].as_f64().unwrap() > 0.0);
    assert!(!result["aggregatedPublishLatencyQuantiles"].as_object().unwrap().is_empty());
    assert_every_message_read(&stdout, &result);
    assert!(std::fs::read(chart.with_extension("png")).unwrap().starts_with(b"\x89PNG"));
    assert!(std::fs::read_to_string(chart.with_extension("svg")).unwrap().contains("end-to-end"));

    // `bench chart` overlays reports.
    let overlay = dir.path().join("overlay.svg");
    let args =
        ["bench", "chart", json_path, json_path, "--label", "a", "--label", "b", "-o", overlay.to_str().unwrap()];
    let (ok, stdout, stderr) = weir(&args);
    assert!(ok, "{stdout}\n{stderr}");
    // One floor, then publish and end-to-end of each run.
    assert!(stdout.contains("5 curves from 2 reports"), "{stdout}");
    let svg = std::fs::read_to_string(&overlay).unwrap();
    assert!(svg.contains("b: end-to-end"), "{svg}");
}

#[test]
fn bench_run_refuses_a_workload_out_of_bounds_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("bad.yaml");
    std::fs::write(&workload, SMALL_WORKLOAD.replace("partitionsPerTopic: 4", "partitionsPerTopic: 0")).unwrap();
    let (ok, _, stderr) = weir(&["bench", "run", workload.to_str().unwrap()]);
    assert!(!ok && stderr.contains("partitionsPerTopic"), "{stderr}");
}

#[test]
fn bench_catchup_builds_a_backlog_and_drains_it_while_publishing_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("catchup.json");
    let args = [
        "bench",
        "catchup",
        "--size",
        "512",
        "--partitions",
        "2",
        "--rate",
        "2000",
        "--backlog-mb",
        "1",
        "--seconds",
        "1",
        "--floor-seconds",
        "0",
        "--json",
        json.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = weir(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("drained in"), "{stdout}");
    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let drain = &result["weir"]["drain"];
    // 1 MiB of 512 B messages.
    assert_eq!(drain["backlog_messages"], 2048, "{drain}");
    assert!(drain["drain_messages_per_second"].as_f64().unwrap() > 0.0, "{drain}");
    assert!(drain["end_to_end"]["samples"].as_u64().unwrap() > 0, "{drain}");
    assert_eq!(result["weir"]["totals"]["unread"], 0, "{result}");
}

/// A server process the test started on a free loopback port with a
/// temporary directory, killed on drop.
struct Spawned {
    child: std::process::Child,
    /// host:port
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until the server accepts connections (a generous bound for a
/// loaded machine).
fn ready(server: Spawned, what: &str) -> Spawned {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(&server.addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start listening within 30 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server
}

/// Starts Debian's `nats-server`, or returns `None` when it is not
/// installed. `.ci/run` installs it and sets `WEIR_REQUIRE_NATS=1`, so in
/// CI its absence is a failure, not a skip.
fn nats_server() -> Option<Spawned> {
    let binary = ["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|candidate| Command::new(candidate).arg("--version").output().is_ok_and(|out| out.status.success()));
    let Some(binary) = binary else {
        assert!(
            std::env::var_os("WEIR_REQUIRE_NATS").is_none(),
            "WEIR_REQUIRE_NATS is set but nats-server is not installed (apt-get install nats-server)"
        );
        eprintln!("nats-server is not installed: the NATS driver test did not run (apt-get install nats-server)");
        return None;
    };
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", store.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Some(ready(Spawned { child, addr: format!("127.0.0.1:{port}"), _dir: store }, "nats-server"))
}

#[test]
fn bench_drives_nats_jetstream_with_the_same_load_generator() {
    let Some(nats) = nats_server() else { return };
    let url = format!("nats://{}", nats.addr);
    let url = url.as_str();
    let latency = [
        "bench",
        "latency",
        "--driver",
        "nats",
        "--url",
        url,
        "--sizes",
        "256",
        "--rate",
        "100",
        "--seconds",
        "2",
        "--warmup-seconds",
        "1",
        "--floor-seconds",
        "1",
    ];
    let (ok, stdout, stderr) = weir(&latency);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("against NATS JetStream"), "{stdout}");
    let row = stdout.lines().find(|line| line.starts_with("end-to-end, 256 B")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.split_whitespace().any(|field| field == "100"), "{row}");

    let throughput = ["bench", "throughput", "--driver", "nats", "--url", url, "--sizes", "512", "--messages", "1000"];
    let (ok, stdout, stderr) = weir(&throughput);
    assert!(ok, "{stdout}\n{stderr}");
    let row = stdout.lines().find(|line| line.starts_with("512 ")).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(row.split_whitespace().nth(1), Some("1000"), "{row}");

    // An OMB workload: JetStream has no partitions; the subscription's two
    // consumers pull from one durable consumer.
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("smoke.yaml");
    std::fs::write(&workload, SMALL_WORKLOAD).unwrap();
    let json = dir.path().join("result.json");
    let (workload, json_path) = (workload.to_str().unwrap(), json.to_str().unwrap());
    let (ok, stdout, stderr) = weir(&run_args(workload, json_path, &["--driver", "nats", "--url", url]));
    assert!(ok, "{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(result["driver"].as_str().unwrap().starts_with("NATS JetStream"), "{result}");
    assert_every_message_read(&stdout, &result);
}

/// `weir serve` on a free loopback port and a temporary directory.
fn weir_server() -> Spawned {
    let addr = format!("127.0.0.1:{}", free_port());
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--listen", &addr, "--data-dir", data.path().to_str().unwrap(), "--metrics-addr", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ready(Spawned { child, addr, _dir: data }, "weir serve")
}

#[test]
fn a_bench_against_a_running_broker_leaves_no_channel_behind() {
    let server = weir_server();
    let args = ["bench", "throughput", "--addr", &server.addr, "--sizes", "100", "--messages", "500"];
    let (ok, stdout, stderr) = weir(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("against weir at {}", server.addr)), "{stdout}");
    let (ok, listing, stderr) = weir(&["channels", "--addr", &server.addr]);
    assert!(ok, "{stderr}");
    assert!(!listing.contains("bench-"), "the run's channel is still there:\n{listing}");
}
