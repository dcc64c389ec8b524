//! A running node: the Raft driver thread, peer links and the client API,
//! put together from the command line's options.

pub mod api;
pub mod bootstrap;
pub mod catch_up;
pub mod driver;
pub mod links;
pub mod outbox;
pub mod persist;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use crate::address::Address;
use crate::identity::{self, node_cert_path};
use crate::raft::{Config, NodeId, RaftNode, Restorer};
use crate::storage::Store;
use crate::tls::{self, Credentials};
use bootstrap::Plan;
use driver::{Driver, Input};
use outbox::Outboxes;
use transport::Peers;

/// Everything a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub id: NodeId,
    /// Voters, possibly including this node.
    pub peers: BTreeMap<NodeId, Address>,
    /// Non-voting replicas, possibly including this node.
    pub learners: BTreeMap<NodeId, Address>,
    /// Nodes to ask for the cluster's configuration on a first start
    /// (`--join`), instead of `peers`/`learners`.
    pub join: Option<BTreeMap<NodeId, Address>>,
    /// Where to listen; `None`: this node's address in its configuration.
    pub listen: Option<SocketAddr>,
    pub data: PathBuf,
    pub certs: PathBuf,
    pub tick: Duration,
    pub election_ticks: u64,
    pub heartbeat_ticks: u64,
    pub priorities: BTreeMap<NodeId, u32>,
    /// Serve the dashboard and JSON API here.
    pub http: Option<SocketAddr>,
    /// Accept writes over HTTP (which has no client certificates).
    pub http_write: bool,
    /// Most client connections open at once.
    pub max_clients: usize,
    /// Most bytes of messages waiting to commit before sends are "busy".
    pub max_pending_bytes: usize,
    /// Testing only: delay datagrams to these addresses (simulated WAN).
    pub simulate_delay: std::collections::HashMap<SocketAddr, crate::latency::LinkDelay>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} is listed both in --peers and in --learners")]
    Both(NodeId),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("this node's address in the configuration, {0}, is unusable ({1}); give --listen")]
    Listen(String, String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
    #[error(transparent)]
    Raft(#[from] crate::raft::RaftError),
    #[error("cannot listen on {addr}: {error}{hint}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("the Raft driver stopped: {0}")]
    Driver(String),
    #[error("no certificate for node {id} ({}): make one with `node certs add-node {id}`, and check that node {id} is in --peers (a new cluster) or was added with `node member add {id}`", path.display())]
    NoCertificate { id: NodeId, path: PathBuf },
}

/// Election timeouts without a leader before a node asks the members it
/// knows for a newer configuration (`catch_up.rs`): long enough for an
/// ordinary election to finish first.
const CATCH_UP_AFTER_ELECTIONS: u32 = 4;
/// ...and never sooner than this, whatever the tick.
const MIN_CATCH_UP_PATIENCE: Duration = Duration::from_secs(1);

/// Runs a node until the process is stopped.
pub async fn run(options: NodeOptions) -> Result<(), NodeError> {
    let me = options.id;
    // A new node missing from the list it bootstraps with is a typo: say
    // so before anything else (its certificate may not exist either). A
    // data directory already in use has its own configuration.
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
    let (ca_path, _) = identity::ca_path(&options.certs);
    let (cert_path, key_path) = node_cert_path(&options.certs, me);
    if !cert_path.exists() {
        return Err(NodeError::NoCertificate {
            id: me,
            path: cert_path,
        });
    }
    let creds = Credentials::load(&ca_path, &cert_path, &key_path)?;
    if !creds.crls.is_empty() {
        info!(
            revoked = identity::revoked_serials(&creds.crls).len(),
            "loaded the revocation list {}",
            creds.crl_path.display()
        );
    }
    // A node that has loaded a revocation list refuses to start without
    // one, rather than trust every certificate it revoked again.
    identity::guard_crl(&options.data, &creds.crl_path, !creds.crls.is_empty())
        .map_err(tls::TlsError::from)?;
    let cluster_id = identity::cluster_id(&creds.ca);

    let (mut store, recovered) = if std::env::var("CLUSTER_STORE_UNSAFE_SKIP_SYNC")
        .is_ok_and(|v| v == "1")
    {
        tracing::warn!(
            "CLUSTER_STORE_UNSAFE_SKIP_SYNC=1: acknowledging writes WITHOUT syncing them; a crash loses them (test hook only)"
        );
        Store::open_without_sync_unsafely(&options.data, &cluster_id, me)?
    } else {
        Store::open(&options.data, &cluster_id, me)?
    };
    // The command line bootstraps a new cluster only: from then on the
    // stored configuration (and after it the log) says who is a member.
    let command_line = (!options.peers.is_empty() || !options.learners.is_empty())
        .then(|| bootstrap::from_command_line(&options.peers, &options.learners));
    let fresh = recovered.last_index == 0 && recovered.hard_state.term == 0;
    let plan = bootstrap::plan(
        me,
        store.bootstrap()?,
        command_line.clone(),
        options.join.clone(),
        fresh,
    )?;
    let stored = match plan {
        Plan::Stored(stored) => stored,
        Plan::Record { bootstrap, upgrade } => {
            if upgrade {
                info!(configuration = %bootstrap.membership, "this data directory predates stored configurations: recording the command line's");
            }
            store.set_bootstrap(&bootstrap)?;
            bootstrap
        }
        Plan::Join(seeds) => {
            let bootstrap = bootstrap::join(me, seeds, &creds).await?;
            store.set_bootstrap(&bootstrap)?;
            bootstrap
        }
    };
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
    // The log is read back one entry at a time: only its tail stays in
    // memory, whatever its length.
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
    let stored_at = (stored.index, stored.membership.clone());
    let in_force = links::in_force(
        &stored_at,
        &(raft.membership_index(), raft.membership().clone()),
    )
    .clone();
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

    let bind_error = |source: std::io::Error| {
        let hint = if source.kind() == std::io::ErrorKind::AddrInUse {
            " (another process holds that port: stop it or choose another --listen)"
        } else {
            ""
        };
        NodeError::Bind {
            addr: listen,
            error: source,
            hint,
        }
    };
    let server_config = tls::server_config(&creds)?;
    let socket = bind_udp(listen).map_err(bind_error)?;
    let socket: std::sync::Arc<dyn quinn::AsyncUdpSocket> = if options.simulate_delay.is_empty() {
        quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket).map_err(bind_error)?
    } else {
        tracing::warn!(links = ?options.simulate_delay, "simulating network delay (testing only)");
        crate::latency::DelayedSocket::new(socket, options.simulate_delay.clone())
            .map_err(bind_error)?
    };
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    let client_config =
        std::sync::Arc::new(std::sync::RwLock::new(tls::peer_client_config(&creds)?));
    let (revoked_tx, revoked) =
        watch::channel(std::sync::Arc::new(identity::revoked_serials(&creds.crls)));

    let (inputs, input_rx) = std::sync::mpsc::sync_channel::<Input>(65_536);
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    let (events, _) = tokio::sync::broadcast::channel(4096);
    let outboxes = Outboxes::default();
    let (membership_tx, membership_rx) = watch::channel(links::View {
        index: raft.membership_index(),
        membership: raft.membership().clone(),
        committed: raft.committed_membership().clone(),
    });
    let peers = Peers {
        me,
        links: links::Links::default(),
        hello: crate::wire::PeerHello {
            cluster_id: cluster_id.clone(),
            cluster_digest: stored.cluster_digest,
        },
        inputs: inputs.clone(),
        metrics: metrics.clone(),
        client_config: client_config.clone(),
        revoked,
        contact: catch_up::LeaderContact::default(),
    };
    // The first links exist before any peer can connect.
    peers.links.follow(
        &in_force,
        raft.committed_membership(),
        None,
        &endpoint,
        &peers,
        &outboxes,
    );
    // A node that missed membership changes asks for the newer view.
    let (learned_tx, learned_rx) = watch::channel(None);
    tokio::spawn(catch_up::run(catch_up::CatchUp {
        me,
        bootstrap: stored_at.clone(),
        view: membership_rx.clone(),
        learned: learned_tx,
        contact: peers.contact.clone(),
        inputs: inputs.clone(),
        creds: Credentials::load(&ca_path, &cert_path, &key_path)?,
        patience: options
            .tick
            .saturating_mul(u32::try_from(options.election_ticks).unwrap_or(u32::MAX))
            .saturating_mul(CATCH_UP_AFTER_ELECTIONS)
            .max(MIN_CATCH_UP_PATIENCE),
    }));
    tokio::spawn(links::follow_membership(
        peers.links.clone(),
        stored_at,
        membership_rx,
        learned_rx,
        endpoint.clone(),
        peers.clone(),
        outboxes.clone(),
    ));
    // Watchers wait on the synced commit the driver publishes.
    let (commits_tx, commits_rx) = watch::channel(driver::CommitView::default());
    let api = api::Api {
        me,
        inputs: inputs.clone(),
        log: store.reader(),
        limits: std::sync::Arc::new(api::Limits::new(
            options.max_pending_bytes,
            options.max_clients,
        )),
        metrics: metrics.clone(),
        cluster_digest: stored.cluster_digest,
        commits: commits_rx,
    };
    let api_for_http = api.clone();
    tokio::spawn(transport::accept_loop(endpoint.clone(), peers, api));
    info!(node = me, %listen, "serving");

    if let Some(http) = options.http {
        let mut cluster: BTreeMap<NodeId, Address> = in_force
            .addresses
            .iter()
            .filter_map(|(id, address)| Some((*id, Address::parse(address).ok()?)))
            .collect();
        cluster.entry(me).or_insert_with(|| Address::from(listen));
        let state = crate::http::HttpState {
            me,
            api: api_for_http,
            events: events.clone(),
            metrics: metrics.clone(),
            write: options.http_write,
            cluster: std::sync::Arc::new(
                crate::client::Client::new(cluster, &creds)
                    .map_err(|e| NodeError::Driver(e.to_string()))?,
            ),
        };
        let listener = tokio::net::TcpListener::bind(http)
            .await
            .map_err(|source| NodeError::Bind {
                addr: http,
                hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process holds that port: stop it or choose another --http)"
                } else {
                    ""
                },
                error: source,
            })?;
        info!(node = me, %http, write = options.http_write, "dashboard at http://{http}/dashboard");
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, crate::http::router(state)).await {
                tracing::error!("HTTP server stopped: {error}");
            }
        });
    }

    tokio::spawn(watch_revocations(
        endpoint.clone(),
        creds,
        client_config,
        revoked_tx,
        options.data.clone(),
    ));

    let store = persist::start(me, store, inputs.clone(), outboxes.clone(), metrics.clone())
        .map_err(|e| NodeError::Driver(e.to_string()))?;
    let driver = Driver::new(
        raft,
        input_rx,
        store,
        outboxes,
        options.tick,
        metrics,
        driver::Feeds {
            events,
            membership: membership_tx,
            commits: commits_tx,
        },
    );
    let handle = std::thread::Builder::new()
        .name(format!("raft-{me}"))
        .spawn(move || driver.run())
        .map_err(|e| NodeError::Driver(e.to_string()))?;
    drop(inputs);
    let result = tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|e| NodeError::Driver(e.to_string()))?;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(store_error)) => Err(store_error.into()),
        Err(_) => Err(NodeError::Driver("the driver thread panicked".into())),
    }
}

/// This node's listening address from its configuration.
async fn own_address(
    me: NodeId,
    membership: &crate::raft::Membership,
) -> Result<SocketAddr, NodeError> {
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

/// Reloads the revocation list when it changes: new handshakes use it at
/// once, and live connections of newly revoked certificates are closed.
/// A list that disappears is kept (see `Credentials::reload_crls`), and
/// the data directory `data` records that a list was loaded, so that the
/// node refuses to restart without it. A problem is logged once, not at
/// every reload.
async fn watch_revocations(
    endpoint: quinn::Endpoint,
    mut creds: Credentials,
    client_config: std::sync::Arc<std::sync::RwLock<quinn::ClientConfig>>,
    revoked: watch::Sender<transport::Revoked>,
    data: PathBuf,
) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let mut problem: Option<String> = None;
    loop {
        interval.tick().await;
        let reloaded = creds.reload_crls();
        if reloaded.is_ok() && problem.take().is_some() {
            info!(
                "the revocation list {} reads again",
                creds.crl_path.display()
            );
        }
        match reloaded {
            Ok(false) => {}
            Ok(true) => match (tls::server_config(&creds), tls::peer_client_config(&creds)) {
                (Ok(server), Ok(client)) => {
                    endpoint.set_server_config(Some(server));
                    match client_config.write() {
                        Ok(mut config) => *config = client,
                        Err(poisoned) => *poisoned.into_inner() = client,
                    }
                    let serials = identity::revoked_serials(&creds.crls);
                    info!(
                        revoked = serials.len(),
                        "loaded a new revocation list from {}",
                        creds.crl_path.display()
                    );
                    revoked.send_replace(std::sync::Arc::new(serials));
                    if let Err(error) = identity::record_crl_seen(&data) {
                        tracing::warn!(
                            "cannot record that a revocation list was loaded (a restart without ca.crl would not be refused): {error}"
                        );
                    }
                }
                (Err(error), _) | (_, Err(error)) => {
                    tracing::warn!("ignoring the new revocation list: {error}")
                }
            },
            Err(error) => {
                let text = error.to_string();
                if problem.as_deref() != Some(text.as_str()) {
                    tracing::warn!(
                        "cannot reload the revocation list, keeping the previous one: {text}"
                    );
                    problem = Some(text);
                }
            }
        }
    }
}

/// Kernel buffers asked for on the node's UDP socket (the kernel caps them
/// at `net.core.rmem_max` / `wmem_max`).
const UDP_BUFFER_BYTES: usize = 8 << 20;

/// Binds the node's UDP socket with large kernel buffers. With the
/// default (about 208 KB) a burst from a fast peer overflows the receive
/// buffer while the node is busy; QUIC takes the dropped datagrams for
/// congestion and halves its window. Across a 140 ms round trip that cut a
/// pipelined client's rate by more than half.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer works, only less well.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
