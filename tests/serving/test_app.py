"""The recommendation service over a real socket, real Valkey and a real broker.

Answers under concurrency equal one-by-one answers; fallbacks; validation;
admin auth; events to Kafka; metrics; the served record; OpenAPI.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from ingest_helpers import create_topic, read_all
from serving_helpers import (
    ITEMS,
    LiveServer,
    body,
    fill_store,
    fresh_store,
    metric,
    publish,
    serve,
    session_events,
    settings,
)

from ingest.kafka import make_producer
from ingest.redis_conn import make_redis
from ingest.store import SessionStore
from model.registry import ModelRegistry
from serving.fallback import popular_answer
from serving.online import ServedRecorder
from streamrec.stack import LocalStack

SESSIONS = session_events(40, seed=1)


@pytest.fixture(scope="module")
def store(stack: LocalStack) -> Iterator[SessionStore]:
    client = make_redis(stack.redis)
    s = fresh_store(client)
    fill_store(s, SESSIONS)
    yield s
    client.close()


@pytest.fixture(scope="module")
def server(stack: LocalStack, store: SessionStore,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("models")
    registry = ModelRegistry(tmp / "registry")
    publish(registry, tmp, "v1", seed=0)
    publish(registry, tmp, "v2", seed=1, promote=False)
    kafka = stack.kafka
    topic = f"ev.{uuid.uuid4().hex[:10]}"
    create_topic(kafka, topic, 1)  # one partition: what was produced comes back in order
    with serve(settings(), store=store, registry=registry, producer=make_producer(kafka),
               events_topic=topic) as srv:
        srv.topic = topic  # type: ignore[attr-defined]
        yield srv


def _requests() -> list[dict[str, Any]]:
    """210 varied requests: known and unknown sessions, k, exclude_seen, candidates."""
    out = []
    sids = [*SESSIONS, "nobody-1", "nobody-2"]
    for n in range(210):
        req = body(sids[n % len(sids)], k=1 + n % 12, exclude_seen=n % 3 != 0)
        if n % 5 == 0:
            req["candidates"] = [*ITEMS[n % 7: n % 7 + 9], "not-an-item"]
        out.append(req)
    return out


async def _post_all(url: str, reqs: list[dict[str, Any]], concurrent: bool) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        if concurrent:
            return list(await asyncio.gather(
                *(client.post("/v1/recommendations", json=r) for r in reqs)))
        return [await client.post("/v1/recommendations", json=r) for r in reqs]


def test_concurrent_requests_answer_exactly_as_one_by_one(server: LiveServer,
                                                          store: SessionStore) -> None:
    reqs = _requests()
    alone = asyncio.run(_post_all(server.url, reqs, concurrent=False))
    batches_before = metric(server.url, "streamrec_serving_batch_size_count")
    together = asyncio.run(_post_all(server.url, reqs, concurrent=True))
    batches = metric(server.url, "streamrec_serving_batch_size_count") - batches_before
    assert batches < len(reqs) / 3, f"{batches} batches for {len(reqs)} requests: no batching"

    for req, a, b in zip(reqs, alone, together, strict=True):
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        ja, jb = a.json(), b.json()
        assert [i["item_id"] for i in ja["items"]] == [i["item_id"] for i in jb["items"]], req
        assert [i["score"] for i in jb["items"]] == pytest.approx(
            [i["score"] for i in ja["items"]], abs=1e-5)
        assert ja["fallback"] == jb["fallback"]
        known = req["session_id"] in SESSIONS
        assert jb["model_version"] == ("v1" if known else None)
        assert jb["fallback_reason"] == (None if known else "unknown_session")
        items = [i["item_id"] for i in jb["items"]]
        assert len(items) <= req["k"] and len(set(items)) == len(items)
        if known and req["exclude_seen"]:
            assert not set(items) & set(SESSIONS[req["session_id"]])
        if req.get("candidates"):
            assert set(items) <= set(req["candidates"]) - {"not-an-item"}
        assert jb["latency_ms"] > 0

    # The served record holds what was served, newest first.
    recorder = ServedRecorder(store.client, store.config.prefix)
    before = len(recorder.read("s5"))
    got = httpx.post(f"{server.url}/v1/recommendations", json=body("s5", k=3)).json()
    records = recorder.read("s5")
    assert len(records) == min(before + 1, 10)  # served_keep
    assert records[0].model_version == "v1" and records[0].fallback is None
    assert list(records[0].items) == [i["item_id"] for i in got["items"]]
    assert records[0].k == 3 and records[0].ts >= records[1].ts
    assert 0 < store.client.ttl(f"{store.config.prefix}:{{s5}}:srv") <= 900


def test_unknown_session_is_answered_from_popularity_and_counted(server: LiveServer,
                                                                store: SessionStore) -> None:
    before = metric(server.url, "streamrec_serving_fallbacks_total",
                    reason="unknown_session") or 0.0
    got = httpx.post(f"{server.url}/v1/recommendations", json=body("never-seen", k=5)).json()
    popular = store.popularity(50)
    assert got["fallback"] == "popularity" and got["fallback_reason"] == "unknown_session"
    assert got["model_version"] is None
    assert [i["item_id"] for i in got["items"]] == [i for i, _ in popular[:5]]
    assert metric(server.url, "streamrec_serving_fallbacks_total",
                  reason="unknown_session") == before + 1
    record = ServedRecorder(store.client, store.config.prefix).read("never-seen")
    assert [(r.model_version, r.fallback, list(r.items)) for r in record] == [
        (None, "unknown_session", [i["item_id"] for i in got["items"]])]


@pytest.mark.parametrize(("payload", "field"), [
    (body("s1", k=0), "k"),
    (body("s1", k=5000), "k"),
    ({"k": 3}, "session_id"),
    (body("s1", k="5"), "k"),
    (body("s1", exclude_seen="yes"), "exclude_seen"),
    (body("s1", candidates="i1"), "candidates"),
    (body("s1", candidates=["i1", 7]), "candidates.1"),
    (body(""), "session_id"),
    (body("x" * 129), "session_id"),
    (body("s1", top=3), "top"),
])
def test_malformed_requests_get_422_naming_the_field(server: LiveServer, payload: dict,
                                                     field: str) -> None:
    r = httpx.post(f"{server.url}/v1/recommendations", json=payload)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(f"{field}: ") or f"; {field}: " in r.json()["message"]


def test_bodies_over_the_limit_get_413_and_bad_json_422(server: LiveServer) -> None:
    huge = body("s1", candidates=[f"item-{n}" for n in range(40_000)])  # ~500 KB
    r = httpx.post(f"{server.url}/v1/recommendations", json=huge)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"session_id": "s1", "candidates": ['
        for _ in range(100):
            yield b'"' + b"x" * 4000 + b'",'
        yield b'"y"]}'

    r = httpx.post(f"{server.url}/v1/recommendations", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/recommendations", content=b"{nope",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["message"]
    assert metric(server.url, "streamrec_serving_request_seconds_count",
                  endpoint="/v1/recommendations", outcome="too_large") >= 2


def test_admin_endpoints_need_the_token_and_pin_and_reload_work(server: LiveServer) -> None:
    url = server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(f"{url}/admin/reload", headers=headers)
        assert r.status_code == 401, (headers, r.text)
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{url}/admin/model", headers=auth).json()["version"] == "v1"

    r = httpx.post(f"{url}/admin/pin", json={"version": "v2"}, headers=auth)
    assert r.status_code == 200 and r.json()["pinned"] == "v2", r.text
    got = httpx.post(f"{url}/v1/recommendations", json=body("s3")).json()
    assert got["model_version"] == "v2"
    assert httpx.post(f"{url}/admin/pin", json={"version": "v9"}, headers=auth).status_code == 404

    r = httpx.post(f"{url}/admin/unpin", headers=auth)
    assert r.json()["pinned"] is None and r.json()["version"] == "v1"
    r = httpx.post(f"{url}/admin/reload", headers=auth)
    assert r.status_code == 200 and r.json()["version"] == "v1"
    assert httpx.post(f"{url}/v1/recommendations", json=body("s3")).json()["model_version"] == "v1"
    assert metric(url, "streamrec_serving_request_seconds_count", endpoint="/admin/reload",
                  outcome="unauthorized") == 3


def test_events_are_produced_to_the_topic_and_invalid_ones_rejected(
        server: LiveServer, stack: LocalStack) -> None:
    topic = server.topic  # type: ignore[attr-defined]
    sid = f"web-{uuid.uuid4().hex[:6]}"
    ev = {"event_id": "e1", "session_id": sid, "item_id": "i4", "ts": 1_704_067_200_000,
          "category": "c0"}
    bad = {**ev, "event_id": "e2", "ts": 1_704_067_200}  # seconds, not ms
    r = httpx.post(f"{server.url}/v1/events", json=bad)
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "ts_too_old"
    assert "milliseconds" in r.json()["detail"]["message"]
    r = httpx.post(f"{server.url}/v1/events", json=[ev, {**ev, "event_id": "e3", "item_id": 5}])
    assert r.status_code == 422 and r.json()["detail"]["index"] == 1  # all or nothing
    assert r.json()["detail"]["reason"] == "wrong_type"

    r = httpx.post(f"{server.url}/v1/events", json=ev)
    assert r.status_code == 202 and r.json() == {"accepted": 1}
    r = httpx.post(f"{server.url}/v1/events", json=[{**ev, "event_id": "e4"}])
    assert r.status_code == 202 and r.json() == {"accepted": 1}
    # Had a rejected event been produced, it would come first: the order is the topic's.
    records = read_all(stack.kafka, topic, 2, timeout=20)
    assert [(x.key, msgspec.json.decode(x.value)) for x in records] == [
        (sid.encode(), {**ev, "event_type": "click"}),
        (sid.encode(), {**ev, "event_id": "e4", "event_type": "click"})]
    assert metric(server.url, "streamrec_serving_events_total", outcome="produced") == 2
    assert metric(server.url, "streamrec_serving_events_total",
                  outcome="rejected_ts_too_old") == 1


def test_metrics_health_openapi_and_no_cors_by_default(server: LiveServer) -> None:
    url = server.url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "v1"
    httpx.post(f"{url}/v1/recommendations", json=body("s2"))
    text = httpx.get(f"{url}/metrics").text
    for name in ("streamrec_serving_request_seconds_bucket", "streamrec_serving_batch_size_bucket",
                 "streamrec_serving_queue_depth", "streamrec_serving_model_info",
                 "streamrec_serving_fallbacks_total", "streamrec_serving_scoring_seconds_count",
                 "streamrec_serving_model_load_failed", "streamrec_serving_shed_total"):
        assert name in text, name
    assert metric(url, "streamrec_serving_model_info", version="v1") == 1
    assert metric(url, "streamrec_serving_scoring_seconds_count") > 0
    assert metric(url, "streamrec_serving_request_seconds_count", endpoint="/v1/recommendations",
                  outcome="ok") > 0

    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/recommendations", "/v1/events", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"])
    k = spec["components"]["schemas"]["RecommendationRequest"]["properties"]["k"]
    assert (k["minimum"], k["maximum"]) == (1, 1000)

    pre = httpx.options(f"{url}/v1/recommendations", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_no_model_yet_answers_popularity_and_is_not_ready(
        stack: LocalStack, store: SessionStore, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "empty")
    with serve(settings(admin_token=None), store=store, registry=registry) as srv:
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 503 and ready.json()["model_version"] is None
        sid = "s0"
        got = httpx.post(f"{srv.url}/v1/recommendations", json=body(sid, k=4)).json()
        assert got["fallback"] == "popularity" and got["fallback_reason"] == "no_model"
        expected, _ = popular_answer(store.popularity(100), 4, exclude=set(SESSIONS[sid]))
        assert [i["item_id"] for i in got["items"]] == expected
        assert metric(srv.url, "streamrec_serving_fallbacks_total", reason="no_model") == 1
        r = httpx.post(f"{srv.url}/admin/reload", headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and "ADMIN_TOKEN" in r.json()["detail"]

        publish(registry, tmp_path, "v1", seed=0)  # found by polling
        assert _wait(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200)
        got = httpx.post(f"{srv.url}/v1/recommendations", json=body(sid, k=4)).json()
        assert got["fallback"] is None and got["model_version"] == "v1"


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False
