"""The synthetic stream: determinism, the event contract, and that the known
structure (Zipf popularity, successor tables, drift, new items) is really in
the events it emits."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from ingest.events import EVENT_TYPES, ClickEvent, EventValidator
from ingest.simulator import Simulator, SimulatorConfig, write_parquet

Event = dict[str, Any]
HOUR_MS = 3_600_000

SMALL = SimulatorConfig(seed=11, n_items=300, n_topics=6, n_events=20_000, user_share=0.4)
# Drift runs: 1,000 items in 10 topics, so a random in-topic item is a successor ~5% of the time.
DRIFT = SimulatorConfig(
    seed=3,
    n_items=1000,
    n_topics=10,
    sessions_per_hour=3000,
    duration_hours=8,
    drift="abrupt",
    drift_at=4.0,
)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sessions_of(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        out[e["session_id"]].append(e)
    return out


def follow_rate(sessions: list[list[Event]], table: dict[str, list[tuple[str, float]]]) -> float:
    """Share of in-session transitions a -> b where b is one of a's successors."""
    succ = {a: {s for s, _ in v} for a, v in table.items()}
    pairs = [(a["item_id"], b["item_id"]) for evs in sessions for a, b in itertools.pairwise(evs)]
    return sum(b in succ[a] for a, b in pairs) / len(pairs)


def first_item_counts(sessions: list[list[Event]], ids: list[str]) -> np.ndarray:
    c = Counter(evs[0]["item_id"] for evs in sessions)
    return np.array([c[i] for i in ids], dtype=np.float64)


@pytest.fixture(scope="module")
def small_events() -> list[Event]:
    return list(Simulator(SMALL).events())


@pytest.fixture(scope="module")
def drift_run() -> tuple[Simulator, list[Event]]:
    sim = Simulator(DRIFT)
    return sim, list(sim.events())


# ---------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_stream(small_events: list[Event]) -> None:
    assert list(Simulator(SMALL).events()) == small_events


def test_different_seed_gives_different_stream(small_events: list[Event]) -> None:
    other = list(Simulator(dataclasses.replace(SMALL, seed=12)).events())
    assert [e["item_id"] for e in other] != [e["item_id"] for e in small_events]


def test_batches_and_record_batches_carry_the_same_events(small_events: list[Event]) -> None:
    sim = Simulator(SMALL)
    batches = list(sim.batches(7000))
    assert [len(b) for b in batches] == [7000, 7000, 6000]
    assert [e for b in batches for e in b] == small_events
    rbs = list(sim.record_batches(8000))
    assert [b.num_rows for b in rbs] == [8000, 8000, 4000]
    rows = [{k: v for k, v in r.items() if v is not None} for b in rbs for r in b.to_pylist()]
    assert rows == small_events


def test_drift_modes_share_the_pre_drift_stream() -> None:
    base = dataclasses.replace(DRIFT, duration_hours=3.0, drift="none")
    abrupt = dataclasses.replace(base, drift="abrupt", drift_at=2.0)
    cut = DRIFT.start_ms + 1 * HOUR_MS  # sessions starting before 1 h end well before 2 h
    a = [e for e in Simulator(base).events() if e["ts"] < cut]
    b = [e for e in Simulator(abrupt).events() if e["ts"] < cut]
    assert a == b and len(a) > 1000


# ---------------------------------------------------------------------- contract
def test_events_satisfy_the_event_contract(small_events: list[Event]) -> None:
    validator = EventValidator()
    for e in small_events[:3000]:
        raw = msgspec.json.encode(e)
        ev = validator.decode(raw, key=e["session_id"].encode(), now_ms=e["ts"])
        assert isinstance(ev, ClickEvent), (e, ev)
    for e in small_events:
        assert type(e["event_id"]) is str and type(e["session_id"]) is str
        assert type(e["item_id"]) is str and type(e["ts"]) is int
        assert e["event_type"] in EVENT_TYPES
        assert type(e["category"]) is str and e["category"].startswith("c")
        assert type(e["price"]) is float and e["price"] > 0 and round(e["price"], 2) == e["price"]
        assert set(e) <= {
            "event_id",
            "session_id",
            "item_id",
            "ts",
            "event_type",
            "user_id",
            "category",
            "price",
        }
    with_user = [e for e in small_events if "user_id" in e]
    assert (
        0.3
        < len({e["session_id"] for e in with_user}) / len({e["session_id"] for e in small_events})
        < 0.5
    )
    assert all(e["user_id"].startswith("u") for e in with_user)


def test_ids_are_unique_and_numbered_in_stream_order(small_events: list[Event]) -> None:
    assert [e["event_id"] for e in small_events] == [f"e{n}" for n in range(len(small_events))]
    items = {e["item_id"] for e in small_events}
    assert all(len(i) == 6 and i[0] == "i" and i[1:].isdigit() for i in items)


def test_item_features_are_fixed_per_item(small_events: list[Event]) -> None:
    seen: dict[str, tuple[str, float]] = {}
    for e in small_events:
        assert seen.setdefault(e["item_id"], (e["category"], e["price"])) == (
            e["category"],
            e["price"],
        )


def test_stream_is_ordered_and_lossless_across_internal_chunks() -> None:
    # Internal chunks hold ~12 min of arrivals; sessions last ~22 min: they straddle chunks.
    cfg = SimulatorConfig(
        seed=5,
        n_items=200,
        n_topics=4,
        sessions_per_hour=20_000,
        mean_gap_s=120,
        mean_session_length=6,
        max_session_length=12,
        duration_hours=1.5,
    )
    events = list(Simulator(cfg).events())
    ts = np.array([e["ts"] for e in events])
    assert np.all(np.diff(ts) >= 0)
    assert ts.min() >= cfg.start_ms and ts.max() < cfg.start_ms + 90 * 60_000
    early = [
        evs for evs in sessions_of(events).values() if evs[0]["ts"] < cfg.start_ms + 30 * 60_000
    ]  # complete well before the end
    # E[min(Geometric(1/6), 12)] = 6 * (1 - (5/6) ** 12): no event lost or duplicated
    expected = 6 * (1 - (5 / 6) ** 12)
    assert len(early) > 9000
    assert abs(np.mean([len(evs) for evs in early]) - expected) < 0.12


def test_n_events_is_exact_and_duration_bounds_ts(small_events: list[Event]) -> None:
    assert len(small_events) == SMALL.n_events
    cfg = dataclasses.replace(SMALL, n_events=None, duration_hours=0.5)
    ts = [e["ts"] for e in Simulator(cfg).events()]
    assert max(ts) < cfg.start_ms + HOUR_MS // 2 and len(ts) > 1000


# ---------------------------------------------------------------------- structure
def test_popularity_is_zipf_with_the_configured_exponent(
    drift_run: tuple[Simulator, list[Event]],
) -> None:
    sim, events = drift_run
    before = [
        evs for evs in sessions_of(events).values() if evs[0]["ts"] < DRIFT.start_ms + 4 * HOUR_MS
    ]
    pop = sim.item_popularity(0)
    ids = sorted(pop, key=pop.__getitem__, reverse=True)  # by ground-truth rank
    counts = first_item_counts(before, ids)  # session starts are pure popularity draws
    assert set(np.argsort(-counts)[:5]) <= set(range(10))
    assert spearman(counts[:100], -np.arange(100)) > 0.85
    slope = np.polyfit(np.log(np.arange(1, 31)), np.log(counts[:30]), 1)[0]
    assert -1.3 < slope < -0.9  # zipf_exponent = 1.1


def test_transitions_follow_the_successor_table(drift_run: tuple[Simulator, list[Event]]) -> None:
    sim, events = drift_run
    before = [
        evs for evs in sessions_of(events).values() if evs[0]["ts"] < DRIFT.start_ms + 4 * HOUR_MS
    ]
    rate = follow_rate(before, sim.successor_table(0))
    assert 0.55 < rate < 0.7  # p_follow = 0.6 plus chance hits; chance alone is ~0.05
    table = sim.successor_table(0)
    assert all(len(v) == DRIFT.n_successors for v in table.values())
    assert all(abs(sum(w for _, w in v) - 1) < 1e-9 for v in table.values())
    cat = {row["item_id"]: row["category"] for row in sim.item_catalog()}
    assert all(cat[s] == cat[a] and s != a for a, v in table.items() for s, _ in v)


def test_abrupt_drift_switches_popularity_and_transitions(
    drift_run: tuple[Simulator, list[Event]],
) -> None:
    sim, events = drift_run
    at = DRIFT.start_ms + 4 * HOUR_MS
    assert (sim.regime_at(at - 1), sim.regime_at(at)) == (0, 1)
    by_session = list(sessions_of(events).values())
    periods = {
        0: [s for s in by_session if s[0]["ts"] < at],
        1: [s for s in by_session if s[0]["ts"] >= at],
    }
    ids = list(sim.item_popularity(0))
    for period, sessions in periods.items():
        rates = [follow_rate(sessions, sim.successor_table(r)) for r in (0, 1)]
        assert rates[period] > 0.55 and rates[1 - period] < 0.1, (period, rates)
        counts = first_item_counts(sessions, ids)
        rho = [spearman(counts, np.array([sim.item_popularity(r)[i] for i in ids])) for r in (0, 1)]
        assert rho[period] > 0.65 and abs(rho[1 - period]) < 0.2, (period, rho)


def test_gradual_drift_raises_the_regime1_share_across_the_window() -> None:
    cfg = dataclasses.replace(
        DRIFT, duration_hours=8, drift="gradual", drift_at=2.0, drift_width=4.0
    )
    sim = Simulator(cfg)
    sessions = list(sessions_of(list(sim.events())).values())
    tables = [{a: {s for s, _ in v} for a, v in sim.successor_table(r).items()} for r in (0, 1)]
    shares, agree = [], 0
    long = [evs for evs in sessions if len(evs) >= 6]
    for hour in range(8):
        lo, hi = cfg.start_ms + hour * HOUR_MS, cfg.start_ms + (hour + 1) * HOUR_MS
        in_hour = [evs for evs in sessions if lo <= evs[0]["ts"] < hi]
        shares.append(np.mean([sim.session_regime(evs[0]["session_id"]) for evs in in_hour]))
    for evs in long:  # the events themselves show which table a session followed
        hits = [
            sum(b["item_id"] in t[a["item_id"]] for a, b in itertools.pairwise(evs)) for t in tables
        ]
        agree += (hits[1] > hits[0]) == bool(sim.session_regime(evs[0]["session_id"]))
    assert shares[0] == shares[1] == 0 and shares[6] == shares[7] == 1
    assert 0.05 < shares[2] < 0.25 and 0.35 < shares[3] < 0.5 and 0.75 < shares[5] < 0.95
    assert np.all(np.diff(shares) >= 0)
    assert agree / len(long) > 0.95
    assert sim.regime_share(cfg.start_ms + 4 * HOUR_MS) == pytest.approx(0.5)


def test_new_items_appear_only_after_their_introduction() -> None:
    cfg = dataclasses.replace(
        SMALL,
        n_events=None,
        duration_hours=6,
        new_items_per_hour=20,
        sessions_per_hour=4000,
        zipf_exponent=0.8,
    )
    sim = Simulator(cfg)
    events = list(sim.events())
    appear = sim.new_item_times()
    assert 80 < len(appear) < 170  # Poisson(120)
    assert all(cfg.start_ms <= t < cfg.start_ms + 6 * HOUR_MS for t in appear.values())
    assert min(int(i[1:]) for i in appear) == cfg.n_items
    seen_new = {e["item_id"] for e in events if e["item_id"] in appear}
    assert all(e["ts"] >= appear[e["item_id"]] for e in events if e["item_id"] in appear)
    early = [i for i, t in appear.items() if t < cfg.start_ms + 4 * HOUR_MS]
    assert len(seen_new & set(early)) > 0.8 * len(early)  # they do gain popularity
    assert set(sim.item_popularity(0, at_ms=cfg.start_ms + 3 * HOUR_MS)) > set(
        sim.item_popularity(0)
    )
    # catalogue extension is lazy but deterministic: asking first changes nothing
    sim2 = Simulator(cfg)
    assert sim2.new_item_times() == appear and list(sim2.events()) == events


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_items": 50, "n_topics": 20}, "n_items"),
        ({"p_follow": 0.8, "p_topic": 0.3}, "p_follow \\+ p_topic"),
        ({"event_type_probs": (0.5, 0.5, 0.5, 0.0)}, "event_type_probs"),
        ({"drift": "sudden"}, "drift must be"),
        ({"drift": "abrupt", "drift_at": 30.0}, "drift_at"),
        ({"drift": "gradual", "drift_width": 0.0}, "drift_width"),
        ({"mean_session_length": 0.5}, "mean_session_length"),
        ({"sessions_per_hour": 0}, "sessions_per_hour"),
        ({"n_events": 0}, "n_events"),
        ({"n_items": 2000.0}, "n_items must be an int"),
        ({"zipf_exponent": float("nan")}, "finite"),
        ({"user_share": 1.5}, "user_share"),
        ({"new_items_per_hour": -1.0}, "new_items_per_hour"),
    ],
)
def test_invalid_config_is_rejected_with_a_clear_message(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SimulatorConfig(**kwargs)


def test_unknown_config_key_is_an_error() -> None:
    with pytest.raises(TypeError):
        SimulatorConfig(n_item=10)  # type: ignore[call-arg]


def test_ground_truth_accessors_reject_bad_arguments() -> None:
    sim = Simulator(SMALL)
    with pytest.raises(ValueError, match="regime"):
        sim.successor_table(2)
    with pytest.raises(KeyError):
        sim.session_regime("s0")  # nothing generated yet
    with pytest.raises(ValueError, match="batch size"):
        next(sim.batches(0))


# ---------------------------------------------------------------------- parquet
def test_write_parquet_round_trips_dicts_and_record_batches(
    tmp_path: Path, small_events: list[Event]
) -> None:
    sim = Simulator(SMALL)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert write_parquet(sim.events(), a, progress=False, row_group_size=6000) == SMALL.n_events
    assert (
        write_parquet(sim.record_batches(1234), b, progress=False, row_group_size=6000)
        == SMALL.n_events
    )
    for path in (a, b):
        f = pq.ParquetFile(path)
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        assert sizes == [6000, 6000, 6000, 2000]
        rows = [{k: v for k, v in r.items() if v is not None} for r in f.read().to_pylist()]
        assert rows == small_events
    assert not list(tmp_path.glob("*.tmp"))
