//! Hostile conditions against real `node` processes: certificates that are
//! expired, not yet valid or revoked; more connections and more writes than
//! a node will take; and a store damaged on disk, refused and rebuilt from
//! the peers. Each must be answered with a clear error while the cluster
//! keeps serving, and nothing acknowledged may be lost.

mod nodes;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_store::client::Client;
use cluster_store::identity::{self, Validity};
use cluster_store::raft::{Committed, NodeId, Role};
use cluster_store::tls::{self, Credentials};
use cluster_store::wire::{ClientResponse, ExportedEntry};
use nodes::{check_export, serial, TestCluster};

const SECONDS_30: Duration = Duration::from_secs(30);

/// A client's credentials read as they are, without the local validity
/// check `Credentials::load` makes: what a careless or hostile client sends.
fn raw_creds(certs: &Path, name: &str) -> Credentials {
    let (ca, _) = identity::ca_path(certs);
    let (cert, key) = identity::client_cert_path(certs, name);
    Credentials {
        ca: identity::load_certs(&ca).expect("ca").remove(0),
        chain: identity::load_certs(&cert).expect("cert"),
        key: identity::load_key(&key).expect("key"),
        crls: Vec::new(),
        crl_path: certs.join("none.crl"),
    }
}

fn client_of(cluster: &TestCluster, creds: &Credentials) -> Client {
    let members = cluster
        .voters
        .iter()
        .map(|id| (*id, cluster.addr(*id).into()))
        .collect();
    let mut client = Client::new(members, creds).expect("client");
    client.give_up_after = Duration::from_secs(3);
    client
}

fn days_ago(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::days(days)
}

#[test]
fn expired_future_and_revoked_certificates_are_refused() {
    serial(|| async {
        let mut cluster = TestCluster::start("certs", 100, &[1, 2, 3], &[]);
        let admin = cluster.client("client");
        cluster.wait_for_leader(&admin, SECONDS_30).await;
        let certs = cluster.certs();

        // Expired and not yet valid client certificates.
        identity::issue_client(
            &certs,
            "expired",
            Validity {
                not_before: days_ago(30),
                not_after: days_ago(1),
            },
        )
        .expect("issue");
        identity::issue_client(
            &certs,
            "future",
            Validity {
                not_before: days_ago(-1),
                not_after: days_ago(-30),
            },
        )
        .expect("issue");
        for name in ["expired", "future"] {
            let error = client_of(&cluster, &raw_creds(&certs, name))
                .status(1)
                .await
                .expect_err("a certificate outside its validity was accepted");
            println!("{name} client: {error:#}");
            // The client's own loader names the file and the reason.
            let (ca, _) = identity::ca_path(&certs);
            let (cert, key) = identity::client_cert_path(&certs, name);
            let local = Credentials::load(&ca, &cert, &key)
                .err()
                .expect("an unusable certificate loaded")
                .to_string();
            assert!(
                local.contains(&format!("client-{name}.crt"))
                    && (local.contains("expired") || local.contains("not valid before")),
                "unclear error: {local}"
            );
        }
        // The node logs the refusal as its side of the handshake ends,
        // which may be just after the client has seen it.
        let logged = |log: &str| {
            log.contains("certificate expired") && log.contains("certificate not valid yet")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !logged(&cluster.log(1)) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            logged(&cluster.log(1)),
            "node 1 did not log why it refused the certificates"
        );

        // A client revoked while connected is cut off within seconds, and
        // cannot come back; others keep working.
        identity::issue_client(&certs, "mallory", Validity::days(30)).expect("issue");
        let mallory = cluster.client("mallory");
        mallory
            .send(vec!["mallory before".into()])
            .await
            .expect("mallory is still trusted");
        let revoke = std::process::Command::new(nodes::BIN)
            .args(["certs", "revoke", "client:mallory", "--out"])
            .arg(&certs)
            .output()
            .expect("node certs revoke");
        assert!(
            revoke.status.success(),
            "revoke failed: {}",
            String::from_utf8_lossy(&revoke.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut quick = cluster.client("mallory");
            quick.give_up_after = Duration::from_millis(500);
            if quick.status(1).await.is_err() && mallory.status(2).await.is_err() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a revoked certificate still works after 15 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            cluster.log(2).contains("revoked"),
            "node 2 did not log the revocation"
        );
        // Mallory's stream kept open after "mallory before" (a TCP
        // connection to the node that took it) was closed by that node,
        // not only refused when dialed anew.
        let closed = |cluster: &TestCluster| {
            [1, 2, 3].iter().any(|id| {
                cluster
                    .log(*id)
                    .contains("closing a client connection: its certificate was revoked")
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !closed(&cluster) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            closed(&cluster),
            "no node closed mallory's live TCP connection after the revocation"
        );
        let alice = cluster.client("alice");
        alice
            .send(vec!["alice after".into()])
            .await
            .expect("revoking mallory stopped alice");

        // A revoked node is cut off from its peers: it receives nothing
        // written after the revocation.
        let revoke = std::process::Command::new(nodes::BIN)
            .args(["certs", "revoke", "3", "--out"])
            .arg(&certs)
            .output()
            .expect("node certs revoke");
        assert!(revoke.status.success());
        tokio::time::sleep(Duration::from_secs(3)).await;
        for i in 0..20 {
            alice
                .send(vec![format!("after revoking node 3: {i}")])
                .await
                .expect("nodes 1 and 2 keep serving");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.kill(3);
        let replica = cluster.local_export(3);
        assert!(
            replica.iter().any(|l| l.contains("alice after")),
            "node 3 missed what came before its revocation"
        );
        assert!(
            !replica.iter().any(|l| l.contains("after revoking node 3")),
            "node 3 still received entries after its certificate was revoked"
        );

        // ca.crl deleted: running nodes keep the list they loaded and say
        // so, and a node restarted without it refuses to start until the
        // list is back. Nobody revoked is trusted again.
        let crl = identity::crl_path(&certs);
        let list = std::fs::read(&crl).expect("ca.crl");
        std::fs::remove_file(&crl).expect("delete ca.crl");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut quick = cluster.client("mallory");
        quick.give_up_after = Duration::from_millis(500);
        assert!(
            quick.status(1).await.is_err(),
            "deleting ca.crl trusted a revoked certificate again"
        );
        assert!(
            cluster.log(1).contains("ca.crl has disappeared"),
            "node 1 did not warn that ca.crl disappeared"
        );
        cluster.kill(2);
        cluster.launch(2);
        let status = cluster.wait_exit(2, Duration::from_secs(20));
        let log = cluster.log(2);
        let last = log.lines().last().unwrap_or_default();
        assert!(
            status.is_some_and(|s| !s.success()),
            "node 2 started without the revocation list it had loaded"
        );
        assert!(
            last.contains("ca.crl is missing") && last.contains("Copy ca.crl back"),
            "unclear error: {last}"
        );
        std::fs::write(&crl, list).expect("restore ca.crl");
        cluster.launch(2);
        assert!(
            cluster.wait_exit(2, Duration::from_secs(3)).is_none(),
            "node 2 did not start with ca.crl back: {}",
            cluster.log(2).lines().last().unwrap_or_default()
        );
        let mut quick = cluster.client("mallory");
        quick.give_up_after = Duration::from_millis(500);
        assert!(
            quick.status(2).await.is_err(),
            "the restarted node trusts a revoked certificate"
        );
    });
}

/// Reads one node's Prometheus counter over its HTTP port.
fn metric(http: &str, name: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(http) else {
        return 0;
    };
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn overload_is_answered_busy_and_loses_nothing() {
    serial(|| async {
        let ip = 101;
        let cluster = TestCluster::start_with("overload", ip, &[1, 2, 3], &[], |id| {
            vec![
                "--max-clients".into(),
                "200".into(),
                "--max-pending-mb".into(),
                "1".into(),
                "--http".into(),
                format!("127.0.0.{ip}:{}", 8000 + id),
            ]
        });
        let admin = cluster.client("client");
        let leader = cluster.wait_for_leader(&admin, SECONDS_30).await;
        let leader_http = format!("127.0.0.{ip}:{}", 8000 + leader);

        // 1,500 connections at once to the leader: at most 200 are served;
        // every other one is refused at the door (too many handshakes at
        // once) or closed with a "busy" reason, never left to time out.
        let creds = raw_creds(&cluster.certs(), "alice");
        // The crowd's answers arrive at one socket: with the kernel's
        // default buffer, a slow machine dropped hundreds of them, a
        // "busy" close among them, and the node, rightly, reset the
        // connection it had forgotten when the client spoke again. A
        // buffer the size of the crowd's answers (`udp::client_endpoint`,
        // what `Client` dials from) keeps the test about the node.
        let mut endpoint =
            cluster_store::udp::client_endpoint("127.0.0.1:0".parse().expect("addr"))
                .expect("endpoint");
        endpoint.set_default_client_config(tls::client_config(&creds).expect("tls"));
        let mut attempts = Vec::new();
        for i in 0..1500 {
            // A crowd, not a single datagram burst (which the kernel's
            // socket buffer would simply drop): 1,500 within two seconds.
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let endpoint = endpoint.clone();
            let addr = cluster.addr(leader);
            attempts.push(tokio::spawn(async move {
                let connection = endpoint
                    .connect(addr, &identity::node_server_name(leader))
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                // A request proves the connection is really served.
                let answered = async {
                    let (mut send, mut recv) = connection.open_bi().await?;
                    cluster_store::wire::write_frame(
                        &mut send,
                        &cluster_store::wire::ClientRequest::Status,
                    )
                    .await?;
                    send.finish()?;
                    cluster_store::wire::read_frame::<_, cluster_store::wire::ClientResponse>(
                        &mut recv,
                    )
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no answer"))
                };
                let result = tokio::time::timeout(Duration::from_secs(20), answered).await;
                match (result, connection.close_reason()) {
                    (Ok(Ok(_)), _) => Ok(connection),
                    (_, Some(reason)) => Err(reason.to_string()),
                    (Ok(Err(e)), None) => Err(e.to_string()),
                    (Err(_), None) => Err("timed out".into()),
                }
            }));
        }
        let mut open = Vec::new();
        let mut refusals: HashMap<String, usize> = HashMap::new();
        for attempt in attempts {
            match attempt.await.expect("task") {
                Ok(connection) => open.push(connection),
                Err(reason) => *refusals.entry(reason).or_default() += 1,
            }
        }
        println!("{} connections served, refused: {refusals:?}", open.len());
        assert!(
            !open.is_empty() && open.len() <= 200,
            "{} connections served",
            open.len()
        );
        assert_eq!(open.len() + refusals.values().sum::<usize>(), 1500);
        assert!(
            refusals
                .keys()
                .all(|r| r.contains("busy") || r.contains("refused")),
            "connections refused without a busy reason: {refusals:?}"
        );
        admin
            .status(leader)
            .await
            .expect("the leader stopped answering under a connection flood");
        for connection in &open {
            connection.close(0u32.into(), b"done");
        }
        drop(open);
        tokio::time::sleep(Duration::from_millis(500)).await;

        // The same crowd over TLS over TCP (a connection per stream): at
        // most 200 served, every other one answered "busy" in its frame.
        let tls = tokio_rustls::TlsConnector::from(tls::tcp_client_config(&creds).expect("tls"));
        let mut attempts = Vec::new();
        for i in 0..1500 {
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (tls, addr) = (tls.clone(), cluster.addr(leader));
            attempts.push(tokio::spawn(async move {
                let exchange = async {
                    let socket = tokio::net::TcpStream::connect(addr).await?;
                    let name = identity::node_server_name(leader).try_into()?;
                    let mut stream = tls.connect(name, socket).await?;
                    cluster_store::wire::write_frame(
                        &mut stream,
                        &cluster_store::wire::ClientRequest::Status,
                    )
                    .await?;
                    let answer = cluster_store::wire::read_frame::<
                        _,
                        cluster_store::wire::ClientResponse,
                    >(&mut stream)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no answer"))?;
                    anyhow::Ok((answer, stream))
                };
                match tokio::time::timeout(Duration::from_secs(20), exchange).await {
                    Ok(Ok((ClientResponse::Status(_), stream))) => Ok(stream),
                    Ok(Ok((ClientResponse::Busy { message }, _))) => Err(message),
                    Ok(Ok((other, _))) => Err(format!("{other:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }));
        }
        let mut open = Vec::new();
        let mut refusals: HashMap<String, usize> = HashMap::new();
        for attempt in attempts {
            match attempt.await.expect("task") {
                Ok(stream) => open.push(stream),
                Err(reason) => *refusals.entry(reason).or_default() += 1,
            }
        }
        println!(
            "{} TCP connections served, refused: {refusals:?}",
            open.len()
        );
        assert!(
            !open.is_empty() && open.len() <= 200,
            "{} TCP connections served",
            open.len()
        );
        assert!(
            refusals.keys().all(|r| r.contains("busy")),
            "TCP connections refused without a busy answer: {refusals:?}"
        );
        drop(open);
        admin
            .status(leader)
            .await
            .expect("the leader stopped answering under a TCP connection flood");
        tokio::time::sleep(Duration::from_millis(500)).await;

        // 100 clients, 4 writers each, sending 16 KiB batches as fast as they
        // can against a 1 MiB bound on what waits to commit: the leader
        // answers "busy", the clients back off and retry, memory stays
        // bounded, and every acknowledged message is there exactly once.
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, Committed)>>> = Arc::default();
        let failed: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut writers = Vec::new();
        let padding = "x".repeat(1000);
        for c in 0..100 {
            let mut client = cluster.client(["alice", "bob", "carol"][c % 3]);
            client.give_up_after = Duration::from_secs(60);
            let client = Arc::new(client);
            for w in 0..4 {
                let (client, stop, acked, failed) =
                    (client.clone(), stop.clone(), acked.clone(), failed.clone());
                let padding = padding.clone();
                writers.push(tokio::spawn(async move {
                    let mut batch = 0;
                    while !stop.load(Ordering::SeqCst) {
                        batch += 1;
                        let texts: Vec<String> = (0..16)
                            .map(|m| format!("c{c}-w{w}-b{batch}-m{m} {padding}"))
                            .collect();
                        match client.send(texts.clone()).await {
                            Ok((_, committed)) => acked
                                .lock()
                                .expect("acked")
                                .extend(texts.into_iter().zip(committed)),
                            Err(_) => failed.lock().expect("failed").extend(texts),
                        }
                    }
                }));
            }
        }
        let pids = cluster.pids();
        let mut peak_kib = 0;
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            for pid in &pids {
                peak_kib = peak_kib.max(nodes::rss_kib(*pid));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for writer in writers {
            writer.await.expect("writer");
        }
        let busy = metric(&leader_http, "cluster_store_busy_sends_total");
        let refused = metric(&leader_http, "cluster_store_busy_connections_total");
        let acked = std::mem::take(&mut *acked.lock().expect("acked"));
        let failed = std::mem::take(&mut *failed.lock().expect("failed"));
        println!(
            "{} messages acknowledged, {} failed, {busy} sends answered busy, {refused} connections refused, peak node RSS {} MiB",
            acked.len(),
            failed.len(),
            peak_kib / 1024
        );
        assert!(busy > 0, "the leader never pushed back");
        assert!(refused >= 1300, "the connection refusals were not counted");
        assert!(!acked.is_empty(), "nothing got through the back-pressure");
        assert!(
            peak_kib < 1024 * 1024,
            "a node grew to {} MiB under overload",
            peak_kib / 1024
        );

        cluster.wait_caught_up(&admin, SECONDS_30).await;
        let export = admin.export().await.expect("export");
        check_export(&export);
        let by_text: HashMap<&str, u64> =
            export.iter().map(|e| (e.text.as_str(), e.index)).collect();
        assert_eq!(by_text.len(), export.len(), "a message is doubled");
        for (text, committed) in &acked {
            assert_eq!(
                by_text.get(text.as_str()),
                Some(&committed.index),
                "an acknowledged message is lost or moved"
            );
        }
    });
}

#[test]
fn damaged_store_is_refused_by_name_and_rebuilt_from_peers() {
    serial(|| async {
        let mut cluster = TestCluster::start("disk", 102, &[1, 2, 3], &[]);
        let admin = cluster.client("client");
        cluster.wait_for_leader(&admin, SECONDS_30).await;
        let lines: String = (0..3000).map(|i| format!("disk message {i}\n")).collect();
        let sent = cluster.run_cli(&["send", "-"], Some(&lines));
        assert!(
            sent.status.success(),
            "send failed: {}",
            String::from_utf8_lossy(&sent.stderr)
        );
        cluster.wait_caught_up(&admin, SECONDS_30).await;
        // Node 3 stops (a new leader takes over if it led); its disk is damaged.
        let target = 3;
        cluster.kill(target);
        cluster.wait_for_leader(&admin, SECONDS_30).await;
        let data = cluster.data_dir(target);
        let db = data.join("db");
        let pristine = cluster.dir.join("pristine");
        copy_dir(&data, &pristine);

        // A healthy store is not rebuilt by mistake.
        let rebuild_args = |force: bool| {
            let mut args = vec![
                "rebuild".to_string(),
                "--id".into(),
                target.to_string(),
                "--data".into(),
                data.display().to_string(),
            ];
            if force {
                args.push("--force".into());
            }
            args
        };
        let args = rebuild_args(false);
        let refused = cluster.run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("opens cleanly"));

        // The log's segment, the only copy of the entries, with a flipped
        // byte early on and intact records after it; truncated to half;
        // with a flipped byte inside the last stored message (a torn write,
        // were it not for the witness, which saw it synced). The node
        // refuses to start and names the store.
        let damages: [(&str, Damage); 3] = [
            (
                "flipped byte early in the segment",
                Box::new(|data: &Path| {
                    flip(
                        &data.join("log").join("00000000.wal"),
                        b"disk message 2",
                        false,
                    )
                }),
            ),
            (
                "truncated",
                Box::new(|data: &Path| {
                    let segment = data.join("log").join("00000000.wal");
                    // Half of the records (the zeros after them are room
                    // allocated ahead of the next write).
                    let bytes = std::fs::read(&segment).expect("segment");
                    let len = bytes
                        .iter()
                        .rposition(|byte| *byte != 0)
                        .map_or(0, |at| at + 1) as u64;
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&segment)
                        .expect("open the segment");
                    file.set_len(len / 2).expect("truncate");
                }),
            ),
            (
                "flipped byte",
                Box::new(|data: &Path| {
                    flip(
                        &data.join("log").join("00000000.wal"),
                        b"disk message 2999",
                        true,
                    )
                }),
            ),
        ];
        for (what, damage) in damages {
            let _ = std::fs::remove_dir_all(&data);
            copy_dir(&pristine, &data);
            damage(&data);
            cluster.launch(target);
            let status = cluster.wait_exit(target, Duration::from_secs(20));
            let log = cluster.log(target);
            let last = log.lines().last().unwrap_or_default().to_string();
            assert!(
                status.is_some_and(|s| !s.success()),
                "node {target} started on a {what} store"
            );
            println!("{what}: {last}");
            assert!(
                last.contains(&db.display().to_string())
                    || last.contains(&data.display().to_string()),
                "the error does not name the store: {last}"
            );
            assert!(last.contains("node rebuild"), "no way out offered: {last}");
        }

        // More is written while node 3 is down, then it is rebuilt.
        let more: String = (0..500)
            .map(|i| format!("while rebuilding {i}\n"))
            .collect();
        assert!(cluster
            .run_cli(&["send", "-"], Some(&more))
            .status
            .success());
        let args = rebuild_args(false);
        let rebuilt = cluster.run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
        assert!(
            rebuilt.status.success(),
            "rebuild failed: {}",
            String::from_utf8_lossy(&rebuilt.stderr)
        );
        println!("{}", String::from_utf8_lossy(&rebuilt.stdout).trim());
        let kept = std::fs::read_dir(cluster.dir.join("data"))
            .expect("data dir")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(".damaged-"));
        assert!(kept, "the damaged store was not kept aside");
        cluster.launch(target);
        cluster
            .wait_caught_up(&admin, Duration::from_secs(60))
            .await;
        let export = admin.export().await.expect("export");
        assert_eq!(export.len(), 3500);
        check_export(&export);
        cluster.kill(target);
        let expected: Vec<String> = export.iter().map(ExportedEntry::format_line).collect();
        assert_eq!(
            cluster.local_export(target),
            expected,
            "the rebuilt replica differs from the cluster's log"
        );
    });
}

/// A rebuilt replica does not vote with its empty log (issue #13, item 7).
/// Messages commit on the leader and node `rebuilt` while node `lagging`
/// is down; `rebuilt` loses its disk and is rebuilt (with `--force`, as
/// `lagging` cannot answer), and the leader stops. `lagging` returns
/// without the messages and campaigns: had the rebuilt node voted for it,
/// it would lead and overwrite them. Below its catch-up floor the rebuilt
/// node refuses, and says so in its log; no leader is elected until the
/// old leader returns, and then nothing acknowledged is missing.
#[test]
fn rebuilt_replica_refuses_votes_until_it_catches_up() {
    serial(|| async {
        let mut cluster = TestCluster::start("floor", 103, &[1, 2, 3], &[]);
        let admin = cluster.client("client");
        let leader = cluster.wait_for_leader(&admin, SECONDS_30).await;
        let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|n| *n != leader).collect();
        let (rebuilt, lagging) = (others[0], others[1]);
        let mut acked: Vec<(String, Committed)> = Vec::new();
        let send = |texts: Vec<String>| {
            let admin = &admin;
            async move {
                let (_, committed) = admin
                    .send(texts.clone())
                    .await
                    .unwrap_or_else(|e| panic!("send failed: {e:#}"));
                assert_eq!(committed.len(), texts.len());
                texts.into_iter().zip(committed).collect::<Vec<_>>()
            }
        };
        for batch in 0..2 {
            let texts = (0..50).map(|i| format!("before {batch}-{i}")).collect();
            acked.extend(send(texts).await);
        }
        cluster.wait_caught_up(&admin, SECONDS_30).await;

        // Node `lagging` stops; what follows commits on the other two.
        cluster.kill(lagging);
        for batch in 0..4 {
            let texts = (0..50)
                .map(|i| format!("without {lagging} {batch}-{i}"))
                .collect();
            acked.extend(send(texts).await);
        }

        // Node `rebuilt` loses its disk and is rebuilt from the leader.
        cluster.kill(rebuilt);
        let data = cluster.data_dir(rebuilt);
        std::fs::remove_dir_all(&data).expect("remove the data directory");
        let data = data.display().to_string();
        let id = rebuilt.to_string();
        let out = cluster.run_cli(&["rebuild", "--id", &id, "--data", &data, "--force"], None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rebuild failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("until its log reaches"), "{stdout}");

        // The leader stops; the other two start.
        cluster.kill(leader);
        cluster.launch(rebuilt);
        cluster.launch(lagging);
        let refusal = "behind this rebuilt replica's catch-up floor";
        cluster.wait_for_log(rebuilt, refusal, SECONDS_30).await;
        // Several election timeouts later, still nobody leads.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for id in [rebuilt, lagging] {
            let status = admin.status(id).await.expect("status");
            assert_ne!(status.role, Role::Leader, "node {id} leads: {status:?}");
        }
        let status = admin.status(rebuilt).await.expect("status");
        assert_eq!(status.last_index, 0, "{status:?}");
        assert!(status.catch_up_floor.is_some(), "{status:?}");

        // The old leader returns: a leader is elected, every node catches
        // up, and every acknowledged message is where it was acknowledged.
        cluster.launch(leader);
        cluster.wait_for_leader(&admin, SECONDS_30).await;
        cluster
            .wait_caught_up(&admin, Duration::from_secs(60))
            .await;
        let export = admin.export().await.expect("export");
        check_export(&export);
        assert_eq!(export.len(), acked.len());
        let by_text: HashMap<&str, u64> =
            export.iter().map(|e| (e.text.as_str(), e.index)).collect();
        for (text, committed) in &acked {
            assert_eq!(
                by_text.get(text.as_str()),
                Some(&committed.index),
                "an acknowledged message is lost or moved"
            );
        }
        let status = admin.status(rebuilt).await.expect("status");
        assert_eq!(status.catch_up_floor, None, "{status:?}");
        assert!(cluster
            .log(rebuilt)
            .contains("caught up with its catch-up floor"));
    });
}

/// Something done to a stopped node's files.
type Damage = Box<dyn Fn(&Path)>;

/// Flips one bit inside the last (or first) occurrence of `needle`.
fn flip(file: &Path, needle: &[u8], last: bool) {
    let mut bytes = std::fs::read(file).expect("read the file");
    let mut matches = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle);
    let found = if last {
        matches.next_back()
    } else {
        matches.next()
    };
    let (at, _) = found.unwrap_or_else(|| panic!("{} holds no {needle:?}", file.display()));
    bytes[at + 5] ^= 0x01;
    std::fs::write(file, bytes).expect("write the file");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Runs `node` with the cluster's client arguments and `input` on stdin,
/// and fails the test if it has not finished within `within` (the bug this
/// guards against was a client that waited forever).
fn run_cli_within(
    cluster: &TestCluster,
    args: &[&str],
    input: String,
    within: Duration,
) -> std::process::Output {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new(nodes::BIN)
        .args(args)
        .arg("--cluster")
        .arg(cluster.cluster_spec())
        .arg("--certs")
        .arg(cluster.certs())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut stdin = child.stdin.take().expect("stdin");
    // Threads feed stdin and drain stdout and stderr: the child may stop
    // reading early, and must never block on a full pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`node {}` still running after {within:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = writer.join();
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout"),
        stderr: stderr.join().expect("stderr"),
    }
}

/// Messages from 1 byte to the limit, and one over it. Twenty 1 MB lines
/// on `node send -` once hung the client (one batch made a frame no node
/// takes), export pages of large messages exceeded the frame limit, and a
/// later export page could come from a node that did not hold it.
#[test]
fn messages_from_one_byte_to_the_limit_and_one_over() {
    use cluster_store::wire::{ClientRequest, ClientResponse, MAX_MESSAGE_BYTES};
    serial(|| async {
        let cluster = TestCluster::start("sizes", 23, &[1, 2, 3], &[]);
        let admin = cluster.client("client");
        let leader = cluster.wait_for_leader(&admin, SECONDS_30).await;

        // Twenty messages of the largest size, then one of a single byte.
        let largest = "L".repeat(MAX_MESSAGE_BYTES);
        let mut input: String = (0..20).map(|_| format!("{largest}\n")).collect();
        input.push_str("b\n");
        let sent = run_cli_within(&cluster, &["send", "-"], input, Duration::from_secs(120));
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        assert!(String::from_utf8_lossy(&sent.stdout).contains("committed 21 messages"));

        // A line over the limit is refused at once, by its number; the
        // lines before it are committed, the ones after it are not sent.
        let over = "O".repeat(MAX_MESSAGE_BYTES + 1);
        let input = format!("one\ntwo\nthree\n{over}\nafter\n");
        let started = Instant::now();
        let refused = run_cli_within(&cluster, &["send", "-"], input, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "an oversized line was accepted");
        assert!(
            stderr.contains("line 4") && stderr.contains(&MAX_MESSAGE_BYTES.to_string()),
            "{stderr}"
        );
        assert!(
            stderr.contains("the 3 messages before it were committed"),
            "{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refusing took {:?}",
            started.elapsed()
        );
        // Export: 24 messages, 20 MB, across pages that each fit a frame.
        let export = run_cli_within(
            &cluster,
            &["export"],
            String::new(),
            Duration::from_secs(60),
        );
        assert!(
            export.status.success(),
            "{}",
            String::from_utf8_lossy(&export.stderr)
        );
        let texts: Vec<String> = String::from_utf8_lossy(&export.stdout)
            .lines()
            .map(|l| l.rsplit('\t').next().unwrap_or_default().to_string())
            .collect();
        let mut expected: Vec<String> = vec![largest.clone(); 20];
        expected.extend(["b", "one", "two", "three"].map(String::from));
        assert_eq!(texts.len(), expected.len());
        assert!(texts == expected, "the export differs from what was sent");

        // Backups: each node's own replica, paged the same way.
        let backups = cluster.dir.join("backups");
        let backup_dir = backups.to_string_lossy().into_owned();
        let made = run_cli_within(
            &cluster,
            &["export", "--backup-dir", &backup_dir],
            String::new(),
            Duration::from_secs(90),
        );
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        for node in [1, 2, 3] {
            let backup = std::fs::read_to_string(backups.join(format!("backup_{node}.txt")))
                .expect("backup file");
            assert_eq!(backup.lines().count(), 24, "backup of node {node}");
        }

        // A later export page is pinned to an index: a node whose store
        // does not hold the committed log that far must not answer it
        // (it would end the export short, or hand out uncommitted entries).
        let commit = admin.status(leader).await.expect("status").commit;
        for node in [1, 2, 3] {
            let ahead = admin
                .request(
                    node,
                    &ClientRequest::Export {
                        from: 1,
                        limit: 10,
                        upto: Some(commit + 1000),
                    },
                )
                .await
                .expect("answer");
            assert!(
                matches!(ahead, ClientResponse::Error { retry: true, .. }),
                "node {node} served a page past its commit index: {ahead:?}"
            );
        }
        cluster.wait_caught_up(&admin, SECONDS_30).await;
        for node in [1, 2, 3] {
            let held = admin
                .request(
                    node,
                    &ClientRequest::Export {
                        from: 21,
                        limit: 10,
                        upto: Some(commit),
                    },
                )
                .await
                .expect("answer");
            match held {
                ClientResponse::Entries { entries, .. } => {
                    assert!(!entries.is_empty(), "node {node} answered an empty page")
                }
                other => panic!("node {node} refused a page it holds: {other:?}"),
            }
        }
    });
}

/// `node send -` pipelines its batches on one stream. Against a leader
/// whose bound on what waits to commit (`--max-pending-mb 1`: about a
/// thousand small messages) is far below three pipelines' windows, a send
/// behind others on its stream waits for room, and one alone on its
/// stream is answered "busy"; whichever happens, no later batch on a
/// stream may be taken before a refused one (it was: lines 28,000.. landed
/// before line 2,000). Every line lands exactly once, in the order read.
#[test]
fn pipelined_sends_under_back_pressure_keep_their_order() {
    serial(|| async {
        let ip = 104;
        let cluster = TestCluster::start_with("pipeline-busy", ip, &[1, 2, 3], &[], |id| {
            vec![
                "--max-pending-mb".into(),
                "1".into(),
                "--http".into(),
                format!("127.0.0.{ip}:{}", 8000 + id),
            ]
        });
        let admin = cluster.client("client");
        let leader = cluster.wait_for_leader(&admin, SECONDS_30).await;
        let leader_http = format!("127.0.0.{ip}:{}", 8000 + leader);
        const LINES: usize = 20_000;
        // Three `node send -` at once (each blocks this thread's turn of
        // the runtime only; the nodes are processes of their own).
        let outputs: Vec<(&str, std::process::Output)> = std::thread::scope(|scope| {
            let senders: Vec<_> = [("a", "alice"), ("b", "bob"), ("c", "carol")]
                .into_iter()
                .map(|(prefix, name)| {
                    let input: String = (0..LINES).map(|i| format!("{prefix} {i:05}\n")).collect();
                    let cluster = &cluster;
                    scope.spawn(move || {
                        (
                            prefix,
                            cluster.run_cli(&["send", "-", "--name", name], Some(&input)),
                        )
                    })
                })
                .collect();
            senders
                .into_iter()
                .map(|sender| sender.join().expect("node send - thread"))
                .collect()
        });
        for (prefix, out) in outputs {
            assert!(
                out.status.success(),
                "node send - of the {prefix} lines failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let waited = metric(&leader_http, "cluster_store_waited_sends_total");
        let busy = metric(&leader_http, "cluster_store_busy_sends_total");
        println!("{waited} sends waited for room, {busy} answered busy");
        assert!(
            waited > 0,
            "no send waited for room: the test tests nothing"
        );
        cluster.wait_caught_up(&admin, SECONDS_30).await;
        let export = admin.export().await.expect("export");
        check_export(&export);
        for prefix in ["a", "b", "c"] {
            let sent: Vec<String> = (0..LINES).map(|i| format!("{prefix} {i:05}")).collect();
            let landed: Vec<&str> = export
                .iter()
                .map(|e| e.text.as_str())
                .filter(|t| t.starts_with(&format!("{prefix} ")))
                .collect();
            assert_eq!(landed.len(), LINES, "{prefix} lines lost or doubled");
            if let Some(i) = (0..LINES).find(|i| landed[*i] != sent[*i]) {
                panic!(
                    "{prefix} lines out of order from position {i}: {:?} where {:?} was sent",
                    &landed[i..(i + 5).min(LINES)],
                    sent[i]
                );
            }
        }
    });
}

/// A pipelining client that waits in a write while its answers pile up,
/// as `node send -` did: over TLS over TCP it writes a window of 64
/// sends, leaves the answers unread for a while (the node's answers,
/// 64 x 4,096 commit positions, 6 MB, are more than the sockets hold),
/// then reads one answer and writes one large send at a time. A node
/// that stopped reading while it waited to write an answer deadlocked
/// with it: the node stuck writing answers the client did not read, the
/// client stuck writing a send the node did not read. The node must read
/// on (within the window) and answer everything, each message once; the
/// library's own pipelined client, which now reads while it writes, then
/// sends batches of the same size in the same cluster.
#[test]
fn a_client_stuck_writing_while_its_answers_pile_up_is_answered() {
    use cluster_store::wire::{read_frame, write_frame, ClientRequest, MAX_BATCH};
    serial(|| async {
        let ip = 105;
        let cluster = TestCluster::start("window", ip, &[1, 2, 3], &[]);
        let admin = cluster.client("client");
        let leader = cluster.wait_for_leader(&admin, SECONDS_30).await;
        let creds = raw_creds(&cluster.certs(), "alice");
        let tls = tokio_rustls::TlsConnector::from(tls::tcp_client_config(&creds).expect("tls"));
        // Socket buffers on the client's side smaller than a large send,
        // so what decides is the node's behaviour, not how far the
        // kernel's buffers stretch.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(16 << 10).expect("rcvbuf");
        socket.set_send_buffer_size(256 << 10).expect("sndbuf");
        let stream = socket.connect(cluster.addr(leader)).await.expect("connect");
        let name = identity::node_server_name(leader).try_into().expect("name");
        let stream = tls.connect(name, stream).await.expect("tls handshake");
        let (mut recv, mut send) = tokio::io::split(stream);

        const WINDOW: usize = 64;
        const SENDS: usize = WINDOW + 8;
        let client_id = 0x5eed_0000_0000_0105;
        // The window's sends are small (ten bytes a message: the node's
        // buffers stay small); the eight after it are near the 4 MiB limit.
        let text = |send: usize, i: usize| {
            let tag = format!("w{send:03} {i:04} ");
            if send < WINDOW {
                tag
            } else {
                format!("{tag}{}", "x".repeat(900))
            }
        };
        let request = |send: usize| ClientRequest::Send {
            client_id,
            first_seq: 1 + (send * MAX_BATCH) as u64,
            lamport: 1,
            since: 0,
            texts: (0..MAX_BATCH).map(|i| text(send, i)).collect(),
            after: None,
        };
        let exchange = async {
            for i in 0..WINDOW {
                write_frame(&mut send, &request(i)).await?;
            }
            // Long enough for the window to commit and its answers to
            // fill every buffer on the way.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut answered = 0;
            for i in WINDOW..SENDS + WINDOW {
                let answer = read_frame::<_, ClientResponse>(&mut recv)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("the node closed the stream"))?;
                match answer {
                    ClientResponse::Sent { committed, .. } if committed.len() == MAX_BATCH => {
                        answered += 1
                    }
                    other => anyhow::bail!("send {answered} answered {other:?}"),
                }
                if i < SENDS {
                    write_frame(&mut send, &request(i)).await?;
                }
            }
            anyhow::Ok(answered)
        };
        let answered = tokio::time::timeout(Duration::from_secs(120), exchange)
            .await
            .expect("deadlock: the node stopped reading while its answers waited for room")
            .expect("exchange");
        assert_eq!(answered, SENDS);

        // The library's pipelined client, 64 batches of 4,000 in flight:
        // what a session's deduplication window (260,000) covers.
        const BATCH: usize = 4000;
        let alice = client_of(&cluster, &creds);
        let batches = (0..WINDOW + 8).map(|b| {
            (0..BATCH)
                .map(|i| format!("p{b:03} {i:04}"))
                .collect::<Vec<_>>()
        });
        let mut committed = 0;
        tokio::time::timeout(
            Duration::from_secs(120),
            alice.send_pipelined(batches, cluster_store::client::PIPELINE_WINDOW, |_, c| {
                committed += c.len();
                Ok(())
            }),
        )
        .await
        .expect("the pipelined client hung")
        .expect("pipelined send");
        assert_eq!(committed, (WINDOW + 8) * BATCH);

        cluster.wait_caught_up(&admin, SECONDS_30).await;
        let export = admin.export().await.expect("export");
        check_export(&export);
        // Each client's messages in the log: every one once, in the order sent.
        let landed_in_order = |prefix: char, sent: Vec<String>, who: &str| {
            let landed: Vec<&str> = export
                .iter()
                .map(|e| e.text.as_str())
                .filter(|t| t.starts_with(prefix))
                .collect();
            assert_eq!(landed.len(), sent.len(), "{who}'s messages lost or doubled");
            assert!(
                landed.iter().zip(&sent).all(|(a, b)| a == b),
                "{who}'s messages out of order"
            );
        };
        landed_in_order(
            'w',
            (0..SENDS)
                .flat_map(|s| (0..MAX_BATCH).map(move |i| text(s, i)))
                .collect(),
            "the raw client",
        );
        landed_in_order(
            'p',
            (0..WINDOW + 8)
                .flat_map(|b| (0..BATCH).map(move |i| format!("p{b:03} {i:04}")))
                .collect(),
            "the pipelined client",
        );
    });
}
