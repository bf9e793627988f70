"""The Prometheus side of the metrics: every agentwatch metric family, read when scraped,
and the /metrics server.

Built like client_python's own collectors: an AgentwatchCollector registered on a registry
the caller passes in (never the global one) yields, at each scrape, the counters kept in
MetricsState (monitor/observe/metrics.py, which owns every counter), the tracker's live
processes and the BPF counters read through a MetricsSource. The families are listed once,
in the order of the contract (docs/metrics.md). This module keeps no counts of its own,
never decides policy and never signals anything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from monitor.model.address import split_host_port
from monitor.model.errors import ConfigError, EnvironmentProblem, Location
from monitor.model.events import Counter as BpfCounter
from monitor.model.safetext import label_value
from monitor.observe.auditlog import SinkStats
from monitor.observe.exporter import (
    DEFAULT_CACHE_SECONDS,
    DEFAULT_MAX_PER_SECOND,
    Exposition,
    Log,
    MetricsServer,
)
from monitor.observe.metrics import (
    BUCKET_LABELS,
    CONNECT_KINDS,
    CONNECT_VERDICTS,
    DEFAULT_ADDRESS,
    DELIVERED,
    DESTINATIONS,
    EVENT_KINDS,
    MAX_BINARIES,
    OTHER,
    SINKS,
    AgentUsage,
    MetricsState,
    PolicyInfo,
)


class MetricsSource(Protocol):
    """What the collector reads at scrape time (monitor/service/status.py Report provides it).
    Each method is called once per scrape, from the HTTP server's thread."""

    @property
    def metrics(self) -> MetricsState: ...

    def agent_usage(self) -> Mapping[str, AgentUsage]: ...

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
    (_C, "agentwatch_connections_total", ("agent", "verdict", "destination", "kind"),
     "IPv4/IPv6 connects (kind connect) and UDP datagrams sent with an address (kind "
     "datagram) by policy verdict and destination class"),
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
                    kv, d = divmod(i, len(DESTINATIONS))
                    k, v = divmod(kv, len(CONNECT_VERDICTS))
                    add("agentwatch_connections_total",
                        [a, CONNECT_VERDICTS[v], DESTINATIONS[d], CONNECT_KINDS[k]], n)
            add("agentwatch_processes", [a], processes)
            add("agentwatch_sessions", [a], sessions)
            add("agentwatch_cpu_seconds_total", [a],
                state.cpu_total_ns(a, c.exited_cpu_ns + cpu_ns) / 1e9)
            add("agentwatch_killswitch_total", [a], c.killswitch)

        for key, n in _fold(state, state.verdict_counts().items()).items():
            add("agentwatch_policy_violations_total", list(key), n)
        for key, n in _fold(state, state.kill_counts().items()).items():
            add("agentwatch_kills_total", list(key), n)

        hist = f["agentwatch_kill_latency_seconds"]
        assert isinstance(hist, HistogramMetricFamily)
        for path, (counts, total) in snap.latency.items():
            cumulative, buckets = 0, []
            for le, n in zip(BUCKET_LABELS, counts, strict=True):
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
            key = (label_value(receiver), "ok" if result in DELIVERED else "error")
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
        key = (state.agent_label(agent), *(label_value(r) for r in rest))
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
