#!/usr/bin/env bash
# Follows one node's newest messages over its HTTP API (started with --http).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/watch-messages.sh [HOST:PORT] [--interval SECONDS]

Prints the messages a node commits as they arrive, polling
GET /messages on its HTTP address (default 127.0.0.1:8101).
Needs curl and python3.
USAGE
}

ADDR=127.0.0.1:8101
INTERVAL=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --interval) INTERVAL="${2:?}"; shift 2 ;;
        --help|-h) usage; exit 0 ;;
        *) ADDR="$1"; shift ;;
    esac
done

next=1
while true; do
    page="$(curl -fsS "http://$ADDR/messages?from=$next&limit=1000")" || { echo "node at $ADDR unreachable" >&2; sleep "$INTERVAL"; continue; }
    next="$(printf '%s' "$page" | python3 -c '
import json, sys
page = json.load(sys.stdin)
for m in page["messages"]:
    print("%6d  L%-6d %-12s %s" % (m["index"], m["lamport"], m["sender"], m["text"]), file=sys.stderr)
print(page["next"])
')"
    sleep "$INTERVAL"
done
