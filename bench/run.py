"""agentwatch benchmark (`make bench`, `make bench-quick`): cost and capacity of the monitor.

1. Overhead, side by side with the usual alternatives: a fork+exec loop, a non-blocking
   connect() loop and a getppid() loop (a control), all in C (bench/gen.c, compiled with
   gcc into a temp dir), timed under four configurations that alternate in every round:
   none (nothing loaded), agentwatch (`agentwatch run` started and stopped per round),
   auditd (Debian's audit daemon with an always,exit rule on execve, execveat and connect
   for every process) and bpftrace (a script printing one line per execve/execveat/connect
   to a file). Each loop runs R times per phase, the fastest is kept; each tool's figure is
   its ratio to the "none" phase of the same round (median and min-max over the rounds).
   Untracked: the loops run as ordinary processes (agentwatch must ignore them). Tracked:
   for agentwatch the loops run as an agent (`agentwatch exec --agent bench -- gen ...`);
   auditd and bpftrace trace every process, so their tracked figures are their untracked
   runs. Tools that are not installed (packaging/setup-bench.sh installs them) or fail to
   start are reported and left out; `--tools` picks a subset.
2. Throughput: gen.c runs as an agent (`agentwatch exec --agent bench -- gen connect RATE
   SECONDS ...`) and issues connects plus some fork+exec of /bin/true at stepped rates; the
   monitor's `status` before and after (once it has drained) gives events delivered and
   ring-buffer losses; /proc/PID/stat gives the monitor's CPU time.

The monitor runs from a copy of monitor/ and probes/ taken at start (hash in the results),
so edits to the tree during a run cannot mix two versions into one set of numbers.
Prints a table and writes bench/results.json. Needs root and BPF, like the monitor. Only
127.0.0.1 is contacted; every process started here is stopped by pid in `finally` (also on
SIGINT/SIGTERM/SIGHUP), and dies with the bench if the bench is killed (PR_SET_PDEATHSIG);
audit rules and settings are put back as found, by a guardian process if need be.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lib.auditd import AUDIT_RULE, AUDIT_TUNING, Auditd, AuditState
from lib.harness import (
    BENCH,
    Monitor,
    Sources,
    log,
)
from lib.load import Patience, compile_gen
from lib.machine import machine
from lib.overhead import TOOLS, overhead
from lib.report import goal_checks, report
from lib.throughput import throughput
from lib.tools import BPFTRACE_SCRIPT, Agentwatch, Bpftrace, Tool, tool_versions


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run (about 3 minutes on a quiet 2-CPU VM)")
    p.add_argument("--only", choices=("overhead", "throughput"), help="run one part only")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help="comma-separated tools compared against none in the overhead part "
                        f"(default: all of {','.join(TOOLS)} that are available)")
    p.add_argument("--rounds", "--pairs", dest="rounds", type=int,
                   help="alternated rounds (default 7, quick 3)")
    p.add_argument("--reps", type=int, help="runs of each loop per phase (default 3, quick 2)")
    p.add_argument("--rates", help="comma-separated throughput steps, events/s")
    p.add_argument("--step-seconds", type=float, help="seconds per step (default 10, quick 3)")
    p.add_argument("--exec-every", type=int, default=1000,
                   help="one fork+exec of /bin/true per this many connects (0: none)")
    p.add_argument("--workers", type=int, default=1, help="generator processes per step")
    p.add_argument("--ring-mib", type=int, default=8,
                   help="monitor ring buffer, MiB (8: the default config)")
    p.add_argument("--output", default=str(BENCH / "results.json"))
    args = p.parse_args()
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := [t for t in wanted if t not in TOOLS]:
        p.error(f"--tools: unknown {unknown}; choose from {','.join(TOOLS)}")
    if os.geteuid() != 0:
        print("bench: needs root (the monitor loads BPF probes)", file=sys.stderr)
        return 3
    if shutil.which("gcc") is None:
        print("bench: gcc is needed to build bench/gen.c", file=sys.stderr)
        return 3
    q = args.quick
    rounds = args.rounds or (3 if q else 7)
    reps = args.reps or (2 if q else 3)
    sizes = ({"exec": 500, "connect": 100_000, "sendto": 100_000, "getppid": 3_000_000} if q
             else {"exec": 2000, "connect": 300_000, "sendto": 300_000, "getppid": 10_000_000})
    rates = ([int(r) for r in args.rates.split(",")] if args.rates else
             [10_000, 50_000, 100_000, 200_000] if q else
             [10_000, 25_000, 50_000, 75_000, 100_000, 125_000, 150_000, 200_000, 300_000])
    seconds = args.step_seconds or (3.0 if q else 10.0)
    patience = Patience(wait_s=10, budget_s=120, tries=2) if q else \
        Patience(wait_s=60, budget_s=1800, tries=3)

    res: dict[str, Any] = {"machine": machine(), "params": {
        "quick": q, "rounds": rounds, "reps": reps, "loop_sizes": sizes, "rates": rates,
        "tools": wanted, "step_seconds": seconds, "exec_every": args.exec_every,
        "workers": args.workers, "patience": asdict(patience), "ring_buffer_mib": args.ring_mib}}
    res["machine"]["tool_versions"] = tool_versions()
    if res["machine"]["other_monitors"]:
        log(f"WARNING: other agentwatch monitors are running: {res['machine']['other_monitors']}")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM,
                                                       signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)  # so that `finally` unloads everything
    tmp = Path(tempfile.mkdtemp(prefix="agentwatch-bench-"))
    # A bound, never-listening socket reserves a port that refuses every connection.
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    mon: Monitor | None = None
    audit: AuditState | None = None
    tools: list[Tool] = []
    t_start = time.monotonic()
    try:
        src = Sources(tmp)
        res["machine"]["sources_sha256"] = src.sha256
        mon = Monitor(tmp, src, f"  ring_buffer_mib: {args.ring_mib}\n")
        closed.bind(("127.0.0.1", 0))
        port = int(closed.getsockname()[1])
        exe = compile_gen(tmp)
        if args.only in (None, "overhead"):
            audit = AuditState()
            every: dict[str, Tool] = {"agentwatch": Agentwatch(mon, 0.5),
                                      "auditd": Auditd(tmp, audit),
                                      "bpftrace": Bpftrace(tmp, port)}
            failed: dict[str, str] = {}
            for name in wanted:
                why = every[name].unavailable()
                if why:
                    failed[name] = why
                    log(f"{name}: NOT AVAILABLE, its column is left out: {why}")
                else:
                    tools.append(every[name])
            audit.begin()
            if audit.reason:
                log(f"audit: {audit.reason}")
            res["overhead"] = overhead(list(tools), failed, exe, port, sizes, rounds, reps,
                                       patience, src)
            o = res["overhead"]
            o["goals"] = goal_checks(o)
            o["audit_never_task_rule"] = audit.before is not None
            o["audit_state_before"] = audit.before
            o["auditd_rule"] = "auditctl " + " ".join(AUDIT_RULE)
            o["auditd_tuning"] = {k: v[1] for k, v in AUDIT_TUNING.items()}
            o["bpftrace_script"] = BPFTRACE_SCRIPT
        if args.only in (None, "throughput"):
            res["throughput"] = throughput(mon, exe, port, rates, seconds, args.exec_every,
                                           args.workers, patience)
        res["monitor_started"] = mon.started_line()
    except Exception:
        tail = mon.log_tail() if mon else ""
        if tail:
            log("monitor log tail:\n" + tail)
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second ^C must not cut the clean-up short
        for tool in tools:
            try:
                tool.shutdown()
            except Exception as e:  # noqa: BLE001 (clean up the rest regardless)
                log(f"WARNING: stopping {tool.name}: {e}")
        if mon is not None:
            mon.stop()
        if audit is not None:
            audit.restore()
        closed.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    res["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"\nraw samples: {args.output}  (run took {res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
