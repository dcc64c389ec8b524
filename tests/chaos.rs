//! A Jepsen-style chaos run of real `node` processes. Every node reaches
//! each peer it dials through a UDP fault proxy this test controls, so
//! links can be cut (both ways or one way), made lossy or slow. On top:
//! kill -9 and restarts, SIGSTOP pauses longer than the election timeout,
//! isolating the leader, several faults at once. Clients write throughout.
//! At the end everything heals and a checker verifies the promise of a
//! replicated log: every acknowledged message is in every replica exactly
//! once, at the index it was acknowledged at; all replicas are identical;
//! Lamport stamps strictly increase; a failed send is absent or present
//! once; and no two nodes led the same term (from their own logs).
//!
//! An operator's fault too: a node loses its disk (kill -9, data directory
//! wiped) and is brought back with `node rebuild` once every other node
//! answers, as the README tells an operator to.
//! The faults users cause run alongside: every node's dashboard is polled
//! (`/cluster`), writes also go through random nodes' HTTP APIs
//! (`--http-write`), messages range from a few bytes to the 1 MiB
//! limit, and a pipelined writer (as `node send -`) overruns the nodes'
//! bound on what waits to commit (`--max-pending-mb 1`): its batches must
//! be acknowledged at increasing log positions, in the order it sent them.
//!
//! A run is many short seeded fault schedules. Each is a few seconds of
//! faults under client load, then healing and a full check of everything
//! acknowledged so far, so one cluster carries its history from schedule
//! to schedule. Several clusters run side by side.
//! `CLUSTER_STORE_CHAOS_SCHEDULES` (default 100), `CLUSTER_STORE_CHAOS_SECONDS`
//! (fault time per schedule, default 3) and `CLUSTER_STORE_CHAOS_CLUSTERS`
//! (default 4) size the run: hours of it are one environment variable
//! away. `CLUSTER_STORE_CHAOS_LIFETIME` (schedules one cluster carries
//! before a fresh one replaces it, default: the whole run) keeps a long
//! run's checks as quick as a short run's: every schedule re-checks all
//! its cluster has acknowledged, and that grows with the cluster's age. `CLUSTER_STORE_CHAOS_SEED` replays one schedule on a fresh cluster.

mod nodes;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_store::raft::rng::Rng;
use cluster_store::raft::{Committed, NodeId};
use nodes::TestCluster;
use tokio::net::UdpSocket;

/// Faults on one direction of one link.
#[derive(Default)]
struct Direction {
    blocked: AtomicBool,
    /// Drop probability in per mille.
    loss: AtomicU32,
    delay_ms: AtomicU64,
}

impl Direction {
    fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
        self.loss.store(0, Ordering::SeqCst);
        self.delay_ms.store(0, Ordering::SeqCst);
    }
}

/// The proxy `dialer` uses to reach `acceptor`: both directions of their link.
struct Link {
    forward: Direction,
    backward: Direction,
}

/// Forwards `direction`-permitting datagrams, delayed or dropped as told.
async fn pass(
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
    direction: &Direction,
    rng: &Mutex<Rng>,
) {
    if direction.blocked.load(Ordering::SeqCst) {
        return;
    }
    let loss = direction.loss.load(Ordering::SeqCst) as u64;
    if loss > 0
        && rng
            .lock()
            .map(|mut r| r.range(0, 1000) < loss)
            .unwrap_or(false)
    {
        return;
    }
    let delay = direction.delay_ms.load(Ordering::SeqCst);
    if delay == 0 {
        let _ = socket.send_to(&data, to).await;
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let _ = socket.send_to(&data, to).await;
        });
    }
}

/// A UDP proxy in front of `target`, for one dialing node: its Raft link
/// and its HTTP side's requests, each source address with an upstream
/// socket of its own, as a NAT would.
async fn run_proxy(listen: Arc<UdpSocket>, target: SocketAddr, link: Arc<Link>, seed: u64) {
    let rng = Arc::new(Mutex::new(Rng::new(seed)));
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((len, from)) = listen.recv_from(&mut buf).await else {
            return;
        };
        // A restarted dialer comes from a new port: give it a new upstream.
        if let std::collections::hash_map::Entry::Vacant(slot) = upstreams.entry(from) {
            let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                continue;
            };
            let socket = Arc::new(socket);
            let back = (socket.clone(), listen.clone(), link.clone(), rng.clone());
            tokio::spawn(async move {
                let (socket, listen, link, rng) = back;
                let mut buf = vec![0u8; 65536];
                while let Ok((len, _)) = socket.recv_from(&mut buf).await {
                    pass(
                        listen.clone(),
                        from,
                        buf[..len].to_vec(),
                        &link.backward,
                        &rng,
                    )
                    .await;
                }
            });
            slot.insert(socket);
        }
        if let Some(socket) = upstreams.get(&from) {
            pass(
                socket.clone(),
                target,
                buf[..len].to_vec(),
                &link.forward,
                &rng,
            )
            .await;
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Default)]
struct History {
    acked: Vec<(String, Committed)>,
    failed: Vec<String>,
    /// Pipelined batches acknowledged out of the order they were sent in.
    disorder: Vec<String>,
}

struct Chaos {
    cluster: TestCluster,
    /// (from, to) -> the direction carrying from's datagrams to `to`.
    links: BTreeMap<(NodeId, NodeId), Arc<Link>>,
    rng: Rng,
    log: Vec<String>,
    started: Instant,
    /// Stopped nodes and when they get SIGCONT: always after longer than
    /// an election timeout, so the others move on without them.
    paused: HashMap<NodeId, Instant>,
    down: HashMap<NodeId, Instant>,
    /// Nodes whose disk was lost, and when the operator rebuilds them
    /// (`node rebuild`, which needs every other node to answer).
    wiped: HashMap<NodeId, Instant>,
    /// How often each kind of fault was injected, over the whole run.
    counts: BTreeMap<&'static str, u64>,
}

impl Chaos {
    fn direction(&self, from: NodeId, to: NodeId) -> &Direction {
        let (a, b) = (from.min(to), from.max(to));
        let link = &self.links[&(a, b)];
        if from == a {
            &link.forward
        } else {
            &link.backward
        }
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>6.2}s  {what}", self.started.elapsed().as_secs_f64());
        self.log.push(line);
    }

    fn heal_network(&mut self) {
        for link in self.links.values() {
            link.forward.heal();
            link.backward.heal();
        }
    }

    fn ids(&self) -> Vec<NodeId> {
        self.cluster.voters.clone()
    }

    async fn leader(&self) -> Option<NodeId> {
        let admin = self.cluster.client("client");
        for id in self.ids() {
            if self.paused.contains_key(&id) || self.down.contains_key(&id) {
                continue;
            }
            if let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_millis(500), admin.status(id)).await
            {
                if status.leader == Some(id) {
                    return Some(id);
                }
            }
        }
        None
    }

    /// One random fault (or two at once).
    async fn inject(&mut self) {
        let ids = self.ids();
        let kind = self.rng.range(0, 9);
        match kind {
            8 => {
                // A lost disk: only with every other node up and none still
                // catching up from an earlier rebuild, as an operator
                // rebuilds one node at a time. (Two in a row can leave the
                // first one's floor above every surviving log: it then
                // votes for no one, and only `rebuild --force` of the
                // second gets the cluster going again.)
                let target = ids[self.rng.range(0, ids.len() as u64) as usize];
                if self.down.is_empty()
                    && self.paused.is_empty()
                    && self.wiped.is_empty()
                    && !self.catching_up().await
                {
                    self.cluster.kill(target);
                    let _ = std::fs::remove_dir_all(self.cluster.data_dir(target));
                    let at = Instant::now() + Duration::from_millis(self.rng.range(300, 1500));
                    self.wiped.insert(target, at);
                    *self.counts.entry("lost disk").or_default() += 1;
                    self.note(format!("kill -9 node {target} and wipe its data directory"));
                }
            }
            0 | 1 => {
                let target = if kind == 0 { self.leader().await } else { None };
                let target =
                    target.unwrap_or_else(|| ids[self.rng.range(0, ids.len() as u64) as usize]);
                if !self.down.contains_key(&target)
                    && !self.paused.contains_key(&target)
                    && !self.wiped.contains_key(&target)
                {
                    self.cluster.kill(target);
                    *self
                        .counts
                        .entry(if kind == 0 { "kill leader" } else { "kill" })
                        .or_default() += 1;
                    let back = Instant::now() + Duration::from_millis(self.rng.range(500, 3000));
                    self.down.insert(target, back);
                    self.note(format!(
                        "kill -9 node {target}{}",
                        if kind == 0 { " (leader)" } else { "" }
                    ));
                }
            }
            2 => {
                let target = ids[self.rng.range(0, ids.len() as u64) as usize];
                if !self.down.contains_key(&target)
                    && !self.paused.contains_key(&target)
                    && !self.wiped.contains_key(&target)
                {
                    let until = Instant::now() + Duration::from_millis(self.rng.range(1200, 2500));
                    self.paused.insert(target, until);
                    self.cluster.signal(target, "STOP");
                    *self.counts.entry("pause").or_default() += 1;
                    self.note(format!("SIGSTOP node {target}"));
                }
            }
            3 => {
                let cut = ids[self.rng.range(0, ids.len() as u64) as usize];
                for other in ids.iter().filter(|o| **o != cut) {
                    self.direction(cut, *other)
                        .blocked
                        .store(true, Ordering::SeqCst);
                    self.direction(*other, cut)
                        .blocked
                        .store(true, Ordering::SeqCst);
                }
                *self.counts.entry("partition").or_default() += 1;
                self.note(format!("partition: node {cut} cut off"));
            }
            4 => {
                if let Some(leader) = self.leader().await {
                    for other in ids.iter().filter(|o| **o != leader) {
                        self.direction(leader, *other)
                            .blocked
                            .store(true, Ordering::SeqCst);
                        self.direction(*other, leader)
                            .blocked
                            .store(true, Ordering::SeqCst);
                    }
                    *self.counts.entry("isolate leader").or_default() += 1;
                    self.note(format!("isolate the leader, node {leader}"));
                }
            }
            5 => {
                let a = ids[self.rng.range(0, ids.len() as u64) as usize];
                let b = ids[self.rng.range(0, ids.len() as u64) as usize];
                if a != b {
                    self.direction(a, b).blocked.store(true, Ordering::SeqCst);
                    *self.counts.entry("one-way partition").or_default() += 1;
                    self.note(format!("one-way partition: {a} -> {b} cut"));
                }
            }
            6 => {
                let loss = self.rng.range(50, 300) as u32;
                for (a, b) in self.links.keys().copied().collect::<Vec<_>>() {
                    self.direction(a, b).loss.store(loss, Ordering::SeqCst);
                    self.direction(b, a).loss.store(loss, Ordering::SeqCst);
                }
                *self.counts.entry("loss").or_default() += 1;
                self.note(format!("{:.1}% packet loss everywhere", loss as f64 / 10.0));
            }
            _ => {
                let delay = self.rng.range(20, 150);
                for (a, b) in self.links.keys().copied().collect::<Vec<_>>() {
                    self.direction(a, b).delay_ms.store(delay, Ordering::SeqCst);
                }
                *self.counts.entry("delay").or_default() += 1;
                self.note(format!("{delay} ms extra delay one way on every link"));
            }
        }
    }

    /// Ends faults whose time is up; heals the network now and then.
    fn recover(&mut self, everything: bool) {
        let now = Instant::now();
        let due: Vec<NodeId> = self
            .down
            .iter()
            .filter(|(_, at)| everything || **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.down.remove(&id);
            self.cluster.launch(id);
            self.note(format!("restart node {id}"));
        }
        let paused: Vec<NodeId> = self
            .paused
            .iter()
            .filter(|(_, at)| everything || **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in paused {
            {
                self.paused.remove(&id);
                self.cluster.signal(id, "CONT");
                self.note(format!("SIGCONT node {id}"));
            }
        }
        if everything || self.rng.range(0, 3) == 0 {
            self.heal_network();
            self.note("network healed".into());
        }
        let wiped: Vec<NodeId> = self
            .wiped
            .iter()
            .filter(|(_, at)| everything || **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in wiped {
            self.rebuild(id, everything);
        }
    }

    /// Is a rebuilt node still below its catch-up floor (or silent)?
    async fn catching_up(&self) -> bool {
        let admin = self.cluster.client("client");
        for id in self.ids() {
            match tokio::time::timeout(Duration::from_secs(2), admin.status(id)).await {
                Ok(Ok(status)) if status.catch_up_floor.is_none() => {}
                _ => return true,
            }
        }
        false
    }

    /// `node rebuild` for a node whose disk was lost, then its start. It
    /// needs every other node's answer: while one is down, paused or cut
    /// off it refuses, and is tried again later (at the end of a schedule,
    /// until it succeeds). A wiped node never starts without it.
    fn rebuild(&mut self, id: NodeId, must: bool) {
        let data = self.cluster.data_dir(id).display().to_string();
        let deadline = Instant::now() + Duration::from_secs(if must { 60 } else { 0 });
        loop {
            let out = self
                .cluster
                .run_cli(&["rebuild", "--id", &id.to_string(), "--data", &data], None);
            if out.status.success() {
                self.wiped.remove(&id);
                self.cluster.launch(id);
                self.note(format!("rebuilt node {id} from its peers and started it"));
                return;
            }
            if Instant::now() >= deadline {
                let why = String::from_utf8_lossy(&out.stderr);
                self.note(format!(
                    "rebuild of node {id} refused for now: {}",
                    why.lines().last().unwrap_or_default()
                ));
                if must {
                    panic!("node {id} could not be rebuilt within 60 s: {why}");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The `i`th message of a writer: a key naming it and its total length,
/// then padding up to that length. Most are short, some a few KB, and
/// some exactly the largest a client may send. History keeps only keys.
fn message(writer: &str, seed: u64, i: u64) -> (String, String) {
    let total = match i % 150 {
        7 => cluster_store::wire::MAX_MESSAGE_BYTES,
        n if n % 10 == 3 => 1000 + (i * 7919 % 4000) as usize,
        _ => 40 + (i * 31 % 200) as usize,
    };
    let key = format!("{writer}-{seed}-{i}/{total}");
    let pad = total.saturating_sub(key.len() + 1);
    let text = format!("{key}~{}", "x".repeat(pad));
    (key, text)
}

/// The key of an exported message, if its text is whole (as `message`
/// made it).
fn key_of(text: &str) -> Result<&str, String> {
    let Some((key, pad)) = text.split_once('~') else {
        return Ok(text);
    };
    let total: usize = key
        .rsplit('/')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(text.len());
    if text.len() != total.max(key.len() + 1) || pad.bytes().any(|b| b != b'x') {
        return Err(format!(
            "{key}: {} bytes arrived, {total} were sent",
            text.len()
        ));
    }
    Ok(key)
}

async fn client_loop(
    client: Arc<cluster_store::client::Client>,
    name: &'static str,
    seed: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let (key, text) = message(name, seed, i);
        match client.send(vec![text]).await {
            Ok((_, committed)) => history
                .lock()
                .expect("history")
                .acked
                .push((key, committed[0])),
            Err(_) => history.lock().expect("history").failed.push(key),
        }
    }
}

/// `node send -`'s way of writing: batches of small messages pipelined on
/// one stream, against nodes whose bound on what waits to commit
/// (`--max-pending-mb 1`) the pipeline overruns, so sends wait for room or
/// are answered "busy" while faults strike. The answers must come back at
/// increasing log positions, in the order the batches were read: a
/// refused batch once landed after the ones written behind it.
async fn pipeline_loop(
    client: Arc<cluster_store::client::Client>,
    seed: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) {
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        // Keys of the batches sent and not yet answered, oldest first.
        let sent: Arc<Mutex<std::collections::VecDeque<Vec<String>>>> = Arc::default();
        let mut i = 0u64;
        let batches = std::iter::from_fn(|| {
            if stop.load(Ordering::SeqCst) || i >= 6_000 {
                return None;
            }
            let batch: Vec<(String, String)> = (0..1000)
                .map(|_| {
                    i += 1;
                    let key = format!("pipe-{seed}-{round}-{i}");
                    let text = format!("{key}~{}", "x".repeat(100));
                    (key, text)
                })
                .collect();
            let (keys, texts) = batch.into_iter().unzip();
            if let Ok(mut sent) = sent.lock() {
                sent.push_back(keys);
            }
            Some(texts)
        });
        let mut last = 0;
        let result = client
            .send_pipelined(batches, 64, |_, committed| {
                let keys = sent
                    .lock()
                    .ok()
                    .and_then(|mut sent| sent.pop_front())
                    .unwrap_or_default();
                let mut history = history.lock().expect("history");
                for (key, c) in keys.into_iter().zip(committed) {
                    if c.index <= last {
                        history.disorder.push(format!(
                            "{key} acknowledged at {} after an earlier batch's {last}",
                            c.index
                        ));
                    }
                    last = c.index;
                    history.acked.push((key, *c));
                }
                Ok(())
            })
            .await;
        let unanswered: Vec<String> = sent
            .lock()
            .map(|mut sent| sent.drain(..).flatten().collect())
            .unwrap_or_default();
        history.lock().expect("history").failed.extend(unanswered);
        // A round of 6,000 now and then, as `node send -` batches them
        // (1,000 a batch, 64 in flight): enough to overrun the bound
        // (1,024 KiB, a KiB per small message), few enough that every
        // schedule's full check stays quick. With 100 a batch and a
        // 2 MiB bound, 12 schedules of the code before the fix found
        // nothing; this way its first schedule did.
        let _ = result;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// One HTTP/1.1 exchange with a node's HTTP side; `None` if it is down,
/// paused or too slow.
async fn http(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_string()))
}

/// Dashboards left open on every node: `/cluster` polled as the page does.
async fn dashboard_loop(ip: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        for id in [3, 2, 1] {
            let _ = http(&format!("{ip}:{}", http_port(id)), "GET", "/cluster").await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes through the HTTP API of a node drawn at random, which forwards
/// them to the leader; short messages only (they travel in the URL).
async fn http_writer_loop(
    ip: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) {
    let mut rng = Rng::new(seed ^ 0x4854_5450);
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let key = format!("http-{seed}-{i}");
        let node = rng.range(1, 4);
        let answer = http(
            &format!("{ip}:{}", http_port(node)),
            "POST",
            &format!("/?message={key}"),
        )
        .await;
        let committed = answer.and_then(|(code, body)| {
            let value: serde_json::Value = serde_json::from_str(&body).ok()?;
            (code == 200).then_some(())?;
            Some(Committed {
                index: value["index"].as_u64()?,
                term: value["term"].as_u64()?,
                lamport: value["lamport"].as_u64()?,
            })
        });
        {
            let mut history = history.lock().expect("history");
            match committed {
                Some(committed) => history.acked.push((key, committed)),
                None => history.failed.push(key),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn http_port(id: NodeId) -> u16 {
    8000 + id as u16
}

/// Starts a three-node cluster whose links all pass through fault proxies.
async fn start_chaos(name: &str, ip: u8, seed: u64) -> Result<Chaos, String> {
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut cluster = TestCluster::prepare(name, ip, &ids);
    // One proxy per pair; the lower id dials, through it.
    let mut links = BTreeMap::new();
    for (i, a) in ids.iter().enumerate() {
        let mut view = Vec::new();
        for b in &ids {
            if b <= a {
                view.push(format!("{b}={}", cluster.addr(*b)));
                continue;
            }
            let link = Arc::new(Link {
                forward: Direction::default(),
                backward: Direction::default(),
            });
            let socket = Arc::new(
                UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?,
            );
            let proxy_addr = socket.local_addr().map_err(|e| e.to_string())?;
            tokio::spawn(run_proxy(
                socket,
                cluster.addr(*b),
                link.clone(),
                seed ^ ((i as u64 + 1) * 7919) ^ *b,
            ));
            links.insert((*a, *b), link);
            view.push(format!("{b}={proxy_addr}"));
        }
        cluster.views.insert(*a, view.join(","));
    }
    for id in &ids {
        cluster.set_args(
            *id,
            vec![
                "--http".into(),
                format!("{}:{}", cluster.ip, http_port(*id)),
                "--http-write".into(),
                "--max-pending-mb".into(),
                "1".into(),
            ],
        );
        cluster.launch(*id);
    }
    let chaos = Chaos {
        cluster,
        links,
        rng: Rng::new(seed),
        log: Vec::new(),
        started: Instant::now(),
        paused: HashMap::new(),
        down: HashMap::new(),
        wiped: HashMap::new(),
        counts: BTreeMap::new(),
    };
    let admin = chaos.cluster.client("client");
    chaos
        .cluster
        .wait_for_leader(&admin, Duration::from_secs(30))
        .await;
    Ok(chaos)
}

/// One seeded schedule on a running cluster: faults under load for
/// `seconds`, then heal and check everything `history` holds, from this
/// schedule and the ones before it on the same cluster.
async fn run_schedule(
    chaos: &mut Chaos,
    seed: u64,
    seconds: u64,
    history: &Arc<Mutex<History>>,
) -> Result<String, String> {
    chaos.rng = Rng::new(seed);
    chaos.log.clear();
    chaos.started = Instant::now();
    let admin = chaos.cluster.client("client");
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let mut client = chaos.cluster.client(name);
        client.give_up_after = Duration::from_secs(8);
        tasks.push(tokio::spawn(client_loop(
            Arc::new(client),
            name,
            seed,
            stop.clone(),
            history.clone(),
        )));
    }
    let mut piper = chaos.cluster.client("alice");
    piper.give_up_after = Duration::from_secs(8);
    tasks.push(tokio::spawn(pipeline_loop(
        Arc::new(piper),
        seed,
        stop.clone(),
        history.clone(),
    )));
    tasks.push(tokio::spawn(dashboard_loop(
        chaos.cluster.ip.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(http_writer_loop(
        chaos.cluster.ip.clone(),
        seed,
        stop.clone(),
        history.clone(),
    )));
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(chaos.rng.range(300, 1000))).await;
        chaos.recover(false);
        chaos.inject().await;
        if chaos.rng.range(0, 4) == 0 {
            chaos.inject().await;
        }
    }
    chaos.recover(true);
    chaos.note("healed everything; clients finish".into());
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = task.await;
    }
    chaos
        .cluster
        .wait_for_leader(&admin, Duration::from_secs(30))
        .await;
    // A final write through the healed cluster makes every node catch up.
    admin
        .send(vec![format!("final-{seed}")])
        .await
        .map_err(|e| format!("seed {seed}: cluster unusable after healing: {e:#}"))?;
    chaos
        .cluster
        .wait_caught_up(&admin, Duration::from_secs(60))
        .await;
    // An operator's restart on the idle cluster: with no write to come,
    // the restarted node must still report everything it holds as
    // committed (a node once came back reporting its witness's older
    // commit until the next write).
    let ids = chaos.ids();
    let restarted = ids[chaos.rng.range(0, ids.len() as u64) as usize];
    chaos.cluster.kill(restarted);
    chaos.cluster.launch(restarted);
    chaos.note(format!("kill -9 node {restarted} and restart it, idle"));
    chaos
        .cluster
        .wait_caught_up(&admin, Duration::from_secs(30))
        .await;

    let history = history.lock().expect("history").clone();
    let (problems, export_len, terms) = check(&chaos.cluster, &admin, &history).await;
    let summary = format!(
        "seed {seed}: {} acknowledged, {} failed sends so far, {} entries, {} leader terms\n  {}",
        history.acked.len(),
        history.failed.len(),
        export_len,
        terms,
        chaos.log.join("\n  ")
    );
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}\nPROBLEMS:\n  {}\nreplay: CLUSTER_STORE_CHAOS_SEED={seed} cargo test --release --test chaos -- --nocapture", problems.join("\n  ")))
    }
}

/// The checker: compares what clients were told with what every replica
/// holds, and the nodes' own records of who led which term. Returns the
/// problems found, the export's length and the number of terms with a
/// leader.
async fn check(
    cluster: &TestCluster,
    admin: &cluster_store::client::Client,
    history: &History,
) -> (Vec<String>, usize, usize) {
    let mut problems = history.disorder.clone();
    let export = match admin.export().await {
        Ok(export) => export,
        Err(e) => return (vec![format!("export failed: {e:#}")], 0, 0),
    };
    for id in &cluster.voters {
        match admin.local_export(*id).await {
            Ok(replica) if replica == export => {}
            Ok(replica) => problems.push(format!(
                "node {id}'s replica ({} entries) differs from the export ({})",
                replica.len(),
                export.len()
            )),
            Err(e) => problems.push(format!("node {id}: {e:#}")),
        }
    }
    for pair in export.windows(2) {
        if pair[0].lamport >= pair[1].lamport {
            problems.push(format!("stamps do not increase at index {}", pair[1].index));
        }
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut by_index: HashMap<u64, &str> = HashMap::new();
    for entry in &export {
        match key_of(&entry.text) {
            Ok(key) => {
                *count.entry(key).or_default() += 1;
                by_index.insert(entry.index, key);
            }
            Err(damage) => problems.push(format!("index {}: {damage}", entry.index)),
        }
    }
    for (text, committed) in &history.acked {
        match count.get(text.as_str()) {
            Some(1) if by_index.get(&committed.index) == Some(&text.as_str()) => {}
            Some(1) => problems.push(format!(
                "{text} acknowledged at index {} but found elsewhere",
                committed.index
            )),
            Some(n) => problems.push(format!("{text} acknowledged and present {n} times")),
            None => problems.push(format!(
                "{text} acknowledged at index {} but lost",
                committed.index
            )),
        }
    }
    for text in &history.failed {
        if count.get(text.as_str()).copied().unwrap_or(0) > 1 {
            problems.push(format!("{text} failed and is present more than once"));
        }
    }
    let mut leaders: HashMap<u64, NodeId> = HashMap::new();
    for id in &cluster.voters {
        for line in cluster
            .log(*id)
            .lines()
            .filter(|l| l.contains("became leader"))
        {
            let term = line
                .split("term=")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|t| t.parse().ok());
            if let Some(term) = term {
                if let Some(other) = leaders.insert(term, *id) {
                    if other != *id {
                        problems.push(format!("nodes {other} and {id} both led term {term}"));
                    }
                }
            }
        }
    }
    (problems, export.len(), leaders.len())
}

/// A checker is only worth something if it can fail. With the disk sync
/// skipped on purpose (a node test hook), killing every node at once loses
/// acknowledged messages, and the checker says so; with the sync intact,
/// the same crash loses nothing.
/// The two tests of this file start many node processes: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn checker_catches_acknowledgements_without_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for (sabotage, ip) in [(false, 90), (true, 91)] {
        let problems = runtime.block_on(crash_everything(sabotage, ip));
        if sabotage {
            assert!(
                problems.iter().any(|p| p.contains("but lost")),
                "the checker missed acknowledged messages lost without a sync: {problems:?}"
            );
            println!(
                "with the sync skipped, the checker found: {} (and {} more)",
                problems[0],
                problems.len() - 1
            );
        } else {
            assert!(
                problems.is_empty(),
                "a crash of every node lost data: {problems:?}"
            );
        }
    }
}

/// Writes for a while, then kill -9 of every node at once, restart, check.
async fn crash_everything(sabotage: bool, ip: u8) -> Vec<String> {
    let ids = [1, 2, 3];
    let mut cluster = TestCluster::prepare(&format!("sabotage-{sabotage}"), ip, &ids);
    if sabotage {
        cluster
            .env
            .push(("CLUSTER_STORE_UNSAFE_SKIP_SYNC".into(), "1".into()));
    }
    for id in ids {
        cluster.launch(id);
    }
    let admin = cluster.client("client");
    cluster
        .wait_for_leader(&admin, Duration::from_secs(30))
        .await;
    let client = cluster.client("alice");
    let mut history = History::default();
    // At least 1.5 s and 200 acknowledgements: on a loaded machine the
    // first sends alone can take longer than that.
    let until = Instant::now() + Duration::from_millis(1500);
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while (Instant::now() < until || history.acked.len() < 200) && Instant::now() < give_up {
        i += 1;
        let text = format!("alice-{i}");
        match client.send(vec![text.clone()]).await {
            Ok((_, committed)) => history.acked.push((text, committed[0])),
            Err(_) => history.failed.push(text),
        }
    }
    for id in ids {
        cluster.kill(id);
    }
    for id in ids {
        cluster.launch(id);
    }
    cluster
        .wait_for_leader(&admin, Duration::from_secs(30))
        .await;
    if admin.send(vec!["after the crash".into()]).await.is_err() {
        return vec!["the cluster did not come back".into()];
    }
    // The sabotaged store applies what it acknowledged only when a write
    // comes 3 s after the last one it applied (`storage/unsynced.rs`): one
    // more write after that long, or its leader could never serve the
    // export (a client that reconnects at once writes within those 3 s).
    // Both runs do the same, so the one without sabotage stays the control.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    if admin.send(vec!["after the deferral".into()]).await.is_err() {
        return vec!["the cluster stopped taking writes after the crash".into()];
    }
    cluster
        .wait_caught_up(&admin, Duration::from_secs(60))
        .await;
    check(&cluster, &admin, &history).await.0
}

#[test]
fn acknowledged_messages_survive_seeded_faults() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let seconds = env_u64("CLUSTER_STORE_CHAOS_SECONDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(seed) = std::env::var("CLUSTER_STORE_CHAOS_SEED") {
        let seed: u64 = seed
            .parse()
            .expect("CLUSTER_STORE_CHAOS_SEED must be a number");
        let report = runtime.block_on(async {
            let mut chaos = start_chaos(&format!("chaos-replay-{seed}"), 80, seed).await?;
            run_schedule(&mut chaos, seed, seconds, &Arc::default()).await
        });
        match report {
            Ok(summary) => println!("{summary}"),
            Err(report) => panic!("{report}"),
        }
        return;
    }
    let schedules = env_u64("CLUSTER_STORE_CHAOS_SCHEDULES", 100);
    let clusters = env_u64("CLUSTER_STORE_CHAOS_CLUSTERS", 4).clamp(1, 40);
    let lifetime = env_u64("CLUSTER_STORE_CHAOS_LIFETIME", schedules).max(1) as usize;
    let started = Instant::now();
    let results = runtime.block_on(async {
        let mut runners = Vec::new();
        for c in 0..clusters {
            runners.push(tokio::spawn(async move {
                let seeds: Vec<u64> = (1..=schedules).filter(|s| s % clusters == c).collect();
                let mut passed = 0;
                let mut acked = 0;
                let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
                for (generation, seeds) in seeds.chunks(lifetime).enumerate() {
                    let mut chaos = start_chaos(
                        &format!("chaos-{c}-{generation}"),
                        30 + c as u8,
                        seeds.first().copied().unwrap_or(0),
                    )
                    .await?;
                    let history = Arc::new(Mutex::new(History::default()));
                    for &seed in seeds {
                        let summary = run_schedule(&mut chaos, seed, seconds, &history).await?;
                        println!("{summary}");
                        passed += 1;
                    }
                    acked += history.lock().expect("history").acked.len();
                    for (kind, n) in &chaos.counts {
                        *counts.entry(kind).or_default() += n;
                    }
                }
                Ok::<_, String>((passed, acked, counts))
            }));
        }
        let mut results = Vec::new();
        for runner in runners {
            results.push(runner.await.map_err(|e| e.to_string()).and_then(|r| r));
        }
        results
    });
    let mut passed = 0;
    let mut acked = 0;
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for result in results {
        match result {
            Ok((p, a, c)) => {
                passed += p;
                acked += a;
                for (kind, n) in c {
                    *counts.entry(kind).or_default() += n;
                }
            }
            Err(report) => panic!("{report}"),
        }
    }
    println!(
        "{passed} fault schedules passed the checker on {clusters} clusters side by side (a fresh one every {lifetime} schedules) in {:.0} s; {acked} acknowledged messages checked; faults injected: {counts:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(passed, schedules);
    // A chaos run that never partitions proves nothing: every kind of
    // fault must really have happened.
    if schedules >= 50 {
        for kind in [
            "kill",
            "kill leader",
            "pause",
            "partition",
            "isolate leader",
            "one-way partition",
            "loss",
            "delay",
        ] {
            assert!(
                counts.get(kind).copied().unwrap_or(0) > 0,
                "no {kind} fault in {schedules} schedules: {counts:?}"
            );
        }
    }
}
