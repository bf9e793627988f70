"""Unit tests for monitor.service.daemon.Monitor with fake probes and a fixture /proc tree.

The OS is a constructor argument: FakeProbes stands in for the BPF object (it keeps the
kernel maps as dicts, with the same key semantics as probes/agentwatch.bpf.c) and ProcFS
reads a /proc tree written under tmp_path.
"""

from __future__ import annotations

import ctypes as ct
import os
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from timebox import within

from monitor.config.settings import Config, load_config_text
from monitor.kernel.loader import TrackedProc
from monitor.model import cmdline, events
from monitor.model.errors import ControlError
from monitor.model.events import (
    AGENT_PENDING,
    ANY_UID,
    SESSION_KERNEL_BIT,
    CForkEvent,
    CHeader,
    Event,
    EventType,
    ExecEvent,
    ExecFlag,
    ForkEvent,
    Header,
    Setting,
)
from monitor.observe.jsonlog import JsonLog
from monitor.policy.rules import Mode, load_policy_text
from monitor.service.control import Peer
from monitor.service.daemon import Monitor
from monitor.sessions.intake import UNCONFIRMED_LOG_SECONDS
from monitor.sessions.procfs import PF_KTHREAD, ProcFS, ProcInfo
from tests.support.clock import FakeClock
from tests.support.enforce import FakeSignaller
from tests.support.kernel import FakeProbes
from tests.support.log import Log

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


# --- fixture /proc -------------------------------------------------------------------------


def make_proc(root: Path, pid: int, ppid: int, comm: str, *, uid: int = 1000,
              argv: tuple[str, ...] | None = None, exe: str | None = None,
              flags: int = 0, cgroup: str = "/user.slice/app.scope") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = ["S", str(ppid), str(pid), str(pid), "0", "-1", str(flags)]
    fields += ["0"] * 12 + [str(5000 + pid)] + ["0"] * 30
    d.joinpath("stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    d.joinpath("status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    args = argv if argv is not None else (comm,)
    d.joinpath("cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in args))
    d.joinpath("cgroup").write_text(f"0::{cgroup}\n")
    os.symlink(exe if exe is not None else f"/usr/bin/{comm}", d / "exe")


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


# --- fakes ---------------------------------------------------------------------------------


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
    return Header(ts_ns=ts, pid=pid, tid=pid, session=session, agent=agent, uid=uid, comm=comm)


# --- in-kernel matchers --------------------------------------------------------------------


def test_install_matchers_fills_kernel_tables(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.mon.reloads.install_matchers()
    assert r.probes.match_comm == {
        (b"claude".ljust(16, b"\0"), ANY_UID): CLAUDE,
        (b"node".ljust(16, b"\0"), USERS["agent"]): SCOPED_NODE,
    }
    assert r.probes.match_uid == {USERS["ci"]: CI_BOT}
    # exe/cmdline/cgroup need userspace: untracked execs must be sent as candidates
    assert r.probes.settings[Setting.EXEC_CANDIDATES] == 1
    # what the kernel then recognises by itself
    assert r.probes.kernel_match("claude", 1234) == CLAUDE
    assert r.probes.kernel_match("node", USERS["agent"]) == SCOPED_NODE
    assert r.probes.kernel_match("node", 1234) is None
    assert r.probes.kernel_match("bash", USERS["ci"]) == CI_BOT
    assert r.probes.kernel_match("goose", 1000) is None  # goose also needs its exe checked
    assert r.probes.kernel_match("python3", 1000) is None


def test_no_exec_candidates_without_userspace_matchers(tmp_path: Path) -> None:
    r = rig(tmp_path, config("""\
        agents:
          - name: claude-code
            match:
              - comm: claude
              - uid: 1500
        """))
    r.mon.reloads.install_matchers()
    assert r.probes.settings[Setting.EXEC_CANDIDATES] == 0
    assert r.probes.kernel_match("claude", 1) == 0
    assert r.probes.kernel_match("sh", 1500) == 0


@pytest.mark.parametrize("key", ["exe: /opt/x/*", "cmdline: x", "cgroup: /x/*"])
def test_any_userspace_key_turns_candidates_on(tmp_path: Path, key: str) -> None:
    r = rig(tmp_path, config(f"""\
        agents:
          - name: a
            match:
              - comm: claude
          - name: b
            match:
              - {key}
        """))
    r.mon.reloads.install_matchers()
    assert r.probes.settings[Setting.EXEC_CANDIDATES] == 1
    assert list(r.probes.match_comm.items()) == [((b"claude".ljust(16, b"\0"), ANY_UID), 0)]
    assert r.probes.match_uid == {}


def test_long_comm_is_cut_like_the_kernel_cuts_it(tmp_path: Path) -> None:
    r = rig(tmp_path, config("""\
        agents:
          - name: a
            match:
              - comm: abcdefghijklmno
        """))
    r.mon.reloads.install_matchers()
    assert r.probes.kernel_match("abcdefghijklmno", 0) == 0


def test_kernel_matchers_follow_file_order_across_comm_and_uid(tmp_path: Path) -> None:
    cfg = config("""\
        agents:
          - name: by-uid
            match:
              - uid: 1500
          - name: by-comm
            match:
              - comm: claude
          - name: scoped
            match:
              - comm: claude
                uid: 1600
              - comm: node
                uid: 1500
        """)
    r = rig(tmp_path, cfg)
    r.mon.reloads.install_matchers()
    for comm, uid in (("claude", 1500), ("claude", 1600), ("claude", 7), ("node", 1500),
                      ("node", 1600), ("sh", 1500), ("sh", 7)):
        facts = ProcInfo(1, 0, comm, "/x", (comm,), uid, "/", 1, False)
        spec = cfg.recognise(r.mon.recognizer.facts(facts))
        want = None if spec is None else [a.name for a in cfg.agents].index(spec.name)
        assert r.probes.kernel_match(comm, uid) == want, (comm, uid)


def test_kernel_matchers_agree_with_file_order(tmp_path: Path) -> None:
    cfg = config("""\
        agents:
          - name: first
            match:
              - comm: claude
          - name: second
            match:
              - comm: claude
                user: ci
        """)
    r = rig(tmp_path, cfg)
    r.mon.reloads.install_matchers()
    for uid in (1000, USERS["ci"]):
        facts = ProcInfo(1, 0, "claude", "/x", ("claude",), uid, "/", 1, False)
        spec = cfg.recognise(r.mon.recognizer.facts(facts))
        assert spec is not None and spec.name == "first"
        assert r.probes.kernel_match("claude", uid) == 0, f"uid {uid}"


# --- adopting what already runs ------------------------------------------------------------


def test_adopt_running_tree(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    assert r.mon.adopter.adopt_running() == 6
    assert set(r.probes.procs) == {B, B + 1, B + 2, B + 3, B + 20, B + 21}
    by_pid = {pid: (sid, agent, ppid) for pid, sid, agent, ppid in r.probes.track_calls}
    s_claude, s_aider = by_pid[B][0], by_pid[B + 20][0]
    assert s_claude != s_aider
    assert not s_claude & SESSION_KERNEL_BIT and not s_aider & SESSION_KERNEL_BIT
    assert by_pid[B] == (s_claude, CLAUDE, 0)
    assert by_pid[B + 1] == (s_claude, CLAUDE, B)
    assert by_pid[B + 2] == (s_claude, CLAUDE, B + 1)
    assert by_pid[B + 3] == (s_claude, CLAUDE, B)
    assert by_pid[B + 20] == (s_aider, AIDER, 0)
    assert by_pid[B + 21] == (s_aider, AIDER, B + 20)

    sessions = {s.agent: s for s in r.mon.tracker.sessions()}
    assert set(sessions) == {"claude-code", "aider"}
    assert sessions["claude-code"].root_pid == B
    assert set(sessions["claude-code"].processes) == {B, B + 1, B + 2, B + 3}
    assert sessions["aider"].root_pid == B + 20
    assert set(sessions["aider"].processes) == {B + 20, B + 21}
    node = r.mon.tracker.process(B + 2)
    assert node is not None and node.argv == ("node", "server.js") and node.exe == "/usr/bin/node"
    assert [p.pid for p in r.mon.tracker.ancestry(B + 2)] == [B + 2, B + 1, B]


def test_adopt_never_takes_monitor_pid1_or_kernel_threads(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    touched = {pid for pid, *_ in r.probes.track_calls}
    assert ME not in touched
    assert 1 not in touched
    assert B + 40 not in touched
    assert r.mon.tracker.process(ME) is None
    assert r.mon.tracker.process(1) is None


def test_adopt_skips_the_agent_the_monitor_runs_inside(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc, monitor_parent=B + 1)  # the monitor was started from the agent's shell
    r.mon.adopter.adopt_running()
    assert {s.agent for s in r.mon.tracker.sessions()} == {"aider"}
    assert not {B, B + 1} & set(r.probes.procs)


def test_adopt_is_not_repeated(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    calls = len(r.probes.track_calls)
    sessions = {s.id for s in r.mon.tracker.sessions()}
    # a second start-up scan must not open new sessions for trees already tracked
    r.mon.adopter.adopt_stragglers(r.mon.recognizer.excluded())
    assert len(r.probes.track_calls) == calls
    assert {s.id for s in r.mon.tracker.sessions()} == sessions


class LateFork(ProcFS):
    """A /proc where one child appears only after the first scan (forked meanwhile)."""

    def __init__(self, root: Path, late: int) -> None:
        super().__init__(root)
        self.late = late
        self.scans = 0

    def scan(self) -> dict[int, ProcInfo]:
        self.scans += 1
        infos = super().scan()
        if self.scans == 1:
            infos.pop(self.late, None)
        return infos

    def read(self, pid: int) -> ProcInfo | None:
        if pid == self.late and self.scans < 2:
            return None
        return super().read(pid)


def test_child_forked_during_first_scan_is_adopted(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    agent_tree(proc)
    make_proc(proc, B + 4, B + 3, "ssh", argv=("ssh", "host"))
    r = rig(tmp_path, procfs=LateFork(proc, B + 4))
    assert r.mon.adopter.adopt_running() == 7
    git = r.probes.procs[B + 3]
    assert r.probes.procs[B + 4].session == git.session
    assert r.probes.procs[B + 4].ppid == B + 3
    late = r.mon.tracker.process(B + 4)
    assert late is not None and late.session == git.session and late.argv == ("ssh", "host")


def test_start_attaches_before_adopting_and_logs(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.start()
    try:
        assert r.probes.opened
        assert r.probes.callback is not None
        # probes attached, matchers and candidate setting in place, then the /proc scan:
        # anything that starts meanwhile is caught by the kernel or by the scan
        before_scan = r.probes.calls[: r.probes.calls.index("track")]
        assert before_scan[0] == "open"
        assert {"set_matchers", "set_setting EXEC_CANDIDATES"} <= set(before_scan)
        assert r.probes.settings[Setting.EXEC_CANDIDATES] == 1
        assert len(r.mon.tracker.sessions()) == 2
        (started,) = r.log.find("monitor started")
        assert started["sessions"] == 2 and started["probes"] == 10
    finally:
        r.mon.stop()
    assert not r.probes.opened and r.probes.calls[-1] == "close"
    assert r.log.find("monitor stopped")


# --- register (agentwatch exec) ------------------------------------------------------------


def test_register_starts_a_session(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    s = r.mon.registry.register(B + 10, "my-tool")
    assert s.agent == "my-tool" and s.root_pid == B + 10
    assert not s.id & SESSION_KERNEL_BIT
    idx = r.mon.agents.index("my-tool")
    assert r.mon.agents.name(idx) == "my-tool"
    assert r.probes.track_calls == [(B + 10, s.id, idx, 0)]
    assert r.mon.tracker.session(s.id) is s
    (log,) = r.log.find("agent session started")
    assert log["root_pid"] == B + 10 and log["agent"] == "my-tool"


def test_register_refuses_already_tracked_pid(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    calls = list(r.probes.track_calls)
    sessions = {s.id for s in r.mon.tracker.sessions()}
    with pytest.raises(ControlError, match=f"process {B + 2} is already tracked as part of "
                       "agent 'claude-code'"):
        r.mon.registry.register(B + 2, "other")
    assert r.probes.track_calls == calls
    assert {s.id for s in r.mon.tracker.sessions()} == sessions
    proc = r.mon.tracker.process(B + 2)
    assert proc is not None
    session = r.mon.tracker.session(proc.session)
    assert session is not None
    assert session.agent == "claude-code"


def test_register_refuses_missing_pid(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    with pytest.raises(ControlError, match=f"process {B + 99} is gone"):
        r.mon.registry.register(B + 99, "x")
    assert r.probes.track_calls == []
    assert r.mon.tracker.sessions() == []


def test_register_refuses_the_monitor_itself(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    with pytest.raises(ControlError, match="monitor"):
        r.mon.registry.register(ME, "x")
    assert r.probes.track_calls == []


class FakePeer(Peer):
    """A control-socket peer whose liveness the test decides."""

    def __init__(self, pid: int, alive: bool = True) -> None:
        super().__init__(pid, 0, 0, None)
        self._alive = alive

    def alive(self) -> bool:
        return self._alive


def test_register_op_reply(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    reply = r.mon.registry.op_register({"op": "register", "agent": "tool"}, FakePeer(B + 10))
    assert reply["ok"] is True and reply["pid"] == B + 10
    assert r.mon.tracker.session(reply["session"]) is not None
    again = r.mon.registry.op_register({"op": "register", "agent": "tool"}, FakePeer(B + 10))
    assert again["ok"] is False and "already tracked" in again["error"]
    for bad in ("", None, 5, "x" * 64, "bot\x1b]0;pwned\x07", "a\nb", "bad-\udcff"):
        refused = r.mon.registry.op_register({"op": "register", "agent": bad}, FakePeer(B + 1))
        assert refused["ok"] is False and "1-63 printable characters" in refused["error"]
    assert not r.probes.is_tracked(B + 1)


def test_register_refuses_a_peer_that_exited_before_its_request_was_handled(
        tmp_path: Path) -> None:
    """The pid the request came from now names another process (or none): registering it
    would make an innocent process an agent root."""
    r = rig(tmp_path)
    agent_tree(r.proc)
    reply = r.mon.registry.op_register({"op": "register", "agent": "tool"},
                               FakePeer(B + 10, alive=False))
    assert reply["ok"] is False and "exited before it was registered" in reply["error"]
    assert r.probes.track_calls == []
    assert r.mon.tracker.sessions() == []
    assert not r.log.find("agent session started")


# --- events --------------------------------------------------------------------------------


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


def test_candidate_matching_cmdline_starts_session(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    pid = B + 20  # python3 -m aider
    r.mon.handle(kernel_candidate(r, pid, ("python3", "-m", "aider", "--yes")))
    # accepted: the kernel entry keeps its session and gets the agent's index
    assert r.probes.is_tracked(pid)
    assert r.probes.procs[pid].session == PENDING
    assert r.probes.procs[pid].agent == AIDER
    assert r.probes.untrack_calls == []
    session = r.mon.tracker.session(PENDING)
    assert session is not None and session.agent == "aider" and session.root_pid == pid
    proc = r.mon.tracker.process(pid)
    assert proc is not None and proc.argv == ("python3", "-m", "aider", "--yes")
    assert [e.filename for e in proc.execs] == ["/usr/bin/python3.11"]
    # the sink sees the event as an aider event
    ((ev, agent),) = r.sink
    assert agent == "aider"
    assert isinstance(ev, ExecEvent)
    assert ev.h.session == PENDING and ev.h.agent == AIDER
    assert [s["agent"] for s in r.mon.status()["sessions"]] == ["aider"]
    (log,) = r.log.find("agent session started")
    assert log["via"] == "userspace match" and log["root_pid"] == pid


def test_accepted_candidate_children_are_named_too(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    pid = B + 20
    fork = pending_fork(r, pid, B + 21)  # forked before userspace decided: still pending
    r.mon.handle(kernel_candidate(r, pid, ("python3", "-m", "aider")))
    assert r.probes.procs[B + 21].agent == AGENT_PENDING
    r.mon.handle(fork)
    assert r.probes.procs[B + 21].agent == AIDER
    assert r.probes.procs[B + 21].session == PENDING
    session = r.mon.tracker.session(PENDING)
    assert session is not None and set(session.processes) == {pid, B + 21}
    assert [(type(ev).__name__, agent) for ev, agent in r.sink] == [
        ("ExecEvent", "aider"), ("ForkEvent", "aider")]


def test_candidate_is_judged_on_its_exec_argv(tmp_path: Path) -> None:
    r = rig(tmp_path)
    make_proc(r.proc, B + 50, 1, "python3", argv=("aider-renamed-itself",))
    r.mon.handle(kernel_candidate(r, B + 50, ("python3", "-m", "aider")))
    assert r.probes.procs[B + 50].agent == AIDER
    assert [a for _, a in r.sink] == ["aider"]


def test_candidate_matching_exe_glob(tmp_path: Path) -> None:
    r = rig(tmp_path)
    make_proc(r.proc, B + 51, 1, "goose", exe="/opt/goose/bin/goose")
    make_proc(r.proc, B + 52, 1, "goose", exe="/usr/bin/goose")  # same comm, other exe
    r.mon.handle(kernel_candidate(r, B + 51, ("goose",), comm="goose",
                                  filename="/opt/goose/bin/goose", session=PENDING))
    r.mon.handle(kernel_candidate(r, B + 52, ("goose",), comm="goose",
                                  filename="/usr/bin/goose", session=PENDING + 1))
    assert [(ev.h.pid, a) for ev, a in r.sink] == [(B + 51, "goose")]
    assert r.probes.is_tracked(B + 51) and not r.probes.is_tracked(B + 52)


def test_non_matching_candidate_is_untracked_and_not_reported(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    fork = pending_fork(r, B + 10, B + 11)
    r.mon.handle(kernel_candidate(r, B + 10, ("bash", "-c", "ls"), comm="bash",
                                  filename="/usr/bin/bash"))
    assert r.sink == []
    assert not r.probes.is_tracked(B + 10)
    assert r.mon.tracker.sessions() == []
    # later events of the rejected session (already in the ring) untrack what they name
    r.mon.handle(fork)
    assert not r.probes.is_tracked(B + 11)
    assert r.sink == []
    assert r.probes.track_calls == []
    assert r.mon.events == 2


def test_monitor_is_never_accepted_as_candidate(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.handle(kernel_candidate(r, ME, ("python3", "-m", "aider")))
    assert not r.probes.is_tracked(ME)
    assert r.sink == []
    assert r.mon.tracker.sessions() == []


def test_register_accepts_a_pid_still_in_a_pending_session(tmp_path: Path) -> None:
    # `agentwatch exec` is itself exec'd, so with userspace matchers it is a candidate
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.probes.procs[B + 10] = TrackedProc(B + 10, PENDING, AGENT_PENDING, 0, -1, 0, 0)
    s = r.mon.registry.register(B + 10, "my-tool")
    assert r.probes.procs[B + 10].session == s.id
    assert r.probes.procs[B + 10].agent == r.mon.agents.index("my-tool")


def test_late_rejection_does_not_untrack_a_registered_process(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    ev = kernel_candidate(r, B + 10, ("agentwatch", "exec", "--agent", "my-tool"),
                          comm="agentwatch")
    # the register request is served before the main loop reads the candidate's exec
    s = r.mon.registry.register(B + 10, "my-tool")
    r.mon.handle(ev)
    assert r.probes.is_tracked(B + 10), "the registered agent root was untracked"
    assert r.probes.procs[B + 10].session == s.id


def test_trace_all_reports_untracked_events(tmp_path: Path) -> None:
    r = rig(tmp_path, trace_all=True)
    agent_tree(r.proc)
    ev = ExecEvent(header(B + 10, comm="bash"), old_tid=B + 10, ppid=0, cgroup_id=1,
                   flags=ExecFlag.UNTRACKED, filename="/usr/bin/bash", argv=("bash",))
    r.mon.handle(ev)
    assert r.sink == [(ev, "")]
    assert r.probes.track_calls == []


def test_trace_all_reports_rejected_candidates(tmp_path: Path) -> None:
    r = rig(tmp_path, trace_all=True)
    agent_tree(r.proc)
    r.mon.handle(kernel_candidate(r, B + 10, ("bash", "-c", "ls"), comm="bash",
                                  filename="/usr/bin/bash"))
    assert [(type(ev).__name__, ev.h.pid, agent) for ev, agent in r.sink] == [
        ("ExecEvent", B + 10, "")]


def test_kernel_new_root_and_tracked_events_reach_sink(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    sid = SESSION_KERNEL_BIT | 7
    root = ExecEvent(header(B, session=sid, agent=CLAUDE, comm="claude"), old_tid=B, ppid=0,
                     cgroup_id=1, flags=ExecFlag.NEW_ROOT | ExecFlag.ARGV_MISSING,
                     filename="/opt/claude/bin/claude", argv=())
    r.mon.handle(root)
    r.mon.handle(ForkEvent(header(B, session=sid, agent=CLAUDE, comm="claude", ts=2_000),
                           child_pid=B + 1))
    assert [(type(ev).__name__, agent) for ev, agent in r.sink] == [
        ("ExecEvent", "claude-code"), ("ForkEvent", "claude-code")]
    first = r.sink[0][0]
    assert isinstance(first, ExecEvent)
    assert first.argv == ("claude", "--resume")  # argv not captured: read from /proc
    s = r.mon.tracker.session(sid)
    assert s is not None and s.agent == "claude-code" and set(s.processes) == {B, B + 1}
    (log,) = r.log.find("agent session started")
    assert log["via"] == "kernel match" and log["session"] == sid
    assert r.probes.track_calls == []  # the kernel tracks it already


def test_raw_records_are_decoded_and_bad_ones_counted(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.start()
    try:
        assert r.probes.callback is not None
        f = CForkEvent()
        f.h = CHeader(9, EventType.FORK, B, B, SESSION_KERNEL_BIT | 3, CLAUDE, 1000, b"claude")
        f.child_pid = B + 5
        r.probes.callback(bytes(f))
        r.probes.callback(bytes(f)[:10])
        r.probes.callback(bytes(f)[: ct.sizeof(CHeader)])
    finally:
        r.mon.stop()
    assert [(type(ev).__name__, agent) for ev, agent in r.sink] == [("ForkEvent", "claude-code")]
    assert r.mon.decode_errors == 2
    errors = [f for m, level, f in r.log.lines if m == "undecodable event" and level == "error"]
    assert len(errors) == 2
    assert r.mon.status()["decode_errors"] == 2


def test_tick_reads_cpu_from_kernel_map(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    r.probes.procs[B + 2] = replace(r.probes.procs[B + 2], cpu_ns=2_500_000_000)
    r.probes.procs[B] = replace(r.probes.procs[B], cpu_ns=500_000_000)
    r.mon.tick()
    st = r.mon.status()
    by_agent = {s["agent"]: s for s in st["sessions"]}
    assert by_agent["claude-code"]["cpu_seconds"] == 3.0
    assert by_agent["claude-code"]["processes"] == 4
    assert by_agent["aider"]["cpu_seconds"] == 0
    assert st["counters"]["lost"] == 0
    assert st["agents"][:5] == ["claude-code", "ci-bot", "scoped-node", "aider", "goose"]


# --- command lines the probes cut ------------------------------------------------------------

ARGV_POLICY = """\
mode: monitor
rules:
  - name: no-ssh-forward
    event: exec
    action: kill
    match: {ssh: [remote_forward]}
  - name: no-stratum
    event: exec
    action: kill
    match: {argv: ['stratum\\+tcp://']}
"""
CUT = ExecFlag.ARGV_FROM_MM | ExecFlag.ARGV_TRUNC_LEN


def argv_rig(tmp_path: Path, clock: FakeClock | None = None) -> Rig:
    r = rig(tmp_path)
    r.mon = Monitor(config(), load_policy_text(ARGV_POLICY, "argv.yaml"), probes=r.probes,
                    procfs=ProcFS(r.proc), sink=lambda ev, agent: r.sink.append((ev, agent)),
                    log=r.log, clock=clock)
    return r


def cut_exec(pid: int, raw: bytes, comm: str = "ssh") -> ExecEvent:
    """The exec as the probes send it: the first ARGS_SIZE bytes of the argument block."""
    kept = raw[: events.ARGS_SIZE]
    return ExecEvent(header(pid, session=SESSION_KERNEL_BIT | 5, agent=CLAUDE, comm=comm),
                     old_tid=pid, ppid=1, cgroup_id=1, flags=CUT, filename=f"/usr/bin/{comm}",
                     argv=tuple(a.decode("utf-8", "surrogateescape")
                                for a in kept.split(b"\0")))


def proc_cmdline(r: Rig, pid: int, raw: bytes, comm: str = "ssh") -> None:
    make_proc(r.proc, pid, 1, comm)
    (r.proc / str(pid) / "cmdline").write_bytes(raw)


SSH_R = b"ssh\0-o\0SendEnv=X\xff" + b"A" * 3000 + b"\0-NR\0009000:localhost:22\0attacker\0"
STRATUM = b"worker\0--label=\xff" + b"A" * 3000 + b"\0--pool\0stratum+tcp://pool:3333\0"


@pytest.mark.parametrize(("raw", "comm", "rule"), [
    (SSH_R, "ssh", "no-ssh-forward"),
    (STRATUM, "worker", "no-stratum"),
    (SSH_R.replace(b"A" * 3000, b"A" * 6_000_000), "ssh", "no-ssh-forward"),
    (b"ssh\0" + b"-v\0" * 600_000 + b"-R\0x\0h\0", "ssh", "no-ssh-forward"),
    (STRATUM.replace(b"A" * 3000 + b"\0", b"A\0" * 600_000), "worker", "no-stratum"),
])
def test_an_invalid_byte_and_padding_do_not_hide_the_rest_of_a_command_line(
        tmp_path: Path, raw: bytes, comm: str, rule: str) -> None:
    r = argv_rig(tmp_path)
    pid = B + 60
    proc_cmdline(r, pid, raw, comm)
    r.mon.handle(cut_exec(pid, raw, comm))
    (v,) = r.log.find("verdict")
    assert v["rule"] == rule and v["pid"] == pid and v["outcome"] == "would kill"
    # judged whole, kept bounded: the process, the event stream and the log line
    proc = r.mon.tracker.process(pid)
    shown = r.sink[-1][0]
    assert proc is not None and isinstance(shown, ExecEvent)
    for argv in (proc.argv, shown.argv, v["argv"]):
        assert sum(len(a) + 1 for a in argv) <= cmdline.KEEP_CHARS + 100
    assert not r.log.find("command line judged on the probes' cut copy")


@pytest.mark.parametrize(("shown", "reason"), [(b"sleep\x005\0", "changed"), (None, "gone")])
def test_a_cut_command_line_proc_cannot_confirm_is_counted_and_said(
        tmp_path: Path, shown: bytes | None, reason: str) -> None:
    r = argv_rig(tmp_path)
    pid = B + 61
    if shown is not None:
        proc_cmdline(r, pid, shown)
    for _ in range(3):
        r.mon.handle(cut_exec(pid, SSH_R))
    assert not r.log.find("verdict")  # the first 2,560 bytes hold no forward: not judged so
    assert r.mon.metrics.argv_unconfirmed() == {("claude-code", reason): 3}
    (said,) = r.log.find("command line judged on the probes' cut copy")  # once per 10 s
    assert said["reason"] == reason and said["pid"] == pid and said["agent"] == "claude-code"
    assert said["rules"] == ["no-ssh-forward", "no-stratum"]
    assert said["judged_bytes"] == events.ARGS_SIZE
    (ev, _), *_ = r.sink
    assert isinstance(ev, ExecEvent) and ev.argv_truncated


def test_an_unconfirmed_command_line_is_said_again_after_the_quiet_window(
        tmp_path: Path) -> None:
    clock = FakeClock()
    r = argv_rig(tmp_path, clock)
    said = "command line judged on the probes' cut copy"
    for _ in range(3):
        r.mon.handle(cut_exec(B + 61, SSH_R))
        clock.advance(UNCONFIRMED_LOG_SECONDS / 4)
    assert [f["unsaid"] for f in r.log.find(said)] == [0]
    clock.advance(UNCONFIRMED_LOG_SECONDS / 4)  # 10 s after the first: said again
    r.mon.handle(cut_exec(B + 61, SSH_R))
    assert [f["unsaid"] for f in r.log.find(said)] == [0, 2]
    assert r.mon.metrics.argv_unconfirmed() == {("claude-code", "gone"): 4}


def test_the_monitor_keeps_at_most_max_processes_and_says_how_many_it_let_go(
        tmp_path: Path) -> None:
    r = rig(tmp_path, config(CONFIG.replace("  history: 4\n",
                                            "  history: 4\n  max_processes: 1024\n")))
    sid = SESSION_KERNEL_BIT | 9
    for pid in range(B, B + 1030):  # exits lost, say: nothing ever drops them
        r.mon.handle(ExecEvent(header(pid, session=sid, agent=CLAUDE), old_tid=pid, ppid=1,
                               cgroup_id=1, flags=0, filename="/bin/true", argv=("true",)))
    st = r.mon.status()
    assert sum(s["processes"] for s in st["sessions"]) == 1024
    assert st["processes_evicted"] == 6


# --- fail-closed and connect decisions (policy-wide kernel switches) -----------------------


@pytest.mark.parametrize("text,fail_closed,decide", [
    ("mode: enforce\n", 1, 0),
    ("mode: enforce\nfail_closed: alert\n", 0, 0),
    ("mode: enforce\nrules:\n  - name: meta\n    event: connect\n    action: alert\n"
     "    match: {address: [169.254.169.254]}\n", 1, 1),
])
def test_policy_switches_reach_the_kernel_at_start_and_reload(
        tmp_path: Path, text: str, fail_closed: int, decide: int) -> None:
    from monitor.policy.rules import load_policy_text

    r = rig(tmp_path)
    r.mon.start()
    try:
        assert r.probes.settings[Setting.FAIL_CLOSED] == 1  # the default: kill
        r.mon.reloads.swap(r.mon.config, load_policy_text(text, "p.yaml"))
        assert r.probes.settings[Setting.FAIL_CLOSED] == fail_closed
        assert r.probes.settings[Setting.CONNECT_DECIDE] == decide
    finally:
        r.mon.stop()


def test_reconcile_forgets_what_the_kernel_stopped_tracking_and_judges_what_it_missed(
        tmp_path: Path) -> None:
    """Records lost: a process the map dropped (its exit record lost) leaves the tracker
    after two ticks; one the map holds but no record announced is read from /proc and
    judged."""
    from monitor.policy.rules import load_policy_text

    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.start()
    try:
        r.mon.reloads.swap(r.mon.config, load_policy_text(
            "mode: monitor\nrules:\n  - name: no-reverse\n    event: exec\n"
            "    action: kill\n    match: {ssh: [remote_forward]}\n", "p.yaml"))
        (session,) = [s for s in r.mon.tracker.sessions() if s.agent == "claude-code"]
        gone = next(iter(session.processes))
        r.probes.procs.pop(gone)  # exited; its exit record never came
        make_proc(r.proc, 4242, session.root_pid, "ssh",
                  argv=("ssh", "-R", "9000:localhost:22", "x.example"))
        r.probes.procs[4242] = TrackedProc(4242, session.id,
                                           r.mon.agents.index("claude-code"),
                                           session.root_pid, events.STATUS_UNSET, 0, 0)
        r.probes.lost = 1  # the kernel counted a loss
        r.mon.tick()
        assert r.mon.tracker.process(gone) is not None  # one tick absent: maybe in flight
        assert r.mon.tracker.process(4242) is not None
        (v,) = r.log.find("verdict")
        assert v["pid"] == 4242 and v["rule"] == "no-reverse" and v["outcome"] == "would kill"
        r.mon.tick()
        assert r.mon.tracker.process(gone) is None
    finally:
        r.mon.stop()
# --- what the disk refuses: metrics -----------------------------------------------------------


def test_audit_lines_and_alerts_a_full_disk_refuses_are_exported_and_overflow_counted(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The monitor's audit log and alert spool on a full disk (/dev/full; the spool's queue
    made unusable): what waits in memory and what is dropped beyond the bounds (8 MiB of
    audit lines, 16 MiB of alerts) is on /metrics, and no traceback is printed."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from monitor.observe.alerts import kill_alert
    from monitor.observe.metrics import AgentwatchCollector

    audit = tmp_path / "audit.jsonl"
    audit.symlink_to("/dev/full")
    spool = tmp_path / "spool"
    cfg = config(CONFIG + f"  audit_log: {audit}\nalerts:\n  webhook_url: http://127.0.0.1:9/x\n"
                 f"  spool_dir: {spool}\n")
    mon = Monitor(cfg, probes=FakeProbes(False),
                  procfs=ProcFS(tmp_path / "proc"))
    mon.notifier.start()
    try:
        (spool / "queue").rmdir()
        (spool / "queue").write_text("")  # the spool's disk refuses every write
        for i in range(9000):  # ~9.4 MiB of verdict lines
            mon.log("verdict", rule="no-reverse-ssh", pid=i, argv=["x" * 1000])
        for i in range(170):  # ~17 MiB of alerts
            mon.notifier.notify(kill_alert(agent="claude-code", rule="r", action="kill",
                                           outcome="killed", reason="r", at=1e9 + i,
                                           argv=("x" * 100_000,)))
        registry = CollectorRegistry()
        registry.register(AgentwatchCollector(mon.report))
        text = generate_latest(registry).decode()
        got = {(s.name, s.labels["sink"]): s.value
               for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("agentwatch_sink_")}
        assert got[("agentwatch_sink_dropped_total", "audit_log")] > 0
        assert got[("agentwatch_sink_buffered", "audit_log")] + \
            got[("agentwatch_sink_dropped_total", "audit_log")] == 9000
        assert got[("agentwatch_sink_buffered", "alert_spool")] + \
            got[("agentwatch_sink_dropped_total", "alert_spool")] == 170
        assert got[("agentwatch_sink_dropped_total", "alert_spool")] > 0
        assert got[("agentwatch_sink_write_errors_total", "audit_log")] >= 1
        assert got[("agentwatch_sink_write_errors_total", "alert_spool")] >= 1
    finally:
        mon.notifier.close()
        assert isinstance(mon.log, JsonLog)
        mon.log.close()  # its retry thread stops
    assert "Traceback" not in capfd.readouterr().err


# --- reload: a hostile or broken file never takes the monitor down (issue 10, item 8) -----


HOSTILE_POLICIES = {
    "deep": "mode: enforce\nrules: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "bomb": "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))
    + "mode: *l8\n",
    "long-number": "mode: enforce\nrules:\n  - {name: a, event: processes, action: kill, "
                   "match: {above: " + "7" * 5000 + "}}\n",
    "backreference": "mode: enforce\nrules:\n  - {name: a, event: exec, action: kill, "
                     "match: {argv: ['(a)\\1']}}\n",
}


def _reload(tmp_path: Path, text: str) -> tuple[bool, bool, dict[str, int], list[str]]:
    """(reload ok, policy unchanged, reload counts, reasons logged) after a reload of text."""
    from monitor.policy.rules import load_policy

    r = rig(tmp_path)
    before = r.mon.policy.sha256
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    r.mon.reloads.loader = lambda: (r.mon.config, load_policy(path))
    ok = r.mon.reload_from_files()
    return (ok, r.mon.policy.sha256 == before, r.mon.metrics.snapshot().reloads,
            [f["reason"] for f in r.log.find("policy reload refused")])


@pytest.mark.parametrize("name", sorted(HOSTILE_POLICIES))
def test_a_reload_of_a_hostile_policy_is_refused_and_the_old_one_stays(
        tmp_path: Path, name: str) -> None:
    # in a child with a time limit: on a YAML bomb the old loader ran for minutes
    ok, unchanged, reloads, [reason] = within(
        20, lambda: _reload(tmp_path, HOSTILE_POLICIES[name]))
    assert (ok, unchanged, reloads) == (False, True, {"ok": 0, "refused": 1})
    assert reason.startswith(f"{tmp_path}/policy.yaml:") and len(reason) < 2000


def test_a_loader_bug_during_a_reload_is_logged_and_the_monitor_keeps_running(
        tmp_path: Path) -> None:
    r = rig(tmp_path)
    before = r.mon.policy.sha256

    def broken() -> tuple[Config, Any]:
        raise RecursionError("maximum recursion depth exceeded")

    r.mon.reloads.loader = broken
    assert r.mon.reload_from_files() is False
    assert r.mon.policy.sha256 == before
    [refused] = r.log.find("policy reload refused")
    assert refused["reason"].startswith("internal error RecursionError")
    assert "broken" in refused["traceback"]
    assert r.mon.metrics.snapshot().reloads["refused"] == 1


# --- the kill switch (the operator's: it kills in monitor mode too) -------------------------


def killswitch_rig(tmp_path: Path) -> tuple[Rig, FakeSignaller]:
    """The fixture tree adopted under a monitor-mode policy, with a fake signaller: the
    fixture's pids may name real processes on this host, which no test may signal."""
    r = rig(tmp_path)
    assert r.mon.policy.mode == Mode.MONITOR
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    signaller = FakeSignaller(r.probes)
    r.mon.enforcer.signaller = signaller
    return r, signaller


def session_of(r: Rig, root: int) -> int:
    proc = r.mon.tracker.process(root)
    assert proc is not None
    return proc.session


def test_the_kill_switch_kills_in_monitor_mode_too(tmp_path: Path) -> None:
    r, signaller = killswitch_rig(tmp_path)
    claude, aider = session_of(r, B), session_of(r, B + 20)
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "claude-code"}, FakePeer(77),
                                 r.mon.on_loop)
    # every process of the one agent's session, none of the other agent's
    assert reply == {"ok": True, "sessions": 1, "killed": 4, "latched": []}
    assert sorted(signaller.killed) == [B, B + 1, B + 2, B + 3]
    assert r.probes.manual == {claude}  # doomed as the operator's: kills in monitor mode
    assert aider not in r.probes.doomed
    assert r.probes.session_pids(aider) == [B + 20, B + 21]
    assert r.log.find("killswitch") == [{"agent": "claude-code", "action": "kill",
                                         "sessions": [claude], "killed": 4,
                                         "requested_by": "pid 77"}]
    counts = {a.label: a.killswitch for a in r.mon.metrics.snapshot().agents}
    assert counts["claude-code"] == 1 and counts["aider"] == 0
    assert r.probes.latched == {}


def test_a_latched_kill_switch_kills_a_new_session_until_released(tmp_path: Path) -> None:
    r, signaller = killswitch_rig(tmp_path)
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "aider", "latch": True},
                                 FakePeer(77), r.mon.on_loop)
    assert reply == {"ok": True, "sessions": 1, "killed": 2, "latched": ["aider"]}
    assert r.probes.latched == {AIDER: True}
    # registering a latched agent is refused; a new session recognised in userspace dies
    with pytest.raises(ControlError, match="the kill switch is latched for 'aider'"):
        r.mon.registry.register(B + 10, "aider")
    make_proc(r.proc, B + 30, 1, "python3", argv=("python3", "-m", "aider"))
    r.mon.handle(kernel_candidate(r, B + 30, ("python3", "-m", "aider")))
    wait_until(lambda: B + 30 in signaller.killed)
    assert PENDING in r.probes.manual
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "aider", "release": True},
                                 FakePeer(77), r.mon.on_loop)
    assert reply == {"ok": True, "released": "aider", "latched": []}
    assert r.probes.latched == {AIDER: False}
    assert [f["action"] for f in r.log.find("killswitch")] == ["latch", "release"]


def test_the_kill_switch_refuses_an_unknown_agent(tmp_path: Path) -> None:
    r, signaller = killswitch_rig(tmp_path)
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "nobody"}, FakePeer(77),
                                 r.mon.on_loop)
    assert reply["ok"] is False and "unknown agent 'nobody'" in reply["error"]
    assert signaller.killed == [] and r.probes.doomed == set()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for what another thread does (timebox.within runs its function in a child
    process, which cannot see this process's threads)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not so within {timeout} s"
        time.sleep(0.001)


def test_control_operations_run_on_the_loop(tmp_path: Path) -> None:
    """register, status, reload and the kill switch's latch reach the loop through its
    queue: the loop is the one writer of session state."""
    r = rig(tmp_path)
    agent_tree(r.proc)
    stop = threading.Event()
    loop = threading.Thread(target=r.mon.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_until(lambda: r.probes.polls > 0)
        assert r.mon.on_loop(threading.current_thread) is loop
        reply = r.mon._handlers()["register"]({"op": "register", "agent": "tool"},
                                              FakePeer(B + 10))
        assert reply == {"ok": True, "session": 1, "pid": B + 10}
        status = r.mon._handlers()["status"]({"op": "status"}, FakePeer(B + 10))
        assert [s["agent"] for s in status["sessions"]] == ["tool"]
        with pytest.raises(ControlError, match="unknown agent"):
            r.mon.on_loop(lambda: r.mon.kill_switch.plan("nobody", False, False, ""))
    finally:
        stop.set()
        loop.join(5)
    assert not loop.is_alive()
    assert r.mon.on_loop(threading.current_thread) is threading.current_thread()
