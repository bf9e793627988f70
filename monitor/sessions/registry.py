"""Who the agents are: the agent table, session ids, recognising an agent's root process,
and registering one by hand (`agentwatch exec`).

AgentTable gives each agent name the index the kernel stores (config agents first, then
ad-hoc ones) and saves that order next to the control socket so a restart with pinned
probes names them the same. Recognizer says which configured agent, if any, a process is,
and never names the monitor or one of its ancestors. Registry makes a live process the
root of a new session. Nothing here decides policy or signals a process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from monitor.kernel.maps import KernelMaps
from monitor.model.agents import AgentSpec, ProcessFacts, needs_userspace, recognise
from monitor.model.errors import ControlError
from monitor.model.events import ExecEvent
from monitor.sessions.procfs import ProcFS, ProcInfo
from monitor.sessions.tracker import Session, Tracker


class AgentTable:
    """Agent names by the index the kernel stores; config agents first, then ad-hoc ones."""

    def __init__(self, names: list[str]) -> None:
        self._names = list(names)
        self.on_new: Callable[[], None] | None = None

    def name(self, idx: int) -> str:
        return self._names[idx] if 0 <= idx < len(self._names) else f"agent-{idx}"

    def index(self, name: str) -> int:
        if name not in self._names:
            self._names.append(name)
            if self.on_new is not None:
                self.on_new()
        return self._names.index(name)

    def names(self) -> list[str]:
        return list(self._names)

    def save(self, path: Path) -> None:
        """Write the order to `path` (atomically: a reader sees the old list or the new)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._names))
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Append the names saved at `path` that this table lacks, in their saved order."""
        try:
            for name in json.loads(path.read_text()):
                self.index(str(name))
        except (OSError, ValueError):
            pass  # config/policy agents keep their order; others show as agent-N


class SessionIds:
    """Userspace session ids: 1, 2, ...; the kernel's own have SESSION_KERNEL_BIT set."""

    def __init__(self) -> None:
        self._next = 1

    def new(self) -> int:
        sid = self._next
        self._next += 1
        return sid

    def seen(self, sid: int) -> None:
        """A recovered session: never hand its id out again."""
        self._next = max(self._next, sid + 1)


class Recognizer:
    """Which agent a process is: the first spec in force that matches it."""

    def __init__(self, specs: Sequence[AgentSpec], procfs: ProcFS) -> None:
        self.procfs = procfs
        self.specs: tuple[AgentSpec, ...] = ()
        self.userspace_matchers = False
        self.use(specs)

    def use(self, specs: Sequence[AgentSpec]) -> None:
        self.specs = tuple(specs)
        self.userspace_matchers = needs_userspace(self.specs)

    def excluded(self) -> set[int]:
        """The monitor and its ancestors: never adopted, never killed."""
        out, pid = set(), os.getpid()
        while pid > 0 and pid not in out:
            out.add(pid)
            info = self.procfs.read(pid)
            pid = info.ppid if info else 0
        return out

    def facts(self, info: ProcInfo) -> ProcessFacts:
        return ProcessFacts(info.pid, info.comm, info.exe, info.argv, info.uid, info.cgroup,
                            line=info.line if info.argv_clipped else None)

    def recognise_facts(self, facts: ProcessFacts) -> str | None:
        spec = recognise(self.specs, facts)
        return spec.name if spec is not None else None

    def recognise(self, info: ProcInfo) -> str | None:
        return self.recognise_facts(self.facts(info))

    def recognise_exec(self, ev: ExecEvent) -> str | None:
        """The agent a candidate's exec makes it, from the record and what /proc adds."""
        if ev.h.pid in self.excluded():
            return None
        info = self.procfs.read(ev.h.pid)
        facts = ProcessFacts(ev.h.pid, ev.h.comm, info.exe if info else ev.filename,
                             ev.argv or (info.argv if info else ()), ev.h.uid,
                             info.cgroup if info else "", line=ev.line)
        return self.recognise_facts(facts)


class Asker(Protocol):
    """The process that sent a control request (control.Peer)."""

    pid: int

    def alive(self) -> bool: ...


Adopt = Callable[[int, int, int, str, int, bool], bool]
"""(pid, ppid, session, agent, start_ticks, root) -> whether it was adopted."""


class Registry:
    """`agentwatch exec`: make a live process the root of a new session of an agent."""

    def __init__(self, tracker: Tracker, probes: KernelMaps, procfs: ProcFS,
                 recognizer: Recognizer, ids: SessionIds, adopt: Adopt,
                 latched: Callable[[str], bool], log: Callable[..., None]) -> None:
        self.tracker = tracker
        self.probes = probes
        self.procfs = procfs
        self.recognizer = recognizer
        self.ids = ids
        self.adopt = adopt
        self.latched = latched
        self.log = log

    def register(self, pid: int, agent: str,
                 still_peer: Callable[[], bool] | None = None) -> Session:
        """Make `pid` the root of a new session of `agent`.

        still_peer: whether `pid` still names the process that asked (control.Peer.alive);
        asked after /proc was read, so what was read is the asker's, not a process that
        got its pid after it exited (the adoption then re-checks the start time)."""
        known = self.tracker.process(pid)
        sess = self.tracker.session(known.session) if known else None
        if sess is not None and self.probes.is_tracked(pid):
            # (a pid still in a pending candidate session is not an agent yet: allowed)
            raise ControlError(f"process {pid} is already tracked as part of agent "
                               f"{sess.agent!r}")
        if pid in self.recognizer.excluded():
            raise ControlError(f"process {pid} is the monitor or one of its ancestors")
        if self.latched(agent):
            raise ControlError(f"the kill switch is latched for {agent!r}: release it "
                               "with `agentwatch killswitch --release` first")
        info = self.procfs.read(pid)
        if info is None:
            raise ControlError(f"process {pid} is gone")
        if still_peer is not None and not still_peer():
            raise ControlError(f"process {pid} exited before it was registered (its pid "
                               "may name another process now): nothing registered")
        sid = self.ids.new()
        if not self.adopt(pid, info.ppid, sid, agent, info.start_ticks, True):
            raise ControlError(f"process {pid} exited while being registered")
        session = self.tracker.session(sid)
        assert session is not None
        self.log("agent session started", agent=agent, session=sid, root_pid=pid,
                 via="agentwatch exec")
        return session

    def op_register(self, req: dict[str, Any], peer: Asker) -> dict[str, Any]:
        """The control socket's `register`: the asking process becomes the root."""
        agent = req.get("agent")
        if not isinstance(agent, str) or not agent or len(agent) > 63 or \
                not agent.isprintable():
            return {"ok": False, "error": "register needs 'agent': a name of 1-63 printable "
                                          "characters"}
        try:
            s = self.register(peer.pid, agent, still_peer=peer.alive)
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "session": s.id, "pid": peer.pid}
