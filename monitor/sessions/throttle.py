"""Say a repeating thing at most once per period per key, counting what went unsaid.

For log lines an agent can cause at will (an exec whose command line /proc could not
confirm, an executable not fingerprinted): one line per key per period, carrying how many
were left unsaid since the last. Pure bookkeeping: the caller passes the time in and logs.
"""

from __future__ import annotations


class Throttle:
    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._said: dict[str, tuple[float, int]] = {}  # key -> (last said, unsaid since)

    def say(self, key: str, now: float) -> int | None:
        """None when key was said less than a period ago (counted); else how many went
        unsaid since it was last said (0 the first time), and it counts as said now."""
        said = self._said.get(key)
        if said is not None and now - said[0] < self.period_s:
            self._said[key] = (said[0], said[1] + 1)
            return None
        self._said[key] = (now, 0)
        return 0 if said is None else said[1]

    def clear(self) -> None:
        self._said.clear()
