"""YAML text to a node tree, in one pass over the parser's events, within limits.

A config or policy file may be hostile or broken: a "billion laughs" of a few hundred
bytes expands to gigabytes, a 100,000-deep nesting overflowed PyYAML's recursive composer,
and a FIFO or a huge file never finishes. This module parses with libyaml's C parser when
PyYAML has it (``yaml.__with_libyaml__``; the pure-Python parser otherwise) and builds
PyYAML's nodes from the event stream itself, without recursion, checking every limit of
YamlLimits as it goes: text size, nesting depth, number of aliases, the size of the
document with every alias expanded, and wall time. It stops at the first limit reached,
at that line, before the rest is read.

Tags are resolved as ``yaml.safe_load`` resolves them. Aliases share their node (as
PyYAML's composer does), so the tree is as big as the text; consumers that expand
aliases are bounded by the expanded-size limit.

This module must never construct Python objects from tags (it only builds nodes), never
recurse per level of nesting, never raise anything but ConfigError, and never put a
node or a long piece of the text into an error message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn, cast

import yaml
from yaml.error import Mark
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    DocumentStartEvent,
    Event,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
)
from yaml.nodes import CollectionNode, MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from monitor.model.errors import ConfigError, Location

LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = (
    yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader)
"""libyaml's C parser where PyYAML was built with it (events ~15x faster), else Python."""
MAX_REASON = 200  # characters of a parser's message kept in a problem
_CHECK_EVERY = 1024  # events between two looks at the clock


@dataclass(frozen=True)
class YamlLimits:
    """What one YAML document may be. The defaults are documented in docs/config.md."""

    max_bytes: int = 1 << 20  # of UTF-8 text
    max_depth: int = 64  # nested mappings and lists
    max_aliases: int = 1000  # *alias and <<: *merge references
    max_expanded: int = 4 << 20  # every alias expanded: 1 per node + each scalar's length
    max_number_chars: int = 100  # an int or float scalar
    max_seconds: float = 10.0  # parsing and building the tree


LIMITS = YamlLimits()


class _Open:
    """A collection being built: its node, its expanded size so far, a pending key."""

    __slots__ = ("node", "size", "anchor", "key")

    def __init__(self, node: CollectionNode, anchor: str | None) -> None:
        self.node = node
        self.size = 1
        self.anchor = anchor
        self.key: yaml.Node | None = None


def compose(text: str, source: str, *, limits: YamlLimits = LIMITS,
            clock: Callable[[], float] = time.monotonic,
            deadline: float | None = None) -> yaml.Node | None:
    """The root node of the one YAML document in text (None when it is empty).

    Raises ConfigError (one problem: file, line, reason) for syntax errors, more than one
    document, undefined or duplicate anchors and any limit passed. The time limit runs
    from deadline when given (a caller that goes on working on the tree), else from now.
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
    try:
        if deadline is None:
            deadline = clock() + limits.max_seconds
        composer = _Composer(source, limits, clock, deadline)
        return composer.run(yaml.parse(text, Loader=LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        reason = f"YAML syntax error: {_short(exc.problem or exc.context or 'malformed')}"
        if exc.context and exc.problem and exc.context_mark is not None:
            context = f"{_short(exc.context)} (line {exc.context_mark.line + 1})"
            reason = f"YAML syntax error: {context}: {_short(exc.problem)}"
        _refuse(source, line, reason)
    except yaml.reader.ReaderError as exc:
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else "character"
        _refuse(source, _line_at(text, exc.position),
                f"YAML error: unacceptable character {what}: {_short(exc.reason)}")
    except yaml.YAMLError as exc:
        _refuse(source, 0, f"YAML error: {_short(str(exc))}")


class _Composer:
    """PyYAML's Composer, made iterative and bounded."""

    def __init__(self, source: str, limits: YamlLimits, clock: Callable[[], float],
                 deadline: float) -> None:
        self.source = source
        self.limits = limits
        self.clock = clock
        self.deadline = deadline
        self.resolver = Resolver()
        self.anchors: dict[str, tuple[yaml.Node, int]] = {}  # node, expanded size
        self.open: list[_Open] = []
        self.total = 0  # expanded size of everything so far
        self.aliases = 0
        self.root: yaml.Node | None = None
        self.documents = 0

    def refuse(self, event: Event, reason: str) -> NoReturn:
        _refuse(self.source, _line(event), reason)

    def run(self, events: Iterable[Event]) -> yaml.Node | None:
        for count, event in enumerate(events):
            if count % _CHECK_EVERY == 0 and self.clock() > self.deadline:
                self.refuse(event, f"parsing took longer than {self.limits.max_seconds:g} s")
            if isinstance(event, ScalarEvent):
                self.scalar(event)
            elif isinstance(event, SequenceStartEvent | MappingStartEvent):
                self.start(event)
            elif isinstance(event, CollectionEndEvent):
                self.end(event)
            elif isinstance(event, AliasEvent):
                self.alias(event)
            elif isinstance(event, DocumentStartEvent):
                self.documents += 1
                if self.documents > 1:
                    self.refuse(event, "more than one YAML document (a '---' line starts a "
                                "second one): give one document per file")
                self.anchors.clear()
        return self.root

    def scalar(self, event: ScalarEvent) -> None:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolver.resolve(ScalarNode, event.value, event.implicit)
        node = ScalarNode(tag, event.value, _mark(event.start_mark), _mark(event.end_mark),
                          style=event.style)
        self.done(event, node, event.anchor, 1 + len(event.value))

    def start(self, event: SequenceStartEvent | MappingStartEvent) -> None:
        if len(self.open) >= self.limits.max_depth:
            self.refuse(event, f"nested deeper than {self.limits.max_depth} levels of "
                        "mappings and lists")
        tag = event.tag
        node: CollectionNode
        if isinstance(event, SequenceStartEvent):
            if tag is None or tag == "!":
                tag = self.resolver.resolve(SequenceNode, None, event.implicit)
            node = SequenceNode(tag, [], _mark(event.start_mark), None,
                                flow_style=event.flow_style)
        else:
            if tag is None or tag == "!":
                tag = self.resolver.resolve(MappingNode, None, event.implicit)
            node = MappingNode(tag, [], _mark(event.start_mark), None,
                               flow_style=event.flow_style)
        if event.anchor is not None:
            self.anchor(event, event.anchor, node, 0)  # a recursive alias sees it (size 0)
        self.open.append(_Open(node, event.anchor))
        self.grow(event, 1)

    def end(self, event: CollectionEndEvent) -> None:
        done = self.open.pop()
        done.node.end_mark = _mark(event.end_mark)
        if done.anchor is not None:
            self.anchors[done.anchor] = (done.node, done.size)
        self.attach(done.node, done.size)

    def alias(self, event: AliasEvent) -> None:
        self.aliases += 1
        if self.aliases > self.limits.max_aliases:
            self.refuse(event, f"more than {self.limits.max_aliases} aliases (*name)")
        found = self.anchors.get(event.anchor or "")
        if found is None:
            self.refuse(event, f"found undefined alias {_short(repr(event.anchor))}")
        node, size = found
        self.grow(event, size)
        self.attach(node, size)

    def done(self, event: Event, node: yaml.Node, anchor: str | None, size: int) -> None:
        if anchor is not None:
            self.anchor(event, anchor, node, size)
        self.grow(event, size)
        self.attach(node, size)

    def anchor(self, event: Event, name: str, node: yaml.Node, size: int) -> None:
        if name in self.anchors:
            first = self.anchors[name][0].start_mark.line + 1
            self.refuse(event, f"duplicate anchor &{_short(name)} (first on line {first})")
        self.anchors[name] = (node, size)

    def grow(self, event: Event, size: int) -> None:
        self.total += size
        if self.total > self.limits.max_expanded:
            self.refuse(event, "with its aliases expanded the document is larger than "
                        f"{self.limits.max_expanded >> 20} MiB (a YAML bomb?); use fewer "
                        "aliases")

    def attach(self, node: yaml.Node, size: int) -> None:
        """Put a finished node into the collection being built (or make it the root)."""
        if not self.open:
            self.root = node
            return
        parent = self.open[-1]
        parent.size += size
        if isinstance(parent.node, SequenceNode):
            parent.node.value.append(node)
        elif parent.key is None:
            parent.key = node
        else:
            parent.node.value.append((parent.key, node))
            parent.key = None


def _mark(mark: object) -> Mark | None:
    """The C parser's marks (yaml._yaml.Mark) serve nodes as well as yaml.error.Mark."""
    return cast(Mark | None, mark)


def _line(event: Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


def _refuse(source: str, line: int, reason: str) -> NoReturn:
    raise ConfigError([(Location(source, line), reason)])


def _too_big(size: int, limits: YamlLimits, unit: str) -> str:
    return f"larger than {limits.max_bytes >> 20} MiB ({size} {unit}); split it or trim it"


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, max(position, 0)) + 1


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."
