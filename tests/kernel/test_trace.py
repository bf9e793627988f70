"""`agentwatch trace` as a user runs it: streaming from the running monitor, and `--all`
with probes of its own that also show processes that are not agents."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import SOCKET, Running, agent_exec, require_root, wait_exit

CLI = [sys.executable, "-m", "monitor.cli.main"]


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


# --- an agent's text on the operator's terminal ---------------------------------------------

HOSTILE_COMM = b"[/x]\x1b[2J\x9b\xff"  # markup, clear screen, C1 CSI, a byte that is not UTF-8
HOSTILE_SCRIPT = f"""#!/usr/bin/python3
import ctypes, os
ctypes.CDLL(None).prctl(15, {HOSTILE_COMM!r}, 0, 0, 0)  # PR_SET_NAME
child = os.fork()
if child == 0:
    os._exit(0)
os.waitpid(child, 0)
os.execv("/bin/true", [b"true", b"\\x1b]0;owned\\x07", b"\\xff\\x9b", b"a\\nFORGED 1 2 3"])
"""
_COLUMN_LINE = re.compile(rb" *\d+\.\d{6} (\S+) +(\S+) +(\d+) ")
# C0 but newline, DEL, C1 as UTF-8, bidi embeddings/overrides/isolates as UTF-8
_TERMINAL_CONTROLS = re.compile(
    rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9]")


class _ByteLines:
    """Lines of a child's stdout as bytes, read by a thread, each kept."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        self.q: queue.Queue[bytes | None] = queue.Queue()
        self.seen: list[bytes] = []
        out = p.stdout
        assert out is not None

        def pump() -> None:
            for line in out:
                self.q.put(line)
            self.q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, pred: Callable[[bytes], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if pred(line.rstrip(b"\n")):
                return
        raise AssertionError(f"no such line within {timeout}s; saw {self.seen[-10:]!r}")


def _column_exit_of(pid: int) -> Callable[[bytes], bool]:
    def pred(line: bytes) -> bool:
        m = _COLUMN_LINE.match(line)
        return m is not None and m.group(2) == b"exit" and int(m.group(3)) == pid
    return pred


def _json_exit_of(pid: int) -> Callable[[bytes], bool]:
    def pred(line: bytes) -> bool:
        if not line.startswith(b"{"):
            return False
        item = json.loads(line)
        return bool(item.get("event") == "exit" and item.get("pid") == pid)
    return pred


def test_trace_shows_a_hostile_agent_one_line_per_event_and_no_escape(
        running: Running) -> None:
    """An unprivileged agent process names itself (prctl PR_SET_NAME) and its program path
    with escape sequences and a newline; `trace` in columns prints one line per event, with
    no raw control byte (it used to clear the screen, set the title and forge lines)."""
    base = Path(tempfile.mkdtemp(prefix="agentwatch-tty-"))
    try:
        base.chmod(0o755)  # the unprivileged agent must reach its program
        # the exec path: a directory with a newline and a forged trace line in its name, a
        # file named with OSC title + clear screen (it becomes the comm at exec, too)
        sub = base / "d\n 99.000000 forged   exec      1 sh  harmless\x1b[2J"
        sub.mkdir(mode=0o755)
        script = sub / "\x1b]0;T\x07\x1b[2J"
        script.write_text(HOSTILE_SCRIPT)
        script.chmod(0o755)
        agent = f"tty-{os.getpid()}"
        cols = subprocess.Popen([*CLI, "trace", "--socket", SOCKET],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        js = subprocess.Popen([*CLI, "trace", "--json", "--socket", SOCKET],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for p in (cols, js):
                assert p.stderr is not None
                assert p.stderr.readline().startswith(b"# streaming from the monitor")
            col_lines, js_lines = _ByteLines(cols), _ByteLines(js)
            a = agent_exec(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "--", str(script)], agent=agent)
            assert wait_exit(a) == 0
            js_lines.until(_json_exit_of(a.pid))
            col_lines.until(_column_exit_of(a.pid))
        finally:
            stop(cols)
            stop(js)
        records = [json.loads(ln) for ln in js_lines.seen if ln.startswith(b"{")]
        ours = [r for r in records if r.get("agent") == agent]
        assert ours[-1]["uid"] == 65534, "the agent ran unprivileged"
        forks = [r for r in ours if r["event"] == "fork"]
        assert forks and forks[0]["comm"].encode("utf-8", "surrogateescape") == HOSTILE_COMM
        out = b"".join(col_lines.seen)
        out.decode("utf-8")  # strict: no surrogate or stray byte reached the terminal
        assert not _TERMINAL_CONTROLS.search(out.replace(b"\n", b"")), out
        lines = out.splitlines()
        assert lines[0].startswith(b"     TIME(s) AGENT")
        mine = []
        for line in lines[1:]:
            m = _COLUMN_LINE.match(line)
            assert m is not None, f"a line that is no event: {line!r}"
            if m.group(1) == agent.encode():
                mine.append(line)
        assert len(mine) == len(ours), "one line per event"
        text = b"\n".join(mine).decode()
        assert "[/x]\\x1b[2J\\x9b\\xff" in text  # the comm set by prctl, shown escaped
        assert "/d\\n 99.000000 forged" in text and "/\\x1b]0;T\\x07\\x1b[2J" in text
        assert "'\\x1b]0;owned\\x07' '\\xff\\x9b' 'a\\nFORGED 1 2 3'" in text
    finally:
        shutil.rmtree(base)
