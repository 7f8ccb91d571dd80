"""One thin Kafka interface, two implementations.

Everything in streamrec that talks to Kafka goes through :class:`Producer`,
:class:`Consumer` and :class:`Admin` built by :func:`make_producer`,
:func:`make_consumer` and :func:`make_admin`. ``KafkaSettings.client`` picks the
library: ``confluent`` (confluent-kafka on librdkafka, the default and the fast
one) or ``kafka-python`` (pure Python, no native code). Both are run by the same
tests against the same broker.

Semantics kept identical across the two:

- ``Consumer.poll`` returns up to ``max_records`` :class:`Record` objects, in
  offset order within each partition; rebalance callbacks run inside ``poll``.
- Auto-commit is off. ``Consumer.commit`` takes, per partition, the *next*
  offset to read (last processed + 1, as Kafka defines it) and returns only
  once the broker has stored it.
- ``Producer.flush`` returns the number of messages still undelivered and
  raises :class:`DeliveryError` when the broker rejected any message, so a
  caller never mistakes a failed send for a sent one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest.settings import KafkaSettings

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
Headers = Sequence[tuple[str, bytes]]
RebalanceCallback = Callable[[list[TopicPartition]], None]


class KafkaClientError(RuntimeError):
    """A Kafka operation failed in a way the caller must handle."""


class DeliveryError(KafkaClientError):
    """The broker rejected one or more produced messages."""


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message, library-independent."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None


class Producer(Protocol):
    def produce(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None
    ) -> None: ...

    def flush(self, timeout: float = 30.0) -> int: ...

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout`` s), then release the client."""
        ...


class Consumer(Protocol):
    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None: ...

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]: ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]: ...

    def assignment(self) -> set[TopicPartition]: ...

    def watermarks(self, partition: TopicPartition) -> tuple[int, int]:
        """(low, high) offsets, asked of the broker: a network round trip."""
        ...

    def high_watermark(self, partition: TopicPartition) -> int | None:
        """The high watermark from the latest fetch response; no network call.

        None until a fetch for the partition has come back.
        """
        ...

    def close(self) -> None: ...


class Admin(Protocol):
    def create_topics(self, names: Sequence[str], partitions: int, replication_factor: int) -> None: ...

    def list_topics(self) -> set[str]: ...

    def close(self) -> None: ...


def make_producer(settings: KafkaSettings, **overrides: object) -> Producer:
    """A producer with acks=all and (by default) idempotence: no duplicates from retries."""
    _require_bootstrap(settings)
    if settings.client == "confluent":
        return _ConfluentProducer(settings, overrides)
    return _KafkaPythonProducer(settings, overrides)


def make_consumer(
    settings: KafkaSettings, group_id: str, *, from_beginning: bool = True, **overrides: object
) -> Consumer:
    """A consumer-group member with manual commits.

    ``from_beginning`` chooses where a group with no committed offset starts.
    """
    _require_bootstrap(settings)
    if not group_id:
        raise ValueError("group_id must be a non-empty string")
    if settings.client == "confluent":
        return _ConfluentConsumer(settings, group_id, from_beginning, overrides)
    return _KafkaPythonConsumer(settings, group_id, from_beginning, overrides)


def make_admin(settings: KafkaSettings) -> Admin:
    _require_bootstrap(settings)
    if settings.client == "confluent":
        return _ConfluentAdmin(settings)
    return _KafkaPythonAdmin(settings)


def ensure_topics(settings: KafkaSettings, names: Sequence[str] | None = None) -> None:
    """Create the events and dead-letter topics (or ``names``) if missing."""
    admin = make_admin(settings)
    try:
        admin.create_topics(
            list(names or (settings.events_topic, settings.dlq_topic)),
            settings.partitions,
            settings.replication_factor,
        )
    finally:
        admin.close()


def _require_bootstrap(settings: KafkaSettings) -> None:
    if not settings.bootstrap:
        raise KafkaClientError(
            "no Kafka bootstrap servers: set STREAMREC_KAFKA_BOOTSTRAP=host:port, "
            "or start the local stack with `streamrec up`"
        )


# --------------------------------------------------------------------------- confluent-kafka


def _confluent_common(s: KafkaSettings) -> dict[str, object]:
    conf: dict[str, object] = {
        "bootstrap.servers": s.bootstrap,
        "client.id": s.client_id,
        "security.protocol": s.security_protocol,
        "socket.timeout.ms": s.request_timeout_ms,
        # librdkafka logs every reconnect attempt at ERROR; ours go through logging.
        "logger": logging.getLogger("ingest.kafka.librdkafka"),
    }
    if s.sasl_mechanism:
        conf["sasl.mechanism"] = s.sasl_mechanism
        conf["sasl.username"] = s.sasl_username or ""
        conf["sasl.password"] = s.sasl_password.get_secret_value() if s.sasl_password else ""
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        if getattr(s, ours):
            conf[theirs] = getattr(s, ours)
    return conf


class _ConfluentProducer:
    def __init__(self, s: KafkaSettings, overrides: Mapping[str, object]) -> None:
        from confluent_kafka import Producer as _P

        conf = _confluent_common(s) | {
            "enable.idempotence": s.idempotence,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": max(30_000, s.request_timeout_ms * 2),
        }
        conf.update(overrides)
        self._p = _P(conf)
        self._errors: list[str] = []

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def produce(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None
    ) -> None:
        while True:
            try:
                self._p.produce(
                    topic, value, key, headers=list(headers) if headers else None,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self._p.poll(0.05)
        self._p.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        remaining = self._p.flush(timeout)
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryError(f"{len(errors)} message(s) not delivered, first: {errors[0]}")
        return remaining

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)


class _ConfluentConsumer:
    def __init__(
        self, s: KafkaSettings, group_id: str, from_beginning: bool, overrides: Mapping[str, object]
    ) -> None:
        from confluent_kafka import Consumer as _C

        conf = _confluent_common(s) | {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.partition.eof": False,
            "session.timeout.ms": s.session_timeout_ms,
            "heartbeat.interval.ms": s.heartbeat_interval_ms,
            "max.poll.interval.ms": s.max_poll_interval_ms,
        }
        conf.update(overrides)
        self._c = _C(conf)
        self._timeout = s.request_timeout_ms / 1000

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None:
        def _assign(_c, parts) -> None:
            if on_assign:
                on_assign([(p.topic, p.partition) for p in parts])

        def _revoke(_c, parts) -> None:
            if on_revoke:
                on_revoke([(p.topic, p.partition) for p in parts])

        self._c.subscribe(list(topics), on_assign=_assign, on_revoke=_revoke, on_lost=_revoke)

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        out: list[Record] = []
        for m in self._c.consume(max_records, timeout):
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaClientError(f"fatal consumer error: {err}")
                log.warning("kafka consumer error (will retry): %s", err)
                continue
            ts_type, ts = m.timestamp()
            out.append(
                Record(
                    m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                    tuple(m.headers() or ()), ts if ts_type else None,
                )
            )
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as _TP

        if not offsets:
            return
        try:
            result = self._c.commit(
                offsets=[_TP(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as e:
            raise KafkaClientError(f"commit failed: {e}") from e
        failed = [tp for tp in result or () if tp.error]
        if failed:
            raise KafkaClientError(f"commit failed for {failed}")

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        from confluent_kafka import TopicPartition as _TP

        res = self._c.committed([_TP(t, p) for t, p in partitions], timeout=self._timeout)
        return {(r.topic, r.partition): (r.offset if r.offset >= 0 else None) for r in res}

    def assignment(self) -> set[TopicPartition]:
        return {(p.topic, p.partition) for p in self._c.assignment()}

    def watermarks(self, partition: TopicPartition) -> tuple[int, int]:
        from confluent_kafka import TopicPartition as _TP

        return self._c.get_watermark_offsets(_TP(*partition), timeout=self._timeout, cached=False)

    def high_watermark(self, partition: TopicPartition) -> int | None:
        from confluent_kafka import TopicPartition as _TP

        _, high = self._c.get_watermark_offsets(_TP(*partition), cached=True)
        return high if high is not None and high >= 0 else None

    def close(self) -> None:
        self._c.close()


class _ConfluentAdmin:
    def __init__(self, s: KafkaSettings) -> None:
        from confluent_kafka.admin import AdminClient

        self._a = AdminClient(_confluent_common(s))
        self._timeout = s.request_timeout_ms / 1000
        self._bootstrap = s.bootstrap

    def create_topics(self, names: Sequence[str], partitions: int, replication_factor: int) -> None:
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import NewTopic

        existing = self.list_topics()
        missing = [n for n in names if n not in existing]
        if not missing:
            return
        futures = self._a.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor)
             for n in missing],
            operation_timeout=self._timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result(self._timeout)
            except Exception as e:
                err = e.args[0] if e.args else None
                if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaClientError(f"could not create topic {name!r}: {e}") from e
        _wait_for(lambda: set(missing) <= self.list_topics(), self._timeout, f"topics {missing}")

    def list_topics(self) -> set[str]:
        from confluent_kafka import KafkaException

        try:
            md = self._a.list_topics(timeout=self._timeout)
        except KafkaException as e:
            raise KafkaClientError(f"cannot list topics at {self._bootstrap}: {e}") from e
        return {t for t, m in md.topics.items() if m.error is None}

    def close(self) -> None:
        pass  # AdminClient has no close; it is freed with the object.


# --------------------------------------------------------------------------- kafka-python


def _kafka_python_common(s: KafkaSettings) -> dict[str, object]:
    conf: dict[str, object] = {
        "bootstrap_servers": s.bootstrap.split(",") if s.bootstrap else [],
        "client_id": s.client_id,
        "security_protocol": s.security_protocol,
        "request_timeout_ms": s.request_timeout_ms,
    }
    if s.sasl_mechanism:
        conf["sasl_mechanism"] = s.sasl_mechanism
        conf["sasl_plain_username"] = s.sasl_username
        conf["sasl_plain_password"] = (
            s.sasl_password.get_secret_value() if s.sasl_password else None
        )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(s, name):
            conf[name] = getattr(s, name)
    return conf


class _KafkaPythonProducer:
    def __init__(self, s: KafkaSettings, overrides: Mapping[str, object]) -> None:
        from kafka import KafkaProducer

        conf = _kafka_python_common(s) | {
            "acks": "all",
            "enable_idempotence": s.idempotence,
            "linger_ms": 5,
        }
        conf.update(overrides)
        self._p = KafkaProducer(**conf)
        self._lock = threading.Lock()
        self._pending = 0
        self._errors: list[str] = []

    def _done(self, _meta) -> None:
        with self._lock:
            self._pending -= 1

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._pending -= 1
            self._errors.append(repr(exc))

    def produce(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None
    ) -> None:
        with self._lock:
            self._pending += 1
        fut = self._p.send(topic, value=value, key=key, headers=list(headers) if headers else None)
        fut.add_callback(self._done)
        fut.add_errback(self._failed)

    def flush(self, timeout: float = 30.0) -> int:
        from kafka.errors import KafkaTimeoutError

        with contextlib.suppress(KafkaTimeoutError):  # what is left is counted below
            self._p.flush(timeout)
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryError(f"{len(errors)} message(s) not delivered, first: {errors[0]}")
        return self._pending

    def close(self, timeout: float = 10.0) -> None:
        try:
            self.flush(timeout)
        finally:
            self._p.close(timeout=min(timeout, 5.0))


class _KafkaPythonConsumer:
    def __init__(
        self, s: KafkaSettings, group_id: str, from_beginning: bool, overrides: Mapping[str, object]
    ) -> None:
        from kafka import KafkaConsumer

        conf = _kafka_python_common(s) | {
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest" if from_beginning else "latest",
            "session_timeout_ms": s.session_timeout_ms,
            "heartbeat_interval_ms": s.heartbeat_interval_ms,
            "max_poll_interval_ms": s.max_poll_interval_ms,
        }
        conf.update(overrides)
        self._c = KafkaConsumer(**conf)

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None:
        from kafka import ConsumerRebalanceListener

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked) -> None:
                if on_revoke:
                    on_revoke([(p.topic, p.partition) for p in revoked])

            def on_partitions_assigned(self, assigned) -> None:
                if on_assign:
                    on_assign([(p.topic, p.partition) for p in assigned])

        self._c.subscribe(topics=list(topics), listener=_Listener())

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        batches = self._c.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        out: list[Record] = []
        for records in batches.values():
            out.extend(
                Record(
                    r.topic, r.partition, r.offset, r.key, r.value,
                    tuple((k, v) for k, v in (r.headers or ())), r.timestamp,
                )
                for r in records
            )
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        from kafka import TopicPartition as _TP
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        try:
            self._c.commit({_TP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
        except KafkaError as e:
            raise KafkaClientError(f"commit failed: {e}") from e

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        from kafka import TopicPartition as _TP

        return {(t, p): self._c.committed(_TP(t, p)) for t, p in partitions}

    def assignment(self) -> set[TopicPartition]:
        return {(p.topic, p.partition) for p in self._c.assignment()}

    def watermarks(self, partition: TopicPartition) -> tuple[int, int]:
        from kafka import TopicPartition as _TP

        tp = _TP(*partition)
        return self._c.beginning_offsets([tp])[tp], self._c.end_offsets([tp])[tp]

    def high_watermark(self, partition: TopicPartition) -> int | None:
        from kafka import TopicPartition as _TP

        return self._c.highwater(_TP(*partition))

    def close(self) -> None:
        self._c.close(autocommit=False)


class _KafkaPythonAdmin:
    def __init__(self, s: KafkaSettings) -> None:
        from kafka.admin import KafkaAdminClient

        self._a = KafkaAdminClient(**_kafka_python_common(s))
        self._timeout = s.request_timeout_ms / 1000

    def create_topics(self, names: Sequence[str], partitions: int, replication_factor: int) -> None:
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        existing = self.list_topics()
        missing = [n for n in names if n not in existing]
        for name in missing:
            try:
                self._a.create_topics([NewTopic(name, partitions, replication_factor)])
            except TopicAlreadyExistsError:
                pass
            except Exception as e:
                raise KafkaClientError(f"could not create topic {name!r}: {e}") from e
        _wait_for(lambda: set(missing) <= self.list_topics(), self._timeout, f"topics {missing}")

    def list_topics(self) -> set[str]:
        return set(self._a.list_topics())

    def close(self) -> None:
        self._a.close()


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise KafkaClientError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
