"""The monitor's configuration: how AI agents are recognised, plus monitor settings.

A config file lists agents, each with match entries (OR-ed; the keys inside one entry are
AND-ed) over a process's comm, executable path, command line, uid and cgroup, and a
``monitor`` section with sizes and intervals. Loading validates everything, collects every
problem with its file, line and key path, and raises them together as one ConfigError.

This module must never touch the kernel, BPF or /proc (it decides from ProcessFacts it is
given), never accept a config that silently means something other than what it says, and
never do work on import.
"""

from __future__ import annotations

import importlib.resources
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from monitor.errors import ConfigError, Location
from monitor.yamlsource import (
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

UserLookup = Callable[[str], int]
"""Resolves a user name to a uid; raises KeyError (or another LookupError) if unknown."""

COMM_MAX = 15  # TASK_COMM_LEN is 16 bytes including the terminating NUL
UID_MAX = 4294967294  # (uid_t)-1 is reserved
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_TOP_KEYS = ("agents", "monitor")
_AGENT_KEYS = ("name", "match")
_MATCH_KEYS = ("comm", "exe", "cmdline", "user", "uid", "cgroup")
_MONITOR_KEYS = ("control_socket", "ring_buffer_mib", "max_processes", "tick_seconds", "history")


@dataclass(frozen=True)
class ProcessFacts:
    """What a matcher looks at: one process as seen at exec time."""

    pid: int
    comm: str
    exe: str  # real path of the executable
    argv: tuple[str, ...]
    uid: int
    cgroup: str  # cgroup v2 path, as on the "0::" line of /proc/PID/cgroup


@dataclass(frozen=True)
class Matcher:
    """One match entry: every field that is set must match (an empty Matcher never does)."""

    comm: str | None = None
    exe: str | None = None  # fnmatchcase glob on the executable's real path
    cmdline: re.Pattern[str] | None = None  # re.search on argv joined by single spaces
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
        return self.cmdline is None or self.cmdline.search(" ".join(p.argv)) is not None


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
    ring_buffer_mib: int = 16  # power of two, 1..256
    max_processes: int = 65536  # entries in the in-kernel process map, 1024..4194304
    tick_seconds: float = 1.0  # 0.05..60
    history: int = 32  # exec/connect records kept per process, 1..10000


@dataclass(frozen=True)
class Config:
    agents: tuple[AgentSpec, ...]
    monitor: MonitorSettings
    source: str

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


def parse_agents(node: Node, problems: Problems, *,
                 user_lookup: UserLookup | None = None) -> tuple[AgentSpec, ...]:
    """Validate an ``agents:`` list node (the config's syntax, key path ``agents``).

    Used by the policy loader, whose ``agents:`` section is the same. Problems are added
    to ``problems``; agents with problems are left out of the result.
    """
    loader = _Loader(problems.source, user_lookup or _pwd_lookup)
    loader.problems = problems
    return loader.agents(node)


def _pwd_lookup(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


class _Loader:
    """Validates a parsed config tree, collecting every problem."""

    def __init__(self, source: str, user_lookup: UserLookup) -> None:
        self.problems = Problems(source)
        self.user_lookup = user_lookup

    def config(self, root: Node) -> tuple[tuple[AgentSpec, ...], MonitorSettings]:
        if root.value is None:  # empty file, or only comments
            return (), MonitorSettings()
        if not isinstance(root.value, dict):
            self.problems.add(root.line, "", "the top level must be a mapping (keys: "
                              f"{', '.join(_TOP_KEYS)}), got {type_name(root.value)}")
            return (), MonitorSettings()
        top = check_mapping(root, "", self.problems, allowed=_TOP_KEYS) or {}
        agents = self.agents(top["agents"]) if "agents" in top else ()
        monitor = self.monitor(top["monitor"]) if "monitor" in top else MonitorSettings()
        return agents, monitor

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

    def regex(self, node: Node, entry_path: str) -> re.Pattern[str] | None:
        path = child_path(entry_path, "cmdline")
        text = expect_str(node, path, self.problems)
        if text is None:
            return None
        try:
            return re.compile(text)
        except re.error as exc:
            self.problems.add(node.line, path, f"bad regular expression {text!r}: {exc}")
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
        tick = default.tick_seconds
        if "tick_seconds" in fields:
            seconds = expect_number(fields["tick_seconds"], path("tick_seconds"), p,
                                    minimum=0.05, maximum=60)
            tick = tick if seconds is None else seconds
        return MonitorSettings(control_socket=socket, ring_buffer_mib=ring,
                               max_processes=max_processes, tick_seconds=tick, history=history)


def load_config_text(text: str, source: str = "<string>", *,
                     user_lookup: UserLookup | None = None) -> Config:
    """Parse and validate config text; raises ConfigError listing every problem."""
    root = parse_yaml(text, source)
    loader = _Loader(source, user_lookup or _pwd_lookup)
    agents, monitor = loader.config(root)
    loader.problems.raise_if_any()
    return Config(agents=agents, monitor=monitor, source=source)


def load_config(path: str | Path, *, user_lookup: UserLookup | None = None) -> Config:
    """Read and validate a config file; raises ConfigError if unreadable or malformed."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([(Location(source), f"cannot read config file: {reason}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([(Location(source), f"not UTF-8 text: {exc.reason} "
                            f"at byte {exc.start}")]) from exc
    return load_config_text(text, source, user_lookup=user_lookup)


def default_config() -> Config:
    """The embedded default config (monitor/defaults/config.yaml)."""
    resource = importlib.resources.files("monitor.defaults").joinpath("config.yaml")
    return load_config_text(resource.read_text(encoding="utf-8"), str(resource))
