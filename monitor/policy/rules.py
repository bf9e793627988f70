"""The policy: what agents may not do, and what happens when they do.

Built in stages. Load: strict YAML with line numbers (monitor/config/yamlsource.py), unknown keys
rejected. Validate: every problem is collected with file, line and key path (such as
``rules[3].match.port[1]``) and a reason that says what to write instead, then raised
together as one ConfigError (exit code 2). Compile: ``@list`` references expanded,
regexes compiled (RE2, linear time: monitor/config/regex.py), networks parsed (IPv4-mapped IPv6
folded into IPv4) and indexed by prefix length, rules indexed by event kind. The result is
a frozen Policy that monitor/policy/engine.py evaluates and monitor/policy/kernel_tables.py
turns into BPF map
contents.

This module must never evaluate events, touch the kernel or /proc, or accept a policy that
silently means something other than what it says; it does no work on import.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, TypeAlias, TypeVar

from monitor.config.regex import Compiler, PatternError, Regex
from monitor.config.safefile import read_file
from monitor.config.types import UserLookup
from monitor.config.validate_agents import glob_problem, parse_agents
from monitor.config.yamlsource import (
    Node,
    Problems,
    check_mapping,
    child_path,
    expect_int,
    expect_number,
    expect_str,
    parse_yaml,
    shown,
    type_name,
)
from monitor.model.address import MAPPED_V4, fold_network
from monitor.model.agents import AgentSpec, ProcessFacts
from monitor.model.cmdline import comm_of
from monitor.model.errors import ConfigError, Location
from monitor.policy.sshargs import FEATURES as SSH_FEATURES

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


MAX_WINDOW_S = 86400.0
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_NAME_RULE = "1-63 characters a-z 0-9 _ . - starting with a letter or digit"
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_TOP_KEYS = ("mode", "fail_closed", "agents", "lists", "rules")
_RULE_KEYS = ("name", "description", "event", "agents", "action", "match")
_MATCH_KEYS: Mapping[EventKind, tuple[str, ...]] = {
    EventKind.EXEC: ("name", "exe", "argv", "ssh"),
    EventKind.CONNECT: ("address", "port", "family", "outside"),
    EventKind.CPU: ("cores", "scope", "for"),
    EventKind.PROCESSES: ("above",),
}
_SCOPES = ("agent", "process")
_FAMILIES = ("ipv4", "ipv6")
_REQUIRED_RULE_KEYS = {
    "name": f"give the rule a unique name ({_NAME_RULE})",
    "event": "write event: exec, connect, cpu or processes",
    "action": "write action: alert, deny, kill or kill-agent",
    "match": "write the rule's conditions under match:",
}
_E = TypeVar("_E", bound=StrEnum)
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
        return next((a for a in self.agents if a.matches(p)), None)


# --- load and validate -----------------------------------------------------------------


class _Item(NamedTuple):
    """One value of a rule's list, after @list expansion."""

    node: Node
    path: str  # where the value is written: in the rule, or in lists.NAME[i]
    via: str  # "@name" when it came from a list, else ""
    ref: str  # the key path of the @name reference, else ""


def parse_duration(value: object) -> float | None:
    """Seconds in "30s", "10m", "1h", "1h30m", or a plain number of seconds; None if bad."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    m = _DURATION_RE.fullmatch(value.strip())
    if m is None or not any(m.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


class _Loader:
    """Validates and compiles a parsed policy tree, collecting every problem."""

    def __init__(self, source: str, user_lookup: UserLookup | None) -> None:
        self.problems = Problems(source)
        self.user_lookup = user_lookup
        self.lists: dict[str, list[Node]] = {}
        self.fail_closed = FailClosed.KILL
        self.patterns = Compiler()

    def add(self, item: _Item, reason: str) -> None:
        if item.via:
            reason += f" (value of {item.via}, used at {item.ref})"
        self.problems.add(item.node.line, item.path, reason)

    def policy(self, root: Node) -> tuple[Mode | None, tuple[AgentSpec, ...], tuple[Rule, ...]]:
        if not isinstance(root.value, dict):
            got = "an empty file" if root.value is None else type_name(root.value)
            self.problems.add(root.line, "", "the top level must be a mapping with keys "
                              f"{', '.join(_TOP_KEYS)} (at least 'mode: monitor' or "
                              f"'mode: enforce'), got {got}")
            return None, (), ()
        top = check_mapping(root, "", self.problems, allowed=_TOP_KEYS)
        assert top is not None
        mode = None
        if "mode" in top:
            mode = self.mode(top["mode"])
        else:
            self.problems.add(root.line, "mode", "missing required key 'mode': write "
                              "'mode: monitor' (verdicts are only logged and alerted) or "
                              "'mode: enforce' (verdicts are carried out)")
        if "fail_closed" in top:
            node = top["fail_closed"]
            if isinstance(node.value, str) and node.value in {f.value for f in FailClosed}:
                self.fail_closed = FailClosed(node.value)
            else:
                self.problems.add(node.line, "fail_closed", f"unknown value {node.value!r}: "
                                  "write 'kill' (an agent process whose record is lost or "
                                  "that cannot be tracked dies) or 'alert' (it is counted "
                                  "and alerted on)")
        agents: tuple[AgentSpec, ...] = ()
        declared: dict[str, int] = {}
        if "agents" in top and top["agents"].value is not None:
            agents = parse_agents(top["agents"], self.problems, user_lookup=self.user_lookup,
                                  patterns=self.patterns)
            declared = _declared_agents(top["agents"])
        if "lists" in top:
            self.read_lists(top["lists"])
        rules: tuple[Rule, ...] = ()
        if "rules" in top:
            rules = self.rules(top["rules"], declared)
        return mode, agents, rules

    def mode(self, node: Node) -> Mode | None:
        value = node.value
        if isinstance(value, str) and value in {m.value for m in Mode}:
            return Mode(value)
        self.problems.add(node.line, "mode", f"unknown mode {shown(value)}: write 'monitor' "
                          "(verdicts are only logged and alerted) or 'enforce' (verdicts "
                          "are carried out)")
        return None

    def read_lists(self, node: Node) -> None:
        if node.value is None:
            return
        if not isinstance(node.value, dict):
            self.problems.add(node.line, "lists", "expected a mapping of list names to "
                              f"lists (e.g. 'mining_ports: [3333, 4444]'), got "
                              f"{type_name(node.value)}")
            return
        for name, value in node.value.items():
            path = child_path("lists", name)
            line = node.key_lines.get(name, node.line)
            if not _NAME_RE.fullmatch(name):
                self.problems.add(line, path, f"invalid list name {name!r}: use {_NAME_RULE}")
                continue
            if not isinstance(value.value, list):
                self.problems.add(value.line, path, f"expected a list of strings or "
                                  f"integers, got {type_name(value.value)}")
                continue
            items: list[Node] = []
            for i, item in enumerate(value.value):
                if isinstance(item.value, str) and item.value.startswith("@"):
                    self.problems.add(item.line, child_path(path, i), "a list cannot refer "
                                      f"to another list ({item.value}); write its values here")
                elif isinstance(item.value, bool) or not isinstance(item.value, str | int):
                    self.problems.add(item.line, child_path(path, i), "list values must be "
                                      f"strings or integers, got {type_name(item.value)}")
                else:
                    items.append(item)
            self.lists[name] = value.value if len(items) == len(value.value) else items

    def values(self, node: Node, path: str, what: str) -> list[_Item] | None:
        """A non-empty list of values with @list references expanded; None if bad."""
        if not isinstance(node.value, list):
            hint = f" (write [{node.value}])" if isinstance(node.value, str | int) \
                and not isinstance(node.value, bool) else ""
            self.problems.add(node.line, path, f"expected a list of {what}, got "
                              f"{type_name(node.value)}{hint}")
            return None
        items: list[_Item] = []
        before = len(self.problems)
        for i, item in enumerate(node.value):
            item_path = child_path(path, i)
            ref = item.value
            if isinstance(ref, str) and ref.startswith("@"):
                name = ref[1:]
                if name not in self.lists:
                    known = ", ".join("@" + n for n in self.lists) or "none defined"
                    self.problems.add(item.line, item_path, f"unknown list {ref!r} "
                                      f"(lists: {known}); define it under 'lists:'")
                    continue
                for j, value in enumerate(self.lists[name]):
                    items.append(_Item(value, child_path(child_path("lists", name), j),
                                       ref, item_path))
            else:
                items.append(_Item(item, item_path, "", ""))
        if not items and len(self.problems) == before:
            self.problems.add(node.line, path, f"empty list: give at least one of {what} "
                              "(or remove the key)")
            return None
        return items

    def rules(self, node: Node, declared: Mapping[str, int]) -> tuple[Rule, ...]:
        if node.value is None:
            return ()
        if not isinstance(node.value, list):
            self.problems.add(node.line, "rules", "expected a list of rules, got "
                              f"{type_name(node.value)}")
            return ()
        result: list[Rule] = []
        first_line: dict[str, int] = {}
        for i, item in enumerate(node.value):
            rule = self.rule(item, child_path("rules", i), declared, first_line)
            if rule is not None:
                result.append(rule)
        return tuple(result)

    def rule(self, node: Node, path: str, declared: Mapping[str, int],
             first_line: dict[str, int]) -> Rule | None:
        fields = check_mapping(node, path, self.problems, allowed=_RULE_KEYS)
        if fields is None:
            return None
        for key, advice in _REQUIRED_RULE_KEYS.items():
            if key not in fields:
                self.problems.add(node.line, child_path(path, key),
                                  f"missing required key {key!r}: {advice}")
        before = len(self.problems)
        name = self.rule_name(fields["name"], child_path(path, "name"), first_line) \
            if "name" in fields else None
        description = ""
        if "description" in fields:
            description = expect_str(fields["description"], child_path(path, "description"),
                                     self.problems, allow_empty=True) or ""
        event = self.choice(fields["event"], child_path(path, "event"), EventKind, "event") \
            if "event" in fields else None
        action = self.choice(fields["action"], child_path(path, "action"), Action, "action") \
            if "action" in fields else None
        if action == Action.DENY and event is not None and event != EventKind.CONNECT:
            self.problems.add(fields["action"].line, child_path(path, "action"),
                              f"'deny' refuses a connection and exists only for event: "
                              f"connect; for event: {event} use alert, kill or kill-agent")
        agents = self.rule_agents(fields["agents"], child_path(path, "agents"), declared) \
            if "agents" in fields else None
        match: MatchSpec | None = None
        if "match" in fields and event is not None:
            match = self.match(fields["match"], child_path(path, "match"), event)
        if len(self.problems) != before or name is None or event is None \
                or action is None or match is None:
            return None
        return Rule(name=name, description=description, event=event, action=action,
                    agents=agents, match=match, line=node.line)

    def rule_name(self, node: Node, path: str, first_line: dict[str, int]) -> str | None:
        name = expect_str(node, path, self.problems)
        if name is None:
            return None
        if not _NAME_RE.fullmatch(name):
            self.problems.add(node.line, path, f"invalid rule name {name!r}: use {_NAME_RULE}")
            return None
        if name in first_line:
            self.problems.add(node.line, path, f"duplicate rule name {name!r} (first "
                              f"defined on line {first_line[name]}); give each rule its "
                              "own name: verdicts, alerts and metrics carry it")
            return None
        first_line[name] = node.line
        return name

    def choice(self, node: Node, path: str, enum: type[_E], what: str) -> _E | None:
        allowed = [str(e) for e in enum]
        if isinstance(node.value, str) and node.value in allowed:
            return enum(node.value)
        self.problems.add(node.line, path, f"unknown {what} {shown(node.value)}: write one of "
                          f"{', '.join(allowed)}")
        return None

    def rule_agents(self, node: Node, path: str,
                    declared: Mapping[str, int]) -> frozenset[str] | None:
        items = self.values(node, path, "agent names")
        if items is None:
            return None
        names: set[str] = set()
        for item in items:
            name = self.text(item, "an agent name")
            if name is None:
                continue
            if name not in declared:
                known = ", ".join(declared) or "none defined"
                self.add(item, f"unknown agent {name!r} (agents: {known}); define it under "
                         "'agents:' or fix the name")
            names.add(name)
        return frozenset(names)

    def text(self, item: _Item, what: str) -> str | None:
        value = item.node.value
        if not isinstance(value, str) or not value:
            self.add(item, f"expected {what} (a non-empty string), got "
                     f"{type_name(value) if value != '' else 'an empty string'}")
            return None
        return value

    def match(self, node: Node, path: str, event: EventKind) -> MatchSpec | None:
        keys = _MATCH_KEYS[event]
        if node.value is None or node.value == {}:
            self.problems.add(node.line, path, f"empty match: a rule must say what it "
                              f"matches; for event: {event} give at least one of "
                              f"{', '.join(keys)}")
            return None
        fields = check_mapping(node, path, self.problems, allowed=keys)
        if fields is None:
            return None
        if event == EventKind.EXEC:
            return self.exec_match(fields, path)
        if event == EventKind.CONNECT:
            return self.connect_match(node, fields, path)
        if event == EventKind.CPU:
            return self.cpu_match(node, fields, path)
        if "above" not in fields:
            return None  # an unknown key was given instead; already reported
        above = expect_int(fields["above"], child_path(path, "above"), self.problems,
                           minimum=1, maximum=4194304)
        return None if above is None else ProcessesMatch(above)

    def exec_match(self, fields: Mapping[str, Node], path: str) -> ExecMatch:
        via: list[tuple[str, str, str]] = []
        names: list[str] = []
        for item in self.key_values(fields, path, "name", "program names"):
            name = self.text(item, "a program name")
            if name is not None and ("/" in name or "\0" in name):
                self.add(item, f"{name!r} is not a program's base name; to match a path "
                         "use exe: [glob]")
            elif name is not None:
                names.append(name)
                if item.via:
                    via.append(("name", name, item.via))
        globs: list[str] = []
        for item in self.key_values(fields, path, "exe", "absolute path globs"):
            pattern = self.text(item, "an absolute path glob")
            if pattern is None:
                continue
            problem = glob_problem(pattern) if pattern.startswith("/") else (
                "must be an absolute path (start with '/'), matched against the "
                "executable's real path")
            if problem is not None:
                self.add(item, f"bad glob {pattern!r}: {problem}")
                continue
            globs.append(pattern)
            if item.via:
                via.append(("exe", pattern, item.via))
        regexes: list[Regex] = []
        for item in self.key_values(fields, path, "argv", "regular expressions"):
            text = self.text(item, "a regular expression")
            if text is None:
                continue
            try:
                regexes.append(self.patterns.compile(text))
            except PatternError as exc:
                self.add(item, str(exc))
                continue
            if item.via:
                via.append(("argv", text, item.via))
        features: list[str] = []
        for item in self.key_values(fields, path, "ssh", "ssh features"):
            feature = self.text(item, "an ssh feature")
            if feature is not None and feature not in SSH_FEATURES:
                self.add(item, f"unknown ssh feature {feature!r}: write one of "
                         f"{', '.join(sorted(SSH_FEATURES))}")
            elif feature is not None:
                features.append(feature)
        return ExecMatch(names=frozenset(names), exe=tuple(dict.fromkeys(globs)),
                         argv=tuple(dict.fromkeys(regexes)), ssh=frozenset(features),
                         via=tuple(via))

    def key_values(self, fields: Mapping[str, Node], path: str, key: str,
                   what: str) -> list[_Item]:
        if key not in fields:
            return []
        return self.values(fields[key], child_path(path, key), what) or []

    def connect_match(self, node: Node, fields: Mapping[str, Node],
                      path: str) -> ConnectMatch | None:
        via: list[tuple[str, str, str]] = []
        outside = "outside" in fields
        where, at = fields, path
        if outside:
            for key in ("address", "port"):
                if key in fields:
                    self.problems.add(node.key_lines[key], child_path(path, key),
                                      f"'{key}' cannot be combined with 'outside' (line "
                                      f"{node.key_lines['outside']}); an allow-list lists "
                                      f"its allowed destinations inside outside: {{address: "
                                      f"[...], port: [...]}}")
            at = child_path(path, "outside")
            inner = check_mapping(fields["outside"], at, self.problems,
                                  allowed=("address", "port"))
            if inner is None:
                return None
            if not inner:
                self.problems.add(fields["outside"].line, at, "empty outside: give the "
                                  "allowed destinations as address: [...] and/or port: [...]")
                return None
            where = inner
        networks = self.networks(where, at, via)
        ports = self.ports(where, at, via)
        family = None
        if "family" in fields:
            family = fields["family"].value
            if family not in _FAMILIES:
                self.problems.add(fields["family"].line, child_path(path, "family"),
                                  f"unknown family {shown(family)}: write ipv4 or ipv6")
                return None
        assert family is None or isinstance(family, str)
        return ConnectMatch(networks=networks, ports=ports, family=family, outside=outside,
                            via=tuple(via))

    def networks(self, fields: Mapping[str, Node], path: str,
                 via: list[tuple[str, str, str]]) -> tuple[Network, ...]:
        result: dict[Network, None] = {}
        for item in self.key_values(fields, path, "address", "IP addresses or CIDRs"):
            text = item.node.value
            if not isinstance(text, str):
                self.add(item, f"expected an IP address or CIDR such as 10.0.0.0/8 or "
                         f"2001:db8::/32 (in quotes if need be), got {type_name(text)}")
                continue
            try:
                net = ipaddress.ip_network(text.strip(), strict=True)
            except ValueError as exc:
                hint = ""
                try:
                    hint = f"; did you mean {ipaddress.ip_network(text.strip(), strict=False)}?"
                except ValueError:
                    pass
                self.add(item, f"bad address {text!r}: {exc}{hint}")
                continue
            net = fold_network(net)
            result.setdefault(net)
            if item.via:
                via.append(("address", str(net), item.via))
        return tuple(result)

    def ports(self, fields: Mapping[str, Node], path: str,
              via: list[tuple[str, str, str]]) -> tuple[tuple[int, int], ...]:
        result: dict[tuple[int, int], None] = {}
        for item in self.key_values(fields, path, "port", "ports"):
            span = _port_range(item.node.value)
            if isinstance(span, str):
                self.add(item, span)
                continue
            result.setdefault(span)
            if item.via:
                via.append(("port", span_text(span), item.via))
        return tuple(result)

    def cpu_match(self, node: Node, fields: Mapping[str, Node], path: str) -> CpuMatch | None:
        for key, example in (("cores", "cores: 1.5"), ("for", "for: 10m")):
            if key not in fields:
                self.problems.add(node.line, child_path(path, key), f"missing required key "
                                  f"{key!r} (for example {example})")
        cores = window = None
        if "cores" in fields:
            cores = expect_number(fields["cores"], child_path(path, "cores"), self.problems,
                                  minimum=0, maximum=4096)
            if cores == 0:
                self.problems.add(fields["cores"].line, child_path(path, "cores"),
                                  "must be more than 0 (1.0 is one full core)")
                cores = None
        if "for" in fields:
            window = parse_duration(fields["for"].value)
            if window is None or not 0 < window <= MAX_WINDOW_S:
                self.problems.add(fields["for"].line, child_path(path, "for"),
                                  f"bad duration {shown(fields['for'].value)}: write seconds "
                                  "(e.g. 90) or a duration like 30s, 10m, 1h, 1h30m, "
                                  "more than 0 and at most 24h")
                window = None
        scope = "agent"
        if "scope" in fields:
            value = fields["scope"].value
            if value not in _SCOPES:
                self.problems.add(fields["scope"].line, child_path(path, "scope"),
                                  f"unknown scope {shown(value)}: write agent (the whole session) "
                                  "or process (each process on its own)")
                return None
            assert isinstance(value, str)
            scope = value
        if cores is None or window is None:
            return None
        return CpuMatch(cores=cores, scope=scope, window_s=window)


def _port_range(value: object) -> tuple[int, int] | str:
    """(lo, hi) for a port or a "lo-hi" range, or the reason it is not one."""
    advice = 'write a port 1..65535 or a range like "5555-5560"'
    if isinstance(value, bool) or not isinstance(value, int | str):
        return f"expected a port, got {type_name(value)}: {advice}"
    if isinstance(value, int):
        lo = hi = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        if m is None:
            return f"bad port {value!r}: {advice}"
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        return f"port {value!r} is out of range: {advice}"
    if lo > hi:
        return f"bad port range {value!r}: the low end is above the high end (write {hi}-{lo})"
    return lo, hi


def span_text(span: tuple[int, int]) -> str:
    """A port range as written in a policy: "443" or "5555-5560"."""
    return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"


def _declared_agents(node: Node) -> dict[str, int]:
    """Agent names written under agents:, also those of agents with problems (so rules
    that name them are not reported a second time)."""
    names: dict[str, int] = {}
    for item in node.value if isinstance(node.value, list) else []:
        if isinstance(item.value, dict) and "name" in item.value:
            name = item.value["name"]
            if isinstance(name.value, str):
                names.setdefault(name.value, name.line)
    return names


def load_policy_text(text: str, source: str = "<string>", *,
                     user_lookup: UserLookup | None = None) -> Policy:
    """Parse, validate and compile policy text; raises ConfigError listing every problem.

    sha256 is the digest of the text encoded as UTF-8.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return _build(text, source, user_lookup, digest)  # parse_yaml refuses surrogates


def _build(text: str, source: str, user_lookup: UserLookup | None, digest: str) -> Policy:
    root = parse_yaml(text, source)
    loader = _Loader(source, user_lookup)
    mode, agents, rules = loader.policy(root)
    loader.problems.raise_if_any()
    assert mode is not None
    return Policy(mode=mode, agents=agents, rules=rules, source=source, sha256=digest,
                  fail_closed=loader.fail_closed)


def load_policy(path: str | Path, *, user_lookup: UserLookup | None = None,
                trusted: bool = False) -> Policy:
    """Read, validate and compile a policy file; raises ConfigError if unreadable or bad.

    sha256 is the digest of the file's bytes (what sha256sum prints for it). With trusted
    (the monitor runs as root), a file an agent could have changed is refused: see
    monitor/config/safefile.py. Every file is read bounded (no FIFO, no device).
    """
    source = str(path)
    data = read_file(path, what="policy file", trusted=trusted)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(Location(source), f"not UTF-8 text: {exc.reason} "
                            f"at byte {exc.start}")]) from exc
    return _build(text, source, user_lookup, hashlib.sha256(data).hexdigest())


def default_policy() -> Policy:
    """The embedded default policy (monitor/defaults/policy.yaml)."""
    resource = importlib.resources.files("monitor.defaults").joinpath("policy.yaml")
    return load_policy_text(resource.read_text(encoding="utf-8"), str(resource))
