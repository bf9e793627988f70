"""Validate a config tree and build the typed Config from it, collecting every problem.

Input: the YAML node tree with lines (monitor/config/yamlsource.py). Output: a
monitor/config/types.py Config, and in ``problems`` every problem with its file, line and
key path, in file order (``agents`` through monitor/config/validate_agents.py, then
``monitor``, ``alerts``, ``metrics``): unknown keys, values out of range, paths that are
not absolute, URLs that would not be used as written. A section with a problem falls back
to its default; monitor/config/load.py raises the problems together.

This module must never read a file, touch the kernel or /proc, or do work on import.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from monitor.config.regex import Compiler
from monitor.config.types import (
    AlertSettings,
    Config,
    MetricsSettings,
    MonitorSettings,
    UserLookup,
    split_listen,
)
from monitor.config.validate_agents import AgentReader
from monitor.config.yamlsource import (
    Node,
    Problems,
    check_mapping,
    child_path,
    expect_int,
    expect_number,
    expect_str,
    type_name,
)

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL
_TOP_KEYS = ("agents", "monitor", "alerts", "metrics")
_MONITOR_KEYS = ("control_socket", "ring_buffer_mib", "max_processes", "tick_seconds", "history",
                 "audit_log", "pin_dir", "fail_closed_seconds")
_ALERTS_KEYS = ("alertmanager_url", "webhook_url", "spool_dir", "timeout_seconds",
                "resolve_after_seconds", "instance", "runbook_url")
_METRICS_KEYS = ("listen", "cache_seconds", "max_scrapes_per_second")


def url_problem(url: str) -> str | None:
    """Why url is not a usable http(s) URL with a host, or None if it is fine."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"{url!r} must start with http:// or https://"
    if not parts.hostname:
        return f"{url!r} has no host"
    if parts.username is not None or parts.password is not None:
        return (f"{url!r} carries credentials, which are not sent (put the receiver "
                "behind a proxy that adds them, or use a URL without user:password@)")
    if port == 0:
        return f"{url!r} has port 0"
    if parts.fragment or url.endswith("#"):
        return f"{url!r} has a fragment (#...), which is never sent"
    if any(c.isspace() for c in url):
        return f"{url!r} contains white space"
    return None

class ConfigReader:
    """Validates a parsed config tree, collecting every problem."""

    def __init__(self, source: str, user_lookup: UserLookup) -> None:
        self.problems = Problems(source)
        self.agent_reader = AgentReader(self.problems, user_lookup, Compiler())

    def config(self, root: Node, source: str) -> Config:
        if root.value is None:  # empty file, or only comments
            return Config((), MonitorSettings(), source)
        if not isinstance(root.value, dict):
            self.problems.add(root.line, "", "the top level must be a mapping (keys: "
                              f"{', '.join(_TOP_KEYS)}), got {type_name(root.value)}")
            return Config((), MonitorSettings(), source)
        top = check_mapping(root, "", self.problems, allowed=_TOP_KEYS) or {}
        agents = self.agent_reader.agents(top["agents"]) if "agents" in top else ()
        monitor = self.monitor(top["monitor"]) if "monitor" in top else MonitorSettings()
        alerts = self.alerts(top["alerts"]) if "alerts" in top else AlertSettings()
        metrics = self.metrics(top["metrics"]) if "metrics" in top else MetricsSettings()
        return Config(agents, monitor, source, alerts=alerts, metrics=metrics)

    def section(self, node: Node, name: str, allowed: tuple[str, ...]
                ) -> dict[str, Node] | None:
        """The keys of a settings section, or None for its defaults: none written ("name:"
        with every setting commented out) or not a mapping (a problem, collected)."""
        if node.value is None:
            return None
        return check_mapping(node, name, self.problems, allowed=allowed)

    def monitor(self, node: Node) -> MonitorSettings:
        default = MonitorSettings()
        fields = self.section(node, "monitor", _MONITOR_KEYS)
        if fields is None:
            return default
        p = self.problems

        def path(key: str) -> str:
            return child_path("monitor", key)

        socket = default.control_socket
        if "control_socket" in fields:
            n = fields["control_socket"]
            value = expect_str(n, path("control_socket"), p)
            if value is not None and not value.startswith("/"):
                p.add(n.line, path("control_socket"), f"{value!r} must be an absolute path")
            elif value is not None and len(value.encode()) > SUN_PATH_MAX:
                p.add(n.line, path("control_socket"), f"longer than {SUN_PATH_MAX} bytes, "
                      "which a unix socket path cannot be")
            elif value is not None:
                socket = value
        ring = default.ring_buffer_mib
        if "ring_buffer_mib" in fields:
            n = fields["ring_buffer_mib"]
            mib = expect_int(n, path("ring_buffer_mib"), p, minimum=1, maximum=256)
            if mib is not None and mib & (mib - 1):
                p.add(n.line, path("ring_buffer_mib"), f"{mib} is not a power of two "
                      "(the kernel requires a ring buffer size that is one)")
            elif mib is not None:
                ring = mib
        max_processes, history = default.max_processes, default.history
        if "max_processes" in fields:
            got = expect_int(fields["max_processes"], path("max_processes"), p,
                             minimum=1024, maximum=4194304)
            max_processes = max_processes if got is None else got
        if "history" in fields:
            got = expect_int(fields["history"], path("history"), p, minimum=1, maximum=10000)
            history = history if got is None else got
        audit = self.optional_path(fields, "audit_log", default.audit_log, "/",
                                   "must be an absolute path (or empty to turn the audit "
                                   "log off)")
        pin_dir = self.optional_path(fields, "pin_dir", default.pin_dir, "/sys/fs/bpf/",
                                     "must be a directory under /sys/fs/bpf/ (bpffs), e.g. "
                                     "/sys/fs/bpf/agentwatch, or empty")
        fail_closed = default.fail_closed_seconds
        if "fail_closed_seconds" in fields:
            got_s = expect_number(fields["fail_closed_seconds"], path("fail_closed_seconds"),
                                  p, minimum=0, maximum=86400)
            fail_closed = fail_closed if got_s is None else got_s
        tick = default.tick_seconds
        if "tick_seconds" in fields:
            seconds = expect_number(fields["tick_seconds"], path("tick_seconds"), p,
                                    minimum=0.05, maximum=60)
            tick = tick if seconds is None else seconds
        return MonitorSettings(control_socket=socket, ring_buffer_mib=ring,
                               max_processes=max_processes, tick_seconds=tick, history=history,
                               audit_log=audit, pin_dir=pin_dir,
                               fail_closed_seconds=fail_closed)

    def optional_path(self, fields: dict[str, Node], key: str, default: str, prefix: str,
                      reason: str) -> str:
        """A monitor path setting that may be empty (off) or must start with prefix."""
        if key not in fields:
            return default
        n, where = fields[key], child_path("monitor", key)
        value = expect_str(n, where, self.problems, allow_empty=True)
        if value and not value.startswith(prefix):
            self.problems.add(n.line, where, f"{value!r} {reason}")
            return default
        return default if value is None else value

    def alerts(self, node: Node) -> AlertSettings:
        default = AlertSettings()
        fields = self.section(node, "alerts", _ALERTS_KEYS)
        if fields is None:
            return default
        p = self.problems

        def path(key: str) -> str:
            return child_path("alerts", key)

        urls: dict[str, str | None] = {}
        for key in ("alertmanager_url", "webhook_url", "runbook_url"):
            if key not in fields or fields[key].value is None:  # "key:" alone = not set
                urls[key] = None
                continue
            n = fields[key]
            url = expect_str(n, path(key), p)
            reason = url_problem(url) if url is not None else None
            if reason is not None:
                p.add(n.line, path(key), reason)
                url = None
            elif url is not None and key == "alertmanager_url":
                url = url.rstrip("/")
                if urlsplit(url).query:
                    p.add(n.line, path(key), f"{url!r} has a query (?...): give the "
                          "Alertmanager base URL, for example http://127.0.0.1:9093")
                    url = None
                elif url.endswith("/api/v2/alerts") or url.endswith("/api/v1/alerts"):
                    p.add(n.line, path(key), f"give the Alertmanager base URL without "
                          f"the API path (alerts go to {{url}}/api/v2/alerts), for example "
                          f"{url.rsplit('/api/', 1)[0]!r}")
                    url = None
            urls[key] = url
        spool = default.spool_dir
        if "spool_dir" in fields:
            n = fields["spool_dir"]
            value = expect_str(n, path("spool_dir"), p)
            if value is not None and not value.startswith("/"):
                p.add(n.line, path("spool_dir"), f"{value!r} must be an absolute path")
            elif value is not None:
                spool = value
        timeout, resolve = default.timeout_seconds, default.resolve_after_seconds
        if "timeout_seconds" in fields:
            got = expect_number(fields["timeout_seconds"], path("timeout_seconds"), p,
                                minimum=0.1, maximum=60)
            timeout = timeout if got is None else got
        if "resolve_after_seconds" in fields:
            got = expect_number(fields["resolve_after_seconds"], path("resolve_after_seconds"),
                                p, minimum=10, maximum=604800)
            resolve = resolve if got is None else got
        instance = default.instance
        if "instance" in fields:
            n = fields["instance"]
            value = expect_str(n, path("instance"), p, allow_empty=True)
            if value is not None and (value != value.strip() or len(value) > 253):
                p.add(n.line, path("instance"), f"{value!r}: at most 253 characters, "
                      "without leading or trailing white space")
            elif value is not None:
                instance = value
        return AlertSettings(alertmanager_url=urls["alertmanager_url"],
                             webhook_url=urls["webhook_url"], spool_dir=spool,
                             timeout_seconds=timeout, resolve_after_seconds=resolve,
                             instance=instance, runbook_url=urls["runbook_url"] or "")

    def metrics(self, node: Node) -> MetricsSettings:
        default = MetricsSettings()
        fields = self.section(node, "metrics", _METRICS_KEYS)
        if fields is None:
            return default
        listen = default.listen
        if "listen" in fields:
            n = fields["listen"]
            got = expect_str(n, "metrics.listen", self.problems)
            try:
                if got is not None:
                    split_listen(got)
                    listen = got
            except ValueError as exc:
                self.problems.add(n.line, "metrics.listen", str(exc))
        numbers = {"cache_seconds": (0.0, 60.0), "max_scrapes_per_second": (0.1, 1000.0)}
        found: dict[str, float] = {}
        for key, (low, high) in numbers.items():
            if key in fields:
                value = expect_number(fields[key], f"metrics.{key}", self.problems,
                                      minimum=low, maximum=high)
                if value is not None:
                    found[key] = value
        return MetricsSettings(listen=listen, **found)
