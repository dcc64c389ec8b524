//! What a node announces as it happens: commits, leader changes and clock
//! updates, for the dashboard's live feed.

use serde::Serialize;

use crate::raft::{Index, Lamport, NodeId, Term};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    Commit {
        index: Index,
        term: Term,
        lamport: Lamport,
        sender: String,
        text: String,
    },
    Leader {
        leader: Option<NodeId>,
        term: Term,
    },
    Clock {
        lamport: Lamport,
    },
}

impl NodeEvent {
    pub fn name(&self) -> &'static str {
        match self {
            NodeEvent::Commit { .. } => "commit",
            NodeEvent::Leader { .. } => "leader",
            NodeEvent::Clock { .. } => "clock",
        }
    }
}
