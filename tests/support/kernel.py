"""FakeProbes: the kernel maps (monitor.kernel.maps.KernelMaps) kept as dicts, with the
same key semantics as probes/agentwatch.bpf.c, for unit tests and bench/hotpath.py.

mypy checks it against the Protocol (`make lint`): `_check` below fails the build when
the fake drifts from what the monitor may ask of the kernel. No root, no BPF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from monitor.kernel.loader import ProbeOptions
from monitor.kernel.mapio import TrackedProc
from monitor.kernel.maps import KernelMaps
from monitor.model import events
from monitor.model.cmdline import comm_bytes
from monitor.model.events import ANY_UID, Counter, Setting
from monitor.policy.kernel_tables import KernelTables


class FakeProbes:
    """What Monitor uses of loader.Probes, with the kernel maps kept as dicts."""

    def __init__(self, trace_all: bool = False) -> None:
        self.options = ProbeOptions(trace_all=trace_all)
        self.attached = 0
        self.expected = 10
        self.opened = False
        self.callback: Callable[[bytes], None] | None = None
        self.procs: dict[int, TrackedProc] = {}
        self.track_calls: list[tuple[int, int, int, int]] = []
        self.untrack_calls: list[int] = []
        self.retag_calls: list[tuple[int, int]] = []
        self.settings: dict[Setting, int] = {}
        # match_comm keyed by the 16-byte comm, match_uid keyed by uid, as in the probes
        self.match_comm: dict[tuple[bytes, int], int] = {}
        self.match_uid: dict[int, int] = {}
        self.polls = 0
        self.wakes = 0
        self.doomed: set[int] = set()
        self.beats: list[float] = []
        self.calls: list[str] = []  # order of the lifecycle and map-writing calls
        self.lost = 0  # Counter.LOST
        self.tables: KernelTables | None = None
        self.gen = 0
        self.manual: set[int] = set()  # sessions doomed by the kill switch
        self.latched: dict[int, bool] = {}  # agent index (MAX_AGENTS: every agent) -> on

    def open(self) -> None:
        self.calls.append("open")
        self.opened = True
        self.attached = 10

    def close(self) -> None:
        self.calls.append("close")
        self.opened = False
        self.attached = 0

    def release_compiler(self) -> int:
        self.calls.append("release_compiler")
        return 0

    def on_record(self, callback: Callable[[bytes], None]) -> None:
        self.calls.append("on_record")
        self.callback = callback

    def poll(self, timeout_ms: int = 100) -> None:
        self.polls += 1

    def wake(self) -> None:
        self.wakes += 1

    def track(self, pid: int, session: int, agent: int, ppid: int = 0,
              start_ns: int = 0) -> None:
        self.calls.append("track")
        self.track_calls.append((pid, session, agent, ppid))
        self.procs[pid] = TrackedProc(pid, session, agent, ppid, events.STATUS_UNSET, 0,
                                      start_ns)

    def untrack(self, pid: int) -> None:
        self.untrack_calls.append(pid)
        self.procs.pop(pid, None)

    def untrack_if(self, pid: int, session: int) -> bool:
        if pid not in self.procs or self.procs[pid].session != session:
            return False
        self.untrack(pid)
        return True

    def retag(self, pid: int, agent: int) -> None:
        self.retag_calls.append((pid, agent))
        if pid in self.procs:
            self.procs[pid] = replace(self.procs[pid], agent=agent)

    def is_tracked(self, pid: int) -> bool:
        return pid in self.procs

    def tracked(self) -> list[TrackedProc]:
        return list(self.procs.values())

    def cpu_readings(self) -> list[tuple[int, int]]:
        return [(t.pid, t.cpu_ns) for t in self.procs.values()]

    def agent_losses(self) -> dict[int, tuple[int, int]]:
        return {}

    def counters(self) -> dict[Counter, int]:
        return {c: self.lost if c == Counter.LOST else 0 for c in Counter}

    def set_setting(self, setting: Setting, value: int) -> None:
        self.calls.append(f"set_setting {setting.name}")
        self.settings[setting] = value

    def set_matchers(self, comms: Iterable[tuple[bytes, int, int]],
                     uids: Iterable[tuple[int, int]], gen: int = 0) -> None:
        self.calls.append("set_matchers")
        self.match_comm.clear()
        self.match_uid.clear()
        for comm, agent, uid in comms:  # same key as Probes (c_char[16] pads with NULs)
            key = (comm.ljust(events.COMM_LEN, b"\0"), uid)
            assert key not in self.match_comm, f"duplicate kernel key {key}"
            self.match_comm[key] = agent
        for uid, agent in uids:
            self.match_uid[uid] = agent

    def install_rules(self, tables: KernelTables, agent_names: list[str], gen: int = 0) -> None:
        self.calls.append("install_rules")
        self.tables = tables

    def generation(self) -> int:
        return self.gen

    def flip(self, gen: int) -> None:
        self.gen = gen

    def beat(self, fail_closed_s: float) -> None:
        self.beats.append(fail_closed_s)

    def attach_cgroup(self, path: str | None = None) -> str:
        self.calls.append("attach_cgroup")
        return "/fake/cgroup"

    def doom(self, session: int, manual: bool = False) -> None:
        self.doomed.add(session)
        if manual:
            self.manual.add(session)

    def latch(self, agent_index: int | None, on: bool) -> None:
        self.latched[events.MAX_AGENTS if agent_index is None else agent_index] = on

    def undoom(self, session: int) -> None:
        self.doomed.discard(session)

    def session_of(self, pid: int) -> int | None:
        t = self.procs.get(pid)
        return t.session if t else None

    def session_pids(self, session: int) -> list[int]:
        return [p for p, t in self.procs.items() if t.session == session]

    def kernel_match(self, comm: str, uid: int) -> int | None:
        """The agent index match_new_root() in the probes would pick, or None."""
        key = comm_bytes(comm).ljust(events.COMM_LEN, b"\0")
        m = self.match_comm.get((key, uid))
        if m is None:
            m = self.match_comm.get((key, ANY_UID))
        if m is not None:
            return m
        return self.match_uid.get(uid)


def _check(fake: FakeProbes) -> KernelMaps:
    return fake  # mypy: FakeProbes satisfies KernelMaps
