"""Log: a fake of the monitor's log (a callable taking a message, a level and fields) that
keeps every line for the test to read back.
"""

from __future__ import annotations

from typing import Any


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        self.lines.append((msg, level, fields))

    def find(self, msg: str) -> list[dict[str, Any]]:
        return [f for m, _, f in self.lines if m == msg]
