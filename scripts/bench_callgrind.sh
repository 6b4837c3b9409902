#!/usr/bin/env bash
# Instructions per message of one process, counted by valgrind's callgrind: the same count for
# the same build and load whatever else the machine is doing, where the CPU times of
# bench_ab.sh swing with a shared host's load. For each binary it starts a fresh redis-server
# (free port, no persistence), `switchyard serve` and one `switchyard worker` on 127.0.0.1, with
# the measured process under callgrind, and runs the same load twice, with few and with many
# messages; the difference of the two totals over the difference of the messages is the cost of
# one more message, without start-up and handshakes.
#
#   --scenario broadcast   one sender into one room of 1,000 sockets on /ws/relay/, 2 broadcasts/s
#                          (the default): instructions per delivery
#   --scenario echo        100 connections on /ws/echo/, one message in flight each:
#                          instructions per echo
#   --scenario http        32 keep-alive connections asking for GET / (the 2 KB page, answered
#                          by the worker through Redis): instructions per request
#   --scenario handshake   WebSockets opened on /ws/echo/ (64 at a time), held 0.5 s and closed:
#                          instructions per connection (TCP accept, handshake and 101 after the
#                          worker's accept, close, websocket.disconnect)
#   --edge on              serve with every edge check on and the client passing them
#                          (scripts/edge_profile.sh: allowed hosts and origins, JWT required on
#                          /ws/, limits on loopback); off (the default): serve's defaults
#   --process serve        count `serve` (the default), `worker`, `client` (`switchyard bench`) or
#                          `redis` (the redis-server): the four give the CPU of a whole echo
#   --small N --large N    messages of the two runs (broadcasts, echoes, requests or
#                          connections; defaults 6 and 20 broadcasts, 5,000 and 20,000 echoes,
#                          2,000 and 8,000 requests, 200 and 1,000 connections)
#
# The measured process runs ~50x slower under callgrind, so batches (messages per pop and per
# wake-up) differ from a real run: compare builds with it, and time them with bench_ab.sh.
#
#   scripts/bench_callgrind.sh /tmp/switchyard.before target/release/switchyard
#   scripts/bench_callgrind.sh --scenario echo --process worker A B
#   scripts/bench_callgrind.sh --scenario handshake --edge on target/release/switchyard
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIO=broadcast
PROCESS=serve
SMALL=""
LARGE=""
EDGE=off
while [ $# -gt 0 ]; do
  case "$1" in
    --scenario) SCENARIO="$2"; shift 2 ;;
    --process) PROCESS="$2"; shift 2 ;;
    --small) SMALL="$2"; shift 2 ;;
    --large) LARGE="$2"; shift 2 ;;
    --edge) EDGE="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [flags] BINARY... (see --help)" >&2; exit 2; }
case "$SCENARIO" in
  broadcast) SMALL="${SMALL:-6}"; LARGE="${LARGE:-20}" ;;
  echo) SMALL="${SMALL:-5000}"; LARGE="${LARGE:-20000}" ;;
  http) SMALL="${SMALL:-2000}"; LARGE="${LARGE:-8000}" ;;
  handshake) SMALL="${SMALL:-200}"; LARGE="${LARGE:-1000}" ;;
  *) echo "--scenario is broadcast, echo, http or handshake, not $SCENARIO" >&2; exit 2 ;;
esac
EDGE_SERVE_FLAGS=(); EDGE_CLIENT_FLAGS=()
case "$EDGE" in
  off) ;;
  on) . scripts/edge_profile.sh ;;
  *) echo "--edge is on or off, not $EDGE" >&2; exit 2 ;;
esac
[ "$LARGE" -gt "$SMALL" ] 2> /dev/null \
  || { echo "--large ($LARGE) must be a count above --small ($SMALL)" >&2; exit 2; }
case "$PROCESS" in serve|worker|client|redis) ;; *) echo "--process is serve, worker, client or redis" >&2; exit 2 ;; esac
command -v valgrind > /dev/null || { echo "valgrind is missing (apt-get install -y valgrind)" >&2; exit 1; }

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  local p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# On a failure, the last lines of what the processes said (the work directory goes with the exit).
show_logs() {
  local f
  for f in "$WORK"/serve.log "$WORK"/worker.log "$WORK"/bench.err; do
    [ -s "$f" ] && { echo "--- $(basename "$f"):" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs `$PROCESS` of binary $1 under callgrind for $2 messages; writes "messages instructions"
# to the file $3. Runs in this shell (not in `$(...)`), so what it starts is killed by the trap.
measure() {
  local bin="$1" n="$2" result="$3" rport hport out="$WORK/callgrind.out" grind=() spid wpid
  rm -f "$out"
  rport="$(free_port)"; hport="$(free_port)"
  local valgrind=(valgrind --tool=callgrind --callgrind-out-file="$out")
  [ "$PROCESS" = redis ] && grind=("${valgrind[@]}")
  # Redis writes its count when the cleanup stops it, after serve and the worker are gone.
  ${grind[@]+"${grind[@]}"} redis-server --bind 127.0.0.1 --port "$rport" --save '' \
    --appendonly no --logfile "" > /dev/null 2>&1 &
  PIDS+=($!)
  wait_for "redis-server" 100 redis-cli -p "$rport" ping
  local layer="redis://127.0.0.1:$rport/0"
  grind=(); [ "$PROCESS" = serve ] && grind=("${valgrind[@]}")
  ${grind[@]+"${grind[@]}"} "$bin" --threads 1 serve --layer "$layer" --capacity 10000 --port "$hport" \
    --max-connections 20000 --log warn ${EDGE_SERVE_FLAGS[@]+"${EDGE_SERVE_FLAGS[@]}"} \
    > "$WORK/serve.log" 2>&1 &
  spid=$!; PIDS+=("$spid")
  grind=(); [ "$PROCESS" = worker ] && grind=("${valgrind[@]}")
  ${grind[@]+"${grind[@]}"} "$bin" --threads 1 worker --layer "$layer" --capacity 10000 \
    --concurrency 256 --log warn > "$WORK/worker.log" 2>&1 &
  wpid=$!; PIDS+=("$wpid")
  wait_for "serve /healthz" 600 curl -fsS -m 2 "http://127.0.0.1:$hport/healthz"
  grind=(); [ "$PROCESS" = client ] && grind=("${valgrind[@]}")
  local load
  if [ "$SCENARIO" = broadcast ]; then
    load=(broadcast --url "ws://127.0.0.1:$hport/ws/relay/{room}/" -c 1000 --rooms 1 --senders 1
      --rate 2 -d 120 -n "$n" --settle 1)
  elif [ "$SCENARIO" = echo ]; then
    load=(echo --url "ws://127.0.0.1:$hport/ws/echo/" -c 100 --in-flight 1 -d 300 -n "$n")
  elif [ "$SCENARIO" = handshake ]; then
    load=(connect --url "ws://127.0.0.1:$hport/ws/echo/" -c "$n" --hold 0.5)
  else
    load=(http --url "http://127.0.0.1:$hport/" -c 32 -d 300 -n "$n")
  fi
  ${grind[@]+"${grind[@]}"} "$bin" --threads 1 bench "${load[@]}" --connect-concurrency 64 \
    --connect-timeout 60 -q ${EDGE_CLIENT_FLAGS[@]+"${EDGE_CLIENT_FLAGS[@]}"} \
    > "$WORK/bench.out" 2> "$WORK/bench.err" || true
  # A server process writes its count when it exits; SIGTERM is its graceful shutdown.
  kill -TERM "$spid" "$wpid" 2> /dev/null || true
  local waited=0
  while { kill -0 "$spid" || kill -0 "$wpid"; } 2> /dev/null && [ "$waited" -lt 600 ]; do
    sleep 0.1; waited=$((waited + 1))
  done
  if [ "$waited" -ge 600 ]; then
    echo "serve or worker still running 60 s after SIGTERM: its count would miss its shutdown" >&2
    show_logs; exit 1
  fi
  cleanup
  python3 - "$WORK/bench.out" "$out" > "$result" <<'PY' || { show_logs; exit 1; }
import json, os, re, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.startswith("{")]
if not lines:
    sys.exit("the load client printed no summary (see its stderr)")
d = json.loads(lines[-1])
# `ok` is false for anything the load client counts as a failure: lost, corrupted, misrouted,
# duplicated or reordered messages, failed connections, HTTP errors and error statuses.
if d.get("ok") is not True:
    sys.exit("the load did not run clean (its summary says ok: false): not a clean count")
if not os.path.exists(sys.argv[2]):
    sys.exit("callgrind wrote no count (did the measured process exit?)")
total = next((int(m.group(1)) for l in open(sys.argv[2]) if (m := re.match(r"summary: (\d+)", l))), None)
if total is None:
    sys.exit("no summary line in the callgrind output")
done = d.get("received", d.get("completed", d.get("connected")))
if not isinstance(done, int):
    sys.exit("the load client's summary has no message count")
print(done, total)
PY
}

# Waits up to $2 tenths of a second for a command ($3...) to succeed.
wait_for() {
  local what="$1" limit="$2" i; shift 2
  for ((i = 0; i < limit; i++)); do
    "$@" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$what not ready" >&2
  show_logs; exit 1
}

case "$SCENARIO" in
  broadcast) unit=delivery units=deliveries ;;
  echo) unit=echo units=echoes ;;
  http) unit=request units=requests ;;
  handshake) unit=connection units=connections ;;
esac
for bin in "$@"; do
  measure "$bin" "$SMALL" "$WORK/small"
  measure "$bin" "$LARGE" "$WORK/large"
  python3 - "$bin" "$PROCESS" "$unit" "$units" "$WORK/small" "$WORK/large" <<'PY'
import sys
bin_, process, unit, units, small, large = sys.argv[1:]
m1, i1 = map(int, open(small).read().split())
m2, i2 = map(int, open(large).read().split())
print(f"{bin_}: {process} {(i2 - i1) / (m2 - m1):,.0f} instructions per {unit} "
      f"({m1:,} {units}: {i1:,}; {m2:,}: {i2:,})")
PY
done
echo "($SCENARIO load, edge checks $EDGE, $PROCESS under $(valgrind --version) callgrind)"
