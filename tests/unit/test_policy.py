"""Unit tests for monitor.policy (types, validate, load): load, validate, compile (no root, no
host users needed)."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import textwrap
import time
from pathlib import Path

import pytest
from timebox import within

from monitor.config.load import default_config
from monitor.config.regex import Regex, compile_pattern
from monitor.model.address import fold_network
from monitor.model.agents import AgentSpec, Matcher
from monitor.model.errors import ConfigError, Location
from monitor.policy.engine import evaluate_exec
from monitor.policy.load import default_policy, load_policy, load_policy_text
from monitor.policy.types import (
    Action,
    ConnectMatch,
    CpuMatch,
    EventKind,
    ExecMatch,
    Mode,
    Policy,
    ProcessesMatch,
    Rule,
)
from monitor.policy.validate_match import parse_duration

SRC = "policy.yaml"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "policy.md"
V4, V6 = ipaddress.IPv4Network, ipaddress.IPv6Network


def lookup(name: str) -> int:
    return {"agent": 1001}[name]


def load(text: str) -> Policy:
    return load_policy_text(textwrap.dedent(text), SRC, user_lookup=lookup)


def problems(text: str) -> list[tuple[Location, str]]:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.exit_code == 2
    return info.value.problems


# --- valid policies ----------------------------------------------------------------------

FULL = """\
mode: enforce
agents:
  - name: claude-code
    match: [{comm: claude}]
  - name: ci-bot
    match: [{user: agent}]
lists:
  miner_names: [xmrig, minerd]
  mining_ports: [3333, "5555-5560", 4444]
rules:
  - name: no-miners
    description: "miners are not welcome"
    event: exec
    action: kill
    match:
      name: ["@miner_names", cpuminer]
  - name: odd-binaries
    event: exec
    agents: [claude-code]
    action: alert
    match:
      exe: ["/tmp/*", "/dev/shm/*"]
      argv: ["--donate-level"]
  - name: ssh-tunnels
    event: exec
    action: kill-agent
    match: {ssh: [remote_forward, dynamic_forward]}
  - name: pool-ports
    event: connect
    action: deny
    match:
      port: ["@mining_ports", 14444]
      family: ipv4
  - name: ci-egress
    event: connect
    agents: [ci-bot]
    action: deny
    match:
      outside:
        address: [127.0.0.0/8, "::1", 10.0.0.0/8]
        port: [443, 22]
  - name: busy
    event: cpu
    action: alert
    match: {cores: 1.5, for: 10m}
  - name: busy-process
    event: cpu
    action: kill
    match: {cores: 0.9, scope: process, for: 90}
  - name: fork-bomb
    event: processes
    action: kill-agent
    match: {above: 2000}
"""


def test_full_policy_compiles_into_expected_objects() -> None:
    p = load(FULL)
    assert p.mode == Mode.ENFORCE
    assert p.source == SRC
    assert p.agents == (
        AgentSpec("claude-code", (Matcher(comm="claude", line=4),)),
        AgentSpec("ci-bot", (Matcher(uid=1001, line=6),)),
    )
    assert [r.name for r in p.rules] == ["no-miners", "odd-binaries", "ssh-tunnels",
                                         "pool-ports", "ci-egress", "busy", "busy-process",
                                         "fork-bomb"]
    assert p.rules[0] == Rule(
        name="no-miners", description="miners are not welcome", event=EventKind.EXEC,
        action=Action.KILL, agents=None, line=11,
        match=ExecMatch(names=frozenset({"xmrig", "minerd", "cpuminer"})))
    assert p.rules[1].agents == frozenset({"claude-code"})
    assert p.rules[1].description == ""
    assert p.rules[1].match == ExecMatch(exe=("/tmp/*", "/dev/shm/*"),
                                         argv=(compile_pattern("--donate-level"),))
    assert p.rules[2].action == Action.KILL_AGENT
    assert p.rules[2].match == ExecMatch(ssh=frozenset({"remote_forward", "dynamic_forward"}))
    assert p.rules[3].match == ConnectMatch(
        ports=((3333, 3333), (5555, 5560), (4444, 4444), (14444, 14444)), family="ipv4")
    assert p.rules[4].match == ConnectMatch(
        networks=(V4("127.0.0.0/8"), V6("::1/128"), V4("10.0.0.0/8")),
        ports=((443, 443), (22, 22)), outside=True)
    assert p.rules[5].match == CpuMatch(cores=1.5, scope="agent", window_s=600.0)
    assert p.rules[6].match == CpuMatch(cores=0.9, scope="process", window_s=90.0)
    assert p.rules[7].match == ProcessesMatch(above=2000)


def test_rules_are_indexed_by_event_kind_in_file_order() -> None:
    p = load(FULL)
    assert [r.name for r in p.rules_for(EventKind.EXEC)] == ["no-miners", "odd-binaries",
                                                              "ssh-tunnels"]
    assert [r.name for r in p.rules_for(EventKind.CONNECT)] == ["pool-ports", "ci-egress"]
    assert [r.name for r in p.rules_for(EventKind.CPU)] == ["busy", "busy-process"]
    assert [r.name for r in p.rules_for(EventKind.PROCESSES)] == ["fork-bomb"]
    assert p.rule("busy") is p.rules[5]


def test_applies_scopes_rules_to_agents() -> None:
    p = load(FULL)
    assert p.applies(p.rules[0], "ci-bot") and p.applies(p.rules[0], "anything")
    assert p.applies(p.rules[1], "claude-code") and not p.applies(p.rules[1], "ci-bot")


def test_list_references_expand_in_place_and_remember_their_list() -> None:
    p = load("""\
        mode: monitor
        lists:
          ports: [1, "2-3"]
          nets: [10.0.0.0/8]
        rules:
          - name: r
            event: connect
            action: alert
            match: {address: ["@nets", 192.168.0.0/16], port: [9, "@ports", 2]}
    """)
    m = p.rules[0].match
    assert isinstance(m, ConnectMatch)
    assert m.ports == ((9, 9), (1, 1), (2, 3), (2, 2))
    assert m.networks == (V4("10.0.0.0/8"), V4("192.168.0.0/16"))
    assert m.lists[("port", "2-3")] == "@ports"
    assert ("address", "192.168.0.0/16") not in m.lists


@pytest.mark.parametrize(("written", "compiled"), [
    ("::ffff:1.2.3.4", V4("1.2.3.4/32")),
    ("::ffff:10.0.0.0/104", V4("10.0.0.0/8")),
    ("::ffff:0:0/96", V4("0.0.0.0/0")),
    ("0:0:0:0:0:ffff:c0a8:0/112", V4("192.168.0.0/16")),
    ("::1", V6("::1/128")),
    ("2001:db8::/32", V6("2001:db8::/32")),
    ("1.2.3.4", V4("1.2.3.4/32")),
])
def test_ipv4_mapped_networks_compile_to_ipv4(written: str, compiled: object) -> None:
    p = load(f"""\
        mode: monitor
        rules:
          - {{name: r, event: connect, action: alert, match: {{address: ["{written}"]}}}}
    """)
    m = p.rules[0].match
    assert isinstance(m, ConnectMatch)
    assert m.networks == (compiled,)


def test_mapped_and_plain_forms_of_one_network_are_one_entry() -> None:
    p = load("""\
        mode: monitor
        rules:
          - {name: r, event: connect, action: alert,
             match: {address: [1.2.3.0/24, "::ffff:1.2.3.0/120"]}}
    """)
    assert p.rules[0].match == ConnectMatch(networks=(V4("1.2.3.0/24"),))


def test_normalise_network_leaves_other_ipv6_alone() -> None:
    assert fold_network(V6("::/0")) == V6("::/0")
    assert fold_network(V6("64:ff9b::/96")) == V6("64:ff9b::/96")


@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (1.5, 1.5), ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("1.5m", 90.0), ("bogus", None), ("10 minutes", None), (True, None),
    ("", None),
])
def test_parse_duration(value: object, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


def test_minimal_policies() -> None:
    p = load("mode: monitor\n")
    assert (p.mode, p.agents, p.rules) == (Mode.MONITOR, (), ())
    assert load("mode: enforce\nagents:\nlists:\nrules:\n").rules == ()


def test_comm_of_a_long_name_is_its_first_15_bytes() -> None:
    m = load("""\
        mode: monitor
        rules: [{name: r, event: exec, action: kill, match: {name: [averyveryverylongminer]}}]
    """).rules[0].match
    assert isinstance(m, ExecMatch)
    assert m.comms == {"averyveryverylo"}


def test_sha256_is_of_the_file_and_the_text(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    data = b"mode: monitor\r\nrules: []\r\n"
    path.write_bytes(data)
    p = load_policy(path)
    assert p.sha256 == hashlib.sha256(data).hexdigest()
    assert p.source == str(path)
    text = "mode: monitor\n"
    assert load_policy_text(text).sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert load_policy_text(text).source == "<string>"


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path / "missing.yaml")
    assert "cannot read policy file" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"mode: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_policy(bad)
    assert "not UTF-8" in str(info.value)


def test_policy_is_frozen() -> None:
    p = load(FULL)
    with pytest.raises(AttributeError):
        setattr(p, "mode", Mode.MONITOR)  # noqa: B010 (a frozen field, assigned anyway)
    with pytest.raises(AttributeError):
        setattr(p.rules[0], "action", Action.ALERT)  # noqa: B010


# --- malformed policies: every error has file, line, key path and advice -------------------

HEAD = "mode: enforce\nagents:\n  - {name: bot, match: [{comm: bot}]}\n"  # lines 1-3

MALFORMED: list[tuple[str, str, int, str, str]] = [
    # (id, text, line, key path, fragment of the reason)
    ("missing-mode", "rules: []\n", 1, "mode", "missing required key 'mode': write"),
    ("unknown-mode", "mode: Enforce\n", 1, "mode", "unknown mode 'Enforce': write 'monitor'"),
    ("not-a-mapping", "- mode: enforce\n", 1, "", "top level must be a mapping"),
    ("empty-file", "# nothing\n", 1, "", "got an empty file"),
    ("unknown-top-key", "mode: enforce\nrule: []\n", 2, "rule",
     "unknown key 'rule' (allowed: mode, fail_closed, agents, lists, rules)"),
    ("bad-fail-closed", "mode: enforce\nfail_closed: maybe\n", 2, "fail_closed",
     "unknown value 'maybe': write 'kill'"),
    ("rules-not-list", "mode: enforce\nrules: {name: x}\n", 2, "rules",
     "expected a list of rules"),
    ("missing-name", HEAD + "rules:\n  - {event: exec, action: kill, match: {name: [x]}}\n",
     5, "rules[0].name", "missing required key 'name': give the rule a unique name"),
    ("missing-action", HEAD + "rules:\n  - {name: a, event: exec, match: {name: [x]}}\n",
     5, "rules[0].action", "write action: alert, deny, kill or kill-agent"),
    ("bad-rule-name", HEAD + "rules:\n  - {name: No Miners, event: exec, action: kill,"
     " match: {name: [x]}}\n", 5, "rules[0].name", "invalid rule name 'No Miners': use 1-63"),
    ("duplicate-rule", HEAD + "rules:\n  - {name: a, event: exec, action: kill, match: "
     "{name: [x]}}\n  - {name: a, event: exec, action: kill, match: {name: [y]}}\n",
     6, "rules[1].name", "duplicate rule name 'a' (first defined on line 5)"),
    ("unknown-rule-key", HEAD + "rules:\n  - name: a\n    descripton: x\n    event: exec\n"
     "    action: kill\n    match: {name: [x]}\n", 6, "rules[0].descripton",
     "unknown key 'descripton' (allowed: name, description"),
    ("unknown-event", HEAD + "rules:\n  - {name: a, event: spawn, action: kill, "
     "match: {name: [x]}}\n", 5, "rules[0].event",
     "unknown event 'spawn': write one of exec, connect, cpu, processes"),
    ("unknown-action", HEAD + "rules:\n  - {name: a, event: exec, action: block, "
     "match: {name: [x]}}\n", 5, "rules[0].action", "unknown action 'block': write one of"),
    ("deny-on-exec", HEAD + "rules:\n  - name: a\n    event: exec\n    action: deny\n"
     "    match: {name: [x]}\n", 7, "rules[0].action",
     "'deny' refuses a connection and exists only for event: connect"),
    ("empty-match", HEAD + "rules:\n  - {name: a, event: exec, action: kill, match: {}}\n",
     5, "rules[0].match", "empty match: a rule must say what it matches"),
    ("null-match", HEAD + "rules:\n  - name: a\n    event: cpu\n    action: kill\n"
     "    match:\n", 8, "rules[0].match", "give at least one of cores, scope, for"),
    ("key-of-other-event", HEAD + "rules:\n  - name: a\n    event: exec\n    action: kill\n"
     "    match:\n      port: [1]\n", 9, "rules[0].match.port",
     "unknown key 'port' (allowed: name, exe, argv, ssh, sha256, fileless)"),
    ("unknown-agent", HEAD + "rules:\n  - {name: a, event: exec, agents: [bot, bto], "
     "action: kill, match: {name: [x]}}\n", 5, "rules[0].agents[1]",
     "unknown agent 'bto' (agents: bot)"),
    ("empty-agents", HEAD + "rules:\n  - {name: a, event: exec, agents: [], "
     "action: kill, match: {name: [x]}}\n", 5, "rules[0].agents",
     "empty list: give at least one of agent names (or remove the key)"),
    ("unknown-list", HEAD + "rules:\n  - name: a\n    event: exec\n    action: kill\n"
     "    match:\n      name:\n        - x\n        - '@nope'\n", 11,
     "rules[0].match.name[1]", "unknown list '@nope' (lists: none defined)"),
    ("list-of-names-as-ports", HEAD + "lists:\n  miners: [xmrig, 3333]\nrules:\n  - name: a\n"
     "    event: connect\n    action: kill\n    match: {port: ['@miners']}\n", 5,
     "lists.miners[0]", "bad port 'xmrig'"),
    ("list-refers-to-list", HEAD + "lists:\n  a: [1]\n  b: ['@a']\n", 6, "lists.b[0]",
     "a list cannot refer to another list (@a)"),
    ("bad-list-name", HEAD + "lists:\n  Mining Ports: [1]\n", 5, "lists.Mining Ports",
     "invalid list name 'Mining Ports'"),
    ("list-of-mappings", HEAD + "lists:\n  a: [{x: 1}]\n", 5, "lists.a[0]",
     "list values must be strings or integers, got mapping"),
    ("host-bits-set", HEAD + "rules:\n  - name: a\n    event: connect\n    action: deny\n"
     "    match:\n      address: [10.0.0.1/8]\n", 9, "rules[0].match.address[0]",
     "has host bits set; did you mean 10.0.0.0/8?"),
    ("not-an-address", HEAD + "rules:\n  - name: a\n    event: connect\n    action: deny\n"
     "    match:\n      address: [10.0.0.0/8, 300.1.1.1]\n", 9, "rules[0].match.address[1]",
     "bad address '300.1.1.1'"),
    ("address-as-number", HEAD + "rules:\n  - {name: a, event: connect, action: deny, "
     "match: {address: [10]}}\n", 5, "rules[0].match.address[0]",
     "expected an IP address or CIDR such as 10.0.0.0/8"),
    ("port-out-of-range", HEAD + "rules:\n  - name: a\n    event: connect\n    action: kill\n"
     "    match:\n      port:\n        - 443\n        - 70000\n", 11, "rules[0].match.port[1]",
     "port 70000 is out of range: write a port 1..65535"),
    ("port-zero", HEAD + "rules:\n  - {name: a, event: connect, action: kill, "
     "match: {port: [0]}}\n", 5, "rules[0].match.port[0]", "port 0 is out of range"),
    ("port-range-reversed", HEAD + "rules:\n  - {name: a, event: connect, action: kill, "
     "match: {port: ['5560-5555']}}\n", 5, "rules[0].match.port[0]",
     "the low end is above the high end (write 5555-5560)"),
    ("port-text", HEAD + "rules:\n  - {name: a, event: connect, action: kill, "
     "match: {port: [https]}}\n", 5, "rules[0].match.port[0]",
     "bad port 'https': write a port 1..65535 or a range like \"5555-5560\""),
    ("port-not-list", HEAD + "rules:\n  - {name: a, event: connect, action: kill, "
     "match: {port: 443}}\n", 5, "rules[0].match.port",
     "expected a list of ports, got int (write [443])"),
    ("empty-port-list", HEAD + "rules:\n  - {name: a, event: connect, action: kill, "
     "match: {port: []}}\n", 5, "rules[0].match.port", "empty list"),
    ("unknown-family", HEAD + "rules:\n  - {name: a, event: connect, action: kill, "
     "match: {family: inet6}}\n", 5, "rules[0].match.family",
     "unknown family 'inet6': write ipv4 or ipv6"),
    ("outside-with-port", HEAD + "rules:\n  - name: a\n    event: connect\n    action: deny\n"
     "    match:\n      outside: {address: [10.0.0.0/8]}\n      port: [22]\n", 10,
     "rules[0].match.port", "'port' cannot be combined with 'outside' (line 9)"),
    ("empty-outside", HEAD + "rules:\n  - {name: a, event: connect, action: deny, "
     "match: {outside: {}}}\n", 5, "rules[0].match.outside",
     "empty outside: give the allowed destinations"),
    ("outside-unknown-key", HEAD + "rules:\n  - {name: a, event: connect, action: deny, "
     "match: {outside: {ports: [1]}}}\n", 5, "rules[0].match.outside.ports",
     "unknown key 'ports' (allowed: address, port)"),
    ("bad-regex", HEAD + "rules:\n  - name: a\n    event: exec\n    action: kill\n"
     "    match:\n      argv: ['stratum+(tcp']\n", 9, "rules[0].match.argv[0]",
     "refused regular expression 'stratum+(tcp': missing )"),
    ("relative-glob", HEAD + "rules:\n  - {name: a, event: exec, action: kill, "
     "match: {exe: ['tmp/*']}}\n", 5, "rules[0].match.exe[0]",
     "must be an absolute path (start with '/')"),
    ("unterminated-glob", HEAD + "rules:\n  - {name: a, event: exec, action: kill, "
     "match: {exe: ['/tmp/[ab']}}\n", 5, "rules[0].match.exe[0]",
     "unterminated character class"),
    ("name-with-slash", HEAD + "rules:\n  - {name: a, event: exec, action: kill, "
     "match: {name: [/usr/bin/xmrig]}}\n", 5, "rules[0].match.name[0]",
     "not a program's base name; to match a path use exe"),
    ("name-not-list", HEAD + "rules:\n  - {name: a, event: exec, action: kill, "
     "match: {name: xmrig}}\n", 5, "rules[0].match.name",
     "expected a list of program names, got str (write [xmrig])"),
    ("unknown-ssh-feature", HEAD + "rules:\n  - {name: a, event: exec, action: kill, "
     "match: {ssh: [reverse]}}\n", 5, "rules[0].match.ssh[0]",
     "unknown ssh feature 'reverse': write one of dynamic_forward, gateway_ports"),
    ("bad-duration", HEAD + "rules:\n  - name: a\n    event: cpu\n    action: alert\n"
     "    match:\n      cores: 1\n      for: 10 minutes\n", 10, "rules[0].match.for",
     "bad duration '10 minutes': write seconds (e.g. 90) or a duration like 30s"),
    ("duration-too-long", HEAD + "rules:\n  - {name: a, event: cpu, action: alert, "
     "match: {cores: 1, for: 25h}}\n", 5, "rules[0].match.for", "at most 24h"),
    ("zero-cores", HEAD + "rules:\n  - {name: a, event: cpu, action: alert, "
     "match: {cores: 0, for: 1m}}\n", 5, "rules[0].match.cores", "must be more than 0"),
    ("cores-text", HEAD + "rules:\n  - {name: a, event: cpu, action: alert, "
     "match: {cores: lots, for: 1m}}\n", 5, "rules[0].match.cores",
     "expected a number, got str"),
    ("cpu-without-for", HEAD + "rules:\n  - {name: a, event: cpu, action: alert, "
     "match: {cores: 1}}\n", 5, "rules[0].match.for",
     "missing required key 'for' (for example for: 10m)"),
    ("unknown-scope", HEAD + "rules:\n  - {name: a, event: cpu, action: alert, "
     "match: {cores: 1, for: 1m, scope: host}}\n", 5, "rules[0].match.scope",
     "unknown scope 'host': write agent"),
    ("processes-zero", HEAD + "rules:\n  - {name: a, event: processes, action: kill-agent, "
     "match: {above: 0}}\n", 5, "rules[0].match.above", "0 is out of range"),
    ("agent-comm-too-long", "mode: monitor\nagents:\n  - name: bot\n    match:\n"
     "      - comm: a-very-long-agent-name\n", 5, "agents[0].match[0].comm",
     "longer than 15 characters"),
    ("agent-unknown-key", "mode: monitor\nagents:\n  - {name: bot, match: [{com: bot}]}\n", 3,
     "agents[0].match[0].com", "unknown key 'com'"),
    ("description-not-text", HEAD + "rules:\n  - {name: a, description: [x], event: exec, "
     "action: kill, match: {name: [x]}}\n", 5, "rules[0].description",
     "expected a string, got list"),
    ("yaml-syntax", "mode: enforce\nrules:\n  - {name: a\n", 4, "", "YAML syntax error"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"),
                         [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_policy_is_reported_with_file_line_key_and_advice(
        text: str, line: int, key: str, fragment: str) -> None:
    found = problems(text)
    assert len(found) == 1, found
    loc, reason = found[0]
    assert (loc.file, loc.line, loc.key) == (SRC, line, key), found
    assert fragment in reason, reason


def test_there_are_at_least_25_malformed_policies() -> None:
    assert len(MALFORMED) >= 25


def test_every_error_is_reported_at_once_sorted_by_line() -> None:
    found = problems("""\
        mode: monitr
        agents:
          - {name: bot, match: [{comm: bot}]}
        lists:
          ports: [3333, nope]
        rules:
          - name: a
            event: exec
            action: deny
            agents: [robot]
            match: {name: [x], exe: [relative]}
          - name: b
            event: connect
            action: kill
            match: {port: ["@ports", 99999], address: [1.2.3.4/8]}
          - name: a
            event: cpu
            action: alert
            match: {cores: 1, for: soon}
    """)
    keys = [(loc.line, loc.key) for loc, _ in found]
    assert keys == [
        (1, "mode"),
        (5, "lists.ports[1]"),
        (9, "rules[0].action"),
        (10, "rules[0].agents[0]"),
        (11, "rules[0].match.exe[0]"),
        (15, "rules[1].match.address[0]"),
        (15, "rules[1].match.port[1]"),
        (16, "rules[2].name"),
        (19, "rules[2].match.for"),
    ], found
    assert all(loc.file == SRC for loc, _ in found)
    list_problem = dict(((loc.key, reason) for loc, reason in found))["lists.ports[1]"]
    assert "(value of @ports, used at rules[1].match.port[0])" in list_problem


def test_rendered_error_names_file_line_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        load(HEAD + "rules:\n  - {name: a, event: exec, action: deny, match: {name: [x]}}\n")
    assert str(info.value).startswith("policy.yaml:5: rules[0].action: 'deny' refuses")


def test_unknown_agent_in_a_broken_agent_is_not_reported_twice() -> None:
    found = problems("""\
        mode: monitor
        agents:
          - {name: bot, match: []}
        rules:
          - {name: a, event: exec, agents: [bot], action: kill, match: {name: [x]}}
    """)
    assert [loc.key for loc, _ in found] == ["agents[0].match"]


# --- the default policy ------------------------------------------------------------------


def test_default_policy_loads_in_enforce_mode() -> None:
    p = default_policy()
    assert p.mode == Mode.ENFORCE
    assert p.source.endswith("policy.yaml")
    assert len(p.rules) >= 8
    assert {r.event for r in p.rules} == set(EventKind)


def test_default_agents_are_defined_once_across_default_config_and_policy() -> None:
    from monitor.model.agents import merged_agents

    merged = merged_agents(default_config(), default_policy())  # raises on a duplicate
    assert [a.name for a in merged] == [a.name for a in default_policy().agents]
    assert {"claude-code", "codex", "aider"} <= {a.name for a in merged}


def test_every_default_rule_is_documented() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for rule in default_policy().rules:
        assert f"`{rule.name}`" in docs, rule.name


def test_every_default_rule_has_a_comment_and_a_description() -> None:
    text = (Path(__file__).resolve().parents[2] / "monitor/defaults/policy.yaml").read_text()
    lines = text.splitlines()
    for rule in default_policy().rules:
        assert rule.description, rule.name
        assert lines[rule.line - 2].strip().startswith("#"), rule.name


def test_default_public_internet_list_is_the_complement_of_non_public_ranges() -> None:
    m = default_policy().rule("mining-pool-ports")
    assert m is not None and isinstance(m.match, ConnectMatch)
    v4 = [n for n in m.match.networks if isinstance(n, V4)]
    excluded = [V4(n) for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
                                "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
                                "224.0.0.0/3")]
    everything = sorted(ipaddress.collapse_addresses([*v4, *excluded]))
    assert everything == [V4("0.0.0.0/0")]
    for a in v4:
        assert not any(a.overlaps(b) for b in excluded), a
    for b in v4:
        assert sum(a.overlaps(b) for a in v4) == 1, b
    assert V6("2000::/3") in m.match.networks


def test_every_full_example_in_the_docs_loads() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    examples = [b for b in blocks if b.startswith("mode:")]
    assert len(examples) >= 2
    for text in examples:
        load_policy_text(text, "docs/policy.md", user_lookup={"ci": 1002}.__getitem__)


# --- hostile input (issue 10): patterns that backtrack, YAML bombs, deep nesting ---------

REDOS_POLICY = HEAD + """\
rules:
  - name: nested-plus
    event: exec
    action: kill
    match:
      argv: ['(a+)+$', '(x+x+)+y', '^(\\w+\\s?)*$z']
"""


def _judge_long_lines() -> list[tuple[str, ...]]:
    policy = load(REDOS_POLICY)
    out = []
    for line in ("x " + "a" * 50_000 + "b", "x " + "x" * 50_000, "w " * 20_000 + "!",
                 "x " + "a" * 50_000):
        verdicts = evaluate_exec(policy, agent="bot", session=1, pid=2, exe="/usr/bin/x",
                                 comm="x", argv=line.split(" "))
        out.append(tuple(v.rule for v in verdicts))
    return out


def test_an_argv_rule_that_would_backtrack_is_judged_in_linear_time() -> None:
    # Python's re took 68 s on one such exec, freezing the event loop; RE2 takes
    # microseconds. The last line (ends in "a") matches (a+)+$: the rule still works.
    start = time.monotonic()
    assert within(10, _judge_long_lines) == [(), (), (), ("nested-plus",)]
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a)\1", "backreferences"),
    (r"(?P<x>a)(?P=x)", "backreferences"),
    (r"(?P<x>a)(?P>x)", "recursion"),
    (r"^(?!.*access).*--url", "lookaround"),
    (r"(?<=-)-url", "lookaround"),
    (r"(?<!x)y", "lookaround"),
    (r"a++", "possessive"),
    (r"(?>ab|a)c", "atomic groups"),
    (r"(?x) a b", "verbose mode"),
    (r"--url\Z", r"write \z"),
    (r"a{1001}", "above {1000}"),
    (r"\pL{1000}", "more than 1 MiB"),
])
def test_a_pattern_re2_cannot_run_is_refused_naming_the_construct(pattern: str,
                                                                  why: str) -> None:
    [(loc, reason)] = problems(HEAD + "rules:\n  - name: a\n    event: exec\n"
                               f"    action: kill\n    match:\n      argv: [ok, '{pattern}']\n")
    assert (loc.line, loc.key) == (9, "rules[0].match.argv[1]")
    assert reason.startswith(f"refused regular expression {pattern!r}: ")
    assert why in reason and "RE2" in reason


def test_policy_check_names_every_refused_pattern_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from monitor.cli.main import main

    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "lists:\n  bad: ['(a)\\1']\nrules:\n  - name: a\n    event: exec\n"
                    "    action: kill\n    match:\n      argv: ['(?=x)', '@bad', 'fine']\n")
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: lists.bad[0]: refused regular expression '(a)\\\\1': backreferences" in err
    assert f"{path}:11: rules[0].match.argv[0]: refused regular expression '(?=x)': " \
           "lookaround" in err
    assert "Traceback" not in err


def test_argv_with_bytes_that_are_not_utf8_is_matched_whole() -> None:
    # argv is bytes; monitor/kernel/abi.py decodes it with surrogateescape. RE2 matches UTF-8:
    # each byte that is not UTF-8 is matched as U+FFFD, so . and [^ ] still match it.
    policy = load(HEAD + """\
rules:
  - {name: marker, event: exec, action: kill, match: {argv: ['--token=[^ ]+ --go$']}}
  - {name: any, event: exec, action: kill, match: {argv: ['^evil .{3}x']}}
  - {name: named, event: exec, action: alert, match: {argv: ['\\x{FFFD}{2}']}}
""")
    argv = [b.decode("utf-8", "surrogateescape")
            for b in (b"evil", b"\xff\xfe\xc3x", b"--token=\x80\x81abc", b"--go")]
    verdicts = evaluate_exec(policy, agent="bot", session=1, pid=2, exe="/usr/bin/evil",
                             comm="evil", argv=argv)
    assert sorted(v.rule for v in verdicts) == ["any", "marker", "named"]


# --- YAML bounds ---------------------------------------------------------------------------


def _laughs(levels: int, key: str = "mode") -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


def _problems_within(seconds: float, text: str) -> list[tuple[Location, str]]:
    return within(seconds, lambda: problems(text))


@pytest.mark.parametrize("key", ["mode", "rules", "lists", "agents"])
def test_a_yaml_bomb_is_refused_at_once_without_printing_the_tree(key: str) -> None:
    # 9 ** 9 = 387 million strings once expanded; an error message that printed the
    # tree ran past 30 s and 645 MB
    found = _problems_within(10, _laughs(9, key))
    assert found[0][0].file == SRC and found[0][0].line > 1
    assert "aliases expanded" in found[0][1] and "YAML bomb" in found[0][1]
    assert sum(len(reason) for _, reason in found) < 2000


def test_a_small_bomb_under_the_limits_is_reported_without_its_tree() -> None:
    found = _problems_within(10, "mode: monitor\n" + _laughs(4, "rules"))
    assert any(loc.key == "rules[0]" for loc, _ in found)
    assert sum(len(reason) for _, reason in found) < 20_000, found[:3]


@pytest.mark.parametrize("text", [
    HEAD + "rules: " + "[" * 100_000 + "]" * 100_000 + "\n",
    HEAD + "rules: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n",
    HEAD + "rules:\n" + "".join("  " * i + "- x:\n" for i in range(1, 100)),
])
def test_deep_nesting_is_refused_with_its_line_not_a_recursion_error(text: str) -> None:
    [(loc, reason)] = _problems_within(10, text)
    assert loc.file == SRC and 4 <= loc.line <= 40
    assert "nested deeper than 64 levels" in reason


def test_limits_on_size_aliases_and_numbers() -> None:
    big = HEAD + "# " + "x" * (1 << 20) + "\n"
    [(loc, reason)] = problems(big)
    assert loc == Location(SRC) and "larger than 1 MiB" in reason
    many = HEAD + "lists:\n  a: &a [1]\n" + "".join(f"  b{i}: *a\n" for i in range(1001))
    [(loc, reason)] = problems(many)
    assert loc.line == 1006 and "more than 1000 aliases" in reason
    huge = HEAD + "rules:\n  - {name: a, event: processes, action: kill, match: {above: " \
        + "9" * 5000 + "}}\n"
    [(loc, reason)] = problems(huge)
    assert (loc.line, loc.key) == (5, "rules[0].match.above") and "number too long" in reason
    [(loc, reason)] = problems(HEAD + "rules: \udcff\n")
    assert loc.line == 4 and "not valid Unicode" in reason


def test_the_c_yaml_loader_is_used_where_installed() -> None:
    import yaml

    from monitor.config import yamlcompose

    expected = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    assert yamlcompose.LOADER is expected


SEARCH_PATTERNS = [r"(^|[ =])stratum\+(tcp|ssl|tls)://", r"--url([ =]|$)", r"^ssh .*-R",
                   r"(?i)XMRIG", r"\bnc\b.* -e", r"a{2,3}b", r"^$", r"x|", r"[^ ]+=[0-9]+$"]
SEARCH_TEXTS = ["", "ssh -R 1:x:2 host", "cloudflared --url=x", "cloudflared --urlx",
                "xmrig --donate-level 1", "run stratum+tcp://pool:3333", "nc host 1 -e sh",
                "aab", "aaaab", "k=12", "k=12 ", "é --url", "a\nb", "x"]


@pytest.mark.parametrize("pattern", SEARCH_PATTERNS)
def test_re2_search_answers_like_python_re_search(pattern: str) -> None:
    # what the policy meant under Python's re is what it means under RE2 (for patterns
    # both accept), by the fast path and by re2's public search() alike
    regex = compile_pattern(pattern)
    public = Regex(pattern, regex._compiled)
    object.__setattr__(public, "_match", None)
    for text in SEARCH_TEXTS:
        expected = re.search(pattern, text) is not None
        assert (regex.search(text) is not None) == expected, text
        assert (public.search(text) is not None) == expected, text
