"""Compile, load and attach the BPF probes (probes/agentwatch.bpf.c) through BCC.

The one module that loads BCC's BPF object: it checks the host first (monitor/kernel/host.py),
compiles the probes with constants passed as -D flags, attaches the tracepoints and the
cgroup connect and sendmsg hooks (pinned when asked, monitor/kernel/pinning.py) and reads the ring
buffers. `Probes` is that loaded object; the reads and writes of its maps are inherited
from monitor/kernel/mapio.py. It never decides policy: it only moves bytes between the
kernel and typed Python values.
"""

from __future__ import annotations

import ctypes as ct
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.kernel.abi import size_cflags
from monitor.kernel.btf import VMLINUX, task_offsets
from monitor.kernel.host import BPF_SOURCE, TRACEFS, cgroup2_root, check_host, probes_dir
from monitor.kernel.mapio import RuleMaps
from monitor.kernel.pinning import PinnedLinks, ensure_bpffs, link_create
from monitor.model.errors import EnvironmentProblem
from monitor.model.events import Setting

_MADV_PAGEOUT = 21  # Linux 5.4+
_COMPILER_LIBS = ("/libLLVM", "/libclang")
RINGS = (b"decisions", b"events")
# the cgroup programs: name -> (where it attaches, its program type). Connects; UDP datagrams
# sent with an address (sendto/sendmsg/sendmmsg/io_uring), which never pass the connect
# hooks; raw and ICMP sockets, whose datagrams pass neither (judged when they are made)
CGROUP_HOOKS = {b"aw_connect4": ("CGROUP_INET4_CONNECT", "CGROUP_SOCK_ADDR"),
                b"aw_connect6": ("CGROUP_INET6_CONNECT", "CGROUP_SOCK_ADDR"),
                b"aw_sendmsg4": ("CGROUP_UDP4_SENDMSG", "CGROUP_SOCK_ADDR"),
                b"aw_sendmsg6": ("CGROUP_UDP6_SENDMSG", "CGROUP_SOCK_ADDR"),
                b"aw_sock_create": ("CGROUP_INET_SOCK_CREATE", "CGROUP_SOCK")}


@dataclass(frozen=True)
class ProbeOptions:
    max_procs: int = 65536
    ringbuf_mib: int = 8
    trace_all: bool = False
    pin_dir: str = ""  # bpffs dir: probes and tree state outlive the monitor (pinning.py)

    def cflags(self, include: Path) -> list[str]:
        pages = self.ringbuf_mib * 1024 * 1024 // 4096
        return [
            f"-I{include}",
            f"-DAW_MAX_PROCS={int(self.max_procs)}",
            f"-DAW_RINGBUF_PAGES={int(pages)}",
            f"-DAW_TRACE_ALL={1 if self.trace_all else 0}",
            "-Wno-macro-redefined",
            "-Wno-ignored-attributes",
            *size_cflags(),
            *([f'-DAW_PIN_DIR="{self.pin_dir}"'] if self.pin_dir else []),
        ]


class Probes(RuleMaps):
    """The loaded BPF object: attach on open(), detach on close(); its maps through the
    methods of RuleMaps and ProbeMaps (monitor/kernel/mapio.py)."""

    def __init__(self, options: ProbeOptions | None = None) -> None:
        self.options = options or ProbeOptions()
        super().__init__(self.options.max_procs)
        self.attached = 0
        self.expected = 0
        self._cgroup_links: list[int] = []
        self._links: PinnedLinks | None = None
        self._epoll: select.epoll | None = None  # the rings' map fds and _wake_fd
        self._wake_fd: int | None = None
        self._wake_lock = threading.Lock()  # a wake() never writes to an fd close() freed

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._open()
        except OSError as e:  # a sandbox hiding /lib/modules, a read-only bpffs, ...
            self.close()
            raise EnvironmentProblem(f"loading the probes failed: {e}; check the service's "
                                     "sandboxing (docs/service.md) and `make setup`") from None

    def _open(self) -> None:
        check_host()
        from bcc import BPF  # imported here: only the loader needs BCC

        src = probes_dir()
        if self.options.pin_dir:
            ensure_bpffs(Path(self.options.pin_dir))
        offsets = task_offsets()
        if offsets is None:
            raise EnvironmentProblem(
                f"the kernel's BTF ({VMLINUX}) is missing or lacks task_struct, mm_struct, "
                "file, inode or dentry: agentwatch reads argv, exit codes and the executable's "
                "name at offsets it gives; use a kernel built "
                "with CONFIG_DEBUG_INFO_BTF=y (Debian's, Ubuntu's and RHEL's are)")
        extra = [f"-D{k}={v}" for k, v in offsets.items()]
        try:
            self._bpf = BPF(
                src_file=str(src / BPF_SOURCE).encode(),
                cflags=self.options.cflags(src) + extra,
            )
        except Exception as e:  # BCC raises bare Exception for compile and load failures
            raise EnvironmentProblem(
                f"loading the BPF probes failed ({e}); check that the kernel has BPF and "
                "tracepoints enabled and that `make setup` installed matching headers"
            ) from None
        self.attached = int(self._bpf.num_open_tracepoints())
        text = (src / BPF_SOURCE).read_text()
        # tracepoints, plus the cgroup connect and sendmsg hooks attach_cgroup() adds
        self.expected = text.count("\nTRACEPOINT_PROBE(") + len(CGROUP_HOOKS)
        if self.options.pin_dir:
            self._links = PinnedLinks(self.options.pin_dir)
            try:
                self.attached = self._links.take_over_tracepoints(self._bpf, TRACEFS)
            except OSError as e:
                raise EnvironmentProblem(f"pinning the probes under {self.options.pin_dir} "
                                         f"failed ({e}); leave monitor.pin_dir empty on "
                                         "kernels without BPF links") from None
        self.set_setting(Setting.MONITOR_TGID, os.getpid())

    def close(self) -> None:
        """Detach. With a pin_dir the pinned links keep the probes attached (the service
        never leaves agents unwatched); `agentwatch detach` removes them."""
        if self._epoll is not None:
            with self._wake_lock:
                fd, self._wake_fd = self._wake_fd, None
                if fd is not None:
                    os.close(fd)
            self._epoll.close()
            self._epoll = None
        if self._bpf is not None:
            self._detach_cgroup()
            if self._links is not None:
                self._links.close()
                self._links = None
            self._bpf.cleanup()
            self._bpf = None
            self.attached = 0

    # --- cgroup connect hooks ----------------------------------------------------------

    def attach_cgroup(self, path: str | None = None) -> str:
        """Attach the connect4/connect6, sendmsg4/sendmsg6 and sock_create hooks (they
        report connects and datagram sends and enforce the kernel connect rules on them, and
        on raw and ICMP sockets) at the cgroup v2 root through BPF links
        (other programs stay attached beside them). An unpinned link detaches when the
        monitor exits, however it exits; a pinned one (pin_dir) outlives it on purpose.
        Returns the cgroup path."""
        from bcc import BPF, BPFAttachType

        root = path or cgroup2_root()
        if root is None:
            raise EnvironmentProblem("no cgroup v2 hierarchy is mounted: mount one with "
                                     "`mount -t cgroup2 none /sys/fs/cgroup/unified`; "
                                     "agentwatch sees connects through cgroup hooks")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        links: list[int] = []
        try:
            for name, (where, prog_type) in CGROUP_HOOKS.items():
                kind = getattr(BPFAttachType, where)
                fn = self.bpf.load_func(name, getattr(BPF, prog_type), None, kind)
                if self._links is not None:
                    self._links.cgroup(name.decode(), fn.fd, fd, kind)
                else:
                    links.append(link_create(fn.fd, fd, kind))
        except Exception as e:  # BCC raises bare Exception; link_create raises OSError
            for link in links:
                os.close(link)
            raise EnvironmentProblem(f"attaching the cgroup connect/sendmsg hooks at {root} "
                                     f"failed ({e})") from None
        finally:
            os.close(fd)  # links hold the cgroup themselves
        self._cgroup_links = links
        self.attached += len(CGROUP_HOOKS)
        return root

    def release_compiler(self) -> int:
        """Give back the memory of the one compile: once the programs are loaded, BCC's
        in-process clang/LLVM is not run again, yet its code pages (about 85 MiB of
        libLLVM and libclang-cpp on Debian 12) and freed heap stay resident. malloc_trim
        returns the heap; MADV_PAGEOUT drops the libraries' clean file-backed pages, which
        fault back in from the page cache if ever touched again (never a correctness
        issue: only clean pages are reclaimed). Returns the mappings paged out."""
        libc = ct.CDLL(None, use_errno=True)
        try:
            libc.malloc_trim(0)
        except AttributeError:  # not glibc
            pass
        madvise = libc.madvise
        madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
        done = 0
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return 0
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or not any(lib in parts[5] for lib in _COMPILER_LIBS):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if madvise(start, end - start, _MADV_PAGEOUT) == 0:
                done += 1
        return done

    def _detach_cgroup(self) -> None:
        for link in self._cgroup_links:
            os.close(link)
        self._cgroup_links = []

    def __enter__(self) -> Probes:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- events ------------------------------------------------------------------------

    def on_record(self, callback: Callable[[bytes], None]) -> None:
        """Call `callback` with each raw ring-buffer record during poll(): the `decisions`
        ring (execs, verdicts, forks, exits) first, then the bulk `events` ring (connects),
        so a process's fork and exec are folded in before what it does after them."""

        def _cb(_ctx: Any, data: Any, size: int) -> int:
            callback(ct.string_at(data, size))
            return 0

        for ring in RINGS:  # libbpf consumes rings in the order they were added
            self.bpf[ring].open_ring_buffer(_cb)
        self._watch_rings()

    def _watch_rings(self) -> None:
        """Wait for the rings here (epoll on their map fds, as libbpf's poll does) together
        with an eventfd that wake() writes, so another thread can cut the wait short."""
        self._epoll = select.epoll()
        for ring in RINGS:
            self._epoll.register(self.bpf[ring].map_fd, select.EPOLLIN)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)

    def wake(self) -> None:
        """End the current (or next) poll() now: another thread has work for the loop."""
        with self._wake_lock:
            if self._wake_fd is not None:
                os.eventfd_write(self._wake_fd, 1)

    def poll(self, timeout_ms: int = 100) -> None:
        """Wait up to timeout_ms for a wakeup (a ring's, or wake()'s), then read every
        record. Records submitted without a wakeup (probes: wake_flags) never make epoll
        ready by themselves, so the read after the wait is what picks them up."""
        if self._epoll is None:
            raise RuntimeError("poll() before on_record(): no ring is open")
        for fd, _ in self._epoll.poll(timeout_ms / 1000):
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass  # another poll took it
        self.bpf.ring_buffer_consume()

    def drain(self) -> None:
        self.bpf.ring_buffer_consume()
