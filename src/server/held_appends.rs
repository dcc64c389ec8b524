//! Appends without entries, held briefly before they leave. A leader sends
//! one to every follower that has all its entries whenever its commit index
//! moves (and one to probe a follower whose log it has yet to find). Under
//! one client each commit is followed, a client round trip later, by the
//! next message's append, which carries the same commit index: announcing
//! every commit on its own cost each follower a second round (a wake-up, a
//! step, a write) and the leader a second acknowledgement per message.
//! Held for `HOLD`, such an append is dropped if an append with entries to
//! the same follower leaves first (it says everything the empty one would
//! have), and sent otherwise. Raft tolerates a lost message; a follower
//! learns a commit at most `HOLD` later than it did.

use std::time::{Duration, Instant};

use crate::raft::{Envelope, Message, NodeId};

/// How long an append without entries waits for one with entries to make
/// it unnecessary. One client's next append comes within a client round
/// trip (0.1-0.3 ms on loopback) of the commit answered.
pub const HOLD: Duration = Duration::from_millis(1);

/// Empty appends waiting to leave, at most one per follower.
#[derive(Debug, Default)]
pub struct HeldAppends {
    held: Vec<(NodeId, Envelope, Instant)>,
}

impl HeldAppends {
    /// Takes `envelope` to hold if it is an append without entries (a newer
    /// one for the same follower replaces the older, keeping its due time,
    /// so a run of commits is announced within `HOLD` of the first). Any
    /// other message is handed back to send now; an append with entries
    /// first drops what is held for its follower.
    pub fn offer(&mut self, envelope: Envelope, now: Instant) -> Option<Envelope> {
        let to = envelope.to;
        match &envelope.message {
            Message::Append { entries, .. } if entries.is_empty() => {
                match self.held.iter_mut().find(|(peer, _, _)| *peer == to) {
                    Some(slot) => slot.1 = envelope,
                    None => self.held.push((to, envelope, now + HOLD)),
                }
                None
            }
            Message::Append { .. } => {
                self.held.retain(|(peer, _, _)| *peer != to);
                Some(envelope)
            }
            _ => Some(envelope),
        }
    }

    /// When the next held append is due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.iter().map(|(_, _, due)| *due).min()
    }

    /// The held appends due by `now`, to send. Called every round: nothing
    /// is allocated unless something is due.
    pub fn take_due(&mut self, now: Instant) -> Vec<Envelope> {
        if self.next_due().is_none_or(|due| due > now) {
            return Vec::new();
        }
        self.held
            .extract_if(.., |(_, _, due)| *due <= now)
            .map(|(_, envelope, _)| envelope)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, Payload};

    fn append(to: NodeId, commit: u64, entries: Vec<Entry>) -> Envelope {
        Envelope {
            from: 1,
            to,
            term: 1,
            lamport: 0,
            message: Message::Append {
                prev_index: 1,
                prev_term: 1,
                entries,
                commit,
                lazy: false,
            },
        }
    }

    fn entry(index: u64) -> Entry {
        Entry {
            index,
            term: 1,
            lamport: index,
            payload: Payload::Noop,
        }
    }

    fn commit_of(envelope: &Envelope) -> u64 {
        match envelope.message {
            Message::Append { commit, .. } => commit,
            _ => 0,
        }
    }

    #[test]
    fn an_empty_append_waits_and_one_with_entries_replaces_it() {
        let start = Instant::now();
        let mut held = HeldAppends::default();
        assert!(held.offer(append(2, 5, vec![]), start).is_none());
        assert!(held.offer(append(3, 5, vec![]), start).is_none());
        assert_eq!(held.next_due(), Some(start + HOLD));
        assert!(held.take_due(start).is_empty(), "not due yet");
        // Entries for node 2 carry commit 5 too: its empty append goes.
        let sent = held.offer(append(2, 5, vec![entry(2)]), start);
        assert!(sent.is_some());
        // A newer commit for node 3 replaces the held one, keeping its time.
        let later = start + HOLD / 2;
        assert!(held.offer(append(3, 6, vec![]), later).is_none());
        assert_eq!(held.next_due(), Some(start + HOLD));
        // Other messages are never held.
        let beat = Envelope {
            message: Message::TimeoutNow,
            ..append(3, 0, vec![])
        };
        assert!(held.offer(beat, later).is_some());
        let due = held.take_due(start + HOLD);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].to, commit_of(&due[0])), (3, 6));
        assert_eq!(held.next_due(), None);
    }
}
