"""Unit tests for monitor.service.control: a real ControlServer on a Unix socket with fake
handlers."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from monitor.model.errors import ControlError
from monitor.service import client, control
from monitor.service.client import request, stream
from monitor.service.control import ControlServer, Peer

NOBODY = 65534


class Calls:
    """The fake handlers' record of what they were asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any], int]] = []

    def handlers(self) -> dict[str, control.Handler]:
        def ping(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
            self.seen.append(("ping", req, peer.pid))
            return {"ok": True}

        def echo(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
            self.seen.append(("echo", req, peer.pid))
            return {"ok": True, "value": req.get("value"), "peer": peer.pid}

        def refuse(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
            self.seen.append(("refuse", req, peer.pid))
            return {"ok": False, "error": "session limit reached (3 of 3)"}

        def killswitch(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
            self.seen.append(("killswitch", req, peer.pid))
            return {"ok": True, "sessions": 0}

        return {"ping": ping, "echo": echo, "refuse": refuse, "killswitch": killswitch}

    def ops(self) -> list[str]:
        return [op for op, _, _ in self.seen]


def all_slots_taken(srv: ControlServer) -> bool:
    """Whether every handler slot of the server is busy (taken and given back if not)."""
    if srv._slots.acquire(blocking=False):
        srv._slots.release()
        return False
    return True


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def server(tmp_path: Path, calls: Calls) -> Iterator[ControlServer]:
    srv = ControlServer(tmp_path / "run" / "c.sock", calls.handlers())
    srv.start()
    yield srv
    srv.stop()


def exchange(path: Path, data: bytes) -> dict[str, Any]:
    """Send raw bytes, return the one reply line as JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    assert isinstance(reply, dict)
    return reply


# --- requests ------------------------------------------------------------------------------


def test_good_request_reaches_handler_with_peer_pid(server: ControlServer, calls: Calls) -> None:
    reply = request(server.path, {"op": "echo", "value": [1, "two"]})
    assert reply == {"ok": True, "value": [1, "two"], "peer": os.getpid()}
    assert calls.seen == [("echo", {"op": "echo", "value": [1, "two"]}, os.getpid())]


def test_each_connection_gets_one_answer(server: ControlServer, calls: Calls) -> None:
    for i in range(5):
        assert request(server.path, {"op": "echo", "value": i})["value"] == i
    assert calls.ops() == ["echo"] * 5


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{not json\n", "malformed request: not JSON"),
        (b"\n", "malformed request: expected a JSON object with a string 'op'"),
        (b'["echo"]\n', "malformed request: expected a JSON object with a string 'op'"),
        (b'"echo"\n', "malformed request: expected a JSON object with a string 'op'"),
        (b"null\n", "malformed request: expected a JSON object with a string 'op'"),
        (b'{"value": 1}\n', "malformed request: expected a JSON object with a string 'op'"),
        (b'{"op": 5}\n', "malformed request: expected a JSON object with a string 'op'"),
        (b'{"op": "nope"}\n', "unknown op 'nope' (known: echo, killswitch, ping, refuse, "
                               "subscribe)"),
        (b'{"op": "ECHO"}\n', "unknown op 'ECHO'"),
    ],
    ids=["not-json", "empty", "list", "string", "null", "no-op", "op-not-string",
         "unknown-op", "op-is-case-sensitive"],
)
def test_bad_request_refused_and_handler_not_called(
    server: ControlServer, calls: Calls, data: bytes, error: str,
) -> None:
    reply = exchange(server.path, data)
    assert reply["ok"] is False
    assert error in reply["error"]
    assert calls.seen == []
    # the server is still serving afterwards
    assert request(server.path, {"op": "echo", "value": 1})["value"] == 1


def test_request_without_newline_then_eof(server: ControlServer, calls: Calls) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b'{"op": "echo", "value": 9}')
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(s.makefile("rb").readline())
    assert reply == {"ok": True, "value": 9, "peer": os.getpid()}


def test_socket_is_root_only(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700


def test_request_raises_with_server_error_text(server: ControlServer, calls: Calls) -> None:
    with pytest.raises(ControlError, match=r"session limit reached \(3 of 3\)") as info:
        request(server.path, {"op": "refuse"})
    assert info.value.exit_code == 4
    with pytest.raises(ControlError, match="unknown op 'missing'"):
        request(server.path, {"op": "missing"})
    assert calls.ops() == ["refuse"]


def test_request_to_missing_socket_says_how_to_start_monitor(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(ControlError) as info:
        request(path, {"op": "ping"})
    msg = str(info.value)
    assert str(path) in msg
    assert "no agentwatch monitor is listening" in msg
    assert "agentwatch run" in msg


def test_request_to_stale_socket_file_says_how_to_start_monitor(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # left behind by a monitor that died: nobody listens
    with pytest.raises(ControlError, match="agentwatch run"):
        request(path, {"op": "ping"})
    with pytest.raises(ControlError, match="agentwatch run"):
        stream(path)


def test_request_to_unresponsive_monitor_raises_control_error(tmp_path: Path) -> None:
    path = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(path))
        hung.listen(1)  # the backlog accepts the connection; nobody ever answers
        with pytest.raises(ControlError, match=re.escape(str(path))):
            request(path, {"op": "ping"}, timeout=0.3)


def test_handler_exception_does_not_stop_the_server(tmp_path: Path, calls: Calls) -> None:
    def broken(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        raise KeyError("boom")

    srv = ControlServer(tmp_path / "c.sock", {**calls.handlers(), "broken": broken})
    srv.start()
    try:
        with pytest.raises(ControlError, match="broken"):
            request(srv.path, {"op": "broken"}, timeout=2)
        assert request(srv.path, {"op": "ping"}, timeout=2) == {"ok": True}
        assert calls.ops() == ["ping"]
    finally:
        srv.stop()


# --- lifecycle -----------------------------------------------------------------------------


def test_second_server_refuses_while_first_answers(server: ControlServer, calls: Calls) -> None:
    other = Calls()
    second = ControlServer(server.path, other.handlers())
    with pytest.raises(ControlError, match="already serving"):
        second.start()
    # the first one keeps its socket and keeps answering
    assert server.path.exists()
    assert request(server.path, {"op": "echo", "value": "still"})["value"] == "still"
    assert "echo" in calls.ops()
    assert "echo" not in other.ops()


def test_server_takes_over_stale_socket_file(tmp_path: Path, calls: Calls) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    srv = ControlServer(path, calls.handlers())
    srv.start()
    try:
        assert request(path, {"op": "echo", "value": 1})["value"] == 1
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.stop()
    assert not path.exists()  # stop() removes the socket file
    with pytest.raises(ControlError, match="no agentwatch monitor is listening"):
        request(path, {"op": "ping"})


# --- event stream --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stream_receives_what_subscribers_send(server: ControlServer, calls: Calls) -> None:
    lines = stream(server.path)
    try:
        wait_for(lambda: bool(server.subscribers))
        server.subscribers.send(json.dumps({"event": "exec", "pid": 1}))
        server.subscribers.send(json.dumps({"event": "exit", "pid": 1, "argv": ["a b", ""]}))
        assert next(lines) == {"event": "exec", "pid": 1}
        assert next(lines) == {"event": "exit", "pid": 1, "argv": ["a b", ""]}
    finally:
        lines.close()
    assert calls.seen == []  # subscribe is not a handler op
    # a closed subscriber is forgotten on the next send instead of breaking it
    wait_for(lambda: (server.subscribers.send("{}"), not server.subscribers)[1])


@pytest.mark.timeout(30)
def test_stream_to_two_subscribers(server: ControlServer) -> None:
    a, b = stream(server.path), stream(server.path)
    try:
        wait_for(lambda: len(server.subscribers._conns) == 2)
        server.subscribers.send('{"n": 1}')
        assert next(a) == {"n": 1}
        assert next(b) == {"n": 1}
    finally:
        a.close()
        b.close()


def test_stream_to_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="agentwatch run"):
        stream(tmp_path / "absent.sock")


# --- only root is served -------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the non-root refusal test must run as root in CI (it drops to nobody)")
    pytest.skip("needs root to drop to uid 65534")


def _as_nobody(action: Callable[[], str]) -> str:
    """Run `action` in a forked child with uid/gid 65534; returns what it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        out = "child did not report"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = f"uid={os.getuid()} {action()}"
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            out = f"uid={os.getuid()} {type(e).__name__} {e}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode()


def _client_request(path: Path, req: dict[str, Any]) -> Callable[[], str]:
    def action() -> str:
        try:
            return f"REPLY {json.dumps(request(path, req, timeout=5))}"
        except ControlError as e:
            return f"ControlError {e}"
    return action


def _raw_request(path: Path, req: dict[str, Any]) -> Callable[[], str]:
    """Send the request, then read whatever the server answered (even if it had already
    answered and hung up before the request was sent)."""
    def action() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            try:
                s.sendall((json.dumps(req) + "\n").encode())
            except BrokenPipeError:
                pass
            return f"REPLY {s.makefile('rb').readline().decode().strip()}"
    return action


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="aw-ctl-", dir="/tmp"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_non_root_cannot_use_the_socket(public_dir: Path, calls: Calls) -> None:
    _require_root()
    srv = ControlServer(public_dir / "c.sock", calls.handlers())
    srv.start()
    try:
        seen = _as_nobody(_client_request(srv.path, {"op": "echo", "value": 1}))
        assert seen.startswith(f"uid={NOBODY} ControlError "), seen
        assert "permission denied" in seen
        assert calls.seen == []
        assert request(srv.path, {"op": "ping"}) == {"ok": True}  # root still served
    finally:
        srv.stop()


@pytest.mark.parametrize("op", ["echo", "subscribe"])
def test_server_refuses_non_root_peer_even_if_socket_is_opened_up(
    public_dir: Path, calls: Calls, op: str,
) -> None:
    _require_root()
    srv = ControlServer(public_dir / "c.sock", calls.handlers())
    srv.start()
    try:
        os.chmod(srv.path, 0o666)  # a mistaken chmod must not let anyone in: SO_PEERCRED
        seen = _as_nobody(_raw_request(srv.path, {"op": op, "value": 1}))
        assert seen.startswith(f"uid={NOBODY} REPLY "), seen
        reply = json.loads(seen.split(" ", 2)[2])
        assert reply == {"ok": False, "error": "permission denied: the control socket accepts "
                                               "root only"}
        assert calls.seen == []
        assert not srv.subscribers
    finally:
        srv.stop()


def test_request_reports_a_refusal_sent_before_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "fast.sock"
    refusal = {"ok": False, "error": "permission denied: the control socket accepts root only"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        real_connect = client._connect

        def connect_then_refuse(p: str | Path, timeout: float) -> socket.socket:
            s = real_connect(p, timeout)
            conn, _ = listener.accept()  # the order a fast server produces, made certain
            conn.sendall((json.dumps(refusal) + "\n").encode())
            conn.close()
            return s

        monkeypatch.setattr(client, "_connect", connect_then_refuse)
        with pytest.raises(ControlError, match="permission denied: the control socket accepts "
                           "root only"):
            request(path, {"op": "status"})


# --- hostile clients: bounded requests, concurrent service, a pinned peer -----------------


def _deep(n: int, open_: str, close: str) -> bytes:
    return (b'{"op": "echo", "value": ' + open_.encode() * n + close.encode() * n + b"}\n")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b'{"op": "echo", "value": ' + b"9" * 5000 + b"}\n", "more than 20 digits"),
        (b'{"op": "echo", "value": -' + b"9" * 5000 + b"}\n", "more than 20 digits"),
        (b'{"op": "echo", "value": [1e99999]}\n', "out of range"),
        (b'{"op": "echo", "value": NaN}\n', "NaN is not JSON"),
        (b'{"op": "echo", "value": -Infinity}\n', "-Infinity is not JSON"),
        (_deep(30_000, "[", "]"), "nested deeper than 16 levels"),
        (_deep(60_000, "[", "]"), "request too long"),
        (b'{"op": "echo", "value": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_001 + b"\n",
         "nested deeper than 16 levels"),
        (b'{"op": "echo", "value": "' + b"x" * 70_000 + b'"}\n', "request too long"),
        (b'{"op": "echo", "value": "\xff\xfe"}\n', "not UTF-8 (byte 25)"),
        (b'{"op": "\\ud800"}\n', "unknown op '\\ud800'"),
        (b'{"op": "' + b"e" * 5000 + b'"}\n', "unknown op 'eeee"),
    ],
    ids=["5000-digit-int", "negative-5000-digit-int", "float-overflow", "nan", "infinity",
         "30000-deep-array", "60000-deep-array", "10000-deep-object", "70kB-line",
         "invalid-utf8",
         "lone-surrogate-op", "5000-char-op"],
)
def test_hostile_request_gets_an_error_and_the_server_keeps_serving(
    server: ControlServer, calls: Calls, data: bytes, error: str,
) -> None:
    reply = exchange(server.path, data)
    assert reply["ok"] is False
    assert error in reply["error"]
    assert len(reply["error"]) < 300  # the refusal does not echo the request back
    assert calls.seen == []
    assert request(server.path, {"op": "killswitch"}, timeout=5)["ok"] is True
    assert calls.ops() == ["killswitch"]


def test_strings_that_look_like_nesting_are_not_nesting(server: ControlServer) -> None:
    value = "[" * 100 + '\\"{' * 50
    assert request(server.path, {"op": "echo", "value": value})["value"] == value
    assert request(server.path, {"op": "echo", "value": 2**63})["value"] == 2**63


def _silent(path: Path, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        out.append(s)
    return out


@pytest.mark.timeout(60)
def test_slow_clients_do_not_hold_up_the_kill_switch(server: ControlServer,
                                                     calls: Calls) -> None:
    """Twenty clients that connect and say nothing and three that send one byte every half
    second are connected; a kill switch request is still answered at once."""
    silent = _silent(server.path, 20)
    stop = threading.Event()

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(server.path))
            for byte in b'{"op": "ping"' * 100:
                if stop.wait(0.5):
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return

    tricklers = [threading.Thread(target=trickle, daemon=True) for _ in range(3)]
    try:
        for t in tricklers:
            t.start()
        time.sleep(1.2)  # every slow client is connected and has been read from
        for _ in range(3):
            start = time.monotonic()
            assert request(server.path, {"op": "killswitch"}, timeout=10)["ok"] is True
            assert time.monotonic() - start < 1.0
        assert calls.ops() == ["killswitch"] * 3
    finally:
        stop.set()
        for s in silent:
            s.close()
        for t in tricklers:
            t.join(timeout=5)


@pytest.mark.timeout(30)
def test_a_client_that_never_finishes_its_request_is_told_why_and_closed(
    server: ControlServer, calls: Calls,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(str(server.path))
        s.sendall(b'{"op": "ping"')  # and never the rest
        start = time.monotonic()
        reply = json.loads(s.makefile("rb").readline())
        assert time.monotonic() - start < control.REQUEST_SECONDS + 2
        assert s.recv(1) == b""  # closed
    assert reply["ok"] is False and "timed out" in reply["error"]
    assert calls.seen == []


@pytest.mark.timeout(60)
def test_more_connections_than_the_server_waits_for_cost_the_oldest_only(
    server: ControlServer, calls: Calls,
) -> None:
    silent = _silent(server.path, control.MAX_WAITING + 20)
    try:
        assert request(server.path, {"op": "ping"}, timeout=5) == {"ok": True}
        silent[0].settimeout(5)
        first = json.loads(silent[0].makefile("rb").readline())
        assert "too many connections" in first["error"]
    finally:
        for s in silent:
            s.close()


@pytest.mark.timeout(30)
def test_a_slow_handler_does_not_hold_up_other_requests(tmp_path: Path, calls: Calls) -> None:
    release = threading.Event()

    def slow(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        release.wait(10)
        return {"ok": True}

    srv = ControlServer(tmp_path / "c.sock", {**calls.handlers(), "reload": slow})
    srv.start()
    try:
        held = threading.Thread(target=request, args=(srv.path, {"op": "reload"}, 15),
                                daemon=True)
        held.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert request(srv.path, {"op": "killswitch"}, timeout=5)["ok"] is True
        assert time.monotonic() - start < 1.0
        release.set()
        held.join(timeout=10)
    finally:
        release.set()
        srv.stop()


@pytest.mark.timeout(30)
def test_requests_of_one_op_run_one_at_a_time(tmp_path: Path, calls: Calls) -> None:
    """Handlers were written for one control thread: two reloads (or two kill switches)
    never run at once, though a kill switch runs while a reload does."""
    running: list[str] = []
    overlaps: list[list[str]] = []
    lock = threading.Lock()

    def slow(op: str) -> control.Handler:
        def handler(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
            with lock:
                running.append(op)
                overlaps.append(list(running))
            time.sleep(0.2)
            with lock:
                running.remove(op)
            return {"ok": True}
        return handler

    srv = ControlServer(tmp_path / "c.sock", {"reload": slow("reload"),
                                              "killswitch": slow("killswitch")})
    srv.start()
    try:
        threads = [threading.Thread(target=request, args=(srv.path, {"op": op}, 15))
                   for op in ("reload", "reload", "reload", "killswitch", "killswitch")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=15)
    finally:
        srv.stop()
    assert len(overlaps) == 5
    assert all(o.count("reload") <= 1 and o.count("killswitch") <= 1 for o in overlaps)
    assert any(len(o) == 2 for o in overlaps)  # the two ops did run side by side


@contextmanager
def every_slot_held(tmp_path: Path, calls: Calls) -> Iterator[tuple[ControlServer,
                                                                  threading.Event]]:
    """A server whose MAX_BUSY handler slots are all taken by `status` requests that wait
    for the yielded event (set on the way out, at the latest); stopped afterwards."""
    release = threading.Event()

    def slow(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        release.wait(10)
        return {"ok": True}

    srv = ControlServer(tmp_path / "c.sock", {**calls.handlers(), "status": slow})
    srv.start()
    held = [threading.Thread(target=lambda: request(srv.path, {"op": "status"}, 15),
                             daemon=True) for _ in range(control.MAX_BUSY)]
    try:
        for t in held:
            t.start()
        wait_for(lambda: all_slots_taken(srv))
        yield srv, release
    finally:
        release.set()
        for t in held:
            t.join(timeout=10)
        srv.stop()


def test_busy_requests_are_refused_but_the_kill_switch_has_its_own_slots(
    tmp_path: Path, calls: Calls,
) -> None:
    with every_slot_held(tmp_path, calls) as (srv, _):
        with pytest.raises(ControlError, match="busy"):  # still busy when its time is up
            request(srv.path, {"op": "ping"}, timeout=1)
        assert request(srv.path, {"op": "killswitch"}, timeout=5)["ok"] is True
    assert "ping" not in calls.ops()


def test_a_second_server_refuses_while_the_first_is_busy(tmp_path: Path, calls: Calls) -> None:
    """A monitor whose handlers are all busy still answers (with a refusal): a second one
    started on its socket must not take the socket over."""
    with every_slot_held(tmp_path, calls) as (srv, _):
        second = ControlServer(srv.path, Calls().handlers())
        with pytest.raises(ControlError, match="already serving"):
            second.start()
        assert request(srv.path, {"op": "killswitch"}, timeout=5)["ok"] is True


def test_a_request_that_finds_the_monitor_busy_is_answered_when_a_slot_frees(
    tmp_path: Path, calls: Calls,
) -> None:
    """Refused as busy, no handler ran: the client tries again within its timeout, so a
    burst (a launcher starting 40 agents with `agentwatch exec` at once) is answered
    instead of failing some of them."""
    with every_slot_held(tmp_path, calls) as (srv, release):
        threading.Timer(0.3, release.set).start()
        assert request(srv.path, {"op": "ping"}, timeout=10)["ok"] is True
    assert calls.ops() == ["ping"]  # run once: the refusals before it ran nothing


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pin", ["SO_PEERPIDFD", "pidfd_open"])
def test_the_handler_can_tell_that_the_peer_that_sent_the_request_has_exited(
    tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch, pin: str,
) -> None:
    """The pid a request came from may name another process once the sender has exited;
    the handler's peer says whether it still names the sender (pinned by SO_PEERPIDFD, or
    where the kernel lacks it, before Linux 6.5, by pidfd_open at accept)."""
    if pin == "pidfd_open":
        monkeypatch.setattr(control, "SO_PEERPIDFD", 0x7FFF)  # unknown option: ENOPROTOOPT
    entered, release = threading.Event(), threading.Event()
    seen: list[tuple[int, bool]] = []

    def whois(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        seen.append((peer.pid, peer.alive()))
        entered.set()
        release.wait(10)
        seen.append((peer.pid, peer.alive()))
        return {"ok": True}

    srv = ControlServer(tmp_path / "c.sock", {**calls.handlers(), "whois": whois})
    srv.start()
    try:
        client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect({str(srv.path)!r})
            s.sendall(b'{{"op": "whois"}}\\n')
            sys.stdin.read()  # until the test closes stdin
            """)], stdin=subprocess.PIPE)
        assert entered.wait(10)
        assert client.stdin is not None
        client.stdin.close()
        assert client.wait(10) == 0  # exited and reaped: its pid is free for anyone
        release.set()
        wait_for(lambda: len(seen) == 2)
        assert seen == [(client.pid, True), (client.pid, False)]
        # a peer that stays is alive for its handler
        assert request(srv.path, {"op": "ping"}) == {"ok": True}
    finally:
        release.set()
        srv.stop()


@pytest.mark.timeout(30)
def test_a_subscriber_that_reads_slowly_never_receives_a_broken_line(
    server: ControlServer,
) -> None:
    def drain(s: socket.socket) -> bytes:
        out = b""
        s.settimeout(0.3)
        try:
            while chunk := s.recv(1 << 20):
                out += chunk
        except TimeoutError:
            pass
        return out

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b'{"op": "subscribe"}\n')
        data = drain(s)
        assert data == b'{"ok": true}\n'
        # a record as long as an exec with a long command line: more than the socket takes
        # at once, so it is taken in part; the lines after it come once the reader reads
        server.subscribers.send(json.dumps({"n": 0}))
        server.subscribers.send(json.dumps({"n": 1, "argv": ["x" * 600_000]}))
        server.subscribers.send(json.dumps({"n": 2}))
        for n in range(3, 10):
            data += drain(s)
            server.subscribers.send(json.dumps({"n": n}))
        data += drain(s)
        server.subscribers.close()
        s.settimeout(5)
        while chunk := s.recv(1 << 20):
            data += chunk
    lines = data.split(b"\n")
    assert lines.pop() == b""  # the stream ends with a whole line
    got = [json.loads(line) for line in lines[1:]]  # every line is whole JSON
    assert [g["n"] for g in got][:2] == [0, 1] and got[-1] == {"n": 9}
    assert server.subscribers.dropped == 10 - len(got)


def test_subscribers_are_capped(server: ControlServer) -> None:
    server.subscribers.limit = 2
    a, b = stream(server.path), stream(server.path)
    try:
        with pytest.raises(ControlError, match="too many subscribers"):
            stream(server.path)
    finally:
        a.close()
        b.close()
