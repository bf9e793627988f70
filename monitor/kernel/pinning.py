"""Keep the probes attached when the monitor dies: BPF links pinned in bpffs.

BCC attaches tracepoint programs through perf events that close with the process. Here each
program is re-attached through a BPF link (perf-event links for tracepoints, cgroup links
for the connect hooks) and the link is pinned under PIN_DIR/links, so the kernel goes on
tracking forks, enforcing in-kernel rules and (fail-closed) killing orphaned agents while
no monitor runs. A restarted monitor attaches its own programs first, then unpins the old
links, so there is never a moment without a probe. `detach()` removes everything.

Thin ctypes wrappers over bpf(2) and perf_event_open(2); no policy here.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from pathlib import Path
from typing import Any

from monitor.model.errors import EnvironmentProblem

_libc = ct.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64
_SYS_PERF_EVENT_OPEN = 298
_BPF_OBJ_PIN = 6
_BPF_LINK_CREATE = 28
_BPF_PERF_EVENT = 41
_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8
BPFFS = Path("/sys/fs/bpf")


def _errno(what: str) -> OSError:
    err = ct.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _bpf(cmd: int, attr: bytearray) -> int:
    buf = (ct.c_char * len(attr)).from_buffer(attr)
    return int(_libc.syscall(_SYS_BPF, cmd, buf, len(attr)))


def perf_tracepoint(tp_id: int) -> int:
    attr = bytearray(128)
    # type, size, config, sample_period, sample_type (PERF_SAMPLE_RAW)
    struct.pack_into("<IIQQQ", attr, 0, _PERF_TYPE_TRACEPOINT, 128, tp_id, 1, 1 << 10)
    buf = (ct.c_char * 128).from_buffer(attr)
    fd = int(_libc.syscall(_SYS_PERF_EVENT_OPEN, buf, -1, 0, -1, _PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        raise _errno("perf_event_open")
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    attr = bytearray(64)
    struct.pack_into("<IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    fd = _bpf(_BPF_LINK_CREATE, attr)
    if fd < 0:
        raise _errno("bpf(BPF_LINK_CREATE)")
    return fd


def obj_pin(fd: int, path: Path) -> None:
    name = ct.create_string_buffer(str(path).encode())
    attr = bytearray(16)
    struct.pack_into("<QI", attr, 0, ct.addressof(name), fd)
    if _bpf(_BPF_OBJ_PIN, attr) < 0:
        raise _errno(f"bpf(BPF_OBJ_PIN, {path})")


def ensure_bpffs(pin_dir: Path) -> None:
    if not os.path.ismount(BPFFS):
        rc = os.system(f"mount -t bpf bpf {BPFFS} 2>/dev/null")
        if rc != 0:
            raise EnvironmentProblem(f"bpffs is not mounted at {BPFFS} and mounting it failed:"
                                     f" run `mount -t bpf bpf {BPFFS}` to let probes outlive "
                                     "the monitor (or leave monitor.pin_dir empty)")
    if not str(pin_dir).startswith(str(BPFFS) + "/"):
        raise EnvironmentProblem(f"monitor.pin_dir {pin_dir} must be under {BPFFS}")
    (pin_dir / "links").mkdir(parents=True, exist_ok=True)


class PinnedLinks:
    """The links of one monitor instance, pinned under pin_dir/links."""

    def __init__(self, pin_dir: str | Path) -> None:
        self.dir = Path(pin_dir) / "links"
        self._fds: list[int] = []

    def _pin(self, name: str, link_fd: int) -> None:
        mine = self.dir / f"{name}@{os.getpid()}"
        mine.unlink(missing_ok=True)
        obj_pin(link_fd, mine)
        self._fds.append(link_fd)
        for old in self.dir.glob(f"{name}@*"):  # a previous monitor's: now detached
            if old != mine:
                old.unlink(missing_ok=True)

    def take_over_tracepoints(self, bpf: Any, tracefs: Path) -> int:
        """Move every tracepoint BCC attached onto a pinned link. Returns how many."""
        from bcc import BPF

        count = 0
        for tp in list(bpf.tracepoint_fds):
            cat, event = tp.decode().split(":", 1)
            fn = bpf.load_func(f"tracepoint__{cat}__{event}".encode(), BPF.TRACEPOINT)
            tp_id = int((tracefs / "events" / cat / event / "id").read_text())
            # the same program cannot sit twice on one tracepoint: detach BCC's first
            bpf.detach_tracepoint(tp)
            perf_fd = perf_tracepoint(tp_id)
            link = link_create(fn.fd, perf_fd, _BPF_PERF_EVENT)
            os.close(perf_fd)  # the link holds the event
            self._pin(f"tp-{cat}-{event}", link)
            count += 1
        return count

    def cgroup(self, name: str, prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
        self._pin(f"cgroup-{name}", link_create(prog_fd, cgroup_fd, attach_type))

    def close(self) -> None:
        """Close this process's link fds; the pins keep the programs attached."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def detach(pin_dir: str | Path) -> list[str]:
    """Remove every pin (links and maps): the probes detach once nothing holds them."""
    removed = []
    root = Path(pin_dir)
    for path in sorted(root.glob("links/*")) + sorted(root.glob("*")):
        if path.is_file() or not path.is_dir():
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for d in (root / "links", root):
        try:
            d.rmdir()
        except OSError:
            continue
    return removed
