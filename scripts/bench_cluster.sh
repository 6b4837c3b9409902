#!/usr/bin/env bash
# Redis Cluster (3 masters) vs one Redis, same series, same loads, with each Redis process's CPU.
#
# Every run r = 1..RUNS measures both topologies, the one going first alternating by run; every
# scenario gets a fresh stack on 127.0.0.1 only:
#   single:  one redis-server (--save '' --appendonly no, free port), `switchyard serve` and
#            WORKERS `switchyard worker` with the binary's defaults on redis://127.0.0.1:P/0;
#   cluster: three redis-server (--cluster-enabled yes, no persistence, config files in a temp
#            dir), `redis-cli --cluster create ... --cluster-replicas 0`, cluster_state:ok on
#            every node, then the same serve + workers on redis+cluster://P1,P2,P3.
# Scenarios (as in scripts/bench.sh, -d DURATION each):
#   echo1000  `bench echo -c 1000 --in-flight 1` on /ws/echo/
#   bcast1k   `bench broadcast -c 1000 --rooms 1 --senders 1 --rate 50` on /ws/relay/{room}/
#   rooms100  `bench broadcast -c 1000 --rooms 100 --senders 100 --rate 5` (100 rooms of 10:
#             5,000 deliveries/s): where the keys and commands of many rooms land
#   sustained a short ladder of offered deliveries/s into one 1,000-member room (bench.sh's
#             rungs, at most SUSTAINED_STEPS, from SUSTAINED_START), best clean rung per run
# Per scenario: scripts/bench_measure.py records the bench JSON and the CPU seconds
# (utime+stime from /proc/PID/stat, before/after) of serve, each worker and EACH redis-server;
# besides, per Redis node: INFO commandstats (after CONFIG RESETSTAT once the stack is ready),
# DBSIZE and the keys by kind (SCAN) in the middle of the load and at its end.
# At the end a Markdown summary (medians and ranges) is printed and written under OUT_DIR.
# Every process started here is killed on exit (failure and Ctrl-C included); the whole script
# stops after MAX_SECONDS, every client after its own timeout.
#
#   scripts/bench_cluster.sh                       # 3 runs, ~8 min on 2 cores
#   RUNS=1 DURATION=5 scripts/bench_cluster.sh     # a quick look
#   SWITCHYARD_BIN=/tmp/switchyard.cluster SCENARIOS="echo1000 rooms100" scripts/bench_cluster.sh
#
# Environment: RUNS (3), DURATION (8 s), WORKERS (2), SCENARIOS ("echo1000 bcast1k rooms100
# sustained"), SUSTAINED_START (256000), SUSTAINED_STEPS (3), MAX_SECONDS (1800),
# OUT_DIR (target/bench-results), SWITCHYARD_BIN (target/release/switchyard, not rebuilt).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${RUNS:-3}"
DURATION="${DURATION:-8}"
WORKERS="${WORKERS:-2}"
SCENARIOS="${SCENARIOS:-echo1000 bcast1k rooms100 sustained}"
SUSTAINED_START="${SUSTAINED_START:-256000}"
SUSTAINED_STEPS="${SUSTAINED_STEPS:-3}"
MAX_SECONDS="${MAX_SECONDS:-1800}"
OUT_DIR="${OUT_DIR:-target/bench-results}"
BIN="${SWITCHYARD_BIN:-target/release/switchyard}"
case "${1:-}" in -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release -p switchyard-workers)" >&2; exit 2; }
command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
  || { echo "redis-server and redis-cli are needed" >&2; exit 2; }

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/cluster-$STAMP.jsonl"   # one line per scenario run (bench_measure.py)
NODES="$OUT_DIR/cluster-$STAMP-nodes.jsonl" # per scenario run: each Redis node's stats
LOGS="$OUT_DIR/cluster-$STAMP-logs"
mkdir -p "$LOGS"
TMP="$(mktemp -d /tmp/bench-cluster.XXXXXX)"

PIDS=()
WATCHDOG=""
cleanup() {
  local pid i
  # Newest first: serve and workers stop before Redis goes (no reconnect noise in their logs).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
on_exit() {
  cleanup
  if [ -n "$WATCHDOG" ]; then
    local sleeper
    sleeper="$(pgrep -P "$WATCHDOG" || true)"   # its sleep, by its parent's id
    kill "$WATCHDOG" 2>/dev/null || true; wait "$WATCHDOG" 2>/dev/null || true
    if [ -n "$sleeper" ]; then kill $sleeper 2>/dev/null || true; fi
  fi
  rm -rf "$TMP"
}
trap on_exit EXIT
trap 'exit 130' INT TERM
# The hard bound on the whole series: TERM to this shell, whose trap kills everything.
( sleep "$MAX_SECONDS"; echo "[bench-cluster] $MAX_SECONDS s limit reached; stopping" >&2; kill -TERM $$ ) &
WATCHDOG=$!

BENCH_LOG_NAME=bench-cluster
# log, free_port, wait_for and the stack's start-up, as scripts/bench.sh starts it.
source scripts/bench_common.sh
cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

REDIS_PORTS=()
STACK_PROCS=()
HTTP_PORT=""

start_single() {
  local tag="$1" port
  port="$(free_port)"
  start_redis_server redis1 "$port" "$LOGS/redis-$tag.log"
  REDIS_PORTS=("$port")
  wait_for redis-server 10 redis-cli -p "$port" ping
  LAYER="redis://127.0.0.1:$port/0"
}

start_cluster() {
  local tag="$1" i port bus dir="$TMP/$1" addrs=() urls=()
  mkdir -p "$dir"
  REDIS_PORTS=()
  for i in 1 2 3; do
    port="$(free_port)"; bus="$(free_port)"
    start_redis_server "redis$i" "$port" "$LOGS/redis$i-$tag.log" --cluster-enabled yes \
      --cluster-port "$bus" --cluster-config-file "$dir/nodes-$i.conf" \
      --dbfilename "node-$i.rdb" --dir "$dir"
    REDIS_PORTS+=("$port")
    addrs+=("127.0.0.1:$port"); urls+=("127.0.0.1:$port")
  done
  for port in "${REDIS_PORTS[@]}"; do wait_for "redis-server :$port" 10 redis-cli -p "$port" ping; done
  timeout 30 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes \
    > "$LOGS/cluster-create-$tag.log" 2>&1
  for port in "${REDIS_PORTS[@]}"; do wait_for "cluster_state:ok on :$port" 20 cluster_ok "$port"; done
  LAYER="redis+cluster://$(IFS=,; echo "${urls[*]}")"
}

start_stack() {
  local topo="$1" tag="$2"
  STACK_PROCS=()
  if [ "$topo" = single ]; then start_single "$tag"; else start_cluster "$tag"; fi
  HTTP_PORT="$(free_port)"
  start_serve "$tag" "$LAYER" serve
  start_workers "$tag" "$LAYER" worker
  wait_serving serve workers
}

# Keys of one node by kind: total, groups (asgi:group:*), channels and inboxes, the rest.
key_kinds() {
  local port="$1" dbsize
  dbsize="$(redis-cli -p "$port" DBSIZE 2>/dev/null || echo -1)"
  { timeout 10 redis-cli -p "$port" --scan 2>/dev/null || true; } | awk -v d="$dbsize" '
    /^asgi:group:/ {g++; next} /^asgi:/ {o++; next} /^asgi/ {c++; next} {o++}
    END {printf "{\"dbsize\": %d, \"groups\": %d, \"channels\": %d, \"other\": %d}", d, g, c, o}'
}
snapshot() {  # snapshot FILE: one JSON object per node, by port order
  local out="$1" port sep=""
  { printf '['
    for port in "${REDIS_PORTS[@]}"; do printf '%s' "$sep"; key_kinds "$port"; sep=", "; done
    printf ']\n'; } > "$out"
}

# measure TOPO SCENARIO RUN [--param K=V ...] -- BENCH-ARGS (with @PORT@)
measure() {
  local topo="$1" name="$2" run="$3" tag="$1-$2-$3"; shift 3
  local params=() procs=() bench=() p port i
  while [ "$1" != -- ]; do params+=("$1" "$2"); shift 2; done
  shift
  if [ "${#params[@]}" -gt 0 ]; then tag="$tag-${params[1]#*=}"; fi
  log "$topo $name run $run ${params[*]:-} (load $(cut -d' ' -f1 /proc/loadavg))"
  if ! start_stack "$topo" "$tag"; then
    log "  -> the $topo stack did not start; skipped (logs in $LOGS)"; cleanup; return 0
  fi
  # @PORT@ in the bench arguments: the stack's HTTP port, known once it started.
  for p in "$@"; do bench+=("${p//@PORT@/$HTTP_PORT}"); done
  for p in "${STACK_PROCS[@]}"; do procs+=(--proc "$p"); done
  for port in "${REDIS_PORTS[@]}"; do redis-cli -p "$port" CONFIG RESETSTAT >/dev/null; done
  # Keys in the middle of the load window (connects take ~1-2 s before it).
  ( sleep "$(python3 -c "print(2 + $DURATION / 2)")"; snapshot "$TMP/mid-$tag.json" ) &
  local sampler=$!
  PIDS+=("$sampler")
  local verdict
  verdict="$(python3 scripts/bench_measure.py --out "$RESULTS" --stack "$topo" --scenario "$name" \
    --run "$run" "${params[@]}" "${procs[@]}" --timeout 120 --log "$LOGS/client-$tag.log" \
    -- "$BIN" --threads 1 bench "${bench[@]}" -q || echo '{"rc": -1, "ok": null}')"
  wait "$sampler" 2>/dev/null || true
  snapshot "$TMP/end-$tag.json"
  i=0
  for port in "${REDIS_PORTS[@]}"; do
    i=$((i + 1))
    redis-cli -p "$port" INFO commandstats > "$LOGS/commandstats-$tag-node$i.txt" 2>/dev/null || true
  done
  python3 - "$NODES" "$topo" "$name" "$run" "$TMP/mid-$tag.json" "$TMP/end-$tag.json" \
    "${params[@]}" -- "${REDIS_PORTS[@]}" <<'EOF'
import json, sys, os
out, topo, name, run, mid, end = sys.argv[1:7]
rest = sys.argv[7:]
sep = rest.index("--")
params = {}
for i in range(0, sep, 2):
    k, v = rest[i + 1].split("=", 1)
    params[k] = json.loads(v)
ports = rest[sep + 1:]
logs = os.path.dirname(out) + "/" + os.path.basename(out).replace("-nodes.jsonl", "-logs")
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return [None] * len(ports)
mids, ends = load(mid), load(end)
nodes = []
tag = f"{topo}-{name}-{run}" + (f"-{list(params.values())[0]}" if params else "")
for i, port in enumerate(ports, 1):
    calls = usec = 0
    top = {}
    try:
        with open(f"{logs}/commandstats-{tag}-node{i}.txt") as f:
            for line in f:
                if not line.startswith("cmdstat_"):
                    continue
                cmd, stats = line.strip().split(":", 1)
                kv = dict(x.split("=", 1) for x in stats.split(","))
                calls += int(kv["calls"]); usec += int(kv["usec"])
                top[cmd[8:]] = int(kv["calls"])
    except OSError:
        pass
    nodes.append({"port": int(port), "calls": calls, "usec": usec,
                  "top": dict(sorted(top.items(), key=lambda x: -x[1])[:6]),
                  "mid": mids[i - 1] if i - 1 < len(mids) else None,
                  "end": ends[i - 1] if i - 1 < len(ends) else None})
with open(out, "a") as f:
    f.write(json.dumps({"stack": topo, "scenario": name, "run": int(run), "params": params,
                        "nodes": nodes}) + "\n")
EOF
  # The logs up to here (the teardown's reconnect warnings left out of the summary).
  for p in "$LOGS"/serve-"$tag".log "$LOGS"/worker*-"$tag".log; do
    sed 's/\x1b\[[0-9;]*m//g' "$p" > "$p.during" 2>/dev/null || true
  done
  log "  -> $verdict"
  cleanup
}

run_scenario() {
  local topo="$1" name="$2" run="$3" d="$DURATION"
  case "$name" in
    echo1000)
      measure "$topo" echo1000 "$run" -- echo --url "ws://127.0.0.1:@PORT@/ws/echo/" \
        -c 1000 --in-flight 1 -d "$d" -n 20000000 --connect-concurrency 256 ;;
    bcast1k)
      measure "$topo" bcast1k "$run" -- broadcast --url "ws://127.0.0.1:@PORT@/ws/relay/{room}/" \
        -c 1000 --rooms 1 --senders 1 --rate 50 -d "$d" -n 100000 --settle 1 --connect-concurrency 256 ;;
    rooms100)
      measure "$topo" rooms100 "$run" -- broadcast --url "ws://127.0.0.1:@PORT@/ws/relay/{room}/" \
        -c 1000 --rooms 100 --senders 100 --rate 5 -d "$d" -n 1000000 --settle 1 --connect-concurrency 256 ;;
    sustained)
      # bench.sh's ladder and its clean-rung rule (scripts/bench_report.py --rung-ok), shortened.
      local i=0
      while [ "${SUSTAINED_LADDER[$i]}" != "$SUSTAINED_START" ]; do i=$((i + 1)); done
      sustained_ladder "$topo" "$run" "$i" "$SUSTAINED_STEPS" 256 measure "$topo" sustained "$run" ;;
    *) echo "unknown scenario $name" >&2; exit 2 ;;
  esac
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc); $(lscpu | grep 'Model name' | sed 's/  */ /g')"
  echo "redis: $(redis-server --version)"
  echo "binary: $BIN ($(sha256sum "$BIN" | cut -c1-12)); git HEAD $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "runs: $RUNS; duration: ${DURATION}s; workers: $WORKERS; scenarios: $SCENARIOS"
  echo "uptime at start: $(uptime)"
} > "$OUT_DIR/cluster-$STAMP-machine.txt"
cat "$OUT_DIR/cluster-$STAMP-machine.txt" >&2

for run in $(seq 1 "$RUNS"); do
  if [ $((run % 2)) = 1 ]; then TOPOS=(single cluster); else TOPOS=(cluster single); fi
  log "run $run (${TOPOS[*]}): $(uptime)"
  for name in $SCENARIOS; do
    for topo in "${TOPOS[@]}"; do run_scenario "$topo" "$name" "$run"; done
  done
done
echo "uptime at end: $(uptime)" >> "$OUT_DIR/cluster-$STAMP-machine.txt"
echo "date at end: $(date -u +%FT%TZ)" >> "$OUT_DIR/cluster-$STAMP-machine.txt"

python3 - "$RESULTS" "$NODES" "$OUT_DIR/cluster-$STAMP-machine.txt" "$LOGS" > "$OUT_DIR/cluster-$STAMP.md" <<'EOF'
import glob, json, os, statistics as st, sys
results, nodes_path, machine, logs = sys.argv[1:5]
recs = [json.loads(l) for l in open(results) if l.strip()]
nodes = {}
for l in open(nodes_path):
    if l.strip():
        n = json.loads(l)
        nodes[(n["stack"], n["scenario"], n["run"], json.dumps(n["params"], sort_keys=True))] = n["nodes"]
def key(r):
    return (r["stack"], r["scenario"], r["run"], json.dumps(r["params"], sort_keys=True))
def bad(b):
    if not b:
        return True
    if any(b.get(k) for k in ("lost", "corrupted", "duplicates", "misrouted", "failed")):
        return True
    return any(sum((b.get(k) or {}).values()) for k in ("errors", "connect_failures", "failures")
               if isinstance(b.get(k), dict))
def summ(vals, d=0):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    f = lambda v: f"{v:,.{d}f}"
    m = st.median(vals)
    return f(m) if len(vals) == 1 else f"{f(m)} ({f(min(vals))}–{f(max(vals))})"
def row(r):
    b = r.get("bench") or {}
    msgs = b.get("received") or 0
    rate = b.get("echoes_per_s") or b.get("deliveries_per_s")
    p99 = (b.get("rtt_us") or b.get("latency_us") or {}).get("p99")
    procs = r["procs"]
    redis = sorted((k for k in procs if k.startswith("redis")), key=lambda k: int(k[5:]))
    us = lambda s: None if not msgs or s is None else s * 1e6 / msgs
    rcpu = [procs[k]["cpu_s"] for k in redis]
    return {"rate": rate, "p99": p99, "msgs": msgs, "lost": b.get("lost"), "ok": b.get("ok"),
            "redis_us": us(sum(c or 0 for c in rcpu)), "node_us": [us(c) for c in rcpu],
            "serve_us": us(procs.get("serve", {}).get("cpu_s")),
            "workers_us": us(sum(v.get("cpu_s") or 0 for k, v in procs.items() if k.startswith("worker"))),
            "redis_cpu_s": sum(c or 0 for c in rcpu), "wall": r["wall_s"], "steal": r.get("steal_pct"),
            "bad": bad(b), "problems": b.get("problems"), "load": r.get("load1_before")}
print("# Redis Cluster (3 masters) vs one Redis (scripts/bench_cluster.sh)\n")
print("```\n" + open(machine).read().rstrip() + "\n```\n")
print("Median over runs (min–max). CPU in µs per echo / delivery received by the client; Redis = "
      "the sum over its processes, per node by port order (the slots a node holds differ per run).\n")
# sustained: per run the best clean rung's record only.
chosen = []
best = {}
for r in recs:
    if r["scenario"] != "sustained":
        chosen.append(r); continue
    b = r.get("bench") or {}
    clean = not bad(b) and (b.get("deliveries_per_s") or 0) >= 0.9 * r["params"]["offered"]
    k = (r["stack"], r["run"])
    if clean and (k not in best or r["params"]["offered"] > best[k]["params"]["offered"]):
        best[k] = r
chosen += best.values()
print("| topology | scenario | runs | msgs/s | p99 µs | Redis CPU µs/msg (total) | per node | serve µs/msg | workers µs/msg | not clean |")
print("|---|---|---|---|---|---|---|---|---|---|")
for scen in ("echo1000", "bcast1k", "rooms100", "sustained"):
    for topo in ("single", "cluster"):
        rs = [row(r) for r in chosen if r["stack"] == topo and r["scenario"] == scen]
        if not rs:
            continue
        n = max(len(x["node_us"]) for x in rs)
        per_node = " / ".join(summ([x["node_us"][i] for x in rs if i < len(x["node_us"])], 2) for i in range(n))
        label = scen
        if scen == "sustained":
            label = "sustained (best clean rung: " + ", ".join(
                str(r["params"]["offered"]) for r in sorted(best.values(), key=lambda r: r["run"])
                if r["stack"] == topo) + ")"
        print(f"| {topo} | {label} | {len(rs)} | {summ([x['rate'] for x in rs])} | {summ([x['p99'] for x in rs])} | "
              f"{summ([x['redis_us'] for x in rs], 2)} | {per_node if n > 1 else '–'} | "
              f"{summ([x['serve_us'] for x in rs], 1)} | {summ([x['workers_us'] for x in rs], 1)} | "
              f"{sum(x['bad'] for x in rs)} |")
print("\nSingle Redis limit = 1 core ÷ Redis CPU per msg (median): ", end="")
lim = []
for scen in ("echo1000", "bcast1k", "rooms100"):
    rs = [row(r) for r in chosen if r["stack"] == "single" and r["scenario"] == scen]
    v = st.median([x["redis_us"] for x in rs if x["redis_us"]]) if rs else None
    if v:
        lim.append(f"{scen} {1e6 / v:,.0f}/s ({v:.2f} µs)")
print("; ".join(lim) + ".\n")
print("## Per node: command calls and keys (cluster)\n")
print("| scenario | run | calls per node (share) | Redis CPU s per node | keys mid-load per node (groups/channels/other) | keys at end |")
print("|---|---|---|---|---|---|")
for r in sorted((r for r in recs if r["stack"] == "cluster"), key=lambda r: (r["scenario"], r["run"])):
    ns = nodes.get(key(r))
    if not ns:
        continue
    tot = sum(n["calls"] for n in ns) or 1
    redis = sorted((k for k in r["procs"] if k.startswith("redis")), key=lambda k: int(k[5:]))
    kk = lambda s: "–" if not s else f"{s['dbsize']} ({s['groups']}/{s['channels']}/{s['other']})"
    label = r["scenario"] + (f" {r['params']['offered']}" if r["params"] else "")
    print(f"| {label} | {r['run']} | " + " / ".join(f"{n['calls']:,} ({100 * n['calls'] / tot:.0f} %)" for n in ns)
          + " | " + " / ".join(str(r["procs"][k]["cpu_s"]) for k in redis)
          + " | " + " / ".join(kk(n["mid"]) for n in ns) + " | " + " / ".join(kk(n["end"]) for n in ns) + " |")
print("\nTop commands per node (cluster, rooms100 and echo1000, run 1):\n")
for r in recs:
    if r["stack"] == "cluster" and r["run"] == 1 and r["scenario"] in ("rooms100", "echo1000"):
        for i, n in enumerate(nodes.get(key(r)) or [], 1):
            print(f"- {r['scenario']} node{i} :{n['port']}: {n['top']}")
print("\n## Every scenario run\n")
print("| topology | scenario | run | offered | msgs/s | p99 µs | lost | ok | problems | Redis CPU s | wall s | load1 | steal % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in recs:
    x = row(r)
    print(f"| {r['stack']} | {r['scenario']} | {r['run']} | {r['params'].get('offered', '')} | "
          f"{x['rate'] or 0:,.0f} | {x['p99']} | {x['lost']} | {x['ok']} | {x['problems'] or ''} | "
          f"{x['redis_cpu_s']:.2f} | {x['wall']} | {x['load']} | {x['steal']} |")
print("\n## Warnings and errors of serve and workers up to the end of each scenario\n")
print("(teardown left out; the startup line and the workers' persistence-off warning not counted)\n")
for p in sorted(glob.glob(f"{logs}/serve-*.during") + glob.glob(f"{logs}/worker*-*.during")):
    lines = [l.rstrip() for l in open(p, errors="replace")
             if (" WARN " in l or " ERROR " in l) and "persistence off" not in l]
    if lines:
        print(f"- {os.path.basename(p)[:-7]}: {len(lines)}, first: `{lines[0][:220]}`")
EOF
cat "$OUT_DIR/cluster-$STAMP.md"
log "results: $RESULTS, $NODES, $OUT_DIR/cluster-$STAMP.md, logs in $LOGS"
