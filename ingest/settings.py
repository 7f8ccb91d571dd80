"""Connection settings for Kafka and Redis, read from ``STREAMREC_*`` env vars.

Every field is documented and validated when the settings object is built, so a
typo or a bad value stops the process at start with a message naming the
variable. Unknown ``STREAMREC_KAFKA_*`` / ``STREAMREC_REDIS_*`` variables are
ignored by pydantic-settings; unknown keys in a config file are rejected by
``streamrec.settings.apply_config_file``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EVENTS_TOPIC = "streamrec.events"
DLQ_TOPIC = "streamrec.events.dlq"


class KafkaSettings(BaseSettings):
    """How to reach Kafka and which client library talks to it.

    ``bootstrap`` unset means "start the embedded local broker" (CLI and tests).
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_KAFKA_", frozen=True, extra="forbid")

    bootstrap: str | None = Field(
        None, description="host:port[,host:port...]; unset = embedded local broker"
    )
    client: Literal["confluent", "kafka-python"] = Field(
        "confluent",
        description="confluent = confluent-kafka (librdkafka, fast); kafka-python = pure Python",
    )
    events_topic: str = Field(EVENTS_TOPIC, min_length=1, max_length=249, description="click events")
    dlq_topic: str = Field(
        DLQ_TOPIC, min_length=1, max_length=249, description="rejected events, with the reason"
    )
    partitions: int = Field(6, ge=1, le=10_000, description="partitions for topics we create")
    replication_factor: int = Field(1, ge=1, le=16, description="for topics we create")
    # Consumer-group timeouts: the client defaults make a group join take ~20 s;
    # these make it take a few seconds while still tolerating GC pauses.
    session_timeout_ms: int = Field(
        6_000, ge=1_000, le=300_000, description="a member silent this long leaves the group"
    )
    heartbeat_interval_ms: int = Field(
        1_000, ge=100, le=60_000, description="at most a third of session_timeout_ms"
    )
    max_poll_interval_ms: int = Field(
        30_000, ge=1_000, le=3_600_000, description="longest allowed gap between two polls"
    )
    request_timeout_ms: int = Field(
        15_000, ge=1_000, le=300_000, description="socket / admin request timeout"
    )
    client_id: str = Field("streamrec", min_length=1, description="client.id seen by the brokers")
    idempotence: bool = Field(
        True,
        description="idempotent producer (no duplicates from retries); needs a broker that keeps "
        "producer ids, which the memory-only embedded broker loses on restart",
    )
    # Security, passed through to both clients.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )
    sasl_username: str | None = Field(None, description="SASL user")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never printed)")
    ssl_cafile: str | None = Field(None, description="CA bundle (PEM) to verify the brokers")
    ssl_certfile: str | None = Field(None, description="client certificate (PEM), mutual TLS")
    ssl_keyfile: str | None = Field(None, description="client private key (PEM), mutual TLS")

    @field_validator("bootstrap")
    @classmethod
    def _check_bootstrap(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        for hp in v.split(","):
            host, sep, port = hp.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port[,host:port...], got {v!r}")
        return v.strip()

    @field_validator("heartbeat_interval_ms")
    @classmethod
    def _check_heartbeat(cls, v: int, info) -> int:
        session = info.data.get("session_timeout_ms")
        if session is not None and v * 3 > session:
            raise ValueError(
                f"heartbeat_interval_ms ({v}) must be at most a third of "
                f"session_timeout_ms ({session})"
            )
        return v


class RedisSettings(BaseSettings):
    """How to reach Redis (or Valkey / Redis Cluster)."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_REDIS_", frozen=True, extra="forbid")

    url: str | None = Field(
        None,
        description="redis://[user:pass@]host:port/db or rediss:// for TLS; "
        "unset = embedded local server",
    )
    cluster: bool = Field(False, description="connect with the Redis Cluster client")
    socket_timeout_s: float = Field(2.0, gt=0, le=60, description="per-command timeout")
    connect_timeout_s: float = Field(2.0, gt=0, le=60, description="connect timeout")
    key_prefix: str = Field(
        "sr", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of every key streamrec writes",
    )
    ssl_ca_certs: str | None = Field(None, description="CA bundle (PEM) for rediss://")
    ssl_certfile: str | None = Field(None, description="client certificate (PEM), mutual TLS")
    ssl_keyfile: str | None = Field(None, description="client private key (PEM), mutual TLS")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {v!r}")
        return v.strip()


class IngestSettings(BaseSettings):
    """The ingest workers: session updater and archiver."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_INGEST_", frozen=True, extra="forbid")

    sessions_group: str = Field("streamrec-sessions", min_length=1, description="consumer group")
    archive_group: str = Field("streamrec-archiver", min_length=1, description="consumer group")
    batch_size: int = Field(1000, ge=1, le=100_000, description="records per poll")
    poll_timeout_s: float = Field(0.5, gt=0, le=30, description="longest wait for a batch")
    max_session_len: int = Field(50, ge=1, le=10_000, description="events kept per session")
    session_ttl_s: int = Field(1800, ge=1, description="idle time after which a session expires")
    popularity_half_life_s: float = Field(
        3600.0, gt=0, description="half-life of the decayed item popularity (event time)"
    )
    max_future_skew_s: float = Field(
        3600.0, ge=0, description="events stamped further in the future are rejected"
    )
    archive_root: str = Field(
        ".streamrec/archive", min_length=1, description="archive directory or fsspec URL"
    )
    archive_max_events: int = Field(50_000, ge=1, description="flush the archive buffer at")
    archive_max_age_s: float = Field(60.0, gt=0, description="... or when this old")
    retry_max_s: float = Field(5.0, gt=0, le=300, description="longest backoff between retries")
    sessions_metrics_port: int = Field(
        9401, ge=0, le=65535, description="Prometheus port of the session updater (0 = any)"
    )
    archive_metrics_port: int = Field(
        9402, ge=0, le=65535, description="Prometheus port of the archiver (0 = any)"
    )
