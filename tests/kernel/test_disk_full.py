"""Nothing lost when a disk fills: the alert spool and the audit log on a real, full tmpfs.

An unprivileged process (the agent, say) fills a small tmpfs that holds the spool or the
audit log; alerts and verdicts keep coming; then space is freed. Every alert must reach the
receiver (after a restart, too) and every verdict line the audit file, whole, once and in
order; what does not fit in memory is counted; nothing prints a traceback. Needs root (to
mount), like the other kernel tests.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_UID, AS_AGENT, free_port, require_root

from monitor.config.types import AlertSettings
from monitor.observe.alerts import kill_alert
from monitor.observe.auditlog import AuditLog
from monitor.observe.jsonlog import JsonLog
from monitor.observe.notifier import Notifier
from tests.support.alerts import accepted

Mount = Callable[[str], Path]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """mount(size) -> a fresh tmpfs of that size (mode 1777, on a path any user can reach:
    anyone may fill it)."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="agentwatch-disk-"))
    base.chmod(0o755)
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = base / f"disk{len(mounted)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs",
                        str(where)], check=True)
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", "--lazy", str(where)], check=True)
        shutil.rmtree(base)


def fill_as_nobody(disk: Path) -> Path:
    """An unprivileged process writes until the disk is full; returns its file."""
    filler = disk / "filler"
    r = subprocess.run([*AS_AGENT, "dd", "if=/dev/zero", f"of={filler}", "bs=4k"],
                       capture_output=True, text=True)
    assert "No space left on device" in r.stderr, r.stderr
    assert filler.stat().st_uid == AGENT_UID
    return filler


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Webhook:
    """A loopback webhook receiver that keeps every alert id it was sent."""

    def __init__(self, port: int) -> None:
        self.ids: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.ids.extend(a["id"] for a in body["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def notifier(spool: Path, port: int, **kw: Any) -> Notifier:
    n = Notifier(AlertSettings(webhook_url=f"http://127.0.0.1:{port}/hook",
                               spool_dir=str(spool), timeout_seconds=1),
                 retry_initial=0.05, retry_max=0.2, **kw)
    n.start()
    return n


def alert(i: int, size: int = 0) -> Any:
    return kill_alert(agent="claude-code", rule="no-reverse-ssh", action="kill",
                      outcome="killed", reason="ssh requests remote_forward",
                      at=1_750_000_000.0 + i, pid=4000 + i,
                      argv=("ssh", "-R", "9000:localhost:22", "x" * size))


def spooled_names(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "queue").iterdir())


def test_alerts_on_a_full_spool_disk_all_arrive_after_space_returns(
        tmpfs: Mount, capfd: pytest.CaptureFixture[str]) -> None:
    """171 kills while the spool's disk is full and the receiver is down (before: 155 of
    171 lost), then space is freed, the monitor restarts, the receiver comes back."""
    disk = tmpfs("1m")
    spool = disk / "spool"
    port = free_port()  # nobody listens: the receiver is down
    n = notifier(spool, port)
    filler = fill_as_nobody(disk)
    ids = [accepted(n.notify(alert(i))).id for i in range(171)]
    n.flush(5)  # each tried on disk by the spool writer's thread
    assert not [p for p in (spool / "queue").iterdir() if p.name.startswith(".")], \
        "a cut-short temp file is left taking space"
    filler.unlink()  # space is back
    wait_for(lambda: len(spooled_names(spool)) == 171)
    stats = n.sink_stats()
    assert stats.buffered == 0 and stats.dropped == 0 and stats.write_errors >= 1
    n.close()  # the monitor stops (or restarts) before the receiver is back
    hook = Webhook(port)
    try:
        again = notifier(spool, port)
        assert again.drain(15)
        again.close()
    finally:
        hook.close()
    assert sorted(hook.ids) == sorted(ids), "every alert delivered"
    assert len(hook.ids) == 171, "each once"
    assert not (spool / "corrupt").exists()
    assert "Traceback" not in capfd.readouterr().err


def test_alerts_beyond_memory_on_a_full_spool_disk_are_dropped_and_counted(
        tmpfs: Mount) -> None:
    disk = tmpfs("256k")
    spool = disk / "spool"
    port = free_port()
    n = notifier(spool, port, memory_bytes=200_000)
    filler = fill_as_nobody(disk)
    ids = [accepted(n.notify(alert(i, size=10_000))).id for i in range(50)]
    stats = n.sink_stats()
    assert stats.dropped > 0 and stats.buffered + stats.dropped == 50
    filler.unlink()
    wait_for(lambda: n.sink_stats().buffered == 0)
    kept = [json.loads((spool / "queue" / name).read_text())["id"]
            for name in spooled_names(spool)]
    assert kept == ids[stats.dropped:], "the newest kept, in order"
    n.close()


def test_verdicts_on_a_full_audit_disk_are_all_written_whole_once_space_returns(
        tmpfs: Mount, capfd: pytest.CaptureFixture[str]) -> None:
    """138 verdicts with the audit log's disk full (before: 47 tracebacks, 94 missing)."""
    disk = tmpfs("64k")
    path = disk / "log" / "audit.jsonl"
    out = io.StringIO()
    log = JsonLog(stream=out, audit_path=str(path))
    for i in range(5):  # the file's last page is part full: a write is cut mid-line
        log("verdict", rule="no-reverse-ssh", pid=i, outcome="killed", exe="/usr/bin/ssh")
    filler = fill_as_nobody(disk)
    for i in range(5, 143):
        log("verdict", rule="no-reverse-ssh", pid=i, outcome="killed", exe="/usr/bin/ssh")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "--- Logging error ---" not in err, err
    filler.unlink()
    wait_for(lambda: path.read_text().count("\n") >= 143)
    lines = path.read_text().splitlines()
    assert [json.loads(ln)["pid"] for ln in lines] == list(range(143)), \
        "every verdict, whole, once, in order"
    msgs = [json.loads(ln)["msg"] for ln in out.getvalue().splitlines()]
    assert msgs.count("audit log unwritable: lines are kept in memory and retried") == 1
    assert msgs.count("audit log writable again: the lines kept in memory are written") == 1
    assert isinstance(log.audit, AuditLog)
    assert log.audit.stats().dropped == 0 and log.audit.stats().write_errors >= 1
    log.close()
    assert capfd.readouterr().err == ""


def test_audit_lines_beyond_memory_on_a_full_disk_are_dropped_and_counted(
        tmpfs: Mount) -> None:
    disk = tmpfs("64k")
    path = disk / "audit.jsonl"
    audit = AuditLog(str(path), buffer_bytes=10_000, retry_initial=0.05, retry_max=0.2)
    audit.open()
    filler = fill_as_nobody(disk)
    for i in range(100):
        audit.write(json.dumps({"n": i, "pad": "z" * 200}))
    stats = audit.stats()
    assert stats.dropped > 0 and stats.buffered + stats.dropped == 100
    filler.unlink()
    wait_for(lambda: audit.stats().buffered == 0)
    got = [json.loads(ln)["n"] for ln in path.read_text().splitlines()]
    assert got == list(range(stats.dropped, 100)), "the newest kept, whole, in order"
    audit.close()
