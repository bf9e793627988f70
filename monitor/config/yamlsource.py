"""Strict YAML reading with line numbers, shared by the config and policy loaders.

YAML text is composed with PyYAML's safe composer and the node tree is walked here, so
every mapping key and every value knows the 1-based line it came from. Scalars are
resolved like ``yaml.safe_load`` would (str, int, float, bool, None; timestamps stay
strings). Duplicate keys, non-string keys and unsupported tags are errors. The helpers
at the bottom let a validator check a mapping against its allowed keys and collect every
problem before raising one ConfigError.

Every parse is bounded (YamlLimits): the node tree comes from monitor/config/yamlcompose.py,
which enforces text size, nesting depth, aliases, expanded size and time as it reads;
this module adds the length of numbers and keeps to the same deadline while it walks.

This module must never construct arbitrary Python objects (no ``yaml.load`` with an
unsafe loader), never raise at the first problem when more can be found, never put a
node tree into an error message (a Node's repr is one line), never raise anything but
ConfigError for bad input, and never import anything heavy: unit tests use it without root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from monitor.config.yamlcompose import LIMITS, YamlLimits, compose
from monitor.model.errors import ConfigError, Location

Scalar: TypeAlias = str | int | float | bool | None
NodeValue: TypeAlias = "dict[str, Node] | list[Node] | Scalar"

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_SCALAR_TAGS = frozenset(
    {_STR, "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
     "tag:yaml.org,2002:null", _TIMESTAMP}
)
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
@dataclass(frozen=True, eq=False)
class Node:
    """One YAML value and the 1-based line it starts on.

    ``value`` is a ``dict[str, Node]`` for mappings, a ``list[Node]`` for sequences and a
    plain scalar otherwise. For mappings, ``key_lines`` gives the line of every key.
    """

    value: NodeValue
    line: int
    key_lines: Mapping[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:  # one line, never the tree below (aliases share subtrees)
        if isinstance(self.value, dict | list):
            return f"<{type_name(self.value)} of {len(self.value)} at line {self.line}>"
        shown = repr(self.value)
        if len(shown) > 60:
            shown = shown[:60] + "..."
        return f"<{shown} at line {self.line}>"

    def to_python(self) -> object:
        """The plain Python value, with every Node unwrapped (recursively)."""
        if isinstance(self.value, dict):
            return {k: v.to_python() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.to_python() for v in self.value]
        return self.value


def child_path(path: str, key: str | int) -> str:
    """Key path of a child: ``a.b`` for a mapping key, ``a[0]`` for a sequence index."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    """Short name of a parsed value's type, as used in "expected ..., got X" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def shown(value: object, limit: int = 60) -> str:
    """A parsed value for an error message: a scalar's repr cut to limit characters, a
    collection only by its type (never the tree below it)."""
    if isinstance(value, dict | list):
        return f"(a {type_name(value)})"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Problems:
    """Collects problems found in one source so that all of them are reported at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[tuple[Location, str]] = []

    def add(self, line: int, key: str, reason: str) -> None:
        self.items.append((Location(self.source, line, key), reason))

    def extend(self, items: Iterable[tuple[Location, str]]) -> None:
        self.items.extend(items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        """Raise one ConfigError carrying every collected problem, sorted by line."""
        if self.items:
            raise ConfigError(sorted(self.items, key=lambda item: item[0].line))


class _TooSlow(Exception):
    """The walk went past the parse deadline."""


class _Walker:
    """Turns a composed yaml node tree into Nodes, collecting structural problems."""

    def __init__(self, problems: Problems, limits: YamlLimits, clock: Callable[[], float],
                 deadline: float) -> None:
        self.problems = problems
        self.limits = limits
        self.clock = clock
        self.deadline = deadline
        self.walked = 0
        self.constructor = SafeConstructor()
        self.done: dict[int, Node] = {}  # id(yaml node) -> Node, so aliases are shared
        self.active: set[int] = set()  # yaml nodes being walked, to catch recursive aliases

    def walk(self, node: yaml.Node, path: str) -> Node:
        line = node.start_mark.line + 1
        if id(node) in self.done:
            return self.done[id(node)]
        self.walked += 1
        if self.walked % 1024 == 0 and self.clock() > self.deadline:
            raise _TooSlow
        if id(node) in self.active:
            self.problems.add(line, path, "recursive alias is not allowed")
            return Node(None, line)
        self.active.add(id(node))
        try:
            result = self._walk(node, path, line)
        finally:
            self.active.discard(id(node))
        self.done[id(node)] = result
        return result

    def _walk(self, node: yaml.Node, path: str, line: int) -> Node:
        if isinstance(node, ScalarNode):
            return Node(self.scalar(node, path), line)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ:
                self.problems.add(line, path, f"unsupported YAML tag {shown(node.tag)}")
            return Node([self.walk(item, child_path(path, i))
                         for i, item in enumerate(node.value)], line)
        if isinstance(node, MappingNode):
            if node.tag != _MAP:
                self.problems.add(line, path, f"unsupported YAML tag {shown(node.tag)}")
            values: dict[str, Node] = {}
            key_lines: dict[str, int] = {}
            self.mapping(node, path, values, key_lines, merged=False)
            return Node(values, line, key_lines)
        self.problems.add(line, path, f"unsupported YAML node {type(node).__name__}")
        return Node(None, line)

    def scalar(self, node: ScalarNode, path: str) -> Scalar:
        line = node.start_mark.line + 1
        if node.tag not in _SCALAR_TAGS:
            self.problems.add(line, path, f"unsupported YAML tag {shown(node.tag)}")
            return None
        if node.tag in (_STR, _TIMESTAMP):  # as written (timestamps stay strings)
            return str(node.value)
        if node.tag in _NUMBER_TAGS and len(node.value) > self.limits.max_number_chars:
            self.problems.add(line, path, f"number too long ({len(node.value)} characters; "
                              f"at most {self.limits.max_number_chars})")
            return None
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, LookupError) as exc:
            # an explicit tag on a value that is not one (!!int '', !!bool x): PyYAML's
            # constructors raise IndexError, KeyError or ValueError for those
            kind = node.tag.rsplit(":", 1)[-1]
            detail = getattr(exc, "problem", None)
            reason = detail[:200] if detail else f"{shown(node.value)} is not a {kind}"
            self.problems.add(line, path, f"bad {kind} value: {reason}")
            return None
        if value is None or isinstance(value, str | int | float | bool):
            return value
        self.problems.add(line, path, f"unsupported YAML value {type_name(value)}")
        return None

    def mapping(self, node: MappingNode, path: str, values: dict[str, Node],
                key_lines: dict[str, int], *, merged: bool) -> None:
        """Fill values/key_lines from node. Merged (``<<``) keys never override."""
        merges: list[tuple[yaml.Node, str]] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE:
                merges.append((value_node, path))
                continue
            key = self.scalar(key_node, path) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                got = type_name(key) if isinstance(key_node, ScalarNode) else "a collection"
                self.problems.add(key_line, path, f"mapping keys must be strings, got {got}")
                continue
            if key in key_lines:
                if not merged:
                    self.problems.add(key_line, child_path(path, key),
                                      f"duplicate key (first given on line {key_lines[key]})")
                continue
            values[key] = self.walk(value_node, child_path(path, key))
            key_lines[key] = key_line
        for value_node, merge_path in merges:
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, MappingNode):
                    self.problems.add(source.start_mark.line + 1, merge_path,
                                      "a merge key (<<) must refer to a mapping")
                elif id(source) in self.active:
                    self.problems.add(source.start_mark.line + 1, merge_path,
                                      "recursive alias is not allowed")
                else:
                    self.active.add(id(source))
                    try:
                        self.mapping(source, merge_path, values, key_lines, merged=True)
                    finally:
                        self.active.discard(id(source))


def parse_yaml(text: str, source: str, *, limits: YamlLimits = LIMITS,
               clock: Callable[[], float] = time.monotonic) -> Node:
    """Parse one YAML document into Nodes. An empty document gives ``Node(None, 1)``.

    Raises ConfigError for syntax errors (with the line of the error), a document past
    limits, duplicate keys, non-string keys and unsupported tags; every structural
    problem is reported at once. Nothing else is raised for any text.
    """
    deadline = clock() + limits.max_seconds
    root = compose(text, source, limits=limits, clock=clock, deadline=deadline)
    if root is None:
        return Node(None, 1)
    problems = Problems(source)
    try:
        result = _Walker(problems, limits, clock, deadline).walk(root, "")
    except _TooSlow:
        raise ConfigError([(Location(source), f"parsing took longer than "
                            f"{limits.max_seconds:g} s")]) from None
    problems.raise_if_any()
    return result


# --- helpers for validators ------------------------------------------------------------


def check_mapping(node: Node, path: str, problems: Problems, *, allowed: Iterable[str],
                  required: Iterable[str] = ()) -> dict[str, Node] | None:
    """Check that node is a mapping with only allowed keys and every required key.

    Returns the mapping (also when it has unknown or missing keys, so the known keys can
    still be validated), or None when node is not a mapping at all.
    """
    if not isinstance(node.value, dict):
        problems.add(node.line, path, f"expected a mapping, got {type_name(node.value)}")
        return None
    allowed_keys = list(allowed)
    for key in node.value:
        if key not in allowed_keys:
            problems.add(node.key_lines.get(key, node.line), child_path(path, key),
                         f"unknown key {key!r} (allowed: {', '.join(allowed_keys)})")
    for key in required:
        if key not in node.value:
            problems.add(node.line, child_path(path, key), f"missing required key {key!r}")
    return node.value


def expect_list(node: Node, path: str, problems: Problems) -> list[Node] | None:
    if isinstance(node.value, list):
        return node.value
    problems.add(node.line, path, f"expected a list, got {type_name(node.value)}")
    return None


def expect_str(node: Node, path: str, problems: Problems, *,
               allow_empty: bool = False) -> str | None:
    if not isinstance(node.value, str):
        problems.add(node.line, path, f"expected a string, got {type_name(node.value)}")
        return None
    if not allow_empty and not node.value:
        problems.add(node.line, path, "must not be empty")
        return None
    return node.value


def expect_int(node: Node, path: str, problems: Problems, *, minimum: int | None = None,
               maximum: int | None = None) -> int | None:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(node.line, path, f"expected an integer, got {type_name(value)}")
        return None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        problems.add(node.line, path, f"{value} is out of range ({_range(minimum, maximum)})")
        return None
    return value


def expect_number(node: Node, path: str, problems: Problems, *,
                  minimum: float | None = None, maximum: float | None = None) -> float | None:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.add(node.line, path, f"expected a number, got {type_name(value)}")
        return None
    number = float(value)
    if not ((minimum is None or number >= minimum) and (maximum is None or number <= maximum)):
        problems.add(node.line, path, f"{value} is out of range ({_range(minimum, maximum)})")
        return None
    return number


def expect_bool(node: Node, path: str, problems: Problems) -> bool | None:
    if isinstance(node.value, bool):
        return node.value
    problems.add(node.line, path, f"expected true or false, got {type_name(node.value)}")
    return None


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"allowed: {minimum}..{maximum}"
    if minimum is not None:
        return f"must be at least {minimum}"
    return f"must be at most {maximum}"
