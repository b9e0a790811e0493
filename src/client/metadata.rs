//! The cluster as one node describes it (METADATA): which node leads each
//! partition and where every node takes clients. Publishers use it to go
//! straight to a partition's leader and to know where else to go when a
//! node is lost.

use super::{ClientError, Connection};
use crate::protocol::{ChannelMetadata, NodeInfo, Request, Response};

/// A METADATA answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// The answering node's id (0 outside cluster mode).
    pub node_id: u64,
    pub clustered: bool,
    pub nodes: Vec<NodeInfo>,
    pub channels: Vec<ChannelMetadata>,
}

impl Metadata {
    /// Asks `connection` about `channel` (every channel when empty).
    ///
    /// # Errors
    /// The broker speaks protocol version 1 (no METADATA), refused, or the
    /// connection failed.
    pub async fn fetch(connection: &Connection, channel: &str) -> Result<Metadata, ClientError> {
        if connection.protocol_version() < 2 {
            return Err(ClientError::Invalid("the broker speaks protocol version 1, which has no METADATA".into()));
        }
        match connection.request(Request::Metadata { channel: channel.to_owned() }).await? {
            Response::Metadata { node_id, clustered, nodes, channels } => {
                Ok(Metadata { node_id, clustered, nodes, channels })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A node's client address.
    pub fn client_addr(&self, node_id: u64) -> Option<&str> {
        self.nodes.iter().find(|node| node.node_id == node_id).map(|node| node.client_addr.as_str())
    }

    /// The client address of the leader of `partition` of `channel`, when
    /// one is known.
    pub fn leader_addr(&self, channel: &str, partition: u32) -> Option<&str> {
        let channel = self.channels.iter().find(|listed| listed.name == channel)?;
        self.client_addr(channel.partitions.get(partition as usize)?.leader?)
    }
}
