"""What a program interpreter (the dynamic loader) run as a command is asked to run.

`/lib64/ld-linux-x86-64.so.2 [OPTIONS] PROGRAM ARGS...` runs PROGRAM in a process whose
executable and comm are the loader's. This module reads such a command line the way the
loader itself does, so that the monitor can judge the program instead of the loader:

- glibc (elf/rtld.c, checked against glibc 2.36's ld.so): options are read while the next
  argument starts with `--`; `--list`, `--verify`, `--inhibit-cache`, `--list-tunables`,
  `--list-diagnostics` and `--help` take no value; `--library-path`, `--inhibit-rpath`,
  `--audit`, `--preload`, `--argv0`, `--glibc-hwcaps-prepend` and `--glibc-hwcaps-mask`
  take the next argument whatever it looks like, when there is one; any other `--...`
  (`--` itself, `--argv0=X`, a value-taking option with nothing after it) stops the loader
  with a usage error; `--version` exits at once. The first argument not starting with `--`
  is the program (`-x` too). A name without `/` is looked up only in /etc/ld.so.cache and the
  system library directories, never in the working directory.
- musl (ldso/dynlink.c): the same loop, but `--` ends the options, `--opt=VALUE` is
  accepted for `--library-path`, `--preload` and `--argv0`, `--list` (or a loader name
  ending in `ldd`) only lists, anything else is a usage error; the program is opened as
  named (a name without `/` relative to the working directory).

`parse` gives a LoaderArgs: the program as named, the argv the program sees (argv[0] the
`--argv0` value when given), the loader options seen, and `problem` when the loader would
not simply run the program (a listing mode, a usage error, no program). `possible_programs`
lists every argument that could be the program under a reading other than ours: the
conservative set the monitor judges when `problem` is set or the loader's kind is unknown.

ELF recognition (`interpreter_kind`) reads the file through a callable the caller gives;
this module itself does no I/O and imports nothing but the standard library.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

GLIBC = "glibc"
MUSL = "musl"
UNKNOWN = "unknown"  # an interpreter by its name or symbols, of no kind we know the options of

MAX_POSSIBLE = 16  # arguments judged as possible programs when the reading is uncertain

_GLIBC_FLAGS = {"--list": "lists the program's libraries",
                "--verify": "only checks the program",
                "--inhibit-cache": None,
                "--list-tunables": "only lists tunables",
                "--list-diagnostics": "only lists diagnostics",
                "--help": "only prints its help"}
_GLIBC_VALUED = frozenset({"--library-path", "--inhibit-rpath", "--audit", "--preload",
                           "--argv0", "--glibc-hwcaps-prepend", "--glibc-hwcaps-mask"})
_MUSL_VALUED = ("library-path", "preload", "argv0")

# ld-linux-x86-64.so.2, ld-2.31.so, ld.so, ld.so.1, ld64.so.2, ld-musl-x86_64.so.1, ...
_INTERPRETER_NAME = re.compile(r"ld(-[^/]*|64)?\.so(\.[^/]*)?|ld-musl-[^/]*\.so[^/]*")


@dataclass(frozen=True)
class LoaderArgs:
    """A loader's command line, read as the loader reads it."""

    program: str | None  # as named on the command line (None: no program)
    argv: tuple[str, ...]  # as the program sees it; () when there is no program
    options: tuple[str, ...]  # the loader's own options, in order, without their values
    problem: str | None = None  # why the loader would not simply run the program

    @property
    def runs(self) -> bool:
        return self.program is not None and self.problem is None


def is_interpreter_name(base: str) -> bool:
    """Whether a file's base name is one a program interpreter goes by."""
    return _INTERPRETER_NAME.fullmatch(base) is not None


def parse(argv: Sequence[str], kind: str) -> LoaderArgs:
    """argv (the loader's, argv[0] included) read as a loader of this kind reads it; for an
    unknown kind, glibc's reading with a problem unless musl's agrees with it."""
    if kind == GLIBC:
        return parse_glibc(argv)
    if kind == MUSL:
        return parse_musl(argv)
    glibc, musl = parse_glibc(argv), parse_musl(argv)
    if glibc == musl:
        return glibc
    return LoaderArgs(glibc.program, glibc.argv, glibc.options,
                      glibc.problem or "a loader of unknown kind: options read as glibc's")


def parse_glibc(argv: Sequence[str]) -> LoaderArgs:
    options: list[str] = []
    problem: str | None = None
    argv0: str | None = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in _GLIBC_FLAGS:
            options.append(arg)
            problem = _GLIBC_FLAGS[arg] or problem
            i += 1
        elif arg in _GLIBC_VALUED and i + 1 < len(argv):
            options.append(arg)
            if arg == "--argv0":
                argv0 = argv[i + 1]
            i += 2
        elif arg == "--version":
            return LoaderArgs(None, (), (*options, arg), "only prints its version")
        elif arg.startswith("--"):
            return LoaderArgs(None, (), tuple(options),
                              f"unrecognized option {arg!r}: the loader exits")
        else:
            break
    return _program(argv, i, argv0, options, problem)


def parse_musl(argv: Sequence[str]) -> LoaderArgs:
    options: list[str] = []
    problem = "lists the program's libraries" if argv and argv[0].endswith("ldd") else None
    argv0: str | None = None
    i = 1
    while i < len(argv) and argv[i].startswith("--"):
        opt = argv[i][2:]
        i += 1
        if not opt:
            break
        if opt == "list":
            options.append("--list")
            problem = "lists the program's libraries"
            continue
        name = next((n for n in _MUSL_VALUED if opt.startswith(n)), None)
        if name is None or opt[len(name):] and not opt[len(name):].startswith("="):
            return LoaderArgs(None, (), tuple(options),
                              f"unrecognized option {argv[i - 1]!r}: the loader exits")
        options.append("--" + name)
        if opt != name:
            value: str | None = opt[len(name) + 1:]
        elif i < len(argv):
            value, i = argv[i], i + 1
        else:
            value = None
        if name == "argv0" and value is not None:
            argv0 = value
    return _program(argv, i, argv0, options, problem)


def _program(argv: Sequence[str], i: int, argv0: str | None, options: list[str],
             problem: str | None) -> LoaderArgs:
    if i >= len(argv):
        return LoaderArgs(None, (), tuple(options), "no program named: the loader exits")
    program = argv[i]
    return LoaderArgs(program, (argv0 if argv0 is not None else program, *argv[i + 1:]),
                      tuple(options), problem)


def possible_programs(argv: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Every argument after the loader's own name that some reading of the options could
    make the program, with the argv it would see (at most MAX_POSSIBLE): all but those
    starting with `--` (neither loader runs one, unless right after musl's `--`)."""
    found = []
    for i in range(1, len(argv)):
        arg = argv[i]
        if arg.startswith("--") and argv[i - 1] != "--":
            continue
        found.append((arg, tuple(argv[i:])))
        if len(found) >= MAX_POSSIBLE:
            break
    return found


# --- ELF: is this file a program interpreter, and of which kind -------------------------------

ELF_MAGIC = b"\x7fELF"
HEAD_SIZE = 64  # the ELF header of either class
MAX_PHDRS = 256
MAX_DYNAMIC = 64 * 1024  # bytes of the dynamic segment read
MAX_DYNSTR = 1 << 20  # bytes of the dynamic string table read
_ET_DYN = 3
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_STRTAB, _DT_STRSZ, _DT_SONAME = 0, 5, 10, 14

Read = Callable[[int, int], bytes]
"""read(offset, size): at most size bytes of the file from offset (fewer at its end)."""


def interpreter_kind(read: Read) -> str | None:
    """GLIBC, MUSL or UNKNOWN when the file is a program interpreter, None when it is not
    (or is no ELF file, or one too damaged to tell).

    An interpreter is a position-independent (ET_DYN) ELF file with an entry point and a
    dynamic segment but no PT_INTERP of its own, which defines the loader's symbols: glibc's
    ld.so carries GLIBC_PRIVATE and _rtld_global (libc.so.6 needs both from it, so even a
    patched copy keeps them), musl's libc.so __libc_start_main and __tls_get_addr. A copy
    under any name is recognised; a static-pie program (no loader symbols) is not.
    """
    head = read(0, HEAD_SIZE)
    if len(head) < 52 or head[:4] != ELF_MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    wide, end = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide:
        if len(head) < 64:
            return None
        e_type, entry, phoff = struct.unpack_from(end + "H6xQQ", head, 16)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        ph_fmt, ph_size = end + "IIQQQQ", 56  # type, flags, offset, vaddr, paddr, filesz
    else:
        e_type, entry, phoff = struct.unpack_from(end + "H6xII", head, 16)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
        ph_fmt, ph_size = end + "IIII4xI", 32  # type, offset, vaddr, paddr, filesz
    if e_type != _ET_DYN or not entry or phentsize != ph_size or not 0 < phnum <= MAX_PHDRS:
        return None
    table = read(phoff, phentsize * phnum)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for n in range(min(phnum, len(table) // phentsize)):
        fields = struct.unpack_from(ph_fmt, table, n * phentsize)
        if wide:
            p_type, _flags, offset, vaddr, _paddr, filesz = fields
        else:
            p_type, offset, vaddr, _paddr, filesz = fields
        if p_type == _PT_INTERP:
            return None  # a program that has an interpreter is not one
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return None
    strtab, strsz, soname = _dynamic(read(dynamic[0], min(dynamic[1], MAX_DYNAMIC)), wide, end)
    where = next((off + strtab - va for va, off, size in loads if va <= strtab < va + size),
                 None) if strtab is not None else None
    strings = read(where, min(strsz or MAX_DYNSTR, MAX_DYNSTR)) if where is not None else b""
    return _kind(strings, soname)


def _dynamic(raw: bytes, wide: bool, end: str) -> tuple[int | None, int | None, int | None]:
    """(DT_STRTAB, DT_STRSZ, DT_SONAME) of a dynamic segment."""
    fmt, size = (end + "qQ", 16) if wide else (end + "iI", 8)
    found: dict[int, int] = {}
    for n in range(len(raw) // size):
        tag, value = struct.unpack_from(fmt, raw, n * size)
        if tag == _DT_NULL:
            break
        if tag in (_DT_STRTAB, _DT_STRSZ, _DT_SONAME):
            found.setdefault(tag, value)
    return found.get(_DT_STRTAB), found.get(_DT_STRSZ), found.get(_DT_SONAME)


def _kind(strings: bytes, soname_at: int | None) -> str | None:
    if b"\0GLIBC_PRIVATE\0" in strings and b"\0_rtld_global\0" in strings:
        return GLIBC
    if b"\0__libc_start_main\0" in strings and b"\0__tls_get_addr\0" in strings:
        return MUSL
    soname = b""
    if soname_at is not None and 0 <= soname_at < len(strings):
        soname = strings[soname_at:strings.find(b"\0", soname_at) % (len(strings) + 1)]
    name = soname.decode("ascii", "replace")
    if name and is_interpreter_name(name) or b"\0_dl_argv\0" in strings:
        return UNKNOWN
    return None
