#!/usr/bin/env bash
# Deploys a cluster-store cluster to VMs over ssh: makes certificates for
# the given hosts, then installs the binary, the node's certificate and key,
# its settings and the systemd unit on each VM, and starts it.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/vm/deploy.sh [--port 7000] [--http] [--dry-run] ID=SSH_HOST[=ADDRESS] ...

Example (three continents, as the original deployment):
  scripts/vm/deploy.sh 1=ubuntu@iowa.example.org 2=ubuntu@saopaulo.example.org \
                       3=ubuntu@sydney.example.org

Each argument names a node id, the ssh destination, and optionally the
address peers use to reach it (default: the ssh host without user@).
Certificates are made once in ./certs (the CA key stays on this machine).
--http serves the dashboard on port 8000 of each VM (read-only).
--dry-run prints the commands instead of running them.
Needs ssh and scp access with sudo on each VM, and target/release/node
built for the VMs' architecture.
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PORT=7000
HTTP=0
DRY=0
NODES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) PORT="${2:?}"; shift 2 ;;
        --http) HTTP=1; shift ;;
        --dry-run) DRY=1; shift ;;
        --help|-h) usage; exit 0 ;;
        *=*) NODES+=("$1"); shift ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ ${#NODES[@]} -gt 0 ]] || { usage >&2; exit 2; }

do_run() { if (( DRY )); then printf '+ %q ' "$@"; echo; else "$@"; fi; }

BIN="${NODE_BIN:-$ROOT/target/release/node}"
[[ -x "$BIN" ]] || { echo "build the binary first: cargo build --release (or set NODE_BIN)" >&2; exit 1; }

declare -A SSH=() ADDR=()
ids=()
hosts=()
peers=()
for spec in "${NODES[@]}"; do
    IFS='=' read -r id dest addr <<<"$spec"
    [[ "$id" =~ ^[0-9]+$ ]] || { echo "bad node id in $spec" >&2; exit 2; }
    addr="${addr:-${dest#*@}}"
    SSH[$id]="$dest"
    ADDR[$id]="$addr"
    ids+=("$id")
    hosts+=(--host "$id=$addr")
    peers+=("$id=$addr:$PORT")
done
PEERS="$(IFS=,; echo "${peers[*]}")"

if [[ ! -f "$ROOT/certs/ca.crt" ]]; then
    do_run "$BIN" certs init --out "$ROOT/certs" --nodes "$(IFS=,; echo "${ids[*]}")" "${hosts[@]}"
fi

for id in "${ids[@]}"; do
    dest="${SSH[$id]}"
    env_file="$(mktemp)"
    {
        echo "NODE_ID=$id"
        echo "NODE_PEERS=$PEERS"
        echo "NODE_LISTEN=0.0.0.0:$PORT"
        echo "NODE_DATA=/var/lib/cluster-store/data"
        echo "NODE_CERTS=/etc/cluster-store/certs"
        if (( HTTP )); then echo "NODE_HTTP=0.0.0.0:8000"; fi
    } >"$env_file"
    echo "== node $id on $dest (${ADDR[$id]}:$PORT)"
    do_run scp "$BIN" "$dest:/tmp/cluster-store-node"
    do_run scp "$ROOT/certs/ca.crt" "$ROOT/certs/node-$id.crt" "$ROOT/certs/node-$id.key" "$dest:/tmp/"
    do_run scp "$env_file" "$dest:/tmp/cluster-store-node.env"
    do_run scp "$ROOT/scripts/vm/cluster-store.service" "$dest:/tmp/cluster-store.service"
    do_run ssh "$dest" "set -e
        sudo id -u cluster-store >/dev/null 2>&1 || sudo useradd --system --home-dir /var/lib/cluster-store cluster-store
        sudo install -m 0755 /tmp/cluster-store-node /usr/local/bin/node
        sudo install -d -o cluster-store -g cluster-store -m 0700 /var/lib/cluster-store /etc/cluster-store/certs
        sudo install -o cluster-store -g cluster-store -m 0644 /tmp/ca.crt /tmp/node-$id.crt /etc/cluster-store/certs/
        sudo install -o cluster-store -g cluster-store -m 0600 /tmp/node-$id.key /etc/cluster-store/certs/
        sudo install -m 0644 /tmp/cluster-store-node.env /etc/cluster-store/node.env
        sudo install -m 0644 /tmp/cluster-store.service /etc/systemd/system/cluster-store.service
        rm -f /tmp/cluster-store-node /tmp/ca.crt /tmp/node-$id.crt /tmp/node-$id.key /tmp/cluster-store-node.env /tmp/cluster-store.service
        sudo systemctl daemon-reload
        sudo systemctl enable --now cluster-store
        sudo systemctl restart cluster-store"
    rm -f "$env_file"
done
echo "clients: node send \"hello\" --cluster $PEERS --certs $ROOT/certs"
