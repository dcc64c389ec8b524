//! ReadIndex (Raft thesis, section 6.4): linearizable reads without writing
//! to the log. The leader notes its commit index, confirms with a quorum
//! round of heartbeats that it still leads, and then the read may be served
//! from any state that has applied that index.

use std::collections::VecDeque;

use super::node::RaftNode;
use super::ready::{ProposeError, ReadResponse};
use super::types::{Index, Role};

#[derive(Debug, Default)]
pub struct ReadState {
    /// The latest heartbeat round; followers echo it back.
    seq: u64,
    /// Reads that arrived before this leader committed an entry of its own
    /// term (until then its commit index may be behind).
    waiting_for_commit: Vec<u64>,
    pending: VecDeque<PendingRead>,
}

#[derive(Debug)]
struct PendingRead {
    ctx: u64,
    index: Index,
    seq: u64,
}

impl ReadState {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn reset(&mut self) {
        self.waiting_for_commit.clear();
        self.pending.clear();
    }
}

impl RaftNode {
    pub(super) fn start_read(&mut self, ctx: u64) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.log.term(self.commit) != Some(self.term) {
            self.reads.waiting_for_commit.push(ctx);
            return Ok(());
        }
        self.register_reads(vec![ctx]);
        Ok(())
    }

    fn register_reads(&mut self, contexts: Vec<u64>) {
        let me = self.config.id;
        if self.config.voters.len() == 1 && self.config.is_voter(me) {
            for ctx in contexts {
                self.out.reads.push(ReadResponse {
                    ctx,
                    result: Ok(self.commit),
                });
            }
            return;
        }
        self.reads.seq += 1;
        let seq = self.reads.seq;
        for ctx in contexts {
            self.reads.pending.push_back(PendingRead {
                ctx,
                index: self.commit,
                seq,
            });
        }
        self.heartbeat_pending = true;
    }

    /// The leader committed an entry: reads held back for its first commit
    /// in this term may start.
    pub(super) fn on_commit_in_term(&mut self) {
        if !self.reads.waiting_for_commit.is_empty()
            && self.log.term(self.commit) == Some(self.term)
        {
            let waiting = std::mem::take(&mut self.reads.waiting_for_commit);
            self.register_reads(waiting);
        }
    }

    /// Answers every read whose heartbeat round a quorum has acknowledged.
    pub(super) fn advance_reads(&mut self) {
        while let Some(front) = self.reads.pending.front() {
            let acks = usize::from(self.config.is_voter(self.config.id))
                + self
                    .progress
                    .iter()
                    .filter(|(id, pr)| self.config.voters.contains(id) && pr.read_ack >= front.seq)
                    .count();
            if acks < self.config.quorum() {
                break;
            }
            let ctx = front.ctx;
            let index = front.index;
            self.reads.pending.pop_front();
            self.out.reads.push(ReadResponse {
                ctx,
                result: Ok(index),
            });
        }
    }

    pub(super) fn abandon_reads(&mut self) {
        let waiting = std::mem::take(&mut self.reads.waiting_for_commit);
        let pending: Vec<u64> = self.reads.pending.drain(..).map(|r| r.ctx).collect();
        for ctx in waiting.into_iter().chain(pending) {
            self.out.reads.push(ReadResponse {
                ctx,
                result: Err(ProposeError::NotLeader { leader: None }),
            });
        }
    }
}
