#!/usr/bin/env bash
# Deploys a cluster-store cluster to VMs over ssh: makes certificates for
# the given hosts, then installs the binary, the node's certificate and key,
# its settings and the systemd unit on each VM, and starts it. It can also
# add one host to a running cluster (--add) or remove a member (--remove).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/vm/deploy.sh [--port 7000] [--http] [--dry-run] ID=SSH_HOST[=ADDRESS] ...
       scripts/vm/deploy.sh --add ID=SSH_HOST[=ADDRESS] --cluster ID=HOST:PORT,...
                            [--learner] [--promote-timeout 600] [--port 7000] [--http] [--dry-run]
       scripts/vm/deploy.sh --remove ID[=SSH_HOST] --cluster ID=HOST:PORT,... [--dry-run]

Example (three continents, as the original deployment):
  scripts/vm/deploy.sh 1=ubuntu@iowa.example.org 2=ubuntu@saopaulo.example.org \
                       3=ubuntu@sydney.example.org

Each argument names a node id, the ssh destination, and optionally the
address peers use to reach it (default: the ssh host without user@).
Certificates are made once in ./certs (the CA key stays on this machine).
--http serves the dashboard on port 8000 of each VM (read-only).
--dry-run prints the commands instead of running them.

Adding a host to a running cluster (made with this script, ./certs holds
its CA):
  scripts/vm/deploy.sh --add 4=ubuntu@frankfurt.example.org \
      --cluster 1=iowa.example.org:7000,2=saopaulo.example.org:7000,3=sydney.example.org:7000
signs node 4's certificate with the CA in ./certs (unless certs/node-4.crt
exists), adds it as a learner (`node member add 4 --address ADDRESS:PORT
--learner`), installs it like the others but with NODE_JOIN=<--cluster>
instead of NODE_PEERS, starts it, then promotes it to voter once it has
caught up (`node member promote 4`, retried while refused as not caught up,
for at most --promote-timeout seconds). --learner keeps it a learner.

Removing a member:
  scripts/vm/deploy.sh --remove 4=ubuntu@frankfurt.example.org --cluster ...
runs `node member remove 4`, then prints how to stop the VM's service and
revoke the node's certificate (it does not touch the VM).

Member commands use the client certificate certs/client-client.crt.
Needs ssh and scp access with sudo on each VM, and target/release/node
built for the VMs' architecture (and for this machine, or set NODE_BIN).
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PORT=7000
HTTP=0
DRY=0
NODES=()
ADD=""
REMOVE=""
CLUSTER=""
LEARNER=0
PROMOTE_TIMEOUT=600
while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) PORT="${2:?}"; shift 2 ;;
        --http) HTTP=1; shift ;;
        --dry-run) DRY=1; shift ;;
        --add) ADD="${2:?--add needs ID=SSH_HOST[=ADDRESS]}"; shift 2 ;;
        --remove) REMOVE="${2:?--remove needs ID[=SSH_HOST]}"; shift 2 ;;
        --cluster) CLUSTER="${2:?--cluster needs ID=HOST:PORT,...}"; shift 2 ;;
        --learner) LEARNER=1; shift ;;
        --promote-timeout) PROMOTE_TIMEOUT="${2:?}"; shift 2 ;;
        --help|-h) usage; exit 0 ;;
        *=*) NODES+=("$1"); shift ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -n "$ADD" || -n "$REMOVE" ]]; then
    [[ -z "$ADD" || -z "$REMOVE" ]] || { echo "--add and --remove: one at a time" >&2; exit 2; }
    [[ ${#NODES[@]} -eq 0 ]] || { echo "--add/--remove take no other hosts (see --help)" >&2; exit 2; }
    [[ -n "$CLUSTER" ]] || { echo "--add/--remove need --cluster ID=HOST:PORT,... (the running nodes)" >&2; exit 2; }
    [[ "$PROMOTE_TIMEOUT" =~ ^[0-9]+$ ]] || { echo "--promote-timeout takes seconds" >&2; exit 2; }
else
    [[ -z "$CLUSTER" && $LEARNER -eq 0 ]] || { echo "--cluster and --learner go with --add or --remove (see --help)" >&2; exit 2; }
    [[ ${#NODES[@]} -gt 0 ]] || { usage >&2; exit 2; }
fi

do_run() { if (( DRY )); then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi; }

BIN="${NODE_BIN:-$ROOT/target/release/node}"
if [[ ! -x "$BIN" ]]; then
    if (( DRY )); then
        echo "# (no binary at $BIN yet: cargo build --release, or set NODE_BIN)"
    else
        echo "build the binary first: cargo build --release (or set NODE_BIN)" >&2
        exit 1
    fi
fi
CERTS="$ROOT/certs"
# Member commands: the running cluster, with the client certificate `client`.
member_args=(--cluster "$CLUSTER" --certs "$CERTS" --name client)

# Installs node $1 on ssh destination $2 with the settings in file $3, and
# (re)starts it.
install_node() {
    local id="$1" dest="$2" env_file="$3"
    local files=("$CERTS/ca.crt" "$CERTS/node-$id.crt" "$CERTS/node-$id.key")
    # A node that has seen a revocation list refuses to start without it.
    if [[ -f "$CERTS/ca.crl" ]]; then files+=("$CERTS/ca.crl"); fi
    do_run scp "$BIN" "$dest:/tmp/cluster-store-node"
    do_run scp "${files[@]}" "$dest:/tmp/"
    do_run scp "$env_file" "$dest:/tmp/cluster-store-node.env"
    do_run scp "$ROOT/scripts/vm/cluster-store.service" "$dest:/tmp/cluster-store.service"
    do_run ssh "$dest" "set -e
        sudo id -u cluster-store >/dev/null 2>&1 || sudo useradd --system --home-dir /var/lib/cluster-store cluster-store
        sudo install -m 0755 /tmp/cluster-store-node /usr/local/bin/node
        sudo install -d -o cluster-store -g cluster-store -m 0700 /var/lib/cluster-store /etc/cluster-store/certs
        sudo install -o cluster-store -g cluster-store -m 0644 /tmp/ca.crt /tmp/node-$id.crt /etc/cluster-store/certs/
        if [ -f /tmp/ca.crl ]; then sudo install -o cluster-store -g cluster-store -m 0644 /tmp/ca.crl /etc/cluster-store/certs/; fi
        sudo install -o cluster-store -g cluster-store -m 0600 /tmp/node-$id.key /etc/cluster-store/certs/
        sudo install -m 0644 /tmp/cluster-store-node.env /etc/cluster-store/node.env
        sudo install -m 0644 /tmp/cluster-store.service /etc/systemd/system/cluster-store.service
        rm -f /tmp/cluster-store-node /tmp/ca.crt /tmp/ca.crl /tmp/node-$id.crt /tmp/node-$id.key /tmp/cluster-store-node.env /tmp/cluster-store.service
        sudo systemctl daemon-reload
        sudo systemctl enable --now cluster-store
        sudo systemctl restart cluster-store"
}

# Writes node $1's settings to file $2; $3 and $4: NODE_PEERS or NODE_JOIN
# and its value.
write_env() {
    local id="$1" env_file="$2" key="$3" value="$4"
    {
        echo "NODE_ID=$id"
        echo "$key=$value"
        echo "NODE_LISTEN=0.0.0.0:$PORT"
        echo "NODE_DATA=/var/lib/cluster-store/data"
        echo "NODE_CERTS=/etc/cluster-store/certs"
        if (( HTTP )); then echo "NODE_HTTP=0.0.0.0:8000"; fi
    } >"$env_file"
}

if [[ -n "$REMOVE" ]]; then
    IFS='=' read -r id dest _ <<<"$REMOVE"
    [[ "$id" =~ ^[0-9]+$ ]] || { echo "bad node id in --remove $REMOVE" >&2; exit 2; }
    echo "== removing node $id from the cluster"
    do_run "$BIN" member remove "$id" "${member_args[@]}"
    echo "node $id is no longer a member (it stops taking part and says so in its log)."
    echo "Stop its service so it does not keep dialing the cluster:"
    echo "  ssh ${dest:-SSH_HOST} sudo systemctl disable --now cluster-store"
    echo "To add it back later, empty its data directory (/var/lib/cluster-store/data) and use --add (it starts with --join)."
    echo "To refuse its certificate for good: $BIN certs revoke $id --out $CERTS, then copy $CERTS/ca.crl to /etc/cluster-store/certs/ on every node."
    exit 0
fi

if [[ -n "$ADD" ]]; then
    IFS='=' read -r id dest addr <<<"$ADD"
    [[ "$id" =~ ^[0-9]+$ && -n "$dest" ]] || { echo "bad --add $ADD (ID=SSH_HOST[=ADDRESS])" >&2; exit 2; }
    addr="${addr:-${dest#*@}}"
    if [[ ! -f "$CERTS/ca.crt" ]]; then
        msg="no CA in $CERTS: --add needs the cluster's CA (the directory deploy.sh made)"
        if (( DRY )); then echo "# ($msg)"; else echo "$msg" >&2; exit 1; fi
    fi
    echo "== adding node $id on $dest ($addr:$PORT) to the cluster at $CLUSTER"
    if [[ -f "$CERTS/node-$id.crt" ]]; then
        echo "# $CERTS/node-$id.crt exists: using it"
    else
        do_run "$BIN" certs add-node "$id" --host "$id=$addr" --out "$CERTS"
    fi
    # A learner first: it catches up without counting towards any quorum.
    add=("$BIN" member add "$id" --address "$addr:$PORT" --learner "${member_args[@]}")
    if (( DRY )); then
        do_run "${add[@]}"
    elif out="$("${add[@]}" 2>&1)"; then
        echo "$out"
    else
        # A second run (the install failed the first time) goes on.
        case "$out" in
            *"is already a member"*) echo "node $id is already a member: installing it" ;;
            *) echo "$out" >&2; exit 1 ;;
        esac
    fi
    env_file="$(mktemp)"
    write_env "$id" "$env_file" NODE_JOIN "$CLUSTER"
    if (( DRY )); then echo "# $dest:/etc/cluster-store/node.env:"; sed 's/^/#   /' "$env_file"; fi
    install_node "$id" "$dest" "$env_file"
    rm -f "$env_file"
    if (( LEARNER )); then
        echo "node $id runs as a learner; make it a voter with: $BIN member promote $id --cluster $CLUSTER --certs $CERTS"
        exit 0
    fi
    promote=("$BIN" member promote "$id" "${member_args[@]}")
    if (( DRY )); then
        echo "# retried every 2 s while refused as not caught up, for at most $PROMOTE_TIMEOUT s:"
        do_run "${promote[@]}"
        exit 0
    fi
    deadline=$(( SECONDS + PROMOTE_TIMEOUT ))
    while true; do
        if out="$("${promote[@]}" 2>&1)"; then
            echo "$out"
            break
        fi
        case "$out" in
            *"is already a voter"*) echo "node $id is already a voter"; break ;;
            *"is not caught up"*|*"has not answered the leader recently"*|*"retry shortly"*)
                if (( SECONDS >= deadline )); then
                    echo "$out" >&2
                    echo "node $id did not catch up within $PROMOTE_TIMEOUT s: it stays a learner. Check it (ssh $dest journalctl -u cluster-store), then: ${promote[*]}" >&2
                    exit 1
                fi
                echo "waiting for node $id to catch up: ${out##*: }"
                sleep 2 ;;
            *) echo "$out" >&2; exit 1 ;;
        esac
    done
    exit 0
fi

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

if [[ ! -f "$CERTS/ca.crt" ]]; then
    do_run "$BIN" certs init --out "$CERTS" --nodes "$(IFS=,; echo "${ids[*]}")" "${hosts[@]}"
fi

for id in "${ids[@]}"; do
    dest="${SSH[$id]}"
    env_file="$(mktemp)"
    write_env "$id" "$env_file" NODE_PEERS "$PEERS"
    echo "== node $id on $dest (${ADDR[$id]}:$PORT)"
    if (( DRY )); then echo "# $dest:/etc/cluster-store/node.env:"; sed 's/^/#   /' "$env_file"; fi
    install_node "$id" "$dest" "$env_file"
    rm -f "$env_file"
done
echo "clients: node send \"hello\" --cluster $PEERS --certs $CERTS"
