"""How events look to people and to programs: JSON records and execsnoop-style columns.

Pure formatting: takes typed events plus the agent name, returns text or dicts. It never
reads /proc, never writes anywhere by itself, and never puts agent text in a column line
unescaped (monitor.model.safetext): the JSON form escapes controls itself (json.dumps with
ensure_ascii, also for the lone surrogates of undecodable argv bytes).
"""

from __future__ import annotations

import json
from typing import Any

from monitor.model.events import ConnectEvent, Event, ExecEvent, ExecFlag, ForkEvent, VerdictEvent
from monitor.model.records import (
    ConnectRecord,
    EventRecord,
    ExecRecord,
    ExitRecord,
    ForkRecord,
    KernelVerdictRecord,
)
from monitor.model.safetext import printable


def describe_status(status: int) -> str:
    if status < 0:
        return "unknown"
    if status & 0x7F:
        return f"signal {status & 0x7F}"
    return f"exit {(status >> 8) & 0xFF}"


def typed_record(ev: Event, agent: str) -> EventRecord:
    """The record of one event (monitor.model.records), as the stream and files carry it."""
    h = ev.h
    head: dict[str, Any] = {"ts_ns": h.ts_ns, "agent": agent or None, "session": h.session,
                            "pid": h.pid, "tid": h.tid, "uid": h.uid, "comm": h.comm}
    if isinstance(ev, ExecEvent):
        return ExecRecord(**head, filename=ev.filename, argv=tuple(ev.argv), ppid=ev.ppid,
                          argv_truncated=ev.argv_truncated,
                          flags=tuple(f.name.lower() for f in ExecFlag
                                      if ev.flags & f and f.name), loader=ev.loader,
                          sha256=ev.sha256, fileless=ev.is_fileless)
    if isinstance(ev, ConnectEvent):
        return ConnectRecord(**head, family="ipv4" if ev.family == 2 else "ipv6",
                             address=ev.address, port=ev.port, protocol=ev.transport,
                             send=ev.send)
    if isinstance(ev, ForkEvent):
        return ForkRecord(**head, child_pid=ev.child_pid)
    if isinstance(ev, VerdictEvent):
        return KernelVerdictRecord(
            **head, rule=ev.rule, rules_mask=ev.mask, verdict=ev.verdict.name.lower(),
            action=ev.action.name.lower() if ev.action else None, enforced=ev.enforced,
            address=ev.address or None, port=ev.port or None, file=ev.file or None)
    return ExitRecord(**head, exit_status=ev.exit_status, exit_code=ev.exit_code,
                      signal=ev.signal, ppid=ev.ppid, cpu_ns=ev.cpu_ns)


def record(ev: Event, agent: str) -> dict[str, Any]:
    """A flat JSON-ready dict of one event (the `trace --json` and `--record` format)."""
    return typed_record(ev, agent).to_json()


def to_json(ev: Event, agent: str) -> str:
    return json.dumps(record(ev, agent), separators=(",", ":"))


HEADER = f"{'TIME(s)':>12} {'AGENT':<14} {'EVENT':<7} {'PID':>7} {'COMM':<16} DETAIL"


def _quote(arg: str) -> str:
    """An argument as a shell reader expects it: bare when plain, else in single quotes,
    with anything a terminal would act on escaped (monitor.model.safetext)."""
    if arg and all(c.isalnum() or c in "-_./=:,@%+" for c in arg):
        return arg
    return "'" + printable(arg).replace("'", "\\'") + "'"


def columns(ev: Event, agent: str) -> str:
    """One human-readable line per event."""
    return columns_of(record(ev, agent))


def columns_of(rec: dict[str, Any]) -> str:
    """The column line of a record (as `record()` makes it, or as a monitor streams it).

    Every field an agent could have chosen (comm, path, argv, reason, ...) goes through
    monitor.model.safetext.printable: the line holds no control character, however hostile the
    record, and one event is always exactly one line."""
    def p(key: str) -> str:
        return printable(str(rec.get(key)))

    kind = str(rec.get("event", ""))
    if kind == "exec":
        argv = [str(a) for a in rec.get("argv") or []]
        detail = f"{p('filename')} " + " ".join(_quote(a) for a in argv[1:])
        if rec.get("loader"):
            detail += f" [via {p('loader')}]"
        if rec.get("argv_truncated"):
            detail += " [argv truncated]"
        if "new_root" in (rec.get("flags") or []):
            detail += " [new agent root]"
        if "fileless" in (rec.get("flags") or []):
            detail += " [fileless]"
    elif kind == "connect":
        host = f"[{p('address')}]" if rec.get("family") == "ipv6" else p("address")
        detail = f"{host}:{p('port')} {printable(str(rec.get('protocol') or ''))}"
        if rec.get("send") is True:
            detail += " datagram"
    elif kind == "fork":
        detail = f"child {p('child_pid')}"
    elif kind == "policy_verdict":
        detail = f"rule {p('rule')}: {p('action')} -> {p('outcome')} ({p('reason')})"
    elif kind == "verdict":
        detail = f"kernel rule #{p('rule')} matched"
    else:
        detail = (f"{describe_status(int(rec.get('exit_status', -1)))} "
                  f"cpu {int(rec.get('cpu_ns') or 0) / 1e9:.3f}s")
    agent = printable(str(rec.get("agent") or "-"))
    comm = printable(str(rec.get("comm", "")))
    return (f"{int(rec.get('ts_ns') or 0) / 1e9:12.6f} {agent[:14]:<14} "
            f"{printable(kind):<7} {int(rec.get('pid') or 0):>7} {comm:<16} "
            f"{detail.rstrip()}")
