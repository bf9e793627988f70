"""Adopting agent processes the ring buffer never told us about, and agreeing with the
kernel's process map.

At start: agent trees that were already running (scan /proc, then scan again for children
forked by a tracked process before its map entry existed). Every tick: the kernel's
process map is the truth, so a process the tracker holds that the map dropped is forgotten,
and after lost records every process the map holds that the tracker lacks is read from
/proc and judged; a pending candidate whose deciding exec was lost is decided from /proc.
A process is adopted only if /proc still shows the start time it was planned with (a
recycled pid is never adopted). It never signals a process: what it adopts is handed to
`on_running` (the judge) to be judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monitor.kernel.mapio import TrackedProc
from monitor.kernel.maps import KernelMaps
from monitor.model.events import AGENT_PENDING
from monitor.sessions.clock import Clock
from monitor.sessions.procfs import ProcFS, plan_adoption
from monitor.sessions.registry import AgentTable, Recognizer, SessionIds
from monitor.sessions.tracker import Process, Tracker

OnRunning = Callable[[Process, str], object]
"""Judge what a process runs now (it was exec'd while nothing judged it): Judge.on_running."""

STRAGGLER_SCANS = 3


class Adopter:
    def __init__(self, tracker: Tracker, probes: KernelMaps, procfs: ProcFS,
                 agents: AgentTable, recognizer: Recognizer, ids: SessionIds,
                 on_running: OnRunning, log: Callable[..., None], clock: Clock) -> None:
        self.tracker = tracker
        self.probes = probes
        self.procfs = procfs
        self.agents = agents
        self.recognizer = recognizer
        self.ids = ids
        self.on_running = on_running
        self.log = log
        self.clock = clock
        # reconciliation with the kernel's process map
        self._absent: set[int] = set()
        self._lost_seen = 0
        self._recheck = False
        self._pending_seen: set[int] = set()

    # --- at start ------------------------------------------------------------------------

    def adopt_running(self) -> int:
        """Track agent trees that started before the monitor; returns processes adopted."""
        exclude = self.recognizer.excluded()
        adopted = 0
        known = {p.pid for p in self.tracker.processes()}  # recovered: judged already
        sessions: dict[int, int] = {}  # root pid -> session id
        for a in plan_adoption(self.procfs.scan(), self.recognizer.recognise, exclude):
            if a.pid == a.root_pid:
                sessions[a.pid] = self.ids.new()
            sid = sessions[a.root_pid]
            root = a.pid == a.root_pid
            if self.adopt(a.pid, a.ppid, sid, a.agent, a.start_ticks, root):
                adopted += 1
        adopted += self.adopt_stragglers(exclude)
        # what they run now was exec'd while nothing judged it: judge it as an exec
        for proc in [p for p in self.tracker.processes() if p.pid not in known]:
            session = self.tracker.session(proc.session)
            if session is not None:
                self.on_running(proc, session.agent)
        return adopted

    def adopt(self, pid: int, ppid: int, sid: int, agent: str, start_ticks: int,
              root: bool) -> bool:
        """Track `pid` in the kernel first, then check /proc still shows the process
        planned; a root starts session `sid`, any other joins it."""
        idx = self.agents.index(agent)
        self.probes.track(pid, sid, idx, 0 if root else ppid)
        info = self.procfs.read(pid)
        if info is None or info.start_ticks != start_ticks:
            self.probes.untrack(pid)  # gone, or the pid was recycled under us
            return False
        if root:
            self.tracker.start_session(sid, agent, pid, self.clock.monotonic_ns())
        elif self.tracker.session(sid) is None:
            self.probes.untrack(pid)
            return False
        self.tracker.add_process(sid, pid, 0 if root else ppid, comm=info.comm,
                                 exe=info.exe, argv=info.argv, uid=info.uid)
        return True

    def adopt_stragglers(self, exclude: set[int]) -> int:
        """Children forked by a tracked process before its map entry existed."""
        adopted = 0
        for _ in range(STRAGGLER_SCANS):
            found = 0
            infos = self.procfs.scan()
            for pid in sorted(infos, key=lambda p: infos[p].start_ticks):
                info = infos[pid]
                parent = self.tracker.process(info.ppid)
                if parent is None or pid in exclude or self.tracker.process(pid):
                    continue
                sess = self.tracker.session(parent.session)
                if sess and self.adopt(pid, info.ppid, parent.session, sess.agent,
                                       info.start_ticks, False):
                    found += 1
            adopted += found
            if not found:
                break
        return adopted

    # --- every tick ----------------------------------------------------------------------

    def reconcile(self, live: set[int], lost: int) -> None:
        """The kernel's process map is the truth. A process the tracker holds that the map
        has not held for two ticks in a row exited without an exit record: forgotten. After
        the kernel lost records, every process the map holds that the tracker lacks is
        taken from /proc and judged (its fork or exec record was lost), and a pending
        candidate whose deciding exec was lost is decided from /proc."""
        gone = {p.pid for p in self.tracker.processes() if p.pid not in live}
        now = self.clock.monotonic_ns()
        for pid in gone & self._absent:
            self.tracker.forget(pid, now)
        self._absent = gone
        if lost == self._lost_seen and not self._recheck:
            return
        self._lost_seen, self._recheck = lost, False
        pending: dict[int, list[TrackedProc]] = {}
        for e in self.probes.tracked():
            if self.tracker.process(e.pid) is not None:
                continue
            if e.agent == AGENT_PENDING:
                pending.setdefault(e.session, []).append(e)
                continue
            info = self.procfs.read(e.pid)
            if info is None:  # exiting: the map drops it
                continue
            agent = self.agents.name(e.agent)
            session = self.tracker.start_session(e.session, agent, e.pid, e.start_ns)
            proc = self.tracker.add_process(e.session, e.pid, e.ppid, comm=info.comm,
                                            exe=info.exe, argv=info.argv, uid=info.uid,
                                            start_ns=e.start_ns)
            self.on_running(proc, session.agent)
        for sid, procs in pending.items():
            if sid in self._pending_seen:  # pending two ticks running: its exec was lost
                self.decide_pending(sid, procs)
            else:
                self._recheck = True  # its exec record may still be on its way: next tick
        self._pending_seen = set(pending) - self._pending_seen

    def decide_pending(self, sid: int, procs: Sequence[TrackedProc]) -> int:
        """A pending candidate session whose deciding exec record never came (lost, or
        written while no monitor ran): recognise its oldest live process from /proc, then
        accept the session (and judge its processes) or untrack it. Returns processes kept."""
        procs = sorted(procs, key=lambda e: e.start_ns)
        infos = [(e, self.procfs.read(e.pid)) for e in procs]
        live = [(e, i) for e, i in infos if i is not None]
        agent = None
        excluded = self.recognizer.excluded()
        for e, info in live:
            if e.pid not in excluded:
                agent = self.recognizer.recognise(info)
                if agent is not None:
                    break
        if agent is None or not live:
            for e in procs:
                self.probes.untrack_if(e.pid, sid)
            return 0
        idx = self.agents.index(agent)
        root = live[0][0]
        self.tracker.start_session(sid, agent, root.pid, root.start_ns)
        self.log("agent session started", agent=agent, session=sid, root_pid=root.pid,
                 via="userspace match (from /proc: its exec record was lost)")
        for e, info in live:
            self.probes.retag(e.pid, idx)
            proc = self.tracker.add_process(sid, e.pid, e.ppid, comm=info.comm, exe=info.exe,
                                            argv=info.argv, uid=info.uid, start_ns=e.start_ns)
            self.on_running(proc, agent)
        return len(live)
