//! Client sessions: which proposals are already committed, so a retry
//! returns the original result instead of writing the message twice.
//!
//! Every node builds the same table from the committed log, so it survives
//! leader changes and restarts.

use std::collections::{BTreeSet, VecDeque};

use super::types::{Entry, FastMap, Index, Lamport, RequestId, Term};

/// Where a committed proposal landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    pub index: Index,
    pub term: Term,
    pub lamport: Lamport,
}

impl Committed {
    pub fn of(entry: &Entry) -> Self {
        Committed {
            index: entry.index,
            term: entry.term,
            lamport: entry.lamport,
        }
    }
}

/// What the table knows about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Committed(Committed),
    /// Older than anything the window still remembers: it may or may not
    /// have been committed, so the caller must not guess.
    Expired,
    /// The client's whole session was closed (it had been idle while many
    /// other clients wrote): what it sent before may or may not be in the
    /// log, so nothing of it can be taken as new.
    SessionClosed,
    New,
}

#[derive(Debug, Default)]
struct Session {
    /// By sequence number, ascending: a client's messages mostly commit in
    /// its own order, so a new one goes at the back and the oldest leaves
    /// from the front, with no per-message tree node (a pipelined client
    /// keeps ~100,000 of them, cold in cache by the time they commit).
    recent: VecDeque<(u64, Committed)>,
    /// Sequence numbers below this were forgotten.
    forgotten_below: u64,
    /// The index of the client's latest committed message.
    last_index: Index,
}

impl Session {
    /// Records where message `seq` committed (a later record of the same
    /// number replaces the earlier, as a map would).
    fn remember(&mut self, seq: u64, committed: Committed) {
        if self.recent.back().is_none_or(|&(last, _)| last < seq) {
            self.recent.push_back((seq, committed));
            return;
        }
        match self.recent.binary_search_by_key(&seq, |&(s, _)| s) {
            Ok(at) => self.recent[at].1 = committed,
            Err(at) => self.recent.insert(at, (seq, committed)),
        }
    }

    fn find(&self, seq: u64) -> Option<Committed> {
        // A new message's number is past every one recorded: no search
        // through a queue that is cold by now.
        if self.recent.back().is_none_or(|&(last, _)| last < seq) {
            return None;
        }
        self.recent
            .binary_search_by_key(&seq, |&(s, _)| s)
            .ok()
            .map(|at| self.recent[at].1)
    }
}

/// Every node builds the same table from the same committed log, so every
/// node closes the same sessions at the same log position: sessions are
/// closed in the order of their last activity, once there are more than
/// `max_sessions`, and only if idle for `min_idle` entries.
#[derive(Debug)]
pub struct Sessions {
    window: usize,
    max_sessions: usize,
    min_idle: Index,
    clients: FastMap<u64, Session>,
    /// (last activity, client) of every session, oldest first, except
    /// for `touched`'s.
    by_activity: BTreeSet<(Index, u64)>,
    /// The client of the latest entry applied, and its key in
    /// `by_activity` (if any), which is stale: a run of one client's
    /// entries moves its key once, when another client's entry comes or
    /// sessions must be closed, instead of once per entry.
    touched: Option<(u64, Option<Index>)>,
    /// Every closed session's last activity was at or below this index.
    closed_upto: Index,
}

impl Sessions {
    pub fn new(window: usize, max_sessions: usize, min_idle: Index) -> Self {
        Sessions {
            window,
            max_sessions: max_sessions.max(1),
            min_idle,
            clients: FastMap::default(),
            by_activity: BTreeSet::new(),
            touched: None,
            closed_upto: 0,
        }
    }

    /// Records a committed entry.
    pub fn apply(&mut self, entry: &Entry) {
        let Some(id) = entry.request_id() else {
            return;
        };
        if self
            .touched
            .is_some_and(|(client, _)| client != id.client_id)
        {
            self.settle_activity();
        }
        let session = self.clients.entry(id.client_id).or_default();
        if self.touched.is_none() {
            // A session in the table has a key (its entries' indexes
            // start at 1); a new one has none yet.
            let key = (session.last_index > 0).then_some(session.last_index);
            self.touched = Some((id.client_id, key));
        }
        session.last_index = session.last_index.max(entry.index);
        session.remember(id.seq, Committed::of(entry));
        while session.recent.len() > self.window {
            if let Some((seq, _)) = session.recent.pop_front() {
                session.forgotten_below = session.forgotten_below.max(seq + 1);
            }
        }
        self.close_idle(entry.index);
    }

    /// Moves the touched client's key in `by_activity` to its session's
    /// last activity.
    fn settle_activity(&mut self) {
        let Some((client, key)) = self.touched.take() else {
            return;
        };
        if let Some(last) = key {
            self.by_activity.remove(&(last, client));
        }
        if let Some(session) = self.clients.get(&client) {
            self.by_activity.insert((session.last_index, client));
        }
    }

    /// Closes the least recently active sessions beyond `max_sessions`
    /// that have been idle for at least `min_idle` entries.
    fn close_idle(&mut self, now: Index) {
        if self.clients.len() > self.max_sessions {
            self.settle_activity();
        }
        while self.clients.len() > self.max_sessions {
            let Some(&(last, client)) = self.by_activity.first() else {
                return;
            };
            if now.saturating_sub(last) < self.min_idle {
                return;
            }
            self.by_activity.pop_first();
            self.clients.remove(&client);
            self.closed_upto = self.closed_upto.max(last);
        }
    }

    /// `since` is an index the client knows to be below every message it
    /// ever sent: a client unknown to the table is new only if no closed
    /// session can have been its own. `horizon` is the commit index: a
    /// session idle for `min_idle` entries by then may be closed by an
    /// entry committed but not yet applied, so its client is told to start
    /// a new one rather than have its session closed and started afresh
    /// around a new message (which would forget what it had committed).
    pub fn lookup(&self, id: RequestId, since: Index, horizon: Index) -> Lookup {
        let Some(session) = self.clients.get(&id.client_id) else {
            return if since < self.closed_upto {
                Lookup::SessionClosed
            } else {
                Lookup::New
            };
        };
        if let Some(committed) = session.find(id.seq) {
            return Lookup::Committed(committed);
        }
        if horizon.saturating_sub(session.last_index) >= self.min_idle {
            return Lookup::SessionClosed;
        }
        if id.seq < session.forgotten_below {
            return Lookup::Expired;
        }
        Lookup::New
    }

    /// How many sessions are open, for status.
    pub fn open(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::rng::Rng;
    use super::super::types::{Command, Payload};
    use super::*;

    /// The table as it was before `recent` became a sorted queue and
    /// `by_activity` lazy: a map per session, every key moved at once.
    #[derive(Default)]
    struct Model {
        clients: BTreeMap<u64, (BTreeMap<u64, Committed>, u64, Index)>,
        by_activity: BTreeSet<(Index, u64)>,
        closed_upto: Index,
    }

    impl Model {
        fn apply(&mut self, entry: &Entry, window: usize, max: usize, min_idle: Index) {
            let id = entry.request_id().expect("a command");
            let (recent, forgotten, last) = self.clients.entry(id.client_id).or_default();
            self.by_activity.remove(&(*last, id.client_id));
            *last = (*last).max(entry.index);
            self.by_activity.insert((*last, id.client_id));
            recent.insert(id.seq, Committed::of(entry));
            while recent.len() > window {
                if let Some((seq, _)) = recent.pop_first() {
                    *forgotten = (*forgotten).max(seq + 1);
                }
            }
            while self.clients.len() > max {
                let Some(&(last, client)) = self.by_activity.first() else {
                    break;
                };
                if entry.index.saturating_sub(last) < min_idle {
                    break;
                }
                self.by_activity.pop_first();
                self.clients.remove(&client);
                self.closed_upto = self.closed_upto.max(last);
            }
        }

        fn lookup(&self, id: RequestId, since: Index, horizon: Index, min_idle: Index) -> Lookup {
            let Some((recent, forgotten, last)) = self.clients.get(&id.client_id) else {
                return if since < self.closed_upto {
                    Lookup::SessionClosed
                } else {
                    Lookup::New
                };
            };
            if let Some(committed) = recent.get(&id.seq) {
                return Lookup::Committed(*committed);
            }
            if horizon.saturating_sub(*last) >= min_idle {
                return Lookup::SessionClosed;
            }
            if id.seq < *forgotten {
                return Lookup::Expired;
            }
            Lookup::New
        }
    }

    fn command(index: Index, client_id: u64, seq: u64) -> Entry {
        Entry {
            index,
            term: 1,
            lamport: index,
            payload: Payload::Command(Command {
                client_id,
                seq,
                sender: "c".into(),
                data: Default::default(),
            }),
        }
    }

    /// Runs of one client's messages, sometimes out of their order or
    /// repeated, from more clients than the table keeps: every answer and
    /// every session closed is the model's.
    #[test]
    fn the_table_answers_as_a_map_per_session_would() {
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let (window, max, min_idle) = (
                rng.range(1, 8) as usize,
                rng.range(1, 4) as usize,
                rng.range(0, 6),
            );
            let mut table = Sessions::new(window, max, min_idle);
            let mut model = Model::default();
            let mut next_seq = [1u64; 5];
            let mut index = 0;
            for _ in 0..300 {
                let client = rng.range(0, 5);
                for _ in 0..rng.range(1, 5) {
                    index += 1;
                    let next = &mut next_seq[client as usize];
                    let seq = if rng.chance(0.2) {
                        rng.range(1, *next + 2)
                    } else {
                        *next += 1;
                        *next - 1
                    };
                    let entry = command(index, client, seq);
                    table.apply(&entry);
                    model.apply(&entry, window, max, min_idle);
                    assert_eq!(table.open(), model.clients.len(), "seed {seed}");
                    for probe in 0..5 {
                        for seq in 1..next_seq[probe as usize] + 2 {
                            let id = RequestId {
                                client_id: probe,
                                seq,
                            };
                            let since = rng.range(0, index + 1);
                            let horizon = index + rng.range(0, 3);
                            assert_eq!(
                                table.lookup(id, since, horizon),
                                model.lookup(id, since, horizon, min_idle),
                                "seed {seed}, index {index}, {id:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
