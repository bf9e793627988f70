"""The ctypes mirror in monitor/kernel/abi.py against the layout clang compiled from
probes/agentwatch.h (Tetragon's alignchecker idea): every field at the same offset and size."""

from __future__ import annotations

import ctypes as ct
from typing import Any

import pytest
from conftest import cannot_run, require_root

from monitor.kernel.abi import MIRRORS
from monitor.kernel.host import check_host, probes_dir


@pytest.fixture(scope="module")
def compiled() -> Any:
    require_root()
    check_host()
    from bcc import BPF

    src = probes_dir()
    text = '#include "agentwatch.h"\n' + "".join(
        f"BPF_ARRAY(layout_{name}, struct {name}, 1);\n" for name in MIRRORS)
    try:
        b = BPF(text=text.encode(), cflags=[f"-I{src}", "-Wno-macro-redefined",
                                            "-Wno-ignored-attributes"])
    except Exception as e:  # BCC raises bare Exception on compile errors
        cannot_run(f"BCC could not compile the layout probe: {e}")
    yield b
    b.cleanup()


def _fields(cls: type[ct.Structure], base: int = 0, prefix: str = "") -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, ftype, *_ in cls._fields_:
        if name.startswith("__pad"):
            continue
        desc = getattr(cls, name)
        off = base + desc.offset
        if isinstance(ftype, type) and issubclass(ftype, ct.Structure):
            out.update(_fields(ftype, off, f"{prefix}{name}."))
        else:
            out[prefix + name] = (off, desc.size)
    return out


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_mirror_matches_compiled_layout(compiled: Any, name: str) -> None:
    leaf = compiled[f"layout_{name}".encode()].Leaf
    mirror = MIRRORS[name]
    assert ct.sizeof(mirror) == ct.sizeof(leaf), f"sizeof(struct {name})"
    theirs = _fields(leaf)
    ours = _fields(mirror)
    assert ours == theirs
