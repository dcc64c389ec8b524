//! Leadership transfer (Raft thesis, section 3.10) and the priority rule
//! built on it: the leader hands over to a caught-up voter that outranks it.
//! This gives "the highest id leads" without the split brain of the Bully
//! algorithm, since the handover is an ordinary Raft election.

use tracing::info;

use super::message::Message;
use super::node::{RaftNode, Transfer};
use super::types::{NodeId, Role};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("only the leader can transfer leadership (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    #[error("node {0} is not a voter")]
    NotVoter(NodeId),
    #[error("node {0} already leads")]
    AlreadyLeader(NodeId),
}

impl RaftNode {
    /// Hands leadership to `target` once its log is caught up. Proposals
    /// are refused meanwhile; the transfer is abandoned after an election
    /// timeout.
    pub fn transfer_leadership(&mut self, target: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader(self.leader));
        }
        if target == self.config.id {
            return Err(TransferError::AlreadyLeader(target));
        }
        if !self.config.is_voter(target) {
            return Err(TransferError::NotVoter(target));
        }
        info!(node = self.config.id, target, "transferring leadership");
        self.transfer = Some(Transfer {
            target,
            elapsed: 0,
            timeout_sent: false,
        });
        self.choose_lazy();
        if !self.maybe_finish_transfer(target) {
            self.send_append(target, true);
        }
        Ok(())
    }

    /// Sends TimeoutNow if `peer` is the transfer target and holds the whole
    /// log. Returns whether it did.
    pub(super) fn maybe_finish_transfer(&mut self, peer: NodeId) -> bool {
        let last = self.log.last_index();
        let Some(transfer) = &mut self.transfer else {
            return false;
        };
        let caught_up = self
            .progress
            .get(&peer)
            .is_some_and(|pr| pr.match_index == last);
        if transfer.target != peer || transfer.timeout_sent || !caught_up {
            return false;
        }
        transfer.timeout_sent = true;
        self.send(peer, Message::TimeoutNow);
        true
    }

    /// Hands over to the highest-priority voter that outranks this leader,
    /// is reachable and holds the whole log.
    pub(super) fn consider_priority_transfer(&mut self) {
        if self.transfer.is_some() || self.log.term(self.commit) != Some(self.term) {
            return;
        }
        let mine = self.config.priority(self.config.id);
        let last = self.log.last_index();
        let best = self
            .progress
            .iter()
            .filter(|(id, pr)| {
                self.config.is_voter(**id)
                    && self.config.priority(**id) > mine
                    && pr.recent_active
                    && pr.match_index == last
            })
            .max_by_key(|(id, _)| (self.config.priority(**id), std::cmp::Reverse(**id)))
            .map(|(id, _)| *id);
        if let Some(target) = best {
            // Cannot fail: we lead and the target is another voter.
            let _ = self.transfer_leadership(target);
        }
    }
}
