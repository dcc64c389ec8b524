//! The thread that owns the store. The driver hands it every ready's
//! durable changes, in order; it applies everything queued since its last
//! sync, syncs once, and only then sends the messages that acknowledge
//! those entries and tells the driver what is now durable.
//!
//! Meanwhile the driver keeps stepping the core: heartbeats and new
//! proposals never wait for the disk, and whatever arrives during one sync
//! is covered by the next (group commit across readies). Only a new term
//! or vote is waited for.
//!
//! The conversation is one queue each way: `Job`s in, `StoreEvent`s out
//! on the driver's own input queue, so the driver waits for the disk and
//! for everything else in one place. This module knows nothing of the
//! driver beyond "its queue takes a `StoreEvent`" (`From<StoreEvent>`).

use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::Outboxes;
use super::spin::Spinner;
use crate::metrics::Metrics;
use crate::raft::{Envelope, HardState, Index, LogWrite, NodeId, Term};
use crate::storage::{LogReader, Store, StoreError};

/// Work for the store thread, carried out in the order it was queued.
///
/// Only new entries and votes are synced at once. A write without entries
/// carries at most a new commit index, which nobody waits for (a restarted
/// node learns it again from the leader): it is staged and rides along with
/// the next sync, or is synced on its own once the store has been idle for
/// `COMMIT_LINGER`. Its messages can leave at once, since every entry they
/// acknowledge was synced by an earlier job. One sync per message instead
/// of two on every node: half the disk work for a lone client, and the
/// store is free for the next append sooner.
pub enum Job {
    /// A new term or vote (`Ready::must_sync`): synced at once, with
    /// everything queued before it, then reported as
    /// `StoreEvent::HardStateSynced`. The driver sends nothing until then.
    HardState(HardState),
    /// Make these durable, then send `then_send`. The hard state here only
    /// ever moves the commit index: a term or vote comes as `HardState`.
    Write {
        hard_state: Option<HardState>,
        log_write: Option<LogWrite>,
        then_send: Vec<Envelope>,
    },
}

/// What the store thread tells the driver after a sync, in order.
///
/// It says it on the driver's input queue, which is bounded, with a
/// blocking send: nothing it reports is ever dropped (a lost `Failed`
/// would leave a node voting on a dead disk, a lost `HardStateSynced` a
/// driver waiting for ever). That cannot deadlock: the driver never waits
/// for this thread except by reading that same queue (the vote wait in
/// `driver.rs`), and what it hands this thread goes on an unbounded
/// channel, so it never blocks on it. A full queue only means the driver
/// is behind on its inputs; this thread then waits for it before its next
/// sync, which is the backpressure a node behind its own inputs needs.
#[derive(Debug)]
pub enum StoreEvent {
    /// The log is durable up to this entry (for `RaftNode::persisted`:
    /// the leader counts its own copy towards commit from now on).
    Durable { index: Index, term: Term },
    /// This term and vote are durable: messages may leave again.
    HardStateSynced { term: Term, vote: Option<NodeId> },
    /// The commit index on disk moved here. A node reports no more than
    /// this, so what it reports survives a crash.
    CommitSynced(Index),
    /// A write failed (or this thread died): the node must stop, with
    /// this error.
    Failed(StoreError),
}

/// Longest a staged commit index waits for a sync to ride along with.
pub const COMMIT_LINGER: Duration = Duration::from_millis(5);

/// The driver's side of the store thread.
pub struct StoreHandle {
    /// Writes, in the order they must become durable. Unbounded: the
    /// driver must never block on this thread (see `StoreEvent`).
    pub jobs: Sender<Job>,
    /// The commit index on disk when the store opened; later ones arrive
    /// as `StoreEvent::CommitSynced`.
    pub synced_commit: Index,
    /// Reads the log (entries the core released from memory, exports).
    pub log: LogReader,
}

/// Starts the store thread of node `me`, reporting on `driver`. The
/// thread ends once the driver drops its handle (after writing what was
/// queued) or the store fails.
pub fn start<I>(
    me: NodeId,
    store: Store,
    driver: SyncSender<I>,
    outboxes: Outboxes,
    metrics: Arc<Metrics>,
    spin: Duration,
) -> std::io::Result<(StoreHandle, std::thread::JoinHandle<()>)>
where
    I: From<StoreEvent> + Send + 'static,
{
    let (jobs, job_rx) = std::sync::mpsc::channel();
    let synced_commit = store.synced_commit();
    let log = store.reader();
    let persister = Persister {
        dir: log.dir().to_path_buf(),
        store,
        jobs: job_rx,
        driver,
        reported_commit: synced_commit,
        outboxes,
        metrics,
        spinner: Spinner::new(spin),
    };
    let thread = std::thread::Builder::new()
        .name(format!("store-{me}"))
        .spawn(move || persister.run())?;
    Ok((
        StoreHandle {
            jobs,
            synced_commit,
            log,
        },
        thread,
    ))
}

struct Persister<I: From<StoreEvent>> {
    store: Store,
    dir: PathBuf,
    jobs: Receiver<Job>,
    /// The driver's input queue.
    driver: SyncSender<I>,
    /// The commit index last reported, to report only a move.
    reported_commit: Index,
    outboxes: Outboxes,
    metrics: Arc<Metrics>,
    spinner: Spinner,
}

impl<I: From<StoreEvent>> Persister<I> {
    /// Runs until the driver drops its end of the queue, or the store fails
    /// (then the driver is told, and stops the node).
    fn run(mut self) {
        loop {
            let first = if self.store.has_staged() {
                match self.spinner.recv(&self.jobs, Some(COMMIT_LINGER)) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match self.spinner.recv(&self.jobs, None) {
                    Ok(job) => Some(job),
                    Err(_) => return,
                }
            };
            let mut jobs: Vec<Job> = first.into_iter().collect();
            jobs.extend(self.jobs.try_iter());
            if let Err(error) = self.carry_out(jobs) {
                tracing::error!("{error}");
                self.report(StoreEvent::Failed(error));
                return;
            }
        }
    }

    /// Tells the driver. If it is gone, so is its end of `jobs`, and the
    /// loop above ends.
    fn report(&self, event: StoreEvent) {
        let _ = self.driver.send(event.into());
    }

    /// Applies `jobs`, syncs them and everything staged before if any of
    /// them must be durable now (or if there are none: the linger is over),
    /// sends what waited, and reports what is durable.
    fn carry_out(&mut self, jobs: Vec<Job>) -> Result<(), StoreError> {
        let writes: Vec<_> = jobs
            .iter()
            .map(|job| match job {
                Job::HardState(hard_state) => (Some(*hard_state), None),
                Job::Write {
                    hard_state,
                    log_write,
                    ..
                } => (*hard_state, log_write.as_ref()),
            })
            .collect();
        let must_sync = jobs.is_empty()
            || jobs.iter().any(|job| {
                matches!(
                    job,
                    Job::Write {
                        log_write: Some(_),
                        ..
                    } | Job::HardState(_)
                )
            });
        // The log's new end, if the last write that changed it says so
        // (a bare truncation does not name its last term).
        let durable = jobs.iter().rev().find_map(|job| match job {
            Job::Write {
                log_write: Some(write),
                ..
            } => Some(write.last()),
            _ => None,
        });
        let vote = jobs.iter().rev().find_map(|job| match job {
            Job::HardState(hard_state) => Some(*hard_state),
            Job::Write { .. } => None,
        });
        let started = Instant::now();
        self.store.stage(&writes)?;
        let synced = must_sync && self.store.sync_staged()?;
        if synced {
            self.metrics.fsync.observe(started.elapsed().as_secs_f64());
        }
        for job in jobs {
            if let Job::Write { then_send, .. } = job {
                for envelope in then_send {
                    self.outboxes.send(envelope);
                }
            }
        }
        // A hard state always stages, so the sync above covered it.
        if let Some(hard_state) = vote {
            self.report(StoreEvent::HardStateSynced {
                term: hard_state.term,
                vote: hard_state.vote,
            });
        }
        if !synced {
            return Ok(());
        }
        if let Some(Some((index, term))) = durable {
            self.report(StoreEvent::Durable { index, term });
        }
        let commit = self.store.synced_commit();
        if commit != self.reported_commit {
            self.reported_commit = commit;
            self.report(StoreEvent::CommitSynced(commit));
        }
        Ok(())
    }
}

impl<I: From<StoreEvent>> Drop for Persister<I> {
    /// A panic must stop the node too, not leave the driver waiting for a
    /// sync that will never be reported.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report(StoreEvent::Failed(StoreError::Write {
                dir: self.dir.clone(),
                what: "the store thread panicked (see the log above)".into(),
            }));
        }
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

    fn vote(term: Term) -> HardState {
        HardState {
            term,
            vote: Some(1),
            commit: 0,
        }
    }

    /// A queue of one, filled by the first report: the thread waits for
    /// room instead of dropping the next ones, and says everything in order
    /// once the reader catches up. (A batch holding two votes reports the
    /// later one; the driver never queues a second before the first is
    /// reported.)
    #[test]
    fn a_full_driver_queue_holds_the_store_thread_back_and_loses_nothing() {
        let dir = std::env::temp_dir().join(format!("cs-persist-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, _) = Store::open(&dir, "c1", 1).unwrap();
        let (events, event_rx) = std::sync::mpsc::sync_channel::<StoreEvent>(1);
        let outboxes = Outboxes::default();
        let (outbox, mut sent) = tokio::sync::mpsc::channel(8);
        outboxes.insert(2, outbox);
        let (handle, _) = start(
            1,
            store,
            events,
            outboxes,
            Arc::new(Metrics::default()),
            Duration::ZERO,
        )
        .unwrap();
        let ack = Envelope {
            from: 1,
            to: 2,
            term: 1,
            lamport: 0,
            message: Message::TimeoutNow,
        };
        handle.jobs.send(Job::HardState(vote(1))).unwrap();
        // Its report fills the queue; everything after waits behind it.
        std::thread::sleep(Duration::from_millis(50));
        for index in 1..=3 {
            handle
                .jobs
                .send(Job::Write {
                    hard_state: None,
                    log_write: Some(LogWrite {
                        from: index,
                        entries: vec![entry(index, 1)],
                    }),
                    then_send: vec![ack.clone()],
                })
                .unwrap();
        }
        handle.jobs.send(Job::HardState(vote(2))).unwrap();
        // A commit alone: synced after the linger, or with the next write.
        handle
            .jobs
            .send(Job::Write {
                hard_state: Some(HardState {
                    commit: 3,
                    ..vote(2)
                }),
                log_write: None,
                then_send: Vec::new(),
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut said = Vec::new();
        while !said
            .iter()
            .any(|event| matches!(event, StoreEvent::CommitSynced(3)))
        {
            said.push(
                event_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the store thread reports everything"),
            );
        }
        let votes: Vec<Term> = said
            .iter()
            .filter_map(|event| match event {
                StoreEvent::HardStateSynced { term, vote } => {
                    assert_eq!(*vote, Some(1));
                    Some(*term)
                }
                _ => None,
            })
            .collect();
        assert_eq!(votes, [1, 2], "{said:?}");
        let durable: Vec<Index> = said
            .iter()
            .filter_map(|event| match event {
                StoreEvent::Durable { index, term: 1 } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(durable.last(), Some(&3), "{said:?}");
        assert!(durable.windows(2).all(|w| w[0] < w[1]), "{said:?}");
        let mut acks = 0;
        while sent.try_recv().is_ok() {
            acks += 1;
        }
        assert_eq!(acks, 3);
        drop(handle);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
