"""send_events (encoding, keys, pacing with a fake clock) and the real-log readers."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.replay import (
    DATASETS,
    read_movielens_100k,
    read_yoochoose,
    send_events,
    write_parquet,
)

Event = dict[str, Any]
DATA_DIR = Path(
    os.environ.get("STREAMREC_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
ML_DIR = DATA_DIR / "ml-100k"
YC_DIR = DATA_DIR / "yoochoose-100k"
YC_FULL = YC_DIR / "yoochoose-clicks-100k_train_full.txt"

needs_ml = pytest.mark.skipif(
    not (ML_DIR / "ml-100k.inter").exists(),
    reason=f"MovieLens-100k not found at {ML_DIR} (set STREAMREC_DATA_DIR to the shared data folder)",
)
needs_yc = pytest.mark.skipif(
    not YC_FULL.exists(),
    reason=f"YOOCHOOSE 100k sample not found at {YC_DIR} (set STREAMREC_DATA_DIR to the shared data folder)",
)


class FakeTime:
    """A clock that only moves when the sender sleeps (or a produce call costs time)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingProducer:
    """In-memory producer with the ingest.kafka.Producer interface."""

    def __init__(self, clock: FakeTime | None = None, cost_s: float = 0.0, undelivered: int = 0):
        self.sent: list[tuple[str, bytes | None, bytes, float | None]] = []
        self.flushed = False
        self._clock, self._cost, self._undelivered = clock, cost_s, undelivered

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.sent.append((topic, key, value, self._clock.now if self._clock else None))
        if self._clock:
            self._clock.now += self._cost

    def flush(self, timeout: float = 30.0) -> int:
        self.flushed = True
        return self._undelivered


def make_events(offsets_ms: list[int]) -> list[Event]:
    base = 1_700_000_000_000
    return [
        {
            "event_id": f"e{n}",
            "session_id": f"s{n % 2}",
            "item_id": f"i{n}",
            "ts": base + o,
            "price": 1.5,
        }
        for n, o in enumerate(offsets_ms)
    ]


# ---------------------------------------------------------------------- send_events
def test_send_encodes_json_keyed_by_session_and_flushes() -> None:
    events = make_events([0, 5, 9])
    p = RecordingProducer()
    assert send_events(iter(events), p, "streamrec.events", progress=False) == 3
    assert p.flushed
    assert [(t, k) for t, k, _, _ in p.sent] == [
        ("streamrec.events", b"s0"),
        ("streamrec.events", b"s1"),
        ("streamrec.events", b"s0"),
    ]
    assert [msgspec.json.decode(v) for _, _, v, _ in p.sent] == events


def test_as_fast_as_possible_never_sleeps() -> None:
    t = FakeTime()
    send_events(
        make_events([0, 60_000, 120_000]),
        RecordingProducer(),
        "t",
        progress=False,
        clock=t.clock,
        sleep=t.sleep,
    )
    assert t.sleeps == []


def test_speedup_paces_by_event_time() -> None:
    t = FakeTime()
    p = RecordingProducer(clock=t)
    offsets = [0, 1000, 1000, 5000, 20_000]
    send_events(
        make_events(offsets), p, "t", speedup=10, progress=False, clock=t.clock, sleep=t.sleep
    )
    assert sum(t.sleeps) == pytest.approx(20.0 / 10)
    sent_at = [s[3] - 100.0 for s in p.sent]
    assert sent_at == pytest.approx([o / 1000 / 10 for o in offsets])


def test_pacing_does_not_drift_when_producing_takes_time() -> None:
    t = FakeTime()
    p = RecordingProducer(clock=t, cost_s=0.03)  # each produce call costs 30 ms
    offsets = list(range(0, 10_000, 1000))
    send_events(
        make_events(offsets), p, "t", speedup=10, progress=False, clock=t.clock, sleep=t.sleep
    )
    # due every 100 ms from the first event; the 30 ms cost is absorbed, not added
    assert [s[3] - 100.0 for s in p.sent] == pytest.approx([o / 10_000 for o in offsets])
    assert sum(t.sleeps) == pytest.approx(0.9 - 9 * 0.03)


def test_live_timestamps_rewrite_ts_and_keep_ids() -> None:
    events = make_events([0, 1000])
    p = RecordingProducer()
    walls = iter([1_800_000_000.5, 1_800_000_001.25])
    send_events(
        events, p, "t", live_timestamps=True, progress=False, wall_clock=lambda: next(walls)
    )
    got = [msgspec.json.decode(v) for _, _, v, _ in p.sent]
    assert [g["ts"] for g in got] == [1_800_000_000_500, 1_800_000_001_250]
    assert [g["event_id"] for g in got] == ["e0", "e1"]
    assert events[0]["ts"] == 1_700_000_000_000  # the caller's dicts are not mutated


def test_undelivered_messages_raise() -> None:
    with pytest.raises(RuntimeError, match="2 of 3 messages"):
        send_events(make_events([0, 1, 2]), RecordingProducer(undelivered=2), "t", progress=False)


@pytest.mark.parametrize("speedup", [0, -1.0, float("inf")])
def test_bad_speedup_is_rejected(speedup: float) -> None:
    with pytest.raises(ValueError, match="speedup"):
        send_events([], RecordingProducer(), "t", speedup=speedup, progress=False)


# ---------------------------------------------------------------------- MovieLens-100k
@pytest.fixture(scope="module")
def ml_events() -> list[Event]:
    return list(read_movielens_100k(ML_DIR))


@needs_ml
def test_movielens_count_order_and_ids(ml_events: list[Event]) -> None:
    with (ML_DIR / "ml-100k.inter").open() as f:
        rows = sum(1 for _ in f) - 1
    assert len(ml_events) == rows == 100_000
    ts = [e["ts"] for e in ml_events]
    assert ts == sorted(ts)
    assert len({e["event_id"] for e in ml_events}) == rows
    assert [e["event_id"] for e in read_movielens_100k(DATA_DIR, limit=500)] == [
        e["event_id"] for e in ml_events[:500]
    ]  # deterministic, and `limit` is a prefix of the full replay; parent dir accepted


@needs_ml
def test_movielens_fields_and_side_features(ml_events: list[Event]) -> None:
    row = next(e for e in ml_events if e["user_id"] == "196" and e["item_id"] == "242")
    assert row == {
        "event_id": "ml100k-196-242",
        "session_id": "196",
        "item_id": "242",
        "ts": 881_250_949_000,
        "event_type": "click",
        "user_id": "196",
        "rating": 3.0,
        "category": "Comedy",
        "year": 1996,
    }  # Kolya (1996)
    toy_story = next(e for e in ml_events if e["item_id"] == "1")
    assert (toy_story["category"], toy_story["year"]) == ("Animation", 1995)
    assert all(type(e["ts"]) is int and type(e["rating"]) is float for e in ml_events)
    unknown_year = next(e for e in ml_events if e["item_id"] == "267")
    assert "year" not in unknown_year


@needs_ml
def test_movielens_ties_keep_file_order(ml_events: list[Event]) -> None:
    file_pos = {}
    with (ML_DIR / "ml-100k.inter").open() as f:
        next(f)
        for n, line in enumerate(f):
            u, i, *_ = line.split("\t")
            file_pos[f"ml100k-{u}-{i}"] = n
    pos = [file_pos[e["event_id"]] for e in ml_events]
    ties = [
        (a, b)
        for (ea, a), (eb, b) in itertools.pairwise(zip(ml_events, pos, strict=True))
        if ea["ts"] == eb["ts"]
    ]
    assert ties and all(a < b for a, b in ties)


# ---------------------------------------------------------------------- YOOCHOOSE
@needs_yc
def test_yoochoose_file_count_order_and_ids() -> None:
    events = list(read_yoochoose(YC_FULL))
    with YC_FULL.open() as f:
        assert len(events) == sum(1 for _ in f) - 1
    ts = np.array([e["ts"] for e in events])
    assert np.all(np.diff(ts) >= 0)
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    assert any(i.endswith("-1") and i.count("-") == 4 for i in ids)  # the one exact duplicate row
    first = events[int(np.argmin(ts))]
    assert set(first) == {"event_id", "session_id", "item_id", "ts", "event_type"}
    assert first["event_type"] == "click" and type(first["ts"]) is int


@needs_yc
def test_yoochoose_same_click_has_same_id_in_every_split() -> None:
    tr = {e["event_id"] for e in read_yoochoose(YC_DIR / "yoochoose-clicks-100k_train_tr.txt")}
    full = {e["event_id"] for e in read_yoochoose(YC_FULL)}
    assert len(tr) > 50_000 and len(tr & full) / len(tr) > 0.99
    events = list(read_yoochoose(DATA_DIR))  # folder: train_full + test
    assert len(events) == 70_278 + 13_568
    assert [e["event_id"] for e in read_yoochoose(YC_DIR, limit=1000)] == [
        e["event_id"] for e in events[:1000]
    ]


def test_missing_data_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ml-100k\.inter"):
        read_movielens_100k(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_full"):
        read_yoochoose(tmp_path)
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="SessionId"):
        read_yoochoose(bad)


def test_datasets_registry_names_the_readers() -> None:
    assert DATASETS["ml-100k"] is read_movielens_100k
    assert DATASETS["yoochoose"] is read_yoochoose


@needs_ml
def test_replayed_events_write_to_parquet_with_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "ml.parquet"
    n = write_parquet(
        read_movielens_100k(ML_DIR, limit=2500),
        path,
        progress=False,
        row_group_size=1000,
        extra_columns={"rating": pa.float64(), "year": pa.int64()},
    )
    table = pq.read_table(path)
    assert n == table.num_rows == 2500 and pq.ParquetFile(path).num_row_groups == 3
    assert table.column("price").null_count == 2500  # absent side feature -> null
    first = next(read_movielens_100k(ML_DIR, limit=1))
    assert table.slice(0, 1).to_pylist()[0] == {**first, "price": None}
