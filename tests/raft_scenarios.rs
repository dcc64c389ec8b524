//! The scenarios of the Raft core that do not read well as scripts. The
//! classic traps (Figure 8, a stale leader, check-quorum, pre-vote, a
//! shorter log, a divergent tail, catch-up, learners, transfer, priorities,
//! ReadIndex, retries, Lamport stamps, sessions, rebuilt replicas) are
//! scripts in `tests/scripts/raft/`, run by `tests/raft_scripts.rs`. What
//! stays here needs what a script cannot say plainly:
//!
//! - forged messages stepped into a node by hand
//!   (`vote_requests_from_a_learner_change_nothing`);
//! - arithmetic on the library's own limits, which a script would have to
//!   copy as numbers (`a_client_clock_far_ahead_...`: `u64::MAX` and
//!   `MAX_CLIENT_CLOCK_SKEW`; `large_entries_...`: `MAX_COMMAND_BYTES`
//!   messages and the wire's frame limit);
//! - the contents of one `Ready` (`proposals_are_batched_and_appends_pipelined`:
//!   one log write for the batch, a window of three appends).

mod common;

use cluster_store::raft::{Envelope, Message, ProposeError, RequestId, Role};
use common::Cluster;

fn error_for(cluster: &Cluster, client_id: u64, seq: u64) -> Option<ProposeError> {
    cluster
        .responses
        .iter()
        .filter(|r| r.id == RequestId { client_id, seq })
        .find_map(|r| r.result.clone().err())
}

/// A learner never campaigns: a vote request from one (forged, or from a
/// misconfigured node) changes nothing on a voter, even at a higher term,
/// and gets no answer. (Appends from a learner are heard: with live
/// membership a leader may be a learner this node has not yet seen
/// promoted, and only its appends bring the promotion; see
/// `a_leader_promoted_in_entries_a_follower_lacks_still_reaches_it`.)
#[test]
fn vote_requests_from_a_learner_change_nothing() {
    let mut c = Cluster::new(&[1, 2, 3], &[4], |_| {});
    c.elect(1);
    c.propose(1, 1, 1, "hello");
    c.deliver_all();
    let term = c.node(1).term();
    let before = c.node(2).status();
    let texts = c.texts(2);
    let last = before.last_index;
    let forged = [
        Message::PreVote {
            last_index: last + 10,
            last_term: term + 5,
        },
        Message::Vote {
            last_index: last + 10,
            last_term: term + 5,
            transfer: true,
        },
    ];
    for message in forged {
        let kind = message.kind();
        c.node_mut(2).step(Envelope {
            from: 4,
            to: 2,
            term: term + 5,
            lamport: 0,
            message,
        });
        c.drain(2);
        assert_eq!(
            c.node(2).status(),
            before,
            "a {kind} from a learner changed node 2"
        );
        assert!(
            c.queue.iter().all(|m| m.from != 2),
            "node 2 answered a {kind} from a learner"
        );
    }
    assert_eq!(c.texts(2), texts);
    c.tick_all(5);
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(c.node(1).term(), term, "the real leader was not disturbed");
}

/// A client's clock is only trusted as far as the cluster could have given
/// it out: `u64::MAX` once made the next stamp wrap to 0 (and panicked a
/// debug build), on each new leader in turn as the client retried. It is
/// refused, a follower that is not the leader does not take it either, and
/// stamps keep strictly increasing.
#[test]
fn a_client_clock_far_ahead_is_refused_and_stamps_keep_increasing() {
    use cluster_store::raft::{Proposal, MAX_CLIENT_CLOCK_SKEW};
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, 2, 1, "before");
    c.deliver_all();
    let lying = |seq, lamport| Proposal {
        id: RequestId { client_id: 9, seq },
        lamport,
        since: 0,
        sender: "mallory".into(),
        data: "lie".into(),
        after: None,
        ctx: 0,
    };
    for (seq, lamport) in [(1, u64::MAX), (2, u64::MAX - 1), (3, 1 << 40)] {
        // On a follower: refused as not the leader, its clock untouched.
        let before = c.node(2).lamport();
        c.node_mut(2).propose(lying(seq, lamport));
        c.drain(2);
        assert_eq!(c.node(2).lamport(), before);
        c.responses.clear();
        c.node_mut(1).propose(lying(seq, lamport));
        c.drain(1);
        assert!(
            matches!(error_for(&c, 9, seq), Some(ProposeError::ClockAhead { .. })),
            "{:?}",
            c.responses
        );
    }
    // Within the slack, a clock ahead is honoured.
    let leader_clock = c.node(1).lamport();
    c.node_mut(1)
        .propose(lying(4, leader_clock + MAX_CLIENT_CLOCK_SKEW));
    c.drain(1);
    c.propose(1, 2, 2, "after");
    c.deliver_all();
    let log = c.node(3).log();
    let stamps: Vec<u64> = log.range(1, log.last_index()).map(|e| e.lamport).collect();
    assert_eq!(c.texts(3), ["before", "lie", "after"]);
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert_eq!(stamps[2], leader_clock + MAX_CLIENT_CLOCK_SKEW + 1);
}

/// Appends are bounded by bytes as well as by count: twenty messages of
/// the largest size once made one 20 MB append that no frame could carry;
/// the link dropped it, the follower rejected the gap and the leader sent
/// the same slice forever. Every message must fit a frame, and a follower
/// that was away catches up, also from entries read back from the store.
#[test]
fn large_entries_travel_in_appends_that_fit_a_frame() {
    use cluster_store::wire::{encode, PeerFrame};
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| cfg.memory_entries = 4);
    c.elect(1);
    c.crash(3);
    let big = "m".repeat(cluster_store::raft::MAX_COMMAND_BYTES);
    // Proposed together, so one ready holds all twenty.
    for seq in 1..=20 {
        c.node_mut(1).propose(cluster_store::raft::Proposal {
            id: RequestId { client_id: 5, seq },
            lamport: 0,
            since: 0,
            sender: "client-5".into(),
            data: big.clone().into(),
            after: None,
            ctx: 0,
        });
    }
    c.drain(1);
    c.deliver_all();
    assert_eq!(c.node(2).commit_index(), 21);
    c.restart(3);
    for _ in 0..200 {
        if c.node(3).log().last_index() == c.node(1).log().last_index() {
            break;
        }
        c.tick_all(1);
    }
    assert_eq!(c.node(3).log().last_index(), c.node(1).log().last_index());
    assert!(c.node(3).commit_index() >= 21);
    let appends: Vec<&Envelope> = c
        .delivered
        .iter()
        .filter(|m| matches!(&m.message, Message::Append { entries, .. } if !entries.is_empty()))
        .collect();
    assert!(appends.len() >= 10, "{} appends", appends.len());
    for message in appends {
        let frame = encode(&PeerFrame::Raft(message.clone()));
        assert!(
            frame.is_ok(),
            "an append from {} to {} cannot be sent: {:?}",
            message.from,
            message.to,
            frame.err()
        );
    }
}

/// Proposals arriving together travel as one batch, and the leader keeps
/// several appends in flight to a follower before hearing back.
#[test]
fn proposals_are_batched_and_appends_pipelined() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| {
        cfg.max_append_entries = 10;
        cfg.max_inflight = 3;
    });
    c.elect(1);
    c.tick_all(2);
    c.queue.clear();
    for seq in 1..=100 {
        c.node_mut(1).propose(cluster_store::raft::Proposal {
            id: RequestId { client_id: 1, seq },
            lamport: 0,
            since: 0,
            sender: "bulk".into(),
            data: "x".into(),
            after: None,
            ctx: 0,
        });
    }
    let ready = c.node_mut(1).ready();
    let write = ready.log_write.expect("one write for the batch");
    assert_eq!(write.entries.len(), 100);
    let appends_to_2: Vec<usize> = ready
        .messages
        .iter()
        .filter(|m| m.to == 2)
        .filter_map(|m| match &m.message {
            Message::Append { entries, .. } => Some(entries.len()),
            _ => None,
        })
        .collect();
    assert_eq!(
        appends_to_2,
        vec![10, 10, 10],
        "a window of three full appends"
    );
}

/// `Ready::linger` says a follower may hold its write for a later sync:
/// only when every append it answers was marked lazy. An urgent append in
/// the same ready, even one with nothing new, takes that away, and a
/// leader's own writes never linger.
#[test]
fn a_ready_lingers_only_when_every_append_it_answers_is_lazy() {
    use cluster_store::raft::{Config, Entry, HardState, Payload, RaftNode};

    let mut follower = RaftNode::new(Config::new(2, [1, 2, 3]), HardState::default(), Vec::new())
        .expect("a follower");
    let noop = |index| Entry {
        index,
        term: 1,
        lamport: index,
        payload: Payload::Noop,
    };
    let append = |prev_index, entries: Vec<Entry>, lazy| Envelope {
        from: 1,
        to: 2,
        term: 1,
        lamport: 0,
        message: Message::Append {
            prev_index,
            prev_term: if prev_index == 0 { 0 } else { 1 },
            entries,
            commit: 0,
            lazy,
        },
    };
    follower.step(append(0, vec![noop(1)], true));
    let ready = follower.ready();
    assert!(
        ready.log_write.is_some() && ready.linger,
        "a lazy append lingers"
    );
    follower.step(append(1, vec![noop(2)], true));
    follower.step(append(2, vec![noop(3)], false));
    let ready = follower.ready();
    assert!(
        !ready.linger,
        "an urgent append in the same ready syncs both"
    );
    follower.step(append(3, Vec::new(), false));
    let ready = follower.ready();
    assert!(
        ready.log_write.is_none() && !ready.persisted_messages.is_empty() && !ready.linger,
        "an urgent append with nothing new still answers after a sync"
    );
    follower.step(append(3, Vec::new(), true));
    assert!(
        follower.ready().linger,
        "a lazy one with nothing new may wait"
    );

    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.tick_all(2);
    c.node_mut(1).propose(cluster_store::raft::Proposal {
        id: RequestId {
            client_id: 1,
            seq: 1,
        },
        lamport: 0,
        since: 0,
        sender: "c".into(),
        data: "x".into(),
        after: None,
        ctx: 0,
    });
    let ready = c.node_mut(1).ready();
    assert!(
        ready.log_write.is_some() && !ready.linger,
        "a leader never lingers"
    );
    assert!(
        ready
            .messages
            .iter()
            .any(|m| matches!(m.message, Message::Append { lazy: true, .. })),
        "one of the leader's two followers is sent lazy appends"
    );
}
