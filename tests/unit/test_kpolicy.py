"""Unit tests for monitor.policy.kernel_tables: which rules the kernel enforces, and that the
BPF map
contents make the kernel give the same answer as monitor/policy/engine.py for every destination.

kernel_connect_hits reproduces connect_hits() in probes/agentwatch.bpf.c: an LPM-trie
lookup of the destination as a 16-byte (IPv4-mapped) address, which returns the entry of
the longest matching prefix only; a port array lookup; then
((addr | ANY_ADDR) & (port | ANY_PORT)) ^ OUTSIDE, masked by the destination's family
(IPv4 for IPv4 and IPv4-mapped addresses) and by the agent's scope. The equivalence tests
compare that with engine.match_connect rule by rule, over thousands of destinations.
"""

from __future__ import annotations

import ipaddress
import random
import textwrap
from collections.abc import Iterator

import pytest

from monitor.model.events import (
    ANY_UID,
    COMM_LEN,
    MAX_AGENTS,
    MAX_RULES,
    RULE_MASK_SLOTS,
    EventType,
    KAction,
    RuleMask,
)
from monitor.policy.engine import match_connect, match_exec
from monitor.policy.kernel_tables import (
    LPM_GEN_BITS,
    PORTS,
    KernelTables,
    compile_kernel,
    kernel_connect_hits,
    kernel_eligible,
    kernel_matchers,
    rules_of,
    wake_mask,
)
from monitor.policy.load import default_policy, load_policy_text
from monitor.policy.types import Action, ConnectMatch, EventKind, ExecMatch, Policy

AF_INET, AF_INET6 = 2, 10
MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def policy(text: str) -> Policy:
    return load_policy_text(textwrap.dedent(text), "test.yaml")


AGENTS = """\
agents:
  - {name: bot, match: [{comm: bot}]}
  - {name: ci, match: [{comm: ci}]}
  - {name: other, match: [{comm: other}]}
"""


def with_agents(rules: str, mode: str = "enforce") -> Policy:
    return policy(f"mode: {mode}\n{AGENTS}rules:\n" + textwrap.dedent(rules))


# --- the policies the equivalence is checked on ----------------------------------------------

OVERLAPPING = """\
- name: ten
  event: connect
  action: deny
  match: {address: [10.0.0.0/8]}
- name: ten-one
  event: connect
  action: kill
  match: {address: [10.1.0.0/16], port: [22, "8000-8080"]}
- name: ten-one-two-host
  event: connect
  action: kill-agent
  agents: [bot]
  match: {address: [10.1.2.3/32]}
- name: ten-alert
  event: connect
  action: alert
  match: {address: [10.0.0.0/8]}
"""

IPV6 = """\
- name: doc-net
  event: connect
  action: deny
  match: {address: ["2001:db8::/32"], port: [443]}
- name: doc-sub
  event: connect
  action: kill
  match: {address: ["2001:db8:1::/48", "2001:db8:1:2::/64"]}
- name: everything-v6
  event: connect
  action: deny
  agents: [ci]
  match: {address: ["::/0"], port: ["5555-5560"]}
- name: ula
  event: connect
  action: kill
  match: {address: ["fc00::/7"], family: ipv6}
- name: zero-net-v6-only
  event: connect
  action: deny
  match: {address: ["::/0"], family: ipv6, port: [53]}
- name: compat-prefix
  event: connect
  action: deny
  match: {address: ["::/64"], port: [9999]}
"""

ALLOW_LIST = """\
- name: ci-egress
  event: connect
  action: deny
  agents: [ci]
  match:
    outside:
      address: [127.0.0.0/8, "::1", 10.0.0.0/8, "::ffff:192.168.0.0/112"]
      port: [443, 22, "8000-8010"]
- name: bot-egress-ports
  event: connect
  action: kill
  agents: [bot]
  match:
    outside: {port: ["1-1023"]}
- name: bot-v4-only-allow
  event: connect
  action: deny
  agents: [bot]
  match:
    family: ipv4
    outside: {address: [192.0.2.0/24]}
"""

FAMILY_AND_PORTS = """\
- name: no-ipv6
  event: connect
  action: deny
  agents: [other]
  match: {family: ipv6}
- name: no-ipv4-high
  event: connect
  action: kill
  match: {family: ipv4, port: ["60000-65535"]}
- name: low-ports
  event: connect
  action: deny
  match: {port: [1, "2-3", 7, "65535"]}
- name: mapped-written
  event: connect
  action: kill
  match: {address: ["::ffff:198.51.100.0/120", "::ffff:203.0.113.7"], port: ["1000-1999"]}
- name: zero-net-v4
  event: connect
  action: deny
  match: {address: [0.0.0.0/0], port: [25]}
- name: everything
  event: connect
  action: deny
  agents: [ci]
  match: {address: ["::/0"]}
"""


POLICIES: dict[str, Policy] = {
    "default": default_policy(),
    "overlapping": with_agents(OVERLAPPING),
    "ipv6": with_agents(IPV6),
    "allow-list": with_agents(ALLOW_LIST),
    "family-and-ports": with_agents(FAMILY_AND_PORTS),
    "all-together": with_agents(OVERLAPPING + IPV6 + ALLOW_LIST + FAMILY_AND_PORTS),
}


# --- destinations: edges of every network and port range, then random ones -------------------


def _v4_forms(ip: ipaddress.IPv4Address) -> list[str]:
    """An IPv4 destination as an IPv4 socket and as an IPv6 socket (both printings)."""
    mapped = ipaddress.IPv6Address(int(ip) | 0xFFFF_0000_0000)
    return [str(ip), f"::ffff:{ip}", mapped.compressed]


def _edge_addresses(p: Policy) -> list[str]:
    out: list[str] = []
    for rule in p.rules_for(EventKind.CONNECT):
        assert isinstance(rule.match, ConnectMatch)
        for net in rule.match.networks:
            top = (1 << net.max_prefixlen) - 1
            lo, hi = int(net.network_address), int(net.broadcast_address)
            for value in {lo, hi, max(lo - 1, 0), min(hi + 1, top), (lo + hi) // 2}:
                if net.version == 4:
                    out += _v4_forms(ipaddress.IPv4Address(value))
                else:
                    out.append(str(ipaddress.IPv6Address(value)))
    out += ["0.0.0.0", "255.255.255.255", "127.0.0.1", "::", "::1",
            "::ffff:0.0.0.0", "::ffff:255.255.255.255", "::fffe:ffff:ffff",
            "::1:0:0:0", "::10.1.2.3",  # IPv4-compatible (deprecated): IPv6, not IPv4
            "64:ff9b::10.1.2.3",  # NAT64: IPv6
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]
    return out


def _edge_ports(p: Policy) -> list[int]:
    ports = {1, 2, 22, 80, 443, 65534, 65535}
    for rule in p.rules_for(EventKind.CONNECT):
        assert isinstance(rule.match, ConnectMatch)
        for lo, hi in rule.match.ports:
            ports |= {lo - 1, lo, lo + 1, hi - 1, hi, hi + 1}
    return sorted(port for port in ports if 1 <= port <= 65535)


def _random_address(rng: random.Random, edges: list[str]) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    if kind == 1:
        return rng.choice(_v4_forms(ipaddress.IPv4Address(rng.getrandbits(32))))
    if kind == 2:
        return str(ipaddress.IPv6Address(rng.getrandbits(128)))
    if kind == 3:  # near a written network: same high bits, random low bits
        base = ipaddress.ip_address(rng.choice(edges))
        bits = base.max_prefixlen
        keep = rng.randrange(bits)
        value = (int(base) >> (bits - keep) << (bits - keep)) | rng.getrandbits(bits - keep)
        return str(ipaddress.ip_address(value) if bits == 128
                   else ipaddress.IPv4Address(value))
    if kind == 4:  # ULA, documentation and global unicast IPv6
        prefix = rng.choice([0xFC, 0xFD, 0x20, 0x26, 0x2A])
        return str(ipaddress.IPv6Address(prefix << 120 | rng.getrandbits(120)))
    return rng.choice(edges)


def destinations(p: Policy, n: int, seed: int) -> Iterator[tuple[int, str, int]]:
    """(socket family, address as the decoder prints it, port): every edge address with
    ten of the edge ports, then n random ones."""
    rng = random.Random(seed)
    addresses, ports = _edge_addresses(p), _edge_ports(p)
    for address in addresses:
        for port in rng.sample(ports, min(10, len(ports))):
            yield (AF_INET6 if ":" in address else AF_INET), address, port
    for _ in range(n):
        address = _random_address(rng, addresses)
        port = rng.choice(ports) if rng.random() < 0.5 else rng.randint(1, 65535)
        yield (AF_INET6 if ":" in address else AF_INET), address, port


def kernel_names(t: KernelTables, mask: int) -> list[str]:
    return [r.name for r in rules_of(mask, t.rules)]


@pytest.mark.parametrize("name", list(POLICIES))
def test_kernel_connect_hits_equal_engine_matches(name: str) -> None:
    p = POLICIES[name]
    t = compile_kernel(p)
    kernel_connect_rules = [r for r in t.rules if r.event == EventKind.CONNECT]
    assert kernel_connect_rules, "the policy must have kernel connect rules to compare"
    # one agent of each scope (agents to which the same rules apply answer alike)
    by_scope = {frozenset(r.name for r in p.rules if p.applies(r, a)): a
                for a in ["not-an-agent-of-the-policy"] + [a.name for a in p.agents]}
    agents = list(by_scope.values())
    seed = sum(map(ord, name))  # fixed: the same destinations on every run
    hit = missed = 0
    for family, address, port in destinations(p, 3000, seed):
        for agent in agents:
            engine = {r.name for r in kernel_connect_rules
                      if match_connect(r, agent, family, address, port)}
            kernel = set(kernel_names(t, kernel_connect_hits(t, agent, address, port)))
            assert kernel == engine, (agent, address, port)
            hit += bool(engine)
            missed += not engine
    assert hit > 200 and missed > 200, "the destinations must exercise both answers"


def hits(name: str, agent: str, address: str, port: int) -> list[str]:
    t = compile_kernel(POLICIES[name])
    return kernel_names(t, kernel_connect_hits(t, agent, address, port))


def test_overlapping_networks_in_the_kernel() -> None:
    assert hits("overlapping", "bot", "10.1.2.3", 8080) == ["ten", "ten-one",
                                                           "ten-one-two-host"]
    assert hits("overlapping", "ci", "10.1.2.3", 8080) == ["ten", "ten-one"]
    assert hits("overlapping", "bot", "10.1.2.3", 8081) == ["ten", "ten-one-two-host"]
    assert hits("overlapping", "bot", "10.1.2.4", 22) == ["ten", "ten-one"]
    assert hits("overlapping", "bot", "::ffff:10.1.255.255", 22) == ["ten", "ten-one"]
    assert hits("overlapping", "bot", "::ffff:a02:0", 22) == ["ten"]
    assert hits("overlapping", "bot", "10.255.255.255", 9) == ["ten"]
    assert hits("overlapping", "bot", "11.0.0.0", 22) == []
    assert hits("overlapping", "bot", "9.255.255.255", 22) == []


def test_ipv6_networks_in_the_kernel() -> None:
    assert hits("ipv6", "bot", "2001:db8:1:2::5", 443) == ["doc-net", "doc-sub"]
    assert hits("ipv6", "bot", "2001:db8:2::5", 443) == ["doc-net"]
    assert hits("ipv6", "bot", "2001:db8:2::5", 444) == []
    assert hits("ipv6", "bot", "2001:db9::1", 53) == ["zero-net-v6-only"]
    assert hits("ipv6", "bot", "1.2.3.4", 53) == []  # ::/0 with family ipv6: no IPv4
    assert hits("ipv6", "ci", "1.2.3.4", 5560) == ["everything-v6"]  # ::/0 holds IPv4
    assert hits("ipv6", "ci", "::ffff:1.2.3.4", 5555) == ["everything-v6"]
    assert hits("ipv6", "bot", "1.2.3.4", 5555) == []  # scoped to ci
    assert hits("ipv6", "bot", "fdff:ffff::1", 1) == ["ula"]
    assert hits("ipv6", "bot", "fe00::1", 1) == []
    assert hits("ipv6", "bot", "1.2.3.4", 9999) == ["compat-prefix"]  # ::/64 holds IPv4
    assert hits("ipv6", "bot", "::10.1.2.3", 9999) == ["compat-prefix"]
    assert hits("ipv6", "bot", "0:0:0:1::", 9999) == []


def test_allow_lists_in_the_kernel() -> None:
    assert hits("allow-list", "ci", "127.0.0.1", 443) == []
    assert hits("allow-list", "ci", "::1", 8010) == []
    assert hits("allow-list", "ci", "::ffff:192.168.3.4", 22) == []
    assert hits("allow-list", "ci", "192.168.3.4", 8011) == ["ci-egress"]
    assert hits("allow-list", "ci", "192.169.0.0", 443) == ["ci-egress"]
    assert hits("allow-list", "ci", "::2", 443) == ["ci-egress"]
    assert hits("allow-list", "bot", "192.168.3.4", 8011) == ["bot-egress-ports",
                                                             "bot-v4-only-allow"]
    assert hits("allow-list", "bot", "8.8.8.8", 1023) == ["bot-v4-only-allow"]
    assert hits("allow-list", "bot", "192.0.2.255", 1023) == []
    assert hits("allow-list", "bot", "2001:4860::8888", 1024) == ["bot-egress-ports"]
    assert hits("allow-list", "other", "8.8.8.8", 65535) == []


def test_family_only_rules_and_port_ranges_in_the_kernel() -> None:
    assert hits("family-and-ports", "other", "2001:db8::1", 443) == ["no-ipv6"]
    assert hits("family-and-ports", "other", "::ffff:1.2.3.4", 443) == []  # it is IPv4
    assert hits("family-and-ports", "bot", "2001:db8::1", 443) == []
    assert hits("family-and-ports", "bot", "1.2.3.4", 59999) == []
    assert hits("family-and-ports", "bot", "1.2.3.4", 60000) == ["no-ipv4-high"]
    assert hits("family-and-ports", "bot", "1.2.3.4", 65535) == ["no-ipv4-high",
                                                                 "low-ports"]
    assert hits("family-and-ports", "bot", "::1", 65535) == ["low-ports"]
    assert [hits("family-and-ports", "bot", "::1", port) for port in range(1, 9)] == [
        ["low-ports"], ["low-ports"], ["low-ports"], [], [], [], ["low-ports"], []]
    assert hits("family-and-ports", "bot", "198.51.100.255", 1999) == ["mapped-written"]
    assert hits("family-and-ports", "bot", "::ffff:198.51.100.0", 1000) == [
        "mapped-written"]
    assert hits("family-and-ports", "bot", "198.51.101.0", 1999) == []
    assert hits("family-and-ports", "bot", "203.0.113.7", 1500) == ["mapped-written"]
    assert hits("family-and-ports", "bot", "203.0.113.8", 1500) == []
    assert hits("family-and-ports", "bot", "203.0.113.7", 25) == ["zero-net-v4"]
    assert hits("family-and-ports", "bot", "2001:db8::25", 25) == []
    assert hits("family-and-ports", "ci", "2001:db8::25", 25) == ["everything"]
    assert hits("family-and-ports", "ci", "10.0.0.1", 80) == ["everything"]


def test_default_policy_kernel_answers() -> None:
    t = compile_kernel(default_policy())
    assert kernel_names(t, kernel_connect_hits(t, "claude-code", "45.9.8.7", 3333)) == [
        "mining-pool-ports"]
    assert kernel_names(t, kernel_connect_hits(t, "codex", "::ffff:45.9.8.7", 14444)) == [
        "mining-pool-ports"]
    assert kernel_names(t, kernel_connect_hits(t, "aider", "2606:4700::1", 45700)) == [
        "mining-pool-ports"]
    for address, port in [("10.0.0.5", 3333), ("127.0.0.1", 4444), ("45.9.8.7", 443),
                          ("100.64.0.1", 3333), ("169.254.169.254", 80), ("fd00::1", 3333)]:
        assert kernel_connect_hits(t, "claude-code", address, port) == 0, (address, port)


# --- exec names ------------------------------------------------------------------------------


def test_exec_names_are_cut_to_the_kernels_comm() -> None:
    p = with_agents("""\
        - name: long
          event: exec
          action: kill
          match: {name: [abcdefghijklmnopqrstuvwxyz, short, exactly15chars_]}
        - name: long-too
          event: exec
          action: kill-agent
          agents: [bot]
          match: {name: [abcdefghijklmnoXYZ]}
        """)
    t = compile_kernel(p)
    assert dict(t.exec_names) == {b"abcdefghijklmno": 0b11, b"short": 0b01,
                                  b"exactly15chars_": 0b01}
    assert all(len(comm) <= COMM_LEN - 1 for comm in t.exec_names)
    # what the kernel decides on a comm equals what the engine decides on that comm
    for comm in ["abcdefghijklmno", "short", "exactly15chars_", "shorter", "abcdefghijklmn"]:
        for agent in ["bot", "ci"]:
            kernel = t.exec_names.get(comm.encode(), 0) & t.scope(agent)
            engine = {r.name for r in t.rules
                      if match_exec(r, agent, "/opt/x/renamed", comm, [comm])}
            assert set(kernel_names(t, kernel)) == engine, (comm, agent)


def test_exec_names_cut_inside_a_utf8_character_match_in_kernel_and_engine() -> None:
    p = with_agents("""\
        - name: accents
          event: exec
          action: kill
          match: {name: ["ééééééééé"]}
        """)
    t = compile_kernel(p)
    raw = "ééééééééé".encode()[: COMM_LEN - 1]  # what the kernel's comm holds
    assert t.exec_names.get(raw, 0) == 1  # the kernel kills it
    comm = raw.decode("utf-8", "surrogateescape")  # what monitor/kernel/abi.py decodes
    assert match_exec(p.rules[0], "bot", "/opt/x/renamed", comm, [comm])


# --- which rules the kernel enforces ---------------------------------------------------------


ELIGIBILITY = """\
- {name: c-deny, event: connect, action: deny, match: {port: [1]}}
- {name: c-kill, event: connect, action: kill, match: {port: [2]}}
- {name: c-kill-agent, event: connect, action: kill-agent, match: {port: [3]}}
- {name: c-alert, event: connect, action: alert, match: {port: [4]}}
- {name: e-kill, event: exec, action: kill, match: {name: [a]}}
- {name: e-kill-agent, event: exec, action: kill-agent, match: {name: [b]}}
- {name: e-alert, event: exec, action: alert, match: {name: [c]}}
- {name: e-name-argv, event: exec, action: kill, match: {name: [d], argv: [x]}}
- {name: e-name-exe, event: exec, action: kill, match: {name: [e], exe: [/tmp/*]}}
- {name: e-name-ssh, event: exec, action: kill, match: {name: [ssh], ssh: [tunnel]}}
- {name: e-exe, event: exec, action: kill, match: {exe: [/tmp/*]}}
- {name: e-argv, event: exec, action: kill-agent, match: {argv: [stratum]}}
- {name: e-ssh, event: exec, action: kill, match: {ssh: [remote_forward]}}
- {name: cpu, event: cpu, action: kill-agent, match: {cores: 1, for: 1m}}
- {name: procs, event: processes, action: kill-agent, match: {above: 10}}
"""


def test_kernel_eligible_rules() -> None:
    p = with_agents(ELIGIBILITY)
    eligible = [r.name for r in p.rules if kernel_eligible(r)]
    assert eligible == ["c-deny", "c-kill", "c-kill-agent", "e-kill", "e-kill-agent"]
    t = compile_kernel(p)
    assert [r.name for r in t.rules] == eligible
    assert t.actions == (KAction.DENY, KAction.KILL, KAction.KILL_AGENT, KAction.KILL,
                         KAction.KILL_AGENT)
    assert t.userspace_only == ()
    assert t.masks[RuleMask.KILL] == 0b11110  # kill and kill-agent
    assert t.masks[RuleMask.DENY] == 0b11111  # deny, and every kill refuses too
    assert t.masks[RuleMask.INET] == t.masks[RuleMask.INET6] == 0b00111  # connect rules only
    assert dict(t.exec_names) == {b"a": 0b01000, b"b": 0b10000}
    assert dict(t.ports) == {1: 0b001, 2: 0b010, 3: 0b100}


def test_default_policy_in_the_kernel() -> None:
    p = default_policy()
    t = compile_kernel(p)
    assert [r.name for r in t.rules] == ["no-miners", "no-tunnel-tools", "mining-pool-ports"]
    assert t.userspace_only == ()
    assert t.exec_names[b"xmrig"] == 1 << 0
    assert t.exec_names[b"ngrok"] == 1 << 1
    assert t.exec_names[b"SRBMiner-MULTI"] == 1 << 0
    assert b"ssh" not in t.exec_names and b"cloudflared" not in t.exec_names
    assert t.ports[3333] == 1 << 2 and 443 not in t.ports
    assert t.all_agents == 0b111 and dict(t.by_agent) == {}


def test_rules_beyond_the_kernel_limit_stay_in_userspace_in_order() -> None:
    rules = []
    for i in range(MAX_RULES + 6):
        rules.append(f"- {{name: r{i}, event: connect, action: deny, match: {{port: [{i + 1}]}}}}")
        if i % 10 == 0:  # rules that are never the kernel's do not take a slot
            rules.append(f"- {{name: a{i}, event: connect, action: alert, "
                         f"match: {{port: [{i + 1}]}}}}")
    p = with_agents("\n".join(rules) + "\n")
    t = compile_kernel(p)
    assert [r.name for r in t.rules] == [f"r{i}" for i in range(MAX_RULES)]
    assert [r.name for r in t.userspace_only] == [f"r{i}" for i in range(MAX_RULES, MAX_RULES + 6)]
    assert len(t.actions) == MAX_RULES
    every = (1 << MAX_RULES) - 1
    assert all(0 <= m <= every for m in t.masks.values())
    assert all(0 <= m <= every for m in t.ports.values())
    assert t.ports[MAX_RULES] == 1 << (MAX_RULES - 1)
    assert MAX_RULES + 1 not in t.ports  # the 65th rule's port is not in the kernel map
    assert kernel_connect_hits(t, "bot", "1.2.3.4", MAX_RULES + 1) == 0
    assert t.index(p.rules[-1]) is None


def test_scope_masks_per_agent() -> None:
    p = with_agents("""\
        - {name: everyone, event: connect, action: deny, match: {port: [1]}}
        - {name: bot-only, event: connect, action: deny, agents: [bot], match: {port: [2]}}
        - {name: bot-and-ci, event: exec, action: kill, agents: [bot, ci], match: {name: [x]}}
        - {name: alert-ci, event: connect, action: alert, agents: [ci], match: {port: [3]}}
        - {name: ci-only, event: connect, action: kill, agents: [ci], match: {port: [4]}}
        """)
    t = compile_kernel(p)
    assert [r.name for r in t.rules] == ["everyone", "bot-only", "bot-and-ci", "ci-only"]
    assert t.all_agents == 0b0001
    assert t.scope("bot") == 0b0111
    assert t.scope("ci") == 0b1101
    assert t.scope("other") == 0b0001
    assert t.scope("unknown") == 0b0001
    assert kernel_names(t, kernel_connect_hits(t, "ci", "1.2.3.4", 2)) == []
    assert kernel_names(t, kernel_connect_hits(t, "bot", "1.2.3.4", 2)) == ["bot-only"]


def _as_v6(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv6Network:
    if net.version == 4:
        return ipaddress.IPv6Network((int(net.network_address) | 0xFFFF_0000_0000,
                                      net.prefixlen + 96))
    return ipaddress.IPv6Network(net)


@pytest.mark.parametrize("name", list(POLICIES))
def test_lpm_entries_carry_every_containing_prefix(name: str) -> None:
    p = POLICIES[name]
    t = compile_kernel(p)
    written: dict[ipaddress.IPv6Network, int] = {}
    for i, rule in enumerate(t.rules):
        if isinstance(rule.match, ConnectMatch):
            for net in rule.match.networks:
                written[_as_v6(net)] = written.get(_as_v6(net), 0) | 1 << i
    entries = {ipaddress.IPv6Network((int.from_bytes(addr, "big"), plen)): bits
               for addr, plen, bits in t.networks}
    assert len(entries) == len(t.networks), "one entry per prefix"
    assert set(entries) == set(written)
    for net, bits in entries.items():
        expected = 0
        for other, obits in written.items():
            if net.subnet_of(other):
                expected |= obits
        assert bits == expected, net


def test_lpm_entries_for_overlapping_networks() -> None:
    t = compile_kernel(POLICIES["overlapping"])
    entries = {(str(ipaddress.IPv6Address(a)), plen): bits for a, plen, bits in t.networks}
    assert entries == {
        ("::ffff:a00:0", 104): 0b001,  # 10.0.0.0/8: ten
        ("::ffff:a01:0", 112): 0b011,  # 10.1.0.0/16: ten-one, and ten
        ("::ffff:a01:203", 128): 0b111,  # 10.1.2.3/32: all three
    }
    assert t.masks[RuleMask.ANY_ADDR] == 0
    assert t.masks[RuleMask.ANY_PORT] == 0b101


def test_ipv6_networks_that_hold_ipv4() -> None:
    """::/0 (and any IPv6 prefix holding ::ffff:0:0/96) is one trie entry that IPv4
    destinations reach too; a mapped network written in the policy is compiled as IPv4."""
    t = compile_kernel(POLICIES["ipv6"])
    zero = [bits for a, plen, bits in t.networks if plen == 0]
    assert kernel_names(t, zero[0]) == ["everything-v6", "zero-net-v6-only"]
    rule = POLICIES["family-and-ports"].rule("mapped-written")
    assert rule is not None and isinstance(rule.match, ConnectMatch)
    assert rule.match.networks == (ipaddress.ip_network("198.51.100.0/24"),
                                   ipaddress.ip_network("203.0.113.7/32"))


def test_compile_is_pure_and_masks_only_use_kernel_rules() -> None:
    p = POLICIES["all-together"]
    first, second = compile_kernel(p), compile_kernel(p)
    assert first == second
    for rule in first.rules:
        assert kernel_eligible(rule)
        assert isinstance(rule.match, ConnectMatch | ExecMatch)
        assert rule.action in (Action.DENY, Action.KILL, Action.KILL_AGENT)


# --- which records wake the monitor at once ---------------------------------------------------


def woken(p: Policy) -> set[EventType]:
    mask = wake_mask(p, compile_kernel(p))
    return {t for t in EventType if mask >> t & 1}


def test_exec_and_kernel_verdicts_always_wake_forks_and_exits_never() -> None:
    # the default policy kills by argv in userspace and has a processes rule (fork bomb);
    # its killing connect rules all fit in the kernel
    assert woken(default_policy()) == {EventType.EXEC, EventType.VERDICT}


def test_connects_wake_when_a_killing_connect_rule_is_left_to_userspace() -> None:
    ports = [(p, "kill") for p in range(5000, 5000 + MAX_RULES)] + [(6000, "alert")]
    rules = "".join(f"""
  - name: port-{port}
    event: connect
    action: {action}
    match: {{port: [{port}]}}""" for port, action in ports)
    alerts_over = with_agents(rules)  # the kernel holds MAX_RULES: the alert rule is left out
    assert [r.name for r in compile_kernel(alerts_over).rules] == [
        f"port-{p}" for p in range(5000, 5000 + MAX_RULES)]
    assert EventType.CONNECT not in woken(alerts_over)
    kill_over = with_agents(rules.replace("action: alert", "action: kill"))
    assert EventType.CONNECT in woken(kill_over)


# --- what the loader writes: every key and value of one generation -------------------------


@pytest.mark.parametrize("gen", [0, 1])
def test_rule_maps_fill_one_generation_of_every_array_map(gen: int) -> None:
    p = with_agents(OVERLAPPING + """\
- name: no-miner
  event: exec
  action: kill
  agents: [ci]
  match: {name: [xmrig]}
""")
    t = compile_kernel(p)
    maps = t.rule_maps(["bot", "ci"], gen)
    for slots, n in ((maps.actions, MAX_RULES), (maps.masks, RULE_MASK_SLOTS),
                     (maps.scopes, MAX_AGENTS), (maps.ports, PORTS)):
        assert slots.keys == range(gen * n, gen * n + n)
        assert len(slots.values) == n
    assert maps.actions.values[:len(t.rules)] == tuple(int(a) for a in t.actions)
    assert set(maps.actions.values[len(t.rules):]) == {0}
    assert [maps.masks.values[int(k)] for k in RuleMask] == [t.masks[k] for k in RuleMask]
    # index 0 is bot, 1 is ci; every other index (later agents, pending) gets the
    # rules scoped to every agent
    assert maps.scopes.values[:2] == (t.scope("bot"), t.scope("ci"))
    assert set(maps.scopes.values[2:]) == {t.all_agents}
    assert t.scope("ci") != t.all_agents
    assert {i: m for i, m in enumerate(maps.ports.values) if m} == dict(t.ports)
    # the LPM key's prefix length covers the generation byte in front of the address
    assert maps.networks == tuple((LPM_GEN_BITS + plen, addr, mask)
                                  for addr, plen, mask in t.networks)
    assert maps.exec_names == ((b"xmrig", t.masks[RuleMask.KILL] & t.by_agent["ci"]),)


def test_kernel_matchers_hold_the_kernels_comm_and_follow_file_order() -> None:
    p = policy("""\
        mode: monitor
        agents:
          - {name: by-uid, match: [{uid: 1500}]}
          - {name: named, match: [{comm: naïve}]}
          - {name: scoped, match: [{comm: naïve, uid: 1600}, {comm: x, uid: 1500}]}
          - {name: user-side, match: [{comm: y, exe: /usr/bin/y}]}
        """)
    comms, uids = kernel_matchers(p.agents)
    assert uids == [(1500, 0)]
    comm = "naïve".encode()  # the kernel's comm: bytes, as the process named itself
    # the any-uid entry shadows the later uid-scoped one and carries the uid agent's claim;
    # the comm+uid 1500 entry of "scoped" is shadowed by the uid-only agent before it;
    # exe-matchers are userspace's
    assert sorted(comms) == sorted([(comm, 1, ANY_UID), (comm, 0, 1500)])
    comms, uids = kernel_matchers(p.agents, {"by-uid": 7, "named": 8, "scoped": 9,
                                              "user-side": 10}.__getitem__)
    assert uids == [(1500, 7)] and sorted(comms) == sorted([(comm, 8, ANY_UID), (comm, 7, 1500)])
