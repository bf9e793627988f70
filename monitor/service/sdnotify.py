"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY, STATUS, RELOADING,
STOPPING and WATCHDOG datagrams to $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op. It never raises on a send
failure: a monitor that cannot reach systemd keeps watching agents (the watchdog will
restart it if that matters).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class SystemdNotifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self._next_ping = 0.0
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """Send KEY=value lines (keys upper-cased), e.g. send(ready=1, status="ok")."""
        if not self.address:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(msg)
        except OSError:
            self.failures += 1
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def reloading(self) -> bool:
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(stopping=1)

    def watchdog(self, now: float | None = None) -> bool:
        """Ping at half the watchdog interval; call it from the event loop, so a stuck loop
        stops pinging and systemd restarts the service."""
        if not self.watchdog_s:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_ping:
            return False
        self._next_ping = now + self.watchdog_s / 2
        return self.send(watchdog=1)
