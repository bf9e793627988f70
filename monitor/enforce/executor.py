"""Carry out the judge's decisions: the one step between a Decision and a Done.

Asks the enforcer (monitor/enforce/enforcer.py) for the kill a decision names, and settles
the outcome by what it did: a process that was gone, or that the guard rails refused, was
not killed and the Done says so. Decides nothing (the judge has), reports nothing (the
reporter does), and signals nothing except through the enforcer.
"""

from __future__ import annotations

from monitor.enforce.decision import KERNEL, USERSPACE, Decision, Done, Step, latency_since
from monitor.enforce.enforcer import Enforcer, KillOutcome
from monitor.model.outcome import Outcome
from monitor.sessions.tracker import Tracker

KERNEL_FIRST = "the offending process killed in the kernel; "


class Executor:
    def __init__(self, enforcer: Enforcer, tracker: Tracker) -> None:
        self.enforcer = enforcer
        self.tracker = tracker

    def execute(self, d: Decision) -> Done:
        kernel = None if d.kernel_latency is None else (KERNEL, d.kernel_latency)
        if d.step == Step.KILL_PROCESS:
            return self._kill(d)
        if d.step == Step.KILL_SESSION:
            return self._kill_session(d, kernel)
        return Done(d.verdict, d.outcome, d.outcome.describe(d.detail), kill=d.kernel_kill,
                    latency=kernel)

    def _kill(self, d: Decision) -> Done:
        v = d.verdict
        result = self.enforcer.kill(v.pid, v.session, d.event_ts_ns)
        if result.outcome != KillOutcome.KILLED:
            return Done(v, Outcome.NOT_ENFORCED, f"{result.outcome.value}: {result.reason}")
        latency = None if d.event_ts_ns is None else (USERSPACE, latency_since(d.event_ts_ns))
        return Done(v, Outcome.KILLED, Outcome.KILLED.text, kill=True, latency=latency)

    def _kill_session(self, d: Decision, kernel: tuple[str, float] | None) -> Done:
        v = d.verdict
        session = self.tracker.session(v.session)
        known = list(session.processes) if session else []
        results = self.enforcer.kill_session(v.session, known, background=True)
        killed = sum(1 for r in results if r.outcome == KillOutcome.KILLED)
        refused = tuple(f"{r.pid}: {r.reason}" for r in results
                        if r.outcome == KillOutcome.REFUSED)
        first = KERNEL_FIRST if d.in_kernel else ""
        text = Outcome.SESSION_KILLED.describe(f"({first}{killed} processes signalled)")
        return Done(v, Outcome.SESSION_KILLED, text, kill=True, latency=kernel,
                    refused=refused)
