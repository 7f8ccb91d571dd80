"""The session updater: Kafka events -> Redis session store, rejects -> dead-letter topic.

:class:`SessionsHandler` is the batch step run by :class:`ingest.worker.Worker`
(``streamrec ingest sessions``). For every polled batch, in this order:

1. decode + validate every record (the event contract, ``ingest.events``);
2. apply the valid events to Redis (``ingest.store``; idempotent);
3. send every rejected record to the dead-letter topic and flush the producer;
4. return the offsets after the batch, which the worker then commits.

A crash anywhere before 4 re-delivers the batch: step 2 is then a no-op for
what was applied, and a dead-letter record may be sent twice (its
``streamrec.source.*`` headers identify the source record, so DLQ readers can
drop repeats). Redis or
broker unavailability surfaces as :class:`TransientError` and the batch is
retried; nothing is committed until it succeeds. Steps 2-3 of one batch run
on a background thread while step 1 of the next runs on the worker's
(see :class:`SessionsHandler`): Redis and Python then work at the same time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import redis

from ingest.events import EventValidator, Rejection
from ingest.failpoints import failpoint
from ingest.kafka import DeliveryError, Producer, Record, TopicPartition
from ingest.metrics import DUPLICATE_EVENT_ID, DUPLICATE_REPLAYED_OFFSET, ConsumerMetrics
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


@dataclass
class _Prepared:
    """A decoded batch, ready for the I/O step."""

    records: list[Record]
    batch: list[Positioned]
    rejected: list[tuple[int, Rejection]]
    offsets: Offsets
    t_start: float


class SessionsHandler:
    """One batch of records -> Redis sessions + popularity, and the DLQ.

    With ``pipelined=True`` (the default) the I/O of a batch (Redis, DLQ) runs
    on a background thread while the worker polls and decodes the next one:
    :meth:`handle` then returns the offsets of the *previous* batch, once its
    effects are durable, and :meth:`tick` / :meth:`revoke` wait for the batch
    in flight. At most one batch is in flight, so the offsets committed never
    run ahead of what is in Redis. A failed batch is retried (synchronously)
    before anything newer is sent.
    """

    def __init__(
        self,
        store: SessionStore,
        dlq: Callable[[], Producer],
        dlq_topic: str,
        metrics: ConsumerMetrics,
        validator: EventValidator | None = None,
        *,
        pipelined: bool = True,
    ) -> None:
        self.store = store
        self._new_producer = dlq
        self.dlq = dlq()
        self.dlq_topic = dlq_topic
        self.metrics = metrics
        self.validator = validator or EventValidator()
        self._pool = ThreadPoolExecutor(1, "sessions-io") if pipelined else None
        self._inflight: tuple[_Prepared, Future[Offsets]] | None = None
        self._failed: _Prepared | None = None  # a batch whose I/O failed: retried first

    # ------------------------------------------------------------ Handler protocol
    def handle(self, records: list[Record]) -> Offsets:
        done = self._settle()  # the previous batch (and any failed one) is durable
        prepared = self._prepare(records)
        if self._pool is None:
            return {**done, **self._execute_or_keep(prepared)}
        self._inflight = (prepared, self._pool.submit(self._execute, prepared))
        return done

    def tick(self) -> Offsets:
        return self._settle()

    def revoke(self, partitions: Sequence[TopicPartition]) -> Offsets:
        return self._settle()  # all of them: committing kept partitions is harmless

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.dlq.close()

    # ------------------------------------------------------------ steps
    def _settle(self) -> Offsets:
        """Wait for the batch in flight; retry a failed one. Offsets now durable."""
        done: Offsets = {}
        if self._inflight is not None:
            prepared, future = self._inflight
            self._inflight = None
            try:
                done = future.result()
            except TransientError:
                self._failed = prepared
        if self._failed is not None:
            done = {**done, **self._execute_or_keep(self._failed)}
        return done

    def _execute_or_keep(self, prepared: _Prepared) -> Offsets:
        try:
            offsets = self._execute(prepared)
        except TransientError:
            self._failed = prepared
            raise
        self._failed = None
        return offsets

    def _prepare(self, records: list[Record]) -> _Prepared:
        t_start = time.perf_counter()
        events, rejected = self.validator.decode_batch(
            [r.value if r.value is not None else b"" for r in records], [r.key for r in records]
        )
        bad = {i for i, _ in rejected}
        good_records = [r for i, r in enumerate(records) if i not in bad] if bad else records
        batch = [
            Positioned(ev, r.partition, r.offset)
            for ev, r in zip(events, good_records, strict=True)
        ]
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t_start)
        return _Prepared(records, batch, rejected, next_offsets(records), t_start)

    def _execute(self, p: _Prepared) -> Offsets:
        """Redis, then the dead-letter topic; returns the batch's offsets."""
        stage = self.metrics.stage_seconds
        t0 = time.perf_counter()
        try:
            result = self.store.apply(p.batch) if p.batch else None
        except _REDIS_TRANSIENT as e:
            raise TransientError(f"redis unavailable: {e}") from e
        stage.labels("redis").observe(time.perf_counter() - t0)
        failpoint("applied")

        if p.rejected:
            t0 = time.perf_counter()
            try:
                for i, rejection in p.rejected:
                    r = p.records[i]
                    self.dlq.produce(
                        self.dlq_topic,
                        r.value if r.value is not None else b"",
                        key=r.key,
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
            m.duplicates.labels(DUPLICATE_EVENT_ID).inc(result.duplicates)
            m.duplicates.labels(DUPLICATE_REPLAYED_OFFSET).inc(result.replayed + result.stale)
        for _, rejection in p.rejected:
            m.dead_lettered.labels(rejection.reason.value).inc()
        m.batch_seconds.labels(m.role).observe(time.perf_counter() - p.t_start)
        return p.offsets

    def _replace_producer(self) -> None:
        old, self.dlq = self.dlq, self._new_producer()
        try:
            old.close(timeout=0)
        except Exception as e:  # undeliverable by now: those records are sent again
            log.debug("closing the failed dead-letter producer: %r", e)
