//! The Raft node: its state, its inputs and how messages are dispatched to
//! the role-specific handlers in `election`, `replication`, `read` and
//! `leadership`.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{debug, info, warn};

use super::config::{Config, ConfigError};
use super::log::{LogError, RaftLog};
use super::membership::{Membership, Memberships, PendingChange};
use super::message::{Envelope, Message};
use super::pending::Pending;
use super::progress::Progress;
use super::read::ReadState;
use super::ready::{Proposal, ProposeError, ProposeResponse, ReadResponse, Ready};
use super::rng::Rng;
use super::session::Sessions;
use super::types::{Entry, HardState, Index, Lamport, LogPosition, NodeId, RequestId, Role, Term};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RaftError {
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    #[error("stored log is corrupt: {0}")]
    Log(LogError),
}

// By hand rather than `#[from]`, which would also chain the error as a
// `source` that the message already says.
impl From<ConfigError> for RaftError {
    fn from(error: ConfigError) -> Self {
        RaftError::Config(error)
    }
}

impl From<LogError> for RaftError {
    fn from(error: LogError) -> Self {
        RaftError::Log(error)
    }
}

/// An ongoing leadership transfer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Transfer {
    pub target: NodeId,
    pub elapsed: u64,
    pub timeout_sent: bool,
}

/// A candidacy of this process: its term, where its log ended when it
/// asked for votes, and the voters that granted them so far. In memory
/// only, so a restarted or rebuilt node never counts the answers its
/// earlier self was sent.
#[derive(Debug)]
pub(super) struct Candidacy {
    pub(super) term: Term,
    pub(super) log: LogPosition,
    pub(super) granted: BTreeSet<NodeId>,
}

/// Most doublings of the election timeout (`RaftNode::election_backoff`):
/// 4 times `election_ticks`, 0.8-1.6 s with the defaults, more than any
/// round trip on Earth, and the longest a cluster leaderless for a while
/// (a partition with no majority anywhere) waits once it heals.
const MAX_BACKOFF: u32 = 2;

/// A Raft node as a deterministic state machine: no clock, no I/O.
/// Feed it `tick`, `step`, `propose`, `read_index`; drain `ready`.
pub struct RaftNode {
    pub(super) config: Config,
    pub(super) term: Term,
    pub(super) vote: Option<NodeId>,
    pub(super) role: Role,
    pub(super) leader: Option<NodeId>,
    pub(super) log: RaftLog,
    pub(super) commit: Index,
    pub(super) applied: Index,
    pub(super) lamport: Lamport,
    pub(super) rng: Rng,
    /// Ticks since the last election reset (followers) or check-quorum
    /// round (leaders).
    pub(super) election_elapsed: u64,
    /// The election timeout drawn at the last reset, in
    /// `election_ticks..2*election_ticks` times the backoff; a follower
    /// runs to it as `election_timeout` narrows it.
    pub(super) randomized_timeout: u64,
    /// Elections this node started, or decided with its vote, since it
    /// last heard from a leader. Each doubles the next election timeout
    /// (at most `MAX_BACKOFF` times): an election waits for answers, and
    /// across an ocean a round trip can outlast an election timeout meant
    /// only to notice a silent leader (`election_backoff`).
    pub(super) leaderless_elections: u32,
    /// Quorum checks a new leader skips: its first answers are a round
    /// trip away, which may be longer than one check period.
    pub(super) quorum_grace: u64,
    pub(super) heartbeat_elapsed: u64,
    /// Votes received in the current (pre-)election: true is a grant.
    pub(super) votes: BTreeMap<NodeId, bool>,
    /// This process's last candidacy, kept past its election timeout (see
    /// `record_late_vote`).
    pub(super) candidacy: Option<Candidacy>,
    /// Leader only: replication state of every other member.
    pub(super) progress: BTreeMap<NodeId, Progress>,
    /// Leader only: uncommitted proposals in its log, for deduplication,
    /// each with the proposals awaiting its answer here.
    pub(super) pending: Pending,
    pub(super) sessions: Sessions,
    pub(super) reads: ReadState,
    pub(super) transfer: Option<Transfer>,
    /// New entries or a new commit index to announce in the next `ready`.
    pub(super) broadcast_pending: bool,
    pub(super) commit_changed: bool,
    pub(super) heartbeat_pending: bool,
    /// Appends marked lazy, and ones not marked, answered since the last
    /// `ready` (`Ready::linger`).
    pub(super) lazy_appends: bool,
    pub(super) urgent_appends: bool,
    /// Whether this term's leader counts on this follower's
    /// acknowledgements for commit: its last append was urgent (`true`)
    /// or lazy (`false`); `None` before any. Narrows the election timeout
    /// (`election_timeout`).
    pub(super) counted_on: Option<bool>,
    pub(super) durable_hard_state: HardState,
    pub(super) out: Ready,
    /// A replica rebuilt from nothing (`node rebuild`): the most up-to-date
    /// log position the other nodes reported. Until its own log reaches
    /// it, the node votes only for candidates at least as up to date as
    /// it, and does not campaign (see `election.rs` and `RebuildPlan`).
    /// Cleared once reached.
    pub(super) catch_up_floor: Option<LogPosition>,
    /// The configuration in force and the ones it may fall back to.
    pub(super) memberships: Memberships,
    /// Leader only: the membership change it appended and must answer.
    pub(super) pending_change: Option<PendingChange>,
    /// Voter without a live leader: client proposals waiting for the next
    /// one (`held.rs`).
    pub(super) held: super::held::HeldProposals,
    /// The last pre-vote request ignored because a leader was alive: it is
    /// answered when the lease runs out (`tick_election`), unless a leader
    /// is heard first. Across an ocean the far follower hears a dead
    /// leader's last heartbeats later than the near one, whose pre-vote
    /// could reach it inside its lease; ignored, that pre-election waited
    /// a whole timeout more (WAN kills of 1.02-1.06 s, against 0.73).
    pub(super) deferred_pre_vote: Option<Envelope>,
    /// While `deferred_pre_vote` is answered: a pre-vote only.
    pub(super) answering_deferred: bool,
}

/// A snapshot of a node's state for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    /// The highest committed index this node's own store holds: what it
    /// can serve. (A node may learn that entries are committed before its
    /// own copy of them is synced.)
    pub commit: Index,
    pub applied: Index,
    pub last_index: Index,
    /// The term of the entry at `last_index` (0 for an empty log).
    pub last_term: Term,
    pub persisted_index: Index,
    pub lamport: Lamport,
    /// Client sessions this node remembers (`Config::max_sessions`).
    #[serde(default)]
    pub sessions: usize,
    /// Leader only: every other member's replication state.
    pub peers: Vec<PeerStatus>,
    /// A rebuilt replica whose log has not reached its catch-up floor yet:
    /// it votes only for logs that reach the floor, and does not campaign.
    pub catch_up_floor: Option<LogPosition>,
    /// The configuration in force, and the index of its entry (0: the
    /// bootstrap configuration).
    #[serde(default)]
    pub membership: Membership,
    #[serde(default)]
    pub membership_index: Index,
    /// The configuration in force is not committed yet.
    #[serde(default)]
    pub change_in_progress: bool,
    /// This node is a voter of the latest committed configuration (it may
    /// not be of the one in force, while a change removing it is in
    /// flight).
    #[serde(default)]
    pub committed_voter: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub voter: bool,
    pub match_index: Index,
    /// Entries the peer is behind the leader's log.
    pub lag: Index,
}

impl RaftNode {
    /// Starts a node from what its store holds (all empty for a new node).
    /// Entries up to `hard_state.commit` count as applied: the driver's
    /// state is the log itself, so nothing is handed out again.
    pub fn new(
        config: Config,
        hard_state: HardState,
        entries: Vec<Entry>,
    ) -> Result<Self, RaftError> {
        let mut restorer = Restorer::new(&config, hard_state);
        for entry in entries {
            restorer.push(entry)?;
        }
        RaftNode::restore(config, restorer)
    }

    /// A node restarting from its store, read one entry at a time through
    /// a [`Restorer`] so that a long log is never held in memory whole.
    pub fn restore(config: Config, restorer: Restorer) -> Result<Self, RaftError> {
        config.validate()?;
        let Restorer {
            hard_state,
            log,
            sessions,
            catch_up_floor,
            mut memberships,
            ..
        } = restorer;
        memberships.compact(hard_state.commit.min(log.last_index()));
        let mut config = config;
        let (_, membership) = memberships.current();
        config.voters = membership.voters.clone();
        config.learners = membership.learners.clone();
        config.addresses = membership.addresses.clone();
        let commit = hard_state.commit.min(log.last_index());
        let lamport = log.last().map_or(0, |e| e.lamport);
        let position = LogPosition {
            term: log.last_term(),
            index: log.last_index(),
        };
        let catch_up_floor = catch_up_floor.filter(|floor| position < *floor);
        if let Some(floor) = catch_up_floor {
            info!(
                node = config.id,
                %floor,
                last_index = position.index,
                "rebuilt replica: until its log reaches the catch-up floor, it votes only for candidates whose logs reach it, and does not campaign"
            );
        }
        let mut node = RaftNode {
            rng: Rng::new(config.seed ^ config.id.rotate_left(32) ^ hard_state.term),
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Learner,
            leader: None,
            log,
            commit,
            applied: commit,
            lamport,
            election_elapsed: 0,
            randomized_timeout: 0,
            leaderless_elections: 0,
            quorum_grace: 0,
            heartbeat_elapsed: 0,
            votes: BTreeMap::new(),
            candidacy: None,
            progress: BTreeMap::new(),
            pending: Pending::default(),
            sessions,
            reads: ReadState::default(),
            transfer: None,
            broadcast_pending: false,
            commit_changed: false,
            heartbeat_pending: false,
            lazy_appends: false,
            urgent_appends: false,
            counted_on: None,
            durable_hard_state: HardState {
                commit,
                ..hard_state
            },
            out: Ready::default(),
            catch_up_floor,
            memberships,
            pending_change: None,
            held: Default::default(),
            deferred_pre_vote: None,
            answering_deferred: false,
            config,
        };
        node.role = node.passive_role();
        node.reset_election_timer();
        Ok(node)
    }

    /// Log entries currently held in memory (the rest are in the store).
    pub fn entries_in_memory(&self) -> usize {
        self.log.in_memory()
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn term(&self) -> Term {
        self.term
    }

    /// Whom this node voted for in its current term.
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// How far this node's own log is known to be durable.
    pub fn persisted_index(&self) -> Index {
        self.log.persisted_index()
    }

    pub fn commit_index(&self) -> Index {
        self.commit
    }

    pub fn lamport(&self) -> Lamport {
        self.lamport
    }

    pub fn log(&self) -> &RaftLog {
        &self.log
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A rebuilt replica's catch-up floor, while its log is below it.
    pub fn catch_up_floor(&self) -> Option<LogPosition> {
        self.catch_up_floor
    }

    pub fn status(&self) -> Status {
        let last = self.log.last_index();
        Status {
            id: self.config.id,
            role: self.role,
            term: self.term,
            leader: self.leader,
            commit: self.commit.min(self.log.persisted_index()),
            applied: self.applied,
            last_index: last,
            last_term: self.log.last_term(),
            persisted_index: self.log.persisted_index(),
            lamport: self.lamport,
            sessions: self.sessions.open(),
            peers: self
                .progress
                .iter()
                .map(|(id, pr)| PeerStatus {
                    id: *id,
                    voter: self.config.is_voter(*id),
                    match_index: pr.match_index,
                    lag: last.saturating_sub(pr.match_index),
                })
                .collect(),
            catch_up_floor: self.catch_up_floor,
            membership: self.membership().clone(),
            membership_index: self.membership_index(),
            change_in_progress: self.change_in_progress(),
            committed_voter: self.committed_membership().is_voter(self.config.id),
        }
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.tick_held();
        match self.role {
            Role::Leader => self.tick_leader(),
            Role::Learner => self.election_elapsed += 1,
            // Role::Learner means it may not campaign; the role follows
            // the configuration (`refresh_role`).
            Role::Follower | Role::PreCandidate | Role::Candidate => self.tick_election(),
        }
    }

    /// Starts an election now, as if the election timer had fired: for
    /// operators forcing a new election and for tests choosing a leader.
    /// Voters still refuse while they follow a live leader.
    pub fn campaign(&mut self) {
        if self.role != Role::Leader && self.role != Role::Learner {
            let pre_vote = self.config.pre_vote;
            self.start_campaign(pre_vote, false);
        }
    }

    /// Asks the leader to append a client message. The answer arrives in a
    /// later `Ready::responses`, once the entry commits (or at once on error).
    pub fn propose(&mut self, proposal: Proposal) {
        let Some(proposal) = self.hold(proposal) else {
            return;
        };
        let (id, ctx) = (proposal.id, proposal.ctx);
        if let Err(error) = self.accept_proposal(proposal) {
            self.respond(id, ctx, Err(error));
        }
    }

    /// Starts a linearizable read; the answer arrives in `Ready::reads`.
    pub fn read_index(&mut self, ctx: u64) {
        if let Err(error) = self.start_read(ctx) {
            self.out.reads.push(ReadResponse {
                ctx,
                result: Err(error),
            });
        }
    }

    /// The driver made the log durable up to `(index, term)`.
    pub fn persisted(&mut self, index: Index, term: Term) {
        if self.log.mark_persisted(index, term) && self.role == Role::Leader {
            self.maybe_commit();
        }
    }

    /// Handles one message from a peer.
    pub fn step(&mut self, envelope: Envelope) {
        let Envelope {
            from,
            to,
            term,
            lamport,
            message,
        } = envelope;
        if to != self.config.id || from == self.config.id {
            warn!(
                node = self.config.id,
                from, to, "dropping misaddressed message"
            );
            return;
        }
        // Messages are heard from any node the runtime authenticated,
        // whatever this node's configuration says (Raft thesis, section
        // 4.1): a leader or a candidate may be a voter of a configuration
        // this node has not received yet, and this node may be a voter of
        // one it has not received yet (a learner just promoted) whose vote
        // is needed. A candidate counts only its own configuration's
        // voters, so that is safe. One exception: a transfer vote, which
        // overrides a live leader's lease, from a node that is no voter
        // here while this node hears its leader: that leader's appends
        // bring any promotion, and a learner cannot depose it.
        if matches!(message, Message::Vote { transfer: true, .. })
            && !self.config.is_voter(from)
            && self.in_lease()
        {
            warn!(
                node = self.config.id,
                from, term, "dropping a transfer vote request from a node that is not a voter"
            );
            return;
        }
        self.lamport = self.lamport.max(lamport);

        if term > self.term {
            match message {
                Message::PreVote { .. }
                | Message::Vote {
                    transfer: false, ..
                } if self.in_lease() => {
                    debug!(
                        node = self.config.id,
                        from, term, "ignoring vote request: a leader is alive"
                    );
                    if let Message::PreVote { .. } = message {
                        self.deferred_pre_vote = Some(Envelope {
                            from,
                            to,
                            term,
                            lamport,
                            message: message.clone(),
                        });
                    }
                    return;
                }
                // A pre-vote changes no term; a granted pre-vote echoes the
                // term we would campaign in.
                Message::PreVote { .. } | Message::PreVoteResponse { granted: true } => {}
                // A voter that decides our pre-election votes with its
                // pre-vote (`decides_pre_election`). If the vote overtakes
                // the pre-vote (the simulator reorders), it stands for
                // both: deposing ourselves for its term would throw away
                // the vote, and with it the election, round after round.
                // Only for the log it judged: one this node no longer holds
                // may lack entries the voter's log had.
                Message::VoteResponse {
                    granted: true,
                    judged: Some(judged),
                } if self.role == Role::PreCandidate
                    && term == self.term + 1
                    && judged == self.log_position() =>
                {
                    self.record_vote(from, true);
                    if self.role == Role::Candidate && self.term == term {
                        self.record_vote(from, true);
                    }
                    return;
                }
                Message::Append { .. } | Message::Heartbeat { .. } | Message::TimeoutNow => {
                    self.become_follower(term, Some(from))
                }
                _ => self.become_follower(term, None),
            }
        } else if term < self.term {
            match message {
                // Tell a stale leader about the newer term so it steps down.
                Message::Append { .. } | Message::Heartbeat { .. } => {
                    self.send(from, Message::HeartbeatResponse { read_seq: 0 })
                }
                // A rejection at our term lets a lagging pre-candidate catch up.
                Message::PreVote { .. } => {
                    self.send(from, Message::PreVoteResponse { granted: false })
                }
                _ => {}
            }
            return;
        }

        match message {
            Message::PreVote {
                last_index,
                last_term,
            } => self.handle_vote_request(from, term, last_index, last_term, true),
            Message::Vote {
                last_index,
                last_term,
                ..
            } => self.handle_vote_request(from, term, last_index, last_term, false),
            Message::PreVoteResponse { granted } => {
                if self.role == Role::PreCandidate && term == self.term + 1 {
                    self.record_vote(from, granted);
                } else if self.role == Role::PreCandidate && !granted {
                    self.record_vote(from, false);
                }
            }
            // A vote cast with a pre-vote for a log this node no longer
            // holds vouches for nothing here: its pre-vote round is over.
            Message::VoteResponse {
                judged: Some(judged),
                ..
            } if judged != self.log_position() => {}
            Message::VoteResponse { granted, .. } => {
                if granted {
                    self.record_late_vote(from);
                }
                if self.role == Role::Candidate {
                    self.record_vote(from, granted);
                }
            }
            Message::Append {
                prev_index,
                prev_term,
                entries,
                commit,
                lazy,
            } => self.handle_append(from, prev_index, prev_term, entries, commit, lazy),
            Message::AppendResponse(result) => {
                if self.role == Role::Leader {
                    self.handle_append_response(from, result);
                }
            }
            Message::Heartbeat { commit, read_seq } => {
                self.handle_heartbeat(from, commit, read_seq)
            }
            Message::HeartbeatResponse { read_seq } => {
                if self.role == Role::Leader {
                    self.handle_heartbeat_response(from, read_seq);
                }
            }
            Message::TimeoutNow => self.handle_timeout_now(from),
        }
    }

    /// Is there anything for the driver to do?
    pub fn has_ready(&self) -> bool {
        !self.out.is_empty()
            || self.broadcast_pending
            || self.commit_changed
            || self.heartbeat_pending
            || self.applied < self.commit
            || self.hard_state() != self.durable_hard_state
    }

    /// Drains everything the driver must persist, send, apply and answer.
    /// See [`Ready`] for the order the driver must follow.
    pub fn ready(&mut self) -> Ready {
        if self.role == Role::Leader {
            if self.broadcast_pending || self.commit_changed {
                let announce_commit = self.commit_changed;
                self.broadcast_append(announce_commit);
            }
            if self.heartbeat_pending {
                self.broadcast_heartbeat();
            }
        }
        self.broadcast_pending = false;
        self.commit_changed = false;
        self.heartbeat_pending = false;
        if self.catch_up_floor.is_some() {
            // Forgets the floor (saying so) once the log has reached it.
            self.pending_catch_up_floor();
        }

        let hard_state = self.hard_state();
        if hard_state != self.durable_hard_state {
            self.out.must_sync = (hard_state.term, hard_state.vote)
                != (self.durable_hard_state.term, self.durable_hard_state.vote);
            self.out.hard_state = Some(hard_state);
            self.durable_hard_state = hard_state;
        }
        self.out.log_write = self.log.take_write();
        self.out.linger = self.lazy_appends
            && !self.urgent_appends
            && matches!(self.role, Role::Follower | Role::Learner);
        self.lazy_appends = false;
        self.urgent_appends = false;
        self.apply_committed();
        std::mem::take(&mut self.out)
    }

    /// The durable state as it should be on disk now. The commit index is
    /// capped at what this node's own disk holds, so a restarted node never
    /// believes entries it lost are committed.
    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self
                .commit
                .min(self.log.persisted_index())
                .max(self.durable_hard_state.commit),
        }
    }

    /// Queues a message to send as soon as the hard state is durable.
    pub(super) fn send(&mut self, to: NodeId, message: Message) {
        let envelope = self.envelope(to, self.term, message);
        self.out.messages.push(envelope);
    }

    /// Queues a message that acknowledges log entries: it may leave only
    /// once this ready's log write is durable.
    pub(super) fn send_after_persist(&mut self, to: NodeId, message: Message) {
        let envelope = self.envelope(to, self.term, message);
        self.out.persisted_messages.push(envelope);
    }

    pub(super) fn envelope(&self, to: NodeId, term: Term, message: Message) -> Envelope {
        Envelope {
            from: self.config.id,
            to,
            term,
            lamport: self.lamport,
            message,
        }
    }

    pub(super) fn respond(
        &mut self,
        id: RequestId,
        ctx: u64,
        result: Result<super::session::Committed, ProposeError>,
    ) {
        self.out.responses.push(ProposeResponse { id, ctx, result });
    }

    /// Does this node follow a live leader (or lead itself)? Then it ignores
    /// vote requests, so a returning partitioned node cannot depose a
    /// healthy leader.
    pub(super) fn in_lease(&self) -> bool {
        self.config.check_quorum
            && self.leader.is_some()
            && self.election_elapsed < self.config.election_ticks
    }

    pub(super) fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.counted_on = None;
        let base = self.config.election_ticks * self.election_backoff();
        self.randomized_timeout = self.rng.range(base, 2 * base);
    }

    /// How many ticks without a leader start an election: the random draw,
    /// squeezed into the first half of its range for a follower its leader
    /// counts on for commit (the furthest log but the leader's: it wins the
    /// next election, so it should start it) and into the second half for
    /// a lazy one, whose campaign would lose to that log's anyway. One
    /// client's WAN failover waited for São Paulo's draw over the whole
    /// range (200-400 ms) while Sydney's earlier campaigns lost.
    pub(super) fn election_timeout(&self) -> u64 {
        let base = self.config.election_ticks * self.election_backoff();
        let offset = self
            .randomized_timeout
            .saturating_sub(base)
            .min(base.saturating_sub(1));
        match self.counted_on {
            Some(true) if self.role == Role::Follower => base + offset / 2,
            Some(false) if self.role == Role::Follower => base + base / 2 + offset / 2,
            _ => self.randomized_timeout,
        }
    }

    /// How many times longer than `election_ticks` the next timeout is:
    /// 1 while the node hears from a leader (noticing a silent one stays
    /// quick), doubling with each election since. A (pre-)candidate then
    /// waits longer for its answers and a voter for its new leader's first
    /// message, so elections settle whatever the round trip: with both
    /// waits shorter than the 310 ms Iowa-Sydney round trip, the two
    /// survivors of São Paulo's death took turns deposing each other's
    /// fresh leaders for up to four minutes (election ticks of 160 ms).
    pub(super) fn election_backoff(&self) -> u64 {
        1 << self.leaderless_elections.min(MAX_BACKOFF)
    }

    /// Heard from the leader of this term: elections are over, and the
    /// timer drawn with a backoff shrinks back to the plain range (scaled,
    /// not drawn again, so that a seed replays the same draws).
    pub(super) fn heard_from_leader(&mut self) {
        self.deferred_pre_vote = None;
        self.randomized_timeout /= self.election_backoff();
        self.leaderless_elections = 0;
    }
}

/// Rebuilds a node's log and client sessions from its store, one entry at a
/// time in log order, keeping in memory only the tail the node works with.
pub struct Restorer {
    hard_state: HardState,
    log: RaftLog,
    sessions: Sessions,
    keep: Index,
    catch_up_floor: Option<LogPosition>,
    memberships: Memberships,
}

impl Restorer {
    pub fn new(config: &Config, hard_state: HardState) -> Restorer {
        Restorer {
            hard_state,
            log: RaftLog::default(),
            sessions: Sessions::new(
                config.session_window,
                config.max_sessions,
                config.session_idle_entries,
            ),
            keep: config.memory_entries.max(1) as Index,
            catch_up_floor: None,
            memberships: Memberships::new(config.membership(), config.membership_index),
        }
    }

    /// The catch-up floor `node rebuild` recorded in the store, if any
    /// (see [`super::RebuildPlan`]); ignored once the log reaches it.
    pub fn set_catch_up_floor(&mut self, floor: Option<LogPosition>) {
        self.catch_up_floor = floor;
    }

    /// The next entry from the store; entries must come in log order.
    pub fn push(&mut self, entry: Entry) -> Result<(), RaftError> {
        if entry.index <= self.hard_state.commit {
            self.sessions.apply(&entry);
        }
        let index = entry.index;
        let membership = match &entry.payload {
            super::types::Payload::Membership(m) => Some(m.clone()),
            _ => None,
        };
        self.log.push_restored(entry)?;
        if let Some(membership) = membership {
            self.memberships.push(index, membership);
        }
        let committed = index.min(self.hard_state.commit);
        if committed > self.log.offset() + 2 * self.keep {
            self.log.release(committed - self.keep);
        }
        Ok(())
    }
}
