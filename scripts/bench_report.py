#!/usr/bin/env python3
"""Medians and tables for scripts/bench.sh's JSON lines (one line per scenario run).

  bench_report.py RESULTS.jsonl... [--machine FILE]  # Markdown report on stdout
  bench_report.py --rung-ok RESULTS.jsonl STACK RUN OFFERED
      exit 0 when that sustained-broadcast rung was clean: no loss (nor any other correctness
      failure) and >= 90 % of the offered deliveries/s delivered within the load window (a
      server that falls behind delivers less). The delivery p99 is reported beside it, not
      used: Django Channels' p99 for a 1,000-member room stays near 0.7 s even at 125
      deliveries/s, so a latency bound would leave it no rung at all.

Every figure is the median over runs, with (min-max) beside it.
"""
import json
import statistics
import sys


def load(path):
    """The records of a results file; a line cut short (a run killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                print(f"{path}:{n}: not a complete JSON line; skipped", file=sys.stderr)
    return records


def dig(obj, *keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def clean(rec):
    """No message lost, corrupted, duplicated or misrouted, no failed connection or request.

    Out-of-order deliveries are reported but not failures: the relay route is not
    strict-ordered (Channels' default), so two worker loops may relay one sender's consecutive
    messages in either order."""
    b = rec.get("bench")
    if not b:
        return False
    counters = ["lost", "corrupted", "duplicates", "misrouted", "failed"]
    if any(b.get(k) for k in counters):
        return False
    for k in ("errors", "connect_failures", "failures"):
        if sum((b.get(k) or {}).values()):
            return False
    if "status" in b and any(k != "200" for k in b["status"]):
        return False
    return True


def rung_clean(rec):
    b = rec.get("bench") or {}
    offered = rec["params"]["offered"]
    return bool(
        clean(rec)
        and (b.get("deliveries_per_s") or 0) >= 0.9 * offered
    )


def rung_ok(path, stack, run, offered):
    for rec in reversed(load(path)):
        if (rec["stack"], rec["scenario"], rec["run"]) == (stack, "sustained", int(run)) and \
                rec["params"].get("offered") == float(offered):
            return rung_clean(rec)
    return False


def fmt(v, digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{round(v):,}"


def summary(values, digits=0):
    """median (min–max) of the values that exist."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(min(vals), digits)}–{fmt(max(vals), digits)})"


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# What each scenario reports: (column title, function of one record).
def bench(*keys):
    return lambda r: dig(r.get("bench") or {}, *keys)


def idle_per_conn_kb(field):
    def per_conn(r):
        b = r.get("bench") or {}
        serve = r["procs"].get("serve")
        if not serve or not b.get("connected") or serve.get(field) is None:
            return None
        return (serve[field] - serve["rss_before_kb"]) * 1.024 / b["connected"]
    return per_conn


COLUMNS = {
    "echo1": [("echoes/s", bench("echoes_per_s")), ("RTT p50 µs", bench("rtt_us", "p50")),
              ("RTT p99 µs", bench("rtt_us", "p99")), ("lost", bench("lost"))],
    "echo1000": [("echoes/s", bench("echoes_per_s")), ("RTT p50 µs", bench("rtt_us", "p50")),
                 ("RTT p99 µs", bench("rtt_us", "p99")), ("lost", bench("lost"))],
    "bcast1k": [("deliveries/s", bench("deliveries_per_s")), ("p50 µs", bench("latency_us", "p50")),
                ("p99 µs", bench("latency_us", "p99")),
                ("last-member p99 µs", bench("last_member_latency_us", "p99")),
                ("lost", bench("lost")), ("out of order", bench("out_of_order"))],
    "bcast10k": [("members", bench("connections")), ("deliveries/s", bench("deliveries_per_s")),
                 ("p50 µs", bench("latency_us", "p50")), ("p99 µs", bench("latency_us", "p99")),
                 ("last-member p99 µs", bench("last_member_latency_us", "p99")),
                 ("lost", bench("lost")), ("out of order", bench("out_of_order"))],
    "idle": [("connections", bench("connected")), ("failed", bench("failed")),
             ("connects/s", bench("connects_per_s")),
             ("serve RSS before KB", lambda r: r["procs"]["serve"]["rss_before_kb"]),
             ("serve RSS held KB (median sample)", lambda r: r["procs"]["serve"].get("rss_median_kb")),
             ("KB per connection held", idle_per_conn_kb("rss_median_kb")),
             ("serve RSS peak KB", lambda r: r["procs"]["serve"]["rss_max_kb"]),
             ("KB per connection at peak", idle_per_conn_kb("rss_max_kb"))],
    "http": [("req/s", bench("requests_per_s")), ("p50 µs", bench("latency_us", "p50")),
             ("p99 µs", bench("latency_us", "p99")), ("errors", lambda r: sum((dig(r.get("bench") or {}, "errors") or {}).values()))],
}
COLUMNS["http128"] = COLUMNS["http256"] = COLUMNS["http"]
for relay in ("relay1000", "relay1000u", "rooms1000", "rooms1000u"):
    COLUMNS[relay] = COLUMNS["bcast1k"]
PROC_COLUMNS = ["serve", "worker", "daphne", "redis", "client"]


def messages(r):
    b = r.get("bench") or {}
    return b.get("received") or b.get("completed") or 0


ORDER = ["echo1", "echo1000", "bcast1k", "bcast10k", "sustained", "idle", "http", "http128", "http256",
         "relay1000", "relay1000u", "rooms1000", "rooms1000u"]


def sustained_best(records, stack):
    """Per run: the best clean rung (offered, measured deliveries/s, p99 µs), or None."""
    best = {}
    for r in records:
        if r["stack"] != stack or r["scenario"] != "sustained":
            continue
        if rung_clean(r):
            cur = best.get(r["run"])
            if cur is None or r["params"]["offered"] > cur[0]:
                best[r["run"]] = (r["params"]["offered"], r["bench"]["deliveries_per_s"],
                                  dig(r["bench"], "latency_us", "p99"), r)
        else:
            best.setdefault(r["run"], None)
    return best


def report(paths, machine):
    records = [r for p in paths for r in load(p)]
    out = []
    w = out.append
    w("# Switchyard benchmark suite (scripts/bench.sh)\n")
    if machine:
        with open(machine) as f:
            w("```\n" + f.read().rstrip() + "\n```\n")
    stacks = [s for s in ("switchyard", "layered", "tuned", "old", "dev", "bare", "django")
              if any(r["stack"] == s for r in records)]
    w("Every figure: median over runs (min–max). Latencies in µs.\n")
    for scen in ORDER:
        recs = [r for r in records if r["scenario"] == scen]
        if not recs:
            continue
        w(f"## {scen}\n")
        if scen == "sustained":
            w("| stack | best clean offered deliveries/s | measured deliveries/s | p99 µs | runs |")
            w("|---|---|---|---|---|")
            for s in stacks:
                best = sustained_best(records, s)
                if not best:
                    continue
                vals = [b for b in best.values()]
                w(f"| {s} | {summary([b[0] if b else 0 for b in vals])} | "
                  f"{summary([b[1] if b else 0 for b in vals])} | "
                  f"{summary([b[2] if b else None for b in vals])} | {len(vals)} |")
            w("")
            w("Rungs:\n")
            w("| stack | run | offered | deliveries/s | lost | out of order | p99 µs | clean | steal % |")
            w("|---|---|---|---|---|---|---|---|---|")
            for r in recs:
                b = r.get("bench") or {}
                w(f"| {r['stack']} | {r['run']} | {fmt(r['params']['offered'])} | "
                  f"{fmt(b.get('deliveries_per_s'))} | {fmt(b.get('lost'))} | {fmt(b.get('out_of_order'))} | "
                  f"{fmt(dig(b, 'latency_us', 'p99'))} | {'yes' if rung_clean(r) else 'no'} | "
                  f"{fmt(r.get('steal_pct'))} |")
            w("")
            continue
        cols = COLUMNS[scen]
        w("| stack | " + " | ".join(c for c, _ in cols) + " | clean runs | load1 | steal % |")
        w("|---|" + "---|" * (len(cols) + 3))
        for s in stacks:
            rs = [r for r in recs if r["stack"] == s]
            if not rs:
                continue
            cells = [summary([f(r) for r in rs], 1 if "KB per" in c else 0) for c, f in cols]
            oks = sum(1 for r in rs if clean(r))
            loads = [r["load1_before"] for r in rs]
            steals = [r["steal_pct"] for r in rs if r.get("steal_pct") is not None]
            steal = f"{min(steals):.0f}–{max(steals):.0f}" if steals else "–"
            w(f"| {s} | " + " | ".join(cells) + f" | {oks}/{len(rs)} | "
              f"{min(loads):.1f}–{max(loads):.1f} | {steal} |")
        w("")
    # Resources per scenario: CPU seconds and peak RSS of every process, medians.
    w("## Resources per scenario (median CPU seconds during the load / peak RSS MB)\n")
    w("| stack | scenario | process | CPU s | peak RSS MB |")
    w("|---|---|---|---|---|")
    for scen in ORDER:
        for s in stacks:
            rs = [r for r in records if r["scenario"] == scen and r["stack"] == s]
            if not rs:
                continue
            names = sorted({n for r in rs for n in r["procs"]},
                           key=lambda n: (n == "client", n))
            for n in names:
                cpu = [dig(r, "procs", n, "cpu_s") for r in rs]
                hwm = [dig(r, "procs", n, "hwm_kb") for r in rs]
                w(f"| {s} | {scen} | {n} | {summary(cpu, 2)} | "
                  f"{summary([h / 1024 if h else None for h in hwm], 1)} |")
    w("")
    # CPU per message: the figure that holds up on a shared box (anchors-performance §9).
    w("## CPU µs per message (median; echo: per echo, broadcast: per delivery, http: per request)\n")
    w("| stack | scenario | " + " | ".join(PROC_COLUMNS) + " | all |")
    w("|---|---|" + "---|" * (len(PROC_COLUMNS) + 1))
    for scen in ORDER:
        for s in stacks:
            rs = [r for r in records if r["scenario"] == scen and r["stack"] == s
                  and messages(r)]
            if not rs or scen == "idle":
                continue
            cells = []
            for n in PROC_COLUMNS + ["all"]:
                vals = []
                for r in rs:
                    if n == "all":
                        cpu = sum(p["cpu_s"] or 0 for p in r["procs"].values())
                    elif n == "worker":
                        ws = [p["cpu_s"] or 0 for k, p in r["procs"].items() if k.startswith("worker")]
                        cpu = sum(ws) if ws else None
                    else:
                        cpu = dig(r, "procs", n, "cpu_s")
                    vals.append(None if cpu is None else cpu * 1e6 / messages(r))
                cells.append(summary(vals, 1))
            w(f"| {s} | {scen} | " + " | ".join(cells) + " |")
    w("")
    # Ratios, from medians of the same run series.
    def med(stack, scen, f):
        return median([f(r) for r in records if r["stack"] == stack and r["scenario"] == scen])

    def sustained_median(stack):
        return median([b[1] if b else 0 for b in sustained_best(records, stack).values()])

    rows = [
        ("echo throughput, 1,000 conns (echoes/s)", "echo1000", bench("echoes_per_s"), True),
        ("echo RTT p99, 1,000 conns (µs)", "echo1000", bench("rtt_us", "p99"), False),
        ("echo RTT p50, 1 conn (µs)", "echo1", bench("rtt_us", "p50"), False),
        ("echo RTT p99, 1 conn (µs)", "echo1", bench("rtt_us", "p99"), False),
        ("broadcast 1k room, p99 (µs)", "bcast1k", bench("latency_us", "p99"), False),
        ("broadcast 1k room, deliveries/s at 50k offered", "bcast1k", bench("deliveries_per_s"), True),
        ("broadcast 10k room, p99 (µs)", "bcast10k", bench("latency_us", "p99"), False),
        ("HTTP req/s, 64 conns", "http", bench("requests_per_s"), True),
        ("HTTP p99, 64 conns (µs)", "http", bench("latency_us", "p99"), False),
        ("HTTP req/s, 128 conns", "http128", bench("requests_per_s"), True),
        ("HTTP p99, 128 conns (µs)", "http128", bench("latency_us", "p99"), False),
        ("HTTP req/s, 256 conns", "http256", bench("requests_per_s"), True),
        ("HTTP p99, 256 conns (µs)", "http256", bench("latency_us", "p99"), False),
    ]
    if "django" in stacks:
        w("## Switchyard vs Django Channels 4 (same series)\n")
        w("| figure | Switchyard | Django Channels 4 | ratio |")
        w("|---|---|---|---|")
        for title, scen, f, higher in rows:
            a, b = med("switchyard", scen, f), med("django", scen, f)
            ratio = "–"
            if a and b:
                ratio = f"{a / b:,.1f}×" if higher else f"{b / a:,.1f}× lower"
            w(f"| {title} | {fmt(a)} | {fmt(b)} | {ratio} |")
        sa, sb = sustained_median("switchyard"), sustained_median("django")
        if sa is not None and sb is not None:
            ratio = f"{sa / sb:,.1f}×" if sb else "–"
            w(f"| sustained broadcast deliveries/s, zero loss (1,000-member room) | {fmt(sa)} | {fmt(sb)} | {ratio} |")
        w("")
    if "bare" in stacks:
        # What the machine allows at all (no layer, no worker) beside Switchyard through Redis
        # and, when measured, `switchyard dev` (in-memory layer): share of the floor reached.
        others = [s for s in ("switchyard", "dev") if s in stacks]
        w("## Against the floor: the same loads on serve's stack without a layer (same series)\n")
        w("| figure | " + " | ".join(others) + " | bare (floor) | "
          + " | ".join(f"{s} vs floor" for s in others) + " |")
        w("|---|" + "---|" * (2 * len(others) + 1))

        def versus(a, floor, higher):
            if not a or not floor:
                return "–"
            return f"{a / floor:,.2f}× the floor" if higher else f"{a / floor:,.1f}× the floor"

        for title, scen, f, higher in rows:
            vals = [med(s, scen, f) for s in others]
            floor = med("bare", scen, f)
            if floor is None and not any(vals):
                continue
            w(f"| {title} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(floor)} | "
              + " | ".join(versus(v, floor, higher) for v in vals) + " |")
        vals = [sustained_median(s) for s in others]
        floor = sustained_median("bare")
        if floor is not None or any(vals):
            w("| sustained broadcast deliveries/s, zero loss (1,000-member room) | "
              + " | ".join(fmt(v) for v in vals) + f" | {fmt(floor)} | "
              + " | ".join(versus(v, floor, True) for v in vals) + " |")
        w("")
    return "\n".join(out)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--rung-ok":
        _, _, path, stack, run, offered = sys.argv
        return 0 if rung_ok(path, stack, run, offered) else 1
    args = sys.argv[1:]
    machine = None
    if "--machine" in args:
        i = args.index("--machine")
        machine = args[i + 1]
        del args[i:i + 2]
    print(report(args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
