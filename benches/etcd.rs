//! `cargo bench --bench etcd`: the same workload as `--bench cluster`,
//! against a three-member etcd cluster (Debian's `etcd-server`, installed
//! by `scripts/bench-etcd.sh`) on this machine, so the ratio in
//! BENCHMARKS.md can be checked by anyone. Each client keeps one HTTP/1.1
//! connection to etcd's JSON gateway and writes one 100-byte value at a
//! time; etcd syncs its WAL on every member before it answers, as
//! cluster-store does. It reports; it asserts nothing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

mod common;

use common::{closed_loop_with, env_u64, median, Load};

const IP: &str = "127.0.0.160";

fn client_port(member: usize) -> u16 {
    23790 + member as u16
}

fn peer_port(member: usize) -> u16 {
    23800 + member as u16
}

struct Etcd {
    dir: PathBuf,
    members: Vec<Option<Child>>,
}

impl Etcd {
    fn start(bin: &str, run: usize) -> Etcd {
        let dir = std::env::temp_dir().join(format!("bench-etcd-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut etcd = Etcd {
            dir,
            members: Vec::new(),
        };
        for member in 0..3 {
            let child = etcd.launch(bin, member, "new");
            etcd.members.push(Some(child));
        }
        etcd
    }

    fn launch(&self, bin: &str, member: usize, state: &str) -> Child {
        let cluster: Vec<String> = (0..3)
            .map(|m| format!("m{m}=http://{IP}:{}", peer_port(m)))
            .collect();
        let log = std::fs::File::create(self.dir.join(format!("m{member}.log"))).expect("log");
        Command::new(bin)
            .args([
                "--name",
                &format!("m{member}"),
                "--data-dir",
                &self.dir.join(format!("m{member}")).display().to_string(),
                "--listen-client-urls",
                &format!("http://{IP}:{}", client_port(member)),
                "--advertise-client-urls",
                &format!("http://{IP}:{}", client_port(member)),
                "--listen-peer-urls",
                &format!("http://{IP}:{}", peer_port(member)),
                "--initial-advertise-peer-urls",
                &format!("http://{IP}:{}", peer_port(member)),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "bench",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in self.members.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One keep-alive HTTP/1.1 connection to a member's JSON gateway.
struct Http {
    member: usize,
    stream: BufReader<TcpStream>,
}

impl Http {
    async fn connect(member: usize) -> std::io::Result<Http> {
        let stream = TcpStream::connect((IP, client_port(member))).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            member,
            stream: BufReader::new(stream),
        })
    }

    /// POSTs `body` to `path`; the response body if the status is 200.
    async fn post(&mut self, path: &str, body: &str) -> std::io::Result<String> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {IP}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            client_port(self.member),
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status = String::new();
        self.stream.read_line(&mut status).await?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size).await?;
                let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            let mut chunk = vec![0; length.unwrap_or(0)];
            self.stream.read_exact(&mut chunk).await?;
            body = chunk;
        }
        if !status.contains(" 200 ") {
            return Err(std::io::Error::other(status.trim().to_string()));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// A put of a 100-byte value, as JSON for the gateway (base64 key and value).
fn put_body(key: u64) -> String {
    // 100 bytes of 'x' is "eHh4" repeated, 136 base64 characters with padding.
    let value = "eHh4".repeat(33) + "eA==";
    let key = format!("key-{key}");
    let key64 = base64(key.as_bytes());
    format!("{{\"key\":\"{key64}\",\"value\":\"{value}\"}}")
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn wait_healthy(members: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut ok = 0;
        for m in members {
            if let Ok(mut http) = Http::connect(*m).await {
                if http.post("/v3/kv/put", &put_body(0)).await.is_ok() {
                    ok += 1;
                }
            }
        }
        if ok == members.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd did not become healthy");
}

async fn closed_loop(clients: usize, seconds: u64) -> Load {
    closed_loop_with(clients, seconds, |c, until| async move {
        let mut latencies = Vec::new();
        let Ok(mut http) = Http::connect(c % 3).await else {
            return latencies;
        };
        let mut i = 0u64;
        while Instant::now() < until {
            i += 1;
            let started = Instant::now();
            if http
                .post("/v3/kv/put", &put_body(c as u64 * 1_000_000 + i))
                .await
                .is_ok()
            {
                latencies.push(started.elapsed());
            }
        }
        latencies
    })
    .await
}

/// The member that leads, from the status every member reports.
async fn leader(etcd: &Etcd) -> Option<usize> {
    for m in 0..3 {
        if etcd.members[m].is_none() {
            continue;
        }
        let Ok(mut http) = Http::connect(m).await else {
            continue;
        };
        let Ok(status) = http.post("/v3/maintenance/status", "{}").await else {
            continue;
        };
        let field = |name: &str| {
            status
                .split(&format!("\"{name}\":\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(str::to_string)
        };
        let member_id = status
            .split("\"member_id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string);
        if member_id.is_some() && member_id == field("leader") {
            return Some(m);
        }
    }
    None
}

/// kill -9 of the leader: time until a write through a survivor lands.
async fn failover(etcd: &mut Etcd, bin: &str) -> Option<Duration> {
    let leader = leader(etcd).await?;
    let survivor = (leader + 1) % 3;
    let mut http = Http::connect(survivor).await.ok()?;
    http.post("/v3/kv/put", &put_body(1)).await.ok()?;
    if let Some(mut child) = etcd.members[leader].take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let killed = Instant::now();
    let mut i = 0;
    let elapsed = loop {
        i += 1;
        match tokio::time::timeout(
            Duration::from_millis(500),
            http.post("/v3/kv/put", &put_body(2_000_000 + i)),
        )
        .await
        {
            Ok(Ok(_)) => break killed.elapsed(),
            Ok(Err(_)) | Err(_) => {
                http = Http::connect(survivor).await.ok()?;
            }
        }
        if killed.elapsed() > Duration::from_secs(60) {
            return None;
        }
    };
    etcd.members[leader] = Some(etcd.launch(bin, leader, "existing"));
    wait_healthy(&[0, 1, 2]).await;
    Some(elapsed)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("etcd comparison: run `scripts/bench-etcd.sh` (or `cargo bench --bench etcd`)");
        return;
    }
    let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    if Command::new(&bin).arg("--version").output().is_err() {
        println!("{bin} not found: scripts/bench-etcd.sh installs Debian's etcd-server");
        return;
    }
    let runs = env_u64("BENCH_RUNS", 3) as usize;
    let seconds = env_u64("BENCH_SECONDS", 5);
    let failovers = env_u64("BENCH_FAILOVERS", 5) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!("etcd benchmark ({version}): 3 members on loopback, {runs} runs, {seconds} s phases, 100-byte values, medians");
    runtime.block_on(async {
        let (mut one, mut one_p50, mut many, mut many_p99, mut downs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let mut etcd = Etcd::start(&bin, run);
            wait_healthy(&[0, 1, 2]).await;
            let load = closed_loop(1, seconds).await;
            one.push(load.throughput);
            one_p50.push(load.p50.as_secs_f64() * 1000.0);
            let load = closed_loop(64, seconds).await;
            many.push(load.throughput);
            many_p99.push(load.p99.as_secs_f64() * 1000.0);
            println!(
                "run {run}: 1 client {:.0}/s p50 {:.2} ms; 64 clients {:.0}/s p99 {:.1} ms",
                one[run], one_p50[run], many[run], many_p99[run]
            );
            let per_run = failovers.div_ceil(runs);
            for _ in 0..per_run {
                if let Some(down) = failover(&mut etcd, &bin).await {
                    println!(
                        "  leader kill -9 to writes again: {:.2} s",
                        down.as_secs_f64()
                    );
                    downs.push(down.as_secs_f64());
                }
            }
        }
        println!("| etcd {version} | result |");
        println!("| --- | --- |");
        println!(
            "| 1 client | {:.0} msg/s, p50 {:.2} ms |",
            median(one),
            median(one_p50)
        );
        println!(
            "| 64 clients | {:.0} msg/s, p99 {:.1} ms |",
            median(many),
            median(many_p99)
        );
        println!(
            "| leader kill -9 to writes again | {:.2} s |",
            median(downs)
        );
    });
}
