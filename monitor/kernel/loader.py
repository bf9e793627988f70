"""Load, attach and talk to the BPF probes (probes/agentwatch.bpf.c) through BCC.

The one place that imports BCC. It checks what the host must have first and turns every
missing piece into an EnvironmentProblem with one sentence saying how to get it. It never
decides policy: it only moves bytes between the kernel maps and typed Python values.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.kernel.btf import VMLINUX, task_offsets
from monitor.kernel.pinning import PinnedLinks, ensure_bpffs, link_create
from monitor.model import events
from monitor.model.errors import EnvironmentProblem
from monitor.model.events import (
    MAX_AGENTS,
    CCommKey,
    CMatch,
    CNameKey,
    CNetKey,
    Counter,
    CProc,
    CUidKey,
    Setting,
)

if TYPE_CHECKING:
    from monitor.policy.kernel_tables import KernelTables

TRACEFS = Path("/sys/kernel/tracing")


def cgroup2_root(mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """Mount point of the cgroup v2 hierarchy (/sys/fs/cgroup, or .../unified on hybrid
    hosts), or None."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return parts[1]
    return None


BPF_SOURCE = "agentwatch.bpf.c"
_MADV_PAGEOUT = 21  # Linux 5.4+
_ENOTSUPP = 524  # the kernel's internal "operation not supported", seen by bpf(2) callers
_COMPILER_LIBS = ("/libLLVM", "/libclang")
RINGS = (b"decisions", b"events")
CGROUP_HOOKS = {b"aw_connect4": "CGROUP_INET4_CONNECT", b"aw_connect6": "CGROUP_INET6_CONNECT"}


def probes_dir() -> Path:
    """Where the C sources live: $AGENTWATCH_PROBES, the source tree, or the installed copy."""
    env = os.environ.get("AGENTWATCH_PROBES")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[2] / "probes",
        Path("/usr/share/agentwatch/probes"),
    ]
    for c in candidates:
        if (c / BPF_SOURCE).is_file():
            return c
    raise EnvironmentProblem(
        f"the BPF sources ({BPF_SOURCE}) were not found in "
        + ", ".join(str(c) for c in candidates)
        + ": reinstall agentwatch or set AGENTWATCH_PROBES to the probes/ directory"
    )


def check_host(tracefs: Path = TRACEFS, modules: Path = Path("/lib/modules")) -> None:
    """Raise EnvironmentProblem naming the first thing this host lacks for the probes."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "agentwatch needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) to load its probes: "
            "run it with sudo or as the systemd service"
        )
    if not (tracefs / "events").is_dir():
        try:
            tracefs.mkdir(parents=True, exist_ok=True)
            rc = subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)],
                                capture_output=True).returncode
        except OSError:
            rc = -1
        if rc != 0 or not (tracefs / "events").is_dir():
            raise EnvironmentProblem(
                f"tracefs is not mounted at {tracefs} and mounting it failed: run "
                f"`mount -t tracefs nodev {tracefs}` (or `make setup`)"
            )
    release = platform.release()
    build = modules / release / "build"
    if not (build / "include").is_dir() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise EnvironmentProblem(
            f"no kernel headers for {release} at {build}: run `make setup`, which installs "
            f"linux-headers-{release} or the nearest Debian headers and links them there"
        )
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise EnvironmentProblem(
            f"BCC's Python bindings are not importable ({e}): install them with "
            "`apt-get install python3-bpfcc` and use a venv made with "
            "`/usr/bin/python3 -m venv --system-site-packages` (or run `make setup`)"
        ) from None


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
            *events.size_cflags(),
            *([f'-DAW_PIN_DIR="{self.pin_dir}"'] if self.pin_dir else []),
        ]


@dataclass(frozen=True)
class TrackedProc:
    pid: int
    session: int
    agent: int
    ppid: int
    exit_status: int
    cpu_ns: int
    start_ns: int


class Probes:
    """The loaded BPF object: attach on open(), detach on close()."""

    def __init__(self, options: ProbeOptions | None = None) -> None:
        self.options = options or ProbeOptions()
        self._bpf: Any = None
        self.attached = 0
        self.expected = 0
        self._cgroup_links: list[int] = []
        self._links: PinnedLinks | None = None
        self._batch: tuple[Any, Any] | None = None  # cpu_readings() buffers

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
                f"the kernel's BTF ({VMLINUX}) is missing or lacks task_struct/mm_struct: "
                "agentwatch reads argv and exit codes at offsets it gives; use a kernel built "
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
        # tracepoints, plus the cgroup connect hooks attach_cgroup() adds
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
        """Attach the connect4/connect6 hooks (they report connects and enforce the kernel
        connect rules) at the cgroup v2 root through BPF links
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
            for name in CGROUP_HOOKS:
                kind = getattr(BPFAttachType, CGROUP_HOOKS[name])
                fn = self.bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, None, kind)
                if self._links is not None:
                    self._links.cgroup(name.decode(), fn.fd, fd, kind)
                else:
                    links.append(link_create(fn.fd, fd, kind))
        except Exception as e:  # BCC raises bare Exception; link_create raises OSError
            for link in links:
                os.close(link)
            raise EnvironmentProblem(f"attaching the cgroup connect hooks at {root} failed "
                                     f"({e})") from None
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

    @property
    def bpf(self) -> Any:
        if self._bpf is None:
            raise RuntimeError("probes are not loaded")
        return self._bpf

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

    def poll(self, timeout_ms: int = 100) -> None:
        """Wait up to timeout_ms for a wakeup, then read every record. Records submitted
        without a wakeup (probes: wake_flags) never make epoll ready by themselves, so the
        read after the wait is what picks them up."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()

    def drain(self) -> None:
        self.bpf.ring_buffer_consume()

    # --- maps --------------------------------------------------------------------------

    def track(self, pid: int, session: int, agent: int, ppid: int = 0,
              start_ns: int = 0) -> None:
        value = CProc(session, agent, ppid, events.STATUS_UNSET, 0, start_ns, 0, 0)
        self.bpf[b"procs"][ct.c_uint32(pid)] = value

    def untrack(self, pid: int) -> None:
        try:
            del self.bpf[b"procs"][ct.c_uint32(pid)]
        except KeyError:
            pass

    def untrack_if(self, pid: int, session: int) -> bool:
        """Untrack `pid` only while it is still in `session`: the kernel may have moved it
        meanwhile (a pending candidate that exec'd into an agent root after a privilege
        drop). Removed with one lookup-and-delete, and put back if the entry it took had
        moved on. Returns whether it was untracked."""
        from bcc.libbcc import lib

        table = self.bpf[b"procs"]
        key = ct.c_uint32(pid)
        try:
            if table[key].session != session:
                return False
        except KeyError:
            return False
        value = CProc()
        if lib.bpf_lookup_and_delete(table.map_fd, ct.byref(key), ct.byref(value)) != 0:
            return False  # gone meanwhile
        if value.session != session:
            table[key] = value
            return False
        return True

    def retag(self, pid: int, agent: int) -> None:
        """Set the agent index of a tracked process (a pending session was accepted)."""
        table = self.bpf[b"procs"]
        key = ct.c_uint32(pid)
        try:
            value = table[key]
        except KeyError:
            return
        if value.agent != agent:
            value.agent = agent
            table[key] = value

    def is_tracked(self, pid: int) -> bool:
        try:
            self.bpf[b"procs"][ct.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def tracked(self) -> list[TrackedProc]:
        out = []
        for k, v in self.bpf[b"procs"].items():
            out.append(TrackedProc(k.value, v.session, v.agent, v.ppid, v.exit_status,
                                   v.cpu_ns, v.start_ns))
        return out

    def cpu_readings(self) -> list[tuple[int, int]]:
        """(pid, on-CPU ns) of every tracked process, read every tick. One
        BPF_MAP_LOOKUP_BATCH call per chunk into buffers allocated once: walking the map
        entry by entry (tracked()) cost ~8 ms per 1,000 processes, 9 % of a core at 10,000
        processes and a 1 s tick (bench/scale.py)."""
        from bcc.libbcc import lib

        n = self.options.max_procs
        if self._batch is None:
            self._batch = ((ct.c_uint32 * n)(), (CProc * n)())
        keys, values = self._batch
        fd = self.bpf[b"procs"].map_fd
        token, count = ct.c_uint32(0), ct.c_uint32(0)
        total, first = 0, True
        while total < n:
            count.value = n - total
            res = lib.bpf_lookup_batch(fd, None if first else ct.byref(token),
                                       ct.byref(token),
                                       ct.byref(keys, ct.sizeof(ct.c_uint32) * total),
                                       ct.byref(values, ct.sizeof(CProc) * total),
                                       ct.byref(count))
            err = ct.get_errno()
            total += count.value
            first = False
            if res != 0:
                if err == errno.ENOENT:  # the end of the map
                    break
                if err in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):  # before Linux 5.6
                    return [(t.pid, t.cpu_ns) for t in self.tracked()]
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on procs: {os.strerror(err)}")
        return [(keys[i], values[i].cpu_ns) for i in range(total)]

    def counters(self) -> dict[Counter, int]:
        table = self.bpf[b"counters"]
        return {c: int(sum(table[ct.c_int(int(c))])) for c in Counter}

    def agent_losses(self) -> dict[int, tuple[int, int]]:
        """agent index -> (records lost, connect records aggregated), summed over CPUs, for
        the indices with either; MAX_AGENTS stands for pending candidates and the rest."""
        def read(name: bytes) -> dict[int, int]:
            return {int(getattr(k, "value", k)): int(getattr(v, "value", v))
                    for k, v in self.bpf[name].items_lookup_batch()}

        lost, shed = read(b"agent_lost"), read(b"agent_shed")
        return {i: (lost.get(i, 0), shed.get(i, 0)) for i in lost.keys() | shed.keys()
                if lost.get(i, 0) or shed.get(i, 0)}

    def set_setting(self, setting: Setting, value: int) -> None:
        self.bpf[b"settings"][ct.c_int(int(setting))] = ct.c_uint32(value)

    def set_matchers(self, comms: Iterable[tuple[bytes, int, int]],
                     uids: Iterable[tuple[int, int]], gen: int = 0) -> None:
        """Replace the in-kernel agent matchers.

        comms: (comm as the kernel holds it, agent index, uid or events.ANY_UID); uids:
        (uid, agent index), as monitor.policy.kernel_tables.kernel_matchers computes them
        (overlaps resolved, each key once). Written as given.
        """
        comm_table = self.bpf[b"match_comm"]
        uid_table = self.bpf[b"match_uid"]
        self._clear_gen(b"match_comm", gen)
        self._clear_gen(b"match_uid", gen)
        for comm, agent, uid in comms:
            comm_table[CCommKey(comm, uid, gen)] = CMatch(agent, 0)
        for uid, agent in uids:
            uid_table[CUidKey(uid, gen)] = CMatch(agent, 0)

    # --- kernel rules ------------------------------------------------------------------

    def install_rules(self, tables: KernelTables, agent_names: list[str], gen: int) -> None:
        """Write the compiled kernel rules into generation `gen` (0/1) of the rule maps; they
        take effect at flip(gen). agent_names[i] is the agent of index i. Every key and value
        comes from tables.rule_maps (monitor/policy/kernel_tables.py): written as given."""
        b = self.bpf
        maps = tables.rule_maps(agent_names, gen)
        for name, value_type, slots in ((b"rule_action", ct.c_uint32, maps.actions),
                                        (b"rule_masks", ct.c_uint64, maps.masks),
                                        (b"rule_scope", ct.c_uint64, maps.scopes),
                                        (b"port_rules", ct.c_uint64, maps.ports)):
            n = len(slots.keys)
            b[name].items_update_batch((ct.c_int * n)(*slots.keys),
                                       (value_type * n)(*slots.values))
        self._clear_gen(b"net_rules", gen)
        nets = b[b"net_rules"]
        for prefixlen, addr, mask in maps.networks:
            nets[CNetKey(prefixlen, gen, (ct.c_uint8 * 16)(*addr))] = ct.c_uint64(mask)
        self._clear_gen(b"exec_rules", gen)
        names = b[b"exec_rules"]
        for comm, mask in maps.exec_names:
            names[CNameKey(comm, gen)] = ct.c_uint64(mask)

    def _clear_gen(self, table: bytes, gen: int) -> None:
        t = self.bpf[table]
        for key in [k for k in t.keys() if k.gen == gen]:
            try:
                del t[key]
            except KeyError:
                continue

    def generation(self) -> int:
        return int(self.bpf[b"settings"][ct.c_int(int(Setting.GEN))].value) & 1

    def flip(self, gen: int) -> None:
        """Make generation `gen` of the rule and matcher maps the one in force: a single
        word write, so every probe sees either the old policy or the new one, never a mix."""
        self.set_setting(Setting.GEN, gen & 1)

    def beat(self, fail_closed_s: float) -> None:
        """Heartbeat for fail-closed: if none comes for fail_closed_s (0: never), probes that
        outlived the monitor kill every agent process."""
        hb = self.bpf[b"heartbeat"]
        hb[ct.c_int(0)] = ct.c_uint64(time.monotonic_ns())  # == bpf_ktime_get_ns()
        hb[ct.c_int(1)] = ct.c_uint64(int(fail_closed_s * 1e9))

    def doom(self, session: int, manual: bool = False) -> None:
        """Every process of the session gets SIGKILL at its next trip through the kernel
        (in monitor mode too when `manual`: the operator's kill switch)."""
        self.bpf[b"doomed"][ct.c_uint32(session)] = ct.c_uint32(2 if manual else 1)

    def latch(self, agent_index: int | None, on: bool) -> None:
        """Latch (or release) the kill switch for one agent index, or for all (None)."""
        idx = MAX_AGENTS if agent_index is None else agent_index
        if 0 <= idx <= MAX_AGENTS:
            self.bpf[b"latched"][ct.c_int(idx)] = ct.c_uint32(1 if on else 0)

    def undoom(self, session: int) -> None:
        try:
            del self.bpf[b"doomed"][ct.c_uint32(session)]
        except KeyError:
            pass

    def session_pids(self, session: int) -> list[int]:
        return [k.value for k, v in self.bpf[b"procs"].items() if v.session == session]

    def session_of(self, pid: int) -> int | None:
        try:
            return int(self.bpf[b"procs"][ct.c_uint32(pid)].session)
        except KeyError:
            return None
