//! What owns the Raft core: it feeds it ticks, peer messages and client
//! requests, and carries out each `Ready` in the order the core's
//! contract demands. It writes and syncs the store itself (`persist.rs`),
//! after it has sent the round's appends and answered what committed, so
//! a leader's disk and its followers' work in parallel. It runs on a
//! thread of its own (`Driver::run`) or as a task on the node's one
//! thread, beside the network (`Driver::run_on_runtime`).

use std::collections::HashMap;
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SendError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot, watch, Notify};

use crate::events::NodeEvent;
use crate::metrics::Metrics;
use crate::raft::{
    ChangeError, Committed, Envelope, FastMap, HardState, Index, Lamport, Membership,
    MembershipChange, Message, NodeId, Proposal, ProposeError, RaftNode, Status, Term,
};
use crate::storage::StoreError;

use super::held_appends::HeldAppends;
use super::outbox::Outboxes;
use super::persist::{Job, StoreEvent, StoreHandle};
use super::spin::Spinner;
use super::NodeError;

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
    /// The status, the committed configuration and its index.
    Members(oneshot::Sender<(Status, Membership, Index)>),
    /// Stop the driver (`NodeHandle::stop`).
    Stop,
}

impl Input {
    /// About how many bytes of entries this input brings into a round.
    fn bytes(&self) -> usize {
        match self {
            Input::Peer(Envelope {
                message: Message::Append { entries, .. },
                ..
            }) => entries.iter().map(crate::raft::Entry::size).sum(),
            Input::Propose(proposals, _) => proposals
                .iter()
                .map(|proposal| 64 + proposal.data.len())
                .sum(),
            _ => 64,
        }
    }
}

/// Most bytes of entries the driver takes into one round before it
/// writes them: a catching-up follower whose inputs piled up during a
/// sync took them all at once, up to the leader's whole window (32 MB),
/// and a caught-up node's RSS rose from 110-119 to 139-165 MB.
const ROUND_BYTES: usize = 4 << 20;

/// What this node has committed and synced, and the leader it knows: what
/// watchers (`api.rs`) wait on. Only a commit index that would survive a
/// crash is published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitView {
    pub commit: Index,
    pub leader: Option<NodeId>,
}

/// What the store has reported synced: the one place the driver keeps
/// what is on disk. (How far the log is durable is the core's business:
/// `StoreEvent::Durable` goes straight to `RaftNode::persisted`.)
#[derive(Clone, Copy, Debug)]
struct Synced {
    /// The commit index on disk. The node reports (`Status`, `CommitView`)
    /// no more than this, so what it reports survives a crash.
    commit: Index,
}

/// The sending side of the driver's queue. Each send also wakes a driver
/// that runs as a task (`Driver::run_on_runtime`); a driver on a thread
/// of its own waits on the queue itself and never looks at the wake-up.
#[derive(Clone)]
pub struct Inputs {
    queue: SyncSender<Input>,
    wake: Arc<Notify>,
}

impl Inputs {
    pub fn try_send(&self, input: Input) -> Result<(), TrySendError<Input>> {
        self.queue.try_send(input)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Waits for room: call it off the runtime.
    pub fn send(&self, input: Input) -> Result<(), SendError<Input>> {
        self.queue.send(input)?;
        self.wake.notify_one();
        Ok(())
    }
}

/// The driver's queue, of `capacity` inputs.
pub fn queue(capacity: usize) -> (Inputs, Inbox) {
    let (queue, receiver) = std::sync::mpsc::sync_channel(capacity);
    let wake = Arc::new(Notify::new());
    (
        Inputs {
            queue,
            wake: wake.clone(),
        },
        Inbox {
            queue: receiver,
            wake,
        },
    )
}

/// The driver's one input queue (peers and clients).
pub struct Inbox {
    queue: Receiver<Input>,
    /// Notified by each send.
    wake: Arc<Notify>,
}

impl Inbox {
    fn next(
        &mut self,
        spinner: &mut Spinner,
        timeout: Duration,
    ) -> Result<Input, RecvTimeoutError> {
        spinner.recv(&self.queue, Some(timeout))
    }

    /// `next` for a driver running as a task: it first lets the thread's
    /// other tasks run (they deliver inputs, and send what the last round
    /// left), then waits for an input until `until`.
    async fn next_on_runtime(&mut self, until: Instant) -> Result<Input, RecvTimeoutError> {
        tokio::task::yield_now().await;
        loop {
            match self.queue.try_recv() {
                Ok(input) => return Ok(input),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(until.into()) => return Err(RecvTimeoutError::Timeout),
            }
        }
    }

    fn try_next(&mut self) -> Option<Input> {
        self.queue.try_recv().ok()
    }
}

/// What `Driver::process_ready` leaves to its caller.
struct Processed {
    /// The write to make once the `Ready`'s messages are away.
    write: Option<Job>,
    /// Entries were read back from the store for a lagging follower.
    fetched: bool,
}

/// Whether the driver goes on after taking a round's inputs, and about
/// how many bytes of entries they bring.
enum Flow {
    Go { bytes: usize },
    Stop,
}

/// The most bytes of entries a round brings for its write and sync to run
/// on the node's one thread (`Driver::run_on_runtime`); a larger round's
/// run on a blocking thread while the node's network goes on. Written
/// inline, rounds of several megabytes (a pipelined client's) stalled the
/// node's QUIC for longer than quinn's pacer saves sending credit for
/// (2 ms): on the WAN topology Sydney then trailed by up to 1.5 million
/// entries and the first leader kill after the burst took 1.2-2.0 s.
/// Every round off the thread lost 64 clients 5-15% (the hand-offs are
/// back); above 64 KiB, WAN pipelined 377,000-424,000 msg/s; above 2 MiB,
/// 409,000-448,000 with the kills at 0.73-0.74 s (BENCHMARKS.md).
const INLINE_WRITE_BYTES: usize = 2 << 20;

/// A batch proposal collecting one answer per message.
struct BatchWaiter {
    /// When it reached the driver, for the commit latency histogram.
    since: Instant,
    results: Vec<Option<Result<Committed, ProposeError>>>,
    missing: usize,
    reply: Option<oneshot::Sender<Vec<Result<Committed, ProposeError>>>>,
}

/// Bits of a proposal's `ctx` that name its slot in its batch; the rest
/// name the batch. A batch holds at most `MAX_BATCH` messages (the API
/// refuses more), and 2^40 batches outlast any node.
const SLOT_BITS: u32 = 24;
const _: () = assert!(crate::wire::MAX_BATCH < 1 << SLOT_BITS);

/// The `Proposal::ctx` of slot `slot` of batch `batch`.
fn slot_ctx(batch: u64, slot: usize) -> u64 {
    (batch << SLOT_BITS) | slot as u64
}

/// The batch and slot a `ctx` of `slot_ctx` names.
fn ctx_slot(ctx: u64) -> (u64, usize) {
    (ctx >> SLOT_BITS, (ctx & ((1 << SLOT_BITS) - 1)) as usize)
}

pub struct Driver {
    raft: RaftNode,
    inbox: Inbox,
    /// How `run` waits on `inbox` (`run_on_runtime` awaits it instead).
    spinner: Spinner,
    /// Written and synced by the driver, in order.
    store: StoreHandle,
    synced: Synced,
    outboxes: Outboxes,
    tick: Duration,
    /// Batches waiting for answers; the core hands each answer back with
    /// its batch and slot (`Proposal::ctx`).
    batches: FastMap<u64, BatchWaiter>,
    next_batch: u64,
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
    /// Published after every round for watchers.
    commits: watch::Sender<CommitView>,
    /// Appends that can wait (without entries, or to a lazy follower),
    /// held briefly (`held_appends.rs`).
    held_appends: HeldAppends,
}

/// How often the driver ticks the core, and how long it spins for more
/// input while busy (`spin.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub tick: Duration,
    pub spin: Duration,
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
        inbox: Inbox,
        store: StoreHandle,
        outboxes: Outboxes,
        Pace { tick, spin }: Pace,
        metrics: Arc<Metrics>,
        Feeds {
            events,
            membership,
            commits,
        }: Feeds,
    ) -> Self {
        let held_appends = HeldAppends::new(
            raft.config().max_append_entries,
            raft.config().max_append_bytes,
        );
        let mut driver = Driver {
            membership,
            commits,
            changes: HashMap::new(),
            next_change: 0,
            metrics,
            events,
            announced: (None, 0, 0),
            // What the core was restored from is what is on disk.
            synced: Synced {
                commit: store.synced_commit,
            },
            raft,
            inbox,
            spinner: Spinner::new(spin),
            store,
            outboxes,
            tick,
            batches: FastMap::default(),
            next_batch: 0,
            reads: HashMap::new(),
            next_read: 0,
            reads_waiting: Vec::new(),
            held_appends,
        };
        driver.publish_commit();
        driver
    }

    /// Runs until every sender of its inputs is gone. A storage failure
    /// ends it: a node that cannot persist must not keep voting.
    pub fn run(mut self) -> Result<(), StoreError> {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = self
                .next_due(next_tick)
                .saturating_duration_since(Instant::now());
            let input = self.inbox.next(&mut self.spinner, wait);
            if let Flow::Stop = self.take_round(input)? {
                return Ok(());
            }
            self.tick_if_due(&mut next_tick)?;
            while self.raft.has_ready() {
                if let Some(write) = self.process_ready()?.write {
                    self.carry_out(vec![write])?;
                }
            }
            self.end_round();
        }
    }

    /// `run`, as a task on a current-thread runtime that also does this
    /// node's network I/O: no hand-off between threads inside the node.
    /// Before each write it lets the thread send the round's appends and
    /// answers, so the followers' work overlaps this node's sync. A small
    /// round's write and sync block the thread; a larger one's run on a
    /// blocking thread meanwhile (`INLINE_WRITE_BYTES`).
    pub async fn run_on_runtime(self) -> Result<(), NodeError> {
        let mut driver = self;
        let mut next_tick = Instant::now() + driver.tick;
        loop {
            let until = driver.next_due(next_tick);
            let input = driver.inbox.next_on_runtime(until).await;
            let Flow::Go { bytes } = driver.take_round(input)? else {
                return Ok(());
            };
            driver.tick_if_due(&mut next_tick)?;
            while driver.raft.has_ready() {
                let Processed { write, fetched } = driver.process_ready()?;
                let Some(write) = write else {
                    if fetched {
                        // The peer links send what was read back before
                        // the next `Ready` reads more: a lagging follower's
                        // whole window (32 MB) read at once doubled the
                        // leader's RSS and halved the catch-up rate.
                        tokio::task::yield_now().await;
                    }
                    continue;
                };
                tokio::task::yield_now().await;
                if bytes <= INLINE_WRITE_BYTES {
                    driver.carry_out(vec![write])?;
                    continue;
                }
                let (back, written) = tokio::task::spawn_blocking(move || {
                    let written = driver.carry_out(vec![write]);
                    (driver, written)
                })
                .await
                .map_err(|e| {
                    // Panicked or cancelled: the write's own errors come
                    // back in `written`.
                    NodeError::Driver(format!(
                        "the blocking thread writing the log did not finish: {e}"
                    ))
                })?;
                driver = back;
                written?;
            }
            driver.end_round();
        }
    }

    /// When the driver must act next without an input: a tick, a
    /// lingering commit index, a held append.
    fn next_due(&self, next_tick: Instant) -> Instant {
        [self.store.linger_deadline(), self.held_appends.next_due()]
            .into_iter()
            .flatten()
            .fold(next_tick, Instant::min)
    }

    /// Handles `first` (what the wait came to) and whatever else is
    /// queued, up to `ROUND_BYTES`.
    fn take_round(&mut self, first: Result<Input, RecvTimeoutError>) -> Result<Flow, StoreError> {
        let mut bytes = 0;
        match first {
            Ok(Input::Stop) => return Ok(Flow::Stop),
            Ok(input) => {
                bytes = input.bytes();
                self.handle(input)?;
                // Take whatever else is queued into the same round, up
                // to one append's worth of entries: more would be
                // written, held and acknowledged all at once.
                while bytes < ROUND_BYTES {
                    let Some(input) = self.inbox.try_next() else {
                        break;
                    };
                    if let Input::Stop = input {
                        return Ok(Flow::Stop);
                    }
                    bytes += input.bytes();
                    self.handle(input)?;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(Flow::Stop),
        }
        Ok(Flow::Go { bytes })
    }

    /// Syncs a commit index whose linger is over, and ticks the core if
    /// its tick is due.
    fn tick_if_due(&mut self, next_tick: &mut Instant) -> Result<(), StoreError> {
        if self
            .store
            .linger_deadline()
            .is_some_and(|deadline| deadline <= Instant::now())
        {
            self.carry_out(Vec::new())?;
        }
        if Instant::now() >= *next_tick {
            self.raft.tick();
            *next_tick += self.tick;
            if *next_tick < Instant::now() {
                *next_tick = Instant::now() + self.tick;
            }
        }
        Ok(())
    }

    /// Sends the held appends that are due and publishes what the round
    /// changed.
    fn end_round(&mut self) {
        for envelope in self.held_appends.take_due(Instant::now()) {
            self.outboxes.send(envelope);
        }
        let merged = self.held_appends.take_merged();
        if merged > 0 {
            self.metrics.merged_appends.inc_by(merged);
        }
        self.serve_reads();
        self.publish_commit();
        self.metrics
            .entries_in_memory
            .set(self.raft.entries_in_memory() as u64);
    }

    fn handle(&mut self, input: Input) -> Result<(), StoreError> {
        match input {
            Input::Peer(envelope) => self.raft.step(envelope),
            Input::Propose(proposals, reply) => {
                let batch = self.next_batch;
                self.next_batch += 1;
                self.batches.insert(
                    batch,
                    BatchWaiter {
                        since: Instant::now(),
                        results: vec![None; proposals.len()],
                        missing: proposals.len(),
                        reply: Some(reply),
                    },
                );
                self.metrics.proposals.inc_by(proposals.len() as u64);
                for (slot, mut proposal) in proposals.into_iter().enumerate() {
                    proposal.ctx = slot_ctx(batch, slot);
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
                status.commit = status.commit.min(self.synced.commit);
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
                status.commit = status.commit.min(self.synced.commit);
                let _ = reply.send((
                    status,
                    self.raft.committed_membership().clone(),
                    self.raft.committed_membership_index(),
                ));
            }
            // `run` stops at it.
            Input::Stop => {}
        }
        Ok(())
    }

    /// Takes in what the store made durable.
    fn stored(&mut self, event: StoreEvent) {
        match event {
            // Which is when a leader counts its own copy towards commit.
            StoreEvent::Durable { index, term } => self.raft.persisted(index, term),
            StoreEvent::CommitSynced(commit) => self.synced.commit = commit,
        }
    }

    /// Carries out one `Ready` up to its write, which it returns: the
    /// caller writes and syncs it once the round's messages are away.
    fn process_ready(&mut self) -> Result<Processed, StoreError> {
        let ready = self.raft.ready();
        // 1. A new term or vote (the core says so: `must_sync`) must be
        //    durable before anything leaves. A commit index alone needs no
        //    such ordering, so it rides along with the log write below.
        let mut hard_state = ready.hard_state;
        if ready.must_sync {
            if let Some(hard_state) = hard_state.take() {
                self.sync_hard_state(hard_state)?;
            }
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
        //    An append without entries waits briefly (the next one with
        //    entries may say the same), and a lazy follower's appends wait
        //    to leave merged (`held_appends.rs`).
        let now = Instant::now();
        let mut leaving = Vec::new();
        for envelope in ready.messages {
            self.held_appends.offer(envelope, now, &mut leaving);
            for envelope in leaving.drain(..) {
                self.outboxes.send(envelope);
            }
        }
        // 3. Answer what committed: on a quorum's disks already, it need
        //    not wait for this node's write below.
        self.announce(ready.committed, &ready.committed_memberships);
        for response in ready.responses {
            self.answer(response.ctx, response.result, now);
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
        let fetched = !ready.fetches.is_empty();
        for fetch in ready.fetches {
            let to = fetch.from.saturating_add(fetch.max as u64 - 1);
            let entries =
                self.store
                    .log
                    .entries_within(fetch.from, to, fetch.max, fetch.max_bytes)?;
            self.raft.fetched(fetch.to, fetch.from, entries);
        }
        // 5. Write and sync, then send what acknowledges the entries
        //    written (`persisted_messages`) and take in what is durable
        //    (`StoreEvent::Durable`: when a leader counts its own copy).
        if hard_state.is_some() || ready.log_write.is_some() || !ready.persisted_messages.is_empty()
        {
            return Ok(Processed {
                write: Some(Job::Write {
                    hard_state,
                    log_write: ready.log_write,
                    then_send: ready.persisted_messages,
                    linger: ready.linger,
                }),
                fetched,
            });
        }
        Ok(Processed {
            write: None,
            fetched,
        })
    }

    /// Wakes watchers when the synced commit (or the leader) moved.
    fn publish_commit(&mut self) {
        let view = CommitView {
            commit: self.raft.commit_index().min(self.synced.commit),
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

    /// Makes a new term or vote durable, with whatever was staged before
    /// it, before anything leaves the node: a vote sent and then forgotten
    /// in a crash can elect two leaders in one term.
    fn sync_hard_state(&mut self, hard_state: HardState) -> Result<(), StoreError> {
        self.carry_out(vec![Job::HardState(hard_state)])
    }

    /// Writes and syncs `jobs` (none: the commit index that lingered) and
    /// takes in what they made durable. A failure ends the driver: a node
    /// that cannot persist must not keep voting.
    fn carry_out(&mut self, jobs: Vec<Job>) -> Result<(), StoreError> {
        for event in self.store.carry_out(jobs)? {
            self.stored(event);
        }
        Ok(())
    }

    /// Publishes commits, a new leader and the clock to live subscribers.
    fn announce(&mut self, committed: u64, memberships: &[(Index, Membership)]) {
        self.metrics.commits.inc_by(committed);
        let subscribed = self.events.receiver_count() > 0;
        for (index, membership) in memberships {
            self.metrics.membership_changes_applied.inc();
            tracing::info!(index, %membership, "configuration committed");
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

    /// Answers the batch slot `ctx` names; `now` is when its round's
    /// answers began (one clock read per round, not per message).
    fn answer(&mut self, ctx: u64, result: Result<Committed, ProposeError>, now: Instant) {
        let (batch, slot) = ctx_slot(ctx);
        let Some(waiter) = self.batches.get_mut(&batch) else {
            return;
        };
        let Some(answer @ None) = waiter.results.get_mut(slot) else {
            return;
        };
        if result.is_ok() {
            self.metrics
                .commit_latency
                .observe(now.saturating_duration_since(waiter.since).as_secs_f64());
        }
        *answer = Some(result);
        waiter.missing -= 1;
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

#[cfg(test)]
mod tests {
    use std::thread::JoinHandle;

    use super::*;
    use crate::raft::Config;
    use crate::storage::Store;

    struct Node {
        inputs: Inputs,
        driver: JoinHandle<Result<(), NodeError>>,
        commits: watch::Receiver<CommitView>,
    }

    /// Where a test runs the driver.
    #[derive(Clone, Copy, Debug)]
    enum Mode {
        /// `Driver::run`, on a thread of its own.
        Thread,
        /// `Driver::run_on_runtime`, a task on a current-thread runtime.
        Runtime,
    }

    /// A one-voter node over a real store in `dir`, wired as `server::run`
    /// wires it, without the network.
    fn start(dir: &std::path::Path, mode: Mode) -> Node {
        start_failing(dir, None, mode)
    }

    /// `start`, with a store whose first write of at least `.0` bytes of
    /// entries fails with `.1`.
    fn start_failing(
        dir: &std::path::Path,
        failure: Option<(usize, StoreError)>,
        mode: Mode,
    ) -> Node {
        let _ = std::fs::remove_dir_all(dir);
        let (store, _) = Store::open(dir, "c1", 1).unwrap();
        let mut config = Config::new(1, [1]);
        config.seed = 1;
        let raft = RaftNode::new(config, HardState::default(), Vec::new()).unwrap();
        let (inputs, input_rx) = queue(1024);
        let metrics = Arc::new(Metrics::default());
        let outboxes = Outboxes::default();
        let mut store = StoreHandle::new(store, outboxes.clone(), metrics.clone());
        if let Some((bytes, error)) = failure {
            store.fail_from_bytes = bytes;
            store.fail_next = Some(error);
        }
        let (membership, _) = watch::channel(super::super::links::View {
            index: 0,
            membership: raft.membership().clone(),
            committed: raft.committed_membership().clone(),
        });
        let (commits_tx, commits) = watch::channel(CommitView::default());
        let driver = Driver::new(
            raft,
            input_rx,
            store,
            outboxes,
            Pace {
                tick: Duration::from_millis(1),
                spin: crate::server::spin::DEFAULT_SPIN,
            },
            metrics,
            Feeds {
                events: broadcast::channel(16).0,
                membership,
                commits: commits_tx,
            },
        );
        let driver = match mode {
            Mode::Thread => std::thread::spawn(move || driver.run().map_err(NodeError::from)),
            Mode::Runtime => std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(driver.run_on_runtime())
            }),
        };
        Node {
            inputs,
            driver,
            commits,
        }
    }

    /// Waits (at most 10 s) for an answer the driver owes.
    fn answer<T>(mut reply: oneshot::Receiver<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match reply.try_recv() {
                Ok(value) => return value,
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(error) => panic!("no answer: {error}"),
            }
        }
    }

    /// Client 7's message `seq`.
    fn proposal(seq: u64) -> Proposal {
        Proposal {
            id: crate::raft::RequestId { client_id: 7, seq },
            lamport: 0,
            since: 0,
            sender: "test".into(),
            data: bytes::Bytes::from(format!("m{seq}")),
            after: None,
            ctx: 0,
        }
    }

    /// Client 7's message `seq`, 64 KiB long: 40 of them are more than a
    /// round written inline on the runtime's thread (`INLINE_WRITE_BYTES`).
    fn big_proposal(seq: u64) -> Proposal {
        Proposal {
            data: bytes::Bytes::from(vec![b'x'; 64 << 10]),
            ..proposal(seq)
        }
    }

    /// Sends one message, always the same (a retry is not written twice).
    fn send(node: &Node) -> Result<Committed, ProposeError> {
        let (reply, answer_rx) = oneshot::channel();
        node.inputs
            .send(Input::Propose(vec![proposal(1)], reply))
            .unwrap();
        answer(answer_rx).remove(0)
    }

    fn status(node: &Node) -> Status {
        let (reply, answer_rx) = oneshot::channel();
        node.inputs.send(Input::Status(reply)).unwrap();
        answer(answer_rx)
    }

    /// The whole conversation: the vote is synced before the node leads,
    /// the proposal commits once its entry is durable (`Durable`), and the
    /// commit is reported once synced (`CommitSynced`).
    #[test]
    fn a_lone_voter_votes_writes_and_commits_through_the_store() {
        lone_voter(Mode::Thread);
    }

    /// The same on the node's one thread.
    #[test]
    fn a_lone_voter_on_the_runtime_votes_writes_and_commits_through_the_store() {
        lone_voter(Mode::Runtime);
    }

    fn lone_voter(mode: Mode) {
        let dir =
            std::env::temp_dir().join(format!("cs-driver-lone-{mode:?}-{}", std::process::id()));
        let node = start(&dir, mode);
        let deadline = Instant::now() + Duration::from_secs(10);
        let committed = loop {
            match send(&node) {
                Ok(committed) => break committed,
                // Refused until the election is over.
                Err(ProposeError::NotLeader { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(other) => panic!("{other}"),
            }
        };
        assert_eq!(committed.index, 2, "after the new leader's no-op");
        let deadline = Instant::now() + Duration::from_secs(10);
        let synced = loop {
            let status = status(&node);
            if status.commit >= 2 || Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!((synced.term, synced.commit), (1, 2));
        assert_eq!(
            node.commits.borrow().commit,
            2,
            "published before the status answer"
        );
        assert!(stop(node).is_ok());
        // sled lets go of the directory a moment after the driver.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (_, recovered) = loop {
            match Store::open(&dir, "c1", 1) {
                Ok(opened) => break opened,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(error) => panic!("{error}"),
            }
        };
        assert_eq!(
            (recovered.hard_state.vote, recovered.hard_state.commit),
            (Some(1), 2)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every batch slot gets the answer for its own message, retries of a
    /// message still pending included: the core hands each answer back
    /// with the slot's `ctx`, and the driver keeps no table by request id.
    /// A batch too large to write inline on the runtime's thread
    /// (`INLINE_WRITE_BYTES`) is answered the same way.
    #[test]
    fn each_batch_slot_is_answered_with_its_own_message() {
        batch_slots(Mode::Thread);
    }

    /// The same on the node's one thread, the large batch written off it.
    #[test]
    fn each_batch_slot_on_the_runtime_is_answered_with_its_own_message() {
        batch_slots(Mode::Runtime);
    }

    fn batch_slots(mode: Mode) {
        let dir =
            std::env::temp_dir().join(format!("cs-driver-slots-{mode:?}-{}", std::process::id()));
        let node = start(&dir, mode);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(error) = send(&node) {
            assert!(Instant::now() < deadline, "no leader: {error}");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Two batches queued together: seq 2 twice in the first, seq 3 in
        // both, so both retries arrive while their first attempt waits.
        let (first_reply, first) = oneshot::channel();
        let (second_reply, second) = oneshot::channel();
        node.inputs
            .send(Input::Propose(
                vec![proposal(2), proposal(3), proposal(2)],
                first_reply,
            ))
            .unwrap();
        node.inputs
            .send(Input::Propose(vec![proposal(3), proposal(4)], second_reply))
            .unwrap();
        let index = |answers: Vec<Result<Committed, ProposeError>>| -> Vec<Index> {
            answers
                .into_iter()
                .map(|answer| answer.expect("committed").index)
                .collect()
        };
        // After the no-op (1) and message 1 (2), each written once.
        assert_eq!(index(answer(first)), vec![3, 4, 3]);
        assert_eq!(index(answer(second)), vec![4, 5]);
        let (big_reply, big) = oneshot::channel();
        let batch: Vec<Proposal> = (6..46).map(big_proposal).collect();
        assert!(batch.iter().map(|p| 64 + p.data.len()).sum::<usize>() > INLINE_WRITE_BYTES);
        node.inputs.send(Input::Propose(batch, big_reply)).unwrap();
        assert_eq!(index(answer(big)), (6..46).collect::<Vec<Index>>());
        assert!(stop(node).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Stops the driver as `NodeHandle::stop` does, and waits for it.
    fn stop(node: Node) -> Result<(), NodeError> {
        node.inputs.send(Input::Stop).unwrap();
        node.driver.join().unwrap()
    }

    /// The node's first write (its vote for itself) fails: the driver stops
    /// with the store's error, and nothing was committed.
    #[test]
    fn a_store_failure_stops_the_driver_with_the_stores_error() {
        store_failure(Mode::Thread, 0);
    }

    /// The same on the node's one thread, for a write inline (the vote)
    /// and one made off it (a large batch).
    #[test]
    fn a_store_failure_on_the_runtime_stops_the_driver_with_the_stores_error() {
        store_failure(Mode::Runtime, 0);
        store_failure(Mode::Runtime, INLINE_WRITE_BYTES);
    }

    /// The first write of at least `bytes` bytes of entries fails.
    fn store_failure(mode: Mode, bytes: usize) {
        let dir = std::env::temp_dir().join(format!(
            "cs-driver-fail-{mode:?}-{bytes}-{}",
            std::process::id()
        ));
        let node = start_failing(
            &dir,
            Some((
                bytes,
                StoreError::Write {
                    dir: "test".into(),
                    what: "the disk caught fire".into(),
                },
            )),
            mode,
        );
        let mut refused = None;
        if bytes > 0 {
            // Elected (its vote written), then the large batch's write fails.
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(error) = send(&node) {
                assert!(Instant::now() < deadline, "no leader: {error}");
                std::thread::sleep(Duration::from_millis(5));
            }
            let (reply, answer) = oneshot::channel();
            let batch = (2..42).map(big_proposal).collect();
            node.inputs.send(Input::Propose(batch, reply)).unwrap();
            refused = Some(answer);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.driver.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the driver goes on after its write failed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        match node.driver.join().unwrap() {
            Err(NodeError::Store(StoreError::Write { what, .. })) => {
                assert_eq!(what, "the disk caught fire")
            }
            other => panic!("{other:?}"),
        }
        if let Some(mut answer) = refused {
            assert!(answer.try_recv().is_err(), "no answer for a failed write");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
