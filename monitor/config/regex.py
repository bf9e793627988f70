"""Linear-time regular expressions for the patterns that are matched against agent input.

Policy ``argv`` rules and config ``cmdline`` matchers are written by the host owner but
matched against command lines an agent chooses. A backtracking engine (Python's ``re``)
takes exponential time on patterns such as ``(a+)+$``: one exec froze the event loop for
68 s. Every such pattern is compiled here with RE2 (google-re2), which matches in time
linear in the text. What RE2 cannot do (backreferences, lookaround, possessive quantifiers,
atomic groups, verbose mode...) is refused with a reason that says what to write instead,
so ``policy check`` and ``config check`` name the pattern and why.

Text is matched as UTF-8. Bytes of a command line that were not UTF-8 (decoded with
surrogateescape, as monitor/kernel/abi.py and monitor/sessions/procfs.py do) are matched
as U+FFFD, the replacement character: ``.`` and ``[^ ]`` match them like any other
character, and ``\\x{FFFD}`` names them.

Bounds, per file: each compiled pattern may use at most ``MAX_PATTERN_MEMORY`` (RE2's
``max_mem``: the program and its DFA cache), be at most ``MAX_PATTERN_CHARS`` long, at most
``MAX_PATTERNS`` distinct patterns are compiled and compiling them may take at most
``MAX_COMPILE_SECONDS``.

This module must never fall back to a backtracking engine, never let RE2 log to stderr,
and never do work on import.
"""

from __future__ import annotations

import re as _stdlib_re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import re2

MAX_PATTERN_MEMORY = 1 << 20  # bytes of RE2 memory per pattern (program + DFA cache)
MAX_PATTERN_CHARS = 16384
MAX_PATTERNS = 1000  # distinct patterns compiled per file
MAX_COMPILE_SECONDS = 5.0  # compiling every pattern of one file
MAX_SHOWN = 80  # characters of a pattern quoted in an error message

_UNANCHORED = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)

# lone surrogates (U+D800..U+DFFF) are what surrogateescape decoding leaves for bytes that
# were not UTF-8: each is matched as U+FFFD
_SURROGATES = {code: "\ufffd" for code in range(0xD800, 0xE000)}

# RE2's message -> what the construct is, and what to write instead
_HINTS: tuple[tuple[str, str], ...] = (
    (r"invalid perl operator: \(\?<?[=!]",
     "lookaround ((?=...), (?!...), (?<=...), (?<!...)) is not supported; match what is "
     "there instead, or split the rule in two"),
    (r"invalid perl operator: \(\?>", "atomic groups ((?>...)) are not supported"),
    (r"invalid perl operator: \(\?P$", "(?P=name) backreferences and (?P>name) recursion "
     "are not supported; a named group is written (?P<name>...)"),
    (r"invalid perl operator: \(\?[-imsU]*x",
     "verbose mode ((?x)) is not supported; write the pattern without spaces and comments"),
    (r"invalid escape sequence: \\[1-9]", "backreferences (\\1 ... \\9) are not supported"),
    (r"invalid escape sequence: \\Z", "\\Z is not supported: write \\z for the end of the text"),
    (r"invalid escape sequence: \\[Gg]", "\\G and \\g are not supported"),
    (r"bad repetition operator: [*+?}]\+",
     "possessive quantifiers (*+, ++, ?+, {n}+) are not supported; RE2 never backtracks, "
     "so write the plain quantifier"),
    (r"invalid repetition size", "counted repetitions above {1000} are not supported"),
    (r"pattern too large",
     f"the compiled pattern needs more than {MAX_PATTERN_MEMORY >> 20} MiB; simplify it "
     "(a counted repetition such as {500} multiplies the size of what it repeats)"),
)


def to_utf8(text: str) -> bytes:
    """text as the UTF-8 bytes RE2 matches: lone surrogates (non-UTF-8 bytes) as U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.translate(_SURROGATES).encode("utf-8")


def shown(pattern: str) -> str:
    """The pattern quoted for an error message, cut to MAX_SHOWN characters."""
    if len(pattern) <= MAX_SHOWN:
        return repr(pattern)
    return repr(pattern[:MAX_SHOWN]) + f"... ({len(pattern)} characters)"


@dataclass(frozen=True)
class Regex:
    """A compiled pattern. Equal (and hashed) by its text.

    ``search(text)`` is like ``re.search``: the pattern may match anywhere in the text; it
    returns a true value (a match) or None. Text may be str (surrogateescape allowed) or
    already-encoded bytes (see to_utf8).
    """

    pattern: str
    _compiled: Any = field(compare=False, repr=False)
    _match: Any = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # The binding's RE2 object, when it has one, answers in one call: about 0.7 us for
        # a short command line here, against 2 us through re2's search(), which builds a
        # generator and a match object (bench/hotpath.py's exec records: one search each).
        # tests/unit/test_policy.py checks that both give the same answers.
        raw = getattr(self._compiled, "_regexp", None)
        match = getattr(raw, "Match", None)
        object.__setattr__(self, "_match", match if _UNANCHORED is not None else None)

    def search(self, text: str | bytes) -> object | None:
        data = text if isinstance(text, bytes) else to_utf8(text)
        if self._match is None:
            result: object | None = self._compiled.search(data)
            return result
        span = self._match(_UNANCHORED, data, 0, len(data))[0]
        return span if span[0] >= 0 else None  # (start, end) of the match, in bytes


class PatternError(ValueError):
    """A pattern was refused; str() is the reason, without the file location."""


def explain(pattern: str, message: str) -> str:
    """The reason a pattern was refused, from RE2's error message."""
    why = message
    for found, hint in _HINTS:
        if _stdlib_re.match(found, message):
            why = hint
            break
    return (f"refused regular expression {shown(pattern)}: {why} (RE2 syntax, which matches "
            "in linear time; see docs/policy.md, \"Regular expressions\")")


def _options() -> Any:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False
    options.never_capture = True  # only whether it matches: no submatch pass after the DFA
    return options


def _compile(pattern: str) -> Regex:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"refused regular expression {shown(pattern)}: longer than "
                           f"{MAX_PATTERN_CHARS} characters")
    try:
        compiled = re2.compile(to_utf8(pattern), _options())
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        text = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        raise PatternError(explain(pattern, text)) from None
    return Regex(pattern, compiled)


class Compiler:
    """Compiles the patterns of one file: each distinct text once (also a refused one),
    within MAX_PATTERNS and MAX_COMPILE_SECONDS."""

    def __init__(self, *, max_patterns: int = MAX_PATTERNS,
                 max_seconds: float = MAX_COMPILE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_patterns = max_patterns
        self.max_seconds = max_seconds
        self.clock = clock
        self._done: dict[str, Regex | PatternError] = {}
        self._spent = 0.0

    def compile(self, pattern: str) -> Regex:
        """The compiled pattern; raises PatternError saying why it was refused."""
        done = self._done.get(pattern)
        if done is None:
            if len(self._done) >= self.max_patterns:
                raise PatternError(f"refused regular expression {shown(pattern)}: more than "
                                   f"{self.max_patterns} distinct patterns in one file")
            if self._spent > self.max_seconds:
                raise PatternError(f"refused regular expression {shown(pattern)}: compiling "
                                   f"this file's patterns took more than {self.max_seconds:g} "
                                   "s; simplify them")
            start = self.clock()
            try:
                done = _compile(pattern)
            except PatternError as exc:
                done = exc
            self._spent += self.clock() - start
            self._done[pattern] = done
        if isinstance(done, PatternError):
            raise PatternError(str(done))
        return done


def compile_pattern(pattern: str) -> Regex:
    """One pattern on its own (tests, tools); raises PatternError if refused."""
    return Compiler().compile(pattern)
