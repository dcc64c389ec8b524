//! Simulated clients: they propose messages, keep a Lamport clock, follow
//! leader hints and retry with the same sequence number until they get an
//! answer, as the real `node send` does.

use std::collections::BTreeMap;

use crate::raft::{Committed, NodeId, RequestId};

/// Whether a client sends each message after the one before it
/// (`Proposal::after`), as `node send -` does on its pipelined stream:
/// half the clients do, so the checker can hold their order to the log.
pub fn ordered(client_id: u64) -> bool {
    client_id % 2 == 1
}

#[derive(Debug)]
pub struct Outstanding {
    /// The client's clock when the message was first sent: the committed
    /// stamp must exceed it (causality).
    pub clock_at_send: u64,
    pub next_try_at: u64,
    pub attempts: u64,
}

#[derive(Debug)]
pub struct SimClient {
    pub client_id: u64,
    pub next_seq: u64,
    pub clock: u64,
    /// Most proposals this client has unanswered, and the widest spread of
    /// sequence numbers among them.
    pub window: u64,
    pub outstanding: BTreeMap<u64, Outstanding>,
    pub target: NodeId,
}

impl SimClient {
    pub fn new(client_id: u64, window: u64, target: NodeId) -> Self {
        SimClient {
            client_id,
            next_seq: 1,
            clock: 0,
            window,
            outstanding: BTreeMap::new(),
            target,
        }
    }

    pub fn can_start(&self) -> bool {
        let lowest = self
            .outstanding
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_seq);
        self.next_seq < lowest + self.window
    }

    pub fn start(&mut self, now: u64) -> RequestId {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.insert(
            seq,
            Outstanding {
                clock_at_send: self.clock,
                next_try_at: now,
                attempts: 0,
            },
        );
        RequestId {
            client_id: self.client_id,
            seq,
        }
    }

    /// Proposals due for a (re)try at `now`.
    pub fn due(&self, now: u64) -> Vec<u64> {
        self.outstanding
            .iter()
            .filter(|(_, o)| o.next_try_at <= now)
            .map(|(seq, _)| *seq)
            .collect()
    }

    /// Records an answer; returns the clock the message was sent with if
    /// the answer is news.
    pub fn committed(&mut self, seq: u64, committed: Committed) -> Option<u64> {
        let outstanding = self.outstanding.remove(&seq)?;
        self.clock = self.clock.max(committed.lamport);
        Some(outstanding.clock_at_send)
    }

    pub fn retry_at(&mut self, seq: u64, at: u64) {
        if let Some(o) = self.outstanding.get_mut(&seq) {
            o.next_try_at = o.next_try_at.min(at);
        }
    }
}
