"""Scrape time of /metrics and the monitor's resident memory with 50 agents and 5,000 live
tracked processes (issue goals: scrape <= 50 ms, RSS <= 80 MiB).

Starts `agentwatch run` (its own config: free metrics port, temp control socket), starts 50
agents through `agentwatch exec`, each a shell that forks 100 sleeping children, waits until
the monitor tracks them all, then times 30 scrapes (1.05 s apart) against a baseline scrape
of an idle monitor in the same run. Then an agent scrapes /metrics in a loop from
--loop-threads threads for --loop-seconds: the monitor's CPU over that span, the scrapes
served, and how long a scrape once a second (Prometheus) takes meanwhile. Cleans up every
process it started, by pid.

Usage: .venv/bin/python bench/scrape.py [--agents 50] [--children 100] [--scrapes 30]
       [--loop-threads 4] [--loop-seconds 10] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lib.harness import ScrapeLoop, free_port, proc_cpu

ROOT = Path(__file__).resolve().parent.parent
AGENTWATCH = str(Path(sys.executable).parent / "agentwatch")
GAP = 1.05  # seconds between timed scrapes: longer than the exporter's default cache


def scrape_ms(url: str, n: int, gap: float = 0.0) -> list[float]:
    """n scrapes, `gap` seconds apart (Prometheus scrapes every few seconds: a gap longer
    than the exporter's cache makes each scrape a fresh rendering)."""
    out = []
    for i in range(n):
        if i:
            time.sleep(gap)
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 — loopback only
            r.read()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--children", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=30, help="timed scrapes, %(default)s")
    ap.add_argument("--loop-threads", type=int, default=4)
    ap.add_argument("--loop-seconds", type=float, default=10.0)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results-scrape.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentwatch-scrape-"))
    port, sock = free_port(), str(tmp / "ctl.sock")
    cfg = tmp / "config.yaml"
    cfg.write_text(f"monitor: {{control_socket: {sock}}}\n"
                   f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
    url = f"http://127.0.0.1:{port}/metrics"
    mon = subprocess.Popen([AGENTWATCH, "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        while True:
            try:
                scrape_ms(url, 1)
                break
            except OSError:
                time.sleep(0.2)
        idle = scrape_ms(url, args.scrapes, GAP)
        idle_rss = rss_mib(mon.pid)
        script = f"for i in $(seq {args.children}); do sleep 600 & done; wait"
        for i in range(args.agents):
            agents.append(subprocess.Popen([AGENTWATCH, "exec", "--socket", sock, "--agent",
                                            f"agent-{i:02d}", "--", "/bin/sh", "-c", script]))
        want = args.agents * (args.children + 1)
        deadline = time.monotonic() + 120
        tracked = 0
        while time.monotonic() < deadline:
            status = json.loads(subprocess.run([AGENTWATCH, "status", "--socket", sock],
                                               capture_output=True, text=True).stdout)
            tracked = sum(s["processes"] for s in status["sessions"])
            if tracked >= want:
                break
            time.sleep(1)
        time.sleep(2)  # a few ticks with the full tree
        loaded = scrape_ms(url, args.scrapes, GAP)
        loaded_rss = rss_mib(mon.pid)
        body = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310
        quiet0, t0 = proc_cpu(mon.pid), time.monotonic()
        time.sleep(args.loop_seconds)
        quiet_cpu = (proc_cpu(mon.pid) - quiet0) / (time.monotonic() - t0)
        loop = ScrapeLoop(url, args.loop_threads, [AGENTWATCH, "exec", "--socket", sock,
                                                   "--agent", "scraper", "--"])
        cpu0, t0 = proc_cpu(mon.pid), time.monotonic()
        looped = scrape_ms(url, max(1, int(args.loop_seconds)), 1.0)  # Prometheus meanwhile
        loop_cpu = (proc_cpu(mon.pid) - cpu0) / (time.monotonic() - t0)
        served, failed, loop_s = loop.stop()
    finally:
        # every process the agents started, and nothing else: the monitor's kill switch
        subprocess.run([AGENTWATCH, "killswitch", "--socket", sock], capture_output=True,
                       timeout=120, check=False)
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.wait()
        mon.send_signal(signal.SIGTERM)
        mon.wait(timeout=30)
    res = {
        "agents": args.agents, "processes_tracked": tracked,
        "idle_scrape_ms_median": round(statistics.median(idle), 2),
        "scrape_ms_median": round(statistics.median(loaded), 2),
        "scrape_ms_p90": round(sorted(loaded)[int(0.9 * len(loaded))], 2),
        "scrape_ms_max": round(max(loaded), 2),
        "ratio_to_idle": round(statistics.median(loaded) / statistics.median(idle), 2),
        "rss_mib_idle": round(idle_rss, 1), "rss_mib": round(loaded_rss, 1),
        "monitor_cpu_pct_not_scraped": round(100 * quiet_cpu, 1),
        "monitor_cpu_pct_scraped_in_a_loop": round(100 * loop_cpu, 1),
        "loop_threads": args.loop_threads, "loop_scrapes_per_s": round(served / loop_s, 1),
        "loop_scrapes_failed": failed,
        "scrape_ms_median_while_looped": round(statistics.median(looped), 2),
        "scrape_ms_max_while_looped": round(max(looped), 2),
        "metrics_bytes": len(body), "series": sum(1 for ln in body.splitlines()
                                                  if ln and not ln.startswith("#")),
        "goals": {"scrape_le_50ms": statistics.median(loaded) <= 50,
                  "rss_le_80mib": loaded_rss <= 80},
    }
    print(json.dumps(res, indent=1))
    Path(args.output).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
