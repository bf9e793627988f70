"""monitor.model.ldso against the real loaders: what the parser says a loader runs, and with
which argv, is what the loader on this machine runs (no root needed: the loader is run
directly, a Python program as its program reports the argv it got); and which files are
program interpreters, by content (the real one, a renamed copy, programs, garbage).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.model import ldso
from monitor.model.ldso import GLIBC, MUSL, UNKNOWN

GLIBC_LD = "/lib64/ld-linux-x86-64.so.2"
MUSL_LD = "/lib/ld-musl-x86_64.so.1"  # Debian's musl package
PY = os.path.realpath(sys.executable)  # an ELF program that can say what argv it got
REPORT = ["-c", "import sys, json; print(json.dumps(sys.orig_argv))", "a b", "--argv0"]


def run(loader: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([loader, *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


needs_glibc = pytest.mark.skipif(not os.path.exists(GLIBC_LD), reason="no glibc loader")
# `make test` installs musl (packaging/setup-test.sh): in CI its absence fails, never skips
needs_musl = pytest.mark.skipif(not os.path.exists(MUSL_LD) and os.environ.get("CI") != "true",
                                reason="no musl loader (apt-get install musl)")


# --- glibc: the parser agrees with the loader -----------------------------------------------

RUNS = [
    [PY, *REPORT],
    ["--argv0", "foo", PY, *REPORT],
    ["--argv0", "", PY, *REPORT],
    ["--argv0", "--help", PY, *REPORT],  # a value is taken whatever it looks like
    ["--inhibit-cache", "--argv0", "a", "--argv0", "b", PY, *REPORT],  # the last one wins
    ["--library-path", "/nonexistent", "--inhibit-rpath", "x", PY, *REPORT],
    ["--glibc-hwcaps-mask", "x86-64-v2", "--glibc-hwcaps-prepend", "x", "--argv0", "z",
     PY, *REPORT],
    ["--preload", "", "--argv0", "ssh", PY, *REPORT],
    ["--argv0", "x", "--library-path", "--argv0", PY, *REPORT],
]


@needs_glibc
@pytest.mark.parametrize("args", RUNS, ids=lambda a: " ".join(a[:4]))
def test_glibc_reading_gives_the_program_and_the_argv_it_sees(args: list[str]) -> None:
    got = run(GLIBC_LD, *args)
    assert got.returncode == 0, got.stderr
    seen = json.loads(got.stdout)
    parsed = ldso.parse([GLIBC_LD, *args], GLIBC)
    assert parsed.runs and parsed.program == PY
    assert list(parsed.argv) == seen


NOT_RUN = [
    ["--bogus", PY, *REPORT],  # an unknown option: a usage error
    ["--", PY, *REPORT],  # glibc has no end-of-options marker
    ["--argv0=foo", PY, *REPORT],  # nor --opt=value
    ["--argv0"],  # a value-taking option with nothing after it
    ["--library-path"],
    ["--help", PY, *REPORT],
    ["--version", PY, *REPORT],
    ["--list", PY],
    ["--verify", PY],
    ["--list-tunables", PY],
    [],
]


@needs_glibc
@pytest.mark.parametrize("args", NOT_RUN, ids=lambda a: " ".join(a[:2]) or "nothing")
def test_glibc_reading_knows_when_the_program_does_not_run(args: list[str]) -> None:
    got = run(GLIBC_LD, *args)
    assert '["' not in got.stdout  # the program never printed its argv
    parsed = ldso.parse([GLIBC_LD, *args], GLIBC)
    assert not parsed.runs and parsed.problem


@needs_glibc
@pytest.mark.parametrize("name", ["-x", "./no-such-program", "no-such-program"])
def test_glibc_takes_the_first_argument_not_starting_with_two_dashes(name: str,
                                                                     tmp_path: Path) -> None:
    got = subprocess.run([GLIBC_LD, name, "arg"], capture_output=True, text=True, timeout=30,
                         cwd=tmp_path)
    assert got.returncode == 127 and f"{name}: cannot open shared object file" in got.stderr
    assert ldso.parse([GLIBC_LD, name, "arg"], GLIBC).program == name


@needs_glibc
def test_glibc_does_not_look_for_a_bare_name_in_the_working_directory(tmp_path: Path) -> None:
    shutil.copy(PY, tmp_path / "mine")
    got = subprocess.run([GLIBC_LD, "mine", *REPORT], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert got.returncode == 127 and not got.stdout
    got = subprocess.run([GLIBC_LD, "./mine", *REPORT], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert json.loads(got.stdout) == ["./mine", *REPORT]


# --- musl ------------------------------------------------------------------------------------

MUSL_CASES = [
    (["/bin/true"], "/bin/true", ("/bin/true",)),
    (["--argv0", "foo", "/bin/true", "x"], "/bin/true", ("foo", "x")),
    (["--argv0=foo", "--", "/bin/true", "x"], "/bin/true", ("foo", "x")),
    (["--library-path=/x", "--preload", "", "--", "--list", "x"], "--list", ("--list", "x")),
    (["--", "/bin/true"], "/bin/true", ("/bin/true",)),
]


@needs_musl
@pytest.mark.parametrize("args,program,argv", MUSL_CASES, ids=lambda a: str(a))
def test_musl_reading_gives_the_program_it_opens(args: list[str], program: str,
                                                 argv: tuple[str, ...], tmp_path: Path) -> None:
    got = subprocess.run([MUSL_LD, *args], capture_output=True, text=True, timeout=30,
                         cwd=tmp_path)
    # musl cannot run glibc's programs; it names the file it opened when it says so
    assert f"{program}:" in got.stderr or f"relocating {program}:" in got.stderr, got.stderr
    parsed = ldso.parse([MUSL_LD, *args], MUSL)
    assert parsed.runs and (parsed.program, parsed.argv) == (program, argv)


@needs_musl
@pytest.mark.parametrize("args", [["--bogus", "/bin/true"], ["--argv0x", "/bin/true"],
                                  ["--argv0"], [], ["--li", "/bin/true"]])
def test_musl_reading_knows_its_usage_errors(args: list[str]) -> None:
    got = run(MUSL_LD, *args)
    assert got.returncode == 1 and "Usage:" in got.stderr
    assert ldso.parse([MUSL_LD, *args], MUSL).program is None


def test_musl_lists_under_a_name_ending_in_ldd_or_with_list() -> None:
    assert ldso.parse(["/usr/bin/ldd", "/bin/x"], MUSL).problem
    assert ldso.parse(["ld-musl", "--list", "/bin/x"], MUSL).problem
    assert ldso.parse(["ld-musl", "/bin/x"], MUSL).runs


def test_an_unknown_kind_is_read_as_glibc_but_never_as_certain() -> None:
    same = ldso.parse(["ld.so", "--argv0", "a", "/p", "x"], UNKNOWN)
    assert same.runs and same.argv == ("a", "x")  # both readings agree
    differs = ldso.parse(["ld.so", "--argv0=a", "/p"], UNKNOWN)
    assert not differs.runs and differs.problem


def test_possible_programs_are_every_argument_but_options() -> None:
    found = ldso.possible_programs(["ld.so", "--weird", "v", "--argv0", "z", "/p", "x"])
    assert [p for p, _ in found] == ["v", "z", "/p", "x"]
    assert [p for p, _ in ldso.possible_programs(["ld", "--", "--list"])] == ["--list"]
    assert dict(found)["/p"] == ("/p", "x")
    many = ldso.possible_programs(["ld.so", *(f"a{i}" for i in range(100))])
    assert len(many) == ldso.MAX_POSSIBLE


@pytest.mark.parametrize("name,yes", [
    ("ld-linux-x86-64.so.2", True), ("ld-linux.so.2", True), ("ld-linux-aarch64.so.1", True),
    ("ld.so", True), ("ld.so.1", True), ("ld64.so.2", True), ("ld-2.31.so", True),
    ("ld-musl-x86_64.so.1", True), ("ld", False), ("ldd", False), ("libc.so.6", False),
    ("ld-linux", False), ("sold.so", False), ("xmrig", False)])
def test_interpreter_names(name: str, yes: bool) -> None:
    assert ldso.is_interpreter_name(name) is yes


# --- ELF: which files are interpreters -------------------------------------------------------


def kind_of_file(path: str | Path) -> str | None:
    with open(path, "rb") as f:
        def read(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)
        return ldso.interpreter_kind(read)


@needs_glibc
def test_the_glibc_loader_and_a_renamed_copy_are_interpreters(tmp_path: Path) -> None:
    assert kind_of_file(GLIBC_LD) == GLIBC
    copy = tmp_path / "innocent-tool"
    shutil.copy(GLIBC_LD, copy)
    assert kind_of_file(copy) == GLIBC


@needs_musl
def test_the_musl_loader_is_an_interpreter() -> None:
    assert kind_of_file(MUSL_LD) == MUSL


@pytest.mark.parametrize("path", ["/bin/true", "/bin/sh", PY, "/sbin/ldconfig",
                                  "/lib/x86_64-linux-gnu/libc.so.6"])
def test_programs_static_pie_and_libraries_are_not(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    assert kind_of_file(path) is None


@needs_glibc
def test_damaged_files_are_not_interpreters(tmp_path: Path) -> None:
    real = Path(GLIBC_LD).read_bytes()
    cases = {"empty": b"", "short": b"\x7fELF\x02\x01", "garbage": os.urandom(4096),
             "head-only": real[:64], "head-and-phdrs": real[:1024],
             "huge-phnum": real[:56] + b"\xff\xff" + real[58:4096],
             "text": b"#!/bin/sh\necho hi\n" * 100}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert kind_of_file(tmp_path / name) is None, name


@needs_glibc
def test_mutated_loaders_never_raise(tmp_path: Path) -> None:
    import random
    real = bytearray(Path(GLIBC_LD).read_bytes()[:8192])
    rng = random.Random(12)
    for _ in range(3000):
        data = bytearray(real)
        for _ in range(rng.randint(1, 12)):
            at = rng.randrange(0, 512)  # the ELF header and program headers
            data[at] = rng.randrange(256)
        def read(offset: int, size: int, data: bytes = bytes(data)) -> bytes:
            return data[offset:offset + size]
        assert ldso.interpreter_kind(read) in (None, GLIBC, MUSL, UNKNOWN)
