//! The transport's door for outgoing Raft messages: one bounded queue per
//! peer, which that peer's link (`links.rs`, `transport.rs`) empties onto
//! its streams. The driver sends through it; it belongs to the transport.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use tracing::warn;

use crate::raft::{Envelope, NodeId};

/// Where outgoing Raft messages go: one queue per peer, added and removed
/// as the configuration changes (`links.rs`).
#[derive(Clone, Default)]
pub struct Outboxes(Arc<RwLock<HashMap<NodeId, mpsc::Sender<Envelope>>>>);

/// Why `Outboxes::try_send` dropped a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Unsent {
    /// The peer has no link (just added, or just removed).
    NoLink,
    /// Its queue is full (it is far behind or unreachable).
    Full,
}

impl Outboxes {
    /// Queues a message for its peer's link. Raft tolerates loss: a full
    /// queue means the peer is far behind or unreachable, and probing
    /// catches it up.
    pub fn send(&self, envelope: Envelope) {
        let to = envelope.to;
        match self.try_send(envelope) {
            Ok(()) => {}
            // A member just added (its link is being set up) or just removed.
            Err(Unsent::NoLink) => tracing::debug!(to, "no link to peer, dropping a message"),
            Err(Unsent::Full) => warn!("outbound queue full, dropping a message"),
        }
    }

    /// Queues `envelope` for its peer's link, without waiting.
    pub fn try_send(&self, envelope: Envelope) -> Result<(), Unsent> {
        let map = match self.0.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        let outbox = map.get(&envelope.to).ok_or(Unsent::NoLink)?;
        outbox.try_send(envelope).map_err(|_| Unsent::Full)
    }

    pub fn insert(&self, peer: NodeId, outbox: mpsc::Sender<Envelope>) {
        match self.0.write() {
            Ok(mut map) => map.insert(peer, outbox),
            Err(poisoned) => poisoned.into_inner().insert(peer, outbox),
        };
    }

    /// Removes `peer`'s outbox if it is still `outbox` (a link opened
    /// since for the same peer keeps its own).
    pub fn remove_if_same(&self, peer: NodeId, outbox: &mpsc::Sender<Envelope>) {
        let mut map = match self.0.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.get(&peer).is_some_and(|o| o.same_channel(outbox)) {
            map.remove(&peer);
        }
    }

    pub fn remove(&self, peer: NodeId) {
        match self.0.write() {
            Ok(mut map) => map.remove(&peer),
            Err(poisoned) => poisoned.into_inner().remove(&peer),
        };
    }
}
