"""Settings of the recommendation service, read from ``STREAMREC_SERVING_*`` env vars.

Redis, Kafka and the session store keep their own sections (``[redis]``,
``[kafka]``, ``[ingest]``: TLS and auth settings are passed through from
there); this section holds what only the server needs. Every field is
validated when the settings are built, so a bad value stops the server at
start with a message naming the variable.

>>> s = ServingSettings(cors_origins="https://a.example, https://b.example")
>>> s.cors_origin_list
['https://a.example', 'https://b.example']
>>> s.batching().max_batch_size
64
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.preranker_config import PreRankConfig
from serving.batcher import BatchingConfig

__all__ = ["ServingSettings"]


class ServingSettings(BaseSettings):
    """The recommendation service (`streamrec serve`): API, batching, models, limits."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_SERVING_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0 = any free port)")
    models_root: str = Field(
        "models", min_length=1,
        description="model registry: local directory or fsspec URL (versions/ + CURRENT)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where models run: cpu, cuda, or auto (cuda when available)"
    )
    # Pre-ranking (docs/inttower.md): narrow the catalogue before the session model scores it.
    pre_ranker: Literal["none", "inttower"] = Field(
        "none", description="none = score the whole catalogue; inttower = the two-tower "
        "pre-ranker saved in each model version's preranker/ directory picks top-N candidates",
    )
    pre_ranker_top_n: int = Field(
        1000, ge=1, le=1_000_000, description="candidates the pre-ranker hands to the scorer"
    )
    # Dynamic batching (serving/batcher.py).
    max_batch_size: int = Field(64, ge=1, le=4096, description="most requests scored together")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="longest a batch's first request waits for company"
    )
    max_queue: int = Field(
        1024, ge=1, le=1_000_000, description="requests waiting beyond this get a fast 503"
    )
    latency_budget_ms: float = Field(
        250.0, gt=0, le=60_000, description="a request queued longer than this gets a 503"
    )
    # Security and request limits.
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the /admin endpoints (unset = admin disabled)"
    )
    max_k: int = Field(1000, ge=1, le=100_000, description="largest k a request may ask for")
    max_candidates: int = Field(
        10_000, ge=1, le=1_000_000, description="longest candidates list of a request"
    )
    max_body_bytes: int = Field(
        256 * 1024, ge=1024, le=64 * 1024 * 1024, description="larger request bodies get 413"
    )
    max_session_id_len: int = Field(128, ge=1, le=4096, description="longest session_id")
    max_item_id_len: int = Field(128, ge=1, le=4096, description="longest candidate item id")
    max_events_per_request: int = Field(
        100, ge=1, le=10_000, description="most events in one POST /v1/events"
    )
    cors_origins: str = Field(
        "", description="comma-separated origins allowed by CORS; empty = CORS off"
    )
    demo_page: bool = Field(
        True, description="serve the demo page on / (its assets on /static/); off = API only"
    )
    # Models, fallbacks, online-evaluation record.
    registry_poll_s: float = Field(
        5.0, gt=0, le=3600, description="how often the CURRENT pointer is read"
    )
    notify_channel: str = Field(
        "streamrec:models", min_length=1,
        description="Redis pub/sub channel announcing a promotion (checked at once)",
    )
    served_ttl_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="how long the record of what was served lives"
    )
    served_keep: int = Field(
        10, ge=1, le=1000, description="answers kept per session in the served record"
    )
    served_items: int = Field(
        100, ge=1, le=100_000, description="top items of each answer kept in the served record"
    )
    popularity_refresh_s: float = Field(
        10.0, gt=0, le=3600, description="how often the local popularity cache is refreshed"
    )
    popularity_size: int = Field(
        2000, ge=1, le=1_000_000, description="most popular items kept in the local cache"
    )
    redis_retry_s: float = Field(
        1.0, gt=0, le=300,
        description="after a Redis error, answer from the cache this long before trying again",
    )
    events_flush_timeout_s: float = Field(
        5.0, gt=0, le=120, description="POST /v1/events waits this long for the broker's ack"
    )

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, v: str) -> str:
        for origin in (o.strip() for o in v.split(",") if o.strip()):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"origins must be http(s)://host[:port] or *, got {origin!r}")
        return v

    @model_validator(mode="after")
    def _check_budget(self) -> ServingSettings:
        if self.latency_budget_ms <= self.max_wait_ms:
            raise ValueError(
                f"latency_budget_ms ({self.latency_budget_ms}) must exceed max_wait_ms "
                f"({self.max_wait_ms}), or every request would be shed"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def batching(self) -> BatchingConfig:
        """The batcher's limits."""
        return BatchingConfig(
            max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
            max_queue=self.max_queue, latency_budget_ms=self.latency_budget_ms,
        )

    def pre_ranking(self) -> PreRankConfig:
        """The pre-ranking config of the model holder."""
        return PreRankConfig(pre_ranker=self.pre_ranker, top_n=self.pre_ranker_top_n)
