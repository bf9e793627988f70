"""Agent sessions in userspace: each agent root, its live processes, parent links, CPU time
and a bounded history of execs and connects per process.

A pure state machine fed with typed events (monitor/model/events.py) and adoption records; it
does no I/O and never signals anything, so it is tested with fake events and no root.
Memory is bounded whatever the agents do: a process keeps its command line clipped to
cmdline.KEEP_CHARS, and `history` exec records (each command line clipped to HISTORY_CHARS)
and connect records; at most `max_processes` processes are kept (the kernel's process map
holds no more; beyond that the oldest entry, most likely one whose exit was lost, goes);
ended sessions are kept in a fixed-size ring. docs/config.md says what that adds up to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from monitor.model.cmdline import KEEP_CHARS, clip
from monitor.model.events import (
    FLAG_ARGV_COMPLETED,
    FLAG_ARGV_MISSING,
    ConnectEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    VerdictEvent,
)

HISTORY_CHARS = 512
"""Characters of the command line kept in each exec history record."""


@dataclass(slots=True)
class ExecRecord:
    ts_ns: int
    filename: str
    argv: tuple[str, ...]
    truncated: bool


@dataclass(slots=True)
class ConnectRecord:
    ts_ns: int
    family: int
    address: str
    port: int
    protocol: int


@dataclass(slots=True)
class Process:
    pid: int
    ppid: int
    session: int
    comm: str = ""
    exe: str = ""
    argv: tuple[str, ...] = ()
    uid: int = -1
    start_ns: int = 0
    cpu_ns: int = 0
    execs: deque[ExecRecord] = field(default_factory=deque)
    connects: deque[ConnectRecord] = field(default_factory=deque)
    exit_status: int | None = None


@dataclass(slots=True)
class Session:
    id: int
    agent: str
    root_pid: int
    started_ns: int
    processes: dict[int, Process] = field(default_factory=dict)
    ended_ns: int | None = None
    exited_cpu_ns: int = 0
    forks: int = 0
    execs: int = 0
    connects: int = 0
    exits: int = 0

    @property
    def cpu_ns(self) -> int:
        return self.exited_cpu_ns + sum(p.cpu_ns for p in self.processes.values())

    @property
    def live(self) -> bool:
        return bool(self.processes)


class Tracker:
    """Agent sessions keyed by session id, processes keyed by pid."""

    def __init__(self, agent_name: Callable[[int], str], history: int = 32,
                 ended_kept: int = 256, max_processes: int = 65536) -> None:
        self._agent_name = agent_name
        self._history = history
        self._max_processes = max_processes
        self._sessions: dict[int, Session] = {}
        self._procs: dict[int, Process] = {}
        self.ended: deque[Session] = deque(maxlen=ended_kept)
        self.evicted = 0  # processes dropped to stay within max_processes

    # --- queries -----------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def session(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def process(self, pid: int) -> Process | None:
        return self._procs.get(pid)

    def processes(self) -> Iterator[Process]:
        return iter(self._procs.values())

    def ancestry(self, pid: int) -> list[Process]:
        """The process and its tracked ancestors, nearest first, up to the agent root."""
        chain: list[Process] = []
        seen: set[int] = set()
        p = self._procs.get(pid)
        while p is not None and p.pid not in seen:
            chain.append(p)
            seen.add(p.pid)
            p = self._procs.get(p.ppid)
        return chain

    # --- changes -----------------------------------------------------------------------

    def start_session(self, session_id: int, agent: str, root_pid: int, ts_ns: int) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            s = Session(session_id, agent, root_pid, ts_ns)
            self._sessions[session_id] = s
        return s

    def add_process(self, session_id: int, pid: int, ppid: int, *, comm: str = "",
                    exe: str = "", argv: tuple[str, ...] = (), uid: int = -1,
                    start_ns: int = 0) -> Process:
        s = self._sessions[session_id]
        p = Process(pid, ppid, session_id, comm, exe, clip(argv, KEEP_CHARS), uid, start_ns,
                    execs=deque(maxlen=self._history), connects=deque(maxlen=self._history))
        old = self._procs.get(pid)
        if old is not None and old.session != session_id:
            self._drop(old, start_ns)
        while pid not in self._procs and len(self._procs) >= self._max_processes:
            self._drop(next(iter(self._procs.values())), start_ns)
            self.evicted += 1
        if session_id not in self._sessions:  # its only process was the one evicted
            if self.ended and self.ended[-1] is s:
                self.ended.pop()
            s.ended_ns = None
            self._sessions[session_id] = s
        self._procs[pid] = p
        s.processes[pid] = p
        return p

    def set_cpu(self, readings: Iterable[tuple[int, int]]) -> None:
        """CPU nanoseconds per live pid, as read from the kernel's process map."""
        procs = self._procs
        for pid, cpu_ns in readings:
            p = procs.get(pid)
            if p is not None and cpu_ns > p.cpu_ns:
                p.cpu_ns = cpu_ns

    def apply(self, ev: Event) -> Process | None:
        """Fold one event into the state; returns the process it concerns, if tracked."""
        h = ev.h
        if h.session == 0:
            return None
        if isinstance(ev, VerdictEvent):  # a rule matched: judged elsewhere, no state here
            return self._procs.get(h.pid)
        s = self._sessions.get(h.session)
        if s is None:
            s = self.start_session(h.session, self._agent_name(h.agent), h.pid, h.ts_ns)
        p = self._procs.get(h.pid)
        if p is None or p.session != h.session:
            ppid = ev.ppid if isinstance(ev, ExecEvent | ExitEvent) else 0
            p = self.add_process(h.session, h.pid, ppid, comm=h.comm, uid=h.uid,
                                 start_ns=h.ts_ns)
        if isinstance(ev, ForkEvent):
            s.forks += 1
            self.add_process(h.session, ev.child_pid, h.pid, comm=p.comm, exe=p.exe,
                             argv=p.argv, uid=p.uid, start_ns=h.ts_ns)
        elif isinstance(ev, ExecEvent):
            s.execs += 1
            p.comm, p.exe, p.uid = h.comm, ev.filename, h.uid
            if not ev.flags & FLAG_ARGV_MISSING or ev.argv:
                p.argv = clip(ev.argv, KEEP_CHARS) if ev.flags & FLAG_ARGV_COMPLETED \
                    else ev.argv  # the probes' copy is within ARGS_SIZE already
            p.execs.append(ExecRecord(h.ts_ns, ev.filename, clip(p.argv, HISTORY_CHARS),
                                      ev.argv_truncated))
        elif isinstance(ev, ConnectEvent):
            s.connects += 1
            p.connects.append(ConnectRecord(h.ts_ns, ev.family, ev.address, ev.port,
                                            ev.protocol))
        elif isinstance(ev, ExitEvent):
            p.exit_status = ev.exit_status
            p.cpu_ns = max(p.cpu_ns, ev.cpu_ns)
            self._drop(p, h.ts_ns)
        return p

    def forget(self, pid: int, ts_ns: int) -> None:
        """A process the kernel no longer tracks, whose exit record never came."""
        p = self._procs.get(pid)
        if p is not None:
            self._drop(p, ts_ns)

    def _drop(self, p: Process, ts_ns: int) -> None:
        self._procs.pop(p.pid, None)
        s = self._sessions.get(p.session)
        if s is None or s.processes.pop(p.pid, None) is None:
            return
        s.exits += 1
        s.exited_cpu_ns += p.cpu_ns
        if not s.processes:
            s.ended_ns = ts_ns
            del self._sessions[s.id]
            self.ended.append(s)
