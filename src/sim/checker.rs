//! Safety invariants, checked after every simulation step.
//!
//! Logs are compared through hash chains: the chain hash at index i covers
//! every entry up to i, so two logs with equal chain hashes at i hold the
//! same prefix. That makes each check cheap enough to run every step.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use crate::raft::{Committed, Entry, Index, Membership, NodeId, Payload, RequestId, Term};

/// The chain hash of `entry` following a prefix whose chain hash is `prev`.
pub fn chain_hash(prev: u64, entry: &Entry) -> u64 {
    let mut hasher = DefaultHasher::new();
    prev.hash(&mut hasher);
    entry.index.hash(&mut hasher);
    entry.term.hash(&mut hasher);
    entry.lamport.hash(&mut hasher);
    format!("{:?}", entry.payload).hash(&mut hasher);
    hasher.finish()
}

/// Extends `chain` (the chain hashes of a log) to cover `entries`, which
/// start right after the log's prefix that `chain` keeps.
pub fn extend_chain(chain: &mut Vec<u64>, from: Index, entries: &[Entry]) {
    chain.truncate(from.saturating_sub(1) as usize);
    for entry in entries {
        let prev = chain.last().copied().unwrap_or(0);
        chain.push(chain_hash(prev, entry));
    }
}

struct CanonicalEntry {
    chain: u64,
    term: Term,
    lamport: u64,
    request: Option<RequestId>,
    /// A configuration entry.
    config: bool,
}

#[derive(Default)]
pub struct Checker {
    /// The latest configuration in the committed log (the bootstrap one
    /// before any change commits), and how many changes committed.
    committed_config: Membership,
    config_changes: u64,
    leaders: HashMap<Term, NodeId>,
    /// (index, term) -> chain hash, as first seen in any log.
    seen: HashMap<(Index, Term), u64>,
    /// The committed log as the cluster has revealed it so far.
    canonical: Vec<CanonicalEntry>,
    committed_requests: HashMap<RequestId, Index>,
    /// Acknowledged proposals not yet covered by `canonical`.
    unresolved_acks: BTreeMap<Index, (RequestId, Committed)>,
    acked: HashMap<RequestId, Committed>,
    max_acked_index: Index,
}

pub type Violation = String;

impl Checker {
    /// A checker for a cluster bootstrapped with `config`.
    pub fn new(config: Membership) -> Self {
        Checker {
            committed_config: config,
            ..Checker::default()
        }
    }

    /// Configuration changes in the committed log so far.
    pub fn config_changes(&self) -> u64 {
        self.config_changes
    }

    /// Was the entry at `index` of the committed log a configuration?
    pub fn is_config(&self, index: Index) -> Option<bool> {
        self.canonical
            .get((index as usize).checked_sub(1)?)
            .map(|e| e.config)
    }

    pub fn committed_len(&self) -> Index {
        self.canonical.len() as Index
    }

    pub fn max_acked_index(&self) -> Index {
        self.max_acked_index
    }

    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }

    /// At most one leader per term.
    pub fn observe_leader(&mut self, node: NodeId, term: Term) -> Result<bool, Violation> {
        match self.leaders.get(&term) {
            Some(other) if *other != node => Err(format!(
                "two leaders in term {term}: nodes {other} and {node}"
            )),
            Some(_) => Ok(false),
            None => {
                self.leaders.insert(term, node);
                Ok(true)
            }
        }
    }

    /// Log matching: the same (index, term) means the same prefix, and
    /// Lamport stamps strictly increase along the log.
    pub fn observe_entries(
        &mut self,
        node: NodeId,
        chain: &[u64],
        entries: &[Entry],
        previous_lamport: u64,
    ) -> Result<(), Violation> {
        let mut previous = previous_lamport;
        for entry in entries {
            if entry.lamport <= previous {
                return Err(format!(
                    "node {node}: Lamport stamp {} at index {} does not exceed the previous entry's {previous}",
                    entry.lamport, entry.index
                ));
            }
            previous = entry.lamport;
            let hash = chain[entry.index as usize - 1];
            let first = *self.seen.entry((entry.index, entry.term)).or_insert(hash);
            if first != hash {
                return Err(format!(
                    "log matching violated: node {node} holds ({}, term {}) with a different prefix than another log",
                    entry.index, entry.term
                ));
            }
        }
        Ok(())
    }

    /// A node's commit index `commit` over a log with chain hashes `chain`.
    /// Extends the canonical committed log, or checks the node agrees with
    /// it. `durable_on_quorum` says, for an index and chain hash newly
    /// committed, why it is not durable on a quorum of the voters that
    /// could have committed it (None: it is).
    pub fn observe_commit(
        &mut self,
        node: NodeId,
        commit: Index,
        chain: &[u64],
        entry_at: impl Fn(Index) -> Option<Entry>,
        durable_on_quorum: impl Fn(Index, u64) -> Option<String>,
    ) -> Result<(), Violation> {
        if commit == 0 {
            return Ok(());
        }
        let Some(&hash) = chain.get(commit as usize - 1) else {
            return Err(format!(
                "node {node} commits index {commit} past its log of {}",
                chain.len()
            ));
        };
        let known = self.canonical.len() as Index;
        if commit <= known {
            if self.canonical[commit as usize - 1].chain != hash {
                return Err(format!(
                    "node {node}'s committed prefix up to {commit} diverges from the committed log"
                ));
            }
            return Ok(());
        }
        if known > 0 && chain[known as usize - 1] != self.canonical[known as usize - 1].chain {
            return Err(format!(
                "node {node}'s committed prefix up to {known} diverges from the committed log"
            ));
        }
        for index in known + 1..=commit {
            let Some(entry) = entry_at(index) else {
                return Err(format!(
                    "node {node} commits index {index} it does not hold"
                ));
            };
            let hash = chain[index as usize - 1];
            if let Some(why) = durable_on_quorum(index, hash) {
                return Err(format!(
                    "index {index} committed (seen at node {node}) but {why}"
                ));
            }
            if let Payload::Membership(next) = &entry.payload {
                // One change at a time: one voter in or out, never both a
                // voter and a learner.
                let previous = &self.committed_config;
                if !previous.one_voter_from(next)
                    || next.voters.intersection(&next.learners).next().is_some()
                    || next.voters.is_empty()
                {
                    return Err(format!(
                        "committed configuration at index {index} ({next}) is not one change from the previous ({previous})"
                    ));
                }
                self.committed_config = next.clone();
                self.config_changes += 1;
            }
            if let Some(previous) = self.canonical.last() {
                if entry.lamport <= previous.lamport || entry.term < previous.term {
                    return Err(format!("committed log out of order at index {index}"));
                }
            }
            let request = entry.request_id();
            if let Some(id) = request {
                if super::client::ordered(id.client_id)
                    && id.seq > 1
                    && !self.committed_requests.contains_key(&RequestId {
                        client_id: id.client_id,
                        seq: id.seq - 1,
                    })
                {
                    return Err(format!(
                        "proposal {id:?} committed at index {index} before the one it follows (sequence {})",
                        id.seq - 1
                    ));
                }
                if let Some(first) = self.committed_requests.insert(id, index) {
                    return Err(format!(
                        "proposal {id:?} committed twice: at index {first} and {index}"
                    ));
                }
            }
            self.canonical.push(CanonicalEntry {
                chain: hash,
                term: entry.term,
                lamport: entry.lamport,
                request,
                config: matches!(entry.payload, Payload::Membership(_)),
            });
        }
        self.resolve_acks()
    }

    /// Leader completeness: a leader of `term` holds every entry committed
    /// in earlier terms (and its own). Checked while no later term has
    /// had a leader: a stale leader, cut off from a newer one, need not
    /// hold what the newer one committed since, even entries of its own
    /// term or older that were uncommitted when it was elected. (Stale
    /// leaders step down after their quorum checks; a new leader's grace,
    /// `election_backoff`, can keep one longer.)
    pub fn check_leader_complete(
        &self,
        node: NodeId,
        term: Term,
        chain: &[u64],
    ) -> Result<(), Violation> {
        if self.leaders.keys().any(|t| *t > term) {
            return Ok(());
        }
        let prefix = self.canonical.partition_point(|e| e.term <= term);
        if prefix == 0 {
            return Ok(());
        }
        if chain.get(prefix - 1) != Some(&self.canonical[prefix - 1].chain) {
            return Err(format!(
                "leader {node} of term {term} lacks committed entries up to index {prefix}"
            ));
        }
        Ok(())
    }

    /// A client was told its proposal committed at `committed`.
    pub fn on_ack(&mut self, id: RequestId, committed: Committed) -> Result<(), Violation> {
        if let Some(previous) = self.acked.insert(id, committed) {
            if previous != committed {
                return Err(format!("proposal {id:?} acknowledged twice with different results: {previous:?} and {committed:?}"));
            }
        }
        self.max_acked_index = self.max_acked_index.max(committed.index);
        self.unresolved_acks
            .insert(committed.index, (id, committed));
        self.resolve_acks()
    }

    fn resolve_acks(&mut self) -> Result<(), Violation> {
        let known = self.canonical.len() as Index;
        while let Some(entry) = self.unresolved_acks.first_entry() {
            if *entry.key() > known {
                break;
            }
            let (index, (id, committed)) = entry.remove_entry();
            let slot = &self.canonical[index as usize - 1];
            if slot.request != Some(id)
                || slot.term != committed.term
                || slot.lamport != committed.lamport
            {
                return Err(format!(
                    "proposal {id:?} acknowledged at index {index} (term {}, stamp {}), but the committed log holds {:?} there",
                    committed.term, committed.lamport, slot.request
                ));
            }
        }
        Ok(())
    }

    /// At the end: every acknowledged proposal is in the committed log.
    pub fn all_acks_committed(&self) -> Result<(), Violation> {
        match self.unresolved_acks.first_key_value() {
            Some((index, (id, _))) => Err(format!(
                "proposal {id:?} acknowledged at index {index} but the cluster only committed {}",
                self.canonical.len()
            )),
            None => Ok(()),
        }
    }
}
