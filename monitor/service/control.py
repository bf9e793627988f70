"""The root-only control socket: one JSON object per line in, one per line out.

Every connection is hostile until proven otherwise. The server pins the peer when it
accepts it (SO_PEERCRED for pid and uid, and a pidfd, so a handler can tell whether that
pid still names the process that connected), and serves root only. A request is bounded
before it is parsed: one line of at most MAX_REQUEST bytes, sent within REQUEST_SECONDS of
connecting, UTF-8, nested at most MAX_DEPTH deep, integers of at most MAX_DIGITS digits, no
NaN or Infinity. Anything else gets a one-line refusal and the connection is closed; no
handler runs for it. Requests are read by one thread for all clients (selectors), so a
client that sends nothing, or one byte a second, holds up nobody; each complete request
runs in a thread of its own, at most MAX_BUSY at once (the kill switch has its own
MAX_BUSY), and a handler's exception becomes an error reply, never a dead server.
`subscribe` turns the connection into a stream of event lines; a subscriber that cannot
keep up loses lines, never the monitor's time. It never runs a handler for an unknown
operation. Parsing a request is service/wire.py; the client side is service/client.py.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.model.errors import ControlError
from monitor.service.client import answers
from monitor.service.wire import BUSY, MAX_REQUEST, RequestError, line_of, parse_request

REQUEST_SECONDS = 5.0  # from connect to the request's newline
REPLY_SECONDS = 5.0  # for the client to take its reply
MAX_WAITING = 128  # connections still sending their request; more: the oldest is dropped
MAX_BUSY = 8  # requests being handled at once (and as many kill switch requests)
MAX_SUBSCRIBERS = 32
OP_WAIT_SECONDS = 30.0  # for the request of the same op before it to finish
SO_PEERPIDFD = 77  # Linux 6.5+: a pidfd of the process that connected


class Peer:
    """The process at the other end of a connection, pinned when it was accepted.

    `pid` is the number SO_PEERCRED gave; once that process has exited the number may name
    another one. `alive()` tells whether it still names the process that connected: the
    pidfd is the peer's own (SO_PEERPIDFD; before Linux 6.5, pidfd_open of the pid right at
    accept), and a pid is not reused while its process lives.
    """

    def __init__(self, pid: int, uid: int, gid: int, pidfd: int | None) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid
        self._pidfd = pidfd

    @classmethod
    def of(cls, conn: socket.socket) -> Peer:
        pid, uid, gid = peer_credentials(conn)
        pidfd: int | None = None
        try:
            pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError as e:
            if e.errno == errno.ENOPROTOOPT:  # an older kernel: pin the pid now
                try:
                    pidfd = os.pidfd_open(pid) if pid > 0 else None
                except OSError:
                    pidfd = None  # gone already
            # any other error: the peer has exited already (its pidfd cannot be had)
        return cls(pid, uid, gid, pidfd)

    def alive(self) -> bool:
        """Whether the process that connected is still running (so `pid` is still its)."""
        if self._pidfd is None:
            return False
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)  # a pidfd turns readable when its process exits

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


Handler = Callable[[dict[str, Any], Peer], dict[str, Any]]
Log = Callable[..., None]


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _refuse(conn: socket.socket, error: str) -> None:
    """Best effort, never blocking: one error line (it fits an empty socket buffer)."""
    try:
        conn.send(line_of({"ok": False, "error": error}))
    except OSError:
        pass  # the client is gone or stuck: closing is all that is left to do
    conn.close()


# --- the event stream -------------------------------------------------------------------


class Subscribers:
    """Connections that asked for the event stream; slow ones lose lines, never wait.

    A line the socket took only part of is finished before the next line is sent, so a
    reader never sees a broken line.
    """

    def __init__(self, limit: int = MAX_SUBSCRIBERS) -> None:
        self._conns: dict[socket.socket, bytes] = {}  # connection -> unsent end of a line
        self._lock = threading.Lock()
        self.limit = limit
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self._conns)

    def add(self, conn: socket.socket, first: bytes = b"") -> bool:
        """Send `first` (the reply to subscribe) and add conn; False when full."""
        conn.setblocking(False)
        with self._lock:  # no event line can come before `first`
            if len(self._conns) >= self.limit:
                return False
            self._conns[conn] = first
            try:
                self._flush(conn)
            except OSError:  # gone already (an empty socket buffer takes a short line)
                del self._conns[conn]
                conn.close()
        return True

    def _flush(self, conn: socket.socket) -> bool:
        """Send what is left of conn's last line; True when nothing is left."""
        tail = self._conns[conn]
        if tail:
            sent = conn.send(tail)
            self._conns[conn] = tail = tail[sent:]
        return not tail

    def send(self, line: str) -> None:
        data = (line + "\n").encode()
        with self._lock:
            for conn in list(self._conns):
                try:
                    if not self._flush(conn):
                        self.dropped += 1
                        continue
                    sent = conn.send(data)
                    if sent < len(data):
                        self._conns[conn] = data[sent:]
                except BlockingIOError:
                    self.dropped += 1
                except OSError:
                    del self._conns[conn]
                    conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


# --- the server ---------------------------------------------------------------------------


@dataclass
class _Waiting:
    """A connection whose request has not fully arrived yet."""

    conn: socket.socket
    peer: Peer
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


class ControlServer:
    """Serves requests on a Unix socket: one thread reads every client's request, a
    thread per request runs its handler."""

    def __init__(self, path: str | Path, handlers: dict[str, Handler],
                 subscribers: Subscribers | None = None, *, log: Log | None = None,
                 request_seconds: float = REQUEST_SECONDS,
                 reply_seconds: float = REPLY_SECONDS) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.subscribers = subscribers if subscribers is not None else Subscribers()
        self.log = log
        self.request_seconds = request_seconds
        self.reply_seconds = reply_seconds
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._waiting: dict[socket.socket, _Waiting] = {}  # oldest first
        self._slots = threading.BoundedSemaphore(MAX_BUSY)
        self._kill_slots = threading.BoundedSemaphore(MAX_BUSY)
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._logged: dict[str, float] = {}
        # requests of one op run one at a time, as when one thread served them all; other
        # ops run meanwhile (the kill switch while a reload loads its files)
        self._op_locks = {op: threading.Lock() for op in handlers}

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            if answers(self.path):
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
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="agentwatch-control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._workers_lock:
            workers = list(self._workers)
        deadline = time.monotonic() + 2
        for t in workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.subscribers.close()

    def _problem(self, what: str, e: BaseException) -> None:
        """Log an unexpected failure; the same one at most every 10 s (no log flood)."""
        now = time.monotonic()
        if self.log is not None and now - self._logged.get(what, -10.0) >= 10:
            self._logged[what] = now
            self.log(what, level="error", error=repr(e)[:500])

    # --- the reading thread ----------------------------------------------------------------

    def _serve(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                timeout = 0.2
                if self._waiting:
                    first = next(iter(self._waiting.values()))
                    timeout = min(timeout, max(0.0, first.deadline - time.monotonic()))
                for key, _ in sel.select(timeout):
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    try:
                        if conn is self._sock:
                            self._accept(sel)
                        elif (w := self._waiting.get(conn)) is not None:  # not dropped since
                            self._read(sel, w)
                    except Exception as e:  # one client's trouble must not stop the server
                        self._problem("control socket: request failed", e)
                        if conn is not self._sock:
                            self._drop(sel, conn)
                self._expire(sel)
        finally:
            for w in list(self._waiting.values()):
                self._drop(sel, w.conn)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._sock is not None
        for _ in range(MAX_WAITING):
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of file descriptors: leave them in the backlog
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._problem("control socket: cannot accept", e)
                    time.sleep(0.05)
                    return
                raise
            conn.setblocking(False)
            try:
                peer = Peer.of(conn)
            except OSError:
                conn.close()
                continue
            if len(self._waiting) >= MAX_WAITING:
                oldest = next(iter(self._waiting.values()))
                self._forget(sel, oldest)
                oldest.peer.close()
                _refuse(oldest.conn, f"too many connections ({MAX_WAITING}) are waiting to "
                        "send a request: this one waited longest")
            self._waiting[conn] = _Waiting(conn, peer, time.monotonic() + self.request_seconds)
            sel.register(conn, selectors.EVENT_READ)

    def _read(self, sel: selectors.BaseSelector, w: _Waiting) -> None:
        try:
            chunk = w.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(sel, w.conn)
            return
        if chunk:
            start = len(w.buf)
            w.buf += chunk
            end = w.buf.find(b"\n", start)
            if end < 0:
                if len(w.buf) > MAX_REQUEST:
                    self._forget(sel, w)
                    w.peer.close()
                    _refuse(w.conn, f"request too long: more than {MAX_REQUEST} bytes "
                            "without a newline")
                return
            line = bytes(w.buf[:end])
        else:  # end of input: the request is what came (a last line without its newline)
            line = bytes(w.buf)
        self._forget(sel, w)
        self._dispatch(w, line)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        while self._waiting:
            w = next(iter(self._waiting.values()))
            if w.deadline > now:
                return
            self._forget(sel, w)
            w.peer.close()
            _refuse(w.conn, f"timed out: send the request (one JSON object and a newline) "
                    f"within {self.request_seconds:g} s of connecting")

    def _forget(self, sel: selectors.BaseSelector, w: _Waiting) -> None:
        """Stop reading w; whoever called this now owns its connection and peer."""
        del self._waiting[w.conn]
        sel.unregister(w.conn)

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        w = self._waiting.get(conn)
        if w is not None:
            self._forget(sel, w)
            w.peer.close()
        conn.close()

    def _dispatch(self, w: _Waiting, line: bytes) -> None:
        """A whole request has come: refuse it here, or hand it to a handler thread."""
        refusal = self._start(w, line)
        if refusal is not None:
            w.peer.close()
            _refuse(w.conn, refusal)

    def _start(self, w: _Waiting, line: bytes) -> str | None:
        """Start the request's handler thread, or say why not."""
        if w.peer.uid != 0:  # read first, so a refused client can still read why
            return "permission denied: the control socket accepts root only"
        try:
            req = parse_request(line)
        except RequestError as e:
            return str(e)
        op = req["op"]
        if op == "subscribe":
            if not self.subscribers.add(w.conn, line_of({"ok": True})):
                return f"too many subscribers (at most {self.subscribers.limit})"
            w.peer.close()
            return None
        handler = self.handlers.get(op)
        if handler is None:
            known = ", ".join(sorted([*self.handlers, "subscribe"]))
            return f"unknown op {op[:64]!r} (known: {known})"
        slots = self._kill_slots if op == "killswitch" else self._slots
        if not slots.acquire(blocking=False):
            return f"{BUSY} with {MAX_BUSY} requests: try again"
        worker = threading.Thread(target=self._answer,
                                  args=(w.conn, w.peer, op, handler, req, slots),
                                  name="agentwatch-control-request", daemon=True)
        with self._workers_lock:
            self._workers.add(worker)
        worker.start()
        return None

    # --- a handler thread --------------------------------------------------------------------

    def _answer(self, conn: socket.socket, peer: Peer, op: str, handler: Handler,
                req: dict[str, Any], slots: threading.BoundedSemaphore) -> None:
        lock = self._op_locks[op]
        try:
            if not lock.acquire(timeout=OP_WAIT_SECONDS):
                reply = {"ok": False, "error": f"another {op!r} request has been running for "
                                               f"{OP_WAIT_SECONDS:g} s: try again later"}
            else:
                try:
                    reply = handler(req, peer)
                except Exception as e:  # a handler bug must not take the control socket down
                    self._problem(f"control socket: {op!r} failed", e)
                    reply = {"ok": False, "error": f"internal error in {op!r}: {e!r}"[:1000]}
                finally:
                    lock.release()
            conn.settimeout(self.reply_seconds)
            conn.sendall(line_of(reply))
        except OSError:
            pass  # the client left, or did not take its reply in time: nothing to tell it
        finally:
            conn.close()
            peer.close()
            slots.release()
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

