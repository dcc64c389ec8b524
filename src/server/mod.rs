//! A node: opened from its options (`open`: credentials, store, recovery,
//! configuration), then run (`OpenNode::run`: the QUIC endpoint, peer
//! links, the client API, the store and driver threads), which returns a
//! `NodeHandle` to wait on or stop. The HTTP side starts beside it
//! (`crate::http::serve`).
//!
//! ```no_run
//! # async fn example(options: cluster_store::server::NodeOptions) -> Result<(), cluster_store::server::NodeError> {
//! let node = cluster_store::server::open(options).await?;
//! let running = node.run()?;
//! running.wait().await
//! # }
//! ```

pub mod api;
pub mod bootstrap;
pub mod catch_up;
pub mod driver;
pub mod held_appends;
pub mod links;
mod open;
pub mod outbox;
pub mod persist;
mod running;
pub mod spin;
pub mod tcp;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::address::Address;
use crate::raft::NodeId;
use crate::tls;

pub use open::{open, OpenNode};
pub use running::NodeHandle;

/// Everything a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub id: NodeId,
    /// Voters, possibly including this node.
    pub peers: BTreeMap<NodeId, Address>,
    /// Non-voting replicas, possibly including this node.
    pub learners: BTreeMap<NodeId, Address>,
    /// Nodes to ask for the cluster's configuration on a first start
    /// (`--join`), instead of `peers`/`learners`.
    pub join: Option<BTreeMap<NodeId, Address>>,
    /// Where to listen; `None`: this node's address in its configuration.
    pub listen: Option<SocketAddr>,
    pub data: PathBuf,
    pub certs: PathBuf,
    pub tick: Duration,
    pub election_ticks: u64,
    pub heartbeat_ticks: u64,
    pub priorities: BTreeMap<NodeId, u32>,
    /// Most client connections open at once.
    pub max_clients: usize,
    /// Most bytes of messages waiting to commit before sends are "busy".
    pub max_pending_bytes: usize,
    /// How long the driver thread looks for more work before
    /// they sleep, while busy (`spin.rs`).
    pub spin: Duration,
    /// The Raft driver runs as a task on the node's runtime, which must be
    /// a current-thread runtime, instead of on a thread of its own: the
    /// node is one thread, with no hand-offs between threads inside it.
    pub one_thread: bool,
    /// Testing only: delay datagrams to these addresses (simulated WAN).
    pub simulate_delay: std::collections::HashMap<SocketAddr, crate::latency::LinkDelay>,
}

/// Why a node cannot start or stopped. Causes are part of each message
/// (none is chained as a `source`), so a chain printer says each once.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} is listed both in --peers and in --learners")]
    Both(NodeId),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("this node's address in the configuration, {0}, is unusable ({1}); give --listen")]
    Listen(String, String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Store(crate::storage::StoreError),
    #[error(transparent)]
    Raft(#[from] crate::raft::RaftError),
    #[error("cannot listen on {addr}: {error}{hint}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("the Raft driver stopped: {0}")]
    Driver(String),
    #[error("the HTTP side cannot reach the cluster: {0}")]
    Http(String),
}

impl From<crate::storage::StoreError> for NodeError {
    fn from(error: crate::storage::StoreError) -> Self {
        NodeError::Store(error)
    }
}
