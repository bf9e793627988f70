"""Complete an exec the probes could only partly see, from /proc, when /proc shows that exec.

The probes copy the first events.ARGS_SIZE bytes of argv at exec (padding can push the
forbidden part past them) and name a file executed through a descriptor /dev/fd/N. While
the process lives, /proc/PID/cmdline and /proc/PID/exe have the rest. A cut argv is
replaced by /proc's only when /proc shows the same bytes continued (monitor.model.cmdline.
continues): a process that exec'd again or rewrote its arguments shows something else. When
the rest cannot be confirmed, the event is judged on the cut copy and says why
(ExecFlag.ARGV_UNCONFIRMED and a reason): it is never passed off as whole.

Pure: the caller reads /proc (monitor/sessions/procfs.py) and hands the result in; nothing here does
I/O, logs or decides policy.
"""

from __future__ import annotations

from dataclasses import replace

from monitor.model import cmdline
from monitor.model.events import (
    FLAG_ARGV_CLIPPED,
    FLAG_ARGV_COMPLETED,
    FLAG_ARGV_MISSING,
    FLAG_ARGV_TRUNCATED,
    FLAG_ARGV_UNCONFIRMED,
    ExecEvent,
)
from monitor.sessions.procfs import ProcInfo

GONE = "gone"  # the process exited (or its /proc entry could not be read) first
CHANGED = "changed"  # /proc shows another command line: exec'd again, or rewritten
TOO_LONG = "too_long"  # longer than cmdline.READ_MAX (only CAP_SYS_RESOURCE can do that)
REASONS = (GONE, CHANGED, TOO_LONG)
# exec'd paths that name a file through a descriptor or a /proc link (fexecve and
# execveat(AT_EMPTY_PATH) give /dev/fd/N; execve("/proc/self/fd/N"), /proc/PID/exe): the
# file's own path is /proc/PID/exe's
THROUGH_DESCRIPTOR = ("/dev/fd/", "/proc/")


def needs_proc(ev: ExecEvent) -> bool:
    """Whether /proc can tell more about this exec than the probes did."""
    return bool(ev.flags & FLAG_ARGV_TRUNCATED or ev.flags & FLAG_ARGV_MISSING and not ev.argv
                or ev.filename.startswith(THROUGH_DESCRIPTOR))


def complete(ev: ExecEvent, info: ProcInfo | None) -> tuple[ExecEvent, str | None]:
    """The exec to judge, and why its cut argv is unconfirmed (None when it is not)."""
    if info is not None and ev.filename.startswith(THROUGH_DESCRIPTOR) and info.exe:
        ev = replace(ev, filename=info.exe)
    cut = bool(ev.flags & FLAG_ARGV_TRUNCATED)
    if not ev.argv and ev.flags & FLAG_ARGV_MISSING:
        return (_whole(ev, info), None) if info is not None else (ev, None)
    if not cut:
        return ev, None
    if info is None:
        return replace(ev, flags=ev.flags | FLAG_ARGV_UNCONFIRMED), GONE
    if not cmdline.continues(info.cmdline, ev.argv):
        return replace(ev, flags=ev.flags | FLAG_ARGV_UNCONFIRMED), CHANGED
    ev = _whole(ev, info)
    if info.cmdline_cut:
        return replace(ev, flags=ev.flags | FLAG_ARGV_UNCONFIRMED), TOO_LONG
    return ev, None


def _whole(ev: ExecEvent, info: ProcInfo) -> ExecEvent:
    """ev with argv from /proc (a clip, and the whole line, when there are too many args)."""
    flags = ev.flags | FLAG_ARGV_COMPLETED
    if info.argv_clipped:
        return replace(ev, argv=info.argv, line=info.line, flags=flags | FLAG_ARGV_CLIPPED)
    return replace(ev, argv=info.argv, flags=flags)


def kept(ev: ExecEvent) -> ExecEvent:
    """The exec as it is kept and shown once judged: argv within cmdline.KEEP_CHARS and no
    whole line (a completed argv may be megabytes)."""
    if not ev.flags & FLAG_ARGV_COMPLETED:
        return ev  # the probes' copy: at most events.ARGS_SIZE bytes
    argv = cmdline.clip(ev.argv)
    if argv is ev.argv and ev.line is None:
        return ev
    return replace(ev, argv=argv, line=None, flags=ev.flags | FLAG_ARGV_CLIPPED)
