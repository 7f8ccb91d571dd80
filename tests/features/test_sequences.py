"""Training sequences: write_sequences / read_sequences against Workflow.transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from features import (
    FeatureBatch,
    SessionBatch,
    Workflow,
    default_schema,
    read_sequences,
    sequences_metadata,
    write_sequences,
)

T0 = 1_700_000_000_000


def make_events(n_sessions: int, *, seed: int = 0, long_every: int = 0) -> pa.Table:
    """Shuffled events: Zipf items, categories, prices with NaN, sessions of 1..~40 events
    (every ``long_every``-th session 120 events long)."""
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1 / 6, n_sessions)
    if long_every:
        lengths[::long_every] = 120
    n = int(lengths.sum())
    sess = np.repeat(np.arange(n_sessions), lengths)
    items = rng.zipf(1.3, n) % 3_000
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps = np.cumsum(rng.integers(500, 200_000, n))
    price = rng.lognormal(3.0, 1.0, n)
    price[rng.random(n) < 0.02] = np.nan
    table = pa.table(
        {
            "session_id": pa.array(np.char.add("s", sess.astype(str)).tolist()),
            "item_id": pa.array(np.char.add("sku-", items.astype(str)).tolist()),
            "ts": pa.array(
                T0 + rng.integers(0, 86_400_000, n_sessions)[sess] + gaps - gaps[first][sess],
                pa.int64(),
            ),
            "event_type": pa.array(rng.choice(["view", "click", "purchase"], n).tolist()),
            "category": pa.array(np.char.add("c", (items % 15).astype(str)).tolist()),
            "price": pa.array(price),
        }
    )
    return table.take(pa.array(rng.permutation(n)))


def concat(batches: list[FeatureBatch]) -> FeatureBatch:
    return FeatureBatch(
        {k: torch.cat([b.features[k] for b in batches]) for k in batches[0].features},
        torch.cat([b.mask for b in batches]),
        torch.cat([b.lengths for b in batches]),
        [s for b in batches for s in b.session_ids],
    )


def assert_same(a: FeatureBatch, b: FeatureBatch) -> None:
    assert a.session_ids == b.session_ids
    assert torch.equal(a.mask, b.mask) and torch.equal(a.lengths, b.lengths)
    assert a.features.keys() == b.features.keys()
    for name in a.features:
        assert a.features[name].dtype == b.features[name].dtype, name
        assert torch.equal(a.features[name], b.features[name]), name


@pytest.fixture(scope="module")
def events() -> pa.Table:
    return make_events(600, seed=1, long_every=25)


@pytest.fixture(scope="module")
def workflow(events: pa.Table) -> Workflow:
    return Workflow(default_schema(), max_len=30).fit(events)


def test_round_trip_equals_transform_of_the_same_sessions(
    events: pa.Table, workflow: Workflow, tmp_path: Path
) -> None:
    path = tmp_path / "train.parquet"
    n = write_sequences(events, workflow, path, min_len=1, progress=False, sessions_per_group=64)
    assert n == 600 == pq.ParquetFile(path).metadata.num_rows
    assert pq.ParquetFile(path).metadata.num_row_groups == 10  # ceil(600 / 64)
    got = concat(list(read_sequences(path, batch_size=100)))
    assert_same(got, workflow.transform_table(events))  # long sessions included


def test_columns_are_encoded_lists_with_length_and_last_ts(
    events: pa.Table, workflow: Workflow, tmp_path: Path
) -> None:
    path = tmp_path / "train.parquet"
    write_sequences(events, workflow, path, progress=False)
    table = pq.read_table(path)
    schema = table.schema
    assert schema.names == ["session_id", *workflow.feature_names, "length", "last_ts"]
    assert schema.field("item_id").type == pa.list_(pa.int64())
    assert schema.field("price").type == pa.list_(pa.float32())
    lengths = table["length"].to_numpy()
    assert np.array_equal(pc.list_value_length(table["item_id"]).to_numpy(), lengths)
    last = events.group_by("session_id").aggregate([("ts", "max")])
    expect = dict(zip(last["session_id"].to_pylist(), last["ts_max"].to_pylist(), strict=True))
    assert all(
        expect[s] == t
        for s, t in zip(table["session_id"].to_pylist(), table["last_ts"].to_pylist(), strict=True)
    )
    meta = sequences_metadata(path)
    assert meta["fingerprint"] == workflow.fingerprint and meta["max_len"] == 30


def test_min_len_drops_short_sessions_and_max_len_keeps_the_last_events(
    events: pa.Table, workflow: Workflow, tmp_path: Path
) -> None:
    sizes = events.group_by("session_id").aggregate([("ts", "count")])
    path = tmp_path / "s.parquet"
    n = write_sequences(events, workflow, path, max_len=8, min_len=3, progress=False)
    assert n == int(pc.sum(pc.greater_equal(sizes["ts_count"], 3)).as_py())
    table = pq.read_table(path)
    assert int(pc.min(table["length"]).as_py()) >= 3 and int(pc.max(table["length"]).as_py()) == 8
    batch = SessionBatch.from_table(events, session_ids=table["session_id"].to_pylist())
    last8 = batch.truncate(8)
    expected = workflow.ops["item_id"].transform(last8.columns["item_id"])
    assert np.array_equal(pc.list_flatten(table["item_id"]).to_numpy(), expected.numpy())
    out = next(read_sequences(path, batch_size=10_000))
    assert out.seq_len == 8 and bool((out.lengths >= 3).all())
    with pytest.raises(ValueError, match="min_len"):
        write_sequences(events, workflow, path, max_len=4, min_len=5, progress=False)


def test_progress_bar_goes_to_stderr_only_when_asked(
    events: pa.Table, workflow: Workflow, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_sequences(events, workflow, tmp_path / "a.parquet", progress=True)
    captured = capsys.readouterr()
    assert "session" in captured.err and captured.out == ""
    write_sequences(events, workflow, tmp_path / "b.parquet", progress=False)
    assert capsys.readouterr().err == ""


def test_tables_split_by_session_give_the_same_rows(
    events: pa.Table, workflow: Workflow, tmp_path: Path
) -> None:
    write_sequences(events, workflow, tmp_path / "one.parquet", progress=False)
    bucket = pc.cast(pc.utf8_slice_codeunits(events["session_id"], -1, 100), pa.int64())
    parts = [events.filter(pc.equal(pc.bit_wise_and(bucket, 1), p)) for p in (0, 1)]
    write_sequences(iter(parts), workflow, tmp_path / "two.parquet", progress=False)
    one = pq.read_table(tmp_path / "one.parquet").sort_by("session_id")
    two = pq.read_table(tmp_path / "two.parquet").sort_by("session_id")
    assert one.equals(two)


def test_a_session_split_across_tables_is_an_error(
    events: pa.Table, workflow: Workflow, tmp_path: Path
) -> None:
    halves = [events.slice(0, 1000), events.slice(1000)]  # random rows: sessions span both
    with pytest.raises(ValueError, match="appear in two input tables"):
        write_sequences(halves, workflow, tmp_path / "x.parquet", progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file left behind


def test_no_session_long_enough_writes_an_empty_file(workflow: Workflow, tmp_path: Path) -> None:
    one = pa.table({"session_id": ["a", "b"], "ts": [T0, T0], "item_id": ["x", "y"]})
    assert write_sequences(one, workflow, tmp_path / "e.parquet", progress=False) == 0
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    assert list(read_sequences(tmp_path / "e.parquet")) == []


def test_reading_another_parquet_file_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="write_sequences"):
        next(read_sequences(tmp_path / "other.parquet"))
