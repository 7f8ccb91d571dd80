"""Feature ops: one shared suite run over every op, then op-specific behaviour.

The shared suite (STYLE principle 9) is parametrised over ``CASES``: one or
more per registered op, each with a fitting column, a transform column that
holds the op's edge values (unseen values, nulls, NaN, ±inf, empty sessions)
and the output the documented rule (docs/features-ops.md) gives for it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features.ops import (
    NULL_ID,
    OPS,
    Bucketize,
    Categorify,
    HashBucket,
    Hour,
    LogOp,
    Normalize,
    NotFittedError,
    Op,
    PadTruncate,
    SessionAge,
    TimeSincePrev,
    Weekday,
    hash_strings,
    op_from_spec,
)
from features.ops import categorical as categorical_module
from features.ops.hashing import stable_hash64_py

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
E = math.e
NAN, INF = math.nan, math.inf


def fnv1a64_py(data: bytes) -> int:
    """Plain FNV-1a 64, written independently of features.ops.hashing."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def fmix64_py(h: int) -> int:
    """MurmurHash3 fmix64, written independently of features.ops.hashing."""
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) % 2**64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) % 2**64
    return h ^ (h >> 33)


def ref_hash(value: str) -> int:
    return fmix64_py(fnv1a64_py(value.encode()))


# ---------------------------------------------------------------------------------------
# Cases for the shared suite
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], Op]
    fit: pa.Array
    column: pa.Array  # holds the edge values of this op
    expected: list[float] | list[int]  # what the documented rules give for ``column``
    offsets: np.ndarray | None = None

    def __repr__(self) -> str:
        return self.id


def _log1p(seconds: list[float]) -> list[float]:
    return [math.log1p(s) for s in seconds]


# 2024-03-04 is a Monday; 13:30 UTC.
MONDAY_1330 = int(datetime(2024, 3, 4, 13, 30, tzinfo=UTC).timestamp() * 1000)
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
# Three sessions, the middle one empty; the third event is 0.5 s out of order.
TS = pa.array([1_000, 3_000, 2_500, 50_000, 51_000], pa.int64())
TS_OFFSETS = np.array([0, 3, 3, 5], dtype=np.int64)
STD3 = math.sqrt(2 / 3)  # population std of [1, 2, 3]

CASES = [
    Case(
        "categorify",
        lambda: Categorify(),
        pa.array(["a", "b", "a", "c", "a", "b"]),
        pa.array(["b", "zzz", None, "a", "c"]),
        [4, 2, NULL_ID, 3, 5],
        np.array([0, 2, 5]),
    ),
    Case(
        "categorify_min_freq_oov_buckets",
        lambda: Categorify(min_freq=2, oov_buckets=4),
        pa.array(["a", "b", "a", "c", "a", "b"]),
        pa.array(["c", None, "a", "b", "new"]),
        [2 + ref_hash("c") % 4, NULL_ID, 6, 7, 2 + ref_hash("new") % 4],
    ),
    Case(
        "categorify_int",
        lambda: Categorify(),
        pa.array([10, 20, 10, 30], pa.int32()),
        pa.array([30, 99, None, 10], pa.int64()),
        [5, 2, NULL_ID, 3],
    ),
    Case(
        "hash_bucket",
        lambda: HashBucket(num_buckets=100),
        pa.array(["x"]),
        pa.array(["x", None, "y", ""]),
        [2 + ref_hash("x") % 100, NULL_ID, 2 + ref_hash("y") % 100, 2 + ref_hash("") % 100],
    ),
    Case(
        "normalize",
        lambda: Normalize(),
        pa.array([1.0, 2.0, 3.0, NAN, None, INF]),
        pa.array([2.0, 2.0 + STD3, None, NAN, INF, -INF]),
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    ),
    Case(
        "normalize_log_clip",
        lambda: Normalize(log=True, clip=1.0),
        pa.array([0.0, E**2 - 1]),  # logs 0 and 2: mean 1, std 1
        pa.array([E**2 - 1, 0.0, -5.0, E**4 - 1, NAN, -INF, INF, None]),
        [1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    ),
    Case(
        "log",
        lambda: LogOp(),
        pa.array([1.0]),
        pa.array([0.0, E - 1, -3.0, None, NAN, INF, -INF]),
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ),
    Case(
        "bucketize",
        lambda: Bucketize(boundaries=[0.0, 10.0]),
        pa.array([1.0]),
        pa.array([-INF, -1.0, 0.0, 5.0, 10.0, INF, NAN, None]),
        [2, 2, 3, 3, 4, 4, NULL_ID, NULL_ID],
    ),
    Case(
        "hour",
        lambda: Hour(),
        TS,
        pa.array([MONDAY_1330, 0, -1, MONDAY_1330 + 11 * HOUR_MS], pa.int64()),
        [14, 1, 24, 1],
    ),
    Case(
        "weekday",
        lambda: Weekday(),
        TS,
        pa.array([MONDAY_1330, MONDAY_1330 + 6 * DAY_MS, 0, -1], pa.int64()),
        [1, 7, 4, 3],
    ),
    Case(
        "time_since_prev",
        lambda: TimeSincePrev(),
        TS,
        TS,
        _log1p([0.0, 2.0, 0.0, 0.0, 1.0]),
        TS_OFFSETS,
    ),
    Case(
        "session_age",
        lambda: SessionAge(),
        TS,
        TS,
        _log1p([0.0, 2.0, 1.5, 0.0, 1.0]),
        TS_OFFSETS,
    ),
]


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal dtypes and shapes; ids exactly equal, floats to float32 rounding."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype.is_floating_point:
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(a.cpu(), b.cpu())


def _fitted(case: Case) -> Op:
    return case.make().fit(case.fit, None)


def _empty_like(column: pa.Array) -> pa.Array:
    return column.slice(0, 0)


def _via_parquet(arrays: dict[str, pa.Array]) -> dict[str, pa.ChunkedArray]:
    out = {}
    for key, arr in arrays.items():
        buf = io.BytesIO()
        pq.write_table(pa.table({"v": arr}), buf)
        out[key] = pq.read_table(io.BytesIO(buf.getvalue())).column("v")
    return out


def _round_trip(op: Op) -> Op:
    state = json.loads(json.dumps(op.state(), allow_nan=False))
    return Op.from_state(state, _via_parquet(op.arrays()))


def _snapshot(column: pa.Array) -> list[bytes | None]:
    return [None if b is None else b.to_pybytes() for b in column.buffers()]


# ---------------------------------------------------------------------------------------
# The shared suite
# ---------------------------------------------------------------------------------------


def test_every_registered_op_has_a_case() -> None:
    covered = {case.make().name for case in CASES}
    assert covered == set(OPS)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_transform_follows_the_documented_rules(case: Case) -> None:
    op = _fitted(case)
    out = op.transform(case.column, case.offsets)
    expected = torch.tensor(case.expected, dtype=op.out_dtype)
    _assert_same(out, expected)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_output_dtype_shape_and_device_are_fixed(case: Case) -> None:
    op = _fitted(case)
    out = op.transform(case.column, case.offsets, device="cpu")
    assert out.dtype == op.out_dtype
    assert out.dtype == (torch.int64 if op.kind == "categorical" else torch.float32)
    assert out.shape == (len(case.column),) and out.device.type == "cpu"
    if op.kind == "categorical":
        assert int(out.min()) > 0 and int(out.max()) < op.cardinality  # 0 is padding only
    else:
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_transform_before_fit_raises_unless_stateless(case: Case) -> None:
    op = case.make()
    if op.stateless:
        assert op.fitted
        op.transform(case.column, case.offsets)
    else:
        assert not op.fitted
        with pytest.raises(NotFittedError, match="fit"):
            op.transform(case.column, case.offsets)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fit_and_transform_mutate_neither_inputs_nor_the_op(case: Case) -> None:
    offsets = None if case.offsets is None else case.offsets.copy()
    fit_before, col_before = _snapshot(case.fit), _snapshot(case.column)
    op = case.make().fit(case.fit, None)
    state, arrays = op.state(), op.arrays()
    op.transform(case.column, offsets)
    assert _snapshot(case.fit) == fit_before and _snapshot(case.column) == col_before
    if offsets is not None:
        assert np.array_equal(offsets, case.offsets)
    assert op.state() == state
    assert all(arrays[k].equals(v) for k, v in op.arrays().items())


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_chunked_and_sliced_columns_give_the_same_output(case: Case) -> None:
    op = _fitted(case)
    expected = op.transform(case.column, case.offsets)
    n = len(case.column)
    chunked = pa.chunked_array([case.column.slice(0, n // 2), case.column.slice(n // 2)])
    _assert_same(op.transform(chunked, case.offsets), expected)
    # An array with a non-zero offset into its buffers (what slicing a batch gives).
    sliced = pa.concat_arrays([case.column, case.column]).slice(n, n)
    _assert_same(op.transform(sliced, case.offsets), expected)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_round_trip_through_json_and_parquet(case: Case) -> None:
    op = _fitted(case)
    loaded = _round_trip(op)
    assert type(loaded) is type(op) and loaded.fitted and loaded.params() == op.params()
    _assert_same(
        loaded.transform(case.column, case.offsets), op.transform(case.column, case.offsets)
    )
    assert loaded.state() == op.state()
    # Loading through the concrete class works too; a wrong class is refused.
    assert type(type(op).from_state(op.state(), op.arrays())) is type(op)
    other = next(cls for cls in OPS.values() if cls is not type(op))
    with pytest.raises(ValueError, match="state is for op"):
        other.from_state(op.state(), op.arrays())


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_unfitted_state_round_trips_unfitted(case: Case) -> None:
    op = _round_trip(case.make())
    assert op.fitted == op.stateless


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_spec_round_trip(case: Case) -> None:
    op = case.make()
    assert op_from_spec(json.loads(json.dumps(op.spec()))).params() == op.params()


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_zero_rows(case: Case) -> None:
    empty = _empty_like(case.column)
    offsets = None if case.offsets is None else np.zeros(1, dtype=np.int64)
    op = case.make().fit(_empty_like(case.fit), offsets)  # fitting on nothing is allowed
    assert op.fitted
    assert op.transform(empty, offsets).shape == (0,)
    # A fit on real data, then an empty batch with empty sessions.
    offsets = None if case.offsets is None else np.zeros(4, dtype=np.int64)
    assert _fitted(case).transform(empty, offsets).shape == (0,)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_a_missing_optional_column_is_all_missing(case: Case) -> None:
    """A feature absent from a whole batch arrives as a null-typed column."""
    op = _fitted(case)
    nulls = pa.nulls(len(case.column))
    if op.name in {"hour", "weekday", "time_since_prev", "session_age"}:
        with pytest.raises(ValueError):  # ts is a required field
            op.transform(nulls, case.offsets)
        return
    out = op.transform(nulls, case.offsets)
    missing = NULL_ID if op.kind == "categorical" else 0.0
    assert out.tolist() == [missing] * len(case.column)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_wrong_column_type_is_a_clear_error(case: Case) -> None:
    bad = pa.array([[1, 2], [3]])
    with pytest.raises(ValueError, match=case.make().name):
        _fitted(case).transform(bad, None if case.offsets is None else np.array([0, 2]))
    with pytest.raises(TypeError, match="pyarrow"):
        _fitted(case).transform(case.column.to_pylist(), case.offsets)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bad_offsets_are_a_clear_error(case: Case) -> None:
    op = _fitted(case)
    n = len(case.column)
    for offsets in (np.array([0, n + 1]), np.array([1, n]), np.array([0, n, n - 1, n])):
        with pytest.raises(ValueError, match="offsets"):
            op.transform(case.column, offsets)
    if op.needs_offsets:
        with pytest.raises(ValueError, match="needs session offsets"):
            op.transform(case.column)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_cpu_and_cuda_agree(case: Case) -> None:
    op = _fitted(case)
    cpu = op.transform(case.column, case.offsets, device="cpu")
    gpu = op.transform(case.column, case.offsets, device="cuda")
    assert gpu.device.type == "cuda"
    _assert_same(cpu, gpu)


# ---------------------------------------------------------------------------------------
# Registry and specs
# ---------------------------------------------------------------------------------------


def test_op_from_spec_rejects_unknown_ops_and_keys() -> None:
    with pytest.raises(ValueError, match="known ops"):
        op_from_spec({"op": "categorise"})
    with pytest.raises(ValueError, match=r"allowed: \['max_size', 'min_freq', 'oov_buckets'\]"):
        op_from_spec({"op": "categorify", "min_frequency": 2})
    with pytest.raises(ValueError, match="num_buckets"):
        op_from_spec({"op": "hash_bucket"})


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"op": "categorify", "min_freq": 0}, "min_freq"),
        ({"op": "categorify", "oov_buckets": 0}, "oov_buckets"),
        ({"op": "categorify", "max_size": 2.5}, "max_size"),
        ({"op": "hash_bucket", "num_buckets": True}, "num_buckets"),
        ({"op": "normalize", "clip": -1}, "clip"),
        ({"op": "normalize", "clip": INF}, "clip"),
        ({"op": "normalize", "log": 1}, "log"),
        ({"op": "bucketize", "boundaries": []}, "empty"),
        ({"op": "bucketize", "boundaries": [1.0, 1.0]}, "increasing"),
        ({"op": "bucketize", "boundaries": [0.0, NAN]}, "finite"),
    ],
)
def test_bad_parameters_are_value_errors(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        op_from_spec(spec)


def test_state_of_another_version_is_refused() -> None:
    state = Categorify().fit(pa.array(["a"])).state() | {"version": 99}
    with pytest.raises(ValueError, match="version"):
        Op.from_state(state, {})


# ---------------------------------------------------------------------------------------
# Categorify
# ---------------------------------------------------------------------------------------


def test_categorify_orders_by_decreasing_frequency_then_value() -> None:
    op = Categorify().fit(pa.array(["d", "c", "b", "c", "b", "a", "d"]))
    assert op.vocabulary.to_pylist() == ["b", "c", "d", "a"]
    assert op.counts.tolist() == [2, 2, 2, 1]
    assert op.first_vocab_id == 3 and op.cardinality == 7
    assert op.fit(pa.array(["z"])).vocabulary.to_pylist() == ["z"]  # fit starts over


def test_categorify_min_freq_holds_values_back_until_they_qualify() -> None:
    op = Categorify(min_freq=3).fit(pa.array(["a", "a", "a", "b", "b"]))
    assert op.vocabulary.to_pylist() == ["a"]
    assert op.transform(pa.array(["b"])).tolist() == [op.first_oov_id]
    op.partial_fit(pa.array(["b", "c"]))  # b reaches 3 across the two chunks
    assert op.vocabulary.to_pylist() == ["a", "b"]
    assert op.transform(pa.array(["a", "b", "c"])).tolist() == [3, 4, 2]


def test_categorify_max_size_caps_the_vocabulary_and_stops_growth() -> None:
    op = Categorify(max_size=2, min_freq=2).fit(pa.array([*"aaabbbcc", "d"]))
    assert op.vocabulary.to_pylist() == ["a", "b"]
    assert op.arrays()["pending_values"].to_pylist() == []  # full: nothing more is counted
    op.partial_fit(pa.array(list("eeee")))
    assert op.vocabulary.to_pylist() == ["a", "b"] and op.cardinality == 5


def test_categorify_oov_buckets_spread_unseen_values_stably() -> None:
    op = Categorify(oov_buckets=8).fit(pa.array(["known"]))
    unseen = pa.array([f"new-{i}" for i in range(4000)])
    ids = op.transform(unseen).numpy()
    assert set(ids.tolist()) == set(range(2, 10))
    assert np.bincount(ids)[2:].min() > 400  # about 500 each
    assert np.array_equal(ids, op.transform(unseen).numpy())
    assert op.transform(pa.array(["known"])).tolist() == [10]


def test_categorify_null_is_missing_not_unseen() -> None:
    op = Categorify().fit(pa.array(["a", None, None]))
    assert op.vocabulary.to_pylist() == ["a"]  # nulls are not vocabulary
    assert op.transform(pa.array([None, "b"])).tolist() == [NULL_ID, op.first_oov_id]
    all_null = Categorify().fit(pa.nulls(3))
    assert all_null.value_type is None and all_null.cardinality == 3
    assert all_null.transform(pa.array(["x", None])).tolist() == [2, NULL_ID]


def test_categorify_accepts_dictionary_and_view_strings() -> None:
    op = Categorify().fit(pa.array(["a", "b", "b"]))
    plain = op.transform(pa.array(["b", "a", "x"]))
    assert torch.equal(op.transform(pa.array(["b", "a", "x"]).dictionary_encode()), plain)
    assert torch.equal(op.transform(pa.array(["b", "a", "x"], pa.string_view())), plain)


def test_categorify_refuses_values_of_another_type() -> None:
    op = Categorify().fit(pa.array(["a"]))
    with pytest.raises(ValueError, match="fitted on string"):
        op.transform(pa.array([1, 2]))
    with pytest.raises(ValueError, match="fitted on string"):
        op.partial_fit(pa.array([1, 2]))
    with pytest.raises(ValueError, match="Bucketize"):
        Categorify().fit(pa.array([1.5]))


def test_categorify_decode_inverts_transform_on_the_vocabulary() -> None:
    values = pa.array([f"item-{i % 37}" for i in range(500)])
    op = Categorify().fit(values)
    assert op.decode(op.transform(values)).equals(values.cast(pa.large_string()))
    assert op.decode(torch.tensor([0, 1, 2, 10_000])).to_pylist() == [None] * 4


def test_categorify_lookup_paths_agree() -> None:
    """Small batches use the hash index, big ones pyarrow index_in: same ids."""
    op = Categorify().fit(pa.array([f"v{i}" for i in range(1000)]))
    query = pa.array(["v3", "v999", "nope", None, "v0", "v10"])
    small = op.transform(query)  # 6 rows < 1000 vocabulary values: hash path
    big = op.transform(pa.concat_arrays([query] * 400))  # 2400 rows: index_in path
    assert torch.equal(big[:6], small)
    vocab = op.vocabulary.to_pylist()  # ties by value: v0, v1, v10, v100, ...
    at = {v: op.first_vocab_id + vocab.index(v) for v in ("v3", "v999", "v0", "v10")}
    assert small.tolist() == [at["v3"], at["v999"], 2, NULL_ID, at["v0"], at["v10"]]
    assert at["v0"] == 3 and at["v10"] == 5


def test_categorify_survives_hash_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A collision inside the vocabulary falls back to exact matching; never a wrong id."""
    colliding = lambda column: np.zeros(len(column), dtype=np.uint64)  # noqa: E731
    monkeypatch.setattr(categorical_module.hashing, "hash_strings", colliding)
    op = Categorify().fit(pa.array(["a", "b", "c", "c"]))
    assert op.vocabulary.to_pylist() == ["c", "a", "b"]
    assert op.transform(pa.array(["b", "c", "zz"])).tolist() == [5, 3, 2]


def test_categorify_state_keeps_pending_counts() -> None:
    """Save after a partial fit, load, continue: same as never saving."""
    first, second = pa.array(list("aab")), pa.array(list("bcc"))
    straight = Categorify(min_freq=2).fit(first).partial_fit(second)
    resumed = _round_trip(Categorify(min_freq=2).fit(first)).partial_fit(second)
    assert resumed.vocabulary.equals(straight.vocabulary)
    assert np.array_equal(resumed.counts, straight.counts)


def test_categorify_fitted_state_without_arrays_is_refused() -> None:
    with pytest.raises(ValueError, match="arrays"):
        Op.from_state(Categorify().fit(pa.array(["a"])).state())


chunks_of_values = st.lists(
    st.lists(st.sampled_from([f"v{i}" for i in range(12)] + [None]), max_size=30),
    min_size=1,
    max_size=6,
)


@settings(max_examples=80, deadline=None)
@given(chunks=chunks_of_values, min_freq=st.integers(1, 3), max_size=st.none() | st.integers(1, 8))
def test_categorify_growth_never_renumbers(
    chunks: list[list[str | None]], min_freq: int, max_size: int | None
) -> None:
    op = Categorify(min_freq=min_freq, max_size=max_size)
    probe = pa.array([f"v{i}" for i in range(12)])
    before_vocab: list[str] = []
    before_ids: torch.Tensor | None = None
    for i, chunk in enumerate(chunks):
        column = pa.array(chunk, pa.string())
        op = op.fit(column) if i == 0 else op.partial_fit(column)
        vocab = op.vocabulary.to_pylist()
        assert vocab[: len(before_vocab)] == before_vocab  # only appended
        ids = op.transform(probe)
        if before_ids is not None:
            had_id = before_ids >= op.first_vocab_id
            assert torch.equal(ids[had_id], before_ids[had_id])
        assert max_size is None or len(vocab) <= max_size
        before_vocab, before_ids = vocab, ids


@settings(max_examples=60, deadline=None)
@given(chunks=chunks_of_values, min_freq=st.integers(1, 3))
def test_categorify_streaming_admits_what_one_fit_admits(
    chunks: list[list[str | None]], min_freq: int
) -> None:
    columns = [pa.array(chunk, pa.string()) for chunk in chunks]
    streamed = Categorify(min_freq=min_freq).fit(columns[0])
    for column in columns[1:]:
        streamed.partial_fit(column)
    whole = Categorify(min_freq=min_freq).fit(pa.chunked_array(columns, pa.string()))
    assert dict(zip(streamed.vocabulary.to_pylist(), streamed.counts.tolist(), strict=True)) == (
        dict(zip(whole.vocabulary.to_pylist(), whole.counts.tolist(), strict=True))
    )


# ---------------------------------------------------------------------------------------
# Hashing and HashBucket
# ---------------------------------------------------------------------------------------


def test_reference_fnv1a_matches_published_vectors() -> None:
    # From the FNV specification's test suite (draft-eastlake-fnv).
    assert fnv1a64_py(b"") == 0xCBF29CE484222325
    assert fnv1a64_py(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64_py(b"foobar") == 0x85944171F73967E8


def test_hash_matches_fixed_values() -> None:
    """The values every process and machine must give, forever (ids depend on them)."""
    expected = {
        "": 0xEFD01F60BA992926,
        "a": 0x82A2A958A9BECE5B,
        "sku-1": 0xB360DC87D45AEE69,
        "café": ref_hash("café"),
    }
    got = hash_strings(pa.array(list(expected)))
    assert [int(h) for h in got] == list(expected.values())
    assert all(stable_hash64_py(k) == v for k, v in expected.items())
    assert HashBucket(num_buckets=1000).transform(pa.array(["sku-1"])).tolist() == [
        2 + 0xB360DC87D45AEE69 % 1000
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=30))
def test_vectorised_hash_equals_the_reference(values: list[str]) -> None:
    got = hash_strings(pa.array(values, pa.string())).tolist()
    assert got == [ref_hash(v) for v in values]


def test_hash_of_integers_is_the_hash_of_their_text() -> None:
    ints = pa.array([0, -7, 2**62], pa.int64())
    assert hash_strings(ints).tolist() == [ref_hash(str(v)) for v in ints.to_pylist()]
    op = HashBucket(num_buckets=50)
    assert torch.equal(op.transform(ints), op.transform(pc.cast(ints, pa.string())))


def test_hash_bucket_spreads_values_evenly_even_for_power_of_two_buckets() -> None:
    ids = HashBucket(num_buckets=8).transform(pa.array([f"item-{i}" for i in range(16_000)]))
    counts = np.bincount(ids.numpy(), minlength=10)[2:]
    assert counts.min() > 1_800 and counts.max() < 2_200  # 2,000 expected each


# ---------------------------------------------------------------------------------------
# Normalize, LogOp, Bucketize
# ---------------------------------------------------------------------------------------

finite_floats = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(finite_floats | st.just(NAN), max_size=20), min_size=1, max_size=6))
def test_normalize_partial_fit_equals_fit_on_the_concatenation(chunks: list[list[float]]) -> None:
    columns = [pa.array(c, pa.float64()) for c in chunks]
    streamed = Normalize().fit(columns[0])
    for column in columns[1:]:
        streamed.partial_fit(column)
    whole = Normalize().fit(pa.chunked_array(columns, pa.float64()))
    finite = np.array([x for c in chunks for x in c if math.isfinite(x)])
    assert streamed.count == whole.count == finite.size
    if finite.size:
        assert streamed.mean == pytest.approx(finite.mean(), rel=1e-9, abs=1e-6)
        assert streamed.std == pytest.approx(finite.std(), rel=1e-7, abs=1e-6)
        assert whole.std == pytest.approx(finite.std(), rel=1e-7, abs=1e-6)


def test_normalize_constant_feature_is_centred_not_scaled() -> None:
    op = Normalize().fit(pa.array([0.1] * 7))
    assert op.scale == 1.0
    assert op.transform(pa.array([0.1, 1.1])).tolist() == pytest.approx([0.0, 1.0])


def test_normalize_fitted_on_nothing_is_the_identity() -> None:
    op = Normalize().fit(pa.array([None, NAN], pa.float64()))
    assert (op.count, op.mean, op.scale) == (0, 0.0, 1.0)
    assert op.transform(pa.array([3.0, NAN])).tolist() == [3.0, 0.0]


def test_normalize_accepts_integers() -> None:
    op = Normalize().fit(pa.array([1, 3], pa.int32()))
    assert op.transform(pa.array([3, None], pa.int64())).tolist() == [1.0, 0.0]


def test_bucketize_boundary_values_go_to_the_upper_bucket() -> None:
    op = Bucketize(boundaries=[1, 2, 3])
    assert op.transform(pa.array([0.999, 1, 2, 2.5, 3, 1e300])).tolist() == [2, 3, 4, 4, 5, 5]
    assert op.cardinality == 6


# ---------------------------------------------------------------------------------------
# Time ops
# ---------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**42), min_size=1, max_size=20))
def test_hour_and_weekday_agree_with_datetime(ts: list[int]) -> None:
    column = pa.array(ts, pa.int64())
    when = [datetime.fromtimestamp(t // 1000, tz=UTC) for t in ts]  # floor to the second
    assert Hour().transform(column).tolist() == [d.hour + 1 for d in when]
    assert Weekday().transform(column).tolist() == [d.weekday() + 1 for d in when]


def test_time_ops_accept_timestamp_columns() -> None:
    ms = pa.array([MONDAY_1330, MONDAY_1330 + 90_000], pa.int64())
    for unit, scale in (("ms", 1), ("us", 1_000), ("s", None)):
        if scale is None:
            column = pa.array([MONDAY_1330 // 1000, MONDAY_1330 // 1000 + 90], pa.timestamp(unit))
        else:
            column = pa.array([v * scale for v in ms.to_pylist()], pa.timestamp(unit, "UTC"))
        offsets = np.array([0, 2])
        for op in (Hour(), Weekday(), TimeSincePrev(), SessionAge()):
            _assert_same(op.transform(column, offsets), op.transform(ms, offsets))


def test_time_ops_refuse_null_ts() -> None:
    for op in (Hour(), Weekday(), TimeSincePrev(), SessionAge()):
        with pytest.raises(ValueError, match="ts is required"):
            op.transform(pa.array([1, None], pa.int64()), np.array([0, 2]))


def test_time_since_prev_and_session_age_reset_at_session_boundaries() -> None:
    # Sessions: [0 s, 10 s], [], [5 s], [100 s, 100 s, 160 s]
    ts = pa.array([0, 10_000, 5_000, 100_000, 100_000, 160_000], pa.int64())
    offsets = np.array([0, 2, 2, 3, 6])
    since = TimeSincePrev().transform(ts, offsets)
    age = SessionAge().transform(ts, offsets)
    torch.testing.assert_close(since.expm1(), torch.tensor([0.0, 10, 0, 0, 0, 60]))
    torch.testing.assert_close(age.expm1(), torch.tensor([0.0, 10, 0, 0, 0, 60]))
    with pytest.raises(ValueError, match="offsets"):
        TimeSincePrev().transform(ts)


# ---------------------------------------------------------------------------------------
# PadTruncate
# ---------------------------------------------------------------------------------------


def _pad_reference(values: list[int], lengths: list[int], max_len: int) -> list[list[int]]:
    rows, start = [], 0
    for n in lengths:
        kept = values[start : start + n][-max_len:]
        rows.append(kept + [0] * (max_len - len(kept)))
        start += n
    return rows


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), max_size=8), max_len=st.integers(1, 6))
def test_pad_truncate_keeps_the_last_events_and_pads_right(
    lengths: list[int], max_len: int
) -> None:
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    values = torch.arange(1, int(offsets[-1]) + 1)
    out = PadTruncate(max_len=max_len).transform(values, offsets)
    assert out.values.shape == out.mask.shape == (len(lengths), max_len)
    assert out.mask.dtype == torch.bool and out.values.dtype == values.dtype
    assert out.values.tolist() == _pad_reference(values.tolist(), lengths, max_len)
    assert out.mask.sum(dim=1).tolist() == [min(n, max_len) for n in lengths]
    assert torch.equal(out.mask, out.values != 0)


def test_pad_truncate_longest_uses_the_batch_length() -> None:
    op = PadTruncate(max_len=50, pad_to="longest")
    out = op.transform(torch.tensor([1.0, 2.0, 3.0]), np.array([0, 1, 3]))
    assert out.values.tolist() == [[1.0, 0.0], [2.0, 3.0]]
    assert op.transform(torch.zeros(0), np.array([0, 0])).values.shape == (1, 1)
    assert PadTruncate(max_len=2, pad_to="longest").length(np.array([0, 9])) == 2


def test_pad_truncate_keeps_trailing_dimensions_and_handles_no_rows() -> None:
    values = torch.arange(12.0).view(6, 2)
    out = PadTruncate(max_len=2).transform(values, np.array([0, 3, 6]))
    assert out.values.shape == (2, 2, 2)
    assert out.values[0].tolist() == [[2.0, 3.0], [4.0, 5.0]]
    none = PadTruncate(max_len=4).transform(torch.zeros(0, dtype=torch.int64), np.array([0]))
    assert none.values.shape == (0, 4) and none.mask.shape == (0, 4)


def test_pad_truncate_does_not_mutate_and_round_trips() -> None:
    values, offsets = torch.arange(5), np.array([0, 5])
    op = PadTruncate(max_len=3, pad_to="longest")
    op.transform(values, offsets)
    assert values.tolist() == [0, 1, 2, 3, 4] and offsets.tolist() == [0, 5]
    loaded = PadTruncate.from_state(json.loads(json.dumps(op.state())))
    assert loaded.params() == op.params() and loaded.spec()["op"] == "pad_truncate"
    with pytest.raises(ValueError, match="pad_truncate"):
        PadTruncate.from_state(Categorify().state())


def test_pad_truncate_validates_its_input() -> None:
    with pytest.raises(ValueError, match="max_len"):
        PadTruncate(max_len=0)
    with pytest.raises(ValueError, match="pad_to"):
        PadTruncate(max_len=3, pad_to="left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offsets"):
        PadTruncate(max_len=3).transform(torch.arange(3), np.array([0, 2]))


@pytest.mark.gpu
@CUDA
def test_pad_truncate_cpu_and_cuda_agree() -> None:
    values, offsets = torch.arange(1, 11), np.array([0, 7, 7, 10])
    cpu = PadTruncate(max_len=4).transform(values, offsets)
    gpu = PadTruncate(max_len=4).transform(values.cuda(), offsets)
    assert gpu.values.device.type == "cuda"
    assert torch.equal(cpu.values, gpu.values.cpu()) and torch.equal(cpu.mask, gpu.mask.cpu())
