"""The dynamic loader is not the program: an agent that starts a forbidden program through
the ELF interpreter (`/lib64/ld-linux-x86-64.so.2 PROGRAM ...`, a renamed copy of it, with
`--argv0`, relative paths) is judged as that program and killed, in userspace (the kernel's
exec-name rules see the loader's comm); the same command by a process that is not an agent
is untouched, and benign programs through the loader run to the end.

Real monitor, real BPF, the embedded default policy in enforce mode. The ssh test talks only
to a listener on loopback that never answers, so ssh cannot get as far as asking for the
forward: what it proves is that ssh is killed while it is still trying to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AS_AGENT, Running, agent_exec, require_root, wait_exit

from monitor.config.load import load_config_text
from monitor.model.events import ExecEvent
from monitor.policy.load import default_policy

SOCK = "/run/agentwatch-test/loader.sock"
LD = "/lib64/ld-linux-x86-64.so.2"
LD_REAL = os.path.realpath(LD)
AGENT = "claude-code"
CONFIG = "monitor: {tick_seconds: 0.25}\n"


@pytest.fixture(scope="module")
def enforcing() -> Iterator[Running]:
    require_root()
    r = Running(load_config_text(CONFIG, "<loader-tests>"), SOCK, default_policy()).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def miner(tmp_path: Path) -> Path:
    """A copy of sleep named like a miner (an ELF program: the loader runs only those)."""
    prog = tmp_path / "xmrig"
    shutil.copy("/bin/sleep", prog)
    return prog


def killed_soon(p: subprocess.Popen[bytes], start: float) -> None:
    assert wait_exit(p, 10) == -signal.SIGKILL
    assert time.monotonic() - start < 4, "killed only after its sleep would have ended"


@pytest.mark.parametrize("spelling", [
    [LD, "PROG", "5"],
    [LD, "--argv0", "sleep", "PROG", "5"],
    [LD, "--inhibit-cache", "--library-path", "/nonexistent", "./xmrig", "5"],
    [LD, "--frobnicate", "PROG", "5"],  # read conservatively: every possible program
], ids=["plain", "argv0", "options-relative", "unknown-option"])
def test_a_miner_through_the_loader_is_killed(enforcing: Running, miner: Path,
                                              spelling: list[str]) -> None:
    argv = [str(miner) if a == "PROG" else a for a in spelling]
    start = time.monotonic()
    p = agent_exec(argv, agent=AGENT, socket=SOCK, cwd=miner.parent)
    if "--frobnicate" in argv:
        wait_exit(p, 10)  # the loader exits at once on an option it does not know
    else:
        killed_soon(p, start)
    v = enforcing.wait_verdict(rule="no-miners", pid=p.pid)
    # the loader's real path (/proc/PID/exe); the path it was run by when it exited first
    loader = str(v["loader"])
    assert v["exe"] == str(miner) and loader in (LD_REAL, LD)
    assert f"via {loader}" in str(v["reason"])
    ev, _ = enforcing.log.wait_for(lambda e, _a: isinstance(e, ExecEvent) and e.h.pid == p.pid)
    assert isinstance(ev, ExecEvent) and ev.loader == loader and ev.filename == str(miner)
    plain = subprocess.run([*argv[:-1], "0.2"], cwd=miner.parent, timeout=10)  # not an agent
    assert plain.returncode == (1 if "--frobnicate" in argv else 0)


def test_a_miner_through_a_renamed_copy_of_the_loader_is_killed(
        enforcing: Running, miner: Path) -> None:
    helper = miner.parent / "build-helper"
    shutil.copy(LD, helper)
    start = time.monotonic()
    p = agent_exec([str(helper), "--argv0", "cc1", str(miner), "5"], agent=AGENT, socket=SOCK)
    killed_soon(p, start)
    v = enforcing.wait_verdict(rule="no-miners", pid=p.pid)
    assert v["loader"] == str(helper) and v["argv"] == ["cc1", "5"]
    plain = subprocess.run([str(helper), str(miner), "0.2"], timeout=10)
    assert plain.returncode == 0


def test_an_unprivileged_agent_through_nested_loaders_is_killed(
        enforcing: Running, reachable_tmp: Path) -> None:
    prog = reachable_tmp / "xmrig"
    shutil.copy("/bin/sleep", prog)
    helper = reachable_tmp / "ldcopy"
    shutil.copy(LD, helper)  # glibc refuses to load itself, but the monitor cannot know that
    start = time.monotonic()
    p = agent_exec([*AS_AGENT, str(helper), "--argv0", "x", str(prog), "5"], agent=AGENT,
                   socket=SOCK)
    killed_soon(p, start)
    enforcing.wait_verdict(rule="no-miners", pid=p.pid)
    q = agent_exec([*AS_AGENT, LD, str(helper), str(prog), "5"], agent=AGENT, socket=SOCK)
    wait_exit(q, 10)
    v = enforcing.wait_verdict(rule="no-miners", pid=q.pid)
    assert v["exe"] == str(prog)


def silent_listener() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def ssh_argv(port: int) -> list[str]:
    return [LD, "/usr/bin/ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-p", str(port), "-N", "-R", "9000:localhost:22", "agent@127.0.0.1"]


def test_ssh_remote_forward_through_the_loader_is_killed(enforcing: Running) -> None:
    if not os.path.exists("/usr/bin/ssh"):
        pytest.fail("no /usr/bin/ssh: install openssh-client")
    lst, port = silent_listener()
    try:
        start = time.monotonic()
        p = agent_exec(ssh_argv(port), agent=AGENT, socket=SOCK, stderr=subprocess.DEVNULL)
        killed_soon(p, start)
        v = enforcing.wait_verdict(rule="ssh-reverse-or-dynamic-forward", pid=p.pid)
        assert v["loader"] == LD_REAL and v["exe"] == "/usr/bin/ssh"
        assert v["argv"] == ssh_argv(port)[1:]
        # not an agent: the same ssh waits on the silent listener, untouched
        plain = subprocess.Popen(ssh_argv(port), stderr=subprocess.DEVNULL)
        time.sleep(1.5)
        assert plain.poll() is None, "a non-agent's ssh was stopped"
        plain.kill()
        plain.wait()
    finally:
        lst.close()


@pytest.mark.parametrize("argv", [[LD, "/bin/true"], [LD, "--argv0", "x", "/bin/sleep", "0.3"],
                                  [LD, "--verify", "/bin/true"], [LD, "--help"]])
def test_benign_programs_through_the_loader_run(enforcing: Running, argv: list[str]) -> None:
    p = agent_exec(argv, agent=AGENT, socket=SOCK, stdout=subprocess.DEVNULL)
    assert wait_exit(p, 10) == 0
    time.sleep(0.2)
    assert not enforcing.verdicts(pid=p.pid)
