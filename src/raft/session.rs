//! Client sessions: which proposals are already committed, so a retry
//! returns the original result instead of writing the message twice.
//!
//! Every node builds the same table from the committed log, so it survives
//! leader changes and restarts.

use std::collections::{BTreeMap, HashMap};

use super::types::{Entry, Index, Lamport, RequestId, Term};

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
    New,
}

#[derive(Debug, Default)]
struct Session {
    recent: BTreeMap<u64, Committed>,
    /// Sequence numbers below this were forgotten.
    forgotten_below: u64,
}

#[derive(Debug)]
pub struct Sessions {
    window: usize,
    clients: HashMap<u64, Session>,
}

impl Sessions {
    pub fn new(window: usize) -> Self {
        Sessions {
            window,
            clients: HashMap::new(),
        }
    }

    /// Records a committed entry.
    pub fn apply(&mut self, entry: &Entry) {
        let Some(id) = entry.request_id() else {
            return;
        };
        let session = self.clients.entry(id.client_id).or_default();
        session.recent.insert(id.seq, Committed::of(entry));
        while session.recent.len() > self.window {
            if let Some((seq, _)) = session.recent.pop_first() {
                session.forgotten_below = session.forgotten_below.max(seq + 1);
            }
        }
    }

    pub fn lookup(&self, id: RequestId) -> Lookup {
        let Some(session) = self.clients.get(&id.client_id) else {
            return Lookup::New;
        };
        if let Some(committed) = session.recent.get(&id.seq) {
            return Lookup::Committed(*committed);
        }
        if id.seq < session.forgotten_below {
            return Lookup::Expired;
        }
        Lookup::New
    }
}
