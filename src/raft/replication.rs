//! Log replication: the leader's side (proposals, appends, commit) and the
//! follower's side (the consistency check, conflicts, commit).

use tracing::{error, info, warn};

use super::message::{AppendResult, Message};
use super::node::RaftNode;
use super::pending::Awaited;
use super::progress::ReplicationState;
use super::ready::{Fetch, Proposal, ProposeError, ProposeResponse};
use super::session::{Committed, Lookup};
use super::types::{Command, Entry, Index, Lamport, NodeId, Payload, RequestId, Role, Term};

/// How far ahead of the leader's clock a client's may be. An honest
/// client's clock holds stamps of committed entries, which every leader's
/// log has, so it is never ahead; the slack lets a client carry causality
/// from elsewhere without letting it exhaust the clock's range.
pub const MAX_CLIENT_CLOCK_SKEW: Lamport = 1 << 20;

impl RaftNode {
    pub(super) fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if let Some(transfer) = &mut self.transfer {
            transfer.elapsed += 1;
            if transfer.elapsed >= self.config.election_ticks {
                info!(
                    node = self.config.id,
                    target = transfer.target,
                    "leadership transfer timed out"
                );
                self.transfer = None;
            }
        }
        if self.election_elapsed >= self.config.election_ticks {
            self.election_elapsed = 0;
            if self.quorum_grace > 0 {
                self.quorum_grace -= 1;
            } else if self.config.check_quorum && !self.quorum_active() {
                info!(
                    node = self.config.id,
                    term = self.term,
                    "lost contact with a quorum"
                );
                let term = self.term;
                self.become_follower(term, None);
                return;
            }
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.heartbeat_pending = true;
            self.consider_priority_transfer();
        }
    }

    /// Counts voters heard from since the last round (the leader included),
    /// and starts a new round.
    fn quorum_active(&mut self) -> bool {
        // A leader being removed leads without counting itself.
        let mut active = usize::from(self.config.is_voter(self.config.id));
        for (id, pr) in self.progress.iter_mut() {
            if self.config.voters.contains(id) && pr.recent_active {
                active += 1;
            }
            pr.recent_active = false;
        }
        active >= self.config.quorum()
    }

    pub(super) fn accept_proposal(&mut self, proposal: Proposal) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transfer.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        if proposal.data.len() > self.config.max_command_bytes {
            return Err(ProposeError::TooLarge {
                size: proposal.data.len(),
                limit: self.config.max_command_bytes,
            });
        }
        if proposal.lamport > self.lamport.saturating_add(MAX_CLIENT_CLOCK_SKEW) {
            return Err(ProposeError::ClockAhead {
                lamport: proposal.lamport,
                leader: self.lamport,
                skew: MAX_CLIENT_CLOCK_SKEW,
            });
        }
        match self
            .sessions
            .lookup(proposal.id, proposal.since, self.commit)
        {
            Lookup::Committed(committed) => {
                self.respond(proposal.id, proposal.ctx, Ok(committed));
                return Ok(());
            }
            Lookup::Expired => {
                return Err(ProposeError::SessionExpired {
                    seq: proposal.id.seq,
                })
            }
            Lookup::SessionClosed => return Err(ProposeError::SessionClosed),
            Lookup::New => {}
        }
        if let Some(after) = proposal.after {
            self.check_follows(after, proposal.since)?;
        }
        if let Some(awaited) = self.pending.get_mut(proposal.id) {
            awaited.add(proposal.ctx);
            return Ok(());
        }
        let command = Command {
            client_id: proposal.id.client_id,
            seq: proposal.id.seq,
            sender: proposal.sender,
            data: proposal.data,
        };
        self.append_new(Payload::Command(command), proposal.lamport);
        self.pending.insert(proposal.id, Awaited::by(proposal.ctx));
        Ok(())
    }

    /// Whether a new proposal may follow `after` (`Proposal::after`): only
    /// if `after` is committed or waiting in this leader's log, below
    /// anything appended now. A request the table cannot place (its window
    /// or session forgotten) is let through: it is long past, and refusing
    /// would stall its client for good.
    fn check_follows(&self, after: RequestId, since: Index) -> Result<(), ProposeError> {
        if self.pending.contains(after) {
            return Ok(());
        }
        match self.sessions.lookup(after, since, self.commit) {
            Lookup::New => Err(ProposeError::EarlierRefused { after }),
            Lookup::Committed(_) | Lookup::Expired | Lookup::SessionClosed => Ok(()),
        }
    }

    /// Appends a new entry to the leader's log, stamped above the clock, the
    /// client's clock and the previous entry. Replication happens at the
    /// next `ready`, so proposals arriving together travel as one batch.
    pub(super) fn append_new(&mut self, payload: Payload, client_lamport: Lamport) -> Index {
        let previous = self.log.last().map_or(0, |e| e.lamport);
        // Bounded by `MAX_CLIENT_CLOCK_SKEW` per proposal, the clock cannot
        // reach the end of its range; were it there, it stays there rather
        // than wrapping to 0 and breaking the order of stamps.
        self.lamport = self
            .lamport
            .max(client_lamport)
            .max(previous)
            .saturating_add(1);
        let index = self.log.last_index() + 1;
        let membership = match &payload {
            Payload::Membership(m) => Some(m.clone()),
            _ => None,
        };
        self.log.append(Entry {
            index,
            term: self.term,
            lamport: self.lamport,
            payload,
        });
        if let Some(membership) = membership {
            self.membership_appended(index, membership);
        }
        self.broadcast_pending = true;
        self.maybe_commit();
        index
    }

    /// Sends new entries to every follower that can take them; with
    /// `announce_commit`, also an empty append to those that have everything,
    /// so they learn the new commit index without waiting for a heartbeat.
    pub(super) fn broadcast_append(&mut self, announce_commit: bool) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for peer in peers {
            let mut sent_any = false;
            while self.send_append(peer, false) {
                sent_any = true;
                if self
                    .progress
                    .get(&peer)
                    .is_none_or(|pr| pr.state == ReplicationState::Probe)
                {
                    break;
                }
            }
            if announce_commit && !sent_any {
                self.send_append(peer, true);
            }
        }
    }

    /// Sends one append to `to` if its window allows. Returns whether it did.
    pub(super) fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let (max_inflight, max_bytes) = (self.config.max_inflight, self.config.max_inflight_bytes);
        let Some(pr) = self.progress.get_mut(&to) else {
            return false;
        };
        if pr.is_paused(max_inflight, max_bytes) {
            return false;
        }
        let next = pr.next_index;
        if next <= self.log.offset() {
            // Released from memory: the driver reads them from the store.
            if !pr.fetching {
                pr.fetching = true;
                self.out.fetches.push(Fetch {
                    to,
                    from: next,
                    max: self.config.max_append_entries,
                    max_bytes: self.config.max_append_bytes,
                });
            }
            return false;
        }
        let entries = self.log.slice(
            next,
            self.config.max_append_entries,
            self.config.max_append_bytes,
        );
        if entries.is_empty() && !allow_empty && pr.state == ReplicationState::Replicate {
            return false;
        }
        let prev_index = next - 1;
        let Some(prev_term) = self.log.term(prev_index) else {
            error!(
                node = self.config.id,
                to, next, "progress points past the log"
            );
            pr.become_probe(self.log.last_index() + 1);
            return false;
        };
        pr.sent(
            prev_index,
            entries.last().map(|e| e.index),
            entries_bytes(&entries),
        );
        let (commit, lazy) = (self.commit, pr.lazy);
        self.send(
            to,
            Message::Append {
                prev_index,
                prev_term,
                entries,
                commit,
                lazy,
            },
        );
        true
    }

    /// Entries the driver read back from the store for follower `to` (see
    /// `Ready::fetches`): sent if the follower still needs them.
    pub fn fetched(&mut self, to: NodeId, from: Index, entries: Vec<Entry>) {
        let (max_inflight, max_bytes) = (self.config.max_inflight, self.config.max_inflight_bytes);
        let commit = self.commit;
        let Some(pr) = self.progress.get_mut(&to) else {
            return;
        };
        pr.fetching = false;
        if self.role != Role::Leader {
            return;
        }
        if entries.first().map(|e| e.index) != Some(from) {
            // Not in the store (yet): the next heartbeat round asks again.
            warn!(
                node = self.config.id,
                to, from, "the store returned no entries to catch a follower up with"
            );
            return;
        }
        let usable = pr.next_index == from
            && !pr.is_paused(max_inflight, max_bytes)
            && entries.first().is_some_and(|e| e.index == from)
            && entries.iter().enumerate().all(|(i, e)| {
                e.index == from + i as Index && self.log.term(e.index) == Some(e.term)
            });
        if !usable {
            if entries
                .iter()
                .any(|e| self.log.term(e.index) != Some(e.term))
            {
                error!(
                    node = self.config.id,
                    to, from, "the store returned entries that disagree with the log"
                );
                return;
            }
            // Things moved on meanwhile: carry on from where the follower is.
            self.send_append(to, true);
            return;
        }
        let Some(prev_term) = self.log.term(from - 1) else {
            return;
        };
        pr.sent(
            from - 1,
            entries.last().map(|e| e.index),
            entries_bytes(&entries),
        );
        let lazy = pr.lazy;
        self.send(
            to,
            Message::Append {
                prev_index: from - 1,
                prev_term,
                entries,
                commit,
                lazy,
            },
        );
        while self.send_append(to, false) {}
    }

    /// Lets go of applied, durable entries beyond the memory budget; they
    /// stay in the store.
    pub(super) fn release_memory(&mut self) {
        let keep = self.config.memory_entries as Index;
        let releasable = self.applied.min(self.log.persisted_index());
        // Release in chunks of a quarter of the budget, not entry by entry.
        if releasable > self.log.offset() + keep + keep / 4 {
            self.log.release(releasable - keep);
        }
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
        let read_seq = self.reads.seq();
        let beats: Vec<(NodeId, Index)> = self
            .progress
            .iter()
            .map(|(id, pr)| (*id, pr.match_index.min(self.commit)))
            .collect();
        for (to, commit) in beats {
            self.send(to, Message::Heartbeat { commit, read_seq });
        }
    }

    pub(super) fn handle_append_response(&mut self, from: NodeId, result: AppendResult) {
        let last_index = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        match result {
            AppendResult::Accepted { match_index } => {
                if match_index > last_index {
                    error!(
                        node = self.config.id,
                        from, match_index, "peer acknowledged entries we never sent"
                    );
                    return;
                }
                let news = pr.acknowledge(match_index);
                if pr.state == ReplicationState::Probe && (news || pr.match_index == match_index) {
                    pr.become_replicate();
                }
                if news {
                    self.choose_lazy();
                    self.maybe_commit();
                    self.maybe_finish_transfer(from);
                }
                while self.send_append(from, false) {}
            }
            AppendResult::Rejected {
                reject_index,
                hint_index,
                hint_term,
                lost,
            } => {
                // A follower whose log ends below what it acknowledged has
                // lost its log: its replica was rebuilt from nothing after
                // a disk fault (`node rebuild`). Forget what it matched and
                // probe from its end, or it would never be caught up.
                // Only the follower saying so (`lost`: a heartbeat's commit
                // is past its log), or a rejection of an append certainly
                // sent since it acknowledged `match_index`, shows that: an
                // older one, delayed or duplicated, describes the follower
                // as it was then. With a guess (`reject_index >=
                // match_index`) in its place, the simulator's reordered
                // answers threw followers back to probing 810 times in one
                // run (seed 5480).
                let lost = hint_term.is_none()
                    && hint_index <= pr.match_index
                    && (lost || pr.sent_since_ack(reject_index));
                if lost {
                    warn!(
                        node = self.config.id,
                        from,
                        matched = pr.match_index,
                        last = hint_index.saturating_sub(1),
                        "follower lost entries it had acknowledged (rebuilt replica); resending"
                    );
                    // Nothing of what it holds now was verified: probe
                    // from its end, and let the consistency check walk back
                    // over any tail it took from elsewhere.
                    pr.match_index = 0;
                    pr.become_probe(hint_index.max(1));
                    self.choose_lazy();
                    self.send_append(from, true);
                    return;
                }
                let stale = match pr.state {
                    ReplicationState::Replicate => reject_index <= pr.match_index,
                    ReplicationState::Probe => reject_index + 1 != pr.next_index,
                };
                if stale {
                    return;
                }
                // A gap while replicating: the follower's log ends past
                // what it acknowledged but before this append, because an
                // earlier append was overtaken or lost. Send again from its
                // end and keep replicating, rather than probe a round trip
                // per reordered append (the simulator's network reorders,
                // and a rebuilt replica caught up a third as fast); a tail
                // from an older term there fails the resent append's
                // consistency check and is probed as before.
                if pr.state == ReplicationState::Replicate
                    && hint_term.is_none()
                    && hint_index > pr.match_index
                    && hint_index <= reject_index
                {
                    if pr.rewind(hint_index) {
                        while self.send_append(from, false) {}
                    }
                    return;
                }
                let next = match hint_term {
                    Some(term) => self
                        .log
                        .last_index_of_term(term)
                        .map_or(hint_index, |i| i + 1),
                    None => hint_index,
                };
                pr.become_probe(next.min(reject_index).max(1));
                self.send_append(from, true);
            }
        }
    }

    pub(super) fn handle_heartbeat_response(&mut self, from: NodeId, read_seq: u64) {
        let last_index = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.read_ack = pr.read_ack.max(read_seq);
        let behind = pr.match_index < last_index;
        if behind {
            pr.unpause();
        }
        self.advance_reads();
        if behind {
            self.send_append(from, true);
        }
    }

    /// Chooses the followers whose appends say `lazy`: all but the voters
    /// commit waits for, the ones whose acknowledgements reach furthest
    /// (as many as a quorum needs besides this node). A lazy follower
    /// syncs once per linger instead of once per append: the CPU and disk
    /// work of most of its syncs saved, which on machines the nodes share
    /// goes to the leader (64 clients: BENCHMARKS.md). A tie keeps the
    /// choice, so a lazy follower, at most a linger behind, does not trade
    /// places with an urgent one; should an urgent one stall, the lazy
    /// one's next acknowledgement overtakes it and they swap, a linger
    /// later at most. During a membership change or a leadership transfer
    /// every voter is urgent: who counts is moving, and the transfer's
    /// target must catch up without waiting. So is a voter that outranks
    /// this leader (`--priorities`): the priority hand-over waits for it
    /// to hold the whole log, which a follower a linger behind never does
    /// under a steady load. And so is any follower more than one append
    /// behind the log's end: it is catching up, in few large writes, and
    /// lingering its acknowledgements slowed that (a restarted node caught
    /// up with 200,000 entries at ~410k entries/s against ~650k,
    /// BENCHMARKS.md).
    pub(super) fn choose_lazy(&mut self) {
        let id = self.config.id;
        let voters = &self.config.voters;
        let urgent: Vec<NodeId> = if self.transfer.is_some() || self.change_in_progress() {
            voters.iter().copied().collect()
        } else {
            let needed = self.config.quorum() - usize::from(voters.contains(&id));
            let mut ranked: Vec<(Index, bool, NodeId)> = self
                .progress
                .iter()
                .filter(|(follower, _)| voters.contains(follower))
                .map(|(follower, pr)| (pr.match_index, pr.lazy, *follower))
                .collect();
            // Furthest first; on a tie the urgent one (`lazy` false) first.
            ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            ranked
                .into_iter()
                .take(needed)
                .map(|(_, _, follower)| follower)
                .collect()
        };
        let caught_up = self
            .log
            .last_index()
            .saturating_sub(self.config.max_append_entries as Index);
        let mine = self.config.priority(id);
        for (follower, pr) in self.progress.iter_mut() {
            let outranks = voters.contains(follower) && self.config.priority(*follower) > mine;
            pr.lazy = !urgent.contains(follower) && !outranks && pr.match_index >= caught_up;
        }
    }

    /// Commits the highest index stored durably on a quorum of voters, if
    /// it belongs to this term (Raft paper, section 5.4.2: counting
    /// replicas is only safe for the leader's own entries).
    ///
    /// A voter added by the change in flight counts only once it holds
    /// that change: everyone whose acknowledgement counted then knows it
    /// is a voter, which `RebuildPlan` relies on.
    pub(super) fn maybe_commit(&mut self) {
        let pending = self.change_in_progress().then(|| self.membership_index());
        let committed_voters = pending.map(|_| self.committed_membership().voters.clone());
        let mut matches: Vec<Index> = self
            .config
            .voters
            .iter()
            .map(|id| {
                if *id == self.config.id {
                    return self.log.persisted_index();
                }
                let matched = self.progress.get(id).map_or(0, |pr| pr.match_index);
                match (pending, &committed_voters) {
                    (Some(index), Some(old)) if !old.contains(id) && matched < index => 0,
                    _ => matched,
                }
            })
            .collect();
        matches.sort_unstable_by(|a, b| b.cmp(a));
        let Some(&candidate) = matches.get(self.config.quorum() - 1) else {
            return;
        };
        if candidate > self.commit && self.log.term(candidate) == Some(self.term) {
            self.commit = candidate;
            self.commit_changed = true;
            self.on_commit_in_term();
        }
    }

    pub(super) fn handle_append(
        &mut self,
        from: NodeId,
        mut prev_index: Index,
        mut prev_term: Term,
        mut entries: Vec<Entry>,
        leader_commit: Index,
        lazy: bool,
    ) {
        if self.role != Role::Follower && self.role != Role::Learner {
            let term = self.term;
            self.become_follower(term, Some(from));
        }
        self.leader = Some(from);
        self.election_elapsed = 0;
        self.heard_from_leader();
        self.counted_on = Some(!lazy);
        self.release_held();

        if entries.first().is_some_and(|e| e.index != prev_index + 1) {
            error!(
                node = self.config.id,
                from, "append whose entries do not follow prev_index ignored"
            );
            return;
        }
        // Everything up to our commit index already matches the leader.
        if prev_index < self.commit {
            let skip = (self.commit - prev_index) as usize;
            if skip >= entries.len() {
                self.note_append(lazy);
                let commit = self.commit;
                self.send_after_persist(
                    from,
                    Message::AppendResponse(AppendResult::Accepted {
                        match_index: commit,
                    }),
                );
                return;
            }
            prev_term = entries[skip - 1].term;
            prev_index = self.commit;
            entries.drain(..skip);
        }

        if self.log.term(prev_index) != Some(prev_term) {
            let last = self.log.last_index();
            let (hint_index, hint_term) = if prev_index > last {
                (last + 1, None)
            } else {
                (
                    self.log.first_index_of_term(prev_index, self.commit + 1),
                    self.log.term(prev_index),
                )
            };
            self.send(
                from,
                Message::AppendResponse(AppendResult::Rejected {
                    reject_index: prev_index,
                    hint_index,
                    hint_term,
                    // Whether it lost anything is the leader's to judge
                    // (`Progress::sent_since_ack`): this append may be
                    // older than entries this node acknowledged since.
                    lost: false,
                }),
            );
            return;
        }

        let mut last_new = prev_index;
        for entry in entries {
            if entry.index != last_new + 1 {
                error!(
                    node = self.config.id,
                    from, "append with non-contiguous entries ignored"
                );
                return;
            }
            last_new = entry.index;
            match self.log.term(entry.index) {
                Some(term) if term == entry.term => continue,
                Some(_) if entry.index <= self.commit => {
                    error!(
                        node = self.config.id,
                        from,
                        index = entry.index,
                        "refusing to overwrite a committed entry"
                    );
                    return;
                }
                Some(_) => {
                    self.log.truncate(entry.index);
                    self.log_truncated(entry.index);
                }
                None => {}
            }
            self.lamport = self.lamport.max(entry.lamport);
            let membership = match &entry.payload {
                Payload::Membership(m) => Some((entry.index, m.clone())),
                _ => None,
            };
            self.log.append(entry);
            if let Some((index, membership)) = membership {
                self.membership_appended(index, membership);
            }
        }
        let commit = leader_commit.min(last_new);
        if commit > self.commit {
            self.commit = commit;
        }
        self.note_append(lazy);
        self.send_after_persist(
            from,
            Message::AppendResponse(AppendResult::Accepted {
                match_index: last_new,
            }),
        );
    }

    /// Counts an accepted append towards `Ready::linger`.
    fn note_append(&mut self, lazy: bool) {
        if lazy {
            self.lazy_appends = true;
        } else {
            self.urgent_appends = true;
        }
    }

    pub(super) fn handle_heartbeat(&mut self, from: NodeId, commit: Index, read_seq: u64) {
        if self.role != Role::Follower && self.role != Role::Learner {
            let term = self.term;
            self.become_follower(term, Some(from));
        }
        self.leader = Some(from);
        self.election_elapsed = 0;
        self.heard_from_leader();
        self.release_held();
        // The leader sends what it knows we hold (`commit` is capped at
        // our match index). Holding less, we lost entries we had
        // acknowledged (a rebuilt replica): say so, as a rejection of an
        // append at that index, or with no new writes we would never be
        // sent them again.
        // The leader's picture of our log is then wrong, so its commit
        // index is not ours to take either.
        let last = self.log.last_index();
        if commit > last {
            self.send(
                from,
                Message::AppendResponse(AppendResult::Rejected {
                    reject_index: commit,
                    hint_index: last + 1,
                    hint_term: None,
                    lost: true,
                }),
            );
        } else if commit > self.commit {
            self.commit = commit;
        }
        self.send(from, Message::HeartbeatResponse { read_seq });
    }

    /// Hands newly committed entries to the driver and answers the clients
    /// waiting on them.
    pub(super) fn apply_committed(&mut self) {
        if self.applied >= self.commit {
            return;
        }
        let RaftNode {
            log,
            sessions,
            pending,
            out,
            ..
        } = self;
        for entry in log.range(self.applied + 1, self.commit) {
            out.committed += 1;
            match &entry.payload {
                Payload::Command(command) => {
                    sessions.apply(entry);
                    let id = RequestId {
                        client_id: command.client_id,
                        seq: command.seq,
                    };
                    if let Some(awaited) = pending.remove(id) {
                        let committed = Committed::of(entry);
                        for ctx in awaited.ctxs() {
                            out.responses.push(ProposeResponse {
                                id,
                                ctx,
                                result: Ok(committed),
                            });
                        }
                    }
                }
                Payload::Membership(membership) => out
                    .committed_memberships
                    .push((entry.index, membership.clone())),
                Payload::Noop => {}
            }
        }
        self.applied = self.commit;
        self.release_memory();
        self.membership_committed();
    }
}

/// What an append's entries weigh against `Config::max_inflight_bytes`.
fn entries_bytes(entries: &[Entry]) -> usize {
    entries.iter().map(Entry::size).sum()
}
