"""Taking in exec records and records of pending candidate sessions before the tracker and
the judge see them.

An exec whose argv the probes cut is completed from /proc when /proc confirms it
(sessions/completion.py), else judged on the cut copy, counted and, where rules read the
command line, said (at most once per agent per UNCONFIRMED_LOG_SECONDS). A pending
candidate session (an exec the kernel could not recognise by itself) is decided on its
first exec: accepted sessions get their agent's index in the kernel map, rejected ones are
untracked and their records come back untracked (session 0). It never decides policy and
never signals a process: a session of an agent whose kill switch is latched is handed to
`kill_latched`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from monitor.kernel.maps import KernelMaps
from monitor.model import cmdline, events
from monitor.model.events import Event, ExecEvent, ExitEvent, ForkEvent
from monitor.sessions import completion
from monitor.sessions.clock import Clock
from monitor.sessions.procfs import ProcFS
from monitor.sessions.registry import AgentTable, Recognizer
from monitor.sessions.throttle import Throttle
from monitor.sessions.tracker import Tracker

UNCONFIRMED_LOG_SECONDS = 10.0


class Intake:
    def __init__(self, tracker: Tracker, probes: KernelMaps, procfs: ProcFS,
                 agents: AgentTable, recognizer: Recognizer, *,
                 latched: Callable[[str], bool],
                 kill_latched: Callable[[int, list[int]], object],
                 argv_rules: Callable[[str], Sequence[str]],
                 count_unconfirmed: Callable[[str, str], object],
                 log: Callable[..., None], clock: Clock) -> None:
        self.tracker = tracker
        self.probes = probes
        self.procfs = procfs
        self.agents = agents
        self.recognizer = recognizer
        self.latched = latched
        self.kill_latched = kill_latched
        self.argv_rules = argv_rules
        self.count_unconfirmed = count_unconfirmed
        self.log = log
        self.clock = clock
        self._unconfirmed_said = Throttle(UNCONFIRMED_LOG_SECONDS)  # per agent

    def complete(self, ev: ExecEvent) -> tuple[ExecEvent, str | None]:
        """A tracked exec whose argv or file name the probes cut, completed from /proc;
        and why it could not be, or None."""
        if ev.h.session and completion.needs_proc(ev):
            return completion.complete(ev, self.procfs.read(ev.h.pid))
        return ev, None

    def settle_pending(self, ev: Event) -> Event:
        """Events of a candidate's pending session: decide it on its first exec (which the
        ring buffer delivers before anything its process does), then name every process of
        an accepted session, or untrack every process of a rejected one. A rejected event
        comes back untracked (session 0): only `trace --all` shows it."""
        sid = ev.h.session
        if isinstance(ev, ExecEvent) and ev.flags & events.FLAG_CANDIDATE:
            agent = self.recognizer.recognise_exec(ev)
            if agent is not None:
                self.tracker.start_session(sid, agent, ev.h.pid, ev.h.ts_ns)
                self.log("agent session started", agent=agent, session=sid,
                         root_pid=ev.h.pid, exe=ev.filename, via="userspace match")
                if self.latched(agent):
                    self.kill_latched(sid, [ev.h.pid])
        session = self.tracker.session(sid)
        pids = [ev.h.pid, ev.child_pid] if isinstance(ev, ForkEvent) else [ev.h.pid]
        if session is None:  # rejected, or its deciding exec was lost
            if not isinstance(ev, ExitEvent):
                for pid in pids:
                    if self.tracker.process(pid) is None:  # not registered/adopted since
                        # only while still pending: the kernel may have made it an agent
                        # root since (a privilege-dropping exec matched a uid matcher)
                        self.probes.untrack_if(pid, sid)
            return replace(ev, h=replace(ev.h, session=0, agent=0))
        idx = self.agents.index(session.agent)
        if not isinstance(ev, ExitEvent):
            for pid in pids:
                self.probes.retag(pid, idx)
        return replace(ev, h=replace(ev.h, agent=idx))

    def argv_unconfirmed(self, ev: ExecEvent, agent: str, reason: str) -> None:
        """A cut argv /proc could not confirm was judged on the probes' copy: count it, and
        say so when rules that read the command line apply (once per agent per
        UNCONFIRMED_LOG_SECONDS, with how many went unsaid since)."""
        self.count_unconfirmed(agent, reason)
        rules = self.argv_rules(agent)
        if not rules:
            return
        unsaid = self._unconfirmed_said.say(agent, self.clock.monotonic())
        if unsaid is None:
            return
        self.log("command line judged on the probes' cut copy", level="warning", agent=agent,
                 session=ev.h.session, pid=ev.h.pid, exe=ev.filename, reason=reason,
                 judged_bytes=len(cmdline.block(ev.argv)), rules=rules, unsaid=unsaid)
