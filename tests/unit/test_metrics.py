"""Unit tests for monitor.observe.metrics: what a user scraping /metrics sees.

Each test uses a fresh CollectorRegistry and a fake source (tracker sessions built from the
real dataclasses, verdict and kill counts in its MetricsState, BPF counters as a dict),
reads the exposition back with prometheus_client's parser and checks names, types, labels
and values.
"""

from __future__ import annotations

import socket
import time
import unicodedata
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from monitor.model.errors import AgentwatchError, ConfigError, EnvironmentProblem
from monitor.model.events import Counter as BpfCounter
from monitor.model.events import EventType, Header, KAction, VerdictEvent, VerdictKind
from monitor.model.safetext import ELLIPSIS, LABEL_MAX
from monitor.observe.auditlog import SinkStats
from monitor.observe.collector import AgentwatchCollector, parse_address, serve
from monitor.observe.metrics import (
    DEFAULT_ADDRESS,
    KILL_LATENCY_BUCKETS,
    MAX_AGENTS,
    MAX_BINARIES,
    AgentUsage,
    MetricsState,
    PolicyInfo,
    connect_verdict,
    destination_class,
    kernel_connect_verdict,
    rule_verdict,
    usage_of,
)
from monitor.sessions.tracker import Process, Session

SHA = "5f" * 32
LOADED_AT = 1_700_000_000.0

# name -> (type, label names) exactly as the dashboard and alert rules use them
CONTRACT: dict[str, tuple[str, set[str]]] = {
    "agentwatch_build_info": ("gauge", {"version", "kernel"}),
    "agentwatch_events_total": ("counter", {"agent", "kind"}),
    "agentwatch_execs_total": ("counter", {"agent", "binary"}),
    "agentwatch_connections_total": ("counter", {"agent", "verdict", "destination", "kind"}),
    "agentwatch_policy_violations_total": ("counter", {"agent", "rule", "action", "mode"}),
    "agentwatch_kills_total": ("counter", {"agent", "rule"}),
    "agentwatch_kill_latency_seconds": ("histogram", {"path"}),
    "agentwatch_processes": ("gauge", {"agent"}),
    "agentwatch_sessions": ("gauge", {"agent"}),
    "agentwatch_cpu_seconds_total": ("counter", {"agent"}),
    "agentwatch_host_cpus": ("gauge", set()),
    "agentwatch_kernel_events_lost_total": ("counter", set()),
    "agentwatch_connects_refused_total": ("counter", set()),
    "agentwatch_agent_records_lost_total": ("counter", {"agent"}),
    "agentwatch_connects_aggregated_total": ("counter", {"agent"}),
    "agentwatch_failed_closed_total": ("counter", {"reason"}),
    "agentwatch_kernel_kills_total": ("counter", set()),
    "agentwatch_probes_attached": ("gauge", set()),
    "agentwatch_probes_expected": ("gauge", set()),
    "agentwatch_policy_info": ("gauge", {"sha256", "mode"}),
    "agentwatch_policy_load_timestamp_seconds": ("gauge", set()),
    "agentwatch_policy_load_duration_seconds": ("gauge", set()),
    "agentwatch_policy_reloads_total": ("counter", {"result"}),
    "agentwatch_alerts_spooled": ("gauge", set()),
    "agentwatch_alert_deliveries_total": ("counter", {"receiver", "result"}),
    "agentwatch_killswitch_total": ("counter", {"agent"}),
    "agentwatch_sink_buffered": ("gauge", {"sink"}),
    "agentwatch_sink_dropped_total": ("counter", {"sink"}),
    "agentwatch_sink_write_errors_total": ("counter", {"sink"}),
    "agentwatch_argv_unconfirmed_total": ("counter", {"agent", "reason"}),
}


class FakeSource:
    """Stands in for the Monitor: tracker sessions, judge counters, kernel counters."""

    def __init__(self, agents: tuple[str, ...] = ("claude-code", "codex")) -> None:
        self.metrics = MetricsState(agents, kernel="6.1.0-test", host_cpus=8,
                                    clock=lambda: LOADED_AT)
        self.sessions: list[Session] = []
        self.kernel: dict[BpfCounter, int] = {c: 0 for c in BpfCounter}
        self.kernel_reads = 0
        self.attached = 15
        self.expected = 15
        self.policy = PolicyInfo(SHA, "enforce")
        self.spooled = 0
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.losses: dict[str, tuple[int, int]] = {}
        self.sinks = {"alert_spool": SinkStats(), "audit_log": SinkStats()}

    def agent_usage(self) -> Mapping[str, AgentUsage]:
        return usage_of(self.sessions)

    def agent_losses(self) -> Mapping[str, tuple[int, int]]:
        return self.losses

    def bpf_counters(self) -> Mapping[BpfCounter, int]:
        self.kernel_reads += 1
        return dict(self.kernel)

    def probes_attached(self) -> int:
        return self.attached

    def probes_expected(self) -> int:
        return self.expected

    def policy_info(self) -> PolicyInfo:
        return self.policy

    def alerts_spooled(self) -> int:
        return self.spooled

    def alert_deliveries(self) -> Mapping[tuple[str, str], int]:
        return dict(self.deliveries)

    def sink_stats(self) -> Mapping[str, SinkStats]:
        return dict(self.sinks)

    def add_session(self, sid: int, agent: str, procs: int, cpu_ns: int = 0) -> Session:
        s = Session(sid, agent, root_pid=sid * 1000, started_ns=0)
        for i in range(procs):
            pid = sid * 1000 + i
            s.processes[pid] = Process(pid, pid - 1, sid, cpu_ns=cpu_ns)
        self.sessions.append(s)
        return s


def registry_for(source: FakeSource) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AgentwatchCollector(source))
    return registry


def scrape(registry: CollectorRegistry) -> dict[str, Metric]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def family(fams: dict[str, Metric], name: str) -> Metric:
    """A family by its exposed name (the parser drops a counter's _total)."""
    return fams[name[: -len("_total")] if name.endswith("_total") else name]


def values(fams: dict[str, Metric], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample values of `name` (a sample name as /metrics prints it), keyed by labels."""
    out = {}
    for f in fams.values():
        for s in f.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(fams: dict[str, Metric], name: str, **labels: str) -> float:
    return values(fams, name)[tuple(sorted(labels.items()))]


def label_values(fams: dict[str, Metric], label: str) -> set[str]:
    return {s.labels[label] for f in fams.values() for s in f.samples if label in s.labels}


def busy_source() -> FakeSource:
    src = FakeSource()
    m = src.metrics
    for kind in ("fork", "exec", "connect", "exit", "verdict"):
        m.observe_event(kind, "claude-code")
    m.observe_exec("claude-code", "/usr/bin/git")
    m.observe_connect("claude-code", "8.8.8.8", "allowed")
    m.observe_kill_latency("kernel", 0.0004)
    m.observe_kill_latency("userspace", 0.003)
    m.observe_policy_loaded(0.012)
    m.observe_reload(True, 0.02)
    m.observe_reload(False, 0.5)
    m.observe_killswitch("codex")
    m.observe_argv_unconfirmed("claude-code", "gone")
    m.observe_delivery("alertmanager", True)
    m.observe_delivery("webhook", False)
    src.add_session(1, "claude-code", procs=3, cpu_ns=500_000_000)
    for _ in range(2):
        src.metrics.count_verdict("claude-code", "no-ssh", "kill", "enforce")
    src.metrics.count_kill("claude-code", "no-ssh")
    src.kernel.update({BpfCounter.LOST: 4, BpfCounter.DENIED: 2, BpfCounter.KILLS: 1})
    return src


# --- the contract ---------------------------------------------------------------------------


def test_every_metric_of_the_contract_is_exposed_with_its_type_and_labels() -> None:
    fams = scrape(registry_for(busy_source()))
    seen = {}
    for name, (kind, labels) in CONTRACT.items():
        f = family(fams, name)
        assert f.type == kind, name
        assert f.documentation, name
        sample_labels = {k for s in f.samples for k in s.labels} - {"le"}
        assert f.samples, f"{name} has no sample"
        assert sample_labels == labels, name
        seen[f.name] = kind
    assert set(seen) == {f.name for f in fams.values()}, "a metric outside the contract"


def test_kernel_losses_per_agent_and_fail_closed_counts() -> None:
    src = busy_source()
    src.losses = {"claude-code": (3, 0), "codex": (0, 500), "pending": (2, 0)}
    src.kernel[BpfCounter.DECISION_LOST] = 3
    src.kernel[BpfCounter.UNTRACKABLE] = 7
    fams = scrape(registry_for(src))
    assert value(fams, "agentwatch_agent_records_lost_total", agent="claude-code") == 3
    assert value(fams, "agentwatch_connects_aggregated_total", agent="codex") == 500
    # candidates not yet named by a userspace matcher
    assert value(fams, "agentwatch_agent_records_lost_total", agent="pending") == 2
    assert value(fams, "agentwatch_failed_closed_total", reason="record_lost") == 3
    assert value(fams, "agentwatch_failed_closed_total", reason="untrackable") == 7


def test_values_are_what_the_monitor_counted() -> None:
    fams = scrape(registry_for(busy_source()))
    assert value(fams, "agentwatch_build_info", version="0.1.0", kernel="6.1.0-test") == 1
    assert value(fams, "agentwatch_events_total", agent="claude-code", kind="exec") == 1
    assert value(fams, "agentwatch_events_total", agent="codex", kind="fork") == 0
    assert value(fams, "agentwatch_execs_total", agent="claude-code", binary="git") == 1
    assert value(fams, "agentwatch_connections_total", agent="claude-code",
                 verdict="allowed", destination="public", kind="connect") == 1
    assert value(fams, "agentwatch_policy_violations_total", agent="claude-code",
                 rule="no-ssh", action="kill", mode="enforce") == 2
    assert value(fams, "agentwatch_kills_total", agent="claude-code", rule="no-ssh") == 1
    assert value(fams, "agentwatch_processes", agent="claude-code") == 3
    assert value(fams, "agentwatch_sessions", agent="claude-code") == 1
    assert value(fams, "agentwatch_processes", agent="codex") == 0
    assert value(fams, "agentwatch_cpu_seconds_total", agent="claude-code") == 1.5
    assert value(fams, "agentwatch_host_cpus") == 8
    assert value(fams, "agentwatch_kernel_events_lost_total") == 4
    assert value(fams, "agentwatch_connects_refused_total") == 2
    assert value(fams, "agentwatch_kernel_kills_total") == 1
    assert value(fams, "agentwatch_probes_attached") == 15
    assert value(fams, "agentwatch_probes_expected") == 15
    assert value(fams, "agentwatch_policy_info", sha256=SHA, mode="enforce") == 1
    assert value(fams, "agentwatch_policy_load_timestamp_seconds") == LOADED_AT
    assert value(fams, "agentwatch_policy_load_duration_seconds") == 0.02
    assert value(fams, "agentwatch_policy_reloads_total", result="ok") == 1
    assert value(fams, "agentwatch_policy_reloads_total", result="refused") == 1
    assert value(fams, "agentwatch_alerts_spooled") == 0
    assert value(fams, "agentwatch_alert_deliveries_total", receiver="alertmanager",
                 result="ok") == 1
    assert value(fams, "agentwatch_alert_deliveries_total", receiver="webhook",
                 result="error") == 1
    assert value(fams, "agentwatch_killswitch_total", agent="codex") == 1
    assert "other" not in label_values(fams, "agent"), "no overflow, no other series"


def test_event_kinds_accept_the_event_type_enum() -> None:
    src = FakeSource()
    src.metrics.observe_event(EventType.CONNECT, "codex")
    fams = scrape(registry_for(src))
    assert value(fams, "agentwatch_events_total", agent="codex", kind="connect") == 1


def test_kernel_counters_are_read_once_per_scrape() -> None:
    src = busy_source()
    registry = registry_for(src)
    assert src.kernel_reads == 0, "registering must not scrape"
    scrape(registry)
    assert src.kernel_reads == 1
    scrape(registry)
    assert src.kernel_reads == 2


def test_registering_twice_on_one_registry_is_refused() -> None:
    registry = registry_for(FakeSource())
    with pytest.raises(ValueError, match="agentwatch_events_total"):
        registry.register(AgentwatchCollector(FakeSource()))


def test_a_reload_that_is_refused_keeps_the_load_time_of_the_policy_in_force() -> None:
    now = [100.0]
    src = FakeSource()
    src.metrics = MetricsState(clock=lambda: now[0])
    registry = registry_for(src)
    fams = scrape(registry)
    assert not values(fams, "agentwatch_policy_load_timestamp_seconds"), "no load seen yet"
    src.metrics.observe_policy_loaded(0.01)
    now[0] = 200.0
    src.metrics.observe_reload(False, 3.0)
    fams = scrape(registry)
    assert value(fams, "agentwatch_policy_load_timestamp_seconds") == 100.0
    assert value(fams, "agentwatch_policy_load_duration_seconds") == 0.01
    now[0] = 300.0
    src.metrics.observe_reload(True, 0.05)
    src.policy = PolicyInfo("ab" * 32, "monitor")
    fams = scrape(registry)
    assert value(fams, "agentwatch_policy_load_timestamp_seconds") == 300.0
    assert value(fams, "agentwatch_policy_reloads_total", result="ok") == 1
    assert value(fams, "agentwatch_policy_reloads_total", result="refused") == 1
    assert values(fams, "agentwatch_policy_info") == {
        (("mode", "monitor"), ("sha256", "ab" * 32)): 1.0}, "only the policy in force"


def test_deliveries_counted_by_the_notifier_are_reported_as_ok_or_error() -> None:
    src = FakeSource()
    src.spooled = 3
    src.deliveries.update({("alertmanager", "success"): 5, ("alertmanager", "failure"): 2,
                           ("alertmanager", "rejected"): 1, ("webhook", "success"): 0})
    src.metrics.observe_delivery("webhook", True)
    fams = scrape(registry_for(src))
    assert values(fams, "agentwatch_alert_deliveries_total") == {
        (("receiver", "alertmanager"), ("result", "ok")): 5.0,
        (("receiver", "alertmanager"), ("result", "error")): 3.0,
        (("receiver", "webhook"), ("result", "ok")): 1.0,
        (("receiver", "webhook"), ("result", "error")): 0.0,
    }
    assert value(fams, "agentwatch_alerts_spooled") == 3


def test_unknown_receiver_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="receiver"):
        MetricsState().observe_delivery("pagerduty", True)


# --- counters only go up ------------------------------------------------------------------


def counter_samples(fams: dict[str, Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                      float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in fams.values() if f.type in ("counter", "histogram")
            for s in f.samples}


def test_counters_never_go_down_between_scrapes() -> None:
    src = busy_source()
    registry = registry_for(src)
    session = src.add_session(2, "codex", procs=2, cpu_ns=1_000_000_000)
    before = counter_samples(scrape(registry))
    m = src.metrics
    # a process exits: its CPU leaves the live sum and enters the exited sum
    pid, proc = next(iter(session.processes.items()))
    proc.cpu_ns += 250_000_000
    del session.processes[pid]
    m.observe_exit("codex", proc.cpu_ns)
    # the rest of the session vanishes without exit events (a pid reused elsewhere)
    src.sessions.remove(session)
    m.observe_event("exec", "claude-code")
    m.observe_exec("claude-code", "/bin/sh")
    m.observe_kill_latency("userspace", 0.2)
    src.metrics.count_verdict("codex", "no-curl", "alert", "monitor")
    src.kernel[BpfCounter.LOST] += 1
    after = counter_samples(scrape(registry))
    for key, old in before.items():
        assert after[key] >= old, key
    cpu = ("agentwatch_cpu_seconds_total", (("agent", "codex"),))
    assert after[cpu] == 2.0, "the exited process's CPU is kept, the vanished one's too"
    assert after[("agentwatch_events_total", (("agent", "claude-code"), ("kind", "exec")))] == 2


def test_kill_latency_histogram_is_cumulative_and_unbounded_by_any_window() -> None:
    src = FakeSource()
    registry = registry_for(src)
    m = src.metrics
    for _ in range(12_000):
        m.observe_kill_latency("kernel", 0.001)  # exactly on a bound: counted in le="0.001"
    fams = scrape(registry)
    m.observe_kill_latency("kernel", 0.0011)
    m.observe_kill_latency("kernel", 30.0)
    m.observe_kill_latency("userspace", -1.0)  # a clock step: counted as 0
    fams = scrape(registry)
    buckets = {dict(k)["le"]: v for k, v in values(fams, "agentwatch_kill_latency_seconds_bucket")
               .items() if dict(k)["path"] == "kernel"}
    assert list(buckets) == [*(str(b) for b in KILL_LATENCY_BUCKETS), "+Inf"]
    assert buckets["0.0005"] == 0
    assert buckets["0.001"] == 12_000
    assert buckets["0.0025"] == 12_001
    assert buckets["2.5"] == 12_001
    assert buckets["+Inf"] == 12_002
    assert value(fams, "agentwatch_kill_latency_seconds_count", path="kernel") == 12_002
    assert value(fams, "agentwatch_kill_latency_seconds_sum", path="kernel") == pytest.approx(
        12.0 + 0.0011 + 30.0)
    assert value(fams, "agentwatch_kill_latency_seconds_bucket", path="userspace",
                 le="0.0001") == 1


# --- bounded labels -------------------------------------------------------------------------


def many_addresses(n: int) -> Iterator[str]:
    for i in range(n):
        b = i.to_bytes(4, "big")
        yield {0: f"{b[1]}.{b[2]}.{b[3]}.{b[0] + 1}", 1: f"10.{b[2]}.{b[3]}.{b[1]}",
               2: f"2001:db8:{i:x}::1", 3: f"fe80::{i:x}", 4: f"::ffff:192.168.{b[2]}.{b[3]}",
               5: f"ff02::{i:x}", 6: f"not-an-address-{i}"}[i % 7]


def test_datagram_sends_are_counted_beside_connects_by_kind() -> None:
    src = FakeSource()
    m = src.metrics
    m.observe_connect("claude-code", "8.8.8.8", "allowed")
    m.observe_connect("claude-code", "8.8.8.8", "denied", send=True)
    m.observe_connect("claude-code", "::ffff:10.0.0.1", "killed", send=True)
    fams = scrape(registry_for(src))
    conns = {tuple(v for _, v in sorted(k)): n
             for k, n in values(fams, "agentwatch_connections_total").items()}
    # labels sorted by name: agent, destination, kind, verdict
    assert conns == {("claude-code", "public", "connect", "allowed"): 1,
                     ("claude-code", "public", "datagram", "denied"): 1,
                     ("claude-code", "private", "datagram", "killed"): 1}


def test_a_wild_agent_cannot_grow_the_label_sets() -> None:
    src = FakeSource()
    registry = registry_for(src)
    m = src.metrics
    addresses = list(many_addresses(10_000))
    for i, address in enumerate(addresses):
        m.observe_exec("claude-code", f"/tmp/x/bin-{i}")
        m.observe_connect("claude-code", address, ("allowed", "denied", "killed")[i % 3],
                          send=i % 2 == 1)
    fams = scrape(registry)
    execs = values(fams, "agentwatch_execs_total")
    binaries = {dict(k)["binary"] for k in execs if dict(k)["agent"] == "claude-code"}
    assert len(binaries) <= MAX_BINARIES + 1
    assert "other" in binaries
    assert sum(execs.values()) == 10_000, "overflow is counted, not dropped"
    conns = values(fams, "agentwatch_connections_total")
    destinations = {dict(k)["destination"] for k in conns}
    assert len(destinations) <= 6
    assert {dict(k)["kind"] for k in conns} == {"connect", "datagram"}
    assert sum(conns.values()) == 10_000
    every_value = {v for f in fams.values() for s in f.samples for v in s.labels.values()}
    assert not every_value & set(addresses), "an address became a label value"


def test_two_hundred_agents_yield_at_most_sixty_five_agent_labels() -> None:
    src = FakeSource(agents=())
    registry = registry_for(src)
    m = src.metrics
    names = [f"agent-{i:03d}" for i in range(200)]
    for i, name in enumerate(names):
        m.observe_event("fork", name)
        m.observe_exec(name, "/usr/bin/python3")
        m.observe_connect(name, "127.0.0.1", "allowed")
        m.observe_killswitch(name)
        src.add_session(i + 1, name, procs=1, cpu_ns=1_000_000)
        src.metrics.count_verdict(name, "r", "alert", "monitor")
        src.metrics.count_kill(name, "r")
    fams = scrape(registry)
    agents = label_values(fams, "agent")
    assert len(agents) <= MAX_AGENTS + 1
    assert "other" in agents
    assert set(names[:MAX_AGENTS]) <= agents, "the first names seen keep their label"
    # nothing is lost to the folding: every agent's counts are in some series
    assert sum(values(fams, "agentwatch_events_total").values()) == 200
    assert sum(values(fams, "agentwatch_processes").values()) == 200
    assert sum(values(fams, "agentwatch_policy_violations_total").values()) == 200
    assert value(fams, "agentwatch_kills_total", agent="other", rule="r") == 200 - MAX_AGENTS
    assert value(fams, "agentwatch_cpu_seconds_total", agent="other") == pytest.approx(
        (200 - MAX_AGENTS) * 0.001)


def test_configured_agents_get_their_labels_before_ad_hoc_names() -> None:
    src = FakeSource(agents=("claude-code",))
    m = src.metrics
    for i in range(100):
        m.observe_event("exec", f"adhoc-{i}")
    m.observe_event("exec", "claude-code")
    assert m.agent_label("claude-code") == "claude-code"
    assert m.agent_label("adhoc-0") == "adhoc-0"
    assert m.agent_label("adhoc-99") == "other"
    assert m.agent_label("") == "other"


def test_binary_label_is_the_basename_and_other_takes_the_rest() -> None:
    src = FakeSource()
    m = src.metrics
    for i in range(MAX_BINARIES):
        m.observe_exec("codex", f"/usr/bin/tool{i}")
    m.observe_exec("codex", "/usr/local/bin/tool0")  # same basename, same series
    m.observe_exec("codex", "/opt/late-comer")
    m.observe_exec("codex", "/opt/other")  # a program named "other" is no slot of its own
    fams = scrape(registry_for(src))
    assert value(fams, "agentwatch_execs_total", agent="codex", binary="tool0") == 2
    assert value(fams, "agentwatch_execs_total", agent="codex", binary="other") == 2
    assert not any(dict(k)["binary"] == "late-comer"
                   for k in values(fams, "agentwatch_execs_total"))


def test_names_that_are_not_utf8_do_not_break_the_scrape() -> None:
    src = FakeSource()
    m = src.metrics
    bad = b"/tmp/\xff\xfeevil".decode("utf-8", "surrogateescape")  # as the decoder gives it
    m.observe_exec("codex", bad)
    m.observe_exec("codex", bad)
    m.observe_event("exec", "bad-\udcff-agent")  # a registered name from JSON can be this
    fams = scrape(registry_for(src))
    # the bytes stay visible, as the trace shows them (monitor.model.safetext)
    assert value(fams, "agentwatch_execs_total", agent="codex", binary="\\xff\\xfeevil") == 2
    assert value(fams, "agentwatch_events_total", agent="bad-\\xff-agent", kind="exec") == 1


HOSTILE_BINARIES = ["\x1b[2J\x1b]0;owned\x07", "evil\nagentwatch_up 1", "a\rb", "\x9bx",
                    "\u202egpj.sh", 'quote"brace}', "\x00nul", "x" * 255]


def test_a_binary_name_with_controls_reaches_no_scrape_raw() -> None:
    """The binary label is the basename an agent chose: Prometheus escapes only \\, " and
    newline in label values; every other control would reach Grafana and alert texts."""
    src = FakeSource()
    for name in HOSTILE_BINARIES:
        src.metrics.observe_exec("codex", f"/tmp/{name}")
        src.metrics.observe_exec("codex", f"/tmp/{name}")
    text = generate_latest(registry_for(src)).decode()
    assert not any(unicodedata.category(c) == "Cc" and c != "\n" or
                   unicodedata.category(c) in ("Cf", "Cs") for c in text)
    assert not any(line.startswith("agentwatch_up") for line in text.splitlines())
    binaries = {dict(k)["binary"]: n for k, n in values(
        scrape(registry_for(src)), "agentwatch_execs_total").items()
        if dict(k)["agent"] == "codex"}
    assert binaries["\\x1b[2J\\x1b]0;owned\\x07"] == 2
    assert binaries["evil\\nagentwatch_up 1"] == 2
    assert binaries["\\u202egpj.sh"] == 2 and binaries["\\u009bx"] == 2
    assert binaries['quote"brace}'] == 2  # the exposition escapes these itself
    assert max(len(b) for b in binaries) <= LABEL_MAX
    assert binaries["x" * (LABEL_MAX - 1) + ELLIPSIS] == 2
    assert sum(binaries.values()) == 2 * len(HOSTILE_BINARIES), "nothing dropped"


def test_what_the_disk_refused_is_exported_per_sink() -> None:
    """Alerts kept in memory or dropped while the spool's disk is full, audit lines likewise
    (before: nothing said so)."""
    src = FakeSource()
    src.sinks = {"alert_spool": SinkStats(buffered=12, dropped=3, write_errors=40),
                 "audit_log": SinkStats(buffered=7, dropped=94, write_errors=47)}
    fams = scrape(registry_for(src))
    assert value(fams, "agentwatch_sink_buffered", sink="alert_spool") == 12
    assert value(fams, "agentwatch_sink_dropped_total", sink="alert_spool") == 3
    assert value(fams, "agentwatch_sink_write_errors_total", sink="alert_spool") == 40
    assert value(fams, "agentwatch_sink_buffered", sink="audit_log") == 7
    assert value(fams, "agentwatch_sink_dropped_total", sink="audit_log") == 94
    assert value(fams, "agentwatch_sink_write_errors_total", sink="audit_log") == 47


# --- destinations and verdicts --------------------------------------------------------------


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("192.168.1.1", "private"),
    ("172.16.0.1", "private"),
    ("100.64.0.1", "private"),
    ("fd00::1", "private"),
    ("169.254.169.254", "link_local"),
    ("fe80::1", "link_local"),
    ("8.8.8.8", "public"),
    ("2001:4860::8888", "public"),
    ("::ffff:8.8.8.8", "public"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "other"),
    ("::", "other"),
    ("192.0.2.1", "other"),
    ("", "other"),
    ("garbage", "other"),
])
def test_destination_class(address: str, expected: str) -> None:
    assert destination_class(address) == expected


def test_connect_verdict_says_what_the_policy_did_first() -> None:
    assert connect_verdict() == "allowed"
    assert connect_verdict("alerted") == "alerted"
    assert connect_verdict("denied", "alerted") == "denied"
    assert connect_verdict("alerted", "killed", "denied") == "killed"


@pytest.mark.parametrize("action, enforced, expected", [
    ("alert", True, "alerted"),
    ("deny", True, "denied"),
    ("kill", True, "killed"),
    ("kill-agent", True, "killed"),
    ("kill", False, "alerted"),   # monitor mode: nothing was killed
    ("deny", False, "alerted"),   # deny beyond the kernel's rule limit is not carried out
])
def test_rule_verdict(action: str, enforced: bool, expected: str) -> None:
    assert rule_verdict(action, enforced) == expected


@pytest.mark.parametrize("action, enforced, expected", [
    (KAction.KILL, True, "killed"),
    (KAction.KILL_AGENT, True, "killed"),
    (KAction.DENY, True, "denied"),
    (KAction.KILL, False, "alerted"),
    (None, False, "alerted"),
])
def test_kernel_connect_verdict(action: KAction | None, enforced: bool, expected: str) -> None:
    ev = VerdictEvent(Header(1, 2, 2, 3, 0, 1000, "curl"), VerdictKind.CONNECT, 0, 1, action,
                      enforced, 2, "1.2.3.4", 443)
    assert kernel_connect_verdict(ev) == expected


# --- serving --------------------------------------------------------------------------------


def test_serves_metrics_over_http_on_loopback() -> None:
    registry = registry_for(busy_source())
    server, thread = serve(registry, "127.0.0.1:0")
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            body = r.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert value(fams, "agentwatch_probes_attached") == 15
        assert thread.daemon
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_default_address_is_loopback() -> None:
    assert parse_address(DEFAULT_ADDRESS) == ("127.0.0.1", 9464)


@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("localhost:9100", ("localhost", 9100)),
    ("[::1]:9464", ("::1", 9464)),
    ("[::]:0", ("::", 0)),
    ("metrics.internal.example:80", ("metrics.internal.example", 80)),
])
def test_any_address_the_operator_configures_is_accepted(text: str,
                                                         expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", [
    "", "9464", ":9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:http",
    "::1:9464", "[::1]", "[::1]9464", "[127.0.0.1]:9464", "300.1.1.1:9464", "bad host:1",
    "127.0.0.1:-1", "127.0.0.1:٩٤٦٤",
])
def test_an_unparseable_address_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        serve(CollectorRegistry(), text)
    assert isinstance(e.value, AgentwatchError)
    assert "HOST:PORT" in str(e.value) and "127.0.0.1:9464" in str(e.value)


def test_a_port_in_use_is_an_environment_problem() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EnvironmentProblem, match=f"127.0.0.1:{port}"):
            serve(CollectorRegistry(), f"127.0.0.1:{port}")


# --- cost -----------------------------------------------------------------------------------


def test_scrape_time_with_fifty_agents_of_a_hundred_processes(
        capsys: pytest.CaptureFixture[str]) -> None:
    names = tuple(f"agent-{i}" for i in range(50))
    src = FakeSource(agents=names)
    m = src.metrics
    for i, name in enumerate(names):
        src.add_session(i + 1, name, procs=100, cpu_ns=1_000_000)
        for j in range(MAX_BINARIES + 5):
            m.observe_exec(name, f"/usr/bin/b{j}")
            m.observe_event("exec", name)
        for address in ("127.0.0.1", "10.0.0.1", "8.8.8.8", "fe80::1"):
            m.observe_connect(name, address, "allowed")
        src.metrics.count_verdict(name, "no-ssh", "kill", "enforce")
    registry = registry_for(src)
    scrape(registry)
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        text = generate_latest(registry)
    per_scrape = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for i in range(100_000):
        m.observe_event("fork", names[i % 50])
    per_event = (time.perf_counter() - start) / 100_000
    with capsys.disabled():
        print(f"\nscrape of 50 agents x 100 processes: {per_scrape * 1e3:.2f} ms, "
              f"{len(text)} bytes; observe_event: {per_event * 1e9:.0f} ns")
    assert value(scrape(registry), "agentwatch_processes", agent="agent-7") == 100
