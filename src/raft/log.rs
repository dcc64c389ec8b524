//! The in-memory view of a node's log, and which part of it still has to be
//! written to disk.

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

#[derive(Debug, Default)]
pub struct RaftLog {
    /// `entries[i]` has index `i + 1`.
    entries: Vec<Entry>,
    /// Everything at or below this index is known durable.
    persisted: Index,
    /// Lowest index changed since the last `take_write`, if any.
    dirty_from: Option<Index>,
}

impl RaftLog {
    /// Rebuilds the log from what the store returned, checking that it is a
    /// well-formed Raft log.
    pub fn restore(entries: Vec<Entry>) -> Result<Self, LogError> {
        let mut previous = 0;
        for (position, entry) in entries.iter().enumerate() {
            let expected = position as Index + 1;
            if entry.index != expected {
                return Err(LogError::Gap {
                    position,
                    found: entry.index,
                    expected,
                });
            }
            if entry.term < previous {
                return Err(LogError::TermRegression {
                    index: entry.index,
                    term: entry.term,
                    previous,
                });
            }
            previous = entry.term;
        }
        let persisted = entries.len() as Index;
        Ok(RaftLog {
            entries,
            persisted,
            dirty_from: None,
        })
    }

    pub fn last_index(&self) -> Index {
        self.entries.len() as Index
    }

    pub fn last_term(&self) -> Term {
        self.entries.last().map_or(0, |e| e.term)
    }

    pub fn persisted_index(&self) -> Index {
        self.persisted
    }

    /// The term at `index`: 0 for index 0, `None` past the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        self.get(index).map(|e| e.term)
    }

    pub fn get(&self, index: Index) -> Option<&Entry> {
        if index == 0 {
            return None;
        }
        self.entries.get(index as usize - 1)
    }

    pub fn last(&self) -> Option<&Entry> {
        self.entries.last()
    }

    /// Up to `max` entries starting at `from`.
    pub fn slice(&self, from: Index, max: usize) -> &[Entry] {
        if from == 0 || from > self.last_index() {
            return &[];
        }
        let start = from as usize - 1;
        let end = (start + max).min(self.entries.len());
        &self.entries[start..end]
    }

    /// Entries `from..=to`, clamped to the log.
    pub fn range(&self, from: Index, to: Index) -> &[Entry] {
        let to = to.min(self.last_index());
        if from == 0 || from > to {
            return &[];
        }
        &self.entries[from as usize - 1..to as usize]
    }

    /// The first index holding `term`, searching back from `index` no further
    /// than `floor` (used for the fast-backtracking hint).
    pub fn first_index_of_term(&self, index: Index, floor: Index) -> Index {
        let term = self.term(index);
        let mut first = index;
        while first > floor.max(1) && self.term(first - 1) == term {
            first -= 1;
        }
        first
    }

    /// The last index whose term is `term`, if the log has any.
    pub fn last_index_of_term(&self, term: Term) -> Option<Index> {
        let position = self.entries.partition_point(|e| e.term <= term);
        if position == 0 {
            return None;
        }
        let entry = &self.entries[position - 1];
        (entry.term == term).then_some(entry.index)
    }

    pub fn append(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        self.mark_dirty(entry.index);
        self.entries.push(entry);
    }

    /// Drops every entry at or after `from`.
    pub fn truncate(&mut self, from: Index) {
        if from > self.last_index() {
            return;
        }
        self.entries.truncate(from.saturating_sub(1) as usize);
        self.persisted = self.persisted.min(from.saturating_sub(1));
        self.mark_dirty(from);
    }

    fn mark_dirty(&mut self, index: Index) {
        self.dirty_from = Some(self.dirty_from.map_or(index, |d| d.min(index)));
    }

    /// The write that brings the disk up to date with memory, if any.
    pub fn take_write(&mut self) -> Option<LogWrite> {
        let from = self.dirty_from.take()?;
        Some(LogWrite {
            from,
            entries: self.range(from, self.last_index()).to_vec(),
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
}
