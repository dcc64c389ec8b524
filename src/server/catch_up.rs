//! A node that missed membership changes (down or cut off through two or
//! more of them) may know neither the new members nor their addresses.
//! Links follow the node's own configuration and the lower id dials, so if
//! the leader is one of those new members nobody dials: the node would
//! never get the log again. Here a node that has heard no leader for a
//! while asks the members it knows for the cluster's configuration (as
//! `--join` does, over the client protocol) and, if that one is newer,
//! links its members too (`links::links_with_learned`). Nothing learned
//! this way reaches Raft: the log stays the truth, and the core learns the
//! configuration from the leader's appends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::driver::Input;
use super::links::{self, Learned, View};
use crate::address::Address;
use crate::raft::{Index, Membership, NodeId};
use crate::tls::Credentials;

/// When this node last heard a leader's append or heartbeat, from any
/// peer (set by the peer stream reader, `transport::read_peer`).
#[derive(Clone, Debug)]
pub struct LeaderContact {
    epoch: Instant,
    /// Milliseconds after `epoch`; 0: never.
    last_ms: Arc<AtomicU64>,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact {
            epoch: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl LeaderContact {
    /// A leader spoke to this node just now.
    pub fn heard(&self) {
        let ms = self.epoch.elapsed().as_millis().max(1) as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When a leader last spoke to this node, if ever.
    pub fn last(&self) -> Option<Instant> {
        match self.last_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }
}

/// The longest pause between two questions while no leader is heard.
const MOST_PAUSE: Duration = Duration::from_secs(30);

/// When to ask: after `wait` without a leader, then again after a pause
/// that doubles (up to `MOST_PAUSE`) while no leader is heard.
#[derive(Debug)]
pub struct Patience {
    wait: Duration,
    pause: Duration,
    leaderless_since: Option<Instant>,
    next_ask: Option<Instant>,
}

impl Patience {
    pub fn new(wait: Duration) -> Self {
        Patience {
            wait,
            pause: wait,
            leaderless_since: None,
            next_ask: None,
        }
    }

    /// Looks at the node at `now`; whether it is time to ask.
    pub fn ask_now(&mut self, now: Instant, leader_heard: bool) -> bool {
        if leader_heard {
            self.leaderless_since = None;
            self.next_ask = None;
            self.pause = self.wait;
            return false;
        }
        let since = *self.leaderless_since.get_or_insert(now);
        if now.duration_since(since) < self.wait {
            return false;
        }
        if self.next_ask.is_some_and(|next| now < next) {
            return false;
        }
        self.next_ask = Some(now + self.pause);
        self.pause = (self.pause * 2).min(MOST_PAUSE.max(self.wait));
        true
    }
}

/// What to make of the configuration another node reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than anything this node knows, and it lists this node: link
    /// its members.
    Learn,
    /// No newer than this node's own (or an earlier answer): nothing to do.
    Known,
    /// Newer, but without this node: it was removed while away. Nothing to
    /// link (its members would refuse it).
    Removed,
}

/// Which view wins: the reported one, at `told_index`, only if it is newer
/// than `known` (the configuration in force here, or one learned before)
/// and still has `me`.
pub fn judge(me: NodeId, known: Index, told_index: Index, told: &Membership) -> Verdict {
    if told_index <= known {
        Verdict::Known
    } else if told.contains(me) {
        Verdict::Learn
    } else {
        Verdict::Removed
    }
}

/// Whether a learned view (at index `at`) has served its purpose: once
/// this node's committed log reaches `at`, its own configuration is at
/// least as new. A view that was not committed when it was told (and was
/// then cut off) is forgotten the same way, rather than linked for ever.
pub fn outdated(learned: &Learned, commit: Index) -> bool {
    learned.as_ref().is_some_and(|(at, _)| commit >= *at)
}

/// The nodes to ask: every other member this node knows of, in its
/// configuration or in a newer one it learned, at a usable address (the
/// newer view's address wins).
pub fn whom_to_ask(
    me: NodeId,
    in_force: &Membership,
    learned: Option<&Membership>,
) -> BTreeMap<NodeId, Address> {
    in_force
        .addresses
        .iter()
        .chain(learned.into_iter().flat_map(|m| m.addresses.iter()))
        .filter(|(id, _)| **id != me)
        .filter_map(|(id, address)| Some((*id, Address::parse(address).ok()?)))
        .collect()
}

/// Everything the catch-up task needs.
pub struct CatchUp {
    pub me: NodeId,
    pub bootstrap: (Index, Membership),
    pub view: watch::Receiver<View>,
    pub learned: watch::Sender<Learned>,
    pub contact: LeaderContact,
    pub inputs: super::driver::Inputs,
    /// This node's own credentials (a node certificate may ask for the
    /// configuration); its revocation list is re-read before each question.
    pub creds: Credentials,
    /// How long without a leader before asking: a few election timeouts.
    pub patience: Duration,
}

/// How often the task looks whether a leader was heard.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Runs until the driver stops: asks the cluster for its configuration
/// whenever no leader has been heard for `patience`.
pub async fn run(mut task: CatchUp) {
    let mut patience = Patience::new(task.patience);
    // The index of the last view without this node that was reported, so
    // that it is said once.
    let mut removed_told: Option<Index> = None;
    let mut interval = tokio::time::interval(LOOK_EVERY.min(task.patience));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let (reply, answer) = oneshot::channel();
        match task.inputs.try_send(Input::Status(reply)) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
            // Busy: the node is doing work, look again later.
            Err(std::sync::mpsc::TrySendError::Full(_)) => continue,
        }
        let Ok(status) = answer.await else {
            return;
        };
        if outdated(&task.learned.borrow(), status.commit) {
            debug!(
                commit = status.commit,
                "the log has reached the configuration learned by asking: the links follow the log alone"
            );
            task.learned.send_replace(None);
        }
        let now = Instant::now();
        // Silence for half the patience counts as no leader, so the first
        // question comes at most one and a half patiences after the last
        // word from a leader.
        let heard = status.leader == Some(task.me)
            || task
                .contact
                .last()
                .is_some_and(|last| now.duration_since(last) < task.patience / 2);
        if !patience.ask_now(now, heard) {
            continue;
        }
        let current = task.view.borrow().clone();
        let log = (current.index, current.membership);
        let (index, in_force) = links::in_force_at(&task.bootstrap, &log);
        let learned = task.learned.borrow().clone();
        let newer = links::still_newer(&learned, index);
        let known = learned.as_ref().map_or(index, |(at, _)| (*at).max(index));
        let seeds = whom_to_ask(task.me, in_force, newer);
        if seeds.is_empty() {
            continue;
        }
        debug!(
            asked = ?seeds.keys().collect::<Vec<_>>(),
            "no leader heard for a while: asking the members this node knows for the cluster's configuration"
        );
        // A problem with the list is the revocation watcher's to report.
        let _ = task.creds.reload_crls();
        let client = match crate::client::Client::new(seeds, &task.creds) {
            Ok(client) => client,
            Err(error) => {
                warn!("cannot ask the cluster for its configuration: {error}");
                continue;
            }
        };
        let view = match client.members().await {
            Ok(view) => view,
            Err(error) => {
                debug!("no member told the cluster's configuration: {error}");
                continue;
            }
        };
        let (told_index, told) = (view.status.membership_index, view.status.membership);
        match judge(task.me, known, told_index, &told) {
            Verdict::Known => {}
            Verdict::Learn => {
                let ids: Vec<NodeId> = told.members().collect();
                info!(
                    from = view.status.id,
                    index = told_index,
                    configuration = %told,
                    "learned members {ids:?} at index {told_index} from node {}: dialing them to catch up",
                    view.status.id
                );
                task.learned.send_replace(Some((told_index, told)));
            }
            Verdict::Removed => {
                if removed_told != Some(told_index) {
                    warn!(
                        from = view.status.id,
                        index = told_index,
                        configuration = %told,
                        "node {} reports a configuration at index {told_index} without this node: it was removed while away and takes no part until it is added again",
                        view.status.id
                    );
                    removed_told = Some(told_index);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::for_tests(voters, learners)
    }

    #[test]
    fn only_a_newer_view_that_lists_this_node_wins() {
        let newer = members(&[1, 2, 3, 4], &[]);
        assert_eq!(judge(1, 10, 20, &newer), Verdict::Learn);
        assert_eq!(judge(1, 20, 20, &newer), Verdict::Known);
        assert_eq!(judge(1, 30, 20, &newer), Verdict::Known);
        assert_eq!(
            judge(1, 10, 20, &members(&[2, 3, 4], &[])),
            Verdict::Removed
        );
        // A learner counts as listed.
        assert_eq!(judge(5, 10, 20, &members(&[2, 3], &[5])), Verdict::Learn);
    }

    #[test]
    fn a_lagging_node_links_the_leader_it_never_heard_of() {
        // Node 1 missed the addition and promotion of 4 (now leading).
        let own = members(&[1, 2, 3], &[]);
        let told = members(&[1, 2, 3, 4], &[]);
        let wanted = links::links_with_learned(1, &own, &own, Some(&told));
        assert_eq!(wanted.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        // Node 5 (higher id than the leader 4, which dials it) must hold a
        // link to 4 to accept its connection.
        let told = members(&[2, 3, 4], &[5]);
        let own = members(&[1, 2, 3], &[5]);
        let wanted = links::links_with_learned(5, &own, &own, Some(&told));
        assert_eq!(wanted.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        // A view without this node adds nothing.
        let wanted = links::links_with_learned(1, &own, &own, Some(&told));
        assert_eq!(wanted.keys().copied().collect::<Vec<_>>(), vec![2, 3, 5]);
        // A removed node re-added while away gets links again.
        let gone = members(&[2, 3], &[5]);
        let wanted = links::links_with_learned(1, &gone, &gone, Some(&members(&[1, 4], &[])));
        assert_eq!(wanted.keys().copied().collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn the_newer_view_gives_a_moved_member_its_address() {
        let own = members(&[1, 2, 3], &[]);
        let mut told = own.clone();
        told.addresses.insert(2, "moved:7000".into());
        let wanted = links::links_with_learned(1, &own, &own, Some(&told));
        assert_eq!(wanted[&2].to_string(), "moved:7000");
        let asked = whom_to_ask(1, &own, Some(&told));
        assert_eq!(asked.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(asked[&2].to_string(), "moved:7000");
    }

    #[test]
    fn the_log_takes_over_once_it_reaches_the_learned_view() {
        let learned: Learned = Some((20, members(&[1, 4], &[])));
        assert!(links::still_newer(&learned, 10).is_some());
        assert!(links::still_newer(&learned, 20).is_none());
        assert!(links::still_newer(&None, 0).is_none());
        // Forgotten once committed that far (also if it was cut off).
        assert!(!outdated(&learned, 19));
        assert!(outdated(&learned, 20));
        assert!(!outdated(&None, 100));
    }

    #[test]
    fn ask_after_a_while_without_leader_then_less_and_less_often() {
        let wait = Duration::from_secs(1);
        let mut patience = Patience::new(wait);
        let t0 = Instant::now();
        assert!(!patience.ask_now(t0, false));
        assert!(!patience.ask_now(t0 + Duration::from_millis(900), false));
        assert!(patience.ask_now(t0 + wait, false));
        // The next question after one pause, the one after two.
        assert!(!patience.ask_now(t0 + Duration::from_millis(1500), false));
        assert!(patience.ask_now(t0 + 2 * wait, false));
        assert!(!patience.ask_now(t0 + Duration::from_millis(3500), false));
        assert!(patience.ask_now(t0 + 4 * wait, false));
        // A leader heard starts over.
        assert!(!patience.ask_now(t0 + 5 * wait, true));
        assert!(!patience.ask_now(t0 + 5 * wait, false));
        assert!(patience.ask_now(t0 + 6 * wait, false));
        assert!(!patience.ask_now(t0 + Duration::from_millis(6500), false));
        assert!(patience.ask_now(t0 + 7 * wait, false));
    }
}
