#!/usr/bin/env bash
# Side-by-side A/B of two or more builds of the binary on the echo load, interleaved so that each
# sees the same machine: for every round and every binary it starts a fresh redis-server (free
# port, no persistence), `switchyard serve` and one `switchyard worker` on 127.0.0.1, runs
# `switchyard bench echo` for 7 s, and reads each process's CPU ticks from /proc between seconds
# 2 and 6 of the load. It prints one line per run: echoes/s, RTT p50/p99, and CPU µs per echo of
# serve, worker and Redis (the steadier figure on a shared machine) and of the load client (its
# own figure, over the whole run). Everything it starts is killed on exit.
#
# With --broadcast MEMBERS:RATE the load is one sender broadcasting RATE messages/s into one
# room of MEMBERS sockets on /ws/relay/ instead (figures per delivery, latency p50/p99). Each line
# also gives the CPU steal of the window: runs with much steal measured the neighbours.
#
# With --transports tcp,unix every binary runs once per transport in each round: serve and
# worker reach Redis over loopback TCP (redis://127.0.0.1:PORT) or over its Unix socket
# (unix:///…/redis.sock); the load itself is always WebSocket over loopback TCP.
#
# With --edge off,on every binary runs once per setting in each round: serve's defaults, and
# every edge check on with the load client passing them (scripts/edge_profile.sh: allowed hosts
# and origins, a JWT required on /ws/ and sent by the client, the per-client limits applied to
# loopback with rates that delay nothing). The line names the setting.
#
# CONCURRENCY=N and CAPACITY=N in the environment set the worker's --concurrency and both
# processes' --capacity (default: the binary's own defaults). CLIENT_BIN=path runs that binary's `bench` as the load
# client of every run (default: each binary under test is its own client), so that a change to
# the server is measured with the same client on both sides.
#
#   scripts/bench_ab.sh /tmp/switchyard.before target/release/switchyard
#   scripts/bench_ab.sh --rounds 5 --conns 1 --threads 0 A B
#   scripts/bench_ab.sh --broadcast 1000:20 A B
#   scripts/bench_ab.sh --transports tcp,unix target/release/switchyard
#   scripts/bench_ab.sh --rounds 5 --edge off,on target/release/switchyard
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3
CONNS=1000
THREADS=1
BROADCAST=""
TRANSPORTS=tcp
EDGES=off
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --conns) CONNS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --broadcast) BROADCAST="$2"; shift 2 ;;
    --transports) TRANSPORTS="$2"; shift 2 ;;
    --edge) EDGES="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --*) echo "unknown flag $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--rounds N] [--conns C] [--threads T] [--broadcast M:R] [--transports tcp,unix] [--edge off,on] BIN..." >&2; exit 2; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# "steal total" jiffies of all CPUs: the share other guests of the host took meanwhile.
steal_total() { awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print $9, t}' /proc/stat; }

for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
  client="${CLIENT_BIN:-$bin}"
  for transport in ${TRANSPORTS//,/ }; do
  for edge in ${EDGES//,/ }; do
    EDGE_SERVE_FLAGS=(); EDGE_CLIENT_FLAGS=()
    case "$edge" in
      off) ;;
      on) . scripts/edge_profile.sh ;;
      *) echo "--edge takes off and on, not $edge" >&2; exit 2 ;;
    esac
    rport="$(free_port)"; hport="$(free_port)"
    rm -f "$WORK/redis.sock"
    redis-server --bind 127.0.0.1 --port "$rport" --unixsocket "$WORK/redis.sock" --unixsocketperm 700 \
      --save '' --appendonly no --logfile "" > "$WORK/redis.log" 2>&1 &
    rpid=$!; PIDS+=("$rpid")
    for _ in $(seq 50); do redis-cli -p "$rport" ping > /dev/null 2>&1 && break; sleep 0.1; done
    case "$transport" in
      tcp) layer="redis://127.0.0.1:$rport" ;;
      unix) layer="unix://$WORK/redis.sock" ;;
      *) echo "unknown transport $transport (tcp or unix)" >&2; exit 2 ;;
    esac
    # The environment, not --threads, so that builds from before the flag run too.
    SWITCHYARD_THREADS="$THREADS" "$bin" serve --layer "$layer" ${CAPACITY:+--capacity "$CAPACITY"} --port "$hport" \
      --max-connections 20000 --log warn ${EDGE_SERVE_FLAGS[@]+"${EDGE_SERVE_FLAGS[@]}"} \
      > "$WORK/serve.log" 2>&1 &
    spid=$!; PIDS+=("$spid")
    SWITCHYARD_THREADS="$THREADS" "$bin" worker --layer "$layer" ${CAPACITY:+--capacity "$CAPACITY"} \
      ${CONCURRENCY:+--concurrency "$CONCURRENCY"} \
      --log warn > "$WORK/worker.log" 2>&1 &
    wpid=$!; PIDS+=("$wpid")
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$hport/healthz" > /dev/null 2>&1 && break; sleep 0.1; done
    if [ -n "$BROADCAST" ]; then
      "$client" bench broadcast --url "ws://127.0.0.1:$hport/ws/relay/{room}/" -c "${BROADCAST%%:*}" \
        --rooms 1 --senders 1 --rate "${BROADCAST##*:}" -d 7 -n 20000000 --settle 1 -q \
        ${EDGE_CLIENT_FLAGS[@]+"${EDGE_CLIENT_FLAGS[@]}"} > "$WORK/bench.out" 2> "$WORK/bench.err" &
    else
      "$client" bench echo --url "ws://127.0.0.1:$hport/ws/echo/" -c "$CONNS" --in-flight 1 -d 7 \
        -n 20000000 -q ${EDGE_CLIENT_FLAGS[@]+"${EDGE_CLIENT_FLAGS[@]}"} \
        > "$WORK/bench.out" 2> "$WORK/bench.err" &
    fi
    bpid=$!
    sleep 2
    s0=$(ticks "$spid"); w0=$(ticks "$wpid"); r0=$(ticks "$rpid"); read -r st0 tt0 < <(steal_total)
    sleep 4
    s1=$(ticks "$spid"); w1=$(ticks "$wpid"); r1=$(ticks "$rpid"); read -r st1 tt1 < <(steal_total)
    wait "$bpid" || true
    python3 - "$round" "$bin ($transport, edge $edge)" "$((s1 - s0))" "$((w1 - w0))" "$((r1 - r0))" "$(getconf CLK_TCK)" \
      "$WORK/bench.out" "$((st1 - st0))" "$((tt1 - tt0))" <<'PY'
import json, sys
rnd, binary, s, w, r, hz, out, steal, total = sys.argv[1:]
lines = [l for l in open(out).read().splitlines() if l.startswith("{")]
if not lines:
    print(f"round {rnd} {binary}: no report"); sys.exit()
d = json.loads(lines[-1])
unit = "echo" if "echoes_per_s" in d else "delivery"
rate = d.get("echoes_per_s") or d.get("deliveries_per_s") or 0
lat = d.get("rtt_us") or d.get("latency_us") or {}
per = lambda t: int(t) * 1e6 / int(hz) / (rate * 4) if rate else float("nan")
cpu = d.get("client_cpu_s") or {}
client = (cpu.get("user", 0) + cpu.get("sys", 0)) * 1e6 / (rate * d["duration_s"]) if rate else float("nan")
print(f"round {rnd} {binary}: {rate:,.0f} {unit}/s, p50 {lat.get('p50')} µs, p99 {lat.get('p99')} µs, "
      f"lost {d['lost']}; CPU µs/{unit} serve {per(s):.1f} worker {per(w):.1f} redis {per(r):.1f} "
      f"client {client:.1f} (whole run); "
      f"steal {100 * int(steal) / max(1, int(total)):.0f} %")
PY
    cleanup
  done
  done
  done
done
