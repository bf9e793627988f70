"""Error types for agentwatch.

Every error the tool raises on purpose derives from AgentwatchError, so the CLI can
turn it into one clear sentence and an exit code. This module must never import
anything heavy (no BCC): it is used by unit tests that run without root.
"""

from __future__ import annotations

from dataclasses import dataclass


class AgentwatchError(Exception):
    """Root of every error agentwatch raises on purpose."""

    exit_code = 1


@dataclass(frozen=True)
class Location:
    """Where in a file a problem was found (1-based line, 0 when unknown)."""

    file: str
    line: int = 0
    key: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}" if self.key else where


class ConfigError(AgentwatchError, ValueError):
    """A configuration or policy file is malformed. Carries every problem found."""

    exit_code = 2

    def __init__(self, problems: list[tuple[Location, str]]) -> None:
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"{loc}: {reason}" for loc, reason in self.problems)


class EnvironmentProblem(AgentwatchError):
    """The host lacks something the probes need (BPF, headers, tracefs, root)."""

    exit_code = 3


class ControlError(AgentwatchError):
    """A request over the control socket was refused or the monitor is unreachable."""

    exit_code = 4
