"""deploy/prometheus: the scrape configs and rule files are valid for promtool, the
promtool unit tests of the alerts pass and cover every alert, and the rules read metrics
and labels that the code really exports.

promtool comes with Debian's ``prometheus`` package (scripts/system-packages.sh installs
it for ``make test``); the tests that run it skip, saying so, when it is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))
README = ROOT / "deploy" / "README.md"
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package "
                    "(`bash scripts/system-packages.sh` does it as root)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _rules() -> list[dict[str, Any]]:
    return [r for p in RULES for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def bool_form(expr: str) -> str:
    """``expr`` with its top-level comparison(s) given the ``bool`` modifier.

    Top level = outside parentheses, label matchers, range brackets and strings, so
    ``a{x!="y"} > (b > 0)`` becomes ``a{x!="y"} > bool (b > 0)``.
    """
    out: list[str] = []
    depth = 0
    quote = ""
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 2
                continue
            quote = "" if c == quote else quote
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c in "([{":
            depth += 1
            out.append(c)
        elif c in ")]}":
            depth -= 1
            out.append(c)
        elif depth == 0 and (op := next((o for o in COMPARISONS if expr.startswith(o, i)), "")):
            out.append(f"{op} bool")
            i += len(op)
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _squash(expr: str) -> str:
    return " ".join(expr.split())


def test_bool_form_rewrites_only_top_level_comparisons() -> None:
    assert bool_form('a{x!="y"} > (b > 0)') == 'a{x!="y"} > bool (b > 0)'
    assert bool_form('x{a=~"<.*"} == 0') == 'x{a=~"<.*"} == bool 0'
    assert bool_form("max(y) >= 1 and z < 2") == "max(y) >= bool 1 and z < bool 2"
    assert bool_form("absent(x)") == "absent(x)"


# -- promtool -------------------------------------------------------------------------------


def test_compose_prometheus_config_is_valid(promtool: str) -> None:
    result = _run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout + result.stderr


def test_rule_files_are_valid(promtool: str) -> None:
    assert [p.name for p in RULES] == ["alerts.yml", "recording.yml"]
    result = _run(promtool, "check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("SUCCESS") == len(RULES)


def test_k8s_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    docs = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-config.yaml").read_text())
    text = docs["data"]["prometheus.yml"]
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = _run(promtool, "check", "config", str(config))
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check everything else,
        # with each job's discovery swapped for a fixed target.
        parsed = yaml.safe_load(text)
        for job in parsed["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs") == [{"role": "endpoints"}], job
            job["static_configs"] = [{"targets": ["localhost:1"]}]
        config.write_text(yaml.safe_dump(parsed))
        result = _run(promtool, "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert len(UNIT_TESTS) >= 5
    result = _run(promtool, "test", "rules", *map(str, UNIT_TESTS))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.count("SUCCESS") == len(UNIT_TESTS), out


def test_a_broken_alert_fails_its_unit_test(promtool: str, tmp_path: Path) -> None:
    """The unit tests are not vacuous: with one threshold changed, promtool reports it."""
    rules = tmp_path / "rules"
    tests = tmp_path / "tests"
    shutil.copytree(PROM / "rules", rules)
    shutil.copytree(PROM / "tests", tests)
    alerts = rules / "alerts.yml"
    text = alerts.read_text()
    assert text.count("> 300\n") == 1
    alerts.write_text(text.replace("> 300\n", "> 900\n"))  # StreamrecConsumerLagHigh
    result = _run(promtool, "test", "rules", str(tests / "ingest_test.yml"))
    assert result.returncode != 0
    assert "StreamrecConsumerLagHigh" in result.stdout + result.stderr


# -- what the unit tests cover -------------------------------------------------------------


def _alert_tests() -> list[tuple[str, dict[str, Any]]]:
    """(test file name, alert_rule_test entry) of every promtool unit test."""
    out = []
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            out += [(path.name, t | {"_case": id(case)}) for t in case.get("alert_rule_test", [])]
    return out


def test_every_alert_is_tested_firing_pending_and_quiet() -> None:
    """Each alert: a test where it fires, a check inside its `for:` window just before
    (pending, so not reported), and the healthy pipeline where it stays silent."""
    tests = _alert_tests()
    for name, rule in _alerts().items():
        hold = _duration_s(rule["for"])
        mine = [t for _, t in tests if t["alertname"] == name]
        firing = [t for t in mine if t["exp_alerts"]]
        assert firing, f"no test where {name} fires"
        assert any(  # an alert that fires at T is expected silent within `for` before T
            q["_case"] == f["_case"]
            and _duration_s(f["eval_time"]) - hold <= _duration_s(q["eval_time"])
            < _duration_s(f["eval_time"])
            and alert["exp_labels"] not in [a["exp_labels"] for a in q["exp_alerts"]]
            for f in firing for alert in f["exp_alerts"] for q in mine
        ), f"{name}: no check that `for: {rule['for']}` holds"
        quiet = [t for file, t in tests if file == "healthy_test.yml" and t["alertname"] == name]
        assert quiet and not any(t["exp_alerts"] for t in quiet), f"{name} on a healthy pipeline"
        for t in firing:
            for alert in t["exp_alerts"]:
                assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
                assert set(alert["exp_annotations"]) == set(rule["annotations"]), name


def test_healthy_test_checks_the_bool_form_of_every_alert() -> None:
    """healthy_test.yml evaluates `> bool` (etc.) of every alert and expects one 0 per
    worker: the bool forms are never empty while the metrics exist."""
    [case] = yaml.safe_load((PROM / "tests" / "healthy_test.yml").read_text())["tests"]
    checked = {_squash(t["expr"]): t for t in case["promql_expr_test"]}
    for name, rule in _alerts().items():
        form = _squash(bool_form(rule["expr"]))
        assert form != _squash(rule["expr"]), f"{name} has no top-level comparison"
        assert form in checked, f"healthy_test.yml does not check {name}: {form}"
        samples = checked[form]["exp_samples"]
        assert samples and all(s["value"] == 0 for s in samples), name


# -- rule conventions -----------------------------------------------------------------------


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of ``markdown``."""
    out = set()
    for line in markdown.splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_every_alert_has_for_severity_annotations_and_a_runbook_section() -> None:
    alerts = _alerts()
    assert {"StreamrecDriftAlarm", "StreamrecOnlineHitRateDrop", "StreamrecConsumerLagHigh",
            "StreamrecServingErrorRate", "StreamrecServingLatencySLO",
            "StreamrecModelStale"} <= set(alerts)
    anchors = _anchors(README.read_text(encoding="utf-8"))
    for name, rule in alerts.items():
        assert _duration_s(rule["for"]) > 0, name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert "{{ $labels." in notes["summary"] + notes["description"], name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "deploy/README.md" and anchor in anchors, f"{name}: {notes['runbook_url']}"
        assert "absent(" not in rule["expr"], f"{name}: absent() has no bool form"


def test_recording_rules_are_named_level_metric_operation() -> None:
    names = [r["record"] for r in _rules() if "record" in r]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"streamrec:[a-z0-9_]+(:[a-z0-9_]+)?", name), name
    assert {"streamrec:serving_request_latency_seconds:p99_5m", "streamrec:ingest_events_rate5m",
            "streamrec:online_hr:by_version"} <= set(names)


# -- the rules read what the code exports ---------------------------------------------------


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, of every metric streamrec's processes export."""
    from prometheus_client import CollectorRegistry

    from ingest.metrics import ConsumerMetrics
    from retrain.job import RetrainMetrics
    from retrain.schedule import Scheduler
    from serving.app import ServingMetrics
    from serving.monitor import MonitorMetrics

    registries = [ConsumerMetrics("sessions").registry, ServingMetrics().registry,
                  MonitorMetrics().registry, RetrainMetrics().registry]
    scheduler_registry = CollectorRegistry()
    Scheduler(lambda trigger: None, registry=scheduler_registry)
    registries.append(scheduler_registry)
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created")}
    out: dict[str, set[str]] = {}
    for registry in registries:
        for collector in list(registry._collector_to_names):
            labels = set(getattr(collector, "_labelnames", ()))
            for family in collector.describe():
                for suffix in suffixes[family.type]:
                    extra = {"le"} if suffix == "_bucket" else set()
                    out[family.name + suffix] = labels | extra
    return out


def test_rules_read_metrics_and_labels_the_code_exports() -> None:
    exported = _exported()
    assert "streamrec_serving_request_seconds_bucket" in exported
    assert "streamrec_drift_alarm_active" in exported
    matcher = re.compile(r"(streamrec_[a-z0-9_]+)(?:\{([^}]*)\})?")
    for rule in _rules():
        name = rule.get("alert") or rule["record"]
        for metric, matchers in matcher.findall(rule["expr"]):
            assert metric in exported, f"{name}: {metric} is not exported by streamrec"
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exported[metric] | {"job", "instance"}, \
                    f"{name}: {metric} has no label {label}"
        for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", rule["expr"]):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in {"job", "instance", "le"} or any(
                    label in labels for labels in exported.values()), f"{name}: label {label}"
