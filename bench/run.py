"""agentwatch benchmark (`make bench`, `make bench-quick`): cost and capacity of the monitor.

1. Untracked overhead: how much slower a process that is NOT an agent gets while the
   monitor runs: a fork+exec loop, a non-blocking connect() loop and a getppid() loop (a
   control), all in C (bench/gen.c, compiled with gcc into a temp dir). Runs alternate
   without / with the monitor: each pair runs the loops with no monitor loaded, then starts
   `agentwatch run`, runs the same loops, and stops it again. Reported as with/without
   ratios per pair: median and min-max.
2. Throughput: gen.c runs as an agent (`agentwatch exec --agent bench -- gen connect RATE
   SECONDS ...`) and issues connects plus some fork+exec of /bin/true at stepped rates; the
   monitor's `status` before and after (once it has drained) gives events delivered and
   ring-buffer losses; /proc/PID/stat gives the monitor's CPU time.

Prints a table and writes bench/results.json. Needs root and BPF, like the monitor. Only
127.0.0.1 is contacted; every process started here is stopped by pid in `finally`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from monitor import control
from monitor.errors import ControlError

BENCH = Path(__file__).resolve().parent
AGENTWATCH = Path(sys.executable).parent / "agentwatch"
OVERHEAD_GOAL = 1.02
THROUGHPUT_GOAL = 100_000
LOOPS = ("exec", "connect", "getppid")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def agentwatch_cmd(*args: str) -> list[str]:
    if AGENTWATCH.exists():
        return [str(AGENTWATCH), *args]
    return [sys.executable, "-m", "monitor.cli", *args]


class Monitor:
    """One `agentwatch run` process with a temp config and control socket."""

    def __init__(self, tmp: Path, ring_mib: int) -> None:
        self.sock = str(tmp / "control.sock")
        self.config = tmp / "config.yaml"
        self.config.write_text(f"monitor:\n  control_socket: {self.sock}\n"
                               f"  ring_buffer_mib: {ring_mib}\n")
        self.logfile = tmp / "monitor.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        t0 = time.monotonic()
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                agentwatch_cmd("run", "--config", str(self.config), "--socket", self.sock),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the monitor exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                control.request(self.sock, {"op": "ping"}, timeout=1)
                return time.monotonic() - t0
            except ControlError:
                time.sleep(0.05)
        raise RuntimeError(f"the monitor did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM by pid, wait (the probes are detached once it has exited); SIGKILL late."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def status(self) -> dict[str, Any]:
        return control.request(self.sock, {"op": "status"}, timeout=30)

    def cpu_seconds(self) -> float:
        """utime + stime of the monitor process (all its threads), from /proc/PID/stat."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"kernel": platform.release(), "nproc": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
            "other_monitors": other_monitors()}


def other_monitors() -> list[str]:
    """Command lines of agentwatch monitors we did not start: they would skew the numbers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if any("agentwatch" in w for w in words[:3]) and ({"run", "trace"} & set(words)):
            found.append(f"{entry.name}: {' '.join(words)}")
    return found


def compile_gen(tmp: Path) -> Path:
    out = tmp / "gen"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(BENCH / "gen.c")],
                   check=True)
    return out


def gen(*args: str | int | float) -> dict[str, Any]:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({res.returncode}): "
                           f"{res.stderr.strip()}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": values}


# --- 1. untracked overhead --------------------------------------------------------------


def run_loops(exe: Path, port: int, sizes: dict[str, int]) -> dict[str, int]:
    """Elapsed ns of each loop, run once, in a fixed order."""
    return {
        "exec": gen(exe, "loop-exec", sizes["exec"])["elapsed_ns"],
        "connect": gen(exe, "loop-connect", sizes["connect"], port)["elapsed_ns"],
        "getppid": gen(exe, "loop-getppid", sizes["getppid"])["elapsed_ns"],
    }


def overhead(mon: Monitor, exe: Path, port: int, sizes: dict[str, int], pairs: int,
             settle: float) -> dict[str, Any]:
    log(f"overhead: warm-up, then {pairs} pairs of (without, with) runs; loop sizes {sizes}")
    run_loops(exe, port, sizes)  # warm-up, discarded
    raw: list[dict[str, Any]] = []
    for i in range(pairs):
        time.sleep(settle)
        off = run_loops(exe, port, sizes)
        startup = mon.start()
        time.sleep(settle)
        events0 = mon.status()["events"]
        on = run_loops(exe, port, sizes)
        untracked_events = mon.status()["events"] - events0
        mon.stop()
        ratios = {k: on[k] / off[k] for k in LOOPS}
        raw.append({"pair": i + 1, "without_ns": off, "with_ns": on, "ratio": ratios,
                    "monitor_start_s": round(startup, 3),
                    "events_from_untracked_loops": untracked_events})
        log(f"  pair {i + 1}: " + "  ".join(f"{k} {ratios[k]:.3f}" for k in LOOPS)
            + f"  (monitor start {startup:.1f} s, events seen {untracked_events})")
    summary: dict[str, Any] = {}
    for k in LOOPS:
        per_op_off = [p["without_ns"][k] / sizes[k] / 1000 for p in raw]
        per_op_on = [p["with_ns"][k] / sizes[k] / 1000 for p in raw]
        summary[k] = {"ratio": spread([p["ratio"][k] for p in raw]),
                      "us_per_op_without": statistics.median(per_op_off),
                      "us_per_op_with": statistics.median(per_op_on), "n": sizes[k]}
    met = all(summary[k]["ratio"]["median"] <= OVERHEAD_GOAL for k in LOOPS)
    return {"method": "pairs of (without, with); monitor started and stopped in each pair",
            "goal_ratio": OVERHEAD_GOAL, "goal_met": met, "summary": summary, "pairs": raw}


# --- 2. throughput ----------------------------------------------------------------------


def expected_events(g: dict[str, Any]) -> int:
    """Events the generator caused: its own exec (agentwatch exec -> gen) and exit, one per
    connect, fork+exit per spawn plus exec when /bin/true ran, fork+exit per extra worker."""
    workers = int(g["workers"])
    extra = 2 * workers if workers > 1 else 0
    return 2 + int(g["connects"]) + 2 * int(g["spawns"]) + int(g["execs_ok"]) + extra


def wait_drained(mon: Monitor, base: int, expected: int, quiet_s: float = 1.0,
                 timeout: float = 300) -> tuple[dict[str, Any], float]:
    """Poll status until the events count reaches `expected` or stops increasing."""
    t0 = time.monotonic()
    last, last_change = mon.status(), time.monotonic()
    while time.monotonic() - t0 < timeout:
        if last["events"] - base >= expected:
            time.sleep(0.3)  # would more arrive than were caused? then the count is wrong
            last = mon.status()
            break
        time.sleep(0.1)
        now = mon.status()
        if now["events"] != last["events"]:
            last_change = time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
        last = now
    return last, last_change - t0


def throughput_step(mon: Monitor, exe: Path, port: int, rate: int, seconds: float,
                    exec_every: int, workers: int) -> dict[str, Any]:
    before = mon.status()
    cpu0, t0 = mon.cpu_seconds(), time.monotonic()
    g = gen(*agentwatch_cmd("exec", "--socket", mon.sock, "--agent", "bench", "--"),
            exe, "connect", rate, seconds, port, exec_every, workers)
    at_end = mon.status()
    expected = expected_events(g)
    after, drain_s = wait_drained(mon, before["events"], expected)
    cpu1, t1 = mon.cpu_seconds(), time.monotonic()
    delivered = after["events"] - before["events"]
    lost = after["counters"]["lost"] - before["counters"]["lost"]
    elapsed = g["elapsed_ns"] / 1e9
    cpu = cpu1 - cpu0
    return {
        "target_rate": rate, "achieved_rate": round(expected / elapsed),
        "seconds": round(elapsed, 3), "generator": g, "issued": expected,
        "delivered": delivered, "lost": lost,
        "clean": lost == 0 and delivered == expected,
        "backlog_at_end": expected - (at_end["events"] - before["events"]),
        "drain_s": round(drain_s, 2),
        "monitor_cpu_s": round(cpu, 2), "window_s": round(t1 - t0, 2),
        "monitor_cpu_pct": round(100 * cpu / (t1 - t0), 1),
        # % of one core per 10,000 events/s == microseconds of monitor CPU per event
        "cpu_pct_per_10k_eps": round(cpu * 1e6 / delivered, 2) if delivered else None,
        "other_counters": {k: after["counters"][k] - before["counters"][k]
                           for k in after["counters"] if k != "lost"},
    }


def throughput(mon: Monitor, exe: Path, port: int, rates: list[int], seconds: float,
               exec_every: int, workers: int) -> dict[str, Any]:
    log(f"throughput: steps {rates} events/s, {seconds:g} s each; 1 fork+exec per "
        f"{exec_every} connects; {workers} generator process(es)")
    startup = mon.start()
    steps = []
    try:
        for rate in rates:
            s = throughput_step(mon, exe, port, rate, seconds, exec_every, workers)
            steps.append(s)
            log(f"  {rate:>7}/s: achieved {s['achieved_rate']}/s, delivered "
                f"{s['delivered']}/{s['issued']}, lost {s['lost']}, drain {s['drain_s']} s, "
                f"monitor CPU {s['monitor_cpu_pct']}%")
    finally:
        mon.stop()
    clean = [s for s in steps if s["clean"]]
    best = max(clean, key=lambda s: s["achieved_rate"]) if clean else None
    per10k = [s["cpu_pct_per_10k_eps"] for s in steps if s["cpu_pct_per_10k_eps"]]
    return {
        "method": "generator tracked via agentwatch exec; status delta after drain",
        "mix": f"connect() calls, plus one fork+exec of /bin/true per {exec_every} connects",
        "goal_events_per_s": THROUGHPUT_GOAL, "monitor_start_s": round(startup, 3),
        "max_clean_target_rate": best["target_rate"] if best else 0,
        "max_clean_achieved_rate": best["achieved_rate"] if best else 0,
        "goal_met": bool(best and best["achieved_rate"] >= THROUGHPUT_GOAL),
        "cpu_pct_per_10k_eps": spread(per10k) if per10k else None,
        "steps": steps,
    }


# --- report -----------------------------------------------------------------------------


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [f"agentwatch benchmark  {m['date']}  kernel {m['kernel']}  {m['nproc']} CPUs  "
           f"{m['cpu_model']}"]
    if m["other_monitors"]:
        out.append(f"WARNING: other monitors were running: {m['other_monitors']}")
    if "overhead" in res:
        o = res["overhead"]
        out += ["", f"Untracked overhead (with/without, {len(o['pairs'])} alternated pairs; "
                    f"goal <= {OVERHEAD_GOAL})",
                f"  {'loop':<9}{'n':>10}{'us/op off':>11}{'us/op on':>10}{'median':>9}"
                f"{'min-max':>15}"]
        for k in LOOPS:
            s = o["summary"][k]
            r = s["ratio"]
            out.append(f"  {k:<9}{s['n']:>10}{s['us_per_op_without']:>11.3f}"
                       f"{s['us_per_op_with']:>10.3f}{r['median']:>9.3f}"
                       f"{r['min']:>8.3f}-{r['max']:.3f}")
        out.append(f"  goal met: {o['goal_met']}")
    if "throughput" in res:
        t = res["throughput"]
        out += ["", f"Throughput of tracked events ({t['mix']}; goal >= "
                    f"{THROUGHPUT_GOAL}/s with no loss)",
                f"  {'target/s':>9}{'achieved/s':>11}{'issued':>10}{'delivered':>10}"
                f"{'lost':>9}{'backlog@end':>12}{'drain s':>8}{'mon CPU%':>9}"
                f"{'%/10k ev/s':>11}"]
        for s in t["steps"]:
            out.append(f"  {s['target_rate']:>9}{s['achieved_rate']:>11}{s['issued']:>10}"
                       f"{s['delivered']:>10}{s['lost']:>9}{s['backlog_at_end']:>12}"
                       f"{s['drain_s']:>8}{s['monitor_cpu_pct']:>9}"
                       f"{s['cpu_pct_per_10k_eps'] or 0:>11}")
        out.append(f"  highest clean step: {t['max_clean_target_rate']}/s (achieved "
                   f"{t['max_clean_achieved_rate']}/s); goal met: {t['goal_met']}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (under ~2 minutes)")
    p.add_argument("--only", choices=("overhead", "throughput"), help="run one part only")
    p.add_argument("--pairs", type=int, help="alternated pairs (default 7, quick 3)")
    p.add_argument("--rates", help="comma-separated throughput steps, events/s")
    p.add_argument("--step-seconds", type=float, help="seconds per step (default 10, quick 3)")
    p.add_argument("--exec-every", type=int, default=1000,
                   help="one fork+exec of /bin/true per this many connects (0: none)")
    p.add_argument("--workers", type=int, default=1, help="generator processes per step")
    p.add_argument("--ring-mib", type=int, default=16, help="monitor ring buffer, MiB")
    p.add_argument("--output", default=str(BENCH / "results.json"))
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (the monitor loads BPF probes)", file=sys.stderr)
        return 3
    if shutil.which("gcc") is None:
        print("bench: gcc is needed to build bench/gen.c", file=sys.stderr)
        return 3
    q = args.quick
    pairs = args.pairs or (3 if q else 7)
    sizes = ({"exec": 500, "connect": 100_000, "getppid": 3_000_000} if q else
             {"exec": 2000, "connect": 300_000, "getppid": 10_000_000})
    rates = ([int(r) for r in args.rates.split(",")] if args.rates else
             [10_000, 50_000, 100_000, 200_000] if q else
             [10_000, 25_000, 50_000, 100_000, 150_000, 200_000, 300_000])
    seconds = args.step_seconds or (3.0 if q else 10.0)

    res: dict[str, Any] = {"machine": machine(), "params": {
        "quick": q, "pairs": pairs, "loop_sizes": sizes, "rates": rates,
        "step_seconds": seconds, "exec_every": args.exec_every, "workers": args.workers,
        "ring_buffer_mib": args.ring_mib}}
    if res["machine"]["other_monitors"]:
        log(f"WARNING: other agentwatch monitors are running: {res['machine']['other_monitors']}")
    tmp = Path(tempfile.mkdtemp(prefix="agentwatch-bench-"))
    # A bound, never-listening socket reserves a port that refuses every connection.
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    mon = Monitor(tmp, args.ring_mib)
    try:
        closed.bind(("127.0.0.1", 0))
        port = int(closed.getsockname()[1])
        exe = compile_gen(tmp)
        if args.only in (None, "overhead"):
            res["overhead"] = overhead(mon, exe, port, sizes, pairs, settle=0.5)
        if args.only in (None, "throughput"):
            res["throughput"] = throughput(mon, exe, port, rates, seconds, args.exec_every,
                                           args.workers)
    except Exception:
        tail = mon.log_tail()
        if tail:
            log("monitor log tail:\n" + tail)
        raise
    finally:
        mon.stop()
        closed.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"\nraw samples: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
