"""Prometheus metrics of the ingest workers.

Each worker gets its own :class:`CollectorRegistry` (so several workers can run
in one process, as the tests do) and serves it on an HTTP port with
:func:`serve`. Names follow Prometheus conventions: ``_total`` counters,
``_seconds`` histograms, labels for topic/partition/reason/stage.

Counters whose label values are known in advance (the worker's role, every
dead-letter reason, every kind of duplicate) start at 0 when the metrics are
built: a series that first appears with its first increment is never seen to
increase by Prometheus's ``rate()`` and ``increase()``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ingest.events import RejectReason
from ingest.kafka import Record

_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# ``kind`` of the duplicate counter (events the session updater did not apply again):
DUPLICATE_EVENT_ID = "event_id"  # an event_id already applied to its session
DUPLICATE_REPLAYED_OFFSET = "replayed_offset"  # a partition offset already applied
DUPLICATE_KINDS = (DUPLICATE_EVENT_ID, DUPLICATE_REPLAYED_OFFSET)
#: ``reason`` of the dead-letter counter: the event validator's rejection reasons (every
#: dead letter is one of them).
DEAD_LETTER_REASONS = tuple(r.value for r in RejectReason)


class ConsumerMetrics:
    """What every consumer-group worker exports (``role`` = sessions / archive)."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, ns = self.registry, "streamrec_ingest"
        self.role = role
        self.consumed = Counter(f"{ns}_events_consumed", "Records polled from Kafka", ["role"], registry=r)
        self.batch_size = Histogram(
            f"{ns}_batch_size", "Records per polled batch", ["role"], buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{ns}_stage_seconds", "Time per batch and stage (poll, decode, redis, dlq, write, commit)",
            ["stage"], buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            f"{ns}_batch_seconds", "Time to make one batch durable", ["role"],
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.lag = Gauge(
            f"{ns}_consumer_lag", "High watermark minus committed offset", ["topic", "partition"],
            registry=r,
        )
        self.committed = Gauge(
            f"{ns}_committed_offset", "Last committed offset (next to read)", ["topic", "partition"],
            registry=r,
        )
        self.retries = Counter(
            f"{ns}_retries", "Transient failures retried (Redis or broker down)", registry=r
        )
        self.commit_failures = Counter(
            f"{ns}_commit_failures", "Commits refused (partitions lost); records re-delivered",
            registry=r,
        )
        self.rebalances = Counter(
            f"{ns}_rebalances", "Partition assignments and revocations", ["kind"], registry=r
        )
        self.applied = Counter(f"{ns}_events_applied", "Events newly applied", ["role"], registry=r)
        self.duplicates = Counter(
            f"{ns}_events_duplicate",
            "Events ignored as already applied (same event_id, or a replayed offset)",
            ["kind"], registry=r,
        )
        self.dead_lettered = Counter(
            f"{ns}_events_dead_lettered", "Events sent to the dead-letter topic", ["reason"],
            registry=r,
        )
        # The series known in advance, from 0 (see the module docstring).
        for counter in (self.consumed, self.applied):
            counter.labels(role)
        for kind in DUPLICATE_KINDS:
            self.duplicates.labels(kind)
        for reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(reason)

    def observe_batch(self, records: Sequence[Record]) -> None:
        self.consumed.labels(self.role).inc(len(records))
        self.batch_size.labels(self.role).observe(len(records))


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` for ``registry`` on ``port`` (0 = a free port) in a thread."""
    return start_http_server(port, addr=addr, registry=registry)
