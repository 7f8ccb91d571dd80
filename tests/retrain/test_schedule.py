"""The retrain scheduler (``retrain/schedule.py``): cron, coalescing, cool-down, single flight.

Time is a :class:`ManualClock` wherever the test is about *when*; real threads
where it is about *at once*; the real local Redis for the alarm channel and the
Redis lock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from model.drift import DriftAlarm
from retrain.schedule import (
    FileLock,
    ManualClock,
    RedisLock,
    Scheduler,
    due_times,
    listen_alarms,
    serve,
)
from retrain.settings import RetrainSettings

MIN = 60.0
T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z


class Jobs:
    """A job that records its runs and how many were ever running at the same time."""

    def __init__(self, clock: ManualClock | None = None, takes_s: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.clock, self.takes_s, self.gate = clock, takes_s, gate
        self.runs: list[tuple[str, float]] = []
        self.active = 0
        self.most_active = 0
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, trigger: str) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.runs.append((trigger, self.clock.time() if self.clock else time.time()))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.clock is not None:
            self.clock.now += self.takes_s  # a slow job: its time passes on the clock
        with self._lock:
            self.active -= 1


def count(s: Scheduler, trigger: str, action: str) -> float:
    return s.triggers.labels(trigger, action)._value.get()


def test_due_times_are_the_cron_fire_times_in_the_half_open_interval() -> None:
    assert due_times("*/30 * * * *", T0, T0 + 90 * MIN) == [T0 + 30 * MIN, T0 + 60 * MIN,
                                                            T0 + 90 * MIN]
    assert due_times("*/30 * * * *", T0 + 30 * MIN, T0 + 59 * MIN) == []
    assert due_times("0 3 * * *", T0, T0 + 3 * 86_400) == [T0 + 3 * 3600 + d * 86_400
                                                          for d in range(3)]
    assert len(due_times("* * * * *", T0, T0 + 86_400, limit=5)) == 5


def test_fire_times_before_the_start_are_not_missed_and_nothing_runs_early() -> None:
    clock = ManualClock(T0 + 29 * MIN)
    jobs = Jobs(clock)
    s = Scheduler(jobs, cron="*/30 * * * *", clock=clock)
    assert s.step() is None and jobs.runs == []  # 00:00 was before the start
    clock.now = T0 + 30 * MIN
    assert s.step() == "schedule" and jobs.runs == [("schedule", T0 + 30 * MIN)]
    assert s.step() is None  # the same fire time never runs twice


def test_a_slow_job_never_overlaps_and_its_missed_ticks_coalesce_into_one_run() -> None:
    clock = ManualClock(T0)
    jobs = Jobs(clock, takes_s=70 * MIN)  # longer than two intervals
    s = Scheduler(jobs, cron="*/30 * * * *", clock=clock)
    clock.now = T0 + 30 * MIN
    assert s.step() == "schedule"  # runs 00:30 -> 01:40; 01:00 and 01:30 pass meanwhile
    assert clock.now == T0 + 100 * MIN
    assert s.step() == "schedule"  # one run for both: 01:40 -> 02:50 (02:00, 02:30 pass)
    assert s.step() == "schedule"
    assert [t for _, t in jobs.runs] == [T0 + 30 * MIN, T0 + 100 * MIN, T0 + 170 * MIN]
    assert jobs.most_active == 1
    assert count(s, "schedule", "coalesced") == 2 and count(s, "schedule", "started") == 3


def test_missed_runs_after_a_long_sleep_become_one_run(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(T0)
    jobs = Jobs(clock)
    s = Scheduler(jobs, cron="0 * * * *", clock=clock)
    clock.now = T0 + 5 * 3600 + 10 * MIN  # the machine was suspended for five hours
    assert s.step() == "schedule" and len(jobs.runs) == 1
    assert "5 cron fire times passed; one run for all" in caplog.text
    assert s.step() is None and count(s, "schedule", "coalesced") == 4
    assert s.next_fire() == T0 + 6 * 3600


def test_run_forever_sleeps_until_each_fire_time() -> None:
    clock = ManualClock(T0)
    times: list[float] = []
    s: Scheduler

    def job(trigger: str) -> None:
        times.append(clock.time())
        if len(times) == 3:
            s.stop()

    s = Scheduler(job, cron="*/20 * * * *", clock=clock)
    s.run_forever()
    assert times == [T0 + 20 * MIN, T0 + 40 * MIN, T0 + 60 * MIN]


def test_drift_alarm_triggers_a_run_and_a_second_within_the_cooldown_does_not() -> None:
    clock = ManualClock(T0)
    jobs = Jobs(clock)
    s = Scheduler(jobs, cron="0 0 1 1 *", cooldown_s=600, clock=clock)  # cron: yearly
    assert s.request("drift") and s.step() == "drift"
    clock.now += 10
    assert not s.request("drift") and s.step() is None  # 10 s into the cool-down
    clock.now += 589
    assert not s.request("drift")
    clock.now += 2  # 601 s after the alarm run started
    assert s.request("drift") and s.step() == "drift"
    assert [t for t, _ in jobs.runs] == ["drift", "drift"]
    assert count(s, "drift", "cooldown") == 2
    # other triggers are not rate-limited, and do not restart the cool-down
    assert s.request("manual") and s.step() == "manual"
    clock.now += 700
    assert s.request("drift") and s.step() == "drift"


def test_a_request_while_a_job_runs_waits_and_runs_once_after() -> None:
    gate = threading.Event()
    jobs = Jobs(gate=gate)
    s = Scheduler(jobs)  # no cron: requests only
    s.request("manual")
    first = threading.Thread(target=s.step)
    first.start()
    assert jobs.started.wait(5)
    for trigger in ("manual", "drift", "manual"):  # three requests during the run
        assert s.request(trigger)
    assert s.step() is None  # the job is running in the other thread: nothing starts
    gate.set()
    first.join(5)
    assert s.step() == "drift"  # the three requests became one run (an alarm's, for cool-down)
    assert s.step() is None
    assert [t for t, _ in jobs.runs] == ["manual", "drift"] and jobs.most_active == 1
    assert count(s, "manual", "coalesced") + count(s, "drift", "coalesced") == 2  # 3 -> 1


def test_two_schedulers_never_run_at_once_across_a_file_lock(tmp_path: Path) -> None:
    gate = threading.Event()
    jobs = Jobs(gate=gate)  # shared, so overlap across both schedulers would show
    a = Scheduler(jobs, lock=FileLock(tmp_path / "lock"))
    b = Scheduler(jobs, lock=FileLock(tmp_path / "lock"))  # as if in another process
    a.request("manual")
    runner = threading.Thread(target=a.step)
    runner.start()
    assert jobs.started.wait(5)
    b.request("schedule")
    assert b.step() is None and count(b, "schedule", "locked") == 1  # skipped, not queued
    gate.set()
    runner.join(5)
    b.request("schedule")
    assert b.step() == "schedule"
    assert jobs.most_active == 1 and [t for t, _ in jobs.runs] == ["manual", "schedule"]


def test_alarms_on_redis_trigger_runs(redis_client: redis.Redis) -> None:
    channel = f"test-drift-alarm-{time.monotonic_ns()}"
    jobs = Jobs()
    s = Scheduler(jobs, cooldown_s=0)
    stop = threading.Event()
    thread = listen_alarms(redis_client, channel, s, stop)
    try:
        deadline = time.monotonic() + 5
        while redis_client.pubsub_numsub(channel)[0][1] < 1:
            assert time.monotonic() < deadline, "the listener never subscribed"
            time.sleep(0.02)
        alarm = DriftAlarm("item_psi", 0.41, 0.25, "v3", 1_700_000_000_000, 5000)
        for message in (alarm.to_json(), b"not json at all"):  # both count as alarms
            redis_client.publish(channel, message)
            deadline = time.monotonic() + 5
            while s.step() is None:
                assert time.monotonic() < deadline, "the alarm never arrived"
                time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)
    assert [t for t, _ in jobs.runs] == ["drift", "drift"]


def test_redis_lock_excludes_renews_and_expires_after_a_crash(redis_client: redis.Redis) -> None:
    key = f"test-retrain-lock-{time.monotonic_ns()}"
    a, b = RedisLock(redis_client, key, ttl_s=0.3), RedisLock(redis_client, key, ttl_s=0.3)
    assert a.acquire() and not b.acquire()
    time.sleep(0.6)  # twice the expiry: still held, a renews it
    assert not b.acquire()
    a.release()
    assert redis_client.get(key) is None and b.acquire()
    b.release()
    redis_client.set(key, "token-of-a-dead-holder", px=300)  # a holder died mid-run
    assert not a.acquire()
    time.sleep(0.4)
    assert a.acquire()  # it expired by itself
    a.release()


def test_serve_runs_the_job_on_schedule_until_stopped(tmp_path: Path) -> None:
    """The wiring of `streamrec retrain --schedule`: an empty registry, so each run fails fast."""
    settings = RetrainSettings(models_root=str(tmp_path / "models"), state_dir=tmp_path / "state",
                               archive_root=str(tmp_path / "archive"), metrics_port=0,
                               lock="file", progress=False, bootstrap=False)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, "*/5 * * * *", stop),
                              kwargs={"clock": ManualClock(T0)})
    thread.start()
    runs = tmp_path / "state" / "runs"
    deadline = time.monotonic() + 30
    while len(list(runs.glob("*.json"))) < 2:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    summaries: list[dict[str, Any]] = [json.loads(p.read_text()) for p in runs.glob("*.json")]
    assert {(d["trigger"], d["outcome"]) for d in summaries} == {("schedule", "failed")}
