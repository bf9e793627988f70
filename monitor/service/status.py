"""What the daemon reports: the policy in force, the `status` reply, the systemd status
line, the per-event metrics it feeds, the readings the Prometheus collector takes at
scrape time (observe.metrics.MetricsSource), and the stream to control-socket subscribers.

Reads state, never writes session or judge state: the readers that run on other threads
(the collector's HTTP thread) take the daemon's lock. Nothing here decides or acts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.config.types import Config
from monitor.enforce.judge import Judge
from monitor.kernel.maps import KernelMaps
from monitor.model import events
from monitor.model.agents import AgentSpec
from monitor.model.events import ConnectEvent, Event, ExecEvent, ExitEvent, VerdictEvent
from monitor.model.events import VerdictKind as VK
from monitor.model.records import PolicyStatus, SessionStatus, StatusReply, VerdictTotal
from monitor.observe.auditlog import AuditLog, SinkStats
from monitor.observe.metrics import (
    AgentUsage,
    MetricsState,
    PolicyInfo,
    connect_verdict,
    kernel_connect_verdict,
    rule_verdict,
    usage_of,
)
from monitor.observe.notifier import Notifier
from monitor.observe.output import record
from monitor.policy.engine import Verdict
from monitor.policy.kernel_tables import KernelTables
from monitor.policy.types import Action, Mode, Policy
from monitor.service.control import Subscribers
from monitor.sessions.registry import AgentTable
from monitor.sessions.tracker import Process, Tracker

CONNECTS_IN_FLIGHT = 4096  # kernel connect verdicts kept waiting for their connect record


@dataclass
class InForce:
    """The config and policy in force, and what was built from them. One object for the
    daemon's life: a reload sets its fields, on the loop."""

    config: Config
    policy: Policy
    specs: tuple[AgentSpec, ...]
    tables: KernelTables
    gen: int = 0  # the generation of the kernel's rule and matcher maps in force


class Feed:
    """What `agentwatch top` and `trace` subscribers are streamed: events, and verdicts
    (which also go to the log)."""

    def __init__(self, subscribers: Subscribers, log: Callable[..., None]) -> None:
        self.subscribers = subscribers
        self.log = log

    def verdict_log(self, msg: str, level: str = "info", **fields: Any) -> None:
        """The judge's log lines; verdicts also stream to subscribers (agentwatch top)."""
        self.log(msg, level=level, **fields)
        if msg == "verdict" and self.subscribers:
            self.subscribers.send(json.dumps({"event": "policy_verdict", **fields},
                                             default=str, separators=(",", ":")))

    def event(self, ev: Event, agent: str) -> None:
        if self.subscribers:
            self.subscribers.send(json.dumps(record(ev, agent), separators=(",", ":")))


class Report:
    def __init__(self, now: InForce, lock: threading.RLock, tracker: Tracker, judge: Judge,
                 probes: KernelMaps, agents: AgentTable, metrics: MetricsState,
                 notifier: Notifier, log: object) -> None:
        self.now = now
        self.lock = lock
        self.tracker = tracker
        self.judge = judge
        self.probes = probes
        self.agents = agents
        self.metrics = metrics
        self.notifier = notifier
        self.log = log
        self._connect_verdicts: dict[int, str] = {}  # tid -> kernel verdict, connect in flight

    # --- fed by the loop ---------------------------------------------------------------

    def observe(self, ev: Event, agent: str, proc: Process | None,
                acted: list[Verdict]) -> None:
        """Count one event of an agent session, with the verdicts acted on for it."""
        m = self.metrics
        m.observe_event(ev.kind, agent)
        if isinstance(ev, ExecEvent):
            m.observe_exec(agent, ev.filename)
        elif isinstance(ev, ConnectEvent):
            enforce = self.now.policy.mode == Mode.ENFORCE
            done = [rule_verdict(v.action.value, enforce and v.action != Action.DENY)
                    for v in acted]
            kernel = self._connect_verdicts.pop(ev.h.tid, None)
            if kernel:
                done.append(kernel)
            m.observe_connect(agent, ev.address, connect_verdict(*done), ev.send)
        elif isinstance(ev, VerdictEvent) and ev.verdict == VK.CONNECT and not ev.unchecked:
            # (a verdict on opening a raw or ICMP socket has no connect record to wait for)
            if len(self._connect_verdicts) > CONNECTS_IN_FLIGHT:  # their connects were lost
                self._connect_verdicts.clear()
            self._connect_verdicts[ev.h.tid] = kernel_connect_verdict(ev)
        elif isinstance(ev, ExitEvent) and proc is not None:
            m.observe_exit(agent, proc.cpu_ns)

    # --- status --------------------------------------------------------------------------

    def status(self, events_seen: int, decode_errors: int) -> dict[str, Any]:
        """The control socket's `status` reply (`agentwatch status`), as model.records
        defines it for every reader. Read under the lock, on the caller's thread."""
        policy, tables = self.now.policy, self.now.tables
        with self.lock:
            sessions = tuple(
                SessionStatus(s.id, s.agent, s.root_pid, len(s.processes),
                              round(s.cpu_ns / 1e9, 3), s.execs, s.connects)
                for s in self.tracker.sessions())
            verdicts = tuple(VerdictTotal(a, r, act, m, n)
                             for (a, r, act, m), n in sorted(self.judge.counts.items()))
            evicted = self.tracker.evicted
            agents = tuple(self.agents.names())
        return StatusReply(
            probes=self.probes.attached, probes_expected=self.probes.expected,
            events=events_seen,
            policy=PolicyStatus(policy.source, policy.sha256, policy.mode.value,
                                len(policy.rules), tuple(r.name for r in tables.rules)),
            verdicts=verdicts, decode_errors=decode_errors, sessions=sessions,
            processes_evicted=evicted,
            counters={c.name.lower(): v for c, v in self.probes.counters().items()},
            agents=agents).to_json()

    def status_line(self) -> str:
        """One line for systemd (`systemctl status`)."""
        sessions = self.tracker.sessions()
        kills = sum(self.judge.kills.values())
        policy = self.now.policy
        return (f"{policy.mode.value}: {len(sessions)} agent sessions, "
                f"{sum(len(s.processes) for s in sessions)} processes, {kills} kills, "
                f"policy {policy.sha256[:12]}")

    # --- metrics source (observe/metrics.py MetricsSource), read at scrape time ----------

    def agent_usage(self) -> Mapping[str, AgentUsage]:
        with self.lock:
            return usage_of(self.tracker.sessions())

    def bpf_counters(self) -> Mapping[events.Counter, int]:
        try:
            return self.probes.counters()
        except RuntimeError:  # not loaded yet, or closed
            return {}

    def agent_losses(self) -> Mapping[str, tuple[int, int]]:
        try:
            by_index = self.probes.agent_losses()
        except RuntimeError:  # not loaded yet, or closed
            return {}
        return {("pending" if i >= events.MAX_AGENTS else self.agents.name(i)): v
                for i, v in by_index.items()}

    def probes_attached(self) -> int:
        return int(self.probes.attached)

    def probes_expected(self) -> int:
        return int(self.probes.expected)

    def policy_info(self) -> PolicyInfo:
        return PolicyInfo(self.now.policy.sha256, self.now.policy.mode.value)

    def alerts_spooled(self) -> int:
        return self.notifier.spooled()

    def alert_deliveries(self) -> Mapping[tuple[str, str], int]:
        return dict(self.notifier.deliveries)

    def sink_stats(self) -> Mapping[str, SinkStats]:
        audit = getattr(self.log, "audit", None)
        return {"alert_spool": self.notifier.sink_stats(),
                "audit_log": audit.stats() if isinstance(audit, AuditLog) else SinkStats()}
