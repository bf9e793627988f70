"""Rebuilding the sessions after a restart with pinned probes.

While no monitor ran, the pinned probes kept the kernel's process map up to date (children
born in the gap included); this reads that map back into the tracker, names the agents by
the order saved in agents.json, judges what each process runs now (it exec'd while nothing
read the ring), and decides pending candidates from /proc. It never signals a process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from monitor.kernel.mapio import TrackedProc
from monitor.kernel.maps import KernelMaps
from monitor.model.events import AGENT_PENDING, SESSION_KERNEL_BIT
from monitor.sessions.adoption import Adopter, OnRunning
from monitor.sessions.procfs import ProcFS
from monitor.sessions.registry import AgentTable, SessionIds
from monitor.sessions.tracker import Tracker


def agents_file(control_socket: str) -> Path:
    """Where the agent table's order is kept: next to the control socket."""
    return Path(control_socket).parent / "agents.json"


class Recovery:
    def __init__(self, tracker: Tracker, probes: KernelMaps, procfs: ProcFS,
                 agents: AgentTable, ids: SessionIds, adopter: Adopter,
                 on_running: OnRunning, log: Callable[..., None]) -> None:
        self.tracker = tracker
        self.probes = probes
        self.procfs = procfs
        self.agents = agents
        self.ids = ids
        self.adopter = adopter
        self.on_running = on_running
        self.log = log

    def recover(self, saved: Path) -> int:
        """Rebuild the sessions from the kernel's process map; `saved`: the agents file.
        Returns the processes recovered."""
        entries = self.probes.tracked()
        if not entries:
            self.agents.save(saved)
            return 0
        self.agents.load(saved)
        by_session: dict[int, list[TrackedProc]] = {}
        for e in entries:
            by_session.setdefault(e.session, []).append(e)
        recovered = 0
        for sid, procs in by_session.items():
            if procs[0].agent == AGENT_PENDING:
                recovered += self.adopter.decide_pending(sid, procs)
                continue
            recovered += self._session(sid, procs)
        self.agents.save(saved)
        self.log("recovered agent sessions from the pinned probes",
                 sessions=len(self.tracker.sessions()), processes=recovered)
        return recovered

    def _session(self, sid: int, procs: list[TrackedProc]) -> int:
        pids = {e.pid for e in procs}
        procs.sort(key=lambda e: e.start_ns)
        root = next((e for e in procs if e.ppid not in pids), procs[0])
        agent = self.agents.name(root.agent)
        self.tracker.start_session(sid, agent, root.pid, root.start_ns)
        recovered = 0
        for e in procs:
            info = self.procfs.read(e.pid)
            if info is None:
                self.probes.untrack(e.pid)
                continue
            proc = self.tracker.add_process(sid, e.pid, e.ppid, comm=info.comm,
                                            exe=info.exe, argv=info.argv,
                                            uid=info.uid, start_ns=e.start_ns)
            proc.cpu_ns = e.cpu_ns
            recovered += 1
            # what it exec'd while no monitor read the ring is judged now
            self.on_running(proc, agent)
        if not sid & SESSION_KERNEL_BIT:
            self.ids.seen(sid)
        return recovered
