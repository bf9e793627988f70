"""Unit tests for monitor.model.safetext: agent text made safe for a terminal and a metric label.

A table of hostile strings an agent can put in a comm, an exec path or an argv element,
each with what an operator must see instead; then properties that hold for any string.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.model.safetext import ELLIPSIS, LABEL_MAX, label_value, printable

BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def raw(text: str) -> str:
    """The string as the decoder gives it for these bytes (bad UTF-8 kept as surrogates)."""
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


HOSTILE = [
    # (what the agent writes, what the operator sees)
    ("\x1b[2J", "\\x1b[2J"),  # clear screen
    ("\x1b[H\x1b[2J\x1b[3J", "\\x1b[H\\x1b[2J\\x1b[3J"),  # clear with scrollback
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # OSC: window title, BEL-terminated
    ("\x1b]0;owned\x1b\\", "\\x1b]0;owned\\x1b\\\\"),  # OSC, ST-terminated
    ("\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\",
     "\\x1b]8;;http://evil/\\x1b\\\\click\\x1b]8;;\\x1b\\\\"),  # OSC 8 hyperlink
    ("\x1bP+q\x1b\\", "\\x1bP+q\\x1b\\\\"),  # DCS
    ("\x9b2J", "\\u009b2J"),  # C1 CSI (valid UTF-8 U+009B)
    ("\x9d0;t\x9c", "\\u009d0;t\\u009c"),  # C1 OSC ... ST
    (raw("\x9b2J"), "\\x9b2J"),  # a raw 0x9b byte (not UTF-8): surrogateescape
    (raw("\xff\xfe"), "\\xff\\xfe"),
    ("real\rfake", "real\\rfake"),  # carriage return overwrites the line
    ("rm -rf /\b\b\b\b\b\b\b\bls    ", "rm -rf /\\x08\\x08\\x08\\x08\\x08\\x08\\x08\\x08ls    "),
    ("line\n12.000000 fake   exec", "line\\n12.000000 fake   exec"),  # forged trace line
    ("a\tb", "a\\tb"),
    ("\x00\x01\x7f", "\\x00\\x01\\x7f"),
    ("\u202etxt.exe", "\\u202etxt.exe"),  # right-to-left override
    ("\u2066x\u2069\u200b\u200d\ufeff", "\\u2066x\\u2069\\u200b\\u200d\\ufeff"),
    ("a\u2028b\u2029c\x85d", "a\\u2028b\\u2029c\\u0085d"),  # separators, NEL
    ("\U000e0041\U000f0000", "\\U000e0041\\U000f0000"),  # tag char, private use
    ("\ud800 \udfff", "\\ud800 \\udfff"),  # lone surrogates not from surrogateescape
    ("C:\\x1b", "C:\\\\x1b"),  # a typed backslash is doubled: never mistaken for an escape
    ("[/x]", "[/x]"),  # not a control: markup safety is the renderer's job (Text)
    ("[bold red]x[/]", "[bold red]x[/]"),
    ("plain /usr/bin/git", "plain /usr/bin/git"),
    ("café 日本 ✓", "café 日本 ✓"),  # printable non-ASCII stays as it is
    ("", ""),
]


@pytest.mark.parametrize(("hostile", "shown"), HOSTILE)
def test_every_hostile_character_is_a_visible_escape(hostile: str, shown: str) -> None:
    assert printable(hostile) == shown


def _clean(text: str) -> bool:
    return not any(unicodedata.category(c) in BAD_CATEGORIES for c in text)


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
def test_no_control_format_or_surrogate_character_survives(text: str) -> None:
    out = printable(text)
    assert _clean(out)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    out.encode("utf-8")  # strict: prints on any UTF-8 stream


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
def test_the_escape_is_unambiguous(text: str) -> None:
    """Python reads the escaped form back as the original (surrogateescape bytes aside)."""
    out = printable(text)
    back = out.encode("latin-1", "backslashreplace").decode("unicode_escape")
    want = "".join(chr(ord(c) - 0xDC00) if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)
    assert back == want


def test_text_without_anything_to_escape_is_returned_as_is() -> None:
    text = "/usr/lib/node_modules/.bin/tsc --project tsconfig.json"
    assert printable(text) is text


@pytest.mark.parametrize("limit", [1, 2, 5, 10, 64])
@given(text=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x3000)))
def test_a_limit_bounds_the_result_and_marks_the_cut(limit: int, text: str) -> None:
    out = printable(text, limit)
    assert len(out) <= limit
    assert _clean(out)
    full = printable(text)
    if len(full) <= limit:
        assert out == full
    else:
        assert out.endswith(ELLIPSIS)
        assert full.startswith(out[: -len(ELLIPSIS)]), "cut at a whole escape"


def test_a_cut_never_splits_an_escape() -> None:
    assert printable("ab\x1b[2J", 5) == "ab" + ELLIPSIS
    assert printable("ab\x1b[2J", 7) == "ab\\x1b" + ELLIPSIS


def test_a_huge_string_with_a_limit_is_only_read_as_far_as_shown() -> None:
    out = label_value("\x1b" * 50_000_000)  # 50 MB: a full scan would take seconds
    assert out == "\\x1b" * 15 + ELLIPSIS


@pytest.mark.parametrize(("name", "label"), [
    ("git", "git"),
    ("\x1b[2J\x1b]0;x\x07", "\\x1b[2J\\x1b]0;x\\x07"),
    ("evil\nname", "evil\\nname"),
    (raw("\xff\xfeevil"), "\\xff\\xfeevil"),
    ("x" * 300, "x" * (LABEL_MAX - 1) + ELLIPSIS),
])
def test_label_value_is_escaped_and_bounded(name: str, label: str) -> None:
    assert label_value(name) == label
    assert len(label_value(name)) <= LABEL_MAX
