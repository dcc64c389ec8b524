//! The thread that owns the store. The driver hands it every ready's
//! durable changes, in order; it applies everything queued since its last
//! sync, syncs once, and only then sends the messages that acknowledge
//! those entries and tells the driver how far the log is durable.
//!
//! Meanwhile the driver keeps stepping the core: heartbeats, votes and
//! new proposals never wait for the disk, and whatever arrives during one
//! sync is covered by the next (group commit across readies).

use std::sync::mpsc::RecvTimeoutError;
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::driver::Input;
use super::outbox::Outboxes;
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
    /// Make these durable, then send `then_send`. The hard state here only
    /// ever moves the commit index: a vote is followed by a `Barrier`.
    Write {
        hard_state: Option<HardState>,
        log_write: Option<LogWrite>,
        then_send: Vec<Envelope>,
    },
    /// Answered once everything queued before it is durable.
    Barrier(SyncSender<()>),
}

/// Longest a staged commit index waits for a sync to ride along with.
pub const COMMIT_LINGER: Duration = Duration::from_millis(5);

/// What the store thread reports to the driver. A slot rather than a
/// message: the driver's queue is bounded and the driver may be waiting for
/// this thread, so this thread must never block on that queue.
#[derive(Default)]
pub struct Progress {
    /// The log is durable up to here (not yet handed to the core).
    pub durable: Option<(Index, Term)>,
    /// A write failed: the node must stop.
    pub failed: Option<StoreError>,
    /// The commit index the store has synced: a node reports no more than
    /// this, so what it reports survives a crash.
    pub synced_commit: Index,
}

/// The driver's side of the store thread.
pub struct StoreHandle {
    /// Writes, in the order they must become durable.
    pub jobs: Sender<Job>,
    pub progress: Arc<Mutex<Progress>>,
    /// Reads the log (entries the core released from memory, exports).
    pub log: LogReader,
}

/// Starts the store thread of node `me`.
pub fn start(
    me: NodeId,
    store: Store,
    driver: SyncSender<Input>,
    outboxes: Outboxes,
    metrics: Arc<Metrics>,
) -> std::io::Result<StoreHandle> {
    let (jobs, job_rx) = std::sync::mpsc::channel();
    let progress = Arc::new(Mutex::new(Progress {
        synced_commit: store.synced_commit(),
        ..Progress::default()
    }));
    let log = store.reader();
    let persister = Persister {
        store,
        jobs: job_rx,
        progress: progress.clone(),
        driver,
        outboxes,
        metrics,
    };
    std::thread::Builder::new()
        .name(format!("store-{me}"))
        .spawn(move || persister.run())?;
    Ok(StoreHandle {
        jobs,
        progress,
        log,
    })
}

struct Persister {
    store: Store,
    jobs: Receiver<Job>,
    progress: Arc<Mutex<Progress>>,
    /// The driver's queue, to wake it when there is progress.
    driver: SyncSender<Input>,
    outboxes: Outboxes,
    metrics: Arc<Metrics>,
}

impl Persister {
    /// Runs until the driver drops its end of the queue, or the store fails
    /// (then the driver is told, and stops the node).
    fn run(mut self) {
        loop {
            let first = if self.store.has_staged() {
                match self.jobs.recv_timeout(COMMIT_LINGER) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match self.jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                }
            };
            let mut jobs: Vec<Job> = first.into_iter().collect();
            jobs.extend(self.jobs.try_iter());
            if let Err(error) = self.carry_out(jobs) {
                tracing::error!("{error}");
                if let Ok(mut progress) = self.progress.lock() {
                    progress.failed = Some(error);
                }
                let _ = self.driver.try_send(Input::StoreProgress);
                return;
            }
        }
    }

    /// Applies `jobs`, syncs them and everything staged before if any of
    /// them must be durable now (or if there are none: the linger is over),
    /// sends what waited, and reports progress.
    fn carry_out(&mut self, jobs: Vec<Job>) -> Result<(), StoreError> {
        let writes: Vec<_> = jobs
            .iter()
            .filter_map(|job| match job {
                Job::Write {
                    hard_state,
                    log_write,
                    ..
                } => Some((*hard_state, log_write.as_ref())),
                Job::Barrier(_) => None,
            })
            .collect();
        let must_sync = jobs.is_empty()
            || jobs.iter().any(|job| {
                matches!(
                    job,
                    Job::Write {
                        log_write: Some(_),
                        ..
                    } | Job::Barrier(_)
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
        let started = Instant::now();
        self.store.stage(&writes)?;
        let synced = must_sync && self.store.sync_staged()?;
        if synced {
            self.metrics.fsync.observe(started.elapsed().as_secs_f64());
        }
        for job in jobs {
            match job {
                Job::Write { then_send, .. } => {
                    for envelope in then_send {
                        self.outboxes.send(envelope);
                    }
                }
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        if !synced {
            return Ok(());
        }
        if let Ok(mut progress) = self.progress.lock() {
            if let Some(Some(durable)) = durable {
                progress.durable = Some(durable);
            }
            progress.synced_commit = self.store.synced_commit();
        }
        // A full queue means the driver is busy and will look soon.
        let _ = self.driver.try_send(Input::StoreProgress);
        Ok(())
    }
}
