"""The alert rules and the Grafana dashboard that ship with the node.

promtool (Debian package prometheus; installing it does not start a Prometheus: tests/peers.py
keeps a policy-rc.d in place during apt-get install) checks the rules and runs unit tests on them;
every metric a rule or a panel names must be one the node exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from peers import ensure_tools

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "appliance" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "dashboard.json"

#: Series Prometheus makes itself for every scrape target.
PROMETHEUS_OWN = {"up"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_tools("promtool")["promtool"]


# --- what the node exports ----------------------------------------------------------------------


def catalogue() -> set[str]:
    """Every series name the node's registry exposes, by metric type (as the text format names them)."""
    from prometheus_client import REGISTRY

    import appliance.metrics  # noqa: F401  (registers the catalogue)

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
    }
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


# --- reading the rules and the dashboard --------------------------------------------------------

_NOT_METRICS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, label_replace args)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations, Grafana's $__rate_interval
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        before = expr[match.start() - 1] if match.start() else " "
        if before.isdigit() or before in ".$":  # 1e9, 0.5, $instance
            continue
        if expr[match.end():].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group(0) not in _NOT_METRICS:
            names.add(match.group(0))
    return names


def rules(text: str) -> list[dict[str, str]]:
    """The alert and record rules of a rules file: name, expr.

    Reads the subset of YAML a rules file uses (``expr:`` inline or as a ``|``/``>`` block), so
    the test needs no YAML library; promtool check rules validates the file as a whole.
    """
    found: list[dict[str, str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"\s*-\s*(alert|record):\s*(\S+)", line):
            found.append({"name": m.group(2)})
        elif m := re.match(r"(\s*)expr:\s*(.*)$", line):
            indent, value = len(m.group(1)), m.group(2).strip()
            if value[:1] in "|>":
                block = []
                for following in lines[i + 1:]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following)
                value = textwrap.dedent("\n".join(block)).strip()
            found[-1]["expr"] = value
    return found


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, nested rows included."""
    queries = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return queries


def variable_metrics(dashboard: dict) -> set[str]:
    """Metrics the dashboard's template variables query (``label_values(metric, label)``)."""
    names = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        for text in (query, variable.get("definition", "")):
            names.update(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", text))
    return names


def as_promql(grafana_expr: str) -> str:
    """A Grafana query with its variables replaced by what Grafana would put there."""
    return (grafana_expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
            .replace("$__range", "1h").replace("$instance", ".+"))


def test_metric_names_are_read_from_promql_without_functions_labels_or_keywords():
    expr = ('histogram_quantile(0.95, sum by (priority, le) (rate(appliance_queue_wait_seconds_bucket'
            '{instance=~"$instance"}[$__rate_interval]))) > 60 and on () (hour() >= 7 < 19) '
            'unless absent(up{job="appliance"}) or 1e9 < sum without (model) (x_total)')
    assert metric_names(expr) == {"appliance_queue_wait_seconds_bucket", "up", "x_total"}


# --- the alert rules ----------------------------------------------------------------------------


def test_promtool_check_rules_passes(promtool):
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_alerts_ops_asked_for_are_there_with_a_severity_and_a_summary():
    text = ALERTS.read_text()
    names = [rule["name"] for rule in rules(text)]
    for wanted in ("ApplianceQueueGrowing", "ApplianceOutboxBacklog", "ApplianceResultUndelivered",
                   "ApplianceDeliveryFailing", "ApplianceNoInstancesDuringWorkingHours", "ApplianceDiskLow",
                   "ApplianceDiskFillingUp", "ApplianceInferenceErrors", "ApplianceTriageSlow", "ApplianceDown",
                   "ApplianceModelNotLoaded", "ApplianceBelowDiskWatermark"):
        assert wanted in names
    blocks = re.split(r"\n\s*- alert: ", text)[1:]
    assert len(blocks) == len(names)
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"severity: (critical|warning)\b", block), f"{name} has no severity label"
        assert "summary:" in block and "description:" in block, f"{name} lacks a summary or description"


def test_alert_annotations_name_no_patient():
    # Annotations may only use labels the catalogue has, and none of those is about a patient.
    rules_text = "\n".join(line for line in ALERTS.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$labels\.([A-Za-z_]+)", rules_text))
    assert used <= {"instance", "job", "model", "destination", "priority", "reason", "stage", "finding", "level", "check"}
    assert not re.search(r"patient|accession|birth|\$labels\.(?:ae|calling)", rules_text, re.I)


def test_every_metric_the_alerts_use_is_exported_by_the_node():
    exported = catalogue() | PROMETHEUS_OWN
    for rule in rules(ALERTS.read_text()):
        missing = metric_names(rule["expr"]) - exported
        assert not missing, f"alert {rule['name']} uses {sorted(missing)}, which the node does not export"


PROMTOOL_TESTS = """\
rule_files:
  - {alerts}
evaluation_interval: 1m
tests:
  # Destination "pacs" fails every minute and never succeeds; "archive" fails now and then but
  # still accepts results; "viewer" has never accepted one (it has no success series at all).
  - interval: 1m
    input_series:
      - series: 'appliance_deliveries_total{{job="appliance", instance="node:9109", destination="pacs", result="failure"}}'
        values: '0+1x30'
      - series: 'appliance_deliveries_total{{job="appliance", instance="node:9109", destination="pacs", result="success"}}'
        values: '12x30'
      - series: 'appliance_deliveries_total{{job="appliance", instance="node:9109", destination="archive", result="refused"}}'
        values: '0+1x30'
      - series: 'appliance_deliveries_total{{job="appliance", instance="node:9109", destination="archive", result="success"}}'
        values: '0+2x30'
      - series: 'appliance_deliveries_total{{job="appliance", instance="node:9109", destination="viewer", result="failure"}}'
        values: '0+1x30'
    alert_rule_test:
      - eval_time: 3m
        alertname: ApplianceDeliveryFailing
        exp_alerts: []
      - eval_time: 15m
        alertname: ApplianceDeliveryFailing
        exp_alerts:
          - exp_labels: {{severity: critical, job: appliance, instance: "node:9109", destination: pacs}}
            exp_annotations:
              summary: "Deliveries to pacs failing on node:9109"
              description: "{pacs_description}"
          - exp_labels: {{severity: critical, job: appliance, instance: "node:9109", destination: viewer}}
            exp_annotations:
              summary: "Deliveries to viewer failing on node:9109"
              description: "{viewer_description}"

  # Free space falls from 40 GB by 1 GB a minute to 8 GB: below 10 GiB from the 30th minute, and
  # the alert fires 10 minutes later; never near the 1 GiB watermark.
  - interval: 1m
    input_series:
      - series: 'appliance_disk_free_bytes{{job="appliance", instance="node:9109"}}'
        values: '40e9-1e9x32 8e9x30'
    alert_rule_test:
      - eval_time: 25m
        alertname: ApplianceDiskLow
        exp_alerts: []
      - eval_time: 35m
        alertname: ApplianceDiskLow
        exp_alerts: []
      - eval_time: 45m
        alertname: ApplianceDiskLow
        exp_alerts:
          - exp_labels: {{severity: warning, job: appliance, instance: "node:9109"}}
            exp_annotations:
              summary: "7.451GiB free for data on node:9109"
              description: "{disk_description}"
      - eval_time: 45m
        alertname: ApplianceBelowDiskWatermark
        exp_alerts: []

  # Nothing received since the node started at the epoch (a Thursday, 00:00 UTC).
  - interval: 1m
    input_series:
      - series: 'appliance_last_instance_received_timestamp_seconds{{job="appliance", instance="node:9109"}}'
        values: '0x3600'
      - series: 'process_start_time_seconds{{job="appliance", instance="node:9109"}}'
        values: '0x3600'
    alert_rule_test:
      - eval_time: 5h     # Thursday 05:00 UTC: 5 hours without an image, outside working hours
        alertname: ApplianceNoInstancesDuringWorkingHours
        exp_alerts: []
      - eval_time: 13h    # Thursday 13:00 UTC
        alertname: ApplianceNoInstancesDuringWorkingHours
        exp_alerts:
          - exp_labels: {{severity: warning, job: appliance, instance: "node:9109"}}
            exp_annotations:
              summary: "No images received by node:9109 for 3 hours in working hours"
              description: "{intake_description}"
      - eval_time: 20h    # Thursday 20:00 UTC
        alertname: ApplianceNoInstancesDuringWorkingHours
        exp_alerts: []
      - eval_time: 58h    # Saturday 10:00 UTC
        alertname: ApplianceNoInstancesDuringWorkingHours
        exp_alerts: []
"""


def _description(alert: str, **labels: str) -> str:
    """The rendered description of an alert in alerts.yml (folded, with labels filled in)."""
    text = ALERTS.read_text()
    block = text.split(f"- alert: {alert}\n", 1)[1]
    folded = re.search(r"description: >-\n((?:\s{12}.*\n)+)", block).group(1)
    description = " ".join(line.strip() for line in folded.splitlines())
    for name, value in labels.items():
        description = description.replace("{{ $labels.%s }}" % name, value)
    return description.replace('"', '\\"')


def test_promtool_unit_tests_of_delivery_disk_and_intake_alerts_pass(promtool, tmp_path):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(PROMTOOL_TESTS.format(
        alerts=ALERTS,
        pacs_description=_description("ApplianceDeliveryFailing", destination="pacs"),
        viewer_description=_description("ApplianceDeliveryFailing", destination="viewer"),
        disk_description=_description("ApplianceDiskLow"),
        intake_description=_description("ApplianceNoInstancesDuringWorkingHours")))
    done = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the dashboard ------------------------------------------------------------------------------


def test_dashboard_imports_into_grafana_with_a_prometheus_datasource_input():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ids = []

    def walk(panels):
        for panel in panels:
            ids.append(panel["id"])
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
                assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"]), panel["title"]
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_metric_the_dashboard_shows_is_exported_by_the_node():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = catalogue() | PROMETHEUS_OWN
    for title, expr in dashboard_queries(dashboard):
        missing = metric_names(expr) - exported
        assert not missing, f"panel {title!r} queries {sorted(missing)}, which the node does not export"
    assert variable_metrics(dashboard) <= exported


def test_the_dashboard_shows_every_metric_in_the_catalogue():
    from prometheus_client import REGISTRY

    dashboard = json.loads(DASHBOARD.read_text())
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_queries(dashboard)))
    families = {family.name for family in REGISTRY.collect() if family.name.startswith("appliance_")}
    assert families, "appliance.metrics registered nothing"
    unshown = {f for f in families if not any(name == f or name.startswith(f + "_") for name in shown)}
    assert not unshown, f"metrics in the catalogue with no panel: {sorted(unshown)}"


def test_every_dashboard_query_is_valid_promql(promtool, tmp_path):
    # promtool has no "parse this expression" command; as recording rules, check rules parses them.
    dashboard = json.loads(DASHBOARD.read_text())
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_queries(dashboard)):
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(as_promql(expr))}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
