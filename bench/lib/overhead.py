"""bench/run.py part 1, overhead: rounds of phases none / agentwatch / auditd / bpftrace,
the loops timed in each, ratios to the none phase of the same round, and their summary.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .harness import (
    Sources,
    bpf_holders,
    log,
    spread,
)
from .load import BUSY_LIMIT, OtherLoad, Patience, gen, loop_args
from .machine import bpf_prog_count
from .tools import Tool, ToolFailed

LOOPS = ("exec", "connect", "sendto", "getppid")
TOOLS = ("agentwatch", "auditd", "bpftrace")  # compared against "none", alternated per round


def wait_no_foreign_bpf(timeout: float, baseline: int | None = None,
                        monitor_pid: int | None = None) -> float:
    """Wait (up to `timeout`) until no other process holds BPF programs and, given a
    baseline, the host-wide program count is back to it; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not bpf_holders(monitor_pid) and (baseline is None or bpf_prog_count() == baseline):
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def run_phase(tool: Tool, exe: Path, port: int, sizes: dict[str, int], reps: int,
              baseline: int | None, src: Sources) -> dict[str, Any]:
    """Load the tool, run the loops `reps` times each (round robin; for agentwatch then
    again as an agent), unload it. Marks the phase tainted when another process held BPF
    programs, the host-wide program count moved (tools without BPF only) or other work
    used more than BUSY_LIMIT cores."""
    foreign: set[str] = set()

    def check(started: bool = True) -> None:
        foreign.update(f"pid {p}" for p in bpf_holders(tool.pids()))
        if not tool.loads_bpf and (count := bpf_prog_count()) != baseline:
            foreign.add(f"{count} BPF programs loaded (baseline {baseline})")
        if started and not tool.alive():
            raise ToolFailed(f"{tool.name} exited during its phase")

    t_start = time.monotonic()
    load = OtherLoad(tool.pids)
    check(started=False)
    info = tool.start()
    runs: dict[str, dict[str, list[int]]] = {"untracked": {k: [] for k in LOOPS}}
    load.start()
    c0 = tool.counters()
    for _ in range(reps):
        for k in LOOPS:
            runs["untracked"][k].append(
                gen(*loop_args(exe, k, sizes, port), tick=tool.tick)["elapsed_ns"])
            tool.settle()
        check()
    if c0 is not None:
        c1 = tool.counters()
        info["events_from_untracked_loops"] = c1["events"] - c0["events"]
    tracked_counts: dict[str, list[dict[str, int]]] = {}
    if tool.tracks_agents:
        runs["tracked"] = {k: [] for k in LOOPS}
        tracked_counts = {k: [] for k in LOOPS}
        for _ in range(reps):
            for k in LOOPS:
                before = tool.counters()
                try:
                    g = gen(*tool.agent_cmd(), *loop_args(exe, k, sizes, port), src=src,
                            tick=tool.tick)
                except RuntimeError as e:  # e.g. the policy killed the agent
                    raise ToolFailed(f"tracked {k} loop: {e}") from None
                runs["tracked"][k].append(g["elapsed_ns"])
                tool.settle()
                after = tool.counters()
                if before is not None and after is not None:
                    tracked_counts[k].append({c: after[c] - before[c] for c in after})
            check()
        info["tracked_counters"] = tracked_counts
    cores = load.cores()
    info.update(tool.finish())
    if cores > BUSY_LIMIT:
        foreign.add(f"other work used {cores:.2f} CPU cores")
    return {"runs_ns": runs, "fastest_ns": {kind: {k: min(v) for k, v in r.items()}
                                            for kind, r in runs.items()},
            "other_load_cores": round(cores, 2), "foreign_bpf": sorted(foreign),
            "tainted": bool(foreign), "wall_s": round(time.monotonic() - t_start, 1),
            "tool": info}


def overhead(tools: list[Tool], failed: dict[str, str], exe: Path, port: int,
             sizes: dict[str, int], rounds: int, reps: int, patience: Patience,
             src: Sources) -> dict[str, Any]:
    names = [t.name for t in tools]
    log(f"overhead: warm-up, then {rounds} rounds of phases {['none', *names]}, {reps} runs "
        f"of each loop per phase; loop sizes {sizes}")
    t0 = time.monotonic()
    wait_no_foreign_bpf(patience.wait_s)
    baseline = bpf_prog_count()
    none = Tool()
    for k in LOOPS:  # warm-up, discarded
        gen(*loop_args(exe, k, sizes, port))
    raw: list[dict[str, Any]] = []
    clean = dict.fromkeys(["none", *names], 0)
    attempts = 0

    def wanted() -> bool:
        goal = [clean[t.name] for t in tools] or [clean["none"]]
        return min(goal) < rounds
    while wanted() and attempts < 3 * rounds and (
            attempts < rounds or time.monotonic() - t0 < patience.budget_s):
        attempts += 1
        rnd: dict[str, Any] = {"round": attempts, "phases": {}, "ratio": {}, "clean": {}}
        for tool in [none, *tools]:
            waited = (wait_no_foreign_bpf(patience.wait_s, baseline)
                      + OtherLoad(lambda: []).wait_quiet(patience.wait_s))
            try:
                phase = run_phase(tool, exe, port, sizes, reps, baseline, src)
            except ToolFailed as e:
                tool.shutdown()
                log(f"  {tool.name}: FAILED, left out from now on: {e}")
                failed[tool.name] = str(e)
                tools.remove(tool)
                continue
            phase["waited_for_quiet_s"] = round(waited, 1)
            rnd["phases"][tool.name] = phase
        base = rnd["phases"]["none"]
        clean["none"] += not base["tainted"]
        for name, ph in rnd["phases"].items():
            if name == "none":
                continue
            fast = ph["fastest_ns"]
            rnd["ratio"][name] = {
                kind: {k: fast[kind][k] / base["fastest_ns"]["untracked"][k] for k in LOOPS}
                for kind in fast}
            rnd["clean"][name] = not (base["tainted"] or ph["tainted"])
            clean[name] += rnd["clean"][name]
        raw.append(rnd)
        for name, ph in rnd["phases"].items():
            extra = phase_note(name, ph)
            r = rnd["ratio"].get(name)
            figures = ("  ".join(f"{kind[0]}:{k} {r[kind][k]:.3f}" for kind in r for k in LOOPS)
                       if r else "  ".join(f"{k} {v / sizes[k] / 1000:.3f} us"
                                           for k, v in ph["fastest_ns"]["untracked"].items()))
            log(f"  round {attempts} {name:<10} {figures}  ({ph['wall_s']} s{extra}"
                + (f"; TAINTED by {ph['foreign_bpf']}" if ph["tainted"] else "") + ")")
    return {"method": "rounds of phases none, " + ", ".join(names) + " (each tool loaded only "
                      "for its phase); per phase the fastest of "
                      f"{reps} runs of each loop; ratio = tool / none of the same round; a "
                      "round's ratio for a tool is not counted when its phase or the none "
                      "phase saw another process use BPF or other work use > "
                      f"{BUSY_LIMIT} cores",
            "reps": reps, "rounds_wanted": rounds, "loop_sizes": sizes,
            "bpf_programs_before": baseline, "tools": [t.name for t in tools],
            "tools_unavailable": failed,
            "clean_rounds": clean, "rounds": raw,
            "summary": overhead_summary(raw, names, sizes)}


def phase_note(name: str, ph: dict[str, Any]) -> str:
    t = ph["tool"]
    if name == "agentwatch":
        lost = sum(c["lost"] for v in t.get("tracked_counters", {}).values() for c in v)
        ev = sum(c["events"] for v in t.get("tracked_counters", {}).values() for c in v)
        return (f"; events from untracked loops {t.get('events_from_untracked_loops')}, "
                f"tracked {ev}, lost {lost}")
    if name == "auditd":
        a = t["audit_log"]
        return (f"; audit log +{a['records']} records ({a['syscall_records']} syscall, "
                f"{a['bytes'] / 2**20:.1f} MiB in {a['files']} file(s)), kernel lost "
                f"{t['kernel_lost']}")
    if name == "bpftrace":
        return f"; {t['output_lines']} lines, lost {t['lost_events']}"
    return ""


def overhead_summary(raw: list[dict[str, Any]], names: list[str],
                     sizes: dict[str, int]) -> dict[str, Any]:
    """Per kind (untracked, tracked) and loop: the none phase's time per op and, per tool,
    median/min/max of the clean rounds' ratios (all rounds when none was clean)."""
    out: dict[str, Any] = {}
    for kind in ("untracked", "tracked"):
        out[kind] = {}
        for k in LOOPS:
            row: dict[str, Any] = {"n": sizes[k], "none_us_per_op": statistics.median(
                r["phases"]["none"]["fastest_ns"]["untracked"][k] / sizes[k] / 1000
                for r in raw)}
            for name in names:
                have = [r for r in raw if name in r["ratio"]]
                if not have:
                    continue
                used = [r for r in have if r["clean"][name]] or have
                src_kind = kind if kind in have[0]["ratio"][name] else "untracked"
                row[name] = {
                    "ratio": spread([r["ratio"][name][src_kind][k] for r in used]),
                    "us_per_op": statistics.median(
                        r["phases"][name]["fastest_ns"][src_kind][k] / sizes[k] / 1000
                        for r in used),
                    "rounds": len(used), "only_tainted": not any(r["clean"][name] for r in have),
                    "same_as_untracked": src_kind != kind}
            out[kind][k] = row
    return out
