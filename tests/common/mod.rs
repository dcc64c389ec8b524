//! A hand-driven cluster for scenario tests: persistence is immediate
//! (unless `manual_sync` is set: then log writes wait for `persist`), and
//! the test decides which messages travel, which links are cut and which
//! nodes are down.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet, VecDeque};

use bytes::Bytes;
use cluster_store::raft::{
    ChangeResponse, Config, Entry, Envelope, HardState, LogPosition, LogWrite, MembershipChange,
    Message, NodeId, Proposal, ProposeResponse, RaftNode, ReadResponse, RebuildPlan, RequestId,
    Restorer, Role, Status,
};

pub struct Disk {
    pub hard_state: HardState,
    pub log: Vec<Entry>,
    /// Recorded by a rebuild (`Cluster::rebuild`).
    pub catch_up_floor: Option<LogPosition>,
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, RaftNode>,
    pub configs: BTreeMap<NodeId, Config>,
    pub disks: BTreeMap<NodeId, Disk>,
    pub queue: VecDeque<Envelope>,
    pub cut: HashSet<(NodeId, NodeId)>,
    pub responses: Vec<ProposeResponse>,
    pub reads: Vec<ReadResponse>,
    pub changes: Vec<ChangeResponse>,
    /// Every message delivered, for tests that count them.
    pub delivered: Vec<Envelope>,
    /// Log writes are durable only once `persist` says so (the hard state
    /// always is at once: the core asks for it before anything leaves).
    pub manual_sync: bool,
    /// With `manual_sync`: each node's log writes not yet durable, in
    /// order, with the acknowledgements that may leave once they are.
    pub unsynced: BTreeMap<NodeId, VecDeque<Unsynced>>,
    /// When set, what became of each message taken off the queue.
    pub trace: Option<Vec<Hop>>,
}

/// A log write waiting for `Cluster::persist`, and the messages that must
/// wait for it (`Ready::persisted_messages`).
pub struct Unsynced {
    pub write: Option<LogWrite>,
    pub messages: Vec<Envelope>,
}

/// A message taken off the queue.
pub enum Hop {
    Delivered(Envelope),
    /// Lost: its link was cut, or its receiver was down.
    Dropped(Envelope, &'static str),
}

impl Cluster {
    pub fn new(voters: &[NodeId], learners: &[NodeId], tweak: impl Fn(&mut Config)) -> Self {
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            configs: BTreeMap::new(),
            disks: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: HashSet::new(),
            responses: Vec::new(),
            reads: Vec::new(),
            changes: Vec::new(),
            delivered: Vec::new(),
            manual_sync: false,
            unsynced: BTreeMap::new(),
            trace: None,
        };
        for id in voters.iter().chain(learners) {
            let mut config = Config::new(*id, voters.iter().copied());
            config.learners = learners.iter().copied().collect();
            tweak(&mut config);
            cluster.configs.insert(*id, config);
            cluster.disks.insert(
                *id,
                Disk {
                    hard_state: HardState::default(),
                    log: Vec::new(),
                    catch_up_floor: None,
                },
            );
            cluster.restart(*id);
        }
        cluster
    }

    /// Starts node `id` outside the configuration, with an empty disk and
    /// the bootstrap configuration of node `like`: a machine ready to be
    /// added.
    pub fn add_spare(&mut self, id: NodeId, like: NodeId) {
        let mut config = self.configs[&like].clone();
        config.id = id;
        config.seed = id;
        self.configs.insert(id, config);
        self.disks.insert(
            id,
            Disk {
                hard_state: HardState::default(),
                log: Vec::new(),
                catch_up_floor: None,
            },
        );
        self.restart(id);
    }

    /// Asks `at` for a membership change; the answer lands in `changes`.
    pub fn change(&mut self, at: NodeId, ctx: u64, change: MembershipChange) {
        self.node_mut(at).change_membership(ctx, change);
        self.drain(at);
    }

    /// The answer to membership change `ctx`, if one came.
    pub fn change_result(&self, ctx: u64) -> Option<Result<u64, cluster_store::raft::ChangeError>> {
        self.changes
            .iter()
            .find(|c| c.ctx == ctx)
            .map(|c| c.result.clone())
    }

    pub fn node(&self, id: NodeId) -> &RaftNode {
        &self.nodes[&id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut RaftNode {
        self.nodes.get_mut(&id).expect("node is up")
    }

    /// Carries out a node's outputs with an instantly durable disk.
    pub fn drain(&mut self, id: NodeId) {
        while let Some(node) = self.nodes.get_mut(&id) {
            if !node.has_ready() {
                return;
            }
            let ready = node.ready();
            let disk = self.disks.get_mut(&id).expect("every node has a disk");
            if let Some(hard_state) = ready.hard_state {
                // `must_sync` is what a driver trusts to make a new term or
                // vote durable before anything leaves.
                assert_eq!(
                    ready.must_sync,
                    (hard_state.term, hard_state.vote)
                        != (disk.hard_state.term, disk.hard_state.vote),
                    "node {id}: must_sync disagrees with the hard state"
                );
                disk.hard_state = hard_state;
            }
            self.queue.extend(ready.messages);
            let unsynced = self.unsynced.entry(id).or_default();
            if self.manual_sync && (ready.log_write.is_some() || !unsynced.is_empty()) {
                unsynced.push_back(Unsynced {
                    write: ready.log_write,
                    messages: ready.persisted_messages,
                });
            } else {
                if let Some(write) = ready.log_write {
                    disk.log.truncate(write.from as usize - 1);
                    disk.log.extend(write.entries.iter().cloned());
                    if let Some((index, term)) = write.last() {
                        node.persisted(index, term);
                    }
                }
                self.queue.extend(ready.persisted_messages);
            }
            self.responses.extend(ready.responses);
            self.reads.extend(ready.reads);
            self.changes.extend(ready.changes);
            for fetch in ready.fetches {
                let entries = fetch.serve(&disk.log);
                node.fetched(fetch.to, fetch.from, entries);
            }
        }
    }

    pub fn drain_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.drain(id);
        }
    }

    /// Delivers one queued message; false when the queue is empty.
    pub fn deliver_one(&mut self) -> bool {
        let Some(envelope) = self.queue.pop_front() else {
            return false;
        };
        if self.cut.contains(&(envelope.from, envelope.to)) {
            if let Some(trace) = &mut self.trace {
                trace.push(Hop::Dropped(envelope, "link cut"));
            }
            return true;
        }
        let to = envelope.to;
        if let Some(node) = self.nodes.get_mut(&to) {
            self.delivered.push(envelope.clone());
            if let Some(trace) = &mut self.trace {
                trace.push(Hop::Delivered(envelope.clone()));
            }
            node.step(envelope);
            self.drain(to);
        } else if let Some(trace) = &mut self.trace {
            trace.push(Hop::Dropped(envelope, "receiver down"));
        }
        true
    }

    /// With `manual_sync`: makes `id`'s pending log writes durable, in
    /// order, tells the node, and lets the acknowledgements they held go.
    pub fn persist(&mut self, id: NodeId) {
        let pending = self.unsynced.remove(&id).unwrap_or_default();
        for Unsynced { write, messages } in pending {
            if let Some(write) = write {
                let disk = self.disks.get_mut(&id).expect("every node has a disk");
                disk.log.truncate(write.from as usize - 1);
                disk.log.extend(write.entries.iter().cloned());
                if let (Some((index, term)), Some(node)) = (write.last(), self.nodes.get_mut(&id)) {
                    node.persisted(index, term);
                }
            }
            self.queue.extend(messages);
        }
        self.drain(id);
    }

    /// Delivers until the network is quiet.
    pub fn deliver_all(&mut self) {
        self.drain_all();
        for _ in 0..100_000 {
            if !self.deliver_one() {
                return;
            }
        }
        panic!("the network never went quiet");
    }

    /// Delivers messages one by one until `done` holds.
    pub fn deliver_until(&mut self, done: impl Fn(&Cluster) -> bool) {
        self.drain_all();
        while !done(self) {
            assert!(
                self.deliver_one(),
                "the network went quiet before the condition held"
            );
        }
    }

    pub fn tick_all(&mut self, ticks: u64) {
        for _ in 0..ticks {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.node_mut(id).tick();
                self.drain(id);
            }
            self.deliver_all();
        }
    }

    /// Ticks `ids` alone, discarding what they send.
    pub fn tick_silently(&mut self, ids: &[NodeId], ticks: u64) {
        for _ in 0..ticks {
            for id in ids {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.tick();
                }
                self.drain(*id);
            }
            self.queue.retain(|m| !ids.contains(&m.from));
        }
    }

    /// Ticks `ids` only, delivering what follows after each tick.
    pub fn tick(&mut self, ids: &[NodeId], ticks: u64) {
        for _ in 0..ticks {
            for id in ids {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.tick();
                }
                self.drain(*id);
            }
            self.deliver_all();
        }
    }

    /// Lets `id` campaign after the others' leader leases expire, trying a
    /// few times (a first attempt may only teach it a newer term).
    pub fn start_election(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.nodes.keys().copied().filter(|n| *n != id).collect();
        let ticks = self.configs[&id].election_ticks;
        self.tick_silently(&others, ticks);
        // A node whose timer fired meanwhile is pre-campaigning, its requests
        // lost; its campaign fails (as it would once they go unanswered) so
        // that it does not rank itself against `id` (see `outranked_by`).
        for other in others {
            let Some(node) = self.nodes.get_mut(&other) else {
                continue;
            };
            if node.role() != Role::PreCandidate {
                continue;
            }
            let voters: Vec<NodeId> = node.config().voters.iter().copied().collect();
            for voter in voters.into_iter().filter(|v| *v != other) {
                let term = node.term();
                node.step(Envelope {
                    from: voter,
                    to: other,
                    term,
                    lamport: 0,
                    message: Message::PreVoteResponse { granted: false },
                });
            }
            self.drain(other);
            self.queue.retain(|m| m.from != other);
        }
        self.node_mut(id).campaign();
        self.drain(id);
    }

    /// Makes `id` leader, delivering every message on the way.
    pub fn elect(&mut self, id: NodeId) {
        for _ in 0..3 {
            self.start_election(id);
            self.deliver_all();
            if self.node(id).role() == Role::Leader {
                return;
            }
        }
        panic!("node {id} failed to win the election");
    }

    /// Like `elect`, but stops delivering the moment `id` wins, leaving
    /// its first appends unsent.
    pub fn elect_quietly(&mut self, id: NodeId) {
        for _ in 0..3 {
            self.start_election(id);
            while self.node(id).role() != Role::Leader && self.deliver_one() {}
            if self.node(id).role() == Role::Leader {
                self.queue.retain(|m| m.from != id);
                return;
            }
        }
        panic!("node {id} failed to win the election");
    }

    pub fn isolate(&mut self, id: NodeId) {
        let all: Vec<NodeId> = self.configs.keys().copied().collect();
        for other in all {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Stops `id`: what it had not persisted is lost, and so is what was
    /// on its way to it.
    pub fn crash(&mut self, id: NodeId) {
        self.nodes.remove(&id);
        self.unsynced.remove(&id);
        self.queue.retain(|m| m.to != id);
    }

    pub fn restart(&mut self, id: NodeId) {
        let disk = &self.disks[&id];
        let config = self.configs[&id].clone();
        let mut restorer = Restorer::new(&config, disk.hard_state);
        restorer.set_catch_up_floor(disk.catch_up_floor);
        for entry in &disk.log {
            restorer
                .push(entry.clone())
                .expect("the disk holds a well-formed log");
        }
        let node = RaftNode::restore(config, restorer).expect("node restarts from its disk");
        self.nodes.insert(id, node);
    }

    /// `node rebuild` for `id`: it stops and loses its disk, and restarts
    /// from the plan that the running nodes' statuses give (its term and
    /// catch-up floor). Returns the plan.
    pub fn rebuild(&mut self, id: NodeId) -> RebuildPlan {
        self.crash(id);
        let statuses: Vec<Status> = self.nodes.values().map(RaftNode::status).collect();
        let plan = RebuildPlan::from_peers(&statuses);
        self.disks.insert(
            id,
            Disk {
                hard_state: plan.hard_state(id),
                log: Vec::new(),
                catch_up_floor: plan.floor,
            },
        );
        self.restart(id);
        plan
    }

    pub fn propose(&mut self, at: NodeId, client_id: u64, seq: u64, text: &str) {
        self.node_mut(at).propose(Proposal {
            id: RequestId { client_id, seq },
            lamport: 0,
            since: 0,
            sender: format!("client-{client_id}").into(),
            data: Bytes::from(text.to_string()),
            after: None,
            ctx: 0,
        });
        self.drain(at);
    }

    pub fn texts(&self, id: NodeId) -> Vec<String> {
        let log = self.node(id).log();
        log.range(1, log.last_index())
            .filter_map(|e| match &e.payload {
                cluster_store::raft::Payload::Command(c) => {
                    Some(String::from_utf8_lossy(&c.data).into_owned())
                }
                _ => None,
            })
            .collect()
    }

    pub fn terms(&self, id: NodeId) -> Vec<u64> {
        let log = self.node(id).log();
        log.range(1, log.last_index()).map(|e| e.term).collect()
    }

    pub fn count_delivered(&self, pred: impl Fn(&Envelope) -> bool) -> usize {
        self.delivered.iter().filter(|m| pred(m)).count()
    }

    pub fn is_append_rejection(m: &Envelope) -> bool {
        matches!(
            m.message,
            Message::AppendResponse(cluster_store::raft::AppendResult::Rejected { .. })
        )
    }
}
