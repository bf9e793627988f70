"""The ssh config an agent's ssh exec will read, read at exec time, for the judge.

`ssh -F cfg host` or `ssh alias` can request a forward from a config file while argv shows
nothing. For an agent's exec that is ssh (the caller decides: `is_ssh`), this reads what
that ssh process will read — its -F file (paths relative to its cwd), else its user's
~/.ssh/config and /etc/ssh/ssh_config, and their Includes — as that process sees them
(monitor/sessions/rootfs.py: inside /proc/PID/root, regular files only, bounded), and
resolves them with monitor/policy/sshconfig.py. The result goes on the ExecEvent
(`ssh_config`, `ssh_config_from`).

"The user's ~/.ssh/config": OpenSSH takes it from the passwd entry of the process's real
uid (read from the process's own /etc/passwd, else the monitor's); `~` in Include globs
is $HOME as the process has it (/proc/PID/environ). Both homes' configs are resolved
when they differ, and united: conservative, since other ssh builds honour $HOME. The
files are read when the monitor handles the exec, because the agent can change them at
any time before; a rewrite within those milliseconds can still race the read.

A config the monitor cannot read (a FIFO or /dev/stdin as -F, a device, a file over the
cap, too many Includes) makes the verdict EVERY feature, and the reason says why; a
command line of more arguments than the monitor splits likewise. A cut command line that
/proc could not confirm is resolved from its cut copy, like the rest of its judgement. A
missing ~/.ssh/config is just missing. This module never runs anything (ProxyCommand,
Match exec), never blocks on a file, and never signals a process. What could still block
(a FUSE or hard NFS mount that does not answer) runs on a thread the event loop waits for
at most READ_TIMEOUT_S.
"""

from __future__ import annotations

import functools
import os
import pwd
import queue
import threading
from dataclasses import replace
from pathlib import Path

from monitor.model import cmdline
from monitor.model.events import ExecEvent
from monitor.policy.sshargs import parse_ssh_argv
from monitor.policy.sshconfig import ConfigResult, Unreadable, everything, resolve
from monitor.sessions.rootfs import RootFS

READ_TIMEOUT_S = 0.25
MAX_STUCK = 4
_CONSERVATIVE = "; an ssh whose config the monitor cannot see is judged as requesting every feature"
ENVIRON_MAX = cmdline.READ_MAX  # the kernel's limit for argv and environment together
PASSWD_MAX = 1 << 20
_GONE = (FileNotFoundError, ProcessLookupError, NotADirectoryError)


_Job = tuple[ExecEvent, list[ConfigResult | None], threading.Event]


class _Gone(Exception):
    """The process exited before its config could be read: nothing left to judge."""


def _home_from(environ: bytes) -> str | None:
    """The first HOME= of an environment block (getenv's answer), None if unset or empty."""
    for entry in environ.split(b"\0"):
        if entry.startswith(b"HOME="):
            return cmdline.decode(entry[5:]) or None
    return None


@functools.lru_cache(maxsize=8)  # the same few passwd files at every exec
def parse_passwd(text: str) -> tuple[tuple[str, int, str], ...]:
    """(name, uid, home) of each well-formed line of a passwd file."""
    out = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2].isdigit():
            out.append((fields[0], int(fields[2]), fields[5]))
    return tuple(out)


class SshConfigStep:
    """Resolves the ssh config of agents' ssh execs from a /proc tree (the real one by
    default; tests hand in their own root)."""

    def __init__(self, proc_root: str | Path = "/proc", *,
                 timeout_s: float = READ_TIMEOUT_S) -> None:
        self.proc = Path(proc_root)
        self.timeout_s = timeout_s
        self._stuck: list[threading.Event] = []  # reads that outlived timeout_s
        self._queue: queue.SimpleQueue[_Job | None] | None = None

    def resolve(self, ev: ExecEvent, *, needed: bool) -> ExecEvent:
        """ev with ssh_config set, for a tracked exec that is ssh and whose verdict its config
        could change (needed: the judge's wants_ssh_config); else ev unchanged."""
        if not needed or not ev.h.session:
            return ev
        found = self._within_time(ev)
        if found is None:
            return ev
        return replace(ev, ssh_config=found.features, ssh_config_from=found.sources)

    def _within_time(self, ev: ExecEvent) -> ConfigResult | None:
        """config_for on the worker thread, waited for at most timeout_s: a file system
        that does not answer (FUSE, a hard NFS mount: no O_NONBLOCK helps there) costs the
        event loop that long once; the worker is then left to its hang (it retires when it
        returns) and a new one takes over, and while MAX_STUCK reads hang every ssh is
        judged at once as asking for everything."""
        self._stuck = [d for d in self._stuck if not d.is_set()]
        if len(self._stuck) >= MAX_STUCK:
            return everything(f"{len(self._stuck)} earlier reads of ssh configs still hang"
                              f"{_CONSERVATIVE}")
        if self._queue is None:
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(self._queue,), name="ssh-config",
                             daemon=True).start()
        box: list[ConfigResult | None] = []
        done = threading.Event()
        self._queue.put((ev, box, done))
        if not done.wait(self.timeout_s):
            self._stuck.append(done)
            self._queue = None  # the next read gets a worker of its own
            return everything(f"reading the ssh config did not finish within "
                              f"{self.timeout_s:g} s (a file system that does not answer?)"
                              f"{_CONSERVATIVE}")
        return box[0] if box else everything(f"reading the ssh config failed{_CONSERVATIVE}")

    def close(self) -> None:
        """Retire the worker (a hanging one retires when its read returns)."""
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None

    def _serve(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            ev, box, done = job
            try:
                box.append(self._guarded(ev))
            finally:
                done.set()
            if jobs is not self._queue:
                return  # replaced while it hung: retire

    def _guarded(self, ev: ExecEvent) -> ConfigResult | None:
        try:
            return self.config_for(ev)
        except _Gone:
            return None
        except (OSError, ValueError) as exc:
            return everything(f"reading the ssh config failed ({exc}){_CONSERVATIVE}")

    def config_for(self, ev: ExecEvent) -> ConfigResult:
        if ev.line is not None:  # more arguments than are split: -F and the host unknown
            return everything("a command line of more arguments than the monitor parses"
                              f"{_CONSERVATIVE}")
        request = parse_ssh_argv(ev.argv)
        if request.destination is None:
            return ConfigResult(frozenset())
        base = self.proc / str(ev.h.pid)
        try:
            cwd = os.readlink(base / "cwd")
            environ = self._environ(base / "environ")
            uid = self._uid(base / "status")
            files = RootFS(str(base / "root"), cwd)
        except _GONE:
            raise _Gone from None
        except OSError as exc:
            return everything(f"/proc/{ev.h.pid}: {exc.strerror}{_CONSERVATIVE}")
        with files:
            home = _home_from(environ)
            try:
                users = parse_passwd(files.read("/etc/passwd", cap=PASSWD_MAX) or "")
            except Unreadable:
                users = ()  # the process's passwd cannot be read: the monitor's is asked
            user, pw_dir = self._user(users, uid)
            files.tilde = lambda p: tilde_expand(users, p, home or pw_dir)
            homes = [h for h in (pw_dir, home) if h]
            configs = list(dict.fromkeys(os.path.join(h, ".ssh", "config") for h in homes))
            return resolve(request, files, user_configs=configs, local_user=user)

    @staticmethod
    def _environ(path: Path) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read(ENVIRON_MAX)

    @staticmethod
    def _uid(path: Path) -> int:
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split()
            if fields[:1] == ["Uid:"] and len(fields) > 1 and fields[1].isdigit():
                return int(fields[1])
        raise _Gone  # a status without Uid: not a process any more

    @staticmethod
    def _user(users: tuple[tuple[str, int, str], ...], uid: int) -> tuple[str | None, str | None]:
        """(name, home) of uid: the process's /etc/passwd first, then the monitor's."""
        for name, entry_uid, home in users:
            if entry_uid == uid:
                return name, home
        return _monitor_passwd(uid)


@functools.lru_cache(maxsize=256)  # NSS may ask the network: once per uid
def _monitor_passwd(uid: int) -> tuple[str | None, str | None]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None, None
    return entry.pw_name, entry.pw_dir


def tilde_expand(users: tuple[tuple[str, int, str], ...], pattern: str, home: str | None) -> str:
    """GLOB_TILDE: ~ and ~/ are $HOME (else the passwd home), ~user/ that user's home in
    the process's passwd; left as it is when unknown, as glibc does."""
    if not pattern.startswith("~"):
        return pattern
    name, slash, rest = pattern[1:].partition("/")
    if not name:
        return f"{home}{slash}{rest}" if home else pattern
    found = next((h for n, _, h in users if n == name), None)
    return f"{found}{slash}{rest}" if found else pattern
