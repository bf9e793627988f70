"""An agent's exec of the dynamic loader, made into an exec of the program the loader runs.

`/lib64/ld-linux-x86-64.so.2 ./xmrig` runs xmrig in a process whose executable and comm
are the loader's. For an agent's exec (the caller passes tracked execs only) this decides
whether the executable is a program interpreter and, if so, rewrites the ExecEvent so the
judge sees the program: `filename` the program's absolute path, `argv` the argv the program
sees (after `--argv0` and the loader's other options: monitor/model/ldso.py reads them as
the loader does), `loader` the interpreter's real path, nested loaders unwrapped (at most
MAX_DEPTH).

Which executables are interpreters: decided by content, not by name. /proc/PID/exe (the
file the process runs, whatever it is called, even deleted) is opened O_NONBLOCK, checked
S_ISREG, and its ELF header, program headers and dynamic string table read within fixed
bounds (model/ldso.interpreter_kind: ET_DYN, no PT_INTERP, and the loader's own symbols),
so a renamed or hard-linked copy of ld.so is one and a program named ld.so is not. The
answer is cached by file identity (st_dev, st_ino, size, mtime, ctime: a changed file is
read again), so a hot binary costs one stat. Only when /proc/PID/exe cannot be read (the
process is gone) does the name decide (model/ldso.is_interpreter_name).

Conservative verdicts: when the loader would not simply run one program (a listing mode,
an option the parser does not know, an interpreter of unknown kind, more nested loaders
than MAX_DEPTH), every argument that could be the program is judged
(`loader_others`); so is the loader's own exec, always, so a rule naming the loader or its
command line still holds, and the program's file under its own name when the program was
named through a symlink. An exec named like an interpreter whose /proc/PID/exe is another
file by the time it is read (the process exec'd again) is judged by the file at the
exec's path, or as an interpreter of unknown kind. A program named without `/` is looked
up as the loader looks it up: glibc only in the system library directories (root's: an
agent cannot put a file there; its /etc/ld.so.cache lists only those), musl relative to
the working directory (/proc/PID/cwd).

It never signals a process, never decides policy, and never reads an agent's file without
O_NONBLOCK and an S_ISREG check, nor more than model/ldso's bounds of it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from monitor.model import cmdline, ldso
from monitor.model.events import ExecEvent, Header
from monitor.sessions.tracker import Process

MAX_DEPTH = 4  # loaders running loaders, unwrapped
CACHE_SIZE = 4096  # file identities remembered
SYSTEM_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
               "/lib", "/usr/lib")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

FileKey = tuple[int, int, int, int, int]
Program = tuple[str, tuple[str, ...]]  # (path, argv as it sees it)


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _join(cwd: str, path: str) -> str:
    """path made absolute against cwd, `.` and empty components dropped (`..` is kept: with
    symlinks it is not the parent the text shows)."""
    if not path.startswith("/"):
        path = f"{cwd}/{path}"
    return "/" + "/".join(c for c in path.split("/") if c not in ("", "."))


class Loaders:
    """Unwraps agents' loader runs; /proc root and the system directories are injected."""

    def __init__(self, proc_root: str | Path = "/proc",
                 system_dirs: Sequence[str] = SYSTEM_DIRS) -> None:
        self.proc = str(proc_root)
        self.system_dirs = tuple(system_dirs)
        self._kinds: dict[FileKey, str | None] = {}

    # --- the step ---------------------------------------------------------------------------

    def unwrap(self, ev: ExecEvent) -> ExecEvent:
        """ev itself when its executable is no interpreter; else ev as an exec of the program
        the interpreter runs (see the module docstring)."""
        pid = ev.h.pid
        exe = f"{self.proc}/{pid}/exe"
        try:
            kind = self.read_kind(exe)
        except (FileNotFoundError, ProcessLookupError):
            kind = None  # gone (or exec'd again): _by_name below
        except (OSError, ValueError, OverflowError):
            # there but unreadable even to root (a FUSE mount of the agent's own namespace
            # refuses everyone else): what it runs cannot be told, so it may be a loader
            kind = ldso.UNKNOWN
        cwd = self._readlink(f"{self.proc}/{pid}/cwd")
        loader = ev.filename
        if kind is not None:
            loader = self._readlink(exe) or loader
        elif ldso.is_interpreter_name(os.path.basename(ev.filename)):
            kind = self._by_name(ev.filename, exe, cwd)
        if kind is None:
            return ev
        programs = [(self._named(path, pid), argv)
                    for path, argv in self._programs(ev.argv, kind, cwd, pid)]
        if not programs:
            return ev  # the loader runs nothing (`--help`, no program named): judged as itself
        (filename, argv), others = programs[-1], programs[:-1]
        real = os.path.realpath(self._local(filename, pid))
        if os.path.basename(real) != os.path.basename(filename):
            others.append((real, argv))  # a symlink: its file's own name is judged too
        return replace(ev, filename=filename, argv=argv, loader=loader,
                       loader_others=(*others, (loader, ev.argv)))

    def running(self, proc: Process) -> ExecEvent | None:
        """A process found running (adopted, recovered, reconciled) that runs a program
        through a loader: its exec as unwrap makes it; None for any other process."""
        h = Header(0, proc.pid, proc.pid, proc.session, 0, proc.uid, proc.comm)
        ev = self.unwrap(ExecEvent(h, proc.pid, proc.ppid, 0, 0, proc.exe, proc.argv))
        return ev if ev.loader is not None else None

    def _by_name(self, filename: str, exe: str, cwd: str | None) -> str | None:
        """The kind of an exec named like an interpreter whose /proc/PID/exe is none: UNKNOWN
        when the process is gone (its name is all there is); when it has exec'd again since
        (/proc/PID/exe is another file than the one at the exec's path), the kind of the file
        at that path (UNKNOWN if none); None for a program merely named so."""
        try:
            now = os.stat(exe)
            then = os.stat(_join(cwd or "", filename))
        except (OSError, ValueError):
            return ldso.UNKNOWN
        if (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino):
            return None
        return self.kind_of(_join(cwd or "", filename)) or ldso.UNKNOWN

    def _programs(self, argv: Sequence[str], kind: str, cwd: str | None,
                  pid: int) -> list[Program]:
        """What a loader of this kind may run with argv: the program last, after any loaders
        it runs in turn; or, when the reading is uncertain, every possible program (the
        loader's own reading first)."""
        found: list[Program] = []
        for _ in range(MAX_DEPTH):
            args = ldso.parse(argv, kind)
            if args.program is None or not args.runs or kind == ldso.UNKNOWN:
                break
            path = self._resolve(args.program, kind, cwd)
            inner = self.kind_of(self._local(path, pid))
            found.append((path, args.argv))
            if inner is None:
                return found
            argv, kind = args.argv, inner  # a loader running a loader: judge both
        else:
            args = ldso.parse(argv, ldso.UNKNOWN)  # nested deeper than MAX_DEPTH
        # uncertain: a bare name may be the working directory's (musl's lookup) too
        guesses = [(self._resolve(p, ldso.UNKNOWN, cwd), a)
                   for p, a in ldso.possible_programs(argv)]
        if args.program is not None:
            guesses.insert(0, (self._resolve(args.program, kind, cwd), args.argv))
        return [*found, *guesses[1:], *guesses[:1]]

    # --- files ------------------------------------------------------------------------------

    def kind_of(self, path: str) -> str | None:
        """ldso.GLIBC, MUSL or UNKNOWN when the regular file at path is a program
        interpreter; None when it is not, or cannot be read (see the module docstring)."""
        try:
            return self.read_kind(path)
        except (OSError, ValueError, OverflowError):
            return None

    def read_kind(self, path: str) -> str | None:
        """kind_of, raising OSError when path cannot be read."""
        key = _key(os.stat(path))
        if key in self._kinds:
            return self._kinds[key]
        fd = os.open(path, _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            kind = ldso.interpreter_kind(lambda offset, size: os.pread(fd, size, offset))
        finally:
            os.close(fd)
        if len(self._kinds) >= CACHE_SIZE:
            self._kinds.clear()
        self._kinds[_key(st)] = kind
        return kind

    def _resolve(self, name: str, kind: str, cwd: str | None) -> str:
        """The path the loader opens for a program so named (name itself when it cannot
        tell)."""
        if "/" in name or kind == ldso.MUSL:
            return _join(cwd or "", name) if cwd is not None or name.startswith("/") else name
        for folder in self.system_dirs:
            path = f"{folder}/{name}"
            if os.path.isfile(path):
                return path
        if kind == ldso.UNKNOWN and cwd is not None:
            return _join(cwd, name)
        return name

    def _local(self, path: str, pid: int) -> str:
        """The path as the process names it, for this monitor to open: its /proc/self,
        /proc/thread-self and /dev/fd are the process's, under the injected /proc root."""
        for mine, its in (("/proc/self/", f"/{pid}/"), ("/proc/thread-self/", f"/{pid}/"),
                          ("/dev/fd/", f"/{pid}/fd/"), ("/proc/", "/")):
            if path.startswith(mine):
                return f"{self.proc}{its}{path[len(mine):]}"
        return path

    def _named(self, path: str, pid: int) -> str:
        """The program's name for the rules: a /proc link (`ld.so /proc/self/fd/3`, a file
        descriptor of a deleted file or a memfd) named by what it points to."""
        if not path.startswith(("/proc/", "/dev/fd/")):
            return path
        target = self._readlink(self._local(path, pid))
        return target if target and target.startswith("/") else path

    def _readlink(self, path: str) -> str | None:
        try:
            link = cmdline.decode(os.readlink(os.fsencode(path)))
            return link.removesuffix(cmdline.DELETED_SUFFIX)
        except OSError:
            return None
