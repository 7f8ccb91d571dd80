"""Labelled counters start at 0 for every label value known in advance.

Prometheus's ``rate()`` and ``increase()`` never see the first increment of a
series that appears with it, so each component's metrics object creates its
known series at 0 when it is built. These tests read the exposition text of a
freshly built metrics object, and check that the label sets used for this are
the ones the code produces (so a new value cannot be left out unnoticed).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import time
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

import retrain.job
import serving.app
from ingest.events import RejectReason
from ingest.metrics import DUPLICATE_KINDS, ConsumerMetrics
from ingest.store import SessionStore
from model.drift import DETECTOR_NAMES, HR_PAGE_HINKLEY
from model.registry import ModelRegistry
from retrain.job import RUN_OUTCOMES, TRIGGERS, RetrainMetrics, RunSummary, decide, run_once
from retrain.schedule import ACTIONS, COOLDOWN, ManualClock, Scheduler
from serving.app import (
    API_OUTCOMES,
    EVENT_OUTCOMES,
    REDIS_OPS,
    ServingMetrics,
    _outcome,
    create_app,
)
from serving.batcher import SHED_REASONS, BatcherMetrics, BatchingConfig, DynamicBatcher, Overloaded
from serving.fallback import FallbackReason
from serving.monitor import (
    CLICK_OUTCOMES,
    FALLBACK_ANSWER,
    MODEL_ANSWER,
    NO_VERSION,
    MonitorMetrics,
    OnlineMonitor,
    Reference,
)
from serving.monitor_settings import MonitorSettings
from serving.online import ServedRecord
from serving.settings import ServingSettings

T0 = time.time_ns() // 1_000_000 - 3_600_000


def _text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def _zero(text: str, name: str, **labels: str) -> bool:
    """``name{labels} 0.0`` is a line of ``text`` (the exposition sorts the labels)."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} 0.0" in text.splitlines()


def _string_args(path: Path, match: set[str]) -> set[str]:
    """String literals passed first to calls of ``match`` (plain or attribute names),
    or to ``.labels(...)`` of an attribute in ``match``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        f, arg = node.func, node.args[0]
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if (isinstance(f, ast.Attribute) and f.attr == "labels"
                and isinstance(f.value, ast.Attribute)):
            name = f.value.attr
        if name in match and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.add(arg.value)
    return found


# --------------------------------------------------------------------------- serving


def test_serving_metrics_start_shed_fallback_redis_event_and_request_series_at_zero() -> None:
    text = _text(ServingMetrics().registry)
    assert _zero(text, "streamrec_serving_shed_total", reason="queue_full")
    for reason in SHED_REASONS:
        assert _zero(text, "streamrec_serving_shed_total", reason=reason), reason
    for reason in FallbackReason:
        assert _zero(text, "streamrec_serving_fallbacks_total", reason=reason.value), reason
    for op in REDIS_OPS:
        assert _zero(text, "streamrec_serving_redis_errors_total", op=op), op
    assert len(EVENT_OUTCOMES) == 2 + len(RejectReason)
    for outcome in EVENT_OUTCOMES:
        assert _zero(text, "streamrec_serving_events_total", outcome=outcome), outcome
    for endpoint, outcomes in API_OUTCOMES.items():
        for outcome in outcomes:
            assert _zero(text, "streamrec_serving_request_seconds_count", endpoint=endpoint,
                         outcome=outcome), (endpoint, outcome)


def test_serving_label_sets_are_the_values_the_app_produces(tmp_path: Path) -> None:
    # Every Redis op the app counts is in REDIS_OPS (and nothing else is).
    used = _string_args(Path(inspect.getfile(serving.app)),
                        {"redis_errors", "_count_redis_error", "redis_unavailable"})
    assert used == set(REDIS_OPS)
    # Every initialised outcome is one the middleware can produce for a real route.
    produced = {_outcome(status, declared) for status in (200, 202, 401, 403, 404, 413, 422,
                                                          500, 503) for declared in (None,
                                                                                     "fallback")}
    assert {o for outcomes in API_OUTCOMES.values() for o in outcomes} <= produced
    client = redis.Redis(host="127.0.0.1", port=1)  # built, never connected
    app = create_app(ServingSettings(), store=SessionStore(client),
                     registry=ModelRegistry(tmp_path / "models"))
    assert set(API_OUTCOMES) <= {getattr(r, "path", None) for r in app.routes}


def test_every_shed_reason_is_counted_closed_included() -> None:
    async def go() -> CollectorRegistry:
        registry = CollectorRegistry()
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            lambda xs: xs, BatchingConfig(max_wait_ms=1000), metrics=BatcherMetrics(registry))
        with pytest.raises(Overloaded, match="not running"):
            await batcher.submit(0)  # not started: closed
        batcher.start()
        queued = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        await batcher.close()  # the queued request is shed as closed
        await asyncio.wait({queued}, timeout=5)
        assert isinstance(queued.exception(), Overloaded)
        return registry

    registry = asyncio.run(go())
    assert registry.get_sample_value("streamrec_serving_shed_total", {"reason": "closed"}) == 2
    assert registry.get_sample_value("streamrec_serving_queue_depth") == 0


# --------------------------------------------------------------------------- ingest


def test_consumer_metrics_start_dead_letter_duplicate_and_role_series_at_zero() -> None:
    text = _text(ConsumerMetrics("sessions").registry)
    for reason in RejectReason:
        assert _zero(text, "streamrec_ingest_events_dead_lettered_total", reason=reason.value)
    for kind in DUPLICATE_KINDS:
        assert _zero(text, "streamrec_ingest_events_duplicate_total", kind=kind), kind
    assert _zero(text, "streamrec_ingest_events_consumed_total", role="sessions")
    assert _zero(text, "streamrec_ingest_events_applied_total", role="sessions")
    # The session updater counts exactly those duplicate kinds.
    used = _string_args(Path(inspect.getfile(ConsumerMetrics)).with_name("sessions.py"),
                        {"duplicates"})
    assert used == set(), "sessions.py counts duplicates by literal; use DUPLICATE_KINDS"


# --------------------------------------------------------------------------- drift monitor


def _served(ts: int, version: str | None, *items: str, fallback: str | None = None
            ) -> ServedRecord:
    return ServedRecord(ts, version, fallback, len(items), tuple(items))


def test_monitor_metrics_start_click_outcomes_and_each_versions_series_at_zero() -> None:
    from ingest.events import ClickEvent

    metrics = MonitorMetrics()
    text = _text(metrics.registry)
    for outcome in CLICK_OUTCOMES:
        assert _zero(text, "streamrec_drift_clicks_total", outcome=outcome), outcome
    assert _zero(text, "streamrec_drift_online_scored_total", model_version=NO_VERSION,
                 answer=FALLBACK_ANSWER)
    assert "streamrec_drift_alarms_total{" not in text  # no version seen yet

    monitor = OnlineMonitor(MonitorSettings(), metrics)
    monitor.set_reference(Reference("v1", None, None))
    text = _text(metrics.registry)
    for detector in DETECTOR_NAMES:
        assert _zero(text, "streamrec_drift_alarms_total", detector=detector,
                     model_version="v1"), detector
    assert _zero(text, "streamrec_drift_online_scored_total", model_version="v1",
                 answer=MODEL_ANSWER)

    # Another version (a canary, or the old champion still answering): its
    # Page-Hinkley alarm series starts with its first scored answer.
    ev = ClickEvent(event_id="e1", session_id="s1", item_id="i2", ts=T0 + 1000)
    monitor.observe([ev], {"s1": [_served(T0, "v0", "i1", "i2")]})
    text = _text(metrics.registry)
    assert _zero(text, "streamrec_drift_alarms_total", detector=HR_PAGE_HINKLEY,
                 model_version="v0")
    assert f'detector="{DETECTOR_NAMES[1]}",model_version="v0"' not in text
    assert metrics.registry.get_sample_value("streamrec_drift_clicks_total",
                                             {"outcome": "scored"}) == 1


# --------------------------------------------------------------------------- retrain


def test_retrain_metrics_start_every_trigger_outcome_reason_series_at_zero() -> None:
    text = _text(RetrainMetrics().registry)
    for trigger in TRIGGERS:
        for outcome, reasons in RUN_OUTCOMES.items():
            for reason in reasons:
                assert _zero(text, "streamrec_retrain_runs_total", trigger=trigger,
                             outcome=outcome, reason=reason), (trigger, outcome, reason)


def test_run_outcomes_hold_every_outcome_and_reason_a_run_can_end_with() -> None:
    """Scans retrain/job.py for ``summary.outcome, summary.reason = ...`` assignments."""
    assigns = [n for n in ast.walk(ast.parse(Path(inspect.getfile(retrain.job)).read_text(
        encoding="utf-8"))) if isinstance(n, ast.Assign)]
    # `reason = "..."`: the reason of a promotion, set before the pointer moves.
    promoted = {n.value.value for n in assigns if isinstance(n.targets[0], ast.Name)
                and n.targets[0].id == "reason" and isinstance(n.value, ast.Constant)}
    pairs = {(RunSummary.outcome, RunSummary.reason)}  # the defaults
    for node in assigns:
        target = node.targets[0]
        names = [t.attr for t in target.elts if isinstance(t, ast.Attribute)] if isinstance(
            target, ast.Tuple) else []
        if names[:2] != ["outcome", "reason"] or not isinstance(node.value, ast.Tuple):
            continue
        outcome, reason = node.value.elts[:2]
        if isinstance(reason, ast.Constant):
            pairs.add((outcome.value, reason.value))
        elif isinstance(reason, ast.Name):  # the promotion's `reason`
            pairs.update((outcome.value, r) for r in promoted)
        # else decision.reason: decide()'s, checked below
    # decide()'s reasons: a promotion's or a rejection's.
    pairs.add(("promoted", decide({"m": 1.0}, {"m": 0.5}, "m", 0.0).reason))
    pairs.add(("rejected", decide({"m": 0.1}, {"m": 0.5}, "m", 0.0).reason))
    assert pairs == {(o, r) for o, reasons in RUN_OUTCOMES.items() for r in reasons}
    assert inspect.signature(run_once).parameters["trigger"].default in TRIGGERS


def test_scheduler_starts_its_trigger_series_at_zero_and_counts_only_known_triggers() -> None:
    registry, ran = CollectorRegistry(), []
    clock = ManualClock(0.0)
    scheduler = Scheduler(ran.append, cron="*/30 * * * *", clock=clock, registry=registry)
    text = _text(registry)
    for trigger in TRIGGERS:
        for action in ACTIONS:
            line = _zero(text, "streamrec_retrain_triggers_total", trigger=trigger,
                         action=action)
            assert line == (action != COOLDOWN or trigger == "drift"), (trigger, action)
    # What the scheduler itself produces: cron runs, alarm runs, a manual default.
    clock.now = 3600.0
    scheduler.step()
    scheduler.request("drift")
    scheduler.step()
    scheduler.request()
    scheduler.step()
    assert ran == ["schedule", "drift", "manual"]
    assert set(ran) == set(TRIGGERS)
