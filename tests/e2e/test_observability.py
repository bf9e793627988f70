"""End to end, as an SRE runs it: Debian's Prometheus (with the project's alert rules) and
Alertmanager on loopback, the monitor from the command line, and an agent that breaks a
default rule. Prometheus scrapes the monitor; every dashboard query runs against it and the
kill panels have data; the kill-switch alert reaches Alertmanager through the rule path
and through the monitor's direct push; a kill while Alertmanager is down is spooled and
arrives after it restarts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI") == "true"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
CLI = [sys.executable, "-m", "monitor.cli.main"]


def need(ok: bool, reason: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"e2e test cannot run in CI: {reason}")
    pytest.skip(reason)


def get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 — loopback only
        return json.loads(r.read())


def wait(pred: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except OSError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


class Service:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
        self.proc = None


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prom_port, self.am_port, self.metrics_port = free_port(), free_port(), free_port()
        self.prom = f"http://127.0.0.1:{self.prom_port}"
        self.am = f"http://127.0.0.1:{self.am_port}"
        self.sock = str(tmp / "ctl.sock")
        (tmp / "am.yml").write_text(
            "route: {receiver: sink, group_wait: 0s, group_interval: 1s, repeat_interval: 1h}\n"
            "receivers: [{name: sink}]\n")
        (tmp / "prometheus.yml").write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{ROOT / 'dashboards' / 'alerts.yml'}]
alerting:
  alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{self.am_port}']}}]}}]
scrape_configs:
  - job_name: agentwatch
    static_configs: [{{targets: ['127.0.0.1:{self.metrics_port}']}}]
""")
        (tmp / "config.yaml").write_text(f"""monitor:
  control_socket: {self.sock}
  tick_seconds: 0.5
metrics:
  listen: 127.0.0.1:{self.metrics_port}
alerts:
  alertmanager_url: {self.am}
  spool_dir: {tmp / 'spool'}
  timeout_seconds: 1
""")
        self.alertmanager = Service([ALERTMANAGER, f"--config.file={tmp / 'am.yml'}",
                                     f"--storage.path={tmp / 'am-data'}",
                                     f"--web.listen-address=127.0.0.1:{self.am_port}",
                                     "--cluster.listen-address="], tmp / "am.log")
        self.prometheus = Service([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'prom-data'}",
                                   f"--web.listen-address=127.0.0.1:{self.prom_port}"],
                                  tmp / "prom.log")
        self.monitor = Service([*CLI, "run", "--config", str(tmp / "config.yaml")],
                               tmp / "monitor.log")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = get(url)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def am_alerts(self, alertname: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"filter": f'alertname="{alertname}"'})
        return list(get(f"{self.am}/api/v2/alerts?{q}"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need(os.geteuid() == 0, "needs root (BPF)")
    need(os.path.exists(PROMETHEUS) and os.path.exists(ALERTMANAGER),
         "Debian's prometheus and prometheus-alertmanager are not installed "
         "(make test installs them: packaging/setup-observability.sh)")
    s = Stack(tmp_path_factory.mktemp("e2e"))
    s.alertmanager.start()
    s.prometheus.start()
    s.monitor.start()
    try:
        wait(lambda: get(f"{s.am}/api/v2/status"), "alertmanager up")
        wait(lambda: s.query('up{job="agentwatch"} == 1'), "prometheus scrapes the monitor")
        yield s
    finally:
        for svc in (s.monitor, s.prometheus, s.alertmanager):
            svc.stop()


def break_rule(stack: Stack, name: str) -> None:
    """An agent execs a program named like a miner / tunnel tool: killed in the kernel."""
    prog = stack.tmp / name
    prog.write_text("#!/bin/sh\nexec sleep 5\n")
    prog.chmod(0o755)
    p = subprocess.run([*CLI, "exec", "--socket", stack.sock, "--agent", "claude-code", "--",
                        str(prog)], timeout=30)
    assert p.returncode == -signal.SIGKILL, "the agent was not killed"


def test_kill_reaches_prometheus_dashboard_and_alertmanager(stack: Stack) -> None:
    break_rule(stack, "xmrig")
    kills = wait(lambda: stack.query('agentwatch_kills_total{rule="no-miners"} > 0'),
                 "kill counted in Prometheus")
    assert kills[0]["metric"]["agent"] == "claude-code"
    # every panel query of the dashboard runs; the kill panels return data
    dashboard = json.loads((ROOT / "dashboards" / "agentwatch.json").read_text())
    subst = {"$instance": ".*", "${instance}": ".*", "$agent": ".*", "${agent}": ".*",
             "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels") or [])

    empty_kill_panels = []
    checked = 0
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if not expr:
                continue
            for k, v in subst.items():
                expr = expr.replace(k, v)
            assert "$" not in re.sub(r"\$\d", "", expr), f"unsubstituted variable: {expr}"
            result = stack.query(expr)  # raises on a query error
            checked += 1
            if re.search(r"kills?\b", panel["title"], re.I) and "latency" not in \
                    panel["title"].lower() and not result:
                empty_kill_panels.append(panel["title"])
    assert checked >= 20
    wait(lambda: all(stack.query(e) for e in ["sum(agentwatch_kills_total)"]), "kill series")
    assert not empty_kill_panels, f"kill panels without data: {empty_kill_panels}"
    # the rule path: Prometheus alert rule -> Alertmanager
    wait(lambda: stack.am_alerts("AgentwatchKillSwitchFired"), "rule alert in Alertmanager")
    # the direct push from the monitor
    pushed = wait(lambda: [a for a in stack.am_alerts("AgentwatchKill")
                           if a["labels"].get("rule") == "no-miners"], "pushed alert")
    assert pushed[0]["labels"]["agent"] == "claude-code"


def test_kill_while_alertmanager_is_down_arrives_after_it_restarts(stack: Stack) -> None:
    stack.alertmanager.stop()
    break_rule(stack, "ngrok")
    wait(lambda: stack.query("agentwatch_alerts_spooled > 0"), "alert spooled while down")
    stack.alertmanager.start()
    wait(lambda: get(f"{stack.am}/api/v2/status"), "alertmanager back")
    got = wait(lambda: [a for a in stack.am_alerts("AgentwatchKill")
                        if a["labels"].get("rule") == "no-tunnel-tools"],
               "spooled alert delivered after restart", timeout=90)
    assert len(got) == 1
    wait(lambda: stack.query("agentwatch_alerts_spooled == 0"), "spool drained")
