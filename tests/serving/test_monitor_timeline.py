"""The drift timeline in Redis: points from the running monitor, markers, cap, failures."""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import redis
import torch

from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from ingest.events import ClickEvent, encode_event
from ingest.kafka import Record, make_producer
from model.checkpoint import save_checkpoint
from model.drift import ItemReference
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry
from serving.monitor import (
    MonitorHandler,
    MonitorMetrics,
    OnlineMonitor,
    Reference,
    monitor_worker,
    read_timeline,
    timeline_key,
)
from serving.monitor_settings import MonitorSettings
from serving.online import ServedRecord, ServedRecorder
from streamrec.stack import LocalStack

T0 = (time.time_ns() // 1_000_000) - 3_600_000  # an hour ago: valid event times
VOCAB = [f"i{n}" for n in range(20)]


def _champion(tmp: Path) -> ModelRegistry:
    """A registry whose champion v1 was trained on items i0..i19."""
    rows = [{"session_id": f"s{n % 7}", "ts": T0 + n, "item_id": VOCAB[n % len(VOCAB)]}
            for n in range(200)]
    schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                             transform={"op": "categorify"})])
    wf = Workflow(schema, max_len=4).fit(pa.Table.from_pylist(rows))
    torch.manual_seed(0)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "sasrec", "d_model": 8, "n_heads": 1, "n_layers": 1, "max_len": 4}}))
    registry = ModelRegistry(tmp / "models")
    registry.publish(save_checkpoint(tmp / "src", model, wf), name="v1")
    registry.promote("v1")
    return registry


def _click(sid: str, item: str, ts: int) -> ClickEvent:
    return ClickEvent(event_id=f"{sid}-{item}-{ts}", session_id=sid, item_id=item, ts=ts)


def _served(version: str | None, *items: str, fallback: str | None = None) -> ServedRecord:
    return ServedRecord(T0, version, fallback, len(items), tuple(items))


def _wait(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return got


def _points(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["kind"] == "point"]


def test_the_running_monitor_writes_points_and_markers_to_the_timeline(
    stack: LocalStack, topic: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    registry = _champion(tmp_path)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    kafka = stack.kafka.model_copy(update={"events_topic": topic, "partitions": 1})
    settings = MonitorSettings(group=f"mon-{uuid.uuid4().hex[:8]}", from_beginning=True,
                               poll_timeout_s=0.1, k=3, item_window=40, item_min_samples=40,
                               timeline_interval_s=0.2)
    worker, metrics = monitor_worker(kafka, stack.redis.model_copy(update={"key_prefix": prefix}),
                                     settings, str(registry.root))
    # Served before the clicks: a hit at rank 2, a miss, a hit at rank 1, a fallback hit.
    ServedRecorder(redis_client, prefix).record([
        ("a", _served("v1", "i1", "i2", "i3")), ("b", _served("v1", "i4", "i5")),
        ("c", _served("v1", "i6", "i7")), ("d", _served(None, "i8", fallback="no_model"))])
    clicks = [_click("a", "i2", T0 + 1000), _click("b", "i9", T0 + 1000),
              _click("c", "i6", T0 + 1000), _click("d", "i8", T0 + 1000)]
    clicks += [_click(f"n{n}", f"new-{n}", T0 + 2000 + n) for n in range(36)]  # OOV: 36 / 40
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        producer = make_producer(kafka)
        for ev in clicks:
            producer.produce(topic, encode_event(ev), key=ev.session_id.encode())
        assert producer.flush(30) == 0
        producer.close()

        def settled() -> list[dict[str, Any]]:
            entries = read_timeline(redis_client, prefix)
            points = _points(entries)
            return entries if points and points[-1]["alarms"] else []

        _wait(settled)
        time.sleep(0.5)  # a few more points while idle (the worker's ticks)
    finally:
        worker.stop()
        thread.join(30)
    entries = read_timeline(redis_client, prefix)

    assert entries[0] == {"kind": "champion", "ts": entries[0]["ts"], "model_version": "v1",
                          "previous": None}
    alarms = [e for e in entries if e["kind"] == "alarm"]
    assert [a["alarm"]["detector"] for a in alarms] == ["oov_rate"]
    assert alarms[0]["model_version"] == "v1"
    assert alarms[0]["alarm"] == {"detector": "oov_rate", "statistic": 0.9, "threshold": 0.2,
                                  "model_version": "v1", "samples": 40}
    last = _points(entries)[-1]
    # v1's model answers: a (rank 2), b (miss), c (rank 1); k = 3.
    assert last["model_version"] == "v1" and last["k"] == 3
    assert last["hr"] == pytest.approx(2 / 3) and last["window"] == 3
    assert last["ndcg"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert (last["scored"], last["hits"]) == (3, 2)  # fallback answers are not counted here
    assert last["oov_rate"] == pytest.approx(0.9)
    assert last["psi"] is not None and last["js"] is not None
    assert last["session_length_ks"] is None  # no session has finished
    assert last["alarms"] == [{"detector": "oov_rate", "model_version": "v1"}]
    versions = {(v["model_version"], v["answer"]): v for v in last["versions"]}
    assert versions[("none", "fallback")] == {"model_version": "none", "answer": "fallback",
                                              "hr": 1.0, "ndcg": 1.0, "window": 1,
                                              "scored": 1, "hits": 1}
    assert versions[("v1", "model")]["scored"] == 3
    # At most one point per interval, oldest first.
    stamps = [p["ts"] for p in _points(entries)]
    assert len(stamps) >= 3
    assert all(b - a >= 0.2 - 0.002 for a, b in itertools.pairwise(stamps))
    assert [e["ts"] for e in entries] == sorted(e["ts"] for e in entries)
    assert metrics.registry.get_sample_value("streamrec_drift_timeline_points_total",
                                             {"kind": "alarm"}) == 1
    # ``since`` is exclusive.
    middle = stamps[len(stamps) // 2]
    later = read_timeline(redis_client, prefix, since=middle)
    assert later == [e for e in entries if e["ts"] > middle]


class Clocks:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_700_000_000.0

    def tick(self, s: float) -> None:
        self.mono += s
        self.wall += s


def _handler(client: redis.Redis, clocks: Clocks, **kw: Any) -> tuple[MonitorHandler, str]:
    settings = MonitorSettings(**{"timeline_interval_s": 5.0, **kw})
    monitor = OnlineMonitor(settings, MonitorMetrics(), clock=lambda: clocks.wall)
    monitor.set_reference(Reference("v1", ItemReference.from_counts(VOCAB, [1] * 20, 4), None))
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return MonitorHandler(monitor, client, prefix, None, clock=lambda: clocks.mono,
                          wall_clock=lambda: clocks.wall), prefix


def _records(events: list[ClickEvent]) -> list[Record]:
    return [Record("events", 0, n, ev.session_id.encode(), encode_event(ev))
            for n, ev in enumerate(events)]


def test_points_at_most_once_per_interval_capped_and_read_since(
    redis_client: redis.Redis,
) -> None:
    clocks = Clocks()
    handler, prefix = _handler(redis_client, clocks, timeline_max_points=5, metric_window=2, k=2)
    ServedRecorder(redis_client, prefix).record(
        (f"s{n}", _served("v1", "i1", "i2")) for n in range(3))
    handler.handle(_records([_click("s0", "i1", T0 + 1), _click("s1", "i3", T0 + 1)]))
    handler.tick()  # the same instant: no second point
    clocks.tick(4.9)
    handler.tick()  # still inside the interval
    assert len(read_timeline(redis_client, prefix)) == 1
    clocks.tick(0.1)
    handler.handle(_records([_click("s2", "i2", T0 + 1)]))
    first, second = read_timeline(redis_client, prefix)
    assert second["ts"] - first["ts"] == pytest.approx(5.0)
    # The window holds the last 2 scored clicks; the counts hold all 3.
    assert (first["hr"], first["window"], first["scored"], first["hits"]) == (0.5, 2, 2, 1)
    assert (second["hr"], second["window"], second["scored"], second["hits"]) == (0.5, 2, 3, 2)
    assert second["ndcg"] == pytest.approx(0.5 / math.log2(3))

    for _ in range(10):
        clocks.tick(5.0)
        handler.tick()
    entries = read_timeline(redis_client, prefix)
    assert len(entries) == 5 == redis_client.zcard(timeline_key(prefix))
    assert entries[-1]["ts"] == pytest.approx(clocks.wall)  # the newest are kept
    assert read_timeline(redis_client, prefix, since=entries[2]["ts"]) == entries[3:]
    assert read_timeline(redis_client, prefix, limit=2) == entries[-2:]
    assert read_timeline(redis_client, prefix, since=clocks.wall) == []


def test_a_failed_timeline_write_is_counted_and_the_monitor_goes_on(
    redis_client: redis.Redis,
) -> None:
    clocks = Clocks()
    handler, prefix = _handler(redis_client, clocks, item_window=10, item_min_samples=10)
    key = timeline_key(prefix)
    redis_client.set(key, "not a sorted set")  # every write now fails with WRONGTYPE
    metrics = handler.monitor.metrics
    offsets = handler.handle(_records([_click("s", f"new{n}", T0 + n) for n in range(10)]))
    assert offsets == {("events", 0): 10}  # the batch is still committed
    assert metrics.registry.get_sample_value("streamrec_drift_timeline_write_failures_total") == 1
    assert metrics.registry.get_sample_value("streamrec_drift_alarms_total",
                                             {"detector": "oov_rate", "model_version": "v1"}) == 1
    redis_client.delete(key)
    clocks.tick(1.0)
    handler.tick()  # the alarm marker is retried; no point is due yet
    entries = read_timeline(redis_client, prefix)
    assert [(e["kind"], e["alarm"]["detector"]) for e in entries] == [("alarm", "oov_rate")]
    assert entries[0]["ts"] == pytest.approx(clocks.wall - 1.0)  # when it was raised
    clocks.tick(5.0)
    handler.tick()
    assert [e["kind"] for e in read_timeline(redis_client, prefix)] == ["alarm", "point"]
    assert metrics.registry.get_sample_value("streamrec_drift_timeline_write_failures_total") == 1


def test_timeline_interval_zero_writes_nothing(redis_client: redis.Redis) -> None:
    clocks = Clocks()
    handler, prefix = _handler(redis_client, clocks, timeline_interval_s=0, item_window=10,
                               item_min_samples=10)
    handler.handle(_records([_click("s", f"new{n}", T0 + n) for n in range(10)]))
    clocks.tick(10)
    handler.tick()
    assert not redis_client.exists(timeline_key(prefix))
