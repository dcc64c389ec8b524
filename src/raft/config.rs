//! Static configuration of one Raft node.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{Index, NodeId};

/// The largest message a client may send, by default: 1 MiB.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

/// How a node behaves. Times are in ticks: the runtime decides how long a
/// tick is (the simulator uses abstract steps).
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Nodes that vote and count towards quorums.
    pub voters: BTreeSet<NodeId>,
    /// Nodes that receive the log but never vote.
    pub learners: BTreeSet<NodeId>,
    /// Where members listen (`host:port`), carried in configuration
    /// entries for the runtime; the core never reads them.
    ///
    /// `voters`, `learners` and `addresses` are the bootstrap configuration
    /// when the node starts; from then on the node keeps them equal to the
    /// configuration in force (`RaftNode::membership`).
    pub addresses: BTreeMap<NodeId, String>,
    /// The log index the bootstrap configuration is from: 0 for a new
    /// cluster's `--peers`, the index of the configuration a joining (or
    /// rebuilt) node copied from the cluster. Configuration entries at or
    /// below it are older than it and do not override it as the log
    /// arrives.
    pub membership_index: Index,
    /// A follower that hears no leader for a random time in
    /// `election_ticks..2*election_ticks` starts an election: in the first
    /// half of that range if its leader counts on it for commit, in the
    /// second if it is lazy (`RaftNode::election_timeout`).
    pub election_ticks: u64,
    /// How often a leader sends heartbeats; well below `election_ticks`.
    pub heartbeat_ticks: u64,
    /// Ask peers before raising the term (Raft thesis, section 9.6).
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within an election timeout
    /// steps down, and followers that hear a leader ignore vote requests.
    pub check_quorum: bool,
    /// Append messages in flight to one follower before waiting for acks.
    /// Sized for the farthest follower: a pipelined client fills 64 appends
    /// of 1,024 entries in less than the 310 ms round trip to Sydney, which
    /// then fell 300,000 entries behind in 5 s, and a new leader needing it
    /// for its first commit waited 2.5 s for it to catch up.
    pub max_inflight: usize,
    /// Bytes of entries in flight to one follower (with `max_inflight`, the
    /// first limit reached pauses): a bound on what a slow follower makes the
    /// leader hold in its send buffers whatever the message size.
    pub max_inflight_bytes: usize,
    /// Entries in one append message.
    pub max_append_entries: usize,
    /// Bytes of entries in one append message (and in one read from the
    /// store to catch a follower up), at least one entry whatever its size:
    /// a count alone lets 1,024 entries of 1 MB make a frame no peer takes.
    pub max_append_bytes: usize,
    /// Largest command payload a proposal may carry, in bytes.
    pub max_command_bytes: usize,
    /// Committed sequence numbers remembered per client for deduplication.
    /// A retry older than this many of the client's later messages cannot
    /// be deduplicated, so it must exceed what one client keeps in flight
    /// (`node send -`: `client::PIPELINE_WINDOW` = 64 batches of 2,000;
    /// the default is twice that, with room, and below a power of two so a
    /// busy session's queue holds 8 MB, not 16). Only the leader consults
    /// it, when a proposal arrives, so nodes may differ in it.
    pub session_window: usize,
    /// Client sessions kept: beyond this many, the least recently active
    /// session idle for `session_idle_entries` is closed (every node closes
    /// the same ones, at the same log position). A client whose session
    /// was closed is told so, never silently written twice.
    pub max_sessions: usize,
    pub session_idle_entries: u64,
    /// Applied entries kept in memory; older ones are read back from the
    /// store when a lagging follower needs them.
    pub memory_entries: usize,
    /// Leadership priority: a leader hands over to a caught-up voter with a
    /// strictly higher priority. Absent nodes have priority 0.
    pub priorities: BTreeMap<NodeId, u32>,
    /// Seeds the election-timeout randomness.
    pub seed: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("node {0} is listed both as a voter and as a learner")]
    VoterAndLearner(NodeId),
    #[error("the cluster has no voters")]
    NoVoters,
    #[error(
        "heartbeat_ticks ({heartbeat}) must be at least 1 and below election_ticks ({election})"
    )]
    BadTimeouts { heartbeat: u64, election: u64 },
    #[error(
        "max_inflight, max_inflight_bytes, max_append_entries, max_append_bytes, session_window, max_sessions and memory_entries must be at least 1"
    )]
    ZeroLimit,
}

impl Config {
    /// A configuration with production-minded defaults for `id` in a cluster
    /// of `voters`.
    pub fn new(id: NodeId, voters: impl IntoIterator<Item = NodeId>) -> Self {
        Config {
            id,
            voters: voters.into_iter().collect(),
            learners: BTreeSet::new(),
            addresses: BTreeMap::new(),
            membership_index: 0,
            election_ticks: 10,
            heartbeat_ticks: 2,
            pre_vote: true,
            check_quorum: true,
            max_inflight: 256,
            max_inflight_bytes: 32 << 20,
            max_append_entries: 1024,
            max_append_bytes: 4 << 20,
            max_command_bytes: MAX_COMMAND_BYTES,
            session_window: 260_000,
            max_sessions: 100_000,
            session_idle_entries: 1_000_000,
            memory_entries: 8192,
            priorities: BTreeMap::new(),
            seed: id,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.voters.is_empty() {
            return Err(ConfigError::NoVoters);
        }
        if let Some(both) = self.voters.intersection(&self.learners).next() {
            return Err(ConfigError::VoterAndLearner(*both));
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks {
            return Err(ConfigError::BadTimeouts {
                heartbeat: self.heartbeat_ticks,
                election: self.election_ticks,
            });
        }
        if self.max_inflight == 0
            || self.max_inflight_bytes == 0
            || self.max_append_entries == 0
            || self.max_append_bytes == 0
            || self.session_window == 0
            || self.max_sessions == 0
            || self.memory_entries == 0
        {
            return Err(ConfigError::ZeroLimit);
        }
        Ok(())
    }

    /// The configuration these fields describe.
    pub fn membership(&self) -> super::membership::Membership {
        super::membership::Membership {
            voters: self.voters.clone(),
            learners: self.learners.clone(),
            addresses: self.addresses.clone(),
        }
    }

    /// Votes needed to win an election or commit an entry.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    pub fn priority(&self, id: NodeId) -> u32 {
        self.priorities.get(&id).copied().unwrap_or(0)
    }

    /// Every other member, voters and learners.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.id;
        self.voters
            .iter()
            .chain(self.learners.iter())
            .copied()
            .filter(move |id| *id != me)
    }
}
