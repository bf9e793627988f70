"""The ABI shared with the probes: the ctypes mirror of probes/agentwatch.h and the decoder.

The C header is the one definition of every struct; the mirror here follows it field for
field and the loader hands the mirror's sizes to the compiler (-DAW_PY_SIZEOF_*), where
static asserts refuse a drift. A kernel test also compares every field offset with the
layout clang produced. Decoding is pure: bytes in, typed event (monitor/model/events.py)
out. No BCC import here, no map access, no policy.
"""

from __future__ import annotations

import ctypes as ct
import struct

from monitor.model.address import text_of
from monitor.model.cmdline import c_string
from monitor.model.cmdline import decode as decode_text
from monitor.model.events import (
    ADDR_LEN,
    ARGS_SIZE,
    COMM_LEN,
    FLAG_ARGV_FROM_MM,
    FLAG_CONNECT_SEND,
    FLAG_CONNECT_UNCHECKED,
    PATH_LEN,
    V4_OFFSET,
    ConnectEvent,
    Event,
    EventType,
    ExecEvent,
    ExitEvent,
    Family,
    ForkEvent,
    Header,
    KAction,
    VerdictEvent,
    VerdictKind,
)


class CProc(ct.Structure):
    _fields_ = [
        ("session", ct.c_uint32),
        ("agent", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("exit_status", ct.c_int32),
        ("cpu_ns", ct.c_uint64),
        ("start_ns", ct.c_uint64),
        ("bulk_window", ct.c_uint32),
        ("bulk_count", ct.c_uint32),
    ]


class CMatch(ct.Structure):
    _fields_ = [("agent", ct.c_uint32), ("_pad", ct.c_uint32)]


class CCommKey(ct.Structure):
    _fields_ = [("comm", ct.c_char * COMM_LEN), ("uid", ct.c_uint32), ("gen", ct.c_uint32)]


class CUidKey(ct.Structure):
    _fields_ = [("uid", ct.c_uint32), ("gen", ct.c_uint32)]


class CHeader(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("type", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("session", ct.c_uint32),
        ("agent", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("comm", ct.c_char * COMM_LEN),
    ]


class CForkEvent(ct.Structure):
    _fields_ = [("h", CHeader), ("child_pid", ct.c_uint32), ("_pad", ct.c_uint32)]


class CExecEvent(ct.Structure):
    _fields_ = [
        ("h", CHeader),
        ("old_tid", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("cgroup_id", ct.c_uint64),
        ("argc", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("args_len", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("filename", ct.c_char * PATH_LEN),
        ("args", ct.c_char * ARGS_SIZE),
    ]


class CConnectEvent(ct.Structure):
    _fields_ = [
        ("h", CHeader),
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),
        ("protocol", ct.c_uint16),
        ("flags", ct.c_uint16),
        ("addr", ct.c_uint8 * ADDR_LEN),
    ]


class CExitEvent(ct.Structure):
    _fields_ = [
        ("h", CHeader),
        ("exit_status", ct.c_int32),
        ("ppid", ct.c_uint32),
        ("cpu_ns", ct.c_uint64),
    ]


class CNetKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("gen", ct.c_uint8), ("addr", ct.c_uint8 * ADDR_LEN),
                ("_pad", ct.c_uint8 * 3)]


class CNameKey(ct.Structure):
    _fields_ = [("comm", ct.c_char * COMM_LEN), ("gen", ct.c_uint32)]


class CVerdictEvent(ct.Structure):
    _fields_ = [
        ("h", CHeader),
        ("kind", ct.c_uint32),
        ("rule", ct.c_uint32),
        ("mask", ct.c_uint64),
        ("action", ct.c_uint32),
        ("enforced", ct.c_uint32),
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),
        ("flags", ct.c_uint32),
        ("addr", ct.c_uint8 * ADDR_LEN),
    ]


# C struct name -> mirror, for the layout test and the -D size flags.
MIRRORS: dict[str, type[ct.Structure]] = {
    "aw_proc": CProc,
    "aw_match": CMatch,
    "aw_comm_key": CCommKey,
    "aw_uid_key": CUidKey,
    "aw_header": CHeader,
    "aw_fork_event": CForkEvent,
    "aw_exec_event": CExecEvent,
    "aw_connect_event": CConnectEvent,
    "aw_exit_event": CExitEvent,
    "aw_net_key": CNetKey,
    "aw_name_key": CNameKey,
    "aw_verdict_event": CVerdictEvent,
}

EXEC_ARGS_OFFSET = CExecEvent.args.offset


def size_cflags() -> list[str]:
    """-D flags that let the C side static-assert the mirror's sizes."""
    names = {
        "HEADER": CHeader,
        "PROC": CProc,
        "FORK_EVENT": CForkEvent,
        "EXEC_EVENT": CExecEvent,
        "CONNECT_EVENT": CConnectEvent,
        "EXIT_EVENT": CExitEvent,
        "VERDICT_EVENT": CVerdictEvent,
    }
    return [f"-DAW_PY_SIZEOF_{k}={ct.sizeof(v)}" for k, v in names.items()]


class DecodeError(ValueError):
    """A ring-buffer record that does not fit any event layout."""


_COMMS: dict[bytes, str] = {}


def _comm(raw: bytes) -> str:
    """Decoded comm, interned: the hot path sees the same few names again and again."""
    s = _COMMS.get(raw)
    if s is None:
        if len(_COMMS) > 4096:
            _COMMS.clear()
        s = _COMMS[raw] = c_string(raw)
    return s


# struct layouts of the same records (the decoder's fast path); sizes are checked against
# the ctypes mirror at import, and the mirror against the compiled C in a kernel test.
_HDR = struct.Struct("<QIIIIII16s")
_FORK = struct.Struct("<II")
_EXEC = struct.Struct("<IIQIIII256s")
_CONNECT = struct.Struct("<HHHH16s")
_EXIT = struct.Struct("<iIQ")
_VERDICT = struct.Struct("<IIQIIHHI16s")
_HEADER_SIZE = _HDR.size
_TYPE_OFFSET = CHeader.type.offset
assert _HEADER_SIZE == ct.sizeof(CHeader)
assert _HEADER_SIZE + _FORK.size == ct.sizeof(CForkEvent)
assert _HEADER_SIZE + _EXEC.size == EXEC_ARGS_OFFSET
assert _HEADER_SIZE + _CONNECT.size == ct.sizeof(CConnectEvent)
assert _HEADER_SIZE + _EXIT.size == ct.sizeof(CExitEvent)
assert _HEADER_SIZE + _VERDICT.size == ct.sizeof(CVerdictEvent)


def _header(buf: bytes) -> Header:
    ts, _type, pid, tid, session, agent, uid, comm = _HDR.unpack_from(buf)
    return Header(ts, pid, tid, session, agent, uid, _comm(comm))


_CONNECT_RECORD = struct.Struct(_HDR.format + _CONNECT.format[1:])
_TYPE = struct.Struct("<I")
_CONNECT_TYPE = int(EventType.CONNECT)


def decode(data: bytes | bytearray | memoryview) -> Event:
    """Decode one ring-buffer record into a typed event."""
    buf = bytes(data)
    n = len(buf)
    if n < _HEADER_SIZE:
        raise DecodeError(f"record of {n} bytes is shorter than the event header")
    etype = _TYPE.unpack_from(buf, _TYPE_OFFSET)[0]
    if etype == _CONNECT_TYPE:  # most events: one unpack for the whole record
        if n < _CONNECT_RECORD.size:
            raise DecodeError(f"connect record of {n} bytes, expected {_CONNECT_RECORD.size}")
        ts, _t, pid, tid, session, agent, uid, comm, family, port, protocol, cflags, raw = \
            _CONNECT_RECORD.unpack_from(buf)
        fam = _FAMILY_OF.get(family)
        if fam is None:
            raise DecodeError(f"connect record with unknown address family {family}")
        cache = _ADDRESSES[fam]
        address = cache.get(raw)
        if address is None:
            if len(cache) >= 4096:
                cache.clear()
            address = cache[raw] = _address(fam, raw)
        return ConnectEvent(Header(ts, pid, tid, session, agent, uid, _comm(comm)), fam,
                            address, port, protocol, bool(cflags & FLAG_CONNECT_SEND))
    if etype == EventType.EXEC:
        if n < EXEC_ARGS_OFFSET:
            raise DecodeError(f"exec record of {n} bytes is truncated")
        old_tid, ppid, cgroup_id, argc, flags, args_len, _pad, filename = _EXEC.unpack_from(
            buf, _HEADER_SIZE)
        used = buf[EXEC_ARGS_OFFSET : EXEC_ARGS_OFFSET + args_len]
        pieces = used.split(b"\0")
        if flags & FLAG_ARGV_FROM_MM:  # NUL-terminated block, argc not counted
            pieces = pieces[:-1] if used.endswith(b"\0") else pieces
        else:
            pieces = pieces[:argc]
        argv = tuple(decode_text(a) for a in pieces)
        return ExecEvent(_header(buf), old_tid, ppid, cgroup_id, flags,
                         c_string(filename), argv)
    if etype == EventType.FORK:
        _need(buf, _FORK, "fork")
        child, _pad = _FORK.unpack_from(buf, _HEADER_SIZE)
        return ForkEvent(_header(buf), child)
    if etype == EventType.EXIT:
        _need(buf, _EXIT, "exit")
        status, ppid, cpu = _EXIT.unpack_from(buf, _HEADER_SIZE)
        return ExitEvent(_header(buf), status, ppid, cpu)
    if etype == EventType.VERDICT:
        _need(buf, _VERDICT, "verdict")
        vkind, rule, mask, action, enforced, family, port, cflags, raw = _VERDICT.unpack_from(
            buf, _HEADER_SIZE)
        try:
            kind = VerdictKind(vkind)
        except ValueError:
            raise DecodeError(f"verdict record with unknown kind {vkind}") from None
        address = file = ""
        if kind == VerdictKind.CONNECT and family in _FAMILIES and not (
                cflags & FLAG_CONNECT_UNCHECKED):
            address = _address(Family.INET, raw[V4_OFFSET:]) if family == Family.INET \
                else _address(Family.INET6, raw)
        elif kind == VerdictKind.EXEC:  # addr holds the executable file's name
            file = c_string(raw)
        return VerdictEvent(_header(buf), kind, rule, mask,
                            KAction(action) if action in _ACTIONS else None, bool(enforced),
                            family, address, port, file, bool(cflags & FLAG_CONNECT_SEND),
                            bool(cflags & FLAG_CONNECT_UNCHECKED))
    raise DecodeError(f"unknown event type {etype}")


def _need(buf: bytes, layout: struct.Struct, what: str) -> None:
    want = _HEADER_SIZE + layout.size
    if len(buf) < want:
        raise DecodeError(f"{what} record of {len(buf)} bytes, expected {want}")


_FAMILIES = frozenset(int(f) for f in Family)
_FAMILY_OF = {int(f): f for f in Family}
# raw connect address -> text, per family (the same 16 bytes are an IPv4 address with
# zero padding and an IPv6 one); bounded, for the hot path
_ADDRESSES: dict[Family, dict[bytes, str]] = {f: {} for f in Family}
_ACTIONS = frozenset(int(a) for a in KAction)


def _address(fam: Family, raw: bytes) -> str:
    return text_of(raw, fam != Family.INET)
