"""The consumer-group loop shared by the ingest workers.

A :class:`Handler` turns polled records into durable effects (Redis writes,
Parquet files, dead-letter records) and says which offsets those effects now
cover; the :class:`Worker` owns everything Kafka: subscribing, polling,
committing, rebalances, retries, shutdown and the consumer metrics. The
sequence for every batch is fixed and short:

1. poll a batch;
2. ``handler.handle(records)``: make effects durable (retried with backoff on
   :class:`TransientError`, never skipped);
3. commit the offsets the handler returned (next offset to read);

so a crash at any point re-delivers only records whose effects are
idempotent to repeat. On a rebalance the handler makes durable what it holds
for the revoked partitions and the worker commits it before giving them up.
SIGTERM / SIGINT (or :meth:`Worker.stop`) finishes the batch in hand, commits,
leaves the group and returns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest.failpoints import failpoint
from ingest.kafka import Consumer, KafkaClientError, Record, TopicPartition
from ingest.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

Offsets = dict[TopicPartition, int]


class TransientError(RuntimeError):
    """A dependency is unavailable (Redis down, broker unreachable): retry later."""


class Handler(Protocol):
    def handle(self, records: list[Record]) -> Offsets:
        """Make the effects of ``records`` durable; return offsets safe to commit.

        Must be idempotent: the same records may be handled again after a
        crash or a retry. Raise :class:`TransientError` to be retried.
        """
        ...

    def tick(self) -> Offsets:
        """Called when a poll returns nothing (time-based flushes)."""
        ...

    def revoke(self, partitions: Sequence[TopicPartition]) -> Offsets:
        """Partitions are being taken away: make their effects durable now."""
        ...

    def close(self) -> None:
        """The worker is done: release clients (after the final revoke)."""
        ...


def next_offsets(records: Sequence[Record]) -> Offsets:
    """Per partition, the offset after the last record: what Kafka commits mean.

    >>> from ingest.kafka import Record
    >>> next_offsets([Record("t", 0, 5, None, b""), Record("t", 0, 7, None, b""),
    ...               Record("t", 1, 2, None, b"")])
    {('t', 0): 8, ('t', 1): 3}
    """
    out: Offsets = {}
    for r in records:
        tp = (r.topic, r.partition)
        if r.offset + 1 > out.get(tp, -1):
            out[tp] = r.offset + 1
    return out


@dataclass(frozen=True)
class WorkerOptions:
    batch_size: int = 1000
    poll_timeout_s: float = 0.5
    retry_initial_s: float = 0.1
    retry_max_s: float = 5.0
    lag_interval_s: float = 5.0


class Worker:
    """Runs one handler over one consumer until stopped."""

    def __init__(
        self,
        consumer: Consumer,
        topics: Sequence[str],
        handler: Handler,
        metrics: ConsumerMetrics,
        options: WorkerOptions | None = None,
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topics = list(topics)
        self.handler = handler
        self.metrics = metrics
        self.options = options or WorkerOptions()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._last_lag = 0.0
        self._committed: Offsets = {}  # last offset we committed, per partition
        self.assigned: set[TopicPartition] = set()

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return (thread-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ loop
    def run(self, max_batches: int | None = None) -> None:
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        batches = 0
        try:
            while not self._stop.is_set() and (max_batches is None or batches < max_batches):
                t0 = time.perf_counter()
                records = self.consumer.poll(self.options.batch_size, self.options.poll_timeout_s)
                if records:
                    self.metrics.stage_seconds.labels("poll").observe(time.perf_counter() - t0)
                    batches += 1
                    self.metrics.observe_batch(records)
                    failpoint("polled")
                    offsets = self._retrying(lambda r=records: self.handler.handle(r))
                else:
                    offsets = self._retrying(self.handler.tick)
                if offsets is None:  # stopped while a dependency was down: commit nothing
                    break
                if offsets:
                    failpoint("handled")
                self._commit(offsets)
                if offsets:
                    failpoint("committed")
                self._maybe_update_lag()
            # Shutting down: whatever the handler still buffers is made durable
            # and committed, as on a revoke of every partition we hold.
            offsets = self._retrying(lambda: self.handler.revoke(sorted(self.assigned)), 3)
            if offsets:
                self._commit(offsets)
        finally:
            self.consumer.close()
            self.handler.close()
            log.info("worker stopped; left the consumer group")

    def _retrying(self, fn: Callable[[], Offsets], max_attempts: int | None = None) -> Offsets | None:
        """Run ``fn`` until it succeeds; back off exponentially on TransientError.

        Returns None when asked to stop (or out of attempts) before success.
        """
        delay = self.options.retry_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except TransientError as e:
                self.metrics.retries.inc()
                if (max_attempts is not None and attempt >= max_attempts) or (
                    self._stop.is_set() and max_attempts is None
                ):
                    log.warning("giving up after %d attempt(s): %s; nothing committed", attempt, e)
                    return None
                log.warning("transient failure (attempt %d, retry in %.1fs): %s", attempt, delay, e)
                self._sleep(delay)
                delay = min(delay * 2, self.options.retry_max_s)

    def _commit(self, offsets: Offsets) -> None:
        if not offsets:
            return
        try:
            t0 = time.perf_counter()
            self.consumer.commit(offsets)
            self.metrics.stage_seconds.labels("commit").observe(time.perf_counter() - t0)
        except KafkaClientError as e:
            # We lost the partitions (e.g. past max.poll.interval.ms during a long
            # outage). The new owner re-delivers from the last commit, and every
            # effect is idempotent, so nothing is lost or applied twice.
            self.metrics.commit_failures.inc()
            log.warning("commit failed, records will be re-delivered: %s", e)
            return
        for (topic, partition), offset in offsets.items():
            self.metrics.committed.labels(topic, str(partition)).set(offset)
            self._committed[(topic, partition)] = offset

    def _maybe_update_lag(self) -> None:
        """Lag = the high watermark of the last fetch minus our last commit.

        Both are known locally, so this costs no network round trip (asking the
        broker for watermarks stalled the consume loop for ~0.5 s a partition
        with librdkafka, measured by bench/ingest.py).
        """
        now = time.monotonic()
        if now - self._last_lag < self.options.lag_interval_s or not self._committed:
            return
        self._last_lag = now
        for tp in sorted(self.assigned):
            high, committed = self.consumer.high_watermark(tp), self._committed.get(tp)
            if high is not None and committed is not None:
                self.metrics.lag.labels(tp[0], str(tp[1])).set(max(0, high - committed))

    # ------------------------------------------------------------------ rebalance
    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned.update(partitions)
        self.metrics.rebalances.labels("assign").inc()
        log.info("assigned %s", partitions)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("revoke").inc()
        log.info("revoking %s", partitions)
        offsets = self._retrying(lambda: self.handler.revoke(partitions), max_attempts=3)
        if offsets:  # revoked and kept partitions alike: we still own both right now
            self._commit(offsets)
        self.assigned.difference_update(partitions)
        for topic, partition in partitions:
            self._committed.pop((topic, partition), None)
            for gauge in (self.metrics.lag, self.metrics.committed):
                with contextlib.suppress(KeyError):
                    gauge.remove(topic, str(partition))
