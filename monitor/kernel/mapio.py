"""Reads and writes of the probes' maps, as typed Python values.

ProbeMaps covers the tree state (`procs`), settings, counters, the heartbeat and the kill
maps (`doomed`, `latched`); RuleMaps adds the agent matchers and the kernel rule tables,
written into the generation not in force and switched with flip(). They move bytes and
never decide: what to track, whom to kill and what the tables hold is decided elsewhere
(sessions/, enforce/, policy/kernel_tables.py). The BPF object they reach is the one
monitor/kernel/loader.py loaded; bcc.libbcc is imported only for the two batch calls.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitor.kernel.abi import CCommKey, CMatch, CNameKey, CNetKey, CProc, CUidKey
from monitor.model import events
from monitor.model.events import (
    MAX_AGENTS,
    Counter,
    Doom,
    Heartbeat,
    Setting,
)

if TYPE_CHECKING:
    from monitor.policy.kernel_tables import KernelTables

_ENOTSUPP = 524  # the kernel's internal "operation not supported", seen by bpf(2) callers


@dataclass(frozen=True)
class TrackedProc:
    pid: int
    session: int
    agent: int
    ppid: int
    exit_status: int
    cpu_ns: int
    start_ns: int


class ProbeMaps:
    """The probes' state maps; `bpf` is the loaded BPF object (RuntimeError before)."""

    def __init__(self, max_procs: int) -> None:
        self._bpf: Any = None
        self._max_procs = max_procs
        self._batch: tuple[Any, Any] | None = None  # cpu_readings() buffers

    @property
    def bpf(self) -> Any:
        if self._bpf is None:
            raise RuntimeError("probes are not loaded")
        return self._bpf

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

        n = self._max_procs
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

    def beat(self, fail_closed_s: float) -> None:
        """Heartbeat for fail-closed: if none comes for fail_closed_s (0: never), probes that
        outlived the monitor kill every agent process."""
        hb = self.bpf[b"heartbeat"]
        hb[ct.c_int(int(Heartbeat.BEAT))] = ct.c_uint64(time.monotonic_ns())  # bpf_ktime_get_ns()
        hb[ct.c_int(int(Heartbeat.LIMIT))] = ct.c_uint64(int(fail_closed_s * 1e9))

    def doom(self, session: int, manual: bool = False) -> None:
        """Every process of the session gets SIGKILL at its next trip through the kernel
        (in monitor mode too when `manual`: the operator's kill switch)."""
        doom = Doom.MANUAL if manual else Doom.POLICY
        self.bpf[b"doomed"][ct.c_uint32(session)] = ct.c_uint32(int(doom))

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


class RuleMaps(ProbeMaps):
    """The agent matchers and kernel rule tables, in two generations (0/1): a reload fills
    the one not in force, then flip() makes it the one in force."""

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
