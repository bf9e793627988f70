"""The operator's kill switch: kill every process of every agent, or of one, now; latched,
keep killing any new process of it until released.

The operator's, not the policy's: it kills in monitor mode too (kernel doom `manual`).
Split in two so the daemon's loop stays the one writer of the latch set while the killing
(rounds of pidfd kills with a short sleep between, Enforcer.kill_session) never runs on
the loop: `plan` latches or releases and picks the target sessions (on the loop), then
`carry_out` kills them, logs, counts and alerts (on the caller's thread: the control
socket's). A session found to belong to a latched agent after the fact is killed on a
thread of its own (`kill_latched`). Only the enforcer signals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from monitor.enforce.enforcer import Enforcer, KillOutcome
from monitor.kernel.maps import KernelMaps
from monitor.model.errors import ControlError
from monitor.observe.metrics import MetricsState
from monitor.observe.notifier import Notifier
from monitor.sessions.registry import AgentTable
from monitor.sessions.tracker import Tracker

T = TypeVar("T")
OnLoop = Callable[[Callable[[], T]], T]
"""Run a function on the daemon's loop and return what it returned (or raise what it raised)."""

ALL = "*"


class Asker(Protocol):
    pid: int


@dataclass(frozen=True)
class Plan:
    """What `carry_out` is to do: kill these sessions' processes."""

    key: str  # the agent, or ALL
    latch: bool
    targets: list[tuple[int, list[int]]]  # (session, its known pids)
    requested_by: str


class KillSwitch:
    def __init__(self, agents: AgentTable, probes: KernelMaps, tracker: Tracker,
                 enforcer: Enforcer, log: Callable[..., None], metrics: MetricsState,
                 notifier: Notifier) -> None:
        self.agents = agents
        self.probes = probes
        self.tracker = tracker
        self.enforcer = enforcer
        self.log = log
        self.metrics = metrics
        self.notifier = notifier
        self._latched: set[str] = set()  # agent names, ALL = every agent

    def latched(self, agent: str) -> bool:
        return ALL in self._latched or agent in self._latched

    def killswitch(self, agent: str | None, latch: bool = False, release: bool = False,
                   requested_by: str = "") -> dict[str, Any]:
        """Kill every process of every (or one) agent now; `latch` keeps killing any new
        agent process until released. Works in monitor mode too: it is the operator's."""
        plan = self.plan(agent, latch, release, requested_by)
        return plan if isinstance(plan, dict) else self.carry_out(plan)

    def plan(self, agent: str | None, latch: bool, release: bool,
             requested_by: str) -> Plan | dict[str, Any]:
        """Latch or release, and pick the sessions to kill (the loop's part); a release is
        done here and its reply returned."""
        names = self.agents.names()
        if agent is not None and agent not in names:
            raise ControlError(f"unknown agent {agent!r} (known: {', '.join(names) or 'none'})")
        key = agent or ALL
        index = None if agent is None else self.agents.index(agent)
        if release:
            self.probes.latch(index, False)
            self._latched.discard(key)
            self.log("killswitch", agent=key, action="release", requested_by=requested_by)
            return {"released": key, "latched": sorted(self._latched)}
        if latch:
            self.probes.latch(index, True)
            self._latched.add(key)
        targets = [(s.id, list(s.processes)) for s in self.tracker.sessions()
                   if agent is None or s.agent == agent]
        return Plan(key, latch, targets, requested_by)

    def carry_out(self, plan: Plan) -> dict[str, Any]:
        """Kill the planned sessions, then log, count and alert (off the loop)."""
        killed = 0
        for sid, known in plan.targets:
            results = self.enforcer.kill_session(sid, known, manual=True)
            killed += sum(1 for r in results if r.outcome == KillOutcome.KILLED)
        outcome = f"{len(plan.targets)} agent sessions killed ({killed} processes signalled)"
        self.log("killswitch", agent=plan.key, action="latch" if plan.latch else "kill",
                 sessions=[t[0] for t in plan.targets], killed=killed,
                 requested_by=plan.requested_by)
        self.metrics.observe_killswitch("all" if plan.key == ALL else plan.key)
        self.notifier.kill_switch(agent=plan.key, outcome=outcome,
                                  requested_by=plan.requested_by,
                                  reason="manual kill switch" + (" (latched)" if plan.latch
                                                                 else ""))
        return {"sessions": len(plan.targets), "killed": killed,
                "latched": sorted(self._latched)}

    def kill_latched(self, session: int, known: list[int]) -> None:
        """A new session of a latched agent: kill it, off the caller's (the loop's) thread."""
        threading.Thread(target=self.enforcer.kill_session, args=(session, known),
                         kwargs={"manual": True}, name="agentwatch-latched",
                         daemon=True).start()

    def op(self, req: dict[str, Any], peer: Asker, on_loop: OnLoop[Plan | dict[str, Any]]
           ) -> dict[str, Any]:
        """The control socket's `killswitch`."""
        agent = req.get("agent")
        if agent is not None and not isinstance(agent, str):
            return {"ok": False, "error": "killswitch: 'agent' must be a string"}
        flags = {k: req.get(k, False) for k in ("latch", "release")}
        if not all(isinstance(v, bool) for v in flags.values()):
            return {"ok": False, "error": "killswitch: 'latch' and 'release' must be booleans"}
        if flags["latch"] and flags["release"]:
            return {"ok": False, "error": "killswitch: give --latch or --release, not both"}
        try:
            plan = on_loop(lambda: self.plan(agent, flags["latch"], flags["release"],
                                             f"pid {peer.pid}"))
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        result = plan if isinstance(plan, dict) else self.carry_out(plan)
        return {"ok": True, **result}
