"""Sustained CPU use: samples of cumulative CPU time per agent session and per process, and
the `event: cpu` rules judged over windows cut into slices.

A pure function of (Policy, samples, the time the caller passes in) to Verdicts; CpuWindows is
the only state, and the caller (enforce/judge.py) owns it. This module must never read /proc,
the clock or files, send signals or log.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Collection, Iterable
from typing import TypeAlias

from monitor.policy.engine import Verdict
from monitor.policy.types import CpuMatch, EventKind, Policy, format_duration

CpuKey: TypeAlias = tuple[str, int]  # ("process", pid) or ("agent", session)
SessionCpu: TypeAlias = tuple[int, str, int, Iterable[tuple[int, int]]]
"""(session, agent name, cumulative CPU ns of the session, [(pid, cumulative CPU ns)])."""

SLICE_MAX_S = 60.0  # a cpu window is checked in slices of at most this long...
MIN_SLICES = 4  # ...and at least this many


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
