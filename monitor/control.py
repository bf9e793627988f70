"""The root-only control socket: one JSON object per line in, one per line out.

The server checks the peer's credentials (SO_PEERCRED) on every connection and refuses
anyone but root; a malformed request gets a clear refusal and changes nothing. It never
runs a handler for an unknown operation. `subscribe` turns the connection into a stream of
event lines. The client side is used by `agentwatch exec` and `agentwatch trace`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from monitor.errors import ControlError

Handler = Callable[[dict[str, Any], int], dict[str, Any]]
MAX_REQUEST = 64 * 1024


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Subscribers:
    """Connections that asked for the event stream; slow ones are dropped, never waited on."""

    def __init__(self) -> None:
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self._conns)

    def add(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with self._lock:
            self._conns.append(conn)

    def send(self, line: str) -> None:
        data = (line + "\n").encode()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.send(data)
                except BlockingIOError:
                    self.dropped += 1
                except OSError:
                    self._conns.remove(conn)
                    conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


class ControlServer:
    """Serves requests on a Unix socket in a background thread."""

    def __init__(self, path: str | Path, handlers: dict[str, Handler],
                 subscribers: Subscribers | None = None) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.subscribers = subscribers if subscribers is not None else Subscribers()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise ControlError(f"another agentwatch monitor is already serving {self.path}")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="agentwatch-control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.subscribers.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            keep = False
            try:
                keep = self._handle(conn)
            except OSError:
                pass
            finally:
                if not keep:
                    conn.close()

    def _handle(self, conn: socket.socket) -> bool:
        conn.settimeout(2)
        pid, uid, _ = peer_credentials(conn)
        line = _read_line(conn)  # read first, so a refused client can still read why
        if uid != 0:
            _reply(conn, {"ok": False, "error": "permission denied: the control socket "
                                                "accepts root only"})
            return False
        try:
            req = json.loads(line) if line else None
        except json.JSONDecodeError as e:
            _reply(conn, {"ok": False, "error": f"malformed request: not JSON ({e.msg} at "
                                                f"column {e.colno})"})
            return False
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            _reply(conn, {"ok": False, "error": "malformed request: expected a JSON object "
                                                "with a string 'op'"})
            return False
        op = req["op"]
        if op == "subscribe":
            self.subscribers.add(conn)  # before the reply: no event falls in between
            conn.setblocking(True)
            _reply(conn, {"ok": True})
            conn.setblocking(False)
            return True
        handler = self.handlers.get(op)
        if handler is None:
            known = ", ".join(sorted([*self.handlers, "subscribe"]))
            _reply(conn, {"ok": False, "error": f"unknown op {op!r} (known: {known})"})
            return False
        try:
            reply = handler(req, pid)
        except Exception as e:  # a handler bug must not take the control thread down
            reply = {"ok": False, "error": f"internal error in {op!r}: {e!r}"}
        _reply(conn, reply)
        return False


def _read_line(conn: socket.socket) -> str:
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace")


def _reply(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall((json.dumps(obj) + "\n").encode())


def _answers(path: Path) -> bool:
    try:
        request(path, {"op": "ping"}, timeout=1)
    except ControlError:
        return False
    return True


def request(path: str | Path, req: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
    """Send one request; return the reply, or raise ControlError with the monitor's reason."""
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
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request refused")))
    return reply


def stream(path: str | Path) -> Iterator[dict[str, Any]]:
    """Subscribe to the monitor's event stream (connects now, raises ControlError if it
    cannot); the returned iterator yields one dict per event."""
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

    def lines() -> Iterator[dict[str, Any]]:
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
    line = _read_line(s)
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        raise ControlError(f"the monitor sent a malformed reply: {line[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError("the monitor sent a malformed reply")
    return reply
