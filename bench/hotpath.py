"""Hot-path micro-benchmark: userspace CPU per event, without the kernel.

Feeds synthetic ring-buffer records (connect, exec, fork+exit) of one tracked process
through Monitor._on_record, the function the ring-buffer callback calls, with the default
policy, and reports microseconds per record. Baseline in the same run: the decoder alone
(abi.decode) on the same records, so the ratio says what tracking, judging and metrics
add on top of decoding. Rounds alternate (decode, full, decode, full, ...); medians and
min-max are printed. No root, no BPF: FakeProbes (tests/support/kernel.py) stands in for
the kernel maps.

    .venv/bin/python bench/hotpath.py [--records 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from monitor.config.load import load_config_text  # noqa: E402
from monitor.kernel import abi  # noqa: E402
from monitor.kernel.abi import (  # noqa: E402
    EXEC_ARGS_OFFSET,
    CConnectEvent,
    CExecEvent,
    CHeader,
)
from monitor.model.events import EventType, ExecFlag  # noqa: E402
from monitor.policy.load import default_policy  # noqa: E402
from monitor.service.daemon import Monitor  # noqa: E402
from monitor.sessions.procfs import ProcFS  # noqa: E402
from tests.support.kernel import FakeProbes  # noqa: E402
from tests.support.log import Log  # noqa: E402

SESSION = 0x80000001


def header(kind: EventType, pid: int, ts: int, comm: bytes) -> CHeader:
    return CHeader(ts_ns=ts, type=kind, pid=pid, tid=pid, session=SESSION, agent=0, uid=0,
                   comm=comm)


def connect_record(pid: int, ts: int, last_octet: int) -> bytes:
    c = CConnectEvent()
    c.h = header(EventType.CONNECT, pid, ts, b"gen")
    c.family, c.port, c.protocol = 2, 4000, 6
    for i, b in enumerate((127, 0, 0, last_octet)):
        c.addr[i] = b
    return bytes(c)


def exec_record(pid: int, ts: int) -> bytes:
    e = CExecEvent()
    e.h = header(EventType.EXEC, pid, ts, b"true")
    args = b"/bin/true\0--version\0"
    e.old_tid, e.ppid, e.flags, e.args_len = pid, 1, int(ExecFlag.ARGV_FROM_MM), len(args)
    e.filename = b"/bin/true"
    ct.memmove(ct.addressof(e) + EXEC_ARGS_OFFSET, args, len(args))
    return bytes(e)[: EXEC_ARGS_OFFSET + len(args)]


def records(n: int, mix: str, pid: int) -> list[bytes]:
    if mix == "connect":
        return [connect_record(pid, 1000 + i, 1 + i % 8) for i in range(n)]
    return [exec_record(pid, 1000 + i) for i in range(n)]


def monitor() -> Monitor:
    tmp = Path(tempfile.mkdtemp(prefix="aw-hotpath-"))
    (tmp / "proc").mkdir()
    mon = Monitor(load_config_text("monitor: {tick_seconds: 1}\n", "<hotpath>"),
                  default_policy(), probes=FakeProbes(),
                  procfs=ProcFS(tmp / "proc"), log=Log())
    mon.tracker.start_session(SESSION, "claude-code", os.getpid(), 1)
    mon.tracker.add_process(SESSION, os.getpid(), 0, comm="gen", exe="/tmp/gen",
                            argv=("gen",), uid=0, start_ns=1)
    return mon


def per_record_us(fn: Callable[[bytes], object], recs: list[bytes]) -> float:
    t = time.perf_counter()
    for r in recs:
        fn(r)
    return (time.perf_counter() - t) / len(recs) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"{'mix':<8} {'decode only us':>15} {'full path us':>13} {'ratio':>6} "
          f"{'full path records/s':>20}")
    for mix in ("connect", "exec"):
        recs = records(args.records, mix, os.getpid())
        dec, full = [], []
        for _ in range(args.rounds):
            dec.append(per_record_us(abi.decode, recs))
            full.append(per_record_us(monitor()._on_record, recs))
        d, f = statistics.median(dec), statistics.median(full)
        print(f"{mix:<8} {d:15.2f} {f:13.2f} {f / d:6.2f} {1e6 / f:20,.0f}   "
              f"(full min-max {min(full):.2f}-{max(full):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
