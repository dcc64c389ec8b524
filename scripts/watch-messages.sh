#!/usr/bin/env bash
# Follows the cluster's committed messages with `node watch`, in columns.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/watch-messages.sh [--from INDEX | --last N] [--node ID] [--cluster SPEC] [--certs DIR] [--name NAME]

Prints messages as they commit, one line each (index, Lamport stamp,
sender, text), until interrupted: `node watch` over the cluster's
authenticated QUIC, resuming at another member if the node it reads
from fails. Defaults: the last 20 messages, then new ones; --cluster from
NODE_CLUSTER or the local cluster (scripts/local-cluster.sh); --certs
from NODE_CERTS or ./certs. Needs the `node` binary on PATH or
target/release/node (cargo build --release).
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CLUSTER_DIR:-$ROOT/local-cluster}"
NODE_BIN="${NODE_BIN:-$ROOT/target/release/node}"
if [[ ! -x "$NODE_BIN" ]]; then
    echo "no node binary at $NODE_BIN: run cargo build --release, or set NODE_BIN" >&2
    exit 1
fi
CLUSTER="${NODE_CLUSTER:-}"
if [[ -z "$CLUSTER" && -f "$DIR/cluster" ]]; then
    CLUSTER="$(cat "$DIR/cluster")"
fi
CERTS="${NODE_CERTS:-}"
if [[ -z "$CERTS" ]]; then
    if [[ -f "$DIR/certs/ca.crt" ]]; then CERTS="$DIR/certs"; else CERTS=certs; fi
fi
NAME=${NODE_CLIENT_NAME:-client}
START=(--last 20)
NODE=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --from) START=(--from "${2:?}"); shift 2 ;;
        --last) START=(--last "${2:?}"); shift 2 ;;
        --node) NODE=(--node "${2:?}"); shift 2 ;;
        --cluster) CLUSTER="${2:?}"; shift 2 ;;
        --certs) CERTS="${2:?}"; shift 2 ;;
        --name) NAME="${2:?}"; shift 2 ;;
        --help|-h) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$CLUSTER" ]]; then
    echo "which cluster? give --cluster 1=host:port,... (or NODE_CLUSTER), or start scripts/local-cluster.sh" >&2
    exit 2
fi

"$NODE_BIN" watch "${START[@]}" "${NODE[@]}" --cluster "$CLUSTER" --certs "$CERTS" --name "$NAME" |
    while IFS=$'\t' read -r index lamport sender text; do
        printf '%6d  L%-6d %-12s %s\n' "$index" "$lamport" "$sender" "$text"
    done
