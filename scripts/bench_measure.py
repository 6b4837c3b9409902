#!/usr/bin/env python3
"""Runs one load-generator command and measures every process of the stack under test.

scripts/bench.sh calls this once per scenario and run. It reads each listed process's CPU
seconds (utime + stime from /proc/PID/stat) before and after the client runs, samples its
VmRSS every 0.25 s while the client runs, and reads its peak RSS (VmHWM from /proc/PID/status)
at the end; the stacks are started fresh for every scenario, so VmHWM is this scenario's peak.
The client's own CPU seconds and peak RSS come from wait4()'s rusage. The client's final JSON
line (`switchyard bench` prints one) and the measurements are appended to --out as one JSON
line.

  bench_measure.py --out FILE --stack NAME --scenario NAME --run K [--param K=V ...]
                   --proc NAME=PID [--proc ...] --log FILE -- CLIENT ARGS...
"""
import argparse
import json
import statistics
import os
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of pid in seconds, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it start past the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid, key):
    """A `key:  N kB` line of /proc/PID/status, in kB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_ticks():
    """(steal, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields)


def steal_percent(before, after):
    """Share of CPU time the hypervisor gave to other guests meanwhile: on a shared VM a run
    with high steal measures the neighbours as much as the code."""
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 1) if total > 0 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stack", required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--run", type=int, required=True)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--proc", action="append", default=[])
    ap.add_argument("--log", required=True)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("client", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    client = args.client[1:] if args.client[:1] == ["--"] else args.client
    procs = dict(p.split("=", 1) for p in args.proc)
    params = {}
    for p in args.param:
        k, v = p.split("=", 1)
        try:
            params[k] = json.loads(v)
        except ValueError:
            params[k] = v

    before = {n: (cpu_seconds(pid), status_kb(pid, "VmRSS")) for n, pid in procs.items()}
    rss_max = {n: b[1] or 0 for n, b in before.items()}
    rss_samples = {n: [] for n in procs}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            for n, pid in procs.items():
                rss = status_kb(pid, "VmRSS")
                if rss is None:
                    continue
                rss_samples[n].append(rss)
                if rss > rss_max[n]:
                    rss_max[n] = rss

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load_before = os.getloadavg()[0]
    steal_before = cpu_ticks()
    started = time.monotonic()
    with open(args.log, "ab") as log:
        child = subprocess.Popen(client, stdout=subprocess.PIPE, stderr=log)
        out = b""
        timer = threading.Timer(args.timeout, child.kill)
        timer.start()
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        log.write(out)
    wall = time.monotonic() - started
    steal_after = cpu_ticks()
    stop.set()
    sampler.join()

    report = None
    for line in reversed(out.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except ValueError:
                pass

    measured = {}
    for n, pid in procs.items():
        cpu_after = cpu_seconds(pid)
        cpu_before = before[n][0]
        measured[n] = {
            "cpu_s": None if cpu_after is None or cpu_before is None
            else round(cpu_after - cpu_before, 3),
            "rss_before_kb": before[n][1],
            "rss_max_kb": rss_max[n],
            # The plateau of a connect-and-hold run (the ramp and the close are short next to
            # the hold), without the transients of handshakes and mass closes in the peak.
            "rss_median_kb": statistics.median(rss_samples[n]) if rss_samples[n] else None,
            "hwm_kb": status_kb(pid, "VmHWM"),
            "alive": cpu_after is not None,
        }
    measured["client"] = {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "hwm_kb": usage.ru_maxrss,
    }
    record = {
        "stack": args.stack,
        "scenario": args.scenario,
        "run": args.run,
        "params": params,
        "rc": child.returncode,
        "wall_s": round(wall, 2),
        "load1_before": round(load_before, 2),
        "load1_after": round(os.getloadavg()[0], 2),
        "steal_pct": steal_percent(steal_before, steal_after),
        "time": time.strftime("%H:%M:%S", time.gmtime()),
        "procs": measured,
        "bench": report,
        "command": client,
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    ok = report.get("ok") if report else None
    print(json.dumps({"rc": child.returncode, "ok": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
