#!/usr/bin/env bash
# Starts or stops a local cluster of `node` processes without Docker.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/local-cluster.sh start [--nodes N] [--learners M] [--http]
       scripts/local-cluster.sh stop
       scripts/local-cluster.sh status

start   builds node (release), makes certificates on first start and runs N
        voting nodes (default 3) and M learners (default 0) on 127.0.0.1,
        ports 7101.., dashboards on 8101.. with --http (writes enabled).
stop    stops every node started here (their data stays in ./local-cluster).
status  prints every node's role, term, commit index and lag.

Environment: CLUSTER_DIR (default ./local-cluster), NODE_BIN (skip the build).
The cluster spec for clients is written to $CLUSTER_DIR/cluster.
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CLUSTER_DIR:-$ROOT/local-cluster}"
ACTION="${1:-}"
[[ -n "$ACTION" ]] && shift

node_bin() {
    if [[ -n "${NODE_BIN:-}" ]]; then
        echo "$NODE_BIN"
    else
        (cd "$ROOT" && cargo build --release --quiet --bin node)
        echo "$ROOT/target/release/node"
    fi
}

case "$ACTION" in
    start)
        VOTERS=3
        LEARNERS=0
        HTTP=0
        while [[ $# -gt 0 ]]; do
            case "$1" in
                --nodes) VOTERS="${2:?--nodes needs a number}"; shift 2 ;;
                --learners) LEARNERS="${2:?--learners needs a number}"; shift 2 ;;
                --http) HTTP=1; shift ;;
                *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
            esac
        done
        NODE="$(node_bin)"
        mkdir -p "$DIR"
        total=$((VOTERS + LEARNERS))
        peers=()
        learners=()
        for id in $(seq 1 "$total"); do
            if (( id <= VOTERS )); then peers+=("$id=127.0.0.1:$((7100 + id))"); else learners+=("$id=127.0.0.1:$((7100 + id))"); fi
        done
        PEERS="$(IFS=,; echo "${peers[*]}")"
        LEARNER_SPEC="$(IFS=,; echo "${learners[*]}")"
        if [[ ! -f "$DIR/certs/ca.crt" ]]; then
            "$NODE" certs init --out "$DIR/certs" --nodes "$(seq -s, 1 "$total")" --clients alice,bob,carol >/dev/null
        fi
        for id in $(seq 1 "$total"); do
            args=(--id "$id" --peers "$PEERS" --data "$DIR/data/node-$id" --certs "$DIR/certs")
            [[ -n "$LEARNER_SPEC" ]] && args+=(--learner "$LEARNER_SPEC")
            (( HTTP )) && args+=(--http "127.0.0.1:$((8100 + id))" --http-write)
            "$NODE" "${args[@]}" >>"$DIR/node-$id.log" 2>&1 &
            echo $! >"$DIR/node-$id.pid"
            echo "node $id: pid $!, log $DIR/node-$id.log"
        done
        CLUSTER="$PEERS${LEARNER_SPEC:+,$LEARNER_SPEC}"
        echo "$CLUSTER" >"$DIR/cluster"
        echo "clients: node send \"hello\" --cluster $CLUSTER --certs $DIR/certs"
        ;;
    stop)
        shopt -s nullglob
        for pidfile in "$DIR"/node-*.pid; do
            pid="$(cat "$pidfile")"
            if kill "$pid" 2>/dev/null; then echo "stopped pid $pid"; fi
            rm -f "$pidfile"
        done
        ;;
    status)
        NODE="$(node_bin)"
        "$NODE" status --cluster "$(cat "$DIR/cluster")" --certs "$DIR/certs"
        ;;
    --help|-h|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
