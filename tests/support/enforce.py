"""FakeSignaller: stands in for the enforcer's pidfd signaller (monitor.enforce.enforcer.
Signaller) over FakeProbes, so no test ever signals a real process that happens to have a
fixture's pid. A killed process leaves the fake kernel map, as a dead one leaves the real.
"""

from __future__ import annotations

from monitor.enforce.enforcer import Signaller

from .kernel import FakeProbes


class FakeSignaller:
    def __init__(self, kernel: FakeProbes) -> None:
        self.kernel = kernel
        self.killed: list[int] = []
        self._fds: dict[int, int] = {}
        self._next = 100

    def open(self, pid: int) -> int:
        self._next += 1
        self._fds[self._next] = pid
        return self._next

    def kill(self, fd: int) -> None:
        pid = self._fds[fd]
        self.killed.append(pid)
        self.kernel.untrack(pid)

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)


def _check(fake: FakeSignaller) -> Signaller:
    return fake  # mypy: FakeSignaller satisfies Signaller
