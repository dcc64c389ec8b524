//! A deterministic simulator for the consensus core.
//!
//! It drives real [`RaftNode`]s through a seeded random world: a network
//! that delays, drops, duplicates and reorders messages, partitions both
//! ways and one way, crashes that lose whatever was not yet durable,
//! restarts from what was, disks lost and replicas rebuilt from the peers
//! (as `node rebuild` does), leadership transfers, clients that retry,
//! and an operator changing the membership: spare nodes added as learners
//! and promoted, members removed (the leader included), addresses moved.
//! After every step a [`checker::Checker`] verifies Raft's safety
//! properties; at the end the faults heal and the cluster must elect a
//! leader and commit every pending proposal within a bounded time.
//!
//! The same seed always replays the same run.

pub mod checker;
pub mod client;
pub mod network;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::raft::rng::Rng;
use crate::raft::{
    ChangeError, ChangeResponse, Config, Entry, Envelope, HardState, Index, LogPosition, LogWrite,
    MembershipChange, Message, NodeId, Proposal, ProposeError, RaftNode, Ready, RebuildPlan,
    Restorer, Role, Status,
};
use crate::server::held_appends::HeldAppends;
use checker::{extend_chain, Checker, Violation};
use client::SimClient;
use network::{Network, NetworkFaults};

/// Shape and fault rates of one simulated run. Rates are per step.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: u64,
    pub voters: u64,
    pub learners: u64,
    /// Nodes outside the bootstrap configuration, running from the start
    /// with empty logs: candidates for the operator to add.
    pub spares: u64,
    pub clients: u64,
    pub network: NetworkFaults,
    /// Most steps a log write takes to become durable.
    pub max_persist_delay: u64,
    pub propose_rate: f64,
    pub read_rate: f64,
    pub partition_rate: f64,
    pub one_way_rate: f64,
    pub heal_rate: f64,
    pub crash_rate: f64,
    /// A node's disk is lost: it crashes (if up), its log and hard state are
    /// wiped, and it restarts through the rebuild path (`RebuildPlan`) once
    /// every other node is up to report its status.
    pub rebuild_rate: f64,
    /// A crashed node restarts after `min..max` steps.
    pub restart_delay: (u64, u64),
    pub transfer_rate: f64,
    /// The operator asks the leader for a membership change: add a node
    /// as a learner, promote a learner, remove a member (the leader too)
    /// or move one to a new address.
    pub membership_rate: f64,
    /// Give voters priorities; the highest must end up leading.
    pub priorities: bool,
    /// Steps allowed after the faults heal for the cluster to converge.
    pub liveness_bound: u64,
    /// Break the driver on purpose, to show the checker notices.
    pub sabotage: Option<Sabotage>,
}

/// Deliberate driver bugs that break Raft's durability contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Send acknowledgements before the log write is durable.
    AckBeforeSync,
    /// Forget the vote on restart, as if it was never synced.
    ForgetVote,
    /// Rebuild lost replicas without a catch-up floor: they vote with
    /// their empty logs (the bug `RebuildPlan::floor` fixes).
    NoCatchUpFloor,
}

impl SimConfig {
    /// A run whose shape (3 or 5 voters, learners, client windows,
    /// priorities) is drawn from the seed.
    pub fn from_seed(seed: u64, steps: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5EED_5EED);
        // Drawn in this order, so that a seed replays the same run.
        let voters = if rng.chance(0.5) { 3 } else { 5 };
        let learners = rng.range(0, 3);
        let clients = rng.range(1, 4);
        // One run in four is a WAN: delays near the election timeout,
        // where votes can come back after it.
        let max_delay = if rng.chance(0.25) { 12 } else { 3 };
        SimConfig {
            seed,
            steps,
            voters,
            learners,
            spares: 2,
            clients,
            network: NetworkFaults {
                drop: 0.02,
                duplicate: 0.01,
                max_delay,
            },
            max_persist_delay: 2,
            propose_rate: 0.3,
            read_rate: 0.05,
            partition_rate: 0.004,
            one_way_rate: 0.003,
            heal_rate: 0.02,
            crash_rate: 0.004,
            rebuild_rate: 0.001,
            restart_delay: (5, 80),
            transfer_rate: 0.002,
            membership_rate: 0.006,
            priorities: rng.chance(0.25),
            // 600 steps of 3-step delays: as many round trips on a WAN.
            // A replica rebuilt from nothing catches up ~800 entries after
            // healing, and the network reorders the leader's appends (QUIC
            // does not), which sends replication back to probing each time.
            liveness_bound: 600 * max_delay / 3,
            sabotage: None,
        }
    }
}

/// What happened during a run: the fault counts prove the faults happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub partitions: u64,
    pub one_way_partitions: u64,
    pub crashes: u64,
    pub leader_crashes: u64,
    pub restarts: u64,
    /// Replicas whose disk was lost, rebuilt from the other nodes.
    pub rebuilds: u64,
    pub lost_writes: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub blocked: u64,
    pub transfers: u64,
    pub leader_changes: u64,
    pub max_term: u64,
    pub committed: u64,
    pub acked: u64,
    pub retries: u64,
    pub reads: u64,
    /// Catch-ups served from disk because the leader had released entries.
    pub fetches: u64,
    /// Lazy appends a leader merged into one it held (`server::held_appends`).
    pub merged_appends: u64,
    /// Proposals from a client lying about its Lamport clock.
    pub lies: u64,
    /// Steps after healing until the cluster converged.
    pub convergence_steps: u64,
    /// Membership changes asked of a leader, answered committed, refused,
    /// and committed removals of the leader that asked for them.
    pub changes_asked: u64,
    pub changes_committed: u64,
    pub changes_refused: u64,
    pub leader_removals: u64,
    /// Configuration entries in the committed log.
    pub config_entries: u64,
    /// Nodes started afresh from the configuration the cluster reported
    /// (as `--join` does), with its index as their bootstrap index.
    pub joins: u64,
}

/// A failed run: what broke, where, and how to replay it.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub steps: u64,
    pub step: u64,
    pub violation: Violation,
    pub trace: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation seed {} failed at step {}: {}",
            self.seed, self.step, self.violation
        )?;
        writeln!(
            f,
            "replay: CLUSTER_STORE_SIM_SEED={} CLUSTER_STORE_SIM_STEPS={} cargo test --test simulation replay -- --nocapture",
            self.seed, self.steps
        )?;
        writeln!(
            f,
            "   or: cargo run --release --bin node -- simulate --seed {} --steps {} --verbose",
            self.seed, self.steps
        )?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimFailure {}

struct PendingWrite {
    due: u64,
    /// None: nothing new to write, but `acks` still wait for earlier writes.
    write: Option<LogWrite>,
    acks: Vec<Envelope>,
}

/// One simulated machine: its Raft node (absent while crashed), its disk,
/// and writes still on their way to the disk.
struct SimNode {
    raft: Option<RaftNode>,
    config: Config,
    disk_hard_state: HardState,
    disk_log: Vec<Entry>,
    disk_chain: Vec<u64>,
    /// The chain of the disk this node last lost: what it held durably,
    /// and may have acknowledged, before (see `check`).
    lost_chain: Vec<u64>,
    /// The catch-up floor a rebuild recorded on this disk.
    disk_floor: Option<LogPosition>,
    /// The disk was lost: the node restarts through the rebuild path.
    rebuild_pending: bool,
    writes: VecDeque<PendingWrite>,
    /// Chain hashes of the in-memory log.
    chain: Vec<u64>,
    last_commit: Index,
    restart_at: Option<u64>,
    /// The leader's appends that can wait, held as a node's driver holds
    /// them (`server::held_appends`), on the simulation's clock.
    held: HeldAppends,
}

pub struct Simulation {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    /// `clock`'s step 0.
    epoch: Instant,
    nodes: BTreeMap<NodeId, SimNode>,
    network: Network,
    clients: Vec<SimClient>,
    /// Outstanding reads: ctx -> (node, smallest index the answer may have).
    reads: BTreeMap<u64, (NodeId, Index)>,
    next_read: u64,
    /// Sequence numbers of the lying client's proposals.
    next_lie: u64,
    /// Membership changes asked and not answered: ctx -> the change.
    changes: BTreeMap<u64, MembershipChange>,
    next_change: u64,
    /// Indexes at which a change was answered as committed.
    committed_changes: Vec<Index>,
    checker: Checker,
    stats: Stats,
    trace: VecDeque<String>,
    verbose: bool,
    faults_on: bool,
}

const TRACE_LINES: usize = 400;
/// The client id of the client that lies about its clock, and how often
/// (per step) it proposes.
const LIAR: u64 = 666;
const LIE_RATE: f64 = 0.01;

/// Steps a client waits for an answer before retrying elsewhere.
const CLIENT_TIMEOUT: u64 = 25;

impl Simulation {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let voters: Vec<NodeId> = (1..=cfg.voters).collect();
        let learners: Vec<NodeId> = (cfg.voters + 1..=cfg.voters + cfg.learners).collect();
        let spares: Vec<NodeId> =
            (cfg.voters + cfg.learners + 1..=cfg.voters + cfg.learners + cfg.spares).collect();
        let mut nodes = BTreeMap::new();
        let mut bootstrap = None;
        for id in voters.iter().chain(&learners).chain(&spares) {
            let mut config = Config::new(*id, voters.iter().copied());
            config.learners = learners.iter().copied().collect();
            config.addresses = voters
                .iter()
                .chain(&learners)
                .map(|id| (*id, format!("sim-{id}:1")))
                .collect();
            bootstrap.get_or_insert_with(|| config.membership());
            config.max_inflight = 4;
            config.max_append_entries = 8;
            // A byte budget that a few to a dozen messages fill (they take
            // 80 to 500 bytes), so appends and catch-up reads are often
            // cut by size before they reach their count.
            config.max_append_bytes = 1500 + (cfg.seed % 4) as usize * 1000;
            config.session_window = 16;
            // A small memory budget, so that lagging followers are often
            // caught up from entries read back from disk.
            config.memory_entries = 4 + (cfg.seed % 29) as usize;
            config.seed = rng.next_u64();
            if cfg.priorities {
                config.priorities = voters.iter().map(|v| (*v, *v as u32)).collect();
            }
            let raft = RaftNode::new(config.clone(), HardState::default(), Vec::new())
                .expect("simulated cluster configuration is valid");
            nodes.insert(
                *id,
                SimNode {
                    raft: Some(raft),
                    held: HeldAppends::new(config.max_append_entries, config.max_append_bytes),
                    config,
                    disk_hard_state: HardState::default(),
                    disk_log: Vec::new(),
                    disk_chain: Vec::new(),
                    lost_chain: Vec::new(),
                    disk_floor: None,
                    rebuild_pending: false,
                    writes: VecDeque::new(),
                    chain: Vec::new(),
                    last_commit: 0,
                    restart_at: None,
                },
            );
        }
        let clients = (0..cfg.clients)
            .map(|i| SimClient::new(1000 + i, rng.range(1, 5), rng.range(1, cfg.voters + 1)))
            .collect();
        Simulation {
            cfg,
            rng,
            now: 0,
            epoch: Instant::now(),
            nodes,
            network: Network::default(),
            clients,
            reads: BTreeMap::new(),
            next_read: 1,
            next_lie: 1,
            changes: BTreeMap::new(),
            next_change: 1,
            committed_changes: Vec::new(),
            checker: Checker::new(bootstrap.unwrap_or_default()),
            stats: Stats::default(),
            trace: VecDeque::new(),
            verbose: false,
            faults_on: true,
        }
    }

    /// Prints every trace line as it happens.
    pub fn verbose(mut self, on: bool) -> Self {
        self.verbose = on;
        self
    }

    /// Runs the whole schedule: faults for `steps`, then healing until the
    /// cluster converges.
    pub fn run(cfg: SimConfig) -> Result<Stats, SimFailure> {
        Simulation::new(cfg).run_to_end()
    }

    pub fn run_to_end(mut self) -> Result<Stats, SimFailure> {
        let result = self.run_inner();
        result.map_err(|violation| SimFailure {
            seed: self.cfg.seed,
            steps: self.cfg.steps,
            step: self.now,
            violation,
            trace: self.trace.iter().cloned().collect(),
        })
    }

    fn run_inner(&mut self) -> Result<Stats, Violation> {
        // One fault of each kind is guaranteed at a seeded moment in the
        // first half, so that no run goes by without them.
        let forced_crash = self.rng.range(self.cfg.steps / 8, self.cfg.steps / 2 + 1);
        let forced_partition = self.rng.range(self.cfg.steps / 8, self.cfg.steps / 2 + 1);
        while self.now < self.cfg.steps {
            self.now += 1;
            if self.now >= forced_crash && self.stats.leader_crashes == 0 {
                self.crash_leader()?;
            }
            if self.now == forced_partition && self.stats.partitions == 0 {
                self.random_partition();
            }
            self.inject_faults()?;
            self.step()?;
        }
        self.heal_all()?;
        let healed_at = self.now;
        while !self.converged() {
            if self.now - healed_at >= self.cfg.liveness_bound {
                return Err(format!(
                    "no convergence within {} steps after healing: {}",
                    self.cfg.liveness_bound,
                    self.describe_cluster()
                ));
            }
            self.now += 1;
            self.step()?;
        }
        self.stats.convergence_steps = self.now - healed_at;
        self.checker.all_acks_committed()?;
        for index in &self.committed_changes {
            if self.checker.is_config(*index) != Some(true) {
                return Err(format!(
                    "a membership change was answered committed at index {index}, which holds no configuration"
                ));
            }
        }
        self.stats.config_entries = self.checker.config_changes();
        self.stats.dropped = self.network.dropped;
        self.stats.duplicated = self.network.duplicated;
        self.stats.blocked = self.network.blocked_drops;
        self.stats.committed = self.checker.committed_len();
        self.stats.acked = self.checker.acked_count() as u64;
        Ok(self.stats.clone())
    }

    fn note(&mut self, line: String) {
        let line = format!("[{:>5}] {line}", self.now);
        if self.verbose {
            println!("{line}");
        }
        if self.trace.len() == TRACE_LINES {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    /// The time `server::held_appends` sees: a step is a millisecond, so a
    /// lazy append waits two steps for others to merge with.
    fn clock(&self) -> Instant {
        self.epoch + Duration::from_millis(self.now)
    }

    /// One step: restarts, held appends that are due, client activity,
    /// message deliveries, disk completions and a tick on every node, then
    /// the invariant checks.
    fn step(&mut self) -> Result<(), Violation> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            if self.nodes[id].restart_at.is_some_and(|at| at <= self.now) {
                self.restart(*id)?;
            }
        }
        let clock = self.clock();
        for id in &ids {
            let due = match self.nodes.get_mut(id) {
                Some(node) => node.held.take_due(clock),
                None => Vec::new(),
            };
            for envelope in due {
                self.network
                    .send(envelope, self.now, &self.cfg.network, &mut self.rng);
            }
        }
        self.run_clients()?;
        while let Some(envelope) = self.network.next_due(self.now) {
            let to = envelope.to;
            if let Some(raft) = self.nodes.get_mut(&to).and_then(|n| n.raft.as_mut()) {
                raft.step(envelope);
                self.drain(to)?;
            }
        }
        for id in &ids {
            self.complete_writes(*id)?;
            if let Some(raft) = self.nodes.get_mut(id).and_then(|n| n.raft.as_mut()) {
                raft.tick();
                self.drain(*id)?;
            }
        }
        self.check()
    }

    fn inject_faults(&mut self) -> Result<(), Violation> {
        if !self.faults_on {
            return Ok(());
        }
        if self.rng.chance(self.cfg.partition_rate) {
            self.random_partition();
        }
        if self.rng.chance(self.cfg.one_way_rate) {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            let from = *self.rng.pick(&ids).unwrap_or(&1);
            let to = *self.rng.pick(&ids).unwrap_or(&1);
            if from != to {
                self.network.block(from, to);
                self.stats.one_way_partitions += 1;
                self.note(format!("one-way partition: {from} -> {to} cut"));
            }
        }
        if self.network.is_partitioned() && self.rng.chance(self.cfg.heal_rate) {
            self.network.heal();
            self.note("network healed".into());
        }
        if self.rng.chance(self.cfg.crash_rate) {
            let up: Vec<NodeId> = self.up_nodes();
            if let Some(&id) = self.rng.pick(&up) {
                self.crash(id);
            }
        }
        if self.rng.chance(self.cfg.rebuild_rate) {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            if let Some(&id) = self.rng.pick(&ids) {
                self.lose_disk(id);
            }
        }
        if self.rng.chance(self.cfg.membership_rate) {
            self.change_membership()?;
        }
        if self.rng.chance(self.cfg.transfer_rate) {
            if let Some(leader) = self.current_leader() {
                let target = self.rng.range(1, self.nodes.len() as u64 + 1);
                if let Some(raft) = self.nodes.get_mut(&leader).and_then(|n| n.raft.as_mut()) {
                    if raft.transfer_leadership(target).is_ok() {
                        self.stats.transfers += 1;
                        self.note(format!("leader {leader} asked to transfer to {target}"));
                        self.drain(leader)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The operator asks the leader for a random membership change that
    /// makes sense for the configuration it has (it may still be refused:
    /// a change in flight, a learner not caught up, a leader too new).
    fn change_membership(&mut self) -> Result<(), Violation> {
        let Some(leader) = self.current_leader() else {
            return Ok(());
        };
        let Some(raft) = self.nodes.get(&leader).and_then(|n| n.raft.as_ref()) else {
            return Ok(());
        };
        let membership = raft.membership().clone();
        let outsiders: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|id| !membership.contains(*id))
            .collect();
        let learners: Vec<NodeId> = membership.learners.iter().copied().collect();
        // At least two voters stay: a lone voter that loses its disk has
        // nobody to rebuild the committed log from.
        let removable_voters = membership.voters.len() > 2;
        let members: Vec<NodeId> = membership
            .members()
            .filter(|id| removable_voters || !membership.is_voter(*id))
            .collect();
        let change = match self.rng.range(0, 10) {
            0..=2 => self
                .rng
                .pick(&outsiders)
                .map(|&id| MembershipChange::AddLearner {
                    id,
                    address: format!("sim-{id}:1"),
                }),
            3..=5 => self
                .rng
                .pick(&learners)
                .map(|&id| MembershipChange::Promote { id }),
            6..=7 => self
                .rng
                .pick(&members)
                .map(|&id| MembershipChange::Remove { id }),
            // The leader itself, as when its VM is retired.
            8 if removable_voters => Some(MembershipChange::Remove { id: leader }),
            8 => None,
            _ => self
                .rng
                .pick(&members)
                .map(|&id| MembershipChange::UpdateAddress {
                    id,
                    address: format!("sim-{id}:{}", self.now),
                }),
        };
        let Some(change) = change else {
            return Ok(());
        };
        let ctx = self.next_change;
        self.next_change += 1;
        self.stats.changes_asked += 1;
        self.note(format!("operator asks leader {leader} to {change}"));
        self.changes.insert(ctx, change.clone());
        if let Some(raft) = self.nodes.get_mut(&leader).and_then(|n| n.raft.as_mut()) {
            raft.change_membership(ctx, change);
        }
        self.drain(leader)
    }

    fn on_change(&mut self, node: NodeId, response: ChangeResponse) -> Result<(), Violation> {
        let Some(change) = self.changes.remove(&response.ctx) else {
            return Err(format!(
                "node {node} answered a membership change never asked ({})",
                response.ctx
            ));
        };
        match response.result {
            Ok(index) => {
                self.stats.changes_committed += 1;
                if change == (MembershipChange::Remove { id: node }) {
                    self.stats.leader_removals += 1;
                }
                self.committed_changes.push(index);
                self.note(format!("{change}: committed at index {index}"));
                if let MembershipChange::AddLearner { id, .. } = change {
                    self.join(id, node);
                }
            }
            Err(ChangeError::LeadershipLost) => {
                self.note(format!(
                    "{change}: leader {node} lost leadership, outcome unknown"
                ));
            }
            Err(error) => {
                self.stats.changes_refused += 1;
                self.note(format!("{change}: refused by {node}: {error}"));
            }
        }
        Ok(())
    }

    /// Node `id` was just added: if it never held anything, it starts
    /// afresh as `node --join` does, with the committed configuration (and
    /// its index) that `leader` reports as its bootstrap.
    fn join(&mut self, id: NodeId, leader: NodeId) {
        let Some(raft) = self.nodes.get(&leader).and_then(|n| n.raft.as_ref()) else {
            return;
        };
        let membership = raft.committed_membership().clone();
        let index = raft.committed_membership_index();
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let blank = node.disk_log.is_empty()
            && node.disk_hard_state == HardState::default()
            && node.writes.is_empty()
            && node.raft.is_some()
            && !node.rebuild_pending;
        if !blank {
            return;
        }
        node.raft = None;
        node.config.voters = membership.voters.clone();
        node.config.learners = membership.learners.clone();
        node.config.addresses = membership.addresses.clone();
        node.config.membership_index = index;
        self.stats.joins += 1;
        self.note(format!(
            "node {id} joins: bootstrap configuration at index {index}: {membership}"
        ));
        if let Err(error) = self.restart(id) {
            self.note(format!("node {id} failed to join: {error}"));
        }
    }

    fn random_partition(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut side: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|_| self.rng.chance(0.5))
            .collect();
        if side.is_empty() || side.len() == ids.len() {
            side = vec![self.current_leader().unwrap_or(1)];
        }
        self.network.partition(&side, &ids);
        self.stats.partitions += 1;
        self.note(format!("partition: {side:?} cut off from the rest"));
    }

    fn crash_leader(&mut self) -> Result<(), Violation> {
        if let Some(leader) = self.current_leader() {
            self.crash(leader);
        }
        Ok(())
    }

    fn crash(&mut self, id: NodeId) {
        let restart_in = self
            .rng
            .range(self.cfg.restart_delay.0, self.cfg.restart_delay.1);
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(raft) = node.raft.take() else {
            return;
        };
        let lost = node.writes.len() as u64;
        node.writes.clear();
        // What its driver held dies with it.
        node.held = HeldAppends::new(node.config.max_append_entries, node.config.max_append_bytes);
        // Reads in progress there die with it; their clients time out.
        self.reads.retain(|_, (at, _)| *at != id);
        node.restart_at = Some(self.now + restart_in);
        self.stats.crashes += 1;
        self.stats.lost_writes += lost;
        if raft.role() == Role::Leader {
            self.stats.leader_crashes += 1;
        }
        self.note(format!(
            "crash node {id} ({:?}, term {}), {lost} unsynced writes lost",
            raft.role(),
            raft.term()
        ));
    }

    /// Is node `id` about to be rebuilt, or a rebuilt replica whose log
    /// has not reached its catch-up floor yet?
    fn catching_up(&self, id: NodeId) -> bool {
        let Some(node) = self.nodes.get(&id) else {
            return false;
        };
        if node.rebuild_pending {
            return true;
        }
        let Some(floor) = node.disk_floor else {
            return false;
        };
        // Worked out here rather than asked of the node, which is not
        // given its floor under `Sabotage::NoCatchUpFloor`.
        let position = match &node.raft {
            Some(raft) => LogPosition {
                term: raft.log().last_term(),
                index: raft.log().last_index(),
            },
            None => node
                .disk_log
                .last()
                .map_or(LogPosition::default(), |e| LogPosition {
                    term: e.term,
                    index: e.index,
                }),
        };
        position < floor
    }

    /// Node `id` loses its disk: it crashes if it is up, its log and hard
    /// state are wiped, and it restarts through the rebuild path. One
    /// replica at a time, as an operator would: not while an earlier one
    /// is still catching up (`node rebuild` refuses that too: a second
    /// disk lost before the first replica holds the log again may leave
    /// committed entries on too few nodes, or no log that reaches both
    /// floors, and elections stalled for good).
    fn lose_disk(&mut self, id: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        if ids.iter().any(|n| self.catching_up(*n)) {
            return;
        }
        if self.nodes.get(&id).is_some_and(|n| n.raft.is_some()) {
            self.crash(id);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.writes.clear();
        node.disk_hard_state = HardState::default();
        node.disk_log.clear();
        node.lost_chain = std::mem::take(&mut node.disk_chain);
        node.disk_floor = None;
        node.rebuild_pending = true;
        self.note(format!(
            "node {id} lost its disk: it will be rebuilt from the other nodes"
        ));
    }

    /// `node rebuild` for node `id`, whose disk was lost: every other node
    /// must be up to report its status (else the operator retries: here,
    /// at the next step, and the node stays down). Its new disk holds the
    /// plan's hard state and catch-up floor, which the restart reads as it
    /// would read any disk. Returns whether it was rebuilt. (The operator
    /// reaches the nodes from outside: partitions between nodes do not
    /// stop it.)
    fn rebuild(&mut self, id: NodeId) -> bool {
        let statuses: Option<Vec<Status>> = self
            .nodes
            .iter()
            .filter(|(other, _)| **other != id)
            .map(|(_, n)| n.raft.as_ref().map(RaftNode::status))
            .collect();
        let Some(statuses) = statuses else {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.restart_at = Some(self.now + 1);
            }
            return false;
        };
        let plan = RebuildPlan::from_peers(&statuses);
        // As `node rebuild` does: the replica starts from the committed
        // configuration (and its index) of the node furthest ahead.
        let bootstrap = self
            .nodes
            .iter()
            .filter(|(other, _)| **other != id)
            .filter_map(|(_, n)| n.raft.as_ref())
            .max_by_key(|r| r.commit_index())
            .map(|r| {
                (
                    r.committed_membership().clone(),
                    r.committed_membership_index(),
                )
            });
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        if let Some((membership, index)) = bootstrap {
            node.config.voters = membership.voters;
            node.config.learners = membership.learners;
            node.config.addresses = membership.addresses;
            node.config.membership_index = index;
        }
        node.disk_hard_state = plan.hard_state(id);
        node.disk_floor = plan.floor;
        node.rebuild_pending = false;
        self.stats.rebuilds += 1;
        let floor = plan
            .floor
            .map_or_else(|| "none".to_string(), |f| f.to_string());
        self.note(format!(
            "rebuild node {id} from the others: term {}, catch-up floor {floor}",
            plan.term
        ));
        true
    }

    fn restart(&mut self, id: NodeId) -> Result<(), Violation> {
        if self.nodes.get(&id).is_some_and(|n| n.rebuild_pending) && !self.rebuild(id) {
            return Ok(());
        }
        let forget_vote = self.cfg.sabotage == Some(Sabotage::ForgetVote);
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        if forget_vote {
            node.disk_hard_state.vote = None;
        }
        let cannot =
            |e: crate::raft::RaftError| format!("node {id} cannot restart from its own disk: {e}");
        let mut restorer = Restorer::new(&node.config, node.disk_hard_state);
        if self.cfg.sabotage != Some(Sabotage::NoCatchUpFloor) {
            restorer.set_catch_up_floor(node.disk_floor);
        }
        for entry in &node.disk_log {
            restorer.push(entry.clone()).map_err(cannot)?;
        }
        let raft = RaftNode::restore(node.config.clone(), restorer).map_err(cannot)?;
        if raft.commit_index() != node.disk_hard_state.commit {
            return Err(format!(
                "node {id} restarted with commit {} but its disk recorded {}",
                raft.commit_index(),
                node.disk_hard_state.commit
            ));
        }
        node.chain = node.disk_chain.clone();
        node.last_commit = raft.commit_index();
        node.raft = Some(raft);
        node.restart_at = None;
        self.stats.restarts += 1;
        let line = format!(
            "restart node {id}: term {}, {} entries on disk, commit {}",
            node.disk_hard_state.term,
            node.disk_log.len(),
            node.disk_hard_state.commit
        );
        self.note(line);
        Ok(())
    }

    fn heal_all(&mut self) -> Result<(), Violation> {
        self.faults_on = false;
        self.network.heal();
        self.note("healing: network restored, crashed nodes restart, faults stop".into());
        // Replicas to rebuild last: that needs every other node up.
        let mut down: Vec<(bool, NodeId)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.raft.is_none())
            .map(|(id, n)| (n.rebuild_pending, *id))
            .collect();
        down.sort_unstable();
        for (_, id) in down {
            self.restart(id)?;
        }
        Ok(())
    }

    fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.raft.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// The live leader with the highest term.
    fn current_leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.raft.as_ref().map(|r| (id, r)))
            .filter(|(_, r)| r.role() == Role::Leader)
            .max_by_key(|(_, r)| r.term())
            .map(|(id, _)| *id)
    }

    fn converged(&self) -> bool {
        let Some(leader) = self.current_leader() else {
            return false;
        };
        let Some(leader_raft) = self.nodes[&leader].raft.as_ref() else {
            return false;
        };
        let membership = leader_raft.membership();
        if self.cfg.priorities {
            // The voter with the highest priority leads (those added later
            // have none).
            let priority = |id: NodeId| leader_raft.config().priority(id);
            let best = membership.voters.iter().map(|v| priority(*v)).max();
            if Some(priority(leader)) != best {
                return false;
            }
        }
        let last = leader_raft.log().last_index();
        let term = leader_raft.term();
        // Every member caught up; nodes outside the configuration (spares,
        // removed members) are not sent the log.
        let all_caught_up = self
            .nodes
            .iter()
            .filter(|(id, _)| membership.contains(**id))
            .all(|(_, n)| {
                n.raft.as_ref().is_some_and(|r| {
                    r.term() == term
                        && r.commit_index() == last
                        && r.log().persisted_index() == last
                })
            });
        all_caught_up
            && self.clients.iter().all(|c| c.outstanding.is_empty())
            && self.reads.is_empty()
    }

    fn describe_cluster(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, n)| match &n.raft {
                Some(r) => format!(
                    "{id}:{:?} t{} commit {} last {}",
                    r.role(),
                    r.term(),
                    r.commit_index(),
                    r.log().last_index()
                ),
                None => format!("{id}:down"),
            })
            .collect();
        let pending: usize = self.clients.iter().map(|c| c.outstanding.len()).sum();
        format!(
            "[{}], {pending} proposals and {} reads pending",
            nodes.join(", "),
            self.reads.len()
        )
    }

    fn run_clients(&mut self) -> Result<(), Violation> {
        let up = self.up_nodes();
        // A hostile client: a Lamport clock at the end of the range, sent
        // to any node; every one must refuse it.
        if self.faults_on && self.rng.chance(LIE_RATE) {
            let target = *self.rng.pick(&up).unwrap_or(&1);
            let lamport = u64::MAX - self.rng.range(0, 1 << 20);
            let seq = self.next_lie;
            self.next_lie += 1;
            if let Some(raft) = self.nodes.get_mut(&target).and_then(|n| n.raft.as_mut()) {
                self.stats.lies += 1;
                raft.propose(Proposal {
                    id: crate::raft::RequestId {
                        client_id: LIAR,
                        seq,
                    },
                    lamport,
                    since: 0,
                    sender: "liar".into(),
                    data: Bytes::from_static(b"a lie"),
                    after: None,
                    ctx: 0,
                });
                self.drain(target)?;
            }
        }
        for i in 0..self.clients.len() {
            if self.faults_on
                && self.clients[i].can_start()
                && self.rng.chance(self.cfg.propose_rate)
            {
                let now = self.now;
                self.clients[i].start(now);
            }
            if self.faults_on && self.rng.chance(self.cfg.read_rate) {
                let target = self.clients[i].target;
                if let Some(raft) = self.nodes.get_mut(&target).and_then(|n| n.raft.as_mut()) {
                    let ctx = self.next_read;
                    self.next_read += 1;
                    self.reads
                        .insert(ctx, (target, self.checker.max_acked_index()));
                    raft.read_index(ctx);
                    self.drain(target)?;
                }
            }
            for seq in self.clients[i].due(self.now) {
                let client = &mut self.clients[i];
                if !up.contains(&client.target) {
                    client.target = *self.rng.pick(&up).unwrap_or(&1);
                }
                let target = client.target;
                let Some(outstanding) = client.outstanding.get_mut(&seq) else {
                    continue;
                };
                outstanding.attempts += 1;
                outstanding.next_try_at = self.now + CLIENT_TIMEOUT;
                if outstanding.attempts > 1 {
                    self.stats.retries += 1;
                }
                let proposal = Proposal {
                    id: crate::raft::RequestId {
                        client_id: client.client_id,
                        seq,
                    },
                    lamport: client.clock,
                    since: 0,
                    sender: format!("client-{}", client.client_id).into(),
                    data: Bytes::from(sim_message(client.client_id, seq)),
                    after: (client::ordered(client.client_id) && seq > 1).then_some(
                        crate::raft::RequestId {
                            client_id: client.client_id,
                            seq: seq - 1,
                        },
                    ),
                    // Each attempt its own, so an answer names the one it is for.
                    ctx: outstanding.attempts,
                };
                if let Some(raft) = self.nodes.get_mut(&target).and_then(|n| n.raft.as_mut()) {
                    raft.propose(proposal);
                    self.drain(target)?;
                }
            }
        }
        Ok(())
    }

    /// Carries out everything a node's `ready` asks, in the order it asks.
    fn drain(&mut self, id: NodeId) -> Result<(), Violation> {
        loop {
            let ready = match self.nodes.get_mut(&id).and_then(|n| n.raft.as_mut()) {
                Some(raft) if raft.has_ready() => raft.ready(),
                _ => return Ok(()),
            };
            self.handle_ready(id, ready)?;
            self.complete_writes(id)?;
        }
    }

    fn handle_ready(&mut self, id: NodeId, ready: Ready) -> Result<(), Violation> {
        let clock = self.clock();
        let Ready {
            hard_state,
            must_sync,
            messages,
            log_write,
            linger,
            persisted_messages,
            committed: _,
            committed_memberships: _,
            responses,
            reads,
            fetches,
            changes,
            membership,
        } = ready;
        if let Some((index, membership)) = membership {
            self.note(format!(
                "node {id} now uses the configuration at index {index}: {membership}"
            ));
        }
        for change in changes {
            self.on_change(id, change)?;
        }
        let delay = self.rng.range(0, self.cfg.max_persist_delay + 1);
        // A lazy append's write may wait for a later sync: longer.
        let delay = if linger { 2 * delay + 1 } else { delay };
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        // The driver trusts `must_sync` to say when a vote or term must be
        // durable before anything leaves: it must be exactly that.
        let changed = hard_state.is_some_and(|hs| {
            (hs.term, hs.vote) != (node.disk_hard_state.term, node.disk_hard_state.vote)
        });
        if must_sync != changed {
            return Err(format!(
                "node {id}'s ready says must_sync = {must_sync}, yet its term or vote {}",
                if changed { "changed" } else { "did not change" }
            ));
        }
        if let Some(hard_state) = hard_state {
            if hard_state.term < node.disk_hard_state.term {
                return Err(format!("node {id} persisted a lower term"));
            }
            if hard_state.term == node.disk_hard_state.term
                && node.disk_hard_state.vote.is_some()
                && hard_state.vote != node.disk_hard_state.vote
            {
                return Err(format!(
                    "node {id} changed its vote within term {}",
                    hard_state.term
                ));
            }
            node.disk_hard_state = hard_state;
        }
        if let Some(write) = &log_write {
            let raft = node.raft.as_ref().ok_or("drained a crashed node")?;
            extend_chain(&mut node.chain, write.from, &write.entries);
            let before = write.from.saturating_sub(1);
            let previous = raft
                .log()
                .get(before)
                .or_else(|| node.disk_log.get((before as usize).wrapping_sub(1)))
                .map_or(0, |e| e.lamport);
            self.checker
                .observe_entries(id, &node.chain, &write.entries, previous)?;
        }
        let persisted_messages = if self.cfg.sabotage == Some(Sabotage::AckBeforeSync) {
            for envelope in persisted_messages {
                self.network
                    .send(envelope, self.now, &self.cfg.network, &mut self.rng);
            }
            Vec::new()
        } else {
            persisted_messages
        };
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        if let Some(write) = log_write {
            node.writes.push_back(PendingWrite {
                due: self.now + delay,
                write: Some(write),
                acks: persisted_messages,
            });
        } else if !persisted_messages.is_empty() {
            let due = node.writes.back().map_or(self.now, |w| w.due);
            node.writes.push_back(PendingWrite {
                due,
                write: None,
                acks: persisted_messages,
            });
        }
        let mut leaving = Vec::new();
        for envelope in messages {
            node.held.offer(envelope, clock, &mut leaving);
        }
        self.stats.merged_appends += node.held.take_merged();
        for envelope in leaving {
            check_append_size(&envelope, node.config.max_append_bytes)?;
            self.network
                .send(envelope, self.now, &self.cfg.network, &mut self.rng);
        }
        for response in responses {
            self.on_response(id, response)?;
        }
        for read in reads {
            self.stats.reads += 1;
            let Some((_, floor)) = self.reads.remove(&read.ctx) else {
                continue;
            };
            if let Ok(index) = read.result {
                if index < floor {
                    return Err(format!(
                        "stale read at node {id}: read index {index} below acknowledged index {floor}"
                    ));
                }
            }
        }
        // Entries released from memory, read back from this node's disk.
        for fetch in fetches {
            self.stats.fetches += 1;
            let Some(node) = self.nodes.get_mut(&id) else {
                return Ok(());
            };
            let entries = fetch.serve(&node.disk_log);
            if let Some(raft) = node.raft.as_mut() {
                raft.fetched(fetch.to, fetch.from, entries);
            }
        }
        Ok(())
    }

    fn on_response(
        &mut self,
        node: NodeId,
        response: crate::raft::ProposeResponse,
    ) -> Result<(), Violation> {
        if response.id.client_id == LIAR {
            return match response.result {
                Ok(committed) => Err(format!(
                    "node {node} accepted a client clock at the end of the range: {committed:?}"
                )),
                Err(_) => Ok(()),
            };
        }
        let Some(client) = self
            .clients
            .iter_mut()
            .find(|c| c.client_id == response.id.client_id)
        else {
            return Ok(());
        };
        let seq = response.id.seq;
        match response.result {
            Ok(committed) => {
                if let Some(clock_at_send) = client.committed(seq, committed) {
                    if committed.lamport <= clock_at_send {
                        return Err(format!(
                            "proposal {:?} stamped {} but its client had seen {clock_at_send} before sending",
                            response.id, committed.lamport
                        ));
                    }
                    self.checker.on_ack(response.id, committed)?;
                }
            }
            Err(ProposeError::NotLeader { leader }) => {
                // No leader known there (a removed node knows none): any
                // node, as the real client tries every address it has.
                let nodes = self.nodes.len() as u64;
                client.target = leader.unwrap_or_else(|| self.rng.range(1, nodes + 1));
                client.retry_at(seq, self.now + 1);
            }
            Err(ProposeError::LeadershipLost)
            | Err(ProposeError::TransferInProgress)
            | Err(ProposeError::EarlierRefused { .. }) => {
                client.retry_at(seq, self.now + 2);
            }
            Err(error) => {
                return Err(format!(
                    "node {node} refused proposal {:?}: {error}",
                    response.id
                ));
            }
        }
        Ok(())
    }

    /// Makes due writes durable, in order, then releases what waited on them.
    fn complete_writes(&mut self, id: NodeId) -> Result<(), Violation> {
        loop {
            let Some(node) = self.nodes.get_mut(&id) else {
                return Ok(());
            };
            if node.writes.front().is_none_or(|w| w.due > self.now) {
                return Ok(());
            }
            let Some(PendingWrite { write, acks, .. }) = node.writes.pop_front() else {
                return Ok(());
            };
            if let Some(write) = &write {
                node.disk_log
                    .truncate(write.from.saturating_sub(1) as usize);
                node.disk_log.extend(write.entries.iter().cloned());
                extend_chain(&mut node.disk_chain, write.from, &write.entries);
            }
            for envelope in acks {
                self.network
                    .send(envelope, self.now, &self.cfg.network, &mut self.rng);
            }
            if let Some((index, term)) = write.and_then(|w| w.last()) {
                if let Some(raft) = self.nodes.get_mut(&id).and_then(|n| n.raft.as_mut()) {
                    raft.persisted(index, term);
                }
            }
            self.drain(id)?;
        }
    }

    fn check(&mut self) -> Result<(), Violation> {
        // Leaders first: a newly committed index is then first seen where
        // it was decided, and checked against that leader's configuration.
        let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        ids.sort_by_key(|id| {
            let leads = self.nodes[id]
                .raft
                .as_ref()
                .is_some_and(|r| r.role() == Role::Leader);
            (!leads, *id)
        });
        for id in ids {
            let node = &self.nodes[&id];
            let Some(raft) = node.raft.as_ref() else {
                continue;
            };
            let term = raft.term();
            self.stats.max_term = self.stats.max_term.max(term);
            if raft.role() == Role::Leader {
                if self.checker.observe_leader(id, term)? {
                    self.stats.leader_changes += 1;
                    let line = format!("node {id} leads term {term}");
                    self.note(line);
                }
                let node = &self.nodes[&id];
                self.checker.check_leader_complete(id, term, &node.chain)?;
            }
            let node = &self.nodes[&id];
            let Some(raft) = node.raft.as_ref() else {
                continue;
            };
            let commit = raft.commit_index();
            if commit < node.last_commit {
                return Err(format!(
                    "node {id}'s commit index went back from {} to {commit}",
                    node.last_commit
                ));
            }
            let nodes = &self.nodes;
            // Who may have counted towards the commit: a leader counts the
            // voters of the configuration in force in its log, nobody else
            // (a removed node never again). A node that learned the commit
            // from a leader since gone may hold a configuration one change
            // ahead of the committed one, so either will do there.
            let quorums: Vec<&std::collections::BTreeSet<NodeId>> = if raft.role() == Role::Leader {
                vec![&raft.membership().voters]
            } else {
                vec![
                    &raft.membership().voters,
                    &raft.committed_membership().voters,
                ]
            };
            self.checker.observe_commit(
                id,
                commit,
                &node.chain,
                // Released from memory means durable: read the disk then.
                |index| {
                    raft.log()
                        .get(index)
                        .or_else(|| node.disk_log.get((index as usize).wrapping_sub(1)))
                        .cloned()
                },
                |index, hash| {
                    let durable_on = |voters: &std::collections::BTreeSet<NodeId>| {
                        nodes
                            .iter()
                            .filter(|(v, n)| {
                                // A disk lost after the node acknowledged an
                                // entry does not undo the acknowledgement:
                                // the leader may count it still (its match
                                // index is stale until the node answers
                                // again). The catch-up floor keeps such an
                                // entry safe.
                                voters.contains(v)
                                    && (n.disk_chain.get(index as usize - 1) == Some(&hash)
                                        || n.lost_chain.get(index as usize - 1) == Some(&hash))
                            })
                            .count()
                    };
                    if quorums
                        .iter()
                        .any(|voters| durable_on(voters) > voters.len() / 2)
                    {
                        return None;
                    }
                    let voters = quorums[0];
                    Some(format!(
                        "durable on only {} of the voters {voters:?}, quorum is {}",
                        durable_on(voters),
                        voters.len() / 2 + 1
                    ))
                },
            )?;
            if let Some(node) = self.nodes.get_mut(&id) {
                node.last_commit = commit;
            }
        }
        Ok(())
    }
}

/// A simulated client's message: its size varies with the sequence number
/// (20 to 420 bytes), so byte limits on appends come into play.
fn sim_message(client_id: u64, seq: u64) -> String {
    let pad = ((seq * 37 + client_id) % 400) as usize;
    format!("message {seq} from {client_id} {}", "x".repeat(pad))
}

/// An append carries at most `max_bytes` of entries, or a single entry.
fn check_append_size(envelope: &Envelope, max_bytes: usize) -> Result<(), Violation> {
    if let Message::Append { entries, .. } = &envelope.message {
        let bytes: usize = entries.iter().map(Entry::size).sum();
        if entries.len() > 1 && bytes > max_bytes {
            return Err(format!(
                "node {} sent an append of {} entries and {bytes} bytes, over its limit of {max_bytes}",
                envelope.from,
                entries.len()
            ));
        }
    }
    Ok(())
}
