"""Fuzzing the control protocol: a real ControlServer with fake handlers is fed generated
request bytes (random JSON, deep nesting, huge numbers, invalid UTF-8, lone surrogates,
partial lines, no newline). Whatever comes, the client gets one clear reply line or a
close, the server keeps serving (a status request afterwards succeeds), and nothing is
logged as an error and no thread dies. Bounded: a few hundred examples, a few seconds.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.service.client import request
from monitor.service.control import ControlServer, Peer

OPS = ("echo", "ping", "status")


class Rig:
    def __init__(self, path: Path) -> None:
        self.logged: list[tuple[str, dict[str, Any]]] = []
        self.died: list[BaseException | None] = []
        self.calls = 0
        self.server = ControlServer(path, {op: self.handler for op in OPS}, log=self.log)

    def log(self, msg: str, level: str = "info", **fields: Any) -> None:
        self.logged.append((msg, {"level": level, **fields}))

    def handler(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.calls += 1
        return {"ok": True, "value": req.get("value"), "alive": peer.alive()}

    def exchange(self, data: bytes) -> bytes:
        """Send data, end the sending side, return everything the server sent back."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.server.path))
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before all of it was sent: the refusal is still readable
            out = b""
            try:
                while b"\n" not in out and (chunk := s.recv(65536)):
                    out += chunk
                s.settimeout(0.2)  # after the reply: a close, or (subscribe) event lines
                while chunk := s.recv(65536):
                    out += chunk
            except ConnectionResetError:
                pass  # closed with part of the request unread: a close is an answer too
            except TimeoutError:
                assert out == b'{"ok": true}\n' and b"subscribe" in data, out[:200]
            return out

    def still_serving(self) -> None:
        assert request(self.server.path, {"op": "status"}, timeout=5)["ok"] is True


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "c.sock")
    old_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        r.died.append(args.exc_value)

    threading.excepthook = hook
    r.server.start()
    try:
        yield r
    finally:
        r.server.stop()
        threading.excepthook = old_hook
    assert r.died == []  # no thread of the server ended with an exception
    assert [m for m, f in r.logged if f["level"] == "error"] == []


# --- what a client may send ------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\udfff\udbff"])
TEXT = st.text(max_size=20) | SURROGATES
SCALARS = (st.none() | st.booleans() | TEXT
           | st.integers(min_value=-(10**19), max_value=10**19)
           | st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(TEXT, kids, max_size=4), max_leaves=12)

GOOD = st.builds(lambda op, value: {"op": op, "value": value}, st.sampled_from(OPS), JSON)


def _nested(n: int, kind: str) -> bytes:
    open_, close = ("[", "]") if kind == "array" else ('{"k":', "}")
    inner = open_ * n + ("1" if kind == "object" else "") + close * n
    return b'{"op": "echo", "value": ' + inner.encode() + b"}"


HOSTILE_BODY = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),                      # any JSON value
    GOOD.map(lambda r: json.dumps(r).encode()),                      # good requests
    st.builds(_nested, st.integers(1, 40_000), st.sampled_from(["array", "object"])),
    st.integers(1, 100_000).map(lambda n: b"[" * n),                  # unclosed nesting
    st.integers(1, 8_000).map(lambda n: b'{"op": "echo", "value": -' + b"7" * n + b"}"),
    st.integers(1, 400).map(lambda n: b'{"op": "echo", "value": 1e' + b"9" * n + b"}"),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
        lambda c: b'{"op": "echo", "value": ' + c + b"}"),
    st.binary(max_size=3000),                                         # any bytes at all
    TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),           # raw lone surrogates
    st.integers(60_000, 200_000).map(lambda n: b'{"op": "echo", "value": "' + b"a" * n),
)
ENDING = st.sampled_from([b"\n", b"", b"\r\n", b"\n{\"op\": \"ping\"}\n", b"\n\xff\xff"])


def _check_reply(raw: bytes) -> dict[str, Any] | None:
    """The reply is nothing (a close) or exactly one line: a JSON object saying ok or why not."""
    if not raw:
        return None
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1, raw[:200]
    reply = json.loads(raw)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and 0 < len(reply["error"]) < 1000
        assert "Traceback" not in reply["error"]
    return reply


@pytest.mark.timeout(120)
def test_any_bytes_get_one_clear_answer_and_the_server_keeps_serving(rig: Rig) -> None:
    @settings(max_examples=250, deadline=3000, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=HOSTILE_BODY, ending=ENDING)
    def check(body: bytes, ending: bytes) -> None:
        _check_reply(rig.exchange(body + ending))
        rig.still_serving()

    check()


@pytest.mark.timeout(120)
def test_well_formed_requests_are_answered_with_what_they_carried(rig: Rig) -> None:
    @settings(max_examples=150, deadline=3000, derandomize=True)
    @given(req=GOOD, newline=st.booleans())
    def check(req: dict[str, Any], newline: bool) -> None:
        raw = rig.exchange(json.dumps(req).encode() + (b"\n" if newline else b""))
        reply = _check_reply(raw)
        assert reply is not None and reply["ok"] is True, reply
        assert reply["value"] == req["value"]
        assert reply["alive"] is True  # this test process, still running

    check()
