#!/usr/bin/env bash
# Side-by-side A/B of two or more builds of the binary on the echo load, interleaved so that each
# sees the same machine: for every round and every binary it starts a fresh redis-server (free
# port, no persistence), `switchyard serve` and one `switchyard worker` on 127.0.0.1, runs
# `switchyard bench echo` for 7 s, and reads each process's CPU ticks from /proc between seconds
# 2 and 6 of the load. It prints one line per run: echoes/s, RTT p50, and CPU µs per echo of
# serve, worker and Redis (the steadier figure on a shared machine). Everything it starts is
# killed on exit.
#
#   scripts/bench_ab.sh /tmp/switchyard.before target/release/switchyard
#   scripts/bench_ab.sh --rounds 5 --conns 1 --threads 0 A B
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3
CONNS=1000
THREADS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --conns) CONNS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --*) echo "unknown flag $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--rounds N] [--conns C] [--threads T] BIN..." >&2; exit 2; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    rport="$(free_port)"; hport="$(free_port)"
    redis-server --bind 127.0.0.1 --port "$rport" --save '' --appendonly no --logfile "" \
      > "$WORK/redis.log" 2>&1 &
    rpid=$!; PIDS+=("$rpid")
    for _ in $(seq 50); do redis-cli -p "$rport" ping > /dev/null 2>&1 && break; sleep 0.1; done
    layer="redis://127.0.0.1:$rport"
    # The environment, not --threads, so that builds from before the flag run too.
    SWITCHYARD_THREADS="$THREADS" "$bin" serve --layer "$layer" --capacity 10000 --port "$hport" \
      --max-connections 20000 --log warn > "$WORK/serve.log" 2>&1 &
    spid=$!; PIDS+=("$spid")
    SWITCHYARD_THREADS="$THREADS" "$bin" worker --layer "$layer" --capacity 10000 --concurrency 32 \
      --log warn > "$WORK/worker.log" 2>&1 &
    wpid=$!; PIDS+=("$wpid")
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$hport/healthz" > /dev/null 2>&1 && break; sleep 0.1; done
    "$bin" bench echo --url "ws://127.0.0.1:$hport/ws/echo/" -c "$CONNS" --in-flight 1 -d 7 \
      -n 20000000 -q > "$WORK/bench.out" 2> "$WORK/bench.err" &
    bpid=$!
    sleep 2
    s0=$(ticks "$spid"); w0=$(ticks "$wpid"); r0=$(ticks "$rpid")
    sleep 4
    s1=$(ticks "$spid"); w1=$(ticks "$wpid"); r1=$(ticks "$rpid")
    wait "$bpid" || true
    python3 - "$round" "$bin" "$((s1 - s0))" "$((w1 - w0))" "$((r1 - r0))" "$(getconf CLK_TCK)" \
      "$WORK/bench.out" <<'PY'
import json, sys
rnd, binary, s, w, r, hz, out = sys.argv[1:]
lines = [l for l in open(out).read().splitlines() if l.startswith("{")]
if not lines:
    print(f"round {rnd} {binary}: no report"); sys.exit()
d = json.loads(lines[-1])
rate = d["echoes_per_s"]
per = lambda t: int(t) * 1e6 / int(hz) / (rate * 4) if rate else float("nan")
print(f"round {rnd} {binary}: {rate:,.0f} echoes/s, p50 {d['rtt_us']['p50']} µs, lost {d['lost']}; "
      f"CPU µs/echo serve {per(s):.1f} worker {per(w):.1f} redis {per(r):.1f}")
PY
    cleanup
  done
done
