"""Processes and ports that the kernel, end-to-end and benchmark code start and use: a free
loopback port, and the stop of a child it started (SIGTERM, then SIGKILL if it lingers).

Signals only the child object it is given, by its pid; never looks processes up by name.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for metrics and test listeners)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM a child we started, if it still runs, and wait for it; SIGKILL if it has not
    exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
