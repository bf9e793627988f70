"""Run a function in a forked child with a time limit, for tests that assert bounded time.

A backtracking regex or a YAML bomb spins inside C code, where neither a signal handler nor
pytest-timeout can stop it in-process; a forked child can be killed. The child's result (or
the repr of what it raised) comes back pickled through a pipe.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import TypeVar, cast

T = TypeVar("T")


class Raised(Exception):
    """What the function raised in the child: its type name and str()."""


def within(seconds: float, fn: Callable[[], T]) -> T:
    """fn() computed in a child process; AssertionError if it took longer than seconds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            data = pickle.dumps(("ok", fn()))
        except BaseException as e:  # everything goes back to the parent, to be seen there
            data = pickle.dumps(("raised", f"{type(e).__name__}: {str(e)[:2000]}"))
        view = memoryview(data)
        while view:
            view = view[os.write(write, view):]
        os._exit(0)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"still running after {seconds} s")
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    if status == "raised":
        raise Raised(value)
    return cast(T, value)
