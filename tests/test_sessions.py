"""The session updater against a real broker and a real Redis.

Every test compares Redis with ``reference_state``, a plain-Python reading of
the contract, and the dead-letter topic with the malformed messages sent.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from ingest_helpers import (
    NOW_MS,
    create_topic,
    dirty_stream,
    fresh_store,
    produce,
    produce_in_background,
    read_all,
    store_matches,
    wait_until_matches,
)

from ingest.archive import read_window
from ingest.kafka import make_consumer, make_producer
from ingest.metrics import ConsumerMetrics, serve
from ingest.redis_conn import make_redis
from ingest.sessions import SessionsHandler
from ingest.settings import KafkaSettings, RedisSettings
from ingest.store import SessionStore, StoreConfig, reference_state
from ingest.worker import Worker, WorkerOptions
from streamrec.cluster import LocalRedisCluster
from streamrec.settings import StackSettings
from streamrec.stack import LocalStack

EXTERNAL = bool(os.environ.get("STREAMREC_REDIS_URL") or os.environ.get("STREAMREC_KAFKA_BOOTSTRAP"))


@pytest.fixture(params=["redis", "redis-cluster"])
def backend(request: pytest.FixtureRequest, stack: LocalStack) -> tuple[object, RedisSettings]:
    """A Redis client and its settings: one server, or the 3-node cluster."""
    if request.param == "redis":
        settings = stack.redis
    else:
        settings = request.getfixturevalue("redis_cluster").redis_settings(stack.redis)
    client = make_redis(settings)
    yield client, settings
    client.close()


def _worker(settings: KafkaSettings, store: SessionStore, topic: str, group: str,
            dlq_topic: str, metrics: ConsumerMetrics | None = None) -> Worker:
    metrics = metrics or ConsumerMetrics("sessions")
    handler = SessionsHandler(store, lambda: make_producer(settings), dlq_topic, metrics)
    return Worker(
        make_consumer(settings, group), [topic], handler, metrics,
        WorkerOptions(batch_size=500, poll_timeout_s=0.2, retry_max_s=1.0, lag_interval_s=0.5),
    )


def _start(worker: Worker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def _topics(settings: KafkaSettings) -> tuple[str, str]:
    topic, dlq = f"ev.{uuid.uuid4().hex[:10]}", f"dlq.{uuid.uuid4().hex[:10]}"
    create_topic(settings, topic, 3)
    create_topic(settings, dlq, 1)
    return topic, dlq


def test_dirty_stream_lands_exactly_and_rejects_reach_the_dlq(
    kafka_settings: KafkaSettings, backend: tuple[object, RedisSettings]
) -> None:
    stream = dirty_stream(20_000, seed=1)
    assert sum(stream.rejected.values()) > 200 and len(stream.valid) > 20_000  # dups present
    topic, dlq = _topics(kafka_settings)
    produce(kafka_settings, topic, stream.messages)

    store = fresh_store(backend[0], max_session_len=20)
    metrics = ConsumerMetrics("sessions")
    worker = _worker(kafka_settings, store, topic, f"g-{uuid.uuid4().hex[:6]}", dlq, metrics)
    thread = _start(worker)
    why = wait_until_matches(store, stream)
    time.sleep(1.0)  # one more lag update
    exported = {  # per-partition gauges, read while the partitions are still held
        p: (metrics.registry.get_sample_value("streamrec_ingest_committed_offset", lb),
            metrics.registry.get_sample_value("streamrec_ingest_consumer_lag", lb))
        for p in range(3) for lb in [{"topic": topic, "partition": str(p)}]
    }
    worker.stop()
    thread.join(30)
    assert why == "ok"
    assert not thread.is_alive()
    assert all(committed > 0 and lag is not None for committed, lag in exported.values()), exported

    # Every malformed message is in the DLQ, original bytes, with its reason and source.
    n_bad = sum(stream.rejected.values())
    dead = read_all(kafka_settings, dlq, n_bad)
    assert len(dead) >= n_bad
    unique = {h["streamrec.source.offset"] + h["streamrec.source.partition"]: (r, h)
              for r in dead for h in [dict(r.headers)]}
    assert len(unique) == n_bad
    assert Counter(h["streamrec.reason"].decode() for _, h in unique.values()) == stream.rejected
    assert sorted(r.value for r, _ in unique.values()) == sorted(stream.rejected_values)
    assert all(h["streamrec.source.topic"] == topic.encode() for _, h in unique.values())

    # The metrics add up: every record counted, duplicates seen, rejects by reason.
    reg = metrics.registry
    assert reg.get_sample_value("streamrec_ingest_events_consumed_total", {"role": "sessions"}) == len(stream.messages)
    applied = reg.get_sample_value("streamrec_ingest_events_applied_total", {"role": "sessions"})
    dups = reg.get_sample_value("streamrec_ingest_events_duplicate_total", {"kind": "event_id"})
    assert applied + dups == len(stream.valid) and dups > 0
    for reason, count in stream.rejected.items():
        assert reg.get_sample_value("streamrec_ingest_events_dead_lettered_total", {"reason": reason}) == count
    assert reg.get_sample_value("streamrec_ingest_stage_seconds_count", {"stage": "redis"}) > 0

    # ... and are served to Prometheus over HTTP.
    server, _ = serve(reg, 0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
    assert f'streamrec_ingest_events_consumed_total{{role="sessions"}} {float(len(stream.messages))}' in text
    assert 'streamrec_ingest_events_dead_lettered_total{reason="invalid_json"}' in text


def test_replaying_the_whole_topic_changes_nothing(
    kafka_settings: KafkaSettings, backend: tuple[object, RedisSettings]
) -> None:
    stream = dirty_stream(3_000, seed=2)
    topic, dlq = _topics(kafka_settings)
    produce(kafka_settings, topic, stream.messages)
    store = fresh_store(backend[0])
    for _ in range(2):  # a second group reads everything again: at-least-once delivery
        worker = _worker(kafka_settings, store, topic, f"g-{uuid.uuid4().hex[:6]}", dlq)
        thread = _start(worker)
        assert wait_until_matches(store, stream) == "ok"
        time.sleep(1.0)  # let it run past the point of matching: still exact
        worker.stop()
        thread.join(30)
        assert store_matches(store, stream) == (True, "ok")


def test_two_workers_share_partitions_through_a_rebalance(
    kafka_settings: KafkaSettings, backend: tuple[object, RedisSettings]
) -> None:
    stream = dirty_stream(12_000, seed=3)
    topic, dlq = _topics(kafka_settings)
    store = fresh_store(backend[0])
    group = f"g-{uuid.uuid4().hex[:6]}"
    producer = produce_in_background(kafka_settings, topic, stream.messages, per_second=2_000)
    a = _worker(kafka_settings, store, topic, group, dlq)
    ta = _start(a)
    time.sleep(2.0)
    b = _worker(kafka_settings, store, topic, group, dlq)  # joins: partitions move
    tb = _start(b)
    time.sleep(2.5)
    a.stop()  # leaves mid-stream: its partitions move to b
    ta.join(30)
    producer.join()
    why = wait_until_matches(store, stream)
    b.stop()
    tb.join(30)
    assert why == "ok"
    assert a.metrics.rebalances.labels("revoke")._value.get() >= 1


@pytest.mark.skipif(EXTERNAL, reason="stops Redis: only with the embedded stack")
def test_redis_outage_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with LocalStack(StackSettings(), KafkaSettings(), RedisSettings(), state_dir=tmp_path) as stack:
        settings = stack.kafka
        stream = dirty_stream(8_000, seed=4)
        topic, dlq = _topics(settings)
        client = make_redis(stack.redis)
        store = fresh_store(client)
        metrics = ConsumerMetrics("sessions")
        worker = _worker(settings, store, topic, f"g-{uuid.uuid4().hex[:6]}", dlq, metrics)
        thread = _start(worker)
        producer = produce_in_background(settings, topic, stream.messages, per_second=2_000)
        time.sleep(1.5)
        stack.redis_server.kill()  # Redis gone for a few seconds mid-stream
        time.sleep(3.0)
        stack.restart("redis", crash=False)
        producer.join()
        why = wait_until_matches(store, stream)
        worker.stop()
        thread.join(30)
        assert why == "ok"
        assert metrics.retries._value.get() > 0  # it did back off and retry


@pytest.mark.skipif(EXTERNAL, reason="stops Redis nodes: only with the embedded stack")
def test_cluster_node_outage_mid_stream_loses_and_duplicates_nothing(
    stack: LocalStack, tmp_path: Path
) -> None:
    settings = stack.kafka
    with LocalRedisCluster(tmp_path, StackSettings(redis_appendfsync="always")) as cluster:
        stream = dirty_stream(8_000, seed=6)
        topic, dlq = _topics(settings)
        store = fresh_store(make_redis(cluster.redis_settings(stack.redis)))
        metrics = ConsumerMetrics("sessions")
        worker = _worker(settings, store, topic, f"g-{uuid.uuid4().hex[:6]}", dlq, metrics)
        thread = _start(worker)
        producer = produce_in_background(settings, topic, stream.messages, per_second=2_000)
        time.sleep(1.5)
        cluster.kill(1)  # a third of the slots unavailable for a few seconds
        time.sleep(3.0)
        cluster.restart(1)
        producer.join()
        why = wait_until_matches(store, stream)
        worker.stop()
        thread.join(30)
        assert why == "ok"
        assert metrics.retries._value.get() > 0


def _ingest_process(role: str, stack: LocalStack, redis_settings: RedisSettings, topic: str,
                    dlq: str, prefix: str, group: str, client: str, archive_root: Path,
                    failpoint: str | None = None) -> subprocess.Popen[bytes]:
    """``streamrec ingest <role>`` as a real process, pointed at this test's topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(stack.env())
    env.update({
        "STREAMREC_REDIS_URL": redis_settings.url,
        "STREAMREC_REDIS_CLUSTER": "true" if redis_settings.cluster else "false",
        "STREAMREC_KAFKA_EVENTS_TOPIC": topic, "STREAMREC_KAFKA_DLQ_TOPIC": dlq,
        "STREAMREC_KAFKA_CLIENT": client, "STREAMREC_REDIS_KEY_PREFIX": prefix,
        "STREAMREC_INGEST_SESSIONS_GROUP": group, "STREAMREC_INGEST_ARCHIVE_GROUP": group + "-a",
        "STREAMREC_INGEST_BATCH_SIZE": "300", "STREAMREC_INGEST_ARCHIVE_ROOT": str(archive_root),
        "STREAMREC_INGEST_ARCHIVE_MAX_EVENTS": "700", "STREAMREC_INGEST_ARCHIVE_MAX_AGE_S": "1",
        "STREAMREC_INGEST_SESSIONS_METRICS_PORT": "0", "STREAMREC_INGEST_ARCHIVE_METRICS_PORT": "0",
        "STREAMREC_LOG_LEVEL": "WARNING",
    })
    if failpoint:
        env["STREAMREC_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "streamrec.cli", "ingest", role], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _archive_matches(root: Path, stream) -> str:
    table = read_window(root, 0, 2**62, columns=["event_id"])
    got = table.column("event_id").to_pylist()
    want = {ev.event_id for ev in stream.valid}
    if len(got) != len(set(got)):
        return "duplicates after dedup"
    return "ok" if set(got) == want else f"{len(want - set(got))} missing, {len(set(got) - want)} extra"


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_kill_9_at_random_points_loses_and_duplicates_nothing(
    stack: LocalStack, backend: tuple[object, RedisSettings], client: str, tmp_path: Path
) -> None:
    """Both ingest workers, crashed again and again, end exactly where one clean run would."""
    settings = stack.kafka.model_copy(update={"client": client})
    stream = dirty_stream(15_000, seed=5)
    topic, dlq = _topics(settings)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = SessionStore(backend[0], StoreConfig(prefix=prefix))
    group = f"g-{uuid.uuid4().hex[:6]}"
    root = tmp_path / "archive"
    roles = ("sessions", "archive") if not backend[1].cluster else ("sessions",)

    def start(role: str, failpoint: str | None = None) -> subprocess.Popen[bytes]:
        return _ingest_process(role, stack, backend[1], topic, dlq, prefix, group, client, root,
                               failpoint)

    rng = random.Random(5)
    producer = produce_in_background(settings, topic, stream.messages, per_second=2_500)
    # First a crash at every step of the commit sequence (the process kills
    # itself with SIGKILL there), then kills from outside at random moments.
    for point in ("polled", "applied", "handled", "committed"):
        procs = [start(role, f"{point}:{rng.randint(2, 6)}") for role in roles
                 if not (role == "archive" and point == "applied")]
        for proc in procs:
            assert proc.wait(90) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    kills = 0
    while producer.is_alive() or kills < 3:
        procs = [start(role) for role in roles]
        time.sleep(rng.uniform(2.0, 4.0))  # group join ~1-3 s, then some batches
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += 1
    producer.join()
    finals = [start(role) for role in roles]
    try:
        why = wait_until_matches(store, stream, timeout=120)
        archived = "not run"
        if "archive" in roles:
            deadline = time.monotonic() + 60
            while (archived := _archive_matches(root, stream)) != "ok" and time.monotonic() < deadline:
                time.sleep(0.5)
    finally:
        for proc in finals:
            proc.send_signal(signal.SIGTERM)  # graceful: finish the batch, commit, leave
        for proc in finals:
            assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
    assert kills >= 3
    assert why == "ok"
    assert archived in ("ok", "not run")


def _renamed(stream, tag: str):
    """The same stream with every session id prefixed (a disjoint set of sessions)."""
    valid = [msgspec.structs.replace(ev, session_id=f"{tag}{ev.session_id}") for ev in stream.valid]
    messages = []
    for key, value in stream.messages:
        try:
            obj = msgspec.json.decode(value)
        except msgspec.DecodeError:
            messages.append((key, value))
            continue
        if isinstance(obj, dict) and isinstance(obj.get("session_id"), str):
            obj["session_id"] = f"{tag}{obj['session_id']}"
            if key == obj["session_id"][len(tag):].encode():
                key = obj["session_id"].encode()
            value = msgspec.json.encode(obj)
        messages.append((key, value))
    return type(stream)(messages=messages, valid=valid, rejected=stream.rejected,
                        rejected_values=stream.rejected_values)


@pytest.mark.skipif(EXTERNAL, reason="restarts the broker: only with the embedded stack")
def test_worker_reconnects_after_a_broker_restart(tmp_path: Path) -> None:
    with LocalStack(StackSettings(), KafkaSettings(), RedisSettings(), state_dir=tmp_path) as stack:
        settings = stack.kafka
        before = _renamed(dirty_stream(3_000, seed=7), "a-")
        after = _renamed(dirty_stream(3_000, seed=8), "b-")
        topic, dlq = _topics(settings)
        store = fresh_store(make_redis(stack.redis))
        worker = _worker(settings, store, topic, f"g-{uuid.uuid4().hex[:6]}", dlq)
        thread = _start(worker)
        produce(settings, topic, before.messages)
        assert wait_until_matches(store, before) == "ok"

        stack.restart("kafka", crash=True)  # memory broker: topics and offsets gone
        create_topic(settings, topic, 3)
        create_topic(settings, dlq, 1)
        # The new log numbers offsets from 0 again and the consumer may resume at
        # its old positions: refill each partition up to them with the same
        # records (duplicates: no-ops for the store), then send the new ones.
        produce(settings, topic, before.messages)
        produce(settings, topic, after.messages)

        # The same worker object reconnects and applies the new events. (Only the
        # sessions are compared: the restarted broker numbers offsets from 0 again,
        # which real Kafka never does, and popularity's offset watermark would
        # rightly hold back records at offsets it has already counted.)
        deadline = time.monotonic() + 90
        expected, _ = reference_state(after.valid, store.config, NOW_MS)
        while time.monotonic() < deadline and store.sessions(expected) != expected:
            time.sleep(0.5)
        worker.stop()
        thread.join(30)
        assert store.sessions(expected) == expected


def test_pipelined_handler_returns_offsets_only_once_a_batch_is_durable(
    stack: LocalStack, redis_client
) -> None:
    """handle(n) hands back batch n-1's offsets; tick/revoke wait for the one in flight."""
    from ingest.kafka import Record

    stream = dirty_stream(400, seed=9, dup_rate=0, bad_rate=0)
    records = [Record("ev", 0, i, k, v) for i, (k, v) in enumerate(stream.messages)]
    store = fresh_store(redis_client)
    handler = SessionsHandler(store, lambda: make_producer(stack.kafka), "dlq", ConsumerMetrics("s"))
    try:
        assert handler.handle(records[:200]) == {}  # in flight, not durable yet: nothing to commit
        assert handler.handle(records[200:]) == {("ev", 0): 200}  # the first batch, now durable
        assert handler.tick() == {("ev", 0): 400}
        assert handler.tick() == {}
        assert store_matches(store, stream) == (True, "ok")
    finally:
        handler.close()
