"""The policy as typed values: what a loaded policy file means.

Frozen dataclasses and enums only: the global mode and fail-closed choice, rules with their
event kind, action, agent scope and match conditions (exec, connect, cpu, processes), and
the Policy that holds them, indexed by event kind. Values arrive compiled
(monitor/policy/validate.py and validate_match.py): regexes compiled (RE2), networks folded
(IPv4-mapped IPv6 as IPv4) and indexed by prefix length here, @list origins kept for
reasons. monitor/policy/engine.py evaluates a Policy, monitor/policy/kernel_tables.py
turns it into the kernel's tables.

This module must never read a file, validate text, evaluate an event, touch the kernel or
/proc, or do work on import.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeAlias

from monitor.config.regex import Regex
from monitor.model.address import MAPPED_V4
from monitor.model.agents import AgentSpec, ProcessFacts, recognise
from monitor.model.cmdline import comm_of

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class Mode(StrEnum):
    MONITOR = "monitor"  # verdicts are logged and alerted as "would ...", nothing is done
    ENFORCE = "enforce"


class FailClosed(StrEnum):
    """What the kernel does to an agent process it cannot hand to userspace for judging (its
    exec, fork or connect record lost) or cannot track (process map full), in enforce mode."""
    KILL = "kill"    # the process dies at once (default)
    ALERT = "alert"  # counted per agent (metrics, alert rules) and left running


class Action(StrEnum):
    ALERT = "alert"
    DENY = "deny"  # connect only: refused with EPERM in the kernel
    KILL = "kill"  # the offending process
    KILL_AGENT = "kill-agent"  # the agent's whole process tree


class EventKind(StrEnum):
    EXEC = "exec"
    CONNECT = "connect"
    CPU = "cpu"
    PROCESSES = "processes"


Via: TypeAlias = tuple[tuple[str, str, str], ...]
"""(key, value as text, "@list") for values that came from a named list: for reasons."""


def _via_lookup(via: Via) -> dict[tuple[str, str], str]:
    return {(key, value): name for key, value, name in via}


@dataclass(frozen=True)
class ExecMatch:
    """exec conditions (AND-ed; each list matches when any of its entries does)."""

    names: frozenset[str] = frozenset()  # program basenames (real exe, or comm)
    exe: tuple[str, ...] = ()  # fnmatchcase globs on the real executable path
    argv: tuple[Regex, ...] = ()  # RE2 search on argv joined by single spaces
    ssh: frozenset[str] = frozenset()  # monitor/policy/sshargs.py FEATURES
    fileless: bool | None = None  # True: only fileless execs (memfd, deleted, O_TMPFILE);
    #                               False: only executables with a link; None: either
    sha256: frozenset[str] = frozenset()  # the executable's content: 64 lower-case hex digits
    via: Via = field(default=(), compare=False, repr=False)
    comms: frozenset[str] = field(init=False, compare=False, repr=False)
    lists: Mapping[tuple[str, str], str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "comms", frozenset(comm_of(n) for n in self.names))
        object.__setattr__(self, "lists", _via_lookup(self.via))


@dataclass(frozen=True)
class ConnectMatch:
    """connect conditions. With outside=True, networks/ports are the allowed destinations
    and the rule matches a destination that is not inside them (address AND port)."""

    networks: tuple[Network, ...] = ()  # IPv4-mapped networks are stored as IPv4
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges, in file order
    family: str | None = None  # "ipv4" | "ipv6": of the destination, after normalisation
    outside: bool = False
    via: Via = field(default=(), compare=False, repr=False)
    lists: Mapping[tuple[str, str], str] = field(init=False, compare=False, repr=False)
    _index: tuple[tuple[tuple[int, Mapping[int, Network]], ...], ...] = field(
        init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lists", _via_lookup(self.via))
        tables: tuple[dict[int, dict[int, Network]], dict[int, dict[int, Network]]] = ({}, {})
        for net in self.networks:
            bits = 32 if net.version == 4 else 128
            table = tables[0 if net.version == 4 else 1].setdefault(net.prefixlen, {})
            table.setdefault(int(net.network_address) >> (bits - net.prefixlen), net)
            if net.version == 6 and net.prefixlen < 96 and MAPPED_V4.subnet_of(net):
                tables[0].setdefault(0, {}).setdefault(0, net)  # ::/0 holds every IPv4 too
        index = tuple(tuple(sorted(t.items(), reverse=True)) for t in tables)
        object.__setattr__(self, "_index", index)

    def network_for(self, ip: Address) -> Network | None:
        """The longest of networks that holds ip (IPv4-mapped ip must be normalised)."""
        bits = 32 if ip.version == 4 else 128
        value = int(ip)
        for prefixlen, table in self._index[0 if ip.version == 4 else 1]:
            net = table.get(value >> (bits - prefixlen))
            if net is not None:
                return net
        return None

    def port_range_for(self, port: int) -> tuple[int, int] | None:
        for lo, hi in self.ports:
            if lo <= port <= hi:
                return lo, hi
        return None


@dataclass(frozen=True)
class CpuMatch:
    cores: float  # CPU-seconds per second; 1.0 is one full core
    scope: str  # "agent" (the whole session) | "process"
    window_s: float  # the rate must stay above cores for this long


@dataclass(frozen=True)
class ProcessesMatch:
    above: int  # more live processes than this in one agent session


MatchSpec: TypeAlias = ExecMatch | ConnectMatch | CpuMatch | ProcessesMatch


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    event: EventKind
    action: Action
    agents: frozenset[str] | None  # None: every agent
    match: MatchSpec
    line: int


@dataclass(frozen=True)
class Policy:
    mode: Mode
    agents: tuple[AgentSpec, ...]
    rules: tuple[Rule, ...]
    source: str
    sha256: str
    fail_closed: FailClosed = FailClosed.KILL
    _by_kind: Mapping[EventKind, tuple[Rule, ...]] = field(
        init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        index = {kind: tuple(r for r in self.rules if r.event == kind) for kind in EventKind}
        object.__setattr__(self, "_by_kind", index)

    def rules_for(self, kind: EventKind) -> tuple[Rule, ...]:
        """The rules for one event kind, in file order."""
        return self._by_kind[kind]

    @staticmethod
    def applies(rule: Rule, agent_name: str) -> bool:
        """Whether rule is in force for agents of this name."""
        return rule.agents is None or agent_name in rule.agents

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def recognise(self, p: ProcessFacts) -> AgentSpec | None:
        """The first agent, in file order, that p matches; None if it matches none."""
        return recognise(self.agents, p)


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def span_text(span: tuple[int, int]) -> str:
    """A port range as written in a policy: "443" or "5555-5560"."""
    return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"
