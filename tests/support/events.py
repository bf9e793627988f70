"""Builders of the events the tests feed the monitor, written once: typed events
(monitor.model.events' Header, ExecEvent, ForkEvent, ConnectEvent, ExitEvent) as the
decoder returns them, and raw ring-buffer records as the probes write them (CHeader and the
C event structs, bytes ready for `decode`).

Every value not given has a fixed default, so a test names only what it is about. Builds
values only: never decodes, judges or touches the kernel.
"""

from __future__ import annotations

import ctypes as ct

from monitor.kernel import abi
from monitor.model import cmdline
from monitor.model import events as ev
from monitor.model.events import ExecFlag, Header

S1 = ev.SESSION_KERNEL_BIT | 1  # two sessions the kernel started (agents 0 and 1 by default)
S2 = ev.SESSION_KERNEL_BIT | 2
NO_FLAGS = ExecFlag(0)


# --- typed events, as the decoder returns them -------------------------------------------


def header(pid: int, ts: int, *, comm: str = "claude", session: int = S1, agent: int = 0,
           uid: int = 1000, tid: int | None = None) -> Header:
    """The common part of an event of thread `tid` (default: the main thread, pid)."""
    return Header(ts_ns=ts, pid=pid, tid=pid if tid is None else tid, session=session,
                  agent=agent, uid=uid, comm=comm)


def exec_event(pid: int, ts: int, argv: str | tuple[str, ...], *, exe: str | None = None,
               comm: str | None = None, ppid: int = 0, flags: int = NO_FLAGS,
               session: int = S1, agent: int = 0, cgroup_id: int = 1,
               old_tid: int | None = None, h: Header | None = None) -> ev.ExecEvent:
    """An exec of `argv` (a tuple, or a command line split on spaces); by default the comm
    is the program's name as the kernel keeps it and the file is /usr/bin/NAME. `h`, when
    given, is the header as is (pid, ts, comm, session and agent are then not used)."""
    args = tuple(argv.split()) if isinstance(argv, str) else argv
    name = args[0].rsplit("/", 1)[-1] if args else ""
    if h is None:
        h = header(pid, ts, comm=cmdline.comm_of(name) if comm is None else comm,
                   session=session, agent=agent)
    return ev.ExecEvent(h, old_tid=h.pid if old_tid is None else old_tid, ppid=ppid,
                     cgroup_id=cgroup_id, flags=flags, filename=exe or f"/usr/bin/{name}",
                     argv=args)


def fork_event(pid: int, child: int, ts: int, *, comm: str = "bash", session: int = S1,
               agent: int = 0) -> ev.ForkEvent:
    return ev.ForkEvent(header(pid, ts, comm=comm, session=session, agent=agent),
                     child_pid=child)


def connect_event(pid: int, ts: int, address: str, port: int = 443, *, protocol: int = 6,
                  family: ev.Family | None = None, comm: str = "kworker", session: int = S1,
                  agent: int = 0, h: Header | None = None,
                  send: bool = False) -> ev.ConnectEvent:
    """A connect to address:port (a datagram sent there when send); the family is the
    address's (IPv6 when it has a colon) unless given. `h`, when given, is the header as
    is."""
    if family is None:
        family = ev.Family.INET6 if ":" in address else ev.Family.INET
    if h is None:
        h = header(pid, ts, comm=comm, session=session, agent=agent)
    return ev.ConnectEvent(h, family, address, port, protocol, send)


def exit_event(pid: int, ts: int, *, status: int = 0, ppid: int = 0, cpu_ns: int = 0,
               comm: str = "bash", session: int = S1, agent: int = 0,
               h: Header | None = None) -> ev.ExitEvent:
    if h is None:
        h = header(pid, ts, comm=comm, session=session, agent=agent)
    return ev.ExitEvent(h, exit_status=status, ppid=ppid, cpu_ns=cpu_ns)


# --- raw records, as the probes write them to the ring buffer ----------------------------


def raw_header(etype: int, *, pid: int = 4242, tid: int | None = None,
               session: int = 0x80000001, agent: int = 3, uid: int = 1000,
               comm: bytes = b"claude", ts_ns: int = 123456789) -> abi.CHeader:
    h = abi.CHeader()
    h.ts_ns = ts_ns
    h.type = etype
    h.pid = pid
    h.tid = pid if tid is None else tid
    h.session = session
    h.agent = agent
    h.uid = uid
    h.comm = comm
    return h


def exec_record(args: list[bytes], *, argc: int | None = None, flags: int = 0,
                filename: bytes = b"/usr/bin/git", h: abi.CHeader | None = None) -> bytes:
    """An exec record as sched_process_exec emits it: only the used part of `args`."""
    packed = b"".join(a + b"\0" for a in args)
    assert len(packed) <= ev.ARGS_SIZE
    e = abi.CExecEvent()
    e.h = raw_header(ev.EventType.EXEC) if h is None else h
    e.old_tid = e.h.pid
    e.ppid = 77
    e.cgroup_id = 0x1234_5678_9ABC
    e.argc = len(args) if argc is None else argc
    e.flags = flags
    e.args_len = len(packed)
    e.filename = filename
    ct.memmove(ct.addressof(e) + abi.EXEC_ARGS_OFFSET, packed, len(packed))
    raw = bytes(e)[: abi.EXEC_ARGS_OFFSET + len(packed)]
    assert len(raw) == abi.EXEC_ARGS_OFFSET + e.args_len
    return raw


def connect_record(family: int, addr: bytes, port: int, protocol: int = 6, *,
                   h: abi.CHeader | None = None, flags: int = 0) -> bytes:
    c = abi.CConnectEvent()
    c.h = raw_header(ev.EventType.CONNECT) if h is None else h
    c.family = family
    c.port = port
    c.protocol = protocol
    c.flags = flags
    for i, b in enumerate(addr):
        c.addr[i] = b
    return bytes(c)


def exit_record(status: int, cpu_ns: int = 2_000_000, ppid: int = 77) -> bytes:
    x = abi.CExitEvent()
    x.h = raw_header(ev.EventType.EXIT)
    x.exit_status = status
    x.ppid = ppid
    x.cpu_ns = cpu_ns
    return bytes(x)


def fork_record(child: int) -> bytes:
    f = abi.CForkEvent()
    f.h = raw_header(ev.EventType.FORK)
    f.child_pid = child
    return bytes(f)
