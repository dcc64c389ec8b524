//! Live membership in the consensus core, scenario by scenario: adding,
//! promoting and removing members, the leader included, one change at a
//! time, and what a node does with configurations it receives, loses to a
//! truncation or reads back after a restart.

mod common;

use cluster_store::raft::{ChangeError, MembershipChange, Role};
use common::Cluster;

fn add(id: u64) -> MembershipChange {
    MembershipChange::AddLearner {
        id,
        address: format!("10.0.0.{id}:7000"),
    }
}

fn voters(c: &Cluster, id: u64) -> Vec<u64> {
    c.node(id).membership().voters.iter().copied().collect()
}

#[test]
fn a_node_added_as_learner_catches_up_and_once_promoted_counts_towards_quorum() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    for i in 1..=5 {
        c.propose(1, 1, i, &format!("m{i}"));
    }
    c.deliver_all();
    c.add_spare(4, 1);
    assert_eq!(c.node(4).role(), Role::Learner, "a spare does not campaign");

    c.change(1, 1, add(4));
    c.deliver_all();
    let added = c.change_result(1).expect("answered").expect("committed");
    assert_eq!(c.texts(4), c.texts(1), "the learner got the whole log");
    assert!(c.node(4).membership().is_learner(4));
    assert_eq!(
        c.node(4).membership().addresses.get(&4).map(String::as_str),
        Some("10.0.0.4:7000")
    );
    assert!(c.node(4).commit_index() >= added);

    c.change(1, 2, MembershipChange::Promote { id: 4 });
    c.deliver_all();
    c.change_result(2).expect("answered").expect("committed");
    for id in 1..=4 {
        assert_eq!(voters(&c, id), vec![1, 2, 3, 4], "node {id}");
    }
    assert_eq!(c.node(4).role(), Role::Follower, "a voter now");

    // Four voters: a quorum is three. With 2 and 3 cut off, 1 and 4 alone
    // cannot commit; healed, they can.
    c.cut.insert((1, 2));
    c.cut.insert((1, 3));
    let before = c.node(1).commit_index();
    c.propose(1, 1, 6, "needs three of four");
    c.deliver_all();
    assert_eq!(c.node(1).commit_index(), before, "1 and 4 are not a quorum");
    c.heal();
    c.tick(&[1], 3);
    assert!(c.node(1).commit_index() > before);
    assert_eq!(
        c.texts(4).last().map(String::as_str),
        Some("needs three of four")
    );
}

#[test]
fn one_change_at_a_time_and_only_once_the_leader_committed_in_its_term() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.add_spare(4, 1);
    c.add_spare(5, 1);
    c.elect_quietly(1);
    c.change(1, 1, add(4));
    assert_eq!(
        c.change_result(1),
        Some(Err(ChangeError::LeaderNotReady)),
        "a new leader first commits an entry of its own term"
    );
    c.tick(&[1], 3);
    c.deliver_all();

    c.cut.insert((1, 2));
    c.cut.insert((1, 3));
    c.change(1, 2, add(4));
    assert_eq!(c.change_result(2), None, "appended, not committed");
    assert!(c.node(1).change_in_progress());
    c.change(1, 3, add(5));
    let index = c.node(1).membership_index();
    assert_eq!(
        c.change_result(3),
        Some(Err(ChangeError::ChangeInProgress { index }))
    );
    c.heal();
    c.tick(&[1], 3);
    assert_eq!(c.change_result(2), Some(Ok(index)));
    c.change(1, 4, add(5));
    c.deliver_all();
    assert!(c.change_result(4).is_some_and(|r| r.is_ok()));

    for (ctx, change, error) in [
        (5, add(2), ChangeError::AlreadyMember(2)),
        (
            6,
            MembershipChange::Promote { id: 9 },
            ChangeError::NotMember(9),
        ),
        (
            7,
            MembershipChange::Promote { id: 1 },
            ChangeError::AlreadyVoter(1),
        ),
        (
            8,
            MembershipChange::Remove { id: 9 },
            ChangeError::NotMember(9),
        ),
    ] {
        c.change(1, ctx, change);
        assert_eq!(c.change_result(ctx), Some(Err(error)));
    }
    c.change(2, 9, add(6));
    assert_eq!(
        c.change_result(9),
        Some(Err(ChangeError::NotLeader { leader: Some(1) }))
    );
}

#[test]
fn a_learner_far_behind_is_not_promoted() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.add_spare(4, 1);
    c.change(1, 1, add(4));
    c.cut.insert((1, 4));
    c.deliver_all();
    assert!(c.change_result(1).is_some_and(|r| r.is_ok()));
    let lag = cluster_store::raft::PROMOTE_MAX_LAG + 10;
    for i in 1..=lag {
        c.propose(1, 1, i, "x");
        c.deliver_all();
    }
    c.change(1, 2, MembershipChange::Promote { id: 4 });
    match c.change_result(2) {
        Some(Err(ChangeError::NotCaughtUp { id: 4, .. })) => {}
        other => panic!("promoted a learner {lag} entries behind: {other:?}"),
    }
    c.heal();
    c.tick(&[1], 4);
    c.change(1, 3, MembershipChange::Promote { id: 4 });
    c.deliver_all();
    assert!(c.change_result(3).is_some_and(|r| r.is_ok()));
}

#[test]
fn a_removed_leader_hands_over_once_its_removal_commits() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, 1, 1, "before");
    c.deliver_all();
    let term = c.node(1).term();
    c.change(1, 1, MembershipChange::Remove { id: 1 });
    c.deliver_all();
    c.change_result(1).expect("answered").expect("committed");
    assert_eq!(c.node(1).role(), Role::Learner, "stepped down, no voter");
    let leader = [2, 3]
        .into_iter()
        .find(|id| c.node(*id).role() == Role::Leader)
        .expect("handed over without waiting for an election timeout");
    assert_eq!(c.node(leader).term(), term + 1);
    assert_eq!(voters(&c, leader), vec![2, 3]);

    // Node 1 no longer counts: with 2 and 3 apart, nothing commits even
    // though 1 would acknowledge.
    let other = if leader == 2 { 3 } else { 2 };
    c.cut.insert((leader, other));
    let before = c.node(leader).commit_index();
    c.propose(leader, 1, 2, "needs both");
    c.deliver_all();
    assert_eq!(c.node(leader).commit_index(), before);
    c.heal();
    c.tick(&[leader], 3);
    assert!(c.node(leader).commit_index() > before);
    assert_eq!(c.texts(other), vec!["before", "needs both"]);
    // The removed node is told nothing more, and never campaigns.
    c.tick_all(40);
    assert_eq!(c.node(1).role(), Role::Learner);
    assert_eq!(c.node(leader).role(), Role::Leader);
}

/// With live membership a leader may be a node this follower still takes
/// for a learner: the promotion is in entries it lacks, and only that
/// leader's appends bring them. Its votes and appends must be heard.
#[test]
fn a_leader_promoted_in_entries_a_follower_lacks_still_reaches_it() {
    let mut c = Cluster::new(&[1, 2, 3], &[4], |_| {});
    c.elect(1);
    c.propose(1, 1, 1, "a");
    c.deliver_all();
    c.cut.insert((1, 3));
    c.change(1, 1, MembershipChange::Promote { id: 4 });
    c.deliver_all();
    c.change_result(1).expect("answered").expect("committed");
    assert!(
        c.node(3).membership().is_learner(4),
        "node 3 has not seen the promotion"
    );
    c.crash(1);
    c.heal();
    c.elect(4);
    assert_eq!(c.node(4).role(), Role::Leader);
    c.propose(4, 1, 2, "from the new voter");
    c.deliver_all();
    c.tick(&[4], 3);
    assert_eq!(voters(&c, 3), vec![1, 2, 3, 4]);
    assert_eq!(c.texts(3), vec!["a", "from the new voter"]);
}

#[test]
fn configurations_survive_restarts_and_follow_truncations() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.add_spare(4, 1);
    c.elect(1);
    c.change(1, 1, add(4));
    c.deliver_all();
    c.change(1, 2, MembershipChange::Promote { id: 4 });
    c.deliver_all();
    c.crash(2);
    c.restart(2);
    assert_eq!(voters(&c, 2), vec![1, 2, 3, 4], "read back from the log");
    assert!(!c.node(2).change_in_progress());

    // A change that only the old leader holds is cut from its log by the
    // next leader, and with it goes its configuration.
    c.isolate(1);
    c.change(1, 3, MembershipChange::Remove { id: 3 });
    assert_eq!(voters(&c, 1), vec![1, 2, 4], "in force once appended");
    c.deliver_all();
    c.elect(2);
    c.propose(2, 1, 1, "new leader");
    c.deliver_all();
    c.heal();
    c.tick(&[2], 3);
    assert_eq!(c.node(1).role(), Role::Follower);
    assert_eq!(voters(&c, 1), vec![1, 2, 3, 4], "back to the committed one");
    assert_eq!(c.texts(1), vec!["new leader"]);
    assert_eq!(
        c.change_result(3),
        Some(Err(ChangeError::LeadershipLost)),
        "the deposed leader answered its change"
    );
}
