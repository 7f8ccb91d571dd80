"""Test helpers for the ingest workers: a dirty event stream and its expected outcome."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ingest.events import ClickEvent, EventValidator
from ingest.kafka import Record, make_admin, make_consumer, make_producer
from ingest.settings import KafkaSettings
from ingest.simulator import Simulator, SimulatorConfig
from ingest.store import SessionStore, StoreConfig, reference_state, session_keys

NOW_MS = 1_704_067_200_000 + 10 * 24 * 3600 * 1000  # after the simulated stream


@dataclass
class DirtyStream:
    """Messages to produce (key, value) and what the store and DLQ must end up with."""

    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    valid: list[ClickEvent] = field(default_factory=list)  # in production order, duplicates included
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    rejected_values: list[bytes] = field(default_factory=list)


_MALFORMED: list[tuple[str, Callable[[dict], tuple[bytes | None, bytes]]]] = [
    ("invalid_json", lambda e: (e["session_id"].encode(), b"{not json")),
    ("missing_field", lambda e: (e["session_id"].encode(),
                                 msgspec.json.encode({k: v for k, v in e.items() if k != "item_id"}))),
    ("wrong_type", lambda e: (e["session_id"].encode(), msgspec.json.encode({**e, "ts": str(e["ts"])}))),
    ("ts_too_old", lambda e: (e["session_id"].encode(), msgspec.json.encode({**e, "ts": e["ts"] // 1000}))),
    ("invalid_event_type", lambda e: (e["session_id"].encode(), msgspec.json.encode({**e, "event_type": "hover"}))),
    ("key_mismatch", lambda e: (b"someone-else", msgspec.json.encode(e))),
    ("not_an_object", lambda e: (e["session_id"].encode(), b"[1, 2, 3]")),
]


def dirty_stream(n: int, *, seed: int = 0, dup_rate: float = 0.03, bad_rate: float = 0.02) -> DirtyStream:
    """``n`` simulated events, with re-sent duplicates and ~``bad_rate`` malformed messages."""
    rng = random.Random(seed)
    validator = EventValidator()
    out = DirtyStream()
    sent: list[tuple[bytes, bytes, ClickEvent]] = []
    for raw in Simulator(SimulatorConfig(seed=seed, n_events=n, duration_hours=None)).events():
        key, value = raw["session_id"].encode(), msgspec.json.encode(raw)
        ev = validator.decode(value, key, now_ms=NOW_MS)
        assert isinstance(ev, ClickEvent)
        out.messages.append((key, value))
        out.valid.append(ev)
        sent.append((key, value, ev))
        if rng.random() < dup_rate:  # a producer retry: the same message again, later
            k, v, e = sent[rng.randrange(max(0, len(sent) - 50), len(sent))]
            out.messages.append((k, v))
            out.valid.append(e)
        if rng.random() < bad_rate:
            reason, make = _MALFORMED[rng.randrange(len(_MALFORMED))]
            k, v = make(raw)
            out.messages.append((k, v))
            out.rejected[reason] += 1
            out.rejected_values.append(v)
    return out


def create_topic(settings: KafkaSettings, name: str, partitions: int = 3) -> None:
    admin = make_admin(settings)
    try:
        admin.create_topics([name], partitions, 1)
    finally:
        admin.close()


def produce(
    settings: KafkaSettings, topic: str, messages: list[tuple[bytes | None, bytes]],
    *, per_second: float | None = None,
) -> None:
    producer = make_producer(settings)
    t0 = time.monotonic()
    for i, (key, value) in enumerate(messages):
        producer.produce(topic, value, key=key)
        if per_second and i % 200 == 0:
            delay = t0 + i / per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    assert producer.flush(60) == 0
    producer.close()


def produce_in_background(settings: KafkaSettings, topic: str, messages, per_second: float) -> threading.Thread:
    t = threading.Thread(target=produce, args=(settings, topic, messages), kwargs={"per_second": per_second})
    t.start()
    return t


def store_matches(store: SessionStore, stream: DirtyStream) -> tuple[bool, str]:
    """Does Redis hold exactly what the contract says? (sessions, counts, popularity)"""
    cfg = store.config
    ref_sessions, ref_pop = reference_state(stream.valid, cfg, NOW_MS)
    got = store.sessions(ref_sessions)
    wrong = [sid for sid in ref_sessions if got[sid] != ref_sessions[sid]]
    if wrong:
        return False, f"{len(wrong)} sessions differ, e.g. {wrong[0]}"
    # Each distinct event applied exactly once: the per-session applied count.
    unique = Counter()
    seen = set()
    for ev in stream.valid:
        if (ev.session_id, ev.event_id) not in seen:
            seen.add((ev.session_id, ev.event_id))
            unique[ev.session_id] += 1
    pipe = store.client.pipeline(transaction=False)
    for sid in ref_sessions:
        pipe.hget(session_keys(cfg.prefix, sid).state, "n")
    counts = dict(zip(ref_sessions, pipe.execute(), strict=True))
    bad_counts = [sid for sid in ref_sessions if int(counts[sid] or 0) != unique[sid]]
    if bad_counts:
        sid = bad_counts[0]
        return False, f"{len(bad_counts)} sessions applied a wrong number of events, e.g. {sid}: {counts[sid]} != {unique[sid]}"
    pop = dict(store.popularity(now_ms=NOW_MS))
    off = [i for i, v in ref_pop.items() if abs(pop.get(i, 0.0) - v) > 1e-9 * max(1.0, v)]
    if off:
        return False, f"popularity of {len(off)} items differs, e.g. {off[0]}: {pop.get(off[0])} != {ref_pop[off[0]]}"
    return True, "ok"


def wait_until_matches(store: SessionStore, stream: DirtyStream, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    ok, why = store_matches(store, stream)
    while not ok and time.monotonic() < deadline:
        time.sleep(0.5)
        ok, why = store_matches(store, stream)
    return why


def read_all(settings: KafkaSettings, topic: str, n: int, timeout: float = 60.0) -> list[Record]:
    consumer = make_consumer(settings, f"reader-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(consumer.poll(1000, 0.5))
    consumer.close()
    return out


def fresh_store(client, **kw) -> SessionStore:
    return SessionStore(client, StoreConfig(prefix=f"t{uuid.uuid4().hex[:8]}", **kw))
