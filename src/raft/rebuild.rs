//! Where a replica rebuilt from nothing (`node rebuild`, after its store
//! was lost or damaged) starts: its term and its catch-up floor.
//!
//! A node that lost its log has forgotten two promises it made. Its votes:
//! it must not vote again in a term it voted in, so it starts in the
//! highest term any other node reports, with its vote there spent. And its
//! acknowledgements: entries it stored were counted towards commit, so a
//! committed entry may now be held by only a minority. Were it to vote with
//! its empty log, a candidate missing those entries could win with its
//! vote and overwrite them: an acknowledged message lost. So until its own
//! log catches up, it votes as if it still held a log as up to date as the
//! most up-to-date log the other nodes reported: that is its catch-up
//! floor.

use super::node::Status;
use super::types::{HardState, LogPosition, NodeId, Term};

/// The starting state of a rebuilt replica, worked out from the status of
/// the other nodes (`Status`, as `node status` shows it). The real
/// `node rebuild` and the simulator's rebuild fault both use it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildPlan {
    /// The highest term any other node is in; the rebuilt node starts
    /// there, its vote spent.
    pub term: Term,
    /// The highest log position any other node reported (`None` when all
    /// their logs are empty). See the module documentation and
    /// [`RebuildPlan::from_peers`] for why this bound.
    pub floor: Option<LogPosition>,
}

impl RebuildPlan {
    /// The plan from the other nodes' answers.
    ///
    /// The floor is the maximum over the peers of (`last_term`,
    /// `last_index`), not their highest commit index. Every entry committed
    /// with this node's help was durable on a quorum that includes this
    /// node, so on at least one *other* node too; when every other node
    /// answered (as `node rebuild` demands unless forced), one of the
    /// answers comes from such a holder, whose log (committed entries are
    /// never removed) still ends at or beyond the entry. A peer's commit
    /// index would not do: a follower that holds the entry may not have
    /// learnt yet that it committed, and the leader that knew may be down.
    /// The position carries the term as well as the index because a voter
    /// compares logs by (last term, last index): a candidate whose log is
    /// at least as up to date as the floor's holder holds everything that
    /// holder held (Raft paper, section 5.4.3). Nor can the floor bar the
    /// node for good: the first entry any later leader appends has a higher
    /// term, so is above it. Until then the node refuses only candidates
    /// whose logs are behind a log that may hold committed entries, as it
    /// would have with its own log had it kept it (it may refuse more: the
    /// floor can cover an uncommitted tail that the node never held).
    ///
    /// Only peers that are voters in their own configuration count towards
    /// the floor, or in their committed one (a change removing them may be
    /// in flight): a leader counts a
    /// voter's acknowledgement only once the voter holds the entry that
    /// made it one (`maybe_commit`), and a committed removal is held by a
    /// majority of the voters that remain, with everything before it. So
    /// every holder that counted is such a peer. A learner's tail beyond
    /// every voter's log was never counted, and a floor at it could bar the
    /// only candidates that can win (a two-voter cluster needs this node's
    /// vote) for good. (Peers too old to report a configuration count.)
    pub fn from_peers<'a>(peers: impl IntoIterator<Item = &'a Status>) -> RebuildPlan {
        let mut plan = RebuildPlan::default();
        for status in peers {
            plan.term = plan.term.max(status.term);
            let voter = status.membership.voters.is_empty()
                || status.membership.is_voter(status.id)
                || status.committed_voter;
            if status.last_index > 0 && voter {
                let position = LogPosition {
                    term: status.last_term,
                    index: status.last_index,
                };
                plan.floor = plan.floor.max(Some(position));
            }
        }
        plan
    }

    /// The rebuilt node `id`'s hard state: the plan's term, its vote in it
    /// spent (on itself), nothing known to be committed.
    pub fn hard_state(&self, id: NodeId) -> HardState {
        HardState {
            term: self.term,
            vote: Some(id),
            commit: 0,
        }
    }
}
