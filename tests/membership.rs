//! Live membership with real processes over real QUIC, as an operator does
//! it with `node member`: a three-node cluster under continuous writes
//! replaces a voter killed for good (a fresh node joins as a learner,
//! catches up, is promoted, the dead one removed), grows to five and
//! shrinks back to three, removing its leader on the way. Every
//! acknowledged message must be in every remaining node's log exactly once,
//! at the index it was acknowledged at, in the same order everywhere; and
//! each change may cost at most one election.

mod nodes;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_store::client::Client;
use cluster_store::raft::NodeId;
use nodes::{serial, TestCluster};
use serde_json::Value;

const IP: u8 = 61;

/// What the writers were told, and when.
#[derive(Default)]
struct Acks {
    /// text -> index it was acknowledged at.
    acked: HashMap<String, u64>,
    /// Texts whose send failed: absent, or present once.
    failed: Vec<String>,
    /// When each acknowledgement arrived, in order.
    times: Vec<Instant>,
}

async fn writer(client: Client, name: &'static str, stop: Arc<AtomicBool>, acks: Arc<Mutex<Acks>>) {
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let text = format!("{name}-{i}");
        match client.send(vec![text.clone()]).await {
            Ok((_, committed)) => {
                let mut acks = acks.lock().expect("acks");
                if let Some(c) = committed.first() {
                    acks.acked.insert(text, c.index);
                    acks.times.push(Instant::now());
                }
            }
            Err(_) => acks.lock().expect("acks").failed.push(text),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `node member ...` against the cluster; panics with its output if
/// it fails. Returns stdout.
fn member(cluster: &TestCluster, args: &[&str]) -> String {
    let mut all = vec!["member"];
    all.extend_from_slice(args);
    let output = cluster.run_cli(&all, None);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "node member {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `node member list --json`: id -> (voter?, lag, match index).
fn members(cluster: &TestCluster) -> BTreeMap<NodeId, (bool, u64, u64)> {
    let out = member(cluster, &["list", "--json"]);
    let value: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    value["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {out}"))
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().expect("id"),
                (
                    m["role"].as_str() == Some("voter"),
                    m["lag"].as_u64().unwrap_or(u64::MAX),
                    m["match_index"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Waits until `node member list` shows `id`: a node started with
/// `--join` before its addition committed is refused and exits, as the
/// README tells operators.
async fn wait_listed(cluster: &TestCluster, id: NodeId) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !members(cluster).contains_key(&id) {
        assert!(Instant::now() < deadline, "node {id} was never added");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader's term, as the cluster reports it.
async fn leader_term(cluster: &TestCluster, client: &Client) -> (NodeId, u64) {
    let leader = cluster
        .wait_for_leader(client, Duration::from_secs(30))
        .await;
    let status = client.status(leader).await.expect("leader status");
    (leader, status.term)
}

/// The longest gap between acknowledgements since `from`.
fn longest_pause(acks: &Mutex<Acks>, from: Instant) -> Duration {
    let acks = acks.lock().expect("acks");
    let times: Vec<Instant> = acks.times.iter().copied().filter(|t| *t >= from).collect();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[test]
fn replace_a_dead_voter_grow_to_five_and_shrink_to_three_under_writes() {
    serial(|| async {
        let mut cluster = TestCluster::start("membership", IP, &[1, 2, 3], &[]);
        for id in [4, 5, 6] {
            cluster.add_node_cert(id);
        }
        // Writers know every address the cluster will ever have.
        cluster.joined = vec![4, 5, 6];
        let admin = cluster.client("client");
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Acks::default()));
        let mut writers = Vec::new();
        for name in ["alice", "bob", "carol"] {
            writers.push(tokio::spawn(writer(
                cluster.client(name),
                name,
                stop.clone(),
                acks.clone(),
            )));
        }
        cluster.joined.clear();
        cluster
            .wait_for_leader(&admin, Duration::from_secs(30))
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut report = Vec::new();
        let mut change = |what: String, started: Instant, before: u64, after: u64| {
            let pause = longest_pause(&acks, started);
            report.push(format!(
                "{what}: terms {before} -> {after}, longest pause between acknowledgements {pause:?}"
            ));
            assert!(
                after <= before + 1,
                "{what} cost more than one election: term {before} -> {after}"
            );
        };

        // A voter's VM dies for good.
        let (leader, term) = leader_term(&cluster, &admin).await;
        let dead = if leader == 3 { 2 } else { 3 };
        cluster.kill(dead);

        // Its replacement joins as a learner, catches up, is promoted.
        let started = Instant::now();
        member(
            &cluster,
            &[
                "add",
                "4",
                "--address",
                &cluster.addr(4).to_string(),
                "--learner",
            ],
        );
        cluster.launch_joining(4, &[1]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = members(&cluster);
            if list
                .get(&4)
                .is_some_and(|(voter, lag, matched)| !voter && *lag < 100 && *matched > 0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node 4 never caught up: {list:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        member(&cluster, &["promote", "4"]);
        member(&cluster, &["remove", &dead.to_string()]);
        let list = members(&cluster);
        let voters: Vec<NodeId> = list
            .iter()
            .filter(|(_, (v, _, _))| *v)
            .map(|(id, _)| *id)
            .collect();
        let mut expected: Vec<NodeId> = [1, 2, 3, 4].into_iter().filter(|id| *id != dead).collect();
        expected.sort_unstable();
        assert_eq!(voters, expected, "after replacing node {dead}: {list:?}");
        let (_, after) = leader_term(&cluster, &admin).await;
        change(
            format!("replace node {dead} with node 4"),
            started,
            term,
            after,
        );

        // Grow to five: `member add` without --learner promotes once caught up.
        for id in [5, 6] {
            let (_, term) = leader_term(&cluster, &admin).await;
            let started = Instant::now();
            let address = cluster.addr(id).to_string();
            let add = {
                let spec = cluster.cluster_spec();
                let certs = cluster.certs();
                std::thread::spawn(move || {
                    std::process::Command::new(nodes::BIN)
                        .args(["member", "add", &id.to_string(), "--address", &address])
                        .args(["--cluster", &spec, "--certs"])
                        .arg(certs)
                        .output()
                        .expect("run node member add")
                })
            };
            // The operator starts the machine while `member add` waits.
            wait_listed(&cluster, id).await;
            cluster.launch_joining(id, &[1, 4]);
            let output = tokio::task::spawn_blocking(move || add.join().expect("member add"))
                .await
                .expect("join");
            assert!(
                output.status.success(),
                "node member add {id} failed: {}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
            let (_, after) = leader_term(&cluster, &admin).await;
            change(format!("add node {id} as a voter"), started, term, after);
        }
        let voters = members(&cluster)
            .into_iter()
            .filter(|(_, (v, _, _))| *v)
            .count();
        assert_eq!(voters, 5, "grew to five voters");

        // Shrink to three: the leader first, then one more.
        for _ in 0..2 {
            let (leader, term) = leader_term(&cluster, &admin).await;
            let started = Instant::now();
            member(&cluster, &["remove", &leader.to_string()]);
            let (new_leader, after) = leader_term(&cluster, &admin).await;
            assert_ne!(new_leader, leader, "a removed leader steps down");
            change(format!("remove leader {leader}"), started, term, after);
            // The removed node says why it no longer takes part.
            cluster
                .wait_for_log(leader, "removed", Duration::from_secs(10))
                .await;
            cluster.kill(leader);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.expect("writer");
        }
        for line in &report {
            println!("{line}");
        }

        let list = members(&cluster);
        let final_members: Vec<NodeId> = list.keys().copied().collect();
        assert_eq!(final_members.len(), 3, "shrunk to three: {list:?}");
        assert!(list.values().all(|(voter, _, _)| *voter));
        cluster
            .wait_caught_up(&admin, Duration::from_secs(60))
            .await;

        let (acked, failed) = {
            let acks = acks.lock().expect("acks");
            (acks.acked.clone(), acks.failed.len())
        };
        assert!(acked.len() > 100, "too few writes: {}", acked.len());
        let mut logs = Vec::new();
        for id in &final_members {
            let entries = admin.local_export(*id).await.expect("local export");
            nodes::check_export(&entries);
            logs.push((*id, entries));
        }
        let (first, reference) = &logs[0];
        for (id, entries) in &logs[1..] {
            assert!(
                entries == reference,
                "node {id}'s log differs from node {first}'s"
            );
        }
        let at: HashMap<&str, u64> = reference
            .iter()
            .map(|e| (e.text.as_str(), e.index))
            .collect();
        for (text, index) in &acked {
            assert_eq!(
                at.get(text.as_str()),
                Some(index),
                "acknowledged {text} at index {index} is not there"
            );
        }
        let mut seen = HashMap::new();
        for e in reference {
            *seen.entry(e.text.as_str()).or_insert(0) += 1;
        }
        assert!(
            seen.values().all(|n| *n == 1),
            "a message is in the log twice"
        );
        println!(
            "{} acknowledged, {} failed sends, {} entries in every remaining node's log",
            acked.len(),
            failed,
            reference.len()
        );
    });
}

/// A node that was down through two membership changes knows neither the
/// new member nor its address; when that member leads and has the higher
/// id (the lower id dials), nobody would ever connect them. The node asks
/// the members it knows for the cluster's configuration and dials the
/// leader it learned of, and catches up.
#[test]
fn a_node_down_through_changes_finds_a_leader_it_never_heard_of() {
    serial(|| async {
        // Node 4 outranks the others: once a caught-up voter, it leads.
        let priorities = || vec!["--priorities".to_string(), "4=10".to_string()];
        let mut cluster =
            TestCluster::start_with("lagging", IP + 1, &[1, 2, 3], &[], |_| priorities());
        cluster.add_node_cert(4);
        cluster.set_args(4, priorities());
        let admin = cluster.client("client");
        cluster
            .wait_for_leader(&admin, Duration::from_secs(30))
            .await;
        admin
            .send(vec!["before".into()])
            .await
            .expect("send before");
        // Every link up before node 1 goes: a leader elected by node 1
        // before node 2 reached it would lose its quorum with node 1, and
        // the add below would end "outcome unknown", rightly.
        cluster
            .wait_caught_up(&admin, Duration::from_secs(30))
            .await;
        cluster.kill(1);

        // Added and promoted while node 1 is down: two changes it misses.
        let address = cluster.addr(4).to_string();
        let spec = cluster.spec_of(&[2, 3]);
        let certs = cluster.certs();
        let add = std::thread::spawn(move || {
            std::process::Command::new(nodes::BIN)
                .args(["member", "add", "4", "--address", &address])
                .args(["--cluster", &spec, "--certs"])
                .arg(certs)
                .output()
                .expect("run node member add")
        });
        wait_listed(&cluster, 4).await;
        cluster.launch_joining(4, &[2, 3]);
        let output = tokio::task::spawn_blocking(move || add.join().expect("member add"))
            .await
            .expect("join");
        assert!(
            output.status.success(),
            "node member add 4 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Clients follow redirects to the nodes they know: one that knows 4.
        let admin = cluster.client("client");
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .wait_for_leader(&admin, Duration::from_secs(30))
            .await
            != 4
        {
            assert!(Instant::now() < deadline, "node 4 never took the lead");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for i in 0..20 {
            admin
                .send(vec![format!("while 1 was down {i}")])
                .await
                .expect("send");
        }
        // A user's `node send` that names only the founding nodes (one of
        // them down) is redirected to node 4, which it was never told of:
        // it learns the leader's address from the node that redirected it.
        let founders = cluster.spec_of(&[1, 2, 3]);
        let certs = cluster.certs();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(nodes::BIN)
                .args(["send", "to the leader it never heard of", "--json"])
                .args(["--cluster", &founders, "--certs"])
                .arg(certs)
                .output()
                .expect("run node send")
        })
        .await
        .expect("join");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "node send naming only nodes 1-3 failed: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        let landed: Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(landed["leader"].as_u64(), Some(4), "landed: {stdout}");

        cluster.launch(1);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leader = admin.status(4).await.expect("leader status");
            let lagging = admin.status(1).await.ok();
            if lagging.as_ref().is_some_and(|s| {
                s.commit == leader.commit && s.membership.is_voter(4) && s.leader == Some(4)
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node 1 never caught up with leader 4: {lagging:?}\n{}",
                cluster.log(1)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            cluster.log(1).contains("learned members"),
            "node 1 should say where it learned of node 4:\n{}",
            cluster.log(1)
        );
    });
}
