"""Suggested for tests/unit/test_judge.py: every kill, and only kills, push an alert."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from test_judge import (
    INCIDENT_SSH,
    KILL_AGENT_BY_NAME,
    MONITOR_DEFAULT,
    S1,
    T0,
    FakeEnforcer,
    Rig,
    agent_tree,
    connect_ev,
    exec_ev,
    fork_ev,
    kernel_verdict,
    policy,
)

from monitor.config.types import AlertSettings
from monitor.enforce.enforcer import Enforcer, Outcome
from monitor.enforce.judge import Judge
from monitor.model.events import VerdictKind
from monitor.observe.alerts import Notifier


def rig_with_alerts(tmp_path: Path, p=None, enforcer=None) -> tuple[Rig, Notifier]:
    rig = Rig(p) if p is not None else Rig(enforcer=enforcer)
    n = Notifier(AlertSettings(webhook_url="http://127.0.0.1:9/x", spool_dir=str(tmp_path),
                               instance="h"), clock=lambda: 1.0)  # never started: spool only
    rig.judge = Judge(rig.policy, rig.tables, cast(Enforcer, rig.enforcer), rig.tracker,
                      rig.log, alerts=n)
    return rig, n


def pending(n: Notifier):
    return list(n._lanes[0].pending.values())


def test_userspace_kill_alerts(tmp_path: Path) -> None:
    rig, n = rig_with_alerts(tmp_path)
    agent_tree(rig)
    rig.feed(fork_ev(102, 103, T0 + 5, comm="sh"), exec_ev(103, T0 + 6, INCIDENT_SSH, ppid=102))
    [a] = pending(n)
    assert a.labels()["rule"] == "ssh-reverse-or-dynamic-forward" and a.pid == 103
    assert a.outcome == "killed" and a.exe == "/usr/bin/ssh"
    assert a.argv == tuple(INCIDENT_SSH.split())


def test_gone_is_not_a_kill(tmp_path: Path) -> None:
    rig, n = rig_with_alerts(tmp_path, enforcer=FakeEnforcer(Outcome.GONE))
    agent_tree(rig)
    rig.feed(exec_ev(102, T0 + 6, INCIDENT_SSH, ppid=101))
    assert pending(n) == []


def test_monitor_mode_alerts_nothing(tmp_path: Path) -> None:
    rig, n = rig_with_alerts(tmp_path, MONITOR_DEFAULT)
    agent_tree(rig)
    rig.feed(exec_ev(102, T0 + 9, INCIDENT_SSH, ppid=101),
             connect_ev(102, T0 + 11, "45.9.8.7", 3333))
    assert pending(n) == []


def test_kernel_kill_and_kill_agent_alert_once(tmp_path: Path) -> None:
    rig, n = rig_with_alerts(tmp_path)
    agent_tree(rig)
    rig.feed(fork_ev(102, 103, T0 + 5, comm="sh"),
             kernel_verdict(rig, 103, T0 + 6, "xmrig", ["no-miners"], kind=VerdictKind.EXEC,
                            enforced=True),
             exec_ev(103, T0 + 6, "xmrig -o pool.example:3333", ppid=102))
    [a] = pending(n)
    assert (a.rule, a.outcome) == ("no-miners", "killed in the kernel")
    rig2, n2 = rig_with_alerts(tmp_path / "2", policy(KILL_AGENT_BY_NAME))
    agent_tree(rig2)
    rig2.feed(kernel_verdict(rig2, 102, T0 + 6, "ngrok", ["no-ngrok"], kind=VerdictKind.EXEC,
                             enforced=True),
              exec_ev(102, T0 + 6, "ngrok http 80", ppid=101))
    [b] = pending(n2)
    assert b.action == "kill-agent" and b.session == S1
    assert b.outcome.startswith("agent session killed")


def test_kernel_deny_is_not_a_kill(tmp_path: Path) -> None:
    p = policy("""\
        mode: enforce
        agents: [{name: claude-code, match: [{comm: claude}]}]
        rules:
          - {name: no-smtp, event: connect, action: deny, match: {port: [25]}}
        """)
    rig, n = rig_with_alerts(tmp_path, p)
    agent_tree(rig)
    rig.feed(kernel_verdict(rig, 102, T0 + 6, "sh", ["no-smtp"], kind=VerdictKind.CONNECT,
                            enforced=True, address="1.2.3.4", port=25))
    assert pending(n) == []
