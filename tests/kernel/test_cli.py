"""The command line as a user meets it: bad config exits 2 naming file and line, a host
that lacks something exits 3 with one sentence (never a traceback), a missing monitor 4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AGENT_UID, as_agent, free_port, require_root

from monitor.kernel.host import check_host
from monitor.model.errors import EnvironmentProblem

CLI = [sys.executable, "-m", "monitor.cli.main"]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_bad_config_is_refused_at_start_with_file_line_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents:\n  - name: bot\n    match:\n      - cmdline: '(unclosed'\n"
                   "        colour: red\n")
    r = run(["run", "--config", str(bad)])
    assert r.returncode == 2
    assert f"{bad}:4" in r.stderr and "cmdline" in r.stderr
    assert f"{bad}:5" in r.stderr and "colour" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(["config", "check", str(bad)])
    assert r.returncode == 2 and "colour" in r.stderr


def test_not_root_is_one_clear_sentence_and_exit_3(tmp_path: Path) -> None:
    require_root()
    from monitor.cli.main import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, run the real CLI entry point, report its exit code
        os.close(r)
        sys.stderr = os.fdopen(w, "w", buffering=1)
        os.setgroups([])
        os.setgid(AGENT_UID)
        os.setuid(AGENT_UID)
        code = main(["run", "--socket", str(tmp_path / "nobody.sock")])
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3, err
    assert "needs root" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_headers_and_tracefs_say_what_to_do(tmp_path: Path) -> None:
    require_root()
    with pytest.raises(EnvironmentProblem, match="make setup"):
        check_host(modules=tmp_path / "modules")
    with pytest.raises(EnvironmentProblem, match="mount -t tracefs"):
        check_host(tracefs=Path("/proc/self/agentwatch-no-such-dir"))


def test_exec_without_a_monitor_exits_4(tmp_path: Path) -> None:
    r = run(["exec", "--socket", str(tmp_path / "none.sock"), "--agent", "x", "--", "true"])
    assert r.returncode == 4
    assert "no agentwatch monitor is listening" in r.stderr and "Traceback" not in r.stderr


def test_help_teaches_with_examples() -> None:
    for cmd in ("run", "trace", "exec"):
        r = run([cmd, "--help"])
        assert r.returncode == 0 and "examples:" in r.stdout, cmd


def test_run_detaches_cleanly_on_sigterm_and_sigint(tmp_path: Path) -> None:
    require_root()
    import json
    import signal
    import socket as so
    import time

    for sig in (signal.SIGTERM, signal.SIGINT):
        sock = tmp_path / f"ctl-{sig}.sock"
        s = so.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cfg = tmp_path / f"config-{sig}.yaml"
        cfg.write_text(f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
        p = subprocess.Popen([*CLI, "run", "--config", str(cfg), "--socket", str(sock)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            started = json.loads(p.stdout.readline())
            assert started["msg"] == "monitor started"
            assert started["probes"] == started["probes_expected"] == 9
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert time.monotonic() < deadline, "control socket never appeared"
                time.sleep(0.05)
            assert (sock.stat().st_mode & 0o777) == 0o600
            p.send_signal(sig)
            out, err = p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        assert "Traceback" not in err
        assert any(json.loads(line)["msg"] == "monitor stopped" for line in out.splitlines())
        assert not sock.exists(), "the control socket was left behind"


def test_run_refuses_a_policy_an_agent_could_swap_and_files_that_are_not_policies(
        reachable_tmp: Path) -> None:
    """Issue 10 item 5: as root, config and policy are read only through a trusted path,
    and only from a regular file of at most 1 MiB, checked on the descriptor read."""
    require_root()
    base = reachable_tmp
    config = base / "config.yaml"
    config.write_text(f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n")
    policy = base / "policy.yaml"
    policy.write_text("mode: enforce\n")
    agent_dir = base / "agent"  # a directory the agent was given, or made for itself
    agent_dir.mkdir()
    os.chown(agent_dir, AGENT_UID, AGENT_UID)
    link = agent_dir / "policy.yaml"
    as_agent(["ln", "-s", str(policy), str(link)])  # points at root's own policy, for now
    fifo = base / "fifo.yaml"
    os.mkfifo(fifo, 0o644)
    big = base / "big.yaml"
    big.write_text("mode: enforce\n" + "#" * (1 << 20) + "\n")
    sock = str(base / "ctl.sock")
    for path, reason in (
            (link, f"the directory {agent_dir} must be owned by root and writable by nobody "
                   "else (owner uid 65534"),
            (fifo, f"the policy file {fifo} is a FIFO (named pipe), not a regular file"),
            (big, f"the policy file {big} is larger than 1 MiB")):
        r = run(["run", "--config", str(config), "--policy", str(path), "--socket", sock])
        assert r.returncode == 2, (path, r.stderr)
        assert reason in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run(["run", "--config", str(link), "--policy", str(policy), "--socket", sock])
    assert r.returncode == 2 and f"the directory {agent_dir} must be owned" in r.stderr
