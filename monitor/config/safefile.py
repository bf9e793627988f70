"""Reading a config or policy file so that what was checked is what is read.

An agent that can change the policy can allow itself anything, so as root the monitor
reads these files only through a trusted path: every component from ``/`` down to the
file, on the path as given and on the target of every symlink met on the way, must be
owned by root (uid 0), and every directory must be writable by nobody else, except a
sticky directory (like /tmp, mode 1777): there, only an entry's owner can remove or rename
it, and the entry is required to be root's like every component. A symlink must be
root's too (in a sticky directory its owner could point it elsewhere). The file itself
must be a regular file owned by root, writable by nobody else.

The walk opens each directory relative to the one before (``openat`` with O_NOFOLLOW), and
the file is opened the same way (O_NOFOLLOW, O_NONBLOCK, O_NOCTTY), checked with fstat on
the open descriptor and read from that descriptor, at most ``MAX_FILE_BYTES``: no other
file can be swapped in between check and read. FIFOs, devices, sockets and directories
are refused before they are opened, so none can block or have side effects; oversize
files are refused before they are read.

Untrusted reading (not root: ``policy check`` by a user) follows symlinks, but refuses
the same kinds of file and sizes, and reads from the descriptor it checked.

This module must never read a file it has not checked on the open descriptor, never
block on a FIFO or device, never read more than the cap, and never raise anything but
ConfigError (with the path as given) for a file it cannot use.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monitor.model.errors import ConfigError, Location

MAX_FILE_BYTES = 1 << 20  # config and policy files (docs/config.md)
MAX_SYMLINKS = 40  # like the kernel's ELOOP limit
ROOT = frozenset({0})
_WRITABLE = stat.S_IWGRP | stat.S_IWOTH
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"))


class _Refused(Exception):
    """Why the file cannot be used (turned into a ConfigError with the path as given)."""


def read_file(path: str | Path, *, what: str = "file", trusted: bool = False,
              max_bytes: int = MAX_FILE_BYTES, owners: frozenset[int] = ROOT) -> bytes:
    """The bytes of a regular file of at most max_bytes, read from the descriptor that
    was checked. With trusted, every component of the path must be owned by one of owners
    (root; tests add their own uid) and be writable by nobody else, as the module says.

    Raises ConfigError naming the file and the component that failed, with what to do.
    """
    source = str(path)
    try:
        if trusted:
            return _read_trusted(source, what, max_bytes, owners)
        return _read_plain(source, what, max_bytes)
    except _Refused as exc:
        raise ConfigError([(Location(source), str(exc))]) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and exc.filename != source else ""
        raise ConfigError([(Location(source), f"cannot read {what}: {reason}{where}")]
                          ) from None



def utf8_text(data: bytes, source: str) -> str:
    """The file's bytes as text; ConfigError (at the file) if they are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(Location(source), f"not UTF-8 text: {exc.reason} "
                            f"at byte {exc.start}")]) from exc


def _kind(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _check_file(st: os.stat_result, shown: str, what: str, max_bytes: int) -> None:
    kind = _kind(st.st_mode)
    if kind is not None:
        raise _Refused(f"the {what} {shown} is {kind}, not a regular file")
    if st.st_size > max_bytes:
        raise _Refused(f"the {what} {shown} is larger than {max_bytes >> 20} MiB "
                       f"({st.st_size} bytes)")


def _read_fd(fd: int, shown: str, what: str, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(max_bytes + 1 - total, 1 << 16))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:  # it grew after fstat, or its size was not told
            raise _Refused(f"the {what} {shown} is larger than {max_bytes >> 20} MiB")


def _read_plain(source: str, what: str, max_bytes: int) -> bytes:
    _check_file(os.stat(source), source, what, max_bytes)  # no open of a FIFO or device
    fd = os.open(source, _OPEN_FILE & ~os.O_NOFOLLOW)
    try:
        _check_file(os.fstat(fd), source, what, max_bytes)  # what was opened
        return _read_fd(fd, source, what, max_bytes)
    finally:
        os.close(fd)


def _fix(path: str) -> str:
    return f"`chown root:root {path} && chmod go-w {path}`"


def _check_owner(st: os.stat_result, shown: str, kind: str, owners: frozenset[int],
                 sticky_ok: bool = False) -> None:
    sticky = sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_uid not in owners or (st.st_mode & _WRITABLE and not sticky):
        raise _Refused(f"the {kind} {shown} must be owned by root and writable by nobody "
                       f"else (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}): "
                       f"{_fix(shown)}, or keep the file in a directory only root can "
                       "write, such as /etc/agentwatch")


@contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _read_trusted(source: str, what: str, max_bytes: int, owners: frozenset[int]) -> bytes:
    """Walk from / to the file, each step relative to the checked directory before it."""
    start = source if source.startswith("/") else os.path.join(os.getcwd(), source)
    todo = [c for c in start.split("/") if c]
    todo.reverse()  # a stack: the next component last
    dirs: list[tuple[int, str]] = []  # open, checked directories from / down
    links = 0
    root_fd = os.open("/", _OPEN_DIR)
    dirs.append((root_fd, "/"))
    try:
        _check_owner(os.fstat(root_fd), "/", "directory", owners, sticky_ok=True)
        if not todo:
            raise _Refused(f"the {what} {source} is a directory, not a regular file")
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop()[0])
                continue
            parent_fd, parent = dirs[-1]
            shown = os.path.join(parent, name)
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError as exc:
                on_the_way = f" (on the way to {source})" if shown != source else ""
                raise _Refused(f"cannot read {what}: {exc.strerror}: {shown}{on_the_way}"
                               ) from None
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid not in owners:  # a link's mode means nothing; its owner does
                    raise _Refused(f"the symlink {shown} must be owned by root (owner uid "
                                   f"{st.st_uid}): whoever owns it can point it elsewhere")
                links += 1
                if links > MAX_SYMLINKS:
                    raise _Refused(f"more than {MAX_SYMLINKS} symlinks on the way to the "
                                   f"{what} {source}")
                target = os.readlink(name, dir_fd=parent_fd)
                if target.startswith("/"):
                    while len(dirs) > 1:
                        os.close(dirs.pop()[0])
                todo.extend(reversed([c for c in target.split("/") if c]))
                if not todo:  # a link to "/"
                    raise _Refused(f"the {what} {source} is a directory, not a regular file")
                continue
            if todo:  # a directory on the way
                if not stat.S_ISDIR(st.st_mode):
                    raise _Refused(f"{shown} (on the way to the {what} {source}) is not a "
                                   "directory")
                fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
                dirs.append((fd, shown))
                _check_owner(os.fstat(fd), shown, "directory", owners, sticky_ok=True)
                continue
            _check_file(st, shown, what, max_bytes)  # before opening: no FIFO, no device
            with _opened(os.open(name, _OPEN_FILE, dir_fd=parent_fd)) as fd:
                opened = os.fstat(fd)
                _check_file(opened, shown, what, max_bytes)
                _check_owner(opened, shown, what, owners)
                return _read_fd(fd, shown, what, max_bytes)
        raise _Refused(f"the {what} {source} is a directory, not a regular file")
    finally:
        for fd, _ in dirs:
            os.close(fd)
