"""Unit tests for the decoder (monitor.kernel.abi): raw ring-buffer records, built exactly as
the probes (probes/agentwatch.bpf.c) send them, decoded into the typed events of
monitor.model.events. That both stay in step with the C header is test_header.py's job.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
from pathlib import Path

import pytest

from monitor.kernel.abi import (
    EXEC_ARGS_OFFSET,
    CExecEvent,
    CHeader,
    CVerdictEvent,
    DecodeError,
    decode,
)
from monitor.model import events
from monitor.model.events import (
    ConnectEvent,
    ConnectFlag,
    EventType,
    ExecEvent,
    ExecFlag,
    ExitEvent,
    Family,
    ForkEvent,
    KAction,
    VerdictEvent,
    VerdictKind,
)
from monitor.sessions.procfs import ProcFS
from tests.support.events import (
    connect_record,
    exec_record,
    exit_record,
    fork_record,
)
from tests.support.events import raw_header as header

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


@pytest.mark.parametrize("flags,send", [(0, False), (ConnectFlag.SEND, True),
                                         (0x8000, False)])
def test_connect_record_says_whether_it_was_a_datagram_send(flags: int, send: bool) -> None:
    ev = decode(connect_record(socket.AF_INET, bytes([1, 1, 1, 1]), 53, 17, flags=flags))
    assert isinstance(ev, ConnectEvent)
    assert ev.send is send and ev.address == "1.1.1.1" and ev.port == 53


@pytest.mark.parametrize("flags,send", [(0, False), (ConnectFlag.SEND, True)])
def test_connect_verdict_says_whether_it_was_a_datagram_send(flags: int, send: bool) -> None:
    v = CVerdictEvent()
    v.h = header(EventType.VERDICT)
    v.kind, v.rule, v.mask = VerdictKind.CONNECT, 3, 1 << 3
    v.action, v.enforced, v.family, v.port, v.flags = KAction.DENY, 1, socket.AF_INET, 53, flags
    for i, b in enumerate(ipaddress.IPv6Address("::ffff:9.9.9.9").packed):
        v.addr[i] = b
    ev = decode(bytes(v))
    assert isinstance(ev, VerdictEvent)
    assert ev.send is send and ev.address == "9.9.9.9" and ev.port == 53
    assert not ev.unchecked


def test_a_verdict_on_a_raw_or_icmp_socket_has_no_destination() -> None:
    v = CVerdictEvent()
    v.h = header(EventType.VERDICT)
    v.kind, v.rule, v.mask, v.action, v.enforced = VerdictKind.CONNECT, 0, 1, KAction.KILL, 1
    v.family, v.flags = socket.AF_INET6, ConnectFlag.UNCHECKED
    ev = decode(bytes(v))
    assert isinstance(ev, VerdictEvent)
    assert ev.unchecked and not ev.send
    assert (ev.address, ev.port, ev.family_name) == ("", 0, "ipv6")


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


def test_argv_read_from_the_new_programs_memory_is_split_on_nuls() -> None:
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
