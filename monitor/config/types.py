"""The monitor's configuration as typed values: what a loaded config file means.

Frozen dataclasses only: the agents (monitor/model/agents.py's AgentSpec), the ``monitor``
section (sizes, intervals, paths), the ``alerts`` section (where kill alerts are pushed:
Alertmanager, a webhook, the on-disk spool) and the ``metrics`` section (the Prometheus
listen address), each with its default. monitor/config/validate.py builds them from a file,
monitor/config/load.py reads the file.

This module must never read a file, validate text, touch the kernel or /proc, or do work
on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from monitor.model.address import split_host_port
from monitor.model.agents import AgentSpec, ProcessFacts, recognise

UserLookup = Callable[[str], int]
"""Resolves a user name to a uid; raises KeyError (or another LookupError) if unknown."""


@dataclass(frozen=True)
class MonitorSettings:
    """Settings of the monitor itself."""

    control_socket: str = "/run/agentwatch/control.sock"
    ring_buffer_mib: int = 8  # power of two, 1..256
    max_processes: int = 65536  # entries in the in-kernel process map, 1024..4194304
    tick_seconds: float = 1.0  # 0.05..60
    history: int = 32  # exec/connect records kept per process, 1..10000
    audit_log: str = ""  # JSON lines of every verdict and kill (rotated); "" = off
    pin_dir: str = ""  # under /sys/fs/bpf: probes and tree state outlive the monitor
    fail_closed_seconds: float = 0.0  # with pin_dir: kill agents after this long unwatched


@dataclass(frozen=True)
class AlertSettings:
    """Where kill alerts go (monitor/observe/alerts.py). No URL set: no alert is pushed."""

    alertmanager_url: str | None = None  # base URL; alerts go to {url}/api/v2/alerts
    webhook_url: str | None = None  # alerts are POSTed to this URL as is
    spool_dir: str = "/var/lib/agentwatch/spool"  # undelivered alerts, kept across restarts
    timeout_seconds: float = 2.0  # per HTTP request, 0.1..60
    resolve_after_seconds: float = 300.0  # endsAt = startsAt + this, 10..604800
    instance: str = ""  # the instance label; "" = the host name
    runbook_url: str = ""  # the runbook_url annotation; "" = none

    @property
    def receivers(self) -> dict[str, str]:
        """The configured receivers by name ("alertmanager", "webhook") and URL."""
        found = {"alertmanager": self.alertmanager_url, "webhook": self.webhook_url}
        return {name: url for name, url in found.items() if url}


@dataclass(frozen=True)
class MetricsSettings:
    """Where the Prometheus exporter listens."""

    listen: str = "127.0.0.1:9464"  # host:port, IPv6 as [::1]:9464
    cache_seconds: float = 1.0  # a rendering is reused this long, 0..60
    max_scrapes_per_second: float = 10.0  # more wait their turn, 0.1..1000

    @property
    def host(self) -> str:
        """The host part, without the brackets of an IPv6 address."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True)
class Config:
    agents: tuple[AgentSpec, ...]
    monitor: MonitorSettings
    source: str
    alerts: AlertSettings = field(default_factory=AlertSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def recognise(self, p: ProcessFacts) -> AgentSpec | None:
        """The first agent, in file order, that p matches; None if it matches none."""
        return recognise(self.agents, p)


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) of a "host:port" listen address; port 1..65535 (model.address)."""
    return split_host_port(listen)
