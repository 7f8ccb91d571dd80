"""model.data: in-memory sequences, padded and sharded batches, splits, MovieLens-1M."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features import FeatureBatch, Workflow, default_schema, read_sequences, write_sequences
from model.data import (
    Sequences,
    epoch_order,
    eval_batches,
    item_counts,
    leave_one_out,
    next_item_split,
    rank_batches,
)
from model.ml1m import build_ml1m, ml1m_schema, read_ml1m

ML1M_USERS, ML1M_ITEMS, ML1M_ROWS = 6_040, 3_416, 999_611


def data_dir() -> Path:
    env = os.environ.get("STREAMREC_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def ml1m_path() -> Path:
    path = data_dir() / "ml-1m.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found: put SASRec's ml-1m.txt there or set STREAMREC_DATA_DIR")
    return path


def many_sessions(n: int = 23) -> Sequences:
    """Sessions of 0..6 events (every 5th empty); item ids encode (session, position)."""
    lengths = [0 if s % 5 == 3 else 1 + s % 6 for s in range(n)]
    items = [[100 * s + p for p in range(k)] for s, k in enumerate(lengths)]
    prices = [[float(s) + p / 10 for p in range(k)] for s, k in enumerate(lengths)]
    return Sequences.from_lists({"item_id": items, "price": prices})


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


def head(batch: FeatureBatch, n: int) -> FeatureBatch:
    return FeatureBatch(
        {k: v[:n] for k, v in batch.features.items()},
        batch.mask[:n],
        batch.lengths[:n],
        batch.session_ids[:n],
    )


# -- construction ---------------------------------------------------------------------


def test_from_lists_builds_flat_features_and_offsets() -> None:
    data = Sequences.from_lists(
        {"item_id": [[5, 6], [], [7, 8, 9]], "price": [[1.5, 2], [], [0, 0, 1]]}, ["a", "b", "c"]
    )
    assert len(data) == 3 and data.num_events == 5
    assert data.offsets.tolist() == [0, 2, 2, 5] and data.lengths.tolist() == [2, 0, 3]
    assert data.features["item_id"].dtype == torch.int64
    assert data.features["item_id"].tolist() == [5, 6, 7, 8, 9]
    assert data.features["price"].dtype == torch.float32
    assert data.features["price"].tolist() == [1.5, 2.0, 0.0, 0.0, 1.0]
    assert data.session_ids == ["a", "b", "c"]


def test_inconsistent_input_is_rejected_with_a_message() -> None:
    with pytest.raises(ValueError, match="other session lengths"):
        Sequences.from_lists({"item_id": [[1, 2]], "price": [[1.0]]})
    with pytest.raises(ValueError, match="non-decreasing"):
        Sequences({"x": torch.zeros(2, dtype=torch.int64)}, torch.tensor([0, 3, 2]), ["a", "b"])
    with pytest.raises(ValueError, match=r"need a \[N=3\] tensor"):
        Sequences({"x": torch.zeros(2, dtype=torch.int64)}, torch.tensor([0, 3]), ["a"])
    with pytest.raises(ValueError, match="int64 or float32"):
        Sequences({"x": torch.zeros(3, dtype=torch.float64)}, torch.tensor([0, 3]), ["a"])
    with pytest.raises(ValueError, match="2 entries for 2 sessions"):
        Sequences({"x": torch.zeros(3, dtype=torch.int64)}, torch.tensor([0, 3]), ["a", "b"])


def events_table() -> pa.Table:
    rows = [  # (session, ts, item, price); s2 has 1 event, s3 has 7
        ("s1", 30, "b", 2.0), ("s1", 10, "a", 1.0), ("s2", 5, "c", 4.0), ("s1", 20, "c", 3.0),
        *[("s3", t, "abcd"[t % 4], float(t)) for t in range(7)],
    ]  # fmt: skip
    s, ts, item, price = zip(*rows, strict=True)
    return pa.table({"session_id": s, "ts": pa.array(ts, pa.int64()), "item_id": item,
                     "price": price})  # fmt: skip


def test_parquet_round_trip_through_write_sequences(tmp_path: Path) -> None:
    events = events_table()
    wf = Workflow(default_schema(), max_len=4).fit(events)
    path = tmp_path / "train.parquet"
    write_sequences(events, wf, path, max_len=10, min_len=1, progress=False)
    data = Sequences.from_parquet(path)
    assert list(data.features) == list(wf.feature_names)
    assert data.session_ids == ["s1", "s2", "s3"] and data.lengths.tolist() == [3, 1, 7]
    table = pq.read_table(path)
    for name in wf.feature_names:
        flat = [v for row in table[name].to_pylist() for v in row]
        assert data.features[name].tolist() == flat, name
    # s1 in time order: a, c, b; items decoded back through the vocabulary
    decode = wf.ops["item_id"].decode
    assert decode(data.features["item_id"][:3]).to_pylist() == ["a", "c", "b"]
    assert data.features["price"].dtype == torch.float32
    # the same sessions again as lists: equal to from_lists
    lists = Sequences.from_lists({n: table[n].to_pylist() for n in ("item_id", "price")})
    assert torch.equal(lists.features["item_id"], data.features["item_id"])
    assert torch.equal(lists.offsets, data.offsets)
    # batches cut to 4 give exactly read_sequences of a file written with max_len 4
    path4 = tmp_path / "train4.parquet"
    write_sequences(events, wf, path4, min_len=1, progress=False)
    ours = concat(list(Sequences.from_parquet(path4).batches(batch_size=2, max_len=4)))
    assert_same(ours, concat(list(read_sequences(path4, batch_size=2))))
    assert ours.lengths.tolist() == [3, 1, 4]


def test_from_parquet_reads_chosen_features_and_names_unknown_ones(tmp_path: Path) -> None:
    events = events_table()
    wf = Workflow(default_schema(), max_len=8).fit(events)
    path = tmp_path / "train.parquet"
    write_sequences(events, wf, path, min_len=1, progress=False)
    only = Sequences.from_parquet(path, features=["item_id"])
    assert list(only.features) == ["item_id"] and only.num_events == 11
    with pytest.raises(ValueError, match="no feature"):
        Sequences.from_parquet(path, features=["item"])


# -- batches --------------------------------------------------------------------------


def test_batches_keep_the_last_max_len_events_right_padded() -> None:
    data = Sequences.from_lists(
        {"item_id": [[3, 4, 5, 6, 7], [8], [9, 10]], "price": [[1, 2, 3, 4, 5.5], [6], [7, 8]]}
    )
    first, second = list(data.batches(batch_size=2, max_len=3))
    assert first.features["item_id"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert first.features["price"].tolist() == [[3.0, 4.0, 5.5], [6.0, 0.0, 0.0]]
    assert first.mask.tolist() == [[True, True, True], [True, False, False]]
    assert first.lengths.tolist() == [3, 1] and first.session_ids == ["0", "1"]
    assert second.features["item_id"].tolist() == [[9, 10, 0]]
    assert second.lengths.tolist() == [2] and second.features["item_id"].dtype == torch.int64
    assert torch.equal(second.mask.sum(1), second.lengths)


def test_batches_skip_empty_sessions() -> None:
    data = many_sessions(23)  # sessions 3, 8, 13, 18 are empty
    got = concat(list(data.batches(batch_size=4, max_len=6)))
    expected = [str(s) for s in range(23) if s % 5 != 3]
    assert got.session_ids == expected and bool((got.lengths > 0).all())
    assert data.num_batches(4) == 5 == len(list(data.batches(4, 6)))  # ceil(19 / 4)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_session_appears_exactly_once_per_epoch(shuffle: bool) -> None:
    data = many_sessions(23)
    ids = concat(list(data.batches(5, 4, shuffle=shuffle, epoch=2))).session_ids
    assert sorted(ids) == sorted(s for s, n in zip(data.session_ids, data.lengths, strict=True) if n > 0)
    assert (ids == sorted(ids, key=int)) is not shuffle


def test_shuffle_is_reproducible_per_seed_and_epoch_and_changes_across_epochs() -> None:
    data = many_sessions(40)

    def order(**kw: int) -> list[str]:
        return concat(list(data.batches(7, 3, shuffle=True, **kw))).session_ids

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    assert order(seed=0, epoch=1) != order(seed=1, epoch=0)  # not seed + epoch


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ddp_ranks_together_equal_the_single_process_batches(
    world_size: int, shuffle: bool
) -> None:
    data = many_sessions(23)  # 19 non-empty: not a multiple of 2 or 3 (padding needed)
    bs, kw = 3, {"shuffle": shuffle, "seed": 5, "epoch": 1}
    single = list(data.batches(bs * world_size, 4, **kw))
    ranks = [list(data.batches(bs, 4, rank=r, world_size=world_size, **kw)) for r in range(world_size)]
    assert {len(r) for r in ranks} == {len(single), data.num_batches(bs, world_size)}
    order = concat(single).session_ids
    for step, expected in enumerate(single):
        parts = [r[step] for r in ranks]
        assert len({p.batch_size for p in parts}) == 1  # equal shares, last step too
        joined = concat(parts)
        assert_same(head(joined, expected.batch_size), expected)
        extra = joined.session_ids[expected.batch_size :]
        assert extra == order[: len(extra)] and len(extra) < world_size
        assert not extra or step == len(single) - 1
    covered = {s for r in ranks for b in r for s in b.session_ids}
    assert covered == set(order) and len(order) == 19


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    batch_size=st.integers(1, 6),
    world_size=st.integers(1, 5),
    seed=st.integers(0, 3),
)
def test_rank_batches_shard_any_order(n: int, batch_size: int, world_size: int, seed: int) -> None:
    order = epoch_order(torch.ones(n), shuffle=True, seed=seed)
    ranks = [list(rank_batches(order, batch_size, rank=r, world_size=world_size))
             for r in range(world_size)]  # fmt: skip
    assert len({len(r) for r in ranks}) == 1
    steps = list(zip(*ranks, strict=True))
    for i, parts in enumerate(steps):
        assert len({p.numel() for p in parts}) == 1 and parts[0].numel() <= batch_size
        joined = torch.cat(parts)
        g = batch_size * world_size
        assert torch.equal(joined[: len(order[i * g : (i + 1) * g])], order[i * g : (i + 1) * g])
    flat = torch.cat([torch.cat(p) for p in steps]) if steps else torch.zeros(0, dtype=torch.long)
    assert flat.numel() == -(-n // world_size) * world_size and set(flat.tolist()) == set(range(n))


def test_batch_arguments_are_checked() -> None:
    data = many_sessions(5)
    for kwargs, match in [
        ({"batch_size": 0, "max_len": 3}, "batch_size"),
        ({"batch_size": 2, "max_len": 0}, "max_len"),
        ({"batch_size": 2, "max_len": 3, "rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 2, "max_len": 3, "shuffle": True, "epoch": -1}, "epoch"),
    ]:
        with pytest.raises(ValueError, match=match):
            next(data.batches(**kwargs))


def test_drop_last_and_select_reshape_sessions() -> None:
    data = Sequences.from_lists({"item_id": [[3, 4, 5], [6], [7, 8]], "price": [[1, 2, 3.5], [4], [5, 6]]})
    cut = data.drop_last(2)
    assert cut.lengths.tolist() == [1, 0, 0] and cut.features["item_id"].tolist() == [3]
    assert cut.features["price"].tolist() == [1.0] and len(cut) == 3
    assert data.drop_last(0) is data
    picked = data.select(torch.tensor([2, 0, 2]))
    assert picked.session_ids == ["2", "0", "2"] and picked.lengths.tolist() == [2, 3, 2]
    assert picked.features["item_id"].tolist() == [7, 8, 3, 4, 5, 7, 8]
    assert picked.features["price"].tolist() == [5.0, 6.0, 1.0, 2.0, 3.5, 5.0, 6.0]
    masked = data.select(torch.tensor([False, True, True]))
    assert masked.session_ids == ["1", "2"] and masked.features["item_id"].tolist() == [6, 7, 8]
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        data.select(torch.tensor([3]))


# -- splits and evaluation ------------------------------------------------------------


def test_next_item_split_holds_out_each_last_item() -> None:
    data = Sequences.from_lists({"item_id": [[3, 4, 5], [6], [7, 8]]}, ["a", "b", "c"])
    history, targets = next_item_split(data)
    assert history.session_ids == ["a", "c"]  # "b" has a single event: dropped
    assert history.lengths.tolist() == [2, 1] and history.features["item_id"].tolist() == [3, 4, 7]
    assert targets.tolist() == [5, 8] and targets.dtype == torch.int64
    with pytest.raises(KeyError, match="no item feature 'item'"):
        next_item_split(data, "item")


def test_leave_one_out_follows_the_sasrec_protocol() -> None:
    items = [[10], [20, 21], [30, 31, 32], [40, 41, 42, 43, 44]]
    split = leave_one_out(Sequences.from_lists({"item_id": items}, ["u1", "u2", "u3", "u5"]))
    # users with < 3 events keep everything in train
    assert split.train.session_ids == ["u1", "u2", "u3", "u5"]
    assert split.train.lengths.tolist() == [1, 2, 1, 3]
    assert split.train.features["item_id"].tolist() == [10, 20, 21, 30, 40, 41, 42]
    valid_hist, valid_targets = split.valid
    assert valid_hist.session_ids == ["u3", "u5"]
    assert valid_hist.features["item_id"].tolist() == [30, 40, 41, 42]
    assert valid_targets.tolist() == [31, 43]
    test_hist, test_targets = split.test
    assert test_hist.session_ids == ["u3", "u5"] and test_hist.lengths.tolist() == [2, 4]
    assert test_hist.features["item_id"].tolist() == [30, 31, 40, 41, 42, 43]
    assert test_targets.tolist() == [32, 44]


def test_eval_batches_list_the_full_history_beyond_max_len() -> None:
    history = Sequences.from_lists({"item_id": [[3, 4, 5, 6, 7], [8], [9, 10]]})
    first, second = list(eval_batches(history, torch.tensor([11, 12, 13]), 2, max_len=2))
    assert first.inputs.features["item_id"].tolist() == [[6, 7], [8, 0]]
    assert first.targets.tolist() == [[11], [12]] and first.targets.shape == (2, 1)
    assert first.seen.tolist() == [[0, 0, 0, 0, 0, 1], [3, 4, 5, 6, 7, 8]]
    assert second.seen.tolist() == [[0, 0], [9, 10]] and second.targets.tolist() == [[13]]
    assert second.inputs.session_ids == ["2"]


def test_eval_batches_reject_bad_queries() -> None:
    history = Sequences.from_lists({"item_id": [[3], []]})
    with pytest.raises(ValueError, match="one per history"):
        next(eval_batches(history, torch.tensor([5]), 2, 4))
    with pytest.raises(ValueError, match="1 histories are empty"):
        next(eval_batches(history, torch.tensor([5, 6]), 2, 4))


def test_item_counts_is_a_bincount_over_all_events() -> None:
    data = Sequences.from_lists({"item_id": [[3, 4, 4], [], [6, 3]]})
    assert item_counts(data, 8).tolist() == [0, 0, 0, 2, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="num_items=6"):
        item_counts(data, 6)


# -- MovieLens-1M -----------------------------------------------------------------------


def test_read_ml1m_has_the_sasrec_counts_in_file_order() -> None:
    events = read_ml1m(ml1m_path())
    assert events.column_names == ["session_id", "item_id", "ts"]
    assert events.num_rows == ML1M_ROWS
    assert len(events["session_id"].unique()) == ML1M_USERS
    assert len(events["item_id"].unique()) == ML1M_ITEMS
    with ml1m_path().open() as f:
        lines = [next(f).split() for _ in range(5)]
    assert events.slice(0, 5).to_pylist() == [
        {"session_id": u, "item_id": i, "ts": n} for n, (u, i) in enumerate(lines)
    ]
    assert events["ts"].type == pa.int64()


def test_build_ml1m_keeps_full_histories_and_reuses_its_files(tmp_path: Path) -> None:
    with ml1m_path().open() as f:
        lines = [next(f) for _ in range(5_000)]
    source = tmp_path / "ml-1m-head.txt"
    source.write_text("".join(lines))
    out = tmp_path / "built"
    wf, path = build_ml1m(source, out, max_len=20)
    assert path == out / "ml1m.parquet" and path.is_file()
    assert (out / "workflow" / "workflow.json").is_file() and wf.max_len == 20
    assert Workflow.load(out / "workflow").fingerprint == wf.fingerprint
    assert wf.schema.names == ml1m_schema().names
    data = Sequences.from_parquet(path)
    users = Counter(line.split()[0] for line in lines)
    assert data.session_ids == list(users) and data.lengths.tolist() == list(users.values())
    assert max(users.values()) > 20  # full histories, not cut to max_len
    decoded = wf.ops["item_id"].decode(data.features["item_id"]).to_pylist()
    assert decoded == [line.split()[1] for line in lines]  # file order within each user
    stamps = {p: p.stat().st_mtime_ns for p in (path, out / "workflow" / "workflow.json")}
    again, _ = build_ml1m(source, out, max_len=20)
    assert again.fingerprint == wf.fingerprint
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not rewritten
    source.write_text("".join(lines[:3_000]))  # the source changed: rebuild
    _, path = build_ml1m(source, out, max_len=20)
    assert Sequences.from_parquet(path).num_events == 3_000


# -- devices ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_batches_agree() -> None:
    data = many_sessions(23)
    cpu = list(data.batches(4, 3, shuffle=True, rank=1, world_size=2))
    gpu = list(data.to("cuda").batches(4, 3, shuffle=True, rank=1, world_size=2))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda"
        assert_same(a, b.to("cpu"))
    history, targets = next_item_split(data)
    for a, b in zip(
        eval_batches(history, targets, 5, 3),
        eval_batches(history.to("cuda"), targets.cuda(), 5, 3),
        strict=True,
    ):
        assert_same(a.inputs, b.inputs.to("cpu"))
        assert torch.equal(a.seen, b.seen.cpu()) and torch.equal(a.targets, b.targets.cpu())
