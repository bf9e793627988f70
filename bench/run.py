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
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from harness import (
    BENCH,
    CLK_TCK,
    Monitor,
    Sources,
    bpf_holders,
    die_with_parent,
    log,
    other_monitors,
    proc_cpu,
    spread,
    stop_process,
    wait_drained,
)

OVERHEAD_GOAL = 1.02
THROUGHPUT_GOAL = 100_000
RATE_TOLERANCE = 0.98  # a step counts as reached when the generator issued >= 98% of it
BUSY_LIMIT = 0.25  # CPU cores of other work above which a measurement is redone
LOOPS = ("exec", "connect", "getppid")
TOOLS = ("agentwatch", "auditd", "bpftrace")  # compared against "none", alternated per round
TRACKED_GOALS = {"exec": 1.05, "connect": 1.10}  # and below auditd's ratio


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
    monitor, auditd and kauditd, bpftrace."""

    def __init__(self, ours: Callable[[], list[int]]) -> None:
        self.ours = ours
        self._t0 = self._others0 = 0.0

    def _others(self) -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:3]) + sum(fields[5:7])) / CLK_TCK  # user nice system irq softirq
        usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        ours = sum(u.ru_utime + u.ru_stime for u in usage)
        return busy - ours - sum(proc_cpu(pid) for pid in self.ours())

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
            "other_monitors": other_monitors(), "git": git_state()}


def git_state() -> dict[str, Any]:
    """Commit and locally modified files of the tree under test (read-only git calls)."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "--no-optional-locks", "-C", str(BENCH.parent), *args],
                             capture_output=True, text=True, check=False)
        return res.stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "modified": [line[3:] for line in git("status", "--porcelain").splitlines()
                         if line[3:].startswith(("monitor/", "probes/"))]}


_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_GET_NEXT_ID = 11


def bpf_prog_count() -> int | None:
    """BPF programs loaded on the host, owned by a process or not (attached to a cgroup,
    pinned): what bpf_holders() cannot see. None if it cannot be asked."""
    if _SYS_BPF is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    n, start = 0, 0
    while True:
        attr = (ctypes.c_uint32 * 3)(start, 0, 0)  # start_id, next_id, open_flags
        if libc.syscall(_SYS_BPF, _BPF_PROG_GET_NEXT_ID, ctypes.byref(attr),
                        ctypes.sizeof(attr)) != 0:
            return n if ctypes.get_errno() == 2 else None  # ENOENT: end of the list
        start, n = attr[1], n + 1


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


# --- 1. overhead: none / agentwatch / auditd / bpftrace ---------------------------------


class ToolFailed(Exception):
    """A tool could not be started or died during its phase: its column is left out."""


def loop_args(exe: Path, loop: str, sizes: dict[str, int], port: int) -> list[str | int | Path]:
    return [exe, f"loop-{loop}", sizes[loop], *([port] if loop == "connect" else [])]


def run(*args: str | int, check: bool = True) -> str:
    """A short helper command (auditctl ...); its output, stdout and stderr together."""
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                         check=False, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise ToolFailed(f"{' '.join(map(str, args))} failed ({res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()}")
    return res.stdout + res.stderr


class Tool:
    """One configuration of the overhead comparison. "none" is this base class as is."""

    name = "none"
    loads_bpf = False  # its BPF programs are expected; do not compare the host-wide count
    tracks_agents = False  # only agentwatch tells agents from other processes

    def unavailable(self) -> str | None:
        """Why this tool cannot be measured here, or None."""
        return None

    def start(self) -> dict[str, Any]:
        return {}

    def pids(self) -> list[int]:
        """Processes (and kernel threads) whose CPU is the tool's, and which may hold BPF."""
        return []

    def alive(self) -> bool:
        return True

    def tick(self) -> None:
        """Called every 0.2 s while a loop runs."""

    def settle(self) -> None:
        """After each run: let the tool catch up with the events it was given."""

    def counters(self) -> dict[str, int] | None:
        return None

    def agent_cmd(self) -> list[str]:
        return []

    def finish(self) -> dict[str, Any]:
        """After the loops: gather what the tool did, then unload it."""
        return {}

    def shutdown(self) -> None:
        """Unload it now; idempotent, called in `finally` and on signals."""


class Agentwatch(Tool):
    name = "agentwatch"
    loads_bpf = True
    tracks_agents = True

    def __init__(self, mon: Monitor, settle_s: float) -> None:
        self.mon = mon
        self.settle_s = settle_s

    def start(self) -> dict[str, Any]:
        try:
            startup = self.mon.start()
        except RuntimeError as e:
            raise ToolFailed(f"{e}\n{self.mon.log_tail()}") from None
        time.sleep(self.settle_s)
        return {"monitor_start_s": round(startup, 3)}

    def pids(self) -> list[int]:
        return [self.mon.proc.pid] if self.mon.proc else []

    def alive(self) -> bool:
        return self.mon.proc is not None and self.mon.proc.poll() is None

    def counters(self) -> dict[str, int]:
        st = self.mon.status()
        return {"events": int(st["events"]), "lost": int(st["counters"]["lost"])}

    def settle(self, quiet_s: float = 0.15, timeout: float = 60) -> None:
        """Until the monitor's event count stops moving (it has drained the ring buffer)."""
        t0, last = time.monotonic(), self.mon.status()["events"]
        while time.monotonic() - t0 < timeout:
            time.sleep(quiet_s)
            now = self.mon.status()["events"]
            if now == last:
                return
            last = now

    def agent_cmd(self) -> list[str]:
        return self.mon.src.cmd("exec", "--socket", self.mon.sock, "--agent", "bench", "--")

    def finish(self) -> dict[str, Any]:
        self.mon.stop()
        return {}

    def shutdown(self) -> None:
        self.mon.stop()


AUDIT_KEY = "agentwatch-bench"
AUDIT_RULE = ["-a", "always,exit", "-F", "arch=b64", "-S", "execve,execveat,connect",
              "-k", AUDIT_KEY]
AUDIT_NEVER_TASK = ["-a", "never,task"]
# What Debian's packaged /etc/audit/rules.d/audit.rules sets when the service starts
# (augenrules --load): the daemon is measured as installed. Put back as found afterwards.
AUDIT_TUNING = {"backlog_limit": ("-b", 8192), "backlog_wait_time": ("--backlog_wait_time", 60000),
                "failure": ("-f", 1)}
AUDIT_LOG = Path("/var/log/audit/audit.log")


def audit_status() -> dict[str, int]:
    out = run("auditctl", "-s")
    status = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
            status[parts[0]] = int(parts[1])
    return status


class AuditState:
    """The kernel's audit settings for the whole run.

    Once audit has been enabled since boot (audit_ever_enabled), the kernel gives every
    new task the syscall-audit work flag, even with audit disabled again and no rules: all
    of its syscalls then take the slow path (on the reference VM getppid() costs 130 ns
    instead of 103 ns). That would slow every phase after the first auditd phase. The only
    remedy short of a reboot is a `-a never,task` rule, which makes new tasks start without
    the flag; it is loaded for the whole run outside the auditd phases (it has no effect
    while audit was never enabled) and removed at the end. A guardian shell, which gets
    SIGTERM when the bench dies (PR_SET_PDEATHSIG), removes the rules, disables audit and
    restores the settings if the bench is killed before it can.
    """

    def __init__(self) -> None:
        self.before: dict[str, int] | None = None
        self.reason: str | None = None
        self.guardian: subprocess.Popen[bytes] | None = None
        self.never_task_rule = False
        if shutil.which("auditctl") is None:
            self.reason = ("auditctl not found (package auditd not installed: run "
                           "packaging/setup-bench.sh)")
            return
        try:
            st = audit_status()
            rules = run("auditctl", "-l").strip()
        except ToolFailed as e:
            self.reason = f"cannot query the kernel's audit state: {e}"
            return
        leftover = rules in ("No rules", " ".join(AUDIT_NEVER_TASK))
        if st.get("enabled") != 0 or st.get("pid", 0) != 0 or not leftover:
            self.reason = (f"audit is in use (enabled {st.get('enabled')}, auditd pid "
                           f"{st.get('pid')}, rules: {rules!r}); not touched")
            return
        self.before = st

    def begin(self) -> None:
        if self.before is None:
            return
        b = self.before
        restore = (f"auditctl -D; auditctl -e 0; auditctl -b {b['backlog_limit']} "
                   f"--backlog_wait_time {b['backlog_wait_time']} -f {b['failure']}")
        script = (f"restore() {{ {restore}; }} >/dev/null 2>&1\n"
                  "trap 'restore; exit 0' TERM HUP INT\n"
                  "while :; do sleep 1 & wait $!; done\n")
        self.guardian = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent)
        self.neutral()

    def neutral(self) -> None:
        """State outside auditd phases: no syscall rules, audit off, new tasks unflagged."""
        if self.before is None:
            return
        run("auditctl", "-D")
        run("auditctl", "-e", "0")
        run("auditctl", *AUDIT_NEVER_TASK)
        self.never_task_rule = True

    def restore(self) -> None:
        if self.before is None:
            return
        b = self.before
        for args in (["-D"], ["-e", "0"],
                     ["-b", b["backlog_limit"], "--backlog_wait_time", b["backlog_wait_time"],
                      "-f", b["failure"]]):
            try:
                run("auditctl", *args)
            except ToolFailed as e:
                log(f"WARNING: {e}")
        self.never_task_rule = False
        if self.guardian is not None:
            self.guardian.terminate()  # it restores once more (harmless) and exits
            try:
                self.guardian.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.guardian.kill()
                self.guardian.wait()
            self.guardian = None


class AuditLog:
    """Counts what auditd appends to /var/log/audit/audit.log during a phase, across
    rotations (8 MiB files, 5 kept, by Debian's auditd.conf): every file that appears is
    opened at once (polled every 0.2 s) and kept open, so it can still be read when it has
    been rotated away."""

    def __init__(self) -> None:
        self.files: dict[int, tuple[IO[bytes], int | None]] = {}  # inode -> (file, from)

    def _open(self, path: Path, start: str) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 (kept open on purpose)
        except OSError:
            return
        st = os.fstat(f.fileno())
        if st.st_ino in self.files:
            f.close()
            return
        self.files[st.st_ino] = (f, {"end": st.st_size, "zero": 0, "skip": None}[start])

    def begin(self) -> None:
        self._open(AUDIT_LOG, "end")
        for p in AUDIT_LOG.parent.glob(AUDIT_LOG.name + ".*"):
            self._open(p, "skip")

    def poll(self) -> None:
        for p in AUDIT_LOG.parent.glob(AUDIT_LOG.name + "*"):
            try:
                ino = p.stat().st_ino
            except OSError:
                continue
            if ino not in self.files:
                self._open(p, "zero")

    def size(self) -> int:
        return sum(os.fstat(f.fileno()).st_size for f, _ in self.files.values())

    def count(self) -> dict[str, int]:
        self.poll()
        pats = {"records": b"\n", "syscall_records": b"type=SYSCALL ",
                "keyed_records": f'key="{AUDIT_KEY}"'.encode()}
        out = dict.fromkeys(pats, 0) | {"bytes": 0, "files": 0}
        for f, start in self.files.values():
            if start is None:
                continue
            out["files"] += 1
            f.seek(start)
            tail = b""
            while chunk := f.read(1 << 24):
                out["bytes"] += len(chunk)
                buf = tail + chunk
                for k, pat in pats.items():
                    out[k] += buf.count(pat) - tail.count(pat)
                tail = buf[-64:]
        return out

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()
        self.files.clear()


def kauditd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "kauditd":
                    return int(entry.name)
            except OSError:
                continue
    return None


class Auditd(Tool):
    """Debian's auditd, started by the bench per phase (`auditd -n`, a child), with one
    always,exit rule on execve, execveat and connect for every process."""

    name = "auditd"

    def __init__(self, tmp: Path, state: AuditState) -> None:
        self.tmp = tmp
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = AuditLog()
        self.kauditd = kauditd_pid()
        self.lost0 = 0

    def unavailable(self) -> str | None:
        if shutil.which("auditd") is None:
            return "auditd not found (run packaging/setup-bench.sh)"
        if self.state.reason:
            return self.state.reason
        for pidfile in (Path("/run/auditd.pid"), Path("/var/run/auditd.pid")):
            try:
                pid = pidfile.read_text().strip()
            except OSError:
                continue
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                return f"another auditd is running (pid {pid}); not touched"
        return None

    def start(self) -> dict[str, Any]:
        run("auditctl", "-D")  # the never,task rule would exempt the new tasks
        with open(self.tmp / "auditd.out", "ab") as out:
            self.proc = subprocess.Popen(["auditd", "-n"], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent)
        t0 = time.monotonic()
        while audit_status().get("pid") != self.proc.pid:
            if self.proc.poll() is not None or time.monotonic() - t0 > 15:
                raise ToolFailed("auditd did not register with the kernel: "
                                 + (self.tmp / "auditd.out").read_text(errors="replace")[-500:])
            time.sleep(0.05)
        for opt, value in AUDIT_TUNING.values():
            run("auditctl", opt, value)
        run("auditctl", *AUDIT_RULE)
        rules = run("auditctl", "-l").strip()
        if AUDIT_KEY not in rules:
            raise ToolFailed(f"the audit rule did not load: {rules}")
        st = audit_status()
        self.lost0 = st.get("lost", 0)
        self.log = AuditLog()
        self.log.begin()
        return {"auditd_pid": self.proc.pid, "rules": rules,
                "status": {k: st[k] for k in ("enabled", "pid", "backlog_limit",
                                              "backlog_wait_time", "failure") if k in st}}

    def pids(self) -> list[int]:
        return [p for p in (self.proc.pid if self.proc else None, self.kauditd) if p]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tick(self) -> None:
        self.log.poll()

    def settle(self, timeout: float = 30) -> None:
        """Until the kernel's audit backlog is empty (every record handed to auditd), then
        0.2 s for auditd to write them. Not "until the log stops growing": auditd logs what
        other processes on the host do as well."""
        t0 = time.monotonic()
        while audit_status().get("backlog", 0) > 0 and time.monotonic() - t0 < timeout:
            self.log.poll()
            time.sleep(0.05)
        time.sleep(0.2)
        self.log.poll()

    def finish(self) -> dict[str, Any]:
        self.settle()
        counts = self.log.count()
        st = audit_status()
        self.shutdown()
        if counts["records"] == 0:
            raise ToolFailed(f"auditd wrote nothing to {AUDIT_LOG} during the phase")
        return {"audit_log": counts, "kernel_lost": st.get("lost", 0) - self.lost0,
                "backlog_wait_time_actual": st.get("backlog_wait_time_actual")}

    def shutdown(self) -> None:
        """Rules deleted, audit disabled, the daemon stopped by pid and waited for."""
        self.log.close()
        if self.proc is None:
            return
        for args in (["-D"], ["-e", "0"]):
            try:
                run("auditctl", *args)
            except ToolFailed as e:
                log(f"WARNING: {e}")
        stop_process(self.proc)
        self.proc = None
        self.state.neutral()


BPFTRACE_SCRIPT = """\
tracepoint:syscalls:sys_enter_execve
{ printf("%d %s execve %s\\n", pid, comm, str(args->filename)); }
tracepoint:syscalls:sys_enter_execveat
{ printf("%d %s execveat %s\\n", pid, comm, str(args->filename)); }
tracepoint:syscalls:sys_enter_connect
{ printf("%d %s connect family=%d\\n", pid, comm, *(uint16 *)args->uservaddr); }
"""


class Bpftrace(Tool):
    """bpftrace printing one line per execve/execveat/connect to a file."""

    name = "bpftrace"
    loads_bpf = True

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp = tmp
        self.port = port
        self.script = tmp / "agentwatch-bench.bt"
        self.out = tmp / "bpftrace.out"
        self.err = tmp / "bpftrace.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def unavailable(self) -> str | None:
        if shutil.which("bpftrace") is None:
            return "bpftrace not found (run packaging/setup-bench.sh)"
        return None

    def _output(self) -> str:
        try:
            return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")
        except OSError:
            return ""

    def _marker(self) -> None:
        """A connect() of our own to the closed port: the line bpftrace prints for it
        proves the probes are attached."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except OSError:
                pass

    def start(self) -> dict[str, Any]:
        self.script.write_text(BPFTRACE_SCRIPT)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(["bpftrace", str(self.script)], stdout=out,
                                         stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent)
        t0, mine = time.monotonic(), f"{os.getpid()} "
        while True:
            if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                raise ToolFailed(f"bpftrace did not attach: {self._output()[-500:]}")
            text = self._output()
            if "Attaching" in text:
                if any(line.startswith(mine) and " connect " in line
                       for line in text.splitlines()):
                    break
                self._marker()
            time.sleep(0.1)
        attaching = next((x for x in text.splitlines() if x.startswith("Attaching")), "")
        return {"bpftrace_pid": self.proc.pid, "attached": attaching,
                "attach_s": round(time.monotonic() - t0, 2)}

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settle(self, timeout: float = 30) -> None:
        """Until bpftrace's output file stops growing."""
        t0, size = time.monotonic(), -1
        while time.monotonic() - t0 < timeout:
            now = self.out.stat().st_size
            if now == size:
                return
            size = now
            time.sleep(0.1)

    def finish(self) -> dict[str, Any]:
        self.settle()
        self.shutdown()
        lines = lost = 0
        with open(self.out, "rb") as f:
            for line in f:
                lines += 1
                if line.startswith(b"Lost ") and line.split()[1].isdigit():
                    lost += int(line.split()[1])
        stderr = self.err.read_text(errors="replace").strip()
        size = self.out.stat().st_size
        self.out.unlink()
        return {"output_lines": lines, "output_bytes": size, "lost_events": lost,
                "stderr": stderr[-500:]}

    def shutdown(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self.proc = None


def wait_no_foreign_bpf(timeout: float, baseline: int | None = None,
                        monitor_pid: int | None = None) -> float:
    """Wait (up to `timeout`) until no other process holds BPF programs and, given a
    baseline, the host-wide program count is back to it; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not bpf_holders(monitor_pid) and (baseline is None or bpf_prog_count() == baseline):
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def run_phase(tool: Tool, exe: Path, port: int, sizes: dict[str, int], reps: int,
              baseline: int | None, src: Sources) -> dict[str, Any]:
    """Load the tool, run the loops `reps` times each (round robin; for agentwatch then
    again as an agent), unload it. Marks the phase tainted when another process held BPF
    programs, the host-wide program count moved (tools without BPF only) or other work
    used more than BUSY_LIMIT cores."""
    foreign: set[str] = set()

    def check(started: bool = True) -> None:
        foreign.update(f"pid {p}" for p in bpf_holders(tool.pids()))
        if not tool.loads_bpf and (count := bpf_prog_count()) != baseline:
            foreign.add(f"{count} BPF programs loaded (baseline {baseline})")
        if started and not tool.alive():
            raise ToolFailed(f"{tool.name} exited during its phase")

    t_start = time.monotonic()
    load = OtherLoad(tool.pids)
    check(started=False)
    info = tool.start()
    runs: dict[str, dict[str, list[int]]] = {"untracked": {k: [] for k in LOOPS}}
    load.start()
    c0 = tool.counters()
    for _ in range(reps):
        for k in LOOPS:
            runs["untracked"][k].append(
                gen(*loop_args(exe, k, sizes, port), tick=tool.tick)["elapsed_ns"])
            tool.settle()
        check()
    if c0 is not None:
        c1 = tool.counters()
        info["events_from_untracked_loops"] = c1["events"] - c0["events"]
    tracked_counts: dict[str, list[dict[str, int]]] = {}
    if tool.tracks_agents:
        runs["tracked"] = {k: [] for k in LOOPS}
        tracked_counts = {k: [] for k in LOOPS}
        for _ in range(reps):
            for k in LOOPS:
                before = tool.counters()
                try:
                    g = gen(*tool.agent_cmd(), *loop_args(exe, k, sizes, port), src=src,
                            tick=tool.tick)
                except RuntimeError as e:  # e.g. the policy killed the agent
                    raise ToolFailed(f"tracked {k} loop: {e}") from None
                runs["tracked"][k].append(g["elapsed_ns"])
                tool.settle()
                after = tool.counters()
                if before is not None and after is not None:
                    tracked_counts[k].append({c: after[c] - before[c] for c in after})
            check()
        info["tracked_counters"] = tracked_counts
    cores = load.cores()
    info.update(tool.finish())
    if cores > BUSY_LIMIT:
        foreign.add(f"other work used {cores:.2f} CPU cores")
    return {"runs_ns": runs, "fastest_ns": {kind: {k: min(v) for k, v in r.items()}
                                            for kind, r in runs.items()},
            "other_load_cores": round(cores, 2), "foreign_bpf": sorted(foreign),
            "tainted": bool(foreign), "wall_s": round(time.monotonic() - t_start, 1),
            "tool": info}


def overhead(tools: list[Tool], failed: dict[str, str], exe: Path, port: int,
             sizes: dict[str, int], rounds: int, reps: int, patience: Patience,
             src: Sources) -> dict[str, Any]:
    names = [t.name for t in tools]
    log(f"overhead: warm-up, then {rounds} rounds of phases {['none', *names]}, {reps} runs "
        f"of each loop per phase; loop sizes {sizes}")
    t0 = time.monotonic()
    wait_no_foreign_bpf(patience.wait_s)
    baseline = bpf_prog_count()
    none = Tool()
    for k in LOOPS:  # warm-up, discarded
        gen(*loop_args(exe, k, sizes, port))
    raw: list[dict[str, Any]] = []
    clean = dict.fromkeys(["none", *names], 0)
    attempts = 0

    def wanted() -> bool:
        goal = [clean[t.name] for t in tools] or [clean["none"]]
        return min(goal) < rounds
    while wanted() and attempts < 3 * rounds and (
            attempts < rounds or time.monotonic() - t0 < patience.budget_s):
        attempts += 1
        rnd: dict[str, Any] = {"round": attempts, "phases": {}, "ratio": {}, "clean": {}}
        for tool in [none, *tools]:
            waited = (wait_no_foreign_bpf(patience.wait_s, baseline)
                      + OtherLoad(lambda: []).wait_quiet(patience.wait_s))
            try:
                phase = run_phase(tool, exe, port, sizes, reps, baseline, src)
            except ToolFailed as e:
                tool.shutdown()
                log(f"  {tool.name}: FAILED, left out from now on: {e}")
                failed[tool.name] = str(e)
                tools.remove(tool)
                continue
            phase["waited_for_quiet_s"] = round(waited, 1)
            rnd["phases"][tool.name] = phase
        base = rnd["phases"]["none"]
        clean["none"] += not base["tainted"]
        for name, ph in rnd["phases"].items():
            if name == "none":
                continue
            fast = ph["fastest_ns"]
            rnd["ratio"][name] = {
                kind: {k: fast[kind][k] / base["fastest_ns"]["untracked"][k] for k in LOOPS}
                for kind in fast}
            rnd["clean"][name] = not (base["tainted"] or ph["tainted"])
            clean[name] += rnd["clean"][name]
        raw.append(rnd)
        for name, ph in rnd["phases"].items():
            extra = phase_note(name, ph)
            r = rnd["ratio"].get(name)
            figures = ("  ".join(f"{kind[0]}:{k} {r[kind][k]:.3f}" for kind in r for k in LOOPS)
                       if r else "  ".join(f"{k} {v / sizes[k] / 1000:.3f} us"
                                           for k, v in ph["fastest_ns"]["untracked"].items()))
            log(f"  round {attempts} {name:<10} {figures}  ({ph['wall_s']} s{extra}"
                + (f"; TAINTED by {ph['foreign_bpf']}" if ph["tainted"] else "") + ")")
    return {"method": "rounds of phases none, " + ", ".join(names) + " (each tool loaded only "
                      "for its phase); per phase the fastest of "
                      f"{reps} runs of each loop; ratio = tool / none of the same round; a "
                      "round's ratio for a tool is not counted when its phase or the none "
                      "phase saw another process use BPF or other work use > "
                      f"{BUSY_LIMIT} cores",
            "reps": reps, "rounds_wanted": rounds, "loop_sizes": sizes,
            "bpf_programs_before": baseline, "tools": [t.name for t in tools],
            "tools_unavailable": failed,
            "clean_rounds": clean, "rounds": raw,
            "summary": overhead_summary(raw, names, sizes)}


def phase_note(name: str, ph: dict[str, Any]) -> str:
    t = ph["tool"]
    if name == "agentwatch":
        lost = sum(c["lost"] for v in t.get("tracked_counters", {}).values() for c in v)
        ev = sum(c["events"] for v in t.get("tracked_counters", {}).values() for c in v)
        return (f"; events from untracked loops {t.get('events_from_untracked_loops')}, "
                f"tracked {ev}, lost {lost}")
    if name == "auditd":
        a = t["audit_log"]
        return (f"; audit log +{a['records']} records ({a['syscall_records']} syscall, "
                f"{a['bytes'] / 2**20:.1f} MiB in {a['files']} file(s)), kernel lost "
                f"{t['kernel_lost']}")
    if name == "bpftrace":
        return f"; {t['output_lines']} lines, lost {t['lost_events']}"
    return ""


def overhead_summary(raw: list[dict[str, Any]], names: list[str],
                     sizes: dict[str, int]) -> dict[str, Any]:
    """Per kind (untracked, tracked) and loop: the none phase's time per op and, per tool,
    median/min/max of the clean rounds' ratios (all rounds when none was clean)."""
    out: dict[str, Any] = {}
    for kind in ("untracked", "tracked"):
        out[kind] = {}
        for k in LOOPS:
            row: dict[str, Any] = {"n": sizes[k], "none_us_per_op": statistics.median(
                r["phases"]["none"]["fastest_ns"]["untracked"][k] / sizes[k] / 1000
                for r in raw)}
            for name in names:
                have = [r for r in raw if name in r["ratio"]]
                if not have:
                    continue
                used = [r for r in have if r["clean"][name]] or have
                src_kind = kind if kind in have[0]["ratio"][name] else "untracked"
                row[name] = {
                    "ratio": spread([r["ratio"][name][src_kind][k] for r in used]),
                    "us_per_op": statistics.median(
                        r["phases"][name]["fastest_ns"][src_kind][k] / sizes[k] / 1000
                        for r in used),
                    "rounds": len(used), "only_tainted": not any(r["clean"][name] for r in have),
                    "same_as_untracked": src_kind != kind}
            out[kind][k] = row
    return out


# --- 2. throughput ----------------------------------------------------------------------


def expected_events(g: dict[str, Any]) -> int:
    """Events the generator caused: its own exec (agentwatch exec -> gen) and exit, one per
    connect, fork+exit per spawn plus exec when /bin/true ran, fork+exit per extra worker."""
    workers = int(g["workers"])
    extra = 2 * workers if workers > 1 else 0
    return 2 + int(g["connects"]) + 2 * int(g["spawns"]) + int(g["execs_ok"]) + extra


def throughput_step(mon: Monitor, exe: Path, port: int, rate: int, seconds: float,
                    exec_every: int, workers: int, patience: Patience) -> dict[str, Any]:
    assert mon.proc is not None
    load = OtherLoad(lambda: [mon.proc.pid] if mon.proc else [])
    waited = wait_no_foreign_bpf(patience.wait_s, monitor_pid=mon.proc.pid)
    waited += load.wait_quiet(patience.wait_s)
    foreign = set(bpf_holders(mon.proc.pid))  # another monitor competes for the CPUs
    before = mon.status()
    load.start()
    cpu0, t0 = mon.cpu_seconds(), time.monotonic()
    g = gen(*mon.src.cmd("exec", "--socket", mon.sock, "--agent", "bench", "--"),
            exe, "connect", rate, seconds, port, exec_every, workers, src=mon.src)
    at_end = mon.status()
    expected = expected_events(g)
    # connects past a process's flood budget are counted in the kernel, not delivered
    shed = at_end["counters"]["shed"] - before["counters"]["shed"]
    after, drain_s = wait_drained(mon, before["events"], expected - shed)
    cpu1, t1 = mon.cpu_seconds(), time.monotonic()
    others = load.cores()
    foreign.update(bpf_holders(mon.proc.pid))
    delivered = after["events"] - before["events"]
    lost = after["counters"]["lost"] - before["counters"]["lost"]
    elapsed = g["elapsed_ns"] / 1e9
    cpu = cpu1 - cpu0
    achieved = round(expected / elapsed)
    return {
        "target_rate": rate, "achieved_rate": achieved,
        "rate_reached": achieved >= RATE_TOLERANCE * rate,
        "seconds": round(elapsed, 3), "generator": g, "issued": expected,
        "delivered": delivered, "aggregated": shed, "lost": lost,
        "clean": lost == 0 and delivered + shed == expected,
        "backlog_at_end": expected - shed - (at_end["events"] - before["events"]),
        "drain_s": round(drain_s, 2),
        "monitor_cpu_s": round(cpu, 2), "window_s": round(t1 - t0, 2),
        "monitor_cpu_pct": round(100 * cpu / (t1 - t0), 1),
        # % of one core per 10,000 events/s == microseconds of monitor CPU per event
        "cpu_pct_per_10k_eps": round(cpu * 1e6 / delivered, 2) if delivered else None,
        "other_counters": {k: after["counters"][k] - before["counters"][k]
                           for k in after["counters"] if k != "lost"},
        "waited_for_quiet_s": round(waited, 1), "other_load_cores": round(others, 2),
        "foreign_bpf_pids": sorted(foreign),
        "disturbed": bool(foreign) or others > BUSY_LIMIT,
    }


def throughput(mon: Monitor, exe: Path, port: int, rates: list[int], seconds: float,
               exec_every: int, workers: int, patience: Patience) -> dict[str, Any]:
    log(f"throughput: steps {rates} events/s, {seconds:g} s each; 1 fork+exec per "
        f"{exec_every} connects; {workers} generator process(es)")
    startup = mon.start()
    steps = []
    try:
        for rate in rates:
            tries: list[dict[str, Any]] = []
            while len(tries) < patience.tries and (not tries or tries[-1]["disturbed"]):
                s = throughput_step(mon, exe, port, rate, seconds, exec_every, workers,
                                    patience)
                tries.append(s)
                log(f"  {rate:>7}/s: achieved {s['achieved_rate']}/s, delivered "
                    f"{s['delivered']}/{s['issued']}, lost {s['lost']}, drain "
                    f"{s['drain_s']} s, monitor CPU {s['monitor_cpu_pct']}%, others "
                    f"{s['other_load_cores']} cores" + (" DISTURBED" if s["disturbed"] else ""))
            steps.append({**tries[-1], "disturbed_attempts": tries[:-1]})
    finally:
        mon.stop()
    clean = [s for s in steps if s["clean"] and s["rate_reached"]]
    best = max(clean, key=lambda s: s["target_rate"]) if clean else None
    per10k = [s["cpu_pct_per_10k_eps"] for s in steps if s["cpu_pct_per_10k_eps"]]
    return {
        "method": "generator tracked via agentwatch exec; status delta after drain; a step "
                  f"during which another process used BPF, or other work used > {BUSY_LIMIT} "
                  f"cores, is redone, up to {patience.tries} tries",
        "mix": f"connect() calls, plus one fork+exec of /bin/true per {exec_every} connects",
        "goal_events_per_s": THROUGHPUT_GOAL, "monitor_start_s": round(startup, 3),
        "max_clean_target_rate": best["target_rate"] if best else 0,
        "max_clean_achieved_rate": best["achieved_rate"] if best else 0,
        "goal_met": bool(best and best["target_rate"] >= THROUGHPUT_GOAL),
        "cpu_pct_per_10k_eps": spread(per10k) if per10k else None,
        "steps": steps,
    }


# --- report -----------------------------------------------------------------------------


def goal_checks(o: dict[str, Any]) -> dict[str, Any]:
    """The agentwatch goals: untracked <= OVERHEAD_GOAL for every loop; tracked exec and
    connect within TRACKED_GOALS and below auditd's ratio (when auditd was measured)."""
    s = o["summary"]
    checks: dict[str, Any] = {}
    for k in LOOPS:
        aw = s["untracked"][k].get("agentwatch")
        checks[f"untracked {k}"] = {
            "goal": f"<= {OVERHEAD_GOAL}",
            "met": None if aw is None else aw["ratio"]["median"] <= OVERHEAD_GOAL}
    for k, limit in TRACKED_GOALS.items():
        aw, ad = s["tracked"][k].get("agentwatch"), s["tracked"][k].get("auditd")
        met = None
        if aw is not None:
            met = aw["ratio"]["median"] <= limit and (
                ad is None or aw["ratio"]["median"] < ad["ratio"]["median"])
        checks[f"tracked {k}"] = {
            "goal": f"<= {limit:.2f} and < auditd" + ("" if ad else " (auditd not measured)"),
            "met": met}
    return checks


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [f"agentwatch benchmark  {m['date']}  kernel {m['kernel']}  {m['nproc']} CPUs  "
           f"{m['cpu_model']}"]
    if m["other_monitors"]:
        out.append(f"WARNING: other monitors were running: {m['other_monitors']}")
    if "overhead" in res:
        o = res["overhead"]
        names = list(TOOLS)
        cr = o["clean_rounds"]
        out += ["", "Overhead: time with the tool / time with nothing loaded, same round; "
                    "median (min-max) over clean rounds ("
                    + ", ".join(f"{n} {cr[n]}" for n in names if n in cr) + ")",
                f"  {'loop':<8}{'kind':<10}{'none us/op':>11}  "
                + "".join(f"{n:<22}" for n in names) + "goal (agentwatch)"]
        checks = o["goals"]
        for k in LOOPS:
            for kind in ("untracked", "tracked"):
                row = o["summary"][kind][k]
                cells = []
                for n in names:
                    c = row.get(n)
                    if c is None:
                        cells.append(f"{'n/a':<22}")
                        continue
                    r = c["ratio"]
                    mark = "*" if c["same_as_untracked"] else ("!" if c["only_tainted"] else "")
                    cells.append(f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}){mark:<3}")
                g = checks.get(f"{kind} {k}")
                goal = "-" if g is None else (
                    f"{g['goal']}: " + {True: "met", False: "NOT met", None: "n/a"}[g["met"]])
                none_us = f"{row['none_us_per_op']:.3f}" if kind == "untracked" else ""
                out.append(f"  {k:<8}{kind:<10}{none_us:>11}  {''.join(cells)}{goal}")
        out.append("  * auditd and bpftrace trace every process: tracked = their untracked "
                   "runs.  ! only tainted rounds.")
        out.append("  untracked loops: gen run by the bench; tracked: for agentwatch, gen run "
                   "as an agent through `agentwatch exec --agent bench`")
        for n, why in o["tools_unavailable"].items():
            out.append(f"  {n}: NOT MEASURED: {why}")
        rounds = o["rounds"]
        notes = []
        aw = [r["phases"]["agentwatch"]["tool"] for r in rounds if "agentwatch" in r["phases"]]
        if aw:
            ev = [t.get("events_from_untracked_loops") for t in aw]
            lost = sum(c["lost"] for t in aw for v in t["tracked_counters"].values() for c in v)
            tracked = sum(c["events"] for t in aw for v in t["tracked_counters"].values()
                          for c in v)
            notes.append(f"agentwatch: events from untracked loops per round {ev} (must be 0); "
                         f"tracked loops: {tracked} events delivered, {lost} lost")
        ad = [r["phases"]["auditd"]["tool"] for r in rounds if "auditd" in r["phases"]]
        if ad:
            notes.append("auditd: records written to the audit log per phase "
                         f"{[t['audit_log']['records'] for t in ad]} (syscall records "
                         f"{[t['audit_log']['syscall_records'] for t in ad]}), kernel lost "
                         f"{[t['kernel_lost'] for t in ad]}")
        bt = [r["phases"]["bpftrace"]["tool"] for r in rounds if "bpftrace" in r["phases"]]
        if bt:
            notes.append(f"bpftrace: lines printed per phase {[t['output_lines'] for t in bt]}, "
                         f"events lost {[t['lost_events'] for t in bt]}")
        if o.get("audit_never_task_rule"):
            notes.append("audit: `-a never,task` loaded outside the auditd phases (new tasks "
                         "start without the syscall-audit flag, as before audit was ever "
                         "enabled); removed at the end")
        out += [f"  {x}" for x in notes]
        tainted = [(r["round"], n) for r in rounds for n, ph in r["phases"].items()
                   if ph["tainted"]]
        if tainted:
            out.append(f"  tainted phases (round, config) {tainted}: other BPF users or CPU "
                       "load meanwhile; their rounds' ratios not counted")
        if o["bpf_programs_before"]:
            out.append(f"  NOTE: {o['bpf_programs_before']} BPF programs were loaded before "
                       "the bench (by no running process?): they ran in every phase")
    if "throughput" in res:
        t = res["throughput"]
        out += ["", f"Throughput of tracked events ({t['mix']}; goal >= "
                    f"{THROUGHPUT_GOAL}/s with no loss)",
                f"  {'target/s':>9}{'achieved/s':>11}{'issued':>10}{'delivered':>10}"
                f"{'lost':>9}{'backlog@end':>12}{'drain s':>8}{'mon CPU%':>9}"
                f"{'%/10k ev/s':>11}{'others':>8}"]
        for s in t["steps"]:
            out.append(f"  {s['target_rate']:>9}{s['achieved_rate']:>11}{s['issued']:>10}"
                       f"{s['delivered']:>10}{s['lost']:>9}{s['backlog_at_end']:>12}"
                       f"{s['drain_s']:>8}{s['monitor_cpu_pct']:>9}"
                       f"{s['cpu_pct_per_10k_eps'] or 0:>11}{s['other_load_cores']:>8}"
                       + ("  DISTURBED" if s["disturbed"] else ""))
        out.append(f"  highest clean step: {t['max_clean_target_rate']}/s (achieved "
                   f"{t['max_clean_achieved_rate']}/s); goal met: {t['goal_met']}")
    return "\n".join(out)


def tool_versions() -> dict[str, str | None]:
    def version(*cmd: str) -> str | None:
        if shutil.which(cmd[0]) is None:
            return None
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        return (res.stdout + res.stderr).strip() or None if res.returncode == 0 else None
    return {"auditd": version("dpkg-query", "-W", "-f=${Version}", "auditd"),
            "bpftrace": version("bpftrace", "--version")}


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
    sizes = ({"exec": 500, "connect": 100_000, "getppid": 3_000_000} if q else
             {"exec": 2000, "connect": 300_000, "getppid": 10_000_000})
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
