"""Prometheus metrics: what agents did, what the policy decided, and how the monitor is.

Built like client_python's own collectors. The monitor's event thread updates a
MetricsState (a list or dict increment per event); the BPF counters, the tracker's live
processes and the judge's verdict counts are read when Prometheus scrapes, by an
AgentwatchCollector registered on a registry the caller passes in (never the global one).
Every label is bounded whatever an agent does: at most MAX_AGENTS agent names and
MAX_BINARIES binaries per agent (the rest are "other"), each escaped and cut to 64
characters (monitor.model.safetext), destinations as a class, never an address, port, pid or
argv. This module never decides policy and never signals anything.
"""

from __future__ import annotations

import bisect
import ipaddress
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from monitor import __version__
from monitor.model.address import fold, split_host_port
from monitor.model.errors import ConfigError, EnvironmentProblem, Location
from monitor.model.events import Counter as BpfCounter
from monitor.model.events import EventType, KAction, VerdictEvent
from monitor.model.safetext import label_value
from monitor.observe.auditlog import SinkStats
from monitor.observe.exporter import (
    DEFAULT_CACHE_SECONDS,
    DEFAULT_MAX_PER_SECOND,
    Exposition,
    Log,
    MetricsServer,
)
from monitor.sessions.completion import REASONS as ARGV_UNCONFIRMED_REASONS
from monitor.sessions.tracker import Session

MAX_AGENTS = 64
MAX_BINARIES = 20
OTHER = "other"
DEFAULT_ADDRESS = "127.0.0.1:9464"

EVENT_KINDS = ("fork", "exec", "connect", "exit", "verdict")
CONNECT_VERDICTS = ("allowed", "alerted", "denied", "killed")
DESTINATIONS = ("loopback", "private", "link_local", "public", "multicast", "other")
KILL_PATHS = ("kernel", "userspace")
RECEIVERS = ("alertmanager", "webhook")
SINKS = ("alert_spool", "audit_log")  # what the monitor writes to disk (agentwatch_sink_*)
KILL_LATENCY_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25,
                        .5, 1.0, 2.5)

_KIND_INDEX: dict[str | int, int] = {k: i for i, k in enumerate(EVENT_KINDS)}
_KIND_INDEX.update({EventType[k.upper()]: i for i, k in enumerate(EVENT_KINDS)})
_VERDICT_BASE = {v: i * len(DESTINATIONS) for i, v in enumerate(CONNECT_VERDICTS)}
_DELIVERED = frozenset({"ok", "success"})
_BUCKET_LABELS = tuple(floatToGoString(b) for b in KILL_LATENCY_BUCKETS) + ("+Inf",)


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
        self.connects = [0] * (len(CONNECT_VERDICTS) * len(DESTINATIONS))
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
        self._latency = {p: _Histogram([0] * len(_BUCKET_LABELS)) for p in KILL_PATHS}
        self._reloads = {"ok": 0, "refused": 0}
        self._deliveries = {(r, res): 0 for r in RECEIVERS for res in ("ok", "error")}
        self.policy_loaded_at: float | None = None
        self.policy_load_seconds: float | None = None
        self._cpu_emitted: dict[str, int] = {}
        self._argv_unconfirmed: dict[tuple[str, str], int] = {}  # (agent label, reason)
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

    def observe_connect(self, agent: str, address: str, verdict: str) -> None:
        """verdict: allowed, alerted, denied or killed (see connect_verdict)."""
        self._agent(agent).connects[_VERDICT_BASE[verdict] + _destination_index(address)] += 1

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
    connects: tuple[int, ...]          # [verdict index * len(DESTINATIONS) + class index]
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


# --- the collector --------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyInfo:
    sha256: str
    mode: str  # monitor or enforce


class MetricsSource(Protocol):
    """What the collector reads at scrape time (monitor/service/runtime.py Monitor provides it).
    Each method is called once per scrape, from the HTTP server's thread."""

    @property
    def metrics(self) -> MetricsState: ...

    def agent_usage(self) -> Mapping[str, AgentUsage]: ...

    def verdict_counts(self) -> Mapping[tuple[str, str, str, str], int]:
        """(agent, rule, action, mode) -> verdicts recorded (Judge.counts)."""
        ...

    def kill_counts(self) -> Mapping[tuple[str, str], int]:
        """(agent, rule) -> kills carried out (Judge.kills)."""
        ...

    def bpf_counters(self) -> Mapping[BpfCounter, int]: ...

    def agent_losses(self) -> Mapping[str, tuple[int, int]]:
        """agent name -> (records lost, connect records aggregated) in the kernel, for every
        agent with either; "pending" for candidates not yet named."""
        ...

    def probes_attached(self) -> int: ...

    def probes_expected(self) -> int: ...

    def policy_info(self) -> PolicyInfo: ...

    def alerts_spooled(self) -> int: ...

    def alert_deliveries(self) -> Mapping[tuple[str, str], int]:
        """(receiver, result) -> delivery attempts, as the alert notifier counts them
        (result ok/success, or error/failure/rejected: reported as ok or error). Added to
        what MetricsState.observe_delivery counted: feed deliveries through one of the two."""
        ...

    def sink_stats(self) -> Mapping[str, SinkStats]:
        """SINKS name -> what its disk refused: records in memory, dropped, failed writes."""
        ...


_C, _G, _H = "counter", "gauge", "histogram"
_FAMILIES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (_G, "agentwatch_build_info", ("version", "kernel"), "agentwatch version and kernel release"),
    (_C, "agentwatch_events_total", ("agent", "kind"), "events of agents' processes"),
    (_C, "agentwatch_execs_total", ("agent", "binary"),
     f"execs by program basename; {MAX_BINARIES} per agent, the rest other"),
    (_C, "agentwatch_connections_total", ("agent", "verdict", "destination"),
     "IPv4/IPv6 connects by policy verdict and destination class"),
    (_C, "agentwatch_policy_violations_total", ("agent", "rule", "action", "mode"),
     "policy rule matches (verdicts), in monitor and enforce mode"),
    (_C, "agentwatch_kills_total", ("agent", "rule"), "kills carried out for a rule"),
    (_H, "agentwatch_kill_latency_seconds", ("path",), "time from the event to the kill"),
    (_G, "agentwatch_processes", ("agent",), "live tracked processes"),
    (_G, "agentwatch_sessions", ("agent",), "live agent sessions"),
    (_C, "agentwatch_cpu_seconds_total", ("agent",),
     "CPU time of the agent's processes, live and exited"),
    (_G, "agentwatch_host_cpus", (), "CPUs of the host"),
    (_C, "agentwatch_kernel_events_lost_total", (),
     "events the kernel could not hand over (ring buffer full)"),
    (_C, "agentwatch_agent_records_lost_total", ("agent",),
     "records of this agent's processes the kernel could not hand over (ring buffer full)"),
    (_C, "agentwatch_connects_aggregated_total", ("agent",),
     "connect records the kernel aggregated instead of sending (per-process flood budget)"),
    (_C, "agentwatch_failed_closed_total", ("reason",),
     "agent processes failed closed by the kernel: a record that needed a decision was "
     "lost, or the process could not be tracked (process map full)"),
    (_C, "agentwatch_connects_refused_total", (), "connects refused by the cgroup hook"),
    (_C, "agentwatch_kernel_kills_total", (), "SIGKILLs sent by the probes"),
    (_G, "agentwatch_probes_attached", (), "tracepoints attached"),
    (_G, "agentwatch_probes_expected", (), "tracepoints the probes define"),
    (_G, "agentwatch_policy_info", ("sha256", "mode"), "the policy in force"),
    (_G, "agentwatch_policy_load_timestamp_seconds", (),
     "when the policy in force was loaded (Unix time)"),
    (_G, "agentwatch_policy_load_duration_seconds", (),
     "how long loading the policy in force took"),
    (_C, "agentwatch_policy_reloads_total", ("result",), "policy reloads, ok or refused"),
    (_G, "agentwatch_alerts_spooled", (), "alerts waiting on disk for a receiver"),
    (_C, "agentwatch_alert_deliveries_total", ("receiver", "result"),
     "attempts to deliver an alert"),
    (_C, "agentwatch_killswitch_total", ("agent",), "kill switch uses"),
    (_G, "agentwatch_sink_buffered", ("sink",),
     "records kept in memory because the disk refused them (alerts, audit lines)"),
    (_C, "agentwatch_sink_dropped_total", ("sink",),
     "records lost: memory bound reached while the disk refused them, or unwritten at stop"),
    (_C, "agentwatch_sink_write_errors_total", ("sink",),
     "failed writes of the alert spool and the audit log"),
    (_C, "agentwatch_argv_unconfirmed_total", ("agent", "reason"),
     "execs judged on the probes' cut copy of argv: /proc could not confirm the rest"),
)


Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


def _new_families() -> dict[str, Family]:
    """Empty families, in the order of the contract (docs/metrics.md)."""
    out: dict[str, Family] = {}
    for kind, name, labels, doc in _FAMILIES:
        unit = "seconds" if "_seconds" in name else ""
        if kind == _C:
            out[name] = CounterMetricFamily(name, doc, labels=labels, unit=unit)
        elif kind == _G:
            out[name] = GaugeMetricFamily(name, doc, labels=labels, unit=unit)
        else:
            out[name] = HistogramMetricFamily(name, doc, labels=labels, unit=unit)
    return out


class AgentwatchCollector(Collector):
    """Yields every agentwatch metric family, read from `source` when scraped."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return list(_new_families().values())

    def collect(self) -> Iterator[Metric]:
        src = self.source
        state = src.metrics
        f = _new_families()

        def add(name: str, labels: list[str], value: float) -> None:
            family = f[name]
            assert not isinstance(family, HistogramMetricFamily)
            family.add_metric(labels, value)

        add("agentwatch_build_info", [state.version, state.kernel], 1)
        add("agentwatch_host_cpus", [], state.host_cpus)

        live: dict[str, list[int]] = {}
        for name, u in src.agent_usage().items():
            row = live.setdefault(state.agent_label(name), [0, 0, 0])
            row[0] += u.processes
            row[1] += u.sessions
            row[2] += u.cpu_ns
        snap = state.snapshot()
        for c in snap.agents:
            a = c.label
            processes, sessions, cpu_ns = live.get(a) or (0, 0, 0)
            if a == OTHER and not (c.counted or processes or sessions):
                continue  # nothing overflowed: no "other" series
            for kind, n in zip(EVENT_KINDS, c.events, strict=True):
                add("agentwatch_events_total", [a, kind], n)
            for binary, n in c.execs.items():
                add("agentwatch_execs_total", [a, binary], n)
            if c.exec_other:
                add("agentwatch_execs_total", [a, OTHER], c.exec_other)
            for i, n in enumerate(c.connects):
                if n:
                    v, d = divmod(i, len(DESTINATIONS))
                    add("agentwatch_connections_total",
                        [a, CONNECT_VERDICTS[v], DESTINATIONS[d]], n)
            add("agentwatch_processes", [a], processes)
            add("agentwatch_sessions", [a], sessions)
            add("agentwatch_cpu_seconds_total", [a],
                state.cpu_total_ns(a, c.exited_cpu_ns + cpu_ns) / 1e9)
            add("agentwatch_killswitch_total", [a], c.killswitch)

        for key, n in _fold(state, src.verdict_counts().items()).items():
            add("agentwatch_policy_violations_total", list(key), n)
        for key, n in _fold(state, src.kill_counts().items()).items():
            add("agentwatch_kills_total", list(key), n)

        hist = f["agentwatch_kill_latency_seconds"]
        assert isinstance(hist, HistogramMetricFamily)
        for path, (counts, total) in snap.latency.items():
            cumulative, buckets = 0, []
            for le, n in zip(_BUCKET_LABELS, counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            hist.add_metric([path], buckets, total)

        counters = src.bpf_counters()  # the one read of the kernel's counters this scrape
        add("agentwatch_kernel_events_lost_total", [], counters.get(BpfCounter.LOST, 0))
        add("agentwatch_connects_refused_total", [], counters.get(BpfCounter.DENIED, 0))
        add("agentwatch_failed_closed_total", ["record_lost"],
            counters.get(BpfCounter.DECISION_LOST, 0))
        add("agentwatch_failed_closed_total", ["untrackable"],
            counters.get(BpfCounter.UNTRACKABLE, 0))
        lost_by: dict[str, list[int]] = {c.label: [0, 0] for c in snap.agents
                                         if c.label != OTHER}
        for name, (lost, shed) in src.agent_losses().items():
            row = lost_by.setdefault(state.agent_label(name), [0, 0])
            row[0] += lost
            row[1] += shed
        for a, (lost, shed) in sorted(lost_by.items()):
            add("agentwatch_agent_records_lost_total", [a], lost)
            add("agentwatch_connects_aggregated_total", [a], shed)
        add("agentwatch_kernel_kills_total", [], counters.get(BpfCounter.KILLS, 0))
        add("agentwatch_probes_attached", [], src.probes_attached())
        add("agentwatch_probes_expected", [], src.probes_expected())

        policy = src.policy_info()
        add("agentwatch_policy_info", [policy.sha256, policy.mode], 1)
        if snap.policy_loaded_at is not None:
            add("agentwatch_policy_load_timestamp_seconds", [], snap.policy_loaded_at)
        if snap.policy_load_seconds is not None:
            add("agentwatch_policy_load_duration_seconds", [], snap.policy_load_seconds)
        for result, n in snap.reloads.items():
            add("agentwatch_policy_reloads_total", [result], n)
        add("agentwatch_alerts_spooled", [], src.alerts_spooled())
        deliveries = dict(snap.deliveries)
        for (receiver, result), n in src.alert_deliveries().items():
            key = (_label(receiver), "ok" if result in _DELIVERED else "error")
            deliveries[key] = deliveries.get(key, 0) + n
        for (receiver, result), n in deliveries.items():
            add("agentwatch_alert_deliveries_total", [receiver, result], n)
        sinks = src.sink_stats()
        for sink in SINKS:
            st = sinks.get(sink) or SinkStats()
            add("agentwatch_sink_buffered", [sink], st.buffered)
            add("agentwatch_sink_dropped_total", [sink], st.dropped)
            add("agentwatch_sink_write_errors_total", [sink], st.write_errors)
        for (agent, reason), n in state.argv_unconfirmed().items():
            add("agentwatch_argv_unconfirmed_total", [agent, reason], n)
        yield from f.values()


def _fold(state: MetricsState, counts: Iterable[tuple[tuple[str, ...], int]]
          ) -> dict[tuple[str, ...], int]:
    """Counts keyed by agent name first, re-keyed by agent label (overflow summed)."""
    out: dict[tuple[str, ...], int] = {}
    for (agent, *rest), n in counts:
        key = (state.agent_label(agent), *(_label(r) for r in rest))
        out[key] = out.get(key, 0) + n
    return out


# --- serving --------------------------------------------------------------------------------

def parse_address(text: str, where: str = "metrics address") -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT -> (host, port). Port 0 picks a free port."""
    try:
        return split_host_port(text, port_zero=True)
    except ValueError as e:
        raise ConfigError([(Location(where), f"{e}: write HOST:PORT, e.g. 127.0.0.1:9464 "
                            "(this host only, the default), 0.0.0.0:9464 (every IPv4 "
                            "interface) or [::1]:9464 (IPv6)")]) from None


def serve(registry: CollectorRegistry, address: str = DEFAULT_ADDRESS, *,
          cache_seconds: float = DEFAULT_CACHE_SECONDS,
          max_per_second: float = DEFAULT_MAX_PER_SECOND, log: Log | None = None
          ) -> tuple[MetricsServer, threading.Thread]:
    """Serve /metrics for `registry` on address (HOST:PORT) from a daemon thread: rendered
    at most once per cache_seconds, at most max_per_second scrapes answered a second
    (monitor/observe/exporter.py).

    Returns (server, thread); stop with server.shutdown(); server.server_close().
    """
    host, port = parse_address(address)
    try:
        server = MetricsServer(Exposition(registry, cache_seconds), host, port,
                               max_per_second=max_per_second, log=log)
    except OSError as e:
        raise EnvironmentProblem(f"cannot serve metrics on {address}: {e.strerror or e}; "
                                 "free that port or configure another metrics address"
                                 ) from None
    thread = threading.Thread(target=server.serve_forever, name="agentwatch-metrics",
                              daemon=True)
    thread.start()
    return server, thread
