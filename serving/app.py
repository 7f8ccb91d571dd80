"""The recommendation service: FastAPI app, batching, fallbacks, admin, metrics.

``create_app`` wires the parts (``docs/serving.md``):

- ``POST /v1/recommendations``: validated request -> the dynamic batcher ->
  :class:`Recommender` (one Redis read, one transform + forward for the batch)
  -> items, model version, fallback, latency. Over the latency budget or the
  queue bound: a fast 503 with ``Retry-After``.
- ``POST /v1/events``: click events checked against the event contract and
  produced to the events topic (202 once the broker acknowledged them).
- ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded
  and Redis answers), ``GET /metrics`` (Prometheus).
- ``GET /v1/items``, ``GET /v1/sessions/{id}``, ``GET /v1/timeline``: popular
  items, a session's stored events, the drift timeline; what the demo page
  (``GET /``, assets under ``/static/``) shows.
- ``/admin/*`` (bearer token): model status, reload, pin and unpin a version.

Requests never see a 500 for Redis trouble, a missing model or a scoring
error: they get popularity with ``fallback="popularity"`` and the reason.
"""

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import redis
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, create_model
from redis.exceptions import RedisClusterException

from ingest.events import ClickEvent, EventValidator, Rejection, RejectReason, encode_event
from ingest.kafka import Producer
from ingest.settings import EVENTS_TOPIC, IngestSettings, KafkaSettings, RedisSettings
from ingest.store import SessionStore
from model.registry import ModelRegistry
from serving.batcher import BatcherMetrics, DynamicBatcher, Overloaded
from serving.fallback import FallbackReason, PopularityCache, RedisBreaker, popular_answer
from serving.models import ModelHolder, ModelMetrics, admin_router, listen_for_promotions
from serving.monitor import read_timeline
from serving.online import ServedRecord, ServedRecorder
from serving.scorer import RecRequest
from serving.settings import ServingSettings

__all__ = ["Answer", "Recommender", "ServingMetrics", "build_app", "create_app"]

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.RedisError, RedisClusterException, OSError)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STATIC_DIR = Path(__file__).parent / "static"
# The demo page loads nothing from elsewhere; the policy makes the browser enforce it.
_PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

# Label values known in advance. ServingMetrics starts each of these series at 0: a
# series that first appears with its first increment is never seen to increase by
# Prometheus's rate() and increase().
#: ``op`` of ``streamrec_serving_redis_errors_total``: every Redis call that can fail.
REDIS_OPS = ("sessions", "served_record", "popularity", "session", "timeline")
#: ``outcome`` of ``streamrec_serving_request_seconds`` per API endpoint (see _outcome;
#: the series of other routes and outcomes appear with their first request).
API_OUTCOMES = {
    "/v1/recommendations": ("ok", "fallback", "invalid", "too_large", "unavailable", "error"),
    "/v1/events": ("ok", "invalid", "too_large", "unavailable", "error"),
}


def _rejected_outcome(reason: RejectReason) -> str:
    return f"rejected_{reason.value}"


#: ``outcome`` of ``streamrec_serving_events_total``.
EVENT_OUTCOMES = ("produced", "failed", *(_rejected_outcome(r) for r in RejectReason))


class ServingMetrics:
    """Every instrument of one app, on its own registry (several apps per process in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, ns = self.registry, "streamrec_serving"
        self.request_seconds = Histogram(f"{ns}_request_seconds", "HTTP request latency.",
                                         ["endpoint", "outcome"], buckets=_LATENCY_BUCKETS,
                                         registry=r)
        self.fallbacks = Counter(f"{ns}_fallbacks", "Answers from popularity, by reason.",
                                 ["reason"], registry=r)
        self.scoring_seconds = Histogram(f"{ns}_scoring_seconds",
                                         "Transform + forward + top-k of one batch.",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.redis_errors = Counter(f"{ns}_redis_errors", "Redis calls that failed.", ["op"],
                                    registry=r)
        self.events = Counter(f"{ns}_events", "POST /v1/events events, by outcome.",
                              ["outcome"], registry=r)
        self.popularity_age = Gauge(f"{ns}_popularity_age_seconds",
                                    "Age of the local popularity copy (-1: none yet).",
                                    registry=r)
        self.popularity_items = Gauge(f"{ns}_popularity_items",
                                      "Items in the local popularity copy.", registry=r)
        self.batcher = BatcherMetrics(r, prefix=ns)
        self.models = ModelMetrics(r, prefix=ns)
        for endpoint, outcomes in API_OUTCOMES.items():
            for outcome in outcomes:
                self.request_seconds.labels(endpoint, outcome)
        for reason in FallbackReason:
            self.fallbacks.labels(reason.value)
        for op in REDIS_OPS:
            self.redis_errors.labels(op)
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One request's answer; ``fallback_reason`` is ``None`` when the model answered."""

    items: list[Any]
    scores: list[float]
    model_version: str | None
    fallback_reason: FallbackReason | None


class Recommender:
    """The batch function: requests in, one :class:`Answer` each, in order.

    One pipelined Redis read for the batch's sessions, then the model serving
    now (read once: a swap mid-batch does not affect it), then the served
    record (best effort). Scoring errors are raised: the batcher hands them to
    every request of the batch and the endpoint answers each from popularity.
    """

    def __init__(self, holder: ModelHolder, store: SessionStore, popularity: PopularityCache,
                 breaker: RedisBreaker, recorder: ServedRecorder | None,
                 metrics: ServingMetrics | None = None):
        self.holder = holder
        self.store = store
        self.popularity = popularity
        self.breaker = breaker
        self.recorder = recorder
        self.metrics = metrics

    def fallback(self, req: RecRequest, reason: FallbackReason,
                 session: Sequence[dict[str, Any]] = ()) -> Answer:
        seen = {ev.get("item_id") for ev in session} if req.exclude_seen else set()
        items, scores = popular_answer(self.popularity.items, req.k, seen, req.candidates)
        return Answer(items, scores, None, reason)

    def __call__(self, requests: list[RecRequest]) -> list[Answer]:
        loaded = self.holder.current
        sessions = self._read_sessions(requests)
        if sessions is None:
            return [self.fallback(r, FallbackReason.REDIS_UNAVAILABLE) for r in requests]
        if loaded is None:
            answers = [self.fallback(r, FallbackReason.NO_MODEL, sessions.get(r.session_id, ()))
                       for r in requests]
        else:
            start = time.perf_counter()
            scored = loaded.scorer(requests, sessions)
            if self.metrics:
                self.metrics.scoring_seconds.observe(time.perf_counter() - start)
            answers = [Answer([str(i) for i in s.items], s.scores, loaded.version, None)
                       if s is not None else self.fallback(r, FallbackReason.UNKNOWN_SESSION)
                       for r, s in zip(requests, scored, strict=True)]
        self._record(requests, answers)
        return answers

    def _read_sessions(self, requests: list[RecRequest]) -> dict[str, Any] | None:
        if not self.breaker.allow():
            return None
        try:
            sessions = self.store.sessions(dict.fromkeys(r.session_id for r in requests))
        except _REDIS_ERRORS as e:
            self.breaker.failure()
            self._count_redis_error("sessions")
            logger.warning("Redis read failed, answering from popularity for %.1fs: %s",
                           self.breaker.retry_s, e)
            return None
        self.breaker.success()
        return sessions

    def _record(self, requests: list[RecRequest], answers: list[Answer]) -> None:
        if self.recorder is None:
            return
        now_ms = time.time_ns() // 1_000_000
        try:
            self.recorder.record(
                (r.session_id, ServedRecord(now_ms, a.model_version, a.fallback_reason, r.k,
                                            tuple(a.items)))
                for r, a in zip(requests, answers, strict=True))
        except _REDIS_ERRORS as e:
            self._count_redis_error("served_record")
            logger.debug("served record not written: %s", e)

    def _count_redis_error(self, op: str) -> None:
        if self.metrics:
            self.metrics.redis_errors.labels(op).inc()


# -- request / response models ---------------------------------------------------------


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendationResponse(BaseModel):
    items: list[ScoredItem] = Field(description="best first")
    model_version: str | None = Field(description="the version that answered; null on fallback")
    fallback: Literal["popularity"] | None = Field(
        description="null when the model answered, else the strategy that did")
    fallback_reason: FallbackReason | None = Field(description="why the fallback answered")
    latency_ms: float = Field(description="time spent in the server")


class ItemInfo(BaseModel):
    item_id: str
    rank: int = Field(description="1 = the most popular")
    popularity: float = Field(description="decayed click count (docs/redis-layout.md)")
    in_model: bool | None = Field(
        description="in the serving model's vocabulary (false: a new item the model cannot "
        "recommend yet); null while no model is loaded")


class ItemsResponse(BaseModel):
    items: list[ItemInfo] = Field(description="most popular first")
    model_version: str | None = Field(description="the version serving now")
    popularity_age_s: float | None = Field(
        description="age of the server's copy of popularity; null before the first copy")


class SessionEvent(BaseModel):
    event_id: str
    item_id: str
    ts: int = Field(description="event time, ms since epoch")
    event_type: str
    user_id: str | None = None
    features: dict[str, str | int | float] = Field(default_factory=dict,
                                                   description="side features")


class SessionResponse(BaseModel):
    session_id: str
    events: list[SessionEvent] = Field(description="the last `limit` stored events, oldest "
                                       "first; empty for an unknown or expired session")
    stored: int = Field(description="events the store holds for the session")


class ActiveAlarm(BaseModel):
    detector: str
    model_version: str


class AlarmInfo(BaseModel):
    detector: str
    statistic: float | None
    threshold: float | None
    model_version: str = Field(description="the version the alarm is about")
    samples: int


class VersionQuality(BaseModel):
    model_version: str = Field(description='"none" for fallback answers')
    answer: Literal["model", "fallback"]
    hr: float | None
    ndcg: float | None
    window: int = Field(description="scored clicks behind hr and ndcg")
    scored: int = Field(description="clicks scored since the monitor started")
    hits: int


class TimelineEntry(BaseModel):
    """One drift timeline entry (docs/drift.md); fields not of its kind are left out."""

    kind: Literal["point", "alarm", "champion"]
    ts: float = Field(description="wall-clock seconds since epoch")
    model_version: str | None = Field(description="the champion (the new one, for a "
                                      "champion entry)")
    k: int | None = None
    hr: float | None = Field(None, description="the champion's online HR@k (last window)")
    ndcg: float | None = Field(None, description="the champion's online NDCG@k (last window)")
    window: int | None = None
    scored: int | None = Field(None, description="model answers scored, cumulative")
    hits: int | None = Field(None, description="of which hits, cumulative")
    psi: float | None = None
    js: float | None = None
    oov_rate: float | None = None
    session_length_ks: float | None = None
    alarms: list[ActiveAlarm] | None = Field(None, description="alarms holding")
    versions: list[VersionQuality] | None = None
    alarm: AlarmInfo | None = Field(None, description="kind alarm: the alarm raised")
    previous: str | None = Field(None, description="kind champion: the champion before")


class TimelineResponse(BaseModel):
    entries: list[TimelineEntry] = Field(description="oldest first")


def _request_model(s: ServingSettings) -> type[BaseModel]:
    """The recommendation request with the configured limits (shown in the OpenAPI schema)."""
    item = Annotated[str, Field(min_length=1, max_length=s.max_item_id_len)]  # one candidate
    return create_model(
        "RecommendationRequest",
        __config__=ConfigDict(strict=True, extra="forbid"),
        session_id=(str, Field(min_length=1, max_length=s.max_session_id_len)),
        k=(int, Field(10, ge=1, le=s.max_k, description="how many items")),
        exclude_seen=(bool, Field(True, description="leave out the session's stored items")),
        candidates=(list[item] | None, Field(None, max_length=s.max_candidates,
                                             description="answer only among these items")),
    )


# -- middleware ------------------------------------------------------------------------


def _outcome(status: int, declared: str | None) -> str:
    if status < 400:
        return declared or "ok"
    return {401: "unauthorized", 403: "forbidden", 413: "too_large", 422: "invalid",
            503: "unavailable"}.get(status, "client_error" if status < 500 else "error")


class _LimitsAndMetrics:
    """ASGI middleware: 413 for bodies over ``max_body_bytes``, and the request histogram."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: ServingMetrics,
                 paths: set[str]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.paths = paths  # the app's routes: the label of requests refused before routing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(send, int(declared))
            self._observe(scope, 413, start)
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body over {limit} bytes; send less")
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        finally:
            self._observe(scope, status[0], start)

    async def _too_large(self, send: Any, size: int) -> None:
        body = msgspec.json.encode({"detail": f"request body is {size} bytes; the limit is "
                                    f"{self.max_body_bytes} (STREAMREC_SERVING_MAX_BODY_BYTES)"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: dict[str, Any], status: int, start: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or (
            scope["path"] if scope["path"] in self.paths else "other")
        declared = (scope.get("state") or {}).get("outcome")
        self.metrics.request_seconds.labels(endpoint, _outcome(status, declared)).observe(
            time.perf_counter() - start)


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


# -- the app ---------------------------------------------------------------------------


def create_app(settings: ServingSettings, *, store: SessionStore, registry: ModelRegistry,
               producer: Producer | None = None, events_topic: str = EVENTS_TOPIC,
               validator: EventValidator | None = None, device: torch.device | str = "cpu",
               metrics: ServingMetrics | None = None) -> FastAPI:
    """The service; background work (batcher, model watch, cache refresh) runs in its lifespan.

    ``store.client`` is also used for ``/readyz``, the served record and the
    promotion notifications. Without ``producer`` ``/v1/events`` answers 503.
    """
    m = metrics or ServingMetrics()
    validator = validator or EventValidator()
    holder = ModelHolder(registry, device, m.models, pre_ranking=settings.pre_ranking())
    popularity = PopularityCache(lambda: store.popularity(settings.popularity_size))
    breaker = RedisBreaker(settings.redis_retry_s)
    recorder = ServedRecorder(store.client, store.config.prefix, ttl_s=settings.served_ttl_s,
                              keep=settings.served_keep, max_items=settings.served_items)
    recommender = Recommender(holder, store, popularity, breaker, recorder, m)
    pool = ThreadPoolExecutor(8, thread_name_prefix="serving-io")  # off the batcher's threads
    batcher: DynamicBatcher[RecRequest, Answer] = DynamicBatcher(
        recommender, settings.batching(), metrics=m.batcher)

    async def blocking(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def watch_models(wake: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), settings.registry_poll_s)
            wake.clear()
            try:
                await blocking(holder.check)
            except Exception as e:  # the registry unreadable: keep serving, try again later
                logger.warning("reading the model registry failed: %s", e)

    async def refresh_popularity() -> None:
        while True:
            await asyncio.sleep(settings.popularity_refresh_s)
            await blocking(refresh_cache)

    def refresh_cache() -> None:
        if not popularity.refresh():
            m.redis_errors.labels("popularity").inc()
        age = popularity.age_s()
        m.popularity_age.set(-1 if age is None else age)
        m.popularity_items.set(len(popularity.items))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        wake, stop = asyncio.Event(), threading.Event()
        await blocking(refresh_cache)
        try:
            await blocking(holder.check)
        except Exception as e:
            logger.warning("reading the model registry failed: %s", e)
        listener = threading.Thread(
            target=listen_for_promotions, name="serving-promotions",
            args=(store.client, settings.notify_channel,
                  lambda _v: loop.call_soon_threadsafe(wake.set), stop), daemon=True)
        listener.start()
        batcher.start()
        tasks = [asyncio.create_task(watch_models(wake)), asyncio.create_task(refresh_popularity())]
        logger.info("serving; model %s", holder.current.version if holder.current else None)
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await batcher.close()
            stop.set()
            if producer is not None:
                await blocking(producer.close, settings.events_flush_timeout_s)
            listener.join(2.0)
            pool.shutdown(wait=False)

    app = FastAPI(title="streamrec", version="1", lifespan=lifespan,
                  description="Session-based recommendations from the live session store.")
    app.state.holder, app.state.recommender, app.state.metrics = holder, recommender, m
    paths: set[str] = set()  # filled once the routes are defined
    app.add_middleware(_LimitsAndMetrics, max_body_bytes=settings.max_body_bytes, metrics=m,
                       paths=paths)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: e.get(k) for k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors, "message": _validation_message(errors)}, 422)

    # -- recommendations ---------------------------------------------------------------

    request_model = _request_model(settings)

    async def recommend(body: request_model, request: Request  # type: ignore[valid-type]
                        ) -> RecommendationResponse | JSONResponse:
        start = time.perf_counter()
        req = RecRequest(body.session_id, body.k, body.exclude_seen,
                         None if body.candidates is None else tuple(body.candidates))
        try:
            answer = await batcher.submit(req)
        except Overloaded as e:
            return JSONResponse({"detail": f"overloaded ({e.reason}): {e}; retry shortly",
                                 "reason": e.reason}, 503, headers={"Retry-After": "1"})
        except Exception:
            logger.exception("scoring a batch failed; answering from popularity")
            answer = recommender.fallback(req, FallbackReason.MODEL_ERROR)
        if answer.fallback_reason is not None:
            m.fallbacks.labels(answer.fallback_reason.value).inc()
            request.state.outcome = "fallback"
        return RecommendationResponse(
            items=[ScoredItem(item_id=str(i), score=s)
                   for i, s in zip(answer.items, answer.scores, strict=True)],
            model_version=answer.model_version,
            fallback=None if answer.fallback_reason is None else "popularity",
            fallback_reason=answer.fallback_reason,
            latency_ms=round(1e3 * (time.perf_counter() - start), 3))

    app.post("/v1/recommendations", response_model=RecommendationResponse,
             responses={503: {"description": "overloaded: retry after Retry-After seconds"}},
             summary="Top-k items for a session")(recommend)

    # -- events ------------------------------------------------------------------------

    def produce(events: list[ClickEvent]) -> None:
        assert producer is not None
        for ev in events:
            producer.produce(events_topic, encode_event(ev), key=ev.session_id.encode())
        if producer.flush(settings.events_flush_timeout_s):
            raise TimeoutError(f"the broker did not acknowledge within "
                               f"{settings.events_flush_timeout_s}s")

    @app.post("/v1/events", status_code=202, summary="Send click events (for clients "
              "without a Kafka producer)", openapi_extra={"requestBody": {"required": True,
              "content": {"application/json": {"schema": {
                  "description": "one event object or an array of them (docs/events.md)",
                  "example": {"event_id": "e1", "session_id": "s1", "item_id": "i9",
                              "ts": 1700000000000, "event_type": "click"}}}}}})
    async def post_events(request: Request) -> dict[str, int]:
        try:
            doc = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as e:
            raise HTTPException(422, {"reason": "invalid_json",
                                      "message": f"body is not JSON: {e}"}) from None
        docs = doc if isinstance(doc, list) else [doc]
        if not 1 <= len(docs) <= settings.max_events_per_request:
            raise HTTPException(422, {"reason": "too_many_events", "message": (
                f"send 1 to {settings.max_events_per_request} events, got {len(docs)}")})
        events = []
        for i, d in enumerate(docs):
            ev = validator.validate(d)
            if isinstance(ev, Rejection):
                m.events.labels(_rejected_outcome(ev.reason)).inc()
                where = f"event {i}: " if isinstance(doc, list) else ""
                raise HTTPException(422, {"reason": ev.reason.value, "index": i,
                                          "message": where + ev.detail})
            events.append(ev)
        if producer is None:
            raise HTTPException(503, "no Kafka producer: set STREAMREC_KAFKA_BOOTSTRAP")
        try:
            await blocking(produce, events)
        except Exception as e:
            m.events.labels("failed").inc(len(events))
            raise HTTPException(503, f"events not accepted by the broker, retry: {e}") from None
        m.events.labels("produced").inc(len(events))
        return {"accepted": len(events)}

    # -- what the demo page reads -------------------------------------------------------

    def redis_unavailable(what: str, e: Exception) -> HTTPException:
        m.redis_errors.labels(what).inc()
        return HTTPException(503, f"Redis unavailable, retry: {e}")

    @app.get("/v1/items", response_model=ItemsResponse, summary="The most popular items")
    async def list_items(k: Annotated[int, Query(ge=1, le=settings.max_k,
                                                 description="how many")] = 20) -> ItemsResponse:
        popular = popularity.items[:k]
        loaded = holder.current

        def known() -> list[bool] | None:
            if loaded is None or not popular:
                return None
            ids = loaded.scorer.encode_items([i for i, _ in popular])
            return (ids >= loaded.scorer.model.first_item_id).tolist()

        in_model = await blocking(known)
        age = popularity.age_s()
        return ItemsResponse(
            items=[ItemInfo(item_id=i, rank=n + 1, popularity=score,
                            in_model=None if in_model is None else in_model[n])
                   for n, (i, score) in enumerate(popular)],
            model_version=loaded.version if loaded else None,
            popularity_age_s=None if age is None else round(age, 3))

    session_fields = {"event_id", "item_id", "ts", "event_type", "user_id"}

    @app.get("/v1/sessions/{session_id:path}", response_model=SessionResponse,
             summary="A session's stored events",
             responses={422: {"description": "session_id breaks the event contract"},
                        503: {"description": "Redis unavailable"}})
    async def get_session(session_id: str, limit: Annotated[int, Query(
            ge=1, le=10_000, description="the last this many events")] = 50) -> SessionResponse:
        if len(session_id) > validator.max_id_len:  # the event contract's limit
            raise HTTPException(422, {"reason": "too_long", "message": (
                f"session_id has {len(session_id)} chars; the limit is {validator.max_id_len}")})
        try:
            stored = await blocking(store.session, session_id)
        except _REDIS_ERRORS as e:
            raise redis_unavailable("session", e) from None
        events = [SessionEvent(**{k: v for k, v in ev.items() if k in session_fields},
                               features={k: v for k, v in ev.items() if k not in session_fields})
                  for ev in stored[-limit:]]
        return SessionResponse(session_id=session_id, events=events, stored=len(stored))

    @app.get("/v1/timeline", response_model=TimelineResponse, response_model_exclude_unset=True,
             summary="The drift monitor's timeline (docs/drift.md)",
             responses={503: {"description": "Redis unavailable"}})
    async def timeline(
        since: Annotated[float | None, Query(ge=0, description="only entries with a later ts "
                                             "(seconds); all without it")] = None,
        limit: Annotated[int | None, Query(ge=1, le=1_000_000,
                                           description="the newest this many")] = None,
    ) -> dict[str, Any]:
        try:
            entries = await blocking(read_timeline, store.client, store.config.prefix, since,
                                     limit)
        except _REDIS_ERRORS as e:
            raise redis_unavailable("timeline", e) from None
        return {"entries": entries}

    if settings.demo_page and not (STATIC_DIR / "index.html").is_file():
        logger.warning("the demo page is not installed (no %s; the package was installed "
                       "without its data files): / is not served", STATIC_DIR / "index.html")
    elif settings.demo_page:
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", response_class=HTMLResponse, summary="The demo page (docs/serving.md)")
        async def demo_page() -> HTMLResponse:
            return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP,
                                               "Cache-Control": "no-cache"})

    # -- health and metrics ------------------------------------------------------------

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and Redis answers",
             responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        def ping() -> bool:
            try:
                return bool(store.client.ping())
            except _REDIS_ERRORS:
                return False

        cur = holder.current
        redis_ok = await blocking(ping)
        ready = cur is not None and redis_ok
        return JSONResponse({"ready": ready, "model_version": cur.version if cur else None,
                             "redis": redis_ok}, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        age = popularity.age_s()
        m.popularity_age.set(-1 if age is None else age)
        m.batcher.queue_depth.set(batcher.queue_depth)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin_router(holder, settings.admin_token, blocking))

    paths.update(getattr(r, "path", "") for r in app.routes)
    return app


def build_app(serving: ServingSettings, kafka: KafkaSettings, redis_settings: RedisSettings,
              ingest: IngestSettings) -> FastAPI:
    """The app from settings (what ``streamrec serve`` runs)."""
    from ingest.app import store_from_settings
    from ingest.kafka import make_producer

    device = serving.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("STREAMREC_SERVING_DEVICE=cuda but no CUDA device is visible; use cpu")
    return create_app(
        serving, store=store_from_settings(redis_settings, ingest),
        registry=ModelRegistry(serving.models_root),
        producer=make_producer(kafka) if kafka.bootstrap else None,
        events_topic=kafka.events_topic,
        validator=EventValidator(max_future_ms=int(ingest.max_future_skew_s * 1000)),
        device=device, metrics=ServingMetrics())
