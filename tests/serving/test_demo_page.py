"""The demo page and the routes it reads, over real Redis, a real broker and a real socket.

A real session updater (the ingest worker, on a thread) applies the page's
clicks; the drift timeline is written by the monitor's own handler. The
browser test drives Debian's Chromium with Playwright and skips, saying why,
when either is missing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from ingest_helpers import create_topic, produce
from serving_helpers import ITEMS, LiveServer, category, publish, serve, settings

from ingest.app import sessions_worker
from ingest.events import ClickEvent, encode_event
from ingest.kafka import Record, make_producer
from ingest.redis_conn import make_redis
from ingest.settings import IngestSettings, KafkaSettings
from ingest.store import SessionStore, StoreConfig
from model.registry import ModelRegistry
from serving.app import create_app
from serving.monitor import MonitorHandler, MonitorMetrics, OnlineMonitor, read_timeline
from serving.monitor_settings import MonitorSettings
from serving.online import ServedRecord, ServedRecorder
from streamrec.stack import LocalStack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@dataclass
class Demo:
    server: LiveServer
    store: SessionStore
    kafka: KafkaSettings


def _wait(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return got


def _write_timeline(client: redis.Redis, prefix: str, registry: ModelRegistry) -> None:
    """Drive the monitor's handler: a champion marker, eight points, an OOV alarm."""
    now = time.time()
    clocks = {"mono": 0.0, "wall": now - 60.0}
    settings = MonitorSettings(k=3, timeline_interval_s=5.0, item_window=30,
                               item_min_samples=30)
    monitor = OnlineMonitor(settings, MonitorMetrics(), clock=lambda: clocks["wall"])
    handler = MonitorHandler(monitor, client, prefix, registry, clock=lambda: clocks["mono"],
                             wall_clock=lambda: clocks["wall"])
    recorder = ServedRecorder(client, prefix)
    ts = int(now * 1000) - 600_000
    offset = 0
    for step in range(8):
        events = []
        for n in range(6):  # clicks on the top item in 6 - step of 6 sessions: HR falls
            sid = f"mon-{step}-{n}"
            recorder.record([(sid, ServedRecord(ts, "v1", None, 3, ("i1", "i2", "i3")))])
            item = ("i1" if n < 6 - step else "i9") if step < 6 else f"brand-new-{n}"
            events.append(ClickEvent(event_id=f"{sid}-e", session_id=sid, item_id=item,
                                     ts=ts + 1000))
        handler.handle([Record("events", 0, offset + n, ev.session_id.encode(),
                               encode_event(ev)) for n, ev in enumerate(events)])
        offset += len(events)
        clocks["mono"] += 5.0
        clocks["wall"] += 5.0


@pytest.fixture(scope="module")
def demo(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("demo")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    topic = f"ev.{uuid.uuid4().hex[:10]}"
    create_topic(stack.kafka, topic, 1)
    kafka = stack.kafka.model_copy(update={"events_topic": topic})
    redis_settings = stack.redis.model_copy(update={"key_prefix": prefix})
    registry = ModelRegistry(tmp / "registry")
    publish(registry, tmp, "v1", seed=0)

    # The real session updater, on a thread, fed some recent history through Kafka.
    worker, _ = sessions_worker(kafka, redis_settings, IngestSettings(
        sessions_group=f"sessions-{uuid.uuid4().hex[:8]}", poll_timeout_s=0.1))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    now_ms = time.time_ns() // 1_000_000
    history = [ClickEvent(event_id=f"h{n}", session_id=f"h{n % 12}",
                          item_id=ITEMS[min(n % 17, n % 11)], ts=now_ms - 60_000 + n,
                          features={"category": category(ITEMS[min(n % 17, n % 11)])})
               for n in range(120)]
    history.append(ClickEvent(event_id="fresh", session_id="h0", item_id="fresh-item",
                              ts=now_ms - 60_000))  # an item the model has never seen
    produce(kafka, topic, [(ev.session_id.encode(), encode_event(ev)) for ev in history])

    client = make_redis(redis_settings)
    store = SessionStore(client, StoreConfig(prefix=prefix))
    _wait(lambda: int(client.hget(f"{prefix}:{{h0}}:h", "n") or 0) == 11)
    _write_timeline(client, prefix, registry)
    try:
        with serve(settings(), store=store, registry=registry, producer=make_producer(kafka),
                   events_topic=topic) as server:
            _wait(lambda: len(httpx.get(f"{server.url}/v1/items").json()["items"]) == 12)
            yield Demo(server, store, kafka)
    finally:
        worker.stop()
        thread.join(30)
        client.close()


# --------------------------------------------------------------------------- the routes


def test_items_are_the_popular_ones_with_whether_the_model_knows_them(demo: Demo) -> None:
    got = httpx.get(f"{demo.server.url}/v1/items", params={"k": 5}).json()
    popular = demo.store.popularity(5)
    assert [i["item_id"] for i in got["items"]] == [i for i, _ in popular]
    assert [i["popularity"] for i in got["items"]] == pytest.approx([s for _, s in popular])
    assert [i["rank"] for i in got["items"]] == [1, 2, 3, 4, 5]
    assert all(i["in_model"] is True for i in got["items"])
    assert got["model_version"] == "v1" and got["popularity_age_s"] >= 0
    every = httpx.get(f"{demo.server.url}/v1/items", params={"k": 50}).json()["items"]
    assert len(every) == 12 and every[-1]["item_id"] == "fresh-item"  # clicked once, long ago
    assert [i["in_model"] for i in every] == [True] * 11 + [False]
    for bad in ({"k": 0}, {"k": 100_000}, {"k": "many"}):
        r = httpx.get(f"{demo.server.url}/v1/items", params=bad)
        assert r.status_code == 422 and r.json()["message"].startswith("query.k:"), r.text


def test_session_route_returns_stored_events_and_validates_the_id(demo: Demo) -> None:
    url = demo.server.url
    got = httpx.get(f"{url}/v1/sessions/h3").json()
    stored = demo.store.session("h3")
    assert got["session_id"] == "h3" and got["stored"] == len(stored) == 10
    assert [(e["event_id"], e["item_id"], e["ts"], e["event_type"]) for e in got["events"]] == [
        (e["event_id"], e["item_id"], e["ts"], e["event_type"]) for e in stored]
    assert got["events"][0]["features"] == {"category": stored[0]["category"]}
    last2 = httpx.get(f"{url}/v1/sessions/h3", params={"limit": 2}).json()
    assert last2["events"] == got["events"][-2:] and last2["stored"] == 10
    assert httpx.get(f"{url}/v1/sessions/nobody").json() == {
        "session_id": "nobody", "events": [], "stored": 0}
    too_long = httpx.get(f"{url}/v1/sessions/{'x' * 129}")
    assert too_long.status_code == 422
    assert too_long.json()["detail"] == {
        "reason": "too_long", "message": "session_id has 129 chars; the limit is 128"}
    assert httpx.get(f"{url}/v1/sessions/h3", params={"limit": 0}).status_code == 422


def test_timeline_route_returns_what_the_monitor_wrote(demo: Demo) -> None:
    url, store = demo.server.url, demo.store
    written = read_timeline(store.client, store.config.prefix)
    assert [e["kind"] for e in written][:2] == ["champion", "point"]
    assert "alarm" in {e["kind"] for e in written}
    got = httpx.get(f"{url}/v1/timeline").json()["entries"]
    assert got == written  # every field of every kind, nothing added
    cut = written[3]["ts"]
    assert httpx.get(f"{url}/v1/timeline", params={"since": cut}).json()["entries"] == [
        e for e in written if e["ts"] > cut]
    assert httpx.get(f"{url}/v1/timeline", params={"limit": 1}).json()["entries"] == written[-1:]
    assert httpx.get(f"{url}/v1/timeline", params={"since": -1}).status_code == 422


def test_openapi_lists_the_page_routes_with_their_models(demo: Demo) -> None:
    schema = httpx.get(f"{demo.server.url}/openapi.json").json()
    paths = schema["paths"]

    def ok_schema(path: str) -> dict[str, Any]:
        return paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]

    assert ok_schema("/v1/items") == {"$ref": "#/components/schemas/ItemsResponse"}
    assert ok_schema("/v1/sessions/{session_id}") == {
        "$ref": "#/components/schemas/SessionResponse"}
    assert ok_schema("/v1/timeline") == {"$ref": "#/components/schemas/TimelineResponse"}
    assert "text/html" in paths["/"]["get"]["responses"]["200"]["content"]
    kinds = schema["components"]["schemas"]["TimelineEntry"]["properties"]["kind"]
    assert kinds["enum"] == ["point", "alarm", "champion"]


def test_the_page_and_its_assets_are_served_and_can_be_turned_off(demo: Demo,
                                                                  tmp_path: Path) -> None:
    url = demo.server.url
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="static/app.js"' in page.text and "http" not in page.text.replace(
        "http-equiv", "")  # no absolute URL: nothing is loaded from elsewhere
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{url}/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "://" not in r.text.replace("http://www.w3.org/2000/svg", "")
    assert httpx.get(f"{url}/static/nothing.js").status_code == 404
    off = create_app(settings(demo_page=False), store=demo.store,
                     registry=ModelRegistry(tmp_path / "none"))
    paths = {getattr(r, "path", None) for r in off.routes}
    assert "/" not in paths and "/static" not in paths and "/v1/timeline" in paths


# --------------------------------------------------------------------------- the browser


def _playwright() -> Any:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package "
                    "(apt-get install chromium) to run the browser test")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]'")
    expect.set_options(timeout=20_000)
    return sync_playwright, expect


def test_the_page_in_headless_chromium(demo: Demo) -> None:
    # Waits go through locators (``expect``): the page's CSP forbids the eval that
    # ``wait_for_function`` needs, and that is how the page should be.
    sync_playwright, expect = _playwright()
    url = demo.server.url
    timeline = read_timeline(demo.store.client, demo.store.config.prefix)
    points = [e for e in timeline if e["kind"] == "point"]
    errors: list[str] = []
    foreign: list[str] = []
    with sync_playwright() as pw:
        # launch() starts Chromium on a fresh temporary profile (its --user-data-dir).
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith(
                "data:") else foreign.append(r.url))
            page.goto(url + "/")

            # Items to pick from: the popular ones; no session yet, so popularity answers.
            expect(page.locator("#popular button.item")).to_have_count(12)
            assert page.inner_text("#popular [data-item='fresh-item']") == "fresh-item new item"
            sid = page.input_value("#session-id")
            assert sid.startswith("web-")
            meta = page.locator("#recs-meta")
            expect(meta).to_have_attribute("data-fallback-reason", "unknown_session")
            assert "popularity fallback (unknown_session)" in meta.inner_text()

            # Click an item: it reaches the session through Kafka and the session updater,
            # the trail shows it, and the model answers the now-known session.
            first = page.locator("#popular button.item").first
            item = first.get_attribute("data-item")
            first.click()
            expect(meta).to_have_attribute("data-model-version", "v1")
            assert page.locator("#trail li").evaluate_all(
                "els => els.map(e => e.dataset.item)") == [item]
            assert "applied to the session" in page.inner_text("#status")
            assert "Answered by model v1" in meta.inner_text()
            recs = page.locator("#recs button.item").evaluate_all(
                "els => els.map(e => e.dataset.item)")
            assert len(recs) == 10 and item not in recs  # seen items are left out
            assert [e["item_id"] for e in demo.store.session(sid)] == [item]

            # A second click from the recommendations extends the trail.
            page.locator("#recs button.item").first.click()
            expect(page.locator("#trail li")).to_have_count(2)
            assert page.locator("#trail li").evaluate_all(
                "els => els.map(e => e.dataset.item)") == [item, recs[0]]

            # The charts draw the timeline: one vertex per point, the latest value in the
            # legend, champion and alarm markers.
            expect(page.locator("#chart-quality polyline[data-series='hr']")).to_have_count(1)
            vertices = page.locator("#chart-quality polyline[data-series='hr']").get_attribute(
                "points")
            assert len(vertices.split()) == len([p for p in points if p["hr"] is not None]) == 8
            legend = page.inner_text("#legend-quality [data-series='hr']")
            assert legend == f"HR@3 {points[-1]['hr']:.3f}", legend
            assert page.inner_text("#legend-rates [data-series='oov_rate']") == (
                f"OOV rate {points[-1]['oov_rate']:.3f}")
            assert page.locator("#chart-divergence polyline[data-series='psi']").count() == 1
            assert page.locator("#chart-quality line.marker.champion").count() == 1
            assert page.locator("#chart-quality line.marker.alarm").count() >= 1
            assert "alarm oov_rate" in page.inner_text("#markers")
            assert "alarms holding: oov_rate" in page.inner_text("#drift-status")

            # A new session starts empty.
            page.click("#new-session")
            assert page.input_value("#session-id") not in ("", sid)
            assert page.locator("#trail li").count() == 0
        finally:
            browser.close()
    assert errors == [], errors
    assert foreign == [], foreign

