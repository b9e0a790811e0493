//! The `weir` command line: a thin layer of clap over the library. Errors
//! become one line on stderr and a non-zero exit status.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use weir::client::{
    ClientTlsOptions, ConnectOptions, Connection, Event, FollowOptions, Followed, FollowingSubscriber, Publisher,
    PublisherOptions, SubscribeOptions, Subscriber,
};
use weir::config::Config;
use weir::protocol::{Notice, Request, Response, StartPosition};
use weir::record::Message;
use weir::storage::FsyncPolicy;
use weir::{out, outln};

const DEFAULT_ADDR: &str = "127.0.0.1:7450";
const DEFAULT_CLUSTER_ADDR: &str = "127.0.0.1:7451";

#[derive(Parser)]
#[command(name = "weir", version, about = "A commit-log message broker with explicit limits and backpressure")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (no config file needed: every setting has a default).
    Serve {
        /// A broker.toml; flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (listen_addr).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Prometheus endpoint address, or "" to disable (metrics_addr).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Print the effective configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
        /// Log format; the level comes from RUST_LOG (default info).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Publish a message, or one message per line of stdin; prints offsets.
    Publish {
        channel: String,
        /// The message; without it, each line of stdin is a message.
        message: Option<String>,
        /// The key; without --partition, it picks the partition (Kafka's
        /// partitioner over the channel's partition count).
        #[arg(long)]
        key: Option<String>,
        /// The partition to publish to (default: by --key, else 0).
        #[arg(long)]
        partition: Option<u32>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Print messages of a channel as they arrive: offset, time, key, payload
    /// (preceded by the partition when several are read).
    Subscribe {
        channel: String,
        /// Read one partition (default: all of them).
        #[arg(long)]
        partition: Option<u32>,
        /// earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "latest")]
        from: String,
        /// Durable subscription name: resume where this name left off.
        #[arg(long)]
        durable: Option<String>,
        /// Join this consumer group: read the partitions the broker assigns
        /// this member, from the group's committed positions.
        #[arg(long, conflicts_with_all = ["durable", "partition"])]
        group: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// List channels: offsets, size, segments, subscriptions and their lag.
    Channels {
        #[command(subcommand)]
        action: Option<ChannelsAction>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Consumer groups: members, who reads each partition, committed
    /// positions and lag.
    Groups {
        /// Only this channel's groups.
        channel: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Where each partition is led and held (METADATA), and every node's
    /// client address.
    Metadata {
        /// Only this channel.
        channel: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Broker counters, per-channel rates and subscriber lag, from two
    /// samples taken --interval-ms apart.
    Stats {
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Measure: latency percentiles at a fixed rate (coordinated omission
    /// corrected), beside the machine's own floor, and throughput.
    Bench {
        #[command(subcommand)]
        kind: BenchKind,
    },
    /// Cluster mode: the nodes of the metadata group, its leader and term,
    /// and membership changes. Talks to a node's cluster listener.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
        /// A node's cluster listener ([cluster] listen_addr); membership
        /// changes are forwarded to the leader it names.
        #[arg(long, env = "WEIR_NODE", default_value = DEFAULT_CLUSTER_ADDR, global = true)]
        node: String,
        #[command(flatten)]
        tls: ClusterTlsArgs,
    },
    /// Credentials for the broker's credentials_file.
    Credentials {
        #[command(subcommand)]
        action: CredentialsAction,
    },
    /// Verify every channel and segment of a data directory offline.
    Check {
        /// The broker's data directory.
        data_dir: PathBuf,
        /// The broker's configuration file: the fsync policy of each channel
        /// (`fsync` and `[channels.NAME] fsync`) decides what a torn end of
        /// its last sealed segment means.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The fsync policy of every channel (overrides --config): under
        /// "interval" and "never" a crash may tear the end of the last
        /// sealed segment, which the broker repairs; under "always" that is
        /// corruption. Without either option: "always".
        #[arg(long, value_enum)]
        fsync: Option<FsyncArg>,
    },
}

/// Where the client commands find the broker, and how they prove who they
/// are.
#[derive(Args, Clone)]
struct BrokerArgs {
    #[arg(long, env = "WEIR_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// The credential HELLO carries: `name:token` for a user of the
    /// broker's credentials file, or its shared auth_token.
    #[arg(long, env = "WEIR_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Connect over TLS (implied by --tls-ca, --tls-cert and --tls-key).
    #[arg(long, env = "WEIR_TLS", global = true)]
    tls: bool,
    /// The CA that signed the broker's certificate (PEM); default: the
    /// system's trusted roots.
    #[arg(long = "tls-ca", env = "WEIR_TLS_CA", global = true)]
    ca: Option<PathBuf>,
    /// A client certificate chain (PEM), for mutual TLS; with --tls-key.
    #[arg(long = "tls-cert", env = "WEIR_TLS_CERT", global = true)]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM). (Not `--key`: that is
    /// a message's key.)
    #[arg(long = "tls-key", id = "tls_key", env = "WEIR_TLS_KEY", global = true)]
    key: Option<PathBuf>,
}

impl BrokerArgs {
    fn options(&self, client_name: &str) -> ConnectOptions {
        let tls = (self.tls || self.ca.is_some() || self.cert.is_some() || self.key.is_some())
            .then(|| ClientTlsOptions { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() });
        ConnectOptions { client_name: client_name.to_owned(), auth_token: self.token.clone(), tls }
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        Ok(Connection::connect_with(&self.addr, &self.options("weir-cli")).await?)
    }
}

/// The broker a `weir bench` command drives.
#[derive(Args)]
struct TargetArgs {
    /// The broker to drive: weir, the peer NATS JetStream at --url, or
    /// none (null: what the load generator alone reaches).
    #[arg(long, value_enum, default_value = "weir")]
    driver: DriverArg,
    /// The NATS server (--driver nats).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// A running weir broker; without it, one is started in this process
    /// on a temporary directory.
    #[arg(long)]
    addr: Option<String>,
    /// The credential for the broker at --addr (`name:token`, or its
    /// auth_token).
    #[arg(long, requires = "addr")]
    token: Option<String>,
    /// Connect to the broker at --addr over TLS, verifying its certificate
    /// against this CA (PEM).
    #[arg(long, requires = "addr")]
    tls_ca: Option<PathBuf>,
    /// The embedded broker's fsync policy.
    #[arg(long, value_enum, default_value = "never")]
    fsync: FsyncArg,
    /// Drive replicated channels of the cluster whose node has this
    /// cluster listener (with --addr, any of its nodes' client address):
    /// each is created with --replication-factor and driven on its leader.
    #[arg(long, requires = "addr")]
    cluster: Option<String>,
    /// The replication factor of the channels --cluster creates.
    #[arg(long, default_value_t = 3, requires = "cluster")]
    replication_factor: u8,
    /// The target's name in reports, JSON (OMB's `driver`) and charts, e.g.
    /// "weir never" for a broker at --addr (default: what the driver says
    /// of itself).
    #[arg(long)]
    label: Option<String>,
}

/// What `weir bench run` and `weir bench catchup` share.
#[derive(Args)]
struct RunArgs {
    /// Each consumer's window (per partition for weir).
    #[arg(long, default_value_t = 1024)]
    consumer_window: u32,
    /// Seconds of the floor measurement (0: none).
    #[arg(long, default_value_t = 5)]
    floor_seconds: u64,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    output: ReportArgs,
}

/// Where a latency report goes besides the terminal.
#[derive(Args)]
struct ReportArgs {
    /// Also write the report as JSON to this file (`bench run` and
    /// `catchup`: OMB's result format).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write a percentile chart as STEM.svg and STEM.png.
    #[arg(long, value_name = "STEM")]
    chart: Option<PathBuf>,
    /// Also write each series' full distribution as an HdrHistogram `.hgrm`
    /// file into this directory.
    #[arg(long)]
    hgrm_dir: Option<PathBuf>,
}

impl ReportArgs {
    fn write_json(&self, report: &impl serde::Serialize) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(report)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn write_hgrms<'a>(&self, series: impl Iterator<Item = &'a weir::bench::recorder::Series>) -> anyhow::Result<()> {
        let Some(dir) = &self.hgrm_dir else { return Ok(()) };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for series in series {
            let path = dir.join(format!("{}.hgrm", series.file_stem()));
            std::fs::write(&path, series.hgrm()).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// The broker `weir bench` drives.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DriverArg {
    Weir,
    Nats,
    /// No broker: the load generator alone, every send acknowledged at
    /// once (its own ceiling).
    Null,
}

/// The benchmarks of `weir bench`.
#[derive(Subcommand)]
enum BenchKind {
    /// Messages of each size at a fixed rate to a caught-up subscriber:
    /// publish and end-to-end latency from each message's intended send
    /// time, and the floor of the same pattern with no broker.
    Latency {
        /// Message sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,5120,1048576")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 50)]
        rate: u64,
        /// Seconds per size, warm-up included.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Seconds at the start of each size that are not recorded.
        #[arg(long, default_value_t = 5)]
        warmup_seconds: u64,
        /// Seconds of the floor measurement per size.
        #[arg(long, default_value_t = 10)]
        floor_seconds: u64,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        output: ReportArgs,
    },
    /// N messages per size from one publisher, done when every
    /// acknowledgement is back; then one subscriber reads them all.
    Throughput {
        /// Message sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,5120,1048576")]
        sizes: Vec<usize>,
        /// Messages per size.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// At most this many payload bytes per size (fewer messages for
        /// large sizes).
        #[arg(long, default_value_t = 1 << 30)]
        bytes_max: u64,
        /// The subscriber's window (deliveries outstanding), capped by the
        /// broker's max_inflight_deliveries.
        #[arg(long, default_value_t = 1024)]
        subscriber_window: u32,
        #[command(flatten)]
        target: TargetArgs,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// An OpenMessaging Benchmark workload file (OMB's YAML, as it is; see
    /// benches/workloads/): periodic and aggregated publish, publish-delay
    /// and end-to-end latency, rates and backlog, JSON in OMB's result
    /// format.
    Run {
        /// The workload file.
        workload: PathBuf,
        /// Seconds of test (default: the workload's testDurationMinutes).
        #[arg(long)]
        test_seconds: Option<u64>,
        /// Seconds of warm-up, not recorded (default: the workload's
        /// warmupDurationMinutes, OMB's default 1 minute).
        #[arg(long)]
        warmup_seconds: Option<u64>,
        /// Seconds between two period reports (OMB: 10).
        #[arg(long, default_value_t = 10)]
        report_seconds: u64,
        /// The backlog to build and drain first, in GiB (default: the
        /// workload's consumerBacklogSizeGB).
        #[arg(long)]
        backlog_gb: Option<f64>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Replays a backlog while publishing goes on: publish --backlog-mb at
    /// --rate, then a consumer reads from the start and catches up while
    /// the producer keeps its rate; the drain rate, its duration, and
    /// publish latency during it.
    Catchup {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Messages a second published throughout.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// The backlog to build before the consumer starts, in MiB.
        #[arg(long, default_value_t = 1024)]
        backlog_mb: u64,
        /// Seconds of test once caught up.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Percentile charts (SVG or PNG, by the extension of -o) of one or
    /// more JSON reports (`bench latency --json`, `bench run --json`),
    /// overlaid.
    Chart {
        /// Report files.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The chart file: .svg or .png.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        /// A name for each report's runs in the legend, in the order of the
        /// reports (default: each report's target).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// The machine's floor alone: a ping-pong of one size at a fixed rate
    /// over loopback TCP, no broker.
    Floor {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 50)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// Mutual TLS to a cluster listener that has `[cluster] tls_*` set: a
/// certificate the cluster's CA signed, and that CA.
#[derive(Args, Clone)]
struct ClusterTlsArgs {
    /// The cluster's CA (PEM): [cluster] tls_ca.
    #[arg(long = "tls-ca", env = "WEIR_CLUSTER_TLS_CA", global = true, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// A certificate chain the cluster's CA signed (PEM).
    #[arg(long = "tls-cert", env = "WEIR_CLUSTER_TLS_CERT", global = true, requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long = "tls-key", env = "WEIR_CLUSTER_TLS_KEY", global = true, requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
}

/// What `weir cluster` does.
#[derive(Subcommand)]
enum ClusterAction {
    /// The node's view of the metadata group: role, term, leader, log
    /// positions, members and (asked of the leader) each one's lag.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node (started with [cluster] and this id): a learner until it
    /// has caught up, then a voter.
    AddNode {
        id: u64,
        /// Its cluster listener.
        #[arg(long)]
        cluster_addr: String,
        /// Its client listener.
        #[arg(long)]
        client_addr: String,
    },
    /// Remove a node from the voters and the group.
    RemoveNode { id: u64 },
    /// Create a replicated channel: each partition a Raft group over
    /// `replication-factor` nodes, placed by the metadata leader.
    CreateChannel {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// 1, 3 or 5, at most the number of voters.
        #[arg(long, default_value_t = 3)]
        replication_factor: u8,
    },
    /// Delete a replicated channel on every node: its subscriptions end
    /// and each node removes its files as it applies the deletion.
    DeleteChannel { name: String },
    /// Add partitions to a replicated channel (never fewer): each new
    /// partition a Raft group placed by the metadata leader, as at
    /// creation. A key may then route to another partition.
    AlterChannel {
        name: String,
        /// The new partition count.
        #[arg(long)]
        partitions: u32,
    },
    /// Move a replicated partition's replica from one node to another: the
    /// new one joins as a learner, catches up (by segment transfer when the
    /// leader's Raft log no longer holds what it needs), then replaces the
    /// old one among the voters. Run again to resume a move cut short.
    MoveReplica {
        channel: String,
        partition: u32,
        /// The node whose replica moves.
        #[arg(long)]
        from: u64,
        /// The node it moves to (a member of the cluster).
        #[arg(long)]
        to: u64,
    },
}

/// What `weir credentials` does.
#[derive(Subcommand)]
enum CredentialsAction {
    /// Print the argon2id hash (a PHC string) of the token read from the
    /// first line of stdin, for a user's token_hash; with --generate, make
    /// a random token, print it on stderr and its hash on stdout.
    Hash {
        /// Generate a random 32-byte token (hex) instead of reading one.
        #[arg(long)]
        generate: bool,
    },
}

/// What `weir channels` does besides listing.
#[derive(Subcommand)]
enum ChannelsAction {
    /// Create a channel with explicit settings.
    Create {
        channel: String,
        /// Partitions (default: the broker's default_partitions).
        #[arg(long)]
        partitions: Option<u32>,
        #[arg(long)]
        retention_max_bytes: Option<u64>,
        #[arg(long)]
        retention_max_age_secs: Option<u64>,
        #[arg(long)]
        retention_max_messages: Option<u64>,
    },
    /// Raise a channel's partition count (never lowered).
    Alter {
        channel: String,
        #[arg(long)]
        partitions: u32,
    },
    /// Delete a channel: its files, durable positions and consumer groups.
    Delete {
        channel: String,
        /// Also when it has live subscriptions (they end with an error).
        #[arg(long)]
        force: bool,
    },
}

/// The fsync policy, as `weir check --fsync` takes it.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum FsyncArg {
    Always,
    Interval,
    Never,
}

impl From<FsyncArg> for FsyncPolicy {
    fn from(policy: FsyncArg) -> FsyncPolicy {
        match policy {
            FsyncArg::Always => FsyncPolicy::Always,
            FsyncArg::Interval => FsyncPolicy::Interval,
            FsyncArg::Never => FsyncPolicy::Never,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { data_dir, config, fsync } => check(&data_dir, config.as_deref(), fsync.map(Into::into)),
        Command::Serve { config, listen, data_dir, metrics_addr, print_config, log_format } => {
            let overrides = Overrides { listen, data_dir, metrics_addr };
            serve(config.as_deref(), overrides, print_config, log_format)
        }
        Command::Publish { channel, message, key, partition, broker } => {
            run_async(publish(broker, channel, key, partition, message))
        }
        Command::Subscribe { channel, partition, from, durable, group, count, broker } => {
            run_async(subscribe(broker, channel, SubscribeArgs { partition, from, durable, group, count }))
        }
        Command::Channels { action: None, broker } => run_async(channels(broker)),
        Command::Channels { action: Some(action), broker } => run_async(channels_admin(broker, action)),
        Command::Stats { interval_ms, broker } => run_async(stats(broker, interval_ms)),
        Command::Groups { channel, broker } => run_async(groups(broker, channel)),
        Command::Metadata { channel, broker } => run_async(metadata(broker, channel)),
        Command::Credentials { action: CredentialsAction::Hash { generate } } => credentials_hash(generate),
        Command::Cluster { action, node, tls } => run_async(cluster(node, tls, action)),
        Command::Bench { kind } => run_async(async move { tokio::spawn(bench(kind)).await? }),
    };
    match result {
        // Its output could not be written (not a reader gone: a full
        // disk, say); said on stderr already.
        Ok(_) if weir::stdout::has_failed() => ExitCode::FAILURE,
        Ok(code) => code,
        Err(error) => {
            eprintln!("weir: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// Each partition's replicas, one line each.
fn print_placement(replicas: &[Vec<u64>]) {
    for (partition, nodes) in replicas.iter().enumerate() {
        let nodes: Vec<String> = nodes.iter().map(u64::to_string).collect();
        outln!("  partition {partition}: nodes {}", nodes.join(", "));
    }
}

async fn cluster(node: String, tls: ClusterTlsArgs, action: ClusterAction) -> anyhow::Result<ExitCode> {
    use weir::cluster::{NodeAddrs, NodeReply, NodeRequest};
    let connector = match tls.ca {
        Some(ca) => Some(ClientTlsOptions { ca: Some(ca), cert: tls.cert, key: tls.key }.connector()?),
        None => None,
    };
    let request = match &action {
        ClusterAction::Status { .. } => NodeRequest::Status,
        ClusterAction::AddNode { id, cluster_addr, client_addr } => NodeRequest::AddNode {
            id: *id,
            addrs: NodeAddrs { cluster_addr: cluster_addr.clone(), client_addr: client_addr.clone() },
        },
        ClusterAction::RemoveNode { id } => NodeRequest::RemoveNode { id: *id },
        ClusterAction::CreateChannel { name, partitions, replication_factor } => NodeRequest::CreateChannel {
            name: name.clone(),
            partitions: *partitions,
            replication_factor: *replication_factor,
        },
        ClusterAction::DeleteChannel { name } => NodeRequest::DeleteChannel { name: name.clone() },
        ClusterAction::AlterChannel { name, partitions } => {
            NodeRequest::AlterChannel { name: name.clone(), partitions: *partitions }
        }
        ClusterAction::MoveReplica { channel, partition, from, to } => {
            NodeRequest::MoveReplica { channel: channel.clone(), partition: *partition, from: *from, to: *to }
        }
    };
    let reply = weir::cluster::admin(&node, request, connector).await.with_context(|| format!("node {node}"))?;
    match reply {
        NodeReply::Status(status) => {
            if matches!(action, ClusterAction::Status { json: true }) {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                out!("{status}");
            }
        }
        NodeReply::ChannelCreated { replicas } => {
            outln!("replicated channel created; replicas per partition (preferred leader first):");
            print_placement(&replicas);
        }
        NodeReply::ChannelAltered { replicas } => {
            outln!(
                "replicated channel of {} partitions; replicas per partition (preferred leader first):",
                replicas.len()
            );
            print_placement(&replicas);
        }
        NodeReply::ChannelDeleted => {
            outln!("replicated channel deleted; each node removes its files as it applies the deletion");
        }
        NodeReply::MembershipChanged { voters } => {
            let voters: Vec<String> = voters.iter().map(u64::to_string).collect();
            match &action {
                ClusterAction::MoveReplica { channel, partition, .. } => {
                    outln!("replica moved; {channel} partition {partition} replicas now: {}", voters.join(", "));
                }
                _ => {
                    outln!("membership changed; voters now: {}", voters.join(", "));
                }
            }
        }
        NodeReply::NotLeader { leader: None } => {
            bail!("no leader is known to node {node} (an election may be under way): try again")
        }
        NodeReply::NotLeader { leader: Some((id, addrs)) } => {
            bail!("node {id} ({}) leads, but the request did not reach it", addrs.cluster_addr)
        }
        NodeReply::Error(message) | NodeReply::UnknownChannel(message) => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The error and its causes, skipping a cause its parent already quotes
/// (many library errors include their source in their own message).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn run_async(future: impl Future<Output = anyhow::Result<ExitCode>>) -> anyhow::Result<ExitCode> {
    init_logs(LogFormat::Text, "warn");
    runtime()?.block_on(future)
}

/// `weir serve` flags that override the configuration file.
struct Overrides {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    metrics_addr: Option<String>,
}

fn serve(
    config_path: Option<&Path>,
    overrides: Overrides,
    print_config: bool,
    log_format: LogFormat,
) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config_path)?;
    if let Some(listen) = overrides.listen {
        config.listen_addr = listen;
    }
    if let Some(data_dir) = overrides.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(metrics_addr) = overrides.metrics_addr {
        config.metrics_addr = metrics_addr;
    }
    config.validate()?;
    if print_config {
        out!("{}", config.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    init_logs(log_format, "info");
    tracing::info!(config = %config.to_toml().replace('\n', "; "), "effective configuration");
    runtime()?.block_on(async move {
        // The handlers are installed before the listener opens: a SIGTERM
        // sent as soon as the port answers must stop gracefully, not kill.
        let signals = ShutdownSignals::install()?;
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let server = weir::server::start(config).await?;
        let shutdown = server.shutdown_token();
        tokio::spawn(async move {
            signals.received().await;
            tracing::info!("signal received: shutting down gracefully");
            shutdown.cancel();
        });
        let stopped = server.shutdown_token();
        let reloading = server.reloader();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    received = hangups.recv() => if received.is_none() { return },
                }
                // File reads: on the blocking pool.
                let reloader = reloading.clone();
                match tokio::task::spawn_blocking(move || reloader.reload()).await {
                    Ok(Ok(())) => tracing::info!("SIGHUP: TLS files and credentials reloaded"),
                    Ok(Err(error)) => {
                        tracing::error!(%error, "SIGHUP: reload failed; what failed to load is unchanged");
                    }
                    Err(error) => tracing::error!(%error, "SIGHUP: reload failed"),
                }
            }
        });
        server.wait().await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `weir credentials hash`.
fn credentials_hash(generate: bool) -> anyhow::Result<ExitCode> {
    use weir::security::principal::{PRINCIPAL_TOKEN_BYTES_MAX, hash_token};
    let token = if generate {
        let bytes: [u8; 32] = rand::random();
        let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        eprintln!("token (give it to the client, then forget it): {token}");
        token
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the token from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    anyhow::ensure!(
        (1..=PRINCIPAL_TOKEN_BYTES_MAX).contains(&token.len()),
        "a token is 1 to {PRINCIPAL_TOKEN_BYTES_MAX} bytes"
    );
    outln!("{}", hash_token(&token).map_err(anyhow::Error::msg)?);
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, both of which stop the broker gracefully.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn received(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// The partition count of `channel`, if it exists.
async fn partition_count(connection: &Connection, channel: &str) -> anyhow::Result<Option<u32>> {
    let Response::Channels { channels } = connection.request(Request::ListChannels).await? else {
        bail!("unexpected answer to LIST_CHANNELS");
    };
    Ok(channels.iter().find(|info| info.name == channel).map(|info| info.partitions.len() as u32))
}

async fn publish(
    broker: BrokerArgs,
    channel: String,
    key: Option<String>,
    partition: Option<u32>,
    message: Option<String>,
) -> anyhow::Result<ExitCode> {
    let partition = match (partition, &key) {
        (Some(partition), _) => partition,
        // A channel that does not exist yet is routed as if it had one
        // partition (the default for new channels).
        (None, Some(key)) => {
            let connection = broker.connect().await?;
            let count = partition_count(&connection, &channel).await?.unwrap_or(1);
            weir::partitioner::partition_for_key(key.as_bytes(), count.max(1))
        }
        (None, None) => 0,
    };
    if partition != 0 {
        eprintln!("publishing to partition {partition}");
    }
    let connect = broker.options("weir-cli");
    let options = PublisherOptions {
        partition,
        client_name: connect.client_name,
        auth_token: connect.auth_token,
        tls: connect.tls,
        ..PublisherOptions::default()
    };
    let publisher = Publisher::connect(&broker.addr, &channel, options).await?;
    let key = Bytes::from(key.unwrap_or_default());
    let to_message = |payload: String| Message { key: key.clone(), headers: Vec::new(), payload: Bytes::from(payload) };
    if let Some(message) = message {
        let receipt = publisher.publish(to_message(message)).await?;
        outln!("{}", receipt.offset);
        publisher.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    // Lines are pipelined; receipts are printed in order as they arrive.
    let (lines, mut receipts) = tokio::sync::mpsc::channel(1024);
    let printer = tokio::spawn(async move {
        let mut failed = None;
        while let Some(receipt) = receipts.recv().await {
            let receipt: tokio::sync::oneshot::Receiver<Result<weir::client::Receipt, weir::client::ClientError>> =
                receipt;
            match receipt.await {
                // Published all the same once stdout is closed.
                Ok(Ok(receipt)) => {
                    outln!("{}", receipt.offset);
                }
                Ok(Err(error)) => failed = Some(error.to_string()),
                Err(_) => failed = Some("the publisher stopped".into()),
            }
        }
        failed
    });
    let stdin = tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().collect::<Result<Vec<String>, _>>());
    for line in stdin.await.context("reading stdin")?.context("reading stdin")? {
        let receipt = publisher.enqueue(to_message(line)).await?;
        if lines.send(receipt).await.is_err() {
            break;
        }
    }
    drop(lines);
    publisher.close().await;
    if let Some(error) = printer.await.context("printing offsets")? {
        bail!("{error}");
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_start(from: &str) -> anyhow::Result<StartPosition> {
    match from {
        "earliest" => return Ok(StartPosition::Earliest),
        "latest" => return Ok(StartPosition::Latest),
        _ => {}
    }
    if let Ok(offset) = from.parse::<u64>() {
        return Ok(StartPosition::Offset(offset));
    }
    let time = humantime::parse_rfc3339_weak(from)
        .with_context(|| format!("--from {from:?} is not earliest, latest, an offset, or an RFC 3339 time"))?;
    let micros = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    Ok(StartPosition::TimeUs(micros))
}

/// How long `weir subscribe` (durable, a group member, or one partition)
/// goes on subscribing again after losing its node, or following a
/// group's coordinator, without a record.
const GROUP_FOLLOW_LIMIT: Duration = Duration::from_secs(60);
/// The pause before each such new subscription but the first.
const GROUP_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What `weir subscribe` was asked for.
struct SubscribeArgs {
    partition: Option<u32>,
    from: String,
    durable: Option<String>,
    group: Option<String>,
    count: Option<u64>,
}

async fn subscribe(broker: BrokerArgs, channel: String, args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let SubscribeArgs { partition, from, durable, group, count } = args;
    let start = parse_start(&from)?;
    let options = SubscribeOptions { partition, start, durable_name: durable, group, ..SubscribeOptions::default() };
    let resumable = options.partition.is_some() || options.durable_name.is_some() || options.group.is_some();
    let mut received = 0u64;
    if !resumable {
        // Every partition from a start position: nothing to resume from
        // elsewhere, so the subscription ends with its connection.
        let connection = broker.connect().await?;
        let mut subscriber = Subscriber::subscribe(&connection, &channel, options).await?;
        let several = subscriber.partitions().len() != 1;
        while count.is_none_or(|count| received < count)
            && !weir::stdout::is_closed()
            && let Some(event) = subscriber.next().await
        {
            if let Some((partition, offset)) = show_event(event?, several) {
                subscriber.ack_partition(partition, offset).await?;
                received += 1;
            }
        }
        // Let the last ack reach the broker before the connection closes.
        let _ = connection.request(Request::Ping).await;
        return Ok(ExitCode::SUCCESS);
    }
    // A durable subscription, a group member, or one partition: subscribed
    // again where its errors say, or at the cluster's nodes in turn, when
    // it ends for a reason another node can mend (a group's coordinator in
    // cluster mode, a node lost); at most GROUP_FOLLOW_LIMIT without a
    // record.
    let follow = FollowOptions { follow_limit: GROUP_FOLLOW_LIMIT, retry_pause: GROUP_RETRY_PAUSE };
    let mut subscriber =
        FollowingSubscriber::subscribe(&broker.addr, broker.options("weir-cli"), &channel, options, follow).await?;
    let several = partition.is_none() && subscriber.partitions().len() != 1;
    while count.is_none_or(|count| received < count)
        && !weir::stdout::is_closed()
        && let Some(followed) = subscriber.next().await
    {
        match followed? {
            Followed::Moved { to, reason } => eprintln!("notice: {reason}; subscribed at {to}"),
            Followed::Event(event) => {
                if let Some((partition, offset)) = show_event(event, several) {
                    subscriber.ack_partition(partition, offset).await?;
                    received += 1;
                }
            }
        }
    }
    let _ = subscriber.sync().await;
    Ok(ExitCode::SUCCESS)
}

/// Prints a subscription's event (records on stdout, the partition first
/// when it reads `several`; notices on stderr); returns the partition and
/// offset to acknowledge for a record it printed (none once standard
/// output is closed: see `weir::stdout`).
fn show_event(event: Event, several: bool) -> Option<(u32, u64)> {
    match event {
        Event::Message { partition, record } => {
            let time =
                humantime::format_rfc3339_micros(SystemTime::UNIX_EPOCH + Duration::from_micros(record.timestamp_us));
            let prefix = if several { format!("{partition}\t") } else { String::new() };
            let printed = outln!(
                "{prefix}{}\t{}\t{}\t{}",
                record.offset,
                time,
                String::from_utf8_lossy(&record.key),
                String::from_utf8_lossy(&record.payload)
            );
            return printed.then_some((partition, record.offset));
        }
        Event::Notice { partition, notice: Notice::Lag { lag, next_offset } } => {
            eprintln!("notice: partition {partition}: {lag} messages behind (next offset {next_offset})");
        }
        Event::Notice { partition, notice: Notice::Skipped { skipped, resume_offset } } => {
            eprintln!(
                "notice: partition {partition}: retention deleted {skipped} unread messages; resuming at {resume_offset}"
            );
        }
        // Generation 0: outside a group, a partition added to the channel.
        Event::Notice { partition, notice: Notice::Assigned { generation: 0, first_offset } } => {
            eprintln!("notice: partition {partition} was added to the channel; reading it from offset {first_offset}");
        }
        Event::Notice { partition, notice: Notice::Assigned { generation, first_offset } } => {
            eprintln!("notice: partition {partition} assigned (generation {generation}), from offset {first_offset}");
        }
        Event::Notice { partition, notice: Notice::Revoked { generation } } => {
            eprintln!("notice: partition {partition} revoked (generation {generation})");
        }
    }
    None
}

async fn channels_admin(broker: BrokerArgs, action: ChannelsAction) -> anyhow::Result<ExitCode> {
    let connection = broker.connect().await?;
    if connection.protocol_version() < 2 {
        bail!("the broker speaks protocol version 1, which has no partitions");
    }
    let (request, done) = match action {
        ChannelsAction::Create {
            channel,
            partitions,
            retention_max_bytes,
            retention_max_age_secs,
            retention_max_messages,
        } => {
            let retention = weir::protocol::ChannelRetention {
                max_bytes: retention_max_bytes,
                max_age_secs: retention_max_age_secs,
                max_messages: retention_max_messages,
            };
            (Request::CreateChannel { channel: channel.clone(), retention, partitions }, format!("created {channel}"))
        }
        ChannelsAction::Alter { channel, partitions } => (
            Request::AlterChannel { channel: channel.clone(), partitions },
            format!("{channel} has {partitions} partitions"),
        ),
        ChannelsAction::Delete { channel, force } => {
            (Request::DeleteChannel { channel: channel.clone(), force }, format!("deleted {channel}"))
        }
    };
    connection.request(request).await?;
    outln!("{done}");
    Ok(ExitCode::SUCCESS)
}

async fn bench(kind: BenchKind) -> anyhow::Result<ExitCode> {
    use weir::bench::{floor, latency, report};
    match kind {
        BenchKind::Floor { size, rate, seconds } => {
            check_bench_bounds(&[size], rate, &[seconds])?;
            let series = tokio::task::spawn_blocking(move || floor::measure(size, rate, rate * seconds)).await??;
            let report = report::Report {
                header: report::Header {
                    tool: "weir bench floor".into(),
                    target: "loopback TCP, no broker".into(),
                    workload: format!("{size} B round trips at {rate}/s for {seconds} s"),
                    warmup_seconds: 0.0,
                    machine: report::Machine::this(),
                },
                floor: vec![series.summary()],
                series: Vec::new(),
            };
            out!("{}", report::table(&report));
        }
        BenchKind::Throughput { sizes, messages, bytes_max, subscriber_window, target, json } => {
            check_bench_bounds(&sizes, 1, &[])?;
            anyhow::ensure!(
                messages > 0 && bytes_max > 0 && subscriber_window > 0,
                "--messages, --bytes-max and --subscriber-window must be at least 1"
            );
            let options = weir::bench::throughput::ThroughputOptions { sizes, messages, bytes_max, subscriber_window };
            let label = target.label.clone();
            let target = bench_target(target).await?;
            return bench_throughput(options, target, label, json).await;
        }
        BenchKind::Run { workload: path, test_seconds, warmup_seconds, report_seconds, backlog_gb, run } => {
            let workload = weir::bench::omb::Workload::load(&path)?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            anyhow::ensure!(
                [test_seconds, warmup_seconds].iter().flatten().all(|&seconds| seconds <= weir::bench::SECONDS_MAX),
                "--test-seconds and --warmup-seconds must be at most {}",
                weir::bench::SECONDS_MAX
            );
            let test = test_seconds.map_or_else(|| workload.test_duration(), Duration::from_secs);
            let warmup = warmup_seconds.map_or_else(|| workload.warmup_duration(), Duration::from_secs);
            let backlog_gb = backlog_gb.unwrap_or(workload.consumer_backlog_size_gb);
            let most = weir::bench::omb::BACKLOG_GB_MAX;
            anyhow::ensure!((0.0..=most).contains(&backlog_gb), "--backlog-gb must be between 0 and {most}");
            let backlog_bytes = (backlog_gb * f64::from(1u32 << 30)) as u64;
            return bench_run("weir bench run", workload, &base, test, warmup, report_seconds, backlog_bytes, run)
                .await;
        }
        BenchKind::Catchup { size, partitions, rate, backlog_mb, seconds, run } => {
            check_bench_bounds(&[size], rate, &[seconds])?;
            let most = (weir::bench::omb::BACKLOG_GB_MAX as u64) << 10;
            anyhow::ensure!((1..=most).contains(&backlog_mb), "--backlog-mb must be between 1 and {most}");
            let workload = weir::bench::omb::Workload {
                name: format!(
                    "catch-up: {backlog_mb} MiB backlog of {size} B at {rate} msg/s, {partitions} partitions"
                ),
                topics: 1,
                partitions_per_topic: partitions,
                key_distributor: weir::bench::omb::KeyDistributor::NoKey,
                message_size: size,
                use_randomized_payloads: false,
                random_bytes_ratio: 0.0,
                randomized_payload_pool_size: 0,
                payload_file: None,
                subscriptions_per_topic: 1,
                producers_per_topic: 1,
                consumer_per_subscription: 1,
                producer_rate: rate,
                consumer_backlog_size_gb: backlog_mb as f64 / 1024.0,
                backlog_drain_ratio: 1.0,
                test_duration_minutes: seconds as f64 / 60.0,
                warmup_duration_minutes: 0.0,
                unused: Default::default(),
            };
            workload.check_bounds().map_err(|message| anyhow::anyhow!(message))?;
            let test = Duration::from_secs(seconds);
            let backlog_bytes = backlog_mb << 20;
            return bench_run(
                "weir bench catchup",
                workload,
                Path::new("."),
                test,
                Duration::ZERO,
                10,
                backlog_bytes,
                run,
            )
            .await;
        }
        BenchKind::Chart { reports, output, title, labels } => {
            anyhow::ensure!(
                labels.is_empty() || labels.len() == reports.len(),
                "--label: give one per report ({} reports, {} labels)",
                reports.len(),
                labels.len()
            );
            let mut each = Vec::new();
            for (index, report) in reports.iter().enumerate() {
                each.push(weir::bench::chart::curves_from_file(report, labels.get(index).map(String::as_str))?);
            }
            let curves = weir::bench::chart::overlay(each);
            weir::bench::chart::draw(&curves, &title, &output)?;
            outln!("{}: {} curves from {} reports", output.display(), curves.len(), reports.len());
        }
        BenchKind::Latency { sizes, rate, seconds, warmup_seconds, floor_seconds, target, output } => {
            check_bench_bounds(&sizes, rate, &[seconds, warmup_seconds, floor_seconds])?;
            anyhow::ensure!(seconds > warmup_seconds, "--seconds must be above --warmup-seconds");
            let label = target.label.clone();
            let target = bench_target(target).await?;
            let mut floors = Vec::new();
            for &size in &sizes {
                let count = rate * floor_seconds.max(1);
                floors.push(tokio::task::spawn_blocking(move || floor::measure(size, rate, count)).await??);
                floors.push(floor::measure_runtime(size, rate, count).await?);
            }
            let options = latency::LatencyOptions {
                sizes: sizes.clone(),
                rate_per_second: rate,
                duration: Duration::from_secs(seconds),
                warmup: Duration::from_secs(warmup_seconds),
            };
            let results = latency::run(&*target, &options).await?;
            let report = report::Report {
                header: report::Header {
                    tool: "weir bench latency".into(),
                    target: label.clone().unwrap_or_else(|| target.describe()),
                    workload: format!("{rate} msg/s for {seconds} s per size, sizes {sizes:?} B, random payloads"),
                    warmup_seconds: warmup_seconds as f64,
                    machine: report::Machine::this(),
                },
                floor: floors.iter().map(|series| series.summary()).collect(),
                series: results.iter().flat_map(latency::SizeResult::series).map(|series| series.summary()).collect(),
            };
            target.stop().await?;
            out!("{}", report::table(&report));
            output.write_hgrms(floors.iter().chain(results.iter().flat_map(latency::SizeResult::series)))?;
            output.write_json(&report)?;
            if let Some(stem) = &output.chart {
                let title = format!("{rate} msg/s, {}", report.header.target);
                write_chart(stem, &title, &report.header.target, report.floor.iter().chain(&report.series))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an OMB workload (`bench run`, `bench catchup`) and reports it.
#[allow(clippy::too_many_arguments)]
async fn bench_run(
    tool: &str,
    workload: weir::bench::omb::Workload,
    workload_dir: &Path,
    test: Duration,
    warmup: Duration,
    report_seconds: u64,
    backlog_bytes: u64,
    run: RunArgs,
) -> anyhow::Result<ExitCode> {
    use weir::bench::{SECONDS_MAX, floor, report, workload as runner};
    anyhow::ensure!(
        (1..=SECONDS_MAX).contains(&report_seconds) && run.floor_seconds <= SECONDS_MAX,
        "--report-seconds must be between 1 and {SECONDS_MAX}, --floor-seconds at most {SECONDS_MAX}"
    );
    anyhow::ensure!(!test.is_zero(), "the test must last at least a second");
    anyhow::ensure!(run.consumer_window > 0, "--consumer-window must be at least 1");
    if backlog_bytes > 0 {
        anyhow::ensure!(workload.producer_rate > 0, "a backlog needs a producerRate above 0");
        anyhow::ensure!(workload.consumer_count() > 0, "a backlog needs consumers to drain it");
    }
    let (payloads, payload_source) = runner::payloads(&workload, workload_dir)?;
    let floor_rate = match workload.producer_rate {
        0 => 1000,
        rate => (rate / workload.producer_count()).clamp(1, 1000),
    };
    let floor = if run.floor_seconds > 0 {
        let size = workload.message_size;
        let count = floor_rate * run.floor_seconds;
        Some(tokio::task::spawn_blocking(move || floor::measure(size, floor_rate, count)).await??)
    } else {
        None
    };
    let label = run.target.label.clone();
    let target = bench_target(run.target).await?;
    let header = report::Header {
        tool: tool.to_owned(),
        target: label.clone().unwrap_or_else(|| target.describe()),
        workload: format!(
            "{}: {} topics x {} partitions, {} B, {} producers/topic at {} msg/s in all{}, {} subscriptions x {} consumers/topic, keys {:?}; payloads: {payload_source}; test {} s, report every {report_seconds} s",
            workload.name,
            workload.topics,
            workload.partitions_per_topic,
            workload.message_size,
            workload.producers_per_topic,
            workload.producer_rate,
            if workload.producer_rate == 0 { " (0: as fast as the windows allow)" } else { "" },
            workload.subscriptions_per_topic,
            workload.consumer_per_subscription,
            workload.key_distributor,
            test.as_secs(),
        ),
        warmup_seconds: warmup.as_secs_f64(),
        machine: report::Machine::this(),
    };
    let windows = format!(
        "{}; {} unacknowledged per consumer (per partition for weir, at most what the broker grants)",
        target.windows().await?,
        run.consumer_window
    );
    outln!("{} against {}", header.tool, header.target);
    outln!("workload: {}", header.workload);
    outln!("windows: {windows}");
    if backlog_bytes > 0 {
        outln!("backlog: {backlog_bytes} bytes published before the consumers start, then drained");
    }
    let unused = workload.unused_fields();
    if !unused.is_empty() {
        outln!("not implemented, ignored: {}", unused.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    let options = runner::RunOptions {
        test,
        warmup,
        report_interval: Duration::from_secs(report_seconds),
        backlog_bytes,
        consumer_window: run.consumer_window,
        payloads,
    };
    let outcome = runner::run(&*target, &workload, &options).await;
    target.stop().await?;
    let mut outcome = outcome?;
    let mut series = vec![
        outcome.publish.summary(),
        outcome.end_to_end.summary(),
        outcome.publish_delay.summary(),
        outcome.publish_from_send.summary(),
        outcome.end_to_end_from_send.summary(),
    ];
    if let Some(drain) = &outcome.drain {
        series.push(drain.publish.clone());
        series.push(drain.end_to_end.clone());
    }
    let table =
        report::Report { header: header.clone(), floor: floor.iter().map(|series| series.summary()).collect(), series };
    out!("{}", report::table(&table));
    let totals = outcome.totals.clone();
    outln!(
        "messages: {} acknowledged, {} failed, {} due and never sent; {} read over {} subscriptions per topic, {} redelivered, {} unread at the end",
        totals.acknowledged,
        totals.failed,
        totals.due_not_sent,
        totals.read,
        workload.subscriptions_per_topic,
        totals.redelivered,
        totals.unread
    );
    if let Some(failure) = &totals.first_failure {
        outln!("first failed publish: {failure}");
    }
    if let Some(drain) = &outcome.drain {
        outln!(
            "backlog: {} messages built in {:.1} s, drained in {:.1} s at {:.0} msg/s / {:.1} MB/s while publishing went on",
            drain.backlog_messages,
            drain.build_seconds,
            drain.drain_seconds,
            drain.drain_messages_per_second,
            drain.drain_megabytes_per_second
        );
    }
    outcome.result.driver = header.target.clone();
    outcome.result.weir = Some(serde_json::json!({
        "header": header,
        "windows": windows,
        "floor": table.floor,
        "floor_rate_per_second": floor_rate,
        "drain": outcome.drain,
        "totals": totals,
        "unused_workload_fields": unused,
        "series": table.series,
        "latency_note": "OMB's fields (publishLatency*, endToEndLatency*) run from each message's actual send, as OMB's do; \
            weir.series gives publish and end-to-end latency from the intended send time (coordinated omission corrected), \
            and publish delay (intended to actual send)",
    }));
    run.output.write_json(&outcome.result)?;
    if let Some(stem) = &run.output.chart {
        // The floor and the coordinated-omission-corrected series.
        let latencies = table.floor.iter().chain(&table.series[..2]).chain(&table.series[5..]);
        write_chart(stem, &workload.name, &header.target, latencies)?;
    }
    let all = [
        &outcome.publish,
        &outcome.end_to_end,
        &outcome.publish_delay,
        &outcome.publish_from_send,
        &outcome.end_to_end_from_send,
    ];
    run.output.write_hgrms(floor.iter().chain(all))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the percentile chart of `series` as `STEM.svg` and `STEM.png`.
fn write_chart<'a>(
    stem: &Path,
    title: &str,
    target: &str,
    series: impl Iterator<Item = &'a weir::bench::recorder::Summary>,
) -> anyhow::Result<()> {
    let curves: Vec<_> = series
        .map(|summary| {
            let label = if summary.name.starts_with("floor") {
                summary.name.clone()
            } else {
                format!("{target}: {}", summary.name)
            };
            weir::bench::chart::Curve { label, points: summary.distribution_ms.clone() }
        })
        .collect();
    for extension in ["svg", "png"] {
        weir::bench::chart::draw(&curves, title, &stem.with_extension(extension))?;
    }
    Ok(())
}

/// Refuses sizes, rates and durations outside the bench's bounds with a
/// message naming the option, before anything is started.
fn check_bench_bounds(sizes: &[usize], rate: u64, seconds: &[u64]) -> anyhow::Result<()> {
    use weir::bench::{MESSAGE_BYTES_MAX, RATE_PER_SECOND_MAX, SECONDS_MAX};
    anyhow::ensure!(
        !sizes.is_empty() && sizes.iter().all(|&size| (1..=MESSAGE_BYTES_MAX).contains(&size)),
        "--sizes must be between 1 and {MESSAGE_BYTES_MAX} bytes"
    );
    anyhow::ensure!((1..=RATE_PER_SECOND_MAX).contains(&rate), "--rate must be between 1 and {RATE_PER_SECOND_MAX}");
    anyhow::ensure!(
        seconds.iter().all(|&value| value <= SECONDS_MAX),
        "durations (--seconds, --warmup-seconds, --floor-seconds) must be at most {SECONDS_MAX}"
    );
    anyhow::ensure!(seconds.first().is_none_or(|&first| first > 0), "--seconds must be at least 1");
    Ok(())
}

/// The broker a `weir bench` command drives.
async fn bench_target(target: TargetArgs) -> anyhow::Result<Box<dyn weir::bench::driver::Driver>> {
    use weir::bench::driver::WeirTarget;
    let connect = ConnectOptions {
        client_name: String::new(),
        auth_token: target.token,
        tls: target.tls_ca.map(|ca| ClientTlsOptions { ca: Some(ca), ..ClientTlsOptions::default() }),
    };
    let (target_cluster, target_replication) = (target.cluster.clone(), target.replication_factor);
    Ok(match (target.driver, target.addr) {
        (DriverArg::Nats, _) => Box::new(weir::bench::nats::NatsTarget::connect(&target.url).await?),
        (DriverArg::Null, _) => Box::new(weir::bench::null::NullTarget::new()),
        (DriverArg::Weir, Some(addr)) => {
            let target = WeirTarget::at(&addr).with_connect_options(connect);
            match &target_cluster {
                Some(cluster) => Box::new(target.replicated(cluster, target_replication)),
                None => Box::new(target),
            }
        }
        (DriverArg::Weir, None) => Box::new(WeirTarget::embedded(target.fsync.into()).await?),
    })
}

async fn bench_throughput(
    options: weir::bench::throughput::ThroughputOptions,
    target: Box<dyn weir::bench::driver::Driver>,
    label: Option<String>,
    json: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    use weir::bench::{report, throughput};
    let windows = format!(
        "{}; {} unacknowledged (consumer, at most what the broker grants)",
        target.windows().await?,
        options.subscriber_window
    );
    let results = throughput::run(&*target, &options).await?;
    let report = throughput::ThroughputReport {
        header: report::Header {
            tool: "weir bench throughput".into(),
            target: label.clone().unwrap_or_else(|| target.describe()),
            workload: format!(
                "{} messages per size (at most {} bytes each), sizes {:?} B, one publisher, acks awaited",
                options.messages, options.bytes_max, options.sizes
            ),
            warmup_seconds: 0.0,
            machine: report::Machine::this(),
        },
        windows,
        results,
    };
    target.stop().await?;
    out!("{}", throughput::report_table(&report));
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn groups(broker: BrokerArgs, channel: Option<String>) -> anyhow::Result<ExitCode> {
    let connection = broker.connect().await?;
    if connection.protocol_version() < 2 {
        bail!("the broker speaks protocol version 1, which has no consumer groups");
    }
    let request = Request::ListGroups { channel: channel.unwrap_or_default() };
    let Response::Groups { groups } = connection.request(request).await? else {
        bail!("unexpected answer to LIST_GROUPS");
    };
    for group in groups {
        outln!(
            "group {} on {}: {} members, generation {}",
            group.name,
            group.channel,
            group.member_count,
            group.generation
        );
        outln!("    {:>9} {:>8} {:>12} {:>12}", "PARTITION", "MEMBER", "COMMITTED", "LAG");
        for partition in group.partitions {
            let owner = partition.owner.map_or_else(|| "-".to_owned(), |member| member.to_string());
            let committed = partition.committed.map_or_else(|| "-".to_owned(), |offset| offset.to_string());
            outln!("    {:>9} {:>8} {:>12} {:>12}", partition.partition, owner, committed, partition.lag);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn metadata(broker: BrokerArgs, channel: Option<String>) -> anyhow::Result<ExitCode> {
    let connection = broker.connect().await?;
    let metadata = weir::client::Metadata::fetch(&connection, channel.as_deref().unwrap_or_default()).await?;
    if metadata.clustered {
        outln!("node {} of a cluster of {}:", metadata.node_id, metadata.nodes.len());
    } else {
        outln!("a single node (not in cluster mode):");
    }
    for node in &metadata.nodes {
        outln!("    node {} at {}", node.node_id, node.client_addr);
    }
    outln!("{:<32} {:>10} {:>6} {:>8} {:<20} REPLICAS", "CHANNEL", "PARTITION", "RF", "LEADER", "LEADER ADDRESS");
    for channel in &metadata.channels {
        for (partition, placed) in channel.partitions.iter().enumerate() {
            let leader = placed.leader.map_or_else(|| "-".to_owned(), |node| node.to_string());
            let address = placed.leader.and_then(|node| metadata.client_addr(node)).unwrap_or("-");
            let replicas: Vec<String> = placed.replicas.iter().map(u64::to_string).collect();
            outln!(
                "{:<32} {:>10} {:>6} {:>8} {:<20} {}",
                channel.name,
                partition,
                channel.replication_factor,
                leader,
                address,
                replicas.join(",")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn channels(broker: BrokerArgs) -> anyhow::Result<ExitCode> {
    let connection = broker.connect().await?;
    let Response::Channels { channels } = connection.request(Request::ListChannels).await? else {
        bail!("unexpected answer to LIST_CHANNELS");
    };
    outln!(
        "{:<32} {:>10} {:>12} {:>12} {:>12} {:>14} {:>8}",
        "CHANNEL",
        "PARTITION",
        "START",
        "NEXT",
        "MESSAGES",
        "BYTES",
        "SEGMENTS"
    );
    for channel in channels {
        for (partition, info) in channel.partitions.iter().enumerate() {
            outln!(
                "{:<32} {:>10} {:>12} {:>12} {:>12} {:>14} {:>8}",
                channel.name,
                partition,
                info.start_offset,
                info.next_offset,
                info.next_offset - info.start_offset,
                info.size_bytes,
                info.segment_count
            );
        }
        for subscription in channel.subscriptions {
            let name = match (subscription.durable_name.is_empty(), subscription.group.is_empty()) {
                (_, false) => format!("(group {})", subscription.group),
                (true, true) => "(ephemeral)".to_owned(),
                (false, true) => subscription.durable_name,
            };
            let acked = subscription.acked_offset.map_or_else(|| "-".to_owned(), |offset| offset.to_string());
            outln!(
                "    subscription {name} partition {}: next {} acked {acked} lag {}",
                subscription.partition,
                subscription.next_offset,
                subscription.lag
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(broker: BrokerArgs, interval_ms: u64) -> anyhow::Result<ExitCode> {
    let connection = broker.connect().await?;
    let sample = || async {
        match connection.request(Request::Stats).await? {
            Response::Stats { counters, channels } => anyhow::Ok((std::time::Instant::now(), counters, channels)),
            other => bail!("unexpected answer to STATS: {other:?}"),
        }
    };
    let (first_at, _, first_channels) = sample().await?;
    tokio::time::sleep(Duration::from_millis(interval_ms.max(1))).await;
    let (second_at, counters, channels) = sample().await?;
    let seconds = second_at.duration_since(first_at).as_secs_f64();
    for (name, value) in &counters {
        outln!("{name:<44} {value}");
    }
    outln!();
    outln!("{:<32} {:>12} {:>12} {:>12} {:>14}", "CHANNEL", "MSG/S", "MB/S", "NEXT", "BYTES");
    for channel in &channels {
        let before = first_channels.iter().find(|c| c.name == channel.name);
        let messages =
            channel.messages_appended - before.map_or(0, |c| c.messages_appended.min(channel.messages_appended));
        let bytes = channel.bytes_appended - before.map_or(0, |c| c.bytes_appended.min(channel.bytes_appended));
        outln!(
            "{:<32} {:>12.0} {:>12.2} {:>12} {:>14}",
            channel.name,
            messages as f64 / seconds,
            bytes as f64 / seconds / 1e6,
            channel.next_offset,
            channel.size_bytes
        );
        for subscription in &channel.subscriptions {
            let name = if subscription.durable_name.is_empty() { "(ephemeral)" } else { &subscription.durable_name };
            outln!("    subscription {name}: lag {} in flight {}", subscription.lag, subscription.inflight);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(data_dir: &Path, config: Option<&Path>, fsync: Option<FsyncPolicy>) -> anyhow::Result<ExitCode> {
    use weir::storage::check::{FsyncPolicies, Severity, Verdict};
    let policies = match (fsync, config) {
        (Some(policy), _) => FsyncPolicies::all(policy),
        (None, Some(path)) => {
            let config = Config::load(Some(path))?;
            FsyncPolicies {
                default: config.fsync,
                channels: config
                    .channels
                    .iter()
                    .filter_map(|(name, overrides)| Some((name.clone(), overrides.fsync?)))
                    .collect(),
            }
        }
        (None, None) => FsyncPolicies::all(FsyncPolicy::Always),
    };
    let report = weir::storage::check::check_data_dir(data_dir, &policies)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", data_dir.display()))?;
    for problem in &report.problems {
        outln!("{problem}");
    }
    let summary = format!(
        "{} channels, {} segments, {} records, {} bytes",
        report.channels, report.segments, report.records, report.bytes
    );
    let (repairable, corrupt) = (report.count(Severity::Repairable), report.count(Severity::Corrupt));
    match report.verdict() {
        Verdict::Clean => {
            outln!("ok: {summary}");
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Repairable => {
            outln!(
                "repairable: {summary}; {repairable} problems the broker repairs on start (torn tails cut, indexes rebuilt), nothing acknowledged is affected"
            );
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Corrupt => {
            outln!("corrupt: {summary}; {corrupt} corrupt and {repairable} repairable problems");
            Ok(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own checks of the whole command line (unique names, valid
    /// requirements): they run only in debug builds, at parse time, so a
    /// clash would otherwise surface as a panic in front of a user.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
