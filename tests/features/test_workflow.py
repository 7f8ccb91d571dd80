"""The feature workflow: fit, transform, save/load, growth, and each robustness rule.

The rules tested here are the table in docs/features.md; every test builds its
own events with numpy (no ingest import: features must not depend on it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from features import (
    Feature,
    FeatureBatch,
    Kind,
    Schema,
    SchemaError,
    SessionBatch,
    Tag,
    Workflow,
    default_schema,
)
from features.ops import NULL_ID, PAD_ID, NotFittedError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC, a Tuesday
OOV_ID = 2  # Categorify's single out-of-vocabulary id
COLUMNS = ["ts", "item_id", "event_type", "category", "price", "user_id"]


def make_events(
    n_sessions: int,
    *,
    seed: int = 0,
    length: int | None = None,
    n_items: int = 5_000,
    shuffle: bool = True,
) -> pa.Table:
    """Simulator-like events: Zipf items, 20 categories, log-normal prices (some null,
    NaN, inf), event types, increasing timestamps per session, rows shuffled."""
    rng = np.random.default_rng(seed)
    lengths = np.full(n_sessions, length) if length else rng.geometric(1 / 6, n_sessions)
    n = int(lengths.sum())
    sess = np.repeat(np.arange(n_sessions), lengths)
    items = rng.zipf(1.3, n) % n_items
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps = np.cumsum(rng.integers(500, 300_000, n))
    ts = T0 + rng.integers(0, 14 * 86_400_000, n_sessions)[sess] + gaps - gaps[first][sess]
    price = rng.lognormal(3.0, 1.0, n)
    price[rng.random(n) < 0.02] = np.nan
    price[rng.random(n) < 0.01] = np.inf
    price_mask = rng.random(n) < 0.05  # null
    kinds = np.array(["view", "click", "add_to_cart", "purchase"])
    table = pa.table(
        {
            "event_id": pa.array([f"e{i}" for i in range(n)]),
            "session_id": pa.array(np.char.add("s", sess.astype(str)).tolist()),
            "item_id": pa.array(np.char.add("sku-", items.astype(str)).tolist()),
            "ts": pa.array(ts, pa.int64()),
            "event_type": pa.array(kinds[rng.choice(4, n, p=[0.6, 0.3, 0.07, 0.03])].tolist()),
            "user_id": pa.array([None if i % 3 else f"u{i % 97}" for i in range(n)], pa.string()),
            "category": pa.array(np.char.add("cat-", (items % 20).astype(str)).tolist()),
            "price": pa.array(price, mask=price_mask),
        }
    )
    return table.take(pa.array(rng.permutation(n))) if shuffle else table


def as_sessions(batch: SessionBatch, columns: list[str]) -> dict[str, list[dict]]:
    """What the Redis store returns for the sessions of ``batch`` (nulls left out)."""
    rows = batch.columns.select(columns).to_pylist()
    return {
        sid: [{k: v for k, v in r.items() if v is not None} for r in rows[lo:hi]]
        for sid, lo, hi in zip(
            batch.session_ids, batch.offsets[:-1], batch.offsets[1:], strict=True
        )
    }


def assert_same(a: FeatureBatch, b: FeatureBatch, *, exact: bool = True) -> None:
    assert a.session_ids == b.session_ids
    assert a.features.keys() == b.features.keys()
    assert torch.equal(a.mask.cpu(), b.mask.cpu()) and torch.equal(a.lengths.cpu(), b.lengths.cpu())
    for name in a.features:
        x, y = a.features[name].cpu(), b.features[name].cpu()
        assert x.dtype == y.dtype, name
        if exact or x.dtype == torch.int64:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def window() -> pa.Table:
    return make_events(2_000, seed=1)


@pytest.fixture(scope="module")
def fitted(window: pa.Table) -> Workflow:
    return Workflow(default_schema(), max_len=20).fit(window)


# -- shapes, dtypes, a hand-checked example ---------------------------------------------


def test_transform_gives_padded_tensors_of_the_schema(fitted: Workflow, window: pa.Table) -> None:
    batch = SessionBatch.from_table(window.slice(0, 700))
    out = fitted.transform(batch)
    b, n = batch.num_sessions, len(default_schema())
    assert list(out.features) == list(default_schema().names) and len(out.features) == n
    assert out.mask.shape == (b, 20) and out.mask.dtype == torch.bool
    assert torch.equal(out.lengths, torch.from_numpy(np.minimum(batch.lengths, 20)))
    assert torch.equal(out.mask.sum(1), out.lengths)
    cards = fitted.cardinalities
    for name, t in out.features.items():
        kind = default_schema()[name].kind
        assert t.shape == (b, 20) and t.device.type == "cpu" and t.is_contiguous()
        assert t.dtype == (torch.int64 if kind is Kind.CATEGORICAL else torch.float32)
        assert bool((t[~out.mask] == 0).all()), f"{name}: padding must be 0"
        if kind is Kind.CATEGORICAL:
            real = t[out.mask]
            assert bool((real >= 1).all() & (real < cards[name]).all()), name
        else:
            assert bool(torch.isfinite(t).all()), name
    assert fitted.schema["item_id"].cardinality == cards["item_id"] > 1000
    assert cards["hour"] == 25 and cards["weekday"] == 8 and cards["event_type"] == 2 + 1 + 4


def test_a_hand_checked_example() -> None:
    h13 = 13 * 3_600_000
    rows = [  # s1 listed first but out of time order; s2 in between
        ("s1", 4000, "a", "x", 99.0, "purchase"),
        ("s2", h13, "c", "x", 9.0, "view"),
        ("s1", 0, "a", "x", 9.0, "view"),
        ("s1", 1000, "b", "y", None, "click"),
    ]
    names = ["session_id", "ts", "item_id", "category", "price", "event_type"]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(names)})
    wf = Workflow(default_schema(), max_len=4).fit(table)
    out = wf.transform_table(table)
    f = out.features
    # Vocabularies: most frequent first, ties by value, from id 3 (0 pad, 1 null, 2 OOV).
    assert out.session_ids == ["s1", "s2"]
    assert f["item_id"].tolist() == [[3, 4, 3, 0], [5, 0, 0, 0]]  # a=3, b=4, c=5
    assert f["category"].tolist() == [[3, 4, 3, 0], [3, 0, 0, 0]]  # x=3, y=4
    assert f["event_type"].tolist() == [[3, 4, 5, 0], [3, 0, 0, 0]]  # view, click, purchase
    assert f["hour"].tolist() == [[1, 1, 1, 0], [14, 0, 0, 0]]
    assert f["weekday"].tolist() == [[4, 4, 4, 0], [4, 0, 0, 0]]  # 1970-01-01 was a Thursday
    # log1p prices 9, 99, 9 -> ln 10, ln 100, ln 10: z-scores -1/sqrt2, sqrt2; null -> 0.
    r2 = math.sqrt(2)
    torch.testing.assert_close(f["price"], torch.tensor([[-1 / r2, 0, r2, 0], [-1 / r2, 0, 0, 0]]))
    torch.testing.assert_close(
        f["time_since_prev"].expm1(), torch.tensor([[0.0, 1, 3, 0], [0, 0, 0, 0]])
    )
    torch.testing.assert_close(
        f["session_age"].expm1(), torch.tensor([[0.0, 1, 4, 0], [0, 0, 0, 0]])
    )
    assert out.lengths.tolist() == [3, 1]
    assert out.mask.tolist() == [[True, True, True, False], [True, False, False, False]]


# -- save / load, growth -------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_tensors(
    fitted: Workflow, window: pa.Table, tmp_path: Path
) -> None:
    fitted.save(tmp_path / "wf")
    files = sorted(p.name for p in (tmp_path / "wf").iterdir())
    assert "workflow.json" in files and all(n.endswith((".json", ".parquet")) for n in files)
    doc = json.loads((tmp_path / "wf" / "workflow.json").read_text())
    assert doc["format"] == "streamrec.workflow/1" and doc["fingerprint"] == fitted.fingerprint
    assert Schema.from_dict(doc["schema"]) == fitted.schema  # with cardinalities
    loaded = Workflow.load(tmp_path / "wf")
    assert loaded.fingerprint == fitted.fingerprint
    assert loaded.cardinalities == fitted.cardinalities and loaded.max_len == fitted.max_len
    batch = SessionBatch.from_table(make_events(300, seed=7))  # unseen items included
    assert_same(loaded.transform(batch), fitted.transform(batch))


def test_growth_after_load_continues_the_pending_counts(tmp_path: Path) -> None:
    schema = default_schema().with_feature(
        Feature(
            "item_id",
            Kind.CATEGORICAL,
            tags={Tag.ITEM_ID},
            transform={"op": "categorify", "min_freq": 2},
        )
    )
    first, more = make_events(300, seed=2), make_events(300, seed=3)
    wf = Workflow(schema, max_len=10).fit(first)
    Workflow.load(wf.save(tmp_path / "wf")).partial_fit(more).save(tmp_path / "again")
    assert Workflow.load(tmp_path / "again").fingerprint == wf.partial_fit(more).fingerprint


def test_load_refuses_files_from_different_saves(
    fitted: Workflow, window: pa.Table, tmp_path: Path
) -> None:
    other = Workflow(default_schema(), max_len=20).fit(make_events(100, seed=9))
    fitted.save(tmp_path / "a")
    other.save(tmp_path / "b")
    (tmp_path / "b" / "workflow.json").replace(tmp_path / "a" / "workflow.json")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        Workflow.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no saved workflow"):
        Workflow.load(tmp_path / "nothing")


def test_extend_keeps_every_existing_id(fitted: Workflow, window: pa.Table) -> None:
    wf = Workflow(default_schema(), max_len=20).fit(window)
    batch = SessionBatch.from_table(window)
    before, cards = wf.transform(batch), wf.cardinalities
    new = make_events(200, seed=5, n_items=50_000)  # mostly items the window lacks
    wf.extend(new)
    after = wf.transform(batch)
    for name in cards:  # ids never change; normalisation statistics do move
        assert torch.equal(after.features[name], before.features[name]), name
    assert not torch.equal(after.features["price"], before.features["price"])
    assert wf.cardinalities["item_id"] > cards["item_id"]
    grown = wf.transform(SessionBatch.from_table(new)).features["item_id"]
    assert int(grown.max()) >= cards["item_id"]  # new items got new ids, after the old ones
    assert wf.rows_fitted == window.num_rows + new.num_rows


def test_fit_in_chunks_admits_the_same_values(window: pa.Table) -> None:
    whole = Workflow(default_schema()).fit(window)
    chunked = Workflow(default_schema()).fit(window.to_batches(max_chunksize=1_000))
    assert chunked.cardinalities == whole.cardinalities
    for name in ("item_id", "category"):
        assert set(chunked.ops[name].vocabulary.to_pylist()) == set(
            whole.ops[name].vocabulary.to_pylist()
        )
    assert chunked.ops["price"].mean == pytest.approx(whole.ops["price"].mean, rel=1e-12)


def test_fit_takes_a_dataframe_with_to_arrow(window: pa.Table) -> None:
    class FakeCudf:  # cuDF / polars frames expose to_arrow()
        def to_arrow(self) -> pa.Table:
            return window

    assert (
        Workflow(default_schema()).fit(FakeCudf()).fingerprint
        == Workflow(default_schema()).fit(window).fingerprint
    )


# -- robustness rules (docs/features.md) ---------------------------------------------------


def test_unseen_categories_get_the_oov_id(fitted: Workflow) -> None:
    table = pa.table(
        {
            "session_id": ["n"] * 2,
            "ts": [T0, T0 + 1],
            "item_id": ["never", "seen"],
            "category": ["new-cat", None],
            "event_type": ["teleport", "view"],
        }
    )
    f = fitted.transform_table(table).features
    assert f["item_id"][0, :2].tolist() == [OOV_ID, OOV_ID]
    assert f["category"][0, :2].tolist() == [OOV_ID, NULL_ID]  # unseen != missing
    assert f["event_type"][0, 0] == OOV_ID


def test_missing_optional_fields_are_null_ids_and_zeros(fitted: Workflow) -> None:
    table = pa.table(
        {
            "session_id": ["a", "a", "b"],
            "ts": [T0, T0 + 5, T0],
            "item_id": ["sku-1", "sku-2", "sku-1"],
        }
    )  # no category, price, event_type
    out = fitted.transform_table(table)
    m = out.mask
    assert bool((out.features["category"][m] == NULL_ID).all())
    assert bool((out.features["event_type"][m] == NULL_ID).all())
    assert bool((out.features["price"] == 0).all())
    nulls = table.append_column("price", pa.array([None, 3.0, None], pa.float64()))
    price = fitted.transform_table(nulls).features["price"]
    assert price[0, 0] == 0 and price[1, 0] == 0 and price[0, 1] != 0


def test_missing_required_columns_are_an_error(fitted: Workflow) -> None:
    with pytest.raises(ValueError, match="item_id"):
        fitted.transform_table(pa.table({"session_id": ["a"], "ts": [T0], "price": [1.0]}))
    with pytest.raises(ValueError, match="'ts'"):
        fitted.transform_table(pa.table({"session_id": ["a"], "item_id": ["x"]}))


def test_empty_sessions_are_all_padding_rows(fitted: Workflow) -> None:
    events = {"e": [], "x": [{"ts": T0, "item_id": "sku-1", "price": 4.0}], "f": []}
    out = fitted.transform(SessionBatch.from_sessions(events, COLUMNS))
    assert out.session_ids == ["e", "x", "f"] and out.lengths.tolist() == [0, 1, 0]
    assert not bool(out.mask[[0, 2]].any())
    for t in out.features.values():
        assert bool((t[[0, 2]] == PAD_ID).all())
    none = fitted.transform(SessionBatch.from_sessions({"e": []}, COLUMNS))
    assert none.mask.shape == (1, 20) and int(none.lengths[0]) == 0
    zero = fitted.transform(SessionBatch.empty())
    assert zero.batch_size == 0 and all(t.shape == (0, 20) for t in zero.features.values())


def test_nan_and_inf_in_continuous_fields_become_zero(fitted: Workflow) -> None:
    price = [float("nan"), float("inf"), -float("inf"), 20.0]
    table = pa.table(
        {
            "session_id": ["p"] * 4,
            "ts": [T0 + i for i in range(4)],
            "item_id": ["sku-1"] * 4,
            "price": price,
        }
    )
    got = fitted.transform_table(table).features["price"][0, :4]
    assert got[:3].tolist() == [0.0, 0.0, 0.0] and bool(torch.isfinite(got).all()) and got[3] != 0


def test_very_long_sessions_keep_their_last_max_len_events(fitted: Workflow) -> None:
    long = make_events(1, seed=11, length=10_000)
    batch = SessionBatch.from_table(long)
    out = fitted.transform(batch)
    assert out.lengths.tolist() == [20] and bool(out.mask.all())
    tail = batch.columns.slice(10_000 - 20)
    expected = fitted.ops["item_id"].transform(tail["item_id"])
    assert torch.equal(out.features["item_id"][0], expected)
    # Truncate, then encode: time features start again at the first kept event.
    assert out.features["session_age"][0, 0] == 0 and out.features["time_since_prev"][0, 0] == 0
    assert_same(out, fitted.transform(SessionBatch(["s0"], np.array([0, 20]), tail)))


def test_events_out_of_time_order_are_sorted_by_ts(fitted: Workflow, window: pa.Table) -> None:
    table = window.slice(0, 500)  # shuffled rows
    batch = SessionBatch.from_table(table)
    by_time = table.sort_by([("ts", "ascending")])
    in_order = SessionBatch.from_table(by_time, session_ids=batch.session_ids)
    assert_same(fitted.transform(batch), fitted.transform(in_order))
    ts = batch.columns["ts"].to_numpy()
    starts = np.zeros(len(ts), bool)
    starts[batch.offsets[:-1][batch.lengths > 0]] = True
    assert bool(np.all((np.diff(ts) >= 0) | starts[1:]))
    sessions = {sid: list(reversed(evs)) for sid, evs in as_sessions(batch, COLUMNS).items()}
    assert_same(
        fitted.transform(SessionBatch.from_sessions(sessions, COLUMNS)), fitted.transform(batch)
    )


# -- batch constructors, schema handling, devices --------------------------------------------


def test_from_table_and_from_sessions_give_identical_batches(
    fitted: Workflow, window: pa.Table
) -> None:
    batch = SessionBatch.from_table(window.slice(0, 1_000), columns=COLUMNS)
    sessions = as_sessions(batch, COLUMNS)  # store-like: optional nulls are absent keys
    for evs in list(sessions.values())[::7]:
        for ev in evs:
            ev.pop("price", None)  # some events lack an optional field entirely
    stripped = pa.table(
        {c: [ev.get(c) for evs in sessions.values() for ev in evs] for c in COLUMNS}
    )
    via_table = SessionBatch(batch.session_ids, batch.offsets, stripped)
    via_store = SessionBatch.from_sessions(sessions, fitted.event_columns)
    assert via_store.session_ids == batch.session_ids
    assert_same(fitted.transform(via_store), fitted.transform(via_table))


def test_from_table_with_session_ids_orders_and_fills(window: pa.Table) -> None:
    batch = SessionBatch.from_table(window, session_ids=["s5", "nobody", "s1"])
    assert batch.session_ids == ["s5", "nobody", "s1"] and batch.lengths[1] == 0
    ids = pc.equal(window["session_id"], "s1")
    assert batch.lengths[2] == pc.sum(ids).as_py()
    ts = batch.columns["ts"].to_numpy()
    assert bool(np.all(np.diff(ts[batch.offsets[2] :]) >= 0))


def test_transform_mutates_neither_the_batch_nor_the_workflow(
    fitted: Workflow, window: pa.Table
) -> None:
    batch = SessionBatch.from_table(window.slice(0, 300))
    columns, fp = repr(batch.columns.to_pydict()), fitted.fingerprint  # repr: nan == nan
    fitted.transform(batch)
    assert repr(batch.columns.to_pydict()) == columns and fitted.fingerprint == fp
    assert not batch.offsets.flags.writeable


def test_session_batch_checks_its_offsets() -> None:
    t = pa.table({"ts": [1, 2, 3]})
    with pytest.raises(ValueError, match="B \\+ 1"):
        SessionBatch(["a"], np.array([0, 1, 3]), t)
    with pytest.raises(ValueError, match="from 0 to the number of rows"):
        SessionBatch(["a", "b"], np.array([0, 2, 1]), t)


def test_pad_to_longest_shortens_l(fitted: Workflow, window: pa.Table) -> None:
    wf = Workflow(default_schema(), max_len=20, pad_to="longest").fit(window)
    batch = SessionBatch.from_table(window).slice(0, 5)
    out = wf.transform(batch)
    assert out.seq_len == min(20, int(batch.lengths.max()))


def test_transform_before_fit_is_an_error() -> None:
    with pytest.raises(NotFittedError, match="item_id"):
        Workflow(default_schema()).transform(SessionBatch.empty())


def test_the_session_key_feature_is_skipped_and_checked() -> None:
    key = Feature(
        "session_id", Kind.CATEGORICAL, tags={Tag.SESSION_ID}, transform={"op": "identity"}
    )
    wf = Workflow(default_schema().with_feature(key))
    assert "session_id" not in wf.feature_names and wf.session_col == "session_id"
    bad = dataclasses.replace(key, transform={"op": "categorify"})
    with pytest.raises(SchemaError, match="grouping key"):
        Workflow(default_schema().with_feature(bad))


def test_unsupported_features_are_clear_errors() -> None:
    genres = Feature("genres", Kind.LIST, dtype="int64", transform={"op": "categorify"})
    with pytest.raises(NotImplementedError, match="genres"):
        Workflow(default_schema().with_feature(genres))
    wrong = Feature("price", Kind.CATEGORICAL, transform={"op": "normalize"})
    with pytest.raises(SchemaError, match="price"):
        Workflow(default_schema().with_feature(wrong))
    typo = Feature("price", Kind.CONTINUOUS, transform={"op": "normalize", "lg": True})
    with pytest.raises(SchemaError, match="unknown parameter"):
        Workflow(default_schema().with_feature(typo))


@pytest.mark.gpu
@CUDA
def test_cpu_and_cuda_agree(fitted: Workflow, window: pa.Table) -> None:
    batch = SessionBatch.from_table(window.slice(0, 2_000))
    gpu = fitted.transform(batch, device="cuda")
    assert all(t.device.type == "cuda" for t in (*gpu.features.values(), gpu.mask, gpu.lengths))
    assert_same(gpu, fitted.transform(batch), exact=False)
    assert_same(gpu.to("cpu"), fitted.transform(batch, device="cpu"), exact=False)


def test_arrays_are_stored_as_parquet_not_pickle(fitted: Workflow, tmp_path: Path) -> None:
    fitted.save(tmp_path)
    vocab = [p for p in tmp_path.glob("*.parquet") if "item_id" in p.name]
    assert len(vocab) == 1
    table = pq.read_table(vocab[0])
    assert table["vocab_values"].drop_null().to_pylist() == (
        fitted.ops["item_id"].vocabulary.to_pylist()
    )


def test_from_sessions_names_a_field_with_mixed_types() -> None:
    events = {"a": [{"ts": T0, "price": 3}, {"ts": T0 + 1, "price": "cheap"}]}
    with pytest.raises(ValueError, match="'price'"):
        SessionBatch.from_sessions(events, ["ts", "price"])
    ints = {"a": [{"ts": T0, "price": 3}, {"ts": T0 + 1, "price": 4}]}
    typed = SessionBatch.from_sessions(ints, ["ts", "price"], types={"price": pa.float64()})
    assert typed.columns["price"].type == pa.float64()
