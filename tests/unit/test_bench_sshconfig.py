"""bench/sshconfig.py runs without root or BPF: a small run must work and report every case
(the figures themselves are for docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sshconfig.py"


def test_sshconfig_bench_reports_every_case() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--execs", "20", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[1:]}
    assert set(rows) == {"system-only", "typical", "includes", "typical-inline",
                         "pure-typical"}
    assert all(us > 0 for us in rows.values())
    assert rows["pure-typical"] < rows["typical"]  # reading the files costs something
