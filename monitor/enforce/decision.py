"""What the judge decides about a verdict, and what carrying it out came to.

A `Decision` is the judge's answer to one verdict: what to do (nothing, kill the process,
kill the agent session) and the outcome that is meant. The executor (monitor/enforce/
executor.py) turns it into a `Done`: the outcome as it really is (a kill the enforcer could
not carry out is "not enforced"), the text of the log line, whether a kill is counted, how
long the kill took. The reporter (monitor/enforce/reporter.py) reports a Done. Plain values:
nothing here acts, reads the clock of its own accord, or decides policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from monitor.model.outcome import Outcome
from monitor.policy.engine import Verdict

KERNEL = "kernel"  # kill latency paths (monitor.observe.metrics.KILL_PATHS)
USERSPACE = "userspace"


def boot_ns() -> int:
    """CLOCK_BOOTTIME, the clock of the events' timestamps."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def latency_since(event_ts_ns: int) -> float:
    """Seconds from an event to now (never negative)."""
    return max(0, boot_ns() - event_ts_ns) / 1e9


class Step(Enum):
    """What carrying a decision out takes."""

    NOTHING = "nothing"  # logged, counted (and a kernel kill alerted): nothing to do here
    KILL_PROCESS = "kill process"  # the verdict's process, through the enforcer
    KILL_SESSION = "kill session"  # every process of the verdict's agent session


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    step: Step
    outcome: Outcome  # as decided; a kill's is settled by the executor
    detail: str = ""  # what the log line adds to the outcome's text
    event_ts_ns: int | None = None  # the event judged: a userspace kill checks the pid by it
    in_kernel: bool = False  # a rule the kernel matched (and enforced, unless monitoring)
    kernel_kill: bool = False  # the kernel carried out a kill for it: counted as one
    kernel_latency: float | None = None  # seconds from the event to the kernel's kill


@dataclass(frozen=True)
class Done:
    verdict: Verdict
    outcome: Outcome
    text: str  # the verdict log line's `outcome`, as it has always read
    kill: bool = False  # a kill carried out (counted in agentwatch_kills_total)
    latency: tuple[str, float] | None = None  # (KERNEL or USERSPACE, seconds)
    refused: tuple[str, ...] | None = None  # kill-agent: "pid: why" the enforcer refused
