"""Alert delivery lanes: one per receiver (Alertmanager, webhook), each with its own pending
alerts, batch size and back-off, and the HTTP request that hands a batch over.

A lane picks its next batch (Alertmanager: up to `limit` label sets, every spooled alert of
each; webhook: up to `limit` alerts) and POSTs it with a timeout; the notifier (monitor/
observe/notifier.py) runs one thread per lane and settles what the answer means. Nothing
here touches the disk, decides policy, or blocks anyone but its own lane's thread.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor import __version__
from monitor.observe.alerts import ALERTMANAGER, Alert, alertmanager_payload, webhook_payload

CONTENT_REJECTED = frozenset({400, 413, 422})  # the receiver refuses this body: split it

Http = Callable[[str, bytes, float], tuple[int, str]]
"""POSTs a JSON body: (url, body, timeout seconds) -> (status, start of the response body).
Raises OSError (or http.client.HTTPException) when no answer came."""


def urllib_post(url: str, body: bytes, timeout: float) -> tuple[int, str]:
    """The default Http: urllib.request with a timeout (applied to connect and each read)."""
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"agentwatch/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(512).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(512).decode("utf-8", "replace")


@dataclass(frozen=True)
class Answer:
    """What a receiver said to one batch."""

    status: int  # 0: no answer (connection refused, timeout, bad URL)
    text: str  # the start of the response body, or why there was none
    items: int  # alerts (Alertmanager: label sets) the request carried

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def refused(self) -> bool:
        """The receiver refuses the body itself (not a transient failure)."""
        return self.status in CONTENT_REJECTED


@dataclass(eq=False)
class Lane:
    """One receiver's delivery state (guarded by the notifier's condition)."""

    name: str
    url: str
    limit: int  # alerts (Alertmanager: label sets) per request; halved on a 400
    pending: dict[str, Alert] = field(default_factory=dict)  # spool name -> alert, oldest first
    failures: int = 0  # consecutive failed requests
    next_try: float = 0.0  # time.monotonic() of the next request
    thread: threading.Thread | None = None

    def batch(self) -> list[tuple[str, Alert]]:
        """(held) The next request's alerts, oldest first."""
        if self.name != ALERTMANAGER:
            return list(self.pending.items())[:self.limit]
        groups: dict[str, list[tuple[str, Alert]]] = {}
        for name, alert in self.pending.items():
            key = alert.fingerprint()
            if key in groups or len(groups) < self.limit:
                groups.setdefault(key, []).append((name, alert))
        return [item for group in groups.values() for item in group]

    def send(self, post: Http, alerts: list[Alert], *, resolve_after: float, now: float,
             timeout: float) -> Answer:
        """POST one batch (without the lock: this waits on the network)."""
        payload: Any = (alertmanager_payload(alerts, resolve_after, now)
                        if self.name == ALERTMANAGER
                        else webhook_payload(alerts, resolve_after, now))
        items = len(payload if isinstance(payload, list) else payload["alerts"])
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            status, text = post(self.url, body, timeout)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: bad URL
            status, text = 0, f"{type(exc).__name__}: {exc}"
        return Answer(status, text, items)
