"""Fallbacks: popularity from a local cache, and a breaker that keeps Redis errors fast.

The server answers from popularity whenever the model cannot (``docs/serving.md``):
the session is unknown or empty, no model is loaded yet, Redis is unreachable,
or scoring failed. Popularity is the ingest's decayed item counts
(``SessionStore.popularity``), copied into a :class:`PopularityCache` every
``popularity_refresh_s``: a request never reads it from Redis, so the fallback
still works, unchanged, while Redis is down (the copy is kept when a refresh
fails).

:class:`RedisBreaker` stops every batch from paying a connect timeout during an
outage: after an error, Redis is skipped for ``retry_s`` (answers come from the
cache), then the next batch tries again.

>>> popular_answer([("a", 3.0), ("b", 2.0), ("c", 1.0)], k=2, exclude={"a"})
(['b', 'c'], [2.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence

__all__ = ["FallbackReason", "PopularityCache", "RedisBreaker", "popular_answer"]

logger = logging.getLogger(__name__)


class FallbackReason(enum.StrEnum):
    """Why an answer came from popularity (the ``fallback_reason`` of the API)."""

    UNKNOWN_SESSION = "unknown_session"  # no stored events for the session
    NO_MODEL = "no_model"  # no model version loaded yet
    REDIS_UNAVAILABLE = "redis_unavailable"  # sessions could not be read
    MODEL_ERROR = "model_error"  # scoring the batch raised


def popular_answer(popular: Sequence[tuple[str, float]], k: int,
                   exclude: Collection[str] = (),
                   candidates: Sequence[str] | None = None) -> tuple[list[str], list[float]]:
    """Top-``k`` of ``popular`` (best first), without ``exclude``.

    With ``candidates``, only those items are answered: the ones in
    ``popular`` by popularity, then the others (never seen recently enough
    to be counted) with score 0.0 in the order given.

    >>> pop = [("a", 3.0), ("b", 2.0), ("c", 1.0)]
    >>> popular_answer(pop, k=3, candidates=["z", "c", "a", "c"])
    (['a', 'c', 'z'], [3.0, 1.0, 0.0])
    >>> popular_answer(pop, k=1, exclude={"a"}, candidates=["a", "b"])
    (['b'], [2.0])
    """
    items: list[str] = []
    scores: list[float] = []
    if candidates is None:
        for item, score in popular:
            if len(items) >= k:
                break
            if item not in exclude:
                items.append(item)
                scores.append(score)
        return items, scores
    wanted = dict.fromkeys(c for c in candidates if c not in exclude)
    for item, score in popular:
        if len(items) >= k or not wanted:
            break
        if item in wanted:
            del wanted[item]
            items.append(item)
            scores.append(score)
    for item in wanted:
        if len(items) >= k:
            break
        items.append(item)
        scores.append(0.0)
    return items, scores


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    items: tuple[tuple[str, float], ...]
    loaded_at: float | None  # clock() of the last successful refresh; None = never


class PopularityCache:
    """A local copy of the most popular items, replaced whole on each refresh.

    Args:
        load: reads the current popularity (best first); may raise (Redis down).
        clock: monotonic seconds (a fake one in tests).

    Readers get one immutable snapshot (a single reference swap), so no lock
    is needed on the request path.

    >>> cache = PopularityCache(lambda: [("x", 1.0)])
    >>> cache.items
    ()
    >>> cache.refresh()
    True
    >>> cache.items
    (('x', 1.0),)
    """

    def __init__(self, load: Callable[[], Sequence[tuple[str, float]]],
                 clock: Callable[[], float] = time.monotonic):
        self._load = load
        self._clock = clock
        self._snapshot = _Snapshot((), None)
        self.failures = 0

    @property
    def items(self) -> tuple[tuple[str, float], ...]:
        return self._snapshot.items

    def age_s(self) -> float | None:
        """Seconds since the last successful refresh (``None``: never refreshed)."""
        at = self._snapshot.loaded_at
        return None if at is None else self._clock() - at

    def refresh(self) -> bool:
        """Reload; on failure keep the previous copy and return False."""
        try:
            rows = tuple((str(item), float(score)) for item, score in self._load())
        except Exception as e:
            self.failures += 1
            logger.warning("popularity refresh failed, keeping the cached copy: %s", e)
            return False
        self._snapshot = _Snapshot(rows, self._clock())
        return True


class RedisBreaker:
    """Skip Redis for ``retry_s`` after an error (see the module docstring).

    >>> now = [0.0]
    >>> b = RedisBreaker(retry_s=1.0, clock=lambda: now[0])
    >>> b.allow()
    True
    >>> b.failure(); b.allow()
    False
    >>> now[0] = 1.5; b.allow()
    True
    """

    def __init__(self, retry_s: float, clock: Callable[[], float] = time.monotonic):
        if retry_s <= 0:
            raise ValueError(f"retry_s must be > 0, got {retry_s}")
        self.retry_s = retry_s
        self._clock = clock
        self._open_until = float("-inf")
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May Redis be tried now?"""
        return self._clock() >= self._open_until

    def failure(self) -> None:
        with self._lock:
            self._open_until = self._clock() + self.retry_s

    def success(self) -> None:
        with self._lock:
            self._open_until = float("-inf")

    @property
    def is_open(self) -> bool:
        return not self.allow()
