#!/usr/bin/env python3
"""CPU time per message of the 64-client closed loop, by process.

Runs one benchmark (the cluster-store bench binary with BENCH_ONLY, or the
NATS bench), reads utime+stime of the bench process (the clients) and of
every server process from /proc over a window in the middle of the load
phase, and prints the throughput and microseconds of CPU per message for
each side. CPU per message is steadier than throughput on a shared,
noisy machine: it does not depend on how long the disk took to sync.

usage: scripts/cpu-per-message.py cluster BENCH_BINARY NODE_BINARY [tcp|quic] [many|one]
       scripts/cpu-per-message.py nats BENCH_BINARY

Build the binaries with `cargo bench --bench cluster --bench nats --no-run`
(the bench binaries are target/release/deps/cluster-* and nats-*; the node
binary target/release/node). It reports; it asserts nothing.
"""
import os
import re
import subprocess
import sys
import time

WINDOW_S = 3.0
PHASE_S = 6


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pids_of(pattern):
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def main(argv):
    if len(argv) < 3 or argv[1] not in ("cluster", "nats"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, bench = argv[1], os.path.abspath(argv[2])
    env = dict(os.environ, BENCH_TOPOLOGY="loopback", BENCH_RUNS="1", BENCH_SECONDS=str(PHASE_S))
    if kind == "cluster":
        if len(argv) < 4:
            print(__doc__, file=sys.stderr)
            return 2
        node = os.path.abspath(argv[3])
        transport = argv[4] if len(argv) > 4 else "tcp"
        phase = argv[5] if len(argv) > 5 else "many"
        env.update(
            CLUSTER_STORE_NODE_BIN=node,
            CLUSTER_STORE_CLIENT_TRANSPORT=transport,
            BENCH_ONLY=phase,
        )
        servers_pattern, label = node, f"cluster-store over {transport}, {phase}"
        # The cluster starts, elects and rests a second before the phase.
        settle = 2.5
        rate_pattern = r"64 clients: (\d+)/s" if phase == "many" else r"1 clients: (\d+)/s"
    else:
        servers_pattern, label = "nats-server", "NATS JetStream, many"
        # Its 1-client phase comes first.
        settle = 2.5 + PHASE_S + 1.0
        rate_pattern = r"64 clients (\d+)/s"
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    run = subprocess.Popen(
        [bench, "--bench"], env=env, cwd=repo, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 60
    while not pids_of(servers_pattern):
        if time.time() > deadline or run.poll() is not None:
            print(f"no server process matching {servers_pattern} appeared", file=sys.stderr)
            run.kill()
            return 1
        time.sleep(0.1)
    time.sleep(settle)
    servers = pids_of(servers_pattern)
    before = {pid: cpu_seconds(pid) for pid in servers + [run.pid]}
    started = time.time()
    time.sleep(WINDOW_S)
    after = {pid: cpu_seconds(pid) for pid in before}
    window = time.time() - started
    output = run.communicate()[0]
    found = re.search(rate_pattern, output)
    if not found:
        print(f"no throughput in the bench's output:\n{output}", file=sys.stderr)
        return 1
    rate = float(found.group(1))
    messages = rate * window
    server_cpu = sum(after[pid] - before[pid] for pid in servers)
    client_cpu = after[run.pid] - before[run.pid]
    print(
        f"{label}: {rate:.0f} msg/s; servers {server_cpu / window * 100:.0f}% of a core, "
        f"{server_cpu / messages * 1e6:.1f} us/msg; clients {client_cpu / window * 100:.0f}%, "
        f"{client_cpu / messages * 1e6:.1f} us/msg; both {(server_cpu + client_cpu) / messages * 1e6:.1f} us/msg"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
