"""Process groups a benchmark starts (an idle agent's forker and its thousands of
children) and stops as a whole, waits with a deadline, and signals that end a benchmark
through its `finally` blocks.

Signals only the process groups it started (by pgid), never processes by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from .harness import Sources, log


def exit_on_signal() -> None:
    """SIGTERM/SIGHUP end the bench through its `finally` blocks (processes stopped)."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - t0


class Group:
    """A process started in its own process group (pgid = its pid); stop_groups() ends it
    with every process it started."""

    def __init__(self, argv: Sequence[str], src: Sources, **kw: Any) -> None:
        self.proc = subprocess.Popen(list(argv), env=src.env, cwd=src.dir,
                                     start_new_session=True, **kw)


def stop_groups(groups: Sequence[Group], timeout: float = 60) -> None:
    """SIGKILL every group, reap the leaders, then wait until no member of any group is
    left (orphans are reaped by init, which on this VM takes about a second: so all the
    groups are waited for together)."""
    for g in groups:
        try:
            os.killpg(g.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            g.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            g.proc.kill()
            g.proc.wait()
    left = [g.proc.pid for g in groups]
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        still = []
        for pgid in left:
            try:
                os.killpg(pgid, 0)
                still.append(pgid)
            except ProcessLookupError:
                pass
        left = still
        if left:
            time.sleep(0.1)
    if left:
        log(f"WARNING: process groups {left} still have members after {timeout:.0f} s")
