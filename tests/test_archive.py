"""The event archive: ArchiveHandler (buffering, flushing, offsets), the Parquet
layout and schema, read_window / list_hours, and the archiver consumer group
against the real broker with both Kafka clients, including a crash between
rename and commit."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.archive import ArchiveHandler, archive_schema, list_hours, read_window
from ingest.kafka import Record, make_admin, make_consumer, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.replay import send_events
from ingest.settings import KafkaSettings
from ingest.simulator import Simulator, SimulatorConfig
from ingest.worker import TransientError, Worker, WorkerOptions

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HOUR = 3_600_000
TOPIC = "events"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec(
    offset: int, eid: str | None = None, ts: int = T0, partition: int = 0, **extra: Any
) -> Record:
    ev = {
        "event_id": eid or f"e{partition}-{offset}",
        "session_id": "s1",
        "item_id": "i1",
        "ts": ts,
    }
    ev.update(extra)
    return Record(TOPIC, partition, offset, b"s1", msgspec.json.encode(ev))


def bad(offset: int, partition: int = 0) -> Record:
    return Record(TOPIC, partition, offset, b"s1", b"{not json")


def part_files(root: Path) -> list[Path]:
    return sorted(root.glob("date=*/hour=*/part-*.parquet"))


def raw_rows(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in part_files(root)])


# ---------------------------------------------------------------------- unit: handler


def test_buffered_events_return_no_offsets_and_write_nothing(tmp_path: Path) -> None:
    h = ArchiveHandler(tmp_path, max_buffer_events=10, clock=FakeClock())
    assert h.handle([rec(0), rec(1)]) == {}
    assert h.tick() == {}
    assert list(tmp_path.iterdir()) == []


def test_size_flush_writes_one_file_per_event_hour_and_returns_next_offsets(tmp_path: Path) -> None:
    h = ArchiveHandler(tmp_path, max_buffer_events=4, clock=FakeClock())
    assert h.handle([rec(5, ts=T0 + 10), rec(6, ts=T0 + HOUR + 5)]) == {}
    out = h.handle([rec(7, ts=T0 + 25 * HOUR), rec(3, partition=1, ts=T0 + 20)])
    assert out == {(TOPIC, 0): 8, (TOPIC, 1): 4}
    dirs = sorted(str(f.parent.relative_to(tmp_path)) for f in part_files(tmp_path))
    assert dirs == ["date=2024-01-01/hour=00", "date=2024-01-01/hour=01", "date=2024-01-02/hour=01"]
    first = pq.read_table(part_files(tmp_path)[0])
    assert first.schema.equals(archive_schema(), check_metadata=False)
    assert sorted(zip(first["partition"].to_pylist(), first["offset"].to_pylist(), strict=True)) == [
        (0, 5), (1, 3)]  # fmt: skip
    assert (
        pq.ParquetFile(part_files(tmp_path)[0]).metadata.row_group(0).column(0).compression
        == "ZSTD"
    )
    assert h.handle([]) == {} and h.tick() == {}  # nothing left to commit


def test_age_flush_is_checked_in_tick_and_handle(tmp_path: Path) -> None:
    clock = FakeClock()
    h = ArchiveHandler(tmp_path, max_buffer_age_s=60, clock=clock)
    assert h.handle([rec(0)]) == {}
    clock.now += 59.9
    assert h.tick() == {}
    clock.now += 0.1
    assert h.tick() == {(TOPIC, 0): 1}
    assert len(part_files(tmp_path)) == 1
    # The age counts from the oldest buffered event, and handle checks it too.
    assert h.handle([rec(1)]) == {}
    clock.now += 61
    assert h.handle([rec(2)]) == {(TOPIC, 0): 3}
    assert len(part_files(tmp_path)) == 2


def test_invalid_records_are_skipped_but_their_offsets_count(tmp_path: Path) -> None:
    h = ArchiveHandler(tmp_path, max_buffer_events=2, clock=FakeClock())
    # Nothing buffered on partition 1: its invalid records are committable at once.
    assert h.handle([bad(0, partition=1), bad(1, partition=1)]) == {(TOPIC, 1): 2}
    wrong_key = Record(TOPIC, 0, 1, b"other", rec(1).value)
    assert h.handle([rec(0), wrong_key, bad(2, partition=1)]) == {(TOPIC, 1): 3}
    assert h.handle([bad(2), rec(3), Record(TOPIC, 0, 4, b"s1", None)]) == {(TOPIC, 0): 5}
    assert sorted(raw_rows(tmp_path)["offset"].to_pylist()) == [0, 3]


def test_declared_features_are_typed_and_the_rest_goes_to_extra(tmp_path: Path) -> None:
    features = {"category": "string", "price": "float64", "qty": "int64"}
    h = ArchiveHandler(tmp_path, features=features, max_buffer_events=4, clock=FakeClock())
    h.handle([
        rec(0, "a", category="c1", price=9.5, qty=2, user_id="u1"),
        rec(1, "b", price=3, qty=2.5, color="red"),
        rec(2, "c", category=7, price="cheap"),
        rec(3, "d"),
    ])  # fmt: skip
    rows = {r["event_id"]: r for r in read_window(tmp_path, T0, T0 + 1).to_pylist()}
    assert [rows["a"][k] for k in ("category", "price", "qty", "extra", "user_id")] == [
        "c1", 9.5, 2, None, "u1"]  # fmt: skip
    assert rows["b"]["price"] == 3.0 and rows["b"]["qty"] is None and rows["b"]["category"] is None
    assert json.loads(rows["b"]["extra"]) == {"color": "red", "qty": 2.5}
    assert rows["c"]["category"] is None and rows["c"]["price"] is None
    assert json.loads(rows["c"]["extra"]) == {"category": 7, "price": "cheap"}
    assert rows["d"]["extra"] is None and rows["d"]["event_type"] == "click"
    schema = pq.read_schema(part_files(tmp_path)[0])
    assert schema.field("qty").type == pa.int64() and schema.field("partition").type == pa.int32()


def test_feature_names_that_clash_with_archive_columns_are_refused(tmp_path: Path) -> None:
    for name in ("offset", "extra", "ts"):
        with pytest.raises(ValueError, match="clashes"):
            ArchiveHandler(tmp_path, features={name: "int64"})
    with pytest.raises(ValueError, match="use one of"):
        ArchiveHandler(tmp_path, features={"price": "decimal"})  # type: ignore[dict-item]


def test_revoke_flushes_and_returns_the_revoked_partitions_then_the_rest(tmp_path: Path) -> None:
    h = ArchiveHandler(tmp_path, clock=FakeClock())
    h.handle([rec(0), rec(4, partition=1)])
    assert h.revoke([(TOPIC, 1)]) == {(TOPIC, 1): 5}
    assert len(raw_rows(tmp_path)) == 2  # everything was flushed
    assert h.tick() == {(TOPIC, 0): 1}  # the kept partition's offset follows at once
    assert h.revoke([(TOPIC, 0)]) == {}


def test_unwritable_root_raises_transient_error_and_a_retry_writes_each_event_once(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the archive directory should be")
    root = blocker / "archive"
    h = ArchiveHandler(root, max_buffer_events=2, clock=FakeClock())
    batch = [rec(0), rec(1)]
    with pytest.raises(TransientError, match="archive write"):
        h.handle(batch)
    with pytest.raises(TransientError):
        h.handle(batch)  # the worker retries the same batch
    blocker.unlink()  # storage is back
    assert h.handle(batch) == {(TOPIC, 0): 2}
    assert sorted(raw_rows(root)["offset"].to_pylist()) == [0, 1]


def test_fsspec_url_root_round_trips() -> None:
    root = f"memory://test-archive-{uuid.uuid4().hex}"
    h = ArchiveHandler(root, max_buffer_events=2)
    assert h.handle([rec(0, ts=T0 + 5), rec(1, ts=T0 + 2 * HOUR)]) == {(TOPIC, 0): 2}
    assert read_window(root, T0, T0 + 3 * HOUR)["offset"].to_pylist() == [0, 1]
    assert list_hours(root) == [datetime(2024, 1, 1, h, tzinfo=UTC) for h in (0, 2)]


# ---------------------------------------------------------------------- unit: reader


def test_reader_ignores_temporary_files(tmp_path: Path) -> None:
    ArchiveHandler(tmp_path, max_buffer_events=1).handle([rec(0, "kept")])
    hour_dir = part_files(tmp_path)[0].parent
    other = raw_rows(tmp_path).set_column(0, "event_id", pa.array(["tmp"]))
    for hidden in (".part-x.parquet.tmp", ".part-w.parquet", "_part-v.parquet"):
        pq.write_table(other, hour_dir / hidden)  # valid Parquet, but not a final name
    (hour_dir / ".part-y.parquet.tmp").write_bytes(b"half-written")
    (tmp_path / "date=2024-01-02" / "hour=00").mkdir(parents=True)
    (tmp_path / "date=2024-01-02" / "hour=00" / ".part-z.parquet.tmp").write_bytes(b"x")
    assert read_window(tmp_path, 0, 2 * T0)["event_id"].to_pylist() == ["kept"]
    assert list_hours(tmp_path) == [datetime(2024, 1, 1, 0, tzinfo=UTC)]


def test_read_window_includes_start_excludes_end_and_sorts(tmp_path: Path) -> None:
    start, end = T0 + HOUR, T0 + 3 * HOUR
    tss = [start - 1, end, start, end - 1, start + HOUR, start]
    h = ArchiveHandler(tmp_path, max_buffer_events=len(tss))
    h.handle([rec(i, f"e{i}", ts=ts) for i, ts in enumerate(tss)])
    got = read_window(tmp_path, start, end, columns=["ts", "event_id"]).to_pylist()
    assert got == [{"ts": start, "event_id": "e2"}, {"ts": start, "event_id": "e5"},
                   {"ts": start + HOUR, "event_id": "e4"}, {"ts": end - 1, "event_id": "e3"}]  # fmt: skip
    assert read_window(tmp_path, end, end + 1)["event_id"].to_pylist() == ["e1"]


def test_read_window_opens_only_the_hours_that_overlap_it(tmp_path: Path) -> None:
    ArchiveHandler(tmp_path, max_buffer_events=1).handle([rec(0, "in-hour-0")])
    for hour_dir in ("date=2024-01-01/hour=05", "date=2024-01-03/hour=00"):
        (tmp_path / hour_dir).mkdir(parents=True)
        (tmp_path / hour_dir / "part-corrupt.parquet").write_bytes(b"not parquet")
    assert read_window(tmp_path, T0, T0 + 5 * HOUR)["event_id"].to_pylist() == ["in-hour-0"]
    with pytest.raises(pa.ArrowInvalid):  # proof that a file in an overlapping hour is read
        read_window(tmp_path, T0, T0 + 5 * HOUR + 1)


def test_read_window_dedups_keeping_the_smallest_partition_offset(tmp_path: Path) -> None:
    h = ArchiveHandler(tmp_path, max_buffer_events=1)
    for r in (rec(9, "dup", partition=1), rec(7, "dup", partition=0), rec(3, "dup", partition=1),
              rec(8, "other")):  # fmt: skip
        h.handle([r])
    assert len(raw_rows(tmp_path)) == 4
    t = read_window(tmp_path, T0, T0 + 1)
    assert t.select(["event_id", "partition", "offset"]).to_pylist() == [
        {"event_id": "dup", "partition": 0, "offset": 7},
        {"event_id": "other", "partition": 0, "offset": 8},
    ]


def test_empty_window_gives_an_empty_table_with_the_schema(tmp_path: Path) -> None:
    assert read_window(tmp_path / "missing", T0, T0 + HOUR).schema.equals(
        archive_schema(), check_metadata=False
    )
    ArchiveHandler(tmp_path, max_buffer_events=1).handle([rec(0)])
    t = read_window(tmp_path, T0 + HOUR, T0 + 2 * HOUR, columns=["item_id", "ts"])
    assert t.num_rows == 0 and t.schema.names == ["item_id", "ts"]
    assert read_window(tmp_path, T0, T0 + 1, columns=["ts"]).num_rows == 1
    with pytest.raises(ValueError, match="unknown archive column"):
        read_window(tmp_path, T0, T0 + 1, columns=["nope"])


# ---------------------------------------------------------------------- integration

N_EVENTS = 3000


class SimulatedCrash(RuntimeError):
    pass


class CrashAfterRename(ArchiveHandler):
    """Dies after its ``crash_at``-th flush is renamed, before anything is committed."""

    crash_at = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flushes = 0
        self.dead = False

    def flush(self) -> int:
        n = super().flush()
        self.flushes += bool(n)
        if self.flushes == self.crash_at:
            self.dead = True
            raise SimulatedCrash("process died between rename and commit")
        return n

    def revoke(self, partitions: Any) -> Any:
        return {} if self.dead else super().revoke(partitions)  # a dead process commits nothing


def produce_stream(settings: KafkaSettings, topic: str, n_dups: int) -> tuple[list[dict], int]:
    """Valid events (with ``n_dups`` re-sent) and a few malformed messages; returns
    (distinct valid events, messages produced). The last messages of every
    partition are fresh events, so the archive holding all of them means every
    earlier message was consumed."""
    admin = make_admin(settings)
    admin.create_topics([topic], 3, 1)
    admin.close()
    events = list(
        Simulator(
            SimulatorConfig(n_events=N_EVENTS, duration_hours=None, sessions_per_hour=300)
        ).events()
    )
    half = N_EVENTS // 2
    producer = make_producer(settings)
    n = send_events(events[:half] + events[:n_dups], producer, topic, progress=False)
    malformed = [(b"s1", b"{not json"), (b"s2", b'{"event_id": "x"}'),
                 (b"s3", b'{"event_id":"y","session_id":"s3","item_id":"i","ts":1700000000}'),
                 (b"wrong", msgspec.json.encode(events[0] | {"event_id": "z"}))]  # fmt: skip
    for key, value in malformed:
        producer.produce(topic, value, key=key)
    n += len(malformed) + send_events(events[half:], producer, topic, progress=False)
    producer.close()
    return events, n


def run_worker(worker: Worker) -> threading.Thread:
    def target() -> None:
        with contextlib.suppress(SimulatedCrash):  # the crash test's worker dies on purpose
            worker.run()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def committed_total(settings: KafkaSettings, group: str, topic: str) -> int:
    c = make_consumer(settings, group)
    try:
        return sum(o or 0 for o in c.committed([(topic, p) for p in range(3)]).values())
    finally:
        c.close()


def archive_ids(root: Path) -> set[str]:
    return set(read_window(root, 0, 2**62, columns=["event_id"])["event_id"].to_pylist())


def check_archive(root: Path, events: list[dict]) -> None:
    got = read_window(root, events[0]["ts"], events[-1]["ts"] + 1)
    assert got.num_rows == len(events)
    assert set(got["event_id"].to_pylist()) == {e["event_id"] for e in events}
    cols = ["session_id", "item_id", "ts", "event_type", "user_id", "category", "price"]
    by_id = {r["event_id"]: r for r in got.to_pylist()}
    for e in events:
        row = by_id[e["event_id"]]
        assert {c: row[c] for c in cols} == {c: e.get(c) for c in cols}
        assert row["extra"] is None
    assert got["ts"].to_pylist() == sorted(got["ts"].to_pylist())


def test_archiver_group_archives_every_valid_event(
    kafka_settings: KafkaSettings, topic: str, tmp_path: Path
) -> None:
    events, n_sent = produce_stream(kafka_settings, topic, n_dups=30)
    group = f"streamrec-archiver-{uuid.uuid4().hex[:8]}"
    metrics = ConsumerMetrics("archive")
    handler = ArchiveHandler(tmp_path, max_buffer_events=1000)  # the rest flushes on stop
    worker = Worker(make_consumer(kafka_settings, group), [topic], handler, metrics,
                    WorkerOptions(poll_timeout_s=0.2))  # fmt: skip
    thread = run_worker(worker)

    def consumed() -> float:
        sample = "streamrec_ingest_events_consumed_total"
        return metrics.registry.get_sample_value(sample, {"role": "archive"}) or 0

    wait_for(lambda: consumed() >= n_sent, 30, "the worker to consume every message")
    worker.stop()
    thread.join(15)
    assert not thread.is_alive()
    check_archive(tmp_path, events)
    assert len(raw_rows(tmp_path)) == N_EVENTS + 30  # re-sent events are archived, then deduped
    assert committed_total(kafka_settings, group, topic) == n_sent
    assert len(list_hours(tmp_path)) > 1  # the stream spans several event hours
    assert len(part_files(tmp_path)) > len(list_hours(tmp_path))  # several flushes per hour


def test_crash_between_rename_and_commit_duplicates_but_never_loses(
    kafka_settings: KafkaSettings, topic: str, tmp_path: Path
) -> None:
    events, n_sent = produce_stream(kafka_settings, topic, n_dups=0)
    group = f"streamrec-archiver-{uuid.uuid4().hex[:8]}"
    options = WorkerOptions(poll_timeout_s=0.2)
    crashing = CrashAfterRename(tmp_path, max_buffer_events=500)
    first = Worker(make_consumer(kafka_settings, group), [topic], crashing,
                   ConsumerMetrics("archive"), options)  # fmt: skip
    run_worker(first).join(30)
    assert crashing.dead
    after_crash = committed_total(kafka_settings, group, topic)
    assert 0 < after_crash < n_sent

    handler = ArchiveHandler(tmp_path, max_buffer_events=1000, max_buffer_age_s=0.3)
    second = Worker(make_consumer(kafka_settings, group), [topic], handler,
                    ConsumerMetrics("archive"), options)  # fmt: skip
    thread = run_worker(second)
    want = {e["event_id"] for e in events}
    wait_for(lambda: archive_ids(tmp_path) == want, 30, "the restarted group to archive the rest")
    second.stop()
    thread.join(15)
    check_archive(tmp_path, events)
    raw = raw_rows(tmp_path)
    assert len(raw) > N_EVENTS  # the crashed flush was written twice ...
    assert len(set(raw["event_id"].to_pylist())) == N_EVENTS  # ... and nothing is missing
    assert committed_total(kafka_settings, group, topic) == n_sent
