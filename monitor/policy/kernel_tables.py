"""Compile for the kernel: a policy into the contents of the BPF rule maps, and the agents'
matchers into the matcher maps (the one place that does either).

Pure: takes a Policy, returns KernelTables (plain values), whose rule_maps() gives every
key and value of one generation of the rule maps; kernel_matchers() gives the match_comm
and match_uid entries. monitor/kernel/loader.py only writes what these return.
Kernel-enforceable: connect rules on destination (networks, ports, family, allow-lists) with
action deny/kill/kill-agent, and exec rules on program name alone (the comm, or the
executable file's own name) or on `fileless: true` alone, with action kill/kill-agent.
At most MAX_RULES of them; the rest stay in userspace (and are listed, so nothing is
silently dropped). The kernel's answer must equal monitor/policy/engine.py's answer for
the same rule and destination or exec — a unit test compares them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from monitor.model.agents import AgentSpec
from monitor.model.cmdline import comm_bytes
from monitor.model.events import (
    ANY_UID,
    MAX_AGENTS,
    MAX_RULES,
    RULE_MASK_SLOTS,
    EventType,
    KAction,
    RuleMask,
)
from monitor.policy.types import (
    Action,
    ConnectMatch,
    EventKind,
    ExecMatch,
    Mode,
    Network,
    Policy,
    Rule,
)

PORTS = 65536  # port_rules slots per generation: one per port
LPM_GEN_BITS = 8  # net_rules keys start with the generation byte, which the prefix covers

_KACTION = {Action.ALERT: KAction.ALERT, Action.DENY: KAction.DENY, Action.KILL: KAction.KILL,
            Action.KILL_AGENT: KAction.KILL_AGENT}


@dataclass(frozen=True)
class KernelTables:
    rules: tuple[Rule, ...]                      # bit i of every mask is rules[i]
    actions: tuple[KAction, ...]
    masks: Mapping[RuleMask, int]
    networks: tuple[tuple[bytes, int, int], ...]  # (16-byte address, prefix length, mask)
    ports: Mapping[int, int]                     # port -> mask (ports with any bit)
    exec_names: Mapping[bytes, int]              # comm (≤15 bytes) -> mask
    all_agents: int                              # rules scoped to every agent
    by_agent: Mapping[str, int] = field(default_factory=dict)  # extra rules by agent name
    userspace_only: tuple[Rule, ...] = ()        # eligible but over MAX_RULES

    def scope(self, agent: str) -> int:
        return self.all_agents | self.by_agent.get(agent, 0)

    def index(self, rule: Rule) -> int | None:
        for i, r in enumerate(self.rules):
            if r is rule:
                return i
        return None

    def rule_maps(self, agent_names: Sequence[str], gen: int) -> RuleMaps:
        """Every key and value of generation `gen` (0/1) of the rule maps.
        agent_names[i] is the agent of index i; other indices get the all-agents scope."""
        masks = [0] * RULE_MASK_SLOTS
        for k, v in self.masks.items():
            masks[int(k)] = v
        ports = [0] * PORTS
        for port, mask in self.ports.items():
            ports[port] = mask
        acts = [int(a) for a in self.actions]
        return RuleMaps(
            actions=_slots(gen, acts + [0] * (MAX_RULES - len(acts))),
            masks=_slots(gen, masks),
            scopes=_slots(gen, [self.scope(agent_names[i]) if i < len(agent_names)
                                else self.all_agents for i in range(MAX_AGENTS)]),
            ports=_slots(gen, ports),
            networks=tuple((LPM_GEN_BITS + plen, addr, mask)
                           for addr, plen, mask in self.networks),
            exec_names=tuple(self.exec_names.items()))


class Slots(NamedTuple):
    """One generation of an array map: its keys (indices) and their values."""

    keys: range
    values: tuple[int, ...]


def _slots(gen: int, values: Sequence[int]) -> Slots:
    """Generation gen of an array map holds slots [gen * n, gen * n + n)."""
    n = len(values)
    return Slots(range(gen * n, gen * n + n), tuple(values))


@dataclass(frozen=True)
class RuleMaps:
    """The rule maps' contents for one generation, as plain keys and values."""

    actions: Slots  # rule_action: KAction of rule i (MAX_RULES slots)
    masks: Slots  # rule_masks: RuleMask slot -> mask (RULE_MASK_SLOTS slots)
    scopes: Slots  # rule_scope: agent index -> rules in force for it (MAX_AGENTS slots)
    ports: Slots  # port_rules: port -> mask (PORTS slots)
    networks: tuple[tuple[int, bytes, int], ...]  # net_rules: (LPM prefix length, 16-byte
    #                                               address, mask)
    exec_names: tuple[tuple[bytes, int], ...]  # exec_rules: (comm, mask)


def kernel_matchers(agents: Sequence[AgentSpec], index: Callable[[str], int] | None = None
                    ) -> tuple[list[tuple[bytes, int, int]], list[tuple[int, int]]]:
    """The in-kernel matcher tables, so the kernel picks what model.agents.recognise picks.

    Returns the match_comm entries (comm as the kernel holds it, agent index, uid or
    ANY_UID) and the match_uid entries (uid, agent index). The kernel looks up (comm, uid),
    then (comm, any uid), then uid alone; the first agent in file order wins. Entries
    shadowed by an earlier one are dropped, and an any-uid comm entry gets explicit (comm,
    uid) entries for the uids that earlier uid-only agents claim, so each key appears once.
    """
    comm_tab: dict[tuple[bytes, int], int] = {}
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
            comm = comm_bytes(m.comm)
            if m.uid is None:
                comm_tab.setdefault((comm, ANY_UID), idx)
                for uid, earlier in uid_tab.items():
                    comm_tab.setdefault((comm, uid), earlier)
            elif m.uid not in uid_tab and (comm, ANY_UID) not in comm_tab:
                comm_tab.setdefault((comm, m.uid), idx)
    return ([(c, idx, uid) for (c, uid), idx in comm_tab.items()],
            list(uid_tab.items()))


def wake_mask(policy: Policy, tables: KernelTables) -> int:
    """Which record types must wake the monitor at once (Setting.WAKE): those a userspace
    rule may have to kill for at once. Exec always (argv and exe rules, agent candidates);
    kernel verdicts always (a kill-agent is finished from userspace); connects when a
    killing connect rule is not in the kernel. Forks and exits never: a processes rule
    (fork bomb) counts a session's live processes, which a wakeup at most 50 ms later
    still sees, and waking on every fork made a tracked fork+exec loop 1.1x slower."""
    mask = 1 << EventType.EXEC | 1 << EventType.VERDICT
    in_kernel = {id(r) for r in tables.rules}
    if any(id(r) not in in_kernel and r.action in (Action.KILL, Action.KILL_AGENT)
           for r in policy.rules_for(EventKind.CONNECT)):
        mask |= 1 << EventType.CONNECT
    return mask


def connects_need_decisions(policy: Policy, tables: KernelTables) -> bool:
    """Whether some connect rule is judged in userspace (Setting.CONNECT_DECIDE): then a
    connect record may carry a verdict, so the kernel never aggregates a new destination
    away and fails the process closed when the record is lost."""
    in_kernel = {id(r) for r in tables.rules}
    return any(id(r) not in in_kernel for r in policy.rules_for(EventKind.CONNECT))


def kernel_eligible(rule: Rule) -> bool:
    """Whether the kernel can decide this rule by itself (and so enforces it)."""
    if rule.event == EventKind.CONNECT and isinstance(rule.match, ConnectMatch):
        return rule.action in (Action.DENY, Action.KILL, Action.KILL_AGENT)
    if rule.event == EventKind.EXEC and isinstance(rule.match, ExecMatch):
        m = rule.match
        by_name = bool(m.names) and m.fileless is None
        fileless = not m.names and m.fileless is True
        return ((by_name or fileless) and not m.exe and not m.argv and not m.ssh
                and rule.action in (Action.KILL, Action.KILL_AGENT))
    return False


def _as_v6(net: Network) -> tuple[bytes, int]:
    if isinstance(net, ipaddress.IPv4Network):
        return b"\0" * 10 + b"\xff\xff" + net.network_address.packed, net.prefixlen + 96
    return net.network_address.packed, net.prefixlen


def _v6net(addr: bytes, plen: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((int.from_bytes(addr, "big"), plen))


def compile_kernel(policy: Policy) -> KernelTables:
    eligible = [r for r in policy.rules if kernel_eligible(r)]
    rules, overflow = tuple(eligible[:MAX_RULES]), tuple(eligible[MAX_RULES:])
    masks = dict.fromkeys(RuleMask, 0)
    prefix_bits: dict[tuple[bytes, int], int] = {}
    ports: dict[int, int] = {}
    names: dict[bytes, int] = {}
    all_agents = 0
    by_agent: dict[str, int] = {}
    for i, rule in enumerate(rules):
        bit = 1 << i
        if rule.agents is None:
            all_agents |= bit
        else:
            for name in rule.agents:
                by_agent[name] = by_agent.get(name, 0) | bit
        if rule.action in (Action.KILL, Action.KILL_AGENT):
            masks[RuleMask.KILL] |= bit
            masks[RuleMask.DENY] |= bit
        elif rule.action == Action.DENY:
            masks[RuleMask.DENY] |= bit
        m = rule.match
        if isinstance(m, ExecMatch):
            for n in m.names:
                comm = comm_bytes(n)
                names[comm] = names.get(comm, 0) | bit
            if m.fileless:
                masks[RuleMask.FILELESS] |= bit
            continue
        assert isinstance(m, ConnectMatch)
        if m.outside:
            masks[RuleMask.OUTSIDE] |= bit
        if m.family in (None, "ipv4"):
            masks[RuleMask.INET] |= bit
        if m.family in (None, "ipv6"):
            masks[RuleMask.INET6] |= bit
        if m.networks:
            for net in m.networks:
                prefix = _as_v6(net)
                prefix_bits[prefix] = prefix_bits.get(prefix, 0) | bit
        else:
            masks[RuleMask.ANY_ADDR] |= bit
        if m.ports:
            for lo, hi in m.ports:
                for port in range(lo, hi + 1):
                    ports[port] = ports.get(port, 0) | bit
        else:
            masks[RuleMask.ANY_PORT] |= bit
    masks[RuleMask.ENFORCE] = 1 if policy.mode == Mode.ENFORCE else 0
    return KernelTables(rules, tuple(_KACTION[r.action] for r in rules), masks,
                        _lpm_entries(prefix_bits), ports, names, all_agents, by_agent,
                        overflow)


def _lpm_entries(prefix_bits: Mapping[tuple[bytes, int], int]
                 ) -> tuple[tuple[bytes, int, int], ...]:
    """An LPM trie answers with the longest matching prefix only, so each prefix carries
    the bits of every rule whose prefix contains it."""
    nets = [(_v6net(a, p), bits) for (a, p), bits in prefix_bits.items()]
    out = []
    for net, _ in nets:
        bits = 0
        for other, obits in nets:
            if other.prefixlen <= net.prefixlen and net.subnet_of(other):
                bits |= obits
        out.append((net.network_address.packed, net.prefixlen, bits))
    return tuple(sorted(out, key=lambda e: (e[1], e[0])))


def kernel_connect_hits(t: KernelTables, agent: str, address: str, port: int) -> int:
    """What the probes compute for a connect (used to check kernel == engine)."""
    ip = ipaddress.ip_address(address)
    packed = (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed
    v4 = packed[:12] == b"\0" * 10 + b"\xff\xff"
    best: tuple[int, int] | None = None
    for addr, plen, bits in t.networks:
        if int.from_bytes(packed, "big") >> (128 - plen) == int.from_bytes(addr, "big") >> (
                128 - plen) if plen else True:
            if best is None or plen > best[0]:
                best = (plen, bits)
    a = (best[1] if best else 0) | t.masks[RuleMask.ANY_ADDR]
    p = t.ports.get(port, 0) | t.masks[RuleMask.ANY_PORT]
    fam = t.masks[RuleMask.INET] if v4 else t.masks[RuleMask.INET6]
    return ((a & p) ^ t.masks[RuleMask.OUTSIDE]) & fam & t.scope(agent)


def rules_of(mask: int, rules: Iterable[Rule]) -> list[Rule]:
    return [r for i, r in enumerate(rules) if mask >> i & 1]


def kernel_exec_hits(t: KernelTables, agent: str, comm: str, file: str,
                     fileless: bool) -> int:
    """What the probes compute for an exec (used to check kernel == engine): the name rules
    of the comm and of the executable file's name (as engine.file_name gives it), and the
    fileless rules."""
    hit = t.exec_names.get(comm_bytes(comm), 0) | t.exec_names.get(comm_bytes(file), 0)
    if fileless:
        hit |= t.masks[RuleMask.FILELESS]
    return hit & t.scope(agent)
