"""The monitor's log: one JSON object per line on stdout (journald keeps it), and the lines
that matter afterwards (verdicts, kill switch uses, policy changes) also in the audit log.

A sink: it writes what it is told, never decides and never acts. A full disk never stops
it: the audit log (observe/auditlog.py) keeps what the disk refused and says so here.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from monitor.model.errors import EnvironmentProblem
from monitor.observe.auditlog import AuditLog

AUDITED = frozenset({"verdict", "killswitch", "policy reloaded", "policy reload refused"})


class JsonLog:
    """Structured log lines (one JSON object each) for stdout / journald; verdicts, kills
    and policy changes also go to the audit log (JSON lines, rotated; monitor/observe/auditlog.py
    keeps them through a full disk) when one is set."""

    def __init__(self, stream: IO[str] | None = None, audit_path: str = "",
                 audit_bytes: int = 10 * 1024 * 1024, audit_keep: int = 5) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.RLock()  # the audit log reports its trouble through here
        self.audit: AuditLog | None = None
        if audit_path:
            self.audit = AuditLog(audit_path, max_bytes=audit_bytes, keep=audit_keep,
                                  report=self)
            try:
                self.audit.open()
            except OSError as e:
                raise EnvironmentProblem(f"cannot open the audit log {audit_path}: "
                                         f"{e.strerror}; fix monitor.audit_log") from None

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "level": level, "msg": msg, **fields},
                          default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
            if self.audit is not None and msg in AUDITED:
                self.audit.write(line)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
