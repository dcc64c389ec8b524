//! What a leader knows about each follower's log, and how fast it may send.

use std::collections::VecDeque;

use super::types::Index;

/// How the leader is replicating to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// The leader does not know where the follower's log matches its own:
    /// one append at a time until one is accepted.
    Probe,
    /// The logs match up to `match_index`: stream appends optimistically,
    /// up to a window of unacknowledged messages (pipelining).
    Replicate,
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be durably replicated on the follower.
    pub match_index: Index,
    /// Next index to send.
    pub next_index: Index,
    pub state: ReplicationState,
    /// In probe state: an append is outstanding, wait for its answer or the
    /// next heartbeat before sending another.
    pub probe_sent: bool,
    /// In replicate state: last index and bytes of each append still in
    /// flight.
    inflight: VecDeque<(Index, usize)>,
    /// The sum of the bytes in `inflight`.
    inflight_bytes: usize,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Highest ReadIndex round this follower has acknowledged.
    pub read_ack: u64,
    /// Entries released from memory were asked of the driver for this
    /// follower; wait for `RaftNode::fetched`.
    pub fetching: bool,
    /// The highest `prev_index` of any append sent to the follower.
    highest_prev_sent: Index,
    /// `highest_prev_sent` when `match_index` last rose (`sent_since_ack`).
    prev_sent_at_ack: Index,
    /// Where replication last restarted after a missing append (`rewind`).
    rewound_to: Option<Index>,
    /// Appends to it say `lazy`: commit does not wait for it for now
    /// (`RaftNode::choose_lazy`).
    pub lazy: bool,
}

impl Progress {
    pub fn new(next_index: Index) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ReplicationState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            recent_active: true,
            read_ack: 0,
            fetching: false,
            lazy: false,
            highest_prev_sent: 0,
            prev_sent_at_ack: 0,
            rewound_to: None,
        }
    }

    /// A new leader's progress for a member that most likely holds its log
    /// up to `next_index - 1`: appends go out in the replicate state at
    /// once, without waiting for a probe's answer; the first rejection
    /// falls back to probing. A probe first cost a round trip before the
    /// first client message after an election could even leave: 310 ms of
    /// the 1.1-1.3 s a kill of the WAN bench's São Paulo leader took.
    pub fn optimistic(next_index: Index) -> Self {
        Progress {
            state: ReplicationState::Replicate,
            ..Progress::new(next_index)
        }
    }

    /// May the leader send another append now? In replicate state, not
    /// once `max_inflight` appends or `max_bytes` bytes of entries are
    /// unacknowledged.
    pub fn is_paused(&self, max_inflight: usize, max_bytes: usize) -> bool {
        match self.state {
            ReplicationState::Probe => self.probe_sent,
            ReplicationState::Replicate => {
                self.inflight.len() >= max_inflight || self.inflight_bytes >= max_bytes
            }
        }
    }

    fn clear_inflight(&mut self) {
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    fn pop_inflight(&mut self) {
        if let Some((_, bytes)) = self.inflight.pop_front() {
            self.inflight_bytes -= bytes;
        }
    }

    pub fn become_probe(&mut self, next_index: Index) {
        self.state = ReplicationState::Probe;
        self.next_index = next_index.max(self.match_index + 1);
        self.probe_sent = false;
        self.rewound_to = None;
        self.clear_inflight();
    }

    /// Replicates again from `next_index`, the follower's end, after an
    /// append went missing (`RaftNode::handle_append_response`), unless it
    /// already did from there since the follower last acknowledged or
    /// answered a heartbeat: every append in flight behind the missing one
    /// is refused with the same hint, and only the first may resend.
    pub fn rewind(&mut self, next_index: Index) -> bool {
        if self.rewound_to == Some(next_index) {
            return false;
        }
        self.become_replicate();
        self.next_index = next_index.max(self.match_index + 1);
        self.rewound_to = Some(next_index);
        true
    }

    pub fn become_replicate(&mut self) {
        self.state = ReplicationState::Replicate;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.clear_inflight();
    }

    /// Records an append after `prev_index`, ending at `last`, of `bytes`
    /// bytes of entries, as sent.
    pub fn sent(&mut self, prev_index: Index, last: Option<Index>, bytes: usize) {
        self.highest_prev_sent = self.highest_prev_sent.max(prev_index);
        match self.state {
            ReplicationState::Probe => self.probe_sent = true,
            ReplicationState::Replicate => {
                if let Some(last) = last {
                    self.next_index = last + 1;
                    self.inflight.push_back((last, bytes));
                    self.inflight_bytes += bytes;
                }
            }
        }
    }

    /// The follower acknowledged its log up to `index`. Returns whether this
    /// is news.
    pub fn acknowledge(&mut self, index: Index) -> bool {
        while self
            .inflight
            .front()
            .is_some_and(|&(last, _)| last <= index)
        {
            self.pop_inflight();
        }
        if index > self.match_index {
            self.rewound_to = None;
            self.prev_sent_at_ack = self.highest_prev_sent;
            self.match_index = index;
            self.next_index = self.next_index.max(index + 1);
            return true;
        }
        false
    }

    /// Whether the append after `prev_index` that the follower answered was
    /// certainly sent after its latest acknowledgement arrived, so that the
    /// answer describes its log since then. Messages can arrive out of
    /// order and twice: an answer to an earlier append (its `prev_index`
    /// no higher than any sent before) may describe the log before the
    /// acknowledged entries reached it.
    pub fn sent_since_ack(&self, prev_index: Index) -> bool {
        prev_index > self.prev_sent_at_ack
    }

    /// A heartbeat answer proves the follower is reachable: let one more
    /// append out so a lost message cannot stall replication forever.
    /// A rewind that the follower has not acknowledged by then falls back
    /// to probing from the same place: a resent append lost too would
    /// otherwise leave every later one refused with the hint already
    /// rewound to, and ignored.
    pub fn unpause(&mut self) {
        self.probe_sent = false;
        if let Some(next_index) = self.rewound_to.take() {
            self.become_probe(next_index);
        }
        self.pop_inflight();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicate_window_pauses_and_drains() {
        let mut p = Progress::new(1);
        p.become_replicate();
        p.sent(0, Some(5), 10);
        p.sent(5, Some(9), 10);
        assert!(p.is_paused(2, usize::MAX));
        assert!(p.acknowledge(5));
        assert!(!p.is_paused(2, usize::MAX));
        assert_eq!(p.next_index, 10);
        assert!(!p.acknowledge(3), "stale acknowledgements are not news");
    }

    #[test]
    fn probe_sends_one_at_a_time() {
        let mut p = Progress::new(7);
        assert!(!p.is_paused(1, 1));
        p.sent(0, None, 0);
        assert!(p.is_paused(1, 1));
        p.unpause();
        assert!(!p.is_paused(1, 1));
    }

    #[test]
    fn replicate_window_counts_bytes_too() {
        let mut p = Progress::new(1);
        p.become_replicate();
        p.sent(0, Some(1), 600);
        assert!(!p.is_paused(64, 1000), "600 of 1,000 bytes in flight");
        p.sent(1, Some(2), 600);
        assert!(p.is_paused(64, 1000), "1,200 bytes in flight");
        p.unpause();
        assert!(
            !p.is_paused(64, 1000),
            "a heartbeat answer lets one more out"
        );
        assert!(p.acknowledge(2));
        assert!(!p.is_paused(1, 1), "nothing in flight");
    }

    #[test]
    fn only_appends_sent_after_the_latest_acknowledgement_count_as_since() {
        let mut p = Progress::new(9);
        p.become_replicate();
        // Two appends in flight: after 8 (9..=11) and after 11 (12..=13).
        p.sent(8, Some(11), 30);
        p.sent(11, Some(13), 20);
        assert!(p.acknowledge(11));
        // A rejection of the second append may have been written before
        // the first arrived: it says nothing of the log since.
        assert!(!p.sent_since_ack(11));
        assert!(!p.sent_since_ack(8));
        // An append sent now, after a higher index than any before.
        p.sent(13, Some(14), 10);
        assert!(p.sent_since_ack(13));
        // A stale acknowledgement moves nothing.
        assert!(!p.acknowledge(10));
        assert!(p.sent_since_ack(13));
        assert!(p.acknowledge(14));
        assert!(!p.sent_since_ack(13));
    }
}
