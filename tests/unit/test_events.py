"""Unit tests for monitor.model.events: decoding raw ring-buffer records built exactly as the
probes (probes/agentwatch.bpf.c) send them, and the mirror staying in step with the C header.
"""

from __future__ import annotations

import ast
import ctypes as ct
import ipaddress
import re
import socket
from pathlib import Path

import pytest

from monitor.model import events
from monitor.model.events import (
    EXEC_ARGS_OFFSET,
    MIRRORS,
    CCommKey,
    CExecEvent,
    CHeader,
    CMatch,
    ConnectEvent,
    Counter,
    DecodeError,
    EventType,
    ExecEvent,
    ExecFlag,
    ExitEvent,
    Family,
    ForkEvent,
    Setting,
    decode,
    size_cflags,
)
from monitor.sessions.procfs import ProcFS
from tests.support.events import (
    connect_record,
    exec_record,
    exit_record,
    fork_record,
)
from tests.support.events import raw_header as header

PROBES = Path(__file__).resolve().parents[2] / "probes"
HEADER_H = PROBES / "agentwatch.h"
BPF_C = PROBES / "agentwatch.bpf.c"


# --- header and fork -----------------------------------------------------------------------


def test_fork_and_header_fields() -> None:
    ev = decode(fork_record(4300))
    assert isinstance(ev, ForkEvent)
    assert ev.kind is EventType.FORK
    assert ev.child_pid == 4300
    assert ev.h == events.Header(ts_ns=123456789, pid=4242, tid=4242, session=0x80000001,
                                 agent=3, uid=1000, comm="claude")
    assert ev.h.tracked


def test_full_length_comm_and_untracked_header() -> None:
    raw = bytearray(fork_record(1))
    h = header(EventType.FORK, comm=b"abcdefghijklmno", session=0)  # 15 chars + NUL
    raw[: ct.sizeof(CHeader)] = bytes(h)
    ev = decode(bytes(raw))
    assert ev.h.comm == "abcdefghijklmno"
    assert not ev.h.tracked


def test_decode_accepts_memoryview_and_bytearray() -> None:
    raw = exit_record(0)
    assert decode(memoryview(raw)) == decode(bytearray(raw)) == decode(raw)


# --- exec ----------------------------------------------------------------------------------


def test_exec_argv_split_with_empty_argument_in_the_middle() -> None:
    raw = exec_record([b"git", b"", b"commit", b"-m", b"a b"])
    ev = decode(raw)
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ("git", "", "commit", "-m", "a b")
    assert ev.filename == "/usr/bin/git"
    assert ev.ppid == 77
    assert ev.old_tid == 4242
    assert ev.cgroup_id == 0x1234_5678_9ABC
    assert ev.flags == ExecFlag(0)
    assert not ev.argv_truncated


def test_exec_trailing_empty_argument_is_kept() -> None:
    ev = decode(exec_record([b"sh", b"-c", b""]))
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ("sh", "-c", "")


def test_exec_non_utf8_argument_survives() -> None:
    arg = b"caf\xe9-\xff"
    ev = decode(exec_record([b"cat", arg], filename=b"/tmp/\xfe/bin"))
    assert isinstance(ev, ExecEvent)
    assert ev.argv[1].encode("utf-8", "surrogateescape") == arg
    assert ev.filename.encode("utf-8", "surrogateescape") == b"/tmp/\xfe/bin"
    assert ev.argv[0] == "cat"


@pytest.mark.parametrize("raw", [b"SendEnv=\xff", b"caf\xc3", "é✓".encode(), b"\xed\xa0\x80"])
def test_exec_argv_decodes_as_proc_cmdline_does(tmp_path: Path, raw: bytes) -> None:
    """The decoder and the /proc reader turn the same bytes into the same text (the
    completion of a cut argv compares the two)."""
    ev = decode(exec_record([b"ssh", b"-o", raw]))
    d = tmp_path / "9"
    d.mkdir()
    d.joinpath("stat").write_text("9 (ssh) S 1 9 9 0 -1 0 " + "0 " * 12 + "100 " + "0 " * 30)
    d.joinpath("status").write_text("Uid:\t1000\t1000\t1000\t1000\n")
    d.joinpath("cmdline").write_bytes(b"ssh\0-o\0" + raw + b"\0")
    d.joinpath("cgroup").write_text("0::/\n")
    info = ProcFS(tmp_path).read(9)
    assert isinstance(ev, ExecEvent) and info is not None
    assert ev.argv == info.argv
    assert ev.argv[2].encode("utf-8", "surrogateescape") == raw


def test_exec_utf8_argument() -> None:
    ev = decode(exec_record([b"echo", "héllo ✓".encode()]))
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ("echo", "héllo ✓")


def test_exec_argc_limits_arguments() -> None:
    # args_len covers three strings but the kernel counted only two of them
    ev = decode(exec_record([b"a", b"b", b"c"], argc=2))
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ("a", "b")


def test_exec_full_argument_area() -> None:
    args = [bytes([ord("a") + i]) * (events.ARG_LEN - 1) for i in range(events.MAX_ARGS)]
    raw = exec_record(args, flags=ExecFlag.ARGV_TRUNC_COUNT)
    assert len(raw) == ct.sizeof(CExecEvent)
    ev = decode(raw)
    assert isinstance(ev, ExecEvent)
    assert ev.argv == tuple(a.decode() for a in args)
    assert ev.argv_truncated


def test_exec_without_argv() -> None:
    raw = exec_record([], flags=ExecFlag.ARGV_MISSING | ExecFlag.NEW_ROOT)
    assert len(raw) == EXEC_ARGS_OFFSET
    ev = decode(raw)
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ()
    assert ev.flags & ExecFlag.ARGV_MISSING and ev.flags & ExecFlag.NEW_ROOT
    assert not ev.argv_truncated


@pytest.mark.parametrize(
    ("flags", "truncated"),
    [
        (0, False),
        (ExecFlag.ARGV_TRUNC_COUNT, True),
        (ExecFlag.ARGV_TRUNC_LEN, True),
        (ExecFlag.ARGV_TRUNC_COUNT | ExecFlag.ARGV_TRUNC_LEN, True),
        (ExecFlag.ARGV_FAULT, False),
        (ExecFlag.ARGV_MISSING, False),
        (ExecFlag.NEW_ROOT | ExecFlag.UNTRACKED, False),
        (ExecFlag.CANDIDATE, False),
        # set in userspace: completed from /proc is whole; unconfirmed or clipped is not
        (ExecFlag.ARGV_TRUNC_LEN | ExecFlag.ARGV_COMPLETED, False),
        (ExecFlag.ARGV_TRUNC_LEN | ExecFlag.ARGV_UNCONFIRMED, True),
        (ExecFlag.ARGV_TRUNC_LEN | ExecFlag.ARGV_COMPLETED | ExecFlag.ARGV_CLIPPED, True),
    ],
)
def test_exec_truncation_flags(flags: int, truncated: bool) -> None:
    ev = decode(exec_record([b"x"], flags=flags))
    assert isinstance(ev, ExecEvent)
    assert ev.flags == flags
    assert ev.argv_truncated is truncated


def test_exec_filename_stops_at_nul() -> None:
    ev = decode(exec_record([b"ls"], filename=b"/bin/ls\0garbage"))
    assert isinstance(ev, ExecEvent)
    assert ev.filename == "/bin/ls"


# --- connect -------------------------------------------------------------------------------


def test_connect_ipv4_uses_first_four_bytes() -> None:
    # bytes after the IPv4 address are not part of it, whatever they hold
    ev = decode(connect_record(socket.AF_INET, bytes([1, 2, 3, 4]) + b"\xaa" * 12, 443, 6))
    assert isinstance(ev, ConnectEvent)
    assert ev.family is Family.INET
    assert ev.address == "1.2.3.4"
    assert ev.port == 443
    assert ev.protocol == 6


def test_connect_ipv6_loopback() -> None:
    ev = decode(connect_record(socket.AF_INET6, ipaddress.IPv6Address("::1").packed, 8080, 0))
    assert isinstance(ev, ConnectEvent)
    assert ev.family is Family.INET6
    assert ev.address == "::1"
    assert ev.port == 8080


def test_connect_ipv6_full_address() -> None:
    addr = ipaddress.IPv6Address("2001:db8::8a2e:370:7334")
    ev = decode(connect_record(socket.AF_INET6, addr.packed, 65535, 0))
    assert isinstance(ev, ConnectEvent)
    assert ev.address == "2001:db8::8a2e:370:7334"
    assert ev.port == 65535


def test_connect_ipv4_mapped_ipv6_is_that_ipv4_address() -> None:
    mapped = ipaddress.IPv6Address("::ffff:1.2.3.4")
    ev = decode(connect_record(socket.AF_INET6, mapped.packed, 80, 0))
    assert isinstance(ev, ConnectEvent)
    assert ev.family is Family.INET6
    parsed = ipaddress.ip_address(ev.address)
    assert isinstance(parsed, ipaddress.IPv6Address)
    assert parsed.ipv4_mapped == ipaddress.IPv4Address("1.2.3.4")


def test_connect_ipv4_mapped_ipv6_text_shows_the_ipv4_address() -> None:
    # RFC 5952 section 5 form, the same on every Python version (3.11 prints ::ffff:102:304)
    mapped = ipaddress.IPv6Address("::ffff:1.2.3.4")
    ev = decode(connect_record(socket.AF_INET6, mapped.packed, 80, 0))
    assert isinstance(ev, ConnectEvent)
    assert ev.address == "::ffff:1.2.3.4"


@pytest.mark.parametrize(
    ("protocol", "transport"),
    [(6, "tcp"), (17, "udp"), (262, "mptcp"), (132, "132")],
)
def test_connect_protocol(protocol: int, transport: str) -> None:
    ev = decode(connect_record(socket.AF_INET, bytes([10, 0, 0, 1]), 22, protocol))
    assert isinstance(ev, ConnectEvent)
    assert ev.protocol == protocol
    assert ev.transport == transport


# --- exit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "sig"),
    [
        (7 << 8, 7, None),
        (0, 0, None),
        (255 << 8, 255, None),
        (9, None, 9),
        (15, None, 15),
        (events.STATUS_UNSET, None, None),
    ],
)
def test_exit_status(status: int, code: int | None, sig: int | None) -> None:
    ev = decode(exit_record(status, cpu_ns=3_000_000_000, ppid=12))
    assert isinstance(ev, ExitEvent)
    assert ev.exit_status == status
    assert ev.exit_code == code
    assert ev.signal == sig
    assert ev.cpu_ns == 3_000_000_000
    assert ev.ppid == 12


# --- malformed records ---------------------------------------------------------------------


def test_record_shorter_than_header() -> None:
    with pytest.raises(DecodeError, match="shorter than the event header"):
        decode(fork_record(1)[: ct.sizeof(CHeader) - 1])
    with pytest.raises(DecodeError):
        decode(b"")


@pytest.mark.parametrize(
    "raw",
    [
        fork_record(1)[:-1],
        connect_record(socket.AF_INET, bytes(4), 1, 0)[:-4],
        exit_record(0)[: ct.sizeof(CHeader) + 4],
        exec_record([b"x"])[: EXEC_ARGS_OFFSET - 1],
        exec_record([b"x"])[: ct.sizeof(CHeader)],
    ],
    ids=["fork", "connect", "exit", "exec-fixed-part", "exec-header-only"],
)
def test_truncated_record(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(raw)


@pytest.mark.parametrize("etype", [0, 6, 99, 0xFFFFFFFF])
def test_unknown_event_type(etype: int) -> None:
    raw = bytes(header(etype)) + bytes(64)
    with pytest.raises(DecodeError, match=f"unknown event type {etype}"):
        decode(raw)


@pytest.mark.parametrize("family", [0, socket.AF_UNIX, socket.AF_NETLINK, 0xFFFF])
def test_connect_with_unknown_family_is_a_decode_error(family: int) -> None:
    # Monitor._on_record counts DecodeError; any other exception would escape the poll loop
    with pytest.raises(DecodeError, match="family"):
        decode(connect_record(family, bytes(16), 0, 0))


# --- the mirror follows probes/agentwatch.h -------------------------------------------------


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _c_defines(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s*#define\s+(AW_\w+)\s+(.+?)\s*$",
                         _strip_comments(path.read_text()), flags=re.M):
        out[m.group(1)] = m.group(2)
    return out


def _c_value(expr: str, defines: dict[str, str]) -> int:
    """Evaluate a C integer constant expression made of literals and other defines."""
    expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expr)
    expr = re.sub(r"\bAW_\w+\b", lambda m: f"({_c_value(defines[m.group(0)], defines)})",
                  expr)
    tree = ast.parse(expr, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.operator,
               ast.unaryop)
    for node in ast.walk(tree):
        assert isinstance(node, allowed), f"not a plain constant expression: {expr}"
    value = eval(compile(tree, "<define>", "eval"))
    assert isinstance(value, int)
    return value


H_DEFINES = _c_defines(HEADER_H)


def _group(prefix: str) -> dict[str, int]:
    return {name.removeprefix(prefix): _c_value(v, H_DEFINES)
            for name, v in H_DEFINES.items() if name.startswith(prefix)}


def test_header_defines_were_found() -> None:
    # guards the regex: if it silently matched nothing every comparison below would pass
    assert {"AW_EV_FORK", "AW_EXEC_NEW_ROOT", "AW_CNT_LOST", "AW_SET_MONITOR_TGID",
            "AW_ARGS_SIZE", "AW_STATUS_UNSET"} <= set(H_DEFINES)


@pytest.mark.parametrize(
    ("prefix", "enum", "bounds"),
    [
        ("AW_EV_", EventType, set()),
        ("AW_EXEC_", ExecFlag, set()),
        ("AW_CNT_", Counter, {"MAX"}),
        ("AW_SET_", Setting, {"MAX"}),
    ],
    ids=["EventType", "ExecFlag", "Counter", "Setting"],
)
def test_enum_matches_header_defines(prefix: str, enum: type, bounds: set[str]) -> None:
    c_side = {k: v for k, v in _group(prefix).items() if k not in bounds}
    py_side = {m.name: int(m.value) for m in enum}  # type: ignore[attr-defined]
    assert c_side, f"no {prefix}* defines found in {HEADER_H}"
    assert c_side == py_side
    for bound in bounds:
        limit = _group(prefix)[bound]
        assert all(0 <= v < limit for v in py_side.values()), (
            f"{enum.__name__} value beyond {prefix}{bound}={limit}")


def test_scalar_constants_match_header() -> None:
    expect = {
        "AW_COMM_LEN": events.COMM_LEN,
        "AW_PATH_LEN": events.PATH_LEN,
        "AW_MAX_ARGS": events.MAX_ARGS,
        "AW_ARG_LEN": events.ARG_LEN,
        "AW_ARGS_SIZE": events.ARGS_SIZE,
        "AW_SESSION_KERNEL_BIT": events.SESSION_KERNEL_BIT,
        "AW_STATUS_UNSET": events.STATUS_UNSET,
        "AW_ANY_UID": events.ANY_UID,
        "AW_AGENT_PENDING": events.AGENT_PENDING,
        "AW_CNT_MAX": events.COUNTER_SLOTS,
    }
    assert {k: _c_value(H_DEFINES[k], H_DEFINES) for k in expect} == expect


def test_family_matches_probe_defines() -> None:
    c = _c_defines(BPF_C)
    assert _c_value(c["AW_AF_INET"], c) == Family.INET == socket.AF_INET
    assert _c_value(c["AW_AF_INET6"], c) == Family.INET6 == socket.AF_INET6


_C_TYPES: dict[str, type] = {
    "__u8": ct.c_uint8, "__u16": ct.c_uint16, "__u32": ct.c_uint32, "__s32": ct.c_int32,
    "__u64": ct.c_uint64, "char": ct.c_char,
}
_ALL_MIRRORS: dict[str, type[ct.Structure]] = {
    **MIRRORS, "aw_match": CMatch, "aw_comm_key": CCommKey,
}
_KERNEL_ONLY = {"aw_exec_args", "aw_connect_args", "aw_last_dest"}  # never cross to userspace


def _c_structs() -> dict[str, list[tuple[str, type, int | None]]]:
    """struct name -> [(field, ctypes scalar or mirror, array length or None)]."""
    text = _strip_comments(HEADER_H.read_text())
    structs: dict[str, list[tuple[str, type, int | None]]] = {}
    for m in re.finditer(r"struct\s+(aw_\w+)\s*\{(.*?)\};", text, flags=re.S):
        fields = []
        for decl in filter(None, (d.strip() for d in m.group(2).split(";"))):
            f = re.fullmatch(r"(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[([^\]]+)\])?", decl)
            assert f, f"cannot parse field {decl!r} of struct {m.group(1)}"
            ctype, name, length = f.groups()
            if ctype.startswith("struct"):
                kind: type = _ALL_MIRRORS[ctype.split()[1]]
            else:
                kind = _C_TYPES[ctype]
            fields.append((name, kind, None if length is None else _c_value(length, H_DEFINES)))
        structs[m.group(1)] = fields
    return structs


def test_every_shared_struct_has_a_mirror() -> None:
    structs = _c_structs()
    assert set(structs) - _KERNEL_ONLY == set(_ALL_MIRRORS)


@pytest.mark.parametrize("name", sorted(_ALL_MIRRORS))
def test_mirror_fields_match_header(name: str) -> None:
    c_fields = _c_structs()[name]
    mirror = _ALL_MIRRORS[name]
    py_fields = []
    for fname, ftype in mirror._fields_:  # type: ignore[misc]
        if issubclass(ftype, ct.Array):
            py_fields.append((fname, ftype._type_, ftype._length_))
        else:
            py_fields.append((fname, ftype, None))
    assert py_fields == c_fields


def test_exec_args_offset() -> None:
    # header, old_tid, ppid, cgroup_id, argc, flags, args_len, _pad, filename
    assert EXEC_ARGS_OFFSET == 48 + 4 + 4 + 8 + 4 * 4 + events.PATH_LEN
    assert ct.sizeof(CExecEvent) == EXEC_ARGS_OFFSET + events.ARGS_SIZE


def test_size_cflags_match_the_static_asserts() -> None:
    flags = dict(f.removeprefix("-D").split("=") for f in size_cflags())
    text = BPF_C.read_text()
    used = set(re.findall(r"\bAW_PY_SIZEOF_\w+", text))
    assert used, "no AW_PY_SIZEOF_* found in the probes"
    assert set(flags) == used
    pairs = re.findall(r"sizeof\(struct\s+(aw_\w+)\)\s*==\s*(AW_PY_SIZEOF_\w+)", text)
    assert {flag for _, flag in pairs} == used  # every flag is checked by a static assert
    for struct, flag in pairs:
        assert int(flags[flag]) == ct.sizeof(MIRRORS[struct]), (struct, flag)


def test_argv_read_from_the_new_programs_memory_is_split_on_nuls() -> None:
    from monitor.model.events import EXEC_ARGS_OFFSET, CExecEvent, EventType, ExecFlag, decode

    block = b"/bin/true\0--from-rodata\0\0x\0"
    e = CExecEvent()
    e.h.type = EventType.EXEC
    e.h.pid = e.h.tid = 7
    e.h.session = 1
    e.flags = ExecFlag.ARGV_FROM_MM
    e.argc = 0  # not counted by the kernel on this path
    e.args_len = len(block)
    e.filename = b"/bin/true"
    raw = bytes(e)[:EXEC_ARGS_OFFSET] + block
    ev = decode(raw)
    assert ev.argv == ("/bin/true", "--from-rodata", "", "x")
    e.args_len = 13  # cut at the buffer's end: the last argument is kept, partial
    ev = decode(bytes(e)[:EXEC_ARGS_OFFSET] + b"/bin/true\0abc")
    assert ev.argv == ("/bin/true", "abc")


def test_the_same_address_bytes_decode_per_family_every_time() -> None:
    # IPv4 1.2.3.4 and IPv6 102:304:: have the same 16 bytes on the wire; the decoder's
    # address cache must never hand one family's text to the other
    raw = bytes([1, 2, 3, 4]) + b"\0" * 12
    for _ in range(2):
        v4 = decode(connect_record(socket.AF_INET, raw, 80))
        v6 = decode(connect_record(socket.AF_INET6, raw, 80))
        assert isinstance(v4, ConnectEvent) and isinstance(v6, ConnectEvent)
        assert (v4.address, v6.address) == ("1.2.3.4", "102:304::")
