"""Transform speed of every op on one synthetic batch: ``python -m bench.feature_ops``.

Prints one Markdown table row per op: median wall time of ``transform`` over
``--repeat`` runs on ``--rows`` events (CPU unless ``--device`` says otherwise),
after one warm-up run. The numbers in docs/features-ops.md come from here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from features.ops import (
    Bucketize,
    Categorify,
    HashBucket,
    Hour,
    LogOp,
    Normalize,
    PadTruncate,
    SessionAge,
    TimeSincePrev,
    Weekday,
)


def synthetic_batch(rows: int, seed: int = 0) -> dict[str, pa.Array | np.ndarray]:
    """Zipf item ids over ~200k items, 50 categories, log-normal prices with 1% NaN,
    increasing ms timestamps, sessions of geometric length (mean 8)."""
    rng = np.random.default_rng(seed)
    items = rng.zipf(1.2, rows) % 200_000
    lengths = rng.geometric(1 / 8, rows // 4)
    lengths = lengths[np.cumsum(lengths) <= rows]
    lengths = np.append(lengths, rows - lengths.sum())
    price = rng.lognormal(3.0, 1.0, rows)
    price[rng.random(rows) < 0.01] = np.nan
    ts = 1_700_000_000_000 + np.cumsum(rng.integers(0, 60_000, rows))
    return {
        "item_id": pa.array(np.char.add("sku-", items.astype(str)).astype(object), pa.string()),
        "category": pa.array(np.char.add("cat-", (items % 50).astype(str)).astype(object)),
        "price": pa.array(price),
        "ts": pa.array(ts, pa.int64()),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }


def _median_seconds(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    b = synthetic_batch(args.rows)
    item, offsets = b["item_id"], b["offsets"]
    big_vocab = Categorify().fit(pa.array([f"sku-{i}" for i in range(1_000_000)]))
    cases: list[tuple[str, Callable[[], object]]] = []
    for label, op, col in [
        ("categorify item_id (vocab from the batch)", Categorify().fit(item), item),
        ("categorify category (50 values)", Categorify().fit(b["category"]), b["category"]),
        (
            "categorify item_id, oov_buckets=16",
            Categorify(oov_buckets=16).fit(item.slice(0, 10_000)),
            item,
        ),
        ("hash_bucket item_id (2^20 buckets)", HashBucket(num_buckets=2**20), item),
        ("normalize price", Normalize().fit(b["price"]), b["price"]),
        ("normalize price, log + clip", Normalize(log=True, clip=5.0).fit(b["price"]), b["price"]),
        ("log price", LogOp(), b["price"]),
        ("bucketize price (10 boundaries)", Bucketize([2.0**i for i in range(10)]), b["price"]),
        ("hour ts", Hour(), b["ts"]),
        ("weekday ts", Weekday(), b["ts"]),
        ("time_since_prev ts", TimeSincePrev(), b["ts"]),
        ("session_age ts", SessionAge(), b["ts"]),
    ]:
        cases.append((label, lambda op=op, col=col: op.transform(col, offsets, device=device)))
    small = item.slice(0, 10_000)
    cases.append(
        (
            "categorify 10k rows, 1M-value vocabulary",
            lambda: big_vocab.transform(small, device=device),
        )
    )
    ids = Categorify().fit(item).transform(item, device=device)
    pad = PadTruncate(max_len=50)
    cases.append(("pad_truncate item ids, max_len 50", lambda: pad.transform(ids, offsets)))

    print(f"rows={args.rows} sessions={len(offsets) - 1} device={device} repeat={args.repeat}")
    print("| op | median ms | M rows/s |")
    print("|---|---:|---:|")
    for label, fn in cases:
        seconds = _median_seconds(fn, args.repeat, device)
        rows = 10_000 if label.startswith("categorify 10k") else args.rows
        print(f"| {label} | {seconds * 1e3:.1f} | {rows / seconds / 1e6:.1f} |")


if __name__ == "__main__":
    main()
