"""A program is what its file is: real copies of real binaries, run by an agent under names
of their own, against the default policy (plus one `sha256:` rule).

A byte-identical copy of the host's ssh, whatever it is called and wherever it sits (a
renamed file, a symlink to it, a memfd), asked for a remote or dynamic forward is killed
while it still waits for the server's first word, long before it could ask for a forward;
the same copy run by a process that is not an agent is untouched (it talks to the listener
and waits), and a copy asked for `-L` is alerted, not killed. A copy of a binary whose
sha256 a rule lists is killed under any name. Network steps stay on loopback.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Running, agent_exec, require_root, wait_exit

from monitor.config.load import load_config_text
from monitor.policy.load import default_policy, load_policy_text

SOCK = "/run/agentwatch-test/identity.sock"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SLEEP = shutil.which("sleep") or "/bin/sleep"
# a copy of sleep with bytes of its own appended: still runs, and no other file has its hash
BAD = Path(SLEEP).read_bytes() + b"\0agentwatch identity test: a known-bad binary\0"
BAD_SHA = hashlib.sha256(BAD).hexdigest()
SCRATCH = Path("/tmp/aw-identity-scratch")  # an `exe:` glob kills what runs from here
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-F", "/dev/null"]


@pytest.fixture(scope="module")
def enforcing() -> Iterator[Running]:
    require_root()
    text = Path(default_policy().source).read_text() + textwrap.indent(textwrap.dedent(f"""\
        - name: known-bad-binary
          description: "a binary this host has seen do harm"
          event: exec
          action: kill
          match:
            sha256: ["{BAD_SHA.upper()}"]
        - name: nothing-from-scratch
          event: exec
          action: kill
          match:
            exe: ["{SCRATCH}/*"]
        """), "  ")
    policy = load_policy_text(text, "<default policy + sha256 rule>")
    cfg = load_config_text("monitor: {tick_seconds: 0.25}\n", "<identity-tests>")
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(mode=0o755)
    r = Running(cfg, SOCK, policy).start()
    yield r
    r.stop()
    shutil.rmtree(SCRATCH, ignore_errors=True)


class Listener:
    """A loopback TCP server that never answers: an ssh client that reaches it sends its
    version line and waits for the server's, so it never gets as far as asking for a
    forward. Records what each connection sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.got: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conns: list[socket.socket] = []
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            c.settimeout(2)
            conns.append(c)
            try:
                self.got.append(c.recv(200))
            except OSError:
                self.got.append(b"")
        for c in conns:
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def ssh_copy(tmp: Path, name: str) -> Path:
    copy = tmp / name
    shutil.copy(SSH, copy)
    copy.chmod(0o755)
    return copy


MEMFD_EXEC = textwrap.dedent("""
    import os, sys
    fd = os.memfd_create(sys.argv[1], 0)
    with open(sys.argv[2], "rb") as f:
        os.write(fd, f.read())
    os.execv(f"/proc/self/fd/{fd}", [sys.argv[1], *sys.argv[3:]])
""")


def spelled(how: str, tmp: Path) -> list[str]:
    """The command that starts a copy of ssh, spelled `how`."""
    if how == "renamed":
        return [str(ssh_copy(tmp, "notssh"))]
    if how == "hidden":
        return [str(ssh_copy(tmp, ".cache-helper"))]
    if how == "symlink":
        link = tmp / "git-remote-sync"
        link.symlink_to(ssh_copy(tmp, "x1"))
        return [str(link)]
    assert how == "memfd"
    return [sys.executable, "-c", MEMFD_EXEC, "rsync", SSH]


def killed(p: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    return wait_exit(p, timeout) == -signal.SIGKILL


@pytest.mark.parametrize("how", ["renamed", "hidden", "symlink", "memfd"])
@pytest.mark.parametrize("ask", [
    ["-fNR", "2222:localhost:22"],
    ["-o", "remoteforward=2222 localhost:22", "-N"],
    ["-ND", "1080"],
])
def test_a_copy_of_ssh_asked_for_a_forward_is_killed_before_it_can_ask(
        enforcing: Running, listener: Listener, tmp_path: Path, how: str,
        ask: list[str]) -> None:
    argv = [*spelled(how, tmp_path), *SSH_OPTS, "-p", str(listener.port), *ask, "127.0.0.1"]
    start = time.monotonic()
    p = agent_exec(argv, agent="claude-code", socket=SOCK)
    assert killed(p), "the copy of ssh was not killed"
    # it was killed while waiting for a server that never answers: it never had the
    # server's version line, let alone a session in which to ask for a forward
    assert time.monotonic() - start < 8
    v = enforcing.wait_verdict(rule="ssh-reverse-or-dynamic-forward", pid=p.pid)
    assert v["outcome"] == "killed" and v["mode"] == "enforce"
    assert "same content as" in str(v["reason"]), v["reason"]
    assert v["sha256"] == hashlib.sha256(Path(SSH).read_bytes()).hexdigest()
    if how == "memfd":
        assert v["exe"] == "memfd:rsync"


def test_the_same_copy_run_by_a_non_agent_is_untouched(enforcing: Running, listener: Listener,
                                                       tmp_path: Path) -> None:
    copy = ssh_copy(tmp_path, "notssh")
    p = subprocess.Popen([str(copy), *SSH_OPTS, "-p", str(listener.port), "-fNR",
                          "2222:localhost:22", "127.0.0.1"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not any(g.startswith(b"SSH-2.0-") for g in listener.got):
            assert p.poll() is None, f"the non-agent copy died: {p.returncode}"
            assert time.monotonic() < deadline, "the non-agent copy never reached the listener"
            time.sleep(0.02)
        time.sleep(0.5)
        assert p.poll() is None  # still waiting for the server: nobody killed it
        assert not enforcing.verdicts(pid=p.pid)
    finally:
        p.kill()
        p.wait()


def test_a_copy_of_ssh_asked_for_a_local_forward_is_alerted_not_killed(
        enforcing: Running, listener: Listener, tmp_path: Path) -> None:
    copy = ssh_copy(tmp_path, "db-tunnel")
    p = agent_exec([str(copy), *SSH_OPTS, "-p", str(listener.port), "-NL",
                    "8080:localhost:80", "127.0.0.1"], agent="claude-code", socket=SOCK,
                   stderr=subprocess.DEVNULL)
    try:
        v = enforcing.wait_verdict(rule="ssh-local-forward", pid=p.pid)
        assert v["action"] == "alert" and v["outcome"] == "alert"
        assert "same content as" in str(v["reason"])
        deadline = time.monotonic() + 5
        while not any(g.startswith(b"SSH-2.0-") for g in listener.got):
            assert p.poll() is None, f"the -L copy died: {p.returncode}"
            assert time.monotonic() < deadline, "the -L copy never reached the listener"
            time.sleep(0.02)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("name", ["build-helper", "sleep"])
def test_a_binary_listed_by_sha256_is_killed_under_any_name(enforcing: Running,
                                                           tmp_path: Path, name: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(BAD)
    bad.chmod(0o755)
    start = time.monotonic()
    p = agent_exec([str(bad), "30"], agent="claude-code", socket=SOCK)
    assert killed(p)
    assert time.monotonic() - start < 8, "killed only when its sleep would have ended"
    v = enforcing.wait_verdict(rule="known-bad-binary", pid=p.pid)
    assert v["outcome"] == "killed" and v["sha256"] == BAD_SHA
    assert BAD_SHA[:16] in str(v["reason"])
    plain = subprocess.run([str(bad), "0.2"], timeout=10)  # not an agent: runs to the end
    assert plain.returncode == 0


@pytest.mark.parametrize("name", ["xmrig", "cpuminer-opt"])
def test_a_miner_named_memfd_is_named_by_its_memfd_and_killed(enforcing: Running,
                                                              name: str) -> None:
    start = time.monotonic()
    p = agent_exec([sys.executable, "-c", MEMFD_EXEC, name, SLEEP, "30"], agent="claude-code",
                   socket=SOCK)
    assert killed(p)
    assert time.monotonic() - start < 8, "killed only when its sleep would have ended"
    v = enforcing.wait_verdict(rule="no-miners", pid=p.pid)
    # the probes read the memfd's own name at exec (mm->exe_file): killed before its first
    # instruction, and the kernel's verdict names the file
    assert v["outcome"] == "killed in the kernel"
    assert f"file {name!r}" in str(v["reason"])


@pytest.mark.parametrize("how", ["relative", "dot-dot", "symlink-elsewhere"])
def test_an_exe_glob_matches_the_real_path_however_exec_was_given_it(
        enforcing: Running, tmp_path: Path, how: str) -> None:
    """`exe:` globs match the executable's real path: `cd DIR && ./x`, `../DIR/x` or a
    symlink elsewhere do not hide that the program runs from a forbidden place (before,
    the glob saw only the path exec was given: "./runme" matched nothing)."""
    prog = SCRATCH / f"runme-{how}"
    shutil.copy(SLEEP, prog)
    prog.chmod(0o755)
    if how == "relative":
        argv = ["sh", "-c", f"cd {SCRATCH} && exec ./{prog.name} 30"]
    elif how == "dot-dot":
        argv = ["sh", "-c", f"cd {tmp_path} && exec ../../../..{SCRATCH}/{prog.name} 30"]
    else:
        link = tmp_path / "innocent"
        link.symlink_to(prog)
        argv = [str(link), "30"]
    start = time.monotonic()
    p = agent_exec(argv, agent="claude-code", socket=SOCK)
    assert killed(p)
    assert time.monotonic() - start < 8, "killed only when its sleep would have ended"
    v = enforcing.wait_verdict(rule="nothing-from-scratch", pid=p.pid)
    assert f"executable {prog} matches" in str(v["reason"])
    plain = subprocess.run([str(prog), "0.2"], timeout=10)  # not an agent: runs to the end
    assert plain.returncode == 0
