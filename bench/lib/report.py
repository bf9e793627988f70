"""bench/run.py's goals and printed table, from the results it gathered. Pure: reads the
results dict, prints nothing itself.
"""

from __future__ import annotations

from typing import Any

from .machine import headline
from .overhead import LOOPS, TOOLS
from .throughput import THROUGHPUT_GOAL

OVERHEAD_GOAL = 1.02


TRACKED_GOALS = {"exec": 1.05, "connect": 1.10}  # and below auditd's ratio


def goal_checks(o: dict[str, Any]) -> dict[str, Any]:
    """The agentwatch goals: untracked <= OVERHEAD_GOAL for every loop; tracked exec and
    connect within TRACKED_GOALS and below auditd's ratio (when auditd was measured)."""
    s = o["summary"]
    checks: dict[str, Any] = {}
    for k in LOOPS:
        aw = s["untracked"][k].get("agentwatch")
        checks[f"untracked {k}"] = {
            "goal": f"<= {OVERHEAD_GOAL}",
            "met": None if aw is None else aw["ratio"]["median"] <= OVERHEAD_GOAL}
    for k, limit in TRACKED_GOALS.items():
        aw, ad = s["tracked"][k].get("agentwatch"), s["tracked"][k].get("auditd")
        met = None
        if aw is not None:
            met = aw["ratio"]["median"] <= limit and (
                ad is None or aw["ratio"]["median"] < ad["ratio"]["median"])
        checks[f"tracked {k}"] = {
            "goal": f"<= {limit:.2f} and < auditd" + ("" if ad else " (auditd not measured)"),
            "met": met}
    return checks


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = headline(m, "agentwatch benchmark")
    if "overhead" in res:
        o = res["overhead"]
        names = list(TOOLS)
        cr = o["clean_rounds"]
        out += ["", "Overhead: time with the tool / time with nothing loaded, same round; "
                    "median (min-max) over clean rounds ("
                    + ", ".join(f"{n} {cr[n]}" for n in names if n in cr) + ")",
                f"  {'loop':<8}{'kind':<10}{'none us/op':>11}  "
                + "".join(f"{n:<22}" for n in names) + "goal (agentwatch)"]
        checks = o["goals"]
        for k in LOOPS:
            for kind in ("untracked", "tracked"):
                row = o["summary"][kind][k]
                cells = []
                for n in names:
                    c = row.get(n)
                    if c is None:
                        cells.append(f"{'n/a':<22}")
                        continue
                    r = c["ratio"]
                    mark = "*" if c["same_as_untracked"] else ("!" if c["only_tainted"] else "")
                    cells.append(f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}){mark:<3}")
                g = checks.get(f"{kind} {k}")
                goal = "-" if g is None else (
                    f"{g['goal']}: " + {True: "met", False: "NOT met", None: "n/a"}[g["met"]])
                none_us = f"{row['none_us_per_op']:.3f}" if kind == "untracked" else ""
                out.append(f"  {k:<8}{kind:<10}{none_us:>11}  {''.join(cells)}{goal}")
        out.append("  * auditd and bpftrace trace every process: tracked = their untracked "
                   "runs.  ! only tainted rounds.")
        out.append("  untracked loops: gen run by the bench; tracked: for agentwatch, gen run "
                   "as an agent through `agentwatch exec --agent bench`")
        for n, why in o["tools_unavailable"].items():
            out.append(f"  {n}: NOT MEASURED: {why}")
        rounds = o["rounds"]
        notes = []
        aw = [r["phases"]["agentwatch"]["tool"] for r in rounds if "agentwatch" in r["phases"]]
        if aw:
            ev = [t.get("events_from_untracked_loops") for t in aw]
            lost = sum(c["lost"] for t in aw for v in t["tracked_counters"].values() for c in v)
            tracked = sum(c["events"] for t in aw for v in t["tracked_counters"].values()
                          for c in v)
            notes.append(f"agentwatch: events from untracked loops per round {ev} (must be 0); "
                         f"tracked loops: {tracked} events delivered, {lost} lost")
        ad = [r["phases"]["auditd"]["tool"] for r in rounds if "auditd" in r["phases"]]
        if ad:
            notes.append("auditd: records written to the audit log per phase "
                         f"{[t['audit_log']['records'] for t in ad]} (syscall records "
                         f"{[t['audit_log']['syscall_records'] for t in ad]}), kernel lost "
                         f"{[t['kernel_lost'] for t in ad]}")
        bt = [r["phases"]["bpftrace"]["tool"] for r in rounds if "bpftrace" in r["phases"]]
        if bt:
            notes.append(f"bpftrace: lines printed per phase {[t['output_lines'] for t in bt]}, "
                         f"events lost {[t['lost_events'] for t in bt]}")
        if o.get("audit_never_task_rule"):
            notes.append("audit: `-a never,task` loaded outside the auditd phases (new tasks "
                         "start without the syscall-audit flag, as before audit was ever "
                         "enabled); removed at the end")
        out += [f"  {x}" for x in notes]
        tainted = [(r["round"], n) for r in rounds for n, ph in r["phases"].items()
                   if ph["tainted"]]
        if tainted:
            out.append(f"  tainted phases (round, config) {tainted}: other BPF users or CPU "
                       "load meanwhile; their rounds' ratios not counted")
        if o["bpf_programs_before"]:
            out.append(f"  NOTE: {o['bpf_programs_before']} BPF programs were loaded before "
                       "the bench (by no running process?): they ran in every phase")
    if "throughput" in res:
        t = res["throughput"]
        out += ["", f"Throughput of tracked events ({t['mix']}; goal >= "
                    f"{THROUGHPUT_GOAL}/s with no loss)",
                f"  {'target/s':>9}{'achieved/s':>11}{'issued':>10}{'delivered':>10}"
                f"{'lost':>9}{'backlog@end':>12}{'drain s':>8}{'mon CPU%':>9}"
                f"{'%/10k ev/s':>11}{'others':>8}"]
        for s in t["steps"]:
            out.append(f"  {s['target_rate']:>9}{s['achieved_rate']:>11}{s['issued']:>10}"
                       f"{s['delivered']:>10}{s['lost']:>9}{s['backlog_at_end']:>12}"
                       f"{s['drain_s']:>8}{s['monitor_cpu_pct']:>9}"
                       f"{s['cpu_pct_per_10k_eps'] or 0:>11}{s['other_load_cores']:>8}"
                       + ("  DISTURBED" if s["disturbed"] else ""))
        out.append(f"  highest clean step: {t['max_clean_target_rate']}/s (achieved "
                   f"{t['max_clean_achieved_rate']}/s); goal met: {t['goal_met']}")
    return "\n".join(out)
