"""The real monitor's control socket against hostile clients (issue 10, item 9).

Requests that once killed the control thread (a 5,000-digit integer, a 60,000-deep array)
and clients that hold a connection open saying nothing get an error or a timeout, while the
kill switch, from the real CLI, still kills an agent at once. `register` (agentwatch exec)
never makes an agent root of a process that got the pid of a client that exited.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import SOCKET, Running, agent_exec, wait_exit

CLI = [sys.executable, "-m", "monitor.cli.main"]


def send_raw(data: bytes, timeout: float = 10) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(SOCKET)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was read: the refusal is still readable
        reply = json.loads(s.makefile("rb").readline())
    assert isinstance(reply, dict)
    return reply


def wait_tracked(running: Running, pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while running.monitor.tracker.process(pid) is None:
        assert time.monotonic() < deadline, f"pid {pid} never tracked"
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_hostile_requests_and_stalled_clients_leave_the_kill_switch_working(
        running: Running) -> None:
    agent = agent_exec(["sleep", "60"], agent="ctl-hostile")
    wait_tracked(running, agent.pid)
    silent = []
    stop = threading.Event()

    def trickle() -> None:  # one byte every half second, for ever
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(SOCKET)
            while not stop.wait(0.5):
                try:
                    s.send(b" ")
                except OSError:
                    return

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(SOCKET)
            silent.append(s)
        trickler.start()
        for data, error in (
            (b'{"op": "status", "x": ' + b"9" * 5000 + b"}\n", "more than 20 digits"),
            (b'{"op": "status", "x": ' + b"[" * 60_000 + b"]" * 60_000 + b"}\n",
             "request too long"),
            (b'{"op": "status", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}\n",
             "nested deeper"),
            (b'{"op": "killswitch", "agent": "\xff"}\n', "not UTF-8"),
            (b'{"op": "killswitch", "agent": NaN}\n', "NaN is not JSON"),
        ):
            reply = send_raw(data)
            assert reply["ok"] is False and error in str(reply["error"]), reply
        time.sleep(0.5)  # the stalled clients are connected and being read
        start = time.monotonic()
        r = subprocess.run([*CLI, "killswitch", "--socket", SOCKET, "--agent", "ctl-hostile"],
                           capture_output=True, text=True, timeout=30)
        took = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        assert "1 agent sessions" in r.stdout
        assert wait_exit(agent, 10) == -signal.SIGKILL
        assert took < 5, f"the kill switch took {took:.1f} s"  # Python start-up included
    finally:
        stop.set()
        for s in silent:
            s.close()
        trickler.join(timeout=5)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    status = subprocess.run([*CLI, "status", "--socket", SOCKET], capture_output=True,
                            text=True, timeout=30)
    assert status.returncode == 0 and json.loads(status.stdout)["probes"], status.stderr
    assert [ln for ln in running.lines if str(ln.get("msg", "")).startswith("control")] == []


# A client that connects (so the monitor records its pid) and waits for the word to exit;
# the test holds the same socket and sends the request after the client is gone.
CONNECTOR = textwrap.dedent("""
    import socket, sys
    s = socket.socket(fileno=int(sys.argv[2]))
    s.connect(sys.argv[1])
    print("connected", flush=True)
    sys.stdin.read()
""")


def recycle(pid: int, tries: int = 200) -> subprocess.Popen[bytes] | None:
    """A new, innocent process with the given (free) pid, or None if others keep taking it."""
    for _ in range(tries):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = subprocess.Popen(["sleep", "60"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


@pytest.mark.timeout(120)
def test_register_never_adopts_a_process_that_got_the_pid_of_a_client_that_exited(
        running: Running) -> None:
    """agentwatch exec registers the pid the request came from. If that client exits after
    connecting and its pid is handed to another process before the request is handled, the
    monitor must refuse, not make the other process an agent root."""
    innocent: subprocess.Popen[bytes] | None = None
    for _attempt in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client = subprocess.Popen([sys.executable, "-c", CONNECTOR, SOCKET,
                                       str(sock.fileno())], pass_fds=[sock.fileno()],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert client.stdout is not None and client.stdin is not None
            assert client.stdout.readline().strip() == b"connected"
            time.sleep(0.3)  # the monitor has accepted the connection while the client lived
            client.stdin.close()
            assert client.wait(10) == 0  # exited and reaped: its pid is free
            innocent = recycle(client.pid)
            if innocent is None:
                continue
            sock.settimeout(10)
            sock.sendall(b'{"op": "register", "agent": "recycled-pid"}\n')
            reply = json.loads(sock.makefile("rb").readline())
            break
        finally:
            sock.close()
    else:
        pytest.fail("could not hand the client's pid to another process in 5 attempts")
    assert innocent is not None
    try:
        assert reply["ok"] is False, reply
        assert "exited before it was registered" in reply["error"]
        assert running.monitor.tracker.process(innocent.pid) is None
        assert not running.monitor.probes.is_tracked(innocent.pid)
        assert innocent.poll() is None  # untouched
    finally:
        innocent.kill()
        innocent.wait()
    # an ordinary agentwatch exec still registers
    p = agent_exec(["true"], agent="recycled-pid")
    assert wait_exit(p) == 0
    assert os.path.exists(SOCKET)

