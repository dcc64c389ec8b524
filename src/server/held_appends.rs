//! A leader's appends that can wait, held briefly before they leave.
//!
//! Appends without entries: a leader sends one to every follower that has
//! all its entries whenever its commit index moves (and one to probe a
//! follower whose log it has yet to find). Under one client each commit is
//! followed, a client round trip later, by the next message's append, which
//! carries the same commit index: announcing every commit on its own cost
//! each follower a second round (a wake-up, a step, a write) and the leader
//! a second acknowledgement per message. Held for `HOLD`, such an append is
//! dropped if an append with entries to the same follower leaves first (it
//! says everything the empty one would have), and sent otherwise. Raft
//! tolerates a lost message; a follower learns a commit at most `HOLD`
//! later than it did (a lazy follower, below, `LAZY_HOLD`).
//!
//! Lazy appends (`Message::Append::lazy`: commit does not wait for that
//! follower, which syncs them up to `persist::LINGER` later anyway): held
//! for `LAZY_HOLD`, and the next ones to the same follower merged into
//! them while they continue its entries. Under 64 clients the lazy
//! follower took one append per leader round (~3,000 a second), each a
//! QUIC packet, a wake-up, a step and a write on a machine whose cores
//! every node shares; merged, a few hundred. Anything else for that
//! follower (an urgent append, a heartbeat, a vote) first sends what is
//! held, so its appends keep the order the core made them in (the
//! transport carries appends on one ordered stream and everything else on
//! another, which may overtake it, as Raft allows); a commit index said
//! urgently (the follower now counts for commit) takes the held append
//! along at once, marked urgent, since only an urgent append makes a lazy
//! follower sync what it staged.

use std::time::{Duration, Instant};

use crate::raft::{Entry, Envelope, Index, Message, NodeId, Term};

/// How long an append without entries waits for one with entries to make
/// it unnecessary. One client's next append comes within a client round
/// trip (0.1-0.3 ms on loopback) of the commit answered.
pub const HOLD: Duration = Duration::from_millis(1);

/// How long a lazy append waits for later ones to merge with. Well under
/// the follower's own linger (`persist::LINGER`, 5 ms), so a lazy follower
/// stays within a few milliseconds of the log.
pub const LAZY_HOLD: Duration = Duration::from_millis(2);

/// A lazy append held for its follower, with its entries' bytes.
#[derive(Debug)]
struct HeldLazy {
    envelope: Envelope,
    due: Instant,
    bytes: usize,
}

/// Appends waiting to leave, at most one of each kind per follower.
#[derive(Debug)]
pub struct HeldAppends {
    /// Appends without entries.
    empty: Vec<(NodeId, Envelope, Instant)>,
    /// Lazy appends with entries, merged.
    lazy: Vec<HeldLazy>,
    /// Most entries, and bytes of entries (`Entry::size`), one merged
    /// append carries: the core's own limits on one append
    /// (`Config::max_append_entries`, `max_append_bytes`), so a merged
    /// append of the largest messages still fits a frame.
    max_entries: usize,
    max_bytes: usize,
    /// Appends merged into one held (or absorbed by it) since the last
    /// `take_merged`.
    merged: u64,
}

impl HeldAppends {
    /// Holds appends for a leader whose core makes appends of at most
    /// `max_entries` entries and `max_bytes` bytes of them.
    pub fn new(max_entries: usize, max_bytes: usize) -> HeldAppends {
        HeldAppends {
            empty: Vec::new(),
            lazy: Vec::new(),
            max_entries,
            max_bytes,
            merged: 0,
        }
    }

    /// How many appends were merged into (or absorbed by) a held one
    /// since the last call: the messages the hold saved.
    pub fn take_merged(&mut self) -> u64 {
        std::mem::take(&mut self.merged)
    }

    /// Takes `envelope`, and puts what must leave now into `out`, in order:
    /// an append without entries is held (a newer one for the same
    /// follower replaces the older, keeping its due time, so a run of
    /// commits is announced within `HOLD` of the first; one that only
    /// says a commit index to a follower whose lazy append is held raises
    /// that append's commit instead); a lazy append is held or merged into
    /// the one held; anything else is handed back, after what is held for
    /// its follower, and an append with entries drops the held empty one.
    pub fn offer(&mut self, envelope: Envelope, now: Instant, out: &mut Vec<Envelope>) {
        let to = envelope.to;
        let lazy = self.lazy.iter().position(|held| held.envelope.to == to);
        match &envelope.message {
            Message::Append { entries, .. } if entries.is_empty() => {
                let Some(i) = lazy else {
                    self.hold_empty(envelope, now);
                    return;
                };
                match absorb_commit(&mut self.lazy[i].envelope, envelope) {
                    Absorbed::Held => self.merged += 1,
                    Absorbed::SendHeld => {
                        self.merged += 1;
                        out.push(self.lazy.swap_remove(i).envelope);
                    }
                    Absorbed::Apart(envelope) => {
                        out.push(self.lazy.swap_remove(i).envelope);
                        self.hold_empty(envelope, now);
                    }
                }
            }
            Message::Append {
                lazy: true,
                entries,
                ..
            } => {
                self.empty.retain(|(peer, _, _)| *peer != to);
                let bytes = entries.iter().map(Entry::size).sum();
                let fresh = |envelope| HeldLazy {
                    envelope,
                    due: now + LAZY_HOLD,
                    bytes,
                };
                match lazy {
                    Some(i) => {
                        let held = &mut self.lazy[i];
                        if held.bytes + bytes > self.max_bytes {
                            out.push(std::mem::replace(held, fresh(envelope)).envelope);
                        } else if let Some(next) =
                            merge(&mut held.envelope, envelope, self.max_entries)
                        {
                            out.push(std::mem::replace(held, fresh(next)).envelope);
                        } else {
                            held.bytes += bytes;
                            self.merged += 1;
                        }
                    }
                    None => self.lazy.push(fresh(envelope)),
                }
            }
            message => {
                if matches!(message, Message::Append { .. }) {
                    self.empty.retain(|(peer, _, _)| *peer != to);
                }
                if let Some(i) = lazy {
                    out.push(self.lazy.swap_remove(i).envelope);
                }
                out.push(envelope);
            }
        }
    }

    fn hold_empty(&mut self, envelope: Envelope, now: Instant) {
        match self
            .empty
            .iter_mut()
            .find(|(peer, _, _)| *peer == envelope.to)
        {
            Some(slot) => slot.1 = envelope,
            None => self.empty.push((envelope.to, envelope, now + HOLD)),
        }
    }

    /// When the next held append is due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.lazy
            .iter()
            .map(|held| held.due)
            .chain(self.empty.iter().map(|(_, _, due)| *due))
            .min()
    }

    /// The held appends due by `now`, to send (a follower has a lazy one or
    /// an empty one held, never both). Called every round: nothing is
    /// allocated unless something is due.
    pub fn take_due(&mut self, now: Instant) -> Vec<Envelope> {
        if self.next_due().is_none_or(|due| due > now) {
            return Vec::new();
        }
        let mut due: Vec<Envelope> = self
            .lazy
            .extract_if(.., |held| held.due <= now)
            .map(|held| held.envelope)
            .collect();
        due.extend(
            self.empty
                .extract_if(.., |(_, _, due)| *due <= now)
                .map(|(_, envelope, _)| envelope),
        );
        due
    }
}

/// The last entry `held` carries, if it is an append with entries.
fn last_entry(held: &Envelope) -> Option<(Index, Term)> {
    match &held.message {
        Message::Append { entries, .. } => entries.last().map(|e| (e.index, e.term)),
        _ => None,
    }
}

/// Whether `next`, an append of the same term, starts right after `held`.
fn continues(held: &Envelope, next: &Envelope) -> bool {
    match &next.message {
        Message::Append {
            prev_index,
            prev_term,
            ..
        } => held.term == next.term && last_entry(held) == Some((*prev_index, *prev_term)),
        _ => false,
    }
}

/// What became of an append without entries offered to a follower whose
/// lazy append is held.
enum Absorbed {
    /// Lazy, it continues the held append: the held one says its commit.
    Held,
    /// Urgent (the follower became one commit waits for), it continues the
    /// held append: the held one, urgent now and with its commit, must
    /// leave at once: the follower syncs what it staged only when told.
    SendHeld,
    /// It does not continue the held append (a probe elsewhere in the
    /// log): it must leave after it.
    Apart(Envelope),
}

/// Takes the commit index of `empty`, an append without entries, into
/// `held` if it continues it.
fn absorb_commit(held: &mut Envelope, empty: Envelope) -> Absorbed {
    if !continues(held, &empty) {
        return Absorbed::Apart(empty);
    }
    let Message::Append {
        commit: newer,
        lazy: still_lazy,
        ..
    } = empty.message
    else {
        return Absorbed::Apart(empty);
    };
    held.lamport = held.lamport.max(empty.lamport);
    if let Message::Append { commit, lazy, .. } = &mut held.message {
        *commit = (*commit).max(newer);
        *lazy &= still_lazy;
    }
    if still_lazy {
        Absorbed::Held
    } else {
        Absorbed::SendHeld
    }
}

/// Appends the entries of `next` to `held` if `next` continues it and the
/// two have at most `max_entries`; hands `next` back otherwise.
fn merge(held: &mut Envelope, next: Envelope, max_entries: usize) -> Option<Envelope> {
    let fits = match (&held.message, &next.message) {
        (Message::Append { entries: a, .. }, Message::Append { entries: b, .. }) => {
            a.len() + b.len() <= max_entries
        }
        _ => false,
    };
    if !fits || !continues(held, &next) {
        return Some(next);
    }
    held.lamport = held.lamport.max(next.lamport);
    if let (
        Message::Append {
            entries: held_entries,
            commit: held_commit,
            ..
        },
        Message::Append {
            entries, commit, ..
        },
    ) = (&mut held.message, next.message)
    {
        held_entries.extend(entries);
        *held_commit = (*held_commit).max(commit);
    }
    None
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

    /// An append to `to` after entry `prev` of entries `indexes`.
    fn lazy_append(to: NodeId, prev: u64, indexes: std::ops::RangeInclusive<u64>) -> Envelope {
        let entries: Vec<Entry> = indexes.map(entry).collect();
        Envelope {
            lamport: entries.last().map_or(0, |e| e.lamport),
            message: Message::Append {
                prev_index: prev,
                prev_term: 1,
                commit: prev,
                entries,
                lazy: true,
            },
            ..append(to, 0, vec![])
        }
    }

    fn empty_after(to: NodeId, prev: u64, commit: u64, lazy: bool) -> Envelope {
        Envelope {
            message: Message::Append {
                prev_index: prev,
                prev_term: 1,
                entries: vec![],
                commit,
                lazy,
            },
            ..append(to, 0, vec![])
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

    /// (prev_index, first and last entry, commit) of an append.
    fn shape(envelope: &Envelope) -> (u64, Option<(u64, u64)>, u64) {
        match &envelope.message {
            Message::Append {
                prev_index,
                entries,
                commit,
                ..
            } => (
                *prev_index,
                entries
                    .first()
                    .zip(entries.last())
                    .map(|(a, b)| (a.index, b.index)),
                *commit,
            ),
            other => panic!("not an append: {other:?}"),
        }
    }

    fn offered(held: &mut HeldAppends, envelope: Envelope, now: Instant) -> Vec<Envelope> {
        let mut out = Vec::new();
        held.offer(envelope, now, &mut out);
        out
    }

    #[test]
    fn an_empty_append_waits_and_one_with_entries_replaces_it() {
        let start = Instant::now();
        let mut held = HeldAppends::new(1024, 4 << 20);
        assert!(offered(&mut held, append(2, 5, vec![]), start).is_empty());
        assert!(offered(&mut held, append(3, 5, vec![]), start).is_empty());
        assert_eq!(held.next_due(), Some(start + HOLD));
        assert!(held.take_due(start).is_empty(), "not due yet");
        // Entries for node 2 carry commit 5 too: its empty append goes.
        let sent = offered(&mut held, append(2, 5, vec![entry(2)]), start);
        assert_eq!(sent.len(), 1);
        // A newer commit for node 3 replaces the held one, keeping its time.
        let later = start + HOLD / 2;
        assert!(offered(&mut held, append(3, 6, vec![]), later).is_empty());
        assert_eq!(held.next_due(), Some(start + HOLD));
        // Other messages are never held.
        let beat = Envelope {
            message: Message::TimeoutNow,
            ..append(3, 0, vec![])
        };
        assert_eq!(offered(&mut held, beat, later).len(), 1);
        let due = held.take_due(start + HOLD);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].to, commit_of(&due[0])), (3, 6));
        assert_eq!(held.next_due(), None);
    }

    /// Lazy appends that continue each other leave as one, with the latest
    /// commit index, when the first is due.
    #[test]
    fn lazy_appends_merge_until_due() {
        let start = Instant::now();
        let mut held = HeldAppends::new(1024, 4 << 20);
        assert!(offered(&mut held, lazy_append(2, 1, 2..=3), start).is_empty());
        let later = start + LAZY_HOLD / 2;
        assert!(offered(&mut held, lazy_append(2, 3, 4..=4), later).is_empty());
        // Only a new commit index for node 2: the held append says it.
        assert!(offered(&mut held, empty_after(2, 4, 4, true), later).is_empty());
        assert_eq!(held.next_due(), Some(start + LAZY_HOLD));
        assert!(held.take_due(later).is_empty(), "not due yet");
        let due = held.take_due(start + LAZY_HOLD);
        assert_eq!(due.len(), 1);
        assert_eq!(shape(&due[0]), (1, Some((2, 4)), 4));
        assert_eq!(due[0].lamport, 4);
        assert_eq!(held.next_due(), None);
        // The follower became urgent: the commit index, said urgently, takes
        // the held append with it at once, urgent too (the follower syncs
        // its staged entries only for an urgent append).
        offered(&mut held, lazy_append(2, 4, 5..=6), start);
        let sent = offered(&mut held, empty_after(2, 6, 6, false), start);
        assert_eq!(
            sent.iter().map(shape).collect::<Vec<_>>(),
            [(4, Some((5, 6)), 6)]
        );
        assert!(matches!(
            sent[0].message,
            Message::Append { lazy: false, .. }
        ));
        assert_eq!(held.next_due(), None);
    }

    /// Merged appends stay within one append's bytes: four messages of
    /// 1.5 MB leave as two appends of two, never one frame of 6 MB.
    #[test]
    fn merged_lazy_appends_stay_within_an_appends_bytes() {
        let start = Instant::now();
        let mut held = HeldAppends::new(1024, 4 << 20);
        let big = |index: u64| Entry {
            payload: Payload::Command(crate::raft::Command {
                client_id: 1,
                seq: index,
                sender: "alice".into(),
                data: vec![b'x'; 1_500_000].into(),
            }),
            ..entry(index)
        };
        let mut sent = Vec::new();
        for index in 2..=5 {
            let mut append = lazy_append(2, index - 1, index..=index);
            if let Message::Append { entries, .. } = &mut append.message {
                *entries = vec![big(index)];
            }
            sent.extend(offered(&mut held, append, start));
        }
        sent.extend(held.take_due(start + LAZY_HOLD));
        assert_eq!(
            sent.iter().map(shape).collect::<Vec<_>>(),
            [(1, Some((2, 3)), 2), (3, Some((4, 5)), 4)]
        );
    }

    /// Whatever else goes to a follower leaves after its held lazy append,
    /// in the order offered; an append that does not continue it, or would
    /// make it too long, sends it and is held in its place.
    #[test]
    fn a_held_lazy_append_leaves_before_anything_after_it() {
        let start = Instant::now();
        let mut held = HeldAppends::new(1024, 4 << 20);
        let beat = Envelope {
            message: Message::Heartbeat {
                commit: 3,
                read_seq: 1,
            },
            ..append(2, 0, vec![])
        };
        // A heartbeat.
        offered(&mut held, lazy_append(2, 1, 2..=3), start);
        let sent = offered(&mut held, beat, start);
        assert_eq!(shape(&sent[0]), (1, Some((2, 3)), 1));
        assert!(matches!(sent[1].message, Message::Heartbeat { .. }));
        // An urgent append (the follower became the one commit waits for).
        offered(&mut held, lazy_append(2, 3, 4..=5), start);
        let urgent = Envelope {
            message: Message::Append {
                prev_index: 5,
                prev_term: 1,
                entries: vec![entry(6)],
                commit: 5,
                lazy: false,
            },
            ..append(2, 0, vec![])
        };
        let sent = offered(&mut held, urgent, start);
        assert_eq!(
            sent.iter().map(shape).collect::<Vec<_>>(),
            [(3, Some((4, 5)), 3), (5, Some((6, 6)), 5)]
        );
        // A probe elsewhere in the log: the held append first, the probe held.
        offered(&mut held, lazy_append(2, 6, 7..=7), start);
        let sent = offered(&mut held, empty_after(2, 2, 6, false), start);
        assert_eq!(
            sent.iter().map(shape).collect::<Vec<_>>(),
            [(6, Some((7, 7)), 6)]
        );
        assert_eq!(
            held.take_due(start + HOLD)
                .iter()
                .map(shape)
                .collect::<Vec<_>>(),
            [(2, None, 6)]
        );
        // A resend from further back does not continue the held append.
        offered(&mut held, lazy_append(2, 7, 8..=9), start);
        let sent = offered(&mut held, lazy_append(2, 4, 5..=9), start);
        assert_eq!(
            sent.iter().map(shape).collect::<Vec<_>>(),
            [(7, Some((8, 9)), 7)]
        );
        // Too long to merge: the held one leaves, the new one waits.
        let long = 1024;
        let sent = offered(&mut held, lazy_append(2, 9, 10..=9 + long), start);
        assert_eq!(
            sent.iter().map(shape).collect::<Vec<_>>(),
            [(4, Some((5, 9)), 4)]
        );
        // Other followers' appends are held apart.
        assert!(offered(&mut held, lazy_append(3, 9, 10..=10), start).is_empty());
        let due = held.take_due(start + LAZY_HOLD);
        assert_eq!(
            due.iter().map(|e| (e.to, shape(e))).collect::<Vec<_>>(),
            [
                (2, (9, Some((10, 9 + long)), 9)),
                (3, (9, Some((10, 10)), 9))
            ]
        );
    }
}
