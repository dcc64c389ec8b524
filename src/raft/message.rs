//! Messages exchanged between Raft nodes. The core produces and consumes
//! them; the runtime only moves them between machines.

use serde::{Deserialize, Serialize};

use super::types::{Entry, Index, Lamport, LogPosition, NodeId, Term};

/// A message with its routing header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term (for a pre-vote request: the term it would campaign in).
    pub term: Term,
    /// The sender's Lamport clock; receivers merge it into their own.
    pub lamport: Lamport,
    pub message: Message,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Would you vote for me in `term`? Changes no state on either side, so
    /// a node cut off from the cluster cannot inflate terms and disrupt it.
    PreVote {
        last_index: Index,
        last_term: Term,
    },
    PreVoteResponse {
        granted: bool,
    },
    /// A real vote request. `transfer` marks a campaign started by
    /// `TimeoutNow`, which voters honour even while they follow a live leader.
    Vote {
        last_index: Index,
        last_term: Term,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
        /// A vote cast with a pre-vote (`decides_pre_election`) names the
        /// log it judged: the pre-vote's. The pre-candidate may have asked
        /// again since with another log (a leader of its term truncated
        /// it), and counts the vote only for that log. `None` for an answer
        /// to a `Vote`, which judged the candidacy's own log.
        judged: Option<LogPosition>,
    },
    /// Log replication: `entries` follow the entry at `prev_index`, which the
    /// receiver must hold with `prev_term`.
    Append {
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
        /// The leader can commit without this follower's answer for now
        /// (`RaftNode::choose_lazy`): it may hold the write a few
        /// milliseconds and sync it with later ones (`Ready::linger`).
        lazy: bool,
    },
    AppendResponse(AppendResult),
    /// Keeps followers from campaigning, carries the commit index they may
    /// safely apply and a read round used by ReadIndex.
    Heartbeat {
        commit: Index,
        read_seq: u64,
    },
    HeartbeatResponse {
        read_seq: u64,
    },
    /// Leadership transfer: campaign now, the leader is handing over.
    TimeoutNow,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResult {
    /// The follower's log matches the leader's up to `match_index`, durably.
    Accepted { match_index: Index },
    /// The consistency check failed for the append at `reject_index`
    /// (its `prev_index`). The hint lets the leader skip a whole term at once:
    /// the follower holds `hint_term` at `reject_index`, first appearing at
    /// `hint_index`; with no term, the follower's log ends before
    /// `hint_index`. `lost`: the follower knows it lost entries it
    /// acknowledged (a heartbeat's commit index, which the leader caps at
    /// what this follower acknowledged, is past its log: its replica was
    /// rebuilt).
    Rejected {
        reject_index: Index,
        hint_index: Index,
        hint_term: Option<Term>,
        lost: bool,
    },
}

impl Message {
    /// A short name for traces.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::PreVote { .. } => "PreVote",
            Message::PreVoteResponse { .. } => "PreVoteResponse",
            Message::Vote { .. } => "Vote",
            Message::VoteResponse { .. } => "VoteResponse",
            Message::Append { .. } => "Append",
            Message::AppendResponse(_) => "AppendResponse",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::HeartbeatResponse { .. } => "HeartbeatResponse",
            Message::TimeoutNow => "TimeoutNow",
        }
    }
}
