#!/usr/bin/env bash
# The whole product on one machine: builds `node`, makes fresh certificates,
# starts three voting nodes and two learner ("store") nodes, lets five
# clients write timestamped messages, kills the leader with kill -9 on the
# way and restarts it, then writes shared_data/output.txt and one
# shared_data/backup_<id>.txt per node.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/demo.sh [--messages N] [--help]

Runs a local five-node cluster-store cluster (three voters, two learners),
five clients writing messages, a leader crash and restart, and leaves the
committed log in shared_data/output.txt and each node's replica in
shared_data/backup_<id>.txt.

Options:
  --messages N   messages per client (default 20)
  --help         show this help

Environment:
  NODE_BIN       use this node binary instead of building one
  DEMO_DIR       working directory for certificates, data and logs (default ./demo)
  SHARED_DATA    where output.txt and the backups go (default ./shared_data)
  DEMO_HOST      loopback address to use (default 127.0.0.1)
  DEMO_PORT      first port; nodes use DEMO_PORT+1 .. DEMO_PORT+5 (default 7100)
USAGE
}

MESSAGES=20
while [[ $# -gt 0 ]]; do
    case "$1" in
        --messages) MESSAGES="${2:?--messages needs a number}"; shift 2 ;;
        --help|-h) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${DEMO_DIR:-$ROOT/demo}"
OUT="${SHARED_DATA:-$ROOT/shared_data}"
HOST="${DEMO_HOST:-127.0.0.1}"
PORT="${DEMO_PORT:-7100}"

say() { printf '\n==> %s\n' "$*"; }

if [[ -n "${NODE_BIN:-}" ]]; then
    NODE="$NODE_BIN"
else
    say "Building the node binary (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet --bin node)
    NODE="$ROOT/target/release/node"
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
rm -f "$OUT"/output.txt "$OUT"/backup_*.txt

VOTERS=(1 2 3)
LEARNERS=(4 5)
CLIENTS=(alice bob carol dave erin)
spec() { local out=() id; for id in "$@"; do out+=("$id=$HOST:$((PORT + id))"); done; local IFS=,; echo "${out[*]}"; }
PEERS="$(spec "${VOTERS[@]}")"
LEARNER_SPEC="$(spec "${LEARNERS[@]}")"
CLUSTER="$(spec "${VOTERS[@]}" "${LEARNERS[@]}")"

say "Making a fresh cluster CA and certificates for nodes 1-5 and clients ${CLIENTS[*]}"
CLIENT_LIST="$(IFS=,; echo "${CLIENTS[*]}")"
"$NODE" certs init --out "$WORK/certs" --nodes 1,2,3,4,5 --clients "$CLIENT_LIST" >/dev/null

declare -A PIDS=()
start_node() {
    local id="$1"
    "$NODE" --id "$id" --peers "$PEERS" --learner "$LEARNER_SPEC" \
        --data "$WORK/data/node-$id" --certs "$WORK/certs" >>"$WORK/node-$id.log" 2>&1 &
    PIDS[$id]=$!
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

client() { "$NODE" "$@" --cluster "$CLUSTER" --certs "$WORK/certs"; }

# Prints the leader's id once the cluster agrees on one.
wait_for_leader() {
    local leader
    for _ in $(seq 1 100); do
        leader="$(client status --json 2>/dev/null | grep -o '"leader":[0-9]*' | head -n 1 | cut -d: -f2 || true)"
        if [[ -n "$leader" ]]; then echo "$leader"; return 0; fi
        sleep 0.2
    done
    echo "no leader was elected; see $WORK/node-*.log" >&2
    return 1
}

say "Starting voters ${VOTERS[*]} and learners ${LEARNERS[*]} on $HOST:$((PORT + 1))-$((PORT + 5))"
for id in "${VOTERS[@]}" "${LEARNERS[@]}"; do start_node "$id"; done
LEADER="$(wait_for_leader)"
TERM_NOW="$(client status | sed -n "s/^node $LEADER: Leader, term \([0-9]*\).*/\1/p")"
echo "    Node $LEADER won the election and leads term ${TERM_NOW:-?}."

say "Five clients send $MESSAGES timestamped messages each"
CLIENT_PIDS=()
for name in "${CLIENTS[@]}"; do
    (
        for i in $(seq 1 "$MESSAGES"); do
            client send --name "$name" "$(date +%H:%M:%S.%3N) message $i from $name" >>"$WORK/client-$name.log"
            sleep 0.05
        done
    ) &
    CLIENT_PIDS+=($!)
done

sleep 1
say "Crash: kill -9 of the leader, node $LEADER, while the clients write"
kill -9 "${PIDS[$LEADER]}"
wait "${PIDS[$LEADER]}" 2>/dev/null || true
unset "PIDS[$LEADER]"
sleep 1
NEW_LEADER="$(wait_for_leader)"
echo "    Node $NEW_LEADER took over; clients retry their pending message with the same sequence number, so nothing is written twice."

say "Restarting node $LEADER: it recovers its log from disk and catches up from node $NEW_LEADER"
start_node "$LEADER"

for pid in "${CLIENT_PIDS[@]}"; do wait "$pid"; done
echo "    All $(( ${#CLIENTS[@]} * MESSAGES )) messages acknowledged."

# Wait until every node has committed everything.
for _ in $(seq 1 100); do
    commits="$(client status --json | grep -o '"commit":[0-9]*' | cut -d: -f2 | sort -u | wc -l)"
    nodes="$(client status --json | grep -o '"commit":[0-9]*' | wc -l)"
    if [[ "$commits" == 1 && "$nodes" == 5 ]]; then break; fi
    sleep 0.2
done

say "Writing the committed log to $OUT/output.txt and each node's replica to $OUT/backup_<id>.txt"
client export >"$OUT/output.txt"
client export --backup-dir "$OUT" 2>/dev/null

echo "    output.txt: $(wc -l <"$OUT/output.txt") messages (index, Lamport stamp, sender, text):"
head -n 5 "$OUT/output.txt" | sed 's/^/      /'
echo "      ..."
for id in "${VOTERS[@]}" "${LEARNERS[@]}"; do
    if cmp -s "$OUT/output.txt" "$OUT/backup_$id.txt"; then
        echo "    backup_$id.txt: identical to output.txt"
    else
        echo "    backup_$id.txt: DIFFERS from output.txt" >&2
        exit 1
    fi
done
client status
say "Done. Logs are in $WORK; the nodes stop now."
