//! What the benchmarks share: clusters of real `node` processes, the
//! simulated WAN between them, and the client workloads.
#![allow(dead_code)]

#[path = "../../tests/nodes/mod.rs"]
pub mod nodes;

use std::time::{Duration, Instant};

use cluster_store::client::Transport;
use cluster_store::raft::NodeId;
use nodes::TestCluster;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One-way delays between the sites of the original deployment, Iowa (1),
/// São Paulo (2) and Sydney (3), and, for five nodes, Frankfurt (4) and
/// Tokyo (5).
pub fn wan_delay(a: NodeId, b: NodeId) -> u64 {
    match (a.min(b), a.max(b)) {
        (1, 2) => 70,
        (1, 3) => 155,
        (2, 3) => 90,
        (1, 4) => 50,
        (1, 5) => 70,
        (2, 4) => 100,
        (2, 5) => 130,
        (3, 4) => 140,
        (3, 5) => 55,
        _ => 115,
    }
}

/// Starts `nodes` voters, on a simulated WAN if `wan`.
pub fn start(name: &str, ip: u8, nodes: u64, wan: bool) -> TestCluster {
    let ids: Vec<NodeId> = (1..=nodes).collect();
    TestCluster::start_with(name, ip, &ids, &[], |id| {
        if !wan {
            return Vec::new();
        }
        // Iowa should lead (it is nearest to the others on average).
        let mut args = nodes::delayed_args(ip, id, &ids, wan_delay);
        // Requests from a client at another site (`client_at`) cross the
        // same ocean as its answers.
        for site in ids.iter().filter(|site| **site != id) {
            args[1].push_str(&format!(
                ",127.0.0.{ip}:{}={}ms",
                client_port(*site),
                wan_delay(id, *site)
            ));
        }
        args
    })
}

/// The UDP port of the client at node `site`'s site (`client_at`).
fn client_port(site: NodeId) -> u16 {
    7100 + site as u16
}

/// The QUIC client at node `site`'s site of a WAN cluster (`start`): the
/// datagrams it receives from every other node wait out the one-way delay
/// between the two sites, and so do theirs from it; to and from `site`'s
/// node, none. A
/// client next to the leader stays where it is when the leader dies. One
/// per site at a time: it holds the site's client port.
pub fn client_at(cluster: &TestCluster, name: &str, site: NodeId) -> cluster_store::client::Client {
    let delays = cluster
        .voters
        .iter()
        .filter(|node| **node != site)
        .map(|node| {
            let delay = cluster_store::latency::LinkDelay {
                delay: Duration::from_millis(wan_delay(site, *node)),
                ..Default::default()
            };
            (cluster.addr(*node), delay)
        })
        .collect();
    let bind = format!("{}:{}", cluster.ip, client_port(site));
    let socket = std::net::UdpSocket::bind(&bind).expect("a client socket");
    let socket =
        cluster_store::latency::DelayedSocket::new(socket, delays).expect("a delayed socket");
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .expect("a client endpoint");
    cluster.client_on(name, endpoint)
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub struct Load {
    pub throughput: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// The slowest acknowledged write: a stall shows here first.
    pub slowest: Duration,
    /// From the first write to the last answer (past `seconds` by the
    /// writes in flight at the end, or by a stalled one).
    pub elapsed: Duration,
}

/// Runs `clients` closed-loop tasks for `seconds`: `client(c, until)` is
/// task `c`, writing one message at a time until `until` and returning the
/// latency of each acknowledged write.
pub async fn closed_loop_with<F, Fut>(clients: usize, seconds: u64, client: F) -> Load
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
{
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| tokio::spawn(client(c, until)))
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    all.sort();
    Load {
        throughput: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        slowest: all.last().copied().unwrap_or_default(),
        elapsed,
    }
}

/// `clients` clients each sending one message at a time for `seconds`.
pub async fn closed_loop(cluster: &TestCluster, clients: usize, seconds: u64) -> Load {
    // A socket per client, like NATS's connection per client.
    // `BENCH_SHARED_SOCKET=1` puts them all on one (`Client::on_endpoint`):
    // less client CPU, the same throughput, but a slow start on the WAN
    // topology that is not understood yet (BENCHMARKS.md).
    let shared = std::env::var_os("BENCH_SHARED_SOCKET").is_some().then(|| {
        cluster
            .client_over("client", &cluster.certs(), Transport::Quic)
            .endpoint()
            .cloned()
            .expect("a QUIC client has an endpoint")
    });
    closed_loop_with(clients, seconds, |c, until| {
        let name = ["alice", "bob", "carol"][c % 3];
        let client = match &shared {
            Some(endpoint) => cluster.client_on(name, endpoint.clone()),
            None => cluster.client(name),
        };
        async move {
            let mut latencies = Vec::new();
            let payload = "x".repeat(100);
            while Instant::now() < until {
                let started = Instant::now();
                if client.send(vec![payload.clone()]).await.is_ok() {
                    latencies.push(started.elapsed());
                }
            }
            latencies
        }
    })
    .await
}

/// One client sending batches of `batch` messages for `seconds` the way
/// `node send -` does: in order on one stream, `PIPELINE_WINDOW` batches
/// outstanding. Messages committed per second.
pub async fn pipelined(cluster: &TestCluster, seconds: u64, batch: usize) -> f64 {
    let client = cluster.client("alice");
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let texts: Vec<String> = (0..batch).map(|_| "x".repeat(100)).collect();
    let batches = std::iter::from_fn(|| (Instant::now() < until).then(|| texts.clone()));
    let mut total = 0usize;
    let _ = client
        .send_pipelined(
            batches,
            cluster_store::client::PIPELINE_WINDOW,
            |_, committed| {
                total += committed.len();
                Ok(())
            },
        )
        .await;
    total as f64 / started.elapsed().as_secs_f64()
}
