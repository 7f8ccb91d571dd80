"""A synthetic click stream with known structure, for tests, demos and benchmarks.

Sessions arrive as a Poisson process; inside a session each next item follows
the previous item's successor table, stays in its topic by popularity, or jumps
to a globally popular item. Popularity is Zipf. At ``drift_at`` hours the
popularity ranking and the successor tables are re-drawn (regime 0 -> 1),
abruptly or gradually, and new items join the catalogue over time. Everything
is a function of the seed, and the ground truth is exposed for evaluation.
The process, with formulas, is in ``docs/simulator.md``.

>>> cfg = SimulatorConfig(seed=7, n_items=200, n_topics=5, n_events=1000)
>>> events = list(Simulator(cfg).events())
>>> len(events), events[0]["event_id"], events[0]["item_id"][:1]
(1000, 'e0', 'i')
>>> all(a["ts"] <= b["ts"] for a, b in zip(events, events[1:]))
True
>>> events == list(Simulator(cfg).events())
True
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.events import EVENT_TYPES
from ingest.replay import EVENT_SCHEMA, write_parquet

__all__ = [
    "DEFAULT_START_MS",
    "EVENT_SCHEMA",
    "Simulator",
    "SimulatorConfig",
    "write_parquet",
]

logger = logging.getLogger(__name__)

DEFAULT_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z, so default output is reproducible
_SESSIONS_PER_CHUNK = 4096  # fixed: the stream must not depend on how it is consumed
_PRICE_MEDIAN_RANGE = (5.0, 200.0)  # per-topic median price is log-uniform in this range


@dataclass(frozen=True)
class SimulatorConfig:
    """Every knob of the generative process (see ``docs/simulator.md``)."""

    seed: int = 0  # one seed drives everything; same seed -> identical stream
    n_items: int = 2000  # initial catalogue size, ids i00000..
    n_topics: int = 20  # topics; an item's topic is its ``category`` ("c07")
    zipf_exponent: float = 1.1  # popularity of the rank-r item is r ** -zipf_exponent
    sessions_per_hour: float = 2000.0  # Poisson session arrival rate
    mean_session_length: float = 8.0  # events per session: geometric with this mean, >= 1
    max_session_length: int = 50  # cap on events per session
    mean_gap_s: float = 30.0  # exponential gap between consecutive events in a session
    n_successors: int = 5  # k successors per item, drawn inside the item's topic
    successor_concentration: float = 1.0  # Dirichlet concentration of successor weights
    p_follow: float = 0.6  # next item = a successor of the current one
    p_topic: float = 0.25  # next item = popularity draw inside the current topic
    # p_jump = 1 - p_follow - p_topic: next item = global popularity draw
    event_type_probs: tuple[float, ...] = (0.80, 0.12, 0.06, 0.02)  # over EVENT_TYPES
    user_share: float = 0.3  # share of sessions carrying a user_id
    n_users: int = 10_000  # user ids u0..u{n_users-1}
    price_sigma: float = 0.5  # log-price standard deviation within a topic
    start_ms: int = DEFAULT_START_MS  # event time of t = 0, ms since epoch
    duration_hours: float | None = 24.0  # stream covers [start, start + duration); None = open
    n_events: int | None = None  # stop after this many events (whichever limit comes first)
    drift: Literal["none", "abrupt", "gradual"] = "none"
    drift_at: float = 12.0  # hours from start when regime 1 begins
    drift_width: float = 4.0  # hours over which the regime-1 share rises 0 -> 1 (gradual)
    new_items_per_hour: float = 0.0  # Poisson rate of items added after the start

    def __post_init__(self) -> None:
        ints = ("seed", "n_items", "n_topics", "max_session_length", "n_successors", "n_users")
        for name in (*ints, "start_ms"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"SimulatorConfig: {name} must be an int, got {v!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"SimulatorConfig: {f.name} must be finite, got {v!r}")
        probs = tuple(float(p) for p in self.event_type_probs)
        object.__setattr__(self, "event_type_probs", probs)
        min_items = self.n_topics * (self.n_successors + 1)
        n_ev, dur = self.n_events, self.duration_hours
        drift, at, width = self.drift, self.drift_at, self.drift_width
        checks = [  # (condition, message): one line each
            (self.seed >= 0 and self.start_ms >= 0, "seed and start_ms must be >= 0"),
            (min(self.n_topics, self.n_successors, self.n_users) >= 1,
             "n_topics, n_successors and n_users must be >= 1"),
            (self.n_items >= min_items,
             f"n_items ({self.n_items}) must be >= n_topics * (n_successors + 1) = {min_items} "
             "so each topic holds k distinct successors per item; add items or lower n_topics"),
            (self.zipf_exponent >= 0, f"zipf_exponent must be >= 0, got {self.zipf_exponent}"),
            (self.sessions_per_hour > 0, f"sessions_per_hour must be > 0, got {self.sessions_per_hour}"),
            (self.mean_session_length >= 1, "mean_session_length must be >= 1"),
            (self.max_session_length >= 1, "max_session_length must be >= 1"),
            (self.mean_gap_s > 0, f"mean_gap_s must be > 0, got {self.mean_gap_s}"),
            (self.successor_concentration > 0, "successor_concentration must be > 0"),
            (min(self.p_follow, self.p_topic) >= 0, "p_follow and p_topic must be >= 0"),
            (self.p_follow + self.p_topic <= 1 + 1e-9,
             f"p_follow + p_topic = {self.p_follow + self.p_topic} must be <= 1 "
             "(the rest is the probability of a popularity jump)"),
            (len(probs) == len(EVENT_TYPES) and min(probs, default=-1) >= 0 and abs(sum(probs) - 1) < 1e-6,
             f"event_type_probs must be {len(EVENT_TYPES)} non-negative numbers summing to 1 "
             f"(for {EVENT_TYPES}), got {probs!r}"),
            (0 <= self.user_share <= 1, f"user_share must be in [0, 1], got {self.user_share}"),
            (self.price_sigma >= 0, "price_sigma must be >= 0"),
            (dur is None or dur > 0, f"duration_hours must be > 0 or None, got {dur}"),
            (n_ev is None or (type(n_ev) is int and n_ev > 0),
             f"n_events must be a positive int or None, got {n_ev!r}"),
            (drift in ("none", "abrupt", "gradual"),
             f"drift must be 'none', 'abrupt' or 'gradual', got {drift!r}"),
            (at >= 0, f"drift_at (hours from start) must be >= 0, got {at}"),
            (drift != "gradual" or width > 0, f"drift_width (hours) must be > 0, got {width}"),
            (drift == "none" or dur is None or at < dur,
             f"drift_at ({at} h) must be before the end of the run (duration_hours = {dur}), "
             "or the drift never happens"),
            (self.new_items_per_hour >= 0, "new_items_per_hour must be >= 0"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SimulatorConfig: {msg}")


class _Cols(NamedTuple):
    """A columnar slice of the stream (one row per event)."""

    ts: np.ndarray  # int64 ms since epoch
    session: np.ndarray  # int64 session number
    item: np.ndarray  # int64 item index
    etype: np.ndarray  # int8 index into EVENT_TYPES
    user: np.ndarray  # int64 user number, -1 = none

    def take(self, idx: Any) -> _Cols:
        return _Cols(*(a[idx] for a in self))


def _concat(parts: list[_Cols]) -> _Cols:
    return _Cols(*(np.concatenate(cols) for cols in zip(*parts, strict=True)))


def _distinct_rows(rng: np.random.Generator, rows: int, size: int, k: int) -> np.ndarray:
    """``rows`` x ``k`` indices in [0, size), distinct within each row."""
    if size < 2 * k:  # small pool: a random permutation per row
        return np.argsort(rng.random((rows, size)), axis=1)[:, :k]
    out = rng.integers(0, size, (rows, k))
    while True:  # redraw rows with a repeat; few rounds since size >= 2k
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if bad.size == 0:
            return out
        out[bad] = rng.integers(0, size, (bad.size, k))


class _Sampler:
    """Popularity draws restricted to a group (topic) and to the items already
    available (a prefix of item indices, since new items are numbered in order
    of appearance), for both regimes, in one ``searchsorted``."""

    def __init__(self, weights: np.ndarray, group: np.ndarray, n_groups: int) -> None:
        n = weights.shape[1]
        self.n = n
        self.order = np.lexsort((np.arange(n), group))  # by group, then item index
        g_sorted = group[self.order]
        self.key = g_sorted.astype(np.int64) * n + self.order
        self.group_start = np.searchsorted(g_sorted, np.arange(n_groups))
        cum = np.cumsum(weights[:, self.order], axis=1)  # (2, n)
        self.cum = np.concatenate([cum[0], cum[0, -1] + cum[1]])  # regimes side by side
        self.cum0 = np.concatenate([[0.0], self.cum])

    def sample(
        self, u: np.ndarray, regime: np.ndarray, group: Any, n_avail: np.ndarray
    ) -> np.ndarray:
        start = self.group_start[group]
        end = np.searchsorted(self.key, np.asarray(group, np.int64) * self.n + n_avail)
        base = regime.astype(np.int64) * self.n
        lo, hi = self.cum0[base + start], self.cum0[base + end]
        pos = np.searchsorted(self.cum, lo + u * (hi - lo), side="right")
        pos = np.clip(pos, base + start, base + end - 1)
        return self.order[pos - base]


class _Catalogue:
    """Items with topic, price, per-regime popularity weights and successor
    tables. New items are drawn lazily in one-hour blocks from their own random
    stream, so the catalogue is the same however far or often it is extended."""

    def __init__(
        self, cfg: SimulatorConfig, rng: np.random.Generator, rng_new: np.random.Generator
    ) -> None:
        self.cfg, self.rng_new = cfg, rng_new
        n, t = cfg.n_items, cfg.n_topics
        self.n_initial = n
        self.topic_mu = rng.uniform(*np.log(_PRICE_MEDIAN_RANGE), t)
        self.topic = rng.permutation(np.arange(n) % t)  # balanced topics
        self.price = self._prices(rng, self.topic)
        ranks = np.arange(1, n + 1, dtype=np.float64) ** -cfg.zipf_exponent
        self.weight = np.empty((2, n))
        self.succ = np.empty((2, n, cfg.n_successors), np.int64)
        self.succ_w = np.empty((2, n, cfg.n_successors))
        self.members = [np.flatnonzero(self.topic == z) for z in range(t)]
        for r in (0, 1):
            self.weight[r, rng.permutation(n)] = ranks  # item perm[j] has rank j + 1
            for m in self.members:
                pick = _distinct_rows(rng, m.size, m.size - 1, cfg.n_successors)
                pick += pick >= np.arange(m.size)[:, None]  # skip the item itself
                self.succ[r, m] = m[pick]
            self.succ_w[r] = self._succ_weights(rng, n)
        self.appear_s = np.zeros(n)  # seconds from start; 0 for the initial catalogue
        self.new_appear_s = np.zeros(0)
        self.covered_s = 0.0 if cfg.new_items_per_hour > 0 else math.inf
        self._rebuild()

    def _prices(self, rng: np.random.Generator, topic: np.ndarray) -> np.ndarray:
        raw = np.exp(self.topic_mu[topic] + self.cfg.price_sigma * rng.standard_normal(topic.size))
        return np.maximum(np.round(raw, 2), 0.01)

    def _succ_weights(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        alpha = np.full(self.cfg.n_successors, self.cfg.successor_concentration)
        return -np.sort(-rng.dirichlet(alpha, rows), axis=1)  # strongest successor first

    @property
    def size(self) -> int:
        return self.topic.size

    def n_available(self, t_s: np.ndarray) -> np.ndarray:
        """Number of items available at ``t_s`` (seconds from start)."""
        return self.n_initial + np.searchsorted(self.new_appear_s, t_s, side="right")

    def extend_to(self, t_s: float) -> None:
        """Draw new items until every item appearing at or before ``t_s`` exists."""
        if self.covered_s > t_s:
            return
        cfg, rng = self.cfg, self.rng_new
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("t", "z", "p", "w", "s", "sw")}
        while self.covered_s <= t_s:
            c = int(rng.poisson(cfg.new_items_per_hour))
            times = np.sort(self.covered_s + rng.uniform(0.0, 3600.0, c))
            z = rng.integers(0, cfg.n_topics, c)
            rank = rng.integers(1, self.n_initial + 1, (2, c)).astype(np.float64)
            succ = np.empty((2, c, cfg.n_successors), np.int64)
            for r in (0, 1):  # successors of a new item: initial items of its topic
                for zz in np.unique(z):
                    rows, m = np.flatnonzero(z == zz), self.members[zz]
                    succ[r, rows] = m[_distinct_rows(rng, rows.size, m.size, cfg.n_successors)]
            parts["t"].append(times)
            parts["z"].append(z)
            parts["p"].append(self._prices(rng, z))
            parts["w"].append(rank**-cfg.zipf_exponent)
            parts["s"].append(succ)
            parts["sw"].append(np.stack([self._succ_weights(rng, c) for _ in (0, 1)]))
            self.covered_s += 3600.0
        new_t = np.concatenate(parts["t"])
        self.new_appear_s = np.concatenate([self.new_appear_s, new_t])
        self.appear_s = np.concatenate([self.appear_s, new_t])
        self.topic = np.concatenate([self.topic, *parts["z"]])
        self.price = np.concatenate([self.price, *parts["p"]])
        self.weight = np.concatenate([self.weight, *parts["w"]], axis=1)
        self.succ = np.concatenate([self.succ, *parts["s"]], axis=1)
        self.succ_w = np.concatenate([self.succ_w, *parts["sw"]], axis=1)
        logger.debug("catalogue extended to %.0f s: %d items", self.covered_s, self.size)
        self._rebuild()

    def _rebuild(self) -> None:
        n = self.size
        self.global_sampler = _Sampler(self.weight, np.zeros(n, np.int64), 1)
        self.topic_sampler = _Sampler(self.weight, self.topic, self.cfg.n_topics)
        self.succ_cum = np.cumsum(self.succ_w, axis=2)
        self.item_ids = [f"i{i:05d}" for i in range(n)]
        self.categories = [f"c{z:02d}" for z in self.topic.tolist()]
        self.prices = self.price.tolist()
        self.item_ids_arrow = pa.array(self.item_ids, pa.string())
        self.categories_arrow = pa.array(self.categories, pa.string())


class Simulator:
    """Generates the stream of a :class:`SimulatorConfig` and answers ground-truth
    questions about it. Iterating twice yields the same stream."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = cfg = config or SimulatorConfig()
        ss = np.random.SeedSequence(cfg.seed)
        s_items, s_new, self._s_sessions = ss.spawn(3)
        self._cat = _Catalogue(cfg, np.random.default_rng(s_items), np.random.default_rng(s_new))
        self._end_s = math.inf if cfg.duration_hours is None else cfg.duration_hours * 3600.0
        self._session_regimes: dict[int, np.ndarray] = {}  # chunk number -> regime per session
        self._type_cum = np.cumsum(cfg.event_type_probs)

    # ------------------------------------------------------------------ ground truth
    def _share(self, t_s: np.ndarray) -> np.ndarray:
        cfg, hours = self.config, np.asarray(t_s, np.float64) / 3600.0
        if cfg.drift == "none":
            return np.zeros_like(hours)
        if cfg.drift == "abrupt":
            return (hours >= cfg.drift_at).astype(np.float64)
        return np.clip((hours - cfg.drift_at) / cfg.drift_width, 0.0, 1.0)

    def regime_share(self, ts_ms: int) -> float:
        """Probability that a session starting at ``ts_ms`` uses regime 1."""
        return float(self._share(np.array([(ts_ms - self.config.start_ms) / 1000]))[0])

    def regime_at(self, ts_ms: int) -> int:
        """The regime most new sessions use at ``ts_ms`` (exact for 'none'/'abrupt')."""
        return int(self.regime_share(ts_ms) >= 0.5)

    def session_regime(self, session_id: str) -> int:
        """The regime a session generated so far used (KeyError for an unseen one)."""
        digits = session_id[1:]
        n = int(digits) if session_id[:1] == "s" and digits.isdigit() else -1
        chunk = self._session_regimes.get(n // _SESSIONS_PER_CHUNK) if n >= 0 else None
        if chunk is None:
            raise KeyError(f"session {session_id!r} has not been generated yet")
        return int(chunk[n % _SESSIONS_PER_CHUNK])

    def item_catalog(self, until_ms: int | None = None) -> list[dict[str, Any]]:
        """Items available at ``until_ms`` (default: the end of the run, or the items
        drawn so far for an open-ended run): item_id, category, price, appear_ts (ms)."""
        c = self._cat
        if until_ms is None and not math.isfinite(self._end_s):
            n = c.size
        else:
            t = self._end_s if until_ms is None else (until_ms - self.config.start_ms) / 1000
            c.extend_to(t)
            n = int(c.n_available(np.array([t]))[0])
        appear = (self.config.start_ms + np.floor(c.appear_s[:n] * 1000)).astype(np.int64).tolist()
        return [
            {"item_id": i, "category": z, "price": p, "appear_ts": a}
            for i, z, p, a in zip(
                c.item_ids[:n], c.categories[:n], c.prices[:n], appear, strict=True
            )
        ]

    def new_item_times(self, until_ms: int | None = None) -> dict[str, int]:
        """Appearance time (ms) of every item added after the start, up to ``until_ms``."""
        return {
            row["item_id"]: row["appear_ts"]
            for row in self.item_catalog(until_ms)[self.config.n_items :]
        }

    def item_popularity(self, regime: int, at_ms: int | None = None) -> dict[str, float]:
        """Normalised popularity under ``regime`` of the items available at ``at_ms``
        (default: the start, i.e. the initial catalogue)."""
        t = 0.0 if at_ms is None else (at_ms - self.config.start_ms) / 1000
        self._cat.extend_to(t)
        n = int(self._cat.n_available(np.array([t]))[0])
        w = self._cat.weight[self._check_regime(regime), :n]
        return dict(zip(self._cat.item_ids[:n], (w / w.sum()).tolist(), strict=True))

    def successor_table(self, regime: int) -> dict[str, list[tuple[str, float]]]:
        """Item id -> [(successor id, probability given a 'follow' step)], strongest
        first, for the items drawn so far (the initial catalogue at least)."""
        r, c = self._check_regime(regime), self._cat
        ids = c.item_ids
        succ, weight = c.succ[r].tolist(), c.succ_w[r].tolist()
        return {
            ids[i]: [(ids[j], w) for j, w in zip(succ[i], weight[i], strict=True)]
            for i in range(c.size)
        }

    @staticmethod
    def _check_regime(regime: int) -> int:
        if regime not in (0, 1):
            raise ValueError(f"regime must be 0 or 1, got {regime!r}")
        return regime

    # ------------------------------------------------------------------ generation
    def _gen_chunk(
        self, rng: np.random.Generator, chunk: int, t_last: float
    ) -> tuple[_Cols, np.ndarray]:
        """Sessions ``chunk * C .. (chunk + 1) * C - 1``; returns their events in
        (session, step) order and the session start times (seconds)."""
        cfg, cat, c = self.config, self._cat, _SESSIONS_PER_CHUNK
        starts = t_last + np.cumsum(rng.exponential(3600.0 / cfg.sessions_per_hour, c))
        length = np.minimum(rng.geometric(1.0 / cfg.mean_session_length, c), cfg.max_session_length)
        u_regime = rng.random(c)  # drawn in every mode, so regime-0 streams match across modes
        share = self._share(starts)
        regime = (u_regime < share).astype(np.int8)
        self._session_regimes[chunk] = regime
        user = np.where(rng.random(c) < cfg.user_share, rng.integers(0, cfg.n_users, c), -1)

        total = int(length.sum())
        off = np.cumsum(length) - length  # flat position of each session's first event
        sess = np.repeat(np.arange(c), length)
        gaps = rng.exponential(cfg.mean_gap_s, total)
        gaps[off] = 0.0
        cs = np.cumsum(gaps)
        t = starts[sess] + (cs - cs[off][sess])  # seconds from start, increasing per session
        etype = np.minimum(np.searchsorted(self._type_cum, rng.random(total), side="right"), 3)

        cat.extend_to(float(min(t.max(), self._end_s)))
        avail = cat.n_available(t)
        item = np.empty(total, np.int64)
        item[off] = cat.global_sampler.sample(rng.random(c), regime, 0, avail[off])
        p_follow, p_stay = cfg.p_follow, cfg.p_follow + cfg.p_topic
        for step in range(1, int(length.max())):
            act = np.flatnonzero(length > step)
            pos = off[act] + step
            prev, r = item[pos - 1], regime[act]
            u, u2 = rng.random(act.size), rng.random(act.size)
            nxt = np.empty(act.size, np.int64)
            f = u < p_follow  # follow a successor
            j = (u2[f, None] > cat.succ_cum[r[f], prev[f]]).sum(axis=1)
            nxt[f] = cat.succ[r[f], prev[f], np.minimum(j, cfg.n_successors - 1)]
            s = ~f & (u < p_stay)  # stay in topic, by popularity
            nxt[s] = cat.topic_sampler.sample(u2[s], r[s], cat.topic[prev[s]], avail[pos[s]])
            g = u >= p_stay  # jump to a globally popular item
            nxt[g] = cat.global_sampler.sample(u2[g], r[g], 0, avail[pos[g]])
            item[pos] = nxt

        ts = cfg.start_ms + np.floor(t * 1000).astype(np.int64)
        cols = _Cols(ts, sess + chunk * c, item, etype.astype(np.int8), user[sess])
        return cols.take(t < self._end_s), starts

    def _columns(self) -> Iterator[tuple[int, _Cols]]:
        """The stream as columnar slices in (ts, session, step) order, each with the
        number of its first event."""
        rng = np.random.default_rng(self._s_sessions)
        limit = self.config.n_events
        emitted, chunk, t_last = 0, 0, 0.0
        pending: _Cols | None = None
        while True:
            cols, starts = self._gen_chunk(rng, chunk, t_last)
            chunk, t_last = chunk + 1, float(starts[-1])
            merged = cols if pending is None else _concat([pending, cols])
            # Stable sort by ts keeps (session, step) order among ties.
            merged = merged.take(np.argsort(merged.ts, kind="stable"))
            done = t_last >= self._end_s
            # Later sessions start after t_last, so nothing earlier can still arrive.
            bound = self.config.start_ms + math.floor(t_last * 1000)
            cut = merged.ts.size if done else int(np.searchsorted(merged.ts, bound))
            out, pending = merged.take(slice(0, cut)), merged.take(slice(cut, None))
            if limit is not None and emitted + cut >= limit:
                yield emitted, out.take(slice(0, limit - emitted))
                return
            if cut:
                yield emitted, out
            emitted += cut
            if done:
                return

    def _dicts(self, first: int, cols: _Cols) -> list[dict[str, Any]]:
        cat = self._cat
        ids, cats, prices = cat.item_ids, cat.categories, cat.prices
        rows = zip(range(first, first + cols.ts.size), cols.session.tolist(),
                   cols.item.tolist(), cols.ts.tolist(), cols.etype.tolist(), strict=True)  # fmt: skip
        out = [
            {"event_id": f"e{n}", "session_id": f"s{s}", "item_id": ids[i], "ts": t,
             "event_type": EVENT_TYPES[e], "category": cats[i], "price": prices[i]}
            for n, s, i, t, e in rows
        ]  # fmt: skip
        users = cols.user
        for k in np.flatnonzero(users >= 0).tolist():
            out[k]["user_id"] = f"u{users[k]}"
        return out

    def events(self) -> Iterator[dict[str, Any]]:
        """Event dicts (the wire format of DESIGN section 1) in non-decreasing ts."""
        for first, cols in self._columns():
            yield from self._dicts(first, cols)

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """The same events as :meth:`events`, as lists of ``size`` dicts (the last
        may be shorter)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        buf: list[dict[str, Any]] = []
        for first, cols in self._columns():
            buf.extend(self._dicts(first, cols))
            while len(buf) >= size:
                yield buf[:size]
                del buf[:size]
        if buf:
            yield buf

    def record_batches(self, size: int = 100_000) -> Iterator[pa.RecordBatch]:
        """The same events as Arrow record batches of ``size`` rows with
        :data:`EVENT_SCHEMA` (built column-wise, no per-event Python objects)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        buf: list[pa.RecordBatch] = []
        rows = 0
        for first, cols in self._columns():
            buf.append(self._arrow(first, cols))
            rows += cols.ts.size
            while rows >= size:
                table = pa.Table.from_batches(buf).combine_chunks()
                yield table.slice(0, size).to_batches()[0]
                rest = table.slice(size)
                buf, rows = rest.to_batches(), rest.num_rows
        if rows:
            yield pa.Table.from_batches(buf).combine_chunks().to_batches()[0]

    def _arrow(self, first: int, cols: _Cols) -> pa.RecordBatch:
        def prefixed(prefix: str, values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
            return pc.binary_join_element_wise(
                prefix, pa.array(values, mask=mask).cast(pa.string()), ""
            )

        item = pa.array(cols.item)
        return pa.RecordBatch.from_arrays(
            [
                prefixed("e", np.arange(first, first + cols.ts.size)),
                prefixed("s", cols.session),
                self._cat.item_ids_arrow.take(item),
                pa.array(cols.ts, pa.int64()),
                pa.array(EVENT_TYPES, pa.string()).take(pa.array(cols.etype)),
                prefixed("u", cols.user, cols.user < 0),
                self._cat.categories_arrow.take(item),
                pa.array(self._cat.price[cols.item], pa.float64()),
            ],
            schema=EVENT_SCHEMA,
        )
