"""What became of a verdict: the one vocabulary the judge, the log line, the metrics, the
alerts and `agentwatch top` share.

An `Outcome` is what the monitor did about one matched rule. Its value is its label: the
stable, machine-read name that goes into a streamed record and is read back by `top` (never
parsed out of the log text). Its `text` is how the verdict log line and a kill alert say it,
exactly as they always have ("killed in the kernel", "would kill", "alert", ...); a detail
may follow the text (`describe`). This module holds no state and imports nothing of the
monitor. The enforcer's own KillResult (killed, gone, refused: what one signal did) is a
different thing and lives with the enforcer.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    KILLED = "killed"
    KILLED_IN_KERNEL = "killed_in_kernel"
    REFUSED_IN_KERNEL = "refused_in_kernel"
    WOULD_KILL = "would_kill"
    WOULD_REFUSE = "would_refuse"
    ALERTED = "alerted"
    NOT_ENFORCED = "not_enforced"
    SESSION_KILLED = "session_killed"

    @property
    def label(self) -> str:
        """The name in records and metrics (the enum's value)."""
        return self.value

    @property
    def text(self) -> str:
        """How the verdict log line and a kill alert say it."""
        return _TEXT[self]

    @property
    def killed(self) -> bool:
        """Something was really killed (a kill that counts and pushes an alert)."""
        return self in _KILLED

    @property
    def would(self) -> bool:
        """Monitor mode: what enforce mode would have done, nothing done."""
        return self in _WOULD

    def describe(self, detail: str = "") -> str:
        """The log line's `outcome` field: the text, then the detail if there is one
        ("not enforced: no process named", "agent session killed (3 processes signalled)")."""
        if not detail:
            return self.text
        sep = " " if detail.startswith("(") else ": "
        return f"{self.text}{sep}{detail}"

    @classmethod
    def of_label(cls, label: object) -> Outcome | None:
        """The outcome a record names, or None (a record from an older monitor, or none)."""
        try:
            return cls(str(label))
        except ValueError:
            return None


_TEXT = {
    Outcome.KILLED: "killed",
    Outcome.KILLED_IN_KERNEL: "killed in the kernel",
    Outcome.REFUSED_IN_KERNEL: "refused in the kernel",
    Outcome.WOULD_KILL: "would kill",
    Outcome.WOULD_REFUSE: "would refuse",
    Outcome.ALERTED: "alert",
    Outcome.NOT_ENFORCED: "not enforced",
    Outcome.SESSION_KILLED: "agent session killed",
}
_KILLED = frozenset({Outcome.KILLED, Outcome.KILLED_IN_KERNEL, Outcome.SESSION_KILLED})
_WOULD = frozenset({Outcome.WOULD_KILL, Outcome.WOULD_REFUSE})
