#!/usr/bin/env bash
# One sitting of the comparison table in BENCHMARKS.md: cluster-store,
# then etcd (Debian's etcd-server), then NATS JetStream (Debian's
# nats-server), each with the same closed-loop workload on this machine:
# 3 nodes on loopback, 100-byte messages, 1 and 64 clients that each
# wait for every acknowledgement.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/bench-peers.sh [--log FILE]

Installs Debian's etcd-server and nats-server if `etcd` or `nats-server`
is not on PATH (needs root and apt), then runs, in this order and in one
sitting:

  cargo bench --bench cluster
  cargo bench --bench etcd
  cargo bench --bench nats

and writes everything they print, with the load average before each, to
FILE as well (default: target/bench-peers-<date>.log). Last, it prints
issue 16's targets beside what the sitting measured
(scripts/bench-targets.py FILE, which reads any such log).

Environment, passed to the benches: BENCH_RUNS (default 3), BENCH_SECONDS
(default 5), BENCH_FAILOVERS (etcd, default 5), BENCH_CATCHUP,
BENCH_KILLS and BENCH_TOPOLOGY (cluster), ETCD_BIN (default: etcd on
PATH), NATS_BIN (default: nats-server on PATH).
USAGE
}

cd "$(dirname "$0")/.."

log="target/bench-peers-$(date +%Y%m%d-%H%M%S).log"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --log)
            [ $# -ge 2 ] || { echo "--log needs a file" >&2; exit 2; }
            log="$2"
            shift 2
            ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

missing=()
command -v "${ETCD_BIN:-etcd}" >/dev/null 2>&1 || missing+=(etcd-server)
command -v "${NATS_BIN:-nats-server}" >/dev/null 2>&1 || missing+=(nats-server)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "${missing[*]} not installed and this is not root: run 'sudo apt-get install ${missing[*]}' first" >&2
        exit 1
    fi
    echo "== installing Debian's ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$(dirname "$log")"
: >"$log"
echo "== writing to $log"

note() {
    echo "== $*" | tee -a "$log"
}

note "$(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
note "$("${ETCD_BIN:-etcd}" --version 2>/dev/null | head -n 1); nats-server $("${NATS_BIN:-nats-server}" --version 2>/dev/null | sed 's/^nats-server: //')"
for bench in cluster etcd nats; do
    note "cargo bench --bench $bench; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    cargo bench --bench "$bench" 2>&1 | tee -a "$log"
done
python3 scripts/bench-targets.py "$log" 2>&1 | tee -a "$log" || true
note "done; load average: $(cut -d' ' -f1-3 /proc/loadavg); output in $log"
