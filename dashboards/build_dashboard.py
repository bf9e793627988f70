#!/usr/bin/env python3
"""Generate dashboards/agentwatch.json, the agentwatch Grafana dashboard.

    .venv/bin/python dashboards/build_dashboard.py           # (re)write agentwatch.json
    .venv/bin/python dashboards/build_dashboard.py --check   # exit 1 if it is out of date
    .venv/bin/python dashboards/build_dashboard.py --stdout  # print, write nothing

Built with Grafana's own grafana-foundation-sdk (the Grafana 11.6 build: schemaVersion 41).
The JSON is committed so that it can be imported (Dashboards > New > Import) or provisioned
as it is; tests/unit/test_dashboard.py checks that it equals what this script produces.

Every query goes to the data source picked in the `datasource` variable and is filtered by
`instance=~"$instance"` and, where the metric has an agent label, `agent=~"$agent"`.

Kill, violation and reload counters are *sparse*: a series such as
agentwatch_kills_total{agent="a",rule="r"} is created by its first increment, at 1, so
increase() -- which needs two samples -- never sees that first kill. Panels that count
such events therefore add the series born inside the window at their full value:
    (x unless x offset W) or increase(x[W])
(the born-inside branch first, so that it wins over increase() for those series).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "agentwatch.json"

UID = "agentwatch"
TITLE = "agentwatch"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

INSTANCE = 'instance=~"$instance"'
AGENT = 'agent=~"$agent"'
RATE = "$__rate_interval"
RANGE = "$__range"
EXEC = 'kind="exec"'


# --- PromQL helpers ----------------------------------------------------------------------

def sel(metric: str, *extra: str, agent: bool = True) -> str:
    """`metric{instance=~"$instance"[, agent=~"$agent"][, extra...]}`."""
    matchers = [INSTANCE] + ([AGENT] if agent else []) + list(extra)
    return f"{metric}{{{', '.join(matchers)}}}"


def grew(selector: str, window: str) -> str:
    """How much a sparse counter grew over `window`, series born inside it included."""
    return f"(({selector} unless {selector} offset {window}) or increase({selector}[{window}]))"


def rate(selector: str) -> str:
    return f"rate({selector}[{RATE}])"


# --- panel helpers -----------------------------------------------------------------------

def query(expr: str, legend: str = "", ref: str = "A") -> pb.Dataquery:
    q = pb.Dataquery().expr(expr).ref_id(ref).datasource(DS).range()
    if legend:
        q = q.legend_format(legend)
    return q


def instant_table(expr: str, ref: str = "A") -> pb.Dataquery:
    return (pb.Dataquery().expr(expr).ref_id(ref).datasource(DS)
            .instant().format(pm.PromQueryFormat.TABLE))


def steps(*pairs: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=v, color=c) for v, c in pairs]))


def legend_table(*calcs: str) -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM).show_legend(True)
            .calcs(list(calcs) or ["lastNotNull", "max"]))


def graph(pid: int, title: str, description: str, unit: str,
          targets: list[pb.Dataquery], *, w: int = 12, h: int = 8,
          bars: bool = False, stack: bool = False, maximum: float | None = None,
          thresholds: db.ThresholdsConfig | None = None) -> timeseries.Panel:
    p = (timeseries.Panel().id(pid).title(title).description(description).datasource(DS)
         .span(w).height(h).unit(unit).min(0)
         .legend(legend_table())
         .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                  .sort(cm.SortOrder.DESCENDING))
         .fill_opacity(20 if (bars or stack) else 8).line_width(1))
    if bars:
        p = p.draw_style(cm.GraphDrawStyle.BARS)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    if maximum is not None:
        p = p.max(maximum)
    if thresholds is not None:
        p = (p.thresholds(thresholds)
             .thresholds_style(cb.GraphThresholdsStyleConfig()
                               .mode(cm.GraphThresholdsStyleMode.DASHED)))
    for t in targets:
        p = p.with_target(t)
    return p


def big_number(pid: int, title: str, description: str, expr: str, *, legend: str = "",
               unit: str = "short", th: db.ThresholdsConfig | None = None,
               mappings: list[dm.ValueMapping] | None = None,
               text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO) -> stat.Panel:
    p = (stat.Panel().id(pid).title(title).description(description).datasource(DS)
         .span(4).height(4).unit(unit)
         .color_mode(cm.BigValueColorMode.BACKGROUND)
         .graph_mode(cm.BigValueGraphMode.NONE)
         .text_mode(text_mode)
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .thresholds(th or steps((None, "green")))
         .with_target(query(expr, legend)))
    if mappings:
        p = p.mappings(mappings)
    return p


def organize(exclude: list[str], rename: dict[str, str],
             order: dict[str, int] | None = None) -> dm.DataTransformerConfig:
    options: dict[str, object] = {
        "excludeByName": {name: True for name in exclude},
        "renameByName": rename,
    }
    if order:
        options["indexByName"] = order
    return dm.DataTransformerConfig(id_val="organize", options=options)


def override_unit(name: str, unit: str) -> db.DashboardFieldConfigSourceOverrides:
    return (db.DashboardFieldConfigSourceOverrides()
            .matcher(dm.MatcherConfig(id_val="byName", options=name))
            .properties([dm.DynamicConfigValue(id_val="unit", value=unit)]))


# --- the dashboard -----------------------------------------------------------------------

def variables() -> list:
    all_selected = dm.VariableOption(selected=True, text=["All"], value=["$__all"])
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        (db.QueryVariable("instance").label("Instance").datasource(DS)
         .query("label_values(agentwatch_build_info, instance)")
         .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
         .sort(dm.VariableSort.ALPHABETICAL_ASC)
         .multi(True).include_all(True).all_value(".*").current(all_selected)),
        (db.QueryVariable("agent").label("Agent").datasource(DS)
         .query('label_values(agentwatch_processes{instance=~"$instance"}, agent)')
         .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
         .sort(dm.VariableSort.ALPHABETICAL_ASC)
         .multi(True).include_all(True).all_value(".*").current(all_selected)),
    ]


def build() -> dm.Dashboard:
    kills = sel("agentwatch_kills_total")
    switch = sel("agentwatch_killswitch_total")
    violations = sel("agentwatch_policy_violations_total")
    up = sel("up", 'job="agentwatch"', agent=False)
    no_time = ["Time"]

    d = (db.Dashboard(TITLE).uid(UID)
         .description("agentwatch: what AI agents run, where they connect, what the policy "
                      "killed, and whether the monitor itself is healthy.")
         .tags(["agentwatch", "ebpf", "security"])
         .editable()
         .tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .refresh("30s").time("now-6h", "now").timezone("browser")
         .variables(variables())
         .annotation(db.AnnotationQuery().name("Annotations & Alerts").built_in(1)
                     .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                     .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)")
                     .type("dashboard"))
         .link(db.DashboardLink("Runbooks").type(dm.DashboardLinkType.LINK)
               .url("https://agentwatch.invalid/docs/runbooks.md").icon("doc")
               .target_blank(True)))

    # --- overview --------------------------------------------------------------------
    d = d.with_row(db.Row("Overview").id(100))
    d = d.with_panel(big_number(
        1, "Kills", "Kills made by policy rules, and manual kill switch uses, in the "
        "selected time range.",
        f"(sum({grew(kills, RANGE)}) or vector(0)) + (sum({grew(switch, RANGE)}) or vector(0))",
        th=steps((None, "green"), (1, "red"))))
    d = d.with_panel(big_number(
        2, "Violations", "Policy verdicts in the selected time range (every action, every "
        "mode).", f"sum({grew(violations, RANGE)}) or vector(0)",
        th=steps((None, "green"), (1, "orange"))))
    d = d.with_panel(big_number(
        3, "Active sessions", "Agent sessions being tracked now.",
        f"sum({sel('agentwatch_sessions')})"))
    d = d.with_panel(big_number(
        4, "Processes", "Live processes in tracked agent sessions.",
        f"sum({sel('agentwatch_processes')})"))
    d = d.with_panel(big_number(
        5, "Monitor", "up{job=\"agentwatch\"} per selected instance.", up,
        legend="{{instance}}", text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
        th=steps((None, "red"), (1, "green")),
        mappings=[dm.ValueMap(options={
            "0": dm.ValueMappingResult(text="DOWN", color="red", index=0),
            "1": dm.ValueMappingResult(text="UP", color="green", index=1)})]))
    d = d.with_panel(big_number(
        6, "Probes attached", "Attached tracepoints / expected, lowest over the selected "
        "instances: below 100% the monitor is partly blind.",
        f"min({sel('agentwatch_probes_attached', agent=False)} "
        f"/ {sel('agentwatch_probes_expected', agent=False)})",
        unit="percentunit", th=steps((None, "red"), (1, "green"))))

    # --- enforcement -----------------------------------------------------------------
    d = d.with_row(db.Row("Enforcement").id(101))
    d = d.with_panel(graph(
        7, "Kills by rule", "Processes killed per rule in the trailing $__rate_interval "
        "window at each point; manual kill switch uses as their own series.", "short",
        [query(f"sum by (rule) ({grew(kills, RATE)})", "{{rule}}", "A"),
         query(f"sum({grew(switch, RATE)})", "manual kill switch", "B")],
        bars=True, stack=True))
    d = d.with_panel(graph(
        8, "Policy violations by rule and mode", "Verdicts per rule, action and mode in "
        "the trailing $__rate_interval window. mode=monitor means nothing was done: a kill "
        "or deny there is a 'would kill'.", "short",
        [query(f"sum by (rule, action, mode) ({grew(violations, RATE)})",
               "{{rule}} {{action}} ({{mode}})")],
        bars=True, stack=True))
    d = d.with_panel(
        table.Panel().id(9).title("Recent kills")
        .description("Kills in the selected time range by instance, agent and rule (rule "
                     "kill-switch: manual kill switch uses, named as in the monitor's own "
                     "AgentwatchKillSwitch alerts).")
        .datasource(DS).span(12).height(8)
        .align(cm.FieldTextAlignment.AUTO).filterable(True)
        .with_target(instant_table(
            f"sum by (instance, agent, rule) ({grew(kills, RANGE)}) > 0"
            f" or label_replace(sum by (instance, agent) ({grew(switch, RANGE)}) > 0,"
            ' "rule", "kill-switch", "", "")'))
        .with_transformation(organize(no_time, {"Value": "Kills"},
                                      {"instance": 0, "agent": 1, "rule": 2, "Value": 3}))
        .sort_by([cb.TableSortByFieldState().display_name("Kills").desc(True)])
        .decimals(0)
        .no_value("no kills in this time range"))
    d = d.with_panel(graph(
        10, "Kill latency p99 by path", "99th and 50th percentile of the time from "
        "the offending event to the kill: kernel = bpf_send_signal at the hook, userspace "
        "= verdict and pidfd kill in the monitor.", "s",
        [query("histogram_quantile(0.99, sum by (path, le) ("
               f"{rate(sel('agentwatch_kill_latency_seconds_bucket', agent=False))}))",
               "p99 {{path}}", "A"),
         query("histogram_quantile(0.5, sum by (path, le) ("
               f"{rate(sel('agentwatch_kill_latency_seconds_bucket', agent=False))}))",
               "p50 {{path}}", "B")]))

    # --- agents ----------------------------------------------------------------------
    d = d.with_row(db.Row("Agents").id(102))
    d = d.with_panel(graph(
        11, "Sessions and processes by agent", "Tracked agent sessions and their live "
        "processes.", "short",
        [query(f"sum by (agent) ({sel('agentwatch_sessions')})", "{{agent}} sessions", "A"),
         query(f"sum by (agent) ({sel('agentwatch_processes')})", "{{agent}} processes",
               "B")]))
    d = d.with_panel(graph(
        12, "CPU by agent (cores)", "CPU-seconds per second used by each agent's processes "
        "(1 = one full core).", "short",
        [query(f"sum by (instance, agent) ({rate(sel('agentwatch_cpu_seconds_total'))})",
               "{{agent}} ({{instance}})")]))
    d = d.with_panel(graph(
        13, "CPU by agent (share of host)", "Agent CPU rate / agentwatch_host_cpus. The "
        "dashed line is the AgentwatchAgentCpuSaturation threshold (90% for 10m).",
        "percentunit",
        [query(f"sum by (instance, agent) ({rate(sel('agentwatch_cpu_seconds_total'))})"
               " / on (instance) group_left () "
               f"max by (instance) ({sel('agentwatch_host_cpus', agent=False)})",
               "{{agent}} ({{instance}})")],
        maximum=1, thresholds=steps((None, "green"), (0.9, "red"))))
    d = d.with_panel(graph(
        14, "Exec rate by agent", "Programs executed per second.", "ops",
        [query(f"sum by (agent) ({rate(sel('agentwatch_events_total', EXEC))})",
               "{{agent}}")]))
    d = d.with_panel(graph(
        15, "Top executed binaries", "The 10 busiest binaries (the exporter keeps the top 20 "
        "per agent, the rest as 'other').", "ops",
        [query(f"topk(10, sum by (agent, binary) ({rate(sel('agentwatch_execs_total'))}))",
               "{{agent}}: {{binary}}")]))
    d = d.with_panel(graph(
        16, "Events by kind", "Probe events per second by kind (fork, exec, connect, exit, "
        "verdict).", "ops",
        [query(f"sum by (kind) ({rate(sel('agentwatch_events_total'))})", "{{kind}}")]))
    d = d.with_panel(graph(
        17, "Connections by verdict", "Connects per second: allowed, alerted, denied "
        "(EPERM before a packet left), killed.", "ops",
        [query(f"sum by (verdict) ({rate(sel('agentwatch_connections_total'))})",
               "{{verdict}}")], stack=True))
    d = d.with_panel(graph(
        18, "Connections by destination class", "Connects per second by destination class "
        "(loopback, private, link_local, public, multicast, other).", "ops",
        [query(f"sum by (destination) ({rate(sel('agentwatch_connections_total'))})",
               "{{destination}}")], stack=True))

    # --- monitor health --------------------------------------------------------------
    d = d.with_row(db.Row("Monitor health").id(103))
    def host(metric: str) -> str:
        return sel(metric, agent=False)

    def host_rate(metric: str) -> str:
        return f"sum by (instance) ({rate(host(metric))})"

    d = d.with_panel(graph(
        19, "Kernel events lost, connects refused, kernel kills", "Per second. Lost events "
        "(ring buffer full) mean the monitor missed forks/execs/connects: see the "
        "AgentwatchEventsLost runbook.", "ops",
        [query(host_rate("agentwatch_kernel_events_lost_total"), "lost ({{instance}})", "A"),
         query(host_rate("agentwatch_connects_refused_total"),
               "connects refused ({{instance}})", "B"),
         query(host_rate("agentwatch_kernel_kills_total"), "kernel kills ({{instance}})",
               "C")]))
    d = d.with_panel(graph(
        20, "Probes attached vs expected", "Attached below expected: some hooks are not "
        "running (AgentwatchProbeDetached).", "short",
        [query(sel("agentwatch_probes_attached", agent=False), "attached ({{instance}})",
               "A"),
         query(sel("agentwatch_probes_expected", agent=False), "expected ({{instance}})",
               "B")]))
    d = d.with_panel(graph(
        21, "Alert delivery", "Alerts waiting in the spool (AgentwatchAlertsSpooled past "
        "10m) and deliveries per second by receiver and result.", "short",
        [query(sel("agentwatch_alerts_spooled", agent=False), "spooled ({{instance}})",
               "A"),
         query("sum by (receiver, result) "
               f"({rate(sel('agentwatch_alert_deliveries_total', agent=False))})",
               "{{receiver}} {{result}}/s", "B")]))
    d = d.with_panel(graph(
        22, "Policy reloads", "Policy reloads per result in the trailing window: refused "
        "means the new policy had errors and the old one stayed in force.", "short",
        [query("sum by (instance, result) "
               f"({grew(sel('agentwatch_policy_reloads_total', agent=False), RATE)})",
               "{{result}} ({{instance}})")], bars=True))
    d = d.with_panel(graph(
        24, "Disk writes refused: alert spool, audit log", "Records kept in memory because "
        "their disk refused them (full, I/O errors; written once it takes them again), "
        "records dropped beyond the memory bound (AgentwatchRecordsDropped), and failed "
        "writes per second.", "short",
        [query(f"sum by (instance, sink) ({host('agentwatch_sink_buffered')})",
               "{{sink}} in memory ({{instance}})", "A"),
         query("sum by (instance, sink) "
               f"({grew(host('agentwatch_sink_dropped_total'), RATE)})",
               "{{sink}} dropped ({{instance}})", "B"),
         query(f"sum by (instance, sink) ({rate(host('agentwatch_sink_write_errors_total'))})",
               "{{sink}} write errors/s ({{instance}})", "C")], w=24, h=7))
    d = d.with_panel(graph(
        26, "Command lines judged on the probes' cut copy", "Per second, by agent and "
        "reason: execs whose argv the probes cut at 2,560 bytes and /proc could not confirm "
        "(gone, changed, too_long). argv and ssh rules saw only those bytes: see the argv "
        "unconfirmed runbook.", "ops",
        [query("sum by (agent, reason) "
               f"({rate(sel('agentwatch_argv_unconfirmed_total'))})",
               "{{agent}} {{reason}}")], w=24, h=6))
    d = d.with_panel(
        table.Panel().id(23).title("Monitors")
        .description("One row per monitor: build, policy in force and when it was loaded.")
        .datasource(DS).span(24).height(6)
        .align(cm.FieldTextAlignment.AUTO).filterable(True)
        .with_target(instant_table(
            f"max by (instance, version, kernel) ({host('agentwatch_build_info')})", "A"))
        .with_target(instant_table(
            f"max by (instance, sha256, mode) ({host('agentwatch_policy_info')})", "B"))
        .with_target(instant_table(
            f"max by (instance) ({host('agentwatch_policy_load_timestamp_seconds')}) * 1000",
            "C"))
        .with_target(instant_table(
            f"max by (instance) ({host('agentwatch_policy_load_duration_seconds')})", "D"))
        .with_target(instant_table(f"max by (instance) ({up})", "E"))
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(organize(
            ["Time", "Value #A", "Value #B"],
            {"version": "Version", "kernel": "Kernel", "sha256": "Policy sha256",
             "mode": "Mode", "Value #C": "Policy loaded", "Value #D": "Load took",
             "Value #E": "Up"},
            {"instance": 0, "version": 1, "kernel": 2, "mode": 3, "sha256": 4,
             "Value #C": 5, "Value #D": 6, "Value #E": 7}))
        .overrides([override_unit("Policy loaded", "dateTimeAsIso"),
                    override_unit("Load took", "s")]))
    d = d.with_panel(graph(
        25, "Flood defence", "Per second: records of each agent lost (ring full), connect "
        "records the kernel aggregated (one process flooding connects), and agent processes "
        "failed closed by reason (AgentwatchAgentRecordsLost, AgentwatchFailedClosed).", "ops",
        [query(f"sum by (agent) ({rate(sel('agentwatch_agent_records_lost_total'))})",
               "lost {{agent}}", "A"),
         query(f"sum by (agent) ({rate(sel('agentwatch_connects_aggregated_total'))})",
               "aggregated {{agent}}", "B"),
         query("sum by (reason) "
               f"({rate(sel('agentwatch_failed_closed_total', agent=False))})",
               "failed closed: {{reason}}", "C")], w=24))
    return d.build()


def render() -> str:
    """The dashboard as committed: sorted keys, 2-space indent, trailing newline."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if agentwatch.json differs")
    g.add_argument("--stdout", action="store_true", help="print the JSON, write nothing")
    args = ap.parse_args(argv)
    text = render()
    json.loads(text)  # it is JSON
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
