"""Agents never run unwatched: with monitor.pin_dir the probes outlive a SIGKILLed monitor
(pinned BPF links), keep tracking the tree and enforcing in-kernel rules in the gap, and the
restarted monitor resumes the sessions; fail-closed kills agents whose monitor stays gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import free_port, require_root

from monitor.service import client, control

CLI = [sys.executable, "-m", "monitor.cli.main"]


def setup(tmp: Path, fail_closed: float = 0) -> tuple[Path, Path, str, str]:
    tmp.chmod(0o755)
    pin = f"/sys/fs/bpf/awtest-{os.getpid()}-{int(fail_closed)}"
    sock = str(tmp / "ctl.sock")
    config = tmp / "config.yaml"
    config.write_text(f"monitor:\n  control_socket: {sock}\n  pin_dir: {pin}\n"
                      f"  tick_seconds: 0.2\n  fail_closed_seconds: {fail_closed}\n"
                      f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n")
    policy = tmp / "policy.yaml"
    policy.write_text("mode: enforce\nrules:\n  - name: no-awgap\n    event: exec\n"
                      "    action: kill\n    match: {name: [awgap]}\n")
    return config, policy, sock, pin


def start(config: Path, policy: Path, sock: str, log: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*CLI, "run", "--config", str(config), "--policy", str(policy)],
                         stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.request(sock, {"op": "ping"}, timeout=2)
            return p
        except control.ControlError:
            assert p.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "monitor did not come up"
            time.sleep(0.1)


def session_of(sock: str, root: int) -> dict[str, Any] | None:
    status = client.request(sock, {"op": "status"})
    return next((s for s in status["sessions"] if s["root_pid"] == root), None)


def wait_for(pred: Any, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(what)


def test_probes_outlive_a_killed_monitor_and_the_restart_resumes(tmp_path: Path) -> None:
    require_root()
    config, policy, sock, pin = setup(tmp_path)
    gap = tmp_path / "awgap"
    marker = tmp_path / "gap-ran"
    gap.write_text(f"#!/bin/sh\ntouch {marker}\n")
    gap.chmod(0o755)
    go, result = tmp_path / "go", tmp_path / "result"
    script = (f"while [ ! -e {go} ]; do sleep 0.1; done; {gap}; echo $? > {result}; "
              "while :; do sleep 0.2; done")
    log = tmp_path / "monitor.log"
    mon = start(config, policy, sock, log)
    agent = None
    try:
        agent = subprocess.Popen([*CLI, "exec", "--socket", sock, "--agent", "gapbot", "--",
                                  "/bin/sh", "-c", script])
        wait_for(lambda: session_of(sock, agent.pid), "agent session not seen")
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        # the gap: no monitor. The agent's new child execs a forbidden binary.
        go.touch()
        wait_for(result.exists, "the agent never got past the forbidden exec")
        time.sleep(0.1)
        assert result.read_text().strip() == "137", "the in-kernel rule did not hold"
        assert not marker.exists(), "the forbidden binary ran while the monitor was down"
        # restart: the session is resumed from the pinned process map, children included
        mon = start(config, policy, sock, log)
        resumed = wait_for(lambda: session_of(sock, agent.pid), "session not resumed")
        assert resumed["agent"] == "gapbot" and resumed["processes"] >= 1
        before = resumed["execs"]
        wait_for(lambda: (session_of(sock, agent.pid) or {}).get("execs", 0) > before + 2,
                 "the resumed session does not see the agent's new execs")
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        assert any(x["msg"].startswith("recovered agent sessions") for x in lines)
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()
        mon.send_signal(signal.SIGTERM)
        mon.wait(timeout=20)
        out = subprocess.run([*CLI, "detach", "--pin-dir", pin], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and not os.path.exists(pin), out


def test_fail_closed_kills_agents_whose_monitor_stays_gone(tmp_path: Path) -> None:
    require_root()
    config, policy, sock, pin = setup(tmp_path, fail_closed=1)
    mon = start(config, policy, sock, tmp_path / "monitor.log")
    agent = None
    try:
        agent = subprocess.Popen([*CLI, "exec", "--socket", sock, "--agent", "orphan", "--",
                                  "/bin/sh", "-c", "while :; do sleep 0.1; done"])
        wait_for(lambda: session_of(sock, agent.pid), "agent session not seen")
        time.sleep(1.5)  # alive while the monitor beats
        assert agent.poll() is None
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        assert agent.wait(timeout=15) == -signal.SIGKILL
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        subprocess.run([*CLI, "detach", "--pin-dir", pin], timeout=30)


def test_without_pin_dir_nothing_outlives_a_killed_monitor(tmp_path: Path) -> None:
    """The cgroup deny hooks are links held by the monitor: SIGKILL it and they go, so no
    orphaned program keeps refusing connects on the host."""
    require_root()
    tmp_path.chmod(0o755)
    sock = str(tmp_path / "ctl.sock")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(f"monitor: {{control_socket: {sock}}}\n"
                      f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: enforce\nrules:\n  - name: no-port\n    event: connect\n"
                      f"    action: deny\n    match: {{address: [127.0.0.1], port: [{port}]}}\n")
    mon = start(config, policy, sock, tmp_path / "monitor.log")
    code = (f"import socket, time\nfor _ in range(600):\n"
            f"    print(socket.socket().connect_ex(('127.0.0.1', {port})), flush=True)\n"
            f"    time.sleep(0.05)\n")
    agent = subprocess.Popen([*CLI, "exec", "--socket", sock, "--agent", "probe", "--",
                              sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        results = (int(line) for line in agent.stdout)
        wait_for(lambda: next(results) == 1, "the deny rule never refused (EPERM)")
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        wait_for(lambda: next(results) == 0, "connects still refused after the monitor died")
    finally:
        agent.kill()
        agent.wait()
        listener.close()
        if mon.poll() is None:
            mon.kill()
            mon.wait()
