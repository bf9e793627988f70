"""Validate the ``agents:`` section, the one syntax the config and the policy share.

An agents list node (YAML with lines, monitor/config/yamlsource.py) becomes
monitor/model/agents.py's AgentSpecs: names checked, match entries checked key by key
(comm within the kernel's 15 bytes, absolute fnmatch globs that mean what they say,
RE2 command-line patterns compiled within the file's budget, a user name resolved to its
uid). Every problem is added with its line and key path (``agents[0].match[1].comm``), in
the order the file gives them; an agent with a problem is left out.

This module must never read a file, touch the kernel or /proc, or do work on import.
"""

from __future__ import annotations

import pwd
import re

from monitor.config.regex import Compiler, PatternError, Regex
from monitor.config.types import UserLookup
from monitor.config.yamlsource import (
    Node,
    Problems,
    check_mapping,
    child_path,
    expect_int,
    expect_list,
    expect_str,
)
from monitor.model.agents import AgentSpec, Matcher
from monitor.model.cmdline import COMM_MAX

UID_MAX = 4294967294  # (uid_t)-1 is reserved
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_AGENT_KEYS = ("name", "match")
_MATCH_KEYS = ("comm", "exe", "cmdline", "user", "uid", "cgroup")


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


def parse_agents(node: Node, problems: Problems, *, user_lookup: UserLookup | None = None,
                 patterns: Compiler | None = None) -> tuple[AgentSpec, ...]:
    """Validate an ``agents:`` list node (the config's syntax, key path ``agents``).

    The config's and the policy's ``agents:`` sections are the same (the policy shares its
    pattern budget, ``patterns``). Problems are added to ``problems``; agents with
    problems are left out of the result.
    """
    return AgentReader(problems, user_lookup or pwd_lookup, patterns or Compiler()).agents(node)


def pwd_lookup(name: str) -> int:
    """The uid of a user of this host (the default UserLookup)."""
    return pwd.getpwnam(name).pw_uid


class AgentReader:
    """Validates agents list nodes, adding every problem to one Problems."""

    def __init__(self, problems: Problems, user_lookup: UserLookup, patterns: Compiler) -> None:
        self.problems = problems
        self.user_lookup = user_lookup
        self.patterns = patterns

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
