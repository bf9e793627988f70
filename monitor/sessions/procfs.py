"""Read process facts from a /proc tree and plan which running processes to adopt.

This module is the monitor's only view of processes that existed before its probes were
attached: it parses /proc/PID/{stat,status,cmdline,cgroup,exe} into frozen ProcInfo records,
walks process trees, and decides (plan_adoption) which already-running processes belong to
which agent session. The /proc root is a constructor argument so tests run against fixture
trees. Bytes become text only through monitor.model.cmdline.decode (the ring decoder's way), and a
command line is read up to cmdline.READ_MAX bytes, never without a bound.

It must never crash because a process vanished or was recycled mid-read (processes come and
go at any moment; such a pid is simply skipped), never signal, write to or otherwise change
any process, and never import anything heavy (no BCC): unit tests use it without root.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from monitor.model import cmdline

PF_KTHREAD = 0x00200000
"""Kernel task flag (include/linux/sched.h) marking a kernel thread."""

KTHREADD_PID = 2
"""pid of kthreadd, parent of every kernel thread."""


# Errors meaning "this process is gone (or hidden from us) right now": skip it.
_VANISHED: tuple[type[OSError], ...] = (
    FileNotFoundError,
    ProcessLookupError,
    PermissionError,
    NotADirectoryError,
)

# readlink(/proc/PID/exe) errnos meaning "no executable to report" (kernel thread, zombie,
# permission, process gone, or not a symlink in a fixture tree).
_NO_EXE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM, errno.EINVAL})

# Indexes into the fields that follow the last ')' of /proc/PID/stat; field N of proc(5)
# (1-based, field 3 being "state") is at index N - 3.
_STAT_PPID = 4 - 3
_STAT_FLAGS = 9 - 3
_STAT_STARTTIME = 22 - 3


def clock_ticks() -> int:
    """Clock ticks per second (USER_HZ), the unit of ProcInfo.start_ticks."""
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    """Facts about one process, as read from /proc at one moment."""

    pid: int
    ppid: int
    comm: str
    exe: str
    argv: tuple[str, ...]
    uid: int
    cgroup: str
    start_ticks: int
    kernel_thread: bool
    # /proc/PID/cmdline as read (up to cmdline.READ_MAX bytes): argv is split from it, or
    # is a clip of it when it holds more than cmdline.SPLIT_MAX_ARGS arguments
    cmdline: bytes = field(default=b"", compare=False, repr=False)
    cmdline_cut: bool = field(default=False, compare=False)  # longer than READ_MAX
    argv_clipped: bool = field(default=False, compare=False)  # argv is a clip of cmdline

    @property
    def line(self) -> str:
        """The whole command line as read, arguments joined by single spaces."""
        return cmdline.join(self.cmdline)


@dataclass(frozen=True)
class Adoption:
    """One already-running process to start tracking; root_pid == pid for an agent root."""

    pid: int
    ppid: int
    root_pid: int
    agent: str
    start_ticks: int


@dataclass(frozen=True)
class _Stat:
    ppid: int
    comm: str
    flags: int
    start_ticks: int


def _stat_fields(raw: bytes) -> tuple[str, list[bytes]] | None:
    """Split a stat line into (comm, fields after the comm); None when malformed."""
    open_paren = raw.find(b"(")
    close_paren = raw.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    comm = cmdline.decode(raw[open_paren + 1 : close_paren])
    return comm, raw[close_paren + 1 :].split()


def _parse_stat(raw: bytes) -> _Stat | None:
    parsed = _stat_fields(raw)
    if parsed is None:
        return None
    comm, fields = parsed
    try:
        return _Stat(
            ppid=int(fields[_STAT_PPID]),
            comm=comm,
            flags=int(fields[_STAT_FLAGS]),
            start_ticks=int(fields[_STAT_STARTTIME]),
        )
    except (IndexError, ValueError):
        return None


def _parse_start_ticks(raw: bytes) -> int | None:
    parsed = _stat_fields(raw)
    if parsed is None:
        return None
    try:
        return int(parsed[1][_STAT_STARTTIME])
    except (IndexError, ValueError):
        return None


def _parse_real_uid(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("Uid:"):
            parts = line.split()
            try:
                return int(parts[1])
            except (IndexError, ValueError):
                return None
    return None


def _parse_cgroup(text: str) -> str:
    """The cgroup v2 (unified hierarchy) path from a /proc/PID/cgroup file, or ""."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            return parts[2]
    return ""


def _parse_cmdline(raw: bytes) -> tuple[tuple[str, ...], bool]:
    """(argv, whether it is a clip of raw)."""
    argv = cmdline.split(raw)
    return (argv, False) if argv is not None else (cmdline.clip_block(raw), True)


def _read_capped(path: Path, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of a file, and whether there was more."""
    with open(path, "rb", buffering=0) as f:
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    raw = b"".join(chunks)
    return raw[:limit], len(raw) > limit


class ProcFS:
    """Reads processes from a /proc tree rooted at `root` (the real /proc by default)."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = Path(root)

    def _path(self, pid: int, name: str) -> Path:
        return self.root / str(pid) / name

    def pids(self) -> list[int]:
        """Sorted pids of the numeric entries under the root."""
        return sorted(int(n) for n in os.listdir(self.root) if n.isascii() and n.isdigit())

    def start_ticks(self, pid: int) -> int | None:
        """Field 22 (starttime, clock ticks since boot) of the pid's stat; None if gone."""
        try:
            raw = self._path(pid, "stat").read_bytes()
        except _VANISHED:
            return None
        return _parse_start_ticks(raw)

    def _exe(self, pid: int) -> str:
        try:
            target = cmdline.decode(os.readlink(os.fsencode(self._path(pid, "exe"))))
        except OSError as err:
            if err.errno in _NO_EXE_ERRNOS:
                return ""
            raise
        return target.removesuffix(cmdline.DELETED_SUFFIX)

    def read(self, pid: int) -> ProcInfo | None:
        """Facts about pid, or None when it is gone, recycled or unreadable mid-read."""
        try:
            stat = _parse_stat(self._path(pid, "stat").read_bytes())
            if stat is None:
                return None
            uid = _parse_real_uid(cmdline.decode(self._path(pid, "status").read_bytes()))
            if uid is None:
                return None
            raw, cut = _read_capped(self._path(pid, "cmdline"), cmdline.READ_MAX)
            cgroup = _parse_cgroup(cmdline.decode(self._path(pid, "cgroup").read_bytes()))
        except _VANISHED:
            return None
        exe = self._exe(pid)
        # The pid may have exited and been reused while we read: confirm it is the same one.
        if self.start_ticks(pid) != stat.start_ticks:
            return None
        kernel = bool(stat.flags & PF_KTHREAD) or KTHREADD_PID in (pid, stat.ppid)
        argv, clipped = _parse_cmdline(raw)
        return ProcInfo(
            pid=pid,
            ppid=stat.ppid,
            comm=stat.comm,
            exe=exe,
            argv=argv,
            uid=uid,
            cgroup=cgroup,
            start_ticks=stat.start_ticks,
            kernel_thread=kernel,
            cmdline=raw,
            cmdline_cut=cut,
            argv_clipped=clipped,
        )

    def scan(self) -> dict[int, ProcInfo]:
        """Every process readable right now, by pid."""
        infos: dict[int, ProcInfo] = {}
        for pid in self.pids():
            info = self.read(pid)
            if info is not None:
                infos[pid] = info
        return infos

    @staticmethod
    def children_map(infos: Mapping[int, ProcInfo]) -> dict[int, list[int]]:
        """ppid -> sorted pids of its children."""
        children: dict[int, list[int]] = {}
        for pid in sorted(infos):
            children.setdefault(infos[pid].ppid, []).append(pid)
        return children

    def descendants(self, root_pid: int, infos: Mapping[int, ProcInfo] | None = None) -> list[int]:
        """Breadth-first pids of every descendant of root_pid (not root_pid itself)."""
        if infos is None:
            infos = self.scan()
        children = self.children_map(infos)
        seen = {root_pid}
        out: list[int] = []
        queue = deque([root_pid])
        while queue:
            for child in children.get(queue.popleft(), ()):
                if child not in seen:
                    seen.add(child)
                    out.append(child)
                    queue.append(child)
        return out


def _effective_parents(
    infos: Mapping[int, ProcInfo],
) -> tuple[dict[int, int | None], dict[int, int]]:
    """(parent, depth) of every pid, with each ppid cycle (corrupt input) cut above its
    lowest pid, so that pid becomes the top of its tree."""
    parent: dict[int, int | None] = {
        pid: info.ppid if info.ppid in infos else None for pid, info in infos.items()
    }
    state: dict[int, int] = {}  # 1 = on the current walk, 2 = done
    for start in sorted(infos):
        walk: list[int] = []
        node: int | None = start
        while node is not None and node not in state:
            state[node] = 1
            walk.append(node)
            node = parent[node]
        if node is not None and state[node] == 1:  # the walk closed a cycle at `node`
            cycle = walk[walk.index(node) :]
            parent[min(cycle)] = None
        for done in walk:
            state[done] = 2
    depth: dict[int, int] = {}
    for start in sorted(infos):
        chain: list[int] = []
        node = start
        while node is not None and node not in depth:
            chain.append(node)
            node = parent[node]
        base = -1 if node is None else depth[node]
        for offset, pid in enumerate(reversed(chain), start=1):
            depth[pid] = base + offset
    return parent, depth


def plan_adoption(
    infos: Mapping[int, ProcInfo],
    is_root: Callable[[ProcInfo], str | None],
    exclude: Collection[int] = (),
) -> list[Adoption]:
    """Which running processes to track: agent roots and their descendants.

    A process for which is_root returns an agent name becomes a root unless an ancestor
    already owns it (then it joins that ancestor's session). Kernel threads, pid 1 and pids
    in `exclude` are never roots nor adopted, and ownership does not pass through them.
    Ordered by (depth in the process tree, pid), so parents come before children.
    """
    excluded = set(exclude)
    parent, depth = _effective_parents(infos)
    owner: dict[int, tuple[int, str]] = {}
    plan: list[Adoption] = []
    for pid in sorted(infos, key=lambda p: (depth[p], p)):
        info = infos[pid]
        if pid == 1 or pid in excluded or info.kernel_thread:
            continue
        up = parent[pid]
        session = owner.get(up) if up is not None else None
        if session is None:
            agent = is_root(info)
            if agent is None:
                continue
            session = (pid, agent)
        owner[pid] = session
        plan.append(
            Adoption(
                pid=pid,
                ppid=info.ppid,
                root_pid=session[0],
                agent=session[1],
                start_ticks=info.start_ticks,
            )
        )
    return plan
