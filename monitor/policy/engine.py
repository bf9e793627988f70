"""Evaluate a compiled policy against what agents do, and say which rules they broke.

A pure function of (Policy, event facts, CPU samples) to Verdicts, in rule file order, each
with a human reason ("ssh requests remote_forward", "connect to 1.2.3.4:3333 (port in
@mining_ports)"). The caller passes time in; CpuWindows is the only state, and the caller
owns it. Verdicts are level-triggered: the same condition gives the same verdict on every
call, so whoever acts on them (enforcer, alerts) de-duplicates by (rule, session, pid).

This module must never parse policy text, read files, /proc or the clock, send signals, or
log: it runs on the hot path (a few microseconds per event) and is replayed on recordings.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os.path
from bisect import bisect_right
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TypeAlias

from monitor.model.address import fold
from monitor.model.cmdline import comm_of
from monitor.policy.sshargs import possible_features, requested_features
from monitor.policy.types import (
    Action,
    Address,
    ConnectMatch,
    CpuMatch,
    EventKind,
    ExecMatch,
    Mode,
    Policy,
    ProcessesMatch,
    Rule,
    format_duration,
    span_text,
)

CpuKey: TypeAlias = tuple[str, int]  # ("process", pid) or ("agent", session)
SessionCpu: TypeAlias = tuple[int, str, int, Iterable[tuple[int, int]]]
"""(session, agent name, cumulative CPU ns of the session, [(pid, cumulative CPU ns)])."""

SLICE_MAX_S = 60.0  # a cpu window is checked in slices of at most this long...
MIN_SLICES = 4  # ...and at least this many


@dataclass(frozen=True)
class Verdict:
    """One rule broken by one agent process (or session: pid 0 when no process is meant)."""

    rule: str
    action: Action
    mode: Mode
    agent: str
    session: int
    pid: int
    reason: str
    exe: str | None = None
    argv: tuple[str, ...] | None = None
    destination: str | None = None  # "1.2.3.4:443", "[2001:db8::1]:443"
    cpu_cores: float | None = None
    processes: int | None = None


# --- exec --------------------------------------------------------------------------------


class _ExecFacts:
    """One exec, with what several rules need computed once.

    `line`, when given, is the whole command line and argv only a clip of it (a command line
    of more arguments than monitor.model.cmdline.SPLIT_MAX_ARGS): argv rules search the line, and
    ssh conditions count every feature an argument could request (sshargs.possible_features).
    """

    def __init__(self, exe: str, comm: str, argv: Sequence[str],
                 line: str | None = None) -> None:
        self.exe, self.comm, self.argv = exe, comm, argv
        self.base = os.path.basename(exe)
        self._line: str | None = line
        self._whole = line is None
        self._ssh: frozenset[str] | None = None

    @property
    def line(self) -> str:
        if self._line is None:
            self._line = " ".join(self.argv)
        return self._line

    @property
    def ssh(self) -> frozenset[str]:
        if self._ssh is None:
            is_ssh = "ssh" in (self.base, self.comm) or (
                bool(self.argv) and os.path.basename(self.argv[0]) == "ssh")
            if not is_ssh:
                self._ssh = frozenset()
            elif self._whole:
                self._ssh = requested_features(self.argv)
            else:
                self._ssh = possible_features(self.line)
        return self._ssh


def _exec_reason(m: ExecMatch, f: _ExecFacts) -> str | None:
    parts = []
    if m.names:
        if f.base in m.names:
            name = f.base
        elif f.comm in m.comms:
            name = next(n for n in sorted(m.names) if comm_of(n) == f.comm)
        else:
            return None
        source = m.lists.get(("name", name))
        parts.append(f"runs {name} (name in {source})" if source else f"runs {name}")
    if m.exe:
        glob = next((g for g in m.exe if fnmatchcase(f.exe, g)), None)
        if glob is None:
            return None
        source = m.lists.get(("exe", glob))
        parts.append(f"executable {f.exe} matches {source or glob}")
    if m.argv:
        regex = next((r for r in m.argv if r.search(f.line)), None)
        if regex is None:
            return None
        source = m.lists.get(("argv", regex.pattern))
        parts.append(f"command line matches {source or repr(regex.pattern)}")
    if m.ssh:
        asked = m.ssh & f.ssh
        if not asked:
            return None
        parts.append(f"ssh requests {', '.join(sorted(asked))}")
    return "; ".join(parts)


def match_exec(rule: Rule, agent: str, exe: str, comm: str, argv: Sequence[str],
               line: str | None = None) -> bool:
    """Whether an exec by an agent of this name breaks rule (False for non-exec rules)."""
    if not isinstance(rule.match, ExecMatch) or not Policy.applies(rule, agent):
        return False
    return _exec_reason(rule.match, _ExecFacts(exe, comm, argv, line)) is not None


def evaluate_exec(policy: Policy, *, agent: str, session: int, pid: int, exe: str,
                  comm: str, argv: Sequence[str], line: str | None = None) -> list[Verdict]:
    """Verdicts for one exec: exe is the real executable path, comm the kernel's name;
    line the whole command line when argv is only a clip of it (see _ExecFacts)."""
    facts = _ExecFacts(exe, comm, argv, line)
    verdicts = []
    for rule in policy.rules_for(EventKind.EXEC):
        if not isinstance(rule.match, ExecMatch) or not policy.applies(rule, agent):
            continue
        reason = _exec_reason(rule.match, facts)
        if reason is not None:
            verdicts.append(Verdict(rule.name, rule.action, policy.mode, agent, session, pid,
                                    reason, exe=exe, argv=tuple(argv)))
    return verdicts


def argv_rules(policy: Policy, agent: str) -> list[str]:
    """Names of the exec rules for this agent that look at the command line (argv, ssh):
    the rules a command line cut short could slip past."""
    return [r.name for r in policy.rules_for(EventKind.EXEC)
            if isinstance(r.match, ExecMatch) and (r.match.argv or r.match.ssh)
            and policy.applies(r, agent)]


# --- connect -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # pure: the hot path sees the same few addresses
def destination_address(address: str) -> Address:
    """The destination as an address object, IPv4-mapped IPv6 folded into IPv4 (so its
    family is the destination's, whatever the socket's)."""
    if ":" not in address:
        return ipaddress.IPv4Address(address)
    if address[:7].lower() == "::ffff:" and "." in address:  # the decoder's mapped form
        return ipaddress.IPv4Address(address[7:])
    return fold(ipaddress.ip_address(address))


def format_destination(ip: Address, port: int) -> str:
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def _connect_reason(m: ConnectMatch, ip: Address, port: int) -> str | None:
    if m.family is not None and m.family != ("ipv4" if ip.version == 4 else "ipv6"):
        return None
    span = m.port_range_for(port) if m.ports else None
    if span is None and m.ports and not m.outside:
        return None  # the cheap test first: most connects are to ports no rule names
    net = m.network_for(ip) if m.networks else None
    inside = (net is not None or not m.networks) and (span is not None or not m.ports)
    if m.outside:
        if inside:
            return None
        return "outside the allowed destinations"
    if not inside:
        return None
    parts = []
    if net is not None:
        parts.append(f"address in {m.lists.get(('address', str(net))) or net}")
    if span is not None:
        text = span_text(span)
        source = m.lists.get(("port", text))
        parts.append(f"port in {source or text}" if source or span[0] != span[1]
                     else f"port {text}")
    if not parts:
        parts.append(f"family {m.family}")
    return ", ".join(parts)


def match_connect(rule: Rule, agent: str, family: int, address: str, port: int) -> bool:
    """Whether a connect by an agent of this name breaks rule (False for other rules).

    address is as the kernel decoder prints it ('1.2.3.4', '::1', '::ffff:1.2.3.4').
    family (2 or 10) is the socket's; what a rule's `family:` compares is the
    destination's, read from the address after IPv4-mapped normalisation.
    """
    if not isinstance(rule.match, ConnectMatch) or not Policy.applies(rule, agent):
        return False
    return _connect_reason(rule.match, destination_address(address), port) is not None


def connect_what(send: bool) -> str:
    """How a verdict's reason names the step: a connect, or a datagram sent with an
    address (sendto, sendmsg, ...), which the same connect rules judge."""
    return "datagram to" if send else "connect to"


def evaluate_connect(policy: Policy, *, agent: str, session: int, pid: int, family: int,
                     address: str, port: int, send: bool = False) -> list[Verdict]:
    """Verdicts for one connect, or for one datagram sent with a destination when send is
    true (arguments as for match_connect). Raises ValueError if address is not an IP
    address."""
    rules = policy.rules_for(EventKind.CONNECT)
    if not rules:
        return []
    ip = destination_address(address)
    verdicts = []
    for rule in rules:
        if not isinstance(rule.match, ConnectMatch) or not policy.applies(rule, agent):
            continue
        reason = _connect_reason(rule.match, ip, port)
        if reason is not None:
            where = format_destination(ip, port)
            verdicts.append(Verdict(rule.name, rule.action, policy.mode, agent, session, pid,
                                    f"{connect_what(send)} {where} ({reason})",
                                    destination=where))
    return verdicts


# --- processes ---------------------------------------------------------------------------


def evaluate_processes(policy: Policy, *, agent: str, session: int, live: int,
                       pid: int = 0) -> list[Verdict]:
    """Verdicts for the number of live processes in one session; pid is the process whose
    fork made the count (0 if unknown), the one a `kill` action would kill."""
    verdicts = []
    for rule in policy.rules_for(EventKind.PROCESSES):
        m = rule.match
        if isinstance(m, ProcessesMatch) and policy.applies(rule, agent) and live > m.above:
            verdicts.append(Verdict(rule.name, rule.action, policy.mode, agent, session, pid,
                                    f"{live} live processes in the session (more than "
                                    f"{m.above})", processes=live))
    return verdicts


# --- cpu ---------------------------------------------------------------------------------


class CpuWindows:
    """Recent samples of cumulative CPU time per key, to compute rates over time windows.

    Memory is bounded: samples older than horizon_s (set by evaluate_cpu to the longest
    window of the policy) are dropped, except the one just before it (for interpolation),
    and samples are kept at least resolution_s = horizon_s / (max_samples - 4) apart (the
    newest always replaces a newer-than-that last one), so a key never holds more than
    about max_samples samples. With 1 s ticks and the default 512 samples, a 30 minute
    horizon keeps one sample every 3.6 s.
    """

    def __init__(self, *, horizon_s: float = 3600.0, max_samples: int = 512) -> None:
        if max_samples < 8:
            raise ValueError("max_samples must be at least 8")
        self.horizon_s = horizon_s
        self.max_samples = max_samples
        self._times: dict[CpuKey, list[int]] = {}
        self._cpu: dict[CpuKey, list[int]] = {}

    @property
    def resolution_s(self) -> float:
        return self.horizon_s / (self.max_samples - 4)

    def __contains__(self, key: object) -> bool:
        return key in self._times

    def __len__(self) -> int:
        return len(self._times)

    def keys(self) -> frozenset[CpuKey]:
        return frozenset(self._times)

    def samples(self, key: CpuKey) -> int:
        return len(self._times.get(key, ()))

    def sample_times(self, key: CpuKey) -> tuple[int, ...]:
        return tuple(self._times.get(key, ()))

    def observe(self, key: CpuKey, t_ns: int, cpu_ns: int) -> None:
        """Record the cumulative CPU time of key at time t_ns (monotonic clock)."""
        times, cpu = self._times.setdefault(key, []), self._cpu.setdefault(key, [])
        if times and (t_ns <= times[-1] or cpu_ns < cpu[-1]):
            if t_ns <= times[-1] and cpu_ns >= cpu[-1]:
                return  # same tick seen twice, or a clock that went back: keep the first
            times.clear()  # the counter went back: a reused pid or session; start again
            cpu.clear()
        if len(times) >= 2 and times[-1] - times[-2] < self.resolution_s * 1e9:
            times[-1], cpu[-1] = t_ns, cpu_ns  # the last was provisional: too close
        else:
            times.append(t_ns)
            cpu.append(cpu_ns)
        cut = bisect_right(times, t_ns - int(self.horizon_s * 1e9)) - 1
        if cut > 0:
            del times[:cut]
            del cpu[:cut]

    def forget(self, key: CpuKey) -> None:
        self._times.pop(key, None)
        self._cpu.pop(key, None)

    def retain(self, keys: Collection[CpuKey]) -> None:
        """Forget every key not in keys (processes and sessions that are gone)."""
        for key in [k for k in self._times if k not in keys]:
            self.forget(key)

    def _at(self, key: CpuKey, t_ns: float) -> float | None:
        """Cumulative CPU ns at t_ns, interpolated; None if t_ns is before the samples."""
        times, cpu = self._times[key], self._cpu[key]
        i = bisect_right(times, t_ns)
        if i == 0:
            return None
        if i == len(times) or times[i - 1] == t_ns:
            return float(cpu[i - 1])
        t0, t1 = times[i - 1], times[i]
        return cpu[i - 1] + (cpu[i] - cpu[i - 1]) * (t_ns - t0) / (t1 - t0)

    def rate(self, key: CpuKey, window_s: float) -> float | None:
        """Cores used on average over the window_s seconds up to the last sample, or None
        until the samples cover that whole window."""
        times = self._times.get(key)
        if not times:
            return None
        end = times[-1]
        start = self._at(key, end - window_s * 1e9)
        if start is None:
            return None
        return (self._cpu[key][-1] - start) / (window_s * 1e9)

    def sustained(self, key: CpuKey, window_s: float, cores: float) -> float | None:
        """The rate over the window if it stayed above cores in every slice of it (slices
        of at most SLICE_MAX_S, or of two resolution_s if that is longer, and at least
        MIN_SLICES of them); else None. A burst that leaves any slice at or below cores,
        or a window not yet covered, gives None."""
        times = self._times.get(key)
        if not times:
            return None
        slices = max(MIN_SLICES, min(math.ceil(window_s / SLICE_MAX_S),
                                     int(window_s / (2 * self.resolution_s))))
        step = window_s * 1e9 / slices
        end = times[-1]
        before = self._at(key, end - window_s * 1e9)
        if before is None or (self._cpu[key][-1] - before) / (window_s * 1e9) <= cores:
            return None  # not covered yet, or not even the average is above
        first = before
        for i in range(1, slices + 1):
            after = self._at(key, end - window_s * 1e9 + i * step)
            assert after is not None
            if (after - before) / step <= cores:
                return None
            before = after
        return (before - first) / (window_s * 1e9)

    def used_ns(self, key: CpuKey, window_s: float) -> float:
        """CPU ns used in the last window_s (all the samples hold, if they cover less)."""
        times = self._times.get(key)
        if not times:
            return 0.0
        start = self._at(key, times[-1] - window_s * 1e9)
        return self._cpu[key][-1] - (start if start is not None else 0.0)


def evaluate_cpu(policy: Policy, windows: CpuWindows, *, now_ns: int,
                 sessions: Iterable[SessionCpu]) -> list[Verdict]:
    """Feed one tick of CPU samples and return verdicts for cpu rules whose rate stayed
    above their cores in every part of their window (see CpuWindows.sustained).

    Samples are kept only for sessions some cpu rule applies to, and for their processes
    only when a process-scope rule does; keys no longer in sessions are forgotten. For an
    agent-scope rule, the verdict's pid is the session's process that used the most CPU
    in the window (when process samples are kept) or since it started (otherwise); 0 if
    the session has no process.
    """
    rules = [r for r in policy.rules_for(EventKind.CPU) if isinstance(r.match, CpuMatch)]
    if not rules:
        windows.retain(())
        return []
    windows.horizon_s = max(r.match.window_s for r in rules if isinstance(r.match, CpuMatch))
    ticks: list[tuple[int, str, dict[int, int]]] = []
    present: set[CpuKey] = set()
    for session, agent, cpu_ns, procs in sessions:
        applying = [r.match for r in rules if policy.applies(r, agent)]
        if not applying:
            continue
        windows.observe(("agent", session), now_ns, cpu_ns)
        present.add(("agent", session))
        per_process = any(isinstance(m, CpuMatch) and m.scope == "process" for m in applying)
        cumulative = dict(procs)
        for pid, proc_cpu in cumulative.items() if per_process else ():
            windows.observe(("process", pid), now_ns, proc_cpu)
            present.add(("process", pid))
        ticks.append((session, agent, cumulative))
    windows.retain(present)
    verdicts = []
    for rule in rules:
        m = rule.match
        assert isinstance(m, CpuMatch)
        for session, agent, pids in ticks:
            if not policy.applies(rule, agent):
                continue
            keys = [("agent", session)] if m.scope == "agent" else [("process", p) for p in pids]
            for key in keys:
                rate = windows.sustained(key, m.window_s, m.cores)
                if rate is None:
                    continue
                pid = key[1] if m.scope == "process" else _heaviest(windows, pids, m.window_s)
                what = "the agent" if m.scope == "agent" else f"process {pid}"
                verdicts.append(Verdict(
                    rule.name, rule.action, policy.mode, agent, session, pid,
                    f"{what} used {rate:.2f} cores over {format_duration(m.window_s)} "
                    f"(more than {m.cores:g} all along)", cpu_cores=round(rate, 3)))
    return verdicts


def _heaviest(windows: CpuWindows, cumulative: dict[int, int], window_s: float) -> int:
    def used(pid: int) -> float:
        key = ("process", pid)
        return windows.used_ns(key, window_s) if key in windows else float(cumulative[pid])

    return max(cumulative, key=used, default=0)
