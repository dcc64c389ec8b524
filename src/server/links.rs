//! The peer links follow the configuration in force: a member added is
//! dialed (or waited for), a member removed loses its link and its
//! connections, a member that moved is dialed at its new address. A node
//! the configuration no longer lists holds no links at all. Only a member
//! with a link may hold a peer connection (`transport::serve_peer`).
//!
//! A node that missed membership changes may not know the leader at all
//! (`catch_up.rs`): the newer view it learns by asking adds links to the
//! members only that view has, until its own log reaches that view.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::outbox::Outboxes;
use super::transport::{self, Peers, CLOSE_REMOVED, LINGER, OUTBOX};
use crate::address::Address;
use crate::raft::{Envelope, Index, Membership, NodeId};

/// The connections a peer dialed to us, and the one the link writes on:
/// the newest, and when it ends, the newest still alive. Anything holding
/// the peer's certificate can connect as the peer (a second process of
/// it, a tool run with its credentials); each connection ending hands the
/// link back to one that lives. Remembering only the connection each one
/// replaced lost the peer's real one under two overlapping connections:
/// the link then waited for a dial that never came, and queued everything
/// for the peer until its queue was full.
#[derive(Clone)]
pub struct Inbound {
    current: watch::Sender<Option<Connection>>,
    all: Arc<Mutex<Vec<Connection>>>,
}

impl Inbound {
    fn new() -> (Inbound, watch::Receiver<Option<Connection>>) {
        let (current, watched) = watch::channel(None);
        let inbound = Inbound {
            current,
            all: Arc::default(),
        };
        (inbound, watched)
    }

    fn all(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.all
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The peer dialed us anew: the link moves to this connection. The list
    /// and the link's connection change under one lock, so that two
    /// connections arriving and ending at once cannot leave the link on
    /// an older or a dead one.
    pub fn arrived(&self, connection: &Connection) {
        let mut all = self.all();
        all.push(connection.clone());
        self.current.send_replace(Some(connection.clone()));
    }

    /// A connection from the peer ended: if the link was on it (or on
    /// another that has closed), it moves to the newest one still alive
    /// (with none, it waits for a dial).
    pub fn ended(&self, connection: &Connection) {
        let mut all = self.all();
        all.retain(|c| c.stable_id() != connection.stable_id() && c.close_reason().is_none());
        let alive = all.last().cloned();
        self.current.send_if_modified(|current| {
            let stale = current.as_ref().is_some_and(|c| {
                c.stable_id() == connection.stable_id() || c.close_reason().is_some()
            });
            match alive {
                Some(alive) if stale => {
                    *current = Some(alive);
                    true
                }
                _ => false,
            }
        });
    }

    /// Forgets every connection, handing them back to be closed.
    fn take_all(&self) -> Vec<Connection> {
        self.current.send_replace(None);
        std::mem::take(&mut *self.all())
    }
}

/// One peer's link: the task carrying our messages, and the connections
/// to close when the peer leaves.
struct Link {
    address: Address,
    /// The connections the peer dialed to us.
    inbound: Inbound,
    /// The connection we dialed to it.
    dialed: Arc<Mutex<Option<Connection>>>,
    task: JoinHandle<()>,
    outbox: mpsc::Sender<Envelope>,
}

impl Link {
    /// Closes the link once what was queued for the peer has had `LINGER`
    /// to leave. Its outbox stays open meanwhile: the ready that commits a
    /// removal also carries the removed node's last messages (the commit
    /// index, a removed leader's `TimeoutNow`), and the driver sends them
    /// just after the links hear of the change.
    fn close(self, reason: &'static str, peer: NodeId, outboxes: Outboxes) {
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            outboxes.remove_if_same(peer, &self.outbox);
            self.task.abort();
            let dialed = self.dialed.lock().ok().and_then(|mut slot| slot.take());
            let inbound = self.inbound.take_all();
            for connection in dialed.into_iter().chain(inbound) {
                connection.close(CLOSE_REMOVED.into(), reason.as_bytes());
            }
        });
    }
}

/// What the links follow, as the driver last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// The configuration in force in the log, and its index.
    pub index: Index,
    pub membership: Membership,
    /// The latest committed configuration. Links are kept to its members
    /// too until a change removing them commits: a leader removing itself
    /// must replicate the removal, a follower whose removal may still be
    /// cut off stays in touch, and a removed node is told the removal
    /// committed.
    pub committed: Membership,
}

/// The links of one node, by peer.
#[derive(Clone, Default)]
pub struct Links {
    links: Arc<Mutex<BTreeMap<NodeId, Link>>>,
    /// When a refused node was last logged at warning level, by id.
    refused: Arc<Mutex<BTreeMap<NodeId, Instant>>>,
}

/// A node refused a peer link is logged as a warning at most this often:
/// a removed node that has not heard so keeps dialing every second.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);

impl Links {
    /// Ends every link at once (the node stops).
    pub fn abort_all(&self) {
        let links = match self.links.lock() {
            Ok(mut links) => std::mem::take(&mut *links),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for link in links.into_values() {
            link.task.abort();
        }
    }

    /// Where a connection `peer` dials to us goes, if `peer` is a member.
    pub fn inbound_slot(&self, peer: NodeId) -> Option<Inbound> {
        let links = self.links.lock().ok()?;
        links.get(&peer).map(|link| link.inbound.clone())
    }

    /// Whether refusing `peer` now deserves a warning (not one per redial).
    pub fn warn_refusal(&self, peer: NodeId) -> bool {
        let Ok(mut refused) = self.refused.lock() else {
            return true;
        };
        let now = Instant::now();
        match refused.get(&peer) {
            Some(last) if now.duration_since(*last) < REFUSAL_WARN_EVERY => false,
            _ => {
                refused.insert(peer, now);
                true
            }
        }
    }

    /// Makes the links match `membership`: one per other member, at its
    /// address; none at all if this node is not a member. `learned`: a
    /// newer configuration heard from another node (`catch_up.rs`), whose
    /// members are linked too.
    pub fn follow(
        &self,
        membership: &Membership,
        committed: &Membership,
        learned: Option<&Membership>,
        endpoint: &Endpoint,
        peers: &Peers,
        outboxes: &Outboxes,
    ) {
        let me = peers.me;
        let wanted = links_with_learned(me, membership, committed, learned);
        let committed_member = committed.contains(me);
        let mut links = match self.links.lock() {
            Ok(links) => links,
            Err(poisoned) => poisoned.into_inner(),
        };
        let stale: Vec<NodeId> = links
            .iter()
            .filter(|(id, link)| wanted.get(id) != Some(&link.address))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let Some(link) = links.remove(&id) else {
                continue;
            };
            let reason = match wanted.get(&id) {
                Some(address) => {
                    info!(peer = id, from = %link.address, to = %address, "node {id} moved: closing its link to open one at the new address");
                    "moved to another address"
                }
                None if membership.contains(me) || committed_member => {
                    info!(
                        peer = id,
                        "node {id} left the configuration: closing its link"
                    );
                    "removed from the cluster's configuration"
                }
                None => {
                    info!(
                        peer = id,
                        "this node is no longer a member: closing its link to node {id}"
                    );
                    "the closing node was removed from the cluster's configuration"
                }
            };
            link.close(reason, id, outboxes.clone());
        }
        for (id, address) in wanted {
            if links.contains_key(&id) {
                continue;
            }
            info!(peer = id, %address, "opening a link to node {id}");
            let (outbox, queued) = mpsc::channel(OUTBOX);
            let (inbound, watched) = Inbound::new();
            let dialed = Arc::new(Mutex::new(None));
            let task = tokio::spawn(transport::run_link(
                endpoint.clone(),
                peers.clone(),
                id,
                address.clone(),
                queued,
                watched,
                dialed.clone(),
            ));
            outboxes.insert(id, outbox.clone());
            links.insert(
                id,
                Link {
                    address,
                    inbound,
                    dialed,
                    task,
                    outbox,
                },
            );
        }
    }
}

/// The links `membership` calls for: every other member at its address,
/// or none once `me` is out of it and of the committed configuration (a
/// removed node holds no links).
pub fn wanted_links(
    me: NodeId,
    membership: &Membership,
    committed: &Membership,
) -> BTreeMap<NodeId, Address> {
    if !membership.contains(me) && !committed.contains(me) {
        return BTreeMap::new();
    }
    let ids: std::collections::BTreeSet<NodeId> = membership
        .members()
        .chain(committed.members())
        .filter(|id| *id != me)
        .collect();
    ids.into_iter()
        .filter_map(|id| {
            let address = membership
                .addresses
                .get(&id)
                .or_else(|| committed.addresses.get(&id));
            match address.map(|a| Address::parse(a)) {
                Some(Ok(address)) => Some((id, address)),
                Some(Err(error)) => {
                    warn!(
                        peer = id,
                        "no link to node {id}: its address is unusable: {error}"
                    );
                    None
                }
                None => {
                    warn!(
                        peer = id,
                        "no link to node {id}: the configuration gives no address"
                    );
                    None
                }
            }
        })
        .collect()
}

/// The links for the configuration in force plus, when this node has
/// learned a newer one it belongs to (`learned`, already checked to be
/// newer), that one's members too: a lagging node must reach a leader its
/// own log has not heard of. The newer view's address wins for a member
/// both list (it may have moved since).
pub fn links_with_learned(
    me: NodeId,
    membership: &Membership,
    committed: &Membership,
    learned: Option<&Membership>,
) -> BTreeMap<NodeId, Address> {
    let mut wanted = wanted_links(me, membership, committed);
    if let Some(learned) = learned.filter(|learned| learned.contains(me)) {
        wanted.extend(wanted_links(me, learned, learned));
    }
    wanted
}

/// The configuration the links follow: the log's, unless the stored
/// bootstrap is newer. A node that joined at index N replays the log from
/// the start, and the configurations before N (without it, and maybe
/// without the leader) must not cut it off while it catches up.
pub fn in_force<'a>(
    bootstrap: &'a (Index, Membership),
    log: &'a (Index, Membership),
) -> &'a Membership {
    in_force_at(bootstrap, log).1
}

/// `in_force`, with the index of the configuration it picks.
pub fn in_force_at<'a>(
    bootstrap: &'a (Index, Membership),
    log: &'a (Index, Membership),
) -> (Index, &'a Membership) {
    if log.0 >= bootstrap.0 {
        (log.0, &log.1)
    } else {
        (bootstrap.0, &bootstrap.1)
    }
}

/// A configuration learned from another node, newer than this node's log
/// had when it was learned (`catch_up.rs`); `None` until then.
pub type Learned = Option<(Index, Membership)>;

/// The learned view, if it is still newer than the configuration in force
/// at `index`: once the log reaches it, the log alone decides again.
pub fn still_newer(learned: &Learned, index: Index) -> Option<&Membership> {
    learned
        .as_ref()
        .filter(|(at, _)| *at > index)
        .map(|(_, membership)| membership)
}

/// Keeps the links in line with the configuration in force (and a newer
/// one learned by asking, while the log has not reached it) until the
/// driver stops.
pub async fn follow_membership(
    links: Links,
    bootstrap: (Index, Membership),
    mut view: watch::Receiver<View>,
    mut learned: watch::Receiver<Learned>,
    endpoint: Endpoint,
    peers: Peers,
    outboxes: Outboxes,
) {
    // Whether the catch-up task still runs (it lives as long as the node).
    let mut learning = true;
    loop {
        let current = view.borrow_and_update().clone();
        let log = (current.index, current.membership);
        let (index, membership) = in_force_at(&bootstrap, &log);
        let newer = learned.borrow_and_update().clone();
        links.follow(
            membership,
            &current.committed,
            still_newer(&newer, index),
            &endpoint,
            &peers,
            &outboxes,
        );
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            changed = learned.changed(), if learning => learning = changed.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_go_to_other_members_and_none_once_removed() {
        let membership = Membership {
            voters: [1, 2, 3].into(),
            learners: [4].into(),
            addresses: (1..=4).map(|id| (id, format!("h{id}:7000"))).collect(),
        };
        let wanted = wanted_links(2, &membership, &membership);
        assert_eq!(wanted.keys().copied().collect::<Vec<_>>(), vec![1, 3, 4]);
        assert_eq!(wanted[&4].to_string(), "h4:7000");
        assert!(wanted_links(9, &membership, &Membership::default()).is_empty());
        // A leader removing itself keeps replicating until it commits.
        let mut removing_9 = membership.clone();
        removing_9.voters.insert(9);
        assert_eq!(
            wanted_links(9, &membership, &removing_9).len(),
            4,
            "a node whose removal is not committed keeps its links"
        );
        let mut removing_2 = membership.clone();
        removing_2.voters.remove(&2);
        removing_2.addresses.remove(&2);
        assert!(
            wanted_links(1, &removing_2, &membership).contains_key(&2),
            "links to a member being removed stay until the removal commits"
        );
    }

    #[test]
    fn a_joined_node_keeps_its_bootstrap_until_the_log_passes_it() {
        let old = Membership {
            voters: [1, 2, 3].into(),
            ..Default::default()
        };
        let joined = Membership {
            voters: [1, 2, 3].into(),
            learners: [4].into(),
            ..Default::default()
        };
        let bootstrap = (57, joined.clone());
        assert_eq!(in_force(&bootstrap, &(20, old.clone())), &joined);
        assert_eq!(in_force(&bootstrap, &(57, joined.clone())), &joined);
        assert_eq!(in_force(&bootstrap, &(80, old.clone())), &old);
        assert_eq!(
            in_force(&(0, joined.clone()), &(0, joined.clone())),
            &joined
        );
    }
}
