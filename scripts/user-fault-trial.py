#!/usr/bin/env python3
"""User-fault trial, outside the test harness: dashboards' /events open on
every node, two pipelined `node send -` writers, HTTP writes through every
node (followers too) across two leader kill -9s, 1 MiB messages via
`node send -` and a follower's HTTP, one byte over the limit both ways,
operator commands mid-run (status, member list, a follower's disk lost and
`node rebuild`), then checks: every acknowledged message exported once,
each writer's order kept, index and Lamport strictly increasing, every
node's backup equal to the export. Prints "no problems" or what broke.

Usage: cargo build --release --bin node && python3 scripts/user-fault-trial.py
Environment: NODE (the binary), LINES (lines per pipelined writer,
default 200000). Uses ports 7101-7103 and 8101-8103 on 127.0.0.1 and
/tmp/trial-cluster (scripts/local-cluster.sh start --http)."""
import json, os, signal, subprocess, sys, threading, time, urllib.request, shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = os.environ.get("NODE", f"{ROOT}/target/release/node")
DIR = "/tmp/trial-cluster"
LINES = int(os.environ.get("LINES", "200000"))
MIB = 1 << 20
log = lambda *a: print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)

shutil.rmtree(DIR, ignore_errors=True)
env = dict(os.environ, CLUSTER_DIR=DIR, NODE_BIN=NODE)
subprocess.run([f"{ROOT}/scripts/local-cluster.sh", "start", "--http"], env=env, check=True)
CLUSTER = open(f"{DIR}/cluster").read().strip()
CERTS = f"{DIR}/certs"
common = ["--cluster", CLUSTER, "--certs", CERTS]
pids = {i: int(open(f"{DIR}/node-{i}.pid").read()) for i in (1, 2, 3)}
problems = []


def http(port, path, body=None, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:
        return None, str(e).encode()


def leader():
    for _ in range(200):
        for i in (1, 2, 3):
            s, b = http(8100 + i, "/leader", timeout=2)
            if s == 200:
                try:
                    l = json.loads(b).get("leader")
                except Exception:
                    l = None
                if l:
                    return int(l)
        time.sleep(0.1)
    raise SystemExit("no leader")


def start_node(i):
    args = [NODE, "--id", str(i), "--peers", CLUSTER, "--data", f"{DIR}/data/node-{i}",
            "--certs", CERTS, "--http", f"127.0.0.1:{8100+i}", "--http-write"]
    p = subprocess.Popen(args, stdout=open(f"{DIR}/node-{i}.log", "a"), stderr=subprocess.STDOUT)
    pids[i] = p.pid
    open(f"{DIR}/node-{i}.pid", "w").write(str(p.pid))


log("leader", leader())

# Dashboards: /events on every node, several each, counting commit events.
events = {i: 0 for i in (1, 2, 3)}
stop = threading.Event()


def watch_events(i):
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{8100+i}/events", timeout=10) as r:
                for line in r:
                    if stop.is_set():
                        return
                    if line.startswith(b"event: commit"):
                        events[i] += 1
        except Exception:
            time.sleep(0.3)


for i in (1, 2, 3):
    for _ in range(2):
        threading.Thread(target=watch_events, args=(i,), daemon=True).start()

# Pipelined writers.
def feeder(prefix, n, proc):
    try:
        for k in range(n):
            proc.stdin.write(f"{prefix}-{k}\n".encode())
        proc.stdin.close()
    except BrokenPipeError:
        problems.append(f"{prefix}: pipe broke")

pipes = {}
for prefix, name in (("a", "alice"), ("b", "bob")):
    p = subprocess.Popen([NODE, "send", "-", "--name", name] + common, stdin=subprocess.PIPE,
                         stdout=open(f"/tmp/trial-{prefix}.out", "w"), stderr=open(f"/tmp/trial-{prefix}.err", "w"))
    threading.Thread(target=feeder, args=(prefix, LINES, p), daemon=True).start()
    pipes[prefix] = p

# HTTP writers through every node.
acked = {i: [] for i in (1, 2, 3)}
http_fail = {i: [] for i in (1, 2, 3)}
lat = []


def http_writer(i):
    k = 0
    while not stop.is_set():
        text = f"h{i}-{k}"
        t0 = time.time()
        s, b = http(8100 + i, "/messages", {"message": text})
        lat.append((time.time() - t0, i, time.strftime('%H:%M:%S', time.localtime(t0)), s))
        if s == 200:
            acked[i].append(text)
        else:
            http_fail[i].append((text, s, b[:200]))
            time.sleep(0.05)
        k += 1


for i in (1, 2, 3):
    threading.Thread(target=http_writer, args=(i,), daemon=True).start()

time.sleep(3)
# Large messages: 1 MiB through `node send -` and through a follower's HTTP.
big_texts = []
L = leader()
fol = [i for i in (1, 2, 3) if i != L][0]
for n, ch in enumerate("XY"):
    t = ch * MIB
    r = subprocess.run([NODE, "send", "-", "--name", "carol"] + common, input=(t + "\n").encode(), capture_output=True)
    log("1 MiB via send -:", r.returncode, r.stdout[:120], r.stderr[:200])
    if r.returncode == 0:
        big_texts.append(t)
    else:
        problems.append(f"1 MiB send failed: {r.stderr[:300]}")
t = "Z" * MIB
s, b = http(8100 + fol, "/messages", {"message": t}, timeout=60)
log(f"1 MiB via follower {fol} HTTP:", s, b[:200])
if s == 200:
    big_texts.append(t)
else:
    problems.append(f"1 MiB HTTP failed: {s} {b[:300]}")
r = subprocess.run([NODE, "send", "-", "--name", "carol"] + common, input=("W" * (MIB + 1) + "\n").encode(), capture_output=True)
log("over-limit via send -:", r.returncode, r.stderr[:300])
if r.returncode == 0:
    problems.append("over-limit send accepted")
s, b = http(8100 + fol, "/messages", {"message": "V" * (MIB + 1)}, timeout=60)
log("over-limit via HTTP:", s, b[:300])
if s != 413:
    problems.append(f"over-limit HTTP answered {s}")

# Two leader kills, with restarts.
kill_times = []
for round_ in range(2):
    time.sleep(4)
    L = leader()
    log(f"kill -9 leader {L} (pid {pids[L]})")
    before = {i: len(acked[i]) for i in (1, 2, 3)}
    t0 = time.time()
    os.kill(pids[L], signal.SIGKILL)
    # time to the next HTTP ack through a surviving node
    others = [i for i in (1, 2, 3) if i != L]
    while all(len(acked[i]) == before[i] for i in others) and time.time() - t0 < 20:
        time.sleep(0.005)
    kill_times.append(time.time() - t0)
    log(f"writes through a survivor again after {kill_times[-1]:.3f} s; new leader {leader()}")
    time.sleep(2)
    start_node(L)
    log(f"restarted {L}")

# Operator commands mid-run.
for cmd in (["status"], ["member", "list"]):
    r = subprocess.run([NODE] + cmd + common, capture_output=True, timeout=60)
    log(" ".join(cmd), "->", r.returncode, r.stdout.decode()[:600], r.stderr.decode()[:300])
    if r.returncode != 0:
        problems.append(f"{cmd} failed")
time.sleep(2)
L = leader()
F = [i for i in (1, 2, 3) if i != L][0]
log(f"stopping follower {F} and rebuilding it")
os.kill(pids[F], signal.SIGKILL)
time.sleep(0.5)
shutil.rmtree(f"{DIR}/data/node-{F}")
r = subprocess.run([NODE, "rebuild", "--id", str(F), "--data", f"{DIR}/data/node-{F}"] + common, capture_output=True, timeout=120)
log("rebuild ->", r.returncode, r.stdout.decode()[:500], r.stderr.decode()[:500])
if r.returncode != 0:
    problems.append("rebuild failed")
start_node(F)

for prefix, p in pipes.items():
    try:
        p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        problems.append(f"pipeline {prefix} did not finish")
        p.kill()
    log(f"pipeline {prefix} exit {p.returncode}; err: {open(f'/tmp/trial-{prefix}.err').read()[-400:]}")
    if p.returncode != 0:
        problems.append(f"pipeline {prefix} exit {p.returncode}")
time.sleep(2)
stop.set()
time.sleep(1)

# Export and check.
r = subprocess.run([NODE, "export"] + common, capture_output=True, timeout=600)
if r.returncode != 0:
    problems.append(f"export failed {r.stderr[:300]}")
rows = r.stdout.decode().split("\n")
rows = [x for x in rows if x]
log("export rows", len(rows))
seen = {}
last_idx = last_lam = 0
by_prefix = {}
for row in rows:
    idx, lam, sender, text = row.split("\t", 3)
    idx, lam = int(idx), int(lam)
    if idx <= last_idx:
        problems.append(f"index not increasing at {idx}")
    if lam <= last_lam:
        problems.append(f"lamport not increasing at {idx}: {lam} after {last_lam}")
    last_idx, last_lam = idx, lam
    if text in seen:
        problems.append(f"duplicate {text[:40]} at {idx} and {seen[text]}")
    seen[text] = idx
    if "-" in text[:8]:
        pre, k = text.split("-", 1)
        if k.isdigit():
            by_prefix.setdefault(pre, []).append(int(k))
for pre in ("a", "b"):
    ks = by_prefix.get(pre, [])
    if ks != list(range(LINES)):
        missing = set(range(LINES)) - set(ks)
        problems.append(f"pipeline {pre}: {len(ks)} rows, {len(missing)} missing, ordered={ks == sorted(ks)}")
for i in (1, 2, 3):
    miss = [t for t in acked[i] if t not in seen]
    if miss:
        problems.append(f"HTTP via {i}: {len(miss)} acknowledged but missing, e.g. {miss[:3]}")
    ks = by_prefix.get(f"h{i}", [])
    if ks != sorted(ks):
        problems.append(f"HTTP via {i} out of order")
for t in big_texts:
    if t not in seen:
        problems.append("a 1 MiB message is missing")
time.sleep(3)
shutil.rmtree("/tmp/trial-backups", ignore_errors=True)
r = subprocess.run([NODE, "export", "--backup-dir", "/tmp/trial-backups"] + common, capture_output=True, timeout=600)
log("backups ->", r.returncode, r.stdout[:300], r.stderr[:300])
for i in (1, 2, 3):
    try:
        b = [x for x in open(f"/tmp/trial-backups/backup_{i}.txt").read().split("\n") if x]
    except Exception as e:
        problems.append(f"backup {i}: {e}"); continue
    log(f"backup {i}: {len(b)} rows, first {b[0][:60]!r}")
    if b != rows[:len(b)] or len(b) < len(rows) - 10:
        problems.append(f"backup {i} differs from export: {len(b)} rows vs {len(rows)}")
lat.sort(key=lambda x: x[0])  # statuses may be None (a killed node)
log("HTTP acks", {i: len(acked[i]) for i in (1, 2, 3)}, "fails", {i: len(http_fail[i]) for i in (1, 2, 3)})
for i in (1, 2, 3):
    if http_fail[i]:
        log(f"  fails via {i}, first:", http_fail[i][:3])
log("HTTP latency p50 %.4f p99 %.4f max %.3f" % (lat[len(lat)//2][0], lat[int(len(lat)*.99)][0], lat[-1][0]))
log("slowest HTTP writes", lat[-8:])
log("events seen per node", events)
log("kill -> writes again", [round(k, 3) for k in kill_times])
subprocess.run([f"{ROOT}/scripts/local-cluster.sh", "stop"], env=env)
log("PROBLEMS:\n  " + "\n  ".join(problems[:30]) if problems else "no problems")
