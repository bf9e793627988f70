"""Apply the policy to what agents do: evaluate (monitor/policy/engine.py), log every verdict as
one structured line, count it, and carry it out (monitor/enforce/enforcer.py) in enforce mode.

Kernel verdicts (rules the probes enforce themselves) arrive as VerdictEvents just before
the event they concern; they are logged and counted here, never enforced twice. In monitor
mode nothing is killed: every verdict is logged as "would kill". This module does no
matching of its own and never signals a process except through the Enforcer.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from monitor.enforce.enforcer import Enforcer, KillResult, Outcome
from monitor.model.cmdline import clip
from monitor.model.events import (
    ConnectEvent,
    Event,
    ExecEvent,
    ForkEvent,
    VerdictEvent,
    VerdictKind,
)
from monitor.observe.alerts import Notifier
from monitor.policy.engine import (
    CpuWindows,
    Verdict,
    destination_address,
    evaluate_connect,
    evaluate_cpu,
    evaluate_exec,
    evaluate_processes,
    format_destination,
)
from monitor.policy.kernel_tables import KernelTables, rules_of
from monitor.policy.types import Action, EventKind, Mode, Policy
from monitor.sessions.tracker import Process, Tracker

Log = Callable[..., None]


CONNECT_MEMO_SIZE = 65536


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Judge:
    def __init__(self, policy: Policy, tables: KernelTables, enforcer: Enforcer,
                 tracker: Tracker, log: Log,
                 on_kill_latency: Callable[[str, float], None] | None = None,
                 alerts: Notifier | None = None) -> None:
        self.policy = policy
        self.alerts = alerts
        self.tables = tables
        self.enforcer = enforcer
        self.tracker = tracker
        self.log = log
        self.kernel_rules = frozenset(r.name for r in tables.rules)
        self.counts: Counter[tuple[str, str, str, str]] = Counter()  # agent, rule, action, mode
        self.kills: Counter[tuple[str, str]] = Counter()  # agent, rule
        self.on_kill_latency = on_kill_latency
        self.cpu = CpuWindows()
        self._kernel_seen: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._once: set[tuple[str, int, int]] = set()  # (rule, session, pid) of repeating rules
        # connect verdicts depend only on (agent, destination) under one policy: remembered,
        # so a busy agent's repeated connects do not walk every userspace rule again
        self._connect_memo: dict[tuple[str, str, int], list[Verdict]] = {}

    def use(self, policy: Policy, tables: KernelTables) -> None:
        """A reloaded policy: judge from now on by it (counters and windows carry over)."""
        self.policy, self.tables = policy, tables
        self.kernel_rules = frozenset(r.name for r in tables.rules)
        self._connect_memo.clear()

    # --- events ------------------------------------------------------------------------

    def on_event(self, ev: Event, agent: str, proc: Process | None) -> list[Verdict]:
        """Judge one event; returns the userspace verdicts acted on (for the metrics)."""
        if isinstance(ev, VerdictEvent):
            self._kernel_verdict(ev, agent)
            return []
        if proc is None:
            return []
        h = ev.h
        verdicts: list[Verdict] = []
        if isinstance(ev, ExecEvent):
            verdicts = [v for v in evaluate_exec(
                self.policy, agent=agent, session=h.session, pid=h.pid, exe=proc.exe,
                comm=h.comm, argv=ev.argv, line=ev.line)
                if (h.pid, v.rule) not in self._kernel_seen]
        elif isinstance(ev, ConnectEvent):
            key = (agent, ev.address, ev.port)
            found = self._connect_memo.get(key)
            if found is None:
                if len(self._connect_memo) >= CONNECT_MEMO_SIZE:
                    self._connect_memo.clear()
                found = self._connect_memo[key] = evaluate_connect(
                    self.policy, agent=agent, session=0, pid=0, family=ev.family,
                    address=ev.address, port=ev.port)
            verdicts = [replace(v, session=h.session, pid=h.pid) for v in found
                        if (h.pid, v.rule) not in self._kernel_seen]
        elif isinstance(ev, ForkEvent):
            session = self.tracker.session(h.session)
            live = len(session.processes) if session else 0
            verdicts = [v for v in evaluate_processes(
                self.policy, agent=agent, session=h.session, live=live, pid=h.pid)
                if self._first(v, per_process=False)]
        for v in verdicts:
            self.act(v, h.ts_ns)
        return verdicts

    def on_running(self, proc: Process, agent: str) -> list[Verdict]:
        """Judge a process found running rather than seen exec'ing (adopted at start,
        recovered after a restart, or found by reconciliation after a lost record): the exec
        rules on its current program and command line, as if it had just exec'd."""
        verdicts = evaluate_exec(self.policy, agent=agent, session=proc.session, pid=proc.pid,
                                 exe=proc.exe, comm=proc.comm, argv=proc.argv)
        for v in verdicts:
            self.act(v, None)
        return verdicts

    def _latency(self, path: str, event_ts_ns: int) -> None:
        ns = max(0, boot_ns() - event_ts_ns)
        if self.on_kill_latency is not None:
            self.on_kill_latency(path, ns / 1e9)

    def on_tick(self, now_ns: int | None = None) -> None:
        if not self.policy.rules_for(EventKind.CPU):
            return
        sessions = [(s.id, s.agent, s.cpu_ns, [(p.pid, p.cpu_ns) for p in s.processes.values()])
                    for s in self.tracker.sessions()]
        for v in evaluate_cpu(self.policy, self.cpu, now_ns=now_ns or boot_ns(),
                              sessions=sessions):
            rule = self.policy.rule(v.rule)
            per_process = rule is not None and getattr(rule.match, "scope", "") == "process"
            if self._first(v, per_process=per_process):
                self.act(v, None)

    def forget_session(self, session: int) -> None:
        self._once = {k for k in self._once if k[1] != session}

    def _first(self, v: Verdict, per_process: bool) -> bool:
        """Repeating rules (cpu, processes) speak once per session, or once per process
        for process-scope cpu rules, not on every tick or fork while the condition holds."""
        key = (v.rule, v.session, v.pid if per_process and v.action != Action.KILL_AGENT else 0)
        if key in self._once:
            return False
        self._once.add(key)
        return True

    # --- kernel verdicts -----------------------------------------------------------------

    def _kernel_verdict(self, ev: VerdictEvent, agent: str) -> None:
        h = ev.h
        proc = self.tracker.process(h.pid)
        for rule in rules_of(ev.mask, self.tables.rules):
            self._kernel_seen[(h.pid, rule.name)] = None
            while len(self._kernel_seen) > 4096:
                self._kernel_seen.popitem(last=False)
            if ev.verdict == VerdictKind.CONNECT:
                dest = format_destination(destination_address(ev.address), ev.port)
                reason = f"connect to {dest} (enforced in the kernel)"
            else:
                dest = None
                reason = f"exec of {h.comm!r} (enforced in the kernel)"
            v = Verdict(rule.name, rule.action, self.policy.mode, agent, h.session, h.pid,
                        reason, exe=proc.exe if proc else None,
                        argv=proc.argv if proc else None, destination=dest)
            outcome = "would kill" if self.policy.mode == Mode.MONITOR else (
                "killed in the kernel" if ev.enforced and rule.action != Action.DENY
                else "refused in the kernel" if ev.enforced else "alert")
            if ev.enforced and rule.action in (Action.KILL, Action.KILL_AGENT):
                self._latency("kernel", h.ts_ns)
            if rule.action == Action.KILL_AGENT and self.policy.mode == Mode.ENFORCE:
                self._kill_session(v, first="the offending process killed in the kernel; ")
                continue
            self._record(v, outcome, kill=outcome == "killed in the kernel")
            if ev.enforced and rule.action == Action.KILL:
                self.kills[(agent, rule.name)] += 1

    # --- acting --------------------------------------------------------------------------

    def act(self, v: Verdict, event_ts_ns: int | None) -> None:
        if self.policy.mode == Mode.MONITOR and v.action != Action.ALERT:
            self._record(v, "would kill" if v.action != Action.DENY else "would refuse")
            return
        if v.action == Action.ALERT:
            self._record(v, "alert")
        elif v.action == Action.KILL:
            if v.pid <= 0:
                self._record(v, "not enforced: no process named")
                return
            result = self.enforcer.kill(v.pid, v.session, event_ts_ns)
            self._record(v, self._outcome(result), kill=result.outcome == Outcome.KILLED)
            if result.outcome == Outcome.KILLED:
                self.kills[(v.agent, v.rule)] += 1
                if event_ts_ns is not None:
                    self._latency("userspace", event_ts_ns)
        elif v.action == Action.KILL_AGENT:
            self._kill_session(v)
        else:  # deny outside the kernel: only when over the kernel rule limit
            self._record(v, "not enforced: deny rules beyond the kernel's rule limit")

    def _kill_session(self, v: Verdict, first: str = "") -> None:
        session = self.tracker.session(v.session)
        known = list(session.processes) if session else []
        results = self.enforcer.kill_session(v.session, known)
        killed = sum(1 for r in results if r.outcome == Outcome.KILLED)
        self._record(v, f"agent session killed ({first}{killed} processes signalled)",
                     kill=True, refused=[f"{r.pid}: {r.reason}" for r in results
                              if r.outcome == Outcome.REFUSED])
        self.kills[(v.agent, v.rule)] += 1

    @staticmethod
    def _outcome(r: KillResult) -> str:
        return "killed" if r.outcome == Outcome.KILLED else f"{r.outcome.value}: {r.reason}"

    def _record(self, v: Verdict, outcome: str, *, kill: bool = False, **extra: Any) -> None:
        self.counts[(v.agent, v.rule, v.action.value, v.mode.value)] += 1
        chain = self.tracker.ancestry(v.pid) if v.pid > 0 else []
        ancestry = [{"pid": p.pid, "comm": p.comm, "exe": p.exe} for p in chain]
        exe = v.exe if v.exe is not None else (chain[0].exe if chain else None)
        argv = v.argv if v.argv is not None else (chain[0].argv if chain else None)
        if argv is not None:
            argv = clip(argv)  # judged whole; a log line and an alert get KEEP_CHARS of it
        self.log("verdict", level="warning", agent=v.agent, rule=v.rule, action=v.action.value,
                 mode=v.mode.value, outcome=outcome, session=v.session, pid=v.pid,
                 reason=v.reason, exe=exe, argv=list(argv) if argv else None,
                 destination=v.destination, cpu_cores=v.cpu_cores, processes=v.processes,
                 ancestry=ancestry, **extra)
        if kill and self.alerts is not None:
            self.alerts.kill(v, outcome, exe=exe, argv=argv)

