"""Replay a recording (`agentwatch trace --record`, JSON lines) against a policy: what would
have been killed, and why, before the policy is deployed.

Pure: records in, verdicts out, through the same engine functions the live monitor uses.
CPU rules need the monitor's per-tick samples, which a recording does not hold: they are
not replayed (the CLI says so). Never touches the kernel or a process.
"""

from __future__ import annotations

import json
import os.path
from collections.abc import Iterable, Iterator
from typing import Any

from monitor.model.cmdline import comm_of
from monitor.model.errors import ConfigError, Location
from monitor.policy.engine import Verdict, evaluate_connect, evaluate_exec, evaluate_processes
from monitor.policy.identity import SHA256_RE
from monitor.policy.types import Policy

_REQUIRED = {
    "exec": ("filename", "argv"),
    "connect": ("address", "port", "family"),
    "fork": ("child_pid",),
    "exit": (),
    "verdict": (),
}


def read_recording(path: str) -> Iterator[dict[str, Any]]:
    """Records of a recording, checked: a malformed line is a ConfigError naming it."""
    try:
        f = open(path, "rb")  # noqa: SIM115 — closed by the generator below
    except OSError as e:
        raise ConfigError([(Location(path), f"cannot read the recording: {e.strerror}")]
                          ) from None
    with f:
        for n, raw in enumerate(f, 1):
            def bad(reason: str, n: int = n) -> ConfigError:
                return ConfigError([(Location(path, n), reason)])

            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise bad("not UTF-8 text: a recording is JSON lines from "
                          "`agentwatch trace --record`") from None
            if not line.strip() or line.startswith("#"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"not a JSON event record: {e.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
                raise bad("not an agentwatch event record (expected an object with an "
                          "'event' key)")
            kind = rec["event"]
            if kind not in _REQUIRED:
                raise bad(f"unknown event {kind!r} (known: {', '.join(_REQUIRED)})")
            missing = [k for k in ("pid", "session", *_REQUIRED[kind]) if k not in rec]
            if missing:
                raise bad(f"{kind} record lacks {', '.join(missing)}")
            if not isinstance(rec["pid"], int) or not isinstance(rec["session"], int):
                raise bad("pid and session must be integers")
            yield rec


def replay(policy: Policy, records: Iterable[dict[str, Any]]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    live: dict[int, set[int]] = {}
    once: set[tuple[str, int]] = set()
    for rec in records:
        agent, session, pid = rec.get("agent"), int(rec.get("session") or 0), int(rec["pid"])
        if not agent or not session:
            continue
        kind = rec["event"]
        members = live.setdefault(session, set())
        if kind == "exec":
            members.add(pid)
            exe, loader = str(rec.get("filename", "")), rec.get("loader")
            # a program run through a loader: named as the live judge names it
            comm = comm_of(os.path.basename(exe)) if loader else str(rec.get("comm", ""))
            verdicts += evaluate_exec(policy, agent=agent, session=session, pid=pid,
                                      exe=exe, comm=comm,
                                      argv=[str(a) for a in rec.get("argv") or []],
                                      fileless="fileless" in (rec.get("flags") or ())
                                      or bool(rec.get("fileless")),
                                      loader=str(loader) if loader else None,
                                      sha256=_digest(rec.get("sha256")))
        elif kind == "connect":
            verdicts += evaluate_connect(policy, agent=agent, session=session, pid=pid,
                                         family=2 if rec.get("family") == "ipv4" else 10,
                                         address=str(rec["address"]), port=int(rec["port"]),
                                         send=rec.get("send") is True)
        elif kind == "fork":
            members.update((pid, int(rec["child_pid"])))
            for v in evaluate_processes(policy, agent=agent, session=session,
                                        live=len(members), pid=pid):
                key = (v.rule, v.session)  # once per session, as the live monitor does
                if key not in once:
                    once.add(key)
                    verdicts.append(v)
        elif kind == "exit":
            members.discard(pid)
    return verdicts


def _digest(value: object) -> str | None:
    """A recorded exec's sha256 (sha256 rules replay on it; what a copy of a host binary
    is needs the host, which a recording does not carry)."""
    return value.lower() if isinstance(value, str) and SHA256_RE.fullmatch(value) else None
