//! `cargo bench --bench commit`: criterion measurements of commit latency
//! and throughput on real `node` processes (release build): three and five
//! voters, on loopback and on a simulated WAN (Iowa, São Paulo, Sydney, and
//! for five nodes Frankfurt and Tokyo), with one client, 64 clients and a
//! pipelined client. Criterion reports time per message and messages per
//! second; under `cargo test` each case runs once, as a smoke test.
//! `BENCH_TOPOLOGY=loopback` or `=wan` limits the run.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

use common::nodes::TestCluster;

/// Sends `count` messages, one at a time from one client.
async fn one_client(client: &cluster_store::client::Client, count: u64) -> Duration {
    let payload = "x".repeat(100);
    let started = Instant::now();
    for _ in 0..count {
        let _ = client.send(vec![payload.clone()]).await;
    }
    started.elapsed()
}

/// Sends `count` messages spread over 64 clients, one at a time each.
async fn many_clients(clients: &[Arc<cluster_store::client::Client>], count: u64) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per = count / clients.len() as u64;
    for client in clients {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let payload = "x".repeat(100);
            for _ in 0..per {
                let _ = client.send(vec![payload.clone()]).await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    started.elapsed()
}

/// Sends `count` messages from one client as batches of up to 1,000, the
/// way `node send -` does (`PIPELINE_WINDOW` batches in flight on one
/// stream).
async fn pipelined(client: &Arc<cluster_store::client::Client>, count: u64) -> Duration {
    let started = Instant::now();
    let batches = (0..count.div_ceil(1000)).map(|i| {
        let size = (count - i * 1000).min(1000) as usize;
        (0..size).map(|_| "x".repeat(100)).collect::<Vec<String>>()
    });
    let _ = client
        .send_pipelined(batches, cluster_store::client::PIPELINE_WINDOW, |_, _| {
            Ok(())
        })
        .await;
    started.elapsed()
}

fn topology(c: &mut Criterion, runtime: &tokio::runtime::Runtime, nodes: u64, wan: bool, ip: u8) {
    let name = format!("{}-{nodes}-nodes", if wan { "wan" } else { "loopback" });
    // Clients open their QUIC endpoints on this runtime.
    let _runtime = runtime.enter();
    let cluster: TestCluster = common::start(&format!("criterion-{ip}"), ip, nodes, wan);
    let admin = cluster.client("client");
    runtime.block_on(async {
        cluster
            .wait_for_leader(&admin, Duration::from_secs(30))
            .await;
        // On the WAN, let the preferred leader take over first.
        tokio::time::sleep(Duration::from_secs(if wan { 3 } else { 1 })).await;
    });
    let one = cluster.client("alice");
    let many: Vec<_> = (0..64)
        .map(|i| Arc::new(cluster.client(["alice", "bob", "carol"][i % 3])))
        .collect();
    let bulk = Arc::new(cluster.client("bob"));

    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    if wan {
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .measurement_time(Duration::from_secs(15));
    } else {
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(5));
    }
    group.bench_function("1 client", |b| {
        b.iter_custom(|iters| runtime.block_on(one_client(&one, iters)))
    });
    group.bench_function("64 clients", |b| {
        b.iter_custom(|iters| {
            // Every client sends the same number; scale to `iters` messages.
            let per = iters.div_ceil(64).max(1);
            let elapsed = runtime.block_on(many_clients(&many, per * 64));
            elapsed.mul_f64(iters as f64 / (per * 64) as f64)
        })
    });
    group.bench_function("pipelined client", |b| {
        b.iter_custom(|iters| {
            let count = iters.max(1000);
            runtime
                .block_on(pipelined(&bulk, count))
                .mul_f64(iters as f64 / count as f64)
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("BENCH_TOPOLOGY").unwrap_or_default();
    for (nodes, wan, ip) in [
        (3, false, 153u8),
        (5, false, 154),
        (3, true, 155),
        (5, true, 156),
    ] {
        if (only == "wan" && !wan) || (only == "loopback" && wan) {
            continue;
        }
        topology(c, &runtime, nodes, wan, ip);
    }
}

criterion_group!(commit, benches);
criterion_main!(commit);
