"""`agentwatch trace` as a user runs it: streaming from the running monitor, and `--all`
with probes of its own that also show processes that are not agents."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import SOCKET, Running, agent_exec, require_root, wait_exit

CLI = [sys.executable, "-m", "monitor.cli"]


_readers: dict[int, queue.Queue[str | None]] = {}


def _lines(p: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Lines of p's stdout, read by a thread (select() on a buffered pipe misses lines
    already sitting in Python's buffer)."""
    q = _readers.get(p.pid)
    if q is None:
        q = _readers[p.pid] = queue.Queue()

        def pump(out: Any = p.stdout, q: queue.Queue[str | None] = q) -> None:
            for line in out:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
    return q


def read_until(p: subprocess.Popen[str], pred: Callable[[dict[str, Any]], bool],
               timeout: float = 15) -> dict[str, Any]:
    q = _lines(p)
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if line.startswith("{"):
            item = json.loads(line)
            seen.append(item)
            if pred(item):
                return item
    raise AssertionError(f"no matching trace line within {timeout}s; saw {seen[-10:]}")


def stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_trace_streams_agent_events_from_the_running_monitor(running: Running) -> None:
    p = subprocess.Popen([*CLI, "trace", "--json", "--socket", SOCKET],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        assert p.stderr.readline().startswith("# streaming from the monitor")
        marker = f"streamed-{os.getpid()}"
        a = agent_exec(["/bin/true", marker], agent="streamer")
        wait_exit(a)
        item = read_until(p, lambda i: i.get("event") == "exec" and marker in i.get("argv", []))
        assert item["agent"] == "streamer" and item["pid"] == a.pid
        assert item["filename"] == "/bin/true"
    finally:
        stop(p)


def test_trace_all_shows_processes_that_are_not_agents(tmp_path: Any) -> None:
    require_root()
    p = subprocess.Popen([*CLI, "trace", "--all", "--json", "--socket",
                          str(tmp_path / "unused.sock")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        deadline = time.monotonic() + 30
        while "monitor started" not in p.stderr.readline():
            assert time.monotonic() < deadline and p.poll() is None, "trace --all did not start"
        marker = f"not-an-agent-{os.getpid()}"
        plain = subprocess.run(["/bin/true", marker])
        assert plain.returncode == 0
        item = read_until(p, lambda i: i.get("event") == "exec" and marker in i.get("argv", []))
        assert item["agent"] is None and item["session"] == 0
        assert item["filename"] == "/bin/true"
    finally:
        stop(p)
