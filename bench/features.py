"""Feature workflow: micro-batch transform throughput vs naive per-session pandas (issue text).

    python -m bench.features [--quick]

- Data: synthetic events made with numpy (seed 0): sessions of exactly 50
  events, Zipf items over 200k ids (strings ``i000123``), 20 categories, 4
  event types, log-normal prices, ``ts`` in ms with exponential gaps.
- Fit: ``Workflow(default_schema(), max_len=50).fit(window)`` on a 1M-event
  window (quick: 200k), median of 3 fits (quick: 1).
- Ours: for B in (1, 64, 1024) sessions x 50 events from a held-out stream
  (so some items are unseen -> OOV id), rows interleaved by time as a replay
  would give them. ``table`` path: ``wf.transform(SessionBatch.from_table(t))``;
  ``sessions`` path: ``wf.transform(SessionBatch.from_sessions(d, cols))`` from
  the Redis-store shape ``{session_id: [event dicts]}``. Median of 20/10/5
  calls after one warm-up.
- Baseline, same process and data: the naive per-session pandas code a user
  would write (``table.to_pandas()``, ``groupby``, per session: sort by ts,
  ``Series.map`` against the fitted vocabularies, ``pd.to_datetime`` for
  hour/weekday, ``diff`` for gaps, pad each to 50 with numpy, stack to
  tensors). It uses the same fitted state, and its output is checked equal to
  ours on B = 64 (every feature, mask and lengths; ``outputs_match``).
- ``torch.set_num_threads(1)`` for stability on a shared 2-core VM (the
  serving setting recommended in docs/features.md).
- A CUDA row for ours is added when a GPU is visible (not the headline).

Headline: events/s of the table path at B = 1024 vs the pandas baseline at
B = 1024, target ratio >= 20.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bench import _common as C
from features import SessionBatch, Workflow, default_schema
from features.batch import FeatureBatch

NAME = "features"
MAX_LEN = 50
SESSION_LEN = 50
BATCH_SIZES = (1, 64, 1024)
HEADLINE_B = 1024
TARGET_RATIO = 20.0
N_ITEMS = 200_000
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
START_MS = 1_700_000_000_000
LIBRARIES = ("numpy", "pandas", "pyarrow", "torch")
COLUMNS = ("session_id", "item_id", "ts", "event_type", "category", "price")


# ---------------------------------------------------------------------- data
def make_events(n_sessions: int, seed: int, prefix: str) -> pa.Table:
    """``n_sessions`` x 50 events, rows ordered by ts (sessions interleaved)."""
    rng = np.random.default_rng(seed)
    n = n_sessions * SESSION_LEN
    ranks = np.minimum(rng.zipf(1.1, n), N_ITEMS) - 1
    perm = np.random.default_rng(12345).permutation(N_ITEMS)  # same catalogue every seed
    items = perm[ranks]
    start = START_MS + rng.integers(0, 7 * 86_400_000, n_sessions)
    gaps = rng.exponential(30_000.0, (n_sessions, SESSION_LEN)).astype(np.int64)
    gaps[:, 0] = 0
    ts = (start[:, None] + np.cumsum(gaps, axis=1)).reshape(-1)
    sess = np.repeat(np.arange(n_sessions), SESSION_LEN)
    order = np.argsort(ts, kind="stable")
    table = pa.table({
        "session_id": pa.array([f"{prefix}{s:07d}" for s in sess[order]]),
        "item_id": pa.array([f"i{i:06d}" for i in items[order]]),
        "ts": pa.array(ts[order], pa.int64()),
        "event_type": pa.array(np.array(EVENT_TYPES)[rng.choice(4, n, p=[0.8, 0.12, 0.06, 0.02])][order]),
        "category": pa.array([f"c{c:02d}" for c in (items[order] % 20)]),
        "price": pa.array(np.round(np.exp(rng.normal(3.0, 0.8, n)), 2)[order]),
    })
    return table


def to_sessions(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """The Redis store's shape: {session_id: [event dicts, oldest first]}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        sid = row.pop("session_id")
        out.setdefault(sid, []).append(row)
    for events in out.values():
        events.sort(key=lambda e: e["ts"])
    return out


# ---------------------------------------------------------------------- baseline
class NaivePandas:
    """Per-session pandas transforms with the workflow's fitted state (ids, mean/scale)."""

    def __init__(self, wf: Workflow) -> None:
        self.maps: dict[str, dict[str, int]] = {}
        for name in ("item_id", "category", "event_type"):
            op = wf.ops[name]
            vocab = op.vocabulary.to_pylist()
            self.maps[name] = dict(zip(vocab, range(op.first_vocab_id, op.first_vocab_id + len(vocab)), strict=True))
            self.oov = op.first_oov_id
        price = wf.ops["price"]
        self.mean, self.scale = price.mean, price.scale
        self.names = wf.feature_names

    def transform(self, table: pa.Table) -> FeatureBatch:
        df = table.to_pandas()
        feats: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        lengths, sids = [], []
        for sid, g in df.groupby("session_id", sort=False):
            g = g.sort_values("ts", kind="stable").tail(MAX_LEN)
            for name, mapping in self.maps.items():
                ids = g[name].map(mapping).fillna(self.oov).astype("int64")
                ids[g[name].isna()] = 1
                feats[name].append(ids.to_numpy())
            x = np.log1p(g["price"].clip(lower=0))
            y = ((x - self.mean) / self.scale).where(np.isfinite(g["price"]), 0.0)
            feats["price"].append(y.to_numpy())
            when = pd.to_datetime(g["ts"], unit="ms", utc=True)
            feats["hour"].append((when.dt.hour + 1).to_numpy())
            feats["weekday"].append((when.dt.day_of_week + 1).to_numpy())
            gap = g["ts"].diff().fillna(0).clip(lower=0) / 1000.0
            feats["time_since_prev"].append(np.log1p(gap).to_numpy())
            age = (g["ts"] - g["ts"].iloc[0]).clip(lower=0) / 1000.0
            feats["session_age"].append(np.log1p(age).to_numpy())
            lengths.append(len(g))
            sids.append(sid)
        out: dict[str, torch.Tensor] = {}
        b = len(sids)
        for name, parts in feats.items():
            cont = name in ("price", "time_since_prev", "session_age")
            padded = np.zeros((b, MAX_LEN), np.float32 if cont else np.int64)
            for i, p in enumerate(parts):
                padded[i, : len(p)] = p
            out[name] = torch.from_numpy(padded)
        lens = torch.tensor(lengths, dtype=torch.int64)
        mask = torch.arange(MAX_LEN)[None, :] < lens[:, None]
        return FeatureBatch(features=out, mask=mask, lengths=lens, session_ids=sids)


def compare(ours: FeatureBatch, base: FeatureBatch) -> dict[str, bool]:
    res = {"session_ids": list(ours.session_ids) == list(base.session_ids)}
    for name, t in ours.features.items():
        b = base.features[name]
        ok = t.shape == b.shape and (
            torch.equal(t, b) if t.dtype == torch.int64
            else bool(np.allclose(t.numpy(), b.numpy(), atol=1e-5))
        )
        res[name] = bool(ok)
    res["mask"] = torch.equal(ours.mask, base.mask)
    res["lengths"] = torch.equal(ours.lengths, base.lengths)
    return res


# ---------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], Any], reps: int, sync: bool = False) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def row(path: str, device: str, b: int, times: list[float], reps: int) -> dict[str, Any]:
    p50 = C.median(times)
    n = b * SESSION_LEN
    return {
        "path": path, "device": device, "batch_sessions": b, "events": n, "repeats": reps,
        "latency_p50_ms": round(p50 * 1e3, 3), "latency_min_ms": round(min(times) * 1e3, 3),
        "latency_max_ms": round(max(times) * 1e3, 3), "events_per_s": round(n / p50, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k-event fit, fewer repeats (< 2 min)")
    args = ap.parse_args(argv)
    quick = args.quick
    torch.set_num_threads(1)
    fit_events = 200_000 if args.quick else 1_000_000
    fit_reps = 1 if quick else 3
    reps = {1: 5, 64: 3, 1024: 1} if quick else {1: 20, 64: 10, 1024: 5}
    base_reps = {1: 5, 64: 3, 1024: 1} if quick else {1: 10, 64: 5, 1024: 3}

    C.progress(f"generating a {fit_events:,}-event fit window")
    window = make_events(fit_events // SESSION_LEN, seed=0, prefix="s")
    held_out = make_events(max(BATCH_SIZES), seed=1, prefix="h")
    C.progress("fitting")
    fit_times, wf = [], None
    for _ in range(fit_reps):
        t0 = time.perf_counter()
        wf = Workflow(default_schema(), max_len=MAX_LEN).fit(window)
        fit_times.append(time.perf_counter() - t0)
    assert wf is not None
    fit_s = C.median(fit_times)
    del window
    naive = NaivePandas(wf)
    cols = wf.event_columns

    sids = held_out.column("session_id").unique()
    batches: dict[int, pa.Table] = {}
    for b in BATCH_SIZES:
        keep = pc.is_in(held_out.column("session_id"), value_set=sids.slice(0, b))
        batches[b] = held_out.filter(keep)
        assert batches[b].num_rows == b * SESSION_LEN

    rows: list[dict[str, Any]] = [{
        "path": "fit", "device": "cpu", "events": fit_events, "repeats": fit_reps,
        "fit_s": round(fit_s, 4), "fit_events_per_s": round(fit_events / fit_s, 1),
        "vocabulary_item_id": len(wf.ops["item_id"].vocabulary),
    }]
    # correctness check on B = 64: ours (table path and sessions path) vs the baseline
    t64 = batches[64]
    ours64 = wf.transform(SessionBatch.from_table(t64))
    base64 = naive.transform(t64)
    match = compare(ours64, base64)
    ours64s = wf.transform(SessionBatch.from_sessions(to_sessions(t64), cols))
    match_sessions = compare(ours64, ours64s)
    outputs_match = all(match.values())
    C.progress(f"outputs match on B=64: {outputs_match} {match}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for b in BATCH_SIZES:
        t = batches[b]
        sessions = to_sessions(t)
        for dev in devices:
            sync = dev == "cuda"
            C.progress(f"B={b} ours table path ({dev})")
            ts = time_calls(lambda t=t, d=dev: wf.transform(SessionBatch.from_table(t), d),
                            reps[b], sync)
            rows.append(row("ours: from_table + transform", dev, b, ts, reps[b]))
            C.progress(f"B={b} ours sessions path ({dev})")
            ts = time_calls(
                lambda s=sessions, d=dev: wf.transform(SessionBatch.from_sessions(s, cols), d),
                reps[b], sync)
            rows.append(row("ours: from_sessions + transform", dev, b, ts, reps[b]))
        C.progress(f"B={b} naive pandas baseline")
        ts = time_calls(lambda t=t: naive.transform(t), base_reps[b])
        rows.append(row("baseline: naive per-session pandas", "cpu", b, ts, base_reps[b]))

    def eps(path: str, b: int) -> float | None:
        for r in rows:
            if r["path"] == path and r.get("batch_sessions") == b and r["device"] == "cpu":
                return r["events_per_s"]
        return None

    for r in rows:
        if "batch_sessions" in r and r["device"] == "cpu":
            base = eps("baseline: naive per-session pandas", r["batch_sessions"])
            r["vs_baseline"] = round(r["events_per_s"] / base, 2) if base else None

    headline = C.make_headline(
        "workflow transform events/s at batch 1024 vs naive per-session pandas",
        eps("ours: from_table + transform", HEADLINE_B),
        eps("baseline: naive per-session pandas", HEADLINE_B),
        "events/s", target_ratio=TARGET_RATIO,
    )
    extra = {
        "outputs_match": outputs_match,
        "outputs_match_detail": match,
        "from_sessions_matches_from_table": all(match_sessions.values()),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        "load_average_1m": C.load_average(),
        "setup": {
            "fit_events": fit_events, "session_len": SESSION_LEN, "max_len": MAX_LEN,
            "n_items": N_ITEMS, "schema": "default_schema()", "data": "synthetic numpy, seed 0 "
            "(fit window) / seed 1 (held-out batches)",
        },
    }
    path = C.write_results(NAME, quick=quick, headline=headline, rows=rows,
                           libraries=LIBRARIES, extra=extra)

    table_rows = [
        [r["path"], r["device"], r["batch_sessions"], f"{r['latency_p50_ms']:.2f}",
         f"{r['events_per_s']:,.0f}",
         f"{r['vs_baseline']:.1f}x" if r.get("vs_baseline") is not None else "-"]
        for r in rows if "batch_sessions" in r
    ]
    print(C.markdown_table(
        ["path", "device", "B", "latency p50 ms", "events/s", "vs baseline"], table_rows))
    print(f"\nfit {fit_events:,} events: {fit_s:.3f} s (median of {fit_reps})")
    print(f"outputs_match (B=64): {outputs_match}; peak RSS {extra['peak_rss_mib']} MiB; "
          f"torch threads {extra['torch_threads']}")
    h = headline
    print(f"headline: {h['name']}: ours {h['ours']:,.0f} vs baseline {h['baseline']:,.0f} "
          f"-> {h['ratio']:.1f}x ({h['target']}: met={h['met']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
