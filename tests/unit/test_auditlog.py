"""The audit log when its disk refuses writes: no traceback, no verdict lost while memory
lasts, what does not fit counted and said; rotation as before.

A disk that is full is /dev/full (every write: ENOSPC) behind a symlink; "space is freed"
by pointing the symlink at a regular file: the log reopens its path when it retries.
The real thing (a full tmpfs, lines cut mid-write) is in tests/kernel/test_disk_full.py.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.observe.auditlog import AuditLog
from monitor.observe.jsonlog import JsonLog


class Reports:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        self.lines.append((msg, level, fields))

    def msgs(self) -> list[str]:
        return [m for m, _, _ in self.lines]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def full_disk(tmp_path: Path) -> tuple[Path, Callable[[], Path]]:
    """A log path on a 'full disk', and a function that frees it (returns the file)."""
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    real = tmp_path / "real.jsonl"

    def free() -> Path:
        link.unlink()
        link.symlink_to(real)
        return real

    return link, free


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_verdicts_on_a_full_disk_print_no_traceback_and_are_written_when_space_returns(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    link, free = full_disk(tmp_path)
    out = io.StringIO()
    log = JsonLog(stream=out, audit_path=str(link))
    for i in range(138):
        log("verdict", rule="no-reverse-ssh", pid=1000 + i, outcome="killed")
    err = capfd.readouterr().err
    assert "Traceback" not in err and err == "", err  # logging printed 47 of these
    stdout = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert sum(1 for ln in stdout if ln["msg"] == "verdict") == 138  # the journal has them
    assert any(ln["msg"].startswith("audit log unwritable") for ln in stdout)
    real = free()
    wait_for(lambda: len(lines_of(real)) >= 138)
    written = lines_of(real)
    assert [ln["pid"] for ln in written] == list(range(1000, 1138)), "all, in order, once"
    assert capfd.readouterr().err == ""


def test_beyond_its_memory_bound_the_oldest_lines_are_dropped_counted_and_said(
        tmp_path: Path) -> None:
    link, free = full_disk(tmp_path)
    reports = Reports()
    audit = AuditLog(str(link), buffer_bytes=1000, report=reports, retry_initial=0.05,
                     retry_max=0.1)
    audit.open()
    for i in range(100):
        audit.write(json.dumps({"n": i, "pad": "x" * 80}))  # ~100 bytes a line
    stats = audit.stats()
    assert stats.buffered == 9 and stats.dropped == 91 and stats.write_errors >= 1
    assert reports.msgs().count("audit lines dropped: the audit log is unwritable and its "
                                "memory queue is full") == 1, "said once, not per line"
    real = free()
    wait_for(lambda: audit.stats().buffered == 0)
    assert [ln["n"] for ln in lines_of(real)] == list(range(91, 100)), "the newest kept"
    assert reports.lines[-1][0].startswith("audit log writable again")
    assert reports.lines[-1][2]["dropped"] == 91
    audit.close()


def test_what_is_still_unwritable_at_stop_is_counted_as_dropped(tmp_path: Path) -> None:
    link, _ = full_disk(tmp_path)
    reports = Reports()
    audit = AuditLog(str(link), report=reports, retry_initial=10)
    audit.open()
    for i in range(5):
        audit.write(f'{{"n": {i}}}')
    audit.close()
    assert audit.stats().dropped == 5
    assert reports.lines[-1][0].startswith("audit lines not written")
    assert reports.lines[-1][2]["lines"] == 5


def test_lines_are_rotated_by_size_and_a_device_is_never_renamed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), max_bytes=100, keep=2)
    audit.open()
    for i in range(10):
        audit.write(json.dumps({"n": i, "pad": "y" * 20}))  # 37 bytes: two lines a file
    audit.close()
    assert [ln["n"] for ln in lines_of(path)] == [8, 9]
    assert [ln["n"] for ln in lines_of(tmp_path / "audit.jsonl.1")] == [6, 7]
    assert [ln["n"] for ln in lines_of(tmp_path / "audit.jsonl.2")] == [4, 5]
    assert not (tmp_path / "audit.jsonl.3").exists()
    (tmp_path / "dev").mkdir()
    link, _ = full_disk(tmp_path / "dev")
    dev = AuditLog(str(link), max_bytes=1, retry_initial=10)
    dev.open()
    dev.write("x")
    dev.write("y")
    dev.close()
    assert link.is_symlink() and Path("/dev/full").exists()
    assert not Path(f"{link}.1").exists()


def test_a_path_that_can_never_work_is_refused_at_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        AuditLog(str(tmp_path / "file" / "audit.jsonl")).open()
