"""probes/agentwatch.h against its Python mirrors: every #define and enum value against
monitor/model/events.py, every shared struct field against the ctypes mirror in
monitor/kernel/abi.py, and the size flags the loader passes against the probes' static
asserts. Parsed from the header's text, so it runs without root or a compiler; the kernel
test tests/kernel/test_layout.py compares the mirror with what clang compiled. Any value
added, removed or changed on one side only fails here.
"""

from __future__ import annotations

import ast
import ctypes as ct
import enum
import re
import signal
import socket
from pathlib import Path

import pytest

from monitor.kernel.abi import (
    EXEC_ARGS_OFFSET,
    MIRRORS,
    CCommKey,
    CExecEvent,
    CMatch,
    size_cflags,
)
from monitor.model import events
from monitor.model.events import (
    ConnectFlag,
    Counter,
    Doom,
    EventType,
    ExecFlag,
    Family,
    Heartbeat,
    KAction,
    RuleMask,
    Setting,
    VerdictKind,
)

PROBES = Path(__file__).resolve().parents[2] / "probes"
HEADER_H = PROBES / "agentwatch.h"
BPF_C = PROBES / "agentwatch.bpf.c"


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


# Each group of #defines in probes/agentwatch.h that Python mirrors as an enum: prefix, the
# enum, and the Python constant the group's _MAX (its slot count) must equal, if it has one.
ENUM_GROUPS: list[tuple[str, type[enum.Enum], int | None]] = [
    ("AW_EV_", EventType, None),
    ("AW_ACT_", KAction, None),
    ("AW_VERDICT_", VerdictKind, None),
    ("AW_MASK_", RuleMask, events.RULE_MASK_SLOTS),
    ("AW_EXEC_", ExecFlag, None),
    ("AW_CNT_", Counter, events.COUNTER_SLOTS),
    ("AW_SET_", Setting, events.SETTING_SLOTS),
    ("AW_HB_", Heartbeat, events.HEARTBEAT_SLOTS),
    ("AW_DOOM_", Doom, None),
    ("AW_CONNECT_", ConnectFlag, None),
]

# Single #defines and the Python value that mirrors each.
SCALARS: dict[str, int] = {
    "AW_COMM_LEN": events.COMM_LEN,
    "AW_PATH_LEN": events.PATH_LEN,
    "AW_MAX_ARGS": events.MAX_ARGS,
    "AW_ARG_LEN": events.ARG_LEN,
    "AW_ARGS_SIZE": events.ARGS_SIZE,
    "AW_ADDR_LEN": events.ADDR_LEN,
    "AW_ADDR_BITS": events.ADDR_LEN * 8,
    "AW_V4_OFFSET": events.V4_OFFSET,
    "AW_MAX_RULES": events.MAX_RULES,
    "AW_MAX_AGENTS": events.MAX_AGENTS,
    "AW_SESSION_KERNEL_BIT": events.SESSION_KERNEL_BIT,
    "AW_STATUS_UNSET": events.STATUS_UNSET,
    "AW_ANY_UID": events.ANY_UID,
    "AW_AGENT_PENDING": events.AGENT_PENDING,
    "AW_GENERATIONS": events.GENERATIONS,
    "AW_PORT_SLOTS": events.PORT_SLOTS,
    "AW_NET_GEN_BITS": events.NET_GEN_BITS,
    "AW_SIGKILL": signal.SIGKILL,
}

# #defines only the probes use: Python neither writes nor reads what they size or encode.
KERNEL_ONLY = {
    "AW_BULK_WINDOW_SHIFT", "AW_BULK_BURST",  # the per-process connect-record budget
    "AW_DOOMED_MAX", "AW_MATCH_MAX", "AW_UNTRACKABLE_MAX", "AW_NET_RULES_MAX",
    "AW_NAME_RULES_MAX",  # hash/LPM map sizes (userspace writes fewer entries, or none)
    "AW_SESSION_CPU_SHIFT", "AW_SESSION_CPU_MASK", "AW_SESSION_SEQ_MASK",  # kernel session
    # ids are opaque to userspace beyond AW_SESSION_KERNEL_BIT
    "AW_DATA_LOC_OFFSET_MASK",  # reading the exec tracepoint's filename
}


def test_every_header_define_is_mirrored_or_kernel_only() -> None:
    """A #define added to the header must be mirrored in monitor/model/events.py (and listed
    here) or declared kernel-only; one removed must leave these tables too."""
    grouped = {n for n in H_DEFINES if any(n.startswith(p) for p, _, _ in ENUM_GROUPS)}
    listed = set(SCALARS) | KERNEL_ONLY
    assert not grouped & listed, "a define is both in an enum group and listed"
    assert set(H_DEFINES) - grouped - listed == set(), "header defines with no mirror"
    assert listed - set(H_DEFINES) == set(), "listed here but gone from the header"


@pytest.mark.parametrize(("prefix", "enum_cls", "slots"), ENUM_GROUPS,
                         ids=[e.__name__ for _, e, _ in ENUM_GROUPS])
def test_enum_matches_header_defines(prefix: str, enum_cls: type[enum.Enum],
                                     slots: int | None) -> None:
    group = _group(prefix)
    c_side = {k: v for k, v in group.items() if k != "MAX"}
    py_side = {m.name: int(m.value) for m in enum_cls}
    assert c_side, f"no {prefix}* defines found in {HEADER_H}"
    assert c_side == py_side
    if slots is None:
        assert "MAX" not in group, f"{prefix}MAX has no Python slot count to compare with"
    else:
        assert group["MAX"] == slots, f"{prefix}MAX"
        assert all(0 <= v < slots for v in py_side.values()), (
            f"{enum_cls.__name__} value beyond {prefix}MAX={slots}")


def test_scalar_constants_match_header() -> None:
    assert {k: _c_value(H_DEFINES[k], H_DEFINES) for k in SCALARS} == SCALARS


def test_family_matches_probe_defines() -> None:
    c = _c_defines(BPF_C)
    assert _c_value(c["AW_AF_INET"], c) == Family.INET == socket.AF_INET
    assert _c_value(c["AW_AF_INET6"], c) == Family.INET6 == socket.AF_INET6


def test_socket_kinds_match_probe_defines() -> None:
    c = _c_defines(BPF_C)
    assert _c_value(c["AW_SOCK_DGRAM"], c) == socket.SOCK_DGRAM
    assert _c_value(c["AW_SOCK_RAW"], c) == socket.SOCK_RAW
    assert _c_value(c["AW_IPPROTO_ICMP"], c) == socket.IPPROTO_ICMP
    assert _c_value(c["AW_IPPROTO_ICMPV6"], c) == socket.IPPROTO_ICMPV6


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
    py_fields: list[tuple[str, type, int | None]] = []
    for fname, ftype, *_bits in mirror._fields_:
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
