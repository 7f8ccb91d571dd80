"""``make demo`` / ``streamrec demo``: the pipeline on the embedded stack, narrated.

Today it starts the local stack (real Valkey + real Kafka-compatible broker),
streams a simulated history into Kafka as fast as possible, then streams live
paced clicks, while a consumer-group member reads the topic back, validates
every message against the event contract, and prints what it sees. Later
stages (session store, archive, training, serving, retraining) plug in here.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import click

from ingest.events import ClickEvent, EventValidator
from ingest.kafka import make_consumer
from ingest.settings import KafkaSettings, RedisSettings
from streamrec.settings import StackSettings, load
from streamrec.stack import LocalStack

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    """What the read-back consumer has seen (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    consumed: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    by_type: collections.Counter[str] = field(default_factory=collections.Counter)
    by_category: collections.Counter[str] = field(default_factory=collections.Counter)
    sessions: dict[str, list[str]] = field(default_factory=dict)
    last: ClickEvent | None = None

    def add(self, events: list[ClickEvent], rejected: list[str]) -> None:
        with self.lock:
            self.consumed += len(events) + len(rejected)
            self.rejected.update(rejected)
            for ev in events:
                self.by_type[ev.event_type] += 1
                self.by_category[str(ev.features.get("category", "-"))] += 1
                trail = self.sessions.setdefault(ev.session_id, [])
                trail.append(ev.item_id)
                del trail[:-5]  # keep the last five clicks per session for display
            if events:
                self.last = events[-1]


def _read_back(kafka: KafkaSettings, tally: _Tally, stop: threading.Event) -> None:
    validator = EventValidator()
    consumer = make_consumer(kafka, f"streamrec-demo-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([kafka.events_topic])
    try:
        while not stop.is_set():
            records = consumer.poll(max_records=2000, timeout=0.5)
            if not records:
                continue
            good, bad = validator.decode_batch(
                [r.value or b"" for r in records], [r.key for r in records]
            )
            tally.add(good, [rej.reason.value for _, rej in bad])
            offsets: dict[tuple[str, int], int] = {}
            for r in records:
                offsets[(r.topic, r.partition)] = r.offset + 1
            consumer.commit(offsets)
    finally:
        consumer.close()


def _report(tally: _Tally, produced: int, t0: float) -> None:
    with tally.lock:
        rate = tally.consumed / max(time.monotonic() - t0, 1e-9)
        types = ", ".join(f"{k} {v}" for k, v in tally.by_type.most_common())
        click.echo(
            f"  read back {tally.consumed}/{produced} events ({rate:,.0f}/s); "
            f"rejected {sum(tally.rejected.values())}; {types}"
        )
        if tally.last is not None:
            ev = tally.last
            trail = " -> ".join(tally.sessions.get(ev.session_id, []))
            click.echo(f"  latest: session {ev.session_id} ({ev.features.get('category')}): {trail}")


def run_demo(*, history_events: int, live_seconds: float, speedup: float, seed: int) -> None:

    from streamrec.cli import stop_on_signal

    with stop_on_signal() as stop:
        _run(stop, history_events, live_seconds, speedup, seed)


def _run(
    stop: threading.Event, history_events: int, live_seconds: float, speedup: float, seed: int
) -> None:
    from ingest.kafka import ensure_topics, make_producer
    from ingest.replay import send_events
    from ingest.simulator import Simulator, SimulatorConfig

    click.echo("== streamrec demo ==")
    click.echo("1. starting the local stack (real Valkey + real Kafka-compatible broker)")
    stack_settings = load(StackSettings)
    with LocalStack(stack_settings, load(KafkaSettings), load(RedisSettings)) as stack:
        kafka = stack.kafka
        for k, v in stack.env().items():
            click.echo(f"   {k}={v}")
        ensure_topics(kafka)
        click.echo(f"   topics: {kafka.events_topic}, {kafka.dlq_topic} ({kafka.partitions} partitions)")

        tally = _Tally()
        reader = threading.Thread(target=_read_back, args=(kafka, tally, stop), daemon=True)
        reader.start()
        t0 = time.monotonic()
        produced = 0
        handed = [0]  # events handed to the producer so far, for the live ticker

        def events_until_stopped(events):
            for ev in events:
                if stop.is_set():
                    return
                handed[0] += 1
                yield ev

        producer = make_producer(kafka)
        try:
            click.echo(
                f"2. streaming {history_events:,} simulated history events into "
                f"{kafka.events_topic} as fast as possible"
            )
            sim = Simulator(SimulatorConfig(seed=seed, n_events=history_events, duration_hours=None))
            produced += send_events(
                events_until_stopped(sim.events()), producer, kafka.events_topic
            )
            _wait_read_back(tally, produced, stop, timeout=60)
            _report(tally, produced, t0)

            if live_seconds > 0 and not stop.is_set():
                click.echo(
                    f"3. live clicks for {live_seconds:.0f}s, paced at {speedup:g}x event time, "
                    "stamped with the wall clock"
                )
                live = Simulator(
                    SimulatorConfig(seed=seed + 1, duration_hours=live_seconds * speedup / 3600)
                )
                ticker = threading.Thread(
                    target=_tick, args=(tally, lambda: handed[0], t0, stop, live_seconds), daemon=True
                )
                ticker.start()
                produced += send_events(
                    events_until_stopped(live.events()), producer, kafka.events_topic,
                    speedup=speedup, live_timestamps=True, progress=False,
                )
                _wait_read_back(tally, produced, stop, timeout=30)
                _report(tally, produced, t0)
        finally:
            producer.close()
            stop.set()
            reader.join(timeout=15)
        click.echo(
            f"done: produced {produced:,} events, read back {tally.consumed:,} through a consumer "
            f"group, {sum(tally.rejected.values())} rejected by the event contract"
        )
        click.echo("4. stopping the stack")
    click.echo("stopped cleanly")


def _wait_read_back(tally: _Tally, produced: int, stop: threading.Event, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        with tally.lock:
            if tally.consumed >= produced:
                return
        time.sleep(0.2)


def _tick(tally: _Tally, produced, t0: float, stop: threading.Event, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not stop.wait(5.0) and time.monotonic() < end:
        _report(tally, produced(), t0)
