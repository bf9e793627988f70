"""bench/hotpath.py runs without root or BPF: a small run must work and give sane figures
(the full benchmarks are `make bench`, docs/benchmarks.md; this keeps the script from
rotting between runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hotpath.py"


def test_hotpath_bench_reports_both_mixes_with_the_full_path_dearer_than_decoding() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--records", "3000", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) == {"connect", "exec"}
    for mix, cols in rows.items():
        decode_us, full_us, ratio = float(cols[1]), float(cols[2]), float(cols[3])
        assert 0 < decode_us < full_us, mix  # tracking, judging and metrics cost something
        assert abs(ratio - full_us / decode_us) < 0.05 * ratio, mix  # printed rounded
