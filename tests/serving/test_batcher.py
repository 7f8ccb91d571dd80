"""DynamicBatcher driven by a fake clock: dispatch rules, shedding, errors, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from serving.batcher import BatcherMetrics, BatchingConfig, DynamicBatcher, Overloaded


class FakeClock:
    """``now()`` only moves on ``advance``; ``sleep`` wakes when time passes its deadline."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self.t and not fut.done():
                fut.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def make(process: Callable[[list[int]], list[int]], clock: FakeClock, registry=None,
         **cfg: float) -> DynamicBatcher[int, int]:
    metrics = BatcherMetrics(registry) if registry is not None else None
    return DynamicBatcher(process, BatchingConfig(**cfg), clock=clock.now, sleep=clock.sleep,
                          metrics=metrics, run_inline=True)


def test_a_full_batch_is_dispatched_without_waiting() -> None:
    async def go() -> None:
        clock, calls = FakeClock(), []
        b = make(lambda xs: calls.append(list(xs)) or [x + 1 for x in xs], clock,
                 max_batch_size=4, max_wait_ms=1000)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
            await settle()
            assert calls == [[0, 1, 2, 3]]  # the clock never moved
            assert [t.result() for t in tasks] == [1, 2, 3, 4]

    asyncio.run(go())


def test_a_partial_batch_waits_max_wait_then_goes() -> None:
    async def go() -> None:
        clock, calls = FakeClock(), []
        b = make(lambda xs: calls.append(list(xs)) or xs, clock, max_batch_size=8, max_wait_ms=5)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
            await settle()
            assert calls == []
            clock.advance(0.004)
            await settle()
            assert calls == []  # 4 ms < 5 ms
            clock.advance(0.001)
            await settle()
            assert calls == [[0, 1, 2]]
            assert [t.result() for t in tasks] == [0, 1, 2]

    asyncio.run(go())


def test_more_requests_than_a_batch_are_split_in_arrival_order() -> None:
    async def go() -> None:
        clock, calls = FakeClock(), []
        b = make(lambda xs: calls.append(list(xs)) or xs, clock, max_batch_size=3, max_wait_ms=5)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(7)]
            await settle()
            clock.advance(0.005)
            await settle()
            assert calls == [[0, 1, 2], [3, 4, 5], [6]]
            assert [t.result() for t in tasks] == list(range(7))

    asyncio.run(go())


def test_batched_results_equal_one_by_one() -> None:
    def score(xs: list[int]) -> list[int]:
        return [x * x - 3 for x in xs]

    async def go() -> list[int]:
        clock = FakeClock()
        b = make(score, clock, max_batch_size=16, max_wait_ms=2)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(50)]
            await settle()
            clock.advance(0.002)
            await settle()
            return [t.result() for t in tasks]

    assert asyncio.run(go()) == [score([i])[0] for i in range(50)]


def test_a_full_queue_refuses_at_once_and_counts_it() -> None:
    async def go() -> None:
        clock, registry = FakeClock(), CollectorRegistry()
        b = make(lambda xs: xs, clock, registry, max_batch_size=100, max_wait_ms=50, max_queue=2)
        async with b:
            waiting = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
            await settle()
            with pytest.raises(Overloaded) as e:
                await b.submit(99)
            assert e.value.reason == "queue_full"
            assert registry.get_sample_value("streamrec_serving_shed_total",
                                             {"reason": "queue_full"}) == 1
            clock.advance(0.05)
            await settle()
            assert [t.result() for t in waiting] == [0, 1]

    asyncio.run(go())


def test_requests_past_the_latency_budget_are_shed_not_scored() -> None:
    async def go() -> None:
        clock, registry, scored = FakeClock(), CollectorRegistry(), []

        def slow(xs: list[int]) -> list[int]:
            scored.extend(xs)
            clock.advance(0.5)  # scoring this batch takes 500 ms
            return xs

        b = make(slow, clock, registry, max_batch_size=1, max_wait_ms=0, latency_budget_ms=100)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
            await settle(50)
            assert tasks[0].result() == 0
            for t in tasks[1:]:  # they waited 500 ms behind the first batch
                assert isinstance(t.exception(), Overloaded)
                assert t.exception().reason == "deadline"
            assert scored == [0]
            assert registry.get_sample_value("streamrec_serving_shed_total",
                                             {"reason": "deadline"}) == 2

    asyncio.run(go())


def test_an_error_reaches_every_request_of_the_batch_and_the_next_batch_works() -> None:
    async def go() -> None:
        clock, registry = FakeClock(), CollectorRegistry()

        def score(xs: list[int]) -> list[int]:
            if 13 in xs:
                raise ValueError("bad batch")
            return xs

        b = make(score, clock, registry, max_batch_size=3, max_wait_ms=1)
        async with b:
            bad = [asyncio.ensure_future(b.submit(i)) for i in (12, 13, 14)]
            await settle()
            for t in bad:
                assert isinstance(t.exception(), ValueError)
            good = asyncio.ensure_future(b.submit(1))
            await settle()
            clock.advance(0.001)
            await settle()
            assert good.result() == 1
            assert registry.get_sample_value("streamrec_serving_failed_batches_total") == 1

    asyncio.run(go())


def test_a_wrong_number_of_results_is_an_error_for_every_waiter() -> None:
    async def go() -> None:
        clock = FakeClock()
        b = make(lambda xs: xs[:1], clock, max_batch_size=2, max_wait_ms=1)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
            await settle()
            assert all("returned 1 results for 2" in str(t.exception()) for t in tasks)

    asyncio.run(go())


def test_batch_size_histogram_and_queue_gauge() -> None:
    async def go() -> None:
        clock, registry = FakeClock(), CollectorRegistry()
        b = make(lambda xs: xs, clock, registry, max_batch_size=4, max_wait_ms=1)
        async with b:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
            await settle()
            assert registry.get_sample_value("streamrec_serving_queue_depth") == 2
            clock.advance(0.001)
            await settle()
            await asyncio.gather(*tasks)
        count = registry.get_sample_value("streamrec_serving_batch_size_count")
        total = registry.get_sample_value("streamrec_serving_batch_size_sum")
        assert (count, total) == (2, 6)
        assert registry.get_sample_value("streamrec_serving_queue_depth") == 0

    asyncio.run(go())


def test_close_fails_what_is_still_queued_and_refuses_new_requests() -> None:
    async def go() -> None:
        clock = FakeClock()
        b = make(lambda xs: xs, clock, max_batch_size=10, max_wait_ms=100)
        b.start()
        pending = asyncio.ensure_future(b.submit(1))
        await settle()
        await b.close()
        await settle()
        assert pending.exception().reason == "closed"
        with pytest.raises(Overloaded, match="not running"):
            await b.submit(2)

    asyncio.run(go())


def test_a_cancelled_request_is_skipped() -> None:
    async def go() -> None:
        clock, calls = FakeClock(), []
        b = make(lambda xs: calls.append(list(xs)) or xs, clock, max_batch_size=10, max_wait_ms=1)
        async with b:
            gone = asyncio.ensure_future(b.submit(1))
            kept = asyncio.ensure_future(b.submit(2))
            await settle()
            gone.cancel()
            await settle()
            clock.advance(0.001)
            await settle()
            assert calls == [[2]] and kept.result() == 2

    asyncio.run(go())


def test_scoring_runs_in_a_worker_thread_by_default() -> None:
    import threading

    async def go() -> None:
        seen = []
        b = DynamicBatcher(lambda xs: seen.append(threading.get_ident()) or xs,
                           BatchingConfig(max_wait_ms=1))
        async with b:
            assert await b.submit(5) == 5
        assert seen and seen[0] != threading.get_ident()

    asyncio.run(go())


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="latency_budget_ms"):
        BatchingConfig(latency_budget_ms=0)
