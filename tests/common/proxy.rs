//! A fault-injecting TCP proxy on 127.0.0.1 for cluster tests: it forwards
//! connections to one node and can refuse, and cut, those coming from
//! chosen source addresses (each node calls from its own loopback address),
//! so that a test can cut a node off from the others in both directions
//! without privileges.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Rules {
    /// Sources refused and cut.
    blocked: HashSet<IpAddr>,
    /// Per source, cancels its forwarded connections.
    live: HashMap<IpAddr, CancellationToken>,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    rules: Arc<Mutex<Rules>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on 127.0.0.1 (an ephemeral port) and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rules = Arc::new(Mutex::new(Rules::default()));
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, target, Arc::clone(&rules), stop.clone()));
        Proxy { addr, rules, stop }
    }

    /// From now on, refuses connections from `sources` and cuts theirs;
    /// every other source is let through again.
    pub fn block_only(&self, sources: &[IpAddr]) {
        let mut rules = self.rules.lock().unwrap();
        rules.blocked = sources.iter().copied().collect();
        for source in sources {
            if let Some(token) = rules.live.remove(source) {
                token.cancel();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, rules: Arc<Mutex<Rules>>, stop: CancellationToken) {
    loop {
        let (inbound, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let cut = {
            let mut rules = rules.lock().unwrap();
            if rules.blocked.contains(&peer.ip()) {
                continue; // dropped: the connection is refused
            }
            rules.live.entry(peer.ip()).or_insert_with(|| stop.child_token()).clone()
        };
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else { return };
            let (mut inbound, mut outbound) = (inbound, outbound);
            tokio::select! {
                () = cut.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}
