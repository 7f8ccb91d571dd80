"""``make demo`` / ``streamrec demo``: the pipeline on the embedded stack, narrated.

What runs today: the local stack (real Valkey + real Kafka-compatible broker),
the session updater and the archiver (consumer groups, in threads here; one
process each in a deployment), a simulated history streamed as fast as
possible with a few malformed messages mixed in, then live paced clicks. The
narration reads back what a user would look at: sessions in Redis, decayed
popularity, the dead-letter topic, the Parquet archive, and the metrics
endpoints. Later stages (training, serving, retraining) plug in here.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from ingest.metrics import ConsumerMetrics, serve
from ingest.settings import IngestSettings, KafkaSettings, RedisSettings
from ingest.store import SessionStore
from streamrec.settings import StackSettings, load
from streamrec.signals import stop_on_signal
from streamrec.stack import LocalStack

# A few messages a real producer might get wrong: each ends in the DLQ.
_MALFORMED = [
    b"{not json",
    b'{"event_id":"bad-1","session_id":"s1","item_id":"i1","ts":1704067200}',  # ts in seconds
    b'{"event_id":"bad-2","session_id":"s1","ts":1704067200000}',  # no item_id
    b'{"event_id":"bad-3","session_id":"s1","item_id":"i1","ts":1704067200000,"event_type":"hover"}',
]


def run_demo(*, history_events: int, live_seconds: float, speedup: float, seed: int) -> None:
    with stop_on_signal() as stop:
        _run(stop, history_events, live_seconds, speedup, seed)


def _sample(metrics: ConsumerMetrics, metric: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"streamrec_ingest_{metric}", labels) or 0.0


def _show_ingest(sessions_m: ConsumerMetrics, archive_m: ConsumerMetrics) -> None:
    consumed = _sample(sessions_m, "events_consumed_total", role="sessions")
    applied = _sample(sessions_m, "events_applied_total", role="sessions")
    dups = _sample(sessions_m, "events_duplicate_total", kind="event_id")
    dead = sum(
        s.value
        for m in sessions_m.registry.collect()
        if m.name == "streamrec_ingest_events_dead_lettered"
        for s in m.samples
        if s.name.endswith("_total")
    )
    archived = _sample(archive_m, "events_applied_total", role="archive")
    click.echo(
        f"   session updater: consumed {consumed:,.0f}, applied {applied:,.0f}, "
        f"duplicates {dups:,.0f}, dead-lettered {dead:,.0f}; archiver wrote {archived:,.0f}"
    )


def _show_sessions(store: SessionStore, session_ids: Iterable[str]) -> None:
    for sid, events in store.sessions(session_ids).items():
        if not events:  # sent, not applied yet
            continue
        trail = " -> ".join(f"{e['item_id']}({e.get('category', '-')})" for e in events[-5:])
        click.echo(f"   session {sid:>7}: {len(events):2d} events, latest {trail}")


def _show_popularity(store: SessionStore) -> None:
    top = store.popularity(k=5)
    click.echo("   most popular now (decayed): " + ", ".join(f"{i} {s:.1f}" for i, s in top))


def _wait_consumed(metrics: ConsumerMetrics, role: str, n: int, stop: threading.Event, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if _sample(metrics, "events_consumed_total", role=role) >= n:
            return
        time.sleep(0.2)


def _until(
    events: Iterable[dict[str, Any]], stop: threading.Event, seen: list[str], tag: str = ""
) -> Iterator[dict[str, Any]]:
    """Events until Ctrl-C; ``tag`` prefixes ids so a second simulator's ids stay distinct."""
    for ev in events:
        if stop.is_set():
            return
        if tag:
            ev = {**ev, "event_id": tag + ev["event_id"], "session_id": tag + ev["session_id"]}
        seen.append(ev["session_id"])
        yield ev


def _run(stop: threading.Event, history_events: int, live_seconds: float, speedup: float, seed: int) -> None:
    from ingest.app import archive_worker, sessions_worker, store_from_settings
    from ingest.archive import list_hours, read_window
    from ingest.kafka import make_producer
    from ingest.replay import send_events
    from ingest.simulator import Simulator, SimulatorConfig

    click.echo("== streamrec demo ==")
    click.echo("1. local stack: a real Valkey server and a real Kafka-compatible broker")
    with tempfile.TemporaryDirectory(prefix="streamrec-demo-") as tmp, LocalStack(
        load(StackSettings), load(KafkaSettings), load(RedisSettings), state_dir=Path(tmp) / "stack"
    ) as stack:  # a fresh stack each time: the demo never sees an earlier run's state
        kafka, redis_ = stack.kafka, stack.redis
        for k, v in stack.env().items():
            click.echo(f"   {k}={v}")
        archive_root = Path(tmp) / "archive"
        ingest = load(IngestSettings).model_copy(
            update={"archive_root": str(archive_root), "archive_max_age_s": 2.0}
        )
        store = store_from_settings(redis_, ingest)

        click.echo("2. ingest workers: session updater (-> Redis, DLQ) and archiver (-> Parquet)")
        workers = [sessions_worker(kafka, redis_, ingest), archive_worker(kafka, ingest)]
        threads, servers = [], []
        for (worker, metrics), role in zip(workers, ("sessions", "archive"), strict=True):
            server, _ = serve(metrics.registry, 0, addr="127.0.0.1")
            servers.append(server)
            click.echo(f"   {role:8s} metrics: http://127.0.0.1:{server.server_port}/metrics")
            t = threading.Thread(target=worker.run, name=f"ingest-{role}", daemon=True)
            t.start()
            threads.append(t)
        (_, sessions_m), (_, archive_m) = workers
        producer = make_producer(kafka)
        seen: list[str] = []
        produced = 0
        try:
            click.echo(
                f"3. {history_events:,} simulated history events into {kafka.events_topic}, "
                f"as fast as possible, with {len(_MALFORMED)} malformed messages mixed in"
            )
            sim = Simulator(SimulatorConfig(seed=seed, n_events=history_events, duration_hours=None))
            produced = send_events(_until(sim.events(), stop, seen), producer, kafka.events_topic)
            for raw in _MALFORMED:
                producer.produce(kafka.events_topic, raw, key=b"s1")
            producer.flush(30)
            produced += len(_MALFORMED)
            _wait_consumed(sessions_m, "sessions", produced, stop, timeout=120)
            _wait_consumed(archive_m, "archive", produced, stop, timeout=60)
            _show_ingest(sessions_m, archive_m)
            _show_popularity(store)
            _show_sessions(store, list(dict.fromkeys(reversed(seen)))[:3])

            if live_seconds > 0 and not stop.is_set():
                click.echo(
                    f"4. live clicks for {live_seconds:.0f}s at {speedup:g}x event time, stamped "
                    "with the wall clock; watch sessions grow"
                )
                live = Simulator(
                    SimulatorConfig(seed=seed + 1, duration_hours=live_seconds * speedup / 3600)
                )
                live_seen: list[str] = []
                sender = threading.Thread(
                    target=lambda: send_events(
                        _until(live.events(), stop, live_seen, tag="live-"), producer,
                        kafka.events_topic,
                        speedup=speedup, live_timestamps=True, progress=False,
                    ),
                    daemon=True,
                )
                sender.start()
                while sender.is_alive() and not stop.wait(5.0):
                    _show_ingest(sessions_m, archive_m)
                    _show_sessions(store, list(dict.fromkeys(reversed(live_seen)))[:2])
                sender.join()
                produced += len(live_seen)
                _wait_consumed(sessions_m, "sessions", produced, stop, timeout=60)
                _show_ingest(sessions_m, archive_m)
                _show_popularity(store)
        finally:
            producer.close()
            for worker, _ in workers:
                worker.stop()
            for t in threads:
                t.join(timeout=30)
            for server in servers:
                server.shutdown()
        hours = list_hours(archive_root)
        rows = read_window(archive_root, 0, 2**62, columns=["event_id"]).num_rows
        click.echo(
            f"5. archive: {rows:,} distinct events in {len(hours)} hour partition(s) under "
            f"{archive_root} (deleted at exit); the retrainer reads windows from such a folder"
        )
        click.echo("6. stopping the workers and the stack")
    click.echo("stopped cleanly")
