"""The Grafana dashboards and the Prometheus rules, checked statically and against live data.

Static (fast): the dashboards are Grafana JSON that provisioning can load
(datasource by uid, unique ids, panels on the grid, no empty query), the
provisioning files point Grafana at them, every query is valid PromQL
(``promtool``), and the ``bool`` rewrite of alert expressions is right.

Live (slow, one pipeline for the module, ``observability_pipeline.py``): a real
Prometheus scrapes the five streamrec processes fed by the simulator; every
panel query, annotation and template variable of every dashboard, and every
recording and alerting rule, is evaluated through the Prometheus HTTP API and
must return data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from observability_pipeline import (
    JOBS,
    PROMETHEUS,
    RULES_DIR,
    LivePipeline,
    PrometheusError,
    finite_samples,
)

from streamrec.stack import LocalStack

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# What Grafana puts in place of its built-in variables, as a user at a 3-hour
# range with a 15 s scrape interval would get.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m",
            "__range_s": "300", "__range_ms": "300000", "__interval_ms": "15000"}
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Query:
    where: str  # "dashboard / panel [refId]" or "rules file: rule"
    expr: str  # as evaluated (variables substituted, alert comparison made `bool`)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's ``$name`` / ``${name}`` / ``[[name]]`` replaced; built-ins as in BUILTINS."""
    values = BUILTINS | variables

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def variable_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """Each template variable as "All" selects it: its allValue (a regex)."""
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        assert var.get("includeAll") and var.get("allValue"), \
            f"variable {var['name']}: give it includeAll and an allValue regex"
        out[var["name"]] = var["allValue"]
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    variables = variable_values(dashboard)
    title = dashboard["title"]
    out = []
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            out.append(Query(f"{title} / {panel['title']} [{t['refId']}]",
                             substitute(t["expr"], variables)))
    return out


def annotation_queries(dashboard: dict[str, Any]) -> list[Query]:
    variables = variable_values(dashboard)
    return [Query(f"{dashboard['title']} / annotation {a['name']}",
                  substitute(a["expr"], variables))
            for a in dashboard["annotations"]["list"] if a.get("datasource") == DATASOURCE]


def with_bool(expr: str) -> str:
    """``expr`` with each comparison at the top level (outside any bracket) made ``bool``.

    ``X > 0.3`` -> ``X > bool 0.3``: 1 or 0 wherever X has data, where the plain
    comparison filters to the firing series only.
    """
    out, depth, i, quote = [], 0, 0, ""
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "#":  # a comment runs to the end of the line
            end = expr.find("\n", i)
            end = len(expr) if end < 0 else end
            out.append(expr[i:end])
            i = end
            continue
        elif depth == 0:
            op = next((o for o in COMPARISONS if expr.startswith(o, i)), None)
            if op and not (op in "><" and expr.startswith("=~", i + 1)):
                rest = expr[i + len(op):]
                out.append(op)
                i += len(op)
                if not re.match(r"\s*bool\b", rest):
                    out.append(" bool")
                continue
        out.append(c)
        i += 1
    return "".join(out)


def rule_files() -> list[Path]:
    return sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")])


def rule_queries() -> list[Query]:
    """Recording rules: the recorded series by name; alerts: the expression made ``bool``."""
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    out.append(Query(f"{path.name}: record {rule['record']}", rule["record"]))
                else:
                    out.append(Query(f"{path.name}: alert {rule['alert']}",
                                     with_bool(rule["expr"])))
    return out


# -------------------------------------------------------------------------- static


def test_dashboards_are_grafana_json_provisioning_can_load() -> None:
    assert [p.name for p in DASHBOARDS] == ["streamrec-drift.json", "streamrec-operations.json"]
    uids = set()
    for path in DASHBOARDS:
        d = load(path)
        name = path.name
        assert d["uid"] and d["uid"] not in uids, f"{name}: missing or repeated uid"
        uids.add(d["uid"])
        assert d["title"] and d.get("id") is None, f"{name}: a title, and no database id"
        assert d["schemaVersion"] >= 36, f"{name}: Grafana 10/11 schema"
        ids = [p["id"] for p in panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: repeated panel ids"
        cells: dict[tuple[int, int], str] = {}
        for panel in panels(d):
            title = f"{name} / {panel.get('title')}"
            assert panel.get("title"), f"{name}: panel {panel['id']} has no title"
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, title
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{title} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = title
            if panel["type"] == "row":
                continue
            assert panel.get("datasource") == DATASOURCE, f"{title}: datasource"
            targets = panel.get("targets") or []
            assert targets, f"{title}: no query"
            assert len({t["refId"] for t in targets}) == len(targets), f"{title}: refIds"
            for t in targets:
                assert t.get("datasource") == DATASOURCE, f"{title} [{t['refId']}]: datasource"
                assert t.get("expr", "").strip(), f"{title} [{t['refId']}]: empty expr"
            assert panel.get("description"), f"{title}: say what it shows"
            if panel["type"] != "state-timeline":  # there the value is a state, not a quantity
                assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: unit"
        for a in d["annotations"]["list"]:
            if not a.get("builtIn"):
                assert a["datasource"] == DATASOURCE and a["expr"].strip(), f"{name}: {a['name']}"
        for var in d["templating"]["list"]:
            assert var["datasource"] == DATASOURCE and var["definition"], f"{name}: {var['name']}"
        assert dashboard_queries(d) and annotation_queries(d)  # variables all substitutable


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        "prometheus", "prometheus", "http://prometheus:9090")
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/streamrec.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_recording_rules_the_dashboards_read_are_defined() -> None:
    recorded = {r["record"] for path in rule_files()
                for g in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
                for r in g["rules"] if "record" in r}
    used = {name for d in map(load, DASHBOARDS)
            for q in (*dashboard_queries(d), *annotation_queries(d))
            for name in re.findall(r"\bstreamrec:[\w:]+", q.expr)}
    assert used, "the dashboards read no recording rule"
    assert used <= recorded, f"not recorded by {RULES_DIR}: {sorted(used - recorded)}"


def test_job_names_match_the_deployed_scrape_config() -> None:
    """The live test scrapes under the job names the deployment uses (rules match on job)."""
    deployed = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    if not deployed.exists():
        pytest.skip("deploy/prometheus/prometheus.yml not written yet")
    jobs = {c["job_name"] for c in yaml.safe_load(deployed.read_text())["scrape_configs"]}
    assert set(JOBS) <= jobs, f"jobs of the live test missing from {deployed}: {set(JOBS) - jobs}"


def test_bool_rewrite_of_alert_comparisons() -> None:
    assert with_bool("x > 0.3") == "x > bool 0.3"
    assert with_bool("a / b < 0.75 * (c / d)") == "a / b < bool 0.75 * (c / d)"
    assert with_bool("x >= bool 1") == "x >= bool 1"  # already bool
    assert with_bool('x{a=~"b>c", d!="e"} != 0') == 'x{a=~"b>c", d!="e"} != bool 0'
    # inside brackets a comparison is a filter, left alone
    assert with_bool("time() - (max(y > 0) or on (job) z) > 6 * 3600") == \
        "time() - (max(y > 0) or on (job) z) > bool 6 * 3600"
    assert with_bool("a > on (job) group_left b") == "a > bool on (job) group_left b"
    assert with_bool("rate(x[5m]) == 0 # note > 1") == "rate(x[5m]) == bool 0 # note > 1"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """Every dashboard and annotation query, as Grafana sends it, parsed by promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    queries = [q for d in map(load, DASHBOARDS) for q in
               (*dashboard_queries(d), *annotation_queries(d))]
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.expr} for i, q in enumerate(queries)]}]}
    assert len(queries) > 40
    path = tmp_path / "dashboards.yml"
    path.write_text(json.dumps(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    if out.returncode:
        bad = [f"{q.where}: {q.expr}" for i, q in enumerate(queries)
               if f"dashboard:query_{i}\"" in out.stdout + out.stderr]
        pytest.fail(f"promtool: {out.stdout}{out.stderr}\n" + "\n".join(bad))


# -------------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def pipeline(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePipeline]:
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"{PROMETHEUS} not found: install the Debian package `prometheus` to run "
                    "the dashboards and rules against a real Prometheus")
    with LivePipeline(stack, tmp_path_factory.mktemp("observability")) as p:
        yield p


def wait_for_data(p: LivePipeline, queries: list[Query], timeout: float,
                  range_s: float | None = None) -> dict[Query, str]:
    """Evaluate ``queries`` until each has returned a finite sample; what never did, and why.

    ``range_s``: a range query over the last ``range_s`` seconds (what Grafana
    runs for annotations) instead of an instant query.
    """
    assert p.prometheus is not None
    pending = {q: "no data" for q in queries}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if dead := p.dead():
            pytest.fail(dead)
        for q in list(pending):
            try:
                if range_s is None:
                    data = p.prometheus.query(q.expr)
                else:
                    now = time.time()
                    data = p.prometheus.query_range(q.expr, now - range_s, now)
            except PrometheusError as e:
                pending[q] = str(e)
                continue
            if finite_samples(data):
                del pending[q]
            elif data["result"]:
                pending[q] = "only NaN / Inf samples"
        if pending:
            time.sleep(1.0)
    return pending


def report(missing: dict[Query, str], p: LivePipeline) -> str:
    lines = [f"- {q.where}: {why}\n    {' '.join(q.expr.split())}" for q, why in missing.items()]
    traffic = p.traffic
    state = (f"traffic: {traffic.rounds} rounds, answers {dict(traffic.answers)}, "
             f"errors {traffic.errors[:3]}" if traffic else "no traffic")
    return (f"{len(missing)} queries returned no data:\n" + "\n".join(lines) +
            f"\n{state}; timings {p.timings}")


@pytest.mark.slow
def test_every_dashboard_panel_returns_data(pipeline: LivePipeline) -> None:
    queries = [q for d in map(load, DASHBOARDS) for q in dashboard_queries(d)]
    missing = wait_for_data(pipeline, queries, timeout=90)
    assert not missing, report(missing, pipeline)
    assert pipeline.traffic is not None and not pipeline.traffic.errors, pipeline.traffic.errors


@pytest.mark.slow
def test_every_annotation_and_variable_returns_data(pipeline: LivePipeline) -> None:
    """Annotations as Grafana runs them (a range query); variables' label values."""
    assert pipeline.prometheus is not None
    queries = [q for d in map(load, DASHBOARDS) for q in annotation_queries(d)]
    missing = wait_for_data(pipeline, queries, timeout=60,
                            range_s=time.time() - pipeline.started_at)
    assert not missing, report(missing, pipeline)
    for d in map(load, DASHBOARDS):
        for var in d["templating"]["list"]:
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, f"{var['name']}: expected label_values(metric, label)"
            values = pipeline.prometheus.get(f"/api/v1/label/{m[2]}/values", **{"match[]": m[1]})
            assert values, f"{d['title']}: variable {var['name']} has no values"


@pytest.mark.slow
def test_every_rule_is_loaded_healthy_and_returns_data(pipeline: LivePipeline) -> None:
    files = rule_files()
    if not files:
        pytest.skip(f"no rule files in {RULES_DIR}")
    assert pipeline.prometheus is not None
    want = {g["name"]: {r.get("record") or r.get("alert") for r in g["rules"]}
            for path in files for g in yaml.safe_load(path.read_text())["groups"]}

    def loaded() -> dict[str, dict[str, dict[str, Any]]]:
        groups = pipeline.prometheus.get("/api/v1/rules")["groups"]
        return {g["name"]: {r["name"]: r for r in g["rules"]} for g in groups}

    deadline = time.monotonic() + 30
    while True:
        groups = loaded()
        rules = [r for g in groups.values() for r in g.values()]
        if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {g: set(r) for g, r in groups.items()} == want, "rule groups not loaded as written"
    unhealthy = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules
                 if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    missing = wait_for_data(pipeline, rule_queries(), timeout=60)
    assert not missing, report(missing, pipeline)
