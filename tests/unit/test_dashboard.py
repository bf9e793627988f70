"""The Grafana dashboard and the Prometheus alert rules (dashboards/, docs/runbooks.md).

- alerts.yml passes `promtool check rules`, alerts_test.yml passes `promtool test rules`,
  and every alert has a case where it fires and one where it must not;
- every alert has severity, summary, description (templated), runbook_url, and its runbook
  anchor exists in docs/runbooks.md;
- agentwatch.json is exactly what dashboards/build_dashboard.py generates, the Grafana
  Foundation SDK's model reads it back unchanged, and it is importable as it is;
- every panel query parses as PromQL (promtool, as recording rules), filters by instance and
  agent, and uses only metrics and labels of the metric contract.

promtool comes from Debian's `prometheus` (packaging/setup-observability.sh installs it).
Without promtool these tests skip on a laptop and fail when CI=true.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
DASHBOARD_JSON = DASHBOARDS / "agentwatch.json"
GENERATOR = DASHBOARDS / "build_dashboard.py"
ALERTS = DASHBOARDS / "alerts.yml"
ALERTS_TEST = DASHBOARDS / "alerts_test.yml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://agentwatch.invalid/docs/runbooks.md"
IN_CI = os.environ.get("CI", "").lower() == "true"

# The metric contract: name -> labels (besides job and instance, which every series has).
CONTRACT: dict[str, frozenset[str]] = {name: frozenset(labels) for name, labels in {
    "agentwatch_build_info": ("version", "kernel"),
    "agentwatch_events_total": ("agent", "kind"),
    "agentwatch_execs_total": ("agent", "binary"),
    "agentwatch_connections_total": ("agent", "verdict", "destination", "kind"),
    "agentwatch_policy_violations_total": ("agent", "rule", "action", "mode"),
    "agentwatch_kills_total": ("agent", "rule"),
    "agentwatch_kill_latency_seconds": ("path",),  # histogram
    "agentwatch_processes": ("agent",),
    "agentwatch_sessions": ("agent",),
    "agentwatch_cpu_seconds_total": ("agent",),
    "agentwatch_host_cpus": (),
    "agentwatch_kernel_events_lost_total": (),
    "agentwatch_connects_refused_total": (),
    "agentwatch_agent_records_lost_total": ("agent",),
    "agentwatch_connects_aggregated_total": ("agent",),
    "agentwatch_failed_closed_total": ("reason",),
    "agentwatch_kernel_kills_total": (),
    "agentwatch_probes_attached": (),
    "agentwatch_probes_expected": (),
    "agentwatch_policy_info": ("sha256", "mode"),
    "agentwatch_policy_load_timestamp_seconds": (),
    "agentwatch_policy_load_duration_seconds": (),
    "agentwatch_policy_reloads_total": ("result",),
    "agentwatch_alerts_spooled": (),
    "agentwatch_alert_deliveries_total": ("receiver", "result"),
    "agentwatch_killswitch_total": ("agent",),
    "agentwatch_sink_buffered": ("sink",),
    "agentwatch_sink_dropped_total": ("sink",),
    "agentwatch_sink_write_errors_total": ("sink",),
    "agentwatch_argv_unconfirmed_total": ("agent", "reason"),
}.items()}
HISTOGRAMS = {"agentwatch_kill_latency_seconds"}
TARGET_LABELS = frozenset({"job", "instance"})
# Prometheus's own series that the rules and the dashboard may use besides the contract.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}

# Grafana's variables, replaced by values that make valid PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${instance}": ".*",
    "$instance": ".*",
    "${agent}": ".*",
    "$agent": ".*",
}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2", "start", "end",
}


# --- helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = ("promtool not found: run `bash packaging/setup-observability.sh` (as root) "
                   "to install Debian's prometheus package")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(promtool: str, *args: str, cwd: Path = DASHBOARDS) -> str:
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def sdk() -> ModuleType:
    """grafana_foundation_sdk (a test dependency): fail under CI, skip elsewhere."""
    try:
        import grafana_foundation_sdk
    except ImportError:
        message = "grafana-foundation-sdk is not installed: pip install -e '.[test]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return grafana_foundation_sdk


def load_generator() -> ModuleType:
    sdk()
    spec = importlib.util.spec_from_file_location("agentwatch_build_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return data


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert len(doc["groups"]) == 1, "one rule group"
    rules: list[dict[str, Any]] = doc["groups"][0]["rules"]
    return rules


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in model["panels"]:
        yield p
        yield from p.get("panels", [])  # panels of a collapsed row


def panel_queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    out = []
    for p in panels(model):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}",
                        t["expr"]))
    return out


def variable_selectors(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The series selectors inside the query variables' label_values(...)."""
    out = []
    for v in model["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {v['name']}: unexpected query {query!r}"
        out.append((f"variable {v['name']}", m.group(1)))
    return out


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (no Go parser at hand: strings,
    matchers, ranges, grouping lists, function calls and keywords are taken out first)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"#[^\n]*", " ", text)  # comments
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables ($__range after offset)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(1)
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(word)
    return names


def contract_name(name: str) -> str | None:
    """The contract metric a series name belongs to (histogram series included)."""
    if name in CONTRACT:
        return name
    for h in HISTOGRAMS:
        if name in (f"{h}_bucket", f"{h}_sum", f"{h}_count"):
            return h
    return None


def labels_of(name: str) -> frozenset[str]:
    if name in PROMETHEUS_SERIES:
        return PROMETHEUS_SERIES[name] | TARGET_LABELS
    base = contract_name(name)
    assert base is not None, f"{name} is not in the metric contract"
    extra = {"le"} if name.endswith("_bucket") else set()
    return CONTRACT[base] | TARGET_LABELS | extra


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric, {label: (op, value)}) for every `metric{...}` in expr."""
    out = []
    for m in _SELECTOR.finditer(expr):
        matchers = {lm.group(1): (lm.group(2), json.loads(lm.group(3)))
                    for lm in _MATCHER.finditer(m.group(2))}
        out.append((m.group(1), matchers))
    return out


def github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


# --- the metric-name extractor itself -----------------------------------------------------

def test_metric_names_extractor() -> None:
    assert metric_names(
        'sum by (instance, agent) (rate(agentwatch_cpu_seconds_total{agent=~"a|b"}[5m]))'
        " / on (instance) group_left () max by (instance) (agentwatch_host_cpus) > 0.9"
    ) == {"agentwatch_cpu_seconds_total", "agentwatch_host_cpus"}
    assert metric_names(
        '(x unless x offset 5m) or label_replace(sum(y) > 0, "rule", "k", "", "")'
    ) == {"x", "y"}
    assert metric_names('absent(up{job="agentwatch"})') == {"up"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[1m])))") == {
        "h_bucket"}
    assert metric_names("agentwatch_kills_total") == {"agentwatch_kills_total"}
    assert metric_names("x unless x offset $__range") == {"x"}
    assert metric_names('y{a="#b"}  # a comment') == {"y"}


# --- alert rules --------------------------------------------------------------------------

def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", ALERTS.name)
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", ALERTS_TEST.name)
    assert "SUCCESS" in out


def test_expected_alerts_exist() -> None:
    names = [r.get("alert") for r in alert_rules()]
    assert all(names), "only alerting rules in alerts.yml"
    assert len(names) == len(set(names))
    for required in ("AgentwatchKillSwitchFired", "AgentwatchMonitorModeViolation",
                     "AgentwatchDown", "AgentwatchAbsent", "AgentwatchEventsLost",
                     "AgentwatchProbeDetached", "AgentwatchAgentCpuSaturation"):
        assert required in names


def test_alert_timing() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert "for" not in rules["AgentwatchKillSwitchFired"], "a kill alerts at once"
    assert rules["AgentwatchDown"]["for"] == "1m"
    assert rules["AgentwatchAbsent"]["for"] == "5m"
    assert rules["AgentwatchAgentCpuSaturation"]["for"] == "10m"
    assert 'absent(up{job="agentwatch"})' in rules["AgentwatchAbsent"]["expr"]


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
            for exp in check.get("exp_alerts") or []:
                assert exp.get("exp_labels", {}).get("severity"), check["alertname"]
                assert set(exp.get("exp_annotations", {})) == {
                    "summary", "description", "runbook_url"}, check["alertname"]
    for rule in alert_rules():
        assert rule["alert"] in fires, f"{rule['alert']}: no test case where it fires"
        assert rule["alert"] in quiet, f"{rule['alert']}: no test case where it must not fire"


def test_alerts_have_severity_annotations_and_a_runbook() -> None:
    anchors = github_anchors(RUNBOOKS.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert isinstance(ann.get(key), str) and ann[key].strip(), f"{name}: {key}"
        assert "{{" in ann["description"], f"{name}: description is not templated"
        assert ann["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbooks.md has no section {name}"


def runbook_queries() -> list[str]:
    """The PromQL of docs/runbooks.md: ```promql blocks, one expression per paragraph."""
    blocks = re.findall(r"^```promql\n(.*?)^```", RUNBOOKS.read_text(), re.S | re.M)
    out = []
    for block in blocks:
        for chunk in re.split(r"\n\s*\n", block):
            expr = "\n".join(line for line in chunk.splitlines()
                             if not line.lstrip().startswith("#")).strip()
            if expr:
                out.append(expr)
    return out


def test_runbook_queries_parse_and_use_contract_metrics(promtool: str, tmp_path: Path) -> None:
    queries = runbook_queries()
    assert len(queries) >= len(alert_rules())
    for expr in queries:
        for name in metric_names(expr):
            assert name in PROMETHEUS_SERIES or contract_name(name), f"{name} in {expr!r}"
    rules = [{"record": f"runbook:query_{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "runbook_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "runbooks", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_alert_rules_use_only_contract_metrics() -> None:
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            assert name in PROMETHEUS_SERIES or contract_name(name), \
                f"{rule['alert']}: {name} is not in the metric contract"
        for metric, matchers in selectors(rule["expr"]):
            assert set(matchers) <= labels_of(metric), f"{rule['alert']}: {metric} {matchers}"


# --- the dashboard ------------------------------------------------------------------------

def test_dashboard_json_is_what_the_generator_writes() -> None:
    generator = load_generator()
    assert DASHBOARD_JSON.read_text() == generator.render(), (
        "dashboards/agentwatch.json is out of date: run "
        ".venv/bin/python dashboards/build_dashboard.py")


def test_dashboard_round_trips_through_the_grafana_sdk_model() -> None:
    sdk()
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

    register_default_plugins()
    data = dashboard()
    model = Dashboard.from_json(copy.deepcopy(data))
    assert model.panels and all(isinstance(p, (Panel, RowPanel)) for p in model.panels)
    # every key is one the model knows (from_json drops unknown ones) and keeps its value
    assert json.loads(JSONEncoder(sort_keys=True).encode(model)) == data


def test_dashboard_is_importable_as_it_is() -> None:
    d = dashboard()
    assert d["uid"] == "agentwatch" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36  # Grafana >= 9
    assert "id" not in d or d["id"] is None, "an id would overwrite another dashboard"

    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    taken: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g), p["id"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["id"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['id']} overlaps another"
        taken |= cells

    # no dangling data source uids: only the variable, and Grafana's built-in one
    uids = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict):
                uids.add((ds.get("type"), ds.get("uid")))
            elif ds is not None:
                uids.add((None, ds))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(d)
    assert uids <= {("prometheus", "${datasource}"), ("grafana", "-- Grafana --")}, uids
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["id"]
        assert p.get("targets"), f"panel {p['id']} has no query"
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["id"]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "agent"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name, query in (("instance", "label_values(agentwatch_build_info, instance)"),
                        ("agent", 'label_values(agentwatch_processes{instance=~"$instance"}, '
                                  "agent)")):
        v = variables[name]
        assert v["type"] == "query" and v["query"] == query, name
        assert v["multi"] is True and v["includeAll"] is True, name
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name


def test_dashboard_has_the_panels_asked_for() -> None:
    d = dashboard()
    exprs = "\n".join(e for _, e in panel_queries(d))
    for needle in ("agentwatch_kills_total", "agentwatch_policy_violations_total",
                   "by (rule, action, mode)", "agentwatch_sessions", "agentwatch_processes",
                   'kind="exec"', "by (verdict)", "by (destination)",
                   "agentwatch_cpu_seconds_total", "agentwatch_host_cpus",
                   "histogram_quantile(0.99, sum by (path, le)",
                   "agentwatch_kernel_events_lost_total", "agentwatch_probes_expected",
                   'up{instance=~"$instance", job="agentwatch"}', "agentwatch_alerts_spooled",
                   "by (receiver, result)", "agentwatch_policy_info",
                   "agentwatch_policy_reloads_total"):
        assert needle in exprs, needle
    tables = [p for p in panels(d) if p["type"] == "table" and "kill" in p["title"].lower()]
    assert tables, "a table of recent kills"
    (target,) = tables[0]["targets"]
    assert target["instant"] is True and target["format"] == "table"
    assert "[$__range]" in target["expr"] and "> 0" in target["expr"]


def test_dashboard_uses_every_contract_metric_and_nothing_else() -> None:
    d = dashboard()
    used: set[str] = set()
    for where, expr in panel_queries(d) + variable_selectors(d):
        for name in metric_names(expr):
            base = contract_name(name)
            assert base or name in PROMETHEUS_SERIES, f"{where}: {name} is not in the contract"
            used.add(base or name)
    assert set(CONTRACT) <= used, f"not on the dashboard: {sorted(set(CONTRACT) - used)}"


def test_dashboard_queries_filter_by_instance_and_agent() -> None:
    d = dashboard()
    known_labels = set().union(*CONTRACT.values()) | TARGET_LABELS | {"le"}
    for where, expr in panel_queries(d) + variable_selectors(d):
        if where == "variable instance":
            continue  # it lists the instances: no filter on itself
        found = selectors(expr)
        names = metric_names(expr)
        assert {m for m, _ in found} == names, f"{where}: a metric without a label filter"
        for metric, matchers in found:
            allowed = labels_of(metric)
            assert set(matchers) <= allowed, f"{where}: {metric} has no label in {matchers}"
            assert matchers.get("instance") == ("=~", "$instance"), f"{where}: {metric}"
            if "agent" in allowed and not where.startswith("variable agent"):
                assert matchers.get("agent") == ("=~", "$agent"), f"{where}: {metric}"
        for m in _GROUPING.finditer(_STRING.sub('""', expr)):
            for label in filter(None, (s.strip() for s in m.group(2).split(","))):
                assert label in known_labels, f"{where}: unknown label {label}"


def test_dashboard_queries_parse_as_promql(promtool: str, tmp_path: Path) -> None:
    d = dashboard()
    rules = []
    for i, (where, expr) in enumerate(panel_queries(d) + variable_selectors(d)):
        rules.append({"record": f"dashboard:query_{i}", "expr": substitute(expr),
                      "labels": {"where": where}})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_recent_kills_table_counts_a_first_kill(promtool: str, tmp_path: Path) -> None:
    """The table's query over the last hour ($__range = 1h) of synthetic data: a kill on a
    known series, the first kill of a new (agent, rule) series (increase() alone misses
    it), a kill switch use -- and not the kills from before the hour."""
    (table,) = [p for p in panels(dashboard()) if p["title"] == "Recent kills"]
    expr = substitute(table["targets"][0]["expr"])
    target = 'job="agentwatch", instance="host1:9464"'
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # a kill at 70m on a series that existed before
                {"series": f'agentwatch_kills_total{{{target}, agent="a", rule="no-miners"}}',
                 "values": "0x69 1x40"},
                # the first kill of (b, fork-bomb) at 75m creates its series at 1
                {"series": f'agentwatch_kills_total{{{target}, agent="b", rule="fork-bomb"}}',
                 "values": "_x75 1x34"},
                # kills at 20m: before the hour shown
                {"series": f'agentwatch_kills_total{{{target}, agent="c", rule="old"}}',
                 "values": "0x19 5x90"},
                {"series": f'agentwatch_killswitch_total{{{target}, agent="a"}}',
                 "values": "0x79 1x30"},
                {"series": f'agentwatch_killswitch_total{{{target}, agent="c"}}',
                 "values": "0x110"},
            ],
            "promql_expr_test": [{
                "expr": expr,
                "eval_time": "100m",
                "exp_samples": [
                    {"labels": '{instance="host1:9464", agent="a", rule="no-miners"}',
                     "value": 1},
                    {"labels": '{instance="host1:9464", agent="b", rule="fork-bomb"}',
                     "value": 1},
                    {"labels": '{instance="host1:9464", agent="a", rule="kill-switch"}',
                     "value": 1},
                ],
            }],
        }],
    }
    path = tmp_path / "recent_kills_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    run_promtool(promtool, "test", "rules", str(path), cwd=tmp_path)
