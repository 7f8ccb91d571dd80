"""The drift monitor: online HR/NDCG per model version, drift alarms on Redis, the step alone."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest
import redis
import torch
from click.testing import CliRunner

from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from ingest.events import ClickEvent, encode_event
from ingest.kafka import make_producer
from ingest.settings import KafkaSettings
from model.checkpoint import save_checkpoint
from model.drift import DriftAlarm, length_counts
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry
from serving.monitor import (
    MonitorMetrics,
    OnlineMonitor,
    Reference,
    load_reference,
    monitor_worker,
)
from serving.monitor_settings import MonitorSettings
from serving.online import ServedRecord, ServedRecorder
from streamrec.stack import LocalStack

T0 = (time.time_ns() // 1_000_000) - 3_600_000  # an hour ago: valid event times
N_ITEMS = 60


def _train_counts() -> dict[str, int]:
    """Zipf-like training counts: item i seen ~600 / (i + 1) times."""
    return {f"i{i}": max(1, round(600 / (i + 1))) for i in range(N_ITEMS)}


def _publish_champion(tmp: Path, name: str = "v1", info: dict[str, Any] | None = None
                      ) -> ModelRegistry:
    rows = [{"session_id": f"s{n % 50}", "ts": T0 + n, "item_id": item}
            for n, item in enumerate(i for i, c in _train_counts().items() for _ in range(c))]
    schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                             transform={"op": "categorify"})])
    wf = Workflow(schema, max_len=4).fit(pa.Table.from_pylist(rows))
    torch.manual_seed(0)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "sasrec", "d_model": 8, "n_heads": 1, "n_layers": 1, "max_len": 4}}))
    registry = ModelRegistry(tmp / "models")
    registry.publish(save_checkpoint(tmp / f"src-{name}", model, wf, info=info), name=name)
    registry.promote(name)
    return registry


def _click(sid: str, item: str, ts: int, n: int = 0) -> ClickEvent:
    return ClickEvent(event_id=f"{sid}-{item}-{ts}-{n}", session_id=sid, item_id=item, ts=ts)


def _served(ts: int, version: str | None, *items: str, fallback: str | None = None
            ) -> ServedRecord:
    return ServedRecord(ts, version, fallback, len(items), tuple(items))


# --------------------------------------------------------------------------- real stack

# session -> (answers served, clicks in order); scored with k = 3.
SCENARIO: dict[str, tuple[list[ServedRecord], list[tuple[str, int]]]] = {
    "a": ([_served(T0, "v1", "i1", "i2", "i3", "i4")], [("i2", T0 + 1000)]),  # rank 2
    "b": ([_served(T0, "v1", "i5", "i6", "i7")], [("i9", T0 + 1000)]),  # miss
    "c": ([_served(T0, "v1", "i1", "i2"), _served(T0 + 5000, "v1", "i8", "i9", "i10")],
          [("i10", T0 + 6000)]),  # rank 3 of the newer answer
    "d": ([_served(T0, "v2", "i3", "i4")], [("i3", T0 + 1000)]),  # rank 1, another version
    "e": ([_served(T0, None, "i11", "i12", "i13", fallback="no_model")],
          [("i13", T0 + 1000)]),  # a fallback answer, rank 3
    "f": ([_served(T0, "v1", "i1", "i2")], [("i1", T0 + 1000), ("i2", T0 + 2000)]),  # 2nd: not next
    "g": ([], [("brand-new", T0 + 1000)]),  # nothing served; an out-of-vocabulary item
    "h": ([_served(T0 + 9000, "v1", "i1")], [("i1", T0 + 1000)]),  # served after the click
    "i": ([_served(T0, "v1", "i4", "i5", "i6", "i7")], [("i7", T0 + 1000)]),  # rank 4 > k
}


@pytest.fixture
def kafka(stack: LocalStack, topic: str) -> KafkaSettings:
    return stack.kafka.model_copy(update={"events_topic": topic, "partitions": 3})


def _produce(kafka: KafkaSettings, events: list[ClickEvent]) -> None:
    producer = make_producer(kafka)
    for ev in events:
        producer.produce(kafka.events_topic, encode_event(ev), key=ev.session_id.encode())
    assert producer.flush(30) == 0
    producer.close()


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Running:
    """A monitor worker on a thread, for one test."""

    def __init__(self, kafka: KafkaSettings, stack: LocalStack, registry: ModelRegistry,
                 **settings: Any):
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        redis_settings = stack.redis.model_copy(update={"key_prefix": self.prefix})
        self.settings = MonitorSettings(**{"group": f"mon-{uuid.uuid4().hex[:8]}",
                                           "from_beginning": True, "poll_timeout_s": 0.1,
                                           **settings})
        self.worker, self.metrics = monitor_worker(kafka, redis_settings, self.settings,
                                                   str(registry.root))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def clicks(self) -> float:
        return sum(self.value("streamrec_drift_clicks_total", outcome=o) or 0.0
                   for o in ("scored", "no_answer", "not_next"))

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_online_hr_and_ndcg_per_model_version_match_hand_computed_values(
    stack: LocalStack, kafka: KafkaSettings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    registry = _publish_champion(tmp_path)
    with Running(kafka, stack, registry, k=3) as mon:
        recorder = ServedRecorder(redis_client, mon.prefix)
        recorder.record((sid, rec) for sid, (recs, _) in SCENARIO.items() for rec in recs)
        clicks = [_click(sid, item, ts, n) for sid, (_, cs) in SCENARIO.items()
                  for n, (item, ts) in enumerate(cs)]
        _produce(kafka, clicks)
        _wait(lambda: mon.clicks() == len(clicks))

        def quality(version: str, answer: str) -> tuple[float | None, ...]:
            return tuple(mon.value(f"streamrec_drift_online_{m}", model_version=version,
                                   answer=answer) for m in ("hr", "ndcg", "scored_total"))

        # v1: a (rank 2), b (miss), c (rank 3), f (rank 1), i (rank 4 > k = 3).
        hr, ndcg, n = quality("v1", "model")
        assert n == 5 and hr == pytest.approx(3 / 5)
        assert ndcg == pytest.approx((1 / math.log2(3) + 0.5 + 1.0) / 5)
        assert quality("v2", "model") == (1.0, 1.0, 1.0)
        assert quality("none", "fallback") == (1.0, 0.5, 1.0)
        assert mon.value("streamrec_drift_online_hits_total", model_version="v1",
                         answer="model") == 3
        assert mon.value("streamrec_drift_clicks_total", outcome="not_next") == 1  # f's 2nd
        assert mon.value("streamrec_drift_clicks_total", outcome="no_answer") == 2  # g, h
        # One of the 10 clicked items is outside v1's training vocabulary.
        assert mon.value("streamrec_drift_oov_rate", model_version="v1") == pytest.approx(0.1)
        assert mon.value("streamrec_drift_champion_info", model_version="v1") == 1
        assert mon.value("streamrec_drift_online_k") == 3


def _alarms(pubsub: redis.client.PubSub, wait_s: float) -> list[DriftAlarm]:
    out, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg and msg["type"] == "message":
            out.append(DriftAlarm.from_json(msg["data"]))
    return out


def test_planted_drift_raises_alarms_on_redis_and_a_stationary_stream_does_not(
    stack: LocalStack, kafka: KafkaSettings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    registry = _publish_champion(tmp_path)
    channel = f"test:drift:{uuid.uuid4().hex[:8]}"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    counts = _train_counts()
    items, probs = list(counts), np.array(list(counts.values()), dtype=float)
    rng = np.random.default_rng(0)

    def clicks(chosen: list[str], start: int) -> list[ClickEvent]:
        return [_click(f"s{(start + n) % 97}", item, T0 + start + n)
                for n, item in enumerate(chosen)]

    settings = {"alarm_channel": channel, "item_window": 400, "item_min_samples": 300}
    with Running(kafka, stack, registry, **settings) as mon:
        stationary = clicks([str(i) for i in rng.choice(items, 600, p=probs / probs.sum())], 0)
        _produce(kafka, stationary)
        _wait(lambda: mon.clicks() == 600)
        assert _alarms(pubsub, 0.5) == []
        psi = mon.value("streamrec_drift_item_psi", model_version="v1")
        assert psi is not None and psi < 0.1

        # The tail became the head: the item distribution moved, the vocabulary did not.
        tail = clicks([str(i) for i in rng.choice(items[30:], 400)], 1000)
        _produce(kafka, tail)
        _wait(lambda: mon.clicks() == 1000)
        got = {a.detector: a for a in _alarms(pubsub, 1.0)}
        assert set(got) == {"item_psi", "item_js"}
        assert got["item_psi"].model_version == "v1" and got["item_psi"].samples == 400
        assert got["item_psi"].statistic > 0.25 and got["item_psi"].threshold == 0.25

        # Clicks on items the champion never saw: the OOV rate alarm.
        _produce(kafka, clicks([f"new-{n % 40}" for n in range(200)], 2000))
        _wait(lambda: mon.clicks() == 1200)
        assert "oov_rate" in {a.detector for a in _alarms(pubsub, 1.0)}
        assert mon.value("streamrec_drift_oov_rate", model_version="v1") == 0.5
        assert mon.value("streamrec_drift_alarm_active", detector="oov_rate",
                         model_version="v1") == 1
    pubsub.close()


# --------------------------------------------------------------------------- the step alone


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _monitor(clock: FakeClock, reference: Reference | None = None, **kw: Any) -> OnlineMonitor:
    mon = OnlineMonitor(MonitorSettings(**kw), MonitorMetrics(), clock=clock)
    if reference is not None:
        mon.set_reference(reference)
    return mon


def test_page_hinkley_alarm_when_one_versions_hit_rate_falls() -> None:
    mon = _monitor(FakeClock(), Reference("v1", None, None), k=1, ph_min_samples=50)
    rng = np.random.default_rng(0)
    alarms: list[tuple[int, DriftAlarm]] = []
    for n in range(1200):  # v1: HR 0.6 for 400 clicks, then 0.05; v2: HR 0.6 throughout
        for version, p in (("v1", 0.6 if n < 400 else 0.05), ("v2", 0.6)):
            sid = f"{version}-{n}"
            item = "i1" if rng.random() < p else "i9"
            served = {sid: [_served(T0, version, "i1", "i2")]}
            alarms += [(n, a) for a in mon.observe([_click(sid, item, T0 + 10)], served)]
    assert len(alarms) == 1, alarms
    at, alarm = alarms[0]
    assert alarm.detector == "online_hr_page_hinkley" and alarm.model_version == "v1"
    assert 400 < at < 550 and alarm.statistic > alarm.threshold == 40.0
    active = mon.metrics.registry.get_sample_value(
        "streamrec_drift_alarm_active", {"detector": "online_hr_page_hinkley",
                                         "model_version": "v1"})
    assert active == 1


def test_an_alarm_that_holds_is_published_again_only_after_alarm_repeat_s() -> None:
    from model.drift import ItemReference

    clock = FakeClock()
    ref = Reference("v1", ItemReference.from_counts(["i1", "i2"], [1, 1], 2), None)
    mon = _monitor(clock, ref, item_window=100, item_min_samples=100, alarm_repeat_s=60)
    alarms = [a for n in range(150) for a in mon.observe([_click("s", f"new{n}", T0 + n)], {})]
    assert [(a.detector, a.samples, a.statistic) for a in alarms] == [("oov_rate", 100, 1.0)]
    clock.now += 61
    alarms = mon.observe([_click("s", "new", T0 + 200)], {})
    assert [(a.detector, a.ts_ms) for a in alarms] == [("oov_rate", int(clock.now * 1000))]
    for n in range(100):  # back to known items: the alarm no longer holds
        assert mon.observe([_click("s", f"i{1 + n % 2}", T0 + 300 + n)], {}) == []
    active = mon.metrics.registry.get_sample_value(
        "streamrec_drift_alarm_active", {"detector": "oov_rate", "model_version": "v1"})
    assert active == 0


def test_session_length_shift_alarm_against_the_training_lengths() -> None:
    lengths = length_counts(np.random.default_rng(0).geometric(1 / 2.0, 5000).tolist())
    mon = _monitor(FakeClock(), Reference("v1", None, lengths), session_gap_s=1.0,
                   length_window=100, length_min_samples=100)
    alarms, ts = [], T0
    for s in range(101):  # sessions of 8 events each, one after the other
        for _ in range(8):
            ts += 10
            alarms += mon.observe([_click(f"s{s}", "i1", ts)], {})
        ts += 5_000  # the gap: the next event finishes this session
    names = [a.detector for a in alarms]
    assert names == ["session_length_ks"]
    assert alarms[0].statistic > 0.9 and alarms[0].samples == 100


def test_without_training_lengths_the_first_sessions_are_the_reference() -> None:
    mon = _monitor(FakeClock(), Reference("v1", None, None), session_gap_s=1.0,
                   length_reference_size=50, length_window=50, length_min_samples=50)
    alarms, ts = [], T0
    for s in range(160):  # 50 sessions of 2 events become the reference, then 4 events
        for _ in range(2 if s < 60 else 4):
            ts += 10
            alarms += mon.observe([_click(f"s{s}", "i1", ts)], {})
        ts += 5_000
    assert [a.detector for a in alarms] == ["session_length_ks"]
    v = mon.metrics.registry.get_sample_value("streamrec_drift_session_length_mean_shift",
                                              {"model_version": "v1"})
    assert v == pytest.approx(2.0)


def test_event_types_filter_and_load_reference(tmp_path: Path) -> None:
    registry = _publish_champion(tmp_path, info={"session_lengths": [0, 3, 1]})
    ref = load_reference(registry, "v1", n_bins=4)
    assert ref.lengths == [0, 3, 1] and ref.items is not None
    assert ref.items.expected.sum() == sum(_train_counts().values())
    assert ref.items.bin_of["i0"] == 0 and ref.items.n_bins == 4
    mon = _monitor(FakeClock(), ref, event_types="purchase")
    view = msgspec.structs.replace(_click("a", "zz", T0), event_type="view")
    mon.observe([view, _click("a", "zz", T0 + 1)], {})  # neither is a purchase
    assert mon.metrics.registry.get_sample_value("streamrec_drift_oov_rate",
                                                 {"model_version": "v1"}) is None


def test_monitor_command_has_help() -> None:
    from streamrec.cli import cli

    out = CliRunner().invoke(cli, ["monitor", "--help"])
    assert out.exit_code == 0, out.output
    assert "--metrics-port" in out.output and "drift" in out.output
