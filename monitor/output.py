"""How events look to people and to programs: JSON records and execsnoop-style columns.

Pure formatting: takes typed events plus the agent name, returns text or dicts. It never
reads /proc, never writes anywhere by itself.
"""

from __future__ import annotations

import json
from typing import Any

from monitor.events import (
    ConnectEvent,
    Event,
    ExecEvent,
    ExecFlag,
    ExitEvent,
    ForkEvent,
    VerdictEvent,
)


def describe_status(status: int) -> str:
    if status < 0:
        return "unknown"
    if status & 0x7F:
        return f"signal {status & 0x7F}"
    return f"exit {(status >> 8) & 0xFF}"


def record(ev: Event, agent: str) -> dict[str, Any]:
    """A flat JSON-ready dict of one event (the `trace --json` and `--record` format)."""
    h = ev.h
    out: dict[str, Any] = {
        "ts_ns": h.ts_ns, "event": ev.kind.name.lower(), "agent": agent or None,
        "session": h.session, "pid": h.pid, "tid": h.tid, "uid": h.uid, "comm": h.comm,
    }
    if isinstance(ev, ExecEvent):
        out.update(filename=ev.filename, argv=list(ev.argv), ppid=ev.ppid,
                   argv_truncated=ev.argv_truncated,
                   flags=[f.name.lower() for f in ExecFlag if ev.flags & f and f.name])
    elif isinstance(ev, ConnectEvent):
        out.update(family="ipv4" if ev.family == 2 else "ipv6", address=ev.address,
                   port=ev.port, protocol=ev.transport)
    elif isinstance(ev, ForkEvent):
        out.update(child_pid=ev.child_pid)
    elif isinstance(ev, VerdictEvent):
        out.update(rule=ev.rule, rules_mask=ev.mask, verdict=ev.verdict.name.lower(),
                   action=ev.action.name.lower() if ev.action else None,
                   enforced=ev.enforced, address=ev.address or None, port=ev.port or None)
    elif isinstance(ev, ExitEvent):
        out.update(exit_status=ev.exit_status, exit_code=ev.exit_code, signal=ev.signal,
                   ppid=ev.ppid, cpu_ns=ev.cpu_ns)
    return out


def to_json(ev: Event, agent: str) -> str:
    return json.dumps(record(ev, agent), separators=(",", ":"))


HEADER = f"{'TIME(s)':>12} {'AGENT':<14} {'EVENT':<7} {'PID':>7} {'COMM':<16} DETAIL"


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./=:,@%+" for c in arg) else repr(arg)


def columns(ev: Event, agent: str) -> str:
    """One human-readable line per event."""
    return columns_of(record(ev, agent))


def columns_of(rec: dict[str, Any]) -> str:
    """The column line of a record (as `record()` makes it, or as a monitor streams it)."""
    kind = str(rec.get("event", ""))
    if kind == "exec":
        argv = [str(a) for a in rec.get("argv") or []]
        detail = f"{rec.get('filename')} " + " ".join(_quote(a) for a in argv[1:])
        if rec.get("argv_truncated"):
            detail += " [argv truncated]"
        if "new_root" in (rec.get("flags") or []):
            detail += " [new agent root]"
    elif kind == "connect":
        host = f"[{rec.get('address')}]" if rec.get("family") == "ipv6" else rec.get("address")
        detail = f"{host}:{rec.get('port')} {rec.get('protocol') or ''}"
    elif kind == "fork":
        detail = f"child {rec.get('child_pid')}"
    elif kind == "policy_verdict":
        detail = (f"rule {rec.get('rule')}: {rec.get('action')} -> {rec.get('outcome')} "
                  f"({rec.get('reason')})")
    elif kind == "verdict":
        detail = f"kernel rule #{rec.get('rule')} matched"
    else:
        detail = (f"{describe_status(int(rec.get('exit_status', -1)))} "
                  f"cpu {int(rec.get('cpu_ns') or 0) / 1e9:.3f}s")
    agent = str(rec.get("agent") or "-")
    return (f"{int(rec.get('ts_ns') or 0) / 1e9:12.6f} {agent[:14]:<14} {kind:<7} "
            f"{int(rec.get('pid') or 0):>7} {str(rec.get('comm', ''))[:16]:<16} "
            f"{detail.rstrip()}")
