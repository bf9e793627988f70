"""Report what became of each verdict: one structured log line, the counters, a kill alert.

The sinks' side of the judge: given a Done (monitor/enforce/decision.py) it writes the
`verdict` log line (with the process's ancestry from the tracker, argv cut to what a line
and an alert carry), counts the verdict and any kill in MetricsState (which owns the
counters), times the kill, and pushes an alert for every real kill. It never decides and
never acts on a process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monitor.enforce.decision import Done
from monitor.model.cmdline import clip
from monitor.observe.metrics import MetricsState
from monitor.observe.notifier import Notifier
from monitor.sessions.tracker import Tracker

Log = Callable[..., None]


class Reporter:
    def __init__(self, log: Log, metrics: MetricsState, tracker: Tracker,
                 alerts: Notifier | None = None) -> None:
        self.log = log
        self.metrics = metrics
        self.tracker = tracker
        self.alerts = alerts

    def report(self, done: Done) -> None:
        v = done.verdict
        m = self.metrics
        if done.latency is not None:
            m.observe_kill_latency(*done.latency)
        m.count_verdict(v.agent, v.rule, v.action.value, v.mode.value)
        if done.kill:
            m.count_kill(v.agent, v.rule)
        chain = self.tracker.ancestry(v.pid) if v.pid > 0 else []
        ancestry = [{"pid": p.pid, "comm": p.comm, "exe": p.exe} for p in chain]
        exe = v.exe if v.exe is not None else (chain[0].exe if chain else None)
        argv = v.argv if v.argv is not None else (chain[0].argv if chain else None)
        if argv is not None:
            argv = clip(argv)  # judged whole; a log line and an alert get KEEP_CHARS of it
        extra: dict[str, Any] = {}
        if done.refused is not None:
            extra["refused"] = list(done.refused)
        if v.loader is not None:
            extra["loader"] = v.loader  # exe and argv are the program's it ran
        self.log("verdict", level="warning", agent=v.agent, rule=v.rule, action=v.action.value,
                 mode=v.mode.value, outcome=done.text, outcome_label=done.outcome.label,
                 session=v.session, pid=v.pid, reason=v.reason, exe=exe,
                 argv=list(argv) if argv else None, destination=v.destination,
                 cpu_cores=v.cpu_cores, processes=v.processes, ancestry=ancestry,
                 sha256=v.sha256, **extra)
        if done.outcome.killed and self.alerts is not None:
            self.alerts.kill(v, done.text, exe=exe, argv=argv)
