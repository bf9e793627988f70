"""The configurations bench/run.py compares: none (the Tool base class), agentwatch and
bpftrace (auditd is in bench/lib/auditd.py), each loaded for its phase and unloaded after.

Every process started here is stopped by pid; nothing is left loaded after shutdown().
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import (
    Monitor,
    die_with_parent,
    stop_process,
)


class ToolFailed(Exception):
    """A tool could not be started or died during its phase: its column is left out."""


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


def tool_versions() -> dict[str, str | None]:
    def version(*cmd: str) -> str | None:
        if shutil.which(cmd[0]) is None:
            return None
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        return (res.stdout + res.stderr).strip() or None if res.returncode == 0 else None
    return {"auditd": version("dpkg-query", "-W", "-f=${Version}", "auditd"),
            "bpftrace": version("bpftrace", "--version")}
