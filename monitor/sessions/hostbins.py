"""Fingerprint the host binaries a policy names, when it comes into force (start, reload).

A rule that names a program (`name: [ngrok]`, the `ssh:` matcher) also matches a
byte-identical copy of that program under any name (monitor/policy/identity.py). For that
the monitor must know what the host's own copy is: each named program is looked up on the
standard paths (STANDARD_DIRS, symlinks resolved) and, for a name not found there, in the
dpkg database (lines of /var/lib/dpkg/info/*.list ending in /NAME inside a bin/ or sbin/
directory), and
every file found is hashed through sessions/identity.py's cache.

Bounded: at most MAX_FILES files are fingerprinted, dpkg lists are read up to
MAX_DPKG_BYTES in all, every file is opened O_NONBLOCK and read only when regular and
within identity.HASH_MAX_BYTES (never a FIFO or device). The files read are root's (the
package manager's); an agent cannot write them. Never judges an exec, never signals.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator

from monitor.policy.identity import HostBinaries
from monitor.sessions.identity import OPEN_FLAGS, Identity, file_key

STANDARD_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
DPKG_INFO = "/var/lib/dpkg/info"
MAX_FILES = 256  # files fingerprinted per policy load
MAX_DPKG_FILES = 20000  # *.list files looked at
MAX_DPKG_BYTES = 64 << 20  # bytes of *.list read in all


def standard_paths(names: Iterable[str], dirs: Iterable[str] = STANDARD_DIRS) -> Iterator[
        tuple[str, str]]:
    """(name, path) for each name that exists in one of dirs."""
    for name in sorted(names):
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.lexists(path):
                yield name, path


def dpkg_paths(names: Iterable[str], info_dir: str = DPKG_INFO) -> Iterator[tuple[str, str]]:
    """(name, path) for each file a package installs as NAME in a bin/ or sbin/ directory."""
    wanted = {os.fsencode(n) for n in names}
    if not wanted:
        return
    try:
        lists = sorted(e for e in os.listdir(info_dir) if e.endswith(".list"))
    except OSError:
        return
    budget = MAX_DPKG_BYTES
    for entry in lists[:MAX_DPKG_FILES]:
        data = _read_regular(os.path.join(info_dir, entry), budget)
        if data is None:
            continue
        budget -= len(data)
        for line in data.splitlines():
            parent, _, base = line.rpartition(b"/")
            if base in wanted and parent.rsplit(b"/", 1)[-1] in (b"bin", b"sbin"):
                yield os.fsdecode(base), os.fsdecode(line)
        if budget <= 0:
            return


def _read_regular(path: str, limit: int) -> bytes | None:
    """At most limit bytes of a regular file (None for anything else or an error)."""
    try:
        fd = os.open(path, OPEN_FLAGS | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, max(limit, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def files_state(paths: Iterable[str]) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    """(path, the identity of the file it leads to, or None) for each path: stat only."""
    state = []
    for path in paths:
        try:
            key: tuple[int, ...] | None = file_key(os.stat(path))
        except OSError:
            key = None
        state.append((path, key))
    return tuple(state)


def changed(host: HostBinaries, names: Iterable[str],
            dirs: Iterable[str] = STANDARD_DIRS) -> bool:
    """Whether the host binaries looked at are not what they were when fingerprinted (a
    package upgraded, installed or removed on the standard paths): a few stats, no read."""
    dirs = tuple(dirs)
    standard = [path for _, path in standard_paths(names, dirs)]
    from_dpkg = [path for path, _ in host.files if os.path.dirname(path) not in dirs]
    return files_state([*standard, *from_dpkg]) != host.files


def fingerprint_host(names: Iterable[str], identity: Identity, *,
                     dirs: Iterable[str] = STANDARD_DIRS, dpkg_info: str = DPKG_INFO,
                     log: Callable[..., None] | None = None) -> HostBinaries:
    """The fingerprints of the host binaries named `names` (see the module's docstring)."""
    names = frozenset(names)
    found: list[tuple[str, str, str, int]] = []
    seen: set[tuple[str, str]] = set()
    candidates = list(standard_paths(names, dirs))
    # the package database, for programs installed off the standard paths (/opt/X/bin/NAME)
    candidates += dpkg_paths(names - {name for name, _ in candidates}, dpkg_info)
    files = files_state(path for _, path in candidates)
    for name, path in candidates:
        real = os.path.realpath(path)
        if (name, real) in seen or len(seen) >= MAX_FILES:
            continue
        seen.add((name, real))
        try:
            fd = os.open(real, OPEN_FLAGS)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            sha256 = identity.fingerprint(fd, st, must=True).sha256
        finally:
            os.close(fd)
        if sha256 is not None:
            found.append((name, path, sha256, st.st_size))
    host = HostBinaries.of(found, files)
    if log is not None:
        log("host binaries fingerprinted", **summary(host, names))
    return host


def summary(host: HostBinaries, names: Iterable[str]) -> dict[str, object]:
    """What a log line says of the host binaries fingerprinted for these names."""
    return {"names": sorted(host.names()), "missing": sorted(set(names) - host.names()),
            "files": sum(len(by_name) for by_name in host.prints.values())}
