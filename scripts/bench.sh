#!/usr/bin/env bash
# The end-to-end benchmark suite behind BENCHMARKS.md.
#
# For every scenario and run it starts a fresh stack on 127.0.0.1 only:
#   switchyard: its own redis-server (free port, --save '' --appendonly no), `switchyard serve`
#               and N `switchyard worker` processes, ready when /healthz answers and a page
#               came back through the layer and a worker;
#   django:     its own redis-server and daphne serving bench/django_peer/peer.py (Django
#               Channels 4 + channels_redis), from a venv under target/peer-venv;
#   dev:        `switchyard dev` (interface server and worker in one process, in-memory layer);
#   bare:       examples/floor_server.rs, serve's HTTP/WebSocket stack with no layer and no
#               worker (echo in the socket task, in-process rooms): what the machine allows at all;
#   tuned:      switchyard with the settings this script used before the binary's defaults were
#               measured (every process on 1 runtime thread, worker concurrency 256, capacity
#               10000 for every channel), to compare the defaults against in the same series;
#   old:        switchyard with the binary's defaults before they were measured (one runtime
#               thread per CPU, worker concurrency 64, capacity 100 everywhere, a full
#               websocket.receive retried for 0.5 s before 1013);
#   layered:    switchyard with the binary's defaults but workers started with --no-owners:
#               strictly ordered sockets keep their order in Redis (any worker takes any frame)
#               instead of on the worker that accepted them.
# Switchyard runs with the binary's own defaults (threads, concurrency, capacities) unless
# --threads, --serve-threads, --concurrency or --capacity say otherwise.
# runs `switchyard bench` against it (every scenario bounded in time and in count, loopback
# only), records per process (serve, each worker, daphne, redis-server, the bench client) CPU
# seconds and peak RSS (scripts/bench_measure.py), stops the stack, and at the end writes
# JSON lines + a table with medians (scripts/bench_report.py) under target/bench-results/.
# Every process started here is killed on exit, failure or Ctrl-C included. Run r takes the
# scenarios and the stacks starting at the r-th of each list (rotated), so no stack always
# runs first; Redis's INFO commandstats after each scenario go to the logs directory.
#
#   scripts/bench.sh                         # switchyard, 3 runs of every scenario
#   scripts/bench.sh --peer django           # the same loads against Django Channels 4 too
#   scripts/bench.sh --runs 5 --workers 1 --scenarios echo1,http --peer django
#   scripts/bench.sh --peer django,dev,bare  # every stack, interleaved, in one series
#   scripts/bench.sh --peer tuned --scenarios echo1000        # defaults vs the old tuned flags
#   scripts/bench.sh --workers 2 --scenarios relay1000,relay1000u  # the cost of strict ordering
#   scripts/bench.sh --workers 2 --scenarios relay1000 --peer layered  # owners vs order in Redis
#   scripts/bench.sh --workers 2 --scenarios rooms1000,rooms1000u  # the same in rooms of 10
#
# Scenarios (default: all but the relay and rooms pairs): echo1 echo1000 bcast1k bcast10k
# sustained idle http (64 connections) http128 http256; relay1000 (1,000 sockets, each alone in
# its /ws/relay/ room, relaying 30 frames/s to itself: per-connection ordering on) and
# relay1000u (the same on /ws/relay-unordered/: ordering off); rooms1000 and rooms1000u (1,000
# sockets in 100 rooms of 10, every socket relaying --relay-rate frames/s to its room).
# The Django peer runs the same loads except idle, with a handshake concurrency of 50 (daphne's
# listen backlog).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3
WORKERS=1
# Empty: the binary's default.
CONCURRENCY=""
THREADS=""
SERVE_THREADS=""
CLIENT_THREADS=1
RUN_OFFSET=0
CAPACITY=""
PEER=none
SCENARIOS="echo1 echo1000 bcast1k bcast10k sustained idle http http128 http256"
DURATION=10
RELAY_RATE=30
# Empty: open loop at RELAY_RATE; N: closed loop, N frames in flight per socket.
RELAY_WINDOW=""
IDLE_CONNECTIONS=""
OUT_DIR=target/bench-results

usage() {
  sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  cat <<EOF
Flags:
  --runs N          runs of every scenario (default $RUNS); the table shows medians (min-max)
  --workers N       switchyard worker processes (default $WORKERS)
  --concurrency N   messages run at once per worker process (default: the binary's)
  --threads N       runtime threads of serve and each worker (default: the binary's, which is 1
                    per process on a 2-core machine; 0 = one per CPU)
  --serve-threads N runtime threads of serve only (default: --threads)
  --client-threads N runtime threads of the load client, `switchyard bench` (default $CLIENT_THREADS,
                    for every stack: one thread cost ~20 % less client CPU per echo than two here
                    and left serve more of the 2 cores; 0 = one per CPU, the tool's default)
  --capacity N      channel capacity for serve and workers (default: the binary's, 100 for
                    channels in general and --server-capacity 10000 for the channels every
                    connection shares)
  --peer LIST       also run every load against these stacks, interleaved (comma-separated):
                    django (Django Channels 4), dev (switchyard dev, in-memory layer),
                    bare (examples/floor_server.rs: no layer, no worker: the machine's floor)
  --scenarios LIST  comma-separated subset of: $SCENARIOS
  --duration S      seconds of load per scenario (default $DURATION)
  --relay-rate R    frames/s each socket relays in relay1000* and rooms1000* (default $RELAY_RATE)
  --relay-window N  instead: closed loop, each socket keeps N frames in flight (sent, not yet
                    back to itself) in relay1000* and rooms1000*: the saturated rate without
                    queues growing without bound
  --idle N          connections held in the idle scenario (default: what the fd limit allows)
  --run-offset N    number this invocation's runs from N+1 (to add runs to an earlier series)
  --out DIR         results directory (default $OUT_DIR)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --serve-threads) SERVE_THREADS="$2"; shift 2 ;;
    --client-threads) CLIENT_THREADS="$2"; shift 2 ;;
    --capacity) CAPACITY="$2"; shift 2 ;;
    --peer) PEER="$2"; shift 2 ;;
    --scenarios) SCENARIOS="${2//,/ }"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --relay-rate) RELAY_RATE="$2"; shift 2 ;;
    --relay-window) RELAY_WINDOW="$2"; shift 2 ;;
    --idle) IDLE_CONNECTIONS="$2"; shift 2 ;;
    --run-offset) RUN_OFFSET="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown flag $1" >&2; usage >&2; exit 2 ;;
  esac
done
PEERS=()
if [ "$PEER" != none ]; then
  for p in ${PEER//,/ }; do
    case "$p" in django|dev|bare|tuned|old|layered) PEERS+=("$p") ;; *) echo "--peer takes django, dev, bare, tuned, old, layered (comma-separated) or none" >&2; exit 2 ;; esac
  done
fi
has_peer() { local p; for p in "${PEERS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/bench-$STAMP.jsonl"
LOGS="$OUT_DIR/bench-$STAMP-logs"
mkdir -p "$LOGS"
# SWITCHYARD_BIN=path measures another build of the binary (e.g. before/after a change);
# CLIENT_BIN=path takes the load client (`switchyard bench`) from another build, so that two
# builds of the server can be measured with the same client.
BIN="${SWITCHYARD_BIN:-target/release/switchyard}"
CLIENT_BIN="${CLIENT_BIN:-$BIN}"

# Every process started here, killed by the trap whatever happens.
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BENCH_LOG_NAME=bench
# log, free_port, wait_for and the switchyard stack's start-up, shared with bench_cluster.sh.
source scripts/bench_common.sh

if [ -z "${SWITCHYARD_BIN:-}" ]; then
  log "building the release binary (a no-op when up to date)"
  cargo build -q --release -p switchyard-workers
fi

if has_peer bare; then
  log "building examples/floor_server.rs (the bare peer)"
  cargo build -q --release --example floor_server
fi
FLOOR_BIN=target/release/examples/floor_server

if has_peer django; then
  VENV=target/peer-venv
  if [ ! -x "$VENV/bin/daphne" ]; then
    log "creating $VENV for the Django Channels 4 peer"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r bench/django_peer/requirements.txt
  fi
fi

STACK_PROCS=()   # NAME=PID of the stack under test, for bench_measure.py
HTTP_PORT=""

start_redis() {
  REDIS_PORT="$(free_port)"
  start_redis_server redis "$REDIS_PORT" "$LOGS/redis-$1.log"
  wait_for redis-server 10 redis-cli -p "$REDIS_PORT" ping
}

# Flags for the settings given on the command line (none: the binary's defaults); with "tuned",
# the settings this script used before the defaults were measured.
opt_flags() {
  local role="$1" tuned="${2:-}" threads concurrency capacity
  if [ "$tuned" = tuned ]; then threads=1; concurrency=256; capacity=10000
  elif [ "$tuned" = old ]; then threads=0; concurrency=64; capacity=100
  else threads="$THREADS"; concurrency="$CONCURRENCY"; capacity="$CAPACITY"; fi
  if [ "$role" = serve ] && { [ -z "$tuned" ] || [ "$tuned" = layered ]; } && [ -n "$SERVE_THREADS" ]; then threads="$SERVE_THREADS"; fi
  FLAGS=()
  if [ -n "$threads" ]; then FLAGS+=(--threads "$threads"); fi
  FLAGS+=("$role")
  if [ -n "$capacity" ]; then FLAGS+=(--capacity "$capacity"); fi
  if [ "$role" != serve ] && [ -n "$concurrency" ]; then FLAGS+=(--concurrency "$concurrency"); fi
  if [ "$tuned" = old ]; then FLAGS+=(--server-capacity 100); fi
  if [ "$tuned" = old ] && [ "$role" = serve ]; then FLAGS+=(--backpressure-timeout 0.5); fi
  if [ "$tuned" = layered ] && [ "$role" = worker ]; then FLAGS+=(--no-owners); fi
}

start_switchyard() {
  local tuned="${2:-}"
  STACK_PROCS=()
  start_redis "$1"
  HTTP_PORT="$(free_port)"
  local layer="redis://127.0.0.1:$REDIS_PORT/0"
  opt_flags serve "$tuned"
  start_serve "$1" "$layer" "${FLAGS[@]}"
  opt_flags worker "$tuned"
  start_workers "$1" "$layer" "${FLAGS[@]}"
  wait_serving serve workers
}

start_dev() {
  STACK_PROCS=()
  HTTP_PORT="$(free_port)"
  # serve's and the worker's flags, one process; named serve in the tables (it is the server).
  opt_flags dev
  "$BIN" "${FLAGS[@]}" --no-open --port "$HTTP_PORT" \
    --max-connections 20000 --log warn > "$LOGS/dev-$1.log" 2>&1 &
  PIDS+=($!)
  STACK_PROCS+=("serve=$!")
  wait_serving dev worker
}

start_bare() {
  STACK_PROCS=()
  HTTP_PORT="$(free_port)"
  # The same page size as the reference app's GET / (workers/static/index.html).
  "$FLOOR_BIN" --port "$HTTP_PORT" --threads "${SERVE_THREADS:-${THREADS:-1}}" \
    --page-bytes "$(wc -c < workers/static/index.html)" > "$LOGS/bare-$1.log" 2>&1 &
  PIDS+=($!)
  STACK_PROCS+=("serve=$!")
  wait_for "floor server" 20 curl -fsS -m 2 "http://127.0.0.1:$HTTP_PORT/"
}

start_django() {
  STACK_PROCS=()
  start_redis "$1"
  HTTP_PORT="$(free_port)"
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" PYTHONPATH=bench/django_peer \
    "$VENV/bin/daphne" -v 0 -b 127.0.0.1 -p "$HTTP_PORT" peer:application \
    > "$LOGS/daphne-$1.log" 2>&1 &
  PIDS+=($!)
  STACK_PROCS+=("daphne=$!")
  wait_for "daphne" 30 curl -fsS -m 2 "http://127.0.0.1:$HTTP_PORT/"
}

start_stack() {
  case "$1" in
    switchyard) start_switchyard "$2" ;;
    tuned) start_switchyard "$2" tuned ;;
    old) start_switchyard "$2" old ;;
    layered) start_switchyard "$2" layered ;;
    django) start_django "$2" ;;
    dev) start_dev "$2" ;;
    bare) start_bare "$2" ;;
  esac
}

# measure STACK SCENARIO RUN TIMEOUT [--param K=V ...] -- BENCH-ARGS...
# Prints bench_measure.py's one-line verdict ({"rc": .., "ok": ..}).
measure() {
  local stack="$1" scenario="$2" run="$3" limit="$4"; shift 4
  local params=()
  while [ "$1" != -- ]; do params+=("$1" "$2"); shift 2; done
  shift
  local procs=() p bench=()
  for p in "${STACK_PROCS[@]}"; do procs+=(--proc "$p"); done
  # @PORT@ in the bench arguments is the stack's HTTP port, known only once it started.
  for p in "$@"; do bench+=("${p//@PORT@/$HTTP_PORT}"); done
  python3 scripts/bench_measure.py --out "$RESULTS" --stack "$stack" --scenario "$scenario" \
    --run "$run" "${params[@]}" "${procs[@]}" --timeout "$limit" \
    --log "$LOGS/client-$stack-$scenario-$run.log" -- "$CLIENT_BIN" --threads "$CLIENT_THREADS" bench "${bench[@]}" -q
}

# One scenario on a fresh stack: start, load, stop.
scenario() {
  local stack="$1" name="$2" run="$3"; shift 3
  log "$stack $name run $run (load $(cut -d' ' -f1 /proc/loadavg))"
  if ! start_stack "$stack" "$stack-$name-$run"; then
    log "  -> the $stack stack did not start; scenario skipped (logs in $LOGS)"
    cleanup
    LAST_VERDICT='{"rc": -1, "ok": null}'
    return 0
  fi
  local verdict
  verdict="$(measure "$stack" "$name" "$run" "$@" || echo '{"rc": -1, "ok": null}')"
  log "  -> $verdict"
  # Redis's own count and CPU per command (scripts' inner commands included), for what a
  # change costs Redis per message.
  if [ -n "${REDIS_PORT:-}" ] && [ "$stack" != bare ] && [ "$stack" != dev ]; then
    redis-cli -p "$REDIS_PORT" INFO commandstats > "$LOGS/redis-stats-$stack-$name-$run.txt" 2>/dev/null || true
  fi
  cleanup
  LAST_VERDICT="$verdict"
}

connect_concurrency() {
  # daphne listens with a backlog of 50; more handshakes at once wait ~1 s in the kernel.
  if [ "$1" = django ]; then echo 50; else echo 256; fi
}

# The most connections a process may hold here: each side (client, serve) holds one socket per
# connection under its own open-file limit; keep 500 descriptors spare for Redis and the rest.
HARD_NOFILE="$(ulimit -Hn)"
if [ "$HARD_NOFILE" = unlimited ]; then HARD_NOFILE=1048576; fi
MAX_SOCKETS=$((HARD_NOFILE - 500))
BCAST_BIG=10000
if [ "$MAX_SOCKETS" -lt "$BCAST_BIG" ]; then BCAST_BIG="$MAX_SOCKETS"; fi
IDLE="${IDLE_CONNECTIONS:-$MAX_SOCKETS}"
# serve's --max-connections is 20000 above.
if [ "$IDLE" -gt 19500 ]; then IDLE=19500; fi

run_scenario() {
  local stack="$1" name="$2" run="$3" d="$DURATION" cc
  cc="$(connect_concurrency "$stack")"
  case "$name" in
    echo1)
      scenario "$stack" echo1 "$run" 120 -- echo --url "ws://127.0.0.1:@PORT@/ws/echo/" \
        -c 1 --in-flight 1 -d "$d" -n 2000000 --connect-concurrency "$cc" ;;
    echo1000)
      scenario "$stack" echo1000 "$run" 180 -- echo --url "ws://127.0.0.1:@PORT@/ws/echo/" \
        -c 1000 --in-flight 1 -d "$d" -n 20000000 --connect-concurrency "$cc" ;;
    bcast1k)
      # 1 sender, 50 broadcasts/s into a 1,000-member room: 50,000 deliveries/s.
      scenario "$stack" bcast1k "$run" 180 -- broadcast --url "ws://127.0.0.1:@PORT@/ws/relay/{room}/" \
        -c 1000 --rooms 1 --senders 1 --rate 50 -d "$d" -n 100000 --settle 1 --connect-concurrency "$cc" ;;
    bcast10k)
      # 1 sender, 5 broadcasts/s into the biggest room the fd limit allows: 50,000 deliveries/s.
      scenario "$stack" bcast10k "$run" 400 --param members="$BCAST_BIG" -- broadcast \
        --url "ws://127.0.0.1:@PORT@/ws/relay/{room}/" -c "$BCAST_BIG" --rooms 1 --senders 1 \
        --rate 5 -d "$d" -n 10000 --settle 2 --connect-timeout 60 --connect-concurrency "$cc" ;;
    sustained)
      # Ladder over offered deliveries/s into one 1,000-member room, in steps of ~1.4x: from
      # the start rung, go up while a rung is clean (nothing lost, corrupted or duplicated, and
      # >= 90 % of the offer delivered within the load window), or down until one is. Senders:
      # one per 10 broadcasts/s, 1 to 10. At most 10 rungs (from 45k: up to 1,000,000/s). The
      # report takes each run's best clean rung.
      local first=11
      if [ "$stack" = django ]; then first=2; fi
      sustained_ladder "$stack" "$run" "$first" 10 "$cc" scenario "$stack" sustained "$run" 180 ;;
    idle)
      if [ "$stack" = django ]; then return; fi
      scenario "$stack" idle "$run" 300 --param connections="$IDLE" -- connect \
        --url "ws://127.0.0.1:@PORT@/ws/echo/" -c "$IDLE" --hold "$d" --connect-timeout 60 \
        --connect-concurrency "$cc" ;;
    relay1000|relay1000u|rooms1000|rooms1000u)
      # 1,000 sockets, each relaying --relay-rate frames/s, ordered (/ws/relay/) or not
      # (/ws/relay-unordered/): relay1000* each alone in its room (30: 30,000 deliveries/s
      # offered), rooms1000* in 100 rooms of 10 (30: 300,000 deliveries/s offered).
      local route=relay rooms=1000
      case "$name" in *u) route=relay-unordered ;; esac
      case "$name" in rooms*) rooms=100 ;; esac
      scenario "$stack" "$name" "$run" 180 -- broadcast --url "ws://127.0.0.1:@PORT@/ws/$route/{room}/" \
        -c 1000 --rooms "$rooms" --senders 1000 --rate "$RELAY_RATE" ${RELAY_WINDOW:+--window "$RELAY_WINDOW"} \
        -d "$d" -n 1000000 --settle 1 --connect-concurrency "$cc" ;;
    http|http128|http256)
      # Keep-alive GETs of the 2 KB chat page on 64, 128 or 256 connections: the targets ask for
      # a rate at a p99, and in a closed loop the connection count sets where on that curve the
      # load sits, so three points of it are measured.
      local conns="${name#http}"
      scenario "$stack" "$name" "$run" 120 -- http --url "http://127.0.0.1:@PORT@/" \
        -c "${conns:-64}" -d "$d" -n 5000000 ;;
    *) echo "unknown scenario $name" >&2; exit 2 ;;
  esac
}

STACKS=(switchyard "${PEERS[@]}")

RELAY_PACE="rate $RELAY_RATE/s"
if [ -n "$RELAY_WINDOW" ]; then RELAY_PACE="closed loop, window $RELAY_WINDOW"; fi
{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc); $(lscpu | grep 'Model name' | sed 's/  */ /g')"
  echo "memory: $(free -g | awk '/Mem:/ {print $2" GiB"}')"
  echo "redis: $(redis-server --version)"
  echo "open files: soft $(ulimit -Sn), hard $(ulimit -Hn)"
  echo "threads: serve ${SERVE_THREADS:-${THREADS:-default}}, workers ${THREADS:-default}, client $CLIENT_THREADS; workers: $WORKERS x concurrency ${CONCURRENCY:-default}; capacity: ${CAPACITY:-default}; runs: $RUNS; duration: ${DURATION}s; scenarios: $SCENARIOS; stacks: ${STACKS[*]}; relay: $RELAY_PACE"
  echo "uptime at start: $(uptime)"
} > "$OUT_DIR/bench-$STAMP-machine.txt"
cat "$OUT_DIR/bench-$STAMP-machine.txt" >&2

# The first of anything in a run meets a different machine from the last (a build finishing,
# caches, the host's other guests): run r starts its scenarios and, in each, its stacks at the
# r-th place of their lists, so that over runs every stack and scenario takes every place.
rotate() {
  local by="$1"; shift
  local items=("$@") n="$#" i
  for ((i = 0; i < n; i++)); do printf '%s\n' "${items[$(((i + by) % n))]}"; done
}
read -r -a SCENARIO_LIST <<< "$SCENARIOS"
for run in $(seq $((RUN_OFFSET + 1)) $((RUN_OFFSET + RUNS))); do
  log "run $run: $(uptime)"
  mapfile -t RUN_SCENARIOS < <(rotate $((run - 1)) "${SCENARIO_LIST[@]}")
  mapfile -t RUN_STACKS < <(rotate $((run - 1)) "${STACKS[@]}")
  for name in "${RUN_SCENARIOS[@]}"; do
    for stack in "${RUN_STACKS[@]}"; do
      run_scenario "$stack" "$name" "$run"
    done
  done
done

echo "uptime at end: $(uptime)" >> "$OUT_DIR/bench-$STAMP-machine.txt"
python3 scripts/bench_report.py "$RESULTS" --machine "$OUT_DIR/bench-$STAMP-machine.txt" \
  > "$OUT_DIR/bench-$STAMP.md"
cat "$OUT_DIR/bench-$STAMP.md"
log "results: $RESULTS, $OUT_DIR/bench-$STAMP.md, logs in $LOGS"
