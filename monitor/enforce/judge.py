"""Apply the policy to what agents do: evaluate (monitor/policy/engine.py) and decide.

For each verdict the judge returns a Decision (monitor/enforce/decision.py): what to do and
the outcome meant. In monitor mode nothing is done: every verdict is "would kill" (or "would
refuse"). The executor (monitor/enforce/executor.py) carries a decision out through the
Enforcer, and the reporter (monitor/enforce/reporter.py) logs, counts and alerts what came
of it; the judge runs the three in that order for every verdict. Kernel verdicts (rules the
probes enforce themselves) arrive as VerdictEvents just before the event they concern; they
are decided and reported here, never enforced twice. This module does no matching of its
own, never signals a process and keeps no counters (MetricsState does).
"""

from __future__ import annotations

import os.path
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from monitor.enforce.decision import Decision, Step, boot_ns, latency_since
from monitor.enforce.enforcer import Enforcer
from monitor.enforce.executor import Executor
from monitor.enforce.reporter import Reporter
from monitor.model.cmdline import comm_of
from monitor.model.events import (
    ConnectEvent,
    Event,
    ExecEvent,
    ForkEvent,
    VerdictEvent,
    VerdictKind,
)
from monitor.model.outcome import Outcome
from monitor.observe.metrics import MetricsState
from monitor.observe.notifier import Notifier
from monitor.policy.cpu import CpuWindows, evaluate_cpu
from monitor.policy.engine import (
    Verdict,
    connect_what,
    destination_address,
    evaluate_connect,
    evaluate_exec,
    evaluate_processes,
    format_destination,
    wants_ssh_config,
)
from monitor.policy.identity import NO_HOST_BINARIES, HostBinaries
from monitor.policy.kernel_tables import KernelTables, rules_of
from monitor.policy.types import Action, EventKind, ExecMatch, Mode, Policy
from monitor.sessions.tracker import Process, Tracker

Log = Callable[..., None]


CONNECT_MEMO_SIZE = 65536
KERNEL_SEEN_SIZE = 4096


class Judge:
    def __init__(self, policy: Policy, tables: KernelTables, enforcer: Enforcer,
                 tracker: Tracker, log: Log, *, metrics: MetricsState | None = None,
                 alerts: Notifier | None = None,
                 host: HostBinaries = NO_HOST_BINARIES) -> None:
        self.policy = policy
        self.tables = tables
        self.host = host  # fingerprints of the host binaries the policy names
        self.tracker = tracker
        self.metrics = metrics if metrics is not None else MetricsState()
        self.executor = Executor(enforcer, tracker)
        self.reporter = Reporter(log, self.metrics, tracker, alerts)
        self.kernel_rules = frozenset(r.name for r in tables.rules)
        self.cpu = CpuWindows()
        self._kernel_seen: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._once: set[tuple[str, int, int]] = set()  # (rule, session, pid) of repeating rules
        # connect verdicts depend only on (agent, destination, connect or datagram) under one
        # policy: remembered, so a busy agent's repeated connects do not walk every userspace
        # rule again
        self._connect_memo: dict[tuple[str, str, int, bool], list[Verdict]] = {}

    @property
    def counts(self) -> dict[tuple[str, str, str, str], int]:
        """(agent, rule, action, mode) -> verdicts recorded (kept by MetricsState)."""
        return self.metrics.verdict_counts()

    @property
    def kills(self) -> dict[tuple[str, str], int]:
        """(agent, rule) -> kills carried out (kept by MetricsState)."""
        return self.metrics.kill_counts()

    def use(self, policy: Policy, tables: KernelTables,
            host: HostBinaries = NO_HOST_BINARIES) -> None:
        """A reloaded policy (and the fingerprints of the host binaries it names): judge
        from now on by it (counters and windows carry over)."""
        self.policy, self.tables, self.host = policy, tables, host
        self.kernel_rules = frozenset(r.name for r in tables.rules)
        self._connect_memo.clear()

    # --- events ------------------------------------------------------------------------

    def on_event(self, ev: Event, agent: str, proc: Process | None) -> list[Verdict]:
        """Judge one event; returns the userspace verdicts acted on (for the metrics)."""
        if isinstance(ev, VerdictEvent):
            self._carry_out(self._kernel_decisions(ev, agent))
            return []
        if proc is None:
            return []
        h = ev.h
        verdicts: list[Verdict] = []
        if isinstance(ev, ExecEvent):
            verdicts = [v for v in (self._exec_verdicts(ev, agent, proc.exe)
                                    if ev.loader is None else self._loader_verdicts(ev, agent))
                        if (h.pid, v.rule) not in self._kernel_seen]
        elif isinstance(ev, ConnectEvent):
            key = (agent, ev.address, ev.port, ev.send)
            found = self._connect_memo.get(key)
            if found is None:
                if len(self._connect_memo) >= CONNECT_MEMO_SIZE:
                    self._connect_memo.clear()
                found = self._connect_memo[key] = evaluate_connect(
                    self.policy, agent=agent, session=0, pid=0, family=ev.family,
                    address=ev.address, port=ev.port, send=ev.send)
            verdicts = [replace(v, session=h.session, pid=h.pid) for v in found
                        if (h.pid, v.rule) not in self._kernel_seen]
        elif isinstance(ev, ForkEvent):
            session = self.tracker.session(h.session)
            live = len(session.processes) if session else 0
            verdicts = [v for v in evaluate_processes(
                self.policy, agent=agent, session=h.session, live=live, pid=h.pid)
                if self._first(v, per_process=False)]
        if verdicts:
            self._carry_out([self.decide(v, h.ts_ns) for v in verdicts])
        return verdicts

    def wants_ssh_config(self, ev: ExecEvent, agent: str | None) -> bool:
        """Whether this exec needs its ssh config read before it is judged
        (policy/engine.wants_ssh_config); a question, it changes nothing."""
        return wants_ssh_config(self.policy, self.host, agent=agent, exe=ev.filename,
                                comm=ev.h.comm, argv=ev.argv, line=ev.line, sha256=ev.sha256)

    def _exec_verdicts(self, ev: ExecEvent, agent: str, exe: str) -> list[Verdict]:
        h = ev.h
        return evaluate_exec(self.policy, agent=agent, session=h.session, pid=h.pid, exe=exe,
                             comm=h.comm, argv=ev.argv, line=ev.line, fileless=ev.is_fileless,
                             ssh_config=ev.ssh_config, ssh_config_from=ev.ssh_config_from,
                             sha256=ev.sha256, host=self.host, real_exe=ev.real_exe)

    def _loader_verdicts(self, ev: ExecEvent, agent: str) -> list[Verdict]:
        """A program run through a loader (sessions/loader.py): judged as that program,
        named as the kernel would name it had it been exec'd; then the others the exec may
        run (the loader itself included); one verdict per rule."""
        h = ev.h
        found: dict[str, Verdict] = {}
        runs = ((ev.filename, ev.argv, ev.sha256),
                *((exe, argv, None) for exe, argv in ev.loader_others))
        for exe, argv, sha256 in runs:  # the program's content is known, the others' not
            for v in evaluate_exec(self.policy, agent=agent, session=h.session, pid=h.pid,
                                   exe=exe, comm=comm_of(os.path.basename(exe)), argv=argv,
                                   line=ev.line, loader=ev.loader, fileless=ev.is_fileless,
                                   ssh_config=ev.ssh_config,
                                   ssh_config_from=ev.ssh_config_from, sha256=sha256,
                                   host=self.host):
                found.setdefault(v.rule, v)
        return list(found.values())

    def on_running(self, proc: Process, agent: str, run: ExecEvent | None = None,
                   sha256: str | None = None) -> list[Verdict]:
        """Judge a process found running rather than seen exec'ing (adopted at start,
        recovered after a restart, or found by reconciliation after a lost record): the exec
        rules on its current program (sha256: its content) and command line, as if it had
        just exec'd; `run`, when it runs a program through a loader, that exec
        (sessions/loader.Loaders.running, fingerprinted)."""
        verdicts = self._loader_verdicts(run, agent) if run is not None and run.loader else \
            evaluate_exec(self.policy, agent=agent, session=proc.session, pid=proc.pid,
                          exe=proc.exe, comm=proc.comm, argv=proc.argv, sha256=sha256,
                          host=self.host)
        self._carry_out([self.decide(v, None) for v in verdicts])
        return verdicts

    def on_tick(self, now_ns: int | None = None) -> None:
        if not self.policy.rules_for(EventKind.CPU):
            return
        sessions = [(s.id, s.agent, s.cpu_ns, [(p.pid, p.cpu_ns) for p in s.processes.values()])
                    for s in self.tracker.sessions()]
        decisions = []
        for v in evaluate_cpu(self.policy, self.cpu, now_ns=now_ns or boot_ns(),
                              sessions=sessions):
            rule = self.policy.rule(v.rule)
            per_process = rule is not None and getattr(rule.match, "scope", "") == "process"
            if self._first(v, per_process=per_process):
                decisions.append(self.decide(v, None))
        self._carry_out(decisions)

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

    # --- deciding ----------------------------------------------------------------------

    def decide(self, v: Verdict, event_ts_ns: int | None) -> Decision:
        """What to do about a userspace verdict (event_ts_ns: the event judged, if any)."""
        if self.policy.mode == Mode.MONITOR and v.action != Action.ALERT:
            would = Outcome.WOULD_KILL if v.action != Action.DENY else Outcome.WOULD_REFUSE
            return Decision(v, Step.NOTHING, would)
        if v.action == Action.ALERT:
            return Decision(v, Step.NOTHING, Outcome.ALERTED)
        if v.action == Action.KILL:
            if v.pid <= 0:
                return Decision(v, Step.NOTHING, Outcome.NOT_ENFORCED, "no process named")
            return Decision(v, Step.KILL_PROCESS, Outcome.KILLED, event_ts_ns=event_ts_ns)
        if v.action == Action.KILL_AGENT:
            return Decision(v, Step.KILL_SESSION, Outcome.SESSION_KILLED)
        # deny outside the kernel: only when over the kernel rule limit
        return Decision(v, Step.NOTHING, Outcome.NOT_ENFORCED,
                        "deny rules beyond the kernel's rule limit")

    def _kernel_decisions(self, ev: VerdictEvent, agent: str) -> list[Decision]:
        """A kernel verdict: one decision per rule it names (the kernel did the deed)."""
        h = ev.h
        proc = self.tracker.process(h.pid)
        decisions = []
        for rule in rules_of(ev.mask, self.tables.rules):
            self._kernel_seen[(h.pid, rule.name)] = None
            while len(self._kernel_seen) > KERNEL_SEEN_SIZE:
                self._kernel_seen.popitem(last=False)
            if ev.verdict == VerdictKind.CONNECT and ev.unchecked:
                dest = None
                reason = (f"opened a raw or ICMP socket ({ev.family_name}): where its "
                          "datagrams go cannot be checked (enforced in the kernel)")
            elif ev.verdict == VerdictKind.CONNECT:
                dest = format_destination(destination_address(ev.address), ev.port)
                reason = f"{connect_what(ev.send)} {dest} (enforced in the kernel)"
            else:
                dest = None
                file = f", file {ev.file!r}" if ev.file and ev.file != h.comm else ""
                what = "fileless exec" if isinstance(rule.match, ExecMatch) \
                    and rule.match.fileless else "exec"
                reason = f"{what} of {h.comm!r}{file} (enforced in the kernel)"
            v = Verdict(rule.name, rule.action, self.policy.mode, agent, h.session, h.pid,
                        reason, exe=proc.exe if proc else None,
                        argv=proc.argv if proc else None, destination=dest)
            latency = (latency_since(h.ts_ns) if ev.enforced
                       and rule.action in (Action.KILL, Action.KILL_AGENT) else None)
            if rule.action == Action.KILL_AGENT and self.policy.mode == Mode.ENFORCE:
                decisions.append(Decision(v, Step.KILL_SESSION, Outcome.SESSION_KILLED,
                                          in_kernel=True, kernel_latency=latency))
                continue
            outcome = Outcome.WOULD_KILL if self.policy.mode == Mode.MONITOR else (
                Outcome.KILLED_IN_KERNEL if ev.enforced and rule.action != Action.DENY
                else Outcome.REFUSED_IN_KERNEL if ev.enforced else Outcome.ALERTED)
            decisions.append(Decision(
                v, Step.NOTHING, outcome, in_kernel=True, kernel_latency=latency,
                kernel_kill=ev.enforced and rule.action == Action.KILL))
        return decisions

    # --- acting and reporting ------------------------------------------------------------

    def _carry_out(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self.reporter.report(self.executor.execute(d))
