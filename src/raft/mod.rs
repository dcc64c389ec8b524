//! The consensus core: Raft as a deterministic, sans-IO state machine.
//!
//! Nothing in here touches a socket, a clock or a disk. A driver (the real
//! node, or the simulator in `crate::sim`) feeds it `tick`, `step`,
//! `propose` and `read_index`, then drains a [`Ready`] that says what to
//! persist, what to send, what committed and what to answer. Because every
//! input is explicit, any fault schedule can be replayed exactly.
//!
//! Beyond the Raft paper it has pre-vote and check-quorum, pipelined and
//! batched replication with fast backtracking, learners, live membership
//! changes one voter at a time, leadership
//! transfer with priorities, ReadIndex, Lamport timestamps on every entry
//! and exactly-once client proposals.

mod config;
mod election;
mod held;
mod leadership;
mod log;
mod membership;
mod message;
mod node;
mod pending;
mod progress;
mod read;
mod ready;
mod rebuild;
mod replication;
pub mod rng;
mod session;
mod types;

pub use config::{Config, ConfigError, MAX_COMMAND_BYTES};
pub use leadership::TransferError;
pub use log::{LogError, LogWrite, RaftLog};
pub use membership::{ChangeError, ChangeResponse, Membership, MembershipChange, PROMOTE_MAX_LAG};
pub use message::{AppendResult, Envelope, Message};
pub use node::{PeerStatus, RaftError, RaftNode, Restorer, Status};
pub use ready::{Fetch, Proposal, ProposeError, ProposeResponse, ReadResponse, Ready};
pub use rebuild::RebuildPlan;
pub use replication::MAX_CLIENT_CLOCK_SKEW;
pub use session::Committed;
pub use types::{
    Command, Entry, FastMap, HardState, Index, Lamport, LogPosition, NodeId, Payload, RequestId,
    Role, Term,
};
