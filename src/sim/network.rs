//! The simulated network: delays, drops, duplicates and reorders messages,
//! and blocks links for partitions (both ways or one way).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use crate::raft::rng::Rng;
use crate::raft::{Envelope, NodeId};

#[derive(Clone, Debug)]
pub struct NetworkFaults {
    pub drop: f64,
    pub duplicate: f64,
    /// Messages take 1..=max_delay steps; different delays reorder them.
    pub max_delay: u64,
}

struct InFlight {
    deliver_at: u64,
    /// Random tie-break, so same-step messages arrive in any order.
    order: u64,
    envelope: Envelope,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.deliver_at, self.order) == (other.deliver_at, other.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deliver_at, self.order).cmp(&(other.deliver_at, other.order))
    }
}

#[derive(Default)]
pub struct Network {
    queue: BinaryHeap<Reverse<InFlight>>,
    /// Directed links that lose everything: (from, to).
    blocked: HashSet<(NodeId, NodeId)>,
    pub dropped: u64,
    pub duplicated: u64,
    pub blocked_drops: u64,
}

impl Network {
    pub fn send(&mut self, envelope: Envelope, now: u64, faults: &NetworkFaults, rng: &mut Rng) {
        if rng.chance(faults.drop) {
            self.dropped += 1;
            return;
        }
        let copies = if rng.chance(faults.duplicate) {
            self.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.queue.push(Reverse(InFlight {
                deliver_at: now + rng.range(1, faults.max_delay + 1),
                order: rng.next_u64(),
                envelope: envelope.clone(),
            }));
        }
    }

    /// The next message due by `now` that its link lets through.
    pub fn next_due(&mut self, now: u64) -> Option<Envelope> {
        while self
            .queue
            .peek()
            .is_some_and(|Reverse(m)| m.deliver_at <= now)
        {
            let Reverse(message) = self.queue.pop()?;
            let envelope = message.envelope;
            if self.blocked.contains(&(envelope.from, envelope.to)) {
                self.blocked_drops += 1;
                continue;
            }
            return Some(envelope);
        }
        None
    }

    pub fn block(&mut self, from: NodeId, to: NodeId) {
        self.blocked.insert((from, to));
    }

    pub fn partition(&mut self, side: &[NodeId], all: &[NodeId]) {
        for a in side {
            for b in all.iter().filter(|b| !side.contains(b)) {
                self.block(*a, *b);
                self.block(*b, *a);
            }
        }
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }
}
