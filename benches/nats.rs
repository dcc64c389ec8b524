//! `cargo bench --bench nats`: the same workload as `--bench cluster` and
//! `--bench etcd`, against NATS JetStream (Debian's `nats-server`,
//! installed by `scripts/bench-peers.sh`): three servers in one cluster on
//! loopback, an R3 file stream, and closed-loop clients that each keep one
//! TCP connection and publish one 100-byte message at a time, waiting for
//! its PubAck. The NATS protocol is spoken directly (CONNECT, SUB, PUB,
//! MSG), no client crate.
//!
//! What a PubAck means: the message is in the stream leader's and a
//! majority's Raft logs, written to the files but not synced. JetStream's
//! file store syncs on a timer (every 2 minutes in 2.9, hard-wired; the
//! Raft log every 5). From 2.10 `jetstream { sync_interval: always }`
//! syncs every write before the acknowledgement; when the server accepts
//! that option (`nats-server -t`) the bench measures it too. It reports;
//! it asserts nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

mod common;

use common::{closed_loop_with, env_u64, median, Load};

const IP: &str = "127.0.0.170";
const STREAM: &str = "BENCH";

/// Publishes that got an answer other than a PubAck, or none, in the
/// current phase.
static UNACKED: AtomicU64 = AtomicU64::new(0);

fn client_port(server: usize) -> u16 {
    24220 + server as u16
}

fn route_port(server: usize) -> u16 {
    24230 + server as u16
}

/// The `jetstream` block's extra settings: none (the defaults) or
/// `sync_interval: always`.
#[derive(Clone, Copy, PartialEq)]
enum Sync {
    Default,
    Always,
}

impl Sync {
    fn setting(self) -> &'static str {
        match self {
            Sync::Default => "",
            Sync::Always => "sync_interval: always",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sync::Default => "default sync (acks before fsync)",
            Sync::Always => "sync_interval: always",
        }
    }
}

fn config(dir: &Path, server: usize, sync: Sync) -> String {
    let routes: Vec<String> = (0..3)
        .map(|s| format!("nats-route://{IP}:{}", route_port(s)))
        .collect();
    format!(
        "server_name: n{server}\nlisten: {IP}:{}\njetstream {{\n  store_dir: \"{}\"\n  {}\n}}\ncluster {{\n  name: bench\n  listen: {IP}:{}\n  routes: [{}]\n}}\n",
        client_port(server),
        dir.join(format!("n{server}")).display(),
        sync.setting(),
        route_port(server),
        routes.join(", ")
    )
}

/// Three `nats-server` processes; killed (and their files removed) when
/// dropped, also on a panic.
struct Nats {
    dir: PathBuf,
    servers: Vec<Child>,
}

impl Nats {
    fn start(bin: &str, run: usize, sync: Sync) -> Nats {
        let dir = std::env::temp_dir().join(format!("bench-nats-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut nats = Nats {
            dir,
            servers: Vec::new(),
        };
        for server in 0..3 {
            let conf = nats.dir.join(format!("n{server}.conf"));
            std::fs::write(&conf, config(&nats.dir, server, sync)).expect("config");
            let log = std::fs::File::create(nats.dir.join(format!("n{server}.log"))).expect("log");
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start nats-server");
            nats.servers.push(child);
        }
        nats
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this `nats-server` accepts `sync_interval: always` (2.10 and
/// later); the server's own complaint if not.
fn sync_always_supported(bin: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("bench-nats-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let conf = dir.join("check.conf");
    std::fs::write(&conf, config(&dir, 0, Sync::Always)).map_err(|e| e.to_string())?;
    let out = Command::new(bin).arg("-t").arg("-c").arg(&conf).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Err(text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("rejected")
        .trim()
        .replace(&conf.display().to_string(), "config"))
}

/// One client connection: publishes with a reply subject under its own
/// inbox and waits for the reply.
struct Conn {
    stream: BufReader<TcpStream>,
    inbox: String,
    next: u64,
}

impl Conn {
    async fn connect(server: usize, name: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect((IP, client_port(server))).await?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream: BufReader::new(stream),
            inbox: format!("_INBOX.{name}"),
            next: 0,
        };
        let mut line = String::new();
        conn.stream.read_line(&mut line).await?;
        if !line.starts_with("INFO ") {
            return Err(std::io::Error::other(format!(
                "expected INFO, got {line:?}"
            )));
        }
        let hello = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1,\"name\":\"{name}\"}}\r\nSUB {}.* 1\r\nPING\r\n",
            conn.inbox
        );
        conn.stream.get_mut().write_all(hello.as_bytes()).await?;
        loop {
            match conn.frame().await? {
                Frame::Pong => return Ok(conn),
                Frame::Msg { .. } => {}
            }
        }
    }

    /// The next frame the client must see: a PONG or a message (`status`
    /// is a headers message's status line, e.g. `503` for no responders).
    /// Answers PINGs and skips INFO and +OK on the way.
    async fn frame(&mut self) -> std::io::Result<Frame> {
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            let mut words = line.split(' ');
            match words.next().unwrap_or("") {
                "PING" => self.stream.get_mut().write_all(b"PONG\r\n").await?,
                "PONG" => return Ok(Frame::Pong),
                "INFO" | "+OK" | "" => {}
                "-ERR" => return Err(std::io::Error::other(line.to_string())),
                "MSG" => {
                    // MSG <subject> <sid> [reply-to] <#bytes>
                    let fields: Vec<&str> = line.split(' ').collect();
                    let len = parse_len(fields.last())?;
                    let mut payload = vec![0; len + 2];
                    self.stream.read_exact(&mut payload).await?;
                    payload.truncate(len);
                    return Ok(Frame::Msg {
                        subject: fields[1].to_string(),
                        status: None,
                        payload,
                    });
                }
                "HMSG" => {
                    // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                    let fields: Vec<&str> = line.split(' ').collect();
                    let total = parse_len(fields.last())?;
                    let headers = parse_len(fields.get(fields.len().wrapping_sub(2)))?;
                    let mut body = vec![0; total + 2];
                    self.stream.read_exact(&mut body).await?;
                    let head = String::from_utf8_lossy(&body[..headers.min(total)]).into_owned();
                    // "NATS/1.0 503\r\n..." carries a status; "NATS/1.0\r\n" does not.
                    let status = head
                        .lines()
                        .next()
                        .and_then(|l| l.split_whitespace().nth(1))
                        .map(str::to_string);
                    return Ok(Frame::Msg {
                        subject: fields[1].to_string(),
                        status,
                        payload: body[headers.min(total)..total].to_vec(),
                    });
                }
                other => {
                    return Err(std::io::Error::other(format!(
                        "unexpected protocol line {other:?}"
                    )))
                }
            }
        }
    }

    /// Publishes `payload` to `subject` and returns the reply's body; a
    /// status reply (no responders, a timeout) is a refusal.
    async fn request(&mut self, subject: &str, payload: &[u8]) -> Result<Vec<u8>, Failure> {
        self.next += 1;
        let reply = format!("{}.{}", self.inbox, self.next);
        let mut out = format!("PUB {subject} {reply} {}\r\n", payload.len()).into_bytes();
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        self.stream.get_mut().write_all(&out).await?;
        loop {
            if let Frame::Msg {
                subject,
                status,
                payload,
            } = self.frame().await?
            {
                // Replies to an earlier request (one that timed out) are stale.
                if subject != reply {
                    continue;
                }
                if let Some(status) = status {
                    return Err(Failure::Refused(format!("status {status}")));
                }
                return Ok(payload);
            }
        }
    }

    /// A JetStream API call: the reply as JSON; a reply with an `error` is
    /// a refusal.
    async fn api(&mut self, subject: &str, body: &[u8]) -> Result<serde_json::Value, Failure> {
        let reply = self.request(subject, body).await?;
        let value: serde_json::Value = serde_json::from_slice(&reply)
            .map_err(|e| Failure::Refused(format!("reply is not JSON: {e}")))?;
        if let Some(error) = value.get("error") {
            return Err(Failure::Refused(error.to_string()));
        }
        Ok(value)
    }

    /// A JetStream publish: Ok once the PubAck (`{"stream":..,"seq":..}`)
    /// is back; a reply with an `error` or without `seq` is a refusal.
    async fn publish(&mut self, payload: &[u8]) -> Result<u64, Failure> {
        self.publish_to("bench.x", payload).await
    }

    async fn publish_to(&mut self, subject: &str, payload: &[u8]) -> Result<u64, Failure> {
        let ack = self.api(subject, payload).await?;
        ack.get("seq")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| Failure::Refused(format!("no seq in PubAck {ack}")))
    }
}

/// Why a request got no acknowledgement: the server answered with an
/// error (the connection is still good), or the connection broke.
#[derive(Debug)]
enum Failure {
    Refused(String),
    Broken(std::io::Error),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Broken(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(why) => write!(f, "refused: {why}"),
            Failure::Broken(e) => write!(f, "connection: {e}"),
        }
    }
}

enum Frame {
    Pong,
    Msg {
        subject: String,
        status: Option<String>,
        payload: Vec<u8>,
    },
}

fn parse_len(field: Option<&&str>) -> std::io::Result<usize> {
    field
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad length in MSG"))
}

/// Creates the R3 file stream once JetStream has a meta leader, then waits
/// until the stream has a leader, both replicas are current and a publish
/// is acknowledged.
async fn create_stream() {
    let deadline = Instant::now() + Duration::from_secs(60);
    let config = format!(
        "{{\"name\":\"{STREAM}\",\"subjects\":[\"bench.>\"],\"storage\":\"file\",\"num_replicas\":3,\"retention\":\"limits\",\"discard\":\"old\"}}"
    );
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let mut conn = Conn::connect(0, "setup").await?;
            conn.api(
                &format!("$JS.API.STREAM.CREATE.{STREAM}"),
                config.as_bytes(),
            )
            .await?;
            loop {
                let info = conn
                    .api(&format!("$JS.API.STREAM.INFO.{STREAM}"), b"")
                    .await?;
                let cluster = &info["cluster"];
                let replicas = cluster["replicas"].as_array().cloned().unwrap_or_default();
                if cluster["leader"].is_string()
                    && replicas.len() == 2
                    && replicas.iter().all(|r| r["current"] == true)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            conn.publish(b"warm-up").await?;
            // The bench's own check that only a PubAck counts: a JetStream
            // error reply and a publish no stream takes must both fail.
            let missing = conn.api("$JS.API.STREAM.INFO.NO_SUCH_STREAM", b"").await;
            assert!(
                matches!(missing, Err(Failure::Refused(_))),
                "an error reply was taken for success: {missing:?}"
            );
            let stray = conn.publish_to("not-in-the-stream", b"x").await;
            assert!(
                matches!(stray, Err(Failure::Refused(_))),
                "a publish no stream took was acknowledged: {stray:?}"
            );
            Ok::<_, Failure>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("NATS JetStream stream not ready after 60 s: {last}");
}

async fn closed_loop(clients: usize, seconds: u64) -> Load {
    closed_loop_with(clients, seconds, |c, until| async move {
        let mut latencies = Vec::new();
        let payload = vec![b'x'; 100];
        let mut conn = None;
        while Instant::now() < until {
            if conn.is_none() {
                conn = Conn::connect(c % 3, &format!("c{c}")).await.ok();
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
            let Some(client) = conn.as_mut() else {
                continue;
            };
            let started = Instant::now();
            match tokio::time::timeout(Duration::from_secs(5), client.publish(&payload)).await {
                Ok(Ok(_)) => latencies.push(started.elapsed()),
                // A JetStream error reply: not acknowledged, not counted.
                Ok(Err(Failure::Refused(_))) => {
                    UNACKED.fetch_add(1, Ordering::Relaxed);
                }
                // The connection broke or timed out mid-frame: a new one.
                Ok(Err(Failure::Broken(_))) | Err(_) => {
                    UNACKED.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
        }
        latencies
    })
    .await
}

struct Row {
    one: f64,
    one_p50: f64,
    many: f64,
    many_p99: f64,
}

async fn measure(bin: &str, sync: Sync, runs: usize, seconds: u64) -> Row {
    let (mut one, mut one_p50, mut many, mut many_p99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let _nats = Nats::start(bin, run, sync);
        create_stream().await;
        UNACKED.store(0, Ordering::Relaxed);
        let load = closed_loop(1, seconds).await;
        one.push(load.throughput);
        one_p50.push(load.p50.as_secs_f64() * 1000.0);
        let load = closed_loop(64, seconds).await;
        many.push(load.throughput);
        many_p99.push(load.p99.as_secs_f64() * 1000.0);
        println!(
            "{} run {run}: 1 client {:.0}/s p50 {:.2} ms; 64 clients {:.0}/s p99 {:.1} ms; {} publishes not acknowledged",
            sync.label(),
            one[run],
            one_p50[run],
            many[run],
            many_p99[run],
            UNACKED.swap(0, Ordering::Relaxed)
        );
    }
    Row {
        one: median(one),
        one_p50: median(one_p50),
        many: median(many),
        many_p99: median(many_p99),
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("NATS comparison: run `scripts/bench-peers.sh` (or `cargo bench --bench nats`)");
        return;
    }
    let bin = std::env::var("NATS_BIN").unwrap_or_else(|_| "nats-server".into());
    let Ok(version) = Command::new(&bin).arg("--version").output() else {
        println!("{bin} not found: scripts/bench-peers.sh installs Debian's nats-server");
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout)
        .trim()
        .trim_start_matches("nats-server: ")
        .to_string();
    let runs = env_u64("BENCH_RUNS", 3) as usize;
    let seconds = env_u64("BENCH_SECONDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("NATS JetStream benchmark (nats-server {version}): 3 servers on loopback, R3 file stream, {runs} runs, {seconds} s phases, 100-byte messages, medians");
    let always = sync_always_supported(&bin);
    let mut modes = vec![Sync::Default];
    match &always {
        Ok(()) => modes.push(Sync::Always),
        Err(why) => println!("sync_interval: always is not accepted by this server: {why}"),
    }
    let rows: Vec<(Sync, Row)> = runtime.block_on(async {
        let mut rows = Vec::new();
        for sync in modes {
            rows.push((sync, measure(&bin, sync, runs, seconds).await));
        }
        rows
    });
    println!("| NATS JetStream {version}, R3 file stream | result |");
    println!("| --- | --- |");
    for (sync, row) in &rows {
        println!(
            "| 1 client, {} | {:.0} msg/s, p50 {:.2} ms |",
            sync.label(),
            row.one,
            row.one_p50
        );
        println!(
            "| 64 clients, {} | {:.0} msg/s, p99 {:.1} ms |",
            sync.label(),
            row.many,
            row.many_p99
        );
    }
    if let Err(why) = always {
        println!("| sync_interval: always | not available in {version} ({why}) |");
    }
}
