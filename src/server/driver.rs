//! The thread that owns the Raft core: it feeds it ticks, peer messages and
//! client requests, and carries out each `Ready` in the order the core's
//! contract demands. Durable writes go to the store thread
//! (`persist.rs`), which syncs them in order and sends the messages that
//! must wait for them; the core never waits for the disk except to record
//! a vote.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot, watch};

use crate::events::NodeEvent;
use crate::metrics::Metrics;
use crate::raft::{
    ChangeError, Committed, Envelope, Index, Lamport, Membership, MembershipChange, NodeId,
    Payload, Proposal, ProposeError, RaftNode, RequestId, Status, Term,
};
use crate::storage::StoreError;

use super::outbox::Outboxes;
use super::persist::{Job, StoreHandle};

/// Work for the driver.
pub enum Input {
    Peer(Envelope),
    Propose(
        Vec<Proposal>,
        oneshot::Sender<Vec<Result<Committed, ProposeError>>>,
    ),
    Read(oneshot::Sender<Result<Index, ProposeError>>),
    Status(oneshot::Sender<Status>),
    /// A membership change, answered once it commits (or is refused).
    ChangeMembership(
        MembershipChange,
        oneshot::Sender<Result<Index, ChangeError>>,
    ),
    /// The status and the latest committed configuration.
    /// The status, the committed configuration and its index.
    Members(oneshot::Sender<(Status, Membership, Index)>),
    /// From the store thread: look at its `Progress`.
    StoreProgress,
}

/// What this node has committed and synced, and the leader it knows: what
/// watchers (`api.rs`) wait on. Only a commit index that would survive a
/// crash is published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitView {
    pub commit: Index,
    pub leader: Option<NodeId>,
}

/// A batch proposal collecting one answer per message.
struct BatchWaiter {
    results: Vec<Option<Result<Committed, ProposeError>>>,
    missing: usize,
    reply: Option<oneshot::Sender<Vec<Result<Committed, ProposeError>>>>,
}

pub struct Driver {
    raft: RaftNode,
    /// The store thread: writes go there, in order; it reports progress.
    store: StoreHandle,
    outboxes: Outboxes,
    tick: Duration,
    batches: HashMap<u64, BatchWaiter>,
    next_batch: u64,
    /// Which batch slots wait on a request id, and since when.
    waiting: HashMap<RequestId, (Instant, Vec<(u64, usize)>)>,
    reads: HashMap<u64, oneshot::Sender<Result<Index, ProposeError>>>,
    next_read: u64,
    /// Reads whose index is committed but not yet in this node's store.
    reads_waiting: Vec<(Index, oneshot::Sender<Result<Index, ProposeError>>)>,
    /// Membership changes waiting to commit, by the ctx given to the core.
    changes: HashMap<u64, oneshot::Sender<Result<Index, ChangeError>>>,
    next_change: u64,
    /// The configuration in force, for the peer links.
    membership: watch::Sender<super::links::View>,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<NodeEvent>,
    /// What the last announcement said, to announce only changes.
    announced: (Option<NodeId>, Term, Lamport),
    /// The commit index known to be on disk.
    synced_commit: Index,
    /// Published after every round for watchers.
    commits: watch::Sender<CommitView>,
}

/// What the driver tells the rest of the node as it changes.
pub struct Feeds {
    /// Leader and clock changes, for the dashboard.
    pub events: broadcast::Sender<NodeEvent>,
    /// The configuration in force, for the peer links.
    pub membership: watch::Sender<super::links::View>,
    /// The synced commit, for watchers.
    pub commits: watch::Sender<CommitView>,
}

impl Driver {
    pub fn new(
        raft: RaftNode,
        store: StoreHandle,
        outboxes: Outboxes,
        tick: Duration,
        metrics: Arc<Metrics>,
        Feeds {
            events,
            membership,
            commits,
        }: Feeds,
    ) -> Self {
        let mut driver = Driver {
            membership,
            commits,
            changes: HashMap::new(),
            next_change: 0,
            metrics,
            events,
            announced: (None, 0, 0),
            synced_commit: store
                .progress
                .lock()
                .map_or(0, |progress| progress.synced_commit),
            raft,
            store,
            outboxes,
            tick,
            batches: HashMap::new(),
            next_batch: 0,
            waiting: HashMap::new(),
            reads: HashMap::new(),
            next_read: 0,
            reads_waiting: Vec::new(),
        };
        driver.publish_commit();
        driver
    }

    /// Runs until every sender of `inputs` is gone. A storage failure ends
    /// it: a node that cannot persist must not keep voting.
    pub fn run(mut self, inputs: Receiver<Input>) -> Result<(), StoreError> {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inputs.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    // Take whatever else is queued into the same batch.
                    for input in inputs.try_iter().take(100_000) {
                        self.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                self.raft.tick();
                next_tick += self.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.tick;
                }
            }
            self.take_progress()?;
            while self.raft.has_ready() {
                self.process_ready()?;
            }
            self.serve_reads();
            self.publish_commit();
            self.metrics
                .entries_in_memory
                .set(self.raft.entries_in_memory() as u64);
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Peer(envelope) => self.raft.step(envelope),
            Input::Propose(proposals, reply) => {
                let batch = self.next_batch;
                self.next_batch += 1;
                self.batches.insert(
                    batch,
                    BatchWaiter {
                        results: vec![None; proposals.len()],
                        missing: proposals.len(),
                        reply: Some(reply),
                    },
                );
                self.metrics.proposals.inc_by(proposals.len() as u64);
                let now = Instant::now();
                for (slot, proposal) in proposals.into_iter().enumerate() {
                    self.waiting
                        .entry(proposal.id)
                        .or_insert_with(|| (now, Vec::new()))
                        .1
                        .push((batch, slot));
                    self.raft.propose(proposal);
                }
            }
            Input::Read(reply) => {
                let ctx = self.next_read;
                self.next_read += 1;
                self.reads.insert(ctx, reply);
                self.raft.read_index(ctx);
            }
            Input::Status(reply) => {
                // Report only a commit index that would survive a crash.
                let mut status = self.raft.status();
                status.commit = status.commit.min(self.synced_commit);
                // A watch asked after this answer never sees less.
                self.publish_commit();
                let _ = reply.send(status);
            }
            Input::ChangeMembership(change, reply) => {
                let ctx = self.next_change;
                self.next_change += 1;
                self.changes.insert(ctx, reply);
                self.raft.change_membership(ctx, change);
            }
            Input::Members(reply) => {
                let mut status = self.raft.status();
                status.commit = status.commit.min(self.synced_commit);
                let _ = reply.send((
                    status,
                    self.raft.committed_membership().clone(),
                    self.raft.committed_membership_index(),
                ));
            }
            // Picked up by `take_progress` after this batch of inputs.
            Input::StoreProgress => {}
        }
    }

    fn process_ready(&mut self) -> Result<(), StoreError> {
        let ready = self.raft.ready();
        // 1. A new term or vote must be durable before anything leaves.
        //    A commit index alone needs no such ordering, so it rides along
        //    with the log write below.
        let mut hard_state = ready.hard_state;
        if ready.must_sync {
            self.queue(Job::Write {
                hard_state: hard_state.take(),
                log_write: None,
                then_send: Vec::new(),
            })?;
            self.wait_for_store()?;
        }
        // The peer links follow the configuration in force at once: a
        // member just added should be dialed before the first append to it.
        let committed = self.raft.committed_membership();
        if let Some((index, membership)) = ready.membership {
            tracing::debug!(index, %membership, "configuration in force changed");
            self.membership.send_replace(super::links::View {
                index,
                membership,
                committed: committed.clone(),
            });
        } else {
            self.membership.send_if_modified(|view| {
                let changed = view.committed != *committed;
                if changed {
                    view.committed = committed.clone();
                }
                changed
            });
        }
        // 2. Replicate while the store writes our own log: a leader's
        //    appends leave before its fsync, so its disk and its followers'
        //    work in parallel.
        for envelope in ready.messages {
            self.outboxes.send(envelope);
        }
        // 3. The store thread syncs everything queued since its last sync,
        //    then sends what acknowledges those entries and reports back
        //    (`Input::Persisted`), which is when the leader counts itself.
        if hard_state.is_some() || ready.log_write.is_some() || !ready.persisted_messages.is_empty()
        {
            self.queue(Job::Write {
                hard_state,
                log_write: ready.log_write,
                then_send: ready.persisted_messages,
            })?;
        }
        self.announce(&ready.committed);
        for response in ready.responses {
            self.answer(response.id, response.result);
        }
        for read in ready.reads {
            if let Some(reply) = self.reads.remove(&read.ctx) {
                match read.result {
                    // Served once this node's store holds the read index:
                    // exports read the store.
                    Ok(index) => self.reads_waiting.push((index, reply)),
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
        for change in ready.changes {
            if let Some(reply) = self.changes.remove(&change.ctx) {
                let _ = reply.send(change.result);
            }
        }
        // 4. A lagging follower needs entries the core no longer holds in
        //    memory: read them back from the store (they are durable).
        for fetch in ready.fetches {
            let to = fetch.from.saturating_add(fetch.max as u64 - 1);
            let entries =
                self.store
                    .log
                    .entries_within(fetch.from, to, fetch.max, fetch.max_bytes)?;
            self.raft.fetched(fetch.to, fetch.from, entries);
        }
        Ok(())
    }

    /// Wakes watchers when the synced commit (or the leader) moved.
    fn publish_commit(&mut self) {
        let view = CommitView {
            commit: self.raft.commit_index().min(self.synced_commit),
            leader: self.raft.leader(),
        };
        self.commits.send_if_modified(|published| {
            let changed = *published != view;
            *published = view;
            changed
        });
    }

    /// Answers the reads whose index this node's store now holds.
    fn serve_reads(&mut self) {
        if self.reads_waiting.is_empty() {
            return;
        }
        let stored = self.raft.persisted_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting)
            .into_iter()
            .partition(|(index, _)| *index <= stored);
        self.reads_waiting = waiting;
        for (index, reply) in ready {
            let _ = reply.send(Ok(index));
        }
    }

    /// Hands the core what the store thread has made durable since the last
    /// look, which is when a leader counts its own copy towards commit.
    fn take_progress(&mut self) -> Result<(), StoreError> {
        let (durable, failed) = match self.store.progress.lock() {
            Ok(mut progress) => {
                self.synced_commit = progress.synced_commit;
                (progress.durable.take(), progress.failed.take())
            }
            Err(_) => (None, None),
        };
        if let Some(error) = failed {
            return Err(error);
        }
        if let Some((index, term)) = durable {
            self.raft.persisted(index, term);
        }
        Ok(())
    }

    fn queue(&mut self, job: Job) -> Result<(), StoreError> {
        self.store.jobs.send(job).map_err(|_| self.store_stopped())
    }

    /// Blocks until everything queued so far is durable.
    fn wait_for_store(&mut self) -> Result<(), StoreError> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.queue(Job::Barrier(done))?;
        wait.recv().map_err(|_| self.store_stopped())
    }

    /// The store thread stopped: its reason, if it has left one.
    fn store_stopped(&mut self) -> StoreError {
        if let Some(error) = self
            .store
            .progress
            .lock()
            .ok()
            .and_then(|mut p| p.failed.take())
        {
            return error;
        }
        StoreError::Write {
            dir: self.store.log.dir().to_path_buf(),
            what: "the store thread stopped (its error is logged above)".into(),
        }
    }

    /// Publishes commits, a new leader and the clock to live subscribers.
    fn announce(&mut self, committed: &[crate::raft::Entry]) {
        self.metrics.commits.inc_by(committed.len() as u64);
        let subscribed = self.events.receiver_count() > 0;
        for entry in committed {
            if let Payload::Membership(membership) = &entry.payload {
                self.metrics.membership_changes_applied.inc();
                tracing::info!(index = entry.index, %membership, "configuration committed");
            }
        }
        let (leader, term, lamport) = (self.raft.leader(), self.raft.term(), self.raft.lamport());
        if term != self.announced.1 {
            self.metrics.elections.inc();
        }
        if (leader, term) != (self.announced.0, self.announced.1) && subscribed {
            let _ = self.events.send(NodeEvent::Leader { leader, term });
        }
        if lamport != self.announced.2 && subscribed {
            let _ = self.events.send(NodeEvent::Clock { lamport });
        }
        self.announced = (leader, term, lamport);
    }

    fn answer(&mut self, id: RequestId, result: Result<Committed, ProposeError>) {
        let Some((since, slots)) = self.waiting.remove(&id) else {
            return;
        };
        if result.is_ok() {
            self.metrics
                .commit_latency
                .observe(since.elapsed().as_secs_f64());
        }
        for (batch, slot) in slots {
            let Some(waiter) = self.batches.get_mut(&batch) else {
                continue;
            };
            if waiter.results[slot].is_none() {
                waiter.results[slot] = Some(result.clone());
                waiter.missing -= 1;
            }
            if waiter.missing == 0 {
                if let Some(waiter) = self.batches.remove(&batch) {
                    let results = waiter.results.into_iter().flatten().collect();
                    if let Some(reply) = waiter.reply {
                        let _ = reply.send(results);
                    }
                }
            }
        }
    }
}
