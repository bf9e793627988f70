"""The monitor as a service runs it: sd_notify readiness only once probes and policy are in
force, watchdog pings from the loop, SIGHUP reloads good policies and refuses bad ones (the
old one stays, in the kernel too), policy files an agent could edit are refused, and the
manual kill switch (all, one agent, latched, released) on real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AGENT_UID,
    SOCKET,
    Running,
    agent_exec,
    as_agent,
    free_port,
    require_root,
    wait_exit,
)

from monitor.model.events import ExecEvent
from monitor.service import client, control
from tests.support.hostile import HOSTILE_POLICIES
from tests.support.procs import stop_process

CLI = [sys.executable, "-m", "monitor.cli.main"]


def policy_killing(name: str, mode: str = "enforce") -> str:
    return (f"mode: {mode}\nrules:\n  - name: no-{name}\n    event: exec\n    action: kill\n"
            f"    match: {{name: [{name}]}}\n")


class Service:
    """`agentwatch run` as systemd would start it, with a notify socket of our own."""

    def __init__(self, tmp: Path, policy: str) -> None:
        self.tmp = tmp
        tmp.chmod(0o755)
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(policy)
        self.config = tmp / "config.yaml"
        self.config.write_text(f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
                               f"monitor: {{audit_log: {tmp}/audit/audit.jsonl}}\n")
        self.sock = str(tmp / "ctl.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.notify.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify.sock"), WATCHDOG_USEC="1000000")
        self.log = (tmp / "monitor.log").open("w")
        self.proc = subprocess.Popen([*CLI, "run", "--config", str(self.config), "--policy",
                                      str(self.policy), "--socket", self.sock], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def message(self) -> dict[str, str]:
        raw = self.notify.recv(4096).decode()
        return dict(line.split("=", 1) for line in raw.splitlines())

    def wait_message(self, key: str) -> dict[str, str]:
        while True:
            m = self.message()
            if key in m:
                return m

    def status(self) -> dict[str, object]:
        return client.request(self.sock, {"op": "status"})

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in (self.tmp / "monitor.log").read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)
        self.notify.close()
        self.log.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    require_root()
    s = Service(tmp_path, policy_killing("awreloada"))
    yield s
    s.stop()


def fake(tmp: Path, name: str) -> Path:
    prog = tmp / name
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    return prog


def run_agent(sock: str, prog: Path) -> int:
    return subprocess.run([*CLI, "exec", "--socket", sock, "--agent", "svc", "--", str(prog)],
                          timeout=30).returncode


def test_ready_only_when_enforcing_then_watchdog_and_stopping(service: Service) -> None:
    ready = service.wait_message("READY")
    # at READY the probes are attached and the policy is in the kernel: prove it
    status = service.status()
    assert status["probes"] == status["probes_expected"] == 9
    assert status["policy"]["kernel_rules"] == ["no-awreloada"]
    assert "enforce" in ready["STATUS"]
    assert run_agent(service.sock, fake(service.tmp, "awreloada")) == -signal.SIGKILL
    pings = 0
    deadline = time.monotonic() + 5
    while pings < 3 and time.monotonic() < deadline:
        if service.message().get("WATCHDOG") == "1":
            pings += 1
    assert pings >= 3, "the event loop does not ping the watchdog"
    service.proc.send_signal(signal.SIGTERM)
    assert service.wait_message("STOPPING")["STOPPING"] == "1"
    assert service.proc.wait(timeout=20) == 0


def test_sighup_reloads_a_good_policy_and_refuses_a_bad_one(service: Service) -> None:
    service.wait_message("READY")
    a, b = fake(service.tmp, "awreloada"), fake(service.tmp, "awreloadb")
    first = service.status()["policy"]["sha256"]
    service.policy.write_text(policy_killing("awreloadb"))
    service.proc.send_signal(signal.SIGHUP)
    assert "RELOADING" in service.wait_message("RELOADING")
    service.wait_message("READY")
    second = service.status()["policy"]["sha256"]
    assert second != first
    # the kernel's rules were swapped too
    assert run_agent(service.sock, a) == 0
    assert run_agent(service.sock, b) == -signal.SIGKILL
    # a malformed policy is refused: the running one stays, in the kernel as well
    service.policy.write_text("mode: enforce\nrules:\n  - name: x\n    event: exec\n"
                              "    action: deny\n    match: {name: [x]}\n")
    service.proc.send_signal(signal.SIGHUP)
    service.wait_message("RELOADING")
    service.wait_message("READY")
    assert service.status()["policy"]["sha256"] == second
    assert run_agent(service.sock, b) == -signal.SIGKILL
    refused = [ln for ln in service.lines() if ln["msg"] == "policy reload refused"]
    assert refused and "deny" in str(refused[0]["reason"])
    # a policy an agent could have edited is refused the same way
    service.policy.write_text(policy_killing("awreloada"))
    service.policy.chmod(0o666)
    service.proc.send_signal(signal.SIGHUP)
    service.wait_message("RELOADING")
    service.wait_message("READY")
    assert service.status()["policy"]["sha256"] == second
    # every verdict and policy change is in the audit log too
    audit = [json.loads(x) for x in (service.tmp / "audit" / "audit.jsonl").read_text()
             .splitlines()]
    assert {"verdict", "policy reloaded", "policy reload refused"} <= {x["msg"] for x in audit}


HOSTILE = {**HOSTILE_POLICIES, "2 MiB": "mode: monitor\n" + "#" * (2 << 20) + "\n"}


def refused_reloads(service: Service) -> float:
    port = re.search(r"127\.0\.0\.1:(\d+)", service.config.read_text())
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics",
                                timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r'^agentwatch_policy_reloads_total\{result="refused"\} (\S+)$', text,
                      re.M)
    return float(found.group(1)) if found else 0.0


def test_a_reload_of_a_hostile_or_swapped_policy_keeps_the_running_one(
        reachable_tmp: Path) -> None:
    """SIGHUP or `agentwatch reload` with a file that is deep, a bomb, too big, a FIFO,
    or a link an agent swapped: refused, counted, and the monitor goes on enforcing."""
    require_root()
    tmp = reachable_tmp / "svc"
    tmp.mkdir()
    service = Service(tmp, policy_killing("awreloada"))
    try:
        service.wait_message("READY")
        first = service.status()["policy"]["sha256"]

        def reload_refused(how: str) -> None:
            if how == "sighup":
                service.proc.send_signal(signal.SIGHUP)
            else:
                r = subprocess.run([*CLI, "reload", "--socket", service.sock],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 4 and "reload refused" in r.stderr, r.stderr
            service.wait_message("RELOADING")  # sent for either way of asking
            service.wait_message("READY")
            assert service.proc.poll() is None
            assert service.status()["policy"]["sha256"] == first

        for i, text in enumerate(HOSTILE.values()):
            service.policy.write_text(text)
            reload_refused("control" if i % 2 else "sighup")
        service.policy.unlink()
        os.mkfifo(service.policy, 0o644)  # a read would wait for a writer forever
        reload_refused("sighup")
        reasons = [str(ln["reason"]) for ln in service.lines()
                   if ln["msg"] == "policy reload refused"]
        assert len(reasons) == len(HOSTILE) + 1
        assert all(r.startswith(str(service.policy)) and len(r) < 2000 for r in reasons)
        assert "is a FIFO" in reasons[-1]
        assert refused_reloads(service) == len(HOSTILE) + 1

        # the policy reached through root's symlinks: a good reload
        conf = reachable_tmp / "conf"
        conf.mkdir()
        (conf / "policy.yaml").write_text(policy_killing("awreloada") + "# v2\n")
        service.policy.unlink()
        service.policy.symlink_to(conf / "policy.yaml")
        service.proc.send_signal(signal.SIGHUP)
        service.wait_message("RELOADING")
        service.wait_message("READY")
        second = service.status()["policy"]["sha256"]
        assert second != first

        # conf/ is handed to the agent by mistake; it points the policy at another
        # root-owned file, one that enforces nothing
        permissive = reachable_tmp / "examples-monitor-only.yaml"
        permissive.write_text("mode: monitor\n")
        os.chown(conf, AGENT_UID, AGENT_UID)
        as_agent(["ln", "-sfn", str(permissive), str(conf / "new.yaml")])
        as_agent(["mv", "-T", str(conf / "new.yaml"), str(conf / "policy.yaml")])
        service.proc.send_signal(signal.SIGHUP)
        service.wait_message("RELOADING")
        service.wait_message("READY")
        assert service.status()["policy"]["sha256"] == second
        last = [ln for ln in service.lines() if ln["msg"] == "policy reload refused"][-1]
        assert f"the directory {conf} must be owned by root" in str(last["reason"])
        assert run_agent(service.sock, fake(tmp, "awreloada")) == -signal.SIGKILL
    finally:
        service.stop()


def test_a_policy_file_others_can_write_is_refused_at_start(tmp_path: Path) -> None:
    require_root()
    tmp_path.chmod(0o755)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_killing("x"))
    policy.chmod(0o664)
    r = subprocess.run([*CLI, "run", "--policy", str(policy)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "must be owned by root and writable by nobody else" in r.stderr
    assert "chmod go-w" in r.stderr


def test_killswitch_one_agent_all_agents_latch_and_release(running: Running,
                                                           tmp_path: Path) -> None:
    a = agent_exec(["/bin/sleep", "60"], agent="ks-one")
    b = agent_exec(["/bin/sleep", "60"], agent="ks-two")
    for p in (a, b):
        running.log.wait_for(lambda e, _, p=p: isinstance(e, ExecEvent) and e.h.pid == p.pid
                             and e.filename == "/bin/sleep")
    r = subprocess.run([*CLI, "killswitch", "--socket", SOCKET, "--agent", "ks-one"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert wait_exit(a) == -signal.SIGKILL
    assert b.poll() is None, "the kill switch for one agent killed another"
    r = subprocess.run([*CLI, "killswitch", "--socket", SOCKET], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and wait_exit(b) == -signal.SIGKILL
    # latched: a new process of the agent dies at exec, before its first instruction
    shell = tmp_path / "awkbot"
    shell.write_bytes(Path("/bin/sh").read_bytes())
    shell.chmod(0o755)
    marker = tmp_path / "ran"
    r = subprocess.run([*CLI, "killswitch", "--socket", SOCKET, "--agent", "kbot", "--latch"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "latched: kbot" in r.stdout
    p = subprocess.run([str(shell), "-c", f"touch {marker}"], timeout=30)
    assert p.returncode == -signal.SIGKILL and not marker.exists()
    r = subprocess.run([*CLI, "killswitch", "--socket", SOCKET, "--agent", "kbot",
                        "--release"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    p = subprocess.run([str(shell), "-c", f"touch {marker}"], timeout=30)
    assert p.returncode == 0 and marker.exists()
    uses = [ln for ln in running.lines if ln.get("msg") == "killswitch"]
    assert [u["action"] for u in uses][-4:] == ["kill", "kill", "latch", "release"]


def test_killswitch_refuses_bad_requests(running: Running) -> None:
    for req, reason in (({"op": "killswitch", "agent": 5}, "'agent' must be a string"),
                        ({"op": "killswitch", "latch": "yes"}, "must be booleans"),
                        ({"op": "killswitch", "agent": "no-such-agent"}, "unknown agent"),
                        ({"op": "killswitch", "latch": True, "release": True}, "not both")):
        with pytest.raises(control.ControlError, match=reason):
            client.request(SOCKET, req)
