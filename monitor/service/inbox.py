"""The daemon loop's inbox: work other threads (the control socket's) hand to the loop, so
the loop stays the one writer of session and judge state.

`call(fn)` queues fn, wakes the loop (which may be waiting for records) and waits for it
to run fn (under the daemon's lock), then returns its result or raises its error in the
caller. While no loop drains the inbox
(before the loop starts, after it ends, in unit tests that drive the daemon by hand) fn
runs right away in the caller, under the same lock: nothing waits for a loop that is not
there, and the loop never waits for itself. Nothing here knows what the work is.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class Inbox:
    def __init__(self, lock: threading.RLock, wake: Callable[[], None] = lambda: None) -> None:
        self.lock = lock  # the daemon's: held while the work runs
        self.wake = wake  # cuts the loop's wait for records short
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._gate = threading.Lock()  # orders `open`/`close` against `call`
        self._loop: int | None = None  # the draining thread's ident, while it drains
        self.waiting = False  # work is queued: the loop drains between two records too

    def open(self) -> None:
        """The loop (the calling thread) starts draining: from now on `call` waits for it."""
        with self._gate:
            self._loop = threading.get_ident()

    def close(self) -> None:
        """The loop stops draining: run what is queued, and `call` runs work inline."""
        with self._gate:
            self._loop = None
        self.drain()

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the loop and return its result, or raise what it raised."""
        fut: Future[T] | None = None
        with self._gate:
            if self._loop is not None and self._loop != threading.get_ident():
                fut = Future()
                self._queue.put((fn, fut))
                self.waiting = True
        if fut is not None:
            self.wake()  # the loop may be waiting for records: up to 100 ms otherwise
        if fut is None:
            with self.lock:
                return fn()
        result: T = fut.result()
        return result

    def drain(self) -> None:
        """Run every queued piece of work (the loop calls this each round, and between two
        records when `waiting`: a flood of records never holds up the kill switch)."""
        self.waiting = False
        while True:
            try:
                fn, fut = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                with self.lock:
                    fut.set_result(fn())
            except BaseException as e:  # handed to the waiting thread, which raises it
                fut.set_exception(e)
