//! Opening a node: everything that can fail with a clear error before
//! anything listens. The member lists are checked, the credentials and the
//! revocation list loaded, the store opened, the configuration decided
//! (recorded, from the command line, or asked for with `--join`), the log
//! replayed into the Raft core, and the address to listen on found.

use std::net::SocketAddr;

use tracing::info;

use super::bootstrap::{self, Plan};
use super::{links, NodeError, NodeOptions};
use crate::address::Address;
use crate::identity;
use crate::raft::{Config, Membership, NodeId, RaftNode, Restorer};
use crate::storage::{Recovered, Store, StoredBootstrap};
use crate::tls::{self, Credentials, Holder};

/// A node opened and recovered, not listening yet: `run` starts it.
pub struct OpenNode {
    pub(super) options: NodeOptions,
    pub(super) creds: Credentials,
    pub(super) cluster_id: String,
    pub(super) store: Store,
    pub(super) raft: RaftNode,
    /// The configuration recorded in the data directory, and its index.
    pub(super) stored: StoredBootstrap,
    /// The configuration in force: the stored one or the log's latest.
    pub(super) in_force: Membership,
    pub(super) listen: SocketAddr,
}

impl OpenNode {
    pub fn id(&self) -> NodeId {
        self.options.id
    }

    /// Where the node will listen.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The configuration in force when the node was opened.
    pub fn membership(&self) -> &Membership {
        &self.in_force
    }
}

/// Opens node `options.id`: see the module documentation. Asks the
/// cluster for its configuration first when joining (`--join`).
pub async fn open(options: NodeOptions) -> Result<OpenNode, NodeError> {
    check_member_lists(&options)?;
    let creds = load_credentials(&options)?;
    let cluster_id = identity::cluster_id(&creds.ca);
    let (mut store, recovered) = open_store(&options, &cluster_id)?;
    // The command line bootstraps a new cluster only: from then on the
    // stored configuration (and after it the log) says who is a member.
    let command_line = (!options.peers.is_empty() || !options.learners.is_empty())
        .then(|| bootstrap::from_command_line(&options.peers, &options.learners));
    let stored = configuration(
        &options,
        &mut store,
        &recovered,
        command_line.clone(),
        &creds,
    )
    .await?;
    let raft = recover(&options, &store, &stored, recovered, &cluster_id)?;
    let in_force = links::in_force(
        &(stored.index, stored.membership.clone()),
        &(raft.membership_index(), raft.membership().clone()),
    )
    .clone();
    let me = options.id;
    if let Some(warning) = command_line
        .as_ref()
        .and_then(|listed| bootstrap::command_line_differs(listed, &in_force))
    {
        tracing::warn!("{warning}");
    }
    if !in_force.contains(me) {
        tracing::warn!(
            node = me,
            configuration = %in_force,
            "this node is not a member of the cluster's configuration: it takes no part until it is added again"
        );
    }
    let listen = match options.listen {
        Some(listen) => listen,
        None => own_address(me, &in_force).await?,
    };
    Ok(OpenNode {
        options,
        creds,
        cluster_id,
        store,
        raft,
        stored,
        in_force,
        listen,
    })
}

/// A new node missing from the list it bootstraps with is a typo: said
/// before anything else (its certificate may not exist either). A data
/// directory already in use has its own configuration. No node may be
/// both a voter and a learner.
fn check_member_lists(options: &NodeOptions) -> Result<(), NodeError> {
    let me = options.id;
    let listed = options.peers.contains_key(&me) || options.learners.contains_key(&me);
    let has_data = std::fs::read_dir(&options.data).is_ok_and(|mut d| d.next().is_some());
    if options.join.is_none() && !options.peers.is_empty() && !listed && !has_data {
        return Err(NodeError::Bootstrap(bootstrap::BootstrapError::NotMember(
            me,
        )));
    }
    if options.peers.contains_key(&me) && options.learners.contains_key(&me) {
        return Err(NodeError::Both(me));
    }
    if let Some(both) = options
        .peers
        .keys()
        .find(|id| options.learners.contains_key(id))
    {
        return Err(NodeError::Both(*both));
    }
    Ok(())
}

/// The node's certificate, key, CA and revocation list. A node that has
/// loaded a revocation list refuses to start without one, rather than
/// trust every certificate it revoked again.
fn load_credentials(options: &NodeOptions) -> Result<Credentials, NodeError> {
    let mut nodes: Vec<NodeId> = std::iter::once(options.id)
        .chain(options.peers.keys().copied())
        .chain(options.learners.keys().copied())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let holder = Holder::Node {
        id: options.id,
        nodes: &nodes,
    };
    let creds = Credentials::of(&options.certs, holder)?;
    if !creds.crls.is_empty() {
        info!(
            revoked = identity::revoked_serials(&creds.crls).len(),
            "loaded the revocation list {}",
            creds.crl_path.display()
        );
    }
    identity::guard_crl(&options.data, &creds.crl_path, !creds.crls.is_empty())
        .map_err(tls::TlsError::from)?;
    Ok(creds)
}

fn open_store(options: &NodeOptions, cluster_id: &str) -> Result<(Store, Recovered), NodeError> {
    let me = options.id;
    if std::env::var("CLUSTER_STORE_UNSAFE_SKIP_SYNC").is_ok_and(|v| v == "1") {
        tracing::warn!(
            "CLUSTER_STORE_UNSAFE_SKIP_SYNC=1: acknowledging writes WITHOUT syncing them; a crash loses them (test hook only)"
        );
        Ok(Store::open_without_sync_unsafely(
            &options.data,
            cluster_id,
            me,
        )?)
    } else if let Some(at) = std::env::var("CLUSTER_STORE_TEST_CRASH_BEFORE_CLAIMING")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tracing::warn!(
            "CLUSTER_STORE_TEST_CRASH_BEFORE_CLAIMING={at}: this node kills itself once commit {at} is synced (test hook only)"
        );
        Ok(Store::open_crashing_before_claiming(
            &options.data,
            cluster_id,
            me,
            at,
        )?)
    } else {
        Ok(Store::open(&options.data, cluster_id, me)?)
    }
}

/// The configuration the node starts from: recorded on an earlier start,
/// or now from the command line or from the cluster (`--join`).
async fn configuration(
    options: &NodeOptions,
    store: &mut Store,
    recovered: &Recovered,
    command_line: Option<Membership>,
    creds: &Credentials,
) -> Result<StoredBootstrap, NodeError> {
    let me = options.id;
    let fresh = recovered.last_index == 0 && recovered.hard_state.term == 0;
    let plan = bootstrap::plan(
        me,
        store.bootstrap()?,
        command_line,
        options.join.clone(),
        fresh,
    )?;
    Ok(match plan {
        Plan::Stored(stored) => stored,
        Plan::Record { bootstrap, upgrade } => {
            if upgrade {
                info!(configuration = %bootstrap.membership, "this data directory predates stored configurations: recording the command line's");
            }
            store.set_bootstrap(&bootstrap)?;
            bootstrap
        }
        Plan::Join(seeds) => {
            let bootstrap = bootstrap::join(me, seeds, creds).await?;
            store.set_bootstrap(&bootstrap)?;
            bootstrap
        }
    })
}

/// The Raft core, restored from the store's hard state and log. The log
/// is read back one entry at a time: only its tail stays in memory,
/// whatever its length.
fn recover(
    options: &NodeOptions,
    store: &Store,
    stored: &StoredBootstrap,
    recovered: Recovered,
    cluster_id: &str,
) -> Result<RaftNode, NodeError> {
    let me = options.id;
    let membership = &stored.membership;
    let mut config = Config::new(me, membership.voters.iter().copied());
    config.learners = membership.learners.clone();
    config.addresses = membership.addresses.clone();
    config.membership_index = stored.index;
    config.election_ticks = options.election_ticks;
    config.heartbeat_ticks = options.heartbeat_ticks;
    config.priorities = options.priorities.clone();
    config.seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(me, |d| d.as_nanos() as u64 ^ me);
    let mut restorer = Restorer::new(&config, recovered.hard_state);
    restorer.set_catch_up_floor(recovered.catch_up_floor);
    let entries = store.replay(|entry| restorer.push(entry).map_err(|e| e.to_string()))?;
    let raft = RaftNode::restore(config, restorer)?;
    info!(
        node = me,
        cluster = %cluster_id,
        term = recovered.hard_state.term,
        entries,
        commit = raft.commit_index(),
        configuration = %raft.membership(),
        configuration_index = raft.membership_index(),
        "recovered from {}",
        options.data.display()
    );
    Ok(raft)
}

/// This node's listening address from its configuration.
async fn own_address(me: NodeId, membership: &Membership) -> Result<SocketAddr, NodeError> {
    let Some(own) = membership.addresses.get(&me) else {
        return Err(NodeError::Listen(
            "absent".into(),
            "this node is not in it".into(),
        ));
    };
    let parsed = Address::parse(own).map_err(|e| NodeError::Listen(own.clone(), e.to_string()))?;
    parsed
        .resolve()
        .await
        .map_err(|e| NodeError::Listen(own.clone(), e.to_string()))
}
