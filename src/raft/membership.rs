//! Live membership: who votes, who learns, and how that changes.
//!
//! The configuration lives in the log. A change is a [`Payload::Membership`]
//! entry holding the whole new configuration, and, as in Ongaro's thesis
//! (section 4.1), a node uses the latest configuration in its log whether
//! or not it is committed yet. That is safe because a change moves at most
//! one voter in or out, so any majority of the old voters and any majority
//! of the new ones overlap. A leader starts a change only once
//! - it has committed an entry of its own term (the thesis's fix: a leader
//!   elected in the middle of an earlier leader's change would otherwise
//!   start a second one, and the two could each decide alone), and
//! - the previous change is committed (one change in flight at a time).
//!
//! A leader removed from the voters keeps replicating, without counting
//! itself, until the change commits; then it steps down and hands over to
//! the most caught-up voter with `TimeoutNow`, so writes pause for one
//! election at most.
//!
//! The bootstrap configuration (`--peers`/`--learner` on a new cluster's
//! first start, or what a joining node learned from the cluster) is the
//! configuration at index 0, in force until the log holds a change.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::message::Message;
use super::node::RaftNode;
use super::progress::Progress;
use super::types::{Index, NodeId, Payload, Role};

/// A cluster configuration: who votes, who only receives the log, and where
/// each member listens (the runtime dials these; the core only carries them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// `host:port` of each member, as operators gave them.
    pub addresses: BTreeMap<NodeId, String>,
}

impl Membership {
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// Every member, voters first.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// The configuration `change` leads to, or why it cannot be made.
    pub fn apply(&self, change: &MembershipChange) -> Result<Membership, ChangeError> {
        let mut next = self.clone();
        match change {
            MembershipChange::AddLearner { id, address } => {
                if self.contains(*id) {
                    return Err(ChangeError::AlreadyMember(*id));
                }
                next.learners.insert(*id);
                next.addresses.insert(*id, address.clone());
            }
            MembershipChange::Promote { id } => {
                if self.is_voter(*id) {
                    return Err(ChangeError::AlreadyVoter(*id));
                }
                if !next.learners.remove(id) {
                    return Err(ChangeError::NotMember(*id));
                }
                next.voters.insert(*id);
            }
            MembershipChange::Remove { id } => {
                if self.voters.len() == 1 && self.is_voter(*id) {
                    return Err(ChangeError::LastVoter(*id));
                }
                if !next.voters.remove(id) && !next.learners.remove(id) {
                    return Err(ChangeError::NotMember(*id));
                }
                next.addresses.remove(id);
            }
            MembershipChange::UpdateAddress { id, address } => {
                if !self.contains(*id) {
                    return Err(ChangeError::NotMember(*id));
                }
                next.addresses.insert(*id, address.clone());
            }
        }
        Ok(next)
    }

    /// Is `next` at most one voter away from `self` (added or removed)?
    /// Only such changes keep every majority of the old voters overlapping
    /// every majority of the new ones.
    pub fn one_voter_from(&self, next: &Membership) -> bool {
        self.voters.symmetric_difference(&next.voters).count() <= 1
    }

    /// A short fingerprint of the configuration, for operators and for
    /// peers comparing their views.
    pub fn digest(&self) -> u64 {
        // FNV-1a over a canonical rendering: stable across builds and
        // platforms, unlike `std`'s hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.to_string().bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash
    }
}

#[cfg(test)]
impl Membership {
    /// `voters` and `learners`, node `id` at `h{id}:7000`: for unit tests.
    pub(crate) fn for_tests(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            addresses: voters
                .iter()
                .chain(learners)
                .map(|id| (*id, format!("h{id}:7000")))
                .collect(),
        }
    }
}

impl std::fmt::Display for Membership {
    /// `voters 1=a:1,2=b:2 learners 4=d:4` (ids without an address alone).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |ids: &BTreeSet<NodeId>| {
            ids.iter()
                .map(|id| match self.addresses.get(id) {
                    Some(address) => format!("{id}={address}"),
                    None => id.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(f, "voters {}", list(&self.voters))?;
        if !self.learners.is_empty() {
            write!(f, " learners {}", list(&self.learners))?;
        }
        Ok(())
    }
}

/// One step an operator asks of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// A new member that receives the log and does not vote (yet).
    AddLearner { id: NodeId, address: String },
    /// A learner that caught up becomes a voter.
    Promote { id: NodeId },
    /// A voter or learner leaves; a removed leader steps down once the
    /// change commits.
    Remove { id: NodeId },
    /// A member moved (its VM got a new address).
    UpdateAddress { id: NodeId, address: String },
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipChange::AddLearner { id, address } => {
                write!(f, "add node {id} at {address} as a learner")
            }
            MembershipChange::Promote { id } => write!(f, "promote node {id} to voter"),
            MembershipChange::Remove { id } => write!(f, "remove node {id}"),
            MembershipChange::UpdateAddress { id, address } => {
                write!(f, "move node {id} to {address}")
            }
        }
    }
}

/// Why a membership change was refused (nothing was written).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ChangeError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("the new leader has not committed an entry of its own term yet; retry shortly")]
    LeaderNotReady,
    #[error(
        "the change at index {index} is not committed yet: one change at a time; retry once it is"
    )]
    ChangeInProgress { index: Index },
    #[error("leadership is being transferred; retry shortly")]
    TransferInProgress,
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    #[error("node {0} is already a voter")]
    AlreadyVoter(NodeId),
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("node {0} is the last voter; a cluster needs one")]
    LastVoter(NodeId),
    #[error("learner {id} is not caught up (it holds index {match_index} of {last_index}); promote it once it is")]
    NotCaughtUp {
        id: NodeId,
        match_index: Index,
        last_index: Index,
    },
    #[error("learner {0} has not answered the leader recently; promote it once it does")]
    NotResponding(NodeId),
    #[error("a configuration must change by at most one voter at a time")]
    TooManyVoters,
    /// The leader stepped down before the change committed: it may still
    /// commit under the next leader. Check `node member list`, then retry.
    #[error("leadership changed before the change committed; it may still commit: check the member list before retrying")]
    LeadershipLost,
}

/// A learner may be promoted once it is this close to the leader's log:
/// close enough that it would not hold up commits as a voter.
pub const PROMOTE_MAX_LAG: Index = 1024;

/// The configurations in a node's log that can still matter: the latest
/// committed one (or the bootstrap one at index 0) and any after it.
#[derive(Clone, Debug)]
pub(super) struct Memberships {
    /// `(index, configuration)` in log order; never empty.
    history: Vec<(Index, Membership)>,
}

impl Memberships {
    /// `bootstrap` is the configuration as of log index `index` (0 for a
    /// new cluster's).
    pub fn new(bootstrap: Membership, index: Index) -> Self {
        Memberships {
            history: vec![(index, bootstrap)],
        }
    }

    /// The index of the bootstrap configuration, or of the oldest kept.
    fn base(&self) -> Index {
        self.history[0].0
    }

    /// The configuration in force: the latest in the log.
    pub fn current(&self) -> &(Index, Membership) {
        // `history` is never empty: the bootstrap entry is only replaced.
        &self.history[self.history.len() - 1]
    }

    /// The latest configuration at or below `commit`.
    pub fn committed(&self, commit: Index) -> &(Index, Membership) {
        self.history
            .iter()
            .rev()
            .find(|(index, _)| *index <= commit)
            .unwrap_or(&self.history[0])
    }

    /// A configuration entry at `index` entered the log. Returns whether
    /// it is in force now: one older than the bootstrap configuration (a
    /// joined node receiving the log from the start) is not.
    pub fn push(&mut self, index: Index, membership: Membership) -> bool {
        if index <= self.base() {
            return false;
        }
        self.history.push((index, membership));
        true
    }

    /// Forgets configurations at or after `from` (the log was truncated
    /// there). Returns whether the one in force changed.
    pub fn truncate(&mut self, from: Index) -> bool {
        let before = self.history.len();
        while self.history.len() > 1 && self.history[self.history.len() - 1].0 >= from {
            self.history.pop();
        }
        self.history.len() != before
    }

    /// Drops configurations older than the latest committed one.
    pub fn compact(&mut self, commit: Index) {
        if let Some(keep) = self.history.iter().rposition(|(index, _)| *index <= commit) {
            self.history.drain(..keep);
        }
    }
}

/// A membership change in flight on the leader, answered once it commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PendingChange {
    pub ctx: u64,
    pub index: Index,
}

/// The answer to `RaftNode::change_membership`: the index at which the
/// new configuration committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeResponse {
    pub ctx: u64,
    pub result: Result<Index, ChangeError>,
}

impl RaftNode {
    /// The configuration in force (the latest in the log) and its index.
    pub fn membership(&self) -> &Membership {
        &self.memberships.current().1
    }

    /// The latest committed configuration.
    pub fn committed_membership(&self) -> &Membership {
        &self.memberships.committed(self.commit).1
    }

    /// The index of the latest committed configuration.
    pub fn committed_membership_index(&self) -> Index {
        self.memberships.committed(self.commit).0
    }

    /// The index of the configuration in force (0: the bootstrap one).
    pub fn membership_index(&self) -> Index {
        self.memberships.current().0
    }

    /// Is a change appended but not yet committed?
    pub fn change_in_progress(&self) -> bool {
        // The bootstrap configuration counts as committed: a joined node's
        // was committed in the cluster it copied it from.
        self.membership_index() > self.commit.max(self.config.membership_index)
    }

    /// Asks the leader to change the configuration. The answer arrives in a
    /// later `Ready::changes` once the change commits (or at once if it is
    /// refused); `ctx` is the caller's to match it.
    pub fn change_membership(&mut self, ctx: u64, change: MembershipChange) {
        match self.start_change(ctx, &change) {
            Ok(index) => info!(
                node = self.config.id,
                %change,
                index,
                "membership change appended"
            ),
            Err(error) => {
                info!(node = self.config.id, %change, %error, "membership change refused");
                self.out.changes.push(ChangeResponse {
                    ctx,
                    result: Err(error),
                });
            }
        }
    }

    fn start_change(&mut self, ctx: u64, change: &MembershipChange) -> Result<Index, ChangeError> {
        if self.role != Role::Leader {
            return Err(ChangeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transfer.is_some() {
            return Err(ChangeError::TransferInProgress);
        }
        if self.log.term(self.commit) != Some(self.term) {
            return Err(ChangeError::LeaderNotReady);
        }
        if self.change_in_progress() {
            return Err(ChangeError::ChangeInProgress {
                index: self.membership_index(),
            });
        }
        let next = self.membership().apply(change)?;
        if !self.membership().one_voter_from(&next) {
            return Err(ChangeError::TooManyVoters);
        }
        if let MembershipChange::Promote { id } = change {
            // Caught up: it holds the configuration that made it a member
            // (so it has answered this leader at all), and is within
            // `PROMOTE_MAX_LAG` of the log's end. Promoted any earlier, a
            // learner that never connected would count towards quorums
            // it cannot help make.
            let last_index = self.log.last_index();
            let match_index = self.progress.get(id).map_or(0, |pr| pr.match_index);
            if match_index < self.membership_index() || match_index + PROMOTE_MAX_LAG < last_index {
                return Err(ChangeError::NotCaughtUp {
                    id: *id,
                    match_index,
                    last_index,
                });
            }
        }
        let index = self.append_new(Payload::Membership(next), 0);
        self.choose_lazy();
        self.pending_change = Some(PendingChange { ctx, index });
        Ok(index)
    }

    /// A configuration entry entered the log at `index` (appended by this
    /// leader, received from one, or read back from the store): it is in
    /// force from now on.
    pub(super) fn membership_appended(&mut self, index: Index, membership: Membership) {
        if self.memberships.push(index, membership) {
            self.membership_changed();
        }
    }

    /// The log was cut at `from`: a configuration there or after is gone.
    pub(super) fn log_truncated(&mut self, from: Index) {
        if self.memberships.truncate(from) {
            self.membership_changed();
        }
    }

    /// Brings roles, replication targets and the announced configuration
    /// in line with the configuration now in force.
    pub(super) fn membership_changed(&mut self) {
        let (index, membership) = self.memberships.current().clone();
        let me = self.config.id;
        let was_member = self.config.is_voter(me) || self.config.learners.contains(&me);
        self.config.voters = membership.voters.clone();
        self.config.learners = membership.learners.clone();
        self.config.addresses = membership.addresses.clone();
        match self.role {
            Role::Leader => {
                // A removed leader keeps leading until the change commits,
                // and a removed member is sent the log until then too, so
                // it learns of its removal (`membership_committed` lets it
                // go).
                let next = self.log.last_index() + 1;
                let committed = self.committed_membership().clone();
                let peers: BTreeSet<NodeId> = membership
                    .members()
                    .chain(committed.members())
                    .filter(|id| *id != me)
                    .collect();
                self.progress.retain(|id, _| peers.contains(id));
                for id in peers {
                    self.progress
                        .entry(id)
                        .or_insert_with(|| Progress::new(next));
                }
            }
            _ => self.refresh_role(),
        }
        if was_member && !membership.contains(me) {
            warn!(
                node = me,
                index,
                "this node was removed from the cluster's configuration: it no longer votes, campaigns or receives the log"
            );
        }
        self.out.membership = Some((index, membership));
    }

    /// May this node campaign? A voter of the configuration in force may,
    /// and so may a voter of the committed one while a change that removes
    /// it is in flight: until that change commits it is still one of the
    /// voters, and it may hold committed entries nobody else does (a peer
    /// rebuilt after a lost disk). Either way it counts the votes of the
    /// configuration in force, whose majorities overlap the committed
    /// one's, so two leaders of one term stay impossible.
    pub(super) fn may_campaign(&self) -> bool {
        let me = self.config.id;
        self.config.is_voter(me)
            || (self.change_in_progress() && self.committed_membership().is_voter(me))
    }

    /// The role a node that does not lead or campaign has: a follower if it
    /// may campaign, else a learner.
    pub(super) fn passive_role(&self) -> Role {
        if self.may_campaign() {
            Role::Follower
        } else {
            Role::Learner
        }
    }

    /// Brings a follower's or learner's role in line with what it may do
    /// now; a campaign it may no longer run is abandoned.
    pub(super) fn refresh_role(&mut self) {
        let role = self.passive_role();
        match (self.role, role) {
            (Role::Leader, _) => {}
            (Role::Learner, Role::Follower) => {
                info!(node = self.config.id, "may campaign: a voter now");
                self.role = Role::Follower;
                self.reset_election_timer();
            }
            (Role::Follower | Role::PreCandidate | Role::Candidate, Role::Learner) => {
                self.role = Role::Learner;
                self.votes.clear();
            }
            _ => {}
        }
    }

    /// The leader's commit index moved: answer a committed change, and step
    /// down if the committed configuration no longer has this leader as a
    /// voter.
    pub(super) fn membership_committed(&mut self) {
        self.memberships.compact(self.commit);
        self.refresh_role();
        if let Some(pending) = self.pending_change {
            if pending.index <= self.commit {
                self.pending_change = None;
                self.out.changes.push(ChangeResponse {
                    ctx: pending.ctx,
                    result: Ok(pending.index),
                });
            }
        }
        let me = self.config.id;
        if self.role == Role::Leader && !self.change_in_progress() {
            // Members the committed configuration removed are told the
            // commit index, once, and then no more.
            let gone: Vec<NodeId> = self
                .progress
                .keys()
                .copied()
                .filter(|id| !self.membership().contains(*id))
                .collect();
            let read_seq = self.reads.seq();
            for id in gone {
                if let Some(pr) = self.progress.remove(&id) {
                    let commit = pr.match_index.min(self.commit);
                    self.send(id, Message::Heartbeat { commit, read_seq });
                }
            }
        }
        if self.role == Role::Leader
            && !self.change_in_progress()
            && !self.membership().is_voter(me)
        {
            // Hand over to the voter that holds the most of the log, so
            // the cluster need not wait out an election timeout.
            let successor = self
                .progress
                .iter()
                .filter(|(id, _)| self.config.is_voter(**id))
                .max_by_key(|(id, pr)| (pr.match_index, std::cmp::Reverse(**id)))
                .map(|(id, _)| *id);
            info!(
                node = me,
                term = self.term,
                ?successor,
                "stepping down: this leader is no longer a voter"
            );
            // Tell every member the commit index first, so the successor
            // knows the change committed.
            self.broadcast_append(true);
            if let Some(successor) = successor {
                self.send(successor, Message::TimeoutNow);
            }
            let term = self.term;
            self.become_follower(term, None);
        }
    }

    /// Leadership lost: a change in flight may still commit.
    pub(super) fn abandon_change(&mut self) {
        if let Some(pending) = self.pending_change.take() {
            self.out.changes.push(ChangeResponse {
                ctx: pending.ctx,
                result: Err(ChangeError::LeadershipLost),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::for_tests(voters, learners)
    }

    #[test]
    fn changes_move_one_member_at_a_time() {
        let m = members(&[1, 2, 3], &[]);
        let added = m
            .apply(&MembershipChange::AddLearner {
                id: 4,
                address: "h4:7000".into(),
            })
            .unwrap();
        assert_eq!(added, members(&[1, 2, 3], &[4]));
        let promoted = added.apply(&MembershipChange::Promote { id: 4 }).unwrap();
        assert_eq!(promoted, members(&[1, 2, 3, 4], &[]));
        assert!(added.one_voter_from(&promoted));
        let removed = promoted.apply(&MembershipChange::Remove { id: 1 }).unwrap();
        assert_eq!(removed, members(&[2, 3, 4], &[]));
        assert!(!m.one_voter_from(&removed), "1 out and 4 in is two voters");
        assert_eq!(
            m.apply(&MembershipChange::Promote { id: 2 }),
            Err(ChangeError::AlreadyVoter(2))
        );
        assert_eq!(
            m.apply(&MembershipChange::Remove { id: 9 }),
            Err(ChangeError::NotMember(9))
        );
        assert_eq!(
            members(&[1], &[2]).apply(&MembershipChange::Remove { id: 1 }),
            Err(ChangeError::LastVoter(1))
        );
        let moved = m
            .apply(&MembershipChange::UpdateAddress {
                id: 2,
                address: "elsewhere:1".into(),
            })
            .unwrap();
        assert_eq!(moved.addresses[&2], "elsewhere:1");
        assert_ne!(moved.digest(), m.digest());
    }

    #[test]
    fn history_follows_truncation_and_commit() {
        let mut history = Memberships::new(members(&[1, 2, 3], &[]), 0);
        history.push(5, members(&[1, 2, 3], &[4]));
        history.push(9, members(&[1, 2, 3, 4], &[]));
        assert_eq!(history.current().0, 9);
        assert_eq!(history.committed(6).0, 5);
        assert!(history.truncate(9));
        assert_eq!(history.current().0, 5);
        assert!(!history.truncate(7));
        history.compact(5);
        assert_eq!(history.committed(0).0, 5, "older ones are gone");
        assert!(!history.truncate(6));
        assert_eq!(history.current().0, 5, "a committed one is never cut");

        // A joined node's bootstrap is the configuration at index 57:
        // older entries arriving with the log do not override it.
        let mut joined = Memberships::new(members(&[1, 2, 3, 4], &[]), 57);
        assert!(!joined.push(20, members(&[1, 2, 3], &[4])));
        assert!(!joined.push(57, members(&[1, 2, 3, 4], &[])));
        assert_eq!(joined.current().0, 57);
        assert!(joined.push(80, members(&[2, 3, 4], &[])));
    }
}
