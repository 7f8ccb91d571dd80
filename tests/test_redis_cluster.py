"""A real 3-node Redis Cluster: it forms, the cluster client reaches every node, the
session store gives the reference state on it, replays change nothing, and data
survives a node's kill -9 and restart."""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from ingest.events import ClickEvent, EventValidator
from ingest.redis_conn import make_redis
from ingest.settings import RedisSettings
from ingest.simulator import Simulator, SimulatorConfig
from ingest.store import Positioned, SessionStore, StoreConfig, reference_state, session_keys
from streamrec.cluster import SLOTS, LocalRedisCluster
from streamrec.settings import StackSettings

EXTERNAL = bool(os.environ.get("STREAMREC_REDIS_CLUSTER_URL"))
PARTITIONS = 3


def _events(n: int = 3000) -> tuple[list[Positioned], int]:
    """Simulated events keyed to partitions by session (as a producer would), with offsets."""
    dicts = list(Simulator(SimulatorConfig(n_events=n, duration_hours=None)).events())
    now = max(d["ts"] for d in dicts)
    validator = EventValidator()
    offsets = [0] * PARTITIONS
    out = []
    for d in dicts:
        ev = validator.validate(d, now_ms=now)
        assert isinstance(ev, ClickEvent), ev
        p = zlib.crc32(ev.session_id.encode()) % PARTITIONS
        out.append(Positioned(ev, p, offsets[p]))
        offsets[p] += 1
    return out, now


@pytest.fixture(scope="module")
def events() -> tuple[list[Positioned], int]:
    return _events()


@pytest.fixture
def client(redis_cluster: LocalRedisCluster) -> Iterator[RedisCluster]:
    c = make_redis(redis_cluster.redis_settings(RedisSettings()), socket_timeout=5)
    assert isinstance(c, RedisCluster)
    yield c
    c.close()


def _apply_all(store: SessionStore, batch: list[Positioned], size: int = 500) -> Counter[str]:
    total: Counter[str] = Counter()
    for i in range(0, len(batch), size):
        r = store.apply(batch[i : i + size])
        total.update(applied=r.applied, replayed=r.replayed, duplicates=r.duplicates,
                     stale=r.stale, popularity_added=r.popularity_added)  # fmt: skip
    return total


def _assert_reference(store: SessionStore, batch: list[Positioned], now: int) -> None:
    want_sessions, want_pop = reference_state((pe.event for pe in batch), store.config, now)
    assert store.sessions(want_sessions) == want_sessions
    got_pop = dict(store.popularity(now_ms=now))
    assert got_pop.keys() == want_pop.keys()
    for item, want in want_pop.items():
        assert math.isclose(got_pop[item], want, rel_tol=1e-9), (item, got_pop[item], want)


def _keys_per_node(client: RedisCluster, pattern: str) -> list[int]:
    """Keys matching ``pattern`` on each primary, read from that node directly."""
    return [
        sum(1 for _ in client.get_redis_connection(node).scan_iter(match=pattern, count=1000))
        for node in client.get_primaries()
    ]


def test_cluster_forms_with_all_slots_covered(redis_cluster: LocalRedisCluster,
                                              client: RedisCluster) -> None:  # fmt: skip
    primaries = client.get_primaries()
    if redis_cluster.nodes:
        assert len(primaries) == len(redis_cluster.nodes) == 3
        assert {n.port for n in primaries} == {s.port for s in redis_cluster.nodes}
    covered = sum(end - start + 1 for start, end, *_ in client.execute_command("CLUSTER SLOTS"))
    assert covered == SLOTS
    for node in primaries:
        info = client.get_redis_connection(node).cluster("INFO")
        assert info["cluster_state"] == "ok", info
        assert int(info["cluster_slots_assigned"]) == SLOTS


def test_cluster_client_reaches_every_node(client: RedisCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    keys = {f"{prefix}:k{i}": str(i) for i in range(60)}
    for k, v in keys.items():
        client.set(k, v, ex=600)
    assert {k: client.get(k).decode() for k in keys} == keys
    assert all(n > 0 for n in _keys_per_node(client, f"{prefix}:*"))


def test_session_store_matches_reference_and_replay_is_a_no_op(
    client: RedisCluster, events: tuple[list[Positioned], int]
) -> None:
    batch, now = events
    store = SessionStore(client, StoreConfig(prefix=f"t{uuid.uuid4().hex[:8]}"))
    assert store.cluster
    first = _apply_all(store, batch)
    assert first["applied"] == len(batch) and first["popularity_added"] == len(batch)
    _assert_reference(store, batch, now)
    per_node = _keys_per_node(client, f"{store.config.prefix}:*:ev")
    assert sum(per_node) == len({pe.event.session_id for pe in batch})
    assert all(n > 0 for n in per_node), per_node

    again = _apply_all(store, batch)
    assert again["replayed"] == len(batch)
    assert again["applied"] == again["popularity_added"] == 0
    _assert_reference(store, batch, now)


@pytest.mark.skipif(EXTERNAL, reason="kills a node: only with the embedded cluster")
def test_node_killed_and_restarted_keeps_data_and_client_reconnects(
    tmp_path: Path, events: tuple[list[Positioned], int]
) -> None:
    settings = StackSettings(redis_appendfsync="always")  # every acknowledged write is on disk
    with LocalRedisCluster(tmp_path, settings) as cluster:
        client = make_redis(cluster.redis_settings(RedisSettings()), socket_timeout=5)
        assert isinstance(client, RedisCluster)
        batch, now = events
        store = SessionStore(client, StoreConfig(prefix="kill"))
        _apply_all(store, batch)
        victim = cluster.nodes[1]
        on_victim = [
            pe.event.session_id for pe in batch
            if client.get_node_from_key(session_keys("kill", pe.event.session_id).events).port
            == victim.port
        ]  # fmt: skip
        assert on_victim
        old_pid = victim.pid

        cluster.kill(1)
        assert not victim.alive()
        with pytest.raises(OSError):  # nothing listens on its port
            socket.create_connection(("127.0.0.1", victim.port), timeout=1).close()
        t0 = time.monotonic()
        cluster.restart(1)
        assert victim.alive() and victim.pid != old_pid
        assert time.monotonic() - t0 < 30

        assert store.session(on_victim[0])  # the same client, reconnected
        _assert_reference(store, batch, now)
        assert _apply_all(store, batch)["applied"] == 0
        client.close()
    assert not victim.alive()
