"""Unit tests for monitor.enforce.enforcer: the guard rails of every kill, with a fake signal
sender,
a fake kernel process map and a fixture /proc tree (no root, nothing is really signalled).

The fakes share one journal of calls, so a test can check the order: the pidfd is opened
before /proc and the kernel map are consulted (the process checked is the process
signalled), and it is closed whatever happens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from monitor.enforce.enforcer import Enforcer, KillOutcome, KillResult
from monitor.sessions.procfs import PF_KTHREAD, ProcFS, ProcInfo, clock_ticks
from tests.support import procfs

TICK_NS = 1_000_000_000 // clock_ticks()
S1, S2 = 0x8000_0001, 0x8000_0002
MONITOR, MONITOR_PARENT = 700, 699


def make_proc(root: Path, pid: int, ppid: int = 1, comm: str = "proc", *, start: int = 1000,
              flags: int = 0) -> None:
    procfs.make_proc(root, pid, ppid, comm, start=start, flags=flags, argv=(comm,),
                     cgroup="0::/user.slice\n", exe=f"/usr/bin/{comm}")


class Journal(list[tuple[str, int]]):
    def names(self) -> list[str]:
        return [name for name, _ in self]


class FakeKernel:
    """The kernel's process map: pid -> session. `forks[n]` are (pid, session) pairs that
    appear just before the n-th session_pids call (a process forking between rounds)."""

    def __init__(self, journal: Journal, members: dict[int, int],
                 forks: dict[int, list[tuple[int, int]]] | None = None) -> None:
        self.journal = journal
        self.members = dict(members)
        self.forks = forks or {}
        self.doomed: list[int] = []
        self.rounds = 0

    def session_of(self, pid: int) -> int | None:
        self.journal.append(("session_of", pid))
        return self.members.get(pid)

    def session_pids(self, session: int) -> list[int]:
        self.rounds += 1
        for pid, s in self.forks.get(self.rounds, []):
            self.members[pid] = s
        self.journal.append(("session_pids", session))
        return sorted(p for p, s in self.members.items() if s == session)

    def doom(self, session: int, manual: bool = False) -> None:
        self.journal.append(("doom", session))
        self.doomed.append(session)

    def exited(self, pid: int) -> None:
        self.members.pop(pid, None)


class FakeSignaller:
    """Records open/kill/close; a killed process leaves the kernel map (it died)."""

    def __init__(self, journal: Journal, kernel: FakeKernel | None = None, *,
                 gone_at_open: Iterable[int] = (), gone_at_send: Iterable[int] = ()) -> None:
        self.journal = journal
        self.kernel = kernel
        self.gone_at_open = set(gone_at_open)
        self.gone_at_send = set(gone_at_send)
        self.fds: dict[int, int] = {}
        self.open_fds: set[int] = set()
        self.killed: list[int] = []
        self._next = 100

    def open(self, pid: int) -> int:
        self.journal.append(("open", pid))
        if pid in self.gone_at_open:
            raise ProcessLookupError(3, "No such process")
        self._next += 1
        self.fds[self._next] = pid
        self.open_fds.add(self._next)
        return self._next

    def kill(self, fd: int) -> None:
        pid = self.fds[fd]
        assert fd in self.open_fds, "signal through a closed pidfd"
        self.journal.append(("kill", pid))
        if pid in self.gone_at_send:
            raise ProcessLookupError(3, "No such process")
        self.killed.append(pid)
        if self.kernel is not None:
            self.kernel.exited(pid)

    def close(self, fd: int) -> None:
        self.journal.append(("close", self.fds[fd]))
        self.open_fds.remove(fd)


class RecordingProcFS(ProcFS):
    def __init__(self, root: Path, journal: Journal) -> None:
        super().__init__(root)
        self.journal = journal

    def read(self, pid: int) -> ProcInfo | None:
        self.journal.append(("proc", pid))
        return super().read(pid)


class Rig:
    def __init__(self, root: Path, members: dict[int, int],
                 forks: dict[int, list[tuple[int, int]]] | None = None, *,
                 gone_at_open: Iterable[int] = (), gone_at_send: Iterable[int] = ()) -> None:
        self.journal = Journal()
        self.kernel = FakeKernel(self.journal, members, forks)
        self.signaller = FakeSignaller(self.journal, self.kernel, gone_at_open=gone_at_open,
                                       gone_at_send=gone_at_send)
        self.enforcer = Enforcer(self.kernel, RecordingProcFS(root, self.journal),
                                 lambda: {MONITOR, MONITOR_PARENT}, signaller=self.signaller)

    def kill(self, pid: int, session: int = S1, ts: int | None = None) -> KillResult:
        return self.enforcer.kill(pid, session, ts)

    def assert_every_pidfd_closed(self) -> None:
        assert self.signaller.open_fds == set()
        opened = sorted(p for name, p in self.journal if name == "open"
                        and p not in self.signaller.gone_at_open)
        closed = sorted(p for name, p in self.journal if name == "close")
        assert opened == closed


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    for pid in (200, 201, 202, 203, 204, 300, MONITOR, MONITOR_PARENT, 1):
        make_proc(tmp_path, pid)
    make_proc(tmp_path, 50, 2, "kworker/0:1", flags=PF_KTHREAD)
    return tmp_path


# --- kill: guard rails ------------------------------------------------------------------------


def test_a_process_of_the_session_is_killed_through_its_pidfd(proc: Path) -> None:
    rig = Rig(proc, {200: S1})
    assert rig.kill(200, ts=2000 * TICK_NS) == KillResult(200, KillOutcome.KILLED)
    assert rig.signaller.killed == [200]
    # opened first, then checked, then signalled, then closed
    assert rig.journal == [("open", 200), ("proc", 200), ("session_of", 200), ("kill", 200),
                           ("close", 200)]


@pytest.mark.parametrize("pid", [0, 1, -1])
def test_pid_0_and_1_are_never_signalled(proc: Path, pid: int) -> None:
    rig = Rig(proc, {0: S1, 1: S1, -1: S1})
    result = rig.kill(pid)
    assert result.outcome == KillOutcome.REFUSED
    assert rig.signaller.killed == []
    assert "kill" not in rig.journal.names()
    rig.assert_every_pidfd_closed()


@pytest.mark.parametrize("pid", [MONITOR, MONITOR_PARENT])
def test_the_monitor_and_its_ancestors_are_refused(proc: Path, pid: int) -> None:
    rig = Rig(proc, {pid: S1})  # even if the kernel map (wrongly) lists it in the session
    result = rig.kill(pid)
    assert result.outcome == KillOutcome.REFUSED
    assert "monitor" in result.reason
    assert rig.signaller.killed == []
    rig.assert_every_pidfd_closed()


def test_a_kernel_thread_is_refused(proc: Path) -> None:
    rig = Rig(proc, {50: S1})
    result = rig.kill(50)
    assert result.outcome == KillOutcome.REFUSED
    assert "kernel thread" in result.reason
    assert rig.signaller.killed == []
    assert rig.journal.names()[0] == "open"
    rig.assert_every_pidfd_closed()


@pytest.mark.parametrize("members", [{200: S2}, {}], ids=["other-session", "untracked"])
def test_a_process_outside_the_named_session_is_refused(proc: Path,
                                                        members: dict[int, int]) -> None:
    rig = Rig(proc, members)
    result = rig.kill(200, S1)
    assert result.outcome == KillOutcome.REFUSED
    assert str(S1) in result.reason
    assert rig.signaller.killed == []
    assert rig.journal.names()[:1] == ["open"]
    assert ("session_of", 200) in rig.journal
    rig.assert_every_pidfd_closed()


def test_a_recycled_pid_is_refused_and_the_original_process_is_killed(tmp_path: Path) -> None:
    start = 50_000  # ticks since boot
    make_proc(tmp_path, 200, start=start)
    started_ns = start * TICK_NS
    rig = Rig(tmp_path, {200: S1})
    # the event happened more than a tick before this process started: another process
    recycled = rig.kill(200, ts=started_ns - TICK_NS - 1)
    assert recycled.outcome == KillOutcome.REFUSED
    assert "recycled" in recycled.reason
    assert rig.signaller.killed == []
    # a process that started before the event (or within the tick /proc rounds to) dies
    for ts in (started_ns - TICK_NS, started_ns, started_ns + 3600 * 10**9):
        assert rig.kill(200, ts=ts).outcome == KillOutcome.KILLED
        rig.kernel.members[200] = S1  # back in the map for the next round
    assert rig.signaller.killed == [200, 200, 200]
    rig.assert_every_pidfd_closed()


def test_without_an_event_time_the_start_time_is_not_checked(tmp_path: Path) -> None:
    make_proc(tmp_path, 200, start=10**9)
    rig = Rig(tmp_path, {200: S1})
    assert rig.kill(200, ts=None).outcome == KillOutcome.KILLED


def test_gone_at_open_is_not_an_error(proc: Path) -> None:
    rig = Rig(proc, {200: S1}, gone_at_open=[200])
    result = rig.kill(200)
    assert result.outcome == KillOutcome.GONE
    assert rig.signaller.killed == []
    assert rig.journal == [("open", 200)]  # nothing opened, nothing to close


def test_gone_at_send_is_not_an_error_and_closes_the_pidfd(proc: Path) -> None:
    rig = Rig(proc, {200: S1}, gone_at_send=[200])
    result = rig.kill(200)
    assert result.outcome == KillOutcome.GONE
    assert rig.journal.names() == ["open", "proc", "session_of", "kill", "close"]
    rig.assert_every_pidfd_closed()


def test_gone_from_proc_after_open_closes_the_pidfd(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {200: S1})  # no /proc/200: it exited after the pidfd was opened
    result = rig.kill(200)
    assert result.outcome == KillOutcome.GONE
    assert rig.signaller.killed == []
    rig.assert_every_pidfd_closed()


def test_the_pidfd_is_closed_when_a_check_raises(proc: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(proc, {200: S1})

    def broken(pid: int) -> int | None:
        raise RuntimeError("kernel map unreadable")

    monkeypatch.setattr(rig.kernel, "session_of", broken)
    with pytest.raises(RuntimeError):
        rig.kill(200)
    assert rig.signaller.killed == []
    rig.assert_every_pidfd_closed()


# --- kill_session -------------------------------------------------------------------------------


def test_kill_session_dooms_first_then_kills_every_member(proc: Path) -> None:
    rig = Rig(proc, {200: S1, 201: S1, 202: S1, 300: S2})
    results = rig.enforcer.kill_session(S1, known=[200, 201])
    assert rig.journal[0] == ("doom", S1)
    assert rig.kernel.doomed == [S1]
    assert sorted(rig.signaller.killed) == [200, 201, 202]
    assert {r.pid: r.outcome for r in results} == {200: KillOutcome.KILLED, 201: KillOutcome.KILLED,
                                                   202: KillOutcome.KILLED}
    assert 300 not in rig.signaller.killed
    rig.assert_every_pidfd_closed()


def test_kill_session_catches_a_process_forked_between_rounds(proc: Path) -> None:
    # round 1 lists 200 and 201; while they die, 201 forks 203, which round 2 lists
    rig = Rig(proc, {200: S1, 201: S1}, forks={2: [(203, S1)]})
    results = rig.enforcer.kill_session(S1)
    assert sorted(rig.signaller.killed) == [200, 201, 203]
    assert {r.pid for r in results if r.outcome == KillOutcome.KILLED} == {200, 201, 203}
    # it stops as soon as the kernel lists nobody: rounds 1 and 2 killed, round 3 empty
    assert rig.kernel.rounds == 3
    assert rig.journal.names()[-1] == "session_pids"
    rig.assert_every_pidfd_closed()


def test_kill_session_never_signals_a_pid_outside_the_session(proc: Path) -> None:
    rig = Rig(proc, {200: S1, 300: S2, 204: S2})
    results = rig.enforcer.kill_session(S1, known=[200, 300, 1, MONITOR, 204])
    assert rig.signaller.killed == [200]
    outcomes = {r.pid: r.outcome for r in results}
    assert outcomes == {200: KillOutcome.KILLED, 300: KillOutcome.REFUSED, 1: KillOutcome.REFUSED,
                        MONITOR: KillOutcome.REFUSED, 204: KillOutcome.REFUSED}
    assert rig.kernel.members == {300: S2, 204: S2}
    rig.assert_every_pidfd_closed()


def test_kill_session_gives_up_after_its_rounds(proc: Path) -> None:
    # a member the kernel keeps listing (it cannot be killed: gone from /proc, a zombie)
    rig = Rig(proc, {200: S1, 999: S1})
    results = rig.enforcer.kill_session(S1, rounds=5)
    assert rig.kernel.rounds == 5
    assert {r.pid: r.outcome for r in results} == {200: KillOutcome.KILLED, 999: KillOutcome.GONE}
    assert rig.signaller.killed == [200]
    rig.assert_every_pidfd_closed()


def test_kill_session_in_the_background_returns_after_one_round(proc: Path) -> None:
    """The judge's kill-agent runs on the event thread: it gets the first round's results
    at once, and the later rounds (and the pauses between them) run on their own thread,
    still catching a process forked meanwhile."""
    rig = Rig(proc, {200: S1, 999: S1}, forks={3: [(203, S1)]})
    results = rig.enforcer.kill_session(S1, known=[200], rounds=5, background=True)
    assert {r.pid: r.outcome for r in results} == {200: KillOutcome.KILLED,
                                                   999: KillOutcome.GONE}
    deadline = time.monotonic() + 10
    while rig.kernel.rounds < 5:  # 999 stays listed: every round runs, on the sweeper
        assert time.monotonic() < deadline, f"the sweep stopped at round {rig.kernel.rounds}"
        time.sleep(0.01)
    assert 203 in rig.signaller.killed  # forked before round 3, killed by the sweeper


def test_kill_session_of_an_empty_session_only_dooms(proc: Path) -> None:
    rig = Rig(proc, {300: S2})
    assert rig.enforcer.kill_session(S1) == []
    assert rig.journal == [("doom", S1), ("session_pids", S1)]
