"""Both Kafka client implementations against the same real broker."""

from __future__ import annotations

import time
import uuid

import pytest

from ingest.kafka import Record, make_admin, make_consumer, make_producer
from ingest.settings import KafkaSettings


def _consume(consumer, n: int, timeout: float = 30.0) -> list[Record]:
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(consumer.poll(max_records=500, timeout=0.5))
    return out


def _create(settings: KafkaSettings, topic: str, partitions: int = 3) -> None:
    admin = make_admin(settings)
    try:
        admin.create_topics([topic], partitions, 1)
        admin.create_topics([topic], partitions, 1)  # idempotent: no error the second time
        assert topic in admin.list_topics()
    finally:
        admin.close()


def test_round_trip_through_consumer_group(kafka_settings: KafkaSettings, topic: str) -> None:
    _create(kafka_settings, topic)
    producer = make_producer(kafka_settings)
    sent = {f"k{i % 7}".encode(): [] for i in range(7)}
    for i in range(300):
        key = f"k{i % 7}".encode()
        value = f"v{i}".encode()
        sent[key].append(value)
        producer.produce(topic, value, key=key, headers=[("h", b"x")])
    assert producer.flush(30) == 0
    producer.close()

    group = f"g-{uuid.uuid4().hex[:8]}"
    assigned: list[tuple[str, int]] = []
    consumer = make_consumer(kafka_settings, group)
    consumer.subscribe([topic], on_assign=assigned.extend)
    records = _consume(consumer, 300)
    assert len(records) == 300
    assert sorted(assigned) == [(topic, p) for p in range(3)]
    # Same key -> same partition, in produce order.
    got: dict[bytes, list[bytes]] = {}
    for r in records:
        assert r.topic == topic and r.headers == (("h", b"x"),)
        got.setdefault(r.key, []).append(r.value)
    assert got == sent
    parts = {r.key: set() for r in records}
    for r in records:
        parts[r.key].add(r.partition)
    assert all(len(p) == 1 for p in parts.values())

    # Commit the next offset to read per partition, as Kafka defines it.
    nxt: dict[tuple[str, int], int] = {}
    for r in records:
        nxt[(r.topic, r.partition)] = max(nxt.get((r.topic, r.partition), 0), r.offset + 1)
    consumer.commit(nxt)
    assert consumer.committed(nxt) == nxt
    consumer.close()

    # A new member of the same group resumes after the commit: nothing to read.
    again = make_consumer(kafka_settings, group)
    again.subscribe([topic])
    assert _consume(again, 1, timeout=6) == []
    again.close()


def test_uncommitted_records_are_redelivered_to_the_group(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    _create(kafka_settings, topic, partitions=1)
    producer = make_producer(kafka_settings)
    for i in range(20):
        producer.produce(topic, f"{i}".encode())
    assert producer.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"

    first = make_consumer(kafka_settings, group)
    first.subscribe([topic])
    records = _consume(first, 20)
    assert len(records) == 20
    first.commit({(topic, 0): records[9].offset + 1})  # processed only the first ten
    first.close()

    second = make_consumer(kafka_settings, group)
    second.subscribe([topic])
    redelivered = _consume(second, 10)
    assert [r.value for r in redelivered] == [f"{i}".encode() for i in range(10, 20)]
    second.close()


def test_consumer_reports_watermarks_and_assignment(
    kafka_settings: KafkaSettings, topic: str
) -> None:
    _create(kafka_settings, topic, partitions=1)
    producer = make_producer(kafka_settings)
    for i in range(5):
        producer.produce(topic, f"{i}".encode())
    assert producer.flush(30) == 0
    consumer = make_consumer(kafka_settings, f"g-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    assert len(_consume(consumer, 5)) == 5
    assert consumer.assignment() == {(topic, 0)}
    low, high = consumer.watermarks((topic, 0))
    # The embedded broker reports high = last batch's base offset + 1, so only
    # bounds are asserted (see docs/local-stack.md).
    assert low == 0 and 1 <= high <= 5
    consumer.close()


def test_missing_bootstrap_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="STREAMREC_KAFKA_BOOTSTRAP"):
        make_producer(KafkaSettings(bootstrap=None))
