"""The daemon loop's inbox (monitor/service/inbox.py): control operations run on the loop's
thread, their errors come back to the caller, and nothing waits for a loop that is not
running."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from monitor.service.inbox import Inbox


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not so within {timeout} s"
        time.sleep(0.001)


def test_work_runs_on_the_loop_thread_when_it_drains() -> None:
    inbox = Inbox(threading.RLock())
    inbox.open()  # this thread is the loop
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(inbox.call, threading.get_ident)
        wait_until(lambda: inbox.waiting)  # queued: the loop drains between records
        assert not done.done()
        inbox.drain()
        assert done.result(timeout=5) == threading.get_ident()
        assert not inbox.waiting
        failed = pool.submit(inbox.call, lambda: 1 // 0)
        wait_until(lambda: inbox.waiting)
        inbox.close()  # what came in as the loop ended still runs
        with pytest.raises(ZeroDivisionError):
            failed.result(timeout=5)
        # no loop: right away, in the caller
        other = pool.submit(inbox.call, threading.get_ident).result(timeout=5)
        assert other != threading.get_ident()


def test_the_loop_never_waits_for_itself() -> None:
    inbox = Inbox(threading.RLock())
    inbox.open()
    assert inbox.call(lambda: 42) == 42
    assert not inbox.waiting


def test_queued_work_wakes_the_loop() -> None:
    """The loop may be blocked waiting for records (up to 100 ms): handing it work wakes
    it, so a control request never waits out that timeout."""
    woken = threading.Event()
    inbox = Inbox(threading.RLock(), wake=woken.set)
    inbox.open()  # this thread is the loop
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(inbox.call, lambda: "ran")
        assert woken.wait(5), "queued work did not wake the loop"
        inbox.drain()
        assert done.result(timeout=5) == "ran"
    inbox.close()
    assert not inbox.call(lambda: woken.clear())  # inline (no loop): no wake needed
    assert not woken.is_set()
