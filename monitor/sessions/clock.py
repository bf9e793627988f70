"""The clock the session code reads: a Protocol, and the system's monotonic clock.

Injected (STYLE 7: the OS is a constructor argument) so unit tests drive time with
tests/support/clock.py instead of sleeping. Only monotonic time: never wall-clock time,
which jumps.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def monotonic_ns(self) -> int: ...


class SystemClock:
    """time.monotonic, time.monotonic_ns."""

    def monotonic(self) -> float:
        return time.monotonic()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()
