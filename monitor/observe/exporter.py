"""Serving /metrics: a cached rendering behind a small, bounded HTTP server.

The metrics port is reachable by every process on the host, agents included, and an agent
may scrape it in a loop. Whatever it does, the exporter renders the registry at most once
per `cache_seconds` (each format; the collector's reads of the monitor's state and BPF
maps happen only then), answers at most `max_per_second` scrapes a second (more wait in
the kernel's accept queue, costing the monitor nothing), serves at most MAX_CLIENTS
connections at once, and gives each REQUEST_SECONDS to send its request and take the reply.
So the monitor's CPU for scrapes is bounded, and its event loop, which kills, never waits
on a scrape for long. A collector that fails is a 500 and a log line, never a traceback.

This module never decides policy and never reads the monitor's state itself: the registry's
collectors (monitor/observe/metrics.py) do, when a rendering is due.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

DEFAULT_CACHE_SECONDS = 1.0
DEFAULT_MAX_PER_SECOND = 10.0
MAX_CLIENTS = 16  # connections served at once; more wait in the accept queue
REQUEST_SECONDS = 5.0  # for one client to send its request and take its reply
MAX_HEAD = 8192  # bytes of request line and headers
BACKLOG = 64
PATHS = ("/metrics", "/")

Log = Callable[..., None]


class Exposition:
    """The registry rendered for scraping, kept for `max_age` seconds: however many
    scrapes come, the collectors run at most once per max_age per format."""

    def __init__(self, registry: CollectorRegistry, max_age: float = DEFAULT_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.max_age = max_age
        self.clock = clock
        self.renderings = 0
        self._lock = threading.Lock()  # one rendering at a time; the others reuse it
        self._cache: dict[tuple[str, bool], tuple[float, bytes]] = {}

    def render(self, accept: str = "", accept_encoding: str = ""
               ) -> tuple[bytes, list[tuple[str, str]]]:
        """(body, headers) for a scrape with these Accept and Accept-Encoding headers."""
        encoder, content_type = choose_encoder(accept)
        zipped = gzip_accepted(accept_encoding)
        with self._lock:
            now = self.clock()
            plain = self._fresh((content_type, False), now)
            if plain is None:
                plain = (now, encoder(self.registry))
                self.renderings += 1
                self._cache[(content_type, False)] = plain
                self._cache.pop((content_type, True), None)
            body = plain[1]
            if zipped:
                hit = self._fresh((content_type, True), now)
                if hit is None:
                    hit = (plain[0], gzip.compress(body, compresslevel=6))
                    self._cache[(content_type, True)] = hit
                body = hit[1]
        headers = [("Content-Type", content_type)]
        if zipped:
            headers.append(("Content-Encoding", "gzip"))
        return body, headers

    def _fresh(self, key: tuple[str, bool], now: float) -> tuple[float, bytes] | None:
        hit = self._cache.get(key)
        if hit is None or now - hit[0] >= self.max_age or now < hit[0]:
            return None
        return hit


class RateLimit:
    """A token bucket: `per_second` on average, bursts of up to max(1, per_second)."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_second
        self.burst = max(1.0, per_second)
        self.clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self) -> float:
        """Take a token and return 0, or return the seconds until one is due."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class MetricsServer:
    """HTTP/1.1 GET (and HEAD) of /metrics, one request per connection."""

    def __init__(self, exposition: Exposition, host: str, port: int, *,
                 max_per_second: float = DEFAULT_MAX_PER_SECOND,
                 max_clients: int = MAX_CLIENTS, request_seconds: float = REQUEST_SECONDS,
                 log: Log | None = None) -> None:
        self.exposition = exposition
        self.limit = RateLimit(max_per_second)
        self.request_seconds = request_seconds
        self.log = log
        self.served = 0
        self._logged: dict[str, float] = {}
        self._slots = threading.BoundedSemaphore(max_clients)
        self._stop = threading.Event()
        self._done = threading.Event()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.2)
        self.socket = sock
        self.server_port = int(sock.getsockname()[1])

    # --- the accepting thread ------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                conn = self._next()
                if conn is None:
                    continue
                t = threading.Thread(target=self._serve_one, args=(conn,),
                                     name="agentwatch-metrics-scrape", daemon=True)
                t.start()
        finally:
            self._done.set()

    def _next(self) -> socket.socket | None:
        """The next connection, once the rate and a free slot allow it (None: look again).
        The caller's thread releases the slot when it is done with the connection."""
        wait = self.limit.take()
        if wait:
            self._stop.wait(min(wait, 0.2))
            return None
        while not self._slots.acquire(timeout=0.2):
            if self._stop.is_set():
                return None
        while not self._stop.is_set():
            try:
                conn, _ = self.socket.accept()
                return conn
            except TimeoutError:
                continue
            except OSError as e:  # out of descriptors, say: not a dead exporter
                if self._stop.is_set():
                    break
                self._problem("metrics: cannot accept a connection", e)
                self._stop.wait(0.1)
        self._slots.release()
        return None

    def shutdown(self) -> None:
        self._stop.set()
        self._done.wait(timeout=5)

    def server_close(self) -> None:
        self.socket.close()

    def _problem(self, what: str, e: BaseException) -> None:
        """Log an unexpected failure; the same one at most every 10 s (no log flood)."""
        now = time.monotonic()
        if self.log is not None and now - self._logged.get(what, -10.0) >= 10:
            self._logged[what] = now
            self.log(what, level="error", error=repr(e)[:500])

    # --- one connection ----------------------------------------------------------------------

    def _serve_one(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.request_seconds
        try:
            head = _read_head(conn, deadline)
            if head is not None:
                status, headers, body = self._answer(head)
                _send(conn, deadline, status, headers, body, with_body=not head.startswith(
                    b"HEAD "))
        except OSError:
            pass  # the client left, or was too slow: nothing to tell it
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        if not head:
            return _text("431 Request Header Fields Too Large",
                         f"at most {MAX_HEAD} bytes of request line and headers\n")
        lines = head.decode("latin-1").split("\r\n") if b"\r\n" in head else \
            head.decode("latin-1").split("\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _text("400 Bad Request", "malformed request line\n")
        method, target, _ = parts
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            status, headers, body = _text("405 Method Not Allowed", "use GET\n")
            return status, [*headers, ("Allow", "GET, HEAD")], body
        if target.split("?", 1)[0] not in PATHS:
            return _text("404 Not Found", "agentwatch serves its metrics on /metrics\n")
        try:
            body, headers = self.exposition.render(fields.get("accept", ""),
                                                   fields.get("accept-encoding", ""))
        except Exception as e:  # a collector's bug: the scrape fails, the exporter stays
            self._problem("metrics: collecting failed", e)
            return _text("500 Internal Server Error", f"collecting metrics failed: {e!r}\n")
        self.served += 1
        return "200 OK", headers, body


def _text(status: str, text: str) -> tuple[str, list[tuple[str, str]], bytes]:
    return status, [("Content-Type", "text/plain; charset=utf-8")], text.encode()


def _read_head(conn: socket.socket, deadline: float) -> bytes | None:
    """The request line and headers, or None if they do not come whole in time (b"" if
    they are too long)."""
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        left = deadline - time.monotonic()
        if len(buf) > MAX_HEAD:
            return b""
        if left <= 0:
            return None
        conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(conn: socket.socket, deadline: float, status: str, headers: list[tuple[str, str]],
          body: bytes, with_body: bool = True) -> None:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + \
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    conn.settimeout(max(0.001, deadline - time.monotonic()))
    conn.sendall(head.encode("latin-1") + (body if with_body else b""))
