//! `node watch` and the log stream under it, with real processes: a
//! watcher prints exactly the committed log while leaders die and the node
//! it reads from restarts; it starts where asked; learners serve it.

mod nodes;

use std::io::BufRead;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_store::raft::NodeId;
use cluster_store::wire::{ExportedEntry, Start, Until};
use nodes::{check_export, serial, TestCluster, BIN};

const SECONDS_30: Duration = Duration::from_secs(30);

/// A `node watch` process writing its output to a file.
struct Watcher {
    child: Child,
    out: std::path::PathBuf,
}

impl Watcher {
    fn start(cluster: &TestCluster, name: &str, args: &[&str]) -> Watcher {
        let out = cluster.dir.join(format!("{name}.out"));
        let err = cluster.dir.join(format!("{name}.err"));
        let child = Command::new(BIN)
            .arg("watch")
            .args(args)
            .arg("--cluster")
            .arg(cluster.cluster_spec())
            .arg("--certs")
            .arg(cluster.certs())
            .env("RUST_LOG", "cluster_store=debug")
            .stdout(std::fs::File::create(&out).expect("watch output"))
            .stderr(std::fs::File::create(err).expect("watch errors"))
            .spawn()
            .expect("start node watch");
        Watcher { child, out }
    }

    fn lines(&self) -> Vec<String> {
        let file = std::fs::File::open(&self.out).expect("watch output");
        std::io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .collect()
    }

    /// Waits until the watcher has printed `count` lines (or fails).
    async fn wait_for(&mut self, count: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("node watch exited with {status}");
            }
            let lines = self.lines();
            if lines.len() >= count || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_json(line: &str) -> ExportedEntry {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("watch printed {line:?}: {e}"))
}

/// Writes from three clients until told to stop; returns how many were
/// acknowledged.
fn start_writers(
    cluster: &TestCluster,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    ["alice", "bob", "carol"]
        .into_iter()
        .map(|name| {
            let client = cluster.client(name);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let text = format!("{name}-{sent}");
                    client
                        .send(vec![text])
                        .await
                        .unwrap_or_else(|e| panic!("{name} could not send: {e:#}"));
                    sent += 1;
                }
                sent
            })
        })
        .collect()
}

/// The node a watcher reads from restarts, and the leader is killed: the
/// watcher, started at `--from 1`, prints the committed log exactly.
#[test]
fn a_watcher_prints_the_committed_log_through_a_leader_kill_and_its_node_restarting() {
    serial(|| async {
        let mut cluster = TestCluster::start("watch", 141, &[1, 2, 3], &[]);
        let admin = cluster.client("client");
        let leader = cluster.wait_for_leader(&admin, SECONDS_30).await;
        let read_from: NodeId = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
        let mut watcher = Watcher::start(
            &cluster,
            "follow",
            &[
                "--from",
                "1",
                "--format",
                "json",
                "--node",
                &read_from.to_string(),
            ],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writers = start_writers(&cluster, &stop);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen_before_kill = watcher.lines().len();
        assert!(
            seen_before_kill > 0,
            "the watcher printed nothing in 2 s of writes"
        );

        // The leader dies (kill -9); writes go on under a new one.
        cluster.kill(leader);
        let new_leader = cluster.wait_for_leader(&admin, SECONDS_30).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.launch(leader);

        // The node the watcher reads from restarts (unless it just became
        // the leader: then the leader restarts, which is harder).
        let restarted = read_from;
        cluster.kill(restarted);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during_restart = watcher.lines().len();
        cluster.launch(restarted);
        tokio::time::sleep(Duration::from_secs(2)).await;

        stop.store(true, Ordering::SeqCst);
        let mut acked = 0;
        for writer in writers {
            acked += writer.await.expect("writer");
        }
        let export = admin.export().await.expect("export");
        assert_eq!(
            export.len() as u64,
            acked,
            "every acknowledged message is in the export"
        );
        check_export(&export);

        let lines = watcher.wait_for(export.len(), SECONDS_30).await;
        // Anything more would come late: give it a moment to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lines = if watcher.lines().len() > lines.len() {
            watcher.lines()
        } else {
            lines
        };
        let watched: Vec<ExportedEntry> = lines.iter().map(|l| parse_json(l)).collect();
        println!(
            "{} messages committed; the watcher printed {} ({seen_before_kill} before the leader ({leader}) died, \
             {during_restart} by the time node {restarted} restarted; new leader {new_leader})",
            export.len(),
            watched.len()
        );
        assert_eq!(
            watched.len(),
            export.len(),
            "the watcher printed a different number of messages"
        );
        for (watched, exported) in watched.iter().zip(&export) {
            assert_eq!(watched, exported, "the watcher differs from the export");
        }
        let errors = std::fs::read_to_string(cluster.dir.join("follow.err")).unwrap_or_default();
        for line in errors.lines().filter(|l| l.contains("watch")) {
            println!("watcher: {line}");
        }
        assert!(
            during_restart > seen_before_kill,
            "the watcher made no progress between the leader kill and its node's restart"
        );
    });
}

/// `--last N` starts with the last N messages and `--from` at an index,
/// then both follow; `export` and the library's read of a learner's own
/// replica go through the same stream.
#[test]
fn watches_start_where_asked_and_learners_serve_them() {
    serial(|| async {
        let cluster = TestCluster::start("watchfrom", 142, &[1, 2, 3], &[4]);
        let admin = cluster.client("client");
        cluster.wait_for_leader(&admin, SECONDS_30).await;
        for i in 0..10 {
            admin.send(vec![format!("first-{i}")]).await.expect("send");
        }
        let export = admin.export().await.expect("export");
        assert_eq!(export.len(), 10);
        // `--last` counts back from what the node has synced as committed:
        // the learner must have caught up first (a watcher that connects
        // at once over TCP could otherwise start from its older commit).
        cluster.wait_caught_up(&admin, SECONDS_30).await;

        let mut last = Watcher::start(&cluster, "last", &["--last", "3", "--node", "4"]);
        let from = export[7].index.to_string();
        let mut at = Watcher::start(&cluster, "from", &["--from", &from]);
        let mut new_only = Watcher::start(&cluster, "new", &[]);
        assert_eq!(
            last.wait_for(3, SECONDS_30).await,
            export[7..]
                .iter()
                .map(ExportedEntry::format_line)
                .collect::<Vec<_>>(),
            "--last 3"
        );
        assert_eq!(at.wait_for(3, SECONDS_30).await.len(), 3, "--from");
        // A watch without a start waits for what commits next.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            new_only.lines().is_empty(),
            "a watch without a start printed the past"
        );

        for i in 0..2 {
            admin.send(vec![format!("second-{i}")]).await.expect("send");
        }
        let export = admin.export().await.expect("export");
        let expected: Vec<String> = export.iter().map(ExportedEntry::format_line).collect();
        assert_eq!(last.wait_for(5, SECONDS_30).await, expected[7..]);
        assert_eq!(at.wait_for(5, SECONDS_30).await, expected[7..]);
        assert_eq!(new_only.wait_for(2, SECONDS_30).await, expected[10..]);

        // The learner's own replica, through the library: the same stream.
        cluster.wait_caught_up(&admin, SECONDS_30).await;
        let replica = admin
            .watch(Start::Index(1), Until::Commit)
            .only(4)
            .patience(Some(SECONDS_30))
            .collect()
            .await
            .expect("the learner serves its replica");
        assert_eq!(replica, export);

        // The CLI export streams the same log.
        let output = cluster.run_cli(&["export"], None);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .collect::<Vec<_>>(),
            expected
        );
    });
}

/// Counts what a library watcher receives: the cluster's writes go on
/// while it follows.
#[test]
fn a_library_watch_follows_a_pipelined_writer() {
    serial(|| async {
        let cluster = TestCluster::start("watchlib", 143, &[1, 2, 3], &[]);
        let admin = Arc::new(cluster.client("client"));
        cluster.wait_for_leader(&admin, SECONDS_30).await;
        let received = Arc::new(AtomicU64::new(0));
        let follower = {
            let admin = admin.clone();
            let received = received.clone();
            tokio::spawn(async move {
                let mut stream = admin.watch(Start::Index(1), Until::Follow);
                let mut all = Vec::new();
                while all.len() < 20_000 {
                    let page = stream
                        .next_page()
                        .await
                        .expect("watch")
                        .expect("a follow never ends");
                    received.fetch_add(page.len() as u64, Ordering::SeqCst);
                    all.extend(page);
                }
                all
            })
        };
        let writer = cluster.client("alice");
        let batches = (0..20).map(|b| (0..1000).map(|i| format!("m-{b}-{i}")).collect());
        writer
            .send_pipelined(batches, cluster_store::client::PIPELINE_WINDOW, |_, _| {
                Ok(())
            })
            .await
            .expect("pipelined send");
        let watched = tokio::time::timeout(SECONDS_30, follower)
            .await
            .expect("the watcher kept up within 30 s of the last write")
            .expect("watcher task");
        let export = admin.export().await.expect("export");
        assert_eq!(watched, export);
    });
}
