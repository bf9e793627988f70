"""Compile the kernel-enforceable part of a policy into the contents of the BPF rule maps.

Pure: takes a Policy, returns KernelTables (plain values); monitor/kernel/loader.py writes them.
Kernel-enforceable: connect rules on destination (networks, ports, family, allow-lists) with
action deny/kill/kill-agent, and exec rules on program name alone with action
kill/kill-agent. At most MAX_RULES of them; the rest stay in userspace (and are listed, so
nothing is silently dropped). The kernel's answer must equal monitor/policy/engine.py's answer for
the same rule and destination — a unit test compares them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from monitor.model.cmdline import comm_bytes
from monitor.model.events import MAX_RULES, EventType, KAction, RuleMask
from monitor.policy.rules import Action, ConnectMatch, EventKind, ExecMatch, Mode, Policy, Rule

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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
        return (bool(m.names) and not m.exe and not m.argv and not m.ssh
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
