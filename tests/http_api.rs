//! The dashboard's JSON API and live feed against a real three-node
//! cluster, and the page itself in a real headless browser.

mod nodes;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nodes::TestCluster;
use serde_json::Value;

/// The HTTP side of one test's cluster, on its own loopback address so
/// tests can run side by side.
#[derive(Clone, Copy)]
struct Http {
    ip: u8,
}

/// Nodes 1 and 2 accept writes over HTTP; node 3 does not.
fn start(name: &str, ip: u8) -> (TestCluster, Http) {
    let cluster = TestCluster::start_with(name, ip, &[1, 2, 3], &[], |id| {
        let mut args = vec!["--http".to_string(), format!("127.0.0.{ip}:{}", 8000 + id)];
        if id != 3 {
            args.push("--http-write".into());
        }
        args
    });
    (cluster, Http { ip })
}

impl Http {
    fn addr(self, id: u64) -> String {
        format!("127.0.0.{}:{}", self.ip, 8000 + id)
    }

    /// A minimal HTTP/1.1 exchange: (status, body).
    fn request(self, node: u64, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr(node)).expect("connect to the HTTP API");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        (status, body.to_string())
    }

    fn json(self, node: u64, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, body) = self.request(node, method, path, body);
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"));
        (status, value)
    }

    /// Like `request`, but a node that is down or slow is an answer too.
    fn try_json(self, node: u64, method: &str, path: &str) -> Option<(u16, Value)> {
        let mut stream = TcpStream::connect(self.addr(node)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, serde_json::from_str(body).ok()?))
    }

    fn wait_for_leader(self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = TcpStream::connect(self.addr(1)) {
                drop(stream);
                let (_, leader) = self.json(1, "GET", "/leader", None);
                if let Some(id) = leader["leader"].as_u64() {
                    return id;
                }
            }
            assert!(Instant::now() < deadline, "no leader over HTTP");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn json_api_against_a_real_cluster() {
    let (cluster, http) = start("http", 19);
    let leader = http.wait_for_leader();

    let (code, status) = http.json(1, "GET", "/status", None);
    assert_eq!(code, 200);
    assert_eq!(status["id"], 1);
    assert_eq!(status["http_write"], true);
    for node in [1, 2, 3] {
        // A follower names the leader once its first message arrives.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut answer = http.json(node, "GET", "/leader", None).1;
        while answer["leader"].as_u64() != Some(leader) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            answer = http.json(node, "GET", "/leader", None).1;
        }
        assert_eq!(answer["leader"].as_u64(), Some(leader), "node {node}");
        let (_, clock) = http.json(node, "GET", "/lamport_time", None);
        assert!(clock["lamport"].is_u64());
    }
    let (_, all) = http.json(3, "GET", "/cluster", None);
    assert_eq!(all["nodes"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        all["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter(|n| n["role"] == "Leader")
            .count(),
        1
    );

    // Writes on a follower are forwarded to the leader.
    let follower = if leader == 1 { 2 } else { 1 };
    let (code, sent) = http.json(
        follower,
        "POST",
        "/?message=hello%20from%20a%20follower",
        None,
    );
    assert_eq!(code, 200, "{sent}");
    assert_eq!(sent["leader"].as_u64(), Some(leader));
    let (code, second) = http.json(
        follower,
        "POST",
        "/messages",
        Some(r#"{"message":"json body"}"#),
    );
    assert_eq!(code, 200, "{second}");
    assert!(second["lamport"].as_u64() > sent["lamport"].as_u64());

    // They appear, in order, on another node's replica.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, page) = http.json(3, "GET", "/messages?from=1&limit=10", None);
        let texts: Vec<&str> = page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        if texts == ["hello from a follower", "json body"] {
            assert_eq!(
                page["messages"][0]["sender"],
                format!("http@node-{follower}")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages never reached node 3: {page}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, newest) = http.json(3, "GET", "/messages?last=1", None);
    assert_eq!(newest["messages"][0]["text"], "json body");

    // Writes are refused where they are off, with the way to turn them on.
    let (code, refused) = http.json(3, "POST", "/?message=nope", None);
    assert_eq!(code, 403);
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("--http-write")),
        "{refused}"
    );

    // Bad parameters: 400 with a reason.
    for (method, path, body) in [
        ("GET", "/messages?limit=abc", None),
        ("GET", "/messages?limit=0", None),
        ("GET", "/messages?from=0", None),
        ("GET", "/messages?from=1&last=3", None),
        ("POST", "/", None),
        ("POST", "/messages", Some("{not json")),
        ("POST", "/messages", Some(r#"{"other":1}"#)),
    ] {
        let (code, answer) = http.json(1, method, path, body);
        assert_eq!(code, 400, "{method} {path}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}"
        );
    }

    let (code, metrics) = http.request(leader, "GET", "/metrics", None);
    assert_eq!(code, 200);
    for name in [
        "cluster_store_commits_total",
        "cluster_store_proposals_total 2",
        "cluster_store_elections_total",
        "cluster_store_term",
        "cluster_store_follower_lag{peer=",
        "cluster_store_fsync_seconds_bucket",
        "cluster_store_commit_seconds_count 2",
        "cluster_store_quic_bytes_sent_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    let (code, page) = http.request(2, "GET", "/dashboard", None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>cluster-store</title>"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page must load nothing from outside"
    );
    drop(cluster);
}

/// A follower the leader does not need for a majority is sent its appends
/// marked lazy and stages their writes to share a later sync
/// (`cluster_store_lazy_writes_total`); a leader's writes never linger.
/// Every acknowledged message is on every replica afterwards, in order.
#[test]
fn a_follower_commit_does_not_wait_for_stages_its_writes_lazily() {
    const SENDS: usize = 100;
    let (cluster, http) = start("lazy", 25);
    let leader = http.wait_for_leader();
    let term = |node| http.json(node, "GET", "/leader", None).1["term"].as_u64();
    let term_before = term(leader);
    for i in 0..SENDS {
        // Node 1 takes HTTP writes and forwards them if it does not lead.
        let (code, answer) = http.json(1, "POST", &format!("/?message=m{i}"), None);
        assert_eq!(code, 200, "{answer}");
    }
    let counter = |node, name: &str| -> u64 {
        let (code, metrics) = http.request(node, "GET", "/metrics", None);
        assert_eq!(code, 200);
        let prefix = format!("cluster_store_{name}_total ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}_total on node {node}:\n{metrics}"))
    };
    let lazy_writes = |node| counter(node, "lazy_writes");
    // A leader's writes never linger; an election on a busy machine would
    // have made it a follower for a while, so that is judged in one term.
    if term(leader) == term_before {
        assert_eq!(lazy_writes(leader), 0, "the leader's writes never linger");
        // A send's commit announcement to the lazy follower usually comes
        // within the hold of its append and is absorbed by it.
        let merged = counter(leader, "merged_appends");
        assert!(
            merged > 0,
            "the leader merged no appends to its lazy follower in {SENDS} sends"
        );
    } else {
        eprintln!("an election during the sends: the leader's count is not judged");
    }
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != leader).collect();
    let lazy: Vec<u64> = followers.iter().map(|n| lazy_writes(*n)).collect();
    // One follower of two is lazy at any time. Its appends wait up to 2 ms
    // at the leader and leave merged (`held_appends.rs`), so back-to-back
    // sends make fewer lazy writes than sends (34 for 100 here once, about
    // one a send before), and a slow machine more; next to none would
    // mean no follower was lazy for long.
    assert!(
        lazy.iter().sum::<u64>() >= 5,
        "followers {followers:?} staged {lazy:?} lazy writes for {SENDS} sends"
    );
    let expected: Vec<String> = (0..SENDS).map(|i| format!("m{i}")).collect();
    for node in [1, 2, 3] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, page) = http.json(node, "GET", "/messages?from=1&limit=1000", None);
            let texts: Vec<String> = page["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter_map(|m| m["text"].as_str().map(str::to_string))
                .collect();
            if texts == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} holds {} of {SENDS} messages",
                texts.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(cluster);
}

/// A node's HTTP side reaches the other nodes with the node's own
/// certificate. It once took over their Raft links: an open dashboard
/// stopped a node's replication, and writes through the HTTP API kept a
/// cluster from electing a leader after a kill. Here every node's dashboard
/// polls `/cluster` and writes go through every node's HTTP API while the
/// leader is killed: a leader must be back at once, and every node must
/// replicate every acknowledged write.
#[test]
fn dashboards_and_http_writes_on_every_node_survive_a_leader_kill() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let ip = 22;
    let mut cluster = TestCluster::start_with("http-kill", ip, &[1, 2, 3], &[], |id| {
        vec![
            "--http".to_string(),
            format!("127.0.0.{ip}:{}", 8000 + id),
            "--http-write".into(),
        ]
    });
    let http = Http { ip };
    let leader = http.wait_for_leader();
    let stop = Arc::new(AtomicBool::new(false));
    // (when, text, index) of every write the HTTP API acknowledged.
    let acknowledged = Arc::new(Mutex::new(Vec::<(Instant, String, u64)>::new()));
    let dashboards = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Highest id first: each node's HTTP side then reaches the
                // peers that wait for its Raft link after they reached it.
                for node in [3, 2, 1] {
                    let _ = http.try_json(node, "GET", "/cluster");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let writers = {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let text = format!("w{i}");
                if let Some((200, sent)) =
                    http.try_json(i % 3 + 1, "POST", &format!("/?message={text}"))
                {
                    if let Some(index) = sent["index"].as_u64() {
                        if let Ok(mut acknowledged) = acknowledged.lock() {
                            acknowledged.push((Instant::now(), text, index));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _entered = runtime.enter();
    let admin = cluster.client("client");

    // With every dashboard open, every node keeps replicating.
    std::thread::sleep(Duration::from_secs(3));
    let before = acknowledged.lock().map(|a| a.len()).unwrap_or(0);
    assert!(
        before >= 5,
        "only {before} HTTP writes acknowledged in 3 s before the kill"
    );
    runtime.block_on(cluster.wait_caught_up(&admin, Duration::from_secs(10)));

    cluster.kill(leader);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(10);
    let first_after = loop {
        let after = acknowledged.lock().ok().and_then(|a| {
            a.iter()
                .find(|(at, _, _)| *at > killed)
                .map(|(at, _, _)| *at)
        });
        if let Some(at) = after {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "no HTTP write acknowledged within 10 s of killing leader {leader}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "first HTTP write acknowledged {:?} after the kill",
        first_after - killed
    );
    std::thread::sleep(Duration::from_secs(2));
    cluster.launch(leader);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    dashboards.join().expect("dashboards");
    writers.join().expect("writers");
    runtime.block_on(cluster.wait_caught_up(&admin, Duration::from_secs(15)));

    // Every acknowledged write is on every node's replica, once, where
    // its answer said.
    let acknowledged = acknowledged.lock().expect("acknowledged").clone();
    for node in [1, 2, 3] {
        let page = runtime
            .block_on(admin.local_export(node))
            .expect("local export");
        for (_, text, index) in &acknowledged {
            let found: Vec<u64> = page
                .iter()
                .filter(|e| &e.text == text)
                .map(|e| e.index)
                .collect();
            assert_eq!(found, vec![*index], "node {node}: {text}");
        }
    }
    drop(cluster);
}

#[test]
fn events_stream_commits_as_they_happen() {
    let (cluster, http) = start("sse", 20);
    http.wait_for_leader();
    let mut reader = open_events(http.addr(3), "");
    std::thread::sleep(Duration::from_millis(300));
    let (code, _) = http.json(1, "POST", "/?message=live", None);
    assert_eq!(code, 200);
    let (id, data) = next_commit_event(&mut reader).expect("no commit event");
    assert!(data.contains("\"text\":\"live\""), "{data}");

    // A browser reconnecting with the last id it saw gets what followed;
    // with an earlier one, what it missed, in order.
    let (code, _) = http.json(1, "POST", "/?message=after", None);
    assert_eq!(code, 200);
    let last_seen: u64 = id.parse().expect("a commit event's id is its index");
    let mut resumed = open_events(
        http.addr(2),
        &format!("Last-Event-ID: {}\r\n", last_seen - 1),
    );
    let (again, data) = next_commit_event(&mut resumed).expect("no replayed event");
    assert_eq!(again, id, "the replay starts after Last-Event-ID");
    assert!(data.contains("\"text\":\"live\""), "{data}");
    let (_, data) = next_commit_event(&mut resumed).expect("no following event");
    assert!(data.contains("\"text\":\"after\""), "{data}");
    drop(cluster);
}

/// `GET /events` with extra header lines, its answer to be read.
fn open_events(addr: String, headers: &str) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "GET /events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n{headers}\r\n"
    )
    .expect("request");
    BufReader::new(stream)
}

/// Reads server-sent events until a `commit` one: its id and data line.
fn next_commit_event(reader: &mut impl BufRead) -> Option<(String, String)> {
    let mut id = None;
    let mut line = String::new();
    while reader.read_line(&mut line).ok()? > 0 {
        if let Some(value) = line.strip_prefix("id:") {
            id = Some(value.trim().to_string());
        } else if line.starts_with("data:") && line.contains("\"type\":\"commit\"") {
            return Some((id?, line.trim().to_string()));
        } else if line.trim().is_empty() {
            id = None;
        }
        line.clear();
    }
    None
}

/// The page in headless Chromium, driven over WebDriver: it shows the
/// three nodes and the leader, and a message sent through its form shows
/// up on another node's page. Needs Debian's chromium and chromium-driver,
/// so it is ignored by a plain `cargo test` (listed as ignored, never as
/// passed); `.ci/run` installs them and runs it with `--ignored`, where a
/// missing chromedriver fails it.
/// Where the browser test's chromedriver listens.
const CHROMEDRIVER_PORT: u16 = 9515;

#[test]
#[ignore = "needs chromium and chromium-driver; .ci/run runs it with --ignored"]
fn dashboard_in_a_real_browser() {
    let driver_path = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromedriver is not installed: apt-get install chromium chromium-driver");
    let (cluster, http) = start("browser", 21);
    let leader = http.wait_for_leader();
    let mut driver = std::process::Command::new(driver_path)
        .arg(format!("--port={CHROMEDRIVER_PORT}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromedriver");
    // chromedriver listens once it has started: wait for that, not a
    // guess (500 ms was too short once on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", CHROMEDRIVER_PORT)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on port {CHROMEDRIVER_PORT} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let result = runtime.block_on(browse(http, leader));
    let _ = driver.kill();
    let _ = driver.wait();
    drop(cluster);
    if let Err(e) = result {
        panic!("browser test failed: {e:#}");
    }
}

async fn browse(http: Http, leader: u64) -> anyhow::Result<()> {
    use fantoccini::{ClientBuilder, Locator};
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"] }),
    );
    let writer = if leader == 1 { 2 } else { 1 };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{CHROMEDRIVER_PORT}"))
        .await?;
    let outcome = async {
        browser
            .goto(&format!("http://{}/dashboard", http.addr(3)))
            .await?;
        // Three nodes, one marked leader.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows = browser.find_all(Locator::Css("#nodes tr")).await?;
            let leaders = browser.find_all(Locator::Css("#nodes tr.leader")).await?;
            if rows.len() == 3 && leaders.len() == 1 {
                let id = leaders[0].attr("data-node-id").await?;
                anyhow::ensure!(
                    id == Some(leader.to_string()),
                    "page marks {id:?} as leader, expected {leader}"
                );
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "page never showed three nodes and a leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Node 3 does not accept writes over HTTP: no form.
        let form = browser.find(Locator::Css("#send-form")).await?;
        anyhow::ensure!(
            !form.is_displayed().await?,
            "node 3 offers a send form with writes off"
        );
        // Send through the form of a node that accepts writes...
        let page3 = browser.window().await?;
        browser.new_window(true).await?;
        let windows = browser.windows().await?;
        let other = windows
            .into_iter()
            .find(|w| *w != page3)
            .ok_or_else(|| anyhow::anyhow!("no second tab"))?;
        browser.switch_to_window(other).await?;
        browser
            .goto(&format!("http://{}/dashboard", http.addr(writer)))
            .await?;
        let input = browser
            .wait()
            .for_element(Locator::Css("#message-input"))
            .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await; // the form appears once /cluster answered
        input.send_keys("typed in a browser").await?;
        browser
            .find(Locator::Css("#send-button"))
            .await?
            .click()
            .await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let result = browser
                .find(Locator::Css("#send-result"))
                .await?
                .text()
                .await?;
            if result.contains("committed at index") {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the form never reported a commit: {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // ...and it appears, live, on node 3's page.
        browser.switch_to_window(page3).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let list = browser
                .find(Locator::Css("#messages"))
                .await?
                .text()
                .await?;
            if list.contains("typed in a browser") {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the message never appeared on node 3's page: {list:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let png = browser.screenshot().await?;
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::write(dir.join("dashboard.png"), png)?;
        println!("screenshot kept at {}", dir.join("dashboard.png").display());
        anyhow::Ok(())
    }
    .await;
    let _ = browser.close().await;
    outcome
}
