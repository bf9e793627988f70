"""Kill alerts as data: the Alert one kill or kill switch use becomes, and the bodies that
carry alerts to Alertmanager (v2 postable alerts) and to a webhook (docs/alerts.md).

Labels are bounded (never a pid, exe, argv or address); what an agent chose (reason, exe,
argv) is escaped wherever a person reads it (monitor.model.safetext) and kept exact in the
webhook's `kill` object. Alerts with identical label sets reach Alertmanager as one alert
(it would merge them anyway); the webhook gets every alert, each with its stable id, so a
receiver can drop a repeat. Spooling is monitor/observe/alertspool.py, delivery
monitor/observe/delivery.py and monitor/observe/notifier.py. Pure: no I/O, no threads, no
work on import, never decides policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from monitor.model.safetext import printable

ALERTMANAGER = "alertmanager"
WEBHOOK = "webhook"
RECEIVERS = (ALERTMANAGER, WEBHOOK)
KILL = "AgentwatchKill"
KILL_SWITCH = "AgentwatchKillSwitch"
WEBHOOK_SCHEMA = "agentwatch.alerts.v1"
SPOOL_VERSION = 1
ARGV_MAX = 2048  # characters of the command line shown in the description


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
