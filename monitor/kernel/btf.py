"""Read struct member offsets of the RUNNING kernel from its BTF (/sys/kernel/btf/vmlinux).

The kernel headers on these hosts do not match the running kernel, so the probes never
take a struct layout from headers. Where the probes need one (the new program's argv at
exec, for an argv the syscall entry could not read; the executable file's name and link
count at exec), the offset comes from here, from the kernel's own type information, and is
passed to the compiler as a -D constant.

A minimal reader of the BTF format (include/uapi/linux/btf.h): it walks the type section
once and answers offsets of named members, descending into anonymous structs and unions.
Pure parsing; it never writes anything and returns None rather than guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F

# kinds and the size of the data that follows each btf_type (vlen-scaled where noted)
_STRUCT, _UNION = 4, 5
_FIXED = {1: 4, 2: 0, 3: 12, 6: 0, 7: 0, 8: 0, 9: 0, 10: 0, 11: 0, 12: 0, 14: 4, 16: 0,
          17: 4, 18: 0}
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


@dataclass(frozen=True)
class _Member:
    name: str
    type_id: int
    bit_offset: int


class BTF:
    def __init__(self, data: bytes) -> None:
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise ValueError("not little-endian BTF data")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._structs: dict[str, int] = {}
        self._members: dict[int, list[_Member]] = {}
        pos, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
        while pos < end:
            name_off, info, _size = struct.unpack_from("<III", data, pos)
            pos += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            if kind in (_STRUCT, _UNION):
                members = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                    members.append(_Member(self._str(m_name), m_type,
                                           m_off & 0xFFFFFF if kflag else m_off))
                self._members[type_id] = members
                name = self._str(name_off)
                if name and kind == _STRUCT:
                    self._structs.setdefault(name, type_id)
            if kind in _PER_MEMBER:
                pos += _PER_MEMBER[kind] * vlen
            elif kind in _FIXED:
                pos += _FIXED[kind]
            else:
                raise ValueError(f"unknown BTF kind {kind}")
            type_id += 1

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def offset(self, struct_name: str, member: str) -> int | None:
        """Byte offset of `member` in `struct struct_name`, or None if absent."""
        tid = self._structs.get(struct_name)
        return None if tid is None else self._find(tid, member, 0, 0)

    def _find(self, tid: int, member: str, base_bits: int, depth: int) -> int | None:
        if depth > 8:
            return None
        for m in self._members.get(tid, ()):
            if m.name == member:
                return (base_bits + m.bit_offset) // 8
            if not m.name and m.type_id in self._members:  # anonymous struct/union
                found = self._find(m.type_id, member, base_bits + m.bit_offset, depth + 1)
                if found is not None:
                    return found
        return None


def task_offsets(path: Path = VMLINUX) -> dict[str, int] | None:
    """-D constants for the probes: where the new program's argv is (task->mm,
    mm->arg_start/arg_end), the exit status (task->exit_code), and the executable the exec
    runs (mm->exe_file: its inode's link count, its dentry's name); None without BTF or when
    one of them is missing."""
    try:
        btf = BTF(path.read_bytes())
    except (OSError, ValueError, struct.error):
        return None
    wanted = {"AW_TASK_MM_OFF": btf.offset("task_struct", "mm"),
              "AW_MM_ARG_START_OFF": btf.offset("mm_struct", "arg_start"),
              "AW_MM_ARG_END_OFF": btf.offset("mm_struct", "arg_end"),
              "AW_TASK_EXIT_CODE_OFF": btf.offset("task_struct", "exit_code"),
              "AW_MM_EXE_FILE_OFF": btf.offset("mm_struct", "exe_file"),
              "AW_FILE_INODE_OFF": btf.offset("file", "f_inode"),
              "AW_INODE_NLINK_OFF": btf.offset("inode", "i_nlink"),
              # file->f_path.dentry and dentry->d_name.name: members of embedded structs
              "AW_FILE_DENTRY_OFF": _sum(btf.offset("file", "f_path"),
                                         btf.offset("path", "dentry")),
              "AW_DENTRY_NAME_PTR_OFF": _sum(btf.offset("dentry", "d_name"),
                                             btf.offset("qstr", "name"))}
    if any(v is None for v in wanted.values()):
        return None
    return {k: int(v) for k, v in wanted.items() if v is not None}


def _sum(outer: int | None, inner: int | None) -> int | None:
    return None if outer is None or inner is None else outer + inner
