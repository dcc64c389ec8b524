//! The classic traps of Raft, each set up by hand, and the features beyond
//! the paper (pre-vote, check-quorum, learners, transfer, priorities,
//! ReadIndex, exactly-once proposals, Lamport stamps, pipelining).

mod common;

use cluster_store::raft::{Envelope, Message, ProposeError, RequestId, Role};
use common::Cluster;

fn ok_index(cluster: &Cluster, client_id: u64, seq: u64) -> Option<u64> {
    cluster
        .responses
        .iter()
        .filter(|r| r.id == RequestId { client_id, seq })
        .find_map(|r| r.result.as_ref().ok().map(|c| c.index))
}

fn error_for(cluster: &Cluster, client_id: u64, seq: u64) -> Option<ProposeError> {
    cluster
        .responses
        .iter()
        .filter(|r| r.id == RequestId { client_id, seq })
        .find_map(|r| r.result.clone().err())
}

/// Figure 8 of the Raft paper: an entry of an earlier term stored on a
/// majority is not committed by counting replicas, because a later leader
/// may still overwrite it.
#[test]
fn figure_8_old_term_entry_on_a_majority_is_not_committed() {
    let mut c = Cluster::new(&[1, 2, 3, 4, 5], &[], |cfg| cfg.max_append_entries = 1);

    // (a) S1 leads term 1 and replicates "x" at index 2 to S2 only.
    c.elect(1);
    assert_eq!(c.node(1).term(), 1);
    for peer in [3, 4, 5] {
        c.cut.insert((1, peer));
    }
    c.propose(1, 7, 1, "x");
    c.deliver_all();
    assert_eq!(c.node(2).log().term(2), Some(1));
    assert_eq!(c.node(1).commit_index(), 1);

    // (b) S1 crashes; S5 wins term 2 with S3 and S4 and appends its no-op
    // at index 2, which nobody else receives before S5 crashes too.
    c.crash(1);
    c.heal();
    c.elect_quietly(5);
    assert_eq!(c.node(5).term(), 2);
    assert_eq!(c.node(5).log().term(2), Some(2));
    c.crash(5);

    // (c) S1 returns and wins term 3. It brings S3 up to index 2 (term 1),
    // so "x" is on S1, S2 and S3, a majority, but S1's own no-op is not.
    c.restart(1);
    c.elect_quietly(1);
    assert_eq!(c.node(1).term(), 3);
    c.cut.insert((1, 4));
    // Its first appends were lost; the next heartbeat round resumes them.
    for _ in 0..c.configs[&1].heartbeat_ticks {
        c.node_mut(1).tick();
    }
    c.deliver_until(|c| c.node(3).log().term(2) == Some(1));
    c.cut.insert((1, 3));
    c.queue.retain(|m| m.from != 1 || m.to != 3);
    c.deliver_all();
    let holders = [1, 2, 3]
        .iter()
        .filter(|n| c.node(**n).log().term(2) == Some(1))
        .count();
    assert_eq!(holders, 3, "x is stored on a majority");
    assert_eq!(
        c.node(1).commit_index(),
        1,
        "a leader must not commit an earlier term's entry by counting replicas"
    );
    assert_eq!(ok_index(&c, 7, 1), None);

    // (d) S1 crashes; S5 returns and wins with S3 and S4, and its term-2
    // entry replaces "x" everywhere. Had S1 committed "x", it would be lost.
    c.crash(1);
    c.heal();
    c.restart(5);
    c.elect(5);
    c.restart(1);
    c.tick_all(5);
    for node in [1, 2, 3, 4, 5] {
        assert_eq!(c.texts(node), Vec::<String>::new(), "node {node}");
        assert_eq!(c.node(node).log().term(2), Some(2), "node {node}");
        assert_eq!(c.node(node).commit_index(), c.node(5).log().last_index());
    }
    assert_eq!(ok_index(&c, 7, 1), None, "x was never acknowledged");
}

/// A leader frozen while the others elect a new one (a long GC pause or
/// SIGSTOP) comes back believing it still leads. It must step down, lose
/// what it accepted meanwhile, and tell its clients to retry.
#[test]
fn stale_leader_returning_steps_down_and_loses_its_uncommitted_writes() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, 1, 1, "before");
    c.deliver_all();

    c.isolate(1);
    c.propose(1, 9, 1, "stale");
    c.tick(&[2, 3], 40);
    let new_leader = [2, 3]
        .into_iter()
        .find(|n| c.node(*n).role() == Role::Leader)
        .expect("the majority elects a new leader");
    let new_term = c.node(new_leader).term();
    c.propose(new_leader, 1, 2, "after");
    c.deliver_all();
    assert!(ok_index(&c, 1, 2).is_some());
    assert_eq!(
        c.node(1).role(),
        Role::Leader,
        "frozen, it still believes it leads"
    );

    c.heal();
    c.tick(&[1], 2);
    c.tick_all(3);
    assert_eq!(c.node(1).role(), Role::Follower);
    assert_eq!(
        c.node(new_leader).role(),
        Role::Leader,
        "the returning node must not depose the new leader"
    );
    assert_eq!(c.node(new_leader).term(), new_term);
    for node in [1, 2, 3] {
        assert_eq!(c.texts(node), vec!["before", "after"], "node {node}");
    }
    assert_eq!(error_for(&c, 9, 1), Some(ProposeError::LeadershipLost));
    assert_eq!(ok_index(&c, 9, 1), None);
}

/// Check-quorum: a leader cut off from the majority steps down by itself
/// within two election timeouts, and a ReadIndex it was serving fails
/// instead of returning stale data.
#[test]
fn isolated_leader_steps_down_and_fails_pending_reads() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(1);
    c.node_mut(1).read_index(77);
    c.tick(&[1], 2 * c.configs[&1].election_ticks);
    assert_ne!(c.node(1).role(), Role::Leader);
    let read = c
        .reads
        .iter()
        .find(|r| r.ctx == 77)
        .expect("the read is answered");
    assert!(
        read.result.is_err(),
        "an isolated leader served a read: {read:?}"
    );
}

/// Pre-vote: a follower cut off for many election timeouts does not raise
/// its term, so it cannot disrupt the leader when it returns. Without
/// pre-vote its term climbs.
#[test]
fn partitioned_follower_returns_without_disrupting_the_leader() {
    for pre_vote in [true, false] {
        let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| cfg.pre_vote = pre_vote);
        c.elect(1);
        let term = c.node(1).term();
        c.isolate(3);
        c.tick(&[1, 2, 3], 100);
        if !pre_vote {
            assert!(
                c.node(3).term() > term,
                "without pre-vote the isolated node's term climbs"
            );
            continue;
        }
        assert_eq!(c.node(3).term(), term, "pre-vote keeps the term");
        c.heal();
        c.tick_all(10);
        assert_eq!(c.node(1).role(), Role::Leader);
        assert_eq!(c.node(1).term(), term);
        assert_eq!(c.node(3).leader(), Some(1));
    }
}

/// A candidate whose log lacks committed entries cannot win, with or
/// without pre-vote; a node that has them can.
#[test]
fn candidate_with_a_shorter_log_loses() {
    for pre_vote in [true, false] {
        let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| cfg.pre_vote = pre_vote);
        c.elect(1);
        c.cut.insert((1, 3));
        for seq in 1..=3 {
            c.propose(1, 1, seq, &format!("m{seq}"));
        }
        c.deliver_all();
        assert!(ok_index(&c, 1, 3).is_some(), "committed on 1 and 2");
        c.crash(1);
        c.heal();

        for _ in 0..3 {
            c.start_election(3);
            c.deliver_all();
            assert_ne!(
                c.node(3).role(),
                Role::Leader,
                "pre_vote={pre_vote}: node 3 lacks committed entries"
            );
        }
        c.elect(2);
        c.restart(1);
        c.tick_all(5);
        for node in [1, 2, 3] {
            assert_eq!(
                c.texts(node),
                vec!["m1", "m2", "m3"],
                "pre_vote={pre_vote}, node {node}"
            );
        }
    }
}

/// A follower holding a long uncommitted tail from a deposed leader has it
/// replaced by the new leader's log, and the conflict hint skips the whole
/// stale term in one round trip instead of one entry at a time.
#[test]
fn divergent_uncommitted_tail_is_replaced_with_one_rejection() {
    let mut c = Cluster::new(&[1, 2, 3, 4, 5], &[], |cfg| cfg.max_append_entries = 4);
    c.elect(1);
    for peer in [3, 4, 5] {
        c.cut.insert((1, peer));
    }
    for seq in 1..=30 {
        c.propose(1, 1, seq, &format!("old{seq}"));
    }
    c.deliver_all();
    assert_eq!(c.texts(2).len(), 30, "node 2 holds the uncommitted tail");
    c.crash(1);
    c.heal();

    c.cut.insert((3, 2));
    c.cut.insert((2, 3));
    c.elect(3);
    for seq in 1..=20 {
        c.propose(3, 2, seq, &format!("new{seq}"));
    }
    c.deliver_all();
    c.heal();
    c.delivered.clear();
    c.tick_all(3);

    let expected: Vec<String> = (1..=20).map(|s| format!("new{s}")).collect();
    for node in [2, 3, 4, 5] {
        assert_eq!(c.texts(node), expected, "node {node}");
    }
    let rejections = c.count_delivered(|m| m.from == 2 && Cluster::is_append_rejection(m));
    assert!(rejections <= 1, "backtracking took {rejections} rejections");
}

/// A follower that missed many entries is told where to resume at once.
#[test]
fn lagging_follower_catches_up_after_one_rejection() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| cfg.max_append_entries = 8);
    c.elect(1);
    c.isolate(3);
    for seq in 1..=100 {
        c.propose(1, 1, seq, &format!("m{seq}"));
        c.deliver_all();
    }
    c.heal();
    c.delivered.clear();
    c.tick_all(4);
    assert_eq!(c.texts(3).len(), 100);
    let rejections = c.count_delivered(|m| m.from == 3 && Cluster::is_append_rejection(m));
    assert!(rejections <= 1, "catch-up took {rejections} rejections");
}

/// Learners receive the whole log, never campaign, never grant votes and
/// do not count towards commit quorums.
#[test]
fn learners_replicate_but_never_vote() {
    let mut c = Cluster::new(&[1, 2, 3], &[4], |_| {});
    assert_eq!(c.node(4).role(), Role::Learner);
    c.elect(1);
    c.propose(1, 1, 1, "hello");
    c.deliver_all();
    c.tick_all(2);
    assert_eq!(c.texts(4), vec!["hello"]);
    assert_eq!(c.node(4).commit_index(), c.node(1).commit_index());

    c.isolate(4);
    c.tick(&[4], 100);
    assert_eq!(c.node(4).role(), Role::Learner, "a learner never campaigns");
    assert_eq!(c.node(4).term(), c.node(1).term());
    c.heal();

    let term = c.node(1).term();
    c.node_mut(4).step(Envelope {
        from: 2,
        to: 4,
        term: term + 1,
        lamport: 0,
        message: Message::Vote {
            last_index: 100,
            last_term: term + 1,
            transfer: true,
        },
    });
    c.drain(4);
    assert!(
        c.queue.iter().all(|m| m.from != 4),
        "a learner ignores vote requests"
    );
    assert_eq!(
        c.node(4).term(),
        term,
        "and does not let them raise its term"
    );

    // Two voters down: the learner cannot stand in for them.
    c.crash(2);
    c.crash(3);
    let commit = c.node(1).commit_index();
    c.propose(1, 1, 2, "needs a voter");
    c.deliver_all();
    assert_eq!(c.node(1).commit_index(), commit);
    assert_eq!(
        c.texts(4),
        vec!["hello", "needs a voter"],
        "but it still replicates"
    );
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

#[test]
fn leadership_transfer_hands_over_and_pauses_proposals() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.cut.insert((1, 3));
    c.propose(1, 1, 1, "a");
    c.deliver_all();
    c.heal();
    c.node_mut(1)
        .transfer_leadership(3)
        .expect("the leader may transfer");
    c.propose(1, 1, 2, "during");
    assert_eq!(error_for(&c, 1, 2), Some(ProposeError::TransferInProgress));
    c.deliver_all();
    assert_eq!(c.node(3).role(), Role::Leader);
    assert_eq!(c.node(1).role(), Role::Follower);
    assert_eq!(
        c.texts(3),
        vec!["a"],
        "the target caught up before taking over"
    );
    assert!(
        c.node_mut(2).transfer_leadership(1).is_err(),
        "only the leader transfers"
    );
}

/// With priorities, leadership settles on the highest-priority voter that
/// is up and caught up: "the highest id leads", through ordinary elections.
#[test]
fn highest_priority_voter_takes_leadership_when_caught_up() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| {
        cfg.priorities = [(1, 1), (2, 2), (3, 3)].into_iter().collect();
    });
    c.elect(1);
    c.tick_all(10);
    assert_eq!(c.node(3).role(), Role::Leader);

    c.crash(3);
    c.tick(&[1, 2], 60);
    assert_eq!(c.node(2).role(), Role::Leader, "the next in rank leads");
    c.propose(2, 1, 1, "while 3 was down");
    c.deliver_all();

    c.restart(3);
    c.tick_all(10);
    assert_eq!(
        c.node(3).role(),
        Role::Leader,
        "node 3 leads again once caught up"
    );
    assert_eq!(c.texts(3), vec!["while 3 was down"]);
}

#[test]
fn read_index_reflects_every_acknowledged_write() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, 1, 1, "a");
    c.deliver_all();
    let acked = ok_index(&c, 1, 1).expect("committed");
    c.node_mut(1).read_index(5);
    c.drain(1);
    assert!(c.reads.is_empty(), "a read waits for a quorum round");
    c.deliver_all();
    let read = c.reads.iter().find(|r| r.ctx == 5).expect("answered");
    assert!(read.result.as_ref().is_ok_and(|index| *index >= acked));

    c.node_mut(2).read_index(6);
    c.drain(2);
    let read = c.reads.iter().find(|r| r.ctx == 6).expect("answered");
    assert_eq!(
        read.result,
        Err(ProposeError::NotLeader { leader: Some(1) })
    );
}

#[test]
fn retried_proposals_are_written_once() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| cfg.session_window = 4);
    c.elect(1);
    c.propose(1, 5, 1, "a");
    c.propose(1, 5, 1, "a"); // a retry while the first is in flight
    c.deliver_all();
    let first = ok_index(&c, 5, 1).expect("committed");
    c.responses.clear();
    c.propose(1, 5, 1, "a"); // a retry after the commit
    assert_eq!(ok_index(&c, 5, 1), Some(first));

    c.elect(2);
    c.responses.clear();
    c.propose(2, 5, 1, "a"); // a retry at the next leader
    assert_eq!(ok_index(&c, 5, 1), Some(first));
    for node in [1, 2, 3] {
        assert_eq!(c.texts(node), vec!["a"], "node {node}");
    }

    for seq in 2..=6 {
        c.propose(2, 5, seq, "more");
    }
    c.deliver_all();
    c.propose(2, 5, 1, "a");
    assert_eq!(
        error_for(&c, 5, 1),
        Some(ProposeError::SessionExpired { seq: 1 })
    );
}

#[test]
fn oversized_and_misdirected_proposals_are_refused() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| cfg.max_command_bytes = 8);
    c.elect(1);
    c.propose(1, 1, 1, "far too long for the limit");
    assert_eq!(
        error_for(&c, 1, 1),
        Some(ProposeError::TooLarge { size: 26, limit: 8 })
    );
    c.propose(2, 1, 2, "short");
    assert_eq!(
        error_for(&c, 1, 2),
        Some(ProposeError::NotLeader { leader: Some(1) })
    );
}

/// Stamps exceed the client's clock and the previous entry, and every node
/// that receives them advances its own clock.
#[test]
fn lamport_stamps_respect_the_clients_clock() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.node_mut(1).propose(cluster_store::raft::Proposal {
        id: RequestId {
            client_id: 1,
            seq: 1,
        },
        lamport: 1000,
        since: 0,
        sender: "alice".into(),
        data: "later".into(),
    });
    c.propose(1, 2, 1, "after that");
    c.deliver_all();
    let log = c.node(3).log();
    let stamps: Vec<u64> = log
        .range(1, log.last_index())
        .iter()
        .map(|e| e.lamport)
        .collect();
    assert_eq!(stamps[1], 1001);
    assert_eq!(stamps[2], 1002);
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    for node in [1, 2, 3] {
        assert!(c.node(node).lamport() >= 1002, "node {node}");
    }
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
    let stamps: Vec<u64> = log
        .range(1, log.last_index())
        .iter()
        .map(|e| e.lamport)
        .collect();
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

#[test]
fn single_node_cluster_commits_once_durable() {
    let mut c = Cluster::new(&[1], &[], |_| {});
    c.node_mut(1).campaign();
    c.drain(1);
    assert_eq!(c.node(1).role(), Role::Leader);
    c.propose(1, 1, 1, "solo");
    assert!(ok_index(&c, 1, 1).is_some());
}

/// A follower whose disk was lost and whose replica was rebuilt empty
/// (`node rebuild`) rejects appends below what it once acknowledged; the
/// leader must not take that for a stale rejection, or the follower would
/// never catch up.
#[test]
fn follower_rebuilt_from_nothing_is_caught_up_from_the_start() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    for seq in 1..=5 {
        c.propose(1, 1, seq, &format!("m{seq}"));
    }
    c.deliver_all();
    let term = c.node(1).term();
    c.crash(3);
    c.disks.insert(
        3,
        common::Disk {
            hard_state: cluster_store::raft::HardState {
                term,
                vote: Some(3),
                commit: 0,
            },
            log: Vec::new(),
            catch_up_floor: None,
        },
    );
    c.restart(3);
    c.propose(1, 1, 6, "m6");
    c.deliver_all();
    c.tick_all(5);
    let expected: Vec<String> = (1..=6).map(|i| format!("m{i}")).collect();
    assert_eq!(
        c.texts(3),
        expected,
        "the rebuilt follower was not caught up"
    );
    assert_eq!(c.node(3).commit_index(), c.node(1).commit_index());
}

/// A replica rebuilt from nothing must not vote with its empty log
/// (issue #13, item 7). Messages commit on nodes 1 and 2 while node 3 is
/// cut off; node 2 loses its disk and is rebuilt, and node 1 goes down.
/// Node 3, which lacks the committed messages, campaigns: with node 2's
/// vote it would win and overwrite them. Below its catch-up floor node 2
/// refuses, so node 3 cannot win, while node 1, whose log reaches the
/// floor, can; the messages survive and node 2, caught up, votes again.
#[test]
fn rebuilt_replica_refuses_votes_below_its_catch_up_floor() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, 1, 1, "m1");
    c.deliver_all();
    c.isolate(3);
    for seq in 2..=4 {
        c.propose(1, 1, seq, &format!("m{seq}"));
        c.deliver_all();
    }
    let expected: Vec<String> = (1..=4).map(|i| format!("m{i}")).collect();
    assert_eq!(ok_index(&c, 1, 4), Some(5), "m4 committed on nodes 1 and 2");
    assert_eq!(c.texts(2), expected);
    assert_eq!(c.texts(3), vec!["m1".to_string()], "node 3 lags");

    let term = c.node(1).term();
    let plan = c.rebuild(2);
    assert_eq!(plan.term, term);
    let floor = cluster_store::raft::LogPosition { term, index: 5 };
    assert_eq!(plan.floor, Some(floor), "the floor is node 1's log");
    assert_eq!(c.node(2).log().last_index(), 0);
    assert_eq!(c.node(2).catch_up_floor(), Some(floor));

    // Node 1 goes down; node 3 reaches node 2 and campaigns, again and again.
    c.crash(1);
    c.heal();
    for _ in 0..3 {
        c.start_election(3);
        c.deliver_all();
        assert_ne!(
            c.node(3).role(),
            Role::Leader,
            "node 3 won without the committed entries"
        );
    }
    c.tick_all(100);
    for id in [2, 3] {
        assert_ne!(c.node(id).role(), Role::Leader, "node {id} leads");
    }
    assert_eq!(c.texts(3), vec!["m1".to_string()]);
    assert_eq!(c.node(2).role(), Role::Follower, "node 2 never campaigned");
    assert_eq!(c.node(2).log().last_index(), 0);
    assert_eq!(c.node(2).catch_up_floor(), Some(floor));

    // Node 1 returns and wins with node 2's vote alone (node 3 cut off):
    // a candidate whose log reaches the floor gets it.
    c.restart(1);
    c.cut.insert((1, 3));
    c.cut.insert((3, 1));
    c.elect_quietly(1);
    assert_eq!(
        c.node(2).log().last_index(),
        0,
        "node 2 voted with its log empty"
    );
    c.heal();
    c.tick_all(5);
    for id in [1, 2, 3] {
        assert_eq!(c.texts(id), expected, "node {id} lost committed messages");
        assert_eq!(c.node(id).commit_index(), c.node(1).log().last_index());
    }
    assert_eq!(
        c.node(2).catch_up_floor(),
        None,
        "caught up, floor forgotten"
    );

    // Caught up, node 2 votes as any node: node 3 now wins with it.
    c.crash(1);
    c.elect(3);
    assert_eq!(c.texts(3), expected);
}

/// A learner rebuilt from nothing restarts (its store records its own
/// vote as spent, though it never votes) and is caught up.
#[test]
fn rebuilt_learner_restarts_and_is_caught_up() {
    let mut c = Cluster::new(&[1, 2, 3], &[4], |_| {});
    c.elect(1);
    for seq in 1..=3 {
        c.propose(1, 1, seq, &format!("m{seq}"));
    }
    c.deliver_all();
    let plan = c.rebuild(4);
    assert_eq!(plan.hard_state(4).vote, Some(4));
    assert_eq!(c.node(4).role(), Role::Learner);
    c.tick_all(5);
    let expected: Vec<String> = (1..=3).map(|i| format!("m{i}")).collect();
    assert_eq!(c.texts(4), expected);
    assert_eq!(c.node(4).catch_up_floor(), None);
}

/// With a small memory budget the leader releases applied entries; a
/// follower that was away is caught up from entries read back from the
/// store, and every log stays whole.
#[test]
fn follower_behind_released_entries_is_caught_up_from_the_store() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.memory_entries = 4);
    c.elect(1);
    c.isolate(3);
    for seq in 1..=40 {
        c.propose(1, 1, seq, &format!("m{seq}"));
        c.deliver_all();
    }
    assert!(
        c.node(1).entries_in_memory() < 20,
        "the leader still holds {} entries",
        c.node(1).entries_in_memory()
    );
    c.heal();
    c.tick_all(5);
    c.deliver_all();
    c.tick_all(5);
    assert_eq!(c.node(3).commit_index(), c.node(1).commit_index());
    // Node 3's disk holds the whole log, read back entry by entry.
    let texts: Vec<String> = c.disks[&3]
        .log
        .iter()
        .filter_map(|e| match &e.payload {
            cluster_store::raft::Payload::Command(c) => {
                Some(String::from_utf8_lossy(&c.data).into_owned())
            }
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
}

/// Client sessions are bounded: beyond `max_sessions`, the least recently
/// active session idle for `session_idle_entries` is closed, on every node
/// at the same log position (a restarted node rebuilds the same table).
/// A client whose session was closed is told so, never written twice; a
/// client that started after the closing is new.
#[test]
fn idle_sessions_close_the_same_everywhere_and_their_clients_are_told() {
    use cluster_store::raft::Proposal;
    let mut c = Cluster::new(&[1, 2, 3], &[], |cfg| {
        cfg.max_sessions = 2;
        cfg.session_idle_entries = 3;
    });
    c.elect(1);
    let propose = |c: &mut Cluster, client_id: u64, seq: u64, since: u64, text: &str| {
        c.node_mut(1).propose(Proposal {
            id: RequestId { client_id, seq },
            lamport: 0,
            since,
            sender: format!("client-{client_id}"),
            data: text.to_string().into(),
        });
        c.drain(1);
        c.deliver_all();
    };
    // Client 10 writes, then five others do: its session is the oldest.
    propose(&mut c, 10, 1, 0, "ten");
    for client in 20..25 {
        propose(&mut c, client, 1, 0, &format!("c{client}"));
    }
    c.tick_all(3);
    // Entries 2..=7; at 7 only sessions idle for 3 entries may close:
    // 10, 20 and 21 closed, 22 (at 5), 23 and 24 open.
    for node in [1, 2, 3] {
        assert_eq!(c.node(node).status().sessions, 3, "node {node}");
    }
    c.crash(3);
    c.restart(3);
    assert_eq!(c.node(3).status().sessions, 3, "restarted node 3");

    // Client 10 retries its first message (it never heard the answer):
    // refused as closed, not written again.
    c.responses.clear();
    propose(&mut c, 10, 1, 0, "ten");
    assert_eq!(error_for(&c, 10, 1), Some(ProposeError::SessionClosed));
    assert_eq!(
        c.texts(2).iter().filter(|t| *t == "ten").count(),
        1,
        "{:?}",
        c.texts(2)
    );
    // A client that learned the commit index before its first send is new.
    let commit = c.node(1).commit_index();
    propose(&mut c, 30, 1, commit, "thirty");
    assert!(ok_index(&c, 30, 1).is_some(), "{:?}", c.responses);
    // A retry within a live session is still answered from it.
    c.responses.clear();
    propose(&mut c, 30, 1, commit, "thirty");
    assert!(ok_index(&c, 30, 1).is_some());
    assert_eq!(c.texts(1).iter().filter(|t| *t == "thirty").count(), 1);
}
