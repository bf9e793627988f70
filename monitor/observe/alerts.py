"""Kill alerts: on every kill, push an alert to Alertmanager and/or a webhook at once, lose none.

notify() writes the alert to the on-disk spool (temp file, fsync, rename) and returns; one
delivery thread per receiver sends what is spooled, oldest first, in batches, and backs off
exponentially (capped) while its receiver fails. Each receiver keeps its own delivery state:
an alert leaves the spool when every configured receiver has taken it. The spool is read at
start, so a restart loses nothing; a corrupt spool file is moved aside and logged. Spooled
alerts with identical label sets reach Alertmanager as one alert (it would merge them anyway);
the webhook gets every alert, each with a stable id, so a receiver can drop a repeat.

When the spool cannot be written (disk full, I/O error) the alert is still delivered from
memory, and a spooler thread writes it to the spool, retrying with a capped back-off, once
the disk takes it again. Alerts kept in memory only are bounded (memory_bytes of their
JSON); beyond that the oldest are dropped, counted (`dropped`) and logged once per spell.
notify() itself still writes and fsyncs on its caller's thread when the disk is healthy
(a slow disk slows the event loop by that much); once a write failed, new alerts wait for
the spooler instead of trying the disk again on the caller's thread.

This module must never block notify()'s caller on the network, never let a receiver's or the
disk's failure raise into the monitor's event loop, never decide policy, and never do work on
import. Delivery is at least once: a crash between a receiver's 2xx and the spool update can
repeat an alert (same id, same labels), never lose one.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from monitor import __version__
from monitor.config.types import AlertSettings
from monitor.model.errors import EnvironmentProblem
from monitor.model.safetext import printable
from monitor.observe.auditlog import SinkStats

ALERTMANAGER = "alertmanager"
WEBHOOK = "webhook"
RECEIVERS = (ALERTMANAGER, WEBHOOK)
RESULTS = ("success", "failure", "rejected")  # the result label of `deliveries`
KILL = "AgentwatchKill"
KILL_SWITCH = "AgentwatchKillSwitch"
WEBHOOK_SCHEMA = "agentwatch.alerts.v1"
SPOOL_VERSION = 1
ARGV_MAX = 2048  # characters of the command line shown in the description
MEMORY_BYTES = 16 * 1024 * 1024  # alerts (as spooled JSON) kept in memory while unspoolable
_CONTENT_REJECTED = frozenset({400, 413, 422})  # the receiver refuses this body: split it
_NAME_RE = re.compile(r"\d{19}-[0-9a-f-]{36}\.json")

Http = Callable[[str, bytes, float], tuple[int, str]]
"""POSTs a JSON body: (url, body, timeout seconds) -> (status, start of the response body).
Raises OSError (or http.client.HTTPException) when no answer came."""
Log = Callable[..., None]


class VerdictLike(Protocol):
    """What a kill alert is made from (monitor.policy.engine.Verdict has all of it)."""

    @property
    def rule(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def session(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def exe(self) -> str | None: ...
    @property
    def argv(self) -> tuple[str, ...] | None: ...
    @property
    def destination(self) -> str | None: ...


@dataclass(frozen=True)
class Alert:
    """One kill, as spooled and sent. Labels are bounded: never a pid, exe, argv or address."""

    id: str  # stable: the same on every delivery attempt and after a restart
    alertname: str  # KILL or KILL_SWITCH
    agent: str
    rule: str
    action: str
    outcome: str  # what was done, as the verdict log line says it
    reason: str
    starts_at: float  # Unix time of the kill
    instance: str = ""  # "" until Notifier.notify fills in the host's
    mode: str = "enforce"
    session: int = 0
    pid: int = 0
    exe: str | None = None
    argv: tuple[str, ...] | None = None
    destination: str | None = None
    requested_by: str | None = None  # kill switch: who pulled it
    runbook_url: str = ""
    generator_url: str = ""

    def labels(self) -> dict[str, str]:
        return {"alertname": self.alertname, "severity": "critical",
                "agent": self.agent or "unknown", "rule": self.rule or "unknown",
                "action": self.action or "unknown", "instance": self.instance or "unknown"}

    def fingerprint(self) -> str:
        """Hex digest of the label set: alerts Alertmanager treats as one share it."""
        text = "\0".join(f"{k}={v}" for k, v in sorted(self.labels().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self) -> str:
        if self.alertname == KILL_SWITCH:
            who = f" by {self.requested_by}" if self.requested_by else ""
            return f"kill switch used{who}: agent {self.agent} ({self.outcome})"
        if self.action == "kill-agent":
            return f"agentwatch killed agent {self.agent} (session {self.session}): {self.rule}"
        what = printable(os.path.basename(self.exe)) if self.exe else "a process"
        return f"agentwatch killed {what} (pid {self.pid}) of agent {self.agent}: {self.rule}"

    def description(self) -> str:
        """Lines a person reads (amtool, chat, mail): what the agent chose (reason, exe,
        argv) is escaped (monitor.model.safetext), so it can neither act on a terminal nor add
        a line; the webhook's `kill` object has the exact strings."""
        where = [f"agent {self.agent}"]
        where += [f"session {self.session}"] if self.session else []
        where += [f"pid {self.pid}"] if self.pid > 0 else []
        where += [f"on {self.instance}"] if self.instance else []
        lines = [f"{self.outcome}: rule {self.rule}, action {self.action}, "
                 f"{', '.join(where)}", f"reason: {printable(self.reason)}"]
        if self.requested_by:
            lines.append(f"requested by: {self.requested_by}")
        if self.exe:
            lines.append(f"exe: {printable(self.exe)}")
        if self.argv:
            line = printable(shlex.join(self.argv))
            if len(line) > ARGV_MAX:
                line = f"{line[:ARGV_MAX]}... ({len(line) - ARGV_MAX} characters more)"
            lines.append(f"argv: {line}")
        if self.destination:
            lines.append(f"destination: {self.destination}")
        return "\n".join(lines)

    def annotations(self) -> dict[str, str]:
        out = {"summary": self.summary(), "description": self.description()}
        if self.runbook_url:
            out["runbook_url"] = self.runbook_url
        return out

    def to_json(self) -> str:
        return json.dumps({"spool_version": SPOOL_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Alert:
        """The alert a spool file holds; ValueError saying why if it holds none."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("spool_version", None) != SPOOL_VERSION:
            raise ValueError(f"not a version {SPOOL_VERSION} spool record")
        argv = data.get("argv")
        if isinstance(argv, list):
            data["argv"] = tuple(argv)
        try:
            alert = cls(**data)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        for name, want in _FIELD_TYPES.items():
            value = getattr(alert, name)
            if not isinstance(value, want) or isinstance(value, bool):
                raise ValueError(f"field {name!r} has the wrong type")
        if alert.argv is not None and not all(isinstance(a, str) for a in alert.argv):
            raise ValueError("field 'argv' must be a list of strings")
        return alert


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "alertname": str, "agent": str, "rule": str, "action": str, "outcome": str,
    "reason": str, "starts_at": (int, float), "instance": str, "mode": str, "session": int,
    "pid": int, "exe": (str, type(None)), "argv": (tuple, type(None)),
    "destination": (str, type(None)), "requested_by": (str, type(None)), "runbook_url": str,
    "generator_url": str,
}


def _clean(text: str | None) -> str | None:
    """Text that encodes as UTF-8 (argv bytes decoded with surrogateescape do not)."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def kill_alert(*, agent: str, rule: str, action: str, outcome: str, reason: str, at: float,
               session: int = 0, pid: int = 0, exe: str | None = None,
               argv: Sequence[str] | None = None, destination: str | None = None,
               mode: str = "enforce", instance: str = "", alert_id: str | None = None,
               ) -> Alert:
    """The alert for one kill by a rule (action kill or kill-agent); `at` is Unix time."""
    return Alert(id=alert_id or str(uuid.uuid4()), alertname=KILL, agent=agent, rule=rule,
                 action=str(action), outcome=outcome, reason=_clean(reason) or "",
                 starts_at=float(at), instance=instance, mode=str(mode), session=session,
                 pid=pid, exe=_clean(exe),
                 argv=None if argv is None else tuple(_clean(a) or "" for a in argv),
                 destination=destination)


def kill_switch_alert(*, agent: str, outcome: str, reason: str, at: float,
                      requested_by: str = "", session: int = 0, pid: int = 0,
                      action: str = "kill-agent", instance: str = "",
                      alert_id: str | None = None) -> Alert:
    """The alert for a manual kill switch use (rule label "kill-switch")."""
    return Alert(id=alert_id or str(uuid.uuid4()), alertname=KILL_SWITCH, agent=agent,
                 rule="kill-switch", action=action, outcome=outcome,
                 reason=_clean(reason) or "", starts_at=float(at), instance=instance,
                 session=session, pid=pid, requested_by=requested_by or None)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def ends_at(last_start: float, resolve_after: float, now: float) -> float:
    """startsAt + resolve_after; but an alert sent so late that it would (nearly) arrive
    resolved gets now + resolve_after, so Alertmanager still notifies about the kill."""
    end = last_start + resolve_after
    return end if end - now >= resolve_after / 2 else now + resolve_after


def alertmanager_payload(alerts: Sequence[Alert], resolve_after: float,
                         now: float) -> list[dict[str, Any]]:
    """Alertmanager v2 postable alerts: one per label set, in order of first appearance.
    Alerts sharing labels become one: earliest startsAt, the newest's annotations, and a
    description that says how many kills it stands for."""
    groups: dict[str, list[Alert]] = {}
    for a in alerts:
        groups.setdefault(a.fingerprint(), []).append(a)
    out = []
    for group in groups.values():
        group.sort(key=lambda a: a.starts_at)
        last = group[-1]
        annotations = last.annotations()
        if len(group) > 1:
            annotations["description"] = (
                f"{len(group)} kills with these labels from {rfc3339(group[0].starts_at)} "
                f"to {rfc3339(last.starts_at)}; the last:\n{annotations['description']}")
        item: dict[str, Any] = {
            "labels": last.labels(), "annotations": annotations,
            "startsAt": rfc3339(group[0].starts_at),
            "endsAt": rfc3339(ends_at(last.starts_at, resolve_after, now))}
        if last.generator_url:
            item["generatorURL"] = last.generator_url
        out.append(item)
    return out


def webhook_payload(alerts: Sequence[Alert], resolve_after: float,
                    now: float) -> dict[str, Any]:
    """The webhook body (docs/alerts.md): every alert, each with its stable id."""
    items = []
    for a in alerts:
        item: dict[str, Any] = {
            "id": a.id, "fingerprint": a.fingerprint(), "status": "firing",
            "labels": a.labels(), "annotations": a.annotations(),
            "startsAt": rfc3339(a.starts_at),
            "endsAt": rfc3339(ends_at(a.starts_at, resolve_after, now)),
            "generatorURL": a.generator_url or None,
            "kill": {"kind": "kill-switch" if a.alertname == KILL_SWITCH else "rule",
                     "agent": a.agent, "rule": a.rule, "action": a.action,
                     "outcome": a.outcome, "mode": a.mode, "session": a.session,
                     "pid": a.pid, "exe": a.exe,
                     "argv": list(a.argv) if a.argv is not None else None,
                     "destination": a.destination, "reason": a.reason,
                     "requested_by": a.requested_by}}
        items.append(item)
    return {"schema": WEBHOOK_SCHEMA, "sentAt": rfc3339(now), "alerts": items}


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


def _std_log(msg: str, level: str = "info", **fields: Any) -> None:
    logging.getLogger("agentwatch.alerts").log(
        getattr(logging, level.upper(), logging.INFO), "%s %s", msg,
        json.dumps(fields, default=str))


@dataclass(eq=False)
class _Lane:
    """One receiver's delivery state."""

    name: str
    url: str
    pending: dict[str, Alert]  # spool file name -> alert, oldest first
    limit: int  # alerts (Alertmanager: label sets) per request; halved on a 400
    failures: int = 0  # consecutive failed requests
    next_try: float = 0.0  # time.monotonic() of the next request
    thread: threading.Thread | None = None


class Notifier:
    """Spools kill alerts and delivers them in the background; see the module docstring.

    Spool layout: ``queue/<ns>-<id>.json`` (one file per alert not yet taken by every
    receiver), ``sent/<receiver>/<name>`` (taken by that receiver; only while another has
    not), ``corrupt/`` (files that held no alert, moved aside).
    """

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
        self.spool = Path(config.spool_dir)
        self.queue = self.spool / "queue"
        urls = config.receivers
        if ALERTMANAGER in urls:
            urls[ALERTMANAGER] = urls[ALERTMANAGER].rstrip("/") + "/api/v2/alerts"
        self._lanes = [_Lane(name, url, {}, batch_size) for name, url in urls.items()]
        self.deliveries: Counter[tuple[str, str]] = Counter(
            {(lane.name, r): 0 for lane in self._lanes for r in RESULTS})
        self.corrupt = 0  # spool files moved aside
        self.memory_bytes = memory_bytes
        self._unspooled: dict[str, int] = {}  # spool name -> JSON size: in memory only
        self._unspooled_bytes = 0
        self._spool_failing = False  # a spell of spool writes failing is under way
        self._drop_logged = False  # this spell's first drop was logged
        self._spooler: threading.Thread | None = None
        self.dropped = 0  # alerts lost: memory bound reached (or unspooled at close)
        self.write_errors = 0  # spool writes that failed
        self._cond = threading.Condition()
        self._stopping = False
        self._started = False
        self._dirs_ready = False

    @property
    def enabled(self) -> bool:
        return bool(self._lanes)

    @property
    def receivers(self) -> tuple[str, ...]:
        return tuple(lane.name for lane in self._lanes)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the spool, read what a previous run left in it, start delivering.
        Raises EnvironmentProblem if the spool directory cannot be made or read, or if
        another user could write to it."""
        if not self.enabled or self._started:
            return
        try:
            self._make_dirs()
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot create the alert spool {self.spool}: {exc.strerror or exc}; set "
                "alerts.spool_dir to a writable directory") from exc
        for d in (self.spool, self.queue):
            st = d.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise EnvironmentProblem(
                    f"the alert spool {d} is not owned by this user or is writable by "
                    "others, who could then forge or remove alerts: chown it and "
                    "chmod go-w it, or set alerts.spool_dir")
        try:
            self._load()
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot read the alert spool {self.spool}: {exc.strerror or exc} "
                f"({exc.filename}); fix its permissions or set alerts.spool_dir") from exc
        with self._cond:
            self._started, self._stopping = True, False
            if self._unspooled:
                self._start_spooler()
            for lane in self._lanes:
                if lane.thread is None:  # else: still in a request since close(); it goes on
                    lane.thread = threading.Thread(target=self._deliver, args=(lane,),
                                                   name=f"agentwatch-alerts-{lane.name}",
                                                   daemon=True)
                    lane.thread.start()
        self.log("alert delivery started", receivers=list(self.receivers),
                 spooled=self.spooled(), spool_dir=str(self.spool), instance=self.instance)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the delivery threads (a request under way may finish); what is still
        pending stays on disk for the next start. notify() still spools after this."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in [lane.thread for lane in self._lanes] + [self._spooler]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._started = False
        self._respool()  # a last try: what stays unspooled is lost when the monitor stops
        with self._cond:
            lost = list(self._unspooled)
            self._forget(lost)
            self.dropped += len(lost)
        if lost:
            self.log("alerts lost: the spool was still unwritable when alert delivery "
                     "stopped", level="error", alerts=len(lost), spool_dir=str(self.spool))

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

    # --- alerts in ---------------------------------------------------------------------

    def notify(self, alert: Alert) -> Alert | None:
        """Spool alert for every receiver and return at once (the network is never waited
        on); returns the alert as spooled, or None when no receiver is configured."""
        if not self.enabled:
            return None
        alert = replace(alert, instance=alert.instance or self.instance,
                        runbook_url=alert.runbook_url or self.config.runbook_url,
                        generator_url=alert.generator_url or self.generator_url)
        name = f"{round(alert.starts_at * 1e9):019d}-{alert.id}.json"
        data = alert.to_json().encode()
        error: OSError | None = None
        if not self._unspooled:  # else the disk failed already: the spooler retries it
            try:
                self._write(name, data)
            except OSError as exc:
                error = exc
        with self._cond:
            for lane in self._lanes:
                lane.pending[name] = alert
            spell = dropped = 0
            if error is not None or self._unspooled:
                spell, dropped = self._keep_in_memory(name, len(data), error)
            self._cond.notify_all()
        if spell:
            self.log("alert not spooled: the spool is unwritable; alerts are delivered from "
                     "memory and written to the spool when it can be written again",
                     level="error", alert=alert.id, spool_dir=str(self.spool),
                     reason=error.strerror or str(error) if error else None,
                     memory_bytes=self.memory_bytes)
        if dropped:
            self.log("alerts dropped: the spool is unwritable and the alerts kept in memory "
                     "reached their bound; the oldest are dropped", level="error",
                     dropped=dropped, spool_dir=str(self.spool),
                     memory_bytes=self.memory_bytes)
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
        names: set[str] = set()
        for lane in self._lanes:
            if receiver is None or lane.name == receiver:
                names.update(lane.pending)
        return len(names)

    def sink_stats(self) -> SinkStats:
        """Alerts kept in memory only (the spool could not be written), alerts dropped,
        failed spool writes (exported as agentwatch_sink_* {sink="alert_spool"})."""
        with self._cond:
            return SinkStats(len(self._unspooled), self.dropped, self.write_errors)

    # --- alerts the spool could not take ------------------------------------------------

    def _keep_in_memory(self, name: str, size: int, error: OSError | None) -> tuple[int, int]:
        """(lock held) Note an alert that is not on disk; drop the oldest such alerts
        beyond memory_bytes. Returns (1 if a spell of failures starts, alerts dropped if
        this is the spell's first drop, else 0): what to log."""
        spell = 0
        if error is not None:
            self.write_errors += 1
            spell = 0 if self._spool_failing else 1
            self._spool_failing = True
        self._unspooled[name] = size
        self._unspooled_bytes += size
        victims: list[str] = []
        over = self._unspooled_bytes - self.memory_bytes
        for old in self._unspooled:  # oldest first; the new one last
            if over <= 0:
                break
            victims.append(old)
            over -= self._unspooled[old]
        self._forget(victims)
        self.dropped += len(victims)
        if self._started:
            self._start_spooler()
        if not victims or self._drop_logged:
            return spell, 0
        self._drop_logged = True  # once per spell: a flood must not flood the log too
        return spell, len(victims)

    def _forget(self, names: Sequence[str]) -> None:
        """(lock held) Unspooled alerts that will never be delivered."""
        for name in names:
            self._unspooled_bytes -= self._unspooled.pop(name, 0)
            for lane in self._lanes:
                lane.pending.pop(name, None)
        if names:
            self._cond.notify_all()

    def _start_spooler(self) -> None:
        """(lock held)"""
        if self._spooler is None and self._unspooled and not self._stopping:
            self._spooler = threading.Thread(target=self._spool_retry, daemon=True,
                                             name="agentwatch-alerts-spool")
            self._spooler.start()

    def _spool_retry(self) -> None:
        """Write the alerts kept in memory to the spool, oldest first, retrying with a
        capped back-off until the disk takes them all (or close())."""
        attempts = 0
        while True:
            with self._cond:
                delay = min(self.retry_max, self.retry_initial * 2 ** attempts)
                deadline = time.monotonic() + delay
                while not self._stopping and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._stopping:
                    self._spooler = None
                    return
            attempts += 1
            if self._respool():
                with self._cond:
                    if self._unspooled:
                        continue  # notify() added one meanwhile
                    self._spooler = None
                    self._spool_failing = self._drop_logged = False
                    dropped = self.dropped
                self.log("alert spool writable again: the alerts kept in memory are spooled",
                         spool_dir=str(self.spool), attempts=attempts, dropped_total=dropped)
                return

    def _respool(self) -> bool:
        """Write unspooled alerts to the spool, oldest first; False at the first failure."""
        while True:
            with self._cond:
                name = next(iter(self._unspooled), None)
                if name is None:
                    return True
                alert = next((lane.pending[name] for lane in self._lanes
                              if name in lane.pending), None)
                if alert is None:  # delivered meanwhile
                    self._unspooled_bytes -= self._unspooled.pop(name)
                    continue
            try:
                self._write(name, alert.to_json().encode())
            except OSError:
                with self._cond:
                    self.write_errors += 1
                return False
            with self._cond:
                taken = name not in self._unspooled  # every receiver took it meanwhile
                if not taken:
                    self._unspooled_bytes -= self._unspooled.pop(name)
            if taken:
                self._remove(name)

    # --- the spool ---------------------------------------------------------------------

    def _make_dirs(self) -> None:
        if not self._dirs_ready:
            self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.queue, self.spool / "sent",
                      *(self.spool / "sent" / n for n in self.receivers)):
                d.mkdir(mode=0o700, exist_ok=True)
            self._dirs_ready = True

    def _write(self, name: str, data: bytes) -> None:
        self._make_dirs()
        tmp = self.queue / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.queue / name)
        except OSError:
            tmp.unlink(missing_ok=True)  # a cut-short file would take space and look corrupt
            raise
        _fsync_dir(self.queue)

    def _load(self) -> None:
        """Read the spool a previous run left: recover complete temp files, move corrupt
        files aside, drop sent markers of alerts that are gone."""
        found: dict[str, Alert] = {}
        for path in sorted(self.queue.iterdir()):
            name = path.name
            final = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name
            if not _NAME_RE.fullmatch(final):
                self._move_aside(path, "not a spool file name")
                continue
            alert = self._read(path)
            if alert is None:
                continue
            if final != name:  # notify() was interrupted after writing it whole
                os.rename(path, self.queue / final)
                self.log("alert recovered from an interrupted spool write",
                         level="warning", alert=alert.id)
            found[final] = alert
        with self._cond:
            for lane in self._lanes:
                sent = self.spool / "sent" / lane.name
                done = {p.name for p in sent.iterdir()}
                for marker in done - found.keys():
                    (sent / marker).unlink(missing_ok=True)
                merged = {**{n: a for n, a in found.items() if n not in done}, **lane.pending}
                lane.pending = dict(sorted(merged.items()))
            gone = [n for n in found if not any(n in lane.pending for lane in self._lanes)]
        for name in gone:  # every receiver took it before the last stop
            self._remove(name)

    def _read(self, path: Path) -> Alert | None:
        try:
            return Alert.from_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            self.log("spool file unreadable; left in place", level="error", path=str(path),
                     reason=exc.strerror or str(exc))
            return None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            self._move_aside(path, str(exc))
            return None

    def _move_aside(self, path: Path, reason: str) -> None:
        corrupt = self.spool / "corrupt"
        corrupt.mkdir(mode=0o700, exist_ok=True)
        target = corrupt / path.name
        os.rename(path, target)
        self.corrupt += 1
        self.log("corrupt alert spool file moved aside", level="error", path=str(path),
                 moved_to=str(target), reason=reason)

    def _mark(self, receiver: str, name: str) -> None:
        try:
            path = self.spool / "sent" / receiver / name
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            self.log("could not note a delivered alert in the spool: after a restart it is "
                     "sent to this receiver again", level="warning", receiver=receiver,
                     spool_file=name, reason=exc.strerror or str(exc))

    def _remove(self, name: str) -> None:
        """Delete a spooled alert every receiver has (and its sent markers)."""
        paths = [self.queue / name, *(self.spool / "sent" / r / name for r in self.receivers)]
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # a marker never written, or a spool write that had failed
            except OSError as exc:
                self.log("could not delete a delivered alert from the spool: after a "
                         "restart it is sent again", level="warning", path=str(path),
                         reason=exc.strerror or str(exc))

    # --- delivery ----------------------------------------------------------------------

    def _deliver(self, lane: _Lane) -> None:
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
                batch = self._batch(lane)
            self._send(lane, batch)

    def _batch(self, lane: _Lane) -> list[tuple[str, Alert]]:
        if lane.name != ALERTMANAGER:
            return list(lane.pending.items())[:lane.limit]
        groups: dict[str, list[tuple[str, Alert]]] = {}
        for name, alert in lane.pending.items():
            key = alert.fingerprint()
            if key in groups or len(groups) < lane.limit:
                groups.setdefault(key, []).append((name, alert))
        return [item for group in groups.values() for item in group]

    def _send(self, lane: _Lane, batch: list[tuple[str, Alert]]) -> None:
        alerts = [a for _, a in batch]
        now = self.clock()
        resolve = self.config.resolve_after_seconds
        payload: Any = (alertmanager_payload(alerts, resolve, now) if lane.name == ALERTMANAGER
                        else webhook_payload(alerts, resolve, now))
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            status, answer = self.http(lane.url, body, self.config.timeout_seconds)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: bad URL
            status, answer = 0, f"{type(exc).__name__}: {exc}"
        names = [n for n, _ in batch]
        payload_items = payload if isinstance(payload, list) else payload["alerts"]
        if 200 <= status < 300:
            self._taken(lane, names, "success")
        elif status in _CONTENT_REJECTED and len(payload_items) == 1:
            self.log("receiver refused an alert; it is not sent there again", level="error",
                     receiver=lane.name, status=status, answer=answer,
                     alerts=[a.to_json() for a in alerts])
            self._taken(lane, names, "rejected")
        elif status in _CONTENT_REJECTED:  # find the alert it refuses: halve the batch
            with self._cond:
                self.deliveries[(lane.name, "rejected")] += 1
                lane.limit = max(1, min(lane.limit, len(payload_items)) // 2)
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
                         status=status or None, answer=answer, spooled=spooled)

    def _taken(self, lane: _Lane, names: list[str], result: str) -> None:
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
            for name in done:  # delivered everywhere: it need not reach the spool any more
                self._unspooled_bytes -= self._unspooled.pop(name, 0)
            self._cond.notify_all()
            spooled = len(lane.pending)
        for name in mark:
            self._mark(lane.name, name)
        for name in done:
            self._remove(name)
        if recovered:
            self.log("alert receiver back; spooled alerts delivered", receiver=lane.name,
                     failed_attempts=recovered, spooled=spooled)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
