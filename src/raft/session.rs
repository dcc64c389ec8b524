//! Client sessions: which proposals are already committed, so a retry
//! returns the original result instead of writing the message twice.
//!
//! Every node builds the same table from the committed log, so it survives
//! leader changes and restarts.

use std::collections::{BTreeMap, BTreeSet};

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
    recent: BTreeMap<u64, Committed>,
    /// Sequence numbers below this were forgotten.
    forgotten_below: u64,
    /// The index of the client's latest committed message.
    last_index: Index,
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
    /// (last activity, client) of every session, oldest first.
    by_activity: BTreeSet<(Index, u64)>,
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
            closed_upto: 0,
        }
    }

    /// Records a committed entry.
    pub fn apply(&mut self, entry: &Entry) {
        let Some(id) = entry.request_id() else {
            return;
        };
        let session = self.clients.entry(id.client_id).or_default();
        self.by_activity.remove(&(session.last_index, id.client_id));
        session.last_index = session.last_index.max(entry.index);
        self.by_activity.insert((session.last_index, id.client_id));
        session.recent.insert(id.seq, Committed::of(entry));
        while session.recent.len() > self.window {
            if let Some((seq, _)) = session.recent.pop_first() {
                session.forgotten_below = session.forgotten_below.max(seq + 1);
            }
        }
        self.close_idle(entry.index);
    }

    /// Closes the least recently active sessions beyond `max_sessions`
    /// that have been idle for at least `min_idle` entries.
    fn close_idle(&mut self, now: Index) {
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
        if let Some(committed) = session.recent.get(&id.seq) {
            return Lookup::Committed(*committed);
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
