"""Agents: what an agent is, and how a process is recognised as one (the one place).

An AgentSpec is a named kind of agent with match entries (OR-ed; the fields inside one
entry are AND-ed) over a process's comm, executable path, command line, uid and cgroup.
Agents are written in two files, the config and the policy, with the same syntax
(monitor/config/validate.py reads both); merged_agents joins them, config first, and
refuses a name defined in both. recognise() picks the first agent, in that order, whose
matchers a process's facts satisfy; the kernel's matcher tables
(monitor/policy/kernel_tables.py) are built to pick the same one.

A command-line matcher is a compiled pattern given to this module (the Pattern Protocol,
which monitor/config/regex.py's Regex satisfies): this module never compiles a pattern,
never reads /proc or a file, and imports nothing of the monitor but model/.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Protocol

from monitor.model.errors import ConfigError, Location


class Pattern(Protocol):
    """A compiled command-line pattern: search(text) is true where it matches anywhere."""

    def search(self, text: str) -> object | None: ...


class AgentSource(Protocol):
    """A loaded file that defines agents (the config, the policy)."""

    @property
    def agents(self) -> tuple[AgentSpec, ...]: ...

    @property
    def source(self) -> str: ...


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
    cmdline: Pattern | None = None  # RE2 search on argv joined by single spaces
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


def recognise(agents: Iterable[AgentSpec], p: ProcessFacts) -> AgentSpec | None:
    """The first agent, in the given order, that p matches; None if it matches none."""
    return next((a for a in agents if a.matches(p)), None)


def needs_userspace(agents: Iterable[AgentSpec]) -> bool:
    """Whether some matcher looks at what only userspace sees (exe, cmdline, cgroup): then
    the kernel must hand exec candidates to the monitor."""
    return any(not m.in_kernel for a in agents for m in a.matchers)


def merged_agents(config: AgentSource, policy: AgentSource) -> tuple[AgentSpec, ...]:
    """Agents from the config, then from the policy; a name defined twice is an error."""
    seen = {a.name for a in config.agents}
    dup = [a.name for a in policy.agents if a.name in seen]
    if dup:
        raise ConfigError([(Location(policy.source), f"agent {n!r} is defined in both "
                            f"{config.source} and the policy: define it once")
                           for n in dup])
    return (*config.agents, *policy.agents)
