"""Unit tests for monitor.observe.output: JSON records and the one-line column format."""

from __future__ import annotations

import json
import unicodedata

import pytest

from monitor.model.events import (
    STATUS_UNSET,
    ConnectEvent,
    Event,
    ExecEvent,
    ExecFlag,
    ExitEvent,
    Family,
    ForkEvent,
    Header,
)
from monitor.model.records import ConnectRecord
from monitor.observe.output import HEADER, columns, columns_of, describe_status, record, to_json
from tests.support.events import connect_event, exec_event, exit_event

H = Header(ts_ns=12_345_678_901, pid=4242, tid=4243, session=0x80000005, agent=0, uid=1000,
           comm="node")
COMMON = {"ts_ns": 12_345_678_901, "agent": "claude-code", "session": 0x80000005, "pid": 4242,
          "tid": 4243, "uid": 1000, "comm": "node"}


def exec_ev(argv: tuple[str, ...] = ("git", "commit", "-m", "fix it"),
            flags: int = 0, filename: str = "/usr/bin/git") -> ExecEvent:
    return exec_event(H.pid, H.ts_ns, argv, h=H, old_tid=4243, ppid=4000, cgroup_id=9,
                      flags=ExecFlag(flags), exe=filename)


def connect_ev(family: Family, address: str, port: int = 443, protocol: int = 6,
               send: bool = False) -> ConnectEvent:
    return connect_event(H.pid, H.ts_ns, address, port, protocol=protocol, family=family, h=H,
                         send=send)


def exit_ev(status: int, cpu_ns: int = 1_250_000_000) -> ExitEvent:
    return exit_event(H.pid, H.ts_ns, status=status, ppid=4000, cpu_ns=cpu_ns, h=H)


def roundtrip(ev: Event, agent: str = "claude-code") -> dict[str, object]:
    """What a program reading `trace --json` gets back."""
    out = json.loads(to_json(ev, agent))
    assert isinstance(out, dict)
    assert out == record(ev, agent)
    return out


# --- record --------------------------------------------------------------------------------


def test_record_exec() -> None:
    out = roundtrip(exec_ev(flags=ExecFlag.NEW_ROOT | ExecFlag.ARGV_TRUNC_LEN))
    assert out == {
        **COMMON, "event": "exec", "filename": "/usr/bin/git",
        "argv": ["git", "commit", "-m", "fix it"], "ppid": 4000, "argv_truncated": True,
        "flags": ["argv_trunc_len", "new_root"], "sha256": None, "fileless": False,
    }


def test_record_exec_without_flags() -> None:
    out = roundtrip(exec_ev())
    assert out["flags"] == []
    assert out["argv_truncated"] is False


def test_record_exec_with_non_utf8_argument_is_still_json() -> None:
    arg = b"\xff\xfe".decode("utf-8", "surrogateescape")
    line = to_json(exec_ev(argv=("cat", arg)), "claude-code")
    line.encode("ascii")  # safe to write to any stream
    out = json.loads(line)
    assert out["argv"][0] == "cat"
    assert out["argv"][1].encode("utf-8", "surrogateescape") == b"\xff\xfe"


@pytest.mark.parametrize(
    ("family", "address", "name"),
    [(Family.INET, "93.184.216.34", "ipv4"), (Family.INET6, "2001:db8::1", "ipv6"),
     (Family.INET6, "::1", "ipv6")],
)
def test_record_connect(family: Family, address: str, name: str) -> None:
    out = roundtrip(connect_ev(family, address, 8443, 17))
    assert out == {**COMMON, "event": "connect", "family": name, "address": address,
                   "port": 8443, "protocol": "udp", "send": False}


def test_record_of_a_datagram_send_says_so() -> None:
    out = roundtrip(connect_ev(Family.INET, "1.2.3.4", 53, 17, send=True))
    assert out["event"] == "connect" and out["send"] is True
    assert ConnectRecord.from_json(out).send is True
    assert ConnectRecord.from_json({**out, "send": "yes"}).send is False  # only a JSON true


def test_record_fork() -> None:
    out = roundtrip(ForkEvent(H, child_pid=4300))
    assert out == {**COMMON, "event": "fork", "child_pid": 4300}


@pytest.mark.parametrize(
    ("status", "code", "sig"),
    [(3 << 8, 3, None), (0, 0, None), (9, None, 9), (STATUS_UNSET, None, None)],
)
def test_record_exit(status: int, code: int | None, sig: int | None) -> None:
    out = roundtrip(exit_ev(status))
    assert out == {**COMMON, "event": "exit", "exit_status": status, "exit_code": code,
                   "signal": sig, "ppid": 4000, "cpu_ns": 1_250_000_000}


def test_record_untracked_event_has_null_agent() -> None:
    out = roundtrip(ForkEvent(H, child_pid=1), agent="")
    assert out["agent"] is None


def test_to_json_is_one_line() -> None:
    line = to_json(exec_ev(argv=("sh", "-c", "echo a\nb")), "claude-code")
    assert "\n" not in line
    assert json.loads(line)["argv"][2] == "echo a\nb"


# --- columns -------------------------------------------------------------------------------


def test_columns_layout() -> None:
    line = columns(ForkEvent(H, child_pid=4300), "claude-code")
    fields = line.split()
    assert fields == ["12.345679", "claude-code", "fork", "4242", "node", "child", "4300"]
    # the columns line up with the header
    assert line.index("claude-code") == HEADER.index("AGENT")
    assert line.index("fork") == HEADER.index("EVENT")
    assert line.index("node") == HEADER.index("COMM")


def test_columns_untracked_agent_is_dash() -> None:
    assert columns(ForkEvent(H, child_pid=1), "").split()[1] == "-"


def test_columns_exec() -> None:
    line = columns(exec_ev(), "claude-code")
    assert line.endswith("/usr/bin/git commit -m 'fix it'")
    assert "truncated" not in line


def test_columns_exec_argv_truncated_marker() -> None:
    for flag in (ExecFlag.ARGV_TRUNC_COUNT, ExecFlag.ARGV_TRUNC_LEN):
        assert "[argv truncated]" in columns(exec_ev(flags=flag), "claude-code")
    assert "[argv truncated]" not in columns(exec_ev(flags=ExecFlag.ARGV_FAULT), "x")


def test_columns_exec_new_root_marker() -> None:
    assert "[new agent root]" in columns(exec_ev(flags=ExecFlag.NEW_ROOT), "claude-code")


def test_columns_exec_empty_argument_is_visible() -> None:
    line = columns(exec_ev(argv=("sh", "-c", "")), "x")
    assert line.endswith("/usr/bin/git -c ''")


def test_columns_ipv6_in_brackets() -> None:
    line = columns(connect_ev(Family.INET6, "2001:db8::1", 443), "claude-code")
    assert line.endswith("[2001:db8::1]:443 tcp")


def test_columns_ipv4_mapped_ipv6_in_brackets() -> None:
    line = columns(connect_ev(Family.INET6, "::ffff:1.2.3.4", 80, 17), "claude-code")
    assert line.endswith("[::ffff:1.2.3.4]:80 udp")


def test_columns_ipv4_without_brackets() -> None:
    line = columns(connect_ev(Family.INET, "10.0.0.1", 22), "claude-code")
    assert line.endswith("10.0.0.1:22 tcp")


def test_columns_datagram_send_is_marked() -> None:
    line = columns(connect_ev(Family.INET, "1.2.3.4", 53, 17, send=True), "claude-code")
    assert line.endswith("1.2.3.4:53 udp datagram")
    assert " connect " in line


@pytest.mark.parametrize(("protocol", "shown"), [(6, "tcp"), (17, "udp"), (132, "132")])
def test_columns_connect_protocol(protocol: int, shown: str) -> None:
    line = columns(connect_ev(Family.INET, "1.1.1.1", 53, protocol), "x")
    assert line.split()[-1] == shown


@pytest.mark.parametrize(
    ("status", "shown"),
    [(7 << 8, "exit 7"), (0, "exit 0"), (9, "signal 9"), (15, "signal 15"),
     (STATUS_UNSET, "unknown")],
)
def test_columns_exit(status: int, shown: str) -> None:
    line = columns(exit_ev(status, cpu_ns=1_250_000_000), "claude-code")
    assert line.endswith(f" {shown} cpu 1.250s")
    assert describe_status(status) == shown


def test_columns_long_agent_and_comm_are_cut() -> None:
    h = Header(ts_ns=0, pid=1, tid=1, session=1, agent=0, uid=0, comm="x" * 16)
    line = columns(ForkEvent(h, child_pid=2), "a-very-long-agent-name")
    assert line.split()[1] == "a-very-long-ag"
    assert line.split()[4] == "x" * 16


# --- agent text on a terminal ---------------------------------------------------------------

CLEAR, TITLE, CSI_C1 = "\x1b[2J", "\x1b]0;owned\x07", "\x9b2J"
RAW_BYTES = b"\x9b\xff".decode("utf-8", "surrogateescape")  # bytes that are not UTF-8
FORGED = "\n 99.000000 claude-code exec    4242 sh              /bin/sh harmless"


def terminal_safe(line: str) -> None:
    """What an operator's terminal must never receive from agent text."""
    assert "\n" not in line and "\r" not in line
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in line), \
        repr(line)
    line.encode("utf-8")  # strict: no surrogate reaches stdout


def hostile_header() -> Header:
    return Header(ts_ns=1, pid=4242, tid=4242, session=5, agent=0, uid=1000,
                  comm="\x1b]0;x\x07\x1b[2J\r")


def test_columns_escape_a_hostile_exec_path_comm_and_argv() -> None:
    ev = ExecEvent(hostile_header(), old_tid=4242, ppid=1, cgroup_id=1, flags=ExecFlag(0),
                   filename=f"/tmp/{CLEAR}{FORGED}\u202egpj.exe",
                   argv=("x", TITLE, CSI_C1, RAW_BYTES, "a\bb"))
    line = columns(ev, "claude-code")
    terminal_safe(line)
    assert "\\x1b]0;x\\x07\\x1b[2J\\r" in line  # the comm, visible
    assert "/tmp/\\x1b[2J\\n 99.000000 claude-code exec" in line
    assert "\\u202egpj.exe" in line
    assert "\\x9b\\xff" in line


def test_columns_escape_hostile_strings_in_streamed_records() -> None:
    """`trace` from a monitor prints records it got as JSON: any field may be hostile."""
    base = {"ts_ns": 1, "agent": f"a{CLEAR}", "pid": 1, "comm": f"[/x]{TITLE}"}
    for rec in [
        {**base, "event": "exec", "filename": f"/x{FORGED}", "argv": ["x", CSI_C1]},
        {**base, "event": "connect", "family": "ipv4", "address": f"1.2.3.4{CLEAR}",
         "port": 1, "protocol": f"tcp{TITLE}"},
        {**base, "event": "fork", "child_pid": f"2{CLEAR}"},
        {**base, "event": "policy_verdict", "rule": f"r{CLEAR}", "action": "kill",
         "outcome": f"killed{FORGED}", "reason": f"exe /tmp/{RAW_BYTES}\u202e"},
        {**base, "event": "verdict", "rule": f"1{TITLE}"},
        {**base, "event": f"exit{CLEAR}", "exit_status": 0},
    ]:
        line = columns_of(rec)
        terminal_safe(line)
