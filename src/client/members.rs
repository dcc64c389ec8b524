//! Changing the cluster's members through the leader, one change at a
//! time: a change's outcome (`ChangeReport`), and adding a node, which is
//! two changes with a wait between them (`Client::add_member`).

use std::time::{Duration, Instant};

use crate::raft::{ChangeError, Index, MembershipChange, NodeId};

use super::{Client, ClientError};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How long a change waits for a leader that is not ready, or busy with
/// another change.
pub const CHANGE_PATIENCE: Duration = Duration::from_secs(30);

/// What became of a membership change: the leader that answered, and the
/// index the change committed at or why it was refused.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeReport {
    pub change: MembershipChange,
    pub leader: NodeId,
    pub outcome: Result<Index, ChangeError>,
}

impl ChangeReport {
    /// The index the change committed at, or its refusal as an error that
    /// names the change (and, when the outcome is unknown, what to check).
    pub fn into_result(self) -> Result<Index> {
        let ChangeReport {
            change,
            leader,
            outcome,
        } = self;
        match outcome {
            Ok(index) => Ok(index),
            Err(ChangeError::LeadershipLost) => Err(ClientError::ChangeUnknown { change, leader }),
            Err(error) => Err(ClientError::ChangeRefused {
                change,
                leader,
                error,
            }),
        }
    }
}

/// What `Client::add_member` reports on its way.
#[derive(Debug)]
pub enum AddProgress<'a> {
    /// The node was added as a learner; its promotion follows.
    Added(&'a ChangeReport),
    /// It was a learner at that address already (a retried add that had
    /// committed); its promotion follows.
    AlreadyLearner,
    /// Waiting for it to catch up before promoting it: its lag behind the
    /// leader, or `None` while it does not answer the leader. Said again
    /// only when it changes.
    Waiting(Option<Index>),
}

/// How `Client::add_member` ended.
#[derive(Debug)]
pub enum Added {
    /// The last change made or tried: the add (as a learner, or refused)
    /// or the promotion.
    Change(ChangeReport),
    /// The node was a member at that address already, in the role asked
    /// for (a retried add that had committed).
    Already(AlreadyMember),
}

/// See `Added::Already`.
#[derive(Debug)]
pub struct AlreadyMember {
    /// The add that found it there.
    pub change: MembershipChange,
    pub id: NodeId,
    pub address: String,
    /// "voter" or "learner".
    pub role: &'static str,
    /// The index of the configuration in force.
    pub index: Index,
    pub leader: NodeId,
}

impl Client {
    /// Asks for one configuration change (see `change_membership`).
    pub async fn change(&self, change: MembershipChange) -> Result<ChangeReport> {
        let (leader, outcome) = self.change_membership(&change, CHANGE_PATIENCE).await?;
        Ok(ChangeReport {
            change,
            leader,
            outcome,
        })
    }

    /// Adds node `id`, listening at `address`, as a learner, then (unless
    /// `learner`) promotes it to voter once it has caught up, waiting at
    /// most `timeout` for that. A retry after an add that committed goes on
    /// from where it stands.
    pub async fn add_member(
        &self,
        id: NodeId,
        address: &str,
        learner: bool,
        timeout: Duration,
        mut progress: impl FnMut(AddProgress),
    ) -> Result<Added> {
        let add = self
            .change(MembershipChange::AddLearner {
                id,
                address: address.to_string(),
            })
            .await?;
        match &add.outcome {
            Ok(_) if learner => return Ok(Added::Change(add)),
            Ok(_) => progress(AddProgress::Added(&add)),
            Err(ChangeError::AlreadyMember(_)) => {
                let view = self.members().await?;
                let membership = &view.status.membership;
                if membership.addresses.get(&id).map(String::as_str) != Some(address) {
                    return Ok(Added::Change(add));
                }
                if learner || membership.is_voter(id) {
                    return Ok(Added::Already(AlreadyMember {
                        role: if membership.is_voter(id) {
                            "voter"
                        } else {
                            "learner"
                        },
                        index: view.status.membership_index,
                        leader: add.leader,
                        change: add.change,
                        id,
                        address: address.to_string(),
                    }));
                }
                progress(AddProgress::AlreadyLearner);
            }
            Err(_) => return Ok(Added::Change(add)),
        }
        let deadline = Instant::now() + timeout;
        let mut told: Option<Option<Index>> = None;
        loop {
            let promote = self.change(MembershipChange::Promote { id }).await?;
            let lag = match &promote.outcome {
                Err(ChangeError::NotCaughtUp {
                    match_index,
                    last_index,
                    ..
                }) => Some(last_index.saturating_sub(*match_index)),
                Err(ChangeError::NotResponding(_)) => None,
                _ => return Ok(Added::Change(promote)),
            };
            if Instant::now() >= deadline {
                return Err(ClientError::NotCaughtUp {
                    id,
                    after: timeout,
                    last: promote
                        .outcome
                        .err()
                        .map_or(String::new(), |e| e.to_string()),
                });
            }
            if told != Some(lag) {
                progress(AddProgress::Waiting(lag));
                told = Some(lag);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
