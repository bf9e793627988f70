"""Strict YAML reading with line numbers, shared by the config and policy loaders.

YAML text is composed with PyYAML's safe composer and the node tree is walked here, so
every mapping key and every value knows the 1-based line it came from. Scalars are
resolved like ``yaml.safe_load`` would (str, int, float, bool, None; timestamps stay
strings). Duplicate keys, non-string keys and unsupported tags are errors. The helpers
at the bottom let a validator check a mapping against its allowed keys and collect every
problem before raising one ConfigError.

Every parse is bounded (YamlLimits): text size, nesting depth, number of aliases, the size
of the document with every alias expanded (billion laughs), the length of a number, and
wall time. The limits are checked on the event stream before any node tree is built, so a
document past them costs one pass of the parser and is refused with its line. libyaml's C
parser is used where PyYAML has it (``yaml.__with_libyaml__``), the pure-Python one
otherwise.

This module must never construct arbitrary Python objects (no ``yaml.load`` with an
unsafe loader), never raise at the first problem when more can be found, never put a
node tree into an error message (a Node's repr is one line), never raise anything but
ConfigError for bad input, and never import anything heavy: unit tests use it without root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, TypeAlias

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    Event,
    ScalarEvent,
)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from monitor.errors import ConfigError, Location

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
MAX_REASON = 200  # characters of a parser's message kept in a problem

LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = (
    yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader)
"""libyaml's C loader where PyYAML was built with it (~30x faster), else pure Python."""


@dataclass(frozen=True)
class YamlLimits:
    """What one YAML document may be. The defaults are documented in docs/config.md."""

    max_bytes: int = 1 << 20  # of UTF-8 text
    max_depth: int = 64  # nested mappings and lists
    max_aliases: int = 1000  # *alias and <<: *merge references
    max_expanded: int = 4 << 20  # every alias expanded: 1 per node + each scalar's length
    max_number_chars: int = 100  # an int or float scalar
    max_seconds: float = 5.0  # parsing (both passes)


LIMITS = YamlLimits()


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


class _Walker:
    """Turns a composed yaml node tree into Nodes, collecting structural problems."""

    def __init__(self, problems: Problems, limits: YamlLimits) -> None:
        self.problems = problems
        self.limits = limits
        self.constructor = SafeConstructor()
        self.done: dict[int, Node] = {}  # id(yaml node) -> Node, so aliases are shared
        self.active: set[int] = set()  # yaml nodes being walked, to catch recursive aliases

    def walk(self, node: yaml.Node, path: str) -> Node:
        line = node.start_mark.line + 1
        if id(node) in self.done:
            return self.done[id(node)]
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
                self.problems.add(line, path, f"unsupported YAML tag {node.tag!r}")
            return Node([self.walk(item, child_path(path, i))
                         for i, item in enumerate(node.value)], line)
        if isinstance(node, MappingNode):
            if node.tag != _MAP:
                self.problems.add(line, path, f"unsupported YAML tag {node.tag!r}")
            values: dict[str, Node] = {}
            key_lines: dict[str, int] = {}
            self.mapping(node, path, values, key_lines, merged=False)
            return Node(values, line, key_lines)
        self.problems.add(line, path, f"unsupported YAML node {type(node).__name__}")
        return Node(None, line)

    def scalar(self, node: ScalarNode, path: str) -> Scalar:
        line = node.start_mark.line + 1
        if node.tag not in _SCALAR_TAGS:
            self.problems.add(line, path, f"unsupported YAML tag {node.tag!r}")
            return None
        if node.tag == _TIMESTAMP:
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
            reason = _short(detail) if detail else f"{shown(node.value)} is not a {kind}"
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
    if len(text) > limits.max_bytes:  # each character is at least one byte
        _refuse(source, 0, _too_big(len(text), limits, "characters"))
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        _refuse(source, _line_at(text, exc.start), "not valid Unicode text (a lone "
                f"surrogate at character {exc.start})")
    if size > limits.max_bytes:
        _refuse(source, 0, _too_big(size, limits, "bytes"))
    deadline = clock() + limits.max_seconds
    try:
        _check_events(yaml.parse(text, Loader=LOADER), source, limits, clock, deadline)
        root = yaml.compose(text, Loader=LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        reason = f"YAML syntax error: {_short(exc.problem or exc.context or 'malformed')}"
        if exc.context and exc.problem and exc.context_mark is not None:
            context = f"{_short(exc.context)} (line {exc.context_mark.line + 1})"
            reason = f"YAML syntax error: {context}: {_short(exc.problem)}"
        raise ConfigError([(Location(source, line), reason)]) from None
    except yaml.reader.ReaderError as exc:
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else "character"
        _refuse(source, _line_at(text, exc.position),
                f"YAML error: unacceptable character {what}: {_short(exc.reason)}")
    except yaml.YAMLError as exc:
        _refuse(source, 0, f"YAML error: {_short(str(exc))}")
    if clock() > deadline:
        _refuse(source, 0, f"parsing took longer than {limits.max_seconds:g} s")
    if root is None:
        return Node(None, 1)
    problems = Problems(source)
    result = _Walker(problems, limits).walk(root, "")
    problems.raise_if_any()
    return result


def _check_events(events: Iterable[Event], source: str, limits: YamlLimits,
                  clock: Callable[[], float], deadline: float) -> None:
    """Refuse a document past limits from its event stream, before any tree is built.

    The expanded size counts 1 per collection, 1 + length per scalar, and for each alias
    the expanded size of what it refers to: what a consumer walking the document sees.
    """
    open_sizes: list[list[int]] = []  # the expanded size so far of each open collection
    anchors: list[str | None] = []
    sizes: dict[str, int] = {}  # anchor -> expanded size of its node
    total = aliases = 0
    for count, event in enumerate(events):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if count % 512 == 0 and clock() > deadline:
            _refuse(source, line, f"parsing took longer than {limits.max_seconds:g} s")
        size = 0
        if isinstance(event, CollectionStartEvent):
            if len(open_sizes) >= limits.max_depth:
                _refuse(source, line, f"nested deeper than {limits.max_depth} levels of "
                        "mappings and lists")
            open_sizes.append([1])
            anchors.append(event.anchor)
            total += 1
            continue
        if isinstance(event, CollectionEndEvent):
            size = open_sizes.pop()[0]
            anchor = anchors.pop()
        elif isinstance(event, ScalarEvent):
            size, anchor = 1 + len(event.value), event.anchor
            total += size
        elif isinstance(event, AliasEvent):
            aliases += 1
            if aliases > limits.max_aliases:
                _refuse(source, line, f"more than {limits.max_aliases} aliases (*name)")
            size, anchor = sizes.get(event.anchor or "", 0), None
            total += size
        else:
            continue
        if total > limits.max_expanded:
            _refuse(source, line, f"with its aliases expanded the document is larger than "
                    f"{limits.max_expanded >> 20} MiB (a YAML bomb?); use fewer aliases")
        if anchor is not None:
            sizes[anchor] = size
        if open_sizes:
            open_sizes[-1][0] += size


def _refuse(source: str, line: int, reason: str) -> NoReturn:
    raise ConfigError([(Location(source, line), reason)])


def _too_big(size: int, limits: YamlLimits, unit: str) -> str:
    return f"larger than {limits.max_bytes >> 20} MiB ({size} {unit}); split it or trim it"


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, max(position, 0)) + 1


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


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
