//! `cargo bench --bench watch`: what following the log costs and delivers,
//! on real `node` processes (release build) on loopback. It reports; it
//! asserts nothing.
//!
//! - A pipelined client writes `BENCH_WATCH` messages (default 1,000,000)
//!   with no watcher, then as many while a slow watcher (one message a
//!   second) follows the leader, then as many alone again: the writer's
//!   rate and the nodes' peak RSS, side by side, `BENCH_RUNS` times
//!   (default 3, a fresh cluster each), medians.
//! - `node export` of the whole log (2 x `BENCH_WATCH`) under
//!   `/usr/bin/time -v`: wall time and the client's peak RSS.
//! - A watcher replaying `BENCH_WATCH` messages from index 1, and one
//!   following a pipelined writer as it writes: messages per second
//!   received.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_store::client::{Client, LogStream};
use cluster_store::raft::NodeId;
use cluster_store::wire::{Start, Until};
use common::nodes::{TestCluster, BIN};
use common::{env_u64, median, start};
use futures_util::StreamExt;

/// Resident memory of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    common::nodes::rss_kib(pid) as f64 / 1024.0
}

/// Writes `count` 100-byte messages in pipelined batches of 1,000 and
/// returns the rate, sampling every node's RSS meanwhile (peak, MB).
async fn write(cluster: &TestCluster, count: u64) -> (f64, f64) {
    let client = cluster.client("alice");
    let text = "x".repeat(100);
    let batches = (0..count / 1000).map(|_| vec![text.clone(); 1000]);
    let done = Arc::new(AtomicBool::new(false));
    let peak = {
        let pids = cluster.pids();
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak: f64 = 0.0;
            while !done.load(Ordering::SeqCst) {
                for pid in &pids {
                    peak = peak.max(rss_mb(*pid));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let mut written = 0;
    client
        .send_pipelined(batches, cluster_store::client::PIPELINE_WINDOW, |_, c| {
            written += c.len();
            Ok(())
        })
        .await
        .expect("pipelined writer");
    let rate = written as f64 / started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    (rate, peak.await.unwrap_or(0.0))
}

/// Follows the log from index 1, taking one message a second: the slowest
/// reader there is, short of none.
fn slow_watcher(client: Arc<Client>, leader: NodeId) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut messages = LogStream::new(client, Start::Index(1), Until::Follow)
            .prefer(leader)
            .into_stream();
        while let Some(Ok(_)) = messages.next().await {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Messages per second one watcher receives from `start` until it has
/// `count`, timed from its first message.
async fn receive(client: &Client, start: Start, until: Until, count: u64) -> f64 {
    let mut stream = client.watch(start, until);
    let mut received = 0u64;
    let mut started = None;
    while received < count {
        match stream.next_page().await {
            Ok(Some(page)) => {
                started.get_or_insert_with(Instant::now);
                received += page.len() as u64;
            }
            _ => break,
        }
    }
    received as f64 / started.map_or(f64::INFINITY, |s| s.elapsed().as_secs_f64())
}

/// `node export > /dev/null` under `/usr/bin/time -v`: seconds and peak
/// RSS (MB) of the client, if `time` is installed.
fn export_under_time(cluster: &TestCluster) -> Option<(f64, f64)> {
    let output = std::process::Command::new("/usr/bin/time")
        .arg("-v")
        .arg(BIN)
        .args(["export", "--cluster", &cluster.cluster_spec(), "--certs"])
        .arg(cluster.certs())
        .stdout(std::process::Stdio::null())
        .output()
        .ok()?;
    let report = String::from_utf8_lossy(&output.stderr);
    let field = |name: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
            .map(str::to_string)
    };
    let peak_kb: f64 = field("Maximum resident set size (kbytes):")?.parse().ok()?;
    // "Elapsed (wall clock) time (h:mm:ss or m:ss): 0:02.61"
    let wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss):")?;
    let seconds = wall.split(':').try_fold(0.0, |total, part| {
        Some(total * 60.0 + part.parse::<f64>().ok()?)
    })?;
    Some((seconds, peak_kb / 1024.0))
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        println!("smoke run (cargo test): one short pass; `cargo bench` measures");
    }
    let runs = env_u64("BENCH_RUNS", if smoke { 1 } else { 3 }) as usize;
    let count = env_u64("BENCH_WATCH", if smoke { 20_000 } else { 1_000_000 }).max(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "watch benchmark: {runs} runs, {count} 100-byte messages per phase, loopback, medians"
    );
    let mut rows: Vec<(String, String)> = Vec::new();
    runtime.block_on(async {
        // Per run: the writer alone, with the slow watcher, alone again
        // (the log is longer by then: a node's index of the log grows
        // with it, so "after" is the fair comparison for memory).
        let (mut before, mut watched, mut after) = (Vec::new(), Vec::new(), Vec::new());
        let (mut before_rss, mut watched_rss, mut after_rss) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let cluster = start(&format!("bench-watch-{run}"), 153 + run as u8, 3, false);
            let admin = Arc::new(cluster.client("client"));
            let leader = cluster
                .wait_for_leader(&admin, Duration::from_secs(30))
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (rate, rss) = write(&cluster, count).await;
            before.push(rate);
            before_rss.push(rss);
            let watcher = slow_watcher(admin.clone(), leader);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (rate, rss) = write(&cluster, count).await;
            watched.push(rate);
            watched_rss.push(rss);
            watcher.abort();
            if run == 0 {
                // The log holds 2 x count messages now.
                if let Some((seconds, peak)) = export_under_time(&cluster) {
                    rows.push((
                        format!("node export of {} messages: time, client peak RSS", 2 * count),
                        format!("{seconds:.2} s, {peak:.0} MB"),
                    ));
                }
                let replay = receive(&admin, Start::Index(1), Until::Index(count), count).await;
                rows.push((
                    format!("watcher replaying {count} from index 1"),
                    format!("{replay:.0} msg/s"),
                ));
            }
            let (rate, rss) = write(&cluster, count).await;
            after.push(rate);
            after_rss.push(rss);
            eprintln!(
                "run {run}: pipelined {:.0}/s alone, {:.0}/s with a slow watcher, {:.0}/s alone again; peak node RSS {:.0} / {:.0} / {:.0} MB",
                before[run], watched[run], after[run], before_rss[run], watched_rss[run], after_rss[run]
            );
            if run == 0 {
                let follower = {
                    let admin = admin.clone();
                    tokio::spawn(async move {
                        receive(&admin, Start::Last(0), Until::Follow, count).await
                    })
                };
                tokio::time::sleep(Duration::from_millis(200)).await;
                let (written, _) = write(&cluster, count).await;
                let following = tokio::time::timeout(Duration::from_secs(60), follower)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0.0);
                rows.push((
                    format!("watcher following a pipelined writer ({written:.0} msg/s written)"),
                    format!("{following:.0} msg/s received"),
                ));
            }
        }
        let (before, watched, after) = (median(before), median(watched), median(after));
        rows.push((
            format!("pipelined writer, {count} messages: alone / with a slow watcher on the leader / alone again"),
            format!(
                "{before:.0} / {watched:.0} / {after:.0} msg/s (with the watcher: {:.0}% of alone)",
                200.0 * watched / (before + after)
            ),
        ));
        rows.push((
            "peak node RSS during those writes".into(),
            format!(
                "{:.0} / {:.0} / {:.0} MB",
                median(before_rss),
                median(watched_rss),
                median(after_rss)
            ),
        ));
    });
    println!("\n| measurement | median |\n| --- | --- |");
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
}
