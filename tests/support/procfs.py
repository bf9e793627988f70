"""Writers of /proc fixture trees: a directory that monitor.sessions.procfs.ProcFS reads as
/proc, with one PID/ folder per process (stat, status, cmdline, cgroup, exe) written the
way the kernel lays them out.

Writes only under the root it is given (a test's tmp_path); never reads the real /proc.
"""

from __future__ import annotations

import os
from pathlib import Path


def stat_line(pid: int, comm: str, ppid: int, flags: int = 0, start: int = 100) -> str:
    """/proc/PID/stat: pid (comm) state ppid ... flags (field 9) ... starttime (field 22)."""
    fields = ["S", str(ppid), str(pid), str(pid), "0", "-1", str(flags)]
    fields += ["0"] * 12  # fields 10..21
    fields.append(str(start))  # field 22: starttime
    fields += ["0"] * 30  # fields 23..52
    return f"{pid} ({comm}) {' '.join(fields)}\n"


def make_proc(
    root: Path,
    pid: int,
    ppid: int = 1,
    comm: str = "proc",
    *,
    flags: int = 0,
    start: int | None = None,
    uid: int = 1000,
    argv: tuple[str, ...] | None = None,
    cgroup: str = "0::/user.slice/app.scope\n",
    exe: str | None = "/usr/bin/proc",
) -> Path:
    """root/PID as /proc/PID of a process `comm` (argv default: /usr/bin/COMM) of user
    `uid`, started `start` clock ticks after boot (default 1000 + pid); no exe link when
    exe is None (a kernel thread). Returns the folder."""
    d = root / str(pid)
    d.mkdir(parents=True)
    d.joinpath("stat").write_text(
        stat_line(pid, comm, ppid, flags, start if start is not None else 1000 + pid)
    )
    d.joinpath("status").write_text(
        f"Name:\t{comm}\nState:\tS (sleeping)\nPPid:\t{ppid}\n"
        f"Uid:\t{uid}\t{uid + 1}\t{uid + 2}\t{uid + 3}\nGid:\t0\t0\t0\t0\n"
    )
    args = argv if argv is not None else (f"/usr/bin/{comm}",)
    d.joinpath("cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in args))
    d.joinpath("cgroup").write_text(cgroup)
    if exe is not None:
        os.symlink(exe, d / "exe")
    return d
