"""Cost of program identity per agent exec (monitor/sessions/identity.py): the whole
identify step (readlink and open of /proc/PID/exe, fstat, cache lookup) on a cache hit, and
a cache miss (the sha256 of the file) on a 1 MB and a 100 MB executable. No root needed:
it identifies its own process and files it writes.

Usage: .venv/bin/python bench/identity.py [--rounds N] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.model.events import ExecEvent, Header  # noqa: E402
from monitor.sessions.identity import MIB, OPEN_FLAGS, Identity  # noqa: E402


def quiet(msg: str, level: str = "info", **fields: object) -> None:
    pass


def hit_us(rounds: int) -> float:
    """µs per identify() of this process's exec, its file already cached."""
    identity = Identity(log=quiet)
    ev = ExecEvent(Header(0, os.getpid(), os.getpid(), 1, 1, 0, "python"), 0, 1, 1, 0,
                   sys.executable, ("python",))
    identity.identify(ev)
    start = time.perf_counter()
    for _ in range(rounds):
        identity.identify(ev)
    return (time.perf_counter() - start) / rounds * 1e6


def miss_ms(size: int, rounds: int, tmp: Path) -> tuple[float, float]:
    """(median, max) ms per fingerprint of a file of `size` bytes never seen before (each
    round its own file; the page cache warm, as for a binary just exec'd)."""
    identity = Identity(log=quiet, budget_bytes=1 << 40)
    times = []
    for i in range(rounds):
        f = tmp / f"bin{size}-{i}"
        f.write_bytes(os.urandom(size))
        fd = os.open(f, OPEN_FLAGS)
        try:
            start = time.perf_counter()
            found = identity.fingerprint(fd, os.fstat(fd))
            times.append((time.perf_counter() - start) * 1e3)
        finally:
            os.close(fd)
        assert found.sha256 is not None
        f.unlink()
    return statistics.median(times), max(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="misses per size (default 20)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results-identity.json"))
    args = ap.parse_args()
    results: dict[str, float] = {"hit_us": round(hit_us(20_000), 2)}
    with tempfile.TemporaryDirectory(prefix="agentwatch-identity-") as tmp:
        for label, size in (("1mb", MIB), ("100mb", 100 * MIB)):
            med, worst = miss_ms(size, args.rounds, Path(tmp))
            results[f"miss_{label}_ms"] = round(med, 3)
            results[f"miss_{label}_max_ms"] = round(worst, 3)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"identify, cache hit: {results['hit_us']:.2f} µs per exec")
    for label in ("1mb", "100mb"):
        print(f"fingerprint miss, {label.upper()}: {results[f'miss_{label}_ms']:.3f} ms per "
              f"exec (max {results[f'miss_{label}_max_ms']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
