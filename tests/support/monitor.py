"""A daemon to test without root: a Monitor on FakeProbes, a fixture /proc tree under
tmp_path and a Log, with the agents config the tests share, and builders of the records
the probes would send (pending candidates and their forks).

The OS is a constructor argument: FakeProbes stands in for the BPF object (it keeps the
kernel maps as dicts, with the same key semantics as probes/agentwatch.bpf.c) and ProcFS
reads the /proc tree written here. Used by tests/unit/test_daemon.py and the tests of
each of the daemon's parts (intake, adoption, registry, agent matchers, kill switch).
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monitor.config.load import load_config_text
from monitor.config.types import Config
from monitor.kernel.mapio import TrackedProc
from monitor.model import events
from monitor.model.events import (
    AGENT_PENDING,
    SESSION_KERNEL_BIT,
    Event,
    ExecEvent,
    ExecFlag,
    ForkEvent,
    Header,
)
from monitor.service.control import Peer
from monitor.service.daemon import Monitor
from monitor.sessions.procfs import PF_KTHREAD, ProcFS

from .events import header as event_header
from .kernel import FakeProbes
from .log import Log
from .procfs import make_proc as write_proc

USERS = {"agent": 1001, "ci": 1002}

CONFIG = """\
agents:
  - name: claude-code        # 0: in the kernel, by comm
    match:
      - comm: claude
  - name: ci-bot             # 1: in the kernel, by uid
    match:
      - user: ci
  - name: scoped-node        # 2: in the kernel, comm and uid together
    match:
      - comm: node
        user: agent
  - name: aider              # 3: userspace, by command line
    match:
      - cmdline: "python3? .*-m aider"
  - name: goose              # 4: userspace: comm AND exe cannot be judged in the kernel
    match:
      - comm: goose
        exe: /opt/goose/*
monitor:
  history: 4
"""
CLAUDE, CI_BOT, SCOPED_NODE, AIDER, GOOSE = range(5)

ME = os.getpid()


def config(text: str = CONFIG) -> Config:
    return load_config_text(textwrap.dedent(text), "test.yaml", user_lookup=USERS.__getitem__)


def free_base(span: int = 100) -> int:
    """A pid range for fixture processes that cannot collide with this process's pid."""
    base = 1000
    while base <= ME < base + span:
        base += 1000
    return base


B = free_base()


# --- fixture /proc ---------------------------------------------------------------------------


def make_proc(root: Path, pid: int, ppid: int, comm: str, *, uid: int = 1000,
              argv: tuple[str, ...] | None = None, exe: str | None = None,
              flags: int = 0, cgroup: str = "/user.slice/app.scope") -> None:
    """root/PID for a process `comm` (argv default: just comm; exe default /usr/bin/COMM),
    started 5000 + pid clock ticks after boot; written by tests/support/procfs.py."""
    write_proc(root, pid, ppid, comm, flags=flags, start=5000 + pid, uid=uid,
               argv=argv if argv is not None else (comm,), cgroup=f"0::{cgroup}\n",
               exe=exe if exe is not None else f"/usr/bin/{comm}")


def agent_tree(root: Path, monitor_parent: int = 1) -> None:
    r"""
    1 claude                 pid 1 looks like an agent: never adopted
    ME claude                the monitor itself looks like an agent: never adopted
    B claude                 agent root (claude-code, in-kernel comm matcher)
    ├── B+1 bash
    │   └── B+2 node
    └── B+3 git
    B+10 bash                not an agent
    └── B+20 python3 -m aider    agent root (aider, userspace cmdline matcher)
        └── B+21 sh
    B+40 claude              kernel thread: never adopted
    """
    make_proc(root, 1, 0, "claude", uid=0, argv=("/sbin/init",))
    make_proc(root, ME, monitor_parent, "claude", uid=0, argv=("python3", "-m", "aider"))
    make_proc(root, B, 1, "claude", argv=("claude", "--resume"), exe="/opt/claude/bin/claude")
    make_proc(root, B + 1, B, "bash")
    make_proc(root, B + 2, B + 1, "node", argv=("node", "server.js"))
    make_proc(root, B + 3, B, "git", argv=("git", "status"))
    make_proc(root, B + 10, 1, "bash")
    make_proc(root, B + 20, B + 10, "python3", argv=("python3", "-m", "aider", "--yes"))
    make_proc(root, B + 21, B + 20, "sh", argv=("sh", "-c", "make"))
    make_proc(root, B + 40, 2, "claude", flags=PF_KTHREAD, argv=())


@dataclass
class Rig:
    mon: Monitor
    probes: FakeProbes
    sink: list[tuple[Event, str]]
    log: Log
    proc: Path


def rig(tmp_path: Path, cfg: Config | None = None, trace_all: bool = False,
        procfs: ProcFS | None = None) -> Rig:
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    probes = FakeProbes(trace_all)
    seen: list[tuple[Event, str]] = []
    log = Log()
    mon = Monitor(cfg or config(), probes=probes,
                  procfs=procfs or ProcFS(proc),
                  sink=lambda ev, agent: seen.append((ev, agent)), log=log)
    return Rig(mon, probes, seen, log, proc)


def header(pid: int, *, session: int = 0, agent: int = 0, comm: str = "python3",
           uid: int = 1000, ts: int = 1_000) -> Header:
    """An event header of an untracked process by default (tests/support/events.py)."""
    return event_header(pid, ts, comm=comm, session=session, agent=agent, uid=uid)


class FakePeer(Peer):
    """A control-socket peer whose liveness the test decides."""

    def __init__(self, pid: int, alive: bool = True) -> None:
        super().__init__(pid, 0, 0, None)
        self._alive = alive

    def alive(self) -> bool:
        return self._alive


PENDING = SESSION_KERNEL_BIT | (3 << 24) | 41  # a pending session id made by the probes


def kernel_candidate(r: Rig, pid: int, argv: tuple[str, ...], comm: str = "python3",
                     filename: str = "/usr/bin/python3.11", session: int = PENDING,
                     ) -> ExecEvent:
    """What sched_process_exec does for an untracked exec when userspace matchers exist:
    track the process at once in a pending session and send the exec as a candidate."""
    r.probes.procs[pid] = TrackedProc(pid, session, AGENT_PENDING, 0, events.STATUS_UNSET, 0, 0)
    return ExecEvent(header(pid, session=session, agent=AGENT_PENDING, comm=comm),
                     old_tid=pid, ppid=0, cgroup_id=1, flags=ExecFlag.CANDIDATE,
                     filename=filename, argv=argv)


def pending_fork(r: Rig, pid: int, child: int, session: int = PENDING) -> ForkEvent:
    """task_newtask of a pending-session process: the child copies the pending entry."""
    r.probes.procs[child] = TrackedProc(child, session, r.probes.procs[pid].agent
                                        if pid in r.probes.procs else AGENT_PENDING,
                                        pid, events.STATUS_UNSET, 0, 0)
    return ForkEvent(header(pid, session=session, agent=AGENT_PENDING, ts=2_000),
                     child_pid=child)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for what another thread does (timebox.within runs its function in a child
    process, which cannot see this process's threads)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not so within {timeout} s"
        time.sleep(0.001)
