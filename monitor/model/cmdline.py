"""Process bytes as text, decoded one way everywhere, and the bounds on command lines.

The kernel hands the monitor bytes, not text: an agent may put any byte but NUL in an
argument, a file name or its comm, and may cut a multi-byte character in half at the point
where the probes stop copying. Every reader (the ring-buffer decoder, the /proc reader)
turns bytes into text with `decode` only: UTF-8 with surrogateescape, as os.fsdecode does on
Linux. The same bytes always give the same str, and `encode` gives the bytes back exactly,
so two readings of one command line are compared as bytes (`continues`), never as text
decoded two different ways.

Command lines are also bounded here. The kernel caps argv plus environment at 6 MiB
(fs/exec.c: 3/4 of _STK_LIM, whatever the stack limit), so /proc/PID/cmdline is read up to
READ_MAX and judged whole; what is kept afterwards (per process, in the exec history, logs,
alerts and the event stream) is a head-and-tail clip of KEEP_CHARS. A command line of more
than SPLIT_MAX_ARGS arguments is judged on its whole text (`join`) and a clipped argv.

This module is pure: no I/O, no logging, nothing but bytes and str in and out.
"""

from __future__ import annotations

import os.path
from collections.abc import Sequence

ENCODING = "utf-8"
ERRORS = "surrogateescape"

READ_MAX = 6 * 1024 * 1024 + 64 * 1024
"""Bytes of /proc/PID/cmdline read at most: the kernel's 6 MiB limit on argv + environment
(setproctitle may spread argv over the environment block, within the same 6 MiB) and a
margin. Only a process with CAP_SYS_RESOURCE (prctl PR_SET_MM) can show more."""

SPLIT_MAX_ARGS = 4096
"""Above this many arguments a command line is not split into a tuple for judging (150,000
short arguments took 0.9 s and 400 MB to split and decode): argv rules search its whole
text, and ssh rules judge it conservatively (monitor/sshargs.possible_features)."""

KEEP_CHARS = 4096
"""Characters of a command line kept after judging (per process, in each exec history
record, in logs, alerts and the event stream): the first 3/4 and the last 1/4 of them."""

DELETED_SUFFIX = " (deleted)"  # what /proc/PID/exe adds to a file with no link left
MEMFD_PATH = "/memfd:"  # /proc/PID/exe of a memfd: this, then the name memfd_create got
COMM_MAX = 15
"""Bytes of a program name the kernel keeps as comm (TASK_COMM_LEN 16, with the NUL)."""


def comm_bytes(name: str) -> bytes:
    """The comm the kernel gives a program called `name`: its first COMM_MAX bytes."""
    return encode(name)[:COMM_MAX]


def comm_of(name: str) -> str:
    """comm_bytes as text, decoded as every comm from the kernel is."""
    return decode(comm_bytes(name))


def file_name(exe: str) -> str:
    """The name an executable's file goes by, as the probes name it for the kernel's name
    rules: its base name (a deleted file's without the " (deleted)" /proc adds); for a memfd
    (/proc/PID/exe shows "/memfd:NAME (deleted)"; the sessions stage names it "memfd:NAME"),
    NAME whole, without the "memfd:" that memfd_create puts before it (a memfd's name may hold
    a "/": runc's is "runc_cloned:/proc/self/exe")."""
    exe = exe.removesuffix(DELETED_SUFFIX)
    for prefix in (MEMFD_PATH, MEMFD_PATH[1:]):
        if exe.startswith(prefix) and len(exe) > len(prefix):
            return exe[len(prefix):]
    return os.path.basename(exe)


def decode(raw: bytes) -> str:
    """Text of bytes that came from a process (lossless: `encode` gives them back)."""
    return raw.decode(ENCODING, ERRORS)


def encode(text: str) -> bytes:
    """The bytes a decoded string came from."""
    return text.encode(ENCODING, ERRORS)


def c_string(raw: bytes) -> str:
    """Text of a NUL-terminated field (comm, a file name): the bytes before the first NUL."""
    return decode(raw.split(b"\0", 1)[0])


def pieces(raw: bytes) -> list[bytes]:
    """The arguments of a NUL-separated block, as /proc/PID/cmdline holds them (a block cut
    inside an argument ends in that argument's first bytes)."""
    if not raw:
        return []
    out = raw.split(b"\0")
    if out[-1] == b"":
        out.pop()
    return out


def split(raw: bytes, max_args: int = SPLIT_MAX_ARGS) -> tuple[str, ...] | None:
    """The arguments of a NUL-separated block as text; None when there are more than
    max_args of them (then use `join` and `clip_block`)."""
    if raw.count(b"\0") > max_args + 1:
        return None
    found = pieces(raw)
    if len(found) > max_args:
        return None
    return tuple(decode(p) for p in found)


def join(raw: bytes) -> str:
    """The whole command line of a NUL-separated block, arguments joined by single spaces
    (what argv rules and cmdline matchers search)."""
    return decode(raw.rstrip(b"\0").replace(b"\0", b" "))


def block(argv: Sequence[str]) -> bytes:
    """The NUL-separated bytes of argv (no trailing NUL)."""
    return b"\0".join(encode(a) for a in argv)


def continues(whole: bytes, cut: Sequence[str]) -> bool:
    """Whether the command line `whole` (raw /proc/PID/cmdline) is the one `cut` (the
    probes' copy of its first bytes) was cut from: the same bytes, continued. A later exec
    by the same pid, or a process that rewrote its arguments, shows other bytes."""
    return bool(cut) and whole.startswith(block(cut))


def omitted(size: int, args: int) -> str:
    """The stand-in for what a clip leaves out (size in characters, or bytes for a block)."""
    return f"...[{size} more in {args} arguments not kept]..."


def clip(argv: Sequence[str], limit: int = KEEP_CHARS) -> tuple[str, ...]:
    """argv within about `limit` characters: itself when it fits, else its first 3/4 and
    last 1/4 with an `omitted` marker between them (the arguments at the seams are cut)."""
    if sum(map(len, argv)) + len(argv) <= limit:
        return tuple(argv)
    head_room, tail_room = limit * 3 // 4, limit // 4
    head: list[str] = []
    used = 0
    i = 0
    while i < len(argv) and used < head_room:
        a = argv[i][: head_room - used]
        head.append(a)
        used += len(a) + 1
        i += 1
    tail: list[str] = []
    used = 0
    j = len(argv)
    while j > i and used < tail_room:
        j -= 1
        a = argv[j]
        a = a[len(a) - (tail_room - used):] if len(a) > tail_room - used else a
        tail.append(a)
        used += len(a) + 1
    tail.reverse()
    left_chars = sum(len(a) + 1 for a in argv) - sum(len(a) + 1 for a in head + tail)
    return (*head, omitted(max(left_chars, 0), j - i), *tail)


def clip_block(raw: bytes, limit: int = KEEP_CHARS) -> tuple[str, ...]:
    """`clip` of a NUL-separated block without splitting all of it (a 6 MiB block may hold
    millions of arguments); the arguments at the seams are cut, the counts are bytes."""
    if len(raw) <= limit:
        return clip(tuple(decode(p) for p in pieces(raw)), limit)
    cut = len(raw) - limit // 4
    head, tail = pieces(raw[: limit * 3 // 4]), pieces(raw[cut:])
    total = raw.count(b"\0") + (0 if raw.endswith(b"\0") else 1)
    left = cut - limit * 3 // 4
    return (*(decode(p) for p in head), omitted(left, max(total - len(head) - len(tail), 0)),
            *(decode(p) for p in tail))
