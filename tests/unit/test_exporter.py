"""Serving /metrics to a client that scrapes in a loop (issue 10, item 13): the monitor
renders at most once per cache period and answers at most so many scrapes a second, a
rendering is never older than the cache period, and whatever a client sends or fails to
send, the exporter keeps serving without a traceback.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from test_metrics import FakeSource, busy_source, registry_for, value

from monitor.config.load import load_config_text
from monitor.config.types import MetricsSettings
from monitor.model.errors import ConfigError
from monitor.observe.metrics import serve


class Served:
    def __init__(self, registry: CollectorRegistry, **kw: Any) -> None:
        self.logged: list[tuple[str, dict[str, Any]]] = []
        self.server, self.thread = serve(registry, "127.0.0.1:0", **kw)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None,
            method: str = "GET", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url.replace("/metrics", path), method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 loopback
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def source() -> FakeSource:
    return busy_source()


@pytest.fixture
def served(source: FakeSource) -> Iterator[Served]:
    s = Served(registry_for(source))
    yield s
    s.close()


def hammer(url: str, threads: int, seconds: float) -> tuple[int, int]:
    """Scrape url back to back from `threads` threads for `seconds`: (served, failed)."""
    ok, failed = [0], [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 loopback
                    assert b"agentwatch_probes_attached" in r.read()
                with lock:
                    ok[0] += 1
            except OSError:
                with lock:
                    failed[0] += 1

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return ok[0], failed[0]


# --- a client that scrapes in a loop ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_scraping_in_a_loop_renders_once_a_second_and_serves_ten_a_second(
        served: Served, source: FakeSource) -> None:
    """With the defaults (a 1 s cache, 10 scrapes a second): four threads scraping back to
    back for 2 s make the monitor read its state (and the BPF counters) at most 3 times and
    answer at most 10 a second (plus a burst of 10); every scrape is answered."""
    ok, failed = hammer(served.url, threads=4, seconds=2.0)
    assert failed == 0
    assert 10 <= ok <= 10 + 2.5 * 10, ok  # a scrape that waited may end a little late
    assert source.kernel_reads <= 3, source.kernel_reads


def test_a_rendering_is_never_older_than_the_cache_period(source: FakeSource) -> None:
    s = Served(registry_for(source), cache_seconds=0.3)
    try:
        before = s.get()[2].decode()
        source.attached = 3
        cached = s.get()[2].decode()
        time.sleep(0.35)
        fresh = s.get()[2].decode()
    finally:
        s.close()

    def attached(text: str) -> float:
        return value({f.name: f for f in text_string_to_metric_families(text)},
                     "agentwatch_probes_attached")

    assert attached(before) == attached(cached) == 15
    assert attached(fresh) == 3


def test_a_cache_of_zero_renders_every_scrape(source: FakeSource) -> None:
    s = Served(registry_for(source), cache_seconds=0, max_per_second=1000)
    try:
        for _ in range(5):
            assert s.get()[0] == 200
    finally:
        s.close()
    assert source.kernel_reads == 5


@pytest.mark.timeout(60)
def test_scrapes_beyond_the_rate_wait_their_turn(source: FakeSource) -> None:
    s = Served(registry_for(source), max_per_second=4)
    try:
        start = time.monotonic()
        ok, failed = hammer(s.url, threads=3, seconds=1.5)
        took = time.monotonic() - start
    finally:
        s.close()
    assert failed == 0
    assert ok <= 4 + 4 * took + 1, (ok, took)


# --- formats and HTTP --------------------------------------------------------------------------


def test_gzip_and_openmetrics_are_served_as_prometheus_asks(served: Served) -> None:
    status, headers, body = served.get(headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"agentwatch_probes_attached 15.0" in gzip.decompress(body)
    status, headers, body = served.get(headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, headers, body = served.get()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert int(headers["Content-Length"]) == len(body)


def test_other_paths_and_methods_get_an_http_error(served: Served) -> None:
    assert served.get("/")[0] == 200
    assert served.get("/metrics?name[]=x")[0] == 200
    status, _, body = served.get("/admin")
    assert status == 404 and b"/metrics" in body
    status, headers, _ = served.get(method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = served.get(method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """What the exporter answers to these bytes (b"" for a close without an answer)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass  # closed with part of the request unread
    return out


@pytest.mark.parametrize("data", [
    b"\r\n\r\n", b"GET\r\n\r\n", b"\xff\xfe\xfd garbage \x00\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n",
])
def test_malformed_requests_are_refused_and_the_exporter_keeps_serving(
        served: Served, data: bytes) -> None:
    reply = raw(served.server.server_port, data)
    assert reply == b"" or reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))
    assert served.get()[0] == 200


@pytest.mark.timeout(30)
def test_clients_that_send_nothing_do_not_stop_others_being_served(served: Served) -> None:
    idle = [socket.create_connection(("127.0.0.1", served.server.server_port))
            for _ in range(8)]
    try:
        start = time.monotonic()
        assert served.get(timeout=5)[0] == 200
        assert time.monotonic() - start < 2
    finally:
        for s in idle:
            s.close()


class Broken(Collector):
    def collect(self) -> Iterator[Any]:
        raise RuntimeError("bpf map gone")


def test_a_collector_that_fails_is_a_500_not_a_dead_exporter() -> None:
    registry = CollectorRegistry()
    registry.register(Broken())
    logged: list[dict[str, Any]] = []
    server, thread = serve(registry, "127.0.0.1:0", cache_seconds=0,
                           log=lambda msg, level="info", **f: logged.append(
                               {"msg": msg, "level": level, **f}))
    try:
        port = server.server_port
        for _ in range(2):
            reply = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 500 ") and b"bpf map gone" in reply
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert logged and logged[0]["level"] == "error" and "bpf map gone" in logged[0]["error"]


# --- settings --------------------------------------------------------------------------------


def test_the_cache_and_rate_are_configurable_and_default_to_one_second_and_ten() -> None:
    assert MetricsSettings().cache_seconds == 1.0
    assert MetricsSettings().max_scrapes_per_second == 10.0
    cfg = load_config_text("metrics:\n  cache_seconds: 0.25\n  max_scrapes_per_second: 2\n",
                           "c.yaml")
    assert cfg.metrics.cache_seconds == 0.25 and cfg.metrics.max_scrapes_per_second == 2
    assert cfg.metrics.listen == MetricsSettings().listen


@pytest.mark.parametrize("text, where", [
    ("metrics:\n  cache_seconds: -1\n", "c.yaml:2"),
    ("metrics:\n  cache_seconds: 61\n", "c.yaml:2"),
    ("metrics:\n  cache_seconds: soon\n", "c.yaml:2"),
    ("metrics:\n  listen: 127.0.0.1:9464\n  max_scrapes_per_second: 0\n", "c.yaml:3"),
    ("metrics:\n  max_scrapes_per_second: 100000\n", "c.yaml:2"),
])
def test_bad_cache_or_rate_is_refused_with_file_and_line(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "c.yaml")
    assert where in str(e.value) and "metrics." in str(e.value)


def test_a_rendering_reads_the_source_once_whatever_the_formats_asked(
        source: FakeSource) -> None:
    s = Served(registry_for(source))
    try:
        s.get()
        s.get(headers={"Accept-Encoding": "gzip"})
    finally:
        s.close()
    assert source.kernel_reads == 1

