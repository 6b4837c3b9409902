# Sourced, not run: the stack start-up that scripts/bench.sh and scripts/bench_cluster.sh share,
# so that both measure the same stack (a redis-server without persistence, `switchyard serve` and
# WORKERS `switchyard worker`, ready once /healthz answers and a page came back through a worker)
# and a change to how it starts reaches both series.
#
# The sourcing script sets, before calling these: BENCH_LOG_NAME (the log lines' prefix), BIN,
# LOGS, WORKERS, HTTP_PORT (for start_serve and wait_serving), and the arrays PIDS (every process
# its trap kills) and STACK_PROCS (NAME=PID, what bench_measure.py records).

log() { printf '[%s %s] %s\n' "$BENCH_LOG_NAME" "$(date -u +%H:%M:%S)" "$*" >&2; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to $2 seconds for a command ($3...) to succeed.
wait_for() {
  local what="$1" limit="$2"; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "$what not ready after ${limit}s"; return 1; fi
    sleep 0.1
  done
}

# start_redis_server NAME PORT LOGFILE [ARGS...]: a redis-server on 127.0.0.1:PORT with no
# persistence and room for every bench connection, recorded as NAME; returns without waiting for
# it (each caller waits for the PING its own way).
start_redis_server() {
  local name="$1" port="$2" logfile="$3"; shift 3
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --maxclients 10000 \
    --logfile "" "$@" > "$logfile" 2>&1 &
  PIDS+=($!)
  STACK_PROCS+=("$name=$!")
}

# start_serve TAG LAYER FLAGS...: `$BIN FLAGS...` as the interface server on HTTP_PORT.
start_serve() {
  local tag="$1" layer="$2"; shift 2
  # --log warn: no access log line per request (daphne runs with -v 0 likewise).
  "$BIN" "$@" --layer "$layer" --port "$HTTP_PORT" --max-connections 20000 --log warn \
    > "$LOGS/serve-$tag.log" 2>&1 &
  PIDS+=($!)
  STACK_PROCS+=("serve=$!")
}

# start_workers TAG LAYER FLAGS...: WORKERS processes `$BIN FLAGS...` on the layer.
start_workers() {
  local tag="$1" layer="$2" i; shift 2
  for i in $(seq 1 "$WORKERS"); do
    "$BIN" "$@" --layer "$layer" --log warn > "$LOGS/worker$i-$tag.log" 2>&1 &
    PIDS+=($!)
    STACK_PROCS+=("worker$i=$!")
  done
}

# wait_serving WHO THROUGH: fails (after logging which) unless the server on HTTP_PORT answers
# /healthz and then a page, which only comes back once a worker is consuming.
wait_serving() {
  wait_for "$1 /healthz" 20 curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz"
  wait_for "a page through the $2" 20 curl -fsS -m 2 "http://127.0.0.1:$HTTP_PORT/"
}

# Offered deliveries/s of the sustained scenario's rungs, in steps of ~1.4x.
SUSTAINED_LADDER=(1000 1400 2000 2800 4000 5600 8000 11000 16000 22000 32000 45000 64000 90000
  128000 180000 256000 360000 512000 720000 1000000)

# sustained_ladder STACK RUN FIRST STEPS CC MEASURE...: the sustained scenario's ladder over
# broadcasts into one 1,000-member room. From rung FIRST of SUSTAINED_LADDER it goes up while a
# rung is clean (scripts/bench_report.py --rung-ok) or down until one is, at most STEPS rungs;
# each rung is `MEASURE... --param offered=RATE -- broadcast ...` with one sender per 10,000
# deliveries/s (1 to 10) and CC handshakes at once.
sustained_ladder() {
  local stack="$1" run="$2" i="$3" max_steps="$4" cc="$5"; shift 5
  local dir=up steps=0 rate senders per_sender
  while [ "$i" -ge 0 ] && [ "$i" -lt "${#SUSTAINED_LADDER[@]}" ] && [ "$steps" -lt "$max_steps" ]; do
    rate="${SUSTAINED_LADDER[$i]}"
    senders=$(python3 -c "print(min(10, max(1, $rate // 10000)))")
    per_sender=$(python3 -c "print($rate / 1000 / $senders)")
    "$@" --param offered="$rate" -- broadcast \
      --url "ws://127.0.0.1:@PORT@/ws/relay/{room}/" -c 1000 --rooms 1 --senders "$senders" \
      --rate "$per_sender" -d "$DURATION" -n 4000000 --settle 1 --connect-concurrency "$cc"
    steps=$((steps + 1))
    if python3 scripts/bench_report.py --rung-ok "$RESULTS" "$stack" "$run" "$rate"; then
      [ "$dir" = down ] && break
      i=$((i + 1))
    else
      [ "$dir" = up ] && [ "$steps" -gt 1 ] && break
      dir=down
      i=$((i - 1))
    fi
  done
}
