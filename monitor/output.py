"""How events look to people and to programs: JSON records and execsnoop-style columns.

Pure formatting: takes typed events plus the agent name, returns text or dicts. It never
reads /proc, never writes anywhere by itself.
"""

from __future__ import annotations

import json
from typing import Any

from monitor.events import ConnectEvent, Event, ExecEvent, ExecFlag, ExitEvent, ForkEvent

_ERRNO_NAMES = {
    -1: "EPERM", -13: "EACCES", -101: "ENETUNREACH", -104: "ECONNRESET", -110: "ETIMEDOUT",
    -111: "ECONNREFUSED", -113: "EHOSTUNREACH", -115: "EINPROGRESS", -99: "EADDRNOTAVAIL",
}


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
                   flags=[f.name.lower() for f in ExecFlag if f in ev.flags and f.name])
    elif isinstance(ev, ConnectEvent):
        out.update(family="ipv4" if ev.family == 2 else "ipv6", address=ev.address,
                   port=ev.port, result=ev.ret, latency_ns=ev.latency_ns)
    elif isinstance(ev, ForkEvent):
        out.update(child_pid=ev.child_pid)
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
    h = ev.h
    if isinstance(ev, ExecEvent):
        detail = f"{ev.filename} " + " ".join(_quote(a) for a in ev.argv[1:])
        if ev.argv_truncated:
            detail += " [argv truncated]"
        if ev.flags & ExecFlag.NEW_ROOT:
            detail += " [new agent root]"
    elif isinstance(ev, ConnectEvent):
        host = f"[{ev.address}]" if ev.family == 10 else ev.address
        result = "ok" if ev.ret == 0 else _ERRNO_NAMES.get(ev.ret, str(ev.ret))
        detail = f"{host}:{ev.port} {result}"
    elif isinstance(ev, ForkEvent):
        detail = f"child {ev.child_pid}"
    else:
        detail = f"{describe_status(ev.exit_status)} cpu {ev.cpu_ns / 1e9:.3f}s"
    return (f"{h.ts_ns / 1e9:12.6f} {(agent or '-')[:14]:<14} {ev.kind.name.lower():<7} "
            f"{h.pid:>7} {h.comm[:16]:<16} {detail.rstrip()}")
