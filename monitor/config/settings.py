"""The monitor's configuration: how AI agents are recognised, plus monitor settings.

A config file lists agents, each with match entries (OR-ed; the keys inside one entry are
AND-ed) over a process's comm, executable path, command line, uid and cgroup, a
``monitor`` section with sizes and intervals, an ``alerts`` section (where kill alerts are
pushed: Alertmanager, a webhook, the on-disk spool) and a ``metrics`` section (the
Prometheus listen address). Loading validates everything, collects every problem with its
file, line and key path, and raises them together as one ConfigError.

This module must never touch the kernel, BPF or /proc (it decides from ProcessFacts it is
given), never accept a config that silently means something other than what it says, and
never do work on import.
"""

from __future__ import annotations

import importlib.resources
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlsplit

from monitor.config.regex import Compiler, PatternError, Regex
from monitor.config.safefile import read_file
from monitor.config.yamlsource import (
    Node,
    Problems,
    check_mapping,
    child_path,
    expect_int,
    expect_list,
    expect_number,
    expect_str,
    parse_yaml,
    type_name,
)
from monitor.model.address import split_host_port
from monitor.model.cmdline import COMM_MAX
from monitor.model.errors import ConfigError, Location

UserLookup = Callable[[str], int]
"""Resolves a user name to a uid; raises KeyError (or another LookupError) if unknown."""

UID_MAX = 4294967294  # (uid_t)-1 is reserved
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_TOP_KEYS = ("agents", "monitor", "alerts", "metrics")
_AGENT_KEYS = ("name", "match")
_MATCH_KEYS = ("comm", "exe", "cmdline", "user", "uid", "cgroup")
_MONITOR_KEYS = ("control_socket", "ring_buffer_mib", "max_processes", "tick_seconds", "history",
                 "audit_log", "pin_dir", "fail_closed_seconds")
_ALERTS_KEYS = ("alertmanager_url", "webhook_url", "spool_dir", "timeout_seconds",
                "resolve_after_seconds", "instance", "runbook_url")
_METRICS_KEYS = ("listen", "cache_seconds", "max_scrapes_per_second")


@dataclass(frozen=True)
class ProcessFacts:
    """What a matcher looks at: one process as seen at exec time."""

    pid: int
    comm: str
    exe: str  # real path of the executable
    argv: tuple[str, ...]
    uid: int
    cgroup: str  # cgroup v2 path, as on the "0::" line of /proc/PID/cgroup
    line: str | None = None  # the whole command line when argv is only a clip of it

    @property
    def command_line(self) -> str:
        """The whole command line, arguments joined by single spaces."""
        return self.line if self.line is not None else " ".join(self.argv)


@dataclass(frozen=True)
class Matcher:
    """One match entry: every field that is set must match (an empty Matcher never does)."""

    comm: str | None = None
    exe: str | None = None  # fnmatchcase glob on the executable's real path
    cmdline: Regex | None = None  # RE2 search on argv joined by single spaces
    uid: int | None = None
    cgroup: str | None = None  # fnmatchcase glob on the cgroup v2 path
    line: int = 0

    @property
    def in_kernel(self) -> bool:
        """True when only comm and/or uid are used: the kernel decides those at exec."""
        uses_kernel = self.comm is not None or self.uid is not None
        uses_user = self.exe is not None or self.cmdline is not None or self.cgroup is not None
        return uses_kernel and not uses_user

    def matches(self, p: ProcessFacts) -> bool:
        if (self.comm, self.exe, self.cmdline, self.uid, self.cgroup) == (None,) * 5:
            return False
        if self.comm is not None and p.comm != self.comm:
            return False
        if self.uid is not None and p.uid != self.uid:
            return False
        if self.exe is not None and not fnmatchcase(p.exe, self.exe):
            return False
        if self.cgroup is not None and not fnmatchcase(p.cgroup, self.cgroup):
            return False
        return self.cmdline is None or self.cmdline.search(p.command_line) is not None


@dataclass(frozen=True)
class AgentSpec:
    """A named kind of agent; a process is one if any of its matchers matches."""

    name: str
    matchers: tuple[Matcher, ...]

    def matches(self, p: ProcessFacts) -> bool:
        return any(m.matches(p) for m in self.matchers)


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
        for agent in self.agents:
            if agent.matches(p):
                return agent
        return None


def glob_problem(pattern: str) -> str | None:
    """Why an fnmatch glob would not mean what it says, or None if it is fine.

    fnmatch treats a '[' without a closing ']' as a literal '[', silently; this scans the
    pattern exactly as fnmatch.translate does and reports that case instead.
    """
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:
            return (f"unterminated character class '[' at position {i} "
                    "(fnmatch would match it literally; write [[] for a literal '[')")
        i = j + 1
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) of a "host:port" listen address; port 1..65535 (model.address)."""
    return split_host_port(listen)


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


def parse_agents(node: Node, problems: Problems, *, user_lookup: UserLookup | None = None,
                 patterns: Compiler | None = None) -> tuple[AgentSpec, ...]:
    """Validate an ``agents:`` list node (the config's syntax, key path ``agents``).

    Used by the policy loader, whose ``agents:`` section is the same (and whose pattern
    budget, ``patterns``, it shares). Problems are added to ``problems``; agents with
    problems are left out of the result.
    """
    loader = _Loader(problems.source, user_lookup or _pwd_lookup)
    loader.problems = problems
    if patterns is not None:
        loader.patterns = patterns
    return loader.agents(node)


def _pwd_lookup(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


class _Loader:
    """Validates a parsed config tree, collecting every problem."""

    def __init__(self, source: str, user_lookup: UserLookup) -> None:
        self.problems = Problems(source)
        self.user_lookup = user_lookup
        self.patterns = Compiler()

    def config(self, root: Node, source: str) -> Config:
        if root.value is None:  # empty file, or only comments
            return Config((), MonitorSettings(), source)
        if not isinstance(root.value, dict):
            self.problems.add(root.line, "", "the top level must be a mapping (keys: "
                              f"{', '.join(_TOP_KEYS)}), got {type_name(root.value)}")
            return Config((), MonitorSettings(), source)
        top = check_mapping(root, "", self.problems, allowed=_TOP_KEYS) or {}
        agents = self.agents(top["agents"]) if "agents" in top else ()
        monitor = self.monitor(top["monitor"]) if "monitor" in top else MonitorSettings()
        alerts = self.alerts(top["alerts"]) if "alerts" in top else AlertSettings()
        metrics = self.metrics(top["metrics"]) if "metrics" in top else MetricsSettings()
        return Config(agents, monitor, source, alerts=alerts, metrics=metrics)

    def agents(self, node: Node) -> tuple[AgentSpec, ...]:
        if node.value is None:  # "agents:" with every entry commented out
            return ()
        items = expect_list(node, "agents", self.problems) or []
        result: list[AgentSpec] = []
        first_line: dict[str, int] = {}
        for i, item in enumerate(items):
            path = child_path("agents", i)
            before = len(self.problems)
            fields = check_mapping(item, path, self.problems, allowed=_AGENT_KEYS,
                                   required=_AGENT_KEYS)
            if fields is None:
                continue
            name = self.agent_name(fields["name"], path) if "name" in fields else None
            if name is not None:
                if name in first_line:
                    self.problems.add(fields["name"].line, child_path(path, "name"),
                                      f"duplicate agent name {name!r} "
                                      f"(first defined on line {first_line[name]})")
                else:
                    first_line[name] = fields["name"].line
            matchers = self.match_list(fields["match"], path) if "match" in fields else ()
            if name is not None and len(self.problems) == before:
                result.append(AgentSpec(name, matchers))
        return tuple(result)

    def agent_name(self, node: Node, agent_path: str) -> str | None:
        path = child_path(agent_path, "name")
        name = expect_str(node, path, self.problems)
        if name is not None and not _NAME_RE.fullmatch(name):
            self.problems.add(node.line, path, f"invalid agent name {name!r}: use 1-63 "
                              "characters a-z 0-9 _ . - starting with a letter or digit")
            return None
        return name

    def match_list(self, node: Node, agent_path: str) -> tuple[Matcher, ...]:
        path = child_path(agent_path, "match")
        items = expect_list(node, path, self.problems)
        if items is None:
            return ()
        if not items:
            self.problems.add(node.line, path, "the match list must not be empty "
                              "(an agent that matches nothing is never recognised)")
        result = (self.matcher(item, child_path(path, i)) for i, item in enumerate(items))
        return tuple(m for m in result if m is not None)

    def matcher(self, node: Node, path: str) -> Matcher | None:
        fields = check_mapping(node, path, self.problems, allowed=_MATCH_KEYS)
        if fields is None:
            return None
        if not fields:
            self.problems.add(node.line, path, "empty match entry; give at least one of "
                              f"{', '.join(_MATCH_KEYS)}")
            return None
        before = len(self.problems)
        comm = self.comm(fields["comm"], path) if "comm" in fields else None
        exe = self.glob(fields["exe"], child_path(path, "exe")) if "exe" in fields else None
        cgroup = self.glob(fields["cgroup"], child_path(path, "cgroup")) \
            if "cgroup" in fields else None
        cmdline = self.regex(fields["cmdline"], path) if "cmdline" in fields else None
        uid: int | None = None
        if "uid" in fields:
            uid = expect_int(fields["uid"], child_path(path, "uid"), self.problems,
                             minimum=0, maximum=UID_MAX)
        if "user" in fields:
            if "uid" in fields:
                self.problems.add(node.key_lines["uid"], child_path(path, "uid"),
                                  "'user' and 'uid' cannot both be set in one match entry "
                                  f"('user' is on line {node.key_lines['user']})")
            else:
                uid = self.user(fields["user"], child_path(path, "user"))
        if len(self.problems) != before:
            return None
        return Matcher(comm=comm, exe=exe, cmdline=cmdline, uid=uid, cgroup=cgroup,
                       line=node.line)

    def comm(self, node: Node, entry_path: str) -> str | None:
        path = child_path(entry_path, "comm")
        comm = expect_str(node, path, self.problems)
        if comm is None:
            return None
        encoded = comm.encode()
        if len(encoded) > COMM_MAX:
            cut = encoded[:COMM_MAX].decode(errors="ignore")
            self.problems.add(node.line, path, f"comm {comm!r} is longer than {COMM_MAX} "
                              f"characters; the kernel truncates comm to {COMM_MAX} "
                              f"characters, so it would never match (use {cut!r})")
            return None
        return comm

    def glob(self, node: Node, path: str) -> str | None:
        pattern = expect_str(node, path, self.problems)
        if pattern is None:
            return None
        if not pattern.startswith("/"):
            self.problems.add(node.line, path,
                              f"glob {pattern!r} must be an absolute path (start with '/')")
            return None
        reason = glob_problem(pattern)
        if reason is not None:
            self.problems.add(node.line, path, f"bad glob {pattern!r}: {reason}")
            return None
        return pattern

    def regex(self, node: Node, entry_path: str) -> Regex | None:
        path = child_path(entry_path, "cmdline")
        text = expect_str(node, path, self.problems)
        if text is None:
            return None
        try:
            return self.patterns.compile(text)
        except PatternError as exc:
            self.problems.add(node.line, path, str(exc))
            return None

    def user(self, node: Node, path: str) -> int | None:
        name = expect_str(node, path, self.problems)
        if name is None:
            return None
        try:
            return self.user_lookup(name)
        except LookupError:
            self.problems.add(node.line, path, f"unknown user {name!r}")
            return None

    def monitor(self, node: Node) -> MonitorSettings:
        default = MonitorSettings()
        if node.value is None:  # "monitor:" with every setting commented out
            return default
        fields = check_mapping(node, "monitor", self.problems, allowed=_MONITOR_KEYS)
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
        if node.value is None:  # "alerts:" with every setting commented out
            return default
        fields = check_mapping(node, "alerts", self.problems, allowed=_ALERTS_KEYS)
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
        if node.value is None:  # "metrics:" with every setting commented out
            return default
        fields = check_mapping(node, "metrics", self.problems, allowed=_METRICS_KEYS)
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


def load_config_text(text: str, source: str = "<string>", *,
                     user_lookup: UserLookup | None = None) -> Config:
    """Parse and validate config text; raises ConfigError listing every problem."""
    root = parse_yaml(text, source)
    loader = _Loader(source, user_lookup or _pwd_lookup)
    config = loader.config(root, source)
    loader.problems.raise_if_any()
    return config


def load_config(path: str | Path, *, user_lookup: UserLookup | None = None,
                trusted: bool = False) -> Config:
    """Read and validate a config file; raises ConfigError if unreadable or malformed.

    With trusted (the monitor runs as root), a file an agent could have changed is
    refused: see monitor/config/safefile.py. Every file is read bounded (no FIFO, no device).
    """
    source = str(path)
    data = read_file(path, what="config file", trusted=trusted)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(Location(source), f"not UTF-8 text: {exc.reason} "
                            f"at byte {exc.start}")]) from exc
    return load_config_text(text, source, user_lookup=user_lookup)


def default_config() -> Config:
    """The embedded default config (monitor/defaults/config.yaml)."""
    resource = importlib.resources.files("monitor.defaults").joinpath("config.yaml")
    return load_config_text(resource.read_text(encoding="utf-8"), str(resource))


def check_trusted(path: str | Path) -> None:
    """Refuse a config or policy file an agent could have edited (monitor/config/safefile.py):
    every component of its path, and of every symlink's target, must be root's and
    writable by nobody else, and it must be a regular file within the size cap. An agent
    that can edit the policy can allow itself anything. The loaders do this check on the
    descriptor they read from (``trusted=True``); this is for callers that only check."""
    read_file(path, what="file", trusted=True)
