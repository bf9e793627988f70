"""Validate and compile a policy tree: mode, fail_closed, agents, lists and rules.

Input: the YAML node tree with lines (monitor/config/yamlsource.py). Output: the policy's
mode, agents (the config's syntax: monitor/config/validate_agents.py), rules (each match
through monitor/policy/validate_match.py), and in ``problems`` every problem with its
file, line and key path, in file order, each with a reason that says what to write
instead. monitor/policy/load.py raises them together.

This module must never read a file, evaluate an event, touch the kernel or /proc, or do
work on import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from monitor.config.regex import Compiler
from monitor.config.types import UserLookup
from monitor.config.validate_agents import parse_agents
from monitor.config.yamlsource import (
    Node,
    Problems,
    check_mapping,
    child_path,
    expect_str,
    shown,
    type_name,
)
from monitor.model.agents import AgentSpec
from monitor.policy.types import Action, EventKind, FailClosed, MatchSpec, Mode, Rule
from monitor.policy.validate_match import MatchReader

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_NAME_RULE = "1-63 characters a-z 0-9 _ . - starting with a letter or digit"
_TOP_KEYS = ("mode", "fail_closed", "agents", "lists", "rules")
_RULE_KEYS = ("name", "description", "event", "agents", "action", "match")
_REQUIRED_RULE_KEYS = {
    "name": f"give the rule a unique name ({_NAME_RULE})",
    "event": "write event: exec, connect, cpu or processes",
    "action": "write action: alert, deny, kill or kill-agent",
    "match": "write the rule's conditions under match:",
}
_E = TypeVar("_E", bound=StrEnum)


class PolicyReader(MatchReader):
    """Validates and compiles a parsed policy tree, collecting every problem."""

    def __init__(self, source: str, user_lookup: UserLookup | None) -> None:
        super().__init__(Problems(source), Compiler())
        self.user_lookup = user_lookup
        self.fail_closed = FailClosed.KILL

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
