//! Clusters of real `weir serve` processes on 127.0.0.1 for the cluster
//! tests: ports, node configurations, processes killed when dropped, and
//! the `weir cluster` command.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_rustls::TlsConnector;
use weir::cluster::{ClusterStatus, NodeReply, NodeRequest, PeerClient};

use super::proxy::Proxy;

/// Raft timing of the test clusters: short, so that a failover takes about
/// a second, and far above what a loaded 2-core machine delays a heartbeat.
pub const HEARTBEAT_MS: u64 = 100;
pub const ELECTION_MIN_MS: u64 = 500;
pub const ELECTION_MAX_MS: u64 = 1000;
/// Generous bound for anything the cluster must reach (an election, a
/// restarted node catching up): events are polled, never slept for.
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Ports this test binary hands out: below Linux's ephemeral range (32768
/// up), so that no outgoing connection (the nodes make many) can take one
/// between its choice and the node's bind, or while a killed node is down;
/// each handed out once per process, from a base that differs by process.
pub const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free port of [`PORTS`] on `ip`.
pub fn free_port_on(ip: &str) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    let base = std::process::id() % span;
    loop {
        let offset = (base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % span;
        let port = PORTS.start + offset as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

#[derive(Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub client_addr: String,
    /// Where the others reach it (its listener, or a proxy in front).
    pub cluster_addr: String,
    /// Its cluster listener.
    pub cluster_listen: String,
    /// Its Prometheus endpoint, or "" for none.
    pub metrics_addr: String,
}

/// A `weir serve` of one node, killed when dropped.
pub struct Node {
    pub spec: NodeSpec,
    pub config: PathBuf,
    pub process: Option<Child>,
    /// How the test reaches its cluster listener.
    pub tls: Option<TlsConnector>,
}

impl Node {
    pub fn start(&mut self) {
        assert!(self.process.is_none());
        let log = std::fs::File::create(self.config.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["serve", "--config", self.config.to_str().unwrap()])
            // WEIR_TEST_NODE_LOG=info (a tracing filter): more of the
            // nodes' logs, for debugging a failure.
            .env("RUST_LOG", std::env::var("WEIR_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.process = Some(child);
    }

    /// Its id, whether its process runs, and the end of its log.
    pub fn describe(&self) -> String {
        let log = std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let running = self.process.as_ref().map(|child| child.id());
        format!("node {} (pid {running:?}) at {}; its log ends: {tail:#?}", self.spec.id, self.spec.cluster_addr)
    }

    /// SIGSTOP or SIGCONT.
    pub fn signal(&self, name: &str) {
        let pid = self.process.as_ref().unwrap().id();
        let sent = Command::new("kill").args([format!("-{name}"), pid.to_string()]).status().unwrap();
        assert!(sent.success(), "kill -{name} {pid} failed");
    }

    /// SIGTERM, then waits for the process to exit (at most
    /// [`CONVERGE_LIMIT`]); returns whether it exited with success.
    pub async fn stop_gracefully(&mut self) -> bool {
        self.signal("TERM");
        let mut child = self.process.take().unwrap();
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if started.elapsed() > CONVERGE_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {} did not stop after SIGTERM", self.spec.id);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the configuration of node `spec` whose initial voters are
/// `initial`, under `dir`, with `extra` lines in its `[cluster]` table.
pub fn configure(dir: &Path, spec: NodeSpec, initial: &[&NodeSpec], extra: &str) -> Node {
    // WEIR_CLUSTER_DEFAULT_TIMEOUTS=1: broker.toml's defaults instead (a
    // failover measured as a user would see it; tests then take longer).
    let timing = if std::env::var_os("WEIR_CLUSTER_DEFAULT_TIMEOUTS").is_some() {
        None
    } else {
        Some((HEARTBEAT_MS, ELECTION_MIN_MS, ELECTION_MAX_MS))
    };
    configure_timed(dir, spec, initial, extra, timing)
}

/// [`configure`] with `timing` (heartbeat, least and greatest election
/// timeout, in ms), or broker.toml's defaults for `None`.
pub fn configure_timed(
    dir: &Path,
    spec: NodeSpec,
    initial: &[&NodeSpec],
    extra: &str,
    timing: Option<(u64, u64, u64)>,
) -> Node {
    let timing = timing.map_or_else(String::new, |(heartbeat, least, greatest)| {
        format!(
            "heartbeat_interval_ms = {heartbeat}\nelection_timeout_min_ms = {least}\n\
             election_timeout_max_ms = {greatest}\n"
        )
    });
    let mut text = format!(
        "listen_addr = \"{}\"\nmetrics_addr = \"{}\"\ndata_dir = \"{}\"\n[cluster]\nnode_id = {}\nlisten_addr = \"{}\"\n\
         {timing}{extra}",
        spec.client_addr,
        spec.metrics_addr,
        dir.join(format!("node{}", spec.id)).display(),
        spec.id,
        spec.cluster_listen
    );
    for node in initial {
        text.push_str(&format!(
            "[[cluster.nodes]]\nid = {}\ncluster_addr = \"{}\"\nclient_addr = \"{}\"\n",
            node.id, node.cluster_addr, node.client_addr
        ));
    }
    let config = dir.join(format!("node{}.toml", spec.id));
    std::fs::write(&config, text).unwrap();
    Node { spec, config, process: None, tls: None }
}

pub fn spec(id: u64) -> NodeSpec {
    let cluster_addr = format!("127.0.0.1:{}", free_port());
    NodeSpec {
        id,
        client_addr: format!("127.0.0.1:{}", free_port()),
        cluster_listen: cluster_addr.clone(),
        cluster_addr,
        metrics_addr: String::new(),
    }
}

/// The node's status, or `None` when it does not answer within 5 s.
pub async fn status(node: &Node) -> Option<ClusterStatus> {
    let mut client = PeerClient::new(node.spec.cluster_addr.clone(), node.tls.clone());
    match client.call(&NodeRequest::Status, Duration::from_secs(5)).await {
        Ok(NodeReply::Status(status)) => Some(*status),
        _ => None,
    }
}

/// Configures and starts a node of id `id` (a cluster whose initial
/// voters are `initial`), and waits until its cluster listener answers.
pub async fn start_another(dir: &Path, id: u64, initial: &[&NodeSpec]) -> Node {
    let mut node = configure(dir, spec(id), initial, "");
    node.start();
    let started = std::time::Instant::now();
    while status(&node).await.is_none() {
        assert!(started.elapsed() < CONVERGE_LIMIT, "node {id} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node
}

/// Runs `weir cluster ARGS`, which must fail; returns its stderr.
pub fn weir_cluster_fails(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_weir")).arg("cluster").args(args).output().unwrap();
    assert!(!output.status.success(), "weir cluster {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn weir_cluster(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_weir")).arg("cluster").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "weir cluster {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Three nodes as [`three_nodes`] makes them, with Raft `timing`
/// (heartbeat, least and greatest election timeout, in ms).
pub fn three_nodes_timed(dir: &Path, timing: (u64, u64, u64)) -> Vec<Node> {
    let specs = [spec(1), spec(2), spec(3)];
    let initial: Vec<&NodeSpec> = specs.iter().collect();
    specs.iter().map(|s| configure_timed(dir, s.clone(), &initial, "", Some(timing))).collect()
}

/// Three nodes, configured in `dir` as the initial voters of one cluster
/// (not started); with a Prometheus endpoint each when `metrics`.
pub fn three_nodes(dir: &Path, metrics: bool) -> Vec<Node> {
    let specs = [spec(1), spec(2), spec(3)].map(|mut spec| {
        if metrics {
            spec.metrics_addr = format!("127.0.0.1:{}", free_port());
        }
        spec
    });
    let initial: Vec<&NodeSpec> = specs.iter().collect();
    specs.iter().map(|s| configure(dir, s.clone(), &initial, "")).collect()
}

/// The loopback address node `id` of a proxied cluster calls from:
/// 127.0.0.(`first_ip` + `id`).
pub fn proxied_source(first_ip: u8, id: u64) -> std::net::IpAddr {
    format!("127.0.0.{}", u64::from(first_ip) + id).parse().unwrap()
}

/// Three nodes configured in `dir` as one cluster (not started), each
/// calling from its own loopback address ([`proxied_source`]) and reached
/// by the others through a fault-injecting proxy in front of its cluster
/// listener; the proxies in node order; a Prometheus endpoint each when
/// `metrics`.
pub async fn three_proxied_nodes(dir: &Path, first_ip: u8, metrics: bool) -> (Vec<Node>, Vec<Proxy>) {
    let mut specs = Vec::new();
    let mut proxies = Vec::new();
    for id in 1..=3u64 {
        let ip = proxied_source(first_ip, id).to_string();
        let listen: std::net::SocketAddr = format!("{ip}:{}", free_port_on(&ip)).parse().unwrap();
        let proxy = Proxy::start(listen).await;
        specs.push(NodeSpec {
            id,
            client_addr: format!("127.0.0.1:{}", free_port()),
            cluster_addr: proxy.addr.to_string(),
            cluster_listen: listen.to_string(),
            metrics_addr: if metrics { format!("127.0.0.1:{}", free_port()) } else { String::new() },
        });
        proxies.push(proxy);
    }
    let initial: Vec<&NodeSpec> = specs.iter().collect();
    let nodes = specs.iter().map(|s| configure(dir, s.clone(), &initial, "")).collect();
    (nodes, proxies)
}

/// Cuts node `cut` of a proxied cluster off from the others, both ways
/// (the test itself, calling from 127.0.0.1, still reaches every node).
pub fn cut_off(proxies: &[Proxy], first_ip: u8, cut: u64) {
    let others: Vec<std::net::IpAddr> =
        (1..=3).filter(|&id| id != cut).map(|id| proxied_source(first_ip, id)).collect();
    for (index, proxy) in proxies.iter().enumerate() {
        let id = index as u64 + 1;
        if id == cut {
            proxy.block_only(&others);
        } else {
            proxy.block_only(&[proxied_source(first_ip, cut)]);
        }
    }
}

/// Heals every cut.
pub fn heal(proxies: &[Proxy]) {
    for proxy in proxies {
        proxy.block_only(&[]);
    }
}
