"""Kill from userspace, race-free: through a pidfd, after checking the process is the one
the verdict named.

Guard rails, checked on every kill: never pid 0 or 1, never a kernel thread, never the
monitor or one of its ancestors, never a process outside the agent session the verdict
named (the kernel's process map is the authority), never a process that started after the
event (a recycled pid). The pidfd is opened first and the checks run against it, so the
process checked is the process signalled. This module never decides policy.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from monitor.sessions.procfs import ProcFS, clock_ticks

SWEEP_PAUSE_SECONDS = 0.002  # between two rounds of kill_session: forks in flight land


class KillOutcome(StrEnum):
    """What one SIGKILL attempt did (not to be confused with monitor.model.outcome.Outcome,
    what became of a verdict)."""

    KILLED = "killed"
    GONE = "gone"
    REFUSED = "refused"


@dataclass(frozen=True)
class KillResult:
    pid: int
    outcome: KillOutcome
    reason: str = ""


class SessionMap(Protocol):
    """The kernel's view: which session a pid is tracked in (monitor/kernel/loader.py Probes)."""

    def session_of(self, pid: int) -> int | None: ...
    def session_pids(self, session: int) -> list[int]: ...
    def doom(self, session: int, manual: bool = False) -> None: ...


class Signaller(Protocol):
    def open(self, pid: int) -> int: ...
    def kill(self, fd: int) -> None: ...
    def close(self, fd: int) -> None: ...


class PidfdSignaller:
    """The real thing: pidfd_open(2) + pidfd_send_signal(2)."""

    def open(self, pid: int) -> int:
        return os.pidfd_open(pid)

    def kill(self, fd: int) -> None:
        signal.pidfd_send_signal(fd, signal.SIGKILL)

    def close(self, fd: int) -> None:
        os.close(fd)


class Enforcer:
    def __init__(self, kernel: SessionMap, procfs: ProcFS, protected: Callable[[], set[int]],
                 *, signaller: Signaller | None = None) -> None:
        self.kernel = kernel
        self.procfs = procfs
        self.protected = protected
        self.signaller = signaller or PidfdSignaller()
        self._tick_ns = 1_000_000_000 // clock_ticks()

    def kill(self, pid: int, session: int, event_ts_ns: int | None = None) -> KillResult:
        """SIGKILL `pid` if, and only if, it is still the agent process the verdict named."""
        if pid <= 1:
            return KillResult(pid, KillOutcome.REFUSED, f"pid {pid} is never killed")
        if pid in self.protected():
            return KillResult(pid, KillOutcome.REFUSED, "the monitor or one of its ancestors")
        try:
            fd = self.signaller.open(pid)
        except ProcessLookupError:
            return KillResult(pid, KillOutcome.GONE, "exited before the kill")
        try:
            info = self.procfs.read(pid)
            if info is None:
                return KillResult(pid, KillOutcome.GONE, "exited before the kill")
            if info.kernel_thread:
                return KillResult(pid, KillOutcome.REFUSED, "a kernel thread")
            if self.kernel.session_of(pid) != session:
                return KillResult(pid, KillOutcome.REFUSED,
                                  f"not a process of agent session {session}")
            if event_ts_ns is not None and \
                    info.start_ticks * self._tick_ns > event_ts_ns + self._tick_ns:
                return KillResult(pid, KillOutcome.REFUSED, "pid recycled after the event")
            try:
                self.signaller.kill(fd)
            except ProcessLookupError:
                return KillResult(pid, KillOutcome.GONE, "exited before the kill")
            return KillResult(pid, KillOutcome.KILLED)
        finally:
            self.signaller.close(fd)

    def kill_session(self, session: int, known: Iterable[int] = (),
                     rounds: int = 20, manual: bool = False,
                     background: bool = False) -> list[KillResult]:
        """kill-agent: leave no process of the session alive, even one forking right now.

        The kernel is told first (every process of the session then dies at its next fork
        exit or context switch, and children die before their first instruction); then each
        process the kernel still lists is killed through a pidfd, round after round (a short
        pause between two) until none is left. With `background` (the event thread) only
        the first round runs in the caller and its results are returned; the later rounds,
        and their pauses, run on a thread of their own.
        """
        if manual:  # the operator's kill switch: doomed in monitor mode too
            self.kernel.doom(session, manual=True)
        else:
            self.kernel.doom(session)
        results = {pid: self.kill(pid, session) for pid in known}
        if background:
            if self._sweep(session, results) and rounds > 1:
                threading.Thread(target=self._sweeps, args=(session, rounds - 1, {}, True),
                                 name="agentwatch-kill-session", daemon=True).start()
        else:
            self._sweeps(session, rounds, results)
        return list(results.values())

    def _sweeps(self, session: int, rounds: int, results: dict[int, KillResult],
                pause_first: bool = False) -> None:
        if pause_first:
            time.sleep(SWEEP_PAUSE_SECONDS)
        for _ in range(rounds):
            if not self._sweep(session, results):
                return
            time.sleep(SWEEP_PAUSE_SECONDS)

    def _sweep(self, session: int, results: dict[int, KillResult]) -> bool:
        """Kill what the kernel still lists in the session; whether it listed anyone."""
        live = self.kernel.session_pids(session)
        for pid in live:
            results[pid] = self.kill(pid, session)
        return bool(live)
