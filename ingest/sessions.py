"""The session updater: Kafka events -> Redis session store, rejects -> dead-letter topic.

:class:`SessionsHandler` is the batch step run by :class:`ingest.worker.Worker`
(``streamrec ingest sessions``). For every polled batch, in this order:

1. decode + validate every record (the event contract, ``ingest.events``);
2. apply the valid events to Redis (``ingest.store``; idempotent);
3. send every rejected record to the dead-letter topic and flush the producer;
4. return the offsets after the batch, which the worker then commits.

A crash anywhere before 4 re-delivers the batch: step 2 is then a no-op for
what was applied, and a dead-letter record may be sent twice (its key is the
source ``topic:partition:offset``, so DLQ readers can drop repeats). Redis or
broker unavailability surfaces as :class:`TransientError` and the worker
retries the same batch; nothing is committed until it succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis

from ingest.events import EventValidator, Rejection
from ingest.failpoints import failpoint
from ingest.kafka import DeliveryError, Producer, Record, TopicPartition
from ingest.metrics import ConsumerMetrics
from ingest.store import Positioned, SessionStore
from ingest.worker import Offsets, TransientError, next_offsets

log = logging.getLogger(__name__)

# Errors that mean "Redis is not reachable right now", not "this batch is bad".
_REDIS_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
)


def dead_letter_headers(record: Record, rejection: Rejection) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record (docs/events.md, "Dead-letter topic").

    >>> from ingest.events import RejectReason
    >>> h = dead_letter_headers(Record("t", 2, 9, b"k", b"x"),
    ...                         Rejection(RejectReason.INVALID_JSON, "not JSON"))
    >>> dict(h)["streamrec.reason"], dict(h)["streamrec.source.offset"]
    (b'invalid_json', b'9')
    """
    return [
        ("streamrec.reason", rejection.reason.value.encode()),
        ("streamrec.detail", rejection.detail.encode("utf-8", "replace")),
        ("streamrec.source.topic", record.topic.encode()),
        ("streamrec.source.partition", str(record.partition).encode()),
        ("streamrec.source.offset", str(record.offset).encode()),
    ]


class SessionsHandler:
    """One batch of records -> Redis sessions + popularity, and the DLQ."""

    def __init__(
        self,
        store: SessionStore,
        dlq: Callable[[], Producer],
        dlq_topic: str,
        metrics: ConsumerMetrics,
        validator: EventValidator | None = None,
    ) -> None:
        self.store = store
        self._new_producer = dlq
        self.dlq = dlq()
        self.dlq_topic = dlq_topic
        self.metrics = metrics
        self.validator = validator or EventValidator()

    def handle(self, records: list[Record]) -> Offsets:
        t_start = time.perf_counter()
        stage = self.metrics.stage_seconds

        # 1. decode + validate
        t0 = time.perf_counter()
        events, rejected = self.validator.decode_batch(
            [r.value if r.value is not None else b"" for r in records], [r.key for r in records]
        )
        bad = {i for i, _ in rejected}
        good_records = [r for i, r in enumerate(records) if i not in bad] if bad else records
        batch = [
            Positioned(ev, r.partition, r.offset)
            for ev, r in zip(events, good_records, strict=True)
        ]
        stage.labels("decode").observe(time.perf_counter() - t0)

        # 2. Redis (idempotent)
        t0 = time.perf_counter()
        try:
            result = self.store.apply(batch) if batch else None
        except _REDIS_TRANSIENT as e:
            raise TransientError(f"redis unavailable: {e}") from e
        stage.labels("redis").observe(time.perf_counter() - t0)
        failpoint("applied")

        # 3. dead-letter topic, flushed before anything is committed
        if rejected:
            t0 = time.perf_counter()
            try:
                for i, rejection in rejected:
                    r = records[i]
                    self.dlq.produce(
                        self.dlq_topic,
                        r.value if r.value is not None else b"",
                        key=f"{r.topic}:{r.partition}:{r.offset}".encode(),
                        headers=dead_letter_headers(r, rejection),
                    )
                if self.dlq.flush(30.0) != 0:
                    raise DeliveryError("dead-letter records not delivered within 30 s")
            except Exception as e:
                # Whatever went wrong (broker down, a producer fenced or left in a
                # fatal state), start again with a fresh producer: the retried
                # batch sends its dead letters again.
                self._replace_producer()
                raise TransientError(f"dead-letter topic unavailable: {e!r}") from e
            stage.labels("dlq").observe(time.perf_counter() - t0)

        # Metrics only once the batch is durable (a retried batch counts once).
        m = self.metrics
        if result is not None:
            m.applied.labels(m.role).inc(result.applied)
            m.duplicates.labels("event_id").inc(result.duplicates)
            m.duplicates.labels("replayed_offset").inc(result.replayed + result.stale)
        for _, rejection in rejected:
            m.dead_lettered.labels(rejection.reason.value).inc()
        m.batch_seconds.labels(m.role).observe(time.perf_counter() - t_start)
        return next_offsets(records)

    def _replace_producer(self) -> None:
        old, self.dlq = self.dlq, self._new_producer()
        try:
            old.close(timeout=0)
        except Exception as e:  # undeliverable by now: those records are sent again
            log.debug("closing the failed dead-letter producer: %r", e)

    def close(self) -> None:
        self.dlq.close()

    def tick(self) -> Offsets:
        return {}  # nothing is buffered between batches

    def revoke(self, partitions: Sequence[TopicPartition]) -> Offsets:
        return {}  # every handled batch is already durable and committed
