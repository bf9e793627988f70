"""Kill latency: from the offending syscall's entry to the process's death, for an in-kernel
rule (connect to a forbidden destination: SIGKILL at syscall entry) and a userspace rule
(exec of `ssh -R`: decided from argv in Python, killed through a pidfd), idle and while
another agent generates 10,000 other events per second, and (with --scrape-threads N) while
an agent scrapes /metrics in a loop from N threads. The `userspace_miss_*` cases run the
userspace rule on a fresh file every time (each its own inode, padded to the size of the
host's ssh, ~1 MB): every kill then includes a fingerprint miss, the sha256 of that file
(monitor/sessions/identity.py).

t0 is stamped by the victim (CLOCK_BOOTTIME) right before the syscall; the death time is the
kernel's timestamp of the victim's exit event (same clock), read from the monitor's stream.
For the in-kernel rule the victim also records whether connect() ever returned: it must not.

Usage: .venv/bin/python bench/kill_latency.py [--quick] [--scrape-threads N] [--output FILE]

bench/scale.py reuses build_victims(), ExitWatch and measure() against its own monitors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lib.harness import ScrapeLoop, free_port, proc_cpu, stop_process

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
AGENTWATCH = [str(VENV_BIN / "agentwatch")]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ExitWatch:
    """The kernel's exit timestamp of every process the monitor reports, from its event
    stream (a `subscribe` on the control socket), while the watch is open. close() ends the
    subscription, so a watch costs the monitor nothing outside the measurement."""

    def __init__(self, sock: str) -> None:
        self.exits: dict[int, int] = {}
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(5)
            self._sock.connect(sock)
            self._sock.sendall(b'{"op": "subscribe"}\n')
            self._file = self._sock.makefile("rb")
            first = json.loads(self._file.readline() or b"{}")
            if not first.get("ok"):
                raise RuntimeError(f"subscription to {sock} refused: {first}")
            self._sock.settimeout(None)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for line in self._file:
                item = json.loads(line)
                if item.get("event") == "exit":
                    with self._cond:
                        self.exits[int(item["pid"])] = int(item["ts_ns"])
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass  # closed by close(), or the monitor went away

    def exit_ts(self, pid: int, timeout: float = 5) -> int | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self.exits:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.exits[pid]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread: EOF
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._file.close()
        self._sock.close()


class Monitor:
    def __init__(self, tmp: Path, kill_port: int) -> None:
        self.sock = str(tmp / "ctl.sock")
        policy = tmp / "policy.yaml"
        policy.write_text(f"""mode: enforce
rules:
  - name: bench-userspace-kill
    event: exec
    action: kill
    match: {{ssh: [remote_forward]}}
  - name: bench-kernel-kill
    event: connect
    action: kill
    match: {{address: [127.0.0.1], port: [{kill_port}]}}
""")
        config = tmp / "config.yaml"
        port = free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        config.write_text(f"monitor: {{ring_buffer_mib: 8}}\n"
                          f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
        self.proc = subprocess.Popen([*AGENTWATCH, "run", "--config", str(config), "--policy",
                                      str(policy), "--socket", self.sock],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        assert first["msg"] == "monitor started", first
        threading.Thread(target=self._drain_log, daemon=True).start()
        while not os.path.exists(self.sock):
            time.sleep(0.05)
        self.watch = ExitWatch(self.sock)

    def _drain_log(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def exec_prefix(self, name: str) -> list[str]:
        return [*AGENTWATCH, "exec", "--socket", self.sock, "--agent", name, "--"]

    def stop(self) -> None:
        self.watch.close()
        stop_process(self.proc, timeout=15)


def agent(mon: Monitor, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([*mon.exec_prefix(name), *argv], text=True, **kw)


def build_victims(tmp: Path) -> tuple[Path, Path]:
    """Compile bench/victim.c into tmp; returns (victim, a copy named ssh: the stand-in that
    `exec-kill` runs as `ssh -R 1:x:1 h`)."""
    victim = tmp / "victim"
    subprocess.run(["cc", "-O2", "-o", str(victim), str(ROOT / "bench" / "victim.c")],
                   check=True)
    ssh = tmp / "ssh"
    shutil.copy(victim, ssh)
    return victim, ssh


def fresh_copies(ssh: Path, n: int, size: int, name: str) -> str:
    """n copies of the ssh stand-in, each its own file (tmp/NAME/I/ssh) padded to size
    bytes: an exec of each is a fingerprint miss. Returns the victim's %ld path pattern."""
    data = ssh.read_bytes()
    data += bytes(max(0, size - len(data)))
    root = ssh.parent / name
    for i in range(n):
        (root / str(i)).mkdir(parents=True)
        copy = root / str(i) / "ssh"
        copy.write_bytes(data)
        copy.chmod(0o755)
    return str(root / "%ld" / "ssh")


def measure(watch: ExitWatch, exec_prefix: Sequence[str], victim: str, mode: str, n: int,
            arg: str, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
            ) -> dict[str, Any]:
    """n kills: `exec_prefix` (`agentwatch exec ... --`) runs the victim as an agent; the
    latency of each is its exit timestamp (from `watch`) minus the victim's t0 stamp."""
    p = subprocess.Popen([*exec_prefix, victim, mode, str(n), arg], text=True,
                         stdout=subprocess.PIPE, env=env, cwd=cwd)
    out, _ = p.communicate(timeout=300)
    lat, not_killed, completed, missing = [], 0, 0, 0
    for line in out.splitlines():
        rec = json.loads(line)
        if rec["status"] != signal.SIGKILL:  # wait status: killed by signal 9
            not_killed += 1
        completed += rec["returned"]
        ts = watch.exit_ts(rec["pid"])
        if ts is None or not rec["t0_ns"]:
            missing += 1
            continue
        lat.append((ts - rec["t0_ns"]) / 1e6)
    return {"n": n, "measured": len(lat), "not_killed": not_killed, "missing": missing,
            "forbidden_step_completed": completed,
            "p50_ms": round(pct(lat, 0.5), 3) if lat else None,
            "p99_ms": round(pct(lat, 0.99), 3) if lat else None,
            "max_ms": round(max(lat), 3) if lat else None,
            "mean_ms": round(statistics.fmean(lat), 3) if lat else None,
            "samples_ms": [round(x, 4) for x in lat]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 kills per case instead of 500")
    ap.add_argument("--scrape-threads", type=int, default=0, metavar="N",
                    help="also measure while an agent scrapes /metrics from N threads")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results-kill.json"))
    args = ap.parse_args()
    n = 100 if args.quick else 500
    tmp = Path(tempfile.mkdtemp(prefix="agentwatch-kill-"))
    victim, ssh = build_victims(tmp)
    host_ssh = shutil.which("ssh")
    size = os.stat(host_ssh).st_size if host_ssh else 1 << 20
    fresh = {tag: fresh_copies(ssh, n, size, f"fresh-{tag}") for tag in ("idle", "loaded")}
    kill_port, load_port = free_port(), free_port()
    mon = Monitor(tmp, kill_port)
    results: dict[str, Any] = {"kills_per_case": n, "load_events_per_s": 10_000,
                               "scrape_threads": args.scrape_threads}
    try:
        for tag in ("idle", "loaded", "scraped") if args.scrape_threads else ("idle", "loaded"):
            bg, scraper = None, None
            if tag == "loaded":
                seconds = n * 0.02 + 30
                bg = agent(mon, "background", [str(victim), "load", "10000", str(seconds),
                                               str(load_port)], stdout=subprocess.PIPE)
                time.sleep(1)
            if tag == "scraped":
                scraper = ScrapeLoop(mon.metrics_url, args.scrape_threads,
                                     mon.exec_prefix("scraper"))
                time.sleep(1)
            cpu0, t0 = proc_cpu(mon.proc.pid), time.monotonic()
            prefix = mon.exec_prefix("bench")
            results[f"userspace_{tag}"] = measure(mon.watch, prefix, str(victim), "exec-kill",
                                                  n, str(ssh))
            if tag in fresh:  # each round a file never seen: a fingerprint miss
                results[f"userspace_miss_{tag}"] = measure(
                    mon.watch, prefix, str(victim), "exec-kill", n, fresh[tag])
            results[f"kernel_{tag}"] = measure(mon.watch, prefix, str(victim), "connect-kill",
                                               n, str(kill_port))
            results[f"monitor_cpu_pct_{tag}"] = round(
                100 * (proc_cpu(mon.proc.pid) - cpu0) / (time.monotonic() - t0), 1)
            if scraper is not None:
                ok, failed, seconds = scraper.stop()
                results["scrapes_per_s"] = round(ok / seconds, 1)
                results["scrapes_failed"] = failed
            if bg is not None:
                bg.kill()
                bg.wait()
    finally:
        mon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'case':<18} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'not killed':>10} {'step done':>9}")
    for key, r in results.items():
        if isinstance(r, dict):
            print(f"{key:<18} {r['measured']:>5} {r['p50_ms']!s:>8} {r['p99_ms']!s:>8} "
                  f"{r['max_ms']!s:>8} {r['not_killed']:>10} {r['forbidden_step_completed']:>9}")
    print("monitor CPU, % of a core: " + ", ".join(
        f"{k.rsplit('_', 1)[1]} {v}" for k, v in results.items() if k.startswith("monitor_cpu")))
    if args.scrape_threads:
        print(f"scrapes served while scraped: {results['scrapes_per_s']}/s "
              f"({results['scrapes_failed']} failed)")
    goal_user = all(results[f"userspace_{t}"]["p99_ms"] is not None
                    and results[f"userspace_{t}"]["p99_ms"] <= 5
                    for t in ("idle", "loaded", "miss_idle", "miss_loaded"))
    goal_kernel = all(results[f"kernel_{t}"]["measured"] > 0
                      and results[f"kernel_{t}"]["forbidden_step_completed"] == 0
                      and results[f"kernel_{t}"]["not_killed"] == 0 for t in ("idle", "loaded"))
    results["goals"] = {"userspace_p99_le_5ms": goal_user, "kernel_step_never_completes":
                        goal_kernel}
    print(f"goals: userspace p99 <= 5 ms: {goal_user}; in-kernel step never completes: "
          f"{goal_kernel}")
    Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
