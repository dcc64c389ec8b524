//! The client side: finds the leader, follows redirects, retries across
//! leader changes with the same sequence numbers (so each message is
//! written exactly once) and keeps a Lamport clock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use quinn::{Connection, Endpoint};

use crate::address::Address;
use crate::identity::{node_server_name, Identity};
use crate::raft::{Committed, NodeId, Status};
use crate::tls::{self, peer_identity, Credentials};
use crate::wire::{read_frame, write_frame, ClientRequest, ClientResponse, ExportedEntry};

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

pub struct Client {
    endpoint: Endpoint,
    cluster: BTreeMap<NodeId, Address>,
    connections: Mutex<HashMap<NodeId, Connection>>,
    leader: Mutex<Option<NodeId>>,
    /// Nodes that recently failed, and until when to avoid them.
    suspects: Mutex<HashMap<NodeId, Instant>>,
    client_id: u64,
    next_seq: AtomicU64,
    lamport: AtomicU64,
    /// How long `send` keeps retrying before giving up.
    pub give_up_after: Duration,
}

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
    pub fn new(cluster: BTreeMap<NodeId, Address>, creds: &Credentials) -> Result<Self> {
        if cluster.is_empty() {
            bail!("no cluster nodes given (use --cluster 1=host:port,...)");
        }
        let bind: SocketAddr = if cluster
            .values()
            .all(|a| a.literal().is_some_and(|a| a.is_ipv6()))
        {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let mut endpoint = Endpoint::client(bind).context("cannot open a UDP socket")?;
        endpoint.set_default_client_config(tls::client_config(creds)?);
        Ok(Client {
            endpoint,
            cluster,
            connections: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            suspects: Mutex::new(HashMap::new()),
            client_id: random_u64(),
            next_seq: AtomicU64::new(1),
            lamport: AtomicU64::new(0),
            give_up_after: Duration::from_secs(60),
        })
    }

    pub fn nodes(&self) -> Vec<NodeId> {
        self.cluster.keys().copied().collect()
    }

    pub fn lamport(&self) -> u64 {
        self.lamport.load(Ordering::SeqCst)
    }

    async fn connection(&self, node: NodeId) -> Result<Connection> {
        if let Some(connection) = self
            .connections
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .get(&node)
        {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
        }
        let configured = self
            .cluster
            .get(&node)
            .ok_or_else(|| anyhow!("node {node} is not in --cluster"))?;
        let address = configured
            .resolve()
            .await
            .with_context(|| format!("node {node}: cannot resolve {configured}"))?;
        let connecting = self.endpoint.connect(address, &node_server_name(node))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| anyhow!("node {node} at {address}: connection timed out"))?
            .with_context(|| format!("node {node} at {address}"))?;
        match peer_identity(&connection)? {
            Identity::Node(id) if id == node => {}
            other => bail!("{address} presented {other:?}, expected node {node}"),
        }
        self.connections
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(node, connection.clone());
        Ok(connection)
    }

    /// Drops a failed node's connection and avoids it for a while.
    fn forget(&self, node: NodeId) {
        if let Ok(mut connections) = self.connections.lock() {
            connections.remove(&node);
        }
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
    pub async fn request(&self, node: NodeId, request: &ClientRequest) -> Result<ClientResponse> {
        let connection = self.connection(node).await?;
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await?;
            write_frame(&mut send, request).await?;
            send.finish()?;
            read_frame::<_, ClientResponse>(&mut recv)
                .await?
                .ok_or_else(|| anyhow!("node {node} closed the stream without answering"))
        };
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        tokio::pin!(exchange);
        loop {
            tokio::select! {
                result = &mut exchange => {
                    if result.is_err() {
                        self.forget(node);
                    }
                    return result;
                }
                _ = tokio::time::sleep(PROBE_EVERY) => {
                    if Instant::now() > deadline || !self.alive(&connection).await {
                        self.forget(node);
                        bail!("node {node} stopped answering");
                    }
                }
            }
        }
    }

    /// Does the node answer a status request on this connection in time?
    async fn alive(&self, connection: &Connection) -> bool {
        let probe = async {
            let (mut send, mut recv) = connection.open_bi().await?;
            write_frame(&mut send, &ClientRequest::Status).await?;
            send.finish()?;
            read_frame::<_, ClientResponse>(&mut recv).await?;
            anyhow::Ok(())
        };
        matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(())))
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
        loop {
            if Instant::now() > deadline {
                bail!("gave up after {:?}: {last_error}", self.give_up_after);
            }
            let target = self.pick(attempt);
            attempt += 1;
            match self.request(target, request).await {
                Ok(ClientResponse::Redirect {
                    leader: Some(leader),
                }) if leader != target && self.cluster.contains_key(&leader) => {
                    // A leader we just saw fail is probably being replaced:
                    // give the election a moment instead of spinning.
                    if self.is_suspect(leader) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    self.set_leader(Some(leader));
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
                    last_error = format!("node {target}: {message}");
                    self.set_leader(None);
                }
                Ok(ClientResponse::Error {
                    message,
                    retry: false,
                    ..
                }) => bail!("node {target}: {message}"),
                Ok(response) => {
                    self.set_leader(Some(target));
                    return Ok((target, response));
                }
                Err(e) => {
                    last_error = format!("node {target}: {e:#}");
                    self.set_leader(None);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Appends `texts` in order; each lands exactly once.
    pub async fn send(&self, texts: Vec<String>) -> Result<(NodeId, Vec<Committed>)> {
        let count = texts.len() as u64;
        let first_seq = self.next_seq.fetch_add(count, Ordering::SeqCst);
        let request = ClientRequest::Send {
            client_id: self.client_id,
            first_seq,
            lamport: self.lamport(),
            texts,
        };
        match self.to_leader(&request).await? {
            (leader, ClientResponse::Sent { committed, .. }) => {
                if let Some(max) = committed.iter().map(|c| c.lamport).max() {
                    self.lamport.fetch_max(max, Ordering::SeqCst);
                }
                Ok((leader, committed))
            }
            (node, other) => bail!("node {node} answered a send with {other:?}"),
        }
    }

    /// A linearizable read of the whole committed log, in order.
    pub async fn export(&self) -> Result<Vec<ExportedEntry>> {
        let mut all = Vec::new();
        let mut from = 1;
        let mut upto = None;
        loop {
            let request = ClientRequest::Export {
                from,
                limit: crate::server::api::PAGE,
                upto,
            };
            match self.to_leader(&request).await? {
                (
                    _,
                    ClientResponse::Entries {
                        entries,
                        upto: end,
                        next,
                    },
                ) => {
                    all.extend(entries);
                    upto = Some(end);
                    if next > end || next == from {
                        return Ok(all);
                    }
                    from = next;
                }
                (node, other) => bail!("node {node} answered an export with {other:?}"),
            }
        }
    }

    /// What `node` itself has committed, from its own replica.
    pub async fn local_export(&self, node: NodeId) -> Result<Vec<ExportedEntry>> {
        let mut all = Vec::new();
        let mut from = 1;
        loop {
            let request = ClientRequest::LocalExport {
                from,
                limit: crate::server::api::PAGE,
            };
            match self.request(node, &request).await? {
                ClientResponse::Entries {
                    entries,
                    upto,
                    next,
                } => {
                    all.extend(entries);
                    if next > upto || next == from {
                        return Ok(all);
                    }
                    from = next;
                }
                other => bail!("node {node} answered a local export with {other:?}"),
            }
        }
    }

    pub async fn status(&self, node: NodeId) -> Result<Status> {
        match self.request(node, &ClientRequest::Status).await? {
            ClientResponse::Status(status) => Ok(*status),
            other => bail!("node {node} answered a status request with {other:?}"),
        }
    }
}

/// The stable text format of exports: one line per message,
/// `index<TAB>lamport<TAB>sender<TAB>text`, with backslash, tab and newline
/// in the text escaped as `\\`, `\t` and `\n`.
pub fn format_line(entry: &ExportedEntry) -> String {
    let mut text = String::with_capacity(entry.text.len());
    for c in entry.text.chars() {
        match c {
            '\\' => text.push_str("\\\\"),
            '\t' => text.push_str("\\t"),
            '\n' => text.push_str("\\n"),
            '\r' => text.push_str("\\r"),
            c => text.push(c),
        }
    }
    format!(
        "{}\t{}\t{}\t{}",
        entry.index, entry.lamport, entry.sender, text
    )
}

/// The JSON line format of exports: index, term, lamport, sender, text.
pub fn format_json(entry: &ExportedEntry) -> String {
    serde_json::json!({
        "index": entry.index,
        "term": entry.term,
        "lamport": entry.lamport,
        "sender": entry.sender,
        "text": entry.text,
    })
    .to_string()
}
