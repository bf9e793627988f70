"""Kill alerts out: on every kill, push an alert to Alertmanager and/or a webhook at once,
lose none.

notify() hands the alert to the spool writer (monitor/observe/alertspool.py) and returns at
once: it never touches the disk or the network on its caller's (the event loop's) thread.
The writer's thread writes it to the on-disk spool (temp file, fsync, rename) and then gives
it to every delivery lane (monitor/observe/delivery.py); one thread per lane sends what is
pending, oldest first, in batches, and backs off exponentially (capped) while its receiver
fails. Each receiver keeps its own delivery state: an alert leaves the spool when every
configured receiver has taken it. The spool is read at start, so a restart loses nothing. An
alert notify() accepted is on disk before any receiver gets it while the disk takes writes;
once a write failed, alerts are delivered from memory and spooled when the disk is back.

This module must never block notify()'s caller on the disk or the network, never let a
receiver's or the disk's failure raise into the monitor's event loop, never decide policy,
and never do work on import. Delivery is at least once: a crash between a receiver's 2xx and
the spool update can repeat an alert (same id, same labels), never lose one.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from monitor.config.types import AlertSettings
from monitor.observe.alerts import (
    ALERTMANAGER,
    Alert,
    VerdictLike,
    kill_alert,
    kill_switch_alert,
)
from monitor.observe.alertspool import MEMORY_BYTES, Spool, SpoolWriter, spool_name
from monitor.observe.auditlog import SinkStats
from monitor.observe.delivery import Http, Lane, urllib_post

RESULTS = ("success", "failure", "rejected")  # the result label of `deliveries`
Log = Callable[..., None]


def _std_log(msg: str, level: str = "info", **fields: Any) -> None:
    logging.getLogger("agentwatch.alerts").log(
        getattr(logging, level.upper(), logging.INFO), "%s %s", msg,
        json.dumps(fields, default=str))


class Notifier:
    """Takes kill alerts, spools them (off the caller's thread) and delivers them in the
    background; see the module docstring."""

    def __init__(self, config: AlertSettings, *, clock: Callable[[], float] = time.time,
                 http: Http = urllib_post, log: Log | None = None,
                 hostname: Callable[[], str] = socket.gethostname, batch_size: int = 64,
                 retry_initial: float = 1.0, retry_max: float = 60.0,
                 generator_url: str = "", memory_bytes: int = MEMORY_BYTES) -> None:
        self.config = config
        self.clock = clock
        self.http = http
        self.log = log or _std_log
        self.instance = config.instance or hostname()
        self.generator_url = generator_url
        self.batch_size = batch_size
        self.retry_initial, self.retry_max = retry_initial, retry_max
        urls = config.receivers
        if ALERTMANAGER in urls:
            urls[ALERTMANAGER] = urls[ALERTMANAGER].rstrip("/") + "/api/v2/alerts"
        self._lanes = [Lane(name, url, batch_size) for name, url in urls.items()]
        self.deliveries: Counter[tuple[str, str]] = Counter(
            {(lane.name, r): 0 for lane in self._lanes for r in RESULTS})
        self._cond = threading.Condition()
        self.spool = Spool(Path(config.spool_dir), self.receivers, self.log)
        self.writer = SpoolWriter(self.spool, self._cond, self.log, to_lanes=self._to_lanes,
                                  forget=self._forget, memory_bytes=memory_bytes,
                                  retry_initial=retry_initial, retry_max=retry_max)
        self._stopping = False
        self._started = False

    @property
    def enabled(self) -> bool:
        return bool(self._lanes)

    @property
    def receivers(self) -> tuple[str, ...]:
        return tuple(lane.name for lane in self._lanes)

    @property
    def corrupt(self) -> int:
        """Spool files moved aside."""
        return self.spool.corrupt

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the spool, read what a previous run left in it, start delivering.
        Raises EnvironmentProblem if the spool directory cannot be made or read, or if
        another user could write to it."""
        if not self.enabled or self._started:
            return
        found, sent = self.spool.open()
        with self._cond:
            for lane in self._lanes:
                merged = {**{n: a for n, a in found.items() if n not in sent[lane.name]},
                          **lane.pending}
                lane.pending = dict(sorted(merged.items()))
            gone = [n for n in found if not any(n in lane.pending for lane in self._lanes)]
            self._started, self._stopping = True, False
            for lane in self._lanes:
                if lane.thread is None:  # else: still in a request since close(); it goes on
                    lane.thread = threading.Thread(target=self._deliver, args=(lane,),
                                                   name=f"agentwatch-alerts-{lane.name}",
                                                   daemon=True)
                    lane.thread.start()
        for name in gone:  # every receiver took it before the last stop
            self.spool.remove(name)
        self.log("alert delivery started", receivers=list(self.receivers),
                 spooled=self.spooled(), spool_dir=str(self.spool.path),
                 instance=self.instance)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the delivery threads (a request under way may finish) and the spool writer
        (after a last try at what it holds); what is still pending stays on disk for the
        next start. notify() still spools after this."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in [lane.thread for lane in self._lanes]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._started = False
        lost = self.writer.close(max(0.0, deadline - time.monotonic()))
        if lost:
            self.log("alerts lost: the spool was still unwritable when alert delivery "
                     "stopped", level="error", alerts=lost, spool_dir=str(self.spool.path))

    def drain(self, timeout: float) -> bool:
        """Wait until every receiver took every alert; False if timeout came first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count(None):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every alert accepted so far was tried on disk (written, or kept in
        memory because the disk refused it); False if timeout came first."""
        return self.writer.flush(timeout)

    # --- alerts in ---------------------------------------------------------------------

    def notify(self, alert: Alert) -> Alert | None:
        """Take alert for every receiver and return at once (neither the disk nor the
        network is waited on); returns the alert as it will be spooled, or None when no
        receiver is configured."""
        if not self.enabled:
            return None
        alert = replace(alert, instance=alert.instance or self.instance,
                        runbook_url=alert.runbook_url or self.config.runbook_url,
                        generator_url=alert.generator_url or self.generator_url)
        self.writer.accept(spool_name(alert), alert, alert.to_json().encode())
        return alert

    def kill(self, v: VerdictLike, outcome: str, *, exe: str | None = None,
             argv: Sequence[str] | None = None) -> Alert | None:
        """Alert about a kill a verdict caused (exe/argv: what the log line shows)."""
        if not self.enabled:
            return None
        return self.notify(kill_alert(
            agent=v.agent, rule=v.rule, action=v.action, outcome=outcome, reason=v.reason,
            at=self.clock(), session=v.session, pid=v.pid,
            exe=exe if exe is not None else v.exe, argv=argv if argv is not None else v.argv,
            destination=v.destination, mode=v.mode))

    def kill_switch(self, *, agent: str, outcome: str, reason: str, requested_by: str = "",
                    session: int = 0, pid: int = 0,
                    action: str = "kill-agent") -> Alert | None:
        """Alert about a manual kill switch use."""
        if not self.enabled:
            return None
        return self.notify(kill_switch_alert(
            agent=agent, outcome=outcome, reason=reason, at=self.clock(),
            requested_by=requested_by, session=session, pid=pid, action=action))

    def spooled(self, receiver: str | None = None) -> int:
        """Alerts not yet taken by every receiver (or by the one named)."""
        with self._cond:
            return self._count(receiver)

    def _count(self, receiver: str | None) -> int:
        names = set(self.writer.waiting())
        for lane in self._lanes:
            if receiver is None or lane.name == receiver:
                names.update(lane.pending)
        return len(names)

    def sink_stats(self) -> SinkStats:
        """Alerts kept in memory only (not, or not yet, on disk), alerts dropped, failed
        spool writes (exported as agentwatch_sink_* {sink="alert_spool"})."""
        with self._cond:
            return self.writer.stats()

    # --- the lanes (the writer calls these with the lock held) ---------------------------

    def _to_lanes(self, name: str, alert: Alert) -> None:
        for lane in self._lanes:
            lane.pending[name] = alert

    def _forget(self, names: Sequence[str]) -> None:
        """Alerts that will never be delivered (dropped for memory, or lost at close)."""
        for name in names:
            for lane in self._lanes:
                lane.pending.pop(name, None)
        if names:
            self._cond.notify_all()

    # --- delivery ----------------------------------------------------------------------

    def _deliver(self, lane: Lane) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    wait = lane.next_try - time.monotonic()
                    if lane.pending and wait <= 0:
                        break
                    self._cond.wait(wait if lane.pending else None)
                if self._stopping:
                    lane.thread = None
                    return
                batch = lane.batch()
            self._send(lane, batch)

    def _send(self, lane: Lane, batch: list[tuple[str, Alert]]) -> None:
        alerts = [a for _, a in batch]
        answer = lane.send(self.http, alerts, resolve_after=self.config.resolve_after_seconds,
                           now=self.clock(), timeout=self.config.timeout_seconds)
        names = [n for n, _ in batch]
        if answer.ok:
            self._taken(lane, names, "success")
        elif answer.refused and answer.items == 1:
            self.log("receiver refused an alert; it is not sent there again", level="error",
                     receiver=lane.name, status=answer.status, answer=answer.text,
                     alerts=[a.to_json() for a in alerts])
            self._taken(lane, names, "rejected")
        elif answer.refused:  # find the alert it refuses: halve the batch
            with self._cond:
                self.deliveries[(lane.name, "rejected")] += 1
                lane.limit = max(1, min(lane.limit, answer.items) // 2)
        else:
            with self._cond:
                self.deliveries[(lane.name, "failure")] += 1
                lane.failures += 1
                delay = min(self.retry_max, self.retry_initial * 2 ** (lane.failures - 1))
                lane.next_try = time.monotonic() + delay
                spooled = len(lane.pending)
            if lane.failures == 1:
                self.log("alert receiver unreachable; alerts stay spooled and are retried",
                         level="warning", receiver=lane.name, url=lane.url,
                         status=answer.status or None, answer=answer.text, spooled=spooled)

    def _taken(self, lane: Lane, names: list[str], result: str) -> None:
        """The receiver has these: mark them, and remove each alert (once) that every
        receiver now has."""
        with self._cond:
            self.deliveries[(lane.name, result)] += 1
            recovered = lane.failures
            lane.failures, lane.next_try = 0, 0.0
            lane.limit = min(self.batch_size, lane.limit * 2)
            done: list[str] = []
            mark: list[str] = []
            for name in names:
                lane.pending.pop(name, None)
                others = any(name in other.pending for other in self._lanes if other is not lane)
                (mark if others else done).append(name)
            self.writer.delivered(done)  # delivered everywhere: it need not reach the spool
            self._cond.notify_all()
            spooled = len(lane.pending)
        for name in mark:
            self.spool.mark(lane.name, name)
        for name in done:
            self.spool.remove(name)
        if recovered:
            self.log("alert receiver back; spooled alerts delivered", receiver=lane.name,
                     failed_attempts=recovered, spooled=spooled)
