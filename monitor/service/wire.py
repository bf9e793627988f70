"""The control socket's wire format: the bounds on a request and parsing one, and encoding
a reply line.

A request is bounded before it is parsed: one line of at most MAX_REQUEST bytes, UTF-8,
nested at most MAX_DEPTH deep, integers of at most MAX_DIGITS digits, no NaN or Infinity;
anything else is a RequestError whose message is the refusal sent back. Pure: bytes in,
a dict or an error out, in time and memory bounded whatever the bytes. Never touches a
socket.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_REQUEST = 64 * 1024  # bytes in one request line
MAX_DEPTH = 16  # arrays and objects nested in a request
BUSY = "the monitor is busy"
"""How a refusal for want of a free handler starts: no handler ran, so it may be sent again."""
MAX_DIGITS = 20  # digits of an integer in a request (a 64-bit one has at most 20)


class RequestError(ValueError):
    """A request refused before any handler saw it; the message is the reply's error."""


_NOT_A_REQUEST = "malformed request: expected a JSON object with a string 'op'"


# strings (skipped whole, possessively: no backtracking) and the brackets between them
_STRUCTURE = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


def _depth_exceeds(text: str, limit: int) -> bool:
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _STRUCTURE.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise RequestError(f"malformed request: a number of more than {MAX_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError("malformed request: a number out of range")
    return value


def _constant(text: str) -> Any:
    raise RequestError(f"malformed request: {text} is not JSON")


def parse_request(line: bytes) -> dict[str, Any]:
    """The request object of one line (without its newline), or RequestError saying why
    not. Bounded in time and memory whatever the bytes: the length, nesting and number
    sizes are checked before or while parsing, never after."""
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request too long: more than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"malformed request: not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise RequestError(_NOT_A_REQUEST)
    if _depth_exceeds(text, MAX_DEPTH):
        raise RequestError(f"malformed request: nested deeper than {MAX_DEPTH} levels")
    try:
        req = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RequestError:
        raise
    except json.JSONDecodeError as e:
        raise RequestError(f"malformed request: not JSON ({e.msg} at column {e.colno})"
                           ) from None
    except (ValueError, RecursionError) as e:  # whatever the bounds above missed
        raise RequestError(f"malformed request: {type(e).__name__}") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise RequestError(_NOT_A_REQUEST)
    return req


def line_of(obj: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(obj, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:  # a handler's reply that JSON cannot carry
        return (json.dumps({"ok": False, "error": f"internal error: unencodable reply ({e})"})
                + "\n").encode()
