#!/usr/bin/env bash
# Runs the cluster-store benchmark workload against etcd on this machine,
# so the ratio in BENCHMARKS.md can be checked: three etcd members on
# loopback (Debian's etcd-server), one and 64 closed-loop clients writing
# 100-byte values, and leader kill -9 to writes again.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/bench-etcd.sh [--with-cluster-store]

Installs Debian's etcd-server if `etcd` is not on PATH (needs root and
apt), then runs `cargo bench --bench etcd`. With --with-cluster-store it
also runs `cargo bench --bench cluster` afterwards, so both tables come
from the same machine in the same sitting.

Environment: BENCH_RUNS (default 3), BENCH_SECONDS (default 5),
BENCH_FAILOVERS (default 5), ETCD_BIN (default: etcd on PATH).
USAGE
}

with_cluster_store=false
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --with-cluster-store) with_cluster_store=true ;;
        *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."

if ! command -v "${ETCD_BIN:-etcd}" >/dev/null 2>&1; then
    echo "== installing Debian's etcd-server"
    if [ "$(id -u)" -ne 0 ]; then
        echo "etcd is not installed and this is not root: run 'sudo apt-get install etcd-server' first" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi

cargo bench --bench etcd
if [ "$with_cluster_store" = true ]; then
    cargo bench --bench cluster
fi
