//! The leader's uncommitted proposals, by client and sequence number, each
//! with the proposals (their `Proposal::ctx`) awaiting its answer.
//!
//! One queue per client rather than one hash map over every request id: a
//! pipelined client across an ocean keeps ~100,000 proposals here, and a
//! hash map spreads them over megabytes, so each of the four lookups,
//! inserts and removals per message was a cache miss. A client's messages
//! come in sequence order and commit in log order, so its queue is used at
//! its two ends, which stay in the cache. What comes out of order (a retry,
//! a client that does not count up) goes to an ordered map beside it, so
//! no client can make an operation cost more than a logarithm.

use std::collections::{BTreeMap, VecDeque};

use super::types::{FastMap, RequestId};

/// The proposals awaiting one pending entry's answer on this leader:
/// nearly always one, held inline; none for an entry it found in its log
/// when elected; more for a retry sent before the first attempt's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Awaited {
    first: Option<u64>,
    more: Vec<u64>,
}

impl Awaited {
    pub(super) fn by(ctx: u64) -> Self {
        Awaited {
            first: Some(ctx),
            more: Vec::new(),
        }
    }

    pub(super) fn add(&mut self, ctx: u64) {
        match self.first {
            None => self.first = Some(ctx),
            Some(_) => self.more.push(ctx),
        }
    }

    /// Each awaiting proposal's ctx, the first first.
    pub(super) fn ctxs(self) -> impl Iterator<Item = u64> {
        self.first.into_iter().chain(self.more)
    }
}

/// Uncommitted proposals in the leader's log (see the module's doc).
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Small empty entries stay while there are few (a client waiting for
    /// each answer before its next message would otherwise allocate and
    /// free its queue per message), so clients that have come and gone
    /// cost at most `IDLE_CLIENTS_KEPT` entries of `IDLE_QUEUE_KEPT`
    /// slots; a pipelined client's long queue goes when it empties.
    clients: FastMap<u64, ClientPending>,
}

/// Entries of clients with nothing pending kept (see `Pending::clients`).
const IDLE_CLIENTS_KEPT: usize = 1024;
/// The most slots an idle client's kept queue may hold.
const IDLE_QUEUE_KEPT: usize = 16;

/// One client's uncommitted proposals.
#[derive(Debug, Default)]
struct ClientPending {
    /// Those that came in increasing sequence order, as a client sends
    /// them: the next to commit at the front, the newest at the back.
    /// `None`: removed out of turn, dropped once it reaches an end.
    in_order: VecDeque<(u64, Option<Awaited>)>,
    /// Those that came below the newest in `in_order` (a retry, or a
    /// client that does not count up).
    others: BTreeMap<u64, Awaited>,
}

impl ClientPending {
    /// Where `seq` is in `in_order`, if there.
    fn position(&self, seq: u64) -> Option<usize> {
        let (front, back) = (self.in_order.front()?.0, self.in_order.back()?.0);
        if seq == back {
            return Some(self.in_order.len() - 1);
        }
        if seq == front {
            return Some(0);
        }
        if seq < front || seq > back {
            return None;
        }
        self.in_order.binary_search_by_key(&seq, |(s, _)| *s).ok()
    }

    fn get(&self, seq: u64) -> Option<&Awaited> {
        match self.position(seq) {
            Some(at) => self.in_order.get(at)?.1.as_ref(),
            None => self.others.get(&seq),
        }
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Awaited> {
        match self.position(seq) {
            Some(at) => self.in_order.get_mut(at)?.1.as_mut(),
            None => self.others.get_mut(&seq),
        }
    }

    fn insert(&mut self, seq: u64, awaited: Awaited) {
        if self.in_order.back().is_none_or(|(last, _)| seq > *last) {
            self.in_order.push_back((seq, Some(awaited)));
            return;
        }
        match self.position(seq).and_then(|at| self.in_order.get_mut(at)) {
            Some(slot) => slot.1 = Some(awaited),
            None => {
                self.others.insert(seq, awaited);
            }
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Awaited> {
        let Some(at) = self.position(seq) else {
            return self.others.remove(&seq);
        };
        let awaited = self.in_order.get_mut(at)?.1.take();
        while self.in_order.front().is_some_and(|(_, a)| a.is_none()) {
            self.in_order.pop_front();
        }
        while self.in_order.back().is_some_and(|(_, a)| a.is_none()) {
            self.in_order.pop_back();
        }
        awaited
    }

    fn is_empty(&self) -> bool {
        self.in_order.is_empty() && self.others.is_empty()
    }

    fn into_iter(self) -> impl Iterator<Item = (u64, Awaited)> {
        self.in_order
            .into_iter()
            .filter_map(|(seq, awaited)| Some((seq, awaited?)))
            .chain(self.others)
    }
}

impl Pending {
    pub(super) fn contains(&self, id: RequestId) -> bool {
        self.clients
            .get(&id.client_id)
            .is_some_and(|client| client.get(id.seq).is_some())
    }

    pub(super) fn get_mut(&mut self, id: RequestId) -> Option<&mut Awaited> {
        self.clients.get_mut(&id.client_id)?.get_mut(id.seq)
    }

    pub(super) fn insert(&mut self, id: RequestId, awaited: Awaited) {
        self.clients
            .entry(id.client_id)
            .or_default()
            .insert(id.seq, awaited);
    }

    pub(super) fn remove(&mut self, id: RequestId) -> Option<Awaited> {
        let many = self.clients.len() > IDLE_CLIENTS_KEPT;
        let client = self.clients.get_mut(&id.client_id)?;
        let awaited = client.remove(id.seq);
        if client.is_empty() && (many || client.in_order.capacity() > IDLE_QUEUE_KEPT) {
            self.clients.remove(&id.client_id);
        }
        awaited
    }

    /// Empties the table, yielding every proposal in it.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = (RequestId, Awaited)> {
        std::mem::take(&mut self.clients)
            .into_iter()
            .flat_map(|(client_id, client)| {
                client
                    .into_iter()
                    .map(move |(seq, awaited)| (RequestId { client_id, seq }, awaited))
            })
    }
}

impl FromIterator<(RequestId, Awaited)> for Pending {
    fn from_iter<I: IntoIterator<Item = (RequestId, Awaited)>>(iter: I) -> Self {
        let mut pending = Pending::default();
        for (id, awaited) in iter {
            pending.insert(id, awaited);
        }
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client_id: u64, seq: u64) -> RequestId {
        RequestId { client_id, seq }
    }

    #[test]
    fn finds_and_removes_by_client_and_sequence() {
        let mut pending = Pending::default();
        // In order, out of order, and a second client.
        for seq in [1, 2, 3, 10, 5] {
            pending.insert(id(7, seq), Awaited::by(seq * 100));
        }
        pending.insert(id(8, 1), Awaited::default());
        assert!(pending.contains(id(7, 5)));
        assert!(!pending.contains(id(7, 4)));
        assert!(!pending.contains(id(9, 1)));
        if let Some(awaited) = pending.get_mut(id(7, 3)) {
            awaited.add(301);
        }
        let ctxs: Vec<u64> = pending.remove(id(7, 3)).unwrap().ctxs().collect();
        assert_eq!(ctxs, vec![300, 301]);
        assert_eq!(pending.remove(id(7, 3)), None);
        assert_eq!(pending.remove(id(8, 1)), Some(Awaited::default()));
        assert!(!pending.contains(id(8, 1)));
        let mut left: Vec<(RequestId, Vec<u64>)> = pending
            .drain()
            .map(|(id, awaited)| (id, awaited.ctxs().collect()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                (id(7, 1), vec![100]),
                (id(7, 2), vec![200]),
                (id(7, 5), vec![500]),
                (id(7, 10), vec![1000]),
            ]
        );
        assert!(pending.clients.is_empty());
    }

    /// Removals out of turn leave gaps that are skipped, and a seq below
    /// the newest goes beside the queue; every one is found and removed.
    #[test]
    fn out_of_turn_removals_and_late_arrivals_are_kept_apart() {
        let mut pending = Pending::default();
        for seq in 10..20 {
            pending.insert(id(1, seq), Awaited::by(seq));
        }
        assert!(pending.remove(id(1, 15)).is_some());
        assert!(!pending.contains(id(1, 15)));
        // Back in, where it was.
        pending.insert(id(1, 15), Awaited::by(150));
        pending.insert(id(1, 5), Awaited::by(5));
        pending.insert(id(1, 30), Awaited::by(30));
        for (seq, ctx) in [(19, 19), (15, 150), (5, 5), (10, 10), (30, 30)] {
            assert!(pending.contains(id(1, seq)), "{seq}");
            let ctxs: Vec<u64> = pending.remove(id(1, seq)).unwrap().ctxs().collect();
            assert_eq!(ctxs, vec![ctx]);
            assert!(!pending.contains(id(1, seq)));
        }
        let left: Vec<u64> = pending.drain().map(|(id, _)| id.seq).collect();
        assert_eq!(left, vec![11, 12, 13, 14, 16, 17, 18]);
    }

    /// Past `IDLE_CLIENTS_KEPT` clients, an emptied client's entry goes.
    #[test]
    fn idle_clients_are_not_kept_without_bound() {
        let mut pending = Pending::default();
        for client in 0..3 * IDLE_CLIENTS_KEPT as u64 {
            pending.insert(id(client, 1), Awaited::by(client));
            assert!(pending.remove(id(client, 1)).is_some());
        }
        assert!(pending.clients.len() <= IDLE_CLIENTS_KEPT + 1);
        // A long queue goes as soon as it empties.
        for seq in 0..1000 {
            pending.insert(id(1, seq), Awaited::by(seq));
        }
        for seq in 0..1000 {
            assert!(pending.remove(id(1, seq)).is_some());
        }
        assert!(!pending.clients.contains_key(&1));
    }
}
