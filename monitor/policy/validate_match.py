"""Validate and compile a rule's ``match:`` and the values it lists, collecting problems.

A match node of a known event kind becomes its typed, compiled conditions
(monitor/policy/types.py): exec names, absolute exe globs, argv patterns compiled with RE2
within the file's budget (monitor/config/regex.py), ssh features, fileless; connect
networks parsed and folded, port ranges, family, allow-lists (outside); cpu rates and
windows; process counts. ``@list`` references are expanded here, and a problem in a
listed value names both where the value is written and where the list is used. Every
problem is added with its line and key path (``rules[3].match.port[1]``) in file order.

This module must never read a file, touch the kernel or /proc, or do work on import.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import NamedTuple

from monitor.config.regex import Compiler, PatternError, Regex
from monitor.config.validate_agents import glob_problem
from monitor.config.yamlsource import (
    Node,
    Problems,
    check_mapping,
    child_path,
    expect_bool,
    expect_int,
    expect_number,
    shown,
    type_name,
)
from monitor.model.address import fold_network
from monitor.policy.identity import SHA256_RE
from monitor.policy.sshargs import FEATURES as SSH_FEATURES
from monitor.policy.types import (
    ConnectMatch,
    CpuMatch,
    EventKind,
    ExecMatch,
    MatchSpec,
    Network,
    ProcessesMatch,
    span_text,
)

MAX_WINDOW_S = 86400.0
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_MATCH_KEYS: Mapping[EventKind, tuple[str, ...]] = {
    EventKind.EXEC: ("name", "exe", "argv", "ssh", "sha256", "fileless"),
    EventKind.CONNECT: ("address", "port", "family", "outside"),
    EventKind.CPU: ("cores", "scope", "for"),
    EventKind.PROCESSES: ("above",),
}
_SCOPES = ("agent", "process")
_FAMILIES = ("ipv4", "ipv6")


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


class MatchReader:
    """Validates and compiles match conditions, with @list references expanded."""

    def __init__(self, problems: Problems, patterns: Compiler) -> None:
        self.problems = problems
        self.patterns = patterns
        self.lists: dict[str, list[Node]] = {}

    def add(self, item: _Item, reason: str) -> None:
        if item.via:
            reason += f" (value of {item.via}, used at {item.ref})"
        self.problems.add(item.node.line, item.path, reason)

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

    def text(self, item: _Item, what: str) -> str | None:
        value = item.node.value
        if not isinstance(value, str) or not value:
            self.add(item, f"expected {what} (a non-empty string), got "
                     f"{type_name(value) if value != '' else 'an empty string'}")
            return None
        return value

    def key_values(self, fields: Mapping[str, Node], path: str, key: str,
                   what: str) -> list[_Item]:
        if key not in fields:
            return []
        return self.values(fields[key], child_path(path, key), what) or []

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
        fileless = None
        if "fileless" in fields:
            fileless = expect_bool(fields["fileless"], child_path(path, "fileless"),
                                   self.problems)
        return ExecMatch(names=frozenset(names), exe=tuple(dict.fromkeys(globs)),
                         argv=tuple(dict.fromkeys(regexes)), ssh=frozenset(features),
                         fileless=fileless, sha256=self.hashes(fields, path, via),
                         via=tuple(via))

    def hashes(self, fields: Mapping[str, Node], path: str,
               via: list[tuple[str, str, str]]) -> frozenset[str]:
        """`sha256:` values: 64 hex digits each (any case; kept lower case)."""
        found: set[str] = set()
        for item in self.key_values(fields, path, "sha256", "sha256 digests"):
            value = item.node.value
            text = value.strip() if isinstance(value, str) else ""
            if not SHA256_RE.fullmatch(text):
                self.add(item, f"bad sha256 {shown(value)}: write the 64 hex digits that "
                         "`sha256sum FILE` prints for the executable (in quotes)")
                continue
            found.add(text.lower())
            if item.via:
                via.append(("sha256", text.lower(), item.via))
        return frozenset(found)

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
