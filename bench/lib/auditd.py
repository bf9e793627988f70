"""auditd as a configuration of bench/run.py's overhead comparison: the kernel's audit
settings for the run (put back as found, by a guardian process if need be), the audit log
read back, and the daemon started and stopped per phase.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from .harness import (
    die_with_parent,
    log,
    stop_process,
)
from .tools import Tool, ToolFailed, run

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
            # it restores once more (harmless) and exits
            stop_process(self.guardian, timeout=10)
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
