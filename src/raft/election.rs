//! Elections: timeouts, pre-votes, votes and role changes.

use std::collections::BTreeSet;

use tracing::{debug, info};

use super::message::Message;
use super::node::{Candidacy, RaftNode};
use super::pending::Awaited;
use super::progress::Progress;
use super::ready::ProposeError;
use super::types::{Index, LogPosition, NodeId, Payload, Role, Term};

impl RaftNode {
    pub(super) fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if !self.in_lease() {
            if let Some(pre_vote) = self.deferred_pre_vote.take() {
                // Its candidate may have stopped campaigning since: a
                // pre-vote only, never a real vote with it, which would
                // raise a follower's term and depose a live leader.
                self.answering_deferred = true;
                self.step(pre_vote);
                self.answering_deferred = false;
            }
        }
        if self.election_elapsed >= self.election_timeout() {
            self.leaderless_elections = self.leaderless_elections.saturating_add(1);
            let pre_vote = self.config.pre_vote;
            self.start_campaign(pre_vote, false);
        }
    }

    /// Starts a pre-election (`pre_vote`) or an election. `transfer` marks an
    /// election the leader asked for, which voters honour despite their lease.
    pub(super) fn start_campaign(&mut self, pre_vote: bool, transfer: bool) {
        if !self.may_campaign() {
            return;
        }
        if let Some(floor) = self.pending_catch_up_floor() {
            // Its vote for itself would be a vote for a log below the floor.
            info!(
                node = self.config.id,
                %floor,
                last_index = self.log.last_index(),
                "not campaigning: this rebuilt replica has not caught up with its catch-up floor"
            );
            self.reset_election_timer();
            return;
        }
        self.reset_election_timer();
        self.leader = None;
        self.votes.clear();
        let campaign_term = if pre_vote {
            self.role = Role::PreCandidate;
            self.term + 1
        } else {
            self.role = Role::Candidate;
            self.term += 1;
            self.vote = Some(self.config.id);
            self.candidacy = Some(Candidacy {
                term: self.term,
                log: self.log_position(),
                granted: BTreeSet::new(),
            });
            self.term
        };
        debug!(
            node = self.config.id,
            term = campaign_term,
            pre_vote,
            "campaigning"
        );
        self.votes.insert(self.config.id, true);
        if self.tally_votes() {
            return;
        }
        let last_index = self.log.last_index();
        let last_term = self.log.last_term();
        let voters: Vec<NodeId> = self
            .config
            .voters
            .iter()
            .copied()
            .filter(|v| *v != self.config.id)
            .collect();
        for voter in voters {
            let message = if pre_vote {
                Message::PreVote {
                    last_index,
                    last_term,
                }
            } else {
                Message::Vote {
                    last_index,
                    last_term,
                    transfer,
                }
            };
            let envelope = self.envelope(voter, campaign_term, message);
            self.out.messages.push(envelope);
        }
    }

    pub(super) fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        last_index: Index,
        last_term: Term,
        pre_vote: bool,
    ) {
        let candidate = LogPosition {
            term: last_term,
            index: last_index,
        };
        let own = self.log_position();
        let floor = self.pending_catch_up_floor();
        // A rebuilt replica below its floor votes as if its log reached it.
        let up_to_date = candidate >= own.max(floor.unwrap_or_default());
        let free = self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none());
        let can_vote = free || (pre_vote && term > self.term);
        // Two pre-candidates granting each other both become candidates and
        // split the vote; across an ocean they can do so round after round
        // (both time out within one one-way delay of each other). So a
        // pre-candidate backs the rival only if it outranks it, and then
        // gives up its own campaign. Pre-votes decide nothing (the real
        // vote is what is safe), and the best-ranked rival always wins.
        let rival = pre_vote && self.role == Role::PreCandidate;
        let yields = !rival || self.outranked_by(from, candidate);
        let grant = can_vote && up_to_date && yields;
        debug!(
            node = self.config.id,
            from, term, pre_vote, grant, "vote request"
        );
        if let Some(floor) = floor.filter(|_| !up_to_date && candidate >= own) {
            info!(
                node = self.config.id,
                from,
                term,
                pre_vote,
                %candidate,
                %floor,
                "refusing vote: the candidate's log is behind this rebuilt replica's catch-up floor"
            );
        }
        if pre_vote {
            if rival && grant {
                debug!(
                    node = self.config.id,
                    from, term, "yielding the pre-election to a better-ranked rival"
                );
                let own_term = self.term;
                self.become_follower(own_term, None);
            }
            let reply_term = if grant { term } else { self.term };
            let envelope = self.envelope(
                from,
                reply_term,
                Message::PreVoteResponse { granted: grant },
            );
            self.out.messages.push(envelope);
            if rival && !yields && self.role == Role::PreCandidate {
                // The rival campaigns, so it no longer hears a leader; but
                // it may have ignored our own pre-vote while it still did
                // (its lease outlived ours by less than a timeout's
                // spread). Ask it again now: it yields to us. Otherwise we
                // wait for its answer, it for ours, until one times out
                // again (200-400 ms more on loopback, seen in the bench's
                // kills).
                let envelope = self.envelope(
                    from,
                    self.term + 1,
                    Message::PreVote {
                        last_index: own.index,
                        last_term: own.term,
                    },
                );
                self.out.messages.push(envelope);
            }
            if grant && self.decides_pre_election(from, term) {
                // Vote for real at once (durably, before either answer
                // leaves): the pre-candidate becomes a candidate on our
                // pre-vote and counts this vote as soon as it arrives, one
                // round trip sooner (180-310 ms across the WAN bench's
                // oceans).
                debug!(
                    node = self.config.id,
                    from, term, "voting with the pre-vote"
                );
                self.leaderless_elections = self.leaderless_elections.saturating_add(1);
                self.become_follower(term, None);
                self.vote = Some(from);
                self.send(
                    from,
                    Message::VoteResponse {
                        granted: true,
                        judged: Some(candidate),
                    },
                );
            }
        } else {
            if grant {
                self.vote = Some(from);
                self.leaderless_elections = self.leaderless_elections.saturating_add(1);
                self.reset_election_timer();
            }
            self.send(
                from,
                Message::VoteResponse {
                    granted: grant,
                    judged: None,
                },
            );
        }
    }

    /// Whether this node's pre-vote alone wins `from` its pre-election for
    /// `term`: the two of them are a quorum of this node's configuration (a
    /// cluster of two or three voters). The real vote that would follow is
    /// then certain, so it is cast with the pre-vote; with more voters a
    /// pre-vote stays a pre-vote, so that a node cut off with a few others
    /// cannot raise their terms and depose a live leader when it returns.
    /// Safe whatever the configuration: it is an ordinary vote (one per
    /// term, for a log at least as up to date), synced before it is sent.
    fn decides_pre_election(&self, from: NodeId, term: Term) -> bool {
        term > self.term
            && !self.answering_deferred
            && self.role != Role::Leader
            && self.role != Role::Candidate
            && self.config.is_voter(self.config.id)
            && self.config.is_voter(from)
            && self.config.quorum() <= 2
    }

    /// Does a rival pre-candidate whose log ends at `candidate` rank above
    /// this node: a longer log first, then a higher priority, then a lower id
    /// (the order `consider_priority_transfer` hands over in).
    fn outranked_by(&self, rival: NodeId, candidate: LogPosition) -> bool {
        let own = self.log_position();
        let rank = |id: NodeId| (self.config.priority(id), std::cmp::Reverse(id));
        candidate > own || (candidate == own && rank(rival) > rank(self.config.id))
    }

    /// Where this node's log ends.
    pub(super) fn log_position(&self) -> LogPosition {
        LogPosition {
            term: self.log.last_term(),
            index: self.log.last_index(),
        }
    }

    /// A rebuilt replica's catch-up floor while its log is still below it;
    /// forgotten once the log reaches it (the store keeps it, but a restart
    /// from a log at or above it ignores it too).
    ///
    /// Its log below the floor, the node may lack committed entries it had
    /// acknowledged before it lost its store, so it must neither campaign
    /// nor vote for a candidate below the floor. It does acknowledge what it
    /// receives, and the leader counts those acknowledgements towards
    /// commit: each says truthfully that the node now holds the entries
    /// (durably, up to that index, matching the leader's log), which is all
    /// that counting relies on. Only a vote speaks for entries a node no
    /// longer holds.
    pub(super) fn pending_catch_up_floor(&mut self) -> Option<LogPosition> {
        let floor = self.catch_up_floor?;
        if self.log_position() < floor {
            return Some(floor);
        }
        info!(
            node = self.config.id,
            %floor,
            "rebuilt replica caught up with its catch-up floor: it votes and campaigns again"
        );
        self.catch_up_floor = None;
        None
    }

    /// Counts a vote granted to this node's candidacy even if that election
    /// timed out meanwhile (the node is pre-campaigning for the next term).
    /// Across an ocean the answer can take longer than an election timeout:
    /// Iowa's candidacies timed out 290 ms in, before Sydney's grants arrived
    /// 310 ms in, five terms in a row. Safe while the node is still in that
    /// term with its own vote and the log it asked with (each voter votes
    /// once per term, and judged that log), and only in the process that
    /// asked: a restarted node may have lost unsynced entries it asked with,
    /// and a rebuilt one its whole log.
    pub(super) fn record_late_vote(&mut self, from: NodeId) {
        let me = self.config.id;
        let (term, log) = (self.term, self.log_position());
        let Some(candidacy) = self
            .candidacy
            .as_mut()
            .filter(|c| c.term == term && c.log == log && self.vote == Some(me))
        else {
            return;
        };
        if !self.config.is_voter(from) {
            return;
        }
        candidacy.granted.insert(from);
        let granted = candidacy
            .granted
            .iter()
            .filter(|id| self.config.is_voter(**id))
            .count()
            + usize::from(self.config.is_voter(me));
        if self.role == Role::PreCandidate && granted >= self.config.quorum() {
            info!(
                node = me,
                term, "an earlier candidacy's votes arrived late: they still win this term"
            );
            self.become_leader();
        }
    }

    /// Counts `from`'s answer in this (pre-)election. A grant counts even
    /// over a refusal already heard from the same voter: the refusal may
    /// answer an earlier round. A pre-vote asked with an older log, queued
    /// until a peer link came up, was refused at the voter's term, which
    /// was by then this round's, and arrived just before the voter's grant
    /// for this round; kept, it cancelled the grant and with it the
    /// election (`stale_vote_answers.txt`). A grant is safe to count: a
    /// vote is durable and given once per term, and a pre-vote decides
    /// nothing.
    pub(super) fn record_vote(&mut self, from: NodeId, granted: bool) {
        if self.config.is_voter(from) {
            if granted {
                self.votes.insert(from, true);
            } else {
                self.votes.entry(from).or_insert(false);
            }
            self.tally_votes();
        }
    }

    /// Acts on the votes so far; returns whether the (pre-)election ended.
    fn tally_votes(&mut self) -> bool {
        // Only the votes of the configuration in force count: a candidate
        // outside it (see `may_campaign`) does not count its own.
        let granted = self
            .votes
            .iter()
            .filter(|(id, g)| **g && self.config.is_voter(**id))
            .count();
        let rejected = self
            .votes
            .iter()
            .filter(|(id, g)| !**g && self.config.is_voter(**id))
            .count();
        let quorum = self.config.quorum();
        if granted >= quorum {
            match self.role {
                Role::PreCandidate => self.start_campaign(false, false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
            return true;
        }
        if rejected > self.config.voters.len() - quorum {
            let term = self.term;
            self.become_follower(term, None);
            return true;
        }
        false
    }

    /// Follows `leader` (if known) in `term`, abandoning any leadership.
    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        if self.role == Role::Leader {
            info!(node = self.config.id, term, "stepping down");
            self.abandon_leadership();
        }
        self.role = self.passive_role();
        self.leader = leader;
        self.votes.clear();
        self.reset_election_timer();
    }

    /// Answers everyone still waiting on this leader: their proposals may
    /// yet commit under the next one, so clients retry with the same id.
    fn abandon_leadership(&mut self) {
        self.progress.clear();
        let mut waiters: Vec<_> = self
            .pending
            .drain()
            .flat_map(|(id, awaited)| awaited.ctxs().map(move |ctx| (id, ctx)))
            .collect();
        self.transfer = None;
        self.broadcast_pending = false;
        self.commit_changed = false;
        self.heartbeat_pending = false;
        waiters.sort();
        for (id, ctx) in waiters {
            self.respond(id, ctx, Err(ProposeError::LeadershipLost));
        }
        self.abandon_reads();
        self.abandon_change();
    }

    pub(super) fn become_leader(&mut self) {
        info!(node = self.config.id, term = self.term, "became leader");
        self.role = Role::Leader;
        self.leader = Some(self.config.id);
        self.votes.clear();
        self.transfer = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        // Its followers answer a round trip from now; the longer the
        // election took, the longer that may be (`election_backoff`).
        self.quorum_grace = self.election_backoff() - 1;
        self.heard_from_leader();
        let next = self.log.last_index() + 1;
        // Members a change in flight removes are still sent the log until
        // it commits (see `membership_changed`). Each most likely holds
        // our log (its voters granted their votes to it): replicate at
        // once rather than wait a round trip for a probe's answer before
        // the first client's message may leave (`Progress::optimistic`).
        let committed = self.committed_membership().clone();
        let me = self.config.id;
        self.progress = self
            .config
            .peers()
            .chain(committed.members().filter(|id| *id != me))
            .map(|id| (id, Progress::optimistic(next)))
            .collect();
        self.pending = self
            .log
            .range(self.commit + 1, self.log.last_index())
            .filter_map(|e| e.request_id().map(|id| (id, Awaited::default())))
            .collect();
        self.reads.reset();
        // Entries of earlier terms commit only once one of our own does.
        self.append_new(Payload::Noop, 0);
        // Writes sent here while the election ran go out with the no-op.
        self.release_held();
    }

    pub(super) fn handle_timeout_now(&mut self, from: NodeId) {
        if self.role != Role::Leader && self.may_campaign() {
            info!(
                node = self.config.id,
                from, "leadership handed over: campaigning now"
            );
            self.start_campaign(false, true);
        }
    }
}
