//! What the core hands back to its driver, and the answers it gives clients.

use serde::{Deserialize, Serialize};

use super::log::LogWrite;
use super::membership::{ChangeResponse, Membership};
use super::message::Envelope;
use super::session::Committed;
use super::types::{Entry, HardState, Index, NodeId, RequestId};

/// Everything the driver must do after feeding the core some input.
///
/// The order matters for safety:
/// 1. if `must_sync`, write `hard_state` durably before anything else
///    leaves the node (a vote must never be forgotten); otherwise it only
///    moves the commit index, which may ride along with the log write;
/// 2. send `messages`, and start writing `log_write` (a leader replicates
///    to followers while it writes its own log);
/// 3. once `log_write` is durable, send `persisted_messages` (they
///    acknowledge entries) and call `RaftNode::persisted`;
/// 4. apply `committed` and deliver `responses` and `reads`.
///
/// Log writes must become durable in the order the core produced them.
#[derive(Debug, Default)]
pub struct Ready {
    pub hard_state: Option<HardState>,
    /// `hard_state` holds a new term or vote: it must be durable before
    /// any message of this ready leaves. False when only the commit index
    /// moved (a restarted node learns that again from the leader). Unlike
    /// raft-rs's `must_sync` it says nothing of `log_write`, which is
    /// always synced, but may be synced after `messages` leave. The core
    /// sets it because it knows the hard state it last handed out.
    pub must_sync: bool,
    pub messages: Vec<Envelope>,
    pub log_write: Option<LogWrite>,
    /// Every append this ready answers was marked lazy by the leader
    /// (`Message::Append::lazy`): `log_write` may be staged and synced with
    /// later writes, up to a linger later, `persisted_messages` waiting
    /// with it. False otherwise: an urgent append's answer, even one with
    /// no new entries, leaves after a sync of everything staged.
    pub linger: bool,
    pub persisted_messages: Vec<Envelope>,
    /// How many entries committed (and were applied to the session table)
    /// since the last ready. A count, not the entries: the driver serves
    /// them from its store, and cloning each one here, cold in cache by
    /// the time it commits across an ocean, cost the leader's thread more
    /// than the count's one use.
    pub committed: u64,
    /// The configurations among them, at their indexes.
    pub committed_memberships: Vec<(Index, super::membership::Membership)>,
    pub responses: Vec<ProposeResponse>,
    pub reads: Vec<ReadResponse>,
    /// Entries the core released from memory and needs again, to catch up
    /// a lagging follower: read them from the store and hand them back with
    /// `RaftNode::fetched`.
    pub fetches: Vec<Fetch>,
    /// Answers to `RaftNode::change_membership`.
    pub changes: Vec<ChangeResponse>,
    /// The configuration in force changed (an entry was appended, received,
    /// or cut off): its index and the configuration, for the runtime to
    /// dial new members and drop removed ones. It is durable once this
    /// ready's log write is.
    pub membership: Option<(Index, Membership)>,
}

/// Read up to `max` log entries from `from` for follower `to`, no more
/// than `max_bytes` of them (`Entry::size`) but at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub to: NodeId,
    pub from: Index,
    pub max: usize,
    pub max_bytes: usize,
}

impl Fetch {
    /// What a store holding `log` (entry 1 first) answers: the entries
    /// from `from`, within the count and byte limits, at least one.
    pub fn serve(&self, log: &[Entry]) -> Vec<Entry> {
        let start = usize::try_from(self.from.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .min(log.len());
        let end = start.saturating_add(self.max).min(log.len());
        let mut budget = self.max_bytes;
        log[start..end]
            .iter()
            .enumerate()
            .take_while(|(i, entry)| {
                let fits = *i == 0 || entry.size() <= budget;
                budget = budget.saturating_sub(entry.size());
                fits
            })
            .map(|(_, entry)| entry.clone())
            .collect()
    }
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.messages.is_empty()
            && self.log_write.is_none()
            && self.persisted_messages.is_empty()
            && self.committed == 0
            && self.responses.is_empty()
            && self.reads.is_empty()
            && self.fetches.is_empty()
            && self.changes.is_empty()
            && self.membership.is_none()
    }
}

/// A client's request to append a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: RequestId,
    /// The client's Lamport clock: the entry will be stamped above it.
    pub lamport: u64,
    /// An index the client knows to be below every message it ever sent
    /// (a commit index it learned before its first send): with it the
    /// leader tells a new client from one whose session was closed.
    pub since: Index,
    /// Shared by a batch's proposals (`Command::sender`).
    pub sender: std::sync::Arc<str>,
    pub data: bytes::Bytes,
    /// A proposal this one must follow in the log: taken only while that
    /// one is committed or waiting in this leader's log (so at a lower
    /// index), refused as `EarlierRefused` otherwise. A client pipelining
    /// sends on one stream had the first refused (a leadership transfer
    /// under way) and the next accepted moments later (the transfer given
    /// up); its retry of the first would have landed after the second.
    pub after: Option<RequestId>,
    /// The caller's own tag for this proposal, handed back with each of its
    /// answers (`ProposeResponse::ctx`): the driver finds the batch slot
    /// that waits on it without a table of its own keyed by request id.
    pub ctx: u64,
}

/// Why a proposal was not (or not yet known to be) committed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// The leader stepped down before the entry committed; it may still
    /// commit. Retry with the same request id: it will not be written twice.
    #[error(
        "leadership changed before the message committed; retry with the same sequence number"
    )]
    LeadershipLost,
    #[error("leadership is being transferred; retry shortly")]
    TransferInProgress,
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "sequence number {seq} is older than the deduplication window; its outcome is unknown"
    )]
    SessionExpired { seq: u64 },
    /// A client's clock can only hold stamps the cluster gave out, so one
    /// far ahead of the leader's is a lie; taken, it would push every later
    /// stamp towards overflow.
    #[error("the client's Lamport clock {lamport} is more than {skew} ahead of the leader's ({leader}); a client's clock comes from the stamps the cluster gave it")]
    ClockAhead {
        lamport: u64,
        leader: u64,
        skew: u64,
    },
    /// The proposal it must follow (`Proposal::after`) is not in this
    /// leader's log: it was refused or lost. Resend from that one, in order.
    #[error("an earlier message it must follow (client {}, sequence {}) is not in the log; resend from that one, in order", after.client_id, after.seq)]
    EarlierRefused { after: RequestId },
    #[error("this client's session was closed after it had been idle while many other clients wrote; whether its unanswered messages are in the log is unknown (check with `node export`), and nothing was written now; start a new session to send more")]
    SessionClosed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposeResponse {
    pub id: RequestId,
    /// The answered proposal's `Proposal::ctx`. A retry proposed while the
    /// first attempt was still pending gets an answer of its own.
    pub ctx: u64,
    pub result: Result<Committed, ProposeError>,
}

/// Answer to `read_index`: once the node has applied `index`, a read of its
/// state reflects every write acknowledged before the read was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResponse {
    pub ctx: u64,
    pub result: Result<Index, ProposeError>,
}
