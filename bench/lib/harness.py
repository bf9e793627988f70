"""What every benchmark script needs to run the monitor from a fixed copy of the sources
and talk to it: bench/run.py, bench/scale.py and bench/footprint.py share these.

Nothing here measures anything by itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from monitor.model.errors import ControlError
from monitor.service import client
from tests.support.procs import free_port, stop_process
from tests.support.scrape import SCRAPER

BENCH = Path(__file__).resolve().parent.parent  # bench/, this file is in bench/lib/
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Sources:
    """A copy of monitor/ and probes/ that every `agentwatch` command of this run uses, so
    edits to the tree during a run cannot mix two versions into one set of numbers."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "src"
        digest = hashlib.sha256()
        for name in ("monitor", "probes"):
            shutil.copytree(ROOT / name, self.dir / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in sorted(self.dir.rglob("*")):
            if f.is_file():
                digest.update(str(f.relative_to(self.dir)).encode() + b"\0" + f.read_bytes())
        self.sha256 = digest.hexdigest()
        self.env = {**os.environ, "PYTHONPATH": str(self.dir),
                    "AGENTWATCH_PROBES": str(self.dir / "probes")}

    def cmd(self, *args: str) -> list[str]:
        """Run with env=self.env and cwd=self.dir (`-m` puts the cwd first on sys.path)."""
        return [sys.executable, "-m", "monitor.cli.main", *args]


class ControlRefused(Exception):
    pass


def request(sock: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request on the monitor's control socket, through the CLI's own client (which
    sends a request refused as busy again within `timeout`)."""
    try:
        return client.request(sock, req, timeout=timeout)
    except ControlError as e:
        raise ControlRefused(f"{sock}: {e}") from None


_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the bench dies, even by SIGKILL."""
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads, also exited ones) or kernel thread;
    0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """utime + stime of a process plus its reaped children's (cutime + cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": values}


def bpf_holders(exclude: int | list[int] | None = None) -> list[int]:
    """Pids (not ours, not `exclude`) holding BPF programs: another monitor, a test run;
    anything loaded skews the runs without a tool."""
    skip = {os.getpid(), *([] if exclude is None else
                           [exclude] if isinstance(exclude, int) else exclude)}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if "bpf-prog" in os.readlink(fd):
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return found


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


class Monitor:
    """One `agentwatch run` from the copied sources with its own config file (which names
    the control socket) and, optionally, a policy file (default: the embedded policy)."""

    def __init__(self, tmp: Path, src: Sources, config: str, *,
                 policy: Path | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.src = src
        self.sock = str(tmp / "control.sock")
        self.policy = policy
        self.config = tmp / "config.yaml"
        self.config.write_text(f"monitor:\n  control_socket: {self.sock}\n{config}")
        self.logfile = tmp / "monitor.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> float:
        """Start it and wait until it answers on its socket; returns the seconds that took."""
        args = ["run", "--config", str(self.config), "--socket", self.sock]
        if self.policy is not None:
            args += ["--policy", str(self.policy)]
        t0 = time.monotonic()
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(self.src.cmd(*args), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.src.env, cwd=self.src.dir,
                                         preexec_fn=die_with_parent)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the monitor exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                request(self.sock, {"op": "ping"}, timeout=1)
                return time.monotonic() - t0
            except ControlRefused:
                time.sleep(0.05)
        raise RuntimeError(f"the monitor did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM by pid, wait (the probes are detached once it has exited); SIGKILL late."""
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def status(self) -> dict[str, Any]:
        return request(self.sock, {"op": "status"}, timeout=30)

    def cpu_seconds(self) -> float:
        """utime + stime of the monitor (all its threads), /proc/PID/stat: 10 ms ticks."""
        return proc_cpu(self.pid)

    def started_line(self) -> dict[str, Any]:
        """The monitor's own "monitor started" log record (probes, agents, policy...)."""
        if not self.logfile.exists():
            return {}
        for line in self.logfile.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("msg") == "monitor started":
                return rec
        return {}

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def exec_prefix(self, agent: str) -> list[str]:
        """`agentwatch exec` (from the copied sources) for a new session of `agent`."""
        return self.src.cmd("exec", "--socket", self.sock, "--agent", agent, "--")


def wait_drained(mon: Monitor, base: int, expected: int, quiet_s: float = 1.0,
                 timeout: float = 300, every: float = 0.2) -> tuple[dict[str, Any], float]:
    """Poll status every `every` s until the events count is `expected` past `base`, or has
    not moved for quiet_s; returns the last status and the seconds until it last moved."""
    t0 = time.monotonic()
    last, last_change = mon.status(), time.monotonic()
    while time.monotonic() - t0 < timeout:
        if last["events"] - base >= expected:
            time.sleep(0.3)  # would more arrive than were caused? then the count is wrong
            last = mon.status()
            break
        time.sleep(every)
        now = mon.status()
        if now["events"] != last["events"]:
            last_change = time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
        last = now
    return last, last_change - t0


class ScrapeLoop:
    """An agent scraping /metrics in a loop: `threads` threads of one child process fetch
    `url` back to back (optionally started through `prefix`, e.g. `agentwatch exec ... --`)
    until stop(), which returns (scrapes served, scrapes failed, seconds)."""

    def __init__(self, url: str, threads: int, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", SCRAPER, url,
                                      str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     preexec_fn=die_with_parent)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "scraping":
            raise RuntimeError("the scrape loop did not start")
        self.start = time.monotonic()

    def stop(self) -> tuple[int, int, float]:
        out, _ = self.proc.communicate(input="", timeout=60)
        seconds = time.monotonic() - self.start
        ok, failed = (int(x) for x in out.split())
        return ok, failed, seconds


MAX_PROCESSES = 65536  # monitor.max_processes for every phase (room for 10,000+ and loops)


def proc_status_mib(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (/proc/PID/status) and Pss
    (/proc/PID/smaps_rollup: a page mapped twice, like the ring buffer's, counted once), MiB."""
    out = {}
    for name in ("status", "smaps_rollup"):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Pss"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class AwMonitor(Monitor):
    """`agentwatch run` with room for 10,000+ processes (max_processes) and its own metrics
    port (never the default 9464 that another monitor may hold)."""

    def __init__(self, tmp: Path, src: Sources, *, policy: Path | None = None,
                 max_processes: int = MAX_PROCESSES, ring_mib: int = 8) -> None:
        self.metrics_port = free_port()
        super().__init__(tmp, src, f"  ring_buffer_mib: {ring_mib}\n"
                         f"  max_processes: {max_processes}\n"
                         f"metrics:\n  listen: '127.0.0.1:{self.metrics_port}'\n",
                         policy=policy)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 120) -> float:
        return super().start(timeout)

    def cpu_precise(self) -> float:
        """CPU seconds of the monitor's live threads with nanosecond resolution (the first
        field of /proc/PID/task/*/schedstat); cpu_seconds() counts 10 ms clock ticks, too
        coarse for a few thousand events. A thread that exits between two reads takes its
        time with it, so use it over windows with no /metrics scrape (one thread each)."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
        return total / 1e9

    def memory(self) -> dict[str, float]:
        """The monitor's memory, MiB: see proc_status_mib()."""
        return proc_status_mib(self.pid)


def idle_cpu_pct(mon: AwMonitor, seconds: float) -> float:
    cpu0, t0 = mon.cpu_precise(), time.monotonic()
    time.sleep(seconds)
    return round(100 * (mon.cpu_precise() - cpu0) / (time.monotonic() - t0), 2)
