"""Fingerprint what an agent exec'd: the sha256 of the file the process runs, its name as
the kernel gives it, and whether it has a name on disk at all.

A program is what its file is: a byte-identical copy of /usr/bin/ssh named `notssh` is ssh
(monitor/policy/identity.py says what rules make of the hash). For an agent's exec only
(the daemon never calls this for an untracked process) the file is opened through
/proc/PID/exe, the magic link that opens the very file the process runs: a copy, a memfd, a
deleted or O_TMPFILE file alike. For a program run through the dynamic loader (ev.loader
set, filename the program's absolute path) the program's file is opened instead, as
/proc/PID/root + filename, so a process in another mount namespace is read right; its
symlinks are followed as that process would, and /proc/self (/dev/fd/N) is its entry, not
the monitor's (as_seen_by).

Bounds (the agent chooses the file): opened O_RDONLY|O_NONBLOCK|O_CLOEXEC, fstat'd, and
read only when it is a regular file of at most HASH_MAX_BYTES, in HASH_CHUNK reads. Results
are cached by file identity (device, inode, size, mtime, ctime: a rewrite changes the key)
in an LRU of CACHE_ENTRIES, so a hot binary (cc1, as, ld in a parallel build) is hashed
once. Hashing also has a budget (HASH_BUDGET_BYTES, refilled at HASH_RATE_BYTES per second)
so that an agent exec'ing fresh large files in a loop cannot keep the event loop hashing: a
file over the budget is not read, except when its size is that of a fingerprinted host
binary (then it may be a copy of one, and rules need to know). A file not fingerprinted has
sha256 None and a reason, logged (at most once per reason per NOT_READ_LOG_SECONDS): `name:`
and `ssh:` then match by name only (a file whose size is no host binary's cannot be a copy
of one, so nothing is lost there) and a `sha256:` rule does not match it (docs/policy.md).

Never signals a process, never decides policy; reads nothing of an untracked process.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from monitor.model import cmdline
from monitor.model.events import ExecEvent
from monitor.policy.identity import NO_HOST_BINARIES, HostBinaries
from monitor.sessions.throttle import Throttle

MIB = 1 << 20
HASH_MAX_BYTES = 512 * MIB  # a larger executable is not hashed (reason TOO_LARGE)
HASH_CHUNK = MIB
CACHE_ENTRIES = 4096
HASH_BUDGET_BYTES = 512 * MIB  # bytes that may be hashed back to back...
HASH_RATE_BYTES = 64 * MIB  # ...and how fast that budget comes back, per second
NOT_READ_LOG_SECONDS = 10.0
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
PROC_ROOT_INO = 1  # include/linux/proc_ns.h: the inode of every procfs's root directory
MAX_LINKS = 40  # symlinks followed in a loader-run program's path (the kernel's own limit)

# why an executable has no fingerprint
GONE = "gone"  # the process exited (or exec'd again) before its file could be opened
NOT_REGULAR = "not_regular"  # a FIFO, device, directory...: never read
TOO_LARGE = "too_large"  # over HASH_MAX_BYTES
BUSY = "busy"  # over the hashing budget just now
CHANGED = "changed"  # the file's size changed while it was read
UNREADABLE = "unreadable"  # an I/O error


FileKey = tuple[int, int, int, int, int]


class Print(NamedTuple):
    """A file's fingerprint: sha256 (None when not read) and why not."""

    sha256: str | None
    reason: str | None = None


def file_key(st: os.stat_result) -> FileKey:
    """What identifies a file's content without reading it: a rewrite changes ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_of(fd: int, size: int) -> Print:
    """The sha256 of an open regular file of `size` bytes, read in HASH_CHUNK reads from
    offset 0; CHANGED when it turns out longer or shorter than that."""
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(HASH_CHUNK, size - offset), offset)
        if not chunk:
            return Print(None, CHANGED)
        h.update(chunk)
        offset += len(chunk)
    if os.pread(fd, 1, offset):
        return Print(None, CHANGED)
    return Print(h.hexdigest())


def exe_name(link: str) -> tuple[str, bool]:
    """The executable's name from readlink(/proc/PID/exe), and whether it says the file
    has no name on disk: "/memfd:NAME (deleted)" -> "memfd:NAME"; a deleted (or O_TMPFILE)
    file keeps its " (deleted)"."""
    deleted = link.endswith(cmdline.DELETED_SUFFIX)
    if link.startswith(cmdline.MEMFD_PATH) and deleted:
        return link[1:].removesuffix(cmdline.DELETED_SUFFIX), True
    return link, deleted


def _is_procfs(path: str) -> bool:
    """Whether path is the root of a procfs (inode PROC_ROOT_INO), not a look-alike an
    agent mounted at its /proc."""
    try:
        return os.stat(path).st_ino == PROC_ROOT_INO
    except OSError:
        return False


class Identity:
    """Fingerprints executables, with the cache and the budget; `host` is the fingerprints
    of the host binaries the policy in force names (set by service/reload.py)."""

    def __init__(self, proc_root: str = "/proc", *, log: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic,
                 cache_entries: int = CACHE_ENTRIES, max_bytes: int = HASH_MAX_BYTES,
                 budget_bytes: int = HASH_BUDGET_BYTES,
                 rate_bytes: int = HASH_RATE_BYTES) -> None:
        self.proc_root = proc_root.rstrip("/")
        self.log = log
        self.clock = clock
        self.cache_entries = cache_entries
        self.max_bytes = max_bytes
        self.budget_bytes = budget_bytes
        self.rate_bytes = rate_bytes
        self.host: HostBinaries = NO_HOST_BINARIES
        self.cache: OrderedDict[FileKey, Print] = OrderedDict()
        self.hashed = 0  # files read (cache misses that were hashed)
        self._tokens = float(budget_bytes)
        self._refilled = clock()
        self.said = Throttle(NOT_READ_LOG_SECONDS)  # "not fingerprinted", per reason

    def identify(self, ev: ExecEvent) -> ExecEvent:
        """ev with sha256, fileless and, for a file with no usable path (fexecve's /dev/fd/N,
        a memfd, a deleted file), the kernel's name for it."""
        loader = ev.loader
        program = bool(loader) and ev.filename.startswith("/")
        exe = f"{self.proc_root}/{ev.h.pid}/exe"
        inside = self.as_seen_by(ev.h.pid, ev.filename) if program else exe
        opened = self._open(inside, ev.h.pid, ev.filename) if inside is not None else None
        if opened is None:
            return ev  # gone (or exec'd again): nothing left to judge
        found, st = opened
        fileless = st.st_nlink == 0
        filename, real = ev.filename, None
        if not program:
            try:  # the kernel's name for it: the path it had (symlinks resolved), or memfd:NAME
                real, _ = exe_name(cmdline.decode(os.readlink(os.fsencode(exe))))
            except OSError:
                pass
            if real is not None and (fileless or filename.startswith("/dev/fd/")):
                filename = real
        return replace(ev, sha256=found.sha256, fileless=fileless, filename=filename,
                       real_exe=real if real != filename else None)

    def as_seen_by(self, pid: int, path: str) -> str | None:
        """A path this process can open for the file `path` names to process pid: under
        /proc/PID/root, symlinks followed as pid would (an absolute target from pid's root,
        ".." never above it), and /proc/self, /proc/thread-self (or a link to them, such as
        /dev/fd/N) meaning pid's own /proc entry, not this process's. None past MAX_LINKS."""
        root = f"{self.proc_root}/{pid}/root"
        todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        done: list[str] = []
        links = 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            done.append(part)
            if (len(done) == 2 and done[0] == "proc" and part in ("self", "thread-self")
                    and _is_procfs(root + "/proc")):
                return "/".join([f"{self.proc_root}/{pid}", *reversed(todo)])
            try:
                target = os.readlink(os.fsencode(root + "/" + "/".join(done)))
            except OSError:
                continue  # not a link (or not there: the open will say)
            links += 1
            if links > MAX_LINKS:
                return None
            done.pop()
            if target.startswith(b"/"):
                done.clear()
            todo.extend(reversed(os.fsdecode(target).split("/")))
        return root + "/" + "/".join(done)

    def running(self, pid: int) -> str | None:
        """The sha256 of what an agent's process runs now (one found running rather than
        seen exec'ing: adopted, recovered, reconciled); None when not read."""
        opened = self._open(f"{self.proc_root}/{pid}/exe", pid, "")
        return opened[0].sha256 if opened is not None else None

    def _open(self, path: str, pid: int, exe: str) -> tuple[Print, os.stat_result] | None:
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            found = self.fingerprint(fd, st)
        finally:
            os.close(fd)
        if found.sha256 is None and found.reason is not None:
            self._not_read(found.reason, pid, exe, st.st_size)
        return found, st

    def fingerprint(self, fd: int, st: os.stat_result, *, must: bool = False) -> Print:
        """The fingerprint of an open file (cached by its identity). `must`: read it even
        over the budget (a host binary at policy load)."""
        if not stat.S_ISREG(st.st_mode):
            return Print(None, NOT_REGULAR)
        if st.st_size > self.max_bytes:
            return Print(None, TOO_LARGE)
        key = file_key(st)
        found = self.cache.get(key)
        if found is not None:
            self.cache.move_to_end(key)
            return found
        if not (must or st.st_size in self.host.sizes or self._afford(st.st_size)):
            return Print(None, BUSY)  # not cached: the next exec may find budget
        try:
            found = sha256_of(fd, st.st_size)
        except OSError:
            return Print(None, UNREADABLE)
        self.hashed += 1
        if found.sha256 is not None:
            self.cache[key] = found
            while len(self.cache) > self.cache_entries:
                self.cache.popitem(last=False)
        return found

    def _afford(self, size: int) -> bool:
        now = self.clock()
        self._tokens = min(float(self.budget_bytes),
                           self._tokens + (now - self._refilled) * self.rate_bytes)
        self._refilled = now
        if self._tokens <= 0:
            return False
        self._tokens -= size  # may go below zero: one file over what is left, then a wait
        return True

    def _not_read(self, reason: str, pid: int, exe: str, size: int) -> None:
        unsaid = self.said.say(reason, self.clock())
        if unsaid is None:
            return
        self.log("executable not fingerprinted", level="warning", reason=reason,
                 pid=pid, exe=exe or None, size=size, unsaid=unsaid)
