"""The load generator (bench/gen.c: exec, connect and getppid loops, paced connect
streams) and the host's other load: what bench/run.py and bench/scale.py run and how they
tell whether other work disturbed a measurement.

Never starts the monitor itself; every process started here is waited for or killed.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import (
    BENCH,
    CLK_TCK,
    AwMonitor,
    Sources,
    bpf_holders,
    proc_cpu,
    tree_cpu,
    wait_drained,
)

BUSY_LIMIT = 0.25  # CPU cores of other work above which a measurement is redone


@dataclass(frozen=True)
class Patience:
    """How long to wait for, and how often to redo, runs disturbed by other work."""

    wait_s: float  # longest wait for a quiet host before a measurement
    budget_s: float  # stop re-running disturbed overhead pairs after this long
    tries: int  # attempts per throughput step


class OtherLoad:
    """CPU cores the host spent on anything but this bench, its children and the tool under
    test (busy time in /proc/stat minus ours) between start() and cores(): other people's
    work, plus the little kernel-thread time our own load causes (about 0.01 core during
    the overhead loops, 0.1 during fast throughput steps on the reference VM). `ours`
    gives the pids whose CPU counts as ours besides our own and our reaped children: the
    monitor, auditd and kauditd, bpftrace; `cpu` reads one such pid's CPU seconds
    (proc_cpu; tree_cpu to count its reaped children too: agents we started)."""

    def __init__(self, ours: Callable[[], list[int]],
                 cpu: Callable[[int], float] = proc_cpu) -> None:
        self.ours = ours
        self.cpu = cpu
        self._t0 = self._others0 = 0.0

    def _others(self) -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:3]) + sum(fields[5:7])) / CLK_TCK  # user nice system irq softirq
        usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        ours = sum(u.ru_utime + u.ru_stime for u in usage)
        return busy - ours - sum(self.cpu(pid) for pid in self.ours())

    def start(self) -> None:
        self._t0, self._others0 = time.monotonic(), self._others()

    def cores(self) -> float:
        used = self._others() - self._others0
        return max(0.0, used) / max(time.monotonic() - self._t0, 1e-3)

    def wait_quiet(self, timeout: float = 60) -> float:
        """Wait until others use less than BUSY_LIMIT cores over 1 s; returns seconds."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.start()
            time.sleep(1)
            if self.cores() < BUSY_LIMIT:
                break
        return time.monotonic() - t0


def compile_gen(tmp: Path) -> Path:
    out = tmp / "gen"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(BENCH / "gen.c")],
                   check=True)
    return out


def gen(*args: str | int | float | Path, src: Sources | None = None,
        tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run a command (gen, or `agentwatch exec ... gen`) and return gen's JSON line;
    `tick` is called every 0.2 s while it runs."""
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=src.env if src else None, cwd=src.dir if src else None)
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2 if tick else None)
                break
            except subprocess.TimeoutExpired:
                assert tick is not None
                tick()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{err.strip()}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def loop_args(exe: Path, loop: str, sizes: dict[str, int], port: int) -> list[str | int | Path]:
    return [exe, f"loop-{loop}", sizes[loop], *([port] if loop == "connect" else [])]


def compile_c(tmp: Path, name: str, source: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(source)
    out = tmp / name
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def quiet_host(wait_s: float, monitor_pid: int | None = None) -> float:
    """Wait (up to wait_s each) until no other process holds BPF programs and other work
    is below BUSY_LIMIT cores; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s and bpf_holders(monitor_pid):
        time.sleep(0.5)
    ours = [monitor_pid] if monitor_pid else []
    OtherLoad(lambda: ours, tree_cpu).wait_quiet(wait_s)
    return time.monotonic() - t0


def tracked_loop(mon: AwMonitor, exe: Path, kind: str, n: int, port: int) -> dict[str, Any]:
    """One run of gen's loop-connect / loop-exec as a tracked agent; then wait until the
    monitor has taken every event the loop caused (or stopped moving)."""
    before = mon.status()
    cpu0 = mon.cpu_precise()
    extra = [port] if kind == "connect" else []
    g = gen(*mon.exec_prefix("bench"), exe, f"loop-{kind}", n, *extra, src=mon.src)
    # gen's own exec and exit, plus one connect event per connect, or fork+exec+exit per spawn
    expected = 2 + (n if kind == "connect" else 3 * n)
    # connects past the process's flood budget are counted in the kernel, not delivered
    shed = mon.status()["counters"]["shed"] - before["counters"]["shed"]
    after, drain_s = wait_drained(mon, before["events"], expected - shed, quiet_s=0.5,
                                  every=0.1)
    cpu = mon.cpu_precise() - cpu0
    delivered = after["events"] - before["events"]
    return {"n": n, "us_per_op": g["elapsed_ns"] / n / 1000, "expected_events": expected,
            "delivered": delivered, "aggregated": shed,
            "lost": after["counters"]["lost"] - before["counters"]["lost"],
            "drain_s": round(drain_s, 2), "monitor_cpu_s": round(cpu, 3),
            "monitor_us_per_event": round(cpu * 1e6 / delivered, 2) if delivered else None}


def loops(mon: AwMonitor, exe: Path, port: int, sizes: dict[str, int], reps: int
          ) -> dict[str, Any]:
    """R rounds of (connect, exec); per loop the fastest run is the figure."""
    runs: dict[str, list[dict[str, Any]]] = {"connect": [], "exec": []}
    for _ in range(reps):
        for kind in runs:
            runs[kind].append(tracked_loop(mon, exe, kind, sizes[kind], port))
    out: dict[str, Any] = {"runs": runs}
    for kind, rs in runs.items():
        best = min(rs, key=lambda r: r["us_per_op"])
        out[f"{kind}_us_per_op"] = best["us_per_op"]
        per_ev = [r["monitor_us_per_event"] for r in rs if r["monitor_us_per_event"]]
        out[f"{kind}_monitor_us_per_event"] = statistics.median(per_ev) if per_ev else None
        out[f"{kind}_lost"] = sum(r["lost"] for r in rs)
        out[f"{kind}_missing_events"] = sum(r["expected_events"] - r["delivered"] for r in rs)
    return out
