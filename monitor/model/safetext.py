"""Agent-supplied text made safe to show: on a terminal, in a log line, as a metric label.

A comm, an exec path, an argv element, a connect reason: an agent chooses every byte of
them. Written raw to a terminal, ESC [ 2 J clears the operator's screen, OSC 0 sets the
window title, a C1 CSI (U+009B) does the same on terminals that honour C1, a carriage
return or backspace overwrites what came before, U+202E reverses what follows, and a
newline forges a whole line of `trace` output. `printable()` turns any string into one
line of text that shows every such character as a visible escape instead:

- ``\\`` becomes ``\\\\``, so an escape in the output is never one the agent typed;
- C0 controls, DEL, newline, tab and carriage return become ``\\n``, ``\\t``, ``\\r`` or ``\\xNN``;
- every other character Python does not call printable (C1 controls, bidi and other
  format characters, line and paragraph separators, non-ASCII spaces, private-use and
  unassigned code points) becomes ``\\uNNNN`` or ``\\UNNNNNNNN``;
- lone surrogates U+DC80..U+DCFF (bytes that were not UTF-8, decoded with
  surrogateescape) become ``\\xNN``, the byte they stand for; other lone surrogates
  ``\\udNNN``.

The result never holds a control character or a surrogate, so it encodes to UTF-8 and
prints on any stream. It is not markup-safe for rich: give it to rich as a `Text`, never
as a markup string. Pure functions; this module never writes anywhere.
"""

from __future__ import annotations

ELLIPSIS = "…"
LABEL_MAX = 64  # characters of a metric label value made from agent text (label_value)

_SHORT = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x80 or 0xDC80 <= code <= 0xDCFF:  # C0/DEL, or a byte kept by surrogateescape
        return f"\\x{code & 0xFF:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _safe(ch: str) -> bool:
    return ch != "\\" and ch.isprintable()


def printable(text: str, limit: int | None = None, *, backslash: bool = True) -> str:
    """text with every control, format, separator and surrogate character (and the
    backslash) written as a visible escape; see the module docstring. With `limit` (1 or
    more), at most that many characters come out: a longer result is cut at a whole
    escape and ends with an ellipsis; only the part shown is looked at. backslash=False
    leaves backslashes as they are: for messages of our own that quote values with repr()
    (already escaped once), where doubling them would only garble the quoted value."""
    if ("\\" not in text or not backslash) and text.isprintable():  # common case, C speed
        if limit is None or len(text) <= limit:
            return text
        return text[:limit - len(ELLIPSIS)] + ELLIPSIS

    def safe(ch: str) -> bool:
        return _safe(ch) or (ch == "\\" and not backslash)

    if limit is None:
        return "".join(ch if safe(ch) else _escape(ch) for ch in text)
    out: list[str] = []
    size = 0
    for ch in text:
        piece = ch if safe(ch) else _escape(ch)
        size += len(piece)
        if size > limit:
            break
        out.append(piece)
    else:
        return "".join(out)
    size -= len(piece)
    while out and size + len(ELLIPSIS) > limit:
        size -= len(out.pop())
    return "".join(out) + ELLIPSIS


def label_value(text: str, limit: int = LABEL_MAX) -> str:
    """A Prometheus label value made from agent text: printable() (so no ESC, newline or
    other control reaches a scrape, a Grafana legend or an alert), at most `limit`
    characters, and always encodable as UTF-8."""
    return printable(text, limit)
