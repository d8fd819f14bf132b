#!/usr/bin/env bash
# A whole cluster on loopback: its own redis-server on a free port, two origins (o1, o2) and two
# edges (e1, e2) that follow each stream's owner through Redis.
#
#   scripts/cluster.sh [--duration SECS] [--out DIR] [--bin PATH]
#
# Prints every node's URLs and one line to paste to publish and view, then runs until Ctrl-C
# (or SIGTERM) or --duration seconds, and stops everything it started, by pid. Uses
# target/release/chorus when built, else target/debug/chorus (built with cargo if missing), or
# --bin. Logs, ready lines and the Redis data go in --out (default target/cluster/<time>).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=0 BIN= OUT="target/cluster/$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "cluster: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "cluster: $*" >&2; }
if [ -z "$BIN" ]; then
  if [ -x target/release/chorus ]; then BIN=target/release/chorus
  else
    [ -x target/debug/chorus ] || { say "building (cargo build)"; cargo build --quiet; }
    BIN=target/debug/chorus
  fi
fi
[ -x "$BIN" ] || { say "$BIN missing"; exit 1; }
command -v redis-server >/dev/null || { say "redis-server missing (scripts/setup-test-deps.sh installs it)"; exit 1; }
mkdir -p "$OUT"

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  # Edges first, then origins, then Redis: nothing is left looking for what went before it.
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  say "stopped"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
ready_line() {
  local file=$1 pid=$2
  for _ in $(seq 1 600); do
    if [ -s "$file" ]; then head -n1 "$file"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { say "process $pid died; see $OUT/*.log"; return 1; }
    sleep 0.1
  done
  say "no ready line in $file after 60 s"; return 1
}

REDIS_PORT=$(free_port)
# Append-only file on: what is in Redis survives a restart of it.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$OUT" --appendonly yes --save "" \
  >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break
  sleep 0.1
done
REDIS="redis://127.0.0.1:$REDIS_PORT/"

export CHORUS_PUBLISH_TOKEN=${CHORUS_PUBLISH_TOKEN:-"cluster-$(date +%s%N)"}
export CHORUS_CLUSTER_TOKEN=${CHORUS_CLUSTER_TOKEN:-"link-$(date +%s%N)"}
# Every origin signs with keys from one secret: a JWT of any director is good everywhere.
export CHORUS_JWT_SECRET=${CHORUS_JWT_SECRET:-"jwt-$(date +%s%N)"}
export CHORUS_API_KEY=${CHORUS_API_KEY:-"api-$(date +%s%N)"}

declare -A READY
start() {
  local id=$1; shift
  rm -f "$OUT/$id.json"
  "$BIN" "$@" --redis "$REDIS" --node-id "$id" >"$OUT/$id.json" 2>"$OUT/$id.log" &
  local pid=$!; PIDS+=("$pid")
  READY[$id]=$(ready_line "$OUT/$id.json" "$pid")
}
for o in o1 o2; do start "$o" origin --http 127.0.0.1:0 --cluster 127.0.0.1:0 --api-key "$CHORUS_API_KEY"; done
for e in e1 e2; do start "$e" edge --http 127.0.0.1:0; done

echo "redis  $REDIS"
for id in o1 o2 e1 e2; do echo "$id     $(json "${READY[$id]}" http)"; done
O1=$(json "${READY[o1]}" http)
echo
PY=tests/python/.venv/bin/python
[ -x "$PY" ] || PY="python3  # needs aiortc: scripts/setup-test-deps.sh"
echo "publish and view (any origin's director places you):"
echo "  $PY tests/python/whip_publish.py --url $O1/whip/panel --token $CHORUS_PUBLISH_TOKEN --source-id ana --file tests/corpus/panel/ana.opus --seconds 60 &"
echo "  $PY tests/python/whep_view.py --url $(json "${READY[e1]}" http)/whep/panel --pinned ana --seconds 30"
echo "  curl -s -H 'Authorization: Bearer $CHORUS_API_KEY' $O1/api/cluster"
echo
if [ "$DURATION" != 0 ]; then
  say "running for ${DURATION}s (Ctrl-C stops sooner)"
  sleep "$DURATION" & PIDS+=($!); wait $! || true
else
  say "running; Ctrl-C stops everything"
  sleep infinity & PIDS+=($!); wait $! || true
fi
