"""Prometheus metrics: what agents did, what the policy decided, and how the monitor is.

MetricsState owns every counter the monitor keeps between scrapes: events, execs, connects
and exited CPU per agent (updated by the one event thread, a list or dict increment per
event), verdicts and kills by rule (reported by the judge), kill latency, reloads, alert
deliveries, kill switch uses. The collector (monitor/observe/collector.py) reads it, with the
BPF counters and the tracker's live processes, when Prometheus scrapes. Every label is
bounded whatever an agent does: at most MAX_AGENTS agent names and MAX_BINARIES binaries per
agent (the rest are "other"), each escaped and cut to 64 characters (monitor.model.safetext),
destinations as a class, never an address, port, pid or argv. This module never decides
policy and never signals anything.
"""

from __future__ import annotations

import bisect
import ipaddress
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from prometheus_client.utils import floatToGoString

from monitor import __version__
from monitor.model.address import fold
from monitor.model.events import EventType, KAction, VerdictEvent
from monitor.model.safetext import label_value
from monitor.sessions.completion import REASONS as ARGV_UNCONFIRMED_REASONS
from monitor.sessions.tracker import Session

MAX_AGENTS = 64
MAX_BINARIES = 20
OTHER = "other"
DEFAULT_ADDRESS = "127.0.0.1:9464"

EVENT_KINDS = ("fork", "exec", "connect", "exit", "verdict")
CONNECT_VERDICTS = ("allowed", "alerted", "denied", "killed")
CONNECT_KINDS = ("connect", "datagram")  # a connect, or a UDP datagram sent with an address
DESTINATIONS = ("loopback", "private", "link_local", "public", "multicast", "other")
KILL_PATHS = ("kernel", "userspace")
RECEIVERS = ("alertmanager", "webhook")
SINKS = ("alert_spool", "audit_log")  # what the monitor writes to disk (agentwatch_sink_*)
KILL_LATENCY_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25,
                        .5, 1.0, 2.5)

_KIND_INDEX: dict[str | int, int] = {k: i for i, k in enumerate(EVENT_KINDS)}
_KIND_INDEX.update({EventType[k.upper()]: i for i, k in enumerate(EVENT_KINDS)})
_VERDICT_BASE = {v: i * len(DESTINATIONS) for i, v in enumerate(CONNECT_VERDICTS)}
_DATAGRAM_BASE = len(CONNECT_VERDICTS) * len(DESTINATIONS)  # where datagram counts start
DELIVERED = frozenset({"ok", "success"})  # delivery results counted as ok
BUCKET_LABELS = tuple(floatToGoString(b) for b in KILL_LATENCY_BUCKETS) + ("+Inf",)


# --- destination classes ----------------------------------------------------------------

_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


def _classify(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    ip = fold(ip)
    if ip.is_loopback:
        return 0
    if ip.is_link_local:
        return 2
    if ip.is_multicast:
        return 4
    if any(ip in net for net in _PRIVATE):
        return 1
    if ip.is_global:
        return 3
    return 5  # unspecified, reserved, documentation, broadcast


@lru_cache(maxsize=4096)
def _destination_index(address: str) -> int:
    try:
        return _classify(ipaddress.ip_address(address))
    except ValueError:
        return len(DESTINATIONS) - 1


def destination_class(address: str) -> str:
    """The class of a connect destination: loopback, private (RFC 1918, shared 100.64/10,
    IPv6 ULA), link_local, public, multicast or other. IPv4-mapped IPv6 is its IPv4."""
    return DESTINATIONS[_destination_index(address)]


_STRENGTH = {"alerted": 1, "denied": 2, "killed": 3}
_KILLS = frozenset({"kill", "kill-agent"})


def rule_verdict(action: str, enforced: bool) -> str:
    """What one matched rule did to a connect: killed, denied, or alerted (an alert rule,
    monitor mode, or an action that was not carried out). action: a policy Action value."""
    if enforced and action in _KILLS:
        return "killed"
    if enforced and action == "deny":
        return "denied"
    return "alerted"


def kernel_connect_verdict(ev: VerdictEvent) -> str:
    """rule_verdict for a kernel VerdictEvent of kind CONNECT (it precedes its connect)."""
    return rule_verdict("kill" if ev.action in (KAction.KILL, KAction.KILL_AGENT) else
                        "deny" if ev.action == KAction.DENY else "alert", ev.enforced)


def connect_verdict(*policy: str) -> str:
    """The verdict label of one connect: the strongest of what matched rules did to it
    (rule_verdict values), else allowed (connects are seen as they start, so whether the
    peer then answered is not known here)."""
    if policy:
        return max(policy, key=_STRENGTH.__getitem__)
    return "allowed"


def _label(text: str) -> str:
    """A label value made from text an agent may have chosen (a binary's name): controls,
    format characters and undecodable bytes as visible escapes, at most LABEL_MAX
    characters (monitor.model.safetext.label_value). It encodes as UTF-8 (a surrogate would make
    the whole scrape fail) and holds nothing a Grafana legend or an alert would act on."""
    return label_value(text)


# --- state updated on the hot path --------------------------------------------------------


class _AgentStats:
    __slots__ = ("label", "events", "execs", "exec_other", "connects", "exited_cpu_ns",
                 "killswitch")

    def __init__(self, label: str) -> None:
        self.label = label
        self.events = [0] * len(EVENT_KINDS)
        self.execs: dict[str, int] = {}
        self.exec_other = 0
        self.connects = [0] * (len(CONNECT_KINDS) * _DATAGRAM_BASE)
        self.exited_cpu_ns = 0
        self.killswitch = 0


@dataclass
class _Histogram:
    counts: list[int]
    sum: float = 0.0


@dataclass(frozen=True)
class AgentUsage:
    """One agent's live state, from the tracker: processes, sessions, CPU of live processes."""

    processes: int = 0
    sessions: int = 0
    cpu_ns: int = 0


def usage_of(sessions: Iterable[Session]) -> dict[str, AgentUsage]:
    """Live processes, sessions and live processes' CPU per agent (call under the lock that
    guards the tracker). Exited processes' CPU comes from MetricsState.observe_exit."""
    acc: dict[str, list[int]] = {}
    for s in sessions:
        a = acc.get(s.agent)
        if a is None:
            a = acc[s.agent] = [0, 0, 0]
        a[0] += len(s.processes)
        a[1] += 1
        a[2] += sum(p.cpu_ns for p in s.processes.values())
    return {k: AgentUsage(*v) for k, v in acc.items()}


class MetricsState:
    """Counts kept in the monitor between scrapes, with every label bounded here.

    observe_event/exec/connect/exit are called from the one event thread (no lock on that
    path); the others may come from any thread and take a lock (they are rare).
    """

    def __init__(self, agents: Iterable[str] = (), *, version: str = __version__,
                 kernel: str | None = None, host_cpus: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.version = version
        self.kernel = platform.release() if kernel is None else kernel
        self.host_cpus = (os.cpu_count() or 0) if host_cpus is None else host_cpus
        self._clock = clock
        self._lock = threading.Lock()
        self._other = _AgentStats(OTHER)
        self._by_name: dict[str, _AgentStats] = {OTHER: self._other}
        self._by_label: dict[str, _AgentStats] = {OTHER: self._other}
        self._latency = {p: _Histogram([0] * len(BUCKET_LABELS)) for p in KILL_PATHS}
        self._reloads = {"ok": 0, "refused": 0}
        self._deliveries = {(r, res): 0 for r in RECEIVERS for res in ("ok", "error")}
        self.policy_loaded_at: float | None = None
        self.policy_load_seconds: float | None = None
        self._cpu_emitted: dict[str, int] = {}
        self._argv_unconfirmed: dict[tuple[str, str], int] = {}  # (agent label, reason)
        self._verdicts: dict[tuple[str, str, str, str], int] = {}  # agent, rule, action, mode
        self._kills: dict[tuple[str, str], int] = {}  # agent, rule
        for name in agents:  # configured agents get their label before ad-hoc ones
            self._agent(name)

    # --- agents -----------------------------------------------------------------------

    def _agent(self, name: str) -> _AgentStats:
        stats = self._by_name.get(name)
        if stats is not None:
            return stats
        if not name or len(self._by_label) > MAX_AGENTS:  # full: never cache the name
            return self._other
        with self._lock:
            label = _label(name)
            stats = self._by_label.get(label)
            if stats is None:
                if len(self._by_label) > MAX_AGENTS:
                    return self._other
                stats = self._by_label[label] = _AgentStats(label)
            if label == name:
                self._by_name[name] = stats
            return stats

    def agent_label(self, name: str) -> str:
        """The agent label for this name: itself while fewer than MAX_AGENTS names have
        been seen, "other" after that. A name keeps its label for the monitor's life."""
        return self._agent(name).label

    # --- hot path ---------------------------------------------------------------------

    def observe_event(self, kind: str | EventType, agent: str) -> None:
        """One event of a tracked process: fork, exec, connect, exit or verdict."""
        self._agent(agent).events[_KIND_INDEX[kind]] += 1

    def observe_exec(self, agent: str, exe: str) -> None:
        stats = self._agent(agent)
        base = exe.rpartition("/")[2]
        execs = stats.execs
        n = execs.get(base)
        if n is not None:
            execs[base] = n + 1
            return
        label = _label(base)
        if not label or label == OTHER:
            stats.exec_other += 1
        elif label in execs:
            execs[label] += 1
        elif len(execs) < MAX_BINARIES:
            execs[label] = 1
        else:
            stats.exec_other += 1

    def observe_connect(self, agent: str, address: str, verdict: str,
                        send: bool = False) -> None:
        """verdict: allowed, alerted, denied or killed (see connect_verdict); send: a
        datagram sent with this destination rather than a connect."""
        base = _DATAGRAM_BASE if send else 0
        self._agent(agent).connects[base + _VERDICT_BASE[verdict]
                                    + _destination_index(address)] += 1

    def observe_exit(self, agent: str, cpu_ns: int) -> None:
        """A tracked process ended having used cpu_ns; its CPU leaves the live sum here."""
        self._agent(agent).exited_cpu_ns += cpu_ns

    # --- rare paths -------------------------------------------------------------------

    def observe_kill_latency(self, path: str, seconds: float) -> None:
        """Event to kill, through the kernel or from userspace."""
        seconds = max(0.0, seconds)  # also turns NaN into 0
        with self._lock:
            h = self._latency[path]
            h.counts[bisect.bisect_left(KILL_LATENCY_BUCKETS, seconds)] += 1
            h.sum += seconds

    def observe_policy_loaded(self, load_seconds: float) -> None:
        """The policy now in force was loaded (at start, or by a reload) in load_seconds."""
        with self._lock:
            self.policy_loaded_at = self._clock()
            self.policy_load_seconds = load_seconds

    def observe_reload(self, ok: bool, load_seconds: float) -> None:
        """A reload was asked for: ok (the new policy is in force) or refused (the old one
        stays, and so do its load time and duration)."""
        if ok:
            self.observe_policy_loaded(load_seconds)
        with self._lock:
            self._reloads["ok" if ok else "refused"] += 1

    def observe_killswitch(self, agent: str) -> None:
        stats = self._agent(agent)
        with self._lock:
            stats.killswitch += 1

    def observe_argv_unconfirmed(self, agent: str, reason: str) -> None:
        """An exec judged on the probes' cut copy of argv: /proc could not confirm the rest
        (reason: monitor.sessions.completion.REASONS)."""
        if reason not in ARGV_UNCONFIRMED_REASONS:
            raise ValueError(f"unknown reason {reason!r}: one of {ARGV_UNCONFIRMED_REASONS}")
        key = (self._agent(agent).label, reason)
        with self._lock:
            self._argv_unconfirmed[key] = self._argv_unconfirmed.get(key, 0) + 1

    def argv_unconfirmed(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._argv_unconfirmed)

    def count_verdict(self, agent: str, rule: str, action: str, mode: str) -> None:
        """One verdict recorded (by agent name; labels are made at scrape time)."""
        key = (agent, rule, action, mode)
        with self._lock:
            self._verdicts[key] = self._verdicts.get(key, 0) + 1

    def count_kill(self, agent: str, rule: str) -> None:
        """One kill carried out for a rule (in the kernel, from userspace, or a session)."""
        key = (agent, rule)
        with self._lock:
            self._kills[key] = self._kills.get(key, 0) + 1

    def verdict_counts(self) -> dict[tuple[str, str, str, str], int]:
        """(agent, rule, action, mode) -> verdicts recorded."""
        with self._lock:
            return dict(self._verdicts)

    def kill_counts(self) -> dict[tuple[str, str], int]:
        """(agent, rule) -> kills carried out."""
        with self._lock:
            return dict(self._kills)

    def observe_delivery(self, receiver: str, ok: bool) -> None:
        """One attempt to hand an alert to a receiver (alertmanager or webhook)."""
        key = (receiver, "ok" if ok else "error")
        with self._lock:
            if key not in self._deliveries:
                raise ValueError(f"unknown alert receiver {receiver!r}: one of {RECEIVERS}")
            self._deliveries[key] += 1

    # --- read at scrape time ----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A consistent copy of everything kept here (copies are C-level: safe while the
        event thread keeps counting)."""
        with self._lock:
            agents = [AgentCounts(a.label, tuple(a.events), a.execs.copy(), a.exec_other,
                                  tuple(a.connects), a.exited_cpu_ns, a.killswitch)
                      for a in self._by_label.values()]
            latency = {p: (tuple(h.counts), h.sum) for p, h in self._latency.items()}
            return Snapshot(agents, latency, dict(self._reloads), dict(self._deliveries),
                            self.policy_loaded_at, self.policy_load_seconds)

    def cpu_total_ns(self, label: str, ns: int) -> int:
        """Never lower than what was reported before for this agent label: a counter must
        not go back (a pid reused across sessions drops a process without an exit event)."""
        with self._lock:
            ns = max(ns, self._cpu_emitted.get(label, 0))
            self._cpu_emitted[label] = ns
        return ns


@dataclass(frozen=True)
class AgentCounts:
    label: str
    events: tuple[int, ...]            # by EVENT_KINDS
    execs: dict[str, int]              # binary -> execs, at most MAX_BINARIES
    exec_other: int
    connects: tuple[int, ...]          # [((kind index * len(CONNECT_VERDICTS)) + verdict
    #                                      index) * len(DESTINATIONS) + class index]
    exited_cpu_ns: int
    killswitch: int

    @property
    def counted(self) -> bool:
        return bool(any(self.events) or self.execs or self.exec_other or any(self.connects)
                    or self.exited_cpu_ns or self.killswitch)


@dataclass(frozen=True)
class Snapshot:
    agents: list[AgentCounts]
    latency: dict[str, tuple[tuple[int, ...], float]]  # path -> (per-bucket counts, sum)
    reloads: dict[str, int]
    deliveries: dict[tuple[str, str], int]
    policy_loaded_at: float | None
    policy_load_seconds: float | None


@dataclass(frozen=True)
class PolicyInfo:
    """The policy in force, as agentwatch_policy_info shows it."""

    sha256: str
    mode: str  # monitor or enforce
