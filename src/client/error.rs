//! What can go wrong between a client and the cluster, each failure said
//! once: a variant names what failed and, where there is one, the next
//! step. The cause is part of each message and never chained as a
//! `source` as well, so a printer that walks the chain (anyhow's `{:#}`)
//! says it once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::address::{Address, MembersError};
use crate::identity::{os_reason, Identity, IdentityError};
use crate::raft::{ChangeError, Index, MembershipChange, NodeId, ProposeError};
use crate::storage::StoreError;
use crate::tls::TlsError;
use crate::wire::{WireError, MAX_MESSAGE_BYTES};

/// Why a connection to a node could not be made: a client's, or a peer
/// link's.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("node {node}: cannot resolve {address} ({reason})")]
    Resolve {
        node: NodeId,
        address: Address,
        reason: String,
    },
    /// The handshake failed or the node closed the connection.
    #[error("node {node} at {address}: {reason}")]
    Connect {
        node: NodeId,
        address: SocketAddr,
        reason: String,
    },
    #[error("node {node} at {address}: no handshake within {after:?}")]
    Timeout {
        node: NodeId,
        address: SocketAddr,
        after: Duration,
    },
    /// The node turned the connection away: too many handshakes at once.
    #[error("node {node} at {address} refused the connection: busy with other handshakes, retry")]
    Busy { node: NodeId, address: SocketAddr },
    #[error("node {node} at {address}: {error}")]
    Identity {
        node: NodeId,
        address: SocketAddr,
        error: IdentityError,
    },
    /// Another node (or a client) answered at the node's address.
    #[error("{address} presented {presented}, expected node {node}'s: check the address given for node {node}")]
    Impostor {
        node: NodeId,
        address: SocketAddr,
        presented: Identity,
    },
}

/// A node refused a request for good (`retry: false`).
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {message}")]
pub struct Refused {
    pub node: NodeId,
    pub message: String,
    pub detail: Option<ProposeError>,
    /// Whether no attempt of the request can have put it in the log (every
    /// earlier one was answered "not the leader" or "busy").
    pub first_attempt: bool,
}

/// Why a client request, stream, export or membership change failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node to ask.
    #[error("give the cluster's nodes with --cluster 1=host:port,... (or NODE_CLUSTER)")]
    NoNodes,
    /// A malformed `--cluster`.
    #[error("{0}")]
    Members(MembersError),
    /// The client's certificate, key or CA cannot be loaded or used.
    #[error("{0}")]
    Credentials(TlsError),
    #[error("cannot open a UDP socket for the client ({})", os_reason(.0))]
    Socket(std::io::Error),
    #[error("node {0} is not in --cluster")]
    UnknownNode(NodeId),
    #[error("{0}")]
    Dial(DialError),
    /// The connection or stream to a node broke.
    #[error("node {node}: {reason}")]
    Link { node: NodeId, reason: String },
    /// A node sent what is not a well-formed answer, or a request could
    /// not be framed.
    #[error("node {node}: {error}")]
    Wire { node: NodeId, error: WireError },
    #[error("node {0} closed the stream without answering")]
    ClosedEarly(NodeId),
    /// A live connection on which the node no longer answers.
    #[error("node {0} stopped answering")]
    Silent(NodeId),
    /// Given up because another node reported a newer leader: the request
    /// may have been appended where it was sent.
    #[error("node {node} was replaced by a newer leader, node {leader}")]
    Superseded { node: NodeId, leader: NodeId },
    #[error("{0}")]
    Refused(Refused),
    /// An answer that does not fit the request.
    #[error("node {node} answered {request} with {answer}")]
    Unexpected {
        node: NodeId,
        request: &'static str,
        answer: String,
    },
    /// No leader took a request within the client's patience.
    #[error("gave up after {after:?} without an answer from a leader ({last}); check that most voters of --cluster are running and reach each other")]
    NoLeader { after: Duration, last: String },
    /// A stream that made no progress within its patience.
    #[error("gave up after {after:?} without progress at index {}: {last}", index.map_or_else(|| "?".to_string(), |i| i.to_string()))]
    Stalled {
        after: Duration,
        index: Option<Index>,
        last: String,
    },
    /// Every node was asked; none answered. Each reason names its node.
    #[error("no node answered: {}", .0.join("; "))]
    NoAnswer(Vec<String>),
    /// A message over the limit, refused before anything is sent.
    #[error("message {number} is {size} bytes and exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge { number: usize, size: usize },
    #[error("the watch ended without a read index")]
    NoReadIndex,
    #[error("{change}: refused by node {leader}: {error}")]
    ChangeRefused {
        change: MembershipChange,
        leader: NodeId,
        error: ChangeError,
    },
    #[error("{change}: outcome unknown: node {leader} lost leadership before it committed; it may still commit: check `node member list` before retrying")]
    ChangeUnknown {
        change: MembershipChange,
        leader: NodeId,
    },
    #[error("node {id} did not catch up within {} s (last: {last}); it stays a learner: check that it runs (`node --id {id} --join ...`), then `node member promote {id}`", after.as_secs())]
    NotCaughtUp {
        id: NodeId,
        after: Duration,
        last: String,
    },
    /// A stopped node's store, read directly (`node export --local`).
    #[error("{0}")]
    Store(StoreError),
    #[error("{} holds no entry at index {index} though it has committed {commit}", data.display())]
    MissingEntry {
        data: PathBuf,
        index: Index,
        commit: Index,
    },
    /// A file the client writes (backups).
    #[error("cannot {what} ({})", os_reason(error))]
    File { what: String, error: std::io::Error },
    /// Writing what was asked for to its reader.
    #[error("cannot write the output ({})", os_reason(.0))]
    Output(std::io::Error),
}

impl ClientError {
    /// Whether the request was refused for its size (by the client, the
    /// frame limit or the leader): the same request can never succeed.
    pub fn is_too_large(&self) -> bool {
        match self {
            ClientError::TooLarge { .. } => true,
            ClientError::Wire { error, .. } => matches!(error, WireError::TooLarge(_)),
            ClientError::Refused(refused) => {
                matches!(refused.detail, Some(ProposeError::TooLarge { .. }))
            }
            _ => false,
        }
    }

    /// Whether the output's reader went away (`node watch | head`): not a
    /// failure of the command.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, ClientError::Output(error) if error.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

// By hand rather than `#[from]`, which would chain each as a `source` that
// the message already says.
impl From<MembersError> for ClientError {
    fn from(error: MembersError) -> Self {
        ClientError::Members(error)
    }
}

impl From<TlsError> for ClientError {
    fn from(error: TlsError) -> Self {
        ClientError::Credentials(error)
    }
}

impl From<DialError> for ClientError {
    fn from(error: DialError) -> Self {
        ClientError::Dial(error)
    }
}

impl From<Refused> for ClientError {
    fn from(refused: Refused) -> Self {
        ClientError::Refused(refused)
    }
}

impl From<StoreError> for ClientError {
    fn from(error: StoreError) -> Self {
        ClientError::Store(error)
    }
}
