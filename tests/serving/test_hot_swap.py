"""Model hot swap: a new champion under load with zero failed requests; bad versions refused."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry
from serving_helpers import (
    body,
    fill_store,
    fresh_store,
    metric,
    publish,
    publish_corrupt,
    save_version,
    serve,
    session_events,
    settings,
)

from ingest.redis_conn import make_redis
from ingest.store import SessionStore
from model.checkpoint import load_checkpoint, save_checkpoint
from model.registry import ModelRegistry
from serving.models import ModelHolder, ModelLoadError, ModelMetrics, notify_promotion
from streamrec.stack import LocalStack

SESSIONS = session_events(30, seed=2, prefix="h")
CHANNEL_PREFIX = "test:models:"


@pytest.fixture
def store(stack: LocalStack) -> Iterator[SessionStore]:
    client = make_redis(stack.redis)
    s = fresh_store(client)
    fill_store(s, SESSIONS)
    yield s
    client.close()


class Load:
    """``clients`` loops of sequential requests in a thread; every response is kept."""

    def __init__(self, url: str, clients: int = 16):
        self.url, self.clients = url, clients
        self.results: list[list[tuple[int, dict[str, Any] | str]]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, n: int, http: httpx.AsyncClient) -> None:
        sids = list(SESSIONS)
        i = n
        while not self._stop.is_set():
            sid = sids[i % len(sids)]
            i += self.clients
            try:
                r = await http.post("/v1/recommendations", json=body(sid, k=5))
                out = r.json() if r.status_code == 200 else r.text
                self.results[n].append((r.status_code, out))
            except httpx.HTTPError as e:  # a refused or dropped connection is a failure too
                self.results[n].append((0, repr(e)))

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            await asyncio.gather(*(self._client(n, http) for n in range(self.clients)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def versions_seen(self) -> set[str | None]:
        return {r["model_version"] for res in self.results for s, r in res if s == 200}

    def failures(self) -> list[tuple[int, Any]]:
        return [(s, r) for res in self.results for s, r in res if s != 200]


def _wait(cond: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_hot_swap_under_load_fails_no_request_and_never_goes_back(
        store: SessionStore, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, tmp_path, "v1", seed=0)
    channel = f"{CHANNEL_PREFIX}{tmp_path.name}"
    # Polling once a minute: only the Redis notification can make the swap quick.
    cfg = settings(registry_poll_s=60.0, notify_channel=channel)
    with serve(cfg, store=store, registry=registry) as srv:
        before = httpx.post(f"{srv.url}/v1/recommendations", json=body("h1", k=5)).json()
        with Load(srv.url) as load:
            assert _wait(lambda: sum(map(len, load.results)) > 100)
            publish(registry, tmp_path, "v2", seed=1)
            t_promoted = time.monotonic()
            assert notify_promotion(store.client, channel, "v2") == 1  # the server listens
            assert _wait(lambda: "v2" in load.versions_seen(), timeout=10)
            swap_s = time.monotonic() - t_promoted
            n_at_swap = sum(map(len, load.results))
            assert _wait(lambda: sum(map(len, load.results)) > n_at_swap + 100)
        after = httpx.post(f"{srv.url}/v1/recommendations", json=body("h1", k=5)).json()

        assert load.failures() == []
        assert load.versions_seen() == {"v1", "v2"}
        for per_client in load.results:  # each client's answers: v1 ... v1 v2 ... v2
            versions = [r["model_version"] for _, r in per_client]
            first_v2 = versions.index("v2")
            assert set(versions[:first_v2]) == {"v1"} and set(versions[first_v2:]) == {"v2"}
        assert swap_s < 5.0, f"the notification did not trigger the swap ({swap_s:.1f}s)"
        assert before["model_version"] == "v1" and after["model_version"] == "v2"
        assert [i["score"] for i in before["items"]] != [i["score"] for i in after["items"]]
        assert metric(srv.url, "streamrec_serving_model_info", version="v2") == 1
        assert metric(srv.url, "streamrec_serving_model_info", version="v1") is None
        assert metric(srv.url, "streamrec_serving_model_swaps_total") == 2


def test_a_corrupt_version_keeps_the_old_one_serving_and_raises_the_alert(
        store: SessionStore, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, tmp_path, "v1", seed=0)
    with serve(settings(), store=store, registry=registry) as srv, Load(srv.url, 4) as load:
        assert metric(srv.url, "streamrec_serving_model_load_failed") == 0
        publish_corrupt(registry, tmp_path, "v2")  # truncated weights, promoted
        assert _wait(lambda: metric(srv.url, "streamrec_serving_model_load_failed") == 1)
        time.sleep(0.6)  # a few more polls: the bad version is not retried in a loop
        assert metric(srv.url, "streamrec_serving_model_load_failures_total") == 1
        status = httpx.get(f"{srv.url}/admin/model",
                           headers={"Authorization": "Bearer s3cret"}).json()
        assert status["version"] == "v1" and "v2" in status["failed"]
        assert httpx.get(f"{srv.url}/readyz").status_code == 200

        publish(registry, tmp_path, "v3", seed=3)  # a good one clears the alert
        assert _wait(lambda: metric(srv.url, "streamrec_serving_model_load_failed") == 0)
        n = sum(map(len, load.results))
        assert _wait(lambda: sum(map(len, load.results)) > n + 20)
    assert load.failures() == []
    assert load.versions_seen() == {"v1", "v3"}


def test_the_holder_refuses_versions_it_cannot_serve(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    metrics = ModelMetrics(CollectorRegistry())
    holder = ModelHolder(registry, metrics=metrics)
    assert holder.check() is None and holder.current is None  # nothing published yet

    good = load_checkpoint(save_version(tmp_path / "good", seed=0))
    no_workflow = save_checkpoint(tmp_path / "bare", good.model)  # cannot encode events
    registry.publish(no_workflow, name="bare")
    registry.promote("bare")
    assert holder.check() is None
    assert "workflow" in holder.status()["failed"]["bare"]
    assert metrics.load_failed._value.get() == 1

    publish(registry, tmp_path, "v1", seed=0)
    assert holder.check() == "v1" and metrics.load_failed._value.get() == 0
    with pytest.raises(ModelLoadError, match="no version 'nope'"):
        holder.pin("nope")
    with pytest.raises(ModelLoadError, match="workflow"):
        holder.pin("bare")
    assert holder.current.version == "v1" and holder.pinned is None

    # A NaN model fails the smoke test.
    nan = load_checkpoint(save_version(tmp_path / "nan-src", seed=0))
    with torch.no_grad():
        for p in nan.model.parameters():
            p.fill_(float("nan"))
    registry.publish(save_checkpoint(tmp_path / "nan", nan.model, nan.workflow), name="nan")
    registry.promote("nan")
    assert holder.check() == "v1"
    assert "smoke test" in holder.status()["failed"]["nan"]
    assert metrics.load_failures._value.get() == 2 + 1  # bare (check + pin) and nan
