"""Build the ingest workers from settings (used by the CLI and the demo)."""

from __future__ import annotations

from ingest.archive import ArchiveHandler
from ingest.events import EventValidator
from ingest.kafka import ensure_topics, make_consumer, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.redis_conn import make_redis
from ingest.sessions import SessionsHandler
from ingest.settings import IngestSettings, KafkaSettings, RedisSettings
from ingest.store import SessionStore, StoreConfig
from ingest.worker import Worker, WorkerOptions


def store_from_settings(redis: RedisSettings, ingest: IngestSettings) -> SessionStore:
    return SessionStore(
        make_redis(redis),
        StoreConfig(
            prefix=redis.key_prefix,
            max_session_len=ingest.max_session_len,
            session_ttl_s=ingest.session_ttl_s,
            popularity_half_life_s=ingest.popularity_half_life_s,
        ),
    )


def _options(ingest: IngestSettings) -> WorkerOptions:
    return WorkerOptions(
        batch_size=ingest.batch_size,
        poll_timeout_s=ingest.poll_timeout_s,
        retry_max_s=ingest.retry_max_s,
    )


def sessions_worker(
    kafka: KafkaSettings, redis: RedisSettings, ingest: IngestSettings
) -> tuple[Worker, ConsumerMetrics]:
    """The session updater: events -> Redis sessions and popularity; rejects -> DLQ."""
    ensure_topics(kafka)
    metrics = ConsumerMetrics("sessions")
    handler = SessionsHandler(
        store_from_settings(redis, ingest),
        lambda: make_producer(kafka),
        kafka.dlq_topic,
        metrics,
        EventValidator(max_future_ms=int(ingest.max_future_skew_s * 1000)),
    )
    consumer = make_consumer(kafka, ingest.sessions_group)
    return Worker(consumer, [kafka.events_topic], handler, metrics, _options(ingest)), metrics


def archive_worker(kafka: KafkaSettings, ingest: IngestSettings) -> tuple[Worker, ConsumerMetrics]:
    """The archiver: valid events -> hour-partitioned Parquet."""
    ensure_topics(kafka)
    metrics = ConsumerMetrics("archive")
    handler = ArchiveHandler(
        ingest.archive_root,
        max_buffer_events=ingest.archive_max_events,
        max_buffer_age_s=ingest.archive_max_age_s,
        metrics=metrics,
    )
    consumer = make_consumer(kafka, ingest.archive_group)
    return Worker(consumer, [kafka.events_topic], handler, metrics, _options(ingest)), metrics
