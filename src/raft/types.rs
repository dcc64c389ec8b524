//! The vocabulary of the consensus core: identifiers, log entries and the
//! small durable record every node keeps.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A node's identity in the cluster. In the real node it comes from the
/// node's certificate, never from what a peer claims.
pub type NodeId = u64;
/// A Raft term: a logical epoch with at most one leader.
pub type Term = u64;
/// A position in the replicated log, starting at 1 (0 means "before the log").
pub type Index = u64;
/// A Lamport timestamp.
pub type Lamport = u64;

/// One slot of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: Index,
    pub term: Term,
    /// Stamped by the leader that created the entry; strictly increasing
    /// along the log, so log order is a linear extension of happened-before.
    pub lamport: Lamport,
    pub payload: Payload,
}

/// What an entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Appended by every new leader so it can commit entries of earlier
    /// terms (Raft paper, section 5.4.2) and serve reads.
    Noop,
    /// A client's message.
    Command(Command),
    /// The cluster's configuration from this entry on (see `membership`).
    Membership(super::membership::Membership),
}

/// A client message as it is stored in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Random per client session; with `seq` it makes a proposal idempotent.
    pub client_id: u64,
    /// The client's sequence number for this message, starting at 1.
    pub seq: u64,
    /// Who sent it, as the runtime authenticated them (a certificate name).
    /// Shared: the leader copies each entry into its appends, its write
    /// and its commit report, and a `String` here was an allocation and a
    /// free per copy on the busiest thread. Decoded entries share it too
    /// (`zero_copy`).
    #[serde(deserialize_with = "crate::zero_copy::sender")]
    pub sender: Arc<str>,
    /// Decoded from a received frame or a read of the log, a slice of
    /// that buffer rather than a copy (`zero_copy`).
    #[serde(deserialize_with = "crate::zero_copy::message")]
    pub data: Bytes,
}

impl Entry {
    /// About how many bytes the entry takes on the wire and on disk: what
    /// byte limits on appends and pages count.
    pub fn size(&self) -> usize {
        const FIXED: usize = 64;
        match &self.payload {
            Payload::Noop => FIXED,
            Payload::Command(c) => FIXED + c.sender.len() + c.data.len(),
            Payload::Membership(m) => {
                FIXED
                    + 16 * (m.voters.len() + m.learners.len())
                    + m.addresses.values().map(|a| 16 + a.len()).sum::<usize>()
            }
        }
    }

    /// The (client id, sequence) pair that identifies a command, if any.
    pub fn request_id(&self) -> Option<RequestId> {
        match &self.payload {
            Payload::Command(c) => Some(RequestId {
                client_id: c.client_id,
                seq: c.seq,
            }),
            Payload::Noop | Payload::Membership(_) => None,
        }
    }
}

/// A hash map for the hot per-message tables (requests waiting to commit,
/// client sessions): foldhash, several times cheaper than the standard
/// SipHash (whose hashing was a tenth of the leader's Raft thread under a
/// pipelined client). Its seed is random per process and per map, so a
/// client cannot pick colliding ids in advance as it could against an
/// unseeded hash; foldhash calls itself "minimally DoS-resistant": it is
/// not proof against an attacker who studies a long-running node's timing
/// to recover the seed. These tables are bounded (`--max-pending-mb`,
/// `Config::max_sessions`).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Identifies one client proposal across retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId {
    pub client_id: u64,
    pub seq: u64,
}

/// What a node must keep across crashes besides its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    pub term: Term,
    /// Whom this node voted for in `term`; persisted so it never votes twice.
    pub vote: Option<NodeId>,
    /// A commit index known to be durable in this node's own log.
    pub commit: Index,
}

/// Where a log ends: the term and index of its last entry. Ordered as
/// Raft's "at least as up to date" comparison (term first, then index).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPosition {
    pub term: Term,
    pub index: Index,
}

impl std::fmt::Display for LogPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "index {} (term {})", self.index, self.term)
    }
}

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Follower,
    /// Probing with pre-votes whether it could win, without raising its term.
    PreCandidate,
    Candidate,
    Leader,
    /// A non-voting replica: it receives the log but never votes or campaigns.
    Learner,
}
