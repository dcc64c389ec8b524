//! Proposals held by a voter whose leader has gone quiet, until the next
//! leader is known.
//!
//! A client whose leader stops answering sends its write to the other
//! voters. A voter that knows no leader, or has not heard from its leader
//! for longer than a heartbeat interval, keeps that write instead of
//! redirecting the client at once: if it wins the election it appends the
//! write with its first entries, and if another voter wins it redirects
//! the client there. Across an ocean this saves the client the round trip
//! of learning who won and the one of sending its write there (a client in
//! Iowa whose leader died waited ~0.45 s after São Paulo took over).
//! Nothing here decides what commits: a held write is proposed like any
//! other, and a duplicate is recognised by its request id as a retry is.

use std::collections::VecDeque;

use super::node::RaftNode;
use super::ready::{Proposal, ProposeError};
use super::types::Role;

/// A proposal waiting for a leader, and the tick it is answered by.
#[derive(Debug)]
pub(super) struct Held {
    proposal: Proposal,
    until: u64,
}

/// Proposals held, oldest first (and so in order of their deadlines).
#[derive(Debug, Default)]
pub(super) struct HeldProposals {
    queue: VecDeque<Held>,
    /// Ticks this node has counted: the clock deadlines are on.
    now: u64,
}

impl RaftNode {
    /// Holds `proposal` if this voter has no live leader to redirect it
    /// to; gives it back otherwise.
    pub(super) fn hold(&mut self, proposal: Proposal) -> Option<Proposal> {
        let leaderless =
            self.leader.is_none() || self.election_elapsed > self.config.heartbeat_ticks;
        let votes = matches!(
            self.role,
            Role::Follower | Role::PreCandidate | Role::Candidate
        );
        // No count of its own bounds what is held: a cap reached in the
        // middle of a client's batch would hold part of it and refuse the
        // rest. The node's admission control (`--max-pending-mb`) bounds
        // every proposal not yet answered, these included.
        if !votes || !leaderless {
            return Some(proposal);
        }
        // Twice the longest election timeout before any backoff: long
        // enough for an election and its first append across the farthest
        // link, short enough that a client is told where to go while it
        // still waits. (During backed-off elections a held write may be
        // answered before a leader exists; the client then looks again.)
        let until = self.held.now + 4 * self.config.election_ticks;
        self.held.queue.push_back(Held { proposal, until });
        None
    }

    /// Counts a tick; answers the proposals held too long with the leader
    /// known now, if any.
    pub(super) fn tick_held(&mut self) {
        self.held.now += 1;
        while self
            .held
            .queue
            .front()
            .is_some_and(|held| held.until <= self.held.now)
        {
            if let Some(held) = self.held.queue.pop_front() {
                let leader = self.leader;
                let Proposal { id, ctx, .. } = held.proposal;
                self.respond(id, ctx, Err(ProposeError::NotLeader { leader }));
            }
        }
    }

    /// A leader is known: proposes what was held if it is this node,
    /// else tells each client where it is.
    pub(super) fn release_held(&mut self) {
        if self.held.queue.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held.queue);
        for Held { proposal, .. } in held {
            if self.role == Role::Leader {
                self.propose(proposal);
            } else {
                let leader = self.leader;
                self.respond(
                    proposal.id,
                    proposal.ctx,
                    Err(ProposeError::NotLeader { leader }),
                );
            }
        }
    }
}
