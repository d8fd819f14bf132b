#!/usr/bin/env bash
# The bundled load test: how many viewers one edge core serves.
#
#   scripts/loadtest.sh [--start N] [--step N] [--max-viewers N] [--step-secs S]
#                       [--duration S] [--tracks N] [--out DIR] [--no-build] [--bin PATH]
#                       [--media-workers N] [--edge-cpus LIST] [--loadgen-arg ARG]...
#                       [--cluster [--edge-capacity N]] [--peer janus [--janus-event-loops N]]
#
# Starts `chorus origin` and `chorus edge` (the edge pinned alone on core 0 with taskset, the
# origin and the load generator on the other core), ramps viewers with `chorus loadgen` in steps
# until --max-viewers or --duration (a hard stop: everything ends by itself), then runs the floor
# benchmark (SRTP AES-GCM sealing plus sendmmsg of as many packets as the edge forwarded, with no
# chorus logic) on the edge's core, and writes in --out:
#   steps.jsonl   one JSON line per step from loadgen (packets, loss, latency, joins, edge CPU)
#   floor.json    the floor benchmark
#   report.md     the table, the capacity point and chorus's cost as a ratio of the floor
#   report.png    CPU per viewer, loss and latency percentiles versus viewers
# Logs of every process are kept there too. Loopback only. --bin runs another build (the tests
# use the debug binary). --media-workers and --edge-cpus (a taskset list, default the first core)
# compare edge media threads; the load generator always stays on the last core. --loadgen-arg
# passes one more argument to `chorus loadgen` (e.g. --loadgen-arg=--poll-ms=100).
# --cluster runs a cluster instead: its own redis-server, the origin and two edges (e1, e2, both
# on the edge cores) with --redis, the edges following the stream's owner; the load generator's
# viewers ask the origin's director, which places them over the two edges. edges.jsonl then holds
# per-edge samples every step (viewers, packets out and drops per second, CPU %), and report.md a
# per-edge table; the steps' edge CPU is e1's. Each edge gets --capacity of 60 % of --max-viewers
# (--edge-capacity N to change it): the director keeps viewers of one stream together on an edge
# until 80 % of its capacity, so without one every viewer would land on the first edge.
# --peer janus then runs the same ramp (viewers, tracks, corpus, pacing) against Janus on the
# edge's core: `chorus loadgen janus-config` writes a minimal Janus configuration (streaming
# plugin, one mountpoint of --tracks Opus streams, the WebSocket transport) into a temporary
# directory (copied to janus-config/), Janus runs from it (`janus -F DIR -C DIR/janus.jcfg`),
# the speakers go to its RTP ports as plain RTP and janus-steps.jsonl gets its steps; report.md
# gains a side-by-side table. --janus-event-loops (default 1, like the edge's one media thread;
# 0 is Janus's default of a thread per viewer) sets Janus's media threads.
set -euo pipefail
cd "$(dirname "$0")/.."

START=500 STEP=500 MAX=3000 STEP_SECS=8 DURATION=420 TRACKS=3 BUILD=1 BIN=target/release/chorus
WORKERS=1 EDGE_CPUS= LOADGEN_ARGS=() CLUSTER=0 EDGE_CAPACITY= PEER= JANUS_LOOPS=1 JDIR=
OUT="target/loadtest/$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --start) START=$2; shift 2 ;;
    --step) STEP=$2; shift 2 ;;
    --max-viewers) MAX=$2; shift 2 ;;
    --step-secs) STEP_SECS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --tracks) TRACKS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    --media-workers) WORKERS=$2; shift 2 ;;
    --edge-cpus) EDGE_CPUS=$2; shift 2 ;;
    --loadgen-arg) LOADGEN_ARGS+=("$2"); shift 2 ;;
    --loadgen-arg=*) LOADGEN_ARGS+=("${1#--loadgen-arg=}"); shift ;;
    --cluster) CLUSTER=1; shift ;;
    --edge-capacity) EDGE_CAPACITY=$2; shift 2 ;;
    --peer) PEER=$2; shift 2 ;;
    --janus-event-loops) JANUS_LOOPS=$2; shift 2 ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    *) echo "loadtest: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "loadtest: $*" >&2; }
case "$PEER" in
  ""|janus) ;;
  *) say "--peer $PEER: only janus is known"; exit 2 ;;
esac
if [ "$PEER" = janus ] && ! command -v janus >/dev/null; then
  say "janus missing (Debian package janus; scripts/setup-test-deps.sh installs it)"; exit 1
fi
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
  say "building release (cargo build --release)"
  cargo build --release --quiet
fi
[ -x "$BIN" ] || { say "$BIN missing: run without --no-build"; exit 1; }
command -v taskset >/dev/null || { say "taskset missing (Debian package util-linux)"; exit 1; }

CORES=$(nproc)
EDGE_CPU=0
OTHER_CPU=$([ "$CORES" -gt 1 ] && echo 1 || echo 0)
[ "$CORES" -gt 1 ] || say "one core only: the edge shares it with the load generator"
# Every viewer is a UDP socket in the load generator.
ulimit -n "$(( MAX + 4096 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$JDIR" ]; then rm -rf "$JDIR"; JDIR=; fi
}
trap cleanup EXIT INT TERM

# Starts a chorus process in the background and waits for its JSON ready line.
ready_line() {
  local file=$1 pid=$2
  for _ in $(seq 1 300); do
    if [ -s "$file" ]; then head -n1 "$file"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { say "process $pid died; see $OUT/*.log"; return 1; }
    sleep 0.1
  done
  say "no ready line in $file after 30 s"; return 1
}
json() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

export CHORUS_PUBLISH_TOKEN="loadtest-$(date +%s%N)"
export CHORUS_CLUSTER_TOKEN="cluster-$(date +%s%N)"
# Per-viewer info lines (join, leave) cost the control plane more than the join itself at
# hundreds of joins per second; warnings still show.
export CHORUS_LOG=${CHORUS_LOG:-warn}
# Every viewer and publisher of the load generator comes from 127.0.0.1: lift the per-address
# connection cap and the offer rates (defaults: 256 connections per IP, 20 offers/s per IP,
# 100/s in all), which would otherwise cap the join rate being measured.
LIMITS=(--max-connections 100000 --max-connections-per-ip 100000 --offers-per-sec 100000 --offers-per-sec-per-ip 100000)

# A reused --out holds the last run's ready lines: the new processes' must not be mistaken for them.
rm -f "$OUT/origin.json" "$OUT/edge.json" "$OUT/edge2.json" "$OUT/edges.jsonl"
JOIN=()
if [ "$CLUSTER" = 1 ]; then
  command -v redis-server >/dev/null || { say "redis-server missing (scripts/setup-test-deps.sh installs it)"; exit 1; }
  REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  taskset -c "$OTHER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    >"$OUT/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break; sleep 0.1; done
  JOIN=(--redis "redis://127.0.0.1:$REDIS_PORT/")
  EDGE_CAPACITY=${EDGE_CAPACITY:-$(( (MAX * 6 + 9) / 10 ))}
fi
taskset -c "$OTHER_CPU" "$BIN" origin --http 127.0.0.1:0 --cluster 127.0.0.1:0 "${LIMITS[@]}" \
  ${JOIN[@]+"${JOIN[@]}"} ${JOIN[@]+--node-id o1} >"$OUT/origin.json" 2>"$OUT/origin.log" &
ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
ORIGIN=$(ready_line "$OUT/origin.json" "$ORIGIN_PID")
if [ "$CLUSTER" = 1 ]; then
  # No --origin: each edge links to the stream's owner, found in Redis.
  UPLINK=("${JOIN[@]}" --node-id e1 --capacity "$EDGE_CAPACITY")
else
  UPLINK=(--origin "$(json "$ORIGIN" cluster)" --origin-fingerprint "$(json "$ORIGIN" fingerprint)")
fi
taskset -c "${EDGE_CPUS:-$EDGE_CPU}" "$BIN" edge --media-workers "$WORKERS" --http 127.0.0.1:0 "${LIMITS[@]}" "${UPLINK[@]}" \
  >"$OUT/edge.json" 2>"$OUT/edge.log" &
EDGE_PID=$!; PIDS+=("$EDGE_PID")
EDGE=$(ready_line "$OUT/edge.json" "$EDGE_PID")
say "origin $(json "$ORIGIN" http) (cpu $OTHER_CPU), edge $(json "$EDGE" http) (pid $EDGE_PID, cpus ${EDGE_CPUS:-$EDGE_CPU}, $WORKERS media threads)"
VIEW_URL=$(json "$EDGE" http)
if [ "$CLUSTER" = 1 ]; then
  taskset -c "${EDGE_CPUS:-$EDGE_CPU}" "$BIN" edge --media-workers "$WORKERS" --http 127.0.0.1:0 "${LIMITS[@]}" "${JOIN[@]}" --node-id e2 --capacity "$EDGE_CAPACITY" \
    >"$OUT/edge2.json" 2>"$OUT/edge2.log" &
  EDGE2_PID=$!; PIDS+=("$EDGE2_PID")
  EDGE2=$(ready_line "$OUT/edge2.json" "$EDGE2_PID")
  say "edge e2 $(json "$EDGE2" http) (pid $EDGE2_PID): viewers go through the origin's director, which places them"
  # The director places only registered edges: wait for both records (a heartbeat is 2 s).
  sleep 3
  VIEW_URL=$(json "$ORIGIN" http)
  python3 scripts/loadtest_edges.py --edge "e1=$EDGE_PID=$(json "$EDGE" http)" --edge "e2=$EDGE2_PID=$(json "$EDGE2" http)" \
    --every "$STEP_SECS" --out "$OUT/edges.jsonl" 2>"$OUT/edges.log" &
  PIDS+=($!)
fi

say "ramp: $START viewers + $STEP per step up to $MAX, ${STEP_SECS}s steady per step, $TRACKS tracks, stop within ${DURATION}s"
timeout --kill-after=10 "$(( ${DURATION%.*} + 60 ))" taskset -c "$OTHER_CPU" "$BIN" loadgen \
  --url "$(json "$ORIGIN" http)" --view-url "$VIEW_URL" \
  --tracks "$TRACKS" --start "$START" --step "$STEP" --max-viewers "$MAX" \
  --step-secs "$STEP_SECS" --duration "$DURATION" --edge-pid "$EDGE_PID" --origin-pid "$ORIGIN_PID" --join-concurrency 200 \
  ${LOADGEN_ARGS[@]+"${LOADGEN_ARGS[@]}"} \
  >"$OUT/steps.jsonl" 2>"$OUT/loadgen.log" || say "loadgen exited with $? (see $OUT/loadgen.log)"
cleanup; PIDS=()

# The floor: as many packets as the busiest step forwarded, to as many sockets as it had viewers,
# on the edge's core with nothing else running.
read -r PACKETS FLOOR_VIEWERS < <(python3 - "$OUT/steps.jsonl" <<'EOF'
import json, sys
steps = [s for s in (json.loads(l) for l in open(sys.argv[1]) if l.strip()) if "step" in s]
busiest = max(steps, key=lambda s: s.get("received", 0) + s.get("lost", 0), default={})
print(max(busiest.get("received", 0) + busiest.get("lost", 0), 100000), max(busiest.get("connected", 0), 100))
EOF
)
say "floor benchmark: $PACKETS packets to $FLOOR_VIEWERS sockets"
taskset -c "$EDGE_CPU","$OTHER_CPU" "$BIN" loadgen floor --packets "$PACKETS" --viewers "$FLOOR_VIEWERS" --batch 32 \
  >"$OUT/floor.json" 2>"$OUT/floor.log"

if [ "$PEER" = janus ]; then
  rm -f "$OUT/janus-steps.jsonl"
  JDIR=$(mktemp -d "${TMPDIR:-/tmp}/chorus-janus.XXXXXX")
  JCFG=$("$BIN" loadgen janus-config --dir "$JDIR" --tracks "$TRACKS" --event-loops "$JANUS_LOOPS")
  mkdir -p "$OUT/janus-config" && cp "$JDIR"/*.jcfg "$OUT/janus-config/"
  JWS=$(json "$JCFG" ws)
  JRTP=$(python3 -c "import json,sys; print(','.join(json.loads(sys.argv[1])['rtp']))" "$JCFG")
  JIP=$(json "$JCFG" ice_ip)
  taskset -c "${EDGE_CPUS:-$EDGE_CPU}" janus -F "$JDIR" -C "$JDIR/janus.jcfg" --disable-colors >"$OUT/janus.log" 2>&1 &
  JANUS_PID=$!; PIDS+=("$JANUS_PID")
  JPORT=${JWS##*:}; JPORT=${JPORT%/}
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$JPORT") 2>/dev/null && break; sleep 0.1; done
  kill -0 "$JANUS_PID" 2>/dev/null || { say "janus died; see $OUT/janus.log"; exit 1; }
  # Janus skips loopback when it gathers candidates: its one candidate is $JIP, so the viewers
  # bind that address (the kernel still routes it over loopback).
  say "janus $(janus --version 2>/dev/null | head -n1) $JWS (pid $JANUS_PID, cpus ${EDGE_CPUS:-$EDGE_CPU}, $JANUS_LOOPS event loops), candidate $JIP"
  say "janus ramp: the same steps, $TRACKS streams fed one speaker each"
  timeout --kill-after=10 "$(( ${DURATION%.*} + 60 ))" taskset -c "$OTHER_CPU" "$BIN" loadgen --target janus \
    --url "$JWS" --janus-rtp "$JRTP" --local-ip "$JIP" \
    --tracks "$TRACKS" --start "$START" --step "$STEP" --max-viewers "$MAX" \
    --step-secs "$STEP_SECS" --duration "$DURATION" --edge-pid "$JANUS_PID" --join-concurrency 200 \
    ${LOADGEN_ARGS[@]+"${LOADGEN_ARGS[@]}"} \
    >"$OUT/janus-steps.jsonl" 2>"$OUT/janus-loadgen.log" || say "janus loadgen exited with $? (see $OUT/janus-loadgen.log)"
  cleanup; PIDS=()
fi

VENV=target/loadtest-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  say "installing matplotlib into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet matplotlib
fi
"$VENV/bin/python" scripts/loadtest_report.py "$OUT"
say "report: $OUT/report.md and $OUT/report.png"
