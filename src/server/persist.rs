//! The driver's store: it carries out each ready's durable changes on the
//! driver's own thread, in order. A write is applied with everything
//! staged since the last sync, synced once, and only then are the messages
//! that acknowledge its entries sent and the driver told what is now
//! durable.
//!
//! The store once had a thread of its own, so that a leader could step the
//! core while its disk synced. On this project's machines (two cores, three
//! nodes) handing every write to that thread, and its report back, cost
//! more than the overlap gained: one client's p50 0.77 -> 0.69 ms with the
//! driver writing itself, 64 clients and the pipelined client unchanged
//! (BENCHMARKS.md). A leader still sends its appends before it writes (the
//! followers' disks and its own work in parallel) and answers what
//! committed before it writes, and whatever arrives during one sync is
//! covered by the next round's single write (group commit across
//! proposals).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::Outboxes;
use crate::metrics::Metrics;
use crate::raft::{Envelope, HardState, Index, LogWrite, Term};
use crate::storage::{LogReader, Store, StoreError};

/// Work for the store, carried out in the order it was produced.
///
/// Only new entries and votes are synced at once. A write without entries
/// carries at most a new commit index, which nobody waits for (a restarted
/// node learns it again from the leader): it is staged and rides along with
/// the next sync, or is synced on its own `LINGER` after it was
/// staged. Its messages can leave at once, since every entry they
/// acknowledge was synced by an earlier job. One sync per message instead
/// of two on every node: half the disk work for a lone client.
pub enum Job {
    /// A new term or vote (`Ready::must_sync`): synced at once, with
    /// everything staged before it. The driver sends nothing until then.
    HardState(HardState),
    /// Make these durable, then send `then_send`. The hard state here only
    /// ever moves the commit index: a term or vote comes as `HardState`.
    /// `linger`: it answers lazy appends only (`Ready::linger`): staged and
    /// synced with the next write that must be, or `LINGER` after.
    /// Otherwise its messages leave after a sync of everything staged.
    Write {
        hard_state: Option<HardState>,
        log_write: Option<LogWrite>,
        then_send: Vec<Envelope>,
        linger: bool,
    },
}

/// What a write made durable, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// The log is durable up to this entry (for `RaftNode::persisted`:
    /// the leader counts its own copy towards commit from now on).
    Durable { index: Index, term: Term },
    /// The commit index on disk moved here. A node reports no more than
    /// this, so what it reports survives a crash.
    CommitSynced(Index),
}

/// Longest a staged commit index, or a lazy append's entries, wait for a
/// sync to ride along with.
pub const LINGER: Duration = Duration::from_millis(5);

/// The store, and what carrying out a write needs.
pub struct StoreHandle {
    store: Store,
    /// The commit index last reported, to report only a move.
    reported_commit: Index,
    outboxes: Outboxes,
    metrics: Arc<Metrics>,
    /// When a commit index or lazy entries were first staged without a
    /// sync.
    staged_since: Option<Instant>,
    /// Lazy entries are staged, unsynced: what acknowledges them, and
    /// every message behind it, waits for the sync, in order.
    held: Vec<Envelope>,
    /// The log's end as the last staged write left it, reported once
    /// synced (`None` inside: a truncation, which names no last term).
    unsynced_end: Option<Option<(Index, Term)>>,
    /// The commit index on disk when the store opened; later ones are
    /// reported as `StoreEvent::CommitSynced`.
    pub synced_commit: Index,
    /// Reads the log (entries the core released from memory, exports).
    pub log: LogReader,
    /// Tests only: the next write fails with this.
    #[cfg(test)]
    pub fail_next: Option<StoreError>,
    /// Tests only: `fail_next` waits for a write of at least this many
    /// bytes of entries.
    #[cfg(test)]
    pub fail_from_bytes: usize,
}

impl StoreHandle {
    /// Wraps the store of a node whose messages go out through `outboxes`.
    pub fn new(store: Store, outboxes: Outboxes, metrics: Arc<Metrics>) -> StoreHandle {
        let synced_commit = store.synced_commit();
        let log = store.reader();
        StoreHandle {
            store,
            reported_commit: synced_commit,
            outboxes,
            metrics,
            staged_since: None,
            held: Vec::new(),
            unsynced_end: None,
            synced_commit,
            log,
            #[cfg(test)]
            fail_next: None,
            #[cfg(test)]
            fail_from_bytes: 0,
        }
    }

    /// When a staged commit index must be synced on its own (by
    /// `carry_out` of no jobs).
    pub fn linger_deadline(&self) -> Option<Instant> {
        self.staged_since.map(|since| since + LINGER)
    }

    /// Applies `jobs`, syncs them and everything staged before if any of
    /// them must be durable now (or if there are none: the linger is over),
    /// sends what waited, and says what is durable.
    pub fn carry_out(&mut self, jobs: Vec<Job>) -> Result<Vec<StoreEvent>, StoreError> {
        #[cfg(test)]
        {
            let bytes: usize = jobs
                .iter()
                .filter_map(|job| match job {
                    Job::Write {
                        log_write: Some(write),
                        ..
                    } => Some(
                        write
                            .entries
                            .iter()
                            .map(crate::raft::Entry::size)
                            .sum::<usize>(),
                    ),
                    _ => None,
                })
                .sum();
            if let Some(error) = self.fail_next.take_if(|_| bytes >= self.fail_from_bytes) {
                return Err(error);
            }
        }
        let mut writes = Vec::with_capacity(jobs.len());
        let mut then_send = Vec::new();
        let mut must_sync = jobs.is_empty();
        for job in jobs {
            match job {
                Job::HardState(hard_state) => {
                    must_sync = true;
                    writes.push((Some(hard_state), None));
                }
                Job::Write {
                    hard_state,
                    log_write,
                    then_send: messages,
                    linger,
                } => {
                    // An urgent append's answer leaves after a sync, even
                    // one with no new entries: it may acknowledge lazy
                    // entries staged before it.
                    must_sync |= !linger && !messages.is_empty() && self.unsynced_end.is_some();
                    if let Some(write) = &log_write {
                        must_sync |= !linger;
                        if linger {
                            self.metrics.lazy_writes.inc();
                        }
                        // The log's new end, if the write says so (a bare
                        // truncation does not name its last term).
                        self.unsynced_end = Some(write.last());
                    }
                    writes.push((hard_state, log_write));
                    then_send.extend(messages);
                }
            }
        }
        let staged: Vec<_> = writes
            .iter()
            .map(|(hard_state, log_write)| (*hard_state, log_write.as_ref()))
            .collect();
        let started = Instant::now();
        self.store.stage(&staged)?;
        let synced = must_sync && self.store.sync_staged()?;
        if synced {
            self.metrics.fsync.observe(started.elapsed().as_secs_f64());
        }
        if self.store.has_staged() {
            self.staged_since.get_or_insert(started);
        } else {
            self.staged_since = None;
        }
        if !synced && self.unsynced_end.is_some() {
            self.held.extend(then_send);
            return Ok(Vec::new());
        }
        for envelope in std::mem::take(&mut self.held).into_iter().chain(then_send) {
            self.outboxes.send(envelope);
        }
        let mut events = Vec::new();
        if !synced {
            return Ok(events);
        }
        if let Some(Some((index, term))) = self.unsynced_end.take() {
            events.push(StoreEvent::Durable { index, term });
        }
        let commit = self.store.synced_commit();
        if commit != self.reported_commit {
            self.reported_commit = commit;
            events.push(StoreEvent::CommitSynced(commit));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, Message, Payload};

    fn entry(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            lamport: index,
            payload: Payload::Noop,
        }
    }

    /// A fresh store in a temporary `name` directory, wrapped as the
    /// driver wraps it, and what it sends to node 2.
    fn open_handle(
        name: &str,
    ) -> (
        std::path::PathBuf,
        StoreHandle,
        tokio::sync::mpsc::Receiver<Envelope>,
    ) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, _) = Store::open(&dir, "c1", 1).unwrap();
        let outboxes = Outboxes::default();
        let (outbox, sent) = tokio::sync::mpsc::channel(8);
        outboxes.insert(2, outbox);
        let handle = StoreHandle::new(store, outboxes, Arc::new(Metrics::default()));
        (dir, handle, sent)
    }

    fn vote(term: Term) -> HardState {
        HardState {
            term,
            vote: Some(1),
            commit: 0,
        }
    }

    /// Votes and entries are synced at once and said in order; the messages
    /// that waited for them leave only then; a commit index alone waits for
    /// the next sync, or for the linger, and survives a restart either way.
    #[test]
    fn writes_are_synced_and_reported_in_order_and_a_lone_commit_lingers() {
        let (dir, mut handle, mut sent) = open_handle("cs-persist");
        let ack = Envelope {
            from: 1,
            to: 2,
            term: 1,
            lamport: 0,
            message: Message::TimeoutNow,
        };
        assert_eq!(handle.carry_out(vec![Job::HardState(vote(1))]).unwrap(), []);
        let writes = (1..=3)
            .map(|index| Job::Write {
                hard_state: None,
                log_write: Some(LogWrite {
                    from: index,
                    entries: vec![entry(index, 1)],
                }),
                then_send: vec![ack.clone()],
                linger: false,
            })
            .collect();
        assert_eq!(
            handle.carry_out(writes).unwrap(),
            [StoreEvent::Durable { index: 3, term: 1 }]
        );
        let mut acks = 0;
        while sent.try_recv().is_ok() {
            acks += 1;
        }
        assert_eq!(acks, 3);
        // A commit alone: staged, not synced, not reported.
        let commit = |commit| Job::Write {
            hard_state: Some(HardState { commit, ..vote(1) }),
            log_write: None,
            then_send: Vec::new(),
            linger: false,
        };
        assert_eq!(handle.carry_out(vec![commit(2)]).unwrap(), []);
        let deadline = handle.linger_deadline().expect("a commit lingers");
        assert!(deadline <= Instant::now() + LINGER);
        // The linger over, no jobs sync it.
        assert_eq!(
            handle.carry_out(Vec::new()).unwrap(),
            [StoreEvent::CommitSynced(2)]
        );
        assert_eq!(handle.linger_deadline(), None);
        // Or it rides along with the next write.
        let next = Job::Write {
            hard_state: None,
            log_write: Some(LogWrite {
                from: 4,
                entries: vec![entry(4, 1)],
            }),
            then_send: Vec::new(),
            linger: false,
        };
        assert_eq!(handle.carry_out(vec![commit(3)]).unwrap(), []);
        assert_eq!(
            handle.carry_out(vec![next]).unwrap(),
            [
                StoreEvent::Durable { index: 4, term: 1 },
                StoreEvent::CommitSynced(3)
            ]
        );
        drop(handle);
        let (_, recovered) = Store::open(&dir, "c1", 1).unwrap();
        assert_eq!(recovered.hard_state.commit, 3);
        assert_eq!(recovered.last_index, 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A lazy append's entries are staged, not synced: their
    /// acknowledgement, and every message queued behind it, wait for the
    /// sync (the linger's, the next urgent write's or answer's, a vote's),
    /// and only then is the log reported durable.
    #[test]
    fn lazy_entries_wait_for_a_sync_and_hold_what_follows() {
        let (dir, mut handle, mut sent) = open_handle("cs-persist-lazy");
        let ack = |match_index| Envelope {
            from: 1,
            to: 2,
            term: 1,
            lamport: 0,
            message: Message::AppendResponse(crate::raft::AppendResult::Accepted { match_index }),
        };
        let write = |index, linger| Job::Write {
            hard_state: None,
            log_write: Some(LogWrite {
                from: index,
                entries: vec![entry(index, 1)],
            }),
            then_send: vec![ack(index)],
            linger,
        };
        let mut sent_now = || {
            let mut acks = Vec::new();
            while let Ok(envelope) = sent.try_recv() {
                if let Message::AppendResponse(crate::raft::AppendResult::Accepted {
                    match_index,
                }) = envelope.message
                {
                    acks.push(match_index);
                }
            }
            acks
        };
        assert_eq!(handle.carry_out(vec![write(1, true)]).unwrap(), []);
        assert!(handle.linger_deadline().is_some(), "lazy entries linger");
        // A lazy append's answer with no entries of its own queues behind
        // the held ack.
        let commit_only = Job::Write {
            hard_state: Some(HardState {
                commit: 1,
                ..vote(1)
            }),
            log_write: None,
            then_send: vec![ack(1)],
            linger: true,
        };
        assert_eq!(handle.carry_out(vec![commit_only]).unwrap(), []);
        assert_eq!(handle.carry_out(vec![write(2, true)]).unwrap(), []);
        assert_eq!(
            sent_now(),
            Vec::<Index>::new(),
            "nothing leaves before the sync"
        );
        // An urgent write syncs it all; the held acks leave first, in order.
        assert_eq!(
            handle.carry_out(vec![write(3, false)]).unwrap(),
            [
                StoreEvent::Durable { index: 3, term: 1 },
                StoreEvent::CommitSynced(1)
            ]
        );
        assert_eq!(sent_now(), [1, 1, 2, 3]);
        assert_eq!(handle.linger_deadline(), None);
        // Or the linger ends it: no jobs sync what is staged.
        assert_eq!(handle.carry_out(vec![write(4, true)]).unwrap(), []);
        assert_eq!(sent_now(), Vec::<Index>::new());
        assert_eq!(
            handle.carry_out(Vec::new()).unwrap(),
            [StoreEvent::Durable { index: 4, term: 1 }]
        );
        assert_eq!(sent_now(), [4]);
        // An urgent answer with no entries of its own syncs what is staged
        // before it leaves: it may acknowledge those entries.
        assert_eq!(handle.carry_out(vec![write(5, true)]).unwrap(), []);
        let urgent_ack = Job::Write {
            hard_state: None,
            log_write: None,
            then_send: vec![ack(5)],
            linger: false,
        };
        assert_eq!(
            handle.carry_out(vec![urgent_ack]).unwrap(),
            [StoreEvent::Durable { index: 5, term: 1 }]
        );
        assert_eq!(sent_now(), [5, 5]);
        // So does a vote.
        assert_eq!(handle.carry_out(vec![write(6, true)]).unwrap(), []);
        assert_eq!(
            handle
                .carry_out(vec![Job::HardState(HardState {
                    commit: 1,
                    ..vote(2)
                })])
                .unwrap(),
            [StoreEvent::Durable { index: 6, term: 1 }]
        );
        assert_eq!(sent_now(), [6]);
        drop(handle);
        let (_, recovered) = Store::open(&dir, "c1", 1).unwrap();
        assert_eq!(recovered.last_index, 6);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
