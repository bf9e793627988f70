"""Kernel tests with a monitor of their own: adoption of trees that started before the
monitor, and agents recognised in userspace (cmdline regex) at exec time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import Running, require_root, wait_exit

from monitor.config.load import load_config_text
from monitor.model.events import ExecEvent, ForkEvent


def _config(tmp_path: Path) -> str:
    return f"""
agents:
  - name: adopted
    match:
      - comm: awadopt
  - name: cmdbot
    match:
      - cmdline: "awcmdbot-marker-[0-9]+"
monitor:
  control_socket: {tmp_path}/ctl.sock
  tick_seconds: 0.2
"""


def _wait_file(path: Path, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text().strip()


def test_adopts_a_tree_started_before_the_monitor_and_userspace_matched_agents(
        tmp_path: Path) -> None:
    require_root()
    shell = tmp_path / "awadopt"
    shell.write_bytes(Path("/bin/sh").read_bytes())
    shell.chmod(0o755)
    go = tmp_path / "go"
    kids = tmp_path / "kids"
    # root -> child -> grandchild already running; after `go` appears the root forks again
    script = (f"sh -c 'sleep 30 & echo $! >> {kids}; wait' & echo $! >> {kids}; "
              f"while [ ! -e {go} ]; do sleep 0.05; done; /bin/true forked-after-start; "
              f"wait")
    tree = subprocess.Popen([str(shell), "-c", script])
    pids: list[int] = []
    deadline = time.monotonic() + 5
    while len(pids) < 2:
        assert time.monotonic() < deadline
        pids = [int(x) for x in kids.read_text().split()] if kids.exists() else []
        time.sleep(0.02)
    r = Running(load_config_text(_config(tmp_path), "<adoption-test>"), None).start()
    try:
        probes = r.monitor.probes
        for pid in [tree.pid, *pids]:
            assert probes.is_tracked(pid), f"pid {pid} of the running tree was not adopted"
        sessions = [s for s in r.monitor.tracker.sessions() if s.agent == "adopted"]
        assert len(sessions) == 1 and sessions[0].root_pid == tree.pid
        assert set(sessions[0].processes) >= {tree.pid, *pids}
        assert not probes.is_tracked(os.getpid())

        go.touch()
        ev, agent = r.log.wait_for(lambda e, a: isinstance(e, ExecEvent)
                                   and e.argv[-1:] == ("forked-after-start",))
        assert agent == "adopted" and ev.h.session == sessions[0].id

        # userspace matcher: decided on the exec event, children tracked from then on
        marker = f"awcmdbot-marker-{os.getpid()}"
        bot = subprocess.Popen(["/bin/sh", "-c", f"/bin/true child; : {marker}"])
        assert wait_exit(bot) == 0
        root, agent = r.log.wait_for(lambda e, a: isinstance(e, ExecEvent)
                                     and e.h.pid == bot.pid)
        assert agent == "cmdbot"
        fork, _ = r.log.wait_for(lambda e, a: isinstance(e, ForkEvent) and e.h.pid == bot.pid)
        child, agent = r.log.wait_for(lambda e, a: isinstance(e, ExecEvent)
                                      and e.argv == ("/bin/true", "child"))
        assert agent == "cmdbot" and child.h.session == root.h.session
        assert isinstance(fork, ForkEvent) and child.h.pid == fork.child_pid
        # a process that does not match stays untracked and invisible
        other = subprocess.Popen(["/bin/sh", "-c", "/bin/true not-an-agent"])
        assert wait_exit(other) == 0
        assert not any(e.h.pid == other.pid for e, _ in r.log.snapshot())
    finally:
        r.stop()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tree.kill()
        tree.wait()
