"""The machine a benchmark ran on, as the results record it: kernel, CPUs, CPU model, date,
the commit under test (and files modified in monitor/, probes/), other monitors running,
and the host-wide count of loaded BPF programs.

Reads /proc and git (read-only); measures nothing.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import (
    BENCH,
    other_monitors,
)


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"kernel": platform.release(), "nproc": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
            "other_monitors": other_monitors(), "git": git_state()}


def git_state() -> dict[str, Any]:
    """Commit and locally modified files of the tree under test (read-only git calls)."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "--no-optional-locks", "-C", str(BENCH.parent), *args],
                             capture_output=True, text=True, check=False)
        return res.stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "modified": [line[3:] for line in git("status", "--porcelain").splitlines()
                         if line[3:].startswith(("monitor/", "probes/"))]}


_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_GET_NEXT_ID = 11


def bpf_prog_count() -> int | None:
    """BPF programs loaded on the host, owned by a process or not (attached to a cgroup,
    pinned): what bpf_holders() cannot see. None if it cannot be asked."""
    if _SYS_BPF is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    n, start = 0, 0
    while True:
        attr = (ctypes.c_uint32 * 3)(start, 0, 0)  # start_id, next_id, open_flags
        if libc.syscall(_SYS_BPF, _BPF_PROG_GET_NEXT_ID, ctypes.byref(attr),
                        ctypes.sizeof(attr)) != 0:
            return n if ctypes.get_errno() == 2 else None  # ENOENT: end of the list
        start, n = attr[1], n + 1


def headline(m: dict[str, Any], title: str, *, commit: bool = False) -> list[str]:
    """The first lines of a report: what ran where (and a warning if other monitors ran)."""
    out = [f"{title}  {m['date']}  kernel {m['kernel']}  {m['nproc']} CPUs  {m['cpu_model']}"
           + (f"  commit {m['git']['commit'][:12]}" if commit else "")]
    if m["other_monitors"]:
        out.append(f"WARNING: other monitors were running: {m['other_monitors']}")
    return out


def save_results(res: dict[str, Any], output: str, report: str, t_start: float) -> None:
    """Record the runtime and the load average after, write the results to `output` and
    print the report (bench/scale.py, bench/footprint.py)."""
    res["runtime_s"] = round(time.monotonic() - t_start, 1)
    res["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    Path(output).write_text(json.dumps(res, indent=1) + "\n")
    print(report)
    print(f"\nruntime {res['runtime_s']} s; raw samples: {output}")

