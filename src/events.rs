//! What a node announces as it happens: leader changes and clock updates,
//! for the dashboard's live feed. Commits reach the feed through a watch
//! (`client::LogStream`), which never drops one.

use serde::Serialize;

use crate::raft::{Lamport, NodeId, Term};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    Leader { leader: Option<NodeId>, term: Term },
    Clock { lamport: Lamport },
}

impl NodeEvent {
    pub fn name(&self) -> &'static str {
        match self {
            NodeEvent::Leader { .. } => "leader",
            NodeEvent::Clock { .. } => "clock",
        }
    }
}
