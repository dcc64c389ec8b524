//! Which configuration a node starts from. The command line's
//! `--peers`/`--learner` only bootstrap a new cluster: they are stored on
//! a data directory's first start, and from then on the stored one (and
//! after it the log) is the truth. A joining node (`--join`) asks the
//! cluster instead and stores what it learns.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::info;

use crate::address::Address;
use crate::raft::{Membership, NodeId};
use crate::storage::StoredBootstrap;
use crate::tls::Credentials;

/// Where the bootstrap configuration comes from on this start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Recorded on an earlier start: used whatever the command line says.
    Stored(StoredBootstrap),
    /// The command line's, to be recorded now. `upgrade`: the data
    /// directory predates stored configurations and already holds a log.
    Record {
        bootstrap: StoredBootstrap,
        upgrade: bool,
    },
    /// Ask these nodes for the cluster's configuration, then record it.
    Join(BTreeMap<NodeId, Address>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootstrapError {
    #[error("node {0} is listed neither in --peers nor in --learner")]
    NotMember(NodeId),
    #[error("this data directory holds no configuration yet: give --peers (a new cluster) or --join (a node added with `node member add`)")]
    Nothing,
    #[error("node {id} is not a member of the cluster (its configuration: {membership}); add it first with `node member add {id} --address HOST:PORT`, then start it again with --join")]
    NotInCluster { id: NodeId, membership: String },
    #[error("--join: no node told the cluster's configuration: {0}")]
    Unreachable(String),
}

/// The digest peers compare on connect: of the voter ids only. Voters
/// decide quorums, so two nodes bootstrapped with different voters must
/// not talk; addresses may differ (nodes reach each other by different
/// names), and so may the learners a node was started with (before
/// membership lived in the log, a learner often listed only itself, and
/// such data directories are upgraded with their own lists).
pub fn cluster_digest(membership: &Membership) -> u64 {
    Membership {
        voters: membership.voters.clone(),
        learners: Default::default(),
        addresses: BTreeMap::new(),
    }
    .digest()
}

/// The configuration `--peers` and `--learner` describe.
pub fn from_command_line(
    peers: &BTreeMap<NodeId, Address>,
    learners: &BTreeMap<NodeId, Address>,
) -> Membership {
    Membership {
        voters: peers.keys().copied().collect(),
        learners: learners.keys().copied().collect(),
        addresses: peers
            .iter()
            .chain(learners)
            .map(|(id, address)| (*id, address.to_string()))
            .collect(),
    }
}

/// Decides where this start's configuration comes from. `fresh`: the
/// data directory holds no log and no term yet.
pub fn plan(
    me: NodeId,
    stored: Option<StoredBootstrap>,
    command_line: Option<Membership>,
    join: Option<BTreeMap<NodeId, Address>>,
    fresh: bool,
) -> Result<Plan, BootstrapError> {
    if let Some(stored) = stored {
        return Ok(Plan::Stored(stored));
    }
    match (command_line, join) {
        (_, Some(join)) if fresh => Ok(Plan::Join(join)),
        (Some(membership), _) => {
            if !membership.contains(me) {
                return Err(BootstrapError::NotMember(me));
            }
            Ok(Plan::Record {
                bootstrap: StoredBootstrap {
                    cluster_digest: cluster_digest(&membership),
                    membership,
                    index: 0,
                },
                upgrade: !fresh,
            })
        }
        // A rebuilt replica of a node that had joined.
        (None, Some(join)) => Ok(Plan::Join(join)),
        (None, None) => Err(BootstrapError::Nothing),
    }
}

/// How long `--join` keeps asking before it gives up.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// Asks the cluster (through any of `seeds`) for its configuration as the
/// leader has committed it, and checks that it includes `me`.
pub async fn join(
    me: NodeId,
    seeds: BTreeMap<NodeId, Address>,
    creds: &Credentials,
) -> Result<StoredBootstrap, BootstrapError> {
    let client = crate::client::Client::new(seeds, creds)
        .map_err(|e| BootstrapError::Unreachable(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let view = loop {
        match client.members().await {
            // A change not yet committed may still be cut off: wait for it
            // (one change at a time, so it takes a round trip or two).
            Ok(view) if view.status.change_in_progress => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(BootstrapError::Unreachable(
                        "a configuration change stayed in progress".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Only the leader's word that this node is not a member is
            // final: another node may not have the change yet.
            Ok(view)
                if !view.status.membership.contains(me)
                    && view.status.leader != Some(view.status.id)
                    && tokio::time::Instant::now() < deadline =>
            {
                info!(
                    from = view.status.id,
                    "--join: node {} does not list this node (yet); asking again", view.status.id
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(view) => break view,
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(BootstrapError::Unreachable(error.to_string()))
            }
            Err(error) => {
                info!("--join: no answer yet ({error}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    if !view.status.membership.contains(me) {
        return Err(BootstrapError::NotInCluster {
            id: me,
            membership: view.status.membership.to_string(),
        });
    }
    info!(
        node = me,
        from = view.status.id,
        configuration = %view.status.membership,
        index = view.status.membership_index,
        "joined: learned the cluster's configuration"
    );
    Ok(StoredBootstrap {
        membership: view.status.membership,
        index: view.status.membership_index,
        cluster_digest: view.cluster_digest,
    })
}

/// The warning for a command line that no longer describes the cluster,
/// or `None` when it agrees with the configuration in force.
pub fn command_line_differs(command_line: &Membership, in_force: &Membership) -> Option<String> {
    let same_ids =
        command_line.voters == in_force.voters && command_line.learners == in_force.learners;
    (!same_ids).then(|| {
        format!(
            "the command line lists {command_line}, but this node's stored configuration is {in_force}: using the stored one (--peers/--learner only bootstrap a new cluster; change members with `node member`)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::for_tests(voters, learners)
    }

    fn seeds() -> BTreeMap<NodeId, Address> {
        BTreeMap::from([(1, Address::parse("h1:7000").unwrap())])
    }

    #[test]
    fn the_stored_configuration_wins_over_the_command_line() {
        let stored = StoredBootstrap {
            membership: members(&[1, 2, 3], &[]),
            index: 0,
            cluster_digest: 7,
        };
        let plan = plan(
            1,
            Some(stored.clone()),
            Some(members(&[1, 2], &[])),
            Some(seeds()),
            false,
        );
        assert_eq!(plan, Ok(Plan::Stored(stored)));
    }

    #[test]
    fn a_first_start_records_the_command_line() {
        let m = members(&[1, 2, 3], &[4]);
        match plan(4, None, Some(m.clone()), None, true) {
            Ok(Plan::Record { bootstrap, upgrade }) => {
                assert!(!upgrade);
                assert_eq!(bootstrap.membership, m);
                assert_eq!(bootstrap.cluster_digest, cluster_digest(&m));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            plan(9, None, Some(m.clone()), None, true),
            Err(BootstrapError::NotMember(9))
        );
        // An old data directory adopts the command line.
        assert!(matches!(
            plan(1, None, Some(m), None, false),
            Ok(Plan::Record { upgrade: true, .. })
        ));
    }

    #[test]
    fn join_only_on_an_empty_directory_unless_nothing_else_is_given() {
        let m = members(&[1, 2, 3], &[]);
        assert_eq!(
            plan(4, None, Some(m.clone()), Some(seeds()), true),
            Ok(Plan::Join(seeds()))
        );
        assert!(matches!(
            plan(1, None, Some(m), Some(seeds()), false),
            Ok(Plan::Record { upgrade: true, .. })
        ));
        assert_eq!(
            plan(4, None, None, Some(seeds()), false),
            Ok(Plan::Join(seeds()))
        );
        assert_eq!(
            plan(4, None, None, None, true),
            Err(BootstrapError::Nothing)
        );
    }

    #[test]
    fn the_cluster_digest_ignores_addresses() {
        let a = members(&[1, 2, 3], &[]);
        let mut b = a.clone();
        b.addresses.insert(2, "elsewhere:1".into());
        assert_eq!(cluster_digest(&a), cluster_digest(&b));
        assert_ne!(cluster_digest(&a), cluster_digest(&members(&[1, 2], &[])));
        assert!(command_line_differs(&a, &b).is_none());
        let warning = command_line_differs(&members(&[1, 2], &[]), &a).unwrap();
        assert!(warning.contains("voters 1=h1:7000,2=h2:7000,3=h3:7000"));
    }
}
