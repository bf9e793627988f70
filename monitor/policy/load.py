"""Load the policy: file -> bounded YAML with lines -> validated and compiled -> Policy.

The stages: read the file through a trusted path (monitor/config/safefile.py), decode it as
UTF-8, parse it as bounded YAML with line numbers (monitor/config/yamlsource.py), validate
and compile it (monitor/policy/validate.py), then raise every problem at once as one
ConfigError (exit code 2). Also the embedded default policy (monitor/defaults/policy.yaml)
and the checks of a policy against the config it runs with.

This module must never evaluate events, touch the kernel or /proc, or accept a policy that
silently means something other than what it says; it does no work on import.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

from monitor.config.safefile import read_file, utf8_text
from monitor.config.types import Config, UserLookup
from monitor.config.yamlsource import parse_yaml
from monitor.model.errors import ConfigError, Location
from monitor.policy.types import EventKind, Policy, ProcessesMatch
from monitor.policy.validate import PolicyReader


def load_policy_text(text: str, source: str = "<string>", *,
                     user_lookup: UserLookup | None = None) -> Policy:
    """Parse, validate and compile policy text; raises ConfigError listing every problem.

    sha256 is the digest of the text encoded as UTF-8.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return _build(text, source, user_lookup, digest)  # parse_yaml refuses surrogates


def _build(text: str, source: str, user_lookup: UserLookup | None, digest: str) -> Policy:
    root = parse_yaml(text, source)
    reader = PolicyReader(source, user_lookup)
    mode, agents, rules = reader.policy(root)
    reader.problems.raise_if_any()
    assert mode is not None
    return Policy(mode=mode, agents=agents, rules=rules, source=source, sha256=digest,
                  fail_closed=reader.fail_closed)


def load_policy(path: str | Path, *, user_lookup: UserLookup | None = None,
                trusted: bool = False) -> Policy:
    """Read, validate and compile a policy file; raises ConfigError if unreadable or bad.

    sha256 is the digest of the file's bytes (what sha256sum prints for it). With trusted
    (the monitor runs as root), a file an agent could have changed is refused: see
    monitor/config/safefile.py. Every file is read bounded (no FIFO, no device).
    """
    source = str(path)
    data = read_file(path, what="policy file", trusted=trusted)
    return _build(utf8_text(data, source), source, user_lookup, hashlib.sha256(data).hexdigest())


def default_policy() -> Policy:
    """The embedded default policy (monitor/defaults/policy.yaml)."""
    resource = importlib.resources.files("monitor.defaults").joinpath("policy.yaml")
    return load_policy_text(resource.read_text(encoding="utf-8"), str(resource))


def check_capacity(config: Config, policy: Policy) -> None:
    """A processes rule must be able to fire before the kernel's process map is full: a
    map that holds fewer processes than a rule's `above` would fail new processes closed
    (or leave them untracked) before the rule ever saw them."""
    limit = config.monitor.max_processes
    bad = [(r, r.match.above) for r in policy.rules_for(EventKind.PROCESSES)
           if isinstance(r.match, ProcessesMatch) and r.match.above >= limit]
    if bad:
        raise ConfigError([(Location(policy.source, r.line, f"rules.{r.name}.match.above"),
                            f"processes above {above} can never be counted: "
                            f"monitor.max_processes ({limit}, in {config.source}) must be "
                            f"more than that; raise it or lower the rule")
                           for r, above in bad])
