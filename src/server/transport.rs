//! Peer links over QUIC: one connection per pair of nodes (the lower id
//! dials), per direction an ordered append stream and a prioritized one for
//! heartbeats, votes and acknowledgements, reconnection with backoff.
//! A peer is whoever its certificate says, and may only speak for itself.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use quinn::{Connection, Endpoint};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::api::Api;
use super::catch_up::LeaderContact;
use super::driver::Input;
use super::links::Links;
use crate::address::Address;
use crate::client::DialError;
use crate::identity::{node_server_name, Identity};
use crate::raft::{Envelope, Message, NodeId};
use crate::tls::{peer_identity, peer_serial, protocol};
use crate::wire::{encode, read_frame_sized, PeerFrame, PeerHello, PEER_ALPN};

/// QUIC application error codes we close streams and connections with.
pub const CLOSE_UNKNOWN_PEER: u32 = 1;
pub const CLOSE_BAD_FRAME: u32 = 2;
pub const CLOSE_IMPERSONATION: u32 = 3;
pub const CLOSE_REVOKED: u32 = 4;
/// The peer left the configuration (or moved to another address).
pub const CLOSE_REMOVED: u32 = 6;
/// The peer was bootstrapped with another member list (`PeerHello`).
pub const CLOSE_MISMATCH: u32 = 7;

/// Messages queued for one peer: in its outbox, and again for its append
/// stream. Full means the peer is far behind; Raft resends.
pub const OUTBOX: usize = 256;

/// Most TLS handshakes a node runs at once.
pub const MAX_HANDSHAKES: usize = 64;

/// Serial numbers of revoked certificates, as last loaded.
pub type Revoked = Arc<HashSet<Vec<u8>>>;

/// Shared by the link tasks of one node.
#[derive(Clone)]
pub struct Peers {
    pub me: NodeId,
    /// One link per member of the configuration in force; only they may
    /// hold a peer connection.
    pub links: Links,
    /// What this node says first on every peer stream, and expects to hear.
    pub hello: PeerHello,
    pub inputs: super::driver::Inputs,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// How we dial peers; replaced when the revocation list changes.
    pub client_config: Arc<RwLock<quinn::ClientConfig>>,
    pub revoked: watch::Receiver<Revoked>,
    /// When a leader last spoke to this node (`catch_up.rs`).
    pub contact: LeaderContact,
}

/// Closes `connection` as soon as the certificate it presented is revoked,
/// so revoking takes effect on live connections, not only on new ones.
pub fn close_when_revoked(connection: Connection, revoked: watch::Receiver<Revoked>) {
    let Some(serial) = peer_serial(&connection) else {
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            () = until_revoked(&serial, revoked) => {
                warn!(remote = %connection.remote_address(), "closing a connection: its certificate was revoked");
                connection.close(CLOSE_REVOKED.into(), b"certificate revoked");
            }
            _ = connection.closed() => {}
        }
    });
}

/// Returns once the certificate with `serial` is revoked (never if the
/// node stops first).
pub async fn until_revoked(serial: &[u8], mut revoked: watch::Receiver<Revoked>) {
    loop {
        if revoked.borrow_and_update().contains(serial) {
            return;
        }
        if revoked.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Who a connection that is not a peer link speaks for: a client, or a
/// node's HTTP side reaching the cluster through us. Requests only, never
/// a Raft link. Any node of this CA may ask (a joining node asks for the
/// configuration before it is in ours), but a node outside this node's
/// configuration may only ask for the configuration and status (a removed
/// node's certificate must not keep writing).
pub enum Caller {
    /// Counted against `--max-clients`.
    Client(String),
    /// A member's (or our own) HTTP side, or an outsider
    /// (`api::OUTSIDER`), by the name the API serves it under.
    Node(String),
}

impl Caller {
    pub fn of(identity: Identity, peers: &Peers) -> Caller {
        match identity {
            Identity::Client(name) => Caller::Client(name),
            Identity::Node(id) if id == peers.me || peers.links.inbound_slot(id).is_some() => {
                Caller::Node(format!("http@node-{id}"))
            }
            Identity::Node(id) => Caller::Node(format!("{}{id}", super::api::OUTSIDER)),
        }
    }
}

/// Accepts every incoming connection and routes it by the identity in its
/// certificate and the protocol it asked for: peer links to the Raft
/// stream reader, everything else (clients, a node's HTTP side) to the API.
pub async fn accept_loop(endpoint: Endpoint, peers: Peers, api: Api) {
    // Handshakes cost CPU before we know who is calling: past this many at
    // once, new ones are refused at the door (the caller is told at once and
    // retries; peers redial within a second) rather than all timing out.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            if api.metrics.busy_connections.inc().is_multiple_of(1000) {
                warn!("refusing connections: {MAX_HANDSHAKES} handshakes already under way");
            }
            incoming.refuse();
            continue;
        };
        let peers = peers.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    warn!(%remote, "refused a connection: {error}");
                    return;
                }
            };
            drop(permit);
            close_when_revoked(connection.clone(), peers.revoked.clone());
            let identity = match peer_identity(&connection) {
                Ok(identity) => identity,
                Err(error) => {
                    warn!(%remote, "refused a connection: {error}");
                    connection.close(CLOSE_UNKNOWN_PEER.into(), b"no identity");
                    return;
                }
            };
            if protocol(&connection).as_deref() == Some(PEER_ALPN) {
                serve_peer(connection, identity, &peers).await;
            } else {
                match Caller::of(identity, &peers) {
                    Caller::Client(name) => api.serve_client(connection, name).await,
                    Caller::Node(name) => api.serve(connection, name).await,
                }
            }
        });
    }
}

/// A connection that asked to be a peer link: only another member's
/// certificate may hold one. The newest connection from a peer carries our
/// Raft messages to it (it restarted and dialed anew).
async fn serve_peer(connection: Connection, identity: Identity, peers: &Peers) {
    let remote = connection.remote_address();
    let (id, slot) = match identity {
        Identity::Node(id) => match peers.links.inbound_slot(id) {
            Some(slot) if id != peers.me => (id, slot),
            _ => {
                if peers.links.warn_refusal(id) {
                    warn!(%remote, "refused a peer link from node {id}: not a member of this node's configuration (said once a minute)");
                } else {
                    debug!(%remote, "refused a peer link from node {id}: not a member");
                }
                connection.close(
                    CLOSE_UNKNOWN_PEER.into(),
                    b"not a member of this node's configuration",
                );
                return;
            }
        },
        Identity::Client(name) => {
            warn!(%remote, "refused a peer link from client {name:?}: only nodes may open one");
            connection.close(CLOSE_UNKNOWN_PEER.into(), b"clients cannot open peer links");
            return;
        }
    };
    debug!(peer = id, %remote, "peer connected");
    slot.arrived(&connection);
    read_peer(connection.clone(), id, peers.clone()).await;
    // A short-lived second connection (a knock, or anything else with the
    // peer's certificate) must not leave the link without a way out.
    slot.ended(&connection);
}

/// Reads Raft messages from every stream `peer` opens on `connection`;
/// each must start with a `PeerHello` equal to ours.
pub async fn read_peer(connection: Connection, peer: NodeId, peers: Peers) {
    while let Ok(mut stream) = connection.accept_uni().await {
        let inputs = peers.inputs.clone();
        let metrics = peers.metrics.clone();
        let contact = peers.contact.clone();
        let ours = peers.hello.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            match read_frame_sized::<_, PeerFrame>(&mut stream).await {
                Ok(Some((PeerFrame::Hello(theirs), _))) if theirs == ours => {}
                Ok(Some((PeerFrame::Hello(theirs), _))) => {
                    let reason = mismatch(&ours, &theirs);
                    tracing::error!(peer, "refusing the peer link: {reason}");
                    connection.close(CLOSE_MISMATCH.into(), reason.as_bytes());
                    return;
                }
                Ok(None) => return,
                Ok(Some(_)) => {
                    warn!(peer, "closing a peer stream that did not start with a hello (a node of another version?)");
                    let _ = stream.stop(CLOSE_BAD_FRAME.into());
                    return;
                }
                Err(error) => {
                    warn!(peer, "closing a peer stream: {error}");
                    let _ = stream.stop(CLOSE_BAD_FRAME.into());
                    return;
                }
            }
            loop {
                match read_frame_sized::<_, PeerFrame>(&mut stream).await {
                    Ok(Some((PeerFrame::Raft(envelope), size))) => {
                        metrics.quic_bytes_received.inc_by(size as u64);
                        tracing::trace!(peer, term = envelope.term, message = ?envelope.message, "received");
                        if envelope.from != peer {
                            warn!(
                                peer,
                                claimed = envelope.from,
                                "peer spoke for another node; closing its stream"
                            );
                            let _ = stream.stop(CLOSE_IMPERSONATION.into());
                            return;
                        }
                        // Only a leader sends these.
                        if matches!(
                            envelope.message,
                            Message::Append { .. } | Message::Heartbeat { .. }
                        ) {
                            contact.heard();
                        }
                        // A full queue drops the message: Raft retries.
                        let _ = inputs.try_send(Input::Peer(envelope));
                    }
                    Ok(Some((PeerFrame::Hello(_), _))) => {}
                    Ok(None) => return,
                    Err(error) => {
                        warn!(peer, "closing a peer stream: {error}");
                        let _ = stream.stop(CLOSE_BAD_FRAME.into());
                        return;
                    }
                }
            }
        });
    }
}

/// Carries our messages to `peer`, dialing it if our id is lower, otherwise
/// waiting for it to dial us; reconnects whenever the link breaks.
pub async fn run_link(
    endpoint: Endpoint,
    peers: Peers,
    peer: NodeId,
    address: Address,
    mut outbox: mpsc::Receiver<Envelope>,
    mut inbound: watch::Receiver<Option<Connection>>,
    dialed: Arc<std::sync::Mutex<Option<Connection>>>,
) {
    let hello = match encode(&PeerFrame::Hello(peers.hello.clone())) {
        Ok(frame) => frame,
        Err(error) => {
            warn!(peer, "cannot encode the hello: {error}");
            return;
        }
    };
    // Refusals already logged for this link (each once, not at every redial).
    let mut told = (false, false);
    let dial = peers.me < peer;
    if !dial {
        knock(&endpoint, &peers, &address, peer);
    }
    let mut backoff = Duration::from_millis(50);
    loop {
        let connection = if dial {
            let config = match peers.client_config.read() {
                Ok(config) => config.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            // A dial sent before the peer listened waits for QUIC's first
            // retransmission (about a second); the peer's knock says it
            // listens now, so dial again at once.
            let dialing = tokio::select! {
                result = connect(&endpoint, config, &address, peer) => result,
                () = knocked(&mut inbound) => {
                    debug!(peer, "node {peer} knocked while we dialed it: dialing again");
                    continue;
                }
            };
            match dialing {
                Ok(connection) => {
                    info!(peer, %address, "connected to peer");
                    close_when_revoked(connection.clone(), peers.revoked.clone());
                    tokio::spawn(read_peer(connection.clone(), peer, peers.clone()));
                    if let Ok(mut slot) = dialed.lock() {
                        *slot = Some(connection.clone());
                    }
                    connection
                }
                Err(error) => {
                    debug!(peer, %address, "cannot reach peer: {error}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        } else {
            let live = inbound
                .wait_for(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
                .await;
            match live {
                Ok(connection) => match connection.as_ref() {
                    Some(connection) => connection.clone(),
                    None => continue,
                },
                Err(_) => return,
            }
        };
        backoff = Duration::from_millis(50);
        if dial {
            // Only a knock that comes after this connection counts (below).
            inbound.borrow_and_update();
        }
        // Two streams: appends on one, in order, and everything else
        // (heartbeats, votes, acknowledgements) on another that QUIC serves
        // first. A backed-up append stream (a slow start across an ocean,
        // a follower catching up) must not hold back the heartbeats that
        // keep followers from starting elections. Raft tolerates the
        // reordering between the two.
        let (Ok(mut control), Ok(bulk)) =
            (connection.open_uni().await, connection.open_uni().await)
        else {
            tokio::time::sleep(refused(peer, &connection, &mut told).unwrap_or(backoff)).await;
            continue;
        };
        let _ = control.set_priority(1);
        // Each stream starts by saying which cluster we belong to.
        if control.write_all(&hello).await.is_err() {
            tokio::time::sleep(refused(peer, &connection, &mut told).unwrap_or(backoff)).await;
            continue;
        }
        let (appends, queued) = mpsc::channel::<Vec<u8>>(OUTBOX);
        let _ = appends.try_send(hello.clone());
        let mut bulk_writer = tokio::spawn(write_frames(bulk, queued));
        // A knock being checked (`Knocked`), on the dialing side.
        let mut knocked: Option<Knocked> = None;
        loop {
            let check_by = knocked.as_ref().map(|k| k.check_by);
            tokio::select! {
                envelope = outbox.recv() => {
                    let Some(envelope) = envelope else {
                        // The peer left the links: what is queued for it
                        // still goes (the commit that tells it so, a
                        // hand-over), then the link closes (`links.rs`).
                        drop(appends);
                        let _ = tokio::time::timeout(LINGER, &mut bulk_writer).await;
                        bulk_writer.abort();
                        return;
                    };
                    let is_bulk = matches!(&envelope.message, Message::Append { .. });
                    tracing::trace!(peer, term = envelope.term, message = ?envelope.message, "sending");
                    let frame = match encode(&PeerFrame::Raft(envelope)) {
                        Ok(frame) => frame,
                        Err(error) => {
                            warn!(peer, "cannot encode a message: {error}");
                            continue;
                        }
                    };
                    let size = frame.len() as u64;
                    if is_bulk {
                        match appends.try_send(frame) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                debug!(peer, "append stream backed up, dropping an append");
                                continue;
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                debug!(peer, "peer link broke (append stream)");
                                break;
                            }
                        }
                    } else if let Err(error) = control.write_all(&frame).await {
                        debug!(peer, "peer link broke: {error}");
                        break;
                    }
                    peers.metrics.quic_bytes_sent.inc_by(size);
                }
                _ = &mut bulk_writer => break,
                _ = connection.closed() => break,
                // The peer dialed us anew (it restarted): switch at once
                // rather than writing into the old, dead connection. On the
                // dialing side, a live connection from the peer is its knock:
                // it may have restarted, or the knock may come from the
                // process ours reached (`Knocked`).
                changed = inbound.changed() => {
                    if changed.is_err() {
                        bulk_writer.abort();
                        return;
                    }
                    let newer = inbound.borrow().as_ref().is_some_and(|c| {
                        c.stable_id() != connection.stable_id()
                            && (!dial || c.close_reason().is_none())
                    });
                    if newer && !dial {
                        break;
                    }
                    if newer && knocked.is_none() {
                        let heard = connection.stats().udp_rx.datagrams;
                        // Any frame asks for an acknowledgement; a hello
                        // after the first is ignored.
                        if let Err(error) = control.write_all(&hello).await {
                            debug!(peer, "peer link broke: {error}");
                            break;
                        }
                        knocked = Some(Knocked {
                            heard,
                            check_by: tokio::time::Instant::now()
                                + 2 * connection.rtt()
                                + KNOCK_ANSWER_SLACK,
                        });
                    }
                }
                _ = tokio::time::sleep_until(check_by.unwrap_or_else(tokio::time::Instant::now)), if check_by.is_some() => {
                    let heard = knocked.take().map_or(0, |k| k.heard);
                    if connection.stats().udp_rx.datagrams == heard {
                        info!(peer, "node {peer} knocked and our connection to it went silent: it restarted, dialing again");
                        break;
                    }
                    debug!(peer, "a knock from the process our connection reached: keeping it");
                }
            }
        }
        bulk_writer.abort();
        if matches!(
            connection.close_reason(),
            Some(quinn::ConnectionError::Reset)
        ) {
            info!(peer, "node {peer} restarted (it reset our connection to its previous process): reconnecting");
        }
        if let Some(pause) = refused(peer, &connection, &mut told) {
            tokio::time::sleep(pause).await;
        }
    }
}

/// How long a link refused for a different member list waits to retry:
/// redialing will not help until an operator fixes the lists.
const MISMATCH_RETRY: Duration = Duration::from_secs(5);
/// How long a link refused by a peer that does not count us as a member
/// (yet: it may be behind on the configuration) waits to retry.
const NOT_MEMBER_RETRY: Duration = Duration::from_secs(1);

/// The reason a node gives for refusing a peer of another cluster.
fn mismatch(ours: &PeerHello, theirs: &PeerHello) -> String {
    if ours.cluster_id != theirs.cluster_id {
        return format!(
            "the peer belongs to cluster {} and this node to cluster {}",
            theirs.cluster_id, ours.cluster_id
        );
    }
    format!(
        "the nodes were bootstrapped with different member lists (the peer's configuration digest {:016x}, this node's {:016x}): every node of a new cluster must start with the same --peers/--learner, and a node added later must start with --join",
        theirs.cluster_digest, ours.cluster_digest
    )
}

/// How long to wait before redialing when `peer` refused the link: its
/// hello differed (said clearly, on this side too), or it does not count
/// this node as a member. Each is logged once per link.
fn refused(peer: NodeId, connection: &Connection, told: &mut (bool, bool)) -> Option<Duration> {
    let Some(quinn::ConnectionError::ApplicationClosed(close)) = connection.close_reason() else {
        return None;
    };
    let reason = String::from_utf8_lossy(&close.reason);
    if close.error_code == CLOSE_MISMATCH.into() {
        if !told.0 {
            tracing::error!(peer, "node {peer} refused the peer link: {reason}");
            told.0 = true;
        }
        return Some(MISMATCH_RETRY);
    }
    if close.error_code == CLOSE_UNKNOWN_PEER.into() {
        if !told.1 {
            info!(
                peer,
                "node {peer} refused the peer link: {reason} (it may not have the latest configuration yet); retrying every {NOT_MEMBER_RETRY:?}"
            );
            told.1 = true;
        }
        return Some(NOT_MEMBER_RETRY);
    }
    None
}

/// How long a closing link may take to send what was queued for it.
pub const LINGER: Duration = Duration::from_secs(1);

/// How long a knock stays open: long enough for the peer to notice it.
const KNOCK_HOLD: Duration = Duration::from_secs(1);

/// Returns when the peer holds a live connection to us that arrived since
/// `inbound` was last read: a knock, on the dialing side. Never, once the
/// link is closing.
async fn knocked(inbound: &mut watch::Receiver<Option<Connection>>) {
    loop {
        if inbound.changed().await.is_err() {
            return std::future::pending().await;
        }
        if inbound
            .borrow_and_update()
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none())
        {
            return;
        }
    }
}

/// A knock the dialing side is checking. A knock means "this process is
/// new", but it may come from the very process our connection reached: a
/// node knocks as it starts, and across an ocean its knock's handshake
/// (1.5 round trips) can finish after our dial did. Taking every knock
/// for a restart dropped a working connection at startup, and a leader
/// elected meanwhile lost its quorum waiting for the redial (500 ms round
/// trips, `survivors_a_long_round_trip_apart_elect_a_leader_that_holds`).
/// So the connection is asked instead: a frame on it is acknowledged by a
/// live process, answered with a stateless reset by a restarted one (its
/// keys survive restarts, `Credentials::endpoint_config`), and
/// met with silence by one that kept no key; silence until `check_by`
/// means dial again.
struct Knocked {
    /// Datagrams received on our connection when the knock came.
    heard: u64,
    check_by: tokio::time::Instant,
}

/// How much longer than two round trips a live peer may take to
/// acknowledge (its acknowledgement delay is at most 25 ms), or a
/// restarted one to reset (quinn resets at most one packet per 20 ms, and
/// just after a restart every peer and client sends on an old connection).
const KNOCK_ANSWER_SLACK: Duration = Duration::from_millis(200);

/// Tells `peer`, which dials us, that this process is new. It would
/// otherwise keep writing into its connection to our previous process until
/// QUIC's idle timeout (3 s), and an election meanwhile could not count on
/// us: a leader killed a second after this node restarted took 1.7 s
/// instead of 0.3 s to replace. A short connection from us makes the peer
/// check its connection at once, and dial again if ours is gone (`Knocked`).
fn knock(endpoint: &Endpoint, peers: &Peers, address: &Address, peer: NodeId) {
    let config = match peers.client_config.read() {
        Ok(config) => config.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let endpoint = endpoint.clone();
    let address = address.clone();
    tokio::spawn(async move {
        match connect(&endpoint, config, &address, peer).await {
            Ok(connection) => {
                tokio::time::sleep(KNOCK_HOLD).await;
                connection.close(0u32.into(), b"knock");
            }
            Err(error) => debug!(peer, "knock unanswered (the peer will dial us): {error}"),
        }
    });
}

/// Writes queued frames to `stream` until the queue closes or the stream
/// breaks.
async fn write_frames(mut stream: quinn::SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        if let Err(error) = stream.write_all(&frame).await {
            debug!("peer link broke (append stream): {error}");
            return;
        }
    }
}

async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    address: &Address,
    peer: NodeId,
) -> Result<Connection, DialError> {
    let resolved = address
        .resolve()
        .await
        .map_err(|error| DialError::Resolve {
            node: peer,
            address: address.clone(),
            reason: crate::identity::os_reason(&error),
        })?;
    let failed = |reason: String| DialError::Connect {
        node: peer,
        address: resolved,
        reason,
    };
    let connection = endpoint
        .connect_with(config, resolved, &node_server_name(peer))
        .map_err(|error| failed(error.to_string()))?
        .await
        .map_err(|error| failed(error.to_string()))?;
    match peer_identity(&connection) {
        Ok(Identity::Node(id)) if id == peer => Ok(connection),
        Ok(presented) => {
            connection.close(CLOSE_IMPERSONATION.into(), b"wrong node");
            Err(DialError::Impostor {
                node: peer,
                address: resolved,
                presented,
            })
        }
        Err(error) => Err(DialError::Identity {
            node: peer,
            address: resolved,
            error,
        }),
    }
}
