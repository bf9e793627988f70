"""Adopting agent trees that already run (monitor/sessions/adoption.py), on a fixture
/proc tree.
"""

from __future__ import annotations

from pathlib import Path

from monitor.model.events import (
    SESSION_KERNEL_BIT,
    Setting,
)
from monitor.sessions.procfs import ProcFS, ProcInfo
from tests.support.monitor import (
    AIDER,
    CLAUDE,
    ME,
    B,
    agent_tree,
    make_proc,
    rig,
)

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
