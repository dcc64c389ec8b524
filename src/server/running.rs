//! Running an opened node: its QUIC endpoint (peers and clients on one
//! UDP socket) and its TCP port for clients over TLS, the peer links, catch-up, the client API, the revocation
//! watcher, and the store and driver threads. `OpenNode::run` returns a
//! `NodeHandle` to wait on or stop, and through which the HTTP side
//! (`crate::http`) is started beside the node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;
use tracing::info;

use super::driver::{self, Driver, Input};
use super::outbox::Outboxes;
use super::transport::{self, Peers};
use super::{api, catch_up, links, persist, tcp, NodeError, OpenNode};
use crate::address::Address;
use crate::events::NodeEvent;
use crate::identity;
use crate::metrics::Metrics;
use crate::raft::NodeId;
use crate::storage::StoreError;
use crate::tls::{self, Credentials};

/// Election timeouts without a leader before a node asks the members it
/// knows for a newer configuration (`catch_up.rs`): long enough for an
/// ordinary election to finish first.
const CATCH_UP_AFTER_ELECTIONS: u32 = 4;
/// ...and never sooner than this, whatever the tick.
const MIN_CATCH_UP_PATIENCE: Duration = Duration::from_secs(1);

/// A running node.
pub struct NodeHandle {
    me: NodeId,
    listen: SocketAddr,
    api: api::Api,
    events: broadcast::Sender<NodeEvent>,
    metrics: Arc<Metrics>,
    creds: Credentials,
    /// The members' addresses when the node started (this node's own
    /// included).
    members: BTreeMap<NodeId, Address>,
    endpoint: quinn::Endpoint,
    links: links::Links,
    inputs: driver::Inputs,
    /// The tasks to end when the node stops.
    tasks: Mutex<Vec<AbortHandle>>,
    /// The driver, which owns the store.
    driver: DriverRun,
}

/// Where the driver runs: a thread of its own, or a task on the node's
/// one thread (`NodeOptions::one_thread`).
enum DriverRun {
    Thread(std::thread::JoinHandle<Result<(), StoreError>>),
    Task(tokio::task::JoinHandle<Result<(), NodeError>>),
}

impl OpenNode {
    /// Binds the node's UDP socket and starts it: peers and clients are
    /// served, links dialed, and the driver thread steps the Raft core.
    /// Call it within a Tokio runtime.
    pub fn run(self) -> Result<NodeHandle, NodeError> {
        let OpenNode {
            options,
            creds,
            cluster_id,
            store,
            raft,
            stored,
            in_force,
            listen,
        } = self;
        let me = options.id;
        let (endpoint, tcp) = bind_ports(listen, &creds, &options.simulate_delay)?;
        let (tcp_tls_tx, tcp_tls) = watch::channel(tls::tcp_server_config(&creds)?);
        let client_config = Arc::new(RwLock::new(tls::peer_client_config(&creds)?));
        let (revoked_tx, revoked) =
            watch::channel(Arc::new(identity::revoked_serials(&creds.crls)));
        let mut tasks = Vec::new();

        let (inputs, input_rx) = driver::queue(65_536);
        let metrics = Arc::new(Metrics::default());
        let (events, _) = broadcast::channel(4096);
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
                cluster_id,
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
        let stored_at = (stored.index, stored.membership.clone());
        let (learned_tx, learned_rx) = watch::channel(None);
        tasks.push(
            tokio::spawn(catch_up::run(catch_up::CatchUp {
                me,
                bootstrap: stored_at.clone(),
                view: membership_rx.clone(),
                learned: learned_tx,
                contact: peers.contact.clone(),
                inputs: inputs.clone(),
                creds: creds.clone(),
                patience: options
                    .tick
                    .saturating_mul(u32::try_from(options.election_ticks).unwrap_or(u32::MAX))
                    .saturating_mul(CATCH_UP_AFTER_ELECTIONS)
                    .max(MIN_CATCH_UP_PATIENCE),
            }))
            .abort_handle(),
        );
        tasks.push(
            tokio::spawn(links::follow_membership(
                peers.links.clone(),
                stored_at,
                membership_rx,
                learned_rx,
                endpoint.clone(),
                peers.clone(),
                outboxes.clone(),
            ))
            .abort_handle(),
        );
        // Watchers wait on the synced commit the driver publishes.
        let (commits_tx, commits_rx) = watch::channel(driver::CommitView::default());
        let api = api::Api {
            me,
            inputs: inputs.clone(),
            log: store.reader(),
            limits: Arc::new(api::Limits::new(
                options.max_pending_bytes,
                options.max_clients,
            )),
            metrics: metrics.clone(),
            cluster_digest: stored.cluster_digest,
            commits: commits_rx,
        };
        let links = peers.links.clone();
        tasks.push(
            tokio::spawn(tcp::accept_loop(tcp, tcp_tls, peers.clone(), api.clone())).abort_handle(),
        );
        tasks.push(
            tokio::spawn(transport::accept_loop(endpoint.clone(), peers, api.clone()))
                .abort_handle(),
        );
        info!(node = me, %listen, "serving");
        tasks.push(
            tokio::spawn(watch_revocations(
                endpoint.clone(),
                tcp_tls_tx,
                creds.clone(),
                client_config,
                revoked_tx,
                options.data.clone(),
            ))
            .abort_handle(),
        );

        let store = persist::StoreHandle::new(store, outboxes.clone(), metrics.clone());
        let driver = Driver::new(
            raft,
            input_rx,
            store,
            outboxes,
            driver::Pace {
                tick: options.tick,
                spin: options.spin,
            },
            metrics.clone(),
            driver::Feeds {
                events: events.clone(),
                membership: membership_tx,
                commits: commits_tx,
            },
        );
        let driver = if options.one_thread {
            DriverRun::Task(tokio::spawn(driver.run_on_runtime()))
        } else {
            DriverRun::Thread(
                std::thread::Builder::new()
                    .name(format!("raft-{me}"))
                    .spawn(move || driver.run())
                    .map_err(|e| NodeError::Driver(e.to_string()))?,
            )
        };

        let mut members: BTreeMap<NodeId, Address> = in_force
            .addresses
            .iter()
            .filter_map(|(id, address)| Some((*id, Address::parse(address).ok()?)))
            .collect();
        members.entry(me).or_insert_with(|| Address::from(listen));
        Ok(NodeHandle {
            me,
            listen,
            api,
            events,
            metrics,
            creds,
            members,
            endpoint,
            links,
            inputs,
            tasks: Mutex::new(tasks),
            driver,
        })
    }
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The address the node listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The client API, for local callers such as the HTTP side.
    pub fn api(&self) -> &api::Api {
        &self.api
    }

    /// Leader and clock changes, as they happen.
    pub fn events(&self) -> &broadcast::Sender<NodeEvent> {
        &self.events
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The node's own credentials (the HTTP side reaches the cluster with
    /// them).
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Every member's address when the node started, its own included.
    pub fn members(&self) -> &BTreeMap<NodeId, Address> {
        &self.members
    }

    /// Runs `task` beside the node; `stop` ends it with the node.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        match self.tasks.lock() {
            Ok(mut tasks) => tasks.push(handle),
            Err(poisoned) => poisoned.into_inner().push(handle),
        }
    }

    /// Waits until the driver stops: never while the node runs well; a
    /// storage failure stops it (a node that cannot persist must not keep
    /// voting), and so does `stop`. The driver has closed the store when it
    /// returns.
    pub async fn wait(self) -> Result<(), NodeError> {
        let NodeHandle { driver, inputs, .. } = self;
        drop(inputs);
        match driver {
            DriverRun::Thread(driver) => tokio::task::spawn_blocking(move || driver.join())
                .await
                .map_err(|e| NodeError::Driver(e.to_string()))?
                .map_err(|_| NodeError::Driver("the driver thread panicked".into()))?
                .map_err(NodeError::from),
            DriverRun::Task(driver) => driver
                .await
                .map_err(|e| NodeError::Driver(format!("the driver task failed: {e}")))?,
        }
    }

    /// Stops the node: its tasks and peer links end, its connections close
    /// and its socket is released; the driver stops at its next round,
    /// after the write it is in. Returns as
    /// `wait` does.
    pub async fn stop(self) -> Result<(), NodeError> {
        let tasks = match self.tasks.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for task in tasks {
            task.abort();
        }
        self.links.abort_all();
        self.endpoint.close(0u32.into(), b"node stopping");
        let inputs = self.inputs.clone();
        // The driver's queue is bounded: wait for room off the runtime.
        let _ = tokio::task::spawn_blocking(move || inputs.send(Input::Stop)).await;
        self.wait().await
    }
}

/// Binds the QUIC endpoint and the TCP listener on one port number. With
/// `--listen host:0` the kernel picks a UDP port whose number TCP may hold
/// (a connection's local port, or one in TIME_WAIT: seen after a test
/// opened thousands): then both are bound again, on another number.
fn bind_ports(
    listen: SocketAddr,
    creds: &Credentials,
    simulate_delay: &std::collections::HashMap<SocketAddr, crate::latency::LinkDelay>,
) -> Result<(quinn::Endpoint, tokio::net::TcpListener), NodeError> {
    const ATTEMPTS: usize = 20;
    let mut attempt = 1;
    loop {
        let endpoint = bind_endpoint(listen, creds, simulate_delay)?;
        match bind_tcp(&endpoint, listen) {
            Ok(tcp) => return Ok((endpoint, tcp)),
            Err(NodeError::Bind { error, .. })
                if listen.port() == 0
                    && error.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < ATTEMPTS =>
            {
                endpoint.close(0u32.into(), b"");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Binds the node's UDP socket (delaying datagrams as `simulate_delay`
/// says, for tests) and opens the QUIC endpoint on it.
fn bind_endpoint(
    listen: SocketAddr,
    creds: &Credentials,
    simulate_delay: &std::collections::HashMap<SocketAddr, crate::latency::LinkDelay>,
) -> Result<quinn::Endpoint, NodeError> {
    let bind_error = |source: std::io::Error| NodeError::Bind {
        addr: listen,
        hint: if source.kind() == std::io::ErrorKind::AddrInUse {
            " (another process holds that port: stop it or choose another --listen)"
        } else {
            ""
        },
        error: source,
    };
    let server_config = tls::server_config(creds)?;
    let socket = crate::udp::bind_udp(listen).map_err(bind_error)?;
    let socket: Arc<dyn quinn::AsyncUdpSocket> = if simulate_delay.is_empty() {
        quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket).map_err(bind_error)?
    } else {
        tracing::warn!(links = ?simulate_delay, "simulating network delay (testing only)");
        crate::latency::DelayedSocket::new(socket, simulate_delay.clone()).map_err(bind_error)?
    };
    quinn::Endpoint::new_with_abstract_socket(
        creds.endpoint_config(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)
}

/// Binds the TCP port for clients over TLS (`tcp.rs`): the port number
/// the QUIC endpoint got, on the same address.
fn bind_tcp(
    endpoint: &quinn::Endpoint,
    listen: SocketAddr,
) -> Result<tokio::net::TcpListener, NodeError> {
    let bound = endpoint.local_addr().unwrap_or(listen);
    let addr = SocketAddr::new(listen.ip(), bound.port());
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6()?
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        // A restarted node takes its port back despite old connections.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bind().map_err(|source| NodeError::Bind {
        addr,
        hint: if source.kind() == std::io::ErrorKind::AddrInUse {
            " (TCP, for clients: another process holds that port: stop it or choose another --listen)"
        } else {
            " (TCP, for clients)"
        },
        error: source,
    })
}

/// Reloads the revocation list when it changes: new handshakes use it at
/// once, and live connections of newly revoked certificates are closed.
/// A list that disappears is kept (see `Credentials::reload_crls`), and
/// the data directory `data` records that a list was loaded, so that the
/// node refuses to restart without it. A problem is logged once, not at
/// every reload.
async fn watch_revocations(
    endpoint: quinn::Endpoint,
    tcp_tls: watch::Sender<Arc<rustls::ServerConfig>>,
    mut creds: Credentials,
    client_config: Arc<RwLock<quinn::ClientConfig>>,
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
            Ok(true) => match (
                tls::server_config(&creds),
                tls::tcp_server_config(&creds),
                tls::peer_client_config(&creds),
            ) {
                (Ok(server), Ok(tcp_server), Ok(client)) => {
                    endpoint.set_server_config(Some(server));
                    tcp_tls.send_replace(tcp_server);
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
                    revoked.send_replace(Arc::new(serials));
                    if let Err(error) = identity::record_crl_seen(&data) {
                        tracing::warn!(
                            "cannot record that a revocation list was loaded (a restart without ca.crl would not be refused): {error}"
                        );
                    }
                }
                (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Validity;
    use crate::server::{open, NodeOptions};

    /// A one-node cluster opened, run, serving, stopped, and opened again
    /// from the same data directory: stopping releases the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_opens_runs_and_stops() {
        opens_runs_and_stops(false).await;
    }

    /// The same with the Raft core on the runtime's one thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_node_on_one_thread_opens_runs_and_stops() {
        opens_runs_and_stops(true).await;
    }

    async fn opens_runs_and_stops(one_thread: bool) {
        let dir = std::env::temp_dir().join(format!(
            "cs-node-handle-{one_thread}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = dir.join("certs");
        identity::init_ca(&certs, false).unwrap();
        identity::issue_node(&certs, 1, &[], Validity::days(1)).unwrap();
        let options = NodeOptions {
            id: 1,
            peers: [(1, Address::parse("127.0.0.1:0").unwrap())].into(),
            learners: BTreeMap::new(),
            join: None,
            listen: Some("127.0.0.1:0".parse().unwrap()),
            data: dir.join("data"),
            certs,
            tick: Duration::from_millis(5),
            spin: crate::server::spin::DEFAULT_SPIN,
            one_thread,
            election_ticks: 4,
            heartbeat_ticks: 1,
            priorities: BTreeMap::new(),
            max_clients: 16,
            max_pending_bytes: 1 << 20,
            simulate_delay: Default::default(),
        };
        for _ in 0..2 {
            let node = open(options.clone()).await.unwrap();
            assert_eq!(node.id(), 1);
            let listener = crate::http::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let http = listener.local_addr().unwrap();
            let running = node.run().unwrap();
            crate::http::serve(listener, &running, false).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let status = running.api().local_status().await.unwrap();
                if status.leader == Some(1) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no leader: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let status = get(http, "/status").await;
            assert!(status.contains(r#""id":1"#), "{status}");
            running.stop().await.unwrap();
            // The HTTP side stopped with it.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while tokio::net::TcpStream::connect(http).await.is_ok() {
                assert!(std::time::Instant::now() < deadline, "HTTP still served");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }
}
