"""When retrain runs: a cron schedule, drift alarms, and never two runs at once.

:class:`Scheduler` turns requests into runs of a job (``job(trigger)``), one at a time:

- **cron** (UTC, parsed by ``croniter``): each fire time is a request. Fire times
  that passed while the process slept, was suspended, or was busy running a
  long job are **coalesced into one run** when it looks again (a log line says
  how many were missed); fire times before the scheduler started are not
  "missed". So a job slower than the interval runs back to back, never stacked.
- **drift alarms** (``request("drift")``, fed by :func:`listen_alarms` from the
  drift monitor's Redis channel; any message there is an alarm): a run, unless
  the last alarm-triggered run started less than ``cooldown_s`` ago (then the
  alarm is dropped and counted). Cron runs do not start the cool-down.
- **single flight**: at most one request waits (later ones coalesce into it);
  in this process a mutex keeps a second thread from starting the job while one
  runs (the request stays pending and runs right after); across processes a
  :class:`FileLock` (``flock`` on ``state_dir/lock``: one host, released by the
  kernel when the holder dies, even by SIGKILL) or a :class:`RedisLock` (one key
  with a token, set with NX and an expiry renewed while held: any number of
  hosts, freed by expiry if the holder dies) must be won first; a run that
  loses it is skipped and counted, not queued.

The clock is injectable (:class:`ManualClock` in tests). The pure part is
:func:`due_times`; Redis and the job stay outside.

>>> clock = ManualClock(0.0)
>>> ran = []
>>> s = Scheduler(ran.append, cron="*/30 * * * *", clock=clock)
>>> clock.now = 7200.0  # two hours later: four fire times passed
>>> s.step(), ran
('schedule', ['schedule'])
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from croniter import croniter
from prometheus_client import CollectorRegistry, Counter

from ingest.metrics import serve as serve_metrics
from model.drift import DriftAlarm
from retrain.job import TRIGGERS, RetrainMetrics, RunSummary, push_metrics, run_once
from retrain.settings import RetrainSettings

__all__ = ["LOCK_KEY", "Clock", "FileLock", "ManualClock", "RedisLock", "RunLock", "Scheduler",
           "SystemClock", "due_times", "listen_alarms", "make_lock", "once", "serve"]

logger = logging.getLogger(__name__)

# What became of a run request (the ``action`` of streamrec_retrain_triggers_total):
STARTED = "started"  # the job ran
COALESCED = "coalesced"  # folded into the request already waiting
COOLDOWN = "cooldown"  # a drift alarm within cooldown_s of the last alarm-triggered run
LOCKED = "locked"  # another process held the run lock
ACTIONS = (STARTED, COALESCED, COOLDOWN, LOCKED)

#: The Redis key of :class:`RedisLock` (value: the holder's random token).
LOCK_KEY = "streamrec:retrain:lock"
_MAX_DUE = 10_000  # fire times counted after a long sleep (only for the log line)


# -- pure -----------------------------------------------------------------------------------


def due_times(cron: str, after: float, now: float, limit: int = _MAX_DUE) -> list[float]:
    """Fire times of ``cron`` (UTC) in ``(after, now]``, oldest first, at most ``limit``.

    >>> due_times("0 * * * *", 0.0, 3 * 3600.0)  # 01:00, 02:00, 03:00 on 1970-01-01
    [3600.0, 7200.0, 10800.0]
    >>> due_times("0 * * * *", 3600.0, 3600.0)
    []
    """
    it = croniter(cron, after)
    out: list[float] = []
    while len(out) < limit:
        t = float(it.get_next(float))
        if t > now:
            break
        out.append(t)
    return out


# -- clocks ---------------------------------------------------------------------------------


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (cron is evaluated on this)."""

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Until ``event`` is set (True) or ``timeout`` seconds passed (False)."""


class SystemClock:
    """The wall clock."""

    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)


class ManualClock:
    """A clock that moves only when told: ``now`` is set by hand, and ``wait`` jumps
    forward by its timeout unless the event is already set."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = float(now)

    def time(self) -> float:
        return self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        self.now += max(0.0, timeout)
        return False


# -- locks across processes -----------------------------------------------------------------


class RunLock(Protocol):
    def acquire(self) -> bool:
        """Take the lock without waiting; False when someone else holds it."""

    def release(self) -> None:
        """Give it back (only the holder calls this)."""


class FileLock:
    """``flock`` on ``path``: exclusive between processes (and lock objects) on one host.

    The kernel drops it when the holder's file is closed, also when the process
    is killed, so a crashed run never leaves it stuck. Not for network file systems.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a human
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
         "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_DELETE = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
          "return redis.call('del', KEYS[1]) else return 0 end"


class RedisLock:
    """One Redis key holding a random token: ``SET key token NX PX ttl``.

    While held, a thread renews the expiry every ``ttl_s / 3`` (only if the key
    still holds our token); release deletes it only if it still holds our
    token. A holder that dies stops renewing and the key expires after at most
    ``ttl_s``, so a crash delays the next run by at most that long.
    """

    def __init__(self, client: Any, key: str = LOCK_KEY, ttl_s: float = 600.0) -> None:
        self.client, self.key, self.ttl_ms = client, key, max(1, round(ttl_s * 1000))
        self._token: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        token = uuid.uuid4().hex
        if not self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            return False
        self._token, self._stop = token, threading.Event()
        self._renewer = threading.Thread(target=self._renew, args=(token, self._stop),
                                         name="retrain-lock-renew", daemon=True)
        self._renewer.start()
        return True

    def _renew(self, token: str, stop: threading.Event) -> None:
        while not stop.wait(self.ttl_ms / 3000):
            try:
                if not self.client.eval(_RENEW, 1, self.key, token, self.ttl_ms):
                    logger.error("retrain lock %s was lost (expired and taken?)", self.key)
                    return
            except Exception as e:  # Redis down: the key expires unless it comes back in time
                logger.warning("retrain lock %s not renewed: %s", self.key, e)

    def release(self) -> None:
        token, self._token = self._token, None
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if token is not None:
            try:
                self.client.eval(_DELETE, 1, self.key, token)
            except Exception as e:
                logger.warning("retrain lock %s not released (expires by itself): %s", self.key, e)


def make_lock(settings: RetrainSettings, redis: Any = None) -> RunLock:
    """The lock ``settings.lock`` names (``auto``: Redis when a client is given, else a file)."""
    if settings.lock == "redis" or (settings.lock == "auto" and redis is not None):
        if redis is None:
            raise ValueError("STREAMREC_RETRAIN_LOCK=redis needs Redis: set STREAMREC_REDIS_URL "
                             "(or `streamrec up`), or use lock=file on a single host")
        return RedisLock(redis, LOCK_KEY, settings.lock_ttl_s)
    return FileLock(Path(settings.state_dir) / "lock")


# -- the scheduler --------------------------------------------------------------------------


class Scheduler:
    """Runs ``job(trigger)`` on cron fire times and requests, one at a time; see the module doc.

    Args:
        job: called with the trigger (``schedule``, ``drift``, ``manual``, ...).
        cron: five-field cron expression (UTC), or ``None`` for requests only.
        cooldown_s: least time between the starts of two alarm-triggered runs.
        lock: won before each run (across processes); ``None`` = this process only.
        clock: :class:`SystemClock` by default.
        registry: where ``streamrec_retrain_triggers_total{trigger, action}`` is counted
            (action: started, coalesced, cooldown, locked).
    """

    def __init__(self, job: Callable[[str], Any], *, cron: str | None = None,
                 cooldown_s: float = 3600.0, lock: RunLock | None = None,
                 clock: Clock | None = None, registry: CollectorRegistry | None = None) -> None:
        if cron is not None and not croniter.is_valid(cron):
            raise ValueError(f"not a cron expression: {cron!r}; e.g. '*/30 * * * *'")
        self._job, self.cron, self.cooldown_s, self._lock = job, cron, cooldown_s, lock
        self.clock = clock or SystemClock()
        self.triggers = Counter("streamrec_retrain_triggers", "Run requests by what became of them",
                                ["trigger", "action"], registry=registry or CollectorRegistry())
        for trigger in TRIGGERS:  # every series from 0, so that rate() sees the first request
            for action in ACTIONS:
                if action != COOLDOWN or trigger == "drift":  # only alarms cool down
                    self.triggers.labels(trigger, action)
        self._checked = self.clock.time()  # cron times up to here are handled
        self._pending: str | None = None  # the one waiting request (others coalesce into it)
        self._last_alarm_run: float | None = None
        self._state = threading.Lock()  # guards the fields above
        self._running = threading.Lock()  # single flight in this process
        self._wake = threading.Event()
        self._stop = threading.Event()

    def request(self, trigger: str = "manual") -> bool:
        """Ask for a run (thread-safe); False if dropped by the drift cool-down."""
        now = self.clock.time()
        with self._state:
            last = self._last_alarm_run
            if trigger == "drift" and last is not None and now - last < self.cooldown_s:
                logger.info("retrain: drift alarm ignored, %.0fs into the %.0fs cool-down",
                            now - last, self.cooldown_s)
                self.triggers.labels(trigger, COOLDOWN).inc()
                return False
            self._take(trigger)
        self._wake.set()
        return True

    def _take(self, trigger: str) -> None:
        """Make ``trigger`` the pending request, or coalesce it into the one there (locked)."""
        if self._pending is None:
            self._pending = trigger
        else:
            self.triggers.labels(trigger, COALESCED).inc()
            if trigger == "drift":  # the run that happens counts as the alarm's
                self._pending = trigger

    def step(self) -> str | None:
        """Take due cron times and the pending request; run the job at most once.

        Returns the trigger of the run it made, or ``None`` (nothing due, another
        thread is running the job (the request waits), or another process holds the lock).
        """
        now = self.clock.time()
        with self._state:
            due = due_times(self.cron, self._checked, now) if self.cron else []
            self._checked = max(self._checked, now)
            if due:
                if len(due) > 1:
                    logger.warning("retrain: %d%s cron fire times passed; one run for all",
                                   len(due), "+" if len(due) >= _MAX_DUE else "")
                    self.triggers.labels("schedule", COALESCED).inc(len(due) - 1)
                self._take("schedule")
            trigger, self._pending = self._pending, None
        if trigger is None:
            return None
        if not self._running.acquire(blocking=False):
            with self._state:
                self._take(trigger)  # runs after the current one
            return None
        try:
            if self._lock is not None and not self._lock.acquire():
                logger.warning("retrain: another process holds the run lock; %s run skipped",
                               trigger)
                self.triggers.labels(trigger, LOCKED).inc()
                return None
            try:
                if trigger == "drift":
                    with self._state:
                        self._last_alarm_run = now
                self.triggers.labels(trigger, STARTED).inc()
                self._job(trigger)
            except Exception:  # the job reports its own failures; the schedule goes on
                logger.exception("retrain: the %s run raised", trigger)
            finally:
                if self._lock is not None:
                    self._lock.release()
        finally:
            self._running.release()
        return trigger

    def next_fire(self) -> float | None:
        """The next cron fire time after what was handled, or ``None`` without cron."""
        return float(croniter(self.cron, self._checked).get_next(float)) if self.cron else None

    def run_forever(self) -> None:
        """Step, then sleep until the next fire time or a request, until :meth:`stop`."""
        while not self._stop.is_set():
            ran = self.step()
            with self._state:
                pending = self._pending is not None
            if self._stop.is_set() or (pending and ran is not None):
                continue  # a request came in during the run: serve it now
            nxt = self.next_fire()
            timeout = 3600.0 if nxt is None else max(0.0, nxt - self.clock.time())
            if pending:  # another thread is running the job: look again soon
                timeout = min(timeout, 1.0)
            self.clock.wait(self._wake, timeout)
            self._wake.clear()

    def stop(self) -> None:
        """End :meth:`run_forever` after the run in progress, if any."""
        self._stop.set()
        self._wake.set()


# -- Redis alarms ---------------------------------------------------------------------------


def _on_alarm(data: Any, channel: str, scheduler: Scheduler) -> None:
    """A message on the alarm channel: a :class:`~model.drift.DriftAlarm`, or (another
    format) still an alarm: a needless retrain is cheap and the cool-down bounds it."""
    try:
        alarm = DriftAlarm.from_json(data)
        logger.info("retrain: drift alarm from %s: %s = %.4g > %.4g (model %s, %d samples)",
                    channel, alarm.detector, alarm.statistic, alarm.threshold,
                    alarm.model_version, alarm.samples)
    except (ValueError, TypeError):
        logger.warning("retrain: message on %s is not a DriftAlarm, taken as one: %r", channel,
                       bytes(data)[:200] if isinstance(data, bytes | bytearray) else data)
    scheduler.request("drift")


def listen_alarms(client: Any, channel: str, scheduler: Scheduler,
                  stop: threading.Event) -> threading.Thread:
    """A daemon thread: every message on ``channel`` is ``scheduler.request("drift")``.

    Reconnects after a Redis error (an alarm sent while disconnected is lost:
    pub/sub keeps nothing; the cron schedule still runs).
    """
    def loop() -> None:
        pubsub = None
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(channel)
                msg = pubsub.get_message(timeout=0.5)
            except Exception as e:
                logger.warning("retrain: drift alarm channel %s: %s; retrying", channel, e)
                pubsub = None
                stop.wait(1.0)
                continue
            if msg and msg.get("type") == "message":
                _on_alarm(msg.get("data"), channel, scheduler)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    thread = threading.Thread(target=loop, name="retrain-alarms", daemon=True)
    thread.start()
    return thread


# -- entry points (the CLI's) ---------------------------------------------------------------


def once(settings: RetrainSettings, redis: Any = None, *, trigger: str = "manual",
         **job_args: Any) -> RunSummary | None:
    """``streamrec retrain --once``: one run under the lock; ``None`` if another holds it."""
    lock = make_lock(settings, redis)
    if not lock.acquire():
        logger.warning("retrain: another run holds the lock (%s); not running", settings.lock)
        return None
    try:
        metrics = RetrainMetrics()
        summary = run_once(settings, trigger=trigger, redis=redis, metrics=metrics, **job_args)
        push_metrics(metrics, settings.pushgateway)
        return summary
    finally:
        lock.release()


def serve(settings: RetrainSettings, cron: str, stop: threading.Event, redis: Any = None,
          clock: Clock | None = None) -> None:
    """``streamrec retrain --schedule``: :func:`~retrain.job.run_once` on ``cron`` until ``stop``
    is set (a run in progress finishes first), with metrics served on ``metrics_port`` and,
    with Redis and ``alarm_trigger``, drift alarms listened to."""
    metrics = RetrainMetrics()
    scheduler = Scheduler(
        lambda trigger: run_once(settings, trigger=trigger, redis=redis, metrics=metrics),
        cron=cron, cooldown_s=settings.cooldown_s, lock=make_lock(settings, redis),
        clock=clock, registry=metrics.registry)
    server, _ = serve_metrics(metrics.registry, settings.metrics_port)
    logger.info("retrain: schedule %r (UTC), metrics on :%d", cron, server.server_port)
    if redis is not None and settings.alarm_trigger:
        listen_alarms(redis, settings.alarm_channel, scheduler, stop)
        logger.info("retrain: drift alarms on %s (cool-down %.0fs)", settings.alarm_channel,
                    settings.cooldown_s)
    threading.Thread(target=lambda: (stop.wait(), scheduler.stop()), name="retrain-stop",
                     daemon=True).start()
    try:
        scheduler.run_forever()
    finally:
        server.shutdown()
