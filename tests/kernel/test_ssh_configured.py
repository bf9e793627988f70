"""ssh as configured: an agent's real ssh that takes a forward from a config file (`-F`,
the user's ~/.ssh/config, in its own mount namespace too) is killed before it can request
it; a LocalForward-only config is alerted on, a benign config runs, and a non-agent is
untouched.

The ssh is the host's real /usr/bin/ssh. Its ProxyCommand is `exec sleep N`: nothing
answers it, so it cannot get past the version exchange, let alone authenticate and request
a forward, before N seconds; an ssh killed by the monitor dies by SIGKILL well before that,
while one left alone exits 255 when its proxy ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Running, agent_exec, require_root, wait_exit

from monitor.config.load import load_config_text
from monitor.policy.load import default_policy

SOCK = "/run/agentwatch-test/sshconfig.sock"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
PROXY = "ProxyCommand exec sleep 4"
FORWARD_RULE = "ssh-reverse-or-dynamic-forward"


@pytest.fixture(scope="module")
def watching() -> Iterator[Running]:
    require_root()
    if not os.path.exists(SSH):
        pytest.fail("the kernel tests need the OpenSSH client (apt-get install openssh-client)")
    cfg = load_config_text("monitor: {tick_seconds: 0.25}\n", "<sshconfig-tests>")
    r = Running(cfg, SOCK, default_policy()).start()
    yield r
    r.stop()


def config(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(f"BatchMode yes\nStrictHostKeyChecking no\n{text}")
    return path


def ssh_args(*args: str) -> list[str]:
    return [SSH, "-o", "UserKnownHostsFile=/dev/null", *args]


def killed_before_its_proxy_ended(p: subprocess.Popen[bytes], start: float) -> None:
    assert wait_exit(p) == -signal.SIGKILL
    assert time.monotonic() - start < 3.5, "killed only when it would have ended anyway"


def test_a_forward_from_a_config_file_is_killed(watching: Running, tmp_path: Path) -> None:
    cfg = config(tmp_path, "cfg", f"Host devbox\n  {PROXY}\n  RemoteForward 9000 localhost:22\n")
    start = time.monotonic()
    p = agent_exec(ssh_args("-F", str(cfg), "devbox"), agent="claude-code", socket=SOCK,
                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_before_its_proxy_ended(p, start)
    v = watching.wait_verdict(rule=FORWARD_RULE, pid=p.pid)
    assert v["outcome"] == "killed"
    assert v["reason"] == f"ssh requests remote_forward (from {cfg}:5)"
    # the same ssh, not an agent: untouched (exits 255 when its proxy ends)
    plain = subprocess.run(ssh_args("-F", str(cfg), "devbox"), stdin=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=20, check=False)
    assert plain.returncode == 255


def test_a_forward_from_the_users_own_config_is_killed(watching: Running, tmp_path: Path
                                                        ) -> None:
    """`ssh alias` where ~/.ssh/config (the passwd home, as ssh reads it) gives the alias a
    DynamicForward — in a mount namespace of the agent's own, where /root is its tmpfs."""
    text = f"Host alias\n  {PROXY}\n  DynamicForward 1080\n  BatchMode yes\n"
    script = ("mount -t tmpfs agent-home /root && mkdir -m 700 /root/.ssh && "
              f"printf '%s' \"$CFG\" > /root/.ssh/config && exec {SSH} "
              "-o UserKnownHostsFile=/dev/null alias")
    start = time.monotonic()
    p = agent_exec(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                   agent="claude-code", socket=SOCK, env={**os.environ, "CFG": text},
                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_before_its_proxy_ended(p, start)
    v = watching.wait_verdict(rule=FORWARD_RULE, pid=p.pid)
    assert v["reason"] == "ssh requests dynamic_forward (from /root/.ssh/config:3)"
    assert "agent-home" not in Path("/proc/self/mounts").read_text()  # stayed in its own


def test_home_pointing_at_a_config_with_a_forward_is_killed(watching: Running,
                                                           tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host alias\n  RemoteForward 9000 localhost:22\n")
    start = time.monotonic()
    p = agent_exec(ssh_args("-o", PROXY.replace(" ", "=", 1), "alias"), agent="claude-code",
                   socket=SOCK, env={**os.environ, "HOME": str(home)},
                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_before_its_proxy_ended(p, start)
    v = watching.wait_verdict(rule=FORWARD_RULE, pid=p.pid)
    assert f"(from {home}/.ssh/config:2)" in str(v["reason"])


def test_a_config_the_monitor_cannot_read_is_judged_as_asking_for_everything(
        watching: Running, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # ssh blocks opening it until a writer feeds it a config
    start = time.monotonic()
    p = agent_exec(ssh_args("-F", str(fifo), "devbox"), agent="claude-code", socket=SOCK,
                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_before_its_proxy_ended(p, start)
    v = watching.wait_verdict(rule=FORWARD_RULE, pid=p.pid)
    assert "a FIFO" in str(v["reason"]) and "every feature" in str(v["reason"])


def test_a_local_forward_from_config_is_only_alerted(watching: Running, tmp_path: Path
                                                     ) -> None:
    cfg = config(tmp_path, "cfg", "Host devbox\n  ProxyCommand exec sleep 1\n"
                 "  LocalForward 8080 localhost:80\n")
    p = agent_exec(ssh_args("-F", str(cfg), "devbox"), agent="claude-code", socket=SOCK,
                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_exit(p) == 255
    v = watching.wait_verdict(rule="ssh-local-forward", pid=p.pid)
    assert v["action"] == "alert" and v["outcome"] == "alert"
    assert v["reason"] == f"ssh requests local_forward (from {cfg}:5)"


def test_ssh_with_a_benign_config_runs(watching: Running, tmp_path: Path) -> None:
    cfg = config(tmp_path, "cfg", "Host devbox\n  ProxyCommand exec sleep 1\n"
                 "  ServerAliveInterval 30\nHost other\n  RemoteForward 9000 localhost:22\n")
    p = agent_exec(ssh_args("-F", str(cfg), "devbox", "uptime"), agent="claude-code",
                   socket=SOCK, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_exit(p) == 255  # its proxy ended: it ran to its own end
    time.sleep(0.5)
    assert not watching.verdicts(pid=p.pid)
