"""The model holder: which version serves, and the atomic swap to a new champion.

The registry (``model/registry.py``) holds immutable versions and a ``CURRENT``
pointer. :class:`ModelHolder` serves the version the pointer names, or the one
an operator pinned:

1. :meth:`ModelHolder.check` reads the target (pin, else ``CURRENT``); when it
   differs from the version being served it loads the new one *beside* the old
   one (the old keeps answering meanwhile);
2. the new version is smoke-tested: it must score a dummy session and give
   finite scores;
3. one reference assignment makes it current. A batch reads the reference once
   when it starts, so a batch in flight finishes on the version it began with
   and no request fails during a swap.

A version that cannot be loaded (corrupt file, incompatible config, failed
smoke test) is not retried until the pointer moves or an operator asks
(:meth:`reload`); the old version keeps serving and the alert gauge
``streamrec_serving_model_load_failed`` is 1 until a load succeeds.

The server calls :meth:`check` every ``registry_poll_s`` and at once when a
message arrives on the Redis channel ``notify_channel`` (:func:`notify_promotion`
publishes one; :func:`listen_for_promotions` receives them). Loading runs in a
worker thread; :meth:`check`, :meth:`pin` and :meth:`unpin` are serialised by
a lock. :func:`admin_router` exposes them over HTTP behind a bearer token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import redis
import torch
from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from redis.cluster import RedisCluster

from model.preranker import PreRankConfig, load_preranker
from model.registry import ModelRegistry
from serving.scorer import RecRequest, Scorer

PRERANKER_DIR = "preranker"  # inside a model version directory

__all__ = ["LoadedModel", "ModelHolder", "ModelLoadError", "ModelMetrics", "admin_router",
           "listen_for_promotions", "notify_promotion"]

logger = logging.getLogger(__name__)

SMOKE_SESSION = "__streamrec_smoke__"


class ModelLoadError(RuntimeError):
    """A version could not be loaded or failed its smoke test; the message says why."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A version ready to score; replaced whole, never changed."""

    version: str
    scorer: Scorer
    loaded_at: float  # wall-clock seconds


class ModelMetrics:
    """Prometheus instruments of the holder (registered on ``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 prefix: str = "streamrec_serving"):
        self.info = Gauge(f"{prefix}_model_info", "1 for the model version being served.",
                          ["version"], registry=registry)
        self.load_failed = Gauge(
            f"{prefix}_model_load_failed",
            "Alert: 1 while the wanted version could not be loaded (the old one serves).",
            registry=registry)
        self.load_failures = Counter(f"{prefix}_model_load_failures",
                                     "Model versions that failed to load or smoke-test.",
                                     registry=registry)
        self.swaps = Counter(f"{prefix}_model_swaps", "Model versions swapped in.",
                             registry=registry)
        self.load_seconds = Histogram(f"{prefix}_model_load_seconds",
                                      "Time to load and smoke-test a version.",
                                      buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                      registry=registry)


def smoke_test(scorer: Scorer) -> None:
    """Score a one-event dummy session; raise :class:`ModelLoadError` unless it works."""
    workflow = scorer.workflow
    item_column = workflow.schema[scorer.model.item_feature].source_column
    event = {workflow.ts_col: 0, item_column: SMOKE_SESSION}
    try:
        out = scorer([RecRequest(SMOKE_SESSION, k=1, exclude_seen=False)],
                     {SMOKE_SESSION: [event]})
    except Exception as e:
        raise ModelLoadError(f"version {scorer.version} failed its smoke test: {e!r}") from e
    answer = out[0] if len(out) == 1 else None
    if answer is None or not answer.items or not all(map(math.isfinite, answer.scores)):
        raise ModelLoadError(f"version {scorer.version} failed its smoke test: "
                             f"no finite score for a dummy session (got {answer})")


class ModelHolder:
    """Serves one model version at a time; see the module docstring.

    Args:
        registry: where versions and the ``CURRENT`` pointer live.
        device: where models run.
        metrics: Prometheus instruments; ``None`` = none.
        clock: wall-clock seconds (``loaded_at``).
        pre_ranking: with ``pre_ranker="inttower"`` every version must carry its
            pre-ranker in ``<version>/preranker/`` (model/preranker.py
            ``save_preranker``); a version without one is not served.
    """

    def __init__(self, registry: ModelRegistry, device: torch.device | str = "cpu",
                 metrics: ModelMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 pre_ranking: PreRankConfig | None = None):
        self.registry = registry
        self.pre_ranking = pre_ranking or PreRankConfig()
        self.device = torch.device(device)
        self._metrics = metrics
        self._clock = clock
        self._current: LoadedModel | None = None
        self._pinned: str | None = None
        self._failed: dict[str, str] = {}  # version -> why it could not be loaded
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        """The version serving now (read it once per batch)."""
        return self._current

    @property
    def pinned(self) -> str | None:
        return self._pinned

    def status(self) -> dict[str, Any]:
        """What the admin endpoint shows."""
        cur = self._current
        try:
            pointer: str | None = self.registry.current()
        except Exception as e:  # an unreachable object store must not break the status page
            pointer = f"unreadable: {e}"
        return {"version": cur.version if cur else None, "pinned": self._pinned,
                "registry_current": pointer, "failed": dict(self._failed),
                "loaded_at": cur.loaded_at if cur else None}

    # -- loading -----------------------------------------------------------------------

    def check(self, *, force: bool = False) -> str | None:
        """Load the target version if it is not the one serving; returns the serving version.

        A version that failed before is skipped unless ``force``. Never raises
        for a bad version (it is logged, counted and remembered); raises only
        what reading the pointer raises.
        """
        with self._lock:
            target = self._pinned or self.registry.current()
            cur = self._current
            if target is None or (cur is not None and cur.version == target):
                if cur is not None and cur.version == target:
                    self._set_alert(False)
                return cur.version if cur else None
            if target in self._failed and not force:
                return cur.version if cur else None
            with contextlib.suppress(ModelLoadError):  # logged, counted, remembered
                self._swap_in(target)
            cur = self._current
            return cur.version if cur else None

    def pin(self, version: str) -> LoadedModel:
        """Serve ``version`` whatever ``CURRENT`` says; raises :class:`ModelLoadError`."""
        with self._lock:
            if not self.registry.has(version):
                raise ModelLoadError(f"no version {version!r} in {self.registry.root}; "
                                     f"known: {self.registry.versions()[-5:]}")
            cur = self._current
            loaded = cur if cur is not None and cur.version == version else self._swap_in(version)
            self._pinned = version
            return loaded

    def unpin(self) -> str | None:
        """Follow ``CURRENT`` again; returns the serving version."""
        with self._lock:
            self._pinned = None
        return self.check(force=True)

    def reload(self) -> str | None:
        """Try the target again even if it failed before (an operator fixed it)."""
        with self._lock:
            self._failed.clear()
        return self.check(force=True)

    def _swap_in(self, version: str) -> LoadedModel:
        start = time.perf_counter()
        try:
            checkpoint = self.registry.load(version, device=self.device)
            preranker = None
            if self.pre_ranking.pre_ranker == "inttower":
                path = self.registry.local_path(version) / PRERANKER_DIR
                if not path.is_dir():
                    raise ModelLoadError(f"pre_ranker is inttower but the version has no "
                                         f"{PRERANKER_DIR}/ (save one with save_preranker)")
                preranker = load_preranker(path, device=self.device)
            scorer = Scorer(checkpoint, version, self.device, preranker=preranker,
                            top_n=self.pre_ranking.top_n)
            smoke_test(scorer)
        except Exception as e:
            why = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
            self._failed[version] = why
            self._set_alert(True)
            if self._metrics:
                self._metrics.load_failures.inc()
            old = self._current.version if self._current else None
            logger.error("model version %s cannot be served (still serving %s): %s",
                         version, old, why)
            raise ModelLoadError(f"version {version}: {why}") from e
        loaded = LoadedModel(version, scorer, self._clock())
        old = self._current
        self._current = loaded  # the swap: one reference assignment
        self._failed.pop(version, None)
        self._set_alert(False)
        if self._metrics:
            self._metrics.load_seconds.observe(time.perf_counter() - start)
            self._metrics.swaps.inc()
            self._metrics.info.labels(version).set(1)
            if old is not None and old.version != version:
                self._metrics.info.remove(old.version)
        logger.info("serving model version %s (was %s), loaded in %.2fs", version,
                    old.version if old else None, time.perf_counter() - start)
        return loaded

    def _set_alert(self, on: bool) -> None:
        if self._metrics:
            self._metrics.load_failed.set(1 if on else 0)


# -- notifications ---------------------------------------------------------------------


def notify_promotion(client: redis.Redis | RedisCluster, channel: str, version: str) -> int:
    """Tell running servers that ``version`` was promoted; returns how many heard it."""
    return int(client.publish(channel, version))


def listen_for_promotions(client: redis.Redis | RedisCluster, channel: str,
                          on_message: Callable[[str], None], stop: threading.Event,
                          retry_s: float = 1.0) -> None:
    """Call ``on_message(version)`` for each notification until ``stop`` is set.

    Runs in a thread; reconnects after Redis errors (polling still covers an
    outage: a missed notification only delays the swap to the next poll).
    """
    while not stop.is_set():
        pubsub = None
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg and msg.get("type") == "message":
                    data = msg["data"]
                    on_message(data.decode() if isinstance(data, bytes) else str(data))
        except (redis.RedisError, OSError) as e:
            logger.debug("promotion listener: %s; retrying in %.1fs", e, retry_s)
            stop.wait(retry_s)
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:
                    logger.debug("closing the pub/sub connection failed", exc_info=True)


# -- admin endpoints -------------------------------------------------------------------


class PinRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    version: str = Field(min_length=1, max_length=128)


_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def admin_router(holder: ModelHolder, token: SecretStr | None,
                 run: Callable[..., Awaitable[Any]]) -> APIRouter:
    """``/admin/*``: status, reload, pin, unpin; every route needs ``Bearer <token>``.

    ``token`` ``None`` disables them (403). ``run(fn, *args)`` runs blocking
    work off the event loop.
    """

    def check_token(cred: Credentials) -> None:
        if token is None:
            raise HTTPException(403, "admin endpoints are disabled: set "
                                     "STREAMREC_SERVING_ADMIN_TOKEN")
        given = cred.credentials.encode() if cred is not None else b""
        if not hmac.compare_digest(given, token.get_secret_value().encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(check_token)])

    @router.get("/model", summary="Which version serves, and why not another")
    async def model_status() -> dict[str, Any]:
        return await run(holder.status)

    @router.post("/reload", summary="Load the target version now, even one that failed")
    async def reload() -> dict[str, Any]:
        await run(holder.reload)
        status = await run(holder.status)
        target = status["pinned"] or status["registry_current"]
        if target in status["failed"]:
            raise HTTPException(409, {"message": f"version {target} cannot be served: "
                                      f"{status['failed'][target]}", "status": status})
        return status

    @router.post("/pin", summary="Serve this version whatever CURRENT says")
    async def pin(body: PinRequest) -> dict[str, Any]:
        if not await run(holder.registry.has, body.version):
            raise HTTPException(404, f"no version {body.version!r} in {holder.registry.root}")
        try:
            await run(holder.pin, body.version)
        except ModelLoadError as e:
            raise HTTPException(409, str(e)) from None
        return await run(holder.status)

    @router.post("/unpin", summary="Follow CURRENT again")
    async def unpin() -> dict[str, Any]:
        await run(holder.unpin)
        return await run(holder.status)

    return router
