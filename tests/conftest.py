"""Shared fixtures: one real local stack per test session.

With ``STREAMREC_REDIS_URL`` / ``STREAMREC_KAFKA_BOOTSTRAP`` set, the fixtures
use those servers instead of starting their own, so the same suite runs against
a real Kafka / Redis deployment. Tests that kill servers skip in that case.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ingest.settings import KafkaSettings, RedisSettings
from streamrec.cluster import LocalRedisCluster
from streamrec.settings import StackSettings
from streamrec.stack import LocalStack

KAFKA_CLIENTS = ("confluent", "kafka-python")


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repo, or ``STREAMREC_DATA_DIR``."""
    env = os.environ.get("STREAMREC_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp("stack")
    with LocalStack(StackSettings(), KafkaSettings(), RedisSettings(), state_dir=state) as s:
        yield s


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_settings(request: pytest.FixtureRequest, stack: LocalStack) -> KafkaSettings:
    """Kafka settings for the stack, once per client library."""
    return stack.kafka.model_copy(update={"client": request.param})


@pytest.fixture
def topic(stack: LocalStack) -> str:
    """A fresh topic name; created by the test (so partitions are its choice)."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(stack: LocalStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis.url or "", socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A started 3-master Redis Cluster (Valkey, no replicas), shared by the session.

    With ``STREAMREC_REDIS_CLUSTER_URL=redis://host:port/0`` (any node of a running
    cluster) it starts nothing and yields a handle on that cluster instead: ``url`` and
    ``redis_settings()`` point there, ``nodes`` is empty, so fault tests skip.
    """
    if url := os.environ.get("STREAMREC_REDIS_CLUSTER_URL"):
        yield LocalRedisCluster.external(url)
        return
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), StackSettings()) as cluster:
        yield cluster
