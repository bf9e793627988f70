"""`agentwatch policy check`, `policy test` and `config check`: the commands that read a
file and say what it means, without a monitor, root or the kernel.

`policy test` replays a recording (`agentwatch trace --record`) through the same engine the
monitor runs, and says each verdict as the monitor would in monitor mode (model.outcome).
Agent text from a recording reaches the terminal only through monitor.model.safetext.
Errors are AgentwatchErrors, which cli/main.py turns into one sentence and exit code 2.
"""

from __future__ import annotations

import argparse

from monitor.config.load import load_config
from monitor.model.outcome import Outcome
from monitor.model.safetext import printable
from monitor.policy.load import default_policy, load_policy
from monitor.policy.types import Action


def cmd_policy_check(args: argparse.Namespace) -> int:
    from monitor.policy.kernel_tables import compile_kernel

    policy = load_policy(args.file)
    tables = compile_kernel(policy)
    print(f"{args.file}: ok — mode {policy.mode.value}, {len(policy.agents)} agents, "
          f"{len(policy.rules)} rules ({len(tables.rules)} enforced in the kernel), "
          f"sha256 {policy.sha256[:16]}")
    for rule in policy.rules:
        where = "kernel" if rule in tables.rules else "userspace"
        print(f"  {rule.name:<32} {rule.event.value:<9} {rule.action.value:<10} {where}")
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from monitor.policy.replay import read_recording, replay

    policy = load_policy(args.file) if args.file != "default" else default_policy()
    verdicts = replay(policy, read_recording(args.events))
    for v in verdicts:
        what = (Outcome.ALERTED if v.action == Action.ALERT else Outcome.WOULD_REFUSE
                if v.action == Action.DENY else Outcome.WOULD_KILL).text
        target = "agent session" if v.action.value == "kill-agent" else f"pid {v.pid}"
        print(f"{what:<12} {v.rule:<32} {printable(v.agent):<14} {target}: "
              f"{printable(v.reason)}")
    kills = sum(1 for v in verdicts if v.action.value in ("kill", "kill-agent"))
    print(f"{len(verdicts)} verdicts, {kills} kills (cpu rules are not replayed: a "
          "recording has no CPU samples)")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    print(f"{args.file}: ok ({len(cfg.agents)} agents)")
    return 0
