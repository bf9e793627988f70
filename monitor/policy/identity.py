"""Program identity by content, the policy's side: which host binaries a policy names, what
their fingerprints say about an exec, and the name a program goes by.

A rule that names a program (`name:`, the `ssh:` matcher) means that program wherever it
sits and whatever it is called: a byte-identical copy of /usr/bin/ssh named `notssh` is ssh.
The monitor fingerprints, when a policy comes into force, the host binaries the policy names
(monitor/sessions/hostbins.py) and every agent exec (monitor/sessions/identity.py); this
module holds the result as a value (HostBinaries) and answers the engine's questions about
it. Pure: it never reads a file, /proc or the clock, and never logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from monitor.policy.types import EventKind, ExecMatch, Policy

SSH = "ssh"
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class HostBinaries:
    """Fingerprints of the host binaries that rules name.

    `prints`: sha256 -> {program name: path it was found at}; `sizes`: the sizes of those
    files (a file of another size cannot be a copy of any of them, so it need not be read to
    know that)."""

    prints: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    sizes: frozenset[int] = frozenset()
    # what the files looked at were when fingerprinted ((path, identity or None), ...): a
    # package upgrade changes it (monitor/sessions/hostbins.py looks again)
    files: tuple[tuple[str, tuple[int, ...] | None], ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, found: Iterable[tuple[str, str, str, int]],
           files: tuple[tuple[str, tuple[int, ...] | None], ...] = ()) -> HostBinaries:
        """From (name, path, sha256, size) of each binary found."""
        prints: dict[str, dict[str, str]] = {}
        sizes: set[int] = set()
        for name, path, sha256, size in found:
            prints.setdefault(sha256, {}).setdefault(name, path)
            sizes.add(size)
        return cls(prints, frozenset(sizes), files)

    def copy_of(self, sha256: str | None) -> Mapping[str, str]:
        """{name: path} of the host binaries whose content is exactly this; {} if none."""
        return self.prints.get(sha256, {}) if sha256 else {}

    def names(self) -> frozenset[str]:
        return frozenset(n for by_name in self.prints.values() for n in by_name)


NO_HOST_BINARIES = HostBinaries()


def named_programs(policy: Policy) -> frozenset[str]:
    """The program names a policy's exec rules name: every `name:`, and ssh when a rule has
    an `ssh:` condition. These are the host binaries fingerprinted when it comes into force."""
    names: set[str] = set()
    for rule in policy.rules_for(EventKind.EXEC):
        if isinstance(rule.match, ExecMatch):
            names |= rule.match.names
            if rule.match.ssh:
                names.add(SSH)
    return frozenset(names)


def short_hash(sha256: str) -> str:
    """A hash as a reason shows it (the verdict carries it whole)."""
    return sha256[:16] + "…"
