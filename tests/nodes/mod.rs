//! Real `node` processes on loopback for end-to-end tests. Each cluster
//! gets its own 127.0.0.x address and temporary directory, and every
//! process is killed when the cluster is dropped.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_store::client::{Client, Transport};
use cluster_store::identity;
use cluster_store::raft::{NodeId, Role};
use cluster_store::tls::Credentials;
use cluster_store::wire::ExportedEntry;

pub const BIN: &str = env!("CARGO_BIN_EXE_node");

/// Real clusters share this machine's two cores: tests that start one run
/// one at a time, each on its own two-worker runtime. One at a time across
/// processes too (a lock file): `cargo nextest` runs every test in a
/// process of its own, two side by side here, and a mutex in each process
/// serialised nothing.
pub fn serial<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let _lock = lock_file("serial", "another test process runs a cluster");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(test());
}

/// An exclusive lock on `name` among the test processes' lock files,
/// waited for (saying `why`) if another process holds it; released when
/// the file is dropped.
fn lock_file(name: &str, why: &str) -> std::fs::File {
    let dir = std::env::temp_dir().join("cluster-store-test-locks");
    std::fs::create_dir_all(&dir).expect("test locks directory");
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("{why}: waiting for it");
            file.lock()
                .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
        }
        Err(std::fs::TryLockError::Error(e)) => panic!("lock {}: {e}", path.display()),
    }
    file
}

/// The binary the cluster's nodes run: `BIN`, or another build named by
/// `CLUSTER_STORE_NODE_BIN` (to compare two versions in one benchmark
/// sitting).
fn server_bin() -> String {
    std::env::var("CLUSTER_STORE_NODE_BIN").unwrap_or_else(|_| BIN.to_string())
}

pub struct TestCluster {
    pub dir: PathBuf,
    pub ip: String,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Nodes started with `--join` (added with `node member add`): clients
    /// name them too.
    pub joined: Vec<NodeId>,
    children: BTreeMap<NodeId, Child>,
    /// Extra command-line arguments per node.
    extra: BTreeMap<NodeId, Vec<String>>,
    /// Per-node address books (`--peers`), for routing through proxies.
    pub views: BTreeMap<NodeId, String>,
    /// Environment variables for every node.
    pub env: Vec<(String, String)>,
    /// Declared last: released after `Drop` killed the nodes.
    _claim: AddressClaim,
}

/// A hold on one loopback address (127.0.0.x, every port) for as long as a
/// test uses it. `cargo nextest` runs each test in a process of its own,
/// side by side, and two tests that picked the same address took each
/// other's messages: the chaos test and the overlap test both failed on
/// 127.0.0.30, and the demo shared 127.0.0.18 with the pipeline test. A
/// claim held by another process is waited for (`lock_file`); one held in
/// this process is a test bug and panics rather than wait forever.
pub struct AddressClaim {
    octet: u8,
    _lock: std::fs::File,
}

/// Octets claimed in this process.
static CLAIMED: std::sync::Mutex<std::collections::BTreeSet<u8>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Claims 127.0.0.`octet`, waiting while another test process holds it.
pub fn claim_address(octet: u8) -> AddressClaim {
    let fresh = CLAIMED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(octet);
    assert!(
        fresh,
        "127.0.0.{octet} is already claimed in this test process: give the second cluster an address of its own"
    );
    let lock = lock_file(
        &format!("127.0.0.{octet}"),
        &format!("127.0.0.{octet} is in use by another test process"),
    );
    AddressClaim { octet, _lock: lock }
}

impl Drop for AddressClaim {
    fn drop(&mut self) {
        CLAIMED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.octet);
    }
}

/// Resident memory of a process in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn port(id: NodeId) -> u16 {
    7000 + id as u16
}

/// Arguments that make node `id` of `nodes` (on 127.0.0.`ip`) hold each
/// datagram from a peer for `delay_ms(id, peer)` (`--simulate-delay`), with
/// node 1 preferred as leader.
pub fn delayed_args(
    ip: u8,
    id: NodeId,
    nodes: &[NodeId],
    delay_ms: impl Fn(NodeId, NodeId) -> u64,
) -> Vec<String> {
    let spec: Vec<String> = nodes
        .iter()
        .filter(|peer| **peer != id)
        .map(|peer| format!("127.0.0.{ip}:{}={}ms", port(*peer), delay_ms(id, *peer)))
        .collect();
    vec![
        "--simulate-delay".into(),
        spec.join(","),
        "--priorities".into(),
        "1=10".into(),
    ]
}

impl TestCluster {
    /// Makes certificates and starts every node.
    pub fn start(name: &str, ip_octet: u8, voters: &[NodeId], learners: &[NodeId]) -> Self {
        Self::start_with(name, ip_octet, voters, learners, |_| Vec::new())
    }

    /// Like `start`, with extra arguments for each node.
    pub fn start_with(
        name: &str,
        ip_octet: u8,
        voters: &[NodeId],
        learners: &[NodeId],
        extra: impl Fn(NodeId) -> Vec<String>,
    ) -> Self {
        let mut cluster = Self::prepare_members(name, ip_octet, voters, learners);
        for id in voters.iter().chain(learners) {
            cluster.extra.insert(*id, extra(*id));
            cluster.launch(*id);
        }
        cluster
    }

    /// Makes certificates only; nodes start with `launch` once `views` are set.
    pub fn prepare(name: &str, ip_octet: u8, voters: &[NodeId]) -> Self {
        Self::prepare_members(name, ip_octet, voters, &[])
    }

    /// Claims 127.0.0.`ip_octet` (`claim_address`), and makes a fresh
    /// directory and certificates for `voters` and `learners`.
    fn prepare_members(name: &str, ip_octet: u8, voters: &[NodeId], learners: &[NodeId]) -> Self {
        let claim = claim_address(ip_octet);
        let dir = std::env::temp_dir().join(format!("cluster-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let all: Vec<String> = voters
            .iter()
            .chain(learners)
            .map(|n| n.to_string())
            .collect();
        let status = Command::new(BIN)
            .args(["certs", "init", "--out"])
            .arg(dir.join("certs"))
            .args(["--nodes", &all.join(","), "--clients", "alice,bob,carol"])
            .stdout(Stdio::null())
            .status()
            .expect("run node certs init");
        assert!(status.success(), "node certs init failed");
        TestCluster {
            dir,
            ip: format!("127.0.0.{ip_octet}"),
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            joined: Vec::new(),
            children: BTreeMap::new(),
            extra: BTreeMap::new(),
            views: BTreeMap::new(),
            env: Vec::new(),
            _claim: claim,
        }
    }

    /// Extra command-line arguments for `id` from its next launch on.
    pub fn set_args(&mut self, id: NodeId, args: Vec<String>) {
        self.extra.insert(id, args);
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to a running node.
    pub fn signal(&self, id: NodeId, signal: &str) {
        if let Some(child) = self.children.get(&id) {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
        }
    }

    pub fn addr(&self, id: NodeId) -> SocketAddr {
        format!("{}:{}", self.ip, port(id))
            .parse()
            .expect("socket address")
    }

    fn spec(&self, ids: &[NodeId]) -> String {
        ids.iter()
            .map(|id| format!("{id}={}", self.addr(*id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `id=address,...` for the given nodes.
    pub fn spec_of(&self, ids: &[NodeId]) -> String {
        self.spec(ids)
    }

    pub fn peers_spec(&self) -> String {
        self.spec(&self.voters)
    }

    /// Every node, voters, learners and joined nodes, as clients name them.
    pub fn cluster_spec(&self) -> String {
        self.spec(&self.all())
    }

    fn all(&self) -> Vec<NodeId> {
        self.voters
            .iter()
            .chain(&self.learners)
            .chain(&self.joined)
            .copied()
            .collect()
    }

    /// Signs a certificate for a new node with the cluster's CA, as an
    /// operator does before adding a machine (`node certs add-node`).
    pub fn add_node_cert(&self, id: NodeId) {
        let status = Command::new(BIN)
            .args(["certs", "add-node", &id.to_string(), "--out"])
            .arg(self.certs())
            .stdout(Stdio::null())
            .status()
            .expect("run node certs add-node");
        assert!(status.success(), "node certs add-node {id} failed");
    }

    /// Starts node `id` with an empty data directory and `--join`, naming
    /// the nodes in `via`: it learns the configuration from them.
    pub fn launch_joining(&mut self, id: NodeId, via: &[NodeId]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))
            .expect("log file");
        let mut command = Command::new(server_bin());
        command
            .args(["--id", &id.to_string(), "--join", &self.spec(via)])
            .args(["--listen", &self.addr(id).to_string()])
            .arg("--data")
            .arg(self.data_dir(id))
            .arg("--certs")
            .arg(self.certs())
            .env("RUST_LOG", node_log_filter())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(extra) = self.extra.get(&id) {
            command.args(extra);
        }
        let child = command.spawn().expect("spawn node");
        self.children.insert(id, child);
        if !self.all().contains(&id) {
            self.joined.push(id);
        }
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.join(format!("data/node-{id}"))
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    pub fn launch(&mut self, id: NodeId) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))
            .expect("log file");
        let mut command = Command::new(server_bin());
        command
            .args([
                "--id",
                &id.to_string(),
                "--peers",
                &self
                    .views
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| self.peers_spec()),
            ])
            .arg("--data")
            .arg(self.data_dir(id))
            .arg("--certs")
            .arg(self.certs())
            .env("RUST_LOG", node_log_filter())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log);
        if !self.learners.is_empty() {
            command.args(["--learner", &self.spec(&self.learners)]);
        }
        if let Some(extra) = self.extra.get(&id) {
            command.args(extra);
        }
        let child = command.spawn().expect("spawn node");
        self.children.insert(id, child);
    }

    /// kill -9.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut child) = self.children.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for a node that should stop on its own (a refused start) and
    /// returns its exit status, or `None` if it is still running.
    pub fn wait_exit(&mut self, id: NodeId, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(child) = self.children.get_mut(&id) {
                if let Ok(Some(status)) = child.try_wait() {
                    self.children.remove(&id);
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The process id of a running node.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.children.get(&id).map(Child::id)
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.children.values().map(Child::id).collect()
    }

    pub fn is_running(&self, id: NodeId) -> bool {
        self.children.contains_key(&id)
    }

    pub fn log(&self, id: NodeId) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{id}.log"))).unwrap_or_default()
    }

    /// Waits until node `id` has logged `needle`; panics with its log if
    /// it has not within `within`.
    pub async fn wait_for_log(&self, id: NodeId, needle: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while !self.log(id).contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} did not log {needle:?} within {within:?}:\n{}",
                self.log(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn client(&self, name: &str) -> Client {
        self.client_with(name, &self.certs())
    }

    /// A client over the transport `CLUSTER_STORE_CLIENT_TRANSPORT` names
    /// (`tcp` or `quic`), else the default: the benchmarks compare the two.
    pub fn client_with(&self, name: &str, certs: &Path) -> Client {
        self.client_over(name, certs, client_transport())
    }

    pub fn client_over(&self, name: &str, certs: &Path, transport: Transport) -> Client {
        Client::with_transport(
            self.cluster_map(),
            &self.client_creds(name, certs),
            transport,
        )
        .expect("client")
    }

    /// A client `name` dialing from `endpoint`, which other clients share.
    pub fn client_on(&self, name: &str, endpoint: quinn::Endpoint) -> Client {
        Client::on_endpoint(
            self.cluster_map(),
            &self.client_creds(name, &self.certs()),
            endpoint,
        )
        .expect("client")
    }

    pub fn client_creds(&self, name: &str, certs: &Path) -> Credentials {
        let (ca, _) = identity::ca_path(certs);
        let (cert, key) = identity::client_cert_path(certs, name);
        Credentials::load(&ca, &cert, &key).expect("client credentials")
    }

    fn cluster_map(&self) -> std::collections::BTreeMap<NodeId, cluster_store::address::Address> {
        self.all()
            .into_iter()
            .map(|id| (id, self.addr(id).into()))
            .collect()
    }

    /// Waits until the running nodes agree on one leader.
    pub async fn wait_for_leader(&self, client: &Client, within: Duration) -> NodeId {
        let deadline = Instant::now() + within;
        loop {
            let mut leaders = Vec::new();
            for id in self.children.keys() {
                if let Ok(status) = client.status(*id).await {
                    if status.role == Role::Leader {
                        leaders.push((status.term, *id));
                    }
                }
            }
            leaders.sort();
            if let Some((_, leader)) = leaders.last() {
                return *leader;
            }
            assert!(Instant::now() < deadline, "no leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node has committed the leader's whole log.
    pub async fn wait_caught_up(&self, client: &Client, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut commits = Vec::new();
            let mut leader_last = None;
            for id in self.children.keys() {
                if let Ok(status) = client.status(*id).await {
                    if status.role == Role::Leader {
                        leader_last = Some(status.last_index);
                    }
                    commits.push(status.commit);
                }
            }
            if let Some(last) = leader_last {
                if commits.len() == self.children.len() && commits.iter().all(|c| *c == last) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not catch up within {within:?}: commits {commits:?}, leader log {leader_last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A stopped node's committed log, read from its store by `node export --local`.
    pub fn local_export(&self, id: NodeId) -> Vec<String> {
        assert!(
            !self.is_running(id),
            "stop node {id} before reading its store"
        );
        export_local(&self.data_dir(id))
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs `node` with the client arguments of this cluster.
    pub fn run_cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--cluster")
            .arg(self.cluster_spec())
            .arg("--certs")
            .arg(self.certs())
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run node");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("node output")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids: Vec<NodeId> = self.children.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
        // KEEP_CLUSTER_FILES keeps logs and stores to read after a run.
        if !std::thread::panicking() && std::env::var_os("KEEP_CLUSTER_FILES").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("cluster files kept in {}", self.dir.display());
        }
    }
}

/// What `node export --local` prints for the data directory `data`.
pub fn export_local(data: &Path) -> String {
    let output = Command::new(BIN)
        .args(["export", "--local", "--data"])
        .arg(data)
        .output()
        .expect("run node export --local");
    assert!(
        output.status.success(),
        "export --local failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 export")
}

/// Checks the properties every export must have: each text once, stamps
/// strictly increasing in log order.
pub fn check_export(entries: &[ExportedEntry]) {
    let mut seen = std::collections::HashSet::new();
    for pair in entries.windows(2) {
        assert!(pair[0].index < pair[1].index, "export out of log order");
        assert!(
            pair[0].lamport < pair[1].lamport,
            "Lamport stamps do not increase: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    for entry in entries {
        assert!(
            seen.insert((entry.sender.clone(), entry.text.clone())),
            "{:?} appears twice",
            entry
        );
    }
}

/// The nodes' `RUST_LOG`: `info`, or `TEST_NODE_LOG` to read more of what
/// they did (with `KEEP_CLUSTER_FILES` to keep their logs).
fn node_log_filter() -> String {
    std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "info".into())
}

/// The client transport tests and benchmarks use: `CLUSTER_STORE_CLIENT_TRANSPORT`
/// (`tcp` or `quic`), else the library's default.
pub fn client_transport() -> Transport {
    match std::env::var("CLUSTER_STORE_CLIENT_TRANSPORT") {
        Ok(name) => name
            .parse()
            .unwrap_or_else(|error| panic!("CLUSTER_STORE_CLIENT_TRANSPORT: {error}")),
        Err(_) => Transport::default(),
    }
}
