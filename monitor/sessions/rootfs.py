"""Read files an agent controls as one of its processes sees them, within bounds.

An exec's ssh config is read where that process would read it: paths resolved inside its
root (/proc/PID/root) with openat2(RESOLVE_IN_ROOT), so a process in another mount
namespace or chroot, and its absolute symlinks, are read right, and no magic link
(/dev/stdin -> /proc/self/fd/0) leads out of it. Every file is first opened O_PATH (no
side effect, no blocking), checked with fstat to be a regular file within the size cap,
and only then opened for reading (O_RDONLY|O_NONBLOCK|O_NOCTTY|O_CLOEXEC) through that
descriptor and checked again; reads stop at the cap. Directory listings (for Include
globs) are bounded too. A FIFO, device, socket, directory, an oversized or unreadable file
raises Unreadable; a path that does not exist is just missing.

This module must never block on what it opens, never read past its caps, never follow a
magic link, and never write or change anything. It knows nothing of ssh.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import stat
from collections.abc import Callable

from monitor.model import cmdline
from monitor.policy.sshconfig import Unreadable

MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 1024 * 1024
MAX_DIR_ENTRIES = 4096
MAX_SCANNED = 16384  # directory entries listed for globs, in all
MAX_GLOB_MATCHES = 256

_SYS_OPENAT2 = 437  # the same number on every architecture (Linux 5.6)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
NULL_DEVICE = os.makedev(1, 3)  # /dev/null: the only device read (as empty), never opened
_OPEN_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR})
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


class RootFS:
    """Files under one root directory (a process's /proc/PID/root, or "/" in tests), with
    relative paths taken from cwd (a path inside that root). Close it when done."""

    def __init__(self, root: str, cwd: str, *, tilde: Callable[[str], str] = lambda p: p,
                 max_file: int = MAX_FILE_BYTES, max_total: int = MAX_TOTAL_BYTES) -> None:
        self.cwd, self.tilde = cwd, tilde
        self.max_file, self.left = max_file, max_total
        self.scanned = 0
        self._root = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._openat2 = True

    def close(self) -> None:
        os.close(self._root)

    def __enter__(self) -> RootFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def absolute(self, path: str) -> str:
        return path if path.startswith("/") else os.path.join(self.cwd, path)

    def _open(self, path: str, flags: int) -> int:
        """A descriptor for path resolved inside the root (OSError as open(2) gives)."""
        path = self.absolute(path)
        if "\0" in path:
            raise OSError(errno.ENOENT, "a NUL in the path", path)
        if self._openat2:
            how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
            fd = int(_libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(self._root),
                                   ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                                   ctypes.c_long(ctypes.sizeof(how))))
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                raise OSError(err, os.strerror(err), path)
            self._openat2 = False  # a kernel before 5.6: the root's own symlinks only
        return os.open(path.lstrip("/") or ".", flags | os.O_CLOEXEC, dir_fd=self._root)

    def read(self, path: str, cap: int | None = None) -> str | None:
        """The text of a regular file (UTF-8, surrogateescape); None if it does not exist.
        cap: read at most this much instead (outside the total: /etc/passwd)."""
        try:
            handle = self._open(path, os.O_PATH)
        except OSError as exc:
            if exc.errno in _MISSING:
                return None
            raise Unreadable(f"{path}: {exc.strerror}") from None
        try:
            if cap is None:
                data = self._read_checked(path, handle, min(self.max_file, self.left))
                self.left -= len(data)
            else:
                data = self._read_checked(path, handle, cap)
            return cmdline.decode(data)
        finally:
            os.close(handle)

    @staticmethod
    def _read_checked(path: str, handle: int, cap: int) -> bytes:
        st = os.fstat(handle)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == NULL_DEVICE:
            return b""  # /dev/null (`ssh -F /dev/null`: no config at all) reads as empty
        kind = next((what for test, what in _KINDS if test(st.st_mode)), None)
        if kind is not None or not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{path}: {kind or 'not a regular file'}")
        if st.st_size > cap:
            raise Unreadable(f"{path}: larger than the {cap} bytes the monitor reads")
        try:
            fd = os.open(f"/proc/self/fd/{handle}", _OPEN_READ)
        except OSError as exc:
            raise Unreadable(f"{path}: {exc.strerror}") from None
        try:
            again = os.fstat(fd)
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                raise Unreadable(f"{path}: changed while it was opened")
            chunks, size = [], 0
            while size <= cap:
                chunk = os.read(fd, min(cap + 1 - size, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            raise Unreadable(f"{path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if size > cap:
            raise Unreadable(f"{path}: grew past the {cap} bytes the monitor reads")
        return b"".join(chunks)

    def exists(self, path: str) -> bool:
        try:
            os.close(self._open(path, os.O_PATH))
        except OSError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        """Names in a directory (none when it is not one); Unreadable past MAX_DIR_ENTRIES."""
        try:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
        except OSError:
            return []
        names: list[str] = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    names.append(entry.name)
                    self.scanned += 1
                    if len(names) > MAX_DIR_ENTRIES:
                        raise Unreadable(f"{path}: more than {MAX_DIR_ENTRIES} entries")
                    if self.scanned > MAX_SCANNED:
                        raise Unreadable(f"Include globs list more than {MAX_SCANNED} "
                                         "directory entries")
        except OSError as exc:
            raise Unreadable(f"{path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return names

    def glob(self, pattern: str) -> list[str]:
        """glob(3) with GLOB_TILDE as glibc does it for ssh's Include: `*`, `?`, `[...]`,
        backslash escapes, a leading '.' matched only explicitly, sorted (byte order)."""
        pattern = self.absolute(self.tilde(pattern))
        paths = ["/"]
        for part in [p for p in pattern.split("/") if p]:
            if not _MAGIC.search(part):
                paths = [os.path.join(p, re.sub(r"\\(.)", r"\1", part)) for p in paths]
                continue
            regex = _component(part)
            found = []
            for base in paths:
                found += [os.path.join(base, name) for name in self.listdir(base)
                          if regex.fullmatch(name)
                          and (not name.startswith(".") or part.startswith("."))]
                if len(found) > MAX_GLOB_MATCHES:
                    raise Unreadable(f"Include {pattern}: more than {MAX_GLOB_MATCHES} files")
            paths = found
        return sorted((p for p in paths if self.exists(p)), key=os.fsencode)


_MAGIC = re.compile(r"(?<!\\)[*?\[]")


@functools.lru_cache(maxsize=256)
def _component(part: str) -> re.Pattern[str]:
    """One path component of a glob as a regex (fnmatch(3) with FNM_PERIOD's classes)."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "\\" and i + 1 < len(part):
            out.append(re.escape(part[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            negate = j < len(part) and part[j] in "!^"
            j += negate
            j += j < len(part) and part[j] == "]"
            close = part.find("]", j)
            if close < 0:
                out.append(re.escape(c))
            else:
                body = re.sub(r"([\\^\[])", r"\\\1", part[i + 1 + negate:close])
                out.append(f"[{'^' if negate else ''}{body}]")
                i = close
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)
