"""The client side of the control socket, used by `agentwatch exec`, `trace`, `top`,
`status`, `killswitch` and the others: one request and its reply, or the event stream.

Every failure to reach or understand the monitor is a ControlError with one sentence
saying what to do. It never retries a request that reached the monitor, and reads at
most MAX_REPLY bytes of a reply line.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from monitor.model.errors import ControlError
from monitor.service.wire import BUSY

MAX_REPLY = 64 * 1024 * 1024  # what a client reads of one reply line


def request(path: str | Path, req: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
    """Send one request; return the reply, or raise ControlError with the monitor's reason.

    A refusal because every handler was busy (wire.BUSY: nothing ran) is sent again after a
    short, growing pause until `timeout` is up, so a burst of requests is answered rather
    than refused; any other refusal is final."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        reply = _exchange(path, req, max(deadline - time.monotonic(), 0.1))
        if reply.get("ok"):
            return reply
        error = str(reply.get("error", "request refused"))
        if not error.startswith(BUSY) or time.monotonic() + pause > deadline:
            raise ControlError(error)
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def answers(path: str | Path) -> bool:
    """Whether a monitor listens on `path` and replies, whatever the reply (a busy one
    still refuses with a reason): a second monitor must not take its socket."""
    try:
        _exchange(path, {"op": "ping"}, timeout=1)
    except ControlError:
        return False
    return True


def _exchange(path: str | Path, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request line out, one reply line back (either may be a refusal)."""
    with _connect(path, timeout) as s:
        try:
            try:
                s.sendall((json.dumps(req) + "\n").encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the monitor may have refused us already: its reason is still readable
            reply = _read_reply(s)
        except OSError as e:  # includes TimeoutError: accepted but never answered
            raise ControlError(f"the monitor on {path} did not answer ({e or 'timed out'})"
                               ) from None
    return reply


def stream(path: str | Path) -> Generator[dict[str, Any], None, None]:
    """Subscribe to the monitor's event stream (connects now, raises ControlError if it
    cannot); the returned generator yields one dict per event (close() it to hang up)."""
    s = _connect(path, 5)
    try:
        s.sendall(b'{"op": "subscribe"}\n')
        f = s.makefile("rb")
        first = json.loads(f.readline() or b"{}")
    except (OSError, json.JSONDecodeError) as e:
        s.close()
        raise ControlError(f"subscription to {path} failed: {e}") from None
    if not first.get("ok"):
        s.close()
        raise ControlError(str(first.get("error", "subscription refused")))
    s.settimeout(None)

    def lines() -> Generator[dict[str, Any], None, None]:
        try:
            for line in f:
                yield json.loads(line)
        finally:
            s.close()

    return lines()


def _connect(path: str | Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                s.connect(str(path))
                break
            except BlockingIOError:  # the backlog is full (many clients at once): retry
                if time.monotonic() > deadline:
                    raise ControlError(f"the monitor on {path} is too busy to accept a "
                                       "connection: try again") from None
                time.sleep(0.01)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        s.close()
        raise ControlError(f"no agentwatch monitor is listening on {path} ({e.strerror}): "
                           "start one with `agentwatch run` or `systemctl start agentwatch`"
                           ) from None
    except PermissionError:
        s.close()
        raise ControlError(f"permission denied on {path}: the control socket is root-only"
                           ) from None
    return s


def _read_reply(s: socket.socket) -> dict[str, Any]:
    with s.makefile("rb") as f:
        raw = f.readline(MAX_REPLY)
    line = raw.decode("utf-8", "replace")
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        raise ControlError(f"the monitor sent a malformed reply: {line[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError("the monitor sent a malformed reply")
    return reply
