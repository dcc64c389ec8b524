//! The thread that owns the Raft core: it feeds it ticks, peer messages and
//! client requests, and carries out each `Ready` in the order the core's
//! contract demands. Everything that arrives while one batch is being
//! synced goes into the next batch: one fsync covers them all.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, warn};

use crate::events::NodeEvent;
use crate::metrics::Metrics;
use crate::raft::{
    Committed, Envelope, Index, Lamport, NodeId, Payload, Proposal, ProposeError, RaftNode,
    RequestId, Status, Term,
};
use crate::storage::{Store, StoreError};

/// Work for the driver.
pub enum Input {
    Peer(Envelope),
    Propose(
        Vec<Proposal>,
        oneshot::Sender<Vec<Result<Committed, ProposeError>>>,
    ),
    Read(oneshot::Sender<Result<Index, ProposeError>>),
    Status(oneshot::Sender<Status>),
}

/// Where outgoing Raft messages go: one queue per peer.
pub type Outboxes = HashMap<NodeId, mpsc::Sender<Envelope>>;

/// A batch proposal collecting one answer per message.
struct BatchWaiter {
    results: Vec<Option<Result<Committed, ProposeError>>>,
    missing: usize,
    reply: Option<oneshot::Sender<Vec<Result<Committed, ProposeError>>>>,
}

pub struct Driver {
    raft: RaftNode,
    store: Store,
    outboxes: Outboxes,
    tick: Duration,
    batches: HashMap<u64, BatchWaiter>,
    next_batch: u64,
    /// Which batch slots wait on a request id, and since when.
    waiting: HashMap<RequestId, (Instant, Vec<(u64, usize)>)>,
    reads: HashMap<u64, oneshot::Sender<Result<Index, ProposeError>>>,
    next_read: u64,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<NodeEvent>,
    /// What the last announcement said, to announce only changes.
    announced: (Option<NodeId>, Term, Lamport),
    /// The term and vote known to be on disk.
    durable_vote: (Term, Option<NodeId>),
}

impl Driver {
    pub fn new(
        raft: RaftNode,
        store: Store,
        outboxes: Outboxes,
        tick: Duration,
        metrics: Arc<Metrics>,
        events: broadcast::Sender<NodeEvent>,
    ) -> Self {
        Driver {
            metrics,
            events,
            announced: (None, 0, 0),
            durable_vote: {
                let status = raft.status();
                (status.term, raft.vote())
            },
            raft,
            store,
            outboxes,
            tick,
            batches: HashMap::new(),
            next_batch: 0,
            waiting: HashMap::new(),
            reads: HashMap::new(),
            next_read: 0,
        }
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
            while self.raft.has_ready() {
                self.process_ready()?;
            }
            self.metrics
                .entries_in_memory
                .store(self.raft.entries_in_memory() as u64, Ordering::Relaxed);
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
                self.metrics
                    .proposals
                    .fetch_add(proposals.len() as u64, Ordering::Relaxed);
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
                let _ = reply.send(self.raft.status());
            }
        }
    }

    fn process_ready(&mut self) -> Result<(), StoreError> {
        let ready = self.raft.ready();
        // 1. A new term or vote must be durable before anything leaves.
        //    A commit index alone needs no such ordering, so it rides along
        //    with the log write below.
        let mut hard_state = ready.hard_state;
        if let Some(hs) = hard_state {
            if (hs.term, hs.vote) != self.durable_vote {
                self.timed_write(Some(hs), None)?;
                self.durable_vote = (hs.term, hs.vote);
                hard_state = None;
            }
        }
        // 2. Replicate while writing our own log: a leader's appends leave
        //    before its fsync, so its disk and its followers' work in parallel.
        for envelope in ready.messages {
            self.send(envelope);
        }
        // 3. One sync for everything appended since the last one.
        self.timed_write(hard_state, ready.log_write.as_ref())?;
        // 4. Only now may entries be acknowledged.
        for envelope in ready.persisted_messages {
            self.send(envelope);
        }
        if let Some((index, term)) = ready.log_write.as_ref().and_then(|w| w.last()) {
            self.raft.persisted(index, term);
        }
        self.announce(&ready.committed);
        for response in ready.responses {
            self.answer(response.id, response.result);
        }
        for read in ready.reads {
            if let Some(reply) = self.reads.remove(&read.ctx) {
                // Entries up to the read index are applied as soon as they
                // commit, so the read may be served at once.
                let _ = reply.send(read.result);
            }
        }
        // 5. A lagging follower needs entries the core no longer holds in
        //    memory: read them back from the store.
        for fetch in ready.fetches {
            let to = fetch.from.saturating_add(fetch.max as u64 - 1);
            let entries = self.store.entries(fetch.from, to, fetch.max)?;
            self.raft.fetched(fetch.to, fetch.from, entries);
        }
        Ok(())
    }

    fn timed_write(
        &mut self,
        hard_state: Option<crate::raft::HardState>,
        write: Option<&crate::raft::LogWrite>,
    ) -> Result<(), StoreError> {
        if hard_state.is_some() || write.is_some() {
            let started = Instant::now();
            self.store.write(hard_state, write)?;
            self.metrics.fsync.observe(started.elapsed());
        }
        Ok(())
    }

    fn send(&mut self, envelope: Envelope) {
        let Some(outbox) = self.outboxes.get(&envelope.to) else {
            error!(to = envelope.to, "no route to peer");
            return;
        };
        if outbox.try_send(envelope).is_err() {
            // Raft tolerates loss; a full queue means the peer is far behind
            // or unreachable, and it will be caught up by probing.
            warn!("outbound queue full, dropping a message");
        }
    }

    /// Publishes commits, a new leader and the clock to live subscribers.
    fn announce(&mut self, committed: &[crate::raft::Entry]) {
        self.metrics
            .commits
            .fetch_add(committed.len() as u64, Ordering::Relaxed);
        let subscribed = self.events.receiver_count() > 0;
        for entry in committed {
            if let (true, Payload::Command(command)) = (subscribed, &entry.payload) {
                let _ = self.events.send(NodeEvent::Commit {
                    index: entry.index,
                    term: entry.term,
                    lamport: entry.lamport,
                    sender: command.sender.clone(),
                    text: String::from_utf8_lossy(&command.data).into_owned(),
                });
            }
        }
        let (leader, term, lamport) = (self.raft.leader(), self.raft.term(), self.raft.lamport());
        if term != self.announced.1 {
            self.metrics.elections.fetch_add(1, Ordering::Relaxed);
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
            self.metrics.commit_latency.observe(since.elapsed());
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
