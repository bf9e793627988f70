"""Scaling: how the monitor's costs grow with the number of tracked processes (10, 1,000,
10,000) and with the number of policy rules (10, 100, 1,000).

Processes: for each size N the script starts `agentwatch run` (default policy, a config with
`max_processes: 65536`, its own control socket and metrics port), starts N idle tracked
processes (agents started with `agentwatch exec` that fork sleeping children: a tiny C
forker; at most 1,000 per agent session, because the default policy's `fork-bomb` rule
kills a session above 2,000 live processes, so 10,000 = 10 sessions of 1,000), waits until
the monitor tracks them all, then measures with them present:
  * the per-operation time of bench/gen.c's `loop-connect` and `loop-exec` run as another
    agent (tracked: every connect, fork, exec and exit is an event), fastest of R runs;
  * the monitor's CPU per event while it takes those loops' events (µs of CPU per event);
  * the /metrics scrape time (median of S scrapes);
  * userspace kill latency (bench/kill_latency.py's `exec-kill`: `ssh -R` killed by the
    default policy's ssh rule, from argv, in Python), p50 and p99;
  * the monitor's RSS and idle CPU with the N processes present.
Rules: for each size K a generated policy of K rules (a mix of connect rules on distinct
networks and ports, exec rules on program names, exe globs and argv regexes, kill/deny/
alert), checked with `agentwatch policy check`; the kernel takes at most 64 rules, the rest
are judged in userspace (the table says how many went where). The monitor is started with
it and the same loops are measured.

Every figure is a ratio against the smallest size in the same round; sizes are alternated
(10, 1000, 10000, 10, 1000, 10000, ...) for R rounds and the table gives the median and the
min-max of the per-round ratios. Every phase starts a fresh monitor (the one in the tree is
copied to a temp dir first, as bench/run.py does) and stops it at the end. Before a phase
the script waits for a quiet host; a phase during which another process held BPF programs
or other work used more than 0.25 cores is run again (up to 3 tries; the disturbed
attempts stay in the JSON). Monitor CPU is read from /proc/PID/task/*/schedstat (ns), not
from 10 ms clock ticks.

Usage (needs root; wrap in the shared bench lock so runs do not overlap):
  flock /tmp/agentwatch-bench.lock .venv/bin/python bench/scale.py [--quick]
Writes bench/results-scale.json (every raw sample, machine, commit). Only 127.0.0.1 is
contacted; every process started here is stopped by pid (or its own process group) in
`finally`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import kill_latency
import scrape
from lib.harness import (
    BENCH,
    MAX_PROCESSES,
    AwMonitor,
    Sources,
    bpf_holders,
    idle_cpu_pct,
    log,
    tree_cpu,
)
from lib.load import BUSY_LIMIT, OtherLoad, compile_c, gen, loops, quiet_host
from lib.machine import machine, save_results
from lib.procs import Group, exit_on_signal, stop_groups, wait_for
from lib.scalereport import PROCESS_FIGURES, RULE_FIGURES, report, summarize

SESSION_MAX = 1000  # processes per idle agent session (default policy: fork-bomb above 2000)
KERNEL_MAX_RULES = 64  # rules the probes hold (monitor/model/events.py MAX_RULES); docs/policy.md
# the generated rule kinds that the kernel can enforce by itself (monitor/policy/kernel_tables.py:
# connect rules that deny/kill, exec rules on names alone that kill)
KERNEL_KINDS = frozenset({"connect-deny-net-port", "connect-kill-host", "exec-kill-name",
                          "connect-deny-ipv6-range", "connect-kill-cgnat-port",
                          "exec-kill-agent-name"})

FORKER_C = r"""
/* forker N: fork N children that sleep until killed (they die with the forker: PDEATHSIG),
 * print one line when all exist, then sleep too. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 0;
    pid_t parent = getpid();
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("forker: fork");
            return 2;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(0);
            for (;;)
                pause();
        }
    }
    printf("%ld\n", n);
    fflush(stdout);
    for (;;)
        pause();
}
"""


def tracked(status: dict[str, Any], prefix: str) -> int:
    return sum(s["processes"] for s in status["sessions"] if s["agent"].startswith(prefix))


# --- processes ---------------------------------------------------------------------------


class Env:
    """What every phase needs: sources copy, compiled programs, a closed loopback port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.src = Sources(tmp)
        self.gen = compile_c(tmp, "gen", (BENCH / "gen.c").read_text())
        self.forker = compile_c(tmp, "forker", FORKER_C)
        self.victim, self.ssh = kill_latency.build_victims(tmp)
        # A bound, never-listening socket reserves a port that refuses every connection.
        self.closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.closed.bind(("127.0.0.1", 0))
        self.port = int(self.closed.getsockname()[1])
        self.phases = 0

    def phase_dir(self, tag: str) -> Path:
        self.phases += 1
        return self.tmp / f"phase-{self.phases:02d}-{tag}"

    def close(self) -> None:
        self.closed.close()


def start_idle(env: Env, mon: AwMonitor, n: int, groups: list[Group],
               timeout: float = 180) -> None:
    """n tracked idle processes in ceil(n / SESSION_MAX) agent sessions, appended to
    `groups` as they start (so that the caller stops them whatever happens)."""
    sessions = math.ceil(n / SESSION_MAX)
    for i in range(sessions):
        size = n // sessions + (1 if i < n % sessions else 0)
        g = Group([*mon.exec_prefix(f"idle-{i:02d}"), str(env.forker), str(size - 1)],
                  env.src, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        groups.append(g)
        assert g.proc.stdout is not None
        if not g.proc.stdout.readline():
            raise RuntimeError(f"forker for session {i} exited with {g.proc.wait()}")
    wait_for(f"{n} tracked idle processes",
             lambda: tracked(mon.status(), "idle-") >= n, timeout)


def process_phase(env: Env, n: int, p: dict[str, Any]) -> dict[str, Any]:
    mon = AwMonitor(env.phase_dir(f"procs{n}"), env.src)
    groups: list[Group] = []
    waited = quiet_host(p["wait_s"])
    load = OtherLoad(lambda: [mon.pid] if mon.proc else [], tree_cpu)
    load.start()
    foreign: set[int] = set()
    try:
        start_s = mon.start()
        t0 = time.monotonic()
        start_idle(env, mon, n, groups)
        create_s = time.monotonic() - t0
        time.sleep(1.0)
        res: dict[str, Any] = {"size": n, "sessions": len(groups),
                               "monitor_start_s": round(start_s, 2),
                               "create_s": round(create_s, 2),
                               "idle_cpu_pct": idle_cpu_pct(mon, p["idle_s"]),
                               "memory_mib": mon.memory()}
        foreign.update(bpf_holders(mon.pid))
        res.update(loops(mon, env.gen, env.port, p["loop_sizes"], p["reps"]))
        res["scrape_ms_samples"] = [round(x, 3) for x in scrape.scrape_ms(mon.url, p["scrapes"])]
        res["scrape_ms"] = statistics.median(res["scrape_ms_samples"])
        watch = kill_latency.ExitWatch(mon.sock)
        try:
            k = kill_latency.measure(watch, mon.exec_prefix("bench"), str(env.victim),
                                     "exec-kill", p["kills"], str(env.ssh), env=env.src.env,
                                     cwd=env.src.dir)
        finally:
            watch.close()
        res["kill"] = k
        res["kill_p50_ms"], res["kill_p99_ms"] = k["p50_ms"], k["p99_ms"]
        status = mon.status()
        res["tracked_at_end"] = tracked(status, "idle-")
        if res["tracked_at_end"] != n:
            log(f"  WARNING: {res['tracked_at_end']} idle processes tracked at the end, not {n}")
        res["memory_mib_end"] = mon.memory()
        foreign.update(bpf_holders(mon.pid))
        # before the teardown: init reaping thousands of orphans is not other people's work
        res["other_load_cores"] = round(load.cores(), 2)
    finally:
        stop_groups(groups)
        mon.stop()
    res["foreign_bpf_pids"] = sorted(foreign)
    res["waited_for_quiet_s"] = round(waited, 1)
    res["disturbed"] = bool(foreign) or res["other_load_cores"] > BUSY_LIMIT
    return res


# --- rules -------------------------------------------------------------------------------


def make_policy(k: int) -> tuple[str, dict[str, int]]:
    """A policy of k rules cycling through ten realistic kinds; none of them matches the
    loops (loopback connects, /bin/true), so every event is judged against all of them.
    Returns the YAML and how many rules of each kind it has."""
    out = ["# generated by bench/scale.py", "mode: enforce", "rules:"]
    kinds: dict[str, int] = {}
    for i in range(k):
        a, b = (i >> 8) & 255, i & 255
        kind = i % 10
        if kind == 0:
            name, body = "connect-deny-net-port", (
                "event: connect\n    action: deny\n"
                f"    match: {{address: [10.{a}.{b}.0/24], port: [{1024 + i % 60000}]}}")
        elif kind == 1:
            name, body = "connect-kill-host", (
                f"event: connect\n    action: kill\n    match: {{address: [172.16.{a}.{b}]}}")
        elif kind == 2:
            name, body = "exec-kill-name", (
                f"event: exec\n    action: kill\n    match: {{name: [blocked-{i:05d}]}}")
        elif kind == 3:
            name, body = "exec-kill-argv", (
                "event: exec\n    action: kill\n"
                f"    match: {{argv: ['--upload-to=evil-{i:05d}\\.example']}}")
        elif kind == 4:
            name, body = "connect-deny-ipv6-range", (
                "event: connect\n    action: deny\n"
                f"    match: {{address: ['fd00:{i:x}::/48'], port: ['{2000 + i % 50000}-"
                f"{2009 + i % 50000}']}}")
        elif kind == 5:
            name, body = "exec-kill-exe-glob", (
                f"event: exec\n    action: kill\n    match: {{exe: ['/opt/blocked-{i:05d}/*']}}")
        elif kind == 6:
            name, body = "connect-alert-host-port", (
                "event: connect\n    action: alert\n"
                f"    match: {{address: [198.18.{a}.{b}], port: [{443 + i % 7}]}}")
        elif kind == 7:
            name, body = "exec-alert-argv", (
                "event: exec\n    action: alert\n"
                f"    match: {{argv: ['curl .*paste-{i:05d}\\.example']}}")
        elif kind == 8:
            name, body = "connect-kill-cgnat-port", (
                "event: connect\n    action: kill\n"
                f"    match: {{address: [100.64.{a}.{b}], port: [{3000 + i % 1000}]}}")
        else:
            name, body = "exec-kill-agent-name", (
                f"event: exec\n    action: kill-agent\n    match: {{name: [tool-{i:05d}]}}")
        kinds[name] = kinds.get(name, 0) + 1
        out.append(f"  - name: r{i:04d}-{name}\n    {body}")
    return "\n".join(out) + "\n", kinds


def check_policy(env: Env, path: Path) -> dict[str, Any]:
    """`agentwatch policy check FILE`: must pass; returns where the rules went."""
    res = subprocess.run(env.src.cmd("policy", "check", str(path)), capture_output=True,
                         text=True, env=env.src.env, cwd=env.src.dir, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"policy check {path} failed ({res.returncode}):\n"
                           f"{res.stdout}{res.stderr}")
    first = res.stdout.splitlines()[0]
    m = re.search(r"(\d+) rules \((\d+) enforced in the kernel\)", first)
    where = [line.split()[-1] for line in res.stdout.splitlines()[1:] if line.strip()]
    return {"summary": first, "rules": int(m.group(1)) if m else None,
            "kernel": where.count("kernel"), "userspace": where.count("userspace")}


def rule_phase(env: Env, k: int, policy: Path, p: dict[str, Any]) -> dict[str, Any]:
    mon = AwMonitor(env.phase_dir(f"rules{k}"), env.src, policy=policy)
    waited = quiet_host(p["wait_s"])
    load = OtherLoad(lambda: [mon.pid] if mon.proc else [], tree_cpu)
    load.start()
    foreign: set[int] = set()
    try:
        start_s = mon.start()
        time.sleep(1.0)
        status = mon.status()
        res: dict[str, Any] = {"size": k, "monitor_start_s": round(start_s, 2),
                               "policy_rules": status["policy"]["rules"],
                               "kernel_rules": len(status["policy"]["kernel_rules"]),
                               "idle_cpu_pct": idle_cpu_pct(mon, p["idle_s"]),
                               "memory_mib": mon.memory()}
        foreign.update(bpf_holders(mon.pid))
        res.update(loops(mon, env.gen, env.port, p["loop_sizes"], p["reps"]))
        res["memory_mib_end"] = mon.memory()
        res["verdicts"] = mon.status()["verdicts"]
        foreign.update(bpf_holders(mon.pid))
        res["other_load_cores"] = round(load.cores(), 2)
    finally:
        mon.stop()
    res["foreign_bpf_pids"] = sorted(foreign)
    res["waited_for_quiet_s"] = round(waited, 1)
    res["disturbed"] = bool(foreign) or res["other_load_cores"] > BUSY_LIMIT
    return res


def retried(phase: Callable[[], dict[str, Any]], tries: int) -> dict[str, Any]:
    """Run a phase; while it was disturbed by other work, run it again (up to `tries` in
    all). The last attempt counts; the disturbed ones are kept under disturbed_attempts."""
    attempts = [phase()]
    while attempts[-1]["disturbed"] and len(attempts) < tries:
        a = attempts[-1]
        log(f"  disturbed (other work {a['other_load_cores']} cores, other BPF users "
            f"{a['foreign_bpf_pids']}): again")
        attempts.append(phase())
    return {**attempts[-1], "disturbed_attempts": attempts[:-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, smaller loops, sizes 10/1000 processes and 10/100 rules")
    ap.add_argument("--only", choices=("processes", "rules"), help="run one part only")
    ap.add_argument("--rounds", type=int, help="alternated rounds (default 3, quick 1)")
    ap.add_argument("--process-sizes", help="comma-separated (default 10,1000,10000)")
    ap.add_argument("--rule-sizes", help="comma-separated (default 10,100,1000)")
    ap.add_argument("--output", default=str(BENCH / "results-scale.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("scale: needs root (the monitor loads BPF probes)", file=sys.stderr)
        return 3
    if shutil.which("gcc") is None:
        print("scale: gcc is needed to build the load programs", file=sys.stderr)
        return 3
    exit_on_signal()
    q = args.quick
    p: dict[str, Any] = {
        "quick": q, "rounds": args.rounds or (1 if q else 3),
        "loop_sizes": {"connect": 20_000, "exec": 300} if q else
                      {"connect": 100_000, "exec": 1000},
        "reps": 2 if q else 3, "scrapes": 20 if q else 30, "kills": 30 if q else 100,
        "idle_s": 2.0 if q else 5.0, "wait_s": 10.0 if q else 60.0, "tries": 2 if q else 3,
        "session_max": SESSION_MAX, "max_processes": MAX_PROCESSES}
    # ascending: the first (smallest) size is every ratio's base
    proc_sizes = (sorted(int(x) for x in args.process_sizes.split(",")) if args.process_sizes
                  else [10, 1000] if q else [10, 1000, 10_000])
    rule_sizes = (sorted(int(x) for x in args.rule_sizes.split(",")) if args.rule_sizes
                  else [10, 100] if q else [10, 100, 1000])
    res: dict[str, Any] = {"machine": machine(), "params": p}
    if res["machine"]["other_monitors"]:
        log(f"WARNING: other agentwatch monitors are running: {res['machine']['other_monitors']}")
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="agentwatch-scale-"))
    env: Env | None = None
    try:
        env = Env(tmp)
        res["machine"]["sources_sha256"] = env.src.sha256
        # warm-up (discarded, no monitor): page cache, binaries, so round 1's first phase
        # (always the smallest size, every ratio's base) does not pay for a cold start
        gen(env.gen, "loop-exec", 200, src=env.src)
        gen(env.gen, "loop-connect", 10_000, env.port, src=env.src)
        if args.only in (None, "processes"):
            phases = []
            for rnd in range(p["rounds"]):
                for n in proc_sizes:
                    log(f"processes: round {rnd + 1}/{p['rounds']}, {n} tracked processes")
                    ph = {"round": rnd, **retried(partial(process_phase, env, n, p),
                                                  p["tries"])}
                    phases.append(ph)
                    log(f"  connect {ph['connect_us_per_op']:.2f} µs/op, exec "
                        f"{ph['exec_us_per_op']:.0f} µs/op, scrape {ph['scrape_ms']:.2f} ms, "
                        f"kill p50/p99 {ph['kill_p50_ms']}/{ph['kill_p99_ms']} ms, "
                        f"RSS {ph['memory_mib_end']['VmRSS']} MiB, idle CPU "
                        f"{ph['idle_cpu_pct']}%" + (" DISTURBED" if ph["disturbed"] else ""))
            res["processes"] = {"sizes": proc_sizes, "phases": phases,
                                "summary": summarize(phases, proc_sizes, PROCESS_FIGURES)}
        if args.only in (None, "rules"):
            policies: dict[str, Any] = {}
            paths: dict[int, Path] = {}
            for k in rule_sizes:
                text, kinds = make_policy(k)
                paths[k] = tmp / f"policy-{k}.yaml"
                paths[k].write_text(text)
                chk = check_policy(env, paths[k])
                eligible = sum(v for name, v in kinds.items() if name in KERNEL_KINDS)
                policies[str(k)] = {**chk, "kinds": kinds, "kernel_eligible": eligible,
                                    "kernel_max": KERNEL_MAX_RULES,
                                    "eligible_overflow": eligible - chk["kernel"]}
                log(f"rules: {chk['summary']}")
            phases = []
            for rnd in range(p["rounds"]):
                for k in rule_sizes:
                    log(f"rules: round {rnd + 1}/{p['rounds']}, {k} rules")
                    ph = {"round": rnd, **retried(partial(rule_phase, env, k, paths[k], p),
                                                  p["tries"])}
                    phases.append(ph)
                    log(f"  connect {ph['connect_us_per_op']:.2f} µs/op, exec "
                        f"{ph['exec_us_per_op']:.0f} µs/op, monitor µs/event connect "
                        f"{ph['connect_monitor_us_per_event'] or 0:.1f} exec "
                        f"{ph['exec_monitor_us_per_event'] or 0:.1f}, start "
                        f"{ph['monitor_start_s']} s"
                        + (" DISTURBED" if ph["disturbed"] else ""))
            res["rules"] = {"sizes": rule_sizes, "policies": policies, "phases": phases,
                            "summary": summarize(phases, rule_sizes, RULE_FIGURES)}
    finally:
        if env is not None:
            env.close()
        shutil.rmtree(tmp, ignore_errors=True)
    save_results(res, args.output, report(res), t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
