//! Cluster mode's metadata group, run as real `weir serve` processes on
//! 127.0.0.1: three nodes form a cluster from `[cluster] nodes`; the leader
//! is killed with SIGKILL (or paused with SIGSTOP) at seeded moments and
//! restarted (resumed), and the others elect a new one each time; a minority never elects; a fourth node is
//! added and removed with `weir cluster`. Throughout, no two nodes ever
//! report different leaders for the same term, and no node's term goes
//! back.
//!
//! A third test cuts the leader off from the others through proxies.
//!
//! `WEIR_CLUSTER_KILLS` (default 10) sets the number of leader kills and
//! `WEIR_CLUSTER_SEED` (default 1) the seed; a failure prints the seed.
//! The checker here is over elections and membership; replicated data is
//! checked by `tests/replication.rs`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::authority::Authority;
use common::cluster::{
    CONVERGE_LIMIT, ELECTION_MAX_MS, Node, NodeSpec, configure, cut_off, env_or, free_port, heal, spec, start_another,
    status, three_proxied_nodes, weir_cluster, weir_cluster_fails,
};
use common::prometheus::{sample, scrape};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use weir::client::ClientTlsOptions;
use weir::cluster::{ClusterStatus, NodeReply, NodeRequest, PeerClient};

/// What every status seen so far said: the leader of each term (one at
/// most) and each node's highest term.
#[derive(Default)]
struct History {
    leaders: BTreeMap<u64, u64>,
    terms: BTreeMap<u64, u64>,
}

impl History {
    fn record(&mut self, status: &ClusterStatus, seed: u64) {
        if let Some(leader) = status.leader
            && status.role != "candidate"
        {
            let known = *self.leaders.entry(status.term).or_insert(leader);
            assert_eq!(
                known, leader,
                "two leaders in term {}: {known} and {leader} (node {} says so); seed {seed}",
                status.term, status.node_id
            );
        }
        let term = self.terms.entry(status.node_id).or_default();
        assert!(
            status.term >= *term,
            "node {}'s term went back from {} to {}; seed {seed}",
            status.node_id,
            *term,
            status.term
        );
        *term = status.term;
    }
}

/// Polls the running nodes until they all follow one leader, in one term,
/// among them; returns (leader, term).
async fn agreed_leader(nodes: &[&Node], history: &mut History, seed: u64) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        let mut silent = Vec::new();
        for node in nodes {
            match status(node).await {
                Some(status) => {
                    history.record(&status, seed);
                    seen.push((status.leader, status.term, status.committed_index == status.last_log_index));
                }
                None => silent.push(node),
            }
        }
        if seen.len() == nodes.len()
            && let Some((Some(leader), term, _)) = seen.first().copied()
            && seen
                .iter()
                .all(|&(other, other_term, caught_up)| other == Some(leader) && other_term == term && caught_up)
            && nodes.iter().any(|node| node.spec.id == leader)
        {
            return (leader, term);
        }
        if started.elapsed() >= CONVERGE_LIMIT {
            let silent: Vec<String> = silent.iter().map(|node| node.describe()).collect();
            panic!(
                "the nodes did not agree on a leader within {CONVERGE_LIMIT:?}: {seen:?}; not answering: {silent:#?}; seed {seed}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_fail_over_minorities_never_elect_and_nodes_join_and_leave() {
    let seed = env_or("WEIR_CLUSTER_SEED", 1);
    let kills = env_or("WEIR_CLUSTER_KILLS", 10);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec(1), spec(2), spec(3)];
    let initial: Vec<&NodeSpec> = specs.iter().collect();
    let mut nodes: Vec<Node> = specs.iter().map(|s| configure(dir.path(), s.clone(), &initial, "")).collect();
    // Started in a seeded order: whichever comes first, node 1 initialises.
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for &i in &order {
        nodes[i].start();
    }
    let mut history = History::default();
    let (mut leader, mut term) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, seed).await;

    // The leader killed (or, one round in three, paused) at a seeded
    // moment; the others elect; it comes back (is resumed) and follows.
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..ELECTION_MAX_MS))).await;
        let index = nodes.iter().position(|node| node.spec.id == leader).unwrap();
        let pause = rng.random_range(0..3) == 0;
        if pause {
            nodes[index].signal("STOP");
        } else {
            nodes[index].kill();
        }
        let others: Vec<&Node> = nodes
            .iter()
            .enumerate()
            .filter(|&(i, node)| i != index && node.process.is_some())
            .map(|(_, n)| n)
            .collect();
        let (new_leader, new_term) = agreed_leader(&others, &mut history, seed).await;
        assert!(others.iter().any(|node| node.spec.id == new_leader));
        assert!(new_term > term, "round {round}: a new leader in an old term; seed {seed}");
        if pause {
            // A deposed leader that wakes up steps down when it hears the
            // higher term.
            nodes[index].signal("CONT");
        } else {
            nodes[index].start();
        }
        (leader, term) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, seed).await;
        assert!(term >= new_term);
    }

    // A minority: two of three down, the last never leads.
    let survivor = nodes.iter().position(|node| node.spec.id != leader).unwrap();
    for (index, node) in nodes.iter_mut().enumerate() {
        if index != survivor {
            node.kill();
        }
    }
    let watched_until = Instant::now() + Duration::from_millis(3 * ELECTION_MAX_MS);
    while Instant::now() < watched_until {
        if let Some(status) = status(&nodes[survivor]).await {
            history.record(&status, seed);
            assert_ne!(status.role, "leader", "a node alone of three became leader; seed {seed}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (index, node) in nodes.iter_mut().enumerate() {
        if index != survivor {
            node.start();
        }
    }
    agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, seed).await;

    // A node that is not running cannot be added: the command fails after
    // the catch-up timeout and leaves no member behind; nor can an existing
    // id be added again, or a stranger removed.
    let absent = spec(9);
    let add_absent_as = |id: &str| {
        let addrs = ["--cluster-addr", &absent.cluster_addr, "--client-addr", &absent.client_addr];
        weir_cluster_fails(&[&["add-node", id][..], &addrs, &["--node", &nodes[0].spec.cluster_addr]].concat())
    };
    let refused = add_absent_as("9");
    assert!(refused.contains("did not catch up"), "{refused}");
    let (leader, _) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, seed).await;
    let on_leader = status(nodes.iter().find(|node| node.spec.id == leader).unwrap()).await.unwrap();
    assert!(on_leader.members.iter().all(|member| member.id != 9), "{on_leader:?}");
    let again = add_absent_as("2");
    assert!(again.contains("already a member"), "{again}");
    let stranger = weir_cluster_fails(&["remove-node", "9", "--node", &nodes[0].spec.cluster_addr]);
    assert!(stranger.contains("not a member"), "{stranger}");

    // A fourth node: not a member until added, then a voter that follows,
    // then removed. The command goes to a follower and is forwarded.
    let mut fourth = start_another(dir.path(), 4, &initial).await;
    let unjoined = status(&fourth).await.unwrap();
    assert!(unjoined.members.is_empty() && unjoined.leader.is_none(), "{unjoined:?}");
    let (leader, _) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, seed).await;
    // The leader has snapshotted and purged its log by now (every few
    // entries), so the new node can only catch up from a snapshot.
    let before = status(nodes.iter().find(|node| node.spec.id == leader).unwrap()).await.unwrap();
    assert!(before.purged_index.is_some(), "the leader kept its whole log: {before:?}");
    let follower = nodes.iter().find(|node| node.spec.id != leader).unwrap();
    let output = weir_cluster(&[
        "add-node",
        "4",
        "--cluster-addr",
        &fourth.spec.cluster_addr,
        "--client-addr",
        &fourth.spec.client_addr,
        "--node",
        &follower.spec.cluster_addr,
    ]);
    assert!(output.contains("voters now: 1, 2, 3, 4"), "{output}");
    let all: Vec<&Node> = nodes.iter().chain([&fourth]).collect();
    let (leader, _) = agreed_leader(&all, &mut history, seed).await;
    let on_leader = status(all.iter().find(|node| node.spec.id == leader).unwrap()).await.unwrap();
    let voters: Vec<u64> = on_leader.members.iter().filter(|member| member.voter).map(|member| member.id).collect();
    assert_eq!(voters, [1, 2, 3, 4]);
    let joined = status(&fourth).await.unwrap();
    assert!(joined.snapshot_index.is_some(), "node 4 caught up without a snapshot: {joined:?}");
    // Restarted, it comes back from what it stored: the installed snapshot
    // and the entries after it, membership included.
    fourth.kill();
    fourth.start();
    let all: Vec<&Node> = nodes.iter().chain([&fourth]).collect();
    agreed_leader(&all, &mut history, seed).await;
    let restarted = status(&fourth).await.unwrap();
    let voters: Vec<u64> = restarted.members.iter().filter(|member| member.voter).map(|member| member.id).collect();
    assert_eq!(voters, [1, 2, 3, 4], "node 4 after a restart: {restarted:?}");
    let printed = weir_cluster(&["status", "--node", &fourth.spec.cluster_addr]);
    assert!(printed.contains(&format!("leader: node {leader}")), "{printed}");

    let output = weir_cluster(&["remove-node", "4", "--node", &follower.spec.cluster_addr]);
    assert!(output.contains("voters now: 1, 2, 3"), "{output}");
    let (leader, _) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, seed).await;
    let on_leader = status(nodes.iter().find(|node| node.spec.id == leader).unwrap()).await.unwrap();
    assert!(on_leader.members.iter().all(|member| member.id != 4), "{on_leader:?}");
}

/// With `[cluster] tls_*` set, nodes form a cluster over mutual TLS; the
/// listener refuses plaintext and certificates of another CA; an operator
/// with a certificate of the cluster's CA runs `weir cluster status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_over_mutual_tls_and_refuse_anyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let authority = Authority::new("weir-cluster-ca");
    let ca = write("cluster-ca.pem", &authority.pem);
    let (operator_cert, operator_key) = authority.leaf("operator", false);
    let (operator_cert, operator_key) = (write("operator.pem", &operator_cert), write("operator.key", &operator_key));
    let operator = ClientTlsOptions {
        ca: Some(ca.clone().into()),
        cert: Some(operator_cert.clone().into()),
        key: Some(operator_key.clone().into()),
    }
    .connector()
    .unwrap();
    let specs = [spec(1), spec(2), spec(3)];
    let initial: Vec<&NodeSpec> = specs.iter().collect();
    let mut nodes: Vec<Node> = specs
        .iter()
        .map(|s| {
            let (cert, key) = authority.node(&format!("node{}", s.id));
            let (cert, key) = (write(&format!("node{}.pem", s.id), &cert), write(&format!("node{}.key", s.id), &key));
            let extra = format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntls_ca = \"{ca}\"\n");
            let mut node = configure(dir.path(), s.clone(), &initial, &extra);
            node.tls = Some(operator.clone());
            node
        })
        .collect();
    for node in &mut nodes {
        node.start();
    }
    let mut history = History::default();
    let (leader, _) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, 0).await;

    let addr = nodes[0].spec.cluster_addr.clone();
    let plaintext = PeerClient::new(addr.clone(), None).call(&NodeRequest::Status, Duration::from_secs(10)).await;
    assert!(plaintext.is_err(), "plaintext was answered: {plaintext:?}");
    let stranger = Authority::new("another-ca");
    let (cert, key) = stranger.leaf("stranger", false);
    let stranger = ClientTlsOptions {
        ca: Some(ca.clone().into()),
        cert: Some(write("stranger.pem", &cert).into()),
        key: Some(write("stranger.key", &key).into()),
    }
    .connector()
    .unwrap();
    let refused =
        PeerClient::new(addr.clone(), Some(stranger)).call(&NodeRequest::Status, Duration::from_secs(10)).await;
    assert!(refused.is_err(), "a certificate of another CA was answered: {refused:?}");

    // An operator's certificate (client use only) runs commands, but may
    // not act as a node.
    let vote = NodeRequest::Vote(openraft::raft::VoteRequest::new(openraft::impls::Vote::new(1_000, 9), None));
    let answer = PeerClient::new(addr.clone(), Some(operator.clone())).call(&vote, Duration::from_secs(10)).await;
    assert!(matches!(&answer, Ok(NodeReply::Error(message)) if message.contains("serverAuth")), "{answer:?}");
    let status_after = status(&nodes[0]).await.unwrap();
    assert!(status_after.term < 1_000, "the operator's vote was counted: {status_after:?}");

    let printed = weir_cluster(&[
        "status",
        "--node",
        &addr,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &operator_cert,
        "--tls-key",
        &operator_key,
    ]);
    assert!(printed.contains(&format!("leader: node {leader}")), "{printed}");
}

/// The leader cut off from the others in both directions (each node calls
/// from its own loopback address through a proxy in front of each other
/// node): the majority elects a new leader in a higher term; a membership
/// change sent to the old leader never takes effect; healed, the old
/// leader follows, its uncommitted entry gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_commits_nothing_and_the_majority_elects() {
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.11, .12, .13: every node has its own source address.
    let (mut nodes, proxies) = three_proxied_nodes(dir.path(), 10, true).await;
    for node in &mut nodes {
        node.start();
    }
    let mut history = History::default();
    let (leader, term) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, 0).await;

    // Cut off: nobody reaches the leader, the leader reaches nobody. The
    // test itself calls from 127.0.0.1 and still reaches every node.
    cut_off(&proxies, 10, leader);

    // At once, while it may still think it leads: the old leader cannot
    // commit a membership change. Whatever it answers (not leader, an
    // error, or nothing before the timeout), the node is never added.
    let old = nodes.iter().find(|node| node.spec.id == leader).unwrap();
    let request = NodeRequest::AddNode {
        id: 9,
        addrs: weir::cluster::NodeAddrs {
            cluster_addr: format!("127.0.0.1:{}", free_port()),
            client_addr: format!("127.0.0.1:{}", free_port()),
        },
    };
    let answer = PeerClient::new(old.spec.cluster_addr.clone(), None)
        .call(&request, Duration::from_millis(4 * ELECTION_MAX_MS))
        .await;
    assert!(!matches!(answer, Ok(NodeReply::MembershipChanged { .. })), "a cut-off leader changed membership");

    let majority: Vec<&Node> = nodes.iter().filter(|node| node.spec.id != leader).collect();
    let (new_leader, new_term) = agreed_leader(&majority, &mut history, 0).await;
    assert!(new_term > term && new_leader != leader);
    // Cut both ways: the old leader never heard of the new one (by now,
    // seconds after the election, it would have, through a one-way cut).
    let cut_off = status(old).await.unwrap();
    assert_ne!(cut_off.leader, Some(new_leader), "the cut-off leader heard the new one: {cut_off:?}");

    heal(&proxies);
    let all: Vec<&Node> = nodes.iter().collect();
    let (_, healed_term) = agreed_leader(&all, &mut history, 0).await;
    assert!(healed_term >= new_term);
    for node in &nodes {
        let status = status(node).await.unwrap();
        assert!(status.members.iter().all(|member| member.id != 9), "node 9 joined somewhere: {status:?}");
        assert_eq!(status.members.len(), 3, "{status:?}");
    }

    // Each node's metrics say what its status says (refreshed on every
    // change, so polled until they agree).
    let started = Instant::now();
    for node in &nodes {
        loop {
            let page = scrape(&node.spec.metrics_addr).await;
            let status = status(node).await.unwrap();
            let term = sample(&page, "weir_raft_term{group=\"metadata\"}");
            let leads = sample(&page, "weir_raft_leader{group=\"metadata\"}");
            let expected_leads = if status.role == "leader" { 1.0 } else { 0.0 };
            if term == Some(status.term as f64) && leads == Some(expected_leads) {
                break;
            }
            assert!(started.elapsed() < CONVERGE_LIMIT, "metrics {term:?} {leads:?} against {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Node 1 saw at least the leader it started with change once.
    let page = scrape(&nodes[0].spec.metrics_addr).await;
    assert!(sample(&page, "weir_raft_leader_changes_total{group=\"metadata\"}").is_some_and(|n| n >= 1.0), "{page}");
}

/// An add-node cut short by a change of leader (the leader paused while
/// the new node, not yet running, is a learner) fails and leaves a
/// learner; run again once the node runs, it resumes and makes it a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_node_cut_short_by_a_new_leader_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [spec(1), spec(2), spec(3)];
    let initial: Vec<&NodeSpec> = specs.iter().collect();
    let mut nodes: Vec<Node> = specs.iter().map(|s| configure(dir.path(), s.clone(), &initial, "")).collect();
    for node in &mut nodes {
        node.start();
    }
    let mut history = History::default();
    let (leader, _) = agreed_leader(&nodes.iter().collect::<Vec<_>>(), &mut history, 0).await;
    let mut fifth = configure(dir.path(), spec(5), &initial, "");
    let add_args = [
        "cluster".to_string(),
        "add-node".into(),
        "5".into(),
        "--cluster-addr".into(),
        fifth.spec.cluster_addr.clone(),
        "--client-addr".into(),
        fifth.spec.client_addr.clone(),
        "--node".into(),
        nodes[(leader - 1) as usize].spec.cluster_addr.clone(),
    ];
    let first = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(&add_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Once node 5 is a learner (it is not running: it cannot catch up),
    // the leader is paused until another leads.
    let leader_node = &nodes[(leader - 1) as usize];
    let started = Instant::now();
    loop {
        let status = status(leader_node).await.unwrap();
        // Committed (not only appended): every later leader has it.
        let learner = status.members.iter().any(|member| member.id == 5 && !member.voter);
        if learner && status.committed_index == status.last_log_index {
            break;
        }
        assert!(started.elapsed() < CONVERGE_LIMIT, "node 5 never became a learner: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leader_node.signal("STOP");
    let majority: Vec<&Node> = nodes.iter().filter(|node| node.spec.id != leader).collect();
    let (new_leader, _) = agreed_leader(&majority, &mut history, 0).await;
    leader_node.signal("CONT");
    let output = first.wait_with_output().unwrap();
    assert!(!output.status.success(), "the cut-short add-node succeeded: {output:?}");
    let on_new = status(&nodes[(new_leader - 1) as usize]).await.unwrap();
    assert!(on_new.members.iter().any(|member| member.id == 5 && !member.voter), "{on_new:?}");

    // Run again with node 5 running: resumed, a voter.
    fifth.start();
    let rerun = Command::new(env!("CARGO_BIN_EXE_weir")).args(&add_args).output().unwrap();
    let stdout = String::from_utf8_lossy(&rerun.stdout);
    assert!(rerun.status.success(), "{stdout}{}", String::from_utf8_lossy(&rerun.stderr));
    assert!(stdout.contains("voters now: 1, 2, 3, 5"), "{stdout}");
    let all: Vec<&Node> = nodes.iter().chain([&fifth]).collect();
    agreed_leader(&all, &mut history, 0).await;
}
