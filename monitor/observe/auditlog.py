"""The audit log file: JSON lines appended and rotated by size, kept through a full disk.

`AuditLog.write()` queues a line and writes the queue with plain `os.write` calls on an
O_APPEND descriptor. A write that fails (disk full, quota, I/O error) leaves the rest of
the queue in memory, in order, up to `buffer_bytes`; a background thread retries it with
a capped back-off (and reopens the file, which may have been removed or remounted). A
write cut short by a full disk resumes where it stopped, so a line is never torn or
written twice. When the queue would outgrow its bound, the oldest whole lines are dropped
and counted. What happens is reported through `report` (one line when the trouble starts,
one when it ends, never per line).

This module must never raise into its caller once open, never print a traceback (it does
not use `logging`, whose Handler.handleError prints one per failed line), never call
`report` while holding its lock, and never rename anything but a regular file.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BUFFER_BYTES = 8 * 1024 * 1024  # lines kept in memory while the disk refuses them
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0
# errors that a later write may not meet again: the disk is full, or shared and busy
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR})

Report = Callable[..., None]  # report(msg, level="info", **fields)


@dataclass(frozen=True)
class SinkStats:
    """How a sink that writes to disk is doing (also the alert spool's; monitor/observe/metrics.py
    exports it): records waiting in memory, records lost, failed write attempts."""

    buffered: int = 0
    dropped: int = 0
    write_errors: int = 0


def _ignore(msg: str, level: str = "info", **fields: Any) -> None:
    del msg, level, fields


class AuditLog:
    """One audit file (see the module docstring). Thread-safe."""

    def __init__(self, path: str, *, max_bytes: int = 10 * 1024 * 1024, keep: int = 5,
                 buffer_bytes: int = BUFFER_BYTES, report: Report = _ignore,
                 retry_initial: float = RETRY_INITIAL, retry_max: float = RETRY_MAX) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.buffer_bytes = buffer_bytes
        self.report = report
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._head_done = 0  # bytes of _queue[0] already in the file
        self._fd = -1
        self._size = 0
        self._failing: OSError | None = None  # set while the disk refuses lines
        self._spell_dropped = 0  # self.dropped when the failing spell began
        self._drop_reported = False
        self._closed = False
        self._retrier: threading.Thread | None = None
        self.dropped = 0
        self.write_errors = 0

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory and open the file. Raises OSError for what retrying cannot
        mend (a bad path, permissions); a full disk only starts the in-memory queue."""
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
        except OSError as exc:
            if exc.errno not in TRANSIENT:
                raise
        with self._lock:
            try:
                self._reopen()
            except OSError as exc:
                if exc.errno not in TRANSIENT:
                    raise
                self._failed(exc)
            failing = self._failing
        if failing is not None:
            self._spell_began(failing)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued if the disk lets it, then close; what is still queued is
        counted as dropped and reported."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            retrier = self._retrier
        if retrier is not None:
            retrier.join(timeout)
        with self._lock:
            lost = 0 if self._flush() else self._drop_all()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if lost:
            self.report("audit lines not written: the audit log was still unwritable at stop",
                        level="error", path=self.path, lines=lost)

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(len(self._queue), self.dropped, self.write_errors)

    # --- writing -----------------------------------------------------------------------

    def write(self, line: str) -> None:
        """Append one line (a newline is added). Never raises, never waits for a retry."""
        data = (line + "\n").encode("utf-8", "backslashreplace")
        lost = 0
        with self._lock:
            self._queue.append(data)
            self._queued_bytes += len(data)
            began = None
            if self._failing is None and not self._flush():
                began = self._failing
            dropped = self._trim()
            report_drop = bool(dropped) and not self._drop_reported
            self._drop_reported |= report_drop
            if self._closed and self._queue:  # after close(): nobody would retry
                lost = self._drop_all()
        if report_drop:
            self.report("audit lines dropped: the audit log is unwritable and its memory "
                        "queue is full", level="error", path=self.path, lines=dropped,
                        queue_bytes=self.buffer_bytes)
        if began is not None and not self._closed:
            self._spell_began(began)
        if lost:
            self.report("audit lines not written: the audit log is unwritable and closed",
                        level="error", path=self.path, lines=lost)

    def _trim(self) -> int:
        """Beyond the bound, drop the oldest whole lines (never one the file already holds
        part of); returns how many were dropped."""
        q = self._queue
        first = 1 if self._head_done else 0  # a line half in the file stays
        dropped = 0
        while self._queued_bytes > self.buffer_bytes and len(q) > first:
            victim = q[first]
            del q[first]
            self._queued_bytes -= len(victim)
            dropped += 1
        self.dropped += dropped
        return dropped

    def _drop_all(self) -> int:
        lost = len(self._queue)
        self.dropped += lost
        self._queue.clear()
        self._queued_bytes = self._head_done = 0
        return lost

    def _flush(self) -> bool:
        """Write the queue (lock held); False, and the error noted, if the disk refused."""
        try:
            if self._fd < 0:
                self._reopen()
            while self._queue:
                head = self._queue[0]
                if not self._head_done and self._size + len(head) > self.max_bytes > 0 \
                        and self._size > 0:
                    self._rotate()
                written = os.write(self._fd, memoryview(head)[self._head_done:])
                self._head_done += written
                self._size += written
                if self._head_done == len(head):
                    self._queue.popleft()
                    self._queued_bytes -= len(head)
                    self._head_done = 0
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        self.write_errors += 1
        if self._failing is None:
            self._failing = exc
            self._spell_dropped = self.dropped
            self._drop_reported = False
        if self._fd >= 0:  # reopen at the next try: the file may be gone or remounted
            os.close(self._fd)
            self._fd = -1

    def _reopen(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.keep (regular files only: never /dev/full)."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return
        except FileNotFoundError:
            return
        os.close(self._fd)
        self._fd = -1
        if self.keep > 0:
            for i in range(self.keep - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._reopen()

    # --- retrying ----------------------------------------------------------------------

    def _spell_began(self, exc: OSError) -> None:
        """The disk refused a line: say so once, and retry until it takes them (lock not
        held)."""
        self.report("audit log unwritable: lines are kept in memory and retried",
                    level="error", path=self.path, reason=exc.strerror or str(exc),
                    queue_bytes=self.buffer_bytes)
        with self._lock:
            if self._retrier is None and not self._closed:
                self._retrier = threading.Thread(target=self._retry, daemon=True,
                                                 name="agentwatch-audit-retry")
                self._retrier.start()

    def _retry(self) -> None:
        attempts = 0
        while True:
            with self._lock:
                attempts += 1
                delay = min(self.retry_max, self.retry_initial * 2 ** (attempts - 1))
                deadline = time.monotonic() + delay
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._wake.wait(left)
                if self._closed:
                    self._retrier = None
                    return
                if not self._flush():
                    continue
                dropped = self.dropped - self._spell_dropped
                self._failing = None
                self._retrier = None
            self.report("audit log writable again: the lines kept in memory are written",
                        path=self.path, attempts=attempts, dropped=dropped)
            return
