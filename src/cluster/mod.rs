//! Cluster mode (docs/REPLICATION.md): the nodes of a weir cluster, agreed
//! on by a metadata Raft group (openraft), and the node-to-node listener
//! it talks over.
//!
//! Built so far: membership (bootstrap from `[cluster] nodes`, adding and
//! removing nodes by joint consensus), elections and failover of the
//! metadata group, replicated channels (a Raft group per partition, its
//! Raft log in redb and its state machine the partition's log; publishes
//! through the leader), `weir cluster status`, and the Raft metrics
//! (docs/REPLICATION.md, "What is built"). Channels created with
//! CREATE_CHANNEL are still each node's own.
//!
//! openraft is used only inside this module, so that its API changes
//! between pinned versions touch nothing else.

mod dedup;
mod handover;
mod incarnation;
mod listener;
pub mod partition;
mod raft_log;
mod replicas;
mod status;
mod store;
mod transport;
mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use listener::REPLICATION_FACTORS;
pub use replicas::{
    AdminError, ClusterMetadata, HostedPartition, PARTITION_RAFT_LOG_KEPT, PARTITION_SNAPSHOT_ENTRIES, PartitionHost,
    Publish, PublishAnswer, PublishApplied, PublishRefused, PublishResult, REPLICATED_PARTITIONS_MAX, Replicas,
    ReplicatedPublishError,
};
pub use status::{ClusterStatus, MemberStatus, PartitionStatus};
pub use transport::{
    ADMIN_TIMEOUT, CLUSTER_FRAME_BYTES_MAX, GroupId, NodeReply, NodeRequest, PeerClient, TransportError,
};
pub use types::{NodeAddrs, NodeId};
pub use types::{POSITIONS_PER_COMMAND_MAX, REPLICATED_POSITIONS_MAX, ReplicatedPosition};

use crate::config::ClusterConfig;
use types::Raft;

/// Most entries one append to a follower carries.
pub const METADATA_APPEND_ENTRIES_MAX: u64 = 64;

/// The metadata group snapshots itself every this many entries and keeps
/// no entry a snapshot holds: its snapshot is small (the membership, the
/// replicated channels and their leaders: kilobytes; with positions, at
/// most `REPLICATED_POSITIONS_MAX` of a few hundred bytes each, a few
/// MB), so a follower that fell behind gets it whole rather than the
/// entries (and the snapshot path is exercised, not a rarity). The cost:
/// with positions written by every node once a second, a snapshot of up
/// to that size every few seconds.
pub const METADATA_SNAPSHOT_ENTRIES: u64 = 4;

/// Entries one append to a partition's follower carries: as many
/// publishes of `max_publish_bytes` as fit a frame, with room for the
/// request's own fields, and at least one (a publish alone always fits:
/// `max_publish_bytes` is checked against the frame limit at start).
fn partition_append_entries_max(max_publish_bytes: u64) -> u64 {
    let room = (CLUSTER_FRAME_BYTES_MAX - CLUSTER_FRAME_ROOM_BYTES) as u64;
    (room / max_publish_bytes.max(1)).clamp(1, METADATA_APPEND_ENTRIES_MAX)
}

/// What a node-to-node frame keeps beside its entries' messages: the
/// request's fields and each entry's and message's own.
pub const CLUSTER_FRAME_ROOM_BYTES: usize = 1024 * 1024;

/// How long a node-to-node TLS handshake may take.
pub const CLUSTER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the cluster listener serves at once (peers and `weir
/// cluster` commands); more wait in the kernel's accept queue.
pub const CLUSTER_CONNECTIONS_MAX: usize = 256;

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("cannot open the cluster's metadata store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for cluster traffic on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid cluster settings: {0}")]
    Settings(String),
    #[error("cluster TLS: {0}")]
    Tls(#[from] crate::security::tls::TlsError),
    #[error("the metadata group failed: {0}")]
    Raft(String),
}

/// This node's part of the cluster: its metadata group member and the
/// listener other nodes reach it on.
pub struct ClusterNode {
    raft: Raft,
    replicas: Arc<Replicas>,
    node_id: NodeId,
    listen_addr: SocketAddr,
    /// A leadership hand-over's round and limit (`hand_over_leadership`).
    handover_timing: (Duration, Duration),
    connections: TaskTracker,
    stop: CancellationToken,
}

impl ClusterNode {
    /// Opens the metadata store under `data_dir/cluster`, binds the cluster
    /// listener and joins the metadata group. A brand-new cluster is
    /// initialised by the node of lowest id among `[cluster] nodes`; every
    /// later start reads its state from disk.
    ///
    /// # Errors
    /// The store cannot be opened, the address cannot be bound, or openraft
    /// refuses the settings.
    pub async fn start(
        settings: &ClusterConfig,
        data_dir: &Path,
        max_publish_bytes: u64,
    ) -> Result<ClusterNode, ClusterError> {
        let dir = data_dir.join("cluster");
        let path = dir.join("metadata.redb");
        let store_error = |source| ClusterError::Store { path: path.display().to_string(), source };
        let opened = {
            let (dir, path) = (dir.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                store::open(&path)
            })
            .await
            .map_err(|error| ClusterError::Raft(error.to_string()))?
        };
        let (log_store, state_machine) = opened.map_err(store_error)?;
        let raft_config = openraft::Config {
            cluster_name: "weir-metadata".into(),
            heartbeat_interval: settings.heartbeat_interval_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            // Bounds an append's frame: metadata entries are small (a
            // membership of CLUSTER_NODES_MAX nodes is a few KiB; positions,
            // at most 1,024 of at most 530 bytes, under 600 KB): 64 of
            // them fit CLUSTER_FRAME_BYTES_MAX.
            max_payload_entries: METADATA_APPEND_ENTRIES_MAX,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(METADATA_SNAPSHOT_ENTRIES),
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .map_err(|error| ClusterError::Settings(error.to_string()))?;
        let (acceptor, connector) = match settings.tls_files() {
            Some((cert, key, ca)) => {
                let (acceptor, connector) = tls(cert, key, ca)?;
                (Some(acceptor), Some(connector))
            }
            None => {
                tracing::warn!(
                    "the cluster listener has no TLS ([cluster] tls_cert, tls_key, tls_ca): anyone who reaches it can take part in the cluster; keep it on a private network"
                );
                (None, None)
            }
        };
        let node_id = settings.node_id;
        // Calls to the other nodes leave from the cluster listener's address
        // when it names one, so they see (and a firewall can tell) who calls.
        let source_ip =
            settings.listen_addr.parse::<SocketAddr>().ok().map(|addr| addr.ip()).filter(|ip| !ip.is_unspecified());
        let network = transport::PeerNetwork { tls: connector.clone(), source_ip };
        // Bound before the group starts, so that a port in use stops the
        // start with nothing running.
        let listener = TcpListener::bind(&settings.listen_addr)
            .await
            .map_err(|source| ClusterError::Bind { addr: settings.listen_addr.clone(), source })?;
        let listen_addr = listener
            .local_addr()
            .map_err(|source| ClusterError::Bind { addr: settings.listen_addr.clone(), source })?;
        let channels = state_machine.subscribe();
        let stop = CancellationToken::new();
        let raft = Raft::new(node_id, Arc::new(raft_config), network, log_store, state_machine)
            .await
            .map_err(|error| ClusterError::Raft(error.to_string()))?;
        status::metrics_loaded::<types::TypeConfig>(raft.metrics()).await;
        let replicas = Arc::new(Replicas::new(
            data_dir.to_path_buf(),
            settings,
            (connector, source_ip),
            raft.clone(),
            channels,
            partition_append_entries_max(max_publish_bytes),
            stop.clone(),
        )?);
        let handover_timing = (
            Duration::from_millis(settings.election_timeout_min_ms),
            Duration::from_millis(settings.election_timeout_max_ms),
        );
        let node = ClusterNode {
            raft,
            replicas,
            node_id,
            listen_addr,
            handover_timing,
            connections: TaskTracker::new(),
            stop,
        };
        let served = listener::Served {
            raft: node.raft.clone(),
            replicas: Arc::clone(&node.replicas),
            frame_budget: Arc::new(tokio::sync::Semaphore::new(listener::CLUSTER_FRAME_BUDGET_BYTES / 1024)),
            admin: Arc::new(tokio::sync::Mutex::new(())),
        };
        tokio::spawn(listener::accept(listener, acceptor, served, node.connections.clone(), node.stop.clone()));
        let labels = vec![metrics::Label::new("group", "metadata")];
        tokio::spawn(status::watch_metrics::<types::TypeConfig>(node.raft.metrics(), labels, node.stop.clone()));
        if let Err(error) = node.bootstrap(settings).await {
            node.shutdown().await;
            return Err(error);
        }
        tracing::info!(node_id, cluster_addr = %listen_addr, "cluster node started");
        Ok(node)
    }

    async fn bootstrap(&self, settings: &ClusterConfig) -> Result<(), ClusterError> {
        let initial: BTreeMap<NodeId, NodeAddrs> = settings
            .nodes
            .iter()
            .map(|node| {
                let addrs =
                    NodeAddrs { cluster_addr: node.cluster_addr.clone(), client_addr: node.client_addr.clone() };
                (node.id, addrs)
            })
            .collect();
        let initialized = self.raft.is_initialized().await.map_err(|error| ClusterError::Raft(error.to_string()))?;
        if initialized {
            return Ok(());
        }
        // One node initialises, so that a cluster is never formed twice
        // from different lists; the others wait to hear from its leader.
        if initial.keys().next() != Some(&self.node_id) {
            tracing::info!(
                node_id = self.node_id,
                "waiting to join the cluster: the node of lowest id in [cluster] nodes initialises it, or `weir cluster add-node` adds this node"
            );
            return Ok(());
        }
        match self.raft.initialize(initial).await {
            Ok(()) => {
                tracing::info!(node_id = self.node_id, "initialised a new cluster from [cluster] nodes");
                Ok(())
            }
            // Initialised already by an earlier start: the log is not empty.
            Err(openraft::errors::RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => Ok(()),
            Err(error) => Err(ClusterError::Raft(error.to_string())),
        }
    }

    /// The address the cluster listener is bound to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's view of the metadata group and of the partitions it
    /// hosts.
    pub fn status(&self) -> ClusterStatus {
        let mut status = ClusterStatus::from_metrics(&self.raft.metrics().borrow_watched());
        status.partitions = self.replicas.statuses();
        status
    }

    /// The replicated partitions this node hosts (the publish path).
    pub fn replicas(&self) -> Arc<Replicas> {
        Arc::clone(&self.replicas)
    }

    /// Starts hosting the replicated partitions placed on this node, now
    /// and as the metadata group creates more, through `host` (the server).
    pub fn host_partitions(&self, host: Arc<dyn PartitionHost>) {
        tokio::spawn(Arc::clone(&self.replicas).follow(host));
        tokio::spawn(Arc::clone(&self.replicas).report_leadership());
    }

    /// Hands the leadership of every group this node leads (the metadata
    /// group's and its partitions') to another voter, before a graceful
    /// stop: clients then wait for one vote, not for a failover. Bounded
    /// by `election_timeout_max_ms`; asks again every
    /// `election_timeout_min_ms` while a target catches up. Then no group
    /// of this node campaigns any more. Returns whether another node may
    /// take metadata writes (this node did not keep the metadata group's
    /// leadership, which refuses them while it hands it over).
    pub async fn hand_over_leadership(&self) -> bool {
        let (round, limit) = self.handover_timing;
        let metadata = async {
            let outcome = handover::hand_over(&self.raft, self.node_id, round, limit).await;
            handover::log_outcome("metadata", outcome);
            self.raft.runtime_config().elect(false);
            outcome != handover::HandOver::TimedOut
        };
        let (writable, ()) = tokio::join!(metadata, self.replicas.hand_over_leadership(round, limit));
        writable
    }

    /// Stops serving other nodes and leaves the group (without a
    /// membership change: a stopped node is a node that is down).
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.connections.close();
        self.replicas.shutdown().await;
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "the metadata group did not stop cleanly");
        }
        self.connections.wait().await;
    }
}

/// The node's acceptor (clients must present a certificate the CA signed)
/// and connector (it presents its own).
fn tls(
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
) -> Result<(TlsAcceptor, TlsConnector), ClusterError> {
    let files =
        crate::security::tls::ServerTlsFiles { cert: cert.clone(), key: key.clone(), client_ca: Some(ca.clone()) };
    let acceptor = TlsAcceptor::from(files.load()?);
    let options = crate::security::tls::ClientTlsOptions { ca: Some(ca), cert: Some(cert), key: Some(key) };
    Ok((acceptor, options.connector()?))
}

/// Sends `request` to the node at `addr` for a `weir cluster` command,
/// following `NotLeader` answers to the leader (at most a few hops).
///
/// # Errors
/// A node cannot be reached or answers out of turn.
pub async fn admin(addr: &str, request: NodeRequest, tls: Option<TlsConnector>) -> Result<NodeReply, TransportError> {
    const LEADER_HOPS_MAX: usize = 3;
    let mut addr = addr.to_string();
    let mut hops = 0;
    loop {
        let reply = PeerClient::new(addr.clone(), tls.clone()).call(&request, ADMIN_TIMEOUT).await?;
        match reply {
            NodeReply::NotLeader { leader: Some((_, addrs)) }
                if hops < LEADER_HOPS_MAX && addrs.cluster_addr != addr =>
            {
                addr = addrs.cluster_addr;
                hops += 1;
            }
            reply => return Ok(reply),
        }
    }
}
