#!/usr/bin/env bash
# Sends numbered, timestamped test messages to a cluster.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/send-messages.sh [--count N] [--name CLIENT] [--cluster SPEC] [--certs DIR]

Sends N (default 10) messages "<time> <client> message <i>" one by one and
prints where each landed. --cluster defaults to $NODE_CLUSTER or the
cluster started by scripts/local-cluster.sh.
Environment: NODE_BIN (default target/release/node).
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COUNT=10
NAME=alice
CLUSTER="${NODE_CLUSTER:-}"
CERTS="${NODE_CERTS:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --count) COUNT="${2:?}"; shift 2 ;;
        --name) NAME="${2:?}"; shift 2 ;;
        --cluster) CLUSTER="${2:?}"; shift 2 ;;
        --certs) CERTS="${2:?}"; shift 2 ;;
        --help|-h) usage; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$CLUSTER" && -f "$ROOT/local-cluster/cluster" ]]; then
    CLUSTER="$(cat "$ROOT/local-cluster/cluster")"
    CERTS="${CERTS:-$ROOT/local-cluster/certs}"
fi
[[ -n "$CLUSTER" ]] || { echo "no cluster: give --cluster or start one with scripts/local-cluster.sh" >&2; exit 2; }
NODE="${NODE_BIN:-$ROOT/target/release/node}"

for i in $(seq 1 "$COUNT"); do
    "$NODE" send --cluster "$CLUSTER" --certs "${CERTS:-certs}" --name "$NAME" "$(date +%H:%M:%S.%3N) $NAME message $i"
done
