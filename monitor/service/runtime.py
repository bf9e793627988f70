"""Agents and capacity as the daemon builds them from a config and a policy: the merged
agent list, the processes-rule capacity check, and the in-kernel matcher tables.

Pure functions of the config and policy (the `staged` work moves them to policy/ and
model/agents.py). The daemon itself is monitor/service/daemon.py. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monitor.config.settings import AgentSpec, Config
from monitor.model import events
from monitor.model.cmdline import comm_of
from monitor.model.errors import ConfigError, Location
from monitor.policy.rules import EventKind, Policy, ProcessesMatch


def merged_agents(config: Config, policy: Policy) -> tuple[AgentSpec, ...]:
    """Agents from the config, then from the policy; a name defined twice is an error."""
    seen = {a.name for a in config.agents}
    dup = [a.name for a in policy.agents if a.name in seen]
    if dup:
        raise ConfigError([(Location(policy.source), f"agent {n!r} is defined in both "
                            f"{config.source} and the policy: define it once")
                           for n in dup])
    return (*config.agents, *policy.agents)


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


def kernel_matchers(agents: Sequence[AgentSpec], index: Callable[[str], int] | None = None
                    ) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]]]:
    """The in-kernel matcher tables, so the kernel picks what Config.recognise picks.

    The kernel looks up (comm, uid), then (comm, any uid), then uid alone; the config says
    the first agent in file order wins. Entries shadowed by an earlier one are dropped, and
    an any-uid comm entry gets explicit (comm, uid) entries for the uids that earlier
    uid-only agents claim.
    """
    comm_tab: dict[tuple[str, int], int] = {}
    uid_tab: dict[int, int] = {}
    for pos, agent in enumerate(agents):
        idx = index(agent.name) if index is not None else pos
        for m in agent.matchers:
            if not m.in_kernel:
                continue
            if m.comm is None:
                if m.uid is not None:
                    uid_tab.setdefault(m.uid, idx)
                continue
            comm = comm_of(m.comm)
            if m.uid is None:
                comm_tab.setdefault((comm, events.ANY_UID), idx)
                for uid, earlier in uid_tab.items():
                    comm_tab.setdefault((comm, uid), earlier)
            elif m.uid not in uid_tab and (comm, events.ANY_UID) not in comm_tab:
                comm_tab.setdefault((comm, m.uid), idx)
    return ([(c, idx, uid) for (c, uid), idx in comm_tab.items()],
            list(uid_tab.items()))
