"""Dynamic batching: concurrent requests gathered into micro-batches.

One forward pass and one catalogue matmul cost about the same for 1 session
as for 64, so the server queues requests and hands them to the scorer in
batches. The rules (``docs/serving.md``):

- a batch is dispatched when it is full (``max_batch_size``) or when its
  oldest request has waited ``max_wait_ms``, whichever comes first;
- the queue is bounded (``max_queue``): a request that finds it full is
  refused at once with :class:`Overloaded` (the API answers 503), it never
  waits for a slot;
- a request still queued after ``latency_budget_ms`` is failed with
  :class:`Overloaded` instead of being scored late;
- one batch is scored at a time, in a worker thread (torch releases the GIL),
  while the next batch gathers;
- an exception while scoring a batch is delivered to every request of it;
- every decision reads time from an injected clock, and every wait goes
  through an injected sleep, so the tests drive it with a fake clock.

>>> import asyncio
>>> async def demo():
...     batcher = DynamicBatcher(lambda xs: [x * 10 for x in xs], BatchingConfig(max_wait_ms=1))
...     async with batcher:
...         return await asyncio.gather(*(batcher.submit(i) for i in range(3)))
>>> asyncio.run(demo())
[0, 10, 20]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["SHED_REASONS", "BatcherMetrics", "BatchingConfig", "DynamicBatcher", "Overloaded"]

T = TypeVar("T")
R = TypeVar("R")

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Why a request is shed (Overloaded.reason, the ``reason`` label of the shed counter):
QUEUE_FULL = "queue_full"  # max_queue requests already waiting
DEADLINE = "deadline"  # still queued after latency_budget_ms
CLOSED = "closed"  # the batcher is not running (not started yet, or shutting down)
SHED_REASONS = (QUEUE_FULL, DEADLINE, CLOSED)


class Overloaded(RuntimeError):
    """The request was shed: ``reason`` is ``queue_full``, ``deadline`` or ``closed``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """Fields:
    max_batch_size: most requests per batch (1 turns batching off).
    max_wait_ms: longest a batch's oldest request waits for company.
    max_queue: most requests waiting; beyond it requests are refused at once.
    latency_budget_ms: a request still waiting after this is shed, not scored.
    """

    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    latency_budget_ms: float = 250.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if self.max_wait_ms < 0 or self.latency_budget_ms <= 0:
            raise ValueError("max_wait_ms must be >= 0 and latency_budget_ms > 0")


class BatcherMetrics:
    """Prometheus instruments of one batcher (registered on ``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "streamrec_serving"):
        self.batch_size = Histogram(f"{prefix}_batch_size", "Requests per scored batch.",
                                    buckets=SIZE_BUCKETS, registry=registry)
        self.queue_depth = Gauge(f"{prefix}_queue_depth", "Requests waiting to be batched.",
                                 registry=registry)
        self.shed = Counter(f"{prefix}_shed", "Requests refused or dropped, by reason.",
                            ["reason"], registry=registry)
        for reason in SHED_REASONS:  # every series from 0: rate() sees the first shed
            self.shed.labels(reason)
        self.batch_seconds = Histogram(f"{prefix}_batch_seconds", "Time to score one batch.",
                                       registry=registry)
        self.failed_batches = Counter(f"{prefix}_failed_batches",
                                      "Batches whose scoring raised.", registry=registry)


@dataclasses.dataclass(eq=False)
class _Pending(Generic[T]):
    item: T
    arrival: float
    future: asyncio.Future[Any]


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class DynamicBatcher(Generic[T, R]):
    """Gathers :meth:`submit` calls into batches for ``process`` (see the module docstring).

    Args:
        process: scores a batch: ``list[T] -> list[R]``, one result per item, in
            order. Runs in a worker thread.
        config: batching limits.
        clock: monotonic seconds (``time.monotonic``; a fake one in tests).
        sleep: ``await sleep(seconds)`` (``asyncio.sleep``; a fake one in tests).
        metrics: Prometheus instruments; ``None`` = none.
    """

    def __init__(self, process: Callable[[list[T]], Sequence[R]], config: BatchingConfig,
                 *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = _sleep,
                 metrics: BatcherMetrics | None = None,
                 run_inline: bool = False):
        self._process = process
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics
        self._inline = run_inline  # tests: score on the event loop, no thread
        self._queue: deque[_Pending[T]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._closed = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stop; requests still queued are failed with ``Overloaded('closed')``."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                self._count_shed(CLOSED)
            self._fail(pending, Overloaded(CLOSED, "the server is shutting down"))
        self._gauge()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- requests ----------------------------------------------------------------------

    async def submit(self, item: T) -> R:
        """Score ``item`` in the next batch; raises :class:`Overloaded` when shed."""
        if self._closed or self._task is None:
            self._count_shed(CLOSED)
            raise Overloaded(CLOSED, "the batcher is not running")
        if len(self._queue) >= self.config.max_queue:
            self._count_shed(QUEUE_FULL)
            raise Overloaded(QUEUE_FULL,
                             f"{len(self._queue)} requests already waiting (max_queue)")
        pending = _Pending(item, self._clock(), asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._gauge()
        self._arrived.set()
        return await pending.future

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self.config
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # Gather: until full, or until the oldest request has waited max_wait.
            while len(self._queue) < cfg.max_batch_size:
                remaining = self._queue[0].arrival + cfg.max_wait_ms / 1e3 - self._clock()
                if remaining <= 0:
                    break
                self._arrived.clear()
                await self._wait_arrival_or(remaining)
            batch = self._take()
            if batch:
                await self._score(batch)

    async def _wait_arrival_or(self, seconds: float) -> None:
        arrival = asyncio.ensure_future(self._arrived.wait())
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({arrival, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrival.cancel()
            timer.cancel()

    def _take(self) -> list[_Pending[T]]:
        """Up to ``max_batch_size`` live requests; those past the budget are shed."""
        now, budget = self._clock(), self.config.latency_budget_ms / 1e3
        batch: list[_Pending[T]] = []
        while self._queue and len(batch) < self.config.max_batch_size:
            p = self._queue.popleft()
            if p.future.done():  # the caller went away (cancelled)
                continue
            if now - p.arrival > budget:
                self._count_shed(DEADLINE)
                self._fail(p, Overloaded(
                    DEADLINE, f"waited {1e3 * (now - p.arrival):.0f} ms, over the "
                    f"{self.config.latency_budget_ms:.0f} ms latency budget"))
                continue
            batch.append(p)
        self._gauge()
        return batch

    async def _score(self, batch: list[_Pending[T]]) -> None:
        items = [p.item for p in batch]
        start = time.perf_counter()
        try:
            if self._inline:
                results = list(self._process(items))
            else:
                results = list(await asyncio.to_thread(self._process, items))
            if len(results) != len(items):
                raise RuntimeError(f"scorer returned {len(results)} results for "
                                   f"{len(items)} requests")
        except Exception as e:  # delivered to every waiter of the batch
            if self._metrics:
                self._metrics.failed_batches.inc()
            for p in batch:
                self._fail(p, e)
            return
        finally:
            if self._metrics:
                self._metrics.batch_size.observe(len(batch))
                self._metrics.batch_seconds.observe(time.perf_counter() - start)
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _fail(p: _Pending[Any], error: BaseException) -> None:
        if not p.future.done():
            p.future.set_exception(error)

    def _count_shed(self, reason: str) -> None:
        if self._metrics:
            self._metrics.shed.labels(reason).inc()

    def _gauge(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.set(len(self._queue))
