"""bench/scale.py's summary and printed tables: per figure and size, the samples and the
per-round ratio against the smallest size. Pure: reads the results, prints nothing itself.
"""

from __future__ import annotations

import statistics
from typing import Any

from .harness import spread
from .load import BUSY_LIMIT
from .machine import headline

PROCESS_FIGURES = [  # (key, label, unit, format)
    ("connect_us_per_op", "tracked connect loop", "µs/op", ".2f"),
    ("exec_us_per_op", "tracked fork+exec loop", "µs/op", ".0f"),
    ("connect_monitor_us_per_event", "monitor CPU per connect event", "µs", ".1f"),
    ("exec_monitor_us_per_event", "monitor CPU per exec-loop event", "µs", ".1f"),
    ("scrape_ms", "/metrics scrape, median", "ms", ".2f"),
    ("kill_p50_ms", "userspace kill latency p50", "ms", ".2f"),
    ("kill_p99_ms", "userspace kill latency p99", "ms", ".2f"),
]
PROCESS_EXTRAS = [("idle_cpu_pct", "monitor idle CPU, % of a core", ".2f"),
                  ("rss_mib", "monitor RSS, MiB", ".1f"),
                  ("monitor_start_s", "monitor start, s", ".1f"),
                  ("create_s", "start + track the idle processes, s", ".1f"),
                  ("tracked_at_end", "idle processes tracked at the end", ".0f")]
RULE_FIGURES = PROCESS_FIGURES[:4] + [
    ("monitor_start_s", "monitor start until it answers", "s", ".2f")]
RULE_EXTRAS = [("idle_cpu_pct", "monitor idle CPU, % of a core", ".2f"),
               ("rss_mib", "monitor RSS, MiB", ".1f")]


def summarize(phases: list[dict[str, Any]], sizes: list[int],
              figures: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """Per figure and size: absolute samples, and the per-round ratio against sizes[0]."""
    base = sizes[0]
    by_round: dict[int, dict[int, dict[str, Any]]] = {}
    for ph in phases:
        by_round.setdefault(ph["round"], {})[ph["size"]] = ph
    out: dict[str, Any] = {}
    for key, *_ in figures:
        fig: dict[str, Any] = {}
        for size in sizes:
            values = [r[size][key] for r in by_round.values()
                      if size in r and r[size].get(key) is not None]
            ratios = [r[size][key] / r[base][key] for r in by_round.values()
                      if size in r and base in r and r[size].get(key) is not None
                      and r[base].get(key)]
            fig[str(size)] = {"values": values,
                              "median": statistics.median(values) if values else None,
                              "ratio": spread(ratios) if ratios else None}
        out[key] = fig
    return out


def table(title: str, summary: dict[str, Any], phases: list[dict[str, Any]], sizes: list[int],
          figures: list[tuple[str, str, str, str]], extras: list[tuple[str, str, str]]
          ) -> list[str]:
    base = sizes[0]
    head = f"  {'figure':<40}{base:>10,}" + "".join(
        f"{f'{s:,}: ratio (min-max), abs':>34}" for s in sizes[1:])
    lines = [title, head]
    for key, label, unit, fmt in figures:
        fig = summary[key]
        b = fig[str(base)]["median"]
        row = f"  {f'{label}, {unit}':<40}{format(b, fmt) if b is not None else '-':>10}"
        for s in sizes[1:]:
            f = fig[str(s)]
            r = f["ratio"]
            cell = (f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}), "
                    f"{format(f['median'], fmt)}" if r else "-")
            row += f"{cell:>34}"
        lines.append(row)
    for key, label, fmt in extras:
        row = f"  {label:<40}"
        for s in sizes:
            vals = [ph["memory_mib_end"]["VmRSS"] if key == "rss_mib" else ph[key]
                    for ph in phases if ph["size"] == s]
            cell = format(statistics.median(vals), fmt) if vals else "-"
            row += f"{cell:>10}" if s == base else f"{cell:>34}"
        lines.append(row)
    lost = sum(ph["connect_lost"] + ph["exec_lost"] for ph in phases)
    missing = sum(ph["connect_missing_events"] + ph["exec_missing_events"] for ph in phases)
    lines.append(f"  events lost (ring buffer): {lost}; events caused but not counted: {missing}")
    disturbed = [f"{ph['size']}@round{ph['round']}" for ph in phases if ph["disturbed"]]
    if disturbed:
        lines.append(f"  DISTURBED phases (other BPF users or > {BUSY_LIMIT} cores of other "
                     f"work): {', '.join(disturbed)}")
    return lines


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = headline(m, "agentwatch scaling bench", commit=True)
    rounds = res["params"]["rounds"]
    if "processes" in res:
        pr = res["processes"]
        out += [""] + table(
            f"Tracked processes (default policy; ratio vs {pr['sizes'][0]} processes, median "
            f"and min-max over {rounds} round(s); 'abs' = median absolute value)",
            pr["summary"], pr["phases"], pr["sizes"], PROCESS_FIGURES, PROCESS_EXTRAS)
    if "rules" in res:
        ru = res["rules"]
        out += [""] + table(
            f"Policy rules (ratio vs {ru['sizes'][0]} rules, median and min-max over "
            f"{rounds} round(s))", ru["summary"], ru["phases"], ru["sizes"], RULE_FIGURES,
            RULE_EXTRAS)
        for k in ru["sizes"]:
            c = ru["policies"][str(k)]
            out.append(f"  {k:>5} rules: {c['kernel']} in the kernel, {c['userspace']} in "
                       f"userspace ({c['eligible_overflow']} of them kernel-eligible but over "
                       f"the kernel's {c['kernel_max']}-rule limit)")
    return "\n".join(out)
