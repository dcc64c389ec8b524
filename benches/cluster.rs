//! `cargo bench --bench cluster`: the performance table of BENCHMARKS.md,
//! measured on real `node` processes (release build) on this machine:
//! loopback and a simulated three-continent WAN, one client, 64 clients, a
//! pipelined bulk client, catch-up, leader failover and memory. It reports;
//! it asserts nothing. `BENCH_RUNS` (default 3) repeats each measurement
//! and prints medians; `BENCH_SECONDS` (default 5) sizes the load phases.
//! `BENCH_TOPOLOGY=loopback`, `=wan` or `=none` (catch-up and memory only)
//! limits the run; `BENCH_CATCHUP` sets the catch-up size (0: skip it);
//! `BENCH_ONLY=one`, `=many` or `=pipelined` runs that load phase alone
//! (`BENCH_BATCH`: the pipelined client's messages per send, default
//! `client::LINES_PER_BATCH`, what `node send -` sends). `BENCH_NODES=5`
//! runs five voters instead of three (on the WAN, Frankfurt and Tokyo
//! join: `common::wan_delay`); any other value, three.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_store::client::Client;
use cluster_store::client::LINES_PER_BATCH;
use cluster_store::raft::NodeId;
use common::nodes::TestCluster;
use common::{closed_loop, env_u64, median, pipelined, start};

async fn leader_of(cluster: &TestCluster, admin: &Client) -> NodeId {
    cluster
        .wait_for_leader(admin, Duration::from_secs(30))
        .await
}

/// The leader once leadership has stopped moving: the same leader and
/// highest term `SETTLE` apart. After a kill the restarted node catches
/// up, and on the WAN topology (node 1 preferred) the leader then hands
/// over to it; a kill racing that hand-over hit a node that no longer led
/// (a 0.31 s "failover" with no election, lowering the median) or one
/// mid-transfer.
async fn settled_leader(cluster: &TestCluster, admin: &Client) -> NodeId {
    const SETTLE: Duration = Duration::from_millis(1500);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = (
        leader_of(cluster, admin).await,
        highest_term(cluster, admin).await,
    );
    loop {
        tokio::time::sleep(SETTLE).await;
        let now = (
            leader_of(cluster, admin).await,
            highest_term(cluster, admin).await,
        );
        if now == seen || Instant::now() > deadline {
            return now.0;
        }
        seen = now;
    }
}

/// The highest term any node reports: it grows with every election.
async fn highest_term(cluster: &TestCluster, admin: &Client) -> u64 {
    let mut term = 0;
    for id in cluster.voters.clone() {
        if let Ok(cluster_store::wire::ClientResponse::Status(status)) = admin
            .request(id, &cluster_store::wire::ClientRequest::Status)
            .await
        {
            term = term.max(status.term);
        }
    }
    term
}

/// Each node's `(id, last index, commit)`, to show how far behind a node is.
async fn positions(cluster: &TestCluster, admin: &Client) -> Vec<(NodeId, u64, u64)> {
    let mut rows = Vec::new();
    for id in cluster.voters.clone() {
        if let Ok(status) = admin.status(id).await {
            rows.push((id, status.last_index, status.commit));
        }
    }
    rows
}

/// kill -9 of the leader while `client` writes: time until a write lands
/// again. Prints, per kill, who was killed, how far each node was, how
/// many terms the election took and who won, so an outlier can be read.
async fn failover(cluster: &mut TestCluster, admin: &Client, client: &Client) -> Duration {
    let leader = settled_leader(cluster, admin).await;
    client.send(vec!["warm".into()]).await.ok();
    let before = positions(cluster, admin).await;
    let term_before = highest_term(cluster, admin).await;
    cluster.kill(leader);
    let killed = Instant::now();
    loop {
        if client.send(vec!["after".into()]).await.is_ok() {
            let elapsed = killed.elapsed();
            let term_after = highest_term(cluster, admin).await;
            let winner = leader_of(cluster, admin).await;
            eprintln!(
                "  kill of node {leader}: {:.2} s, terms {term_before} -> {term_after}, new leader {winner}; (node, last, commit) before {before:?}",
                elapsed.as_secs_f64()
            );
            cluster.launch(leader);
            cluster.wait_caught_up(admin, Duration::from_secs(60)).await;
            return elapsed;
        }
    }
}

/// A follower misses `count` messages, then restarts: its catch-up rate.
async fn catch_up(cluster: &mut TestCluster, admin: &Client, count: usize) -> (NodeId, f64) {
    let leader = leader_of(cluster, admin).await;
    let lagger = cluster
        .voters
        .iter()
        .copied()
        .find(|n| *n != leader)
        .unwrap_or(2);
    cluster.kill(lagger);
    let client = Arc::new(cluster.client("alice"));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let per = count / 4;
        tasks.push(tokio::spawn(async move {
            for _ in 0..per / 1000 {
                let texts: Vec<String> = (0..1000).map(|_| "x".repeat(100)).collect();
                client.send(texts).await.expect("a catch-up write");
            }
        }));
    }
    for task in tasks {
        task.await.expect("a catch-up writer");
    }
    // Every send was acknowledged, so the leader's log is committed to its
    // end; its reported commit can trail by the last batch, whose commit
    // index it has not synced yet (it reports only what survives a crash).
    // Aiming at that made the smoke's figure 30-40 msg/s: one entry.
    let target = admin
        .status(leader)
        .await
        .map(|s| s.last_index)
        .unwrap_or(0);
    let before = cluster_store::raft::Index::default();
    cluster.launch(lagger);
    let started = Instant::now();
    loop {
        if let Ok(status) = admin.status(lagger).await {
            if status.commit >= target {
                return (
                    lagger,
                    (target - before) as f64 / started.elapsed().as_secs_f64(),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident memory of one node process, in MB.
fn rss_mb(cluster: &TestCluster, id: NodeId) -> f64 {
    cluster
        .pid(id)
        .map_or(0.0, |pid| common::nodes::rss_kib(pid) as f64 / 1024.0)
}

fn main() {
    // `cargo bench` passes --bench. `cargo test --all-targets` runs this
    // binary without it: then one short loopback run checks that the
    // benchmark still works, without spending CI's minutes measuring.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        println!("smoke run (cargo test): one short loopback pass; `cargo bench` measures");
    }
    let runs = env_u64("BENCH_RUNS", if smoke { 1 } else { 3 }) as usize;
    let seconds = env_u64("BENCH_SECONDS", if smoke { 1 } else { 5 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "cluster-store benchmark: {runs} runs, {seconds} s load phases, 100-byte messages, medians"
    );
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows: Vec<(String, String)> = Vec::new();
    runtime.block_on(async {
        let only = std::env::var("BENCH_TOPOLOGY")
            .unwrap_or_else(|_| if smoke { "loopback".into() } else { String::new() });
        // Three voters, or the five sites `wan_delay` knows.
        let (nodes, lan, sites) = match env_u64("BENCH_NODES", 3) {
            5 => (5, "5 nodes, loopback", "5 nodes, WAN of 5 sites"),
            _ => (3, "loopback", "WAN 70/90/155 ms"),
        };
        for (topology, wan, ip) in [(lan, false, 150u8), (sites, true, 151)] {
            if only == "none" || (only == "wan" && !wan) || (only == "loopback" && wan) {
                continue;
            }
            let mut one = Vec::new();
            let mut one_p50 = Vec::new();
            let mut many = Vec::new();
            let mut many_p99 = Vec::new();
            let mut bulk = Vec::new();
            let mut failovers = Vec::new();
            let mut elections = 0;
            for run in 0..runs {
                let mut cluster = start(&format!("bench-{ip}-{run}"), ip, nodes, wan);
                let admin = cluster.client("client");
                leader_of(&cluster, &admin).await;
                tokio::time::sleep(Duration::from_secs(if wan { 3 } else { 1 })).await;
                // One phase alone, for quick A/B runs of a lever.
                match std::env::var("BENCH_ONLY").as_deref() {
                    Ok(phase @ ("one" | "many")) => {
                        let clients = if phase == "one" { 1 } else { 64 };
                        let load = closed_loop(&cluster, clients, seconds).await;
                        eprintln!(
                            "{clients} clients: {:.0}/s p50 {:.3} ms p99 {:.2} ms slowest {:.1} ms in {:.2} s",
                            load.throughput,
                            load.p50.as_secs_f64() * 1000.0,
                            load.p99.as_secs_f64() * 1000.0,
                            load.slowest.as_secs_f64() * 1000.0,
                            load.elapsed.as_secs_f64()
                        );
                        continue;
                    }
                    Ok("pipelined") => {
                        eprintln!("pipelined: {:.0}/s", pipelined(&cluster, seconds, env_u64("BENCH_BATCH", LINES_PER_BATCH as u64) as usize).await);
                        continue;
                    }
                    _ => {}
                }
                let term_before = highest_term(&cluster, &admin).await;
                let load = closed_loop(&cluster, 1, seconds).await;
                one.push(load.throughput);
                one_p50.push(load.p50.as_secs_f64() * 1000.0);
                let load = closed_loop(&cluster, 64, seconds).await;
                many.push(load.throughput);
                many_p99.push(load.p99.as_secs_f64() * 1000.0);
                bulk.push(pipelined(&cluster, seconds, LINES_PER_BATCH).await);
                let terms = highest_term(&cluster, &admin).await.saturating_sub(term_before);
                elections += terms;
                let mut kills = Vec::new();
                // On the WAN the writer stays in Iowa, next to the leader
                // it loses: after the kill it reaches the new leader
                // across the ocean.
                let writer = if wan {
                    common::client_at(&cluster, "bob", 1)
                } else {
                    cluster.client("bob")
                };
                for _ in 0..env_u64("BENCH_KILLS", if smoke { 1 } else { 4 }) {
                    kills.push(failover(&mut cluster, &admin, &writer).await.as_secs_f64());
                }
                eprintln!(
                    "{topology} run {run}: 1 client {:.0}/s p50 {:.3} ms; 64 clients {:.0}/s p99 {:.1} ms; pipelined {:.0}/s; elections under load {terms}; failovers {kills:.2?} s",
                    one[run], one_p50[run], many[run], many_p99[run], bulk[run]
                );
                failovers.extend(kills);
            }
            rows.push((format!("{topology}: 1 client"), format!("{:.0} msg/s, p50 {:.3} ms", median(one), median(one_p50))));
            rows.push((format!("{topology}: 64 clients"), format!("{:.0} msg/s, p99 {:.1} ms", median(many), median(many_p99))));
            rows.push((format!("{topology}: pipelined client"), format!("{:.0} msg/s", median(bulk))));
            rows.push((format!("{topology}: leader changes during the load phases"), format!("{elections} (terms gained over {runs} runs)")));
            let kills = failovers.len();
            let writer = if wan { ", client in Iowa" } else { "" };
            rows.push((format!("{topology}: leader kill -9 to writes again{writer}"), format!("{:.2} s (median of {kills})", median(failovers))));
        }
        let messages = env_u64("BENCH_CATCHUP", if smoke { 5_000 } else { 200_000 }) as usize;
        if messages == 0 {
            return;
        }
        let mut cluster = start("bench-catchup", 152, 3, false);
        let admin = cluster.client("client");
        leader_of(&cluster, &admin).await;
        let (lagger, rate) = catch_up(&mut cluster, &admin, messages).await;
        rows.push((format!("catch-up after missing {messages}"), format!("{rate:.0} msg/s")));
        let leader = leader_of(&cluster, &admin).await;
        let follower = cluster
            .voters
            .iter()
            .copied()
            .find(|n| *n != leader && *n != lagger)
            .unwrap_or(leader);
        rows.push((
            format!("RSS with {messages} messages: leader / follower / caught-up node"),
            format!(
                "{:.0} / {:.0} / {:.0} MB",
                rss_mb(&cluster, leader),
                rss_mb(&cluster, follower),
                rss_mb(&cluster, lagger)
            ),
        ));
        cluster.kill(lagger);
        cluster.launch(lagger);
        cluster.wait_caught_up(&admin, Duration::from_secs(60)).await;
        rows.push((
            format!("RSS of a node restarted with {messages} messages"),
            format!("{:.0} MB", rss_mb(&cluster, lagger)),
        ));
    });
    println!("\n| measurement | median |\n| --- | --- |");
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
}
