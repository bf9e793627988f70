"""FakeClock: a monotonic clock (monitor.sessions.clock.Clock) that moves only when the test
moves it, so time windows are tested without sleeping.
"""

from __future__ import annotations

from monitor.sessions.clock import Clock


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def monotonic_ns(self) -> int:
        return int(self.now * 1e9)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _check(fake: FakeClock) -> Clock:
    return fake  # mypy: FakeClock satisfies Clock
