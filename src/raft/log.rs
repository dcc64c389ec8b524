//! The in-memory view of a node's log, and which part of it still has to be
//! written to disk.

use std::collections::VecDeque;

use super::types::{Entry, Index, Term};

/// A pending change to the durable log: keep entries before `from`, then
/// append `entries` (which start at `from`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogWrite {
    pub from: Index,
    pub entries: Vec<Entry>,
}

impl LogWrite {
    /// The last entry this write leaves in the log, which the runtime reports
    /// back through `RaftNode::persisted` once it is durable.
    pub fn last(&self) -> Option<(Index, Term)> {
        self.entries.last().map(|e| (e.index, e.term))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("log entry at position {position} has index {found}, expected {expected}")]
    Gap {
        position: usize,
        found: Index,
        expected: Index,
    },
    #[error("log entry {index} has term {term}, lower than the term {previous} before it")]
    TermRegression {
        index: Index,
        term: Term,
        previous: Term,
    },
}

/// The log as the core sees it. Every entry's term is known (as runs of
/// equal terms, a few bytes per term), but only the tail of the entries is
/// held in memory: entries at or below `offset` are committed, applied and
/// durable, and were released to the store. The leader asks its driver for
/// them when a lagging follower needs them (`Ready::fetches`).
#[derive(Debug, Default)]
pub struct RaftLog {
    /// `entries[i]` has index `offset + i + 1`. A deque: releasing from
    /// the front moves nothing (a `Vec` moved every entry it kept, the
    /// unapplied tail included, at each release).
    entries: VecDeque<Entry>,
    /// Entries up to here were released from memory.
    offset: Index,
    /// `(first index, term)` of each run of equal terms, over the whole log.
    terms: Vec<(Index, Term)>,
    /// Everything at or below this index is known durable.
    persisted: Index,
    /// Lowest index changed since the last `take_write`, if any.
    dirty_from: Option<Index>,
}

impl RaftLog {
    /// Rebuilds the log from what the store returned, checking that it is a
    /// well-formed Raft log.
    pub fn restore(entries: Vec<Entry>) -> Result<Self, LogError> {
        let mut log = RaftLog::default();
        for entry in entries {
            log.push_restored(entry)?;
        }
        Ok(log)
    }

    /// Adds the next entry read back from the store (durable already),
    /// checking that the log stays well-formed.
    pub fn push_restored(&mut self, entry: Entry) -> Result<(), LogError> {
        let expected = self.last_index() + 1;
        if entry.index != expected {
            return Err(LogError::Gap {
                position: (expected - 1) as usize,
                found: entry.index,
                expected,
            });
        }
        let previous = self.last_term();
        if entry.term < previous {
            return Err(LogError::TermRegression {
                index: entry.index,
                term: entry.term,
                previous,
            });
        }
        self.persisted = entry.index;
        self.push(entry);
        Ok(())
    }

    fn push(&mut self, entry: Entry) {
        if self.terms.last().map(|run| run.1) != Some(entry.term) {
            self.terms.push((entry.index, entry.term));
        }
        self.entries.push_back(entry);
    }

    pub fn last_index(&self) -> Index {
        self.offset + self.entries.len() as Index
    }

    pub fn last_term(&self) -> Term {
        self.terms.last().map_or(0, |run| run.1)
    }

    pub fn persisted_index(&self) -> Index {
        self.persisted
    }

    /// Entries at or below this index are no longer in memory.
    pub fn offset(&self) -> Index {
        self.offset
    }

    /// How many entries are held in memory.
    pub fn in_memory(&self) -> usize {
        self.entries.len()
    }

    /// Position in `terms` of the run holding `index` (which must exist).
    fn run_of(&self, index: Index) -> usize {
        self.terms
            .partition_point(|(first, _)| *first <= index)
            .saturating_sub(1)
    }

    /// The term at `index`: 0 for index 0, `None` past the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        if index > self.last_index() {
            return None;
        }
        self.terms.get(self.run_of(index)).map(|run| run.1)
    }

    /// The entry at `index`, if it is held in memory.
    pub fn get(&self, index: Index) -> Option<&Entry> {
        if index <= self.offset {
            return None;
        }
        self.entries.get((index - self.offset - 1) as usize)
    }

    pub fn last(&self) -> Option<&Entry> {
        self.entries.back()
    }

    /// Copies of up to `max` entries starting at `from`, as far as they
    /// are in memory, and no more than `max_bytes` of them (`Entry::size`)
    /// unless the first alone is larger: then just that one.
    pub fn slice(&self, from: Index, max: usize, max_bytes: usize) -> Vec<Entry> {
        if from <= self.offset || from > self.last_index() {
            return Vec::new();
        }
        let start = (from - self.offset - 1) as usize;
        let end = (start + max).min(self.entries.len());
        let mut bytes = 0usize;
        let mut slice = Vec::new();
        for entry in self.entries.range(start..end) {
            bytes = bytes.saturating_add(entry.size());
            if bytes > max_bytes && !slice.is_empty() {
                break;
            }
            slice.push(entry.clone());
        }
        slice
    }

    /// Entries `from..=to` held in memory, clamped to the log.
    pub fn range(&self, from: Index, to: Index) -> impl Iterator<Item = &Entry> + '_ {
        let to = to.min(self.last_index());
        let from = from.max(self.offset + 1);
        let (start, end) = if from > to {
            (0, 0)
        } else {
            (
                (from - self.offset - 1) as usize,
                (to - self.offset) as usize,
            )
        };
        self.entries.range(start..end)
    }

    /// The first index holding `term`, searching back from `index` no further
    /// than `floor` (used for the fast-backtracking hint).
    pub fn first_index_of_term(&self, index: Index, floor: Index) -> Index {
        let floor = floor.max(1);
        if index <= floor || index > self.last_index() {
            return index;
        }
        self.terms
            .get(self.run_of(index))
            .map_or(index, |run| run.0.max(floor))
    }

    /// The last index whose term is `term`, if the log has any.
    pub fn last_index_of_term(&self, term: Term) -> Option<Index> {
        let position = self.terms.partition_point(|run| run.1 <= term);
        if position == 0 || self.terms[position - 1].1 != term {
            return None;
        }
        Some(
            self.terms
                .get(position)
                .map_or(self.last_index(), |next| next.0 - 1),
        )
    }

    pub fn append(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        self.mark_dirty(entry.index);
        self.push(entry);
    }

    /// Drops every entry at or after `from`. Released entries are committed
    /// and can never be replaced, so `from` is never at or below `offset`.
    pub fn truncate(&mut self, from: Index) {
        if from > self.last_index() {
            return;
        }
        let from = from.max(self.offset + 1);
        self.entries.truncate((from - self.offset - 1) as usize);
        while self.terms.last().is_some_and(|run| run.0 >= from) {
            self.terms.pop();
        }
        self.persisted = self.persisted.min(from.saturating_sub(1));
        self.mark_dirty(from);
    }

    /// Releases entries up to `upto` from memory: only durable ones, and
    /// the last entry always stays.
    pub fn release(&mut self, upto: Index) {
        let upto = upto
            .min(self.persisted)
            .min(self.last_index().saturating_sub(1));
        if upto <= self.offset {
            return;
        }
        self.entries.drain(..(upto - self.offset) as usize);
        self.offset = upto;
    }

    fn mark_dirty(&mut self, index: Index) {
        self.dirty_from = Some(self.dirty_from.map_or(index, |d| d.min(index)));
    }

    /// The write that brings the disk up to date with memory, if any.
    pub fn take_write(&mut self) -> Option<LogWrite> {
        let from = self.dirty_from.take()?;
        Some(LogWrite {
            from,
            entries: self.range(from, self.last_index()).cloned().collect(),
        })
    }

    /// The runtime reports that the log is durable up to `(index, term)`.
    /// A report for entries that were replaced since is ignored: they were
    /// written, but the write of their replacement is still to come.
    pub fn mark_persisted(&mut self, index: Index, term: Term) -> bool {
        if index > self.persisted && self.term(index) == Some(term) {
            self.persisted = index;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::Payload;

    fn entry(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            lamport: index,
            payload: Payload::Noop,
        }
    }

    #[test]
    fn restore_rejects_gaps_and_term_regressions() {
        assert_eq!(
            RaftLog::restore(vec![entry(1, 1), entry(3, 1)]).err(),
            Some(LogError::Gap {
                position: 1,
                found: 3,
                expected: 2
            })
        );
        assert_eq!(
            RaftLog::restore(vec![entry(1, 2), entry(2, 1)]).err(),
            Some(LogError::TermRegression {
                index: 2,
                term: 1,
                previous: 2
            })
        );
    }

    #[test]
    fn writes_cover_truncation_and_append() {
        let mut log = RaftLog::restore(vec![entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        assert_eq!(log.take_write(), None);
        log.truncate(2);
        log.append(entry(2, 2));
        let write = log.take_write().unwrap();
        assert_eq!(write.from, 2);
        assert_eq!(write.entries, vec![entry(2, 2)]);
        assert_eq!(log.persisted_index(), 1);
        assert!(!log.mark_persisted(2, 1), "a replaced entry is not durable");
        assert!(log.mark_persisted(2, 2));
    }

    #[test]
    fn term_lookups() {
        let log =
            RaftLog::restore(vec![entry(1, 1), entry(2, 1), entry(3, 3), entry(4, 3)]).unwrap();
        assert_eq!(log.last_index_of_term(1), Some(2));
        assert_eq!(log.last_index_of_term(2), None);
        assert_eq!(log.last_index_of_term(3), Some(4));
        assert_eq!(log.first_index_of_term(4, 0), 3);
        assert_eq!(log.first_index_of_term(2, 0), 1);
        assert_eq!(log.first_index_of_term(2, 2), 2);
    }

    #[test]
    fn released_entries_keep_their_terms() {
        let mut log = RaftLog::restore((1..=10).map(|i| entry(i, 1 + i / 4)).collect()).unwrap();
        log.release(6);
        assert_eq!(log.offset(), 6);
        assert_eq!(log.in_memory(), 4);
        assert_eq!(log.get(6), None);
        assert_eq!(log.get(7).map(|e| e.index), Some(7));
        assert_eq!(log.slice(5, 10, usize::MAX), Vec::<Entry>::new());
        assert_eq!(log.range(1, 8).count(), 2);
        for i in 1..=10 {
            assert_eq!(log.term(i), Some(1 + i / 4), "term of {i}");
        }
        assert_eq!(log.last_index_of_term(2), Some(7));
        assert_eq!(log.first_index_of_term(7, 0), 4);
        log.truncate(9);
        log.append(entry(9, 5));
        assert_eq!(log.term(8), Some(3));
        assert_eq!(log.term(9), Some(5));
        assert_eq!(log.last_index_of_term(3), Some(8));
        // Never the last entry, never beyond what is durable.
        log.release(100);
        assert_eq!(log.offset(), 8);
        assert_eq!(log.last().map(|e| e.index), Some(9));
    }
}
