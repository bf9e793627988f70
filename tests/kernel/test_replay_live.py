"""`agentwatch policy test` replays a recording to the same verdicts the live monitor gave,
and the CLI refuses a malformed policy with every error (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Running, agent_exec, require_root, wait_exit
from test_enforce import NS, PUBLIC, scaled_default_policy_text

from monitor.config.load import load_config_text
from monitor.observe.output import record
from monitor.policy.load import load_policy_text
from monitor.policy.replay import read_recording, replay

CLI = [sys.executable, "-m", "monitor.cli.main"]


def test_replay_gives_the_same_verdicts_as_live(tmp_path: Path) -> None:
    require_root()
    text = scaled_default_policy_text().replace("mode: enforce", "mode: monitor", 1)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(text)
    policy = load_policy_text(text, str(policy_file))
    sock = str(tmp_path / "ctl.sock")
    r = Running(load_config_text("monitor: {tick_seconds: 0.25}\n"), sock, policy).start()
    subprocess.run(["ip", "netns", "add", NS + "r"], check=True)
    try:
        ns = NS + "r"
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        for name in ("xmrig", "ssh", "cloudflared"):
            prog = tmp_path / name
            prog.write_text("#!/bin/sh\nexit 0\n")
            prog.chmod(0o755)
        script = (f"{tmp_path}/xmrig -o pool:3333; {tmp_path}/ssh -fNR 2222:localhost:22 x.ex; "
                  f"{tmp_path}/ssh -L 80:localhost:80 dev; {tmp_path}/cloudflared tunnel run; "
                  f"git --version >/dev/null; "
                  f"ip netns exec {ns} {sys.executable} -c \"import socket; "
                  f"socket.socket().connect_ex(('{PUBLIC}', 3333)); "
                  f"socket.socket().connect_ex(('127.0.0.1', 443))\"")
        p = agent_exec(["/bin/sh", "-c", script], agent="claude-code", socket=sock)
        assert wait_exit(p, 30) == 0
        r.wait_verdict(rule="mining-pool-ports")
        live = {(v["rule"], v["pid"]) for v in r.verdicts()}
        recording = tmp_path / "events.jsonl"
        with recording.open("w") as f:
            for ev, agent in r.log.snapshot():
                f.write(json.dumps(record(ev, agent)) + "\n")
    finally:
        r.stop()
        subprocess.run(["ip", "netns", "del", NS + "r"], check=False)
    replayed = {(v.rule, v.pid) for v in replay(policy, read_recording(str(recording)))}
    assert {rule for rule, _ in live} >= {"no-miners", "ssh-reverse-or-dynamic-forward",
                                         "ssh-local-forward", "public-tunnel-subcommands",
                                         "mining-pool-ports"}
    assert replayed == live
    out = subprocess.run([*CLI, "policy", "test", str(policy_file), "--events",
                          str(recording)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("would kill") == sum(1 for rule, _ in live
                                                 if rule != "ssh-local-forward")
    assert "ssh-reverse-or-dynamic-forward" in out.stdout


def test_policy_check_refuses_a_malformed_policy_with_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: enforce\nrules:\n  - name: x\n    event: connect\n    action: deny\n"
                   "    match: {port: [70000]}\n  - name: y\n    event: exec\n"
                   "    action: deny\n    match: {name: [a]}\n")
    out = subprocess.run([*CLI, "policy", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{bad}:6" in out.stderr and "70000" in out.stderr
    assert f"{bad}:9" in out.stderr and "deny" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([*CLI, "run", "--policy", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and f"{bad}:6" in out.stderr
