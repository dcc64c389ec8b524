//! The client side: finds the leader, follows redirects, retries across
//! leader changes with the same sequence numbers (so each message is
//! written exactly once) and keeps a Lamport clock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod error;
pub mod export;
mod link;
mod members;
pub mod render;
mod watch;
pub use error::{ClientError, DialError, Refused};
pub use link::Transport;
use link::{Link, Recv, Send, TcpLink};
pub use members::{AddProgress, Added, AlreadyMember, ChangeReport, CHANGE_PATIENCE};
use quinn::Endpoint;
pub use watch::LogStream;

use crate::address::Address;
use crate::identity::node_server_name;
use crate::raft::{ChangeError, Committed, Index, MembershipChange, NodeId, ProposeError, Status};
use crate::tls::{self, peer_identity, Credentials, Holder};
use crate::wire::{
    read_frame, read_frame_owned, write_frame, write_frame_owned, ClientRequest, ClientResponse,
    ExportedEntry, MembersView, Start, Until, WireError, MAX_BATCH, MAX_MESSAGE_BYTES,
    MAX_SEND_BYTES, STREAM_WINDOW,
};

/// Batches `node send -` keeps outstanding: as many as a node reads ahead
/// on one stream. The window must cover a round trip to the quorum at full
/// speed: with 8 batches of 1,000 (as before) a client across a 140 ms
/// round trip could not pass 8,000 messages per commit latency, ~42,000/s.
/// A node deduplicates retries within `Config::session_window` of a
/// client's latest messages, which must stay above this many batches.
pub const PIPELINE_WINDOW: usize = STREAM_WINDOW;

/// While a request is pending, the node is asked whether it is alive this
/// often; one that does not answer a probe in time is treated as down
/// and the request is retried elsewhere (safe: retries keep their sequence
/// numbers). A slow but live node (a big batch across continents) is waited for.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long a liveness probe may take: more than any round trip on Earth.
const PROBE_TIMEOUT: Duration = Duration::from_millis(750);
/// Longest wait for one request, even from a live node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A node that does not complete a handshake in this time is treated as
/// down; generous for a 300 ms round trip, short for a client to wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node that failed is skipped when choosing whom to ask.
const SUSPECT_FOR: Duration = Duration::from_secs(3);
/// A request unanswered for this long (or three times the recent request
/// latency, if longer) makes the client ask the other nodes whether a newer
/// leader has been elected, and then every `LOOK_EVERY`: a dead leader is
/// left as soon as its successor exists, not after a liveness timeout.
const LOOK_AFTER: Duration = Duration::from_millis(100);
const LOOK_EVERY: Duration = Duration::from_millis(50);
/// How long one of those questions may take.
const LOOK_TIMEOUT: Duration = Duration::from_secs(1);
/// After a node fails, how long the client asks the others for a newer
/// leader before it tries them in turn (an election takes 0.2-0.4 s).
const SUCCESSOR_SEARCH: Duration = Duration::from_secs(1);
/// Largest send (its messages' bytes) whose copies go to the other nodes
/// while its node is silent (`send_to_the_others`): a copy saves a
/// client across an ocean ~0.15 s, which a large send spends in transfer
/// anyway, and a slow but live leader would have cost every other node a
/// copy of up to `MAX_SEND_BYTES`.
const COPY_MAX_BYTES: usize = 64 << 10;
/// How many times a copy goes again to a node that still names the
/// silent one as its leader (`LOOK_EVERY` apart): enough to outlast the
/// dead leader's last heartbeats, few enough that a slow live leader's
/// followers are not sent a copy every 50 ms for as long as it is slow.
const COPY_RESENDS: usize = 4;

pub struct Client {
    /// How this client reaches nodes, with its certificate and trust.
    dialer: Dialer,
    /// The nodes it knows: `--cluster`, and members it learned of since
    /// (`learn_members`).
    cluster: std::sync::RwLock<BTreeMap<NodeId, Address>>,
    connections: Mutex<HashMap<NodeId, Link>>,
    /// Streams whose last request was answered, ready for the next one
    /// (`Client::stream`).
    idle_streams: Mutex<HashMap<NodeId, Vec<IdleStream>>>,
    leader: Mutex<Option<NodeId>>,
    /// Nodes that recently failed, and until when to avoid them.
    suspects: Mutex<HashMap<NodeId, Instant>>,
    /// This client's session: its id, and an index below every message
    /// of the session (`None` until learned before the first send). One
    /// lock, so a request never mixes one session's id with another's floor.
    session: Mutex<Session>,
    next_seq: AtomicU64,
    lamport: AtomicU64,
    /// The highest term in which this client has seen a leader: only a
    /// leader of a later term replaces the one it waits for.
    leader_term: AtomicU64,
    /// Recent request latency in microseconds (moving average).
    latency_us: AtomicU64,
    /// How long `send` keeps retrying before giving up.
    pub give_up_after: Duration,
}

/// How a client dials nodes (`Transport`).
enum Dialer {
    /// From `endpoint`, which clients may share (`Client::on_endpoint`):
    /// the TLS settings are per client, as they may hold different
    /// certificates.
    Quic {
        endpoint: Endpoint,
        config: quinn::ClientConfig,
    },
    Tcp(Arc<rustls::ClientConfig>),
}

/// A stream left open after its request was answered, on the link
/// `link` (`Link::id`).
struct IdleStream {
    link: usize,
    send: Send,
    recv: Recv,
}

/// Idle streams kept per node: one per task that shares the client sends
/// on its own; more requests at once open more streams, and those beyond
/// this are closed when answered.
const IDLE_STREAMS: usize = 16;

/// A client session: see `Client::session`.
#[derive(Clone, Copy, Debug)]
struct Session {
    id: u64,
    since: Option<Index>,
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

impl Client {
    /// A client of the nodes `cluster`, with the client certificate
    /// `name` from the certificate directory `certs`.
    pub fn from_certs(
        cluster: BTreeMap<NodeId, Address>,
        certs: &std::path::Path,
        name: &str,
        transport: Transport,
    ) -> Result<Self> {
        let nodes: Vec<NodeId> = cluster.keys().copied().collect();
        let creds = Credentials::of(
            certs,
            Holder::Client {
                name,
                nodes: &nodes,
            },
        )?;
        Client::with_transport(cluster, &creds, transport)
    }

    /// A client of the nodes `cluster` over the default transport (TLS
    /// over TCP).
    pub fn new(cluster: BTreeMap<NodeId, Address>, creds: &Credentials) -> Result<Self> {
        Client::with_transport(cluster, creds, Transport::default())
    }

    pub fn with_transport(
        cluster: BTreeMap<NodeId, Address>,
        creds: &Credentials,
        transport: Transport,
    ) -> Result<Self> {
        if cluster.is_empty() {
            return Err(ClientError::NoNodes);
        }
        if transport == Transport::Tcp {
            return Ok(Client::with_dialer(
                cluster,
                Dialer::Tcp(tls::tcp_client_config(creds)?),
            ));
        }
        let bind: SocketAddr = if cluster
            .values()
            .all(|a| a.literal().is_some_and(|a| a.is_ipv6()))
        {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        // The node's large socket buffers: many connections on one socket
        // (`Client::on_endpoint`) must not lose the node's answers.
        let endpoint = crate::udp::client_endpoint(bind).map_err(ClientError::Socket)?;
        Client::on_endpoint(cluster, creds, endpoint)
    }

    /// A QUIC client that dials from `endpoint`, which other clients of
    /// this process may share (`Client::endpoint`): one UDP socket, and one
    /// task reading it, for all of them. Each client keeps its own connections,
    /// certificate, session and leader. Many clients in one process spend
    /// less CPU this way than with a socket each (BENCHMARKS.md; 64 of them
    /// started slowly on a simulated WAN, not yet understood).
    pub fn on_endpoint(
        cluster: BTreeMap<NodeId, Address>,
        creds: &Credentials,
        endpoint: Endpoint,
    ) -> Result<Self> {
        if cluster.is_empty() {
            return Err(ClientError::NoNodes);
        }
        let config = tls::client_config(creds)?;
        Ok(Client::with_dialer(
            cluster,
            Dialer::Quic { endpoint, config },
        ))
    }

    fn with_dialer(cluster: BTreeMap<NodeId, Address>, dialer: Dialer) -> Client {
        Client {
            dialer,
            cluster: std::sync::RwLock::new(cluster),
            connections: Mutex::new(HashMap::new()),
            idle_streams: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            suspects: Mutex::new(HashMap::new()),
            session: Mutex::new(Session {
                id: random_u64(),
                since: None,
            }),
            next_seq: AtomicU64::new(1),
            lamport: AtomicU64::new(0),
            leader_term: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            give_up_after: Duration::from_secs(60),
        }
    }

    /// The QUIC endpoint this client dials from, to share with other
    /// clients (`Client::on_endpoint`); `None` over TCP.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        match &self.dialer {
            Dialer::Quic { endpoint, .. } => Some(endpoint),
            Dialer::Tcp(_) => None,
        }
    }

    pub fn nodes(&self) -> Vec<NodeId> {
        match self.cluster.read() {
            Ok(cluster) => cluster.keys().copied().collect(),
            Err(poisoned) => poisoned.into_inner().keys().copied().collect(),
        }
    }

    fn address(&self, node: NodeId) -> Option<Address> {
        match self.cluster.read() {
            Ok(cluster) => cluster.get(&node).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&node).cloned(),
        }
    }

    fn knows(&self, node: NodeId) -> bool {
        self.address(node).is_some()
    }

    /// Adds members a node reported (a configuration's addresses) that
    /// the client did not know, so it can follow a redirect to a node added
    /// after it started. Known nodes keep their addresses.
    pub fn learn_members(&self, addresses: &BTreeMap<NodeId, String>) {
        let mut cluster = match self.cluster.write() {
            Ok(cluster) => cluster,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (id, address) in addresses {
            if let (false, Ok(address)) = (cluster.contains_key(id), Address::parse(address)) {
                cluster.insert(*id, address);
            }
        }
    }

    /// Learns the address of `leader`, a node this client was not given
    /// (added to the cluster since), from a configuration a member
    /// reported. Only the leader's: a send or export otherwise keeps to the
    /// nodes it was given, but without the leader's address it could not
    /// land at all. The leader's certificate still proves who answers there.
    fn learn_leader(&self, leader: NodeId, addresses: &BTreeMap<NodeId, String>) {
        if self.knows(leader) {
            return;
        }
        if let Some(address) = addresses.get(&leader) {
            tracing::debug!(leader, %address, "learned the address of a leader added after this client started");
            self.learn_members(&BTreeMap::from([(leader, address.clone())]));
        }
    }

    /// After `node` redirected to a `leader` this client does not know:
    /// asks `node` where that leader is (its configuration lists it).
    async fn learn_leader_from(&self, node: NodeId, leader: NodeId) {
        match tokio::time::timeout(LOOK_TIMEOUT, self.status_of(node)).await {
            Ok(Ok(status)) => self.learn_leader(leader, &status.membership.addresses),
            Ok(Err(error)) => {
                tracing::debug!(node, leader, %error, "no address for the leader it named")
            }
            Err(_) => tracing::debug!(
                node,
                leader,
                "no address for the leader it named: timed out"
            ),
        }
    }

    pub fn lamport(&self) -> u64 {
        self.lamport.load(Ordering::SeqCst)
    }

    /// The link to `node`, dialed (and its identity checked) if there is
    /// none open.
    async fn connection(&self, node: NodeId) -> Result<Link> {
        let open = |connections: &HashMap<NodeId, Link>| {
            connections.get(&node).filter(|c| c.is_open()).cloned()
        };
        if let Some(connection) = open(&lock(&self.connections)) {
            return Ok(connection);
        }
        let configured = self.address(node).ok_or(ClientError::UnknownNode(node))?;
        let address = configured
            .resolve()
            .await
            .map_err(|error| DialError::Resolve {
                node,
                address: configured.clone(),
                reason: crate::identity::os_reason(&error),
            })?;
        let timeout = || DialError::Timeout {
            node,
            address,
            after: CONNECT_TIMEOUT,
        };
        let link = match &self.dialer {
            Dialer::Quic { endpoint, config } => {
                let connection = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    dial_quic(endpoint, config, node, address),
                )
                .await
                .map_err(|_| timeout())??;
                Link::Quic(node, connection)
            }
            Dialer::Tcp(tls) => {
                // The first stream proves the node is there and who it is,
                // and serves the first request.
                let link = TcpLink::new(node, address, tls.clone());
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, link.connect())
                    .await
                    .map_err(|_| timeout())??;
                let link = Link::Tcp(link);
                let (recv, send) = tokio::io::split(stream);
                self.keep_stream(node, &link, Send::Tcp(send), Recv::Tcp(recv));
                link
            }
        };
        lock(&self.connections).insert(node, link.clone());
        Ok(link)
    }

    /// A stream to `node` on `link` left idle after its last request was
    /// answered. Many requests on one stream, one at a time, spare the node
    /// a stream (and a task) per request: 64 closed-loop clients wrote 10%
    /// more per second (BENCHMARKS.md).
    fn idle_stream(&self, node: NodeId, link: &Link) -> Option<(Send, Recv)> {
        let mut idle = lock(&self.idle_streams);
        let streams = idle.entry(node).or_default();
        // Streams of an earlier link to the node are dropped.
        streams.retain(|s| s.link == link.id());
        streams.pop().map(|s| (s.send, s.recv))
    }

    /// An idle stream to `node` (`idle_stream`), else a new one.
    async fn stream(&self, node: NodeId, link: &Link) -> Result<(Send, Recv)> {
        match self.idle_stream(node, link) {
            Some(stream) => Ok(stream),
            None => link.open().await,
        }
    }

    /// One request and its answer on a stream to `node`. A stream kept
    /// idle may have died meanwhile (the node restarted; over TCP nothing
    /// says so until it is used): then the request goes once more on a
    /// new stream, as any retry would (sends keep their sequence numbers).
    async fn exchange(
        &self,
        node: NodeId,
        link: &Link,
        request: &ClientRequest,
    ) -> Result<ClientResponse> {
        let idle = self.idle_stream(node, link);
        let reused = idle.is_some();
        let stream = match idle {
            Some(stream) => stream,
            None => link.open().await?,
        };
        match self.exchange_on(node, link, stream, request).await {
            Err(ClientError::Wire { .. } | ClientError::ClosedEarly(_)) if reused => {
                let stream = link.open().await?;
                self.exchange_on(node, link, stream, request).await
            }
            result => result,
        }
    }

    async fn exchange_on(
        &self,
        node: NodeId,
        link: &Link,
        (mut send, mut recv): (Send, Recv),
        request: &ClientRequest,
    ) -> Result<ClientResponse> {
        write_frame(&mut send, request).await.map_err(wire(node))?;
        let response = read_frame::<_, ClientResponse>(&mut recv)
            .await
            .map_err(wire(node))?
            .ok_or(ClientError::ClosedEarly(node))?;
        // After an error or a "busy" the node closes the stream (it reads
        // nothing behind a refused send): a new one for the next request.
        if !matches!(
            response,
            ClientResponse::Error { .. } | ClientResponse::Busy { .. }
        ) {
            self.keep_stream(node, link, send, recv);
        }
        Ok(response)
    }

    /// Keeps a stream whose request was answered for the next request.
    fn keep_stream(&self, node: NodeId, link: &Link, send: Send, recv: Recv) {
        let mut idle = lock(&self.idle_streams);
        let streams = idle.entry(node).or_default();
        if streams.len() < IDLE_STREAMS && link.is_open() {
            streams.push(IdleStream {
                link: link.id(),
                send,
                recv,
            });
        }
    }

    /// Drops a failed node's connection and avoids it for a while.
    fn forget(&self, node: NodeId) {
        if let Ok(mut connections) = self.connections.lock() {
            connections.remove(&node);
        }
        lock(&self.idle_streams).remove(&node);
        if let Ok(mut suspects) = self.suspects.lock() {
            suspects.insert(node, Instant::now() + SUSPECT_FOR);
        }
    }

    fn is_suspect(&self, node: NodeId) -> bool {
        let now = Instant::now();
        self.suspects
            .lock()
            .map(|s| s.get(&node).is_some_and(|until| *until > now))
            .unwrap_or(false)
    }

    /// The node to ask next: the known leader, else the next node in turn
    /// that has not failed recently.
    fn pick(&self, attempt: usize) -> NodeId {
        let nodes = self.nodes();
        let now = Instant::now();
        let suspect = |node: &NodeId| {
            self.suspects
                .lock()
                .map(|s| s.get(node).is_some_and(|until| *until > now))
                .unwrap_or(false)
        };
        if let Some(leader) = self.leader().filter(|l| !suspect(l)) {
            return leader;
        }
        (0..nodes.len())
            .map(|i| nodes[(attempt + i) % nodes.len()])
            .find(|n| !suspect(n))
            .unwrap_or(nodes[attempt % nodes.len()])
    }

    /// One request to one node.
    /// One request to one node, given up as a redirect as soon as another
    /// node reports a newer leader (for requests meant for the leader).
    pub async fn request(&self, node: NodeId, request: &ClientRequest) -> Result<ClientResponse> {
        match self.request_with(node, request, true, None).await {
            Err(ClientError::Superseded { leader, .. }) => Ok(ClientResponse::Redirect {
                leader: Some(leader),
            }),
            answer => answer,
        }
    }

    /// One request to one node; `follow_leader` as in `request`. Requests
    /// about a node itself (its status, its own replica) must not be
    /// abandoned when the leader changes elsewhere.
    ///
    /// With `copies`, a send unanswered after `race_after` also goes to the
    /// other nodes (`send_to_the_others`), and `copies` is set once it
    /// has: the message may then be in the log whatever this node answers.
    async fn request_with(
        &self,
        node: NodeId,
        request: &ClientRequest,
        follow_leader: bool,
        copies: Option<&AtomicBool>,
    ) -> Result<ClientResponse> {
        let connection = match self.connection(node).await {
            Ok(connection) => connection,
            // Said as a node's own "busy" answer is: without the node,
            // which whoever reports it names.
            Err(ClientError::Dial(DialError::Busy { address, .. })) => {
                return Ok(ClientResponse::Busy {
                    message: format!(
                        "refused the connection at {address}: busy with other handshakes, retry"
                    ),
                })
            }
            Err(error) => return Err(error),
        };
        let exchange = self.exchange(node, &connection, request);
        let started = Instant::now();
        let deadline = started + REQUEST_TIMEOUT;
        let dead = async {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if Instant::now() > deadline || !self.alive(node, &connection).await {
                    return;
                }
            }
        };
        let replaced = async {
            if follow_leader {
                self.newer_leader_than(node).await
            } else {
                std::future::pending().await
            }
        };
        let raced = async {
            match (request, copies) {
                (ClientRequest::Send { .. }, Some(copies)) if follow_leader => {
                    tokio::time::sleep(self.race_after()).await;
                    copies.store(true, Ordering::SeqCst);
                    self.send_to_the_others(node, request).await
                }
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(exchange, dead, replaced, raced);
        tokio::select! {
            result = &mut exchange => {
                if let Ok(response) = &result {
                    self.observe(started.elapsed(), response);
                }
                    if result.is_err() {
                        // A node over its connection limit is alive: retry
                        // it after a pause rather than suspecting it.
                        if let Some(message) = connection.busy() {
                            if let Ok(mut connections) = self.connections.lock() {
                                connections.remove(&node);
                            }
                            return Ok(ClientResponse::Busy { message });
                        }
                        self.forget(node);
                    }
                    result
            }
            sent = &mut raced => {
                // Another node took over and appended it: the request to
                // this one is abandoned, as a superseded one is.
                self.forget(node);
                Ok(sent)
            }
            leader = &mut replaced => {
                // Safe to abandon: the retry keeps its sequence numbers.
                self.forget(node);
                Err(ClientError::Superseded { node, leader })
            }
            () = &mut dead => {
                self.forget(node);
                Err(ClientError::Silent(node))
            }
        }
    }

    /// Learns from an answer: its latency, and the leader's term.
    fn observe(&self, latency: Duration, response: &ClientResponse) {
        let sample = latency.as_micros().min(u64::MAX as u128) as u64;
        let old = self.latency_us.load(Ordering::Relaxed);
        let average = if old == 0 {
            sample
        } else {
            (old * 7 + sample) / 8
        };
        self.latency_us.store(average, Ordering::Relaxed);
        self.learn_from(response);
    }

    /// Learns from an answer: the leader's term, and members.
    fn learn_from(&self, response: &ClientResponse) {
        match response {
            ClientResponse::Sent { committed, .. } => {
                if let Some(term) = committed.iter().map(|c| c.term).max() {
                    self.leader_term.fetch_max(term, Ordering::SeqCst);
                }
            }
            ClientResponse::Status(status) if status.leader.is_some() => {
                self.leader_term.fetch_max(status.term, Ordering::SeqCst);
            }
            // Only member requests widen the nodes a client knows: plain
            // sends and exports keep to the nodes they were given, plus a
            // leader added since (`learn_leader`).
            ClientResponse::Members(view) => {
                self.learn_members(&view.status.membership.addresses);
            }
            _ => {}
        }
    }

    /// Resolves once another node reports a leader other than `node`,
    /// elected in a later term than any leader this client has seen; never
    /// while `node` keeps leading. Starts asking after `LOOK_AFTER` (or
    /// three times the recent request latency).
    async fn newer_leader_than(&self, node: NodeId) -> NodeId {
        tokio::time::sleep(self.look_after()).await;
        self.leader_other_than(node, 1).await
    }

    /// How long a request waits before the client looks beyond its node:
    /// `LOOK_AFTER`, or three times the recent request latency if longer.
    fn look_after(&self) -> Duration {
        let typical = Duration::from_micros(self.latency_us.load(Ordering::Relaxed) * 3);
        LOOK_AFTER.max(typical)
    }

    /// How long a send waits before copies of it go to the other nodes:
    /// `LOOK_AFTER` past the recent request latency, or half that latency
    /// if longer. Sooner than the look for a newer leader: a copy must
    /// reach the next leader before it wins to save anything, and a live
    /// leader's followers turn a copy away at once.
    fn race_after(&self) -> Duration {
        let typical = Duration::from_micros(self.latency_us.load(Ordering::Relaxed));
        typical + LOOK_AFTER.max(typical / 2)
    }

    /// Sends `request` (a send) to every node but `node`, and resolves
    /// with the first that appends it; never, if none does. A voter whose
    /// leader has gone quiet holds the request until the election ends
    /// (`raft::held`): the winner appends it with its first entries, so a
    /// client across an ocean from the new leader does not first learn who
    /// won and then send (two one-way trips, ~0.15 s from Iowa to São
    /// Paulo). A voter that hears from a live leader redirects at once;
    /// while it names `node`, the copy goes again every `LOOK_EVERY` (a
    /// copy that left as `node` died met its last heartbeats on the way),
    /// `COPY_RESENDS` times at most. Sends over `COPY_MAX_BYTES` are not
    /// copied. Safe: every copy carries the same sequence numbers, so the
    /// message is appended once whoever appends it.
    async fn send_to_the_others(&self, node: NodeId, request: &ClientRequest) -> ClientResponse {
        let ClientRequest::Send { texts, .. } = request else {
            return std::future::pending().await;
        };
        if texts.iter().map(String::len).sum::<usize>() > COPY_MAX_BYTES {
            return std::future::pending().await;
        }
        let mut answers: futures_util::stream::FuturesUnordered<_> = self
            .nodes()
            .into_iter()
            .filter(|other| *other != node && !self.is_suspect(*other))
            .map(|other| async move {
                let connection = self.connection(other).await.ok()?;
                let mut answer = None;
                for _ in 0..=COPY_RESENDS {
                    match self.exchange(other, &connection, request).await.ok()? {
                        // It still heard from `node` lately (the copy went
                        // out right as `node` died): ask again shortly.
                        ClientResponse::Redirect {
                            leader: Some(leader),
                        } if leader == node => {
                            tokio::time::sleep(LOOK_EVERY).await;
                        }
                        other => {
                            answer = Some(other);
                            break;
                        }
                    }
                }
                answer
            })
            .collect();
        while let Some(answer) = futures_util::StreamExt::next(&mut answers).await {
            if let Some(sent @ ClientResponse::Sent { .. }) = answer {
                self.learn_from(&sent);
                return sent;
            }
        }
        std::future::pending().await
    }

    /// Resolves once another node reports a leader other than `node`
    /// elected at least `later` terms after the latest leader this client
    /// has seen: `newer_leader_than` without the wait, and with `later` 0
    /// for a node that failed (any other leader will do).
    async fn leader_other_than(&self, node: NodeId, later: u64) -> NodeId {
        loop {
            let known = self.leader_term.load(Ordering::SeqCst) + later;
            let mut answers: futures_util::stream::FuturesUnordered<_> = self
                .nodes()
                .into_iter()
                .filter(|other| *other != node && !self.is_suspect(*other))
                .map(|other| async move {
                    tokio::time::timeout(LOOK_TIMEOUT, self.status_of(other))
                        .await
                        .ok()
                        .and_then(|status| status.ok())
                })
                .collect();
            let next_look = tokio::time::sleep(LOOK_EVERY);
            tokio::pin!(next_look);
            while let Some(answer) = futures_util::StreamExt::next(&mut answers).await {
                let Some(status) = answer else { continue };
                if let Some(leader) = status.leader {
                    self.learn_leader(leader, &status.membership.addresses);
                    if leader != node && status.term >= known && self.knows(leader) {
                        self.leader_term.fetch_max(status.term, Ordering::SeqCst);
                        return leader;
                    }
                }
            }
            next_look.await;
        }
    }

    /// One status request, without retries or watchers.
    async fn status_of(&self, node: NodeId) -> Result<Status> {
        let connection = self.connection(node).await?;
        match self
            .exchange(node, &connection, &ClientRequest::Status)
            .await?
        {
            ClientResponse::Status(status) => Ok(*status),
            other => Err(unexpected(node, "a status request", &other)),
        }
    }

    /// Does the node answer a status request on this link in time? On an
    /// idle stream if there is one: over TCP a new stream is a new TLS
    /// connection, and a probe every 250 ms per slow request made a node
    /// that was already slow run handshakes for every waiting client.
    async fn alive(&self, node: NodeId, connection: &Link) -> bool {
        let probe = self.exchange(node, connection, &ClientRequest::Status);
        matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(_)))
    }

    fn leader(&self) -> Option<NodeId> {
        self.leader.lock().ok().and_then(|l| *l)
    }

    fn set_leader(&self, leader: Option<NodeId>) {
        if let Ok(mut slot) = self.leader.lock() {
            *slot = leader;
        }
    }

    /// Sends requests to the leader, following redirects and retrying
    /// across failures until `give_up_after`.
    async fn to_leader(&self, request: &ClientRequest) -> Result<(NodeId, ClientResponse)> {
        let deadline = Instant::now() + self.give_up_after;
        let mut attempt = 0usize;
        let mut last_error = String::from("no node answered");
        let mut busy_pause = Duration::from_millis(20);
        // Whether an attempt may have reached a leader that appended it.
        let mut maybe_sent = false;
        loop {
            if Instant::now() > deadline {
                return Err(ClientError::NoLeader {
                    after: self.give_up_after,
                    last: last_error,
                });
            }
            let target = self.pick(attempt);
            attempt += 1;
            let copies = AtomicBool::new(false);
            let answer = self
                .request_with(target, request, true, Some(&copies))
                .await;
            // Copies may be held elsewhere and appended later: whatever
            // this answer says, the request may have reached the log.
            if copies.load(Ordering::SeqCst) {
                maybe_sent = true;
            }
            if let Ok(ClientResponse::Redirect {
                leader: Some(leader),
            }) = &answer
            {
                if *leader != target && !self.knows(*leader) {
                    self.learn_leader_from(target, *leader).await;
                }
            }
            match answer {
                Ok(ClientResponse::Redirect {
                    leader: Some(leader),
                }) if leader != target && self.knows(leader) => {
                    // A leader we just saw fail is probably being replaced:
                    // give the election a moment instead of spinning.
                    if self.is_suspect(leader) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    self.set_leader(Some(leader));
                    continue;
                }
                Ok(ClientResponse::Busy { message }) => {
                    // Back-pressure: same node, same request, growing pause
                    // with jitter so refused clients do not return in step.
                    last_error = format!("node {target}: {message}");
                    let jitter = random_u64();
                    let pause = busy_pause
                        + Duration::from_millis(jitter % (busy_pause.as_millis() as u64 + 1));
                    tokio::time::sleep(pause).await;
                    busy_pause = (busy_pause * 2).min(Duration::from_secs(1));
                    attempt = attempt.saturating_sub(1);
                    continue;
                }
                Ok(ClientResponse::Redirect { .. }) => {
                    last_error = format!("node {target} knows no leader yet");
                    self.set_leader(None);
                }
                Ok(ClientResponse::Error {
                    message,
                    retry: true,
                    ..
                }) => {
                    maybe_sent = true;
                    last_error = format!("node {target}: {message}");
                    self.set_leader(None);
                }
                Ok(ClientResponse::Error {
                    message,
                    retry: false,
                    detail,
                }) => {
                    return Err(Refused {
                        node: target,
                        message,
                        detail,
                        first_attempt: !maybe_sent,
                    }
                    .into())
                }
                Ok(response) => return Ok(self.answered_by(target, response)),
                Err(e) => {
                    // A request no node could take fails here at once,
                    // not after every node has been tried for a minute.
                    if e.is_too_large() {
                        return Err(e);
                    }
                    maybe_sent = true;
                    if let ClientError::Superseded { leader, .. } = e {
                        self.set_leader(Some(leader));
                        continue;
                    }
                    last_error = e.to_string();
                    self.set_leader(None);
                    // The node failed (a crashed leader's TCP connections
                    // are reset at once): ask the others for its successor
                    // now, every `LOOK_EVERY`, rather than trying them in
                    // turn a pause apart while they elect it.
                    // A send also goes to the others after `LOOK_AFTER`, to
                    // be held by whichever wins (`send_to_the_others`).
                    if self.is_suspect(target) {
                        let search = tokio::time::timeout(
                            SUCCESSOR_SEARCH,
                            self.leader_other_than(target, 0),
                        );
                        let raced = async {
                            if !matches!(request, ClientRequest::Send { .. }) {
                                return std::future::pending().await;
                            }
                            tokio::time::sleep(LOOK_AFTER).await;
                            self.send_to_the_others(target, request).await
                        };
                        tokio::select! {
                            found = search => {
                                if let Ok(leader) = found {
                                    self.set_leader(Some(leader));
                                }
                            }
                            sent = raced => return Ok(self.answered_by(target, sent)),
                        }
                        continue;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes `response` from `target` as the leader's answer: a send names
    /// the leader that appended it, which may be another node (one that
    /// `send_to_the_others` reached); it is the leader from now on.
    fn answered_by(&self, target: NodeId, response: ClientResponse) -> (NodeId, ClientResponse) {
        let leader = match &response {
            ClientResponse::Sent { leader, .. } => *leader,
            _ => target,
        };
        self.set_leader(Some(leader));
        (leader, response)
    }

    /// Appends `texts` in order; each lands exactly once.
    pub async fn send(&self, texts: Vec<String>) -> Result<(NodeId, Vec<Committed>)> {
        if let Some((i, text)) = texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_MESSAGE_BYTES)
        {
            return Err(ClientError::TooLarge {
                number: i + 1,
                size: text.len(),
            });
        }
        let count = texts.len() as u64;
        let first_seq = self.next_seq.fetch_add(count, Ordering::SeqCst);
        self.send_at(first_seq, texts, None).await
    }

    /// Sends batches in order, up to `window` of them outstanding on one
    /// stream to the leader, which hands them to the log in that order;
    /// `each` sees every batch's result, in order. Whenever the leader
    /// changes or anything fails, the oldest unanswered batch is sent again
    /// on its own (with its original sequence numbers, in its session),
    /// which finds the leader; the rest follow it pipelined, each naming
    /// the one before it (`after`), so order and exactly-once survive the
    /// failure. (Sent again one at a time, the 64 batches a window holds
    /// took 64 round trips: 10 s at 7,000 msg/s across an ocean after a
    /// leader change.)
    pub async fn send_pipelined(
        &self,
        batches: impl Iterator<Item = Vec<String>>,
        window: usize,
        mut each: impl FnMut(NodeId, &[Committed]) -> Result<()>,
    ) -> Result<()> {
        let mut batches = batches.filter(|b| !b.is_empty());
        let mut unanswered: std::collections::VecDeque<(Session, u64, Vec<String>)> =
            Default::default();
        loop {
            // One ordinary send finds the leader (and retries until it
            // does): the oldest batch sent before and not answered, again
            // in the session it was sent in, or else the next one.
            let (leader, committed) = match unanswered.pop_front() {
                Some((session, first_seq, texts)) => {
                    self.send_at(first_seq, texts, Some(session)).await?
                }
                None => {
                    let Some(texts) = batches.next() else {
                        return Ok(());
                    };
                    let first_seq = self
                        .next_seq
                        .fetch_add(texts.len() as u64, Ordering::SeqCst);
                    self.send_at(first_seq, texts, None).await?
                }
            };
            each(leader, &committed)?;
            // On failure the unanswered batches go again from the top.
            if let Ok(true) = self
                .pipeline(
                    leader,
                    &mut batches,
                    &mut unanswered,
                    window.max(1),
                    &mut each,
                )
                .await
            {
                return Ok(());
            }
        }
    }

    /// The pipelined part of `send_pipelined`: first the batches still
    /// `unanswered` from an earlier stream, then new ones. `Ok(true)` when
    /// every batch was answered, `Ok(false)` when the leader answered
    /// anything but success (the caller falls back).
    async fn pipeline(
        &self,
        leader: NodeId,
        batches: &mut impl Iterator<Item = Vec<String>>,
        unanswered: &mut std::collections::VecDeque<(Session, u64, Vec<String>)>,
        window: usize,
        each: &mut impl FnMut(NodeId, &[Committed]) -> Result<()>,
    ) -> Result<bool> {
        let connection = self.connection(leader).await?;
        let (send, recv) = self.stream(leader, &connection).await?;
        // Requests written, answers read: each a future owning its half of
        // the stream, kept across rounds of the loop, so the answers are
        // read while a request waits for room. Waiting in the write (as
        // this did) deadlocked over TCP against a node that waited to
        // write its answers: 64 batches of 4,000 filled both ways.
        let mut to_write: std::collections::VecDeque<ClientRequest> = Default::default();
        let mut ahead: Option<&(Session, u64, Vec<String>)> = None;
        for resend in unanswered.iter() {
            let (session, first_seq, texts) = resend;
            let after = ahead.and_then(|ahead| follows(ahead, session));
            to_write.push_back(self.send_request(session, *first_seq, texts.clone(), after));
            ahead = Some(resend);
        }
        let mut idle_send = Some(send);
        let mut writing = std::pin::pin!(futures_util::future::Fuse::terminated());
        let mut idle_recv = Some(recv);
        let mut reading = std::pin::pin!(futures_util::future::Fuse::terminated());
        // A dead leader shows as an error here once QUIC's idle timeout
        // (3 s) closes the connection (at once over TCP: the node's
        // kernel resets it), or sooner as a newer leader; the look for
        // one starts again with each answer.
        let mut newer = Box::pin(self.newer_leader_than(leader));
        loop {
            while unanswered.len() < window {
                let Some(texts) = batches.next() else {
                    break;
                };
                let first_seq = self
                    .next_seq
                    .fetch_add(texts.len() as u64, Ordering::SeqCst);
                let session = self.session().await;
                // Behind a send still unanswered, this one must follow it
                // in the log: if the node refuses that one (a transfer
                // under way), this one is refused too rather than taken
                // before the retry.
                let after = unanswered.back().and_then(|ahead| follows(ahead, &session));
                to_write.push_back(self.send_request(&session, first_seq, texts.clone(), after));
                unanswered.push_back((session, first_seq, texts));
            }
            // Done once every batch is answered and the last write is over
            // (its flush can end after the answer came).
            if unanswered.is_empty() && idle_send.is_some() && idle_recv.is_some() {
                if let (Some(send), Some(recv)) = (idle_send.take(), idle_recv.take()) {
                    self.keep_stream(leader, &connection, send, recv);
                }
                return Ok(true);
            }
            if let Some(send) = idle_send.take() {
                match to_write.pop_front() {
                    Some(request) => writing.set(futures_util::FutureExt::fuse(write_frame_owned(
                        send, request,
                    ))),
                    None => idle_send = Some(send),
                }
            }
            if !unanswered.is_empty() {
                if let Some(recv) = idle_recv.take() {
                    reading.set(futures_util::FutureExt::fuse(read_frame_owned::<
                        _,
                        ClientResponse,
                    >(recv)));
                }
            }
            tokio::select! {
                (send, written) = &mut writing, if idle_send.is_none() => {
                    let written: Result<(), WireError> = written;
                    written.map_err(wire(leader))?;
                    idle_send = Some(send);
                }
                (recv, response) = &mut reading, if idle_recv.is_none() => {
                    idle_recv = Some(recv);
                    let response: Option<ClientResponse> = response.map_err(wire(leader))?;
                    let ClientResponse::Sent { committed, leader: answered_by } =
                        response.ok_or(ClientError::ClosedEarly(leader))?
                    else {
                        return Ok(false);
                    };
                    self.clock_past(&committed);
                    unanswered.pop_front();
                    each(answered_by, &committed)?;
                    newer = Box::pin(self.newer_leader_than(leader));
                }
                newer = &mut newer => {
                    self.forget(leader);
                    self.set_leader(Some(newer));
                    return Ok(false);
                }
            }
        }
    }

    /// A send of `texts` as sequence numbers `first_seq..` in `session`,
    /// stamped with this client's clock.
    fn send_request(
        &self,
        session: &Session,
        first_seq: u64,
        texts: Vec<String>,
        after: Option<u64>,
    ) -> ClientRequest {
        ClientRequest::Send {
            client_id: session.id,
            first_seq,
            lamport: self.lamport(),
            since: session.since.unwrap_or(0),
            texts,
            after,
        }
    }

    /// Moves this client's clock past the stamps of what it was told
    /// committed, so its next message is stamped after them.
    fn clock_past(&self, committed: &[Committed]) {
        if let Some(max) = committed.iter().map(|c| c.lamport).max() {
            self.lamport.fetch_max(max, Ordering::SeqCst);
        }
    }

    /// Appends `texts` as sequence numbers `first_seq..`; a retry with the
    /// same numbers is written once. `sent_in` is the session of an earlier
    /// attempt, if there was one: a retry goes in the same session. A
    /// session the cluster closed (idle while many other clients wrote) is
    /// renewed for what follows; the send itself is made again in the new
    /// session only if no attempt of it can be in the log.
    async fn send_at(
        &self,
        first_seq: u64,
        texts: Vec<String>,
        sent_in: Option<Session>,
    ) -> Result<(NodeId, Vec<Committed>)> {
        let mut texts = texts;
        let mut renewed = false;
        loop {
            let session = match sent_in {
                Some(session) => session,
                None => self.session().await,
            };
            let request = self.send_request(&session, first_seq, texts, None);
            let error = match self.to_leader(&request).await {
                Ok((leader, ClientResponse::Sent { committed, .. })) => {
                    self.clock_past(&committed);
                    return Ok((leader, committed));
                }
                Ok((node, other)) => return Err(unexpected(node, "a send", &other)),
                Err(error) => error,
            };
            let ClientError::Refused(refused) = &error else {
                return Err(error);
            };
            if refused.detail != Some(ProposeError::SessionClosed) {
                return Err(error);
            }
            self.renew_session(session.id);
            if renewed || sent_in.is_some() || !refused.first_attempt {
                return Err(error);
            }
            renewed = true;
            let ClientRequest::Send { texts: again, .. } = request else {
                return Err(error);
            };
            texts = again;
        }
    }

    /// The current session, its floor learned first if need be: the
    /// highest commit index the nodes report (any message sent after lands
    /// above every committed entry, and the highest makes the floor least
    /// likely to fall below a closed session). 0 if no node answers: the
    /// leader then takes the client for new unless sessions were ever
    /// closed.
    async fn session(&self) -> Session {
        let current = self.current_session();
        if current.since.is_some() {
            return current;
        }
        let answers: futures_util::stream::FuturesUnordered<_> = self
            .nodes()
            .into_iter()
            .map(|node| async move {
                tokio::time::timeout(LOOK_TIMEOUT, self.status_of(node))
                    .await
                    .ok()
                    .and_then(|status| status.ok())
                    .map(|status| status.commit)
            })
            .collect();
        let commits: Vec<Option<Index>> = futures_util::StreamExt::collect(answers).await;
        let Some(since) = commits.into_iter().flatten().max() else {
            return Session {
                since: Some(0),
                ..current
            };
        };
        match self.session.lock() {
            Ok(mut session) => {
                if session.id == current.id && session.since.is_none() {
                    session.since = Some(since);
                }
                *session
            }
            Err(_) => Session {
                since: Some(since),
                ..current
            },
        }
    }

    fn current_session(&self) -> Session {
        match self.session.lock() {
            Ok(session) => *session,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Starts a new session in place of `closed`: a new client id, its
    /// floor learned afresh (unless another task renewed it already).
    fn renew_session(&self, closed: u64) {
        if let Ok(mut session) = self.session.lock() {
            if session.id == closed {
                *session = Session {
                    id: random_u64(),
                    since: None,
                };
            }
        }
    }

    /// A linearizable read of the whole committed log, in order, collected
    /// in memory (`watch` streams it instead).
    pub async fn export(&self) -> Result<Vec<ExportedEntry>> {
        self.watch(Start::Index(1), Until::ReadIndex)
            .patience(Some(self.give_up_after))
            .collect()
            .await
    }

    /// What `node` itself has committed, from its own replica, collected in
    /// memory. A node that fails (busy, slow or restarting) is asked again
    /// until `give_up_after` passes without progress.
    pub async fn local_export(&self, node: NodeId) -> Result<Vec<ExportedEntry>> {
        self.watch(Start::Index(1), Until::Commit)
            .only(node)
            .patience(Some(self.give_up_after))
            .collect()
            .await
    }

    /// A linearizable read index: everything committed when it was asked
    /// lies at or below it.
    pub async fn read_index(&self) -> Result<Index> {
        let mut stream = self
            .watch(Start::Last(0), Until::ReadIndex)
            .patience(Some(self.give_up_after));
        while stream.next_page().await?.is_some() {}
        stream.end().ok_or(ClientError::NoReadIndex)
    }

    /// The committed log from `start` to `until`, page by page, from any
    /// member (see `LogStream`).
    pub fn watch(&self, start: Start, until: Until) -> LogStream<&Client> {
        LogStream::new(self, start, until)
    }

    /// Asks for a configuration change, following the leader; a leader
    /// that is not ready, or busy with another change or a transfer, is
    /// asked again until `patience` has passed. The outcome: the leader and
    /// the index the change committed at, or why it was refused.
    pub async fn change_membership(
        &self,
        change: &MembershipChange,
        patience: Duration,
    ) -> Result<(NodeId, Result<Index, ChangeError>)> {
        let deadline = Instant::now() + patience;
        let request = ClientRequest::ChangeMembership(change.clone());
        // Learns the leader and every member's address first: the leader
        // may be a node added after the client's --cluster list was made.
        if let Err(error) = self.members().await {
            tracing::debug!("no member list before the change: {error}");
        }
        loop {
            match self.to_leader(&request).await? {
                (_, ClientResponse::MembershipChanged { index, leader }) => {
                    return Ok((leader, Ok(index)))
                }
                (node, ClientResponse::ChangeRefused { error }) => {
                    let retry = matches!(
                        error,
                        ChangeError::LeaderNotReady
                            | ChangeError::ChangeInProgress { .. }
                            | ChangeError::TransferInProgress
                    );
                    if !retry || Instant::now() >= deadline {
                        return Ok((node, Err(error)));
                    }
                    tracing::debug!(node, "membership change refused for now: {error}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                (node, other) => return Err(unexpected(node, "a membership change", &other)),
            }
        }
    }

    /// The cluster's configuration, from the leader if one answers (it
    /// alone knows each member's match index and lag), else from the node
    /// that knows the latest configuration.
    pub async fn members(&self) -> Result<MembersView> {
        let mut asked = std::collections::BTreeSet::new();
        let mut queue: std::collections::VecDeque<NodeId> = self.leader().into_iter().collect();
        queue.extend(self.nodes());
        let mut best: Option<MembersView> = None;
        let mut errors = Vec::new();
        while let Some(node) = queue.pop_front() {
            if !self.knows(node) || !asked.insert(node) {
                continue;
            }
            let answer = tokio::time::timeout(
                LOOK_TIMEOUT * 5,
                self.request_with(node, &ClientRequest::Members, false, None),
            )
            .await;
            let view = match answer {
                Ok(Ok(ClientResponse::Members(view))) => *view,
                Ok(Ok(other)) => {
                    errors.push(unexpected(node, "a member list request", &other).to_string());
                    continue;
                }
                Ok(Err(error)) => {
                    errors.push(error.to_string());
                    continue;
                }
                Err(_) => {
                    errors.push(format!("node {node}: no answer in time"));
                    continue;
                }
            };
            if view.status.leader == Some(view.status.id) {
                self.set_leader(Some(node));
                return Ok(view);
            }
            if let Some(leader) = view.status.leader {
                queue.push_front(leader);
            }
            let newer = best.as_ref().is_none_or(|b| {
                (view.status.membership_index, view.status.commit)
                    > (b.status.membership_index, b.status.commit)
            });
            if newer {
                best = Some(view);
            }
        }
        best.ok_or(ClientError::NoAnswer(errors))
    }

    /// Every node's status, or why it did not answer: the nodes the client
    /// was given, and the members their answers name that it was not
    /// (added since). Fails if no node answers.
    pub async fn cluster_status(&self) -> Result<Vec<render::StatusAnswer>> {
        let mut answers = Vec::new();
        let mut asked = std::collections::BTreeSet::new();
        while let Some(node) = self.nodes().into_iter().find(|n| !asked.contains(n)) {
            asked.insert(node);
            match self.status(node).await {
                Ok(status) => {
                    self.learn_members(&status.membership.addresses);
                    answers.push(Ok(status))
                }
                Err(e) => answers.push(Err((node, e.to_string()))),
            }
        }
        if answers.iter().all(|s| s.is_err()) {
            let reasons: Vec<String> = answers
                .into_iter()
                .filter_map(Result::err)
                .map(|(_, error)| error)
                .collect();
            return Err(ClientError::NoAnswer(reasons));
        }
        Ok(answers)
    }

    pub async fn status(&self, node: NodeId) -> Result<Status> {
        match self
            .request_with(node, &ClientRequest::Status, false, None)
            .await?
        {
            ClientResponse::Status(status) => Ok(*status),
            other => Err(unexpected(node, "a status request", &other)),
        }
    }
}

/// A mutex's contents, even if a thread panicked holding it (nothing the
/// client keeps behind one is left half-changed).
/// A QUIC connection to `node` at `address`, from the node its
/// certificate says it is.
async fn dial_quic(
    endpoint: &Endpoint,
    config: &quinn::ClientConfig,
    node: NodeId,
    address: SocketAddr,
) -> Result<quinn::Connection> {
    let connect = |reason: String| DialError::Connect {
        node,
        address,
        reason,
    };
    let connection = match endpoint
        .connect_with(config.clone(), address, &node_server_name(node))
        .map_err(|error| connect(error.to_string()))?
        .await
    {
        Ok(connection) => connection,
        Err(quinn::ConnectionError::ConnectionClosed(close))
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return Err(DialError::Busy { node, address }.into())
        }
        Err(error) => return Err(connect(error.to_string()).into()),
    };
    link::is_node(node, address, peer_identity(&connection))?;
    Ok(connection)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A broken connection or stream to `node`.
fn link<E: std::fmt::Display>(node: NodeId) -> impl Fn(E) -> ClientError {
    move |error| ClientError::Link {
        node,
        reason: error.to_string(),
    }
}

/// A frame to or from `node` that failed.
/// What a pipelined send in `session` names as the message it must follow
/// (`ClientRequest::Send::after`): the last of the batch `ahead` of it on
/// its stream, if both are in one session.
fn follows(ahead: &(Session, u64, Vec<String>), session: &Session) -> Option<u64> {
    let (ahead_session, first, texts) = ahead;
    (ahead_session.id == session.id).then(|| first + texts.len() as u64 - 1)
}

fn wire(node: NodeId) -> impl Fn(WireError) -> ClientError {
    move |error| ClientError::Wire { node, error }
}

/// An answer from `node` that does not fit `request`.
fn unexpected(node: NodeId, request: &'static str, answer: &ClientResponse) -> ClientError {
    ClientError::Unexpected {
        node,
        request,
        answer: format!("{answer:?}"),
    }
}

/// Most messages `Batches` puts in one send request (the protocol allows
/// `MAX_BATCH`). With `PIPELINE_WINDOW` requests in flight this is what
/// one client keeps on the way: 1,000 capped a client whose commits took
/// 0.2 s (a round trip across an ocean plus the syncs and queues) near
/// 64,000 / 0.2 s = 320,000 msg/s; 2,000 took WAN pipelined from ~310,000
/// to ~350,000 msg/s (BENCHMARKS.md).
pub const LINES_PER_BATCH: usize = 2000;
const _: () = assert!(LINES_PER_BATCH <= MAX_BATCH);

/// Why `Batches` stopped before the end of its input.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(
        "line {line} is {size} bytes, over the limit of {MAX_MESSAGE_BYTES} bytes per message"
    )]
    TooLarge { line: u64, size: usize },
    #[error("reading line {line}: {error}")]
    Read { line: u64, error: std::io::Error },
}

/// Cuts lines of input into send batches of at most `LINES_PER_BATCH`
/// messages and `MAX_SEND_BYTES` bytes, so any batch fits a frame. A line
/// over the message limit (or a read error) ends the batches: the lines
/// before it are still sent, and `error` says which line stopped it.
pub struct Batches<I> {
    lines: I,
    line: u64,
    held: Option<String>,
    pub error: Option<BatchError>,
}

impl<I: Iterator<Item = std::io::Result<String>>> Batches<I> {
    pub fn new(lines: I) -> Self {
        Batches {
            lines,
            line: 0,
            held: None,
            error: None,
        }
    }
}

impl<I: Iterator<Item = std::io::Result<String>>> Iterator for Batches<I> {
    type Item = Vec<String>;

    fn next(&mut self) -> Option<Vec<String>> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while self.error.is_none() && batch.len() < LINES_PER_BATCH {
            let text = match self.held.take() {
                Some(text) => text,
                None => match self.lines.next() {
                    Some(Ok(text)) => {
                        self.line += 1;
                        text
                    }
                    Some(Err(error)) => {
                        self.error = Some(BatchError::Read {
                            line: self.line + 1,
                            error,
                        });
                        break;
                    }
                    None => break,
                },
            };
            if text.len() > MAX_MESSAGE_BYTES {
                self.error = Some(BatchError::TooLarge {
                    line: self.line,
                    size: text.len(),
                });
                break;
            }
            if !batch.is_empty() && bytes + text.len() > MAX_SEND_BYTES {
                self.held = Some(text);
                break;
            }
            bytes += text.len();
            batch.push(text);
        }
        (!batch.is_empty()).then_some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(texts: &[String]) -> impl Iterator<Item = std::io::Result<String>> + '_ {
        texts.iter().cloned().map(Ok)
    }

    #[test]
    fn batches_are_cut_by_bytes_and_count() {
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let input: Vec<String> = (0..20).map(|_| big.clone()).collect();
        let mut batches = Batches::new(lines(&input));
        let sizes: Vec<usize> = batches.by_ref().map(|b| b.len()).collect();
        assert!(batches.error.is_none());
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert_eq!(sizes, vec![4, 4, 4, 4, 4]);

        let small: Vec<String> = (0..2 * LINES_PER_BATCH + 500)
            .map(|i| i.to_string())
            .collect();
        let sizes: Vec<usize> = Batches::new(lines(&small)).map(|b| b.len()).collect();
        assert_eq!(sizes, vec![LINES_PER_BATCH, LINES_PER_BATCH, 500]);
    }

    #[test]
    fn a_line_over_the_limit_stops_the_batches_naming_it() {
        let mut input: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        input.push("y".repeat(MAX_MESSAGE_BYTES + 1));
        input.push("after".into());
        let mut batches = Batches::new(lines(&input));
        let sent: Vec<Vec<String>> = batches.by_ref().collect();
        assert_eq!(sent, vec![vec!["0", "1", "2", "3", "4"]]);
        match batches.error {
            Some(BatchError::TooLarge { line: 6, size }) => {
                assert_eq!(size, MAX_MESSAGE_BYTES + 1)
            }
            other => panic!("expected line 6 too large, got {other:?}"),
        }
    }
}
